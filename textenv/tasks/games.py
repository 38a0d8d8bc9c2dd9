"""textarena's games as multi-turn tasks: the agent is player 0, a fixed opponent plays the rest."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from textenv.tasks.conversation import Episode, Messages, MultiTurnTask, Turn


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


_TAG = re.compile(r"\[(GAME|Player \d+|Player)\]")  # textarena's speaker tags, not moves
_PILE = re.compile(r"^\s*pile (\d+): (\d+)\s*$", re.M)


def _listed_moves(observation: str) -> list[str]:
    """The last ``Available Moves: '[..]', ...`` list (textarena's board games print one)."""
    lines = [line for line in observation.splitlines() if "Available Moves" in line]
    return re.findall(r"\[[^\]]+\]", lines[-1]) if lines else []


def _nim_moves(observation: str) -> list[str]:
    """Every ``[pile quantity]`` the last board of Nim's piles allows."""
    board = observation[observation.rfind("Current Pile:") :]
    piles = _PILE.findall(board) if "Current Pile:" in observation else []
    return [f"[{i} {q}]" for i, n in piles for q in range(1, int(n) + 1)]


def _bracketed_moves(observation: str) -> list[str]:
    """The distinct ``[...]`` moves an observation mentions (the rules' examples, moves made)."""
    found = re.findall(r"\[[^\[\]\n]+\]", _TAG.sub("", observation))
    return list(dict.fromkeys(found))


def random_legal_move(rng: np.random.Generator) -> Callable[[str], str]:
    """An opponent that plays a random move: among the last ``Available Moves: '[..]', ...`` list
    of its observation (textarena's board games print one), or the moves Nim's piles allow; for
    other games, among the ``[...]`` moves the observation mentions (the rules' examples and the
    moves made), which the game may reject as invalid (textarena's rules for invalid moves then
    apply to the opponent)."""

    def play(observation: str) -> str:
        moves = _listed_moves(observation) or _nim_moves(observation)
        moves = moves or _bracketed_moves(observation)
        if not moves:
            raise ValueError(
                "the opponent found no 'Available Moves' in its observation, nor any [move]: "
                "pass opponent=<callable>"
            )
        return moves[int(rng.integers(len(moves)))]

    return play


MAX_PLAYERS = 16
"""The most players a game's count is looked for among (``num_players=None``)."""


def _reset_with_players(game: Any, num_players: int | None, seed: int, name: str) -> int:
    """Reset ``game`` with ``num_players``, or (None) with the fewest players it accepts; return
    the count. textarena's games check the count in ``reset`` and raise naming the players."""
    if num_players is not None:
        game.reset(num_players=num_players, seed=seed)
        return num_players
    last: Exception | None = None
    for n in range(1, MAX_PLAYERS + 1):
        try:
            game.reset(num_players=n, seed=seed)
            return n
        except (AssertionError, ValueError) as err:
            if "player" not in str(err).lower():
                raise
            last = err
    raise ValueError(
        f"task {name}: the game accepts none of 1 to {MAX_PLAYERS} players ({last}): "
        "pass num_players="
    )


@dataclass
class TextArena(MultiTurnTask):
    __doc__ = """A textarena game (``game`` is its id), the agent as player 0.

    ## Description
    The game's opening observation is the prompt; after each agent turn the game steps with
    the turn's text as the move, the fixed opponent (``opponent``: a callable
    ``observation -> move``, default :func:`random_legal_move`) plays the other players' moves,
    and the game's new messages are the env's reply. ``num_players`` is the game's own count by
    default (the fewest it accepts: 1 for GuessTheNumber, 2 for Nim or TicTacToe). The reward
    is textarena's reward for player 0 when the game ends (1 win, 0 draw, −1 loss or too many
    invalid moves, as the game defines it). Games are seeded from the episode's seed;
    ``split="test"`` plays seeds ≡ 4 (mod 5), ``"train"`` the rest. Needs ``pip install
    textarena``; games that download data (Wordle) do not work offline.

    ## Arguments
    ``gym.make("textenv/TextArena-v0", model="embedded", game="Nim-v0")`` (any offline game id);
    ``textenv/GuessTheNumber-v0`` and ``textenv/TicTacToe-v0`` fix ``game``.

    ## Version History
    * v0: initial version.
    """
    name: ClassVar[str] = "TextArena"
    game: str = "GuessTheNumber-v0"
    num_players: int | None = None
    """players of the game (None: the fewest the game accepts; the agent is player 0)"""
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
        players = getattr(self, "_players", None) or self.num_players
        self._players = _reset_with_players(game, players, seed, self.name)
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
    num_players: int | None = 1


@dataclass
class TicTacToe(TextArena):
    __doc__ = (TextArena.__doc__ or "").replace(
        "A textarena game (``game`` is its id)",
        "textarena's TicTacToe-v0 against a random legal opponent",
    )
    name: ClassVar[str] = "TicTacToe"
    game: str = "TicTacToe-v0"
    num_players: int | None = 2
    max_turns: int = 5
