"""Train a language model with PPO on a text task: ``python -m scripts.train_text --task Sentiment``.

The last line printed is the run's summary as one JSON line.
"""

from __future__ import annotations

import sys

import tyro

from agents.checkpoint import TrainingInterrupted
from agents.ppo import NonFiniteTraining
from agents.text import TextTrainConfig, load_text_run_config, summary_line, train_text
from scripts._resume import pop_resume
from textenv.rewards import RewardError


def parse(argv: list[str] | None = None) -> tuple[TextTrainConfig, str | None]:
    """Flags on top of the defaults, or with ``--resume RUN_DIR`` on top of that run's config
    (so ``--iterations`` can extend it)."""
    argv = sys.argv[1:] if argv is None else argv
    resume, argv = pop_resume(argv)
    if any(a == "--kl-shaping" or a.startswith("--kl-shaping=") for a in argv):
        print("warning: --kl-shaping is renamed --reference-pass", file=sys.stderr)
        argv = [a.replace("--kl-shaping", "--reference-pass", 1) if a.startswith("--kl-shaping") else a for a in argv]
    default = load_text_run_config(resume) if resume is not None else TextTrainConfig()
    config = tyro.cli(TextTrainConfig, default=default, args=argv, config=(tyro.conf.OmitArgPrefixes,),
                      description="PPO on a text task. --resume RUN_DIR continues a run from its checkpoint.")
    return config, resume


def main(argv: list[str] | None = None) -> int:
    try:
        config, resume = parse(argv)
        summary = train_text(config, resume=resume)
    except TrainingInterrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except (ValueError, FileNotFoundError, RewardError, NotImplementedError, NonFiniteTraining) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "eval_score_after" in summary:
        print(held_out_line(summary), file=sys.stderr, flush=True)
    print(summary_line(summary), flush=True)
    return 0


def held_out_line(summary: dict) -> str:
    """The before/after evaluation on held-out prompts, for people."""
    return (f"held-out prompts, {summary['eval_samples']} responses: mean score {summary['eval_score_before']:.3f} "
            f"± {summary['eval_score_before_se']:.3f} before -> {summary['eval_score_after']:.3f} "
            f"± {summary['eval_score_after_se']:.3f} after; KL to the reference {summary['eval_kl_after']:.2f} "
            f"nats per response")


if __name__ == "__main__":
    sys.exit(main())
