"""The training-side forwards of a policy (or the reference) over rollouts.

A forward scores the completion tokens of some rows of a Rollout: the model runs on prompt +
completion with the positions generate() used (left padding does not count), and either
returns the logits at the positions that predict the completion tokens (mb, C, V), or, with
the fused lm_head loss, the last hidden states there (mb, C, H) and the lm_head weight, so
the (mb, C, V) logits never exist. MoE policies replay the experts the sampler chose
(`replaying`), kept until the caller's backward is done (gradient checkpointing recomputes).
Under torchrun every rank runs the same number of micro-batches (`micro_batches`).
With `packing`, a micro-batch's sequences run as one padding-free row and only the positions
that predict completion tokens reach the lm_head (grpo/packing.py); `micro_batch_tokens` > 0
makes the micro-batches token budgets instead of row counts.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo import kernels
from grpo.models import load_model
from grpo.models.routing_replay import RoutingReplay

from . import distributed as dist_mod
from . import packing as packing_mod
from .rollout import Rollout


def micro_batch_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class PolicyForward:
    device: torch.device  # where log-probs and losses live
    micro_batch_size: int
    temperature: float
    fused: bool  # the lm_head inside the loss / log-prob kernels
    logprobs_fn: Callable  # kernels.token_logprobs or its reference
    replay: RoutingReplay | None = None  # the policy's routing replay
    router_aux_loss: bool = False  # ask the model for its load-balancing loss
    packing: bool = False  # padding-free forwards (grpo/packing.py)
    micro_batch_tokens: int = 0  # > 0 (with packing): micro-batches of at most this many tokens

    def micro_batches(self, n: int, rollout: Rollout | None = None) -> list[tuple[slice, bool]]:
        """(rows, real) of this rank's micro-batches, padded with zero-weight repeats of the
        first up to the largest count of any rank: FSDP needs every rank in every forward.
        With a token budget (and the rollout), rows are index tensors of first-fit-decreasing
        bins (a sequence over the budget runs alone)."""
        if self.packing and self.micro_batch_tokens > 0 and rollout is not None:
            parts = packing_mod.token_budget_bins(
                rollout, self.micro_batch_tokens, keep_last=self.router_aux_loss
            )
        else:
            parts = micro_batch_slices(n, self.micro_batch_size)
        count = int(dist_mod.all_reduce(len(parts), op="max"))
        return [(rows, True) for rows in parts] + [(parts[0], False)] * (count - len(parts))

    @contextlib.contextmanager
    def replaying(
        self, rollout: Rollout, rows: slice, on: bool = True, packed: bool | None = None
    ) -> Iterator[None]:
        """The policy's forwards inside use the experts recorded for these rows, laid out for
        packed forwards (default: when packing is on) or padded ones."""
        active = on and self.replay is not None and rollout.routing is not None
        if active:
            routing = rollout.routing[:, rows]
            if self.packing if packed is None else packed:  # ids follow their tokens
                routing = self.pack(rollout, rows).routing(routing)
            self.replay.set(routing)
        try:
            yield
        finally:
            if active:
                self.replay.clear()

    def logits(self, model, rollout: Rollout, rows: slice):
        """(logits (mb, C, V), the router's aux loss or None)."""
        inputs, n = _inputs(model, rollout, rows)
        aux = {"output_router_logits": True} if self.router_aux_loss else {}
        out = model(**inputs, logits_to_keep=n + 1, **aux)
        return out.logits[:, :-1].to(self.device), getattr(out, "aux_loss", None)

    def hidden(self, model, rollout: Rollout, rows: slice):
        """(last hidden states (mb, C, H), lm_head weight (V, H))."""
        inputs, n = _inputs(model, rollout, rows)
        states = model.get_decoder()(**inputs).last_hidden_state[:, -(n + 1) : -1]
        return states.to(self.device), model.get_output_embeddings().weight

    def pack(self, rollout: Rollout, rows) -> packing_mod.PackedBatch:
        return packing_mod.pack(rollout, rows, keep_last=self.router_aux_loss)

    def packed(self, model, rollout: Rollout, rows):
        """The packed forward of rows `rows`: (PackedBatch, inputs, lm_head weight or None,
        the router's aux loss or None). inputs: the completion tokens' logits (Ntok, V) from
        the model's own forward (lm_head on those positions only), or with the fused loss the
        last hidden states there (Ntok, H) and the weight."""
        packed = self.pack(rollout, rows)
        packing_mod.use_segment_attention(model)  # sdpa: attention within each sequence
        dev = next(model.parameters()).device
        inputs = dict(
            input_ids=packed.input_ids.to(dev),
            position_ids=packed.position_ids.to(dev),
            use_cache=False,
        )
        if getattr(model.config, "_attn_implementation", None) == packing_mod.SEGMENT_ATTENTION:
            # Attention per sequence (packing.use_segment_attention); the all-ones mask keeps
            # transformers from building the (L, L) block-diagonal one.
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            inputs["packed_segments"] = packed.segments
        pred = packed.pred.to(dev)
        if self.fused:
            states = model.get_decoder()(**inputs).last_hidden_state[0, pred]
            weight = model.get_output_embeddings().weight
            return packed, states.to(self.device), weight.to(self.device), None
        aux = {"output_router_logits": True} if self.router_aux_loss else {}
        out = model(**inputs, logits_to_keep=pred, **aux)
        return packed, out.logits[0].to(self.device), None, getattr(out, "aux_loss", None)

    def packed_loss_fn(self, model, rollout: Rollout, rows):
        """(a loss function with grpo_loss's signature for rows `rows`, the aux loss)."""
        packed, inputs, weight, aux = self.packed(model, rollout, rows)
        loss_fn = functools.partial(
            packing_mod.packed_grpo_loss, packed, inputs, weight, self.logprobs_fn
        )
        return loss_fn, aux

    @torch.no_grad()
    def logprobs(self, model, rollout: Rollout, *, replay: bool = True) -> torch.Tensor:
        """log p(completion token) (N, C) fp32 under `model` (eval mode), micro-batch by
        micro-batch; the policy replays the sampler's experts, the reference never does."""
        was_training = model.training
        model.eval()
        out = torch.zeros(rollout.completion_ids.shape, device=self.device)
        for rows, real in self.micro_batches(len(rollout), rollout):
            ids = rollout.completion_ids[rows]
            with self.replaying(rollout, rows, on=replay):
                if self.packing:  # the lm_head on the completion tokens only
                    packed, inputs, weight, _ = self.packed(model, rollout, rows)
                    targets = packed.completion_ids.to(inputs.device)
                    logp = packing_mod.CompactLogprobs.apply(
                        inputs, weight, targets, self.temperature, self.logprobs_fn
                    )[0]
                    logp = packed.scatter(logp.to(self.device))
                elif self.fused:
                    states, weight = self.hidden(model, rollout, rows)
                    logp = kernels.token_logprobs_from_hidden(
                        states, weight.to(states.device), ids, temperature=self.temperature
                    )
                else:
                    logp = self.logprobs_fn(
                        self.logits(model, rollout, rows)[0], ids, temperature=self.temperature
                    )
            if real:
                out[rows] = logp
        model.train(was_training)
        return out  # (N, C) fp32

    @torch.no_grad()
    def routing_metrics(self, model, rollout: Rollout) -> dict:
        """On the first micro-batch: the share of token-layer routing decisions where a free
        training forward differs from the rollout, and mean |sampler logp - training logp|
        without and with replay (equal only at top_p = 1: the sampler's logp is warped)."""
        rows = micro_batch_slices(len(rollout), self.micro_batch_size)[0]
        ids, mask = rollout.completion_ids[rows], rollout.completion_mask[rows].bool()
        sampler = rollout.sampler_logp[rows][mask]
        was_training = model.training
        model.eval()
        with self.replay.record(num_rows=rows.stop - rows.start):
            free = self.logits(model, rollout, rows)[0]
        free_routing = self.replay.recorded()[:, :, :-1]
        with self.replaying(rollout, rows, packed=False):  # a padded forward
            replayed = self.logits(model, rollout, rows)[0]
        model.train(was_training)
        real = torch.cat([rollout.prompt_mask[rows], rollout.completion_mask[rows]], 1)
        real = real[:, :-1].bool().cpu()
        differs = (free_routing[:, real] != rollout.routing[:, rows][:, real]).any(-1)
        logp = {
            name: self.logprobs_fn(logits, ids, temperature=self.temperature)[mask]
            for name, logits in (("free", free), ("replay", replayed))
        }
        return {
            "routing_mismatch": float(differs.float().mean()),
            "logp_gap_no_replay": float((logp["free"] - sampler).abs().mean()),
            "logp_gap_replay": float((logp["replay"] - sampler).abs().mean()),
        }


def _inputs(model, rollout: Rollout, rows: slice) -> tuple[dict, int]:
    input_ids = torch.cat([rollout.prompt_ids[rows], rollout.completion_ids[rows]], 1)
    attention = torch.cat([rollout.prompt_mask[rows], rollout.completion_mask[rows]], 1)
    # Positions as generate() numbers them: left padding does not count.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    dev = next(model.parameters()).device
    inputs = dict(
        input_ids=input_ids.to(dev),
        attention_mask=attention.to(dev),
        position_ids=positions.to(dev),
        use_cache=False,
    )
    return inputs, rollout.completion_ids.shape[1]


def load_frozen_model(
    source: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    world: int,
    compute_dtype: torch.dtype | None,
) -> torch.nn.Module:
    """The frozen reference model loaded from `source` (a saved model directory) onto
    `device`, sharded like the policy under torchrun (world > 1)."""
    ref, _ = load_model(source, dtype=dtype, device=device)
    ref.eval().requires_grad_(False)
    if world > 1:
        dist_mod.shard_model(ref, compute_dtype=compute_dtype)
    return ref
