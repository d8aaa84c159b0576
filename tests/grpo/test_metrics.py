"""RunLogger: one strict-JSON line per step, truncation on resume, the progress bar, optional
TensorBoard (present, fake, or missing) and the curves PNG."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo.metrics import RunLogger, _postfix, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _hidden(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))


def test_one_json_line_per_step_with_nan_as_null(tmp_path):
    with RunLogger(tmp_path, 3, show_progress=False) as logger:
        logger.log(1, {"reward": 0.5, "count": 3, "kl": torch.tensor(0.25)})
        logger.log(2, {"reward": float("nan"), "kl": np.float32(0.125), "inf": float("inf")})
        # Flushed per line: readable while the run is still going.
        assert [r["step"] for r in _lines(tmp_path)] == [1, 2]
        logger.log(3, {"reward": torch.tensor([1.0])})
    lines = _lines(tmp_path)
    assert lines[0] == {"step": 1, "reward": 0.5, "count": 3.0, "kl": 0.25}
    assert lines[1] == {"step": 2, "reward": None, "kl": 0.125, "inf": None}
    assert lines[2] == {"step": 3, "reward": 1.0}
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(records[1]["reward"]) and records[0]["count"] == 3.0


def test_rejects_values_that_are_not_scalars(tmp_path):
    with RunLogger(tmp_path, 3, show_progress=False) as logger:
        with pytest.raises(TypeError, match="'x'"):
            logger.log(1, {"x": torch.ones(2)})
        with pytest.raises(TypeError, match="'name'"):
            logger.log(1, {"name": "abc"})
        with pytest.raises(ValueError, match="step"):
            logger.log(1, {"step": 1})


def test_resume_drops_lines_after_the_checkpoint(tmp_path):
    with RunLogger(tmp_path, 10, show_progress=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # a line torn by a crash mid-write
    with RunLogger(tmp_path, 10, start_step=3, show_progress=False) as logger:
        assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3]
        logger.log(4, {"reward": 0.9})
    assert [(r["step"], r["reward"]) for r in _lines(tmp_path)] == \
        [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.9)]
    assert _hidden(tmp_path) == []  # the rewrite's temp file is gone


def test_fresh_run_starts_an_empty_file(tmp_path):
    with RunLogger(tmp_path, 3, show_progress=False) as logger:
        logger.log(1, {"reward": 1.0})
    with RunLogger(tmp_path, 3, show_progress=False) as logger:
        logger.log(1, {"reward": 2.0})
    assert _lines(tmp_path) == [{"step": 1, "reward": 2.0}]


def test_read_metrics_names_a_corrupt_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_plot_writes_a_png(tmp_path):
    run_dir = tmp_path / "my-run"
    with RunLogger(run_dir, 6, show_progress=False) as logger:
        for step in range(1, 7):
            logger.log(step, {
                "reward": step / 6, "reward/accuracy": step / 12, "reward/format": 0.5,
                "accuracy": step / 8, "kl": 0.01 * step,
                "completion_length": 20.0 + step, "completion_length_max": 40.0,
            })
            if step % 3 == 0:
                logger.log(step, {"eval_accuracy": step / 7})
        out = logger.plot()
        assert out == run_dir / "curves.png"
        assert out.read_bytes()[:8] == PNG_MAGIC
        other = logger.plot(tmp_path / "plots" / "other.png")
        assert other.read_bytes()[:8] == PNG_MAGIC
    assert _hidden(run_dir) == [] and _hidden(tmp_path / "plots") == []


def test_plot_with_missing_keys_and_no_lines(tmp_path):
    with RunLogger(tmp_path, 3, show_progress=False) as logger:
        assert logger.plot().read_bytes()[:8] == PNG_MAGIC  # nothing logged yet
        logger.log(1, {"loss": 0.3})  # none of the plotted keys
        assert logger.plot().read_bytes()[:8] == PNG_MAGIC


def test_tensorboard_missing_warns_once_and_goes_on(tmp_path, monkeypatch, capsys):
    # None in sys.modules makes `import torch.utils.tensorboard` raise ImportError.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with RunLogger(tmp_path, 3, tensorboard=True, show_progress=False) as logger:
        logger.log(1, {"reward": 1.0})
        logger.log(2, {"reward": 0.0})
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and "tensorboard" in out
    assert len(_lines(tmp_path)) == 2


def test_tensorboard_gets_every_scalar(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    with RunLogger(tmp_path, 9, start_step=4, tensorboard=True, show_progress=False) as logger:
        logger.log(5, {"reward": torch.tensor(0.5), "kl": 0.25})
    assert calls == [("init", str(tmp_path / "tensorboard"), 5), ("reward", 0.5, 5),
                     ("kl", 0.25, 5), ("close",)]


def test_progress_bar_disabled_writes_nothing(tmp_path, capsys):
    with RunLogger(tmp_path, 3, show_progress=False) as logger:
        for step in range(1, 4):
            logger.log(step, {"reward": 0.5, "accuracy": 0.25, "kl": 0.001, "tokens_per_s": 99})
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_shows_the_watched_figures(tmp_path, capsys):
    with RunLogger(tmp_path, 4, start_step=1, show_progress=True) as logger:
        logger.log(2, {"reward": 0.5, "accuracy": 0.25, "kl": 0.00123, "tokens_per_s": 1234.5})
        logger.message("evaluating")
        assert logger._bar.n == 2
    captured = capsys.readouterr()
    assert "evaluating" in captured.out
    assert "reward=0.5 acc=25.0% kl=0.0012 tok/s=1.23k" in captured.err
    assert "evaluating" not in captured.err  # message goes around the bar, not into it


def test_postfix_formats():
    assert _postfix({"loss": 1.0}) == ""
    assert _postfix({"reward": 12.3456, "tokens_per_s": 2.5e6}) == "reward=12.3 tok/s=2.5M"
    assert _postfix({"accuracy": float("nan")}) == "acc=nan"
