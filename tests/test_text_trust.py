"""Text PPO stays right when the model or the sampling settings change: the reference scores
with the policy's temperature, dropout never perturbs the update, and resuming never makes
the learning-rate schedule jump."""

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from textenv.agents.text import TextTrainConfig, train_text
from textenv.models import char_tokenizer


def _config(tmp_path, name, **kw):
    base = dict(
        task="Toy",
        model="tiny",
        iterations=1,
        num_envs=8,
        max_new_tokens=6,
        learning_rate=1e-3,
        seed=3,
        device="cpu",
        runs_dir=str(tmp_path),
        run_name=name,
        tensorboard=False,
        progress=False,
        save_checkpoint=False,
        eval_samples=0,
    )
    return TextTrainConfig.from_flat(**(base | kw))


def _metrics(tmp_path, name):
    return [
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("reference_pass", ["per_step", "at_end"])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_kl_to_reference_is_zero_at_initialisation_at_any_temperature(
    tmp_path, temperature, reference_pass
):
    # The policy starts as the reference ("tiny" both), so the KL of the first rollout is 0
    # only if the reference scores tokens with the temperature the policy sampled with.
    train_text(
        _config(tmp_path, "t", temperature=temperature, reference_pass=reference_pass, kl_coef=0.1)
    )
    row = _metrics(tmp_path, "t")[0]
    assert abs(row["kl_k1"]) < 1e-4 and abs(row["kl_k3"]) < 1e-6, row


def _tiny_gpt2_dir(tmp_path, dropout=0.1):
    """A 2-layer GPT-2 with dropout everywhere, saved with a character tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = char_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_first_minibatch_ratio_is_one_on_a_model_with_dropout(tmp_path, monkeypatch):
    import textenv.agents.text

    seen = []
    real_update = textenv.agents.text.ppo_update

    def spy(params, optimizer, batch, evaluate, config, generator=None, **kw):
        def recording(mb, *columns):  # columns: a packed micro-batch's cut, when packing
            out = evaluate(mb, *columns)
            width = out[0].shape[1]
            seen.append((out[0].detach() - mb["logprobs"][:, :width]) * mb["mask"][:, :width])
            return out

        return real_update(params, optimizer, batch, recording, config, generator, **kw)

    monkeypatch.setattr(textenv.agents.text, "ppo_update", spy)
    train_text(_config(tmp_path, "d", model=_tiny_gpt2_dir(tmp_path), max_new_tokens=8))
    logratio = seen[0]
    ratio = logratio.exp()
    approx_kl = ((ratio - 1) - logratio).sum() / (logratio != 0).sum().clamp_min(1)
    # Old log-probs come from the KV-cached sampling pass, new ones from a full forward: equal
    # up to float rounding, where dropout left on moves them by whole percents.
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    assert approx_kl.abs().item() < 1e-9
    assert not torch.allclose(
        seen[-1], torch.zeros_like(seen[-1])
    )  # later minibatches see a moved policy


def test_dropout_is_disabled_in_the_policy_even_in_train_mode():
    from transformers import LlamaConfig, LlamaForCausalLM

    from textenv.agents.lm import LMActorCritic, disable_dropout

    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        attention_dropout=0.5,
    )
    policy = LMActorCritic(LlamaForCausalLM(config)).train()
    ids = torch.randint(3, len(tok), (4, 12))
    with torch.no_grad():
        a = policy._forward(ids, torch.ones_like(ids), torch.arange(12).expand(4, 12))[0]
        b = policy._forward(ids, torch.ones_like(ids), torch.arange(12).expand(4, 12))[0]
    assert torch.equal(a, b)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3))
    disable_dropout(model)
    assert model[1].p == 0.0


def _lrs(tmp_path, name):
    return [m["learning_rate"] for m in _metrics(tmp_path, name)]


_SIGTERM_AT = {"call": None, "calls": 0}


def _count_a_then_sigterm(prompts, responses):
    """Fraction of 'a' (the Toy score); at the ``_SIGTERM_AT["call"]``-th call it also sends
    this process SIGTERM, so the trainer stops at the end of that iteration with a checkpoint."""
    _SIGTERM_AT["calls"] += 1
    if _SIGTERM_AT["calls"] == _SIGTERM_AT["call"]:
        os.kill(os.getpid(), signal.SIGTERM)
    return [r.count("a") / max(len(r), 1) for r in responses]


@pytest.fixture
def sigterm_reward():
    from textenv.rewards import available, register

    if "test-count-a-sigterm" not in available():
        register("test-count-a-sigterm")(_count_a_then_sigterm)

    def arm(call):
        _SIGTERM_AT.update(call=call, calls=0)

    yield arm
    _SIGTERM_AT.update(call=None, calls=0)


def test_resume_with_a_longer_horizon_continues_the_decay_without_a_jump(tmp_path, sigterm_reward):
    from textenv.agents.checkpoint import TrainingInterrupted

    kw = dict(num_envs=4, max_new_tokens=1, save_checkpoint=True, reward="test-count-a-sigterm")
    sigterm_reward(4)  # one token per response: one scoring call per iteration, stop after the 4th
    with pytest.raises(TrainingInterrupted):
        train_text(_config(tmp_path, "r", iterations=10, **kw))
    before = _lrs(tmp_path, "r")
    assert len(before) == 4
    sigterm_reward(None)
    train_text(_config(tmp_path, "r", iterations=20, **kw), resume=tmp_path / "r")
    lrs = _lrs(tmp_path, "r")
    assert len(lrs) == 20 and lrs[:4] == before
    assert all(
        b < a for a, b in zip(lrs, lrs[1:])
    )  # strictly decreasing across the resume: no jump up
    # After the resume: a straight line from iteration 4's rate to 0 just past iteration 20.
    expected = [before[-1] * (1 - (it - 4) / 17) for it in range(5, 21)]
    assert lrs[4:] == pytest.approx(expected, rel=1e-12)


def test_resume_with_the_same_horizon_follows_the_uninterrupted_schedule(tmp_path, sigterm_reward):
    from textenv.agents.checkpoint import TrainingInterrupted

    kw = dict(
        iterations=10,
        num_envs=4,
        max_new_tokens=1,
        save_checkpoint=True,
        reward="test-count-a-sigterm",
    )
    train_text(_config(tmp_path, "whole", **kw))
    sigterm_reward(3)
    with pytest.raises(TrainingInterrupted):
        train_text(_config(tmp_path, "cut", **kw))
    sigterm_reward(None)
    train_text(_config(tmp_path, "cut", **kw), resume=tmp_path / "cut")
    assert _lrs(tmp_path, "cut") == _lrs(tmp_path, "whole")


def test_interrupted_and_resumed_run_ends_with_bit_identical_parameters(tmp_path, sigterm_reward):
    from textenv.agents.checkpoint import TrainingInterrupted

    kw = dict(
        iterations=5,
        num_envs=4,
        max_new_tokens=3,
        save_checkpoint=True,
        kl_coef=0.05,
        kl_target=0.5,
        kl_horizon=20,
        reward="test-count-a-sigterm",
    )
    train_text(_config(tmp_path, "whole", **kw))
    # Rows end at different steps, each step's ended rows scored in one call: count iteration
    # 1's calls (its rollout is the same whatever the horizon), then stop in iteration 2.
    sigterm_reward(None)
    train_text(_config(tmp_path, "probe", **(kw | {"iterations": 1})))
    sigterm_reward(_SIGTERM_AT["calls"] + 1)
    with pytest.raises(TrainingInterrupted):
        train_text(_config(tmp_path, "cut", **kw))
    assert len(_metrics(tmp_path, "cut")) == 2
    sigterm_reward(None)
    train_text(_config(tmp_path, "cut", **kw), resume=tmp_path / "cut")
    timing = (
        "wall_time_s",
        "rollout_s",
        "recompute_s",
        "update_s",
        "tokens_per_s",
        "rollout_tokens_per_s",
        "peak_memory_gib",  # the process's peak resident memory on a CPU: a measurement too
    )
    whole, cut = (
        [{k: v for k, v in m.items() if k not in timing} for m in _metrics(tmp_path, name)]
        for name in ("whole", "cut")
    )
    assert cut == whole  # every logged loss, KL, β and score, iteration by iteration
    for file in ("model.safetensors", "value_head.safetensors"):
        a = load_file(str(tmp_path / "whole" / "policy" / file))
        b = load_file(str(tmp_path / "cut" / "policy" / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


# -- β: one owner (the env), moved by the controller in the right direction -----------------


def test_adaptive_kl_controller_moves_beta_toward_the_target_by_the_clipped_error():
    from textenv.agents.text import AdaptiveKLController

    c = AdaptiveKLController(0.1, target=4.0, horizon=100)
    assert c.update(5.0, n_steps=10) == pytest.approx(
        0.1 * (1 + 0.2 * 10 / 100)
    )  # error 0.25, clipped to 0.2
    c = AdaptiveKLController(0.1, target=4.0, horizon=100)
    assert c.update(4.4, n_steps=10) == pytest.approx(
        0.1 * (1 + 0.1 * 10 / 100)
    )  # error 0.1: β rises
    c = AdaptiveKLController(0.1, target=4.0, horizon=100)
    assert c.update(3.6, n_steps=10) == pytest.approx(
        0.1 * (1 - 0.1 * 10 / 100)
    )  # error -0.1: β falls
    c = AdaptiveKLController(0.1, target=4.0, horizon=100)
    assert c.update(0.0, n_steps=10) == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))  # clipped at -0.2
    assert c.value == pytest.approx(0.098)  # the controller keeps the moved β
    assert c.update(4.0, n_steps=10) == pytest.approx(0.098)  # on target: unchanged


def test_trainer_beta_is_the_envs_and_follows_the_controller(tmp_path):
    cfg = _config(
        tmp_path, "b", iterations=4, kl_coef=0.1, kl_target=0.01, kl_horizon=80, learning_rate=3e-3
    )
    train_text(cfg)
    rows = _metrics(tmp_path, "b")
    assert rows[0]["kl_coef"] == pytest.approx(0.1)
    for prev, row in zip(rows, rows[1:]):
        error = min(max(prev["kl_k1"] / 0.01 - 1.0, -0.2), 0.2)
        assert row["kl_coef"] == pytest.approx(prev["kl_coef"] * (1 + error * 8 / 80), rel=1e-12)
        assert (row["kl_coef"] - prev["kl_coef"]) * (
            prev["kl_k1"] - 0.01
        ) > 0  # up above target, down below


def test_kl_in_loss_pays_the_score_alone_and_beta_times_k3_in_the_loss(tmp_path, monkeypatch):
    import textenv.agents.text

    extra = []
    real_update = textenv.agents.text.ppo_update

    def spy(params, optimizer, batch, evaluate, config, generator=None, **kw):
        def recording(mb, *columns):  # columns: a packed micro-batch's cut, when packing
            logprob, entropy, value, kl_term = evaluate(mb, *columns)
            r = mb["ref_logprobs"][:, : logprob.shape[1]] - logprob.detach()
            extra.append((kl_term.detach(), 0.2 * (r.exp() - r - 1.0)))
            return logprob, entropy, value, kl_term

        return real_update(params, optimizer, batch, recording, config, generator, **kw)

    monkeypatch.setattr(textenv.agents.text, "ppo_update", spy)
    train_text(
        _config(tmp_path, "l", iterations=2, kl_coef=0.2, kl_in_loss=True, learning_rate=3e-3)
    )
    rows = _metrics(tmp_path, "l")
    assert all(
        r["reward_total"] == pytest.approx(r["score_mean"], abs=1e-7) for r in rows
    )  # no KL in the reward
    for got, want in extra:
        torch.testing.assert_close(got, want)
    assert extra[-1][0].abs().sum() > 0  # the policy moved: the KL term is live
    assert rows[1]["extra_loss"] > 0


def test_kl_penalized_rewards_on_hand_computed_values():
    from textenv.kl import kl_penalized_rewards

    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 ends after two tokens
    rewards = kl_penalized_rewards(torch.tensor([2.0, -1.0]), ref, logprobs, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.25, 0.5, 2.0], [-0.5, -1.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_env_reward_plus_minus_beta_logpi_is_the_kl_penalized_reward_at_any_temperature():
    from textenv import TextGenerationVectorEnv
    from textenv.agents.lm import LMActorCritic
    from textenv.agents.rollout_text import collect_rollout
    from textenv.kl import kl_penalized_rewards
    from textenv.models import load_causal_lm

    envs = TextGenerationVectorEnv(
        num_envs=6, task="Toy", model="tiny", max_new_tokens=5, kl_coef=0.3, temperature=0.6
    )
    assert envs.temperature == 0.6
    policy = LMActorCritic(load_causal_lm("tiny:1")[0], temperature=0.6)
    ro = collect_rollout(policy, envs, seed=1, generator=torch.Generator().manual_seed(0))
    shaped = kl_penalized_rewards(ro.scores, ro.ref_logprobs, ro.logprobs, ro.mask, envs.kl_coef)
    torch.testing.assert_close(
        shaped, (ro.env_rewards - 0.3 * ro.logprobs) * ro.mask, rtol=1e-5, atol=1e-6
    )
    # The reference's log-probs are those of its logits / T, from one full uncached forward.
    with torch.no_grad():
        pos = (ro.attention_mask.cumsum(-1) - 1).clamp_min(0)
        logits = envs.reference_model(
            input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos
        ).logits[:, ro.prompt_len - 1 : -1]
    full = torch.log_softmax(logits / 0.6, -1).gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
    m = ro.mask.bool()
    torch.testing.assert_close(ro.ref_logprobs[m], full[m], rtol=1e-5, atol=1e-5)


def test_a_temperature_of_zero_is_refused():
    from textenv import TextGenerationEnv

    with pytest.raises(ValueError, match="temperature must be > 0"):
        TextGenerationEnv(task="Toy", model="tiny", temperature=0.0)


# -- the shared plumbing ---------------------------------------------------------------------


def test_linear_lr_is_cleanrls_schedule_and_resumes_without_a_jump():
    from textenv.agents.training import LinearLR

    fresh = LinearLR(1e-3, horizon=10)
    assert [fresh.rate(i) for i in (1, 2, 10)] == [
        (1.0 - (i - 1.0) / 10) * 1e-3 for i in (1, 2, 10)
    ]
    assert LinearLR(1e-3, 10, enabled=False).rate(7) == 1e-3
    same = LinearLR.resumed(fresh.state(), last_iteration=4, learning_rate=1e-3, horizon=10)
    assert [same.rate(i) for i in range(5, 11)] == [
        fresh.rate(i) for i in range(5, 11)
    ]  # bit for bit
    longer = LinearLR.resumed(fresh.state(), last_iteration=4, learning_rate=1e-3, horizon=20)
    assert longer.rate(4) == fresh.rate(4) and longer.rate(21) == pytest.approx(0.0, abs=1e-18)
    assert fresh.rate(4) > longer.rate(5) > longer.rate(6) > longer.rate(20) > 0
    new_lr = LinearLR.resumed(fresh.state(), last_iteration=4, learning_rate=5e-4, horizon=10)
    assert new_lr.rate(5) == 5e-4 and new_lr.rate(11) == pytest.approx(0.0, abs=1e-18)
    off = LinearLR.resumed(LinearLR(1e-3, 10, enabled=False).state(), 4, 1e-3, 20)
    assert off.rate(5) == pytest.approx(1e-3 * (1 - 1 / 17)) and off.rate(21) == pytest.approx(
        0.0, abs=1e-18
    )


def test_summary_json_writes_nan_and_inf_as_null():
    from textenv.agents.training import summary_json, summary_line

    assert summary_json({"a": float("nan"), "b": float("inf"), "c": 1.5, "d": "x", "e": None}) == {
        "a": None,
        "b": None,
        "c": 1.5,
        "d": "x",
        "e": None,
    }
    assert json.loads(summary_line({"a": float("-inf"), "n": 3})) == {"a": None, "n": 3}


_DRAWS: list[float] = []


def _python_random_reward(prompts, responses):
    import random

    _DRAWS.append(random.random())
    return [0.0] * len(responses)


def test_text_trainer_seeds_pythons_random_for_user_rewards(tmp_path):
    from textenv.rewards import available, register

    if "test-python-random" not in available():
        register("test-python-random")(_python_random_reward)
    draws = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        _DRAWS.clear()
        train_text(
            _config(tmp_path, name, seed=seed, reward="test-python-random", max_new_tokens=1)
        )
        draws.append(list(_DRAWS))
    assert draws[0] == draws[1] != draws[2]


def test_training_cartpole_never_imports_the_language_model_stack():
    import subprocess
    import sys

    code = (
        "import sys; import textenv.agents.cli.train, textenv.agents.classic, textenv.agents.training, textenv; "
        "heavy = [m for m in ('transformers', 'textenv.env', 'textenv.models', 'textenv.agents.text', 'textenv.agents.lm') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_registered_ids_are_the_tasks():
    import gymnasium as gym

    import textenv

    multi_turn = {"FunctionTask" if n == "MultiTurn" else n for n in textenv.MULTITURN_TASK_NAMES}
    assert set(textenv.TASK_NAMES) | multi_turn == set(textenv.TASKS)
    ids = {"MultiTurn" if name == "FunctionTask" else name for name in textenv.TASKS}
    assert all(f"textenv/{name}-v0" in gym.registry for name in ids)


# -- every logged diagnostic and the batch the update sees, recomputed from the rollout ------


def _spy_on_iteration(monkeypatch):
    """Record each iteration's rollout, the batch given to ppo_update and the optimizer's lr."""
    import textenv.agents.text

    seen = {"rollouts": [], "batches": [], "lrs": []}
    real_collect, real_update = textenv.agents.text.collect_rollout, textenv.agents.text.ppo_update

    def collect(*args, **kw):
        ro = real_collect(*args, **kw)
        seen["rollouts"].append(ro)
        return ro

    def update(params, optimizer, batch, evaluate, config, generator=None, **kw):
        seen["batches"].append({k: v.clone() for k, v in batch.items()})
        seen["lrs"].append(optimizer.param_groups[0]["lr"])
        return real_update(params, optimizer, batch, evaluate, config, generator, **kw)

    monkeypatch.setattr(textenv.agents.text, "collect_rollout", collect)
    monkeypatch.setattr(textenv.agents.text, "ppo_update", update)
    return seen


@pytest.mark.parametrize("whiten", [True, False])
def test_logged_diagnostics_and_the_update_batch_are_what_the_rollout_says(
    tmp_path, monkeypatch, whiten
):
    from textenv.agents.ppo import explained_variance
    from textenv.agents.rollout_text import shaped_rewards, token_advantages

    seen = _spy_on_iteration(monkeypatch)
    cfg = _config(
        tmp_path,
        "m",
        iterations=2,
        kl_coef=0.2,
        missing_eos_penalty=0.5,
        whiten_advantages=whiten,
        gamma=0.9,
        gae_lambda=0.8,
    )
    train_text(cfg)
    rows = _metrics(tmp_path, "m")
    for row, ro, batch, lr in zip(rows, seen["rollouts"], seen["batches"], seen["lrs"]):
        m = ro.mask
        assert row["learning_rate"] == lr == (1.0 - (row["iteration"] - 1) / 2) * 1e-3
        assert row["kl_k1"] == pytest.approx(
            ((ro.logprobs - ro.ref_logprobs) * m).sum(1).mean().item(), rel=1e-6
        )
        r = ro.ref_logprobs - ro.logprobs
        assert row["kl_k3"] == pytest.approx(((r.exp() - r - 1) * m).sum(1).mean().item(), rel=1e-6)
        assert row["score_mean"] == pytest.approx(ro.scores.mean().item(), rel=1e-6)
        assert row["score_std"] == pytest.approx(ro.scores.std().item(), rel=1e-6)
        assert row["response_length"] == pytest.approx(m.sum(1).mean().item())
        assert row["rollout_entropy"] == pytest.approx(
            ((ro.entropy * m).sum() / m.sum()).item(), rel=1e-6
        )
        assert row["missing_eos_frac"] == pytest.approx(ro.truncated_response.float().mean().item())
        rewards = shaped_rewards(ro, 0.2, True, 0.5)
        # The penalty lands on the truncated rows' scores: the reward total says so.
        penalty = 0.5 * ro.truncated_response.float().mean().item()
        kl = (0.2 * (ro.logprobs - ro.ref_logprobs) * m).sum(1).mean().item()
        assert row["reward_total"] == pytest.approx(
            ro.scores.mean().item() - penalty - kl, abs=1e-5
        )
        adv, ret = token_advantages(ro, rewards, 0.9, 0.8)
        assert row["explained_variance"] == pytest.approx(
            explained_variance(ro.values, ret, m).item(), abs=1e-6
        )
        torch.testing.assert_close(batch["returns"], ret)
        if whiten:  # whitened over the whole batch's response tokens, zero past each end
            a = batch["advantages"][m.bool()]
            assert a.mean().item() == pytest.approx(
                0.0, abs=1e-6
            ) and a.std().item() == pytest.approx(1.0, abs=1e-5)
            assert torch.all(batch["advantages"][~m.bool()] == 0)
        else:
            torch.testing.assert_close(batch["advantages"], adv)
    assert ro.truncated_response.any()  # the penalty was exercised


def test_a_rollout_refuses_a_policy_and_reference_at_different_temperatures():
    from textenv import TextGenerationVectorEnv
    from textenv.agents.lm import LMActorCritic
    from textenv.agents.rollout_text import collect_rollout
    from textenv.models import load_causal_lm

    envs = TextGenerationVectorEnv(
        num_envs=2, task="Toy", model="tiny", max_new_tokens=2, temperature=0.7
    )
    policy = LMActorCritic(load_causal_lm("tiny")[0], temperature=1.0)
    with pytest.raises(
        ValueError, match="samples at temperature 1.0 but the env's reference scores at 0.7"
    ):
        collect_rollout(policy, envs, seed=0, generator=torch.Generator().manual_seed(0))
    envs.set_attr("temperature", 1.0)
    assert (
        collect_rollout(
            policy, envs, seed=0, generator=torch.Generator().manual_seed(0)
        ).actions.shape[0]
        == 2
    )


def test_kl_penalized_rewards_on_one_token_and_empty_rows_and_integer_masks():
    from textenv.kl import kl_penalized_rewards

    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.5], [-3.0, -3.0]])
    ref = torch.tensor([[-2.0, -2.0], [-1.5, -0.5], [-1.0, -1.0]])
    mask = torch.tensor([[1, 0], [1, 1], [0, 0]])  # one token; two tokens; nothing (a padding row)
    rewards = kl_penalized_rewards(torch.tensor([3.0, -2.0, 5.0]), ref, logprobs, mask, kl_coef=1.0)
    assert rewards.dtype == torch.float32
    expected = torch.tensor(
        [[3.0 - 1.0, 0.0], [-1.0, -2.0], [0.0, 0.0]]
    )  # an empty row is paid nothing
    torch.testing.assert_close(rewards, expected)


# -- the training loop's bookkeeping, pinned (each test kills mutants that survived before it) --


def test_resume_refuses_a_run_of_another_task(tmp_path):
    train_text(_config(tmp_path, "t", save_checkpoint=True))
    with pytest.raises(ValueError, match="is a run of task Toy with model tiny, not Arithmetic"):
        train_text(
            _config(tmp_path, "t", task="Arithmetic", save_checkpoint=True), resume=tmp_path / "t"
        )


SETUP_S = 1000.0


class _TickingClock:
    """The trainer's clock, injected: each reading advances it by one millisecond, and
    ``advance`` moves it by any amount, so elapsed times are exact on any machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1e-3
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_wall_clock_and_token_counters_add_up_and_continue_across_a_resume(tmp_path, monkeypatch):
    import textenv.agents.text as text_module

    clock = _TickingClock()

    def slow_adamw(*args, **kw):  # a setup step the loop's clock must not count
        clock.advance(SETUP_S)
        return real_adamw(*args, **kw)

    real_adamw = text_module.adamw
    monkeypatch.setattr(text_module, "time", clock)
    monkeypatch.setattr(text_module, "adamw", slow_adamw)
    train_text(_config(tmp_path, "w", iterations=2, save_checkpoint=True))
    monkeypatch.setattr(text_module, "adamw", real_adamw)
    first = _metrics(tmp_path, "w")
    train_text(_config(tmp_path, "w", iterations=4, save_checkpoint=True), resume=tmp_path / "w")
    rows = _metrics(tmp_path, "w")
    tokens = 0.0
    for row in rows:
        tokens += row["response_length"] * 8
        # tokens_per_s and wall_time_s share one clock reading: their product is the running token count.
        assert row["tokens_per_s"] * row["wall_time_s"] == pytest.approx(tokens, rel=1e-9)
        assert row["rollout_tokens_per_s"] * row["rollout_s"] == pytest.approx(
            row["response_length"] * 8, rel=1e-9
        )
        assert (
            0 < row["rollout_s"]
            and 0 < row["update_s"]
            and row["rollout_s"] + row["update_s"] <= row["wall_time_s"]
        )
    # A fresh run's clock starts at the loop, after the setup: iteration 1 is its rollout, its
    # update and a few readings of bookkeeping, not the setup's 1000 s.
    assert rows[0]["wall_time_s"] < rows[0]["rollout_s"] + rows[0]["update_s"] + 0.1
    # The resumed run continues the saved clock: no reset to 0, no jump.
    assert first[-1]["wall_time_s"] <= rows[2]["wall_time_s"] < first[-1]["wall_time_s"] + 60
    assert (
        rows[2]["wall_time_s"] - first[-1]["wall_time_s"]
        >= rows[2]["rollout_s"] + rows[2]["update_s"]
    )


def test_a_resume_keeps_the_first_score_and_a_run_with_nothing_left_to_do_reports_its_iterations(
    tmp_path,
):
    first = train_text(_config(tmp_path, "f", iterations=2, save_checkpoint=True))
    again = train_text(
        _config(tmp_path, "f", iterations=3, save_checkpoint=True), resume=tmp_path / "f"
    )
    assert (
        again["score_mean_first"]
        == first["score_mean_first"]
        == _metrics(tmp_path, "f")[0]["score_mean"]
    )
    done = train_text(
        _config(tmp_path, "f", iterations=3, save_checkpoint=True), resume=tmp_path / "f"
    )
    assert done["iterations"] == 3 and len(_metrics(tmp_path, "f")) == 3


def test_a_checkpoint_without_a_saved_schedule_resumes_on_its_first_horizon(
    tmp_path, sigterm_reward
):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from textenv.agents.checkpoint import TrainingInterrupted

    kw = dict(
        iterations=6,
        num_envs=4,
        max_new_tokens=1,
        save_checkpoint=True,
        reward="test-count-a-sigterm",
    )
    train_text(_config(tmp_path, "whole", **kw))
    sigterm_reward(3)
    with pytest.raises(TrainingInterrupted):
        train_text(_config(tmp_path, "old", **kw))
    sigterm_reward(None)
    # Rewrite the checkpoint as versions before the schedule was saved wrote it.
    path = tmp_path / "old" / "policy" / "trainer_state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(metadata["state"])
    del state["lr_schedule"]
    save_file(tensors, str(path), metadata=metadata | {"state": json.dumps(state)})
    train_text(_config(tmp_path, "old", **kw), resume=tmp_path / "old")
    assert _lrs(tmp_path, "old") == _lrs(tmp_path, "whole")


def test_gradient_checkpointing_is_on_in_the_update_and_the_kv_cache_off(tmp_path, monkeypatch):
    import textenv.agents.text

    seen = []

    class Recording(textenv.agents.text.LMActorCritic):
        def evaluate_responses(self, *args, **kw):
            on = getattr(
                self.lm, "is_activation_checkpointing", None
            )  # transformers >= 5.24's name
            on = self.lm.is_gradient_checkpointing if on is None else on
            seen.append((on, self.lm.config.use_cache, self.lm.training))
            return super().evaluate_responses(*args, **kw)

    monkeypatch.setattr(textenv.agents.text, "LMActorCritic", Recording)
    train_text(_config(tmp_path, "g", gradient_checkpointing=True))
    assert seen and all(s == (True, False, True) for s in seen)


def test_an_entropy_bonus_moves_the_policy_whatever_its_coefficient(tmp_path):
    from textenv.agents.ppo import PPOConfig

    params = {}
    for ent in (0.0, 1.0):
        ppo = PPOConfig(
            update_epochs=1,
            num_minibatches=1,
            vf_coef=0.1,
            ent_coef=ent,
            max_grad_norm=1.0,
            norm_adv=False,
        )
        train_text(_config(tmp_path, f"e{ent}", ppo=ppo, save_checkpoint=True, learning_rate=1e-2))
        params[ent] = load_file(str(tmp_path / f"e{ent}" / "policy" / "model.safetensors"))
    # Same rollout (same seed), different update: the bonus's gradient reached the parameters.
    assert any(not torch.equal(params[0.0][k], params[1.0][k]) for k in params[0.0])


def test_no_progress_bar_when_progress_is_off(tmp_path, capfd):
    train_text(_config(tmp_path, "p", progress=False))
    err = capfd.readouterr().err
    assert "it/s" not in err and "s/it" not in err and "%|" not in err


def test_a_lora_run_resumes_from_its_adapter(tmp_path):
    train_text(_config(tmp_path, "l", lora_r=4, save_checkpoint=True, learning_rate=1e-2))
    summary = train_text(
        _config(tmp_path, "l", lora_r=4, iterations=2, save_checkpoint=True, learning_rate=1e-2),
        resume=tmp_path / "l",
    )
    assert (
        summary["iterations"] == 2
        and (tmp_path / "l" / "policy" / "adapter" / "adapter_config.json").is_file()
    )


def _half(prompts, responses):
    return [0.5] * len(responses)


def _register_half():
    from textenv.rewards import available, register

    if "test-half" not in available():
        register("test-half")(_half)


@pytest.mark.parametrize("target, iterations_run", [(0.5, 2), (0.6, 4)])
def test_target_score_stops_once_the_window_mean_reaches_it(tmp_path, target, iterations_run):
    # Every response scores 0.5: a window of 2 averages exactly 0.5, which reaches 0.5 but not 0.6.
    _register_half()
    summary = train_text(
        _config(
            tmp_path,
            "t",
            reward="test-half",
            iterations=4,
            target_score=target,
            target_window=2,
            kl_coef=0.0,
        )
    )
    assert summary["iterations"] == iterations_run
    assert len(_metrics(tmp_path, "t")) == iterations_run


def test_periodic_checkpoints_fall_on_multiples_of_checkpoint_every(tmp_path, monkeypatch):
    import textenv.agents.text as text

    saved: list[int] = []
    real = text.save_policy

    def recording(path, policy, tokenizer, **kw):
        saved.append(kw["state"]["iteration"])
        return real(path, policy, tokenizer, **kw)

    monkeypatch.setattr(text, "save_policy", recording)
    train_text(_config(tmp_path, "c", iterations=5, checkpoint_every=2, save_checkpoint=True))
    assert saved == [2, 4, 5]  # every 2nd iteration, then the final one


def test_the_summary_reports_the_last_iteration_and_the_run_throughput(tmp_path):

    start = time.perf_counter()
    summary = train_text(_config(tmp_path, "s", iterations=3, kl_coef=0.1, learning_rate=1e-2))
    elapsed = time.perf_counter() - start
    metrics = _metrics(tmp_path, "s")
    assert summary["kl_last"] == metrics[-1]["kl_k1"] != metrics[0]["kl_k1"]
    assert summary["score_mean_last"] == metrics[-1]["score_mean"]
    assert 0 < summary["wall_time_s"] <= elapsed
    tokens = sum(m["response_length"] * 8 for m in metrics)  # 8 responses per iteration
    assert summary["tokens_per_s"] == pytest.approx(tokens / summary["wall_time_s"], rel=1e-6)


def test_the_held_out_standard_error_exists_from_two_responses():
    from textenv import TextGenerationVectorEnv
    from textenv.agents.lm import LMActorCritic
    from textenv.agents.rollout_text import evaluate_held_out
    from textenv.models import load_causal_lm

    lm, _ = load_causal_lm("tiny:1")
    policy = LMActorCritic(lm, value_head=False)
    two = TextGenerationVectorEnv(
        num_envs=2, task="Toy", model="tiny", max_new_tokens=6, reference_pass="at_end"
    )
    result = evaluate_held_out(policy, two, seed=0)
    generator = torch.Generator().manual_seed(0)
    from textenv.agents.rollout_text import collect_rollout

    scores = collect_rollout(policy, two, seed=0, generator=generator).scores.double()
    assert result["score_se"] == pytest.approx(float(scores.std() / 2**0.5))
    one = TextGenerationVectorEnv(
        num_envs=1, task="Toy", model="tiny", max_new_tokens=6, reference_pass="at_end"
    )
    assert (
        evaluate_held_out(policy, one, seed=0)["score_se"]
        != evaluate_held_out(policy, one, seed=0)["score_se"]
    )  # nan


def test_fsdp_with_lora_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--fsdp with --lora-r is not supported"):
        _config(tmp_path, "f", fsdp=True, lora_r=4).validate()


@pytest.fixture
def one_process_group():
    """A world-size-1 gloo group in this process, so FSDP can shard (over one rank)."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def test_a_sharded_policy_samples_as_the_plain_one_and_is_resharded_after(one_process_group):
    """In process, world size 1: the FSDP path of collect_rollout samples the same rollout as the
    plain path and leaves every parameter sharded (the optimizer steps on the shards)."""
    from torch.distributed.tensor import DTensor

    from textenv import TextGenerationVectorEnv
    from textenv.agents.distributed import shard_policy
    from textenv.agents.lm import LMActorCritic
    from textenv.agents.rollout_text import collect_rollout, is_sharded
    from textenv.models import load_causal_lm

    envs = TextGenerationVectorEnv(num_envs=4, task="Toy", model="tiny", max_new_tokens=4)
    rollouts, policies = [], []
    for shard in (False, True):
        lm, _ = load_causal_lm("tiny")
        torch.manual_seed(0)
        policy = LMActorCritic(lm)
        if shard:
            shard_policy(policy, lm)
        policies.append(policy)
        rollouts.append(
            collect_rollout(policy, envs, seed=5, generator=torch.Generator().manual_seed(1))
        )
    plain, sharded = rollouts
    assert not is_sharded(policies[0]) and is_sharded(policies[1])
    assert all(isinstance(p, DTensor) for p in policies[1].parameters())
    from torch.distributed.fsdp import FSDPModule

    lm = policies[1].lm
    blocks = [
        m for m in lm.modules() if any(c.__name__ in lm._no_split_modules for c in type(m).__mro__)
    ]
    assert blocks and all(isinstance(m, FSDPModule) for m in blocks)  # each block its own unit
    assert isinstance(policies[1].value_head, FSDPModule)  # and the fp32 value head
    assert sharded.responses == plain.responses
    for name in ("actions", "logprobs", "values", "ref_logprobs", "mask", "scores"):
        torch.testing.assert_close(getattr(sharded, name), getattr(plain, name), msg=name)


def test_the_text_optimizer_is_adamw_without_weight_decay_fused_or_not():
    from textenv.agents.text import adamw

    params = [torch.nn.Parameter(torch.zeros(3))]
    for fused in (True, False):
        opt = adamw(params, lr=0.25, fused=fused)
        assert isinstance(opt, torch.optim.AdamW)
        assert (opt.defaults["lr"], opt.defaults["eps"], opt.defaults["weight_decay"]) == (
            0.25,
            1e-5,
            0.0,
        )
        assert bool(opt.defaults["fused"]) is fused  # CPU float32 has a fused kernel
    assert adamw(params, lr=0.25).defaults["fused"] is True


def test_save_policy_writes_the_full_weights_it_is_given_as_a_sharded_run_does(tmp_path):
    """With ``state_dict`` (a sharded policy's gathered weights) the checkpoint holds those
    weights, not the policy's own tensors, and the trainer state has the RNGs and counters but
    no optimizer."""
    from textenv.agents.lm import LMActorCritic
    from textenv.agents.text_checkpoint import STATE_FILE, save_policy
    from textenv.models import load_causal_lm

    lm, tok = load_causal_lm("tiny")
    policy = LMActorCritic(lm)
    source = LMActorCritic(load_causal_lm("tiny:1")[0])
    torch.nn.init.normal_(source.value_head.weight)
    full = {k: v.clone() for k, v in source.state_dict().items()}
    path = save_policy(
        tmp_path / "policy",
        policy,
        tok,
        generator=torch.Generator().manual_seed(0),
        state={"iteration": 7},
        state_dict=full,
    )
    saved = load_file(str(path / "model.safetensors"))
    assert saved and all(torch.equal(v, full[f"lm.{k}"]) for k, v in saved.items())
    assert any(not torch.equal(v, lm.state_dict()[k]) for k, v in saved.items())
    head = load_file(str(path / "value_head.safetensors"))
    assert head.keys() == {k[len("value_head.") :] for k in full if k.startswith("value_head.")}
    assert all(torch.equal(v, full[f"value_head.{k}"]) for k, v in head.items())
    from safetensors import safe_open

    with safe_open(str(path / STATE_FILE), framework="pt") as f:
        assert json.loads(f.metadata()["state"]) == {"iteration": 7}
        assert "rng.generator" in f.keys() and not any(k.startswith("optim.") for k in f.keys())


def _rewrite_trainer_state(policy_dir, **changes):
    """Rewrite fields of a checkpoint's trainer state (as another process count or an older
    version would have written it); a value of None removes the field."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from textenv.agents.text_checkpoint import STATE_FILE

    path = str(policy_dir / STATE_FILE)
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(metadata["state"])
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    save_file(tensors, path, metadata=metadata | {"state": json.dumps(state)})


def test_resuming_says_so_only_when_the_process_count_changed(tmp_path, capsys):
    summary = train_text(_config(tmp_path, "r", iterations=1, save_checkpoint=True))
    assert "world_size" not in summary  # one process: no such field
    _rewrite_trainer_state(
        tmp_path / "r" / "policy", world_size=None
    )  # a checkpoint from before the field
    capsys.readouterr()
    train_text(_config(tmp_path, "r", iterations=2, save_checkpoint=True), resume=tmp_path / "r")
    assert "process(es)" not in capsys.readouterr().err
    _rewrite_trainer_state(tmp_path / "r" / "policy", world_size=2)
    train_text(_config(tmp_path, "r", iterations=3, save_checkpoint=True), resume=tmp_path / "r")
    assert (
        "note: this run was trained by 2 process(es) and resumes with 1" in capsys.readouterr().err
    )


def test_progress_messages_only_when_asked(tmp_path, capsys):
    train_text(_config(tmp_path, "quiet"))
    assert "loading" not in capsys.readouterr().err
    train_text(_config(tmp_path, "chatty", progress=True))
    err = capsys.readouterr().err
    assert (
        "loading the reference model (tiny) ..." in err and "loading the policy (tiny) ..." in err
    )


def test_fsdp_needs_the_models_transformer_blocks(one_process_group):
    from textenv.agents.distributed import shard_policy
    from textenv.agents.lm import LMActorCritic
    from textenv.models import load_causal_lm

    lm, _ = load_causal_lm("tiny")
    lm._no_split_modules = None
    with pytest.raises(
        ValueError,
        match=r"^--fsdp: cannot find the transformer blocks of \w+ \(it lists no "
        r"_no_split_modules\)$",
    ):
        shard_policy(LMActorCritic(lm), lm)
