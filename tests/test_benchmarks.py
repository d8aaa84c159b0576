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
