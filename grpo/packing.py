"""Padding-free training forwards: the sequences of a micro-batch packed into one row.

A Rollout keeps its rows padded: prompts on the left to width P, completions on the right to
width C. A packed micro-batch concatenates each row's real tokens (its prompt, then its
completion less the last token, which predicts nothing) into one row of L tokens, with
position ids restarting at 0 for each sequence and no attention mask. transformers reads the
sequence boundaries from those positions: flash-attention runs its varlen kernel, sdpa and
eager get a block-diagonal causal mask (masking_utils.find_packed_sequence_indices); grpo-sft's
`--packing` uses the same mechanism. The outputs are those of the padded forward (tested to
fp32 rounding for a dense and an MoE family).

Only the hidden states that predict a completion token go on to the lm_head: `PackedBatch.pred`
(Ntok positions), their log-probs are scattered back to the (mb, C) layout (zeros elsewhere),
and the GRPO objective runs there unchanged (grpo.kernels.reference.grpo_objective: masks,
sequence-level ratios, per-sequence normalisation), so the step's loss and gradient are the
padded ones. `CompactLogprobs` takes the logits (or the last hidden states and the lm_head
weight, in chunks of rows: no (Ntok, V) logits at once) and differentiates the log-probs and
entropies in its backward, one chunk at a time.

Routing replay: the expert ids recorded for (row, padded column) follow their token into the
packed row (`PackedBatch.routing`); a token with no record (the last of a full-length
completion, fed only when the router's aux loss needs every token) gets -1: it routes itself.

Attention within each sequence. flash-attention's varlen kernel does it from the positions. sdpa
(the default elsewhere) would get a dense block-diagonal mask over the whole packed row, whose
L^2 attention cost more than padding saved (docs/packing.md's figures); with
`use_segment_attention` the model's attention becomes SEGMENT_ATTENTION instead: sdpa as before
for every other forward, and for a packed one (the `packed_segments` keyword, which
transformers hands down to the attention) causal sdpa over each sequence alone, sequences of
equal length in one call: sum(n_i^2) attention, as flash-attention's. The packed forward then
passes an all-ones attention mask, so transformers builds no block-diagonal mask at all.

Token-budget micro-batches (`token_budget_bins`): first-fit decreasing over the packed lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from grpo.kernels import reference

from .rollout import Rollout

SEGMENT_ATTENTION = "grpo_segment_sdpa"  # the attention implementation's registered name

_CUDA_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk of rows on a GPU
_CPU_CHUNK_ROWS = 1024


def sequence_lengths(rollout: Rollout, keep_last: bool = False) -> tuple[torch.Tensor, ...]:
    """(prompt lengths, completion lengths, tokens fed to a packed forward) per row (N,)."""
    p = rollout.prompt_mask.sum(-1).long().cpu()
    c = rollout.completion_mask.sum(-1).long().cpu()
    fed = p + (c if keep_last else (c - 1).clamp(min=0))
    return p, c, fed


def first_fit_decreasing(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Indices per bin: items in decreasing cost, each into the first bin it fits (total <=
    budget), else a new bin; an item over the budget gets a bin of its own. Bins keep their
    items in increasing index and come in the order they were opened."""
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, got {budget}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    bins: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for b, total in enumerate(used):
            if total + costs[i] <= budget:
                bins[b].append(i)
                used[b] += costs[i]
                break
        else:
            bins.append([i])
            used.append(costs[i])
    return [sorted(b) for b in bins]


def token_budget_bins(rollout: Rollout, budget: int, keep_last: bool = False) -> list[torch.Tensor]:
    """The rows of each micro-batch (int64 index tensors) under a budget of packed tokens."""
    fed = sequence_lengths(rollout, keep_last)[2].tolist()
    return [torch.tensor(b, dtype=torch.long) for b in first_fit_decreasing(fed, budget)]


@dataclass
class PackedBatch:
    """Rows `rows` of a rollout as one packed sequence of L tokens."""

    input_ids: torch.Tensor  # (1, L)
    position_ids: torch.Tensor  # (1, L) restarting at 0 for each sequence
    token_row: torch.Tensor  # (L,) each packed token's row in the micro-batch
    token_col: torch.Tensor  # (L,) ... and its column in the padded prompt + completion layout
    pred: torch.Tensor  # (Ntok,) packed positions whose hidden states predict completion tokens
    out_row: torch.Tensor  # (Ntok,) the predicted token's row in the (mb, C) completion layout
    out_col: torch.Tensor  # (Ntok,) ... and its column
    shape: tuple[int, int]  # (mb, C)
    completion_ids: torch.Tensor  # (Ntok,) the predicted tokens
    segments: tuple[tuple[int, int], ...]  # (start, end) of each sequence in the packed row

    def __len__(self) -> int:
        return self.input_ids.shape[1]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """(Ntok,) per completion token -> (mb, C), zeros on padding; differentiable."""
        out = values.new_zeros(self.shape)
        index = (self.out_row.to(values.device), self.out_col.to(values.device))
        return out.index_put(index, values)

    def routing(self, routing: torch.Tensor) -> torch.Tensor:
        """Recorded expert ids of the micro-batch's rows (layers, mb, P + C - 1, k) -> those of
        the packed tokens (layers, 1, L, k); -1 where a token has no record (it routes
        itself)."""
        width = routing.shape[2]
        recorded = self.token_col < width
        col = self.token_col.clamp(max=width - 1)
        out = routing[:, self.token_row, col].clone()
        out[:, ~recorded] = -1
        return out[:, None]


def pack(rollout: Rollout, rows: slice | torch.Tensor, keep_last: bool = False) -> PackedBatch:
    """The sequences of rows `rows` packed into one row. keep_last: also feed each
    completion's last token (it predicts nothing; needed only for the router's aux loss,
    which averages over every token)."""
    prompt_ids, completion_ids = rollout.prompt_ids[rows].cpu(), rollout.completion_ids[rows].cpu()
    p_len, c_len, fed = sequence_lengths(rollout.select(rows), keep_last)
    if bool((p_len == 0).any()):
        raise ValueError("packing needs a prompt of at least one token in every row")
    mb, width_p = prompt_ids.shape
    width_c = completion_ids.shape[1]
    ids, rows_of, cols_of, pred, out_row, out_col, positions = [], [], [], [], [], [], []
    segments = []
    start = 0
    # Equal lengths side by side: the segment attention runs each run of them in one call.
    for r in sorted(range(mb), key=lambda r: (int(fed[r]), r)):
        p, c, n = int(p_len[r]), int(c_len[r]), int(fed[r])
        cols = torch.cat([torch.arange(width_p - p, width_p), width_p + torch.arange(n - p)])
        ids.append(torch.cat([prompt_ids[r, width_p - p :], completion_ids[r, : n - p]]))
        rows_of.append(torch.full((n,), r, dtype=torch.long))
        cols_of.append(cols)
        positions.append(torch.arange(n))
        # completion token t is predicted by the hidden state of the token before it
        pred.append(start + p - 1 + torch.arange(c))
        out_row.append(torch.full((c,), r, dtype=torch.long))
        out_col.append(torch.arange(c))
        segments.append((start, start + n))
        start += n
    out_row_t, out_col_t = torch.cat(out_row), torch.cat(out_col)
    return PackedBatch(
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(positions)[None],
        token_row=torch.cat(rows_of),
        token_col=torch.cat(cols_of),
        pred=torch.cat(pred),
        out_row=out_row_t,
        out_col=out_col_t,
        shape=(mb, width_c),
        completion_ids=completion_ids[out_row_t, out_col_t],
        segments=tuple(segments),
    )


def _segment_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention function for SEGMENT_ATTENTION: sdpa, and for a packed forward
    (query (1, Hq, L, d), key and value (1, Hkv, L, d), kwargs["packed_segments"]: segments
    tiling [0, L) in order) causal attention within each segment, each run of equal-length
    segments (pack puts them side by side) in one call on views. Returns (B, L, Hq, d), as
    sdpa_attention_forward."""
    segments = kwargs.pop("packed_segments", None)
    if segments is None:  # every other forward (generation included): sdpa as before
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1 or segments[0][0] != 0 or segments[-1][1] != query.shape[2]:
        raise ValueError(f"packed segments must tile one row of {query.shape[2]} tokens")
    runs: list[list[int]] = []  # [start, count, length] of equal-length segments side by side
    for start, end in segments:
        if runs and runs[-1][2] == end - start and start == runs[-1][0] + runs[-1][1] * runs[-1][2]:
            runs[-1][1] += 1
        elif runs and start != runs[-1][0] + runs[-1][1] * runs[-1][2]:
            raise ValueError("packed segments must tile the row in order")
        else:
            runs.append([start, 1, end - start])
    dropout_p = dropout if module.training else 0.0
    pieces = []
    for start, count, n in runs:
        q, k, v = (
            t[0, :, start : start + count * n].unflatten(1, (count, n)).transpose(0, 1)
            for t in (query, key, value)
        )  # (count, H, n, d) views
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout_p, enable_gqa=True
        )  # (count, Hq, n, d)
        pieces.append(out.transpose(1, 2).flatten(0, 1))  # (count * n, Hq, d)
    return torch.cat(pieces)[None], None


def use_segment_attention(model) -> bool:
    """Make an sdpa model's attention SEGMENT_ATTENTION (identical outside packed forwards);
    False, leaving the model as it is, for any other attention (flash-attention's varlen
    kernel needs nothing; eager and flex keep the block-diagonal mask)."""
    if getattr(model.config, "_attn_implementation", None) == SEGMENT_ATTENTION:
        return True
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(SEGMENT_ATTENTION, _segment_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return model.config._attn_implementation == SEGMENT_ATTENTION


def chunk_rows(n: int, vocab: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(n, _CUDA_CHUNK_BYTES // (4 * vocab)))
    return max(1, min(n, _CPU_CHUNK_ROWS))


class CompactLogprobs(torch.autograd.Function):
    """(log p(ids), entropy) (n,) fp32 of n rows of logits (n, V), or of hidden states (n, H)
    with the lm_head weight (V, H), whose logits are made one chunk of rows at a time. The
    forward uses `logprobs_fn` (the Triton kernel or its reference); the backward recomputes
    each chunk's logits and differentiates the reference's log-softmax and entropy."""

    @staticmethod
    def forward(ctx, inputs, weight, ids, temperature, logprobs_fn):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs, weight, ids)
        ctx.temperature = temperature
        vocab = inputs.shape[-1] if weight is None else weight.shape[0]
        ctx.chunk = chunk_rows(inputs.shape[0], vocab, inputs.device)
        logp, ent = [], []
        for r0 in range(0, inputs.shape[0], ctx.chunk):
            x = inputs[r0 : r0 + ctx.chunk]
            logits = x if weight is None else x @ weight.t()
            lp, en = logprobs_fn(
                logits[:, None],
                ids[r0 : r0 + ctx.chunk, None],
                temperature=temperature,
                return_entropy=True,
            )
            logp.append(lp[:, 0])
            ent.append(en[:, 0])
        if not logp:
            empty = inputs.new_zeros(0, dtype=torch.float32)
            return empty, empty.clone()
        return torch.cat(logp), torch.cat(ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        inputs, weight, ids = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]
        d_x = torch.zeros_like(inputs) if need_x else None
        d_w = torch.zeros(weight.shape, device=weight.device) if need_w else None
        if g_logp is None and g_ent is None:
            return d_x, None if d_w is None else d_w.to(weight.dtype), None, None, None
        for r0 in range(0, inputs.shape[0], ctx.chunk):
            rows = slice(r0, r0 + ctx.chunk)
            with torch.enable_grad():
                x = inputs[rows].detach().requires_grad_(need_x)
                w = None if weight is None else weight.detach().requires_grad_(need_w)
                logits = x if w is None else x @ w.t()
                log_probs, entropy = reference._log_softmax_and_entropy(
                    logits[:, None], ctx.temperature
                )
                total = logits.new_zeros((), dtype=torch.float32)
                if g_logp is not None:
                    logp = log_probs[:, 0].gather(-1, ids[rows, None].long())[:, 0]
                    total = total + (logp * g_logp[rows]).sum()
                if g_ent is not None:
                    total = total + (entropy[:, 0] * g_ent[rows]).sum()
                wanted = [t for t, need in ((x, need_x), (w, need_w)) if need]
                grads = list(torch.autograd.grad(total, wanted)) if wanted else []
            if need_x:
                d_x[rows] = grads.pop(0)
            if need_w:
                d_w += grads.pop(0).float()
        return d_x, None if d_w is None else d_w.to(weight.dtype), None, None, None


def packed_grpo_loss(
    packed: PackedBatch,
    inputs: torch.Tensor,
    weight: torch.Tensor | None,
    logprobs_fn,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    config,
    aux_loss: torch.Tensor | None = None,
    inplace: bool = False,
    sampler_logp: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items=None,
    num_sequences=None,
    accumulation_steps: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """grpo_loss's (loss, stats) for a packed micro-batch: inputs are the Ntok completion
    logits (Ntok, V), or their hidden states (Ntok, H) with the lm_head weight. The per-token
    tensors (ids, mask, old_logp, ...) are in the (mb, C) layout, as for the padded loss."""
    del ids, inplace  # the packed batch holds the completion ids
    cfg = config
    targets = packed.completion_ids.to(inputs.device)
    logp_c, ent_c = CompactLogprobs.apply(inputs, weight, targets, cfg.temperature, logprobs_fn)
    logp, ent = packed.scatter(logp_c.to(mask.device)), packed.scatter(ent_c.to(mask.device))
    loss, terms = reference.grpo_objective(
        logp,
        ent,
        advantages,
        mask,
        old_logp,
        ref_logp if cfg.beta != 0 else None,
        config=cfg,
        sampler_logp=sampler_logp,
        importance_sampling_ratio=importance_sampling_ratio,
        num_items=num_items,
        num_sequences=num_sequences,
        accumulation_steps=accumulation_steps,
    )
    stats = reference.grpo_stats(cfg, terms, logp.detach(), ent.detach(), mask)
    return reference.add_aux_loss(loss, stats, aux_loss, cfg, accumulation_steps)
