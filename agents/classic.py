"""PPO on classic-control and MuJoCo tasks: rollout, GAE, the shared PPO update, logging.

The loop reads in the paper's order (CleanRL-style): collect ``num_steps`` transitions from
``num_envs`` vector envs, compute GAE, run :func:`textenv.agents.ppo.ppo_update`, log. Every PPO
implementation detail is a visible line or a field of :class:`TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from textenv.agents.checkpoint import pack_training_state, unpack_training_state
from textenv.agents.device import resolve_device
from textenv.agents.distributed import Dist, distributed_run, sync_running_stats
from textenv.agents.envs import (
    Vectorization,
    env_spec,
    is_device_env,
    load_normalization_state,
    make_vector_env,
    normalization_state,
)
from textenv.agents.policies import MLPActorCritic
from textenv.agents.ppo import (
    PPOConfig,
    check_finite_settings,
    explained_variance,
    ppo_update,
    validate_rates,
)
from textenv.agents.rollout_classic import RolloutCollector
from textenv.agents.runlog import check_writable_dir
from textenv.agents.training import (
    LinearLR,
    TrainingRun,
    resumed_world_note,
    seed_everything,
    summary_line,
)

__all__ = [
    "PRESETS",
    "TrainConfig",
    "evaluate_policy",
    "load_checkpoint",
    "load_run_config",
    "preset_config",
    "seed_everything",
    "summary_line",
    "train",
]


@dataclass
class TrainConfig:
    """PPO on a Gymnasium task (classic control or MuJoCo)."""

    env_id: str = "CartPole-v1"
    """Gymnasium env id"""
    total_timesteps: int = 98_304
    """environment steps to train for (summed over the vector envs)"""
    seed: int = 1
    """seed of the envs, torch and numpy"""
    num_envs: int = 128
    """parallel environments"""
    num_steps: int = 16
    """steps per env per rollout; the batch is num_envs * num_steps"""
    learning_rate: float = 3e-3
    """Adam learning rate"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over training"""
    adam_eps: float = 1e-5
    """Adam epsilon (PPO's reference code uses 1e-5, not torch's 1e-8)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.9
    """λ of GAE"""
    ppo: PPOConfig = field(
        default_factory=lambda: PPOConfig(
            update_epochs=6, num_minibatches=4, ent_coef=0.0, clip_vloss=False
        )
    )
    """the PPO update's hyperparameters"""
    normalize_obs: bool = False
    """normalise observations by a running mean/std (continuous control)"""
    normalize_reward: bool = False
    """scale rewards by the running std of the discounted return (continuous control)"""
    clip_obs: float = 10.0
    """clip normalised observations to [-clip_obs, clip_obs]"""
    clip_reward: float = 10.0
    """clip scaled rewards to [-clip_reward, clip_reward]"""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """hidden layer widths of the actor and of the critic"""
    activation: Literal["tanh", "relu"] = "tanh"
    """hidden-layer activation of the actor and of the critic"""
    ortho_init: bool = True
    """orthogonal init (CleanRL; off: PyTorch's default init, the zoo's `ortho_init: False`)"""
    log_std_init: float = 0.0
    """initial log-std of the Gaussian policy (Box actions)"""
    use_sde: bool = False
    """gSDE (Box actions): exploration noise linear in the actor's last hidden features, its matrix
    held between draws (SB3's use_sde; the zoo's Pendulum setting)"""
    sde_sample_freq: int = -1
    """gSDE: draw new noise matrices every this many steps (-1: once per rollout, at its start)"""
    vectorization: Vectorization = "auto"
    """auto: the env's own vectorised implementation if it has one, else sync"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    torch_threads: int = 1
    """torch CPU threads; small MLPs run fastest on one"""
    run_name: str | None = None
    """name of the run directory (default: <env_id>__<seed>__<unix time>)"""
    runs_dir: str = "runs"
    """parent directory of run directories"""
    tensorboard: bool = True
    """write TensorBoard event files beside metrics.jsonl"""
    progress: bool = True
    """show a progress bar"""
    eval_episodes: int = 10
    """deterministic evaluation episodes on fresh envs after training (0: skip)"""
    save_checkpoint: bool = True
    """save the policy, normalisation statistics and training state as safetensors"""
    checkpoint_every: int = 50
    """also checkpoint every this many iterations (0: only at the end or on interruption)"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work, before any rollout."""
        check_finite_settings(self)
        env_spec(self.env_id)
        for name in ("total_timesteps", "num_envs", "num_steps", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        validate_rates(self.learning_rate, self.gamma, self.gae_lambda)
        if self.eval_episodes < 0:
            raise ValueError(f"eval_episodes must be >= 0, got {self.eval_episodes}")
        if self.sde_sample_freq == 0 or self.sde_sample_freq < -1:
            raise ValueError(
                f"sde_sample_freq must be -1 (once per rollout) or >= 1, got {self.sde_sample_freq}"
            )
        self.ppo.validate(self.batch_size)


def _ppo(**kw: Any) -> PPOConfig:
    return PPOConfig(**kw)


# Tuned presets: each tuned one was chosen by benchmarks/preset_sweep.py, and why is in its
# result file (benchmarks/results/sweep_<env id>.md). The other MuJoCo envs follow CleanRL's
# ppo_continuous_action.py (1M steps); ``--preset cleanrl`` gives CleanRL's settings for any env.
_MUJOCO = dict(
    total_timesteps=1_000_000,
    num_envs=1,
    num_steps=2048,
    learning_rate=3e-4,
    gamma=0.99,
    gae_lambda=0.95,
    ppo=_ppo(update_epochs=10, num_minibatches=32, ent_coef=0.0),
    normalize_obs=True,
    normalize_reward=True,
)
PRESETS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(
        total_timesteps=98_304,
        num_envs=128,
        num_steps=16,
        learning_rate=3e-3,
        gamma=0.99,
        gae_lambda=0.9,
        ppo=_ppo(update_epochs=6, num_minibatches=4, ent_coef=0.0, clip_vloss=False),
    ),
    "Acrobot-v1": dict(
        total_timesteps=299_008,
        num_envs=64,
        num_steps=16,
        learning_rate=2e-3,
        gamma=0.99,
        gae_lambda=0.9,
        ppo=_ppo(update_epochs=4, num_minibatches=4, ent_coef=0.0, clip_vloss=False),
    ),
    # rl-baselines3-zoo's Pendulum config, gSDE included; vf_coef 1.0 is SB3's 0.5 on a squared
    # error without the ½ (sweep_Pendulum-v1.md).
    "Pendulum-v1": dict(
        total_timesteps=102_400,
        num_envs=4,
        num_steps=1024,
        learning_rate=1e-3,
        anneal_lr=False,
        gamma=0.9,
        gae_lambda=0.95,
        use_sde=True,
        sde_sample_freq=4,
        ppo=_ppo(
            update_epochs=10,
            num_minibatches=64,
            clip_coef=0.2,
            ent_coef=0.0,
            vf_coef=1.0,
            max_grad_norm=0.5,
            clip_vloss=False,
        ),
    ),
    # rl-baselines3-zoo's tuned HalfCheetah settings as they are (sweep_HalfCheetah-v5.md).
    "HalfCheetah-v5": dict(
        _MUJOCO,
        num_envs=1,
        num_steps=512,
        learning_rate=2.0633e-5,
        anneal_lr=False,
        gamma=0.98,
        gae_lambda=0.92,
        hidden_sizes=(256, 256),
        activation="relu",
        log_std_init=-2.0,
        ortho_init=False,
        ppo=_ppo(
            update_epochs=20,
            num_minibatches=8,
            clip_coef=0.1,
            ent_coef=4e-4,
            vf_coef=0.58,
            max_grad_norm=0.8,
            clip_vloss=False,
        ),
    ),
    # rl-baselines3-zoo's tuned Walker2d settings as they are (sweep_Walker2d-v5.md).
    "Walker2d-v5": dict(
        _MUJOCO,
        num_envs=1,
        num_steps=512,
        learning_rate=5.05e-5,
        anneal_lr=False,
        ppo=_ppo(
            update_epochs=20,
            num_minibatches=16,
            clip_coef=0.1,
            ent_coef=5.85e-4,
            vf_coef=0.87,
            max_grad_norm=1.0,
            clip_vloss=False,
        ),
    ),
    **{f"{name}-v5": dict(_MUJOCO) for name in ("Hopper", "Ant", "Humanoid")},
}
# CleanRL's ppo.py defaults for discrete tasks, used by the benchmarks for CartPole and Acrobot.
CLEANRL_DISCRETE: dict[str, Any] = dict(
    num_envs=4,
    num_steps=128,
    learning_rate=2.5e-4,
    gamma=0.99,
    gae_lambda=0.95,
    ppo=_ppo(update_epochs=4, num_minibatches=4, ent_coef=0.01),
)


PRESET_FAMILIES = ("tuned", "cleanrl")


def cleanrl_family(env_id: str) -> tuple[str, dict[str, Any]]:
    """CleanRL's published defaults for ``env_id``: ``ppo.py`` (500k steps) for discrete actions,
    ``ppo_continuous_action.py`` (1M steps) for continuous ones; ``--preset cleanrl``."""
    env_spec(env_id)  # an unknown id is a one-line error
    _, action_space = single_spaces(env_id)
    if isinstance(action_space, gym.spaces.Box):
        return "CleanRL's ppo_continuous_action.py defaults (1M steps)", _MUJOCO
    return "CleanRL's ppo.py defaults (500k steps)", dict(CLEANRL_DISCRETE, total_timesteps=500_000)


def default_family(env_id: str) -> tuple[str, dict[str, Any]]:
    """``(description, settings)`` an env id starts from: its preset, or for an id without one,
    the MuJoCo defaults for MuJoCo and other continuous-action envs and CleanRL's ``ppo.py``
    defaults for discrete ones. Builds the env once to read its action space."""
    if env_id in PRESETS:
        return f"the {env_id} preset", PRESETS[env_id]
    from textenv.control import gymnasium_twin

    twin = gymnasium_twin(env_id)  # a torch classic-control env: its Gymnasium twin's settings
    if twin is not None:
        return default_family(twin)
    spec = env_spec(env_id)
    if "mujoco" in str(spec.entry_point):
        return "the MuJoCo defaults (CleanRL's ppo_continuous_action.py, 1M steps)", _MUJOCO
    env = gym.make(env_id)
    try:
        continuous = isinstance(env.action_space, gym.spaces.Box)
    finally:
        env.close()
    if continuous:
        return (
            "the continuous-control defaults (CleanRL's ppo_continuous_action.py, 1M steps)",
            _MUJOCO,
        )
    return "the discrete-action defaults (CleanRL's ppo.py, 500k steps)", dict(
        CLEANRL_DISCRETE, total_timesteps=500_000
    )


def defaults_note(env_id: str) -> str | None:
    """A line saying which defaults an env id without a preset uses (None for a preset id)."""
    if env_id in PRESETS:
        return None
    family, _ = default_family(env_id)
    return f"note: {env_id} has no preset; it uses {family}; flags override them"


def preset_config(env_id: str, preset: str = "tuned", **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` for ``env_id`` with overrides: ``preset="tuned"`` (default) is
    its tuned preset (see :func:`default_family` for ids without one), ``"cleanrl"`` CleanRL's
    defaults for its action type (:func:`cleanrl_family`)."""
    if preset not in PRESET_FAMILIES:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESET_FAMILIES)}")
    family = cleanrl_family if preset == "cleanrl" else default_family
    values = {**family(env_id)[1], **overrides}
    if "ppo" in values:
        values["ppo"] = dataclasses.replace(values["ppo"])
    return TrainConfig(env_id=env_id, **values)


def make_train_envs(
    config: TrainConfig, device: torch.device | None = None
) -> gym.vector.VectorEnv:
    """The training envs; a torch env (``textenv/Torch*``) lives on ``device``, the policy's."""
    return make_vector_env(
        config.env_id,
        config.num_envs,
        vectorization=config.vectorization,
        normalize_obs=config.normalize_obs,
        normalize_reward=config.normalize_reward,
        clip_obs=config.clip_obs,
        clip_reward=config.clip_reward,
        gamma=config.gamma,
        device=device,
    )


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` a run directory was started with (its ``config.json``)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file() or not (run_dir / "checkpoint.safetensors").is_file():
        raise ValueError(
            f"{str(run_dir)!r} is not a run directory with a checkpoint "
            "(config.json + checkpoint.safetensors)"
        )
    return _config_from_dict(json.loads(path.read_text()))


def _config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    raw = dict(raw)
    raw["ppo"] = PPOConfig(**raw["ppo"])
    raw["hidden_sizes"] = tuple(raw["hidden_sizes"])
    return TrainConfig(**raw)


def train(config: TrainConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Train PPO as ``config`` says; write logs, checkpoint, ``summary.json``; return the summary.

    ``resume``: a run directory to continue from its checkpoint (policy, optimizer, step and
    LR schedule, normalisation statistics, RNG states); its metrics are appended. Episodes in
    progress when it stopped are not restored: the envs start new ones.
    SIGINT/SIGTERM stop at the end of the iteration with a checkpoint
    (:class:`TrainingInterrupted`).

    Under ``torchrun`` each of the N processes steps ``num_envs / N`` of the envs (global env
    ``i`` is seeded ``seed + i`` as in one process) and the update is the one-process update
    of the whole batch (:mod:`textenv.agents.distributed`); rank 0 alone writes.
    """
    config.validate()
    with distributed_run(resolve_device(config.device)) as (dist, device):
        return _train(config, resume, dist, device)


def _train(
    config: TrainConfig, resume: str | Path | None, dist: Dist, device: torch.device
) -> dict[str, Any]:
    local_envs = dist.check_divides("num_envs", config.num_envs)
    dist.check_local_batch(config.ppo, local_envs * config.num_steps)
    torch.set_num_threads(config.torch_threads)
    seed_everything(config.seed)
    torch.backends.cudnn.deterministic = True
    if resume is not None:
        saved = load_run_config(resume)
        if saved.env_id != config.env_id:
            raise ValueError(f"--resume {resume} is a run of {saved.env_id}, not {config.env_id}")
    else:
        check_writable_dir(config.runs_dir, "--runs-dir")
    t = _ClassicTraining(config, resume, dist, device, local_envs)
    from tqdm import tqdm

    try:
        with (
            t.run.loop(save_on_failure=config.save_checkpoint),
            tqdm(
                total=t.num_iterations * config.batch_size,
                initial=t.global_step,
                disable=not (config.progress and dist.is_main),
                unit="step",
                dynamic_ncols=True,
            ) as bar,
        ):
            for iteration in range(t.first_iteration, t.num_iterations + 1):
                lr = t.schedule.apply(t.optimizer, iteration)
                returns, lengths = t.collect()
                batch = t.collector.batch(config.gamma, config.gae_lambda)
                stats = t.update(batch)
                metrics = t.log(iteration, lr, stats, returns, lengths, bar)
                t.run.end_iteration(
                    iteration, t.global_step, metrics, f"(up to step {t.global_step})"
                )
                if config.save_checkpoint and config.checkpoint_every:
                    if iteration % config.checkpoint_every == 0:
                        t.checkpoint(iteration)
    finally:
        t.close()
    return t.finish()


def budget_note(config: TrainConfig) -> str | None:
    """What is trained when ``total_timesteps`` is not a whole number of batches (None if it is):
    whole iterations of ``num_envs × num_steps`` steps, at least one."""
    iterations = max(1, config.total_timesteps // config.batch_size)
    steps = iterations * config.batch_size
    if steps == config.total_timesteps:
        return None
    return (
        f"training {steps:,} steps, not {config.total_timesteps:,}: {iterations} iteration(s) of "
        f"num_envs x num_steps = {config.num_envs} x {config.num_steps} = {config.batch_size:,}"
    )


class _ClassicTraining:
    """One classic run's state (envs, policy, optimizer, schedule, counters); each method is
    one named step of :func:`_train`'s loop."""

    def __init__(
        self,
        config: TrainConfig,
        resume: str | Path | None,
        dist: Dist,
        device: torch.device,
        local_envs: int,
    ) -> None:
        self.config, self.dist, self.device = config, dist, device
        on_device = is_device_env(config.env_id)  # tensors in, tensors out, on the policy's device
        # Before the run directory: an env that cannot be built leaves none behind.
        self.envs = make_train_envs(
            dataclasses.replace(config, num_envs=local_envs), device if on_device else None
        )
        if config.use_sde and not isinstance(self.envs.single_action_space, gym.spaces.Box):
            self.envs.close()
            raise ValueError(
                f"use_sde needs continuous (Box) actions; {config.env_id} has "
                f"{self.envs.single_action_space}"
            )
        self.run_dir = TrainingRun.directory(
            config.runs_dir,
            config.run_name,
            f"{config.env_id}__{config.seed}",
            config,
            resume,
            dist,
        )
        self.policy = MLPActorCritic(
            self.envs.single_observation_space,
            self.envs.single_action_space,
            config.hidden_sizes,
            config.log_std_init,
            config.activation,
            config.ortho_init,
            config.use_sde,
        ).to(device)
        dist.broadcast_parameters(self.policy.parameters())
        self.optimizer = torch.optim.Adam(
            self.policy.parameters(), lr=config.learning_rate, eps=config.adam_eps, fused=True
        )
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.collector = RolloutCollector(
            self.envs, self.policy, config.num_steps, device, on_device
        )
        self.num_iterations = max(1, config.total_timesteps // config.batch_size)
        if dist.is_main and (note := budget_note(config)):
            print(note, file=sys.stderr, flush=True)
        self.schedule = LinearLR(
            config.learning_rate, self.num_iterations, enabled=config.anneal_lr
        )
        self.global_step, self.first_iteration, previous_wall = 0, 1, 0.0
        self.recent_returns: deque[float] = deque(maxlen=100)
        if resume is not None:
            previous_wall = self._restore(load_run_config(resume))
        if dist.rank > 0:  # every rank samples its own actions; rank 0 keeps one-process's
            seed_everything(config.seed + 1_000_003 * dist.rank + self.first_iteration - 1)
        self.synced_norm = normalization_state(self.envs)  # the same on every rank
        # Global env i is seeded seed + i, whichever rank steps it: the one-process episodes.
        self.collector.reset(config.seed + self.first_iteration - 1 + dist.rank * local_envs)
        # One clock reading for the session's start and the run's: steps per second and wall
        # time agree.
        self.start_step, self.start_clock = self.global_step, time.perf_counter()
        self.start = self.start_clock - previous_wall
        resumed_at = (self.first_iteration - 1, self.global_step) if resume is not None else None
        self.run = TrainingRun(
            self.run_dir,
            tensorboard=config.tensorboard,
            checkpoint=self.checkpoint,
            dist=dist,
            resumed_at=resumed_at,
        )
        self.run.last_iteration = self.first_iteration - 1

    def _restore(self, saved: TrainConfig) -> float:
        """Load the checkpoint's state into this run; return the wall time it had run."""
        config = self.config
        state = restore_training_state(
            self.run_dir / "checkpoint.safetensors",
            self.policy,
            self.optimizer,
            self.generator,
            self.envs,
        )
        self.global_step, self.first_iteration = state["global_step"], state["iteration"] + 1
        self.recent_returns.extend(state["recent_returns"])
        # Checkpoints from before the schedule was saved ran CleanRL's schedule over the
        # run's first horizon.
        saved_schedule = state["lr_schedule"] or {
            "learning_rate": saved.learning_rate,
            "enabled": saved.anneal_lr,
            "horizon": max(1, saved.total_timesteps // saved.batch_size),
        }
        self.schedule = LinearLR.resumed(
            saved_schedule,
            state["iteration"],
            config.learning_rate,
            self.num_iterations,
            config.anneal_lr,
        )
        note = resumed_world_note(state["world_size"], self.dist)
        if self.dist.is_main:
            print(
                f"resuming {self.run_dir} at step {self.global_step:,} (iteration "
                f"{self.first_iteration} of {self.num_iterations})",
                file=sys.stderr,
                flush=True,
            )
            if note:
                print(note, file=sys.stderr, flush=True)
        return state["wall_time_s"]

    def collect(self) -> tuple[list[float], list[int]]:
        """One iteration of steps; the returns and lengths of the episodes that ended, over
        every rank (rank 0's, then rank 1's, ...), with the normalisation statistics synced."""
        config, dist = self.config, self.dist
        sde_freq = config.sde_sample_freq if config.use_sde else None
        returns, lengths = self.collector.collect(config.env_id, self.global_step, sde_freq)
        if dist.active:
            gathered = dist.gather((returns, lengths))
            returns = [r for rank_returns, _ in gathered for r in rank_returns]
            lengths = [n for _, rank_lengths in gathered for n in rank_lengths]
            local = normalization_state(self.envs)
            self.synced_norm = sync_running_stats(local, self.synced_norm, dist)
            load_normalization_state(self.envs, self.synced_norm)
        self.global_step += config.batch_size
        return returns, lengths

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """K epochs of minibatched PPO; the update's stats, the critic's explained variance and,
        for continuous actions, the policy's action std."""
        policy = self.policy
        policy.train()
        stats = ppo_update(
            policy.parameters(),
            self.optimizer,
            batch,
            lambda mb: policy.evaluate(mb["obs"], mb["actions"]),
            self.config.ppo,
            self.generator,
            dist=self.dist,
        )
        stats["explained_variance"] = explained_variance(
            batch["values"], batch["returns"], batch["mask"], self.dist
        )
        if policy.continuous:
            with torch.no_grad():
                stats["action_std"] = policy.action_std(batch["obs"])
        return stats

    def log(
        self,
        iteration: int,
        lr: float,
        stats: dict[str, torch.Tensor],
        returns: list[float],
        lengths: list[int],
        bar,
    ) -> dict[str, float]:
        """The iteration's metrics (one host sync for every device-side one) and the bar."""
        keys = list(stats)
        values = torch.stack([stats[k].float() for k in keys]).tolist()
        metrics: dict[str, float] = dict(zip(keys, values, strict=True))
        self.recent_returns.extend(returns)
        now = time.perf_counter()
        metrics |= {
            "iteration": iteration,
            "learning_rate": lr,
            "sps": (self.global_step - self.start_step) / (now - self.start_clock),
            "wall_time_s": now - self.start,
        }
        if returns:
            metrics |= {
                "episodic_return": float(np.mean(returns)),
                "episodic_length": float(np.mean(lengths)),
                "episodes": len(returns),
            }
        bar.update(self.config.batch_size)
        if self.recent_returns:
            bar.set_postfix(ret=f"{np.mean(self.recent_returns):.1f}", refresh=False)
        return metrics

    def checkpoint(self, iteration: int, norm_state=None, wall_time_s: float | None = None) -> Path:
        path = self.run_dir / "checkpoint.safetensors"
        if self.dist.is_main:
            save_checkpoint(
                path,
                self.policy,
                normalization_state(self.envs) if norm_state is None else norm_state,
                self.config,
                self.global_step,
                optimizer=self.optimizer,
                generator=self.generator,
                iteration=iteration,
                recent_returns=list(self.recent_returns),
                wall_time_s=time.perf_counter() - self.start
                if wall_time_s is None
                else wall_time_s,
                lr_schedule=self.schedule.state(),
                world_size=self.dist.world_size,
            )
        return path

    def close(self) -> None:
        """Stop the clock and close the envs, keeping their normalisation statistics."""
        self.end = time.perf_counter()
        self.norm_state = normalization_state(self.envs)
        self.envs.close()

    def finish(self) -> dict[str, Any]:
        """Checkpoint, evaluate (rank 0), write ``summary.json``; return the summary."""
        config = self.config
        wall_time = self.end - self.start
        returns = self.recent_returns
        summary: dict[str, Any] = {
            "env_id": config.env_id,
            "seed": config.seed,
            "global_step": self.global_step,
            "wall_time_s": wall_time,
            "sps": (self.global_step - self.start_step) / (self.end - self.start_clock),
            "train_return_last100": float(np.mean(returns)) if returns else None,
            "run_dir": str(self.run_dir),
        }
        if self.dist.world_size > 1:
            summary["world_size"] = self.dist.world_size
        if config.save_checkpoint:
            path = self.checkpoint(self.num_iterations, self.norm_state, wall_time)
            summary["checkpoint"] = str(path)
        if config.eval_episodes > 0 and self.dist.is_main:  # one evaluation, by rank 0
            eval_returns = evaluate_policy(
                self.policy,
                config.env_id,
                config.eval_episodes,
                seed=config.seed + 10_000,
                norm_state=self.norm_state,
                normalize_obs=config.normalize_obs,
                clip_obs=config.clip_obs,
                device=self.device,
            )
            summary |= {
                "eval_return_mean": float(np.mean(eval_returns)),
                "eval_return_std": float(np.std(eval_returns)),
                "eval_episodes": len(eval_returns),
            }
        return self.run.finish(summary)


def evaluate_policy(
    policy: MLPActorCritic,
    env_id: str,
    episodes: int,
    *,
    seed: int,
    norm_state: dict[str, np.ndarray] | None = None,
    normalize_obs: bool = False,
    clip_obs: float = 10.0,
    device: torch.device | str = "cpu",
    video_dir: str | None = None,
) -> list[float]:
    """Undiscounted returns of ``episodes`` deterministic episodes, one per fresh env.

    Observation statistics are the training run's, frozen. Each sub-env plays exactly one
    episode, so short episodes are not over-represented as they would be if the first
    ``episodes`` to finish were taken.
    """
    env_kwargs = {"render_mode": "rgb_array"} if video_dir else None
    envs = make_vector_env(
        env_id,
        episodes,
        vectorization="sync" if video_dir else "auto",
        normalize_obs=normalize_obs,
        clip_obs=clip_obs,
        env_kwargs=env_kwargs,
    )
    if video_dir:
        from gymnasium.wrappers.vector import RecordVideo

        envs = RecordVideo(envs, video_dir, episode_trigger=lambda i: i == 0, name_prefix=env_id)
    if norm_state:
        load_normalization_state(envs, norm_state, freeze=True)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset(seed=seed)
    policy.eval()
    try:
        while np.isnan(returns).any():
            with torch.inference_mode():
                action = policy.deterministic_action(
                    torch.as_tensor(obs, dtype=torch.float32, device=device)
                )
            obs, _, _, _, info = envs.step(action.cpu().numpy())
            if "_episode" in info:
                first = info["_episode"] & np.isnan(returns)
                returns[first] = info["episode"]["r"][first]
    finally:
        envs.close()
    return returns.tolist()


def save_checkpoint(
    path: Path,
    policy: MLPActorCritic,
    norm_state: dict[str, np.ndarray],
    config: TrainConfig,
    global_step: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    iteration: int = 0,
    recent_returns: list[float] | None = None,
    wall_time_s: float = 0.0,
    lr_schedule: dict[str, Any] | None = None,
    world_size: int = 1,
) -> None:
    """Policy, normalisation statistics and (for resuming) optimizer and RNG states in one
    safetensors file, written to a temp file and renamed so the last good one survives a crash."""
    tensors = {f"policy.{k}": v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    tensors |= {
        f"norm.{k}": torch.as_tensor(np.asarray(v, dtype=np.float64)).reshape(-1)
        for k, v in norm_state.items()
    }
    metadata = {
        "config": json.dumps(dataclasses.asdict(config)),
        "global_step": str(global_step),
        "format": "textenv-ppo-mlp-v1",
        "iteration": str(iteration),
        "wall_time_s": repr(wall_time_s),
        "recent_returns": json.dumps(recent_returns or []),
        "lr_schedule": json.dumps(lr_schedule),
        "world_size": str(world_size),
    }
    if optimizer is not None:
        state_tensors, state_meta = pack_training_state(optimizer, generator)
        tensors |= state_tensors
        metadata |= state_meta
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def restore_training_state(
    path: Path,
    policy: MLPActorCritic,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    envs: gym.vector.VectorEnv,
) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into live objects; return the counters."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path), device="cpu")
    device = next(policy.parameters()).device
    policy.load_state_dict(
        {k[len("policy.") :]: v for k, v in tensors.items() if k.startswith("policy.")}
    )
    unpack_training_state(tensors, metadata, optimizer, generator, device)
    # Saved flat; load_normalization_state gives each statistic the live normaliser's shape.
    load_normalization_state(
        envs, {k[len("norm.") :]: v.numpy() for k, v in tensors.items() if k.startswith("norm.")}
    )
    return {
        "global_step": int(metadata["global_step"]),
        "iteration": int(metadata["iteration"]),
        "recent_returns": json.loads(metadata["recent_returns"]),
        "wall_time_s": float(metadata["wall_time_s"]),
        "lr_schedule": json.loads(metadata.get("lr_schedule", "null")),
        "world_size": int(metadata.get("world_size", "1")),
    }


def single_spaces(env_id: str) -> tuple[gym.Space, gym.Space]:
    """One env's (flattened) observation space and action space, without stepping anything."""
    from textenv.control import torch_control_class

    cls = torch_control_class(env_id)  # vector-only ids: the class carries its spaces
    if cls is not None:
        obs_space, action_space = cls.single_observation_space, cls.single_action_space
    else:
        env = gym.make(env_id)
        obs_space, action_space = env.observation_space, env.action_space
        env.close()
    if (
        not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1
    ):  # as make_vector_env flattens
        obs_space = gym.spaces.flatten_space(obs_space)
    return obs_space, action_space


def load_checkpoint(
    path: str | Path, device: str = "cpu"
) -> tuple[MLPActorCritic, dict[str, np.ndarray], TrainConfig]:
    """Rebuild ``(policy, normalisation state, config)`` from :func:`save_checkpoint`'s file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != "textenv-ppo-mlp-v1":
        raise ValueError(f"{path} is not a checkpoint of the classic PPO trainer")
    config = _config_from_dict(json.loads(metadata["config"]))
    tensors = load_file(str(path), device="cpu")
    obs_space, action_space = single_spaces(config.env_id)
    policy = MLPActorCritic(
        obs_space,
        action_space,
        config.hidden_sizes,
        config.log_std_init,
        config.activation,
        use_sde=config.use_sde,
    )
    policy.load_state_dict(
        {k[len("policy.") :]: v for k, v in tensors.items() if k.startswith("policy.")}
    )
    norm_state = {k[len("norm.") :]: v.numpy() for k, v in tensors.items() if k.startswith("norm.")}
    if "obs_rms.count" in norm_state:
        norm_state["obs_rms.count"] = norm_state["obs_rms.count"].reshape(
            ()
        )  # mean and var are saved 1-D already
    return policy.to(device), norm_state, config
