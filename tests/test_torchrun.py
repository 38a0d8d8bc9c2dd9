"""The trainers launched by a real ``torchrun`` with two CPU processes (gloo): one run
directory, one summary, a signal that stops both ranks at the same iteration with one
checkpoint, a resume, and a failure on one rank that ends the whole run promptly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.torchrun_main import THREADS_LINE

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = [
    "--env-id",
    "CartPole-v1",
    "--num-envs",
    "8",
    "--num-steps",
    "16",
    "--no-progress",
    "--no-tensorboard",
    "--eval-episodes",
    "2",
]
TOY = [
    "--task",
    "Toy",
    "--model",
    "tiny",
    "--num-envs",
    "4",
    "--max-new-tokens",
    "3",
    "--no-tensorboard",
    "--no-progress",
    "--device",
    "cpu",
    "--eval-samples",
    "0",
    "--num-minibatches",
    "2",
]


def torchrun(module: str, args: list[str], nproc: int = 2, **kw) -> subprocess.Popen:
    """``torchrun -m module args``, each rank reporting the threads it has left when main returns."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "tests.torchrun_main",
        module,
        *args,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TEXTENV_TRACEBACK", None)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def finish(proc: subprocess.Popen, timeout: float = 180, nproc: int = 2) -> tuple[int, str, str]:
    """Wait for a torchrun launch; every rank whose main returned has left no gloo thread (a
    process group kept alive past the run has aborted a rank at exit)."""
    out, err = proc.communicate(timeout=timeout)
    left = [
        json.loads(line.split(THREADS_LINE, 1)[1])
        for line in err.splitlines()
        if THREADS_LINE in line
    ]
    assert not [name for names in left for name in names if "gloo" in name], left
    if proc.returncode == 0 and Path("/proc/self/task").is_dir():
        assert len(left) == nproc, err
    return proc.returncode, out, err


def summaries(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_two_process_classic_run_writes_one_run_and_resumes(tmp_path):
    code, out, err = finish(
        torchrun(
            "scripts.train", [*CARTPOLE, "--total-timesteps", "1024", "--runs-dir", str(tmp_path)]
        )
    )
    assert code == 0, err
    (summary,) = summaries(out)  # rank 0 alone prints it
    assert summary["world_size"] == 2 and summary["global_step"] == 1024
    (run_dir,) = tmp_path.iterdir()
    assert [m["iteration"] for m in metrics(run_dir)] == list(range(1, 9))
    assert "eval_return_mean" in summary

    code, out, err = finish(
        torchrun("scripts.train", ["--resume", str(run_dir), "--total-timesteps", "1536"])
    )
    assert code == 0, err
    assert summaries(out)[0]["global_step"] == 1536
    assert [m["iteration"] for m in metrics(run_dir)] == list(range(1, 13))
    assert "resumes with" not in err  # same world size: no note

    # Another process count continues the same run, and says what that means.
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.train",
            "--resume",
            str(run_dir),
            "--total-timesteps",
            "2048",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    assert "trained by 2 process(es) and resumes with 1" in one.stderr
    assert [m["iteration"] for m in metrics(run_dir)] == list(range(1, 17))


def test_batches_that_do_not_split_over_the_processes_are_one_line_errors(tmp_path):
    code, _, err = finish(
        torchrun(
            "scripts.train",
            [*CARTPOLE, "--num-envs", "7", "--num-steps", "4", "--runs-dir", str(tmp_path)],
        )
    )
    assert code != 0
    assert "error: rank 0: num_envs=7 must divide evenly over the 2 processes of the run" in err
    code, _, err = finish(
        torchrun(
            "scripts.train_text", [*TOY, "--num-minibatches", "4", "--runs-dir", str(tmp_path)]
        )
    )
    assert code != 0
    assert (
        "error: rank 0: num_minibatches=4 must be >= 1 and divide the batch size 2 (each of the 2 processes "
        "updates on its share of 2 samples)"
    ) in err
    assert not list(tmp_path.iterdir())


def test_sigterm_stops_every_rank_at_one_iteration_with_one_checkpoint(tmp_path):
    proc = torchrun(
        "scripts.train",
        [
            *CARTPOLE,
            "--total-timesteps",
            "100000000",
            "--runs-dir",
            str(tmp_path),
            "--checkpoint-every",
            "0",
        ],
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = list(tmp_path.iterdir())
        if runs and (runs[0] / "metrics.jsonl").is_file() and len(metrics(runs[0])) >= 3:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the run logged no iterations")
    proc.send_signal(signal.SIGTERM)
    # The deadline ends a hang (a rank left waiting in a collective); it times nothing.
    code, _, err = finish(proc, timeout=300)
    assert code != 0
    assert err.count("interrupted: SIGTERM") == 1, err  # rank 0 reports, once
    (run_dir,) = runs
    logged = metrics(run_dir)
    from safetensors import safe_open

    from textenv.agents.classic import load_checkpoint

    with safe_open(str(run_dir / "checkpoint.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert int(meta["iteration"]) == logged[-1]["iteration"]
    assert int(meta["world_size"]) == 2
    load_checkpoint(run_dir / "checkpoint.safetensors")
    # The interrupted run resumes where it stopped, on two processes again.
    stopped = logged[-1]["iteration"]
    code, out, err = finish(
        torchrun(
            "scripts.train",
            ["--resume", str(run_dir), "--total-timesteps", str((stopped + 2) * 8 * 16)],
        )
    )
    assert code == 0, err
    assert [m["iteration"] for m in metrics(run_dir)] == list(range(1, stopped + 3))


def test_a_reward_that_raises_on_one_rank_ends_every_rank(tmp_path):
    proc = torchrun(
        "scripts.train_text",
        [
            *TOY,
            "--iterations",
            "50",
            "--reward",
            "tests.rank_rewards:fails_on_rank_one",
            "--runs-dir",
            str(tmp_path),
        ],
    )
    code, _, err = finish(proc, timeout=300)  # the deadline ends a hang; it times nothing
    assert code != 0
    assert "error: rank 1: reward 'fails_on_rank_one' raised RuntimeError" in err, err


def test_a_two_process_text_run_and_its_resume(tmp_path):
    code, out, err = finish(
        torchrun("scripts.train_text", [*TOY, "--iterations", "2", "--runs-dir", str(tmp_path)])
    )
    assert code == 0, err
    (summary,) = summaries(out)
    assert summary["world_size"] == 2 and summary["iterations"] == 2
    (run_dir,) = tmp_path.iterdir()
    logged = metrics(run_dir)
    assert [m["iteration"] for m in logged] == [1, 2]
    code, out, err = finish(
        torchrun("scripts.train_text", ["--resume", str(run_dir), "--iterations", "3"])
    )
    assert code == 0, err
    assert [m["iteration"] for m in metrics(run_dir)] == [1, 2, 3]


def test_an_fsdp_sharded_text_run_equals_the_unsharded_one_and_saves_full_weights(tmp_path):
    """One iteration from the same weights samples the same rollout; the sharded update equals
    the unsharded one to float tolerance, and the checkpoint holds full weights that plain
    transformers loads."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("plain", []), ("fsdp", ["--fsdp"])):
        code, out, err = finish(
            torchrun(
                "scripts.train_text",
                [
                    *TOY,
                    "--iterations",
                    "1",
                    "--runs-dir",
                    str(tmp_path),
                    "--run-name",
                    name,
                    *extra,
                ],
            )
        )
        assert code == 0, err
        runs[name] = load_file(str(tmp_path / name / "policy" / "model.safetensors"))
    assert runs["plain"].keys() == runs["fsdp"].keys()
    for key, value in runs["plain"].items():
        assert runs["fsdp"][key].shape == value.shape, key
        torch_close(runs["fsdp"][key], value, key)
    from textenv.agents.text import evaluate_text_run

    assert evaluate_text_run(tmp_path / "fsdp", samples=2, seed=0)["responses"] == 2
    code, _, err = finish(
        torchrun("scripts.train_text", ["--resume", str(tmp_path / "fsdp"), "--iterations", "2"])
    )
    assert code != 0 and "runs sharded with --fsdp cannot be resumed yet" in err


def torch_close(a, b, key: str) -> None:
    import torch

    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path, capsys):
    from textenv.agents.cli import train_text as train_text_cli

    assert train_text_cli.main([*TOY, "--fsdp", "--runs-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --fsdp shards the policy over torchrun's processes: launch the "
        "run with torchrun --nproc-per-node N (one process per GPU)"
    )


def test_two_processes_merge_their_normalisation_statistics(tmp_path):
    """Pendulum with observation normalisation: the saved running count is every rank's
    observations, as many as one process counts on the same global batch."""
    from safetensors.torch import load_file

    args = [
        "--env-id",
        "Pendulum-v1",
        "--num-envs",
        "4",
        "--num-steps",
        "16",
        "--total-timesteps",
        "256",
        "--num-minibatches",
        "2",
        "--normalize-obs",
        "--no-progress",
        "--no-tensorboard",
        "--eval-episodes",
        "0",
    ]
    code, _, err = finish(torchrun("scripts.train", [*args, "--runs-dir", str(tmp_path / "two")]))
    assert code == 0, err
    one = subprocess.run(
        [sys.executable, "-m", "scripts.train", *args, "--runs-dir", str(tmp_path / "one")],
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    counts = [
        float(
            load_file(str(next((tmp_path / side).iterdir()) / "checkpoint.safetensors"))[
                "norm.obs_rms.count"
            ][0]
        )
        for side in ("one", "two")
    ]
    assert counts[0] > 256 and counts[1] == pytest.approx(counts[0])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads are listed from /proc")
def test_a_rank_reports_its_threads_in_one_write(monkeypatch):
    """Two ranks print to one stderr; a report written in pieces can interleave with the other
    rank's into a line that does not parse."""
    from tests import torchrun_main

    writes = []
    monkeypatch.setattr(
        torchrun_main.os, "write", lambda fd, data: writes.append((fd, data)) or len(data)
    )
    torchrun_main.report_threads()
    ((fd, data),) = writes
    line = data.decode()
    assert fd == 2 and line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line.split(THREADS_LINE, 1)[1]) == torchrun_main.thread_names()
