"""Tasks, streams, held-out splits, JSONL datasets and prompt templates."""

import json

import pytest

from grpo.data import (
    TASKS,
    TEMPLATES,
    ArithmeticTask,
    CountdownTask,
    DatasetError,
    JsonlStream,
    SortTask,
    TrainStream,
    format_prompt,
    load_jsonl,
    make_task,
    split_examples,
    task_splits,
)
from grpo.rewards import accuracy_reward, countdown_reward, format_reward
from models import char_tokenizer

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
        got = countdown_reward(solutions, numbers=[ex["numbers"] for ex in examples],
                               target=[ex["target"] for ex in examples])
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
    assert ex["answer"] == " ".join(map(str, sorted(map(int, ex["prompt"].split()[2:]),
                                                   reverse=True)))
    assert make_task("reverse").name == "reverse" and SortTask().name == "sort"


def test_make_task_errors():
    assert set(TASKS) == {"arithmetic", "countdown", "sort", "reverse"}
    with pytest.raises(ValueError, match="unknown task 'nope'.*arithmetic"):
        make_task("nope")
    with pytest.raises(ValueError, match="operators"):
        ArithmeticTask(operators="+/")
    with pytest.raises(TypeError):
        make_task("sort", digits=3)


def test_eval_train_disjoint():
    # One-digit sums have only 100 distinct prompts, so collisions are certain.
    task = ArithmeticTask(digits=1, operators="+")
    eval_set, stream = task_splits(task, seed=0, eval_size=40)
    prompts = [ex["prompt"] for ex in eval_set]
    assert len(prompts) == len(set(prompts)) == 40
    train = [ex["prompt"] for ex in stream.next_batch(2000)]
    assert not set(train) & set(prompts)
    assert len(set(train)) == 60  # every other prompt shows up
    # The eval set does not depend on anything but (task, seed).
    assert task_splits(task, seed=0, eval_size=40)[0] == eval_set
    assert task_splits(task, seed=1, eval_size=40)[0] != eval_set
    with pytest.raises(ValueError, match="distinct prompts"):
        task_splits(ArithmeticTask(digits=1, operators="*"), seed=0, eval_size=101)


def test_train_stream_resume():
    task = CountdownTask()
    eval_set, stream = task_splits(task, seed=3, eval_size=20)
    stream.next_batch(13)
    stream.next_batch(5)
    position = stream.position
    assert position >= 18
    expected = stream.next_batch(7) + stream.next_batch(9)
    resumed = TrainStream(task, 3, exclude={ex["prompt"] for ex in eval_set}, position=position)
    assert resumed.next_batch(16) == expected
    stream.position = position  # settable too
    assert stream.next_batch(16) == expected
    with pytest.raises(ValueError):
        stream.position = -1


# ------------------------------------------------------------------------------------ JSONL


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_good(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "1+1", "answer": "2"}),
        "",
        "   ",
        json.dumps({"prompt": "2+2", "answer": 4, "level": "easy"}),
        json.dumps({"prompt": "open question"}),
    ])
    examples = load_jsonl(path)
    assert examples == [{"prompt": "1+1", "answer": "2"},
                        {"prompt": "2+2", "answer": "4", "level": "easy"},
                        {"prompt": "open question"}]
    assert load_jsonl(str(path))[0]["prompt"] == "1+1"  # str paths too
    with pytest.raises(DatasetError, match=r"d\.jsonl:5: missing 'answer'"):
        load_jsonl(path, require_answer=True)


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "x", ', "invalid JSON"),
    ('["prompt", "x"]', "expected a JSON object"),
    ('{"question": "x"}', "missing 'prompt'"),
    ('{"prompt": 3}', "'prompt' must be a string"),
    ('{"prompt": "x", "answer": [1]}', "'answer' must be a string"),
])
def test_load_jsonl_malformed(tmp_path, bad, message):
    good = json.dumps({"prompt": "ok", "answer": "1"})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", good, bad, good])
    with pytest.raises(DatasetError, match=rf"bad\.jsonl:4: {message}"):
        load_jsonl(path)
    assert issubclass(DatasetError, ValueError)


def test_load_jsonl_empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match="contains no examples"):
        load_jsonl(path)
    write_lines(path, ["", "  "])
    with pytest.raises(DatasetError, match="contains no examples"):
        load_jsonl(path)


def test_jsonl_stream_and_split():
    examples = [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)]
    examples.append({"prompt": "q3", "answer": "3"})  # a duplicate prompt
    train, held = split_examples(examples, eval_size=3, seed=0)
    assert len(held) == 3
    held_prompts = {ex["prompt"] for ex in held}
    assert not held_prompts & {ex["prompt"] for ex in train}
    assert split_examples(examples, eval_size=3, seed=0) == (train, held)
    with pytest.raises(ValueError, match="eval_size"):
        split_examples(examples, eval_size=len(examples), seed=0)

    stream = JsonlStream(train, seed=5)
    epoch = stream.next_batch(len(train))
    assert sorted(ex["prompt"] for ex in epoch) == sorted(ex["prompt"] for ex in train)
    assert [ex["prompt"] for ex in epoch] != [ex["prompt"] for ex in train] or len(train) < 3
    first = stream.next_batch(3)
    rest = stream.next_batch(20)
    resumed = JsonlStream(train, seed=5, position=len(train) + 3)
    assert resumed.next_batch(20) == rest
    assert JsonlStream(train, seed=5).next_batch(len(train) + 3)[-3:] == first
    assert JsonlStream(train, seed=6).next_batch(len(train)) != epoch
    first[0]["extra"] = 1  # copies: the dataset is not modified
    assert "extra" not in train[0] and all("extra" not in ex for ex in train)


# ------------------------------------------------------------------------------------ templates


def test_format_prompt():
    ex = {"prompt": "47+38", "answer": "85"}
    r1 = format_prompt(ex, "r1zero")
    assert r1.startswith("A conversation between User and Assistant.")
    assert r1.endswith("User: 47+38. Assistant:")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in r1
    assert format_prompt(ex, "short") == "47+38\n"
    assert format_prompt(ex, "none") == "47+38"
    assert format_prompt(ex, "Q: {prompt} {json: 1}\nA:") == "Q: 47+38 {json: 1}\nA:"
    assert set(TEMPLATES) == {"r1zero", "short", "none"}

    tok = char_tokenizer()
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(ex, "chat", tok)
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(ex, "chat")
    # {{ '\n' }} rather than a bare newline, which transformers' trim_blocks would eat: the
    # trailing newline shows that add_generation_prompt=True was passed.
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '\\n' }}{% endif %}")
    assert format_prompt(ex, "chat", tok) == "47+38\n"
    with pytest.raises(ValueError, match="unknown template 'nope'.*chat.*r1zero"):
        format_prompt(ex, "nope")
