"""The torch twins of Gymnasium's vector wrappers (``textenv.agents.envs``), edge by edge: the
running statistics against Gymnasium's, resets mid-episode, the spaces they expose, clipping
for an env that does not clip itself, a zero-reward stream, and loading saved statistics."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers.utils import RunningMeanStd

import textenv  # noqa: F401  (registers the ids)
from textenv.agents.envs import (
    TorchNormalizeReward,
    TorchRecordEpisodeStatistics,
    TorchRunningMeanStd,
    is_device_env,
    load_normalization_state,
    make_vector_env,
    normalization_state,
)
from textenv.control import TorchCartPole, TorchPendulum


def test_is_device_env_names_an_unknown_id_in_one_line():
    assert is_device_env("textenv/TorchCartPole-v1") and not is_device_env("CartPole-v1")
    with pytest.raises(ValueError, match="unknown env id 'NoSuchEnv-v0'"):
        is_device_env("NoSuchEnv-v0")


def test_running_mean_std_matches_gymnasiums_in_float64_and_ignores_masked_rows():
    rng = np.random.default_rng(0)
    ours, theirs = TorchRunningMeanStd((3,), torch.device("cpu")), RunningMeanStd(shape=(3,))
    for _ in range(5):
        x = rng.normal(3.0, 2.0, size=(7, 3)).astype(np.float32)  # float32 in, float64 statistics
        ours.update(torch.from_numpy(x))
        theirs.update(x.astype(np.float64))
    np.testing.assert_allclose(ours.mean.numpy(), theirs.mean, rtol=1e-12)
    np.testing.assert_allclose(ours.var.numpy(), theirs.var, rtol=1e-12)
    assert float(ours.count) == pytest.approx(theirs.count, rel=1e-12)
    x = rng.normal(size=(6, 3))
    mask = torch.tensor([True, False, True, True, False, False])
    ours.update(torch.from_numpy(x), mask)
    theirs.update(x[mask.numpy()])
    np.testing.assert_allclose(ours.var.numpy(), theirs.var, rtol=1e-12)
    before = (ours.mean.clone(), ours.var.clone(), ours.count.clone())
    ours.update(torch.from_numpy(x), torch.zeros(6, dtype=torch.bool))  # no row: nothing changes
    assert all(torch.equal(a, b) for a, b in zip(before, (ours.mean, ours.var, ours.count)))


def test_episode_statistics_restart_on_reset_and_are_zero_where_no_episode_ended():
    env = TorchRecordEpisodeStatistics(TorchCartPole(num_envs=2, max_episode_steps=5))
    env.reset(seed=0)
    for _ in range(5):  # both rows end at the time limit on the 5th step
        _, _, _, trunc, info = env.step(torch.zeros(2, dtype=torch.long))
    assert trunc.all() and info["episode"]["l"].tolist() == [5, 5]
    env.reset(
        seed=1
    )  # a reset right after the end: the next step is a first step, not a reset step
    for _ in range(5):
        _, _, _, _, info = env.step(torch.zeros(2, dtype=torch.long))
    assert info["episode"]["l"].tolist() == [5, 5] and info["episode"]["r"].tolist() == [5.0, 5.0]
    env.step(torch.zeros(2, dtype=torch.long))  # the reset step
    env.step(torch.zeros(2, dtype=torch.long))
    env.reset(seed=2)  # mid-episode: the statistics start again
    for t in range(5):
        _, _, _, _, info = env.step(torch.ones(2, dtype=torch.long))
        if t < 4:
            assert not info["_episode"].any()
            assert info["episode"]["r"].tolist() == [0.0, 0.0] and info["episode"][
                "l"
            ].tolist() == [0, 0]
    assert info["_episode"].all() and info["episode"]["l"].tolist() == [5, 5]
    assert info["episode"]["r"].tolist() == [5.0, 5.0]


def test_the_wrappers_expose_gymnasiums_spaces():
    kw = dict(normalize_obs=True, normalize_reward=True)
    host = make_vector_env("textenv/TorchPendulum-v1", 3, **kw)
    dev = make_vector_env("textenv/TorchPendulum-v1", 3, device="cpu", **kw)
    for name in (
        "action_space",
        "single_action_space",
        "observation_space",
        "single_observation_space",
    ):
        assert getattr(dev, name) == getattr(host, name), name
    assert np.isinf(dev.single_action_space.low).all() and (dev.single_action_space.low < 0).all()


class _Unclipped(TorchPendulum):
    """A pendulum that applies whatever torque it is given and remembers it."""

    def dynamics(self, state, action):
        self.seen = action.clone()
        return super().dynamics(state, action)


def test_actions_are_clipped_before_an_env_that_does_not_clip_them():
    if "test/UnclippedPendulum-v1" not in gym.registry:
        gym.register("test/UnclippedPendulum-v1", vector_entry_point=_Unclipped)
    envs = make_vector_env("test/UnclippedPendulum-v1", 3, device="cpu")
    envs.reset(seed=0)
    envs.step(torch.tensor([[-7.0], [0.5], [9.0]]))
    assert envs.unwrapped.seen.flatten().tolist() == [-2.0, 0.5, 2.0]


def test_reward_normalisation_defaults_and_a_zero_reward_stream():
    class Zero(TorchCartPole):
        def dynamics(self, state, action):
            state, reward, terminated = super().dynamics(state, action)
            return state, reward * 0.0, terminated

    ours = TorchNormalizeReward(TorchRecordEpisodeStatistics(Zero(num_envs=1024)))
    assert (ours.gamma, ours.epsilon) == (0.99, 1e-8)  # Gymnasium's NormalizeReward defaults
    ours.reset(seed=0)
    for _ in range(40):
        _, reward, *_ = ours.step(torch.zeros(1024, dtype=torch.long))
    assert float(ours.return_rms.var) < 1e-8  # var → 0 (its prior of 1 weighs 1e-4 of a sample)
    assert torch.equal(reward, torch.zeros(1024))  # 0 / sqrt(var + ε): ε keeps it finite


def test_episode_returns_keep_accumulating_after_a_reset_of_the_reward_normaliser():
    envs = TorchNormalizeReward(TorchCartPole(num_envs=1, max_episode_steps=3), gamma=0.5)
    envs.reset(seed=0)
    for _ in range(3):
        envs.step(torch.zeros(1, dtype=torch.long))  # ends on the 3rd step
    envs.reset(seed=0)
    envs.step(torch.zeros(1, dtype=torch.long))  # a first step: it accumulates from zero
    assert envs.accumulated_reward.tolist() == [1.0]


def test_loading_statistics_keeps_them_updating_unless_frozen_and_accepts_plain_values():
    for device in (None, "cpu"):
        envs = make_vector_env(
            "textenv/TorchPendulum-v1", 2, normalize_obs=True, normalize_reward=True, device=device
        )
        state = {
            "obs_rms.mean": [0.1, 0.2, 0.3],
            "obs_rms.var": [1.0, 2.0, 3.0],
            "obs_rms.count": [5.0],
            "return_rms.mean": [0.0],
            "return_rms.var": [4.0],
            "return_rms.count": 7.0,
        }
        load_normalization_state(envs, state)
        loaded = normalization_state(envs)
        np.testing.assert_allclose(loaded["obs_rms.var"], [1.0, 2.0, 3.0])
        assert float(np.asarray(loaded["obs_rms.count"])) == 5.0
        assert float(np.asarray(loaded["return_rms.var"])) == 4.0
        envs.reset(seed=0)  # not frozen: the reset observation updates the statistics
        assert float(np.asarray(normalization_state(envs)["obs_rms.count"])) == 7.0
        load_normalization_state(envs, state, freeze=True)
        envs.reset(seed=0)
        envs.step(np.zeros((2, 1), dtype=np.float32) if device is None else torch.zeros(2, 1))
        after = normalization_state(envs)
        assert float(np.asarray(after["obs_rms.count"])) == 5.0  # frozen
        assert (
            float(np.asarray(after["return_rms.count"])) > 7.0
        )  # the reward statistics are not frozen
