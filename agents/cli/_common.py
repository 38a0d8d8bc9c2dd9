"""What every command-line program shares: ``--resume`` read before tyro (so a run's own config
is the default), and one exit path: a failure is one line on stderr and exit code 2."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from textenv.agents.checkpoint import StoppedNow, TrainingInterrupted

TRACEBACK_ENV = "TEXTENV_TRACEBACK"


def pop_resume(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``--resume DIR`` / ``--resume=DIR`` off ``argv``."""
    rest, resume, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--resume" and i + 1 < len(argv):
            resume, i = argv[i + 1], i + 2
        elif argv[i].startswith("--resume="):
            resume, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return resume, rest


def with_resume(args_cls: type, default: Any, resume: str | None) -> Any:
    """``default`` (a config) as an instance of ``args_cls``, its subclass with a ``resume``
    field."""
    return args_cls(
        **{f.name: getattr(default, f.name) for f in dataclasses.fields(default)}, resume=resume
    )


def strip_resume(config_cls: type, args: Any) -> Any:
    """The plain config of parsed ``args`` (``resume`` dropped)."""
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that are the user's input or environment, reported as one line."""
    import gymnasium

    from textenv.agents.distributed import PeerFailed
    from textenv.agents.ppo import NonFiniteTraining
    from textenv.rewards import RewardError

    return (
        ValueError,
        OSError,
        ImportError,
        NotImplementedError,
        RewardError,
        NonFiniteTraining,
        PeerFailed,
        gymnasium.error.Error,
    )


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that prints results."""
    from textenv.agents.distributed import env_rank

    return env_rank() in (None, 0)


def _where() -> str:
    """``"rank N: "`` in a torchrun worker (its errors name it), else nothing."""
    from textenv.agents.distributed import env_rank

    rank = env_rank()
    return "" if rank is None else f"rank {rank}: "


def run_cli(body: Callable[[], int]) -> int:
    """Run ``body``; a failure of the user's input or environment prints one line (no
    traceback) and returns 2, any other exception (a bug) its traceback and then that line;
    a stop by signal returns 128 + its number. ``TEXTENV_TRACEBACK=1`` re-raises."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(
            signal.SIGINT, signal.default_int_handler
        )  # from here on, Ctrl-C is KeyboardInterrupt
    try:
        return body()
    except TrainingInterrupted as stop:
        if is_main_process():
            print(f"interrupted: {stop}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except StoppedNow as stop:
        print(
            "stopped at once; the last checkpoint written (if any) is intact",
            file=sys.stderr,
            flush=True,
        )
        return 128 + stop.args[0]
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - the one place errors become a line and an exit code
        if os.environ.get(TRACEBACK_ENV):
            raise
        if isinstance(err, expected_errors()):
            print(f"error: {_where()}{err}", file=sys.stderr, flush=True)
        else:  # a bug: where it came from is what a report needs
            traceback.print_exc(file=sys.stderr)
            print(
                f"error: {_where()}{type(err).__name__}: {err} (a bug: the traceback is above)",
                file=sys.stderr,
                flush=True,
            )
        return 2
