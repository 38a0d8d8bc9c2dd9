"""MLP actor-critics for vector observations: categorical (Discrete) or diagonal Gaussian (Box),
the latter optionally with generalized state-dependent exploration (gSDE)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_SDE_EPS = 1e-6  # added to gSDE's variance, as SB3 does: features can all be 0 (ReLU)


def layer_init(layer: nn.Linear, std: float = math.sqrt(2.0), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain ``std`` and constant bias (PPO implementation detail #2)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def forward_mlp(net: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` for a Linear/Tanh/ReLU stack without nn.Module's per-call dispatch, which costs
    more than the matmuls themselves at rollout batch sizes of a few rows."""
    for layer in net:
        if isinstance(layer, nn.Linear):
            x = F.linear(x, layer.weight, layer.bias)
        else:
            x = torch.tanh(x) if isinstance(layer, nn.Tanh) else torch.relu(x)
    return x


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(
    in_dim: int,
    hidden: tuple[int, ...],
    out_dim: int,
    out_std: float,
    activation: str = "tanh",
    ortho_init: bool = True,
) -> nn.Sequential:
    """MLP (tanh or ReLU hidden layers) with orthogonal init, the output layer's gain ``out_std``;
    ``ortho_init=False`` keeps PyTorch's default ``nn.Linear`` init (SB3's ``ortho_init=False``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    init = layer_init if ortho_init else (lambda layer, **_: layer)
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [init(nn.Linear(in_dim, width)), ACTIVATIONS[activation]()]
        in_dim = width
    layers.append(init(nn.Linear(in_dim, out_dim), std=out_std))
    return nn.Sequential(*layers)


class MLPActorCritic(nn.Module):
    """Separate actor and critic MLPs, as in the PPO reference implementation.

    The actor's last layer starts at gain 0.01 so the initial policy is near uniform (or has
    mean ≈ 0), the critic's at gain 1. For ``Box`` actions the policy is a diagonal Gaussian
    with a state-independent, learned log-std; sampled actions are not clipped here (the env
    wrapper clips what the env sees, the log-prob is of the unclipped sample).

    ``use_sde=True`` is gSDE (Raffin et al., CoRL 2021; SB3's ``use_sde`` with its defaults): the
    exploration noise of env ``i`` is ``z(s) @ E_i``, ``z(s)`` the actor's last hidden features
    (detached) and ``E_i`` a matrix drawn from N(0, σ²) by :meth:`reset_noise` and held between
    draws, so exploration is smooth in time. ``σ = exp(actor_logstd)`` is ``[features, actions]``;
    action ``j`` is N(μ_j(s), Σ_k z_k(s)² σ_kj²), the density the update scores.
    """

    def __init__(
        self,
        observation_space: gym.Space,  # a Box; checked below, as envs type their spaces Space
        action_space: gym.Space,  # a Discrete or a Box
        hidden_sizes: tuple[int, ...] = (64, 64),
        log_std_init: float = 0.0,
        activation: str = "tanh",
        ortho_init: bool = True,
        use_sde: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(observation_space, gym.spaces.Box):
            raise TypeError(
                f"MLPActorCritic needs a Box observation space, got {observation_space}"
            )
        obs_dim = int(np.prod(observation_space.shape))
        self.continuous = isinstance(action_space, gym.spaces.Box)
        if isinstance(action_space, gym.spaces.Box):
            act_dim = int(np.prod(action_space.shape))
        elif isinstance(action_space, gym.spaces.Discrete):
            act_dim = int(action_space.n)
        else:
            raise TypeError(f"MLPActorCritic supports Discrete and Box actions, got {action_space}")
        if use_sde and not self.continuous:
            raise ValueError(f"use_sde needs continuous (Box) actions, got {action_space}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.hidden_sizes = tuple(hidden_sizes)
        self.critic = mlp(
            obs_dim, self.hidden_sizes, 1, out_std=1.0, activation=activation, ortho_init=ortho_init
        )
        self.actor = mlp(
            obs_dim,
            self.hidden_sizes,
            act_dim,
            out_std=0.01,
            activation=activation,
            ortho_init=ortho_init,
        )
        self.use_sde = use_sde
        self.exploration: torch.Tensor | None = (
            None  # gSDE's [envs, features, actions] noise matrices
        )
        if self.continuous:
            rows = (self.hidden_sizes[-1] if self.hidden_sizes else obs_dim) if use_sde else 1
            self.actor_logstd = nn.Parameter(torch.full((rows, act_dim), float(log_std_init)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s), shape ``[B]``."""
        return forward_mlp(self.critic, obs).squeeze(-1)

    def reset_noise(self, num_envs: int) -> None:
        """gSDE: draw each env's exploration matrix afresh from N(0, σ²) (torch's global RNG)."""
        std = self.actor_logstd.detach().exp()
        self.exploration = torch.randn((num_envs, *std.shape), device=std.device) * std

    def _sde_mean_std(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gSDE's ``(mean, std, features)``: the features are the actor's last hidden layer,
        detached, so exploration does not train them (SB3's ``learn_features=False``)."""
        *body, head = self.actor
        assert isinstance(head, nn.Linear)  # mlp() ends in the output layer
        hidden = forward_mlp(body, obs)
        mean = F.linear(hidden, head.weight, head.bias)  # the mean trains the hidden layers
        features = hidden.detach()
        variance = features.square() @ (2.0 * self.actor_logstd).exp()
        return mean, (variance + _SDE_EPS).sqrt(), features

    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample ``(action, log π(action|obs), V(obs))`` for a batch of observations. With gSDE,
        ``obs`` is ``[..., envs, obs]`` and the noise matrices of the last :meth:`reset_noise` are
        used (drawn here if there are none or they were drawn for another number of envs)."""
        value = forward_mlp(self.critic, obs).squeeze(-1)
        if self.use_sde:
            mean, std, features = self._sde_mean_std(obs)
            num_envs = features.shape[-2]  # [..., envs, features]: row i uses env i's matrix
            if self.exploration is None or self.exploration.shape[0] != num_envs:
                self.reset_noise(num_envs)
            action = mean + torch.einsum("...nf,nfa->...na", features, self.exploration)
            z = (action - mean) / std
            return action, (-0.5 * z.square() - std.log() - _LOG_SQRT_2PI).sum(-1), value
        out = forward_mlp(self.actor, obs)
        if self.continuous:
            std = self.actor_logstd.exp()
            noise = torch.randn_like(out)
            action = out + std * noise
            # log N(a; μ, σ) with (a-μ)/σ = noise, summed over independent action dimensions.
            logprob = (-0.5 * noise.square() - self.actor_logstd - _LOG_SQRT_2PI).sum(-1)
            return action, logprob, value
        logp = torch.log_softmax(out, dim=-1)
        # Gumbel-max draws from softmax(out) with cheaper ops than torch.multinomial.
        gumbel = -torch.empty_like(logp).exponential_().log()
        action = (logp + gumbel).argmax(dim=-1)
        return action, logp.gather(-1, action.unsqueeze(-1)).squeeze(-1), value

    def evaluate(
        self, obs: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log π(action|obs), entropy, V(obs))`` under the current parameters."""
        value = forward_mlp(self.critic, obs).squeeze(-1)
        if self.use_sde:
            mean, std, _ = self._sde_mean_std(obs)
            z = (action - mean) / std
            logprob = (-0.5 * z.square() - std.log() - _LOG_SQRT_2PI).sum(-1)
            return logprob, (0.5 + _LOG_SQRT_2PI + std.log()).sum(-1), value
        out = forward_mlp(self.actor, obs)
        if self.continuous:
            log_std = self.actor_logstd.expand_as(out)
            z = (action - out) * torch.exp(-log_std)
            logprob = (-0.5 * z.square() - log_std - _LOG_SQRT_2PI).sum(-1)
            entropy = (0.5 + _LOG_SQRT_2PI + log_std).sum(-1)
            return logprob, entropy, value
        logp = torch.log_softmax(out, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, action.long().unsqueeze(-1)).squeeze(-1), entropy, value

    def action_std(self, obs: torch.Tensor) -> torch.Tensor:
        """The Gaussian's mean standard deviation (at ``obs``, which only gSDE's depends on)."""
        if self.use_sde:
            return self._sde_mean_std(obs)[1].mean()
        return self.actor_logstd.exp().mean()

    def deterministic_action(self, obs: torch.Tensor) -> torch.Tensor:
        """The mode: argmax for categorical, the mean for Gaussian."""
        out = forward_mlp(self.actor, obs)
        return out if self.continuous else out.argmax(dim=-1)
