"""The embedded default (`grpo-train` with no arguments), shortened to a few steps: every file
of the run directory is written, with the keys people and scripts read. The full learning
check (held-out accuracy over seeds) is too long for CI: benchmarks/demo_seeds.py runs it
and benchmarks/results/demo_seeds.csv holds its figures."""

from __future__ import annotations

import json
import subprocess
import sys

from grpo.checkpoint import find_checkpoint
from grpo.metrics import read_metrics
from grpo.models import load_model

from .runs import REPO

SHORT = ["--steps", "3", "--sft-steps", "4", "--eval-size", "12", "--prompts-per-step", "4",
         "--no-progress"]


def test_shortened_default_writes_the_whole_run_directory(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "grpo.cli.train", *SHORT, "--output-dir",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    # .grpo-train.lock: the run directory's lock, kept (see files.lock_directory)
    assert names == [".grpo-train.lock", "checkpoint", "cold-start", "config.json", "curves.png",
                     "final", "init-model", "metrics.jsonl", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("accuracy_before_grpo", "accuracy_after_grpo", "format_before_grpo",
                "format_after_grpo", "grpo_steps", "eval_size", "seconds", "seconds_wall",
                "device", "processes"):
        assert key in summary, key
    assert summary["grpo_steps"] == 3 and summary["eval_size"] == 12
    assert summary["seconds_wall"] > summary["seconds"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["steps"] == 3 and config["data"]["template"] == "short"  # DEMO
    lines = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(0.0 <= m["format"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0 for m in lines)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert find_checkpoint(out) == out / "checkpoint"
    for model_dir in ("init-model", "cold-start", "final"):
        model, _ = load_model(out / model_dir, device="cpu")
        assert model.config.model_type == "qwen2", model_dir
    assert "held-out accuracy before GRPO" in done.stdout
