"""Load time and peak memory: grpo.models.load_model vs transformers' from_pretrained.

    python -m benchmarks.bench_load [--device cuda] [--dtype bf16] [--smoke]

Each load runs in a fresh subprocess so that peak host memory (ru_maxrss) belongs to that
load alone; the RSS after imports is subtracted. The checkpoints are built locally once
(random weights, HF layout, 2 GB shards): a dense Qwen2 of about 1.8 GB and a Qwen3-MoE
of about 1.6 GB in bf16 (--smoke: tiny ones).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import common

CHECKPOINTS = {  # name -> make_tiny arguments
    "dense-1.8GB": dict(kind="dense", family="qwen2", hidden=2048, layers=24),
    "moe-1.6GB": dict(kind="moe", family="qwen3_moe", hidden=1024, layers=8, experts=64),
}
SMOKE_CHECKPOINTS = {
    "dense-tiny": dict(kind="dense", family="qwen2"),
    "moe-tiny": dict(kind="moe", family="qwen3_moe"),
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(provider: str, path: str, device: str, dtype: str) -> None:
    """Runs in the subprocess: one load, then a JSON line with its figures."""
    from transformers import AutoModelForCausalLM

    from grpo.models import load_model

    torch_dtype = common.DTYPES[dtype]
    base = _rss_mib()
    if device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if provider == "ours":
        model, _ = load_model(path, dtype=torch_dtype, device=device)
    elif device == "cpu" or importlib.util.find_spec("accelerate") is None:
        # device_map needs accelerate; without it transformers loads on the host first.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "seconds": seconds, "peak_host_extra_mib": _rss_mib() - base,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0,
        "params_m": n_params / 1e6,
    }))


def build(name: str, spec: dict, root: Path, dtype: torch.dtype) -> Path:
    from grpo.models import make_tiny

    path = root / name
    if not (path / "config.json").is_file():
        print(f"building {name} in {path} ...", flush=True)
        make_tiny(path, dtype=dtype, max_shard_size="2GB", **spec)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    parser.add_argument("--root", default="/tmp/grpo-bench-load", help="checkpoint cache dir")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoints, no CSV")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("PROVIDER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], args.device, args.dtype)
        return

    specs = SMOKE_CHECKPOINTS if args.smoke else CHECKPOINTS
    rows = []
    for name, spec in specs.items():
        path = build(name, spec, Path(args.root), common.DTYPES[args.dtype])
        for provider in ("transformers", "ours"):
            cmd = [sys.executable, "-m", "benchmarks.bench_load", "--device", args.device,
                   "--dtype", args.dtype, "--worker", provider, str(path)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO_ROOT)
            if done.returncode != 0:
                print(f"note: {provider} failed on {name}:\n{done.stderr[-2000:]}")
                continue
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"provider": provider, "shape": name, "dtype": args.dtype,
                         "device": args.device, **figures})
    common.print_table(rows)
    if rows and not (args.smoke or args.no_save):
        print("results:", common.append_results("load", rows))


if __name__ == "__main__":
    main()
