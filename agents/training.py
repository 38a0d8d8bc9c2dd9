"""The plumbing every trainer shares, written once: seeding, the learning-rate schedule, the
run directory and its logs, SIGINT/SIGTERM, the non-finite guard, checkpoint-on-failure and
the summary. The trainers (:mod:`textenv.agents.classic`, :mod:`textenv.agents.text`) keep only
their loops.

Imports torch and the standard library only: a classic run never loads the language-model stack.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textenv.agents.checkpoint import StopSignals, TrainingInterrupted
from textenv.agents.distributed import Dist
from textenv.agents.ppo import NonFiniteGuard, NonFiniteTraining
from textenv.agents.runlog import RunLogger, atomic_write_json, make_run_dir


def seed_everything(seed: int) -> None:
    """Seed every global RNG a trainer or an env may draw from: Python's, NumPy's and torch's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass
class LinearLR:
    """Linear decay of the learning rate to 0, CleanRL's and TRL's default, made resumable.

    ``rate(i)`` for iteration ``i`` (1-based) is ``lr_a · (1 − (i − a) / (horizon + 1 − a))``:
    a straight line from ``lr_a`` at the anchor iteration ``a`` to 0 just past the last
    iteration. A fresh run anchors at ``(1, learning_rate)``, i.e. CleanRL's
    ``lr · (1 − (i − 1) / iterations)``.

    What resuming means (:meth:`resumed`): with the same horizon and base rate, the schedule
    is the uninterrupted one, bit for bit. With another horizon (``--iterations`` or
    ``--total-timesteps`` changed), the decay continues from the rate of the last finished
    iteration in a straight line to 0 at the new end, so the rate never jumps. With another
    base learning rate, the decay restarts from that rate at the next iteration.
    """

    learning_rate: float
    horizon: int
    anchor_iteration: int = 1
    anchor_rate: float | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.anchor_rate is None:
            self.anchor_rate = self.learning_rate

    def rate(self, iteration: int) -> float:
        if not self.enabled:
            return self.learning_rate
        a = self.anchor_iteration
        assert self.anchor_rate is not None  # __post_init__ set it
        return self.anchor_rate * (1.0 - (iteration - a) / (self.horizon + 1.0 - a))

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        lr = self.rate(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def resumed(
        cls,
        saved: dict[str, Any],
        last_iteration: int,
        learning_rate: float,
        horizon: int,
        enabled: bool = True,
    ) -> LinearLR:
        """The schedule that continues ``saved`` after ``last_iteration`` with the new settings."""
        old = cls(**saved)
        if not enabled:
            return cls(learning_rate, horizon, enabled=False)
        if learning_rate != old.learning_rate:
            return cls(
                learning_rate,
                horizon,
                anchor_iteration=last_iteration + 1,
                anchor_rate=learning_rate,
            )
        if horizon == old.horizon and old.enabled:
            return old
        rate = old.rate(last_iteration) if old.enabled else learning_rate
        return cls(learning_rate, horizon, anchor_iteration=last_iteration, anchor_rate=rate)


def summary_json(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with NaN and inf as None, so it is valid JSON for every reader."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in summary.items()
    }


def summary_line(summary: dict[str, Any]) -> str:
    """The summary as one JSON line (the last line the train scripts print)."""
    return json.dumps(summary_json(summary))


class TrainingRun:
    """A run directory with its config, metric log and summary, and the safety around the loop.

    ``checkpoint(iteration)`` (given by the trainer) saves everything needed to resume; the
    run calls it at interruptions and after a recoverable failure, so the last good state is
    never lost.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool,
        checkpoint: Callable[[int], Path],
        recoverable: tuple[type[BaseException], ...] = (),
        dist: Dist | None = None,
        resumed_at: tuple[int, int] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.dist = dist or Dist()
        # Rank 0 alone writes; the other ranks of a distributed run log nothing.
        self.logger: RunLogger | _NullLogger = (
            RunLogger(self.run_dir, tensorboard=tensorboard, resumed_at=resumed_at)
            if self.dist.is_main
            else _NullLogger()
        )
        self.guard = NonFiniteGuard()
        self.checkpoint = checkpoint
        self.recoverable: tuple[type[BaseException], ...] = (NonFiniteTraining, *recoverable)
        self.last_iteration = 0  # the last iteration whose update completed
        self._stop: StopSignals | None = None

    @staticmethod
    def directory(
        runs_dir: str,
        run_name: str | None,
        prefix: str,
        config: Any,
        resume: str | Path | None,
        dist: Dist | None = None,
    ) -> Path:
        """The run directory: ``resume`` itself, or a fresh one holding ``config.json`` (made by
        rank 0 and named to every rank)."""
        if resume is not None:
            return Path(resume)
        dist = dist or Dist()
        run_dir = None
        if dist.is_main:
            run_dir = make_run_dir(runs_dir, run_name, prefix)
            atomic_write_json(run_dir / "config.json", dataclasses.asdict(config))
        return Path(dist.gather(str(run_dir))[0])

    @contextmanager
    def loop(self, save_on_failure: bool = True) -> Iterator[TrainingRun]:
        """Around the training loop: SIGINT/SIGTERM are recorded (see :meth:`end_iteration`);
        a recoverable failure (a reward that raised, updates that stayed non-finite) saves the
        last good state and re-raises with where it is."""
        self._stop = StopSignals().__enter__()
        try:
            yield self
        except self.recoverable as err:
            self.logger.close()
            # Several processes: a failure ends every rank at once (the others cannot join a
            # checkpoint's collectives); the last periodic checkpoint is the state to resume.
            if not save_on_failure or self.last_iteration < 1 or self.dist.world_size > 1:
                raise
            path = self.checkpoint(self.last_iteration)
            raise type(err)(
                f"{err}; the last good state (iteration {self.last_iteration}) is saved in {path}, "
                f"continue with --resume {self.run_dir}"
            ) from None
        finally:
            self._stop.__exit__()

    def end_iteration(
        self, iteration: int, step: int, metrics: dict[str, float], where: str
    ) -> None:
        """Log the iteration, stop on a streak of non-finite updates, and on a received signal
        checkpoint and raise :class:`TrainingInterrupted`."""
        self.logger.log(step, metrics)
        # An iteration whose updates were all skipped left the parameters as they were: it is a
        # good state to save, and counting it keeps a resumed run from logging it twice.
        self.last_iteration = iteration
        self.guard.check(metrics, where)
        received = self._stop.received if self._stop is not None else None
        if self.dist.active:  # every rank stops at the same iteration, whichever got the signal
            flag = torch.tensor([float(received or 0)])
            received = int(self.dist.all_reduce(flag, op="max").item()) or None
        if received is not None:
            path = self.checkpoint(iteration)
            self.logger.close()
            raise TrainingInterrupted(received, path, self.run_dir, step)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` (NaN as null) and close the logs."""
        summary = summary_json(summary)
        if self.dist.is_main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        self.logger.close()
        return summary


def resumed_world_note(saved_world: int, dist: Dist) -> str | None:
    """What resuming a run made by ``saved_world`` processes with another number means (None:
    the same number)."""
    if saved_world == dist.world_size:
        return None
    return (
        f"note: this run was trained by {saved_world} process(es) and resumes with "
        f"{dist.world_size}: the parameters, optimizer, schedule and statistics continue; each "
        "rank's sampling and env streams start anew, so it is not the run the original process "
        "count would have made"
    )


class _NullLogger:
    """The logger of ranks other than 0: they compute the same global metrics and write none."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def samples(
        self, step: int, prompts: list[str], responses: list[str], scores: list[float]
    ) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass
