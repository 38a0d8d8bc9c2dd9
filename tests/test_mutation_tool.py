"""The mutation tool (benchmarks/mutation.py): the mutants it makes, the fate it reports for
each on a toy module whose outcomes are known, --explain, and --on-disk's guard."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.mutation import (
    explain_report,
    generate_mutants,
    load_equivalents,
    main,
    survivors_in,
)


def _report(rows: list[str]) -> str:
    return "\n".join(
        [
            "# Mutation testing: `agents/distributed.py`",
            "",
            "| mutants | killed | timeout (killed) | survived | of which no test executes | kill rate "
            "| survivors explained as equivalent | unexplained |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| 9 | 7 | 0 | {len(rows)} | 0 | 77.8% | 0 | {len(rows)} |",
            "",
            "## Surviving mutants",
            "",
            "| line | function | operator | original | mutated | why it survives |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )


def test_explain_rewrites_reasons_and_counts_from_the_equivalents_file(tmp_path):
    known = {
        k: v
        for k, v in load_equivalents("agents/distributed.py").items()
        if k[0] == "Dist.all_reduce"
    }
    (scope, original, mutated), reason = next(iter(known.items()))
    rows = [
        f"| 86 | `{scope}` | IsNot -> Is | `{original}` | `{mutated}` | **not explained** |",
        "| 90 | `Dist.sum` | Add -> Sub | `x = a + b` | `x = a - b` | **not explained** |",
    ]
    path = tmp_path / "report.md"
    path.write_text(_report(rows))
    assert explain_report(path, "agents/distributed.py") == 1
    text = path.read_text()
    assert f"| {reason} |" in text and text.count("**not explained**") == 1
    assert "| 9 | 7 | 0 | 2 | 0 | 77.8% | 1 | 1 |" in text
    assert survivors_in(path) == {
        (scope, original, mutated),
        ("Dist.sum", "x = a + b", "x = a - b"),
    }


def test_on_disk_needs_one_job_and_every_test(monkeypatch):
    monkeypatch.chdir(
        Path(__file__).resolve().parents[1]
    )  # the tool takes paths from the repository root
    with pytest.raises(SystemExit, match="--on-disk .* needs --select all and --jobs 1"):
        main(["--module", "agents/distributed.py", "--on-disk", "--jobs", "2", "--select", "all"])
    with pytest.raises(SystemExit, match="needs --select all and --jobs 1"):
        main(["--module", "agents/distributed.py", "--on-disk"])
    assert (
        Path("agents/distributed.py").read_text().startswith('"""Several processes')
    )  # nothing was written


def test_mutants_change_code_and_leave_documentation_annotations_and_messages_alone():
    source = '''"""Doc."""
import math
from typing import Any

Batch = dict[str, Any]


def f(x: int = 2) -> float:
    """Doc of f."""
    if not x:
        raise ValueError(f"x={x} must be nonzero " + "really")
    y: float = -x * 2.5
    return max(y, 0.0)
'''
    found = [
        (m.lineno, m.scope, m.operator, m.mutated, m.module_level)
        for m in generate_mutants(source, "m.py")
    ]
    assert found == [
        (
            8,
            "f",
            "constant 2 -> 3",
            "def f(x: int = 3) -> float:",
            True,
        ),  # a default is evaluated at import
        (8, "f", "constant 2 -> 0", "def f(x: int = 0) -> float:", True),
        (8, "f", "constant 2 -> -2", "def f(x: int = -2) -> float:", True),
        (10, "f", "drop not", "if x:", False),
        (
            11,
            "f",
            "statement -> pass",
            "pass",
            False,
        ),  # the raise goes; its message is never mutated
        (12, "f", "statement -> pass", "pass", False),
        (12, "f", "Mult -> Div", "y: float = -x / 2.5", False),
        (12, "f", "drop unary minus", "y: float = x * 2.5", False),
        (12, "f", "constant 2.5 -> 3.5", "y: float = -x * 3.5", False),
        (12, "f", "constant 2.5 -> 0.0", "y: float = -x * 0.0", False),
        (12, "f", "constant 2.5 -> -2.5", "y: float = -x * -2.5", False),
        (13, "f", "return value -> None", "return None", False),
        (13, "f", "max -> min", "return min(y, 0.0)", False),
        (13, "f", "constant 0.0 -> 1.0", "return max(y, 1.0)", False),
    ]


TOY = '''"""A module whose mutants' fates are known."""

LIMIT = 3


def clip(x, lo, hi):
    if x < lo:
        return lo
    return min(x, hi)


def countdown(n):
    while n > 0:
        n -= 1
    return n


def unused(a):
    return a + 1
'''
TOY_TESTS = """from textenv.toy import LIMIT, clip, countdown


def test_clip():
    assert clip(5, 0, LIMIT) == 3 and clip(-1, 0, 3) == 0 and clip(1, 0, 3) == 1


def test_countdown():
    assert countdown(3) == 0
"""


@pytest.mark.parametrize("select", ["coverage", "all"])
def test_a_run_on_a_toy_module_reports_the_fate_of_every_mutant(tmp_path, select):
    """25 mutants whose outcomes are known by hand: ``x < lo -> x <= lo`` survives (no test
    calls clip at its boundary), the five in ``unused`` survive (no test calls it), four in
    countdown loop forever (timeouts, which count as killed), and every other one fails a test.
    Run as a user runs the tool, in a project whose package the toy module stands in for."""
    (tmp_path / "textenv").mkdir()
    (tmp_path / "textenv" / "__init__.py").write_text("")
    (tmp_path / "textenv" / "toy.py").write_text(TOY)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_toy.py").write_text(TOY_TESTS)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.mutation",
            "--module",
            "textenv/toy.py",
            "--tests",
            "tests/test_toy.py",
            "--select",
            select,
            "--jobs",
            "2",
            "--timeout",
            "5",
            "--output",
            "report.md",
        ],
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    totals = text.split("| --- | --- | --- | --- | --- | --- | --- | --- |\n", 1)[1].splitlines()[0]
    mutants, killed, timeouts, survived, not_run, rate, explained, unexplained = totals.strip(
        "| "
    ).split(" | ")
    # A killed mutant may time out on a loaded machine; a looping one never ends any other way. A
    # survivor's tests take well under a second, far inside the 5 s timeout.
    assert (mutants, int(killed) + int(timeouts), survived, rate) == ("25", 19, "6", "76.0%")
    assert int(timeouts) >= 4
    assert not_run == (
        "5" if select == "coverage" else "0"
    )  # the traced run finds no test calling unused
    assert (explained, unexplained) == ("0", "6")
    assert "| 7 | `clip` | Lt -> LtE | `if x < lo:` | `if x <= lo:` | **not explained** |" in text
    assert text.count("| `unused` |") == 5
    assert survivors_in(tmp_path / "report.md") == {("clip", "if x < lo:", "if x <= lo:")} | {
        ("unused", "return a + 1", mutated)
        for mutated in (
            "return None",
            "return a - 1",
            "return a + 2",
            "return a + 0",
            "return a + -1",
        )
    }
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
