"""``python -m tests.torchrun_main MODULE ARGS...``: ``MODULE``'s ``main(ARGS)``, as ``torchrun -m
MODULE ARGS`` runs it, then one stderr line naming the threads still alive in the process
(Linux), so that the tests can check that no process group outlives a run."""

import importlib
import json
import os
import sys

THREADS_LINE = "threads left after main:"


def thread_names() -> list[str]:
    tasks = "/proc/self/task"
    names = []
    for tid in sorted(os.listdir(tasks)):
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended while listed
            pass
    return names


def report_threads(fd: int = 2) -> None:
    """The threads line, in one write: the ranks share stderr unbuffered, and print's pieces
    interleave between them into lines that hold two reports."""
    sys.stderr.flush()
    os.write(fd, f"{THREADS_LINE} {json.dumps(thread_names())}\n".encode())


if __name__ == "__main__":
    code = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
    if os.path.isdir("/proc/self/task"):
        report_threads()
    sys.exit(code)
