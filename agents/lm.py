"""Language-model actor-critic: a causal LM as the policy, a value head, sampling helpers."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from textenv.agents.ppo import Columns, Packing
from textenv.models import cache_kwargs, disable_dropout, output_cache


class LMActorCritic(nn.Module):
    """A causal LM as the policy and a linear value head on its last hidden states.

    The head reads the hidden state the LM's own forward returns (``output_hidden_states``),
    so the logits are exactly the model's, whatever post-processing its head does. Dropout is
    turned off in the model (:func:`textenv.models.disable_dropout`): the update's forward must
    be the sampling forward, or the first ratio of PPO is not 1.

    ``value_head=False`` builds no head (for critic-free estimators such as GRPO): the values
    returned are zeros, and the LM's forward skips returning its hidden states.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        value_head: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(
                f"top_k must be >= 0 and top_p in (0, 1], got top_k={top_k}, top_p={top_p}"
            )
        self.lm = disable_dropout(model)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.value_head: nn.Linear | None = None
        if value_head:
            self.value_head = nn.Linear(model.config.get_text_config().hidden_size, 1)
            # Zero init: the critic starts at V = 0 and learns from the returns, not from noise.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(next(model.parameters()).device)

    def _forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        past_key_values=None,
        logits_to_keep: int = 0,
        use_cache: bool = False,
        cache_position: torch.Tensor | None = None,
    ):
        cache = cache_kwargs(self.lm, past_key_values) if past_key_values is not None else {}
        if cache_position is not None:  # a static cache: the slots this chunk writes
            cache["cache_position"] = cache_position
        critic = self.value_head is not None
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=critic,
            logits_to_keep=logits_to_keep,
            **cache,
        )
        logits = out.logits.float() / self.temperature
        if self.value_head is not None:
            hidden = out.hidden_states[-1]
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        else:
            values = torch.zeros(logits.shape[:2], device=logits.device)
        return logits, values, output_cache(out) if use_cache else None

    def evaluate_responses(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        actions: torch.Tensor,
        prompt_len: int,
        entropy_grad: bool = True,
        positions: torch.Tensor | None = None,
        columns: Columns | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log π(a_t|s_t), entropy_t, V(s_t))`` for the ``T`` actions, one full forward.

        ``input_ids`` is ``[n, prompt_len + T]`` in the env's layout; the logits at position
        ``prompt_len + t - 1`` give the distribution of response token ``t``. In a multi-turn
        conversation the env's tokens sit between the agent's: ``positions`` ``[n, T]`` gives the
        column of each action in ``input_ids`` (the logits one column before give its
        distribution). With ``entropy_grad=False`` the entropy is a detached diagnostic (no
        backward through the full-vocabulary softmax when the loss has no entropy bonus).
        Log-probs are of the tempered distribution after this policy's top-k/top-p filter: the
        distribution :func:`textenv.agents.text.collect_rollout` samples from.

        ``columns`` ``(start, end, length)``, a packed micro-batch's (:func:`response_packing`):
        only input columns ``[start, end)`` are forwarded and the first ``length`` actions scored,
        the columns outside being padding in every row.
        """
        if columns is not None:
            start, end, length = columns
            input_ids, attention_mask = input_ids[:, start:end], attention_mask[:, start:end]
            actions, prompt_len = actions[:, :length], prompt_len - start
            if positions is not None:
                positions = positions[:, :length] - start
        T = actions.shape[1]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        if positions is None:
            logits, values, _ = self._forward(
                input_ids, attention_mask, position_ids, logits_to_keep=T + 1
            )
            logits, values = logits[:, :T], values[:, :T]
        else:
            keep = input_ids.shape[1] - prompt_len + 1
            logits, values, _ = self._forward(
                input_ids, attention_mask, position_ids, logits_to_keep=keep
            )
            j = (positions - prompt_len).clamp(
                0, keep - 1
            )  # logits[:, j] are at column prompt_len - 1 + j
            logits = logits.gather(1, j.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            values = values.gather(1, j)
        # The distribution the rollout sampled from: a ratio compares it with itself.
        logp_all = torch.log_softmax(filter_logits(logits, self.top_k, self.top_p), dim=-1)
        logprob = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_of(logp_all)
        return logprob, entropy, values


def response_packing(
    attention_mask: torch.Tensor,
    mask: torch.Tensor,
    prompt_len: int,
    positions: torch.Tensor | None = None,
) -> Packing:
    """Where each row of a rollout lies, for :func:`textenv.agents.ppo.ppo_update` to pack its
    micro-batches by length: its first attended column (prompts are left-padded), one past its
    last action's column and its response up to its last counted token (``mask``). In the
    layout of :meth:`LMActorCritic.evaluate_responses`; no host sync."""
    T = mask.shape[1]
    columns = torch.arange(1, T + 1, device=mask.device)
    lengths = torch.where(mask > 0, columns, 0).amax(1).clamp_min(1)
    starts = (attention_mask > 0).long().argmax(1)
    if positions is None:  # the actions are the columns after the prompt
        ends = prompt_len + lengths
    else:
        ends = positions.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1) + 1
    return Packing(starts=starts, ends=ends, lengths=lengths)


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dimension from log-probs; a ``-inf`` entry (a filtered or masked
    token) contributes 0 to the value and to the gradient, not ``0 · -inf = NaN``."""
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k / nucleus filtering (``-inf`` outside the kept set); the identity with ``top_k=0``
    and ``top_p=1``.

    The rollout and :meth:`LMActorCritic.evaluate_responses` both apply it, so PPO's ratio is of
    the filtered distribution on both sides. The env's reference scores the unfiltered one, so
    a KL to it would not be 0 for a policy equal to it: the text trainer refuses top-k/top-p
    (as TRL's PPO does) and evaluation accepts them.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = (
            cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        )  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_categorical(
    probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One index per row of ``probs`` (rows need not be normalised): inverse-CDF sampling, one
    uniform per row; over a large vocabulary it is far cheaper than ``torch.multinomial``.
    Zero-probability entries are never drawn (``right=True`` skips flat steps of the CDF)."""
    cdf = probs.double().cumsum(-1)
    u = (
        torch.rand(probs.shape[0], 1, device=probs.device, generator=generator, dtype=cdf.dtype)
        * cdf[:, -1:]
    )
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)
