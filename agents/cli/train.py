"""Train PPO on a Gymnasium task: ``textenv-train --env-id HalfCheetah-v5``
(``python -m scripts.train`` from a clone).

Each env id in ``textenv.agents.classic.PRESETS`` starts from its tuned hyperparameters; any flag
given on the command line overrides the preset. The last line printed is the run's summary
as one JSON line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import tyro

from textenv.agents.classic import (
    TrainConfig,
    defaults_note,
    load_run_config,
    preset_config,
    summary_line,
    train,
)
from textenv.agents.cli._common import (
    is_main_process,
    pop_resume,
    run_cli,
    strip_resume,
    with_resume,
)


@dataclass
class TrainArgs(TrainConfig):
    resume: str | None = None
    """a run directory to continue from its last checkpoint; flags given override its config"""
    preset: Literal["tuned", "cleanrl"] = "tuned"
    """the defaults flags override: the env id's tuned preset, or CleanRL's for its action type"""


def _flag_from_argv(argv: list[str], flag: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
    return default


def _env_id_from_argv(argv: list[str]) -> str:
    return _flag_from_argv(argv, "--env-id", TrainConfig.env_id)


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """Flags on top of the preset of the ``--env-id`` they name, or, with ``--resume RUN_DIR``,
    on top of that run's own config (so ``--total-timesteps`` can extend it)."""
    argv = sys.argv[1:] if argv is None else argv
    resume, argv = pop_resume(argv)
    if resume is not None:
        default = load_run_config(resume)
        default.progress = TrainConfig().progress  # the session's display, not the run's setting
        given = (
            _env_id_from_argv(argv)
            if any(a.startswith("--env-id") for a in argv)
            else default.env_id
        )
        if given != default.env_id:
            raise ValueError(f"--resume {resume} is a run of {default.env_id}, not {given}")
    else:
        default = preset_config(
            _env_id_from_argv(argv), preset=_flag_from_argv(argv, "--preset", "tuned")
        )
    if resume is not None and any(a.startswith("--preset") for a in argv):
        raise ValueError(
            "--preset chooses a new run's starting settings; --resume continues the run's own"
        )
    args = tyro.cli(
        TrainArgs,
        default=with_resume(TrainArgs, default, resume),
        args=argv,
        config=(tyro.conf.OmitArgPrefixes,),
        description="PPO on a Gymnasium task.",
    )
    return strip_resume(TrainConfig, args), resume


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        config, resume = parse(argv)
        tuned = (
            _flag_from_argv(sys.argv[1:] if argv is None else argv, "--preset", "tuned") == "tuned"
        )
        if (
            resume is None
            and tuned
            and is_main_process()
            and (note := defaults_note(config.env_id))
        ):
            print(note, file=sys.stderr, flush=True)
        summary = train(config, resume=resume)
        if is_main_process():
            print(summary_line(summary), flush=True)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
