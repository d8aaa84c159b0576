"""Routing replay for MoE RL: train through the experts the sampler actually used.

Top-k routing is discontinuous, so the KV-cached rollout and the full-sequence training
forward can pick different experts for the same token, and GRPO's ratio then compares two
different networks. RoutingReplay records the top-k expert ids of every token in every MoE
layer while sampling, and replays them in the old-policy and training forwards. The routing
weights are recomputed from the router's current logits gathered at the replayed ids and
normalised as the family does, so the router still gets gradients.

It works through a forward hook on each router (transformers 5's `*TopKRouter` modules return
(logits, weights, ids) for every supported family), so it also replays in the recomputed
forward of gradient checkpointing: the ids stay set until `clear()`.

    replay = RoutingReplay(model)
    with replay.record(num_rows=N):
        model.generate(...)              # ids of the prompt and every generated token
    routing = replay.recorded()          # (L, N, S, k) integer, on the CPU
    replay.set(routing[:, rows])         # before forward + backward of a micro-batch
    ...
    replay.clear()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .layout import MOE_FAMILIES


def _experts(block: nn.Module) -> nn.Module | None:
    """A block's experts module, seen through adapter wrappers (peft's LoRA on the stacked
    expert parameters wraps it in layers whose `get_base_layer()` returns it)."""
    experts = getattr(block, "experts", None)
    unwrap = getattr(experts, "get_base_layer", None)
    return unwrap() if unwrap is not None else experts


def _routers(model: nn.Module) -> list[nn.Module]:
    """The router of every MoE block, in layer order."""
    return [
        m.gate
        for m in model.modules()
        if hasattr(m, "gate") and hasattr(_experts(m), "gate_up_proj")
    ]


def routing_weights(
    family: str, router: nn.Module, logits: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The family's top-k weights for the given expert ids, from router logits (T, E)."""
    if family == "deepseek_v3":  # sigmoid scores, the bias only steers the choice
        w = logits.float().sigmoid().gather(1, ids)
        if router.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * router.routed_scaling_factor
    w = torch.softmax(logits.float(), dim=-1).gather(1, ids)
    if family == "mixtral" or getattr(router, "norm_topk_prob", False):
        w = w / w.sum(-1, keepdim=True)
    return w


class RoutingReplay:
    def __init__(self, model: nn.Module):
        family = model.config.model_type
        if family not in MOE_FAMILIES:
            raise ValueError(
                f"routing replay needs an MoE model ({', '.join(MOE_FAMILIES)}), got {family!r}"
            )
        self.family = family
        self.routers = _routers(model)
        self._layer = {id(r): i for i, r in enumerate(self.routers)}
        self._num_rows: int | None = None
        self._records: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._replay: torch.Tensor | None = None  # (L, rows, S, k)
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @contextlib.contextmanager
    def record(self, num_rows: int) -> Iterator[None]:
        """Record the ids chosen by every router call for a batch of num_rows sequences."""
        self._num_rows = num_rows
        self._records = [[] for _ in self.routers]
        try:
            yield
        finally:
            self._num_rows = None

    def recorded(self) -> torch.Tensor:
        """(L, N, S, k) ids of the last recording, S = all tokens the model processed."""
        layers = torch.stack([torch.cat(calls, dim=1) for calls in self._records]).cpu()
        if layers.numel() >= 2**20 and torch.cuda.is_available():
            layers = layers.pin_memory()  # large: pinned for fast copies back
        return layers

    def set(self, routing: torch.Tensor) -> None:
        """Replay these ids, (L, rows, S, k), in the following forwards (and recomputes); a
        token whose ids are -1 routes itself."""
        if routing.shape[0] != len(self.routers):
            raise ValueError(
                f"routing has {routing.shape[0]} layers, the model {len(self.routers)} MoE layers"
            )
        self._replay = routing

    def clear(self) -> None:
        self._replay = None

    def _hook(self, router: nn.Module, inputs, output):
        logits, weights, ids = output
        layer = self._layer[id(router)]
        if self._num_rows is not None:
            compact = torch.int16 if router.weight.shape[0] < 2**15 else torch.int32
            # Kept on the device until recorded(): a copy to the CPU here would wait for the
            # GPU in every MoE layer of every decoding step, so the CPU could never run ahead
            # launching kernels (L x tokens synchronisations per rollout).
            record = ids.detach().to(compact).view(self._num_rows, -1, ids.shape[-1])
            self._records[layer].append(record)
            return None
        if self._replay is None:
            return None
        replay = self._replay[layer].to(ids.device, torch.long)  # (rows, S_rec, k)
        rows, seq = replay.shape[0], ids.shape[0] // replay.shape[0]
        ids = ids.view(rows, seq, -1).clone()
        n = min(seq, replay.shape[1])  # the last token of a rollout was never routed
        # A negative id (a packed token with no record) keeps the router's own choice.
        ids[:, :n] = torch.where(replay[:, :n] >= 0, replay[:, :n], ids[:, :n])
        ids = ids.view(-1, ids.shape[-1])
        new = routing_weights(self.family, router, logits, ids).to(weights.dtype)
        return logits, new, ids
