"""Code-reward throughput: completions graded per second, sandboxed and not.

    python -m benchmarks.bench_code_reward [--n 128] [--tests 5] [--timeout 2] [--smoke]

Four batches of --n completions, each with --tests stdin/stdout tests (read numbers, print
their sum): "correct" (fast correct programs), "wrong" (wrong from the first test),
"timeouts" (1 in 16 loops for ever, the rest correct) and "waits" (1 in 16 sleeps for ever).
Every program text is distinct, so nothing is deduplicated. Three ways to run them, each on
the same pool (grpo.rewards.sandbox's run_parallel: the cores, a slow sample freeing its
worker) with the same rule (--score all: stop at the first failing test, as training's default;
pass_rate: run every test but after a timeout):

- bwrap: the code reward as training runs it (one bubblewrap sandbox per sample, its tests
  forked from one harness inside);
- none: the same harness without bubblewrap (--code-sandbox none), the sandbox's own cost;
- plain: `python3 prog.py < input` per test, no sandbox and no harness: the baseline.

The table gives seconds (median of --repeat runs), completions/s and the time relative to
plain. For "timeouts" and "waits" it also gives the bound the issue sets: the timeout plus the
time of the rest of the batch's work (the correct batch's time, scaled to the programs that
finish). A sleeping program costs no CPU, so "waits" shows whether timeouts overlap; a
looping one burns a core for the whole timeout, at the same priority as the rest (a verdict
must not depend on its neighbours), so on 2 cores "timeouts" also pays for the loops' CPU.
Rows are appended to benchmarks/results/code_reward.csv (not with --smoke or --no-save).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import common
from grpo.rewards.code import CodeReward, CodeSettings, same_output, slow_after
from grpo.rewards.sandbox import Limits, Sandbox, cpu_count, run_parallel

PROVIDERS = ("bwrap", "none", "plain")
WORKLOADS = ("correct", "wrong", "timeouts", "waits")
CORRECT = "print(sum(map(int, input().split())))  # {i}"
WRONG = "print(sum(map(int, input().split())) + 1)  # {i}"
LOOP = "while True:  # {i}\n    pass"
SLEEP = "import time  # {i}\ntime.sleep(1000)"


def batch(workload: str, n: int, tests: int) -> tuple[list[str], list[str], list[str]]:
    """(programs, inputs, outputs): n distinct programs, and the tests they all share."""
    inputs = [" ".join(str(j * k + 1) for j in range(k + 2)) + "\n" for k in range(tests)]
    outputs = [f"{sum(map(int, line.split()))}\n" for line in inputs]
    programs = []
    for i in range(n):
        if workload == "wrong":
            programs.append(WRONG.format(i=i))
        elif workload == "timeouts" and i % 16 == 0:
            programs.append(LOOP.format(i=i))
        elif workload == "waits" and i % 16 == 0:
            programs.append(SLEEP.format(i=i))
        else:
            programs.append(CORRECT.format(i=i))
    return programs, inputs, outputs


def answer(program: str) -> str:
    return f"<think>sum them</think><answer>```python\n{program}\n```</answer>"


def grade_sandboxed(kind: str, programs, inputs, outputs, timeout: float, score: str):
    reward = CodeReward(CodeSettings(score=score, sandbox=kind, limits=Limits(timeout=timeout)))
    n = len(programs)
    scores = reward([answer(p) for p in programs], inputs=[inputs] * n, outputs=[outputs] * n)
    return [float(s) for s in scores]


def _plain_one(job) -> float:
    """One sample the plain way: each test a fresh `python3 prog.py`, as the reward runs
    them (all: stop at a failure; pass_rate: stop at a timeout)."""
    program, inputs, outputs, timeout, python, score = job
    passed = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prog.py"
        path.write_text(program)
        for stdin, expected in zip(inputs, outputs, strict=True):
            try:
                done = subprocess.run(
                    [python, str(path)],
                    input=stdin.encode(),
                    capture_output=True,
                    timeout=timeout,
                    cwd=tmp,
                )
            except subprocess.TimeoutExpired:
                break
            if done.returncode == 0 and same_output(done.stdout.decode(), expected):
                passed += 1
            elif score == "all":
                break
    if score == "all":
        return float(passed == len(inputs))
    return passed / len(inputs)


def grade_plain(programs, inputs, outputs, timeout: float, score: str) -> list[float]:
    python = Sandbox("none").python  # the interpreter the sandbox runs
    jobs = [(p, inputs, outputs, timeout, python, score) for p in programs]
    return run_parallel(_plain_one, jobs, slow_after=slow_after(Limits(timeout)))


def measure(provider: str, workload: str, args: argparse.Namespace) -> dict:
    programs, inputs, outputs = batch(workload, args.n, args.tests)
    expected = [
        0.0 if workload == "wrong" or p.startswith(("while", "import time")) else 1.0
        for p in programs
    ]
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        if provider == "plain":
            scores = grade_plain(programs, inputs, outputs, args.timeout, args.score)
        else:
            scores = grade_sandboxed(provider, programs, inputs, outputs, args.timeout, args.score)
        times.append(time.perf_counter() - start)
        if scores != expected:
            raise AssertionError(f"{provider}/{workload}: wrong scores {scores}")
    seconds = statistics.median(times)
    return {
        "provider": provider,
        "workload": workload,
        "shape": f"{args.n}x{args.tests}",
        "score": args.score,
        "workers": cpu_count(),
        "timeout_s": args.timeout,
        "seconds": seconds,
        "completions_per_s": args.n / seconds,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128, help="completions per batch")
    parser.add_argument("--tests", type=int, default=5, help="tests per completion")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per test")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--score", choices=("all", "pass_rate"), default="all")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--smoke", action="store_true", help="8 completions, one run")
    parser.add_argument("--no-save", action="store_true", help="do not append to the CSV")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.repeat = 8, 1
    Sandbox("bwrap").ensure_available()  # the one-time probe is not part of any timing
    rows = [
        measure(provider, workload, args)
        for workload in args.workloads.split(",")
        for provider in args.providers.split(",")
    ]
    plain = {r["workload"]: r["seconds"] for r in rows if r["provider"] == "plain"}
    correct = {r["provider"]: r["seconds"] for r in rows if r["workload"] == "correct"}
    for row in rows:
        if row["workload"] in plain:
            row["vs_plain"] = row["seconds"] / plain[row["workload"]]
        if row["workload"] in ("timeouts", "waits") and row["provider"] in correct:
            finishing = args.n - len(range(0, args.n, 16))
            bound = args.timeout + correct[row["provider"]] * finishing / args.n
            row["bound_s"] = bound
            row["within_bound"] = row["seconds"] <= bound
    common.print_table(rows)
    if not (args.smoke or args.no_save):
        print(f"appended to {common.append_results('code_reward', rows)}")
    return rows


if __name__ == "__main__":
    main()
