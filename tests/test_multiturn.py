"""Multi-turn episodes: the env's tokens are observations, never actions; vector ≡ single; the KL,
the loss and GAE cover the agent's tokens; the tool task, the textarena adapter, the trainer."""

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenv  # noqa: F401  (registers the ids)
from textenv import RewardError
from textenv.agents.lm import LMActorCritic
from textenv.agents.rollout_text import Rollout, collect_rollout, shaped_rewards, token_advantages
from textenv.agents.text import (
    EstimatorConfig,
    LoggingConfig,
    SamplingConfig,
    TextTrainConfig,
    train_text,
)
from textenv.models import char_tokenizer, tiny_causal_lm
from textenv.multiturn import MultiTurnTextEnv, MultiTurnTextVectorEnv
from textenv.tasks import Calculator, FunctionTask, Turn, safe_arithmetic

A, B_, EOS = 3, 4, 1  # the tiny vocabulary: 'a', 'b', <eos>


def _respond(history):
    """A deterministic env side: replies with the agent's turn count, pays 0.25 per 'a' said,
    ends after the third turn."""
    turns = sum(m["role"] == "assistant" for m in history)
    said = history[-1]["content"]
    return Turn("ok" * turns, 0.25 * said.count("a"), turns >= 3)


def _task(**kw):
    settings = dict(
        respond=_respond,
        prompts=["hello there", "say a", "what now"],
        max_prompt_tokens=12,
        max_context_tokens=40,
        max_turn_tokens=4,
        kl_coef=0.1,
        reply_format=" {reply} ",
    )
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
    singles = [
        _play(MultiTurnTextEnv(task=_task(), model="tiny"), acts[i], seed=10 + i) for i in range(n)
    ]
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
                np.testing.assert_allclose(
                    info["ref_logprobs"][i, :k].numpy(), s_info["ref_logprobs"], atol=1e-5
                )
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
    actions = [
        A,
        A,
        EOS,
        B_,
        A,
        A,
        A,
        A,
        EOS,
    ]  # turn 1 ends at EOS, turn 2 at the turn budget, turn 3 at EOS
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
    assert [m["role"] for m in seen[-1]] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert [m["content"] for m in seen[-1][1::2]] == ["aa", "baaa", "a"]
    assert turn_rewards == [
        0,
        0,
        0.5,
        0,
        0,
        0,
        0.75,
        0,
        0.25,
    ]  # paid at the token that ended each turn
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
    never_done = FunctionTask(
        respond=lambda h: ("ok", 1.0, False),
        prompts=["hi"],
        max_prompt_tokens=4,
        max_context_tokens=10,
        max_turn_tokens=3,
        max_turns=50,
        reply_format=" {reply} ",
    )
    env = MultiTurnTextEnv(task=never_done, model="tiny")
    steps = _play(env, [A] * 20, seed=0)
    _, _, terminated, info = steps[-1]
    assert terminated and info["context_exhausted"] and info["end_reason"] == "context"
    # turn 1: 3 agent + 4 reply (" ok "), turn 2: 3 agent = 10 tokens; the second reply does not fit
    assert len(steps) == 6 and info["turns"] == 2 and info["score"] == 2.0


def test_max_turns_ends_the_episode():
    task = FunctionTask(
        respond=lambda h: ("ok", 1.0, False), prompts=["hi"], max_turns=2, max_turn_tokens=2
    )
    _, _, terminated, info = _play(MultiTurnTextEnv(task=task, model="tiny"), [A] * 10, seed=0)[-1]
    assert (
        terminated
        and info["end_reason"] == "turn_limit"
        and info["turns"] == 2
        and not info["context_exhausted"]
    )


def test_a_stop_string_ends_the_turn():
    seen = []
    task = FunctionTask(
        respond=lambda h: seen.append(h[-1]["content"]) or (None, 0.0, True),
        prompts=["hi"],
        stop=["ab"],
        max_turn_tokens=10,
    )
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
    env = MultiTurnTextEnv(
        task=FunctionTask(respond=lambda h: ("x", float("nan"), False), prompts=["hi"]),
        model="tiny",
    )
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
    vec = gym.make_vec(
        "textenv/MultiTurn-v0", num_envs=2, model="tiny", respond=_respond, prompts=["hi"]
    )
    obs, _ = vec.reset(seed=0)
    assert obs["input_ids"].shape[0] == 2


def test_numpy_arrays_mode_returns_numpy():
    vec = MultiTurnTextVectorEnv(num_envs=2, task=_task(), model="tiny", arrays="numpy")
    obs, _ = vec.reset(seed=0)
    obs, reward, terminated, truncated, info = vec.step(np.array([EOS, A]))
    assert isinstance(obs["agent_mask"], np.ndarray) and isinstance(reward, np.ndarray)
    assert info["_turn_reward"].tolist() == [True, False]


# -- chat templates ----------------------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}, {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}a, {% endif %}"
)


def _chat_env(**kw):
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    model = tiny_causal_lm(tok)
    task = FunctionTask(
        respond=lambda h: ("ok", 0.0, len(h) > 4), prompts=["hi"], max_turn_tokens=2, **kw
    )
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
    obs, _, terminated, _, _ = env.step(
        B_
    )  # the turn budget ends it: the env closes the turn with EOS
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
    reply, reward, done = episode.respond(
        hist + [{"role": "assistant", "content": f"<calc>{expr}</calc>"}]
    )
    assert reply == str(episode.answer) and reward == 0 and not done
    assert episode.respond(
        hist + [{"role": "assistant", "content": f"It is {episode.answer:,}."}]
    ) == (None, 1.0, True)
    assert episode.respond(hist + [{"role": "assistant", "content": f"{episode.answer + 1}"}]) == (
        None,
        0.0,
        True,
    )
    assert episode.respond(hist + [{"role": "assistant", "content": "no idea"}])[1:] == (0.0, False)
    tagged = Calculator(size=20, seed=3, answer_tags=True).new_episode(np.random.default_rng(0))
    assert tagged.respond(hist + [{"role": "assistant", "content": f"{tagged.answer}"}])[2] is False
    assert (
        tagged.respond(
            hist + [{"role": "assistant", "content": f"<answer>{tagged.answer}</answer>"}]
        )[1]
        == 1.0
    )


def test_calculator_held_out_questions_are_every_fifth():
    allq = Calculator(size=20).questions()
    assert Calculator(size=20, split="test").questions() == allq[4::5]
    assert len(Calculator(size=20, split="train").questions()) == 16


def test_textarena_guess_the_number_plays_through_the_adapter():
    pytest.importorskip("textarena")
    from textenv.tasks import GuessTheNumber

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
        assert (
            reply.startswith("[GAME]") and "[Player]" not in reply
        )  # the agent's own move is not echoed
        lo, hi = (guess + 1, hi) if "higher" in reply else (lo, guess - 1)
        history.append({"role": "user", "content": reply})
    assert done and reward == 1.0


def test_textarena_two_player_game_against_the_fixed_opponent():
    pytest.importorskip("textarena")
    from textenv.tasks import TicTacToe

    episode = TicTacToe().new_episode(np.random.default_rng(0))
    history = [{"role": "user", "content": episode.prompt}, {"role": "assistant", "content": "[4]"}]
    reply, reward, done = episode.respond(history)
    assert (
        not done and "Player 1" in reply and "O" in reply
    )  # our move and the opponent's are on the board


# -- the trainer on multi-turn envs --------------------------------------------------------------


def _policy(temperature=1.0):
    tok = char_tokenizer()
    return LMActorCritic(tiny_causal_lm(tok, seed=0), temperature=temperature), tok


def test_rollout_logprobs_are_the_updates_and_kl_is_zero_when_the_policy_is_the_reference():
    """The chunked KV-cached sampling across turns and the update's one forward over the whole
    conversation agree; with policy = reference the KL over agent tokens is 0."""
    policy, tok = _policy(temperature=0.7)
    vec = MultiTurnTextVectorEnv(
        num_envs=4,
        task=_task(max_turn_tokens=3),
        model=tiny_causal_lm(tok, seed=0),
        tokenizer=tok,
        temperature=0.7,
    )
    rollout = collect_rollout(policy, vec, seed=0, generator=torch.Generator().manual_seed(0))
    assert rollout.positions is not None and rollout.step_scores is not None
    m = rollout.mask.bool()
    assert (rollout.input_ids.gather(1, rollout.positions)[m] == rollout.actions[m]).all()
    assert int(m.sum()) > 4 * 3  # more than one turn per row on average
    with torch.no_grad():
        logprob, _, value = policy.evaluate_responses(
            rollout.input_ids,
            rollout.attention_mask,
            rollout.actions,
            rollout.prompt_len,
            positions=rollout.positions,
        )
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
    assert (
        rollout.step_scores * (1 - rollout.mask)
    ).abs().sum() == 0  # nothing paid at non-agent columns
    # γ = λ = 1 and V = 0: every token's advantage is the rest of the episode's return, across turns.
    zero = Rollout(**{**rollout.__dict__, "values": torch.zeros_like(rollout.values)})
    adv, _ = token_advantages(zero, rewards, 1.0, 1.0)
    rest = rewards.flip(1).cumsum(1).flip(1) * rollout.mask
    torch.testing.assert_close(adv, rest, atol=1e-5, rtol=0)


def test_missing_eos_penalty_hits_conversations_that_ran_out_of_context():
    policy, tok = _policy()
    task = FunctionTask(
        respond=lambda h: ("ok", 0.0, False),
        prompts=["hi"],
        max_context_tokens=8,
        max_turns=50,
        max_turn_tokens=3,
    )
    rollout = collect_rollout(
        policy,
        MultiTurnTextVectorEnv(num_envs=2, task=task, model="tiny"),
        seed=0,
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.truncated_response.all()
    rewards = shaped_rewards(rollout, 0.0, True, 0.5)
    torch.testing.assert_close(rewards.sum(1), rollout.scores - 0.5)
    # At each conversation's last agent token, nowhere else.
    penalty = shaped_rewards(rollout, 0.0, True, None) - rewards
    last = rollout.mask.sum(1).long() - 1
    assert last.min() > 0
    expected = torch.zeros_like(penalty)
    expected[torch.arange(2), last] = 0.5
    torch.testing.assert_close(penalty, expected)
    # A context of one token: one-token conversations, penalised at that token.
    one = dataclasses.replace(task, max_context_tokens=1)
    rollout = collect_rollout(
        policy,
        MultiTurnTextVectorEnv(num_envs=2, task=one, model="tiny"),
        seed=0,
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.mask.tolist() == [[1.0], [1.0]] and rollout.truncated_response.all()
    torch.testing.assert_close(
        shaped_rewards(rollout, 0.0, True, 0.5), rollout.scores[:, None] - 0.5
    )


def test_ppo_learns_the_two_turn_toy_task(tmp_path):
    config = TextTrainConfig(
        task="ToyTurns",
        model="tiny",
        iterations=25,
        num_envs=16,
        learning_rate=3e-3,
        eval_samples=16,
        logging=LoggingConfig(
            runs_dir=str(tmp_path),
            progress=False,
            tensorboard=False,
            save_checkpoint=False,
            sample_every=0,
        ),
    )
    config.ppo.num_minibatches = 2
    summary = train_text(config)
    assert (
        summary["eval_score_before"] < 0.5 and summary["eval_score_after"] > 1.5
    )  # the best return is 2


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_critic_free_estimators_learn_across_turns(tmp_path, estimator):
    # 35 iterations: at 25, GRPO's last iteration sat at 1.18 with this machine's packages (~1.8 at 35).
    config = TextTrainConfig(
        task="ToyTurns",
        model="tiny",
        iterations=35,
        num_envs=16,
        learning_rate=3e-3,
        eval_samples=0,
        estimator=EstimatorConfig(advantage=estimator),
        sampling=SamplingConfig(group_size=4 if estimator == "grpo" else 1),
        logging=LoggingConfig(
            runs_dir=str(tmp_path),
            progress=False,
            tensorboard=False,
            save_checkpoint=False,
            sample_every=0,
        ),
    )
    config.ppo.num_minibatches = 2
    summary = train_text(config)
    assert summary["score_mean_first"] < 0.5 and summary["score_mean_last"] > 1.2


def test_trainer_refuses_prompt_and_reward_flags_on_multi_turn_tasks(tmp_path):
    config = TextTrainConfig(
        task="ToyTurns", model="tiny", reward="vader", logging=LoggingConfig(runs_dir=str(tmp_path))
    )
    with pytest.raises(ValueError, match="--reward does not apply to the multi-turn task ToyTurns"):
        train_text(config)


def test_task_options_reach_the_task(tmp_path):
    from textenv.agents.text import task_settings

    config = TextTrainConfig(
        task="ToyTurns", task_options='{"max_turns": 3, "max_context_tokens": 40}', max_new_tokens=5
    )
    kwargs, held_out = task_settings(config)
    assert kwargs == {"max_turn_tokens": 5, "max_turns": 3, "max_context_tokens": 40} and held_out
    config = TextTrainConfig(
        task="RG-ChainSum", task_options='{"answer_format": "number", "size": 10}'
    )
    assert task_settings(config)[0] == {"answer_format": "number", "size": 10}


def test_textarena_adapter_plays_any_offline_game_by_id():
    pytest.importorskip("textarena")
    from textenv.tasks import TextArena

    episode = TextArena(game="TowerOfHanoi-v0").new_episode(np.random.default_rng(0))
    assert "Tower" in episode.prompt
    history = [
        {"role": "user", "content": episode.prompt},
        {"role": "assistant", "content": "[A C]"},
    ]
    reply, reward, done = episode.respond(history)
    assert (
        not done and reply.startswith("[GAME]") and "C: [1]" in reply
    )  # the smallest disk moved to C


def test_held_out_games_use_seeds_four_mod_five():
    pytest.importorskip("textarena")
    from textenv.tasks import GuessTheNumber

    rng = np.random.default_rng(0)
    for split, allowed in (("test", {4}), ("train", {0, 1, 2, 3})):
        task = GuessTheNumber(split=split)
        residues = {task.new_episode(rng).seed % 5 for _ in range(12)}
        assert residues <= allowed and (len(residues) > 1 or split == "test")


def test_a_multi_turn_run_evaluates_from_its_directory(tmp_path):
    from textenv.agents.text import evaluate_text_run

    config = TextTrainConfig(
        task="ToyTurns",
        model="tiny",
        iterations=1,
        num_envs=4,
        eval_samples=4,
        logging=LoggingConfig(
            runs_dir=str(tmp_path), run_name="r", progress=False, tensorboard=False, sample_every=0
        ),
    )
    config.ppo.num_minibatches = 2
    summary = train_text(config)
    result = evaluate_text_run(tmp_path / "r", samples=4, seed=config.seed)
    assert result["prompts"] == "held-out" and result["responses"] == 4
    assert result["score_mean"] == pytest.approx(
        summary["eval_score_after"], abs=1e-6
    )  # same episodes and noise


# -- edges: validation, bad results, budgets, resets, positions ---------------------------------


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("max_turns", 0, "max_turns must be >= 1"),
        ("max_turn_tokens", 0, "max_turn_tokens must be >= 1"),
        ("kl_coef", -0.1, "kl_coef must be >= 0"),
        ("stop", [""], "stop strings must be non-empty"),
        ("stop", [3], "stop strings must be non-empty"),
        ("reply_format", " no reply ", "must contain '{reply}'"),
    ],
)
def test_task_validation_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        MultiTurnTextEnv(task=_task(**{field: value}), model="tiny")
    MultiTurnTextEnv(
        task=_task(max_turns=1, max_turn_tokens=1, kl_coef=0.0), model="tiny"
    )  # the bounds are valid


@pytest.mark.parametrize(
    "result,message",
    [
        ("just text", r"must return \(reply, reward, done\)"),
        ((3, 0.0, False), "reply must be a string or None"),
        (("x", True, False), "reward must be a number, got True"),
        (("x", "1", False), "reward must be a number"),
        (("x", [1], False), "reward must be a number"),
    ],
)
def test_a_bad_respond_result_is_a_reward_error(result, message):
    env = MultiTurnTextEnv(
        task=FunctionTask(respond=lambda h: result, prompts=["hi"]), model="tiny"
    )
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
    from textenv.tasks import MultiTurnTask

    assert _task().has_held_out is False and Calculator().has_held_out is True
    with pytest.raises(NotImplementedError):
        MultiTurnTask().new_episode(np.random.default_rng(0))
    task = MultiTurnTask()  # the documented defaults
    assert (task.max_turn_tokens, task.max_turns, task.kl_coef, task.max_context_tokens) == (
        24,
        4,
        0.02,
        128,
    )
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
    with pytest.raises(
        ValueError, match=rf"action {vocab} \(row 1\) is outside Discrete\({vocab}\)"
    ):
        env.step(torch.tensor([A, vocab]))
    assert env.single_observation_space["input_ids"].high.max() == vocab - 1
    assert env.single_observation_space["agent_mask"].high.max() == 1
    assert env.single_observation_space["attention_mask"].high.max() == 1


def test_a_reply_that_leaves_exactly_one_token_fits():
    task = FunctionTask(
        respond=lambda h: ("ok", 0.0, False),
        prompts=["hi"],
        max_context_tokens=8,
        max_turn_tokens=3,
        reply_format=" {reply} ",
    )
    env = MultiTurnTextEnv(task=task, model="tiny")
    steps = _play(env, [A, A, A, B_], seed=0)
    assert (
        not steps[2][2]
        and steps[2][0]["attention_mask"].sum() - steps[0][0]["attention_mask"].sum() == 6
    )
    assert (
        steps[3][2] and steps[3][3]["end_reason"] == "context"
    )  # 3 + 4 + 1 = 8 tokens: the context is full
    assert steps[3][3]["response_text"] == "aaa ok b"  # the whole context, up to its last column


def test_a_turn_cut_by_the_context_is_not_answered():
    calls = []
    task = FunctionTask(
        respond=lambda h: calls.append(1) or ("ok", 1.0, False),
        prompts=["hi"],
        max_context_tokens=5,
        max_turn_tokens=10,
    )
    _, _, terminated, info = _play(MultiTurnTextEnv(task=task, model="tiny"), [A] * 5, seed=0)[-1]
    assert terminated and info["end_reason"] == "context" and info["score"] == 0.0 and calls == []


def test_a_second_reset_starts_clean():
    env = MultiTurnTextEnv(task=_task(), model="tiny")
    acts = [A, EOS, B_, A, EOS, A, EOS]
    _play(
        env, [A, A, EOS, A, A], seed=3
    )  # a finished turn with a reward, another under way (its 'a's would pay)
    again = _play(env, acts, seed=4)
    fresh = _play(MultiTurnTextEnv(task=_task(), model="tiny"), acts, seed=4)
    for (o1, r1, t1, i1), (o2, r2, t2, i2) in zip(again, fresh):
        assert (
            all(np.array_equal(o1[k], o2[k]) for k in o1) and r1 == pytest.approx(r2) and t1 == t2
        )
        assert {k: v for k, v in i1.items() if k != "ref_logprobs"} == {
            k: v for k, v in i2.items() if k != "ref_logprobs"
        }


def test_response_text_and_render_are_the_decoded_conversation():
    env = MultiTurnTextEnv(task=_task(), model="tiny", render_mode="ansi")
    _, info = env.reset(seed=0)
    steps = _play(env, [A, A, EOS, B_, A, A, A, A, EOS], seed=0)
    assert steps[-1][3]["response_text"] == "aa ok baaa okok a"
    assert env.render() == info["prompt"] + "aa ok baaa okok a"


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m['content'] }} {% endfor %}",  # no EOS text at all
        "<eos>{% for m in messages %}{{ m['content'] }} {% endfor %}",  # EOS text only as a BOS
        # the agent's message is written differently once it is answered: the reply is not a suffix
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}.{{ m['content'] }}.<eos>"
        "{% else %}{{ m['content'] }}<eos>{% endif %}{% endfor %}",
    ],
)
def test_a_template_whose_reply_cannot_be_cut_out_falls_back_to_the_reply_format(template):
    tok = char_tokenizer()
    tok.chat_template = template
    task = FunctionTask(
        respond=lambda h: ("ok", 0.0, False),
        prompts=["hi"],
        reply_format="?{reply}?",
        max_turn_tokens=2,
    )
    env = MultiTurnTextEnv(task=task, model=tiny_causal_lm(tok), tokenizer=tok)
    env.reset(seed=0)
    env.step(B_)
    obs, *_ = env.step(EOS)
    ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
    assert tok.decode(ids) == env.unwrapped._gen.prompts[0] + "b<eos>?ok?"


def test_a_template_that_closes_only_the_agents_turns_replies_in_its_own_format():
    """Its EOS text is the end of the agent's (empty) turn one character in: the reply is the template's."""
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}<eos>{% endif %}"
        "{% endfor %}"
    )
    task = FunctionTask(
        respond=lambda h: ("ok", 0.0, False),
        prompts=["h"],
        reply_format="?{reply}?",
        max_turn_tokens=2,
    )
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
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    assert tok("b")["input_ids"] == [tok.bos_token_id, B_]
    return tok


@pytest.mark.parametrize("chat", [True, False])
def test_env_replies_get_no_bos_from_a_tokenizer_that_adds_one(chat):
    tok = _bos_tokenizer()
    tok.chat_template = TEMPLATE
    task = FunctionTask(
        respond=lambda h: ("ok", 0.0, False),
        prompts=["hi"],
        reply_format=" {reply} ",
        max_turn_tokens=2,
        chat=chat,
    )
    env = MultiTurnTextEnv(task=task, model=tiny_causal_lm(tok), tokenizer=tok)
    env.reset(seed=0)
    env.step(B_)
    obs, *_ = env.step(EOS)
    ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
    # a rendered chat prompt carries its own specials; a plain one gets the tokenizer's BOS, and only it
    expected = (
        ("" if chat else "<bos>")
        + env.unwrapped._gen.prompts[0]
        + ("b<eos>u, ok<eos>a, " if chat else "b<eos> ok ")
    )
    assert tok.decode(ids) == expected


def test_a_stop_string_turn_is_recorded_without_special_tokens():
    seen = []
    tok = char_tokenizer()
    task = FunctionTask(
        respond=lambda h: seen.append(h[-1]["content"]) or ("ok", 0.0, True),
        prompts=["hi"],
        stop=["!"],
        max_turn_tokens=10,
    )
    env = MultiTurnTextEnv(task=task, model="tiny")
    _play(env, [tok.pad_token_id, A, tok.convert_tokens_to_ids("!")], seed=0)
    assert seen == ["a!"]


def test_a_reply_that_would_fill_the_context_ends_the_episode():
    task = FunctionTask(
        respond=lambda h: ("ok", 0.0, False),
        prompts=["hi"],
        max_context_tokens=7,
        max_turn_tokens=3,
        reply_format=" {reply} ",
    )
    steps = _play(MultiTurnTextEnv(task=task, model="tiny"), [A, A, A, B_], seed=0)
    assert (
        len(steps) == 3 and steps[2][2] and steps[2][3]["end_reason"] == "context"
    )  # 3 + 4 = 7: no room left


def test_the_env_resolves_its_device():
    from textenv.device import resolve_device

    env = MultiTurnTextEnv(task=_task(), model="tiny", device="auto")
    assert env.unwrapped._gen.device == resolve_device("auto") and isinstance(
        env.unwrapped._gen.device, torch.device
    )
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        MultiTurnTextEnv(task=_task(), model="tiny", device="gpu0")


def test_rows_ending_together_with_different_lengths_on_an_absolute_position_model(tmp_path):
    """The reference's one forward at the end: rows of different lengths, on GPT-2 (absolute
    positions), give each row's unpadded log-probs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_text_trust import _tiny_gpt2_dir

    path = _tiny_gpt2_dir(tmp_path, dropout=0.0)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    task = FunctionTask(
        respond=lambda h: ("ok" + "k" * len(h[-1]["content"]), 0.0, len(h) > 3),
        prompts=["hi", "yo x"],
        max_prompt_tokens=6,
        max_context_tokens=24,
        reply_format=" {reply} ",
    )
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
        np.testing.assert_allclose(
            info["ref_logprobs"][i, : len(cols)].numpy(), expected, atol=1e-5
        )


# -- construction, reset options and the env classes' own checks -----------------------------------


def test_bad_construction_arguments_fail_clearly():
    from textenv.tasks import make_task

    with pytest.raises(ValueError, match=r"render_mode must be one of \['ansi'\], got 'human'"):
        MultiTurnTextEnv(task=_task(), model="tiny", render_mode="human")
    with pytest.raises(ValueError, match=r"render_mode must be one of \['ansi'\], got 'human'"):
        MultiTurnTextVectorEnv(num_envs=2, task=_task(), model="tiny", render_mode="human")
    with pytest.raises(ValueError, match="num_envs must be >= 1, got 0"):
        MultiTurnTextVectorEnv(num_envs=0, task=_task(), model="tiny")
    with pytest.raises(ValueError, match="arrays must be 'torch' or 'numpy', got 'jax'"):
        MultiTurnTextVectorEnv(num_envs=2, task=_task(), model="tiny", arrays="jax")
    with pytest.raises(
        ValueError, match=r"task FunctionTask: respond must be a callable \(history\)"
    ):
        FunctionTask(prompts=["hi"]).validate()
    with pytest.raises(ValueError, match="task FunctionTask: prompts is empty"):
        FunctionTask(respond=_respond).validate()
    with pytest.raises(
        ValueError, match="pass overrides to the MultiTurnTask you construct, not beside it"
    ):
        make_task(_task(), max_turns=2)
    with pytest.raises(
        ValueError,
        match="unknown task 'Chess'; known tasks: Sentiment, .*, FunctionTask, Calculator",
    ):
        make_task("Chess")
    with pytest.raises(
        ValueError, match="task Toy is a single-turn task: use textenv.env.TextGenerationEnv"
    ):
        MultiTurnTextEnv(task="Toy", model="tiny")


def test_a_one_row_vector_env_its_spaces_metadata_and_render():
    from gymnasium.vector import AutoresetMode
    from gymnasium.vector.utils import batch_space

    env = MultiTurnTextVectorEnv(num_envs=1, task=_task(), model="tiny", render_mode="ansi")
    vocab = env.single_action_space.n
    assert env.metadata["autoreset_mode"] == AutoresetMode.DISABLED and env.metadata[
        "render_modes"
    ] == ["ansi"]
    assert env.observation_space == batch_space(env.single_observation_space, 1)
    assert env.action_space == gym.spaces.MultiDiscrete([vocab]) and env.render_mode == "ansi"
    _, info = env.reset()  # unseeded: the row draws from its own generator
    assert isinstance(info["episode_seed"][0], int)
    env.step(torch.tensor([A]))
    assert env.render() == [info["prompt"][0] + "a"]
    quiet = MultiTurnTextVectorEnv(task=_task(), model="tiny")
    assert quiet.num_envs == 8 and quiet.render_mode is None  # the defaults
    quiet.reset(seed=0)
    assert quiet.render() is None
    quiet.close()
    assert quiet._gen.episodes == [None] * 8  # closing drops the episodes (and what they hold)


def test_reset_options_are_checked_and_given_episodes_replace_the_draw():
    env = MultiTurnTextVectorEnv(num_envs=4, task=_task(), model="tiny")
    for group in (0, 3):
        with pytest.raises(ValueError, match=rf"must be >= 1 and divide num_envs=4, got {group}"):
            env.reset(seed=0, options={"group_size": group})
    task = _task()
    episodes = [task.new_episode(np.random.default_rng(s)) for s in range(4)]
    for options in ({"episodes": episodes}, {"reset_mask": np.array([True, False, True, False])}):
        with pytest.raises(ValueError, match="cannot be combined with 'episodes' or 'reset_mask'"):
            env.reset(seed=0, options={"group_size": 2, **options})
    with pytest.raises(ValueError, match=r"options\['episodes'\] needs 4 episodes, got 3"):
        env.reset(seed=0, options={"episodes": episodes[:3]})
    _, info = env.reset(seed=0, options={"group_size": 2})
    seeds = info["episode_seed"].tolist()
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3]
    mine = [
        FunctionTask(respond=_respond, prompts=[f"ask {c}"]).new_episode(np.random.default_rng(0))
        for c in "abcd"
    ]
    _, info = env.reset(seed=1, options={"episodes": mine})
    assert (
        info["prompt"].tolist() == ["ask a", "ask b", "ask c", "ask d"]
        and info["episode_seed"].tolist() == [None] * 4
    )
    _, info = env.reset(
        options={"episodes": mine[::-1], "reset_mask": np.array([False, True, False, True])}
    )
    assert info["prompt"].tolist() == [
        "ask a",
        "ask c",
        "ask c",
        "ask a",
    ]  # rows 1 and 3 take episodes 1 and 3


def test_stepping_a_finished_episode_fails_clearly_and_the_vector_info_names_end_reasons():
    single = MultiTurnTextEnv(task=_task(max_turns=1), model="tiny")
    _play(single, [EOS], seed=0)
    with pytest.raises(
        RuntimeError, match="step\\(\\) called after the episode ended; call reset\\(\\) first"
    ):
        single.step(A)
    env = MultiTurnTextVectorEnv(num_envs=2, task=_task(max_turns=1), model="tiny")
    env.reset(seed=0)
    _, _, ended, _, info = env.step(torch.tensor([EOS, A]))
    assert ended.tolist() == [True, False] and info["end_reason"].tolist() == ["turn_limit", None]
    assert not info["score"][0].isnan() and info["score"][1].isnan()  # NaN where no episode ended
    _, _, ended, _, info = env.step(torch.tensor([A, EOS]))
    assert ended.tolist() == [False, True] and info["end_reason"].tolist() == [None, "turn_limit"]
    with pytest.raises(
        RuntimeError, match="after every episode in the batch ended; call reset\\(\\) first"
    ):
        env.step(torch.tensor([A, A]))


def test_both_envs_set_torch_threads_and_never_trust_remote_code_by_default(monkeypatch):
    import textenv.multiturn as multiturn
    from tests.test_textenv import check_threads_and_trust

    check_threads_and_trust(
        monkeypatch,
        multiturn,
        (MultiTurnTextEnv, lambda **kw: MultiTurnTextVectorEnv(num_envs=2, **kw)),
        task=_task(),
    )


# -- the tasks: registry, budgets, questions, the adapters ----------------------------------------


@pytest.mark.parametrize(
    "name,defaults",
    [
        (
            "Calculator",
            dict(
                size=500,
                seed=0,
                stop=["</calc>"],
                max_prompt_tokens=160,
                max_context_tokens=64,
                max_turn_tokens=20,
                max_turns=3,
                kl_coef=0.02,
            ),
        ),
        (
            "TextArena",
            dict(
                game="GuessTheNumber-v0",
                num_players=None,  # the game's own count
                max_prompt_tokens=256,
                max_context_tokens=128,
                max_turn_tokens=16,
                max_turns=6,
                kl_coef=0.02,
            ),
        ),
        ("GuessTheNumber", dict(game="GuessTheNumber-v0", num_players=1, max_turns=6)),
        ("TicTacToe", dict(game="TicTacToe-v0", num_players=2, max_turns=5)),
        (
            "ToyTurns",
            dict(
                max_prompt_tokens=16,
                max_context_tokens=32,
                max_turn_tokens=6,
                max_turns=2,
                kl_coef=0.0,
                reply_format=" {reply} ",
            ),
        ),
    ],
)
def test_each_task_is_registered_under_its_name_with_its_documented_budgets(name, defaults):
    """A task's budgets are part of its definition: results are comparable only while they hold."""
    from textenv.tasks import make_task

    task = make_task(name)
    assert type(task).__name__ == name == task.name and task.has_held_out is True
    assert {k: getattr(task, k) for k in defaults} == defaults


def test_calculator_questions_are_fixed_for_a_seed_and_each_answer_is_right():
    import hashlib

    with pytest.raises(ValueError, match="^task Calculator: size must be >= 1, got 0$"):
        Calculator(size=0).questions()
    assert len(Calculator(size=1).questions()) == 1
    questions = Calculator().questions()  # the held-out results of every version are on these
    assert questions[:2] == [("What is 5159 + 2770 + 3147?", 11076), ("What is 52 * 19?", 988)]
    assert hashlib.sha256(repr(questions).encode()).hexdigest()[:16] == "fcbae43f5ae4e231"
    for question, answer in questions:
        assert safe_arithmetic(question.removeprefix("What is ").removesuffix("?")) == answer
        numbers = [int(x) for x in question[8:-1].replace("*", "+").split("+")]
        if "*" in question:
            assert 12 <= numbers[0] < 999 and 3 <= numbers[1] < 99
        else:
            assert len(numbers) == 3 and all(100 <= x < 9999 for x in numbers)
    assert sum("*" in q for q, _ in questions) == 238  # about half of each kind
    plain = Calculator(system_prompt=None).new_episode(np.random.default_rng(0))
    assert isinstance(plain.prompt, str) and plain.prompt.startswith("What is ")


def test_calculator_turns_the_first_of_a_call_and_an_answer_and_reports_bad_expressions():
    episode = Calculator(size=5).new_episode(np.random.default_rng(0))
    say = lambda text: episode.respond([{"role": "assistant", "content": text}])  # noqa: E731
    assert say("<calc>2 * 3</calc> <answer>7</answer>") == ("6", 0.0, False)
    assert say(f"<answer>{episode.answer}</answer> <calc>2 * 3</calc>") == (None, 1.0, True)
    assert say("<calc>2 ** 3</calc>") == (
        "error: the calculator takes integers with + - * and parentheses",
        0.0,
        False,
    )


def test_safe_arithmetic_limits_are_inclusive():
    assert safe_arithmetic("1000000 * 1000000 * 1000") == 10**15
    with pytest.raises(ValueError, match="number too large"):
        safe_arithmetic("1000000 * 1000000 * 1000 + 1")
    expr = " 1" + "+1" * 49  # 100 characters
    assert len(expr) == 100 and safe_arithmetic(expr) == 50
    with pytest.raises(ValueError, match="expression too long"):
        safe_arithmetic(expr + " ")


def test_toy_turns_pays_the_share_of_as_and_ends_after_the_second_turn():
    from textenv.tasks import ToyTurns

    episode = ToyTurns().new_episode(np.random.default_rng(0))
    first = [{"role": "user", "content": episode.prompt}]
    assert episode.respond(first + [{"role": "assistant", "content": "a"}]) == (
        "ok, more.",
        1.0,
        False,
    )
    system = [{"role": "system", "content": "be brief"}]  # only the agent's messages count as turns
    assert episode.respond(system + first + [{"role": "assistant", "content": "a"}]) == (
        "ok, more.",
        1.0,
        False,
    )
    assert episode.respond(first + [{"role": "assistant", "content": ""}]) == (
        "ok, more.",
        0.0,
        False,
    )
    second = first + [
        {"role": "assistant", "content": "ab"},
        {"role": "user", "content": "ok, more."},
    ]
    assert episode.respond(second + [{"role": "assistant", "content": "ab"}]) == (None, 0.5, True)


def test_the_random_opponent_plays_from_the_last_list_of_moves():
    from textenv.tasks import random_legal_move

    play = random_legal_move(np.random.default_rng(0))
    board = "Available Moves: '[0]'\nAvailable Moves: '[0]', '[1]'\nPlayer 0 moved\nAvailable Moves: '[5]'\nyour turn"
    assert {play(board) for _ in range(5)} == {"[5]"}
    with pytest.raises(
        ValueError, match="the opponent found no 'Available Moves' in its observation"
    ):
        play("a board without moves")


class _FinishedGame:
    """The textarena API surface the adapter uses, for a game that ends on the first move."""

    def __init__(self, rewards):
        self.rewards = rewards

    def step(self, action):
        return True, {}

    def close(self):
        return self.rewards, {}


def test_the_arena_adapter_pays_player_zeros_reward_and_zero_when_the_game_gives_none():
    from textenv.tasks.games import _ArenaEpisode

    move = [{"role": "assistant", "content": "[1]"}]
    for rewards, expected in (({0: -1.0, 1: 1.0}, -1.0), ({1: 1.0}, 0.0), (None, 0.0)):
        assert _ArenaEpisode(_FinishedGame(rewards), "p", None, 0, 0).respond(move) == (
            None,
            expected,
            True,
        )


def test_arena_episodes_are_fixed_for_a_seed_with_a_seeded_opponent(monkeypatch):
    pytest.importorskip("textarena")
    import sys

    from textenv.tasks import TextArena, TicTacToe

    assert TextArena().new_episode(np.random.default_rng(0)).seed == 1826701614
    assert (
        TextArena(split="test").new_episode(np.random.default_rng(0)).seed == 1826701614
    )  # already 4 mod 5
    assert TextArena(split="train").new_episode(np.random.default_rng(0)).seed == 1826701612
    episode = TicTacToe().new_episode(np.random.default_rng(0))
    history = [{"role": "user", "content": episode.prompt}]
    replies = []
    for move in ("[4]", "[0]"):
        history.append({"role": "assistant", "content": move})
        reply, reward, done = episode.respond(history)
        assert (reward, done) == (0.0, False)
        history.append({"role": "user", "content": reply})
        replies.append(reply)
    assert "Player 1 placed their symbol (X) in cell 2" in replies[0]
    assert (
        "Player 1 placed their symbol (X) in cell 5" in replies[1]
    )  # the opponent's seed is the game's + 1
    monkeypatch.setitem(sys.modules, "textarena", None)
    with pytest.raises(
        ImportError, match="^task TextArena needs textarena: pip install textarena$"
    ):
        TextArena().new_episode(np.random.default_rng(0))


def _long_and_short_replies(history):
    """Prompt 'hi' gets 4-token replies and fills its context first; 'yo' gets one more token each turn."""
    turns = sum(m["role"] == "assistant" for m in history)
    return Turn("k" * (4 if history[0]["content"] == "hi" else turns), 0.0, False)


def test_a_row_that_filled_its_context_while_another_talks_on_is_read_inside_the_context():
    """Rows end at different steps, one at the full context budget while the other still gets
    replies: the chunk read for the ended row stays inside the context, every action sits at its
    position in the final observation, and the rollout keeps exactly the columns up to the longest
    conversation."""
    policy, rollout, lengths = _two_row_rollout(context=14, seed=1)
    assert (
        rollout.prompts == ["hi", "yo"]
        and lengths[0] == 14
        and rollout.mask[0].sum() < rollout.mask[1].sum()
    )
    _check_conversations(policy, rollout, lengths)


def test_the_rollout_keeps_every_column_up_to_the_longest_conversation_and_no_more():
    policy, rollout, lengths = _two_row_rollout(context=12, seed=1)
    assert lengths.min() < lengths.max()
    _check_conversations(policy, rollout, lengths)


def _two_row_rollout(context: int, seed: int):
    policy, _ = _policy()
    task = FunctionTask(
        respond=_long_and_short_replies,
        prompts=["hi", "yo"],
        max_context_tokens=context,
        max_turns=50,
        max_turn_tokens=2,
        reply_format="{reply}",
    )
    vec = MultiTurnTextVectorEnv(num_envs=2, task=task, model="tiny")
    rollout = collect_rollout(policy, vec, seed=seed, generator=torch.Generator().manual_seed(seed))
    return policy, rollout, vec.conversation_lengths


def _check_conversations(policy, rollout, lengths) -> None:
    assert rollout.input_ids.shape[1] == rollout.prompt_len + lengths.max()
    m = rollout.mask.bool()
    inside = rollout.positions.clamp_max(
        rollout.input_ids.shape[1] - 1
    )  # past a row's end: masked anyway
    assert (rollout.input_ids.gather(1, inside)[m] == rollout.actions[m]).all()
    # Each row's conversation is whole: as many real columns after the prompt as its length.
    assert rollout.attention_mask[:, rollout.prompt_len :].sum(1).tolist() == lengths.tolist()
    with torch.no_grad():
        logprob, _, _ = policy.evaluate_responses(
            rollout.input_ids,
            rollout.attention_mask,
            rollout.actions,
            rollout.prompt_len,
            positions=rollout.positions,
        )
    torch.testing.assert_close(logprob[m], rollout.logprobs[m], atol=1e-4, rtol=0)


def test_a_single_turn_rollout_has_no_positions_and_ends_at_its_last_action():
    from textenv import TextGenerationVectorEnv

    policy, _ = _policy()
    envs = TextGenerationVectorEnv(num_envs=3, task="Toy", model="tiny", max_new_tokens=4)
    rollout = collect_rollout(policy, envs, seed=0, generator=torch.Generator().manual_seed(0))
    assert rollout.positions is None and rollout.step_scores is None
    assert rollout.input_ids.shape[1] == rollout.prompt_len + rollout.actions.shape[1]


def test_task_options_are_a_json_object_of_the_tasks_fields():
    from textenv.agents.text import task_options

    assert task_options(TextTrainConfig(task="Toy")) == {}
    assert task_options(TextTrainConfig(task="ToyTurns", task_options='{"max_turns": 3}')) == {
        "max_turns": 3
    }
    with pytest.raises(
        ValueError,
        match=r"^--task-options is not JSON: Expecting property name enclosed in double quotes \(got '\{x'\)$",
    ):
        task_options(TextTrainConfig(task="Toy", task_options="{x"))
    with pytest.raises(
        ValueError, match=r"^--task-options must be a JSON object of task fields, got '\[1\]'$"
    ):
        task_options(TextTrainConfig(task="Toy", task_options="[1]"))
    for task in ("Toy", "ToyTurns"):
        with pytest.raises(
            ValueError,
            match=rf"^--task-options: task {task} has no field 'bogus' \(its fields: .*\)$",
        ):
            task_options(TextTrainConfig(task=task, task_options='{"bogus": 1, "zz": 2}'))


def test_one_eval_sample_is_enough_to_evaluate_on_held_out_episodes():
    from textenv.agents.text import task_settings

    assert task_settings(TextTrainConfig(task="Calculator", eval_samples=1))[1] is True
    assert task_settings(TextTrainConfig(task="Calculator", eval_samples=0))[1] is False
