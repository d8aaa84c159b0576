"""Built-in verifiable tasks: each module holds one task's generator, worked solution and
reward (``Task.reward_functions()``), and this registry builds them by name.

- ``arithmetic``: ``ArithmeticTask`` ("47+38" -> "85"), checked by accuracy and format;
- ``countdown``: ``CountdownTask`` ("Using 3 7 12 make 19"), checked by its own
  ``countdown_reward`` and format;
- ``sort``, ``reverse``: ``SortTask``, ``ReverseTask`` ("sort 31 5 77" -> "5 31 77"), checked
  by accuracy and format.

Built-in tasks are generated, not downloaded, and all their text is printable ASCII, so the
character tokenizer of ``grpo.models.tiny`` covers it. Streams and held-out splits of a task are
in ``grpo.data``.
"""

from __future__ import annotations

import inspect
from typing import Any

from .arithmetic import ArithmeticTask
from .base import Task, worked_answer
from .countdown import CountdownTask
from .sort import ReverseTask, SortTask

__all__ = [
    "TASKS",
    "ArithmeticTask",
    "CountdownTask",
    "ReverseTask",
    "SortTask",
    "Task",
    "make_task",
    "worked_answer",
]

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
    params = inspect.signature(TASKS[name]).parameters
    accepted = [p for p in params if p != "self"]
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - set(accepted))
    if unknown and not open_ended:
        raise ValueError(
            f"task {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(accepted) or 'none'}"
        )
    return TASKS[name](**options)
