"""Comparison helpers whose tolerances can fail: bf16 results are judged against the error
the reference itself makes on the same bf16 inputs, not against a loose atol."""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_ref_error(
    out: torch.Tensor, gold: torch.Tensor, ref_out: torch.Tensor, atol: float, what: str
) -> None:
    """|out - gold| <= 2 |ref_out - gold| + atol, elementwise maxima; gold is fp32 maths on
    the same input values, ref_out the reference run on the low-precision inputs."""
    assert out.shape == gold.shape, f"{what}: shape {out.shape} != {gold.shape}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err, ref_err = max_err(out, gold), max_err(ref_out, gold)
    assert err <= 2.0 * ref_err + atol, f"{what}: error {err:.3g} > 2 x ref {ref_err:.3g} + {atol}"


def assert_close(out: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5,
                 atol: float = 1e-6) -> None:
    assert out.shape == expected.shape, f"{what}: shape {out.shape} != {expected.shape}"
    torch.testing.assert_close(out.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")
