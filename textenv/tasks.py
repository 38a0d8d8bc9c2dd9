"""Tasks: a prompt set, a default reward, a response budget and a KL coefficient.

Each task is registered with Gymnasium as ``textenv/<Name>-v0`` (see ``textenv/__init__.py``)
and documents itself in Gymnasium's env format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, cast

from textenv.rewards import (
    AnswerRegex,
    ClassifierReward,
    KeywordReward,
    ReasoningGymReward,
    RewardFn,
    get_reward,
)

Prompt = str | list[dict[str, str]]
"""A prompt: a text, or chat messages (``[{"role": ..., "content": ...}, ...]``)."""

_T = TypeVar("_T")


def _lines(name: str) -> list[str]:
    text = (resources.files("textenv") / "data" / name).read_text(encoding="utf-8")
    return [line.rstrip("\n") for line in text.splitlines() if line.strip()]


def _jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(name)]


HELD_OUT_EVERY = 5
"""Every 5th prompt of a task's set (indices 4, 9, ...) is held out: ``split="test"``."""


def split_prompts(prompts: list[_T], split: str) -> list[_T]:
    """The ``"train"`` or ``"test"`` part of ``prompts`` (``"all"``: unchanged). The split is by
    position, so it is the same on every machine and independent of the seed."""
    if split == "all":
        return list(prompts)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    held_out = split == "test"
    return [
        p for i, p in enumerate(prompts) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out
    ]


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from a file: one per line (``.txt`` and anything else), or JSONL (``.jsonl``) with a
    ``"prompt"`` string or a chat ``"messages"`` list per line (messages are kept as the list;
    the env renders them with the tokenizer's chat template)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts: list[Prompt] = []
    for n, line in enumerate(lines, 1):  # n: the file's line number, blank lines counted
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
        value = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        if not isinstance(value, (str, list)):
            raise ValueError(f'{path}:{n}: each line needs a "prompt" string or a "messages" list')
        prompts.append(value)
    return prompts


_SECTIONS = """
    ## Action Space
    ``Discrete(vocab_size)``: the id of the next token of the policy's tokenizer.

    ## Observation Space
    ``Dict(input_ids=Box(0, vocab_size-1, (P+B,), int64), attention_mask=Box(0, 1, (P+B,), int64))``
    with ``P = max_prompt_tokens`` and ``B = max_new_tokens``: the prompt left-padded into the
    first ``P`` slots, the response so far in the next ``B`` (then padding), mask 1 on real tokens.

    ## Rewards
    ``score · 1[last step] + kl_coef · log π_ref(a_t | s_t)``: an agent that adds
    ``−kl_coef · log π(a_t | s_t)`` gets exactly the KL-penalised RLHF reward
    ``score − kl_coef · Σ_t (log π − log π_ref)``. ``info["ref_logprob"]`` carries ``log π_ref``.

    ## Starting State
    A prompt drawn uniformly from the task's prompt set with the env's ``np_random``, or
    ``options["prompt"]``. Prompts longer than ``max_prompt_tokens`` are left-truncated.

    ## Episode End
    Terminated at the EOS token or when the response reaches ``max_new_tokens`` (a terminal
    state of the task, not a time limit: ``info["truncated_response"]`` says which). Never
    truncated.
"""


@dataclass
class Task:
    """Base of the tasks; subclasses set the defaults and document the task."""

    name: ClassVar[str] = "Task"
    prompts: list[Prompt] = field(default_factory=list)
    """prompt texts or chat message lists, or a path to a prompts file (see read_prompts)"""
    reward: str | RewardFn | None = None
    max_new_tokens: int = 24
    max_prompt_tokens: int = 64
    kl_coef: float = 0.05
    split: Literal["all", "train", "test"] = "all"
    """which prompts: all, the training part, or the held-out part (every 5th, see split_prompts)"""
    chat_fallback: ClassVar[bool] = False
    """render chat prompts as plain text when the tokenizer has no chat template (else an error)"""

    def __post_init__(self) -> None:
        if isinstance(
            self.prompts, (str, os.PathLike)
        ):  # a path, not a string of one-character prompts
            self.prompts = read_prompts(self.prompts)
        self.prompts = split_prompts(self.prompts, self.split)

    def build_reward(self) -> RewardFn:
        if self.reward is None:
            raise ValueError(f"task {self.name} needs a reward")
        return get_reward(self.reward)

    def validate(self) -> None:
        if not self.prompts:
            part = (
                f" (split {self.split!r}: every {HELD_OUT_EVERY}th prompt is held out)"
                if self.split != "all"
                else ""
            )
            raise ValueError(f"task {self.name}: the prompt set is empty{part}")
        for i, p in enumerate(self.prompts):
            if isinstance(p, list):  # chat messages
                if not p or not all(
                    isinstance(m, dict) and {"role", "content"} <= m.keys() for m in p
                ):
                    raise ValueError(
                        f"task {self.name}: prompt {i} is not a list of "
                        "{'role', 'content'} messages"
                    )
            elif not isinstance(p, str) or not p.strip():
                raise ValueError(f"task {self.name}: prompt {i} is empty")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"task {self.name}: max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if self.max_prompt_tokens < 1:
            raise ValueError(
                f"task {self.name}: max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}"
            )
        if self.kl_coef < 0:
            raise ValueError(f"task {self.name}: kl_coef must be >= 0, got {self.kl_coef}")


@dataclass
class Sentiment(Task):
    __doc__ = (
        """Continue a review so that it reads positive.

    ## Description
    Prompts are openings of reviews of films, food, products and places, written for this
    project. The score is VADER's compound sentiment of the continuation (offline lexicon,
    in [-1, 1]); with ``classifier="<hf sentiment model id or path>"`` it is instead that
    classifier's probability of ``classifier_label`` (default ``"POSITIVE"``) for the
    continuation alone.
    """
        + _SECTIONS
        + """
    ## Arguments
    ``gym.make("textenv/Sentiment-v0", model="embedded", max_new_tokens=24, kl_coef=0.05)``;
    ``classifier=..., classifier_label="POSITIVE"`` to score with an HF classifier.

    ## Version History
    * v0: initial version.
    """
    )
    name: ClassVar[str] = "Sentiment"
    prompts: list[Prompt] = field(default_factory=lambda: list(_lines("sentiment_prompts.txt")))
    classifier: str | None = None
    classifier_label: str | int = "POSITIVE"
    max_prompt_tokens: int = 32  # max_new_tokens 24 and kl_coef 0.05: the base's

    def build_reward(self) -> RewardFn:
        if self.reward is not None:
            return get_reward(self.reward)
        if self.classifier is not None:
            return ClassifierReward(
                self.classifier, self.classifier_label, probability=True, with_prompt=False
            )
        return get_reward("vader")


@dataclass
class RewardModel(Task):
    __doc__ = (
        """Answer an instruction; a learned reward model scores prompt + response.

    ## Description
    Prompts are short instructions written for this project. ``reward_model`` is any
    ``AutoModelForSequenceClassification`` id or path; ``label`` picks the logit (0 for a
    scalar-head reward model, or a label name of ``config.id2label``).
    """
        + _SECTIONS
        + """
    ## Arguments
    ``gym.make("textenv/RewardModel-v0", model=..., reward_model="path/to/rm", label=0)``

    ## Version History
    * v0: initial version.
    """
    )
    name: ClassVar[str] = "RewardModel"
    prompts: list[Prompt] = field(default_factory=lambda: list(_lines("instruction_prompts.txt")))
    reward_model: str | None = None
    label: str | int = 0
    max_new_tokens: int = 48
    max_prompt_tokens: int = 48  # kl_coef 0.05: the base's

    def build_reward(self) -> RewardFn:
        if self.reward is not None:
            return get_reward(self.reward)
        if self.reward_model is None:
            raise ValueError(
                "task RewardModel needs "
                "reward_model=<AutoModelForSequenceClassification id or path>"
            )
        return ClassifierReward(self.reward_model, self.label)


@dataclass
class Arithmetic(Task):
    __doc__ = (
        """Answer short arithmetic and word problems; the answer is verified.

    ## Description
    160 generated ``a op b`` questions and 16 word problems, each with its answer (package
    data). The score is 1 when the first number in the response equals the answer
    (``AnswerRegex``), else 0; ``ExactMatch`` is the stricter alternative.
    """
        + _SECTIONS
        + """
    ## Arguments
    ``gym.make("textenv/Arithmetic-v0", model="embedded", max_new_tokens=8)``

    ## Version History
    * v0: initial version.
    """
    )
    name: ClassVar[str] = "Arithmetic"
    answers: dict[str, str] = field(
        default_factory=lambda: {r["prompt"]: r["answer"] for r in _jsonl("arithmetic.jsonl")}
    )
    max_new_tokens: int = 8
    max_prompt_tokens: int = 48
    kl_coef: float = 0.02

    def __post_init__(self) -> None:
        if not self.prompts:
            self.prompts = list(self.answers)
        super().__post_init__()

    def build_reward(self) -> RewardFn:
        return get_reward(self.reward) if self.reward is not None else AnswerRegex(self.answers)


@dataclass
class Toy(Task):
    __doc__ = (
        """Say the letter ``a``: learnable by a tiny random model in about a minute on a CPU.

    ## Description
    Short prompts over the tiny character vocabulary (``model="tiny"``). The score is the
    fraction of response characters that are ``a`` (``KeywordReward("a")``), so a policy
    that writes only ``a`` until the budget scores 1.
    """
        + _SECTIONS
        + """
    ## Arguments
    ``gym.make("textenv/Toy-v0", model="tiny", max_new_tokens=8, kl_coef=0.0)``

    ## Version History
    * v0: initial version.
    """
    )
    name: ClassVar[str] = "Toy"
    prompts: list[Prompt] = field(default_factory=lambda: list(_lines("toy_prompts.txt")))
    max_new_tokens: int = 8
    max_prompt_tokens: int = 16
    kl_coef: float = 0.0

    def build_reward(self) -> RewardFn:
        return get_reward(self.reward) if self.reward is not None else KeywordReward("a")


@dataclass
class ReasoningGym(Task):
    __doc__ = (
        """A task generated by reasoning-gym (100+ procedural generators), scored by its own
    checker.

    ## Description
    ``size`` questions of the reasoning-gym dataset ``dataset`` (generated for ``seed``, with
    the generator's ``config``). Each prompt is the chat ``[system, user]`` with one of
    reasoning-gym's system prompts (``system_prompt``, default ``"direct"``: answer between
    ``<answer>`` tags) and the question; the env renders it with the tokenizer's chat
    template, or as plain text for a tokenizer without one. The score is the dataset's own
    ``score_answer`` of the extracted answer (``ReasoningGymReward``), 1 for a right answer.
    Needs ``pip install reasoning-gym``.
    """
        + _SECTIONS
        + """
    ## Arguments
    ``gym.make("textenv/ReasoningGym-v0", model=..., dataset="basic_arithmetic", size=500, seed=0,
    config={"max_terms": 3})``; the curated ids (``textenv/RG-ChainSum-v0``, ...) fix ``dataset``.

    ## Version History
    * v0: initial version.
    """
    )
    name: ClassVar[str] = "ReasoningGym"
    chat_fallback: ClassVar[bool] = True  # plain text for tokenizers without a chat template
    dataset: str = "basic_arithmetic"
    size: int = 500
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    system_prompt: str = "direct"
    """a reasoning-gym system prompt's name (``"direct"``, ``"default"``, ...) or your own text"""
    answer_format: Literal["tag", "raw", "number", "last_number"] = "tag"
    """where the answer is: between <answer> tags, the whole response, or its first or last
    number"""
    max_new_tokens: int = 16
    max_prompt_tokens: int = 160
    kl_coef: float = 0.02

    def __post_init__(self) -> None:
        if not self.prompts:
            self.prompts = [
                [
                    {"role": "system", "content": self.system_text()},
                    {"role": "user", "content": e["question"]},
                ]
                for e in self.generated()
            ]
        super().__post_init__()

    def generated(self) -> Any:
        """The reasoning-gym dataset (generated once per task object)."""
        if getattr(self, "_data", None) is None:
            try:
                import reasoning_gym
            except ImportError as e:
                raise ImportError(
                    "task ReasoningGym needs reasoning-gym: pip install reasoning-gym"
                ) from e
            if self.size < 1:
                raise ValueError(f"task ReasoningGym: size must be >= 1, got {self.size}")
            self._data = reasoning_gym.create_dataset(
                self.dataset, size=self.size, seed=self.seed, **self.config
            )
        return self._data

    def system_text(self) -> str:
        from reasoning_gym.utils import SYSTEM_PROMPTS

        if self.system_prompt in SYSTEM_PROMPTS:
            return SYSTEM_PROMPTS[self.system_prompt]
        if not self.system_prompt.strip() or (
            " " not in self.system_prompt and len(self.system_prompt) < 20
        ):
            raise ValueError(
                f"system_prompt must be one of {sorted(SYSTEM_PROMPTS)} "
                "or your own text (a sentence), "
                f"got {self.system_prompt!r}"
            )
        return self.system_prompt

    def build_reward(self) -> RewardFn:
        if self.reward is not None:
            return get_reward(self.reward)
        return ReasoningGymReward(self.generated(), self.answer_format)


# A curated handful of reasoning-gym generators, each its own task (and env id textenv/<name>-v0).
CURATED_REASONING_GYM = {
    "RG-BasicArithmetic": "basic_arithmetic",
    "RG-ChainSum": "chain_sum",
    "RG-LegCounting": "leg_counting",
    "RG-LetterCounting": "letter_counting",
    "RG-SpellBackward": "spell_backward",
}


def _curated(task_name: str, dataset: str) -> type[ReasoningGym]:
    cls = type(
        task_name.replace("-", ""),
        (ReasoningGym,),
        {
            "__annotations__": {"dataset": str},
            "dataset": dataset,
            "name": task_name,
            "__doc__": (ReasoningGym.__doc__ or "").replace(
                "``size`` questions of the reasoning-gym dataset ``dataset``",
                f"``size`` questions of the reasoning-gym dataset ``{dataset}``",
            ),
        },
    )
    # Three-argument type() returns a plain `type` to mypy; this one subclasses ReasoningGym.
    return dataclass(cast("type[ReasoningGym]", cls))


TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (Sentiment, RewardModel, Arithmetic, Toy, ReasoningGym)
}
TASKS |= {name: _curated(name, dataset) for name, dataset in CURATED_REASONING_GYM.items()}


def make_task(task: str | Task, **overrides: Any) -> Task:
    """A task by name (``"Sentiment"``) or instance, with field overrides
    (``max_new_tokens=...``)."""
    if isinstance(task, Task):
        if overrides:
            raise ValueError("pass overrides to the Task you construct, not beside it")
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return TASKS[task](**overrides)
