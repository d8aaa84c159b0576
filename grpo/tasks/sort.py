"""The sorting tasks: ``sort`` (ascending) and ``reverse`` (descending), solved by stating
the order as a chain of comparisons.

Scored by the generic accuracy reward (the answer is the ordered numbers, compared as
whitespace-collapsed text) and the format reward, the ``Task`` defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..rewards import RewardFn, accuracy_reward, format_reward
from .base import Task, worked_answer

__all__ = ["ReverseTask", "SortTask"]


@dataclass
class SortTask(Task):
    """Sort ``length`` numbers in [0, max_value], ascending ("sort 31 5 77" -> "5 31 77") or,
    with ``reverse=True`` as in ``sorted``, descending ("sort desc 31 5 77" -> "77 31 5")."""

    length: int = 5
    max_value: int = 99
    reverse: bool = False

    def __post_init__(self) -> None:
        if self.length < 1 or self.max_value < 0:
            raise ValueError(
                f"need length >= 1 and max_value >= 0, got {self.length}, {self.max_value}"
            )

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
        return worked_answer(chain, example["answer"])

    def reward_functions(self) -> list[tuple[str, RewardFn]]:
        """The answer column (the ordered numbers as text), then format."""
        return [("accuracy", accuracy_reward), ("format", format_reward)]


@dataclass
class ReverseTask(SortTask):
    """``SortTask`` with ``reverse=True``: the "reverse" entry of ``TASKS``."""

    reverse: bool = True
