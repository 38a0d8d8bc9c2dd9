"""Training-state round trips in the cases the trainers' own tests do not reach: numpy's cached
Gaussian, optimizers with dotted state names, checkpoints moved between machines, signal messages."""

import signal

import numpy as np
import pytest
import torch

from textenv.agents.checkpoint import StopSignals, pack_training_state, unpack_training_state


def _optimizer():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    return opt


@pytest.mark.parametrize("normals_before", [0, 1])  # numpy caches the second Gaussian of each pair
def test_numpys_gaussian_cache_is_restored(normals_before):
    np.random.seed(0)
    np.random.random(5)
    np.random.standard_normal(normals_before)
    tensors, metadata = pack_training_state(_optimizer(), None)
    expected = np.random.standard_normal(3)
    np.random.seed(99)
    unpack_training_state(tensors, metadata, _optimizer(), None, torch.device("cpu"))
    np.testing.assert_array_equal(np.random.standard_normal(3), expected)


class _DottedState(torch.optim.SGD):
    """An optimizer whose per-parameter state has a dotted name."""

    def step(self, closure=None):
        super().step(closure)
        for p in self.param_groups[0]["params"]:
            self.state[p]["ema.fast"] = p.detach().clone() * 2


def test_an_optimizer_state_with_dotted_names_round_trips():
    param = torch.nn.Parameter(torch.arange(3.0))
    opt = _DottedState([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    tensors, metadata = pack_training_state(opt, None)
    fresh = _DottedState([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    unpack_training_state(tensors, metadata, fresh, None, torch.device("cpu"))
    torch.testing.assert_close(
        next(iter(fresh.state.values()))["ema.fast"], (torch.arange(3.0) - 0.1) * 2
    )


def test_a_checkpoint_with_a_generator_resumes_without_one_and_a_gpu_checkpoint_resumes_on_cpu():
    gen = torch.Generator().manual_seed(3)
    tensors, metadata = pack_training_state(_optimizer(), gen)
    tensors["rng.cuda"] = torch.zeros(16, dtype=torch.uint8)  # as written on a CUDA machine
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only path")
    unpack_training_state(
        tensors, metadata, _optimizer(), None, torch.device("cpu")
    )  # neither raises


def test_the_cuda_rng_is_restored_only_from_a_checkpoint_that_has_it(monkeypatch):
    calls = []
    tensors, metadata = pack_training_state(_optimizer(), None)
    if "rng.cuda" in tensors:
        pytest.skip("needs a checkpoint written on a CPU-only machine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resuming it on a CUDA machine
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: calls.append(state))
    unpack_training_state(tensors, metadata, _optimizer(), None, torch.device("cpu"))
    assert calls == []
    tensors["rng.cuda"] = torch.arange(16, dtype=torch.uint8)
    unpack_training_state(tensors, metadata, _optimizer(), None, torch.device("cpu"))
    assert len(calls) == 1 and torch.equal(calls[0], tensors["rng.cuda"])


@pytest.mark.parametrize("signum,key", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_the_first_signal_says_how_to_stop_at_once(capsys, signum, key):
    stop = StopSignals()
    stop._record(signum, None)
    assert stop.received == signum
    err = capsys.readouterr().err
    assert (
        f"{signal.Signals(signum).name}: stopping after this iteration with a checkpoint ({key} again stops at once)"
        in err
    )
