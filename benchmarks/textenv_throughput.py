"""Tokens/s of stepping the vector text env vs a bare KV-cached forward of the same model.

    python -m benchmarks.textenv_throughput --batch-sizes 1 8 32 --max-new-tokens 24

Both sides do the same model work at the same batch through the same API: one forward over
the left-padded prompts (the columns that are padding in every row left out, as the env
does), then one single-token forward per step but the last (whose logits nothing reads,
as in the env) with the KV cache passed and read back by the
same helpers the env uses (``cache_kwargs`` / ``output_cache``), random tokens as actions (a
random policy; EOS is rare, so episodes run to the budget). The env adds what an env must:
the log-prob gather for the KL reward, the observation buffers, the per-step flags, and
decoding + scoring (VADER) at the end. Overhead = env time / bare time − 1; it cannot be
meaningfully negative when both sides do the same work.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class ThroughputConfig:
    """Env stepping vs bare KV-cached forward, same model and batch."""

    model: str = "embedded"
    """reference model: embedded, tiny, an HF id or path"""
    task: str = "Sentiment"
    """task whose prompts and reward the env uses"""
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    """batch sizes to measure"""
    max_new_tokens: int = 24
    """response budget (steps per episode)"""
    repeats: int = 3
    """timed episodes per side and batch size (median reported), after one warm-up"""
    device: str = "auto"
    """auto, cpu or cuda"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    dtype: str = "auto"
    """model weights: auto (bf16 on CUDA, fp32 on the CPU), bf16 or fp32"""
    hf_generate: bool = True
    """also time transformers' ``generate`` (sampling, EOS suppressed) at the same batch and length"""
    out: str = "benchmarks/results/textenv_throughput.md"
    """markdown table to write"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare_episode(
    model, prompt_ids, prompt_mask, steps: int, vocab: int, generator: torch.Generator
) -> None:
    from textenv.models import cache_kwargs, output_cache

    start = int(
        prompt_mask.any(0).long().argmax()
    )  # the env's first column that is not padding in every row
    prompt_ids, prompt_mask = prompt_ids[:, start:], prompt_mask[:, start:]
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = output_cache(out)
    P = prompt_ids.shape[1]
    mask = torch.cat([prompt_mask, torch.ones_like(prompt_mask[:, :1]).expand(-1, steps)], dim=1)
    for t in range(steps):
        tokens = torch.randint(
            0, vocab, (prompt_ids.shape[0], 1), device=prompt_ids.device, generator=generator
        )
        torch.log_softmax(out.logits[:, -1].float(), -1)
        if t == steps - 1:  # the last token ends every episode: nothing reads the logits after it
            break
        step_mask = mask[:, : P + t + 1].contiguous()
        out = model(
            input_ids=tokens,
            attention_mask=step_mask,
            position_ids=step_mask.sum(-1, keepdim=True) - 1,
            use_cache=True,
            **cache_kwargs(model, cache),
        )
        cache = output_cache(out)


@torch.inference_mode()
def hf_generate(model, prompt_ids, prompt_mask, steps: int, tokenizer) -> None:
    model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
    )


def env_episode(envs, steps: int, vocab: int, generator: torch.Generator) -> int:
    envs.reset(seed=0)
    n = 0
    for _ in range(steps):
        actions = torch.randint(0, vocab, (envs.num_envs,), device=envs.device, generator=generator)
        _, _, term, _, _ = envs.step(actions)
        n += 1
        if bool(term.all()) and n == steps:
            break
    return n


def main(argv: list[str] | None = None) -> int:
    import tyro

    from textenv import TextGenerationVectorEnv
    from textenv.device import resolve_device
    from textenv.models import load_causal_lm

    args = tyro.cli(ThroughputConfig, args=argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    if args.dtype not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"error: --dtype must be auto, bf16 or fp32, got {args.dtype!r}")
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, tokenizer = load_causal_lm(args.model, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    rows = []
    for bs in args.batch_sizes:
        envs = TextGenerationVectorEnv(
            num_envs=bs,
            task=args.task,
            model=model,
            tokenizer=tokenizer,
            device=device,
            max_new_tokens=args.max_new_tokens,
        )
        vocab = envs.single_action_space.n
        gen = torch.Generator(device=device).manual_seed(0)
        envs.reset(seed=0)
        prompt_ids = envs._gen.ids[:, : envs._gen.prompt_slots].clone()
        prompt_mask = envs._gen.mask[:, : envs._gen.prompt_slots].clone()
        sides = ("env", "bare", "generate") if args.hf_generate else ("env", "bare")
        times = {side: [] for side in sides}
        for rep in range(args.repeats + 1):
            for side in sides[::-1] if rep % 2 else sides:  # alternate to cancel order effects
                _sync(device)
                start = time.perf_counter()
                if side == "env":
                    env_episode(envs, args.max_new_tokens, vocab, gen)
                elif side == "generate":
                    hf_generate(model, prompt_ids, prompt_mask, args.max_new_tokens, tokenizer)
                else:
                    bare_episode(model, prompt_ids, prompt_mask, args.max_new_tokens, vocab, gen)
                _sync(device)
                if rep > 0:  # the first round warms up
                    times[side].append(time.perf_counter() - start)
        tokens = bs * args.max_new_tokens
        env_s, bare_s = statistics.median(times["env"]), statistics.median(times["bare"])
        gen_tps = (
            tokens / statistics.median(times["generate"]) if args.hf_generate else float("nan")
        )
        rows.append((bs, tokens / bare_s, tokens / env_s, env_s / bare_s - 1.0, gen_tps))
        print(
            f"batch {bs}: bare {tokens / bare_s:.0f} tok/s, env {tokens / env_s:.0f} tok/s, "
            f"overhead {100 * (env_s / bare_s - 1):.1f}%",
            flush=True,
        )
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    lines = [
        "# Text env throughput: env stepping vs bare KV-cached forward",
        "",
        f"Command: `python -m benchmarks.textenv_throughput {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"Model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
        f"{str(dtype).removeprefix('torch.')}, loaded in "
        f"{load_s:.0f} s), task {args.task}, {args.max_new_tokens} new tokens, random actions; device: {name}; "
        f"{platform.machine()}, torch {torch.__version__}. Median of {args.repeats} episodes after a warm-up.",
        "",
        "`generate`: transformers' `model.generate` sampling the same number of tokens (EOS suppressed), for "
        "reference; it samples from the model, the other two columns feed random tokens.",
        "",
        "| batch | bare forward (tok/s) | env step (tok/s) | env overhead | HF generate (tok/s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {bs} | {bare:,.0f} | {env:,.0f} | {100 * ov:+.1f}% | {g:,.0f} |"
        for bs, bare, env, ov, g in rows
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
