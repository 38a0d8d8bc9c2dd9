"""This project's PPO against Stable-Baselines3's, each at its best, side by side.

    python -m benchmarks.classic --envs CartPole-v1 Acrobot-v1 Pendulum-v1 --seeds 1 2 3 --jobs 2
    python -m benchmarks.classic --report-only        # rebuild table + plot from raw results

Sides (``--libs``):

- ``textenv-ppo``: this project's tuned preset for the env (``textenv.agents.classic.PRESETS``), at
  the preset's budget.
- ``textenv-cleanrl``: this project with CleanRL's defaults for the env's action type
  (``--preset cleanrl``: ``ppo.py`` 500k steps, ``ppo_continuous_action.py`` 1M steps).
- ``sb3-zoo``: SB3's PPO with rl-baselines3-zoo's tuned hyperparameters for the env
  (``hyperparams/ppo.yml``: n_envs, n_steps, batch size, epochs, γ, λ, lr and clip schedules,
  ``normalize`` as VecNormalize, gSDE on Pendulum, the MuJoCo policy_kwargs), at the zoo's budget.
- ``sb3-default``: SB3's PPO with its own defaults (``PPO("MlpPolicy", env)``, one env), at
  the zoo's budget.

No option is translated between libraries (SB3's ``clip_range_vf`` clips differently from the
PPO paper's value clipping; neither side is asked to imitate the other). Every (side, env,
seed) run is one worker process pinned to one torch thread; its result (curve, last-100
training return, deterministic eval on 10 fresh episodes, wall time, SPS) lands in
``<out-dir>/raw/`` as soon as it finishes. The report is ``<out-dir>/classic.md`` and ``.png``.
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
# rl-baselines3-zoo's tuned PPO (hyperparams/ppo.yml; the MuJoCo entries are its v3 ones).
# "lin_x" is a linear schedule from x to 0; "normalize" is VecNormalize with the zoo's defaults.
_ZOO_MUJOCO_POLICY = dict(
    log_std_init=-2,
    ortho_init=False,
    activation_fn="relu",
    net_arch=dict(pi=[256, 256], vf=[256, 256]),
)
ZOO: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(
        n_envs=8,
        n_timesteps=100_000,
        n_steps=32,
        batch_size=256,
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=20,
        ent_coef=0.0,
        learning_rate="lin_0.001",
        clip_range="lin_0.2",
    ),
    "Acrobot-v1": dict(
        normalize=True,
        n_envs=16,
        n_timesteps=1_000_000,
        n_steps=256,
        gae_lambda=0.94,
        gamma=0.99,
        n_epochs=4,
        ent_coef=0.0,
    ),
    "Pendulum-v1": dict(
        n_envs=4,
        n_timesteps=100_000,
        n_steps=1024,
        gae_lambda=0.95,
        gamma=0.9,
        n_epochs=10,
        ent_coef=0.0,
        learning_rate=1e-3,
        clip_range=0.2,
        use_sde=True,
        sde_sample_freq=4,
    ),
    "HalfCheetah-v5": dict(
        normalize=True,
        n_envs=1,
        n_timesteps=1_000_000,
        batch_size=64,
        n_steps=512,
        gamma=0.98,
        learning_rate=2.0633e-05,
        ent_coef=0.000401762,
        clip_range=0.1,
        n_epochs=20,
        gae_lambda=0.92,
        max_grad_norm=0.8,
        vf_coef=0.58096,
        policy_kwargs=_ZOO_MUJOCO_POLICY,
    ),
    "Hopper-v5": dict(
        normalize=True,
        n_envs=1,
        n_timesteps=1_000_000,
        batch_size=32,
        n_steps=512,
        gamma=0.999,
        learning_rate=9.80828e-05,
        ent_coef=0.00229519,
        clip_range=0.2,
        n_epochs=5,
        gae_lambda=0.99,
        max_grad_norm=0.7,
        vf_coef=0.835671,
        policy_kwargs=_ZOO_MUJOCO_POLICY,
    ),
    "Walker2d-v5": dict(
        normalize=True,
        n_envs=1,
        n_timesteps=1_000_000,
        batch_size=32,
        n_steps=512,
        gamma=0.99,
        learning_rate=5.05041e-05,
        ent_coef=0.000585045,
        clip_range=0.1,
        n_epochs=20,
        gae_lambda=0.95,
        max_grad_norm=1,
        vf_coef=0.871923,
    ),
}
LIBS = ("textenv-ppo", "textenv-cleanrl", "sb3-zoo", "sb3-default")


@dataclass
class BenchConfig:
    """Benchmark this project's PPO against Stable-Baselines3 PPO."""

    envs: tuple[str, ...] = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1")
    """env ids to run (each needs a preset and a zoo entry)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds, the same for every side"""
    libs: tuple[str, ...] = LIBS
    """which sides to run: textenv-ppo, textenv-cleanrl, sb3-zoo, sb3-default"""
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
    note: str = ""
    """a paragraph printed under the command (say which raw results came from earlier runs)"""


def train_config(env_id: str, seed: int, steps_scale: float, preset: str = "tuned"):
    """This project's preset for ``env_id``, its budget scaled to a whole number of rollouts."""
    from textenv.agents.classic import preset_config

    config = preset_config(
        env_id,
        preset,
        seed=seed,
        device="cpu",
        progress=False,
        tensorboard=False,
        save_checkpoint=False,
        eval_episodes=10,
    )
    total = (
        max(1, round(config.total_timesteps * steps_scale / config.batch_size)) * config.batch_size
    )
    return dataclasses.replace(config, total_timesteps=total)


def run_ours(
    env_id: str, seed: int, steps_scale: float, out_dir: str, lib: str = "textenv-ppo"
) -> dict[str, Any]:
    from textenv.agents.classic import train

    # Run directories (TensorBoard files and all) stay out of the repo; raw/ keeps the curve.
    runs_dir = Path(tempfile.gettempdir()) / "textenv-ppo-bench-runs"
    preset = "cleanrl" if lib == "textenv-cleanrl" else "tuned"
    config = dataclasses.replace(
        train_config(env_id, seed, steps_scale, preset),
        runs_dir=str(runs_dir),
        run_name=f"{lib}__{env_id}__{seed}",
    )
    import shutil

    shutil.rmtree(Path(config.runs_dir) / config.run_name, ignore_errors=True)
    summary = train(config)
    curve = []
    with open(Path(summary["run_dir"]) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if "episodic_return" in row:
                curve.append((row["global_step"], row["episodic_return"], row["episodes"]))
    return {
        "wall_time_s": summary["wall_time_s"],
        "sps": summary["sps"],
        "global_step": summary["global_step"],
        "train_return_last100": summary["train_return_last100"],
        "eval_return_mean": summary["eval_return_mean"],
        "eval_return_std": summary["eval_return_std"],
        "curve": curve,
    }


def _schedule(value: float | str):
    """A zoo hyperparameter: a number, or "lin_x" (linear from x to 0 over training)."""
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value[4:])
        return lambda progress_remaining: progress_remaining * start
    return value


def sb3_settings(lib: str, env_id: str) -> tuple[dict[str, Any], int, bool, int]:
    """``(PPO kwargs, n_envs, normalize, budget)`` of an SB3 side for ``env_id``."""
    if env_id not in ZOO:
        raise SystemExit(f"error: no rl-baselines3-zoo entry for {env_id}; known: {', '.join(ZOO)}")
    zoo = dict(ZOO[env_id])
    budget, n_envs, normalize = (
        zoo.pop("n_timesteps"),
        zoo.pop("n_envs", 1),
        zoo.pop("normalize", False),
    )
    if lib == "sb3-default":
        return {}, 1, False, budget
    kwargs = {k: _schedule(v) for k, v in zoo.items()}
    if "policy_kwargs" in kwargs:
        import torch

        pk = dict(kwargs["policy_kwargs"])
        pk["activation_fn"] = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[pk["activation_fn"]]
        kwargs["policy_kwargs"] = pk
    return kwargs, n_envs, normalize, budget


def run_sb3(lib: str, env_id: str, seed: int, steps_scale: float) -> dict[str, Any]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    kwargs, n_envs, normalize, budget = sb3_settings(lib, env_id)
    envs = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    if normalize:  # the zoo's VecNormalize: its defaults, with the run's γ
        envs = VecNormalize(envs, gamma=kwargs.get("gamma", 0.99))
    model = PPO("MlpPolicy", envs, seed=seed, device="cpu", verbose=0, **kwargs)
    rollout = model.n_steps * n_envs
    total = max(1, round(budget * steps_scale / rollout)) * rollout
    returns: list[tuple[int, float]] = []

    class EpisodeCurve(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    returns.append((self.num_timesteps, float(info["episode"]["r"])))
            return True

    start = time.perf_counter()
    model.learn(total_timesteps=total, callback=EpisodeCurve())
    wall = time.perf_counter() - start
    curve = []
    for it_end in range(
        rollout, model.num_timesteps + 1, rollout
    ):  # episode returns binned by rollout
        rs = [r for s, r in returns if it_end - rollout < s <= it_end]
        if rs:
            curve.append((it_end, float(np.mean(rs)), len(rs)))
    eval_env = make_vec_env(env_id, n_envs=1, seed=seed + 10_000)
    if isinstance(envs, VecNormalize):
        eval_env = VecNormalize(eval_env, norm_reward=False, training=False)
        eval_env.obs_rms = envs.obs_rms
    ep_returns, _ = evaluate_policy(
        model, eval_env, n_eval_episodes=10, deterministic=True, return_episode_rewards=True
    )
    last100 = [r for _, r in returns[-100:]]
    return {
        "wall_time_s": wall,
        "sps": model.num_timesteps / wall,
        "global_step": model.num_timesteps,
        "train_return_last100": float(np.mean(last100)) if last100 else None,
        "eval_return_mean": float(np.mean(ep_returns)),
        "eval_return_std": float(np.std(ep_returns)),
        "curve": curve,
    }


def worker(lib: str, env_id: str, seed: int, steps_scale: float, out_dir: str) -> str:
    import torch

    torch.set_num_threads(1)
    if lib in ("textenv-ppo", "textenv-cleanrl"):
        result = run_ours(env_id, seed, steps_scale, out_dir, lib)
    elif lib in ("sb3-zoo", "sb3-default"):
        result = run_sb3(lib, env_id, seed, steps_scale)
    else:
        raise SystemExit(f"error: unknown side {lib!r}; known: {', '.join(LIBS)}")
    result |= {"lib": lib, "env_id": env_id, "seed": seed, "steps_scale": steps_scale}
    from textenv.agents.runlog import atomic_write_json

    path = Path(out_dir) / "raw" / f"{lib}__{env_id}__{seed}.json"
    atomic_write_json(path, result)
    return str(path)


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def report(out_dir: Path, command: str, note: str = "") -> None:
    rows = [json.loads(p.read_text()) for p in sorted((out_dir / "raw").glob("*.json"))]
    if not rows:
        raise SystemExit(f"error: no raw results under {out_dir / 'raw'}")
    envs = list(dict.fromkeys(r["env_id"] for r in rows))
    found = {r["lib"] for r in rows}
    libs = [lib for lib in LIBS if lib in found] + sorted(found - set(LIBS))
    lines = [
        "# PPO: this project vs Stable-Baselines3, each at its best, side by side",
        "",
        f"Command: `{command}`",
        "",
        *([note, ""] if note else []),
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; "
        "one worker process per run, one torch thread each, CPU only.",
        "",
        "Sides: *textenv-ppo* is this project's preset for the env at its own budget; "
        + (
            "*textenv-cleanrl* is this project with CleanRL's defaults (`--preset cleanrl`; on MuJoCo the "
            "earlier preset); "
            if "textenv-cleanrl" in found
            else ""
        )
        + "*sb3-zoo* is "
        "Stable-Baselines3 with rl-baselines3-zoo's tuned hyperparameters at the zoo's budget; "
        "*sb3-default* is Stable-Baselines3's own defaults at the zoo's budget. "
        + (
            "*sb3-same-hparams* (MuJoCo, an earlier run) gave SB3 this project's hyperparameters, "
            "including `clip_range_vf`, which SB3 applies differently; it is kept for reference only. "
            if "sb3-same-hparams" in found
            else ""
        )
        + "Returns: *last 100* is the mean undiscounted training return of the last 100 episodes "
        "(CleanRL's statistic); *eval* is 10 deterministic episodes on fresh envs after training. "
        "Each cell is mean ± std over seeds; wall time is training alone (imports and evaluation excluded).",
        "",
        "| env | side | seeds | steps | last 100 | eval | SPS | wall time (s) | CleanRL ppo.py, published |",
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
    from textenv.agents.runlog import atomic_write_text

    atomic_write_text(out_dir / "classic.md", "\n".join(lines) + "\n")
    plot(rows, envs, libs, out_dir / "classic.png")
    print("\n".join(lines))


def plot(rows: list[dict], envs: list[str], libs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 3.4), squeeze=False)
    colors = {lib: f"C{i}" for i, lib in enumerate(libs)}  # one colour per side in every panel
    for ax, env in zip(axes[0], envs):
        for lib in libs:
            curves = [
                r["curve"] for r in rows if r["env_id"] == env and r["lib"] == lib and r["curve"]
            ]
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
                smooth = np.convolve(vals, window, mode="same") / np.convolve(
                    np.ones_like(vals), window, mode="same"
                )
                ys.append(np.interp(grid, steps, smooth))
            ys = np.stack(ys)
            ax.plot(grid, ys.mean(0), label=f"{lib} ({len(curves)} seeds)", color=colors[lib])
            ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2, color=colors[lib])
        ax.set_title(env)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("episodic return (training)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(BenchConfig, args=argv)
    out_dir = Path(args.out_dir)
    shown = list(sys.argv[1:] if argv is None else argv)
    if "--note" in shown:  # the note is printed on its own line
        i = shown.index("--note")
        del shown[i : i + 2]
    command = "python -m benchmarks.classic " + " ".join(shown)
    if not args.report_only:
        (out_dir / "raw").mkdir(parents=True, exist_ok=True)
        tasks = [(lib, env, seed) for env in args.envs for seed in args.seeds for lib in args.libs]
        if args.skip_existing:
            tasks = [
                t for t in tasks if not (out_dir / "raw" / f"{t[0]}__{t[1]}__{t[2]}.json").exists()
            ]
        # Longest first so the pool's tail is short.
        tasks.sort(
            key=lambda t: (t[0] == "sb3-default", ZOO.get(t[1], {}).get("n_timesteps", 0)),
            reverse=True,
        )
        with ProcessPoolExecutor(max_workers=args.jobs, max_tasks_per_child=1) as pool:
            futures = {
                pool.submit(worker, lib, env, seed, args.steps_scale, str(out_dir)): (
                    lib,
                    env,
                    seed,
                )
                for lib, env, seed in tasks
            }
            for fut in as_completed(futures):
                print(f"done {futures[fut]} -> {fut.result()}", flush=True)
    report(out_dir, command, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
