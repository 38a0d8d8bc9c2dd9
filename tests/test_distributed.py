"""Several processes, one run (torch.distributed, gloo, two processes on the CPU).

The reference of every distributed result is the one-process result on the whole batch: the
same PPO core, run in this process.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from textenv.agents.distributed import Dist, sync_running_stats
from textenv.agents.ppo import PPOConfig, explained_variance, normalize, ppo_update
from textenv.agents.text import LMConfig, LoggingConfig

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn, out: str, args: tuple) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    # A collective that waits longer than this fails: ranks that disagree fail the test, never hang it.
    tdist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        result = fn(Dist(rank=rank, world_size=WORLD, active=True), *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def run_ranks(fn, tmp_path: Path, *args) -> list:
    """``fn(dist, *args)`` in two gloo processes; their return values, in rank order."""
    mp.start_processes(
        _worker, args=(_free_port(), fn, str(tmp_path), args), nprocs=WORLD, start_method="spawn"
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------- a fixed batch of transitions


def _mlp_batch(n: int = 64) -> dict[str, torch.Tensor]:
    """Transitions whose two halves (the ranks' shares) differ in scale, masks and KL."""
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(n, 4, generator=g)
    half = n // 2
    adv = torch.cat([torch.randn(half, generator=g), 5.0 + 3.0 * torch.randn(half, generator=g)])
    mask = torch.ones(n)
    mask[half + 3 : half + 14] = 0.0  # the second rank has fewer valid transitions
    mask[5] = 0.0
    return {
        "obs": obs,
        "actions": torch.randint(0, 2, (n,), generator=g),
        "advantages": adv,
        "returns": torch.randn(n, generator=g) * 4,
        "values": torch.randn(n, generator=g),
        "mask": mask,
    }


def _mlp_policy():
    import gymnasium as gym

    from textenv.agents.policies import MLPActorCritic

    torch.manual_seed(0)
    return MLPActorCritic(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), (16, 16))


def _with_logprobs(policy, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        logp, _, _ = policy.evaluate(batch["obs"], batch["actions"])
    shift = torch.zeros_like(logp)
    shift[len(shift) // 2 :] = 0.3  # old log-probs off on one half: its local KL is larger
    return batch | {"logprobs": logp - shift}


def _mlp_update(dist: Dist | None, config: PPOConfig, rows: slice | None = None):
    policy = _mlp_policy()
    batch = _with_logprobs(policy, _mlp_batch())
    if rows is not None:
        batch = {k: v[rows] for k, v in batch.items()}
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3, eps=1e-5)
    gen = torch.Generator().manual_seed(7)
    metrics = ppo_update(
        policy.parameters(),
        optimizer,
        batch,
        lambda mb: policy.evaluate(mb["obs"], mb["actions"]),
        config,
        gen,
        dist=dist,
    )
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}, {
        k: float(v) for k, v in metrics.items()
    }


def _mlp_rank(dist: Dist, config: PPOConfig):
    n = 64 // WORLD
    return _mlp_update(dist, config, slice(dist.rank * n, (dist.rank + 1) * n))


FULL_BATCH = PPOConfig(
    update_epochs=3, num_minibatches=1, ent_coef=0.01, clip_vloss=True, norm_adv=True
)


def test_an_update_split_over_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    """Full-batch minibatches: the same samples in every step. Tolerance 1e-6: only the order
    of float32 sums differs. The halves' advantages differ in scale and their masks in count,
    so per-rank whitening or per-rank loss means would move the parameters elsewhere."""
    ref_params, ref_metrics = _mlp_update(None, FULL_BATCH)
    results = run_ranks(_mlp_rank, tmp_path, FULL_BATCH)
    for params, metrics in results:
        for k in ref_params:
            torch.testing.assert_close(params[k], ref_params[k], rtol=1e-5, atol=1e-6, msg=k)
        for k in (
            "policy_loss",
            "value_loss",
            "entropy",
            "approx_kl",
            "clipfrac",
            "grad_norm",
            "epochs",
        ):
            assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-7), k
    # Per-rank statistics would have given another update: the test can see the difference.
    local_params, _ = _mlp_update(None, FULL_BATCH, slice(0, 32))
    assert not torch.allclose(
        local_params["actor.4.weight"], ref_params["actor.4.weight"], atol=1e-4
    )


def test_target_kl_stops_every_rank_on_the_global_kl(tmp_path):
    """The second half's old log-probs are off by 0.3, so its local KL is far above the first
    half's; target-KL between the two must stop both ranks where one process stops."""
    config = PPOConfig(update_epochs=6, num_minibatches=1, target_kl=0.02, clip_vloss=False)
    ref_params, ref_metrics = _mlp_update(None, config)
    low_params, low = _mlp_update(None, config, slice(0, 32))
    high_params, high = _mlp_update(None, config, slice(32, 64))
    assert low["epochs"] != high["epochs"], "the halves must disagree on their own"
    results = run_ranks(_mlp_rank, tmp_path, config)
    for params, metrics in results:
        assert metrics["epochs"] == ref_metrics["epochs"]
        torch.testing.assert_close(
            params["critic.4.weight"], ref_params["critic.4.weight"], rtol=1e-5, atol=1e-6
        )


def _mlp_minibatched_reference(config: PPOConfig):
    """The distributed semantics of several minibatches, composed from one-process updates:
    each rank permutes its share with the same seed, and minibatch k is the union of every
    rank's k-th slice; one one-process update (1 epoch, 1 minibatch) is one optimizer step."""
    policy = _mlp_policy()
    batch = _with_logprobs(policy, _mlp_batch())
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3, eps=1e-5)
    n = 64 // WORLD
    m = n // config.num_minibatches
    gen = torch.Generator().manual_seed(7)
    one_step = PPOConfig(**{**config.__dict__, "update_epochs": 1, "num_minibatches": 1})
    for _ in range(config.update_epochs):
        order = torch.randperm(n, generator=gen)
        for k in range(config.num_minibatches):
            rows = torch.cat([order[k * m : (k + 1) * m] + r * n for r in range(WORLD)])
            ppo_update(
                policy.parameters(),
                optimizer,
                {key: v[rows] for key, v in batch.items()},
                lambda mb: policy.evaluate(mb["obs"], mb["actions"]),
                one_step,
                torch.Generator(),
            )
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def test_minibatches_are_unions_of_the_ranks_minibatches(tmp_path):
    config = PPOConfig(update_epochs=2, num_minibatches=4, ent_coef=0.01, clip_vloss=True)
    reference = _mlp_minibatched_reference(config)
    for params, _ in run_ranks(_mlp_rank, tmp_path, config):
        for k in reference:
            torch.testing.assert_close(params[k], reference[k], rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------- the language-model update


def _lm_policy():
    from textenv.agents.lm import LMActorCritic
    from textenv.models import load_causal_lm

    torch.manual_seed(0)
    lm, _ = load_causal_lm("tiny:3")
    return LMActorCritic(lm)


def _lm_batch(policy) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n, prompt, T = 8, 5, 6
    input_ids = torch.randint(3, 20, (n, prompt + T), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: n // 2, :2] = 0  # left padding on some prompts
    lengths = torch.tensor([6, 2, 5, 3, 1, 1, 2, 6])  # the halves differ in response tokens
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    actions = input_ids[:, prompt:]
    with torch.no_grad():
        logp, _, values = policy.evaluate_responses(input_ids, attention_mask, actions, prompt)
    adv = torch.randn(n, T, generator=g) * mask
    adv[n // 2 :] += 2.0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "actions": actions,
        "logprobs": logp - 0.05 * torch.rand(n, T, generator=g),
        "values": values,
        "advantages": adv,
        "returns": torch.randn(n, T, generator=g) * mask,
        "mask": mask,
    }


def _lm_update(dist: Dist | None, config: PPOConfig):
    torch.set_num_threads(1)
    policy = _lm_policy()
    batch = _lm_batch(policy)
    if dist is not None:
        n = 8 // WORLD
        batch = {k: v[dist.rank * n : (dist.rank + 1) * n] for k, v in batch.items()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, eps=1e-5, weight_decay=0.0)
    metrics = ppo_update(
        policy.parameters(),
        optimizer,
        batch,
        lambda mb: policy.evaluate_responses(
            mb["input_ids"], mb["attention_mask"], mb["actions"], 5
        ),
        config,
        torch.Generator().manual_seed(3),
        dist=dist,
    )
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}, {
        k: float(v) for k, v in metrics.items()
    }


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_a_language_model_update_split_over_two_ranks_equals_one_process(tmp_path, aggregation):
    config = PPOConfig(
        update_epochs=2,
        num_minibatches=1,
        grad_accum_steps=2,
        vf_coef=0.1,
        norm_adv=True,
        max_grad_norm=1.0,
        loss_aggregation=aggregation,
    )
    ref_params, ref_metrics = _lm_update(None, config)
    for params, metrics in run_ranks(_lm_update, tmp_path, config):
        for k in ref_params:
            torch.testing.assert_close(params[k], ref_params[k], rtol=1e-4, atol=2e-6, msg=k)
        for k in ("policy_loss", "value_loss", "approx_kl", "clipfrac"):
            assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-4, abs=1e-6), k


# ---------------------------------------------------------------- global statistics


def _statistics_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two ranks' ``(x, mask, values)``, stacked: the second rank's x is shifted and scaled and has fewer entries."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 10, 3, generator=g)
    x[1] = 4.0 + 3.0 * x[1]
    mask = torch.ones(2, 10, 3)
    mask[1, 4:] = 0.0
    return x, mask, torch.randn(2, 10, 3, generator=g)


def _statistics(dist: Dist):
    x, mask, values = _statistics_inputs()
    r = dist.rank
    return (
        normalize(x[r], mask[r], dist=dist),
        normalize(x[r], dist=dist),
        explained_variance(values[r], x[r], mask[r], dist=dist),
    )


def test_whitening_and_explained_variance_are_over_every_ranks_entries(tmp_path):
    x, mask, values = _statistics_inputs()
    whole_masked = normalize(x.reshape(20, 3), mask.reshape(20, 3)).reshape(2, 10, 3)
    whole = normalize(x.reshape(20, 3)).reshape(2, 10, 3)
    ev = explained_variance(values, x, mask)
    for r, (masked_r, plain_r, ev_r) in enumerate(run_ranks(_statistics, tmp_path)):
        keep = mask[r] > 0
        torch.testing.assert_close(masked_r[keep], whole_masked[r][keep], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain_r, whole[r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ev_r, ev, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(
        normalize(x[1], mask[1])[mask[1] > 0], whole_masked[1][mask[1] > 0], atol=0.1
    )


def _rms_sync(dist: Dist, start: dict, streams: list):
    from gymnasium.wrappers.utils import RunningMeanStd

    rms = RunningMeanStd(shape=(3,))
    rms.mean, rms.var, rms.count = (
        start["x.mean"].copy(),
        start["x.var"].copy(),
        float(start["x.count"]),
    )
    for chunk in streams[dist.rank]:
        rms.update(chunk)
    state = {"x.mean": rms.mean, "x.var": rms.var, "x.count": np.asarray(rms.count)}
    return sync_running_stats(state, start, dist)


def test_running_statistics_merge_into_the_statistics_of_every_ranks_data(tmp_path):
    from gymnasium.wrappers.utils import RunningMeanStd

    rng = np.random.default_rng(0)
    first = rng.normal(size=(50, 3))
    start_rms = RunningMeanStd(shape=(3,))
    start_rms.update(first)
    start = {
        "x.mean": start_rms.mean.copy(),
        "x.var": start_rms.var.copy(),
        "x.count": np.asarray(start_rms.count),
    }
    streams = [
        [rng.normal(1.0, 2.0, size=(7, 3)) for _ in range(5)],
        [rng.normal(-3.0, 0.5, size=(4, 3)) for _ in range(9)],
    ]
    expected = RunningMeanStd(shape=(3,))
    expected.update(np.concatenate([first, *streams[0], *streams[1]]))
    for merged in run_ranks(_rms_sync, tmp_path, start, streams):
        np.testing.assert_allclose(merged["x.mean"], expected.mean, rtol=1e-9)
        np.testing.assert_allclose(merged["x.var"], expected.var, rtol=1e-9)
        assert float(merged["x.count"]) == pytest.approx(expected.count)


# ---------------------------------------------------------------- FSDP2


def _lm_update_fsdp(dist: Dist, config: PPOConfig):
    from textenv.agents.distributed import full_state_dict, shard_policy

    torch.set_num_threads(1)
    policy = _lm_policy()
    batch = _lm_batch(policy)
    n = 8 // WORLD
    batch = {k: v[dist.rank * n : (dist.rank + 1) * n] for k, v in batch.items()}
    shard_policy(policy, policy.lm)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, eps=1e-5, weight_decay=0.0)
    metrics = ppo_update(
        policy.parameters(),
        optimizer,
        batch,
        lambda mb: policy.evaluate_responses(
            mb["input_ids"], mb["attention_mask"], mb["actions"], 5
        ),
        config,
        torch.Generator().manual_seed(3),
        dist=dist,
    )
    return full_state_dict(policy), {k: float(v) for k, v in metrics.items()}


def test_an_fsdp_sharded_update_over_two_ranks_equals_one_process(tmp_path):
    """FSDP2 (fully_shard) on the CPU with gloo: every block, the value head and the root
    sharded over two ranks; gradients summed by FSDP's reduce-scatter, not by our all-reduce."""
    config = PPOConfig(
        update_epochs=2,
        num_minibatches=1,
        grad_accum_steps=2,
        vf_coef=0.1,
        norm_adv=True,
        max_grad_norm=1.0,
    )
    ref_params, ref_metrics = _lm_update(None, config)
    (params, metrics), (other, _) = run_ranks(_lm_update_fsdp, tmp_path, config)
    assert other == {}  # the full weights gather on rank 0 only
    assert set(params) == set(ref_params)
    for k in ref_params:
        torch.testing.assert_close(params[k], ref_params[k], rtol=1e-4, atol=2e-6, msg=k)
    for k in ("policy_loss", "value_loss", "approx_kl", "grad_norm"):
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-4, abs=1e-6), k


# ---------------------------------------------------------------- the text trainer's prompts


def _text_run_prompts(dist: Dist | None, runs_dir: str) -> list[list[str]]:
    """The prompts of each iteration's rollout of a short Toy run (this rank's rows)."""
    import textenv.agents.text as text

    seen: list[list[str]] = []
    real = text.collect_rollout

    def spy(*args, **kw):
        rollout = real(*args, **kw)
        seen.append(list(rollout.prompts))
        return rollout

    text.collect_rollout = spy
    try:
        text.train_text(
            text.TextTrainConfig(
                task="Toy",
                model="tiny",
                num_envs=8,
                max_new_tokens=2,
                iterations=3,
                eval_samples=0,
                ppo=PPOConfig(update_epochs=1, num_minibatches=2),
                lm=LMConfig(device="cpu"),
                logging=LoggingConfig(
                    runs_dir=runs_dir, progress=False, tensorboard=False, save_checkpoint=False
                ),
            )
        )
    finally:
        text.collect_rollout = real
    return seen


def test_global_row_j_draws_the_same_prompt_with_one_or_two_processes(tmp_path):
    one = _text_run_prompts(None, str(tmp_path / "one"))
    ranks = run_ranks(_text_run_prompts, tmp_path, str(tmp_path / "two"))
    for it in range(3):
        assert ranks[0][it] + ranks[1][it] == one[it]
    # Each iteration draws afresh: the row seeds of consecutive iterations do not overlap, so an
    # iteration is not the previous one shifted by a row (as it was when they overlapped).
    assert all(one[it + 1][:-1] != one[it][1:] for it in range(2))


# ---------------------------------------------------------------- the end of a run


def _wait_for(path: Path, seconds: float = 120.0) -> None:
    """Poll for ``path``; the deadline only ends a hang (a barrier that never releases)."""
    import time

    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _timed_run(rank: int, port: int, out: str, rank_one_fails: bool) -> None:
    """One rank of a torchrun-like run: rank 0's body ends after rank 1's (as rank 0 alone
    evaluates at the end of a run), ordered by files rather than by a margin of time; with
    ``rank_one_fails``, rank 0's body ends only once rank 1 has left the run."""
    import time

    from textenv.agents.distributed import PeerFailed, distributed_run

    os.environ |= {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(WORLD),
        "LOCAL_RANK": str(rank),
    }
    times = {}
    try:
        with distributed_run(torch.device("cpu")) as (dist, _):
            assert dist.active and dist.world_size == WORLD
            if rank == 0:
                # Rank 1's file says its body ended (it then waits at the end-of-run barrier)
                # or, when it failed, that it has left the run.
                _wait_for(Path(out) / ("rank1.pt" if rank_one_fails else "rank1.body"))
                time.sleep(0.2)  # without a barrier, rank 1 would have left by now
            elif rank_one_fails:
                raise ValueError("rank 1 failed")
            times["body_end"] = time.monotonic()
            if rank == 1:
                (Path(out) / "rank1.body").touch()
    except (ValueError, PeerFailed) as err:
        times["error"] = type(err).__name__
    times["left"] = time.monotonic()
    times["initialized"] = tdist.is_initialized()
    torch.save(times, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("rank_one_fails", [False, True])
def test_ranks_leave_a_run_together_unless_one_failed(tmp_path, rank_one_fails):
    """A finished rank waits for the others before tearing the process group down; a failed
    one tears it down at once, and never waits for ranks that may never arrive; the others
    learn of it at the barrier."""
    mp.start_processes(
        _timed_run,
        args=(_free_port(), str(tmp_path), rank_one_fails),
        nprocs=WORLD,
        start_method="spawn",
    )
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert not zero["initialized"] and not one["initialized"]
    if rank_one_fails:
        assert one["left"] < zero["body_end"]
        assert (zero["error"], one["error"]) == ("PeerFailed", "ValueError")
    else:
        assert one["left"] >= zero["body_end"]
        assert "error" not in zero and "error" not in one
