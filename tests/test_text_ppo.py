"""PPO on language models through the text env: exact log-probs, exact KL shaping, learning."""

import numpy as np
import pytest
import torch

from textenv import TextGenerationEnv, TextGenerationVectorEnv
from textenv.agents.gae import gae
from textenv.agents.lm import LMActorCritic, sample_categorical
from textenv.agents.rollout_text import collect_rollout, shaped_rewards, token_advantages
from textenv.agents.text import KLConfig, LMConfig, LoggingConfig, TextTrainConfig, train_text
from textenv.models import char_tokenizer, load_causal_lm

ENV = dict(task="Toy", model="tiny", max_new_tokens=6, max_prompt_tokens=8, kl_coef=0.1)


def _policy(seed=1, temperature=1.0):
    lm, _ = load_causal_lm(f"tiny:{seed}")  # differs from the env's reference (tiny:0)
    policy = LMActorCritic(lm, temperature=temperature)
    torch.nn.init.normal_(policy.value_head.weight, std=0.1)
    return policy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_a_fresh_forward(temperature):
    envs = TextGenerationVectorEnv(num_envs=16, temperature=temperature, **ENV)
    policy = _policy(temperature=temperature)
    ro = collect_rollout(policy, envs, seed=0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logprob, entropy, values = policy.evaluate_responses(
            ro.input_ids, ro.attention_mask, ro.actions, ro.prompt_len
        )
    m = ro.mask.bool()
    assert m.sum() > 16 and (~m).any()  # some responses ended early (EOS), others ran on
    torch.testing.assert_close(logprob[m], ro.logprobs[m], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(values[m], ro.values[m], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy[m], ro.entropy[m], rtol=1e-4, atol=1e-4)


def test_sample_categorical_matches_the_distribution():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.25, 0.0, 0.25, 0.0, 0.25, 0.25]])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_categorical(probs, g) for _ in range(n)], dim=1)
    freq = torch.stack([torch.bincount(row, minlength=6).double() / n for row in draws])
    assert torch.all(freq[probs == 0] == 0)  # zero-probability tokens are never drawn
    # 4.5 standard errors of a frequency with p(1-p) <= 1/4
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=4.5 * 0.5 / n**0.5)


def test_shaped_rewards_sum_to_score_minus_beta_kl():
    envs = TextGenerationVectorEnv(num_envs=5, **ENV)
    ro = collect_rollout(_policy(), envs, seed=3, generator=torch.Generator().manual_seed(1))
    beta = envs.kl_coef
    rewards = shaped_rewards(ro, beta, kl_in_reward=True, missing_eos_penalty=None)
    expected = ro.scores - beta * ((ro.logprobs - ro.ref_logprobs) * ro.mask).sum(1)
    torch.testing.assert_close(rewards.sum(1), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(rewards[ro.mask == 0] == 0)
    # Per token, they are what the per-step env paid plus −β·log π (the design's identity).
    torch.testing.assert_close(
        rewards, (ro.env_rewards - beta * ro.logprobs) * ro.mask, rtol=1e-5, atol=1e-6
    )
    penalised = shaped_rewards(ro, beta, kl_in_reward=True, missing_eos_penalty=1.0)
    torch.testing.assert_close(penalised.sum(1), expected - ro.truncated_response.float())


def test_reference_pass_at_end_gives_the_same_rollout_and_shaped_rewards():
    rollouts = {}
    for mode in ("per_step", "at_end"):
        envs = TextGenerationVectorEnv(num_envs=16, reference_pass=mode, **ENV)
        rollouts[mode] = collect_rollout(
            _policy(), envs, seed=0, generator=torch.Generator().manual_seed(0)
        )
    step, end = rollouts["per_step"], rollouts["at_end"]
    assert torch.equal(step.actions, end.actions) and torch.equal(step.mask, end.mask)
    assert (~step.mask.bool()).any()  # some rows ended early: ragged ends are covered
    torch.testing.assert_close(end.ref_logprobs, step.ref_logprobs, rtol=1e-4, atol=1e-5)
    # The env pays the same return, the KL term all at the last token.
    torch.testing.assert_close(
        end.env_rewards.sum(1), step.env_rewards.sum(1), rtol=1e-4, atol=1e-5
    )
    last = step.mask.sum(1).long() - 1
    not_last = torch.arange(end.mask.shape[1]).unsqueeze(0) != last.unsqueeze(1)
    assert torch.all(end.env_rewards[not_last] == 0)
    beta = 0.1
    torch.testing.assert_close(
        shaped_rewards(end, beta, True, None),
        shaped_rewards(step, beta, True, None),
        rtol=1e-4,
        atol=1e-5,
    )


def test_vector_rollout_and_single_envs_give_the_same_advantages():
    n, seed = 4, 7
    envs = TextGenerationVectorEnv(num_envs=n, **ENV)
    ro = collect_rollout(_policy(), envs, seed=seed, generator=torch.Generator().manual_seed(2))
    adv, _ = token_advantages(ro, shaped_rewards(ro, envs.kl_coef, True, None), gamma=1.0, lam=0.95)
    for i in range(n):
        env = TextGenerationEnv(**ENV)
        env.reset(seed=seed + i)
        T = int(ro.mask[i].sum())
        rewards = []
        for t in range(T):
            _, r, term, _, info = env.step(int(ro.actions[i, t]))
            rewards.append(r - envs.kl_coef * ro.logprobs[i, t].item())
        assert term
        r = torch.tensor(rewards, dtype=torch.float32).unsqueeze(1)
        v = ro.values[i, :T].unsqueeze(1)
        ended = torch.zeros(T, 1)
        ended[-1] = 1
        single_adv, _ = gae(r, v, torch.zeros(1), ended, ended, 1.0, 0.95)
        torch.testing.assert_close(adv[i, :T], single_adv[:, 0], rtol=1e-4, atol=1e-4)


def test_toy_task_score_rises(tmp_path):
    config = TextTrainConfig(
        task="Toy",
        model="tiny",
        iterations=15,
        num_envs=32,
        learning_rate=3e-3,
        seed=1,
        kl=KLConfig(kl_coef=0.0),
        lm=LMConfig(device="cpu"),
        logging=LoggingConfig(
            runs_dir=str(tmp_path),
            tensorboard=False,
            progress=False,
            save_checkpoint=True,
            run_name="toy",
        ),
    )
    summary = train_text(config)
    assert summary["score_mean_first"] < 0.1
    assert summary["score_mean_last"] > 0.5, summary
    # The policy reloads with plain transformers.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "toy" / "policy")
    assert model.config.vocab_size == len(char_tokenizer())
    assert (tmp_path / "toy" / "policy" / "value_head.safetensors").is_file()
    assert (tmp_path / "toy" / "samples.jsonl").is_file()


def test_kl_in_loss_and_adaptive_kl_run(tmp_path):
    config = TextTrainConfig(
        task="Toy",
        model="tiny",
        iterations=3,
        num_envs=8,
        learning_rate=1e-3,
        kl=KLConfig(kl_coef=0.1, kl_target=1.0, kl_in_loss=True),
        lm=LMConfig(device="cpu"),
        logging=LoggingConfig(
            runs_dir=str(tmp_path),
            tensorboard=False,
            progress=False,
            save_checkpoint=False,
            run_name="kl",
        ),
    )
    summary = train_text(config)
    import json

    rows = [json.loads(l) for l in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["kl_coef"] == pytest.approx(0.1)
    assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # the controller moved β
    assert all(np.isfinite(r["extra_loss"]) for r in rows)
    assert summary["iterations"] == 3


def test_text_training_stops_on_sigterm_and_resumes(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    args = [
        sys.executable,
        "-m",
        "scripts.train_text",
        "--task",
        "Toy",
        "--model",
        "tiny",
        "--iterations",
        "500",
        "--num-envs",
        "8",
        "--learning-rate",
        "1e-3",
        "--device",
        "cpu",
        "--no-progress",
        "--no-tensorboard",
        "--torch-threads",
        "1",
        "--runs-dir",
        str(tmp_path),
        "--run-name",
        "t",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint written to" in err
    before = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = before[-1]["iteration"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.train_text",
            "--resume",
            str(tmp_path / "t"),
            "--iterations",
            str(last + 2),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    after = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert after[: len(before)] == before
    assert [r["iteration"] for r in after[len(before) :]] == [last + 1, last + 2]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (
        summary["iterations"] == last + 2 and summary["score_mean_first"] == before[0]["score_mean"]
    )
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.train_text",
            "--resume",
            str(tmp_path / "t"),
            "--task",
            "Sentiment",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "is a run of task Toy" in bad.stderr


def test_filter_logits_keeps_top_k_and_the_nucleus():
    from textenv.agents.lm import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # 0.5 < 0.7, 0.5 + 0.3 crosses 0.7: the nucleus is the first two tokens.
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits[:, [2, 0, 3, 1]], 0, 0.7)).tolist() == [
        [True, False, True, False]
    ]
    envs = TextGenerationVectorEnv(num_envs=8, **ENV)
    policy = _policy()
    policy.top_k = 3
    ro = collect_rollout(policy, envs, seed=0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = torch.log_softmax(
            policy._forward(
                ro.input_ids, ro.attention_mask, (ro.attention_mask.cumsum(-1) - 1).clamp_min(0)
            )[0],
            -1,
        )
    top3 = full[:, ro.prompt_len - 1 : -1].topk(3, dim=-1).indices
    m = ro.mask.bool()
    assert (
        (top3 == ro.actions.unsqueeze(-1)).any(-1)[m].all()
    )  # every sampled token was in the top 3


def test_lora_training_saves_a_merged_model_that_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    config = TextTrainConfig(
        task="Toy",
        model="tiny",
        iterations=2,
        num_envs=8,
        learning_rate=1e-2,
        reward="tests.rank_rewards:mean_char_code",  # responses rarely tie: the adapter moves
        lm=LMConfig(lora_r=4, device="cpu"),
        logging=LoggingConfig(
            runs_dir=str(tmp_path), tensorboard=False, progress=False, run_name="l"
        ),
    )
    train_text(config)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "l" / "policy")
    base, _ = load_causal_lm("tiny")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert not torch.allclose(
            merged(input_ids=ids).logits, base(input_ids=ids).logits
        )  # the adapter moved it
    assert (tmp_path / "l" / "policy" / "adapter" / "adapter_config.json").is_file()
    # Resuming restores the adapter exactly: the merged weights of a resumed run's policy match.
    from textenv.agents.text import load_text_run_config
    from textenv.agents.text_checkpoint import with_lora

    resumed = with_lora(load_causal_lm("tiny")[0], 4, 16, tmp_path / "l" / "policy" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(
            resumed(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    assert load_text_run_config(tmp_path / "l").lm.lora_r == 4


def test_gradient_checkpointing_gives_the_same_first_update(tmp_path):
    import json

    losses = []
    for gc in (False, True):
        config = TextTrainConfig(
            task="Toy",
            model="tiny",
            iterations=1,
            num_envs=8,
            learning_rate=1e-3,
            lm=LMConfig(gradient_checkpointing=gc, device="cpu"),
            logging=LoggingConfig(
                runs_dir=str(tmp_path),
                tensorboard=False,
                progress=False,
                save_checkpoint=False,
                run_name=f"gc{gc}",
            ),
        )
        train_text(config)
        row = json.loads((tmp_path / f"gc{gc}" / "metrics.jsonl").read_text().splitlines()[0])
        losses.append((row["policy_loss"], row["value_loss"], row["score_mean"]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4, atol=1e-6)


def _not_a_causal_lm(tmp_path):
    from transformers import DistilBertConfig

    DistilBertConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=8).save_pretrained(
        tmp_path / "clf"
    )
    return str(tmp_path / "clf")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "Nope"], "unknown task"),
        (["--model", "/no/such/model"], "does not exist"),
        (["--model", _not_a_causal_lm], "not a causal language model"),
        (["--reward", "no-such-reward"], "unknown reward"),
        (["--reward", "json:no_such_function"], "cannot import reward"),
        (["--reward", "math:sqrt"], "raised TypeError"),  # fails at the first scoring, named
        (["--learning-rate", "-1"], "learning_rate"),
        (["--gamma", "1.5"], "gamma"),
        (["--num-envs", "6", "--num-minibatches", "4"], "num_minibatches"),
        (["--clip-coef", "0"], "clip_coef"),
        (["--device", "cuda"], "cuda"),
        (["--resume", "RUNS_DIR"], "not a text run directory"),
    ],
)
def test_train_text_script_rejects_bad_input_in_one_line(tmp_path, capsys, args, message):
    from textenv.agents.cli.train_text import main

    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("a GPU is present")
    args = [a(tmp_path) if callable(a) else a.replace("RUNS_DIR", str(tmp_path)) for a in args]
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
            "--runs-dir",
            str(tmp_path / "runs"),
            "--no-progress",
            "--no-tensorboard",
            *args,
        ]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message.lower() in errors[0].lower(), errors


_FLAKY = {"calls": 0, "fail_after": None}


def _nan_later(prompts, responses):
    """Counts 'a's, and pays NaN once ``fail_after`` scoring calls have been made."""
    _FLAKY["calls"] += 1
    broken = _FLAKY["fail_after"] is not None and _FLAKY["calls"] > _FLAKY["fail_after"]
    return [float("nan") if broken else float(r.count("a")) for r in responses]


def test_nan_reward_mid_run_stops_with_the_last_good_state_saved_and_resumes(tmp_path):
    import json
    import re

    from textenv.rewards import RewardError, available, register

    if "test-nan-later" not in available():
        register("test-nan-later")(_nan_later)
    _FLAKY.update(calls=0, fail_after=8)  # a rollout scores at most max_new_tokens (6) times
    config = TextTrainConfig(
        task="Toy",
        model="tiny",
        reward="test-nan-later",
        iterations=8,
        num_envs=4,
        max_new_tokens=6,
        learning_rate=1e-3,
        lm=LMConfig(device="cpu"),
        logging=LoggingConfig(
            runs_dir=str(tmp_path),
            run_name="r",
            progress=False,
            tensorboard=False,
            checkpoint_every=0,
        ),
    )
    with pytest.raises(
        RewardError, match=r"returned nan .*last good state \(iteration \d+\) is saved in"
    ) as err:
        train_text(config)
    good = int(re.search(r"iteration (\d+)\)", str(err.value)).group(1))
    assert good >= 1
    metrics = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["iteration"] == good  # the failed iteration logged nothing

    _FLAKY.update(fail_after=None)
    summary = train_text(config, resume=tmp_path / "r")
    metrics = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["iteration"] for m in metrics] == list(range(1, 9)) and summary["iterations"] == 8


def test_training_stops_once_the_score_window_reaches_the_target(tmp_path):
    import json

    config = TextTrainConfig(
        task="Toy",
        model="tiny",
        iterations=10,
        num_envs=4,
        max_new_tokens=4,
        target_score=-1.0,
        target_window=3,
        lm=LMConfig(device="cpu"),
        logging=LoggingConfig(
            runs_dir=str(tmp_path), run_name="r", progress=False, tensorboard=False
        ),
    )
    summary = train_text(config)  # every score is >= 0 > -1: stop as soon as 3 iterations exist
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert summary["iterations"] == 3 and [json.loads(m)["iteration"] for m in metrics] == [1, 2, 3]
    assert (tmp_path / "r" / "policy" / "config.json").is_file()
