"""The programs' entry points. Each sets, before it imports torch and transformers, that Ctrl-C
exits quietly (there is nothing to save yet); the program's ``main`` then puts Python's own
handler back (:func:`textenv.agents.cli._common.run_cli`). Importing this module changes
nothing: only calling an entry point does."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading


def _quiet_exit(_signum, _frame) -> None:
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


def _run(module: str, argv: list[str] | None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _quiet_exit)
    return importlib.import_module(module).main(argv)


def train(argv: list[str] | None = None) -> int:
    return _run("textenv.agents.cli.train", argv)


def train_text(argv: list[str] | None = None) -> int:
    return _run("textenv.agents.cli.train_text", argv)


def evaluate(argv: list[str] | None = None) -> int:
    return _run("textenv.agents.cli.evaluate", argv)


def plot(argv: list[str] | None = None) -> int:
    return _run("textenv.agents.cli.plot", argv)


def train_rm(argv: list[str] | None = None) -> int:
    return _run("textenv.agents.cli.train_rm", argv)


def make_pairs(argv: list[str] | None = None) -> int:
    return _run("textenv.agents.cli.make_pairs", argv)
