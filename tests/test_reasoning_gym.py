"""reasoning-gym generators as text tasks: the generator's own checker is the reward, the
reference answer scores 1, prompts are deterministic for a seed, chat templates are used."""

import re
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenv
from textenv import TextGenerationVectorEnv
from textenv.models import char_tokenizer, tiny_causal_lm
from textenv.tasks import CURATED_REASONING_GYM, make_task

pytest.importorskip(
    "reasoning_gym"
)  # a dev dependency: installed wherever the suite runs (make test)


def _rendered_prompts(task_name, n=6, **kw):
    envs = TextGenerationVectorEnv(num_envs=n, task=task_name, model="tiny", size=n, **kw)
    _, info = envs.reset(seed=0)
    return envs, list(info["prompt"])


@pytest.mark.parametrize("task_name", ["ReasoningGym", *CURATED_REASONING_GYM])
def test_the_generators_reference_answer_scores_one_through_the_env(task_name):
    envs, prompts = _rendered_prompts(task_name)
    reward = envs.reward_fn
    data = envs.task.generated()
    for prompt in prompts:
        entry = next(e for e in data if e["question"] in prompt)
        assert reward([prompt], [f"<answer>{entry['answer']}</answer>"]) == [1.0]
        assert reward([prompt], [entry["answer"]]) == [0.0]  # the prompts ask for answer tags
        assert (
            reward([prompt], ["<answer>certainly not the answer</answer>"])[0] < 1.0
        )  # some checkers give partial credit


def test_raw_answer_format_scores_the_whole_response():
    envs, prompts = _rendered_prompts("RG-ChainSum", answer_format="raw")
    entry = next(e for e in envs.task.generated() if e["question"] in prompts[0])
    assert envs.reward_fn([prompts[0]], [f"  {entry['answer']}\n"]) == [1.0]


def test_number_answer_format_scores_the_first_number_and_a_custom_system_prompt_is_used():
    envs, prompts = _rendered_prompts(
        "RG-ChainSum", answer_format="number", system_prompt="Answer with a number."
    )
    assert envs.task.prompts[0][0] == {"role": "system", "content": "Answer with a number."}
    entry = next(e for e in envs.task.generated() if e["question"] in prompts[0])
    answer = int(entry["answer"])
    assert envs.reward_fn(
        [prompts[0]] * 4,
        [f"It is {answer}, 7.", f"{answer + 1} or {answer}", "none", f"{answer:,}"],
    ) == [1.0, 0.0, 0.0, 1.0]
    last = _rendered_prompts("RG-ChainSum", answer_format="last_number")[0].reward_fn
    assert last([prompts[0]] * 3, [f"{answer + 1} or {answer}", f"It is {answer}, 7.", "none"]) == [
        1.0,
        0.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="system_prompt must be one of"):
        make_task("RG-ChainSum", system_prompt="dirct").system_text()


def test_prompts_are_deterministic_for_a_seed_and_config_reaches_the_generator():
    a = make_task("RG-ChainSum", size=20, seed=4, config={"min_terms": 2, "max_terms": 2})
    b = make_task("RG-ChainSum", size=20, seed=4, config={"min_terms": 2, "max_terms": 2})
    c = make_task("RG-ChainSum", size=20, seed=5, config={"min_terms": 2, "max_terms": 2})
    assert a.prompts == b.prompts != c.prompts
    for prompt in a.prompts:
        question = prompt[-1]["content"]
        assert len(re.findall(r"\d+", question.split(":")[-1])) == 2  # two terms, as configured
        assert prompt[0]["role"] == "system" and "<answer>" in prompt[0]["content"]
    env = gym.make("textenv/ReasoningGym-v0", model="tiny", dataset="leg_counting", size=8, seed=1)
    assert env.unwrapped.task.dataset == "leg_counting" and len(env.unwrapped.task.prompts) == 8


def test_a_chat_template_renders_the_prompt_and_the_checker_still_finds_its_question():
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    model = tiny_causal_lm(tok, seed=0)
    envs = TextGenerationVectorEnv(
        num_envs=4,
        task="RG-SpellBackward",
        model=model,
        tokenizer=tok,
        size=4,
        max_prompt_tokens=200,
    )
    _, info = envs.reset(seed=0)
    for prompt in info["prompt"]:
        assert prompt.startswith("<system>") and prompt.endswith("<assistant>")
        entry = next(e for e in envs.task.generated() if e["question"] in prompt)
        assert envs.reward_fn([prompt], [f"<answer>{entry['answer']}</answer>"]) == [1.0]


def test_an_episode_on_a_tiny_model_scores_in_zero_one():
    envs = TextGenerationVectorEnv(
        num_envs=4, task="RG-BasicArithmetic", model="tiny", size=10, max_new_tokens=6
    )
    envs.reset(seed=0)
    scores = torch.full((4,), float("nan"))
    while not envs.all_done:
        _, _, _, _, info = envs.step(
            torch.randint(
                0, envs.single_action_space.n, (4,), generator=torch.Generator().manual_seed(0)
            )
        )
        if "_score" in info:
            scores = torch.where(info["_score"], info["score"], scores)
    assert torch.all((scores >= 0) & (scores <= 1))


def test_a_missing_reasoning_gym_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(ImportError, match="pip install reasoning-gym"):
        make_task("ReasoningGym", size=3)


def test_the_ids_are_registered():
    for name in ("ReasoningGym", *CURATED_REASONING_GYM):
        assert f"textenv/{name}-v0" in gym.registry
    assert set(CURATED_REASONING_GYM) <= set(textenv.TASK_NAMES)
    assert np.all([name in make_task.__globals__["TASKS"] for name in CURATED_REASONING_GYM])
