"""Rule-based rewards, as in DeepSeek-R1-Zero: programs that check a completion.

This module holds the rewards that hold for any task and the machinery around them: answer
extraction and normalisation, accuracy against an ``answer`` column, format, language
consistency, DAPO's overlong punishment, the ``REWARDS`` names with ``resolve_reward``, and
``score`` for a batch. A reward that only makes sense for one built-in task lives with that
task in ``grpo.tasks`` (Countdown's in ``grpo.tasks.countdown``) and is named here too; so is
the code reward, which runs programs in a sandbox (``grpo.code_reward``, ``grpo.sandbox``).

A reward function has the signature ``fn(completions, **columns) -> list[float | None]``:

- ``completions``: the decoded completion texts (EOS/PAD already stripped);
- ``columns``: the batch's example columns as lists aligned with ``completions``
  (``answer=[...]``, ``numbers=[...]``, ``target=[...]``), plus ``completion_lengths``
  (tokens), ``truncated`` (bool per completion) and ``max_completion_length`` (a plain int).

Every function takes ``**kwargs`` and ignores the columns it does not use, so the trainer can
pass the whole batch to each. ``None`` means "does not apply to this sample" (TRL's
convention); ``score`` turns it into NaN for ``group_advantages`` to skip.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

RewardFn = Callable[..., list]

# The largest reward magnitude accepted. group_advantages works in fp32, whose squares
# overflow near 1.8e19: a reward beyond this would turn the group's std into inf and every
# advantage into 0 or NaN without a word. 1e15 leaves room for 1e8 completions in one sum.
REWARD_LIMIT = 1e15
# Steps in a row in which no completion got any reward before the run stops.
UNSCORED_PATIENCE = 3

__all__ = [
    "CORRECTNESS",
    "REWARDS",
    "RewardError",
    "accuracy_reward",
    "code_reward",
    "correctness_reward",
    "answer_key",
    "extract_answer",
    "format_reward",
    "language_consistency_reward",
    "normalize_number",
    "overlong_reward",
    "resolve_reward",
    "reward_metrics",
    "score",
    "UnscoredWatch",
]


class RewardError(RuntimeError):
    """A reward function misbehaved: it raised, or returned the wrong count or a NaN/inf."""


# --------------------------------------------------------------------------------------------
# Parsing helpers


def extract_answer(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` block, stripped; None if there is none.

    Searching backwards from the last closing tag picks the innermost-last block, so text like
    ``<answer>a<answer>b</answer>`` yields ``b`` rather than ``a<answer>b``.
    """
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d*)?")
_DECIMAL = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_FRACTION = re.compile(r"-?\d+/\d+")
# Exponents beyond this would build huge integers for no plausible answer ("1e999999999").
_MAX_EXPONENT = 100


def _to_fraction(s: str) -> Fraction | None:
    """Parse a number in any supported spelling to an exact Fraction, or None."""
    s = "".join(s.split())  # "1 000" and "- 5" are still numbers
    if s.startswith("+"):
        s = s[1:]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _FRACTION.fullmatch(s):
        num, den = s.split("/")
        if int(den) == 0:
            return None
        return Fraction(int(num), int(den))
    m = _DECIMAL.fullmatch(s)
    if m is None:
        return None
    if m.group(2) and abs(int(m.group(2)[1:])) > _MAX_EXPONENT:
        return None
    return Fraction(s)


def normalize_number(s: str) -> str | None:
    """Canonical string of a number, or None if ``s`` is not one.

    Accepts spaces, a leading "+", commas as thousands separators ("1,234" but not "1,2"),
    decimals ("0.50", "5."), exponents ("1e3") and fractions ("3/4"). Values that are equal
    get the same string: integers print plainly ("-0" -> "0", "2.0" -> "2"), terminating
    fractions as decimals without trailing zeros ("3/4" -> "0.75"), others as reduced "p/q".
    """
    if not isinstance(s, str):
        s = str(s)
    value = _to_fraction(s)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:  # does not terminate in base 10: keep it exact
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}".rstrip("0")


def _norm_text(s: str) -> str:
    return " ".join(s.split())


def answer_key(text: str) -> str | None:
    """The extracted answer of a completion in the form ``accuracy_reward`` compares: the
    canonical number when it is one, else the whitespace-collapsed text; None without an
    ``<answer>``. Answers with equal keys are the same answer (majority voting counts them
    together)."""
    pred = extract_answer(text)
    if pred is None:
        return None
    number = normalize_number(pred)
    return number if number is not None else _norm_text(pred)


# --------------------------------------------------------------------------------------------
# Rewards


def accuracy_reward(
    completions: list[str], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 if the last ``<answer>`` equals the reference, else 0.0 (None where answer is None).

    Numbers compare by value (``normalize_number``: "1,000" == "1000.0", "3/4" == "0.75");
    anything else compares as text after collapsing whitespace.
    """
    out: list[float | None] = []
    for text, ref in zip(completions, answer, strict=True):
        if ref is None:
            out.append(None)
            continue
        pred = extract_answer(text)
        if pred is None:
            out.append(0.0)
            continue
        ref = str(ref)
        pred_num, ref_num = normalize_number(pred), normalize_number(ref)
        if pred_num is not None and ref_num is not None:
            out.append(float(pred_num == ref_num))
        else:
            out.append(float(_norm_text(pred) == _norm_text(ref)))
    return out


# Leading whitespace is allowed: the R1-Zero template ends with "Assistant:" and a model
# naturally continues with " <think>"; everything else is as strict as R1's format check.
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 iff the completion is one ``<think>...</think>`` block then one ``<answer>...</answer>``
    block, with only whitespace between, before and after them; else 0.0."""
    out = []
    for text in completions:
        # The regex alone would accept a second think block inside the first ".*?"; counting
        # the tags enforces "exactly one of each".
        ok = _FORMAT.fullmatch(text) is not None and all(text.count(t) == 1 for t in _TAGS)
        out.append(float(ok))
    return out


def _is_latin(c: str) -> bool:
    o = ord(c)
    # ASCII letters, Latin-1 letters (without the multiplication and division signs),
    # Latin Extended-A/B and Latin Extended Additional (Vietnamese and friends).
    return (
        ("a" <= c <= "z")
        or ("A" <= c <= "Z")
        or (0xC0 <= o <= 0x24F and o not in (0xD7, 0xF7))
        or (0x1E00 <= o <= 0x1EFF)
    )


_CJK_RANGES = (
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2EBEF),
    (0x30000, 0x3134F),
)


def _is_cjk(c: str) -> bool:
    o = ord(c)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES)


_SCRIPTS: dict[str, Callable[[str], bool]] = {"en": _is_latin, "zh": _is_cjk}
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def language_consistency_reward(
    completions: list[str], language: str | Sequence[str] = "en", **kwargs: Any
) -> list[float]:
    """DeepSeek-R1's language-consistency reward: the share of target-language characters in
    the reasoning.

    The reasoning is the content of the ``<think>`` blocks. Among its letters and ideographs
    (``str.isalpha``: digits, symbols and spaces are neutral), the score is the fraction in the
    target script: Latin letters for "en", CJK ideographs for "zh". No reasoning, or reasoning
    without any letter, scores 0.0. ``language`` is a str or a per-sample column.
    """
    langs = [language] * len(completions) if isinstance(language, str) else list(language)
    if len(langs) != len(completions):
        raise ValueError(f"language has {len(langs)} values for {len(completions)} completions")
    out = []
    for text, lang in zip(completions, langs, strict=True):
        if lang not in _SCRIPTS:
            raise ValueError(f"unsupported language {lang!r}; choose one of {sorted(_SCRIPTS)}")
        reasoning = "".join(_THINK.findall(text))
        letters = [c for c in reasoning if c.isalpha()]
        if not letters:
            out.append(0.0)
            continue
        in_script = _SCRIPTS[lang]
        out.append(sum(map(in_script, letters)) / len(letters))
    return out


def _per_sample(value: Any, i: int) -> Any:
    """The i-th item of a column given as a list, or the value itself if it is a scalar."""
    return value[i] if isinstance(value, (list, tuple)) else value


def overlong_reward(
    completions: list[str],
    completion_lengths: Sequence[int],
    max_completion_length: int | Sequence[int],
    overlong_buffer: int | None = None,
    truncated: Sequence[bool] | None = None,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong punishment, in [-1, 0].

    With L = max_completion_length and B = overlong_buffer (default L // 4): 0 while the length
    is at most L - B, then a linear ramp (L - B - length) / B down to -1 at L, and -1 beyond L
    or when the completion was truncated (it never finished, whatever its length).
    """
    out = []
    for i, length in enumerate(completion_lengths):
        max_len = int(_per_sample(max_completion_length, i))
        buffer = max_len // 4 if overlong_buffer is None else int(overlong_buffer)
        if not 0 <= buffer <= max_len:
            raise ValueError(f"overlong_buffer must be in [0, {max_len}], got {buffer}")
        if length > max_len or (truncated is not None and truncated[i]):
            out.append(-1.0)
        elif length <= max_len - buffer:
            out.append(0.0)
        else:  # buffer > 0 here, since max_len - buffer < length <= max_len
            out.append((max_len - buffer - length) / buffer)
    return out


# A task's own reward lives with its task (grpo.tasks), and the code reward, which runs
# programs in a sandbox, in grpo.code_reward; both build on the generic rewards above:
# imported here, after them, so that either module may be imported first.
from .code_reward import code_reward  # noqa: E402
from .tasks.countdown import countdown_reward  # noqa: E402

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


def reward_metrics(reward_fns: Sequence[tuple[str, RewardFn]]) -> dict[str, float]:
    """What rewards count about their calls since the last time (a reward may have a
    ``pop_metrics()``: the code reward's verdicts), as ``<name>/<key>``; the counts restart."""
    out: dict[str, float] = {}
    for name, fn in reward_fns:
        pop = getattr(fn, "pop_metrics", None)
        if callable(pop):
            out.update({f"{name}/{key}": value for key, value in pop().items()})
    return out


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


# --------------------------------------------------------------------------------------------
# Scoring a batch


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
