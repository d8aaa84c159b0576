"""The arguments grpo-eval, grpo-sample and grpo-sft share, and what they load.

    add_prompt_arguments    the prompts: --task/--task-args or --data, grpo-train's held-out
                            split (--eval-size, --seed), --template          (all three)
    add_model_arguments     the model sampled and how: --model, --reward, --num-prompts,
                            lengths, --batch-size, --progress, --rollout, and the code
                            reward's --code-* flags (grpo-train's)  (eval and sample)
    add_sampling_arguments  --samples, --temperature, --top-p, with each command's defaults
    load_source, open_engine, sample   what those arguments name, loaded, and sampled
    bad_input               how every command reports bad input: one line, exit status 2
    describe                a command's --help description, from its docstring

The defaults that depend on the model (template, completion length) come from
grpo.evaluation's resolve_template and resolve_completion_length: config.DEMO's values for a
character-level tokenizer (a model the demo built), grpo-train's defaults otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import files
from ..config import DataConfig
from ..evaluation import (
    Samples,
    build_engine,
    load_model_for_eval,
    prompt_examples,
    resolve_completion_length,
    resolve_template,
    reward_functions,
    sample_and_score,
)
from ..rewards import RewardError
from ..rewards.code import CodeSettings, settings_from
from ..tasks import Task

# Bad input (a missing file, a malformed dataset or checkpoint, a reward that cannot run): a
# message. FileNotFoundError: a checkpoint or model missing one of its files.
BAD_INPUT = (ValueError, RewardError, FileNotFoundError)


def bad_input(prog: str, error: Exception) -> int:
    """Print `prog: error: ...` on stderr; returns the exit status, 2 (as argparse's)."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def failed_write(prog: str, error: BaseException, *, retry: str, option: str) -> int | None:
    """A filesystem that refused a write (full, read-only, no permission): one line on stderr
    saying what to do, exit status 1. None when `error` is something else (re-raise it).
    retry: how to go on once space is freed; option: the flag that names the output."""
    found = files.write_error(error)
    if found is None:
        return None
    code, what = found
    if code in (errno.ENOSPC, errno.EDQUOT):
        advice = f"free some space, then {retry}"
    else:
        advice = f"choose a writable {option}"
    print(f"{prog}: error: cannot write: {what}; {advice}", file=sys.stderr)
    return 1


# What a saved model directory holds (grpo.models.save_model, a tokenizer, grpo-eval's report):
# grpo-sft --overwrite replaces a directory of these and nothing else (adapter/: the LoRA
# adapters grpo-sft --lora-rank writes beside the merged model).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
               "eval.json", "adapter")  # fmt: skip


def check_output(path: Path, *, overwrite: bool, kind: str) -> None:
    """Refuse to write `path` where that would destroy something: an existing output is
    replaced only with --overwrite, and only when it is what this kind of command writes
    (kind: "model" directory, "jsonl" rows, "report" JSON). ValueError naming what is there."""
    blocker = files.file_in_path(path)
    if blocker is not None:
        flag = "--output-dir" if kind == "model" else "--output"
        raise ValueError(f"{flag} {path}: {blocker} is a file, not a directory")
    if kind == "model":
        if path.exists() and not path.is_dir():
            raise ValueError(f"--output-dir {path} is a file, not a directory")
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        if not found:
            return
        foreign = [n for n in found if not _model_file(n)]
        if foreign or "config.json" not in found:
            what = ", ".join(foreign[:5]) or "no config.json"
            raise ValueError(
                f"--output-dir {path} is not empty and not a saved model (found {what}): "
                f"choose a new directory; nothing was changed"
            )
        if not overwrite:
            raise ValueError(f"--output-dir {path} holds a model; pass --overwrite to replace it")
        return
    flag = "--output"
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory, not a file")
    if not path.exists():
        return
    if not _looks_like(path, kind):
        raise ValueError(
            f"{flag} {path} exists and is not a {kind} this command wrote: choose a new file; "
            f"nothing was changed"
        )
    if not overwrite:
        raise ValueError(f"{flag} {path} exists; pass --overwrite to replace it")


def _model_file(name: str) -> bool:
    hidden = name.startswith(".") and ".tmp-" in name  # a save interrupted earlier
    return name in MODEL_FILES or name.endswith(".safetensors") or hidden


def _looks_like(path: Path, kind: str) -> bool:
    """A JSONL of prompt/completion rows (grpo-sample), or a grpo-eval report."""
    try:
        with path.open(encoding="utf-8") as f:
            if kind == "jsonl":
                first = f.readline()
                row = json.loads(first) if first.strip() else {}
                return isinstance(row, dict) and (not row or {"prompt", "completion"} <= set(row))
            report = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"settings", "metrics"} <= set(report)


def add_overwrite_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an existing {what} (only ever one this command wrote)",
    )


def describe(doc: str) -> str:
    """A command's --help description: its module docstring's first paragraph, less the
    leading "grpo-NAME: "."""
    first = doc.split("\n\n")[0].split(": ", 1)[-1]
    return first[:1].upper() + first[1:]


def add_prompt_arguments(
    parser: argparse.ArgumentParser, *, data_columns: str = "prompt (and answer)"
) -> None:
    """--task, --task-args, --data, --eval-size, --seed, --template."""
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--task",
        default="arithmetic",
        help="built-in task (without --data): arithmetic, countdown, sort, reverse",
    )
    group.add_argument(
        "--task-args",
        type=json.loads,
        default={},
        help='task options as JSON (grpo-train\'s built-in demo: \'{"operators": "+"}\')',
    )
    group.add_argument("--data", default="", help=f"JSONL with {data_columns} columns")
    group.add_argument(
        "--eval-size",
        type=int,
        default=200,
        help="grpo-train's held-out prompts of a built-in task (same --seed): grpo-eval's "
        "prompts, never sampled by grpo-sample or trained on by grpo-sft",
    )
    group.add_argument("--seed", type=int, default=0, help="data split and sampling seed")
    group.add_argument(
        "--template",
        default=None,
        help="prompt template [short for character tokenizers, else r1zero]",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model (required), --reward, --num-prompts, --max-completion-length,
    --max-prompt-length, --batch-size, --progress, --rollout."""
    group = parser.add_argument_group("model and generation")
    group.add_argument("--model", required=True, help="HF model directory with tokenizer")
    group.add_argument(
        "--reward", nargs="+", default=[], help="extra reward functions to run and report"
    )
    group.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    group.add_argument(
        "--max-completion-length",
        type=int,
        default=None,
        help="[64 for character tokenizers, else 256]",
    )
    group.add_argument("--max-prompt-length", type=int, default=512)
    group.add_argument("--batch-size", type=int, default=256, help="sequences generated per batch")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument(
        "--rollout",
        default="transformers",
        choices=("transformers", "vllm"),
        help="sampling engine (vllm: needs the vllm package and a GPU)",
    )
    # The code reward's flags, as grpo-train has them (same names, defaults and help).
    code = parser.add_argument_group("code reward (--reward code)")
    for f in dataclasses.fields(DataConfig):
        if f.name.startswith("code_"):
            code.add_argument(
                "--" + f.name.replace("_", "-"),
                type=type(f.default),
                default=f.default,
                choices=f.metadata.get("choices"),
                help=f.metadata["help"],
            )


def code_settings(args: argparse.Namespace) -> CodeSettings:
    """The code reward's settings the --code-* flags give."""
    return settings_from(args)


def add_sampling_arguments(
    parser: argparse.ArgumentParser,
    *,
    samples: int,
    temperature: float,
    top_p: float,
    note: str | None = None,
) -> None:
    """--samples, --temperature, --top-p with the command's defaults (note: their source)."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--samples", type=int, default=samples, help="k: completions per prompt")
    group.add_argument("--temperature", type=float, default=temperature, help=note)
    group.add_argument("--top-p", type=float, default=top_p, help=note)


@dataclass
class Source:
    """The model and prompts the shared arguments name, with the rewards that score them."""

    model: Any
    tokenizer: Any
    device: torch.device
    template: str
    max_completion_length: int
    task: Task | None  # None for --data
    examples: list[dict]
    reward_fns: list


def load_source(
    args: argparse.Namespace,
    *,
    split: str,
    num_prompts: int | None,
    needs_answer: bool,
    extra_rewards: list[str],
) -> Source:
    """Load --model (eval mode), resolve its template and completion length, and take the
    prompts of `split` (grpo.evaluation.prompt_examples) and the task's rewards plus
    extra_rewards."""
    # Prompts and rewards first: a bad dataset or a missing sandbox fails before the model loads.
    task, examples = prompt_examples(
        task=args.task,
        task_args=args.task_args,
        data=args.data,
        seed=args.seed,
        eval_size=args.eval_size,
        split=split,
        num_prompts=num_prompts,
        needs_answer=needs_answer,
    )
    reward_fns = reward_functions(task, extra_rewards, code_settings(args))
    model, tokenizer, device = load_model_for_eval(args.model)
    template = resolve_template(args.template, tokenizer)
    max_new = resolve_completion_length(args.max_completion_length, tokenizer)
    return Source(model, tokenizer, device, template, max_new, task, examples, reward_fns)


def open_engine(args: argparse.Namespace, source: Source):
    """The one rollout engine (--rollout) the command samples with."""
    return build_engine(
        source.model,
        source.tokenizer,
        args.rollout,
        temperature=args.temperature,
        top_p=args.top_p,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=source.max_completion_length,
        model_path=args.model,
        seed=args.seed,
    )


def sample(
    args: argparse.Namespace,
    source: Source,
    engine,
    *,
    samples: int,
    desc: str,
    greedy: bool = False,
) -> Samples:
    """`samples` scored completions per prompt of source (one when greedy)."""
    return sample_and_score(
        source.model,
        source.tokenizer,
        source.examples,
        source.reward_fns,
        template=source.template,
        samples=samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_completion_length=source.max_completion_length,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size,
        greedy=greedy,
        progress=args.progress,
        desc=desc,
        engine=engine,
    )
