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

import copy
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from textenv.agents.advantages import (
    ESTIMATORS,
    GROUP_ESTIMATORS,
    critic_free_advantages,
    needs_critic,
)
from textenv.agents.checkpoint import pack_training_state, unpack_training_state
from textenv.agents.distributed import Dist, distributed_run, full_state_dict, shard_policy
from textenv.agents.gae import gae
from textenv.agents.lm import LMActorCritic, entropy_of, filter_logits, sample_categorical
from textenv.agents.ppo import PPOConfig, explained_variance, normalize, ppo_update, validate_rates
from textenv.agents.runlog import check_writable_dir
from textenv.agents.training import (
    LinearLR,
    TrainingRun,
    resumed_world_note,
    seed_everything,
    summary_line,
)
from textenv.device import resolve_device, set_torch_threads
from textenv.env import TextGenerationVectorEnv
from textenv.kl import kl_penalized_rewards
from textenv.models import load_causal_lm
from textenv.rewards import RewardError
from textenv.tasks import HELD_OUT_EVERY, make_task, read_prompts

__all__ = [
    "AdaptiveKLController",
    "Rollout",
    "TextTrainConfig",
    "collect_rollout",
    "evaluate_held_out",
    "evaluate_text_run",
    "load_text_run_config",
    "shaped_rewards",
    "summary_line",
    "token_advantages",
    "train_text",
]


def _text_ppo() -> PPOConfig:
    # TRL-like defaults: 4 epochs, clipped value loss with vf_coef 0.1, advantages whitened per batch.
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
class TextTrainConfig:
    """PPO on a text-generation task: the policy LM writes responses, the env scores them."""

    task: str = "Sentiment"
    """task name: Sentiment, RewardModel, Arithmetic, Toy, ReasoningGym or a curated reasoning-gym task
    (RG-BasicArithmetic, RG-ChainSum, RG-LegCounting, RG-LetterCounting, RG-SpellBackward); multi-turn:
    Calculator (a tool task), GuessTheNumber, TicTacToe, TextArena"""
    model: str = "embedded"
    """policy and reference model: embedded (SmolLM2-135M), tiny, an HF id or a path"""
    reward: str | None = None
    """reward override: a built-in or registered name, or module:callable"""
    reward_model: str | None = None
    """RewardModel task: AutoModelForSequenceClassification id or path"""
    prompts: str | None = None
    """a prompts file instead of the task's: one prompt per line, or JSONL with a "prompt" string or chat
    "messages" per line (rendered with the tokenizer's chat template)"""
    task_options: str | None = None
    """task fields as a JSON object, e.g. '{"config": {"max_terms": 2}, "answer_format": "number"}' for a
    reasoning-gym task or '{"max_turns": 4}' for a multi-turn one"""
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
    kl_coef: float | None = None
    """β of the KL penalty, the env's kl_coef (default: the task's); the initial value when kl_target is set"""
    kl_target: float | None = None
    """adaptive β (Ziegler et al.): the KL to the reference per response to aim for; None keeps β fixed"""
    kl_horizon: int = 10_000
    """horizon of the adaptive KL controller, in episodes"""
    reference_pass: Literal["at_end", "per_step"] = "at_end"
    """when the env's reference model runs: at_end (one forward per finished response) or
    per_step (one KV-cached step per token); the shaped per-token rewards are the same, at_end is faster"""
    kl_in_loss: bool = False
    """put β·KL (k3 estimator) in the loss instead of in the reward (the reward is then the score)"""
    missing_eos_penalty: float | None = None
    """subtract this from the score of responses that hit the budget without EOS"""
    temperature: float = 1.0
    """sampling temperature; the policy's and the reference's log-probs are both of the tempered distribution
    (training samples from the whole tempered distribution: top-k/top-p are for textenv-evaluate)"""
    learning_rate: float = 1e-5
    """AdamW learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over ``iterations`` (TRL's and CleanRL's default); on
    --resume with more iterations the decay continues from the rate reached, without a jump"""
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """advantage estimator: gae (value head, GAE over tokens); critic-free, with no value head: grpo
    (return minus its group's mean, over the group's std), rloo (minus the mean of the rest of its
    group), reinforce_pp (REINFORCE++: KL-shaped return to go, whitened over the batch)"""
    group_size: int = 1
    """responses sampled per prompt in each batch (consecutive rows share a prompt); grpo and rloo need >= 2"""
    grpo_scale: bool = True
    """grpo: divide by the group's std (off: Dr. GRPO, the return minus the group mean only)"""
    gamma: float = 1.0
    """discount over tokens (gae, reinforce_pp)"""
    gae_lambda: float = 0.95
    """λ of GAE over tokens"""
    whiten_advantages: bool = True
    """gae: whiten advantages over the whole batch's response tokens (reinforce_pp always does, grpo and
    rloo never: their group baseline is the normalisation)"""
    ppo: PPOConfig = dataclasses.field(default_factory=_text_ppo)
    """the PPO update's hyperparameters"""
    seed: int = 1
    """seed of prompts, sampling and minibatches"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16: mixed precision (fp32 weights, optimizer state and checkpoints; forwards and backwards under
    bf16 autocast, the reference's too); fp32; auto: bf16 on CUDA, fp32 on a CPU"""
    old_logprobs: Literal["auto", "rollout", "recompute"] = "auto"
    """where PPO's old log-probs and values come from: rollout (the KV-cached sampling forward), recompute
    (one no-grad pass of the update's own forward before the epochs, so the first ratio is exactly 1);
    auto: recompute under bf16, on CUDA or with --fsdp, where the two forwards differ by more than rounding"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the update"""
    lora_r: int = 0
    """train LoRA adapters of this rank (peft, all linear layers) instead of every weight (0: off)"""
    lora_alpha: int = 16
    """LoRA scaling α"""
    fsdp: bool = False
    """shard the policy over the torchrun processes with FSDP2 (torch's fully_shard: nccl on GPUs, gloo on
    CPUs), for models whose weights, gradients and optimizer state do not fit one device; checkpoints hold
    the full weights but not the sharded optimizer state, so a sharded run cannot be resumed yet; not with
    --lora-r"""
    torch_threads: int = 1
    """torch CPU threads of this process (1 never oversubscribes a machine others use; 0: torch's
    default, one per core, fastest only on an otherwise idle machine)"""
    eval_samples: int = 32
    """responses sampled on the held-out prompts (every 5th of the set, not trained on) before and
    after training, their mean score and KL printed at the end (0: off, and every prompt is trained on)"""
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
    trust_remote_code: bool = False
    """allow model code from the model's repository (off: only transformers' own code runs)"""

    def validate(self) -> None:
        for name in ("iterations", "num_envs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        validate_rates(self.learning_rate, self.gamma, self.gae_lambda)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"kl_target must be > 0, got {self.kl_target}")
        if self.target_window < 1:
            raise ValueError(f"target_window must be >= 1, got {self.target_window}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.fsdp and self.lora_r:
            raise ValueError(
                "--fsdp with --lora-r is not supported (LoRA's adapters are small: train them without "
                "sharding)"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("eval_samples", "torch_threads", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.advantage not in ESTIMATORS:
            raise ValueError(
                f"advantage must be one of {', '.join(ESTIMATORS)}, got {self.advantage!r}"
            )
        if self.group_size < 1 or self.num_envs % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} must be >= 1 and divide num_envs={self.num_envs}"
            )
        if self.advantage in GROUP_ESTIMATORS and self.group_size < 2:
            raise ValueError(
                f"--advantage {self.advantage} needs --group-size >= 2 (its baseline is the other "
                f"responses to the same prompt), got {self.group_size}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.old_logprobs not in ("auto", "rollout", "recompute"):
            raise ValueError(
                f"old_logprobs must be auto, rollout or recompute, got {self.old_logprobs!r}"
            )
        self.ppo.validate(self.num_envs)

    def bf16(self, device: torch.device) -> bool:
        """Whether the run computes in bf16 on ``device``."""
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")

    def recompute_old_logprobs(self, device: torch.device) -> bool:
        """Whether old log-probs come from the update's forward (see ``old_logprobs``)."""
        if self.old_logprobs != "auto":
            return self.old_logprobs == "recompute"
        return self.bf16(device) or device.type == "cuda" or self.fsdp


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16`` (weights stay fp32: small updates are not
    rounded away), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@dataclass
class Rollout:
    """One batch of episodes, laid out ``[N, T]`` (rows: episodes, columns: response tokens)."""

    input_ids: (
        torch.Tensor
    )  # [N, prompt_len + T]: the final observation, all-padding prompt columns dropped
    attention_mask: torch.Tensor  # [N, prompt_len + T]
    actions: torch.Tensor  # [N, T]
    logprobs: torch.Tensor  # log π of the sampled token under the sampling distribution
    values: torch.Tensor
    env_rewards: (
        torch.Tensor
    )  # what the env paid: score·1[last] + β_env·log π_ref (per step or summed at the end)
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor  # 1 on response tokens (up to and including EOS)
    scores: torch.Tensor  # [N]
    truncated_response: torch.Tensor  # [N] hit the budget without EOS
    prompts: list[str]
    responses: list[str]
    prompt_len: int
    positions: torch.Tensor | None = (
        None  # [N, T] column of each action in input_ids (multi-turn; else prompt_len + t)
    )
    step_scores: torch.Tensor | None = (
        None  # [N, T] task reward per token (multi-turn turn rewards); else scores at the end
    )


def collect_rollout(
    policy: LMActorCritic, envs, seed: int | None, generator: torch.Generator, group_size: int = 1
) -> Rollout:
    """Reset ``envs`` and sample one response per row (see :func:`_collect_rollout`)."""
    # FSDP's all-gather buffers outlive the rollout: inference-mode tensors would refuse the
    # update's in-place writes, so a sharded policy samples under no_grad.
    if not _is_sharded(policy):
        with torch.inference_mode():
            return _collect_rollout(policy, envs, seed, generator, group_size)
    with torch.no_grad():
        rollout = _collect_rollout(policy, envs, seed, generator, group_size)
    policy.reshard()  # the root stays gathered after a forward without backward; the optimizer holds the shards
    return rollout


def _is_sharded(module: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _collect_rollout(
    policy: LMActorCritic, envs, seed: int | None, generator: torch.Generator, group_size: int
) -> Rollout:
    """Reset ``envs`` and sample one response (or, in a multi-turn env, one conversation) per
    row, the policy keeping its own KV cache; with ``group_size=k``, each run of k consecutive
    rows shares a prompt.

    Each step feeds the policy what each row gained: its action, and in a multi-turn env the
    env's reply after a turn (right-padded to the widest row, masked), so the cache continues
    across turns. Stored log-probs are of the distribution actually sampled from (temperature
    applied); the env's reference must score at the same temperature, or the KL is not 0 at
    the start.
    """
    if envs.temperature != policy.temperature:
        raise ValueError(
            f"the policy samples at temperature {policy.temperature} but the env's reference scores "
            f"at {envs.temperature}; set envs.temperature = {policy.temperature}"
        )
    multi_turn = getattr(envs, "multi_turn", False)
    was_training = policy.training
    policy.eval()
    obs, info = envs.reset(
        seed=seed, options={"group_size": group_size} if group_size > 1 else None
    )
    P, B, N = envs.max_prompt_tokens, envs.max_new_tokens, envs.num_envs
    device = obs["input_ids"].device
    # Prompts are left-padded into P slots: columns that are padding in every row are left out
    # of every forward here and in the update (less compute, same result).
    start = int(obs["attention_mask"][:, :P].any(0).long().argmax())
    cache_mask = obs["attention_mask"][:, start:P]  # the attention mask of the policy's cache
    position_ids = (cache_mask.cumsum(-1) - 1).clamp_min(0)
    logits, values, cache = policy._forward(
        obs["input_ids"][:, start:P], cache_mask, position_ids, logits_to_keep=1, use_cache=True
    )
    logits, values = logits[:, -1], values[:, -1]
    cols = {
        k: []
        for k in (
            "actions",
            "logprobs",
            "values",
            "env_rewards",
            "ref_logprobs",
            "entropy",
            "mask",
            "positions",
            "step_scores",
        )
    }
    ref_at_end = torch.zeros(
        (N, B), device=device
    )  # filled as rows end, with reference_pass="at_end"
    active = torch.ones(N, dtype=torch.bool, device=device)
    fed = torch.zeros(
        N, dtype=torch.long, device=device
    )  # tokens after the prompt the policy has read
    scores = torch.zeros(N, device=device)
    truncated = torch.zeros(N, dtype=torch.bool, device=device)
    responses: list[str | None] = [None] * N
    rows = torch.arange(N, device=device)
    fed_host = np.zeros(N, dtype=np.int64)
    for t in range(B):
        logp_all = torch.log_softmax(filter_logits(logits, policy.top_k, policy.top_p), dim=-1)
        action = sample_categorical(logp_all.exp(), generator)
        cols["actions"].append(action)
        cols["logprobs"].append(logp_all.gather(1, action.unsqueeze(1)).squeeze(1))
        cols["entropy"].append(entropy_of(logp_all))
        cols["values"].append(values)
        cols["mask"].append(active.float())
        cols["positions"].append(P - start + fed)
        obs, reward, terminated, _, step_info = envs.step(action)
        cols["env_rewards"].append(reward)
        if "ref_logprob" in step_info:
            cols["ref_logprobs"].append(step_info["ref_logprob"])
        if "turn_reward" in step_info:
            cols["step_scores"].append(step_info["turn_reward"])
        if "_ref_logprobs" in step_info:
            ref_at_end = torch.where(
                step_info["_ref_logprobs"].unsqueeze(1), step_info["ref_logprobs"], ref_at_end
            )
        if "_score" in step_info:
            ended = step_info["_score"]
            scores = torch.where(ended, step_info["score"], scores)
            truncated |= step_info["truncated_response"]
            for i in ended.nonzero().squeeze(1).tolist():
                responses[i] = step_info["response_text"][i]
        if (
            multi_turn
        ):  # the row's action and, after a turn, the env's reply; host-side counts, no sync
            lengths = envs.conversation_lengths
            new_host, fed_host = lengths - fed_host, lengths
            width, new = int(new_host.max()), torch.as_tensor(new_host, device=device)
        else:
            width, new = 1, active.long()
        active = active & ~terminated
        if envs.all_done:  # the env's own per-step sync already knows; no second one here
            break
        offsets = torch.arange(width, device=device)
        chunk_mask = (offsets < new.unsqueeze(1)).long()
        if multi_turn:
            chunk = obs["input_ids"].gather(
                1, (P + fed.unsqueeze(1) + offsets).clamp_max(P + B - 1)
            )
        else:
            chunk = action.unsqueeze(1)
        # >= 0: every row's cache holds its prompt, which is never empty.
        position_ids = cache_mask.sum(-1, keepdim=True) + chunk_mask.cumsum(-1) - 1
        cache_mask = torch.cat([cache_mask, chunk_mask], dim=1)
        logits, values, cache = policy._forward(
            chunk,
            cache_mask,
            position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=width,
        )
        last = (new - 1).clamp_min(0)
        logits, values = logits[rows, last], values[rows, last]
        fed = fed + new
    T = len(cols["actions"])
    stacked = {k: torch.stack(v, dim=1) for k, v in cols.items() if v}
    stacked.setdefault("ref_logprobs", ref_at_end[:, :T])
    if not multi_turn:  # the actions are consecutive columns: evaluate_responses' fast path
        stacked.pop("positions")
        end = P + T
    else:
        end = P + int(envs.conversation_lengths.max())
    policy.train(was_training)
    return Rollout(
        input_ids=obs["input_ids"][:, start:end],
        attention_mask=obs["attention_mask"][:, start:end],
        scores=scores,
        truncated_response=truncated,
        prompts=list(info["prompt"]),
        responses=[r or "" for r in responses],
        prompt_len=P - start,
        **stacked,
    )


def recompute_logprobs(policy: LMActorCritic, rollout: Rollout, chunk: int) -> Rollout:
    """``rollout`` with its log-probs, entropies and values from the update's own forward
    (:meth:`LMActorCritic.evaluate_responses`, no gradient, ``chunk`` rows at a time), so that
    PPO's first ratio is exactly 1 where the KV-cached sampling forward differs from it (bf16,
    GPU kernels, sharding); 0 past each response's end."""
    parts = []
    with torch.no_grad():
        for i in range(0, rollout.actions.shape[0], chunk):
            rows = slice(i, i + chunk)
            positions = None if rollout.positions is None else rollout.positions[rows]
            parts.append(
                policy.evaluate_responses(
                    rollout.input_ids[rows],
                    rollout.attention_mask[rows],
                    rollout.actions[rows],
                    rollout.prompt_len,
                    entropy_grad=False,
                    positions=positions,
                )
            )
    if _is_sharded(policy):
        policy.reshard()  # as after the rollout: the optimizer holds the shards
    keep = rollout.mask > 0
    logprobs, entropy, values = (torch.where(keep, torch.cat(x), 0.0) for x in zip(*parts))
    if policy.value_head is None:
        values = rollout.values
    return dataclasses.replace(rollout, logprobs=logprobs, entropy=entropy, values=values)


class AdaptiveKLController:
    """Ziegler et al. (2019): nudge β so that the KL per response tracks ``target``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10_000) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def shaped_rewards(
    rollout: Rollout, kl_coef: float, kl_in_reward: bool, missing_eos_penalty: float | None
) -> torch.Tensor:
    """Per-token reward ``score·1[last] − β·(log π − log π_ref)`` (:func:`textenv.kl.kl_penalized_rewards`)
    from what the env reported and the log-probs stored at sampling: no second forward; in a
    multi-turn episode each turn's reward at the token that ended the turn. With the KL in the
    loss instead, it is the task reward alone; ``missing_eos_penalty`` is subtracted at the last
    token of responses that hit the budget (of conversations that ran out of context)."""
    beta = kl_coef if kl_in_reward else 0.0
    penalty = None
    if missing_eos_penalty is not None:
        penalty = missing_eos_penalty * rollout.truncated_response.float()
    if rollout.step_scores is None:
        score = rollout.scores if penalty is None else rollout.scores - penalty
        return kl_penalized_rewards(
            score, rollout.ref_logprobs, rollout.logprobs, rollout.mask, beta
        )
    rewards = kl_penalized_rewards(
        rollout.step_scores, rollout.ref_logprobs, rollout.logprobs, rollout.mask, beta
    )
    if penalty is not None:
        last = (rollout.mask.sum(1).long() - 1).clamp_min(0)
        rewards[torch.arange(rewards.shape[0], device=rewards.device), last] -= penalty
    return rewards


def token_advantages(
    rollout: Rollout, rewards: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over response tokens. The last token of a response is terminal (EOS or the task's
    budget), so nothing is bootstrapped past it; tokens after it are masked."""
    mask = rollout.mask
    last = torch.zeros_like(mask)
    lengths = mask.sum(1).long()
    last[torch.arange(mask.shape[0]), (lengths - 1).clamp_min(0)] = 1.0
    adv, ret = gae(
        rewards.T,
        rollout.values.T,
        torch.zeros_like(rollout.values[:, 0]),
        last.T,
        last.T,
        gamma,
        lam,
    )
    return adv.T * mask, ret.T * mask


def adamw(params: list[torch.nn.Parameter], lr: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW, fused where torch has a fused kernel for the parameters (5× faster steps on CPU
    for a 135M model than the for-each one)."""
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=0.0, fused=True)
        except RuntimeError:
            pass
    return torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=0.0)


def load_text_run_config(run_dir: str | Path) -> TextTrainConfig:
    """The :class:`TextTrainConfig` a run directory was started with."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "policy" / STATE_FILE).is_file():
        raise ValueError(
            f"{str(run_dir)!r} is not a text run directory with a checkpoint "
            f"(config.json + policy/{STATE_FILE})"
        )
    raw = json.loads((run_dir / "config.json").read_text())
    raw["ppo"] = PPOConfig(**raw["ppo"])
    if "kl_shaping" in raw:  # the field's name before it was reference_pass
        raw["reference_pass"] = raw.pop("kl_shaping")
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(TextTrainConfig)})
    if unknown:
        raise ValueError(
            f"{run_dir / 'config.json'} has settings this version does not have ({', '.join(unknown)}): "
            "it was written by an older version (see CHANGELOG.md); start a new run from its weights "
            f"with --model {run_dir / 'policy'}"
        )
    return TextTrainConfig(**raw)


def train_text(config: TextTrainConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Train as ``config`` says; log, checkpoint, write ``summary.json``; return the summary.

    ``resume``: a run directory to continue from its last checkpoint (policy, value head,
    optimizer, β, learning-rate schedule, iteration and RNG states); metrics are appended.
    SIGINT/SIGTERM stop at the end of the iteration with a checkpoint (:class:`TrainingInterrupted`).

    Under ``torchrun`` each of the N processes samples ``num_envs / N`` responses (its own
    prompts and sampling stream) and the update is the one-process update of the whole batch
    (:mod:`textenv.agents.distributed`): whitening, the KL that drives β and every logged
    metric are over all responses. Rank 0 alone writes, logs samples and evaluates.
    """
    config.validate()
    config = with_absolute_paths(config)
    with distributed_run(resolve_device(config.device)) as (dist, device):
        return _train_text(config, resume, dist, device)


def _train_text(
    config: TextTrainConfig, resume: str | Path | None, dist: Dist, device: torch.device
) -> dict[str, Any]:
    local_envs = dist.check_divides("num_envs", config.num_envs)
    if local_envs % config.group_size:
        raise ValueError(
            f"group_size={config.group_size} must divide each process's {local_envs} responses "
            f"(num_envs={config.num_envs} over {dist.world_size} processes)"
        )
    dist.check_local_batch(config.ppo, local_envs)
    if config.fsdp and not dist.active:
        raise ValueError(
            "--fsdp shards the policy over torchrun's processes: launch the run with "
            "torchrun --nproc-per-node N (one process per GPU)"
        )
    if resume is None:
        check_writable_dir(config.runs_dir, "--runs-dir")  # before minutes of model loading

    def say(message: str) -> None:
        if config.progress and dist.is_main:
            print(message, file=sys.stderr, flush=True)

    if resume is not None:
        saved = load_text_run_config(resume)
        if saved.fsdp or config.fsdp:
            raise ValueError(
                f"--resume {resume}: runs sharded with --fsdp cannot be resumed yet (their checkpoint "
                f"holds the full weights but not the sharded optimizer state); start a new run from the "
                f"weights with --model {Path(resume) / 'policy'}"
            )
        if (saved.task, saved.model) != (config.task, config.model):
            raise ValueError(
                f"--resume {resume} is a run of task {saved.task} with model {saved.model}, "
                f"not {config.task} with {config.model}"
            )
        if needs_critic(saved.advantage) != needs_critic(config.advantage):
            raise ValueError(
                f"--resume {resume} was trained with --advantage {saved.advantage}, which cannot continue "
                f"as --advantage {config.advantage} (one trains a value head, the other has none)"
            )
    set_torch_threads(config.torch_threads)
    seed_everything(config.seed)
    # fp32 weights everywhere; bf16 is autocast, around the reference's forwards too, so that a
    # policy equal to the reference scores every token exactly as it does.
    dtype, bf16 = torch.float32, config.bf16(device)
    recompute = config.recompute_old_logprobs(device)
    micro_batch = local_envs // config.ppo.num_minibatches // config.ppo.grad_accum_steps

    task_kwargs, held_out = task_settings(config)
    if held_out:  # held-out prompts are never trained on when there is an evaluation on them
        task_kwargs["split"] = "train"
    say(f"loading the reference model ({config.model}) ...")
    envs = make_text_envs(config, local_envs, task_kwargs, device, dtype, config.reference_pass)
    eval_envs = None
    # The same frozen reference and reward, on the held-out prompts; rank 0 evaluates, or with a
    # sharded policy every rank (its forward is a collective), each on the same prompts.
    if held_out and (dist.is_main or config.fsdp):
        eval_envs = make_text_envs(
            config,
            config.eval_samples,
            task_kwargs | {"split": "test"},
            device,
            dtype,
            "at_end",
            model=envs.reference_model,
            tokenizer=envs.tokenizer,
            reward=getattr(envs, "reward_fn", None),
        )
    say(f"loading the policy ({config.model if resume is None else resume}) ...")
    # Resuming loads the trained policy with from_pretrained; the reference stays config.model.
    # With LoRA the base stays config.model and the adapter is what a checkpoint restores.
    policy_source = (
        str(Path(resume) / "policy") if resume is not None and not config.lora_r else config.model
    )
    policy_lm, _ = load_causal_lm(
        policy_source, device=device, dtype=dtype, trust_remote_code=config.trust_remote_code
    )
    if config.lora_r:
        policy_lm = with_lora(
            policy_lm,
            config.lora_r,
            config.lora_alpha,
            Path(resume) / "policy" / "adapter" if resume is not None else None,
        )
    if config.gradient_checkpointing:
        # The new name from transformers 5.24 on (the old one warns there); the old one before.
        enable = (
            getattr(policy_lm, "activation_checkpointing_enable", None)
            or policy_lm.gradient_checkpointing_enable
        )
        enable()
        policy_lm.config.use_cache = False
    policy = LMActorCritic(
        policy_lm, temperature=config.temperature, value_head=needs_critic(config.advantage)
    )
    dist.broadcast_parameters(p for p in policy.parameters() if p.requires_grad)
    if config.fsdp:
        shard_policy(policy, policy_lm)
    optimizer = adamw(
        [p for p in policy.parameters() if p.requires_grad],
        lr=config.learning_rate,
        fused=not config.fsdp,
    )
    generator = torch.Generator(device=device).manual_seed(config.seed)
    schedule = LinearLR(config.learning_rate, config.iterations, enabled=config.anneal_lr)

    first_iteration, total_tokens, previous_wall, score_first, eval_before = 1, 0, 0.0, None, None
    run_dir = TrainingRun.directory(
        config.runs_dir, config.run_name, f"{config.task}__{config.seed}", config, resume, dist
    )
    if resume is not None:
        state = load_training_state(run_dir / "policy", policy, optimizer, generator)
        first_iteration = state["iteration"] + 1
        envs.kl_coef, total_tokens, previous_wall = (
            state["kl_coef"],
            state["total_tokens"],
            state["wall_time_s"],
        )
        score_first, eval_before = state["score_mean_first"], state.get("eval_before")
        # Checkpoints from before the schedule was saved ran CleanRL's schedule over the run's first horizon.
        saved_schedule = state.get("lr_schedule") or {
            "learning_rate": saved.learning_rate,
            "horizon": saved.iterations,
            "enabled": saved.anneal_lr,
        }
        schedule = LinearLR.resumed(
            saved_schedule,
            state["iteration"],
            config.learning_rate,
            config.iterations,
            config.anneal_lr,
        )
        if dist.is_main and (note := resumed_world_note(state.get("world_size", 1), dist)):
            print(note, file=sys.stderr, flush=True)
    if dist.rank > 0:  # every rank samples its own responses; rank 0 keeps the one-process stream
        rank_seed = config.seed + 1_000_003 * dist.rank + first_iteration - 1
        seed_everything(rank_seed)
        generator.manual_seed(rank_seed)
    # β's one owner is the env; the controller moves it.
    controller = (
        AdaptiveKLController(envs.kl_coef, config.kl_target, config.kl_horizon)
        if config.kl_target
        else None
    )
    start = time.perf_counter() - previous_wall

    def checkpoint(iteration: int) -> Path:
        weights = full_state_dict(policy) if config.fsdp else None  # a collective: every rank
        if not dist.is_main:
            return run_dir / "policy"
        return save_policy(
            run_dir / "policy",
            policy,
            envs.tokenizer,
            optimizer=None if config.fsdp else optimizer,
            generator=generator,
            state_dict=weights,
            state={
                "iteration": iteration,
                "kl_coef": envs.kl_coef,
                "total_tokens": total_tokens,
                "wall_time_s": time.perf_counter() - start,
                "score_mean_first": score_first,
                "lr_schedule": schedule.state(),
                "eval_before": eval_before,
                "world_size": dist.world_size,
            },
        )

    run = TrainingRun(
        run_dir,
        tensorboard=config.tensorboard,
        checkpoint=checkpoint,
        recoverable=(RewardError,),
        dist=dist,
    )
    run.last_iteration = first_iteration - 1
    history: list[dict[str, float]] = []
    if eval_envs is not None and eval_before is None:
        say(f"sampling {config.eval_samples} responses on held-out prompts before training ...")
        with autocast(device, bf16):
            eval_before = evaluate_held_out(policy, eval_envs, config.seed)
    from tqdm import tqdm

    bar = tqdm(
        range(first_iteration, config.iterations + 1),
        disable=not (config.progress and dist.is_main),
        unit="it",
        dynamic_ncols=True,
    )
    postfix = ""
    try:
        with run.loop(save_on_failure=config.save_checkpoint):
            for iteration in bar:
                beta = envs.kl_coef
                lr = schedule.apply(optimizer, iteration)
                bar.set_postfix_str(f"{postfix} sampling", refresh=True)
                t0 = time.perf_counter()
                # The env seeds row i with seed + i: each iteration's rows (and each rank's) take
                # their own block of seeds, so no iteration replays another's prompts and global
                # row j draws the same prompt with any number of processes.
                prompt_seed = (
                    prompt_seeds(config.seed, iteration, config.num_envs) + dist.rank * local_envs
                )
                with autocast(device, bf16):
                    rollout = collect_rollout(
                        policy,
                        envs,
                        seed=prompt_seed,
                        generator=generator,
                        group_size=config.group_size,
                    )
                rollout_s = time.perf_counter() - t0
                if recompute:
                    with autocast(device, bf16):
                        rollout = recompute_logprobs(policy, rollout, micro_batch)
                recompute_s = time.perf_counter() - t0 - rollout_s
                rewards = shaped_rewards(
                    rollout, beta, not config.kl_in_loss, config.missing_eos_penalty
                )
                if needs_critic(config.advantage):
                    advantages, returns = token_advantages(
                        rollout, rewards, config.gamma, config.gae_lambda
                    )
                    if config.whiten_advantages:
                        advantages = normalize(advantages, rollout.mask, dist=dist) * rollout.mask
                else:  # no critic: values and returns are 0, so the value loss is exactly 0
                    advantages = critic_free_advantages(
                        config.advantage,
                        rewards,
                        rollout.mask,
                        config.group_size,
                        config.gamma,
                        config.grpo_scale,
                        dist=dist,
                    )
                    returns = torch.zeros_like(rewards)
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

                def evaluate(mb: dict[str, torch.Tensor]):
                    with autocast(device, bf16):
                        logprob, entropy, value = policy.evaluate_responses(
                            mb["input_ids"],
                            mb["attention_mask"],
                            mb["actions"],
                            rollout.prompt_len,
                            entropy_grad=config.ppo.ent_coef != 0,
                            positions=mb.get("positions"),
                        )
                    if not config.kl_in_loss:
                        return logprob, entropy, value
                    return logprob, entropy, value, beta * kl_k3(logprob, mb["ref_logprobs"])

                bar.set_postfix_str(f"{postfix} updating", refresh=True)
                t1 = time.perf_counter()
                policy.train()
                stats = ppo_update(
                    policy.parameters(),
                    optimizer,
                    batch,
                    evaluate,
                    config.ppo,
                    generator,
                    dist=dist,
                )
                update_s = time.perf_counter() - t1
                with torch.no_grad():
                    stats |= rollout_stats(
                        rollout, rewards, returns, policy.value_head is not None, dist
                    )
                keys = list(stats)
                values = torch.stack(
                    [stats[k].float().cpu() for k in keys]
                ).tolist()  # the iteration's one sync
                metrics = dict(zip(keys, values))
                tokens = int(metrics.pop("tokens"))
                total_tokens += tokens
                if score_first is None:
                    score_first = metrics["score_mean"]
                elapsed = time.perf_counter() - start
                metrics |= {
                    "iteration": iteration,
                    "kl_coef": beta,
                    "learning_rate": lr,
                    "rollout_tokens_per_s": tokens / rollout_s,
                    "tokens_per_s": total_tokens / elapsed,
                    "rollout_s": rollout_s,
                    "recompute_s": recompute_s,
                    "update_s": update_s,
                    "wall_time_s": elapsed,
                }
                history.append(metrics)
                if (
                    dist.is_main
                    and config.sample_every
                    and (iteration % config.sample_every == 0 or iteration == 1)
                ):
                    run.logger.text("samples", _samples_table(rollout), iteration)
                    run.logger.samples(
                        iteration, rollout.prompts, rollout.responses, rollout.scores.tolist()
                    )
                postfix = f"score={metrics['score_mean']:.3f} kl={metrics['kl_k1']:.2f}"
                bar.set_postfix_str(postfix, refresh=False)
                if controller is not None:
                    envs.kl_coef = controller.update(metrics["kl_k1"], config.num_envs)
                run.end_iteration(iteration, iteration, metrics, f"(up to iteration {iteration})")
                window = [m["score_mean"] for m in history[-config.target_window :]]
                if (
                    config.target_score is not None
                    and len(window) == config.target_window
                    and sum(window) / len(window) >= config.target_score
                ):
                    break
                if (
                    config.save_checkpoint
                    and config.checkpoint_every
                    and iteration % config.checkpoint_every == 0
                ):
                    checkpoint(iteration)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    summary: dict[str, Any] = {
        "task": config.task,
        "model": config.model,
        "iterations": run.last_iteration,
        "wall_time_s": wall,
        "tokens_per_s": total_tokens / wall,
        "score_mean_first": score_first,
        "score_mean_last": history[-1]["score_mean"] if history else None,
        "kl_last": history[-1]["kl_k1"] if history else None,
        "run_dir": str(run_dir),
    }
    if dist.world_size > 1:
        summary["world_size"] = dist.world_size
    if eval_envs is not None:
        say(f"sampling {config.eval_samples} responses on held-out prompts after training ...")
        with autocast(device, bf16):
            after = evaluate_held_out(policy, eval_envs, config.seed)
        summary |= {
            "eval_samples": config.eval_samples,
            "eval_score_before": eval_before["score"],
            "eval_score_before_se": eval_before["score_se"],
            "eval_score_after": after["score"],
            "eval_score_after_se": after["score_se"],
            "eval_kl_after": after["kl"],
        }
        eval_envs.close()
    if config.save_checkpoint:
        summary["checkpoint"] = str(checkpoint(run.last_iteration))
    return run.finish(summary)


def prompt_seeds(seed: int, iteration: int, num_envs: int) -> int:
    """The seed of row 0 of ``iteration``'s reset (row ``i`` gets this + ``i``): disjoint blocks
    of ``num_envs`` seeds per iteration, and per run seed for up to 100,003 iterations."""
    return (seed * 100_003 + iteration) * num_envs


def rollout_stats(
    rollout: Rollout,
    rewards: torch.Tensor,
    returns: torch.Tensor,
    has_critic: bool,
    dist: Dist | None = None,
) -> dict[str, torch.Tensor]:
    """The rollout's logged statistics (0-d tensors): means per response of the KL to the
    reference (k1, k3), score, length and shaped return; entropy per token; the score's std,
    the missing-EOS fraction, the critic's explained variance, the token count. With ``dist``,
    over every rank's responses (one collective, plus two for the explained variance)."""
    mask = rollout.mask
    scores = rollout.scores.double()
    per_response = {  # summed over every response here, divided by their count below
        "kl_k1": (rollout.logprobs - rollout.ref_logprobs) * mask,
        "kl_k3": kl_k3(rollout.logprobs, rollout.ref_logprobs) * mask,
        "score_mean": scores,
        "response_length": mask,
        "missing_eos_frac": rollout.truncated_response,
        "reward_total": rewards,
    }
    sums = [v.double().sum() for v in per_response.values()]
    extra = [
        (scores * scores).sum(),
        (rollout.entropy * mask).sum().double(),
        mask.sum().double(),
        torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device),
    ]
    if dist is not None and dist.active:
        *sums, square, entropy, tokens, n = dist.sum(*sums, *extra)
    else:
        square, entropy, tokens, n = extra
    stats = {k: (v / n).float() for k, v in zip(per_response, sums)}
    mean = stats["score_mean"].double()
    stats["score_std"] = (
        ((square - n * mean * mean).clamp_min(0.0) / (n - 1).clamp_min(1.0)).sqrt().float()
    )
    stats["rollout_entropy"] = (entropy / tokens).float()
    if has_critic:
        stats["explained_variance"] = explained_variance(rollout.values, returns, mask, dist)
    stats["tokens"] = tokens.float()
    return stats


def is_multi_turn(task: str) -> bool:
    from textenv.multiturn import MULTITURN_TASKS

    return task in MULTITURN_TASKS


def task_settings(config: TextTrainConfig) -> tuple[dict[str, Any], bool]:
    """The env's task overrides from ``config``, and whether it evaluates on held-out prompts
    (``eval_samples > 0`` and a held-out part: every 5th prompt, or a multi-turn task's held-out
    episodes). For a multi-turn task, ``max_new_tokens`` is the agent's budget per turn."""
    if is_multi_turn(config.task):
        from textenv.multiturn import make_multiturn_task

        for name in ("reward", "reward_model", "prompts"):
            if getattr(config, name) is not None:
                raise ValueError(
                    f"--{name.replace('_', '-')} does not apply to the multi-turn task {config.task} "
                    "(its episodes write the prompts and reward the turns)"
                )
        task_kwargs = {
            k: v
            for k, v in {
                "max_turn_tokens": config.max_new_tokens,
                "kl_coef": config.kl_coef,
            }.items()
            if v is not None
        } | task_options(config)
        return task_kwargs, config.eval_samples > 0 and make_multiturn_task(
            config.task, **task_kwargs
        ).has_held_out
    task_kwargs = {
        "max_new_tokens": config.max_new_tokens,
        "kl_coef": config.kl_coef,
        "reward_model": config.reward_model,
    }
    task_kwargs = {k: v for k, v in task_kwargs.items() if v is not None} | task_options(config)
    if config.prompts is not None:
        task_kwargs["prompts"] = read_prompts(config.prompts)
    held_out = (
        config.eval_samples > 0
        and len(make_task(config.task, **task_kwargs).prompts) >= HELD_OUT_EVERY
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
    if is_multi_turn(config.task):
        from textenv.multiturn import MULTITURN_TASKS as tasks
    else:
        from textenv.tasks import TASKS as tasks
    if config.task in tasks:
        known = {f.name for f in dataclasses.fields(tasks[config.task])}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"--task-options: task {config.task} has no field {unknown[0]!r} "
                f"(its fields: {', '.join(sorted(known))})"
            )
    return options


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
):
    """The vector env of ``config``'s task: a :class:`TextGenerationVectorEnv`, or a
    :class:`textenv.multiturn.MultiTurnTextVectorEnv` for a multi-turn task. ``model`` (with its
    ``tokenizer``) reuses a loaded reference; ``reward`` a built reward."""
    common = {
        "num_envs": num_envs,
        "task": config.task,
        "model": model or config.model,
        "tokenizer": tokenizer,
        "device": device,
        "dtype": dtype,
        "trust_remote_code": config.trust_remote_code,
        "reference_pass": reference_pass,
        "temperature": config.temperature,
    }
    if is_multi_turn(config.task):
        from textenv.multiturn import MultiTurnTextVectorEnv

        return MultiTurnTextVectorEnv(**common, **task_kwargs)
    return TextGenerationVectorEnv(
        **common, reward=reward if reward is not None else config.reward, **task_kwargs
    )


def with_absolute_paths(config: TextTrainConfig) -> TextTrainConfig:
    """``config`` with local model, reward-model and prompt paths made absolute, so the saved
    config resumes from any directory."""
    from textenv.models import EMBEDDED_NAMES

    def absolute(value: str | None) -> str | None:
        if value is None or value in EMBEDDED_NAMES or value == "tiny" or value.startswith("tiny:"):
            return value
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    return dataclasses.replace(
        config,
        model=absolute(config.model),
        reward_model=absolute(config.reward_model),
        prompts=absolute(config.prompts),
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
    device = resolve_device(device)
    task_kwargs, held_out = task_settings(config)
    envs = make_text_envs(
        config,
        samples,
        task_kwargs | {"split": "test" if held_out else "all"},
        device,
        torch.float32,
        "at_end",
    )
    lm, _ = load_causal_lm(
        str(run_dir / "policy"), device=device, trust_remote_code=config.trust_remote_code
    )
    policy = LMActorCritic(
        lm, temperature=config.temperature, top_k=top_k, top_p=top_p, value_head=False
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


def evaluate_held_out(
    policy: LMActorCritic, envs: TextGenerationVectorEnv, seed: int
) -> dict[str, float]:
    """Mean score (± its standard error) and mean KL to the reference (k1, nats per response) of
    one response per row of ``envs``; the same ``seed`` draws the same prompts and sampling noise."""
    generator = torch.Generator(device=envs.device).manual_seed(seed)
    rollout = collect_rollout(policy, envs, seed=seed, generator=generator)
    scores = rollout.scores.double().cpu()
    kl = ((rollout.logprobs - rollout.ref_logprobs) * rollout.mask).sum(1).double().cpu()
    se = float(scores.std() / len(scores) ** 0.5) if len(scores) > 1 else float("nan")
    return {"score": float(scores.mean()), "score_se": se, "kl": float(kl.mean())}


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π || π_ref), ``exp(r) − r − 1`` with ``r = log π_ref − log π``:
    non-negative and unbiased for samples of π (Schulman, "Approximating KL divergence")."""
    r = ref_logprobs - logprobs
    return r.exp() - r - 1.0


def _samples_table(rollout: Rollout, n: int = 8) -> str:
    rows = ["| prompt | response | score |", "| --- | --- | --- |"]
    for p, r, s in list(zip(rollout.prompts, rollout.responses, rollout.scores.tolist()))[:n]:
        rows.append(f"| {_cell(p)} | {_cell(r)} | {s:.3f} |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


STATE_FILE = "trainer_state.safetensors"


def with_lora(model, r: int, alpha: int, adapter_dir: Path | None = None):
    """``model`` wrapped with trainable LoRA adapters on all linear layers (or the saved ones)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    return get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
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
    """``save_pretrained`` of the policy (loads with plain transformers) plus ``value_head.safetensors``
    and, for resuming, ``trainer_state.safetensors`` (optimizer, RNG, counters); written to a
    temp directory and renamed, so a crash never leaves half a checkpoint. ``state_dict``: the
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
    elif hasattr(
        policy.lm, "merge_and_unload"
    ):  # LoRA: the adapter (to resume) + merged weights (to use)
        policy.lm.save_pretrained(tmp / "adapter")
        copy.deepcopy(policy.lm).merge_and_unload().save_pretrained(tmp)
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
