"""The GPU proof's kernel stage and its summary (driven by benchmarks/gpu_checks.sh).

    python -m benchmarks.proof kernels [--smoke] [--warmup MS] [--rep MS]
    python -m benchmarks.proof summary [--run ID] [--logs DIR]

`kernels` runs every kernel benchmark the proof needs in this one process, most important
first (a stage cut short by its time limit keeps what it finished: each benchmark appends its
rows as soon as it ends): grpo_loss token level (beta 0.04) and sequence level against Liger
and the clone floor, token_logprobs against one read, linear_grpo_loss (N=8192, V=151936,
H=896 and 3584) against its GEMMs alone, materialised logits and Liger's fused linear GRPO,
and moe_experts on a Qwen3-30B-A3B layer at 16k tokens against transformers' grouped_mm.
`--smoke` runs the same on tiny shapes on a CPU (the Triton interpreter).

`summary` reads the rows of one run (GPU_CHECKS_RUN, or --run) from benchmarks/results/*.csv
and the test logs, and prints each target of issue 15 as a ratio measured in that run.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import sys
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common  # first: it picks the Triton interpreter without a GPU

GRPO = "8x1024x151936"
LINEAR = ("8192x896x151936", "8192x3584x151936")
MOE = "16384x2048x768x128x8"  # Qwen3-30B-A3B: H 2048, expert width 768, 128 experts, top-8
# --smoke: the same runs at shapes the interpreter gets through in seconds (odd V and H).
SMOKE = {GRPO: "2x4x300", LINEAR[0]: "8x24x130", LINEAR[1]: "8x40x130", MOE: "6x16x16x4x2"}
GRPO_PROVIDERS = "clone,ours,ours_inplace,liger,liger_inplace"
LINEAR_PROVIDERS = "gemms,materialised_ours,fused_ours,liger"


def kernel_runs() -> list[tuple[str, list[str]]]:
    """(bench module, its arguments), in the order they run."""
    return [
        ("bench_grpo_loss", ["--shapes", GRPO, "--beta", "0.04", "--providers", GRPO_PROVIDERS]),
        ("bench_logprobs", ["--shapes", GRPO, "--providers", "read,clone,ours,liger"]),
        ("bench_grpo_loss", ["--shapes", GRPO, "--beta", "0.04", "--importance-level",
                             "sequence", "--providers", GRPO_PROVIDERS]),
        ("bench_linear_grpo_loss", ["--shapes", LINEAR[0], "--providers", LINEAR_PROVIDERS]),
        ("bench_moe", ["--shapes", MOE, "--providers", "hf_grouped_mm,ours"]),
        ("bench_linear_grpo_loss", ["--shapes", LINEAR[1], "--providers", LINEAR_PROVIDERS]),
    ]


def run_kernels(smoke: bool, warmup: int, rep: int) -> int:
    failed = []
    for name, argv in kernel_runs():
        if smoke:  # tiny shapes, saved all the same so that the summary has rows to read
            argv = [SMOKE.get(a, a) for a in argv] + ["--smoke", "--save"]
        argv += ["--warmup", str(warmup), "--rep", str(rep)]
        print(f"\n=== {name} {' '.join(argv)}", flush=True)
        try:
            importlib.import_module(f"benchmarks.{name}").main(argv)
        except Exception:  # one broken benchmark must not cost the others their turn
            traceback.print_exc()
            failed.append(name)
        finally:
            common._release_memory()
    if failed:
        print(f"kernels: failed: {', '.join(failed)}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- summary


def read_rows(op: str, run: str) -> list[dict[str, str]]:
    path = common.RESULTS_DIR / f"{op}.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("run", "") == run]


def pick(rows: list[dict[str, str]], provider: str, **where: str) -> dict[str, str] | None:
    """The last row of `provider` matching every column=value of `where`."""
    found = [r for r in rows if r["provider"] == provider
             and all(r.get(k) == v for k, v in where.items())]
    return found[-1] if found else None


def num(row: dict[str, str] | None, key: str) -> float:
    if row is None or not row.get(key):
        return math.nan
    try:
        return float(row[key])
    except ValueError:
        return math.nan


@dataclass
class Check:
    name: str
    value: float  # the measured ratio or amount; NaN when missing
    target: str  # "<= 1.1", ">= 1.4", or "" (shown for information)
    detail: str = ""

    def verdict(self) -> str:
        if math.isnan(self.value):
            return "missing"
        if not self.target:
            return "info"
        op, bound = self.target.split()
        ok = self.value <= float(bound) if op == "<=" else self.value >= float(bound)
        return "PASS" if ok else "FAIL"


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _best(*values: float) -> float:
    present = [v for v in values if not math.isnan(v)]
    return min(present) if present else math.nan


def kernel_checks(run: str, smoke: bool) -> list[Check]:
    shape = SMOKE[GRPO] if smoke else GRPO
    token = [r for r in read_rows("grpo_loss", run) if r.get("importance_level") == "token"]
    seq = [r for r in read_rows("grpo_loss", run) if r.get("importance_level") == "sequence"]
    checks = []
    clone = num(pick(token, "clone", shape=shape), "ms")
    for level, rows in (("token", token), ("sequence", seq)):
        ours = num(pick(rows, "ours_inplace", shape=shape), "ms")
        ours_copy = num(pick(rows, "ours", shape=shape), "ms")
        liger = _best(num(pick(rows, "liger", shape=shape), "ms"),
                      num(pick(rows, "liger_inplace", shape=shape), "ms"))
        level_clone = _best(num(pick(rows, "clone", shape=shape), "ms"), clone)
        detail = (f"ours in place {ours:.3f} ms (copy {ours_copy:.3f}), clone "
                  f"{level_clone:.3f} ms, Liger best {liger:.3f} ms")
        is_token = level == "token"
        checks += [
            Check(f"grpo_loss {level} fwd+bwd / clone", _ratio(ours, level_clone),
                  "<= 1.1" if is_token else "", detail),
            Check(f"Liger / grpo_loss {level}", _ratio(liger, ours),
                  ">= 1.4" if is_token else "", detail),
        ]
        if is_token:
            mib = num(pick(rows, "ours_inplace", shape=shape), "peak_extra_mib")
            checks.append(Check("grpo_loss token peak extra MiB (in place)", mib, "<= 64"))
    lp = read_rows("logprobs", run)
    lp_clone = _best(num(pick(lp, "clone", shape=shape), "ms"), clone)
    ours_lp, read = num(pick(lp, "ours", shape=shape), "ms"), num(pick(lp, "read", shape=shape),
                                                                  "ms")
    checks.append(Check("token_logprobs / one read (clone / 2)", _ratio(ours_lp, lp_clone / 2),
                        "<= 1.15", f"ours {ours_lp:.3f} ms, clone {lp_clone:.3f} ms, "
                                   f"amax read {read:.3f} ms"))
    linear = read_rows("linear_grpo_loss", run)
    for full in LINEAR:
        s = SMOKE[full] if smoke else full
        h = full.split("x")[1]
        fused, gemms = pick(linear, "fused_ours", shape=s), pick(linear, "gemms", shape=s)
        mat, liger = pick(linear, "materialised_ours", shape=s), pick(linear, "liger", shape=s)
        detail = (f"fused {num(fused, 'ms'):.2f} ms, GEMMs {num(gemms, 'ms'):.2f} ms, "
                  f"materialised {num(mat, 'ms'):.2f} ms, Liger {num(liger, 'ms'):.2f} ms")
        checks += [
            Check(f"linear_grpo_loss H={h} / GEMMs alone", _ratio(num(fused, "ms"),
                                                                  num(gemms, "ms")),
                  "<= 1.15", detail),
            Check(f"linear_grpo_loss H={h} peak extra GiB", num(fused, "peak_extra_mib") / 1024,
                  "<= 1.3"),
            Check(f"materialised logits + grpo_loss / fused, H={h}",
                  _ratio(num(mat, "ms"), num(fused, "ms")), ""),
            Check(f"Liger fused linear GRPO / ours, H={h}",
                  _ratio(num(liger, "ms"), num(fused, "ms")), ""),
        ]
    moe = read_rows("moe", run)
    s = SMOKE[MOE] if smoke else MOE
    ours_moe, peer = num(pick(moe, "ours", shape=s), "ms"), num(pick(moe, "hf_grouped_mm",
                                                                     shape=s), "ms")
    checks.append(Check("transformers grouped_mm / moe_experts", _ratio(peer, ours_moe),
                        ">= 1.3", f"ours {ours_moe:.2f} ms, grouped_mm {peer:.2f} ms"))
    return checks


def step_checks(run: str) -> list[Check]:
    rows = [r for r in read_rows("step", run) if r.get("model") == "dense"]
    full = [r for r in rows if not str(r.get("shape", "")).endswith("-lognormal")]
    ours, trl, logits = (pick(full, p) for p in ("ours", "trl", "ours-logits"))
    detail = (f"ours {num(ours, 'step_s'):.2f} s ({num(ours, 'peak_gib'):.2f} GiB), TRL "
              f"{num(trl, 'step_s'):.2f} s ({num(trl, 'peak_gib'):.2f} GiB)")
    return [
        Check("GRPO step ours / TRL (seconds)", _ratio(num(ours, "step_s"), num(trl, "step_s")),
              "<= 0.5", detail),
        Check("GRPO step peak memory ours / TRL", _ratio(num(ours, "peak_gib"),
                                                         num(trl, "peak_gib")), "<= 1.0"),
        Check("GRPO step peak GiB, fused lm_head off", num(logits, "peak_gib"), "",
              f"update {num(logits, 'update_s'):.2f} s"),
        *packing_checks(rows),
    ]


def packing_checks(rows: list[dict]) -> list[Check]:
    """The packing stage (long-tailed lengths), when it ran: packed / padded step seconds."""
    tail = [r for r in rows if str(r.get("shape", "")).endswith("-lognormal")]
    if not tail:
        return []
    packed, padded = pick(tail, "ours"), pick(tail, "ours-padded")
    detail = (f"packed {num(packed, 'step_s'):.2f} s ({num(packed, 'peak_gib'):.2f} GiB), "
              f"padded {num(padded, 'step_s'):.2f} s ({num(padded, 'peak_gib'):.2f} GiB)")
    return [
        Check("long-tail step packed / padded (seconds)",
              _ratio(num(packed, "step_s"), num(padded, "step_s")), "<= 1.0", detail),
        Check("long-tail step peak memory packed / padded",
              _ratio(num(packed, "peak_gib"), num(padded, "peak_gib")), "", ""),
    ]


def test_checks(logs: Path | None) -> list[Check]:
    """Failed tests of the tests stage (its JUnit reports): 0 is the target."""
    reports = sorted(logs.glob("tests*.xml")) if logs else []
    name = "tests failed (gpu-marked + CUDA kernel pass)"
    if not reports:
        return [Check(name, math.nan, "<= 0", "no JUnit report: the stage did not finish")]
    count = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for path in reports:
        root = ElementTree.parse(path).getroot()
        for suite in [root] if root.tag == "testsuite" else list(root):
            for k in count:
                count[k] += int(suite.get(k, 0))
    bad = count["failures"] + count["errors"]
    return [Check(name, float(bad), "<= 0", f"{count['tests']} run, {count['skipped']} "
                                            f"skipped ({', '.join(p.name for p in reports)})")]


def stage_lines(logs: Path | None) -> list[str]:
    """gpu_checks.sh's record of each stage: exit status and seconds."""
    path = logs / "stages.txt" if logs else None
    if path is None or not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        name, rc, seconds = line.split()
        state = {"0": "ok", "124": "stopped at its limit", "130": "stopped at its limit",
                 "137": "killed at its limit"}.get(rc, f"exit {rc}")
        lines.append(f"stage {name}: {state}, {seconds} s")
    return lines


def summarise(run: str, logs: Path | None, smoke: bool) -> list[Check]:
    checks = test_checks(logs) + kernel_checks(run, smoke) + step_checks(run)
    rows = read_rows("grpo_loss", run) or read_rows("step", run)
    meta = rows[0] if rows else {}
    print()
    print(f"GPU proof summary: run {run or '(untagged)'} on {meta.get('gpu', '?')}, torch "
          f"{meta.get('torch', '?')}, triton {meta.get('triton', '?')}, git "
          f"{meta.get('git_sha', '?')}")
    if smoke:
        print("CPU smoke: tiny shapes in the Triton interpreter; the numbers check the "
              "pipeline, not the targets")
    for line in stage_lines(logs):
        print(line)
    width = max(len(c.name) for c in checks)
    print(f"{'check':{width}}  {'measured':>9}  {'target':>7}  verdict  detail")
    for c in checks:
        value = "-" if math.isnan(c.value) else f"{c.value:.3f}"
        print(f"{c.name:{width}}  {value:>9}  {c.target or '':>7}  {c.verdict():7}  {c.detail}")
    verdicts = [c.verdict() for c in checks]
    print(f"{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, "
          f"{verdicts.count('missing')} missing, {verdicts.count('info')} for information")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="run the kernel benchmarks of the proof")
    k.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU")
    k.add_argument("--warmup", type=int, default=25, help="ms (do_bench)")
    k.add_argument("--rep", type=int, default=100, help="ms (do_bench)")
    s = sub.add_parser("summary", help="print the targets of one run")
    s.add_argument("--run", default=common.RUN_ID, help="run id [GPU_CHECKS_RUN]")
    s.add_argument("--logs", type=Path, help="the run's log folder (tests.xml)")
    s.add_argument("--smoke", action="store_true", help="the run was a CPU smoke")
    args = parser.parse_args(argv)
    if args.command == "kernels":
        return run_kernels(args.smoke, args.warmup, args.rep)
    summarise(args.run, args.logs, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
