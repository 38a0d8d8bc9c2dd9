"""LoRA's reference is the policy's own base model with the adapters off: the same scores as a
separately loaded base model, and no second copy of the weights."""

import json

import torch

from textenv import TextGenerationVectorEnv
from textenv.models import AdaptersDisabled, load_causal_lm

ENV = dict(task="Toy", max_new_tokens=6, max_prompt_tokens=8, kl_coef=0.1)


def test_the_adapters_off_reference_scores_as_the_base_model_does():
    from textenv.agents.text_checkpoint import with_lora

    base, tokenizer = load_causal_lm("tiny")
    policy = with_lora(load_causal_lm("tiny")[0], 4, 16)
    with torch.no_grad():  # trained adapters: B != 0, so the policy is not the base any more
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    runs = []
    for reference in (base, AdaptersDisabled(policy), policy):
        envs = TextGenerationVectorEnv(
            num_envs=4, model=reference, tokenizer=tokenizer, reference_pass="per_step", **ENV
        )
        envs.reset(seed=0)
        runs.append(
            torch.stack([envs.step(torch.full((4,), 5))[-1]["ref_logprob"] for _ in range(3)])
        )
        if len(runs) == 2:  # the env froze nothing of the policy's
            assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    assert torch.equal(runs[1], runs[0])  # exactly the base model's scores
    assert not torch.allclose(runs[2], runs[0])  # with the adapters on, the policy differs


def test_a_lora_run_loads_one_model_and_starts_at_kl_zero(tmp_path, monkeypatch):
    import textenv.agents.text as text
    from textenv.agents.text import TextTrainConfig, train_text

    loads = []
    real = text.load_causal_lm
    monkeypatch.setattr(text, "load_causal_lm", lambda *a, **k: loads.append(a) or real(*a, **k))
    import textenv.core as core

    env_loads = []
    real_core = core.load_causal_lm
    monkeypatch.setattr(
        core, "load_causal_lm", lambda *a, **k: env_loads.append(a) or real_core(*a, **k)
    )
    for lora_r in (0, 4):
        loads.clear()
        env_loads.clear()
        name = f"lora{lora_r}"
        train_text(
            TextTrainConfig.from_flat(
                task="Toy",
                model="tiny",
                iterations=1,
                num_envs=8,
                seed=3,
                device="cpu",
                runs_dir=str(tmp_path),
                run_name=name,
                tensorboard=False,
                progress=False,
                eval_samples=8,
                sample_every=0,
                save_checkpoint=False,
                lora_r=lora_r,
            )
        )
        assert len(loads) == 1  # the policy
        assert len(env_loads) == (0 if lora_r else 1)  # the env's own reference, without LoRA
        row = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        assert abs(row["kl_k1"]) < 1e-5  # the first rollout's policy is its reference
