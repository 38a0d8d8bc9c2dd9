"""Classic control as torch vector envs: Gymnasium's dynamics step for step (same initial states
for a seed, observations within float tolerance over long random rollouts, the same terminations,
truncations and autoresets), its vector API, and the on-device RNG."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenv  # noqa: F401  (registers the ids)
from textenv.control import TORCH_CONTROL, TorchCartPole, TorchPendulum

IDS = sorted(TORCH_CONTROL)


def _random_actions(space, n, steps, seed):
    rng = np.random.default_rng(seed)
    if isinstance(space, gym.spaces.Discrete):
        return rng.integers(space.n, size=(steps, n))
    low, high = space.low[0], space.high[0]
    return rng.uniform(low * 1.2, high * 1.2, size=(steps, n, 1)).astype(
        np.float32
    )  # some out of bounds


@pytest.mark.parametrize("name", IDS)
def test_rows_replay_gymnasiums_own_envs_step_for_step(name):
    cls, n, steps = TORCH_CONTROL[name], 4, 1200
    ours = gym.make_vec(f"textenv/{name}", num_envs=n)
    ref = gym.make_vec(cls.gym_id, num_envs=n, vectorization_mode="sync")
    obs, _ = ours.reset(seed=7)
    ref_obs, _ = ref.reset(seed=7)
    np.testing.assert_allclose(obs.numpy(), ref_obs, atol=1e-6)
    ends = 0
    for action in _random_actions(ref.single_action_space, n, steps, 0):
        obs, reward, term, trunc, _ = ours.step(torch.as_tensor(action))
        ref_obs, ref_reward, ref_term, ref_trunc, _ = ref.step(action)
        np.testing.assert_allclose(
            obs.numpy(), ref_obs, atol=1e-5, rtol=0
        )  # bit-exact but MountainCarContinuous
        np.testing.assert_allclose(reward.numpy(), ref_reward, atol=1e-5)
        assert term.tolist() == ref_term.tolist() and trunc.tolist() == ref_trunc.tolist()
        ends += int(ref_term.sum() + ref_trunc.sum())
    assert ends >= n  # every row went through at least one autoreset on average


def test_spaces_and_time_limits_are_gymnasiums():
    for name, cls in TORCH_CONTROL.items():
        ref = gym.make(cls.gym_id)
        env = cls(num_envs=2)
        assert env.single_observation_space == ref.observation_space, name
        assert env.single_action_space == ref.action_space, name
        assert env.max_episode_steps == ref.spec.max_episode_steps, name


def test_the_torch_rng_draws_on_the_device_from_the_same_distribution():
    env = TorchCartPole(num_envs=4096, rng="torch")
    obs, _ = env.reset(seed=0)
    assert obs.abs().max() <= 0.05 and obs.std() == pytest.approx(0.1 / 12**0.5, rel=0.05)
    again, _ = TorchCartPole(num_envs=4096, rng="torch").reset(seed=0)
    assert torch.equal(obs, again)  # reproducible for a seed
    for _ in range(60):  # autoresets draw on the device too
        obs, reward, term, trunc, _ = env.step(torch.ones(4096, dtype=torch.long))
    assert (reward == 0).any() and obs.isfinite().all()


def test_numpy_arrays_and_bad_actions():
    env = TorchCartPole(num_envs=2, arrays="numpy")
    obs, _ = env.reset(seed=0)
    assert isinstance(obs, np.ndarray) and obs.dtype == np.float32
    with pytest.raises(ValueError, match=r"actions must be in Discrete\(2\)"):
        env.step(np.array([0, 2]))
    with pytest.raises(ValueError, match="expected 2 actions"):
        env.step(np.array([0, 1, 1]))
    with pytest.raises(RuntimeError, match="before reset"):
        TorchCartPole(num_envs=1).step(np.array([0]))


def test_the_classic_trainer_on_the_torch_env_equals_it_on_gymnasiums(tmp_path):
    """Same seed, same dynamics and initial states: the same training run, parameter for parameter."""
    from safetensors.torch import load_file

    from textenv.agents.classic import preset_config, train

    summaries, params = [], []
    for env_id, vectorization in (("CartPole-v1", "sync"), ("textenv/TorchCartPole-v1", "auto")):
        config = preset_config(
            env_id,
            total_timesteps=2048,
            vectorization=vectorization,
            runs_dir=str(tmp_path),
            device="cpu",
            progress=False,
            tensorboard=False,
            eval_episodes=0,
        )
        summaries.append(train(config))
        params.append(load_file(summaries[-1]["checkpoint"]))
    assert summaries[0]["train_return_last100"] == summaries[1]["train_return_last100"]
    policy_keys = [k for k in params[0] if k.startswith("policy.")]
    assert policy_keys and all(torch.equal(params[0][k], params[1][k]) for k in policy_keys)
    from textenv.agents.classic import evaluate_policy, load_checkpoint

    policy, _, config = load_checkpoint(summaries[1]["checkpoint"])  # a vector-only id reloads too
    assert config.env_id == "textenv/TorchCartPole-v1"
    assert all(torch.equal(v, params[1][f"policy.{k}"]) for k, v in policy.state_dict().items())
    assert len(evaluate_policy(policy, config.env_id, 2, seed=0)) == 2


def test_row_seeds_are_seed_plus_row_or_the_list_given():
    from textenv.arrays import row_seeds

    assert row_seeds(5, 3) == [5, 6, 7] and row_seeds([9, 1], 2) == [9, 1]
    with pytest.raises(ValueError, match="expected 3 seeds, got 2"):
        TorchCartPole(num_envs=3).reset(seed=[1, 2])
    a, _ = TorchCartPole(num_envs=2).reset(seed=[4, 9])
    b, _ = TorchCartPole(num_envs=2).reset(seed=4)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


@pytest.mark.parametrize("env_id", ["textenv/TorchPendulum-v1", "textenv/TorchCartPole-v1"])
def test_the_torch_wrappers_equal_gymnasiums_on_the_same_stream(env_id):
    """Episode statistics, action clipping, observation and reward normalisation (with clipping):
    the on-device wrapper stack against Gymnasium's numpy one, over several autoresets."""
    from textenv.agents.envs import load_normalization_state, make_vector_env, normalization_state

    kw = dict(normalize_obs=True, normalize_reward=True, clip_obs=1.5, clip_reward=2.0, gamma=0.9)
    host = make_vector_env(env_id, 3, **kw)
    dev = make_vector_env(env_id, 3, device="cpu", **kw)
    h_obs, _ = host.reset(seed=7)
    d_obs, _ = dev.reset(seed=7)
    assert isinstance(d_obs, torch.Tensor)
    np.testing.assert_allclose(d_obs.numpy(), h_obs, rtol=1e-5, atol=1e-6)
    episodes, clipped = 0, False
    for a in _random_actions(host.unwrapped.single_action_space, 3, 450, seed=3):
        h = host.step(a)
        d = dev.step(torch.as_tensor(a))
        for x, y in zip(d[:4], h[:4]):
            np.testing.assert_allclose(x.numpy(), y, rtol=1e-5, atol=1e-5)
        clipped |= bool((np.abs(h[0]) == 1.5).any() or (np.abs(h[1]) == 2.0).any())
        if "_episode" in h[4]:
            done = h[4]["_episode"]
            episodes += int(done.sum())
            assert np.array_equal(d[4]["_episode"].numpy(), done)
            np.testing.assert_allclose(
                d[4]["episode"]["r"].numpy()[done], h[4]["episode"]["r"][done], rtol=1e-6
            )
            assert np.array_equal(d[4]["episode"]["l"].numpy()[done], h[4]["episode"]["l"][done])
        else:
            assert not d[4]["_episode"].any()
    assert episodes >= 3 and clipped  # the stream crossed autoresets and hit both clips
    h_state, d_state = normalization_state(host), normalization_state(dev)
    assert sorted(h_state) == sorted(d_state)
    for k in h_state:
        np.testing.assert_allclose(d_state[k], h_state[k], rtol=1e-5)
    fresh = make_vector_env(env_id, 3, device="cpu", **kw)
    load_normalization_state(fresh, h_state, freeze=True)
    assert normalization_state(fresh).keys() == h_state.keys()
    for k, v in normalization_state(fresh).items():
        np.testing.assert_allclose(
            v, np.asarray(h_state[k], dtype=np.float64).reshape(v.shape), rtol=1e-6
        )
    before = normalization_state(fresh)["obs_rms.mean"].copy()
    fresh.reset(seed=0)
    assert np.array_equal(normalization_state(fresh)["obs_rms.mean"], before)  # frozen


class _NaNAfter(TorchCartPole):
    def dynamics(self, state, action):
        state, reward, terminated = super().dynamics(state, action)
        self.calls = getattr(self, "calls", 0) + 1
        return state, reward * (math.nan if self.calls > 40 else 1.0), terminated


def test_a_non_finite_reward_on_the_device_path_stops_at_the_named_step(tmp_path):
    from textenv.agents.classic import preset_config, train

    if "test/NaNTorchCartPole-v1" not in gym.registry:
        gym.register("test/NaNTorchCartPole-v1", vector_entry_point=_NaNAfter)
    config = preset_config(
        "test/NaNTorchCartPole-v1",
        total_timesteps=4096,
        num_envs=2,
        num_steps=32,
        runs_dir=str(tmp_path),
        eval_episodes=0,
        progress=False,
        tensorboard=False,
    )
    # the 41st step of the envs is the 9th of the second rollout: step 64 + 9 * 2
    with pytest.raises(
        ValueError, match=r"test/NaNTorchCartPole-v1 returned a non-finite reward at step 82$"
    ):
        train(config)


def test_bad_construction_and_options_are_one_line_errors_and_the_base_is_abstract():
    from gymnasium.vector import AutoresetMode

    from textenv.control import TorchControlVectorEnv

    assert TorchCartPole().num_envs == 1
    assert (
        TorchCartPole.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    )  # what Gymnasium's wrappers read
    for kwargs, message in (
        ({"num_envs": 0}, "num_envs must be >= 1, got 0"),
        ({"rng": "cuda"}, "rng must be 'numpy' or 'torch', got 'cuda'"),
        ({"arrays": "jax"}, "arrays must be 'torch' or 'numpy', got 'jax'"),
    ):
        with pytest.raises(ValueError, match=message):
            TorchCartPole(**kwargs)
    with pytest.raises(
        ValueError, match=r"TorchCartPole.reset takes no options, got \['reset_mask'\]"
    ):
        TorchCartPole(num_envs=2).reset(seed=0, options={"reset_mask": np.array([True, False])})
    base = TorchControlVectorEnv.__new__(TorchControlVectorEnv)
    for call in (
        lambda: base.initial_numpy(np.random.default_rng()),
        lambda: base.initial_torch(1),
        lambda: base.dynamics(torch.zeros(1, 4), torch.zeros(1)),
    ):
        with pytest.raises(NotImplementedError):
            call()


def test_unseeded_resets_draw_fresh_states_with_either_rng():
    for rng in ("numpy", "torch"):
        a, _ = TorchCartPole(num_envs=4, rng=rng).reset()
        b, _ = TorchCartPole(num_envs=4, rng=rng).reset()
        assert a.abs().max() <= 0.05 and not torch.equal(a, b), rng


def test_actions_of_any_batch_shape_and_cpu_tensors_are_checked():
    env = TorchCartPole(num_envs=2)
    env.reset(seed=0)
    column = env.step(np.array([[0], [1]]))[0]  # [N, 1] is read as N actions
    env.reset(seed=0)
    assert torch.equal(env.step(np.array([0, 1]))[0], column)
    with pytest.raises(ValueError, match=r"actions must be in Discrete\(2\)"):
        env.step(torch.tensor([0, 5]))  # a CPU tensor is host input: checked
    pend = TorchPendulum(num_envs=2)
    pend.reset(seed=0)
    flat = pend.step(np.array([0.5, -1.0], dtype=np.float32))[0]
    pend.reset(seed=0)
    assert torch.equal(pend.step(np.array([[0.5], [-1.0]], dtype=np.float32))[0], flat)


def test_the_torch_rng_redraws_the_rows_that_ended():
    env = TorchCartPole(num_envs=64, rng="torch")
    env.reset(seed=0)
    for _ in range(60):
        obs, _, term, trunc, _ = env.step(
            torch.ones(64, dtype=torch.long)
        )  # always push right: falls fast
        if term.any():
            ended = term | trunc
            obs, *_ = env.step(torch.ones(64, dtype=torch.long))
            assert obs[ended].abs().max() <= 0.05  # the reset step returns a fresh initial state
            return
    pytest.fail("no episode ended")


THETA = 12 * 2 * math.pi / 360  # CartPole's angle limit
# States a random rollout rarely or never reaches: exact limits (a zero velocity keeps a coordinate
# where it is, so the limit is compared as given), speed clamps, walls and goals.
EDGE_STATES = {
    "CartPole-v1": [
        ([-2.4, 0, 0, 0], 0),
        ([2.4, 0, 0, 0], 1),
        ([0, 0, -THETA, 0], 0),
        ([0, 0, THETA, 0], 1),
        ([-2.41, 0, 0, 0], 0),
        ([0, 0, THETA + 1e-3, 0], 1),
    ],
    "MountainCar-v0": [
        ([-0.5, 0.0695], 2),
        ([-0.5, -0.0695], 0),
        ([-1.19, -0.05], 0),
        ([0.45, 0.06], 2),
        ([0.1, 0.01], 2),
        ([0.55, -0.01], 0),
        ([0.43, 0.07], 2),
    ],  # 0.43 + 0.07 == 0.5
    "MountainCarContinuous-v0": [
        ([0.4, 0.06], [1.0]),
        ([0.1, 0.01], [0.5]),
        ([0.55, -0.03], [-2.0]),
        ([-0.5, 0.0695], [1.5]),
    ],
    "Pendulum-v1": [([3.0, 7.9], [2.0]), ([-3.0, -7.9], [-2.0]), ([0.5, 1.0], [0.7])],
    "Acrobot-v1": [
        ([math.pi, 0, 0, 0], 1),
        ([0, 0, 5 * math.pi, 10 * math.pi], 2),
        ([0, 0, -5 * math.pi, -10 * math.pi], 0),
        ([0.3, -0.2, 0.5, -0.5], 2),
    ],
}


@pytest.mark.parametrize("name", IDS)
def test_edge_states_step_as_gymnasiums_own_env(name):
    cls = TORCH_CONTROL[name]
    cases = EDGE_STATES[cls.gym_id]
    env = cls(num_envs=len(cases))
    env.reset(seed=0)
    env.state = torch.tensor([state for state, _ in cases], dtype=torch.float64)
    obs, reward, term, _, _ = env.step(np.array([action for _, action in cases]))
    for i, (state, action) in enumerate(cases):
        ref = gym.make(cls.gym_id).unwrapped
        ref.reset(seed=0)
        ref.state = np.array(state, dtype=np.float64)
        ref_obs, ref_reward, ref_term, _, _ = ref.step(
            np.array(action, dtype=np.float32) if isinstance(action, list) else action
        )
        np.testing.assert_allclose(obs[i].numpy(), ref_obs, atol=1e-6, err_msg=f"{name} {state}")
        assert reward[i].item() == pytest.approx(ref_reward, abs=1e-5), (name, state)
        assert bool(term[i]) == ref_term, (name, state)
    if cls.gym_id != "Pendulum-v1":  # it never terminates
        assert term.any() and not term.all()  # the cases sit on both sides of each limit


@pytest.mark.parametrize("name", IDS)
def test_the_torch_rng_draws_initial_states_as_gymnasium_does(name):
    cls, n = TORCH_CONTROL[name], 2048
    ours, _ = cls(num_envs=n, rng="torch").reset(seed=0)
    ref, _ = gym.make_vec(cls.gym_id, num_envs=n, vectorization_mode="sync").reset(seed=0)
    ours, ref = ours.numpy().astype(np.float64), ref.astype(np.float64)
    # Same support and moments per observation column (2048 draws: a mean's std is under 0.7% of the range).
    scale = np.maximum(ref.max(0) - ref.min(0), 1e-12)
    for stat, rel in ((np.min, 0.01), (np.max, 0.01), (np.mean, 0.03), (np.std, 0.03)):
        gap = np.abs(stat(ours, 0) - stat(ref, 0))
        assert (gap <= 1e-6 + rel * scale).all(), (stat.__name__, stat(ours, 0), stat(ref, 0))
