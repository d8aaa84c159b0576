"""The transformers engine: sampling with `model.generate` and its KV cache from the policy's
own parameters, all G samples of all prompts in one batch (`--rollout transformers`).

Speed on a GPU comes from the decoding loop: one token per forward at batch N is bound by
reading the weights and by Python/launch overhead, not by FLOPs. A static (preallocated) KV
cache gives every decoding step the same shapes, which lets transformers compile the decoding
forward and replay it as CUDA graphs; the default does both on CUDA (compiling only without
MoE routing replay, whose hooks write Python lists during the forward) and
keeps the plain dynamic cache on the CPU, whose numerics the demo depends on.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import (
    CompileConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .. import distributed
from .types import Rollout, SamplingParams, completion_mask, tokenize_prompts

CACHES = ("dynamic", "static")


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


class TransformersEngine:
    """Sampling with transformers' generate (KV cache), G samples per prompt in one batch.

    replay: a models.RoutingReplay that records the experts an MoE policy routes to while
    sampling (not for greedy calls), returned as Rollout.routing. cache: "dynamic" (grows
    token by token) or "static" (preallocated for the prompt plus max_completion_length,
    rounded up so that successive steps share one shape); None picks static on CUDA and
    dynamic elsewhere. compile: torch.compile the decoding forward (transformers'
    CompileConfig, CUDA graphs on a GPU); needs the static cache; None turns it on for CUDA
    with SDPA attention when no routing replay is recorded (its router hooks write Python
    lists during the forward, which a captured graph would skip).
    """

    # Static cache lengths are rounded up to a multiple of this: prompts of slightly different
    # lengths then reuse one compiled graph instead of recompiling.
    CACHE_BUCKET = 128

    def __init__(
        self,
        model,
        tokenizer,
        sampling: SamplingParams,
        *,
        replay=None,
        cache: str | None = "dynamic",
        compile: bool | None = False,
    ):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and an EOS token for rollouts")
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.replay = replay
        on_cuda = next(model.parameters()).device.type == "cuda"
        self.cache = cache if cache is not None else ("static" if on_cuda else "dynamic")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        # Automatic only with SDPA/eager attention: the combination transformers documents
        # for compiled static-cache decoding (flash-attn kernels are opaque to the compiler).
        attention = getattr(model.config, "_attn_implementation", "sdpa")
        plain_attention = attention in ("sdpa", "eager")
        self.compile = (
            compile
            if compile is not None
            else (on_cuda and self.cache == "static" and replay is None and plain_attention)
        )
        if self.compile and self.cache != "static":
            raise ValueError("compiled decoding needs the static KV cache (cache='static')")

    def _generate_kwargs(self, prompt_length: int) -> dict:
        """generate() arguments for the cache, compilation and EOS options."""
        kwargs: dict = {}
        max_completion_length = self.sampling.max_completion_length
        if self.sampling.ignore_eos:
            # EOS gets -inf until max_new_tokens: every row runs to the full length.
            kwargs["min_new_tokens"] = max_completion_length
        if self.cache == "static":
            need = prompt_length + max_completion_length
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
    def generate(
        self, prompts: list[str], num_generations: int, *, greedy: bool = False
    ) -> Rollout:
        """Completions for every prompt, num_generations each, grouped per prompt:
        rows [i*G, (i+1)*G) belong to prompts[i]."""
        sampling = self.sampling
        device = next(self.model.parameters()).device
        ids, mask = tokenize_prompts(
            self.tokenizer, prompts, sampling.max_prompt_length, sampling.prompt_overflow, device
        )
        ids = ids.repeat_interleave(num_generations, 0)  # (N, P)
        mask = mask.repeat_interleave(num_generations, 0)
        recorder = _SampledLogp()
        completion_ids = self._decode(ids, mask, recorder, greedy)[:, ids.shape[1] :]  # (N, C)
        return self._rollout(ids, mask, completion_ids, recorder, greedy)

    def _decode(
        self, ids: torch.Tensor, mask: torch.Tensor, recorder: _SampledLogp, greedy: bool
    ) -> torch.Tensor:
        """model.generate on the (N, P) prompt rows, in eval mode (the mode it had is restored)
        with the recorder reading each sampled token's log-prob and routing recorded when a
        replay is set; returns the (N, P + C) prompt and completion ids."""
        sampling = self.sampling
        processors = [] if greedy else [TemperatureLogitsWarper(sampling.temperature)]
        if not greedy and sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling; the KV cache is on in eval mode
        recording = (
            self.replay.record(ids.shape[0])
            if self.replay is not None and not greedy
            else contextlib.nullcontext()
        )
        try:
            with recording, _gathered(self.model):
                return self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=not greedy,
                    max_new_tokens=sampling.max_completion_length,
                    logits_processor=LogitsProcessorList(processors + [recorder]),
                    temperature=1.0,  # the warpers above do temperature and top_p, in order
                    top_p=1.0,
                    top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    use_cache=True,
                    # Sharded (FSDP) models: every rank decodes until all have finished.
                    synced_gpus=distributed.world_size() > 1,
                    **self._generate_kwargs(ids.shape[1]),
                )
        finally:
            self.model.train(was_training)

    def _rollout(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        completion_ids: torch.Tensor,
        recorder: _SampledLogp,
        greedy: bool,
    ) -> Rollout:
        """The Rollout of the (N, C) completion ids generated after the prompt rows: their mask
        (up to the first EOS), truncation flags, sampled log-probs, texts and routing."""
        recorder.take(completion_ids[:, -1])
        c_mask, truncated = completion_mask(completion_ids, self.tokenizer.eos_token_id)
        sampler_logp = (
            torch.stack(recorder.logps, dim=1)
            if recorder.logps
            else torch.zeros_like(completion_ids, dtype=torch.float32)
        )
        pad = self.tokenizer.pad_token_id
        texts = self.tokenizer.batch_decode(
            completion_ids * c_mask + pad * (1 - c_mask), skip_special_tokens=True
        )
        routing = self.replay.recorded() if self.replay is not None and not greedy else None
        return Rollout(
            ids, mask, completion_ids, c_mask, truncated, sampler_logp * c_mask, texts, routing
        )

    def sync_weights(self) -> None:
        """Nothing to do: generate() samples from the policy's own parameters."""
