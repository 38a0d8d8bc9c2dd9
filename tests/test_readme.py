"""The README and docs/ as a tested contract: their Python blocks run (on tiny models), their
commands parse, and their relative links lead somewhere."""

import importlib
import re
import shlex
from pathlib import Path

import pytest
import tyro

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# The only edits made before running a block: the tiny random model instead of the embedded
# one, and a classic run a few seconds long instead of minutes.
TINY = {'model="embedded"': 'model="tiny"', "total_timesteps=200_000": "total_timesteps=2_048"}


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def _blocks(language: str) -> list[tuple[str, int, str]]:
    """(document, index in it, code) of each fenced block of ``language``, in every document."""
    found = []
    for doc in DOCS:
        blocks = re.findall(rf"```{language}\n(.*?)```", doc.read_text(), flags=re.S)
        found += [(_name(doc), index, code) for index, code in enumerate(blocks)]
    return found


def _commands() -> list[str]:
    """Each command line of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for _, _, block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


PYTHON_BLOCKS = _blocks("python")


@pytest.mark.parametrize(
    "doc, index, code", PYTHON_BLOCKS, ids=[f"{doc}:{index}" for doc, index, _ in PYTHON_BLOCKS]
)
def test_python_block_runs(doc, index, code, tmp_path, monkeypatch):
    for old, new in TINY.items():
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # anything a block writes (runs/) stays out of the repository
    exec(compile(code, f"{doc} python block {index}", "exec"), {"__name__": f"doc_block_{index}"})


def _parse(module: str, args: list[str]) -> None:
    if module in ("scripts.train", "scripts.train_text", "scripts.train_rm", "scripts.make_pairs"):
        from textenv.agents.cli import make_pairs, train, train_rm, train_text

        parse = {
            "scripts.train": train.parse,
            "scripts.train_text": train_text.parse,
            "scripts.train_rm": train_rm.parse,
            "scripts.make_pairs": make_pairs.parse,
        }[module]
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
        elif words[0] == "torchrun":
            # torchrun's own flags parse with torchrun's parser, the trainer's with ours
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


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code, where brackets are not links."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, and a
    repeated heading numbered -1, -2, ..."""
    anchors: set[str] = set()
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def test_every_relative_link_leads_to_a_file_and_heading():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(doc.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:: not ours to check offline
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{_name(doc)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{_name(doc)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_docs_are_read():
    """A renamed folder must not make every docs/ check above pass on nothing."""
    assert {"envs.md", "training.md", "benchmarks.md", "scaling.md", "testing.md"} <= {
        doc.name for doc in DOCS
    }
