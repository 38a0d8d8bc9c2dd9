"""Preference pairs without people: ``textenv-make-pairs --gold vader --output pairs.jsonl``
(``python -m scripts.make_pairs`` from a clone) samples two responses per prompt and labels the
one the gold reward scores higher as chosen.

The last line printed is the summary as one JSON line.
"""

from __future__ import annotations

import sys

import tyro

from textenv.agents.cli._common import run_cli
from textenv.agents.reward_model import PairsConfig, make_pairs
from textenv.agents.training import summary_line


def parse(argv: list[str] | None = None) -> PairsConfig:
    return tyro.cli(
        PairsConfig,
        args=sys.argv[1:] if argv is None else argv,
        description="Sample preference pairs and label them with a gold reward.",
    )


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        summary = make_pairs(parse(argv))
        print(summary_line(summary), flush=True)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
