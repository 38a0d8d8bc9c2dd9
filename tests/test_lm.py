"""The language-model actor-critic's pieces against direct references: settings refused,
the value head on the last hidden state, the entropy's gradient switch, top-k/top-p filtering
on any leading shape and at its boundaries, inverse-CDF sampling at its edges."""

import pytest
import torch

from textenv.agents.lm import LMActorCritic, filter_logits, sample_categorical
from textenv.models import load_causal_lm


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(temperature=-1.0), "temperature must be > 0"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_k=-1, top_p=0.5), "top_k must be >= 0"),
        (dict(top_p=0.0), "top_p in \\(0, 1\\]"),
        (dict(top_p=1.5), "top_p in \\(0, 1\\]"),
    ],
)
def test_settings_that_cannot_sample_are_refused(kwargs, message):
    lm, _ = load_causal_lm("tiny")
    with pytest.raises(ValueError, match=message):
        LMActorCritic(lm, **kwargs)
    LMActorCritic(lm, temperature=0.5, top_k=3, top_p=1.0)  # the edges that are allowed


def test_the_value_head_reads_the_lms_last_hidden_state():
    lm, tok = load_causal_lm("tiny:1")
    policy = LMActorCritic(lm)
    torch.nn.init.normal_(policy.value_head.weight, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    actions = ids[:, 2:]
    with torch.no_grad():
        _, _, values = policy.evaluate_responses(ids, mask, actions, prompt_len=2)
        hidden = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        expected = policy.value_head(hidden).squeeze(-1)[
            :, 1:-1
        ]  # positions before each response token
    torch.testing.assert_close(values, expected)
    assert not torch.allclose(
        values, policy.value_head(hidden.new_zeros(hidden.shape)).squeeze(-1)[:, 1:-1]
    )


def test_the_entropy_carries_a_gradient_only_when_asked_and_enabled():
    lm, _ = load_causal_lm("tiny:1")
    policy = LMActorCritic(lm)
    ids = torch.tensor([[3, 4, 5, 6]])
    args = (ids, torch.ones_like(ids), ids[:, 2:], 2)
    assert policy.evaluate_responses(*args)[
        1
    ].requires_grad  # the default keeps the entropy bonus trainable
    assert not policy.evaluate_responses(*args, entropy_grad=False)[1].requires_grad
    with torch.no_grad():
        assert not policy.evaluate_responses(*args, entropy_grad=True)[1].requires_grad


def _filter_rows(logits, top_k, top_p):
    return torch.stack([filter_logits(row.unsqueeze(0), top_k, top_p)[0] for row in logits])


@pytest.mark.parametrize("top_k, top_p", [(2, 1.0), (0, 0.6), (3, 0.7)])
def test_filtering_acts_on_the_last_dimension_of_any_shape(top_k, top_p):
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    batched = filter_logits(logits, top_k, top_p)
    for i in range(2):
        assert torch.equal(batched[i], _filter_rows(logits[i], top_k, top_p))


def test_filter_boundaries():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.isfinite(filter_logits(logits, 1, 1.0)).tolist() == [
        [True, False, False, False]
    ]  # top_k=1: the max
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)  # off
    # top_p = 1 leaves even a distribution whose head already sums to 1.0 in float32 alone.
    peaked = torch.tensor([[30.0, 0.0, 0.0, 0.0]])
    assert torch.equal(filter_logits(peaked, 0, 1.0), peaked)
    # Uniform over 4: the kept set is the smallest whose mass reaches top_p = 0.5 (two tokens, not three).
    assert torch.isfinite(filter_logits(torch.zeros(1, 4), 0, 0.5)).sum() == 2


def test_sampling_never_draws_a_zero_probability_token_even_at_u_zero(monkeypatch):
    probs = torch.tensor([[0.0, 1.0, 0.0, 3.0]])  # unnormalised rows are fine
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(1, 1, dtype=k.get("dtype")))
    assert sample_categorical(probs).tolist() == [1]


def test_sampling_stays_in_the_vocabulary_at_u_one(monkeypatch):
    probs = torch.tensor([[1.0, 1.0, 1.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(1, 1, dtype=k.get("dtype")))
    assert sample_categorical(probs).tolist() == [2]


def test_sampling_unnormalised_rows_matches_their_normalised_distribution():
    probs = torch.tensor([[2.0, 2.0, 4.0]])  # sums to 8: the draw scales the uniform by the total
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_categorical(probs, g) for _ in range(20_000)])
    freq = torch.bincount(draws, minlength=3).double() / draws.numel()
    torch.testing.assert_close(
        freq, torch.tensor([0.25, 0.25, 0.5], dtype=torch.double), rtol=0, atol=0.02
    )
