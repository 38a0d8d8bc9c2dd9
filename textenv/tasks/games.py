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
