"""Train a language model with PPO on a text task: ``python -m scripts.train_text --task Sentiment``.

The last line printed is the run's summary as one JSON line.
"""

from __future__ import annotations

import sys

import tyro

from agents.ppo import NonFiniteTraining
from agents.text import TextTrainConfig, summary_line, train_text
from textenv.rewards import RewardError


def main(argv: list[str] | None = None) -> int:
    config = tyro.cli(TextTrainConfig, args=argv, config=(tyro.conf.OmitArgPrefixes,))
    try:
        summary = train_text(config)
    except (ValueError, FileNotFoundError, RewardError, NotImplementedError, NonFiniteTraining) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
