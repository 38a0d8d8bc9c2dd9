"""``--resume RUN_DIR`` for the train scripts, read before tyro so a run's own config is the default."""

from __future__ import annotations


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
