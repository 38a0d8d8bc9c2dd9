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

from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.core import (
    CoreAccess,
    SingleTextEnv,
    TokenBatch,
    VectorTextEnv,
    check_env_arguments,
    frozen_reference,
)
from textenv.device import resolve_device
from textenv.reference import check_temperature
from textenv.rewards import RewardError
from textenv.tasks import Episode, Messages, MultiTurnTask, Turn, make_task
from textenv.tasks.conversation import as_messages, check_turn


class _Conversation(TokenBatch):
    """The batched conversations, on the core's layout: the prompt left-padded into the prompt
    slots, the conversation (agent and env tokens) after them; ``agent`` marks the agent's
    tokens. Per-row bookkeeping is host-side: replies are Python anyway."""

    task: MultiTurnTask

    def __init__(
        self,
        task: MultiTurnTask,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        device: torch.device,
        temperature: float,
    ) -> None:
        super().__init__(task, model, tokenizer, batch_size, device, "at_end", temperature)
        self.agent = torch.zeros((batch_size, self.columns), dtype=torch.bool, device=device)
        self.eos_text = cast(str, tokenizer.convert_ids_to_tokens(self.eos_id))  # one id: one token
        self.use_chat = bool(task.chat and getattr(tokenizer, "chat_template", None))
        n = batch_size
        self.length = np.zeros(n, dtype=np.int64)  # tokens after the prompt, agent's and env's
        self.n_actions = np.zeros(n, dtype=np.int64)  # the agent's tokens
        self.turns = np.zeros(n, dtype=np.int64)  # the agent's finished turns
        self.turn_tokens: list[list[int]] = [[] for _ in range(n)]  # the agent's current turn
        self.score_host = np.zeros(n)  # the sum of the turn rewards
        self.done_host = np.ones(n, dtype=bool)
        self.histories: list[Messages] = [[] for _ in range(n)]
        self.end_reason: list[str | None] = [None] * n
        self.episodes: list[Episode | None] = [None] * n

    def tokens_after_prompt(self, row: int) -> int:
        return int(self.length[row])

    def clear_rows(self, rows: list[int] | None) -> None:
        if rows is None:
            self.agent.zero_()
            rows = list(range(self.batch_size))
        else:
            self.agent[torch.tensor(rows, device=self.device)] = False
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
        else:
            self.reset_rows(rows, prompts)

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
        self._append(actions, active)
        turn_reward = np.zeros(self.batch_size)
        turn_ended = np.zeros(self.batch_size, dtype=bool)
        ended: list[int] = []
        for r in active:
            self.length[r] += 1
            self.n_actions[r] += 1
            self.turn_tokens[r].append(acts[r])
            turn = self._turn_end(r, acts[r])
            if turn is None:
                continue
            turn_ended[r] = True
            if self._end_turn(r, *turn, eos=acts[r] == self.eos_id, turn_reward=turn_reward):
                ended.append(r)
        return self._finish(ended, turn_reward, turn_ended)

    def _append(self, actions: torch.Tensor, active: list[int]) -> None:
        """Write each active row's action in its next column, as an agent token."""
        rows = torch.tensor(active, device=self.device, dtype=torch.long)
        cols = [self.prompt_slots + int(self.length[r]) for r in active]
        cols_t = torch.tensor(cols, device=self.device, dtype=torch.long)
        self.ids[rows, cols_t] = actions.to(self.device).long()[rows]
        self.mask[rows, cols_t] = 1
        self.agent[rows, cols_t] = True

    def _turn_end(self, row: int, action: int) -> tuple[str, bool] | None:
        """``(the turn's text, whether it ended normally)`` when ``action`` ended row's turn: at
        EOS, a stop string or the turn budget (normally), or at the context budget; else None."""
        eos = action == self.eos_id
        text = None
        at_stop = False
        if self.task.stop and not eos:
            text = self.decode(self.turn_tokens[row])
            at_stop = any(s in text for s in self.task.stop)
        full = self.length[row] >= self.budget
        normal_end = eos or at_stop or len(self.turn_tokens[row]) >= self.task.max_turn_tokens
        if not (normal_end or full):
            return None
        return (self.decode(self.turn_tokens[row]) if text is None else text), normal_end

    def _end_turn(
        self, row: int, text: str, normal_end: bool, eos: bool, turn_reward: np.ndarray
    ) -> bool:
        """Close row's turn, ask its episode for the reply and write it; whether the episode
        ended (``end_reason`` says why)."""
        self.turn_tokens[row] = []
        self.turns[row] += 1
        self.histories[row].append({"role": "assistant", "content": text})
        if not normal_end:  # cut off by the context mid-turn: the game cannot go on
            self.end_reason[row] = "context"
            return True
        turn = self._respond(row)
        turn_reward[row] = turn.reward
        self.score_host[row] += turn.reward
        if turn.done or self.turns[row] >= self.task.max_turns:
            self.end_reason[row] = "done" if turn.done else "turn_limit"
            return True
        reply = turn.reply or ""
        toks = self.reply_tokens(row, reply, closed=eos) if reply else []
        if self.length[row] + len(toks) + 1 > self.budget:  # the reply and one more agent token
            self.end_reason[row] = "context"
            return True
        if toks:
            start = self.prompt_slots + int(self.length[row])
            self.ids[row, start : start + len(toks)] = torch.tensor(toks, device=self.device)
            self.mask[row, start : start + len(toks)] = 1
            self.length[row] += len(toks)
            self.histories[row].append({"role": self.task.reply_role, "content": reply})
        return False

    def _respond(self, row: int) -> Turn:
        """The episode's reply to row's conversation, checked."""
        episode = self.episodes[row]
        assert episode is not None  # begin() set it
        try:
            result = episode.respond([dict(m) for m in self.histories[row]])
        except RewardError:
            raise
        except Exception as err:  # the user's code: report it with the task's name
            raise RewardError(
                f"task {self.task.name}: respond() raised {type(err).__name__}: {err} (row {row})"
            ) from err
        return check_turn(result, self.task.name, row)

    def _finish(self, ended: list[int], turn_reward: np.ndarray, turn_ended: np.ndarray):
        """The step's results; the reference reads the conversations that ended."""
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
            texts = [self.text_after_prompt(r) for r in ended]
            end_info = {"rows": ended, "ref_logprobs": ref_lps, "texts": texts}
        as_t = lambda x: torch.as_tensor(x, device=self.device)  # noqa: E731
        return reward, as_t(ended_now), reward.new_tensor(turn_reward), as_t(turn_ended), end_info

    def _agent_ref_logprobs(self, rows: list[int]) -> torch.Tensor:
        """``log π_ref`` of the agent's tokens of ``rows`` in order (``[k, budget]``, 0 after),
        from one forward over each whole conversation: the reference sees the env's tokens too."""
        width = int(self.length[rows].max())
        idx = torch.tensor(rows, device=self.device)
        logp = self.reference_logprobs(idx, width)
        assert logp is not None  # the conversation's reference runs at the end
        agent = self.agent[idx, self.prompt_slots : self.prompt_slots + width]
        out = torch.zeros((len(rows), self.budget), device=self.device)
        for j in range(len(rows)):
            sel = logp[j][agent[j]]
            out[j, : sel.numel()] = sel
        return out

    def observation(self) -> dict[str, torch.Tensor]:
        return super().observation() | {"agent_mask": self.agent.long()}

    def observation_space(self):
        box = gym.spaces.Box(0, 1, (self.columns,), np.int64)
        return gym.spaces.Dict(dict(super().observation_space().spaces) | {"agent_mask": box})

    def close(self) -> None:
        self.episodes = [None] * self.batch_size


def _build(
    task: str | MultiTurnTask,
    model: str | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    device: str | torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
    batch_size: int,
    temperature: float,
    reference_pass: str | None,
    task_kwargs: dict[str, Any],
) -> _Conversation:
    if reference_pass not in (None, "at_end"):
        raise ValueError(
            "multi-turn envs run the reference once per finished conversation: reference_pass "
            f"must be 'at_end', got {reference_pass!r}"
        )
    device = resolve_device(device)
    made = make_task(task, **task_kwargs)
    if not isinstance(made, MultiTurnTask):
        raise ValueError(
            f"task {made.name} is a single-turn task: use textenv.env.TextGenerationEnv "
            "or TextGenerationVectorEnv"
        )
    model, tokenizer = frozen_reference(model, tokenizer, device, dtype, trust_remote_code)
    return _Conversation(made, model, tokenizer, batch_size, device, check_temperature(temperature))


def _episode(task: MultiTurnTask, rng: np.random.Generator) -> tuple[Episode, int]:
    """An episode of ``task`` from a seed drawn with ``rng`` (rows of a group share the seed)."""
    seed = int(rng.integers(2**31 - 1))
    return task.new_episode(np.random.default_rng(seed)), seed


class _ConversationAccess(CoreAccess):
    """The conversation's lengths, besides the attributes of every text env."""

    _gen: _Conversation
    multi_turn = True  # max_new_tokens is the context budget after the prompt

    @property
    def conversation_lengths(self) -> np.ndarray:
        """Tokens after the prompt per row (host-side: reading it costs no device sync)."""
        return self._gen.length.copy()


class MultiTurnTextEnv(_ConversationAccess, SingleTextEnv):
    """A conversation with the env, one agent token per step (see the module's docs).

    Args: as :class:`textenv.env.TextGenerationEnv`; ``task`` is a multi-turn task name
    (``"Calculator"``, ``"GuessTheNumber"``, ``"TextArena"``, ``"FunctionTask"``) or a
    :class:`MultiTurnTask`. ``reset(options={"episode": ep})`` plays a given episode.

    Info: every step ``turn_reward`` and ``turn_ended``; at the end ``score`` (the sum of the
    turn rewards), ``ref_logprobs`` (the agent's tokens), ``context_exhausted``, ``turns``,
    ``end_reason`` (``"done"``, ``"turn_limit"`` or ``"context"``) and ``response_text``.
    """

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
        check_env_arguments(render_mode, torch_threads)
        core = _build(
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
        self._attach(core, render_mode)

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
        self._check_running()
        gen = self._gen
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


class MultiTurnTextVectorEnv(_ConversationAccess, VectorTextEnv):
    """``num_envs`` conversations as one batch on the models' device; row ``i`` of
    ``reset(seed=s)`` replays :class:`MultiTurnTextEnv` reset with seed ``s + i`` token for token.

    Autoreset is DISABLED: rows that have ended ignore their actions until ``reset()``; partial
    resets with ``options={"reset_mask": [...]}`` start new episodes in the selected rows only.
    ``options={"group_size": k}``: rows ``g*k .. g*k+k-1`` play the same episode (same seed).
    ``arrays="numpy"`` returns numpy arrays, as Gymnasium's numpy vector wrappers expect.
    Infos as the single env's, as ``[N]`` arrays with Gymnasium's ``_<key>`` masks.
    """

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
        check_env_arguments(render_mode, torch_threads, num_envs, arrays)
        core = _build(
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
        self._attach(core, render_mode, arrays)

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        options = options or {}
        rows, group = self._reset_rows(seed, options, "episodes", ["episodes"])
        if "episodes" in options:
            given = list(options["episodes"])
            if len(given) != self.num_envs:
                raise ValueError(
                    f"options['episodes'] needs {self.num_envs} episodes, got {len(given)}"
                )
            seeds: list[int | None] = [None] * self.num_envs
            episodes = [given[i] for i in rows]
        else:  # a group's rows play its first row's seed
            seeds = self._draw(rows, group, lambda rng: int(rng.integers(2**31 - 1)))
            episodes = [self.task.new_episode(np.random.default_rng(seeds[i])) for i in rows]
        self._gen.begin(rows, episodes)
        info = {
            "prompt": np.array(self._gen.prompts, dtype=object),
            "episode_seed": np.array(seeds, dtype=object),
        }
        return self._out(self._gen.observation()), info

    def step(self, actions):
        self._check_running()
        gen = self._gen
        actions = torch.as_tensor(actions, device=gen.device).long().reshape(-1)
        reward, ended, turn_reward, turn_ended, end = gen.step(actions)
        info: dict[str, Any] = {"turn_reward": turn_reward, "_turn_reward": turn_ended.clone()}
        if end:
            info |= self._end_info(end, ended)
        truncated = torch.zeros_like(ended)
        return self._out((gen.observation(), reward, ended.clone(), truncated, info))

    def _end_info(self, end: dict[str, Any], ended: torch.Tensor) -> dict[str, Any]:
        """The infos of the conversations that ended this step, with Gymnasium's ``_<key>``
        masks."""
        gen, n = self._gen, self.num_envs
        on_device = lambda x, **kw: torch.as_tensor(x, device=gen.device, **kw)  # noqa: E731
        ref_lps = torch.zeros((n, gen.budget), device=gen.device)
        ref_lps[end["rows"]] = end["ref_logprobs"]
        texts = np.full(n, None, dtype=object)
        texts[end["rows"]] = end["texts"]
        reasons = np.full(n, None, dtype=object)
        reasons[end["rows"]] = [gen.end_reason[r] for r in end["rows"]]
        exhausted = on_device([gen.end_reason[r] == "context" for r in range(n)]) & ended
        zero = torch.zeros(n, dtype=torch.long, device=gen.device)
        score = on_device(gen.score_host, dtype=torch.float32)
        return {
            "score": torch.where(ended, score, float("nan")),
            "_score": ended,
            "ref_logprobs": ref_lps,
            "_ref_logprobs": ended,
            "context_exhausted": exhausted,
            "_context_exhausted": ended,
            "truncated_response": exhausted,
            "_truncated_response": ended,
            "turns": torch.where(ended, on_device(gen.turns), zero),
            "_turns": ended,
            "response_length": torch.where(ended, on_device(gen.n_actions), zero),
            "_response_length": ended,
            "response_text": texts,
            "_response_text": ended.cpu().numpy(),
            "end_reason": reasons,
            "_end_reason": ended.cpu().numpy(),
        }

    def close_extras(self, **kwargs: Any) -> None:
        if hasattr(self, "_gen"):
            self._gen.close()
