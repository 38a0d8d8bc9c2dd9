"""Multi-turn episodes: the env's tokens are observations, never actions; vector ≡ single; the KL,
the loss and GAE cover the agent's tokens; the tool task, the textarena adapter, the trainer."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenv  # noqa: F401  (registers the ids)
from textenv import RewardError
from textenv.agents.lm import LMActorCritic
from textenv.agents.text import Rollout, TextTrainConfig, collect_rollout, shaped_rewards, token_advantages, train_text
from textenv.models import char_tokenizer, tiny_causal_lm
from textenv.multiturn import (Calculator, FunctionTask, MultiTurnTextEnv, MultiTurnTextVectorEnv, Turn,
                               safe_arithmetic)

A, B_, EOS = 3, 4, 1  # the tiny vocabulary: 'a', 'b', <eos>


def _respond(history):
    """A deterministic env side: replies with the agent's turn count, pays 0.25 per 'a' said,
    ends after the third turn."""
    turns = sum(m["role"] == "assistant" for m in history)
    said = history[-1]["content"]
    return Turn("ok" * turns, 0.25 * said.count("a"), turns >= 3)


def _task(**kw):
    settings = dict(respond=_respond, prompts=["hello there", "say a", "what now"], max_prompt_tokens=12,
                    max_context_tokens=40, max_turn_tokens=4, kl_coef=0.1, reply_format=" {reply} ")
    return FunctionTask(**(settings | kw))


def _actions(seed, n=40):
    """Letters with an EOS now and then, so turns end at different steps in different rows."""
    rng = np.random.default_rng(seed)
    return [EOS if rng.random() < 0.3 else int(rng.integers(3, 12)) for _ in range(n)]


def _play(env, actions, **reset):
    obs, info = env.reset(**reset)
    steps = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        steps.append((obs, reward, terminated, info))
        if terminated:
            break
    return steps


def test_vector_env_equals_the_single_env_token_for_token():
    n = 3
    vec = MultiTurnTextVectorEnv(num_envs=n, task=_task(), model="tiny")
    acts = [_actions(i) for i in range(n)]
    singles = [_play(MultiTurnTextEnv(task=_task(), model="tiny"), acts[i], seed=10 + i) for i in range(n)]
    vec.reset(seed=10)
    for t in range(40):
        if vec.all_done:
            break
        obs, reward, terminated, _, info = vec.step(torch.tensor([acts[i][t] for i in range(n)]))
        for i in range(n):
            if t >= len(singles[i]):
                assert reward[i] == 0  # ended rows pay nothing
                continue
            s_obs, s_reward, s_term, s_info = singles[i][t]
            for key in ("input_ids", "attention_mask", "agent_mask"):
                assert obs[key][i].tolist() == s_obs[key].tolist(), (i, t, key)
            assert float(reward[i]) == pytest.approx(s_reward, abs=1e-5)
            assert bool(terminated[i]) == s_term
            assert float(info["turn_reward"][i]) == s_info["turn_reward"]
            if s_term:
                assert float(info["score"][i]) == pytest.approx(s_info["score"])
                k = len(s_info["ref_logprobs"])
                np.testing.assert_allclose(info["ref_logprobs"][i, :k].numpy(), s_info["ref_logprobs"], atol=1e-5)
                assert info["response_text"][i] == s_info["response_text"]
    assert vec.all_done


def test_env_tokens_are_observations_and_the_return_is_the_turn_rewards_plus_beta_ref_logprobs():
    env = MultiTurnTextEnv(task=_task(), model="tiny")
    seen = []

    def respond(history):
        seen.append([dict(m) for m in history])
        return _respond(history)

    env.unwrapped._gen.task.respond = respond
    obs, info = env.reset(seed=0)
    prompt_len = int(obs["attention_mask"].sum())
    actions = [A, A, EOS, B_, A, A, A, A, EOS]  # turn 1 ends at EOS, turn 2 at the turn budget, turn 3 at EOS
    total, turn_rewards = 0.0, []
    for step, a in enumerate(actions):
        obs, reward, terminated, _, info = env.step(a)
        total += reward
        turn_rewards.append(info["turn_reward"])
        if terminated:
            break
    assert terminated and info["end_reason"] == "done" and info["turns"] == 3 and step == 8
    agent = obs["agent_mask"].astype(bool)
    # One agent token per step; the replies ("ok", "okok") sit between the turns, unmasked as actions.
    assert agent.sum() == info["response_length"] == len(actions)
    assert obs["input_ids"][agent].tolist() == actions
    replies = obs["input_ids"][obs["attention_mask"].astype(bool) & ~agent][prompt_len:]
    assert env.unwrapped.tokenizer.decode(replies.tolist()) == " ok  okok "
    assert [m["role"] for m in seen[-1]] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in seen[-1][1::2]] == ["aa", "baaa", "a"]
    assert turn_rewards == [0, 0, 0.5, 0, 0, 0, 0.75, 0, 0.25]  # paid at the token that ended each turn
    assert info["score"] == pytest.approx(1.5)
    assert total == pytest.approx(info["score"] + 0.1 * info["ref_logprobs"].sum(), rel=1e-6)


def test_the_reference_scores_agent_tokens_in_the_whole_context():
    """log π_ref from one unpadded forward over prompt + conversation, at the agent's tokens only."""
    env = MultiTurnTextEnv(task=_task(), model="tiny", temperature=0.7)
    steps = _play(env, [A, EOS, B_, B_, EOS, A, EOS], seed=1)
    obs, _, terminated, info = steps[-1]
    assert terminated
    real = obs["attention_mask"].astype(bool)
    ids = torch.tensor(obs["input_ids"][real])[None]
    agent = obs["agent_mask"][real].astype(bool)
    with torch.no_grad():
        logp = torch.log_softmax(env.unwrapped.reference_model(input_ids=ids).logits[0] / 0.7, -1)
    cols = np.flatnonzero(agent)
    expected = [logp[c - 1, ids[0, c]].item() for c in cols]
    np.testing.assert_allclose(info["ref_logprobs"], expected, atol=1e-5)


def test_the_context_budget_ends_the_episode_with_a_flag():
    never_done = FunctionTask(respond=lambda h: ("ok", 1.0, False), prompts=["hi"], max_prompt_tokens=4,
                              max_context_tokens=10, max_turn_tokens=3, max_turns=50, reply_format=" {reply} ")
    env = MultiTurnTextEnv(task=never_done, model="tiny")
    steps = _play(env, [A] * 20, seed=0)
    _, _, terminated, info = steps[-1]
    assert terminated and info["context_exhausted"] and info["end_reason"] == "context"
    # turn 1: 3 agent + 4 reply (" ok "), turn 2: 3 agent = 10 tokens; the second reply does not fit
    assert len(steps) == 6 and info["turns"] == 2 and info["score"] == 2.0


def test_max_turns_ends_the_episode():
    task = FunctionTask(respond=lambda h: ("ok", 1.0, False), prompts=["hi"], max_turns=2, max_turn_tokens=2)
    _, _, terminated, info = _play(MultiTurnTextEnv(task=task, model="tiny"), [A] * 10, seed=0)[-1]
    assert terminated and info["end_reason"] == "turn_limit" and info["turns"] == 2 and not info["context_exhausted"]


def test_a_stop_string_ends_the_turn():
    seen = []
    task = FunctionTask(respond=lambda h: seen.append(h[-1]["content"]) or (None, 0.0, True), prompts=["hi"],
                        stop=["ab"], max_turn_tokens=10)
    steps = _play(MultiTurnTextEnv(task=task, model="tiny"), [5, A, B_, A, A], seed=0)
    assert len(steps) == 3 and steps[-1][2] and seen == ["cab"]


def test_partial_reset_restarts_only_the_selected_rows():
    vec = MultiTurnTextVectorEnv(num_envs=2, task=_task(), model="tiny")
    vec.reset(seed=5)
    for a in ([A, A], [EOS, A]):
        vec.step(torch.tensor(a))
    before = vec._gen.observation()["input_ids"][1].clone()
    vec.reset(seed=7, options={"reset_mask": np.array([True, False])})
    assert vec._gen.observation()["input_ids"][1].tolist() == before.tolist()
    assert vec.conversation_lengths.tolist() == [0, 2]
    acts = [A, B_, EOS, A]
    single = _play(MultiTurnTextEnv(task=_task(), model="tiny"), acts, seed=7)
    for t, a in enumerate(acts):
        obs, *_ = vec.step(torch.tensor([a, A]))
        for key in ("input_ids", "attention_mask", "agent_mask"):
            assert obs[key][0].tolist() == single[t][0][key].tolist(), key


def test_group_rows_share_the_episode():
    vec = MultiTurnTextVectorEnv(num_envs=4, task=Calculator(), model="tiny")
    _, info = vec.reset(seed=0, options={"group_size": 2})
    seeds = info["episode_seed"].tolist()
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and seeds[0] != seeds[2]
    assert info["prompt"][0] == info["prompt"][1]


def test_a_failing_respond_is_a_reward_error_naming_the_task_and_row():
    def broken(history):
        raise KeyError("board")

    env = MultiTurnTextEnv(task=FunctionTask(respond=broken, prompts=["hi"]), model="tiny")
    env.reset(seed=0)
    with pytest.raises(RewardError, match=r"FunctionTask: respond\(\) raised KeyError.*row 0"):
        env.step(EOS)
    env = MultiTurnTextEnv(task=FunctionTask(respond=lambda h: ("x", float("nan"), False), prompts=["hi"]), model="tiny")
    env.reset(seed=0)
    with pytest.raises(RewardError, match="reward nan"):
        env.step(EOS)


def test_per_step_reference_pass_is_refused_clearly():
    with pytest.raises(ValueError, match="reference_pass must be 'at_end'"):
        MultiTurnTextEnv(task=_task(), model="tiny", reference_pass="per_step")


def test_gymnasium_and_sb3_env_checkers_pass():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(MultiTurnTextEnv(task=_task(), model="tiny"), skip_render_check=True)
    sb3_check_env(MultiTurnTextEnv(task=_task(), model="tiny"))


def test_registered_ids_make_single_and_vector_envs():
    env = gym.make("textenv/ToyTurns-v0", model="tiny")
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"input_ids", "attention_mask", "agent_mask"}
    vec = gym.make_vec("textenv/MultiTurn-v0", num_envs=2, model="tiny", respond=_respond, prompts=["hi"])
    obs, _ = vec.reset(seed=0)
    assert obs["input_ids"].shape[0] == 2


def test_numpy_arrays_mode_returns_numpy():
    vec = MultiTurnTextVectorEnv(num_envs=2, task=_task(), model="tiny", arrays="numpy")
    obs, _ = vec.reset(seed=0)
    obs, reward, terminated, truncated, info = vec.step(np.array([EOS, A]))
    assert isinstance(obs["agent_mask"], np.ndarray) and isinstance(reward, np.ndarray)
    assert info["_turn_reward"].tolist() == [True, False]


# -- chat templates ----------------------------------------------------------------------------

TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}, {{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}a, {% endif %}")


def _chat_env(**kw):
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    model = tiny_causal_lm(tok)
    task = FunctionTask(respond=lambda h: ("ok", 0.0, len(h) > 4), prompts=["hi"], max_turn_tokens=2, **kw)
    return MultiTurnTextEnv(task=task, model=model, tokenizer=tok), tok


def test_chat_replies_are_what_the_template_writes_after_the_agents_turn():
    env, tok = _chat_env()
    obs, _ = env.reset(seed=0)
    assert env.unwrapped._gen.prompts[0] == "u, hi<eos>a, "
    obs, *_ = env.step(B_)
    obs, *_ = env.step(EOS)  # the agent closed its turn with EOS: the reply starts after it
    ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
    assert tok.decode(ids) == "u, hi<eos>a, b<eos>u, ok<eos>a, "
    obs, *_ = env.step(B_)
    obs, _, terminated, _, _ = env.step(B_)  # the turn budget ends it: the env closes the turn with EOS
    ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
    assert tok.decode(ids) == "u, hi<eos>a, b<eos>u, ok<eos>a, bb<eos>u, ok<eos>a, "
    agent = obs["agent_mask"][obs["attention_mask"].astype(bool)].astype(bool)
    assert [ids[i] for i in np.flatnonzero(agent)] == [B_, EOS, B_, B_]


def test_chat_off_writes_plain_text_replies():
    env, tok = _chat_env(chat=False, reply_format=" {reply} ")
    env.reset(seed=0)
    env.step(B_)
    obs, *_ = env.step(EOS)
    ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
    assert tok.decode(ids) == "hib<eos> ok "


# -- the tool task and the games ---------------------------------------------------------------

def test_safe_arithmetic_evaluates_integers_and_refuses_code():
    assert safe_arithmetic("12 * (3 + 4) - -2") == 86
    for bad in ("__import__('os')", "2 ** 10", "1.5 * 2", "x + 1", "1 / 2", "9" * 101):
        with pytest.raises((ValueError, SyntaxError)):
            safe_arithmetic(bad)


def test_calculator_episode_answers_tool_calls_and_scores_the_answer():
    task = Calculator(size=20, seed=3)
    episode = task.new_episode(np.random.default_rng(0))
    question = episode.prompt[-1]["content"]
    expr = question.removeprefix("What is ").removesuffix("?")
    hist = list(episode.prompt)
    reply, reward, done = episode.respond(hist + [{"role": "assistant", "content": f"<calc>{expr}</calc>"}])
    assert reply == str(episode.answer) and reward == 0 and not done
    assert episode.respond(hist + [{"role": "assistant", "content": f"It is {episode.answer:,}."}]) == (None, 1.0, True)
    assert episode.respond(hist + [{"role": "assistant", "content": f"{episode.answer + 1}"}]) == (None, 0.0, True)
    assert episode.respond(hist + [{"role": "assistant", "content": "no idea"}])[1:] == (0.0, False)
    tagged = Calculator(size=20, seed=3, answer_tags=True).new_episode(np.random.default_rng(0))
    assert tagged.respond(hist + [{"role": "assistant", "content": f"{tagged.answer}"}])[2] is False
    assert tagged.respond(hist + [{"role": "assistant", "content": f"<answer>{tagged.answer}</answer>"}])[1] == 1.0


def test_calculator_held_out_questions_are_every_fifth():
    allq = Calculator(size=20).questions()
    assert Calculator(size=20, split="test").questions() == allq[4::5]
    assert len(Calculator(size=20, split="train").questions()) == 16


def test_textarena_guess_the_number_plays_through_the_adapter():
    pytest.importorskip("textarena")
    from textenv.multiturn import GuessTheNumber

    episode = GuessTheNumber().new_episode(np.random.default_rng(0))
    assert "Guess The Number" in episode.prompt
    history = [{"role": "user", "content": episode.prompt}]
    lo, hi = 1, 20
    for _ in range(10):  # binary search on the game's hints wins
        guess = (lo + hi) // 2
        history.append({"role": "assistant", "content": f"[{guess}]"})
        reply, reward, done = episode.respond(history)
        if done:
            break
        assert reply.startswith("[GAME]") and "[Player]" not in reply  # the agent's own move is not echoed
        lo, hi = (guess + 1, hi) if "higher" in reply else (lo, guess - 1)
        history.append({"role": "user", "content": reply})
    assert done and reward == 1.0


def test_textarena_two_player_game_against_the_fixed_opponent():
    pytest.importorskip("textarena")
    from textenv.multiturn import TicTacToe

    episode = TicTacToe().new_episode(np.random.default_rng(0))
    history = [{"role": "user", "content": episode.prompt}, {"role": "assistant", "content": "[4]"}]
    reply, reward, done = episode.respond(history)
    assert not done and "Player 1" in reply and "O" in reply  # our move and the opponent's are on the board


# -- the trainer on multi-turn envs --------------------------------------------------------------

def _policy(temperature=1.0):
    tok = char_tokenizer()
    return LMActorCritic(tiny_causal_lm(tok, seed=0), temperature=temperature), tok


def test_rollout_logprobs_are_the_updates_and_kl_is_zero_when_the_policy_is_the_reference():
    """The chunked KV-cached sampling across turns and the update's one forward over the whole
    conversation agree; with policy = reference the KL over agent tokens is 0."""
    policy, tok = _policy(temperature=0.7)
    vec = MultiTurnTextVectorEnv(num_envs=4, task=_task(max_turn_tokens=3), model=tiny_causal_lm(tok, seed=0),
                                 tokenizer=tok, temperature=0.7)
    rollout = collect_rollout(policy, vec, seed=0, generator=torch.Generator().manual_seed(0))
    assert rollout.positions is not None and rollout.step_scores is not None
    m = rollout.mask.bool()
    assert (rollout.input_ids.gather(1, rollout.positions)[m] == rollout.actions[m]).all()
    assert int(m.sum()) > 4 * 3  # more than one turn per row on average
    with torch.no_grad():
        logprob, _, value = policy.evaluate_responses(rollout.input_ids, rollout.attention_mask, rollout.actions,
                                                      rollout.prompt_len, positions=rollout.positions)
    torch.testing.assert_close(logprob[m], rollout.logprobs[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(value[m], rollout.values[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(rollout.ref_logprobs[m], rollout.logprobs[m], atol=1e-4, rtol=0)


def test_shaped_rewards_and_gae_cover_agent_tokens_across_turns():
    policy, tok = _policy()
    vec = MultiTurnTextVectorEnv(num_envs=4, task=_task(max_turn_tokens=3), model="tiny")
    rollout = collect_rollout(policy, vec, seed=1, generator=torch.Generator().manual_seed(1))
    rewards = shaped_rewards(rollout, 0.1, True, None)
    kl = ((rollout.logprobs - rollout.ref_logprobs) * rollout.mask).sum(1)
    torch.testing.assert_close(rewards.sum(1), rollout.scores - 0.1 * kl, atol=1e-5, rtol=0)
    assert (rollout.step_scores * (1 - rollout.mask)).abs().sum() == 0  # nothing paid at non-agent columns
    # γ = λ = 1 and V = 0: every token's advantage is the rest of the episode's return, across turns.
    zero = Rollout(**{**rollout.__dict__, "values": torch.zeros_like(rollout.values)})
    adv, _ = token_advantages(zero, rewards, 1.0, 1.0)
    rest = rewards.flip(1).cumsum(1).flip(1) * rollout.mask
    torch.testing.assert_close(adv, rest, atol=1e-5, rtol=0)


def test_missing_eos_penalty_hits_conversations_that_ran_out_of_context():
    policy, tok = _policy()
    task = FunctionTask(respond=lambda h: ("ok", 0.0, False), prompts=["hi"], max_context_tokens=8, max_turns=50,
                        max_turn_tokens=3)
    rollout = collect_rollout(policy, MultiTurnTextVectorEnv(num_envs=2, task=task, model="tiny"), seed=0,
                              generator=torch.Generator().manual_seed(0))
    assert rollout.truncated_response.all()
    rewards = shaped_rewards(rollout, 0.0, True, 0.5)
    torch.testing.assert_close(rewards.sum(1), rollout.scores - 0.5)


def test_ppo_learns_the_two_turn_toy_task(tmp_path):
    config = TextTrainConfig(task="ToyTurns", model="tiny", iterations=25, num_envs=16, learning_rate=3e-3,
                             eval_samples=16, runs_dir=str(tmp_path), progress=False, tensorboard=False,
                             save_checkpoint=False, sample_every=0)
    config.ppo.num_minibatches = 2
    summary = train_text(config)
    assert summary["eval_score_before"] < 0.5 and summary["eval_score_after"] > 1.5  # the best return is 2


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_critic_free_estimators_learn_across_turns(tmp_path, estimator):
    config = TextTrainConfig(task="ToyTurns", model="tiny", iterations=25, num_envs=16, learning_rate=3e-3,
                             advantage=estimator, group_size=4 if estimator == "grpo" else 1, eval_samples=0,
                             runs_dir=str(tmp_path), progress=False, tensorboard=False, save_checkpoint=False,
                             sample_every=0)
    config.ppo.num_minibatches = 2
    summary = train_text(config)
    assert summary["score_mean_first"] < 0.5 and summary["score_mean_last"] > 1.2


def test_trainer_refuses_prompt_and_reward_flags_on_multi_turn_tasks(tmp_path):
    config = TextTrainConfig(task="ToyTurns", model="tiny", reward="vader", runs_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--reward does not apply to the multi-turn task ToyTurns"):
        train_text(config)


def test_task_options_reach_the_task(tmp_path):
    from textenv.agents.text import task_settings

    config = TextTrainConfig(task="ToyTurns", task_options='{"max_turns": 3, "max_context_tokens": 40}', max_new_tokens=5)
    kwargs, held_out = task_settings(config)
    assert kwargs == {"max_turn_tokens": 5, "max_turns": 3, "max_context_tokens": 40} and held_out
    config = TextTrainConfig(task="RG-ChainSum", task_options='{"answer_format": "number", "size": 10}')
    assert task_settings(config)[0] == {"answer_format": "number", "size": 10}


def test_textarena_adapter_plays_any_offline_game_by_id():
    pytest.importorskip("textarena")
    from textenv.multiturn import TextArena

    episode = TextArena(game="TowerOfHanoi-v0").new_episode(np.random.default_rng(0))
    assert "Tower" in episode.prompt
    history = [{"role": "user", "content": episode.prompt}, {"role": "assistant", "content": "[A C]"}]
    reply, reward, done = episode.respond(history)
    assert not done and reply.startswith("[GAME]") and "C: [1]" in reply  # the smallest disk moved to C


def test_held_out_games_use_seeds_four_mod_five():
    pytest.importorskip("textarena")
    from textenv.multiturn import GuessTheNumber

    rng = np.random.default_rng(0)
    for split, allowed in (("test", {4}), ("train", {0, 1, 2, 3})):
        task = GuessTheNumber(split=split)
        residues = {task.new_episode(rng).seed % 5 for _ in range(12)}
        assert residues <= allowed and (len(residues) > 1 or split == "test")


def test_a_multi_turn_run_evaluates_from_its_directory(tmp_path):
    from textenv.agents.text import evaluate_text_run

    config = TextTrainConfig(task="ToyTurns", model="tiny", iterations=1, num_envs=4, eval_samples=4,
                             runs_dir=str(tmp_path), run_name="r", progress=False, tensorboard=False, sample_every=0)
    config.ppo.num_minibatches = 2
    summary = train_text(config)
    result = evaluate_text_run(tmp_path / "r", samples=4, seed=config.seed)
    assert result["prompts"] == "held-out" and result["responses"] == 4
    assert result["score_mean"] == pytest.approx(summary["eval_score_after"], abs=1e-6)  # same episodes and noise


# -- edges: validation, bad results, budgets, resets, positions ---------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("max_turns", 0, "max_turns must be >= 1"), ("max_turn_tokens", 0, "max_turn_tokens must be >= 1"),
    ("kl_coef", -0.1, "kl_coef must be >= 0"), ("stop", [""], "stop strings must be non-empty"),
    ("stop", [3], "stop strings must be non-empty"), ("reply_format", " no reply ", "must contain '{reply}'"),
])
def test_task_validation_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        MultiTurnTextEnv(task=_task(**{field: value}), model="tiny")
    MultiTurnTextEnv(task=_task(max_turns=1, max_turn_tokens=1, kl_coef=0.0), model="tiny")  # the bounds are valid


@pytest.mark.parametrize("result,message", [
    ("just text", r"must return \(reply, reward, done\)"), ((3, 0.0, False), "reply must be a string or None"),
    (("x", True, False), "reward must be a number, got True"), (("x", "1", False), "reward must be a number"),
    (("x", [1], False), "reward must be a number"),
])
def test_a_bad_respond_result_is_a_reward_error(result, message):
    env = MultiTurnTextEnv(task=FunctionTask(respond=lambda h: result, prompts=["hi"]), model="tiny")
    env.reset(seed=0)
    with pytest.raises(RewardError, match=message):
        env.step(EOS)


def test_a_reward_error_from_respond_passes_through_unchanged():
    def respond(history):
        raise RewardError("my own message")

    env = MultiTurnTextEnv(task=FunctionTask(respond=respond, prompts=["hi"]), model="tiny")
    env.reset(seed=0)
    with pytest.raises(RewardError, match="^my own message$"):
        env.step(EOS)


def test_turn_defaults_and_task_defaults():
    assert Turn("x") == ("x", 0.0, False)
    from textenv.multiturn import MultiTurnTask

    assert _task().has_held_out is False and Calculator().has_held_out is True
    with pytest.raises(NotImplementedError):
        MultiTurnTask().new_episode(np.random.default_rng(0))
    task = MultiTurnTask()  # the documented defaults
    assert (task.max_turn_tokens, task.max_turns, task.kl_coef, task.max_context_tokens) == (24, 4, 0.02, 128)
    with pytest.raises(ValueError, match="^task MultiTurn: max_turns must be >= 1, got 0$"):
        MultiTurnTask(max_turns=0).validate()


def test_bad_steps_fail_clearly():
    env = MultiTurnTextVectorEnv(num_envs=2, task=_task(), model="tiny")
    with pytest.raises(RuntimeError, match="before reset"):
        env._gen.step(torch.tensor([A, A]))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="expected 2 actions"):
        env.step(torch.tensor([A, A, A]))
    vocab = env.single_action_space.n
    with pytest.raises(ValueError, match=rf"action {vocab} \(row 1\) is outside Discrete\({vocab}\)"):
        env.step(torch.tensor([A, vocab]))
    assert env.single_observation_space["input_ids"].high.max() == vocab - 1
    assert env.single_observation_space["agent_mask"].high.max() == 1
    assert env.single_observation_space["attention_mask"].high.max() == 1


def test_a_reply_that_leaves_exactly_one_token_fits():
    task = FunctionTask(respond=lambda h: ("ok", 0.0, False), prompts=["hi"], max_context_tokens=8, max_turn_tokens=3,
                        reply_format=" {reply} ")
    env = MultiTurnTextEnv(task=task, model="tiny")
    steps = _play(env, [A, A, A, B_], seed=0)
    assert not steps[2][2] and steps[2][0]["attention_mask"].sum() - steps[0][0]["attention_mask"].sum() == 6
    assert steps[3][2] and steps[3][3]["end_reason"] == "context"  # 3 + 4 + 1 = 8 tokens: the context is full
    assert steps[3][3]["response_text"] == "aaa ok b"  # the whole context, up to its last column


def test_a_turn_cut_by_the_context_is_not_answered():
    calls = []
    task = FunctionTask(respond=lambda h: calls.append(1) or ("ok", 1.0, False), prompts=["hi"], max_context_tokens=5,
                        max_turn_tokens=10)
    _, _, terminated, info = _play(MultiTurnTextEnv(task=task, model="tiny"), [A] * 5, seed=0)[-1]
    assert terminated and info["end_reason"] == "context" and info["score"] == 0.0 and calls == []


def test_a_second_reset_starts_clean():
    env = MultiTurnTextEnv(task=_task(), model="tiny")
    acts = [A, EOS, B_, A, EOS, A, EOS]
    _play(env, [A, A, EOS, A, A], seed=3)  # a finished turn with a reward, another under way (its 'a's would pay)
    again = _play(env, acts, seed=4)
    fresh = _play(MultiTurnTextEnv(task=_task(), model="tiny"), acts, seed=4)
    for (o1, r1, t1, i1), (o2, r2, t2, i2) in zip(again, fresh):
        assert all(np.array_equal(o1[k], o2[k]) for k in o1) and r1 == pytest.approx(r2) and t1 == t2
        assert {k: v for k, v in i1.items() if k != "ref_logprobs"} == {k: v for k, v in i2.items() if k != "ref_logprobs"}


def test_response_text_and_render_are_the_decoded_conversation():
    env = MultiTurnTextEnv(task=_task(), model="tiny", render_mode="ansi")
    _, info = env.reset(seed=0)
    steps = _play(env, [A, A, EOS, B_, A, A, A, A, EOS], seed=0)
    assert steps[-1][3]["response_text"] == "aa ok baaa okok a"
    assert env.render() == info["prompt"] + "aa ok baaa okok a"


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m['content'] }} {% endfor %}",  # no EOS text at all
    "<eos>{% for m in messages %}{{ m['content'] }} {% endfor %}",  # EOS text only as a BOS
    # the agent's message is written differently once it is answered: the reply is not a suffix
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}.{{ m['content'] }}.<eos>"
    "{% else %}{{ m['content'] }}<eos>{% endif %}{% endfor %}",
])
def test_a_template_whose_reply_cannot_be_cut_out_falls_back_to_the_reply_format(template):
    tok = char_tokenizer()
    tok.chat_template = template
    task = FunctionTask(respond=lambda h: ("ok", 0.0, False), prompts=["hi"], reply_format="?{reply}?", max_turn_tokens=2)
    env = MultiTurnTextEnv(task=task, model=tiny_causal_lm(tok), tokenizer=tok)
    env.reset(seed=0)
    env.step(B_)
    obs, *_ = env.step(EOS)
    ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
    assert tok.decode(ids) == env.unwrapped._gen.prompts[0] + "b<eos>?ok?"


def test_a_template_that_closes_only_the_agents_turns_replies_in_its_own_format():
    """Its EOS text is the end of the agent's (empty) turn one character in: the reply is the template's."""
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}<eos>{% endif %}"
                         "{% endfor %}")
    task = FunctionTask(respond=lambda h: ("ok", 0.0, False), prompts=["h"], reply_format="?{reply}?", max_turn_tokens=2)
    env = MultiTurnTextEnv(task=task, model=tiny_causal_lm(tok), tokenizer=tok)
    env.reset(seed=0)
    obs, *_ = env.step(EOS)
    ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
    assert tok.decode(ids) == "h<eos>ok"


def _bos_tokenizer():
    """The char tokenizer with a ``<bos>`` its post-processor puts before every encoded text."""
    from tokenizers import processors

    tok = char_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                                  special_tokens=[("<bos>", tok.bos_token_id)])
    assert tok("b")["input_ids"] == [tok.bos_token_id, B_]
    return tok


@pytest.mark.parametrize("chat", [True, False])
def test_env_replies_get_no_bos_from_a_tokenizer_that_adds_one(chat):
    tok = _bos_tokenizer()
    tok.chat_template = TEMPLATE
    task = FunctionTask(respond=lambda h: ("ok", 0.0, False), prompts=["hi"], reply_format=" {reply} ",
                        max_turn_tokens=2, chat=chat)
    env = MultiTurnTextEnv(task=task, model=tiny_causal_lm(tok), tokenizer=tok)
    env.reset(seed=0)
    env.step(B_)
    obs, *_ = env.step(EOS)
    ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
    # a rendered chat prompt carries its own specials; a plain one gets the tokenizer's BOS, and only it
    expected = ("" if chat else "<bos>") + env.unwrapped._gen.prompts[0] + ("b<eos>u, ok<eos>a, " if chat else "b<eos> ok ")
    assert tok.decode(ids) == expected


def test_a_stop_string_turn_is_recorded_without_special_tokens():
    seen = []
    tok = char_tokenizer()
    task = FunctionTask(respond=lambda h: seen.append(h[-1]["content"]) or ("ok", 0.0, True), prompts=["hi"],
                        stop=["!"], max_turn_tokens=10)
    env = MultiTurnTextEnv(task=task, model="tiny")
    _play(env, [tok.pad_token_id, A, tok.convert_tokens_to_ids("!")], seed=0)
    assert seen == ["a!"]


def test_a_reply_that_would_fill_the_context_ends_the_episode():
    task = FunctionTask(respond=lambda h: ("ok", 0.0, False), prompts=["hi"], max_context_tokens=7, max_turn_tokens=3,
                        reply_format=" {reply} ")
    steps = _play(MultiTurnTextEnv(task=task, model="tiny"), [A, A, A, B_], seed=0)
    assert len(steps) == 3 and steps[2][2] and steps[2][3]["end_reason"] == "context"  # 3 + 4 = 7: no room left


def test_the_env_resolves_its_device():
    from textenv.device import resolve_device

    env = MultiTurnTextEnv(task=_task(), model="tiny", device="auto")
    assert env.unwrapped._gen.device == resolve_device("auto") and isinstance(env.unwrapped._gen.device, torch.device)
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        MultiTurnTextEnv(task=_task(), model="tiny", device="gpu0")


def test_rows_ending_together_with_different_lengths_on_an_absolute_position_model(tmp_path):
    """The reference's one forward at the end: rows of different lengths, on GPT-2 (absolute
    positions), give each row's unpadded log-probs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_text_trust import _tiny_gpt2_dir

    path = _tiny_gpt2_dir(tmp_path, dropout=0.0)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    task = FunctionTask(respond=lambda h: ("ok" + "k" * len(h[-1]["content"]), 0.0, len(h) > 3), prompts=["hi", "yo x"],
                        max_prompt_tokens=6, max_context_tokens=24, reply_format=" {reply} ")
    vec = MultiTurnTextVectorEnv(num_envs=2, task=task, model=model, tokenizer=tok)
    vec.reset(seed=0)
    for a in ([EOS, A], [A, A], [A, EOS], [EOS, EOS]):  # both rows end at the 4th step
        obs, _, terminated, _, info = vec.step(torch.tensor(a))
    assert terminated.all() and len(set(vec.conversation_lengths.tolist())) == 2
    for i in range(2):
        real = obs["attention_mask"][i].bool()
        ids = obs["input_ids"][i][real][None]
        agent = obs["agent_mask"][i][real].bool()
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        cols = agent.nonzero().squeeze(1).tolist()
        expected = [logp[c - 1, ids[0, c]].item() for c in cols]
        np.testing.assert_allclose(info["ref_logprobs"][i, : len(cols)].numpy(), expected, atol=1e-5)
