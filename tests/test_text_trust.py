"""Text PPO stays right when the model or the sampling settings change: the reference scores
with the policy's temperature, dropout never perturbs the update, and resuming never makes
the learning-rate schedule jump."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from agents.text import TextTrainConfig, train_text
from textenv.models import char_tokenizer


def _config(tmp_path, name, **kw):
    base = dict(task="Toy", model="tiny", iterations=1, num_envs=8, max_new_tokens=6, learning_rate=1e-3, seed=3,
                device="cpu", runs_dir=str(tmp_path), run_name=name, tensorboard=False, progress=False,
                save_checkpoint=False)
    return TextTrainConfig(**(base | kw))


def _metrics(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("reference_pass", ["per_step", "at_end"])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_kl_to_reference_is_zero_at_initialisation_at_any_temperature(tmp_path, temperature, reference_pass):
    # The policy starts as the reference ("tiny" both), so the KL of the first rollout is 0
    # only if the reference scores tokens with the temperature the policy sampled with.
    train_text(_config(tmp_path, "t", temperature=temperature, reference_pass=reference_pass, kl_coef=0.1))
    row = _metrics(tmp_path, "t")[0]
    assert abs(row["kl_k1"]) < 1e-4 and abs(row["kl_k3"]) < 1e-6, row


def _tiny_gpt2_dir(tmp_path, dropout=0.1):
    """A 2-layer GPT-2 with dropout everywhere, saved with a character tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = char_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, eos_token_id=tok.eos_token_id,
                        bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_first_minibatch_ratio_is_one_on_a_model_with_dropout(tmp_path, monkeypatch):
    import agents.text

    seen = []
    real_update = agents.text.ppo_update

    def spy(params, optimizer, batch, evaluate, config, generator=None):
        def recording(mb):
            out = evaluate(mb)
            seen.append((out[0].detach() - mb["logprobs"]) * mb["mask"])
            return out
        return real_update(params, optimizer, batch, recording, config, generator)

    monkeypatch.setattr(agents.text, "ppo_update", spy)
    train_text(_config(tmp_path, "d", model=_tiny_gpt2_dir(tmp_path), max_new_tokens=8))
    logratio = seen[0]
    ratio = logratio.exp()
    approx_kl = ((ratio - 1) - logratio).sum() / (logratio != 0).sum().clamp_min(1)
    # Old log-probs come from the KV-cached sampling pass, new ones from a full forward: equal
    # up to float rounding, where dropout left on moves them by whole percents.
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    assert approx_kl.abs().item() < 1e-9
    assert not torch.allclose(seen[-1], torch.zeros_like(seen[-1]))  # later minibatches see a moved policy


def test_dropout_is_disabled_in_the_policy_even_in_train_mode():
    from transformers import LlamaConfig, LlamaForCausalLM

    from agents.lm import LMActorCritic, disable_dropout

    tok = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, attention_dropout=0.5)
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
    from agents.checkpoint import TrainingInterrupted

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
    assert all(b < a for a, b in zip(lrs, lrs[1:]))  # strictly decreasing across the resume: no jump up
    # After the resume: a straight line from iteration 4's rate to 0 just past iteration 20.
    expected = [before[-1] * (1 - (it - 4) / 17) for it in range(5, 21)]
    assert lrs[4:] == pytest.approx(expected, rel=1e-12)


def test_resume_with_the_same_horizon_follows_the_uninterrupted_schedule(tmp_path, sigterm_reward):
    from agents.checkpoint import TrainingInterrupted

    kw = dict(iterations=10, num_envs=4, max_new_tokens=1, save_checkpoint=True, reward="test-count-a-sigterm")
    train_text(_config(tmp_path, "whole", **kw))
    sigterm_reward(3)
    with pytest.raises(TrainingInterrupted):
        train_text(_config(tmp_path, "cut", **kw))
    sigterm_reward(None)
    train_text(_config(tmp_path, "cut", **kw), resume=tmp_path / "cut")
    assert _lrs(tmp_path, "cut") == _lrs(tmp_path, "whole")


def test_interrupted_and_resumed_run_ends_with_bit_identical_parameters(tmp_path, sigterm_reward):
    from agents.checkpoint import TrainingInterrupted

    kw = dict(iterations=5, num_envs=4, max_new_tokens=3, save_checkpoint=True, kl_coef=0.05, kl_target=0.5,
              kl_horizon=20, reward="test-count-a-sigterm")
    train_text(_config(tmp_path, "whole", **kw))
    sigterm_reward(4)  # at most 3 scoring calls per iteration: the 4th is in iteration 2
    with pytest.raises(TrainingInterrupted):
        train_text(_config(tmp_path, "cut", **kw))
    assert len(_metrics(tmp_path, "cut")) == 2
    sigterm_reward(None)
    train_text(_config(tmp_path, "cut", **kw), resume=tmp_path / "cut")
    timing = ("wall_time_s", "rollout_s", "update_s", "tokens_per_s", "rollout_tokens_per_s")
    whole, cut = ([{k: v for k, v in m.items() if k not in timing} for m in _metrics(tmp_path, name)]
                  for name in ("whole", "cut"))
    assert cut == whole  # every logged loss, KL, β and score, iteration by iteration
    for file in ("model.safetensors", "value_head.safetensors"):
        a = load_file(str(tmp_path / "whole" / "policy" / file))
        b = load_file(str(tmp_path / "cut" / "policy" / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
