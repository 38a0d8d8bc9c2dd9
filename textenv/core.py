"""The core both text envs stand on: a batch of token sequences, and the env plumbing around it.

:class:`TokenBatch` is the batch's state as tensors on the models' device. Layout of one row
(``columns = prompt_slots + budget``): the prompt left-padded into the first ``prompt_slots``
columns, then what follows it (a response, or a conversation's agent and env tokens), then
padding; ``mask`` is 1 on real tokens. :mod:`textenv.env` (one response per episode) and
:mod:`textenv.multiturn` (a conversation per episode) subclass it; the frozen reference scores
it through a :mod:`textenv.reference` strategy.

:class:`SingleTextEnv` and :class:`VectorTextEnv` are what every text env shares around its
core: the constructor's checks, spaces, reset seeding and groups, the step guard and render.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.arrays import as_arrays, row_seeds, selected_rows
from textenv.device import set_torch_threads
from textenv.models import disable_dropout, ensure_pad_token, load_causal_lm
from textenv.reference import ReferenceScoring, check_temperature, reference_scoring

Prompt = str | list[dict[str, str]]
_T = TypeVar("_T")


class CoreTask(Protocol):
    """What the core reads of its task: a :class:`textenv.tasks.Task` or a
    :class:`textenv.tasks.MultiTurnTask`."""

    @property
    def name(self) -> str: ...
    @property
    def max_prompt_tokens(self) -> int: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def kl_coef(self) -> float: ...
    @property
    def chat_fallback(self) -> bool: ...
    def validate(self) -> None: ...


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


class TokenBatch:
    """A batch of token sequences: prompt slots, what follows, masks and observations.

    Subclasses keep their own per-row progress and say how many tokens follow each row's prompt
    (:meth:`tokens_after_prompt`) and what a reset clears (:meth:`clear_rows`).
    """

    def __init__(
        self,
        task: CoreTask,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        device: torch.device,
        reference_pass: str,
        temperature: float,
        static_cache: bool = False,
    ) -> None:
        task.validate()
        if static_cache and reference_pass != "per_step":
            raise ValueError("static_cache is for reference_pass='per_step' (a KV cache per step)")
        self.static_cache = static_cache
        self.reference: ReferenceScoring = reference_scoring(
            reference_pass, model, temperature, task.max_new_tokens if static_cache else None
        )
        self.task, self.model, self.tokenizer = task, model, tokenizer
        self.device, self.batch_size = device, batch_size
        self.pad_id = ensure_pad_token(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no EOS token; episodes could only end at the budget"
            )
        self.eos_id = int(tokenizer.eos_token_id)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.prompt_slots = task.max_prompt_tokens
        self.budget = task.max_new_tokens  # tokens after the prompt
        self.columns = self.prompt_slots + self.budget
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and self.columns > max_pos:
            # A multi-turn task's budget after the prompt is its max_context_tokens field.
            after = (
                "max_context_tokens" if hasattr(task, "max_context_tokens") else "max_new_tokens"
            )
            raise ValueError(
                f"task {task.name}: max_prompt_tokens + {after} = {self.prompt_slots} + "
                f"{self.budget} = {self.columns} exceeds the model's context of {max_pos} tokens: "
                f"lower max_prompt_tokens or {after}"
            )
        self.kl_coef = float(task.kl_coef)
        shape = (batch_size, self.columns)
        self.ids = torch.full(shape, self.pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros(shape, dtype=torch.long, device=device)
        self.started = False
        self.all_done = True  # host-side copy, refreshed by each step
        self.prompts: list[str] = [""] * batch_size
        self.first_column = 0  # columns before it are padding in every row

    @property
    def temperature(self) -> float:
        return self.reference.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.reference.temperature = check_temperature(value)

    # -- what subclasses define --------------------------------------------------------------
    def tokens_after_prompt(self, row: int) -> int:
        raise NotImplementedError

    def clear_rows(self, rows: list[int] | None) -> None:
        """Clear the per-row progress of ``rows`` (None: every row) at a reset."""
        raise NotImplementedError

    # -- reset -------------------------------------------------------------------------------
    def render_prompt(self, prompt: Prompt) -> str:
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

    def tokenize_prompts(
        self, prompts: list[str], chat: list[bool]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Left-pad (and left-truncate, keeping the end, with a warning) each prompt into the
        prompt slots; also returns the longest kept prompt's length. ``chat[i]``: prompt ``i`` is
        a rendered chat template."""
        slots = self.prompt_slots
        ids = torch.full((len(prompts), slots), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), slots), dtype=torch.long)
        width, lengths = 1, []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"prompt {i} is empty")
            # A rendered chat template already holds the model's special tokens.
            toks = self.tokenizer(prompt, add_special_tokens=not chat[i])["input_ids"]
            lengths.append(len(toks))
            toks = toks[-slots:]
            if not toks:
                raise ValueError(f"prompt {i} ({prompt[:40]!r}) tokenizes to no tokens")
            ids[i, slots - len(toks) :] = torch.tensor(toks)
            width = max(width, len(toks))
            mask[i, slots - len(toks) :] = 1
        self.warn_if_cut(lengths)
        return ids.to(self.device), mask.to(self.device), width

    def warn_if_cut(self, lengths: list[int]) -> None:
        """One warning per reset when prompts did not fit their slots (their ends are kept)."""
        cut = [n for n in lengths if n > self.prompt_slots]
        if cut:
            are = "is" if len(cut) == 1 else "are"
            warnings.warn(
                f"{len(cut)} of {len(lengths)} prompts {are} longer than max_prompt_tokens="
                f"{self.prompt_slots} (longest {max(cut)} tokens): their first tokens were cut",
                stacklevel=2,
            )

    # no_grad, not inference_mode: returned tensors must work in a user's in-place ops and losses.
    @torch.no_grad()
    def reset(self, prompts: list[Prompt]) -> None:
        """Start a new episode in every row with ``prompts``."""
        chat = [not isinstance(p, str) for p in prompts]
        rendered = [self.render_prompt(p) for p in prompts]
        prompt_ids, prompt_mask, width = self.tokenize_prompts(rendered, chat)
        self.prompts = list(rendered)
        self.ids.fill_(self.pad_id)
        self.mask.zero_()
        self.ids[:, : self.prompt_slots] = prompt_ids
        self.mask[:, : self.prompt_slots] = prompt_mask
        self.clear_rows(None)
        self.started = True
        self.all_done = False
        # Columns that are padding in every row are left out of the reference's reads; with a
        # static cache, in multiples of 16 so batches of nearby prompt lengths share its shapes.
        if self.static_cache:
            width = min(self.prompt_slots, -(-width // 16) * 16)
        self.first_column = self.prompt_slots - width
        self.reference.start(
            prompt_ids[:, self.first_column :], prompt_mask[:, self.first_column :]
        )

    @torch.no_grad()
    def reset_rows(self, rows: list[int], prompts: list[Prompt]) -> None:
        """Start new episodes in ``rows`` only; the other rows carry on where they are. Each row
        has its own length, so rows need not be at the same step; only the per-step reference's
        KV cache (one slot per step for the whole batch) cannot allow it."""
        if self.reference.name != "at_end":
            raise NotImplementedError(
                "partial resets (options['reset_mask']) need reference_pass='at_end': with "
                "'per_step' the reference's KV cache is shared by the batch, one slot per step"
            )
        if not self.started:
            raise RuntimeError("the first reset() must reset every row")
        chat = [not isinstance(p, str) for p in prompts]
        rendered = [self.render_prompt(p) for p in prompts]
        prompt_ids, prompt_mask, _ = self.tokenize_prompts(rendered, chat)
        idx = torch.tensor(rows, device=self.device)
        self.ids[idx] = self.pad_id
        self.mask[idx] = 0
        self.ids[idx, : self.prompt_slots] = prompt_ids
        self.mask[idx, : self.prompt_slots] = prompt_mask
        self.clear_rows(rows)
        for r, prompt in zip(rows, rendered, strict=True):
            self.prompts[r] = prompt
        self.all_done = False
        width = int(self.mask[:, : self.prompt_slots].sum(1).max())
        self.first_column = self.prompt_slots - width

    # -- reading the batch -------------------------------------------------------------------
    def reference_logprobs(self, idx: torch.Tensor, width: int) -> torch.Tensor | None:
        """The at-end reference's ``log π_ref`` of the first ``width`` tokens after the prompt of
        rows ``idx`` (``[k, width]``), from one forward over each whole row; None per step."""
        end = self.prompt_slots + width
        return self.reference.sequence_logprobs(
            self.ids[idx, self.first_column : end], self.mask[idx, self.first_column : end], width
        )

    def observation(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids.clone(), "attention_mask": self.mask.clone()}

    def observation_space(self) -> gym.spaces.Dict:
        """One row's observation space (the keys of :meth:`observation`)."""
        box = lambda high: gym.spaces.Box(0, high, (self.columns,), np.int64)  # noqa: E731
        return gym.spaces.Dict({"input_ids": box(self.vocab_size - 1), "attention_mask": box(1)})

    def decode(self, ids: list[int]) -> str:
        """One sequence of token ids as text, special tokens dropped."""
        # transformers types decode's result str | list[str] (a batch of sequences gives a list)
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))

    def text_after_prompt(self, row: int) -> str:
        start = self.prompt_slots
        return self.decode(self.ids[row, start : start + self.tokens_after_prompt(row)].tolist())

    def text(self, row: int) -> str:
        return self.prompts[row] + self.text_after_prompt(row)

    def close(self) -> None:
        self.reference.close()


# -- the envs' plumbing ----------------------------------------------------------------------


class CoreAccess:
    """What every text env exposes of its core; ``kl_coef`` and ``temperature`` are settable at
    run time."""

    _gen: TokenBatch
    device = property(lambda self: self._gen.device, doc="the models' device")
    task = property(lambda self: self._gen.task, doc="the Task (prompts, reward, defaults)")
    tokenizer = property(
        lambda self: self._gen.tokenizer, doc="the policy's (and reference's) tokenizer"
    )
    reference_model = property(lambda self: self._gen.model, doc="the frozen reference model")
    max_prompt_tokens = property(
        lambda self: self._gen.prompt_slots, doc="prompt slots of the observation"
    )
    max_new_tokens = property(lambda self: self._gen.budget, doc="tokens after the prompt")
    all_done = property(
        lambda self: self._gen.all_done, doc="every episode of the batch has ended (no sync)"
    )
    reference_pass = property(
        lambda self: self._gen.reference.name,
        doc="when the reference runs: per_step (KV-cached, each token) or at_end",
    )

    @property
    def temperature(self) -> float:
        """The temperature the reference scores tokens at: the policy's sampling temperature."""
        return self._gen.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._gen.temperature = value

    @property
    def kl_coef(self) -> float:
        return self._gen.kl_coef

    @kl_coef.setter
    def kl_coef(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"kl_coef must be >= 0, got {value}")
        self._gen.kl_coef = float(value)


_RENDER_MODES = ["ansi"]


def check_env_arguments(
    render_mode: str | None,
    torch_threads: int | None,
    num_envs: int | None = None,
    arrays: str | None = None,
) -> None:
    """The checks every text env's constructor makes before it loads anything (``num_envs`` and
    ``arrays``: vector envs only); sets torch's threads."""
    set_torch_threads(torch_threads)
    if num_envs is not None and num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if arrays is not None and arrays not in ("torch", "numpy"):
        raise ValueError(f"arrays must be 'torch' or 'numpy', got {arrays!r}")
    if render_mode is not None and render_mode not in _RENDER_MODES:
        raise ValueError(f"render_mode must be one of {_RENDER_MODES}, got {render_mode!r}")


class SingleTextEnv(CoreAccess, gym.Env):
    """A text env of one row: numpy observations, float rewards."""

    metadata = {"render_modes": _RENDER_MODES, "render_fps": 4}

    def _attach(self, core: TokenBatch, render_mode: str | None) -> None:
        self._gen = core
        self.observation_space = core.observation_space()
        self.action_space = gym.spaces.Discrete(core.vocab_size)
        self.render_mode = render_mode

    def _obs(self) -> dict[str, np.ndarray]:
        return {k: v[0].cpu().numpy() for k, v in self._gen.observation().items()}

    def _check_running(self) -> None:
        if self._gen.started and self._gen.all_done:
            raise RuntimeError("step() called after the episode ended; call reset() first")

    def render(self) -> str | None:
        return self._gen.text(0) if self.render_mode == "ansi" else None


class VectorTextEnv(CoreAccess, gym.vector.VectorEnv):
    """A text env of ``num_envs`` rows as one batch; autoreset is disabled. Row ``i`` has its
    own generator: ``reset(seed=s)`` seeds it with ``s + i``."""

    metadata = {
        "render_modes": _RENDER_MODES,
        "render_fps": 4,
        "autoreset_mode": AutoresetMode.DISABLED,
    }

    def _attach(self, core: TokenBatch, render_mode: str | None, arrays: str) -> None:
        self._gen = core
        self.arrays = arrays
        self.num_envs = core.batch_size
        self.single_observation_space = core.observation_space()
        self.single_action_space = gym.spaces.Discrete(core.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.spaces.MultiDiscrete(np.full(self.num_envs, core.vocab_size))
        self.render_mode = render_mode
        self._rngs = [seeding.np_random(None)[0] for _ in range(self.num_envs)]

    def _reset_rows(
        self, seed: int | list[int] | None, options: dict[str, Any], what: str, given: list[str]
    ) -> tuple[list[int], int]:
        """The rows a reset starts (reseeding their generators when ``seed`` is given) and the
        group size; ``given``: the options that name the ``what`` (prompts, episodes) outright."""
        rows = selected_rows(options.get("reset_mask"), self.num_envs)
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
        if group > 1 and (any(k in options for k in given) or len(rows) < self.num_envs):
            names = " or ".join(", ".join(f"'{k}'" for k in [*given, "reset_mask"]).rsplit(", ", 1))
            raise ValueError(
                f"options['group_size'] groups the {what} of a full reset; it cannot be combined "
                f"with {names}"
            )
        return rows, group

    def _draw(
        self, rows: list[int], group: int, draw: Callable[[np.random.Generator], _T]
    ) -> list[_T | None]:
        """One draw per row (None for rows not being reset): only the rows being reset draw (and
        advance their generators), and a group's rows share its first row's draw."""
        drawn = {i: draw(self._rngs[i]) for i in rows[::group]}
        return [drawn.get(i - i % group) for i in range(self.num_envs)]

    def _check_running(self) -> None:
        if self._gen.started and self._gen.all_done:
            raise RuntimeError(
                "step() called after every episode in the batch ended; call reset() first"
            )

    def _out(self, x: Any) -> Any:
        return as_arrays(x, self.arrays)

    def render(self) -> list[str] | None:  # type: ignore[override]  # ansi texts, not frames
        if self.render_mode == "ansi":
            return [self._gen.text(i) for i in range(self.num_envs)]
        return None
