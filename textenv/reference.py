"""The frozen reference model's scoring of the batch's tokens, one strategy per pass.

``per_step`` (:class:`PerStepReference`) steps the reference with a KV cache, one token per env
step, so ``log π_ref(a_t | s_t)`` is paid at each token. ``at_end`` (:class:`AtEndReference`)
reads each finished sequence in one forward when it ends (faster; the same return). Both score
at the policy's sampling temperature: a KL between differently tempered distributions is not 0
even when the policy is the reference.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import PreTrainedModel

from textenv.models import cache_kwargs, output_cache

REFERENCE_PASSES = ("per_step", "at_end")


def check_temperature(value: float) -> float:
    if not value > 0:
        raise ValueError(f"temperature must be > 0, got {value}")
    return float(value)


class ReferenceScoring:
    """The frozen reference model and the temperature it scores tokens at; subclasses say when it
    runs. Rows are the batch's rows; ``ids`` and ``mask`` are their columns from the first one
    any row uses (``start``) on."""

    name: ClassVar[str]

    def __init__(self, model: PreTrainedModel, temperature: float) -> None:
        self.model = model
        self.temperature = check_temperature(temperature)

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """``log π_ref`` over the vocabulary at the sampling temperature."""
        return torch.log_softmax(logits.float() / self.temperature, dim=-1)

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """A full reset: every row begins with these prompt columns."""

    def token_logprobs(self, actions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``[N]`` what this step pays per row: ``log π_ref`` of its action (0 for rows that have
        ended), or 0 everywhere when the reference runs at the end."""
        return torch.zeros(actions.shape[0], device=actions.device)

    def advance(
        self, actions: torch.Tensor, active: torch.Tensor, pad_id: int, attention: torch.Tensor
    ) -> None:
        """Every row took a step: ``actions`` of the ``active`` rows (the others feed ``pad_id``);
        ``attention`` is the batch's mask up to and including the new column."""

    def sequence_logprobs(
        self, ids: torch.Tensor, mask: torch.Tensor, width: int
    ) -> torch.Tensor | None:
        """``[k, width]`` ``log π_ref`` of the last ``width`` tokens of finished rows (0 where the
        mask is 0), or None when they were paid step by step."""
        return None

    def close(self) -> None:
        """Drop what the scoring holds between steps."""


class PerStepReference(ReferenceScoring):
    """One KV-cached reference step per env step: ``log π_ref`` of each action, paid at once.

    ``static_budget=B``: the cache is transformers' ``StaticCache``, allocated at the reset for
    the prompt columns plus ``B`` steps, so every step has the same shapes (for
    ``torch.compile``/CUDA graphs); it scores as the dynamic cache does (tested)."""

    name = "per_step"

    def __init__(
        self, model: PreTrainedModel, temperature: float, static_budget: int | None = None
    ) -> None:
        super().__init__(model, temperature)
        self.cache = None
        self.next_logprobs: torch.Tensor | None = None  # [N, vocab] for the next token
        self.static_budget = static_budget
        self.max_len = 0  # a static cache's length

    def _static(self, attention: torch.Tensor, width: int) -> dict:
        """A static cache's forward arguments: the mask over all its slots and the slots the
        ``width`` new columns write."""
        if self.static_budget is None:
            return {"attention_mask": attention}
        written = attention.shape[1] - width
        return {
            "attention_mask": torch.nn.functional.pad(
                attention, (0, self.max_len - attention.shape[1])
            ),
            "cache_position": torch.arange(written, written + width, device=attention.device),
        }

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        position_ids = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
        cache = {}
        if self.static_budget is not None:
            from transformers import StaticCache

            self.max_len = prompt_ids.shape[1] + self.static_budget
            cache = cache_kwargs(
                self.model, StaticCache(config=self.model.config, max_cache_len=self.max_len)
            )
        out = self.model(
            input_ids=prompt_ids,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **self._static(prompt_mask, prompt_ids.shape[1]),
            **cache,
        )
        self.cache = output_cache(out)
        self.next_logprobs = self.logprobs(out.logits[:, -1])

    def token_logprobs(self, actions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        assert self.next_logprobs is not None  # start() ran at the reset
        ref_lp = self.next_logprobs.gather(1, actions.unsqueeze(1)).squeeze(1)
        return torch.where(active, ref_lp, torch.zeros_like(ref_lp))

    def advance(
        self, actions: torch.Tensor, active: torch.Tensor, pad_id: int, attention: torch.Tensor
    ) -> None:
        # Rows that had ended feed padding with mask 0, so the batch's mask is exactly the
        # cache's attention mask; every row holds a prompt token and one more, so position >= 1.
        tokens = torch.where(active, actions, torch.full_like(actions, pad_id))
        attention = attention.contiguous()
        position_ids = attention.sum(-1, keepdim=True) - 1
        out = self.model(
            input_ids=tokens.unsqueeze(1),
            position_ids=position_ids,
            use_cache=True,
            **self._static(attention, 1),
            **cache_kwargs(self.model, self.cache),
        )
        self.cache = output_cache(out)
        self.next_logprobs = self.logprobs(out.logits[:, -1])

    def close(self) -> None:
        self.cache = None


class AtEndReference(ReferenceScoring):
    """One forward per finished sequence, when it ends: its ``log π_ref`` paid as one sum."""

    name = "at_end"

    def sequence_logprobs(
        self, ids: torch.Tensor, mask: torch.Tensor, width: int
    ) -> torch.Tensor | None:
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        # The logits at the column before each token give its distribution.
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=width + 1
        ).logits[:, :width]
        logp = self.logprobs(logits).gather(-1, ids[:, -width:].unsqueeze(-1)).squeeze(-1)
        return logp * mask[:, -width:]


def reference_scoring(
    reference_pass: str,
    model: PreTrainedModel,
    temperature: float,
    static_budget: int | None = None,
) -> ReferenceScoring:
    """The strategy named ``reference_pass`` (``"per_step"`` or ``"at_end"``); ``static_budget``
    gives the per-step one a static KV cache for that many steps after the prompt."""
    if reference_pass not in REFERENCE_PASSES:
        raise ValueError(
            f"reference_pass must be one of {REFERENCE_PASSES}, got {reference_pass!r}"
        )
    if reference_pass == "per_step":
        return PerStepReference(model, temperature, static_budget)
    return AtEndReference(model, temperature)
