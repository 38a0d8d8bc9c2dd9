"""The single-turn task base: a prompt set, a default reward, a response budget and a KL
coefficient; and the prompt sets' helpers (package data, prompt files, the held-out split)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from textenv.rewards import RewardFn, get_reward

Prompt = str | list[dict[str, str]]
"""A prompt: a text, or chat messages (``[{"role": ..., "content": ...}, ...]``)."""

_T = TypeVar("_T")


def package_lines(name: str) -> list[str]:
    """The non-blank lines of the package data file ``textenv/data/<name>``."""
    text = (resources.files("textenv") / "data" / name).read_text(encoding="utf-8")
    return [line.rstrip("\n") for line in text.splitlines() if line.strip()]


def package_jsonl(name: str) -> list[dict[str, Any]]:
    """The rows of the package data file ``textenv/data/<name>`` (JSON lines)."""
    return [json.loads(line) for line in package_lines(name)]


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
