"""Training state for resuming: optimizer and RNG states as safetensors tensors + JSON metadata.

No pickle anywhere: tensors go to safetensors, everything else to JSON strings in its metadata.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
import torch


def pack_training_state(
    optimizer: torch.optim.Optimizer | None, generator: torch.Generator | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` holding the optimizer's state (None: none) and every RNG the
    trainers draw from.

    On CPU the optimizer's tensors are not copied (a model-sized saving): write them out before
    the optimizer steps again, as the trainers do."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    if optimizer is not None:
        opt = optimizer.state_dict()
        for idx, st in opt["state"].items():
            for key, value in st.items():
                tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        metadata["optim.param_groups"] = json.dumps(opt["param_groups"])
    tensors["rng.torch"] = torch.get_rng_state()
    if generator is not None:
        tensors["rng.generator"] = generator.get_state().cpu()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state(legacy=True)
    # The global RandomState's bit generator is an MT19937: its legacy state is a tuple.
    assert isinstance(np_state, tuple)
    tensors["rng.numpy.keys"] = torch.as_tensor(np_state[1].astype(np.int64))
    metadata["rng.numpy"] = json.dumps(
        [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]
    )
    metadata["rng.python"] = json.dumps(random.getstate(), default=list)
    return tensors, metadata


def unpack_training_state(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None,
    device: torch.device,
) -> None:
    """Load what :func:`pack_training_state` wrote into a live optimizer and the RNGs."""
    if "optim.param_groups" not in metadata:
        raise ValueError("the checkpoint holds no optimizer state; it cannot be resumed")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value if name == "step" else value.to(device)
    optimizer.load_state_dict(
        {"state": state, "param_groups": json.loads(metadata["optim.param_groups"])}
    )
    torch.set_rng_state(tensors["rng.torch"])
    if generator is not None and "rng.generator" in tensors:
        generator.set_state(tensors["rng.generator"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    name, pos, has_gauss, cached = json.loads(metadata["rng.numpy"])
    np.random.set_state(
        (name, tensors["rng.numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    )
    version, internal, gauss = json.loads(metadata["rng.python"])
    random.setstate((version, tuple(internal), gauss))


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped training at a safe point, after a checkpoint was written."""

    def __init__(self, signum: int, checkpoint: Any, run_dir: Any, step: int) -> None:
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        super().__init__(
            f"{signal.Signals(signum).name} at step {step}: checkpoint written to {checkpoint}; "
            f"continue with --resume {run_dir}"
        )


class StoppedNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once, without waiting for the end of the iteration.
    Checkpoints are written to a temporary path and renamed, so the last one stays intact."""


class StopSignals:
    """While active, the first SIGINT/SIGTERM is recorded instead of killing the process, so
    the trainer can stop at the end of an iteration with a checkpoint; a second one raises
    :class:`StoppedNow` at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._at = 0.0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            # Under torchrun, Ctrl-C reaches a worker twice: from the terminal and forwarded by
            # the launcher. That echo is not the user's second Ctrl-C.
            if (
                signum == self.received
                and os.environ.get("TORCHELASTIC_RUN_ID")
                and time.monotonic() - self._at < 2.0
            ):
                return
            raise StoppedNow(signum)
        self.received, self._at = signum, time.monotonic()
        key = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if os.environ.get("RANK", "0") != "0":  # one message per run, from rank 0
            return
        print(
            f"\n{signal.Signals(signum).name}: stopping after this iteration with a checkpoint "
            f"({key} again stops at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
