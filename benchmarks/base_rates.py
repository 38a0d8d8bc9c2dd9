"""The embedded model's base rate on candidate task configurations: where RL can start.

    python -m benchmarks.base_rates     # writes benchmarks/results/base_rates.md

A model learns only where it already succeeds sometimes. Each candidate is a text task with its
options and response budget; the untrained SmolLM2-135M-Instruct answers ``--samples`` of its
held-out prompts (every 5th) at temperature 1 (the trainer's sampling), and the table gives the
mean score ± its standard error and the fraction of responses scoring 1. The learning benchmark
(``benchmarks.verifiable``) takes its configurations from those that sit between 10% and 50%.
The model is loaded once and shared by every candidate; one torch thread by default.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NUMBER = "Answer with a single number."
# (label, task, task options, max new tokens)
CANDIDATES: list[tuple[str, str, dict, int]] = [
    ("Instructions", "Instructions", {}, 48),
    ("Instructions, all or nothing", "Instructions", {"all_or_nothing": True}, 48),
    (
        "chain_sum, 2 one-digit terms",
        "ReasoningGym",
        {
            "dataset": "chain_sum",
            "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
            "answer_format": "last_number",
            "system_prompt": NUMBER,
        },
        8,
    ),
    (
        "basic_arithmetic, 2 one-digit terms, + and -",
        "ReasoningGym",
        {
            "dataset": "basic_arithmetic",
            "config": {
                "min_terms": 2,
                "max_terms": 2,
                "min_digits": 1,
                "max_digits": 1,
                "operators": ["+", "-"],
                "allow_parentheses": False,
                "allow_negation": False,
            },
            "answer_format": "last_number",
            "system_prompt": NUMBER,
        },
        8,
    ),
    (
        "leg_counting, 1-2 animals, 1-3 each",
        "ReasoningGym",
        {
            "dataset": "leg_counting",
            "config": {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 3},
            "answer_format": "last_number",
            "system_prompt": NUMBER,
        },
        8,
    ),
    (
        "gcd, values 1-20",
        "ReasoningGym",
        {
            "dataset": "gcd",
            "config": {"min_value": 1, "max_value": 20},
            "answer_format": "last_number",
            "system_prompt": NUMBER,
        },
        8,
    ),
    (
        "count_bits, n 1-16",
        "ReasoningGym",
        {
            "dataset": "count_bits",
            "config": {"min_n": 1, "max_n": 16},
            "answer_format": "last_number",
            "system_prompt": NUMBER,
        },
        8,
    ),
    (
        "letter_counting, 1-3 words",
        "ReasoningGym",
        {
            "dataset": "letter_counting",
            "config": {"min_words": 1, "max_words": 3},
            "answer_format": "last_number",
            "system_prompt": NUMBER,
        },
        8,
    ),
    (
        "spell_backward, 3-4 letter words",
        "ReasoningGym",
        {
            "dataset": "spell_backward",
            "config": {"min_word_len": 3, "max_word_len": 4},
            "answer_format": "raw",
            "system_prompt": "Answer with the word spelled backward and nothing else.",
        },
        8,
    ),
]


@dataclass
class BaseRatesConfig:
    """Measure the embedded model's held-out score on each candidate configuration."""

    candidates: tuple[str, ...] = ()
    """labels to measure (default: all; see CANDIDATES)"""
    samples: int = 128
    """held-out responses per candidate"""
    seed: int = 1
    torch_threads: int = 1
    out: str = "benchmarks/results/base_rates.md"


def measure(
    label: str,
    task: str,
    options: dict,
    max_new_tokens: int,
    samples: int,
    seed: int,
    model,
    tokenizer,
) -> dict:
    import torch

    from textenv.agents.lm import LMActorCritic
    from textenv.agents.rollout_text import collect_rollout
    from textenv.agents.text import TextTrainConfig, make_text_envs, task_settings

    config = TextTrainConfig.from_flat(
        task=task,
        model="embedded",
        task_options=json.dumps(options),
        max_new_tokens=max_new_tokens,
        eval_samples=samples,
    )
    task_kwargs, held_out = task_settings(config)
    envs = make_text_envs(
        config,
        samples,
        task_kwargs | {"split": "test" if held_out else "all"},
        torch.device("cpu"),
        torch.float32,
        "at_end",
        model=model,
        tokenizer=tokenizer,
    )
    policy = LMActorCritic(model, temperature=config.sampling.temperature, value_head=False)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    rollout = collect_rollout(policy, envs, seed=seed, generator=generator)
    seconds = time.perf_counter() - start
    envs.close()
    scores = rollout.scores.double()
    best = int(scores.argmax())
    return {
        "label": label,
        "task": task,
        "task_options": options,
        "max_new_tokens": max_new_tokens,
        "samples": samples,
        "mean": float(scores.mean()),
        "se": float(scores.std() / len(scores) ** 0.5),
        "full": float((scores >= 1).double().mean()),
        "response_length": float(rollout.mask.sum(1).double().mean()),
        "seconds": seconds,
        "example": {"prompt": rollout.prompts[best], "response": rollout.responses[best]},
    }


def main(argv: list[str] | None = None) -> int:
    import torch
    import tyro

    from textenv.agents.runlog import atomic_write_text
    from textenv.models import load_causal_lm

    args = tyro.cli(BaseRatesConfig, args=argv)
    known = [c[0] for c in CANDIDATES]
    unknown = [c for c in args.candidates if c not in known]
    if unknown:
        raise SystemExit(f"error: unknown candidate {unknown[0]!r}; candidates: {known}")
    torch.set_num_threads(args.torch_threads)
    model, tokenizer = load_causal_lm("embedded")
    rows = []
    for label, task, options, tokens in CANDIDATES:
        if args.candidates and label not in args.candidates:
            continue
        rows.append(
            measure(label, task, options, tokens, args.samples, args.seed, model, tokenizer)
        )
        r = rows[-1]
        print(f"{label}: {r['mean']:.3f} ± {r['se']:.3f} ({r['seconds']:.0f} s)", file=sys.stderr)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = " ".join(
        ["python -m benchmarks.base_rates", *(sys.argv[1:] if argv is None else argv)]
    )
    lines = [
        "# Base rates of the embedded model (SmolLM2-135M-Instruct, untrained)",
        "",
        f"Command: `{command}`",
        "",
        f"{args.samples} responses per configuration on its held-out prompts (every 5th), sampled at "
        f"temperature 1 with seed {args.seed} ({platform.machine()}, {cores} cores, "
        f"{args.torch_threads} torch thread). Mean score ± standard error; 'all right' is the fraction "
        "scoring 1 (for Instructions: every constraint held).",
        "",
        "| configuration | task options | max new tokens | mean score | all right | mean response tokens |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | `{json.dumps(r['task_options'])}` | {r['max_new_tokens']} | "
            f"{r['mean']:.3f} ± {r['se']:.3f} | {r['full']:.3f} | {r['response_length']:.1f} |"
        )
    lines += ["", "## The best-scoring response of each", ""]
    for r in rows:
        prompt = r["example"]["prompt"].strip().replace("\n", " ")[-240:]
        response = r["example"]["response"].strip().replace("\n", " ")
        lines += [f"- **{r['label']}**: …{prompt} ⟶ `{response}`"]
    atomic_write_text(ROOT / args.out, "\n".join(lines) + "\n")
    atomic_write_text((ROOT / args.out).with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
