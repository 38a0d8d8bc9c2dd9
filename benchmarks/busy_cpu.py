"""Text training and env stepping on a quiet machine and beside a busy process, by torch thread count.

    python -m benchmarks.busy_cpu                       # writes benchmarks/results/busy_cpu.md
    python -m benchmarks.busy_cpu --workloads toy-train --threads 1 2 --repeats 1   # quicker

Each cell runs in a fresh Python process (thread settings never leak between cells), with
``--torch-threads`` set to the cell's count (0 is torch's default: one thread per core). A
"busy" cell first starts one process that spins a core (``while True: pass``, the stand-in
for anything else running on the machine) and stops it afterwards. Workloads:

- ``toy-train``: ``train_text`` on Toy with the tiny model, 3 iterations of 32 responses;
- ``sentiment-train``: ``train_text`` on Sentiment with the embedded SmolLM2-135M, 2
  iterations of 16 responses of 12 tokens (the first is a warm-up, the second is timed);
- ``env-step``: random actions in ``TextGenerationVectorEnv`` (embedded model, 8 rows, 16
  tokens, reference pass per step): steps per second over 3 episodes after one warm-up.

A cell that runs past ``--cell-timeout`` seconds is reported as slower than that. The table
reports the seconds (or steps/s) of each cell and the busy/quiet slowdown per thread count.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WORKLOADS = ("toy-train", "sentiment-train", "env-step")


@dataclass
class BusyConfig:
    """Measure the cost of torch's thread count when another process uses a core."""

    workloads: tuple[str, ...] = WORKLOADS
    """which workloads to run (toy-train, sentiment-train, env-step)"""
    threads: tuple[int, ...] = (1, 0)
    """torch thread counts to compare (0: torch's default, one per core)"""
    repeats: int = 1
    """runs per cell (the median is reported)"""
    cell_timeout: float = 600.0
    """seconds before a cell is stopped and reported as slower than this"""
    out: str = "benchmarks/results/busy_cpu.md"
    """markdown table to write"""
    child: str | None = None
    """internal: run one workload in this process and print its measurement"""
    child_threads: int = 0
    """internal: the thread count of the child"""


def run_workload(name: str, threads: int) -> dict[str, float]:
    """Run one workload in this process; returns ``{"seconds": ...}`` or ``{"steps_per_s": ...}``."""
    import tempfile

    import torch

    from textenv.agents.text import TextTrainConfig, train_text
    from textenv.device import set_torch_threads

    with tempfile.TemporaryDirectory() as runs:
        common = dict(
            runs_dir=runs,
            tensorboard=False,
            progress=False,
            save_checkpoint=False,
            eval_samples=0,
            sample_every=0,
            device="cpu",
            torch_threads=threads,
        )
        if name == "toy-train":
            config = TextTrainConfig.from_flat(
                task="Toy",
                model="tiny",
                iterations=3,
                num_envs=32,
                learning_rate=3e-3,
                kl_coef=0.0,
                **common,
            )
            start = time.perf_counter()
            train_text(config)
            return {"seconds": time.perf_counter() - start, "threads_used": torch.get_num_threads()}
        if name == "sentiment-train":
            config = TextTrainConfig.from_flat(
                task="Sentiment",
                model="embedded",
                iterations=2,
                num_envs=16,
                max_new_tokens=12,
                **common,
            )
            summary = train_text(config)
            metrics = [
                json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").open()
            ]
            second = metrics[-1]
            return {
                "seconds": second["rollout_s"] + second["update_s"],
                "threads_used": torch.get_num_threads(),
            }
    if name == "env-step":
        from textenv import TextGenerationVectorEnv

        set_torch_threads(threads)
        envs = TextGenerationVectorEnv(
            num_envs=8,
            task="Sentiment",
            model="embedded",
            max_new_tokens=16,
            reference_pass="per_step",
        )
        generator = torch.Generator().manual_seed(0)
        steps, elapsed = 0, 0.0
        for episode in range(4):
            envs.reset(seed=episode)
            start = time.perf_counter()
            n = 0
            while not envs.all_done:
                envs.step(torch.randint(0, envs.single_action_space.n, (8,), generator=generator))
                n += 1
            if episode:  # the first episode warms up
                steps, elapsed = steps + n, elapsed + time.perf_counter() - start
        return {"steps_per_s": steps / elapsed, "threads_used": torch.get_num_threads()}
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


def run_cell(workload: str, threads: int, busy: bool, timeout: float) -> dict[str, float] | None:
    """One measurement in a fresh process, beside a spinning process when ``busy``; None on timeout."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0.0)  # let the spinner take its core
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.busy_cpu",
            "--child",
            workload,
            "--child-threads",
            str(threads),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0:
            raise RuntimeError(f"{workload} with {threads} threads failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(BusyConfig, args=argv)
    if args.child is not None:
        print(json.dumps(run_workload(args.child, args.child_threads)), flush=True)
        return 0
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        print(
            f"error: unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}",
            file=sys.stderr,
        )
        return 2
    rows = []
    for workload in args.workloads:
        for threads in args.threads:
            cells = {}
            for busy in (False, True):
                results = [
                    run_cell(workload, threads, busy, args.cell_timeout)
                    for _ in range(args.repeats)
                ]
                cells[busy] = None if any(r is None for r in results) else results
                print(
                    f"{workload} threads={threads} busy={busy}: {results}",
                    file=sys.stderr,
                    flush=True,
                )
            rows.append((workload, threads, cells))
    write_table(args, rows)
    return 0


def _value(results, key: str) -> float | None:
    return None if results is None else _median([r[key] for r in results])


def write_table(args: BusyConfig, rows) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = "python -m benchmarks.busy_cpu " + " ".join(
        [
            f"--workloads {' '.join(args.workloads)}",
            f"--threads {' '.join(map(str, args.threads))}",
            f"--repeats {args.repeats}",
        ]
    )
    lines = [
        "# Text training and env stepping beside a busy process",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {cores} cores, Python {platform.python_version()}; "
        'each cell is a fresh process; "busy" = one other process spinning a core. Threads 0 = torch\'s '
        "default (one per core). Median of the repeats; see the module docstring for the workloads.",
        "",
        "| workload | torch threads | quiet | busy | busy / quiet |",
        "| --- | --- | --- | --- | --- |",
    ]
    for workload, threads, cells in rows:
        key = "steps_per_s" if workload == "env-step" else "seconds"
        quiet, busy = _value(cells[False], key), _value(cells[True], key)
        used = cells[False][0]["threads_used"] if cells[False] else "?"
        unit = " steps/s" if key == "steps_per_s" else " s"

        def fmt(v):
            return f"> {args.cell_timeout:.0f} s (stopped)" if v is None else f"{v:.2f}{unit}"

        if quiet is None or busy is None:
            ratio = "n/a"
        else:
            ratio = (
                f"{quiet / busy:.1f}x slower"
                if key == "steps_per_s"
                else f"{busy / quiet:.1f}x slower"
            )
        lines.append(
            f"| {workload} | {threads} ({used} used) | {fmt(quiet)} | {fmt(busy)} | {ratio} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
