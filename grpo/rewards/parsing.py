"""Answer parsing: the last ``<answer>`` of a completion and numbers in any spelling, compared
by value. The bottom of grpo.rewards: it imports nothing of ours."""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["answer_key", "extract_answer", "norm_text", "normalize_number"]


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


def norm_text(s: str) -> str:
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
    return number if number is not None else norm_text(pred)
