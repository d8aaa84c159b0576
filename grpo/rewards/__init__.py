"""Rewards: answer parsing (``parsing``, at the bottom), the rule rewards that hold for any task
(``rules``), Countdown's (``countdown``), the code reward with its sandbox (``code``,
``sandbox``, ``sandbox_harness``, ``sandbox_cgroup``), scoring a batch (``scoring``), and, here
on top, the registry: ``REWARDS`` (the names ``--rewards`` accepts), ``CORRECTNESS`` and
``resolve_reward``. Nothing in this package imports grpo.tasks: the tasks build on it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from .code import code_reward
from .countdown import countdown_reward
from .parsing import answer_key, extract_answer, normalize_number
from .rules import (
    RewardFn,
    accuracy_reward,
    format_reward,
    language_consistency_reward,
    overlong_reward,
)
from .scoring import (
    REWARD_LIMIT,
    UNSCORED_PATIENCE,
    RewardError,
    UnscoredWatch,
    example_columns,
    looked_for,
    reward_columns,
    reward_metrics,
    score,
)

__all__ = [
    "CORRECTNESS",
    "REWARDS",
    "REWARD_LIMIT",
    "UNSCORED_PATIENCE",
    "RewardError",
    "RewardFn",
    "UnscoredWatch",
    "accuracy_reward",
    "answer_key",
    "code_reward",
    "correctness_reward",
    "countdown_reward",
    "example_columns",
    "extract_answer",
    "format_reward",
    "language_consistency_reward",
    "looked_for",
    "normalize_number",
    "overlong_reward",
    "resolve_reward",
    "reward_columns",
    "reward_metrics",
    "score",
]

# The names the CLI and configs accept (``--reward NAME``); each task's default rewards
# (``Task.reward_functions()``) use these names too.
REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language": language_consistency_reward,
    "countdown": countdown_reward,
    "overlong": overlong_reward,
    "code": code_reward,
}

# The rewards that say whether an answer is right; the first of them a run uses is its
# accuracy (held-out evaluation, the "accuracy" metric, pass@k).
CORRECTNESS = ("accuracy", "countdown", "code")


def correctness_reward(reward_fns: Sequence[tuple[str, RewardFn]]) -> RewardFn:
    """The first reward of reward_fns named in CORRECTNESS; accuracy_reward when none is."""
    return next((fn for name, fn in reward_fns if name in CORRECTNESS), accuracy_reward)


def resolve_reward(spec: str) -> tuple[str, RewardFn]:
    """Turn a reward spec into ``(name, fn)``: a ``REWARDS`` name, or ``"package.module:function"``
    (imported; the name is then the function's part of the spec)."""
    if spec in REWARDS:
        return spec, REWARDS[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown reward {spec!r}: use one of {sorted(REWARDS)} or 'package.module:function'"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward spec {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: {e}") from e
    except Exception as e:  # the module itself is broken: a SyntaxError, or its code raised
        raise ValueError(
            f"reward {spec!r}: importing module {module_name!r} raised {type(e).__name__}: {e}"
        ) from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return attr, fn
