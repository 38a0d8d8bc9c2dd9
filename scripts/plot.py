"""Learning curves of runs to PNG: ``python -m scripts.plot runs/A__1 runs/A__2 runs/B__1 -o curves.png``.

Runs are grouped by the name before their ``__<seed>`` suffix (or by ``--labels``); each
group is drawn as the mean over its seeds with the min-max band, on a common step grid.
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


@dataclass
class PlotConfig:
    """Plot a metric of one or more runs (mean ± spread over seeds) to a PNG."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """run directories (each with metrics.jsonl)"""
    output: Annotated[str, tyro.conf.arg(aliases=("-o",))] = "curves.png"
    """PNG file to write"""
    metric: str = "episodic_return"
    """metric of metrics.jsonl to plot against global_step"""
    title: str | None = None
    """figure title (default: the metric)"""


def read_curve(run_dir: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    steps, values = [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if metric in row and row[metric] is not None:
                steps.append(row["global_step"])
                values.append(row[metric])
    if not steps:
        raise ValueError(f"{path} has no values of metric {metric!r}")
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def group_name(run_dir: Path) -> str:
    return run_dir.name.split("__")[0] if "__" in run_dir.name else run_dir.name


def plot_groups(groups: dict[str, list[tuple[np.ndarray, np.ndarray]]], output: str, metric: str, title: str | None) -> None:
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
    ax.set_xlabel("environment steps")
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
    args = tyro.cli(PlotConfig, args=argv)
    groups: dict[str, list] = defaultdict(list)
    try:
        for run in args.runs:
            groups[group_name(Path(run))].append(read_curve(Path(run), args.metric))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plot_groups(groups, args.output, args.metric, args.title)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
