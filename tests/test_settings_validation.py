"""No setting changes silently: non-finite numbers and mistyped task options are refused with
one line naming them, a rounded budget says what it trains, a resume says where it starts."""

import dataclasses
import json
import math

import pytest

from textenv.agents.classic import TrainConfig, budget_note, preset_config
from textenv.agents.classic import train as train_classic
from textenv.agents.text import KLConfig, SamplingConfig, TextTrainConfig, task_options, train_text


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "make, flag",
    [
        (lambda v: TextTrainConfig(kl=KLConfig(kl_coef=v)), "--kl-coef"),
        (lambda v: TextTrainConfig(sampling=SamplingConfig(temperature=v)), "--temperature"),
        (
            lambda v: TextTrainConfig(ppo=dataclasses.replace(TextTrainConfig().ppo, vf_coef=v)),
            "--vf-coef",
        ),
        (lambda v: TrainConfig(clip_obs=v), "--clip-obs"),
        (
            lambda v: TrainConfig(ppo=dataclasses.replace(TrainConfig().ppo, max_grad_norm=v)),
            "--max-grad-norm",
        ),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_flag(make, flag, value):
    with pytest.raises(ValueError, match=f"^{flag} must be a finite number, got {value}$"):
        make(value).validate()


@pytest.mark.parametrize("argv", [["--kl-coef", "nan"], ["--learning-rate", "inf"]])
def test_the_text_cli_refuses_non_finite_flags_with_one_line_and_exit_2(argv, capsys, tmp_path):
    from textenv.agents.cli.train_text import main

    assert main(["--task", "Toy", "--model", "tiny", "--runs-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and argv[0] in err[0], err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "options, message",
    [
        (
            '{"max_new_tokens": "big"}',
            "field 'max_new_tokens' of task Toy must be int, got \"big\"",
        ),
        ('{"max_new_tokens": 2.5}', "field 'max_new_tokens' of task Toy must be int, got 2.5"),
        ('{"kl_coef": NaN}', "field 'kl_coef' of task Toy must be float, got NaN"),
        (
            '{"split": "dev"}',
            'field \'split\' of task Toy must be one of "all", "train", "test", got "dev"',
        ),
        ('{"nope": 1}', "task Toy has no field 'nope'"),
    ],
)
def test_task_options_are_checked_against_the_task_fields_types(options, message):
    with pytest.raises(ValueError, match="^--task-options: ") as err:
        task_options(TextTrainConfig(task="Toy", task_options=options))
    assert message in str(err.value)


def test_well_typed_task_options_pass_as_given():
    options = '{"max_new_tokens": 3, "kl_coef": 1, "split": "test"}'
    assert task_options(TextTrainConfig(task="Toy", task_options=options)) == json.loads(options)


def test_a_budget_that_is_not_whole_batches_says_what_it_trains():
    note = budget_note(preset_config("Pendulum-v1", total_timesteps=20_000))
    assert (
        note
        == "training 16,384 steps, not 20,000: 4 iteration(s) of num_envs x num_steps = 4 x 1024 = 4,096"
    )
    assert budget_note(preset_config("CartPole-v1", total_timesteps=10)).startswith(
        "training 2,048 steps, not 10:"
    )
    assert budget_note(preset_config("CartPole-v1")) is None  # whole batches: nothing to say


def test_the_classic_trainer_prints_the_rounded_budget(tmp_path, capsys):
    config = TrainConfig(
        total_timesteps=100,
        num_envs=4,
        num_steps=8,
        runs_dir=str(tmp_path),
        progress=False,
        tensorboard=False,
        eval_episodes=0,
        save_checkpoint=False,
        ppo=dataclasses.replace(TrainConfig().ppo, num_minibatches=2, update_epochs=1),
    )
    summary = train_classic(config)
    assert summary["global_step"] == 96
    assert "training 96 steps, not 100: 3 iteration(s)" in capsys.readouterr().err


def test_a_resumed_text_run_says_where_it_starts(tmp_path, capsys):
    kw = dict(
        task="Toy",
        model="tiny",
        num_envs=4,
        max_new_tokens=3,
        runs_dir=str(tmp_path),
        run_name="r",
        progress=False,
        tensorboard=False,
        eval_samples=0,
        sample_every=0,
        ppo=dataclasses.replace(TextTrainConfig().ppo, num_minibatches=2, update_epochs=1),
    )
    train_text(TextTrainConfig.from_flat(iterations=2, **kw))
    capsys.readouterr()
    train_text(TextTrainConfig.from_flat(iterations=3, **kw), resume=tmp_path / "r")
    assert f"resuming {tmp_path / 'r'} at iteration 3 of 3" in capsys.readouterr().err


def test_a_resume_shows_progress_unless_no_progress_is_given_again(tmp_path):
    from textenv.agents.cli import train as train_cli
    from textenv.agents.cli import train_text as train_text_cli

    kw = dict(
        task="Toy",
        model="tiny",
        num_envs=4,
        max_new_tokens=3,
        runs_dir=str(tmp_path),
        run_name="t",
        progress=False,
        tensorboard=False,
        eval_samples=0,
        sample_every=0,
        iterations=1,
        ppo=dataclasses.replace(TextTrainConfig().ppo, num_minibatches=2, update_epochs=1),
    )
    train_text(TextTrainConfig.from_flat(**kw))
    assert train_text_cli.parse(["--resume", str(tmp_path / "t")])[0].logging.progress
    config, _ = train_text_cli.parse(["--resume", str(tmp_path / "t"), "--no-progress"])
    assert not config.logging.progress
    classic = TrainConfig(
        total_timesteps=64,
        num_envs=4,
        num_steps=16,
        runs_dir=str(tmp_path),
        run_name="c",
        progress=False,
        tensorboard=False,
        eval_episodes=0,
        ppo=dataclasses.replace(TrainConfig().ppo, num_minibatches=2, update_epochs=1),
    )
    train_classic(classic)
    assert train_cli.parse(["--resume", str(tmp_path / "c")])[0].progress
    assert not train_cli.parse(["--resume", str(tmp_path / "c"), "--no-progress"])[0].progress
