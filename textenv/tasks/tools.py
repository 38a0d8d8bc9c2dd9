"""Tool use: arithmetic with a calculator the agent calls in its turn."""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from textenv.tasks.conversation import Episode, Messages, MultiTurnTask, Turn

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def safe_arithmetic(expr: str) -> int:
    """The value of an integer expression of ``+ - *`` and parentheses (no names, no calls, no
    powers: a tool a policy can call without running its text as code)."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            value = _BINOPS[type(node.op)](ev(node.left), ev(node.right))
            if abs(value) > 10**15:
                raise ValueError("number too large")
            return value
        raise ValueError(f"unsupported expression: {ast.dump(node)[:40]}")

    if len(expr) > 100:
        raise ValueError("expression too long")
    return ev(ast.parse(expr.strip(), mode="eval"))


_CALC = re.compile(r"<calc>(.*?)</calc>", re.S)
_ANSWER = re.compile(r"<answer>\s*(-?[\d,]+)\s*</answer>", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*")

CALCULATOR_SYSTEM = (
    "You can use a calculator. Write <calc>expression</calc> and you get the result back. "
    "Then give the final answer as <answer>number</answer>.\n"
    "Example: What is 12 * 34? <calc>12 * 34</calc> -> 408. <answer>408</answer>"
)


@dataclass
class _CalculatorEpisode:
    prompt: str | Messages
    answer: int
    answer_tags: bool

    def respond(self, history: Messages) -> Turn:
        said = history[-1]["content"]
        final = _ANSWER.search(said)
        call = _CALC.search(said)
        if call is not None and (final is None or call.start() < final.start()):
            try:
                return Turn(str(safe_arithmetic(call.group(1))), 0.0, False)
            except (ValueError, SyntaxError, ZeroDivisionError):
                return Turn(
                    "error: the calculator takes integers with + - * and parentheses", 0.0, False
                )
        if final is None and not self.answer_tags:
            final = _NUMBER.search(said)
        if final is not None:
            value = final.group(1) if final.re is _ANSWER else final.group(0)
            return Turn(None, float(int(value.replace(",", "")) == self.answer), True)
        return Turn(
            "Use <calc>expression</calc>, or answer with <answer>number</answer>.", 0.0, False
        )


@dataclass
class Calculator(MultiTurnTask):
    __doc__ = """Multiply or add numbers too large to do in one's head, with a calculator tool.

    ## Description
    Each episode asks one question (``a * b`` with a 2-3-digit and a 1-2-digit number, or
    ``a + b + c`` of 3-4-digit numbers, ``size`` of them generated for ``seed``). The agent's
    turn ends at EOS or at ``</calc>``: a ``<calc>expression</calc>`` gets the result back as
    the env's reply (integers, ``+ - *``, parentheses, evaluated without ``eval``); an answer
    ends the episode with reward 1 if it is right, else 0. The answer is the number in
    ``<answer>...</answer>``, or (``answer_tags=False``, the default) the first number of a
    turn with no calculator call. A turn with neither gets a reminder. Every 5th question is
    held out (``split="test"``).

    ## Arguments
    ``gym.make("textenv/Calculator-v0", model="embedded", size=500, seed=0, max_turns=3)``

    ## Version History
    * v0: initial version.
    """
    name: ClassVar[str] = "Calculator"
    size: int = 500
    seed: int = 0
    answer_tags: bool = False
    system_prompt: str | None = CALCULATOR_SYSTEM
    stop: list[str] = field(default_factory=lambda: ["</calc>"])
    max_prompt_tokens: int = 160
    max_context_tokens: int = 64
    max_turn_tokens: int = 20
    max_turns: int = 3

    @property
    def has_held_out(self) -> bool:
        return True

    def questions(self) -> list[tuple[str, int]]:
        """The task's questions and answers, in the split's part (every 5th is held out)."""
        if self.size < 1:
            raise ValueError(f"task {self.name}: size must be >= 1, got {self.size}")
        rng = np.random.default_rng(self.seed)
        out = []
        for _ in range(self.size):
            if rng.random() < 0.5:
                a, b = int(rng.integers(12, 999)), int(rng.integers(3, 99))
                out.append((f"What is {a} * {b}?", a * b))
            else:
                a, b, c = (int(x) for x in rng.integers(100, 9999, size=3))
                out.append((f"What is {a} + {b} + {c}?", a + b + c))
        if self.split == "all":
            return out
        held = self.split == "test"
        return [q for i, q in enumerate(out) if (i % 5 == 4) == held]

    def new_episode(self, rng: np.random.Generator) -> Episode:
        if getattr(self, "_questions", None) is None:
            self._questions = self.questions()
        question, answer = self._questions[int(rng.integers(len(self._questions)))]
        prompt: str | Messages = question
        if self.system_prompt:
            prompt = [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": question},
            ]
        return _CalculatorEpisode(prompt, answer, self.answer_tags)
