"""--eval-every and --eval-rewards: held-out evaluations during training, with more rewards (a
gold reward beside a learned proxy) scored on the same responses."""

from __future__ import annotations

import json
import math

import pytest

from textenv.agents.cli import train_text as train_text_cli
from textenv.agents.text import (
    LMConfig,
    LoggingConfig,
    TextTrainConfig,
    eval_reward_key,
    train_text,
)

METRIC_KEYS = ("score_mean", "kl_k1", "policy_loss", "value_loss", "entropy")


def _run(tmp_path, name: str, **settings) -> tuple[dict, list[dict]]:
    config = TextTrainConfig(
        task="Toy",
        model="tiny",
        reward="length",
        iterations=4,
        num_envs=8,
        learning_rate=1e-3,
        eval_samples=8,
        lm=LMConfig(device="cpu"),
        logging=LoggingConfig(
            runs_dir=str(tmp_path),
            run_name=name,
            tensorboard=False,
            progress=False,
            save_checkpoint=False,
        ),
        **settings,
    )
    summary = train_text(config)
    rows = [
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    return summary, rows


def test_periodic_evaluations_score_more_rewards_and_leave_training_unchanged(tmp_path):
    summary, rows = _run(tmp_path, "eval", eval_every=2, eval_rewards=("length", "vader"))
    plain_summary, plain_rows = _run(tmp_path, "plain")
    # Evaluating draws from its own generator and envs: the training is the same run.
    for row, plain in zip(rows, plain_rows, strict=True):
        assert {k: row[k] for k in METRIC_KEYS} == {k: plain[k] for k in METRIC_KEYS}
    assert summary["eval_score_before"] == plain_summary["eval_score_before"]
    assert summary["eval_score_after"] == plain_summary["eval_score_after"]
    assert [("eval_score" in r, "eval_vader" in r) for r in rows] == [
        (False, False),
        (True, True),
    ] * 2
    # The task's own reward given again as an extra reward scores each response identically.
    for row in rows[1::2]:
        assert row["eval_length"] == pytest.approx(
            row["eval_score"], rel=1e-6
        )  # float32 in the env
        assert row["eval_length_se"] == pytest.approx(row["eval_score_se"], rel=1e-6)
        assert math.isfinite(row["eval_kl"]) and -1 <= row["eval_vader"] <= 1
    assert summary["eval_length_before"] == pytest.approx(summary["eval_score_before"], rel=1e-6)
    assert summary["eval_length_after"] == rows[-1]["eval_length"]
    assert summary["eval_score_after"] == rows[-1]["eval_score"]  # the last evaluation, reused
    assert summary["eval_rewards"] == ["eval_length", "eval_vader"]
    assert rows[1]["eval_score"] != summary["eval_score_before"]  # the policy moved in between


def test_the_held_out_line_names_each_extra_reward(capsys, monkeypatch):
    summary = {
        "eval_samples": 8,
        "eval_score_before": 0.25,
        "eval_score_before_se": 0.05,
        "eval_score_after": 0.75,
        "eval_score_after_se": 0.0625,
        "eval_kl_after": 1.234,
        "eval_rewards": ["eval_vader"],
        "eval_vader_before": 0.1,
        "eval_vader_after": 0.3,
    }
    monkeypatch.setattr(train_text_cli, "train_text", lambda config, resume=None: dict(summary))
    assert train_text_cli.main(["--iterations", "1", "--eval-rewards", "vader"]) == 0
    assert capsys.readouterr().err.endswith("1.23 nats per response; vader 0.100 -> 0.300\n")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"eval_every": -1}, "eval_every must be >= 0, got -1"),
        ({"eval_every": 2, "eval_samples": 0}, "--eval-every needs --eval-samples > 0"),
        (
            {"eval_rewards": ("vader",), "eval_samples": 0},
            "--eval-rewards needs --eval-samples > 0",
        ),
        ({"eval_rewards": ("m:gold", "m.gold")}, "eval_rewards name the same metric twice"),
    ],
)
def test_bad_evaluation_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TextTrainConfig(task="Toy", model="tiny", **settings).validate()


def test_metric_names_of_reward_specs():
    assert eval_reward_key("vader") == "eval_vader"
    assert eval_reward_key("my.module:gold_fn") == "eval_my_module_gold_fn"
