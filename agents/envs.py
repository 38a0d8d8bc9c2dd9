"""Vector environments for the classic trainer, built from Gymnasium's own vector wrappers."""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
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


def is_device_env(env_id: str) -> bool:
    """Whether ``env_id``'s vector env is a torch classic-control env (``textenv/Torch*`` or a
    subclass of :class:`textenv.control.TorchControlVectorEnv`), which keeps its state on a
    device."""
    from textenv.control import torch_control_class

    env_spec(env_id)  # an unknown id is a one-line error
    return torch_control_class(env_id) is not None


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
    device: torch.device | str | None = None,
) -> gym.vector.VectorEnv:
    """A Gymnasium vector env with episode statistics and, for continuous control, the
    normalisation details of PPO (observation normalisation and clipping, reward scaling by
    the running std of the discounted return, and clipping).

    Autoreset is Gymnasium 1.x's next-step mode: the step after an episode ends returns the
    reset observation, ignores the action and pays no reward; the trainer masks that step.

    ``device``: for a torch env (:func:`is_device_env`), keep it on that device and return
    tensors there, wrapped by the torch twins of the same wrappers below (Gymnasium's are
    numpy code); on a GPU it then draws initial states on the device (``rng="torch"``), so a
    step never waits for the host. Without ``device`` every env returns numpy arrays.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    mode = resolve_vectorization(env_id, vectorization)
    env_kwargs = dict(env_kwargs or {})
    if device is not None and is_device_env(env_id):
        device = torch.device(device)
        env_kwargs |= {"arrays": "torch", "device": device}
        env_kwargs.setdefault("rng", "numpy" if device.type == "cpu" else "torch")
        envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode, **env_kwargs)
        envs = TorchRecordEpisodeStatistics(envs)
        if isinstance(envs.single_action_space, gym.spaces.Box):
            envs = TorchClipAction(envs)
        if normalize_obs:
            envs = TorchNormalizeObservation(envs, clip_obs)
        if normalize_reward:
            envs = TorchNormalizeReward(envs, gamma, clip_reward)
        return envs
    if is_device_env(env_id):
        # The numpy wrappers below and the host rollout read arrays; on the CPU they share the
        # tensors' memory (no copy).
        env_kwargs.setdefault("arrays", "numpy")
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode, **env_kwargs)
    if (
        envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
        != gym.vector.AutoresetMode.NEXT_STEP
    ):
        raise ValueError(
            f"{env_id}: the trainer expects next-step autoreset, "
            f"got {envs.metadata['autoreset_mode']}"
        )
    obs_space = envs.single_observation_space
    if (
        not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1
    ):  # the MLP reads flat vectors
        envs = vw.FlattenObservation(envs)
    envs = vw.RecordEpisodeStatistics(envs)
    if isinstance(envs.single_action_space, gym.spaces.Box):
        envs = vw.ClipAction(envs)
    if normalize_obs:
        envs = vw.NormalizeObservation(envs)
        if clip_obs is not None:
            envs = vw.TransformObservation(
                envs, lambda obs: np.clip(obs, -clip_obs, clip_obs), envs.observation_space
            )
    if normalize_reward:
        envs = vw.NormalizeReward(envs, gamma=gamma)
        if clip_reward is not None:
            envs = vw.ClipReward(envs, -clip_reward, clip_reward)
    return envs


# -- torch twins of Gymnasium's vector wrappers, for envs whose tensors stay on a device ---------
# Same arithmetic as gymnasium.wrappers.vector's RecordEpisodeStatistics, ClipAction,
# NormalizeObservation(+clip) and NormalizeReward(+clip) under next-step autoreset (tested against
# them), written without a host sync: masks instead of boolean indexing, info entries on every step.


class TorchRunningMeanStd:
    """Gymnasium's ``RunningMeanStd`` (parallel-variance update) on tensors, float64."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.var = torch.ones(shape, dtype=torch.float64, device=device)
        self.count = torch.tensor(1e-4, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Update from the rows of ``x`` (``[B, *shape]``) where ``mask`` is true (all rows
        without one)."""
        x = x.to(torch.float64)
        w = (
            torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
            if mask is None
            else mask.to(torch.float64)
        )
        w = w.reshape(-1, *([1] * (x.dim() - 1)))
        n = w.sum(0)
        batch_mean = (w * x).sum(0) / n.clamp(min=1)
        batch_var = (w * (x - batch_mean) ** 2).sum(0) / n.clamp(min=1)
        delta = batch_mean - self.mean
        total = self.count + n
        new_mean = self.mean + delta * n / total
        new_var = (
            self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        ) / total
        keep = n == 0  # an update from no rows changes nothing
        self.mean = torch.where(keep, self.mean, new_mean)
        self.var = torch.where(keep, self.var, new_var)
        self.count = torch.where(keep, self.count, total).reshape(())


def _device(env: gym.vector.VectorEnv) -> torch.device:
    """The device of a torch vector env (a TorchControlVectorEnv, or any env with ``device``)."""
    device: torch.device = env.unwrapped.device  # type: ignore[attr-defined]  # duck-typed
    return device


class TorchRecordEpisodeStatistics(gym.vector.VectorWrapper):
    """Episode return and length in ``info["episode"]["r"/"l"]`` with ``info["_episode"]``
    marking the rows whose episode ended this step; present on every step (all false when none
    ended)."""

    def __init__(self, env: gym.vector.VectorEnv) -> None:
        super().__init__(env)
        device = _device(env)
        self.episode_returns = torch.zeros(self.num_envs, dtype=torch.float64, device=device)
        self.episode_lengths = torch.zeros(self.num_envs, dtype=torch.long, device=device)
        self.prev_dones = torch.zeros(self.num_envs, dtype=torch.bool, device=device)

    def reset(self, **kwargs: Any):
        self.episode_returns.zero_()
        self.episode_lengths.zero_()
        self.prev_dones.zero_()
        return self.env.reset(**kwargs)

    def step(self, actions: Any):
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        fresh = self.prev_dones
        self.episode_returns = torch.where(fresh, 0.0, self.episode_returns + rewards)
        self.episode_lengths = torch.where(fresh, 0, self.episode_lengths + 1)
        self.prev_dones = dones = terminations | truncations
        infos = dict(infos)
        infos["episode"] = {
            "r": torch.where(dones, self.episode_returns, 0.0),
            "l": torch.where(dones, self.episode_lengths, 0),
        }
        infos["_episode"] = dones
        return obs, rewards, terminations, truncations, infos


class TorchClipAction(gym.vector.VectorWrapper):
    """Clip Box actions to the action space's bounds before the env sees them."""

    def __init__(self, env: gym.vector.VectorEnv) -> None:
        super().__init__(env)
        device = _device(env)
        space = env.single_action_space
        if not isinstance(space, gym.spaces.Box):
            raise TypeError(f"TorchClipAction clips Box actions, got {space}")
        self.low = torch.as_tensor(space.low, dtype=torch.float32, device=device)
        self.high = torch.as_tensor(space.high, dtype=torch.float32, device=device)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, env.action_space.shape, np.float32)
        self.single_action_space = gym.spaces.Box(-np.inf, np.inf, space.shape, np.float32)

    def step(self, actions: Any):
        return self.env.step(
            torch.clamp(torch.as_tensor(actions, device=self.low.device), self.low, self.high)
        )


class TorchNormalizeObservation(gym.vector.VectorWrapper):
    """Observations normalised by their running mean and std (every row, every step, as
    Gymnasium does), then clipped to ``[-clip, clip]`` when ``clip`` is given."""

    def __init__(
        self, env: gym.vector.VectorEnv, clip: float | None = None, epsilon: float = 1e-8
    ) -> None:
        super().__init__(env)
        shape = env.single_observation_space.shape
        if shape is None:
            raise TypeError(f"cannot normalise {env.single_observation_space}: it has no shape")
        self.obs_rms = TorchRunningMeanStd(shape, _device(env))
        self.clip, self.epsilon, self.update_running_mean = clip, epsilon, True
        self.single_observation_space = gym.spaces.Box(
            -np.inf, np.inf, env.single_observation_space.shape, np.float32
        )
        self.observation_space = gym.spaces.Box(
            -np.inf, np.inf, env.observation_space.shape, np.float32
        )

    def _normalize(self, obs: torch.Tensor) -> torch.Tensor:
        if self.update_running_mean:
            self.obs_rms.update(obs)
        out = ((obs - self.obs_rms.mean) / torch.sqrt(self.obs_rms.var + self.epsilon)).float()
        return out if self.clip is None else out.clamp(-self.clip, self.clip)

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        return self._normalize(obs), info

    def step(self, actions: Any):
        obs, *rest = self.env.step(actions)
        return self._normalize(obs), *rest


class TorchNormalizeReward(gym.vector.VectorWrapper):
    """Rewards divided by the running std of the discounted return, then clipped to
    ``[-clip, clip]``; the reset step of next-step autoreset neither accumulates nor updates."""

    def __init__(
        self,
        env: gym.vector.VectorEnv,
        gamma: float = 0.99,
        clip: float | None = None,
        epsilon: float = 1e-8,
    ) -> None:
        super().__init__(env)
        device = _device(env)
        self.return_rms = TorchRunningMeanStd((), device)
        self.accumulated_reward = torch.zeros(self.num_envs, dtype=torch.float32, device=device)
        self.prev_dones = torch.zeros(self.num_envs, dtype=torch.bool, device=device)
        self.gamma, self.clip, self.epsilon, self.update_running_mean = gamma, clip, epsilon, True

    def reset(self, **kwargs: Any):
        self.accumulated_reward.zero_()
        self.prev_dones.zero_()
        return self.env.reset(**kwargs)

    def step(self, actions: Any):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        active = ~self.prev_dones
        acc = self.accumulated_reward * self.gamma * (1 - terminated.float()) + reward
        self.accumulated_reward = torch.where(active, acc, self.accumulated_reward)
        if self.update_running_mean:
            self.return_rms.update(self.accumulated_reward, active)
        self.prev_dones = terminated | truncated
        scaled = (reward / torch.sqrt(self.return_rms.var + self.epsilon)).float()
        if self.clip is not None:
            scaled = scaled.clamp(-self.clip, self.clip)
        return obs, scaled, terminated, truncated, info


_Wrapper = type[gym.vector.VectorWrapper]


def find_wrapper(
    env: gym.vector.VectorEnv, cls: _Wrapper | tuple[_Wrapper, ...]
) -> gym.vector.VectorWrapper | None:
    """The outermost wrapper of type ``cls`` (or of one of the types) in ``env``'s stack, or
    None."""
    layer: Any = env
    while layer is not None:
        if isinstance(layer, cls):
            return layer
        layer = getattr(layer, "env", None)
    return None


def _host(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _like(value: Any, old: Any) -> Any:
    """A saved statistic in the form the live normaliser keeps (tensor on its device, or numpy)."""
    if isinstance(old, torch.Tensor):
        return torch.as_tensor(np.asarray(value, dtype=np.float64), device=old.device).reshape(
            old.shape
        )
    value = np.asarray(value, dtype=np.float64)
    return value.reshape(np.shape(old)) if np.ndim(old) else float(value.reshape(-1)[0])


_OBS_NORM = (vw.NormalizeObservation, TorchNormalizeObservation)
_REW_NORM = (vw.NormalizeReward, TorchNormalizeReward)


def normalization_state(envs: gym.vector.VectorEnv) -> dict[str, np.ndarray]:
    """Running statistics of the observation and return normalisers, for checkpoints."""
    state: dict[str, np.ndarray] = {}
    for key, classes, attr in (
        ("obs_rms", _OBS_NORM, "obs_rms"),
        ("return_rms", _REW_NORM, "return_rms"),
    ):
        wrapper = find_wrapper(envs, classes)
        if wrapper is not None:
            rms = getattr(wrapper, attr)
            state |= {
                f"{key}.mean": _host(rms.mean),
                f"{key}.var": _host(rms.var),
                f"{key}.count": _host(rms.count),
            }
    return state


def load_normalization_state(
    envs: gym.vector.VectorEnv, state: dict[str, np.ndarray], freeze: bool = False
) -> None:
    """Copy saved running statistics into ``envs``; ``freeze`` stops further updates
    (evaluation)."""
    for key, classes, attr in (
        ("obs_rms", _OBS_NORM, "obs_rms"),
        ("return_rms", _REW_NORM, "return_rms"),
    ):
        wrapper = find_wrapper(envs, classes)
        if wrapper is None or f"{key}.mean" not in state:
            continue
        rms = getattr(wrapper, attr)
        rms.mean, rms.var = (
            _like(state[f"{key}.mean"], rms.mean),
            _like(state[f"{key}.var"], rms.var),
        )
        rms.count = _like(state[f"{key}.count"], rms.count)
        if freeze and isinstance(wrapper, _OBS_NORM):
            wrapper.update_running_mean = False
