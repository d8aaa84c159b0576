"""The ``Task`` base class: what every built-in task provides, and the R1 answer layout.

A task generates verifiable examples, writes a correct worked answer for any of them (the
cold-start SFT data) and names the reward functions that check an answer to it.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any

from ..rewards import RewardFn

__all__ = ["Task", "worked_answer"]


def worked_answer(reasoning: str, answer: str) -> str:
    """A completion in the R1 layout: ``<think>reasoning</think><answer>answer</answer>``."""
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


class Task(ABC):
    """A generator of verifiable examples, with their worked solutions and rewards.

    An example is a dict with ``"prompt"`` and ``"answer"`` (str) plus any columns the task's
    rewards need; ``name`` identifies the task (and seeds its stream).

    ``example(index, seed)`` is a pure function of its arguments (seeded from a string, since
    Python's ``hash`` is salted per process), so a stream is reproducible and resumable from
    its position alone.
    """

    name: str

    def _rng(self, index: int, seed: int) -> random.Random:
        # String seeds go through SHA-512 in random.Random: stable across processes/platforms.
        return random.Random(f"{self.name}:{seed}:{index}")

    @abstractmethod
    def example(self, index: int, seed: int) -> dict[str, Any]:
        """The example at position ``index`` of the stream for ``seed`` (deterministic)."""

    @abstractmethod
    def solution(self, example: dict[str, Any]) -> str:
        """A correct worked completion ``<think>...</think><answer>...</answer>``."""

    @abstractmethod
    def reward_functions(self) -> list[tuple[str, RewardFn]]:
        """The reward functions that check this task, as ``(name, fn)``: a run's default when
        no reward is given. The first one says whether an answer is correct (the accuracy
        metric, greedy evaluation, pass@k); each name is the ``grpo.rewards.REWARDS`` entry
        of the same function, so ``--reward NAME`` picks exactly it."""

    @property
    def rewards(self) -> tuple[str, ...]:
        """The names of ``reward_functions()``, in order (what configs and metrics show)."""
        return tuple(name for name, _ in self.reward_functions())
