"""benchmarks/lm_throughput.py must run unchanged on a GPU machine: its CPU smoke run here."""

import json

from benchmarks.lm_throughput import Args, main


def test_the_quick_run_writes_the_table_and_the_json_keys(tmp_path):
    out = tmp_path / "gpu.md"
    assert main(Args(quick=True, out=str(out))) == 0
    text = out.read_text()
    assert "No CUDA here" in text and "| tiny | 4 | 8 |" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    for key in ("rollout_tokens_per_s", "generate_tokens_per_s", "text_ppo_tokens_per_s"):
        assert raw[key] > 0, key
    assert raw["peak_gib"] is None and raw["device"] == "cpu" and len(raw["rows"]) == 1


def test_the_fast_rollout_path_the_gpu_run_times_runs(tmp_path, monkeypatch):
    # On CUDA the benchmark times the trainer's defaults there (static cache, compiled decode,
    # 16 tokens per env call); dynamo's "eager" backend stands in for CUDA graphs on a CPU.
    from pathlib import Path

    import torch

    import textenv.agents.rollout_text as rollout_text
    from benchmarks.lm_throughput import load_tokenizer, random_model_dir, time_rollout

    monkeypatch.setattr(
        rollout_text,
        "compiled_decode",
        lambda policy, device: torch.compile(policy._forward, backend="eager", dynamic=False),
    )
    model_dir = random_model_dir("tiny", load_tokenizer("embedded"), Path(tmp_path))
    args = Args(new_tokens=8)
    assert time_rollout(model_dir, 4, args, torch.device("cpu"), fast=True) > 0
