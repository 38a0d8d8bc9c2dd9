"""The text trainer's rollout and GAE over tokens, pinned where a one-line change would go unseen."""

import pytest
import torch

from textenv import TextGenerationVectorEnv
from textenv.agents.gae import gae
from textenv.agents.lm import LMActorCritic
from textenv.agents.rollout_text import Rollout, collect_rollout, token_advantages
from textenv.agents.text import AdaptiveKLController
from textenv.models import load_causal_lm

ENV = dict(task="Toy", model="tiny", max_new_tokens=6, max_prompt_tokens=8, kl_coef=0.1)


def _policy(seed=1, **kw):
    policy = LMActorCritic(load_causal_lm(f"tiny:{seed}")[0], **kw)
    torch.nn.init.normal_(policy.value_head.weight, std=0.1)
    return policy


def test_the_rollout_samples_in_eval_mode_and_gives_the_mode_back():
    policy = _policy()
    modes = []
    policy.lm.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    for mode in (True, False):
        policy.train(mode)
        modes.clear()
        collect_rollout(
            policy, TextGenerationVectorEnv(num_envs=2, **ENV), seed=0, generator=torch.Generator()
        )
        assert modes and not any(modes)  # every forward of the rollout ran in eval mode
        assert policy.training is mode and policy.lm.training is mode


def test_responses_are_the_decoded_sampled_tokens():
    envs = TextGenerationVectorEnv(num_envs=6, **ENV)
    ro = collect_rollout(_policy(), envs, seed=2, generator=torch.Generator().manual_seed(0))
    for i in range(6):
        tokens = ro.actions[i, : int(ro.mask[i].sum())].tolist()
        assert ro.responses[i] == envs.tokenizer.decode(tokens, skip_special_tokens=True)
    assert any(ro.responses)


def test_the_rollout_stops_when_every_response_has_ended():
    policy = _policy()
    envs = TextGenerationVectorEnv(num_envs=4, **ENV)
    eos, forward = envs.tokenizer.eos_token_id, policy._forward

    def eos_after_two(*args, **kw):  # a policy that ends every response at its third token
        logits, values, cache = forward(*args, **kw)
        if calls.append(None) or len(calls) >= 3:
            logits[..., eos] += 1e4
        return logits, values, cache

    calls = []
    policy._forward = eos_after_two
    ro = collect_rollout(policy, envs, seed=0, generator=torch.Generator().manual_seed(0))
    assert ro.mask.sum(1).tolist() == [3.0] * 4
    assert ro.actions.shape[1] == 3 < envs.max_new_tokens  # no columns past the longest response
    assert torch.all(ro.actions[:, -1] == eos)


def test_entropy_is_that_of_the_filtered_distribution_sampled_from():
    policy = _policy(top_k=3)
    envs = TextGenerationVectorEnv(num_envs=4, **ENV)
    ro = collect_rollout(policy, envs, seed=1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ro.entropy).all()
    # The first token's distribution, recomputed: the entropy of the softmax over the 3 kept logits.
    with torch.no_grad():
        full = policy._forward(
            ro.input_ids[:, : ro.prompt_len],
            ro.attention_mask[:, : ro.prompt_len],
            (ro.attention_mask[:, : ro.prompt_len].cumsum(-1) - 1).clamp_min(0),
        )[0][:, -1]
        top = torch.softmax(full.topk(3, dim=-1).values, dim=-1)
        expected = -(top * top.log()).sum(-1)
    torch.testing.assert_close(ro.entropy[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_the_kl_controller_default_horizon_is_ziegler_et_als_10000():
    assert AdaptiveKLController(0.1, 6.0).horizon == 10_000


def _rollout(mask: torch.Tensor, values: torch.Tensor) -> Rollout:
    n, t = mask.shape
    zeros = torch.zeros(n, t)
    return Rollout(
        input_ids=torch.zeros(n, t + 1, dtype=torch.long),
        attention_mask=torch.ones(n, t + 1),
        actions=torch.zeros(n, t, dtype=torch.long),
        logprobs=zeros,
        values=values,
        env_rewards=zeros,
        ref_logprobs=zeros,
        entropy=zeros,
        mask=mask,
        scores=torch.zeros(n),
        truncated_response=torch.zeros(n, dtype=torch.bool),
        prompts=[""] * n,
        responses=[""] * n,
        prompt_len=1,
    )


def test_token_advantages_stop_at_each_responses_last_token():
    # Rows of lengths 4, 2 and 1; the values past each end are garbage the rollout recorded
    # for finished rows and must not leak into the advantages.
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    values = torch.tensor([[0.5, -0.2, 0.3, 0.1], [0.4, 0.7, 9.0, -9.0], [0.2, 5.0, 5.0, 5.0]])
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0], [0.3, -1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    adv, ret = token_advantages(_rollout(mask, values), rewards, gamma=0.9, lam=0.8)
    for i, length in enumerate((4, 2, 1)):
        done = torch.zeros(length, 1)
        done[-1] = 1
        row_adv, row_ret = gae(
            rewards[i, :length, None],
            values[i, :length, None],
            torch.zeros(1),
            done,
            done,
            0.9,
            0.8,
        )
        torch.testing.assert_close(adv[i, :length], row_adv[:, 0])
        torch.testing.assert_close(ret[i, :length], row_ret[:, 0])
        assert torch.all(adv[i, length:] == 0) and torch.all(ret[i, length:] == 0)
    # Row 2 by hand: one token, terminal: A = r - V.
    assert adv[2, 0].item() == pytest.approx(2.0 - 0.2)


def test_rollout_stats_are_means_per_response_and_a_constant_score_has_std_zero():
    from textenv.agents.rollout_text import rollout_stats

    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [1, 1, 0]])
    ro = _rollout(mask, torch.zeros(3, 3))
    ro.logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0], [-1.5, -0.1, -9.0]])
    ro.ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-0.9, 0.0, 0.0], [-1.0, -0.4, 0.0]])
    ro.entropy = torch.tensor([[0.5, 1.0, 1.5], [2.0, 7.0, 7.0], [0.0, 1.0, 7.0]])
    ro.scores = torch.full((3,), 0.1)
    ro.truncated_response = torch.tensor([True, False, False])
    rewards = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    stats = rollout_stats(ro, rewards, torch.zeros(3, 3), has_critic=False)
    k1 = ((ro.logprobs - ro.ref_logprobs) * mask).sum() / 3
    log_r = ro.ref_logprobs - ro.logprobs
    k3 = ((log_r.exp() - 1 - log_r) * mask).sum() / 3  # Schulman's k3 estimator of KL(pi || pi_ref)
    expected = {
        "kl_k1": k1.item(),
        "kl_k3": k3.item(),
        "score_mean": 0.1,
        "response_length": 2.0,
        "missing_eos_frac": 1 / 3,
        "reward_total": 7.0 / 3,
        "rollout_entropy": 6.0 / 6,
        "tokens": 6.0,
    }
    assert stats.keys() == expected.keys() | {"score_std"}
    for key, value in expected.items():
        assert stats[key].item() == pytest.approx(value, rel=1e-6), key
    assert stats["score_std"].item() == 0.0


def test_a_constant_score_over_many_responses_has_std_zero_not_nan():
    """Σs² − n·mean² rounds below 0 for 999 copies of this float32 score; the std clamps it."""
    from textenv.agents.rollout_text import rollout_stats

    ro = _rollout(torch.ones(999, 1), torch.zeros(999, 1))
    ro.scores = torch.full((999,), 0.30742281675338745)
    square = (ro.scores.double() ** 2).sum()
    n = torch.tensor(999.0, dtype=torch.float64)
    assert square - n * (ro.scores.double().sum() / n) ** 2 < 0  # the case the clamp is for
    assert (
        rollout_stats(ro, torch.zeros(999, 1), torch.zeros(999, 1), has_critic=False)[
            "score_std"
        ].item()
        == 0.0
    )


def test_prompt_seeds_are_disjoint_blocks_per_iteration_and_run_seed():
    """Pinned: a change would change which prompts every run, published ones included, trains on."""
    from textenv.agents.text import prompt_seeds

    assert prompt_seeds(0, 1, 8) == 8 and prompt_seeds(3, 2, 16) == (3 * 100_003 + 2) * 16
    blocks = [
        range(prompt_seeds(s, i, 4), prompt_seeds(s, i, 4) + 4)
        for s in range(3)
        for i in (1, 2, 100_002)
    ]
    taken = [x for b in blocks for x in b]
    assert min(taken) >= 0 and len(set(taken)) == len(taken)
