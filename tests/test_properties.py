"""Property tests (hypothesis): GAE on random episodes, the text env under random actions, the reward protocol."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_gae import reference_gae
from textenv import RewardError, TextGenerationEnv, score_batch
from textenv.agents.gae import gae


@st.composite
def rollouts(draw):
    T = draw(st.integers(1, 20))
    N = draw(st.integers(1, 4))
    floats = st.floats(-10, 10, allow_nan=False, width=32)
    arr = lambda shape: np.array(
        draw(st.lists(floats, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
        dtype=np.float64,
    ).reshape(shape)
    flags = lambda: np.array(draw(st.lists(st.booleans(), min_size=T * N, max_size=T * N))).reshape(
        T, N
    )
    terminated = flags()
    truncated = flags() & ~terminated
    return arr((T, N)), arr((T, N)), arr((N,)), terminated, terminated | truncated


@settings(max_examples=200, deadline=None)
@given(rollouts(), st.floats(0, 1), st.floats(0, 1))
def test_gae_matches_reference_on_random_episodes(data, gamma, lam):
    rewards, values, last, terminated, ended = data
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)
    adv, ret = gae(t(rewards), t(values), t(last), t(terminated), t(ended), gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, last, terminated, ended, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), ref_adv, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ret.numpy(), ref_ret, rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def text_env():
    return TextGenerationEnv(
        task="Toy", model="tiny", max_new_tokens=5, max_prompt_tokens=6, kl_coef=0.2
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**31 - 1), actions=st.lists(st.integers(-3, 40), min_size=1, max_size=8)
)
def test_text_env_under_random_actions(text_env, seed, actions):
    """Any valid token at any step is accepted and the observation stays in its space; an
    out-of-range token is the documented ValueError; stepping past the end the documented RuntimeError."""
    obs, _ = text_env.reset(seed=seed)
    assert text_env.observation_space.contains(obs)
    n = text_env.action_space.n
    ended = False
    for a in actions:
        if ended:
            with pytest.raises(RuntimeError, match="after the episode ended"):
                text_env.step(0)
            return
        if not 0 <= a < n:
            with pytest.raises(ValueError, match="outside Discrete"):
                text_env.step(a)
            continue
        obs, reward, terminated, truncated, info = text_env.step(a)
        assert text_env.observation_space.contains(obs)
        assert (
            math.isfinite(reward)
            and math.isfinite(info["ref_logprob"])
            and info["ref_logprob"] <= 0
        )
        assert not truncated
        ended = terminated
        if terminated:
            assert 0.0 <= info["score"] <= 1.0 and isinstance(info["response_text"], str)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)), max_size=6
    ),
    st.integers(0, 6),
)
def test_reward_protocol_accepts_exactly_one_finite_float_per_item(scores, n):
    responses = [f"r{i}" for i in range(n)]
    fn = lambda prompts, rs: scores
    ok = len(scores) == n and all(math.isfinite(float(s)) for s in scores)
    if ok:
        assert score_batch(fn, ["p"] * n, responses) == [float(s) for s in scores]
    else:
        with pytest.raises(RewardError):
            score_batch(fn, ["p"] * n, responses)
