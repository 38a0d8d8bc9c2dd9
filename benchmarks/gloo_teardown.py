"""How often a two-process gloo run aborts at exit, with the process group leaked vs freed.

    python -m benchmarks.gloo_teardown --launches 120 --parallel 3

Each launch is ``torchrun --standalone --nproc-per-node 2`` of a short rank body: an import of
``torch.distributed.nn.functional`` (what ``torch._dynamo``'s import does, and torch.optim's
first step imports ``torch._dynamo``), an all-reduce, then the end of the run. The two sides
differ only in what happens to the process group:

- ``leaked``: the group is created before that import, so the module binds it as its
  functions' default argument; it outlives ``destroy_process_group`` and its gloo threads are
  still running at interpreter exit (what every torchrun run of this project did before the fix);
- ``freed``: the project's own ``distributed_run`` (``textenv.agents.distributed``), which
  imports that module before creating the group, so the group is freed when the run ends.

Launches of the two sides alternate and run ``--parallel`` at a time, so both see the same
load (a loaded machine is where the abort shows: ``terminate called without an active
exception``, the rank killed by SIGABRT, ``torchrun`` exiting non-zero).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ABORT = "terminate called without an active exception"
SIDES = ("leaked", "freed")


def rank_body(side: str) -> None:
    import torch.distributed as tdist

    if side == "leaked":
        tdist.init_process_group("gloo")
        run()
        tdist.barrier()
        tdist.destroy_process_group()
    else:
        from textenv.agents.distributed import distributed_run

        with distributed_run(torch.device("cpu")):
            run()


def run() -> None:
    import importlib

    import torch.distributed as tdist

    importlib.import_module("torch.distributed.nn.functional")
    tdist.all_reduce(torch.ones(3))


def launch(side: str) -> tuple[str, int, bool]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "benchmarks.gloo_teardown",
        "--rank-body",
        side,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return side, proc.returncode, ABORT in proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=120, help="launches per side")
    parser.add_argument("--parallel", type=int, default=3, help="launches running at once")
    parser.add_argument("--out", default="benchmarks/results/gloo_teardown.md")
    parser.add_argument("--rank-body", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_body:
        rank_body(args.rank_body)
        return

    start = time.perf_counter()
    order = [side for _ in range(args.launches) for side in SIDES]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(launch, order))
    minutes = (time.perf_counter() - start) / 60

    rows = []
    for side in SIDES:
        mine = [(code, aborted) for s, code, aborted in results if s == side]
        failed = sum(code != 0 for code, _ in mine)
        aborted = sum(aborted for _, aborted in mine)
        rows.append(
            f"| {side} | {len(mine)} | {failed} ({100 * failed / len(mine):.1f}%) | {aborted} |"
        )
    command = (
        f"python -m benchmarks.gloo_teardown --launches {args.launches} --parallel {args.parallel}"
        + (f" --out {args.out}" if args.out != parser.get_default("out") else "")
    )
    text = "\n".join(
        [
            "# A two-process gloo run's exit: process group leaked vs freed",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}, torch "
            f"{torch.__version__}; {minutes:.1f} min in all. See the script's docstring for the two sides.",
            "",
            '| side | launches | exited non-zero | a rank aborted: "terminate called without an active exception" |',
            "| --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    from textenv.agents.runlog import atomic_write_text

    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
