"""GAE against a slow, obviously-correct reference that sums the discounted TD series."""

import numpy as np
import pytest
import torch

from textenv.agents.gae import gae


def reference_gae(rewards, values, last_value, terminated, ended, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l}, summed until the episode containing t ends or the rollout does.

    δ_k = r_k + γ V(s_{k+1}) [not terminated_k] − V(s_k); V(s_{k+1}) is values[k+1] inside the
    rollout (with next-step autoreset that is the final observation after a truncation) and
    last_value after it.
    """
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, weight = 0.0, 1.0
            for k in range(t, T):
                next_v = values[k + 1, n] if k + 1 < T else last_value[n]
                delta = rewards[k, n] + gamma * next_v * (1.0 - terminated[k, n]) - values[k, n]
                total += weight * delta
                if ended[k, n]:
                    break
                weight *= gamma * lam
            adv[t, n] = total
    return adv, adv + values


def _as_t(*arrays):
    return [torch.as_tensor(a, dtype=torch.float64) for a in arrays]


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.0, 0.5)])
def test_gae_matches_reference_with_terminations_and_truncations(gamma, lam):
    rng = np.random.default_rng(0)
    T, N = 37, 5
    rewards = rng.normal(size=(T, N))
    values = rng.normal(size=(T, N))
    last_value = rng.normal(size=N)
    terminated = rng.random((T, N)) < 0.08
    truncated = (rng.random((T, N)) < 0.08) & ~terminated
    ended = terminated | truncated
    assert terminated.any() and truncated.any()
    adv, ret = gae(*_as_t(rewards, values, last_value, terminated, ended), gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, last_value, terminated, ended, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), ref_adv, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ret.numpy(), ref_ret, rtol=1e-10, atol=1e-10)


def test_truncation_bootstraps_from_final_observation_and_termination_does_not():
    # One env, episode ends at t=1; values[2] is V(final observation) under next-step autoreset.
    rewards = np.array([[1.0], [1.0], [0.0], [1.0]])
    values = np.array([[0.5], [0.5], [10.0], [0.5]])
    last = np.array([0.5])
    ended = np.array([[0], [1], [0], [0]], dtype=bool)
    gamma = 0.9
    adv_trunc, _ = gae(*_as_t(rewards, values, last, np.zeros_like(ended), ended), gamma, 1.0)
    adv_term, _ = gae(*_as_t(rewards, values, last, ended, ended), gamma, 1.0)
    assert adv_trunc[1, 0].item() == pytest.approx(1.0 + gamma * 10.0 - 0.5)
    assert adv_term[1, 0].item() == pytest.approx(1.0 - 0.5)
    # Nothing flows back across the episode boundary: row 1 ignores rows 2 and 3 either way.
    rewards[3, 0] = 100.0
    adv_trunc2, _ = gae(*_as_t(rewards, values, last, np.zeros_like(ended), ended), gamma, 1.0)
    assert adv_trunc2[1, 0].item() == adv_trunc[1, 0].item()


def test_gae_rejects_gamma_or_lambda_outside_unit_interval():
    z = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="gamma"):
        gae(z, z, torch.zeros(1), z, z, 1.5, 0.9)
    with pytest.raises(ValueError, match="lam"):
        gae(z, z, torch.zeros(1), z, z, 0.9, -0.1)


def test_gae_by_hand_on_a_single_env_rollout():
    # γ = λ = 0.5, r = 1, V = 0, V(s_T) = 2: δ = (1, 1, 2) and A_t = δ_t + 0.25 A_{t+1}.
    adv, ret = gae(
        torch.ones(3), torch.zeros(3), torch.tensor(2.0), torch.zeros(3), torch.zeros(3), 0.5, 0.5
    )
    assert adv.tolist() == [1.375, 1.5, 2.0]
    assert ret.tolist() == [1.375, 1.5, 2.0]  # returns = advantages + values
    adv, ret = gae(
        torch.ones(3),
        torch.full((3,), 0.5),
        torch.tensor(2.0),
        torch.zeros(3),
        torch.zeros(3),
        0.5,
        0.5,
    )
    # δ = (1 + 0.25 - 0.5, 0.75, 1 + 1 - 0.5) = (0.75, 0.75, 1.5)
    assert adv.tolist() == [0.75 + 0.25 * (0.75 + 0.25 * 1.5), 0.75 + 0.25 * 1.5, 1.5]
    assert ret.tolist() == [a + 0.5 for a in adv.tolist()]


def test_gae_keeps_the_dtype_and_shape_of_the_rewards():
    adv, ret = gae(
        torch.ones(4, 2),
        torch.zeros(4, 2),
        torch.zeros(2),
        torch.zeros(4, 2, dtype=torch.bool),
        torch.zeros(4, 2, dtype=torch.bool),
        0.99,
        0.95,
    )
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == ret.shape == (4, 2)


@pytest.mark.parametrize(
    "gamma,lam", [(-0.1, 0.9), (1.01, 0.9), (0.9, 1.01), (0.9, 1.5), (0.9, -0.1)]
)
def test_gae_rejects_each_rate_outside_the_unit_interval(gamma, lam):
    z = torch.zeros(2, 1)
    with pytest.raises(ValueError, match=r"gamma and lam must lie in \[0, 1\]"):
        gae(z, z, torch.zeros(1), z, z, gamma, lam)


@pytest.mark.parametrize("gamma,lam", [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0)])
def test_gae_accepts_the_ends_of_the_unit_interval(gamma, lam):
    z = torch.zeros(2, 1)
    gae(z, z, torch.zeros(1), z, z, gamma, lam)
