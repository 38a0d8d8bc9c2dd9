"""Show PPO works on language models: the sentiment task with the embedded SmolLM2-135M.

    python -m benchmarks.text_sentiment --iterations 60
    python -m benchmarks.text_sentiment --model tiny --task Toy --iterations 15 --out-name toy  # smoke test

Measures the mean score of 32 sampled responses before training, trains with
``textenv.agents.text.train_text``, measures again with the trained policy (same prompts, same
sampling), and writes ``benchmarks/results/<out-name>.md`` (numbers, before/after samples),
``<out-name>.png`` (score, KL to the reference and β per iteration) and the per-iteration
metrics in ``raw/<out-name>.metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from textenv.agents.text import KLConfig, LMConfig, LoggingConfig


@dataclass
class SentimentBenchConfig:
    """Train on a text task and report before/after scores, KL and speed."""

    task: str = "Sentiment"
    """task name"""
    model: str = "embedded"
    """policy and reference model"""
    iterations: int = 60
    """PPO iterations (at most, with target_score)"""
    target_score: float | None = None
    """stop once the mean score over the last 5 iterations reaches this"""
    num_envs: int = 16
    """responses per iteration"""
    max_new_tokens: int = 24
    """response budget"""
    learning_rate: float = 3e-6
    """AdamW learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over ``iterations``"""
    kl_coef: float = 0.05
    """β (initial β when kl_target is set)"""
    kl_target: float | None = 6.0
    """adaptive β target for the KL per response"""
    kl_horizon: int = 10_000
    """horizon of the adaptive β controller, in episodes (β moves by up to 20%·num_envs/horizon per iteration)"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 4
    """PPO epochs per iteration"""
    eval_samples: int = 32
    """responses sampled before and after training"""
    reference_pass: Literal["at_end", "per_step"] = "at_end"
    """the env's reference pass: at_end or per_step (same rewards)"""
    seed: int = 1
    """seed"""
    device: str = "auto"
    """auto, cpu or cuda"""
    out_name: str = "text_sentiment"
    """file stem of the results in benchmarks/results/"""


def sample_scores(
    policy_name: str, config: SentimentBenchConfig, device: str
) -> tuple[float, float, list[tuple[str, str, float]]]:
    """Mean score and mean KL to the reference (k1, nats per response) of ``eval_samples``
    responses of the model at ``policy_name`` (same prompts, seed)."""
    from textenv import TextGenerationVectorEnv
    from textenv.agents.lm import LMActorCritic, collect_rollout
    from textenv.models import load_causal_lm

    envs = TextGenerationVectorEnv(
        num_envs=config.eval_samples,
        task=config.task,
        model=config.model,
        device=device,
        max_new_tokens=config.max_new_tokens,
    )
    lm, _ = load_causal_lm(policy_name, device=device)
    rollout = collect_rollout(
        LMActorCritic(lm), envs, seed=12345, generator=torch.Generator(device).manual_seed(0)
    )
    rows = list(zip(rollout.prompts, rollout.responses, rollout.scores.tolist()))
    kl = float(((rollout.logprobs - rollout.ref_logprobs) * rollout.mask).sum(1).mean())
    return float(rollout.scores.mean()), kl, rows


def main(argv: list[str] | None = None) -> int:
    import tyro

    from textenv.agents.checkpoint import TrainingInterrupted
    from textenv.agents.text import TextTrainConfig, train_text
    from textenv.device import resolve_device

    args = tyro.cli(SentimentBenchConfig, args=argv)
    device = str(resolve_device(args.device))
    before, _, before_rows = sample_scores(args.model, args, device)
    print(f"before: mean score {before:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as runs_dir:
        config = TextTrainConfig(
            task=args.task,
            model=args.model,
            iterations=args.iterations,
            target_score=args.target_score,
            num_envs=args.num_envs,
            max_new_tokens=args.max_new_tokens,
            learning_rate=args.learning_rate,
            anneal_lr=args.anneal_lr,
            seed=args.seed,
            kl=KLConfig(
                reference_pass=args.reference_pass,
                kl_coef=args.kl_coef,
                kl_target=args.kl_target,
                kl_horizon=args.kl_horizon,
            ),
            lm=LMConfig(device=device),
            logging=LoggingConfig(runs_dir=runs_dir, run_name="run", tensorboard=False),
        )
        config.ppo = dataclasses.replace(
            config.ppo, num_minibatches=args.num_minibatches, update_epochs=args.update_epochs
        )
        stopped = None
        try:
            train_text(config)
        except TrainingInterrupted as stop:  # SIGTERM/Ctrl-C: report what the checkpoint reached
            stopped = f"stopped by {signal.Signals(stop.signum).name} after iteration {stop.step}"
            print(stopped, flush=True)
        rows = [
            json.loads(line)
            for line in (Path(runs_dir) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        after, after_kl, after_rows = sample_scores(
            str(Path(runs_dir) / "run" / "policy"), args, device
        )
    print(f"after: mean score {after:.3f}, KL {after_kl:.2f}", flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    ax[0].plot(its, [r["score_mean"] for r in rows])
    ax[0].set_title("mean score per iteration")
    ax[1].plot(its, [r["kl_k1"] for r in rows], label="KL (k1)")
    ax[1].plot(its, [r["kl_k3"] for r in rows], label="KL (k3)")
    ax[1].set_title("KL to the reference per response (nats)")
    ax[1].legend()
    ax[2].plot(its, [r["kl_coef"] for r in rows])
    ax[2].set_title("KL coefficient β")
    for a in ax:
        a.set_xlabel("iteration")
        a.grid(alpha=0.3)
    fig.tight_layout()
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{args.out_name}.png", dpi=110)
    (out / "raw").mkdir(exist_ok=True)
    (out / "raw" / f"{args.out_name}.metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )

    def table(sample_rows):
        lines = ["| prompt | response | score |", "| --- | --- | --- |"]
        for p, r, s in sample_rows[:8]:
            lines.append(
                f"| {p.replace('|', '/')} | {r.replace('|', '/').replace(chr(10), ' ')} | {s:.3f} |"
            )
        return lines

    def stderr(sample_rows):
        return statistics.stdev(s for _, _, s in sample_rows) / len(sample_rows) ** 0.5

    def last5(key):
        return sum(r[key] for r in rows[-5:]) / len(rows[-5:])

    lines = [
        f"# PPO on {args.task} with {args.model}",
        "",
        f"Command: `python -m benchmarks.text_sentiment {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"Device: {device} ({platform.machine()}, torch {torch.__version__}).",
        "",
        "| | value |",
        "| --- | --- |",
        f"| mean score before ({args.eval_samples} samples, ± standard error) | {before:.3f} ± {stderr(before_rows):.3f} |",
        f"| mean score after ({args.eval_samples} samples, same prompts, ± standard error) | {after:.3f} ± {stderr(after_rows):.3f} |",
        f"| KL to reference after ({args.eval_samples} samples, k1, nats/response) | {after_kl:.2f} |",
        f"| KL to reference, last iteration (k1, nats/response) | {rows[-1]['kl_k1']:.2f} |",
        f"| mean score and KL over the last 5 iterations | {last5('score_mean'):.3f}, {last5('kl_k1'):.2f} |",
        f"| iterations × responses × budget | {rows[-1]['iteration']} × {args.num_envs} × {args.max_new_tokens} |",
        f"| wall time of training (s) | {rows[-1]['wall_time_s']:.0f} |",
        f"| tokens/s (rollout + update) | {rows[-1]['tokens_per_s']:.1f} |",
        "",
        *([f"Training was {stopped}.", ""] if stopped else []),
        "## Before",
        "",
        *table(before_rows),
        "",
        "## After",
        "",
        *table(after_rows),
        "",
    ]
    (out / f"{args.out_name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
