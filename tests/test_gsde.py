"""gSDE (generalized state-dependent exploration): the policy against Stable-Baselines3's, its
noise, and the trainer's resampling schedule."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from textenv.agents.classic import load_checkpoint, preset_config, train
from textenv.agents.policies import MLPActorCritic
from textenv.agents.ppo import PPOConfig

QUIET = dict(device="cpu", progress=False, tensorboard=False)
OBS = gym.spaces.Box(-1, 1, (3,), np.float32)
ACT = gym.spaces.Box(-2, 2, (2,), np.float32)


def _sde_policy(hidden=(8, 8), log_std_init=0.0) -> MLPActorCritic:
    torch.manual_seed(0)
    return MLPActorCritic(OBS, ACT, hidden_sizes=hidden, log_std_init=log_std_init, use_sde=True)


def test_sde_policy_equals_stable_baselines3s_in_values_and_gradients():
    """SB3's ``use_sde=True`` policy (full_std, no expln, features not learnt by the noise) with our
    weights copied in: the same log-probs, entropies, values and gradients for every parameter."""
    from stable_baselines3.common.policies import ActorCriticPolicy

    torch.manual_seed(1)
    sb3 = ActorCriticPolicy(
        OBS,
        ACT,
        lambda _: 1e-3,
        net_arch=dict(pi=[8, 8], vf=[8, 8]),
        use_sde=True,
        log_std_init=-0.3,
    )
    ours = _sde_policy(log_std_init=-0.3)
    pairs = [
        (ours.actor[0], sb3.mlp_extractor.policy_net[0]),
        (ours.actor[2], sb3.mlp_extractor.policy_net[2]),
        (ours.actor[4], sb3.action_net),
        (ours.critic[0], sb3.mlp_extractor.value_net[0]),
        (ours.critic[2], sb3.mlp_extractor.value_net[2]),
        (ours.critic[4], sb3.value_net),
    ]
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        sb3.log_std.add_(torch.linspace(-0.5, 0.5, sb3.log_std.numel()).reshape(sb3.log_std.shape))
        ours.actor_logstd.copy_(sb3.log_std)
    obs, actions = torch.randn(16, 3), 2 * torch.randn(16, 2)

    values, logprob, entropy = sb3.evaluate_actions(obs, actions)
    our_logprob, our_entropy, our_values = ours.evaluate(obs, actions)
    torch.testing.assert_close(our_logprob, logprob, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(our_entropy, entropy, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(our_values, values.squeeze(-1))
    torch.testing.assert_close(ours.deterministic_action(obs), sb3.get_distribution(obs).mode())

    # A loss that reaches every parameter: the gradients must agree too (the mean trains the
    # hidden layers, the variance does not).
    weights = torch.randn(16)
    ((logprob * weights).sum() + entropy.sum() + values.square().sum()).backward()
    ((our_logprob * weights).sum() + our_entropy.sum() + our_values.square().sum()).backward()
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.bias.grad, theirs.bias.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.actor_logstd.grad, sb3.log_std.grad, rtol=1e-5, atol=1e-6)
    assert ours.actor[0].weight.grad.abs().sum() > 0


def test_the_noise_is_the_features_times_each_envs_held_matrix():
    policy = _sde_policy()
    obs = torch.randn(3, 3)
    with torch.no_grad():
        policy.reset_noise(3)
        assert policy.exploration.shape == (3, 8, 2)
        first, logprob, _ = policy.act(obs)
        again, _, _ = policy.act(obs)
        assert torch.equal(first, again)  # held until the next draw
        features = torch.tanh(policy.actor[2](torch.tanh(policy.actor[0](obs))))
        mean = policy.deterministic_action(obs)
        for i in range(3):
            torch.testing.assert_close(first[i], mean[i] + features[i] @ policy.exploration[i])
        # act's log-prob is the density evaluate scores: PPO's first ratio is 1.
        torch.testing.assert_close(policy.evaluate(obs, first)[0], logprob)
        # A [T, envs, obs] batch: row i of every step uses env i's matrix; densities per row.
        steps = torch.stack([obs, obs])
        step_actions, step_logprob, step_values = policy.act(steps)
        assert torch.equal(step_actions, torch.stack([first, first]))
        assert step_logprob.shape == step_values.shape == (2, 3)
        torch.testing.assert_close(step_logprob, torch.stack([logprob, logprob]))
        step_eval, step_entropy, _ = policy.evaluate(steps, step_actions)
        torch.testing.assert_close(step_eval, torch.stack([logprob, logprob]))
        torch.testing.assert_close(step_entropy, policy.evaluate(obs, first)[1].expand(2, 3))
        policy.reset_noise(3)
        assert not torch.equal(policy.act(obs)[0], first)
        policy.act(torch.randn(5, 3))  # another number of envs: drawn anew for them
        assert policy.exploration.shape == (5, 8, 2)


def test_a_fresh_policy_draws_its_noise_on_first_use():
    policy = _sde_policy()
    assert policy.exploration is None
    with torch.no_grad():
        policy.act(torch.randn(4, 3))
    assert policy.exploration.shape == (4, 8, 2)


def test_features_all_zero_leave_the_variance_floor_of_sb3():
    """No hidden layers: the features are the observation; at obs 0 the std is sqrt(1e-6)."""
    policy = MLPActorCritic(OBS, ACT, hidden_sizes=(), use_sde=True)
    obs, action = torch.zeros(2, 3), torch.tensor([[1e-3, 0.0], [0.0, -2e-3]])
    with torch.no_grad():
        logprob, entropy, _ = policy.evaluate(obs, action)
        mean = policy.deterministic_action(obs)
        expected = (
            torch.distributions.Normal(mean, torch.full_like(mean, 1e-3)).log_prob(action).sum(-1)
        )
        torch.testing.assert_close(logprob, expected)
        torch.testing.assert_close(policy.action_std(obs), torch.tensor(1e-3))
        assert torch.isfinite(entropy).all()


def test_action_std_is_the_mean_std_the_update_scores_with():
    policy = _sde_policy(log_std_init=-1.0)
    obs = torch.randn(6, 3)
    with torch.no_grad():
        _, std, _ = policy._sde_mean_std(obs)
        entropy = policy.evaluate(obs, torch.zeros(6, 2))[1]
        assert policy.action_std(obs) == std.mean()
    # The entropy is the Gaussian's with that std: it pins std as the second output.
    torch.testing.assert_close(entropy, (0.5 + 0.5 * np.log(2 * np.pi) + std.log()).sum(-1))
    plain = MLPActorCritic(OBS, ACT, log_std_init=-0.7)
    torch.testing.assert_close(
        plain.action_std(obs), torch.tensor(np.exp(-0.7), dtype=torch.float32)
    )


def test_over_noise_draws_actions_have_the_state_dependent_std():
    policy = _sde_policy(log_std_init=-0.5)
    with torch.no_grad():
        policy.actor_logstd.add_(torch.linspace(-0.4, 0.4, 16).reshape(8, 2))
    obs = torch.randn(1, 3).expand(40_000, 3)
    torch.manual_seed(3)
    with torch.no_grad():
        policy.reset_noise(40_000)
        action, _, _ = policy.act(obs)
        _, std, features = policy._sde_mean_std(obs[:1])
    expected = (features.square() @ policy.actor_logstd.exp().square() + 1e-6).sqrt()[0]
    torch.testing.assert_close(std[0], expected)
    torch.testing.assert_close(action.std(0), expected, rtol=0.02, atol=0)
    torch.testing.assert_close(
        action.mean(0), policy.deterministic_action(obs[:1])[0], rtol=0, atol=0.02
    )


def test_sde_log_std_is_one_per_feature_and_action_and_needs_box_actions():
    policy = MLPActorCritic(OBS, ACT, hidden_sizes=(16, 9, 5), log_std_init=-1.0, use_sde=True)
    assert torch.equal(policy.actor_logstd.detach(), torch.full((5, 2), -1.0))
    assert MLPActorCritic(OBS, ACT, hidden_sizes=(), use_sde=True).actor_logstd.shape == (
        3,
        2,
    )  # features: obs
    with pytest.raises(ValueError, match="use_sde needs continuous"):
        MLPActorCritic(OBS, gym.spaces.Discrete(2), use_sde=True)


def _pendulum(tmp_path, name, **kw):
    return preset_config(
        "Pendulum-v1",
        seed=2,
        total_timesteps=2 * 4 * 8,
        num_envs=4,
        num_steps=8,
        ppo=PPOConfig(update_epochs=1, num_minibatches=2),
        use_sde=True,
        runs_dir=str(tmp_path),
        run_name=name,
        eval_episodes=0,
        **QUIET,
        **kw,
    )


@pytest.mark.parametrize(
    "freq, draws", [(-1, [0]), (1, list(range(8))), (4, [0, 4]), (3, [0, 3, 6]), (8, [0])]
)
def test_the_trainer_draws_noise_at_each_rollouts_start_and_every_sde_sample_freq_steps(
    tmp_path, monkeypatch, freq, draws
):
    seen = []
    original = MLPActorCritic.act

    def act(self, obs):
        seen.append(self.exploration)
        return original(self, obs)

    monkeypatch.setattr(MLPActorCritic, "act", act)
    train(_pendulum(tmp_path, f"f{freq}", sde_sample_freq=freq, save_checkpoint=False))
    assert len(seen) == 16 and all(e.shape == (4, 64, 1) for e in seen)
    new = [t for t in range(16) if t == 0 or seen[t] is not seen[t - 1]]
    assert new == draws + [8 + t for t in draws]


def test_an_sde_run_checkpoints_and_reloads_and_bad_settings_are_refused(tmp_path):
    config = _pendulum(tmp_path, "ckpt", sde_sample_freq=4)
    summary = train(config)
    policy, _, loaded = load_checkpoint(summary["checkpoint"])
    assert loaded == config and policy.use_sde and policy.actor_logstd.shape == (64, 1)
    metrics = [
        line
        for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()
        if "action_std" in line
    ]
    assert len(metrics) == 2
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"sde_sample_freq must be -1 .* or >= 1, got {bad}"):
            preset_config("Pendulum-v1", sde_sample_freq=bad).validate()
    with pytest.raises(ValueError, match="use_sde needs continuous .* CartPole-v1"):
        train(preset_config("CartPole-v1", use_sde=True, runs_dir=str(tmp_path / "none"), **QUIET))
    assert not list((tmp_path / "none").glob("*"))  # refused before a run directory was made


def test_the_logged_action_std_is_the_updated_policys_std_on_the_last_batch(tmp_path, monkeypatch):
    seen = []
    original = MLPActorCritic.act

    def act(self, obs):
        seen.append(obs.clone())
        return original(self, obs)

    monkeypatch.setattr(MLPActorCritic, "act", act)
    summary = train(_pendulum(tmp_path, "std", sde_sample_freq=4))
    policy, _, _ = load_checkpoint(summary["checkpoint"])
    last_batch = torch.stack(seen[-8:]).reshape(-1, 3)
    logged = [
        json.loads(line)
        for line in (tmp_path / "std" / "metrics.jsonl").read_text().splitlines()
        if "action_std" in line
    ]
    with torch.no_grad():
        expected = policy.action_std(last_batch).item()
        on_first_batch = policy.action_std(torch.stack(seen[:8]).reshape(-1, 3)).item()
    assert logged[-1]["action_std"] == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(on_first_batch, rel=1e-6)  # state-dependent: the batch matters
