"""Rule-based rewards: parsing, each reward on hand-written completions, and score()."""

import math

import pytest
import torch

from grpo.rewards import (
    REWARDS,
    RewardError,
    accuracy_reward,
    extract_answer,
    format_reward,
    language_consistency_reward,
    normalize_number,
    overlong_reward,
    resolve_reward,
    score,
)


def fmt(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# ------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><answer> 42 </answer>", "42"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),  # last wins
    ("<answer>a<answer>b</answer>", "b"),  # innermost-last block
    ("<answer>\n multi\nline \n</answer>", "multi\nline"),
    ("no tags at all", None),
    ("<answer>unclosed", None),
    ("closed only</answer>", None),
    ("<answer></answer>", ""),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("s, expected", [
    ("42", "42"), (" 42 ", "42"), ("+42", "42"), ("1,234", "1234"), ("1,234,567.50", "1234567.5"),
    ("2.0", "2"), ("2.500", "2.5"), ("5.", "5"), (".5", "0.5"), ("-0", "0"), ("-0.0", "0"),
    ("-7", "-7"), ("- 7", "-7"), ("3/4", "0.75"), ("6/8", "0.75"), ("-1/2", "-0.5"),
    ("1/3", "1/3"), ("2/6", "1/3"), ("4/2", "2"), ("1e3", "1000"), ("1 000", "1000"),
    ("0.1", "0.1"), ("-0.05", "-0.05"),
    ("1,2", None), ("12,34", None), ("abc", None), ("", None), ("1/0", None), ("1.2.3", None),
    ("3 apples", None), ("--5", None), ("1e999999999", None), ("0x10", None),
])
def test_normalize_number(s, expected):
    assert normalize_number(s) == expected


# ------------------------------------------------------------------------------------ accuracy


def test_accuracy_reward():
    completions = [
        fmt("7+8=15", "85"),  # right
        fmt("...", "84"),  # wrong
        "<think>no answer block</think>",  # missing tags
        "85",  # no tags at all
        fmt("x", "85") + " trailing text",  # accuracy ignores format
        "<answer>84</answer><answer>85</answer>",  # last wins
        fmt("", "1,000"),  # thousands separator vs "1000"
        fmt("", "0.75"),  # decimal vs fraction reference
        fmt("", "-5.0"),  # negative decimal
        fmt("", "-5"),  # negative vs positive reference
        fmt("", "5 14  52"),  # whitespace-normalised text
        fmt("", "5 14 53"),
        fmt("", "85"),  # reference None: does not apply
    ]
    answers = ["85", "85", "85", "85", "85", "85", "1000", "3/4", "-5", "5", "5 14 52",
               "5 14 52", None]
    got = accuracy_reward(completions, answer=answers, unrelated_column=[0] * len(answers))
    assert got == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, None]


def test_accuracy_text_answers_are_exact():
    got = accuracy_reward([fmt("", "Paris"), fmt("", "paris")], answer=["Paris", "Paris"])
    assert got == [1.0, 0.0]


# ------------------------------------------------------------------------------------ format


@pytest.mark.parametrize("text, expected", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>a\nb</think>\n<answer>\nc\n</answer>\n", 1.0),
    (" <think>a</think> <answer>b</answer>", 1.0),  # after "Assistant:" of the R1 template
    ("<think></think><answer></answer>", 1.0),
    ("<think>a</think><answer>b</answer> extra", 0.0),  # text after the answer
    ("hello <think>a</think><answer>b</answer>", 0.0),  # text before
    ("<think>a</think>text<answer>b</answer>", 0.0),  # text between
    ("<think>a</think><think>b</think><answer>c</answer>", 0.0),  # two think blocks
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),  # two answer blocks
    ("<think>a <answer>x</answer></think><answer>b</answer>", 0.0),  # answer inside think
    ("<answer>b</answer><think>a</think>", 0.0),  # wrong order
    ("<think>a</think>", 0.0),
    ("<answer>b</answer>", 0.0),
    ("<think>a<answer>b</answer>", 0.0),
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward([text], answer=["ignored"]) == [expected]


# ------------------------------------------------------------------------------------ language


def test_language_consistency_reward():
    completions = [
        fmt("First add the units, then the tens.", "x"),
        fmt("先算个位再算十位", "x"),
        fmt("add 个位", "x"),  # 3 Latin letters, 2 ideographs
        fmt("7+8=15", "x"),  # no letters at all
        "no think block at all",
        fmt("", "x"),
    ]
    assert language_consistency_reward(completions) == [1.0, 0.0, 0.6, 0.0, 0.0, 0.0]
    zh = language_consistency_reward(completions, language="zh")
    assert zh == [0.0, 1.0, 0.4, 0.0, 0.0, 0.0]
    # As a per-sample column.
    assert language_consistency_reward(completions[:2], language=["en", "zh"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="unsupported language"):
        language_consistency_reward(completions[:1], language="xx")


def test_language_only_counts_reasoning():
    text = "<think>think in English</think><answer>答案是八十五</answer>"
    assert language_consistency_reward([text]) == [1.0]


# ------------------------------------------------------------------------------------ overlong


def test_overlong_reward():
    lengths = [0, 60, 75, 76, 80, 90, 99, 100, 101]
    got = overlong_reward(["x"] * len(lengths), completion_lengths=lengths,
                          max_completion_length=100)
    # Default buffer = 100 // 4 = 25: ramp over (75, 100].
    expected = [0.0, 0.0, 0.0, -1 / 25, -5 / 25, -15 / 25, -24 / 25, -1.0, -1.0]
    assert got == pytest.approx(expected)

    got = overlong_reward(["x"] * 4, completion_lengths=[50, 90, 95, 40],
                          max_completion_length=100, overlong_buffer=10,
                          truncated=[False, False, False, True])
    assert got == pytest.approx([0.0, 0.0, -0.5, -1.0])

    # No buffer: only the hard cut.
    got = overlong_reward(["x"] * 2, completion_lengths=[100, 101], max_completion_length=100,
                          overlong_buffer=0)
    assert got == [0.0, -1.0]
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_reward(["x"], completion_lengths=[1], max_completion_length=10,
                        overlong_buffer=11)


# ------------------------------------------------------------------------------------ registry


def test_resolve_reward():
    assert resolve_reward("accuracy") == ("accuracy", accuracy_reward)
    assert set(REWARDS) == {"accuracy", "format", "language", "countdown", "overlong", "code"}
    assert resolve_reward("grpo.rewards:format_reward") == ("format_reward", format_reward)
    with pytest.raises(ValueError, match="unknown reward"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="has no attribute"):
        resolve_reward("grpo.rewards:no_such_fn")
    with pytest.raises(ValueError, match="not callable"):
        resolve_reward("grpo.rewards:REWARDS")
    with pytest.raises(ValueError, match="must look like"):
        resolve_reward("grpo.rewards:")


# ------------------------------------------------------------------------------------ score


COMPLETIONS = [fmt("a", "1"), fmt("b", "2"), "junk", fmt("c", "boom")]
COLUMNS = {"answer": ["1", "3", "1", "4"], "completion_lengths": [5, 7, 4, 9],
           "truncated": [False] * 4, "max_completion_length": 8}


def maybe(completions, **kw):
    return [None if c == "junk" else 0.5 for c in completions]


def explode_on_boom(completions, answer, **kw):
    out = []
    for c in completions:
        if "boom" in c:
            raise KeyError("boom")
        out.append(1.0)
    return out


def test_score_shapes_and_none():
    fns = [resolve_reward("accuracy"), resolve_reward("format"), ("maybe", maybe),
           resolve_reward("overlong")]
    rewards, failures = score(fns, COMPLETIONS, COLUMNS)
    assert rewards.shape == (4, 4) and rewards.dtype == torch.float32
    assert rewards[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert rewards[:, 1].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert math.isnan(rewards[2, 2]) and rewards[0, 2] == 0.5
    assert rewards[:, 3].tolist() == [0.0, -0.5, 0.0, -1.0]  # buffer 2: ramp over (6, 8]
    assert failures == {"accuracy": 0, "format": 0, "maybe": 0, "overlong": 0}
    empty, _ = score(fns, [], {k: [] if isinstance(v, list) else v for k, v in COLUMNS.items()})
    assert empty.shape == (0, 4)


def test_score_wrong_count_and_nan():
    with pytest.raises(RewardError, match=r"'short'.*returned 3 values, expected 4"):
        score([("short", lambda c, **kw: [0.0] * 3)], COMPLETIONS, COLUMNS)
    nan_fn = lambda c, **kw: [math.nan if "junk" in x else 0.0 for x in c]
    with pytest.raises(RewardError, match=r"'nan_fn'.*completion 2.*'junk'"):
        score([("nan_fn", nan_fn)], COMPLETIONS, COLUMNS)
    with pytest.raises(RewardError, match="'inf_fn'"):
        score([("inf_fn", lambda c, **kw: [math.inf] * len(c))], COMPLETIONS, COLUMNS)
    with pytest.raises(ValueError, match="on_error"):
        score([("maybe", maybe)], COMPLETIONS, COLUMNS, on_error="ignore")


def test_score_raising_function():
    fns = [("format", format_reward), ("explode", explode_on_boom)]
    with pytest.raises(RewardError, match=r"'explode' raised KeyError.*completion 3.*boom") as e:
        score(fns, COMPLETIONS, COLUMNS)
    assert isinstance(e.value.__cause__, KeyError)

    rewards, failures = score(fns, COMPLETIONS, COLUMNS, on_error="zero")
    assert rewards[:, 1].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert failures == {"format": 0, "explode": 1}


def test_score_per_completion_call_gets_its_row():
    seen = []

    def batch_hostile(completions, answer, max_completion_length, **kw):
        if len(completions) > 1:
            raise RuntimeError("batch only fails")
        seen.append((completions[0], answer, max_completion_length))
        return [1.0]

    rewards, failures = score([("bh", batch_hostile)], COMPLETIONS, COLUMNS, on_error="zero")
    assert rewards[:, 0].tolist() == [1.0] * 4 and failures == {"bh": 0}
    assert seen[1] == (COMPLETIONS[1], ["3"], 8)  # aligned lists sliced, scalars kept
    with pytest.raises(RewardError, match="on no single completion"):
        score([("bh", batch_hostile)], COMPLETIONS, COLUMNS)
