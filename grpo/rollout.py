"""Rollout: G sampled completions per prompt, behind one small engine interface.

An engine turns prompt strings into a `Rollout`: left-padded prompt ids, right-padded
completion ids, the completion mask (every token up to and including the first EOS),
which completions were truncated (no EOS within max_completion_length), the sampler's
per-token log-probs and the decoded completion texts. The first engine uses transformers'
`generate` with its KV cache, all G samples of all prompts in one batch.

Speed on a GPU comes from the decoding loop: one token per forward at batch N is bound by
reading the weights and by Python/launch overhead, not by FLOPs. A static (preallocated) KV
cache gives every decoding step the same shapes, which lets transformers compile the decoding
forward and replay it as CUDA graphs; the default does both on CUDA (compiling only without
MoE routing replay, whose hooks write Python lists during the forward) and
keeps the plain dynamic cache on the CPU, whose numerics the demo depends on.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import (
    CompileConfig,
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
    last, keeps one step's log-softmax and reads the chosen token at the next call.

    The full (N, V) log-softmax looks wasteful for N values, but it is one fused kernel;
    torch.logsumexp plus a gather (composite: max, subtract, exp, sum, with an (N, V)
    temporary of its own) measured slower on a CPU: 78 vs 113 tokens/s at V = 151936."""

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


@contextlib.contextmanager
def _gathered(model: torch.nn.Module):
    """An FSDP2-sharded model keeps each layer gathered from its first decoding step to the
    end of generation (then reshards), instead of all-gathering every layer for every token:
    the full weights for the duration, as ZeRO-3 trainers gather them for generation."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


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
    per prompt; `sync_weights` is called after each GRPO step's updates (engines that sample
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


CACHES = ("dynamic", "static")
ROLLOUTS = ("transformers", "vllm")


def make_engine(kind: str, model, tokenizer, *, model_path: str = "", seed: int = 0,
                gpu_memory_utilization: float = 0.3, sleep: bool = False, replay=None,
                cache: str | None = "dynamic", compile: bool | None = False, **common) -> Engine:
    """The rollout engine `kind` (ROLLOUTS) on the policy `model`. common: the options both
    take (lengths, temperature, top_p, overflow, ignore_eos). vLLM loads model_path itself
    and uses gpu_memory_utilization, sleep and seed; transformers' generate uses replay,
    cache and compile."""
    if kind == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer, model_path, seed=seed,
                          gpu_memory_utilization=gpu_memory_utilization, sleep=sleep, **common)
    if kind != "transformers":
        raise ValueError(f"rollout must be one of {ROLLOUTS}, got {kind!r}")
    return TransformersEngine(model, tokenizer, replay=replay, cache=cache, compile=compile,
                              **common)


class TransformersEngine:
    """Sampling with transformers' generate (KV cache), G samples per prompt in one batch.

    cache: "dynamic" (grows token by token) or "static" (preallocated for the prompt plus
    max_completion_length, rounded up so that successive steps share one shape); None picks
    static on CUDA and dynamic elsewhere. compile: torch.compile the decoding forward
    (transformers' CompileConfig, CUDA graphs on a GPU); needs the static cache; None turns it
    on for CUDA with SDPA attention when no routing replay is recorded (its router hooks write
    Python lists during the forward, which a captured graph would skip). ignore_eos: EOS is never
    sampled, so every completion has max_completion_length tokens (benchmarks).
    """

    # Static cache lengths are rounded up to a multiple of this: prompts of slightly different
    # lengths then reuse one compiled graph instead of recompiling.
    CACHE_BUCKET = 128

    def __init__(self, model, tokenizer, *, max_prompt_length: int, max_completion_length: int,
                 temperature: float = 1.0, top_p: float = 1.0, overflow: str = "truncate",
                 replay=None, cache: str | None = "dynamic", compile: bool | None = False,
                 ignore_eos: bool = False):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and an EOS token for rollouts")
        self.model, self.tokenizer = model, tokenizer
        self.max_prompt_length, self.max_completion_length = max_prompt_length, \
            max_completion_length
        self.temperature, self.top_p, self.overflow = temperature, top_p, overflow
        self.replay = replay  # models.RoutingReplay: record the experts while sampling
        on_cuda = next(model.parameters()).device.type == "cuda"
        self.cache = cache if cache is not None else ("static" if on_cuda else "dynamic")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        # Automatic only with SDPA/eager attention: the combination transformers documents
        # for compiled static-cache decoding (flash-attn kernels are opaque to the compiler).
        plain_attention = getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa",
                                                                                    "eager")
        self.compile = compile if compile is not None else \
            (on_cuda and self.cache == "static" and replay is None and plain_attention)
        if self.compile and self.cache != "static":
            raise ValueError("compiled decoding needs the static KV cache (cache='static')")
        self.ignore_eos = ignore_eos

    def _generate_kwargs(self, prompt_length: int) -> dict:
        """generate() arguments for the cache, compilation and EOS options."""
        kwargs: dict = {}
        if self.ignore_eos:
            # EOS gets -inf until max_new_tokens: every row runs to the full length.
            kwargs["min_new_tokens"] = self.max_completion_length
        if self.cache == "static":
            need = prompt_length + self.max_completion_length
            kwargs["cache_implementation"] = "static"
            kwargs["max_cache_len"] = -(-need // self.CACHE_BUCKET) * self.CACHE_BUCKET
        if self.compile:
            config = CompileConfig(fullgraph=False, dynamic=False)
            # transformers compiles automatically on CUDA only; asked for explicitly, compile
            # on any device (on a CPU this is for tests, not speed).
            config._compile_all_devices = True
            kwargs["compile_config"] = config
        else:
            # With a static cache, transformers would compile on CUDA on its own.
            kwargs["disable_compile"] = True
        return kwargs

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
            with recording, _gathered(self.model):
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=not greedy,
                    max_new_tokens=self.max_completion_length,
                    logits_processor=LogitsProcessorList(processors + [recorder]),
                    temperature=1.0, top_p=1.0, top_k=None,  # the warpers above, in order
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id, use_cache=True,
                    # Sharded (FSDP) models: every rank decodes until all have finished.
                    synced_gpus=_world_size() > 1,
                    **self._generate_kwargs(ids.shape[1]),
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
