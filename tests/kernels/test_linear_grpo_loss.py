"""linear_grpo_loss / token_logprobs_from_hidden against the reference on materialised logits
(hidden @ weight.T + grpo_loss_ref): loss, d hidden, d weight, stats; chunks that split
sequences; fp32 and bf16; odd V and H."""

from __future__ import annotations

import pytest
import torch

from grpo.kernels import GRPOLossConfig, linear_grpo_loss, token_logprobs_from_hidden
from grpo.kernels.reference import LOSS_TYPES, grpo_loss_ref, token_logprobs_ref

from .helpers import assert_close, assert_within_ref_error

B, T, H, V = 3, 5, 24, 257


def make_inputs(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5 * 3).to(device=device, dtype=dtype)
    ids = torch.randint(0, V, (B, T), generator=gen).to(device)
    mask = torch.ones(B, T, device=device)
    mask[1, 3:] = 0
    mask[2] = 0
    adv = torch.tensor([0.9, -1.2, 0.5], device=device)
    base = token_logprobs_ref((hidden.float() @ weight.float().t()).cpu(), ids.cpu())
    old = (base + 0.3 * torch.randn(B, T, generator=gen)).to(device)
    ref = (base + 0.4 * torch.randn(B, T, generator=gen)).to(device)
    return hidden, weight, ids, adv, mask, old, ref


def _run(fn, hidden, weight, *args, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, stats = fn(h, w, *args, **kw)
    loss.backward()
    return loss.detach(), stats, h.grad, w.grad


def _materialised(h, w, *args, **kw):
    return grpo_loss_ref(h @ w.t(), *args, **kw)


CASES = [(lt, lvl) for lt in LOSS_TYPES for lvl in ("token", "sequence")]


@pytest.mark.parametrize("loss_type, level", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_materialised_reference(device, loss_type, level, dtype):
    hidden, weight, ids, adv, mask, old, ref = make_inputs(device, dtype)
    i = CASES.index((loss_type, level))
    gen = torch.Generator().manual_seed(i)
    kw = dict(beta=0.04, loss_type=loss_type, importance_level=level, temperature=0.8,
              entropy_coef=0.01, delta=None if loss_type in ("cispo", "sapo", "vespo") else 1.3,
              use_bias_correction_kl=i % 3 != 1, accumulation_steps=1 + i % 2,
              top_entropy_quantile=(1.0, 1.0, 0.4)[i % 3],
              off_policy_mask_threshold=(None, 0.05)[(i // 2) % 2])
    if i % 4 == 3:  # the sampler's log-probs and the correction weights
        kw["sampler_logp"] = old + 0.3 * torch.randn(B, T, generator=gen).to(device)
        kw["importance_sampling_ratio"] = torch.exp(0.2 * torch.randn(B, T, generator=gen)).to(
            device) * mask
    ours = _run(linear_grpo_loss, hidden, weight, ids, adv, mask, old, ref, chunk_size=4, **kw)
    gold = _run(_materialised, hidden.float(), weight.float(), ids, adv, mask, old, ref, **kw)
    if dtype == torch.float32:
        rtol = 2e-4 if loss_type == "vespo" else 1e-5  # see test_grpo_loss
        assert_close(ours[0], gold[0], "loss", rtol=rtol)
        assert_close(ours[2], gold[2], "d hidden", rtol=1e-4, atol=1e-6)
        assert_close(ours[3], gold[3], "d weight", rtol=1e-4, atol=1e-6)
        assert set(ours[1]) == set(gold[1])
        for k in gold[1]:
            assert_close(ours[1][k], gold[1][k], k, rtol=rtol)
    else:
        low = _run(_materialised, hidden, weight, ids, adv, mask, old, ref, **kw)
        for i, name in ((0, "loss"), (2, "d hidden"), (3, "d weight")):
            scale = gold[i].abs().max().item()
            assert_within_ref_error(ours[i].float(), gold[i], low[i].float(),
                                    2**-8 * scale, name)


def test_config_and_keywords_agree(device):
    """A GRPOLossConfig, the same options as keywords, and keywords overriding a config."""
    hidden, weight, ids, adv, mask, old, ref = make_inputs(device, torch.float32)
    cfg = GRPOLossConfig(beta=0.04, loss_type="sapo", entropy_coef=0.01)
    a = _run(linear_grpo_loss, hidden, weight, ids, adv, mask, old, ref, config=cfg)
    b = _run(linear_grpo_loss, hidden, weight, ids, adv, mask, old, ref, beta=0.04,
             loss_type="sapo", entropy_coef=0.01)
    c = _run(linear_grpo_loss, hidden, weight, ids, adv, mask, old, ref,
             config=GRPOLossConfig(loss_type="dapo"), beta=0.04, loss_type="sapo",
             entropy_coef=0.01)
    for other in (b, c):
        assert_close(other[0], a[0], "loss")
        assert_close(other[2], a[2], "d hidden")
    with pytest.raises(TypeError, match="unknown GRPO loss option"):
        linear_grpo_loss(hidden, weight, ids, adv, mask, epsilon=0.2)


def test_logits_fp32_and_grad_scaling(device):
    hidden, weight, ids, adv, mask, old, ref = make_inputs(device, torch.float32)
    h = hidden.clone().requires_grad_()
    loss, _ = linear_grpo_loss(h, weight, ids, adv, mask, old, logits_fp32=True, chunk_size=7)
    (2.0 * loss).backward()
    gold = _run(_materialised, hidden, weight, ids, adv, mask, old)
    assert_close(h.grad, 2.0 * gold[2], "scaled d hidden", rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_per_token_advantages(device, level):
    hidden, weight, ids, adv, mask, old, ref = make_inputs(device, torch.float32)
    gen = torch.Generator().manual_seed(5)
    adv_bt = adv[:, None] * (0.5 + 1.5 * torch.rand(B, T, generator=gen)).to(device)
    kw = dict(beta=0.04, importance_level=level, loss_type="grpo")
    ours = _run(linear_grpo_loss, hidden, weight, ids, adv_bt, mask, old, ref, chunk_size=4, **kw)
    gold = _run(_materialised, hidden, weight, ids, adv_bt, mask, old, ref, **kw)
    assert_close(ours[0], gold[0], "loss")
    assert_close(ours[2], gold[2], "d hidden", rtol=1e-4, atol=1e-6)
    assert_close(ours[3], gold[3], "d weight", rtol=1e-4, atol=1e-6)


def test_token_logprobs_from_hidden(device):
    hidden, weight, ids, *_ = make_inputs(device, torch.float32)
    logp, ent = token_logprobs_from_hidden(hidden, weight, ids, temperature=0.7,
                                           return_entropy=True, chunk_size=4)
    gold_logp, gold_ent = token_logprobs_ref(hidden @ weight.t(), ids, temperature=0.7,
                                             return_entropy=True)
    assert_close(logp, gold_logp, "logp")
    assert_close(ent, gold_ent, "entropy")


def test_bad_input(device):
    hidden, weight, ids, adv, mask, old, ref = make_inputs(device, torch.float32)
    with pytest.raises(ValueError, match="lm_head"):
        linear_grpo_loss(hidden, weight[:, :-1], ids, adv, mask)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, V\)"):
        linear_grpo_loss(hidden, weight, ids + V, adv, mask)
    with pytest.raises(ValueError, match="needs ref_logp"):
        linear_grpo_loss(hidden, weight, ids, adv, mask, beta=0.1)
