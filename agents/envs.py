"""Vector environments for the classic trainer, built from Gymnasium's own vector wrappers."""

from __future__ import annotations

from typing import Literal

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import vector as vw

Vectorization = Literal["auto", "vector_entry_point", "sync", "async"]


def resolve_vectorization(env_id: str, vectorization: Vectorization) -> str:
    """``auto`` picks the env's own vectorised implementation when it has one, else sync.

    Sync beats async for cheap simulators on a few cores (no pickling per step); pass
    ``async`` explicitly for expensive envs on a many-core machine.
    """
    spec = env_spec(env_id)
    if vectorization == "auto":
        return "vector_entry_point" if spec.vector_entry_point is not None else "sync"
    if vectorization == "vector_entry_point" and spec.vector_entry_point is None:
        raise ValueError(f"{env_id} has no vector_entry_point; use --vectorization sync or async")
    return vectorization


def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The registered spec of ``env_id``, or a one-line error naming the unknown id."""
    try:
        return gym.spec(env_id)
    except gym.error.Error as err:
        raise ValueError(f"unknown env id {env_id!r}: {err}") from None


def make_vector_env(
    env_id: str,
    num_envs: int,
    *,
    vectorization: Vectorization = "auto",
    normalize_obs: bool = False,
    normalize_reward: bool = False,
    clip_obs: float | None = 10.0,
    clip_reward: float | None = 10.0,
    gamma: float = 0.99,
    env_kwargs: dict | None = None,
) -> gym.vector.VectorEnv:
    """A Gymnasium vector env with episode statistics and, for continuous control, the
    normalisation details of PPO (observation normalisation and clipping, reward scaling by
    the running std of the discounted return, and clipping).

    Autoreset is Gymnasium 1.x's next-step mode: the step after an episode ends returns the
    reset observation, ignores the action and pays no reward; the trainer masks that step.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    mode = resolve_vectorization(env_id, vectorization)
    env_kwargs = dict(env_kwargs or {})
    if str(env_spec(env_id).vector_entry_point or "").startswith("textenv.control:"):
        # Torch classic-control envs: the trainer's rollout and Gymnasium's wrappers are numpy code;
        # on the CPU the arrays share the tensors' memory (no copy).
        env_kwargs.setdefault("arrays", "numpy")
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode, **env_kwargs)
    if envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP) != gym.vector.AutoresetMode.NEXT_STEP:
        raise ValueError(f"{env_id}: the trainer expects next-step autoreset, got {envs.metadata['autoreset_mode']}")
    obs_space = envs.single_observation_space
    if not isinstance(obs_space, gym.spaces.Box):
        envs = vw.FlattenObservation(envs)
    envs = vw.RecordEpisodeStatistics(envs)
    if isinstance(envs.single_action_space, gym.spaces.Box):
        envs = vw.ClipAction(envs)
    if normalize_obs:
        envs = vw.NormalizeObservation(envs)
        if clip_obs is not None:
            envs = vw.TransformObservation(envs, lambda obs: np.clip(obs, -clip_obs, clip_obs), envs.observation_space)
    if normalize_reward:
        envs = vw.NormalizeReward(envs, gamma=gamma)
        if clip_reward is not None:
            envs = vw.ClipReward(envs, -clip_reward, clip_reward)
    return envs


def find_wrapper(env: gym.vector.VectorEnv, cls: type) -> gym.vector.VectorWrapper | None:
    """The outermost wrapper of type ``cls`` in ``env``'s stack, or None."""
    while env is not None:
        if isinstance(env, cls):
            return env
        env = getattr(env, "env", None)
    return None


def normalization_state(envs: gym.vector.VectorEnv) -> dict[str, np.ndarray]:
    """Running statistics of the observation and return normalisers, for checkpoints."""
    state: dict[str, np.ndarray] = {}
    obs_norm = find_wrapper(envs, vw.NormalizeObservation)
    if obs_norm is not None:
        rms = obs_norm.obs_rms
        state |= {"obs_rms.mean": rms.mean, "obs_rms.var": rms.var, "obs_rms.count": np.asarray(rms.count)}
    rew_norm = find_wrapper(envs, vw.NormalizeReward)
    if rew_norm is not None:
        rms = rew_norm.return_rms
        state |= {"return_rms.mean": np.asarray(rms.mean), "return_rms.var": np.asarray(rms.var),
                  "return_rms.count": np.asarray(rms.count)}
    return state


def load_normalization_state(envs: gym.vector.VectorEnv, state: dict[str, np.ndarray], freeze: bool = False) -> None:
    """Copy saved running statistics into ``envs``; ``freeze`` stops further updates (evaluation)."""
    obs_norm = find_wrapper(envs, vw.NormalizeObservation)
    if obs_norm is not None and "obs_rms.mean" in state:
        obs_norm.obs_rms.mean = np.array(state["obs_rms.mean"], dtype=np.float64)
        obs_norm.obs_rms.var = np.array(state["obs_rms.var"], dtype=np.float64)
        obs_norm.obs_rms.count = float(state["obs_rms.count"])
        if freeze:
            obs_norm.update_running_mean = False
    rew_norm = find_wrapper(envs, vw.NormalizeReward)
    if rew_norm is not None and "return_rms.mean" in state:
        rew_norm.return_rms.mean = np.array(state["return_rms.mean"], dtype=np.float64)
        rew_norm.return_rms.var = np.array(state["return_rms.var"], dtype=np.float64)
        rew_norm.return_rms.count = float(state["return_rms.count"])
