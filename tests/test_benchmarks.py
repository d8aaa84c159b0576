"""The benchmark scripts run end to end on tiny shapes (no timing claims, no CSV written),
so they cannot rot while no GPU is at hand."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("script", ["bench_grpo_loss", "bench_logprobs", "bench_advantages",
                                    "bench_moe", "bench_linear_grpo_loss"])
def test_smoke_run(script, capsys):
    bench = importlib.import_module(f"benchmarks.{script}")
    ours = "fused_ours" if script == "bench_linear_grpo_loss" else "ours"
    bench.main(["--smoke", "--providers", f"eager,{ours}", "--warmup", "1", "--rep", "1"])
    out = capsys.readouterr().out
    assert ours in out and "eager" in out
    assert "note:" not in out.replace("note: compile", ""), out


def test_bench_step_tiny(tmp_path, capsys):
    """One tiny GRPO step of our trainer on the CPU, and its phase chart."""
    from benchmarks import bench_step

    plot = tmp_path / "step.png"
    rows = bench_step.main(["--tiny", "--model", "dense", "--providers", "ours", "--warmup", "0",
                            "--no-isolate", "--no-save", "--plot", str(plot)])
    assert [(r["model"], r["provider"]) for r in rows] == [("dense", "ours")]
    row = rows[0]
    assert row["steps"] == 1 and row["shape"] == "2x2x8"
    phases = row["generate_s"] + row["logprobs_s"] + row["update_s"]
    assert 0 < phases <= row["step_s"] * 1.01
    assert row["gen_tokens_per_s"] > 0
    assert plot.stat().st_size > 0
    assert "note:" not in capsys.readouterr().out


def test_bench_step_trl_tiny(tmp_path, capsys):
    """TRL's GRPOTrainer on the same tiny model and settings, when trl is installed."""
    pytest.importorskip("trl")
    from benchmarks import bench_step

    rows = bench_step.main(["--tiny", "--model", "dense", "--providers", "trl", "--warmup", "0",
                            "--no-isolate", "--no-save"])
    out = capsys.readouterr().out
    assert [r["provider"] for r in rows] == ["trl"], out
    assert rows[0]["generate_s"] > 0 and rows[0]["update_s"] > 0
