"""The classic trainer's config, run-directory and checkpoint helpers, in process (the CLI tests
run them in subprocesses)."""

import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest

from textenv.agents.classic import (
    TrainConfig,
    _config_from_dict,
    load_checkpoint,
    load_run_config,
    preset_config,
    single_spaces,
    train,
)
from textenv.agents.ppo import PPOConfig

QUIET = dict(device="cpu", progress=False, tensorboard=False)


@pytest.mark.parametrize("field", ["total_timesteps", "num_envs", "num_steps", "torch_threads"])
def test_validate_refuses_counts_below_one_and_takes_one(field):
    with pytest.raises(ValueError, match=f"^{field} must be >= 1, got 0$"):
        TrainConfig(**{field: 0}).validate()
    TrainConfig(**{field: 1}, ppo=PPOConfig(num_minibatches=1)).validate()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(env_id="NoSuchEnv-v0"), "unknown env id 'NoSuchEnv-v0'"),
        (dict(seed=-1), "seed must be >= 0, got -1"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(gamma=1.5), "gamma"),
        (dict(eval_episodes=-1), "eval_episodes must be >= 0, got -1"),
        (dict(num_envs=2, num_steps=3, ppo=PPOConfig(num_minibatches=4)), "num_minibatches"),
    ],
)
def test_validate_names_the_setting_that_cannot_work(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw).validate()


def test_validate_takes_the_edge_values():
    TrainConfig(seed=0, eval_episodes=0).validate()


def test_load_run_config_needs_a_config_and_a_checkpoint(tmp_path):
    config = preset_config(
        "CartPole-v1",
        seed=3,
        total_timesteps=512,
        num_envs=4,
        num_steps=128,
        runs_dir=str(tmp_path),
        run_name="r",
        eval_episodes=0,
        **QUIET,
    )
    train(config)
    assert load_run_config(tmp_path / "r") == config
    (tmp_path / "r" / "checkpoint.safetensors").rename(tmp_path / "moved")
    for bad in (tmp_path / "r", tmp_path):  # a config without a checkpoint; neither
        with pytest.raises(ValueError, match="is not a run directory with a checkpoint"):
            load_run_config(bad)


def test_config_from_dict_leaves_its_input_alone():
    raw = json.loads(json.dumps(dataclasses.asdict(preset_config("Acrobot-v1"))))
    before = json.dumps(raw)
    assert _config_from_dict(raw) == preset_config("Acrobot-v1")
    assert json.dumps(raw) == before


class _DictObsEnv(gym.Env):
    observation_space = gym.spaces.Dict(
        {"a": gym.spaces.Box(-1, 1, (2,)), "b": gym.spaces.Discrete(3)}
    )
    action_space = gym.spaces.Discrete(2)
    closed = 0

    def close(self):
        type(self).closed += 1


def test_single_spaces_flattens_other_observation_spaces_and_closes_the_env():
    if "test/DictObs-v0" not in gym.registry:
        gym.register("test/DictObs-v0", entry_point=_DictObsEnv)
    closed = _DictObsEnv.closed
    obs_space, action_space = single_spaces("test/DictObs-v0")
    assert obs_space == gym.spaces.flatten_space(
        _DictObsEnv.observation_space
    ) and obs_space.shape == (5,)
    assert action_space == gym.spaces.Discrete(2) and _DictObsEnv.closed == closed + 1
    assert single_spaces("CartPole-v1")[0] == gym.make("CartPole-v1").observation_space


def test_load_checkpoint_refuses_a_missing_file_and_a_foreign_one(tmp_path):
    import torch
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="checkpoint .*nothing.safetensors' does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    save_file(
        {"x": torch.zeros(1)},
        str(tmp_path / "other.safetensors"),
        metadata={"format": "something-else"},
    )
    with pytest.raises(ValueError, match="is not a checkpoint of the classic PPO trainer"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_load_checkpoint_gives_normalisation_statistics_their_shapes(tmp_path):
    config = preset_config(
        "Pendulum-v1",
        seed=1,
        total_timesteps=256,
        num_envs=2,
        num_steps=128,
        normalize_obs=True,
        ppo=PPOConfig(num_minibatches=2, update_epochs=1),
        runs_dir=str(tmp_path),
        run_name="n",
        eval_episodes=0,
        **QUIET,
    )
    path = train(config)["checkpoint"]
    _, norm, _ = load_checkpoint(path)
    assert norm["obs_rms.count"].shape == () and norm["obs_rms.mean"].shape == norm[
        "obs_rms.var"
    ].shape == (3,)
    assert np.all(norm["obs_rms.var"] > 0) and norm["obs_rms.count"] > 256


class _GridObsEnv(gym.Env):
    """A [2, 3] Box observation (an image-like grid) and a reward for action 1."""

    observation_space = gym.spaces.Box(-1, 1, (2, 3), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        self.t += 1
        return self.observation_space.sample(), float(action), False, self.t >= 8, {}


def test_a_multidimensional_box_observation_is_flattened_for_training_and_evaluation(tmp_path):
    if "test/GridObs-v0" not in gym.registry:
        gym.register("test/GridObs-v0", entry_point=_GridObsEnv)
    assert single_spaces("test/GridObs-v0")[0].shape == (6,)
    config = preset_config(
        "test/GridObs-v0",
        seed=1,
        total_timesteps=256,
        num_envs=4,
        num_steps=32,
        normalize_obs=True,
        ppo=PPOConfig(num_minibatches=2, update_epochs=1),
        runs_dir=str(tmp_path),
        run_name="g",
        eval_episodes=2,
        **QUIET,
    )
    summary = train(config)
    assert summary["eval_episodes"] == 2 and np.isfinite(summary["eval_return_mean"])
    policy, norm, _ = load_checkpoint(summary["checkpoint"])
    assert policy.obs_dim == 6 and norm["obs_rms.mean"].shape == (6,)


# CleanRL's published defaults, as its scripts' Args set them (ppo.py; ppo_continuous_action.py).
CLEANRL_PPO = dict(
    total_timesteps=500_000,
    num_envs=4,
    num_steps=128,
    learning_rate=2.5e-4,
    anneal_lr=True,
    gamma=0.99,
    gae_lambda=0.95,
    normalize_obs=False,
    normalize_reward=False,
    ppo=PPOConfig(
        update_epochs=4,
        num_minibatches=4,
        clip_coef=0.2,
        clip_vloss=True,
        ent_coef=0.01,
        vf_coef=0.5,
        max_grad_norm=0.5,
        norm_adv=True,
        target_kl=None,
    ),
)
CLEANRL_CONTINUOUS = dict(
    total_timesteps=1_000_000,
    num_envs=1,
    num_steps=2048,
    learning_rate=3e-4,
    anneal_lr=True,
    gamma=0.99,
    gae_lambda=0.95,
    normalize_obs=True,
    normalize_reward=True,
    clip_obs=10.0,
    clip_reward=10.0,
    ppo=PPOConfig(
        update_epochs=10,
        num_minibatches=32,
        clip_coef=0.2,
        clip_vloss=True,
        ent_coef=0.0,
        vf_coef=0.5,
        max_grad_norm=0.5,
        norm_adv=True,
        target_kl=None,
    ),
)


def _settings(config, keys):
    return {k: getattr(config, k) for k in keys}


@pytest.mark.parametrize(
    "env_id, preset, expected, note",
    [
        ("CartPole-v1", "cleanrl", CLEANRL_PPO, None),
        ("Pendulum-v1", "cleanrl", CLEANRL_CONTINUOUS, None),
        ("HalfCheetah-v5", "cleanrl", CLEANRL_CONTINUOUS, None),
        (
            "MountainCar-v0",
            "tuned",
            CLEANRL_PPO,
            "the discrete-action defaults (CleanRL's ppo.py, 500k steps)",
        ),
        (
            "MountainCarContinuous-v0",
            "tuned",
            CLEANRL_CONTINUOUS,
            "the continuous-control defaults (CleanRL's ppo_continuous_action.py, 1M steps)",
        ),
        (
            "Swimmer-v5",
            "tuned",
            CLEANRL_CONTINUOUS,
            "the MuJoCo defaults (CleanRL's ppo_continuous_action.py, 1M steps)",
        ),
    ],
)
def test_cleanrl_settings_and_the_defaults_of_ids_without_a_preset_are_cleanrls(
    env_id, preset, expected, note
):
    from textenv.agents.classic import defaults_note

    config = preset_config(env_id, preset=preset)
    assert _settings(config, expected) == expected
    if note is not None:
        assert (
            defaults_note(env_id)
            == f"note: {env_id} has no preset; it uses {note}; flags override them"
        )


def test_unknown_presets_and_ids_are_one_line_errors_and_each_config_has_its_own_ppo_settings():
    with pytest.raises(ValueError, match="^unknown preset 'fastest'; known: tuned, cleanrl$"):
        preset_config("CartPole-v1", preset="fastest")
    with pytest.raises(ValueError, match="^unknown env id 'NoSuchEnv-v0'"):
        preset_config("NoSuchEnv-v0", preset="cleanrl")
    config = preset_config("CartPole-v1")
    config.ppo.update_epochs = 99  # a caller editing its config leaves the preset alone
    assert preset_config("CartPole-v1").ppo.update_epochs == 6


def test_train_validates_the_config_before_making_anything(tmp_path):
    with pytest.raises(ValueError, match="^eval_episodes must be >= 0, got -1$"):
        train(
            preset_config("CartPole-v1", eval_episodes=-1, runs_dir=str(tmp_path / "runs"), **QUIET)
        )
    assert not (tmp_path / "runs").exists()
