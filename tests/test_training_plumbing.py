"""The plumbing both trainers share (textenv.agents.training): seeding, the LR schedule's branches, the
run's failure, interruption and summary paths, each checked directly."""

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from textenv.agents.checkpoint import TrainingInterrupted
from textenv.agents.ppo import NonFiniteTraining
from textenv.agents.training import LinearLR, TrainingRun, seed_everything


def test_seed_everything_seeds_python_numpy_and_torch():
    draws = []
    for _ in range(2):
        seed_everything(11)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1]
    seed_everything(12)
    other = (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert all(a != b for a, b in zip(draws[0], other))


def test_resumed_schedule_without_annealing_is_constant():
    fresh = LinearLR(1e-3, 10)
    off = LinearLR.resumed(fresh.state(), 4, 1e-3, 20, enabled=False)
    assert isinstance(off, LinearLR) and not off.enabled and off.rate(5) == off.rate(19) == 1e-3


class _Saver:
    def __init__(self, tmp_path):
        self.calls, self.tmp_path = [], tmp_path

    def __call__(self, iteration):
        self.calls.append(iteration)
        return self.tmp_path / f"ckpt{iteration}"


def _run(tmp_path, **kw):
    saver = _Saver(tmp_path)
    return TrainingRun(tmp_path, tensorboard=False, checkpoint=saver, **kw), saver


def test_a_recoverable_failure_saves_the_last_good_iteration_and_says_where(tmp_path):
    run, saver = _run(tmp_path)
    assert run.last_iteration == 0
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(
        NonFiniteTraining,
        match=r"boom; the last good state \(iteration 2\) is saved in .*ckpt2, "
        r"continue with --resume",
    ):
        with run.loop():
            assert (
                signal.getsignal(signal.SIGTERM) != before
            )  # recorded, not fatal, inside the loop
            run.end_iteration(1, 10, {"updates": 1.0}, "x")
            run.end_iteration(2, 20, {"updates": 1.0}, "x")
            raise NonFiniteTraining("boom")
    assert saver.calls == [2] and signal.getsignal(signal.SIGTERM) == before  # handlers restored
    assert run.logger._jsonl.closed
    assert [
        json.loads(l)["global_step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ] == [10, 20]


@pytest.mark.parametrize("save_on_failure, iterations", [(False, 2), (True, 0)])
def test_a_failure_is_reraised_unchanged_without_saving_when_off_or_before_any_iteration(
    tmp_path, save_on_failure, iterations
):
    run, saver = _run(tmp_path)
    with pytest.raises(NonFiniteTraining, match=r"^boom$"):
        with run.loop(save_on_failure=save_on_failure):
            for i in range(1, iterations + 1):
                run.end_iteration(i, i, {"updates": 1.0}, "x")
            raise NonFiniteTraining("boom")
    assert saver.calls == []


def test_other_errors_pass_through_and_extra_recoverable_types_are_saved(tmp_path):
    run, saver = _run(tmp_path, recoverable=(KeyError,))
    with pytest.raises(ValueError, match="^bad$"):
        with run.loop():
            run.end_iteration(1, 1, {"updates": 1.0}, "x")
            raise ValueError("bad")
    assert saver.calls == []
    run, saver = _run(tmp_path / "b", recoverable=(KeyError,))
    with pytest.raises(KeyError, match="last good state"):
        with run.loop():
            run.end_iteration(1, 1, {"updates": 1.0}, "x")
            raise KeyError("k")
    assert saver.calls == [1]


def test_a_streak_of_skipped_updates_stops_the_run_with_the_last_state_saved(tmp_path):
    run, saver = _run(tmp_path)
    with pytest.raises(
        NonFiniteTraining, match=r"3 iterations in a row \(at 3\).*\(iteration 3\) is saved"
    ):
        with run.loop():
            for i in range(1, 10):
                run.end_iteration(i, i, {"updates": 0.0}, f"(at {i})")
    assert saver.calls == [3]


def test_a_signal_during_an_iteration_checkpoints_it_and_raises_interrupted(tmp_path):
    run, saver = _run(tmp_path)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 20") as info:
        with run.loop():
            run.end_iteration(1, 10, {"updates": 1.0}, "x")
            os.kill(os.getpid(), signal.SIGTERM)
            run.end_iteration(2, 20, {"updates": 1.0}, "x")
            run.end_iteration(3, 30, {"updates": 1.0}, "x")  # never reached
    assert (
        saver.calls == [2]
        and info.value.checkpoint == tmp_path / "ckpt2"
        and run.logger._jsonl.closed
    )


def test_finish_writes_the_summary_with_null_for_nan_and_closes_the_logs(tmp_path):
    run, _ = _run(tmp_path)
    out = run.finish({"score": float("nan"), "steps": 3})
    assert out == {"score": None, "steps": 3}
    assert json.loads((tmp_path / "summary.json").read_text()) == {"score": None, "steps": 3}
    assert run.logger._jsonl.closed


def test_directory_writes_the_config_for_a_new_run_and_reuses_a_resumed_one(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        lr: float = 0.1

    fresh = TrainingRun.directory(str(tmp_path), "r1", "p", Cfg(), None)
    assert fresh == tmp_path / "r1" and json.loads((fresh / "config.json").read_text()) == {
        "lr": 0.1
    }
    assert (
        TrainingRun.directory(str(tmp_path), None, "p", Cfg(), tmp_path / "old") == tmp_path / "old"
    )


def test_end_iteration_outside_the_loop_logs_without_signal_handling(tmp_path):
    run, saver = _run(tmp_path)
    run.end_iteration(1, 5, {"updates": 1.0}, "x")  # e.g. a caller driving iterations by hand
    assert run.last_iteration == 1 and saver.calls == []
    run.logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["global_step"] == 5


def test_packed_training_state_restores_every_rng_and_the_optimizer_exactly():
    import random

    import numpy as np
    import torch

    from textenv.agents.checkpoint import pack_training_state, unpack_training_state

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.tensor([1.0, -2.0, 0.5])
    optimizer.step()
    generator = torch.Generator().manual_seed(5)
    np.random.normal()  # leaves a cached Gaussian in numpy's legacy state
    tensors, metadata = pack_training_state(optimizer, generator)
    # Written at once, as the trainers do (on CPU the packed tensors share the live optimizer's storage).
    from safetensors.torch import load, save

    tensors = load(save(tensors, metadata=metadata))

    def draws():
        return (
            torch.rand(3).tolist(),
            torch.rand(3, generator=generator).tolist(),
            np.random.normal(size=3).tolist(),
            np.random.rand(2).tolist(),
            [random.random(), random.gauss(0, 1)],
        )

    expected = draws()
    saved_state = {k: v.clone() for k, v in optimizer.state[param].items()}
    param.grad = torch.tensor([3.0, 3.0, 3.0])
    optimizer.step()  # the live optimizer moves on
    fresh = torch.optim.Adam([param], lr=0.1)
    unpack_training_state(tensors, metadata, fresh, generator, torch.device("cpu"))
    assert draws() == expected
    for key, value in saved_state.items():
        assert torch.equal(fresh.state[param][key], value), key
    with pytest.raises(ValueError, match="holds no optimizer state"):
        unpack_training_state(tensors, {}, fresh, generator, torch.device("cpu"))
