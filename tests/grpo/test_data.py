"""Streams, held-out splits, JSONL datasets and prompt templates (the tasks themselves:
test_tasks.py)."""

import json

import pytest

from grpo.data import (
    TEMPLATES,
    DatasetError,
    JsonlStream,
    TrainStream,
    format_prompt,
    load_jsonl,
    split_examples,
    task_splits,
)
from grpo.models import char_tokenizer
from grpo.tasks import ArithmeticTask, CountdownTask


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
