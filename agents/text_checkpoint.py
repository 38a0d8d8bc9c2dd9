"""Saving and restoring a text policy: ``save_pretrained`` weights (plain transformers loads
them), the value head, LoRA adapters, and the trainer state a resume needs."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from textenv.agents.checkpoint import pack_training_state, unpack_training_state
from textenv.agents.lm import LMActorCritic

STATE_FILE = "trainer_state.safetensors"


def with_lora(
    model, r: int, alpha: int, adapter_dir: Path | None = None, task_type: str = "CAUSAL_LM"
):
    """``model`` wrapped with trainable LoRA adapters on all linear layers (or the saved ones).
    ``task_type="SEQ_CLS"`` (a reward model) also trains its ``score`` head in full."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ImportError('--lora-r needs peft: pip install "textenv-ppo[lora]"') from None

    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    return get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type=task_type,
        ),
    )


def save_policy(
    path: Path,
    policy: LMActorCritic,
    tokenizer,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    state: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """``save_pretrained`` of the policy (loads with plain transformers) plus
    ``value_head.safetensors`` and, for resuming, ``trainer_state.safetensors`` (optimizer, RNG,
    counters); written to a temp directory and renamed, so a crash never leaves half a
    checkpoint. ``state_dict``: the
    policy's full weights, for a sharded policy whose own tensors are shards; then there is no
    optimizer state to save (``optimizer=None``), only the RNGs and counters."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is not None:
        policy.lm.save_pretrained(
            tmp, state_dict={k[3:]: v for k, v in state_dict.items() if k.startswith("lm.")}
        )
        head = {
            k[len("value_head.") :]: v for k, v in state_dict.items() if k.startswith("value_head.")
        }
    elif hasattr(policy.lm, "merge_and_unload"):
        # LoRA: the adapter (to resume) and the merged weights (to use)
        policy.lm.save_pretrained(tmp / "adapter")
        merged: Any = copy.deepcopy(policy.lm)
        merged.merge_and_unload().save_pretrained(tmp)
    else:
        policy.lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if policy.value_head is not None:
        if state_dict is None:
            head = policy.value_head.state_dict()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in head.items()},
            str(tmp / "value_head.safetensors"),
        )
    if optimizer is not None or state_dict is not None:
        tensors, metadata = pack_training_state(optimizer, generator)
        metadata["state"] = json.dumps(state or {})
        save_file(tensors, str(tmp / STATE_FILE), metadata=metadata)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    return path


def recover_checkpoint(path: Path) -> None:
    """Finish a checkpoint swap that a kill interrupted: :func:`save_policy` moves the old
    checkpoint aside before renaming the new one into place, so ``path`` can be missing while
    the complete old one waits beside it."""
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        old.rename(path)


def load_training_state(
    path: Path, policy: LMActorCritic, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> dict[str, Any]:
    """Value head, optimizer and RNG states from a checkpoint directory; returns its counters."""
    from safetensors import safe_open

    device = next(policy.parameters()).device
    if policy.value_head is not None:
        if not (path / "value_head.safetensors").is_file():
            raise ValueError(
                f"{path} has no value head (it was trained with a critic-free --advantage); "
                "resume it with the same --advantage"
            )
        policy.value_head.load_state_dict(
            load_file(str(path / "value_head.safetensors"), device=str(device))
        )
    with safe_open(str(path / STATE_FILE), framework="pt") as f:
        metadata = f.metadata() or {}
    unpack_training_state(load_file(str(path / STATE_FILE)), metadata, optimizer, generator, device)
    return json.loads(metadata["state"])
