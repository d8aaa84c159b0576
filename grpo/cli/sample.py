"""grpo-sample: rejection sampling, as DeepSeek-R1 builds its SFT data: k completions per
prompt, keep the ones the rewards accept, write prompt/completion pairs for grpo-sft.

    grpo-sample --model runs/teacher/final --task arithmetic \\
        --task-args '{"operators": "+"}' --num-prompts 2000 --samples 4 \\
        --keep correct --max-per-prompt 2 --output distill.jsonl

--keep correct keeps completions with full marks from the correctness reward (accuracy, or
countdown for Countdown) and the format reward, and with --min-language-consistency x a
language-consistency score of at least x; --keep all keeps everything. Exact duplicate
completions of a prompt are dropped, and at most --max-per-prompt are kept per prompt (the
first ones sampled). Built-in tasks draw from the training stream, which never yields one of
grpo-train's held-out prompts (same --seed and --eval-size), so grpo-eval stays clean.

Each output row is the example (its raw "prompt", "answer" and other columns) plus
"completion". The prompt is stored without a template: grpo-sft applies the student's
template when it trains, which for the same --template (or the same default) is exactly the
prompt the teacher was sampled with. The filter is grpo.evaluation's (rejection_filter);
this module parses, writes and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..evaluation import rejection_filter
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

PROG = "grpo-sample"
_DEFAULT_TASK_PROMPTS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=describe(__doc__),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    add_sampling_arguments(parser, samples=4, temperature=0.7, top_p=1.0)
    parser.add_argument("--keep", choices=("correct", "all"), default="correct")
    parser.add_argument(
        "--max-per-prompt",
        type=int,
        default=None,
        help="keep at most N distinct completions per prompt [all]",
    )
    parser.add_argument(
        "--min-language-consistency",
        type=float,
        default=None,
        help="also require the language reward (share of target-language "
        "letters in <think>; the 'language' column, default en) >= X",
    )
    parser.add_argument("--output", required=True, help="JSONL of prompt/completion rows")
    add_overwrite_argument(parser, "--output file")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Sample, filter and write args.output; returns the statistics."""
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    check_output(Path(args.output), overwrite=args.overwrite, kind="jsonl")
    extra = list(args.reward)
    if args.min_language_consistency is not None and "language" not in extra:
        extra.append("language")
    source = load_source(
        args,
        split="train",
        num_prompts=args.num_prompts or (None if args.data else _DEFAULT_TASK_PROMPTS),
        needs_answer=args.keep == "correct" and "code" not in extra,
        extra_rewards=extra,
    )
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    engine = open_engine(args, source)
    result = sample(args, source, engine, samples=args.samples, desc="sampling")
    rows, stats = rejection_filter(
        result,
        keep=args.keep,
        max_per_prompt=args.max_per_prompt,
        min_language=args.min_language_consistency,
    )
    atomic_write(Path(args.output), "".join(json.dumps(row) + "\n" for row in rows))
    stats.update(template=source.template, seconds=round(time.perf_counter() - start, 1))
    return stats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = run(args)
    except BAD_INPUT as e:  # bad input: a message, not a traceback
        return bad_input(PROG, e)
    except Exception as e:  # a full disk, a read-only directory: say so, else a traceback
        status = failed_write(PROG, e, retry="run it again", option="--output")
        if status is None:
            raise
        return status
    print(json.dumps(stats))
    print(
        f"{stats['kept']} of {stats['sampled']} completions kept "
        f"({stats['prompts_kept']} of {stats['prompts']} prompts) -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
