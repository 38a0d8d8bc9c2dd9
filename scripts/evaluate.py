"""Evaluate a saved policy: ``python -m scripts.evaluate runs/<run>/checkpoint.safetensors``."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np
import tyro

from agents.classic import evaluate_policy, load_checkpoint
from agents.device import resolve_device


@dataclass
class EvalConfig:
    """Deterministic evaluation of a checkpoint written by scripts/train.py."""

    checkpoint: tyro.conf.Positional[str]
    """path to checkpoint.safetensors (or its run directory)"""
    episodes: int = 10
    """episodes to play, one per fresh env"""
    seed: int = 12345
    """seed of the evaluation envs"""
    video_dir: str | None = None
    """record the first episode with Gymnasium's RecordVideo into this directory (needs moviepy)"""
    device: str = "cpu"
    """auto, cpu or cuda"""


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(EvalConfig, args=argv)
    path = args.checkpoint
    if not path.endswith(".safetensors"):
        path = f"{path.rstrip('/')}/checkpoint.safetensors"
    try:
        if args.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {args.episodes}")
        device = resolve_device(args.device)
        policy, norm_state, config = load_checkpoint(path, device=str(device))
        returns = evaluate_policy(
            policy, config.env_id, args.episodes, seed=args.seed, norm_state=norm_state,
            normalize_obs=config.normalize_obs, clip_obs=config.clip_obs, device=device, video_dir=args.video_dir,
        )
    except (ValueError, FileNotFoundError, ImportError, gym_error()) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"env_id": config.env_id, "episodes": len(returns), "eval_return_mean": float(np.mean(returns)),
                      "eval_return_std": float(np.std(returns)), "returns": returns}))
    return 0


def gym_error() -> type[Exception]:
    import gymnasium

    return gymnasium.error.Error


if __name__ == "__main__":
    sys.exit(main())
