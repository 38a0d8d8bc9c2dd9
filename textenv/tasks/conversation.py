"""Multi-turn tasks: the conversation's protocol (:class:`Turn`, :class:`Episode`), the base
:class:`MultiTurnTask`, your own turn function (:class:`FunctionTask`) and the toy two-turn task.

An episode opens with a prompt; after each agent turn the env calls ``episode.respond(history)``
(``history``: the conversation as chat messages, the agent's last turn last) for the reply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import numpy as np

from textenv.rewards import RewardError, import_object
from textenv.tasks.base import package_lines, split_prompts

Messages = list[dict[str, str]]


class Turn(NamedTuple):
    """What the env says after the agent's turn."""

    reply: str | None
    """text appended to the context as the env's message (None or "": nothing, only when done)"""
    reward: float = 0.0
    """paid at the agent's last token of the turn"""
    done: bool = False
    """the episode ends after this turn"""


class Episode(Protocol):
    """One conversation: its opening prompt and the env's side of it."""

    @property
    def prompt(self) -> str | Messages: ...  # read-only: an episode may narrow it to str

    def respond(self, history: Messages) -> Turn | tuple[str | None, float, bool]: ...


@dataclass
class MultiTurnTask:
    """Base of the multi-turn tasks: budgets, stop strings, reply format, and ``new_episode``."""

    name: ClassVar[str] = "MultiTurn"
    max_prompt_tokens: int = 128
    max_context_tokens: int = 128
    """tokens after the prompt, the agent's and the env's together"""
    max_turn_tokens: int = 24
    """the agent's tokens per turn; a turn that reaches it ends there and the env replies"""
    max_turns: int = 4
    """agent turns per episode; the episode ends after the last one's reply"""
    stop: list[str] = field(default_factory=list)
    """strings that end the agent's turn (besides EOS), e.g. the end of a tool call"""
    kl_coef: float = 0.02
    chat_fallback: ClassVar[bool] = False
    """never needed: without a chat template the conversation is rendered as plain text"""
    reply_role: str = "user"
    """the chat role of the env's replies ("user", or "tool" for templates that have it)"""
    reply_format: str = "\n{reply}\n"
    """how a reply is written when the conversation is plain text (no chat template)"""
    chat: bool = True
    """render the conversation with the tokenizer's chat template when it has one (off: plain
    text)"""
    split: Literal["all", "train", "test"] = "all"
    """which episodes: all, the training ones, or the held-out ones (see each task)"""

    @property
    def max_new_tokens(self) -> int:  # the generation core's name for the budget after the prompt
        return self.max_context_tokens

    @property
    def has_held_out(self) -> bool:
        """Whether the task has a held-out part (``split="test"``) to evaluate on."""
        return False

    def new_episode(self, rng: np.random.Generator) -> Episode:
        raise NotImplementedError

    def validate(self) -> None:
        for name in ("max_prompt_tokens", "max_context_tokens", "max_turn_tokens", "max_turns"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"task {self.name}: {name} must be >= 1, got {getattr(self, name)}"
                )
        if self.kl_coef < 0:
            raise ValueError(f"task {self.name}: kl_coef must be >= 0, got {self.kl_coef}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(
                f"task {self.name}: stop strings must be non-empty strings, got {self.stop!r}"
            )
        if "{reply}" not in self.reply_format:
            raise ValueError(
                f"task {self.name}: reply_format must contain '{{reply}}', "
                f"got {self.reply_format!r}"
            )


def as_messages(prompt: str | Messages) -> Messages:
    return (
        [{"role": "user", "content": prompt}]
        if isinstance(prompt, str)
        else [dict(m) for m in prompt]
    )


def check_turn(result: Any, task: str, row: int) -> Turn:
    """``respond``'s result as a :class:`Turn`, or a RewardError naming what is wrong."""
    try:
        reply, reward, done = result
    except (TypeError, ValueError):
        raise RewardError(
            f"task {task}: respond() must return (reply, reward, done), got {result!r} (row {row})"
        ) from None
    if reply is not None and not isinstance(reply, str):
        raise RewardError(
            f"task {task}: the reply must be a string or None, "
            f"got {type(reply).__name__} (row {row})"
        )
    if isinstance(reward, (str, bytes, bool)):
        raise RewardError(f"task {task}: the reward must be a number, got {reward!r} (row {row})")
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise RewardError(
            f"task {task}: the reward must be a number, got {reward!r} (row {row})"
        ) from None
    if not math.isfinite(reward):
        raise RewardError(f"task {task}: respond() returned reward {reward} (row {row})")
    return Turn(reply or None, reward, bool(done))


@dataclass
class _FunctionEpisode:
    prompt: str | Messages
    fn: Callable[[Messages], Any]

    def respond(self, history: Messages):
        return self.fn(history)


@dataclass
class FunctionTask(MultiTurnTask):
    """Your own turn-based env in a few lines: ``respond(history) -> (reply, reward, done)``.

    ``history`` is the conversation as chat messages, the agent's last turn last; each
    episode opens with a prompt drawn from ``prompts``. ``respond`` may also be named as
    ``"module:callable"``, imported as a reward is (a class is constructed with no arguments);
    the trainer takes it so: ``--task MultiTurn --task-options '{"respond": "mymodule:respond",
    "prompts": [...]}'``. For episodes with their own state (a
    game), subclass :class:`MultiTurnTask` and return an :class:`Episode` from ``new_episode``.

        def respond(history):
            said = history[-1]["content"]
            if "please" in said:
                return None, 1.0, True
            return "Say the magic word.", 0.0, False

        env = gym.make(
            "textenv/MultiTurn-v0", model="tiny", respond=respond, prompts=["Ask me nicely."]
        )
    """

    name: ClassVar[str] = "FunctionTask"
    respond: Callable[[Messages], Any] | str | None = None
    prompts: list[str | Messages] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.respond, str):
            found = import_object(self.respond, "respond")
            self.respond = found() if isinstance(found, type) else found

    def validate(self) -> None:
        super().validate()
        if not callable(self.respond):
            raise ValueError(
                f"task {self.name}: respond must be a callable (history) -> (reply, reward, done)"
            )
        if not self.prompts:
            raise ValueError(f"task {self.name}: prompts is empty")

    def new_episode(self, rng: np.random.Generator) -> Episode:
        assert callable(self.respond)  # validate() checked it
        return _FunctionEpisode(self.prompts[int(rng.integers(len(self.prompts)))], self.respond)


@dataclass
class _ToyTurnsEpisode:
    prompt: str

    def respond(self, history: Messages) -> Turn:
        said = history[-1]["content"]
        reward = said.count("a") / max(len(said), 1)
        turns = sum(m["role"] == "assistant" for m in history)
        return Turn("ok, more.", reward, False) if turns < 2 else Turn(None, reward, True)


@dataclass
class ToyTurns(MultiTurnTask):
    __doc__ = """Say the letter ``a``, twice: a two-turn task a tiny random model learns on a CPU
    in a minute.

    ## Description
    The Toy task's prompts (``model="tiny"``'s character vocabulary); after the agent's first
    turn the env replies ``ok, more.``, after the second the episode ends. Each turn's reward
    is the fraction of its characters that are ``a``, so the best return is 2.

    ## Arguments
    ``gym.make("textenv/ToyTurns-v0", model="tiny", max_turn_tokens=6)``

    ## Version History
    * v0: initial version.
    """
    name: ClassVar[str] = "ToyTurns"
    max_prompt_tokens: int = 16
    max_context_tokens: int = 32
    max_turn_tokens: int = 6
    max_turns: int = 2
    kl_coef: float = 0.0
    reply_format: str = " {reply} "  # the tiny vocabulary has no newline

    @property
    def has_held_out(self) -> bool:
        return True

    def new_episode(self, rng: np.random.Generator) -> Episode:
        prompts = split_prompts(package_lines("toy_prompts.txt"), self.split)
        return _ToyTurnsEpisode(prompts[int(rng.integers(len(prompts)))])
