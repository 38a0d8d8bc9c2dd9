"""The mutation tool's report plumbing (benchmarks/mutation.py): --explain and --on-disk's guard."""

from pathlib import Path

import pytest

from benchmarks.mutation import explain_report, load_equivalents, main, survivors_in


def _report(rows: list[str]) -> str:
    return "\n".join([
        "# Mutation testing: `agents/distributed.py`", "",
        "| mutants | killed | timeout (killed) | survived | of which no test executes | kill rate "
        "| survivors explained as equivalent | unexplained |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| 9 | 7 | 0 | {len(rows)} | 0 | 77.8% | 0 | {len(rows)} |", "",
        "## Surviving mutants", "",
        "| line | function | operator | original | mutated | why it survives |",
        "| --- | --- | --- | --- | --- | --- |", *rows, ""])


def test_explain_rewrites_reasons_and_counts_from_the_equivalents_file(tmp_path):
    known = {k: v for k, v in load_equivalents("agents/distributed.py").items() if k[0] == "Dist.all_reduce"}
    (scope, original, mutated), reason = next(iter(known.items()))
    rows = [f"| 86 | `{scope}` | IsNot -> Is | `{original}` | `{mutated}` | **not explained** |",
            "| 90 | `Dist.sum` | Add -> Sub | `x = a + b` | `x = a - b` | **not explained** |"]
    path = tmp_path / "report.md"
    path.write_text(_report(rows))
    assert explain_report(path, "agents/distributed.py") == 1
    text = path.read_text()
    assert f"| {reason} |" in text and text.count("**not explained**") == 1
    assert "| 9 | 7 | 0 | 2 | 0 | 77.8% | 1 | 1 |" in text
    assert survivors_in(path) == {(scope, original, mutated), ("Dist.sum", "x = a + b", "x = a - b")}


def test_on_disk_needs_one_job_and_every_test(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the tool takes paths from the repository root
    with pytest.raises(SystemExit, match="--on-disk .* needs --select all and --jobs 1"):
        main(["--module", "agents/distributed.py", "--on-disk", "--jobs", "2", "--select", "all"])
    with pytest.raises(SystemExit, match="needs --select all and --jobs 1"):
        main(["--module", "agents/distributed.py", "--on-disk"])
    assert Path("agents/distributed.py").read_text().startswith('"""Several processes')  # nothing was written
