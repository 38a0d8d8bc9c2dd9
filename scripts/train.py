"""Train PPO on a Gymnasium task: ``python -m scripts.train --env-id HalfCheetah-v5``.

Each env id in ``agents.classic.PRESETS`` starts from its tuned hyperparameters; any flag
given on the command line overrides the preset. The last line printed is the run's summary
as one JSON line.
"""

from __future__ import annotations

import sys

import tyro

from agents.classic import TrainConfig, preset_config, summary_line, train


def _env_id_from_argv(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--env-id="):
            return arg.split("=", 1)[1]
        if arg == "--env-id" and i + 1 < len(argv):
            return argv[i + 1]
    return TrainConfig.env_id


def parse(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags on top of the preset of the ``--env-id`` they name."""
    argv = sys.argv[1:] if argv is None else argv
    default = preset_config(_env_id_from_argv(argv))
    return tyro.cli(TrainConfig, default=default, args=argv, config=(tyro.conf.OmitArgPrefixes,))


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    try:
        summary = train(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
