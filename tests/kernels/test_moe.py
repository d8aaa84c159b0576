"""moe_experts against moe_experts_ref: output and the gradients of hidden, gate_up, down and
topk_weights, fp32 / bf16 / fp16; ragged tiles, empty experts, one expert for everything,
repeated ids; determinism; partial requires_grad; and every validation error."""

from __future__ import annotations

import pytest
import torch

from grpo import kernels
from grpo.kernels import moe_experts
from grpo.kernels.reference import moe_experts_ref

from .helpers import assert_close, assert_within_ref_error

NAMES = ("out", "d_hidden", "d_gate_up", "d_down", "d_weights")


def make_inputs(n, h, inter, e, k, *, seed=0, ids=None, device="cpu"):
    """fp32 inputs at a realistic scale: unit activations, 1/sqrt(fan_in) weights, softmax-
    like routing weights; ids distinct per token unless given."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    gate_up = torch.randn(e, 2 * inter, h, generator=gen) / h**0.5
    down = torch.randn(e, h, inter, generator=gen) / inter**0.5
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, k, generator=gen), -1)
    grad = torch.randn(n, h, generator=gen)
    return [t.to(device) for t in (hidden, gate_up, down, ids, weights, grad)]


def run(fn, hidden, gate_up, down, ids, weights, grad, requires=(True,) * 4):
    """-> [out, d_hidden, d_gate_up, d_down, d_weights] (None for inputs without grad)."""
    leaves = [t.detach().clone().requires_grad_(r)
              for t, r in zip((hidden, gate_up, down, weights), requires, strict=True)]
    out = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


SHAPES = {
    "odd": dict(n=13, h=24, inter=20, e=5, k=2),
    "multi_tile": dict(n=37, h=40, inter=36, e=3, k=2),  # several tiles and blocks per expert
}


def empty_expert_ids(device):
    """N=7, E=4, k=3: expert 2 receives no token."""
    gen = torch.Generator().manual_seed(3)
    return torch.stack([torch.tensor([0, 1, 3])[torch.randperm(3, generator=gen)]
                        for _ in range(7)]).to(device)


def cases(device):
    yield "odd", make_inputs(**SHAPES["odd"], device=device)
    yield "multi_tile", make_inputs(**SHAPES["multi_tile"], seed=1, device=device)
    yield "empty_expert", make_inputs(7, 32, 16, 4, 3, seed=2, ids=empty_expert_ids(device),
                                      device=device)
    # Every token sends both slots to expert 2 (repeated ids are summed, as in the reference).
    same = torch.full((9, 2), 2, dtype=torch.long)
    yield "one_expert", make_inputs(9, 16, 24, 4, 2, seed=4, ids=same, device=device)
    yield "top1", make_inputs(11, 24, 20, 5, 1, seed=5, device=device)
    yield "top8", make_inputs(5, 16, 12, 10, 8, seed=6, device=device)


CASE_NAMES = ["odd", "multi_tile", "empty_expert", "one_expert", "top1", "top8"]


def get_case(name, device):
    return dict(cases(device))[name]


def test_cpu_runs_the_triton_code_not_the_reference(device):
    assert kernels._checks.use_triton(torch.zeros(1, 1, device=device))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_fp32_matches_reference(device, case):
    inputs = get_case(case, device)
    ours = run(moe_experts, *inputs)
    gold = run(moe_experts_ref, *inputs)
    for o, g, name in zip(ours, gold, NAMES, strict=True):
        assert o.dtype == g.dtype == torch.float32
        assert_close(o, g, f"{case} {name}", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_low_precision_within_reference_error(device, case, dtype):
    hidden, gate_up, down, ids, weights, grad = get_case(case, device)
    low = [t.to(dtype) for t in (hidden, gate_up, down)] + [ids, weights.to(dtype),
                                                           grad.to(dtype)]
    ours = run(moe_experts, *low)
    ref = run(moe_experts_ref, *low)
    # Gold: fp32 maths on the same (rounded) input values.
    gold = run(moe_experts_ref, *[t.float() if t.is_floating_point() else t for t in low])
    for o, r, g, name in zip(ours, ref, gold, NAMES, strict=True):
        assert o.dtype == r.dtype == dtype, name
        # Our kernels round the intermediates (pre-activations, act, d_pre) to the input
        # dtype, which the all-fp32 reference never does: allow one such rounding step
        # (2^-8 relative) of the result's scale on top of twice the reference's error.
        atol = 2.0**-8 * g.abs().max().item()
        assert_within_ref_error(o, g, r, atol, f"{case} {dtype} {name}")


def test_deterministic(device):
    inputs = make_inputs(**SHAPES["multi_tile"], seed=5, device=device)
    low = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs]
    first = run(moe_experts, *low)
    second = run(moe_experts, *low)
    for a, b, name in zip(first, second, NAMES, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("requires", [(True, False, False, False), (False, True, True, False),
                                      (False, False, False, True)])
def test_partial_requires_grad(device, requires):
    inputs = make_inputs(**SHAPES["odd"], seed=6, device=device)
    ours = run(moe_experts, *inputs, requires=requires)
    gold = run(moe_experts_ref, *inputs, requires=requires)
    for o, g, name in zip(ours, gold, NAMES, strict=True):
        assert (o is None) == (g is None), name
        if o is not None:
            assert_close(o, g, name, rtol=1e-5, atol=1e-5)


def test_no_grad_forward(device):
    hidden, gate_up, down, ids, weights, _ = make_inputs(**SHAPES["odd"], seed=7, device=device)
    with torch.no_grad():
        out = moe_experts(hidden, gate_up, down, ids, weights)
    assert not out.requires_grad
    assert_close(out, moe_experts_ref(hidden, gate_up, down, ids, weights), "out",
                 rtol=1e-5, atol=1e-5)


def test_int32_ids_and_strided_inputs(device):
    hidden, gate_up, down, ids, weights, grad = make_inputs(**SHAPES["odd"], seed=8,
                                                            device=device)
    wide = torch.cat([hidden, hidden], 1)[:, : hidden.shape[1]]  # row stride 2H, same values
    assert not wide.is_contiguous()
    ours = run(moe_experts, wide, gate_up, down, ids.int(), weights, grad)
    gold = run(moe_experts_ref, hidden, gate_up, down, ids, weights, grad)
    for o, g, name in zip(ours, gold, NAMES, strict=True):
        assert_close(o, g, name, rtol=1e-5, atol=1e-5)


def _bad(device):
    hidden, gate_up, down, ids, weights, _ = make_inputs(5, 8, 6, 3, 2, device=device)
    good = dict(hidden=hidden, gate_up=gate_up, down=down, topk_ids=ids, topk_weights=weights)
    return [
        ("hidden must be a non-empty", dict(hidden=hidden[0])),
        ("hidden must be a non-empty", dict(hidden=hidden[:0], topk_ids=ids[:0],
                                            topk_weights=weights[:0])),
        ("gate_up must be", dict(gate_up=gate_up[..., :7])),
        ("gate_up must be", dict(gate_up=gate_up[:, :11])),
        ("gate_up must be", dict(gate_up=gate_up[0])),
        ("down must be", dict(down=down[:, :, :5])),
        ("down must be", dict(down=down[:2])),
        ("topk_ids must be", dict(topk_ids=ids[:4])),
        ("topk_ids must be", dict(topk_ids=ids[:, 0])),
        ("topk_weights must have", dict(topk_weights=weights[:, :1])),
        ("hidden must be float32", dict(hidden=hidden.long(), gate_up=gate_up.long(),
                                        down=down.long())),
        ("topk_weights must be float32", dict(topk_weights=weights.long())),
        ("must have hidden's dtype", dict(gate_up=gate_up.bfloat16())),
        ("must have hidden's dtype", dict(down=down.half())),
        ("topk_ids must be an integer", dict(topk_ids=ids.float())),
        ("must lie in", dict(topk_ids=ids.clone().fill_(3))),
        ("must lie in", dict(topk_ids=ids - 1)),
        ("is on meta", dict(topk_weights=weights.to("meta"))),
        ("must be a tensor", dict(down=down.tolist())),
    ], good


@pytest.mark.parametrize("index", range(19))
def test_errors(device, index):
    bad, good = _bad(device)
    match, changes = bad[index]
    with pytest.raises(ValueError, match=match):
        moe_experts(**{**good, **changes})


def test_error_list_is_complete(device):
    assert len(_bad(device)[0]) == 19


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_qwen_like(dtype):
    """Qwen3-MoE-like proportions, small: many tiles per expert, real CUDA block sizes."""
    inputs = make_inputs(512, 256, 128, 16, 4, seed=9, device="cuda")
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    ours = run(moe_experts, *low)
    ref = run(moe_experts_ref, *low)
    gold = run(moe_experts_ref, *[t.float() if t.is_floating_point() else t for t in low])
    for o, r, g, name in zip(ours, ref, gold, NAMES, strict=True):
        if dtype == torch.float32:
            assert_close(o, g, name, rtol=1e-4, atol=1e-4)
        else:
            assert_within_ref_error(o, g, r, 2.0**-8 * g.abs().max().item(), name)
    again = run(moe_experts, *low)
    for a, b, name in zip(ours, again, NAMES, strict=True):
        assert torch.equal(a, b), name
