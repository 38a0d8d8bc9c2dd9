"""The README as a tested contract: its Python blocks run (on tiny models), its commands parse."""

import re
import shlex
from pathlib import Path

import pytest
import tyro

README = Path(__file__).resolve().parent.parent / "README.md"
MAKEFILE = README.with_name("Makefile")
# The only edits made before running a block: the tiny random model instead of the embedded
# one, and a classic run a few seconds long instead of minutes.
TINY = {'model="embedded"': 'model="tiny"', "total_timesteps=200_000": "total_timesteps=2_048"}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    """Each command line of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs(index, tmp_path, monkeypatch):
    code = _blocks("python")[index]
    for old, new in TINY.items():
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # anything a block writes (runs/) stays out of the repository
    exec(
        compile(code, f"README.md python block {index}", "exec"),
        {"__name__": f"readme_block_{index}"},
    )


def _parse(module: str, args: list[str]) -> None:
    if module in ("scripts.train", "scripts.train_text"):
        from textenv.agents.cli import train, train_text

        parse = {"scripts.train": train.parse, "scripts.train_text": train_text.parse}[module]
        if "--resume" in " ".join(args):
            return
        try:
            parse(args)
        except SystemExit as exit_info:  # --help
            assert exit_info.code == 0
        return
    config = {
        "scripts.evaluate": "textenv.agents.cli.evaluate:EvalConfig",
        "scripts.plot": "textenv.agents.cli.plot:PlotConfig",
    }[module]
    import importlib

    mod, _, name = config.partition(":")
    tyro.cli(getattr(importlib.import_module(mod), name), args=args)


def test_every_command_is_a_make_target_an_install_or_parses():
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", MAKEFILE.read_text(), flags=re.M))
    checked = 0
    for command in _commands():
        words = shlex.split(command.replace("<", "").replace(">", ""))
        if words[0] == "make":
            assert set(words[1:]) <= targets, command
        elif words[0] == "pip" or words[:3] == [".venv/bin/python", "-m", "pip"]:
            continue
        elif (
            words[0] == "torchrun"
        ):  # torchrun's own flags parse with torchrun's parser, the trainer's with ours
            from torch.distributed.run import get_args_parser

            launch = get_args_parser().parse_args(words[1:])
            scripts = {"textenv-train": "scripts.train", "textenv-train-text": "scripts.train_text"}
            module = scripts[launch.training_script] if launch.no_python else launch.training_script
            assert launch.no_python or launch.module, command
            _parse(module, launch.training_script_args)
        else:
            assert words[0].endswith("python") and words[1] == "-m", command
            _parse(words[2], words[3:])
        checked += 1
    assert checked >= 10
