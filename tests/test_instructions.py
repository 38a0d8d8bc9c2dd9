"""Instruction following with verifiable constraints: each checker on hand-written responses,
the prompts that state their constraints, partial credit, the held-out split, the env."""

import itertools

import gymnasium as gym
import pytest

import textenv
from textenv import constraints as C
from textenv.rewards import ConstraintReward
from textenv.tasks import TASKS, Instructions, make_task
from textenv.tasks.instructions import (
    CONFLICTS,
    DEFAULT_KINDS,
    HELD_OUT_PAIRS,
    PAIRS,
    PARAMETERS,
    combinable,
    held_out_pairs,
)


def _verdicts(constraint, responses):
    return [constraint(r) for r in responses]


def test_case_constraints_need_a_letter_and_no_letter_of_the_other_case():
    low = C.lowercase()
    assert _verdicts(low, ["all lower, 2 words.", "  ünïcode é  ", "ok!\n"]) == [True] * 3
    assert _verdicts(low, ["one Capital", "almost all loweR", "É", "", "123 ..."]) == [False] * 5
    up = C.uppercase()
    assert _verdicts(up, ["ALL CAPS, 2 WORDS!", "É"]) == [True, True]
    assert _verdicts(up, ["ALL CAPS bUT ONE", "", "42"]) == [False, False, False]


def test_keywords_match_whole_words_ignoring_case():
    sea = C.include_keyword("sea")
    assert _verdicts(sea, ["The sea.", "SEA!", "by the sea", "sea-green", '"sea"']) == [True] * 5
    assert _verdicts(sea, ["seas", "overseas", "the s ea", ""]) == [False] * 4
    no_the = C.no_word("the")
    assert _verdicts(no_the, ["There they go.", "a cat", "other"]) == [True] * 3
    assert _verdicts(no_the, ["The cat.", "in THE end", "the", ""]) == [False] * 4  # "" fails


def test_start_with_is_the_first_word_after_leading_whitespace_ignoring_case():
    yes = C.start_with("Yes")
    assert _verdicts(yes, ["Yes, I can.", "  yes", "\nYES!", "Yes"]) == [True] * 4
    assert _verdicts(yes, ["Yesterday", '"Yes," he said', "Oh yes", "", "* Yes"]) == [False] * 5


def test_end_with_ignores_trailing_whitespace_and_case_but_not_punctuation():
    end = C.end_with("That is all.")
    assert _verdicts(end, ["Done. That is all.", "that is all.  \n", "THAT IS ALL."]) == [True] * 3
    assert _verdicts(end, ["That is all", "That is all!", "That is all. Bye.", ""]) == [False] * 4
    assert _verdicts(end, ['"That is all."']) == [False]  # a closing quote is after the phrase


def test_no_commas_refuses_any_comma_even_quoted_and_an_empty_response():
    none = C.no_commas()
    assert _verdicts(none, ["No commas here.", "a; b: c"]) == [True, True]
    assert _verdicts(none, ['He said "a, b".', "a，b", "1,000", "", "  "]) == [False] * 5


def test_word_limits_count_whitespace_separated_words():
    at_most, at_least = C.max_words(3), C.min_words(3)
    assert _verdicts(at_most, ["one", "one two three", " one\ttwo\nthree "]) == [True] * 3
    assert _verdicts(at_most, ["one two three four", "", "   "]) == [False] * 3  # empty fails
    assert _verdicts(at_least, ["one two three", "a b c d e"]) == [True, True]
    assert _verdicts(at_least, ["one two", "one-two-three", ""]) == [False] * 3


def test_bullet_points_counts_star_or_dash_lines_exactly():
    two = C.bullet_points(2)
    passing = [
        "* first\n* second",
        "Here you go:\n- first\n- second\nThat is it.",
        "  * indented\n\t- tab indented",
        "* a\n- b",
    ]
    failing = [
        "* one",
        "* a\n* b\n* c",
        "**bold** line\n* only one",  # **bold** is emphasis, not a bullet
        "-5 degrees\n* one",  # a dash needs a space after it
        "*\n* one",  # a bullet needs text
        "1. first\n2. second",  # numbered lists are not bullets
        "* a * b",  # one line
    ]
    assert _verdicts(two, passing) == [True] * len(passing)
    assert _verdicts(two, failing) == [False] * len(failing)


def test_wrapped_in_quotes_needs_a_matching_pair_around_the_whole_response():
    quoted = C.wrapped_in_quotes()
    assert _verdicts(quoted, ['"Hello."', '  "Hello."\n', "“Hello.”", '""']) == [True] * 4
    assert _verdicts(quoted, ['"Hello.', 'Hello."', '"', "'Hello.'", '"Hi." Bye.']) == [False] * 5


def test_title_and_postscript():
    title = C.title()
    assert _verdicts(title, ["<<Sea Song>>\nText", "text <<a>> text"]) == [True, True]
    assert _verdicts(title, ["<<>>", "<< >>", "<Sea>", "<<two\nlines>>", "Sea"]) == [False] * 5
    ps = C.postscript()
    assert (
        _verdicts(ps, ["Hi.\nP.S. See you.", "Hi.\n  p.s. bye", "Hi.\nP. S. later"]) == [True] * 3
    )
    assert _verdicts(ps, ["Hi. P.S. inline", "Hi.\nPS bye", "Hi.\nP.S.", "P.S"]) == [False] * 4


def test_every_kind_has_a_factory_and_its_parameters_build_distinct_sentences():
    assert list(C.CONSTRAINT_KINDS) == [
        "lowercase",
        "uppercase",
        "include_keyword",
        "no_word",
        "start_with",
        "end_with",
        "no_commas",
        "max_words",
        "min_words",
        "bullet_points",
        "wrapped_in_quotes",
        "title",
        "postscript",
    ]
    built = [C.CONSTRAINT_KINDS[k](p) for k, values in PARAMETERS.items() for p in values] + [
        C.CONSTRAINT_KINDS[k]() for k in C.CONSTRAINT_KINDS if k not in PARAMETERS
    ]
    assert all(c.kind in C.CONSTRAINT_KINDS for c in built)
    assert len({c.text for c in built}) == len(built)  # a sentence names one constraint
    assert C.max_words(5) == C.max_words(5) != C.max_words(6)
    # No parameter of one kind makes another kind impossible: keywords differ from banned words.
    assert not set(PARAMETERS["include_keyword"]) & set(PARAMETERS["no_word"])
    assert not {w.lower() for w in PARAMETERS["start_with"]} & set(PARAMETERS["no_word"])


def test_each_prompt_states_exactly_the_constraints_it_is_scored_on():
    task = Instructions(num_prompts=60, num_constraints=3)
    assert len(task.prompts) == 60
    sentences = {
        c.text for cs in task.constraints.values() for c in cs
    }  # every sentence used anywhere
    for prompt in task.prompts:
        text = prompt[0]["content"]
        assert prompt == [{"role": "user", "content": text}]
        constraints = task.constraints[text]
        assert 1 <= len(constraints) <= 3 and len({c.kind for c in constraints}) == len(constraints)
        instruction = text[: text.index(constraints[0].text)].strip()
        assert instruction in task.instructions
        assert text == " ".join([instruction, *(c.text for c in constraints)])
        assert [s for s in sentences if s in text] == [
            s for s in sentences if s in {c.text for c in constraints}
        ]


def test_the_reward_is_the_fraction_of_constraints_satisfied_or_all_or_nothing():
    prompt = "Describe the sea. Answer in at most 5 words. Do not use any commas."
    table = {
        prompt: [C.max_words(5), C.no_commas()],
        'Say hi. Include the word "hi".': [C.include_keyword("hi")],
    }
    reward = ConstraintReward(table)
    responses = [
        "Calm blue water.",
        "Calm, blue water.",
        "Calm blue water that goes on forever.",
        "Calm, blue water that goes on forever.",
    ]
    assert reward([prompt] * 4, responses) == [1.0, 0.5, 0.5, 0.0]
    strict = ConstraintReward(table, all_or_nothing=True)
    assert strict([prompt] * 4, responses) == [1.0, 0.0, 0.0, 0.0]
    # The env hands over the rendered prompt: a chat template around the text.
    rendered = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert reward([rendered, 'Say hi. Include the word "hi".\n'], ["a, b", "Hi!"]) == [0.5, 1.0]
    assert reward.checks(rendered, "a, b") == [True, False]
    with pytest.raises(KeyError, match="no known constraints for prompt"):
        reward(["Describe the sea."], ["x"])
    with pytest.raises(ValueError, match="at least one constraint"):
        ConstraintReward({"p": []})


def test_the_task_reward_scores_its_own_prompts_with_partial_credit():
    task = Instructions(num_prompts=40, num_constraints=2, seed=3)
    reward, strict = (
        task.build_reward(),
        Instructions(num_prompts=40, num_constraints=2, seed=3, all_or_nothing=True).build_reward(),
    )
    text = next(t for t, cs in task.constraints.items() if len(cs) == 2)
    for response in ["", "yes", "YES, THAT IS ALL.", "* a\n* b\n<<t>>\nP.S. x"]:
        passed = [c(response) for c in task.constraints[text]]
        assert reward([text], [response]) == [sum(passed) / 2]
        assert strict([text], [response]) == [float(all(passed))]


def test_the_held_out_split_has_new_instructions_and_new_pairs_of_kinds():
    train = Instructions(split="train")
    test = Instructions(split="test")
    assert (len(train.prompts), len(test.prompts)) == (400, 100)
    assert Instructions(split="all").prompts == Instructions().prompts

    def parts(task):
        for prompt in task.prompts:
            text = prompt[0]["content"]
            constraints = task.constraints[text]
            yield text[: text.index(constraints[0].text)].strip(), {c.kind for c in constraints}

    train_parts, test_parts = list(parts(train)), list(parts(test))
    train_instructions = {i for i, _ in train_parts}
    test_instructions = {i for i, _ in test_parts}
    assert test_instructions == set(train.instructions[4::5])  # every 5th, all of them used
    assert not train_instructions & test_instructions
    train_pairs = {
        frozenset(p) for _, kinds in train_parts for p in itertools.combinations(kinds, 2)
    }
    assert not train_pairs & HELD_OUT_PAIRS and not train_pairs & CONFLICTS
    for _, kinds in test_parts:  # one constraint, or a combination training never saw
        pairs = {frozenset(p) for p in itertools.combinations(kinds, 2)}
        assert len(kinds) == 1 or pairs & HELD_OUT_PAIRS
        assert not pairs & CONFLICTS
    assert sum(len(k) == 2 for _, k in test_parts) > 25  # combinations are a good part of the test
    assert set(PAIRS[4::5]) == HELD_OUT_PAIRS and len(held_out_pairs()) == len(HELD_OUT_PAIRS) == 14
    assert ("lowercase", "no_commas") in held_out_pairs()
    # The held-out parts are fixed: another seed draws other prompts from the same parts.
    other = Instructions(split="test", seed=1)
    assert other.prompts != test.prompts
    assert {i for i, _ in parts(other)} <= set(train.instructions[4::5])


def test_combinable_refuses_conflicts_and_keeps_pairs_on_their_side():
    assert combinable(["lowercase"], held_out=True) and combinable(["lowercase"], held_out=False)
    assert not combinable(["lowercase", "uppercase"], held_out=False)
    assert not combinable(["lowercase", "uppercase"], held_out=True)
    assert combinable(["lowercase", "no_commas"], held_out=True)
    assert not combinable(["lowercase", "no_commas"], held_out=False)
    assert not combinable(["lowercase", "include_keyword"], held_out=True)
    assert combinable(["lowercase", "include_keyword"], held_out=False)


def test_the_prompts_are_determined_by_the_seed():
    assert Instructions(seed=7).prompts == Instructions(seed=7).prompts
    assert Instructions(seed=7).prompts != Instructions(seed=8).prompts
    assert len(set(map(str, Instructions().prompts))) == 500  # no prompt twice
    plain = Instructions(chat=False, num_prompts=10)
    assert plain.prompts == [p[0]["content"] for p in Instructions(num_prompts=10).prompts]


def test_defaults_registry_and_bad_settings():
    task = make_task("Instructions")
    assert TASKS["Instructions"] is Instructions and "Instructions" in textenv.TASK_NAMES
    assert {
        k: getattr(task, k)
        for k in (
            "num_constraints",
            "num_prompts",
            "seed",
            "all_or_nothing",
            "chat",
            "max_new_tokens",
            "max_prompt_tokens",
            "kl_coef",
            "split",
        )
    } == dict(
        num_constraints=2,
        num_prompts=500,
        seed=0,
        all_or_nothing=False,
        chat=True,
        max_new_tokens=48,
        max_prompt_tokens=96,
        kl_coef=0.05,
        split="all",
    )
    assert Instructions.chat_fallback is True and len(task.instructions) == 40
    assert task.kinds == DEFAULT_KINDS and set(DEFAULT_KINDS) < set(C.CONSTRAINT_KINDS)
    drawn = {c.kind for cs in task.constraints.values() for c in cs}
    assert drawn == set(DEFAULT_KINDS)
    for section in ("## Description", "## Rewards", "## Arguments", "## Version History"):
        assert section in Instructions.__doc__
    assert "partial credit" in Instructions.__doc__
    three = ["no_commas", "lowercase", "include_keyword"]  # lowercase + no_commas is held out
    only = Instructions(kinds=three, num_prompts=20)
    assert {c.kind for cs in only.constraints.values() for c in cs} == set(three)
    with pytest.raises(ValueError, match=r"unknown constraint kinds \['shout'\]"):
        Instructions(kinds=["shout"])
    with pytest.raises(ValueError, match=r"num_constraints must be in 1\.\.8"):
        Instructions(num_constraints=0)
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        Instructions(num_prompts=0)
    with pytest.raises(ValueError, match="needs at least 5 instructions"):
        Instructions(instructions=["a", "b"])
    with pytest.raises(ValueError, match="could not draw prompt"):
        Instructions(
            kinds=["lowercase"], num_constraints=1, instructions=list("abcde"), num_prompts=9
        )


def test_the_env_runs_to_the_end_and_pays_the_task_score():
    env = gym.make("textenv/Instructions-v0", model="tiny", max_prompt_tokens=240, max_new_tokens=6)
    _, info = env.reset(seed=0)
    task = env.unwrapped.task
    text = info["prompt"].rstrip("\n")  # a tokenizer without a chat template: plain text
    assert text in task.constraints
    reward_fn = task.build_reward()
    for _ in range(6):
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        if terminated:
            break
    assert terminated and not truncated
    assert info["score"] == reward_fn([text], [info["response_text"]])[0]
    assert info["score"] in {0.0, 0.5, 1.0}


def test_every_kind_can_be_drawn_and_conflicting_kinds_never_meet():
    task = Instructions(kinds=list(C.CONSTRAINT_KINDS), num_constraints=4, num_prompts=300)
    drawn = [{c.kind for c in cs} for cs in task.constraints.values()]
    assert set().union(*drawn) == set(C.CONSTRAINT_KINDS)
    for kinds in drawn:
        assert not {frozenset(p) for p in itertools.combinations(kinds, 2)} & CONFLICTS
