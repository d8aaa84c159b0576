"""Log-probs and the GRPO loss straight from hidden states: the lm_head is fused in and the
(B, T, V) logits never exist at once.

Shapes: hidden (B, T, H); weight (V, H), the lm_head; ids (B, T); advantages (B,) or (B, T);
mask, old_logp, ref_logp (B, T). Semantics: those of grpo_loss / token_logprobs on the logits
hidden @ weight.T (grpo/kernels/reference.py).

Tokens are processed in chunks of rows. One-pass options (GRPOLossConfig.one_pass), per chunk:
logits = h @ W^T (one GEMM), the fused GRPO kernel turns them in place into d loss / d logits,
then d h = g @ W and d W += g^T h (fp32 accumulator): 6 N H V FLOPs in all, no recomputed GEMM,
gradients computed in the forward and only scaled in backward. The others (sequence-level
ratios, VESPO, the off-policy mask, the entropy quantile) need every token's log-prob before
any gradient: a first sweep of chunks computes log-probs and entropies, the objective runs on
(B, T), and a second sweep recomputes each chunk's logits for its gradient (8 N H V FLOPs).
Peak extra memory: one chunk's logits and the weight-gradient accumulator.
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import (
    check_logits_ids,
    check_loss_inputs,
    check_values,
    checking,
    token_advantages,
    use_triton,
)
from .grpo_loss import _token_level_fused, entropy_scale, objective_from_logp, scale_
from .logprobs import logprobs_backward, logprobs_forward
from .loss_config import GRPOLossConfig, resolve

_CHUNK_BYTES = 256 * 2**20  # logits of one chunk


def _chunk_rows(n_rows: int, vocab: int, device: torch.device, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    if device.type != "cuda":
        return min(n_rows, 64)
    return max(1, min(n_rows, _CHUNK_BYTES // (4 * vocab)))


def _logits(h: torch.Tensor, weight: torch.Tensor, logits_fp32: bool) -> torch.Tensor:
    if logits_fp32:
        return h.float() @ weight.float().t()  # (c, V)
    return h @ weight.t()


def _check(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> None:
    check_logits_ids(hidden, ids, name="hidden")
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() != 2
        or weight.shape[1] != hidden.shape[-1]
    ):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
        raise ValueError(
            f"weight must be the lm_head (V, H) with H = {hidden.shape[-1]}, got {shape}"
        )
    if weight.device != hidden.device or weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight ({weight.dtype}, {weight.device}) must match hidden "
            f"({hidden.dtype}, {hidden.device})"
        )


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    logits_fp32: bool = False,
    validate: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(ids) (B, T) fp32 [and entropy] under softmax(hidden @ weight.T / temperature),
    one chunk of logits at a time; no gradient. validate: as token_logprobs."""
    _check(hidden, weight, ids)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if checking(validate):
        check_values(ids, weight.shape[0])
    batch, seq_len, width = hidden.shape
    flat_h, flat_ids = hidden.reshape(-1, width), ids.reshape(-1)
    step = _chunk_rows(flat_h.shape[0], weight.shape[0], hidden.device, chunk_size)
    parts = []
    with torch.no_grad():
        for r0 in range(0, flat_h.shape[0], step):
            logits = _logits(flat_h[r0 : r0 + step], weight, logits_fp32)[:, None]  # (c, 1, V)
            c_ids = flat_ids[r0 : r0 + step, None]
            if use_triton(hidden):
                logp, _, ent = logprobs_forward(logits, c_ids, temperature, return_entropy)
            else:
                out = reference.token_logprobs_ref(
                    logits, c_ids, temperature=temperature, return_entropy=return_entropy
                )
                logp, ent = out if return_entropy else (out, None)
            parts.append((logp, ent))
    logp = torch.cat([p[0] for p in parts]).view(batch, seq_len)
    if not return_entropy:
        return logp
    return logp, torch.cat([p[1] for p in parts]).view(batch, seq_len)


class _LossWithGrads(torch.autograd.Function):
    """Attach gradients for hidden and weight computed in the forward pass to a loss."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, d_hidden, d_weight):
        ctx.grads = (d_hidden, d_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_grpo_loss's backward ran twice: its gradients are "
                "computed once, in the forward pass"
            )
        d_hidden, d_weight = ctx.grads
        ctx.grads = None
        # In place, and only when grad_output is not 1, decided on the device: no host sync.
        for grad in (d_hidden, d_weight):
            if grad is not None:
                scale_(grad, grad_output)
        return d_hidden, d_weight, None, None, None


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    inplace: bool = True,
    chunk_size: int | None = None,
    logits_fp32: bool = False,
    validate: bool | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """grpo_loss on hidden @ weight.T without materialising the logits: (loss, stats), with
    gradients to hidden and weight. Same options, counts and `validate` as grpo_loss;
    `inplace` is accepted for parity (chunks are always reused in place); `logits_fp32`
    computes the lm_head in fp32."""
    del inplace
    cfg = resolve(config, options)
    if aux_loss is not None:  # the router's loss joins after the kernels' part
        loss, stats = linear_grpo_loss(
            hidden,
            weight,
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
            chunk_size=chunk_size,
            logits_fp32=logits_fp32,
            validate=validate,
        )
        return reference.add_aux_loss(loss, stats, aux_loss, cfg, accumulation_steps)
    _check(hidden, weight, ids)
    counts = dict(
        num_items=num_items, num_sequences=num_sequences, accumulation_steps=accumulation_steps
    )
    check_loss_inputs(
        hidden,
        ids,
        weight.shape[0],
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
    if not use_triton(hidden):
        logits = _logits(hidden, weight, logits_fp32)
        return reference.grpo_loss_ref(
            logits, ids, advantages, mask, old_logp, ref_logp, config=cfg, **tensors, **counts
        )

    batch, seq_len, width = hidden.shape
    n_rows = batch * seq_len
    flat_h, flat_ids = hidden.detach().reshape(n_rows, width), ids.reshape(n_rows, 1)
    w_det = weight.detach()
    step = _chunk_rows(n_rows, weight.shape[0], hidden.device, chunk_size)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    d_hidden = torch.empty_like(flat_h) if need_h else None
    d_weight = (
        torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
    )
    chunks = [slice(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]

    def backprop(rows: slice, grad: torch.Tensor) -> None:
        """d_hidden[rows] = g @ W and d_weight += g^T h for one chunk's logit gradient."""
        h = flat_h[rows]
        if d_hidden is not None:
            d_hidden[rows] = (grad @ w_det.to(grad.dtype)).to(d_hidden.dtype)
        if d_weight is not None:
            d_weight.addmm_(grad.t().float(), h.float())

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(n_rows, 1)

    adv_tok = token_advantages(advantages, batch, seq_len)  # (N,)
    with torch.no_grad():
        if (need_h or need_w) and cfg.one_pass:
            weights = reference.aggregation_weights(
                mask, cfg.loss_type, max_completion_length=cfg.max_completion_length, **counts
            )
            ent_scale = entropy_scale(cfg, mask, accumulation_steps)
            isr = flat(importance_sampling_ratio)
            outs = []
            for rows in chunks:
                logits = _logits(flat_h[rows], w_det, logits_fp32)[:, None]  # (c, 1, V)
                outs.append(
                    _token_level_fused(
                        logits,
                        flat_ids[rows],
                        adv_tok[rows],
                        weights.reshape(n_rows, 1)[rows],
                        None if old_logp is None else flat(old_logp)[rows],
                        None if ref_logp is None else flat(ref_logp)[rows],
                        None if isr is None else isr[rows],
                        logits,
                        cfg,
                        ent_scale,
                    )
                )
                backprop(rows, logits[:, 0])
            per_token = torch.cat([o[0] for o in outs]).view(batch, seq_len)
            logp = torch.cat([o[1] for o in outs]).view(batch, seq_len)
            ent = torch.cat([o[2] for o in outs]).view(batch, seq_len)
            terms = {
                k: torch.cat([o[3][k] for o in outs]).view(batch, seq_len)
                for k in ("kl", "clip_low", "clip_high")
            }
            terms["phi"] = None
            loss = (per_token * weights).sum()
            if ent_scale is not None:
                loss = loss - ent_scale * (ent * mask.float()).sum()
        else:
            firsts = [
                logprobs_forward(
                    _logits(flat_h[rows], w_det, logits_fp32)[:, None],
                    flat_ids[rows],
                    cfg.temperature,
                    True,
                )
                for rows in chunks
            ]
            logp = torch.cat([f[0] for f in firsts]).view(batch, seq_len)
            lse2 = torch.cat([f[1] for f in firsts]).view(n_rows, 1)
            ent = torch.cat([f[2] for f in firsts]).view(batch, seq_len)
            loss, terms, g, h = objective_from_logp(
                logp,
                ent,
                advantages,
                mask,
                old_logp,
                ref_logp,
                need_h or need_w,
                cfg,
                **tensors,
                **counts,
            )
            if need_h or need_w:
                for rows in chunks:  # second sweep: the logits again, then their gradient
                    logits = _logits(flat_h[rows], w_det, logits_fp32)[:, None]
                    logprobs_backward(
                        logits,
                        flat_ids[rows],
                        lse2[rows],
                        flat(ent)[rows],
                        flat(g)[rows],
                        None if h is None else flat(h)[rows],
                        cfg.temperature,
                        logits,
                    )
                    backprop(rows, logits[:, 0])
        stats = reference.grpo_stats(cfg, terms, logp, ent, mask)
    if not (need_h or need_w):
        return loss, stats
    d_h = None if d_hidden is None else d_hidden.view_as(hidden)
    d_w = None if d_weight is None else d_weight.to(weight.dtype)
    return _LossWithGrads.apply(hidden, weight, loss, d_h, d_w), stats
