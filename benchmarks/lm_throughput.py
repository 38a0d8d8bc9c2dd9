"""Language-model throughput on one device: this project's rollout and PPO iteration beside
transformers' ``generate``, at the same batch and length, in the same run.

    make bench-gpu                                  # writes benchmarks/results/gpu.md + gpu.json
    python -m benchmarks.lm_throughput --quick      # a CPU-sized smoke run

For each model shape (random weights, the embedded SmolLM2 tokenizer) and each batch size,
with ``--new-tokens`` tokens per response:

- ``generate``: ``model.generate`` sampling (top-k and top-p off), bf16 weights on CUDA, every
  response ``--new-tokens`` long (``min_new_tokens``);
- ``rollout``: :func:`textenv.agents.rollout_text.collect_rollout` on the Sentiment vector env
  (the policy's KV cache, the reference scoring each response at its end, the reward), as the
  text trainer runs it by default on the device (fp32 weights, bf16 autocast on CUDA; on CUDA a
  static KV cache, the decode step compiled with CUDA graphs and 16 tokens per env call); the
  second rollout is timed, the first compiles and warms up;
- ``rollout, eager``: the same with the dynamic KV cache, eager forwards and one env call per
  token (the CPU's default);
- ``PPO iteration``: the text trainer's second iteration (rollout, old log-probs, 4 epochs of
  4 minibatches) in tokens per second of its rollout + recompute + update time, and the peak
  device memory of the run.

Shapes: ``135m`` (SmolLM2-135M: 30 layers, width 576) and ``360m`` (SmolLM2-360M: 32 layers,
width 960). The GPU machine cannot receive the embedded GGUF: export the tokenizer here with
``--export-tokenizer DIR`` and pass ``--tokenizer DIR`` there.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import tyro

from textenv.agents.runlog import atomic_write_text
from textenv.agents.text import LMConfig, LoggingConfig

SHAPES: dict[str, dict[str, Any]] = {
    "135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
    "360m": dict(
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


@dataclass
class Args:
    shapes: tuple[str, ...] = ("135m", "360m")
    """model shapes (random weights): 135m, 360m, tiny"""
    batches: tuple[int, ...] = (64, 256, 1024)
    """responses per batch"""
    new_tokens: int = 128
    """tokens per response"""
    tokenizer: str = "embedded"
    """the embedded model's tokenizer, or a directory written by --export-tokenizer"""
    export_tokenizer: str | None = None
    """write the embedded tokenizer to this directory and exit"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    ppo: bool = True
    """also time a whole PPO iteration of the text trainer"""
    micro_batch: int = 16
    """rows per forward/backward in the PPO update (gradient accumulation above it)"""
    quick: bool = False
    """CPU smoke sizes: the tiny shape, batch 4, 8 tokens"""
    out: str = "benchmarks/results/gpu.md"
    """markdown result; a .json beside it holds the numbers"""


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == "embedded":  # the tokenizer alone, without the weights
        from textenv.models import embedded_gguf_path

        path = embedded_gguf_path()
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(name)


def random_model_dir(shape: str, tokenizer, root: Path) -> Path:
    """A random-weight Llama of ``shape`` over ``tokenizer``'s vocabulary, saved as a model
    directory (fp32) that every loader here reads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100_000.0,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    path = root / f"random-{shape}"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_generate(model_dir: Path, prompts: list[str], args: Args, device: torch.device) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    kw = dict(do_sample=True, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id)

    def generate(n: int) -> None:
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, **kw)

    generate(4)  # warm-up: kernels, allocator
    sync(device)
    start = time.perf_counter()
    generate(args.new_tokens)
    sync(device)
    return len(prompts) * args.new_tokens / (time.perf_counter() - start)


def time_rollout(
    model_dir: Path, batch: int, args: Args, device: torch.device, fast: bool
) -> float:
    """Tokens per second of a rollout; ``fast``: the text trainer's CUDA defaults (static
    cache, compiled decode, 16 tokens per env call), else eager one token per env call."""
    from textenv import TextGenerationVectorEnv
    from textenv.agents.lm import LMActorCritic
    from textenv.agents.rollout_text import collect_rollout, compiled_decode
    from textenv.agents.text import autocast
    from textenv.models import load_causal_lm

    envs = TextGenerationVectorEnv(
        num_envs=batch,
        task="Sentiment",
        model=str(model_dir),
        device=device,
        max_new_tokens=args.new_tokens,
        reference_pass="at_end",
    )
    lm, _ = load_causal_lm(str(model_dir), device=device)
    policy = LMActorCritic(lm, value_head=True)
    generator = torch.Generator(device=device).manual_seed(0)
    bf16 = device.type == "cuda"
    settings: dict[str, Any] = {}
    if fast:
        settings = dict(static_cache=True, block=16, decode=compiled_decode(policy, device))
    with autocast(device, bf16):
        collect_rollout(policy, envs, seed=0, generator=generator, **settings)
        sync(device)  # the first rollout compiled and warmed up kernels and the allocator
        start = time.perf_counter()
        rollout = collect_rollout(policy, envs, seed=1, generator=generator, **settings)
        sync(device)
    seconds = time.perf_counter() - start
    tokens = float(rollout.mask.sum())
    envs.close()
    return tokens / seconds


def time_ppo_iteration(
    model_dir: Path, batch: int, args: Args, device: torch.device, runs: Path
) -> tuple[float, float]:
    """Tokens per second of the trainer's second iteration, and the run's peak GiB."""
    from textenv.agents.text import TextTrainConfig, train_text

    ppo = TextTrainConfig().ppo
    minibatch = batch // ppo.num_minibatches
    accum = max(1, minibatch // args.micro_batch)
    config = TextTrainConfig(
        task="Sentiment",
        model=str(model_dir),
        iterations=2,
        num_envs=batch,
        max_new_tokens=args.new_tokens,
        eval_samples=0,
        ppo=dataclasses.replace(ppo, grad_accum_steps=accum),
        lm=LMConfig(device=str(device)),
        logging=LoggingConfig(
            sample_every=0,
            save_checkpoint=False,
            tensorboard=False,
            progress=False,
            runs_dir=str(runs),
        ),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    summary = train_text(config)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").open()]
    last = rows[-1]
    seconds = last["rollout_s"] + last["recompute_s"] + last["update_s"]
    return last["response_length"] * batch / seconds, peak


def measure(args: Args, device: torch.device) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(args.tokenizer)
    from textenv.tasks import make_task

    prompts = [p for p in make_task("Sentiment").prompts if isinstance(p, str)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            model_dir = random_model_dir(shape, tokenizer, Path(tmp))
            for batch in args.batches:
                batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
                row: dict[str, Any] = {
                    "shape": shape,
                    "batch": batch,
                    "new_tokens": args.new_tokens,
                }
                row["generate_tokens_per_s"] = time_generate(model_dir, batch_prompts, args, device)
                row["rollout_eager_tokens_per_s"] = time_rollout(
                    model_dir, batch, args, device, fast=False
                )
                row["rollout_tokens_per_s"] = (
                    time_rollout(model_dir, batch, args, device, fast=True)
                    if device.type == "cuda"
                    else row["rollout_eager_tokens_per_s"]  # the CPU's default is eager
                )
                if args.ppo:
                    tps, peak = time_ppo_iteration(
                        model_dir, batch, args, device, Path(tmp) / "runs"
                    )
                    row |= {"text_ppo_tokens_per_s": tps, "peak_gib": peak}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def report(rows: list[dict[str, Any]], args: Args, device: torch.device, seconds: float) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    lines = [
        "# Language-model throughput: rollout and PPO iteration beside HF generate",
        "",
        f"Command: `python -m benchmarks.lm_throughput{_flags(args)}`",
        f"Device: {device.type} ({name}); torch {torch.__version__}; {time.strftime('%Y-%m-%d')};"
        f" {seconds:.0f} s in all.",
        "" if device.type == "cuda" else "\n**No CUDA here: CPU numbers, not the GPU result.**",
        "",
        "| shape | batch | tokens | generate tok/s | rollout tok/s | rollout / generate "
        "| rollout, eager | PPO iteration tok/s | peak GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = r["rollout_tokens_per_s"] / r["generate_tokens_per_s"]
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['new_tokens']} | {r['generate_tokens_per_s']:,.0f}"
            f" | {r['rollout_tokens_per_s']:,.0f} | {ratio:.2f} | "
            f"{r['rollout_eager_tokens_per_s']:,.0f} | "
            f"{r.get('text_ppo_tokens_per_s', float('nan')):,.0f} | {_gib(r.get('peak_gib'))} |"
        )
    return "\n".join(lines) + "\n"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _flags(args: Args) -> str:
    default = Args()
    changed = [
        f for f in dataclasses.fields(Args) if getattr(args, f.name) != getattr(default, f.name)
    ]
    parts = []
    for f in changed:
        value = getattr(args, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            parts.append(f"{flag} {' '.join(map(str, value))}")
        else:
            parts.append(f"{flag} {value}")
    return "".join(" " + p for p in parts)


def main(args: Args) -> int:
    if args.export_tokenizer:
        load_tokenizer("embedded").save_pretrained(args.export_tokenizer)
        return 0
    if args.quick:  # the batches stay as given when they were changed
        batches = args.batches if args.batches != Args().batches else (4,)
        args = dataclasses.replace(args, shapes=("tiny",), batches=batches, new_tokens=8)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    start = time.perf_counter()
    rows = measure(args, device)
    out = Path(args.out)
    atomic_write_text(out, report(rows, args, device, time.perf_counter() - start))
    top = next((r for r in rows if r["shape"] == "135m" and r["batch"] == 256), rows[0])
    keys = ("rollout_tokens_per_s", "generate_tokens_per_s", "text_ppo_tokens_per_s", "peak_gib")
    raw = {k: top.get(k) for k in keys} | {"device": device.type, "rows": rows}
    atomic_write_text(out.with_suffix(".json"), json.dumps(raw, indent=1) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
