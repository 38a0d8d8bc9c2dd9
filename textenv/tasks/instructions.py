"""Instruction following with verifiable constraints (IFEval-style, as in Tülu 3's RLVR)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import ClassVar

from textenv.constraints import CONSTRAINT_KINDS, Constraint
from textenv.rewards import ConstraintReward, RewardFn, get_reward
from textenv.tasks.base import _SECTIONS, HELD_OUT_EVERY, Task, package_lines, split_prompts

PARAMETERS: dict[str, tuple[str | int, ...]] = {
    "include_keyword": ("bright", "simple", "together", "little", "always", "happy"),
    "no_word": ("the", "and", "is", "you"),
    "start_with": ("Today", "Imagine", "Honestly", "Once"),
    "end_with": (
        "Thank you.",
        "That is all.",
        "Have a nice day!",
        "The end.",
    ),
    "max_words": (15, 20, 30),
    "min_words": (20, 25, 30),
    "bullet_points": (2, 3),
}
"""Each parameterised kind's values, drawn uniformly."""

CONFLICTS = frozenset(
    frozenset(pair)
    for pair in (
        ("lowercase", "uppercase"),
        ("max_words", "min_words"),
        ("end_with", "wrapped_in_quotes"),
        ("start_with", "wrapped_in_quotes"),
    )
)
"""Pairs of kinds no prompt combines: no response can satisfy both (or only by a quirk)."""

PAIRS = [
    frozenset(pair)
    for pair in itertools.combinations(CONSTRAINT_KINDS, 2)
    if frozenset(pair) not in CONFLICTS
]
"""The combinable pairs of kinds, in a fixed order (that of ``CONSTRAINT_KINDS``)."""

HELD_OUT_PAIRS = frozenset(split_prompts(PAIRS, "test"))
"""Every 5th combinable pair: never together in a training prompt."""

DEFAULT_KINDS = [
    "include_keyword",
    "no_word",
    "start_with",
    "no_commas",
    "max_words",
    "bullet_points",
    "title",
    "postscript",
]
"""The kinds a prompt draws from by default: those SmolLM2-135M-Instruct satisfies sometimes but
not always. ``lowercase``, ``uppercase``, ``wrapped_in_quotes`` (0 of about 30 each),
``end_with`` (3 of about 75: a 48-token answer rarely ends where asked) and ``min_words``
(about 80%) are left out; ``kinds=`` brings them back."""


@dataclass
class Instructions(Task):
    __doc__ = (
        """Follow an instruction under checkable constraints (IFEval-style, as in Tülu 3's RLVR).

    ## Description
    Each prompt is a base instruction (``instructions``, 40 written for this project) and 1 to
    ``num_constraints`` constraints stated as sentences: "Describe a city at night. Answer in at
    most 15 words. Do not use any commas." ``num_prompts`` prompts are drawn with
    ``random.Random(seed)``: for each, the number of constraints uniformly, the kinds uniformly
    from ``kinds`` (never two of one kind, never a pair of ``CONFLICTS``), each parameter
    uniformly from ``PARAMETERS``; no prompt twice. Exactly what passes each kind is in
    :mod:`textenv.constraints`. The default kinds (``DEFAULT_KINDS``) are ``include_keyword``,
    ``no_word``, ``start_with``, ``no_commas``, ``max_words``, ``bullet_points``, ``title``
    and ``postscript``: those SmolLM2-135M-Instruct satisfies sometimes but not always;
    ``lowercase``, ``uppercase``, ``wrapped_in_quotes``, ``end_with`` and ``min_words`` are
    there for ``kinds=``. With ``chat=True``
    (the default) a prompt is a user turn, rendered with the tokenizer's chat template (plain
    text for a tokenizer without one).

    The held-out split holds out instructions and combinations, not only prompts: every 5th
    base instruction and every 5th combinable pair of kinds (``HELD_OUT_PAIRS``, a fixed list
    independent of the seed) appear only in ``split="test"``. A test prompt (every 5th prompt,
    as in every task) is a held-out instruction with one constraint or with a set of
    constraints that contains a held-out pair; a training prompt is a training instruction
    whose constraints contain no held-out pair. So test prompts are new instructions, and their
    combinations of two or more constraints were never seen together in training.
    """
        + _SECTIONS.replace(
            "    ``score · 1[last step]",
            """    The score is partial credit: the fraction of the prompt's constraints the
    response satisfies (0, 1/2 or 1 with two), ``ConstraintReward``; with
    ``all_or_nothing=True`` it is 1 when all hold, else 0. The per-token reward is
    ``score · 1[last step]""",
        )
        + """
    ## Arguments
    ``gym.make("textenv/Instructions-v0", model="embedded", num_constraints=2, num_prompts=500,
    seed=0, all_or_nothing=False, max_new_tokens=48)``; ``kinds=[...]`` restricts the kinds,
    ``instructions=[...]`` replaces the base instructions.

    ## Version History
    * v0: initial version.
    """
    )
    name: ClassVar[str] = "Instructions"
    chat_fallback: ClassVar[bool] = True  # plain text for tokenizers without a chat template
    instructions: list[str] = field(
        default_factory=lambda: package_lines("constraint_instructions.txt")
    )
    """the base instructions; every 5th is held out"""
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    """the constraint kinds prompts draw from (see textenv.constraints)"""
    num_constraints: int = 2
    """the most constraints in a prompt (each prompt has 1 to this many, uniformly)"""
    num_prompts: int = 500
    """prompts generated (train and test together; every 5th is a test prompt)"""
    seed: int = 0
    all_or_nothing: bool = False
    """score 1 only when every constraint holds (else the fraction that hold)"""
    chat: bool = True
    """each prompt as a chat user turn (else plain text)"""
    constraints: dict[str, list[Constraint]] = field(init=False, repr=False)
    """each prompt's text -> its constraints, for the reward"""
    max_new_tokens: int = 48
    max_prompt_tokens: int = 96  # SmolLM2's chat template with its system prompt: about 70

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(CONSTRAINT_KINDS))
        if unknown:
            raise ValueError(
                f"task Instructions: unknown constraint kinds {unknown}; "
                f"known: {', '.join(CONSTRAINT_KINDS)}"
            )
        if not 1 <= self.num_constraints <= len(set(self.kinds)):
            raise ValueError(
                f"task Instructions: num_constraints must be in 1..{len(set(self.kinds))} "
                f"(the number of kinds), got {self.num_constraints}"
            )
        if self.num_prompts < 1:
            raise ValueError(f"task Instructions: num_prompts must be >= 1, got {self.num_prompts}")
        texts, self.constraints = self.generate()
        if not self.prompts:
            self.prompts = [[{"role": "user", "content": t}] if self.chat else t for t in texts]
        super().__post_init__()

    def generate(self) -> tuple[list[str], dict[str, list[Constraint]]]:
        """The ``num_prompts`` prompt texts, position ``i % 5 == 4`` held out, and each one's
        constraints."""
        train, test = (
            split_prompts(self.instructions, "train"),
            split_prompts(self.instructions, "test"),
        )
        if not train or not test:
            raise ValueError(
                f"task Instructions: needs at least {HELD_OUT_EVERY} instructions "
                f"(every {HELD_OUT_EVERY}th is held out), got {len(self.instructions)}"
            )
        kinds = list(dict.fromkeys(self.kinds))
        rng = random.Random(self.seed)
        out: dict[str, list[Constraint]] = {}
        for i in range(self.num_prompts):
            held_out = i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
            size = rng.randint(1, self.num_constraints)
            for _ in range(1000):
                instruction = rng.choice(test if held_out else train)
                drawn = rng.sample(kinds, size)
                if not combinable(drawn, held_out):
                    continue
                constraints = [
                    CONSTRAINT_KINDS[k](rng.choice(PARAMETERS[k]))
                    if k in PARAMETERS
                    else CONSTRAINT_KINDS[k]()
                    for k in drawn
                ]
                text = " ".join([instruction.strip(), *(c.text for c in constraints)])
                if text not in out:
                    out[text] = constraints
                    break
            else:
                raise ValueError(
                    f"task Instructions: could not draw prompt {i} "
                    f"({'test' if held_out else 'train'}): too few instructions, kinds or "
                    f"held-out pairs for {self.num_prompts} distinct prompts"
                )
        return list(out), out

    def build_reward(self) -> RewardFn:
        if self.reward is not None:
            return get_reward(self.reward)
        return ConstraintReward(dict(self.constraints), self.all_or_nothing)


def combinable(kinds: list[str], held_out: bool) -> bool:
    """Whether ``kinds`` may be one prompt's: no conflicting pair, and, for a test prompt of two
    or more, a held-out pair; for a training prompt, none."""
    pairs = {frozenset(p) for p in itertools.combinations(kinds, 2)}
    if pairs & CONFLICTS:
        return False
    if held_out:
        return len(kinds) == 1 or bool(pairs & HELD_OUT_PAIRS)
    return not pairs & HELD_OUT_PAIRS


def held_out_pairs() -> list[tuple[str, str]]:
    """The held-out pairs of kinds, readable (in ``CONSTRAINT_KINDS`` order)."""
    order = list(CONSTRAINT_KINDS)
    return [
        (a, b) if order.index(a) < order.index(b) else (b, a)
        for a, b in (tuple(p) for p in PAIRS if p in HELD_OUT_PAIRS)
    ]
