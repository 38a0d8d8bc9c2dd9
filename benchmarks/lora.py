"""LoRA against full fine-tuning on the main job: speed, memory and held-out gain per minute.

    python -m benchmarks.lora --seeds 1 2 3   # writes benchmarks/results/lora.{md,json,png}

Both sides run ``make train``'s command (``scripts.train_text`` with the Makefile's
``TRAIN_FLAGS``: Sentiment on the embedded SmolLM2-135M), one torch thread each, and evaluate
the held-out prompts every ``--eval-every`` iterations. The LoRA side adds ``--lora-r`` (adapters
on every linear layer; the reference is the base model with the adapters off, so there is no
second copy of the weights) and its own ``--lora-learning-rate``: adapters train at a larger
step than full weights. Two runs go at a time, one core each, a seed's two together, so both
sides see the same machine. Recorded per run: generated tokens per second of training, rollout and update seconds
per iteration, the process's peak resident memory, the held-out score before, during and after,
and the held-out gain per minute of training (rollout + update; the evaluations' time is left
out on both sides).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tyro

from benchmarks.estimators import run_train_text
from benchmarks.quickstart import train_flags
from textenv.agents.runlog import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LoraConfig:
    """Run make train's command with full fine-tuning and with LoRA, seed by seed, side by side."""

    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds; each seed's full and LoRA runs go at the same time, one core each"""
    lora_r: int = 16
    """--lora-r of the LoRA side"""
    lora_learning_rate: float = 2e-3
    """--learning-rate of the LoRA side (the full side keeps TRAIN_FLAGS' own)"""
    eval_every: int = 2
    """held-out evaluations every this many iterations (the curve in the plot)"""
    out: str = "benchmarks/results/lora.md"
    """markdown table to write (the records go beside it as .json, the plot as .png)"""


def variants(config: LoraConfig) -> dict[str, list[str]]:
    lora = ["--lora-r", str(config.lora_r), "--learning-rate", str(config.lora_learning_rate)]
    return {"full": [], f"LoRA r={config.lora_r}": lora}


def run_one(name: str, extra: list[str], seed: int, eval_every: int, runs_dir: str) -> dict:
    run_name = f"{name.split()[0]}-{seed}"
    cmd = [
        sys.executable,
        "-m",
        "scripts.train_text",
        *("--task", "Sentiment", "--model", "embedded"),
        *train_flags(),
        *extra,  # later flags win: the LoRA side's learning rate replaces TRAIN_FLAGS'
        *("--eval-every", str(eval_every), "--seed", str(seed)),
        *("--runs-dir", runs_dir, "--run-name", run_name, "--torch-threads", "1"),
        *("--no-tensorboard", "--no-progress", "--no-save-checkpoint"),
    ]
    flags = train_flags()
    rows = int(flags[flags.index("--num-envs") + 1])
    result = run_train_text(cmd, runs_dir, run_name)
    s, metrics = result["summary"], [m for m in result["metrics"] if "rollout_s" in m]
    train_s, points = 0.0, [(0.0, s["eval_score_before"])]
    for m in metrics:
        train_s += m["rollout_s"] + m["recompute_s"] + m["update_s"]
        if "eval_score" in m:
            points.append((train_s, m["eval_score"]))
    gain = s["eval_score_after"] - s["eval_score_before"]
    return {
        "variant": name,
        "seed": seed,
        "before": s["eval_score_before"],
        "after": s["eval_score_after"],
        "after_se": s["eval_score_after_se"],
        "kl_after": s["eval_kl_after"],
        "tokens_per_s": sum(m["response_length"] for m in metrics) * rows / train_s,
        "rollout_s_per_it": sum(m["rollout_s"] for m in metrics) / len(metrics),
        "update_s_per_it": sum(m["update_s"] for m in metrics) / len(metrics),
        "train_s": train_s,
        "process_s": result["process_s"],
        "peak_rss_gib": result["peak_rss_mb"] / 1024,
        "gain_per_min": gain / (train_s / 60),
        "curve": points,
        "flags": cmd[3:],
    }


def _mean_se(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return f"{mean:.3f}"
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return f"{mean:.3f} ± {se:.3f}"


def render(config: LoraConfig, records: list[dict], out: Path) -> None:
    names = list(variants(config))
    seeds = sorted({r["seed"] for r in records})
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# LoRA vs full fine-tuning on the main job",
        "",
        f"Command: `python -m benchmarks.lora --seeds {' '.join(map(str, seeds))}` "
        f"(commit {commit}; {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}).",
        "",
        "Each run: `python -m scripts.train_text --task Sentiment --model embedded "
        f"{' '.join(train_flags())} --eval-every {config.eval_every} --seed S --torch-threads 1`, "
        f"the LoRA side with `--lora-r {config.lora_r} --learning-rate "
        f"{config.lora_learning_rate}` (adapters on every linear layer; the reference is the base "
        "model with the adapters off). Two runs at a time, one core each, a seed's two together. "
        "Training seconds are rollout + update (the held-out evaluations are left out on both "
        "sides); tokens/s is generated tokens per training second; memory is the process's peak "
        "resident set (weights, optimizer state, activations, and on the full side the frozen "
        "reference copy). Held-out: 32 responses on prompts never trained on, the same prompts "
        "and sampling noise at every evaluation. Mean ± standard error over seeds.",
        "",
        "| | tokens/s | rollout s/it | update s/it | training s | peak memory GiB "
        "| held-out before → after | KL after | gain per training minute |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        rs = [r for r in records if r["variant"] == name]
        col = lambda key, rs=rs: _mean_se([r[key] for r in rs])  # noqa: E731
        lines.append(
            f"| {name} | {col('tokens_per_s')} | {col('rollout_s_per_it')} | "
            f"{col('update_s_per_it')} | {col('train_s')} | {col('peak_rss_gib')} | "
            f"{col('before')} → {col('after')} | {col('kl_after')} | {col('gain_per_min')} |"
        )
    lines += ["", "Per seed:", "", "| | seed | before → after (± SE) | KL after | training s |"]
    lines += ["| --- | --- | --- | --- | --- |"]
    for r in sorted(records, key=lambda r: (names.index(r["variant"]), r["seed"])):
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['before']:.3f} → {r['after']:.3f} "
            f"± {r['after_se']:.3f} | {r['kl_after']:.2f} | {r['train_s']:.0f} |"
        )
    atomic_write_text(out, "\n".join(lines) + "\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps(records, indent=1) + "\n")
    plot(records, names, out.with_suffix(".png"))


def plot(records: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, name in enumerate(names):
        for j, r in enumerate(r for r in records if r["variant"] == name):
            xs, ys = zip(*r["curve"], strict=True)
            ax.plot(
                [x / 60 for x in xs],
                ys,
                "o-",
                color=colors[c],
                alpha=0.75,
                label=name if j == 0 else None,
            )
    ax.set_xlabel("training minutes (rollout + update, one core)")
    ax.set_ylabel("held-out score (VADER)")
    ax.set_title("make train's run: full fine-tuning vs LoRA")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(config: LoraConfig) -> None:
    jobs = [
        (name, extra, seed) for seed in config.seeds for name, extra in variants(config).items()
    ]
    with tempfile.TemporaryDirectory() as runs, ThreadPoolExecutor(2) as pool:
        records = list(pool.map(lambda j: run_one(j[0], j[1], j[2], config.eval_every, runs), jobs))
    for r in records:
        print(
            f"{r['variant']} seed {r['seed']}: {r['before']:.3f} -> {r['after']:.3f}, "
            f"{r['tokens_per_s']:.1f} tokens/s, {r['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
    out = ROOT / config.out
    render(config, records, out)
    print(f"wrote {out.relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(LoraConfig))
