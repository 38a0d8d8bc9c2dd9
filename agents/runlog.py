"""Run directory, metric logs (JSONL + TensorBoard) and atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and rename, so a crash never leaves half a
    file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(
            fd, 0o666 & ~_umask()
        )  # mkstemp makes 0600; a run's files get the user's usual mode
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """Fail early, with a line naming ``flag``, when ``path`` cannot hold run directories (it is a
    file, or a directory that cannot be written); creates it if missing."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-", delete=True)
        probe.close()
    except FileExistsError:
        raise ValueError(f"{flag} {str(path)!r} is not a directory") from None
    except OSError as err:
        raise ValueError(
            f"{flag} {str(path)!r} is not a writable directory ({err.strerror})"
        ) from None


def make_run_dir(root: str | os.PathLike, name: str | None, prefix: str) -> Path:
    """A fresh run directory: ``root/name`` (refused if it already holds a run), or
    ``root/<prefix>__<date-time>`` made unique even for runs started in the same second."""
    root = Path(root)
    if name is not None:
        run_dir = root / name
        # A run that failed before its first iteration left only its config: the name is free.
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.stat().st_size > 0:
            raise ValueError(
                f"run directory {str(run_dir)!r} already holds a run; choose another --run-name"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    root.mkdir(parents=True, exist_ok=True)
    # Env ids may hold a namespace ("textenv/Toy-v0"): the slash would make a subfolder.
    base = f"{prefix.replace('/', '-')}__{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        run_dir = root / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir()  # atomic: the loser of a race moves on to the next name
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory under {root}")


def rewind_jsonl(path: Path, last_iteration: int) -> None:
    """Keep the rows of ``path`` up to ``last_iteration`` (their ``"iteration"``), before the
    first row that does not parse (a write cut short by a kill); rewritten atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith("\n") or row.get("iteration", 0) > last_iteration:
            break
        kept.append(line)
    atomic_write_text(path, "".join(kept))


class RunLogger:
    """One line of JSON per iteration in ``metrics.jsonl`` plus TensorBoard scalars.

    The JSONL file is appended and flushed each call, so a killed run keeps every line it
    logged; TensorBoard is optional because importing it costs about a second.

    ``resumed_at=(iteration, step)``: the checkpoint a resumed run starts from. What was logged
    after it (by a run killed before its next checkpoint) is dropped from the JSONL files and
    purged from TensorBoard, so the resumed run logs those iterations once.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard: bool = True,
        resumed_at: tuple[int, int] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None:
            for name in ("metrics.jsonl", "samples.jsonl"):
                rewind_jsonl(self.run_dir / name, resumed_at[0])
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resumed_at[1] + 1 if resumed_at is not None else None
            self._writer = SummaryWriter(str(self.run_dir), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"global_step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)

    def samples(
        self, step: int, prompts: list[str], responses: list[str], scores: list[float]
    ) -> None:
        """Append prompt/response/score rows to ``samples.jsonl``."""
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for p, r, s in zip(prompts, responses, scores, strict=True):
                f.write(
                    json.dumps({"iteration": step, "prompt": p, "response": r, "score": s}) + "\n"
                )

    def text(self, tag: str, text: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
