"""The Countdown task: reach a target from given numbers with + - * /.

The expression evaluator and the reward live in grpo.rewards.countdown: the generator here
computes its intermediate values with the evaluator's operator table, the worked solution
prints ``evaluate``'s steps, and ``countdown_reward`` checks an answer with it, so the three
never disagree about what an expression is worth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from ..rewards import RewardFn, format_reward
from ..rewards.countdown import MAX_EXPR_CHARS, OPS, Evaluation, countdown_reward, evaluate
from .base import Task, worked_answer

__all__ = ["MAX_EXPR_CHARS", "CountdownTask", "Evaluation", "countdown_reward", "evaluate"]

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
    value = OPS[op](Fraction(lv), Fraction(rv))  # the evaluator's arithmetic, exact
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
