"""The command-line programs (``textenv-train``, ``textenv-train-text``, ``textenv-evaluate``,
``textenv-plot``; ``python -m scripts.<name>`` from a clone)."""

import os
import signal
import sys
import threading


def _quiet_exit(_signum, _frame) -> None:
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


def _started_as_a_program() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (spec is not None and spec.name.startswith("scripts.")) or os.path.basename(
        sys.argv[0]
    ).startswith("textenv-")


# Ctrl-C while a program imports torch and transformers exits quietly, with nothing to save;
# run_cli puts Python's own handler back as soon as the program starts. Imported as a library,
# nothing changes.
if (
    _started_as_a_program()
    and threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
):
    signal.signal(signal.SIGINT, _quiet_exit)
