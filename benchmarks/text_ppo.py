"""PPO iteration speed and memory: this project vs TRL's PPO trainer, plus bare ``generate``.

    pip install -e ".[bench]"          # trl==0.29.*: TRL 1.x dropped PPO; 0.29 ships it as trl.experimental.ppo
    python -m benchmarks.text_ppo --iterations 3

Same model (the embedded SmolLM2-135M by default), same sentiment prompts, batch, response
budget, PPO epochs and minibatches, fixed β, fp32 on CPU (bf16 on CUDA) on both sides. The
score comes from the same reward model on both sides: the model's own weights with a
seeded scalar head (``AutoModelForSequenceClassification``), because TRL's trainer only
takes a reward model of that kind. TRL also needs a separate value model (a second copy of
the backbone with a scalar head); this project puts the value head on the policy.

Each side runs in a child process of its own, one after the other, so its peak memory is
its own (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). Seconds per
iteration are the median over the timed iterations after ``warmup``. Rollout tokens/s
counts response tokens up to and including EOS; it is the whole rollout for this project
(sampling, reference log-probs, values and reward), TRL's ``generate`` call alone, and
``model.generate`` alone for the bare baseline. This project's rollout is also split: the
seconds in the reference's and the reward model's forward passes (timed around them) and
the rest, the policy's sampling through the env.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from textenv.agents.text import KLConfig, LMConfig, LoggingConfig

SIDES = ("textenv", "trl", "generate")


@dataclass
class TextPPOBenchConfig:
    """This project's PPO vs TRL's PPOTrainer vs bare generate, same model and batch."""

    model: str = "embedded"
    """policy, reference and reward-model backbone"""
    num_envs: int = 16
    """responses per iteration"""
    max_new_tokens: int = 24
    """response budget"""
    update_epochs: int = 4
    """PPO epochs per iteration"""
    num_minibatches: int = 2
    """minibatches per epoch"""
    learning_rate: float = 1e-5
    """learning rate (both sides)"""
    kl_coef: float = 0.05
    """fixed β (both sides)"""
    iterations: int = 5
    """timed iterations per side"""
    warmup: int = 1
    """untimed iterations first"""
    device: str = "auto"
    """auto, cpu or cuda"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    sides: tuple[str, ...] = SIDES
    """which sides to run"""
    out_name: str = "text_ppo"
    """file stem of the results in benchmarks/results/"""
    side: str | None = None
    """internal: run this one side and print its JSON"""
    reward_model_dir: str | None = None
    """internal: the shared reward model"""


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _response_tokens(responses: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including the first EOS of each row (the whole row if none)."""
    is_eos = responses == eos_id
    first = torch.where(
        is_eos.any(1),
        is_eos.float().argmax(1) + 1,
        torch.full_like(is_eos[:, 0], responses.shape[1], dtype=torch.long),
    )
    return int(first.sum())


def build_reward_model(model: str, out_dir: Path) -> None:
    """The policy's backbone with a seeded scalar head, saved as a sequence classifier."""
    from transformers import AutoModelForSequenceClassification

    from textenv.models import load_causal_lm

    lm, tokenizer = load_causal_lm(model)
    torch.manual_seed(0)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    rm = AutoModelForSequenceClassification.from_config(config)
    missing, _ = rm.load_state_dict(lm.state_dict(), strict=False)
    assert all(k.startswith("score.") for k in missing), missing
    rm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _prompts() -> list[str]:
    from textenv.tasks import make_task

    return make_task("Sentiment").prompts


def _timed(fn, parts: list[dict], key: str, device: torch.device):
    """``fn`` that adds its (synchronised) seconds to ``parts[-1][key]``."""

    def wrapper(*a, **kw):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        _sync(device)
        parts[-1][key] += time.perf_counter() - t0
        return out

    return wrapper


def run_textenv(args: TextPPOBenchConfig, device: torch.device) -> dict:
    import textenv.agents.text
    from textenv.agents.text import TextTrainConfig, train_text
    from textenv.reference import AtEndReference
    from textenv.rewards import ClassifierReward, register

    # Rollout breakdown: the reference's and the reward model's forward passes (work bare
    # generate does not do) timed apart from the policy's sampling through the env.
    parts: list[dict] = []
    collect = textenv.agents.text.collect_rollout

    def collect_rollout(*a, **kw):
        parts.append({"reference_s": 0.0, "reward_s": 0.0})
        return collect(*a, **kw)

    textenv.agents.text.collect_rollout = collect_rollout
    AtEndReference.sequence_logprobs = _timed(  # type: ignore[method-assign]
        AtEndReference.sequence_logprobs, parts, "reference_s", device
    )
    reward = ClassifierReward(args.reward_model_dir, device=str(device))
    register("bench-reward-model")(_timed(reward, parts, "reward_s", device))
    with tempfile.TemporaryDirectory() as runs_dir:
        config = TextTrainConfig(
            task="Sentiment",
            model=args.model,
            reward="bench-reward-model",
            iterations=args.warmup + args.iterations,
            num_envs=args.num_envs,
            max_new_tokens=args.max_new_tokens,
            learning_rate=args.learning_rate,
            kl=KLConfig(kl_coef=args.kl_coef),
            lm=LMConfig(device=str(device), torch_threads=args.threads),
            logging=LoggingConfig(
                runs_dir=runs_dir,
                run_name="run",
                tensorboard=False,
                progress=False,
                save_checkpoint=False,
                sample_every=0,
            ),
        )
        config.ppo = dataclasses.replace(
            config.ppo, update_epochs=args.update_epochs, num_minibatches=args.num_minibatches
        )
        train_text(config)
        rows = [
            json.loads(line)
            for line in (Path(runs_dir) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
    timed, timed_parts = rows[args.warmup :], parts[args.warmup :]
    walls = [rows[0]["wall_time_s"]] + [
        b["wall_time_s"] - a["wall_time_s"] for a, b in zip(rows, rows[1:])
    ]
    tokens = sum(r["rollout_tokens_per_s"] * r["rollout_s"] for r in timed)
    rollout_s = sum(r["rollout_s"] for r in timed)
    reference_s, reward_s = (sum(p[k] for p in timed_parts) for k in ("reference_s", "reward_s"))
    return {
        "iteration_s": statistics.median(walls[args.warmup :]),
        "rollout_s": statistics.median(r["rollout_s"] for r in timed),
        "rollout_tokens_per_s": tokens / rollout_s,
        "sampling_tokens_per_s": tokens / (rollout_s - reference_s - reward_s),
        "reference_share": reference_s / rollout_s,
        "reward_share": reward_s / rollout_s,
        "score_first": rows[0]["score_mean"],
        "score_last": rows[-1]["score_mean"],
    }


def run_trl(args: TextPPOBenchConfig, device: torch.device) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from textenv.models import load_causal_lm

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy, tokenizer = load_causal_lm(args.model, device=device, dtype=dtype)
    ref, _ = load_causal_lm(args.model, device=device, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(
        args.reward_model_dir, dtype=dtype
    ).to(device)
    reward = AutoModelForSequenceClassification.from_pretrained(
        args.reward_model_dir, dtype=dtype
    ).to(device)
    tokenizer.padding_side = "left"
    prompts = _prompts()
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})

    generation = {"seconds": 0.0, "tokens": 0, "calls": 0}
    original = trl_ppo.batch_generation

    def timed_generation(
        *a, **kw
    ):  # TRL's rollout generate, timed; the warm-up call is not counted
        _sync(device)
        t0 = time.perf_counter()
        query_responses, logits = original(*a, **kw)
        _sync(device)
        generation["calls"] += 1
        if generation["calls"] > args.warmup:
            generation["seconds"] += time.perf_counter() - t0
            generation["tokens"] += _response_tokens(
                query_responses[:, a[1].shape[1] :], tokenizer.eos_token_id
            )
        return query_responses, logits

    trl_ppo.batch_generation = timed_generation
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            _sync(device)
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        config = PPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.num_envs,
            gradient_accumulation_steps=1,
            num_mini_batches=args.num_minibatches,
            num_ppo_epochs=args.update_epochs,
            total_episodes=args.num_envs * (args.warmup + args.iterations),
            response_length=args.max_new_tokens,
            local_rollout_forward_batch_size=args.num_envs,
            stop_token="eos",
            kl_coef=args.kl_coef,
            learning_rate=args.learning_rate,
            temperature=1.0,
            bf16=device.type == "cuda",
            report_to="none",
            num_sample_generations=0,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=1,
            use_cpu=device.type == "cpu",
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=dataset,
            eval_dataset=dataset,
            callbacks=[StepTimes()],
        )
        start = time.perf_counter()
        trainer.train()
    scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    walls = [b - a for a, b in zip([start] + ends, ends)]
    return {
        "iteration_s": statistics.median(walls[args.warmup :]),
        "rollout_tokens_per_s": generation["tokens"] / generation["seconds"],
        "score_first": scores[0],
        "score_last": scores[-1],
    }


def run_generate(args: TextPPOBenchConfig, device: torch.device) -> dict:
    from textenv.models import load_causal_lm

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_causal_lm(args.model, device=device, dtype=dtype)
    tokenizer.padding_side = "left"
    prompts = _prompts()
    seconds, tokens = 0.0, 0
    for i in range(args.warmup + args.iterations):
        batch = [prompts[(i * args.num_envs + j) % len(prompts)] for j in range(args.num_envs)]
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        torch.manual_seed(i)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=True,
                max_new_tokens=args.max_new_tokens,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=tokenizer.pad_token_id,
            )
        _sync(device)
        if i >= args.warmup:
            seconds += time.perf_counter() - t0
            tokens += _response_tokens(out[:, enc["input_ids"].shape[1] :], tokenizer.eos_token_id)
    return {"rollout_tokens_per_s": tokens / seconds}


def run_side(args: TextPPOBenchConfig) -> dict:
    from textenv.device import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"textenv": run_textenv, "trl": run_trl, "generate": run_generate}[args.side](
        args, device
    )
    return result | {"peak_memory_mib": _peak_memory_mib(device), "device": str(device)}


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(TextPPOBenchConfig, args=argv)
    unknown = set(args.sides) - set(SIDES)
    if unknown:
        raise SystemExit(f"error: unknown sides {sorted(unknown)}; choose from {list(SIDES)}")
    if args.side is not None:
        print(json.dumps(run_side(args)), flush=True)
        return 0

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as rm_dir:
        build_reward_model(args.model, Path(rm_dir))
        for side in args.sides:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.text_ppo",
                "--side",
                side,
                "--reward-model-dir",
                rm_dir,
                "--model",
                args.model,
                "--num-envs",
                str(args.num_envs),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--update-epochs",
                str(args.update_epochs),
                "--num-minibatches",
                str(args.num_minibatches),
                "--learning-rate",
                str(args.learning_rate),
                "--kl-coef",
                str(args.kl_coef),
                "--iterations",
                str(args.iterations),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
            ]
            print(f"running {side} ...", flush=True)
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"}
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"error: side {side} failed (exit {proc.returncode})")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{side}: {results[side]}", flush=True)

    device = next(iter(results.values()))["device"]
    ours, trl, bare = (
        results.get("textenv", {}),
        results.get("trl", {}),
        results.get("generate", {}),
    )
    rows = [
        "| | this project | TRL 0.29 PPOTrainer | bare `generate` |",
        "| --- | --- | --- | --- |",
        f"| seconds per iteration (median) | {_fmt(ours.get('iteration_s'), '.2f')} | "
        f"{_fmt(trl.get('iteration_s'), '.2f')} | – |",
        f"| peak memory (MiB) | {_fmt(ours.get('peak_memory_mib'), '.0f')} | "
        f"{_fmt(trl.get('peak_memory_mib'), '.0f')} | {_fmt(bare.get('peak_memory_mib'), '.0f')} |",
        f"| rollout tokens/s | {_fmt(ours.get('rollout_tokens_per_s'), '.0f')} (whole rollout) | "
        f"{_fmt(trl.get('rollout_tokens_per_s'), '.0f')} (generate only) | "
        f"{_fmt(bare.get('rollout_tokens_per_s'), '.0f')} |",
        f"| policy sampling tokens/s (rollout less the reference and reward passes) | "
        f"{_fmt(ours.get('sampling_tokens_per_s'), '.0f')} | – | – |",
        f"| share of the rollout in the reference / reward-model forward | "
        f"{_fmt(ours.get('reference_share'), '.0%')} / {_fmt(ours.get('reward_share'), '.0%')} | – | – |",
        f"| mean score, first → last iteration | {_fmt(ours.get('score_first'), '.3f')} → "
        f"{_fmt(ours.get('score_last'), '.3f')} | {_fmt(trl.get('score_first'), '.3f')} → "
        f"{_fmt(trl.get('score_last'), '.3f')} | – |",
    ]
    ratios = []
    if ours.get("iteration_s") and trl.get("iteration_s"):
        ratios.append(
            f"Iteration speed vs TRL: **{trl['iteration_s'] / ours['iteration_s']:.2f}×**."
        )
    if ours.get("rollout_tokens_per_s") and bare.get("rollout_tokens_per_s"):
        ratios.append(
            f"Rollout tokens/s vs bare generate: **{ours['rollout_tokens_per_s'] / bare['rollout_tokens_per_s']:.0%}** "
            f"for the whole rollout, **{ours['sampling_tokens_per_s'] / bare['rollout_tokens_per_s']:.0%}** "
            "for the policy's sampling through the env."
        )
    command = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# PPO on a language model: this project vs TRL",
        "",
        f"Command: `python -m benchmarks.text_ppo {command}`",
        "",
        f"Device: {device} ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}). "
        f"Model {args.model}; {args.num_envs} responses × {args.max_new_tokens} tokens per iteration, "
        f"{args.update_epochs} epochs × {args.num_minibatches} minibatches, β {args.kl_coef} fixed, "
        f"{args.iterations} timed iterations after {args.warmup} warm-up.",
        "",
        *rows,
        "",
        " ".join(ratios),
        "",
    ]
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device == "cpu" else f"_{device.split(':')[0]}"
    (out / f"{args.out_name}{suffix}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
