"""Rollouts: G sampled completions per prompt, behind one small engine interface.

An engine turns prompt strings into a `Rollout`: left-padded prompt ids, right-padded
completion ids, the completion mask (every token up to and including the first EOS),
which completions were truncated (no EOS within max_completion_length), the sampler's
per-token log-probs and the decoded completion texts.

    types.py  Rollout, the Engine protocol, SamplingParams and the token helpers
    hf.py     TransformersEngine: transformers' generate on the policy itself
    vllm.py   VLLMEngine: a colocated vLLM engine with its own copy of the weights

`make_engine` builds one by name (ROLLOUTS) from the SamplingParams both take and the
options only the chosen one takes.
"""

from __future__ import annotations

import inspect

from .hf import CACHES, TransformersEngine
from .types import (
    Engine,
    Rollout,
    SamplingParams,
    completion_mask,
    rollout_from_tokens,
    tokenize_prompts,
)
from .vllm import VLLMEngine

__all__ = [
    "CACHES",
    "ROLLOUTS",
    "Engine",
    "Rollout",
    "SamplingParams",
    "TransformersEngine",
    "VLLMEngine",
    "completion_mask",
    "engine_options",
    "make_engine",
    "rollout_from_tokens",
    "tokenize_prompts",
]

# --rollout name -> engine class; each class's keyword-only constructor arguments are the
# options that engine takes.
_ENGINES: dict[str, type] = {"transformers": TransformersEngine, "vllm": VLLMEngine}
ROLLOUTS = tuple(_ENGINES)


def engine_options(kind: str) -> tuple[str, ...]:
    """The engine-specific options (keywords of make_engine) the engine `kind` takes."""
    if kind not in _ENGINES:
        raise ValueError(f"rollout must be one of {ROLLOUTS}, got {kind!r}")
    parameters = inspect.signature(_ENGINES[kind]).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def make_engine(kind: str, model, tokenizer, sampling: SamplingParams, **options) -> Engine:
    """The rollout engine `kind` (ROLLOUTS) on the policy `model`, sampling with `sampling`.

    options: that engine's own keywords (engine_options(kind)); transformers takes replay,
    cache and compile (TransformersEngine), vllm takes model_path, gpu_memory_utilization,
    sleep, seed and llm (VLLMEngine). An option the engine does not take is a TypeError rather
    than silently ignored, so a caller cannot believe it set something it did not."""
    allowed = engine_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"the {kind} rollout engine does not take {', '.join(unknown)}; "
            f"its options are {', '.join(allowed)}"
        )
    return _ENGINES[kind](model, tokenizer, sampling, **options)
