"""Soak: resident memory through long runs of both trainers stays flat.

    python -m benchmarks.soak

Runs ``scripts.train`` (CartPole-v1, 1M steps) and ``scripts.train_text`` (Toy task, tiny
model, 200 iterations) as child processes one after the other, samples each one's resident
set size (``/proc/<pid>/status``, Linux) every half second, and writes
``benchmarks/results/soak.md`` and ``soak.png``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "CartPole-v1, 1M steps": [
        "-m",
        "scripts.train",
        "--env-id",
        "CartPole-v1",
        "--total-timesteps",
        "1000000",
        "--num-envs",
        "4",
        "--num-steps",
        "128",
        "--eval-episodes",
        "0",
        "--no-progress",
        "--no-tensorboard",
    ],
    "Toy text task, 200 iterations": [
        "-m",
        "scripts.train_text",
        "--task",
        "Toy",
        "--model",
        "tiny",
        "--iterations",
        "200",
        "--num-envs",
        "16",
        "--learning-rate",
        "1e-3",
        "--no-progress",
        "--no-tensorboard",
        "--sample-every",
        "20",
    ],
}


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def soak(args: list[str], runs_dir: str) -> list[tuple[float, float]]:
    proc = subprocess.Popen(
        [sys.executable, *args, "--runs-dir", runs_dir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    samples, start = [], time.perf_counter()
    while proc.poll() is None:
        rss = rss_mib(proc.pid)
        if rss is not None:
            samples.append((time.perf_counter() - start, rss))
        time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(
            f"error: {' '.join(args)} exited {proc.returncode}: {proc.stderr.read()[-500:]}"
        )
    return samples


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for name, args in RUNS.items():
            results[name] = soak(args, runs_dir)
            print(name, "done", flush=True)
    lines = [
        "# Soak: resident memory through long runs",
        "",
        "Command: `python -m benchmarks.soak`",
        "",
        "RSS sampled every 0.5 s. *Start* is the first sample after 10% of the run's wall time (imports "
        "and model loading done), *end* the last one.",
        "",
        "| run | wall time (s) | RSS start (MiB) | RSS end (MiB) | RSS max (MiB) | end − start |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, samples in results.items():
        wall = samples[-1][0]
        start = next(rss for t, rss in samples if t >= 0.1 * wall)
        end, peak = samples[-1][1], max(rss for _, rss in samples)
        lines.append(
            f"| {name} | {wall:.0f} | {start:.0f} | {end:.0f} | {peak:.0f} | {end - start:+.0f} |"
        )
        ax.plot([t / wall for t, _ in samples], [rss for _, rss in samples], label=name)
    ax.set_xlabel("fraction of the run")
    ax.set_ylabel("RSS (MiB)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "soak.png", dpi=110)
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
