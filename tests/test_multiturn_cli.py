"""Multi-turn tasks from the command line (your respond function, your task class, the
MultiTurn name), runs that resume and evaluate from any folder, and defaults that work
(textarena's player counts, context errors naming the field, the list of known tasks)."""

from __future__ import annotations

import json
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest

import textenv  # noqa: F401  (registers the ids)
from textenv.agents.cli import evaluate as evaluate_cli
from textenv.agents.cli import train_text as train_text_cli
from textenv.tasks import TASKS, make_task

# Small budgets for the tiny model; the tiny vocabulary has no newline.
_BUDGETS = {
    "max_prompt_tokens": 12,
    "max_context_tokens": 24,
    "max_turn_tokens": 4,
    "max_turns": 2,
    "reply_format": " {reply} ",
}

_USER_CODE = """
from dataclasses import dataclass

from textenv.tasks import MultiTurnTask, Turn


def respond(history):
    said = history[-1]["content"]
    turns = sum(m["role"] == "assistant" for m in history)
    return Turn("ok", said.count("a") / max(len(said), 1), turns >= 2)


def reward(prompts, responses):
    return [r.count("a") / max(len(r), 1) for r in responses]


@dataclass
class _Episode:
    prompt: str

    def respond(self, history):
        return respond(history)


@dataclass
class SayA(MultiTurnTask):
    max_prompt_tokens: int = 12
    max_context_tokens: int = 24
    max_turn_tokens: int = 4
    max_turns: int = 2
    reply_format: str = " {reply} "

    def new_episode(self, rng):
        return _Episode(["say a", "hello"][int(rng.integers(2))])
"""


def _flags(runs, module: str, how: str) -> list[str]:
    common = ["--model", "tiny", "--num-envs", "4", "--num-minibatches", "2", "--no-progress"]
    common += ["--no-tensorboard", "--sample-every", "0", "--eval-samples", "0"]
    common += ["--runs-dir", str(runs), "--run-name", "r", "--iterations", "1"]
    if how == "respond":
        options = _BUDGETS | {"respond": f"{module}:respond", "prompts": ["say a", "hello"]}
        return ["--task", "MultiTurn", "--task-options", json.dumps(options), *common]
    if how == "task":
        return ["--task", f"{module}:SayA", *common]
    return ["--task", "Toy", "--reward", f"{module}:reward", *common]  # a single-turn reward


@pytest.mark.parametrize("how", ["respond", "task", "reward"])
def test_a_run_with_your_code_from_its_folder_resumes_and_evaluates_from_another(
    tmp_path, monkeypatch, capsys, how
):
    """--task-options' respond, --task module:Class and --reward module:fn are imported from the
    folder the run started in, which the run records: a resume and an evaluation from another
    folder import the same code."""
    code, elsewhere, runs = tmp_path / "code", tmp_path / "elsewhere", tmp_path / "runs"
    code.mkdir(), elsewhere.mkdir()
    module = f"user_turns_{how}"
    (code / f"{module}.py").write_text(textwrap.dedent(_USER_CODE))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(code)
    assert train_text_cli.main(_flags(runs, module, how)) == 0, capsys.readouterr().err
    saved = json.loads((runs / "r" / "config.json").read_text())
    assert saved["import_dir"] == str(code.resolve())
    monkeypatch.delitem(sys.modules, module)  # a new process would not have it either
    monkeypatch.chdir(elsewhere)
    argv = ["--resume", str(runs / "r"), "--iterations", "2"]
    assert train_text_cli.main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    monkeypatch.delitem(sys.modules, module)
    assert evaluate_cli.main([str(runs / "r"), "--episodes", "4"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["responses"] == 4 and np.isfinite(result["score_mean"])
    metrics = (runs / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in metrics] == [1, 2]


def test_a_run_folder_is_imported_from_before_the_working_directory(tmp_path, monkeypatch):
    from textenv.rewards import get_reward, importing_from

    for folder, score in (("run", 1.0), ("cwd", 2.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "user_turns_order.py").write_text(
            f"def fn(p, r):\n    return [{score}] * len(r)\n"
        )
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delitem(sys.modules, "user_turns_order", raising=False)
    path = list(sys.path)
    with importing_from(tmp_path / "run"), importing_from(None):  # None keeps the folder
        assert get_reward("user_turns_order:fn")([""], ["x"]) == [1.0]
        with pytest.raises(ValueError, match=r"cannot import reward 'nowhere_x:fn' \(from .*run, "):
            get_reward("nowhere_x:fn")
    assert sys.path == path  # left as it was


def test_settings_checks_read_your_task_from_the_runs_folder(tmp_path, monkeypatch):
    from textenv.agents.text import SamplingConfig, TextTrainConfig

    (tmp_path / "code").mkdir(), (tmp_path / "elsewhere").mkdir()
    (tmp_path / "code" / "user_turns_check.py").write_text(textwrap.dedent(_USER_CODE))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != ""])
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.delitem(sys.modules, "user_turns_check", raising=False)
    config = TextTrainConfig(
        task="user_turns_check:SayA",
        import_dir=str(tmp_path / "code"),
        sampling=SamplingConfig(static_cache=True),
    )
    with pytest.raises(ValueError, match="--static-cache is for single-turn tasks"):
        config.validate()


def test_multi_turn_is_the_name_of_your_respond_function_task(tmp_path):
    """textenv/MultiTurn-v0's name works everywhere a task name does; the class keeps its own."""
    from textenv.agents.text import TextTrainConfig, is_multi_turn, task_settings
    from textenv.tasks import FunctionTask

    task = make_task("MultiTurn", respond=lambda h: (None, 0.0, True), prompts=["hi"])
    assert type(task) is FunctionTask and is_multi_turn("MultiTurn")
    config = TextTrainConfig(task="MultiTurn", task_options=json.dumps({"prompts": ["hi"]}))
    assert task_settings(config)[0]["prompts"] == ["hi"]


def test_a_respond_spec_is_imported_like_a_reward(tmp_path, monkeypatch):
    from textenv.tasks import FunctionTask

    (tmp_path / "user_turns_spec.py").write_text(textwrap.dedent(_USER_CODE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "user_turns_spec", raising=False)
    task = FunctionTask(respond="user_turns_spec:respond", prompts=["hi"])
    assert task.respond([{"role": "assistant", "content": "aa"}]).reward == 1.0
    with pytest.raises(ValueError, match="cannot import respond 'user_turns_spec:nope'"):
        FunctionTask(respond="user_turns_spec:nope", prompts=["hi"])


def test_task_module_class_must_name_a_task_class(tmp_path, monkeypatch):
    (tmp_path / "user_turns_bad.py").write_text("def not_a_task():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "user_turns_bad", raising=False)
    with pytest.raises(ValueError, match="user_turns_bad:not_a_task is not a Task or MultiTurn"):
        make_task("user_turns_bad:not_a_task")


def test_the_unknown_task_error_lists_every_task_the_trainer_takes(tmp_path, capsys):
    flags = ["--task", "Nope", "--model", "tiny", "--runs-dir", str(tmp_path), "--no-progress"]
    assert train_text_cli.main(flags) == 2
    err = capsys.readouterr().err
    names = [n for n in TASKS if n != "FunctionTask"] + ["MultiTurn", "module:Class"]
    assert all(name in err for name in names), err


def test_the_task_flags_help_names_every_task(capsys):
    with pytest.raises(SystemExit):
        train_text_cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    names = [n for n in TASKS if n != "FunctionTask"] + ["MultiTurn", "module:Class"]
    assert all(name in help_text for name in names), help_text


# -- textarena's player counts ------------------------------------------------------------------


def test_a_two_player_textarena_game_gets_its_player_count_from_the_game():
    pytest.importorskip("textarena")
    env = gym.make(
        "textenv/TextArena-v0", model="tiny", game="Nim-v0", max_prompt_tokens=128, max_turns=3
    )
    obs, info = env.reset(seed=0)
    assert env.unwrapped.task.num_players is None  # the game's own count
    done, steps = False, 0
    while not done and steps < 200:
        obs, reward, done, truncated, info = env.step(env.action_space.sample())
        steps += 1
    assert done and info["end_reason"] in ("done", "turn_limit", "context")


def test_nim_plays_against_the_built_in_opponent():
    pytest.importorskip("textarena")
    from textenv.tasks import TextArena

    episode = TextArena(game="Nim-v0").new_episode(np.random.default_rng(0))
    assert "Nim" in episode.prompt and episode.game.state.num_players == 2
    history = [{"role": "user", "content": episode.prompt}]
    history.append({"role": "assistant", "content": "[0 1]"})
    reply, reward, done = episode.respond(history)
    assert not done and "Player 1 removes" in reply  # the opponent made a legal move


def test_the_random_opponent_reads_nims_piles_and_falls_back_to_moves_in_brackets():
    from textenv.tasks import random_legal_move

    play = random_legal_move(np.random.default_rng(0))
    piles = "[GAME] Current Pile:\n  pile 0: 0\n  pile 1: 2\n  pile 2: 0"
    assert {play(piles) for _ in range(20)} == {"[1 1]", "[1 2]"}
    rules = "[GAME] Play '[cooperate]' or '[defect]'.\n[Player 0] [defect]"
    assert {play(rules) for _ in range(20)} == {"[cooperate]", "[defect]"}


def test_a_game_that_accepts_no_player_count_says_to_pass_num_players(monkeypatch):
    pytest.importorskip("textarena")
    import textarena

    from textenv.tasks import TextArena

    class _Picky:
        def reset(self, num_players, seed=None):
            raise AssertionError(f"The number of players has to be 99, received {num_players}")

    monkeypatch.setattr(textarena, "make", lambda game: _Picky())
    with pytest.raises(ValueError, match="accepts none of 1 to 16 players.*num_players="):
        TextArena(game="Picky-v0").new_episode(np.random.default_rng(0))


# -- the model's context ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["GuessTheNumber", "TicTacToe", "TextArena"])
def test_a_multi_turn_task_too_long_for_the_model_names_its_fields(name):
    with pytest.raises(ValueError) as err:
        gym.make(f"textenv/{name}-v0", model="tiny")
    message = str(err.value)
    assert "max_prompt_tokens" in message and "max_context_tokens" in message, message
    assert "max_new_tokens" not in message, message


def test_every_multi_turn_task_resets_on_the_tiny_model_with_its_fields_lowered():
    pytest.importorskip("textarena")
    for name in textenv.MULTITURN_TASK_NAMES:
        kw = (
            {"respond": lambda h: (None, 0.0, True), "prompts": ["hi"]}
            if name == "MultiTurn"
            else {}
        )
        if name in ("GuessTheNumber", "TicTacToe", "TextArena"):
            kw["max_prompt_tokens"] = 128  # as the context error says
        env = gym.make(f"textenv/{name}-v0", model="tiny", **kw)
        env.reset(seed=0)
        env.close()
