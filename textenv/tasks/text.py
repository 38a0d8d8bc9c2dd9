"""Open-ended text tasks: a review to continue positively, an instruction a reward model
judges, and the toy task a tiny model learns in a minute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from textenv.rewards import ClassifierReward, KeywordReward, RewardFn, get_reward
from textenv.tasks.base import _SECTIONS, Prompt, Task, package_lines


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
    prompts: list[Prompt] = field(
        default_factory=lambda: list(package_lines("sentiment_prompts.txt"))
    )
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
    prompts: list[Prompt] = field(
        default_factory=lambda: list(package_lines("instruction_prompts.txt"))
    )
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
    prompts: list[Prompt] = field(default_factory=lambda: list(package_lines("toy_prompts.txt")))
    max_new_tokens: int = 8
    max_prompt_tokens: int = 16
    kl_coef: float = 0.0

    def build_reward(self) -> RewardFn:
        return get_reward(self.reward) if self.reward is not None else KeywordReward("a")
