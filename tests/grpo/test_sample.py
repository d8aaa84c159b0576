"""grpo-sample: the rejection filter on hand-written completions, its errors, and a tiny
sample -> sft (packed, fresh smaller student) -> eval run that checks the prompt round trip."""

from __future__ import annotations

import json

import pytest
import torch

import grpo.cli.sft
import grpo.rollout
from grpo import data as data_mod
from grpo.cli.eval import main as eval_main
from grpo.cli.sample import main as sample_main
from grpo.cli.sft import main as sft_main
from grpo.evaluation import rejection_filter
from grpo.models import load_model, make_tiny
from grpo.tasks import make_task
from tests.grpo.test_eval import _scored

GOOD = "<think>1+1=2, so 2</think><answer>2</answer>"


def test_rejection_filter_on_hand_written_completions():
    examples = [{"prompt": "1+1", "answer": "2"}, {"prompt": "3+4", "answer": "7"}]
    first = [GOOD,
             GOOD,  # duplicate of the first: dropped
             "<answer>2</answer>",  # right but no <think>: rejected by format
             "<think>so</think><answer>3</answer>",  # wrong: rejected by accuracy
             "<think>1+1 得 2</think><answer>2</answer>"]  # right, formatted, mixed language
    second = ["<think>4+3=7</think><answer>7</answer>", "<think>3+4=7</think><answer>7</answer>",
              "<think>a</think><answer>7</answer>", "<think>x</think><answer>8</answer>",
              "7"]
    result = _scored(examples, [first, second])
    rows, stats = rejection_filter(result, keep="correct")
    assert [r["completion"] for r in rows] == [GOOD, first[4], *second[:3]]
    assert all(set(r) == {"prompt", "answer", "completion"} for r in rows)
    assert rows[0]["prompt"] == "1+1" and rows[-1]["answer"] == "7"
    assert stats["rejected"] == {"accuracy": 3, "format": 2} and stats["duplicates"] == 1
    assert stats["sampled"] == 10 and stats["kept"] == 5 and stats["prompts_kept"] == 2

    rows, stats = rejection_filter(result, keep="correct", max_per_prompt=1)
    assert [r["completion"] for r in rows] == [GOOD, second[0]]
    assert stats["over_max_per_prompt"] == 3

    rows, _ = rejection_filter(result, keep="all")
    assert len(rows) == 9  # everything but the duplicate

    with pytest.raises(ValueError, match="'language' reward"):
        rejection_filter(result, min_language=0.9)
    scored = _scored(examples, [first, second], extra=["language"])
    rows, stats = rejection_filter(scored, keep="correct", min_language=0.9)
    # "1+1 得 2" has one letter, not Latin: 0; reasoning without letters ("4+3=7") or no
    # <think> at all scores 0 too: 5 of 10 fall below 0.9.
    assert [r["completion"] for r in rows] == [GOOD, second[2]]
    assert stats["rejected"]["language"] == 5


def test_empty_result_says_which_reward_rejected_what():
    examples = [{"prompt": "1+1", "answer": "2"}]
    result = _scored(examples, [["<answer>2</answer>", "<think>a</think><answer>5</answer>",
                                 "nothing"]])
    with pytest.raises(ValueError, match=r"3 sampled, rejected 2 by accuracy, 2 by format"):
        rejection_filter(result, keep="correct")


def test_sample_sft_eval_round_trip(tmp_path, monkeypatch, capsys):
    teacher = make_tiny(tmp_path / "teacher", hidden=32, layers=2, seed=1)
    # Record the prompts the teacher is sampled with and the pairs the student trains on.
    seen, trained = [], []
    generate = grpo.rollout.TransformersEngine.generate

    def recording_generate(self, prompts, *args, **kwargs):
        seen.extend(prompts)
        return generate(self, prompts, *args, **kwargs)

    run_sft = grpo.cli.sft.run_sft

    def recording_run_sft(model, tokenizer, pairs, **kwargs):
        trained.extend(pairs)
        return run_sft(model, tokenizer, pairs, **kwargs)

    monkeypatch.setattr(grpo.rollout.TransformersEngine, "generate", recording_generate)
    monkeypatch.setattr(grpo.cli.sft, "run_sft", recording_run_sft)
    pairs = tmp_path / "pairs.jsonl"
    rc = sample_main(["--model", str(teacher), "--task-args", '{"operators": "+"}',
                      "--num-prompts", "4", "--samples", "2", "--max-completion-length", "6",
                      "--keep", "all", "--no-progress", "--output", str(pairs)])
    assert rc == 0 and "completions kept" in capsys.readouterr().out
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert 4 <= len(rows) <= 8 and all("+" in r["prompt"] for r in rows)
    held_out, _ = data_mod.task_splits(make_task("arithmetic", operators="+"), 0, 200)
    assert not {r["prompt"] for r in rows} & {e["prompt"] for e in held_out}

    student = tmp_path / "student"
    assert sft_main(["--data", str(pairs), "--tiny-hidden", "16", "--tiny-layers", "1",
                     "--steps", "2", "--batch-size", "4", "--packing", "--max-length", "64",
                     "--output-dir", str(student)]) == 0
    # The student saw each prompt exactly as the teacher was sampled with it.
    assert {p for p, _ in trained} == set(seen)
    assert [c for _, c in trained] == [r["completion"] for r in rows]
    model, _ = load_model(student, dtype=torch.float32)
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 1

    report = tmp_path / "student.json"
    assert eval_main(["--model", str(student), "--task-args", '{"operators": "+"}',
                      "--num-prompts", "2", "--samples", "2", "--max-completion-length", "6",
                      "--no-progress", "--output", str(report)]) == 0
    assert 0.0 <= json.loads(report.read_text())["metrics"]["pass@1"] <= 1.0


def test_sample_command_errors(tmp_path, capsys):
    model = make_tiny(tmp_path / "m", hidden=16, layers=1)
    out = str(tmp_path / "o.jsonl")
    assert sample_main(["--model", str(model), "--samples", "0", "--output", out]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    # A random model gets nothing right: the error counts the rejections.
    assert sample_main(["--model", str(model), "--num-prompts", "2", "--samples", "2",
                        "--max-completion-length", "4", "--no-progress", "--output", out]) == 2
    assert "no completion kept: 4 sampled, rejected 4 by accuracy, 4 by format" \
        in capsys.readouterr().err
