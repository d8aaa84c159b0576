"""Rollout: G sampled completions per prompt, behind one small engine interface.

An engine turns prompt strings into a `Rollout`: left-padded prompt ids, right-padded
completion ids, the completion mask (every token up to and including the first EOS),
which completions were truncated (no EOS within max_completion_length), the sampler's
per-token log-probs and the decoded completion texts. The first engine uses transformers'
`generate` with its KV cache, all G samples of all prompts in one batch.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class Rollout:
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


class _SampledLogp(LogitsProcessor):
    """Records log p(token) of each sampled token under the final (warped) scores: it runs
    last, keeps one step's log-softmax and reads the chosen token at the next call."""

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def take(self, tokens: torch.Tensor) -> None:
        if self.prev is not None:
            self.logps.append(self.prev.gather(-1, tokens[:, None]).squeeze(-1))
            self.prev = None


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int, overflow: str,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, mask); prompts over max_length keep their last tokens (with a
    warning) or raise, as asked."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
    if too_long:
        first = too_long[0]
        message = (f"{len(too_long)} prompt(s) exceed max_prompt_length={max_length} tokens "
                   f"(e.g. {len(encoded[first])} tokens: {prompts[first][:80]!r})")
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
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
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


class Engine(Protocol):
    """What the trainer needs from a rollout engine. `generate` returns completions grouped
    per prompt; `sync_weights` is called after every optimizer step (engines that sample
    from their own copy of the weights, such as vLLM, load the policy's new ones)."""

    def generate(self, prompts: list[str], num_generations: int, *,
                 greedy: bool = False) -> Rollout: ...

    def sync_weights(self) -> None: ...


def rollout_from_tokens(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completions: list[list[int]], logps: list[list[float]] | None = None,
                        *, max_completion_length: int) -> Rollout:
    """A Rollout from per-completion token lists (an engine's raw output, EOS included when
    the completion stopped on it). Rows of prompt_ids (N, P) pair with completions. The mask
    comes from the lengths, so it is right even when pad == EOS. A sampler log-prob may be NaN
    where the engine did not report one (importance weights treat it as on-policy)."""
    n = len(completions)
    if prompt_ids.shape[0] != n:
        raise ValueError(f"{prompt_ids.shape[0]} prompt rows for {n} completions")
    too_long = [len(c) for c in completions if len(c) > max_completion_length]
    if too_long:
        raise ValueError(f"a completion of {too_long[0]} tokens exceeds "
                         f"max_completion_length={max_completion_length}")
    width = max([len(c) for c in completions] + [1])
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.full((n, width), pad, dtype=torch.long)
    logp = torch.zeros((n, width), dtype=torch.float32)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
    for i, tokens in enumerate(completions):
        if tokens:
            ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            if logps is not None:
                logp[i, :len(tokens)] = torch.tensor(logps[i], dtype=torch.float32)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (N, C)
    truncated = torch.tensor([not c or c[-1] != eos for c in completions])
    texts = tokenizer.batch_decode([c[:-1] if c and c[-1] == eos else c for c in completions],
                                   skip_special_tokens=True)
    device = prompt_ids.device
    logp = torch.where(mask.bool(), logp, 0.0)  # NaN (unknown) stays only on real tokens
    return Rollout(prompt_ids, prompt_mask, ids.to(device), mask.to(device), truncated.to(device),
                   logp.to(device), texts)


class TransformersEngine:
    """Sampling with transformers' generate (KV cache), G samples per prompt in one batch."""

    def __init__(self, model, tokenizer, *, max_prompt_length: int, max_completion_length: int,
                 temperature: float = 1.0, top_p: float = 1.0, overflow: str = "truncate",
                 replay=None):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and an EOS token for rollouts")
        self.model, self.tokenizer = model, tokenizer
        self.max_prompt_length, self.max_completion_length = max_prompt_length, \
            max_completion_length
        self.temperature, self.top_p, self.overflow = temperature, top_p, overflow
        self.replay = replay  # models.RoutingReplay: record the experts while sampling

    @torch.no_grad()
    def generate(self, prompts: list[str], num_generations: int, *,
                 greedy: bool = False) -> Rollout:
        """Completions for every prompt, num_generations each, grouped per prompt:
        rows [i*G, (i+1)*G) belong to prompts[i]."""
        device = next(self.model.parameters()).device
        ids, mask = tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length,
                                     self.overflow, device)
        ids = ids.repeat_interleave(num_generations, 0)  # (N, P)
        mask = mask.repeat_interleave(num_generations, 0)
        recorder = _SampledLogp()
        processors = [] if greedy else [TemperatureLogitsWarper(self.temperature)]
        if not greedy and self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling; the KV cache is on in eval mode
        recording = self.replay.record(ids.shape[0]) if self.replay is not None and not greedy \
            else contextlib.nullcontext()
        try:
            with recording:
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=not greedy,
                    max_new_tokens=self.max_completion_length,
                    logits_processor=LogitsProcessorList(processors + [recorder]),
                    temperature=1.0, top_p=1.0, top_k=None,  # the warpers above, in order
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id, use_cache=True,
                    # Sharded (FSDP) models: every rank decodes until all have finished.
                    synced_gpus=_world_size() > 1,
                )
        finally:
            self.model.train(was_training)
        completion_ids = out[:, ids.shape[1]:]  # (N, C)
        recorder.take(completion_ids[:, -1])
        c_mask, truncated = completion_mask(completion_ids, self.tokenizer.eos_token_id)
        sampler_logp = torch.stack(recorder.logps, dim=1) if recorder.logps else \
            torch.zeros_like(completion_ids, dtype=torch.float32)
        texts = self.tokenizer.batch_decode(completion_ids * c_mask + self.tokenizer.pad_token_id
                                            * (1 - c_mask), skip_special_tokens=True)
        routing = self.replay.recorded() if self.replay is not None and not greedy else None
        return Rollout(ids, mask, completion_ids, c_mask, truncated,
                       sampler_logp * c_mask, texts, routing)

    def sync_weights(self) -> None:
        """Nothing to do: generate() samples from the policy's own parameters."""
