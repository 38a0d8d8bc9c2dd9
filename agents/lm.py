"""Language-model actor-critic and its rollout through the vectorised text environment."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from textenv.models import cache_kwargs, output_cache


class LMActorCritic(nn.Module):
    """A causal LM as the policy and a linear value head on its last hidden states.

    The head reads the hidden state the LM's own forward returns (``output_hidden_states``),
    so the logits are exactly the model's, whatever post-processing its head does.
    """

    def __init__(self, model: PreTrainedModel, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got top_k={top_k}, top_p={top_p}")
        self.lm = model
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        hidden = model.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # Zero init: the critic starts at V = 0 and learns from the returns, not from noise.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(model.parameters()).device)

    def _forward(self, input_ids, attention_mask, position_ids, past_key_values=None, logits_to_keep: int = 0,
                 use_cache: bool = False):
        cache = cache_kwargs(self.lm, past_key_values) if past_key_values is not None else {}
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache, output_hidden_states=True, logits_to_keep=logits_to_keep, **cache)
        hidden = out.hidden_states[-1]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = out.logits.float() / self.temperature
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logits, values, output_cache(out) if use_cache else None

    def evaluate_responses(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, actions: torch.Tensor, prompt_len: int,
        entropy_grad: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log π(a_t|s_t), entropy_t, V(s_t))`` for the ``T`` response tokens, one full forward.

        ``input_ids`` is ``[n, prompt_len + T]`` in the env's layout; the logits at position
        ``prompt_len + t - 1`` give the distribution of response token ``t``. With
        ``entropy_grad=False`` the entropy is a detached diagnostic (no backward through the
        full-vocabulary softmax when the loss has no entropy bonus).
        """
        T = actions.shape[1]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        logits, values, _ = self._forward(input_ids, attention_mask, position_ids, logits_to_keep=T + 1)
        logits, values = logits[:, :T], values[:, :T]
        logp_all = torch.log_softmax(logits, dim=-1)
        logprob = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logprob, entropy, values


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k / nucleus filtering (``-inf`` outside the kept set); identity with ``top_k=0, top_p=1``.

    Sampling from the filtered distribution while the update scores tokens under the full one
    biases the PPO ratio (the stored log-prob is of the filtered distribution); that is why
    both are off by default.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (rows need not be normalised): inverse-CDF sampling, one
    uniform per row; over a large vocabulary it is far cheaper than ``torch.multinomial``.
    Zero-probability entries are never drawn (``right=True`` skips flat steps of the CDF)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)


@dataclass
class Rollout:
    """One batch of episodes, laid out ``[N, T]`` (rows: episodes, columns: response tokens)."""

    input_ids: torch.Tensor  # [N, prompt_len + T]: the final observation, all-padding prompt columns dropped
    attention_mask: torch.Tensor  # [N, prompt_len + T]
    actions: torch.Tensor  # [N, T]
    logprobs: torch.Tensor  # log π of the sampled token under the sampling distribution
    values: torch.Tensor
    env_rewards: torch.Tensor  # what the env paid: score·1[last] + β_env·log π_ref (per step or summed at the end)
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor  # 1 on response tokens (up to and including EOS)
    scores: torch.Tensor  # [N]
    truncated_response: torch.Tensor  # [N] hit the budget without EOS
    prompts: list[str]
    responses: list[str]
    prompt_len: int


@torch.inference_mode()
def collect_rollout(policy: LMActorCritic, envs, seed: int | None, generator: torch.Generator) -> Rollout:
    """Reset ``envs`` and sample one response per row, the policy keeping its own KV cache.

    Stored log-probs are of the distribution actually sampled from (temperature applied).
    """
    was_training = policy.training
    policy.eval()
    obs, info = envs.reset(seed=seed)
    P, B, N = envs.max_prompt_tokens, envs.max_new_tokens, envs.num_envs
    device = obs["input_ids"].device
    # Prompts are left-padded into P slots: columns that are padding in every row are left out
    # of every forward here and in the update (less compute, same result).
    start = int(obs["attention_mask"][:, :P].any(0).long().argmax())
    prompt_mask = obs["attention_mask"][:, start:P]
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
    logits, values, cache = policy._forward(obs["input_ids"][:, start:P], prompt_mask, position_ids,
                                            logits_to_keep=1, use_cache=True)
    cols = {k: [] for k in ("actions", "logprobs", "values", "env_rewards", "ref_logprobs", "entropy", "mask")}
    ref_at_end = torch.zeros((N, B), device=device)  # filled as rows end, with kl_shaping="at_end"
    active = torch.ones(N, dtype=torch.bool, device=device)
    scores = torch.zeros(N, device=device)
    truncated = torch.zeros(N, dtype=torch.bool, device=device)
    responses: list[str | None] = [None] * N
    for t in range(B):
        logp_all = torch.log_softmax(filter_logits(logits[:, -1], policy.top_k, policy.top_p), dim=-1)
        probs = logp_all.exp()
        action = sample_categorical(probs, generator)
        cols["actions"].append(action)
        cols["logprobs"].append(logp_all.gather(1, action.unsqueeze(1)).squeeze(1))
        cols["entropy"].append(-(probs * torch.where(probs > 0, logp_all, torch.zeros_like(logp_all))).sum(-1))
        cols["values"].append(values[:, -1])
        cols["mask"].append(active.float())
        obs, reward, terminated, _, step_info = envs.step(action)
        cols["env_rewards"].append(reward)
        if "ref_logprob" in step_info:
            cols["ref_logprobs"].append(step_info["ref_logprob"])
        if "_ref_logprobs" in step_info:
            ref_at_end = torch.where(step_info["_ref_logprobs"].unsqueeze(1), step_info["ref_logprobs"], ref_at_end)
        if "_score" in step_info:
            ended = step_info["_score"]
            scores = torch.where(ended, step_info["score"], scores)
            truncated |= step_info["truncated_response"]
            for i in ended.nonzero().squeeze(1).tolist():
                responses[i] = step_info["response_text"][i]
        active = active & ~terminated
        if envs.all_done:  # the env's own per-step sync already knows; no second one here
            break
        mask = obs["attention_mask"][:, start : P + t + 1]
        logits, values, cache = policy._forward(
            action.unsqueeze(1), mask, mask.sum(-1, keepdim=True) - 1, past_key_values=cache, use_cache=True
        )
    T = len(cols["actions"])
    stacked = {k: torch.stack(v, dim=1) for k, v in cols.items() if v}
    stacked.setdefault("ref_logprobs", ref_at_end[:, :T])
    policy.train(was_training)
    return Rollout(
        input_ids=obs["input_ids"][:, start : P + T], attention_mask=obs["attention_mask"][:, start : P + T],
        scores=scores, truncated_response=truncated, prompts=list(info["prompt"]),
        responses=[r or "" for r in responses], prompt_len=P - start, **stacked,
    )


class AdaptiveKLController:
    """Ziegler et al. (2019): nudge β so that the KL per response tracks ``target``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10_000) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
