"""Train a Bradley–Terry reward model on preference pairs: ``textenv-train-rm --pairs
pairs.jsonl --output rm`` (``python -m scripts.train_rm`` from a clone).

The output folder loads with ``AutoModelForSequenceClassification.from_pretrained`` and is the
``reward_model`` of task RewardModel. The last line printed is the summary as one JSON line;
before it, on stderr, the accuracy on the held-out pairs before and after training.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import tyro

from textenv.agents.cli._common import pop_resume, run_cli, strip_resume, with_resume
from textenv.agents.reward_model import (
    RewardModelConfig,
    load_reward_model_config,
    train_reward_model,
)
from textenv.agents.training import summary_line


@dataclass
class TrainRMArgs(RewardModelConfig):
    resume: str | None = None
    """an output folder to continue from its checkpoint; flags given override its settings (more
    --epochs extends a finished run)"""


def parse(argv: list[str] | None = None) -> tuple[RewardModelConfig, str | None]:
    """Flags on top of the defaults, or with ``--resume DIR`` on top of that run's settings."""
    argv = sys.argv[1:] if argv is None else argv
    resume, argv = pop_resume(argv)
    description = "Train a Bradley–Terry reward model on preference pairs."
    if resume is None:
        args = tyro.cli(TrainRMArgs, args=argv, description=description)
        return strip_resume(RewardModelConfig, args), None
    if any(a == "--output" or a.startswith("--output=") for a in argv):
        raise ValueError(f"--resume {resume} continues the run in that folder; leave out --output")
    default = load_reward_model_config(resume)
    default.progress = True  # this session's display, not a setting of the run
    args = tyro.cli(
        TrainRMArgs,
        default=with_resume(TrainRMArgs, default, resume),
        args=argv,
        description=description,
    )
    return strip_resume(RewardModelConfig, args), resume


def held_out_line(summary: dict) -> str:
    """The held-out pairs before and after training, for people."""
    return (
        f"held-out pairs, {summary['eval_pairs']}: accuracy "
        f"{summary['eval_accuracy_before']:.3f} before -> {summary['eval_accuracy']:.3f} after; "
        f"loss {summary['eval_loss_before']:.3f} -> {summary['eval_loss']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        config, resume = parse(argv)
        summary = train_reward_model(config, resume=resume)
        if summary["eval_accuracy"] is not None and summary["eval_accuracy_before"] is not None:
            print(held_out_line(summary), file=sys.stderr, flush=True)
        print(summary_line(summary), flush=True)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
