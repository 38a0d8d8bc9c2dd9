"""Collecting experience from the text envs: one response (or conversation) per row, the
per-token rewards, the advantages and the statistics a text trainer logs.

The policy keeps its own KV cache beside the env's reference model; the env scores, the
agent adds ``−β·log π`` (:func:`textenv.kl.kl_penalized_rewards`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from textenv.agents.distributed import Dist
from textenv.agents.gae import gae
from textenv.agents.lm import LMActorCritic, entropy_of, filter_logits, sample_categorical
from textenv.agents.ppo import explained_variance
from textenv.kl import kl_penalized_rewards
from textenv.rewards import RewardFn, score_batch

BUCKET = 16  # a static cache's prompt columns are a multiple of this (or all of them)

# Per-step columns of a rollout, stacked into [N, T] tensors at the end.
_COLUMNS = (
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


@dataclass
class Rollout:
    """One batch of episodes, laid out ``[N, T]`` (rows: episodes, columns: response tokens)."""

    # [N, prompt_len + T]: the final observation, all-padding prompt columns dropped
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    actions: torch.Tensor  # [N, T]
    # log π of the sampled token under the sampling distribution
    logprobs: torch.Tensor
    values: torch.Tensor
    # what the env paid: score·1[last] + β_env·log π_ref (per step, or summed at the end)
    env_rewards: torch.Tensor
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor  # 1 on response tokens (up to and including EOS)
    scores: torch.Tensor  # [N]
    truncated_response: torch.Tensor  # [N] hit the budget without EOS
    prompts: list[str]
    responses: list[str]
    prompt_len: int
    # [N, T] column of each action in input_ids (multi-turn; else prompt_len + t)
    positions: torch.Tensor | None = None
    # [N, T] task reward per token (multi-turn turn rewards); else the scores, at the end
    step_scores: torch.Tensor | None = None


def collect_rollout(
    policy: LMActorCritic,
    envs,
    seed: int | None,
    generator: torch.Generator,
    group_size: int = 1,
    static_cache: bool = False,
    block: int = 1,
    decode: Callable[..., Any] | None = None,
) -> Rollout:
    """Reset ``envs`` and sample one response (or, in a multi-turn env, one conversation) per
    row, the policy keeping its own KV cache; with ``group_size=k``, each run of k consecutive
    rows shares a prompt.

    Each step feeds the policy what each row gained: its action, and in a multi-turn env the
    env's reply after a turn (right-padded to the widest row, masked), so the cache continues
    across turns. Stored log-probs are of the distribution actually sampled from (temperature,
    and the policy's top-k/top-p); the env's reference must score at the same temperature, or
    the KL is not 0 at the start.

    ``static_cache``: the policy's KV cache is allocated once at its final length
    (transformers' ``StaticCache``), so every decode step has the same shapes: the form that
    ``torch.compile`` and CUDA graphs need. It samples the same tokens as the dynamic cache.

    ``block=k`` (single-turn envs): the policy samples ``k`` tokens before the env answers them
    all at once (:meth:`TextGenerationVectorEnv.step_block`): one host sync per block instead of
    one per token, and one reference forward for the rows that ended in it. The tokens, the
    random stream and the rollout are those of ``block=1`` (tested).

    ``decode``: the forward the policy samples with, in place of ``policy._forward`` (its
    signature): a ``torch.compile``-d one (see :func:`compiled_decode`). It needs
    ``static_cache``, whose length is bucketed (the kept prompt columns rounded up to a multiple
    of 16) so that batches of nearby prompt lengths reuse one compiled graph.
    """
    if decode is not None and not static_cache:
        raise ValueError("a compiled decode needs static_cache=True (fixed shapes)")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if block > 1 and getattr(envs, "multi_turn", False):
        raise ValueError(
            "block > 1 is for single-turn envs (a conversation's env replies in turns)"
        )
    if envs.temperature != policy.temperature:
        raise ValueError(
            f"the policy samples at temperature {policy.temperature} but the env's reference "
            f"scores at {envs.temperature}; set envs.temperature = {policy.temperature}"
        )
    # FSDP's all-gather buffers outlive the rollout: inference-mode tensors would refuse the
    # update's in-place writes, so a sharded policy samples under no_grad.
    if not is_sharded(policy):
        with torch.inference_mode():
            return _sample(policy, envs, seed, generator, group_size, static_cache, block, decode)
    with torch.no_grad():
        rollout = _sample(policy, envs, seed, generator, group_size, static_cache, block, decode)
    sharded: Any = policy
    sharded.reshard()  # the root stays gathered after a no-grad forward; the optimizer holds shards
    return rollout


def compiled_decode(policy: LMActorCritic, device: torch.device) -> Callable[..., Any]:
    """``policy._forward`` under ``torch.compile`` for the rollout's static-cache steps: CUDA
    graphs (``mode="reduce-overhead"``) on CUDA, inductor's default elsewhere; fixed shapes
    (``dynamic=False``), one graph per bucketed length. The update keeps the eager forward."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(policy._forward, mode=mode, dynamic=False)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` is sharded by FSDP2."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _sample(
    policy: LMActorCritic,
    envs,
    seed: int | None,
    generator: torch.Generator,
    group_size: int,
    static_cache: bool,
    block: int,
    decode: Callable[..., Any] | None,
) -> Rollout:
    was_training = policy.training
    policy.eval()
    obs, info = envs.reset(
        seed=seed, options={"group_size": group_size} if group_size > 1 else None
    )
    reader = _PolicyReader(policy, obs, envs, static_cache, decode)
    record = _Recorder(envs.num_envs, envs.max_new_tokens, reader.device)
    logits, values = reader.prefill(obs)
    if block > 1:
        obs = _sample_blocks(policy, envs, generator, block, reader, record, obs, logits, values)
        policy.train(was_training)
        return record.rollout(obs, info, reader, envs)
    for _ in range(envs.max_new_tokens):
        logp_all = torch.log_softmax(filter_logits(logits, policy.top_k, policy.top_p), dim=-1)
        action = sample_categorical(logp_all.exp(), generator)
        record.sample(action, logp_all, values, reader.active, reader.positions())
        obs, reward, terminated, _, step_info = envs.step(action)
        record.env_step(reward, step_info)
        new, width = reader.gained(envs)
        reader.active = reader.active & ~terminated
        if envs.all_done:  # the env's own per-step sync already knows; no second one here
            break
        logits, values = reader.feed(obs, action, new, width)
    policy.train(was_training)
    return record.rollout(obs, info, reader, envs)


def _sample_blocks(
    policy: LMActorCritic,
    envs,
    generator: torch.Generator,
    block: int,
    reader: _PolicyReader,
    record: _Recorder,
    obs: dict[str, torch.Tensor],
    logits: torch.Tensor,
    values: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Single-turn sampling ``block`` tokens at a time (see :func:`collect_rollout`). Every row
    feeds the policy each token it sampled: a row that has ended in the block reads tokens its
    rollout masks out, which changes no other row. The generator is put back to where
    ``block=1`` would leave it when the env ends the batch inside a block."""
    every = torch.ones(envs.num_envs, dtype=torch.long, device=reader.device)
    taken = 0
    while taken < envs.max_new_tokens:
        k = min(block, envs.max_new_tokens - taken)
        actions, states = [], []
        for j in range(k):
            logp_all = torch.log_softmax(filter_logits(logits, policy.top_k, policy.top_p), dim=-1)
            actions.append(sample_categorical(logp_all.exp(), generator))
            states.append(generator.get_state())
            record.sample(actions[-1], logp_all, values, reader.active, reader.positions())
            if j < k - 1:
                logits, values = reader.feed(obs, actions[-1], every, 1)
        obs, reward, _, _, step_info = envs.step_block(torch.stack(actions, 1))
        steps = reward.shape[1]
        record.env_block(reward, step_info, k)
        taken += steps
        if envs.all_done:
            generator.set_state(states[steps - 1])
            break
        logits, values = reader.feed(obs, actions[-1], every, 1)
    return obs


class _PolicyReader:
    """The policy's KV cache over each row's prompt and what came after it."""

    def __init__(
        self,
        policy: LMActorCritic,
        obs: dict[str, torch.Tensor],
        envs,
        static_cache: bool,
        decode: Callable[..., Any] | None = None,
    ) -> None:
        self.policy, self.static = policy, static_cache
        self.forward = decode or policy._forward
        self.P, self.B, n = envs.max_prompt_tokens, envs.max_new_tokens, envs.num_envs
        self.multi_turn = getattr(envs, "multi_turn", False)
        self.device = obs["input_ids"].device
        # Prompts are left-padded into P slots: columns that are padding in every row are left
        # out of every forward here and in the update (less compute, same result).
        self.start = int(obs["attention_mask"][:, : self.P].any(0).long().argmax())
        if static_cache:  # bucketed: batches of nearby prompt lengths share one shape
            self.start = max(0, self.P - -(-(self.P - self.start) // BUCKET) * BUCKET)
        self.cache_mask = obs["attention_mask"][:, self.start : self.P]
        self.cache: Any = None
        # One column per step after the prompt's: the cache's final length. A conversation's
        # chunks are as wide as the widest row's gain, so its cache has no such bound.
        self.max_len = self.P - self.start + self.B
        if static_cache and self.multi_turn:
            raise ValueError(
                "a static KV cache is for single-turn envs (a conversation's length "
                "in cache columns is not known in advance)"
            )
        self.active = torch.ones(n, dtype=torch.bool, device=self.device)
        self.fed = torch.zeros(n, dtype=torch.long, device=self.device)  # read after the prompt
        self.fed_host = np.zeros(n, dtype=np.int64)
        self.rows = torch.arange(n, device=self.device)

    def prefill(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        position_ids = (self.cache_mask.cumsum(-1) - 1).clamp_min(0)
        static = {}
        if self.static:
            from transformers import StaticCache

            self.cache = StaticCache(config=self.policy.lm.config, max_cache_len=self.max_len)
            static = {"cache_position": torch.arange(self.cache_mask.shape[1], device=self.device)}
        logits, values, self.cache = self.forward(
            obs["input_ids"][:, self.start : self.P],
            self._attention(self.cache_mask),
            position_ids,
            past_key_values=self.cache,
            logits_to_keep=1,
            use_cache=True,
            **static,
        )
        return logits[:, -1], values[:, -1]

    def _attention(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask a forward reads: a static cache's covers all its slots, those not
        yet written masked."""
        if not self.static:
            return mask
        return torch.nn.functional.pad(mask, (0, self.max_len - mask.shape[1]))

    def positions(self) -> torch.Tensor:
        """The column, in the rollout's layout, of the action each row samples now."""
        return self.P - self.start + self.fed

    def gained(self, envs) -> tuple[torch.Tensor, int]:
        """Tokens each row gained at this step (its action; in a multi-turn env after a turn,
        the env's reply too, counted on the host without a sync) and the widest count."""
        if not self.multi_turn:
            return self.active.long(), 1
        lengths = envs.conversation_lengths
        new_host, self.fed_host = lengths - self.fed_host, lengths
        return torch.as_tensor(new_host, device=self.device), int(new_host.max())

    def feed(
        self, obs: dict[str, torch.Tensor], action: torch.Tensor, new: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read what each row gained; the logits and values after each row's last new token."""
        offsets = torch.arange(width, device=self.device)
        chunk_mask = (offsets < new.unsqueeze(1)).long()
        if self.multi_turn:
            cols = (self.P + self.fed.unsqueeze(1) + offsets).clamp_max(self.P + self.B - 1)
            chunk = obs["input_ids"].gather(1, cols)
        else:
            chunk = action.unsqueeze(1)
        # >= 0: every row's cache holds its prompt, which is never empty.
        position_ids = self.cache_mask.sum(-1, keepdim=True) + chunk_mask.cumsum(-1) - 1
        written = self.cache_mask.shape[1]
        self.cache_mask = torch.cat([self.cache_mask, chunk_mask], dim=1)
        static = {}
        if self.static:
            static = {"cache_position": torch.arange(written, written + width, device=self.device)}
        logits, values, self.cache = self.forward(
            chunk,
            self._attention(self.cache_mask),
            position_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=width,
            **static,
        )
        last = (new - 1).clamp_min(0)
        self.fed = self.fed + new
        return logits[self.rows, last], values[self.rows, last]


class _Recorder:
    """The per-step columns of a rollout and what the env reported as rows ended."""

    def __init__(self, n: int, budget: int, device: torch.device) -> None:
        self.cols: dict[str, list[torch.Tensor]] = {k: [] for k in _COLUMNS}
        self.ref_at_end = torch.zeros((n, budget), device=device)  # with reference_pass="at_end"
        self.scores = torch.zeros(n, device=device)
        self.truncated = torch.zeros(n, dtype=torch.bool, device=device)
        self.responses: list[str | None] = [None] * n

    def sample(
        self,
        action: torch.Tensor,
        logp_all: torch.Tensor,
        values: torch.Tensor,
        active: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        self.cols["actions"].append(action)
        self.cols["logprobs"].append(logp_all.gather(1, action.unsqueeze(1)).squeeze(1))
        self.cols["entropy"].append(entropy_of(logp_all))
        self.cols["values"].append(values)
        self.cols["mask"].append(active.float())
        self.cols["positions"].append(positions)

    def env_step(self, reward: torch.Tensor, info: dict[str, Any]) -> None:
        self.cols["env_rewards"].append(reward)
        if "ref_logprob" in info:
            self.cols["ref_logprobs"].append(info["ref_logprob"])
        if "turn_reward" in info:
            self.cols["step_scores"].append(info["turn_reward"])
        self._ends(info)

    def env_block(self, reward: torch.Tensor, info: dict[str, Any], sampled: int) -> None:
        """The env's answer to the last ``sampled`` columns (``step_block``): the columns it
        took, each row's mask from which of them it took; the columns after the batch ended are
        dropped."""
        steps = reward.shape[1]
        for name in ("actions", "logprobs", "entropy", "values", "mask", "positions"):
            del self.cols[name][len(self.cols[name]) - sampled + steps :]
        self.cols["mask"][-steps:] = list(info["active"].float().unbind(1))
        self.cols["env_rewards"] += list(reward.unbind(1))
        if "ref_logprob" in info:
            self.cols["ref_logprobs"] += list(info["ref_logprob"].unbind(1))
        self._ends(info)

    def _ends(self, info: dict[str, Any]) -> None:
        if "_ref_logprobs" in info:
            ended = info["_ref_logprobs"].unsqueeze(1)
            self.ref_at_end = torch.where(ended, info["ref_logprobs"], self.ref_at_end)
        if "_score" in info:
            ended = info["_score"]
            self.scores = torch.where(ended, info["score"], self.scores)
            self.truncated |= info["truncated_response"]
            for i in ended.nonzero().squeeze(1).tolist():
                self.responses[i] = info["response_text"][i]

    def rollout(self, obs: dict[str, torch.Tensor], info: dict, reader: _PolicyReader, envs):
        T = len(self.cols["actions"])
        stacked = {k: torch.stack(v, dim=1) for k, v in self.cols.items() if v}
        stacked.setdefault("ref_logprobs", self.ref_at_end[:, :T])
        if reader.multi_turn:
            end = reader.P + int(envs.conversation_lengths.max())
        else:  # the actions are consecutive columns: evaluate_responses' fast path
            stacked.pop("positions")
            end = reader.P + T
        return Rollout(
            input_ids=obs["input_ids"][:, reader.start : end],
            attention_mask=obs["attention_mask"][:, reader.start : end],
            scores=self.scores,
            truncated_response=self.truncated,
            prompts=list(info["prompt"]),
            responses=[r or "" for r in self.responses],
            prompt_len=reader.P - reader.start,
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
    if is_sharded(policy):
        sharded: Any = policy
        sharded.reshard()  # as after the rollout: the optimizer holds the shards
    keep = rollout.mask > 0
    logprobs, entropy, values = (
        torch.where(keep, torch.cat(x), 0.0) for x in zip(*parts, strict=True)
    )
    if policy.value_head is None:
        values = rollout.values
    return dataclasses.replace(rollout, logprobs=logprobs, entropy=entropy, values=values)


def shaped_rewards(
    rollout: Rollout, kl_coef: float, kl_in_reward: bool, missing_eos_penalty: float | None
) -> torch.Tensor:
    """Per-token reward ``score·1[last] − β·(log π − log π_ref)``
    (:func:`textenv.kl.kl_penalized_rewards`) from what the env reported and the stored
    log-probs: no second forward; in a multi-turn episode each turn's reward at the token that
    ended the turn. With the KL in the loss instead, it is the task reward alone;
    ``missing_eos_penalty`` is subtracted at the last token of responses that hit the budget
    (of conversations that ran out of context)."""
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
    no_bootstrap = torch.zeros_like(rollout.values[:, 0])
    adv, ret = gae(rewards.T, rollout.values.T, no_bootstrap, last.T, last.T, gamma, lam)
    return adv.T * mask, ret.T * mask


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π || π_ref), ``exp(r) − r − 1`` with ``r = log π_ref − log π``:
    non-negative and unbiased for samples of π (Schulman, "Approximating KL divergence")."""
    r = ref_logprobs - logprobs
    return r.exp() - r - 1.0


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
    n = torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device)
    extra = [
        (scores * scores).sum(),
        (rollout.entropy * mask).sum().double(),
        mask.sum().double(),
        n,
    ]
    if dist is not None and dist.active:
        *sums, square, entropy, tokens, n = dist.sum(*sums, *extra)
    else:
        square, entropy, tokens, n = extra
    stats = {k: (v / n).float() for k, v in zip(per_response, sums, strict=True)}
    mean = stats["score_mean"].double()
    variance = (square - n * mean * mean).clamp_min(0.0) / (n - 1).clamp_min(1.0)
    stats["score_std"] = variance.sqrt().float()
    stats["rollout_entropy"] = (entropy / tokens).float()
    if has_critic:
        stats["explained_variance"] = explained_variance(rollout.values, returns, mask, dist)
    stats["tokens"] = tokens.float()
    return stats


def evaluate_held_out(
    policy: LMActorCritic, envs, seed: int, extra: dict[str, RewardFn] | None = None
) -> dict[str, float]:
    """Mean score (± its standard error) and mean KL to the reference (k1, nats per response)
    of one response per row of ``envs``; the same ``seed`` draws the same prompts and noise.

    ``extra``: more rewards (a gold reward beside a learned proxy, say) scored on the same
    prompts and responses, as ``<name>`` and ``<name>_se``."""
    generator = torch.Generator(device=envs.device).manual_seed(seed)
    rollout = collect_rollout(policy, envs, seed=seed, generator=generator)
    kl = ((rollout.logprobs - rollout.ref_logprobs) * rollout.mask).sum(1).double().cpu()
    mean, se = _mean_se(rollout.scores.double().cpu())
    result = {"score": mean, "score_se": se, "kl": float(kl.mean())}
    for name, reward in (extra or {}).items():
        scores = score_batch(reward, rollout.prompts, rollout.responses)
        result[name], result[f"{name}_se"] = _mean_se(torch.tensor(scores, dtype=torch.float64))
    return result


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std() / len(x) ** 0.5) if len(x) > 1 else float("nan")


def samples_table(rollout: Rollout, n: int = 8) -> str:
    """The first ``n`` prompts, responses and scores as a markdown table."""
    rows = ["| prompt | response | score |", "| --- | --- | --- |"]
    scores = rollout.scores.tolist()
    for p, r, s in list(zip(rollout.prompts, rollout.responses, scores, strict=True))[:n]:
        rows.append(f"| {_cell(p)} | {_cell(r)} | {s:.3f} |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
