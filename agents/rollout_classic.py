"""Collecting experience from Gymnasium vector envs for the classic trainer: ``num_steps``
transitions of every env into device buffers, then GAE and the flat batch PPO reads."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch

from textenv.agents.gae import gae
from textenv.agents.policies import MLPActorCritic


class RolloutCollector:
    """Steps ``envs`` with ``policy`` and keeps ``num_steps × num_envs`` transitions on
    ``device``, with no host sync per step on device-side envs.

    With next-step autoreset the step after an episode's end only resets: its action is
    ignored and it pays nothing, so it is no transition of the MDP and is masked out
    (``valid``)."""

    def __init__(
        self,
        envs: gym.vector.VectorEnv,
        policy: MLPActorCritic,
        num_steps: int,
        device: torch.device,
        on_device: bool,
    ) -> None:
        self.envs, self.policy, self.device, self.on_device = envs, policy, device, on_device
        T, N = num_steps, envs.num_envs
        self.obs_shape: tuple[int, ...] = envs.single_observation_space.shape or ()
        self.act_shape: tuple[int, ...] = envs.single_action_space.shape or ()
        act_dtype = torch.float32 if policy.continuous else torch.long
        self.obs = torch.zeros((T, N, *self.obs_shape), device=device)
        self.actions = torch.zeros((T, N, *self.act_shape), device=device, dtype=act_dtype)
        self.logprobs, self.values, self.rewards, self.terminated, self.ended, self.valid = (
            torch.zeros((T, N), device=device) for _ in range(6)
        )
        # Finished episodes' returns and lengths, read on the host once per iteration.
        self.ep_return = torch.zeros((T, N), dtype=torch.float64, device=device)
        self.ep_length = torch.zeros((T, N), dtype=torch.long, device=device)
        self.ep_done = torch.zeros((T, N), dtype=torch.bool, device=device)
        self.finite = torch.ones((T, 2), dtype=torch.bool, device=device)  # reward, observation
        self.next_obs = torch.zeros((N, *self.obs_shape), device=device)
        self.prev_ended = torch.zeros(N, dtype=torch.bool, device=device)

    def _t(self, x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.as_tensor(x, dtype=dtype, device=self.device)

    def reset(self, seed: int) -> None:
        obs, _ = self.envs.reset(seed=seed)
        self.next_obs = self._t(obs, torch.float32)
        self.prev_ended.zero_()

    def collect(
        self, env_id: str, global_step: int, sde_sample_freq: int | None
    ) -> tuple[list[float], list[int]]:
        """Fill the buffers with one iteration's steps; the returns and lengths of the episodes
        that ended, in step order and row order within a step. ``sde_sample_freq``: resample
        gSDE's noise every this many steps (0: once per iteration; None: no gSDE). Raises
        naming the first step whose reward or observation was not finite."""
        policy, N = self.policy, self.envs.num_envs
        self.ep_done.zero_()
        policy.eval()
        for t in range(self.obs.shape[0]):
            if sde_sample_freq is not None and (
                t == 0 or sde_sample_freq > 0 and t % sde_sample_freq == 0
            ):
                policy.reset_noise(N)
            self.obs[t] = self.next_obs
            self.valid[t] = ~self.prev_ended
            with torch.inference_mode():
                action, logprob, value = policy.act(self.next_obs)
            self.actions[t], self.logprobs[t], self.values[t] = action, logprob, value
            self._step(t, action, env_id, global_step)
        check_finite(self.finite, env_id, global_step, N)
        returns: list[float] = self.ep_return[self.ep_done].tolist()
        lengths: list[int] = self.ep_length[self.ep_done].tolist()
        return returns, lengths

    def _step(self, t: int, action: torch.Tensor, env_id: str, global_step: int) -> None:
        step_action = action if self.on_device else action.cpu().numpy()
        next_obs, reward, terminated, truncated, info = self.envs.step(step_action)
        reward, self.next_obs = self._t(reward, torch.float32), self._t(next_obs, torch.float32)
        # Checked on the device and read once per iteration: no host sync per step.
        self.finite[t, 0], self.finite[t, 1] = (
            reward.isfinite().all(),
            self.next_obs.isfinite().all(),
        )
        if not self.on_device and not bool(self.finite[t].all()):  # host envs: stop at once
            check_finite(self.finite, env_id, global_step, self.envs.num_envs)
        self.rewards[t] = reward
        self.terminated[t] = self._t(terminated)
        self.prev_ended = self._t(terminated, torch.bool) | self._t(truncated, torch.bool)
        self.ended[t] = self.prev_ended
        if "_episode" in info:
            self.ep_done[t] = self._t(info["_episode"])
            self.ep_return[t] = self._t(info["episode"]["r"], torch.float64)
            self.ep_length[t] = self._t(info["episode"]["l"], torch.long)

    def batch(self, gamma: float, gae_lambda: float) -> dict[str, torch.Tensor]:
        """GAE over the collected steps (bootstrapped from the value of the next observation)
        and the flat batch :func:`textenv.agents.ppo.ppo_update` reads."""
        with torch.inference_mode():
            last_value = self.policy.value(self.next_obs)
        advantages, returns = gae(
            self.rewards, self.values, last_value, self.terminated, self.ended, gamma, gae_lambda
        )
        return {
            "obs": self.obs.reshape(-1, *self.obs_shape),
            "actions": self.actions.reshape(-1, *self.act_shape),
            "logprobs": self.logprobs.reshape(-1),
            "values": self.values.reshape(-1),
            "advantages": advantages.reshape(-1),
            "returns": returns.reshape(-1),
            "mask": self.valid.reshape(-1),
        }


def check_finite(finite: torch.Tensor, env_id: str, global_step: int, num_envs: int) -> None:
    """Raise naming the first step whose reward or observation was not finite
    (``finite``: ``[T, 2]``)."""
    if bool(finite.all()):
        return
    t, what = (~finite).nonzero()[0].tolist()
    raise ValueError(
        f"{env_id} returned a non-finite {('reward', 'observation')[what]} at step "
        f"{global_step + (t + 1) * num_envs}"
    )
