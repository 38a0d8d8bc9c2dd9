"""Critic-free estimators (GRPO, RLOO, REINFORCE++) on the PPO core: exact values, group
layout, loss aggregation, no value head, and that each one learns the Toy task."""

import json

import pytest
import torch

from textenv import TextGenerationVectorEnv
from textenv.agents.advantages import (
    critic_free_advantages,
    grpo_advantages,
    needs_critic,
    returns_to_go,
    rloo_advantages,
)
from textenv.agents.cli import train_text as train_text_cli
from textenv.agents.lm import LMActorCritic
from textenv.agents.ppo import PPOConfig, ppo_update
from textenv.agents.rollout_text import collect_rollout
from textenv.agents.text import EstimatorConfig, SamplingConfig, TextTrainConfig, train_text
from textenv.models import load_causal_lm


def test_grpo_by_hand():
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0])
    s1, s2 = 2.0**0.5 / 2, 4.5**0.5  # unbiased std of [1, 2] and of [3, 6]
    expected = torch.tensor(
        [-0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), -1.5 / (s2 + 1e-4), 1.5 / (s2 + 1e-4)]
    )
    torch.testing.assert_close(grpo_advantages(returns, 2), expected)
    # Dr. GRPO: centred, not scaled.
    torch.testing.assert_close(
        grpo_advantages(returns, 2, scale=False), torch.tensor([-0.5, 0.5, -1.5, 1.5])
    )
    # One group of four: the groups are consecutive rows, not strided ones.
    torch.testing.assert_close(grpo_advantages(returns, 4, scale=False), returns - 3.0)


def test_rloo_by_hand():
    returns = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    # Row 0's baseline is the mean of rows 1 and 2: (2 + 6) / 2 = 4, and so on.
    expected = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    torch.testing.assert_close(rloo_advantages(returns, 3), expected)
    # The identity RLOO = k/(k-1) · (R - group mean).
    g = returns.view(2, 3)
    torch.testing.assert_close(
        rloo_advantages(returns, 3), (1.5 * (g - g.mean(1, keepdim=True))).reshape(-1)
    )


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_group_estimators_refuse_groups_of_one_and_ragged_groups(estimator):
    with pytest.raises(ValueError, match="group_size >= 2"):
        estimator(torch.ones(4), 1)
    with pytest.raises(ValueError, match="must divide the batch of 5"):
        estimator(torch.ones(5), 2)


def test_returns_to_go_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]])
    mask = torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    )  # row 1 ended after two tokens: its 9 never counts
    expected = torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0], [4 + 0.5 * 5, 5.0, 0.0]])
    torch.testing.assert_close(returns_to_go(rewards, mask, 0.5), expected)
    # One-token responses: the return is the reward.
    torch.testing.assert_close(
        returns_to_go(torch.tensor([[2.0], [-1.0]]), torch.ones(2, 1), 0.5),
        torch.tensor([[2.0], [-1.0]]),
    )


def test_critic_free_advantages_are_per_response_and_zero_after_the_end():
    # Two groups of two; the KL-shaped rewards sum to each response's return.
    # 7 and 9 sit after their responses' ends: they never count.
    rewards = torch.tensor([[0.0, -0.1, 1.0], [-0.2, 0.5, 7.0], [0.3, 9.0, 0.0], [0.0, 0.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    per_response = torch.tensor([0.9, 0.3, 0.3, 2.0])
    for name, fn in (
        ("grpo", lambda r: grpo_advantages(r, 2)),
        ("rloo", lambda r: rloo_advantages(r, 2)),
    ):
        adv = critic_free_advantages(name, rewards, mask, 2)
        torch.testing.assert_close(adv, fn(per_response).unsqueeze(1) * mask)
    adv = critic_free_advantages("reinforce_pp", rewards, mask, 1)  # γ = 1 by default
    torch.testing.assert_close(
        adv, critic_free_advantages("reinforce_pp", rewards, mask, 1, gamma=1.0)
    )
    assert not torch.allclose(
        adv, critic_free_advantages("reinforce_pp", rewards, mask, 1, gamma=0.5)
    )
    with pytest.raises(ValueError, match="estimator must be one of"):
        critic_free_advantages("gae", rewards, mask, 2)
    tokens = adv[mask > 0]
    torch.testing.assert_close(tokens.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(tokens.std(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert torch.all(adv[mask == 0] == 0)
    # Whitening is affine: the order of the returns to go survives it.
    rtg = returns_to_go(rewards, mask, 1.0)[mask > 0]
    assert torch.equal(torch.argsort(tokens), torch.argsort(rtg))
    assert [needs_critic(e) for e in ("gae", "grpo", "rloo", "reinforce_pp")] == [
        True,
        False,
        False,
        False,
    ]


def test_group_size_resets_share_prompts_within_groups_and_replay_for_a_seed():
    envs = TextGenerationVectorEnv(num_envs=8, task="Arithmetic", model="tiny", max_new_tokens=2)
    _, info = envs.reset(seed=11, options={"group_size": 4})
    prompts = list(info["prompt"])
    assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4
    # Each group draws with its first row's seed: rows 0 and 4 of an ungrouped reset.
    _, plain = envs.reset(seed=11)
    assert [prompts[0], prompts[4]] == [plain["prompt"][0], plain["prompt"][4]]
    _, again = envs.reset(seed=11, options={"group_size": 4})
    assert list(again["prompt"]) == prompts
    with pytest.raises(ValueError, match="divide num_envs=8"):
        envs.reset(seed=0, options={"group_size": 3})


def test_collect_rollout_groups_rows_and_samples_them_independently():
    envs = TextGenerationVectorEnv(num_envs=8, task="Toy", model="tiny", max_new_tokens=6)
    lm, _ = load_causal_lm("tiny:1")
    policy = LMActorCritic(lm, value_head=False)
    ro = collect_rollout(
        policy, envs, seed=2, generator=torch.Generator().manual_seed(0), group_size=4
    )
    assert ro.prompts[:4] == [ro.prompts[0]] * 4
    assert len(set(ro.responses[:4])) > 1  # same prompt, different samples
    assert torch.all(ro.values == 0)


def test_no_value_head_is_built_without_a_critic():
    lm, _ = load_causal_lm("tiny:1")
    n_lm = sum(p.numel() for p in lm.parameters())
    policy = LMActorCritic(lm, value_head=False)
    assert policy.value_head is None
    assert sum(p.numel() for p in policy.parameters()) == n_lm
    assert not any("value_head" in name for name, _ in policy.named_parameters())


def _scalar_policy_update(aggregation: str, grad_accum_steps: int = 1) -> float:
    """One SGD step (lr 1) from θ = 0 on a loss whose new log-prob is θ at every token: at ratio 1
    the step is θ = Σ_tokens w·A, so it reads the weight w each token got."""
    theta = torch.nn.Parameter(torch.zeros(()))
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # a 1-token and a 3-token response
    adv = torch.tensor([[4.0, 100.0, 100.0], [1.0, 2.0, 6.0]])  # 100: after the end, never counts
    batch = {
        "logprobs": torch.zeros(2, 3),
        "values": torch.zeros(2, 3),
        "returns": torch.zeros(2, 3),
        "advantages": adv,
        "mask": mask,
    }

    def evaluate(mb):
        new = theta * torch.ones_like(mb["logprobs"])
        return new, torch.zeros_like(new), mb["values"]

    config = PPOConfig(
        update_epochs=1,
        num_minibatches=1,
        norm_adv=False,
        vf_coef=0.0,
        max_grad_norm=1e9,
        loss_aggregation=aggregation,
        grad_accum_steps=grad_accum_steps,
    )
    ppo_update([theta], torch.optim.SGD([theta], lr=1.0), batch, evaluate, config)
    return float(theta.detach())


def test_token_mean_weighs_tokens_and_sequence_mean_weighs_responses():
    assert _scalar_policy_update("token_mean") == pytest.approx((4 + 1 + 2 + 6) / 4)
    assert _scalar_policy_update("sequence_mean") == pytest.approx((4 + (1 + 2 + 6) / 3) / 2)
    # Micro-batches accumulate to the same step.
    assert _scalar_policy_update("sequence_mean", grad_accum_steps=2) == pytest.approx((4 + 3) / 2)
    with pytest.raises(ValueError, match="loss_aggregation"):
        PPOConfig(num_minibatches=1, loss_aggregation="sum").validate(8)


def test_rloo_with_groups_of_one_is_refused_with_one_line(capsys):
    with pytest.raises(
        ValueError, match="advantage must be one of gae, grpo, rloo, reinforce_pp, got 'ppo'"
    ):
        TextTrainConfig(estimator=EstimatorConfig(advantage="ppo")).validate()
    with pytest.raises(ValueError, match="--advantage rloo needs --group-size >= 2"):
        TextTrainConfig(
            estimator=EstimatorConfig(advantage="rloo"), sampling=SamplingConfig(group_size=1)
        ).validate()
    with pytest.raises(ValueError, match="group_size=3 must be >= 1 and divide num_envs=16"):
        TextTrainConfig(
            estimator=EstimatorConfig(advantage="grpo"), sampling=SamplingConfig(group_size=3)
        ).validate()
    assert (
        train_text_cli.main(
            ["--task", "Toy", "--model", "tiny", "--advantage", "rloo", "--no-progress"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--group-size >= 2" in err[0]


def _toy(tmp_path, name, **kw):
    base = dict(
        task="Toy",
        model="tiny",
        iterations=15,
        num_envs=32,
        learning_rate=3e-3,
        kl_coef=0.0,
        seed=1,
        device="cpu",
        runs_dir=str(tmp_path),
        tensorboard=False,
        progress=False,
        save_checkpoint=True,
        run_name=name,
        eval_samples=0,
    )
    return TextTrainConfig.from_flat(**(base | kw))


@pytest.mark.parametrize("advantage, group_size", [("grpo", 4), ("rloo", 4), ("reinforce_pp", 1)])
def test_each_critic_free_estimator_learns_the_toy_task_without_a_value_head(
    tmp_path, advantage, group_size
):
    summary = train_text(_toy(tmp_path, advantage, advantage=advantage, group_size=group_size))
    assert summary["score_mean_first"] < 0.1
    assert summary["score_mean_last"] > 0.5, summary
    policy_dir = tmp_path / advantage / "policy"
    assert (policy_dir / "model.safetensors").is_file() and not (
        policy_dir / "value_head.safetensors"
    ).exists()
    metrics = [
        json.loads(line)
        for line in (tmp_path / advantage / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(m["value_loss"] == 0.0 for m in metrics)  # values and returns are both 0
    assert "explained_variance" not in metrics[0]


def test_a_critic_free_run_cannot_resume_as_gae(tmp_path):
    train_text(_toy(tmp_path, "g", iterations=1, num_envs=8, advantage="grpo", group_size=2))
    with pytest.raises(
        ValueError, match="trained with --advantage grpo, which cannot continue as --advantage gae"
    ):
        train_text(_toy(tmp_path, "g", iterations=2, num_envs=8), resume=tmp_path / "g")


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp"])
def test_the_kl_in_the_loss_works_with_every_critic_free_estimator(tmp_path, advantage):
    in_loss = _toy(
        tmp_path,
        "in",
        iterations=2,
        num_envs=8,
        kl_coef=0.5,
        kl_in_loss=True,
        advantage=advantage,
        group_size=2,
        save_checkpoint=False,
        learning_rate=1e-2,
        reward="tests.rank_rewards:mean_char_code",  # a group rarely ties: the policy moves
    )
    train_text(in_loss)
    metrics = [
        json.loads(line) for line in (tmp_path / "in" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["extra_loss"] > 0  # β·k3 once the policy has moved from the reference
    in_reward = _toy(
        tmp_path,
        "rw",
        iterations=2,
        num_envs=8,
        kl_coef=0.5,
        advantage=advantage,
        group_size=2,
        save_checkpoint=False,
        learning_rate=1e-2,
        reward="tests.rank_rewards:mean_char_code",  # a group rarely ties: the policy moves
    )
    train_text(in_reward)
    metrics = [
        json.loads(line) for line in (tmp_path / "rw" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["extra_loss"] == 0
    # In the reward, the KL lowers the return below the score: reward_total = score − β·KL per response.
    assert metrics[-1]["reward_total"] == pytest.approx(
        metrics[-1]["score_mean"] - 0.5 * metrics[-1]["kl_k1"], abs=1e-4
    )
