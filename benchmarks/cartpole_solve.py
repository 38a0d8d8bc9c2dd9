"""Wall time to a solved CartPole-v1, whole process, this project vs Stable-Baselines3.

    python -m benchmarks.cartpole_solve --seeds 1 2 3 4 5

Each run is a fresh Python process started the way a user starts it, timed from launch to
exit (imports, env creation, training, a 10-episode deterministic evaluation, writing
results), one after another on an otherwise idle machine, one torch thread each
(``OMP_NUM_THREADS=1``):

- ``textenv-ppo``: ``python -m scripts.train --env-id CartPole-v1 --seed S`` (the preset,
  i.e. ``make train-classic``), which evaluates on 10 fresh episodes at the end;
- ``textenv-ppo-torch-env``: the same with ``--env-id textenv/TorchCartPole-v1`` (the torch
  env, its state and the rollout in tensors on the CPU; the same preset; not a default side);
- ``sb3-zoo`` / ``sb3-default``: Stable-Baselines3's PPO with rl-baselines3-zoo's tuned
  CartPole-v1 hyperparameters / with its own defaults, at the zoo's 100k steps, then the
  same 10-episode deterministic evaluation (``benchmarks.classic.run_sb3``).

*Solved* means a mean deterministic evaluation return of 500 (the maximum). CleanRL's
``ppo.py`` is not on PyPI in a form that runs with Gymnasium 1.x and cannot be fetched here,
so it is not a side; ``benchmarks/results/classic.md`` quotes its published numbers.
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


@dataclass
class SolveConfig:
    """Whole-process wall time to a solved CartPole-v1."""

    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """seeds, the same for every side"""
    libs: tuple[str, ...] = ("textenv-ppo", "sb3-zoo", "sb3-default")
    """sides to run"""
    out: str = "benchmarks/results/cartpole_solve.md"
    """markdown table to write"""
    worker: str | None = None
    """internal: run one SB3 side in this process and print its result as JSON"""
    seed: int = 1
    """internal: the worker's seed"""


def _command(lib: str, seed: int, runs_dir: str) -> list[str]:
    if lib in ("textenv-ppo", "textenv-ppo-torch-env"):
        env_id = "CartPole-v1" if lib == "textenv-ppo" else "textenv/TorchCartPole-v1"
        return [
            sys.executable,
            "-m",
            "scripts.train",
            "--env-id",
            env_id,
            "--seed",
            str(seed),
            "--runs-dir",
            runs_dir,
            "--no-progress",
        ]
    return [sys.executable, "-m", "benchmarks.cartpole_solve", "--worker", lib, "--seed", str(seed)]


def run_side(lib: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as runs_dir:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        start = time.perf_counter()
        out = subprocess.run(_command(lib, seed, runs_dir), capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"error: {lib} seed {seed} failed: {out.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "lib": lib,
        "seed": seed,
        "process_s": wall,
        "train_s": summary["wall_time_s"],
        "steps": summary["global_step"],
        "eval": summary["eval_return_mean"],
    }


def sb3_worker(lib: str, seed: int) -> int:
    import torch

    from benchmarks.classic import run_sb3

    torch.set_num_threads(1)
    result = run_sb3(lib, "CartPole-v1", seed, 1.0)
    print(
        json.dumps(
            {
                "wall_time_s": result["wall_time_s"],
                "global_step": result["global_step"],
                "eval_return_mean": result["eval_return_mean"],
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(SolveConfig, args=argv)
    if args.worker is not None:
        return sb3_worker(args.worker, args.seed)
    rows = []
    for seed in args.seeds:
        for lib in args.libs:
            row = run_side(lib, seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    command = "python -m benchmarks.cartpole_solve " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        "# CartPole-v1: whole-process wall time to a solved policy",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; runs "
        "one after another, one torch thread each. *Process* is launch to exit; *train* is the training loop "
        "alone; *solved* is a mean deterministic return of 500 over 10 fresh episodes.",
        "",
        "| side | steps | solved | process s (median, min–max) | train s (median) | eval returns |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    medians = {}
    for lib in args.libs:
        rs = [r for r in rows if r["lib"] == lib]
        proc = [r["process_s"] for r in rs]
        medians[lib] = statistics.median(proc)
        evals = ", ".join(f"{r['eval']:.0f}" for r in rs)
        lines.append(
            f"| {lib} | {rs[0]['steps']:,} | {sum(r['eval'] >= 500 for r in rs)} of {len(rs)} "
            f"| {medians[lib]:.1f} ({min(proc):.1f}–{max(proc):.1f}) "
            f"| {statistics.median(r['train_s'] for r in rs):.1f} "
            f"| {evals} |"
        )
    if "textenv-ppo" in medians and len(medians) > 1:
        lines += [
            "",
            "Median whole-process time relative to textenv-ppo: "
            + ", ".join(
                f"{lib} {medians[lib] / medians['textenv-ppo']:.1f}×"
                for lib in args.libs
                if lib != "textenv-ppo"
            ),
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from textenv.agents.runlog import atomic_write_text

    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
