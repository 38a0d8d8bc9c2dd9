"""Learning curves of runs to PNG: ``textenv-plot runs/A__1 runs/A__2 runs/B__1 -o curves.png``
(``python -m scripts.plot`` from a clone).

Runs are grouped by the name before their ``__<seed>`` suffix; each group is drawn as the
mean over its seeds with the min-max band, on a common grid: environment steps for classic
runs (default metric ``episodic_return``), iterations for text runs (``score_mean``).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro

from textenv.agents.cli._common import run_cli


@dataclass
class PlotConfig:
    """Plot a metric of one or more runs (mean ± spread over seeds) to a PNG."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """run directories (each with metrics.jsonl)"""
    output: Annotated[str, tyro.conf.arg(aliases=("-o",))] = "curves.png"
    """PNG file to write"""
    metric: str | None = None
    """metric of metrics.jsonl to plot (default: episodic_return, or score_mean for text runs)"""
    title: str | None = None
    """figure title (default: the metric)"""


def is_text_run(run_dir: Path) -> bool:
    """A run of the text trainer (its config names a task), not of the classic one."""
    config = run_dir / "config.json"
    return config.is_file() and "task" in json.loads(config.read_text())


def read_curve(run_dir: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    steps, values = [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if metric in row and row[metric] is not None:
                steps.append(row["global_step"])  # the iteration, in a text run
                values.append(row[metric])
    if not steps:
        raise ValueError(f"{path} has no values of metric {metric!r}")
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def group_name(run_dir: Path) -> str:
    return run_dir.name.split("__")[0] if "__" in run_dir.name else run_dir.name


def plot_groups(
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]],
    output: str,
    metric: str,
    title: str | None,
    xlabel: str = "environment steps",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curves in groups.items():
        end = min(steps[-1] for steps, _ in curves)
        grid = np.linspace(0, end, 200)
        ys = np.stack([np.interp(grid, steps, values) for steps, values in curves])
        mean = ys.mean(0)
        ax.plot(grid, mean, label=f"{label} (n={len(curves)})")
        ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.25)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(output).with_name(f".{Path(output).name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(output)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = tyro.cli(PlotConfig, args=argv)
        folder = Path(args.output).resolve().parent
        if not folder.is_dir():
            raise ValueError(f"-o {args.output}: the folder {str(folder)!r} does not exist")
        runs = [Path(run) for run in args.runs]
        text = {is_text_run(run) for run in runs}
        if len(text) > 1:
            raise ValueError(
                "mix of text and classic runs: their x-axes (iterations, steps) differ; "
                "plot them apart"
            )
        text_runs = text == {True}
        metric = args.metric or ("score_mean" if text_runs else "episodic_return")
        groups: dict[str, list] = defaultdict(list)
        for run in runs:
            groups[group_name(run)].append(read_curve(run, metric))
        plot_groups(
            groups,
            args.output,
            metric,
            args.title,
            "iterations" if text_runs else "environment steps",
        )
        print(args.output)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
