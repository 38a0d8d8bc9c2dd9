"""Token-level text generation as Gymnasium environments.

:class:`TextGenerationVectorEnv` keeps a batch of sequences as tensors on the models' device
and steps the frozen reference model with a KV cache; :class:`TextGenerationEnv` is the same
machinery at batch size 1 behind the single-env API (numpy observations, float rewards).
Both pay ``score · 1[last] + kl_coef · log π_ref(a_t | s_t)`` and report ``ref_logprob``
(or, with ``reference_pass="at_end"``, pay the KL term's sum at the end; see the vector env).
``kl_coef`` (β) is owned by the env; :func:`textenv.kl.kl_penalized_rewards` turns what the env
reports into the exact KL-penalised per-token reward for any agent. The reference scores
tokens at the env's ``temperature``, which must be the one the policy samples with.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.arrays import as_arrays, row_seeds, selected_rows
from textenv.device import resolve_device, set_torch_threads
from textenv.models import (
    cache_kwargs,
    disable_dropout,
    ensure_pad_token,
    load_causal_lm,
    output_cache,
)
from textenv.rewards import RewardFn, get_reward, score_batch
from textenv.tasks import Task, make_task


class _GenerationTask(Protocol):
    """What the generation core reads of its task: a :class:`textenv.tasks.Task` or a
    :class:`textenv.multiturn.MultiTurnTask`."""

    @property
    def max_prompt_tokens(self) -> int: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def kl_coef(self) -> float: ...
    @property
    def chat_fallback(self) -> bool: ...
    def validate(self) -> None: ...


class _Generation:
    """The batched state and the reference model's KV-cached stepping, shared by both envs.

    Layout of one row (``L = P + B``): the prompt left-padded into slots ``[0, P)``, the
    response in ``[P, P + len)``, padding after; ``mask`` is 1 on real tokens. The reference
    model's cache holds one slot per step for every row; rows that have ended feed padding
    with mask 0, so the cache's attention mask is exactly ``mask[:, :P + steps]``.
    """

    def __init__(
        self,
        task: _GenerationTask,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reward: RewardFn | None,  # None: the subclass scores (multi-turn turns)
        batch_size: int,
        device: torch.device,
        reference_pass: str,
        temperature: float,
    ) -> None:
        task.validate()
        if reference_pass not in REFERENCE_PASSES:
            raise ValueError(
                f"reference_pass must be one of {REFERENCE_PASSES}, got {reference_pass!r}"
            )
        self.at_end = reference_pass == "at_end"
        self.temperature = check_temperature(temperature)
        self.task, self.model, self.tokenizer, self.reward = task, model, tokenizer, reward
        self.device, self.batch_size = device, batch_size
        self.pad_id = ensure_pad_token(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no EOS token; episodes could only end at the budget"
            )
        self.eos_id = int(tokenizer.eos_token_id)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.P, self.B = task.max_prompt_tokens, task.max_new_tokens
        self.L = self.P + self.B
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and self.L > max_pos:
            raise ValueError(
                f"max_prompt_tokens + max_new_tokens = {self.L} exceeds the model's context of "
                f"{max_pos} tokens"
            )
        self.kl_coef = float(task.kl_coef)
        self.ids = torch.full((batch_size, self.L), self.pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros((batch_size, self.L), dtype=torch.long, device=device)
        self.resp_len = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.done = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.steps = 0
        self.started = False
        self.all_done = True  # host-side copy, refreshed by the one sync of each step
        self.prompts: list[str] = [""] * batch_size
        self.ref_logp_next: torch.Tensor | None = None
        self.cache = None
        self.start = 0  # first column of the reference's cache

    # -- reset -------------------------------------------------------------------------------
    def tokenize_prompts(
        self, prompts: list[str], chat: list[bool]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Left-pad (and left-truncate, keeping the end) each prompt into ``P`` slots; also
        returns the longest prompt's length. ``chat[i]``: prompt ``i`` is a rendered chat
        template."""
        ids = torch.full((len(prompts), self.P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.P), dtype=torch.long)
        width = 1
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"prompt {i} is empty")
            # A rendered chat template already holds the model's special tokens.
            toks = self.tokenizer(prompt, add_special_tokens=not chat[i])["input_ids"][-self.P :]
            if not toks:
                raise ValueError(f"prompt {i} ({prompt[:40]!r}) tokenizes to no tokens")
            ids[i, self.P - len(toks) :] = torch.tensor(toks)
            width = max(width, len(toks))
            mask[i, self.P - len(toks) :] = 1
        return ids.to(self.device), mask.to(self.device), width

    def render(self, prompt: str | list[dict[str, str]]) -> str:
        """A prompt as text: a list of chat messages goes through the tokenizer's chat template."""
        if isinstance(prompt, str):
            return prompt
        if not getattr(self.tokenizer, "chat_template", None):
            if self.task.chat_fallback:  # e.g. reasoning-gym's [system, user] with a base model
                return "\n\n".join(m["content"] for m in prompt) + "\n"
            raise ValueError(
                "a chat prompt (a list of messages) needs a tokenizer with a chat template"
            )
        text = self.tokenizer.apply_chat_template(
            list(prompt), tokenize=False, add_generation_prompt=True
        )
        return cast(str, text)  # tokenize=False: the rendered text

    # no_grad, not inference_mode: returned tensors must work in a user's in-place ops and losses.
    @torch.no_grad()
    def reset(self, prompts: list[str | list[dict[str, str]]]) -> None:
        chat = [not isinstance(p, str) for p in prompts]
        rendered = [self.render(p) for p in prompts]
        prompt_ids, prompt_mask, width = self.tokenize_prompts(rendered, chat)
        self.prompts = list(rendered)
        self.ids.fill_(self.pad_id)
        self.mask.zero_()
        self.ids[:, : self.P] = prompt_ids
        self.mask[:, : self.P] = prompt_mask
        self.resp_len.zero_()
        self.done.zero_()
        self.steps = 0
        self.started = True
        self.all_done = False
        # Columns that are padding in every row are left out of the reference's cache.
        self.start = self.P - width
        if self.at_end:  # the reference reads each response once, when it ends
            return
        prompt_ids, prompt_mask = prompt_ids[:, self.start :], prompt_mask[:, self.start :]
        position_ids = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = output_cache(out)
        self.ref_logp_next = self._ref_logp(out.logits[:, -1])

    @torch.no_grad()
    def reset_rows(self, rows: list[int], prompts: list[str | list[dict[str, str]]]) -> None:
        """Start new episodes in ``rows`` only; the other rows carry on where they are. Each row
        has its own response length, so rows need not be at the same step; only the per-step
        reference's KV cache (one slot per step for the whole batch) cannot allow it."""
        if not self.at_end:
            raise NotImplementedError(
                "partial resets (options['reset_mask']) need reference_pass='at_end': with "
                "'per_step' the reference's KV cache is shared by the batch, one slot per step"
            )
        if not self.started:
            raise RuntimeError("the first reset() must reset every row")
        chat = [not isinstance(p, str) for p in prompts]
        rendered = [self.render(p) for p in prompts]
        prompt_ids, prompt_mask, _ = self.tokenize_prompts(rendered, chat)
        idx = torch.tensor(rows, device=self.device)
        self.ids[idx] = self.pad_id
        self.mask[idx] = 0
        self.ids[idx, : self.P] = prompt_ids
        self.mask[idx, : self.P] = prompt_mask
        self.resp_len[idx] = 0
        self.done[idx] = False
        for r, prompt in zip(rows, rendered, strict=True):
            self.prompts[r] = prompt
        self.all_done = False
        width = int(self.mask[:, : self.P].sum(1).max())
        self.start = self.P - width

    def _ref_logp(self, logits: torch.Tensor) -> torch.Tensor:
        """``log π_ref`` at the sampling temperature (a KL between differently tempered
        distributions is not 0 even when the policy is the reference)."""
        return torch.log_softmax(logits.float() / self.temperature, dim=-1)

    # -- step --------------------------------------------------------------------------------
    @torch.no_grad()  # see reset
    def step(
        self, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Advance every active row by its action; returns ``(reward, terminated, ended_now,
        ref_logprob, end_info)``. Rows that have ended ignore their action and pay 0."""
        if not self.started:
            raise RuntimeError("step() called before reset()")
        if actions.shape != (self.batch_size,):
            raise ValueError(
                f"expected {self.batch_size} actions, got shape {tuple(actions.shape)}"
            )
        active = ~self.done
        bad = ((actions < 0) | (actions >= self.vocab_size)) & active
        a = actions.clamp(0, self.vocab_size - 1)
        ended_now = active & ((a == self.eos_id) | (self.resp_len + 1 >= self.B))
        # The one host sync of a step: three flags together.
        any_bad, any_ended, all_done = torch.stack(
            [bad.any(), ended_now.any(), (self.done | ended_now).all()]
        ).tolist()
        self.all_done = bool(all_done)
        if any_bad:
            self.all_done = False
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"action {int(actions[row])} (row {row}) is outside Discrete({self.vocab_size})"
            )
        if self.at_end:
            ref_lp = torch.zeros(self.batch_size, device=self.device)
        else:
            assert self.ref_logp_next is not None  # reset() set it: the reference ran per step
            ref_lp = self.ref_logp_next.gather(1, a.unsqueeze(1)).squeeze(1)
            ref_lp = torch.where(active, ref_lp, torch.zeros_like(ref_lp))
        slot = (self.P + self.resp_len).clamp_max(self.L - 1).unsqueeze(1)
        self.ids.scatter_(
            1, slot, torch.where(active, a, self.ids.gather(1, slot).squeeze(1)).unsqueeze(1)
        )
        self.mask.scatter_(
            1, slot, torch.where(active, 1, self.mask.gather(1, slot).squeeze(1)).unsqueeze(1)
        )
        self.resp_len += active.long()
        self.done |= ended_now
        reward = self.kl_coef * ref_lp
        end_info: dict[str, Any] = {}
        if any_ended:
            rows = ended_now.nonzero().squeeze(1).tolist()
            lengths = self.resp_len[rows].tolist()
            tokens = self.ids[rows, self.P :].tolist()
            texts = [self.decode(t[:n]) for t, n in zip(tokens, lengths, strict=True)]
            assert self.reward is not None  # only _Conversation has none, and it scores its turns
            scores = score_batch(self.reward, [self.prompts[r] for r in rows], texts)
            score_t = torch.tensor(scores, dtype=torch.float32, device=self.device)
            idx = torch.tensor(rows, device=self.device)
            reward = reward.index_add(0, idx, score_t)
            # scores as a [N] tensor too, NaN where no episode ended
            batch_scores = torch.full(
                (self.batch_size,), float("nan"), device=self.device
            ).index_copy(0, idx, score_t)
            end_info = {
                "rows": rows,
                "scores": scores,
                "batch_scores": batch_scores,
                "texts": texts,
            }
            if self.at_end:
                ref_lps = self._response_ref_logprobs(idx, max(lengths))
                reward = reward.index_add(0, idx, self.kl_coef * ref_lps.sum(1))
                end_info["ref_logprobs"] = ref_lps
        self.steps += 1
        if not all_done and not self.at_end:
            self._advance_reference(torch.where(active, a, torch.full_like(a, self.pad_id)))
        return reward, ended_now.clone(), ended_now, ref_lp, end_info

    def _response_ref_logprobs(self, idx: torch.Tensor, width: int) -> torch.Tensor:
        """``log π_ref`` of each response token of rows ``idx`` (``[k, width]``, 0 past a row's
        end), from one forward over their prompt + response."""
        ids = self.ids[idx, self.start : self.P + width]
        mask = self.mask[idx, self.start : self.P + width]
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        # The logits at the column before each response token give its distribution.
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=width + 1
        ).logits[:, :width]
        logp = self._ref_logp(logits).gather(-1, ids[:, -width:].unsqueeze(-1)).squeeze(-1)
        return logp * mask[:, -width:]

    def _advance_reference(self, tokens: torch.Tensor) -> None:
        # The new token takes cache slot P + steps - 1. Rows active at this step wrote it at that
        # slot of the observation (mask 1); rows that had ended never write there (mask 0, they
        # feed pad), so the observation's mask is exactly the cache's attention mask.
        attn = self.mask[:, self.start : self.P + self.steps].contiguous()
        position_ids = (
            attn.sum(-1, keepdim=True) - 1
        )  # >= 1: every row holds a prompt token and one more
        out = self.model(
            input_ids=tokens.unsqueeze(1),
            attention_mask=attn,
            position_ids=position_ids,
            use_cache=True,
            **cache_kwargs(self.model, self.cache),
        )
        self.cache = output_cache(out)
        self.ref_logp_next = self._ref_logp(out.logits[:, -1])

    def observation(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids.clone(), "attention_mask": self.mask.clone()}

    def decode(self, ids: list[int]) -> str:
        """One sequence of token ids as text, special tokens dropped."""
        # transformers types decode's result str | list[str] (a batch of sequences gives a list)
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))

    def text(self, row: int) -> str:
        n = int(self.resp_len[row])
        return self.prompts[row] + self.decode(self.ids[row, self.P : self.P + n].tolist())


REFERENCE_PASSES = ("per_step", "at_end")


def check_temperature(value: float) -> float:
    if not value > 0:
        raise ValueError(f"temperature must be > 0, got {value}")
    return float(value)


def _build(
    task: str | Task,
    model: str | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    reward: str | RewardFn | None,
    device: str | torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
    batch_size: int,
    reference_pass: str,
    temperature: float,
    task_kwargs: dict[str, Any],
) -> _Generation:
    device = resolve_device(device)
    task = make_task(task, **task_kwargs)
    if reward is not None:
        task.reward = reward
    reward_fn = task.build_reward() if reward is None else get_reward(reward)
    follow_env = getattr(reward_fn, "follow_env", None)
    if callable(follow_env):  # a model-based reward: beside the reference
        follow_env(device, dtype)
    model, tokenizer = frozen_reference(model, tokenizer, device, dtype, trust_remote_code)
    return _Generation(
        task, model, tokenizer, reward_fn, batch_size, device, reference_pass, temperature
    )


def frozen_reference(
    model: str | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The reference model (loaded by name, or the object given with its tokenizer) on ``device``,
    in eval mode, without gradients or dropout."""
    if isinstance(model, str):
        frozen, loaded_tok = load_causal_lm(
            model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        tokenizer = tokenizer or loaded_tok
    elif tokenizer is None:
        raise ValueError("pass the tokenizer of the model object you give")
    else:
        frozen = model.to(device)  # type: ignore[arg-type]  # functools.wraps types .to unbound
    frozen.eval().requires_grad_(False)
    disable_dropout(frozen)  # frozen and in eval mode already; also right if someone calls train()
    return frozen, tokenizer


def _spaces(gen: _Generation) -> tuple[gym.spaces.Dict, gym.spaces.Discrete]:
    obs = gym.spaces.Dict(
        {
            "input_ids": gym.spaces.Box(0, gen.vocab_size - 1, (gen.L,), np.int64),
            "attention_mask": gym.spaces.Box(0, 1, (gen.L,), np.int64),
        }
    )
    return obs, gym.spaces.Discrete(gen.vocab_size)


class _GenerationAccess:
    """What both envs expose of their generation state; ``kl_coef`` is settable at run time."""

    _gen: _Generation
    device = property(lambda self: self._gen.device, doc="the models' device")
    task = property(lambda self: self._gen.task, doc="the Task (prompts, reward, defaults)")
    tokenizer = property(
        lambda self: self._gen.tokenizer, doc="the policy's (and reference's) tokenizer"
    )
    reference_model = property(lambda self: self._gen.model, doc="the frozen reference model")
    reward_fn = property(
        lambda self: self._gen.reward, doc="the reward: (prompts, responses) -> scores"
    )
    max_prompt_tokens = property(lambda self: self._gen.P, doc="prompt slots P of the observation")
    max_new_tokens = property(lambda self: self._gen.B, doc="response budget B")
    all_done = property(
        lambda self: self._gen.all_done, doc="every episode of the batch has ended (no sync)"
    )
    reference_pass = property(
        lambda self: "at_end" if self._gen.at_end else "per_step",
        doc="when the reference runs: per_step (KV-cached, each token) or at_end",
    )

    @property
    def temperature(self) -> float:
        """The temperature the reference scores tokens at: the policy's sampling temperature."""
        return self._gen.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._gen.temperature = check_temperature(value)

    @property
    def kl_coef(self) -> float:
        return self._gen.kl_coef

    @kl_coef.setter
    def kl_coef(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"kl_coef must be >= 0, got {value}")
        self._gen.kl_coef = float(value)


class TextGenerationEnv(_GenerationAccess, gym.Env):
    """Generate a response token by token; see :mod:`textenv.tasks` for the tasks' docs.

    Args:
        task: a task name (``"Sentiment"``, ``"RewardModel"``, ``"Arithmetic"``, ``"Toy"``) or a
            Task.
        model: the reference model: ``"embedded"``, ``"tiny"``, an HF id or path, or a model object
            (then ``tokenizer`` too). The policy must use the same tokenizer (the action space).
        reward: overrides the task's reward: a registered name, ``"module:callable"`` or a callable.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        render_mode: ``"ansi"`` returns prompt + response so far.
        reference_pass: when the reference model runs. ``"per_step"``: one KV-cached step per
            token, paying ``kl_coef · log π_ref`` at each token; ``"at_end"``: one forward per
            finished response, paying their sum with the score and reporting them in
            ``info["ref_logprobs"]`` (faster; the same return).
        temperature: the policy's sampling temperature; the reference's log-probs are those of
            its logits divided by it, so the KL is between distributions of the same family.
        torch_threads: torch's CPU threads for this process (``None``: leave them as they are);
            1 never oversubscribes a machine other processes use.
        **task_kwargs: task fields: ``max_new_tokens``, ``max_prompt_tokens``, ``kl_coef``,
            ``prompts``, and task-specific ones (``reward_model``, ``label``).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        task: str | Task = "Toy",
        model: str | PreTrainedModel = "tiny",
        tokenizer: PreTrainedTokenizerBase | None = None,
        reward: str | RewardFn | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        render_mode: str | None = None,
        trust_remote_code: bool = False,
        reference_pass: str | None = None,
        temperature: float = 1.0,
        torch_threads: int | None = None,
        **task_kwargs: Any,
    ) -> None:
        set_torch_threads(torch_threads)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        self._gen = _build(
            task,
            model,
            tokenizer,
            reward,
            device,
            dtype,
            trust_remote_code,
            1,
            reference_pass or "per_step",
            temperature,
            task_kwargs,
        )
        self.observation_space, self.action_space = _spaces(self._gen)
        self.render_mode = render_mode

    def _obs(self) -> dict[str, np.ndarray]:
        return {k: v[0].cpu().numpy() for k, v in self._gen.observation().items()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "prompt" in options:
            prompt = options["prompt"]
        else:
            prompt = self.task.prompts[int(self.np_random.integers(len(self.task.prompts)))]
        self._gen.reset([prompt])
        return self._obs(), {"prompt": self._gen.prompts[0]}

    def step(self, action):
        if self._gen.started and self._gen.all_done:
            raise RuntimeError("step() called after the episode ended; call reset() first")
        action = int(action)
        reward, terminated, _, ref_lp, end = self._gen.step(
            torch.tensor([action], device=self._gen.device)
        )
        info: dict[str, Any] = {} if self._gen.at_end else {"ref_logprob": float(ref_lp[0])}
        if end and self._gen.at_end:
            info["ref_logprobs"] = end["ref_logprobs"][0, : self._gen.resp_len[0]].cpu().numpy()
        if end:
            info |= {
                "score": end["scores"][0],
                "response_text": end["texts"][0],
                "truncated_response": action
                != self._gen.eos_id,  # ended without EOS: at the budget
                "response_length": int(self._gen.resp_len[0]),
            }
        return self._obs(), float(reward[0]), bool(terminated[0]), False, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self._gen.text(0)
        return None


class TextGenerationVectorEnv(_GenerationAccess, gym.vector.VectorEnv):
    """``num_envs`` text-generation episodes as one batch of tensors on the models' device.

    Observations, rewards, terminations and numeric infos are torch tensors on ``device``
    (ordinary tensors: they can be modified in place and used in a loss); with
    ``arrays="numpy"`` they are numpy arrays instead, as Gymnasium's numpy vector wrappers
    (``RecordEpisodeStatistics``, ``NormalizeReward``, ``ClipReward``, ``DictInfoToList``) expect;
    one three-flag host sync per step decides whether any episode ended (then only those
    rows' tokens are copied to decode and score them). Autoreset is DISABLED: rows that have
    ended ignore their actions and pay 0 until ``reset()``, which starts a new batch; the
    usual loop is "reset, step until every row has ended". ``reset(seed=s)`` seeds row ``i``
    with ``s + i``, so row ``i`` replays a single env reset with seed ``s + i`` exactly.

    Infos: ``ref_logprob`` ``[N]`` every step; when rows end, ``score``, ``truncated_response``,
    ``response_length`` and ``response_text`` (an object array, None elsewhere) with Gymnasium's
    ``_<key>`` masks. ``kl_coef`` and ``temperature`` are settable (``envs.kl_coef = 0.1`` or
    ``set_attr``).

    Reset options: ``prompts`` (one per row), ``prompt`` (the same for every row), or
    ``group_size=k``: rows ``g*k .. g*k+k-1`` share one prompt, drawn by the group's first row
    (for GRPO/RLOO-style group baselines; ``num_envs`` must be a multiple of ``k``).

    ``reference_pass="at_end"`` (both envs) trades the per-token timing of the KL term for speed:
    the reference model reads each response once, in one forward when it ends, instead of one
    KV-cached step per token; the episode's last reward is then
    ``score + kl_coef · Σ_t log π_ref(a_t | s_t)`` (the same return), earlier rewards are 0,
    and the per-token values come in ``info["ref_logprobs"]`` (``[N, B]``, 0 past each end)
    instead of ``ref_logprob``. An agent that shapes its own per-token rewards from them (as
    ``textenv.agents.text`` does) gets exactly the per-step rewards back.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4, "autoreset_mode": AutoresetMode.DISABLED}

    def __init__(
        self,
        num_envs: int = 8,
        task: str | Task = "Toy",
        model: str | PreTrainedModel = "tiny",
        tokenizer: PreTrainedTokenizerBase | None = None,
        reward: str | RewardFn | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        render_mode: str | None = None,
        trust_remote_code: bool = False,
        reference_pass: str | None = None,
        temperature: float = 1.0,
        torch_threads: int | None = None,
        arrays: str = "torch",
        **task_kwargs: Any,
    ) -> None:
        set_torch_threads(torch_threads)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if arrays not in ("torch", "numpy"):
            raise ValueError(f"arrays must be 'torch' or 'numpy', got {arrays!r}")
        self.arrays = arrays
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        self._gen = _build(
            task,
            model,
            tokenizer,
            reward,
            device,
            dtype,
            trust_remote_code,
            num_envs,
            reference_pass or "per_step",
            temperature,
            task_kwargs,
        )
        self.num_envs = num_envs
        self.single_observation_space, self.single_action_space = _spaces(self._gen)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.spaces.MultiDiscrete(np.full(num_envs, self._gen.vocab_size))
        self.render_mode = render_mode
        self._rngs = [seeding.np_random(None)[0] for _ in range(num_envs)]

    def set_attr(self, name: str, values: Any) -> None:
        """Gymnasium's vector API; ``kl_coef`` and ``temperature`` are one value for the whole
        batch."""
        if name not in ("kl_coef", "temperature"):
            raise AttributeError(f"{type(self).__name__} has no settable attribute {name!r}")
        values = list(values) if isinstance(values, (list, tuple, np.ndarray)) else [values]
        if len(set(values)) != 1:
            raise ValueError(f"{name} must be the same for every sub-env")
        setattr(self, name, values[0])

    def get_attr(self, name: str) -> tuple:
        return (getattr(self, name),) * self.num_envs

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        options = options or {}
        rows = self._reset_rows(options.get("reset_mask"))
        partial = len(rows) < self.num_envs
        if seed is not None:
            seeds = row_seeds(seed, self.num_envs)
            for i in rows:
                self._rngs[i] = seeding.np_random(seeds[i])[0]
        group = int(options.get("group_size", 1))
        if group < 1 or self.num_envs % group:
            raise ValueError(
                "options['group_size'] must be >= 1 and divide "
                f"num_envs={self.num_envs}, got {group}"
            )
        if group > 1 and ("prompts" in options or "prompt" in options or partial):
            raise ValueError(
                "options['group_size'] groups the prompts of a full reset; it cannot be combined "
                "with 'prompts', 'prompt' or 'reset_mask'"
            )
        if "prompts" in options:
            prompts = list(options["prompts"])
            if len(prompts) != self.num_envs:
                raise ValueError(
                    f"options['prompts'] needs {self.num_envs} prompts, got {len(prompts)}"
                )
        elif "prompt" in options:
            prompts = [options["prompt"]] * self.num_envs
        else:  # only the rows being reset draw (and advance their generators)
            n = len(self.task.prompts)
            drawn = {i: self.task.prompts[int(self._rngs[i].integers(n))] for i in rows[::group]}
            prompts = [drawn.get(i - i % group) for i in range(self.num_envs)]
        if partial:
            self._gen.reset_rows(rows, [prompts[i] for i in rows])
        else:
            self._gen.reset(prompts)
        return self._out(self._gen.observation()), {
            "prompt": np.array(self._gen.prompts, dtype=object)
        }

    def step(self, actions):
        gen = self._gen
        if gen.started and gen.all_done:
            raise RuntimeError(
                "step() called after every episode in the batch ended; call reset() first"
            )
        actions = torch.as_tensor(actions, device=gen.device).long().reshape(-1)
        reward, terminated, ended_now, ref_lp, end = gen.step(actions)
        info: dict[str, Any] = {} if gen.at_end else {"ref_logprob": ref_lp}
        if end and gen.at_end:
            ref_lps = torch.zeros((self.num_envs, gen.B), device=gen.device)
            ref_lps[end["rows"], : end["ref_logprobs"].shape[1]] = end["ref_logprobs"]
            info |= {"ref_logprobs": ref_lps, "_ref_logprobs": ended_now}
        if end:
            texts = np.full(self.num_envs, None, dtype=object)
            texts[end["rows"]] = end["texts"]
            info |= {
                "score": end["batch_scores"],
                "_score": ended_now,
                "truncated_response": ended_now
                & (actions != gen.eos_id),  # ended without EOS: at the budget
                "_truncated_response": ended_now,
                "response_length": torch.where(
                    ended_now, gen.resp_len, torch.zeros_like(gen.resp_len)
                ),
                "_response_length": ended_now,
                "response_text": texts,
                "_response_text": ended_now.cpu().numpy(),
            }
        truncated = torch.zeros_like(terminated)
        return self._out((gen.observation(), reward, terminated, truncated, info))

    def _reset_rows(self, reset_mask: Any) -> list[int]:
        return selected_rows(reset_mask, self.num_envs)

    def _out(self, x: Any) -> Any:
        return as_arrays(x, self.arrays)

    def render(self) -> list[str] | None:  # type: ignore[override]  # ansi texts, not frames
        if self.render_mode == "ansi":
            return [self._gen.text(i) for i in range(self.num_envs)]
        return None

    def close_extras(self, **kwargs: Any) -> None:
        if hasattr(self, "_gen"):  # absent when the constructor raised; __del__ still closes
            self._gen.cache = None
