"""The text trainer's numerics: mixed precision keeps fp32 master weights, and PPO's ratio and
KL compare one distribution with itself for every sampling setting and precision."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from textenv import TextGenerationVectorEnv
from textenv.agents.lm import LMActorCritic
from textenv.agents.rollout_text import collect_rollout
from textenv.agents.text import TextTrainConfig, train_text
from textenv.models import load_causal_lm

ENV = dict(task="Toy", model="tiny", max_new_tokens=6, max_prompt_tokens=8, kl_coef=0.1)


def _train(tmp_path, name, **kw):
    base = dict(
        task="Toy",
        model="tiny",
        iterations=1,
        num_envs=8,
        seed=3,
        device="cpu",
        runs_dir=str(tmp_path),
        run_name=name,
        tensorboard=False,
        progress=False,
        eval_samples=0,
        sample_every=0,
    )
    if "ppo" in kw:
        kw["ppo"] = dataclasses.replace(TextTrainConfig().ppo, **kw["ppo"])
    summary = train_text(TextTrainConfig.from_flat(**(base | kw)))
    rows = [
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    return summary, rows


def _changed_fraction(policy_dir, dtypes):
    initial, _ = load_causal_lm("tiny")
    before = initial.state_dict()
    changed = total = 0
    with safe_open(str(policy_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            after = f.get_tensor(name)
            changed += int(
                (after != before[name].to(after.dtype)).sum()
            )  # vs the start as the run held it
            total += after.numel()
            dtypes.add(after.dtype)
    return changed / total


def test_bf16_mixed_precision_moves_as_many_weights_as_fp32_at_the_default_learning_rate(tmp_path):
    # Stepping bf16 parameters rounds most updates of lr 1e-5 away (14% of the weights moved
    # against 99.7% in fp32); fp32 master weights with a bf16 forward move them all.
    fractions = {}
    for precision in ("fp32", "bf16"):
        summary, _ = _train(tmp_path, precision, precision=precision)
        assert TextTrainConfig().learning_rate == 1e-5
        fractions[precision] = _changed_fraction(tmp_path / precision / "policy", dtypes := set())
        assert dtypes == {torch.float32}, precision  # the checkpoint holds the fp32 master weights
    assert fractions["fp32"] > 0.9, fractions
    assert fractions["bf16"] == pytest.approx(fractions["fp32"], rel=0.05), fractions


def test_bf16_keeps_fp32_optimizer_state(tmp_path):
    _train(tmp_path, "bf16", precision="bf16")
    with safe_open(
        str(tmp_path / "bf16" / "policy" / "trainer_state.safetensors"), framework="pt"
    ) as f:
        moments = [
            f.get_tensor(k)
            for k in f.keys()
            if k.startswith("optim.") and k.endswith(("exp_avg", "exp_avg_sq"))
        ]
    floats = [t for t in moments if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_a_policy_equal_to_the_reference_has_ratio_one_and_kl_zero(
    tmp_path, precision, temperature
):
    # One epoch of one minibatch: the logged ratio statistics are of the forward before any step.
    _, rows = _train(
        tmp_path,
        "eq",
        precision=precision,
        temperature=temperature,
        kl_coef=0.1,
        ppo=dict(update_epochs=1, num_minibatches=1),
        save_checkpoint=False,
    )
    (row,) = rows
    assert abs(row["old_approx_kl"]) < 1e-6, row
    assert row["approx_kl"] < 1e-6, row
    assert row["clipfrac"] == 0.0
    assert abs(row["kl_k1"]) < 1e-5 and abs(row["kl_k3"]) < 1e-5, row


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.8), (5, 0.9)])
def test_the_update_scores_a_token_under_the_filtered_distribution_it_was_sampled_from(
    top_k, top_p
):
    envs = TextGenerationVectorEnv(num_envs=16, **ENV)
    lm, _ = load_causal_lm("tiny:1")
    policy = LMActorCritic(lm, top_k=top_k, top_p=top_p)
    ro = collect_rollout(policy, envs, seed=0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logprob, entropy, _ = policy.evaluate_responses(
            ro.input_ids, ro.attention_mask, ro.actions, ro.prompt_len
        )
    m = ro.mask.bool()
    torch.testing.assert_close(logprob[m], ro.logprobs[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[m], ro.entropy[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag", [["--top-k", "5"], ["--top-p", "0.9"], ["--top-p=0.9"]])
def test_top_k_and_top_p_are_refused_in_training_with_one_line(flag, capsys, tmp_path):
    from textenv.agents.cli.train_text import main

    assert main(["--task", "Toy", "--model", "tiny", "--runs-dir", str(tmp_path), *flag]) == 2
    assert not any(tmp_path.iterdir())
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and flag[0].split("=")[0] in err and "textenv-evaluate" in err
    ), err


def _with_a_minus_inf_logit(policy, column=5):
    def hook(_module, _args, out):
        out.logits[..., column] = float("-inf")
        return out

    return policy.lm.register_forward_hook(hook)


def test_entropy_and_its_gradient_are_finite_when_a_logit_is_minus_inf():
    lm, _ = load_causal_lm("tiny:1")
    policy = LMActorCritic(lm)
    _with_a_minus_inf_logit(policy)
    ids = torch.randint(3, 30, (2, 7))
    mask = torch.ones_like(ids)
    logprob, entropy, _ = policy.evaluate_responses(ids, mask, ids[:, 4:], prompt_len=4)
    assert torch.isfinite(entropy).all() and torch.isfinite(logprob).all()
    entropy.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
    # The entropy is that of the distribution without the -inf token.
    with torch.no_grad():
        logits = policy.lm(input_ids=ids, attention_mask=mask).logits[:, 3:6].float()
        p = torch.softmax(torch.cat([logits[..., :5], logits[..., 6:]], -1), -1)
        torch.testing.assert_close(entropy, -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)


def test_old_logprobs_are_recomputed_with_the_updates_forward_when_asked(tmp_path):
    # The KV-cached sampling forward and the update's full forward differ by rounding; the
    # recompute pass makes the stored log-probs the update's own, so the first ratio is exact.
    _, rows = _train(
        tmp_path,
        "re",
        old_logprobs="recompute",
        ppo=dict(update_epochs=1, num_minibatches=1),
        save_checkpoint=False,
    )
    assert abs(rows[0]["old_approx_kl"]) < 1e-9 and rows[0]["approx_kl"] < 1e-9, rows[
        0
    ]  # rollout: 2.6e-8


@pytest.mark.parametrize("reference_pass", ["at_end", "per_step"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_static_cache_rollout_samples_what_the_dynamic_one_does(reference_pass, temperature):
    # Left-padded prompts of different lengths and responses ending at different steps: the
    # static cache's masked slots must read like the dynamic cache's growing one.
    rollouts = []
    for static in (False, True):
        envs = TextGenerationVectorEnv(
            num_envs=16, reference_pass=reference_pass, temperature=temperature, **ENV
        )
        lm, _ = load_causal_lm("tiny:1")
        policy = LMActorCritic(lm, temperature=temperature)
        torch.nn.init.normal_(
            policy.value_head.weight, std=0.1, generator=torch.Generator().manual_seed(1)
        )
        generator = torch.Generator().manual_seed(0)
        rollouts.append(
            collect_rollout(policy, envs, seed=0, generator=generator, static_cache=static)
        )
    dynamic, static = rollouts
    assert (~dynamic.mask.bool()).any() and dynamic.mask.bool().any(1).all()  # ragged ends
    assert torch.equal(dynamic.actions, static.actions) and torch.equal(dynamic.mask, static.mask)
    assert dynamic.responses == static.responses
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(static.values, dynamic.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(static.ref_logprobs, dynamic.ref_logprobs, rtol=0, atol=0)
    assert torch.equal(static.scores, dynamic.scores)


def test_a_static_cache_is_refused_for_a_conversation():
    from textenv.multiturn import MultiTurnTextVectorEnv

    envs = MultiTurnTextVectorEnv(num_envs=2, task="ToyTurns", model="tiny")
    policy = LMActorCritic(load_causal_lm("tiny:1")[0])
    with pytest.raises(ValueError, match="static KV cache is for single-turn envs"):
        collect_rollout(policy, envs, seed=0, generator=torch.Generator(), static_cache=True)
