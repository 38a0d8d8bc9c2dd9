"""Train a language model with PPO on a text task: ``textenv-train-text --task Sentiment``
(``python -m scripts.train_text`` from a clone).

The last line printed is the run's summary as one JSON line; before it, on stderr, the mean
score on held-out prompts before and after training.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import tyro

from textenv.agents.cli._common import (
    is_main_process,
    pop_resume,
    run_cli,
    strip_resume,
    with_resume,
)
from textenv.agents.text import TextTrainConfig, load_text_run_config, summary_line, train_text


@dataclass
class TextTrainArgs(TextTrainConfig):
    resume: str | None = None
    """a run directory to continue from its last checkpoint; flags given override its config"""


def parse(argv: list[str] | None = None) -> tuple[TextTrainConfig, str | None]:
    """Flags on top of the defaults, or with ``--resume RUN_DIR`` on top of that run's config
    (so ``--iterations`` can extend it)."""
    argv = sys.argv[1:] if argv is None else argv
    resume, argv = pop_resume(argv)
    for flag in ("--top-k", "--top-p"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise ValueError(
                f"{flag} is for sampling at evaluation (textenv-evaluate {flag}): training samples "
                "from the whole tempered distribution, the only one whose PPO ratio and KL to the "
                "reference compare like with like"
            )
    default = load_text_run_config(resume) if resume is not None else TextTrainConfig()
    # The progress bar is this session's display, not a setting of the run: a resume shows it
    # unless --no-progress is given again.
    default.logging.progress = TextTrainConfig().logging.progress
    args = tyro.cli(
        TextTrainArgs,
        default=with_resume(TextTrainArgs, default, resume),
        args=argv,
        config=(tyro.conf.OmitArgPrefixes,),
        description="PPO on a text task.",
    )
    return strip_resume(TextTrainConfig, args), resume


def held_out_line(summary: dict) -> str:
    """The before/after evaluation on held-out prompts, for people."""
    return (
        f"held-out prompts, {summary['eval_samples']} responses: "
        f"mean score {summary['eval_score_before']:.3f} "
        f"± {summary['eval_score_before_se']:.3f} before -> {summary['eval_score_after']:.3f} "
        f"± {summary['eval_score_after_se']:.3f} after; "
        f"KL to the reference {summary['eval_kl_after']:.2f} nats per response"
        + "".join(
            f"; {key.removeprefix('eval_')} {summary.get(f'{key}_before', math.nan):.3f} "
            f"-> {summary[f'{key}_after']:.3f}"
            for key in summary.get("eval_rewards", ())
        )
    )


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        config, resume = parse(argv)
        summary = train_text(config, resume=resume)
        if not is_main_process():
            return 0
        if summary.get("eval_score_after") is not None:
            print(held_out_line(summary), file=sys.stderr, flush=True)
        print(summary_line(summary), flush=True)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
