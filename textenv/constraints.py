"""Verifiable constraints on a response (IFEval-style): one checker per kind.

Each factory builds a :class:`Constraint` from its parameters: the sentence a prompt states it
with (``text``) and a pure check ``response -> bool``. The checks are strict and exactly as
documented here; the task ``Instructions`` (``textenv.tasks.instructions``) puts them in prompts
and ``textenv.rewards.ConstraintReward`` scores them.

What passes each kind (``r`` is the response as the env decodes it):

=================== ==========================================================================
kind                passes when
=================== ==========================================================================
lowercase           ``r`` has a letter and no uppercase letter (any script)
uppercase           ``r`` has a letter and no lowercase letter
include_keyword(w)  ``w`` occurs as a whole word, case-insensitive (``\\bw\\b``)
no_word(w)          ``w`` does not occur as a whole word, case-insensitive; an empty ``r`` fails
start_with(w)       after leading whitespace, ``r`` begins with the word ``w``, case-insensitive,
                    followed by a non-word character or the end ("Yes, ..." passes "Yes";
                    "Yesterday" and '"Yes' do not)
end_with(p)         ``r`` without trailing whitespace ends with the phrase ``p``,
                    case-insensitive, its punctuation included
no_commas           ``r`` holds no comma (``,`` nor the full-width ``，``), quoted or not; an
                    empty ``r`` fails
max_words(n)        ``r`` has 1 to ``n`` words (words: runs of non-whitespace)
min_words(n)        ``r`` has at least ``n`` words
bullet_points(n)    exactly ``n`` lines are bullets: after leading whitespace, ``*`` or ``-``,
                    then whitespace, then text ("**bold**" and "-5" are not bullets); other
                    lines are allowed
wrapped_in_quotes   ``r`` without surrounding whitespace has at least 2 characters and starts
                    and ends with ``"``, or starts with ``“`` and ends with ``”``
title               ``r`` contains ``<<title>>``: ``<<``, then characters other than ``<``,
                    ``>`` and newlines with at least one that is not a space, then ``>>``
postscript          a line of ``r`` starts, after leading whitespace, with ``P.S.`` (any case,
                    ``P. S.`` too) followed by text
=================== ==========================================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Constraint:
    """A checkable constraint: its kind, its parameter, the sentence that states it, its check."""

    kind: str
    param: str | int | None
    text: str
    check: Callable[[str], bool] = field(compare=False, repr=False)

    def __call__(self, response: str) -> bool:
        return bool(self.check(response))


def _word(word: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def _words(response: str) -> int:
    return len(response.split())


def lowercase() -> Constraint:
    def check(r: str) -> bool:
        return any(c.isalpha() for c in r) and not any(c.isupper() for c in r)

    return Constraint(
        "lowercase",
        None,
        "Your entire answer must be in lowercase letters; no capital letters are allowed.",
        check,
    )


def uppercase() -> Constraint:
    def check(r: str) -> bool:
        return any(c.isalpha() for c in r) and not any(c.islower() for c in r)

    return Constraint("uppercase", None, "Your entire answer must be in capital letters.", check)


def include_keyword(word: str) -> Constraint:
    pattern = _word(word)
    return Constraint(
        "include_keyword",
        word,
        f'Include the word "{word}" in your answer.',
        lambda r: pattern.search(r) is not None,
    )


def no_word(word: str) -> Constraint:
    pattern = _word(word)
    return Constraint(
        "no_word",
        word,
        f'Do not use the word "{word}" anywhere in your answer.',
        lambda r: bool(r.strip()) and pattern.search(r) is None,
    )


def start_with(word: str) -> Constraint:
    pattern = re.compile(rf"\s*{re.escape(word)}(?!\w)", re.IGNORECASE)
    return Constraint(
        "start_with",
        word,
        f'Start your answer with the word "{word}".',
        lambda r: pattern.match(r) is not None,
    )


def end_with(phrase: str) -> Constraint:
    end = phrase.strip().lower()
    return Constraint(
        "end_with",
        phrase,
        f'End your answer with the phrase "{phrase}", with nothing after it.',
        lambda r: r.rstrip().lower().endswith(end),
    )


def no_commas() -> Constraint:
    return Constraint(
        "no_commas",
        None,
        "Do not use any commas in your answer.",
        lambda r: bool(r.strip()) and "," not in r and "，" not in r,
    )


def max_words(n: int) -> Constraint:
    return Constraint(
        "max_words", n, f"Answer in at most {n} words.", lambda r: 1 <= _words(r) <= n
    )


def min_words(n: int) -> Constraint:
    return Constraint("min_words", n, f"Answer in at least {n} words.", lambda r: _words(r) >= n)


_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)


def bullet_points(n: int) -> Constraint:
    return Constraint(
        "bullet_points",
        n,
        f"Your answer must contain exactly {n} bullet points, each on its own line starting "
        f'with "* ".',
        lambda r: len(_BULLET.findall(r)) == n,
    )


def wrapped_in_quotes() -> Constraint:
    def check(r: str) -> bool:
        r = r.strip()
        return len(r) >= 2 and ((r[0] == '"' and r[-1] == '"') or (r[0] == "“" and r[-1] == "”"))

    return Constraint(
        "wrapped_in_quotes", None, "Wrap your entire answer in double quotation marks.", check
    )


_TITLE = re.compile(r"<<[^<>\n]*[^<>\s][^<>\n]*>>")


def title() -> Constraint:
    return Constraint(
        "title",
        None,
        "Give your answer a title, wrapped in double angular brackets (<< and >>).",
        lambda r: _TITLE.search(r) is not None,
    )


_POSTSCRIPT = re.compile(r"^[ \t]*p\.[ \t]?s\.[ \t]*\S", re.MULTILINE | re.IGNORECASE)


def postscript() -> Constraint:
    return Constraint(
        "postscript",
        None,
        'At the end of your answer, add a postscript starting with "P.S."',
        lambda r: _POSTSCRIPT.search(r) is not None,
    )


CONSTRAINT_KINDS: dict[str, Callable[..., Constraint]] = {
    f.__name__: f
    for f in (
        lowercase,
        uppercase,
        include_keyword,
        no_word,
        start_with,
        end_with,
        no_commas,
        max_words,
        min_words,
        bullet_points,
        wrapped_in_quotes,
        title,
        postscript,
    )
}
"""Each kind's factory, by kind name."""
