"""The CUDA paths: torch classic-control envs and their wrappers on the GPU equal them on the CPU,
and both trainers run on the GPU with their data there. Skipped without CUDA;
``python -m benchmarks.gpu`` runs them on a GPU machine."""

import numpy as np
import pytest
import torch

import textenv  # noqa: F401  (registers the ids)
from textenv.agents.text import KLConfig, LMConfig, LoggingConfig
from textenv.control import TORCH_CONTROL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("name", sorted(TORCH_CONTROL))
def test_an_env_on_the_gpu_steps_as_it_does_on_the_cpu(name):
    """Same seed and actions: the same trajectories, terminations, truncations and autoresets
    (float64 state; the GPU's fused multiply-adds may differ from the CPU's in the last bits)."""
    cls = TORCH_CONTROL[name]
    cpu, gpu = cls(num_envs=8, device="cpu"), cls(num_envs=8, device="cuda")
    a, _ = cpu.reset(seed=3)
    b, _ = gpu.reset(seed=3)
    torch.testing.assert_close(b.cpu(), a)
    space = cpu.single_action_space
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        if hasattr(space, "n"):
            act = torch.randint(space.n, (8,), generator=gen)
        else:
            act = torch.rand((8, 1), generator=gen) * float(space.high[0] - space.low[0]) + float(
                space.low[0]
            )
        x, y = cpu.step(act), gpu.step(act.cuda())
        assert all(t.device.type == "cuda" for t in y[:4])
        torch.testing.assert_close(y[0].cpu(), x[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[1].cpu(), x[1], rtol=1e-5, atol=1e-5)
        assert torch.equal(y[2].cpu(), x[2]) and torch.equal(y[3].cpu(), x[3])


def test_the_wrappers_on_the_gpu_equal_them_on_the_cpu():
    from textenv.agents.envs import make_vector_env, normalization_state

    kw = dict(normalize_obs=True, normalize_reward=True, gamma=0.9)
    cpu = make_vector_env("textenv/TorchPendulum-v1", 4, device="cpu", **kw)
    gpu = make_vector_env(
        "textenv/TorchPendulum-v1", 4, device="cuda", env_kwargs={"rng": "numpy"}, **kw
    )
    cpu.reset(seed=1)
    gpu.reset(seed=1)
    rng = np.random.default_rng(0)
    for _ in range(450):
        act = torch.as_tensor(rng.uniform(-2.5, 2.5, size=(4, 1)), dtype=torch.float32)
        x, y = cpu.step(act), gpu.step(act.cuda())
        torch.testing.assert_close(y[0].cpu(), x[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y[1].cpu(), x[1], rtol=1e-4, atol=1e-4)
        assert torch.equal(y[4]["_episode"].cpu(), x[4]["_episode"])
    for k, v in normalization_state(cpu).items():
        np.testing.assert_allclose(normalization_state(gpu)[k], v, rtol=1e-5)


def test_the_classic_trainer_keeps_a_torch_env_on_the_gpu(tmp_path, monkeypatch):
    from textenv.agents import classic

    steps = []
    make = classic.make_train_envs

    def spy(config, device=None):
        envs = make(config, device)
        step = envs.step

        def watched(actions):
            out = step(actions)
            steps.append((actions.device.type, out[0].device.type, out[1].device.type))
            return out

        envs.step = watched
        return envs

    monkeypatch.setattr(classic, "make_train_envs", spy)
    config = classic.preset_config(
        "textenv/TorchCartPole-v1",
        total_timesteps=8192,
        num_envs=256,
        num_steps=16,
        device="cuda",
        runs_dir=str(tmp_path),
        progress=False,
        tensorboard=False,
        eval_episodes=4,
    )
    summary = classic.train(config)
    assert steps and set(steps) == {
        ("cuda", "cuda", "cuda")
    }  # actions, observations, rewards never on the host
    assert summary["global_step"] == 8192 and np.isfinite(summary["eval_return_mean"])
    reloaded, _, _ = classic.load_checkpoint(summary["checkpoint"])
    assert all(p.device.type == "cpu" for p in reloaded.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_text_trainer_learns_the_toy_task_on_the_gpu(tmp_path, precision):
    from textenv.agents.text import TextTrainConfig, train_text

    config = TextTrainConfig(
        task="Toy",
        model="tiny",
        iterations=15,
        num_envs=32,
        learning_rate=3e-3,
        seed=1,
        kl=KLConfig(kl_coef=0.0),
        lm=LMConfig(device="cuda", precision=precision),
        logging=LoggingConfig(
            runs_dir=str(tmp_path),
            tensorboard=False,
            progress=False,
            save_checkpoint=False,
            run_name="toy",
        ),
    )
    summary = train_text(config)
    assert summary["score_mean_first"] < 0.1 and summary["score_mean_last"] > 0.5, summary


def _torchrun(args, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=1",
        *args,
        "--runs-dir",
        str(tmp_path),
        "--no-progress",
        "--no-tensorboard",
        "--device",
        "cuda",
    ]
    return subprocess.run(
        cmd,
        cwd=root,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("fsdp", [False, True])
def test_the_text_trainer_runs_under_torchrun_with_nccl(tmp_path, fsdp):
    proc = _torchrun(
        [
            "-m",
            "scripts.train_text",
            "--task",
            "Toy",
            "--model",
            "tiny",
            "--num-envs",
            "8",
            "--max-new-tokens",
            "4",
            "--iterations",
            "2",
            "--eval-samples",
            "0",
            *(["--fsdp"] if fsdp else []),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "policy" / "model.safetensors").is_file()


def test_the_classic_trainer_runs_under_torchrun_with_nccl(tmp_path):
    proc = _torchrun(
        [
            "-m",
            "scripts.train",
            "--env-id",
            "textenv/TorchCartPole-v1",
            "--num-envs",
            "256",
            "--total-timesteps",
            "16384",
            "--eval-episodes",
            "2",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_reward_model_runs_beside_the_reference_on_the_gpu(tmp_path):
    import gymnasium as gym

    from tests.test_textenv import tiny_reward_model

    env = gym.make(
        "textenv/RewardModel-v0",
        model="tiny",
        reward_model=tiny_reward_model(tmp_path / "rm"),
        device="cuda",
        dtype=torch.bfloat16,
        max_new_tokens=2,
        max_prompt_tokens=64,
    ).unwrapped
    assert env.reward_fn.model.device.type == "cuda" and env.reward_fn.model.dtype == torch.bfloat16
    env.reset(seed=0)
    for a in (5, 6):
        *_, info = env.step(a)
    assert np.isfinite(info["score"])
