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

from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.core import (
    SingleTextEnv,
    TokenBatch,
    VectorTextEnv,
    check_env_arguments,
    frozen_reference,
)
from textenv.device import resolve_device
from textenv.rewards import RewardFn, get_reward, score_batch
from textenv.tasks import Task, make_task


class _Generation(TokenBatch):
    """One response per row after its prompt, scored by the task's reward when it ends.

    ``response_length`` counts each row's response tokens and ``done`` marks the rows that have
    ended, both on the device: a step syncs three flags with the host, nothing per row. Rows
    that have ended feed padding with mask 0, so the per-step reference's cache attends exactly
    to ``mask[:, :prompt_slots + steps]``.
    """

    task: Task

    def __init__(
        self,
        task: Task,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reward: RewardFn,
        batch_size: int,
        device: torch.device,
        reference_pass: str,
        temperature: float,
        static_cache: bool = False,
    ) -> None:
        super().__init__(
            task, model, tokenizer, batch_size, device, reference_pass, temperature, static_cache
        )
        self.reward = reward
        self.response_length = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.done = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.steps = 0

    def tokens_after_prompt(self, row: int) -> int:
        return int(self.response_length[row])

    def clear_rows(self, rows: list[int] | None) -> None:
        if rows is None:
            self.response_length.zero_()
            self.done.zero_()
            self.steps = 0
        else:
            idx = torch.tensor(rows, device=self.device)
            self.response_length[idx] = 0
            self.done[idx] = False

    @torch.no_grad()  # see TokenBatch.reset
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
        a = actions.clamp(0, self.vocab_size - 1)
        ended_now = active & ((a == self.eos_id) | (self.response_length + 1 >= self.budget))
        any_ended, all_done = self._sync_flags(actions, active, ended_now)
        ref_lp = self.reference.token_logprobs(a, active)
        self._append(a, active)
        self.done |= ended_now
        reward = self.kl_coef * ref_lp
        end_info: dict[str, Any] = {}
        if any_ended:
            reward, end_info = self._finish(ended_now, reward)
        self.steps += 1
        if not all_done:
            attention = self.mask[:, self.first_column : self.prompt_slots + self.steps]
            self.reference.advance(a, active, self.pad_id, attention)
        return reward, ended_now.clone(), ended_now, ref_lp, end_info

    @torch.no_grad()
    def step_block(self, actions: torch.Tensor) -> dict[str, Any]:
        """``k`` steps at once, ``actions`` ``[N, k]``: the same state, rewards and scores as
        ``k`` calls of :meth:`step`, with one host sync for the block instead of one per step.
        Columns after a row ends are ignored; the at-end reference reads every row that ended in
        the block in one forward. Returns ``reward``, ``active`` (the row took that column's
        action), ``ended`` (it ended there), ``ref_logprob`` (``[N, k]`` each), ``end`` (as
        :meth:`step`'s) and ``steps`` (columns taken before every row had ended)."""
        if not self.started:
            raise RuntimeError("step_block() called before reset()")
        if actions.dim() != 2 or actions.shape[0] != self.batch_size:
            raise ValueError(
                f"expected actions of shape ({self.batch_size}, k), got {tuple(actions.shape)}"
            )
        k = actions.shape[1]
        a = actions.clamp(0, self.vocab_size - 1)
        # Which column each row ends at, from the same rule as step(), before any state changes.
        offsets = torch.arange(1, k + 1, device=self.device)
        ends = (a == self.eos_id) | (self.response_length.unsqueeze(1) + offsets >= self.budget)
        before = (ends.long().cumsum(1) - ends.long()) > 0  # ended at an earlier column
        active = ~self.done.unsqueeze(1) & ~before
        ended = active & ends
        bad = ((actions < 0) | (actions >= self.vocab_size)) & active
        all_done = (self.done.unsqueeze(1) | ended.cumsum(1).bool()).all(0)  # [k]
        flags = torch.cat([bad.any().view(1), ended.any().view(1), all_done]).tolist()
        if flags[0]:
            row, col = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"action {int(actions[row, col])} (row {row}, column {col}) is outside "
                f"Discrete({self.vocab_size})"
            )
        any_ended, done_after = flags[1], flags[2:]
        steps = next((t + 1 for t, d in enumerate(done_after) if d), k)
        ref_lp = torch.zeros(a.shape, device=self.device)
        for t in range(steps):
            ref_lp[:, t] = self.reference.token_logprobs(a[:, t], active[:, t])
            self._append(a[:, t], active[:, t])
            self.steps += 1
            if not done_after[t]:
                attention = self.mask[:, self.first_column : self.prompt_slots + self.steps]
                self.reference.advance(a[:, t], active[:, t], self.pad_id, attention)
        ended_row = ended.any(1)
        self.done |= ended_row
        self.all_done = bool(done_after[steps - 1])
        reward = self.kl_coef * ref_lp
        end: dict[str, Any] = {}
        if any_ended:
            at_end, end = self._finish(ended_row, torch.zeros_like(self.response_length).float())
            reward = reward + ended * at_end.unsqueeze(1)  # paid at the column each row ended
        return {
            "reward": reward[:, :steps],
            "active": active[:, :steps],
            "ended": ended[:, :steps],
            "ref_logprob": ref_lp[:, :steps],
            "end": end,
            "steps": steps,
        }

    def _sync_flags(
        self, actions: torch.Tensor, active: torch.Tensor, ended_now: torch.Tensor
    ) -> tuple[bool, bool]:
        """The one host sync of a step, three flags together: raises on an action outside the
        vocabulary; returns whether any row ended and whether all have."""
        bad = ((actions < 0) | (actions >= self.vocab_size)) & active
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
        return bool(any_ended), bool(all_done)

    def _append(self, actions: torch.Tensor, active: torch.Tensor) -> None:
        """Write each active row's action in its next response column."""
        slot = (self.prompt_slots + self.response_length).clamp_max(self.columns - 1).unsqueeze(1)
        kept_ids = self.ids.gather(1, slot).squeeze(1)
        self.ids.scatter_(1, slot, torch.where(active, actions, kept_ids).unsqueeze(1))
        kept_mask = self.mask.gather(1, slot).squeeze(1)
        self.mask.scatter_(1, slot, torch.where(active, 1, kept_mask).unsqueeze(1))
        self.response_length += active.long()

    def _finish(self, ended_now: torch.Tensor, reward: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Score the rows that ended this step (and, at the end, run the reference over them)."""
        rows = ended_now.nonzero().squeeze(1).tolist()
        lengths = self.response_length[rows].tolist()
        tokens = self.ids[rows, self.prompt_slots :].tolist()
        texts = [self.decode(t[:n]) for t, n in zip(tokens, lengths, strict=True)]
        scores = score_batch(self.reward, [self.prompts[r] for r in rows], texts)
        score_t = torch.tensor(scores, dtype=torch.float32, device=self.device)
        idx = torch.tensor(rows, device=self.device)
        reward = reward.index_add(0, idx, score_t)
        # scores as a [N] tensor too, NaN where no episode ended
        nan = torch.full((self.batch_size,), float("nan"), device=self.device)
        batch_scores = nan.index_copy(0, idx, score_t)
        end_info = {"rows": rows, "scores": scores, "batch_scores": batch_scores, "texts": texts}
        ref_lps = self.reference_logprobs(idx, max(lengths))
        if ref_lps is not None:
            reward = reward.index_add(0, idx, self.kl_coef * ref_lps.sum(1))
            end_info["ref_logprobs"] = ref_lps
        return reward, end_info


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
    static_cache: bool = False,
) -> _Generation:
    device = resolve_device(device)
    made = make_task(task, **task_kwargs)
    if not isinstance(made, Task):
        raise ValueError(
            f"task {made.name} is a multi-turn task: use textenv.multiturn.MultiTurnTextEnv "
            "or MultiTurnTextVectorEnv"
        )
    if reward is not None:
        made.reward = reward
    reward_fn = made.build_reward() if reward is None else get_reward(reward)
    follow_env = getattr(reward_fn, "follow_env", None)
    if callable(follow_env):  # a model-based reward: beside the reference
        follow_env(device, dtype)
    model, tokenizer = frozen_reference(model, tokenizer, device, dtype, trust_remote_code)
    return _Generation(
        made,
        model,
        tokenizer,
        reward_fn,
        batch_size,
        device,
        reference_pass,
        temperature,
        static_cache,
    )


class TextGenerationEnv(SingleTextEnv):
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
        static_cache: the per-step reference keeps a static KV cache (transformers'
            ``StaticCache``, fixed shapes for ``torch.compile``/CUDA graphs; prompt columns
            bucketed to multiples of 16); it scores as the dynamic cache does.
        **task_kwargs: task fields: ``max_new_tokens``, ``max_prompt_tokens``, ``kl_coef``,
            ``prompts``, and task-specific ones (``reward_model``, ``label``).
    """

    reward_fn = property(
        lambda self: self._gen.reward, doc="the reward: (prompts, responses) -> scores"
    )
    _gen: _Generation

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
        static_cache: bool = False,
        **task_kwargs: Any,
    ) -> None:
        check_env_arguments(render_mode, torch_threads)
        core = _build(
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
            static_cache,
        )
        self._attach(core, render_mode)

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
        self._check_running()
        gen = self._gen
        action = int(action)
        reward, terminated, _, ref_lp, end = gen.step(torch.tensor([action], device=gen.device))
        at_end = gen.reference.name == "at_end"
        info: dict[str, Any] = {} if at_end else {"ref_logprob": float(ref_lp[0])}
        if end and at_end:
            info["ref_logprobs"] = end["ref_logprobs"][0, : gen.response_length[0]].cpu().numpy()
        if end:
            info |= {
                "score": end["scores"][0],
                "response_text": end["texts"][0],
                "truncated_response": action != gen.eos_id,  # ended without EOS: at the budget
                "response_length": int(gen.response_length[0]),
            }
        return self._obs(), float(reward[0]), bool(terminated[0]), False, info


class TextGenerationVectorEnv(VectorTextEnv):
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

    reward_fn = property(
        lambda self: self._gen.reward, doc="the reward: (prompts, responses) -> scores"
    )
    _gen: _Generation

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
        static_cache: bool = False,
        arrays: str = "torch",
        **task_kwargs: Any,
    ) -> None:
        check_env_arguments(render_mode, torch_threads, num_envs, arrays)
        core = _build(
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
            static_cache,
        )
        self._attach(core, render_mode, arrays)

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
        rows, group = self._reset_rows(seed, options, "prompts", ["prompts", "prompt"])
        if "prompts" in options:
            prompts = list(options["prompts"])
            if len(prompts) != self.num_envs:
                raise ValueError(
                    f"options['prompts'] needs {self.num_envs} prompts, got {len(prompts)}"
                )
        elif "prompt" in options:
            prompts = [options["prompt"]] * self.num_envs
        else:
            n = len(self.task.prompts)
            prompts = self._draw(rows, group, lambda rng: self.task.prompts[int(rng.integers(n))])
        if len(rows) < self.num_envs:
            self._gen.reset_rows(rows, [prompts[i] for i in rows])
        else:
            self._gen.reset(prompts)
        return self._out(self._gen.observation()), {
            "prompt": np.array(self._gen.prompts, dtype=object)
        }

    def step(self, actions):
        self._check_running()
        gen = self._gen
        actions = torch.as_tensor(actions, device=gen.device).long().reshape(-1)
        reward, terminated, ended_now, ref_lp, end = gen.step(actions)
        at_end = gen.reference.name == "at_end"
        info: dict[str, Any] = {} if at_end else {"ref_logprob": ref_lp}
        if end and at_end:
            ref_lps = torch.zeros((self.num_envs, gen.budget), device=gen.device)
            ref_lps[end["rows"], : end["ref_logprobs"].shape[1]] = end["ref_logprobs"]
            info |= {"ref_logprobs": ref_lps, "_ref_logprobs": ended_now}
        if end:
            info |= self._end_info(end, ended_now, actions)
        truncated = torch.zeros_like(terminated)
        return self._out((gen.observation(), reward, terminated, truncated, info))

    def step_block(self, actions):
        """Up to ``k`` steps in one call, ``actions`` ``[num_envs, k]`` (column ``t`` is what
        :meth:`step` would get at the ``t``-th call): the same final observation, rewards and
        end infos as those calls, with one host sync instead of one per token. A batched fast
        path for agents that sample a block of tokens before the env must answer (the policy's
        own KV cache does not need the env's observation in between).

        Returns ``(obs, reward, terminated, truncated, info)`` with ``[num_envs, s]`` rewards
        and flags for the ``s <= k`` columns taken before every row had ended (the rest are
        ignored); ``info["active"]`` ``[num_envs, s]`` marks the columns each row took, and
        ``ref_logprob`` is ``[num_envs, s]`` (per-step reference). End infos are those of every
        row that ended in the block, ``info["_score"]`` etc. marking them."""
        self._check_running()
        gen = self._gen
        actions = torch.as_tensor(actions, device=gen.device).long()
        out = gen.step_block(actions)
        ended_row = out["ended"].any(1)
        info: dict[str, Any] = {"active": out["active"]}
        end = out["end"]
        if gen.reference.name == "at_end":
            if end:
                ref_lps = torch.zeros((self.num_envs, gen.budget), device=gen.device)
                ref_lps[end["rows"], : end["ref_logprobs"].shape[1]] = end["ref_logprobs"]
                info |= {"ref_logprobs": ref_lps, "_ref_logprobs": ended_row}
        else:
            info["ref_logprob"] = out["ref_logprob"]
        if end:
            last = (actions[:, : out["steps"]] * out["ended"]).sum(1)  # each row's final action
            info |= self._end_info(end, ended_row, last)
        terminated = out["ended"]
        truncated = torch.zeros_like(terminated)
        return self._out((gen.observation(), out["reward"], terminated, truncated, info))

    def _end_info(
        self, end: dict[str, Any], ended_now: torch.Tensor, actions: torch.Tensor
    ) -> dict[str, Any]:
        """The infos of the rows that ended this step, with Gymnasium's ``_<key>`` masks."""
        gen = self._gen
        texts = np.full(self.num_envs, None, dtype=object)
        texts[end["rows"]] = end["texts"]
        lengths = torch.where(ended_now, gen.response_length, torch.zeros_like(gen.response_length))
        return {
            "score": end["batch_scores"],
            "_score": ended_now,
            "truncated_response": ended_now & (actions != gen.eos_id),  # ended without EOS
            "_truncated_response": ended_now,
            "response_length": lengths,
            "_response_length": ended_now,
            "response_text": texts,
            "_response_text": ended_now.cpu().numpy(),
        }

    def close_extras(self, **kwargs: Any) -> None:
        if hasattr(self, "_gen"):  # absent when the constructor raised; __del__ still closes
            self._gen.close()
