"""Multi-turn episodes: a conversation between the agent and the env, token by token.

The agent's tokens are the actions, one per step, as in :class:`textenv.env.TextGenerationEnv`.
Its turn ends at EOS, at one of the task's stop strings, or at the turn budget; the env then
asks the episode for its reply (a game move, a tool result, a simulated user) and appends the
reply's tokens to the context. Those tokens are observations, never actions:
``observation["agent_mask"]`` is 1 on the agent's tokens only. The step that ends a turn
returns the observation after the reply, so every step is one agent token.

Writing a turn-based env is one function ``(history) -> (reply, reward, done)`` (see
:class:`FunctionTask`), or, for episodes with their own state (a game), a
:class:`MultiTurnTask` whose ``new_episode(rng)`` returns an object with a ``prompt`` and a
``respond(history)`` method. ``history`` is the conversation as chat messages
(``{"role", "content"}``), the agent's last turn included.

Rewards: the turn's reward is paid at the token that ended the turn. The reference model
reads the whole conversation once, when the episode ends (``reference_pass="at_end"``), and
scores the agent's tokens only; the last step also pays ``kl_coef · Σ log π_ref`` over them,
reported per agent token in ``info["ref_logprobs"]`` (agent tokens in order, 0 after), so
:func:`textenv.kl.kl_penalized_rewards` gives the KL-shaped reward over agent tokens.

The context budget (``max_context_tokens`` after the prompt, agent and env tokens together)
ends the episode when the agent fills it or a reply does not fit: a terminal state of the
task, flagged ``info["context_exhausted"]``.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.arrays import as_arrays, row_seeds, selected_rows
from textenv.device import resolve_device, set_torch_threads
from textenv.env import _Generation, _GenerationAccess, check_temperature, frozen_reference
from textenv.rewards import RewardError

Messages = list[dict[str, str]]


class Turn(NamedTuple):
    """What the env says after the agent's turn."""

    reply: str | None
    """text appended to the context as the env's message (None or "": nothing, only when done)"""
    reward: float = 0.0
    """paid at the agent's last token of the turn"""
    done: bool = False
    """the episode ends after this turn"""


class Episode(Protocol):
    """One conversation: its opening prompt and the env's side of it."""

    @property
    def prompt(self) -> str | Messages: ...  # read-only: an episode may narrow it to str

    def respond(self, history: Messages) -> Turn | tuple[str | None, float, bool]: ...


@dataclass
class MultiTurnTask:
    """Base of the multi-turn tasks: budgets, stop strings, reply format, and ``new_episode``."""

    name: ClassVar[str] = "MultiTurn"
    max_prompt_tokens: int = 128
    max_context_tokens: int = 128
    """tokens after the prompt, the agent's and the env's together"""
    max_turn_tokens: int = 24
    """the agent's tokens per turn; a turn that reaches it ends there and the env replies"""
    max_turns: int = 4
    """agent turns per episode; the episode ends after the last one's reply"""
    stop: list[str] = field(default_factory=list)
    """strings that end the agent's turn (besides EOS), e.g. the end of a tool call"""
    kl_coef: float = 0.02
    chat_fallback: ClassVar[bool] = False
    """never needed: without a chat template the conversation is rendered as plain text"""
    reply_role: str = "user"
    """the chat role of the env's replies ("user", or "tool" for templates that have it)"""
    reply_format: str = "\n{reply}\n"
    """how a reply is written when the conversation is plain text (no chat template)"""
    chat: bool = True
    """render the conversation with the tokenizer's chat template when it has one (off: plain
    text)"""
    split: Literal["all", "train", "test"] = "all"
    """which episodes: all, the training ones, or the held-out ones (see each task)"""

    @property
    def max_new_tokens(self) -> int:  # the generation core's name for the budget after the prompt
        return self.max_context_tokens

    @property
    def has_held_out(self) -> bool:
        """Whether the task has a held-out part (``split="test"``) to evaluate on."""
        return False

    def new_episode(self, rng: np.random.Generator) -> Episode:
        raise NotImplementedError

    def validate(self) -> None:
        for name in ("max_prompt_tokens", "max_context_tokens", "max_turn_tokens", "max_turns"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"task {self.name}: {name} must be >= 1, got {getattr(self, name)}"
                )
        if self.kl_coef < 0:
            raise ValueError(f"task {self.name}: kl_coef must be >= 0, got {self.kl_coef}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(
                f"task {self.name}: stop strings must be non-empty strings, got {self.stop!r}"
            )
        if "{reply}" not in self.reply_format:
            raise ValueError(
                f"task {self.name}: reply_format must contain '{{reply}}', "
                f"got {self.reply_format!r}"
            )


def as_messages(prompt: str | Messages) -> Messages:
    return (
        [{"role": "user", "content": prompt}]
        if isinstance(prompt, str)
        else [dict(m) for m in prompt]
    )


def check_turn(result: Any, task: str, row: int) -> Turn:
    """``respond``'s result as a :class:`Turn`, or a RewardError naming what is wrong."""
    try:
        reply, reward, done = result
    except (TypeError, ValueError):
        raise RewardError(
            f"task {task}: respond() must return (reply, reward, done), got {result!r} (row {row})"
        ) from None
    if reply is not None and not isinstance(reply, str):
        raise RewardError(
            f"task {task}: the reply must be a string or None, "
            f"got {type(reply).__name__} (row {row})"
        )
    if isinstance(reward, (str, bytes, bool)):
        raise RewardError(f"task {task}: the reward must be a number, got {reward!r} (row {row})")
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise RewardError(
            f"task {task}: the reward must be a number, got {reward!r} (row {row})"
        ) from None
    if not math.isfinite(reward):
        raise RewardError(f"task {task}: respond() returned reward {reward} (row {row})")
    return Turn(reply or None, reward, bool(done))


class _Conversation(_Generation):
    """The batched conversations. Row layout as the single-turn core: the prompt left-padded
    into ``[0, P)``, the conversation (agent and env tokens) from ``P``; ``agent`` marks the
    agent's tokens. Per-row bookkeeping is host-side: replies are Python anyway."""

    task: MultiTurnTask

    def __init__(
        self,
        task: MultiTurnTask,
        model,
        tokenizer,
        batch_size: int,
        device: torch.device,
        temperature: float,
    ) -> None:
        super().__init__(task, model, tokenizer, None, batch_size, device, "at_end", temperature)
        self.agent = torch.zeros((batch_size, self.L), dtype=torch.bool, device=device)
        self.eos_text = tokenizer.convert_ids_to_tokens(self.eos_id)
        self.use_chat = bool(task.chat and getattr(tokenizer, "chat_template", None))
        n = batch_size
        self.length = np.zeros(
            n, dtype=np.int64
        )  # tokens after the prompt, the agent's and the env's
        self.n_actions = np.zeros(n, dtype=np.int64)  # the agent's tokens
        self.turns = np.zeros(n, dtype=np.int64)  # the agent's finished turns
        self.turn_tokens: list[list[int]] = [[] for _ in range(n)]  # the agent's current turn
        self.score_host = np.zeros(n)  # the sum of the turn rewards
        self.done_host = np.ones(n, dtype=bool)
        self.histories: list[Messages] = [[] for _ in range(n)]
        self.end_reason: list[str | None] = [None] * n
        self.episodes: list[Episode | None] = [None] * n

    def _zero_rows(self, rows: list[int]) -> None:
        for r in rows:
            self.length[r] = self.n_actions[r] = self.turns[r] = 0
            self.turn_tokens[r] = []
            self.score_host[r] = 0.0
            self.done_host[r] = False
            self.end_reason[r] = None

    def begin(self, rows: list[int], episodes: list[Episode]) -> None:
        """Begin ``episodes`` in ``rows`` (every row on the first call)."""
        prompts: list[str | Messages] = []
        for r, ep in zip(rows, episodes, strict=True):
            msgs = as_messages(ep.prompt)
            self.episodes[r], self.histories[r] = ep, msgs
            if self.use_chat:
                prompts.append(msgs)
            else:  # plain text: replies follow reply_format
                prompts.append(
                    ep.prompt
                    if isinstance(ep.prompt, str)
                    else "\n\n".join(m["content"] for m in msgs) + "\n"
                )
        if len(rows) == self.batch_size:
            self.reset(prompts)
            self.agent.zero_()
            self._zero_rows(rows)
        else:
            self.reset_rows(rows, prompts)
            self.agent[torch.tensor(rows, device=self.device)] = False
            self._zero_rows(rows)

    def reply_tokens(self, row: int, reply: str, closed: bool) -> list[int]:
        """The tokens of the env's reply: with a chat template, what the template writes after the
        agent's message (closing it when the agent did not, with ``closed=False``) up to the next
        assistant header; else ``reply_format``."""
        if self.use_chat:
            hist = self.histories[row]
            # tokenize=False: both are the rendered text
            prev = cast(str, self.tokenizer.apply_chat_template(hist, tokenize=False))
            full = cast(
                str,
                self.tokenizer.apply_chat_template(
                    hist + [{"role": self.task.reply_role, "content": reply}],
                    tokenize=False,
                    add_generation_prompt=True,
                ),
            )
            cut = prev.rfind(
                self.eos_text
            )  # where the agent's message ends; at 0 it is a BOS, not an end
            if cut > 0 and full.startswith(prev[: cut + len(self.eos_text)]):
                text = full[cut + (len(self.eos_text) if closed else 0) :]
                return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(self.task.reply_format.format(reply=reply), add_special_tokens=False)[
            "input_ids"
        ]

    @torch.no_grad()
    def step(self, actions: torch.Tensor):
        """Advance each active row by its action; returns ``(reward, ended_now, turn_reward,
        turn_ended, end_info)``, tensors ``[N]``."""
        if not self.started:
            raise RuntimeError("step() called before reset()")
        if actions.shape != (self.batch_size,):
            raise ValueError(
                f"expected {self.batch_size} actions, got shape {tuple(actions.shape)}"
            )
        acts = actions.tolist()  # the step's one host sync: replies are decided on the host
        active = np.flatnonzero(~self.done_host).tolist()
        for r in active:
            if not 0 <= acts[r] < self.vocab_size:
                raise ValueError(
                    f"action {acts[r]} (row {r}) is outside Discrete({self.vocab_size})"
                )
        rows_t = torch.tensor(active, device=self.device, dtype=torch.long)
        cols_t = torch.tensor(
            [self.P + int(self.length[r]) for r in active], device=self.device, dtype=torch.long
        )
        self.ids[rows_t, cols_t] = actions.to(self.device).long()[rows_t]
        self.mask[rows_t, cols_t] = 1
        self.agent[rows_t, cols_t] = True
        turn_reward = np.zeros(self.batch_size)
        turn_ended = np.zeros(self.batch_size, dtype=bool)
        ended: list[int] = []
        stop = self.task.stop
        for r in active:
            a = acts[r]
            self.length[r] += 1
            self.n_actions[r] += 1
            self.turn_tokens[r].append(a)
            eos = a == self.eos_id
            text = None
            at_stop = False
            if stop and not eos:
                text = self.tokenizer.decode(self.turn_tokens[r], skip_special_tokens=True)
                at_stop = any(s in text for s in stop)
            full = self.length[r] >= self.B
            normal_end = eos or at_stop or len(self.turn_tokens[r]) >= self.task.max_turn_tokens
            if not (normal_end or full):
                continue
            turn_ended[r] = True
            if text is None:
                text = self.tokenizer.decode(self.turn_tokens[r], skip_special_tokens=True)
            self.turn_tokens[r] = []
            self.turns[r] += 1
            self.histories[r].append({"role": "assistant", "content": text})
            if not normal_end:  # cut off by the context mid-turn: the game cannot go on
                self.end_reason[r] = "context"
                ended.append(r)
                continue
            try:
                result = self.episodes[r].respond([dict(m) for m in self.histories[r]])
            except RewardError:
                raise
            except Exception as err:  # the user's code: report it with the task's name
                raise RewardError(
                    f"task {self.task.name}: respond() raised {type(err).__name__}: {err} (row {r})"
                ) from err
            turn = check_turn(result, self.task.name, r)
            turn_reward[r] = turn.reward
            self.score_host[r] += turn.reward
            if turn.done or self.turns[r] >= self.task.max_turns:
                self.end_reason[r] = "done" if turn.done else "turn_limit"
                ended.append(r)
                continue
            toks = self.reply_tokens(r, turn.reply or "", closed=eos) if turn.reply else []
            if (
                self.length[r] + len(toks) + 1 > self.B
            ):  # the reply and one more agent token must fit
                self.end_reason[r] = "context"
                ended.append(r)
                continue
            if toks:
                start = self.P + int(self.length[r])
                self.ids[r, start : start + len(toks)] = torch.tensor(toks, device=self.device)
                self.mask[r, start : start + len(toks)] = 1
                self.length[r] += len(toks)
                self.histories[r].append({"role": self.task.reply_role, "content": turn.reply})
        for r in ended:
            self.done_host[r] = True
        self.all_done = bool(self.done_host.all())
        ended_now = np.zeros(self.batch_size, dtype=bool)
        ended_now[ended] = True
        reward = torch.as_tensor(turn_reward, dtype=torch.float32, device=self.device)
        end_info: dict[str, Any] = {}
        if ended:
            idx = torch.tensor(ended, device=self.device)
            ref_lps = self._agent_ref_logprobs(ended)
            reward = reward.index_add(0, idx, self.kl_coef * ref_lps.sum(1))
            texts = [self.conversation_text(r) for r in ended]
            end_info = {"rows": ended, "ref_logprobs": ref_lps, "texts": texts}
        as_t = lambda x: torch.as_tensor(x, device=self.device)  # noqa: E731
        return reward, as_t(ended_now), reward.new_tensor(turn_reward), as_t(turn_ended), end_info

    def _agent_ref_logprobs(self, rows: list[int]) -> torch.Tensor:
        """``log π_ref`` of the agent's tokens of ``rows`` in order (``[k, B]``, 0 after), from one
        forward over each whole conversation: the reference sees the env's tokens too."""
        width = int(self.length[rows].max())
        idx = torch.tensor(rows, device=self.device)
        ids = self.ids[idx, self.start : self.P + width]
        mask = self.mask[idx, self.start : self.P + width]
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=width + 1
        ).logits[:, :width]
        logp = self._ref_logp(logits).gather(-1, ids[:, -width:].unsqueeze(-1)).squeeze(-1)
        agent = self.agent[idx, self.P : self.P + width]
        out = torch.zeros((len(rows), self.B), device=self.device)
        for j in range(len(rows)):
            sel = logp[j][agent[j]]
            out[j, : sel.numel()] = sel
        return out

    def conversation_text(self, row: int) -> str:
        """The conversation after the prompt as text (special tokens dropped)."""
        n = int(self.length[row])
        return self.decode(self.ids[row, self.P : self.P + n].tolist())

    def text(self, row: int) -> str:
        return self.prompts[row] + self.conversation_text(row)

    def observation(self) -> dict[str, torch.Tensor]:
        return super().observation() | {"agent_mask": self.agent.long()}


def _build(
    task,
    model,
    tokenizer,
    device,
    dtype,
    trust_remote_code,
    batch_size,
    temperature,
    reference_pass,
    task_kwargs,
) -> _Conversation:
    if reference_pass not in (None, "at_end"):
        raise ValueError(
            "multi-turn envs run the reference once per finished conversation: reference_pass "
            f"must be 'at_end', got {reference_pass!r}"
        )
    device = resolve_device(device)
    task = make_multiturn_task(task, **task_kwargs)
    model, tokenizer = frozen_reference(model, tokenizer, device, dtype, trust_remote_code)
    return _Conversation(task, model, tokenizer, batch_size, device, check_temperature(temperature))


def _spaces(gen: _Conversation) -> tuple[gym.spaces.Dict, gym.spaces.Discrete]:
    box = lambda high: gym.spaces.Box(0, high, (gen.L,), np.int64)  # noqa: E731
    obs = gym.spaces.Dict(
        {"input_ids": box(gen.vocab_size - 1), "attention_mask": box(1), "agent_mask": box(1)}
    )
    return obs, gym.spaces.Discrete(gen.vocab_size)


def _episode(task: MultiTurnTask, rng: np.random.Generator) -> tuple[Episode, int]:
    """An episode of ``task`` from a seed drawn with ``rng`` (rows of a group share the seed)."""
    seed = int(rng.integers(2**31 - 1))
    return task.new_episode(np.random.default_rng(seed)), seed


class _ConversationAccess(_GenerationAccess):
    """The single-turn envs' attributes (``kl_coef`` and ``temperature`` settable), plus the
    conversation's lengths."""

    _gen: _Conversation
    multi_turn = True  # max_new_tokens (B, inherited) is the context budget after the prompt

    @property
    def conversation_lengths(self) -> np.ndarray:
        """Tokens after the prompt per row (host-side: reading it costs no device sync)."""
        return self._gen.length.copy()


class MultiTurnTextEnv(_ConversationAccess, gym.Env):
    """A conversation with the env, one agent token per step (see the module's docs).

    Args: as :class:`textenv.env.TextGenerationEnv`; ``task`` is a multi-turn task name
    (``"Calculator"``, ``"GuessTheNumber"``, ``"TextArena"``, ``"FunctionTask"``) or a
    :class:`MultiTurnTask`. ``reset(options={"episode": ep})`` plays a given episode.

    Info: every step ``turn_reward`` and ``turn_ended``; at the end ``score`` (the sum of the
    turn rewards), ``ref_logprobs`` (the agent's tokens), ``context_exhausted``, ``turns``,
    ``end_reason`` (``"done"``, ``"turn_limit"`` or ``"context"``) and ``response_text``.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        task: str | MultiTurnTask = "Calculator",
        model: str | PreTrainedModel = "tiny",
        tokenizer: PreTrainedTokenizerBase | None = None,
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
            device,
            dtype,
            trust_remote_code,
            1,
            temperature,
            reference_pass,
            task_kwargs,
        )
        self.observation_space, self.action_space = _spaces(self._gen)
        self.render_mode = render_mode

    def _obs(self) -> dict[str, np.ndarray]:
        return {k: v[0].cpu().numpy() for k, v in self._gen.observation().items()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        episode, ep_seed = (
            (options["episode"], None)
            if "episode" in options
            else _episode(self.task, self.np_random)
        )
        self._gen.begin([0], [episode])
        return self._obs(), {"prompt": self._gen.prompts[0], "episode_seed": ep_seed}

    def step(self, action):
        gen = self._gen
        if gen.started and gen.all_done:
            raise RuntimeError("step() called after the episode ended; call reset() first")
        reward, ended, turn_reward, turn_ended, end = gen.step(
            torch.tensor([int(action)], device=gen.device)
        )
        info: dict[str, Any] = {
            "turn_reward": float(turn_reward[0]),
            "turn_ended": bool(turn_ended[0]),
        }
        if end:
            info |= {
                "score": float(gen.score_host[0]),
                "ref_logprobs": end["ref_logprobs"][0, : gen.n_actions[0]].cpu().numpy(),
                "context_exhausted": gen.end_reason[0] == "context",
                "turns": int(gen.turns[0]),
                "end_reason": gen.end_reason[0],
                "response_text": end["texts"][0],
                "response_length": int(gen.n_actions[0]),
            }
        return self._obs(), float(reward[0]), bool(ended[0]), False, info

    def render(self) -> str | None:
        return self._gen.text(0) if self.render_mode == "ansi" else None


class MultiTurnTextVectorEnv(_ConversationAccess, gym.vector.VectorEnv):
    """``num_envs`` conversations as one batch on the models' device; row ``i`` of
    ``reset(seed=s)`` replays :class:`MultiTurnTextEnv` reset with seed ``s + i`` token for token.

    Autoreset is DISABLED: rows that have ended ignore their actions until ``reset()``; partial
    resets with ``options={"reset_mask": [...]}`` start new episodes in the selected rows only.
    ``options={"group_size": k}``: rows ``g*k .. g*k+k-1`` play the same episode (same seed).
    ``arrays="numpy"`` returns numpy arrays, as Gymnasium's numpy vector wrappers expect.
    Infos as the single env's, as ``[N]`` arrays with Gymnasium's ``_<key>`` masks.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4, "autoreset_mode": AutoresetMode.DISABLED}

    def __init__(
        self,
        num_envs: int = 8,
        task: str | MultiTurnTask = "Calculator",
        model: str | PreTrainedModel = "tiny",
        tokenizer: PreTrainedTokenizerBase | None = None,
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
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        self.arrays = arrays
        self._gen = _build(
            task,
            model,
            tokenizer,
            device,
            dtype,
            trust_remote_code,
            num_envs,
            temperature,
            reference_pass,
            task_kwargs,
        )
        self.num_envs = num_envs
        self.single_observation_space, self.single_action_space = _spaces(self._gen)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.spaces.MultiDiscrete(np.full(num_envs, self._gen.vocab_size))
        self.render_mode = render_mode
        self._rngs = [seeding.np_random(None)[0] for _ in range(num_envs)]

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        options = options or {}
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
        if group > 1 and ("episodes" in options or len(rows) < self.num_envs):
            raise ValueError(
                "options['group_size'] groups the episodes of a full reset; it cannot be combined "
                "with 'episodes' or 'reset_mask'"
            )
        if "episodes" in options:
            episodes = list(options["episodes"])
            if len(episodes) != self.num_envs:
                raise ValueError(
                    f"options['episodes'] needs {self.num_envs} episodes, got {len(episodes)}"
                )
            seeds_used: list[int | None] = [None] * self.num_envs
            episodes = [episodes[i] for i in rows]
        else:  # only the rows being reset draw; a group's rows share its first row's seed
            drawn = {i: int(self._rngs[i].integers(2**31 - 1)) for i in rows[::group]}
            seeds_used = [drawn.get(i - i % group) for i in range(self.num_envs)]
            episodes = [self.task.new_episode(np.random.default_rng(seeds_used[i])) for i in rows]
        self._gen.begin(rows, episodes)
        info = {
            "prompt": np.array(self._gen.prompts, dtype=object),
            "episode_seed": np.array(seeds_used, dtype=object),
        }
        return self._out(self._gen.observation()), info

    def step(self, actions):
        gen = self._gen
        if gen.started and gen.all_done:
            raise RuntimeError(
                "step() called after every episode in the batch ended; call reset() first"
            )
        actions = torch.as_tensor(actions, device=gen.device).long().reshape(-1)
        reward, ended, turn_reward, turn_ended, end = gen.step(actions)
        info: dict[str, Any] = {"turn_reward": turn_reward, "_turn_reward": turn_ended.clone()}
        if end:
            n = self.num_envs
            ref_lps = torch.zeros((n, gen.B), device=gen.device)
            ref_lps[end["rows"]] = end["ref_logprobs"]
            texts = np.full(n, None, dtype=object)
            texts[end["rows"]] = end["texts"]
            reasons = np.full(n, None, dtype=object)
            reasons[end["rows"]] = [gen.end_reason[r] for r in end["rows"]]
            exhausted = (
                torch.as_tensor(
                    [gen.end_reason[r] == "context" for r in range(n)], device=gen.device
                )
                & ended
            )
            zero = torch.zeros(n, dtype=torch.long, device=gen.device)
            info |= {
                "score": torch.where(
                    ended,
                    torch.as_tensor(gen.score_host, dtype=torch.float32, device=gen.device),
                    float("nan"),
                ),
                "_score": ended,
                "ref_logprobs": ref_lps,
                "_ref_logprobs": ended,
                "context_exhausted": exhausted,
                "_context_exhausted": ended,
                "truncated_response": exhausted,
                "_truncated_response": ended,
                "turns": torch.where(ended, torch.as_tensor(gen.turns, device=gen.device), zero),
                "_turns": ended,
                "response_length": torch.where(
                    ended, torch.as_tensor(gen.n_actions, device=gen.device), zero
                ),
                "_response_length": ended,
                "response_text": texts,
                "_response_text": ended.cpu().numpy(),
                "end_reason": reasons,
                "_end_reason": ended.cpu().numpy(),
            }
        truncated = torch.zeros_like(ended)
        return self._out((gen.observation(), reward, ended.clone(), truncated, info))

    def _out(self, x: Any) -> Any:
        return as_arrays(x, self.arrays)

    def render(self) -> list[str] | None:  # type: ignore[override]  # ansi texts, not frames
        return (
            [self._gen.text(i) for i in range(self.num_envs)]
            if self.render_mode == "ansi"
            else None
        )

    def close_extras(self, **kwargs: Any) -> None:
        if hasattr(self, "_gen"):
            self._gen.episodes = [None] * self.num_envs


# -- tasks -----------------------------------------------------------------------------------


@dataclass
class _FunctionEpisode:
    prompt: str | Messages
    fn: Callable[[Messages], Any]

    def respond(self, history: Messages):
        return self.fn(history)


@dataclass
class FunctionTask(MultiTurnTask):
    """Your own turn-based env in a few lines: ``respond(history) -> (reply, reward, done)``.

    ``history`` is the conversation as chat messages, the agent's last turn last; each
    episode opens with a prompt drawn from ``prompts``. For episodes with their own state (a
    game), subclass :class:`MultiTurnTask` and return an :class:`Episode` from ``new_episode``.

        def respond(history):
            said = history[-1]["content"]
            if "please" in said:
                return None, 1.0, True
            return "Say the magic word.", 0.0, False

        env = gym.make(
            "textenv/MultiTurn-v0", model="tiny", respond=respond, prompts=["Ask me nicely."]
        )
    """

    name: ClassVar[str] = "FunctionTask"
    respond: Callable[[Messages], Any] | None = None
    prompts: list[str | Messages] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        if not callable(self.respond):
            raise ValueError(
                f"task {self.name}: respond must be a callable (history) -> (reply, reward, done)"
            )
        if not self.prompts:
            raise ValueError(f"task {self.name}: prompts is empty")

    def new_episode(self, rng: np.random.Generator) -> Episode:
        assert self.respond is not None  # validate() checked it
        return _FunctionEpisode(self.prompts[int(rng.integers(len(self.prompts)))], self.respond)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def safe_arithmetic(expr: str) -> int:
    """The value of an integer expression of ``+ - *`` and parentheses (no names, no calls, no
    powers: a tool a policy can call without running its text as code)."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            value = _BINOPS[type(node.op)](ev(node.left), ev(node.right))
            if abs(value) > 10**15:
                raise ValueError("number too large")
            return value
        raise ValueError(f"unsupported expression: {ast.dump(node)[:40]}")

    if len(expr) > 100:
        raise ValueError("expression too long")
    return ev(ast.parse(expr.strip(), mode="eval"))


_CALC = re.compile(r"<calc>(.*?)</calc>", re.S)
_ANSWER = re.compile(r"<answer>\s*(-?[\d,]+)\s*</answer>", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*")

CALCULATOR_SYSTEM = (
    "You can use a calculator. Write <calc>expression</calc> and you get the result back. "
    "Then give the final answer as <answer>number</answer>.\n"
    "Example: What is 12 * 34? <calc>12 * 34</calc> -> 408. <answer>408</answer>"
)


@dataclass
class _CalculatorEpisode:
    prompt: str | Messages
    answer: int
    answer_tags: bool

    def respond(self, history: Messages) -> Turn:
        said = history[-1]["content"]
        final = _ANSWER.search(said)
        call = _CALC.search(said)
        if call is not None and (final is None or call.start() < final.start()):
            try:
                return Turn(str(safe_arithmetic(call.group(1))), 0.0, False)
            except (ValueError, SyntaxError, ZeroDivisionError):
                return Turn(
                    "error: the calculator takes integers with + - * and parentheses", 0.0, False
                )
        if final is None and not self.answer_tags:
            final = _NUMBER.search(said)
        if final is not None:
            value = final.group(1) if final.re is _ANSWER else final.group(0)
            return Turn(None, float(int(value.replace(",", "")) == self.answer), True)
        return Turn(
            "Use <calc>expression</calc>, or answer with <answer>number</answer>.", 0.0, False
        )


@dataclass
class Calculator(MultiTurnTask):
    __doc__ = """Multiply or add numbers too large to do in one's head, with a calculator tool.

    ## Description
    Each episode asks one question (``a * b`` with a 2-3-digit and a 1-2-digit number, or
    ``a + b + c`` of 3-4-digit numbers, ``size`` of them generated for ``seed``). The agent's
    turn ends at EOS or at ``</calc>``: a ``<calc>expression</calc>`` gets the result back as
    the env's reply (integers, ``+ - *``, parentheses, evaluated without ``eval``); an answer
    ends the episode with reward 1 if it is right, else 0. The answer is the number in
    ``<answer>...</answer>``, or (``answer_tags=False``, the default) the first number of a
    turn with no calculator call. A turn with neither gets a reminder. Every 5th question is
    held out (``split="test"``).

    ## Arguments
    ``gym.make("textenv/Calculator-v0", model="embedded", size=500, seed=0, max_turns=3)``

    ## Version History
    * v0: initial version.
    """
    name: ClassVar[str] = "Calculator"
    size: int = 500
    seed: int = 0
    answer_tags: bool = False
    system_prompt: str | None = CALCULATOR_SYSTEM
    stop: list[str] = field(default_factory=lambda: ["</calc>"])
    max_prompt_tokens: int = 160
    max_context_tokens: int = 64
    max_turn_tokens: int = 20
    max_turns: int = 3

    @property
    def has_held_out(self) -> bool:
        return True

    def questions(self) -> list[tuple[str, int]]:
        """The task's questions and answers, in the split's part (every 5th is held out)."""
        if self.size < 1:
            raise ValueError(f"task {self.name}: size must be >= 1, got {self.size}")
        rng = np.random.default_rng(self.seed)
        out = []
        for _ in range(self.size):
            if rng.random() < 0.5:
                a, b = int(rng.integers(12, 999)), int(rng.integers(3, 99))
                out.append((f"What is {a} * {b}?", a * b))
            else:
                a, b, c = (int(x) for x in rng.integers(100, 9999, size=3))
                out.append((f"What is {a} + {b} + {c}?", a + b + c))
        if self.split == "all":
            return out
        held = self.split == "test"
        return [q for i, q in enumerate(out) if (i % 5 == 4) == held]

    def new_episode(self, rng: np.random.Generator) -> Episode:
        if getattr(self, "_questions", None) is None:
            self._questions = self.questions()
        question, answer = self._questions[int(rng.integers(len(self._questions)))]
        prompt: str | Messages = question
        if self.system_prompt:
            prompt = [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": question},
            ]
        return _CalculatorEpisode(prompt, answer, self.answer_tags)


@dataclass
class _ArenaEpisode:
    game: Any
    prompt: str
    opponent: Callable[[str], str]
    seen: int
    seed: int

    def respond(self, history: Messages) -> Turn:
        done, _ = self.game.step(action=history[-1]["content"])
        while (
            not done and self.game.state.current_player_id != 0
        ):  # the fixed opponent plays its moves
            _, obs = self.game.get_observation()
            done, _ = self.game.step(action=self.opponent(obs))
        if done:
            rewards, _ = self.game.close()
            return Turn(None, float((rewards or {}).get(0, 0.0)), True)
        _, obs = self.game.get_observation()
        new, self.seen = obs[self.seen :], len(obs)
        # textarena echoes the agent's own move first; the agent's message is already in the
        # context, so keep only what follows it.
        cut = new.find("\n[GAME]")
        return Turn((new[cut:] if cut >= 0 else new).strip() or "(no message)", 0.0, False)


def random_legal_move(rng: np.random.Generator) -> Callable[[str], str]:
    """An opponent that plays a random move among the last ``Available Moves: '[..]', ...`` list
    of its observation (textarena's board games print one)."""

    def play(observation: str) -> str:
        lines = [line for line in observation.splitlines() if "Available Moves" in line]
        moves = re.findall(r"\[[^\]]+\]", lines[-1]) if lines else []
        if not moves:
            raise ValueError(
                "the opponent found no 'Available Moves' in its observation: "
                "pass opponent=<callable>"
            )
        return moves[int(rng.integers(len(moves)))]

    return play


@dataclass
class TextArena(MultiTurnTask):
    __doc__ = """A textarena game (``game`` is its id), the agent as player 0.

    ## Description
    The game's opening observation is the prompt; after each agent turn the game steps with
    the turn's text as the move, a two-player game's fixed opponent (``opponent``: a callable
    ``observation -> move``, default a random legal move) plays, and the game's new messages
    are the env's reply. The reward is textarena's reward for player 0 when the game ends
    (1 win, 0 draw, −1 loss or too many invalid moves, as the game defines it). Games are
    seeded from the episode's seed; ``split="test"`` plays seeds ≡ 4 (mod 5), ``"train"`` the
    rest. Needs ``pip install textarena``; games that download data (Wordle) do not work offline.

    ## Arguments
    ``gym.make("textenv/TextArena-v0", model="embedded", game="TowerOfHanoi-v0")``;
    ``textenv/GuessTheNumber-v0`` and ``textenv/TicTacToe-v0`` fix ``game``.

    ## Version History
    * v0: initial version.
    """
    name: ClassVar[str] = "TextArena"
    game: str = "GuessTheNumber-v0"
    num_players: int = 1
    opponent: Callable[[str], str] | None = None
    max_prompt_tokens: int = 256
    max_turn_tokens: int = 16
    max_turns: int = 6

    @property
    def has_held_out(self) -> bool:
        return True

    def new_episode(self, rng: np.random.Generator) -> Episode:
        try:
            import textarena
        except ImportError as e:
            raise ImportError(f"task {self.name} needs textarena: pip install textarena") from e
        seed = int(rng.integers(2**31 - 1))
        if self.split != "all":  # held-out games: seeds = 4 (mod 5)
            seed = seed - seed % 5 + (4 if self.split == "test" else int(rng.integers(4)))
        game = textarena.make(self.game)
        game.reset(num_players=self.num_players, seed=seed)
        _, obs = game.get_observation()
        opponent = self.opponent or random_legal_move(np.random.default_rng(seed + 1))
        return _ArenaEpisode(game, obs.strip(), opponent, len(obs), seed)


@dataclass
class GuessTheNumber(TextArena):
    __doc__ = (TextArena.__doc__ or "").replace(
        "A textarena game (``game`` is its id)",
        "textarena's GuessTheNumber-v0 (1 to 20, higher/lower hints)",
    )
    name: ClassVar[str] = "GuessTheNumber"
    game: str = "GuessTheNumber-v0"


@dataclass
class TicTacToe(TextArena):
    __doc__ = (TextArena.__doc__ or "").replace(
        "A textarena game (``game`` is its id)",
        "textarena's TicTacToe-v0 against a random legal opponent",
    )
    name: ClassVar[str] = "TicTacToe"
    game: str = "TicTacToe-v0"
    num_players: int = 2
    max_turns: int = 5


@dataclass
class _ToyTurnsEpisode:
    prompt: str

    def respond(self, history: Messages) -> Turn:
        said = history[-1]["content"]
        reward = said.count("a") / max(len(said), 1)
        turns = sum(m["role"] == "assistant" for m in history)
        return Turn("ok, more.", reward, False) if turns < 2 else Turn(None, reward, True)


@dataclass
class ToyTurns(MultiTurnTask):
    __doc__ = """Say the letter ``a``, twice: a two-turn task a tiny random model learns on a CPU
    in a minute.

    ## Description
    The Toy task's prompts (``model="tiny"``'s character vocabulary); after the agent's first
    turn the env replies ``ok, more.``, after the second the episode ends. Each turn's reward
    is the fraction of its characters that are ``a``, so the best return is 2.

    ## Arguments
    ``gym.make("textenv/ToyTurns-v0", model="tiny", max_turn_tokens=6)``

    ## Version History
    * v0: initial version.
    """
    name: ClassVar[str] = "ToyTurns"
    max_prompt_tokens: int = 16
    max_context_tokens: int = 32
    max_turn_tokens: int = 6
    max_turns: int = 2
    kl_coef: float = 0.0
    reply_format: str = " {reply} "  # the tiny vocabulary has no newline

    @property
    def has_held_out(self) -> bool:
        return True

    def new_episode(self, rng: np.random.Generator) -> Episode:
        from textenv.tasks import _lines, split_prompts

        prompts = split_prompts(_lines("toy_prompts.txt"), self.split)
        return _ToyTurnsEpisode(prompts[int(rng.integers(len(prompts)))])


MULTITURN_TASKS: dict[str, type[MultiTurnTask]] = {
    cls.name: cls
    for cls in (FunctionTask, Calculator, TextArena, GuessTheNumber, TicTacToe, ToyTurns)
}


def make_multiturn_task(task: str | MultiTurnTask, **overrides: Any) -> MultiTurnTask:
    if isinstance(task, MultiTurnTask):
        if overrides:
            raise ValueError("pass overrides to the MultiTurnTask you construct, not beside it")
        return task
    if task not in MULTITURN_TASKS:
        raise ValueError(f"unknown multi-turn task {task!r}; known: {', '.join(MULTITURN_TASKS)}")
    return MULTITURN_TASKS[task](**{k: v for k, v in overrides.items() if v is not None})
