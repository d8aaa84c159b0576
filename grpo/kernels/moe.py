"""Mixture-of-experts feed-forward (stacked SwiGLU experts), forward and backward.

Shapes: hidden (N, H); gate_up (E, 2I, H), rows [0, I) gate and [I, 2I) up; down (E, H, I);
topk_ids (N, k) integer in [0, E); topk_weights (N, k) float. Output (N, H) in hidden's dtype:

    out[n] = sum_j topk_weights[n, j] * down[e] @ (silu(gate[e] @ h_n) * (up[e] @ h_n)),
    e = topk_ids[n, j]

Gradients reach hidden, gate_up, down and topk_weights (not the ids).

Routing. The P = N * k (token, slot) pairs, pair p = n * k + j, are sorted by expert (stable
sort of topk_ids.flatten()): `order[r]` is the pair at sorted row r, and expert e owns the
sorted rows [start[e], end[e]). The row-tiled kernels run over a schedule of tiles of BLOCK_M
rows that never straddle two experts: tile i belongs to expert tile_expert[i] and starts at
sorted row tile_row[i]. The schedule is built in torch without a host sync by sizing the grid
for the worst case, cdiv(P, BLOCK_M) + min(E, P) tiles; spare tiles get expert -1 and return.

Kernels (every matmul is tl.dot with an fp32 accumulator; gathers are fused into the loads,
so no (P, H) copy of the activations is ever made):
  forward
    _gate_up_fwd_kernel    tiles x I-blocks: pre = [gate | up] = hidden[tok] @ gate_up[e]^T,
                           writes pre (P, 2I) and act = silu(gate) * up (P, I), sorted rows
    _rows_scatter_kernel   tiles x H-blocks: y[p] = w_p * act_r @ down[e]^T into a (N, k, H)
                           buffer (input dtype) in pair order; out = y.sum(1) in fp32
  backward (g = d out)
    _act_bwd_kernel        tiles x I-blocks: dA = g[tok] @ down[e]; d_weight partials
                           <dA, act> per I-block; d_pre = SwiGLU'(pre) * (w dA), (P, 2I)
    _down_bwd_kernel       E x H-blocks x I-blocks: d_down[e] = sum_r (w g[tok])^T act,
                           act recomputed from pre; one program per output tile per expert
    _gate_up_bwd_kernel    E x 2I-blocks x H-blocks: d_gate_up[e] = sum_r d_pre^T hidden[tok]
    _rows_scatter_kernel   tiles x H-blocks: per-pair d_pre_r @ gate_up[e] into (N, k, H)
                           fp32; d_hidden = sum over k (deterministic)

Addressing: the GEMM main loops keep only 1-D bases across iterations (the gathered rows'
pointers, an expert's base pointer and its int32 column offsets: one expert's matrices hold
< 2^31 elements, checked at the call) and add each step's k offsets at the load; a 2-D tensor
of 64-bit pointers carried through the loop costs the registers the accumulators need. The
launch configurations (launch_configs) keep every kernel spill-free for sm_90, checked by
tests/kernels/test_compile.py with ptxas.

Saved for backward: pre (P, 2I) in the input dtype plus the routing (order, expert bounds, the
tile schedule). act is not kept: the backward kernels recompute it from pre. There are no
atomics: every output element is written by exactly one program, so runs are bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._checks import FLOAT_DTYPES, INTERPRET, checking, use_triton
from .logprobs import _round_to

# The interpreter's tl.dot multiplies bf16 operands as their raw uint16 bits: upcast there
# (exact) and let the compiled path use the tensor cores on the input dtype.
_DOT_UPCAST = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    if _DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_act(pre_ptr, rows, cols, mask, INTER):
    """act = silu(gate) * up from the saved pre-activations, fp32. rows are int64."""
    base = pre_ptr + rows * (2 * INTER) + cols
    g = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + INTER, mask=mask, other=0.0).to(tl.float32)
    return g * _sigmoid(g) * u


@triton.jit
def _tile_pairs(tile_row_ptr, end_ptr, order_ptr, tile, e, BLOCK_M: tl.constexpr):
    """The sorted rows of one tile of expert e, their mask, and the (token, slot) pair each
    row holds, as int64."""
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(end_ptr + e)
    rows = rows.to(tl.int64)
    pair = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    return rows, row_mask, pair


@triton.jit
def _gate_up_fwd_kernel(
    hidden_ptr,
    gate_up_ptr,
    order_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    end_ptr,
    pre_ptr,
    act_ptr,
    H,
    INTER,
    TOPK,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    rows, row_mask, pair = _tile_pairs(tile_row_ptr, end_ptr, order_ptr, tile, e, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < INTER
    ks = tl.arange(0, BLOCK_K)
    # Loop-invariant 1-D bases; each step adds its k offsets (module docstring: Addressing).
    a_rows = hidden_ptr + (pair // TOPK) * H  # (BLOCK_M,): the gathered token rows
    # gate_up[e] is (2I, H): the B operand (BLOCK_K, BLOCK_N) reads it transposed.
    w_e = gate_up_ptr + e.to(tl.int64) * 2 * INTER * H
    b_cols = cols * H  # int32 offsets inside one expert
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < H
        a = tl.load(
            a_rows[:, None] + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        b_mask = k_mask[:, None] & col_mask[None, :]
        b_offs = b_cols[None, :] + kk[:, None]
        bg = tl.load(w_e + b_offs, mask=b_mask, other=0.0)
        bu = tl.load(w_e + (b_offs + INTER * H), mask=b_mask, other=0.0)
        acc_g = _dot(a, bg, acc_g, DOT_PRECISION)
        acc_u = _dot(a, bu, acc_u, DOT_PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    dtype = pre_ptr.dtype.element_ty
    pre_ptrs = pre_ptr + rows[:, None] * (2 * INTER) + cols[None, :]
    tl.store(pre_ptrs, _round_to(acc_g, dtype), mask=mask)
    tl.store(pre_ptrs + INTER, _round_to(acc_u, dtype), mask=mask)
    act = acc_g * _sigmoid(acc_g) * acc_u
    tl.store(act_ptr + rows[:, None] * INTER + cols[None, :], _round_to(act, dtype), mask=mask)


@triton.jit
def _rows_scatter_kernel(
    a_ptr,
    w_ptr,
    order_ptr,
    weights_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    end_ptr,
    out_ptr,
    K,
    N,
    stride_we,
    stride_wk,
    stride_wn,
    SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[order[r]] = (weights[order[r]] if SCALE else 1) * a[r] @ W[e] for the sorted rows r
    of one tile, W[e][kk, n] at w_ptr + e * stride_we + kk * stride_wk + n * stride_wn.
    a (P, K) sorted rows; out (P, N) fp32 in pair order."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    rows, row_mask, pair = _tile_pairs(tile_row_ptr, end_ptr, order_ptr, tile, e, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows * K  # (BLOCK_M,)
    w_e = w_ptr + e.to(tl.int64) * stride_we  # W[e]; offsets inside one expert fit in int32
    b_cols = cols * stride_wn  # (BLOCK_N,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < K
        a = tl.load(
            a_rows[:, None] + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        b = tl.load(
            w_e + (b_cols[None, :] + (kk * stride_wk)[:, None]),
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = _dot(a, b, acc, DOT_PRECISION)
    if SCALE:
        acc *= tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out = _round_to(acc, out_ptr.dtype.element_ty)
    tl.store(
        out_ptr + pair[:, None] * N + cols[None, :], out, mask=row_mask[:, None] & col_mask[None, :]
    )


@triton.jit
def _act_bwd_kernel(
    grad_ptr,
    down_ptr,
    pre_ptr,
    order_ptr,
    weights_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    end_ptr,
    d_pre_ptr,
    dw_part_ptr,
    H,
    INTER,
    TOPK,
    N_BLOCKS,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dA = grad[tok] @ down[e] (unweighted, (BLOCK_M, BLOCK_N) over I); writes the partial
    d_weight <dA, act> of this I-block and d_pre = [dA w u silu'(g) | dA w silu(g)]."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    pid_n = tl.program_id(1)
    rows, row_mask, pair = _tile_pairs(tile_row_ptr, end_ptr, order_ptr, tile, e, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < INTER
    ks = tl.arange(0, BLOCK_K)
    a_rows = grad_ptr + (pair // TOPK) * H  # (BLOCK_M,)
    w_e = down_ptr + e.to(tl.int64) * H * INTER  # down[e]; int32 offsets inside it
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < H
        a = tl.load(
            a_rows[:, None] + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        b = tl.load(
            w_e + (cols[None, :] + (kk * INTER)[:, None]),
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = _dot(a, b, acc, DOT_PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows[:, None] * (2 * INTER) + cols[None, :]  # pre and d_pre share the (P, 2I) layout
    g = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(pre_ptr + offs + INTER, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    silu = g * sig
    tl.store(dw_part_ptr + rows * N_BLOCKS + pid_n, tl.sum(acc * silu * u, 1), mask=row_mask)
    d_act = acc * tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    dtype = d_pre_ptr.dtype.element_ty
    tl.store(d_pre_ptr + offs + INTER, _round_to(d_act * silu, dtype), mask=mask)
    tl.store(
        d_pre_ptr + offs, _round_to(d_act * u * sig * (1.0 + g * (1.0 - sig)), dtype), mask=mask
    )


@triton.jit
def _down_bwd_kernel(
    grad_ptr,
    pre_ptr,
    order_ptr,
    weights_ptr,
    start_ptr,
    end_ptr,
    d_down_ptr,
    H,
    INTER,
    TOPK,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """d_down[e][h, i] = sum over expert e's rows r of w_r grad[tok_r, h] act_r[i]."""
    e = tl.program_id(0)
    hs = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    h_mask = hs < H
    col_mask = cols < INTER
    start = tl.load(start_ptr + e)
    end = tl.load(end_ptr + e)
    dtype = d_down_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_mask = rows < end
        rows = rows.to(tl.int64)
        pair = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        w = tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
        g = tl.load(
            grad_ptr + (pair // TOPK)[None, :] * H + hs[:, None],
            mask=h_mask[:, None] & row_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        a = _round_to(g.to(tl.float32) * w[None, :], dtype)
        act = _load_act(
            pre_ptr, rows[:, None], cols[None, :], row_mask[:, None] & col_mask[None, :], INTER
        )
        acc = _dot(a, _round_to(act, dtype), acc, DOT_PRECISION)
    tl.store(
        d_down_ptr + e.to(tl.int64) * H * INTER + hs[:, None] * INTER + cols[None, :],
        _round_to(acc, dtype),
        mask=h_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _gate_up_bwd_kernel(
    d_pre_ptr,
    hidden_ptr,
    order_ptr,
    start_ptr,
    end_ptr,
    d_gate_up_ptr,
    H,
    INTER,
    TOPK,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """d_gate_up[e][j, h] = sum over expert e's rows r of d_pre[r, j] hidden[tok_r, h]."""
    e = tl.program_id(0)
    js = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    hs = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = js < 2 * INTER
    h_mask = hs < H
    start = tl.load(start_ptr + e)
    end = tl.load(end_ptr + e)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_mask = rows < end
        rows = rows.to(tl.int64)
        tok = (tl.load(order_ptr + rows, mask=row_mask, other=0) // TOPK).to(tl.int64)
        a = tl.load(
            d_pre_ptr + rows[None, :] * (2 * INTER) + js[:, None],
            mask=j_mask[:, None] & row_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        b = tl.load(
            hidden_ptr + tok[:, None] * H + hs[None, :],
            mask=row_mask[:, None] & h_mask[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_N)
        acc = _dot(a, b, acc, DOT_PRECISION)
    tl.store(
        d_gate_up_ptr + e.to(tl.int64) * 2 * INTER * H + js[:, None] * H + hs[None, :],
        _round_to(acc, d_gate_up_ptr.dtype.element_ty),
        mask=j_mask[:, None] & h_mask[None, :],
    )


# ----------------------------------------------------------------------------- launchers


ROW_TILED = ("gate_up_fwd", "rows_scatter", "act_bwd")  # share the schedule's BLOCK_M


def launch_configs(device: torch.device, dtype: torch.dtype) -> dict[str, dict]:
    """The launch keywords of each kernel (block sizes, DOT_PRECISION, num_warps, num_stages),
    by kernel name without the _kernel suffix. The row-tiled kernels (ROW_TILED) share
    BLOCK_M, the tile height of the routing schedule. tests/kernels/test_compile.py compiles
    every kernel for sm_90 at these CUDA configurations and fails on a register spill."""
    # fp32 inputs follow the fp32 reference exactly (no TF32); 16-bit inputs ignore this.
    prec = "ieee" if dtype == torch.float32 else "tf32"
    if device.type != "cuda":  # interpreter: the smallest tl.dot tiles, few wasted lanes
        small = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "DOT_PRECISION": prec}
        return {name: dict(small) for name in (*ROW_TILED, "down_bwd", "gate_up_bwd")}
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages), 8 warps each, chosen with ptxas for sm_90 so that
    # no kernel spills, also for widths that are not multiples of 16 (no vectorised loads,
    # one address per element) and with triton 3.6's ptxas: docs/kernels.md, "Registers".
    # fp32 (ieee dot, no tensor cores) holds its operands in registers: narrower tiles, and
    # one stage for down_bwd, where triton 3.6's ptxas otherwise fell to 32 registers and
    # spilled 9.6 KB.
    if dtype == torch.float32:
        cfg = {
            "gate_up_fwd": (64, 64, 32, 3),
            "rows_scatter": (64, 64, 32, 3),
            "act_bwd": (64, 64, 32, 3),
            "down_bwd": (128, 128, 32, 1),
            "gate_up_bwd": (128, 128, 32, 3),
        }
    else:
        cfg = {
            "gate_up_fwd": (64, 64, 64, 3),
            "rows_scatter": (64, 128, 32, 3),
            "act_bwd": (64, 64, 64, 3),
            "down_bwd": (128, 128, 32, 3),
            "gate_up_bwd": (128, 128, 64, 3),
        }
    return {
        name: {
            "BLOCK_M": m,
            "BLOCK_N": n,
            "BLOCK_K": k,
            "num_warps": 8,
            "num_stages": stages,
            "DOT_PRECISION": prec,
        }
        for name, (m, n, k, stages) in cfg.items()
    }


def _route(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> dict[str, torch.Tensor]:
    """Sort the pairs by expert and build the tile schedule, all on device, no host sync."""
    flat = topk_ids.reshape(-1)
    pairs = flat.numel()
    sorted_ids, order = torch.sort(flat, stable=True)  # order[r] = pair at sorted row r
    # Each expert's rows [start, end) by binary search in the sorted ids: no atomics, and no
    # bincount, whose CUDA version reads the ids' maximum on the host.
    experts = torch.arange(num_experts, device=flat.device, dtype=sorted_ids.dtype)
    start = torch.searchsorted(sorted_ids, experts)
    end = torch.searchsorted(sorted_ids, experts, right=True)
    counts = end - start
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(pairs, block_m) + min(num_experts, pairs)
    idx = torch.arange(max_tiles, device=flat.device)
    expert = torch.searchsorted(tile_end, idx, right=True)  # == E past the last real tile
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    row = start[e] + (idx - (tile_end - tiles)[e]) * block_m
    i32 = torch.int32
    return {
        "order": order.to(i32),
        "start": start.to(i32),
        "end": end.to(i32),
        "tile_expert": torch.where(valid, e, -1).to(i32),
        "tile_row": row.to(i32),
    }


def _launch_rows_scatter(a, w, route, weights, out, k_dim, n_dim, strides, scale, cfg):
    c = cfg["rows_scatter"]
    grid = (route["tile_expert"].numel(), triton.cdiv(n_dim, c["BLOCK_N"]))
    _rows_scatter_kernel[grid](
        a,
        w,
        route["order"],
        weights,
        route["tile_expert"],
        route["tile_row"],
        route["end"],
        out,
        k_dim,
        n_dim,
        *strides,
        SCALE=scale,
        **c,
    )


def moe_forward(hidden, gate_up, down, topk_ids, weights):
    """-> out (N, H) in hidden's dtype, pre (P, 2I), route dict."""
    n, h = hidden.shape
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    topk = topk_ids.shape[1]
    pairs = n * topk
    cfg = launch_configs(hidden.device, hidden.dtype)
    route = _route(topk_ids, num_experts, cfg["gate_up_fwd"]["BLOCK_M"])
    n_tiles = route["tile_expert"].numel()
    pre = torch.empty(pairs, two_i, device=hidden.device, dtype=hidden.dtype)
    act = torch.empty(pairs, inter, device=hidden.device, dtype=hidden.dtype)
    c = cfg["gate_up_fwd"]
    _gate_up_fwd_kernel[(n_tiles, triton.cdiv(inter, c["BLOCK_N"]))](
        hidden,
        gate_up,
        route["order"],
        route["tile_expert"],
        route["tile_row"],
        route["end"],
        pre,
        act,
        h,
        inter,
        topk,
        **c,
    )
    # Per-pair rows in the input dtype (half the memory of fp32); the k-sum is done in fp32.
    y = torch.empty(n, topk, h, device=hidden.device, dtype=hidden.dtype)
    # down[e] is (H, I): B[kk over I, n over H] = down[e, n, kk].
    _launch_rows_scatter(act, down, route, weights, y, inter, h, (h * inter, 1, inter), True, cfg)
    return y.sum(1, dtype=torch.float32).to(hidden.dtype), pre, route


def moe_backward(grad_out, hidden, gate_up, down, weights, pre, route, needs):
    """Gradients (d_hidden, d_gate_up, d_down, d_weights) given d out (N, H); None where
    `needs` (four booleans, same order) is False."""
    n, h = hidden.shape
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    topk = weights.shape[1]
    pairs = n * topk
    cfg = launch_configs(hidden.device, hidden.dtype)
    grad = grad_out.to(hidden.dtype).contiguous()
    d_hidden = d_gate_up = d_down = d_weights = None

    if needs[0] or needs[1] or needs[3]:
        c = cfg["act_bwd"]
        n_blocks = triton.cdiv(inter, c["BLOCK_N"])
        d_pre = torch.empty(pairs, two_i, device=hidden.device, dtype=hidden.dtype)
        dw_part = torch.empty(pairs, n_blocks, device=hidden.device, dtype=torch.float32)
        _act_bwd_kernel[(route["tile_expert"].numel(), n_blocks)](
            grad,
            down,
            pre,
            route["order"],
            weights,
            route["tile_expert"],
            route["tile_row"],
            route["end"],
            d_pre,
            dw_part,
            h,
            inter,
            topk,
            n_blocks,
            **c,
        )
        if needs[3]:
            dw = torch.empty(pairs, device=hidden.device, dtype=torch.float32)
            dw[route["order"].long()] = dw_part.sum(1)
            d_weights = dw.view(n, topk)
        if needs[0]:
            # fp32: rounding these rows to bf16 doubled d_hidden's error in tests.
            dh = torch.empty(n, topk, h, device=hidden.device, dtype=torch.float32)
            # gate_up[e] is (2I, H): B[kk over 2I, n over H] = gate_up[e, kk, n].
            _launch_rows_scatter(
                d_pre, gate_up, route, weights, dh, two_i, h, (two_i * h, h, 1), False, cfg
            )
            d_hidden = dh.sum(1, dtype=torch.float32).to(hidden.dtype)
        if needs[1]:
            c = cfg["gate_up_bwd"]
            d_gate_up = torch.empty_like(gate_up)
            grid = (num_experts, triton.cdiv(two_i, c["BLOCK_M"]), triton.cdiv(h, c["BLOCK_N"]))
            _gate_up_bwd_kernel[grid](
                d_pre,
                hidden,
                route["order"],
                route["start"],
                route["end"],
                d_gate_up,
                h,
                inter,
                topk,
                **c,
            )
    if needs[2]:
        c = cfg["down_bwd"]
        d_down = torch.empty_like(down)
        grid = (num_experts, triton.cdiv(h, c["BLOCK_M"]), triton.cdiv(inter, c["BLOCK_N"]))
        _down_bwd_kernel[grid](
            grad,
            pre,
            route["order"],
            weights,
            route["start"],
            route["end"],
            d_down,
            h,
            inter,
            topk,
            **c,
        )
    return d_hidden, d_gate_up, d_down, d_weights


# ----------------------------------------------------------------------------- autograd


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, gate_up, down, topk_weights, topk_ids):
        weights = topk_weights.detach().float().contiguous()
        out, pre, route = moe_forward(hidden, gate_up, down, topk_ids, weights)
        ctx.save_for_backward(hidden, gate_up, down, weights, pre, *route.values())
        ctx.route_keys = tuple(route)
        ctx.weights_dtype = topk_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, gate_up, down, weights, pre, *route = ctx.saved_tensors
        route = dict(zip(ctx.route_keys, route, strict=True))
        needs = ctx.needs_input_grad[:4]
        d_hidden, d_gate_up, d_down, d_weights = moe_backward(
            grad_out, hidden, gate_up, down, weights, pre, route, needs
        )
        if d_weights is not None:
            d_weights = d_weights.to(ctx.weights_dtype)
        return d_hidden, d_gate_up, d_down, d_weights, None


# ----------------------------------------------------------------------------- public


def _check_moe(hidden, gate_up, down, topk_ids, topk_weights, values: bool) -> None:
    tensors = {
        "hidden": hidden,
        "gate_up": gate_up,
        "down": down,
        "topk_ids": topk_ids,
        "topk_weights": topk_weights,
    }
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t)}")
    if hidden.dim() != 2 or hidden.numel() == 0:
        raise ValueError(f"hidden must be a non-empty (N, H) tensor, got {tuple(hidden.shape)}")
    n, h = hidden.shape
    if (
        gate_up.dim() != 3
        or gate_up.shape[2] != h
        or gate_up.shape[1] % 2
        or gate_up.shape[1] == 0
        or gate_up.shape[0] == 0
    ):
        raise ValueError(
            f"gate_up must be (E, 2I, H) with H = {h} and I >= 1, got {tuple(gate_up.shape)}"
        )
    num_experts, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if tuple(down.shape) != (num_experts, h, inter):
        raise ValueError(
            f"down must be (E, H, I) = {(num_experts, h, inter)}, got {tuple(down.shape)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must be (N, k) with N = {n}, got {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_weights.shape)}"
        )
    for name in ("hidden", "gate_up", "down", "topk_weights"):
        if tensors[name].dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be float32, float16 or bfloat16, got {tensors[name].dtype}"
            )
    if gate_up.dtype != hidden.dtype or down.dtype != hidden.dtype:
        raise ValueError(
            f"gate_up ({gate_up.dtype}) and down ({down.dtype}) must have "
            f"hidden's dtype {hidden.dtype}"
        )
    if (
        topk_ids.dtype.is_floating_point
        or topk_ids.dtype.is_complex
        or topk_ids.dtype == torch.bool
    ):
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    for name, t in tensors.items():
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden on {hidden.device}")
    # One host sync for the value check.
    if values and bool(((topk_ids < 0) | (topk_ids >= num_experts)).any()):
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        raise ValueError(
            f"topk_ids must lie in [0, E) = [0, {num_experts}), got values in [{lo}, {hi}]"
        )


def moe_experts(
    hidden: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    validate: bool | None = None,
) -> torch.Tensor:
    """Routed SwiGLU experts: sum_j w[n, j] * down[e] @ (silu(gate[e] h_n) * up[e] h_n).

    hidden (N, H); gate_up (E, 2I, H) with gate rows first; down (E, H, I), all one float
    dtype; topk_ids (N, k) integer in [0, E); topk_weights (N, k) float. -> (N, H) in
    hidden's dtype, accumulated in fp32. Differentiable in hidden, gate_up, down and
    topk_weights; deterministic (no atomics). validate: check that the ids lie in [0, E)
    (one host sync); None follows grpo.kernels.value_checks.
    """
    _check_moe(hidden, gate_up, down, topk_ids, topk_weights, checking(validate))
    if not use_triton(hidden):
        return reference.moe_experts_ref(hidden, gate_up, down, topk_ids, topk_weights)
    if gate_up[0].numel() >= 2**31:
        raise ValueError(
            f"one expert's gate_up holds {gate_up[0].numel()} elements: the "
            f"kernels index inside an expert with 32-bit offsets (< 2^31)"
        )
    return _MoEExperts.apply(
        hidden.contiguous(),
        gate_up.contiguous(),
        down.contiguous(),
        topk_weights,
        topk_ids.contiguous(),
    )
