"""The text environments: single vs vector equivalence, Gymnasium/SB3 compatibility, rewards, bad input."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenv
from textenv import RewardError, TextGenerationEnv, TextGenerationVectorEnv, score_batch
from textenv.models import char_tokenizer, load_causal_lm, tiny_causal_lm

TINY = dict(task="Toy", model="tiny", max_new_tokens=6, max_prompt_tokens=8, kl_coef=0.1)


def _reference_logprobs(model, prompt_ids, response_ids):
    """log π_ref of each response token from one full forward over prompt + response, unpadded."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n = len(prompt_ids)
    return [logp[n - 1 + i, tok].item() for i, tok in enumerate(response_ids)]


def test_ref_logprob_matches_a_full_uncached_forward():
    env = TextGenerationEnv(**TINY)
    obs, info = env.reset(seed=3)
    prompt_ids = env.tokenizer(info["prompt"])["input_ids"][-8:]
    actions = [5, 9, 3, 3, 7, 4]  # no EOS (id 1): runs to the budget
    ref = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        ref.append(info["ref_logprob"])
    assert terminated and info["truncated_response"] and info["response_length"] == 6
    expected = _reference_logprobs(env.reference_model, prompt_ids, actions)
    np.testing.assert_allclose(ref, expected, rtol=1e-5, atol=1e-5)


def test_rewards_sum_to_score_plus_beta_ref_logprobs():
    env = TextGenerationEnv(**TINY)
    env.reset(seed=0)
    total, ref_sum = 0.0, 0.0
    for a in [3, 3, 4, 1]:  # ends with EOS at the 4th token
        _, reward, terminated, _, info = env.step(a)
        total += reward
        ref_sum += info["ref_logprob"]
    assert terminated and not info["truncated_response"]
    assert info["response_text"] == "aab"  # EOS is not part of the text
    assert info["score"] == pytest.approx(2 / 3)
    assert total == pytest.approx(info["score"] + 0.1 * ref_sum, rel=1e-6)


def test_reference_pass_at_end_pays_the_same_return_at_the_last_step():
    actions = [3, 3, 4, 1]  # ends with EOS at the 4th token
    env = TextGenerationEnv(**TINY)
    env.reset(seed=0)
    steps = [env.step(a) for a in actions]
    at_end = TextGenerationEnv(reference_pass="at_end", **TINY)
    at_end.reset(seed=0)
    ends = [at_end.step(a) for a in actions]
    assert [r for _, r, *_ in ends[:-1]] == [0.0, 0.0, 0.0] and "ref_logprob" not in ends[0][-1]
    per_token = [info["ref_logprob"] for *_, info in steps]
    np.testing.assert_allclose(ends[-1][-1]["ref_logprobs"], per_token, rtol=1e-5, atol=1e-6)
    assert ends[-1][1] == pytest.approx(sum(r for _, r, *_ in steps), rel=1e-5)
    assert ends[-1][-1]["score"] == steps[-1][-1]["score"]
    with pytest.raises(ValueError, match="reference_pass must be one of"):
        TextGenerationEnv(reference_pass="later", **TINY)


def test_vector_env_matches_single_envs_token_for_token():
    n, seed = 5, 11
    envs = TextGenerationVectorEnv(num_envs=n, **TINY)
    singles = [TextGenerationEnv(**TINY) for _ in range(n)]
    rng = np.random.default_rng(0)
    vobs, vinfo = envs.reset(seed=seed)
    sobs = [env.reset(seed=seed + i) for i, env in enumerate(singles)]
    assert list(vinfo["prompt"]) == [info["prompt"] for _, info in sobs]
    for i, (o, _) in enumerate(sobs):
        for key in ("input_ids", "attention_mask"):
            np.testing.assert_array_equal(vobs[key][i].numpy(), o[key])
    alive, ended_at = [True] * n, []
    for t in range(TINY["max_new_tokens"]):
        actions = rng.integers(2, 12, size=n)  # no EOS (id 1) except where planned below
        actions[0] = 1 if t == 1 else actions[0]  # row 0 ends after 2 tokens, row 2 after 4
        actions[2] = 1 if t == 3 else actions[2]
        vobs, vrew, vterm, vtrunc, vinfo = envs.step(torch.as_tensor(actions))
        for i, env in enumerate(singles):
            if not alive[i]:
                assert vrew[i].item() == 0.0 and not vterm[i]
                continue
            o, r, term, trunc, info = env.step(actions[i])
            for key in ("input_ids", "attention_mask"):
                np.testing.assert_array_equal(vobs[key][i].numpy(), o[key])
            assert vrew[i].item() == pytest.approx(r, abs=1e-5)
            assert vinfo["ref_logprob"][i].item() == pytest.approx(info["ref_logprob"], abs=1e-5)
            assert bool(vterm[i]) == term and not trunc and not vtrunc[i]
            if term:
                assert vinfo["_score"][i] and vinfo["score"][i].item() == pytest.approx(
                    info["score"]
                )
                assert vinfo["response_text"][i] == info["response_text"]
                assert bool(vinfo["truncated_response"][i]) == info["truncated_response"]
                assert int(vinfo["response_length"][i]) == info["response_length"] == t + 1
                alive[i] = False
                ended_at.append(t + 1)
        if not any(alive):
            break
    assert not any(alive)
    assert len(set(ended_at)) > 1  # rows ended at different steps: ragged ends are covered


def test_vector_env_keeps_tensors_on_device_and_kl_coef_is_settable():
    envs = gym.make_vec("textenv/Toy-v0", num_envs=3, model="tiny", max_new_tokens=4, kl_coef=0.0)
    assert isinstance(envs, TextGenerationVectorEnv)
    obs, _ = envs.reset(seed=0)
    _, r0, *_ = envs.step(torch.tensor([5, 5, 5]))
    assert isinstance(r0, torch.Tensor) and torch.all(r0 == 0)
    envs.set_attr("kl_coef", 0.5)
    _, r1, _, _, info = envs.step(torch.tensor([5, 5, 5]))
    torch.testing.assert_close(r1, 0.5 * info["ref_logprob"])


def test_gymnasium_env_checker_passes():
    from gymnasium.utils.env_checker import check_env

    env = gym.make("textenv/Toy-v0", model="tiny", max_new_tokens=4, render_mode="ansi")
    check_env(env.unwrapped, skip_render_check=False)


def test_sb3_env_checker_and_ppo_run():
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_checker import check_env

    env = TextGenerationEnv(**TINY)
    check_env(env, warn=False)
    model = PPO(
        "MultiInputPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu"
    )
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256


def test_registered_tasks_build_and_document_themselves():
    for name in ("Sentiment", "Arithmetic", "Toy", "RewardModel"):
        spec = gym.spec(f"textenv/{name}-v0")
        assert spec.vector_entry_point is not None
        doc = textenv.TASKS[name].__doc__
        for section in (
            "## Description",
            "## Action Space",
            "## Observation Space",
            "## Rewards",
            "## Starting State",
            "## Episode End",
            "## Arguments",
        ):
            assert section in doc, (name, section)
    env = gym.make("textenv/Arithmetic-v0", model="tiny", max_prompt_tokens=64)
    _, info = env.reset(seed=0)
    task = env.unwrapped.task
    answer = task.answers[info["prompt"]]
    reward_fn = task.build_reward()
    assert reward_fn([info["prompt"]] * 2, [f" {answer} apples", " 99999"]) == [1.0, 0.0]


def test_custom_reward_object_and_registered_name():
    @textenv.register("test_len_chars")
    def length_chars(prompts, responses):
        return [len(r) / 10 for r in responses]

    for reward in (length_chars, "test_len_chars"):
        env = TextGenerationEnv(reward=reward, **TINY)
        env.reset(seed=0)
        for a in [3, 4, 1]:
            _, r, term, _, info = env.step(a)
        assert info["score"] == pytest.approx(0.2)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda p, r: 1 / 0, "raised ZeroDivisionError"),
        (lambda p, r: [1.0] * (len(r) + 1), "returned 2 scores for 1"),
        (lambda p, r: [float("nan")], "returned nan for item 0"),
        (lambda p, r: [float("inf")], "returned inf for item 0"),
        (lambda p, r: ["x"], "returned str 'x' for item 0; scores must be numbers"),
        (lambda p, r: ["1.0"], "returned str '1.0' for item 0"),  # float("1.0") would pass silently
        (lambda p, r: [True], "returned bool True for item 0"),
        (lambda p, r: np.array([True]), r"returned bool (np\.True_|True) for item 0"),
        (lambda p, r: torch.tensor([True]), "returned Tensor tensor\\(\\[?True"),
        (lambda p, r: "1", "got a string '1'"),
        (lambda p, r: None, "sequence of floats"),
    ],
)
def test_bad_reward_fails_with_a_clear_error(bad, match):
    with pytest.raises(RewardError, match=match):
        score_batch(bad, ["p"], ["r"])
    env = TextGenerationEnv(reward=bad, **TINY)
    env.reset(seed=0)
    with pytest.raises(RewardError, match="reward '<lambda>'"):
        env.step(1)


def test_bad_input_errors():
    env = TextGenerationEnv(**TINY)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside Discrete"):
        env.step(10_000)
    env.step(1)  # EOS ends the episode
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(3)
    with pytest.raises(ValueError, match="prompt set is empty"):
        TextGenerationEnv(task="Toy", model="tiny", prompts=[])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        TextGenerationEnv(task="Toy", model="tiny", max_prompt_tokens=250, max_new_tokens=10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextGenerationEnv(task="Toy", model="./no/such/model")
    with pytest.raises(ValueError, match="unknown task"):
        TextGenerationEnv(task="Nope", model="tiny")
    with pytest.raises(
        ValueError, match="task Calculator is a multi-turn task: use textenv.multiturn"
    ):
        TextGenerationEnv(task="Calculator", model="tiny")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            TextGenerationEnv(device="cuda", **TINY)


def test_long_prompts_are_left_truncated():
    env = TextGenerationEnv(**TINY)
    with pytest.warns(UserWarning, match="1 of 1 prompts is longer than max_prompt_tokens=8"):
        obs, _ = env.reset(options={"prompt": "abcdefghijklmnop"})
    kept = env.tokenizer.decode(obs["input_ids"][:8][obs["attention_mask"][:8] == 1])
    assert kept == "ijklmnop"


def test_cut_prompts_are_counted_in_one_warning_per_reset_and_prompts_that_fit_warn_nothing():
    import warnings

    envs = TextGenerationVectorEnv(num_envs=4, **TINY)
    prompts = ["ab" * 6, "ab", "ab" * 6 + "a", "abab"]  # 12, 2, 13 and 4 tokens in 8 slots
    with pytest.warns(UserWarning) as record:
        obs, _ = envs.reset(options={"prompts": prompts})
    assert [str(w.message) for w in record] == [
        "2 of 4 prompts are longer than max_prompt_tokens=8 (longest 13 tokens): "
        "their first tokens were cut"
    ]
    kept = obs["input_ids"][2, :8][obs["attention_mask"][2, :8] == 1].tolist()
    assert envs.tokenizer.decode(kept) == "babababa"  # the last 8 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        envs.reset(options={"prompts": ["ab", "abababab", "a", "b"]})  # 8 tokens fit 8 slots


def test_tokenizer_without_pad_token_pads_with_eos():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok)
    tok.pad_token = None
    env = TextGenerationEnv(task="Toy", model=model, tokenizer=tok, max_new_tokens=3)
    obs, _ = env.reset(seed=0)
    assert tok.pad_token_id == tok.eos_token_id
    assert obs["input_ids"][0] == tok.eos_token_id and obs["attention_mask"][0] == 0


def test_load_causal_lm_rejects_what_is_not_a_causal_lm(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(str(tmp_path))
    from transformers import DistilBertConfig  # an encoder: no causal-LM head exists for it

    DistilBertConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=8).save_pretrained(
        tmp_path / "clf"
    )
    with pytest.raises(ValueError, match="not a causal language model"):
        load_causal_lm(str(tmp_path / "clf"))


_REMOTE_CONFIG = """
import os
from pathlib import Path
from transformers import LlamaConfig
Path(os.environ["TEXTENV_REMOTE_CODE_MARKER"]).write_text("ran")
class RemoteConfig(LlamaConfig):
    model_type = "textenv-remote-llama"
"""
_REMOTE_MODEL = """
from transformers import LlamaForCausalLM
from .configuration_remote import RemoteConfig
class RemoteLM(LlamaForCausalLM):
    config_class = RemoteConfig
"""


def test_model_code_from_a_model_directory_runs_only_when_trusted(tmp_path, monkeypatch):
    tok = char_tokenizer()
    path = tmp_path / "remote"
    tiny_causal_lm(tok, seed=2).save_pretrained(path)
    tok.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config |= {
        "model_type": "textenv-remote-llama",
        "architectures": ["RemoteLM"],
        "auto_map": {
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteLM",
        },
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "configuration_remote.py").write_text(_REMOTE_CONFIG)
    (path / "modeling_remote.py").write_text(_REMOTE_MODEL)
    marker = tmp_path / "marker"
    monkeypatch.setenv("TEXTENV_REMOTE_CODE_MARKER", str(marker))

    with pytest.raises(ValueError, match="needs its own Python code.*trust_remote_code=True"):
        load_causal_lm(str(path))
    assert not marker.exists()  # refused before any of the directory's code ran

    model, _ = load_causal_lm(str(path), trust_remote_code=True)
    assert marker.read_text() == "ran" and type(model).__name__ == "RemoteLM"


def test_load_causal_lm_loads_a_saved_model_with_from_pretrained(tmp_path):
    tok = char_tokenizer()
    tiny_causal_lm(tok, seed=4).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok2 = load_causal_lm(str(tmp_path / "m"))
    ids = torch.tensor([tok("hello")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, tiny_causal_lm(tok, seed=4)(input_ids=ids).logits
        )
    assert tok2.decode(ids[0]) == "hello"


def tiny_reward_model(path) -> str:
    """A one-layer Llama sequence classifier (one scalar head) on the char tokenizer, saved at ``path``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_reward_model_task_scores_with_a_sequence_classifier(tmp_path):
    from transformers import LlamaForSequenceClassification

    from textenv.rewards import ClassifierReward

    tok = char_tokenizer()
    rm = ClassifierReward(tiny_reward_model(tmp_path / "rm"))
    direct = rm(["hi "], ["there"])
    ref = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([tok("hi there")["input_ids"]])).logits[0, 0].item()
    assert direct[0] == pytest.approx(expected, rel=1e-5)
    env = gym.make(
        "textenv/RewardModel-v0",
        model="tiny",
        reward_model=str(tmp_path / "rm"),
        max_new_tokens=3,
        max_prompt_tokens=64,
    )
    _, info = env.reset(seed=0)
    for a in (5, 6, 7):
        _, _, term, _, step_info = env.step(a)
    assert term
    assert step_info["score"] == pytest.approx(
        rm([info["prompt"]], [step_info["response_text"]])[0], rel=1e-5
    )
    with pytest.raises(ValueError, match="needs reward_model"):
        gym.make("textenv/RewardModel-v0", model="tiny")


def test_reward_model_follows_the_env_dtype_unless_given_its_own(tmp_path):
    from textenv.rewards import ClassifierReward

    fp32 = ClassifierReward(tiny_reward_model(tmp_path / "rm"))
    assert fp32.model.dtype == torch.float32
    env = gym.make(
        "textenv/RewardModel-v0",
        model="tiny",
        reward_model=str(tmp_path / "rm"),
        dtype=torch.bfloat16,
        max_new_tokens=2,
        max_prompt_tokens=64,
    ).unwrapped
    followed = env.reward_fn
    assert (
        followed.model.dtype == torch.bfloat16 == env.reference_model.dtype
    )  # beside the reference
    # bf16 scores are the fp32 ones to bf16 precision.
    assert followed(["hi "], ["there"])[0] == pytest.approx(fp32(["hi "], ["there"])[0], abs=0.05)
    own = ClassifierReward(str(tmp_path / "rm"), dtype=torch.float32)
    env = gym.make(
        "textenv/RewardModel-v0",
        model="tiny",
        reward=own,
        dtype=torch.bfloat16,
        max_new_tokens=2,
        max_prompt_tokens=64,
    ).unwrapped
    assert env.reward_fn is own and own.model.dtype == torch.float32  # an explicit choice stands


def test_sentiment_task_scores_with_vader_or_a_named_classifier(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    env = TextGenerationEnv(task="Sentiment", model="tiny", max_prompt_tokens=64, max_new_tokens=2)
    assert env.task.build_reward()([""], ["what a wonderful, lovely day"])[0] > 0.5
    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=tok.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(config)
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    env = gym.make(
        "textenv/Sentiment-v0", model="tiny", classifier=str(tmp_path / "clf"), max_prompt_tokens=64
    )
    reward = env.unwrapped.task.build_reward()
    with torch.no_grad():
        expected = (
            clf(input_ids=torch.tensor([tok("good")["input_ids"]])).logits.softmax(-1)[0, 1].item()
        )
    assert reward(["ignored prompt "], ["good"])[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("reference_pass", ["per_step", "at_end"])
def test_vector_env_returns_ordinary_tensors_a_user_can_modify_and_differentiate_through(
    reference_pass,
):
    # Inference-mode tensors refuse in-place updates and autograd outside inference mode.
    envs = TextGenerationVectorEnv(
        num_envs=4, task="Toy", model="tiny", max_new_tokens=3, reference_pass=reference_pass
    )
    envs.reset(seed=0)
    seen = set()
    while not envs.all_done:
        _, reward, terminated, truncated, info = envs.step(torch.full((4,), 5))
        weight = torch.ones(4, requires_grad=True)
        for name, x in [
            ("reward", reward),
            *((k, info[k]) for k in ("ref_logprob", "ref_logprobs", "score") if k in info),
        ]:
            assert not x.is_inference(), name
            x.add_(1)
            (x.float().sum() * weight.sum()).backward()
            seen.add(name)
        assert not terminated.is_inference() and not truncated.is_inference()
        terminated |= truncated
    assert {"reward", "score"} <= seen


def _numpy_vec(num_envs=4):
    return gym.make_vec(
        "textenv/Toy-v0",
        num_envs=num_envs,
        model="tiny",
        max_new_tokens=4,
        kl_coef=0.1,
        reference_pass="per_step",
        arrays="numpy",
    )


def _random_episode(envs, seed=0):
    """Step random tokens (EOS included) until every row ended; return the per-step outputs."""
    rng = np.random.default_rng(seed)
    envs.reset(seed=seed)
    steps = []
    while not envs.unwrapped.all_done:
        actions = rng.integers(0, envs.unwrapped.single_action_space.n, size=envs.num_envs)
        steps.append(envs.step(actions))
    return steps


def test_numpy_arrays_mode_returns_numpy_and_matches_the_torch_mode():
    raw = _random_episode(_numpy_vec())
    obs, reward, terminated, truncated, info = raw[-1]
    assert isinstance(obs["input_ids"], np.ndarray) and obs["input_ids"].dtype == np.int64
    assert (
        reward.dtype == np.float32 and terminated.dtype == np.bool_ and truncated.dtype == np.bool_
    )
    assert isinstance(info["score"], np.ndarray) and info["_score"].dtype == np.bool_
    torch_envs = gym.make_vec(
        "textenv/Toy-v0",
        num_envs=4,
        model="tiny",
        max_new_tokens=4,
        kl_coef=0.1,
        reference_pass="per_step",
    )
    for (o_np, r_np, t_np, _, _), (o_t, r_t, t_t, _, _) in zip(raw, _random_episode(torch_envs)):
        np.testing.assert_array_equal(o_np["input_ids"], o_t["input_ids"].numpy())
        np.testing.assert_array_equal(r_np, r_t.numpy())
        np.testing.assert_array_equal(t_np, t_t.numpy())
    with pytest.raises(ValueError, match="arrays must be 'torch' or 'numpy'"):
        TextGenerationVectorEnv(num_envs=2, arrays="jax")


def test_gymnasiums_vector_wrappers_work_on_the_numpy_mode():
    from gymnasium.wrappers import vector as vw

    raw = _random_episode(_numpy_vec())
    rewards = np.stack([s[1] for s in raw])  # [steps, rows]
    ended = np.stack([s[2] for s in raw])
    assert ended.sum(0).tolist() == [1, 1, 1, 1]  # terminated once per row, on the step it ends
    lengths = ended.argmax(0) + 1

    # RecordEpisodeStatistics: each row's return and length, reported on the step it ends.
    stats = _random_episode(vw.RecordEpisodeStatistics(_numpy_vec()))
    for row in range(4):
        step = lengths[row] - 1
        episode = stats[step][4]["episode"]
        assert stats[step][4]["_episode"][row]
        assert episode["l"][row] == lengths[row]
        assert episode["r"][row] == pytest.approx(rewards[: lengths[row], row].sum(), abs=1e-5)

    # ClipReward: the same rewards, clipped.
    clipped = _random_episode(vw.ClipReward(_numpy_vec(), -0.35, 0.0))
    np.testing.assert_allclose(
        np.stack([s[1] for s in clipped]), np.clip(rewards, -0.35, 0.0), rtol=1e-6
    )
    assert (rewards < -0.35).any()  # the clip did something

    # NormalizeReward: each reward divided by the running std of the discounted return.
    normalizer = vw.NormalizeReward(_numpy_vec(), gamma=0.9)
    normalized = []
    rng = np.random.default_rng(0)
    normalizer.reset(seed=0)
    while not normalizer.unwrapped.all_done:
        normalized.append(
            normalizer.step(rng.integers(0, normalizer.unwrapped.single_action_space.n, size=4))[1]
        )
        stds = np.sqrt(normalizer.return_rms.var + normalizer.epsilon)
        np.testing.assert_allclose(normalized[-1], rewards[len(normalized) - 1] / stds, rtol=1e-5)

    # DictInfoToList: one dict per row, the end-of-episode keys only in rows that ended.
    listed = _random_episode(vw.DictInfoToList(_numpy_vec()))
    for step, (_, _, term, _, infos) in enumerate(listed):
        assert isinstance(infos, list) and len(infos) == 4
        for row, info in enumerate(infos):
            assert ("score" in info) == bool(term[row])
            if term[row]:
                assert isinstance(info["response_text"], str)


def _run_rows(envs, actions, until_all_done=True):
    """Step fixed per-row actions; return per-row reward sums and response texts of episodes that end."""
    totals, texts = np.zeros(envs.num_envs), [None] * envs.num_envs
    while not envs.all_done:
        _, reward, terminated, _, info = envs.step(torch.tensor(actions))
        totals += reward.numpy()
        for i in np.flatnonzero(terminated.numpy()):
            texts[i] = info["response_text"][i]
    return totals, texts


def test_a_partial_reset_restarts_only_its_rows_and_their_episodes_equal_fresh_ones():
    kw = dict(task="Toy", model="tiny", max_new_tokens=5, kl_coef=0.1, reference_pass="at_end")
    actions = [5, 6, 7]
    envs = TextGenerationVectorEnv(num_envs=3, **kw)
    envs.reset(seed=0, options={"prompts": ["abc", "b", "hello"]})
    envs.step(torch.tensor(actions))
    before = envs.step(torch.tensor(actions))[0]["input_ids"]
    obs, info = envs.reset(
        options={"reset_mask": np.array([False, True, False]), "prompts": [None, "say a", None]}
    )
    assert list(info["prompt"]) == ["abc", "say a", "hello"]
    assert envs._gen.response_length.tolist() == [2, 0, 2]
    P = envs.max_prompt_tokens
    assert obs["attention_mask"][:, P:].sum(1).tolist() == [
        2,
        0,
        2,
    ]  # row 1's response is gone, the others stay
    assert torch.equal(obs["input_ids"][[0, 2]], before[[0, 2]]) and not torch.equal(
        obs["input_ids"][1], before[1]
    )
    totals, texts = _run_rows(envs, actions)

    uninterrupted = TextGenerationVectorEnv(num_envs=3, **kw)
    uninterrupted.reset(seed=0, options={"prompts": ["abc", "b", "hello"]})
    ref_totals, ref_texts = _run_rows(uninterrupted, actions)
    np.testing.assert_allclose(totals[[0, 2]], ref_totals[[0, 2]], rtol=1e-5, atol=1e-5)
    assert [texts[0], texts[2]] == [ref_texts[0], ref_texts[2]]

    fresh = TextGenerationVectorEnv(num_envs=1, **kw)
    fresh.reset(seed=0, options={"prompts": ["say a"]})
    fresh_total, fresh_text = _run_rows(fresh, [6])
    np.testing.assert_allclose(totals[1], fresh_total[0], rtol=1e-5, atol=1e-5)
    assert texts[1] == fresh_text[0]


def test_partial_resets_with_record_episode_statistics_count_every_episode():
    from gymnasium.wrappers.vector import RecordEpisodeStatistics

    envs = RecordEpisodeStatistics(
        TextGenerationVectorEnv(
            num_envs=4,
            task="Toy",
            model="tiny",
            max_new_tokens=3,
            reference_pass="at_end",
            kl_coef=0.1,
            arrays="numpy",
        )
    )
    rng = np.random.default_rng(0)
    envs.reset(seed=0)
    ended = 0
    for _ in range(
        20
    ):  # rows end at different steps and restart at once: Gymnasium's DISABLED autoreset loop
        _, reward, terminated, truncated, info = envs.step(
            rng.integers(0, envs.single_action_space.n, size=4)
        )
        done = terminated | truncated
        ended += int(done.sum())
        if done.any():
            np.testing.assert_array_equal(info["_episode"], done)
            envs.reset(options={"reset_mask": done})
    assert envs.episode_count == ended > 20


def test_partial_resets_are_refused_clearly_where_they_cannot_work():
    envs = TextGenerationVectorEnv(
        num_envs=2, task="Toy", model="tiny", max_new_tokens=3, reference_pass="per_step"
    )
    envs.reset(seed=0)
    with pytest.raises(NotImplementedError, match="need reference_pass='at_end'"):
        envs.reset(options={"reset_mask": np.array([True, False])})
    envs = TextGenerationVectorEnv(
        num_envs=2, task="Toy", model="tiny", max_new_tokens=3, reference_pass="at_end"
    )
    envs.reset(seed=0)
    with pytest.raises(ValueError, match="must be 2 booleans"):
        envs.reset(options={"reset_mask": np.array([1, 0])})
    with pytest.raises(ValueError, match="selects no row"):
        envs.reset(options={"reset_mask": np.array([False, False])})


# -- the generation core's own checks, the frozen reference, the spaces ------------------------------


def test_the_core_refuses_what_cannot_work_with_a_one_line_error():
    tok = char_tokenizer()
    no_eos = char_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no EOS token"):
        TextGenerationEnv(task="Toy", model=tiny_causal_lm(tok), tokenizer=no_eos)
    with pytest.raises(ValueError, match="pass the tokenizer of the model object you give"):
        TextGenerationEnv(task="Toy", model=tiny_causal_lm(tok))
    env = TextGenerationVectorEnv(num_envs=2, task="Toy", model="tiny", reference_pass="at_end")
    gen = env.unwrapped._gen
    with pytest.raises(RuntimeError, match="the first reset\\(\\) must reset every row"):
        gen.reset_rows([0], ["hi"])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.reset(["hi", ""])
    gen.reset(["hi", "yo"])
    with pytest.raises(ValueError, match=r"expected 2 actions, got shape \(3,\)"):
        gen.step(torch.tensor([3, 3, 3]))


def test_the_reference_is_frozen_in_eval_mode_without_dropout_and_the_spaces_are_the_vocabulary(
    tmp_path,
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_text_trust import _tiny_gpt2_dir

    path = _tiny_gpt2_dir(tmp_path, dropout=0.1)
    model = AutoModelForCausalLM.from_pretrained(path).train()
    env = TextGenerationEnv(task="Toy", model=model, tokenizer=AutoTokenizer.from_pretrained(path))
    ref = env.unwrapped.reference_model
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(m.p == 0 for m in ref.modules() if isinstance(m, torch.nn.Dropout))
    vocab = env.action_space.n
    assert env.observation_space["input_ids"].high.max() == vocab - 1
    assert env.observation_space["attention_mask"].high.max() == 1


def test_a_reward_given_to_the_env_becomes_the_tasks_reward():
    def mine(prompts, responses):
        return [0.5] * len(responses)

    env = TextGenerationEnv(task="Toy", model="tiny", reward=mine, render_mode="ansi")
    assert env.unwrapped.task.reward is mine
    _, info = env.reset(seed=0)
    env.step(3)
    assert env.render() == info["prompt"] + "a"


def test_env_construction_errors_and_defaults():
    from gymnasium.vector import AutoresetMode
    from gymnasium.vector.utils import batch_space

    with pytest.raises(ValueError, match=r"render_mode must be one of \['ansi'\], got 'human'"):
        TextGenerationEnv(task="Toy", model="tiny", render_mode="human")
    with pytest.raises(ValueError, match=r"render_mode must be one of \['ansi'\], got 'human'"):
        TextGenerationVectorEnv(num_envs=2, task="Toy", model="tiny", render_mode="human")
    with pytest.raises(ValueError, match="num_envs must be >= 1, got 0"):
        TextGenerationVectorEnv(num_envs=0, task="Toy", model="tiny")
    env = TextGenerationVectorEnv(num_envs=1, task="Toy", model="tiny", render_mode="ansi")
    assert env.metadata["autoreset_mode"] == AutoresetMode.DISABLED and env.render_mode == "ansi"
    assert env.observation_space == batch_space(env.single_observation_space, 1)
    assert env.action_space == gym.spaces.MultiDiscrete([env.single_action_space.n])
    _, info = env.reset()  # unseeded
    env.step(torch.tensor([3]))
    assert env.render() == [info["prompt"][0] + "a"]
    quiet = TextGenerationVectorEnv(task="Toy", model="tiny")
    assert (
        quiet.num_envs == 8
        and quiet.render_mode is None
        and TextGenerationEnv(task="Toy", model="tiny").render() is None
    )
    quiet.reset(seed=0)
    assert quiet.render() is None


def test_vector_attributes_are_one_value_for_the_batch():
    env = TextGenerationVectorEnv(num_envs=2, task="Toy", model="tiny")
    env.set_attr("kl_coef", [0.3, 0.3])
    assert env.get_attr("kl_coef") == (0.3, 0.3)
    with pytest.raises(ValueError, match="kl_coef must be the same for every sub-env"):
        env.set_attr("kl_coef", [0.1, 0.2])
    with pytest.raises(
        AttributeError, match="TextGenerationVectorEnv has no settable attribute 'reward_fn'"
    ):
        env.set_attr("reward_fn", [None, None])
    with pytest.raises(ValueError, match="kl_coef must be >= 0, got -1"):
        env.kl_coef = -1


def test_vector_reset_options_are_checked():
    env = TextGenerationVectorEnv(num_envs=4, task="Toy", model="tiny", reference_pass="at_end")
    for group in (0, 3):
        with pytest.raises(ValueError, match=rf"must be >= 1 and divide num_envs=4, got {group}"):
            env.reset(seed=0, options={"group_size": group})
    for options in (
        {"prompts": ["a"] * 4},
        {"prompt": "a"},
        {"reset_mask": np.array([True, False, True, False])},
    ):
        with pytest.raises(
            ValueError, match="cannot be combined with 'prompts', 'prompt' or 'reset_mask'"
        ):
            env.reset(seed=0, options={"group_size": 2, **options})
    with pytest.raises(ValueError, match=r"options\['prompts'\] needs 4 prompts, got 3"):
        env.reset(options={"prompts": ["a", "b", "c"]})
    _, info = env.reset(options={"prompt": "same"})
    assert info["prompt"].tolist() == ["same"] * 4
    _, info = env.reset(seed=0, options={"group_size": 2})
    prompts = info["prompt"].tolist()
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3]
    env.reset(options={"prompt": "a"})
    for _ in range(env.max_new_tokens):
        env.step(torch.full((4,), env.unwrapped._gen.eos_id))
        if env.all_done:
            break
    with pytest.raises(
        RuntimeError, match="after every episode in the batch ended; call reset\\(\\) first"
    ):
        env.step(torch.full((4,), 3))


# -- the reference pass against a slow reference, on a model with absolute positions ---------------


def _gpt2_vector_env(tmp_path, num_envs, reference_pass):
    """GPT-2 reads absolute positions: a padding column counted as a position, or a prompt token
    cut from the reference's window, changes its log-probs (RoPE models shift-invariantly hide both)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_text_trust import _tiny_gpt2_dir

    path = _tiny_gpt2_dir(tmp_path, dropout=0.0)
    return TextGenerationVectorEnv(
        num_envs=num_envs,
        task="Toy",
        model=AutoModelForCausalLM.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
        reference_pass=reference_pass,
        max_prompt_tokens=8,
        max_new_tokens=5,
        kl_coef=0.1,
    )


def _play(envs, plan, held=None):
    """Step ``plan`` (rows of per-row actions) until every row has ended; return each row's
    response tokens (after ``held``, those it already has), the env's log π_ref of them (per
    step, or at the end), the rewards paid and the scores."""
    n = envs.num_envs
    tokens, ref = (
        [list(h) for h in held] if held else [[] for _ in range(n)],
        [[] for _ in range(n)],
    )
    paid, scores = np.zeros(n), np.full(n, np.nan)
    active = [not bool(d) for d in envs.unwrapped._gen.done]
    for actions in plan:
        _, reward, terminated, _, info = envs.step(torch.tensor(actions))
        paid += reward.numpy()
        for i in range(n):
            if not active[i]:
                continue
            tokens[i].append(actions[i])
            if "ref_logprob" in info:
                ref[i].append(info["ref_logprob"][i].item())
            if terminated[i]:
                active[i] = False
                scores[i] = info["score"][i].item()
                if "ref_logprobs" in info:
                    ref[i] = info["ref_logprobs"][i, : len(tokens[i])].tolist()
                    assert not info["ref_logprobs"][i, len(tokens[i]) :].any()  # 0 past the end
        if envs.all_done:
            break
    assert envs.all_done
    return tokens, ref, paid, scores


def _check_against_slow_reference(envs, prompts, tokens, ref, paid, scores):
    """Each row's log π_ref equals an unpadded forward's, and its return is score + β Σ log π_ref."""
    for i, prompt in enumerate(prompts):
        prompt_ids = envs.tokenizer(prompt)["input_ids"][-envs.max_prompt_tokens :]
        slow = _reference_logprobs(envs.reference_model, prompt_ids, tokens[i])
        np.testing.assert_allclose(ref[i], slow, rtol=1e-5, atol=1e-5, err_msg=f"row {i}")
        assert paid[i] == pytest.approx(scores[i] + envs.kl_coef * sum(slow), abs=1e-5), f"row {i}"


@pytest.mark.parametrize("reference_pass", ["per_step", "at_end"])
def test_left_padded_prompts_of_any_width_score_as_unpadded_ones_episode_after_episode(
    tmp_path, reference_pass
):
    envs = _gpt2_vector_env(tmp_path, 3, reference_pass)
    EOS = envs.unwrapped._gen.eos_id
    # Short prompts first, then longer ones: the second episode's window must widen again.
    for prompts in (["ab", "b", "c"], ["a", "hello wo", "abc"]):
        envs.reset(options={"prompts": prompts})
        plan = [
            [3, 4, 5],
            [EOS, 6, 7],
            [0, 8, 9],
            [0, 3, EOS],
            [0, 4, 0],
        ]  # rows end at 2, 5 and 4 tokens
        tokens, *played = _play(envs, plan)
        assert [len(t) for t in tokens] == [2, 5, 4]
        _check_against_slow_reference(envs, prompts, tokens, *played)


def test_a_partial_reset_with_a_wider_prompt_and_rows_ending_together_score_as_unpadded_ones(
    tmp_path,
):
    envs = _gpt2_vector_env(tmp_path, 3, "at_end")
    EOS = envs.unwrapped._gen.eos_id
    prompts = ["ab", "b", "c"]
    envs.reset(options={"prompts": prompts})
    envs.step(torch.tensor([3, 4, 5]))
    _, _, terminated, _, info = envs.step(torch.tensor([EOS, 6, 7]))
    assert terminated.tolist() == [True, False, False]
    held = [[], [4, 6], [5, 7]]  # rows 1 and 2 carry on
    # Row 0 restarts with a prompt wider than any before; rows 0 and 1 then end at the same step
    # with 2 and 4 tokens, so one forward scores responses of two lengths.
    prompts[0] = "hello wo"
    envs.reset(
        options={"reset_mask": np.array([True, False, False]), "prompts": ["hello wo", None, None]}
    )
    tokens, *played = _play(envs, [[8, 9, 3], [EOS, EOS, 4], [0, 0, EOS]], held)
    assert [len(t) for t in tokens] == [2, 4, 5]
    _check_against_slow_reference(envs, prompts, tokens, *played)


@pytest.mark.parametrize("reference_pass", ["per_step", "at_end"])
def test_the_reference_runs_once_per_step_or_once_per_ending_with_masks_that_cover_its_cache(
    reference_pass,
):
    """HF's contract: the attention mask spans the cached tokens plus the new ones. ``per_step``
    runs the reference at reset and after each step but the last; ``at_end`` only at steps where
    episodes end."""
    envs = TextGenerationVectorEnv(num_envs=2, reference_pass=reference_pass, **TINY)
    calls = []

    def check(module, args, kwargs):
        past = kwargs.get(
            "cache", kwargs.get("past_key_values")
        )  # its name depends on the transformers version
        mask, ids = kwargs["attention_mask"], kwargs["input_ids"]
        cached = past.get_seq_length() if past is not None else 0
        assert mask.shape == (ids.shape[0], cached + ids.shape[1])
        calls.append(ids.shape)

    envs.reference_model.register_forward_pre_hook(check, with_kwargs=True)
    for episode in range(2):  # the second episode starts from a fresh cache
        calls.clear()
        envs.reset(seed=episode, options={"prompts": ["ab", "hello"]})
        plan = [[3, 4], [1, 5], [0, 6], [0, 1]]  # row 0 ends at step 2, row 1 at step 4
        for actions in plan:
            envs.step(torch.tensor(actions))
        assert envs.all_done
        if reference_pass == "per_step":
            assert (
                len(calls) == 1 + len(plan) - 1
                and calls[0] == (2, 5)
                and all(c == (2, 1) for c in calls[1:])
            )
        else:
            assert calls == [
                (1, 5 + 2),
                (1, 5 + 4),
            ]  # one forward per ending: window of prompt + response


def test_rows_that_ended_ignore_any_action_even_one_outside_the_vocabulary():
    envs = TextGenerationVectorEnv(num_envs=2, **TINY)
    envs.reset(seed=0)
    vocab = envs.single_action_space.n
    envs.step(torch.tensor([1, 3]))  # row 0 ends
    for dead in (vocab, -1, vocab + 5):
        _, reward, terminated, _, _ = envs.step(torch.tensor([dead, 3]))
        assert reward[0].item() == 0.0 and not terminated[0]
    with pytest.raises(
        ValueError, match=rf"action {vocab} \(row 1\) is outside Discrete\({vocab}\)"
    ):
        envs.step(torch.tensor([3, vocab]))


def test_a_partial_reset_of_a_finished_batch_lets_it_step_again():
    envs = TextGenerationVectorEnv(num_envs=2, task="Toy", model="tiny", reference_pass="at_end")
    envs.reset(seed=0)
    envs.step(torch.tensor([1, 1]))
    assert envs.all_done
    envs.reset(options={"reset_mask": np.array([False, True])})
    assert not envs.all_done
    _, _, terminated, _, _ = envs.step(torch.tensor([3, 1]))
    assert terminated.tolist() == [False, True]


def test_before_the_first_reset_no_episode_runs_and_render_shows_nothing():
    envs = TextGenerationVectorEnv(num_envs=2, task="Toy", model="tiny", render_mode="ansi")
    assert envs.all_done is True
    assert envs.render() == ["", ""]
    assert TextGenerationEnv(task="Toy", model="tiny", render_mode="ansi").render() == ""


def test_render_and_response_text_leave_out_special_tokens():
    env = TextGenerationEnv(render_mode="ansi", **TINY)
    _, info = env.reset(seed=0)
    pad = env.tokenizer.pad_token_id
    env.step(pad)
    env.step(3)
    assert env.render() == info["prompt"] + "a"
    _, _, terminated, _, end = env.step(1)
    assert terminated and end["response_text"] == "a" and not end["truncated_response"]


def test_truncated_response_is_set_exactly_when_the_budget_ends_the_episode():
    env = TextGenerationEnv(**TINY)
    budget = TINY["max_new_tokens"]
    for last in (1, 3):  # EOS as the budget's last token is a normal end, not a cut
        env.reset(seed=0)
        for _ in range(budget - 1):
            env.step(4)
        _, _, terminated, _, info = env.step(last)
        assert (
            terminated
            and info["truncated_response"] is (last != 1)
            and info["response_length"] == budget
        )
    envs = TextGenerationVectorEnv(num_envs=3, **TINY)
    envs.reset(seed=0)
    for t in range(budget):
        _, _, terminated, _, info = envs.step(
            torch.tensor([1 if t == 0 else 0, 4, 1 if t == budget - 1 else 4])
        )
        if t == 0:
            assert info["truncated_response"].tolist() == [False, False, False]
            assert info["score"].isnan().tolist() == [
                False,
                True,
                True,
            ]  # NaN where no episode ended
    assert info["truncated_response"].tolist() == [False, True, False] and info[
        "_truncated_response"
    ].tolist() == [False, True, True]


def test_a_prompt_that_tokenizes_to_nothing_and_a_chat_prompt_without_a_template_are_refused():
    env = TextGenerationEnv(task="Toy", model="tiny")
    with pytest.raises(
        ValueError,
        match="a chat prompt \\(a list of messages\\) needs a tokenizer with a chat template",
    ):
        env.reset(options={"prompt": [{"role": "user", "content": "hi"}]})
    gen = env.unwrapped._gen
    real = gen.tokenizer

    class NoTokens:
        def __call__(self, text, **kw):
            return {"input_ids": []}

        def __getattr__(self, name):
            return getattr(real, name)

    gen.tokenizer = NoTokens()
    with pytest.raises(ValueError, match="prompt 0 \\('zzz'\\) tokenizes to no tokens"):
        env.reset(options={"prompt": "zzz"})


def test_a_reference_model_object_is_moved_to_the_envs_device():
    from textenv.env import frozen_reference

    tok = char_tokenizer()
    model, _ = frozen_reference(
        tiny_causal_lm(tok), tok, torch.device("meta"), torch.float32, False
    )
    assert {p.device.type for p in model.parameters()} == {"meta"}


def check_threads_and_trust(monkeypatch, module, makers, **kw):
    """Each maker sets torch's threads from ``torch_threads`` and builds the reference through
    ``module.frozen_reference`` with ``trust_remote_code=False`` unless told otherwise."""
    seen = []
    real = module.frozen_reference
    monkeypatch.setattr(
        module,
        "frozen_reference",
        lambda model, tokenizer, device, dtype, trust: (
            seen.append(trust) or real(model, tokenizer, device, dtype, trust)
        ),
    )
    before = torch.get_num_threads()
    try:
        for make in makers:
            torch.set_num_threads(1)
            make(model="tiny", torch_threads=2, **kw)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [False] * len(makers)


def test_both_envs_set_torch_threads_and_never_trust_remote_code_by_default(monkeypatch):
    import textenv.env as env_module

    check_threads_and_trust(
        monkeypatch,
        env_module,
        (TextGenerationEnv, lambda **kw: TextGenerationVectorEnv(num_envs=2, **kw)),
        task="Toy",
    )


def test_close_releases_the_reference_cache():
    import gc
    import weakref

    envs = TextGenerationVectorEnv(num_envs=2, **TINY)
    envs.reset(seed=0)
    envs.step(torch.tensor([3, 3]))
    cache = weakref.ref(envs.unwrapped._gen.reference.cache)
    envs.close()
    gc.collect()
    assert cache() is None


def test_the_single_env_takes_every_action_type_its_discrete_space_contains():
    env = TextGenerationEnv(render_mode="ansi", **TINY)
    _, info = env.reset(seed=0)
    actions = [3, np.int64(3), np.int32(4), np.array(3), torch.tensor(4)]
    assert all(env.action_space.contains(a) for a in actions[:4])
    for a in actions:
        env.step(a)
    assert env.render() == info["prompt"] + "aabab"


def test_device_and_thread_settings_are_checked_with_one_line_errors():
    from textenv.device import resolve_device, set_torch_threads

    assert resolve_device(torch.device("cpu")) == torch.device("cpu") == resolve_device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(
            ValueError, match=r"^device 'cuda:0' was asked for but no CUDA GPU is available"
        ):
            resolve_device(torch.device("cuda:0"))
    with pytest.raises(
        ValueError, match=r"torch_threads must be >= 0 \(0: torch's default\), got -1"
    ):
        set_torch_threads(-1)


def test_row_seeds_take_one_seed_per_row():
    from textenv.arrays import row_seeds

    assert row_seeds(7, 3) == [7, 8, 9] and row_seeds([5, 1], 2) == [5, 1]
    with pytest.raises(ValueError, match="expected 3 seeds, got 2"):
        row_seeds([1, 2], 3)
