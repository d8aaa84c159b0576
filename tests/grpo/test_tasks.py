"""The built-in tasks: deterministic generators, worked solutions that earn every reward,
their contents and options, the registry, each task's rewards, and Countdown's evaluator
and reward."""

import subprocess
import sys
from fractions import Fraction

import pytest

from grpo.models import char_tokenizer
from grpo.rewards import REWARDS, accuracy_reward, format_reward, resolve_reward
from grpo.tasks import TASKS, ArithmeticTask, CountdownTask, SortTask, make_task
from grpo.tasks.countdown import MAX_EXPR_CHARS, countdown_reward, evaluate


def fmt(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


TASK_CONFIGS = [
    ("arithmetic", {}),
    ("arithmetic", {"digits": 3, "operators": "+-*"}),
    ("arithmetic", {"digits": 1, "operators": "-", "negative": False}),
    ("countdown", {}),
    ("countdown", {"count": 4, "max_number": 50}),
    ("sort", {}),
    ("reverse", {"length": 4}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(TASK_CONFIGS)]


@pytest.mark.parametrize("name, options", TASK_CONFIGS, ids=IDS)
def test_task_deterministic(name, options):
    task = make_task(name, **options)
    a = [task.example(i, seed=7) for i in range(50)]
    assert a == [make_task(name, **options).example(i, seed=7) for i in range(50)]
    b = [task.example(i, seed=8) for i in range(50)]
    assert [x["prompt"] for x in a] != [x["prompt"] for x in b]
    assert all(isinstance(x["prompt"], str) and isinstance(x["answer"], str) for x in a)


@pytest.mark.parametrize("name, options", TASK_CONFIGS, ids=IDS)
def test_solutions_earn_full_reward(name, options):
    task = make_task(name, **options)
    examples = [task.example(i, seed=0) for i in range(200)]
    solutions = [task.solution(ex) for ex in examples]
    answers = [ex["answer"] for ex in examples]
    assert accuracy_reward(solutions, answer=answers) == [1.0] * 200
    assert format_reward(solutions) == [1.0] * 200
    if name == "countdown":
        got = countdown_reward(
            solutions,
            numbers=[ex["numbers"] for ex in examples],
            target=[ex["target"] for ex in examples],
        )
        assert got == [1.0] * 200
        assert all(len(ex["numbers"]) == task.count for ex in examples)
    # Everything is in the character tokenizer's vocabulary (no <unk>).
    tok = char_tokenizer()
    for ex, sol in zip(examples[:20], solutions[:20], strict=True):
        ids = tok(ex["prompt"] + sol, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == ex["prompt"] + sol


def test_task_contents():
    ex = ArithmeticTask(digits=2, operators="*").example(0, seed=0)
    a, b = map(int, ex["prompt"].split("*"))
    assert ex["answer"] == str(a * b) and a < 100 and b < 100
    sol = ArithmeticTask().solution({"prompt": "47+38", "answer": "85"})
    assert sol == "<think>7+8=15, 4+3+1=8, so 85</think><answer>85</answer>"
    sol = ArithmeticTask().solution({"prompt": "38-47", "answer": "-9"})
    assert sol.endswith("so -9</think><answer>-9</answer>")
    for i in range(100):
        ex = ArithmeticTask(operators="-", negative=False).example(i, seed=0)
        assert int(ex["answer"]) >= 0

    ex = CountdownTask(count=3, max_number=20).example(3, seed=1)
    assert ex["prompt"] == f"Using {' '.join(map(str, ex['numbers']))} make {ex['target']}"
    assert all(1 <= n <= 20 for n in ex["numbers"])
    targets = [CountdownTask().example(i, seed=0)["target"] for i in range(200)]
    assert all(isinstance(t, int) and 0 < t <= 100 for t in targets)

    ex = SortTask(length=6, max_value=9).example(0, seed=0)
    values = list(map(int, ex["prompt"].split()[1:]))
    assert len(values) == 6 and ex["answer"] == " ".join(map(str, sorted(values)))
    ex = make_task("reverse").example(0, seed=0)
    assert ex["prompt"].startswith("sort desc ")
    assert ex["answer"] == " ".join(
        map(str, sorted(map(int, ex["prompt"].split()[2:]), reverse=True))
    )
    assert make_task("reverse").name == "reverse" and SortTask().name == "sort"


def test_make_task_errors():
    assert set(TASKS) == {"arithmetic", "countdown", "sort", "reverse"}
    with pytest.raises(ValueError, match="unknown task 'nope'.*arithmetic"):
        make_task("nope")
    with pytest.raises(ValueError, match="operators"):
        ArithmeticTask(operators="+/")
    with pytest.raises(ValueError, match="task 'sort' has no option 'digits'; its options: length"):
        make_task("sort", digits=3)


# ------------------------------------------------------------------------------------ countdown


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("12+7", 1.0),  # valid, 3 unused (at most once)
        ("12+7*3/3", 0.0),  # 3 reused
        ("12+7+3-3", 0.0),  # 3 reused
        ("12*3-17", 0.0),  # 17 not given
        ("12+7+3", 0.0),  # wrong result
        ("19", 0.0),  # 19 not given
        ("12+7+3/(7-7)", 0.0),  # division by zero (and reuse)
        ("(3*12+2)/2", 0.0),  # 2 not given
        (" ( 12 + 7 ) ", 1.0),
        ("-3+12+7+3", 0.0),  # unary minus is not allowed
        ("12.0+7", 0.0),  # floats are not integers
        ("12**1+7", 0.0),  # power is not allowed
        ("12+7=19", 0.0),  # an equation, not an expression
        ("__import__('os')", 0.0),
        ("__import__('os').system('true')", 0.0),
        ("(lambda: 19)()", 0.0),
        ("12+7 if True else 0", 0.0),
        ("", 0.0),
        ("(" * 300 + "12+7" + ")" * 300, 0.0),  # too long for the parser guard
    ],
)
def test_countdown_reward(answer, expected):
    got = countdown_reward([fmt("", answer)], numbers=[[3, 7, 12]], target=[19])
    assert got == [expected]


def test_countdown_duplicate_numbers_and_missing_answer():
    # A number given twice may be used twice; one given once may not.
    assert countdown_reward([fmt("", "6+6+4")], numbers=[[6, 6, 4]], target=[16]) == [1.0]
    assert countdown_reward([fmt("", "4+4+6+2")], numbers=[[6, 6, 4]], target=[16]) == [0.0]
    assert countdown_reward(["<think>12+7</think>"], numbers=[[3, 7, 12]], target=[19]) == [0.0]
    # Exact arithmetic: 7/2*6 is 21, not 18 as with floor division.
    assert countdown_reward([fmt("", "7/2*6")], numbers=[[2, 6, 7]], target=[21]) == [1.0]
    # Division by zero with every number used once.
    assert countdown_reward([fmt("", "12+7+3/(3-3)")], numbers=[[3, 3, 7, 12]], target=[19]) == [
        0.0
    ]


def test_countdown_evaluator():
    found = evaluate("7/2*6")
    assert found.value == 21 and found.numbers == (7, 2, 6)
    assert found.steps == ("7/2=7/2", "7/2*6=21")  # exact: floor division would give 18
    found = evaluate(" (12 - 3) * 7 ")
    assert (found.value, found.numbers, found.steps) == (63, (12, 3, 7), ("12-3=9", "9*7=63"))
    assert evaluate("1/3").value == Fraction(1, 3)
    for bad in ("", "-3+1", "1.5+1", "2**3", "1/(2-2)", "x+1", "(1", "1 2"):
        assert evaluate(bad) is None, bad
    long = "+".join(["1"] * 200)  # 399 characters: over the limit for untrusted text only
    assert len(long) > MAX_EXPR_CHARS and evaluate(long) is None
    assert evaluate(long, max_chars=None).value == 200


def test_countdown_solution_and_generator_agree_with_the_evaluator():
    assert CountdownTask().solution({"answer": "(12-3)*7"}) == fmt("12-3=9, 9*7=63", "(12-3)*7")
    with pytest.raises(ValueError, match="not a countdown expression"):
        CountdownTask().solution({"answer": "12-3)"})
    task = CountdownTask(count=5, max_number=30)
    for i in range(100):
        ex = task.example(i, seed=0)
        found = evaluate(ex["answer"])
        assert found.value == ex["target"] and sorted(found.numbers) == sorted(ex["numbers"])
        # Every intermediate is a positive integer, as the generator promises.
        assert all(int(s.split("=")[1]) > 0 for s in found.steps)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_rewards_are_the_named_rewards(name):
    task = make_task(name)
    fns = task.reward_functions()
    assert task.rewards == tuple(n for n, _ in fns)
    assert [resolve_reward(n) for n in task.rewards] == fns  # --reward NAME is the same fn
    expected = ("countdown", "format") if name == "countdown" else ("accuracy", "format")
    assert task.rewards == expected
    assert REWARDS["countdown"] is countdown_reward


@pytest.mark.parametrize(
    "first",
    [
        "grpo.rewards",
        "grpo.tasks",
        "grpo.tasks.countdown",
        "grpo.tasks.sort",
        "grpo.data",
        "grpo.evaluation",
    ],
)
def test_import_order(first):
    # The tasks build on grpo.rewards, which names Countdown's reward (grpo.rewards.countdown)
    # and imports no task: importing any of them first must work.
    code = (
        f"import {first}\nimport grpo.rewards as r, grpo.tasks as t\n"
        "assert r.REWARDS['countdown'] is t.countdown.countdown_reward\n"
        "assert t.make_task('countdown').rewards == ('countdown', 'format')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
