"""Dataset plumbing: training streams and held-out splits of a task, JSONL datasets, prompt
templates.

An example is a dict with at least ``"prompt"`` (the question, without template) and
``"answer"`` (a str); tasks may add columns (Countdown: ``"numbers"``, ``"target"``), and every
column reaches the reward functions as a list aligned with the completions.

The built-in tasks themselves (generators, worked solutions, rewards) are in ``grpo.tasks``;
this module only draws from them: a stream is reproducible and resumable from its position
alone, because a task's ``example(index, seed)`` is a pure function of its arguments.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: dataset plumbing needs no task code
    from .tasks import Task

__all__ = [
    "TEMPLATES",
    "DatasetError",
    "JsonlStream",
    "TrainStream",
    "format_prompt",
    "load_jsonl",
    "split_examples",
    "task_splits",
]


class DatasetError(ValueError):
    """A dataset file is malformed or empty."""


# --------------------------------------------------------------------------------------------
# Streams and held-out splits

# How many consecutive excluded (or duplicate) draws mean the task has run out of prompts.
_MAX_SKIPS = 100_000
# Offset of the eval seed: far from the small seeds people use for training runs.
_EVAL_SEED_OFFSET = 1_000_003


class _Stream:
    """A resumable source of training examples: `position` says how far it has read."""

    @property
    def position(self) -> int:
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"position must be >= 0, got {value}")
        self._position = int(value)


class TrainStream(_Stream):
    """The training examples of ``task`` for ``seed``, skipping prompts in ``exclude``.

    ``position`` counts the indices consumed (skipped ones included), so
    ``TrainStream(task, seed, exclude, position=k)`` continues exactly where a stream that had
    reached ``k`` left off.
    """

    def __init__(
        self,
        task: Task,
        seed: int,
        exclude: set[str] | frozenset[str] = frozenset(),
        position: int = 0,
    ) -> None:
        self.task, self.seed, self.exclude = task, seed, frozenset(exclude)
        self.position = position

    def next_batch(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` training examples."""
        batch: list[dict[str, Any]] = []
        skipped = 0
        while len(batch) < n:
            ex = self.task.example(self._position, self.seed)
            self._position += 1
            if ex["prompt"] in self.exclude:
                skipped += 1
                if skipped > _MAX_SKIPS:
                    raise ValueError(
                        f"task {self.task.name!r}: {_MAX_SKIPS} draws in a row are "
                        "held-out prompts; the eval set covers the task"
                    )
                continue
            skipped = 0
            batch.append(ex)
        return batch


def task_splits(task: Task, seed: int, eval_size: int) -> tuple[list[dict[str, Any]], TrainStream]:
    """A held-out eval set of ``eval_size`` distinct prompts, and a training stream that never
    yields them.

    The eval set comes from its own seed (``seed + 1_000_003``), so it does not depend on how
    far training has gone, and is drawn before the training stream is defined.
    """
    if eval_size < 0:
        raise ValueError(f"eval_size must be >= 0, got {eval_size}")
    eval_seed = seed + _EVAL_SEED_OFFSET
    examples: list[dict[str, Any]] = []
    seen: set[str] = set()
    index = skipped = 0
    while len(examples) < eval_size:
        ex = task.example(index, eval_seed)
        index += 1
        if ex["prompt"] in seen:
            skipped += 1
            if skipped > _MAX_SKIPS:
                raise ValueError(f"task {task.name!r} has fewer than {eval_size} distinct prompts")
            continue
        skipped = 0
        seen.add(ex["prompt"])
        examples.append(ex)
    return examples, TrainStream(task, seed, exclude=seen)


# --------------------------------------------------------------------------------------------
# JSONL datasets


def load_jsonl(
    path: str | Path, *, require_answer: bool = False, require_completion: bool = False
) -> list[dict[str, Any]]:
    """Read one JSON object per line (blank lines skipped).

    Each needs a str ``"prompt"``; ``"answer"`` is optional unless ``require_answer`` and must
    be a str (JSON numbers are converted: ``42`` -> ``"42"``); ``"completion"`` (a str) is
    needed with ``require_completion`` (supervised data). Other keys are kept as columns.
    Raises ``DatasetError`` naming the file and line of the first bad line, or if there are no
    examples.
    """
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path} is a directory, not a JSONL file")
    examples = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(
                    f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from e
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: invalid JSON: {e}") from e
            if not isinstance(ex, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(ex).__name__}")
            if "prompt" not in ex:
                raise DatasetError(f"{where}: missing 'prompt'")
            if not isinstance(ex["prompt"], str):
                raise DatasetError(
                    f"{where}: 'prompt' must be a string, got {type(ex['prompt']).__name__}"
                )
            if "answer" in ex:
                ans = ex["answer"]
                if isinstance(ans, (int, float)) and not isinstance(ans, bool):
                    ex["answer"] = str(ans)
                elif not isinstance(ans, str):
                    raise DatasetError(
                        f"{where}: 'answer' must be a string or number, got {type(ans).__name__}"
                    )
            elif require_answer:
                raise DatasetError(f"{where}: missing 'answer'")
            if require_completion and not isinstance(ex.get("completion"), str):
                got = type(ex["completion"]).__name__ if "completion" in ex else "none"
                raise DatasetError(f"{where}: needs a string 'completion', got {got}")
            examples.append(ex)
    if not examples:
        raise DatasetError(f"{path} contains no examples")
    return examples


def split_examples(
    examples: list[dict[str, Any]], eval_size: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with ``seed`` and split into ``(train, eval)``, ``eval_size`` examples held out.

    Training examples whose prompt is also in the eval part (duplicates in the file) are
    dropped, so nothing held out is trained on.
    """
    if not 0 <= eval_size < len(examples):
        raise ValueError(
            f"eval_size must be in [0, {len(examples)}) to leave training examples, got {eval_size}"
        )
    order = list(range(len(examples)))
    random.Random(f"split:{seed}").shuffle(order)
    held = [examples[i] for i in order[:eval_size]]
    held_prompts = {ex["prompt"] for ex in held}
    train = [examples[i] for i in order[eval_size:] if examples[i]["prompt"] not in held_prompts]
    if not train:
        raise ValueError("every training example duplicates a held-out prompt")
    return train, held


class JsonlStream(_Stream):
    """Endless shuffled epochs over ``examples`` (a new permutation per epoch, from ``seed``),
    with the same ``next_batch`` / ``position`` interface as ``TrainStream``."""

    def __init__(self, examples: list[dict[str, Any]], seed: int, position: int = 0) -> None:
        if not examples:
            raise DatasetError("JsonlStream needs at least one example")
        self.examples, self.seed = examples, seed
        self.position = position
        self._epoch, self._order = -1, []  # cache of the current epoch's permutation

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(len(self.examples)))
            random.Random(f"jsonl:{self.seed}:{epoch}").shuffle(self._order)
            self._epoch = epoch
        return self._order

    def next_batch(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` examples (shallow copies, so callers may add keys)."""
        batch = []
        for _ in range(n):
            epoch, k = divmod(self._position, len(self.examples))
            batch.append(dict(self.examples[self._permutation(epoch)[k]]))
            self._position += 1
        return batch


# --------------------------------------------------------------------------------------------
# Prompt templates

TEMPLATES: dict[str, str] = {
    # DeepSeek-R1-Zero's template (Table 1 of the R1 paper).
    "r1zero": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer. The reasoning process and answer are enclosed "
        "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> "
        "reasoning process here </think> <answer> answer here </answer>. User: {prompt}. "
        "Assistant:"
    ),
    # For character-level demo models: every template char costs context; the completion
    # starts with <think> right after the newline.
    "short": "{prompt}\n",
    "none": "{prompt}",
}


def format_prompt(example: dict[str, Any], template: str, tokenizer: Any = None) -> str:
    """The model input for ``example``: a ``TEMPLATES`` name, ``"chat"`` (the tokenizer's chat
    template, as a user turn with the generation prompt), or a custom string with
    ``{prompt}``."""
    prompt = example["prompt"]
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    if template in TEMPLATES:
        return TEMPLATES[template].format(prompt=prompt)
    if "{prompt}" in template:
        # replace, not format: a custom template may contain other braces (JSON, LaTeX).
        return template.replace("{prompt}", prompt)
    raise ValueError(
        f"unknown template {template!r}; choose one of "
        f"{sorted([*TEMPLATES, 'chat'])} or a string containing '{{prompt}}'"
    )
