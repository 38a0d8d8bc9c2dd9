"""What every CLI shares (`agents/cli/_common.py`): `--resume` split off before tyro, and the
one exit path (a line on stderr; 2 for a failure, 128 + the signal for a stop)."""

import signal
import subprocess
import sys
import threading

import pytest

from textenv.agents.checkpoint import StoppedNow, TrainingInterrupted
from textenv.agents.cli._common import TRACEBACK_ENV, pop_resume, run_cli


@pytest.mark.parametrize(
    "argv, resume, rest",
    [
        (["--resume", "runs/a", "--seed", "2"], "runs/a", ["--seed", "2"]),
        (
            ["--seed", "2", "--resume=runs/a=b"],
            "runs/a=b",
            ["--seed", "2"],
        ),  # only the first "=" separates
        (["--resume=x", "--resume", "y"], "y", []),  # the last one wins
        (
            ["--seed", "--resume"],
            None,
            ["--seed", "--resume"],
        ),  # no directory after it: tyro reports it
        (["--resume", "d"], "d", []),
        ([], None, []),
    ],
)
def test_pop_resume_splits_resume_off_the_arguments(argv, resume, rest):
    assert pop_resume(argv) == (resume, rest)


def _raise(err):
    def body():
        raise err

    return body


@pytest.mark.parametrize(
    "err, code, line",
    [
        (
            TrainingInterrupted(signal.SIGTERM, "ckpt", "runs/r", 64),
            128 + signal.SIGTERM,
            "interrupted: SIGTERM at step 64: checkpoint written to ckpt; continue with --resume runs/r",
        ),
        (
            StoppedNow(int(signal.SIGINT)),
            128 + signal.SIGINT,
            "stopped at once; the last checkpoint written (if any) is intact",
        ),
        (KeyboardInterrupt(), 130, "interrupted"),
        (ValueError("num_envs must be >= 1, got 0"), 2, "error: num_envs must be >= 1, got 0"),
    ],
)
def test_run_cli_turns_each_ending_into_one_line_and_an_exit_code(
    err, code, line, capsys, monkeypatch
):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert run_cli(_raise(err)) == code
    assert capsys.readouterr().err == line + "\n"


def test_a_bug_prints_its_traceback_and_then_one_line(capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert run_cli(_raise(RuntimeError("boom"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in body" in err
    assert err.endswith("error: RuntimeError: boom (a bug: the traceback is above)\n")


def test_a_torchrun_workers_errors_name_its_rank_and_only_rank_0_reports_a_stop(
    capsys, monkeypatch
):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_cli(_raise(ValueError("bad"))) == 2
    assert capsys.readouterr().err == "error: rank 1: bad\n"
    assert run_cli(_raise(TrainingInterrupted(signal.SIGINT, "c", "r", 1))) == 128 + signal.SIGINT
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert run_cli(_raise(TrainingInterrupted(signal.SIGINT, "c", "r", 1))) == 128 + signal.SIGINT
    assert capsys.readouterr().err.startswith("interrupted: SIGINT at step 1")


def test_exits_and_traceback_requests_pass_through_and_success_returns_the_bodys_code(monkeypatch):
    with pytest.raises(SystemExit):
        run_cli(_raise(SystemExit(2)))
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(RuntimeError, match="boom"):
        run_cli(_raise(RuntimeError("boom")))
    assert run_cli(lambda: 0) == 0 and run_cli(lambda: 3) == 3


def test_ctrl_c_becomes_keyboard_interrupt_in_the_main_thread_and_other_threads_are_left_alone():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_cli(lambda: 0)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        codes = []
        worker = threading.Thread(
            target=lambda: codes.append(run_cli(lambda: 0))
        )  # signal.signal would raise there
        worker.start()
        worker.join()
        assert codes == [0] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_importing_the_programs_installs_no_signal_handler():
    # Only calling an entry point sets the quiet Ctrl-C of start-up; an import, as a library
    # user's or under a program's name, leaves the interpreter's handler alone.
    code = (
        "import signal, sys; sys.argv[0] = 'textenv-train-text'; "
        "import textenv.agents.cli, textenv.agents.cli.launch, textenv.agents.cli.train_text; "
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
