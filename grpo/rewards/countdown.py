"""Countdown's reward and the one Countdown expression evaluator, ``evaluate``: exact arithmetic
(Fractions) over a whitelisted AST, never ``eval()``. The task (grpo.tasks.countdown) builds
its expressions with the same operator table (``OPS``) and prints ``evaluate``'s steps as its
worked solutions, so generator, solution and reward never disagree about what an expression
is worth."""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .parsing import extract_answer

__all__ = ["MAX_EXPR_CHARS", "OPS", "Evaluation", "countdown_reward", "evaluate"]

# Exact on Fractions: 7/2*6 is 21 (floor division would say 18).
OPS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}
_ASTOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
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
        if isinstance(node, ast.BinOp) and type(node.op) in _ASTOPS:
            op = _ASTOPS[type(node.op)]
            a, b = walk(node.left), walk(node.right)
            value = OPS[op](a, b)
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
