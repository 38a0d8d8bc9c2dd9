"""Evaluate a saved run: ``textenv-evaluate runs/<run>`` (``python -m scripts.evaluate`` from a
clone).

A classic run (``checkpoint.safetensors``) plays deterministic episodes and prints the mean
return; a text run (``policy/``) samples responses on its task (its held-out prompts when it
was trained with them) and prints the mean score and the KL to the reference. One JSON line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from textenv.agents.cli._common import run_cli


@dataclass
class EvalConfig:
    """Evaluate a checkpoint written by textenv-train or textenv-train-text."""

    checkpoint: tyro.conf.Positional[str]
    """a run directory, or a classic run's checkpoint.safetensors"""
    episodes: int = 10
    """classic: episodes to play, one per fresh env; text: responses to sample"""
    seed: int = 12345
    """seed of the evaluation envs (and of the sampling, for text)"""
    video_dir: str | None = None
    """classic: record the first episode with Gymnasium's RecordVideo into this directory
    (needs moviepy: pip install "textenv-ppo[video]")"""
    device: str = "cpu"
    """auto, cpu or cuda"""
    top_k: int = 0
    """text: sample among the k most likely tokens (0: off)"""
    top_p: float = 1.0
    """text: nucleus sampling (1: off); with either filter the KL printed is the filtered
    policy's to the whole reference"""


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = tyro.cli(EvalConfig, args=argv)
        if args.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {args.episodes}")
        path = Path(args.checkpoint)
        if path.is_dir() and (path / "policy").is_dir():
            from textenv.agents.text import evaluate_text_run

            if args.video_dir is not None:
                raise ValueError("--video-dir records classic envs only")
            print(
                json.dumps(
                    evaluate_text_run(
                        path, args.episodes, args.seed, args.device, args.top_k, args.top_p
                    )
                )
            )
            return 0
        return evaluate_classic(args, path)

    return run_cli(body)


def evaluate_classic(args: EvalConfig, path: Path) -> int:
    import numpy as np

    from textenv.agents.classic import evaluate_policy, load_checkpoint
    from textenv.agents.device import resolve_device

    if args.top_k or args.top_p != 1.0:
        raise ValueError(
            "--top-k/--top-p filter a language model's sampling; a classic run has none"
        )
    if path.suffix != ".safetensors":
        path = path / "checkpoint.safetensors"
    if args.video_dir is not None:
        try:
            import moviepy  # noqa: F401
        except ImportError:
            raise ValueError(
                '--video-dir needs moviepy: pip install "textenv-ppo[video]"'
            ) from None
    device = resolve_device(args.device)
    policy, norm_state, config = load_checkpoint(str(path), device=str(device))
    returns = evaluate_policy(
        policy,
        config.env_id,
        args.episodes,
        seed=args.seed,
        norm_state=norm_state,
        normalize_obs=config.normalize_obs,
        clip_obs=config.clip_obs,
        device=device,
        video_dir=args.video_dir,
    )
    print(
        json.dumps(
            {
                "env_id": config.env_id,
                "episodes": len(returns),
                "eval_return_mean": float(np.mean(returns)),
                "eval_return_std": float(np.std(returns)),
                "returns": returns,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
