"""Rewards for the multi-process tests, importable as ``tests.rank_rewards:<name>``."""

import os


def fails_on_rank_one(prompts: list[str], responses: list[str]) -> list[float]:
    """Scores 0, except in the process of rank 1, where it raises (a user's reward that fails on one rank)."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("the reward service is unreachable from this process")
    return [0.0] * len(responses)
