"""What the wheel installs: one import name (``textenv``), the programs, the data, the licence."""

import configparser
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from the tracked files alone: a build/ folder left in the clone by an earlier build
    # would otherwise put stale modules in the wheel and hide a package missing from the list.
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file() and not (ROOT / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (path,) = out.glob("textenv_ppo-*.whl")
    return path


def test_the_wheel_installs_only_the_textenv_import_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {
        "textenv"
    }  # no top-level `agents` (openai-agents owns that name) and no `scripts`
    for module in (
        "textenv/agents/ppo.py",
        "textenv/agents/cli/train_text.py",
        "textenv/agents/reward_model.py",
        "textenv/agents/cli/train_rm.py",
        "textenv/data/sentiment_prompts.txt",
        "textenv/data/arithmetic.jsonl",
        "textenv/tasks/__init__.py",
        "textenv/tasks/instructions.py",
        "textenv/constraints.py",
    ):
        assert module in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


def test_the_console_scripts_point_into_textenv_agents_cli(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [
            n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")
        ]
        parser = configparser.ConfigParser()
        parser.read_string(archive.read(entry_points).decode())
    scripts = dict(parser["console_scripts"])
    assert scripts == {
        "textenv-train": "textenv.agents.cli.launch:train",
        "textenv-train-text": "textenv.agents.cli.launch:train_text",
        "textenv-evaluate": "textenv.agents.cli.launch:evaluate",
        "textenv-plot": "textenv.agents.cli.launch:plot",
        "textenv-train-rm": "textenv.agents.cli.launch:train_rm",
        "textenv-make-pairs": "textenv.agents.cli.launch:make_pairs",
    }


def test_the_installed_wheel_imports_without_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Outside the clone, with the unpacked wheel first on the path: nothing may come from the repository.
    code = (
        "import textenv, textenv.agents.cli.train as t, textenv.tasks as k; "
        "print(textenv.__file__); print(t.__file__); print(k.__file__); "
        "print(len(k.make_task('Sentiment').prompts))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    textenv_file, train_file, tasks_file, prompts = result.stdout.split()
    for file in (textenv_file, train_file, tasks_file):
        assert Path(file).is_relative_to(target), file
    assert int(prompts) > 0


def test_importing_textenv_registers_every_id_with_its_task_in_a_fresh_process():
    import textenv

    code = (
        "import json, gymnasium as gym, textenv; print(json.dumps({k: [s.entry_point, s.vector_entry_point, "
        "s.kwargs] for k, s in gym.registry.items() if k.startswith('textenv/')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    registry = json.loads(out.stdout)
    expected = {
        f"textenv/{name}-v0": [
            "textenv.env:TextGenerationEnv",
            "textenv.env:TextGenerationVectorEnv",
            {"task": name},
        ]
        for name in textenv.TASK_NAMES
    }
    multiturn = ["textenv.multiturn:MultiTurnTextEnv", "textenv.multiturn:MultiTurnTextVectorEnv"]
    expected |= {
        f"textenv/{name}-v0": [
            *multiturn,
            {"task": "FunctionTask" if name == "MultiTurn" else name},
        ]
        for name in textenv.MULTITURN_TASK_NAMES
    }
    expected |= {
        f"textenv/Torch{name}": [None, f"textenv.control:Torch{name.split('-')[0]}", {}]
        for name in (
            "CartPole-v1",
            "Acrobot-v1",
            "Pendulum-v1",
            "MountainCar-v0",
            "MountainCarContinuous-v0",
        )
    }
    assert registry == expected


def test_the_package_exports_resolve_lazily_and_unknown_names_are_attribute_errors():
    import textenv

    assert textenv.__all__ == sorted(textenv.__all__) and {"TextGenerationEnv", "make_task"} <= set(
        textenv.__all__
    )
    from textenv.tasks import make_task

    assert textenv.make_task is make_task
    with pytest.raises(AttributeError, match="^module 'textenv' has no attribute 'nothing_here'$"):
        textenv.nothing_here  # noqa: B018


def test_the_top_level_agents_import_fails_with_one_line_pointing_to_textenv_agents():
    # From the repository root, agents/ would otherwise import as a second copy of
    # textenv.agents, whose classes are not textenv.agents' own.
    proc = subprocess.run(
        [sys.executable, "-c", "import agents"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: import textenv.agents, not agents: the repository's agents/ is the package "
        'textenv.agents (install the project first: pip install -e ".[dev]", or make)'
    )


def test_make_clean_removes_build_products_and_never_the_users_runs(tmp_path):
    # A copy of the repository's Makefile in a scratch tree holding a run and build products.
    (tmp_path / "Makefile").write_text((ROOT / "Makefile").read_text())
    for path in (
        "runs/mine/metrics.jsonl",
        "runs/mine/__pycache__/x.pyc",
        "build/lib/x.py",
        "textenv/__pycache__/x.pyc",
        ".pytest_cache/v",
        "x.egg-info/PKG-INFO",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    subprocess.run(["make", "clean"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert (tmp_path / "runs/mine/metrics.jsonl").is_file()
    assert (tmp_path / "runs/mine/__pycache__/x.pyc").is_file()
    for gone in ("build", "textenv/__pycache__", ".pytest_cache", "x.egg-info"):
        assert not (tmp_path / gone).exists(), gone
