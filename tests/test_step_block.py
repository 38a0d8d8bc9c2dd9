"""``step_block`` (k steps in one call, one host sync) against k calls of ``step``, and the
trainer's block rollout against the step-by-step one, token for token."""

import pytest
import torch

from textenv import TextGenerationVectorEnv
from textenv.models import char_tokenizer, tiny_causal_lm

N, BUDGET = 6, 7


def _envs(reference_pass: str, model, tokenizer) -> TextGenerationVectorEnv:
    return TextGenerationVectorEnv(
        num_envs=N,
        task="Toy",
        model=model,
        tokenizer=tokenizer,
        max_new_tokens=BUDGET,
        max_prompt_tokens=8,
        kl_coef=0.1,
        reference_pass=reference_pass,
    )


def _actions(eos: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    actions = torch.randint(2, 20, (N, BUDGET), generator=g)
    actions[0, 1] = eos  # row 0 ends at its 2nd token, row 2 at its 4th; the rest at the budget
    actions[2, 3] = eos
    actions[4, 0] = eos
    return actions


def _record_ends(info: dict, ends: dict) -> None:
    """Each ended row's score, text, truncation, length and at-end reference log-probs."""
    for i in info["_score"].nonzero().squeeze(1).tolist() if "_score" in info else []:
        ends[i] = (
            float(info["score"][i]),
            info["response_text"][i],
            bool(info["truncated_response"][i]),
            int(info["response_length"][i]),
            info["ref_logprobs"][i] if "ref_logprobs" in info else None,
        )


def _stepped(envs, actions):
    """Column by column with step(): per-column rewards, flags and ref log-probs, end infos."""
    rewards, terminated, ref_lp, ends = [], [], [], {}
    for t in range(actions.shape[1]):
        obs, r, term, _, info = envs.step(actions[:, t])
        rewards.append(r)
        terminated.append(term)
        if "ref_logprob" in info:
            ref_lp.append(info["ref_logprob"])
        _record_ends(info, ends)
        if envs.all_done:
            break
    stack = lambda xs: torch.stack(xs, 1) if xs else None  # noqa: E731
    return obs, stack(rewards), stack(terminated), stack(ref_lp), ends


def _blocked(envs, actions, k):
    rewards, terminated, ref_lp, active, ends = [], [], [], [], {}
    for start in range(0, actions.shape[1], k):
        obs, r, term, _, info = envs.step_block(actions[:, start : start + k])
        rewards.append(r)
        terminated.append(term)
        active.append(info["active"])
        if "ref_logprob" in info:
            ref_lp.append(info["ref_logprob"])
        _record_ends(info, ends)
        if envs.all_done:
            break
    cat = lambda xs: torch.cat(xs, 1) if xs else None  # noqa: E731
    return obs, cat(rewards), cat(terminated), cat(ref_lp), ends, cat(active)


@pytest.mark.parametrize("reference_pass", ["per_step", "at_end"])
@pytest.mark.parametrize("k", [1, 3, BUDGET])
def test_step_block_equals_k_steps(reference_pass, k):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0)
    actions = _actions(tokenizer.eos_token_id)
    one, blocks = _envs(reference_pass, model, tokenizer), _envs(reference_pass, model, tokenizer)
    one.reset(seed=5)
    blocks.reset(seed=5)
    obs_a, rew_a, term_a, ref_a, ends_a = _stepped(one, actions)
    obs_b, rew_b, term_b, ref_b, ends_b, active = _blocked(blocks, actions, k)
    for key in ("input_ids", "attention_mask"):
        torch.testing.assert_close(obs_b[key], obs_a[key], rtol=0, atol=0)
    torch.testing.assert_close(term_b, term_a, rtol=0, atol=0)
    # Each row took the columns up to and including its end, and no more.
    lengths = torch.tensor([ends_a[i][3] for i in range(N)])
    expected = torch.arange(rew_a.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    torch.testing.assert_close(active, expected, rtol=0, atol=0)
    torch.testing.assert_close(rew_b, rew_a, rtol=1e-5, atol=1e-6)
    if reference_pass == "per_step":
        torch.testing.assert_close(ref_b, ref_a, rtol=0, atol=0)  # the same forwards
    assert ends_b.keys() == ends_a.keys() == set(range(N))
    for i in range(N):
        assert ends_b[i][:4] == ends_a[i][:4]
        if reference_pass == "at_end":  # one forward over all rows instead of one per end step
            torch.testing.assert_close(ends_b[i][4], ends_a[i][4], rtol=1e-5, atol=1e-6)
    assert blocks.all_done and one.all_done
    with pytest.raises(RuntimeError, match="call reset"):
        blocks.step_block(actions)


def test_step_block_refuses_a_bad_action_before_changing_anything():
    tokenizer = char_tokenizer()
    envs = _envs("per_step", tiny_causal_lm(tokenizer, seed=0), tokenizer)
    obs, _ = envs.reset(seed=1)
    actions = _actions(tokenizer.eos_token_id)[:, :3].clone()
    actions[3, 2] = 10_000
    with pytest.raises(ValueError, match=r"action 10000 \(row 3, column 2\) is outside Discrete"):
        envs.step_block(actions)
    after = envs._gen.observation()
    torch.testing.assert_close(after["input_ids"], obs["input_ids"], rtol=0, atol=0)
    actions[3, 2] = 5
    actions[4, 0], actions[4, 2] = tokenizer.eos_token_id, -1  # ignored: row 4 ended at column 0
    envs.step_block(actions)
    with pytest.raises(ValueError, match=r"shape \(6, k\)"):
        envs.step_block(actions[0])


@pytest.mark.parametrize("reference_pass", ["at_end", "per_step"])
@pytest.mark.parametrize("block,static_cache,group_size", [(4, False, 1), (16, True, 2)])
def test_the_block_rollout_is_the_step_by_step_one(reference_pass, block, static_cache, group_size):
    from textenv.agents.lm import LMActorCritic
    from textenv.agents.rollout_text import collect_rollout
    from textenv.models import load_causal_lm

    rollouts, next_draw = [], []
    for b in (1, block):
        envs = TextGenerationVectorEnv(
            num_envs=12,
            task="Toy",
            model="tiny",
            max_new_tokens=10,
            max_prompt_tokens=12,
            reference_pass=reference_pass,
        )
        policy = LMActorCritic(load_causal_lm("tiny:1")[0])
        torch.nn.init.normal_(
            policy.value_head.weight, std=0.1, generator=torch.Generator().manual_seed(1)
        )
        # EOS made likely, so the batch ends inside a block: the generator must be put back.
        eos_bias = torch.zeros(envs.reference_model.config.vocab_size)
        eos_bias[envs.tokenizer.eos_token_id] = 4.0
        policy.lm.get_output_embeddings().register_forward_hook(lambda m, i, out: out + eos_bias)
        generator = torch.Generator().manual_seed(0)
        rollouts.append(
            collect_rollout(
                policy,
                envs,
                seed=0,
                generator=generator,
                group_size=group_size,
                static_cache=static_cache,
                block=b,
            )
        )
        next_draw.append(torch.rand(3, generator=generator))
    steps, blocks = rollouts
    assert (~steps.mask.bool()).any() and steps.mask.bool().any(1).all()  # ragged ends
    assert steps.actions.shape[1] < 10 and steps.actions.shape[1] % block  # inside a block
    for name in ("mask", "input_ids", "attention_mask", "truncated_response"):
        assert torch.equal(getattr(blocks, name), getattr(steps, name)), name
    assert blocks.responses == steps.responses and blocks.prompts == steps.prompts
    assert torch.equal(blocks.scores, steps.scores)
    # Past its end a row samples from what it was fed there (masked out of everything): the
    # taken tokens and their forwards are the same.
    mask = steps.mask
    assert torch.equal(blocks.actions * mask.long(), steps.actions * mask.long())
    for name in ("logprobs", "values", "entropy"):
        torch.testing.assert_close(
            getattr(blocks, name) * mask, getattr(steps, name) * mask, rtol=0, atol=0
        )
    exact = reference_pass == "per_step"  # at_end: one forward for the block's ends
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocks.ref_logprobs, steps.ref_logprobs, **tol)
    torch.testing.assert_close(blocks.env_rewards, steps.env_rewards, **tol)
    assert torch.equal(next_draw[0], next_draw[1])  # the random stream continues alike


def test_block_sampling_is_refused_for_a_conversation_and_below_one():
    from textenv.agents.lm import LMActorCritic
    from textenv.agents.rollout_text import collect_rollout
    from textenv.models import load_causal_lm
    from textenv.multiturn import MultiTurnTextVectorEnv

    envs = MultiTurnTextVectorEnv(num_envs=2, task="ToyTurns", model="tiny")
    policy = LMActorCritic(load_causal_lm("tiny:1")[0])
    with pytest.raises(ValueError, match="block > 1 is for single-turn envs"):
        collect_rollout(policy, envs, seed=0, generator=torch.Generator(), block=4)
    with pytest.raises(ValueError, match="block must be >= 1, got 0"):
        collect_rollout(policy, envs, seed=0, generator=torch.Generator(), block=0)


def test_the_trainer_refuses_block_and_static_cache_settings_for_a_conversation():
    from textenv.agents.text import TextTrainConfig

    for flags in ({"static_cache": True}, {"rollout_block": 8}):
        config = TextTrainConfig.from_flat(task="ToyTurns", model="tiny", **flags)
        with pytest.raises(ValueError, match="is for single-turn tasks; ToyTurns is a multi-turn"):
            config.validate()
    with pytest.raises(ValueError, match="rollout_block must be >= 0, got -1"):
        TextTrainConfig.from_flat(task="Toy", model="tiny", rollout_block=-1).validate()
    config = TextTrainConfig.from_flat(task="Toy", model="tiny")
    assert config.rollout_block(torch.device("cpu")) == 1
    assert config.rollout_block(torch.device("cuda")) == 16
    assert TextTrainConfig.from_flat(task="ToyTurns").rollout_block(torch.device("cuda")) == 1


def test_a_text_run_with_a_rollout_block_trains_like_one_stepping_every_token(
    tmp_path, monkeypatch
):
    import json

    from textenv.agents.text import TextTrainConfig, train_text
    from textenv.reference import PerStepReference

    calls, budgets = [], []
    step_block = TextGenerationVectorEnv.step_block
    start = PerStepReference.start
    monkeypatch.setattr(
        PerStepReference,
        "start",
        lambda self, *a: budgets.append(self.static_budget) or start(self, *a),
    )
    monkeypatch.setattr(
        TextGenerationVectorEnv,
        "step_block",
        lambda self, actions: calls.append(actions.shape[1]) or step_block(self, actions),
    )
    scores, blocks, static_budgets = [], [], []
    for block, static in ((1, False), (3, False), (1, True)):
        calls.clear()
        budgets.clear()
        train_text(
            TextTrainConfig.from_flat(
                task="Toy",
                model="tiny",
                iterations=2,
                num_envs=8,
                seed=3,
                max_new_tokens=6,
                device="cpu",
                runs_dir=str(tmp_path),
                run_name=f"block{block}{static}",
                tensorboard=False,
                progress=False,
                eval_samples=0,
                sample_every=0,
                save_checkpoint=False,
                reference_pass="per_step",
                rollout_block=block,
                static_cache=static,
            )
        )
        rows = (tmp_path / f"block{block}{static}" / "metrics.jsonl").read_text().splitlines()
        scores.append([(r["score_mean"], r["response_length"]) for r in map(json.loads, rows)])
        blocks.append(set(calls))
        static_budgets.append(set(budgets))
    assert blocks == [set(), {3}, set()]
    assert static_budgets == [{None}, {None}, {6}]  # the reference's static cache: 6 steps
    assert scores[0] == scores[1]  # the same forwards: the same rewards, updates and samples
    # A static cache's reference log-probs agree to float rounding: the first batch is the same.
    assert scores[2][0] == scores[0][0]  # iteration 2 samples from the updated policy: the same too


def test_a_compiled_decode_samples_what_the_eager_one_does():
    # backend "eager": dynamo's graph capture (where a compiled forward can part from eager)
    # without inductor's code generation, which takes minutes on a small CPU.
    from textenv.agents.lm import LMActorCritic
    from textenv.agents.rollout_text import collect_rollout
    from textenv.models import load_causal_lm

    rollouts = []
    for compiled in (False, True):
        envs = TextGenerationVectorEnv(
            num_envs=8, task="Toy", model="tiny", max_new_tokens=8, max_prompt_tokens=12
        )
        policy = LMActorCritic(load_causal_lm("tiny:1")[0])
        decode = (
            torch.compile(policy._forward, backend="eager", dynamic=False) if compiled else None
        )
        generator = torch.Generator().manual_seed(0)
        rollouts.append(
            collect_rollout(
                policy, envs, seed=0, generator=generator, static_cache=True, decode=decode
            )
        )
    eager, compiled_ = rollouts
    assert torch.equal(eager.actions, compiled_.actions) and torch.equal(eager.mask, compiled_.mask)
    torch.testing.assert_close(compiled_.logprobs, eager.logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled_.values, eager.values, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="compiled decode needs static_cache=True"):
        collect_rollout(policy, envs, seed=0, generator=generator, decode=policy._forward)


def test_compile_settings():
    from textenv.agents.text import TextTrainConfig

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    config = TextTrainConfig.from_flat(task="Toy", model="tiny")
    assert not config.compile_rollout(cpu) and config.compile_rollout(cuda)
    assert not TextTrainConfig.from_flat(task="Toy", fsdp=True).compile_rollout(cuda)
    assert not TextTrainConfig.from_flat(task="ToyTurns").compile_rollout(cuda)
    assert TextTrainConfig.from_flat(task="Toy", compile="on").compile_rollout(cpu)
    assert not TextTrainConfig.from_flat(task="Toy", compile="off").compile_rollout(cuda)
    for flags, match in (
        ({"task": "ToyTurns", "compile": "on"}, "--compile on is for single-turn tasks"),
        ({"task": "Toy", "compile": "on", "fsdp": True}, "--compile on with --fsdp"),
        ({"task": "Toy", "compile": "yes"}, "compile must be auto, on or off, got 'yes'"),
    ):
        with pytest.raises(ValueError, match=match):
            TextTrainConfig.from_flat(model="tiny", **flags).validate()


def test_the_per_step_reference_with_a_static_cache_scores_as_the_dynamic_one():
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0)
    actions = _actions(tokenizer.eos_token_id)
    runs = []
    for static in (False, True):
        envs = TextGenerationVectorEnv(
            num_envs=N,
            task="Toy",
            model=model,
            tokenizer=tokenizer,
            max_new_tokens=BUDGET,
            max_prompt_tokens=24,
            kl_coef=0.1,
            reference_pass="per_step",
            static_cache=static,
        )
        envs.reset(seed=5)
        assert (type(envs._gen.reference.cache).__name__ == "StaticCache") == static
        runs.append(_stepped(envs, actions))
    (obs_a, rew_a, term_a, ref_a, ends_a), (obs_b, rew_b, term_b, ref_b, ends_b) = runs
    assert torch.equal(obs_a["input_ids"], obs_b["input_ids"]) and torch.equal(term_a, term_b)
    torch.testing.assert_close(ref_b, ref_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rew_b, rew_a, rtol=1e-5, atol=1e-6)
    assert [e[:4] for e in ends_b.values()] == [e[:4] for e in ends_a.values()]
    with pytest.raises(ValueError, match="static_cache is for reference_pass='per_step'"):
        _envs_static_at_end = TextGenerationVectorEnv(
            num_envs=2, task="Toy", model="tiny", reference_pass="at_end", static_cache=True
        )
