"""The PPO core pinned down: every PPOConfig option, every metric of ppo_update, its helpers and the MLP policies.

Small inputs whose answers can be worked out by hand, exact values where floating point allows, and
``reference_ppo_update``: the same algorithm written out slowly, one sample at a time with plain Python
loops and SGD by hand, compared parameter for parameter with the real one (same permutation through a
seeded ``torch.Generator``).
"""

import math
import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from textenv.agents.policies import MLPActorCritic, forward_mlp, layer_init, mlp
from textenv.agents.ppo import (
    NonFiniteGuard,
    NonFiniteTraining,
    PPOConfig,
    clipped_surrogate,
    explained_variance,
    masked_mean,
    normalize,
    ppo_update,
    validate_rates,
    value_loss,
)

F64 = torch.float64


# ----------------------------------------------------------------------------- PPOConfig.validate


def test_config_defaults_follow_cleanrl_ppo_continuous_action():
    c = PPOConfig()
    assert (
        c.update_epochs,
        c.num_minibatches,
        c.clip_coef,
        c.clip_vloss,
        c.vf_clip_coef,
        c.vf_coef,
        c.ent_coef,
        c.max_grad_norm,
        c.norm_adv,
        c.target_kl,
        c.grad_accum_steps,
    ) == (10, 32, 0.2, True, None, 0.5, 0.0, 0.5, True, None, 1)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(update_epochs=1),
        dict(num_minibatches=1),
        dict(num_minibatches=64),
        dict(num_minibatches=4, grad_accum_steps=1),
        dict(num_minibatches=4, grad_accum_steps=16),
        dict(clip_coef=1e-9),
        dict(clip_coef=5.0),
        dict(vf_clip_coef=1e-9),
        dict(vf_clip_coef=5.0),
        dict(max_grad_norm=1e-9),
        dict(max_grad_norm=5.0),
        dict(target_kl=1e-9),
        dict(target_kl=5.0),
    ],
)
def test_config_accepts_the_smallest_and_large_settings_that_work(kw):
    PPOConfig(**kw).validate(batch_size=64)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(update_epochs=0), "update_epochs must be >= 1, got 0"),
        (dict(update_epochs=-1), "update_epochs must be >= 1, got -1"),
        (dict(num_minibatches=0), "num_minibatches=0 must be >= 1 and divide the batch size 64"),
        (
            dict(num_minibatches=-2),
            "num_minibatches=-2 must be >= 1 and divide the batch size 64",
        ),  # -2 divides 64
        (dict(num_minibatches=3), "num_minibatches=3 must be >= 1 and divide the batch size 64"),
        (
            dict(num_minibatches=128),
            "num_minibatches=128 must be >= 1 and divide the batch size 64",
        ),
        (
            dict(num_minibatches=4, grad_accum_steps=0),
            "grad_accum_steps=0 must be >= 1 and divide the minibatch size 16",
        ),
        (
            dict(num_minibatches=4, grad_accum_steps=-2),
            "grad_accum_steps=-2 must be >= 1 and divide the minibatch size 16",
        ),
        (
            dict(num_minibatches=4, grad_accum_steps=3),
            "grad_accum_steps=3 must be >= 1 and divide the minibatch size 16",
        ),
        # 32 divides the batch (64) but not the minibatch (16).
        (
            dict(num_minibatches=4, grad_accum_steps=32),
            "grad_accum_steps=32 must be >= 1 and divide the minibatch size 16",
        ),
        (dict(clip_coef=0.0), "clip_coef must be > 0, got 0.0"),
        (dict(clip_coef=-0.1), "clip_coef must be > 0, got -0.1"),
        (dict(vf_clip_coef=0.0), "vf_clip_coef must be > 0, got 0.0"),
        (dict(vf_clip_coef=-0.1), "vf_clip_coef must be > 0, got -0.1"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be > 0, got 0.0"),
        (dict(max_grad_norm=-1.0), "max_grad_norm must be > 0, got -1.0"),
        (dict(target_kl=0.0), "target_kl must be > 0 or None, got 0.0"),
        (dict(target_kl=-0.01), "target_kl must be > 0 or None, got -0.01"),
    ],
)
def test_config_rejects_each_setting_that_cannot_work_and_names_it(kw, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PPOConfig(**kw).validate(batch_size=64)


def test_ppo_update_validates_the_config_before_evaluating_anything():
    calls = []
    theta = nn.Parameter(torch.zeros(()))
    batch = {k: torch.zeros(8) for k in ("logprobs", "values", "advantages", "returns")}
    with pytest.raises(ValueError, match="num_minibatches=3"):
        ppo_update(
            [theta],
            torch.optim.SGD([theta], lr=0.1),
            batch,
            lambda mb: calls.append(mb),
            PPOConfig(num_minibatches=3),
        )
    assert calls == []


@pytest.mark.parametrize(
    "lr,gamma,lam", [(1e-9, 0.0, 0.0), (1e-9, 1.0, 1.0), (3e-4, 0.99, 0.95), (1.5, 0.5, 0.5)]
)
def test_validate_rates_accepts_positive_lr_and_rates_in_the_closed_unit_interval(lr, gamma, lam):
    validate_rates(lr, gamma, lam)


@pytest.mark.parametrize(
    "lr,gamma,lam,name",
    [
        (0.0, 0.99, 0.95, "learning_rate"),
        (-1e-3, 0.99, 0.95, "learning_rate"),
        (math.nan, 0.99, 0.95, "learning_rate"),
        (1e-3, -0.01, 0.95, "gamma"),
        (1e-3, 1.01, 0.95, "gamma"),
        (1e-3, math.nan, 0.95, "gamma"),
        (1e-3, 0.99, -0.01, "gae_lambda"),
        (1e-3, 0.99, 1.01, "gae_lambda"),
        (1e-3, 0.99, 1.5, "gae_lambda"),
    ],
)
def test_validate_rates_rejects_the_bad_rate_by_name(lr, gamma, lam, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        validate_rates(lr, gamma, lam)


# ----------------------------------------------------------------------------- masked_mean, normalize


def test_masked_mean_without_mask_is_the_mean_or_the_sum_over_count():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert masked_mean(x, None).item() == 3.0
    assert masked_mean(x, None, count=8.0).item() == 1.5
    assert masked_mean(x, None, count=torch.tensor(3.0)).item() == 4.0


def test_masked_mean_averages_the_entries_where_mask_is_one():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert masked_mean(x, mask).item() == 2.0
    assert (
        masked_mean(x, mask, count=8.0).item() == 0.5
    )  # micro-batches divide by the minibatch's count
    assert masked_mean(torch.tensor([5.0, 7.0]), torch.tensor([1.0, 0.0])).item() == 5.0
    assert masked_mean(torch.tensor([5.0, 7.0, 9.0]), torch.tensor([1.0, 1.0, 1.0])).item() == 7.0


def test_masked_mean_with_nothing_kept_is_zero_not_nan():
    assert masked_mean(torch.tensor([5.0, 7.0]), torch.zeros(2)).item() == 0.0


def test_masked_mean_keeps_nan_in_masked_entries_out_of_value_and_gradient():
    x = torch.tensor([1.0, math.nan, 3.0], requires_grad=True)
    out = masked_mean(x, torch.tensor([1.0, 0.0, 1.0]))
    out.backward()
    assert out.item() == 2.0
    assert x.grad.tolist() == [0.5, 0.0, 0.5]


def test_normalize_whitens_with_the_mean_and_unbiased_std():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    std = math.sqrt(5.0 / 3.0)  # unbiased: squared deviations sum to 5, over n - 1 = 3
    torch.testing.assert_close(normalize(x), (x - 2.5) / (std + 1e-8), rtol=1e-15, atol=0)


def test_normalize_adds_eps_to_the_std():
    x = torch.tensor([0.0, 2e-8], dtype=F64)  # std sqrt(2)·1e-8, the same order as eps
    expected = 1e-8 / (math.sqrt(2.0) * 1e-8 + 1e-8)
    torch.testing.assert_close(
        normalize(x), torch.tensor([-expected, expected], dtype=F64), rtol=1e-12, atol=0
    )
    wider = torch.tensor([-1e-8, 1e-8], dtype=F64) / (math.sqrt(2.0) * 1e-8 + 1e-6)
    torch.testing.assert_close(normalize(x, eps=1e-6), wider, rtol=1e-12, atol=0)


def test_normalize_of_a_constant_is_zero_not_nan():
    assert normalize(torch.full((4,), 3.0)).tolist() == [0.0] * 4
    assert (
        normalize(torch.full((4,), 3.0), torch.tensor([1.0, 1.0, 0.0, 1.0])).tolist() == [0.0] * 4
    )


def test_normalize_with_mask_uses_the_statistics_of_kept_entries_only():
    x = torch.tensor([1.0, 100.0, 2.0, 3.0, math.nan, 4.0], dtype=F64)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=F64)
    out = normalize(x, mask)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    torch.testing.assert_close(out[mask > 0], normalize(kept), rtol=1e-15, atol=0)
    two = normalize(
        torch.tensor([1.0, 3.0, 50.0], dtype=F64), torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    )
    torch.testing.assert_close(
        two[:2], torch.tensor([-1.0, 1.0], dtype=F64) / (math.sqrt(2.0) + 1e-8)
    )


def test_normalize_with_an_all_ones_mask_equals_the_unmasked_form():
    x = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(normalize(x, torch.ones_like(x)), normalize(x), rtol=1e-15, atol=0)


def test_normalize_with_a_single_kept_entry_stays_finite():
    out = normalize(torch.tensor([3.0, 7.0]), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- clipped surrogate, value loss


@pytest.mark.parametrize(
    "ratio,adv,expected",
    [
        (1.1, 2.0, -2.2),  # inside the band: -ρA
        (1.5, 2.0, -2.4),  # A > 0, ratio above 1+ε: capped at -(1+ε)A
        (0.5, 2.0, -1.0),  # A > 0, ratio below 1-ε: the unclipped (worse) term
        (0.5, -2.0, 1.6),  # A < 0, ratio below 1-ε: capped at -(1-ε)A
        (1.5, -2.0, 3.0),  # A < 0, ratio above 1+ε: the unclipped term
        (1.0, -2.0, 2.0),
    ],
)
def test_clipped_surrogate_is_the_pessimistic_minimum(ratio, adv, expected):
    out = clipped_surrogate(torch.tensor([ratio], dtype=F64), torch.tensor([adv], dtype=F64), 0.2)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "new,old,ret,clip,expected",
    [
        (0.5, 0.0, 1.0, None, 0.125),  # ½(V-R)²
        (0.1, 0.0, 1.0, 0.2, 0.405),  # inside the band both terms agree
        (0.5, 0.0, 1.0, 0.2, 0.32),  # V clipped to 0.2 is further from R: ½(0.2-1)²
        (-0.5, 0.0, 1.0, 0.2, 1.125),  # the unclipped error is larger: ½(-0.5-1)²
        (2.5, 2.0, 1.0, 0.2, 1.125),  # the band is around the old value, not around 0
        (1.5, 2.0, 1.0, 0.2, 0.32),  # moving towards R past the band: ½(1.8-1)²
    ],
)
def test_value_loss_is_half_squared_error_clipped_pessimistically_around_old_value(
    new, old, ret, clip, expected
):
    out = value_loss(
        torch.tensor(new, dtype=F64),
        torch.tensor(old, dtype=F64),
        torch.tensor(ret, dtype=F64),
        clip,
    )
    assert out.item() == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- ppo_update against a slow reference


class LinearPolicy(nn.Module):
    """Categorical policy with logits ``obs @ W`` and critic ``obs @ w`` (float64); works per transition
    (obs ``[B, d]``) and per token (obs ``[B, L, d]``). With ``ref_logprobs`` in the batch it also returns
    an extra per-sample loss ``0.3 (log π - ref)²``."""

    def __init__(self, obs_dim: int = 3, n_actions: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(obs_dim, n_actions, generator=g, dtype=F64))
        self.critic = nn.Parameter(torch.randn(obs_dim, generator=g, dtype=F64))

    def evaluate(self, mb):
        logp = torch.log_softmax(mb["obs"] @ self.weight, dim=-1)
        logprob = logp.gather(-1, mb["actions"].unsqueeze(-1)).squeeze(-1)
        out = (logprob, -(logp.exp() * logp).sum(-1), mb["obs"] @ self.critic)
        if "ref_logprobs" in mb:
            out += (0.3 * (logprob - mb["ref_logprobs"]) ** 2,)
        return out


def make_batch(policy, shape, mask=None, extra=False, seed=1):
    """A rollout whose stored log-probs and values are off from the policy's, so that ratios start away
    from 1 and both clips engage. Masked-out entries hold NaN: they must not matter."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(*shape, 3, generator=g, dtype=F64)
    actions = torch.randint(0, 3, shape, generator=g)
    with torch.no_grad():
        logprob, _, value = policy.evaluate({"obs": obs, "actions": actions})
    batch = {
        "obs": obs,
        "actions": actions,
        "logprobs": logprob + 0.3 * torch.randn(shape, generator=g, dtype=F64),
        "values": value + 0.5 * torch.randn(shape, generator=g, dtype=F64),
        "advantages": 2.0 * torch.randn(shape, generator=g, dtype=F64) + 0.5,
        "returns": value + torch.randn(shape, generator=g, dtype=F64),
    }
    if extra:
        batch["ref_logprobs"] = logprob + 0.2 * torch.randn(shape, generator=g, dtype=F64)
    if mask is not None:
        batch["mask"] = torch.tensor(mask, dtype=F64)
        for k in ("logprobs", "values", "advantages", "returns"):
            batch[k] = torch.where(batch["mask"] > 0, batch[k], torch.full_like(batch[k], math.nan))
    return batch


def reference_ppo_update(policy, lr, batch, cfg, generator):
    """PPO written out one sample at a time: normalise the minibatch's kept advantages, sum the per-sample
    clipped surrogate / value / entropy / extra terms over kept samples, divide by their count, clip the
    global gradient norm by hand and take a plain SGD step. Returns the metrics ppo_update should report."""
    params = list(policy.parameters())
    size = batch["logprobs"].shape[0]
    per_row = batch["logprobs"][0].numel()
    mb_size = size // cfg.num_minibatches
    eps = cfg.clip_coef
    vf_clip = (
        (cfg.vf_clip_coef if cfg.vf_clip_coef is not None else cfg.clip_coef)
        if cfg.clip_vloss
        else None
    )

    def entry(key, r, j):
        return batch[key][r].reshape(-1)[j]

    def kept(r, j):
        return "mask" not in batch or entry("mask", r, j).item() > 0

    updates, kls, epochs = [], [], 0
    for _ in range(cfg.update_epochs):
        epochs += 1
        order = torch.randperm(size, generator=generator).tolist()
        for m in range(cfg.num_minibatches):
            rows = order[m * mb_size : (m + 1) * mb_size]
            entries = [(r, j) for r in rows for j in range(per_row) if kept(r, j)]
            n = len(entries)
            adv = {e: entry("advantages", *e).item() for e in entries}
            if cfg.norm_adv:
                mean = sum(adv.values()) / n
                std = math.sqrt(sum((a - mean) ** 2 for a in adv.values()) / (n - 1))
                adv = {e: (a - mean) / (std + 1e-8) for e, a in adv.items()}
            for p in params:
                p.grad = None
            pg = vl = ent = ex = 0.0
            k3 = k1 = clipped = 0.0
            for r in rows:
                out = policy.evaluate({k: v[r : r + 1] for k, v in batch.items()})
                new_logprob, entropy, new_value = (o[0].reshape(-1) for o in out[:3])
                extra = out[3][0].reshape(-1) if len(out) > 3 else None
                for j in range(per_row):
                    if not kept(r, j):
                        continue
                    logratio = new_logprob[j] - entry("logprobs", r, j)
                    ratio = torch.exp(logratio)
                    a = adv[(r, j)]
                    pg = pg + max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))
                    v, v_old, ret = new_value[j], entry("values", r, j), entry("returns", r, j)
                    if vf_clip is None:
                        vl = vl + 0.5 * (v - ret) ** 2
                    else:
                        v_clipped = v_old + min(max(v - v_old, -vf_clip), vf_clip)
                        vl = vl + 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)
                    ent = ent + entropy[j]
                    if extra is not None:
                        ex = ex + extra[j]
                    k3 += (ratio.item() - 1) - logratio.item()
                    k1 += -logratio.item()
                    clipped += abs(ratio.item() - 1) > eps
            count = max(n, 1)
            kls.append((k3 / count, k1 / count, clipped / count))
            grads = [torch.zeros_like(p) for p in params]
            if n:
                loss = (pg - cfg.ent_coef * ent + cfg.vf_coef * vl + ex) / count
                grads = torch.autograd.grad(
                    loss, params, allow_unused=True
                )  # every value may be clipped
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            norm = math.sqrt(sum((g**2).sum().item() for g in grads))
            scale = min(1.0, cfg.max_grad_norm / (norm + 1e-6))
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= lr * scale * g
            updates.append(
                [float(torch.as_tensor(t).detach()) / count for t in (pg, vl, ent, ex)] + [norm]
            )
        if cfg.target_kl is not None and kls[-1][0] > cfg.target_kl:
            break
    u, k = np.array(updates), np.array(kls)
    return {
        "policy_loss": u[:, 0].mean(),
        "value_loss": u[:, 1].mean(),
        "entropy": u[:, 2].mean(),
        "extra_loss": u[:, 3].mean(),
        "grad_norm": u[:, 4].mean(),
        "approx_kl": k[:, 0].mean(),
        "old_approx_kl": k[:, 1].mean(),
        "clipfrac": k[:, 2].mean(),
        "epochs": epochs,
        "skipped_updates": 0,
        "updates": len(updates),
    }


SCENARIOS = {
    "transitions: value clip, entropy bonus, gradient clip, extra loss": (
        dict(update_epochs=3, num_minibatches=2, ent_coef=0.05, max_grad_norm=0.3),
        dict(shape=(8,), extra=True),
    ),
    "transitions, masked: own value clip range, micro-batches": (
        dict(
            update_epochs=2,
            num_minibatches=2,
            grad_accum_steps=2,
            vf_clip_coef=0.1,
            vf_coef=0.7,
            max_grad_norm=50.0,
        ),
        dict(shape=(8,), mask=[1, 1, 0, 1, 0, 1, 1, 1]),
    ),
    "tokens, masked (rows of 1 and 0 kept tokens): raw advantages, no value clip": (
        dict(
            update_epochs=2,
            num_minibatches=4,
            norm_adv=False,
            clip_vloss=False,
            clip_coef=0.1,
            vf_coef=0.25,
            max_grad_norm=50.0,
        ),
        dict(shape=(4, 3), mask=[[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]),
    ),
    "tokens, unmasked: several tokens per row": (
        dict(update_epochs=2, num_minibatches=2, ent_coef=0.01, max_grad_norm=0.5),
        dict(shape=(4, 2), extra=True),
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ppo_update_matches_a_slow_reference_parameter_for_parameter(name):
    config_kw, batch_kw = SCENARIOS[name]
    config = PPOConfig(**config_kw)
    policy, reference = LinearPolicy(), LinearPolicy()
    batch = make_batch(policy, **batch_kw)
    # Passed as a generator, as trainers do: it is read once, not once per minibatch.
    metrics = ppo_update(
        policy.parameters(),
        torch.optim.SGD(policy.parameters(), lr=0.4),
        batch,
        policy.evaluate,
        config,
        torch.Generator().manual_seed(5),
    )
    expected = reference_ppo_update(reference, 0.4, batch, config, torch.Generator().manual_seed(5))
    for p, q in zip(policy.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert set(metrics) == set(expected)
    for k, v in expected.items():
        assert metrics[k].shape == () and metrics[k].device == batch["logprobs"].device
        assert metrics[k].item() == pytest.approx(v, rel=2e-6, abs=1e-7), k
    # The clips engaged, so the comparison covers them.
    assert 0 < expected["clipfrac"] < 1
    if config.max_grad_norm < 1:
        assert expected["grad_norm"] > config.max_grad_norm


def test_each_epoch_visits_every_row_once_in_the_order_the_generator_draws():
    policy = LinearPolicy()
    batch = make_batch(policy, (8,)) | {"row": torch.arange(8)}
    seen = []

    def evaluate(mb):
        seen.append(mb["row"].tolist())
        return policy.evaluate(mb)

    ppo_update(
        policy.parameters(),
        torch.optim.SGD(policy.parameters(), lr=0.1),
        batch,
        evaluate,
        PPOConfig(update_epochs=3, num_minibatches=4, grad_accum_steps=2),
        torch.Generator().manual_seed(11),
    )
    g = torch.Generator().manual_seed(11)
    expected = [torch.randperm(8, generator=g).tolist() for _ in range(3)]
    assert all(
        len(rows) == 1 for rows in seen
    )  # minibatches of 2 rows, each split into 2 micro-batches
    assert [sum(seen[8 * e : 8 * e + 8], []) for e in range(3)] == expected


@pytest.mark.parametrize("accum,sizes", [(1, [4, 4]), (2, [2, 2, 2, 2]), (4, [1] * 8)])
def test_grad_accum_steps_splits_each_minibatch_into_that_many_micro_batches(accum, sizes):
    policy = LinearPolicy()
    seen = []

    def evaluate(mb):
        seen.append(mb["obs"].shape[0])
        return policy.evaluate(mb)

    metrics = ppo_update(
        policy.parameters(),
        torch.optim.SGD(policy.parameters(), lr=0.1),
        make_batch(policy, (8,)),
        evaluate,
        PPOConfig(update_epochs=1, num_minibatches=2, grad_accum_steps=accum),
    )
    assert seen == sizes
    assert metrics["updates"].item() == 2  # still one optimizer step per minibatch


def test_one_sgd_step_on_a_one_parameter_policy_matches_the_hand_computed_gradient():
    # log π = old + θ (ratio e^θ), V = θ, entropy = 1 + θ; at θ = 0 every ratio is 1 (inside the band).
    theta = nn.Parameter(torch.zeros((), dtype=F64))
    batch = {
        "logprobs": torch.tensor([-1.0, -2.0], dtype=F64),
        "values": torch.zeros(2, dtype=F64),
        "advantages": torch.tensor([2.0, 1.0], dtype=F64),
        "returns": torch.tensor([1.0, 1.0], dtype=F64),
    }

    def evaluate(mb):
        return mb["logprobs"] + theta, (1.0 + theta).expand(2), theta.expand(2)

    config = PPOConfig(
        update_epochs=1,
        num_minibatches=1,
        norm_adv=False,
        clip_vloss=False,
        vf_coef=0.5,
        ent_coef=0.1,
        max_grad_norm=100.0,
    )
    m = ppo_update([theta], torch.optim.SGD([theta], lr=0.1), batch, evaluate, config)
    # loss = mean(-A e^θ) - 0.1 (1 + θ) + 0.5 · mean(½ (θ - R)²); dloss/dθ at 0 = -1.5 - 0.1 - 0.5 = -2.1
    assert theta.item() == pytest.approx(0.21, rel=1e-12)
    assert m["policy_loss"].item() == pytest.approx(-1.5)
    assert m["value_loss"].item() == pytest.approx(0.5)
    assert m["entropy"].item() == pytest.approx(1.0)
    assert m["grad_norm"].item() == pytest.approx(2.1)
    assert m["extra_loss"].item() == 0.0
    assert (m["approx_kl"].item(), m["old_approx_kl"].item(), m["clipfrac"].item()) == (
        0.0,
        0.0,
        0.0,
    )
    assert (m["epochs"].item(), m["updates"].item(), m["skipped_updates"].item()) == (1, 1, 0)


def test_max_grad_norm_rescales_the_step_to_that_norm_and_reports_the_norm_before_clipping():
    theta = nn.Parameter(torch.zeros((), dtype=F64))
    batch = {
        "logprobs": torch.zeros(2, dtype=F64),
        "values": torch.zeros(2, dtype=F64),
        "advantages": torch.tensor([2.0, 1.0], dtype=F64),
        "returns": torch.zeros(2, dtype=F64),
    }
    config = PPOConfig(update_epochs=1, num_minibatches=1, norm_adv=False, max_grad_norm=0.5)
    m = ppo_update(
        [theta],
        torch.optim.SGD([theta], lr=1.0),
        batch,
        lambda mb: (mb["logprobs"] + theta, torch.zeros(2, dtype=F64), mb["values"]),
        config,
    )
    assert m["grad_norm"].item() == pytest.approx(1.5)
    assert theta.item() == pytest.approx(0.5, rel=1e-5)  # torch's clip divides by (norm + 1e-6)


def test_a_parameter_the_loss_does_not_reach_is_left_alone_even_with_a_stale_gradient_and_weight_decay():
    policy = LinearPolicy()
    unused = nn.Parameter(torch.ones(2, dtype=F64))
    unused.grad = torch.full((2,), 5.0, dtype=F64)  # left over from before the update
    opt = torch.optim.SGD([*policy.parameters(), unused], lr=0.1, weight_decay=0.5)
    ppo_update(
        [*policy.parameters(), unused],
        opt,
        make_batch(policy, (4,)),
        policy.evaluate,
        PPOConfig(update_epochs=2, num_minibatches=2),
    )
    # Gradients are reset to None, not to zeros (which weight decay would act on).
    assert unused.grad is None
    assert torch.equal(unused.detach(), torch.ones(2, dtype=F64))


def test_ppo_update_works_on_a_rollout_of_one_row():
    policy = LinearPolicy()
    before = [p.detach().clone() for p in policy.parameters()]
    m = ppo_update(
        policy.parameters(),
        torch.optim.SGD(policy.parameters(), lr=0.1),
        make_batch(policy, (1, 3)),
        policy.evaluate,
        PPOConfig(update_epochs=2, num_minibatches=1, norm_adv=False),
    )
    assert m["updates"].item() == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_a_minibatch_with_nothing_kept_is_a_zero_update_not_a_nan():
    policy = LinearPolicy()
    before = [p.detach().clone() for p in policy.parameters()]
    batch = make_batch(policy, (2,), mask=[0, 0])
    m = ppo_update(
        policy.parameters(),
        torch.optim.SGD(policy.parameters(), lr=0.1),
        batch,
        policy.evaluate,
        PPOConfig(update_epochs=1, num_minibatches=2),
    )
    assert (m["updates"].item(), m["skipped_updates"].item()) == (2, 0)
    assert all(
        m[k].item() == 0.0
        for k in (
            "policy_loss",
            "value_loss",
            "entropy",
            "grad_norm",
            "approx_kl",
            "old_approx_kl",
            "clipfrac",
        )
    )
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


@pytest.mark.parametrize("key", ["logprobs", "values", "advantages", "returns"])
def test_nan_in_a_masked_entry_of_any_rollout_field_does_not_reach_the_update(key):
    policy = LinearPolicy()
    clean = make_batch(policy, (4,), mask=[1, 0, 1, 1])
    clean = {k: torch.nan_to_num(v, nan=0.5) for k, v in clean.items()}
    poisoned = {k: v.clone() for k, v in clean.items()}
    poisoned[key][1] = math.nan
    params = []
    for batch in (clean, poisoned):
        p = LinearPolicy()
        m = ppo_update(
            p.parameters(),
            torch.optim.SGD(p.parameters(), lr=0.1),
            batch,
            p.evaluate,
            PPOConfig(update_epochs=1, num_minibatches=1),
        )
        assert m["skipped_updates"].item() == 0
        params.append(torch.cat([q.detach().flatten() for q in p.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=0)


def test_loss_terms_enter_with_their_signs_and_weights():
    """d loss / d θ for each term alone: the policy term follows -A, the entropy bonus is subtracted with
    ent_coef, the value loss added with vf_coef, the extra term added with weight 1."""

    def step(config, entropy_slope=0.0, value_slope=0.0, extra_slope=None):
        theta = nn.Parameter(torch.zeros((), dtype=F64))
        batch = {
            "logprobs": torch.zeros(2, dtype=F64),
            "values": torch.zeros(2, dtype=F64),
            "advantages": torch.tensor([1.0, 1.0], dtype=F64),
            "returns": torch.zeros(2, dtype=F64),
        }

        def evaluate(mb):
            out = (
                0 * theta + mb["logprobs"],
                entropy_slope * theta + torch.zeros(2, dtype=F64),
                mb["returns"] - 1.0 + value_slope * theta,
            )
            return (
                out
                if extra_slope is None
                else out + (extra_slope * theta + torch.zeros(2, dtype=F64),)
            )

        ppo_update(
            [theta],
            torch.optim.SGD([theta], lr=1.0),
            batch,
            evaluate,
            PPOConfig(
                update_epochs=1,
                num_minibatches=1,
                norm_adv=False,
                clip_vloss=False,
                max_grad_norm=100.0,
                **config,
            ),
        )
        return theta.item()

    # V = R - 1 + sθ: dloss/dθ = vf_coef · (V - R) · s = -vf_coef · s; the step is its negative.
    assert step(dict(vf_coef=0.5), value_slope=2.0) == pytest.approx(1.0)
    assert step(dict(vf_coef=0.25), value_slope=2.0) == pytest.approx(0.5)
    assert step(dict(ent_coef=0.1), entropy_slope=1.0) == pytest.approx(
        0.1
    )  # more entropy lowers the loss
    assert step(dict(ent_coef=0.0), entropy_slope=1.0) == 0.0
    assert step({}, extra_slope=3.0) == pytest.approx(-3.0)


def test_value_clip_uses_vf_clip_coef_and_falls_back_to_clip_coef():
    def value_grad(config):
        theta = nn.Parameter(torch.zeros((), dtype=F64))
        # new V = 0.15 + θ, old V = 0, R = 1: inside a 0.2 band (gradient V - R), outside a 0.1 band (clipped
        # term 0.1 - 1 is further from R, so the gradient is zero).
        batch = {
            "logprobs": torch.zeros(1, dtype=F64),
            "values": torch.zeros(1, dtype=F64),
            "advantages": torch.zeros(1, dtype=F64),
            "returns": torch.ones(1, dtype=F64),
        }
        ppo_update(
            [theta],
            torch.optim.SGD([theta], lr=1.0),
            batch,
            lambda mb: (
                mb["logprobs"] + 0 * theta,
                torch.zeros(1, dtype=F64),
                0.15 + theta.expand(1),
            ),
            PPOConfig(
                update_epochs=1,
                num_minibatches=1,
                norm_adv=False,
                vf_coef=1.0,
                max_grad_norm=100.0,
                **config,
            ),
        )
        return theta.item()

    assert value_grad(dict(clip_coef=0.2)) == pytest.approx(0.85)
    assert value_grad(dict(clip_coef=0.1)) == 0.0
    assert value_grad(dict(clip_coef=0.2, vf_clip_coef=0.1)) == 0.0
    assert value_grad(dict(clip_coef=0.1, vf_clip_coef=0.2)) == pytest.approx(0.85)
    assert value_grad(dict(clip_coef=0.1, clip_vloss=False)) == pytest.approx(0.85)


def test_advantages_are_normalised_per_minibatch_only_when_norm_adv():
    def policy_loss(norm_adv):
        theta = nn.Parameter(torch.zeros((), dtype=F64))
        batch = {
            "logprobs": torch.zeros(2, dtype=F64),
            "values": torch.zeros(2, dtype=F64),
            "advantages": torch.tensor([3.0, 5.0], dtype=F64),
            "returns": torch.zeros(2, dtype=F64),
        }
        m = ppo_update(
            [theta],
            torch.optim.SGD([theta], lr=0.0),
            batch,
            lambda mb: (mb["logprobs"] + theta, torch.zeros(2, dtype=F64), mb["values"]),
            PPOConfig(update_epochs=1, num_minibatches=1, norm_adv=norm_adv),
        )
        return m["policy_loss"].item()

    assert policy_loss(False) == pytest.approx(-4.0)  # -mean(A) at ratio 1
    assert policy_loss(True) == pytest.approx(0.0, abs=1e-12)  # normalised advantages have mean 0


# ----------------------------------------------------------------------------- scripted log-ratios: KL, early stop


def scripted_update(shift, config, optimizer_lr=0.1):
    """ppo_update over one row per minibatch where the i-th call to ``evaluate`` returns the rollout's
    log-prob shifted by ``shift(i)`` (the log-ratio), whatever the permutation. The shift carries a
    gradient of 1 with respect to one parameter θ, so a finite shift is an ordinary update."""
    theta = nn.Parameter(torch.zeros((), dtype=F64))
    n = config.num_minibatches
    batch = {
        "logprobs": torch.zeros(n, dtype=F64),
        "values": torch.zeros(n, dtype=F64),
        "advantages": torch.ones(n, dtype=F64),
        "returns": torch.zeros(n, dtype=F64),
    }
    calls = []

    def evaluate(mb):
        s = shift(len(calls))
        calls.append(s)
        moved = theta - theta.detach()  # zero, with gradient 1
        return mb["logprobs"] + s + moved, torch.zeros(1, dtype=F64), mb["values"] + moved

    metrics = ppo_update(
        [theta], torch.optim.SGD([theta], lr=optimizer_lr), batch, evaluate, config
    )
    return metrics, calls


def k3(s: float) -> float:
    """The k3 KL estimate of one log-ratio, computed with the same float operations as the core."""
    return ((torch.tensor(s, dtype=F64).exp() - 1.0) - s).item()


def kl_config(**kw):
    return PPOConfig(update_epochs=4, num_minibatches=3, norm_adv=False, **kw)


def test_target_kl_stops_after_the_epoch_whose_last_minibatch_kl_is_just_above_it():
    m, calls = scripted_update(
        lambda i: 0.3 if i % 3 == 2 else 0.0, kl_config(target_kl=k3(0.3) * (1 - 1e-9))
    )
    assert len(calls) == 3  # the whole first epoch runs, then no more
    assert (m["epochs"].item(), m["updates"].item()) == (1, 3)
    assert m["approx_kl"].item() == pytest.approx(k3(0.3) / 3)


def test_target_kl_just_below_the_last_minibatch_kl_does_not_stop():
    m, calls = scripted_update(
        lambda i: 0.3 if i % 3 == 2 else 0.0, kl_config(target_kl=k3(0.3) * (1 + 1e-9))
    )
    assert len(calls) == 12 and m["epochs"].item() == 4 and m["updates"].item() == 12


def test_target_kl_equal_to_the_last_minibatch_kl_does_not_stop():
    m, calls = scripted_update(lambda i: 0.3 if i % 3 == 2 else 0.0, kl_config(target_kl=k3(0.3)))
    assert m["epochs"].item() == 4


def test_target_kl_looks_at_the_last_minibatch_only():
    # The first two minibatches of each epoch are far above the target, the last one is at 0.
    m, calls = scripted_update(lambda i: 0.0 if i % 3 == 2 else 0.5, kl_config(target_kl=k3(0.3)))
    assert m["epochs"].item() == 4
    # The middle minibatch alone above the target does not stop either.
    m, calls = scripted_update(lambda i: 0.5 if i % 3 == 1 else 0.0, kl_config(target_kl=k3(0.3)))
    assert m["epochs"].item() == 4


def test_target_kl_is_checked_after_every_epoch():
    m, calls = scripted_update(lambda i: 0.3 if i == 5 else 0.0, kl_config(target_kl=k3(0.3) / 2))
    assert (m["epochs"].item(), m["updates"].item()) == (2, 6)


def test_without_target_kl_every_epoch_runs_however_large_the_kl():
    m, calls = scripted_update(lambda i: 3.0, kl_config())
    assert m["epochs"].item() == 4 and len(calls) == 12


def test_kl_metrics_are_k3_and_k1_averaged_over_minibatches_and_clipfrac_counts_ratios_outside_the_band():
    shifts = [0.3, -0.1, 0.25, 0.0]
    m, _ = scripted_update(
        lambda i: shifts[i], PPOConfig(update_epochs=2, num_minibatches=2, norm_adv=False)
    )
    assert m["approx_kl"].item() == pytest.approx(sum(k3(s) for s in shifts) / 4, rel=1e-6)
    assert m["old_approx_kl"].item() == pytest.approx(-sum(shifts) / 4, rel=1e-6)
    # |e^s - 1| > 0.2 for s = 0.3 and s = 0.25 only.
    assert m["clipfrac"].item() == pytest.approx(2 / 4)


def test_clipfrac_does_not_count_a_ratio_exactly_on_the_band_edge():
    s = 0.2
    edge = abs(
        torch.tensor(s, dtype=F64).exp().item() - 1.0
    )  # |ρ - 1| exactly as the core computes it
    m, _ = scripted_update(
        lambda i: s, PPOConfig(update_epochs=1, num_minibatches=1, norm_adv=False, clip_coef=edge)
    )
    assert m["clipfrac"].item() == 0.0
    m, _ = scripted_update(
        lambda i: s,
        PPOConfig(update_epochs=1, num_minibatches=1, norm_adv=False, clip_coef=edge * (1 - 1e-9)),
    )
    assert m["clipfrac"].item() == 1.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_log_ratio_counts_as_zero_in_the_kl_metrics(bad):
    m, _ = scripted_update(
        lambda i: 0.5 if i == 0 else bad,
        PPOConfig(update_epochs=1, num_minibatches=2, norm_adv=False),
    )
    assert m["approx_kl"].item() == pytest.approx(k3(0.5) / 2)
    assert m["old_approx_kl"].item() == pytest.approx(-0.5 / 2)
    assert m["clipfrac"].item() == pytest.approx(1 / 2)


def test_skipped_updates_count_in_the_kl_average_but_not_in_the_loss_average():
    m, _ = scripted_update(
        lambda i: 0.5 if i == 0 else math.nan,
        PPOConfig(update_epochs=1, num_minibatches=2, norm_adv=False),
    )
    assert (m["updates"].item(), m["skipped_updates"].item(), m["epochs"].item()) == (1, 1, 1)
    # The policy loss of the one applied update: -A·min(ρ, 1+ε) with ρ = e^0.5 > 1.2, A = 1.
    assert m["policy_loss"].item() == pytest.approx(-1.2)
    assert m["grad_norm"].item() == 0.0  # the clipped term has no gradient; v - R = 0 at θ = 0
    assert m["approx_kl"].item() == pytest.approx(k3(0.5) / 2)


@pytest.mark.parametrize("epochs,minibatches", [(1, 1), (2, 2)])
def test_when_every_update_is_skipped_parameters_stay_and_metrics_stay_finite(epochs, minibatches):
    policy = LinearPolicy()
    batch = make_batch(policy, (4,))
    batch["advantages"][:] = math.nan  # every minibatch's loss and gradient are non-finite
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.Adam(policy.parameters(), lr=0.1)
    m = ppo_update(
        policy.parameters(),
        opt,
        batch,
        policy.evaluate,
        PPOConfig(update_epochs=epochs, num_minibatches=minibatches),
    )
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert all(p.grad is None for p in policy.parameters())  # no non-finite gradient is left behind
    n = epochs * minibatches
    assert (m["updates"].item(), m["skipped_updates"].item(), m["epochs"].item()) == (0, n, epochs)
    for k in ("policy_loss", "value_loss", "entropy", "extra_loss", "grad_norm"):
        assert m[k].item() == 0.0, k
    # The policy never moved, so every minibatch's KL is the whole batch's: the average is that.
    with torch.no_grad():
        logratio = policy.evaluate(batch)[0] - batch["logprobs"]
    assert m["approx_kl"].item() == pytest.approx(
        ((logratio.exp() - 1) - logratio).mean().item(), rel=1e-6
    )
    assert m["old_approx_kl"].item() == pytest.approx((-logratio).mean().item(), rel=1e-6)


def test_non_finite_guard_raises_after_patience_all_skipped_iterations_in_a_row():
    guard = NonFiniteGuard()  # patience 3 by default
    for _ in range(2):
        guard.check({"updates": torch.tensor(0.0)}, "at iteration 7")
    guard.check(
        {"updates": torch.tensor(4.0)}, "at iteration 8"
    )  # one good iteration resets the streak
    guard.check({"updates": 0.0}, "at iteration 9")
    guard.check({"updates": 0.0}, "at iteration 10")
    with pytest.raises(
        NonFiniteTraining, match=r"every update of 3 iterations in a row at iteration 11;"
    ):
        guard.check({"updates": 0.0}, "at iteration 11")


def test_non_finite_guard_with_patience_one_raises_on_the_first_all_skipped_iteration():
    guard = NonFiniteGuard(patience=1)
    guard.check({"updates": 1.0}, "x")
    with pytest.raises(NonFiniteTraining, match="1 iterations"):
        guard.check({"updates": 0.0}, "x")


# ----------------------------------------------------------------------------- explained_variance


def test_explained_variance_is_one_minus_residual_variance_over_return_variance():
    returns = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=F64)
    values = torch.tensor([1.5, 1.0, 4.0, 6.0], dtype=F64)
    expected = 1 - np.var((returns - values).numpy()) / np.var(returns.numpy())
    assert explained_variance(values, returns).item() == pytest.approx(expected, rel=1e-12)
    assert explained_variance(returns, returns).item() == 1.0
    assert explained_variance(torch.full_like(returns, 3.0), returns).item() == pytest.approx(
        0.0, abs=1e-12
    )


def test_explained_variance_does_not_depend_on_the_scale_of_returns():
    returns = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=F64)
    values = torch.tensor([1.5, 1.0, 4.0, 6.0], dtype=F64)
    for scale in (1e-3, 0.3, 1e3):  # Var[R] well below and above 1
        assert explained_variance(scale * values, scale * returns).item() == pytest.approx(
            explained_variance(values, returns).item(), rel=1e-9
        )


def test_explained_variance_uses_only_masked_entries():
    returns = torch.tensor([1.0, 2.0, 100.0, 4.0, 7.0], dtype=F64)
    values = torch.tensor([1.5, 1.0, -50.0, 4.0, 6.0], dtype=F64)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=F64)
    keep = mask > 0
    assert explained_variance(values, returns, mask).item() == pytest.approx(
        explained_variance(values[keep], returns[keep]).item(), rel=1e-12
    )


def test_explained_variance_is_nan_when_returns_do_not_vary():
    flat = torch.full((4,), 2.0, dtype=F64)
    assert math.isnan(
        explained_variance(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64), flat).item()
    )
    assert math.isnan(explained_variance(flat, flat).item())
    one = torch.tensor([1.0, 0.0, 0.0], dtype=F64)  # a single kept entry has no variance either
    assert math.isnan(
        explained_variance(
            torch.tensor([0.5, 9.0, 3.0], dtype=F64), torch.tensor([2.0, 5.0, 1.0], dtype=F64), one
        ).item()
    )


# ----------------------------------------------------------------------------- MLP actor-critic


def _gain(weight: torch.Tensor) -> torch.Tensor:
    """For an orthogonal init with gain g, W Wᵀ (or Wᵀ W, whichever is smaller) is g² I: check the
    off-diagonal is zero and return the diagonal."""
    gram = weight @ weight.T if weight.shape[0] <= weight.shape[1] else weight.T @ weight
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max().item() < 1e-5
    return torch.diagonal(gram)


def test_orthogonal_init_gains_are_sqrt2_hidden_001_actor_head_1_critic_head_and_biases_zero():
    torch.manual_seed(0)
    policy = MLPActorCritic(gym.spaces.Box(-1, 1, (5,), np.float32), gym.spaces.Discrete(3))
    assert policy.hidden_sizes == (64, 64) and (policy.obs_dim, policy.act_dim) == (5, 3)
    for net, head_gain in ((policy.actor, 0.01), (policy.critic, 1.0)):
        linears = [m for m in net if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [
            (5, 64),
            (64, 64),
            (64, linears[-1].out_features),
        ]
        for layer, gain in zip(linears, (math.sqrt(2.0), math.sqrt(2.0), head_gain)):
            torch.testing.assert_close(
                _gain(layer.weight),
                torch.full((min(layer.weight.shape),), gain**2),
                rtol=1e-4,
                atol=1e-9,
            )
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert all(isinstance(m, nn.Tanh) for m in net if not isinstance(m, nn.Linear))
    assert (policy.actor[-1].out_features, policy.critic[-1].out_features) == (3, 1)


def test_layer_init_defaults_to_gain_sqrt2_and_zero_bias_and_takes_both():
    torch.manual_seed(0)
    layer = layer_init(nn.Linear(4, 6))
    torch.testing.assert_close(_gain(layer.weight), torch.full((4,), 2.0), rtol=1e-5, atol=1e-7)
    assert torch.equal(layer.bias, torch.zeros(6))
    layer = layer_init(nn.Linear(6, 4), std=0.5, bias_const=0.25)
    torch.testing.assert_close(_gain(layer.weight), torch.full((4,), 0.25), rtol=1e-5, atol=1e-7)
    assert torch.equal(layer.bias, torch.full((4,), 0.25))


def test_mlp_chains_the_hidden_widths_and_forward_mlp_equals_the_module():
    torch.manual_seed(0)
    net = mlp(3, (5, 7), 2, out_std=1.0)
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [
        (3, 5),
        (5, 7),
        (7, 2),
    ]
    x = torch.randn(4, 3)
    torch.testing.assert_close(forward_mlp(net, x), net(x), rtol=0, atol=0)
    relu = mlp(3, (5, 7), 2, out_std=1.0, activation="relu")
    assert [type(m) for m in relu] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    torch.testing.assert_close(forward_mlp(relu, x), relu(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        mlp(3, (5,), 2, out_std=1.0, activation="gelu")


def test_without_ortho_init_the_layers_keep_pytorchs_default_init():
    torch.manual_seed(0)
    ours = MLPActorCritic(
        gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(2), (5, 7), ortho_init=False
    )
    torch.manual_seed(0)  # the same draws, in the same order: the critic, then the actor
    ref = [nn.Linear(i, o) for i, o in ((3, 5), (5, 7), (7, 1), (3, 5), (5, 7), (7, 2))]
    got = [m for net in (ours.critic, ours.actor) for m in net if isinstance(m, nn.Linear)]
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    torch.manual_seed(0)
    ortho = MLPActorCritic(gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(2), (5, 7))
    assert (
        not torch.equal(ortho.actor[-1].weight, ours.actor[-1].weight)
        and ortho.actor[-1].bias.abs().sum() == 0
    )
    torch.manual_seed(0)
    default = mlp(3, (5,), 2, out_std=1.0)  # orthogonal unless asked otherwise
    torch.manual_seed(0)
    assert torch.equal(default[0].weight, mlp(3, (5,), 2, out_std=1.0, ortho_init=True)[0].weight)


def test_gaussian_policy_log_std_starts_at_log_std_init_one_per_action_dimension():
    space = gym.spaces.Box(-1, 1, (4,), np.float32)
    policy = MLPActorCritic(space, gym.spaces.Box(-1, 1, (2,), np.float32))
    assert torch.equal(policy.actor_logstd.detach(), torch.zeros(1, 2))
    policy = MLPActorCritic(space, gym.spaces.Box(-1, 1, (2,), np.float32), log_std_init=-0.5)
    assert torch.equal(policy.actor_logstd.detach(), torch.full((1, 2), -0.5))
    assert not hasattr(MLPActorCritic(space, gym.spaces.Discrete(2)), "actor_logstd")


def test_policy_rejects_spaces_it_cannot_handle():
    with pytest.raises(TypeError, match="Box observation space"):
        MLPActorCritic(gym.spaces.Discrete(3), gym.spaces.Discrete(2))
    with pytest.raises(TypeError, match="Discrete and Box actions"):
        MLPActorCritic(gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.MultiDiscrete([2, 2]))


def _policy(continuous: bool, obs_dim: int = 4, act_dim: int = 3) -> MLPActorCritic:
    """A policy far from its near-uniform init: sharp logits or a non-unit, per-dimension std."""
    torch.manual_seed(0)
    act_space = (
        gym.spaces.Box(-1, 1, (act_dim,), np.float32)
        if continuous
        else gym.spaces.Discrete(act_dim)
    )
    policy = MLPActorCritic(
        gym.spaces.Box(-1, 1, (obs_dim,), np.float32), act_space, hidden_sizes=(8,)
    )
    with torch.no_grad():
        policy.actor[-1].weight.mul_(150.0)
        policy.actor[-1].bias.copy_(torch.linspace(-0.5, 0.5, act_dim))
        if continuous:
            policy.actor_logstd.copy_(torch.linspace(-0.7, 0.4, act_dim).unsqueeze(0))
    return policy


def _distribution(policy, obs):
    out = policy.actor(obs)
    if policy.continuous:
        normal = torch.distributions.Normal(out, policy.actor_logstd.exp().expand_as(out))
        return torch.distributions.Independent(normal, 1)
    return torch.distributions.Categorical(logits=out)


@pytest.mark.parametrize("continuous", [False, True])
def test_evaluate_log_prob_entropy_and_value_match_torch_distributions(continuous):
    policy = _policy(continuous)
    obs = torch.randn(6, 4)
    dist = _distribution(policy, obs)
    actions = dist.sample()
    with torch.no_grad():
        logprob, entropy, value = policy.evaluate(
            obs, actions.float() if not continuous else actions
        )
        torch.testing.assert_close(logprob, dist.log_prob(actions), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, dist.entropy(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(value, policy.critic(obs).squeeze(-1))
        torch.testing.assert_close(policy.value(obs), value)


@pytest.mark.parametrize("continuous", [False, True])
def test_act_returns_the_log_prob_of_its_sample_and_the_value_evaluate_agrees_on(continuous):
    policy = _policy(continuous)
    obs = torch.randn(6, 4)
    with torch.no_grad():
        action, logprob, value = policy.act(obs)
        torch.testing.assert_close(
            logprob, _distribution(policy, obs).log_prob(action), rtol=1e-5, atol=1e-5
        )
        again, _, value_again = policy.evaluate(obs, action)
    torch.testing.assert_close(again, logprob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value_again, value)


def test_categorical_act_samples_actions_with_the_softmax_probabilities():
    policy = _policy(False)
    obs = torch.randn(1, 4).expand(40000, 4)
    torch.manual_seed(1)
    with torch.no_grad():
        action, _, _ = policy.act(obs)
        probs = torch.softmax(policy.actor(obs[:1]), -1)[0]
    assert probs.min() > 0.03  # every action has a visible share
    freq = torch.bincount(action, minlength=3).float() / len(action)
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.01)


def test_gaussian_act_samples_around_the_mean_with_the_policy_std():
    policy = _policy(True)
    obs = torch.randn(1, 4).expand(40000, 4)
    torch.manual_seed(1)
    with torch.no_grad():
        action, _, _ = policy.act(obs)
        mean, std = policy.actor(obs[:1])[0], policy.actor_logstd.exp()[0]
    torch.testing.assert_close(action.mean(0), mean, rtol=0, atol=0.03)
    torch.testing.assert_close(action.std(0), std, rtol=0.02, atol=0)


@pytest.mark.parametrize("continuous", [False, True])
def test_deterministic_action_is_the_mode(continuous):
    policy = _policy(continuous)
    obs = torch.randn(5, 4)
    with torch.no_grad():
        out = policy.actor(obs)
        expected = out if continuous else out.argmax(-1)
        assert torch.equal(policy.deterministic_action(obs), expected)
        if not continuous:
            assert torch.equal(
                policy.deterministic_action(obs), _distribution(policy, obs).probs.argmax(-1)
            )


@pytest.mark.parametrize("continuous", [False, True])
def test_policy_accepts_any_leading_batch_shape(continuous):
    # [T=5, N=2, obs]: the action dimension (3) differs from every batch dimension.
    policy = _policy(continuous)
    obs = torch.randn(5, 2, 4)
    flat = obs.reshape(10, 4)
    with torch.no_grad():
        torch.manual_seed(2)
        action, logprob, value = policy.act(obs)
        assert action.shape == ((5, 2, 3) if continuous else (5, 2))
        assert logprob.shape == value.shape == policy.value(obs).shape == (5, 2)
        flat_action = action.reshape(10, 3) if continuous else action.reshape(10)
        lp, ent, v = policy.evaluate(obs, action)
        assert lp.shape == ent.shape == v.shape == (5, 2)
        lp_flat, ent_flat, v_flat = policy.evaluate(flat, flat_action)
        torch.testing.assert_close(lp.reshape(10), lp_flat)
        torch.testing.assert_close(ent.reshape(10), ent_flat)
        torch.testing.assert_close(logprob.reshape(10), lp_flat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(policy.value(obs).reshape(10), v_flat)
        torch.testing.assert_close(value.reshape(10), v_flat)
        torch.testing.assert_close(
            _distribution(policy, flat).log_prob(flat_action), lp_flat, rtol=1e-5, atol=1e-5
        )
        mode = policy.deterministic_action(obs)
        assert mode.shape == ((5, 2, 3) if continuous else (5, 2))


def test_normalize_of_a_single_entry_is_zero_with_or_without_mask():
    from textenv.agents.ppo import normalize

    assert normalize(torch.tensor([3.0]), torch.tensor([1.0])).item() == 0.0  # was 1.0
    assert normalize(torch.tensor([3.0])).item() == 0.0  # was nan
    x, m = torch.tensor([3.0, 7.0, -1.0]), torch.tensor([0.0, 1.0, 0.0])
    assert normalize(x, m)[1].item() == 0.0


def test_one_sample_minibatches_with_advantage_normalisation_are_applied_not_skipped():
    import gymnasium as gym

    from textenv.agents.policies import MLPActorCritic
    from textenv.agents.ppo import PPOConfig, ppo_update

    torch.manual_seed(0)
    policy = MLPActorCritic(gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(2))
    obs = torch.randn(4, 3)
    with torch.inference_mode():
        actions, logprobs, values = policy.act(obs)
    batch = {
        "obs": obs,
        "actions": actions.clone(),
        "logprobs": logprobs.clone(),
        "values": values.clone(),
        "advantages": torch.randn(4),
        "returns": torch.randn(4),
    }
    stats = ppo_update(
        policy.parameters(),
        torch.optim.SGD(policy.parameters(), lr=0.1),
        batch,
        lambda mb: policy.evaluate(mb["obs"], mb["actions"]),
        PPOConfig(update_epochs=1, num_minibatches=4),
    )
    assert stats["skipped_updates"].item() == 0 and stats["updates"].item() == 4
    assert stats["policy_loss"].item() == 0.0  # each one-sample advantage whitens to 0


def test_explained_variance_ignores_nan_in_masked_out_entries():
    from textenv.agents.ppo import explained_variance

    values, returns = torch.tensor([1.0, 2.0, float("nan")]), torch.tensor([1.5, 2.5, float("nan")])
    mask = torch.tensor([1.0, 1.0, 0.0])
    # Var[R] = 0.25, Var[R - V] = 0 over the two kept entries: a perfect critic up to a constant.
    assert explained_variance(values, returns, mask).item() == 1.0
