"""Reward models from preference pairs, and preference pairs labelled without people.

- :func:`bradley_terry_loss`: ``−log σ(r_chosen − r_rejected)``, the reward-model loss of
  Ouyang et al. (2022) after Bradley & Terry (1952).
- :func:`read_pairs`, :func:`split_pairs`: a JSONL file of ``{"prompt", "chosen", "rejected"}``
  lines, checked line by line, and its held-out part.
- :func:`reward_model_from_causal_lm`: a scalar ``score`` head on a causal LM's backbone (its
  weights copied), an ``AutoModelForSequenceClassification`` with ``num_labels=1``.
- :func:`train_reward_model`: training with checkpoints and resume; the output folder loads with
  ``AutoModelForSequenceClassification.from_pretrained`` and is the ``reward_model`` of task
  ``RewardModel`` (scored there by :class:`textenv.rewards.ClassifierReward`).
- :func:`make_pairs`: two sampled responses per prompt, the one a gold reward scores higher
  chosen, with optional label noise.

How a text is scored, in training and by ``ClassifierReward`` on the saved folder alike:
``prompt + response`` through the saved tokenizer (padded on the right, cut on the left to
``max_length`` tokens so the response's end is kept), the ``score`` head read at the last token
that is not ``config.pad_token_id`` (transformers' rule for sequence classification). Right
padding leaves every real token's position as it is, so a text's score does not depend on the
batch it is scored in.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from textenv.agents.checkpoint import pack_training_state, unpack_training_state
from textenv.agents.ppo import check_finite_settings
from textenv.agents.runlog import atomic_write_json, atomic_write_text, check_writable_dir
from textenv.agents.text import adamw, autocast
from textenv.agents.text_checkpoint import with_lora
from textenv.agents.training import LinearLR, TrainingRun, seed_everything
from textenv.device import resolve_device, set_torch_threads
from textenv.models import EMBEDDED_NAMES, disable_dropout, ensure_pad_token, load_causal_lm
from textenv.rewards import RewardFn, get_reward, reward_name, score_batch

PAIR_KEYS = ("prompt", "chosen", "rejected")
CONFIG_FILE = "train_rm.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean"}


# -- the loss ---------------------------------------------------------------------------------
def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``−log σ(r_chosen − r_rejected)``: the negative log-likelihood of the
    labels under the Bradley–Terry model ``P(chosen ≻ rejected) = σ(r_chosen − r_rejected)``."""
    return -F.logsigmoid(chosen - rejected).mean()


# -- pair files -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One preference: ``prompt + chosen`` is preferred to ``prompt + rejected``."""

    prompt: str
    chosen: str
    rejected: str


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), "an array" if isinstance(value, list) else "an object")


def read_pairs(path: str | os.PathLike) -> tuple[list[Pair], list[int]]:
    """The pairs of a JSONL file and the line numbers of the pairs left out because their chosen
    and rejected responses are the same text (they carry no preference). Blank lines are
    skipped; other keys of a line (such as make_pairs' gold scores) are ignored. A line that is
    not a pair is a ValueError naming the file, the line and the field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    pairs: list[Pair] = []
    same: list[int] = []
    for n, line in enumerate(lines, 1):  # n: the file's line number, blank lines counted
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(
                f'{path}:{n}: a pair is a JSON object with "prompt", "chosen" and "rejected" '
                f"strings, got {_json_type(row)}"
            )
        for key in PAIR_KEYS:
            if key not in row:
                raise ValueError(
                    f'{path}:{n}: missing key "{key}" (a pair has "prompt", "chosen" and '
                    '"rejected" strings)'
                )
            if not isinstance(row[key], str):
                raise ValueError(
                    f'{path}:{n}: "{key}" must be a string, got {_json_type(row[key])}'
                )
        if not row["prompt"] and not (row["chosen"] and row["rejected"]):
            raise ValueError(
                f"{path}:{n}: an empty prompt with an empty response: no text to score"
            )
        if row["chosen"] == row["rejected"]:
            same.append(n)
            continue
        pairs.append(Pair(row["prompt"], row["chosen"], row["rejected"]))
    if not pairs:
        if same:
            raise ValueError(
                f'{path}: "chosen" equals "rejected" in every pair ({len(same)}): no preference '
                "to learn"
            )
        raise ValueError(f"{path} holds no pairs (the file is empty)")
    return pairs, same


def split_pairs(
    pairs: list[Pair], eval_fraction: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """``(train, held_out)``: ``round(eval_fraction · n)`` pairs (at least one when the fraction
    is > 0) drawn by ``seed`` are held out; both parts keep the file's order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return list(pairs), []
    n_eval = max(1, round(eval_fraction * len(pairs)))
    if n_eval >= len(pairs):
        raise ValueError(
            f"{len(pairs)} pair(s) are too few to hold out {n_eval} and train on the rest "
            "(lower --eval-fraction, 0 for none)"
        )
    held = set(np.random.default_rng(seed).permutation(len(pairs))[:n_eval].tolist())
    train = [p for i, p in enumerate(pairs) if i not in held]
    return train, [p for i, p in enumerate(pairs) if i in held]


# -- the model --------------------------------------------------------------------------------
def reward_tokenizer(tokenizer):
    """A copy of ``tokenizer`` that scores as the reward model does: a pad token (EOS when it
    has none), padding on the right, truncation on the left (the response's end is kept)."""
    tokenizer = copy.deepcopy(tokenizer)
    ensure_pad_token(tokenizer)
    for name, side in (("padding_side", "right"), ("truncation_side", "left")):
        setattr(tokenizer, name, side)
        tokenizer.init_kwargs[name] = side  # save_pretrained writes init_kwargs, not attributes
    return tokenizer


def reward_model_from_causal_lm(lm, tokenizer, *, seed: int = 0, trust_remote_code: bool = False):
    """``(model, tokenizer)``: an ``AutoModelForSequenceClassification`` with one label and
    ``config.pad_token_id`` set, built from ``lm``'s config, its backbone's weights copied from
    ``lm`` and a fresh ``score`` head (initialised by ``seed``); dropout off, on ``lm``'s device.
    Works for any causal LM whose family has a sequence-classification class, the embedded
    GGUF model included (nothing is fetched)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = reward_tokenizer(tokenizer)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_config(
                config, trust_remote_code=trust_remote_code
            )
    except ValueError:
        raise ValueError(
            f"a {config.model_type!r} model has no sequence-classification class in transformers "
            "(AutoModelForSequenceClassification), so it cannot carry a reward head"
        ) from None
    model.base_model.load_state_dict(lm.base_model.state_dict())
    model = model.to(next(lm.parameters()).device)
    return disable_dropout(model), tokenizer


def load_reward_backbone(
    name: str,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    trust_remote_code: bool = False,
):
    """:func:`reward_model_from_causal_lm` on the causal LM ``name`` (``embedded``, ``tiny``,
    an HF id or path: see :func:`textenv.models.load_causal_lm`), on ``device``."""
    lm, tokenizer = load_causal_lm(name, trust_remote_code=trust_remote_code)
    model, tokenizer = reward_model_from_causal_lm(
        lm, tokenizer, seed=seed, trust_remote_code=trust_remote_code
    )
    del lm
    return model.to(device), tokenizer


def rewards_of(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """``[len(texts)]`` float rewards, with gradients when enabled: the tokenizer call and the
    forward that ``ClassifierReward`` makes."""
    device = next(model.parameters()).device
    enc = tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
    ).to(device)
    return model(**enc, use_cache=False).logits[:, 0].float()


def pair_rewards(
    model, tokenizer, pairs: list[Pair], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen, r_rejected)`` of ``pairs``, both sides in one forward."""
    texts = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    rewards = rewards_of(model, tokenizer, texts, max_length)
    return rewards[: len(pairs)], rewards[len(pairs) :]


def score(
    model,
    tokenizer,
    prompts: list[str],
    responses: list[str],
    *,
    max_length: int = 512,
    batch_size: int = 32,
) -> list[float]:
    """The reward of each ``prompt + response``, as ``ClassifierReward`` scores it on the saved
    folder (its ``max_length`` is 512 too)."""
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    was_training = model.training
    model.eval()
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            out += rewards_of(model, tokenizer, texts[i : i + batch_size], max_length).tolist()
    model.train(was_training)
    return out


def evaluate_pairs(
    model, tokenizer, pairs: list[Pair], *, max_length: int = 512, batch_size: int = 16
) -> dict[str, float]:
    """``accuracy`` (the fraction of pairs with ``r_chosen > r_rejected``; a tie counts as
    wrong), the mean Bradley–Terry ``loss`` and the mean ``margin`` ``r_chosen − r_rejected``."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    with torch.inference_mode():
        for i in range(0, len(pairs), batch_size):
            c, r = pair_rewards(model, tokenizer, pairs[i : i + batch_size], max_length)
            chosen.append(c)
            rejected.append(r)
    model.train(was_training)
    rc, rr = torch.cat(chosen), torch.cat(rejected)
    accuracy, loss, margin = torch.stack(
        [(rc > rr).float().mean(), bradley_terry_loss(rc, rr), (rc - rr).mean()]
    ).tolist()
    return {"accuracy": accuracy, "loss": loss, "margin": margin}


def save_reward_model(model, tokenizer, path: str | os.PathLike) -> Path:
    """``save_pretrained`` of the reward model (LoRA adapters merged in) and its tokenizer into
    ``path``: written to a folder inside it first and then moved file by file, each by a
    rename, so no file is ever half written."""
    path = Path(path)
    if hasattr(model, "merge_and_unload"):  # peft: a plain transformers model to load
        model = copy.deepcopy(model).merge_and_unload()
    from transformers.utils import logging as hf_logging

    tmp = path / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one local file: its bar would only clutter stderr
    try:
        model.save_pretrained(tmp)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    for file in tmp.iterdir():
        os.replace(file, path / file.name)
    tmp.rmdir()
    return path


# -- training ---------------------------------------------------------------------------------
@dataclass
class RewardModelConfig:
    """A Bradley–Terry reward model: a scalar head on a causal LM, trained on preference pairs."""

    pairs: str
    """JSONL file of preference pairs, one {"prompt", "chosen", "rejected"} object per line"""
    output: str
    """folder of the reward model (AutoModelForSequenceClassification.from_pretrained loads it),
    with its logs and checkpoint"""
    model: str = "embedded"
    """backbone: embedded (SmolLM2-135M), tiny, or a causal LM's HF id or path; a fresh scalar
    score head goes on top"""
    eval_fraction: float = 0.1
    """fraction of the pairs held out (drawn by --seed) for eval_accuracy (0: none)"""
    epochs: int = 2
    """passes over the training pairs"""
    batch_size: int = 8
    """pairs per optimizer step"""
    learning_rate: float = 1e-5
    """AdamW learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over the steps"""
    max_grad_norm: float = 1.0
    """clip the gradient's norm to this (0: no clipping)"""
    max_length: int = 512
    """tokens of prompt + response scored, the last ones kept (ClassifierReward's default)"""
    lora_r: int = 0
    """train LoRA adapters of this rank (peft, all linear layers) and the score head instead of
    every weight (0: off)"""
    lora_alpha: int = 16
    """LoRA scaling α"""
    seed: int = 1
    """seed of the held-out split, the order of the pairs and the head's initialisation"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16: forwards and backwards under bf16 autocast, fp32 weights; auto: bf16 on CUDA"""
    torch_threads: int = 1
    """torch CPU threads of this process (1 never oversubscribes a machine others use; 0:
    torch's default, one per core)"""
    trust_remote_code: bool = False
    """allow model code from the model's repository (off: only transformers' own code runs)"""
    checkpoint_every: int = 50
    """write the checkpoint every this many steps (0: only at the end or on interruption)"""
    keep_checkpoint: bool = True
    """keep checkpoint.safetensors (weights, optimizer, step) after training, so --resume with
    more --epochs can extend the run"""
    tensorboard: bool = True
    """write TensorBoard events beside metrics.jsonl"""
    progress: bool = True
    """show a progress bar"""

    def validate(self) -> None:
        check_finite_settings(self)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name in ("lora_r", "torch_threads", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")


def _absolute(value: str) -> str:
    """A local path made absolute (so a saved config resumes from anywhere); names unchanged."""
    if value in EMBEDDED_NAMES or value == "tiny" or value.startswith("tiny:"):
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def load_reward_model_config(output: str | os.PathLike) -> RewardModelConfig:
    """The :class:`RewardModelConfig` a reward-model folder was trained with."""
    path = Path(output) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(output)!r} holds no reward-model run (no {CONFIG_FILE})")
    saved = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(RewardModelConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{path} holds settings this version does not have: {', '.join(unknown)}")
    return RewardModelConfig(**saved)


# Settings that define which run a checkpoint belongs to: a resume may not change them.
_RUN_IDENTITY = ("model", "eval_fraction", "batch_size", "seed", "lora_r", "lora_alpha")


def _check_resume(out: Path, config: RewardModelConfig, digest: str) -> None:
    """Refuse, before any model loads, a resume that would not continue the run in ``out``."""
    saved = load_reward_model_config(out)
    changed = [n for n in _RUN_IDENTITY if getattr(saved, n) != getattr(config, n)]
    if changed:
        name = changed[0]
        raise ValueError(
            f"--resume {out} was trained with {name}={getattr(saved, name)!r}; it cannot continue "
            f"with {getattr(config, name)!r} (start a new run instead)"
        )
    if not (out / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {out}: there is no {CHECKPOINT_FILE} (the run ended with "
            "--no-keep-checkpoint, or stopped before its first checkpoint)"
        )
    with safe_open(str(out / CHECKPOINT_FILE), framework="pt") as f:
        state = json.loads((f.metadata() or {}).get("state", "{}"))
    if state.get("pairs_sha256") != digest:
        raise ValueError(
            f"--resume {out}: the pairs file {config.pairs} changed since the run started (its "
            "SHA-256 differs), so the held-out split and the order would not be the run's"
        )


def _fresh_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a file, not a folder")
    metrics = out / "metrics.jsonl"
    taken = any((out / n).exists() for n in ("config.json", CHECKPOINT_FILE, "summary.json"))
    if taken or (metrics.exists() and metrics.stat().st_size > 0):
        raise ValueError(
            f"--output {str(out)!r} already holds a reward model or a run; choose another folder, "
            f"or continue it with --resume {out}"
        )
    check_writable_dir(out, "--output")


def _file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the training pairs in ``epoch``: a function of the seed and the epoch alone,
    so a resumed run takes the same batches as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(
    path: Path, model, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """The trainable weights, the optimizer, the RNGs and ``state`` in one safetensors file,
    written beside ``path`` and renamed over it."""
    tensors, metadata = pack_training_state(optimizer, None)
    for name, p in _trainable(model).items():
        tensors[f"model.{name}"] = p.detach().cpu().contiguous()
    metadata["state"] = json.dumps(state)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _load_checkpoint(path: Path, model, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    device = next(model.parameters()).device
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    params = _trainable(model)
    missing = sorted(set(params) - {k[len("model.") :] for k in tensors if k.startswith("model.")})
    if missing:
        raise ValueError(f"{path} does not hold this model's weights (missing {missing[0]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"model.{name}"].to(device))
    unpack_training_state(tensors, metadata, optimizer, None, device)
    return json.loads(metadata["state"])


def _prepare(
    config: RewardModelConfig, resume: str | os.PathLike | None
) -> tuple[RewardModelConfig, Path, str, tuple[list, list, list[int]]]:
    """Check the settings and the pairs (before any model loads), claim the output folder and
    write the config: the config with absolute paths, the folder, the pair file's digest, and
    the training pairs, the held-out pairs and the lines left out."""
    config.validate()
    out = Path(resume if resume is not None else config.output).expanduser().resolve()
    config = dataclasses.replace(
        config, pairs=_absolute(config.pairs), model=_absolute(config.model), output=str(out)
    )
    pairs, same = read_pairs(config.pairs)
    train, held = split_pairs(pairs, config.eval_fraction, config.seed)
    digest = _file_digest(config.pairs)
    if resume is not None:
        _check_resume(out, config, digest)
    else:
        _fresh_output(out)
    atomic_write_json(out / CONFIG_FILE, dataclasses.asdict(config))
    if same:
        lines = ", ".join(map(str, same[:5])) + (", ..." if len(same) > 5 else "")
        print(
            f"note: left out {len(same)} pair(s) whose chosen equals rejected (lines {lines})",
            file=sys.stderr,
            flush=True,
        )
    return config, out, digest, (train, held, same)


def _step(
    model,
    tokenizer,
    optimizer,
    trainable: list,
    batch: list,
    config: RewardModelConfig,
    device,
    bf16: bool,
) -> list[float]:
    """One AdamW step on a batch's Bradley–Terry loss (skipped when it is not finite): loss,
    accuracy, margin, gradient norm and 1.0 if it stepped, read with one host sync."""
    with autocast(device, bf16):
        chosen, rejected = pair_rewards(model, tokenizer, batch, config.max_length)
    loss = bradley_terry_loss(chosen, rejected)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    values = torch.stack(
        [
            loss.detach(),
            (chosen > rejected).float().mean(),
            (chosen - rejected).mean().detach(),
            grad_norm,
            finite.float(),
        ]
    ).tolist()
    if values[4]:
        optimizer.step()  # a non-finite step leaves the weights as they were
    return values


class _RewardModelTraining:
    """One reward-model run's model, optimizer, schedule and state; its methods are the named
    steps of :func:`train_reward_model`'s loop."""

    def __init__(
        self,
        config: RewardModelConfig,
        out: Path,
        digest: str,
        pairs: tuple[list, list],
        resume: str | os.PathLike | None,
    ) -> None:
        self.config, (self.train, self.held) = config, pairs
        set_torch_threads(config.torch_threads)
        self.device = resolve_device(config.device)
        self.bf16 = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda"
        )
        seed_everything(config.seed)
        if config.progress:
            print(f"loading the backbone ({config.model}) ...", file=sys.stderr, flush=True)
        self.model, self.tokenizer = load_reward_backbone(
            config.model,
            device=self.device,
            seed=config.seed,
            trust_remote_code=config.trust_remote_code,
        )
        if config.lora_r:
            self.model = with_lora(
                self.model, config.lora_r, config.lora_alpha, task_type="SEQ_CLS"
            )
        self.trainable = list(_trainable(self.model).values())
        self.optimizer = adamw(self.trainable, lr=config.learning_rate)
        self.steps_per_epoch = math.ceil(len(self.train) / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.schedule = LinearLR(config.learning_rate, self.total_steps, enabled=config.anneal_lr)
        self.state: dict[str, Any] = {"step": 0, "wall_time_s": 0.0, "pairs_sha256": digest}
        self.checkpoint_path = out / CHECKPOINT_FILE
        self.final_eval: dict[str, float] | None = None
        if resume is not None:
            self.state = _load_checkpoint(self.checkpoint_path, self.model, self.optimizer)
            self.schedule = LinearLR.resumed(
                self.state["lr_schedule"],
                self.state["step"],
                config.learning_rate,
                self.total_steps,
                config.anneal_lr,
            )
            print(
                f"resuming {out} at step {self.state['step'] + 1} of {self.total_steps}",
                file=sys.stderr,
                flush=True,
            )
        elif self.held:
            self.state["eval_before"] = self.evaluate()
        self.start = time.perf_counter() - self.state["wall_time_s"]

    def evaluate(self) -> dict[str, float]:
        with autocast(self.device, self.bf16):
            return evaluate_pairs(
                self.model, self.tokenizer, self.held, max_length=self.config.max_length
            )

    def checkpoint(self, step: int) -> Path:
        self.state.update(
            step=step,
            lr_schedule=self.schedule.state(),
            wall_time_s=time.perf_counter() - self.start,
        )
        return _save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.state)

    def step(self, step: int) -> dict[str, float]:
        """Step ``step``'s batch (the same with or without a resume) and its metrics; the held-out
        pairs are scored at the end of each epoch."""
        config = self.config
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        order = _epoch_order(config.seed, epoch, len(self.train))
        batch = [self.train[i] for i in order[index * config.batch_size :][: config.batch_size]]
        lr = self.schedule.apply(self.optimizer, step)
        values = _step(
            self.model,
            self.tokenizer,
            self.optimizer,
            self.trainable,
            batch,
            config,
            self.device,
            self.bf16,
        )
        metrics: dict[str, float] = {
            "epoch": epoch + 1,
            "train/loss": values[0],
            "train/accuracy": values[1],
            "train/margin": values[2],
            "train/grad_norm": values[3],
            "train/lr": lr,
            "updates": int(values[4]),
        }
        if index == self.steps_per_epoch - 1 and self.held:
            self.final_eval = self.evaluate()
            metrics |= {f"eval/{k}": v for k, v in self.final_eval.items()}
        return metrics

    def finish(self, skipped: int) -> dict[str, Any]:
        """Save the reward model (and the checkpoint, if kept); the summary."""
        config = self.config
        if self.held and self.final_eval is None:  # resumed at the end: nothing trained now
            self.final_eval = self.evaluate()
        save_reward_model(self.model, self.tokenizer, config.output)
        if config.keep_checkpoint:
            self.checkpoint(self.total_steps)
        else:
            self.checkpoint_path.unlink(missing_ok=True)
        before, after = self.state.get("eval_before") or {}, self.final_eval or {}
        return {
            "output": config.output,
            "model": config.model,
            "train_pairs": len(self.train),
            "eval_pairs": len(self.held),
            "skipped_pairs": skipped,
            "epochs": config.epochs,
            "steps": self.total_steps,
            "eval_accuracy": after.get("accuracy"),
            "eval_loss": after.get("loss"),
            "eval_margin": after.get("margin"),
            "eval_accuracy_before": before.get("accuracy"),
            "eval_loss_before": before.get("loss"),
            "wall_time_s": time.perf_counter() - self.start,
        }


def train_reward_model(
    config: RewardModelConfig, resume: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Train as ``config`` says into ``config.output`` (``resume``: continue the run in that
    folder from its checkpoint); return the summary, also written to ``summary.json``.

    Each step scores a batch of pairs (chosen and rejected texts in one forward) and takes an
    AdamW step on their Bradley–Terry loss. The held-out pairs are scored before training and
    after each epoch. SIGINT/SIGTERM stop after the step with a checkpoint.
    """
    config, out, digest, (train, held, same) = _prepare(config, resume)
    t = _RewardModelTraining(config, out, digest, (train, held), resume)
    done = t.state["step"]
    run = TrainingRun(
        out,
        tensorboard=config.tensorboard,
        checkpoint=t.checkpoint,
        resumed_at=(done, done) if resume is not None else None,
    )
    run.last_iteration = done
    from tqdm import tqdm

    bar = tqdm(
        range(done + 1, t.total_steps + 1),
        initial=done,
        total=t.total_steps,
        disable=not config.progress,
        unit="step",
        dynamic_ncols=True,
    )
    t.model.train()
    try:
        with run.loop():
            for step in bar:
                metrics = t.step(step)
                loss, acc = metrics["train/loss"], metrics["train/accuracy"]
                bar.set_postfix_str(f"loss {loss:.3f} acc {acc:.2f}", refresh=False)
                run.end_iteration(step, step, metrics, f"(up to step {step})")
                every = config.checkpoint_every
                if every and step % every == 0 and step < t.total_steps:
                    t.checkpoint(step)
    finally:
        bar.close()
    return run.finish(t.finish(len(same)))


# -- preference pairs without people ----------------------------------------------------------
@dataclass
class PairsConfig:
    """Preference pairs without people: two responses sampled per prompt, the one a gold reward
    scores higher is chosen (ties are skipped); label noise stands in for human disagreement."""

    gold: str
    """the labelling reward: a built-in or registered name (vader, length, ...) or
    module:callable"""
    output: str
    """JSONL file to write: prompt, chosen, rejected, their gold scores, and whether the label
    was flipped by --label-noise"""
    model: str = "embedded"
    """the model that samples the responses: embedded (SmolLM2-135M), tiny, an HF id or a path"""
    prompts: str = "RewardModel"
    """a single-turn task's name (its prompts) or a prompts file (one per line, or JSONL with a
    "prompt" string or chat "messages" per line)"""
    split: Literal["all", "train", "test"] = "train"
    """which prompts: every 5th is held out (test); train keeps the text trainer's held-out
    prompts out of the pairs"""
    num_pairs: int = 256
    """pairs to write"""
    temperature: float = 1.0
    """sampling temperature"""
    max_new_tokens: int | None = None
    """response budget (default: the task's, or 24 for a prompts file)"""
    label_noise: float = 0.0
    """probability that a pair's label is flipped (chosen and rejected swapped)"""
    batch_size: int = 16
    """prompts per sampling call (two responses each)"""
    seed: int = 1
    """seed of the prompt order, the sampling and the label noise"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    torch_threads: int = 1
    """torch CPU threads of this process (0: torch's default, one per core)"""
    trust_remote_code: bool = False
    """allow model code from the model's repository (off: only transformers' own code runs)"""
    progress: bool = True
    """show a progress bar"""

    def validate(self) -> None:
        check_finite_settings(self)
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {self.num_pairs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must lie in [0, 1], got {self.label_noise}")
        for name in ("seed", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def pair_prompts(config: PairsConfig) -> tuple[list[Any], int, bool]:
    """``(prompts, max_new_tokens, chat_fallback)`` of ``config.prompts``: a single-turn task's
    prompts and budget, or a prompts file's (budget 24), cut to ``config.split``."""
    from textenv.tasks import TASKS, Task, make_task, read_prompts, split_prompts

    single = sorted(name for name, cls in TASKS.items() if issubclass(cls, Task))
    if config.prompts in TASKS:
        if config.prompts not in single:
            raise ValueError(
                f"--prompts {config.prompts} is a multi-turn task; give a single-turn task "
                f"({', '.join(single)}) or a prompts file"
            )
        task = make_task(config.prompts, split=config.split)
        assert isinstance(task, Task)
        task.validate()
        budget = config.max_new_tokens or task.max_new_tokens
        return list(task.prompts), budget, task.chat_fallback
    if not Path(config.prompts).expanduser().exists():
        raise ValueError(
            f"--prompts {config.prompts!r} is neither a task ({', '.join(single)}) nor a file"
        )
    prompts = split_prompts(read_prompts(config.prompts), config.split)
    if not prompts:
        raise ValueError(f"--prompts {config.prompts}: no prompts in split {config.split!r}")
    return prompts, config.max_new_tokens or 24, False


def _render(tokenizer, prompt: Any, chat_fallback: bool) -> tuple[str, bool]:
    """``(text, is_chat_template)``, rendered as the text env renders it: chat messages through
    the tokenizer's chat template (or joined, for a task that allows it)."""
    if isinstance(prompt, str):
        return prompt, False
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            list(prompt), tokenize=False, add_generation_prompt=True
        )
        return str(text), True
    if chat_fallback:
        return "\n\n".join(m["content"] for m in prompt) + "\n", False
    raise ValueError("a chat prompt (a list of messages) needs a tokenizer with a chat template")


def sample_two(
    lm, tokenizer, prompts: list[tuple[str, bool]], max_new_tokens: int, temperature: float
) -> list[str]:
    """Two responses per prompt (rows ``2i`` and ``2i + 1``), sampled by ``generate`` from the
    whole tempered distribution and decoded as the text env decodes them (special tokens
    dropped)."""
    ids = [
        tokenizer(text, add_special_tokens=not chat)["input_ids"]
        for text, chat in prompts
        for _ in range(2)
    ]
    enc = tokenizer.pad([{"input_ids": i} for i in ids], return_tensors="pt").to(lm.device)
    with torch.inference_mode():
        out = lm.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = out[:, enc["input_ids"].shape[1] :]
    return [str(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def _sampler(config: PairsConfig):
    """The sampling model and a left-padding copy of its tokenizer, seeded by ``config.seed``."""
    set_torch_threads(config.torch_threads)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    lm, tokenizer = load_causal_lm(
        config.model, device=device, trust_remote_code=config.trust_remote_code
    )
    tokenizer = copy.deepcopy(tokenizer)  # the embedded model's tokenizer is shared: pad a copy
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return lm, tokenizer


def _label_pairs(
    prompts: list[str],
    responses: list[str],
    scores: list[float],
    want: int,
    label_noise: float,
    noise_rng: np.random.Generator,
) -> tuple[list[dict[str, Any]], int]:
    """Up to ``want`` labelled pairs from two responses per prompt (rows ``2i``, ``2i + 1``) and
    the number of ties skipped on the way; one noise draw per kept pair."""
    rows: list[dict[str, Any]] = []
    ties = 0
    for i, prompt in enumerate(prompts):
        if len(rows) == want:
            break
        first = (responses[2 * i], scores[2 * i])
        second = (responses[2 * i + 1], scores[2 * i + 1])
        if first[1] == second[1]:
            ties += 1
            continue
        chosen, rejected = (first, second) if first[1] > second[1] else (second, first)
        flip = bool(noise_rng.random() < label_noise)
        if flip:
            chosen, rejected = rejected, chosen
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen[0],
                "rejected": rejected[0],
                "gold_chosen": chosen[1],
                "gold_rejected": rejected[1],
                "flipped": flip,
            }
        )
    return rows, ties


def make_pairs(config: PairsConfig, gold: RewardFn | None = None) -> dict[str, Any]:
    """Sample pairs and label them with the gold reward (``gold``, a callable, replaces
    ``config.gold``); write ``config.output`` atomically; return the summary.

    Prompts are drawn in shuffled passes over the prompt set (seeded), so each is used about as
    often as the others. A pair whose two gold scores are equal is skipped; each kept pair's
    label is flipped with probability ``label_noise`` (its own seeded stream, one draw per kept
    pair). Each line holds ``gold_chosen``/``gold_rejected`` (the gold scores of the texts as
    labelled) and ``flipped``.
    """
    config.validate()
    reward = gold if gold is not None else get_reward(config.gold)  # an unknown spec fails now
    prompts, max_new_tokens, chat_fallback = pair_prompts(config)
    out = Path(config.output).expanduser()
    if out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a folder; give a file name")
    check_writable_dir(out.parent, "--output's folder")
    lm, tokenizer = _sampler(config)
    rendered = [_render(tokenizer, p, chat_fallback) for p in prompts]
    order_rng = np.random.default_rng(config.seed)
    noise_rng = np.random.default_rng([config.seed, 1])
    queue: list[int] = []
    rows: list[dict[str, Any]] = []
    drawn = ties = flipped = 0
    from tqdm import tqdm

    bar = tqdm(total=config.num_pairs, disable=not config.progress, unit="pair", dynamic_ncols=True)
    try:
        while len(rows) < config.num_pairs:
            if ties > 10 * config.num_pairs:
                raise ValueError(
                    f"the gold reward {reward_name(reward)!r} tied on {ties} of {drawn} sampled "
                    f"pairs; {len(rows)} of {config.num_pairs} pairs made (a gold reward with "
                    "finer scores, a higher --temperature or --max-new-tokens ties less)"
                )
            while len(queue) < config.batch_size:
                queue += order_rng.permutation(len(prompts)).tolist()
            batch = [rendered[i] for i in queue[: config.batch_size]]
            del queue[: config.batch_size]
            responses = sample_two(lm, tokenizer, batch, max_new_tokens, config.temperature)
            texts = [text for text, _ in batch for _ in range(2)]
            scores = score_batch(reward, texts, responses)
            drawn += len(batch)
            new, tied = _label_pairs(
                [text for text, _ in batch],
                responses,
                scores,
                config.num_pairs - len(rows),
                config.label_noise,
                noise_rng,
            )
            rows += new
            ties += tied
            flipped += sum(row["flipped"] for row in new)
            bar.update(len(new))
    finally:
        bar.close()
    atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    return {
        "output": str(out.resolve()),
        "pairs": len(rows),
        "prompts_drawn": drawn,
        "ties_skipped": ties,
        "flipped": flipped,
        "label_noise": config.label_noise,
        "gold": reward_name(reward),
        "model": config.model,
        "gold_margin_mean": float(
            np.mean([abs(r["gold_chosen"] - r["gold_rejected"]) for r in rows])
        ),
    }
