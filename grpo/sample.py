"""Rejection sampling, as DeepSeek-R1 builds its SFT data: k completions per prompt, keep the
ones the rewards accept, write prompt/completion pairs for grpo.sft.

    python -m grpo.sample --model runs/teacher/final --task arithmetic \\
        --task-args '{"operators": "+"}' --num-prompts 2000 --samples 4 \\
        --keep correct --max-per-prompt 2 --output distill.jsonl

--keep correct keeps completions with full marks from the correctness reward (accuracy, or
countdown for Countdown) and the format reward, and with --min-language-consistency x a
language-consistency score of at least x; --keep all keeps everything. Exact duplicate
completions of a prompt are dropped, and at most --max-per-prompt are kept per prompt (the
first ones sampled). Built-in tasks draw from the training stream, which never yields one of
grpo-train's held-out prompts (same --seed and --eval-size), so grpo.eval stays clean.

Each output row is the example (its raw "prompt", "answer" and other columns) plus
"completion". The prompt is stored without a template: grpo.sft applies the student's
template when it trains, which for the same --template (or the same default) is exactly the
prompt the teacher was sampled with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .eval import add_source_arguments
from .evaluation import (
    Samples,
    build_engine,
    is_char_tokenizer,
    load_model_for_eval,
    prompt_examples,
    resolve_template,
    reward_functions,
    sample_and_score,
)
from .rewards import RewardError

_DEFAULT_TASK_PROMPTS = 1000


def rejection_filter(result: Samples, *, keep: str = "correct", max_per_prompt: int | None = None,
                     min_language: float | None = None) -> tuple[list[dict], dict]:
    """(rows, stats): the kept completions as example rows with a "completion" column, and
    how many were sampled, kept and rejected, per reward ("rejected"; a completion failing two
    rewards counts under both), as duplicates and over max_per_prompt.

    keep="correct" needs the first reward at 1.0, "format" at 1.0 when scored, and
    "language" >= min_language when given; keep="all" only dedupes and caps.
    """
    if keep not in ("correct", "all"):
        raise ValueError(f"--keep must be 'correct' or 'all', got {keep!r}")
    if max_per_prompt is not None and max_per_prompt < 1:
        raise ValueError(f"--max-per-prompt must be >= 1, got {max_per_prompt}")
    if min_language is not None and "language" not in result.reward_names:
        raise ValueError("a language-consistency threshold needs the 'language' reward scored")
    checks: dict[str, torch.Tensor] = {}
    if keep == "correct":
        checks[result.reward_names[0]] = result.correct
        if "format" in result.reward_names:
            checks["format"] = result.reward("format") == 1.0
        if min_language is not None:
            checks["language"] = result.reward("language") >= min_language
    passed = torch.ones_like(result.correct)
    for ok in checks.values():
        passed &= ok
    rows: list[dict] = []
    duplicates = over_cap = 0
    for i, example in enumerate(result.examples):
        seen: set[str] = set()
        for j, text in enumerate(result.texts[i]):
            if not passed[i, j]:
                continue
            if text in seen:
                duplicates += 1
                continue
            seen.add(text)
            if max_per_prompt is not None and len(seen) > max_per_prompt:
                over_cap += 1
                continue
            rows.append({**example, "completion": text})
    stats = {"prompts": len(result.examples), "sampled": result.correct.numel(),
             "kept": len(rows), "prompts_kept": len({r["prompt"] for r in rows}),
             "rejected": {name: int((~ok).sum()) for name, ok in checks.items()},
             "duplicates": duplicates, "over_max_per_prompt": over_cap}
    if not rows:
        reasons = ", ".join(f"{n} by {name}" for name, n in stats["rejected"].items())
        raise ValueError(f"no completion kept: {stats['sampled']} sampled, rejected {reasons}; "
                         f"{duplicates} duplicates. Sample more (--samples, --num-prompts), at "
                         f"a different --temperature, or relax the filter")
    return rows, stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grpo.sample",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--samples", type=int, default=4, help="k: completions per prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--keep", choices=("correct", "all"), default="correct")
    parser.add_argument("--max-per-prompt", type=int, default=None,
                        help="keep at most N distinct completions per prompt [all]")
    parser.add_argument("--min-language-consistency", type=float, default=None,
                        help="also require the language reward (share of target-language "
                             "letters in <think>; the 'language' column, default en) >= X")
    parser.add_argument("--output", required=True, help="JSONL of prompt/completion rows")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Sample, filter and write args.output; returns the statistics."""
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    model, tokenizer, _ = load_model_for_eval(args.model)
    template = resolve_template(args.template, tokenizer)
    max_new = args.max_completion_length or (64 if is_char_tokenizer(tokenizer) else 256)
    num_prompts = args.num_prompts or (None if args.data else _DEFAULT_TASK_PROMPTS)
    task, examples = prompt_examples(
        task=args.task, task_args=args.task_args, data=args.data, seed=args.seed,
        eval_size=args.eval_size, split="train", num_prompts=num_prompts,
        needs_answer=args.keep == "correct")
    extra = list(args.reward)
    if args.min_language_consistency is not None and "language" not in extra:
        extra.append("language")
    reward_fns = reward_functions(task, extra)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    engine = build_engine(model, tokenizer, args.rollout, temperature=args.temperature,
                          top_p=args.top_p, max_prompt_length=args.max_prompt_length,
                          max_completion_length=max_new, model_path=args.model, seed=args.seed)
    result = sample_and_score(model, tokenizer, examples, reward_fns, template=template,
                              samples=args.samples, temperature=args.temperature,
                              top_p=args.top_p, max_completion_length=max_new,
                              max_prompt_length=args.max_prompt_length,
                              batch_size=args.batch_size, progress=args.progress,
                              desc="sampling", engine=engine)
    rows, stats = rejection_filter(result, keep=args.keep, max_per_prompt=args.max_per_prompt,
                                   min_language=args.min_language_consistency)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    stats.update(template=template, seconds=round(time.perf_counter() - start, 1))
    return stats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = run(args)
    except (ValueError, RewardError) as e:  # bad input: a message, not a traceback
        print(f"grpo.sample: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    print(f"{stats['kept']} of {stats['sampled']} completions kept "
          f"({stats['prompts_kept']} of {stats['prompts']} prompts) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
