"""benchmarks/gpu.py must run unchanged on a GPU machine: its CPU fallback is exercised here."""

import json

import torch

from benchmarks.gpu import main


def test_the_gpu_benchmark_runs_its_cpu_fallback_and_writes_every_section(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    code = main(
        [
            "--quick",
            "--device",
            "cpu",
            "--sections",
            "tests",
            "control",
            "classic",
            "--out",
            str(out),
        ]
    )
    text = out.read_text()
    raw = json.loads(out.with_suffix(".json").read_text())
    assert code == 0 and "errors" not in raw, raw.get("errors")
    assert "CPU fallback run" in text and "## Classic PPO training throughput" in text
    assert [r["num_envs"] for r in raw["control"] if r["env"] == "CartPole-v1"] == [1, 64]
    assert all(r["torch"] > 0 and r["gymnasium"] > 0 for r in raw["control"])
    assert [r["num_envs"] for r in raw["classic"]] == [16, 64]
    if not torch.cuda.is_available():
        assert "skipped" in raw["gpu_tests"]["summary"]


def test_an_unknown_section_is_a_one_line_error(tmp_path, capsys):
    assert main(["--sections", "nope", "--out", str(tmp_path / "x.md")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: unknown section 'nope'; known: tests, control, classic, text, torchrun, trl"
    )


def test_the_torchrun_section_runs_both_trainers_sharded_and_not_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    code = main(
        [
            "--quick",
            "--device",
            "cpu",
            "--sections",
            "torchrun",
            "--model",
            "tiny",
            "--out",
            str(out),
        ]
    )
    raw = json.loads(out.with_suffix(".json").read_text())
    assert code == 0 and "errors" not in raw, raw.get("errors")
    runs = raw["torchrun"]
    assert len(runs) == 5 and all(r["rc"] == 0 for r in runs.values()), runs
    two = [r["summary"] for name, r in runs.items() if "torchrun × 2 (gloo)" in name]
    assert len(two) == 3 and all(s["world_size"] == 2 for s in two)


def test_without_trl_the_trl_section_says_it_did_not_run(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a)
    )
    out = tmp_path / "gpu.md"
    assert main(["--quick", "--device", "cpu", "--sections", "trl", "--out", str(out)]) == 0
    assert "TRL is not installed on this machine" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["trl"] == "not installed"
