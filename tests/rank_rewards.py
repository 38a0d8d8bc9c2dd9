"""Rewards the tests name as ``tests.rank_rewards:<name>`` (a multi-process run imports them in
each process)."""

import os


def fails_on_rank_one(prompts: list[str], responses: list[str]) -> list[float]:
    """Scores 0, except in the process of rank 1, where it raises (a user's reward that fails on one rank)."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("the reward service is unreachable from this process")
    return [0.0] * len(responses)


def mean_char_code(prompts: list[str], responses: list[str]) -> list[float]:
    """The mean character code of the response over 128: two random responses rarely tie."""
    return [sum(map(ord, r)) / max(1, len(r)) / 128 for r in responses]
