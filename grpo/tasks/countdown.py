"""The Countdown task: reach a target from given numbers with + - * /.

It holds the one Countdown expression evaluator, ``evaluate``: exact arithmetic (Fractions)
over a whitelisted AST, never ``eval()``. The generator computes its intermediate values
with the same operator table, the worked solution prints ``evaluate``'s steps, and the
reward, ``countdown_reward``, checks an answer's value and numbers with it, so the three can
never disagree about what an expression is worth.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from ..rewards import RewardFn, extract_answer, format_reward
from .base import Task, worked_answer

__all__ = ["MAX_EXPR_CHARS", "CountdownTask", "Evaluation", "countdown_reward", "evaluate"]

# Exact on Fractions: 7/2*6 is 21 (floor division would say 18).
_OPS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_EXPR_CHARS = re.compile(r"[\d+\-*/()\s]+")
# Long enough for any sensible equation; bounds the parser's work on adversarial text.
MAX_EXPR_CHARS = 256


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate`` found: the exact ``value``, the integer literals in the order they
    appear (``numbers``), and one ``"a op b=v"`` per operation in evaluation order
    (``steps``)."""

    value: Fraction
    numbers: tuple[int, ...]
    steps: tuple[str, ...]


def evaluate(expr: str, *, max_chars: int | None = MAX_EXPR_CHARS) -> Evaluation | None:
    """Evaluate an expression of integers, + - * / and parentheses, exactly.

    Returns None if the text is anything else (unary minus, floats, powers, names, calls...),
    longer than ``max_chars`` (None: no limit, for the task's own expressions), or divides
    by zero. Walks the AST itself with a whitelist: never eval().
    """
    if (max_chars is not None and len(expr) > max_chars) or not _EXPR_CHARS.fullmatch(expr):
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    numbers: list[int] = []
    steps: list[str] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            op = _AST_OPS[type(node.op)]
            a, b = walk(node.left), walk(node.right)
            value = _OPS[op](a, b)
            steps.append(f"{a}{op}{b}={value}")
            return value
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"disallowed syntax: {type(node).__name__}")

    try:
        value = walk(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return Evaluation(value, tuple(numbers), tuple(steps))


def countdown_reward(
    completions: list[str],
    numbers: Sequence[Sequence[int]],
    target: Sequence[int],
    **kwargs: Any,
) -> list[float]:
    """1.0 if the last ``<answer>`` is an expression that reaches ``target`` exactly, else 0.0.

    Allowed: integers, + - * /, parentheses (no unary minus). Each given number may be used at
    most once and no other number may appear. Arithmetic is exact (Fractions), so 7/2*2 == 7;
    division by zero scores 0.
    """
    out = []
    for text, nums, tgt in zip(completions, numbers, target, strict=True):
        expr = extract_answer(text)
        found = evaluate(expr) if expr else None
        if found is None:
            out.append(0.0)
            continue
        # Counter subtraction keeps only positive counts: anything left was not available.
        over = Counter(found.numbers) - Counter(int(n) for n in nums)
        out.append(float(not over and found.value == Fraction(int(tgt))))
    return out


# (value, expression, precedence) of a partial expression while the generator builds one;
# a bare number has precedence 3, above any operator. Values are ints: the generator only
# makes positive integer intermediates, and int comparisons keep its retries cheap.
_Term = tuple[int, str, int]
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _combine(left: _Term, op: str, right: _Term) -> _Term:
    """``left op right`` with only the needed parentheses."""
    (lv, le, lp), (rv, re_, rp) = left, right
    p = _PREC[op]
    ls = le if lp >= p else f"({le})"
    # The right side also needs them at equal precedence for - and / (a-(b-c) != a-b-c).
    rs = re_ if rp > p or (rp == p and op in "+*") else f"({re_})"
    value = _OPS[op](Fraction(lv), Fraction(rv))  # the evaluator's arithmetic, exact
    return int(value), f"{ls}{op}{rs}", p


@dataclass
class CountdownTask(Task):
    """Reach ``target`` from ``count`` numbers in [1, max_number] with + - * /.

    The target is built by combining all the numbers in random order with random operations
    that keep every intermediate a positive integer (no x*1 or x/1), so it is reachable using
    each number exactly once. Targets stay <= ``max_target`` when the sampler finds one in a
    few hundred tries (else the smallest found is used). Prompt "Using 3 7 12 make 19";
    ``answer`` is that construction (one valid equation; the countdown reward accepts any).
    """

    count: int = 3
    max_number: int = 20
    max_target: int = 100
    name: ClassVar[str] = "countdown"

    def __post_init__(self) -> None:
        if self.count < 2 or self.max_number < 1:
            raise ValueError(
                f"need count >= 2 and max_number >= 1, got {self.count}, {self.max_number}"
            )

    def _build(self, rng: random.Random, numbers: list[int]) -> tuple[int, str]:
        pool: list[_Term] = [(n, str(n), 3) for n in numbers]
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            a, b = pool[i], pool[j]
            ops = ["+", "-", "*", "/"]
            rng.shuffle(ops)
            for op in ops:
                ok = (
                    op == "+"
                    or (op == "-" and a[0] > b[0])
                    or (op == "*" and a[0] > 1 and b[0] > 1)
                    or (op == "/" and b[0] > 1 and a[0] % b[0] == 0)  # exact: stays an int
                )
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
        # The task's own expression: trusted, so no length limit (large counts run long).
        found = evaluate(expr, max_chars=None)
        if found is None:
            raise ValueError(f"not a countdown expression: {expr!r}")
        return worked_answer(", ".join(found.steps), expr)

    def reward_functions(self) -> list[tuple[str, RewardFn]]:
        """The countdown reward (any equation that reaches the target), then format."""
        return [("countdown", countdown_reward), ("format", format_reward)]
