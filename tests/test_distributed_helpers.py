"""The bookkeeping around ``torch.distributed``'s collectives, in this process.

``tests/test_distributed.py`` and ``tests/test_torchrun.py`` run real gloo groups in spawned
processes. Here the collectives are replaced by a scripted peer (rank 1 of 2, whose
contribution is known), so what :class:`Dist` does around them (flattening, bucketing,
dtypes, missing gradients, the order of the pieces) is checked against exact values.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import textenv.agents.distributed as distributed
from textenv.agents.distributed import Dist, PeerFailed


class ScriptedPeer:
    """Stands in for ``torch.distributed``'s collectives: the other rank holds ``peer_scale`` times
    this rank's values; rank 0 broadcasts ``0, 1, 2, ...``; every call is recorded."""

    def __init__(self, peer_scale: float = 3.0, peer_object=None):
        self.peer_scale = peer_scale
        self.peer_object = peer_object
        self.calls: list[tuple] = []

    def all_reduce(self, tensor, op):
        self.calls.append(("all_reduce", tensor.dtype, tensor.numel(), op))
        if op == distributed.tdist.ReduceOp.SUM:
            tensor.add_(tensor * self.peer_scale)
        else:
            torch.maximum(tensor, tensor * self.peer_scale, out=tensor)

    def broadcast(self, tensor, src):
        self.calls.append(("broadcast", tensor.numel(), src))
        tensor.copy_(torch.arange(tensor.numel(), dtype=tensor.dtype))

    def all_gather_object(self, out, obj):
        self.calls.append(("all_gather_object",))
        out[0], out[1] = obj, self.peer_object


@pytest.fixture
def peer(monkeypatch):
    scripted = ScriptedPeer()
    for name in ("all_reduce", "broadcast", "all_gather_object"):
        monkeypatch.setattr(distributed.tdist, name, getattr(scripted, name))
    return scripted


TWO = Dist(rank=1, world_size=2, active=True)


def test_rank_zero_is_the_main_process_and_a_plain_dist_is_one_process():
    assert Dist().rank == 0 and Dist().world_size == 1 and Dist().is_main and not Dist().active
    assert Dist(rank=0, world_size=2, active=True).is_main and not TWO.is_main


def test_all_reduce_sums_or_maxes_in_place_and_returns_the_tensor(peer):
    x = torch.tensor([1.0, -2.0])
    assert TWO.all_reduce(x) is x
    torch.testing.assert_close(x, torch.tensor([4.0, -8.0]))
    y = torch.tensor([1.0, -2.0])
    TWO.all_reduce(y, op="max")
    torch.testing.assert_close(y, torch.tensor([3.0, -2.0]))


def test_without_a_group_every_collective_is_the_identity_and_calls_nothing(peer):
    alone = Dist()
    x = torch.tensor([1.0, 2.0])
    assert alone.all_reduce(x) is x and x.tolist() == [1.0, 2.0]
    assert alone.sum(x, x)[1] is x
    assert alone.gather({"a": 1}) == [{"a": 1}]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 5.0)
    alone.broadcast_parameters([p])
    alone.reduce_gradients([p])
    assert p.tolist() == [1.0, 1.0] and p.grad.tolist() == [5.0, 5.0]
    # An active group of one process also skips the parameter collectives (nothing to agree on).
    one = Dist(world_size=1, active=True)
    one.broadcast_parameters([p])
    one.reduce_gradients([p])
    assert p.grad.tolist() == [5.0, 5.0]
    assert peer.calls == []


def test_sum_reduces_several_tensors_in_one_float64_collective_and_restores_shapes_and_dtypes(peer):
    count = torch.tensor(3, dtype=torch.int64)
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    half = torch.tensor([0.5], dtype=torch.float16)
    out = TWO.sum(count, rows, half)
    assert peer.calls == [("all_reduce", torch.float64, 1 + 4 + 1, distributed.tdist.ReduceOp.SUM)]
    assert out[0].dtype == torch.int64 and out[0].shape == () and out[0].item() == 12
    torch.testing.assert_close(out[1], rows * 4)
    assert out[2].dtype == torch.float16 and out[2].tolist() == [2.0]
    assert rows.tolist() == [[1.0, 2.0], [3.0, 4.0]]  # the inputs are left alone


def test_gather_returns_every_ranks_object_in_rank_order(peer):
    peer.peer_object = "theirs"
    assert TWO.gather("mine") == ["mine", "theirs"]


def test_a_failed_collective_is_peer_failed(monkeypatch):
    def closed(*args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(distributed.tdist, "all_reduce", closed)
    with pytest.raises(PeerFailed, match="another process of the run failed or exited"):
        TWO.all_reduce(torch.zeros(1))


def test_broadcast_writes_rank_zeros_values_into_every_parameter_in_order(peer, monkeypatch):
    monkeypatch.setattr(distributed, "BUCKET_NUMEL", 5)  # 2x2 and 3 in one bucket, then 4
    params = [
        torch.nn.Parameter(torch.zeros(2, 2)),
        torch.nn.Parameter(torch.zeros(3)),
        torch.nn.Parameter(torch.zeros(4)),
    ]
    TWO.broadcast_parameters(params)
    assert [c[:2] for c in peer.calls] == [("broadcast", 4), ("broadcast", 3), ("broadcast", 4)]
    assert all(c[2] == 0 for c in peer.calls)
    assert params[0].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert params[1].tolist() == [0.0, 1.0, 2.0]
    assert params[2].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_reduce_gradients_sums_every_gradient_in_buckets_and_counts_a_missing_one_as_zero(
    peer, monkeypatch
):
    monkeypatch.setattr(distributed, "BUCKET_NUMEL", 4)
    a, b, c = (torch.nn.Parameter(torch.zeros(shape)) for shape in ((2, 2), (3,), (1,)))
    a.grad = torch.arange(4.0).reshape(2, 2)
    c.grad = torch.tensor([-1.0])
    TWO.reduce_gradients(p for p in (a, b, c))  # any iterable, as model.parameters() is
    assert [call[2] for call in peer.calls] == [
        4,
        4,
    ]  # [a], [b, c]: a bucket is never over its size
    torch.testing.assert_close(a.grad, torch.arange(4.0).reshape(2, 2) * 4)
    torch.testing.assert_close(
        b.grad, torch.zeros(3)
    )  # this rank had none: zeros, reduced like the rest
    torch.testing.assert_close(c.grad, torch.tensor([-4.0]))


def test_buckets_keep_order_and_never_split_a_tensor(monkeypatch):
    monkeypatch.setattr(distributed, "BUCKET_NUMEL", 10)
    sizes = [4, 6, 1, 12, 3, 7, 10]
    buckets = list(distributed._buckets([torch.zeros(n) for n in sizes]))
    assert [[t.numel() for t in bucket] for bucket in buckets] == [[4, 6], [1], [12], [3, 7], [10]]
    assert list(distributed._buckets([])) == []


def test_batch_checks_name_the_split():
    from textenv.agents.ppo import PPOConfig

    assert TWO.check_divides("num_envs", 8) == 4 and type(TWO.check_divides("num_envs", 8)) is int
    with pytest.raises(
        ValueError, match="^num_envs=7 must divide evenly over the 2 processes of the run$"
    ):
        TWO.check_divides("num_envs", 7)
    assert Dist().check_divides("num_envs", 7) == 7
    TWO.check_local_batch(PPOConfig(num_minibatches=2), 4)
    with pytest.raises(
        ValueError, match=r"\(each of the 2 processes updates on its share of 3 samples\)$"
    ):
        TWO.check_local_batch(PPOConfig(num_minibatches=2), 3)
    Dist().check_local_batch(
        PPOConfig(num_minibatches=2), 3
    )  # one process: the trainer's own validate() says it


def test_torchrun_is_recognised_by_its_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched_by_torchrun() and distributed.env_rank() is None
    monkeypatch.setenv("RANK", "3")
    assert not distributed.launched_by_torchrun()
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.launched_by_torchrun() and distributed.env_rank() == 3


def test_without_torchrun_or_a_group_a_run_is_one_process_on_its_device(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with distributed.distributed_run(torch.device("meta")) as (dist, device):
        assert dist == Dist() and device == torch.device("meta")
    assert not distributed.tdist.is_initialized()


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return x.mean(0), x.var(0), np.asarray(float(len(x)))


def test_increment_recovers_a_batch_and_merge_combines_two_exactly():
    rng = np.random.default_rng(0)
    old, new = rng.normal(2.0, 3.0, (40, 3)), rng.normal(-1.0, 0.5, (25, 3))
    both = np.concatenate([old, new])
    mean_b, var_b, n_b = distributed._increment(*_stats(both), *_stats(old))
    for got, want in zip((mean_b, var_b, n_b), _stats(new)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(distributed._merge(*_stats(old), *_stats(new)), _stats(both)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # No new data: an empty increment, which merging leaves out.
    mean0, var0, n0 = _stats(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 for a rank that saw nothing new
        empty_mean, empty_var, empty = distributed._increment(mean0, var0, n0, mean0, var0, n0)
    assert float(empty) == 0.0 and np.isfinite(empty_mean).all() and np.isfinite(empty_var).all()
    for got, want in zip(
        distributed._merge(mean0, var0, n0, mean0 + 5, var0 + 5, empty), (mean0, var0, n0)
    ):
        np.testing.assert_array_equal(got, want)
    # One new observation is a batch of one, merged like any other.
    one = np.concatenate([old, new[:1]])
    for got, want in zip(distributed._increment(*_stats(one), *_stats(old)), _stats(new[:1])):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(distributed._merge(*_stats(old), *_stats(new[:1])), _stats(one)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # Rounding cannot make a recovered variance negative.
    const = np.ones((10, 2))
    _, var_c, _ = distributed._increment(*_stats(np.concatenate([const, const])), *_stats(const))
    assert np.all(var_c >= 0)


def test_sync_running_stats_merges_every_ranks_new_data_in_rank_order(peer):
    rng = np.random.default_rng(1)
    start, mine, theirs = (
        rng.normal(size=(30, 2)),
        rng.normal(3.0, 2.0, (12, 2)),
        rng.normal(-2.0, 1.0, (5, 2)),
    )

    def state(x):
        mean, var, count = _stats(x)
        return {"obs.mean": mean, "obs.var": var, "obs.count": count}

    synced = state(start)
    peer.peer_object = {
        "obs": distributed._increment(*_stats(np.concatenate([start, theirs])), *_stats(start))
    }
    merged = distributed.sync_running_stats(state(np.concatenate([start, mine])), synced, TWO)
    want = state(np.concatenate([start, mine, theirs]))
    assert merged.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(merged[key], want[key], rtol=1e-10, err_msg=key)
    # With no earlier sync every rank starts from the same statistics: this rank's are the start.
    peer.peer_object = {
        "obs": distributed._increment(*_stats(np.concatenate([start, theirs])), *_stats(start))
    }
    first = distributed.sync_running_stats(state(start), None, TWO)
    np.testing.assert_allclose(first["obs.count"], 35.0)
    # Statistics whose names hold dots are grouped by the last dot.
    dotted = {
        f"env.obs.{k.split('.')[-1]}": v for k, v in state(np.concatenate([start, mine])).items()
    }
    peer.peer_object = {
        "env.obs": distributed._increment(*_stats(np.concatenate([start, theirs])), *_stats(start))
    }
    merged = distributed.sync_running_stats(
        dotted, {f"env.obs.{k.split('.')[-1]}": v for k, v in synced.items()}, TWO
    )
    np.testing.assert_allclose(merged["env.obs.mean"], want["obs.mean"], rtol=1e-10)
    # Nothing to do for one process (even in a group of one) or no statistics.
    only = state(mine)
    assert distributed.sync_running_stats(only, synced, Dist()) is only
    assert distributed.sync_running_stats(only, synced, Dist(world_size=1, active=True)) is only
    assert distributed.sync_running_stats({}, synced, TWO) == {}
    assert len(peer.calls) == 3


def _torchrun_variables(monkeypatch, port: int) -> None:
    for name, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(port)),
    ):
        monkeypatch.setenv(name, value)


def test_under_torchrun_a_run_owns_its_gloo_group_and_destroys_it(monkeypatch):
    from tests.test_distributed import _free_port

    _torchrun_variables(monkeypatch, _free_port())
    with distributed.distributed_run(torch.device("cpu")) as (dist, device):
        assert dist == Dist(rank=0, world_size=1, active=True) and device == torch.device("cpu")
        assert distributed.tdist.get_backend() == "gloo"
    assert not distributed.tdist.is_initialized()


def test_a_group_the_caller_initialised_is_used_and_left_alone(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    distributed.tdist.init_process_group(
        "gloo", store=distributed.tdist.HashStore(), rank=0, world_size=1
    )
    try:
        with distributed.distributed_run(torch.device("cpu")) as (dist, _):
            assert dist.active and dist.world_size == 1
        assert distributed.tdist.is_initialized()
    finally:
        distributed.tdist.destroy_process_group()


def test_a_rank_without_a_gpu_of_its_own_is_a_one_line_error(monkeypatch):
    _torchrun_variables(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(
        ValueError,
        match=r"^rank with LOCAL_RANK=\d+ has no GPU of its own \(\d+ visible\); start at most "
        r"one process per GPU \(--nproc-per-node\)$",
    ):
        distributed.init_distributed(torch.device("cuda"))
    assert not distributed.tdist.is_initialized()
