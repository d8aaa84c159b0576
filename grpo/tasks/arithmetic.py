"""The arithmetic task: ``a op b`` with worked column arithmetic as its solution.

Scored by the generic accuracy reward (the ``answer`` column, compared by value) and the
format reward, the ``Task`` defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ..rewards import RewardFn, accuracy_reward, format_reward
from .base import Task, worked_answer

__all__ = ["ArithmeticTask"]


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
            raise ValueError(
                f"operators must be a non-empty string of '+-*', got {self.operators!r}"
            )

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
            return worked_answer(", ".join(_add_steps(a, b)) + f", so {a + b}", str(a + b))
        if op == "*":
            return worked_answer(", ".join(_mul_steps(a, b)), str(a * b))
        if a >= b:
            return worked_answer(", ".join(_sub_steps(a, b)) + f", so {a - b}", str(a - b))
        steps = ", ".join(_sub_steps(b, a))
        return worked_answer(f"{a}-{b}=-({b}-{a}): {steps}, so {a - b}", str(a - b))

    def reward_functions(self) -> list[tuple[str, RewardFn]]:
        """The answer column, compared by value, then format."""
        return [("accuracy", accuracy_reward), ("format", format_reward)]
