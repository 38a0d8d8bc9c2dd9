"""Mutation testing with mutmut, summed up as one kill rate per module.

    python -m benchmarks.mutmut_report                          # writes benchmarks/results/mutation.md
    python -m benchmarks.mutmut_report --mutants 'textenv.kl*'  # only these mutants (mutmut's wildcards)
    python -m benchmarks.mutmut_report --report-only            # rebuild the table from the last run

``[tool.mutmut]`` in pyproject.toml says which modules are mutated and which test files run.
mutmut names a mutant by its file's path and puts its mutated copy first on ``sys.path``, so a
module must sit at the path of its import name. agents/ installs as ``textenv.agents``
(``package-dir``); run in the checkout, the tests import it from the unmutated agents/ and every
mutant of it has no tests. The run therefore happens in ``build/mutation/``, where ``--ref``
(HEAD by default: a committed state, not a working tree others may be editing) is extracted with
agents/ at textenv/agents/, beside tests/ and pyproject.toml. Its ``mutants/`` (mutmut's results)
is kept between runs: mutmut re-tests only the functions whose source changed; remove
build/mutation/ for a run from scratch. ``cd build/mutation && mutmut browse`` shows the mutants.

The kill rate is mutmut's own score, (killed + timeout) / (mutants - skipped), over the mutants
checked so far (an interrupted run keeps its results). A module with none checked is listed as
"not run yet".
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "build" / "mutation"
COLUMNS = ("killed", "survived", "timeout", "no tests")


@dataclass
class MutationConfig:
    """Run mutmut on the modules configured in pyproject.toml and write the kill rate of each."""

    ref: str = "HEAD"
    """the commit to test (a copy of it is extracted; uncommitted changes are not tested)"""
    mutants: tuple[str, ...] = ()
    """mutant names or wildcards to run (e.g. 'textenv.kl*'); empty: every configured module"""
    max_children: int = 2
    """mutants tested in parallel"""
    report_only: bool = False
    """skip running; rebuild the report from build/mutation/mutants/"""
    note: str = ""
    """a paragraph printed under the list of runs"""
    out: str = "benchmarks/results/mutation.md"
    """markdown report to write"""


def stage(ref: str) -> str:
    """Extract ``ref``'s package as it installs (agents/ at textenv/agents/), tests and config;
    return the commit. mutmut's results (``*.meta``, ``*.json``) stay; every copied file in
    ``mutants/`` goes, so none outlives its source (mutmut copies over only what is missing)."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}").strip()
    last = STAGE / "COMMIT"
    if not last.exists() or last.read_text().strip() != commit:
        # mutmut maps tests to functions once and then only adds new tests: a function added
        # since would have "no tests". A new commit gets a new map.
        (STAGE / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    for path in (STAGE / "textenv", STAGE / "tests", STAGE / "agents"):
        shutil.rmtree(path, ignore_errors=True)
    for path in (STAGE / "mutants").rglob("*"):
        if path.is_file() and path.suffix not in (".meta", ".json"):
            path.unlink()
    archive = subprocess.run(
        ["git", "archive", commit, "textenv", "agents", "tests", "pyproject.toml"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    # -m: every file is new to mutmut, which then keeps the results of each unchanged function.
    subprocess.run(["tar", "-x", "-m", "-C", str(STAGE)], input=archive, check=True)
    (STAGE / "agents").rename(STAGE / "textenv" / "agents")
    return commit


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, text=True, capture_output=True
    ).stdout


def mutmut(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=STAGE,
        env=env,
        check=True,
        text=True,
        capture_output=capture,
    )


def repo_path(module: str) -> str:
    """``textenv.agents.gae`` -> ``agents/gae.py``, ``textenv.kl`` -> ``textenv/kl.py``."""
    parts = module.split(".")
    if parts[:2] == ["textenv", "agents"]:
        parts = parts[1:]
    path = "/".join(parts)
    return f"{path}/__init__.py" if (ROOT / path).is_dir() else f"{path}.py"


def results() -> dict[str, Counter]:
    """Status counts per module (repo path), from ``mutmut results --all true``."""
    out = mutmut("results", "--all", "true", capture=True).stdout
    counts: dict[str, Counter] = {}
    for line in out.splitlines():
        match = re.fullmatch(r"\s*(\S+)\.x[_ǁ]\S*__mutmut_\d+: (.+)", line)
        if match:
            counts.setdefault(repo_path(match[1]), Counter())[match[2]] += 1
    return counts


def survivors() -> list[tuple[str, list[str]]]:
    """Each surviving mutant with its changed lines, from ``mutmut show``."""
    out = mutmut("results", capture=True).stdout
    rows = []
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if status != "survived":
            continue
        diff = mutmut("show", name, capture=True).stdout.splitlines()
        changed = [d for d in diff if d[:1] in "-+" and not d.startswith(("---", "+++"))]
        rows.append((name, changed))
    return rows


def all_modules(commit: str) -> list[str]:
    files = git("ls-tree", "-r", "--name-only", commit, "agents", "textenv").split()
    return [f for f in files if f.endswith(".py")]


def report(args: MutationConfig) -> str:
    from importlib.metadata import version

    counts = results()
    commit = (STAGE / "COMMIT").read_text().strip()
    runs = (STAGE / "runs.md").read_text().splitlines() if (STAGE / "runs.md").exists() else []
    lines = [
        "# Mutation testing (mutmut)",
        "",
        f"mutmut {version('mutmut')}, last run on commit {commit[:12]}; the modules and test "
        "files are those of `[tool.mutmut]` in pyproject.toml. `make mutation` runs every "
        "configured module; the runs behind these numbers (mutmut keeps a mutant's result "
        "until its function changes):",
        "",
        *runs,
        "",
    ]
    if args.note:
        lines += [args.note, ""]
    lines += [
        "Kill rate: (killed + timeout) / (checked - skipped), mutmut's own score over the mutants "
        'checked so far. "no tests": no selected test calls the mutated function.',
        "",
        "| module | mutants | checked | killed | survived | timeout | no tests | other | kill rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    not_run = []
    for module in all_modules(commit):
        c = counts.get(module, Counter())
        checked = sum(c.values()) - c["not checked"]
        if checked == 0:
            not_run.append(module)
            continue
        other = checked - sum(c[k] for k in COLUMNS)
        tested = checked - c["skipped"]
        rate = 100 * (c["killed"] + c["timeout"]) / tested if tested else 0.0
        cells = [str(c[k]) for k in COLUMNS]
        lines.append(
            f"| `{module}` | {sum(c.values())} | {checked} | {' | '.join(cells)} | {other} "
            f"| {rate:.1f}% |"
        )
    others = sorted({k for c in counts.values() for k in c if k not in (*COLUMNS, "not checked")})
    if others:
        lines += ["", f'"other": {", ".join(others)}.']
    lines += ["", "Not run yet: " + ", ".join(f"`{m}`" for m in not_run) + ".", ""]
    rows = survivors()
    if rows:
        lines += ["## Surviving mutants", ""]
        for name, changed in rows:
            lines += [f"`{name}`", "", "```diff", *changed, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import tyro

    from textenv.agents.runlog import atomic_write_text

    args = tyro.cli(MutationConfig, args=argv)
    command = shlex.join(["python", "-m", "benchmarks.mutmut_report", *(argv or sys.argv[1:])])
    STAGE.mkdir(parents=True, exist_ok=True)
    failure: BaseException | None = None
    if not args.report_only:
        commit = stage(args.ref)
        (STAGE / "COMMIT").write_text(commit + "\n")
        start = time.perf_counter()
        try:
            mutmut("run", "--max-children", str(args.max_children), *args.mutants)
        except (subprocess.CalledProcessError, KeyboardInterrupt) as error:
            failure = error  # the results so far are kept; report them, then fail
        seconds = time.perf_counter() - start
        # mutmut exits 0 when interrupted (Ctrl-C): what is left unchecked says how far it got.
        left = sum(c["not checked"] for c in results().values())
        code = getattr(failure, "returncode", "interrupted")
        stopped = f", failed (exit {code})" if failure else ""
        stopped += f", {left} configured mutants not checked yet" if left else ""
        with open(STAGE / "runs.md", "a") as log:
            day = time.strftime("%Y-%m-%d")
            log.write(f"- `{command}` on {commit[:12]}: {seconds:.0f} s{stopped} ({day})\n")
    atomic_write_text(ROOT / args.out, report(args))
    print(f"wrote {args.out}")
    if failure:
        raise failure


if __name__ == "__main__":
    main()
