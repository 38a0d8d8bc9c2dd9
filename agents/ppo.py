"""The PPO core (Schulman et al. 2017): clipped surrogate, value loss, entropy, minibatched epochs.

Every trainer in the project calls :func:`ppo_update`; the classic-control/MuJoCo trainer and
the language-model trainer differ only in how they evaluate a minibatch (the ``evaluate``
callable) and in the shape of one sample (a transition, or a sequence of tokens with a mask).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from textenv.agents.distributed import Dist

Batch = dict[str, torch.Tensor]
# evaluate(minibatch) -> (new log-probs, entropy, new values[, extra per-sample loss]), each shaped
# like batch["logprobs"]; the optional fourth term (e.g. β·KL to a reference policy) is added
# to the loss as a masked mean. With packing, evaluate(micro_batch, columns) (see Packing).
EvaluateFn = Callable[..., tuple[torch.Tensor, ...]]
# A packed micro-batch's columns: (first input column, one past the last, per-token columns).
Columns = tuple[int, int, int]


@dataclass(frozen=True)
class Packing:
    """Where each row of a batch of token sequences (per-token entries ``[B, T]``) lies, so that
    :func:`ppo_update` can pack micro-batches by length; ``[B]`` integer tensors on the batch's
    device.

    ``starts``: the row's first input column (its left padding ends there); ``ends``: one past
    its last input column; ``lengths``: its per-token columns up to its last counted token
    (every masked-in entry lies before it). Each minibatch's rows are visited longest first,
    so a micro-batch holds rows of similar length, and ``evaluate(micro, columns)`` is called
    with the micro-batch's ``(min start, max end, max length)``: it forwards input columns
    ``[start, end)`` only and returns per-token tensors of ``length`` columns.
    """

    starts: torch.Tensor
    ends: torch.Tensor
    lengths: torch.Tensor


@dataclass
class PPOConfig:
    """Hyperparameters of the PPO update; defaults follow CleanRL's ppo_continuous_action.py."""

    update_epochs: int = 10
    """K: epochs of minibatch updates over each rollout"""
    num_minibatches: int = 32
    """number of minibatches each epoch is split into"""
    clip_coef: float = 0.2
    """ε of the clipped surrogate: the ratio is kept in [1-ε, 1+ε]"""
    clip_vloss: bool = True
    """clip the value update around the rollout's values, as the PPO reference code does"""
    vf_clip_coef: float | None = None
    """clip range of the value loss (None: same as clip_coef)"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    ent_coef: float = 0.0
    """weight of the entropy bonus"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    norm_adv: bool = True
    """normalise advantages to zero mean, unit std within each minibatch"""
    target_kl: float | None = None
    """stop the epochs early once the approximate KL of the last minibatch exceeds this"""
    grad_accum_steps: int = 1
    """split each minibatch into this many micro-batches whose gradients are accumulated"""
    loss_aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    """for sequence samples (token losses with a mask): token_mean averages over every token of the
    minibatch (a long response weighs more), sequence_mean over each response's tokens first and
    then over responses (each response weighs the same, as in the GRPO paper); equal for
    transitions"""

    def validate(self, batch_size: int) -> None:
        """Raise ValueError naming the first setting that cannot work for ``batch_size`` samples."""
        if self.update_epochs < 1:
            raise ValueError(f"update_epochs must be >= 1, got {self.update_epochs}")
        if self.num_minibatches < 1 or batch_size % self.num_minibatches:
            raise ValueError(
                f"num_minibatches={self.num_minibatches} must be >= 1 and divide the batch size "
                f"{batch_size}"
            )
        minibatch_size = batch_size // self.num_minibatches
        if self.grad_accum_steps < 1 or minibatch_size % self.grad_accum_steps:
            raise ValueError(
                f"grad_accum_steps={self.grad_accum_steps} must be >= 1 and divide the minibatch "
                f"size {minibatch_size}"
            )
        if self.clip_coef <= 0:
            raise ValueError(f"clip_coef must be > 0, got {self.clip_coef}")
        if self.vf_clip_coef is not None and self.vf_clip_coef <= 0:
            raise ValueError(f"vf_clip_coef must be > 0, got {self.vf_clip_coef}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be > 0 or None, got {self.target_kl}")
        if self.loss_aggregation not in ("token_mean", "sequence_mean"):
            raise ValueError(
                "loss_aggregation must be token_mean or sequence_mean, got "
                f"{self.loss_aggregation!r}"
            )


def validate_rates(learning_rate: float, gamma: float, gae_lambda: float) -> None:
    """One-line errors for a learning rate, γ or λ that cannot work (shared by the trainers)."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    for name, value in (("gamma", gamma), ("gae_lambda", gae_lambda)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_finite_settings(config: Any, prefix: str = "--") -> None:
    """Raise a one-line ValueError naming the first float setting of the dataclass ``config``
    (its sub-configs included) that is NaN or infinite, as its command-line flag."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = prefix + f.name.replace("_", "-")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_finite_settings(value, prefix)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor | None, count: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (all entries when ``mask`` is None).

    ``count`` overrides the denominator, so micro-batches of one minibatch can each divide by
    the whole minibatch's count and their accumulated gradients equal the minibatch's.
    """
    if mask is None:
        return x.mean() if count is None else x.sum() / count
    # where, not multiply: a NaN in a masked-out entry (a reset step, a token after EOS) stays out.
    total = torch.where(mask > 0, x, torch.zeros_like(x)).sum()
    return total / (mask.sum().clamp_min(1.0) if count is None else count)


def normalize(
    x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8, dist: Dist | None = None
) -> torch.Tensor:
    """Whiten ``x`` with the mean and (unbiased) std of its masked entries. A single entry is
    its own mean and has no spread: it whitens to 0 (not NaN, not ±1). With ``dist``, the
    mean and std are those of every rank's entries together."""
    if dist is not None and dist.active:
        return _normalize_global(x, mask if mask is not None else torch.ones_like(x), eps, dist)
    if mask is None:
        if x.numel() < 2:
            return torch.zeros_like(x)
        return (x - x.mean()) / (x.std() + eps)
    n = mask.sum()
    x_in = torch.where(mask > 0, x, torch.zeros_like(x))
    mean = x_in.sum() / n.clamp_min(1.0)
    var = (torch.where(mask > 0, x - mean, torch.zeros_like(x)) ** 2).sum() / (n - 1).clamp_min(1.0)
    return (x - mean) / (var.sqrt() + eps)


def _normalize_global(x: torch.Tensor, mask: torch.Tensor, eps: float, dist: Dist) -> torch.Tensor:
    keep = mask > 0
    n, total = dist.sum(mask.sum(), torch.where(keep, x, torch.zeros_like(x)).sum())
    mean = total / n.clamp_min(1.0)
    (sq,) = dist.sum((torch.where(keep, x - mean, torch.zeros_like(x)) ** 2).sum())
    return (x - mean) / ((sq / (n - 1).clamp_min(1.0)).sqrt() + eps)


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_coef: float
) -> torch.Tensor:
    """Per-sample PPO policy loss ``-min(ρA, clip(ρ, 1-ε, 1+ε)A)`` (to be minimised)."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    return torch.max(unclipped, clipped)


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_coef: float | None,
) -> torch.Tensor:
    """Per-sample value loss ``½(V-R)²``; with ``clip_coef`` the pessimistic clipped form."""
    unclipped = (new_values - returns) ** 2
    if clip_coef is None:
        return 0.5 * unclipped
    clipped_values = old_values + torch.clamp(new_values - old_values, -clip_coef, clip_coef)
    return 0.5 * torch.max(unclipped, (clipped_values - returns) ** 2)


def ppo_update(
    params: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    evaluate: EvaluateFn,
    config: PPOConfig,
    generator: torch.Generator | None = None,
    dist: Dist | None = None,
    packing: Packing | None = None,
) -> dict[str, torch.Tensor]:
    """Run K epochs of minibatch PPO updates over one rollout and return its metrics.

    ``batch`` holds, with one sample per row of the leading dimension: ``logprobs`` (frozen at
    collection), ``values`` (critic at collection), ``advantages``, ``returns``, an optional
    ``mask`` (1 for samples that count: valid transitions, response tokens before EOS), and
    whatever inputs ``evaluate`` reads. Per-token samples (shape ``[B, L]``) work unchanged:
    minibatches are drawn over rows and losses are means over masked entries.

    ``packing`` (:class:`Packing`): micro-batches of rows of similar length, each forwarded at
    its own width instead of the batch's. Every micro-batch's loss divides by the whole
    minibatch's count, so the gradient is the unpacked one up to float rounding.

    The metrics stay on the batch's device as 0-d tensors. Host syncs: one per epoch when
    ``target_kl`` is set (CleanRL's check, on the epoch's last minibatch), one per epoch with
    ``packing`` (the micro-batches' widths), and one per minibatch only for an optimizer that
    cannot skip a non-finite step on the device (see :func:`_step_if_finite`).

    ``dist`` (several processes, :mod:`textenv.agents.distributed`): ``batch`` is this rank's
    share, each minibatch is the union of every rank's minibatch, and the update is the
    one-process update of that union: losses divide by the global count, gradients are summed
    over ranks, advantages whitened and KL diagnostics (so target-KL) computed over all ranks.
    """
    dist = dist if dist is not None and dist.active else None
    params = [p for p in params if p.requires_grad]
    batch_size = batch["logprobs"].shape[0]
    config.validate(batch_size)
    layout = _Layout.of(batch, config, packing)
    totals = _Totals(batch["logprobs"].device)
    on_device = _skips_on_device(optimizer)
    for _epoch in range(config.update_epochs):
        totals.epochs += 1
        order = torch.randperm(batch_size, device=totals.device, generator=generator)
        order, columns = layout.visit(order)
        global_stats = None
        if dist is not None:  # every minibatch's count and advantage statistics, one collective
            global_stats = _global_minibatch_stats(
                layout.batch["advantages"],
                order,
                layout.mask,
                layout.minibatch_size,
                layout.row_weights is not None,
                dist,
            )
        logratios: list[torch.Tensor] = []
        micro_per_mb = layout.minibatch_size // layout.micro_size
        for k_mb, start in enumerate(range(0, batch_size, layout.minibatch_size)):
            mb_inds = order[start : start + layout.minibatch_size]
            stats_k = global_stats[:, k_mb] if global_stats is not None else None
            count, mb_adv = layout.minibatch_targets(mb_inds, stats_k, config.norm_adv)
            micro = slice(k_mb * micro_per_mb, (k_mb + 1) * micro_per_mb)
            mb_columns = None if columns is None else columns[micro]
            optimizer.zero_grad(set_to_none=True)
            losses = _backward_minibatch(
                layout, mb_inds, mb_adv, count, evaluate, config, logratios, mb_columns
            )
            grad_norm = _clipped_grad_norm(params, config.max_grad_norm, dist)
            # A non-finite loss or gradient is never applied: the step is skipped and counted.
            stepped = _step_if_finite(optimizer, grad_norm, on_device)
            totals.add_update(losses, grad_norm.detach(), stepped)
        last_approx_kl = totals.add_epoch_kl(
            torch.cat(logratios), order, layout, config.clip_coef, dist
        )
        if config.target_kl is not None and last_approx_kl.item() > config.target_kl:
            break
    # Not kept past the update: a skipped step's are not finite, and they would hold memory
    # through the next rollout.
    for p in params:
        p.grad = None
    return totals.metrics(dist)


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a step on the device: torch's fused optimizers read a
    ``found_inf`` flag, as torch's GradScaler sets it, and leave parameters and state as they
    were when it is 1."""
    fused = all(group.get("fused") for group in optimizer.param_groups)
    return fused and getattr(optimizer, "_step_supports_amp_scaling", False)


def _step_if_finite(
    optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, on_device: bool
) -> torch.Tensor:
    """Step unless ``grad_norm`` is non-finite; whether it stepped, a 0-d bool tensor. A fused
    optimizer decides on the device; any other needs the norm on the host (one sync)."""
    finite = torch.isfinite(grad_norm)
    if on_device:
        optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif bool(finite):
        optimizer.step()
    return finite


_LOSS_KEYS = ("policy_loss", "value_loss", "entropy", "extra_loss")


@dataclass
class _Layout:
    """How one rollout splits into minibatches and micro-batches, and the batch they read."""

    batch: Batch  # entries outside the mask zeroed
    mask: torch.Tensor | None
    row_weights: torch.Tensor | None  # sequence_mean: each row's tokens weigh 1/len(row)
    minibatch_size: int
    micro_size: int
    vf_clip: float | None
    packing: Packing | None

    @classmethod
    def of(cls, batch: Batch, config: PPOConfig, packing: Packing | None = None) -> _Layout:
        minibatch_size = batch["logprobs"].shape[0] // config.num_minibatches
        vf_clip = (config.vf_clip_coef or config.clip_coef) if config.clip_vloss else None
        mask = batch.get("mask")
        row_weights = None
        if mask is not None:
            # Entries that do not count are zeroed once: a NaN there would otherwise reach the
            # gradient through the chain rule (0 · NaN) even though the loss masks it out.
            keep = mask > 0
            batch = dict(batch) | {
                k: torch.where(keep, batch[k], torch.zeros_like(batch[k]))
                for k in ("logprobs", "values", "advantages", "returns")
            }
            if config.loss_aggregation == "sequence_mean" and mask.dim() > 1:
                lengths = mask.flatten(1).sum(1).clamp_min(1.0)
                shape = (-1, *[1] * (mask.dim() - 1))
                row_weights = keep.to(batch["logprobs"].dtype) / lengths.view(shape)
        micro_size = minibatch_size // config.grad_accum_steps
        if packing is not None and batch["logprobs"].dim() != 2:
            raise ValueError("packing is for batches of token sequences ([B, T] per-token entries)")
        return cls(batch, mask, row_weights, minibatch_size, micro_size, vf_clip, packing)

    def visit(self, order: torch.Tensor) -> tuple[torch.Tensor, list[Columns] | None]:
        """The epoch's rows in the order they are visited and, when packed, each micro-batch's
        columns (one host sync). Packing reorders rows within their minibatch only."""
        if self.packing is None:
            return order, None
        p = self.packing
        rows = order.view(-1, self.minibatch_size)
        # Longest responses first (ties: the widest inputs): a micro-batch's neighbours are of
        # its length, and the largest micro-batch is allocated first.
        for key in (p.ends - p.starts, p.lengths):
            rank = torch.argsort(key[rows], dim=1, descending=True, stable=True)
            rows = rows.gather(1, rank)
        micro = rows.reshape(-1, self.micro_size)
        bounds = torch.stack(
            [p.starts[micro].amin(1), p.ends[micro].amax(1), p.lengths[micro].amax(1)], dim=1
        )
        return rows.reshape(-1), [(a, b, c) for a, b, c in bounds.tolist()]

    def minibatch_targets(
        self, mb_inds: torch.Tensor, global_stats: torch.Tensor | None, norm_adv: bool
    ) -> tuple[torch.Tensor | float, torch.Tensor]:
        """The loss denominator of a minibatch (its masked entries, its rows with
        sequence_mean, or the global count over ranks) and its advantages, normalised within
        the minibatch when ``norm_adv``."""
        mb_mask = self.mask[mb_inds] if self.mask is not None else None
        count: torch.Tensor | float
        if self.row_weights is not None:
            count = float(self.minibatch_size)
        elif mb_mask is not None:
            count = mb_mask.sum().clamp_min(1.0)
        else:
            count = float(mb_inds.numel() * self.batch["logprobs"][0].numel())
        mb_adv = self.batch["advantages"][mb_inds]
        if global_stats is not None:
            total, adv_mean, adv_std = global_stats
            if norm_adv:
                mb_adv = ((mb_adv - adv_mean) / (adv_std + 1e-8)).to(mb_adv.dtype)
            return total.float(), mb_adv
        if norm_adv:
            mb_adv = normalize(mb_adv, mb_mask)
        return count, mb_adv


def _backward_minibatch(
    layout: _Layout,
    mb_inds: torch.Tensor,
    mb_adv: torch.Tensor,
    count: torch.Tensor | float,
    evaluate: EvaluateFn,
    config: PPOConfig,
    logratios: list[torch.Tensor],
    columns: list[Columns] | None = None,
) -> dict[str, torch.Tensor]:
    """Accumulate the minibatch's loss gradient over its micro-batches (each divides by the
    whole minibatch's ``count``, so their sum is the minibatch's gradient, however the rows are
    grouped or cut); append the detached log-ratios to ``logratios``; return the detached
    losses. With ``columns`` (packed), micro-batch ``i`` is cut to ``columns[i]``."""
    device = mb_adv.device
    sums = {k: torch.zeros((), device=device) for k in _LOSS_KEYS}
    width = layout.batch["logprobs"].shape[1] if columns is not None else 0
    for i, micro_start in enumerate(range(0, layout.minibatch_size, layout.micro_size)):
        local = slice(micro_start, micro_start + layout.micro_size)
        inds = mb_inds[local]
        micro = {k: v[inds] for k, v in layout.batch.items()}
        mask = layout.mask[inds] if layout.mask is not None else None
        weights = layout.row_weights[inds] if layout.row_weights is not None else None
        old = [micro["logprobs"], micro["values"], micro["returns"], mb_adv[local]]
        if columns is None:
            new_logprob, entropy, new_value, *extra = evaluate(micro)
        else:  # only the per-token columns its rows count: the rest is masked out anyway
            length = columns[i][2]
            old = [x[:, :length] for x in old]
            mask = mask[:, :length] if mask is not None else None
            weights = weights[:, :length] if weights is not None else None
            new_logprob, entropy, new_value, *extra = evaluate(micro, columns[i])
        old_logprob, old_value, returns, advantages = old

        def aggregate(x: torch.Tensor, weights=weights, mask=mask) -> torch.Tensor:
            return masked_mean(x if weights is None else x * weights, mask, count)

        logratio = new_logprob - old_logprob
        pg = aggregate(clipped_surrogate(logratio.exp(), advantages, config.clip_coef))
        vl = aggregate(value_loss(new_value, old_value, returns, layout.vf_clip))
        ent = aggregate(entropy)
        loss = pg - config.ent_coef * ent + config.vf_coef * vl
        if extra:
            extra_loss = aggregate(extra[0])
            loss = loss + extra_loss
            sums["extra_loss"] += extra_loss.detach()
        loss.backward()
        logratio = torch.nan_to_num(logratio.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        if columns is not None:  # the cut columns are masked out: 0 in the KL statistics
            logratio = torch.nn.functional.pad(logratio, (0, width - logratio.shape[1]))
        logratios.append(logratio)
        sums["policy_loss"] += pg.detach()
        sums["value_loss"] += vl.detach()
        sums["entropy"] += ent.detach()
    return sums


def _clipped_grad_norm(
    params: list[torch.nn.Parameter], max_norm: float, dist: Dist | None
) -> torch.Tensor:
    """Sum the gradients over ranks, clip their global norm to ``max_norm``; the norm before."""
    if dist is not None:
        dist.reduce_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):  # an FSDP-sharded model's norm is a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    return grad_norm


class _Totals:
    """Sums of one update's losses and KL diagnostics, kept on the device until the end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        zero = torch.zeros((), device=device)
        self.sums = {k: zero.clone() for k in (*_LOSS_KEYS, "grad_norm")}
        # Per-minibatch diagnostics are computed after each epoch from the detached
        # log-ratios, which keeps the hot loop to the ops the gradient needs.
        self.kl_sums = {k: zero.clone() for k in ("old_approx_kl", "approx_kl", "clipfrac")}
        self.updates = zero.clone()  # steps applied, counted on the device
        self.minibatches = self.epochs = 0

    def add_update(
        self, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor, stepped: torch.Tensor
    ) -> None:
        """Count a minibatch; its losses and norm only if its step was applied."""
        for k in _LOSS_KEYS:
            self.sums[k] += torch.where(stepped, losses[k], 0.0)
        self.sums["grad_norm"] += torch.where(stepped, grad_norm, 0.0)
        self.updates += stepped
        self.minibatches += 1

    def add_epoch_kl(
        self,
        logratio: torch.Tensor,
        order: torch.Tensor,
        layout: _Layout,
        clip_coef: float,
        dist: Dist | None,
    ) -> torch.Tensor:
        """Add the epoch's per-minibatch KL diagnostics; return its last minibatch's approx KL."""
        with torch.no_grad():
            # k3 estimator of KL(old || new): unbiased and non-negative (Schulman,
            # "Approximating KL divergence").
            kl = _epoch_kl_stats(
                logratio, order, layout.mask, layout.minibatch_size, clip_coef, dist
            )
            for k in self.kl_sums:
                self.kl_sums[k] += kl[k].sum()
            return kl["approx_kl"][-1]

    def metrics(self, dist: Dist | None) -> dict[str, torch.Tensor]:
        sums = dict(self.sums)
        if dist is not None:  # each rank's losses are its share of the global means
            reduced = dist.sum(*(sums[k] for k in _LOSS_KEYS))
            sums |= dict(zip(_LOSS_KEYS, reduced, strict=True))
        metrics = {k: v / self.updates.clamp_min(1.0) for k, v in sums.items()}
        metrics |= {k: v / max(self.minibatches, 1) for k, v in self.kl_sums.items()}
        metrics["epochs"] = torch.tensor(float(self.epochs), device=self.device)
        metrics["skipped_updates"] = self.minibatches - self.updates
        metrics["updates"] = self.updates.clone()
        return metrics


class NonFiniteTraining(RuntimeError):
    """Every update of several iterations in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Stop training once ``patience`` iterations in a row had every PPO update skipped."""

    def __init__(self, patience: int = 3) -> None:
        self.patience, self.streak = patience, 0

    def check(self, metrics: dict[str, float], where: str) -> None:
        self.streak = self.streak + 1 if metrics["updates"] == 0 else 0
        if self.streak >= self.patience:
            raise NonFiniteTraining(
                f"non-finite loss or gradients in every update of {self.streak} iterations in a "
                f"row {where}; "
                "the parameters were left as they were (lower the learning rate, check rewards)"
            )


def _global_minibatch_stats(
    advantages: torch.Tensor,
    order: torch.Tensor,
    mask_all: torch.Tensor | None,
    minibatch_size: int,
    per_row_count: bool,
    dist: Dist,
) -> torch.Tensor:
    """``[3, num_minibatches]``: each minibatch's loss denominator (entries, or rows with
    ``per_row_count``), and the mean and unbiased std of its advantages, over every rank's
    minibatch of the same index (float64 sums: the one-pass variance is exact enough)."""
    adv = advantages[order].double().reshape(-1, minibatch_size, *advantages.shape[1:]).flatten(1)
    if mask_all is None:
        mask = torch.ones_like(adv)
    else:
        mask = (mask_all[order] > 0).double().reshape(adv.shape)
    adv = torch.where(mask > 0, adv, torch.zeros_like(adv))
    n = mask.sum(1)
    rows = torch.full_like(n, float(minibatch_size))
    n, total, sq, rows = dist.sum(n, adv.sum(1), (adv * adv).sum(1), rows)
    mean = total / n.clamp_min(1.0)
    var = ((sq - n * mean * mean) / (n - 1).clamp_min(1.0)).clamp_min(0.0)
    count = (rows if per_row_count else n).clamp_min(1.0)
    return torch.stack([count, mean, var.sqrt()])


def _epoch_kl_stats(
    logratio: torch.Tensor,
    order: torch.Tensor,
    mask_all: torch.Tensor | None,
    minibatch_size: int,
    clip_coef: float,
    dist: Dist | None = None,
) -> dict[str, torch.Tensor]:
    """Per-minibatch approx KL (k1 and k3) and clip fraction of one epoch, ``[num_minibatches]``.

    ``logratio`` holds the epoch's rows in the order they were visited (``order``); with
    ``dist``, minibatch ``i`` is the union of every rank's minibatch ``i``.
    """
    num_mb = logratio.shape[0] // minibatch_size
    mask = mask_all[order] if mask_all is not None else torch.ones_like(logratio)
    logratio = logratio.reshape(num_mb, minibatch_size, -1)
    mask = mask.reshape(num_mb, minibatch_size, -1).to(logratio.dtype)
    ratio = logratio.exp()
    sums = {
        "approx_kl": (((ratio - 1.0) - logratio) * mask).sum(dim=(1, 2)),
        "old_approx_kl": (-logratio * mask).sum(dim=(1, 2)),
        "clipfrac": (((ratio - 1.0).abs() > clip_coef).to(logratio.dtype) * mask).sum(dim=(1, 2)),
    }
    count = mask.sum(dim=(1, 2))
    if dist is not None:
        *reduced, count = dist.sum(*sums.values(), count)
        sums = dict(zip(sums, reduced, strict=True))
    return {k: v / count.clamp_min(1.0) for k, v in sums.items()}


def explained_variance(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    dist: Dist | None = None,
) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over masked entries (of every rank, with ``dist``): 1 is a
    perfect critic, ≤ 0 a useless one."""
    if mask is None:
        mask = torch.ones_like(returns)
    keep = mask > 0  # where, not multiply: a NaN in a masked-out entry stays out
    sums = dist.sum if dist is not None and dist.active else (lambda *xs: list(xs))

    def masked(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, x, torch.zeros_like(x))

    n, total_r, total_d = sums(mask.sum(), masked(returns).sum(), masked(returns - values).sum())
    n = n.clamp_min(1.0)
    mean_r, mean_d = total_r / n, total_d / n
    sq_r, sq_d = sums(
        (masked(returns - mean_r) ** 2).sum(), (masked(returns - values - mean_d) ** 2).sum()
    )
    var_r, var_d = sq_r / n, sq_d / n
    return torch.where(var_r > 0, 1.0 - var_d / var_r, torch.full_like(var_r, float("nan")))
