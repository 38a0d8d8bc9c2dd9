"""Critic-free advantage estimators over sampled responses, for the same PPO update as GAE.

A batch of ``N`` responses is laid out in groups of ``k`` consecutive rows that share a prompt
(rows ``g*k .. g*k+k-1``). Each estimator turns the per-token rewards ``[N, T]`` (the score on a
response's last token, minus β·KL per token when the KL is in the reward) into per-token
advantages ``[N, T]``, zero after a response's end:

- ``grpo`` (Shao et al. 2024): the response's return minus its group's mean, divided by the
  group's standard deviation (``scale=False``: not divided, as Dr. GRPO, Liu et al. 2025).
- ``rloo`` (Ahmadian et al. 2024): the return minus the mean of the *other* responses of its group.
- ``reinforce_pp`` (REINFORCE++, Hu 2025): the per-token return to go of the KL-shaped reward,
  whitened over the batch's response tokens; no group needed.

For ``grpo`` and ``rloo`` a response's return is the sum of its rewards (γ = 1), and every token
of the response gets the response's advantage.
"""

from __future__ import annotations

import torch

from textenv.agents.ppo import normalize

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = ("grpo", "rloo")  # a baseline from the other responses to the same prompt
GRPO_EPS = 1e-4  # added to the group std, as TRL's GRPOTrainer does


def needs_critic(estimator: str) -> bool:
    """Only GAE bootstraps from a value function; the others build no value head."""
    return estimator == "gae"


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.shape[0] % group_size:  # group_size >= 2 was checked by the caller
        raise ValueError(f"group_size={group_size} must divide the batch of {x.shape[0]} responses")
    return x.reshape(-1, group_size)


def grpo_advantages(returns: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """``(R_i - mean_g R) / (std_g R + 1e-4)`` per response (std with Bessel's correction, as
    ``torch.std``); ``scale=False`` leaves out the division. ``returns``: ``[N]``."""
    if group_size < 2:
        raise ValueError(
            "grpo needs group_size >= 2 (the spread of one response is undefined), "
            f"got {group_size}"
        )
    g = _groups(returns, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (g.std(dim=1, keepdim=True) + GRPO_EPS)
    return centred.reshape(-1)


def rloo_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """``R_i - mean_{j != i} R_j`` over each group (the leave-one-out baseline).

    ``returns``: ``[N]``."""
    if group_size < 2:
        raise ValueError(
            "rloo needs group_size >= 2 (a leave-one-out baseline over a group of 1 is undefined), "
            f"got {group_size}"
        )
    g = _groups(returns, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = sum_{s >= t} γ^(s-t) r_s`` within each response (``[N, T]``), 0 after its end."""
    rewards = torch.where(mask > 0, rewards, torch.zeros_like(rewards))
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def critic_free_advantages(
    estimator: str,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    gamma: float = 1.0,
    grpo_scale: bool = True,
    dist=None,
) -> torch.Tensor:
    """Per-token advantages ``[N, T]`` of ``grpo``, ``rloo`` or ``reinforce_pp`` (see the module).
    With ``dist`` (several processes), reinforce_pp whitens over every rank's tokens; a group
    never spans ranks, so grpo and rloo need nothing global."""
    if estimator == "reinforce_pp":
        return normalize(returns_to_go(rewards, mask, gamma), mask, dist=dist) * mask
    per_response = torch.where(mask > 0, rewards, torch.zeros_like(rewards)).sum(dim=1)
    if estimator == "grpo":
        adv = grpo_advantages(per_response, group_size, grpo_scale)
    elif estimator == "rloo":
        adv = rloo_advantages(per_response, group_size)
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS[1:]} here, got {estimator!r}")
    return adv.unsqueeze(1) * mask
