"""The classic trainer end to end: learning, determinism, checkpoints, the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from textenv.agents.classic import evaluate_policy, load_checkpoint, preset_config, train
from textenv.agents.ppo import PPOConfig

QUIET = dict(device="cpu", progress=False, tensorboard=False)


def test_cartpole_preset_learns_to_475(tmp_path):
    summary = train(
        preset_config("CartPole-v1", seed=1, runs_dir=str(tmp_path), eval_episodes=10, **QUIET)
    )
    assert (
        summary["global_step"] == 98_304
    )  # the preset's budget, a whole number of 128 x 16 batches
    assert summary["eval_return_mean"] >= 475.0, summary


def _first_metrics(tmp_path, name):
    config = preset_config(
        "CartPole-v1",
        seed=7,
        total_timesteps=512,
        num_envs=4,
        num_steps=128,
        run_name=name,
        runs_dir=str(tmp_path),
        eval_episodes=0,
        save_checkpoint=False,
        **QUIET,
    )
    train(config)
    return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])


def test_same_seed_gives_same_first_iteration_losses(tmp_path):
    a, b = _first_metrics(tmp_path, "a"), _first_metrics(tmp_path, "b")
    for key in (
        "policy_loss",
        "value_loss",
        "entropy",
        "approx_kl",
        "clipfrac",
        "explained_variance",
    ):
        assert a[key] == b[key], key
    assert np.isfinite(a["policy_loss"]) and a["entropy"] > 0


def test_mujoco_short_run_checkpoint_reloads_to_the_live_policy(tmp_path):
    config = preset_config(
        "HalfCheetah-v5",
        seed=3,
        total_timesteps=4096,
        num_envs=1,
        num_steps=1024,
        ppo=PPOConfig(update_epochs=2, num_minibatches=8),
        runs_dir=str(tmp_path),
        run_name="hc",
        eval_episodes=2,
        **QUIET,
    )
    summary = train(config)  # its evaluation runs the live policy at the end of training
    assert summary["global_step"] == 4096
    policy, norm_state, loaded_config = load_checkpoint(summary["checkpoint"])
    assert loaded_config == config
    assert norm_state["obs_rms.count"] > 4096  # updated on every step (+ reset observations)
    with torch.inference_mode():
        assert policy.deterministic_action(torch.randn(16, policy.obs_dim)).abs().sum() > 0
    # The reloaded policy and statistics replay the live policy's evaluation exactly.
    returns = evaluate_policy(
        policy,
        config.env_id,
        2,
        seed=config.seed + 10_000,
        norm_state=norm_state,
        normalize_obs=True,
    )
    assert (
        np.mean(returns) == summary["eval_return_mean"]
        and np.std(returns) == summary["eval_return_std"]
    )
    assert loaded_config.activation == "relu" and isinstance(
        policy.actor[1], torch.nn.ReLU
    )  # the preset's


def test_ortho_init_reaches_the_trainers_policy(tmp_path, monkeypatch):
    import textenv.agents.classic as classic

    built = []

    class Recording(classic.MLPActorCritic):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(kwargs.get("ortho_init", args[5] if len(args) > 5 else "default"))

    monkeypatch.setattr(classic, "MLPActorCritic", Recording)
    for ortho in (False, True):
        train(
            preset_config(
                "CartPole-v1",
                seed=7,
                total_timesteps=512,
                num_envs=4,
                num_steps=128,
                ortho_init=ortho,
                runs_dir=str(tmp_path),
                run_name=f"o{ortho}",
                eval_episodes=0,
                save_checkpoint=False,
                **QUIET,
            )
        )
    assert built == [False, True]


def test_checkpoint_written_before_the_activation_option_loads_as_tanh(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = preset_config(
        "Pendulum-v1",
        seed=1,
        total_timesteps=256,
        num_envs=2,
        num_steps=128,
        activation="tanh",
        runs_dir=str(tmp_path),
        run_name="p",
        eval_episodes=0,
        **QUIET,
    )
    path = train(config)["checkpoint"]
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    saved = json.loads(metadata["config"])
    assert saved.pop("activation") == "tanh"
    save_file(
        load_file(path),
        str(tmp_path / "old.safetensors"),
        metadata={**metadata, "config": json.dumps(saved)},
    )
    policy, _, loaded = load_checkpoint(tmp_path / "old.safetensors")
    assert loaded == config and isinstance(policy.actor[1], torch.nn.Tanh)


def test_train_script_prints_summary_json_last(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.train",
            "--env-id",
            "Pendulum-v1",
            "--total-timesteps",
            "2048",
            "--num-envs",
            "2",
            "--num-steps",
            "512",
            "--num-minibatches",
            "4",
            "--update-epochs",
            "1",
            "--eval-episodes",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--no-tensorboard",
            "--runs-dir",
            str(tmp_path),
            "--run-name",
            "p",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in (
        "env_id",
        "seed",
        "global_step",
        "wall_time_s",
        "sps",
        "eval_return_mean",
        "eval_return_std",
        "eval_episodes",
    ):
        assert key in summary
    assert summary["global_step"] == 2048 and summary["eval_episodes"] == 2
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["global_step"] == 2048
    lines = (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "approx_kl" in json.loads(lines[0])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--env-id", "NoSuchEnv-v9"], "unknown env id"),
        (["--num-minibatches", "7"], "num_minibatches"),
        (["--gae-lambda", "1.5"], "gae_lambda"),
        (["--learning-rate", "0"], "learning_rate"),
        (["--clip-coef", "0"], "clip_coef"),
    ],
)
def test_train_script_rejects_bad_input_in_one_line(tmp_path, args, message):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.train",
            *args,
            "--runs-dir",
            str(tmp_path),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not any(tmp_path.iterdir())  # caught before a run directory was made


def test_evaluate_script_on_missing_checkpoint_fails_cleanly(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "scripts.evaluate", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_sigterm_stops_with_a_checkpoint_and_resume_continues(tmp_path):
    import signal
    import time

    args = [
        sys.executable,
        "-m",
        "scripts.train",
        "--env-id",
        "CartPole-v1",
        "--num-envs",
        "4",
        "--num-steps",
        "64",
        "--total-timesteps",
        "400000",
        "--device",
        "cpu",
        "--no-progress",
        "--no-tensorboard",
        "--eval-episodes",
        "0",
        "--runs-dir",
        str(tmp_path),
        "--run-name",
        "r",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint written to" in err and "--resume" in err
    before = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line intact
    last_step = before[-1]["global_step"]
    assert last_step < 400_000 and not (tmp_path / "r" / "summary.json").exists()

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.train",
            "--resume",
            str(tmp_path / "r"),
            "--total-timesteps",
            str(last_step + 2 * 256),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    after = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert after[: len(before)] == before  # appended, not overwritten
    assert [r["global_step"] for r in after[len(before) :]] == [last_step + 256, last_step + 512]
    assert after[len(before)]["iteration"] == before[-1]["iteration"] + 1
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["global_step"] == last_step + 512


def test_resume_rejects_a_directory_that_is_not_a_run_or_another_env(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "scripts.train", "--resume", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "not a run directory" in out.stderr
    train(
        preset_config(
            "CartPole-v1",
            total_timesteps=512,
            num_envs=4,
            num_steps=128,
            runs_dir=str(tmp_path),
            run_name="c",
            eval_episodes=0,
            **QUIET,
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.train",
            "--resume",
            str(tmp_path / "c"),
            "--env-id",
            "Acrobot-v1",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "is a run of CartPole-v1" in out.stderr


class _NaNRewardAfter(__import__("gymnasium").Wrapper):
    """CartPole that pays NaN from its 300th step on."""

    def __init__(self, env):
        super().__init__(env)
        self.steps = 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return obs, (float("nan") if self.steps >= 300 else reward), terminated, truncated, info


def _nan_cartpole(**kwargs):
    import gymnasium as gym

    return _NaNRewardAfter(gym.make("CartPole-v1", **kwargs))


def test_env_that_returns_nan_reward_mid_run_stops_with_a_clear_error(tmp_path):
    import gymnasium as gym

    if "test/NaNCartPole-v0" not in gym.registry:
        gym.register("test/NaNCartPole-v0", entry_point=_nan_cartpole)
    config = preset_config(
        "test/NaNCartPole-v0",
        total_timesteps=4096,
        num_envs=2,
        num_steps=128,
        runs_dir=str(tmp_path),
        eval_episodes=0,
        **QUIET,
    )
    with pytest.raises(
        ValueError, match=r"test/NaNCartPole-v0 returned a non-finite reward at step \d+"
    ):
        train(config)


def test_resume_with_more_timesteps_continues_the_lr_decay_without_a_jump(tmp_path):
    kw = dict(
        num_envs=4, num_steps=64, runs_dir=str(tmp_path), run_name="lr", eval_episodes=0, **QUIET
    )
    train(preset_config("CartPole-v1", total_timesteps=4 * 256, **kw))
    config = preset_config("CartPole-v1", total_timesteps=10 * 256, **kw)
    train(config, resume=tmp_path / "lr")
    lrs = [
        json.loads(line)["learning_rate"]
        for line in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()
    ]
    lr0 = config.learning_rate
    assert lrs[:4] == [
        (1.0 - (i - 1.0) / 4) * lr0 for i in range(1, 5)
    ]  # CleanRL's schedule, exactly
    # Iterations 5..10 decay in a straight line from iteration 4's rate to 0 just past iteration 10.
    assert lrs[4:] == pytest.approx([lrs[3] * (1 - (i - 4) / 7) for i in range(5, 11)], rel=1e-12)
    assert all(b < a for a, b in zip(lrs, lrs[1:]))
