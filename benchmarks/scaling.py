"""One process × 2 threads vs 2 processes × 1 thread (torchrun, gloo), the same global batch.

    python -m benchmarks.scaling --tasks cartpole text --seeds 1 2 3   # writes benchmarks/results/scaling.md + .png

Each run is a fresh process tree, started the way a user starts it and timed from launch to
exit, one after another on an otherwise idle machine:

- ``1 proc × 2 threads``: ``python -m scripts.train[_text] ... --torch-threads 2`` (``OMP_NUM_THREADS=2``);
- ``2 procs × 1 thread``: ``torchrun --standalone --nproc-per-node 2 -m scripts.train[_text] ... --torch-threads 1``.

Tasks: ``cartpole`` is the CartPole-v1 preset (128 envs × 16 steps, 98k steps); ``text`` is
``make train``'s run (Sentiment on the embedded SmolLM2-135M, the Makefile's TRAIN_FLAGS).
Both sides use the same seeds, the same global batch (``num_envs`` is global: each of the
two processes steps half of it) and the same hyperparameters, so their learning curves must
agree up to sampling noise; the throughput ratio is what it is.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quickstart import train_flags

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("1 proc × 2 threads", "2 procs × 1 thread")


@dataclass
class ScalingConfig:
    """Throughput and learning curves of one process vs two (torchrun) on the same global batch."""

    tasks: tuple[str, ...] = ("cartpole", "text")
    """cartpole and/or text"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds, the same for both sides"""
    text_seeds: tuple[int, ...] | None = None
    """seeds of the text task (default: --seeds)"""
    out: str = "benchmarks/results/scaling.md"
    """markdown table to write (the plot goes beside it, .png)"""
    extend: bool = False
    """add these runs to the ones already in the result's JSON (more seeds without rerunning the others)"""


def command(task: str, side: str, seed: int, runs_dir: str) -> tuple[list[str], dict[str, str]]:
    two = side == SIDES[1]
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        if two
        else [sys.executable]
    )
    if task == "cartpole":
        args = ["-m", "scripts.train", "--env-id", "CartPole-v1"]
    else:
        args = [
            "-m",
            "scripts.train_text",
            "--task",
            "Sentiment",
            "--model",
            "embedded",
            *train_flags(),
        ]
    threads = "1" if two else "2"
    args += [
        "--seed",
        str(seed),
        "--runs-dir",
        runs_dir,
        "--no-progress",
        "--no-tensorboard",
        "--torch-threads",
        threads,
    ]
    return [*launcher, *args], os.environ | {"OMP_NUM_THREADS": threads}


def run_one(task: str, side: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as runs_dir:
        cmd, env = command(task, side, seed, runs_dir)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(
            [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
        )
        (run_dir,) = Path(runs_dir).iterdir()
        log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if task == "cartpole":
        curve = [(m["global_step"], m["episodic_return"]) for m in log if "episodic_return" in m]
        return {
            "wall_s": wall,
            "train_s": summary["wall_time_s"],
            "sps": summary["sps"],
            "final": summary["eval_return_mean"],
            "curve": curve,
        }
    curve = [(m["iteration"], m["score_mean"]) for m in log]
    return {
        "wall_s": wall,
        "train_s": summary["wall_time_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "rollout_s": statistics.mean(m["rollout_s"] for m in log),
        "update_s": statistics.mean(m["update_s"] for m in log),
        "final": summary["eval_score_after"],
        "before": summary["eval_score_before"],
        "curve": curve,
    }


def _ms(xs: list[float], fmt: str = ".1f") -> str:
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), fmt)}"


def write(results: dict, config: ScalingConfig, cmdline: str | list[str]) -> None:
    commands = [cmdline] if isinstance(cmdline, str) else cmdline
    lines = [
        "# Scaling out: 1 process × 2 threads vs 2 processes × 1 thread (torchrun, gloo)",
        "",
        "Commands: " + "; then ".join(f"`{c}`" for c in commands),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; runs one "
        "after another on an otherwise idle machine; each row is a whole process tree timed from launch to exit.",
        "Both sides: the same seeds, the same global batch and hyperparameters (`num_envs` is global; each "
        "process steps half of it).",
        "",
    ]
    if "cartpole" in results:
        lines += [
            "## CartPole-v1 preset (128 envs × 16 steps, 98,304 steps)",
            "",
            "| side | seeds | whole process (s) | training (s) | steps/s | eval return (10 episodes) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for side, runs in results["cartpole"].items():
            lines.append(
                f"| {side} | {len(runs)} | {_ms([r['wall_s'] for r in runs])} | "
                f"{_ms([r['train_s'] for r in runs])} | {_ms([r['sps'] for r in runs], ',.0f')} | "
                f"{_ms([r['final'] for r in runs])} |"
            )
        a, b = (statistics.mean(r["sps"] for r in results["cartpole"][s]) for s in SIDES)
        lines += ["", f"Throughput ratio (2 procs / 1 proc): **{b / a:.2f}×**.", ""]
    if "text" in results:
        lines += [
            "## Text PPO: `make train`'s run (Sentiment, embedded SmolLM2-135M, 32 responses × 12 tokens, "
            "8 iterations)",
            "",
            "| side | seeds | whole process (s) | training (s) | tokens/s | rollout (s/it) | update (s/it) | "
            "held-out score before → after |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for side, runs in results["text"].items():
            lines.append(
                f"| {side} | {len(runs)} | {_ms([r['wall_s'] for r in runs])} | "
                f"{_ms([r['train_s'] for r in runs])} | {_ms([r['tokens_per_s'] for r in runs])} | "
                f"{_ms([r['rollout_s'] for r in runs], '.2f')} | {_ms([r['update_s'] for r in runs], '.2f')} | "
                f"{_ms([r['before'] for r in runs], '.3f')} → {_ms([r['final'] for r in runs], '.3f')} |"
            )
        a, b = (statistics.mean(r["tokens_per_s"] for r in results["text"][s]) for s in SIDES)
        lines += ["", f"Throughput ratio (2 procs / 1 proc): **{b / a:.2f}×**.", ""]
    png = Path(config.out).with_suffix(".png")
    lines += [f"Learning curves of every run: `{png.name}`.", ""]
    from textenv.agents.runlog import atomic_write_text

    atomic_write_text(config.out, "\n".join(lines))
    atomic_write_text(
        Path(config.out).with_suffix(".json"),
        json.dumps(results | {"commands": commands}, indent=1),
    )
    _plot(results, png)


def _plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len([k for k in results if k != "commands"])
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    labels = {
        "cartpole": ("CartPole-v1: episodic return", "env steps"),
        "text": ("Sentiment: mean score per iteration", "iteration"),
    }
    results = {k: v for k, v in results.items() if k != "commands"}
    for ax, (task, sides) in zip(axes[0], results.items()):
        for color, (side, runs) in zip(("tab:blue", "tab:orange"), sides.items()):
            for i, run in enumerate(runs):
                xs, ys = zip(*run["curve"]) if run["curve"] else ((), ())
                ax.plot(xs, ys, color=color, alpha=0.7, label=side if i == 0 else None)
        title, xlabel = labels[task]
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> None:
    import tyro

    config = tyro.cli(ScalingConfig)
    for task in config.tasks:
        if task not in ("cartpole", "text"):
            raise SystemExit(f"error: unknown task {task!r} (cartpole, text)")
    cmdline = "python -m benchmarks.scaling " + " ".join(sys.argv[1:])
    results: dict[str, dict[str, list[dict]]] = {}
    previous = Path(config.out).with_suffix(".json")
    if config.extend and previous.is_file():
        results = json.loads(previous.read_text())
        cmdline = results.pop("commands") + [cmdline] if "commands" in results else [cmdline]
    for task in config.tasks:
        seeds = config.text_seeds if task == "text" and config.text_seeds else config.seeds
        results.setdefault(task, {side: [] for side in SIDES})
        for seed in seeds:
            for side in SIDES:  # interleaved, so a slow patch of the machine hits both sides
                r = run_one(task, side, seed)
                results[task][side].append(r)
                print(
                    f"{task} {side} seed {seed}: {r['wall_s']:.1f} s, final {r['final']:.3f}",
                    file=sys.stderr,
                )
        write(results, config, cmdline)


if __name__ == "__main__":
    main()
