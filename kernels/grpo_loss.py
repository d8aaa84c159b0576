"""The GRPO loss with its gradient written in the forward pass.

Shapes: logits (B, T, V) any float dtype with unit stride on V, logits[b, t] predicting
ids[b, t] (B, T); advantages (B,), or per token (B, T); mask (B, T); old_logp and ref_logp
(B, T) fp32.
Semantics: kernels/reference.py (grpo_per_token_loss, aggregation_weights).

The loss is a weighted sum of per-token terms whose weights (mask, normaliser, advantage)
are known before the pass, so d loss / d logits is computed alongside the loss:

- importance_level="token": one kernel, one program per row. Sweep 1 reads the row for the
  online logsumexp and entropy (loads marked evict_last so the row stays in L2); the
  ratio, clipping, KL, entropy bonus and per-token loss follow in registers; sweep 2
  re-reads the row (from L2 when it fits) and writes the gradient. Masked rows skip the
  read and write zeros. HBM traffic: one read of the logits plus one write of the gradient.
- importance_level="sequence" (GSPO): the ratio of a token needs its whole sequence, so a
  log-prob pass comes first, the per-sequence maths runs on (B, T) tensors, and a gradient
  pass follows: 3 passes over the logits in all.
- No gradient needed: only the log-prob pass, which reads the logits once.

Backward only multiplies the stored gradient by grad_output (skipped when it is 1). With
inplace=True the gradient overwrites the logits: no extra memory, but the logits are
consumed; their autograd version counter is bumped, so autograd raises if anything saved
them for its own backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._checks import (
    check_logits_ids,
    check_loss_inputs,
    row_config,
    token_advantages,
    use_triton,
)
from .logprobs import (
    LOG2E,
    _logp_entropy_grad_sweep,
    _lse_sweep,
    _zero_row,
    logprobs_backward,
    logprobs_forward,
)


@triton.jit(do_not_specialize=["seq_len"])
def _grpo_token_kernel(logits_ptr, grad_ptr, ids_ptr, adv_ptr, w_ptr, old_ptr, ref_ptr,
                       loss_ptr, logp_ptr, kl_ptr, ent_ptr, clip_ptr,
                       seq_len, V, stride_b, stride_t, stride_gb, stride_gt,
                       scale, inv_temp, beta, eps_low, eps_high, delta, entropy_coef,
                       HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, USE_DELTA: tl.constexpr,
                       CISPO: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row % seq_len
    row_ptr = logits_ptr + b * stride_b + t * stride_t
    grad_row_ptr = grad_ptr + b * stride_gb + t * stride_gt
    w = tl.load(w_ptr + row)  # this token's weight in the loss: 0 for masked tokens
    if w != 0.0:
        m, s, tsum = _lse_sweep(row_ptr, V, scale, BLOCK_V, True, "evict_last")
        lse2 = m + tl.log2(s)
        idx = tl.load(ids_ptr + row)
        logp = (tl.load(row_ptr + idx).to(tl.float32) * scale - lse2) * 0.6931471805599453
        ent = (lse2 - tsum / s) * 0.6931471805599453
        adv = tl.load(adv_ptr + row)
        if HAS_OLD:
            ratio = tl.exp(logp - tl.load(old_ptr + row))
        else:
            ratio = tl.exp(logp - logp)  # on-policy: exactly 1, gradient still flows
        if CISPO:
            capped = tl.minimum(ratio, eps_high)
            loss = -capped * adv * logp
            dlogp = -capped * adv
            clip_low = ratio < 0.0  # never: the ratio is positive
            clip_high = (ratio > eps_high) & (adv > 0)
        else:
            lo = 1.0 - eps_low
            hi = 1.0 + eps_high
            in_range = (ratio >= lo) & (ratio <= hi)
            if USE_DELTA:
                term1 = tl.minimum(ratio, delta) * adv
                d1 = tl.where(ratio <= delta, -adv * ratio, 0.0)
            else:
                term1 = ratio * adv
                d1 = -adv * ratio
            term2 = tl.minimum(tl.maximum(ratio, lo), hi) * adv
            d2 = tl.where(in_range, -adv * ratio, 0.0)
            loss = -tl.minimum(term1, term2)
            # torch.min's gradient: to the smaller side, split evenly on a tie.
            dlogp = tl.where(term1 < term2, d1, tl.where(term1 > term2, d2, 0.5 * (d1 + d2)))
            clip_low = (ratio < lo) & (adv < 0)
            clip_high = (ratio > hi) & (adv > 0)
        kl = tl.zeros_like(logp)
        if HAS_REF:
            diff = tl.load(ref_ptr + row) - logp
            ediff = tl.exp(diff)
            kl = ediff - diff - 1.0
            loss += beta * kl
            dlogp += beta * (1.0 - ediff)
        loss -= entropy_coef * ent
        tl.store(loss_ptr + row, loss)
        tl.store(logp_ptr + row, logp)
        tl.store(kl_ptr + row, kl)
        tl.store(ent_ptr + row, ent)
        tl.store(clip_ptr + row, clip_low.to(tl.int8) + 2 * clip_high.to(tl.int8))
        _logp_entropy_grad_sweep(row_ptr, grad_row_ptr, idx, V, lse2, ent, w * dlogp,
                                 -w * entropy_coef, scale, inv_temp, BLOCK_V, ENTROPY_GRAD,
                                 "evict_first")
    else:
        tl.store(loss_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(kl_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        tl.store(clip_ptr + row, tl.full((), 0, tl.int8))
        _zero_row(grad_row_ptr, V, BLOCK_V)


def _token_level_fused(
    logits: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    grad: torch.Tensor,
    *,
    temperature: float,
    beta: float,
    eps_low: float,
    eps_high: float,
    delta: float | None,
    loss_type: str,
    entropy_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Launch the fused kernel. -> per-token loss, logp, entropy (B, T) and the stat terms."""
    batch, seq_len, vocab = logits.shape
    n_rows = batch * seq_len
    dev = logits.device
    outs = [torch.empty(n_rows, device=dev, dtype=torch.float32) for _ in range(4)]
    per_token, logp, kl, ent = outs
    clip = torch.empty(n_rows, device=dev, dtype=torch.int8)
    w = weights.reshape(-1).contiguous()  # (N,)
    old = old_logp.float().reshape(-1).contiguous() if old_logp is not None else w
    ref = ref_logp.float().reshape(-1).contiguous() if ref_logp is not None else w
    block, warps = row_config(vocab, dev)
    _grpo_token_kernel[(n_rows,)](
        logits, grad, ids.reshape(-1).long().contiguous(),
        token_advantages(advantages, batch, seq_len), w,
        old, ref, per_token, logp, kl, ent, clip,
        seq_len, vocab, logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1),
        LOG2E / temperature, 1.0 / temperature, float(beta), float(eps_low), float(eps_high),
        float(delta) if delta is not None else 0.0, float(entropy_coef),
        HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None,
        USE_DELTA=delta is not None, CISPO=loss_type == "cispo",
        ENTROPY_GRAD=entropy_coef != 0.0, BLOCK_V=block, num_warps=warps,
    )
    shape = (batch, seq_len)
    terms = {"kl": kl.view(shape), "clip_low": (clip & 1).bool().view(shape),
             "clip_high": (clip & 2).bool().view(shape)}
    return per_token.view(shape), logp.view(shape), ent.view(shape), terms


class _LossWithGrad(torch.autograd.Function):
    """Attach a gradient computed in the forward pass to a loss value."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor):
        ctx.grad = grad
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "grpo_loss's backward ran twice: its gradient is computed once, in the forward "
                "pass; call grpo_loss again instead of retain_graph=True"
            )
        ctx.grad = None
        if bool(grad_output != 1):  # one extra pass over the gradient only when scaled
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None


def grpo_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "grpo",
    importance_level: str = "token",
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    inplace: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss (0-dim fp32, with gradient to logits) and stats (dict of 0-dim fp32).

    logits (B, T, V) predict ids (B, T); advantages (B,) or per token (B, T); mask (B, T) of
    0/1 (any dtype).
    old_logp (B, T) or None for on-policy (ratio 1); ref_logp (B, T), needed when beta > 0.
    loss_type: grpo | bnpo | dr_grpo | dapo | cispo; importance_level: token | sequence.
    num_items: the dapo/bnpo/cispo normaliser (default: sum of this call's mask).
    inplace=True writes the gradient over the logits (they must not be used afterwards).
    Stats: kl, clip_low, clip_high, clip_region, entropy, logp_mean (masked token means).
    """
    check_logits_ids(logits, ids)
    check_loss_inputs(
        logits, ids, logits.shape[-1], advantages, mask, old_logp, ref_logp,
        temperature=temperature, beta=beta, eps_low=eps_low, eps_high=eps_high, delta=delta,
        loss_type=loss_type, importance_level=importance_level,
        max_completion_length=max_completion_length, num_items=num_items,
    )
    ref_logp = ref_logp if beta > 0 else None
    options = dict(beta=beta, eps_low=eps_low, eps_high=eps_high, delta=delta,
                   loss_type=loss_type, entropy_coef=entropy_coef)
    if not use_triton(logits):
        return reference.grpo_loss_ref(
            logits, ids, advantages, mask, old_logp, ref_logp, temperature=temperature,
            importance_level=importance_level, max_completion_length=max_completion_length,
            num_items=num_items, **options,
        )

    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    weights = reference.aggregation_weights(mask, loss_type, max_completion_length, num_items)
    grad = None
    with torch.no_grad():
        if needs_grad:
            # detach(): the same storage, but a tensor autograd may take over as .grad.
            grad = logits.detach() if inplace else torch.empty(logits.shape, dtype=logits.dtype,
                                                      device=logits.device)
        if needs_grad and importance_level == "token":
            per_token, logp, ent, terms = _token_level_fused(
                logits.detach(), ids, advantages, weights, old_logp, ref_logp, grad,
                temperature=temperature, **options,
            )
        else:
            logp, lse2, ent = logprobs_forward(logits.detach(), ids, temperature, True)
            per_token, terms, grad_logp, grad_ent = _per_token_from_logp(
                logp, ent, advantages, mask, old_logp, ref_logp, weights, needs_grad,
                importance_level=importance_level, **options,
            )
            if needs_grad:
                logprobs_backward(logits.detach(), ids, lse2, ent, grad_logp, grad_ent,
                                  temperature, grad)
        loss = (per_token * weights).sum()
        stats = reference.grpo_stats(terms, logp, ent, mask)
    if not needs_grad:
        return loss, stats
    if inplace and hasattr(torch.autograd.graph, "increment_version"):
        torch.autograd.graph.increment_version(logits)
    return _LossWithGrad.apply(logits, loss, grad), stats


def _per_token_from_logp(
    logp: torch.Tensor,
    ent: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    weights: torch.Tensor,
    needs_grad: bool,
    **options,
) -> tuple[torch.Tensor, dict, torch.Tensor | None, torch.Tensor | None]:
    """The per-token maths on (B, T) log-probs, as the reference defines it; with needs_grad
    also d loss / d logp and d loss / d entropy (None when the entropy bonus is off)."""
    if not needs_grad:
        per_token, terms = reference.grpo_per_token_loss(
            logp, ent, advantages, mask, old_logp, ref_logp, **options
        )
        return per_token, terms, None, None
    with torch.enable_grad():
        logp_leaf = logp.detach().requires_grad_()
        ent_leaf = ent.detach().requires_grad_()
        per_token, terms = reference.grpo_per_token_loss(
            logp_leaf, ent_leaf, advantages, mask, old_logp, ref_logp, **options
        )
        grad_logp, grad_ent = torch.autograd.grad(
            (per_token * weights).sum(), (logp_leaf, ent_leaf), allow_unused=True
        )
    return per_token.detach(), terms, grad_logp, grad_ent
