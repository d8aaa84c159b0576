"""The embedded default (`grpo-train` with no arguments) over several seeds, side by side.

    python -m benchmarks.demo_seeds --seeds 0-4 --jobs 2 --label baseline
    python -m benchmarks.demo_seeds --seeds 0-4 --label "beta 0.04" -- --beta 0.04

Each seed runs as its own `grpo-train` process with one thread (OMP/MKL and torch), `--jobs`
at a time, in a fresh directory under --runs; the extra flags after `--` change the
configuration tried. One row per seed is appended to benchmarks/results/demo_seeds.csv:
label, flags, seed, held-out greedy accuracy before and after GRPO, the gain in points, the
run's own seconds and the whole command's wall seconds, the machine and the git sha. The
demo is sensitive to small numeric changes, so every configuration tried goes in the CSV,
kept or not: the next person does not repeat it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CSV = REPO / "benchmarks" / "results" / "demo_seeds.csv"
FIELDS = ["label", "flags", "seed", "accuracy_before_grpo", "accuracy_after_grpo", "gain_points",
          "seconds", "seconds_wall", "threads", "machine", "git_sha", "date"]  # fmt: skip


def seeds(spec: str) -> list[int]:
    """"0-4" or "0,2,5" -> the seeds."""
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def run_seed(seed: int, flags: list[str], runs: Path, threads: int) -> dict:
    out = runs / f"seed{seed}"
    if out.exists():
        shutil.rmtree(out)  # our own scratch directory, made by an earlier call of this script
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "grpo.cli.train", "--seed", str(seed), "--output-dir",
           str(out), "--no-progress", *flags]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"seed {seed} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["accuracy_before_grpo"], summary["accuracy_after_grpo"]
    return {
        "seed": seed,
        "accuracy_before_grpo": round(before, 4),
        "accuracy_after_grpo": round(after, 4),
        "gain_points": round(100 * (after - before), 1),
        "seconds": round(summary["seconds"], 1),
        "seconds_wall": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at once")
    parser.add_argument("--threads", type=int, default=1, help="threads per seed")
    parser.add_argument("--label", required=True, help="what this configuration is")
    parser.add_argument("--runs", default="/tmp/demo-seeds", help="scratch run directories")
    parser.add_argument("--csv", default=str(CSV))
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: run_seed(s, extra, runs, args.threads), seeds(args.seeds)))
    path = Path(args.csv)
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({"label": args.label, "flags": " ".join(extra), **row,
                             "threads": args.threads, "machine": machine, "git_sha": sha,
                             "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")})
    for row in rows:
        print(f"seed {row['seed']}: {100 * row['accuracy_before_grpo']:.1f}% -> "
              f"{100 * row['accuracy_after_grpo']:.1f}% ({row['gain_points']:+.1f} points, "
              f"{row['seconds_wall']:.0f} s wall)")
    gains = [r["gain_points"] for r in rows]
    print(f"{args.label}: min gain {min(gains):+.1f}, mean {sum(gains) / len(gains):+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
