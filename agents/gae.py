"""Generalised Advantage Estimation (Schulman et al. 2016), once for every trainer."""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    last_value: torch.Tensor,
    terminated: torch.Tensor,
    ended: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(γ, λ) over a rollout laid out time-major, shape ``[T, ...]``.

    Row ``t`` is the transition ``(s_t, a_t) -> (r_t, s_{t+1})``:

    - ``values[t] = V(s_t)`` and ``last_value = V(s_T)`` (the observation after the rollout);
    - ``terminated[t]``: ``s_{t+1}`` is terminal, so nothing is bootstrapped from it;
    - ``ended[t]``: the episode ended at ``t`` (terminated or truncated), so advantages do not
      flow from ``t+1`` back into ``t``.

    A truncated step (``ended`` but not ``terminated``) bootstraps from ``V(s_{t+1})``. With
    Gymnasium 1.x's next-step autoreset, ``s_{t+1}`` is the episode's final observation, which
    is also the observation stored at row ``t+1``; that row's own transition is the reset step
    and must be masked out of the loss by the caller (its advantage is meaningless).

    Returns ``(advantages, returns)`` with ``returns = advantages + values``.
    """
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gae: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    num_steps = rewards.shape[0]
    not_terminated = 1.0 - terminated.to(rewards.dtype)
    not_ended = 1.0 - ended.to(rewards.dtype)
    next_values = torch.cat([values[1:], last_value.unsqueeze(0)], dim=0)
    # The deltas are one vector op; only the λ-recursion needs the reverse loop over time.
    deltas = rewards + gamma * next_values * not_terminated - values
    decay = gamma * lam * not_ended
    advantages = torch.empty_like(rewards)
    running = torch.zeros_like(last_value, dtype=rewards.dtype)
    for t in range(num_steps - 1, -1, -1):
        running = deltas[t] + decay[t] * running
        advantages[t] = running
    return advantages, advantages + values
