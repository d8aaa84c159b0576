"""Bad input that once ended in a traceback: each is one line on stderr naming the problem,
exit status 2, and nothing written."""

from __future__ import annotations

import sys

import pytest

import grpo.cli.eval
import grpo.cli.sft
from grpo.models import make_tiny

from .runs import train_in_process as _train


def test_sft_data_rows_without_completion(tmp_path, capsys):
    rows = tmp_path / "sft.jsonl"
    rows.write_text('{"prompt": "1+1", "completion": "2"}\n{"prompt": "2+2"}\n')
    code, err = _train(capsys, tmp_path / "run", "--sft-data", str(rows))
    assert code == 2 and f"{rows}:2: needs a string 'completion', got none" in err, err
    code = grpo.cli.sft.main(["--data", str(rows), "--output-dir", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and f"{rows}:2: needs a string 'completion'" in err, err
    assert not (tmp_path / "m").exists()


def test_unknown_task_option(tmp_path, capsys):
    code, err = _train(capsys, tmp_path / "run", "--task-args", '{"digitz": 3}')
    assert code == 2, err
    assert "task 'arithmetic' has no option 'digitz'; its options: digits" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("source,what", [
    ("def r(completions, **kw:\n", "SyntaxError"),
    ("raise RuntimeError('not today')\n", "RuntimeError: not today"),
    ("import no_such_module_anywhere\n", "cannot import module"),
])
def test_reward_module_that_fails_to_import(tmp_path, capsys, monkeypatch, source, what):
    (tmp_path / "broken_reward.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_reward", raising=False)
    code, err = _train(capsys, tmp_path / "run", "--rewards", "broken_reward:r")
    assert code == 2 and "reward 'broken_reward:r'" in err and what in err, err


def test_reward_that_mutates_its_inputs(tmp_path, capsys, monkeypatch):
    (tmp_path / "mutating_reward.py").write_text(
        "def r(completions, answer, **kw):\n"
        "    answer[0] = 'forged'\n"
        "    return [1.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = _train(capsys, tmp_path / "run", "--rewards", "mutating_reward:r", "accuracy")
    assert code == 2 and "reward 'r' modified its arguments (answer)" in err, err


def test_output_path_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine\n")
    code, err = _train(capsys, blocker / "run")
    assert code == 2 and f"{blocker} is a file, not a directory" in err, err
    assert blocker.read_text() == "mine\n"
    model = make_tiny(tmp_path / "m")
    code = grpo.cli.eval.main(["--model", str(model), "--samples", "1", "--num-prompts", "2",
                               "--output", str(blocker / "eval.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{blocker} is a file, not a directory" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("device", ["gpu0", "meta", "cuda:x"])
def test_bad_device(tmp_path, capsys, device):
    code, err = _train(capsys, tmp_path / "run", "--device", device)
    assert code == 2 and f"device {device!r}: expected auto, cpu, cuda or cuda:N" in err, err
    assert not (tmp_path / "run").exists()


def test_directory_given_as_a_file(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    code, err = _train(capsys, tmp_path / "run", "--config", str(folder))
    assert code == 2 and f"config file {folder} is a directory, not a YAML or JSON file" in err
    for flag in ("--data", "--sft-data"):
        code, err = _train(capsys, tmp_path / "run", flag, str(folder))
        assert code == 2 and f"{flag} {str(folder)!r} is a directory, not a JSONL file" in err
    assert not (tmp_path / "run").exists()
