"""grpo-eval: evaluate a model as DeepSeek-R1 reports it, with k sampled completions per prompt.

    grpo-eval --model runs/teacher/final --task arithmetic \\
        --task-args '{"operators": "+"}' --samples 8 --output teacher-eval.json

Reports pass@1 (the mean accuracy of the k samples), pass@j for j <= k (the unbiased
estimator of Chen et al. 2021), cons@k (the majority answer, ties to the answer sampled
first), the format rate, every reward's mean, the mean completion length and the truncation
rate; with --greedy also the greedy accuracy that grpo-train's evaluate() reports. Built-in
tasks use the held-out prompts of grpo-train with the same --seed and --eval-size; a JSONL
file (--data) is used whole. The rewards are the training ones (the task's, plus --reward);
with --data and --reward code, the programs are run against the dataset's tests
(grpo.rewards.code) and pass@k counts the samples that pass them all.
The metrics are grpo.evaluation's (summarize); this module parses, prints and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..evaluation import default_pass_ks, per_prompt, summarize
from ..files import atomic_write
from .args import (
    BAD_INPUT,
    add_model_arguments,
    add_overwrite_argument,
    add_prompt_arguments,
    add_sampling_arguments,
    bad_input,
    check_output,
    describe,
    failed_write,
    load_source,
    open_engine,
    sample,
)

PROG = "grpo-eval"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=describe(__doc__),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    add_sampling_arguments(parser, samples=8, temperature=0.6, top_p=0.95, note="(R1's evaluation)")
    parser.add_argument(
        "--pass-k",
        type=int,
        nargs="+",
        default=None,
        help="j values of pass@j [1, 2, 4, ... and k]",
    )
    parser.add_argument(
        "--greedy",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also report greedy accuracy (as grpo-train's held-out eval)",
    )
    parser.add_argument(
        "--per-prompt",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="include every prompt's completions in the JSON",
    )
    parser.add_argument("--output", default="", help="JSON report [MODEL/eval.json]")
    add_overwrite_argument(parser, "report")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Run the evaluation the parsed flags describe; returns the JSON report."""
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    check_output(report_path(args), overwrite=args.overwrite, kind="report")
    pass_ks = args.pass_k or default_pass_ks(args.samples)
    bad = [j for j in pass_ks if not 1 <= j <= args.samples]
    if bad:
        raise ValueError(f"--pass-k values must be in [1, --samples={args.samples}], got {bad}")
    # A JSONL file is scored by the accuracy reward, which needs an answer per prompt, or by
    # the code reward (--reward code), which needs tests instead.
    source = load_source(
        args,
        split="eval",
        num_prompts=args.num_prompts,
        needs_answer="code" not in args.reward,
        extra_rewards=args.reward,
    )
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    engine = open_engine(args, source)
    result = sample(args, source, engine, samples=args.samples, desc="eval")
    metrics = summarize(result, pass_ks)
    if args.greedy:
        greedy = sample(args, source, engine, samples=1, greedy=True, desc="greedy")
        metrics["greedy_accuracy"] = float(greedy.correct.float().mean())
    settings = {
        "model": str(args.model),
        "task": None if args.data else args.task,
        "task_args": args.task_args,
        "data": args.data or None,
        "template": source.template,
        "samples": args.samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_completion_length": source.max_completion_length,
        "seed": args.seed,
        "eval_size": None if args.data else args.eval_size,
        "rewards": result.reward_names,
        "device": str(source.device),
        "seconds": time.perf_counter() - start,
    }
    report = {"settings": settings, "metrics": metrics}
    if args.per_prompt:
        report["per_prompt"] = per_prompt(result)
    return report


def format_table(report: dict) -> str:
    """The report's metrics as the table grpo-eval prints, under a line of settings."""
    rows = [
        (name, f"{value:.4f}" if isinstance(value, float) else str(value))
        for name, value in report["metrics"].items()
    ]
    width = max(len(name) for name, _ in rows)
    s = report["settings"]
    head = (
        f"{s['model']} on {s['data'] or s['task']}: {report['metrics']['prompts']} prompts x "
        f"{s['samples']} samples, temperature {s['temperature']}, top_p {s['top_p']}"
    )
    return "\n".join([head] + [f"  {name:<{width}}  {value}" for name, value in rows])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except BAD_INPUT as e:  # bad input: a message, not a traceback
        return bad_input(PROG, e)
    output = report_path(args)
    try:
        atomic_write(output, json.dumps(report, indent=2))
    except Exception as e:  # a full disk, a read-only model directory: say so
        status = failed_write(PROG, e, retry="run it again", option="--output")
        if status is None:
            raise
        return status
    print(format_table(report))
    print(f"report written to {output}")
    return 0


def report_path(args: argparse.Namespace) -> Path:
    return Path(args.output) if args.output else Path(args.model) / "eval.json"


if __name__ == "__main__":
    sys.exit(main())
