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
