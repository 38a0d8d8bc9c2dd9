"""The clipped surrogate, the clipped value loss and the first update of the PPO core."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from textenv.agents.policies import MLPActorCritic
from textenv.agents.ppo import PPOConfig, clipped_surrogate, ppo_update, value_loss

EPS = 0.2


def _grad_of_ratio(ratio: float, adv: float) -> float:
    r = torch.tensor(ratio, requires_grad=True)
    clipped_surrogate(r, torch.tensor(adv), EPS).backward()
    return r.grad.item()


@pytest.mark.parametrize("adv", [1.5, -1.5])
@pytest.mark.parametrize("ratio", [0.85, 1.0, 1.1])
def test_surrogate_gradient_inside_band_is_minus_advantage(ratio, adv):
    assert _grad_of_ratio(ratio, adv) == pytest.approx(-adv)


def test_surrogate_gradient_is_zero_outside_band_on_the_side_min_selects():
    # A > 0: the objective is capped above 1+ε (no gradient); below 1-ε the unclipped term rules.
    assert _grad_of_ratio(1.5, 2.0) == 0.0
    assert _grad_of_ratio(0.5, 2.0) == pytest.approx(-2.0)
    # A < 0: the objective is capped below 1-ε; above 1+ε the unclipped term rules.
    assert _grad_of_ratio(0.5, -2.0) == 0.0
    assert _grad_of_ratio(1.5, -2.0) == pytest.approx(2.0)


def _value_grad(new: float, old: float, ret: float, clip: float | None) -> float:
    v = torch.tensor(new, requires_grad=True)
    value_loss(v, torch.tensor(old), torch.tensor(ret), clip).backward()
    return v.grad.item()


def test_value_clipping_gradient():
    # Inside the band both terms agree: gradient (V - R).
    assert _value_grad(0.1, 0.0, 1.0, EPS) == pytest.approx(0.1 - 1.0)
    # Outside the band, when the clipped term is the larger one, the gradient is zero.
    assert _value_grad(0.5, 0.0, 1.0, EPS) == 0.0
    # Outside the band, when the unclipped term is larger, it keeps its gradient.
    assert _value_grad(-0.5, 0.0, 1.0, EPS) == pytest.approx(-0.5 - 1.0)
    # Without clipping: plain ½(V-R)².
    assert _value_grad(0.5, 0.0, 1.0, None) == pytest.approx(0.5 - 1.0)


@pytest.mark.parametrize("continuous", [False, True])
def test_first_minibatch_ratio_is_one_and_approx_kl_zero(continuous):
    torch.manual_seed(0)
    obs_space = gym.spaces.Box(-1, 1, (4,), np.float32)
    act_space = gym.spaces.Box(-1, 1, (2,), np.float32) if continuous else gym.spaces.Discrete(3)
    policy = MLPActorCritic(obs_space, act_space)
    obs = torch.randn(64, 4)
    with torch.inference_mode():
        actions, logprobs, values = policy.act(obs)
    batch = {
        "obs": obs,
        "actions": actions.clone(),
        "logprobs": logprobs.clone(),
        "values": values.clone(),
        "advantages": torch.randn(64),
        "returns": torch.randn(64),
    }
    seen = []

    def evaluate(mb):
        out = policy.evaluate(mb["obs"], mb["actions"])
        seen.append((out[0].detach(), mb["logprobs"]))
        return out

    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    ppo_update(
        policy.parameters(),
        optimizer,
        batch,
        evaluate,
        PPOConfig(update_epochs=2, num_minibatches=4),
    )
    new, old = seen[0]
    ratio = (new - old).exp()
    approx_kl = ((ratio - 1) - (new - old)).mean()
    if continuous:  # sampled via noise, re-evaluated via (a-μ)/σ: equal up to rounding
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
        assert abs(approx_kl.item()) < 1e-10
    else:
        assert torch.equal(ratio, torch.ones_like(ratio))
        assert approx_kl.item() == 0.0
    # ... and later minibatches see a policy that has moved.
    assert not torch.allclose(seen[-1][0], seen[-1][1])


def test_masked_entries_do_not_affect_the_update():
    """Rows with mask 0 (the reset step of next-step autoreset) get no gradient."""
    torch.manual_seed(0)
    policy = MLPActorCritic(gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(2))
    obs = torch.randn(8, 3)
    with torch.inference_mode():
        actions, logprobs, values = policy.act(obs)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.float32)
    base = {
        "obs": obs,
        "actions": actions.clone(),
        "logprobs": logprobs.clone(),
        "values": values.clone(),
        "advantages": torch.randn(8),
        "returns": torch.randn(8),
        "mask": mask,
    }
    poisoned = {k: v.clone() for k, v in base.items()}
    poisoned["advantages"][mask == 0] = 1e6
    poisoned["returns"][mask == 0] = -1e6
    results = []
    for batch in (base, poisoned):
        p = MLPActorCritic(gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(2))
        p.load_state_dict(policy.state_dict())
        opt = torch.optim.SGD(p.parameters(), lr=0.1)
        ppo_update(
            p.parameters(),
            opt,
            batch,
            lambda mb, p=p: p.evaluate(mb["obs"], mb["actions"]),
            PPOConfig(update_epochs=1, num_minibatches=1),
        )
        results.append(torch.cat([q.detach().flatten() for q in p.parameters()]))
    torch.testing.assert_close(results[0], results[1])


def test_gradient_accumulation_equals_one_big_minibatch():
    torch.manual_seed(0)
    space = gym.spaces.Box(-1, 1, (3,), np.float32)
    policy = MLPActorCritic(space, gym.spaces.Discrete(4))
    obs = torch.randn(32, 3)
    with torch.inference_mode():
        actions, logprobs, values = policy.act(obs)
    batch = {
        "obs": obs,
        "actions": actions.clone(),
        "logprobs": logprobs.clone(),
        "values": values.clone(),
        "advantages": torch.randn(32),
        "returns": torch.randn(32),
    }
    params = []
    for accum in (1, 4):
        p = MLPActorCritic(space, gym.spaces.Discrete(4))
        p.load_state_dict(policy.state_dict())
        opt = torch.optim.SGD(p.parameters(), lr=0.1)
        ppo_update(
            p.parameters(),
            opt,
            batch,
            lambda mb, p=p: p.evaluate(mb["obs"], mb["actions"]),
            PPOConfig(update_epochs=1, num_minibatches=2, grad_accum_steps=accum),
            torch.Generator().manual_seed(3),
        )
        params.append(torch.cat([q.detach().flatten() for q in p.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_minibatches=3), "num_minibatches"),
        (dict(clip_coef=0.0), "clip_coef"),
        (dict(update_epochs=0), "update_epochs"),
        (dict(grad_accum_steps=5), "grad_accum_steps"),
    ],
)
def test_config_rejects_settings_that_cannot_work(kw, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kw).validate(batch_size=64)


def test_non_finite_update_is_skipped_and_counted():
    torch.manual_seed(0)
    space = gym.spaces.Box(-1, 1, (3,), np.float32)
    policy = MLPActorCritic(space, gym.spaces.Discrete(2))
    obs = torch.randn(16, 3)
    with torch.inference_mode():
        actions, logprobs, values = policy.act(obs)
    advantages = torch.randn(16)
    advantages[3] = float("nan")
    batch = {
        "obs": obs,
        "actions": actions.clone(),
        "logprobs": logprobs.clone(),
        "values": values.clone(),
        "advantages": advantages,
        "returns": torch.randn(16),
    }
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    stats = ppo_update(
        policy.parameters(),
        opt,
        batch,
        lambda mb: policy.evaluate(mb["obs"], mb["actions"]),
        PPOConfig(update_epochs=1, num_minibatches=1, norm_adv=False),
    )
    assert stats["skipped_updates"].item() == 1 and stats["updates"].item() == 0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    # Masked out, the same NaN is harmless: the update goes through.
    batch["mask"] = torch.ones(16)
    batch["mask"][3] = 0
    stats = ppo_update(
        policy.parameters(),
        opt,
        batch,
        lambda mb: policy.evaluate(mb["obs"], mb["actions"]),
        PPOConfig(update_epochs=1, num_minibatches=1),
    )
    assert stats["skipped_updates"].item() == 0 and torch.isfinite(stats["policy_loss"])
    assert not all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_non_finite_guard_stops_after_patience():
    from textenv.agents.ppo import NonFiniteGuard, NonFiniteTraining

    guard = NonFiniteGuard(patience=2)
    guard.check({"updates": 0.0}, "x")
    guard.check({"updates": 3.0}, "x")  # a good iteration resets the streak
    guard.check({"updates": 0.0}, "x")
    with pytest.raises(NonFiniteTraining, match="2 iterations in a row"):
        guard.check({"updates": 0.0}, "x")
