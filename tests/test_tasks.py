"""Tasks: their registry, documented defaults, validation, rewards and prompt files."""

import json

import pytest

import textenv.tasks as tasks
from textenv.rewards import AnswerRegex, KeywordReward, get_reward
from textenv.tasks import (
    CURATED_REASONING_GYM,
    TASKS,
    Arithmetic,
    ReasoningGym,
    Task,
    make_task,
    read_prompts,
    split_prompts,
)


@pytest.mark.parametrize(
    "name,defaults",
    [
        (
            "Sentiment",
            dict(
                max_new_tokens=24,
                max_prompt_tokens=32,
                kl_coef=0.05,
                classifier=None,
                classifier_label="POSITIVE",
                reward=None,
                split="all",
            ),
        ),
        (
            "RewardModel",
            dict(max_new_tokens=48, max_prompt_tokens=48, kl_coef=0.05, reward_model=None, label=0),
        ),
        ("Arithmetic", dict(max_new_tokens=8, max_prompt_tokens=48, kl_coef=0.02)),
        ("Toy", dict(max_new_tokens=8, max_prompt_tokens=16, kl_coef=0.0)),
    ],
)
def test_each_task_is_registered_under_its_name_with_its_documented_budgets(name, defaults):
    """A task's budgets are part of its definition: results are comparable only while they hold."""
    task = make_task(name)
    assert type(task).__name__ == name == task.name and TASKS[name] is type(task)
    assert {k: getattr(task, k) for k in defaults} == defaults
    assert type(task).chat_fallback is False
    assert "## Arguments" in type(task).__doc__ and "## Episode End" in type(task).__doc__


def test_the_base_task_defaults_a_custom_task_inherits():
    task = Task(prompts=["hello"], reward="vader")
    assert (task.name, task.max_new_tokens, task.max_prompt_tokens, task.kl_coef, task.split) == (
        "Task",
        24,
        64,
        0.05,
        "all",
    )
    assert Task.chat_fallback is False and Task().prompts == []
    task.validate()
    with pytest.raises(ValueError, match="task Task needs a reward"):
        Task(prompts=["hello"]).build_reward()
    assert callable(task.build_reward())


def test_reasoning_gym_tasks_default_to_its_direct_prompt_and_render_chats_as_text_without_a_template():
    pytest.importorskip("reasoning_gym")
    defaults = dict(
        dataset="basic_arithmetic",
        size=500,
        seed=0,
        config={},
        system_prompt="direct",
        answer_format="tag",
        max_new_tokens=16,
        max_prompt_tokens=160,
        kl_coef=0.02,
    )
    task = ReasoningGym(size=3)
    assert {k: getattr(task, k) for k in defaults} == defaults | {"size": 3}
    assert ReasoningGym.chat_fallback is True and ReasoningGym().size == 500
    assert [m["role"] for m in task.prompts[0]] == ["system", "user"] and len(task.prompts) == 3
    for name, dataset in CURATED_REASONING_GYM.items():
        cls = TASKS[name]
        assert issubclass(cls, ReasoningGym) and cls.name == name and cls.chat_fallback is True
        assert cls(size=1).dataset == dataset and f"dataset ``{dataset}``" in cls.__doc__


def test_a_system_prompt_is_a_known_name_or_a_sentence():
    pytest.importorskip("reasoning_gym")
    from reasoning_gym.utils import SYSTEM_PROMPTS

    assert make_task("RG-ChainSum", size=1).system_text() == SYSTEM_PROMPTS["direct"]
    for own in ("Answer briefly.", "x" * 20):
        assert make_task("RG-ChainSum", size=1, system_prompt=own).system_text() == own
    for bad in ("   ", "x" * 19, "shortword"):
        with pytest.raises(ValueError, match="system_prompt must be one of"):
            make_task("RG-ChainSum", size=1, system_prompt=bad)
    with pytest.raises(ValueError, match="task ReasoningGym: size must be >= 1, got 0"):
        make_task("RG-ChainSum", size=0)


def test_make_task_takes_a_name_or_an_instance_and_ignores_unset_overrides():
    toy = make_task("Toy", max_new_tokens=None, kl_coef=0.3)
    assert (toy.max_new_tokens, toy.kl_coef) == (8, 0.3)
    assert make_task(toy) is toy
    with pytest.raises(ValueError, match="pass overrides to the Task you construct, not beside it"):
        make_task(toy, kl_coef=0.1)
    with pytest.raises(
        ValueError,
        match=r"unknown task 'Nope'; known tasks: Sentiment, RewardModel, Arithmetic, Toy, ",
    ):
        make_task("Nope")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("prompts", [], "task Toy: the prompt set is empty$"),
        ("prompts", ["ok", " "], "task Toy: prompt 1 is empty"),
        ("prompts", ["ok", 3], "task Toy: prompt 1 is empty"),
        ("prompts", [[]], r"task Toy: prompt 0 is not a list of \{'role', 'content'\} messages"),
        ("prompts", [[{"role": "user"}]], "prompt 0 is not a list of"),
        ("prompts", [["user: hi"]], "prompt 0 is not a list of"),
        ("max_new_tokens", 0, "task Toy: max_new_tokens must be >= 1, got 0"),
        ("max_prompt_tokens", 0, "task Toy: max_prompt_tokens must be >= 1, got 0"),
        ("kl_coef", -0.1, "task Toy: kl_coef must be >= 0, got -0.1"),
    ],
)
def test_validate_names_what_is_wrong(field, value, message):
    task = make_task("Toy")
    setattr(task, field, value)
    with pytest.raises(ValueError, match=message):
        task.validate()


def test_validate_accepts_the_smallest_settings_and_chat_prompts():
    task = make_task(
        "Toy",
        max_new_tokens=1,
        max_prompt_tokens=1,
        kl_coef=0.0,
        prompts=["a", [{"role": "user", "content": "hi"}]],
    )
    task.validate()


def test_arithmetic_asks_every_question_it_has_an_answer_for_and_checks_the_first_number():
    task = Arithmetic()
    assert (
        task.prompts == list(task.answers) and len(task.prompts) == 176
    )  # 160 generated + 16 word problems
    reward = task.build_reward()
    assert isinstance(reward, AnswerRegex)
    q = task.prompts[0]
    assert reward([q, q], [f"{task.answers[q]} is it", "no idea"]) == [1.0, 0.0]
    assert Arithmetic(prompts=["1 + 1 ="]).prompts == ["1 + 1 ="]


def test_the_toy_reward_is_the_share_of_as_and_a_given_reward_wins():
    assert isinstance(make_task("Toy").build_reward(), KeywordReward)
    assert make_task("Toy").build_reward()(["p"], ["aab"]) == pytest.approx([2 / 3])
    length = get_reward("length")(["p"], ["abcd"])
    assert length != make_task("Sentiment").build_reward()(["p"], ["abcd"])
    for name in ("Toy", "Sentiment", "RewardModel", "Arithmetic"):
        assert make_task(name, reward="length").build_reward()(["p"], ["abcd"]) == length


def test_classifier_tasks_build_their_classifier_as_documented(monkeypatch):
    made = []
    monkeypatch.setattr(
        tasks.text, "ClassifierReward", lambda *a, **kw: made.append((a, kw)) or "clf"
    )
    assert make_task("Sentiment", classifier="some/model").build_reward() == "clf"
    assert make_task("Sentiment", classifier="m", classifier_label=1).build_reward() == "clf"
    assert make_task("RewardModel", reward_model="rm").build_reward() == "clf"
    assert make_task("RewardModel", reward_model="rm", label="good").build_reward() == "clf"
    assert made == [
        (("some/model", "POSITIVE"), dict(probability=True, with_prompt=False)),
        (("m", 1), dict(probability=True, with_prompt=False)),
        (("rm", 0), {}),
        (("rm", "good"), {}),
    ]


def test_prompt_file_errors_name_the_files_own_line_numbers(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n" + json.dumps({"prompt": "ok"}) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:4: not JSON"):
        read_prompts(jsonl)
    jsonl.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(["a list"]) + "\n")
    with pytest.raises(
        ValueError, match=r"p\.jsonl:2: each line needs a \"prompt\" string or a \"messages\" list"
    ):
        read_prompts(jsonl)
    jsonl.write_text(json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:1: each line needs"):
        read_prompts(jsonl)
    home = tmp_path / "home"
    home.mkdir()
    (home / "mine.txt").write_text("x\n")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("HOME", str(home))
    try:
        assert read_prompts("~/mine.txt") == ["x"]
    finally:
        monkeypatch.undo()


def test_the_split_is_by_position_every_fifth_held_out():
    prompts = [f"p{i}" for i in range(11)]
    assert split_prompts(prompts, "test") == ["p4", "p9"]
    assert make_task("Toy", prompts=prompts, split="train").prompts == [
        p for p in prompts if p not in ("p4", "p9")
    ]
    with pytest.raises(
        ValueError, match=r"task Toy: the prompt set is empty \(split 'test': every 5th prompt"
    ):
        make_task("Toy", prompts=prompts[:4], split="test").validate()


def test_tasks_that_build_their_own_prompts_still_split_them_and_take_a_given_reward():
    arithmetic = Arithmetic(split="test")
    assert (
        arithmetic.prompts == split_prompts(list(arithmetic.answers), "test")
        and len(arithmetic.prompts) == 35
    )
    pytest.importorskip("reasoning_gym")
    rg = make_task("RG-ChainSum", size=10, split="test")
    assert rg.prompts == [make_task("RG-ChainSum", size=10).prompts[i] for i in (4, 9)]
    assert make_task("RG-ChainSum", size=2, reward="length").build_reward()(
        ["p"], ["abcd"]
    ) == get_reward("length")(["p"], ["abcd"])


def test_one_registry_holds_every_task_and_each_has_its_gym_id_and_env():
    import gymnasium as gym

    import textenv
    from textenv.tasks import MultiTurnTask

    ids = {"FunctionTask" if n == "MultiTurn" else n for n in textenv.MULTITURN_TASK_NAMES}
    assert set(TASKS) == set(textenv.TASK_NAMES) | ids
    for name, cls in TASKS.items():
        spec = gym.spec(f"textenv/{'MultiTurn' if name == 'FunctionTask' else name}-v0")
        multi = issubclass(cls, MultiTurnTask)
        assert spec.entry_point == (
            "textenv.multiturn:MultiTurnTextEnv" if multi else "textenv.env:TextGenerationEnv"
        )
        assert isinstance(make_task(name) if name != "FunctionTask" else cls(), cls)
