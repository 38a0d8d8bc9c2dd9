"""The reward-model trainer and the pair maker: the Bradley–Terry loss, a tiny model that learns a
preference, the saved folder as transformers, ClassifierReward and the RewardModel env read it,
resume, label noise, and one-line errors for bad pair files."""

import json
import math
import os
import random
import signal

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

import textenv  # noqa: F401 - registers the envs
import textenv.agents.reward_model as rm
from textenv.agents.checkpoint import TrainingInterrupted
from textenv.agents.cli import make_pairs as make_pairs_cli
from textenv.agents.cli import train_rm as train_rm_cli
from textenv.agents.cli import train_text as train_text_cli
from textenv.agents.reward_model import (
    PairsConfig,
    RewardModelConfig,
    bradley_terry_loss,
    make_pairs,
    read_pairs,
    reward_model_from_causal_lm,
    score,
    train_reward_model,
)
from textenv.models import char_tokenizer
from textenv.rewards import ClassifierReward

LETTERS = "bcdefghijklmnopqrstuvwxyz "


def _letter_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen responses contain an ``a``, rejected ones do not: a preference a tiny model can
    learn."""
    rng = random.Random(seed)

    def word(k):
        return "".join(rng.choice(LETTERS) for _ in range(k))

    rows = []
    for _ in range(n):
        chosen = list(word(rng.randint(3, 8)))
        chosen[rng.randrange(len(chosen))] = "a"
        rows.append(
            {
                "prompt": word(rng.randint(2, 6)) + " ",
                "chosen": "".join(chosen),
                "rejected": word(rng.randint(3, 8)),
            }
        )
    return rows


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(pairs: str, output, **overrides) -> RewardModelConfig:
    settings = dict(
        model="tiny",
        epochs=5,
        batch_size=16,
        learning_rate=3e-3,
        eval_fraction=0.2,
        device="cpu",
        tensorboard=False,
        progress=False,
    )
    return RewardModelConfig(pairs=pairs, output=str(output), **(settings | overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny reward model trained on the letter preference: (summary, pairs, folder)."""
    root = tmp_path_factory.mktemp("rm")
    rows = _letter_pairs(200)
    pairs = _write_jsonl(root / "pairs.jsonl", rows)
    summary = train_reward_model(_config(pairs, root / "rm"))
    return summary, rows, root / "rm"


def test_bradley_terry_loss_is_the_mean_negative_log_sigmoid_of_the_margin():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.5, 1.0])
    loss = bradley_terry_loss(chosen, rejected)
    # margins 1.5 and -1: (log(1 + e^-1.5) + log(1 + e^1)) / 2, by hand 0.757337...
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.5)) + math.log1p(math.e)) / 2)
    assert loss.item() == pytest.approx(0.7573375, abs=1e-6)
    loss.backward()
    assert (chosen.grad < 0).all()  # descending the loss raises the chosen reward
    # the labels matter: swapped, the same pairs cost more
    assert bradley_terry_loss(rejected, chosen.detach()).item() > loss.item()


def test_a_tiny_model_learns_that_chosen_responses_contain_a_letter(trained):
    summary, _, _ = trained
    assert (summary["train_pairs"], summary["eval_pairs"]) == (160, 40)
    assert summary["eval_accuracy_before"] < 0.8
    assert summary["eval_accuracy"] > 0.9
    assert summary["eval_loss"] < summary["eval_loss_before"]


def test_the_saved_folder_is_a_transformers_reward_model_that_scores_as_the_trainer(trained):
    summary, rows, folder = trained
    assert summary["output"] == str(folder)
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("right", "left")
    prompts = [r["prompt"] for r in rows[:12]]
    responses = [r[k] for r in rows[:6] for k in ("chosen", "rejected")]
    trainer = score(model, tokenizer, prompts, responses)
    classifier = ClassifierReward(str(folder))(prompts, responses)
    assert classifier == pytest.approx(trainer, abs=1e-5)
    # batched or one at a time, a text gets the same score (right padding keeps positions)
    alone = [score(model, tokenizer, [p], [r])[0] for p, r in zip(prompts, responses)]
    assert alone == pytest.approx(trainer, abs=1e-5)
    assert trainer[0] > trainer[1]  # a chosen response (with an "a") above its rejected one


def test_the_reward_model_env_scores_a_response_as_the_trainer_does(trained):
    _, rows, folder = trained
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    env = gym.make(
        "textenv/RewardModel-v0",
        model="tiny",
        reward_model=str(folder),
        kl_coef=0.0,
        prompts=["say a"],
        max_new_tokens=6,
    )
    chars = char_tokenizer()
    for response in (rows[0]["chosen"][:6], rows[0]["rejected"][:6], "aaa"):
        env.reset(seed=0, options={"prompt": "say a"})
        ids = chars(response)["input_ids"] + [chars.eos_token_id]
        for token in ids[:6]:
            _, reward, terminated, _, info = env.step(token)
            if terminated:
                break
        assert terminated
        expected = score(model, tokenizer, ["say a"], [response])[0]
        assert info["score"] == pytest.approx(expected, abs=1e-5)
        assert reward == pytest.approx(expected, abs=1e-5)  # kl_coef 0: the reward is the score
    env.close()


def test_the_text_trainer_trains_on_the_saved_reward_model(trained, tmp_path, capsys):
    _, _, folder = trained
    code = train_text_cli.main(
        [
            "--task",
            "RewardModel",
            "--task-options",
            json.dumps({"reward_model": str(folder), "max_prompt_tokens": 64}),
            "--model",
            "tiny",
            "--iterations",
            "1",
            "--num-envs",
            "4",
            "--max-new-tokens",
            "4",
            "--eval-samples",
            "0",
            "--device",
            "cpu",
            "--runs-dir",
            str(tmp_path),
            "--no-tensorboard",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(summary["score_mean_last"])


def test_a_backbone_of_another_family_gets_its_weights_copied_and_a_fresh_head():
    tokenizer = char_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    lm = GPT2LMHeadModel(config)
    model, tok = reward_model_from_causal_lm(lm, tokenizer, seed=3)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    for name, tensor in lm.transformer.state_dict().items():
        assert torch.equal(model.transformer.state_dict()[name], tensor), name
    again, _ = reward_model_from_causal_lm(lm, tokenizer, seed=3)
    assert torch.equal(again.score.weight, model.score.weight)  # the head's init follows the seed
    assert tokenizer.padding_side == "right" and tokenizer.truncation_side == "right"  # a copy


def test_lora_trains_the_head_and_saves_a_plain_model_that_scores_as_the_trainer(tmp_path):
    pytest.importorskip("peft")
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _letter_pairs(64))
    summary = train_reward_model(
        _config(pairs, tmp_path / "rm", lora_r=4, lora_alpha=8, epochs=2, keep_checkpoint=False)
    )
    assert not (tmp_path / "rm" / rm.CHECKPOINT_FILE).exists()
    folder = tmp_path / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert not any("lora" in name for name in model.state_dict())
    fresh, _ = rm.load_reward_backbone("tiny", seed=1)
    assert not torch.equal(model.score.weight, fresh.score.weight)  # the head was trained
    prompts, responses = ["say a", "go"], ["aab", "xyz"]
    assert ClassifierReward(str(folder))(prompts, responses) == pytest.approx(
        score(model, AutoTokenizer.from_pretrained(folder), prompts, responses), abs=1e-5
    )
    assert summary["eval_pairs"] == 13


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _letter_pairs(48))
    settings = dict(epochs=3, checkpoint_every=2)
    whole = train_reward_model(_config(pairs, tmp_path / "whole", **settings))

    calls = {"n": 0}

    def loss_then_stop(chosen, rejected):
        calls["n"] += chosen.requires_grad  # training steps only, not evaluations
        if calls["n"] == 5 and chosen.requires_grad:  # Ctrl-C in step 5: it ends with a checkpoint
            os.kill(os.getpid(), signal.SIGINT)
        return bradley_terry_loss(chosen, rejected)

    monkeypatch.setattr(rm, "bradley_terry_loss", loss_then_stop)
    with pytest.raises(TrainingInterrupted):
        train_reward_model(_config(pairs, tmp_path / "cut", **settings))
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = train_reward_model(_config(pairs, tmp_path / "cut", **settings), tmp_path / "cut")

    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["eval_accuracy"] == whole["eval_accuracy"]
    assert resumed["eval_accuracy_before"] == whole["eval_accuracy_before"]
    steps = [json.loads(line)["global_step"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == list(range(1, whole["steps"] + 1))  # each step logged once


def test_a_resume_that_would_not_continue_the_run_is_refused(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    _write_jsonl(pairs, _letter_pairs(24))
    assert train_rm_cli.main(_cli(str(pairs), tmp_path / "rm", "--epochs", "1")) == 0
    capsys.readouterr()
    out = str(tmp_path / "rm")
    assert train_rm_cli.main(["--resume", out, "--seed", "7"]) == 2
    assert "seed=1" in _one_error_line(capsys)
    assert train_rm_cli.main(_cli(str(pairs), tmp_path / "rm")) == 2  # a fresh run over it
    assert "already holds a reward model" in _one_error_line(capsys)
    _write_jsonl(pairs, _letter_pairs(24, seed=1))
    assert train_rm_cli.main(["--resume", out, "--epochs", "2"]) == 2
    assert "changed since the run started" in _one_error_line(capsys)


def test_more_epochs_extend_a_finished_run(tmp_path, capsys):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _letter_pairs(24))
    assert train_rm_cli.main(_cli(pairs, tmp_path / "rm", "--epochs", "1")) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert train_rm_cli.main(["--resume", str(tmp_path / "rm"), "--epochs", "2"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (first["steps"], second["steps"]) == (3, 6)  # 22 training pairs, 8 a step
    assert json.loads((tmp_path / "rm" / rm.CONFIG_FILE).read_text())["epochs"] == 2


def _cli(pairs: str, output, *extra: str) -> list[str]:
    return [
        "--pairs",
        pairs,
        "--output",
        str(output),
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--no-tensorboard",
        "--no-progress",
        *extra,
    ]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "lines, expected",
    [
        (['{"prompt": "a", "chosen": "b"}'], 'pairs.jsonl:1: missing key "rejected"'),
        (
            [
                '{"prompt": "a", "chosen": "b", "rejected": "c"}',
                '{"prompt": "a", "chosen": 3, "rejected": "c"}',
            ],
            'pairs.jsonl:2: "chosen" must be a string, got a number',
        ),
        (
            ['{"prompt": "a", "chosen": "b", "rejected": "c"}', "", '{"prompt": "a", "chosen"'],
            "pairs.jsonl:3: not JSON",
        ),
        (['["a", "b", "c"]'], "pairs.jsonl:1: a pair is a JSON object"),
        ([], "holds no pairs (the file is empty)"),
        (
            ['{"prompt": "a", "chosen": "b", "rejected": "b"}'] * 3,
            '"chosen" equals "rejected" in every pair (3)',
        ),
    ],
    ids=["missing-key", "non-string", "invalid-json", "not-an-object", "empty", "all-equal"],
)
def test_a_bad_pair_file_is_one_error_line_naming_what_is_wrong(lines, expected, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(line + "\n" for line in lines))
    assert train_rm_cli.main(_cli(str(pairs), tmp_path / "rm")) == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "rm").exists()  # refused before anything was written


def test_pairs_with_the_same_chosen_and_rejected_are_left_out_with_a_note(tmp_path):
    rows = _letter_pairs(3) + [{"prompt": "x", "chosen": "same", "rejected": "same"}]
    pairs, same = read_pairs(_write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert len(pairs) == 3 and same == [4]


def _gold(prompts, responses):
    """A gold reward that rarely ties: the mean character code of the response."""
    return [sum(map(ord, r)) / (len(r) + 1) for r in responses]


def _pairs_config(tmp_path, **overrides) -> PairsConfig:
    settings = dict(
        model="tiny",
        prompts="Toy",
        num_pairs=40,
        max_new_tokens=6,
        device="cpu",
        progress=False,
    )
    return PairsConfig(
        gold="unused", output=str(tmp_path / "pairs.jsonl"), **(settings | overrides)
    )


def test_make_pairs_labels_the_response_the_gold_reward_prefers_as_chosen(tmp_path):
    summary = make_pairs(_pairs_config(tmp_path), gold=_gold)
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert len(rows) == summary["pairs"] == 40 and summary["flipped"] == 0
    for row in rows:
        chosen, rejected = _gold([row["prompt"]] * 2, [row["chosen"], row["rejected"]])
        assert (row["gold_chosen"], row["gold_rejected"]) == (chosen, rejected)
        assert chosen > rejected and not row["flipped"]
    assert read_pairs(tmp_path / "pairs.jsonl")[0]  # a file the trainer reads
    again = tmp_path / "again"
    again.mkdir()
    make_pairs(_pairs_config(again), gold=_gold)
    assert (again / "pairs.jsonl").read_text() == (tmp_path / "pairs.jsonl").read_text()


def test_make_pairs_skips_ties(tmp_path):
    def coarse(prompts, responses):
        return [float("a" in r) for r in responses]

    summary = make_pairs(_pairs_config(tmp_path, num_pairs=10), gold=coarse)
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert summary["ties_skipped"] > 0
    assert all(r["gold_chosen"] == 1.0 and r["gold_rejected"] == 0.0 for r in rows)


def test_label_noise_flips_about_that_fraction_of_the_labels(tmp_path):
    summary = make_pairs(_pairs_config(tmp_path, num_pairs=200, label_noise=0.25), gold=_gold)
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    flipped = [r["flipped"] for r in rows]
    assert sum(flipped) == summary["flipped"]
    # 200 draws at p = 0.25: a standard deviation of 6 flips; the seed is fixed
    assert 0.15 < np.mean(flipped) < 0.35
    assert all((r["gold_chosen"] < r["gold_rejected"]) == r["flipped"] for r in rows)
    make_pairs(_pairs_config(tmp_path, num_pairs=20, label_noise=1.0), gold=_gold)
    assert all(json.loads(line)["flipped"] for line in open(tmp_path / "pairs.jsonl"))


def test_make_pairs_cli_writes_the_file_and_prints_its_summary(tmp_path, capsys, monkeypatch):
    (tmp_path / "golds.py").write_text(
        "def gold(prompts, responses):\n    return [sum(map(ord, r)) / (len(r) + 1) for r in responses]\n"
    )
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("say a\nhello\n")
    args = ["--model", "tiny", "--prompts", str(prompts), "--split", "all", "--gold", "golds:gold"]
    args += ["--num-pairs", "8", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    assert make_pairs_cli.main([*args, "--output", "pairs.jsonl"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pairs"] == 8 and summary["gold"] == "gold"
    prompts_seen = {json.loads(line)["prompt"] for line in open(tmp_path / "pairs.jsonl")}
    assert prompts_seen == {"say a", "hello"}


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--gold", "nope"], "unknown reward 'nope'"),
        (["--gold", "length", "--prompts", "NoSuchTask"], "is neither a task"),
        (["--gold", "length", "--prompts", "GuessTheNumber"], "is a multi-turn task"),
        (["--gold", "length", "--label-noise", "1.5"], "label_noise must lie in [0, 1]"),
    ],
)
def test_make_pairs_bad_settings_are_one_error_line(flags, expected, tmp_path, capsys):
    args = ["--model", "tiny", "--output", str(tmp_path / "p.jsonl"), "--device", "cpu", *flags]
    assert make_pairs_cli.main(args) == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "p.jsonl").exists()
