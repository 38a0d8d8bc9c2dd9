"""What ``make train`` does on this machine: learning on held-out prompts, and wall time.

    python -m benchmarks.quickstart --seeds 1 2 3 --fresh-clone   # writes benchmarks/results/quickstart.md

For each seed, runs the ``make train`` command (``scripts.train_text`` with the Makefile's
``TRAIN_FLAGS``, read from the Makefile so the two never differ) in a fresh process and
records the whole-process wall time, the mean score of 32 responses on held-out prompts
before and after training, and the KL to the reference. ``--fresh-clone`` also clones the
repository's HEAD into a temporary folder and times ``make train`` there, install included
(pip's cache and the local torch wheel make it what a second install on this machine costs).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class QuickstartConfig:
    """Run make train's command for several seeds (and once from a fresh clone)."""

    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds to run"""
    fresh_clone: bool = False
    """also time `make train` in a fresh clone of HEAD, install included"""
    out: str = "benchmarks/results/quickstart.md"
    """markdown table to write"""


def train_flags() -> list[str]:
    """The Makefile's TRAIN_FLAGS."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^TRAIN_FLAGS \?= (.*)$", text, flags=re.M)
    if match is None:
        raise SystemExit("error: the Makefile has no TRAIN_FLAGS line")
    return shlex.split(match.group(1))


def run_seed(seed: int, runs_dir: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "scripts.train_text",
        "--task",
        "Sentiment",
        "--model",
        "embedded",
        *train_flags(),
        "--seed",
        str(seed),
        "--runs-dir",
        runs_dir,
        "--no-tensorboard",
        "--no-progress",
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: seed {seed} failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return summary | {"process_s": wall}


def fresh_clone_make_train() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        start = time.perf_counter()
        done = subprocess.run(
            ["make", "train"], cwd=clone, capture_output=True, text=True, check=False
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"error: make train in a fresh clone failed:\n{done.stderr[-2000:]}")
        return wall


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(QuickstartConfig, args=argv)
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for seed in args.seeds:
            rows.append((seed, run_seed(seed, runs)))
            print(f"seed {seed}: {rows[-1][1]}", file=sys.stderr, flush=True)
    clone_s = fresh_clone_make_train() if args.fresh_clone else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = " ".join(train_flags())
    lines = [
        "# `make train`: the main job",
        "",
        f"Command: `python -m benchmarks.quickstart --seeds {' '.join(map(str, args.seeds))}"
        f"{' --fresh-clone' if args.fresh_clone else ''}`",
        "",
        f"Each seed runs `python -m scripts.train_text --task Sentiment --model embedded {flags} --seed S` "
        f"(the Makefile's TRAIN_FLAGS) in a fresh process on {platform.machine()}, {cores} cores, Python "
        f"{platform.python_version()}, one torch thread (the trainer's default). Held-out: 32 responses on the "
        "prompts never trained on (every 5th), same prompts and sampling noise before and after; ± standard error.",
        "",
        "| seed | held-out score before | after | KL to the reference after (nats/response) "
        "| training s | whole process s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for seed, s in rows:
        lines.append(
            f"| {seed} | {s['eval_score_before']:.3f} ± {s['eval_score_before_se']:.3f} | "
            f"{s['eval_score_after']:.3f} ± {s['eval_score_after_se']:.3f} | {s['eval_kl_after']:.2f} | "
            f"{s['wall_time_s']:.0f} | {s['process_s']:.0f} |"
        )
    if clone_s is not None:
        lines += [
            "",
            f"`make train` in a fresh clone of HEAD, install included (pip cache warm): **{clone_s:.0f} s**.",
        ]
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
