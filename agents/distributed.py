"""Several processes, one run: both trainers on ``torch.distributed``, launched by ``torchrun``.

A plain ``python -m ...`` run is world size 1 and never touches ``torch.distributed``. Under
``torchrun`` (its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables are set) each process owns
its envs and its share of the batch; the backend is ``gloo`` for a CPU run and ``nccl`` for
CUDA, each rank on ``cuda:LOCAL_RANK``.

Gradients are summed over ranks with explicit all-reduces (:meth:`Dist.reduce_gradients`),
not DDP: the one PPO core (:func:`textenv.agents.ppo.ppo_update`) calls its models through
``evaluate`` callables and accumulates micro-batches, and each rank divides its loss by the
*global* count of samples or tokens, so the summed gradient is exactly the one-process
gradient of the whole minibatch, whatever the ranks' masks. Statistics that define the
algorithm are global the same way: advantage whitening, the KL that drives β and target-KL,
normalisation statistics, logged metrics.

A process that fails prints its error and exits; the others find out at their next collective
(gloo reports the closed connection at once; ``torchrun`` also stops every worker when one
exits non-zero) and stop with :class:`PeerFailed`, never hang.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as tdist

# Gradients are reduced in buckets of this many elements (64 MiB of fp32), as DDP buckets them:
# few collectives, and no model-sized temporary.
BUCKET_NUMEL = 1 << 24


class PeerFailed(RuntimeError):
    """Another process of the run failed or stopped; this one stops too (that process prints its
    error)."""


def launched_by_torchrun() -> bool:
    """Whether this process is one of ``torchrun``'s workers (or was launched like one)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int | None:
    """This process's rank under torchrun, None otherwise (for prefixing error lines)."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else None


@dataclass
class Dist:
    """The process group a trainer runs in; world size 1 (and every method a no-op) without one."""

    rank: int = 0
    world_size: int = 1
    active: bool = False
    """a process group is initialised (also at world size 1 under torchrun, so its backend is
    exercised)"""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """where collectives run: the rank's GPU with nccl, the CPU with gloo"""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only writer of logs, samples and checkpoints."""
        return self.rank == 0

    @contextmanager
    def _collective(self) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, tdist.DistError) as err:
            # The collective's own message (a socket error) says nothing the user can act on.
            raise PeerFailed(
                "stopped: another process of the run failed or exited; its error is printed "
                "beside this one"
            ) from err

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over ranks in place (``sum`` or ``max``) and return it."""
        if not self.active:
            return tensor
        reduce_op = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op]
        moved = tensor.to(self.device)
        with self._collective():
            tdist.all_reduce(moved, op=reduce_op)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """The sums over ranks of several tensors, in one collective (float64 for exact counts)."""
        if not self.active:
            return list(values)
        flat = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in values])
        self.all_reduce(flat)
        out, start = [], 0
        for v in values:
            out.append(flat[start : start + v.numel()].reshape(v.shape).to(v.dtype))
            start += v.numel()
        return out

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank (small, picklable objects)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective():
            tdist.all_gather_object(out, obj)
        return out

    def broadcast_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's ``params`` (the same start everywhere)."""
        if not self.active or self.world_size == 1:
            return
        for bucket in _buckets(list(params)):
            flat = torch.cat([p.detach().reshape(-1) for p in bucket]).to(self.device)
            with self._collective():
                tdist.broadcast(flat, src=0)
            _unflatten_into(flat, [p.data for p in bucket])

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over ranks (a missing gradient counts as zero)."""
        if not self.active or self.world_size == 1:
            return
        params = list(params)
        sharded = [p for p in params if _is_dtensor(p)]
        # FSDP reduce-scattered these gradients itself, as a mean over ranks; each rank's loss is
        # its share of the global mean, so the gradient is the sum (a divide factor of 1 would
        # say so to FSDP, but gloo has no pre-multiplied sum).
        for p in sharded:
            if p.grad is not None:
                p.grad.mul_(self.world_size)
        grads = []
        for p in params:
            if _is_dtensor(p):
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self.all_reduce(flat)
            _unflatten_into(flat, bucket)

    def check_local_batch(self, ppo_config: Any, local_batch: int) -> None:
        """``ppo_config.validate`` on one rank's share of the batch, its error naming the split."""
        if self.world_size == 1:
            return
        try:
            ppo_config.validate(local_batch)
        except ValueError as err:
            raise ValueError(
                f"{err} (each of the {self.world_size} processes updates on its share of "
                f"{local_batch} samples)"
            ) from None

    def check_divides(self, name: str, value: int) -> int:
        """``value // world_size``, or a one-line error when it does not divide evenly."""
        if value % self.world_size:
            raise ValueError(
                f"{name}={value} must divide evenly over the {self.world_size} processes of the run"
            )
        return value // self.world_size


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_policy(policy: torch.nn.Module, lm: torch.nn.Module) -> None:
    """Shard ``policy`` (an :class:`textenv.agents.lm.LMActorCritic`) over the ranks with FSDP2.

    Each transformer block (the model's ``_no_split_modules`` classes) is its own
    ``fully_shard`` unit, the value head another (it stays fp32 beside a bf16 model), and the
    root holds the rest (embeddings, final norm, LM head). The methods the trainer calls
    instead of ``forward`` are registered with FSDP, and gradients are summed over ranks, not
    averaged (:meth:`Dist.reduce_gradients`): each rank's loss is already its share of the
    global mean.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    names = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in lm.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"--fsdp: cannot find the transformer blocks of {type(lm).__name__} "
            "(it lists no _no_split_modules)"
        )
    for block in blocks:
        fully_shard(block)
    value_head = getattr(policy, "value_head", None)
    if value_head is not None:
        fully_shard(value_head)
    fully_shard(policy)
    for method in ("_forward", "evaluate_responses"):
        register_fsdp_forward_method(policy, method)
    # The trainers never modify the policy's outputs in place, which is what this warns about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP-sharded ``module`` on rank 0, in CPU memory
    (a collective: every rank calls it; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    # A model's state dict holds tensors only (torch types it as any state value).
    return cast(dict[str, torch.Tensor], state)


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    numel = 0
    for t in tensors:
        if bucket and numel + t.numel() > BUCKET_NUMEL:
            yield bucket
            bucket, numel = [], 0
        bucket.append(t)
        numel += t.numel()
    if bucket:
        yield bucket


def _unflatten_into(flat: torch.Tensor, targets: list[torch.Tensor]) -> None:
    start = 0
    for t in targets:
        t.copy_(flat[start : start + t.numel()].view_as(t))
        start += t.numel()


_OWNED = False  # whether this module initialised the process group (and so destroys it)


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """The run's :class:`Dist` and this rank's device.

    Under torchrun the process group is initialised here (``nccl`` for a CUDA ``device``,
    each rank on ``cuda:LOCAL_RANK``; ``gloo`` otherwise); a group initialised by the caller
    (tests spawning processes) is used as it is. Without either, world size 1.
    """
    global _OWNED
    if not tdist.is_available() or (not tdist.is_initialized() and not launched_by_torchrun()):
        return Dist(device=torch.device("cpu")), device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"rank with LOCAL_RANK={local_rank} has no GPU of its own "
                f"({torch.cuda.device_count()} visible); start at most one process per GPU "
                "(--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owned = not tdist.is_initialized()
    if owned:
        # torch.distributed.nn.functional binds group.WORLD as its functions' default group when
        # first imported, and torch._dynamo imports it (torch.optim's first step imports dynamo).
        # Imported after the group exists, it keeps the group alive past destroy_process_group,
        # its gloo threads still running at interpreter exit, where a rank has aborted
        # ("terminate called without an active exception"). Imported first, it binds None.
        importlib.import_module("torch.distributed.nn.functional")

        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        tdist.init_process_group(backend=backend, **kwargs)
    _OWNED = owned
    comm_device = device if tdist.get_backend() == "nccl" else torch.device("cpu")
    return Dist(
        rank=tdist.get_rank(), world_size=tdist.get_world_size(), active=True, device=comm_device
    ), device


@contextmanager
def distributed_run(device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """``(dist, this rank's device)`` for one training run (:func:`init_distributed`), the
    process group destroyed at the end if the run created it: with gloo after every rank has
    finished when the run ends normally (rank 0 may still be evaluating), at once when it raised."""
    finished = False
    try:
        yield init_distributed(device)
        finished = True
    finally:
        shutdown_distributed(synchronize=finished)


def shutdown_distributed(*, synchronize: bool) -> None:
    """Destroy the process group if :func:`init_distributed` created it (at the end of a run).

    ``synchronize``: with gloo, wait at a barrier first, so that no rank tears its connections
    down while another still uses them, and a peer that failed at the end is a :class:`PeerFailed`.
    Not with nccl, whose teardown finalizes its own communicators and whose barrier would time
    out (10 minutes) on ranks waiting for a long final evaluation on rank 0.

    The group is freed here, its threads joined, not at interpreter exit: torch's caches that
    would keep it alive are cleared (a gloo group alive at exit has aborted a rank).
    """
    global _OWNED
    owned, _OWNED = _OWNED, False
    if not (owned and tdist.is_initialized()):
        return
    try:
        if synchronize and tdist.get_backend() == "gloo":
            with Dist()._collective():
                tdist.barrier()
    finally:
        tdist.destroy_process_group()
        _drop_device_meshes()
        # The group's last references may sit in cycles: free it (and join its threads) now.
        gc.collect()


def _drop_device_meshes() -> None:
    """Clear ``torch.distributed.tensor``'s caches, which keep the device meshes of a sharded
    run, and with them its process group, alive past ``destroy_process_group``."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    try:
        from torch.distributed.tensor import _collective_utils, _redistribute, debug

        debug._clear_sharding_prop_cache()
        _redistribute.clear_redistribute_planner_cache()
        _redistribute._gen_transform_infos.cache_clear()
        _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()
    except (ImportError, AttributeError):
        # Another torch's internals; tests/test_torchrun.py checks that no group outlives a run.
        pass


def sync_running_stats(
    state: dict[str, np.ndarray], synced: dict[str, np.ndarray] | None, dist: Dist
) -> dict[str, np.ndarray]:
    """Global running mean/var statistics from each rank's local ones.

    ``state`` holds this rank's statistics (``normalization_state`` keys: ``<name>.mean``,
    ``.var``, ``.count``); ``synced`` the global ones of the last sync (None at the start,
    when every rank holds the same initial values). Each rank's updates since then form a
    batch whose count, mean and variance are recovered exactly from the two (Chan et al.'s
    parallel formula, inverted); the batches of every rank are merged in rank order into
    ``synced``. Every rank gets the same result.
    """
    if not dist.active or dist.world_size == 1 or not state:
        return state
    if synced is None:
        synced = state
    increments = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in state}):
        increments[name] = _increment(
            *(np.asarray(state[f"{name}.{s}"], np.float64) for s in ("mean", "var", "count")),
            *(np.asarray(synced[f"{name}.{s}"], np.float64) for s in ("mean", "var", "count")),
        )
    merged: dict[str, np.ndarray] = {}
    gathered = dist.gather(increments)
    for name in increments:
        mean, var, count = (
            np.asarray(synced[f"{name}.{s}"], np.float64) for s in ("mean", "var", "count")
        )
        for rank_increments in gathered:
            b_mean, b_var, b_count = rank_increments[name]
            mean, var, count = _merge(mean, var, count, b_mean, b_var, b_count)
        merged |= {f"{name}.mean": mean, f"{name}.var": var, f"{name}.count": count}
    return merged


def _increment(mean1, var1, n1, mean0, var0, n0):
    """The batch that took statistics ``(mean0, var0, n0)`` to ``(mean1, var1, n1)``."""
    nb = n1 - n0
    if nb <= 0:
        return mean0, var0, np.zeros_like(n0)
    mean_b = (n1 * mean1 - n0 * mean0) / nb
    m2_b = var1 * n1 - var0 * n0 - (mean_b - mean0) ** 2 * n0 * nb / n1
    return mean_b, np.maximum(m2_b / nb, 0.0), nb


def _merge(mean_a, var_a, n_a, mean_b, var_b, n_b):
    if n_b <= 0:
        return mean_a, var_a, n_a
    total = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / total
    m2 = var_a * n_a + var_b * n_b + delta**2 * n_a * n_b / total
    return mean, m2 / total, total
