"""Prompt sets (splits, files, chat messages), the held-out evaluation and the thread flag."""

import json

import pytest
import torch

from textenv import TextGenerationVectorEnv
from textenv.agents.lm import LMActorCritic
from textenv.agents.rollout_text import evaluate_held_out
from textenv.agents.text import TextTrainConfig, train_text
from textenv.models import load_causal_lm
from textenv.tasks import HELD_OUT_EVERY, make_task, read_prompts, split_prompts


def test_split_holds_out_every_fifth_prompt_and_partitions_the_set():
    prompts = [f"p{i}" for i in range(12)]
    assert split_prompts(prompts, "test") == ["p4", "p9"]
    assert split_prompts(prompts, "train") == [p for p in prompts if p not in ("p4", "p9")]
    assert split_prompts(prompts, "all") == prompts
    with pytest.raises(ValueError, match="split must be"):
        split_prompts(prompts, "valid")
    full = make_task("Sentiment").prompts
    train, test = (
        make_task("Sentiment", split="train").prompts,
        make_task("Sentiment", split="test").prompts,
    )
    assert len(test) == len(full) // HELD_OUT_EVERY and sorted(train + test) == sorted(full)
    assert not set(train) & set(test)


def test_a_split_with_no_prompts_names_the_split():
    task = make_task("Toy", prompts=["a", "b"], split="test")
    with pytest.raises(ValueError, match="split 'test'"):
        task.validate()


def test_prompts_from_a_text_file_a_jsonl_file_and_a_path_argument(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(txt) == ["first prompt", "second prompt"]
    assert make_task("Toy", prompts=str(txt)).prompts == [
        "first prompt",
        "second prompt",
    ]  # not characters
    assert make_task("Toy", prompts=txt).prompts == ["first prompt", "second prompt"]
    jsonl = tmp_path / "p.jsonl"
    messages = [{"role": "user", "content": "hi"}]
    jsonl.write_text(
        json.dumps({"prompt": "plain"}) + "\n" + json.dumps({"messages": messages}) + "\n"
    )
    assert read_prompts(jsonl) == ["plain", messages]
    jsonl.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not JSON"):
        read_prompts(jsonl)
    jsonl.write_text(json.dumps({"text": "no prompt key"}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:1: each line needs"):
        read_prompts(jsonl)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_chat_prompts_are_rendered_with_the_chat_template_and_no_extra_special_tokens():
    messages = [{"role": "user", "content": "abc"}]
    envs = TextGenerationVectorEnv(num_envs=1, task="Toy", model="tiny", tokenizer=None)
    with pytest.raises(ValueError, match="chat template"):
        envs.reset(options={"prompts": [messages]})
    model, tok = load_causal_lm("tiny")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}a:"
    )
    tok.add_bos_token = True
    envs = TextGenerationVectorEnv(num_envs=2, task="Toy", model=model, tokenizer=tok)
    obs, info = envs.reset(options={"prompts": [messages, "u:abc a:"]})
    assert list(info["prompt"]) == ["u:abc a:", "u:abc a:"]
    rendered = tok("u:abc a:", add_special_tokens=False)["input_ids"]
    P = envs.max_prompt_tokens
    row = obs["input_ids"][0, :P][obs["attention_mask"][0, :P].bool()].tolist()
    assert row == rendered
    make_task("Toy", prompts=[messages]).validate()
    with pytest.raises(ValueError, match="prompt 0 is not a list of"):
        make_task("Toy", prompts=[[{"content": "no role"}]]).validate()


def _config(tmp_path, **kw):
    base = dict(
        task="Toy",
        model="tiny",
        iterations=2,
        num_envs=8,
        max_new_tokens=4,
        learning_rate=1e-3,
        seed=5,
        device="cpu",
        runs_dir=str(tmp_path),
        run_name="r",
        tensorboard=False,
        progress=False,
        save_checkpoint=False,
        eval_samples=6,
        sample_every=1,
    )
    return TextTrainConfig.from_flat(**(base | kw))


def test_training_never_sees_held_out_prompts_and_the_before_score_is_the_initial_policys(tmp_path):
    summary = train_text(_config(tmp_path))
    held_out = set(make_task("Toy", split="test").prompts)
    trained_on = {
        json.loads(line)["prompt"]
        for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()
    }
    assert trained_on and not trained_on & held_out
    # The same evaluation of a fresh copy of the initial policy gives the logged "before" exactly.
    torch.manual_seed(5)
    envs = TextGenerationVectorEnv(
        num_envs=6, task="Toy", model="tiny", max_new_tokens=4, split="test"
    )
    policy = LMActorCritic(load_causal_lm("tiny")[0])
    before = evaluate_held_out(policy, envs, seed=5)
    assert summary["eval_score_before"] == before["score"]
    assert summary["eval_score_before_se"] == before["score_se"]
    assert before["kl"] == pytest.approx(0.0, abs=1e-5)  # policy = reference
    # The trained policy is no longer the reference (a k1 estimate over 6 responses may be of either sign).
    assert summary["eval_samples"] == 6 and abs(summary["eval_kl_after"]) > 1e-4


def test_without_evaluation_every_prompt_is_trained_on(tmp_path):
    summary = train_text(_config(tmp_path, eval_samples=0, iterations=3, num_envs=16))
    trained_on = {
        json.loads(line)["prompt"]
        for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()
    }
    assert trained_on & set(make_task("Toy", split="test").prompts)
    assert "eval_score_after" not in summary


def test_the_cli_prints_the_held_out_scores_before_the_summary(tmp_path, capsys):
    from textenv.agents.cli.train_text import main

    code = main(
        [
            "--task",
            "Toy",
            "--model",
            "tiny",
            "--iterations",
            "1",
            "--num-envs",
            "4",
            "--max-new-tokens",
            "3",
            "--eval-samples",
            "4",
            "--runs-dir",
            str(tmp_path),
            "--no-tensorboard",
            "--no-progress",
            "--no-save-checkpoint",
            "--device",
            "cpu",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "held-out prompts, 4 responses: mean score" in err and "KL to the reference" in err
    assert json.loads(out.strip().splitlines()[-1])["eval_samples"] == 4


def test_thread_flag_sets_torchs_threads_for_the_trainer_and_the_env(tmp_path):
    before = torch.get_num_threads()
    try:
        train_text(_config(tmp_path, torch_threads=2, eval_samples=0, iterations=1))
        assert torch.get_num_threads() == 2
        TextGenerationVectorEnv(num_envs=1, task="Toy", model="tiny", torch_threads=1)
        assert torch.get_num_threads() == 1
        TextGenerationVectorEnv(num_envs=1, task="Toy", model="tiny")  # None: left as it is
        assert torch.get_num_threads() == 1
        assert TextTrainConfig().lm.torch_threads == 1
        with pytest.raises(ValueError, match="torch_threads must be >= 0"):
            _config(tmp_path, torch_threads=-1).validate()
    finally:
        torch.set_num_threads(before)


def test_a_prompts_file_of_five_holds_out_its_fifth_and_one_eval_sample_is_enough(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("ab\nba\nabc\ncab\nheld out\n")
    summary = train_text(_config(tmp_path, prompts=str(prompts), eval_samples=1, num_envs=8))
    trained_on = {
        json.loads(line)["prompt"]
        for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()
    }
    assert trained_on <= {"ab", "ba", "abc", "cab"} and "held out" not in trained_on
    assert summary["eval_samples"] == 1 and summary["eval_score_after"] is not None


def test_samples_are_logged_at_the_first_iteration_and_every_sample_every(tmp_path):
    train_text(_config(tmp_path, eval_samples=0, iterations=7, sample_every=3, num_envs=4))
    rows = [
        json.loads(line) for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()
    ]
    assert sorted({r["iteration"] for r in rows}) == [1, 3, 6]


@pytest.mark.parametrize("num_envs", [1, 2])
def test_score_std_is_the_batchs_sample_std_and_zero_for_one_response(tmp_path, num_envs):
    import statistics

    from textenv.agents.ppo import PPOConfig

    ppo = PPOConfig(
        update_epochs=1,
        num_minibatches=1,
        vf_coef=0.1,
        ent_coef=0.0,
        max_grad_norm=1.0,
        norm_adv=False,
    )
    train_text(
        _config(
            tmp_path,
            eval_samples=0,
            iterations=2,
            num_envs=num_envs,
            sample_every=1,
            max_new_tokens=8,
            reward="tests.rank_rewards:mean_char_code",  # two responses rarely tie
            ppo=ppo,
        )
    )
    metrics = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    rows = [
        json.loads(line) for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()
    ]
    for m in metrics:
        scores = [r["score"] for r in rows if r["iteration"] == m["iteration"]]
        expected = statistics.stdev(scores) if num_envs > 1 else 0.0
        assert m["score_std"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    if num_envs > 1:
        assert any(m["score_std"] > 0 for m in metrics)  # the check above can tell std from 0


def test_progress_says_what_start_up_is_doing(tmp_path, capsys):
    train_text(_config(tmp_path, progress=True, iterations=1))
    err = capsys.readouterr().err
    for line in (
        "loading the reference model (tiny) ...",
        "loading the policy (tiny) ...",
        "sampling 6 responses on held-out prompts before training ...",
        "sampling 6 responses on held-out prompts after training ...",
    ):
        assert line in err


def test_held_out_kl_is_per_response_and_the_standard_error_is_std_over_root_n():
    # A policy that differs from the reference: the KL is the mean over responses of each
    # response's summed log-ratio, recomputed here from a rollout with the same seed.
    from textenv.agents.rollout_text import collect_rollout

    envs = TextGenerationVectorEnv(
        num_envs=6, task="Toy", model="tiny", max_new_tokens=4, split="test"
    )
    policy = LMActorCritic(load_causal_lm("tiny:1")[0])
    result = evaluate_held_out(policy, envs, seed=3)
    ro = collect_rollout(policy, envs, seed=3, generator=torch.Generator().manual_seed(3))
    per_response = ((ro.logprobs - ro.ref_logprobs) * ro.mask).sum(1).double()
    assert result["kl"] == pytest.approx(float(per_response.mean()), rel=1e-9)
    assert abs(result["kl"]) > 1e-3  # far from 0: summing over the wrong axis would show
    scores = ro.scores.double()
    assert result["score"] == pytest.approx(float(scores.mean()))
    assert result["score_se"] == pytest.approx(float(scores.std() / 6**0.5))
