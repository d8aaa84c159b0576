"""The benchmark scripts run end to end on tiny shapes (no timing claims, no CSV written),
so they cannot rot while no GPU is at hand; so does the whole GPU proof, gpu_checks.sh, in its
--cpu-smoke mode."""

from __future__ import annotations

import csv
import importlib
import io
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch


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


def test_bench_step_packed_and_padded_long_tail(tmp_path):
    """--lengths lognormal cuts the sampled completions (the training passes see a long
    tail); ours packs by default, ours-padded does not."""
    from benchmarks import bench_step, common

    rows = bench_step.main(["--tiny", "--model", "dense", "--providers", "ours,ours-padded",
                            "--lengths", "lognormal", "--tokens", "16", "--warmup", "0",
                            "--no-isolate", "--no-save", "--plot", str(tmp_path / "s.png")])
    assert [r["provider"] for r in rows] == ["ours", "ours-padded"]
    assert all(r["shape"] == "2x2x16-lognormal" for r in rows)
    assert "+packing" in rows[0]["engine"] and "+packing" not in rows[1]["engine"]
    lengths = common.lognormal_lengths(
        4096, median=4, sigma=1.0, cap=16, generator=torch.Generator().manual_seed(0)
    )
    assert lengths.min() >= 1 and lengths.max() == 16 and lengths.float().median() == 4


def test_bench_step_trl_tiny(tmp_path, capsys):
    """TRL's GRPOTrainer on the same tiny model and settings, when trl is installed."""
    pytest.importorskip("trl")
    from benchmarks import bench_step

    rows = bench_step.main(["--tiny", "--model", "dense", "--providers", "trl", "--warmup", "0",
                            "--no-isolate", "--no-save"])
    out = capsys.readouterr().out
    assert [r["provider"] for r in rows] == ["trl"], out
    assert rows[0]["generate_s"] > 0 and rows[0]["update_s"] > 0


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the CPU smoke runs the kernels in the interpreter")
def test_gpu_checks_cpu_smoke(tmp_path):
    """bash benchmarks/gpu_checks.sh --cpu-smoke: every stage, the CSVs tagged with the run,
    the summary of every target, the log and the tarball in $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECKS_RUN": "ci-smoke", "GIT_SHA": "abc123"}
    env.pop("BENCH_RESULTS_DIR", None)
    done = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    for line in ("=== tests: done", "=== kernels: done", "=== step: done",
                 "no nvidia-smi: no GPU here"):
        assert line in out, line
    assert "peer liger-kernel" in out and "peer trl" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu-checks.log", "gpu-checks.tgz", "summary.txt"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "run ci-smoke on cpu" in summary and "git abc123" in summary
    # check, measured, target, verdict, detail: columns two spaces or more apart
    table = {parts[0]: parts[1:] for parts in (re.split(r"\s{2,}", line.strip())
                                                for line in summary.splitlines())}
    computable = ["tests failed (gpu-marked + CUDA kernel pass)",
                  "grpo_loss token fwd+bwd / clone", "grpo_loss sequence fwd+bwd / clone",
                  "token_logprobs / one read (clone / 2)", "linear_grpo_loss H=896 / GEMMs alone",
                  "linear_grpo_loss H=3584 / GEMMs alone", "transformers grouped_mm / moe_experts"]
    if importlib.util.find_spec("trl") is not None:
        computable.append("GRPO step ours / TRL (seconds)")
    for name in computable:  # a number on a CPU too (Liger and peak memory need CUDA)
        assert name in table and float(table[name][0]) >= 0, (name, summary)
    assert table[computable[0]][0] == "0.000", summary
    assert table["Liger / grpo_loss token"][:3] == ["-", ">= 1.4", "missing"], summary
    assert "stage kernels: ok" in summary and "stage step: ok" in summary
    with tarfile.open(tmp_path / "gpu-checks.tgz") as tar:
        names = tar.getnames()
        assert any(n.endswith("logs/kernels.log") for n in names), names
        assert any(n.endswith("logs/tests.xml") for n in names), names
        rows = {}
        for op in ("grpo_loss", "logprobs", "linear_grpo_loss", "moe", "step"):
            member = next(n for n in names if n.endswith(f"/{op}.csv"))
            rows[op] = list(csv.DictReader(io.TextIOWrapper(tar.extractfile(member))))
    for op, op_rows in rows.items():
        assert op_rows and all(r["run"] == "ci-smoke" and r["git_sha"] == "abc123"
                               and r["gpu"] == "cpu" and r["torch"] and r["triton"]
                               for r in op_rows), op
    providers = {r["provider"] for r in rows["grpo_loss"]}
    assert {"clone", "ours", "ours_inplace"} <= providers
    assert {r["provider"] for r in rows["moe"]} == {"hf_grouped_mm", "ours"}
    assert {r["provider"] for r in rows["step"]} >= {"ours", "ours-logits"}
    # Nothing landed in the repository's own results.
    assert not any(r.get("run") == "ci-smoke" for r in _results_rows(REPO / "benchmarks/results"))


def _results_rows(folder: Path) -> list[dict]:
    rows = []
    for path in folder.glob("*.csv"):
        with path.open(newline="") as f:
            rows += list(csv.DictReader(f))
    return rows
