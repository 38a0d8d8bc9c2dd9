"""The built-in reward functions and the reward registry: exact scores on hand-checkable inputs."""

import pytest

from textenv.rewards import (
    AnswerRegex,
    ExactMatch,
    KeywordReward,
    LengthReward,
    ReasoningGymReward,
    RegexMatch,
    get_reward,
    register,
    reward_name,
)


def test_length_reward_is_words_over_target_capped_at_one():
    reward = LengthReward(target=4)
    assert reward(["p"] * 4, ["", "one two", "a b c d", "a b c d e f g h"]) == [0.0, 0.5, 1.0, 1.0]
    assert LengthReward()(["p"], ["w " * 5]) == [0.25]  # the default target is 20 words
    assert reward_name(reward) == "length" and isinstance(get_reward("length"), LengthReward)


def test_keyword_reward_counts_the_keyword_per_char_or_per_word():
    assert KeywordReward("a")(["p"] * 3, ["aab", "", "bbbb"]) == [pytest.approx(2 / 3), 0.0, 0.0]
    assert KeywordReward("yes", per="word")(["p"] * 2, ["yes no yes yes", "yes"]) == [0.75, 1.0]
    assert KeywordReward("yes", per="word")(["p"], ["yesyes no"]) == [0.0]  # whole words only
    assert reward_name(KeywordReward("a")) == "keyword:a"
    with pytest.raises(ValueError, match="per must be 'char' or 'word'"):
        KeywordReward("a", per="line")


def test_regex_match_scores_a_match_anywhere():
    reward = RegexMatch(r"\bcat\b")
    assert reward(["p"] * 3, ["the cat sat", "concatenate", "cat"]) == [1.0, 0.0, 1.0]
    assert reward_name(reward) == r"regex:\bcat\b"


def test_exact_match_compares_the_first_line_normalised():
    reward = ExactMatch({"q1": "Paris", "q2": "42."})
    assert reward(
        ["q1", "q1", "q1", "q2", "q1"], ["paris.\nmore", " Paris ", "Paris is", "42", ""]
    ) == [1.0, 1.0, 0.0, 1.0, 0.0]
    strict = ExactMatch({"q1": "Paris"}, normalize=False)
    assert strict(["q1", "q1"], ["paris", "Paris\n"]) == [0.0, 1.0]
    with pytest.raises(KeyError, match="no known answer"):
        reward(["q3"], ["x"])


def test_answer_regex_takes_the_first_number_or_the_pattern_group():
    reward = AnswerRegex({"q": "12", "r": "-3.5"})
    assert reward(["q", "q", "q", "r", "r"], ["it is 12", "7 then 12", "none", "-3.5!", "3.5"]) == [
        1.0,
        0.0,
        0.0,
        1.0,
        0.0,
    ]
    tagged = AnswerRegex({"q": "12"}, pattern=r"answer: (\d+)")
    assert tagged(["q", "q"], ["5 and answer: 12", "12"]) == [1.0, 0.0]
    with pytest.raises(KeyError, match="no known answer"):
        reward(["x"], ["1"])


class _Dataset(list):
    """The part of a reasoning-gym dataset the reward uses: entries, and ``score_answer``."""

    def score_answer(self, answer, entry):
        return 1.0 if answer == entry["answer"] else 0.25


def test_reasoning_gym_reward_extracts_the_answer_in_each_format():
    pytest.importorskip("reasoning_gym")
    data = _Dataset(
        [{"question": "2+2=?", "answer": "4"}, {"question": "What is 12+2=?", "answer": "1400"}]
    )
    prompts = ["<user>2+2=?</user>", "<user>What is 12+2=?</user>"]
    assert ReasoningGymReward(data, "tag")(prompts, ["so <answer>4</answer>", "no tags"]) == [
        1.0,
        0.0,
    ]
    assert ReasoningGymReward(data, "raw")(prompts, [" 4 \n", "14"]) == [1.0, 0.25]
    assert ReasoningGymReward(data, "number")(prompts, ["4 or 5", "1,400 then 3"]) == [1.0, 1.0]
    assert ReasoningGymReward(data, "last_number")(prompts, ["5 or 4", "1,400 then 3"]) == [
        1.0,
        0.25,
    ]
    assert ReasoningGymReward(data, "last_number")(prompts, ["4", "7, 8 and 1,400"]) == [1.0, 1.0]
    assert ReasoningGymReward(data, "number")(prompts, ["none", "none"]) == [0.0, 0.0]
    # The longest question a prompt contains wins: "2=?" is inside "say 2+2=?" too.
    nested = _Dataset([{"question": "2=?", "answer": "a"}, {"question": "2+2=?", "answer": "b"}])
    assert ReasoningGymReward(nested, "raw")(["say 2+2=?"], ["b"]) == [1.0]
    with pytest.raises(KeyError, match="none of the dataset's questions"):
        ReasoningGymReward(data, "raw")(["unrelated"], ["4"])
    with pytest.raises(ValueError, match="answer_format must be one of"):
        ReasoningGymReward(data, "xml")


def test_each_builtin_reward_has_its_name():
    from textenv.rewards import VaderSentiment

    names = [
        reward_name(r)
        for r in (
            VaderSentiment(),
            ExactMatch({}),
            AnswerRegex({}),
            ReasoningGymReward(_Dataset(), "raw"),
            LengthReward(),
        )
    ]
    assert names == ["vader", "exact_match", "answer_regex", "reasoning_gym", "length"]


def test_classifier_reward_names_its_label_and_rejects_labels_it_lacks(tmp_path):
    from tests.test_textenv import tiny_reward_model
    from textenv.rewards import ClassifierReward

    path = tiny_reward_model(tmp_path / "rm")  # one scalar head: label 0, named LABEL_0
    assert reward_name(ClassifierReward(path)) == f"classifier:{path}[0]"
    assert ClassifierReward(path, label="LABEL_0").label == 0
    with pytest.raises(ValueError, match="has no label 'POSITIVE'"):
        ClassifierReward(path, label="POSITIVE")
    with pytest.raises(ValueError, match="label index 1 out of range for 1 labels"):
        ClassifierReward(path, label=1)
    with pytest.raises(FileNotFoundError, match="could not load reward model"):
        ClassifierReward(str(tmp_path / "missing"))


def test_registry_names_and_factories():
    @register("test_const_reward")
    def const(prompts, responses):
        return [0.5] * len(responses)

    assert get_reward("test_const_reward") is const and reward_name(const) == "const"
    with pytest.raises(ValueError, match="already registered"):
        register("test_const_reward")(const)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(ValueError, match="cannot import reward"):
        get_reward("no_such_module_xyz:fn")


def test_classifier_reward_pads_a_batch_and_truncates_to_max_length(tmp_path):
    from tests.test_textenv import tiny_reward_model
    from textenv.rewards import ClassifierReward

    path = tiny_reward_model(tmp_path / "rm")
    reward = ClassifierReward(path, with_prompt=False)
    short, long = "ab", "a longer reply"
    together = reward(["p", "p"], [short, long])  # one padded batch
    assert together == pytest.approx(reward(["p"], [short]) + reward(["p"], [long]), abs=1e-5)
    clipped = ClassifierReward(path, with_prompt=False, max_length=4)
    assert clipped(["p"], [long]) == pytest.approx(
        reward(["p"], [long[:4]]), abs=1e-6
    )  # one token per char


def test_classifier_reward_defaults_batch_32_max_length_512_float32_no_remote_code(
    tmp_path, monkeypatch
):
    import torch
    import transformers

    from tests.test_textenv import tiny_reward_model
    from textenv.rewards import ClassifierReward

    path = tiny_reward_model(tmp_path / "rm")
    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    reward = ClassifierReward(path, with_prompt=False)
    assert seen == [False, False]  # custom code from a checkpoint never runs unless asked for
    forwards = []
    reward.model.register_forward_hook(lambda module, args, out: forwards.append(1))
    reward(["p"] * 33, ["ab"] * 33)
    assert len(forwards) == 2  # 32 + 1
    text = "abcdefgh" * 80  # 640 characters, one token each
    assert reward(["p"], [text]) == pytest.approx(reward(["p"], [text[:512]]), abs=1e-6)
    longer = ClassifierReward(path, with_prompt=False, max_length=513)
    assert longer(["p"], [text]) != pytest.approx(
        reward(["p"], [text]), abs=1e-6
    )  # the check can tell 512 apart

    # A checkpoint saved in bf16 still loads in float32 unless a dtype is given.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "bf16")
    assert ClassifierReward(str(tmp_path / "bf16")).model.dtype == torch.float32
    assert (
        ClassifierReward(str(tmp_path / "bf16"), dtype=torch.bfloat16).model.dtype == torch.bfloat16
    )


def test_classifier_reward_pads_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from textenv.models import char_tokenizer
    from textenv.rewards import ClassifierReward

    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.eos_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None  # a GPT-2-style tokenizer
    reward = ClassifierReward(str(tmp_path), with_prompt=False)
    assert reward.tokenizer.pad_token == "<eos>"
    together = reward(["p", "p"], ["ab", "a longer reply"])
    assert together == pytest.approx(
        reward(["p"], ["ab"]) + reward(["p"], ["a longer reply"]), abs=1e-5
    )


def test_classifier_reward_follows_the_env_unless_placed(tmp_path):
    import torch

    from tests.test_textenv import tiny_reward_model
    from textenv.rewards import ClassifierReward

    path = tiny_reward_model(tmp_path / "rm")
    reward = ClassifierReward(path)
    reward.follow_env(torch.device("meta"), torch.bfloat16)  # inputs must go where the model went
    assert reward.device == torch.device("meta") and reward.model.dtype == torch.bfloat16
    placed = ClassifierReward(path, device="cpu")
    placed.follow_env(torch.device("meta"), torch.bfloat16)
    assert placed.device == torch.device("cpu") and placed.model.dtype == torch.float32
    assert ClassifierReward(path, device="meta").device == torch.device("meta")


def test_score_batch_returns_python_floats_from_any_sequence():
    import numpy as np
    import torch

    from textenv.rewards import score_batch

    def generator(prompts, responses):
        return (len(r) for r in responses)

    for fn in (
        generator,
        lambda p, r: np.array([1, 2], dtype=np.float32),
        lambda p, r: torch.tensor([1.0, 2.0]),
        lambda p, r: [1, 2],
    ):
        scores = score_batch(fn, ["p", "p"], ["a", "bb"])
        assert scores == [1.0, 2.0] and all(type(s) is float for s in scores)


def test_reward_module_imports_from_the_working_directory_first(tmp_path, monkeypatch):
    import sys

    from textenv.rewards import get_reward

    (tmp_path / "cwd").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "cwd" / "my_cwd_rewards.py").write_text(
        "def fn(p, r):\n    return [1.0] * len(r)\n"
    )
    (tmp_path / "other" / "my_cwd_rewards.py").write_text(
        "def fn(p, r):\n    return [2.0] * len(r)\n"
    )
    monkeypatch.chdir(tmp_path / "cwd")
    path = [p for p in sys.path if p not in ("", str(tmp_path / "cwd"))]
    monkeypatch.setattr(
        sys, "path", [str(tmp_path / "other")] + path
    )  # an installed console script's path
    monkeypatch.delitem(sys.modules, "my_cwd_rewards", raising=False)
    assert get_reward("my_cwd_rewards:fn")([""], ["x"]) == [
        1.0
    ]  # the user's file wins, as with python -m
    assert sys.path == [str(tmp_path / "other")] + path  # and the path is left as it was
    monkeypatch.delitem(sys.modules, "my_cwd_rewards")
    monkeypatch.setattr(
        sys, "path", [str(tmp_path / "cwd")] + path
    )  # already importable: imported as is
    assert get_reward("my_cwd_rewards:fn")([""], ["x"]) == [1.0]
    monkeypatch.delitem(sys.modules, "my_cwd_rewards")
    monkeypatch.setattr(
        sys, "path", [str(tmp_path / "other"), ""] + path
    )  # the user's own order is kept
    assert get_reward("my_cwd_rewards:fn")([""], ["x"]) == [2.0]
