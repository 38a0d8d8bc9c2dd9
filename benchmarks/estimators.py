"""PPO-GAE against the critic-free estimators (GRPO, RLOO, REINFORCE++) on the same core.

    python -m benchmarks.estimators --seeds 1 2 3 --jobs 2   # writes benchmarks/results/estimators.{md,png}

Every run is ``scripts.train_text`` with the Makefile's ``TRAIN_FLAGS`` (the main job's
settings: 8 iterations of 32 responses of up to 12 tokens, the embedded SmolLM2-135M), one
torch thread, in its own process; only ``--advantage`` and ``--group-size`` differ (the group
estimators sample 8 prompts x 4 responses, the others 32 prompts x 1), so every estimator
gets the same number of responses and token budget. Recorded per run: the held-out score
(32 responses on prompts never trained on, before and after), the KL to the reference, the
training score and KL per iteration against generated tokens and wall time, and the peak
resident memory of the process (``wait4``'s ``ru_maxrss``). With ``--jobs 2`` two runs share
the machine, one core each (a one-thread run is not slowed by a second one; see busy_cpu.md).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quickstart import train_flags

ROOT = Path(__file__).resolve().parent.parent
GROUPED = ("grpo", "rloo")


@dataclass
class EstimatorsConfig:
    """Run each estimator on each task for several seeds; write a table and a plot."""

    tasks: tuple[str, ...] = ("Sentiment", "Arithmetic")
    """text tasks to train on"""
    estimators: tuple[str, ...] = ("gae", "grpo", "rloo", "reinforce_pp")
    """values of --advantage"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds per (task, estimator)"""
    group_size: int = 4
    """--group-size of grpo and rloo (the others sample one response per prompt)"""
    model: str = "embedded"
    """policy and reference model"""
    jobs: int = 2
    """runs at once (each uses one torch thread)"""
    out: str = "benchmarks/results/estimators.md"
    """markdown table to write (the plot goes beside it as .png)"""


def run_one(
    task: str, estimator: str, seed: int, group_size: int, model: str, runs_dir: str
) -> dict:
    name = f"{task}-{estimator}-{seed}"
    cmd = [
        sys.executable,
        "-m",
        "scripts.train_text",
        "--task",
        task,
        "--model",
        model,
        *train_flags(),
        "--advantage",
        estimator,
        "--group-size",
        str(group_size if estimator in GROUPED else 1),
        "--seed",
        str(seed),
        "--runs-dir",
        runs_dir,
        "--run-name",
        name,
        "--no-tensorboard",
        "--no-progress",
        "--torch-threads",
        "1",
        "--no-save-checkpoint",
    ]
    return {
        "task": task,
        "estimator": estimator,
        "seed": seed,
        **run_train_text(cmd, runs_dir, name),
    }


def run_train_text(cmd: list[str], runs_dir: str, name: str) -> dict:
    """Run one ``scripts.train_text`` command in its own process; its summary, metrics, wall time
    and peak resident memory (``wait4``'s ``ru_maxrss``: this child's own, not the benchmark's)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"error: {name} failed (exit code {proc.returncode}):\n{stderr[-2000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    metrics = [
        json.loads(line)
        for line in (Path(runs_dir) / name / "metrics.jsonl").read_text().splitlines()
    ]
    return {
        "process_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "summary": summary,
        "metrics": metrics,
    }


def _mean_sd(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return f"{mean:.3f}"
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return f"{mean:.3f} ± {sd:.3f}"


def _curve(run: dict, num_envs: int) -> tuple[list[float], list[float], list[float]]:
    """Cumulative generated tokens, wall seconds and training score per iteration."""
    tokens, total = [], 0.0
    for m in run["metrics"]:
        total += m["response_length"] * num_envs
        tokens.append(total)
    return (
        tokens,
        [m["wall_time_s"] for m in run["metrics"]],
        [m["score_mean"] for m in run["metrics"]],
    )


def plot(
    runs: list[dict], tasks: tuple[str, ...], estimators: tuple[str, ...], num_envs: int, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for estimator in estimators:
            mine = [r for r in runs if r["task"] == task and r["estimator"] == estimator]
            if not mine:
                continue
            curves = [_curve(r, num_envs) for r in mine]
            n = min(len(c[2]) for c in curves)
            mean = lambda k: [sum(c[k][i] for c in curves) / len(curves) for i in range(n)]  # noqa: E731
            tokens, wall, score = mean(0), mean(1), mean(2)
            axes[row][0].plot(tokens, score, marker="o", ms=3, label=estimator)
            axes[row][1].plot(wall, score, marker="o", ms=3, label=estimator)
        axes[row][0].set(
            xlabel="generated tokens", ylabel=f"{task}: training score (mean of seeds)"
        )
        axes[row][1].set(xlabel="training wall time (s)", ylabel="training score")
        axes[row][0].legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(EstimatorsConfig, args=argv)
    flags = train_flags()
    num_envs = int(flags[flags.index("--num-envs") + 1])
    if num_envs % args.group_size:
        raise SystemExit(
            f"error: --group-size {args.group_size} must divide the main job's --num-envs {num_envs}"
        )
    jobs = [(t, e, s) for s in args.seeds for t in args.tasks for e in args.estimators]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as runs_dir, ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_one, t, e, s, args.group_size, args.model, runs_dir) for t, e, s in jobs
        ]
        for future in futures:
            runs.append(future.result())
            r = runs[-1]
            print(
                f"{r['task']} {r['estimator']} seed {r['seed']}: held-out {r['summary']['eval_score_before']:.3f} -> "
                f"{r['summary']['eval_score_after']:.3f}, {r['process_s']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = "python -m benchmarks.estimators " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# PPO-GAE vs GRPO vs RLOO vs REINFORCE++ on the same PPO core",
        "",
        f"Command: `{command}`",
        "",
        f"Each run: `python -m scripts.train_text --task T --model {args.model} {' '.join(flags)} --advantage E "
        f"--group-size G --seed S --torch-threads 1` in its own process ({platform.machine()}, {cores} cores, "
        f"{args.jobs} runs at once, one core each). G = {args.group_size} for grpo and rloo "
        f"({num_envs // args.group_size} prompts x {args.group_size} responses), 1 otherwise ({num_envs} prompts): "
        "the same number of responses and the same token budget for every estimator. Held-out: 32 responses on the "
        "prompts never trained on (every 5th), the same prompts and sampling noise before and after. Values are "
        f"the mean ± standard deviation over seeds {', '.join(map(str, args.seeds))}.",
        "",
    ]
    for task in args.tasks:
        lines += [
            f"## {task}",
            "",
            "| estimator | held-out score before | held-out after | after − before | KL to the reference after "
            "(nats/response) | training score, last iteration | generated tokens | training s | peak RSS (MB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for estimator in args.estimators:
            mine = [r for r in runs if r["task"] == task and r["estimator"] == estimator]
            s = [r["summary"] for r in mine]
            gain = [x["eval_score_after"] - x["eval_score_before"] for x in s]
            tokens = [_curve(r, num_envs)[0][-1] for r in mine]
            lines.append(
                f"| {estimator} | {_mean_sd([x['eval_score_before'] for x in s])} | "
                f"{_mean_sd([x['eval_score_after'] for x in s])} | {_mean_sd(gain)} | "
                f"{_mean_sd([x['eval_kl_after'] for x in s])} | {_mean_sd([x['score_mean_last'] for x in s])} | "
                f"{sum(tokens) / len(tokens):.0f} | {sum(x['wall_time_s'] for x in s) / len(s):.0f} | "
                f"{sum(r['peak_rss_mb'] for r in mine) / len(mine):.0f} |"
            )
        lines.append("")
    lines += [
        "## Per run",
        "",
        "| task | estimator | seed | held-out before → after | KL after | training s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        s = r["summary"]
        lines.append(
            f"| {r['task']} | {r['estimator']} | {r['seed']} | {s['eval_score_before']:.3f} → "
            f"{s['eval_score_after']:.3f} | {s['eval_kl_after']:.2f} | {s['wall_time_s']:.0f} |"
        )
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(runs, args.tasks, args.estimators, num_envs, png)
    lines += ["", f"![score against generated tokens and wall time]({png.name})"]
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
