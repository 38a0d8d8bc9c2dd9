"""The KL-penalised RLHF reward, from what the text env reports.

The env owns β (its ``kl_coef``) and the reference model. Its ``reward`` is
``score · 1[last] + β · log π_ref(a_t | s_t)`` (with ``reference_pass="at_end"`` the same
return, paid at the last token), which any Gymnasium agent can maximise as it is. The
standard per-token reward of Ziegler et al. (2019) and InstructGPT also subtracts
``β · log π(a_t | s_t)``, which only the agent knows (it sampled the token):

    r_t = score · 1[t = last] − β · (log π(a_t | s_t) − log π_ref(a_t | s_t))

:func:`kl_penalized_rewards` is that formula, one function for every agent, ours or not.
"""

from __future__ import annotations

import torch


def kl_penalized_rewards(
    scores: torch.Tensor,
    ref_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards ``[N, T]`` of ``N`` responses laid out over ``T`` token columns.

    Args:
        scores: ``[N]`` each response's task score (``info["score"]`` when it ended), paid at its
            last token; or ``[N, T]`` rewards per token (a multi-turn episode's turn rewards,
            ``info["turn_reward"]``, at the tokens that ended the turns), paid where they are.
        ref_logprobs: ``[N, T]`` ``log π_ref`` of each response token (``info["ref_logprob"]``
            step by step, or ``info["ref_logprobs"]`` with ``reference_pass="at_end"``).
        logprobs: ``[N, T]`` ``log π`` of each token under the distribution it was sampled from.
        mask: ``[N, T]`` 1 on response tokens (up to and including EOS), 0 after.
        kl_coef: β, the env's ``kl_coef``.

    Nothing is paid past a row's last masked token.
    """
    rewards = (
        -kl_coef * (logprobs - ref_logprobs) * mask
    )  # a bool or integer mask promotes to float
    if scores.dim() == 2:
        return rewards + scores.to(rewards.dtype) * mask
    rows = torch.arange(mask.shape[0], device=mask.device)
    last = (mask.sum(1).long() - 1).clamp_min(0)
    rewards[rows, last] += scores.to(rewards.dtype) * (mask.sum(1) > 0)
    return rewards
