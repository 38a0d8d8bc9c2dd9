"""Reward-model over-optimisation (Gao et al., 2022), offline: the whole RLHF loop with a gold
reward standing in for people.

1. **Pairs**: the embedded model answers the ``RewardModel`` task's training instructions twice;
   VADER's compound sentiment (the gold reward: "people prefer the warmer answer") labels each
   pair (``textenv-make-pairs``). The last ``--test-pairs`` pairs are the proxies' test set.
2. **Proxies**: one Bradley-Terry reward model per ``--pair-counts`` entry, each trained on the
   first N pairs (``textenv-train-rm``, the embedded model as backbone), its accuracy measured
   on the test pairs through the env's own scorer (``ClassifierReward``).
3. **PPO against each proxy**: ``--task RewardModel --reward-model <proxy>``, a small KL
   coefficient so the policy drifts far, ``--eval-every`` held-out evaluations that score the
   proxy, the gold (``--eval-rewards vader``) and the KL to the reference on the same held-out
   responses, ``--seeds`` seeds per proxy.

The table and plot put the gold and the proxy score against KL. The pairs and reward models go to
``--workdir`` (not committed); each PPO run's record to ``results/raw/overoptimisation.*.json``
and the report is rendered from every record there (``--render-only``).

    python -m benchmarks.overoptimisation
    python -m benchmarks.overoptimisation --pair-counts 1024 --seeds 1 --iterations 36 \
        --out benchmarks/results/overoptimisation_long.md   # past the default run's end
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tyro

from benchmarks.estimators import run_train_text
from textenv.agents.runlog import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GOLD = "vader"
MAX_NEW_TOKENS = 16
ITERATIONS = 18
PPO = [
    "--task",
    "RewardModel",
    "--model",
    "embedded",
    "--max-new-tokens",
    str(MAX_NEW_TOKENS),
    "--iterations",
    str(ITERATIONS),
    "--num-envs",
    "16",
    "--learning-rate",
    "1e-4",
    "--kl-coef",
    "0.02",
    "--eval-samples",
    "128",
    "--eval-every",
    "3",
    "--eval-rewards",
    GOLD,
    "--num-minibatches",
    "4",
    "--torch-threads",
    "1",
    "--sample-every",
    "12",
    "--no-tensorboard",
    "--no-progress",
    "--no-save-checkpoint",
]


@dataclass
class Args:
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """PPO seeds per proxy"""
    iterations: int = ITERATIONS
    """PPO iterations of each run (other than the default: records and run names of their own,
    and a report of its own at --out)"""
    pair_counts: tuple[int, ...] = (128, 1024)
    """training pairs of each proxy reward model (the first N of one labelled set)"""
    rm_epochs: int = 3
    """passes of each proxy over its pairs"""
    rm_learning_rate: float = 5e-5
    """each proxy's AdamW learning rate"""
    test_pairs: int = 256
    """pairs after the largest training set, held out to measure each proxy's accuracy"""
    jobs: int = 2
    """PPO runs at once (each uses one torch thread)"""
    workdir: str = "runs/overoptimisation"
    """where the pairs, the proxies and the PPO runs go (kept, so a rerun reuses them)"""
    render_only: bool = False
    """re-render the report from results/raw without training"""
    out: str = "benchmarks/results/overoptimisation.md"
    """markdown to write (the plot goes beside it as .png)"""


def _python(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", module, *flags]


def _check_call(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[2:4])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def make_proxies(args: Args, work: Path) -> list[dict]:
    """The labelled pairs and one proxy per pair count (reused when already there)."""
    pairs = work / "pairs.jsonl"
    total = max(args.pair_counts) + args.test_pairs
    if not pairs.is_file() or len(pairs.read_text().splitlines()) != total:
        print(f"sampling {total} pairs labelled by {GOLD} ...", flush=True)
        _check_call(
            _python(
                "scripts.make_pairs",
                *("--gold", GOLD, "--prompts", "RewardModel", "--split", "train"),
                *("--num-pairs", str(total), "--max-new-tokens", str(MAX_NEW_TOKENS)),
                *("--output", str(pairs), "--seed", "0", "--no-progress"),
            )
        )
    lines = pairs.read_text().splitlines()
    test = [json.loads(x) for x in lines[-args.test_pairs :]]
    proxies = []
    for n in args.pair_counts:
        out = work / f"rm-{n}-ep{args.rm_epochs}-lr{args.rm_learning_rate:g}"
        if not (out / "config.json").is_file():
            subset = work / f"pairs-{n}.jsonl"
            subset.write_text("\n".join(lines[:n]) + "\n")
            print(f"training the proxy on {n} pairs ...", flush=True)
            _check_call(
                _python(
                    "scripts.train_rm",
                    *("--pairs", str(subset), "--output", str(out), "--eval-fraction", "0"),
                    *("--epochs", str(args.rm_epochs)),
                    *("--learning-rate", str(args.rm_learning_rate)),
                    *("--no-progress", "--no-tensorboard", "--no-keep-checkpoint"),
                )
            )
        recipe = {"epochs": args.rm_epochs, "learning_rate": args.rm_learning_rate}
        proxies.append(
            {"pairs": n, "path": str(out), "test_accuracy": accuracy(out, test), "recipe": recipe}
        )
        print(f"proxy on {n} pairs: test accuracy {proxies[-1]['test_accuracy']:.3f}", flush=True)
    return proxies


def accuracy(proxy: Path, test: list[dict]) -> float:
    """The share of test pairs whose gold-chosen response the proxy scores higher, scored as the
    env scores (prompt + response through ``ClassifierReward``)."""
    from textenv.rewards import ClassifierReward, score_batch

    reward = ClassifierReward(str(proxy))
    prompts = [p["prompt"] for p in test]
    chosen = score_batch(reward, prompts, [p["chosen"] for p in test])
    rejected = score_batch(reward, prompts, [p["rejected"] for p in test])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(test)


def ppo_flags(iterations: int) -> list[str]:
    flags = list(PPO)
    flags[flags.index("--iterations") + 1] = str(iterations)
    return flags


def _suffix(iterations: int) -> str:
    return "" if iterations == ITERATIONS else f"-it{iterations}"


def raw_path(pairs: int, seed: int, iterations: int = ITERATIONS) -> Path:
    return RESULTS / "raw" / f"overoptimisation.rm{pairs}-{seed}{_suffix(iterations)}.json"


def run_ppo(proxy: dict, seed: int, iterations: int, work: Path, commit: str) -> dict:
    name = f"ppo-rm{proxy['pairs']}-{seed}{_suffix(iterations)}"
    flags = ppo_flags(iterations)
    runs = work / "ppo"
    shutil.rmtree(runs / name, ignore_errors=True)  # a run cut short before: this one starts over
    cmd = _python(
        "scripts.train_text",
        *flags,
        *("--reward-model", proxy["path"], "--seed", str(seed)),
        *("--runs-dir", str(runs), "--run-name", name),
    )
    result = run_train_text(cmd, str(runs), name)
    s = result["summary"]
    points = [
        {"iteration": 0, "kl": 0.0, "proxy": s["eval_score_before"], "gold": s["eval_vader_before"]}
    ] + [
        {
            "iteration": m["iteration"],
            "kl": m["eval_kl"],
            "proxy": m["eval_score"],
            "gold": m["eval_vader"],
        }
        for m in result["metrics"]
        if "eval_score" in m
    ]
    record = {
        "proxy_pairs": proxy["pairs"],
        "proxy_test_accuracy": proxy["test_accuracy"],
        "proxy_recipe": proxy["recipe"],
        "seed": seed,
        "points": points,
        "train_kl_last": s["kl_last"],
        "training_s": s["wall_time_s"],
        "flags": flags,
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    raw = raw_path(proxy["pairs"], seed, iterations)
    raw.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(raw, json.dumps(record, indent=1) + "\n")
    return record


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 / n**0.5


def render(records: list[dict], out: Path, command: str) -> None:
    flags = records[0]["flags"]
    counts = sorted({r["proxy_pairs"] for r in records})
    recipe = records[0]["proxy_recipe"]
    samples = flags[flags.index("--eval-samples") + 1]
    lines = [
        "# Reward-model over-optimisation, offline",
        "",
        f"`{command}` (this file, the plot beside it and `results/raw/overoptimisation.*.json`).",
        "",
        f"Gold reward: VADER compound sentiment of the response ({GOLD}, in [-1, 1]). Proxies: "
        "Bradley-Terry reward models on the embedded model (SmolLM2-135M), trained on the first "
        "N of one set of gold-labelled pairs of the embedded model's own answers to the "
        f"RewardModel task's training instructions ({recipe['epochs']} epochs at learning rate "
        f"{recipe['learning_rate']:g}, `textenv-train-rm`'s defaults otherwise). PPO: "
        f"`{' '.join(flags)}`. Every evaluation samples {samples} responses on the held-out prompts "
        "with the same noise and scores the responses with the proxy (the training reward) and the gold; KL is "
        "the policy's to the reference, nats per response (k1).",
        "",
        "| proxy pairs | proxy test accuracy | iteration | KL | proxy score | gold score |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n in counts:
        runs = sorted((r for r in records if r["proxy_pairs"] == n), key=lambda r: r["seed"])
        acc = runs[0]["proxy_test_accuracy"]
        for i, point in enumerate(runs[0]["points"]):
            cells = []
            for key in ("kl", "proxy", "gold"):
                mean, se = _mean_se([r["points"][i][key] for r in runs])
                cells.append(f"{mean:.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}"))
            lines.append(f"| {n} | {acc:.3f} | {point['iteration']} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± standard error over seeds {sorted({r['seed'] for r in records})}.", ""]
    lines += ["## Per seed: does the gold score peak and fall?", ""]
    lines += [
        "| proxy pairs | seed | gold before | gold peak (KL) | gold last (KL) | proxy before → last |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(records, key=lambda r: (r["proxy_pairs"], r["seed"])):
        p = r["points"]
        peak = max(p, key=lambda x: x["gold"])
        lines.append(
            f"| {r['proxy_pairs']} | {r['seed']} | {p[0]['gold']:.3f} | {peak['gold']:.3f} "
            f"({peak['kl']:.1f}) | {p[-1]['gold']:.3f} ({p[-1]['kl']:.1f}) | "
            f"{p[0]['proxy']:.3f} → {p[-1]['proxy']:.3f} |"
        )
    commits = sorted({r["commit"] for r in records})
    seconds = [r["training_s"] for r in records]
    lines += [
        "",
        f"Commit {', '.join(commits)}; {records[0]['machine']}; {min(seconds):.0f}-"
        f"{max(seconds):.0f} s of training per run, {len(records)} runs, one torch thread each "
        "(`--jobs` runs at a time, and the times depend on what else ran).",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines))
    plot(records, out.with_suffix(".png"))


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, n in enumerate(sorted({r["proxy_pairs"] for r in records})):
        runs = [r for r in records if r["proxy_pairs"] == n]
        for ax, key in zip(axes, ("gold", "proxy"), strict=True):
            for j, r in enumerate(runs):
                ax.plot(
                    [p["kl"] for p in r["points"]],
                    [p[key] for p in r["points"]],
                    "o-",
                    color=colors[c],
                    alpha=0.7,
                    label=f"proxy on {n} pairs (test acc. {r['proxy_test_accuracy']:.2f})"
                    if j == 0
                    else None,
                )
    for ax, title in zip(
        axes, ("gold score (VADER)", "proxy score (its reward model)"), strict=True
    ):
        ax.set_xlabel("KL to the reference (nats per response)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args) -> None:
    out = ROOT / args.out
    if not args.render_only:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        proxies = make_proxies(args, work)
        # Seed by seed, both proxies: a run cut short leaves the proxies equally covered.
        jobs = [(proxy, seed) for seed in args.seeds for proxy in proxies]
        with ThreadPoolExecutor(args.jobs) as pool:
            for r in pool.map(lambda j: run_ppo(j[0], j[1], args.iterations, work, commit), jobs):
                last = r["points"][-1]
                print(
                    f"rm{r['proxy_pairs']} seed {r['seed']}: gold {r['points'][0]['gold']:.3f} "
                    f"-> {last['gold']:.3f}, proxy -> {last['proxy']:.3f}, KL {last['kl']:.2f}",
                    flush=True,
                )
    raw = sorted((RESULTS / "raw").glob("overoptimisation.*.json"))
    # Records of other PPO settings (an earlier version of this benchmark) are left out.
    flags = ppo_flags(args.iterations)
    records = [r for r in (json.loads(p.read_text()) for p in raw) if r["flags"] == flags]
    if not records:
        raise SystemExit("error: no records in benchmarks/results/raw/overoptimisation.*.json")
    command = " ".join(["python -m benchmarks.overoptimisation", *sys.argv[1:]])
    render(records, out, command.replace(" --render-only", ""))
    print(f"wrote {out.relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
