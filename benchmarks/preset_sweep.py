"""The sweep that chose the fast classic-control presets: candidates × seeds, wall time and eval.

    python -m benchmarks.preset_sweep --env-id CartPole-v1 --grid benchmarks/sweeps/cartpole_1_random.json \
        --seeds 1 2 3 --jobs 2

Each candidate is a set of overrides on the env's preset, from ``--grid FILE``: a JSON object
``{name: overrides}`` (the sweeps behind the presets are in ``benchmarks/sweeps/``). Every (candidate, seed) runs in its own process with
one torch thread, ``--jobs`` at a time, without TensorBoard or checkpoints; it reports the
training loop's wall time and the deterministic evaluation of ``--eval-episodes`` fresh
episodes. A candidate is ranked by how many seeds reach ``--target`` first, then by its
median training time; with ``--target nan`` (tasks without a solved score, e.g. MuJoCo) by its
mean evaluation return. ``--raw FILE`` appends each finished run as a JSON line (a sweep cut
short keeps what finished); ``--runs-dir DIR`` keeps each run's ``metrics.jsonl``. Timings taken two at a time on two cores are for ranking; the chosen
preset's time to solve is then measured alone by ``benchmarks.cartpole_solve``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class SweepConfig:
    """Candidates × seeds for one env id; a markdown table of solved seeds and wall times."""

    env_id: str = "CartPole-v1"
    """env id whose preset the candidates override"""
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """seeds per candidate"""
    jobs: int = 2
    """runs at a time (one torch thread each)"""
    grid: str = ""
    """a JSON file {name: overrides} (required)"""
    only: tuple[str, ...] = ()
    """run only these candidates of the grid"""
    target: float = 500.0
    """mean evaluation return that counts as solved"""
    eval_episodes: int = 10
    """deterministic evaluation episodes after training"""
    out: str | None = None
    """markdown file (default: benchmarks/results/sweep_<env>.md)"""
    raw: str | None = None
    """append each finished run to this JSON-lines file"""
    runs_dir: str | None = None
    """keep each run's directory (metrics.jsonl, no checkpoint) under this directory"""
    worker: str | None = None
    """internal: run one (JSON overrides) and print its result"""
    seed: int = 1
    """internal: the worker's seed"""
    run_name: str | None = None
    """internal: the worker's run directory name"""


def _worker(
    env_id: str,
    overrides: dict,
    seed: int,
    eval_episodes: int,
    runs_dir: str | None = None,
    run_name: str | None = None,
) -> dict:
    import torch

    from textenv.agents.classic import preset_config, train

    torch.set_num_threads(1)
    overrides = dict(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        base = preset_config(env_id)
        if "ppo" in overrides:
            import dataclasses

            overrides["ppo"] = dataclasses.replace(base.ppo, **overrides["ppo"])
        if "hidden_sizes" in overrides:
            overrides["hidden_sizes"] = tuple(overrides["hidden_sizes"])
        config = preset_config(
            env_id,
            seed=seed,
            runs_dir=runs_dir or tmp,
            run_name=run_name,
            progress=False,
            tensorboard=False,
            save_checkpoint=False,
            eval_episodes=eval_episodes,
            device="cpu",
            **overrides,
        )
        summary = train(config)
    return {
        "seed": seed,
        "eval": summary["eval_return_mean"],
        "train_s": summary["wall_time_s"],
        "steps": summary["global_step"],
        "last100": summary["train_return_last100"],
    }


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(SweepConfig, args=argv)
    if args.worker is not None:
        result = _worker(
            args.env_id,
            json.loads(args.worker),
            args.seed,
            args.eval_episodes,
            args.runs_dir,
            args.run_name,
        )
        print(json.dumps(result), flush=True)
        return 0
    try:
        grid = json.loads(Path(args.grid).read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"error: --grid {args.grid!r}: {err}", file=sys.stderr)
        return 2
    if not isinstance(grid, dict) or not all(isinstance(v, dict) for v in grid.values()):
        print(
            f"error: --grid {args.grid!r} must hold a JSON object {{name: overrides}}",
            file=sys.stderr,
        )
        return 2
    if args.only:
        missing = [n for n in args.only if n not in grid]
        if missing:
            print(f"error: no candidate {missing[0]!r}; known: {', '.join(grid)}", file=sys.stderr)
            return 2
        grid = {n: grid[n] for n in args.only}

    def one(item: tuple[str, int]) -> tuple[str, dict]:
        name, seed = item
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.preset_sweep",
            "--env-id",
            args.env_id,
            "--worker",
            json.dumps(grid[name]),
            "--seed",
            str(seed),
            "--eval-episodes",
            str(args.eval_episodes),
        ]
        if args.runs_dir:
            slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            cmd += [
                "--runs-dir",
                str(Path(args.runs_dir).resolve()),
                "--run-name",
                f"{slug}__{seed}",
            ]
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        )
        if proc.returncode != 0:
            return name, {"seed": seed, "error": proc.stderr.strip().splitlines()[-1:]}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if args.raw:
            with open(args.raw, "a") as f:
                f.write(json.dumps({"env_id": args.env_id, "candidate": name, **result}) + "\n")
        print(
            f"{name} seed {seed}: eval {result['eval']:.1f}, train {result['train_s']:.2f} s",
            file=sys.stderr,
            flush=True,
        )
        return name, result

    start = time.perf_counter()
    items = [(name, seed) for name in grid for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, items))
    by_name: dict[str, list[dict]] = {name: [] for name in grid}
    for name, r in results:
        by_name[name].append(r)
    rows = []
    for name, rs in by_name.items():
        ok = [r for r in rs if "error" not in r]
        solved = sum(r["eval"] >= args.target for r in ok)
        train_s = statistics.median(r["train_s"] for r in ok) if ok else float("nan")
        mean_eval = statistics.fmean(r["eval"] for r in ok) if ok else float("-inf")
        # With no solved score, rank by the mean evaluation return.
        rank = -mean_eval if args.target != args.target else -solved
        rows.append((rank, train_s, name, rs, ok))
    rows.sort(key=lambda r: (r[0], r[1]))
    command = "python -m benchmarks.preset_sweep " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f"# Preset sweep: {args.env_id}",
        "",
        f"Command: `{command}`",
        "",
        f"{len(args.seeds)} seeds per candidate, {args.jobs} runs at a time on this machine (one torch thread "
        f"each; times are for ranking), deterministic evaluation on {args.eval_episodes} fresh episodes; "
        + (
            f"solved: mean return ≥ {args.target:g}. "
            if args.target == args.target
            else "ranked by the mean evaluation return. "
        )
        + f"Overrides are on top of the env's preset. Sweep wall time {time.perf_counter() - start:.0f} s.",
        "",
        "| candidate | solved | mean eval | train s (median) | steps | eval returns | overrides |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, train_s, name, rs, ok in rows:
        evals = ", ".join(f"{r['eval']:.0f}" if "error" not in r else "error" for r in rs)
        steps = ok[0]["steps"] if ok else "—"
        solved = (
            f"{sum(r['eval'] >= args.target for r in ok)} of {len(rs)}"
            if args.target == args.target
            else "—"
        )
        mean_eval = f"{statistics.fmean(r['eval'] for r in ok):.1f}" if ok else "—"
        lines.append(
            f"| {name} | {solved} | {mean_eval} | {train_s:.2f} | {steps} | {evals} | "
            f"`{json.dumps(grid[name])}` |"
        )
    out = ROOT / (args.out or f"benchmarks/results/sweep_{args.env_id.split('/')[-1]}.md")
    from textenv.agents.runlog import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
