"""The PPO update near the hardware: micro-batches packed by length give the unpacked gradient
and forward fewer padded tokens; no host sync per minibatch; a non-finite step is skipped on the
device exactly where the host would skip it; the AdamW kernel choice; peak memory logged."""

import collections
import contextlib
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from tests.test_ppo_core import LinearPolicy, make_batch
from textenv.agents.lm import LMActorCritic, response_packing
from textenv.agents.ppo import (
    Packing,
    PPOConfig,
    clipped_surrogate,
    masked_mean,
    normalize,
    ppo_update,
    value_loss,
)
from textenv.agents.rollout_text import kl_k3
from textenv.agents.text import (
    TextTrainConfig,
    adamw,
    fused_adamw_applies,
    peak_memory_gib,
    train_text,
)
from textenv.models import load_causal_lm

F64 = torch.float64

# ----------------------------------------------------------------------------- a tiny LM batch


def lm_batch(policy, n=16, prompt_width=6, budget=48, seed=0):
    """Left-padded prompts of 2..prompt_width tokens, responses of lengths spread over 5..budget
    right-padded to budget, stored log-probs and values off from the policy's (the clips
    engage); entries past each response are 0, as a rollout holds them."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, prompt_width + 1, (n,), generator=g)
    resp_lens = torch.linspace(5, budget, n).round().long()[torch.randperm(n, generator=g)]
    width = prompt_width + budget
    cols = torch.arange(width)
    attention = (cols >= prompt_width - prompt_lens[:, None]) & (
        cols < prompt_width + resp_lens[:, None]
    )
    vocab = policy.lm.config.vocab_size
    ids = torch.where(attention, torch.randint(3, vocab, (n, width), generator=g), 0)
    mask = (torch.arange(budget) < resp_lens[:, None]).float()
    actions = ids[:, prompt_width:]
    attention = attention.long()
    with torch.no_grad():
        logprob, _, value = policy.evaluate_responses(ids, attention, actions, prompt_width)

    def off(x, scale):
        return torch.where(mask > 0, x + scale * torch.randn(x.shape, generator=g), 0.0)

    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "actions": actions,
        "logprobs": off(logprob, 0.3),
        "values": off(value, 0.5),
        "advantages": off(torch.zeros_like(mask), 1.0),
        "returns": off(value, 1.0),
        "mask": mask,
        "ref_logprobs": off(logprob, 0.2),
    }
    return batch, prompt_width


def lm_policy():
    lm, _ = load_causal_lm("tiny:1")
    policy = LMActorCritic(lm)
    nn.init.normal_(policy.value_head.weight, std=0.1, generator=torch.Generator().manual_seed(1))
    return policy


def lm_evaluate(policy, prompt_len, kl_in_loss, beta=0.1):
    """The text trainer's evaluate (agents/text.py), which cuts a packed micro-batch's columns."""

    def evaluate(mb, columns=None):
        logprob, entropy, value = policy.evaluate_responses(
            mb["input_ids"],
            mb["attention_mask"],
            mb["actions"],
            prompt_len,
            positions=mb.get("positions"),
            columns=columns,
        )
        if not kl_in_loss:
            return logprob, entropy, value
        return (
            logprob,
            entropy,
            value,
            beta * kl_k3(logprob, mb["ref_logprobs"][:, : len(logprob[0])]),
        )

    return evaluate


def forwarded_tokens(policy):
    """A list that the LM's forwards append their ``rows × columns`` to."""
    seen: list[int] = []
    policy.lm.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True
    )
    return seen


def run_lm_update(batch, prompt_len, config, packed, kl_in_loss=False):
    policy = lm_policy()
    seen = forwarded_tokens(policy)
    packing = None
    if packed:
        packing = response_packing(batch["attention_mask"], batch["mask"], prompt_len)
    optimizer = adamw([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    metrics = ppo_update(
        policy.parameters(),
        optimizer,
        batch,
        lm_evaluate(policy, prompt_len, kl_in_loss),
        config,
        torch.Generator().manual_seed(7),
        packing=packing,
    )
    return policy, metrics, sum(seen)


@pytest.mark.parametrize(
    "config,kl_in_loss",
    [
        (PPOConfig(update_epochs=2, num_minibatches=2, grad_accum_steps=4), False),
        (
            PPOConfig(
                update_epochs=1,
                num_minibatches=1,
                grad_accum_steps=4,
                loss_aggregation="sequence_mean",
                ent_coef=0.01,
                norm_adv=True,
            ),
            True,
        ),
        (PPOConfig(update_epochs=2, num_minibatches=4, grad_accum_steps=1), False),
    ],
    ids=["token_mean", "sequence_mean, entropy, kl in loss", "one micro-batch per minibatch"],
)
def test_packed_micro_batches_give_the_unpacked_update_and_forward_fewer_tokens(config, kl_in_loss):
    base = lm_policy()
    batch, prompt_len = lm_batch(base)
    plain, plain_metrics, plain_tokens = run_lm_update(batch, prompt_len, config, False, kl_in_loss)
    packed, packed_metrics, packed_tokens = run_lm_update(
        batch, prompt_len, config, True, kl_in_loss
    )
    for (name, p), q in zip(plain.named_parameters(), packed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    moved = [not torch.equal(p, q) for p, q in zip(plain.parameters(), base.parameters())]
    assert sum(moved) > len(moved) // 2  # the update did something to compare
    assert set(packed_metrics) == set(plain_metrics)
    for k, v in plain_metrics.items():
        torch.testing.assert_close(packed_metrics[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert 0 < plain_metrics["clipfrac"] < 1 and plain_metrics["skipped_updates"] == 0
    real = int(batch["attention_mask"].sum()) * config.update_epochs
    assert real < packed_tokens < plain_tokens


def test_packing_a_realistic_batch_forwards_far_fewer_padded_tokens():
    # 32 responses of lengths spread over 5..48 after prompts of 2..6 tokens, 4 micro-batches.
    policy = lm_policy()
    batch, prompt_len = lm_batch(policy, n=32)
    config = PPOConfig(update_epochs=1, num_minibatches=1, grad_accum_steps=4)
    _, _, plain = run_lm_update(batch, prompt_len, config, False)
    _, _, packed = run_lm_update(batch, prompt_len, config, True)
    real = int(batch["attention_mask"].sum())
    assert plain == 32 * (prompt_len + 48)
    # Sorted by length, each micro-batch of 8 is cut to its longest: a fifth of the padding left.
    assert (packed - real) < 0.3 * (plain - real), (real, packed, plain)


def test_response_packing_locates_each_rows_prompt_and_last_counted_token():
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0]])
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    p = response_packing(attention, mask, prompt_len=3)
    assert p.starts.tolist() == [2, 0, 1]
    assert p.lengths.tolist() == [2, 4, 1]
    assert p.ends.tolist() == [5, 7, 4]
    # In a conversation the actions sit at their own columns: a row ends after its last one.
    positions = torch.tensor([[3, 5, 6, 6], [3, 4, 5, 6], [4, 4, 4, 4]])
    p = response_packing(attention, mask, prompt_len=3, positions=positions)
    assert p.ends.tolist() == [6, 7, 5]


def test_evaluate_responses_on_a_rows_columns_equals_the_full_width_forward():
    policy = lm_policy()
    batch, prompt_len = lm_batch(policy, n=16, budget=12)
    packing = response_packing(batch["attention_mask"], batch["mask"], prompt_len)
    rows = ((packing.starts > 0) & (packing.lengths < 12)).nonzero().squeeze(1)[:4]
    batch, packing = (
        {k: v[rows] for k, v in batch.items()},
        response_packing(batch["attention_mask"][rows], batch["mask"][rows], prompt_len),
    )
    columns = (int(packing.starts.min()), int(packing.ends.max()), int(packing.lengths.max()))
    assert len(rows) == 4 and columns[0] > 0 and columns[2] < 12  # cut on both sides
    with torch.no_grad():
        full = policy.evaluate_responses(
            batch["input_ids"], batch["attention_mask"], batch["actions"], prompt_len
        )
        cut = policy.evaluate_responses(
            batch["input_ids"],
            batch["attention_mask"],
            batch["actions"],
            prompt_len,
            columns=columns,
        )
        # A conversation's layout: each action at its own column (here the same columns).
        positions = prompt_len + torch.arange(12).expand(4, 12)
        packing_mt = response_packing(
            batch["attention_mask"], batch["mask"], prompt_len, positions=positions
        )
        assert torch.equal(packing_mt.ends, packing.ends)
        cut_mt = policy.evaluate_responses(
            batch["input_ids"],
            batch["attention_mask"],
            batch["actions"],
            prompt_len,
            positions=positions,
            columns=columns,
        )
    m = batch["mask"][:, : columns[2]] > 0
    for a, b, c in zip(full, cut, cut_mt, strict=True):
        assert b.shape == c.shape == (4, columns[2])
        torch.testing.assert_close(b[m], a[:, : columns[2]][m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c[m], a[:, : columns[2]][m], rtol=1e-5, atol=1e-6)


def test_text_training_with_and_without_packing_logs_the_same_iteration(tmp_path, monkeypatch):
    widths: dict[bool, list[int]] = {}
    rows = {}
    original = LMActorCritic.evaluate_responses

    def recording(self, input_ids, *args, **kw):
        if torch.is_grad_enabled():  # the update's forwards, not the rollout's
            columns = kw.get("columns") or (0, input_ids.shape[1], 0)
            seen.append(input_ids[:, columns[0] : columns[1]].numel())
        return original(self, input_ids, *args, **kw)

    monkeypatch.setattr(LMActorCritic, "evaluate_responses", recording)
    for packed in (False, True):
        seen = widths[packed] = []
        train_text(
            TextTrainConfig.from_flat(
                task="Toy",
                model="tiny",
                iterations=1,
                num_envs=16,
                max_new_tokens=24,
                seed=3,
                device="cpu",
                runs_dir=str(tmp_path),
                run_name=str(packed),
                tensorboard=False,
                progress=False,
                eval_samples=0,
                sample_every=0,
                pack_micro_batches=packed,
                ppo=dataclasses.replace(TextTrainConfig().ppo, grad_accum_steps=2),
            )
        )
        lines = (tmp_path / str(packed) / "metrics.jsonl").read_text().splitlines()
        (rows[packed],) = [json.loads(line) for line in lines]
    assert sum(widths[True]) < sum(widths[False])
    timing = ("_s", "tokens_per_s", "peak_memory_gib")
    for k, v in rows[False].items():
        if not k.endswith(timing):
            assert rows[True][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert rows[True]["peak_memory_gib"] > 0


# ----------------------------------------------------------------------------- ppo.py's packing


def token_batch(seed=1, rows=8, width=5):
    """LinearPolicy per-token samples whose rows count 1..width tokens (a prefix each)."""
    policy = LinearPolicy()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).double()
    batch = make_batch(policy, (rows, width), mask=mask.tolist(), extra=True, seed=seed)
    return batch, Packing(torch.zeros_like(lengths), lengths, lengths)


def cut_evaluate(policy):
    """LinearPolicy.evaluate over a packed micro-batch's first ``length`` tokens."""

    def evaluate(mb, columns=None):
        if columns is not None:
            mb = {k: v[:, : columns[2]] for k, v in mb.items()}
        return policy.evaluate(mb)

    return evaluate


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_packing_in_float64_is_the_unpacked_update_to_rounding(aggregation):
    batch, packing = token_batch()
    config = PPOConfig(
        update_epochs=3, num_minibatches=2, grad_accum_steps=2, loss_aggregation=aggregation
    )
    results = []
    for pack in (None, packing):
        policy = LinearPolicy()
        seen = []

        def evaluate(mb, columns=None, policy=policy, seen=seen):
            seen.append(mb["obs"].shape[1] if columns is None else columns[2])
            return cut_evaluate(policy)(mb, columns)

        metrics = ppo_update(
            policy.parameters(),
            torch.optim.SGD(policy.parameters(), lr=0.3),
            batch,
            evaluate,
            config,
            torch.Generator().manual_seed(2),
            packing=pack,
        )
        results.append((policy, metrics, seen))
    (plain, m_plain, w_plain), (packed, m_packed, w_packed) = results
    for p, q in zip(plain.parameters(), packed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    for k, v in m_plain.items():
        torch.testing.assert_close(m_packed[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert sum(w_packed) < sum(w_plain) and len(w_packed) == len(w_plain)


def test_packing_visits_each_minibatchs_own_rows_longest_first():
    batch, packing = token_batch(rows=8)
    batch["row"] = torch.arange(8)
    seen = []
    policy = LinearPolicy()

    def evaluate(mb, columns):
        seen.append((mb["row"].tolist(), columns))
        return cut_evaluate(policy)({k: v for k, v in mb.items() if k != "row"}, columns)

    ppo_update(
        policy.parameters(),
        torch.optim.SGD(policy.parameters(), lr=0.1),
        batch,
        evaluate,
        PPOConfig(update_epochs=1, num_minibatches=2, grad_accum_steps=2),
        torch.Generator().manual_seed(11),
        packing=packing,
    )
    order = torch.randperm(8, generator=torch.Generator().manual_seed(11)).tolist()
    lengths = packing.lengths.tolist()
    for m in range(2):
        visited = seen[2 * m][0] + seen[2 * m + 1][0]
        assert sorted(visited) == sorted(order[4 * m : 4 * m + 4])  # the minibatch is unchanged
        assert [lengths[r] for r in visited] == sorted((lengths[r] for r in visited), reverse=True)
        for rows, columns in seen[2 * m : 2 * m + 2]:
            assert columns == (0, max(lengths[r] for r in rows), max(lengths[r] for r in rows))


def test_packing_is_refused_for_transitions():
    policy = LinearPolicy()
    batch = make_batch(policy, (4,))
    ones = torch.ones(4, dtype=torch.long)
    with pytest.raises(ValueError, match="packing is for batches of token sequences"):
        ppo_update(
            policy.parameters(),
            torch.optim.SGD(policy.parameters(), lr=0.1),
            batch,
            policy.evaluate,
            PPOConfig(update_epochs=1, num_minibatches=1),
            packing=Packing(ones * 0, ones, ones),
        )


# ----------------------------------------------------------------------------- host syncs


@contextlib.contextmanager
def counting_host_syncs():
    """Count the tensor-to-host conversions (each a device sync on a GPU) made inside."""
    counts: collections.Counter[str] = collections.Counter()
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counted(name):
        def call(self, *args, **kw):
            counts[name] += 1
            return originals[name](self, *args, **kw)

        return call

    for name in names:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize(
    "fused,target_kl,packed,expected",
    [
        (True, None, False, {}),
        (True, 100.0, False, {"item": 3}),  # the early-stop check, once per epoch
        (True, None, True, {"tolist": 3}),  # the micro-batches' columns, once per epoch
        (True, 100.0, True, {"item": 3, "tolist": 3}),
        (False, None, False, {"__bool__": 12}),  # an optimizer that cannot skip on the device
    ],
)
def test_the_update_syncs_with_the_host_once_per_epoch_at_most(fused, target_kl, packed, expected):
    batch, packing = token_batch(rows=8)
    policy = LinearPolicy()
    # Adam for the fused kernel; SGD, whose plain step syncs nothing itself, for the other.
    if fused:
        optimizer = torch.optim.Adam(policy.parameters(), lr=0.01, fused=True)
    else:
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.01)
    config = PPOConfig(update_epochs=3, num_minibatches=4, grad_accum_steps=2, target_kl=target_kl)
    generator = torch.Generator().manual_seed(0)
    with counting_host_syncs() as counts:
        metrics = ppo_update(
            policy.parameters(),
            optimizer,
            batch,
            cut_evaluate(policy),
            config,
            generator,
            packing=packing if packed else None,
        )
    assert dict(counts) == expected
    assert metrics["updates"].item() == 12


# ----------------------------------------------------------------------------- skips, reference


def slow_reference_update(policy, optimizer, batch, evaluate, cfg, generator):
    """PPO written plainly: each minibatch in one evaluate, its losses as masked means, the step
    taken or skipped on the host's look at the gradient norm, every statistic a Python float."""
    params = [p for p in policy.parameters()]
    size = batch["logprobs"].shape[0]
    mb_size = size // cfg.num_minibatches
    vf_clip = (cfg.vf_clip_coef or cfg.clip_coef) if cfg.clip_vloss else None
    applied, kls, epochs = [], [], 0
    for _ in range(cfg.update_epochs):
        epochs += 1
        order = torch.randperm(size, generator=generator)
        for m in range(cfg.num_minibatches):
            mb = {k: v[order[m * mb_size : (m + 1) * mb_size]] for k, v in batch.items()}
            mask = mb["mask"]
            keep = mask > 0
            old = {k: torch.where(keep, mb[k], 0.0) for k in ("logprobs", "values", "returns")}
            adv = torch.where(keep, mb["advantages"], 0.0)
            if cfg.norm_adv:
                adv = normalize(adv, mask)
            new_logprob, entropy, new_value, extra = evaluate(mb)
            logratio = new_logprob - old["logprobs"]
            pg = masked_mean(clipped_surrogate(logratio.exp(), adv, cfg.clip_coef), mask)
            vl = masked_mean(value_loss(new_value, old["values"], old["returns"], vf_clip), mask)
            ent, ex = masked_mean(entropy, mask), masked_mean(extra, mask)
            for p in params:
                p.grad = None
            (pg - cfg.ent_coef * ent + cfg.vf_coef * vl + ex).backward()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
            lr = torch.nan_to_num(logratio.detach(), nan=0.0, posinf=0.0, neginf=0.0)
            n = max(mask.sum().item(), 1.0)
            kls.append(
                (
                    ((lr.exp() - 1 - lr) * mask).sum().item() / n,
                    (-lr * mask).sum().item() / n,
                    (((lr.exp() - 1).abs() > cfg.clip_coef) * mask).sum().item() / n,
                )
            )
            if math.isfinite(norm):
                optimizer.step()
                applied.append([t.item() for t in (pg, vl, ent, ex)] + [norm])
        if cfg.target_kl is not None and kls[-1][0] > cfg.target_kl:
            break
    for p in params:
        p.grad = None

    def mean(xs):
        return sum(xs) / max(len(xs), 1)

    names = ("policy_loss", "value_loss", "entropy", "extra_loss", "grad_norm")
    out = {k: mean([u[i] for u in applied]) for i, k in enumerate(names)}
    out |= {k: mean([x[i] for x in kls]) for i, k in enumerate(("approx_kl", "old_approx_kl"))}
    out["clipfrac"] = mean([x[2] for x in kls])
    out |= {"epochs": epochs, "updates": len(applied), "skipped_updates": len(kls) - len(applied)}
    return out


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("target_kl", [None, 0.02])
@pytest.mark.parametrize("kind", ["fused AdamW", "AdamW"])
def test_non_finite_minibatches_are_skipped_where_a_host_check_skips_them(kind, target_kl, packed):
    batch, packing = token_batch(seed=4, rows=12)
    batch["advantages"][5, 0] = math.nan  # row 5 counts its first token: its minibatches skip
    config = PPOConfig(
        update_epochs=4, num_minibatches=3, grad_accum_steps=2, norm_adv=False, target_kl=target_kl
    )
    results = []
    for run in ("update", "reference"):
        policy = LinearPolicy()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=0.05, fused=kind == "fused AdamW")
        generator = torch.Generator().manual_seed(3)
        if run == "update":
            metrics = ppo_update(
                policy.parameters(),
                optimizer,
                batch,
                cut_evaluate(policy),
                config,
                generator,
                packing=packing if packed else None,
            )
            metrics = {k: v.item() for k, v in metrics.items()}
        else:
            metrics = slow_reference_update(
                policy, optimizer, batch, policy.evaluate, config, generator
            )
        results.append((policy, optimizer, metrics))
    (policy, optimizer, metrics), (ref_policy, ref_optimizer, expected) = results
    assert 0 < expected["skipped_updates"] < expected["skipped_updates"] + expected["updates"]
    if target_kl is not None:
        assert expected["epochs"] < config.update_epochs  # the early stop is covered too
    assert metrics.keys() == expected.keys()
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k  # float32 sums
    for p, q in zip(policy.parameters(), ref_policy.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        assert p.grad is None
        for key in ("step", "exp_avg", "exp_avg_sq"):  # a skipped step left no trace either
            torch.testing.assert_close(
                optimizer.state[p][key], ref_optimizer.state[q][key], rtol=1e-12, atol=1e-12
            )
    assert not hasattr(optimizer, "found_inf")


# ----------------------------------------------------------------------------- AdamW, memory


def test_adamw_is_fused_for_floating_parameters_on_the_cpu():
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, dtype=F64))]
    assert fused_adamw_applies(params)
    optimizer = adamw(params, lr=0.1)
    assert optimizer.defaults["fused"] is True
    assert adamw(params, lr=0.1, fused=False).defaults["fused"] is None


def test_adamw_leaves_the_kernel_to_torch_where_no_fused_one_applies():
    class Sharded(torch.Tensor):  # a tensor subclass, as FSDP's DTensor is
        pass

    meta = nn.Parameter(torch.zeros(3, device="meta"))
    assert not fused_adamw_applies([nn.Parameter(torch.zeros(3)), meta])
    assert not fused_adamw_applies([nn.Parameter(torch.zeros(3).as_subclass(Sharded))])
    assert not fused_adamw_applies([])
    assert adamw([meta], lr=0.1).defaults["fused"] is None


def test_peak_memory_on_the_cpu_is_at_least_a_tensor_just_held():
    before = peak_memory_gib(torch.device("cpu"))
    held = torch.ones(2**28, dtype=torch.uint8)  # 256 MiB, touched
    after = peak_memory_gib(torch.device("cpu"))
    assert before > 0 and after >= before and after >= 0.25
    del held
