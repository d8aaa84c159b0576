"""grpo-eval and its metrics: pass@k against exact enumeration, majority vote and its tie
rule, the held-out split, the aggregate report, and the CLI's errors."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from grpo import data as data_mod
from grpo.cli.eval import main
from grpo.evaluation import (
    Samples,
    cons_at_k,
    default_pass_ks,
    majority_vote,
    pass_at_k,
    prompt_examples,
    reward_functions,
    summarize,
)
from grpo.models import make_tiny
from grpo.rewards import answer_key, reward_columns, score
from grpo.tasks import make_task


def _exact_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_exact_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_exact_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # The binomials overflow a float here (C(1000, 500) ~ 1e299 times more for n=2000).
    value = pass_at_k(2000, 3, 100)
    exact = 1 - math.comb(1997, 100) / math.comb(2000, 100)
    assert value == pytest.approx(exact, rel=1e-9)
    assert pass_at_k(2000, 0, 100) == 0.0 and pass_at_k(2000, 1950, 100) == 1.0


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_vote_and_its_tie_rule():
    assert majority_vote(["3", "5", "5", "3", "7"]) == 0  # 3 and 5 tie: 3 was sampled first
    assert majority_vote(["5", "3", "3", "5"]) == 0
    assert majority_vote([None, "9", "4", "4"]) == 2  # the strict majority wins
    assert majority_vote([None, None, "4", None]) == 2  # no answer: no vote
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_cons_at_k_votes_on_the_accuracy_rewards_reading_of_answers():
    texts = ["<answer>1,000</answer>", "<answer>7</answer>", "<answer>1000.0</answer>",
             "<answer>7</answer>", "<think>no answer</think>", "<answer>7 </answer>"]
    # 7 (three votes) beats 1000 (two); "7 " and "7" are one answer.
    assert answer_key(texts[0]) == answer_key(texts[2]) == "1000"
    assert cons_at_k(texts, [False, True, False, True, False, True])
    assert not cons_at_k(texts, [True, False, True, False, True, False])
    # Tie 2-2: the answer sampled first (1000, index 0) decides, whatever the others are.
    tie = texts[:4]
    assert cons_at_k(tie, [True, False, True, False])
    assert not cons_at_k(tie, [False, True, False, True])
    assert not cons_at_k(["no", "answers"], [True, True])


def _scored(examples, texts_per_prompt, extra=()) -> Samples:
    """Score hand-written completions exactly as sample_and_score scores generated ones."""
    k = len(texts_per_prompt[0])
    texts = [t for row in texts_per_prompt for t in row]
    fns = reward_functions(make_task("arithmetic"), extra)
    columns = reward_columns(examples, k, [len(t) for t in texts], [False] * len(texts), 64)
    rewards, _ = score(fns, texts, columns)
    p = len(examples)
    return Samples(list(examples), [list(r) for r in texts_per_prompt],
                   torch.tensor([len(t) for t in texts]).view(p, k),
                   torch.zeros(p, k, dtype=torch.bool), rewards.view(p, k, -1),
                   [name for name, _ in fns])


def test_summary_of_hand_written_samples():
    ok, bad = "<think>a</think><answer>{}</answer>", "<think>a</think><answer>0</answer>"
    examples = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}]
    result = _scored(examples, [[ok.format(2), bad, bad, "<answer>2</answer>"],
                                [bad, bad, bad, ok.format(4)]])
    m = summarize(result, [1, 2, 4])
    # Correct: 2 of 4 on the first prompt (the unformatted one counts for accuracy), 1 of 4.
    assert m["pass@1"] == pytest.approx(3 / 8)
    assert m["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 2)
    assert m["pass@4"] == 1.0
    # First prompt: 2 and 0 tie 2-2 and the first sampled, 2, is right; second: 0 wins, wrong.
    assert m["cons@4"] == 0.5
    assert m["format"] == pytest.approx(7 / 8)
    assert default_pass_ks(8) == [1, 2, 4, 8] and default_pass_ks(6) == [1, 2, 4, 6]


def test_eval_prompts_are_the_trainers_held_out_prompts():
    task = make_task("arithmetic", operators="+")
    held_out, stream = data_mod.task_splits(task, 3, 50)
    _, evals = prompt_examples(task="arithmetic", task_args={"operators": "+"}, data="", seed=3,
                               eval_size=50, split="eval", num_prompts=None, needs_answer=True)
    assert evals == held_out
    _, train = prompt_examples(task="arithmetic", task_args={"operators": "+"}, data="", seed=3,
                               eval_size=50, split="train", num_prompts=300, needs_answer=True)
    assert len(train) == 300 and not {e["prompt"] for e in train} & {e["prompt"] for e in evals}


def test_eval_command_report(tmp_path, capsys):
    model = make_tiny(tmp_path / "m", hidden=32, layers=1)
    out = tmp_path / "report.json"
    rc = main(["--model", str(model), "--num-prompts", "3", "--samples", "3", "--greedy",
               "--max-completion-length", "6", "--per-prompt", "--no-progress",
               "--output", str(out)])
    assert rc == 0 and "cons@3" in capsys.readouterr().out
    report = json.loads(out.read_text())
    s, m = report["settings"], report["metrics"]
    assert s["template"] == "short" and s["samples"] == 3 and s["temperature"] == 0.6
    assert m["prompts"] == 3 and set(m) >= {"pass@1", "pass@2", "pass@3", "cons@3", "format",
                                            "completion_length", "greedy_accuracy"}
    assert 1 <= m["completion_length"] <= 6
    assert len(report["per_prompt"]) == 3 and len(report["per_prompt"][0]["completions"]) == 3


def test_eval_command_errors(tmp_path, capsys):
    model = make_tiny(tmp_path / "m", hidden=32, layers=1)
    assert main(["--model", str(model), "--samples", "0"]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert main(["--model", str(model), "--samples", "2", "--pass-k", "4"]) == 2
    assert "--pass-k" in capsys.readouterr().err
    no_answers = tmp_path / "q.jsonl"
    no_answers.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    assert main(["--model", str(model), "--data", str(no_answers)]) == 2
    err = capsys.readouterr().err
    assert "q.jsonl:2: missing 'answer'" in err and "accuracy reward" in err
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    assert main(["--model", str(model)]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
