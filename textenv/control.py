"""Classic-control tasks as torch vector envs whose state lives on the policy's device.

CartPole, Acrobot, Pendulum, MountainCar and MountainCarContinuous with Gymnasium's dynamics,
batched as ``[num_envs, state_dim]`` tensors (float64, as Gymnasium computes; observations
float32), so a GPU run never copies observations to the host. Gymnasium's vector API with its
default next-step autoreset: the step after an episode ends returns the reset observation,
ignores the action, pays 0 and is neither terminated nor truncated; the time limit of the
registered env (``TimeLimit``) is a truncation.

Initial states: ``rng="numpy"`` (default) draws them as Gymnasium's single env does, with row
``i``'s own generator seeded ``seed + i``, so row ``i`` replays ``gym.make(<id>)`` reset with
seed ``seed + i`` step for step (``SyncVectorEnv``'s layout; tested); it costs one host sync
on steps where rows reset. ``rng="torch"`` draws them on the device (same distribution,
different numbers) and never syncs.

    envs = gym.make_vec("textenv/TorchCartPole-v1", num_envs=4096, device="cuda")
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from textenv.arrays import as_arrays, row_seeds
from textenv.device import resolve_device


class TorchControlVectorEnv(gym.vector.VectorEnv):
    """The shared machinery; subclasses give the spaces, the initial-state draw and the dynamics."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}
    max_episode_steps: int  # each env sets both: its Gymnasium twin's id and time limit
    gym_id: str

    def __init__(
        self,
        num_envs: int = 1,
        device: str | torch.device = "cpu",
        rng: str = "numpy",
        max_episode_steps: int | None = None,
        arrays: str = "torch",
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if rng not in ("numpy", "torch"):
            raise ValueError(f"rng must be 'numpy' or 'torch', got {rng!r}")
        if arrays not in ("torch", "numpy"):
            raise ValueError(f"arrays must be 'torch' or 'numpy', got {arrays!r}")
        self.num_envs, self.rng, self.arrays = num_envs, rng, arrays
        self.device = resolve_device(device)
        if max_episode_steps is not None:
            self.max_episode_steps = int(max_episode_steps)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs = [seeding.np_random(None)[0] for _ in range(num_envs)]
        self._gen = torch.Generator(device=self.device)
        self._gen.seed()
        self.state: torch.Tensor | None = None
        self.steps = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.prev_done = torch.zeros(num_envs, dtype=torch.bool, device=self.device)

    # -- what a task defines -----------------------------------------------------------------
    def initial_numpy(self, rng: np.random.Generator) -> np.ndarray:
        """One row's initial state, drawn exactly as the single Gymnasium env draws it."""
        raise NotImplementedError

    def initial_torch(self, n: int) -> torch.Tensor:
        """``n`` initial states drawn on the device."""
        raise NotImplementedError

    def dynamics(
        self, state: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(next_state, reward, terminated)`` for every row."""
        raise NotImplementedError

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        return state.float()

    # -- Gymnasium's vector API --------------------------------------------------------------
    def _draw(self, rows: list[int] | None) -> torch.Tensor:
        rows = list(range(self.num_envs)) if rows is None else rows
        if self.rng == "torch":
            return self.initial_torch(len(rows))
        drawn = np.stack([self.initial_numpy(self._rngs[i]) for i in rows]).astype(np.float64)
        return torch.as_tensor(drawn, device=self.device)

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            seeds = row_seeds(seed, self.num_envs)
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
            self._gen.manual_seed(seeds[0])
        if options:
            raise ValueError(f"{type(self).__name__}.reset takes no options, got {sorted(options)}")
        self.state = self._draw(None)
        self.steps.zero_()
        self.prev_done.zero_()
        return as_arrays(self.observe(self.state), self.arrays), {}

    def step(self, actions):
        if self.state is None:
            raise RuntimeError("step() called before reset()")
        action = self._actions(actions)
        state, reward, terminated = self.dynamics(self.state, action)
        self.steps += 1
        truncated = self.steps >= self.max_episode_steps
        done = self.prev_done
        if self.rng == "torch":
            state = torch.where(done.unsqueeze(1), self.initial_torch(self.num_envs), state)
        elif bool(done.any()):  # the one host sync of a step, only with numpy draws
            rows = done.nonzero().squeeze(1).tolist()
            state[done] = self._draw(rows)
        self.steps = torch.where(done, torch.zeros_like(self.steps), self.steps)
        reward = torch.where(done, torch.zeros_like(reward), reward).float()
        terminated = terminated & ~done
        truncated = truncated & ~done
        self.state = state
        self.prev_done = terminated | truncated
        return as_arrays((self.observe(state), reward, terminated, truncated, {}), self.arrays)

    def _actions(self, actions: Any) -> torch.Tensor:
        a = torch.as_tensor(actions, device=self.device)
        if isinstance(self.single_action_space, gym.spaces.Discrete):
            a = a.reshape(-1).long()
            if a.shape != (self.num_envs,):
                raise ValueError(f"expected {self.num_envs} actions, got shape {tuple(a.shape)}")
            # Checked for host input; a tensor already on an accelerator (the policy's own samples)
            # is trusted, since reading the check back would stall every step on the host.
            on_host = not isinstance(actions, torch.Tensor) or actions.device.type == "cpu"
            if on_host and bool(((a < 0) | (a >= self.single_action_space.n)).any()):
                raise ValueError(
                    f"actions must be in Discrete({self.single_action_space.n}), "
                    f"got {a.tolist()[:8]}"
                )
            return a
        a = a.to(torch.float64).reshape(self.num_envs, -1)
        return a


class TorchCartPole(TorchControlVectorEnv):
    """CartPole-v1 (Barto, Sutton and Anderson): Gymnasium's constants and Euler integration."""

    gym_id = "CartPole-v1"
    max_episode_steps = 500
    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    theta_threshold = 12 * 2 * math.pi / 360
    x_threshold = 2.4
    _high = np.array([x_threshold * 2, np.inf, theta_threshold * 2, np.inf], dtype=np.float32)
    single_observation_space = gym.spaces.Box(-_high, _high, dtype=np.float32)
    single_action_space = gym.spaces.Discrete(2)

    def initial_numpy(self, rng):
        return rng.uniform(low=-0.05, high=0.05, size=(4,))

    def initial_torch(self, n):
        return (
            torch.rand((n, 4), generator=self._gen, device=self.device, dtype=torch.float64) * 0.1
            - 0.05
        )

    def dynamics(self, state, action):
        x, x_dot, theta, theta_dot = state.unbind(1)
        force = torch.where(action == 1, self.force_mag, -self.force_mag).to(state.dtype)
        cos, sin = torch.cos(theta), torch.sin(theta)
        total_mass = self.masspole + self.masscart
        polemass_length = self.masspole * self.length
        temp = (force + polemass_length * theta_dot**2 * sin) / total_mass
        thetaacc = (self.gravity * sin - cos * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * cos**2 / total_mass)
        )
        xacc = temp - polemass_length * thetaacc * cos / total_mass
        x, x_dot = x + self.tau * x_dot, x_dot + self.tau * xacc
        theta, theta_dot = theta + self.tau * theta_dot, theta_dot + self.tau * thetaacc
        terminated = (
            (x < -self.x_threshold)
            | (x > self.x_threshold)
            | (theta < -self.theta_threshold)
            | (theta > self.theta_threshold)
        )
        return torch.stack([x, x_dot, theta, theta_dot], 1), torch.ones_like(x), terminated


class TorchMountainCar(TorchControlVectorEnv):
    """MountainCar-v0 (Moore): reach the flag on the right hill; -1 per step."""

    gym_id = "MountainCar-v0"
    max_episode_steps = 200
    min_position, max_position, max_speed, goal_position = -1.2, 0.6, 0.07, 0.5
    force, gravity = 0.001, 0.0025
    single_observation_space = gym.spaces.Box(
        np.array([min_position, -max_speed], dtype=np.float32),
        np.array([max_position, max_speed], dtype=np.float32),
        dtype=np.float32,
    )
    # gym.Space: TorchMountainCarContinuous keeps these dynamics with a Box of pushes.
    single_action_space: gym.Space = gym.spaces.Discrete(3)

    def initial_numpy(self, rng):
        return np.array([rng.uniform(low=-0.6, high=-0.4), 0])

    def initial_torch(self, n):
        pos = (
            torch.rand(n, generator=self._gen, device=self.device, dtype=torch.float64) * 0.2 - 0.6
        )
        return torch.stack([pos, torch.zeros_like(pos)], 1)

    def _move(self, state, push):
        position, velocity = state.unbind(1)
        velocity = (velocity + (push - self.gravity * torch.cos(3 * position))).clamp(
            -self.max_speed, self.max_speed
        )
        position = (position + velocity).clamp(self.min_position, self.max_position)
        velocity = torch.where(
            (position == self.min_position) & (velocity < 0), torch.zeros_like(velocity), velocity
        )
        terminated = (position >= self.goal_position) & (velocity >= 0)
        return torch.stack([position, velocity], 1), terminated

    def dynamics(self, state, action):
        state, terminated = self._move(state, (action - 1).to(state.dtype) * self.force)
        return state, -torch.ones(self.num_envs, dtype=state.dtype, device=state.device), terminated


class TorchMountainCarContinuous(TorchMountainCar):
    """MountainCarContinuous-v0: a continuous push; +100 at the flag, minus 0.1·action² per step.
    Gymnasium keeps this env's state in float32 between steps; so does this one."""

    gym_id = "MountainCarContinuous-v0"
    max_episode_steps = 999
    goal_position, power = 0.45, 0.0015
    single_action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def dynamics(self, state, action):
        a = action[:, 0]
        force = a.clamp(-1.0, 1.0)
        state, terminated = self._move(state, force * self.power)
        reward = torch.where(terminated, 100.0, 0.0).to(state.dtype) - a**2 * 0.1
        return state.float().double(), reward, terminated


class TorchPendulum(TorchControlVectorEnv):
    """Pendulum-v1: swing up and balance; cost θ² + 0.1·θ̇² + 0.001·u²."""

    gym_id = "Pendulum-v1"
    max_episode_steps = 200
    # Gymnasium's names, but its pole length `l` is spelt out (ruff E741: l reads as 1).
    max_speed, max_torque, dt, g, m, length = 8.0, 2.0, 0.05, 10.0, 1.0, 1.0
    single_observation_space = gym.spaces.Box(
        -np.array([1.0, 1.0, 8.0], dtype=np.float32),
        np.array([1.0, 1.0, 8.0], dtype=np.float32),
        dtype=np.float32,
    )
    single_action_space = gym.spaces.Box(-2.0, 2.0, (1,), dtype=np.float32)

    def initial_numpy(self, rng):
        high = np.array([np.pi, 1.0])
        return rng.uniform(low=-high, high=high)

    def initial_torch(self, n):
        u = torch.rand((n, 2), generator=self._gen, device=self.device, dtype=torch.float64) * 2 - 1
        return u * torch.tensor([math.pi, 1.0], dtype=torch.float64, device=self.device)

    def dynamics(self, state, action):
        th, thdot = state.unbind(1)
        # Gymnasium computes the action's terms in float32 (the action's dtype): so does this.
        u = action[:, 0].float().clamp(-self.max_torque, self.max_torque)
        normalized = ((th + math.pi) % (2 * math.pi)) - math.pi
        costs = normalized**2 + 0.1 * thdot**2 + 0.001 * u**2
        thdot = (
            thdot
            + (3 * self.g / (2 * self.length) * torch.sin(th) + 3.0 / (self.m * self.length**2) * u)
            * self.dt
        ).clamp(-self.max_speed, self.max_speed)
        th = th + thdot * self.dt
        return torch.stack([th, thdot], 1), -costs, torch.zeros_like(th, dtype=torch.bool)

    def observe(self, state):
        th, thdot = state.unbind(1)
        return torch.stack([torch.cos(th), torch.sin(th), thdot], 1).float()


class TorchAcrobot(TorchControlVectorEnv):
    """Acrobot-v1 (Sutton 1996, the "book" dynamics): swing the tip above the line; -1 per step.
    One RK4 step of dt = 0.2, as Gymnasium integrates it."""

    gym_id = "Acrobot-v1"
    max_episode_steps = 500
    dt = 0.2
    l1, m1, m2, lc1, lc2, moi = 1.0, 1.0, 1.0, 0.5, 0.5, 1.0
    max_vel_1, max_vel_2 = 4 * math.pi, 9 * math.pi
    _high = np.array([1.0, 1.0, 1.0, 1.0, max_vel_1, max_vel_2], dtype=np.float32)
    single_observation_space = gym.spaces.Box(-_high, _high, dtype=np.float32)
    single_action_space = gym.spaces.Discrete(3)

    def initial_numpy(self, rng):
        return rng.uniform(low=-0.1, high=0.1, size=(4,)).astype(np.float32)

    def initial_torch(self, n):
        draw = (
            torch.rand((n, 4), generator=self._gen, device=self.device, dtype=torch.float64) * 0.2
            - 0.1
        )
        return draw.float().double()

    def _dsdt(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        m1, m2, l1, lc1, lc2, i1, g = self.m1, self.m2, self.l1, self.lc1, self.lc2, self.moi, 9.8
        theta1, theta2, dtheta1, dtheta2 = s.unbind(1)
        d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * torch.cos(theta2)) + i1 + i1
        d2 = m2 * (lc2**2 + l1 * lc2 * torch.cos(theta2)) + i1
        phi2 = m2 * lc2 * g * torch.cos(theta1 + theta2 - math.pi / 2.0)
        phi1 = (
            -m2 * l1 * lc2 * dtheta2**2 * torch.sin(theta2)
            - 2 * m2 * l1 * lc2 * dtheta2 * dtheta1 * torch.sin(theta2)
            + (m1 * lc1 + m2 * l1) * g * torch.cos(theta1 - math.pi / 2)
            + phi2
        )
        ddtheta2 = (a + d2 / d1 * phi1 - m2 * l1 * lc2 * dtheta1**2 * torch.sin(theta2) - phi2) / (
            m2 * lc2**2 + i1 - d2**2 / d1
        )
        ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
        return torch.stack([dtheta1, dtheta2, ddtheta1, ddtheta2], 1)

    def dynamics(self, state, action):
        a = (action - 1).to(state.dtype)  # torques -1, 0, +1
        dt, dt2 = self.dt, self.dt / 2.0
        k1 = self._dsdt(state, a)
        k2 = self._dsdt(state + dt2 * k1, a)
        k3 = self._dsdt(state + dt2 * k2, a)
        k4 = self._dsdt(state + dt * k3, a)
        ns = state + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        t1, t2 = _wrap(ns[:, 0]), _wrap(ns[:, 1])
        v1, v2 = (
            ns[:, 2].clamp(-self.max_vel_1, self.max_vel_1),
            ns[:, 3].clamp(-self.max_vel_2, self.max_vel_2),
        )
        terminated = -torch.cos(t1) - torch.cos(t2 + t1) > 1.0
        reward = torch.where(terminated, 0.0, -1.0).to(state.dtype)
        return torch.stack([t1, t2, v1, v2], 1), reward, terminated

    def observe(self, state):
        t1, t2, v1, v2 = state.unbind(1)
        return torch.stack(
            [torch.cos(t1), torch.sin(t1), torch.cos(t2), torch.sin(t2), v1, v2], 1
        ).float()


def _wrap(x: torch.Tensor) -> torch.Tensor:
    """Gymnasium's ``wrap(x, -π, π)``: shift by whole turns of 2π until inside."""
    diff = 2 * math.pi
    x = torch.where(x > math.pi, x - torch.ceil((x - math.pi) / diff) * diff, x)
    return torch.where(x < -math.pi, x + torch.ceil((-math.pi - x) / diff) * diff, x)


TORCH_CONTROL = {
    f"Torch{cls.gym_id}": cls
    for cls in (
        TorchCartPole,
        TorchAcrobot,
        TorchPendulum,
        TorchMountainCar,
        TorchMountainCarContinuous,
    )
}
"""Registered as ``textenv/Torch<Gymnasium id>`` (``textenv/TorchCartPole-v1``, ...)."""


def torch_control_class(env_id: str) -> type[TorchControlVectorEnv] | None:
    """The :class:`TorchControlVectorEnv` subclass registered as ``env_id``'s vector entry point
    (``textenv/Torch*``, or a user's own subclass), or None for any other id."""
    spec = gym.envs.registration.registry.get(env_id)
    entry: object = spec.vector_entry_point if spec is not None else None
    if isinstance(entry, str):
        if ":" not in entry:
            return None
        entry = gym.envs.registration.load_env_creator(entry)
    return entry if isinstance(entry, type) and issubclass(entry, TorchControlVectorEnv) else None


def gymnasium_twin(env_id: str) -> str | None:
    """The Gymnasium id whose dynamics ``env_id`` runs (``"textenv/TorchCartPole-v1"`` ->
    ``"CartPole-v1"``), or None for any other id."""
    cls = torch_control_class(env_id)
    return cls.gym_id or None if cls is not None else None
