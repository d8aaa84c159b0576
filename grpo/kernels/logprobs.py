"""Per-token log-probs (and entropies) of the chosen ids, with one read of the logits.

Shapes: logits (B, T, V) any float dtype with unit stride on V (batch and time strides are
free); ids (B, T) integer. Output logp (B, T) fp32 and optionally entropy (B, T) fp32.

One program per (b, t) row sweeps V once with an online logsumexp in fp32 (base-2 units,
so every exponential is one exp2). The same row sweep, and the backward sweep of
(logp, entropy) with respect to the logits, are shared with the GRPO loss kernels.

    z = logits / temperature,  lse = logsumexp(z),  logp = z[id] - lse,
    H = lse - sum_j p_j z_j,   d logp / d z_j = [j == id] - p_j,
    d H / d z_j = -p_j (log p_j + H)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import reference
from ._checks import (
    INTERPRET,
    check_logits_ids,
    check_values,
    checking,
    row_config,
    use_triton,
)

_EMULATE_BF16_ROUNDING = tl.constexpr(INTERPRET)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@triton.jit
def _lse_sweep(
    row_ptr, V, scale, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr, EVICT: tl.constexpr
):
    """Online logsumexp over one row. With y = x * scale (scale = log2(e) / temperature):
    returns m = max y, s = sum 2^(y - m) and t = sum 2^(y - m) * y (0 without entropy)."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    t = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"), eviction_policy=EVICT)
        y = x.to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(y, 0))
        # A row that is -inf so far keeps s = t = 0 instead of producing NaN from inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        e = tl.exp2(y - m_safe)
        s = s * alpha + tl.sum(e, 0)
        if WITH_ENTROPY:
            # e == 0 where y == -inf: select y first so 0 * -inf never appears.
            t = t * alpha + tl.sum(e * tl.where(e > 0, y, 0.0), 0)
        m = m_new
    return m, s, t


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even as the GPU's cast does. The interpreter's
    fp32 -> bf16 cast truncates, so there the rounding is done on the bits."""
    if _EMULATE_BF16_ROUNDING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _logp_entropy_grad_sweep(
    row_ptr,
    grad_row_ptr,
    idx,
    V,
    lse2,
    ent,
    g,
    h,
    scale,
    inv_temp,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    EVICT: tl.constexpr,
):
    """Write d L / d logits of one row given g = dL/dlogp and h = dL/dH (natural units):
    inv_temp * (g [j == id] - p_j (g + h (log p_j + H))). lse2 is logsumexp in base 2."""
    offs = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(0, n_blocks):
        # Backwards: the end of the row was read last by the LSE sweep, so it is the part
        # most likely still in L2 (a forward re-scan evicts just what it needs next).
        cols = (n_blocks - 1 - i) * BLOCK_V + offs
        valid = cols < V
        x = tl.load(row_ptr + cols, mask=valid, other=float("-inf"), eviction_policy=EVICT)
        y2 = x.to(tl.float32) * scale - lse2  # log2 p_j
        p = tl.exp2(y2)
        d = tl.where(cols == idx, g, 0.0) - p * g
        if WITH_ENTROPY:
            # p log p -> 0 where p == 0 (logits at -inf): select before multiplying.
            d -= h * p * tl.where(p > 0, y2 * 0.6931471805599453 + ent, 0.0)
        tl.store(
            grad_row_ptr + cols, _round_to(d * inv_temp, grad_row_ptr.dtype.element_ty), mask=valid
        )


@triton.jit
def _zero_row(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    zeros = tl.zeros((BLOCK_V,), tl.float32).to(grad_row_ptr.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        tl.store(grad_row_ptr + cols, zeros, mask=cols < V)


@triton.jit(do_not_specialize=["seq_len"])
def _logprobs_kernel(
    logits_ptr,
    ids_ptr,
    logp_ptr,
    lse2_ptr,
    ent_ptr,
    seq_len,
    V,
    stride_b,
    stride_t,
    scale,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // seq_len) * stride_b + (row % seq_len) * stride_t
    m, s, t = _lse_sweep(row_ptr, V, scale, BLOCK_V, WITH_ENTROPY, "evict_first")
    lse2 = m + tl.log2(s)
    idx = tl.load(ids_ptr + row)
    x_id = tl.load(row_ptr + idx).to(tl.float32)
    tl.store(logp_ptr + row, (x_id * scale - lse2) * 0.6931471805599453)
    tl.store(lse2_ptr + row, lse2)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, (lse2 - t / s) * 0.6931471805599453)


@triton.jit(do_not_specialize=["seq_len"])
def _logprobs_backward_kernel(
    logits_ptr,
    grad_ptr,
    ids_ptr,
    lse2_ptr,
    ent_ptr,
    g_ptr,
    h_ptr,
    seq_len,
    V,
    stride_b,
    stride_t,
    stride_gb,
    stride_gt,
    scale,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row % seq_len
    row_ptr = logits_ptr + b * stride_b + t * stride_t
    grad_row_ptr = grad_ptr + b * stride_gb + t * stride_gt
    g = tl.load(g_ptr + row)
    h = tl.load(h_ptr + row)  # h_ptr is g_ptr without entropy: then h is unused
    ent = tl.load(ent_ptr + row)
    if WITH_ENTROPY:
        active = (g != 0.0) | (h != 0.0)
    else:
        active = g != 0.0
    if active:
        idx = tl.load(ids_ptr + row)
        lse2 = tl.load(lse2_ptr + row)
        _logp_entropy_grad_sweep(
            row_ptr,
            grad_row_ptr,
            idx,
            V,
            lse2,
            ent,
            g,
            h,
            scale,
            inv_temp,
            BLOCK_V,
            WITH_ENTROPY,
            "evict_first",
        )
    else:
        _zero_row(grad_row_ptr, V, BLOCK_V)  # masked token: skip the read


def logprobs_forward(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the one-read kernel. -> logp (B, T), lse2 (B, T) in base 2, entropy or None."""
    batch, seq_len, vocab = logits.shape
    n_rows = batch * seq_len
    ids_flat = ids.reshape(-1).long().contiguous()  # (N,)
    logp = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse2 = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else logp  # dummy pointer when unused
    block, warps = row_config(vocab, logits.device)
    _logprobs_kernel[(n_rows,)](
        logits,
        ids_flat,
        logp,
        lse2,
        ent,
        seq_len,
        vocab,
        logits.stride(0),
        logits.stride(1),
        LOG2E / temperature,
        WITH_ENTROPY=with_entropy,
        BLOCK_V=block,
        num_warps=warps,
    )
    shape = (batch, seq_len)
    return logp.view(shape), lse2.view(shape), ent.view(shape) if with_entropy else None


def logprobs_backward(
    logits: torch.Tensor,
    ids: torch.Tensor,
    lse2: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write d L / d logits into `out` (may be `logits` itself: each element is read before
    it is overwritten by the same program) from dL/dlogp and dL/dentropy, all (B, T)."""
    batch, seq_len, vocab = logits.shape
    with_entropy = grad_entropy is not None
    g = grad_logp.float().reshape(-1).contiguous()  # (N,)
    h = grad_entropy.float().reshape(-1).contiguous() if with_entropy else g
    ent = entropy.reshape(-1).contiguous() if with_entropy else g
    block, warps = row_config(vocab, logits.device)
    _logprobs_backward_kernel[(batch * seq_len,)](
        logits,
        out,
        ids.reshape(-1).long().contiguous(),
        lse2.reshape(-1).contiguous(),
        ent,
        g,
        h,
        seq_len,
        vocab,
        logits.stride(0),
        logits.stride(1),
        out.stride(0),
        out.stride(1),
        LOG2E / temperature,
        1.0 / temperature,
        WITH_ENTROPY=with_entropy,
        BLOCK_V=block,
        num_warps=warps,
    )
    return out


def token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    validate: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(ids) under softmax(logits / temperature), fp32 (B, T); no gradient.

    logits (B, T, V) float with unit stride on V; ids (B, T) integer in [0, V).
    With return_entropy=True also returns the entropy of each row's distribution (B, T).
    Used for old-policy and reference log-probs: one read of the logits per row.
    validate: check the ids' values (a host sync); None follows grpo.kernels.value_checks.
    """
    check_logits_ids(logits, ids)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if checking(validate):
        check_values(ids, logits.shape[-1])
    if not use_triton(logits):
        return reference.token_logprobs_ref(
            logits, ids, temperature=temperature, return_entropy=return_entropy
        )
    with torch.no_grad():
        logp, _, ent = logprobs_forward(logits.detach(), ids, temperature, return_entropy)
    return (logp, ent) if return_entropy else logp
