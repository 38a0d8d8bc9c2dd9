"""The classic trainer's rollout bookkeeping against a slow textbook reference, and resuming
restores everything a checkpoint holds."""

import dataclasses
import json
import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers.utils import RunningMeanStd
from safetensors import safe_open

import textenv.agents.classic as classic
from textenv.agents.classic import preset_config, train
from textenv.agents.policies import MLPActorCritic
from textenv.agents.ppo import PPOConfig

QUIET = dict(device="cpu", progress=False, tensorboard=False)


class Scripted(gym.Env):
    """Observation (t, episode parity); the step from t pays t + 1. Even episodes terminate at t = 3;
    odd ones run into the time limit (5 steps) and are truncated."""

    observation_space = gym.spaces.Box(0.0, 10.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.episode = -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        return np.array([self.t, self.episode % 2], dtype=np.float32)

    def step(self, action):
        self.t += 1
        return self._obs(), float(self.t), self.episode % 2 == 0 and self.t == 3, False, {}


if "test/Scripted-v0" not in gym.registry:
    gym.register("test/Scripted-v0", entry_point=Scripted, max_episode_steps=5)


def _textbook(obs, values, last_obs, last_value, gamma, lam):
    """Per env, per step, with ifs: which rows are transitions, and their GAE advantages."""
    T, N = values.shape
    valid = np.zeros((T, N))
    adv = np.zeros((T, N))
    for n in range(N):
        following = 0.0  # A_{t+1}
        for t in reversed(range(T)):
            k, odd = obs[t, n]
            if (not odd and k == 3) or (
                odd and k == 5
            ):  # a final observation: this row is the reset step
                following = 0.0
                continue
            valid[t, n] = 1
            terminated = not odd and k + 1 == 3
            truncated = odd and k + 1 == 5
            next_value = values[t + 1, n] if t + 1 < T else last_value[n]
            delta = (k + 1) + (0.0 if terminated else gamma * next_value) - values[t, n]
            following = delta + (0.0 if terminated or truncated else gamma * lam * following)
            adv[t, n] = following
    return valid, adv


def test_the_trainers_batch_is_the_textbook_rollout_with_next_step_autoresets(
    tmp_path, monkeypatch
):
    batches, value_calls = [], []
    original_update, original_value = classic.ppo_update, MLPActorCritic.value

    def update(params, optimizer, batch, *args, **kwargs):
        batches.append({k: v.detach().clone() for k, v in batch.items()})
        return original_update(params, optimizer, batch, *args, **kwargs)

    def value(self, obs):
        out = original_value(self, obs)
        value_calls.append((obs.clone(), out.clone()))
        return out

    monkeypatch.setattr(classic, "ppo_update", update)
    monkeypatch.setattr(MLPActorCritic, "value", value)
    T, N, gamma, lam = 16, 2, 0.9, 0.8
    train(
        preset_config(
            "test/Scripted-v0",
            num_envs=N,
            num_steps=T,
            total_timesteps=2 * T * N,
            gamma=gamma,
            gae_lambda=lam,
            ppo=PPOConfig(update_epochs=1, num_minibatches=1),
            runs_dir=str(tmp_path),
            eval_episodes=0,
            save_checkpoint=False,
            **QUIET,
        )
    )
    assert len(batches) == 2 and len(value_calls) == 2  # one bootstrap value per iteration
    for batch, (last_obs, last_value) in zip(batches, value_calls):
        obs = batch["obs"].reshape(T, N, 2).numpy()
        values = batch["values"].reshape(T, N).double().numpy()
        valid, adv = _textbook(
            obs, values, last_obs.numpy(), last_value.double().numpy(), gamma, lam
        )
        np.testing.assert_array_equal(batch["mask"].reshape(T, N).numpy(), valid)
        rows = valid == 1
        np.testing.assert_allclose(
            batch["advantages"].reshape(T, N).numpy()[rows], adv[rows], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            batch["returns"].reshape(T, N).numpy()[rows], (adv + values)[rows], rtol=1e-5, atol=1e-5
        )
        assert (obs[:, :, 1] == 1).any() and (
            obs[:, :, 0] == 5
        ).any()  # truncations happened, and terminations:
        assert ((obs[:, :, 1] == 0) & (obs[:, :, 0] == 3)).any()


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize(
    "env_id, extra",
    [("CartPole-v1", {}), ("Pendulum-v1", dict(normalize_obs=True, normalize_reward=True))],
)
def test_a_resume_with_nothing_left_to_do_saves_back_exactly_what_it_restored(
    tmp_path, env_id, extra
):
    kw = dict(
        num_envs=2,
        num_steps=64,
        total_timesteps=3 * 128,
        runs_dir=str(tmp_path),
        run_name="r",
        eval_episodes=0,
        use_sde=False,
        **QUIET,
        **extra,
    )
    config = preset_config(env_id, **kw)
    train(config)
    path = tmp_path / "r" / "checkpoint.safetensors"
    before, meta_before = _tensors(path)
    summary = train(config, resume=tmp_path / "r")  # restores, runs no iteration, saves again
    after, meta_after = _tensors(path)
    assert summary["global_step"] == 3 * 128
    assert sorted(before) == sorted(after) and any(k.startswith("optim.") for k in before)
    if extra:
        # The resumed envs' reset observations (env i seeded seed + iterations done + i) update the
        # restored observation statistics, as the first reset of a fresh run does.
        rms = RunningMeanStd(shape=(3,), dtype=np.float64)
        rms.mean, rms.var = before["norm.obs_rms.mean"].numpy(), before["norm.obs_rms.var"].numpy()
        rms.count = before["norm.obs_rms.count"].numpy()
        rms.update(
            gym.make_vec(env_id, 2, vectorization_mode="sync").reset(seed=config.seed + 3)[0]
        )
        for stat in ("mean", "var", "count"):
            np.testing.assert_allclose(
                after.pop(f"norm.obs_rms.{stat}").numpy(), getattr(rms, stat), rtol=1e-12
            )
            before.pop(f"norm.obs_rms.{stat}")
        assert "norm.return_rms.var" in before
    for key in before:
        assert torch.equal(before[key], after[key]), key
    for key in ("global_step", "iteration", "recent_returns", "lr_schedule", "world_size"):
        assert json.loads(meta_before[key]) == json.loads(meta_after[key]), key


def _scripted_config(tmp_path, name, iterations, **kw):
    kw = dict(total_timesteps=iterations * 32, eval_episodes=0) | kw
    return preset_config(
        "test/Scripted-v0",
        num_envs=2,
        num_steps=16,
        ppo=PPOConfig(update_epochs=1, num_minibatches=1),
        runs_dir=str(tmp_path),
        run_name=name,
        **QUIET,
        **kw,
    )


def _scripted_episodes(iterations):
    """(iteration, return, length) of every episode, in the order the envs end them: each of the 2
    identical envs plays 3 steps (return 6), a reset step, 5 steps (return 15), a reset step, ..."""
    episodes = []
    for step in range(iterations * 16):
        for _env in range(2):
            if step % 10 in (2, 8):
                length = 3 if step % 10 == 2 else 5
                episodes.append((step // 16 + 1, float(sum(range(1, length + 1))), length))
    return episodes


def test_episode_statistics_and_the_last_100_returns_are_the_envs_episodes(tmp_path):
    iterations = 40  # 128 episodes: more than the 100 the summary averages
    summary = train(_scripted_config(tmp_path, "eps", iterations, save_checkpoint=False))
    episodes = _scripted_episodes(iterations)
    metrics = [
        json.loads(line) for line in (tmp_path / "eps" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(metrics) == iterations
    for m in metrics:
        mine = [(r, n) for i, r, n in episodes if i == m["iteration"]]
        assert m["episodes"] == len(mine) and m["episodic_return"] == pytest.approx(
            np.mean([r for r, _ in mine])
        )
        assert m["episodic_length"] == pytest.approx(np.mean([n for _, n in mine]))
    returns = [r for _, r, _ in episodes]
    assert len(returns) > 101 and np.mean(returns[-100:]) != np.mean(
        returns[-101:]
    )  # the window's size shows
    assert summary["train_return_last100"] == pytest.approx(np.mean(returns[-100:]))
    walls = [m["wall_time_s"] for m in metrics]
    assert 0 < walls[0] and walls == sorted(walls) and walls[-1] <= summary["wall_time_s"]


def test_periodic_checkpoints_follow_checkpoint_every(tmp_path, monkeypatch):
    saved = []
    original = classic.save_checkpoint

    def save(path, *args, **kwargs):
        saved.append((path.name, kwargs["iteration"]))
        walls.append(kwargs["wall_time_s"])
        return original(path, *args, **kwargs)

    walls = []
    monkeypatch.setattr(classic, "save_checkpoint", save)
    summary = train(_scripted_config(tmp_path, "every", 5, checkpoint_every=2))
    assert saved == [
        ("checkpoint.safetensors", 2),
        ("checkpoint.safetensors", 4),
        ("checkpoint.safetensors", 5),
    ]
    assert 0 < walls[0] < walls[1] <= walls[2] == summary["wall_time_s"]
    saved.clear()
    train(_scripted_config(tmp_path, "never", 5, checkpoint_every=0))
    assert saved == [("checkpoint.safetensors", 5)]  # only at the end


def test_wall_time_counts_from_the_start_and_continues_across_a_resume(tmp_path):
    import time

    start = time.perf_counter()
    first = train(_scripted_config(tmp_path, "w", 2))
    assert 0 < first["wall_time_s"] <= time.perf_counter() - start
    resumed = train(_scripted_config(tmp_path, "w", 10), resume=tmp_path / "w")
    assert (
        resumed["wall_time_s"] > first["wall_time_s"] and "world_size" not in resumed
    )  # one process
    # Steps per second count this session's steps over this session's time, read from the same
    # clock readings as the wall time: their product is the session's steps.
    last = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[-1])
    for sps, wall in ((resumed["sps"], resumed["wall_time_s"]), (last["sps"], last["wall_time_s"])):
        assert sps * (wall - first["wall_time_s"]) == pytest.approx(8 * 32, rel=1e-9)


def test_a_checkpoint_without_a_saved_schedule_resumes_on_its_first_horizon(tmp_path):
    from safetensors.torch import save_file

    train(_scripted_config(tmp_path, "whole", 6))
    train(_scripted_config(tmp_path, "old", 3))
    path = tmp_path / "old" / "checkpoint.safetensors"
    tensors, meta = _tensors(path)
    del meta["lr_schedule"]  # as versions before the schedule was saved wrote it
    save_file(tensors, str(path), metadata=meta)
    train(_scripted_config(tmp_path, "old", 6), resume=tmp_path / "old")
    lrs = {
        name: [
            json.loads(line)["learning_rate"]
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("whole", "old")
    }
    # The first run's horizon was 3 iterations: its schedule reached 1/3 of the rate at iteration 3,
    # and iterations 4-6 decay from there to 0 just past the new horizon of 6.
    rate = lrs["whole"][0]
    assert lrs["old"][:3] == [rate * (1 - i / 3) for i in range(3)]
    assert lrs["old"][3:] == pytest.approx(
        [lrs["old"][2] * (1 - i / 4) for i in range(1, 4)], rel=1e-12
    )
    # A budget that is not a whole number of batches: the horizon was its whole iterations (80 // 32 = 2).
    # One below a batch: one iteration, the horizon 1.
    for name, total, expected in (
        ("odd", 80, [rate, rate / 2, rate / 2 * 2 / 3, rate / 2 / 3]),
        ("tiny", 20, [rate, rate * 2 / 3, rate / 3]),
    ):
        train(_scripted_config(tmp_path, name, 1, total_timesteps=total))
        path = tmp_path / name / "checkpoint.safetensors"
        tensors, meta = _tensors(path)
        del meta["lr_schedule"]
        save_file(tensors, str(path), metadata=meta)
        train(_scripted_config(tmp_path, name, len(expected)), resume=tmp_path / name)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        got = [json.loads(line)["learning_rate"] for line in lines]
        assert got == pytest.approx(expected, rel=1e-12), name


def test_resuming_a_run_of_more_processes_says_what_continues(tmp_path, capsys):
    from safetensors.torch import save_file

    train(_scripted_config(tmp_path, "ws", 2))
    path = tmp_path / "ws" / "checkpoint.safetensors"
    tensors, meta = _tensors(path)
    save_file(tensors, str(path), metadata=meta | {"world_size": "2"})
    capsys.readouterr()
    train(_scripted_config(tmp_path, "ws", 3), resume=tmp_path / "ws")
    assert (
        "note: this run was trained by 2 process(es) and resumes with 1" in capsys.readouterr().err
    )


def test_bad_runs_directories_and_resumes_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="^--runs-dir '.*file' is not a directory$"):
        train(_scripted_config(tmp_path / "file", "x", 1))
    train(_scripted_config(tmp_path, "cart", 1))
    with pytest.raises(ValueError, match=r"is a run of test/Scripted-v0, not CartPole-v1$"):
        train(
            preset_config("CartPole-v1", runs_dir=str(tmp_path), **QUIET), resume=tmp_path / "cart"
        )


def test_a_budget_below_one_batch_runs_one_iteration_and_torch_threads_is_applied(tmp_path):
    before = torch.get_num_threads()
    try:
        summary = train(
            _scripted_config(
                tmp_path, "small", 1, total_timesteps=20, torch_threads=2, save_checkpoint=False
            )
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert summary["global_step"] == 32
    summary = train(_scripted_config(tmp_path, "one", 1, total_timesteps=32, save_checkpoint=False))
    assert summary["global_step"] == 32


def test_a_host_env_is_not_stepped_past_its_first_non_finite_reward(tmp_path, monkeypatch):
    original = Scripted.step

    def step(self, action):
        if getattr(self, "poisoned", False):
            raise AssertionError("stepped after a NaN reward")
        obs, reward, terminated, truncated, info = original(self, action)
        if self.episode == 1 and self.t == 2:
            self.poisoned, reward = True, float("nan")
        return obs, reward, terminated, truncated, info

    monkeypatch.setattr(Scripted, "step", step)
    # Episode 1's second step is env step 6 (3 steps, a reset step, 2 steps): global step 6 * 2 envs.
    with pytest.raises(
        ValueError, match=r"^test/Scripted-v0 returned a non-finite reward at step 12$"
    ):
        train(_scripted_config(tmp_path, "nan", 2, save_checkpoint=False))


def test_save_checkpoint_without_the_resume_keywords_writes_a_fresh_runs_counters(tmp_path):
    config = preset_config("CartPole-v1")
    policy = MLPActorCritic(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))
    classic.save_checkpoint(tmp_path / "a.safetensors", policy, {}, config, 10)
    _, meta = _tensors(tmp_path / "a.safetensors")
    counters = (meta["iteration"], meta["wall_time_s"], meta["world_size"], meta["recent_returns"])
    assert counters == ("0", "0.0", "1", "[]")
    classic.save_checkpoint(
        tmp_path / "b.safetensors", policy, {}, config, 10, recent_returns=[1.0, 2.5]
    )
    assert _tensors(tmp_path / "b.safetensors")[1]["recent_returns"] == "[1.0, 2.5]"


def test_the_default_config_is_the_cartpole_preset_and_the_other_defaults_are_the_documented_ones():
    assert classic.TrainConfig() == preset_config("CartPole-v1")
    defaults = classic.TrainConfig()
    # Settings no preset changes: an API (and the CLI's flags' defaults); a change here goes in the README.
    assert dict(
        seed=defaults.seed,
        clip_obs=defaults.clip_obs,
        clip_reward=defaults.clip_reward,
        hidden_sizes=defaults.hidden_sizes,
        activation=defaults.activation,
        ortho_init=defaults.ortho_init,
        log_std_init=defaults.log_std_init,
        use_sde=defaults.use_sde,
        sde_sample_freq=defaults.sde_sample_freq,
        torch_threads=defaults.torch_threads,
        tensorboard=defaults.tensorboard,
        progress=defaults.progress,
        eval_episodes=defaults.eval_episodes,
        save_checkpoint=defaults.save_checkpoint,
        checkpoint_every=defaults.checkpoint_every,
    ) == dict(
        seed=1,
        clip_obs=10.0,
        clip_reward=10.0,
        hidden_sizes=(64, 64),
        activation="tanh",
        ortho_init=True,
        log_std_init=0.0,
        use_sde=False,
        sde_sample_freq=-1,
        torch_threads=1,
        tensorboard=True,
        progress=True,
        eval_episodes=10,
        save_checkpoint=True,
        checkpoint_every=50,
    )


def test_evaluation_normalises_with_the_runs_frozen_statistics_and_without_them_reads_raw(
    monkeypatch,
):
    policy = MLPActorCritic(gym.spaces.Box(-8, 8, (3,)), gym.spaces.Box(-2, 2, (1,)))
    seen, actions = [], []
    original = MLPActorCritic.deterministic_action

    def act(self, obs):
        seen.append(obs.clone())
        actions.append(original(self, obs))
        return actions[-1]

    monkeypatch.setattr(MLPActorCritic, "deterministic_action", act)
    mean, var = np.array([0.5, -0.5, 1.0]), np.array([4.0, 0.25, 9.0])
    norm = {"obs_rms.mean": mean, "obs_rms.var": var, "obs_rms.count": np.array(1000.0)}
    classic.evaluate_policy(policy, "Pendulum-v1", 2, seed=5, norm_state=norm, normalize_obs=True)
    ref = gym.make_vec("Pendulum-v1", 2, vectorization_mode="sync")
    raw, _ = ref.reset(seed=5)
    for obs, action in zip(seen, actions):  # replay the same actions on Gymnasium's env
        np.testing.assert_allclose(
            obs.numpy(), np.clip((raw - mean) / np.sqrt(var + 1e-8), -10, 10), rtol=1e-5
        )
        raw, *_ = ref.step(np.clip(action.numpy(), -2, 2))
    assert len(seen) == 200  # both episodes, to the time limit
    seen.clear()
    classic.evaluate_policy(policy, "Pendulum-v1", 2, seed=5)  # no statistics: raw observations
    np.testing.assert_allclose(
        seen[0].numpy(),
        gym.make_vec("Pendulum-v1", 2, vectorization_mode="sync").reset(seed=5)[0],
        rtol=1e-6,
    )


def test_sigterm_in_process_stops_after_the_iteration_with_a_checkpoint_and_a_resume_continues(
    tmp_path, monkeypatch
):
    import os
    import signal

    from textenv.agents.checkpoint import TrainingInterrupted

    original, steps = Scripted.step, []

    def step(self, action):
        steps.append(1)
        if len(steps) == 60:  # in iteration 3 or 4 (the envs' reset steps do not call step)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, action)

    monkeypatch.setattr(Scripted, "step", step)
    with pytest.raises(TrainingInterrupted) as stop:
        train(_scripted_config(tmp_path, "sig", 10))
    at = int(
        re.match(
            r"SIGTERM at step (\d+): checkpoint written to (.*); continue with --resume (.*)$",
            str(stop.value),
        )[1]
    )
    assert at in (96, 128)
    assert str(stop.value).endswith(
        f"checkpoint.safetensors; continue with --resume {tmp_path / 'sig'}"
    )
    _, meta = _tensors(tmp_path / "sig" / "checkpoint.safetensors")
    assert (meta["iteration"], meta["global_step"]) == (
        str(at // 32),
        str(at),
    )  # the iteration it was in, complete
    summary = train(_scripted_config(tmp_path, "sig", 10), resume=tmp_path / "sig")
    assert summary["global_step"] == 10 * 32
    assert [
        json.loads(line)["iteration"]
        for line in (tmp_path / "sig" / "metrics.jsonl").read_text().splitlines()
    ] == list(range(1, 11))


def test_the_progress_bar_counts_steps_on_stderr_only_when_asked_and_one_evaluation_episode_runs(
    tmp_path, capsys
):
    summary = train(_scripted_config(tmp_path, "bar", 2, eval_episodes=1, save_checkpoint=False))
    assert capsys.readouterr().err == ""  # progress=False
    assert summary["eval_episodes"] == 1 and summary["eval_return_mean"] in (6.0, 15.0)
    config = dataclasses.replace(
        _scripted_config(tmp_path, "bar2", 2, save_checkpoint=False), progress=True
    )
    train(config)
    err = capsys.readouterr().err
    assert "64/64" in err and "ret=" in err and "step" in err
