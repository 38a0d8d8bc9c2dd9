"""Learning on verifiable rewards: PPO-GAE and GRPO on tasks where the embedded model succeeds
sometimes, several seeds, held-out scores before and after.

    python -m benchmarks.verifiable --tasks Instructions --seeds 1 2 3 --jobs 2
    # merges into benchmarks/results/verifiable.json; writes verifiable.{md,png}

Each run is ``scripts.train_text`` with the task's preset (``PRESETS``), ``--advantage E``, one
torch thread, in its own process. GAE samples ``num_envs`` prompts x 1 response; GRPO
``num_envs / GROUP`` prompts x ``GROUP`` responses: the same responses and token budget per
iteration for both. Held-out: responses on prompts never trained on (every 5th; for games the
held-out episodes), the same prompts and sampling noise before and after, so ``before`` is the
base rate. The configurations come from ``benchmarks.base_rates`` (base rate 10-50%).

Runs take up to an hour each on a 2-core CPU, so results accumulate: each finished run replaces
its ``(task, estimator, seed)`` record in ``verifiable.json`` (a list of ``{"task", "estimator",
"seed", "before", "after", ...}``, held-out mean scores in [0, 1]) and the report is rendered
from every record there; ``--render-only`` re-renders without training. Curves and transcripts
come from ``results/raw/verifiable.<task>-<estimator>-<seed>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks.base_rates import CANDIDATES
from benchmarks.estimators import run_train_text
from textenv.agents.runlog import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GROUP = 4
COMMON = [
    "--model",
    "embedded",
    "--num-minibatches",
    "4",
    "--torch-threads",
    "1",
    "--no-tensorboard",
    "--no-progress",
    "--no-save-checkpoint",
]
# reasoning-gym's basic_arithmetic at the configuration whose base rate is 0.121 (base_rates.md).
BASIC_ARITHMETIC = next(o for label, _, o, _ in CANDIDATES if label.startswith("basic_arithmetic"))
PRESETS: dict[str, list[str]] = {
    "Instructions": [
        "--task",
        "Instructions",
        "--iterations",
        "20",
        "--num-envs",
        "32",
        "--max-new-tokens",
        "48",
        "--learning-rate",
        "5e-5",
        "--kl-coef",
        "0.03",
        "--update-epochs",
        "1",
        "--eval-samples",
        "128",
        "--sample-every",
        "10",
    ],
    "RG-BasicArithmetic": [
        "--task",
        "ReasoningGym",
        "--task-options",
        json.dumps(BASIC_ARITHMETIC),
        "--iterations",
        "20",
        "--num-envs",
        "32",
        "--max-new-tokens",
        "8",
        "--learning-rate",
        "5e-5",
        "--kl-coef",
        "0.03",
        "--update-epochs",
        "1",
        "--eval-samples",
        "128",
        "--sample-every",
        "10",
    ],
    # A small step: 2e-4 with 4 epochs collapsed the policy in a pilot.
    "GuessTheNumber": [
        "--task",
        "GuessTheNumber",
        "--iterations",
        "16",
        "--num-envs",
        "16",
        "--learning-rate",
        "5e-5",
        "--kl-coef",
        "0.03",
        "--update-epochs",
        "1",
        "--eval-samples",
        "32",
        "--sample-every",
        "16",
    ],
}


@dataclass
class VerifiableConfig:
    """Train each (task, estimator, seed); merge the results into the JSON and render it."""

    tasks: tuple[str, ...] = ("Instructions",)
    """presets to run (see PRESETS)"""
    estimators: tuple[str, ...] = ("gae", "grpo")
    """values of --advantage"""
    seeds: tuple[int, ...] = (1, 2, 3)
    jobs: int = 2
    """runs at once (each uses one torch thread)"""
    render_only: bool = False
    """re-render the report from the JSON and raw files without training"""
    adopt: tuple[str, ...] = ()
    """finished run directories of this benchmark's exact command (started by hand, e.g. as a
    pilot) to record instead of running them again: their config must equal the preset's"""
    adopt_commit: str = ""
    """the commit the adopted runs ran (default: HEAD)"""
    json_out: str = "benchmarks/results/verifiable.json"
    out: str = "benchmarks/results/verifiable.md"
    """markdown to write (the plot goes beside it as .png)"""


def flags(task: str, estimator: str) -> list[str]:
    group = GROUP if estimator in ("grpo", "rloo") else 1
    return [*PRESETS[task], "--advantage", estimator, "--group-size", str(group)]


def raw_path(task: str, estimator: str, seed: int) -> Path:
    return RESULTS / "raw" / f"verifiable.{task}-{estimator}-{seed}.json"


def run(task: str, estimator: str, seed: int, runs_dir: str) -> dict:
    name = f"{task}-{estimator}-{seed}"
    cmd = [
        sys.executable,
        "-m",
        "scripts.train_text",
        *flags(task, estimator),
        *COMMON,
        "--seed",
        str(seed),
        "--runs-dir",
        runs_dir,
        "--run-name",
        name,
    ]
    result = run_train_text(cmd, runs_dir, name)
    samples_file = Path(runs_dir) / name / "samples.jsonl"
    result["samples"] = [json.loads(x) for x in samples_file.read_text().splitlines()]
    result["summary"].pop("run_dir", None)  # a temporary directory, gone by now
    return {"task": task, "estimator": estimator, "seed": seed, **result}


def adopt(run_dir: Path) -> dict:
    """A finished run directory as :func:`run` returns it, after checking that its settings are
    the preset's (settings the run's version did not have yet are left out of the check)."""
    from textenv.agents.cli.train_text import parse

    saved = json.loads((run_dir / "config.json").read_text())
    task, estimator, seed = saved["task"], saved["estimator"]["advantage"], saved["seed"]
    config, _ = parse([*flags(task, estimator), *COMMON, "--seed", str(seed)])
    expected = dataclasses.asdict(config)

    def differences(a: dict, b: dict, at: str = "") -> list[str]:
        out = []
        for key, value in a.items():
            if key in ("logging", "import_dir") or key not in b:
                continue  # where it was written; settings newer than the run
            if isinstance(value, dict):
                out += differences(value, b[key], f"{at}{key}.")
            elif value != b[key]:
                out.append(f"{at}{key}: {value!r} != the preset's {b[key]!r}")
        return out

    wrong = differences(saved, expected)
    if wrong:
        raise SystemExit(f"error: {run_dir} is not this benchmark's run: {wrong[0]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    read = lambda name: [json.loads(x) for x in (run_dir / name).read_text().splitlines()]  # noqa: E731
    summary.pop("run_dir", None)
    return {
        "task": task,
        "estimator": estimator,
        "seed": seed,
        "summary": summary,
        "metrics": read("metrics.jsonl"),
        "samples": read("samples.jsonl"),
        "adopted": str(run_dir),
    }


def record(r: dict, commit: str, command: str) -> dict:
    """The JSON record of a finished run."""
    s = r["summary"]
    return {
        "task": r["task"],
        "estimator": r["estimator"],
        "seed": r["seed"],
        "before": s["eval_score_before"],
        "after": s["eval_score_after"],
        "before_se": s["eval_score_before_se"],
        "after_se": s["eval_score_after_se"],
        "kl_after": s["eval_kl_after"],
        "training_s": s["wall_time_s"],
        "flags": flags(r["task"], r["estimator"]),
        "commit": commit,
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def merge(path: Path, new: list[dict]) -> list[dict]:
    """``path``'s records with ``new`` replacing those of the same (task, estimator, seed)."""
    key = lambda x: (x["task"], x["estimator"], x["seed"])  # noqa: E731
    old = json.loads(path.read_text()) if path.is_file() else []
    fresh = {key(x) for x in new}
    merged = [x for x in old if key(x) not in fresh] + new
    return sorted(merged, key=key)


def _mean_se(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return f"{mean:.3f}"
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return f"{mean:.3f} ± {sd / n**0.5:.3f}"


def _quote(text: str, limit: int = 500) -> str:
    text = text if len(text) <= limit else "…" + text[-limit:]
    return "\n".join("    " + line for line in text.splitlines())


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({x["task"] for x in records})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 3.8), squeeze=False)
    colors = {"gae": "tab:blue", "grpo": "tab:orange", "rloo": "tab:green"}
    for ax, task in zip(axes[0], tasks):
        for x in (x for x in records if x["task"] == task):
            raw = raw_path(task, x["estimator"], x["seed"])
            if not raw.is_file():
                continue
            m = json.loads(raw.read_text())["metrics"]
            color = colors.get(x["estimator"], "tab:gray")
            ax.plot(
                [p["iteration"] for p in m],
                [p["score_mean"] for p in m],
                color=color,
                alpha=0.6,
                lw=1,
                label=f"{x['estimator']} (training batch)" if x["seed"] == 1 else None,
            )
            ax.errorbar(
                [0, m[-1]["iteration"]],
                [x["before"], x["after"]],
                yerr=[x["before_se"], x["after_se"]],
                fmt="s--",
                color=color,
                ms=4,
                capsize=3,
                label=f"{x['estimator']} held-out ± SE" if x["seed"] == 1 else None,
            )
        ax.set(title=task, xlabel="iteration", ylabel="score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def render(records: list[dict], out: Path) -> str:
    lines = [
        "# Learning on verifiable rewards (embedded SmolLM2-135M-Instruct)",
        "",
        f"Results accumulate in `{out.with_suffix('.json').name}`; each record keeps the command, "
        "flags and commit it ran with. Commands:",
        "",
        *[f"- `{c}`" for c in dict.fromkeys(x["command"] for x in records)],
        "",
        f"Each run: `python -m scripts.train_text <preset> --advantage E --group-size G "
        f"{' '.join(COMMON)} --seed S` in its own process; G = {GROUP} for grpo (the same "
        "responses per iteration as gae's G = 1). `before` is the base rate: the untrained "
        "model on the held-out prompts; after uses the same prompts and sampling noise. Per "
        "(task, estimator): mean over seeds ± the standard error over seeds.",
        "",
        "| task | estimator | seeds | held-out before (base rate) | held-out after | "
        "after − before | KL to the reference after (nats) | training s per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = sorted({(x["task"], x["estimator"]) for x in records})
    for task, est in groups:
        rs = [x for x in records if x["task"] == task and x["estimator"] == est]
        lines.append(
            f"| {task} | {est} | {', '.join(str(x['seed']) for x in rs)} | "
            f"{_mean_se([x['before'] for x in rs])} | {_mean_se([x['after'] for x in rs])} | "
            f"{_mean_se([x['after'] - x['before'] for x in rs])} | "
            f"{_mean_se([x['kl_after'] for x in rs])} | "
            f"{sum(x['training_s'] for x in rs) / len(rs):.0f} |"
        )
    lines += [
        "",
        "## Per run (± the standard error over the held-out responses)",
        "",
        "| task | estimator | seed | before | after | KL after | training s | commit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in records:
        lines.append(
            f"| {x['task']} | {x['estimator']} | {x['seed']} | {x['before']:.3f} ± "
            f"{x['before_se']:.3f} | {x['after']:.3f} ± {x['after_se']:.3f} | "
            f"{x['kl_after']:.2f} | {x['training_s']:.0f} | {x['commit'][:8]} |"
        )
    lines += ["", "Presets:", ""]
    for task in sorted({x["task"] for x in records}):
        preset = next(x["flags"] for x in records if x["task"] == task)
        preset = preset[: preset.index("--advantage")]  # the estimator's flags are above
        lines.append(f"- {task}: `{' '.join(preset)}`")
    png = out.with_suffix(".png")
    if png.is_file():
        lines += ["", f"![training score per iteration and held-out before/after]({png.name})"]
    lines += ["", "## Sample responses (seed 1, last sampled iteration: best, then first)", ""]
    for x in records:
        raw = raw_path(x["task"], x["estimator"], x["seed"])
        if x["seed"] != 1 or not raw.is_file():
            continue
        samples = json.loads(raw.read_text()).get("samples", [])
        if not samples:
            continue
        last = max(s["iteration"] for s in samples)
        batch = [s for s in samples if s["iteration"] == last]
        best = max(batch, key=lambda s: s["score"])
        for s in [best, *[s for s in batch if s is not best][:1]]:
            lines += [
                f"**{x['task']}, {x['estimator']}, iteration {last}, score {s['score']:.3f}**",
                "",
                _quote(s["prompt"], 300),
                "    ──",
                _quote(s["response"]),
                "",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(VerifiableConfig, args=argv)
    unknown = [t for t in args.tasks if t not in PRESETS]
    if unknown:
        raise SystemExit(f"error: no preset for task {unknown[0]!r}; presets: {', '.join(PRESETS)}")
    json_path, out = ROOT / args.json_out, ROOT / args.out
    command = "python -m benchmarks.verifiable " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.render_only:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        jobs = [(t, e, s) for s in args.seeds for t in args.tasks for e in args.estimators]
        if args.adopt:
            jobs = []
            adopted = [adopt(Path(d)) for d in args.adopt]
            (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
            for r in adopted:
                atomic_write_text(
                    raw_path(r["task"], r["estimator"], r["seed"]), json.dumps(r) + "\n"
                )
                new = record(r, args.adopt_commit or commit, command)
                atomic_write_text(json_path, json.dumps(merge(json_path, [new]), indent=1) + "\n")
        (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as runs_dir, ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run, t, e, s, runs_dir) for t, e, s in jobs]:
                r = future.result()
                atomic_write_text(
                    raw_path(r["task"], r["estimator"], r["seed"]), json.dumps(r) + "\n"
                )
                new = record(r, commit, command)
                # Written after every run: a session that stops keeps what finished.
                atomic_write_text(json_path, json.dumps(merge(json_path, [new]), indent=1) + "\n")
                print(
                    f"{new['task']} {new['estimator']} seed {new['seed']}: held-out "
                    f"{new['before']:.3f} -> {new['after']:.3f}, {r['process_s']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    if not json_path.is_file():
        raise SystemExit(f"error: no results yet in {json_path}")
    records = json.loads(json_path.read_text())
    plot(records, out.with_suffix(".png"))
    text = render(records, out)
    atomic_write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
