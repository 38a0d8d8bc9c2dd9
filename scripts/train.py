"""Train PPO on a Gymnasium task: ``python -m scripts.train --env-id HalfCheetah-v5``.

Each env id in ``agents.classic.PRESETS`` starts from its tuned hyperparameters; any flag
given on the command line overrides the preset. The last line printed is the run's summary
as one JSON line.
"""

from __future__ import annotations

import sys

import tyro

from agents.checkpoint import TrainingInterrupted
from agents.classic import TrainConfig, load_run_config, preset_config, summary_line, train
from agents.ppo import NonFiniteTraining
from scripts._resume import pop_resume


def _env_id_from_argv(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--env-id="):
            return arg.split("=", 1)[1]
        if arg == "--env-id" and i + 1 < len(argv):
            return argv[i + 1]
    return TrainConfig.env_id


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """Flags on top of the preset of the ``--env-id`` they name, or, with ``--resume RUN_DIR``,
    on top of that run's own config (so ``--total-timesteps`` can extend it)."""
    argv = sys.argv[1:] if argv is None else argv
    resume, argv = pop_resume(argv)
    if resume is not None:
        default = load_run_config(resume)
        given = _env_id_from_argv(argv) if any(a.startswith("--env-id") for a in argv) else default.env_id
        if given != default.env_id:
            raise ValueError(f"--resume {resume} is a run of {default.env_id}, not {given}")
    else:
        default = preset_config(_env_id_from_argv(argv))
    config = tyro.cli(TrainConfig, default=default, args=argv, config=(tyro.conf.OmitArgPrefixes,),
                      description="PPO on a Gymnasium task. --resume RUN_DIR continues a run from its checkpoint.")
    return config, resume


def main(argv: list[str] | None = None) -> int:
    try:
        config, resume = parse(argv)
        summary = train(config, resume=resume)
    except TrainingInterrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except (ValueError, FileNotFoundError, NonFiniteTraining) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
