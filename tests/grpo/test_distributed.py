"""Data-parallel GRPO under torchrun (FSDP2, gloo on CPU) against one process.

The runs use tests/grpo/dist_worker.py: a fake engine whose completions depend only on the
prompt, so one process and two see the same global batch of 4 prompts x 4 completions. Two
processes must then give the same advantages, losses, gradient norms and parameters.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.models import make_tiny

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--steps", "2", "--beta", "0.04", "--num-iterations", "2"]


def _run(procs: int, out: Path, model: Path, *flags: str) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={procs}"] if procs > 1 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the reference path: this is about the loop, not kernels
    done = subprocess.run([*launcher, "-m", "tests.grpo.dist_worker", str(out), str(model),
                           "--kernel-backend", "reference", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(Path(f"{out}.record.json").read_text())


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in glob.glob(str(directory / "*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("dist") / "model", family="qwen2", hidden=64,
                     layers=2)


@pytest.fixture(scope="module")
def one_process(model, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """One-process baselines, per loss type."""
    runs = {}
    for loss_type, extra in (("dapo", ["--scale-rewards", "batch"]), ("grpo", [])):
        out = tmp_path_factory.mktemp(f"one-{loss_type}") / "run"
        runs[loss_type] = out, _run(1, out, model, *COMMON, "--loss-type", loss_type, *extra)
    return runs


def _assert_same_run(a: dict, b: dict, out_a: Path, out_b: Path, init: Path) -> None:
    assert len(a["steps"]) == len(b["steps"]) == 2
    for sa, sb in zip(a["steps"], b["steps"], strict=True):
        torch.testing.assert_close(torch.tensor(sb["advantages"]), torch.tensor(sa["advantages"]),
                                   rtol=0, atol=1e-6)
        for key in ("loss", "kl", "grad_norm", "reward"):
            assert sb[key] == pytest.approx(sa[key], rel=1e-5, abs=1e-7), key
    wa, wb, w0 = _weights(out_a / "final"), _weights(out_b / "final"), _weights(init)
    assert wa.keys() == wb.keys() == w0.keys()
    moved = max(float((wa[k] - w0[k]).abs().max()) for k in wa)
    assert moved > 1e-3  # training changed the weights, so agreeing below means something
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_processes_match_one(model, one_process, tmp_path, loss_type):
    out_one, one = one_process[loss_type]
    extra = ["--scale-rewards", "batch"] if loss_type == "dapo" else []
    two = _run(2, tmp_path / "two", model, *COMMON, "--loss-type", loss_type, *extra)
    assert two["world"] == 2 and one["world"] == 1
    assert two["greedy"] == one["greedy"] and any(one["greedy"])  # decoding with FSDP
    assert two["syncs"] == 2  # the engine heard of every GRPO step
    assert all(step["rows"] == [8, 8] for step in two["steps"])  # groups kept whole per rank
    _assert_same_run(one, two, out_one, tmp_path / "two", model)
    # Logs and the summary come from rank 0 only: one line per step.
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_with_another_world_size(model, one_process, tmp_path, first, then):
    """A checkpoint of a `first`-process run, resumed by `then` processes, continues exactly:
    one format at every world size (dcp/ holds one shard file per process), resharded."""
    out_one, one = one_process["dapo"]
    out = tmp_path / "run"
    flags = [*COMMON, "--loss-type", "dapo", "--scale-rewards", "batch"]
    _run(first, out, model, *flags[:1], "1", *flags[2:])
    assert len(list((out / "checkpoint" / "dcp").glob("*.distcp"))) == first
    resumed = _run(then, out, model, *flags, "--resume", "--resume-override", "steps")
    assert len(resumed["steps"]) == 1
    second = resumed["steps"][0]
    for key in ("loss", "kl", "grad_norm"):
        assert second[key] == pytest.approx(one["steps"][1][key], rel=1e-5), key
    wa, wb = _weights(out_one / "final"), _weights(out / "final")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)


def test_unequal_batches_do_not_hang(model, tmp_path):
    """Dynamic sampling keeps 4 rows on one rank and 8 on the other in a step: the short rank
    runs zero-weight micro-batches so that FSDP's collectives still meet. In bf16 compute."""
    record = _run(2, tmp_path / "run", model, "--steps", "3",
                  "--rewards", "tests.grpo.dist_worker:sparse_reward", "--dynamic-sampling",
                  "--max-sampling-rounds", "2", "--dtype", "bf16")
    rows = [step["rows"] for step in record["steps"]]
    assert any(r[0] != r[1] for r in rows), rows
    assert all(s["grad_norm"] == s["grad_norm"] for s in record["steps"])  # no NaN
    # Mixed precision: fp32 master weights, bf16 compute, and final/ saved in bf16.
    final = _weights(tmp_path / "run" / "final")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}


def test_lora_two_processes_match_one(model, tmp_path):
    """LoRA under FSDP2 (gloo): the adapters are sharded with their decoder layers, the
    reference is the policy with its adapters off, and two processes give one process's
    advantages, losses, KL, gradient norms and merged final weights."""
    flags = [*COMMON, "--loss-type", "dapo", "--lora-rank", "4", "--learning-rate", "1e-2"]
    one = _run(1, tmp_path / "one", model, *flags)
    two = _run(2, tmp_path / "two", model, *flags)
    assert two["world"] == 2 and two["greedy"] == one["greedy"]
    _assert_same_run(one, two, tmp_path / "one", tmp_path / "two", model)
    assert len(list((tmp_path / "two" / "checkpoint" / "dcp").glob("*.distcp"))) == 2
    for run in ("one", "two"):  # adapter-only checkpoints; final/ merged plus PEFT's adapter
        assert (tmp_path / run / "checkpoint" / "adapter" / "adapter_config.json").is_file()
        assert not (tmp_path / run / "checkpoint" / "model").exists()
    aa = load_file(tmp_path / "one" / "final" / "adapter" / "adapter_model.safetensors")
    ab = load_file(tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors")
    assert aa.keys() == ab.keys() and all(k.startswith("base_model.model.") for k in aa)
    for k in aa:
        torch.testing.assert_close(ab[k], aa[k], rtol=0, atol=1e-5, msg=k)
