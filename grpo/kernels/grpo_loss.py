"""The GRPO loss with its gradient written in the forward pass.

Shapes: logits (B, T, V) any float dtype with unit stride on V, logits[b, t] predicting
ids[b, t] (B, T); advantages (B,), or per token (B, T); mask, old_logp, ref_logp, sampler_logp
and importance_sampling_ratio (B, T) fp32.
Semantics: grpo/kernels/reference.py (grpo_objective: TRL 1.16's GRPOTrainer._compute_loss);
options: grpo/kernels/loss_config.py (GRPOLossConfig).

The loss is a weighted sum of per-token terms; when every weight (mask, normaliser, advantage,
sampler weight) is known before the pass (GRPOLossConfig.one_pass), d loss / d logits is
computed alongside the loss:

- One pass (token-level ratios; loss types grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo; the
  bias-corrected KL; the entropy bonus): one kernel, one program per row. Sweep 1 reads the
  row for the online logsumexp and entropy (loads marked evict_last so the row stays in L2);
  the ratio, policy term, KL and their derivative in logp follow in registers; sweep 2
  re-reads the row (from L2 when it fits) and writes the gradient. Masked rows skip the read
  and write zeros. HBM traffic: one read of the logits plus one write of the gradient.
- Two passes (sequence-level ratios (GSPO, LUSPO), VESPO's sequence weight, the off-policy
  sequence mask, the top-entropy token mask): a token's loss needs its whole sequence's (or
  the call's) log-probs or entropies, so a log-prob pass comes first, the objective runs on
  (B, T) tensors with autograd (the reference's own code, so the two agree by construction),
  and a gradient pass follows: 3 passes over the logits in all.
- No gradient needed: only the log-prob pass, which reads the logits once.

Backward only multiplies the stored gradient by grad_output, in a kernel that reads
grad_output on the device and returns at once when it is 1 (no host sync). With
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
    _round_to,
    _zero_row,
    logprobs_backward,
    logprobs_forward,
)
from .loss_config import GRPOLossConfig, resolve

_POLICY_KINDS = {"cispo": 1, "sapo": 2}  # everything else one pass takes is the PPO clip: 0


@triton.jit
def _min_nan(a, b):
    """min that returns NaN when either side is NaN, as torch.min and torch.clamp do."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit(do_not_specialize=["seq_len"])
def _grpo_token_kernel(
    logits_ptr,
    grad_ptr,
    ids_ptr,
    adv_ptr,
    w_ptr,
    old_ptr,
    ref_ptr,
    isr_ptr,
    loss_ptr,
    logp_ptr,
    kl_ptr,
    ent_ptr,
    clip_ptr,
    seq_len,
    V,
    stride_b,
    stride_t,
    stride_gb,
    stride_gt,
    scale,
    inv_temp,
    beta,
    eps_low,
    eps_high,
    delta,
    ent_scale_ptr,
    tau_pos,
    tau_neg,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_ISR: tl.constexpr,
    USE_DELTA: tl.constexpr,
    POLICY: tl.constexpr,
    BIAS_KL: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
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
        # d ratio / d logp = ratio; dlogp accumulates d loss_token / d logp. A NaN ratio (a
        # NaN old_logp) propagates through every min and max, as in the reference.
        clip_low = ratio < 0.0  # never: set by the PPO clip only
        if POLICY == 1:  # cispo: -sg(min(r, eps_high)) A logp
            capped = _min_nan(ratio, eps_high)
            loss = -capped * adv * logp
            dlogp = -capped * adv
            clip_high = (ratio > eps_high) & (adv > 0)
        elif POLICY == 2:  # sapo: -sigmoid(tau (r - 1)) 4 / tau A
            tau = tl.where(adv > 0, tau_pos, tau_neg)
            gate = tl.sigmoid(tau * (ratio - 1.0))
            loss = -gate * 4.0 / tau * adv
            dlogp = -4.0 * adv * gate * (1.0 - gate) * ratio
            clip_high = clip_low
        else:  # PPO clip, r' = min(r, delta) when delta is set
            lo = 1.0 - eps_low
            hi = 1.0 + eps_high
            in_range = (ratio >= lo) & (ratio <= hi)
            if USE_DELTA:
                coef = _min_nan(ratio, delta)
                d1 = tl.where(ratio <= delta, -adv * ratio, 0.0)
            else:
                coef = ratio
                d1 = -adv * ratio
            term1 = coef * adv
            term2 = _min_nan(_max_nan(ratio, lo), hi) * adv
            d2 = tl.where(in_range, -adv * ratio, 0.0)
            loss = -_min_nan(term1, term2)
            # torch.min's gradient: to the smaller side, split evenly on a tie.
            dlogp = tl.where(term1 < term2, d1, tl.where(term1 > term2, d2, 0.5 * (d1 + d2)))
            clip_low = (coef < lo) & (adv < 0)
            clip_high = (coef > hi) & (adv > 0)
        dlogp = tl.where(ratio != ratio, ratio, dlogp)  # a NaN ratio: a NaN gradient too
        if HAS_ISR:  # the sampler correction weighs the policy term, not the KL
            isr = tl.load(isr_ptr + row)
            loss = loss * isr
            dlogp = dlogp * isr
        kl = tl.zeros_like(logp)
        if HAS_REF:
            diff = tl.load(ref_ptr + row) - logp
            ediff = tl.exp(diff)
            k3 = ediff - diff - 1.0
            if BIAS_KL:  # k3 * r with the ratio's gradient too
                kl = k3 * ratio
                dkl = (1.0 - ediff) * ratio + k3 * ratio
            else:
                kl = k3
                dkl = 1.0 - ediff
            loss += beta * kl
            dlogp += beta * dkl
        tl.store(loss_ptr + row, loss)
        tl.store(logp_ptr + row, logp)
        tl.store(kl_ptr + row, kl)
        tl.store(ent_ptr + row, ent)
        tl.store(clip_ptr + row, clip_low.to(tl.int8) + 2 * clip_high.to(tl.int8))
        if ENTROPY_GRAD:  # d loss / d entropy of each loss token, on the device (no sync)
            h = -tl.load(ent_scale_ptr)
        else:
            h = 0.0
        _logp_entropy_grad_sweep(
            row_ptr,
            grad_row_ptr,
            idx,
            V,
            lse2,
            ent,
            w * dlogp,
            h,
            scale,
            inv_temp,
            BLOCK_V,
            ENTROPY_GRAD,
            "evict_first",
        )
    else:
        tl.store(loss_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(kl_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        tl.store(clip_ptr + row, tl.full((), 0, tl.int8))
        _zero_row(grad_row_ptr, V, BLOCK_V)


@triton.jit(do_not_specialize=["n_rows", "seq_len"])
def _scale_rows_kernel(
    x_ptr,
    factor_ptr,
    n_rows,
    seq_len,
    C,
    stride_b,
    stride_t,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """x[row] *= factor for ROWS rows of a (B, T, C) tensor per program, the product rounded
    to x's dtype as torch's mul_ does. Every program reads the factor and returns at once
    when it is 1 (autograd's seed of loss.backward()): the host never has to look at it."""
    dtype = x_ptr.dtype.element_ty
    factor = _round_to(tl.load(factor_ptr).to(tl.float32), dtype).to(tl.float32)
    if factor != 1.0:
        offs = tl.arange(0, BLOCK_C)
        for r in range(0, ROWS):
            row = tl.program_id(0).to(tl.int64) * ROWS + r
            if row < n_rows:
                row_ptr = x_ptr + (row // seq_len) * stride_b + (row % seq_len) * stride_t
                for start in range(0, C, BLOCK_C):
                    cols = start + offs
                    x = tl.load(row_ptr + cols, mask=cols < C)
                    tl.store(
                        row_ptr + cols, _round_to(x.to(tl.float32) * factor, dtype), mask=cols < C
                    )


def _flat(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return t.float().reshape(-1).contiguous() if t is not None else fallback


def _token_level_fused(
    logits: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    isr: torch.Tensor | None,
    grad: torch.Tensor,
    cfg: GRPOLossConfig,
    ent_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Launch the one-pass kernel (cfg.one_pass must hold). ent_scale: d loss / d entropy of
    each loss token (the entropy bonus; a 0-dim tensor on the device, or None without the
    bonus). -> per-token loss without the bonus, logp, entropy (B, T) and the stat terms."""
    batch, seq_len, vocab = logits.shape
    n_rows = batch * seq_len
    dev = logits.device
    outs = [torch.empty(n_rows, device=dev, dtype=torch.float32) for _ in range(4)]
    per_token, logp, kl, ent = outs
    clip = torch.empty(n_rows, device=dev, dtype=torch.int8)
    w = weights.reshape(-1).contiguous()  # (N,)
    block, warps = row_config(vocab, dev)
    _grpo_token_kernel[(n_rows,)](
        logits,
        grad,
        ids.reshape(-1).long().contiguous(),
        token_advantages(advantages, batch, seq_len),
        w,
        _flat(old_logp, w),
        _flat(ref_logp, w),
        _flat(isr, w),
        per_token,
        logp,
        kl,
        ent,
        clip,
        seq_len,
        vocab,
        logits.stride(0),
        logits.stride(1),
        grad.stride(0),
        grad.stride(1),
        LOG2E / cfg.temperature,
        1.0 / cfg.temperature,
        float(cfg.beta),
        float(cfg.eps_low),
        float(cfg.eps_high),
        float(cfg.delta) if cfg.delta is not None else 0.0,
        w if ent_scale is None else ent_scale.reshape(1),
        float(cfg.sapo_temperature_pos),
        float(cfg.sapo_temperature_neg),
        HAS_OLD=old_logp is not None,
        HAS_REF=ref_logp is not None,
        HAS_ISR=isr is not None,
        USE_DELTA=cfg.delta is not None,
        POLICY=_POLICY_KINDS.get(cfg.loss_type, 0),
        BIAS_KL=cfg.use_bias_correction_kl,
        ENTROPY_GRAD=ent_scale is not None,
        BLOCK_V=block,
        num_warps=warps,
    )
    shape = (batch, seq_len)
    terms = {
        "kl": kl.view(shape),
        "clip_low": (clip & 1).bool().view(shape),
        "clip_high": (clip & 2).bool().view(shape),
        "phi": None,
    }
    return per_token.view(shape), logp.view(shape), ent.view(shape), terms


SCALE_ROWS = 16  # rows per program of _scale_rows_kernel


def scale_config(width: int, device: torch.device) -> dict[str, int]:
    """Launch keywords of _scale_rows_kernel for rows of `width` elements (shared with
    tests/kernels/test_compile.py)."""
    block, warps = row_config(width, device)
    return {"ROWS": SCALE_ROWS, "BLOCK_C": block, "num_warps": warps}


def scale_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x *= factor in place without a host sync: x (B, T, C) or (R, C) with unit stride on
    C; factor a one-element tensor on x's device (a backward's grad_output)."""
    x3 = x if x.dim() == 3 else x.unsqueeze(0)  # (1, R, C)
    batch, seq_len, width = x3.shape
    n_rows = batch * seq_len
    if n_rows == 0 or width == 0:
        return x
    _scale_rows_kernel[(triton.cdiv(n_rows, SCALE_ROWS),)](
        x3,
        factor.reshape(1),
        n_rows,
        seq_len,
        width,
        x3.stride(0),
        x3.stride(1),
        **scale_config(width, x.device),
    )
    return x


def entropy_scale(
    cfg: GRPOLossConfig, mask: torch.Tensor, accumulation_steps: int
) -> torch.Tensor | None:
    """d loss / d entropy of each loss token under TRL's entropy bonus (one-pass configs:
    every loss token is in the bonus), as a 0-dim tensor on mask's device (no sync); None
    without the bonus."""
    if cfg.entropy_coef == 0.0:
        return None
    return cfg.entropy_coef / (mask.float().sum().clamp(min=1.0) * accumulation_steps)


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
        # One extra pass over the gradient only when grad_output is not 1, decided on the
        # device: no host sync.
        return scale_(grad, grad_output), None, None


def grpo_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    config: GRPOLossConfig | None = None,
    sampler_logp: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items: float | torch.Tensor | None = None,
    num_sequences: float | None = None,
    accumulation_steps: int = 1,
    aux_loss: torch.Tensor | None = None,
    inplace: bool = False,
    validate: bool | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss (0-dim fp32, with gradient to logits) and stats (dict of 0-dim fp32).

    logits (B, T, V) predict ids (B, T); advantages (B,) or per token (B, T); mask (B, T) of
    0/1 (any dtype); old_logp (B, T) or None for on-policy (ratio 1); ref_logp (B, T), needed
    when beta > 0; sampler_logp (B, T) for the off-policy mask (default old_logp);
    importance_sampling_ratio (B, T): the sampler correction on the policy term.
    config: a GRPOLossConfig; its fields may also be given (or overridden) as keywords.
    Counts for the normalisers (see reference.aggregation_weights): num_items (tokens of the
    optimizer step), num_sequences (its sequences), accumulation_steps (its micro-batches).
    inplace=True writes the gradient over the logits (they must not be used afterwards).
    validate: check the values (ids in [0, V); advantages, old_logp, ref_logp and
    importance_sampling_ratio finite), one host sync; None follows grpo.kernels.value_checks.
    Without it neither the call nor its backward synchronises the device.
    Stats: reference.stat_names(loss_type, importance_level), TRL's names and meanings.
    """
    cfg = resolve(config, options)
    if aux_loss is not None:  # the router's loss joins after the kernels' part
        loss, stats = grpo_loss(
            logits,
            ids,
            advantages,
            mask,
            old_logp,
            ref_logp,
            config=cfg,
            sampler_logp=sampler_logp,
            importance_sampling_ratio=importance_sampling_ratio,
            num_items=num_items,
            num_sequences=num_sequences,
            accumulation_steps=accumulation_steps,
            inplace=inplace,
            validate=validate,
        )
        return reference.add_aux_loss(loss, stats, aux_loss, cfg, accumulation_steps)
    check_logits_ids(logits, ids)
    counts = dict(
        num_items=num_items, num_sequences=num_sequences, accumulation_steps=accumulation_steps
    )
    check_loss_inputs(
        logits,
        ids,
        logits.shape[-1],
        advantages,
        mask,
        old_logp,
        ref_logp,
        cfg,
        sampler_logp=sampler_logp,
        importance_sampling_ratio=importance_sampling_ratio,
        validate=validate,
        **counts,
    )
    ref_logp = ref_logp if cfg.beta > 0 else None
    tensors = dict(sampler_logp=sampler_logp, importance_sampling_ratio=importance_sampling_ratio)
    if not use_triton(logits):
        return reference.grpo_loss_ref(
            logits, ids, advantages, mask, old_logp, ref_logp, config=cfg, **tensors, **counts
        )

    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    grad = None
    with torch.no_grad():
        if needs_grad:
            # detach(): the same storage, but a tensor autograd may take over as .grad.
            grad = (
                logits.detach()
                if inplace
                else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            )
        if needs_grad and cfg.one_pass:
            weights = reference.aggregation_weights(
                mask, cfg.loss_type, max_completion_length=cfg.max_completion_length, **counts
            )
            ent_scale = entropy_scale(cfg, mask, accumulation_steps)
            per_token, logp, ent, terms = _token_level_fused(
                logits.detach(),
                ids,
                advantages,
                weights,
                old_logp,
                ref_logp,
                importance_sampling_ratio,
                grad,
                cfg,
                ent_scale,
            )
            loss = (per_token * weights).sum()
            if ent_scale is not None:
                loss = loss - ent_scale * (ent * mask.float()).sum()
        else:
            logp, lse2, ent = logprobs_forward(logits.detach(), ids, cfg.temperature, True)
            loss, terms, grad_logp, grad_ent = objective_from_logp(
                logp,
                ent,
                advantages,
                mask,
                old_logp,
                ref_logp,
                needs_grad,
                cfg,
                **tensors,
                **counts,
            )
            if needs_grad:
                logprobs_backward(
                    logits.detach(), ids, lse2, ent, grad_logp, grad_ent, cfg.temperature, grad
                )
        stats = reference.grpo_stats(cfg, terms, logp, ent, mask)
    if not needs_grad:
        return loss, stats
    if inplace and hasattr(torch.autograd.graph, "increment_version"):
        torch.autograd.graph.increment_version(logits)
    return _LossWithGrad.apply(logits, loss, grad), stats


def objective_from_logp(
    logp: torch.Tensor,
    ent: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    needs_grad: bool,
    cfg: GRPOLossConfig,
    **rest,
) -> tuple[torch.Tensor, dict, torch.Tensor | None, torch.Tensor | None]:
    """reference.grpo_objective on (B, T) log-probs and entropies; with needs_grad also
    d loss / d logp and d loss / d entropy (None when the loss does not depend on it)."""
    if not needs_grad:
        loss, terms = reference.grpo_objective(
            logp, ent, advantages, mask, old_logp, ref_logp, config=cfg, **rest
        )
        return loss, terms, None, None
    with torch.enable_grad():
        logp_leaf = logp.detach().requires_grad_()
        ent_leaf = ent.detach().requires_grad_()
        loss, terms = reference.grpo_objective(
            logp_leaf, ent_leaf, advantages, mask, old_logp, ref_logp, config=cfg, **rest
        )
        grad_logp, grad_ent = torch.autograd.grad(loss, (logp_leaf, ent_leaf), allow_unused=True)
    if grad_logp is None:
        grad_logp = torch.zeros_like(logp)
    return loss.detach(), terms, grad_logp, grad_ent
