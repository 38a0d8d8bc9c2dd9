"""Crash consistency: kill a text run and a classic run with SIGKILL at random moments, resume
each time, and check what a user relies on.

For each trainer: one uninterrupted reference run, then one run that is killed ``--kills``
times (each kill a random moment after the run's loop has logged its first new iteration, so
kills land in rollouts, updates and checkpoint writes) and resumed with ``--resume`` after
each, then run to its end. Checked:

- every resume loads and continues (no error, a new iteration logged);
- ``metrics.jsonl`` holds iterations 1..N once each, in order (no gap, no duplicate);
- the text run's final weights and value head equal the reference's bit for bit, and so do its
  logged losses, KLs and scores (checkpoints every iteration hold every RNG state). The classic
  trainer does not restore episodes in progress (its envs start new ones), so its resumed runs
  are not the reference run; only the first two checks apply to it.

    python -m benchmarks.crash_consistency --kills 20
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from textenv.agents.runlog import atomic_write_text

TIMING = {"wall_time_s", "rollout_s", "recompute_s", "update_s", "tokens_per_s", "sps"}
TIMING |= {"rollout_tokens_per_s"}


@dataclass
class Args:
    kills: int = 20
    """SIGKILLs per trainer"""
    seed: int = 0
    """seed of the kill moments"""
    max_delay_s: float = 1.5
    """a kill comes uniformly within this many seconds after a session logs its first iteration"""
    output: str = "benchmarks/results/crash_consistency.md"
    """result file (markdown)"""


@dataclass
class Trainer:
    name: str
    module: str
    args: list[str]
    state_files: list[str]  # compared with the reference bit for bit ([] : not deterministic)
    tmp_names: tuple[str, ...] = (".policy.tmp", ".checkpoint.safetensors.")
    kills: list[dict] = field(default_factory=list)


TRAINERS = [
    Trainer(
        "text (Toy, tiny model)",
        "scripts.train_text",
        [
            "--task",
            "Toy",
            "--model",
            "tiny",
            "--iterations",
            "160",
            "--num-envs",
            "8",
            "--max-new-tokens",
            "6",
            "--learning-rate",
            "1e-3",
            "--kl-coef",
            "0.05",
            "--checkpoint-every",
            "1",
            "--eval-samples",
            "0",
            "--no-progress",
            "--torch-threads",
            "1",
        ],
        ["policy/model.safetensors", "policy/value_head.safetensors"],
    ),
    Trainer(
        "classic (CartPole-v1)",
        "scripts.train",
        [
            "--env-id",
            "CartPole-v1",
            "--total-timesteps",
            "409600",
            "--checkpoint-every",
            "1",
            "--eval-episodes",
            "0",
            "--no-progress",
            "--torch-threads",
            "1",
        ],
        [],
    ),
]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def launch(trainer: Trainer, runs: Path, name: str, resume: bool) -> subprocess.Popen:
    if resume:
        args = ["--resume", str(runs / name)]
    else:
        args = [*trainer.args, "--runs-dir", str(runs), "--run-name", name]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", trainer.module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run_with_kills(
    trainer: Trainer, runs: Path, rng: random.Random, args: Args
) -> tuple[bool, str]:
    """Kill and resume ``args.kills`` times, then finish; whether every resume loaded."""
    run_dir = runs / "killed"
    for k in range(args.kills + 1):
        before = len(metrics(run_dir))
        proc = launch(trainer, runs, "killed", resume=k > 0)
        if k == args.kills:  # the last session runs to the end
            out, err = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                return False, f"the final session failed (exit {proc.returncode}): {err[-300:]}"
            return True, out.strip().splitlines()[-1]
        while proc.poll() is None and len(metrics(run_dir)) <= before:
            time.sleep(0.02)
        if proc.poll() is not None:
            _, err = proc.communicate()
            return (
                False,
                f"session {k} ended before its kill (exit {proc.returncode}): {err[-300:]}",
            )
        time.sleep(rng.uniform(0.0, args.max_delay_s))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        rows = metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        writing = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(trainer.tmp_names))
        trainer.kills.append(
            {
                "session": k,
                "logged": len(rows) - before,
                "last_iteration": rows[-1]["iteration"] if rows else 0,
                "checkpoint_write_cut": bool(writing),
            }
        )
    raise AssertionError("unreachable")


def check(trainer: Trainer, runs: Path) -> dict:
    ref, killed = metrics(runs / "reference"), metrics(runs / "killed")
    iterations = [r["iteration"] for r in killed]
    result = {"iterations_once_in_order": iterations == list(range(1, len(ref) + 1))}
    if trainer.state_files:
        strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
        result["metrics_equal_reference"] = strip(killed) == strip(ref)
        result["weights_equal_reference"] = all(
            (runs / "killed" / f).read_bytes() == (runs / "reference" / f).read_bytes()
            for f in trainer.state_files
        )
    return result


def main(args: Args) -> None:
    rng = random.Random(args.seed)
    sections = []
    for trainer in TRAINERS:
        with tempfile.TemporaryDirectory() as tmp:
            runs = Path(tmp)
            ref = launch(trainer, runs, "reference", resume=False)
            _, err = ref.communicate(timeout=3600)
            assert ref.returncode == 0, err[-2000:]
            started = time.perf_counter()
            ok, last = run_with_kills(trainer, runs, rng, args)
            result = check(trainer, runs) | {"every_resume_loaded": ok}
            seconds = time.perf_counter() - started
        print(trainer.name, result, file=sys.stderr)
        sections.append(section(trainer, result, ok, last, seconds))
    command = f"python -m benchmarks.crash_consistency --kills {args.kills} --seed {args.seed}"
    text = "\n".join(
        [
            "# Crash consistency: SIGKILL at random moments, then --resume",
            "",
            f"Command: `{command}` (2-core CPU; {time.strftime('%Y-%m-%d')}).",
            "",
            "Each trainer: an uninterrupted reference run, and a run killed with SIGKILL "
            f"{args.kills} times (a random moment within {args.max_delay_s} s after each session "
            "logged its first iteration) and resumed after each kill, then run to its end. "
            "Checkpoints every iteration.",
            "",
            *sections,
        ]
    )
    atomic_write_text(args.output, text + "\n")


def section(trainer: Trainer, result: dict, ok: bool, last: str, seconds: float) -> str:
    cut = sum(k["checkpoint_write_cut"] for k in trainer.kills)
    rows = [f"## {trainer.name}", "", "| check | result |", "| --- | --- |"]
    rows.append(f"| kills | {len(trainer.kills)} ({cut} cut a checkpoint write) |")
    rows += [f"| {k.replace('_', ' ')} | {'yes' if v else '**no**'} |" for k, v in result.items()]
    if not trainer.state_files:
        rows.append("| weights equal reference | not checked: resumed episodes start anew |")
    rows += ["", f"Kill-and-resume run: {seconds:.0f} s. The final session's summary: `{last}`."]
    rows += [
        "",
        "Iterations logged by each killed session before its kill: "
        + ", ".join(str(k["logged"]) for k in trainer.kills)
        + ".",
        "",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main(tyro.cli(Args))
