"""What every rollout engine shares: the `Rollout` it returns, the `Engine` protocol the
trainer calls, the `SamplingParams` every engine samples with, and the token helpers that
turn prompt strings into left-padded ids and an engine's raw token lists into a `Rollout`.

Nothing here imports an engine: `hf.py` and `vllm.py` import this module, never each other.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """The options both engines take, whatever does the sampling.

    prompt_overflow: prompts over max_prompt_length keep their last tokens ("truncate", with
    a warning) or raise ("error"). ignore_eos: EOS is never sampled, so every completion has
    max_completion_length tokens (benchmarks). Greedy decoding is per call
    (`Engine.generate(..., greedy=True)`), not a parameter here, because one engine serves
    both the sampled training rollouts and the greedy evaluation.
    """

    max_prompt_length: int
    max_completion_length: int
    temperature: float = 1.0
    top_p: float = 1.0
    prompt_overflow: str = "truncate"
    ignore_eos: bool = False


@dataclass
class Rollout:
    """G completions per prompt, as rows: rows [i*G, (i+1)*G) belong to the i-th prompt."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P) 1 on prompt tokens
    completion_ids: torch.Tensor  # (N, C) right-padded
    completion_mask: torch.Tensor  # (N, C) 1 up to and including the first EOS
    truncated: torch.Tensor  # (N,) bool: no EOS within max_completion_length
    sampler_logp: torch.Tensor  # (N, C) fp32 log-probs under the sampling distribution
    texts: list[str]  # decoded completions, special tokens dropped
    routing: torch.Tensor | None = None  # (L, N, P + C - 1, k) MoE expert ids, when recorded

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)  # (N,)

    def select(self, rows: slice | Sequence[int] | torch.Tensor) -> Rollout:
        """The rows `rows` (a slice, row indices or a bool mask over rows), every field alike;
        a slice gives views of the tensors."""
        if isinstance(rows, slice):
            texts = self.texts[rows]
        else:
            index = torch.as_tensor(rows)
            if index.dtype == torch.bool:
                index = index.nonzero().squeeze(-1)
            rows = index.long()
            texts = [self.texts[i] for i in rows.tolist()]
        return Rollout(
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            completion_ids=self.completion_ids[rows],
            completion_mask=self.completion_mask[rows],
            truncated=self.truncated[rows],
            sampler_logp=self.sampler_logp[rows],
            texts=texts,
            routing=None if self.routing is None else self.routing[:, rows],
        )

    @classmethod
    def cat(cls, parts: Sequence[Rollout], pad_id: int) -> Rollout:
        """The rows of `parts` stacked in order. Parts may differ in width: prompts are
        re-padded on the left (ids with pad_id, mask with 0) and completions on the right
        (ids with pad_id, mask and log-probs with 0), which keeps every token at its place
        relative to the prompt/completion boundary. Routing is kept only if every part
        recorded it. A single part comes back as it is (no copy)."""
        if not parts:
            raise ValueError("Rollout.cat needs at least one rollout")
        if len(parts) == 1:
            return parts[0]
        p = max(r.prompt_ids.shape[1] for r in parts)
        c = max(r.completion_ids.shape[1] for r in parts)

        def left(t: torch.Tensor, width: int, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

        def right(t: torch.Tensor, width: int, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        routing = None
        if all(r.routing is not None for r in parts):
            # (L, n, P_i + C_i - 1, k): the prompt part is padded on the left, the rest right,
            # so that position j still routes token j of the re-padded sequence.
            def pad_routing(r: Rollout) -> torch.Tensor:
                p_i = r.prompt_ids.shape[1]
                front, back = r.routing[:, :, :p_i], r.routing[:, :, p_i:]
                front = torch.nn.functional.pad(front, (0, 0, p - p_i, 0))
                back = torch.nn.functional.pad(back, (0, 0, 0, c - 1 - back.shape[2]))
                return torch.cat([front, back], dim=2)

            routing = torch.cat([pad_routing(r) for r in parts], dim=1)
        return cls(
            prompt_ids=torch.cat([left(r.prompt_ids, p, pad_id) for r in parts]),
            prompt_mask=torch.cat([left(r.prompt_mask, p, 0) for r in parts]),
            completion_ids=torch.cat([right(r.completion_ids, c, pad_id) for r in parts]),
            completion_mask=torch.cat([right(r.completion_mask, c, 0) for r in parts]),
            truncated=torch.cat([r.truncated for r in parts]),
            sampler_logp=torch.cat([right(r.sampler_logp, c, 0.0) for r in parts]),
            texts=[t for r in parts for t in r.texts],
            routing=routing,
        )


class Engine(Protocol):
    """What the trainer needs from a rollout engine. `generate` returns completions grouped
    per prompt; `sync_weights` is called after each GRPO step's updates (engines that sample
    from their own copy of the weights, such as vLLM, load the policy's new ones)."""

    def generate(
        self, prompts: list[str], num_generations: int, *, greedy: bool = False
    ) -> Rollout: ...

    def sync_weights(self) -> None: ...


def tokenize_prompts(
    tokenizer, prompts: list[str], max_length: int, overflow: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, mask); prompts over max_length keep their last tokens (with a
    warning) or raise, as asked."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
    if too_long:
        first = too_long[0]
        message = (
            f"{len(too_long)} prompt(s) exceed max_prompt_length={max_length} tokens "
            f"(e.g. {len(encoded[first])} tokens: {prompts[first][:80]!r})"
        )
        if overflow == "error":
            raise ValueError(message)
        warnings.warn(message + "; keeping their last tokens", stacklevel=2)
        encoded = [ids[-max_length:] for ids in encoded]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, row in enumerate(encoded):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (N, C), truncated (N,)): tokens up to and including the first EOS. Correct when
    pad == eos, since only the first EOS counts."""
    is_eos = completion_ids == eos_id
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.int().argmax(-1), completion_ids.shape[1])
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = (positions[None, :] <= first[:, None]).long()
    return mask, ~has_eos


def rollout_from_tokens(
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completions: list[list[int]],
    logps: list[list[float]] | None = None,
    *,
    max_completion_length: int,
) -> Rollout:
    """A Rollout from per-completion token lists (an engine's raw output, EOS included when
    the completion stopped on it). Rows of prompt_ids (N, P) pair with completions. The mask
    comes from the lengths, so it is right even when pad == EOS. A sampler log-prob may be NaN
    where the engine did not report one (importance weights treat it as on-policy)."""
    n = len(completions)
    if prompt_ids.shape[0] != n:
        raise ValueError(f"{prompt_ids.shape[0]} prompt rows for {n} completions")
    too_long = [len(c) for c in completions if len(c) > max_completion_length]
    if too_long:
        raise ValueError(
            f"a completion of {too_long[0]} tokens exceeds "
            f"max_completion_length={max_completion_length}"
        )
    width = max([len(c) for c in completions] + [1])
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.full((n, width), pad, dtype=torch.long)
    logp = torch.zeros((n, width), dtype=torch.float32)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
    for i, tokens in enumerate(completions):
        if tokens:
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            if logps is not None:
                logp[i, : len(tokens)] = torch.tensor(logps[i], dtype=torch.float32)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (N, C)
    truncated = torch.tensor([not c or c[-1] != eos for c in completions])
    texts = tokenizer.batch_decode(
        [c[:-1] if c and c[-1] == eos else c for c in completions], skip_special_tokens=True
    )
    device = prompt_ids.device
    logp = torch.where(mask.bool(), logp, 0.0)  # NaN (unknown) stays only on real tokens
    return Rollout(
        prompt_ids,
        prompt_mask,
        ids.to(device),
        mask.to(device),
        truncated.to(device),
        logp.to(device),
        texts,
    )
