"""The code reward: program extraction, output comparison, both dataset shapes, the two
scores, verdict counts, bad rows, its flags, and the commands on examples/code (grpo-train
without bwrap, with it for a step, grpo-sft and grpo-eval). The attacks are in
test_code_sandbox.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import grpo.rewards.code as code_mod
from grpo.build import build_trainer
from grpo.cli import eval as eval_cli
from grpo.cli import sft as sft_cli
from grpo.config import GRPOConfig, parse_config
from grpo.data import load_jsonl
from grpo.metrics import read_metrics
from grpo.models import make_tiny
from grpo.rewards import (
    REWARDS,
    correctness_reward,
    format_reward,
    resolve_reward,
    reward_columns,
    score,
)
from grpo.rewards import sandbox as sandbox_mod
from grpo.rewards.code import CodeReward, CodeSettings, extract_program, same_output
from grpo.rewards.sandbox import Limits, SandboxError, SandboxUnavailable

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "code"
SUM = ["1 2\n", "3 4\n", "5\n", "0 0\n", "-1 1\n"]
SUMS = ["3\n", "7\n", "5\n", "0\n", "0\n"]


@pytest.fixture(scope="module")
def bwrap_ok():
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed: apt-get install bubblewrap (.ci/run does)")
    try:
        sandbox_mod.Sandbox("bwrap").ensure_available()
    except SandboxUnavailable as e:
        pytest.skip(f"bwrap cannot create namespaces on this machine: {e}")


needs_bwrap = pytest.mark.usefixtures("bwrap_ok")  # the tests that run programs


def answer(program: str, fence: str = "python") -> str:
    return f"<think>t</think><answer>```{fence}\n{program}\n```</answer>"


@pytest.mark.parametrize(
    "text, program",
    [
        (answer("print(1)"), "print(1)\n"),
        (answer("print(1)", "py"), "print(1)\n"),
        (answer("print(1)", ""), "print(1)\n"),
        ("<answer>```python\nx = 1\n```\nthen\n```python\nprint(2)\n```</answer>", "print(2)\n"),
        ("<answer>print(3)</answer>", "print(3)"),  # no fence: the whole answer
        ("<answer>```cpp\nint main(){}\n```</answer>", "```cpp\nint main(){}\n```"),
        ("```python\nprint(4)\n```", None),  # no <answer>
        ("<answer>  </answer>", None),
    ],
)
def test_extract_program(text, program):
    assert extract_program(text) == program


@pytest.mark.parametrize(
    "got, expected, same",
    [
        ("1 2\n", "1 2", True),
        ("1 2   \n3\t\n\n\n", "1 2\n3\n", True),
        ("a\r\nb\r\n", "a\nb\n", True),
        ("\na\n", "a\n", False),  # leading lines count
        ("1  2\n", "1 2\n", False),  # inner whitespace counts
        ("", "\n", True),
        ("12\n", "1\n2\n", False),
    ],
)
def test_same_output(got, expected, same):
    assert same_output(got, expected) is same


@needs_bwrap
def test_stdio_scores_all_and_pass_rate():
    half = "a = input().split()\nprint(sum(map(int, a)) if len(a) > 1 else 0)"  # 4 of 5
    programs = [answer("print(sum(map(int, input().split())))"), answer(half), "no answer"]
    columns = dict(inputs=[SUM] * 3, outputs=[SUMS] * 3)
    strict = CodeReward()
    assert strict(programs, **columns) == [1.0, 0.0, 0.0]
    assert strict.pop_metrics() == {
        **dict.fromkeys(code_mod.VERDICTS, 0),
        "passed": 1,
        "wrong_answer": 1,
        "no_code": 1,
    }
    assert strict.pop_metrics()["passed"] == 0  # the counts restart
    rate = CodeReward(CodeSettings(score="pass_rate"))
    assert rate(programs, **columns) == [1.0, 0.8, 0.0]


@needs_bwrap
def test_function_tests_check_asserts_and_lists():
    good = answer("def add(a, b):\n    return a + b")
    bad = answer("def add(a, b):\n    return a * b")  # right for (2, 2) only
    check = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
    asserts = ["assert add(2, 2) == 4\n", "assert add(1, 2) == 3\n", "assert add(0, 5) == 5\n"]
    reward = CodeReward(CodeSettings(score="pass_rate"))
    assert reward([good, bad], test=[check] * 2, entry_point=["add"] * 2) == [1.0, 0.0]
    rates = reward([good, bad], test=[asserts] * 2, entry_point=[None] * 2)
    assert rates == [1.0, pytest.approx(1 / 3)]
    missing = answer("def plus(a, b):\n    return a + b")  # no entry point: NameError
    assert reward([missing], test=[check], entry_point=["add"]) == [0.0]
    counts = reward.pop_metrics()
    assert (counts["passed"], counts["wrong_answer"], counts["runtime_error"]) == (2, 2, 1)


@needs_bwrap
def test_mixed_shapes_and_rows_without_tests():
    """One batch, both shapes and a row with no tests (None: the reward does not apply)."""
    examples = [
        {"prompt": "sum", "inputs": SUM, "outputs": SUMS},
        {"prompt": "add", "test": "assert add(1, 1) == 2\n", "entry_point": "add"},
        {"prompt": "plain", "answer": "4"},
    ]
    columns = reward_columns(examples, 1, [1, 1, 1], [False] * 3, 10)
    texts = [
        answer("print(sum(map(int, input().split())))"),
        answer("def add(a, b):\n    return a + b"),
        answer("print(4)"),
    ]
    assert REWARDS["code"](texts, **columns) == [1.0, 1.0, None]
    rewards, failures = score([resolve_reward("code"), ("format", format_reward)], texts, columns)
    assert rewards[:, 0].tolist()[:2] == [1.0, 1.0] and rewards[2, 0].isnan()


@needs_bwrap
@pytest.mark.parametrize(
    "columns, message",
    [  # one row each
        (dict(inputs=[["1"]], outputs=["1"]), "'outputs' must be a list of strings"),
        (dict(inputs=[["1", "2"]], outputs=[["1"]]), "same nonzero length"),
        (dict(inputs=[[1]], outputs=[["1"]]), "'inputs' must be a list of strings"),
        (dict(test=["def check(candidate):\n    pass\n"], entry_point=[None]), "'entry_point'"),
        (dict(test=["assert (\n"], entry_point=["f"]), "not valid Python"),
    ],
)
def test_malformed_rows_are_errors(columns, message):
    with pytest.raises(ValueError, match=message):
        CodeReward()([answer("print(1)")], **columns)


@needs_bwrap
def test_identical_samples_run_once(monkeypatch):
    calls = []
    real = code_mod._grade

    def counting(sandbox, job, stop):
        calls.append(job.program)
        return real(sandbox, job, stop)

    monkeypatch.setattr(code_mod, "_grade", counting)
    texts = [answer("print(input())")] * 6 + [answer("print(input() + '!')")] * 2
    assert CodeReward()(texts, inputs=[["hi"]] * 8, outputs=[["hi"]] * 8) == [1.0] * 6 + [0.0] * 2
    assert len(calls) == 2


@needs_bwrap
def test_sandbox_failure_scores_none_with_a_warning(monkeypatch):
    def broken(self, *args, **kwargs):
        raise SandboxError("bwrap: Creating new namespace failed")

    monkeypatch.setattr(sandbox_mod.Sandbox, "session", broken)
    reward = CodeReward()
    with pytest.warns(UserWarning, match="sandbox failed on 2 of 2 samples.*namespace"):
        assert reward(
            [answer("print(1)"), answer("print(2)")], inputs=[["x"]] * 2, outputs=[["1"]] * 2
        ) == [None, None]
    assert reward.pop_metrics()["sandbox_error"] == 2


def test_correctness_reward_picks_code():
    fns = [("format", format_reward), resolve_reward("code")]
    assert correctness_reward(fns) is REWARDS["code"]
    assert correctness_reward([("format", format_reward)]) is REWARDS["accuracy"]


# ----------------------------------------------------------------------------------- flags


# Every --code-* flag away from its default (grpo-train, grpo-eval and grpo-sample share them).
CODE_FLAGS = ["--code-score", "pass_rate", "--code-timeout", "2.5", "--code-memory-mb", "512",
              "--code-sandbox", "none"]  # fmt: skip


def test_flags():
    cfg = parse_config([*CODE_FLAGS, "--rewards", "code", "format"])
    d = cfg.data
    assert (d.code_score, d.code_timeout, d.code_memory_mb, d.code_sandbox) == (
        "pass_rate",
        2.5,
        512,
        "none",
    )
    defaults = GRPOConfig.from_flat({}).data
    assert (
        defaults.code_score,
        defaults.code_timeout,
        defaults.code_memory_mb,
        defaults.code_sandbox,
    ) == ("all", 5.0, 1024, "bwrap")
    assert (Limits().timeout, Limits().memory_mb) == (
        defaults.code_timeout,
        defaults.code_memory_mb,
    )
    for bad, message in (
        [{"code_timeout": 0}, "code_timeout"],
        [{"code_timeout": "inf"}, "code_timeout"],
        [{"code_memory_mb": 10}, "code_memory_mb"],
        [{"code_sandbox": "docker"}, "code_sandbox"],
        [{"code_score": "partial"}, "code_score"],
    ):
        with pytest.raises(ValueError, match=message):
            GRPOConfig.from_flat(bad)


def test_eval_and_sample_take_the_code_flags():
    """grpo-eval and grpo-sample have grpo-train's --code-* flags, with its defaults, and the
    code reward they build runs with them."""
    from grpo.cli import sample as sample_cli
    from grpo.cli.args import code_settings
    from grpo.evaluation import reward_functions

    for cli in (eval_cli, sample_cli):
        flags = ["--model", "m", "--output", "o", "--reward", "code", *CODE_FLAGS]
        args = cli.build_parser().parse_args(flags)
        settings = code_settings(args)
        assert (
            settings.score,
            settings.sandbox,
            settings.limits.timeout,
            settings.limits.memory_mb,
        ) == ("pass_rate", "none", 2.5, 512)
        defaults = code_settings(cli.build_parser().parse_args(["--model", "m", "--output", "o"]))
        assert defaults == CodeSettings()
    with pytest.warns(UserWarning, match="--code-sandbox none"):
        fns = dict(reward_functions(None, ["code"], settings))
    assert fns["code"].settings == settings


# ------------------------------------------------------------------------- examples/code


@needs_bwrap
def test_examples_dataset():
    """20-40 problems of both shapes, each with a reference completion that passes its tests
    in the sandbox and the format reward; eval problems never appear in train."""
    train, evals = load_jsonl(EXAMPLES / "train.jsonl"), load_jsonl(EXAMPLES / "eval.jsonl")
    assert 20 <= len(train) + len(evals) <= 40
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in evals}
    for rows in (train, evals):
        assert {"inputs" in r for r in rows} == {True, False}  # both shapes in each split
        texts = [r["completion"] for r in rows]
        assert [extract_program(t).strip() for t in texts] == [r["solution"] for r in rows]
        columns = reward_columns(rows, 1, [1] * len(rows), [False] * len(rows), 10)
        assert CodeReward()(texts, **columns) == [1.0] * len(rows)
        assert format_reward(texts) == [1.0] * len(rows)


TRAIN = ["--data", str(EXAMPLES / "train.jsonl"), "--rewards", "code", "format"]
FAST = dict(
    steps=1,
    sft_steps=2,
    prompts_per_step=2,
    num_generations=2,
    max_completion_length=16,
    eval_size=4,
    micro_batch_size=4,
    progress=False,
    dynamic_sampling=False,
    code_timeout=2.0,
)


def _config(tmp_path, **overrides) -> GRPOConfig:
    return GRPOConfig.from_flat(
        {
            **FAST,
            "data": str(EXAMPLES / "train.jsonl"),
            "rewards": ["code", "format"],
            "output_dir": str(tmp_path / "run"),
            **overrides,
        }
    )


def test_train_without_bwrap_stops_before_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox_mod, "_PROBES", {})
    from grpo.cli.train import main

    assert main([*TRAIN, "--eval-size", "4", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "apt-get install bubblewrap" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing written, no model built or loaded


def test_train_with_sandbox_none_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # not needed for "none"
    with pytest.warns(UserWarning, match="--code-sandbox none"):
        build_trainer(_config(tmp_path, code_sandbox="none", steps=0, sft_steps=0))


@needs_bwrap
def test_one_grpo_step_on_examples(tmp_path):
    """grpo-train --data examples/code/train.jsonl --rewards code format: the cold start on
    the dataset's own completions (held-out rows excluded), a GRPO step, the code metrics."""
    trainer = build_trainer(_config(tmp_path, code_score="pass_rate"))
    (code,) = [fn for name, fn in trainer.reward_fns if name == "code"]
    assert code.settings.score == "pass_rate" and code.settings.limits.timeout == 2.0
    summary = trainer.train()
    assert summary["grpo_steps"] == 1 and summary["eval_size"] == 4
    (line,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert line["accuracy"] == line["reward/code"]
    counts = {v: line[f"code/{v}"] for v in code_mod.VERDICTS}
    assert sum(counts.values()) == 4  # 2 prompts x 2 completions, one verdict each
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["code_score"] == "pass_rate"


@needs_bwrap
def test_sft_and_eval_on_examples(tmp_path, capsys):
    """The worked example's other commands: grpo-sft on the reference completions, then
    grpo-eval pass@k with --reward code."""
    model = tmp_path / "sft"
    assert (
        sft_cli.main(
            [
                "--data",
                str(EXAMPLES / "train.jsonl"),
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--output-dir",
                str(model),
            ]
        )
        == 0
    )
    report = tmp_path / "eval.json"
    assert (
        eval_cli.main(
            [
                "--model",
                str(model),
                "--data",
                str(EXAMPLES / "eval.jsonl"),
                "--reward",
                "code",
                "--samples",
                "2",
                "--max-completion-length",
                "16",
                "--no-progress",
                "--output",
                str(report),
            ]
        )
        == 0
    )
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["prompts"] == 8 and {"pass@1", "pass@2", "cons@2", "reward/code"} <= set(metrics)
    assert json.loads(report.read_text())["settings"]["rewards"] == ["code", "format"]


def test_eval_without_code_reward_needs_answers(tmp_path):
    model = make_tiny(tmp_path / "m")
    assert (
        eval_cli.main(
            [
                "--model",
                str(model),
                "--data",
                str(EXAMPLES / "eval.jsonl"),
                "--samples",
                "1",
                "--no-progress",
                "--output",
                str(tmp_path / "r.json"),
            ]
        )
        == 2
    )


@needs_bwrap
def test_benchmark_smoke(capsys):
    """benchmarks/bench_code_reward.py end to end on 8 completions (no timing claims)."""
    from benchmarks import bench_code_reward

    rows = bench_code_reward.main(
        ["--smoke", "--providers", "bwrap,plain", "--workloads", "correct,timeouts"]
    )
    assert {(r["provider"], r["workload"]) for r in rows} == {
        (p, w) for p in ("bwrap", "plain") for w in ("correct", "timeouts")
    }
    assert all(r["completions_per_s"] > 0 for r in rows)
    assert "vs_plain" in capsys.readouterr().out
