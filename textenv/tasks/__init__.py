"""The tasks, single- and multi-turn, and their one registry.

A single-turn task (:class:`Task`) is a prompt set, a default reward, a response budget and a KL
coefficient; a multi-turn task (:class:`MultiTurnTask`) starts episodes that reply to the agent's
turns. Each registered task is a Gymnasium id ``textenv/<Name>-v0`` (see ``textenv/__init__.py``)
and documents itself in Gymnasium's env format. One module per family:

    base          the single-turn base, prompt files and the held-out split
    text          Sentiment, RewardModel, Toy
    verifiable    Arithmetic, ReasoningGym and its curated generators (RG-<Name>)
    instructions  Instructions: an instruction under checkable constraints (IFEval-style)
    conversation  the multi-turn base and protocol (Turn, Episode), FunctionTask, ToyTurns
    tools         Calculator
    games         TextArena, GuessTheNumber, TicTacToe
"""

from __future__ import annotations

from typing import Any

from textenv.rewards import import_object
from textenv.tasks.base import HELD_OUT_EVERY, Prompt, Task, read_prompts, split_prompts
from textenv.tasks.conversation import (
    Episode,
    FunctionTask,
    Messages,
    MultiTurnTask,
    ToyTurns,
    Turn,
)
from textenv.tasks.games import GuessTheNumber, TextArena, TicTacToe, random_legal_move
from textenv.tasks.instructions import Instructions
from textenv.tasks.text import RewardModel, Sentiment, Toy
from textenv.tasks.tools import Calculator, safe_arithmetic
from textenv.tasks.verifiable import CURATED_REASONING_GYM, Arithmetic, ReasoningGym, curated

__all__ = [
    "CURATED_REASONING_GYM",
    "HELD_OUT_EVERY",
    "TASKS",
    "TASK_ALIASES",
    "AnyTask",
    "Arithmetic",
    "Calculator",
    "Episode",
    "FunctionTask",
    "GuessTheNumber",
    "Instructions",
    "Messages",
    "MultiTurnTask",
    "Prompt",
    "ReasoningGym",
    "RewardModel",
    "Sentiment",
    "Task",
    "TextArena",
    "TicTacToe",
    "Toy",
    "ToyTurns",
    "Turn",
    "make_task",
    "random_legal_move",
    "read_prompts",
    "safe_arithmetic",
    "split_prompts",
    "task_class",
]

AnyTask = Task | MultiTurnTask
"""A single-turn or a multi-turn task."""

TASKS: dict[str, type[Task] | type[MultiTurnTask]] = {
    cls.name: cls for cls in (Sentiment, RewardModel, Arithmetic, Toy, ReasoningGym, Instructions)
}
TASKS |= {name: curated(name, dataset) for name, dataset in CURATED_REASONING_GYM.items()}
TASKS |= {
    cls.name: cls
    for cls in (FunctionTask, Calculator, TextArena, GuessTheNumber, TicTacToe, ToyTurns)
}


TASK_ALIASES = {"MultiTurn": "FunctionTask"}
"""Other names of registered tasks: ``MultiTurn`` is FunctionTask's, as in textenv/MultiTurn-v0."""


def task_class(name: str) -> type[Task] | type[MultiTurnTask]:
    """The task class a name stands for: a registered name, an alias (``"MultiTurn"``), or
    ``"module:Class"``, your subclass of :class:`Task` or :class:`MultiTurnTask` (imported from
    the working directory, as rewards are; see :func:`textenv.rewards.importing_from`)."""
    name = TASK_ALIASES.get(name, name)
    if name in TASKS:
        return TASKS[name]
    if ":" not in name:
        known = ", ".join([*TASKS, *TASK_ALIASES])
        raise ValueError(
            f"unknown task {name!r}; known tasks: {known}, or module:Class (your Task or "
            "MultiTurnTask subclass)"
        )
    cls = import_object(name, "task")
    if not (isinstance(cls, type) and issubclass(cls, (Task, MultiTurnTask))):
        raise ValueError(f"task {name} is not a Task or MultiTurnTask subclass")
    return cls


def make_task(task: str | AnyTask, **overrides: Any) -> AnyTask:
    """A task by name (``"Sentiment"``, ``"Calculator"``, ``"mymodule:MyTask"``: see
    :func:`task_class`) or instance, with field overrides (``max_new_tokens=...``); overrides
    that are None keep the task's defaults."""
    if isinstance(task, (Task, MultiTurnTask)):
        if overrides:
            base = "MultiTurnTask" if isinstance(task, MultiTurnTask) else "Task"
            raise ValueError(f"pass overrides to the {base} you construct, not beside it")
        return task
    cls = task_class(task)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return cls(**overrides)
