"""Training data: built-in verifiable tasks, JSONL datasets, prompt templates.

An example is a dict with at least ``"prompt"`` (the question, without template) and
``"answer"`` (a str); tasks may add columns (Countdown: ``"numbers"``, ``"target"``), and every
column reaches the reward functions as a list aligned with the completions.

Built-in tasks are generated, not downloaded: ``task.example(index, seed)`` is a pure function
of its arguments (seeded from a string, since Python's ``hash`` is salted per process), so a
stream is reproducible and resumable from its position alone. ``task.solution(example)`` writes
a short, correct worked answer in the R1 format for the cold-start SFT.

All generated text is printable ASCII, so the character tokenizer of ``models.tiny`` covers it.
"""

from __future__ import annotations

import ast
import json
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "TASKS",
    "TEMPLATES",
    "ArithmeticTask",
    "CountdownTask",
    "DatasetError",
    "JsonlStream",
    "ReverseTask",
    "SortTask",
    "Task",
    "TrainStream",
    "format_prompt",
    "load_jsonl",
    "make_task",
    "split_examples",
    "task_splits",
]


class DatasetError(ValueError):
    """A dataset file is malformed or empty."""


def _wrap(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


class Task(ABC):
    """A generator of verifiable examples.

    ``name`` identifies the task (and seeds its stream); ``rewards`` names the reward
    functions (``grpo.rewards.REWARDS``) that check it, a suggested default for the trainer.
    """

    name: str
    rewards: ClassVar[tuple[str, ...]] = ("accuracy", "format")

    def _rng(self, index: int, seed: int) -> random.Random:
        # String seeds go through SHA-512 in random.Random: stable across processes/platforms.
        return random.Random(f"{self.name}:{seed}:{index}")

    @abstractmethod
    def example(self, index: int, seed: int) -> dict[str, Any]:
        """The example at position ``index`` of the stream for ``seed`` (deterministic)."""

    @abstractmethod
    def solution(self, example: dict[str, Any]) -> str:
        """A correct worked completion ``<think>...</think><answer>...</answer>``."""


# --------------------------------------------------------------------------------------------
# Arithmetic


def _digits(n: int) -> list[int]:
    """Decimal digits, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_steps(a: int, b: int) -> list[str]:
    """Column addition: "7+8=15, 4+3+1=8" for 47+38 (carry shown as a third term)."""
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    return steps


def _sub_steps(a: int, b: int) -> list[str]:
    """Column subtraction for a >= b: "17-8=9, 4-1-3=0" for 47-38 (borrow shown as "-1")."""
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x = da[i]
        y = db[i] if i < len(db) else 0
        top = x + 10 if x - borrow < y else x  # borrow from the next column when short
        d = top - borrow - y
        steps.append(f"{top}" + (f"-{borrow}" if borrow else "") + f"-{y}={d}")
        borrow = int(top != x)
    return steps


def _mul_steps(a: int, b: int) -> list[str]:
    """Long multiplication by the digits of b: "47*8=376, 47*30=1410, 376+1410=1786"."""
    partials = [(d * 10**i, a * d * 10**i) for i, d in enumerate(_digits(b)) if d]
    if len(partials) <= 1:
        return [f"{a}*{b}={a * b}"]
    steps = [f"{a}*{m}={p}" for m, p in partials]
    steps.append("+".join(str(p) for _, p in partials) + f"={a * b}")
    return steps


_ARITH = re.compile(r"(\d+)([-+*])(\d+)")


@dataclass
class ArithmeticTask(Task):
    """``a op b`` with operands of up to ``digits`` digits and ``op`` drawn from ``operators``
    ("+", "-", "*"). Prompt "47+38", answer "85"; subtraction may go negative unless
    ``negative=False`` (then the larger operand comes first)."""

    digits: int = 2
    operators: str = "+-"
    negative: bool = True
    name: ClassVar[str] = "arithmetic"

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators must be a non-empty string of '+-*', got "
                             f"{self.operators!r}")

    def example(self, index: int, seed: int) -> dict[str, Any]:
        rng = self._rng(index, seed)
        hi = 10**self.digits - 1
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        op = rng.choice(self.operators)
        if op == "-" and not self.negative and a < b:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return {"prompt": f"{a}{op}{b}", "answer": str(value)}

    def solution(self, example: dict[str, Any]) -> str:
        m = _ARITH.fullmatch(example["prompt"].replace(" ", ""))
        if m is None:
            raise ValueError(f"not an arithmetic prompt: {example['prompt']!r}")
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        if op == "+":
            return _wrap(", ".join(_add_steps(a, b)) + f", so {a + b}", str(a + b))
        if op == "*":
            return _wrap(", ".join(_mul_steps(a, b)), str(a * b))
        if a >= b:
            return _wrap(", ".join(_sub_steps(a, b)) + f", so {a - b}", str(a - b))
        steps = ", ".join(_sub_steps(b, a))
        return _wrap(f"{a}-{b}=-({b}-{a}): {steps}, so {a - b}", str(a - b))


# --------------------------------------------------------------------------------------------
# Countdown

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _combine(left: tuple[int, str, int], op: str, right: tuple[int, str, int]
             ) -> tuple[int, str, int]:
    """(value, expression, precedence) of ``left op right`` with only the needed parentheses."""
    (lv, le, lp), (rv, re_, rp) = left, right
    p = _PREC[op]
    ls = le if lp >= p else f"({le})"
    # The right side also needs them at equal precedence for - and / (a-(b-c) != a-b-c).
    rs = re_ if rp > p or (rp == p and op in "+*") else f"({re_})"
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv if op == "*" else lv // rv
    return value, f"{ls}{op}{rs}", p


def _countdown_steps(expr: str) -> list[str]:
    """The intermediate results of an integer expression, in evaluation order."""
    steps: list[str] = []
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant):
            return int(node.value)
        assert isinstance(node, ast.BinOp)
        a, b, op = walk(node.left), walk(node.right), ops[type(node.op)]
        value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
        steps.append(f"{a}{op}{b}={value}")
        return value

    walk(ast.parse(expr, mode="eval").body)
    return steps


@dataclass
class CountdownTask(Task):
    """Reach ``target`` from ``count`` numbers in [1, max_number] with + - * /.

    The target is built by combining all the numbers in random order with random operations
    that keep every intermediate a positive integer (no x*1 or x/1), so it is reachable using
    each number exactly once. Targets stay <= ``max_target`` when the sampler finds one in a
    few hundred tries (else the smallest found is used). Prompt "Using 3 7 12 make 19";
    ``answer`` is that construction (one valid equation; score with the countdown reward).
    """

    count: int = 3
    max_number: int = 20
    max_target: int = 100
    name: ClassVar[str] = "countdown"
    rewards: ClassVar[tuple[str, ...]] = ("countdown", "format")

    def __post_init__(self) -> None:
        if self.count < 2 or self.max_number < 1:
            raise ValueError(f"need count >= 2 and max_number >= 1, got {self.count}, "
                             f"{self.max_number}")

    def _build(self, rng: random.Random, numbers: list[int]) -> tuple[int, str]:
        pool = [(n, str(n), 3) for n in numbers]
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            a, b = pool[i], pool[j]
            ops = ["+", "-", "*", "/"]
            rng.shuffle(ops)
            for op in ops:
                ok = (op == "+" or (op == "-" and a[0] > b[0])
                      or (op == "*" and a[0] > 1 and b[0] > 1)
                      or (op == "/" and b[0] > 1 and a[0] % b[0] == 0))
                if ok:
                    break
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [_combine(a, op, b)]
        return pool[0][0], pool[0][1]

    def example(self, index: int, seed: int) -> dict[str, Any]:
        rng = self._rng(index, seed)
        numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
        best: tuple[int, str] | None = None
        for _ in range(256):
            target, expr = self._build(rng, numbers)
            if best is None or target < best[0]:
                best = (target, expr)
            if target <= self.max_target:
                break
        target, expr = best
        return {
            "prompt": f"Using {' '.join(map(str, numbers))} make {target}",
            "answer": expr,
            "numbers": numbers,
            "target": target,
        }

    def solution(self, example: dict[str, Any]) -> str:
        expr = example["answer"]
        return _wrap(", ".join(_countdown_steps(expr)), expr)


# --------------------------------------------------------------------------------------------
# Sorting


@dataclass
class SortTask(Task):
    """Sort ``length`` numbers in [0, max_value], ascending ("sort 31 5 77" -> "5 31 77") or,
    with ``reverse=True`` as in ``sorted``, descending ("sort desc 31 5 77" -> "77 31 5")."""

    length: int = 5
    max_value: int = 99
    reverse: bool = False

    def __post_init__(self) -> None:
        if self.length < 1 or self.max_value < 0:
            raise ValueError(f"need length >= 1 and max_value >= 0, got {self.length}, "
                             f"{self.max_value}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "reverse" if self.reverse else "sort"

    def example(self, index: int, seed: int) -> dict[str, Any]:
        rng = self._rng(index, seed)
        values = [rng.randint(0, self.max_value) for _ in range(self.length)]
        verb = "sort desc" if self.reverse else "sort"
        return {
            "prompt": f"{verb} {' '.join(map(str, values))}",
            "answer": " ".join(map(str, sorted(values, reverse=self.reverse))),
        }

    def solution(self, example: dict[str, Any]) -> str:
        ordered = example["answer"].split()
        # The chain "5<31=31<77" states the order the answer lists.
        rel = ">" if self.reverse else "<"
        chain = ordered[0]
        for prev, cur in zip(ordered, ordered[1:], strict=False):
            chain += ("=" if prev == cur else rel) + cur
        return _wrap(chain, example["answer"])


@dataclass
class ReverseTask(SortTask):
    """``SortTask`` with ``reverse=True``: the "reverse" entry of ``TASKS``."""

    reverse: bool = True


TASKS: dict[str, type[Task]] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "sort": SortTask,
    "reverse": ReverseTask,
}


def make_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with its keyword options."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**options)


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

    def __init__(self, task: Task, seed: int, exclude: set[str] | frozenset[str] = frozenset(),
                 position: int = 0) -> None:
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
                    raise ValueError(f"task {self.task.name!r}: {_MAX_SKIPS} draws in a row are "
                                     "held-out prompts; the eval set covers the task")
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


def load_jsonl(path: str | Path, *, require_answer: bool = False) -> list[dict[str, Any]]:
    """Read one JSON object per line (blank lines skipped).

    Each needs a str ``"prompt"``; ``"answer"`` is optional unless ``require_answer`` and must
    be a str (JSON numbers are converted: ``42`` -> ``"42"``). Other keys are kept as columns.
    Raises ``DatasetError`` naming the file and line of the first bad line, or if there are no
    examples.
    """
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: invalid JSON: {e}") from e
            if not isinstance(ex, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(ex).__name__}")
            if "prompt" not in ex:
                raise DatasetError(f"{where}: missing 'prompt'")
            if not isinstance(ex["prompt"], str):
                raise DatasetError(f"{where}: 'prompt' must be a string, got "
                                   f"{type(ex['prompt']).__name__}")
            if "answer" in ex:
                ans = ex["answer"]
                if isinstance(ans, (int, float)) and not isinstance(ans, bool):
                    ex["answer"] = str(ans)
                elif not isinstance(ans, str):
                    raise DatasetError(f"{where}: 'answer' must be a string or number, got "
                                       f"{type(ans).__name__}")
            elif require_answer:
                raise DatasetError(f"{where}: missing 'answer'")
            examples.append(ex)
    if not examples:
        raise DatasetError(f"{path} contains no examples")
    return examples


def split_examples(examples: list[dict[str, Any]], eval_size: int, seed: int
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with ``seed`` and split into ``(train, eval)``, ``eval_size`` examples held out.

    Training examples whose prompt is also in the eval part (duplicates in the file) are
    dropped, so nothing held out is trained on.
    """
    if not 0 <= eval_size < len(examples):
        raise ValueError(f"eval_size must be in [0, {len(examples)}) to leave training "
                         f"examples, got {eval_size}")
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
    raise ValueError(f"unknown template {template!r}; choose one of "
                     f"{sorted([*TEMPLATES, 'chat'])} or a string containing '{{prompt}}'")
