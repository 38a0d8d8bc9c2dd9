"""This project's PPO and Stable-Baselines3's PPO side by side, same hyperparameters and seeds.

    python -m benchmarks.classic --envs CartPole-v1 Acrobot-v1 --seeds 1 2 3 --jobs 1
    python -m benchmarks.classic --report-only        # rebuild table + plot from raw results

Every (library, env, seed) run is one worker process pinned to one torch thread; its result
(curve, last-100 training return, deterministic eval, wall time, SPS) lands in
``<out-dir>/raw/`` as soon as it finishes, so an interrupted benchmark keeps what it did.
The report is ``<out-dir>/classic.md`` and ``<out-dir>/classic.png``.

Hyperparameters: CartPole-v1 and Acrobot-v1 use CleanRL's ppo.py (4 envs x 128 steps,
500k steps), Pendulum-v1 this project's preset, MuJoCo v5 CleanRL's
ppo_continuous_action.py (1M steps). Both libraries get the same: batch, minibatch size,
epochs, lr and its linear annealing, γ, λ, clip range for policy and value, entropy and
value coefficients, gradient clip, Adam ε=1e-5, 64x64 tanh nets with orthogonal init, and
for MuJoCo observation/reward normalisation with clipping at 10.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# CleanRL's published PPO numbers (mean ± std over 3 seeds of the last-100 training return).
CLEANRL = {
    "CartPole-v1": "490 ± 6 (500k)",
    "Acrobot-v1": "−86 ± 1 (500k)",
    "HalfCheetah-v5": "1443 ± 46 (v4, 1M)",
    "Hopper-v5": "2383 ± 272 (v4, 1M)",
    "Walker2d-v5": "2288 ± 572 (v4, 1M)",
}
BUDGET = {"CartPole-v1": 500_000, "Acrobot-v1": 500_000, "Pendulum-v1": 200_000}


@dataclass
class BenchConfig:
    """Benchmark this project's PPO against Stable-Baselines3 PPO."""

    envs: tuple[str, ...] = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "HalfCheetah-v5", "Hopper-v5")
    """env ids to run"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds, the same for both libraries"""
    libs: tuple[str, ...] = ("textenv-ppo", "sb3")
    """which sides to run"""
    jobs: int = 1
    """worker processes at once (1 for timing on a small machine)"""
    steps_scale: float = 1.0
    """multiply every step budget (0.01 for a smoke test)"""
    out_dir: str = "benchmarks/results"
    """where raw results, the table and the plot go"""
    report_only: bool = False
    """skip running; rebuild the report from raw results"""
    skip_existing: bool = False
    """skip (library, env, seed) runs whose raw result already exists"""


def train_config(env_id: str, seed: int, steps_scale: float):
    from agents.classic import CLEANRL_DISCRETE, preset_config

    extra = CLEANRL_DISCRETE if env_id in ("CartPole-v1", "Acrobot-v1") else {}
    config = preset_config(env_id, seed=seed, **extra, device="cpu", progress=False, tensorboard=False,
                           save_checkpoint=False, eval_episodes=10)
    total = BUDGET.get(env_id, config.total_timesteps) * steps_scale
    # A whole number of rollouts, so both libraries take exactly the same number of steps.
    total = max(1, round(total / config.batch_size)) * config.batch_size
    return dataclasses.replace(config, total_timesteps=total)


def run_ours(env_id: str, seed: int, steps_scale: float, out_dir: str) -> dict[str, Any]:
    from agents.classic import train

    # Run directories (TensorBoard files and all) stay out of the repo; raw/ keeps the curve.
    runs_dir = Path(tempfile.gettempdir()) / "textenv-ppo-bench-runs"
    config = dataclasses.replace(train_config(env_id, seed, steps_scale), runs_dir=str(runs_dir),
                                 run_name=f"textenv-ppo__{env_id}__{seed}")
    import shutil

    shutil.rmtree(Path(config.runs_dir) / config.run_name, ignore_errors=True)
    summary = train(config)
    curve = []
    with open(Path(summary["run_dir"]) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if "episodic_return" in row:
                curve.append((row["global_step"], row["episodic_return"], row["episodes"]))
    return {"wall_time_s": summary["wall_time_s"], "sps": summary["sps"], "global_step": summary["global_step"],
            "train_return_last100": summary["train_return_last100"], "eval_return_mean": summary["eval_return_mean"],
            "eval_return_std": summary["eval_return_std"], "curve": curve}


def run_sb3(env_id: str, seed: int, steps_scale: float, out_dir: str) -> dict[str, Any]:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    config = train_config(env_id, seed, steps_scale)
    envs = make_vec_env(env_id, n_envs=config.num_envs, seed=seed)
    if config.normalize_obs or config.normalize_reward:
        envs = VecNormalize(envs, norm_obs=config.normalize_obs, norm_reward=config.normalize_reward,
                            clip_obs=config.clip_obs, clip_reward=config.clip_reward, gamma=config.gamma)
    p = config.ppo
    lr = (lambda frac: frac * config.learning_rate) if config.anneal_lr else config.learning_rate
    model = PPO(
        "MlpPolicy", envs, learning_rate=lr, n_steps=config.num_steps,
        batch_size=config.batch_size // p.num_minibatches, n_epochs=p.update_epochs, gamma=config.gamma,
        gae_lambda=config.gae_lambda, clip_range=p.clip_coef,
        clip_range_vf=(p.vf_clip_coef or p.clip_coef) if p.clip_vloss else None, normalize_advantage=p.norm_adv,
        ent_coef=p.ent_coef, vf_coef=p.vf_coef, max_grad_norm=p.max_grad_norm, target_kl=p.target_kl,
        policy_kwargs=dict(net_arch=dict(pi=list(config.hidden_sizes), vf=list(config.hidden_sizes)),
                           activation_fn=torch.nn.Tanh, ortho_init=True, log_std_init=config.log_std_init),
        seed=seed, device="cpu", verbose=0,
    )
    rollout = config.batch_size
    returns: list[tuple[int, float]] = []

    class EpisodeCurve(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    returns.append((self.num_timesteps, float(info["episode"]["r"])))
            return True

    start = time.perf_counter()
    model.learn(total_timesteps=config.total_timesteps, callback=EpisodeCurve())
    wall = time.perf_counter() - start
    # Bin episode returns by iteration, as this project logs them.
    curve = []
    for it_end in range(rollout, model.num_timesteps + 1, rollout):
        rs = [r for s, r in returns if it_end - rollout < s <= it_end]
        if rs:
            curve.append((it_end, float(np.mean(rs)), len(rs)))
    eval_env = make_vec_env(env_id, n_envs=1, seed=seed + 10_000)
    if isinstance(envs, VecNormalize):
        eval_env = VecNormalize(eval_env, norm_obs=config.normalize_obs, norm_reward=False,
                                clip_obs=config.clip_obs, training=False)
        eval_env.obs_rms = envs.obs_rms
    ep_returns, _ = evaluate_policy(model, eval_env, n_eval_episodes=config.eval_episodes, deterministic=True,
                                    return_episode_rewards=True)
    last100 = [r for _, r in returns[-100:]]
    return {"wall_time_s": wall, "sps": model.num_timesteps / wall, "global_step": model.num_timesteps,
            "train_return_last100": float(np.mean(last100)) if last100 else None,
            "eval_return_mean": float(np.mean(ep_returns)), "eval_return_std": float(np.std(ep_returns)),
            "curve": curve}


def worker(lib: str, env_id: str, seed: int, steps_scale: float, out_dir: str) -> str:
    import torch

    torch.set_num_threads(1)
    fn = run_ours if lib == "textenv-ppo" else run_sb3
    result = fn(env_id, seed, steps_scale, out_dir)
    result |= {"lib": lib, "env_id": env_id, "seed": seed, "steps_scale": steps_scale}
    from agents.runlog import atomic_write_json

    path = Path(out_dir) / "raw" / f"{lib}__{env_id}__{seed}.json"
    atomic_write_json(path, result)
    return str(path)


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def report(out_dir: Path, command: str) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((out_dir / "raw").glob("*.json"))]
    if not rows:
        raise SystemExit(f"error: no raw results under {out_dir / 'raw'}")
    envs = list(dict.fromkeys(r["env_id"] for r in rows))
    libs = list(dict.fromkeys(sorted(r["lib"] for r in rows)))[::-1]
    lines = [
        "# PPO: this project vs Stable-Baselines3, side by side",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; "
        "one worker process per run, one torch thread each, CPU only.",
        "",
        "Returns: *last 100* is the mean undiscounted training return of the last 100 episodes "
        "(CleanRL's statistic); *eval* is 10 deterministic episodes on fresh envs after training. "
        "Each cell is mean ± std over seeds.",
        "",
        "| env | library | seeds | steps | last 100 | eval | SPS | wall time (s) | CleanRL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for env in envs:
        for lib in libs:
            rs = [r for r in rows if r["env_id"] == env and r["lib"] == lib]
            if not rs:
                continue
            lines.append(
                f"| {env} | {lib} | {len(rs)} | {rs[0]['global_step']:,} | {_fmt([r['train_return_last100'] for r in rs])} "
                f"| {_fmt([r['eval_return_mean'] for r in rs])} | {np.mean([r['sps'] for r in rs]):,.0f} "
                f"| {np.mean([r['wall_time_s'] for r in rs]):.1f} | {CLEANRL.get(env, '–') if lib == libs[0] else ''} |"
            )
    (out_dir / "classic.md").write_text("\n".join(lines) + "\n")
    plot(rows, envs, libs, out_dir / "classic.png")
    print("\n".join(lines))


def plot(rows: list[dict], envs: list[str], libs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 3.4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for lib in libs:
            curves = [r["curve"] for r in rows if r["env_id"] == env and r["lib"] == lib and r["curve"]]
            if not curves:
                continue
            end = min(c[-1][0] for c in curves)
            grid = np.linspace(0, end, 100)
            # Smooth each seed's per-iteration means over a window of ~2% of training, then average.
            ys = []
            for c in curves:
                steps = np.array([s for s, _, _ in c], dtype=float)
                vals = np.array([v for _, v, _ in c], dtype=float)
                k = max(1, len(vals) // 50)
                # Edge-corrected moving average: divide by how many points each window really holds.
                window = np.ones(k)
                smooth = np.convolve(vals, window, mode="same") / np.convolve(np.ones_like(vals), window, mode="same")
                ys.append(np.interp(grid, steps, smooth))
            ys = np.stack(ys)
            ax.plot(grid, ys.mean(0), label=f"{lib} ({len(curves)} seeds)")
            ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2)
        ax.set_title(env)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("episodic return (training)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(BenchConfig, args=argv)
    out_dir = Path(args.out_dir)
    command = "python -m benchmarks.classic " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.report_only:
        (out_dir / "raw").mkdir(parents=True, exist_ok=True)
        tasks = [(lib, env, seed) for env in args.envs for seed in args.seeds for lib in args.libs]
        if args.skip_existing:
            tasks = [t for t in tasks if not (out_dir / "raw" / f"{t[0]}__{t[1]}__{t[2]}.json").exists()]
        # Longest first so the pool's tail is short.
        tasks.sort(key=lambda t: (t[1] not in BUDGET, t[0] == "sb3"), reverse=True)
        with ProcessPoolExecutor(max_workers=args.jobs, max_tasks_per_child=1) as pool:
            futures = {pool.submit(worker, lib, env, seed, args.steps_scale, str(out_dir)): (lib, env, seed)
                       for lib, env, seed in tasks}
            for fut in as_completed(futures):
                print(f"done {futures[fut]} -> {fut.result()}", flush=True)
    report(out_dir, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
