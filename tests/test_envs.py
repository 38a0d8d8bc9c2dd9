"""The classic trainer's numpy vector envs (`agents/envs.py`): vectorisation choice, the wrapper
stack against CleanRL's own, the clipping limits, and the one-line errors."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers import vector as vw

from textenv.agents.envs import find_wrapper, make_vector_env, resolve_vectorization


class Spiky(gym.Env):
    """Zeros, then one huge observation and reward at step 200: what the clipping limits are for."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2), {}

    def step(self, action):
        self.t += 1
        spike = self.t == 200
        obs = np.array([1e4, -1e4]) if spike else np.zeros(2)
        return obs, 1e4 if spike else 0.0, self.t == 205, False, {}


class SameStepVectorEnv(gym.vector.VectorEnv):
    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, num_envs=1, **kwargs):
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.vector.utils.batch_space(
            self.single_observation_space, num_envs
        )
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)


gym.register("tests/Spiky-v0", entry_point=Spiky)
gym.register("tests/SameStep-v0", entry_point=None, vector_entry_point=SameStepVectorEnv)


def _spike_step(envs):
    envs.reset(seed=0)
    for _ in range(200):
        obs, reward, *_ = envs.step(np.zeros(envs.num_envs, dtype=np.int64))
    return obs, reward


def test_auto_picks_the_envs_own_vector_implementation_else_sync_and_names_a_missing_one():
    assert resolve_vectorization("CartPole-v1", "auto") == "vector_entry_point"
    assert resolve_vectorization("Pendulum-v1", "auto") == "sync"
    assert resolve_vectorization("CartPole-v1", "vector_entry_point") == "vector_entry_point"
    assert resolve_vectorization("Pendulum-v1", "sync") == "sync"
    assert resolve_vectorization("Pendulum-v1", "async") == "async"
    with pytest.raises(
        ValueError,
        match="^Pendulum-v1 has no vector_entry_point; use --vectorization sync or async$",
    ):
        resolve_vectorization("Pendulum-v1", "vector_entry_point")
    with pytest.raises(ValueError, match="^unknown env id 'NoSuchEnv-v0'"):
        resolve_vectorization("NoSuchEnv-v0", "auto")


def test_the_normalised_stack_equals_cleanrls_hand_built_one_step_for_step():
    ours = make_vector_env("Pendulum-v1", 2, normalize_obs=True, normalize_reward=True)
    # CleanRL's ppo_continuous_action.py wrappers, in its order, with its limits (10) and gamma (0.99).
    ref = vw.ClipAction(
        vw.RecordEpisodeStatistics(gym.make_vec("Pendulum-v1", 2, vectorization_mode="sync"))
    )
    ref = vw.NormalizeObservation(ref)
    ref = vw.TransformObservation(ref, lambda obs: np.clip(obs, -10, 10), ref.observation_space)
    ref = vw.ClipReward(vw.NormalizeReward(ref, gamma=0.99), -10, 10)
    np.testing.assert_array_equal(ours.reset(seed=3)[0], ref.reset(seed=3)[0])
    actions = np.random.default_rng(0).uniform(-3, 3, size=(300, 2, 1)).astype(np.float32)
    for action in actions:
        obs, reward, term, trunc, _ = ours.step(action)
        ref_obs, ref_reward, ref_term, ref_trunc, _ = ref.step(action)
        np.testing.assert_array_equal(obs, ref_obs)
        np.testing.assert_array_equal(reward, ref_reward)
        assert term.tolist() == ref_term.tolist() and trunc.tolist() == ref_trunc.tolist()


def test_without_normalisation_flags_observations_and_rewards_are_raw():
    envs = make_vector_env("tests/Spiky-v0", 2)
    assert (
        find_wrapper(envs, vw.NormalizeObservation) is None
        and find_wrapper(envs, vw.NormalizeReward) is None
    )
    obs, reward = _spike_step(envs)
    np.testing.assert_array_equal(obs, [[1e4, -1e4]] * 2)
    np.testing.assert_array_equal(reward, [1e4, 1e4])


def test_normalised_observations_and_rewards_are_clipped_at_10_by_default_and_as_asked():
    obs, reward = _spike_step(
        make_vector_env("tests/Spiky-v0", 2, normalize_obs=True, normalize_reward=True)
    )
    np.testing.assert_array_equal(obs, [[10.0, -10.0]] * 2)
    np.testing.assert_array_equal(reward, [10.0, 10.0])
    obs, reward = _spike_step(
        make_vector_env(
            "tests/Spiky-v0",
            2,
            normalize_obs=True,
            normalize_reward=True,
            clip_obs=2.5,
            clip_reward=3.0,
        )
    )
    np.testing.assert_array_equal(obs, [[2.5, -2.5]] * 2)
    np.testing.assert_array_equal(reward, [3.0, 3.0])
    obs, reward = _spike_step(
        make_vector_env(
            "tests/Spiky-v0",
            2,
            normalize_obs=True,
            normalize_reward=True,
            clip_obs=None,
            clip_reward=None,
        )
    )
    assert (np.abs(obs) > 10).all() and (reward > 10).all()  # None: not clipped


def test_bad_env_counts_and_same_step_autoreset_are_one_line_errors():
    with pytest.raises(ValueError, match="^num_envs must be >= 1, got 0$"):
        make_vector_env("CartPole-v1", 0)
    with pytest.raises(
        ValueError, match="^tests/SameStep-v0: the trainer expects next-step autoreset, got "
    ):
        make_vector_env("tests/SameStep-v0", 2)
