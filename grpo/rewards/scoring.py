"""Scoring a batch: every reward function on the completions and their columns, the output
of each checked strictly, and the watch that names rewards which never apply.

``score`` calls ``fn(completions, **columns)`` with the columns ``reward_columns`` builds;
None becomes NaN for ``group_advantages`` to skip.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .rules import RewardFn

__all__ = [
    "REWARD_LIMIT",
    "UNSCORED_PATIENCE",
    "RewardError",
    "UnscoredWatch",
    "example_columns",
    "looked_for",
    "reward_columns",
    "reward_metrics",
    "score",
]

# The largest reward magnitude accepted. group_advantages works in fp32, whose squares
# overflow near 1.8e19: a reward beyond this would turn the group's std into inf and every
# advantage into 0 or NaN without a word. 1e15 leaves room for 1e8 completions in one sum.
REWARD_LIMIT = 1e15
# Steps in a row in which no completion got any reward before the run stops.
UNSCORED_PATIENCE = 3


class RewardError(RuntimeError):
    """A reward function misbehaved: it raised, or returned the wrong count or a NaN/inf."""


def reward_metrics(reward_fns: Sequence[tuple[str, RewardFn]]) -> dict[str, float]:
    """What rewards count about their calls since the last time (a reward may have a
    ``pop_metrics()``: the code reward's verdicts), as ``<name>/<key>``; the counts restart."""
    out: dict[str, float] = {}
    for name, fn in reward_fns:
        pop = getattr(fn, "pop_metrics", None)
        if callable(pop):
            out.update({f"{name}/{key}": value for key, value in pop().items()})
    return out


def _row(columns: dict[str, Any], i: int, n: int) -> dict[str, Any]:
    """Columns for completion i alone: aligned lists are sliced, scalars passed through."""
    return {
        k: [v[i]] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in columns.items()
    }


def _preview(text: str) -> str:
    return repr(text[:200]) + ("..." if len(text) > 200 else "")


def _check(name: str, values: Any, completions: list[str], offset: int = 0) -> list[float]:
    """Validate a reward function's output; None -> NaN. ``offset`` locates per-row calls."""
    # Only sequences of numbers: list() of a dict gives its keys, of a str its characters.
    if isinstance(values, (np.ndarray, torch.Tensor)) and values.ndim == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(
            f"reward {name!r} returned {type(values).__name__}, not a list of numbers (one per "
            "completion)"
        )
    if len(values) != len(completions):
        raise RewardError(
            f"reward {name!r} returned {len(values)} values, expected {len(completions)} "
            "(one per completion)"
        )
    out = []
    for j, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError("text is not a number")
            f = float(v)
        except (TypeError, ValueError) as e:
            raise RewardError(
                f"reward {name!r} returned {v!r} for completion {offset + j}, not a number"
            ) from e
        if not math.isfinite(f):
            raise RewardError(
                f"reward {name!r} returned {f} for completion {offset + j} (use None for "
                f"'does not apply'): {_preview(completions[j])}"
            )
        if abs(f) > REWARD_LIMIT:
            raise RewardError(
                f"reward {name!r} returned {f:g} for completion {offset + j}: beyond "
                f"{REWARD_LIMIT:g}, the group statistics would overflow; rescale the reward"
            )
        out.append(f)
    return out


def score(
    reward_fns: list[tuple[str, RewardFn]],
    completions: list[str],
    columns: dict[str, Any],
    *,
    on_error: str = "raise",
) -> tuple[torch.Tensor, dict[str, int]]:
    """Run every reward function on the batch.

    Returns ``(rewards, failures)``: rewards (N, R) float32 with NaN where a function returned
    None, and per function the number of completions it failed on (only nonzero with
    ``on_error="zero"``).

    A wrong count or a NaN/inf value is always a ``RewardError`` (a bug in the function, not
    in the completion). When a function raises, it is called again on each completion alone to
    find the culprits: ``on_error="raise"`` re-raises naming the first failing completion;
    ``"zero"`` gives those completions 0.0 and counts them.
    """
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
    names = [name for name, _ in reward_fns]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {names}")
    n = len(completions)
    rewards = torch.full((n, len(reward_fns)), math.nan, dtype=torch.float32)
    failures = dict.fromkeys(names, 0)
    # Every function sees the batch as it was: one that edits its arguments is an error,
    # not a silent change of what the next function (or the next step's metrics) read.
    before = (list(completions), copy.deepcopy(columns))
    for r, (name, fn) in enumerate(reward_fns):
        try:
            values = fn(completions, **columns)
        except Exception as batch_error:
            values = []
            for i, text in enumerate(completions):
                try:
                    one = fn([text], **_row(columns, i, n))
                except Exception as e:
                    if on_error == "raise":
                        raise RewardError(
                            f"reward {name!r} raised {type(e).__name__}: {e} on completion {i}: "
                            f"{_preview(text)}"
                        ) from e
                    failures[name] += 1
                    values.append(0.0)
                    continue
                _check(name, one, [text], offset=i)  # count and finiteness, with its index
                values.append(list(one)[0])
            if on_error == "raise":
                # Every completion passes alone: the batch call itself is the problem. (With
                # "zero" the per-completion values stand: they are what the function says.)
                raise RewardError(
                    f"reward {name!r} raised {type(batch_error).__name__}: {batch_error} on the "
                    "batch, but on no single completion"
                ) from batch_error
        _check_unchanged(name, before, completions, columns)
        rewards[:, r] = torch.tensor(_check(name, values, completions), dtype=torch.float32)
    return rewards, failures


def _check_unchanged(
    name: str, before: tuple[list[str], dict[str, Any]], completions: list[str], columns: dict
) -> None:
    changed = ["completions"] if completions != before[0] else []
    changed += [
        k for k in sorted(set(columns) | set(before[1])) if columns.get(k) != before[1].get(k)
    ]
    if changed:
        raise RewardError(
            f"reward {name!r} modified its arguments ({', '.join(changed)}): a reward must "
            "not change what it is given; copy before editing"
        )


def looked_for(fn: RewardFn) -> list[str]:
    """The columns a reward function names as parameters: what it looks for in the batch."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return []
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    given = {"completions", "prompts", "completion_ids", "self"}
    return [p.name for p in params if p.kind in named and p.name not in given]


class UnscoredWatch:
    """Rewards that never apply: a reward that gives None for every completion of a batch is
    warned about once (naming the columns it looks for and those the batch has), and a run
    in which no completion gets any reward for ``patience`` batches in a row stops with a
    ``RewardError``: it would train on nothing (zero advantages, zero gradients)."""

    def __init__(self, reward_fns: Sequence[tuple[str, RewardFn]], patience: int) -> None:
        self.reward_fns, self.patience = list(reward_fns), patience
        self.warned: set[str] = set()
        self.streak = 0

    def _columns(self, fn: RewardFn, have: set[str]) -> str:
        wanted = looked_for(fn)
        missing = [c for c in wanted if c not in have]
        if not wanted:
            return "it names no column"
        return f"it looks for {', '.join(wanted)}" + (
            f" (missing: {', '.join(missing)})" if missing else ""
        )

    def update(self, rewards: torch.Tensor, columns: Iterable[str]) -> None:
        """rewards: (N, R), NaN where a function gave None; columns: the batch's column names."""
        have = set(columns)
        listed = ", ".join(sorted(have)) or "none"
        for r, (name, fn) in enumerate(self.reward_fns):
            if name not in self.warned and bool(rewards[:, r].isnan().all()):
                self.warned.add(name)
                warnings.warn(
                    f"reward {name!r} gave None for all {rewards.shape[0]} completions: "
                    f"{self._columns(fn, have)}; the data has {listed}",
                    stacklevel=2,
                )
        self.streak = self.streak + 1 if bool(rewards.isnan().all()) else 0
        if self.streak >= self.patience:
            names = "; ".join(f"{n}: {self._columns(fn, have)}" for n, fn in self.reward_fns)
            raise RewardError(
                f"no completion got a reward in {self.streak} steps in a row, so nothing is "
                f"learned: every reward gave None ({names}; the data has {listed})"
            )


def example_columns(examples: Sequence[dict]) -> list[str]:
    """The example columns reward functions get (every column but the prompt). Every
    example's keys, not the first one's: a dataset may mix shapes (the code reward's
    stdin/stdout and function tests), and a missing column is None for that example."""
    return [key for key in dict.fromkeys(k for ex in examples for k in ex) if key != "prompt"]


def reward_columns(
    examples: Sequence[dict],
    group_size: int,
    completion_lengths: list[int],
    truncated: list[bool],
    max_completion_length: int,
) -> dict[str, Any]:
    """The keyword columns reward functions get for group_size completions per example, in
    the trainer's layout: example columns repeated per completion (the raw question as
    "prompts"), completion lengths, truncation flags and max_completion_length."""
    columns = {
        key: [ex.get(key) for ex in examples for _ in range(group_size)]
        for key in example_columns(examples)
    }
    columns["prompts"] = [ex["prompt"] for ex in examples for _ in range(group_size)]
    columns["completion_lengths"] = completion_lengths
    columns["truncated"] = truncated
    columns["max_completion_length"] = max_completion_length
    return columns
