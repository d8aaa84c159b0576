"""The rule-based rewards that hold for any task, as in DeepSeek-R1-Zero: accuracy against an
``answer`` column, the think/answer format, language consistency (DeepSeek-R1) and DAPO's
overlong punishment.

A reward function has the signature ``fn(completions, **columns) -> list[float | None]``:
``completions`` are the decoded completion texts (EOS/PAD stripped), ``columns`` the batch's
example columns as lists aligned with ``completions`` (``answer=[...]``), plus ``prompts``,
``completion_lengths`` (tokens), ``truncated`` (bool per completion) and
``max_completion_length`` (a plain int). Every function takes ``**kwargs`` and ignores the
columns it does not use. ``None`` means "does not apply to this sample" (TRL's convention).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from .parsing import extract_answer, norm_text, normalize_number

RewardFn = Callable[..., list]

__all__ = [
    "RewardFn",
    "accuracy_reward",
    "format_reward",
    "language_consistency_reward",
    "overlong_reward",
]


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
            out.append(float(norm_text(pred) == norm_text(ref)))
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
