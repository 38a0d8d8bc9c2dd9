"""Reward functions: a batch protocol, a registry, and built-ins.

The protocol is one plain callable::

    def my_reward(prompts: list[str], responses: list[str]) -> Sequence[float]:
        return [float("please" in r) for r in responses]

It sees text (decoded with skip_special_tokens), so the reward's own tokenizer, if any, may
differ from the policy's. Pass it as an object, register it with
``@textenv.rewards.register("please")``, or name it as ``"package.module:callable"``.

Every score goes through :func:`score_batch`: a reward that raises, returns the wrong number
of scores, or a NaN/inf gets a :class:`RewardError` that names the reward and the item.
Nothing is silently zeroed.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from textenv.constraints import Constraint


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, prompts: list[str], responses: list[str]) -> Sequence[float]: ...


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not one finite float per item."""


# A class is instantiated (with no arguments) on each get_reward; anything else is the reward.
_REGISTRY: dict[str, type[RewardFn] | RewardFn] = {}


def register(name: str) -> Callable:
    """Decorator: register a reward (a callable, or a class constructed with no arguments) under
    ``name``."""

    def wrap(obj):
        if name in _REGISTRY:
            raise ValueError(f"a reward named {name!r} is already registered")
        _REGISTRY[name] = obj
        return obj

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def reward_name(reward: RewardFn) -> str:
    return (
        getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__
    )


# Set by importing_from: the folder a run's code is imported from, before the working directory.
_IMPORT_DIR: ContextVar[str | None] = ContextVar("textenv_import_dir", default=None)


@contextlib.contextmanager
def importing_from(directory: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, ``"module:name"`` specs (rewards, a ``respond`` function, a task class)
    are imported from ``directory`` first, then from the working directory (None: an enclosing
    block's folder, else the working directory only). A text run records the folder it started
    in, so that ``--resume`` and ``textenv-evaluate`` import the same code from any folder."""
    folder = _IMPORT_DIR.get() if directory is None else str(Path(directory).resolve())
    token = _IMPORT_DIR.set(folder)
    try:
        yield
    finally:
        _IMPORT_DIR.reset(token)


def _import_module(module_name: str):
    """Import ``module_name`` with the import folder and the working directory on the path, as
    ``python -m`` has the latter, so ``--reward myrewards:fn`` works from an installed console
    script too."""
    cwd = os.getcwd()
    added = [
        d
        for d in dict.fromkeys((_IMPORT_DIR.get(), cwd))
        # "" on the path is the working directory where the user put it: their order is kept
        if d is not None and d not in sys.path and not (d == cwd and "" in sys.path)
    ]
    sys.path[:0] = added
    try:
        return importlib.import_module(module_name)
    finally:
        for d in added:
            sys.path.remove(d)


def import_object(spec: str, what: str) -> Any:
    """The object ``"module:name"`` names (``what`` says what it is, for errors), imported as
    :func:`importing_from` says."""
    module_name, _, attr = spec.partition(":")
    folder = _IMPORT_DIR.get()
    where = "" if folder in (None, os.getcwd()) else f" (from {folder}, then the working directory)"
    try:
        return getattr(_import_module(module_name), attr)
    except SyntaxError as err:
        raise ValueError(
            f"cannot import {what} {spec!r}: {err.msg} ({err.filename}, line {err.lineno})"
        ) from None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {what} {spec!r}{where}: {err}") from None


def get_reward(spec: str | RewardFn) -> RewardFn:
    """A reward from a registered name, ``"module:callable"``, or a callable passed through."""
    if callable(spec):
        return spec
    if spec in _REGISTRY:
        obj = _REGISTRY[spec]
        return obj() if isinstance(obj, type) else obj
    if ":" in spec:
        obj = import_object(spec, "reward")
        return obj() if isinstance(obj, type) else obj
    raise ValueError(
        f"unknown reward {spec!r}: not registered ({', '.join(available())}) "
        "and not module:callable"
    )


def score_batch(reward: RewardFn, prompts: list[str], responses: list[str]) -> list[float]:
    """``reward(prompts, responses)`` checked: one finite float per item, or a RewardError."""
    name = reward_name(reward)
    try:
        scores = reward(list(prompts), list(responses))
    except Exception as err:  # the user's code: report it with the reward's name
        raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
    if isinstance(scores, (str, bytes)):
        raise RewardError(
            f"reward {name!r} must return a sequence of numbers, got a string {scores[:40]!r}"
        )
    try:
        scores = list(scores)
        for i, s in enumerate(scores):
            # float("1") and float(True) would succeed: a reward returning text or flags has a bug.
            if isinstance(s, (str, bytes, bool)) or str(getattr(s, "dtype", "")) in (
                "bool",
                "torch.bool",
            ):
                raise RewardError(
                    f"reward {name!r} returned {type(s).__name__} {s!r} for item {i}; "
                    "scores must be numbers (use float(...) for a pass/fail score)"
                )
        scores = [float(s) for s in scores]
    except (TypeError, ValueError) as err:
        raise RewardError(
            f"reward {name!r} must return a sequence of floats, got {type(scores).__name__}: {err}"
        ) from None
    if len(scores) != len(responses):
        raise RewardError(
            f"reward {name!r} returned {len(scores)} scores for {len(responses)} responses"
        )
    for i, s in enumerate(scores):
        if not math.isfinite(s):
            raise RewardError(
                f"reward {name!r} returned {s} for item {i} (response {responses[i][:60]!r})"
            )
    return scores


@register("vader")
class VaderSentiment:
    """VADER's compound sentiment of the response, in [-1, 1] (offline lexicon, no model)."""

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self._analyzer.polarity_scores(r)["compound"] for r in responses]


class ClassifierReward:
    """Score with any ``AutoModelForSequenceClassification`` (an HF sentiment classifier or a
    reward model): the logit of ``label`` (a name from ``config.id2label`` or an index), or,
    with ``probability=True``, its softmax probability. Scalar-head reward models use label 0.

    ``with_prompt=True`` scores ``prompt + response`` (reward models), else the response.
    ``device``/``dtype``: where it runs; left ``None``, it loads on the CPU in float32 and an env
    that uses it moves it to the env's device and dtype (bf16 on CUDA), as the reference model.
    """

    def __init__(
        self,
        model: str,
        label: str | int = 0,
        *,
        probability: bool = False,
        with_prompt: bool = True,
        device: str | None = None,
        dtype: Any = None,
        batch_size: int = 32,
        max_length: int = 512,
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._placed = device is not None or dtype is not None  # an explicit choice: envs leave it
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                model, trust_remote_code=trust_remote_code
            )
            self.model = (
                AutoModelForSequenceClassification.from_pretrained(
                    model, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32
                )
                .to(device or "cpu")
                .eval()
            )
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"could not load reward model {model!r}: {str(err).splitlines()[0]}"
            ) from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if isinstance(label, str):
            by_name = {v: k for k, v in self.model.config.id2label.items()}
            if label not in by_name:
                raise ValueError(
                    f"reward model {model!r} has no label {label!r} (labels: {sorted(by_name)})"
                )
            label = int(by_name[label])
        if not 0 <= label < self.model.config.num_labels:
            raise ValueError(
                f"label index {label} out of range for {self.model.config.num_labels} labels"
            )
        self.label, self.probability, self.with_prompt = int(label), probability, with_prompt
        self.device, self.batch_size, self.max_length = self.model.device, batch_size, max_length
        self.name = f"classifier:{model}[{self.label}]"
        self._torch = torch

    def follow_env(self, device: Any, dtype: Any) -> None:
        """Run on the env's device and dtype, unless this reward was given its own."""
        if not self._placed:
            self.model.to(device=device, dtype=dtype)
            self.device = self.model.device

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = (
            [p + r for p, r in zip(prompts, responses, strict=True)]
            if self.with_prompt
            else list(responses)
        )
        scores: list[float] = []
        with self._torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                ).to(self.device)
                logits = self.model(**enc).logits.float()
                out = (
                    logits.softmax(-1)[:, self.label] if self.probability else logits[:, self.label]
                )
                scores += out.tolist()
        return scores


class ExactMatch:
    """1.0 when the response's first line, stripped, equals the prompt's known answer, else 0.0.

    ``answers`` maps prompt text to answer; ``normalize`` lower-cases and drops trailing dots.
    """

    name = "exact_match"

    def __init__(self, answers: dict[str, str], normalize: bool = True) -> None:
        self.answers, self.normalize = answers, normalize

    def _norm(self, text: str) -> str:
        text = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
        return text.lower().rstrip(".").strip() if self.normalize else text

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            if p not in self.answers:
                raise KeyError(f"no known answer for prompt {p[:60]!r}")
            out.append(float(self._norm(r) == self._norm(self.answers[p])))
        return out


class AnswerRegex:
    """1.0 when the first number (or ``pattern``'s first group) in the response equals the
    answer."""

    name = "answer_regex"

    def __init__(self, answers: dict[str, str], pattern: str = r"(-?\d+(?:\.\d+)?)") -> None:
        self.answers, self.pattern = answers, re.compile(pattern)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            if p not in self.answers:
                raise KeyError(f"no known answer for prompt {p[:60]!r}")
            m = self.pattern.search(r)
            out.append(float(m is not None and m.group(1) == self.answers[p].strip()))
        return out


ANSWER_FORMATS = ("tag", "raw", "number", "last_number")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class ReasoningGymReward:
    """A reasoning-gym dataset's own checker: the answer is extracted from the response as the
    dataset's prompts ask (between ``<answer>`` tags, ``answer_format="tag"``; the whole
    response stripped, ``"raw"``; or its first or last number, ``"number"`` or ``"last_number"``,
    for numeric datasets and models too small to write tags) and scored with
    ``dataset.score_answer`` (0 when no answer).

    The env hands rewards the rendered prompt (chat template applied), so each prompt is
    matched to the entry whose question it contains (the longest one, should one question
    contain another)."""

    name = "reasoning_gym"

    def __init__(self, dataset: Any, answer_format: str = "tag") -> None:
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}"
            )
        self.dataset, self.answer_format = dataset, answer_format
        self.entries = sorted(dataset, key=lambda e: -len(e["question"]))
        self._by_prompt: dict[str, Any] = {}

    def entry(self, prompt: str) -> Any:
        if prompt not in self._by_prompt:
            found = next((e for e in self.entries if e["question"] in prompt), None)
            if found is None:
                raise KeyError(f"prompt {prompt[:60]!r} holds none of the dataset's questions")
            self._by_prompt[prompt] = found
        return self._by_prompt[prompt]

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        from reasoning_gym.utils import extract_answer

        out = []
        for p, r in zip(prompts, responses, strict=True):
            if self.answer_format == "tag":
                answer = extract_answer(r)
            elif self.answer_format in ("number", "last_number"):
                found = _NUMBER.findall(r)
                answer = (
                    (found[0] if self.answer_format == "number" else found[-1]).replace(",", "")
                    if found
                    else None
                )
            else:
                answer = r.strip()
            out.append(
                0.0
                if answer is None
                else float(self.dataset.score_answer(answer=answer, entry=self.entry(p)))
            )
        return out


class ConstraintReward:
    """The fraction of the prompt's constraints the response satisfies (partial credit), or,
    with ``all_or_nothing=True``, 1.0 when it satisfies all of them, else 0.0. The checks are
    :mod:`textenv.constraints`'.

    ``constraints`` maps each prompt's text to its constraints. The env hands rewards the
    rendered prompt (a chat template around it), so a prompt is matched to the longest known
    prompt text it contains."""

    name = "constraints"

    def __init__(
        self, constraints: dict[str, Sequence[Constraint]], all_or_nothing: bool = False
    ) -> None:
        if any(not cs for cs in constraints.values()):
            raise ValueError("every prompt needs at least one constraint")
        self.constraints, self.all_or_nothing = constraints, all_or_nothing
        self._texts = sorted(constraints, key=len, reverse=True)
        self._by_prompt: dict[str, Sequence[Constraint]] = {}

    def of(self, prompt: str) -> Sequence[Constraint]:
        """The constraints of ``prompt`` (a known prompt text, or a rendering that holds one)."""
        if prompt in self.constraints:
            return self.constraints[prompt]
        if prompt not in self._by_prompt:
            text = next((t for t in self._texts if t in prompt), None)
            if text is None:
                raise KeyError(f"no known constraints for prompt {prompt[:60]!r}")
            self._by_prompt[prompt] = self.constraints[text]
        return self._by_prompt[prompt]

    def checks(self, prompt: str, response: str) -> list[bool]:
        """Whether ``response`` satisfies each of ``prompt``'s constraints, in order."""
        return [c(response) for c in self.of(prompt)]

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            passed = self.checks(p, r)
            out.append(float(all(passed)) if self.all_or_nothing else sum(passed) / len(passed))
        return out


class RegexMatch:
    """1.0 when ``pattern`` matches anywhere in the response, else 0.0."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)
        self.name = f"regex:{pattern}"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(self.pattern.search(r) is not None) for r in responses]


class KeywordReward:
    """Fraction of the response's characters (``per="char"``) or words that are ``keyword``."""

    def __init__(self, keyword: str, per: str = "char") -> None:
        if per not in ("char", "word"):
            raise ValueError(f"per must be 'char' or 'word', got {per!r}")
        self.keyword, self.per = keyword, per
        self.name = f"keyword:{keyword}"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for r in responses:
            units = list(r) if self.per == "char" else r.split()
            out.append(sum(u == self.keyword for u in units) / max(1, len(units)))
        return out


@register("length")
class LengthReward:
    """Response length in words divided by ``target``, capped at 1."""

    name = "length"

    def __init__(self, target: int = 20) -> None:
        self.target = target

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [min(1.0, len(r.split()) / self.target) for r in responses]
