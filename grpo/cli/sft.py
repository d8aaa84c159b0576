"""grpo-sft: supervised fine-tuning on (prompt, completion) pairs, DeepSeek-R1's cold start.

    grpo-sft --model DIR --data pairs.jsonl --steps 300 --output-dir out/
    grpo-sft --task arithmetic --steps 300 --output-dir out/   # the demo's built-in model

Distillation is this command on a teacher's samples (grpo-sample): `--model` is the student
(any architecture grpo.models.load_model reads, dense or MoE), or without it (demo mode,
config.is_demo) a fresh built-in tiny model of --tiny-hidden x --tiny-layers. `--packing`
concatenates short examples into rows of up to --max-length tokens, each attending only to
itself, so the loss is that of the unpacked batch with less padding. The training is
grpo.sft's (run_sft); this module parses, loads, saves and prints.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from grpo.models import load_model, make_tiny, save_model

from .. import data as data_mod
from .. import lora as lora_mod
from .. import tasks as tasks_mod
from ..config import DEMO, DEMO_MODEL, is_demo
from ..evaluation import resolve_template
from ..sft import run_sft
from .args import (
    BAD_INPUT,
    add_overwrite_argument,
    add_prompt_arguments,
    bad_input,
    check_output,
    describe,
    failed_write,
)

PROG = "grpo-sft"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=describe(__doc__))
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="", help="HF model directory (default: built-in tiny)")
    group.add_argument(
        "--tiny-hidden",
        type=int,
        default=DEMO_MODEL["hidden"],
        help="without --model: hidden size of the fresh tiny Qwen2",
    )
    group.add_argument(
        "--tiny-layers",
        type=int,
        default=DEMO_MODEL["layers"],
        help="without --model: layers of the fresh tiny Qwen2",
    )
    add_prompt_arguments(parser, data_columns="prompt and completion")
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=300)
    group.add_argument("--lr", type=float, default=None, help="[1e-5; 3e-3 built-in model]")
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument(
        "--packing",
        action="store_true",
        help="pack short examples into rows of up to --max-length tokens",
    )
    group.add_argument("--max-length", type=int, default=512, help="packed row length")
    group.add_argument("--output-dir", required=True)
    add_overwrite_argument(parser, "model in --output-dir")
    lora_mod.add_arguments(parser)  # as grpo-train's; --lr: LoRA usually wants ~10x
    return parser


def run(args: argparse.Namespace) -> str:
    """Train the model the parsed flags describe and save it to --output-dir; returns the
    line to print. Bad input raises ValueError."""
    out = Path(args.output_dir)
    check_output(out, overwrite=args.overwrite, kind="model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    demo = is_demo(args.model)
    if not demo and not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model {args.model!r} is not a directory with a config.json")
    lora = lora_mod.settings_from_args(args)  # None: train the full model
    if demo:  # a fresh tiny model, built in a temporary directory and loaded from there
        with tempfile.TemporaryDirectory(prefix="grpo-sft-init-") as init:
            path = make_tiny(
                Path(init) / "model",
                family=DEMO_MODEL["family"],
                hidden=args.tiny_hidden,
                layers=args.tiny_layers,
                seed=args.seed,
            )
            model, tokenizer = load_model(path, dtype=dtype, device=device)
    else:
        model, tokenizer = load_model(Path(args.model), dtype=dtype, device=device)
    if lora is not None:
        lora_mod.apply_lora(model, lora, base=args.model or out, seed=args.seed)
    # The template grpo-train and grpo-eval pick for this tokenizer, so a distilled student
    # is trained on the prompts it will be evaluated on.
    template = resolve_template(args.template, tokenizer)
    pairs = _training_pairs(args, template, tokenizer)
    # grpo-train's cold-start learning rates: the demo's, else --sft-learning-rate's default.
    lr = args.lr or (DEMO["sft_learning_rate"] if demo else 1e-5)
    start = time.perf_counter()
    loss = run_sft(
        model,
        tokenizer,
        pairs,
        steps=args.steps,
        lr=lr,
        batch_size=args.batch_size,
        seed=args.seed,
        packing=args.max_length if args.packing else None,
    )
    if lora is None:
        save_model(model, tokenizer, out)
    else:  # merged in out/; the adapters in PEFT's format in out/adapter/ (onto --model)
        lora_mod.save_full_model(model, tokenizer, out)
        if not demo:  # (a fresh demo model is not kept: no base to apply them to)
            lora_mod.save_adapter(model, tokenizer, out / "adapter")
    return (
        f"final loss {loss:.4f} after {args.steps} steps on {len(pairs)} examples "
        f"({time.perf_counter() - start:.0f} s); model saved to {out}"
    )


def _training_pairs(args: argparse.Namespace, template: str, tokenizer) -> list[tuple[str, str]]:
    """The (formatted prompt, completion) pairs to train on: --data's rows, each of which needs
    a "completion", else steps x batch-size examples of the task's training stream with the
    task's worked solutions."""
    if args.data:
        examples = data_mod.load_jsonl(args.data, require_completion=True)
        return [
            (data_mod.format_prompt(ex, template, tokenizer), ex["completion"]) for ex in examples
        ]
    task = tasks_mod.make_task(args.task, **args.task_args)
    # Never the prompts grpo-train and grpo-eval hold out, so evaluation stays clean.
    _, stream = data_mod.task_splits(task, args.seed, args.eval_size)
    return [
        (data_mod.format_prompt(ex, template, tokenizer), task.solution(ex))
        for ex in stream.next_batch(args.steps * args.batch_size)
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except BAD_INPUT as e:  # bad input: a message, not a traceback
        return bad_input(PROG, e)
    except Exception as e:  # a full disk, a read-only directory: say so, else a traceback
        status = failed_write(PROG, e, retry="run it again", option="--output-dir")
        if status is None:
            raise
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
