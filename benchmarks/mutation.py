"""Mutation testing: change one thing in a module, run its tests, see whether some test fails.

    python -m benchmarks.mutation --module agents/ppo.py --tests tests/test_ppo_core.py tests/test_ppo_loss.py
    python -m benchmarks.mutation --module agents/gae.py --tests tests/test_gae.py --dry-run   # list mutants

Mutants are generated with ``ast`` from the module's source, one change each: arithmetic
``+ <-> -``, ``* <-> /`` (``//``, ``%``, ``**`` too, and their augmented assignments);
comparisons made inclusive/exclusive, negated and swapped, ``== <-> !=``, ``is <-> is not``,
``in <-> not in``; ``and <-> or``; ``not`` dropped; a unary minus dropped; a number ``c`` ->
``c+1``, ``0``, ``-c``; ``True <-> False``; ``min <-> max`` (builtins, ``torch.max/min``,
``maximum/minimum``, ``amax/amin``, ``argmax/argmin``, ``clamp_min/clamp_max``); a clamp's
bounds swapped or the clamp dropped; a statement (assignment, expression, ``raise``,
``break``, ``continue``) replaced with ``pass`` and a ``return value`` with ``return None``.
Docstrings, annotations, type aliases, f-strings, string literals and the text of ``raise``
are left alone.

Nothing is written to disk (unless ``--on-disk``): the parent imports the heavy libraries once (torch, numpy,
gymnasium, transformers, pytest) and no project module; each mutant runs in a forked child
that compiles the mutated source, executes it into a fresh module object registered in
``sys.modules`` under the module's real name (``__file__`` set), then runs ``pytest -x`` on
the selected tests. Exit code 0 means the mutant survived; a child that runs past the
timeout is killed and counted as killed (reported separately as a timeout).

With ``--select coverage`` (the default; needs ``coverage``), one traced run of the tests first
records which tests execute each line of the module, and each mutant runs only those tests
(in their original order; for code that runs at import, every test that executes any line of
the module, so a test that only reads a constant does not count). A mutant on a line no
test executes survives without running: in-process, no test can observe it (tests that start
a subprocess import the module from disk, so they never see a mutant either way).

Tests that start processes which import the project (``torch.multiprocessing`` spawns,
``torchrun``) need ``--on-disk --select all --jobs 1``: each mutant's source (``ast.unparse``d)
is also written over the module's file while it runs, and the original is written back after
the last one (run it in a scratch worktree, never in a checkout with uncommitted work).

The report is ``benchmarks/results/mutation_<module stem>.md``: the command, the totals and
every surviving mutant. Survivors known to be equivalent (no input the module is documented
to accept can tell them apart) are explained in ``benchmarks/mutation_equivalents.toml``,
matched on (module, function, original code, mutated code).
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import os
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tomllib

EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.toml")
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly")


@dataclass
class MutationConfig:
    """Mutation-test one module against a set of tests, without touching files on disk."""

    module: str = "agents/ppo.py"
    """path of the module to mutate, relative to the repository root (the current directory)"""
    tests: tuple[str, ...] = ("tests/test_ppo_core.py", "tests/test_ppo_loss.py")
    """pytest arguments selecting the tests (files or node ids), fastest and most specific first"""
    max_mutants: int | None = None
    """run only the first N mutants in source order"""
    scopes: tuple[str, ...] = ()
    """run only the mutants inside these functions or classes (e.g. shaped_rewards AdaptiveKLController)"""
    timeout: float | None = None
    """seconds per mutant before its child is killed (default: 10 x its tests' time in the unmutated run, at least 20)"""
    jobs: int = 1
    """mutants run at once (each is one forked process)"""
    output: str | None = None
    """report path (default: benchmarks/results/mutation_<module stem>.md)"""
    dry_run: bool = False
    """list the mutants and exit without running anything"""
    survivors_of: str | None = None
    """run only the mutants listed as surviving in this earlier report (to check that new tests kill them)"""
    only_lines: tuple[int, ...] = ()
    """run only the mutants of the statements starting on these lines (e.g. the lines a change rewrote)"""
    select: Literal["coverage", "all"] = "coverage"
    """which tests each mutant runs: those that execute its lines (one traced run first), or all of them"""
    explain: str | None = None
    """rewrite this earlier report's survivor reasons from the current equivalents file, run nothing, and exit"""
    lines_cache: str | None = None
    """keep the traced run's line-to-tests map here and reuse it for other modules while the sources are unchanged"""
    on_disk: bool = False
    """also write each mutant over the module's file while it runs, for tests whose spawned processes import it
    (needs --select all and --jobs 1; the original is restored at the end)"""


# ----------------------------------------------------------------------------- mutant generation

BINOP_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Add: (ast.Sub,),
    ast.Sub: (ast.Add,),
    ast.Mult: (ast.Div,),
    ast.Div: (ast.Mult,),
    ast.FloorDiv: (ast.Div, ast.Mult),
    ast.Mod: (ast.FloorDiv,),
    ast.Pow: (ast.Mult,),
}
# For each comparison: the boundary moved, the negation, the swap.
CMP_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Lt: (ast.LtE, ast.GtE, ast.Gt),
    ast.LtE: (ast.Lt, ast.Gt, ast.GtE),
    ast.Gt: (ast.GtE, ast.LtE, ast.Lt),
    ast.GtE: (ast.Gt, ast.Lt, ast.LtE),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
}
MINMAX = {
    "min": "max",
    "max": "min",
    "maximum": "minimum",
    "minimum": "maximum",
    "amax": "amin",
    "amin": "amax",
    "argmax": "argmin",
    "argmin": "argmax",
    "clamp_min": "clamp_max",
    "clamp_max": "clamp_min",
}
CLAMPS = {"clamp", "clip"}
DELETABLE = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Raise, ast.Break, ast.Continue)


@dataclass
class Mutant:
    """One change to the module: where, what it looked like, what it became."""

    lineno: int
    scope: str
    operator: str
    original: str
    mutated: str
    code: object = None  # the compiled module
    end_lineno: int = 0
    module_level: bool = False  # outside any function body: it runs when the module is imported
    source: str = ""  # the mutated module as source text (for --on-disk)


@dataclass
class _Site:
    index: int  # position of the node in ast.walk order (identical in a deep copy)
    operator: str
    apply: Callable[
        [ast.AST, dict[int, ast.AST]], ast.AST
    ]  # mutates the copy's node; returns what to display


def _replace(parents: dict[int, ast.AST], old: ast.AST, new: ast.AST) -> ast.AST:
    """Put ``new`` where ``old`` sits in its parent."""
    parent = parents[id(old)]
    for field, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, field, new)
            return new
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item is old:
                    value[i] = new
                    return new
    raise AssertionError("node not found in its parent")


def _is_docstring(node: ast.AST) -> bool:
    """A docstring, or an assignment to ``__doc__`` (a docstring built from another): documentation."""
    if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
        "__doc__"
    ]:
        return True
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _numbers(value: float) -> list[float]:
    out = [value + 1]
    if value != 0:
        out += [type(value)(0), -value]
    return [v for i, v in enumerate(out) if v not in out[:i] and v != value]


class _Collector(ast.NodeVisitor):
    """Walk the module, remember every mutable site with its scope, skip what must not change."""

    def __init__(self, index: dict[int, int]) -> None:
        self.index, self.sites, self.scopes = index, [], []
        self.scope_of: dict[int, str] = {}
        self.parent_op: dict[int, ast.AST] = {}

    def add(self, node: ast.AST, operator: str, apply) -> None:
        self.sites.append(_Site(self.index[id(node)], operator, apply))
        self.scope_of[len(self.sites) - 1] = ".".join(self.scopes) or "<module>"

    # scopes ------------------------------------------------------------------
    def _scoped(self, node) -> None:
        self.scopes.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = (
        _scoped  # decorators, annotations and returns are skipped
    )

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scopes.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()

    # things left alone -------------------------------------------------------
    def visit_JoinedStr(self, node) -> None:
        pass

    def visit_Import(self, node) -> None:
        pass

    visit_ImportFrom = visit_Import

    def visit_Raise(self, node: ast.Raise) -> None:
        self._delete(node)  # the raise itself may go; its message text stays as it is

    # statements --------------------------------------------------------------
    def _delete(self, node: ast.stmt) -> None:
        def apply(n, parents):
            return _replace(parents, n, ast.Pass())

        self.add(node, "statement -> pass", apply)

    def generic_visit(self, node: ast.AST) -> None:
        if isinstance(node, DELETABLE) and not _is_docstring(node):
            alias = (
                not self.scopes
                and isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Subscript)
            )
            if not alias:  # `Batch = dict[str, Tensor]` is a type annotation
                self._delete(node)
        if _is_docstring(node):
            return
        super().generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        if node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None
        ):

            def apply(n, parents):
                n.value = ast.Constant(None)
                return n

            self.add(node, "return value -> None", apply)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._delete(node)
            self.visit(node.value)  # the annotation is left alone

    def visit_arg(self, node) -> None:
        pass  # annotations

    # expressions -------------------------------------------------------------
    def visit_BinOp(self, node: ast.BinOp) -> None:
        self._ops(node, BINOP_SWAPS.get(type(node.op), ()))
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._ops(node, BINOP_SWAPS.get(type(node.op), ()))
        self.generic_visit(node)

    def _ops(self, node, replacements) -> None:
        for new in replacements:

            def apply(n, parents, new=new):
                n.op = new()
                return n

            self.add(node, f"{type(node.op).__name__} -> {new.__name__}", apply)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        new = ast.Or if isinstance(node.op, ast.And) else ast.And

        def apply(n, parents):
            n.op = new()
            return n

        self.add(node, f"{type(node.op).__name__} -> {new.__name__}", apply)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        for pos, op in enumerate(node.ops):
            for new in CMP_SWAPS.get(type(op), ()):

                def apply(n, parents, pos=pos, new=new):
                    n.ops[pos] = new()
                    return n

                self.add(node, f"{type(op).__name__} -> {new.__name__}", apply)
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, (ast.USub, ast.Not)):

            def apply(n, parents):
                return _replace(parents, n, n.operand)

            self.add(
                node, f"drop {'not' if isinstance(node.op, ast.Not) else 'unary minus'}", apply
            )
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            self.parent_op[id(node.operand)] = node
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            candidates = [not value]
        elif isinstance(value, (int, float)):
            candidates = _numbers(value)
            if id(node) in self.parent_op:  # -c is the "drop unary minus" mutant already
                candidates = [c for c in candidates if c != -value]
        else:
            return
        for new in candidates:

            def apply(n, parents, new=new):
                n.value = new
                return n

            self.add(node, f"constant {value!r} -> {new!r}", apply)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = (
            func.id
            if isinstance(func, ast.Name)
            else func.attr
            if isinstance(func, ast.Attribute)
            else None
        )
        if name in MINMAX and (isinstance(func, ast.Attribute) or name in ("min", "max")):

            def apply(n, parents, new=MINMAX[name]):
                if isinstance(n.func, ast.Name):
                    n.func.id = new
                else:
                    n.func.attr = new
                return n

            self.add(node, f"{name} -> {MINMAX[name]}", apply)
        if name in ("clamp_min", "clamp_max") and isinstance(func, ast.Attribute):

            def apply(n, parents):
                return _replace(parents, n, n.func.value)

            self.add(node, f"drop {name}", apply)
        if name in CLAMPS and isinstance(func, ast.Attribute):
            method = not (
                isinstance(func.value, ast.Name) and func.value.id in ("torch", "np", "numpy")
            )
            bounds = node.args[0 if method else 1 :]
            if len(bounds) == 2 or {k.arg for k in node.keywords} == {"min", "max"}:

                def swap(n, parents, method=method):
                    if n.keywords:
                        for k in n.keywords:
                            k.arg = "max" if k.arg == "min" else "min"
                    else:
                        lo = 0 if method else 1
                        n.args[lo], n.args[lo + 1] = n.args[lo + 1], n.args[lo]
                    return n

                self.add(node, f"swap {name} bounds", swap)

            def drop(n, parents, method=method):
                return _replace(parents, n, n.func.value if method else n.args[0])

            self.add(node, f"drop {name}", drop)
        self.generic_visit(node)


def _parents(tree: ast.AST) -> dict[int, ast.AST]:
    return {
        id(child): parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)
    }


def _one_line(text: str, limit: int = 140) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _display(source_lines: list[str], node: ast.AST, shown: ast.AST) -> tuple[str, str]:
    """The changed line before and after (the node's own code when it spans several lines)."""
    if node.lineno == node.end_lineno:
        line = source_lines[node.lineno - 1].encode()  # ast offsets count UTF-8 bytes
        new = line[: node.col_offset] + ast.unparse(shown).encode() + line[node.end_col_offset :]
        return _one_line(line.decode()), _one_line(new.decode())
    return _one_line(ast.unparse(node)), _one_line(ast.unparse(shown))


def generate_mutants(source: str, filename: str) -> Iterator[Mutant]:
    """Every mutant of ``source`` that compiles, in source order, duplicates removed."""
    tree = ast.parse(source, filename)
    source_lines = source.splitlines()
    nodes = list(ast.walk(tree))
    collector = _Collector({id(n): i for i, n in enumerate(nodes)})
    collector.visit(tree)
    baseline = ast.unparse(tree)
    seen = {baseline}

    def position(i: int) -> tuple[int, int, int]:
        node = nodes[collector.sites[i].index]
        return node.lineno, node.col_offset, i

    order = sorted(range(len(collector.sites)), key=position)
    for i in order:
        site = collector.sites[i]
        node = nodes[site.index]
        mutated_tree = copy.deepcopy(tree)
        target = list(ast.walk(mutated_tree))[site.index]
        shown = site.apply(target, _parents(mutated_tree))
        ast.fix_missing_locations(mutated_tree)
        text = ast.unparse(mutated_tree)
        if text in seen:
            continue
        seen.add(text)
        try:
            code = compile(mutated_tree, filename, "exec", dont_inherit=True)
        except (SyntaxError, ValueError, TypeError):
            continue
        yield Mutant(
            node.lineno,
            collector.scope_of[i],
            site.operator,
            *_display(source_lines, node, shown),
            code,
            node.end_lineno or node.lineno,
            not _in_function(tree, node.lineno),
            text,
        )


def _in_function(tree: ast.AST, lineno: int) -> bool:
    """Whether ``lineno`` lies in the body of a function (not its signature, decorators or defaults)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            body = node.body if isinstance(node.body, list) else [node.body]
            if body[0].lineno <= lineno <= (node.end_lineno or node.lineno):
                return True
    return False


# ----------------------------------------------------------------------------- running


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] == "agents":  # the repository's agents/ is the package textenv.agents (pyproject)
        parts.insert(0, "textenv")
    return ".".join(parts)


def install(name: str, path: Path, code) -> None:
    """Execute ``code`` as the module ``name`` (as an import would, but from memory)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before executing, as the import system does
    exec(code, module.__dict__)
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)


def fork_test_run(
    name: str, path: Path, code, tests: tuple[str, ...], log: str, lines_out: str | None = None
) -> int:
    """Start a child that installs the (mutated) module and runs the tests; return its pid. With
    ``lines_out``, the run is traced and the tests that execute each line are written there (JSON)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        try:
            os.setpgid(pid, pid)  # also here, so a kill right after the fork finds the group
        except OSError:
            pass
        return pid
    rc = 70
    try:
        os.setpgid(0, 0)  # its own process group, so a timeout kills whatever it started too
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.dont_write_bytecode = True
        import pytest

        if lines_out is None:
            install(name, path, code)
            rc = int(pytest.main([*tests, *PYTEST_ARGS]))
        else:
            rc = _traced_run(tests, lines_out)
    except BaseException:  # noqa: BLE001 - a mutant that breaks the import is killed by it
        traceback.print_exc()
        rc = 71
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


SOURCES = ("agents", "textenv")  # every project module, traced once for all of them


def _sources() -> list[Path]:
    return sorted(p for folder in SOURCES for p in Path(folder).rglob("*.py"))


TRACE_FORMAT = 2  # 2: lines run while the module is imported are marked IMPORT
IMPORT = "<import>"


def _fingerprint(tests: tuple[str, ...]) -> str:
    """What the traced run depends on: the tests selected and every project and test source."""
    import hashlib

    digest = hashlib.sha256(repr((TRACE_FORMAT, tests)).encode())
    for p in [*_sources(), *sorted(Path("tests").rglob("*.py"))]:
        digest.update(str(p).encode() + p.read_bytes())
    return digest.hexdigest()


def _traced_run(tests: tuple[str, ...], lines_out: str) -> int:
    """Run the unmutated tests under coverage, one context per test; write, for every project
    file, {line: [test ids]} and each test's seconds as JSON."""
    import json

    import coverage
    import pytest

    root = os.path.realpath(".")
    cov = coverage.Coverage(data_file=None, include=[str(p.resolve()) for p in _sources()])
    cov.start()  # before any project import: import-time lines fall in the empty context
    seconds: dict[str, float] = {}  # insertion order is run order

    class PerTest:
        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(self, item, nextitem):
            cov.switch_context(item.nodeid)
            start = time.monotonic()
            yield
            seconds[item.nodeid] = time.monotonic() - start
            cov.switch_context("")

    rc = int(pytest.main([*tests, *PYTEST_ARGS], plugins=[PerTest()]))
    cov.stop()
    data = cov.get_data()
    files = {}
    for measured in data.measured_files():
        rel = os.path.relpath(os.path.realpath(measured), root)
        # The empty context is the import (and collection); a function the import calls runs there
        files[rel] = {
            str(line): [c or IMPORT for c in contexts]
            for line, contexts in data.contexts_by_lineno(measured).items()
        }
    with open(lines_out, "w") as f:
        json.dump({"fingerprint": _fingerprint(tests), "seconds": seconds, "files": files}, f)
    return rc


def tests_by_line(
    path: Path, tests: tuple[str, ...], log_dir: Path, cache: Path | None
) -> tuple[dict[int, list[str]], dict[str, float]]:
    """Which test ids execute each line of the unmutated module, and each test's seconds (in run
    order). The traced run covers every project module at once; with ``cache`` it is kept there
    and reused while the tests and the sources are unchanged."""
    import json

    out = cache or log_dir / "lines.json"
    traced = json.loads(out.read_text()) if out.exists() else {}
    if traced.get("fingerprint") != _fingerprint(tests):
        print(
            f"tracing which tests execute which lines (one run of {' '.join(tests)}) ...",
            flush=True,
        )
        _, status = os.waitpid(
            fork_test_run("", path, None, tests, str(log_dir / "traced.log"), str(out)), 0
        )
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0 or not out.exists():
            raise SystemExit(
                f"error: the traced run of {' '.join(tests)} failed (exit code {rc}; log: "
                f"{log_dir / 'traced.log'}); fix the tests first, or use --select all"
            )
        traced = json.loads(out.read_text())
    lines = traced["files"].get(str(path), {})
    return {int(line): ids for line, ids in lines.items()}, traced["seconds"]


def selected_tests(
    mutant: Mutant, by_line: dict[int, list[str]], seconds: dict[str, float]
) -> tuple[str, ...]:
    """The tests a mutant runs: those executing its lines; for import-time code (constants,
    defaults, class bodies, and functions the import itself calls), every test that executes any
    line of the module."""
    lines = range(mutant.lineno, max(mutant.end_lineno, mutant.lineno) + 1)
    if mutant.module_level or any(IMPORT in by_line.get(line, ()) for line in lines):
        lines = sorted(by_line)
    ids = {test for line in lines for test in by_line.get(line, ())}
    return tuple(test for test in seconds if test in ids)  # the run order, which -x relies on


def run_all(
    name: str,
    path: Path,
    mutants: list[Mutant],
    tests: list[tuple[str, ...]],
    timeouts: list[float],
    jobs: int,
    log_dir: Path,
    on_disk: bool = False,
) -> list[str]:
    """Run every mutant against its tests; return its outcome: 'killed', 'survived' or 'timeout'
    ('survived' without running when it has no tests). ``on_disk``: each mutant's source is
    written over ``path`` while it runs (one at a time), the original restored at the end."""
    from tqdm import tqdm

    tqdm.monitor_interval = (
        0  # no monitor thread: a thread holding a lock at fork time could hang a child
    )
    outcomes: list[str] = ["" if tests[i] else "survived" for i in range(len(mutants))]
    pending = [i for i in range(len(mutants)) if tests[i]][::-1]
    running: dict[int, tuple[int, float]] = {}
    bar = tqdm(
        total=len(mutants), initial=len(mutants) - len(pending), desc=str(path), unit="mutant"
    )
    original = path.read_bytes()
    try:
        _run_loop(
            name,
            path,
            mutants,
            tests,
            timeouts,
            jobs,
            log_dir,
            outcomes,
            pending,
            running,
            bar,
            on_disk,
        )
    finally:  # Ctrl-C or an error: no child outlives the run, and the module is itself again
        for pid in running:
            _kill(pid)
        if on_disk:
            path.write_bytes(original)
        bar.close()
    return outcomes


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _run_loop(
    name, path, mutants, tests, timeouts, jobs, log_dir, outcomes, pending, running, bar, on_disk
) -> None:
    while pending or running:
        while pending and len(running) < jobs:
            i = pending.pop()
            if on_disk:
                path.write_text(mutants[i].source)
            pid = fork_test_run(name, path, mutants[i].code, tests[i], str(log_dir / f"{i}.log"))
            running[pid] = (i, time.monotonic())
        time.sleep(0.02)
        for pid, (i, start) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() - start > timeouts[i]:
                _kill(pid)
                outcomes[i] = "timeout"
            elif done:
                outcomes[i] = "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
            else:
                continue
            del running[pid]
            bar.update(1)
            counts = Counter(outcomes)
            bar.set_postfix(
                killed=counts["killed"], survived=counts["survived"], timeout=counts["timeout"]
            )


def baseline(name: str, path: Path, source: str, tests: tuple[str, ...], log_dir: Path) -> float:
    """Run the tests against the unmutated module (through the same path); abort unless they pass."""
    code = compile(ast.parse(source, str(path)), str(path), "exec", dont_inherit=True)
    log = log_dir / "baseline.log"
    start = time.monotonic()
    _, status = os.waitpid(fork_test_run(name, path, code, tests, str(log)), 0)
    elapsed = time.monotonic() - start
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(
            f"error: the unmutated {path} does not pass {' '.join(tests)} (pytest exit code {rc}); "
            f"fix that first.\n{tail}"
        )
    return elapsed


# ----------------------------------------------------------------------------- report


def load_equivalents(module: str) -> dict[tuple[str, str, str], str]:
    if not EQUIVALENTS.exists():
        return {}
    entries = tomllib.loads(EQUIVALENTS.read_text())["equivalent"]
    return {
        (e["scope"], _one_line(e["original"]), _one_line(e["mutated"])): e["reason"]
        for e in entries
        if e["module"] == module
    }


def survivors_in(report_path: Path) -> set[tuple[str, str, str]]:
    """``(scope, original, mutated)`` of each survivor a report lists (its table cells unescaped)."""
    import re

    row = re.compile(
        r"^\| \d+ \| `(?P<scope>[^`]+)` \| [^|]+ \| `(?P<original>.*)` \| `(?P<mutated>.*)` \| .* \|$"
    )
    found = set()
    for line in report_path.read_text().splitlines():
        match = row.match(line)
        if match:
            found.add(
                (
                    match["scope"],
                    match["original"].replace("\\|", "|"),
                    match["mutated"].replace("\\|", "|"),
                )
            )
    return found


def explain_report(report_path: Path, module: str) -> int:
    """Rewrite a report's survivor reasons (and its explained/unexplained counts) from the current
    equivalents file, without running anything; return how many survivors stay unexplained."""
    import re

    row = re.compile(
        r"^\| \d+ \| `(?P<scope>[^`]+)` \| [^|]+ \| `(?P<original>.*)` \| `(?P<mutated>.*)` \| .* \|$"
    )
    explained = load_equivalents(module)
    lines = report_path.read_text().splitlines()
    counts = Counter()
    for i, line in enumerate(lines):
        match = row.match(line)
        if not match:
            continue
        key = (
            match["scope"],
            match["original"].replace("\\|", "|"),
            match["mutated"].replace("\\|", "|"),
        )
        why = explained.get(key)
        counts[bool(why)] += 1
        if why:
            lines[i] = f"{line[: match.end('mutated') + 1]} | {_cell(why)} |"
    for i, line in enumerate(lines):  # the totals row follows the header that names its columns
        if line.startswith("| mutants | killed |"):
            cells = lines[i + 2].split(" | ")
            cells[-2], cells[-1] = str(counts[True]), f"{counts[False]} |"
            lines[i + 2] = " | ".join(cells)
            break
    _write_atomic(report_path, "\n".join(lines) + "\n")
    return counts[False]


def family(operator: str) -> str:
    """The kind of change an operator label names, for the per-operator table."""
    first = operator.split(" ")[0]
    for prefix, name in (
        ("statement", "statement -> pass"),
        ("return", "return value -> None"),
        ("constant", "number / bool constant"),
        ("drop not", "drop not"),
        ("drop unary", "drop unary minus"),
        ("swap", "clamp bounds swapped"),
        ("drop clamp", "clamp dropped"),
        ("drop clip", "clamp dropped"),
    ):
        if operator.startswith(prefix):
            return name
    if first in MINMAX:
        return "min <-> max"
    if first in ("And", "Or"):
        return "and <-> or"
    return "comparison" if issubclass(getattr(ast, first), ast.cmpop) else "arithmetic"


def _write_atomic(path: Path, text: str) -> None:
    """A temp file and a rename (the tool imports no project module, so not runlog's helper)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def report(
    command: str,
    module: str,
    tests: tuple[str, ...],
    mutants: list[Mutant],
    outcomes: list[str],
    seconds: float,
    timeout: str,
    uncovered: set[int] = frozenset(),
    select: str = "all",
    on_disk: bool = False,
) -> tuple[str, int]:
    counts = Counter(outcomes)
    total = len(mutants)
    killed = counts["killed"] + counts["timeout"]
    explained = load_equivalents(module)
    survivors = [
        (m, explained.get((m.scope, m.original, m.mutated), ""), i in uncovered)
        for i, (m, o) in enumerate(zip(mutants, outcomes))
        if o == "survived"
    ]
    unexplained = sum(1 for _, why, _ in survivors if not why)
    selection = (
        "only the tests that execute the mutated lines (a traced run of them all first; all of them for "
        "import-time code, every test that executes any line of the module)"
        if select == "coverage"
        else "all of them"
    )
    lines = [
        f"# Mutation testing: `{module}`",
        "",
        f"Command: `{command}`",
        "",
        f"Each mutant changes one thing in `{module}` (see `benchmarks/mutation.py` for the operators); it runs in "
        f"a forked child against `pytest {' '.join(tests)} {' '.join(PYTEST_ARGS)}` and survives when every test "
        f"passes; of those tests it runs {selection}."
        + (
            " The mutated source is also written over the module's file while it runs, so processes the tests "
            "spawn import the mutant too."
            if on_disk
            else ""
        )
        + f" Timeout {timeout} per mutant; {seconds:.0f} s in all.",
        "",
        "| mutants | killed | timeout (killed) | survived | of which no test executes | kill rate "
        "| survivors explained as equivalent | unexplained |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {total} | {counts['killed']} | {counts['timeout']} | {counts['survived']} | "
        f"{sum(1 for *_, u in survivors if u)} | {100 * killed / max(total, 1):.1f}% | {len(survivors) - unexplained} "
        f"| {unexplained} |",
        "",
        "## Surviving mutants",
        "",
    ]
    if survivors:
        lines += [
            "| line | function | operator | original | mutated | why it survives |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for m, why, not_run in survivors:
            why = _cell(why) or "**not explained**" + (
                " (no test executes this line)" if not_run else ""
            )
            lines.append(
                f"| {m.lineno} | `{m.scope}` | {m.operator} | `{_cell(m.original)}` | `{_cell(m.mutated)}` | "
                f"{why} |"
            )
    else:
        lines.append("None.")
    by_op: dict[str, Counter] = {}
    for m, o in zip(mutants, outcomes):
        by_op.setdefault(family(m.operator), Counter())[o] += 1
    lines += [
        "",
        "## By operator",
        "",
        "| operator | mutants | killed | timeout | survived |",
        "| --- | --- | --- | --- | --- |",
    ]
    for op, c in sorted(by_op.items()):
        lines.append(
            f"| {op} | {sum(c.values())} | {c['killed']} | {c['timeout']} | {c['survived']} |"
        )
    return "\n".join(lines) + "\n", unexplained


def warm_up() -> None:
    """Import, once in the parent, what every child would otherwise import again (seconds each)."""
    import gc
    import importlib.metadata

    import gymnasium  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (the first optimizer imports it)
    import torch.distributions  # noqa: F401
    import transformers  # noqa: F401

    torch.set_num_threads(1)
    # pytest plugins, imported here so no child spends time rewriting their asserts (hypothesis is ~100 modules).
    for entry_point in importlib.metadata.entry_points(group="pytest11"):
        entry_point.load()
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    # Everything alive now is shared with the children; freezing it keeps their collections short.
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import tyro

    args = tyro.cli(MutationConfig, args=argv)
    if args.on_disk and (args.select != "all" or args.jobs != 1):
        raise SystemExit(
            "error: --on-disk writes one mutant at a time over the module, which processes the tests "
            "spawn import: it needs --select all and --jobs 1"
        )
    if args.explain is not None:
        unexplained = explain_report(Path(args.explain), args.module)
        print(f"{args.explain}: {unexplained} survivor(s) not explained")
        return 0
    command = "python -m benchmarks.mutation " + " ".join(sys.argv[1:] if argv is None else argv)
    path = Path(args.module)
    if path.is_absolute() or not path.exists():
        raise SystemExit(
            f"error: --module must be a path relative to the repository root, got {args.module}"
        )
    name = module_name(path)
    source = path.read_text()
    mutants = list(generate_mutants(source, str(path)))
    if args.scopes:
        mutants = [
            m
            for m in mutants
            if any(m.scope == sc or m.scope.startswith(sc + ".") for sc in args.scopes)
        ]
    if args.survivors_of is not None:
        listed = survivors_in(Path(args.survivors_of))
        mutants = [m for m in mutants if (m.scope, m.original, m.mutated) in listed]
    if args.only_lines:
        mutants = [m for m in mutants if m.lineno in args.only_lines]
    if args.max_mutants is not None:
        mutants = mutants[: args.max_mutants]
    if args.dry_run:
        for m in mutants:
            print(f"{m.lineno:4d} {m.scope:28s} {m.operator:28s} {m.original}  ->  {m.mutated}")
        print(f"{len(mutants)} mutants")
        return 0

    warm_up()
    top = name.split(".")[0]
    loaded = [m for m in sys.modules if m == top or m.startswith(top + ".")]
    if loaded:
        raise SystemExit(
            f"error: the parent imported project modules {loaded}; the children would test those, "
            "not the mutants"
        )

    import tempfile

    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        log_dir = Path(tmp)
        start = time.monotonic()
        if (
            args.select == "coverage"
        ):  # the traced run is also the check that the unmutated module passes
            by_line, test_seconds = tests_by_line(
                path, args.tests, log_dir, Path(args.lines_cache) if args.lines_cache else None
            )
            per_mutant = [selected_tests(m, by_line, test_seconds) for m in mutants]
            base = [
                sum(test_seconds[t] for t in tests) + 2.0 for tests in per_mutant
            ]  # + pytest's start-up
            timeout_text = (
                "10 x its tests' unmutated time, at least 20 s,"
                if args.timeout is None
                else f"{args.timeout:.0f} s"
            )
            print(
                f"{path}: {len(mutants)} mutants; the traced run of the tests took {time.monotonic() - start:.0f} s",
                flush=True,
            )
        else:
            per_mutant = [args.tests] * len(mutants)
            base = [baseline(name, path, source, args.tests, log_dir)] * len(mutants)
            timeout_text = f"{args.timeout or max(20.0, 10 * base[0]):.0f} s"
            print(
                f"{path}: {len(mutants)} mutants; the unmutated module passes in {base[0]:.1f} s",
                flush=True,
            )
        timeouts = [args.timeout or max(20.0, 10 * b) for b in base]
        outcomes = run_all(
            name, path, mutants, per_mutant, timeouts, args.jobs, log_dir, args.on_disk
        )
        seconds = time.monotonic() - start
    uncovered = {i for i, t in enumerate(per_mutant) if not t}
    text, unexplained = report(
        command,
        args.module,
        args.tests,
        mutants,
        outcomes,
        seconds,
        timeout_text,
        uncovered,
        args.select,
        args.on_disk,
    )
    out = Path(args.output or f"benchmarks/results/mutation_{path.stem}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, text)
    counts = Counter(outcomes)
    print(
        f"killed {counts['killed']} + timeout {counts['timeout']} / {len(mutants)}; survived {counts['survived']} "
        f"({unexplained} not explained); report: {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
