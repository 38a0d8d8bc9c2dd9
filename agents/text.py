"""PPO on language models through the text environments (RLHF as in Ziegler et al. 2019 /
InstructGPT), with the same PPO core and GAE as the classic trainer.

One iteration: reset the vector env and sample one response per row (the policy's own KV
cache, the env's reference model beside it), shape the per-token reward, GAE over tokens,
whiten advantages, then K epochs of minibatched PPO over whole sequences. ``--advantage``
swaps GAE for a critic-free estimator (GRPO, RLOO, REINFORCE++: :mod:`textenv.agents.advantages`)
on the same update; with ``--group-size k`` each prompt is sampled k times in the batch.

β has one owner, the env's ``kl_coef``: the adaptive controller sets it, the shaped reward
(:func:`textenv.kl.kl_penalized_rewards`) or the loss's KL term reads it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import os
import re
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from textenv.agents.advantages import (
    ESTIMATORS,
    GROUP_ESTIMATORS,
    critic_free_advantages,
    needs_critic,
)
from textenv.agents.distributed import Dist, distributed_run, full_state_dict, shard_policy
from textenv.agents.lm import LMActorCritic, response_packing
from textenv.agents.ppo import (
    PPOConfig,
    check_finite_settings,
    normalize,
    ppo_update,
    validate_rates,
)
from textenv.agents.rollout_text import (
    Rollout,
    collect_rollout,
    compiled_decode,
    evaluate_held_out,
    kl_k3,
    recompute_logprobs,
    rollout_stats,
    samples_table,
    shaped_rewards,
    token_advantages,
)
from textenv.agents.runlog import check_writable_dir
from textenv.agents.text_checkpoint import (
    STATE_FILE,
    load_training_state,
    recover_checkpoint,
    save_policy,
    with_lora,
)
from textenv.agents.training import (
    LinearLR,
    TrainingRun,
    resumed_world_note,
    seed_everything,
    summary_line,
)
from textenv.device import resolve_device, set_torch_threads
from textenv.env import TextGenerationVectorEnv
from textenv.models import AdaptersDisabled, load_causal_lm
from textenv.rewards import RewardError, get_reward, importing_from
from textenv.tasks import HELD_OUT_EVERY, Task, make_task, read_prompts

__all__ = [
    "AdaptiveKLController",
    "TextTrainConfig",
    "evaluate_text_run",
    "load_text_run_config",
    "summary_line",
    "train_text",
]


def _text_ppo() -> PPOConfig:
    # TRL-like: 4 epochs, clipped value loss with vf_coef 0.1, advantages whitened per batch.
    return PPOConfig(
        update_epochs=4,
        num_minibatches=4,
        clip_coef=0.2,
        vf_coef=0.1,
        ent_coef=0.0,
        max_grad_norm=1.0,
        norm_adv=False,
    )


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    temperature: float = 1.0
    """sampling temperature; the policy's and the reference's log-probs are both of the tempered
    distribution (training samples from the whole tempered distribution: top-k/top-p are for
    textenv-evaluate)"""
    group_size: int = 1
    """responses sampled per prompt in each batch (consecutive rows share a prompt); grpo and rloo
    need >= 2"""
    static_cache: bool = False
    """allocate the policy's KV cache once at its final length (transformers' StaticCache): every
    decode step has the same shapes, as torch.compile and CUDA graphs need (single-turn tasks)"""
    rollout_block: int = 0
    """tokens the policy samples before the env answers them in one call (one host sync and one
    reference forward per block instead of per token; the same tokens and rollout as 1); 0:
    16 on CUDA, else 1 (single-turn tasks)"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the rollout's decode step (CUDA graphs on CUDA) over a static KV cache, whose
    length is bucketed so graphs are reused; the same tokens as eager. auto: on with CUDA (not
    with --fsdp or a multi-turn task), off on the CPU, where compiling is not won back"""


@dataclass
class KLConfig:
    """The KL penalty to the reference and its coefficient β."""

    kl_coef: float | None = None
    """β of the KL penalty, the env's kl_coef (default: the task's); the initial value when
    kl_target is set"""
    kl_target: float | None = None
    """adaptive β (Ziegler et al.): the KL to the reference per response to aim for; None keeps β
    fixed"""
    kl_horizon: int = 10_000
    """horizon of the adaptive KL controller, in episodes"""
    reference_pass: Literal["at_end", "per_step"] = "at_end"
    """when the env's reference model runs: at_end (one forward per finished response) or per_step
    (one KV-cached step per token); the shaped per-token rewards are the same, at_end is faster"""
    kl_in_loss: bool = False
    """put β·KL (k3 estimator) in the loss instead of in the reward (the reward is then the
    score)"""


@dataclass
class EstimatorConfig:
    """How advantages are estimated from the shaped rewards."""

    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """advantage estimator: gae (value head, GAE over tokens); critic-free, with no value head: grpo
    (return minus its group's mean, over the group's std), rloo (minus the mean of the rest of its
    group), reinforce_pp (REINFORCE++: KL-shaped return to go, whitened over the batch)"""
    grpo_scale: bool = True
    """grpo: divide by the group's std (off: Dr. GRPO, the return minus the group mean only)"""
    gamma: float = 1.0
    """discount over tokens (gae, reinforce_pp)"""
    gae_lambda: float = 0.95
    """λ of GAE over tokens"""
    whiten_advantages: bool = True
    """gae: whiten advantages over the whole batch's response tokens (reinforce_pp always does, grpo
    and rloo never: their group baseline is the normalisation)"""


@dataclass
class LMConfig:
    """Where and how the policy model is held and run: device, precision, LoRA, sharding."""

    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16: mixed precision (fp32 weights, optimizer state and checkpoints; forwards and backwards
    under bf16 autocast, the reference's too); fp32; auto: bf16 on CUDA, fp32 on a CPU"""
    old_logprobs: Literal["auto", "rollout", "recompute"] = "auto"
    """where PPO's old log-probs and values come from: rollout (the KV-cached sampling forward),
    recompute (one no-grad pass of the update's own forward before the epochs, so the first ratio is
    exactly 1); auto: recompute under bf16, on CUDA or with --fsdp, where the two forwards differ by
    more than rounding"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the update"""
    pack_micro_batches: bool = True
    """forward each micro-batch of the update at its own rows' width, rows of similar length
    together, instead of at the batch's longest response (the same gradient up to rounding, fewer
    padded tokens; off: the same shapes in every forward)"""
    lora_r: int = 0
    """train LoRA adapters of this rank (peft, all linear layers) instead of every weight (0:
    off)"""
    lora_alpha: int = 16
    """LoRA scaling α"""
    fsdp: bool = False
    """shard the policy over the torchrun processes with FSDP2 (torch's fully_shard: nccl on GPUs,
    gloo on CPUs), for models whose weights, gradients and optimizer state do not fit one device;
    checkpoints hold the full weights but not the sharded optimizer state, so a sharded run cannot
    be resumed yet; not with --lora-r"""
    torch_threads: int = 1
    """torch CPU threads of this process (1 never oversubscribes a machine others use; 0: torch's
    default, one per core, fastest only on an otherwise idle machine)"""
    trust_remote_code: bool = False
    """allow model code from the model's repository (off: only transformers' own code runs)"""


@dataclass
class LoggingConfig:
    """The run directory, its logs and checkpoints."""

    sample_every: int = 5
    """log a table of prompts and responses every this many iterations"""
    run_name: str | None = None
    """run directory name (default: <task>__<seed>__<date-time>)"""
    runs_dir: str = "runs"
    """parent of run directories"""
    tensorboard: bool = True
    """write TensorBoard events beside metrics.jsonl"""
    progress: bool = True
    """show a progress bar"""
    save_checkpoint: bool = True
    """save the policy with save_pretrained (plus value head and training state) at the end"""
    checkpoint_every: int = 10
    """also checkpoint every this many iterations (0: only at the end or on interruption)"""


@dataclass
class TextTrainConfig:
    """PPO on a text-generation task: the policy LM writes responses, the env scores them."""

    task: str = "Sentiment"
    """task name: Sentiment, RewardModel, Arithmetic, Toy, Instructions, ReasoningGym or a curated
    reasoning-gym task (RG-BasicArithmetic, RG-ChainSum, RG-LegCounting, RG-LetterCounting,
    RG-SpellBackward); multi-turn: Calculator (a tool task), GuessTheNumber, TicTacToe, TextArena,
    ToyTurns, MultiTurn (your respond function: --task-options '{"respond": "module:callable",
    "prompts": [...]}'); or module:Class, your Task or MultiTurnTask subclass"""
    model: str = "embedded"
    """policy and reference model: embedded (SmolLM2-135M), tiny, an HF id or a path"""
    reward: str | None = None
    """reward override: a built-in or registered name, or module:callable"""
    reward_model: str | None = None
    """RewardModel task: AutoModelForSequenceClassification id or path"""
    prompts: str | None = None
    """a prompts file instead of the task's: one prompt per line, or JSONL with a "prompt" string or
    chat "messages" per line (rendered with the tokenizer's chat template)"""
    task_options: str | None = None
    """task fields as a JSON object, e.g. '{"config": {"max_terms": 2}, "answer_format": "number"}'
    for a reasoning-gym task or '{"max_turns": 4}' for a multi-turn one"""
    import_dir: str | None = None
    """the folder module:callable and module:Class names (--reward, --task, respond) are imported
    from, before the working directory (default: the working directory); the run records it, so
    --resume and textenv-evaluate work from any folder"""
    iterations: int = 20
    """PPO iterations (rollout + update)"""
    target_score: float | None = None
    """stop early once the mean score over the last ``target_window`` iterations reaches this"""
    target_window: int = 5
    """iterations averaged for ``target_score``"""
    num_envs: int = 16
    """episodes (responses) per iteration"""
    max_new_tokens: int | None = None
    """response budget (default: the task's); for a multi-turn task, the agent's budget per turn"""
    missing_eos_penalty: float | None = None
    """subtract this from the score of responses that hit the budget without EOS"""
    learning_rate: float = 1e-5
    """AdamW learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over ``iterations`` (TRL's and CleanRL's default); on
    --resume with more iterations the decay continues from the rate reached, without a jump"""
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    """how responses are sampled"""
    kl: KLConfig = dataclasses.field(default_factory=KLConfig)
    """the KL penalty to the reference and its coefficient β"""
    estimator: EstimatorConfig = dataclasses.field(default_factory=EstimatorConfig)
    """how advantages are estimated from the shaped rewards"""
    lm: LMConfig = dataclasses.field(default_factory=LMConfig)
    """where and how the policy model is held and run: device, precision, LoRA, sharding"""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """the run directory, its logs and checkpoints"""
    ppo: PPOConfig = dataclasses.field(default_factory=_text_ppo)
    """the PPO update's hyperparameters"""
    seed: int = 1
    """seed of prompts, sampling and minibatches"""
    eval_samples: int = 32
    """responses sampled on the held-out prompts (every 5th of the set, not trained on) before and
    after training, their mean score and KL printed at the end (0: off, and every prompt is trained
    on)"""
    eval_every: int = 0
    """also evaluate on the held-out prompts every this many iterations, logged as eval_score,
    eval_score_se and eval_kl (0: only before and after training)"""
    eval_rewards: tuple[str, ...] = ()
    """more rewards scored on the held-out responses at every evaluation, logged as
    eval_<name> (e.g. a gold reward beside a learned reward model: --eval-rewards vader);
    built-in or registered names, or module:callable"""

    def validate(self) -> None:
        check_finite_settings(self)
        for name in ("iterations", "num_envs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        validate_rates(self.learning_rate, self.estimator.gamma, self.estimator.gae_lambda)
        if self.sampling.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.sampling.temperature}")
        if self.kl.kl_target is not None and self.kl.kl_target <= 0:
            raise ValueError(f"kl_target must be > 0, got {self.kl.kl_target}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if (self.eval_every or self.eval_rewards) and self.eval_samples < 1:
            flag = "--eval-every" if self.eval_every else "--eval-rewards"
            raise ValueError(f"{flag} needs --eval-samples > 0 (held-out responses to score)")
        keys = [eval_reward_key(spec) for spec in self.eval_rewards]
        if len(set(keys)) < len(keys):
            raise ValueError(f"eval_rewards name the same metric twice: {list(self.eval_rewards)}")
        if self.target_window < 1:
            raise ValueError(f"target_window must be >= 1, got {self.target_window}")
        if self.lm.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lm.lora_r}")
        if self.lm.fsdp and self.lm.lora_r:
            raise ValueError(
                "--fsdp with --lora-r is not supported (LoRA's adapters are small: train them "
                "without sharding)"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name, value in (
            ("eval_samples", self.eval_samples),
            ("torch_threads", self.lm.torch_threads),
            ("seed", self.seed),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.estimator.advantage not in ESTIMATORS:
            raise ValueError(
                f"advantage must be one of {', '.join(ESTIMATORS)}, got "
                f"{self.estimator.advantage!r}"
            )
        if self.sampling.group_size < 1 or self.num_envs % self.sampling.group_size:
            raise ValueError(
                f"group_size={self.sampling.group_size} must be >= 1 and divide "
                f"num_envs={self.num_envs}"
            )
        if self.estimator.advantage in GROUP_ESTIMATORS and self.sampling.group_size < 2:
            raise ValueError(
                f"--advantage {self.estimator.advantage} needs --group-size >= 2 (its baseline is "
                "the other "
                f"responses to the same prompt), got {self.sampling.group_size}"
            )
        if self.sampling.rollout_block < 0:
            raise ValueError(f"rollout_block must be >= 0, got {self.sampling.rollout_block}")
        if self.sampling.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {self.sampling.compile!r}")
        if self.sampling.compile == "on" and self.lm.fsdp:
            raise ValueError("--compile on with --fsdp is not supported (sharded forwards)")
        fixed = self.sampling.static_cache or self.sampling.compile == "on"
        if (fixed or self.sampling.rollout_block > 1) and is_multi_turn(self.task, self.import_dir):
            for name, on in (
                ("--static-cache", self.sampling.static_cache),
                ("--compile on", self.sampling.compile == "on"),
                ("--rollout-block > 1", self.sampling.rollout_block > 1),
            ):
                if on:
                    raise ValueError(
                        f"{name} is for single-turn tasks; {self.task} is a multi-turn task "
                        "(a conversation's length is not known in advance)"
                    )
        if self.lm.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.lm.precision!r}")
        if self.lm.old_logprobs not in ("auto", "rollout", "recompute"):
            raise ValueError(
                f"old_logprobs must be auto, rollout or recompute, got {self.lm.old_logprobs!r}"
            )
        self.ppo.validate(self.num_envs)

    @classmethod
    def from_flat(cls, **settings: Any) -> TextTrainConfig:
        """A config from settings named as their command-line flags, whichever sub-config holds
        them: ``TextTrainConfig.from_flat(task="Toy", kl_coef=0.1, device="cpu")``."""
        groups: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for name, value in settings.items():
            owner = next((g for g, c in _SUB_CONFIGS.items() if name in _field_names(c)), None)
            if owner is None:
                top[name] = value
            else:
                groups.setdefault(owner, {})[name] = value
        return cls(**top, **{g: _SUB_CONFIGS[g](**kw) for g, kw in groups.items()})

    def bf16(self, device: torch.device) -> bool:
        """Whether the run computes in bf16 on ``device``."""
        return self.lm.precision == "bf16" or (
            self.lm.precision == "auto" and device.type == "cuda"
        )

    def compile_rollout(self, device: torch.device) -> bool:
        """Whether the rollout's decode step is compiled (see ``SamplingConfig.compile``)."""
        if self.sampling.compile != "auto":
            return self.sampling.compile == "on"
        if device.type != "cuda" or self.lm.fsdp:
            return False
        return not is_multi_turn(self.task, self.import_dir)

    def rollout_block(self, device: torch.device) -> int:
        """Tokens sampled per env call (see ``SamplingConfig.rollout_block``)."""
        if self.sampling.rollout_block:
            return self.sampling.rollout_block
        if device.type != "cuda":
            return 1
        return 1 if is_multi_turn(self.task, self.import_dir) else 16

    def recompute_old_logprobs(self, device: torch.device) -> bool:
        """Whether old log-probs come from the update's forward (see ``old_logprobs``)."""
        if self.lm.old_logprobs != "auto":
            return self.lm.old_logprobs == "recompute"
        return self.bf16(device) or device.type == "cuda" or self.lm.fsdp


_SUB_CONFIGS: dict[str, type] = {
    "sampling": SamplingConfig,
    "kl": KLConfig,
    "estimator": EstimatorConfig,
    "lm": LMConfig,
    "logging": LoggingConfig,
}


def eval_reward_key(spec: str) -> str:
    """The metric name of an ``--eval-rewards`` spec: ``eval_vader``, ``eval_mymodule_gold``."""
    return "eval_" + re.sub(r"[^0-9A-Za-z]+", "_", spec).strip("_")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16`` (weights stay fp32: small updates are not
    rounded away), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class AdaptiveKLController:
    """Ziegler et al. (2019): nudge β so that the KL per response tracks ``target``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10_000) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def adamw(params: list[torch.nn.Parameter], lr: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW, fused where :func:`fused_adamw_applies` (``fused=False``: never); elsewhere
    torch's own choice of kernel."""
    use_fused = fused and fused_adamw_applies(params)
    return torch.optim.AdamW(
        params, lr=lr, eps=1e-5, weight_decay=0.0, fused=True if use_fused else None
    )


def fused_adamw_applies(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW takes ``params``: plain floating tensors on CUDA or the CPU
    (5× faster steps on CPU for a 135M model than the for-each kernel, one kernel per step on a
    GPU, and PPO then skips a non-finite step without a host sync). Not FSDP's sharded
    parameters (a tensor subclass): torch picks their kernel."""
    return bool(params) and all(
        type(p) in (torch.Tensor, torch.nn.Parameter)
        and p.device.type in ("cuda", "cpu")
        and torch.is_floating_point(p)
        for p in params
    )


def peak_memory_gib(device: torch.device) -> float:
    """The process's peak memory in GiB: on CUDA the allocator's since its last reset
    (``torch.cuda.reset_peak_memory_stats``), on a CPU the peak resident set size of the
    process's life (the OS keeps no other); NaN where neither is known."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024) / 2**30


def load_text_run_config(run_dir: str | Path) -> TextTrainConfig:
    """The :class:`TextTrainConfig` a run directory was started with."""
    run_dir = Path(run_dir)
    recover_checkpoint(run_dir / "policy")
    if not (run_dir / "config.json").is_file() or not (run_dir / "policy" / STATE_FILE).is_file():
        raise ValueError(
            f"{str(run_dir)!r} is not a text run directory with a checkpoint "
            f"(config.json + policy/{STATE_FILE})"
        )
    raw = json.loads((run_dir / "config.json").read_text())
    try:
        return _config_from_dict(TextTrainConfig, raw)
    except KeyError as err:
        raise ValueError(
            f"{run_dir / 'config.json'} has settings this version does not have ({err.args[0]}): "
            "it was written by an older version (see CHANGELOG.md); start a new run from its "
            f"weights with --model {run_dir / 'policy'}"
        ) from None


def _config_from_dict(cls: Any, raw: dict[str, Any]) -> Any:
    """``cls`` (a config dataclass) from its ``dataclasses.asdict`` form, sub-configs included;
    KeyError naming the settings ``cls`` does not have."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise KeyError(", ".join(unknown))
    return cls(
        **{
            k: _config_from_dict(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v
            for k, v in raw.items()
        }
    )


def train_text(config: TextTrainConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Train as ``config`` says; log, checkpoint, write ``summary.json``; return the summary.

    ``resume``: a run directory to continue from its last checkpoint (policy, value head,
    optimizer, β, learning-rate schedule, iteration and RNG states); metrics are appended.
    SIGINT/SIGTERM stop at the end of the iteration with a checkpoint
    (:class:`TrainingInterrupted`).

    Under ``torchrun`` each of the N processes samples ``num_envs / N`` responses (its own
    prompts and sampling stream) and the update is the one-process update of the whole batch
    (:mod:`textenv.agents.distributed`): whitening, the KL that drives β and every logged
    metric are over all responses. Rank 0 alone writes, logs samples and evaluates.
    """
    config.validate()
    config = with_absolute_paths(config)
    with distributed_run(resolve_device(config.lm.device)) as (dist, device):
        return _train_text(config, resume, dist, device)


def _train_text(
    config: TextTrainConfig, resume: str | Path | None, dist: Dist, device: torch.device
) -> dict[str, Any]:
    local_envs = check_run_layout(config, resume, dist)
    set_torch_threads(config.lm.torch_threads)
    seed_everything(config.seed)
    t = _TextTraining(config, resume, dist, device, local_envs)
    t.evaluate_before()
    from tqdm import tqdm

    bar = tqdm(
        range(t.first_iteration, config.iterations + 1),
        initial=t.first_iteration - 1,  # a resumed run's bar continues where it stopped
        total=config.iterations,
        disable=not (config.logging.progress and dist.is_main),
        unit="it",
        dynamic_ncols=True,
    )
    try:
        with t.run.loop(save_on_failure=config.logging.save_checkpoint):
            for iteration in bar:
                beta, lr = t.envs.kl_coef, t.schedule.apply(t.optimizer, iteration)
                rollout, timing = t.collect(iteration, bar)
                rewards, advantages, returns = t.estimate_advantages(rollout, beta)
                stats, timing["update_s"] = t.update(rollout, advantages, returns, beta, bar)
                metrics = t.log(iteration, rollout, rewards, returns, stats, timing, beta, lr, bar)
                metrics |= t.evaluate_during(iteration)
                if t.controller is not None:  # adaptive β: the env's kl_coef, its one owner
                    t.envs.kl_coef = t.controller.update(metrics["kl_k1"], config.num_envs)
                t.run.end_iteration(iteration, iteration, metrics, f"(up to iteration {iteration})")
                if t.reached_target_score():
                    break
                if config.logging.save_checkpoint and config.logging.checkpoint_every:
                    if iteration % config.logging.checkpoint_every == 0:
                        t.checkpoint(iteration)
    finally:
        bar.close()
    return t.finish()


def check_run_layout(config: TextTrainConfig, resume: str | Path | None, dist: Dist) -> int:
    """Refuse, before any model loads, a run that cannot work with this many processes or
    cannot continue ``resume``; return each process's number of responses."""
    local_envs = dist.check_divides("num_envs", config.num_envs)
    if local_envs % config.sampling.group_size:
        raise ValueError(
            f"group_size={config.sampling.group_size} must divide each process's {local_envs} "
            "responses "
            f"(num_envs={config.num_envs} over {dist.world_size} processes)"
        )
    dist.check_local_batch(config.ppo, local_envs)
    if config.lm.fsdp and not dist.active:
        raise ValueError(
            "--fsdp shards the policy over torchrun's processes: launch the run with "
            "torchrun --nproc-per-node N (one process per GPU)"
        )
    if resume is None:
        check_writable_dir(config.logging.runs_dir, "--runs-dir")  # before minutes of model loading
        return local_envs
    saved = load_text_run_config(resume)
    if saved.lm.fsdp or config.lm.fsdp:
        raise ValueError(
            f"--resume {resume}: runs sharded with --fsdp cannot be resumed yet (their "
            "checkpoint holds the full weights but not the sharded optimizer state); start a new "
            f"run from the weights with --model {Path(resume) / 'policy'}"
        )
    if (saved.task, saved.model) != (config.task, config.model):
        raise ValueError(
            f"--resume {resume} is a run of task {saved.task} with model {saved.model}, "
            f"not {config.task} with {config.model}"
        )
    if needs_critic(saved.estimator.advantage) != needs_critic(config.estimator.advantage):
        raise ValueError(
            f"--resume {resume} was trained with --advantage {saved.estimator.advantage}, which "
            f"cannot continue as --advantage {config.estimator.advantage} (one trains a value "
            "head, the other "
            "has none)"
        )
    return local_envs


class _TextTraining:
    """One text run's state (envs, policy, optimizer, schedule, counters); each method is one
    named step of :func:`_train_text`'s loop."""

    def __init__(
        self,
        config: TextTrainConfig,
        resume: str | Path | None,
        dist: Dist,
        device: torch.device,
        local_envs: int,
    ) -> None:
        self.config, self.resume, self.dist, self.device = config, resume, dist, device
        self.local_envs = local_envs
        # fp32 weights everywhere; bf16 is autocast, around the reference's forwards too, so a
        # policy equal to the reference scores every token exactly as it does.
        self.bf16 = config.bf16(device)
        self.recompute = config.recompute_old_logprobs(device)
        self.micro_batch = local_envs // config.ppo.num_minibatches // config.ppo.grad_accum_steps
        if config.lm.lora_r:  # the reference is the policy's base: the policy comes first
            self._load_policy()
            self._load_envs()
        else:
            self._load_envs()
            self._load_policy()
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.schedule = LinearLR(config.learning_rate, config.iterations, enabled=config.anneal_lr)
        self.first_iteration, self.total_tokens, previous_wall = 1, 0, 0.0
        self.score_first: float | None = None
        self.eval_before: dict[str, float] | None = None
        self.eval_last: tuple[int, dict[str, float]] | None = None
        self.run_dir = TrainingRun.directory(
            config.logging.runs_dir,
            config.logging.run_name,
            f"{config.task.rpartition(':')[2]}__{config.seed}",  # module:Class: the class
            config,
            resume,
            dist,
        )
        if resume is not None:
            previous_wall = self._restore()
        if dist.rank > 0:  # every rank samples its own responses; rank 0 keeps one-process's
            rank_seed = config.seed + 1_000_003 * dist.rank + self.first_iteration - 1
            seed_everything(rank_seed)
            self.generator.manual_seed(rank_seed)
        self.controller = None
        if config.kl.kl_target:
            self.controller = AdaptiveKLController(
                self.envs.kl_coef, config.kl.kl_target, config.kl.kl_horizon
            )
        self.start = time.perf_counter() - previous_wall
        done = self.first_iteration - 1  # the checkpoint's iteration (its step too)
        self.run = TrainingRun(
            self.run_dir,
            tensorboard=config.logging.tensorboard,
            checkpoint=self.checkpoint,
            recoverable=(RewardError,),
            dist=dist,
            resumed_at=(done, done) if resume is not None else None,
        )
        self.run.last_iteration = self.first_iteration - 1
        self.history: list[dict[str, float]] = []
        self.postfix = ""

    def say(self, message: str) -> None:
        if self.config.logging.progress and self.dist.is_main:
            print(message, file=sys.stderr, flush=True)

    def _load_envs(self) -> None:
        config, dist = self.config, self.dist
        task_kwargs, held_out = task_settings(config)
        if held_out:  # held-out prompts are never trained on when there is an evaluation on them
            task_kwargs["split"] = "train"
        dtype = torch.float32
        shared: dict[str, Any] = {}
        if config.lm.lora_r:
            # LoRA: the reference is the policy's base model with the adapters off, no copy.
            shared = {"model": AdaptersDisabled(self.policy.lm), "tokenizer": self.tokenizer}
        else:
            self.say(f"loading the reference model ({config.model}) ...")
        # The per-step reference keeps fixed shapes too where the policy's rollout does.
        static = config.kl.reference_pass == "per_step" and (
            config.sampling.static_cache or config.compile_rollout(self.device)
        )
        self.envs = make_text_envs(
            config,
            self.local_envs,
            task_kwargs,
            self.device,
            dtype,
            config.kl.reference_pass,
            static_cache=static,
            **shared,
        )
        self.eval_envs = None
        with importing_from(config.import_dir):
            self.eval_extra = {
                eval_reward_key(spec): get_reward(spec) for spec in config.eval_rewards
            }
        # The same frozen reference and reward, on the held-out prompts; rank 0 evaluates, or
        # with a sharded policy every rank (its forward is a collective), on the same prompts.
        if held_out and (dist.is_main or config.lm.fsdp):
            self.eval_envs = make_text_envs(
                config,
                config.eval_samples,
                task_kwargs | {"split": "test"},
                self.device,
                dtype,
                "at_end",
                model=self.envs.reference_model,
                tokenizer=self.envs.tokenizer,
                reward=getattr(self.envs, "reward_fn", None),
            )

    def _load_policy(self) -> None:
        config, resume = self.config, self.resume
        self.say(f"loading the policy ({config.model if resume is None else resume}) ...")
        # Resuming loads the trained policy with from_pretrained; the reference stays
        # config.model. With LoRA the base stays config.model and a checkpoint restores the
        # adapter.
        trained = resume is not None and not config.lm.lora_r
        source = str(Path(resume) / "policy") if resume is not None and trained else config.model
        lm, self.tokenizer = load_causal_lm(
            source, device=self.device, trust_remote_code=config.lm.trust_remote_code
        )
        if config.lm.lora_r:
            adapter = Path(resume) / "policy" / "adapter" if resume is not None else None
            lm = with_lora(lm, config.lm.lora_r, config.lm.lora_alpha, adapter)
        if config.lm.gradient_checkpointing:
            # The new name from transformers 5.24 on (the old one warns there); the old one before.
            enable = (
                getattr(lm, "activation_checkpointing_enable", None)
                or lm.gradient_checkpointing_enable
            )
            enable()
            lm.config.use_cache = False
        critic = needs_critic(config.estimator.advantage)
        self.policy = LMActorCritic(lm, temperature=config.sampling.temperature, value_head=critic)
        self.dist.broadcast_parameters(p for p in self.policy.parameters() if p.requires_grad)
        if config.lm.fsdp:
            shard_policy(self.policy, lm)
        self.decode = (
            compiled_decode(self.policy, self.device)
            if config.compile_rollout(self.device)
            else None
        )
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = adamw(trainable, lr=config.learning_rate, fused=not config.lm.fsdp)

    def _restore(self) -> float:
        """Load the checkpoint's state into this run; return the wall time it had run."""
        config, resume = self.config, self.resume
        assert resume is not None
        saved = load_text_run_config(resume)
        state = load_training_state(
            self.run_dir / "policy", self.policy, self.optimizer, self.generator
        )
        self.first_iteration = state["iteration"] + 1
        self.envs.kl_coef, self.total_tokens = state["kl_coef"], state["total_tokens"]
        self.score_first, self.eval_before = state["score_mean_first"], state.get("eval_before")
        # Checkpoints from before the schedule was saved ran CleanRL's schedule over the
        # run's first horizon.
        saved_schedule = state.get("lr_schedule") or {
            "learning_rate": saved.learning_rate,
            "horizon": saved.iterations,
            "enabled": saved.anneal_lr,
        }
        self.schedule = LinearLR.resumed(
            saved_schedule,
            state["iteration"],
            config.learning_rate,
            config.iterations,
            config.anneal_lr,
        )
        note = resumed_world_note(state.get("world_size", 1), self.dist)
        if self.dist.is_main:
            print(
                f"resuming {resume} at iteration {self.first_iteration} of {config.iterations}",
                file=sys.stderr,
                flush=True,
            )
            if note:
                print(note, file=sys.stderr, flush=True)
        return state["wall_time_s"]

    def evaluate_before(self) -> None:
        if self.eval_envs is not None and self.eval_before is None:
            n = self.config.eval_samples
            self.say(f"sampling {n} responses on held-out prompts before training ...")
            self.eval_before = self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """The policy's held-out score, KL and ``--eval-rewards``: the same prompts and sampling
        noise at every evaluation."""
        assert self.eval_envs is not None
        with autocast(self.device, self.bf16):
            return evaluate_held_out(self.policy, self.eval_envs, self.config.seed, self.eval_extra)

    def evaluate_during(self, iteration: int) -> dict[str, float]:
        """``eval_*`` metrics every ``--eval-every`` iterations (none on other iterations)."""
        every = self.config.eval_every
        if self.eval_envs is None or not every or iteration % every:
            return {}
        result = self.evaluate()
        self.eval_last = (iteration, result)
        return {
            f"eval_{k}" if k in ("score", "score_se", "kl") else k: v for k, v in result.items()
        }

    def collect(self, iteration: int, bar) -> tuple[Rollout, dict[str, float]]:
        """Sample one response per row; with ``recompute``, rescore it with the update's forward."""
        bar.set_postfix_str(f"{self.postfix} sampling", refresh=True)
        if self.device.type == "cuda":  # peak_memory_gib is each iteration's
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        # The env seeds row i with seed + i: each iteration's rows (and each rank's) take their
        # own block of seeds, so no iteration replays another's prompts and global row j
        # draws the same prompt with any number of processes.
        seed = prompt_seeds(self.config.seed, iteration, self.config.num_envs)
        seed += self.dist.rank * self.local_envs
        with autocast(self.device, self.bf16):
            rollout = collect_rollout(
                self.policy,
                self.envs,
                seed=seed,
                generator=self.generator,
                group_size=self.config.sampling.group_size,
                static_cache=self.config.sampling.static_cache or self.decode is not None,
                block=self.config.rollout_block(self.device),
                decode=self.decode,
            )
        rollout_s = time.perf_counter() - t0
        if self.recompute:
            with autocast(self.device, self.bf16):
                rollout = recompute_logprobs(self.policy, rollout, self.micro_batch)
        recompute_s = time.perf_counter() - t0 - rollout_s
        return rollout, {"rollout_s": rollout_s, "recompute_s": recompute_s}

    def estimate_advantages(
        self, rollout: Rollout, beta: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shaped per-token rewards, then advantages and returns: GAE with the critic (whitened
        over the batch), or a critic-free estimator (returns 0, so the value loss is 0)."""
        config = self.config
        rewards = shaped_rewards(
            rollout, beta, not config.kl.kl_in_loss, config.missing_eos_penalty
        )
        if needs_critic(config.estimator.advantage):
            advantages, returns = token_advantages(
                rollout, rewards, config.estimator.gamma, config.estimator.gae_lambda
            )
            if config.estimator.whiten_advantages:
                advantages = normalize(advantages, rollout.mask, dist=self.dist) * rollout.mask
            return rewards, advantages, returns
        advantages = critic_free_advantages(
            config.estimator.advantage,
            rewards,
            rollout.mask,
            config.sampling.group_size,
            config.estimator.gamma,
            config.estimator.grpo_scale,
            dist=self.dist,
        )
        return rewards, advantages, torch.zeros_like(rewards)

    def update(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        beta: float,
        bar,
    ) -> tuple[dict[str, torch.Tensor], float]:
        """K epochs of minibatched PPO over whole sequences; the stats and the seconds taken."""
        config, policy = self.config, self.policy
        batch = {
            "input_ids": rollout.input_ids,
            "attention_mask": rollout.attention_mask,
            "actions": rollout.actions,
            "logprobs": rollout.logprobs,
            "values": rollout.values,
            "advantages": advantages,
            "returns": returns,
            "mask": rollout.mask,
            "ref_logprobs": rollout.ref_logprobs,
        }
        if rollout.positions is not None:
            batch["positions"] = rollout.positions
        packing = None
        if config.lm.pack_micro_batches:
            packing = response_packing(
                rollout.attention_mask, rollout.mask, rollout.prompt_len, rollout.positions
            )

        def evaluate(mb: dict[str, torch.Tensor], columns: tuple[int, int, int] | None = None):
            with autocast(self.device, self.bf16):
                logprob, entropy, value = policy.evaluate_responses(
                    mb["input_ids"],
                    mb["attention_mask"],
                    mb["actions"],
                    rollout.prompt_len,
                    entropy_grad=config.ppo.ent_coef != 0,
                    positions=mb.get("positions"),
                    columns=columns,
                )
            if not config.kl.kl_in_loss:
                return logprob, entropy, value
            ref_logprobs = mb["ref_logprobs"][:, : logprob.shape[1]]
            return logprob, entropy, value, beta * kl_k3(logprob, ref_logprobs)

        bar.set_postfix_str(f"{self.postfix} updating", refresh=True)
        t1 = time.perf_counter()
        policy.train()
        stats = ppo_update(
            policy.parameters(),
            self.optimizer,
            batch,
            evaluate,
            config.ppo,
            self.generator,
            dist=self.dist,
            packing=packing,
        )
        return stats, time.perf_counter() - t1

    def log(
        self,
        iteration: int,
        rollout: Rollout,
        rewards: torch.Tensor,
        returns: torch.Tensor,
        stats: dict[str, torch.Tensor],
        timing: dict[str, float],
        beta: float,
        lr: float,
        bar,
    ) -> dict[str, float]:
        """The iteration's metrics (one host sync for all of them), its sample table, the bar."""
        with torch.no_grad():
            stats |= rollout_stats(
                rollout, rewards, returns, self.policy.value_head is not None, self.dist
            )
        keys = list(stats)
        values = torch.stack([stats[k].float().cpu() for k in keys]).tolist()
        metrics = dict(zip(keys, values, strict=True))
        tokens = int(metrics.pop("tokens"))
        self.total_tokens += tokens
        if self.score_first is None:
            self.score_first = metrics["score_mean"]
        elapsed = time.perf_counter() - self.start
        metrics |= {
            "iteration": iteration,
            "kl_coef": beta,
            "learning_rate": lr,
            "rollout_tokens_per_s": tokens / timing["rollout_s"],
            "tokens_per_s": self.total_tokens / elapsed,
            "rollout_s": timing["rollout_s"],
            "recompute_s": timing["recompute_s"],
            "update_s": timing["update_s"],
            "wall_time_s": elapsed,
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        self.history.append(metrics)
        every = self.config.logging.sample_every
        if self.dist.is_main and every and (iteration % every == 0 or iteration == 1):
            self.run.logger.text("samples", samples_table(rollout), iteration)
            self.run.logger.samples(
                iteration, rollout.prompts, rollout.responses, rollout.scores.tolist()
            )
        self.postfix = f"score={metrics['score_mean']:.3f} kl={metrics['kl_k1']:.2f}"
        bar.set_postfix_str(self.postfix, refresh=False)
        return metrics

    def reached_target_score(self) -> bool:
        """The mean score of the last ``target_window`` iterations reached ``target_score``."""
        target, n = self.config.target_score, self.config.target_window
        window = [m["score_mean"] for m in self.history[-n:]]
        return target is not None and len(window) == n and sum(window) / n >= target

    def checkpoint(self, iteration: int) -> Path:
        config, dist = self.config, self.dist
        weights = full_state_dict(self.policy) if config.lm.fsdp else None  # a collective
        if not dist.is_main:
            return self.run_dir / "policy"
        return save_policy(
            self.run_dir / "policy",
            self.policy,
            self.envs.tokenizer,
            optimizer=None if config.lm.fsdp else self.optimizer,
            generator=self.generator,
            state_dict=weights,
            state={
                "iteration": iteration,
                "kl_coef": self.envs.kl_coef,
                "total_tokens": self.total_tokens,
                "wall_time_s": time.perf_counter() - self.start,
                "score_mean_first": self.score_first,
                "lr_schedule": self.schedule.state(),
                "eval_before": self.eval_before,
                "world_size": dist.world_size,
            },
        )

    def finish(self) -> dict[str, Any]:
        """Evaluate after training, checkpoint, write ``summary.json``; return the summary."""
        config, history = self.config, self.history
        wall = time.perf_counter() - self.start
        summary: dict[str, Any] = {
            "task": config.task,
            "model": config.model,
            "iterations": self.run.last_iteration,
            "wall_time_s": wall,
            "tokens_per_s": self.total_tokens / wall,
            "score_mean_first": self.score_first,
            "score_mean_last": history[-1]["score_mean"] if history else None,
            "kl_last": history[-1]["kl_k1"] if history else None,
            "run_dir": str(self.run_dir),
        }
        if self.dist.world_size > 1:
            summary["world_size"] = self.dist.world_size
        if self.eval_envs is not None and self.eval_before is not None:
            n = config.eval_samples
            self.say(f"sampling {n} responses on held-out prompts after training ...")
            if self.eval_last is not None and self.eval_last[0] == self.run.last_iteration:
                after = self.eval_last[1]  # the last iteration's evaluation: the same sample
            else:
                after = self.evaluate()
            before = self.eval_before
            summary |= {
                "eval_samples": n,
                "eval_score_before": before["score"],
                "eval_score_before_se": before["score_se"],
                "eval_score_after": after["score"],
                "eval_score_after_se": after["score_se"],
                "eval_kl_after": after["kl"],
            }
            if self.eval_extra:
                summary["eval_rewards"] = list(self.eval_extra)
            for key in self.eval_extra:  # a run resumed with new --eval-rewards lacks a before
                if key in before:
                    summary |= {
                        f"{key}_before": before[key],
                        f"{key}_before_se": before[f"{key}_se"],
                    }
                summary |= {f"{key}_after": after[key], f"{key}_after_se": after[f"{key}_se"]}
            self.eval_envs.close()
        if config.logging.save_checkpoint:
            summary["checkpoint"] = str(self.checkpoint(self.run.last_iteration))
        return self.run.finish(summary)


def prompt_seeds(seed: int, iteration: int, num_envs: int) -> int:
    """The seed of row 0 of ``iteration``'s reset (row ``i`` gets this + ``i``): disjoint blocks
    of ``num_envs`` seeds per iteration, and per run seed for up to 100,003 iterations."""
    return (seed * 100_003 + iteration) * num_envs


def is_multi_turn(task: str, import_dir: str | None = None) -> bool:
    """Whether ``task`` (a name or ``module:Class``, imported from ``import_dir`` first) is a
    multi-turn task."""
    from textenv.tasks import MultiTurnTask, task_class

    with importing_from(import_dir):
        return issubclass(task_class(task), MultiTurnTask)


def task_settings(config: TextTrainConfig) -> tuple[dict[str, Any], bool]:
    """The env's task overrides from ``config``, and whether it evaluates on held-out prompts
    (``eval_samples > 0`` and a held-out part: every 5th prompt, or a multi-turn task's held-out
    episodes). For a multi-turn task, ``max_new_tokens`` is the agent's budget per turn."""
    with importing_from(config.import_dir):
        return _task_settings(config)


def _task_settings(config: TextTrainConfig) -> tuple[dict[str, Any], bool]:
    if is_multi_turn(config.task):
        from textenv.tasks import MultiTurnTask

        for name in ("reward", "reward_model", "prompts"):
            if getattr(config, name) is not None:
                raise ValueError(
                    f"--{name.replace('_', '-')} does not apply to the multi-turn task "
                    f"{config.task} "
                    "(its episodes write the prompts and reward the turns)"
                )
        task_kwargs = {
            k: v
            for k, v in {
                "max_turn_tokens": config.max_new_tokens,
                "kl_coef": config.kl.kl_coef,
            }.items()
            if v is not None
        } | task_options(config)
        return task_kwargs, config.eval_samples > 0 and typing.cast(
            MultiTurnTask, make_task(config.task, **task_kwargs)
        ).has_held_out
    task_kwargs = {
        "max_new_tokens": config.max_new_tokens,
        "kl_coef": config.kl.kl_coef,
        "reward_model": config.reward_model,
    }
    task_kwargs = {k: v for k, v in task_kwargs.items() if v is not None} | task_options(config)
    if config.prompts is not None:
        task_kwargs["prompts"] = read_prompts(config.prompts)
    held_out = (
        config.eval_samples > 0
        and len(typing.cast(Task, make_task(config.task, **task_kwargs)).prompts) >= HELD_OUT_EVERY
    )
    return task_kwargs, held_out


def task_options(config: TextTrainConfig) -> dict[str, Any]:
    """``--task-options`` parsed and checked against the task's fields."""
    if config.task_options is None:
        return {}
    try:
        options = json.loads(config.task_options)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--task-options is not JSON: {err.msg} (got {config.task_options!r})"
        ) from None
    if not isinstance(options, dict):
        raise ValueError(
            f"--task-options must be a JSON object of task fields, got {config.task_options!r}"
        )
    from textenv.tasks import task_class

    with importing_from(config.import_dir):
        cls = task_class(config.task)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"--task-options: task {config.task} has no field {unknown[0]!r} "
                f"(its fields: {', '.join(sorted(known))})"
            )
        for name, value in options.items():
            if not _json_matches(value, hints.get(name, Any)):
                raise ValueError(
                    f"--task-options: field {name!r} of task {config.task} must be "
                    f"{_type_name(hints[name])}, got {json.dumps(value)}"
                )
    return options


def _json_matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type (types JSON cannot hold are not checked)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_json_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) and not isinstance(value, str):
        inner = args[0] if args and (origin is not tuple or args[-1] is Ellipsis) else Any
        return isinstance(value, list) and all(_json_matches(v, inner) for v in value)
    if hint is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def make_text_envs(
    config: TextTrainConfig,
    num_envs: int,
    task_kwargs: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    reference_pass: str,
    model=None,
    tokenizer=None,
    reward=None,
    static_cache: bool = False,
):
    """The vector env of ``config``'s task: a :class:`TextGenerationVectorEnv`, or a
    :class:`textenv.multiturn.MultiTurnTextVectorEnv` for a multi-turn task. ``model`` (with its
    ``tokenizer``) reuses a loaded reference; ``reward`` a built reward."""
    with importing_from(config.import_dir):
        return _make_text_envs(
            config,
            num_envs,
            task_kwargs,
            device,
            dtype,
            reference_pass,
            model,
            tokenizer,
            reward,
            static_cache,
        )


def _make_text_envs(
    config: TextTrainConfig,
    num_envs: int,
    task_kwargs: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    reference_pass: str,
    model=None,
    tokenizer=None,
    reward=None,
    static_cache: bool = False,
):
    common = {
        "num_envs": num_envs,
        "task": config.task,
        "model": model or config.model,
        "tokenizer": tokenizer,
        "device": device,
        "dtype": dtype,
        "trust_remote_code": config.lm.trust_remote_code,
        "reference_pass": reference_pass,
        "temperature": config.sampling.temperature,
    }
    if is_multi_turn(config.task):
        from textenv.multiturn import MultiTurnTextVectorEnv

        return MultiTurnTextVectorEnv(**common, **task_kwargs)
    return TextGenerationVectorEnv(
        **common,
        reward=reward if reward is not None else config.reward,
        static_cache=static_cache,  # single-turn only (validated)
        **task_kwargs,
    )


def with_absolute_paths(config: TextTrainConfig) -> TextTrainConfig:
    """``config`` with local model, reward-model and prompt paths made absolute, and the folder
    its code is imported from recorded (see ``import_dir``), so the saved config resumes from any
    directory."""
    from textenv.models import EMBEDDED_NAMES

    def absolute(value: str | None) -> str | None:
        if value is None or value in EMBEDDED_NAMES or value == "tiny" or value.startswith("tiny:"):
            return value
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    return dataclasses.replace(
        config,
        model=absolute(config.model) or config.model,
        reward_model=absolute(config.reward_model),
        prompts=absolute(config.prompts),
        import_dir=str(Path(config.import_dir or os.getcwd()).resolve()),
    )


def evaluate_text_run(
    run_dir: str | Path,
    samples: int,
    seed: int,
    device: str = "cpu",
    top_k: int = 0,
    top_p: float = 1.0,
) -> dict[str, Any]:
    """Sample ``samples`` responses of a text run's saved policy on its task (the held-out
    prompts when it was trained with them) and return the mean score, its standard error and
    the KL to the reference; the reward, temperature and budget are the run's. ``top_k`` /
    ``top_p`` filter the sampling distribution; the KL is then that of the filtered policy to the
    whole (tempered) reference, which is not 0 even for a policy equal to the reference."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    run_dir = Path(run_dir)
    config = load_text_run_config(run_dir)
    on = resolve_device(device)
    task_kwargs, held_out = task_settings(config)
    envs = make_text_envs(
        config,
        samples,
        task_kwargs | {"split": "test" if held_out else "all"},
        on,
        torch.float32,
        "at_end",
    )
    lm, _ = load_causal_lm(
        str(run_dir / "policy"), device=on, trust_remote_code=config.lm.trust_remote_code
    )
    policy = LMActorCritic(
        lm, temperature=config.sampling.temperature, top_k=top_k, top_p=top_p, value_head=False
    )  # sampling only
    result = evaluate_held_out(policy, envs, seed)
    envs.close()
    return {
        "task": config.task,
        "prompts": "held-out" if held_out else "all",
        "responses": samples,
        "score_mean": result["score"],
        "score_se": result["score_se"],
        "kl_to_reference": result["kl"],
    }
