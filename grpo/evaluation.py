"""k scored samples per prompt, the library under grpo-eval and grpo-sample: prompt sources,
the model's default template and completion length, batched sampling, scoring with the
training rewards; then what is made of the samples: the metrics (pass@k, cons@k) and the
evaluation report (`summarize`, `per_prompt`), and the rejection filter that turns them into
SFT data (`rejection_filter`); and grpo-train's held-out greedy accuracy.

Sampling goes through the trainer's rollout engines (`make_engine`) and scoring through
`grpo.rewards.score` with the same reward functions and columns as a GRPO step, so a number
reported here means what the trainer's reward meant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from grpo.models import load_model

from . import data as data_mod
from . import distributed as dist_mod
from . import lora as lora_mod
from . import rewards as rewards_mod
from . import tasks as tasks_mod
from .config import DEMO
from .rewards import code as code_mod
from .rollout import SamplingParams, make_engine

__all__ = [
    "Samples",
    "build_engine",
    "cons_at_k",
    "default_pass_ks",
    "greedy_accuracy",
    "is_char_tokenizer",
    "load_model_for_eval",
    "majority_vote",
    "pass_at_k",
    "per_prompt",
    "prompt_examples",
    "rejection_filter",
    "resolve_completion_length",
    "resolve_template",
    "reward_functions",
    "sample_and_score",
    "summarize",
]


# --- metrics of k samples -------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al., 2021):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement from the n
    include a correct one. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms
    the binomials (they overflow floats for n in the hundreds)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(keys: Sequence[str | None]) -> int | None:
    """Index of the sample that represents the most frequent answer key, or None when no
    sample has an answer. Samples without an answer (None) do not vote.

    Tie rule: among the answers with the top count, the one sampled first wins (its first
    occurrence is earliest). The order is the sampling order, which knows nothing of
    correctness, so a tie is neither credited nor penalised on purpose.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[key] for key, count in counts.items() if count == best)


def cons_at_k(texts: Sequence[str], correct: Sequence[bool]) -> bool:
    """cons@k of one prompt: whether the majority answer of its k completions is correct.
    Answers are compared as the accuracy reward compares them (`rewards.answer_key`); the
    verdict is the correctness reward's on the sample that represents the winning answer, so
    tasks with their own checker (Countdown) vote the same way."""
    winner = majority_vote([rewards_mod.answer_key(t) for t in texts])
    return winner is not None and bool(correct[winner])


# --- models, templates, prompts -------------------------------------------------------------


def is_char_tokenizer(tokenizer) -> bool:
    """True for a character-level vocabulary (every regular token one character), such as
    grpo.models.tiny's: such models get the demo's template and completion length (config.DEMO),
    as grpo-train gives its built-in model.

    grpo-eval, grpo-sample and grpo-sft read a model directory, which may be one the demo
    built (a run's final/): they key these two defaults on the tokenizer, not on
    config.is_demo (no --model), which is false for such a directory."""
    added = set(tokenizer.get_added_vocab())
    return all(len(tok) == 1 for tok in tokenizer.get_vocab() if tok not in added)


def resolve_template(template: str | None, tokenizer) -> str:
    """The given template, else DEMO's ("short") for character-level tokenizers (the built-in
    model) and grpo-train's default, "r1zero", otherwise."""
    if template:
        return template
    return DEMO["template"] if is_char_tokenizer(tokenizer) else "r1zero"


def resolve_completion_length(max_completion_length: int | None, tokenizer) -> int:
    """The given length, else DEMO's (64) for character-level tokenizers and grpo-train's
    default, 256, otherwise."""
    if max_completion_length:
        return max_completion_length
    return DEMO["max_completion_length"] if is_char_tokenizer(tokenizer) else 256


def load_model_for_eval(path: str):
    """(model, tokenizer, device) in eval mode: bf16 on a GPU, fp32 on the CPU. A directory
    without tokenizer files is a ValueError (models.CheckpointError). `path` may also be a
    LoRA adapter in PEFT's format (a run's final/adapter/): its base model with the adapters
    merged in."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if lora_mod.is_adapter_dir(path):
        model, tokenizer = lora_mod.load_adapter_model(path, dtype=dtype, device=device)
    else:
        model, tokenizer = load_model(path, dtype=dtype, device=device)
    model.eval()
    return model, tokenizer, device


def reward_functions(
    task: tasks_mod.Task | None,
    extra: Sequence[str] = (),
    code: code_mod.CodeSettings | None = None,
) -> list[tuple[str, Any]]:
    """The rewards a GRPO run on this task uses by default (accuracy and format; countdown and
    format for Countdown), then the extra specs. The first one decides correctness: for a
    dataset, an extra "code" takes accuracy's place (programs checked against tests). A code
    reward runs with `code` (default: the defaults) and its sandbox is checked here, before
    any model is loaded."""
    if task is not None:
        names = list(task.rewards)
    else:
        names = ["code" if "code" in extra else "accuracy", "format"]
    names += [name for name in extra if name not in names]
    fns = [rewards_mod.resolve_reward(name) for name in names]
    return code_mod.with_code_settings(fns, code or code_mod.CodeSettings())


def prompt_examples(
    *,
    task: str,
    task_args: dict,
    data: str,
    seed: int,
    eval_size: int,
    split: str,
    num_prompts: int | None,
    needs_answer: bool,
) -> tuple[tasks_mod.Task | None, list[dict]]:
    """(task or None, examples) to sample from.

    Built-in tasks: split="eval" gives the held-out prompts grpo-train evaluates on (same
    seed and eval_size give the same prompts); split="train" gives the first num_prompts of
    the training stream, which never yields a held-out prompt. A JSONL file: its rows in
    order, the first num_prompts if given.
    """
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if data:
        try:
            examples = data_mod.load_jsonl(data, require_answer=needs_answer)
        except data_mod.DatasetError as e:
            hint = (
                " (the accuracy reward needs an 'answer' per example)"
                if needs_answer and "missing 'answer'" in str(e)
                else ""
            )
            raise data_mod.DatasetError(f"{e}{hint}") from e
        return None, examples[:num_prompts] if num_prompts else examples
    task_obj = tasks_mod.make_task(task, **task_args)
    evals, stream = data_mod.task_splits(task_obj, seed, eval_size)
    if split == "eval":
        return task_obj, evals[:num_prompts] if num_prompts else evals
    if split != "train":
        raise ValueError(f"split must be 'eval' or 'train', got {split!r}")
    return task_obj, stream.next_batch(num_prompts or eval_size)


# --- sampling and scoring -------------------------------------------------------------------


@dataclass
class Samples:
    """k scored completions for each of P prompts, in sampling order."""

    examples: list[dict]  # (P,)
    texts: list[list[str]]  # (P, k)
    lengths: torch.Tensor  # (P, k) completion tokens, EOS included
    truncated: torch.Tensor  # (P, k) bool: no EOS within max_completion_length
    rewards: torch.Tensor  # (P, k, R) NaN where a reward does not apply
    reward_names: list[str]  # (R,)

    def reward(self, name: str) -> torch.Tensor:
        return self.rewards[:, :, self.reward_names.index(name)]

    @property
    def correct(self) -> torch.Tensor:
        """(P, k) bool: the first reward (accuracy or countdown) gave full marks."""
        return self.rewards[:, :, 0] == 1.0


def build_engine(
    model,
    tokenizer,
    rollout: str,
    *,
    temperature: float,
    top_p: float,
    max_prompt_length: int,
    max_completion_length: int,
    model_path: str = "",
    seed: int = 0,
):
    """The rollout engine eval and sample draw from: transformers' generate, or vLLM (one
    engine for all calls: it holds its own weights and KV cache)."""
    sampling = SamplingParams(
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        temperature=temperature,
        top_p=top_p,
    )
    if rollout != "vllm":
        return make_engine(rollout, model, tokenizer, sampling)
    # A LoRA adapter directory: vLLM loads its base, then gets the merged weights pushed.
    adapter = bool(model_path) and lora_mod.is_adapter_dir(model_path)
    engine = make_engine(
        rollout,
        model,
        tokenizer,
        sampling,
        model_path=str(lora_mod.adapter_base(model_path)) if adapter else model_path,
        seed=seed,
        gpu_memory_utilization=0.7,
    )
    if not adapter:
        engine.mark_weights_current()  # model was loaded from model_path: nothing to push
    return engine


def sample_and_score(
    model,
    tokenizer,
    examples: list[dict],
    reward_fns: list,
    *,
    template: str,
    samples: int,
    temperature: float,
    top_p: float,
    max_completion_length: int,
    max_prompt_length: int = 512,
    batch_size: int = 256,
    greedy: bool = False,
    progress: bool = True,
    desc: str = "sampling",
    engine=None,
) -> Samples:
    """`samples` completions per example (one when greedy), generated in batches of about
    batch_size sequences, scored with reward_fns as a GRPO step scores them. engine: a rollout
    engine (build_engine) to sample with; default a TransformersEngine with these settings."""
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if not examples:
        raise ValueError("no prompts to sample from")
    k = 1 if greedy else samples
    if engine is None:
        engine = build_engine(
            model,
            tokenizer,
            "transformers",
            temperature=temperature,
            top_p=top_p,
            max_prompt_length=max_prompt_length,
            max_completion_length=max_completion_length,
        )
    texts, lengths, truncated = _generate_in_batches(
        engine,
        tokenizer,
        examples,
        template,
        k,
        greedy=greedy,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    return _score_samples(examples, texts, lengths, truncated, reward_fns, k, max_completion_length)


def _generate_in_batches(
    engine,
    tokenizer,
    examples: list[dict],
    template: str,
    k: int,
    *,
    greedy: bool,
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(texts, lengths, truncated) of k completions per example, in sampling order, drawn
    from the engine in chunks of about batch_size sequences under a progress bar."""
    per_batch = max(1, batch_size // k)
    texts: list[str] = []
    lengths, truncated = [], []
    bar = tqdm(
        total=len(examples) * k,
        desc=desc,
        unit="completion",
        disable=not progress,
        dynamic_ncols=True,
    )
    for start in range(0, len(examples), per_batch):
        chunk = examples[start : start + per_batch]
        prompts = [data_mod.format_prompt(ex, template, tokenizer) for ex in chunk]
        rollout = engine.generate(prompts, k, greedy=greedy)
        texts += rollout.texts
        lengths.append(rollout.lengths.cpu())
        truncated.append(rollout.truncated.cpu())
        bar.update(len(rollout))
    bar.close()
    return texts, torch.cat(lengths), torch.cat(truncated)


def _score_samples(
    examples: list[dict],
    texts: list[str],
    lengths: torch.Tensor,
    truncated: torch.Tensor,
    reward_fns: list,
    k: int,
    max_completion_length: int,
) -> Samples:
    """Score k completions per example with reward_fns, as a GRPO step scores them, and
    group them per prompt."""
    columns = rewards_mod.reward_columns(
        examples, k, lengths.tolist(), truncated.tolist(), max_completion_length
    )
    rewards, _ = rewards_mod.score(reward_fns, texts, columns)
    p = len(examples)
    return Samples(
        examples,
        [texts[i * k : (i + 1) * k] for i in range(p)],
        lengths.view(p, k),
        truncated.view(p, k),
        rewards.view(p, k, -1),
        [name for name, _ in reward_fns],
    )


# --- what is made of the samples: the evaluation report, SFT data ---------------------------


def default_pass_ks(samples: int) -> list[int]:
    """The j values of pass@j grpo-eval reports by default: 1, 2, 4, ... below k, and k."""
    ks, j = [], 1
    while j < samples:
        ks.append(j)
        j *= 2
    return ks + [samples]


def summarize(result: Samples, pass_ks: list[int]) -> dict:
    """The metrics of k scored samples per prompt (grpo-eval's report): pass@1, pass@j for
    j in pass_ks, cons@k, the format rate, each reward's mean, the mean completion length and
    the truncation rate."""
    correct = result.correct
    k = correct.shape[1]
    counts = correct.sum(1).tolist()
    metrics = {"prompts": len(counts), "samples": k, "pass@1": float(correct.float().mean())}
    for j in pass_ks:
        metrics[f"pass@{j}"] = float(np.mean([pass_at_k(k, c, j) for c in counts]))
    metrics[f"cons@{k}"] = float(
        np.mean(
            [
                cons_at_k(texts, row.tolist())
                for texts, row in zip(result.texts, correct, strict=True)
            ]
        )
    )
    if "format" in result.reward_names:
        metrics["format"] = float(result.reward("format").mean())
    for r, name in enumerate(result.reward_names):
        metrics[f"reward/{name}"] = float(torch.nanmean(result.rewards[:, :, r]))
    metrics["completion_length"] = float(result.lengths.float().mean())
    metrics["truncated"] = float(result.truncated.float().mean())
    return metrics


def per_prompt(result: Samples) -> list[dict]:
    """Each prompt's example with its count of correct samples, the completions and the
    answers the accuracy reward read from them."""
    rows = []
    for ex, texts, row in zip(result.examples, result.texts, result.correct, strict=True):
        rows.append(
            {
                **ex,
                "correct": int(row.sum()),
                "completions": texts,
                "answers": [rewards_mod.answer_key(t) for t in texts],
            }
        )
    return rows


def rejection_filter(
    result: Samples,
    *,
    keep: str = "correct",
    max_per_prompt: int | None = None,
    min_language: float | None = None,
) -> tuple[list[dict], dict]:
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
    checks = _rejection_checks(result, keep, min_language)
    passed = torch.ones_like(result.correct)
    for ok in checks.values():
        passed &= ok
    rows, duplicates, over_cap = _dedupe_and_cap(result, passed, max_per_prompt)
    stats = {
        "prompts": len(result.examples),
        "sampled": result.correct.numel(),
        "kept": len(rows),
        "prompts_kept": len({r["prompt"] for r in rows}),
        "rejected": {name: int((~ok).sum()) for name, ok in checks.items()},
        "duplicates": duplicates,
        "over_max_per_prompt": over_cap,
    }
    if not rows:
        reasons = ", ".join(f"{n} by {name}" for name, n in stats["rejected"].items())
        raise ValueError(
            f"no completion kept: {stats['sampled']} sampled, rejected {reasons}; "
            f"{duplicates} duplicates. Sample more (--samples, --num-prompts), at "
            f"a different --temperature, or relax the filter"
        )
    return rows, stats


def _rejection_checks(
    result: Samples, keep: str, min_language: float | None
) -> dict[str, torch.Tensor]:
    """The (P, k) bool pass masks a completion must all meet to be kept, by reward name:
    none for keep="all"; for keep="correct" the first reward at 1.0, "format" at 1.0 when
    scored, and "language" >= min_language when given."""
    checks: dict[str, torch.Tensor] = {}
    if keep == "correct":
        checks[result.reward_names[0]] = result.correct
        if "format" in result.reward_names:
            checks["format"] = result.reward("format") == 1.0
        if min_language is not None:
            checks["language"] = result.reward("language") >= min_language
    return checks


def _dedupe_and_cap(
    result: Samples, passed: torch.Tensor, max_per_prompt: int | None
) -> tuple[list[dict], int, int]:
    """(rows, duplicates, over_cap): each prompt's passed completions as example rows with a
    "completion" column, in sampling order, without repeats of a text within a prompt and at
    most max_per_prompt per prompt; and how many were dropped as duplicates and over the cap."""
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
    return rows, duplicates, over_cap


@torch.no_grad()
def greedy_accuracy(
    engine, examples: list[dict], prompt, check, *, batch_size: int = 256
) -> dict[str, float]:
    """grpo-train's held-out figures: greedy accuracy (by `check`, the task's first reward)
    and format rate. Under torchrun each rank answers every world-th prompt, in equally many
    batches (a rank with none repeats a prompt, since FSDP needs every rank in every forward),
    and the counts are summed over ranks."""
    rank, world = dist_mod.rank(), dist_mod.world_size()
    mine = examples[rank::world]
    batches = -(-len(examples[::world]) // batch_size)
    correct, formatted = [], []
    for i in range(0, batches * batch_size, batch_size):
        chunk = mine[i : i + batch_size] or examples[:1]
        rollout = engine.generate([prompt(ex) for ex in chunk], 1, greedy=True)
        if not mine[i : i + batch_size]:
            continue
        keys = dict.fromkeys(key for ex in chunk for key in ex)  # shapes may mix
        columns = {key: [ex.get(key) for ex in chunk] for key in keys}
        # None (does not apply; the code reward's sandbox failed) is not a correct answer.
        correct += [value or 0.0 for value in check(rollout.texts, **columns)]
        formatted += rewards_mod.format_reward(rollout.texts)
    sums = dist_mod.all_reduce(
        torch.tensor([sum(correct), sum(formatted), len(correct)], dtype=torch.float64)
    ).tolist()
    return {"accuracy": sums[0] / sums[2], "format": sums[1] / sums[2]}
