"""Random-action steps per second: the torch classic-control envs against Gymnasium's own vector envs.

    python -m benchmarks.control_throughput      # writes benchmarks/results/control_throughput.md

Side by side in one process, one thread: ``gym.make_vec("textenv/Torch<id>")`` (state on the
CPU here; ``--device cuda`` where there is one) against ``gym.make_vec(<id>)`` with Gymnasium's
default vectorisation (its numpy ``CartPoleVectorEnv`` for CartPole, ``SyncVectorEnv`` of the
single envs for the others), at 1 to 4096 envs. Each measurement steps both with uniformly random
actions drawn where the env wants them (a tensor on the env's device, a numpy array), after a
warm-up, and keeps the best of ``--repeats`` timings. Steps per second count env steps (one row
stepping once is one step).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import textenv  # noqa: F401  (registers the ids)
from textenv.agents.runlog import atomic_write_text
from textenv.control import TORCH_CONTROL

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ThroughputConfig:
    """Steps/s of each classic-control env, torch vs Gymnasium, over numbers of envs."""

    envs: tuple[str, ...] = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "MountainCar-v0")
    """Gymnasium ids (their torch twins are textenv/Torch<id>)"""
    num_envs: tuple[int, ...] = (1, 16, 256, 4096)
    """batch sizes"""
    steps: int = 20_000
    """env steps per timing (at least 50 batched steps)"""
    repeats: int = 3
    """timings per measurement; the best is kept"""
    device: str = "cpu"
    """where the torch envs keep their state"""
    threads: int = 1
    """torch threads"""
    out: str = "benchmarks/results/control_throughput.md"


def _sampler(envs, torch_side: bool, device: torch.device):
    space = envs.single_action_space
    n = envs.num_envs
    if isinstance(space, gym.spaces.Discrete):
        if torch_side:
            return lambda: torch.randint(space.n, (n,), device=device)
        rng = np.random.default_rng(0)
        return lambda: rng.integers(space.n, size=n)
    low, high = float(space.low[0]), float(space.high[0])
    if torch_side:
        return lambda: torch.rand((n, 1), device=device) * (high - low) + low
    rng = np.random.default_rng(0)
    return lambda: rng.uniform(low, high, size=(n, 1)).astype(np.float32)


def steps_per_second(
    envs, torch_side: bool, device: torch.device, steps: int, repeats: int
) -> float:
    sample = _sampler(envs, torch_side, device)
    envs.reset(seed=0)
    batches = max(50, steps // envs.num_envs)
    for _ in range(10):
        envs.step(sample())
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            envs.step(sample())
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return batches * envs.num_envs / best


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(ThroughputConfig, args=argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    twins = {cls.gym_id: f"textenv/{name}" for name, cls in TORCH_CONTROL.items()}
    unknown = [e for e in args.envs if e not in twins]
    if unknown:
        raise SystemExit(f"error: no torch twin of {unknown[0]!r}; known: {', '.join(twins)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = "python -m benchmarks.control_throughput " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        "# Classic control: torch vector envs vs Gymnasium's, random actions",
        "",
        f"Command: `{command}`",
        "",
        f"{platform.machine()}, {cores} cores, {args.threads} torch thread(s), torch envs on `{args.device}`; "
        f"best of {args.repeats} timings of {args.steps} env steps (at least 50 batched steps). Gymnasium: "
        "`gym.make_vec(id)` with its default vectorisation (CartPole: its numpy `CartPoleVectorEnv`; the others: "
        "`SyncVectorEnv`).",
        "",
        "`rng=numpy` (the default) draws reset states as Gymnasium does, row by row on the host, to replay it "
        "exactly; `rng=torch` draws them on the device.",
        "",
        "| env | num_envs | textenv torch, rng=numpy (steps/s) | textenv torch, rng=torch (steps/s) | "
        "Gymnasium (steps/s) | ratio (rng=torch / Gymnasium) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for env_id in args.envs:
        for n in args.num_envs:
            exact = gym.make_vec(twins[env_id], num_envs=n, device=args.device)
            fast = gym.make_vec(twins[env_id], num_envs=n, device=args.device, rng="torch")
            theirs = gym.make_vec(env_id, num_envs=n)
            a = steps_per_second(exact, True, device, args.steps, args.repeats)
            f = steps_per_second(fast, True, device, args.steps, args.repeats)
            b = steps_per_second(theirs, False, device, args.steps, args.repeats)
            theirs.close()
            lines.append(f"| {env_id} | {n} | {a:,.0f} | {f:,.0f} | {b:,.0f} | {f / b:.2f}× |")
            print(lines[-1], file=sys.stderr, flush=True)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
