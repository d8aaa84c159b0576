"""Evaluate a model as DeepSeek-R1 reports it: k sampled completions per prompt.

    python -m grpo.eval --model runs/teacher/final --task arithmetic \\
        --task-args '{"operators": "+"}' --samples 8 --output teacher-eval.json

Reports pass@1 (the mean accuracy of the k samples), pass@j for j <= k (the unbiased
estimator of Chen et al. 2021), cons@k (the majority answer, ties to the answer sampled
first), the format rate, every reward's mean, the mean completion length and the truncation
rate; with --greedy also the greedy accuracy that grpo-train's evaluate() reports. Built-in
tasks use the held-out prompts of grpo-train with the same --seed and --eval-size; a JSONL
file (--data) is used whole. The rewards are the training ones (the task's, plus --reward).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .evaluation import (
    Samples,
    build_engine,
    cons_at_k,
    is_char_tokenizer,
    load_model_for_eval,
    pass_at_k,
    prompt_examples,
    resolve_template,
    reward_functions,
    sample_and_score,
)
from .rewards import RewardError, answer_key


def default_pass_ks(samples: int) -> list[int]:
    """1, 2, 4, ... below k, and k itself."""
    ks, j = [], 1
    while j < samples:
        ks.append(j)
        j *= 2
    return ks + [samples]


def summarize(result: Samples, pass_ks: list[int]) -> dict:
    """Aggregate metrics of k scored samples per prompt."""
    correct = result.correct
    k = correct.shape[1]
    counts = correct.sum(1).tolist()
    metrics = {"prompts": len(counts), "samples": k,
               "pass@1": float(correct.float().mean())}
    for j in pass_ks:
        metrics[f"pass@{j}"] = float(np.mean([pass_at_k(k, c, j) for c in counts]))
    metrics[f"cons@{k}"] = float(np.mean([cons_at_k(texts, row.tolist())
                                          for texts, row in zip(result.texts, correct,
                                                                strict=True)]))
    if "format" in result.reward_names:
        metrics["format"] = float(result.reward("format").mean())
    for r, name in enumerate(result.reward_names):
        metrics[f"reward/{name}"] = float(torch.nanmean(result.rewards[:, :, r]))
    metrics["completion_length"] = float(result.lengths.float().mean())
    metrics["truncated"] = float(result.truncated.float().mean())
    return metrics


def per_prompt(result: Samples) -> list[dict]:
    rows = []
    for ex, texts, row in zip(result.examples, result.texts, result.correct, strict=True):
        rows.append({**ex, "correct": int(row.sum()), "completions": texts,
                     "answers": [answer_key(t) for t in texts]})
    return rows


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation described by the parsed flags; returns the JSON report."""
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    pass_ks = args.pass_k or default_pass_ks(args.samples)
    bad = [j for j in pass_ks if not 1 <= j <= args.samples]
    if bad:
        raise ValueError(f"--pass-k values must be in [1, --samples={args.samples}], got {bad}")
    model, tokenizer, device = load_model_for_eval(args.model)
    template = resolve_template(args.template, tokenizer)
    max_new = args.max_completion_length or (64 if is_char_tokenizer(tokenizer) else 256)
    # A JSONL file is scored by the accuracy reward, which needs an answer per prompt.
    task, examples = prompt_examples(
        task=args.task, task_args=args.task_args, data=args.data, seed=args.seed,
        eval_size=args.eval_size, split="eval", num_prompts=args.num_prompts,
        needs_answer=True)
    reward_fns = reward_functions(task, args.reward)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    engine = build_engine(model, tokenizer, args.rollout, temperature=args.temperature,
                          top_p=args.top_p, max_prompt_length=args.max_prompt_length,
                          max_completion_length=max_new, model_path=args.model, seed=args.seed)
    common = dict(template=template, temperature=args.temperature, top_p=args.top_p,
                  max_completion_length=max_new, max_prompt_length=args.max_prompt_length,
                  batch_size=args.batch_size, progress=args.progress, engine=engine)
    result = sample_and_score(model, tokenizer, examples, reward_fns, samples=args.samples,
                              desc="eval", **common)
    metrics = summarize(result, pass_ks)
    if args.greedy:
        greedy = sample_and_score(model, tokenizer, examples, reward_fns, samples=1,
                                  greedy=True, desc="greedy", **common)
        metrics["greedy_accuracy"] = float(greedy.correct.float().mean())
    settings = {"model": str(args.model), "task": None if args.data else args.task,
                "task_args": args.task_args, "data": args.data or None, "template": template,
                "samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
                "max_completion_length": max_new, "seed": args.seed,
                "eval_size": None if args.data else args.eval_size,
                "rewards": result.reward_names, "device": str(device),
                "seconds": time.perf_counter() - start}
    report = {"settings": settings, "metrics": metrics}
    if args.per_prompt:
        report["per_prompt"] = per_prompt(result)
    return report


def format_table(report: dict) -> str:
    rows = [(name, f"{value:.4f}" if isinstance(value, float) else str(value))
            for name, value in report["metrics"].items()]
    width = max(len(name) for name, _ in rows)
    s = report["settings"]
    head = (f"{s['model']} on {s['data'] or s['task']}: {report['metrics']['prompts']} prompts x "
            f"{s['samples']} samples, temperature {s['temperature']}, top_p {s['top_p']}")
    return "\n".join([head] + [f"  {name:<{width}}  {value}" for name, value in rows])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grpo.eval",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--samples", type=int, default=8, help="k: completions per prompt")
    parser.add_argument("--pass-k", type=int, nargs="+", default=None,
                        help="j values of pass@j [1, 2, 4, ... and k]")
    parser.add_argument("--temperature", type=float, default=0.6, help="(R1's evaluation)")
    parser.add_argument("--top-p", type=float, default=0.95, help="(R1's evaluation)")
    parser.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=False,
                        help="also report greedy accuracy (as grpo-train's held-out eval)")
    parser.add_argument("--per-prompt", action=argparse.BooleanOptionalAction, default=False,
                        help="include every prompt's completions in the JSON")
    parser.add_argument("--output", default="", help="JSON report [MODEL/eval.json]")
    return parser


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, prompts and generation flags shared with grpo.sample."""
    parser.add_argument("--model", required=True, help="HF model directory with tokenizer")
    parser.add_argument("--task", default="arithmetic",
                        help="built-in task: arithmetic, countdown, sort, reverse")
    parser.add_argument("--task-args", type=json.loads, default={},
                        help="task options as JSON (grpo-train's built-in demo: "
                             "'{\"operators\": \"+\"}')")
    parser.add_argument("--data", default="", help="JSONL with prompt (and answer) columns")
    parser.add_argument("--template", default=None,
                        help="prompt template [short for character tokenizers, else r1zero]")
    parser.add_argument("--reward", nargs="+", default=[],
                        help="extra reward functions to run and report")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="use only the first N prompts")
    parser.add_argument("--eval-size", type=int, default=200,
                        help="held-out prompts of a built-in task (as grpo-train)")
    parser.add_argument("--seed", type=int, default=0, help="data split and sampling seed")
    parser.add_argument("--max-completion-length", type=int, default=None,
                        help="[64 for character tokenizers, else 256]")
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256,
                        help="sequences generated per batch")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rollout", default="transformers", choices=("transformers", "vllm"),
                        help="sampling engine (vllm: needs the vllm package and a GPU)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = evaluate(args)
    except (ValueError, RewardError) as e:  # bad input: a message, not a traceback
        print(f"grpo.eval: error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else Path(args.model) / "eval.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"report written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
