"""token_logprobs against token_logprobs_ref: values and entropies, fp32 / bf16 / fp16,
odd vocabularies, temperature, strided logits, -inf logits; no gradient; and errors."""

from __future__ import annotations

import pytest
import torch

from grpo import kernels
from grpo.kernels import token_logprobs
from grpo.kernels.reference import token_logprobs_ref

from .helpers import assert_close, assert_within_ref_error


def test_cpu_runs_the_triton_code_not_the_reference(device):
    """Without a GPU the tests must exercise the kernels through the interpreter."""
    x = torch.zeros(1, 1, 8, device=device)
    assert kernels._checks.use_triton(x)


@pytest.mark.parametrize("vocab", [1000, 4099, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(device, vocab, dtype, temperature):
    gen = torch.Generator().manual_seed(vocab)
    full = (torch.randn(3, 7, vocab, generator=gen) * 3).to(device=device, dtype=dtype)
    logits = full[:, 1:6]  # non-contiguous batch stride
    ids = torch.randint(0, vocab, (3, 5), generator=gen).to(device)
    logp, ent = token_logprobs(logits, ids, temperature=temperature, return_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (3, 5)
    gold_logp, gold_ent = token_logprobs_ref(logits.float(), ids, temperature=temperature,
                                             return_entropy=True)
    if dtype == torch.float32:
        assert_close(logp, gold_logp, "logp")
        assert_close(ent, gold_ent, "entropy")
    else:  # fp32 maths on low-precision inputs: the reference makes no error, so atol only
        ref_logp, ref_ent = token_logprobs_ref(logits, ids, temperature=temperature,
                                               return_entropy=True)
        assert_within_ref_error(logp, gold_logp, ref_logp, 2e-5, "logp")
        assert_within_ref_error(ent, gold_ent, ref_ent, 2e-5, "entropy")
    only_logp = token_logprobs(logits, ids, temperature=temperature)
    assert torch.equal(only_logp, logp)


def test_minus_inf_logits_are_excluded_not_nan(device):
    """Vocabulary entries masked to -inf (e.g. padding of the embedding) get p = 0."""
    logits = torch.randn(2, 3, 300, device=device)
    logits[..., 250:] = float("-inf")
    ids = torch.randint(0, 250, (2, 3), device=device)
    logp, ent = token_logprobs(logits, ids, return_entropy=True)
    gold_logp, gold_ent = token_logprobs_ref(logits[..., :250], ids, return_entropy=True)
    assert_close(logp, gold_logp, "logp")
    assert_close(ent, gold_ent, "entropy")


def test_no_gradient(device):
    logits = torch.randn(2, 3, 50, device=device, requires_grad=True)
    logp = token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long, device=device))
    assert not logp.requires_grad


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (torch.randn(2, 3, 50, device=d), torch.full((2, 3), 50, device=d)),
         r"ids must lie in \[0, V\) = \[0, 50\)"),
        (lambda d: (torch.randn(2, 3, 50, device=d), torch.full((2, 3), -2, device=d)),
         r"got values in \[-2, -2\]"),
        (lambda d: (torch.randn(2, 3, 50, device=d), torch.zeros(2, 4, dtype=torch.long,
                                                                  device=d)), "ids must have"),
        (lambda d: (torch.randn(2, 50, 3, device=d).transpose(1, 2),
                    torch.zeros(2, 3, dtype=torch.long, device=d)), "unit stride"),
        (lambda d: (torch.randn(6, 50, device=d), torch.zeros(6, dtype=torch.long, device=d)),
         r"\(B, T, V\)"),
        (lambda d: (torch.randn(2, 3, 50, device=d), torch.zeros(2, 3, device=d)), "integer"),
    ],
)
def test_bad_input_is_a_clear_error(device, make, match):
    logits, ids = make(device)
    with pytest.raises(ValueError, match=match):
        token_logprobs(logits, ids)


def test_bad_temperature(device):
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(1, 2, 5, device=device),
                       torch.zeros(1, 2, dtype=torch.long, device=device), temperature=-1.0)
