"""The command-line programs as a user meets them: help, one-line errors, signals, text runs."""

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from textenv.agents.cli import evaluate as evaluate_cli
from textenv.agents.cli import plot as plot_cli
from textenv.agents.cli import train as train_cli
from textenv.agents.cli import train_text as train_text_cli

TOY = [
    "--task",
    "Toy",
    "--model",
    "tiny",
    "--num-envs",
    "4",
    "--max-new-tokens",
    "3",
    "--no-tensorboard",
    "--no-progress",
    "--device",
    "cpu",
]


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("main", [train_cli.main, train_text_cli.main])
def test_resume_is_listed_among_the_options(main, capsys):
    assert "--resume" in _help(main, capsys)


def test_an_env_id_without_a_preset_uses_its_familys_defaults(capsys):
    from textenv.agents.classic import _MUJOCO, CLEANRL_DISCRETE, defaults_note, preset_config

    config = preset_config("InvertedPendulum-v5")  # MuJoCo, no preset
    assert (config.num_steps, config.learning_rate, config.normalize_obs) == (
        _MUJOCO["num_steps"],
        _MUJOCO["learning_rate"],
        True,
    )
    assert "MuJoCo defaults" in defaults_note("InvertedPendulum-v5")
    config = preset_config("MountainCar-v0")  # discrete, no preset
    assert (config.num_envs, config.num_steps, config.total_timesteps) == (
        CLEANRL_DISCRETE["num_envs"],
        CLEANRL_DISCRETE["num_steps"],
        500_000,
    )
    assert "discrete-action defaults" in defaults_note("MountainCar-v0")
    assert "continuous-control defaults" in defaults_note("MountainCarContinuous-v0")
    assert defaults_note("CartPole-v1") is None


def test_preset_cleanrl_starts_from_cleanrls_defaults_and_flags_still_override(capsys):
    from textenv.agents.classic import _MUJOCO, CLEANRL_DISCRETE, PRESETS

    config, _ = train_cli.parse(["--env-id", "CartPole-v1", "--preset", "cleanrl", "--seed", "4"])
    assert (
        config.num_envs,
        config.num_steps,
        config.learning_rate,
        config.total_timesteps,
        config.ppo.ent_coef,
        config.ppo.clip_vloss,
        config.seed,
    ) == (
        CLEANRL_DISCRETE["num_envs"],
        CLEANRL_DISCRETE["num_steps"],
        CLEANRL_DISCRETE["learning_rate"],
        500_000,
        0.01,
        True,
        4,
    )
    config, _ = train_cli.parse(
        ["--preset=cleanrl", "--env-id=textenv/TorchPendulum-v1", "--num-envs", "2"]
    )
    assert (config.num_steps, config.learning_rate, config.normalize_reward, config.num_envs) == (
        _MUJOCO["num_steps"],
        _MUJOCO["learning_rate"],
        True,
        2,
    )
    tuned, _ = train_cli.parse(["--env-id", "CartPole-v1"])
    cartpole = PRESETS["CartPole-v1"]
    assert (tuned.num_envs, tuned.num_steps) == (cartpole["num_envs"], cartpole["num_steps"])
    code = train_cli.main(["--env-id", "CartPole-v1", "--preset", "fast"])
    err = capsys.readouterr().err
    assert (
        code == 2
        and "unknown preset 'fast'; known: tuned, cleanrl" in err
        and "Traceback" not in err
    )


def test_preset_is_refused_with_resume(tmp_path, capsys):
    from textenv.agents.classic import preset_config, train

    summary = train(
        preset_config(
            "CartPole-v1",
            total_timesteps=2048,
            runs_dir=str(tmp_path),
            device="cpu",
            progress=False,
            tensorboard=False,
            eval_episodes=0,
        )
    )
    code = train_cli.main(["--resume", summary["run_dir"], "--preset", "cleanrl"])
    _one_line_error(code, capsys.readouterr().err, "--preset chooses a new run's starting settings")


def _one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def test_a_missing_optional_dependency_is_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    pytest.importorskip("gymnasium")
    try:
        import Box2D  # noqa: F401

        pytest.skip("Box2D is installed here")
    except ImportError:
        pass
    code = train_cli.main(
        ["--env-id", "LunarLander-v3", "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    )
    _one_line_error(code, capsys.readouterr().err, "Box2D")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    "main,args",
    [(train_cli.main, ["--env-id", "CartPole-v1", "--no-progress"]), (train_text_cli.main, TOY)],
)
def test_a_runs_dir_that_is_a_file_fails_before_anything_loads(tmp_path, capsys, main, args):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main([*args, "--runs-dir", str(blocker)])
    _one_line_error(
        code, capsys.readouterr().err, f"--runs-dir {str(blocker)!r} is not a directory"
    )
    code = main([*args, "--runs-dir", str(blocker / "sub")])
    _one_line_error(code, capsys.readouterr().err, "is not a writable directory")


@pytest.mark.parametrize(
    "main,args", [(train_cli.main, ["--env-id", "CartPole-v1"]), (train_text_cli.main, TOY)]
)
def test_a_negative_seed_names_the_seed(tmp_path, capsys, main, args):
    code = main([*args, "--seed", "-1", "--runs-dir", str(tmp_path)])
    _one_line_error(code, capsys.readouterr().err, "seed must be >= 0, got -1")


def test_plot_into_a_missing_folder_is_one_line(tmp_path, capsys):
    code = plot_cli.main([str(tmp_path), "-o", str(tmp_path / "missing" / "c.png")])
    _one_line_error(code, capsys.readouterr().err, "does not exist")


def test_a_second_signal_stops_at_once(capsys):
    from textenv.agents.checkpoint import StoppedNow, StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.received == signal.SIGINT
        assert "stopping after this iteration" in capsys.readouterr().err
        with pytest.raises(StoppedNow):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)


def test_ctrl_c_during_start_up_exits_quietly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.train_text", *TOY, "--runs-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # importing torch and transformers
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err


def test_text_run_files_are_0644_and_model_paths_absolute(tmp_path, monkeypatch, capsys):
    from textenv.models import load_causal_lm

    model, tok = load_causal_lm("tiny")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        code = train_text_cli.main(
            [
                *TOY,
                "--model",
                "./m",
                "--iterations",
                "1",
                "--runs-dir",
                "runs",
                "--run-name",
                "r",
                "--eval-samples",
                "0",
                "--no-save-checkpoint",
            ]
        )
    finally:
        os.umask(old)
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert config["model"] == str(tmp_path / "m")
    for name in ("config.json", "summary.json"):
        assert stat.S_IMODE((tmp_path / "runs" / "r" / name).stat().st_mode) == 0o644


def test_a_reward_module_in_the_current_folder_imports_without_python_m(tmp_path, monkeypatch):
    from textenv.rewards import get_reward

    (tmp_path / "my_rewards_cwd.py").write_text(
        "def polite(prompts, responses):\n    return [1.0 for _ in responses]\n"
    )
    (tmp_path / "broken_rewards_cwd.py").write_text("def f(:\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert get_reward("my_rewards_cwd:polite")(["p"], ["r"]) == [1.0]
    assert str(tmp_path) not in sys.path  # the import path is left as it was
    with pytest.raises(ValueError, match=r"broken_rewards_cwd\.py, line 1"):
        get_reward("broken_rewards_cwd:f")


def test_evaluate_and_plot_understand_text_runs(tmp_path, capsys):
    from textenv import TextGenerationVectorEnv
    from textenv.agents.lm import LMActorCritic
    from textenv.agents.rollout_text import evaluate_held_out
    from textenv.models import load_causal_lm

    # A vanishing learning rate: the saved policy is the reference, so the KL is 0 and the score
    # is the initial policy's on the held-out prompts.
    code = train_text_cli.main(
        [
            *TOY,
            "--iterations",
            "2",
            "--learning-rate",
            "1e-12",
            "--runs-dir",
            str(tmp_path),
            "--run-name",
            "t__1",
            "--eval-samples",
            "4",
        ]
    )
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert evaluate_cli.main([str(tmp_path / "t__1"), "--episodes", "5", "--seed", "7"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    envs = TextGenerationVectorEnv(
        num_envs=5, task="Toy", model="tiny", max_new_tokens=3, split="test"
    )
    expected = evaluate_held_out(LMActorCritic(load_causal_lm("tiny")[0]), envs, seed=7)
    assert result["prompts"] == "held-out" and result["responses"] == 5
    assert result["score_mean"] == pytest.approx(expected["score"], abs=1e-6)
    assert result["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    assert plot_cli.main([str(tmp_path / "t__1"), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.parametrize(
    "options,expected",
    [
        ('{"max_turn": 3}', "task ToyTurns has no field 'max_turn'"),
        ("[3]", "--task-options must be a JSON object"),
        ("{max_turns: 3}", "--task-options is not JSON"),
    ],
)
def test_bad_task_options_are_one_line(tmp_path, capsys, options, expected):
    code = train_text_cli.main(
        [
            "--task",
            "ToyTurns",
            "--model",
            "tiny",
            "--task-options",
            options,
            "--runs-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    _one_line_error(code, capsys.readouterr().err, expected)


SMALL = [
    "--total-timesteps",
    "256",
    "--num-envs",
    "2",
    "--num-steps",
    "128",
    "--no-progress",
    "--no-tensorboard",
    "--eval-episodes",
    "0",
    "--device",
    "cpu",
]


def test_flags_are_read_before_tyro_with_either_spelling():
    read = train_cli._flag_from_argv
    assert read(["--run-name=a=b"], "--run-name", "d") == "a=b"  # only the first "=" separates
    assert read(["--seed", "--run-name", "x"], "--run-name", "d") == "x"
    assert (
        read(["--seed", "--run-name"], "--run-name", "d") == "d"
    )  # no value after it: the default


def test_train_cli_notes_the_defaults_of_an_id_without_a_preset_and_prints_the_summary_last(
    tmp_path, capsys, monkeypatch
):
    code = train_cli.main(
        ["--env-id", "MountainCar-v0", *SMALL, "--runs-dir", str(tmp_path), "--run-name", "m"]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "note: MountainCar-v0 has no preset; it uses the discrete-action defaults" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["env_id"] == "MountainCar-v0" and summary["global_step"] == 256
    code = train_cli.main(["--resume", str(tmp_path / "m"), "--total-timesteps", "512"])
    out, err = capsys.readouterr()
    assert (
        code == 0
        and "note:" not in err
        and json.loads(out.strip().splitlines()[-1])["global_step"] == 512
    )
    # With no argv the CLI reads sys.argv (after the program name); --preset cleanrl prints no note.
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "textenv-train",
            "--preset",
            "cleanrl",
            "--env-id",
            "MountainCar-v0",
            *SMALL,
            "--runs-dir",
            str(tmp_path),
            "--run-name",
            "c",
        ],
    )
    assert train_cli.main() == 0
    out, err = capsys.readouterr()
    assert "note:" not in err and json.loads(out.strip().splitlines()[-1])["run_dir"] == str(
        tmp_path / "c"
    )
    with pytest.raises(ValueError, match=r"is a run of MountainCar-v0, not CartPole-v1$"):
        train_cli.parse(["--resume", str(tmp_path / "m"), "--env-id", "CartPole-v1"])


def test_train_text_cli_parses_flags_and_reads_sys_argv(capsys, monkeypatch):
    with pytest.raises(SystemExit):  # the old name of --reference-pass is gone
        train_text_cli.parse(["--kl-shaping", "per_step"])
    capsys.readouterr()
    config, _ = train_text_cli.parse(["--reference-pass", "per_step", "--iterations", "3"])
    assert (
        config.kl.reference_pass == "per_step"
        and config.iterations == 3
        and capsys.readouterr().err == ""
    )
    monkeypatch.setattr(sys, "argv", ["textenv-train-text", "--iterations", "7"])
    assert train_text_cli.parse()[0].iterations == 7


def test_train_text_cli_prints_the_held_out_line_and_the_summary_last_on_rank_0_only(
    capsys, monkeypatch
):
    summary = {
        "task": "Toy",
        "eval_samples": 8,
        "eval_score_before": 0.25,
        "eval_score_before_se": 0.05,
        "eval_score_after": 0.75,
        "eval_score_after_se": 0.0625,
        "eval_kl_after": 1.234,
    }
    monkeypatch.setattr(train_text_cli, "train_text", lambda config, resume=None: dict(summary))
    assert train_text_cli.main(["--iterations", "1"]) == 0
    out, err = capsys.readouterr()
    assert err == (
        "held-out prompts, 8 responses: mean score 0.250 ± 0.050 before -> 0.750 ± 0.062 after; "
        "KL to the reference 1.23 nats per response\n"
    )
    assert json.loads(out.strip().splitlines()[-1])["eval_score_after"] == 0.75
    monkeypatch.setattr(train_text_cli, "train_text", lambda config, resume=None: {"task": "Toy"})
    assert train_text_cli.main(["--iterations", "1"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out.strip().splitlines()[-1]) == {
        "task": "Toy"
    }  # no evaluation: no line
    monkeypatch.setattr(train_text_cli, "is_main_process", lambda: False)
    assert train_text_cli.main(["--iterations", "1"]) == 0
    assert capsys.readouterr() == ("", "")  # other ranks print nothing


def test_evaluate_cli_plays_a_classic_run_as_evaluate_policy_does(tmp_path, capsys):
    from textenv.agents.classic import evaluate_policy, load_checkpoint, preset_config, train

    summary = train(
        preset_config(
            "CartPole-v1",
            total_timesteps=2048,
            runs_dir=str(tmp_path),
            run_name="c",
            device="cpu",
            progress=False,
            tensorboard=False,
            eval_episodes=0,
        )
    )
    policy, norm, config = load_checkpoint(summary["checkpoint"])
    for target, episodes, seed, argv in (
        (tmp_path / "c", 10, 12345, []),  # the defaults
        (tmp_path / "c" / "checkpoint.safetensors", 1, 3, ["--episodes", "1", "--seed", "3"]),
    ):
        assert evaluate_cli.main([str(target), *argv]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        expected = evaluate_policy(policy, "CartPole-v1", episodes, seed=seed, norm_state=norm)
        assert result == {
            "env_id": "CartPole-v1",
            "episodes": episodes,
            "eval_return_mean": float(np.mean(expected)),
            "eval_return_std": float(np.std(expected)),
            "returns": expected,
        }
    _one_line_error(
        evaluate_cli.main([str(tmp_path / "c"), "--episodes", "0"]),
        capsys.readouterr().err,
        "episodes must be >= 1, got 0",
    )
    (tmp_path / "t" / "policy").mkdir(parents=True)
    _one_line_error(
        evaluate_cli.main([str(tmp_path / "t"), "--video-dir", str(tmp_path / "v")]),
        capsys.readouterr().err,
        "--video-dir records classic envs only",
    )
    if importlib.util.find_spec("moviepy") is None:  # the [video] extra is not installed
        _one_line_error(
            evaluate_cli.main([str(tmp_path / "c"), "--video-dir", str(tmp_path / "v")]),
            capsys.readouterr().err,
            '--video-dir needs moviepy: pip install "textenv-ppo[video]"',
        )


def _run(folder, name, rows, config=None):
    run = folder / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps(config or {"env_id": "CartPole-v1"}))
    return run


def test_plot_draws_each_groups_mean_and_band_on_a_common_grid(tmp_path, capsys, monkeypatch):
    import matplotlib.pyplot as plt

    a1 = _run(
        tmp_path,
        "A__1",
        [
            {"global_step": 0, "episodic_return": 0.0},
            {"global_step": 50, "loss": 1.0},
            {"global_step": 100, "episodic_return": 10.0},
            {"global_step": 200, "episodic_return": 20.0, "x": None},
        ],
    )
    a2 = _run(
        tmp_path,
        "A__2",
        [
            {"global_step": 0, "episodic_return": 10.0},
            {"global_step": 100, "episodic_return": None},
            {"global_step": 150, "episodic_return": 40.0},
        ],
    )
    b = _run(
        tmp_path,
        "B",
        [{"global_step": 0, "episodic_return": 5.0}, {"global_step": 300, "episodic_return": 5.0}],
    )
    assert [plot_cli.group_name(r) for r in (a1, a2, b, tmp_path / "C__x__3")] == [
        "A",
        "A",
        "B",
        "C",
    ]
    assert plot_cli.main([str(a1), "-o", str(tmp_path / "first.png")]) == 0
    assert plt.get_fignums() == []  # the figure is closed once written
    monkeypatch.setattr(plt, "close", lambda fig: None)  # keep the figure to read it back
    out = tmp_path / "c.png"
    assert plot_cli.main([str(a1), str(a2), str(b), "-o", str(out)]) == 0
    assert (
        capsys.readouterr().out == f"{tmp_path / 'first.png'}\n{out}\n"
        and out.stat().st_size > 0
        and not list(tmp_path.glob(".*tmp*"))
    )
    ax = plt.gcf().axes[0]
    (mean_a, mean_b) = ax.lines
    assert mean_a.get_label() == "A (n=2)" and mean_b.get_label() == "B (n=1)"
    grid = np.linspace(0, 150, 200)  # up to the shorter run's last step
    expected = (np.interp(grid, [0, 200], [0, 20]) + np.interp(grid, [0, 150], [10, 40])) / 2
    np.testing.assert_allclose(mean_a.get_xydata(), np.stack([grid, expected], 1))
    band = ax.collections[0].get_paths()[0].vertices  # the min-max band of A
    assert band[:, 1].min() == pytest.approx(0.0) and band[:, 1].max() == pytest.approx(40.0)
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "environment steps",
        "episodic_return",
        "episodic_return",
    )
    plt.close("all")


def test_plot_reads_text_runs_by_iteration_and_refuses_mixes_and_runs_without_the_metric(
    tmp_path, capsys, monkeypatch
):
    import matplotlib.pyplot as plt

    text = _run(
        tmp_path,
        "t__1",
        [{"global_step": 1, "score_mean": 0.1}, {"global_step": 2, "score_mean": 0.3}],
        {"task": "Toy"},
    )
    classic_run = _run(tmp_path, "c__1", [{"global_step": 10, "episodic_return": 1.0}])
    assert plot_cli.is_text_run(text) and not plot_cli.is_text_run(classic_run)
    assert not plot_cli.is_text_run(tmp_path / "nothing")
    monkeypatch.setattr(plt, "close", lambda fig: None)
    assert plot_cli.main([str(text), "-o", str(tmp_path / "t.png"), "--title", "Toy"]) == 0
    ax = plt.gcf().axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("iterations", "score_mean", "Toy")
    plt.close("all")
    _one_line_error(
        plot_cli.main([str(text), str(classic_run), "-o", str(tmp_path / "m.png")]),
        capsys.readouterr().err,
        "mix of text and classic runs",
    )
    _one_line_error(
        plot_cli.main([str(classic_run), "--metric", "loss", "-o", str(tmp_path / "m.png")]),
        capsys.readouterr().err,
        "has no values of metric 'loss'",
    )
    _one_line_error(
        plot_cli.main([str(tmp_path / "nothing"), "-o", str(tmp_path / "m.png")]),
        capsys.readouterr().err,
        "is not a run directory (no metrics.jsonl)",
    )
