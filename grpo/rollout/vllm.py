"""The vLLM engine, colocated with the trainer on the same GPU(s): `--rollout vllm`.

vLLM keeps its own copy of the weights in its own layout. After each GRPO step's updates the
trainer calls `sync_weights()`, which only marks that copy stale; the next `generate()`
streams the policy's parameters (HF names, gathered one at a time from FSDP shards) into
vLLM's model with its `load_weights`, and drops the prefix cache that the old weights
filled. The engine runs in the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so
the weights move GPU to GPU without serialisation; under torchrun every rank holds a
tensor-parallel-1 engine on its own GPU (`distributed_executor_backend="external_launcher"`).

A LoRA policy (grpo.lora) is pushed merged, W + alpha / r x B A per adapted weight, under the
model's own names: vLLM then samples through the very code path it uses for a fully trained
policy. vLLM's own LoRA serving was not chosen: it computes the adapters beside the base
(punica kernels, another numerical path than the trainer's), adapts only the modules it knows
(not MoE experts adapted through peft's target_parameters), needs a new adapter id and files
on disk every step, and costs time on every decoded token; the merged push costs one
weight load per step, as full fine-tuning does.

vLLM returns the log-prob of each sampled token under the distribution it sampled from
(`logprobs_mode="processed_logprobs"`: after temperature and top_p), which is what the
sampler correction (grpo.kernels.reference.sampler_importance_weights) compares with the trainer's.
Token ids go in and come out as ids (`skip_tokenizer_init`): our tokenizer decodes, so
prompts and completions are tokenised exactly as the trainer sees them.

The `vllm` package is imported only when an engine is built: it is optional (and needs a GPU),
and everything else in grpo works without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from .. import distributed
from .. import lora as lora_mod
from .types import Rollout, SamplingParams, rollout_from_tokens, tokenize_prompts


def _require_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ValueError(
            "--rollout vllm needs the vllm package (pip install -e '.[vllm]') and a CUDA GPU"
        ) from e
    return vllm


class VLLMEngine:
    """The Engine interface (grpo.rollout.Engine) on a colocated vllm.LLM.

    model_path: the checkpoint vLLM loads (its weights are replaced by the policy's before
    the first generation unless `mark_weights_current()` says they already are the policy's).
    gpu_memory_utilization: vLLM's share of the GPU (weights plus KV cache). sleep: release
    vLLM's KV cache after each generation, for the update. seed: vLLM's sampling seed (plus
    the rank under torchrun). llm: an already built vllm.LLM to sample with instead of
    building one (model_path, gpu_memory_utilization and seed then go unused).
    """

    def __init__(
        self,
        model,
        tokenizer,
        sampling: SamplingParams,
        *,
        model_path: str = "",
        gpu_memory_utilization: float = 0.3,
        sleep: bool = False,
        seed: int = 0,
        llm=None,
    ):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and an EOS token for rollouts")
        vllm = _require_vllm()
        self.vllm = vllm
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.sleep = sleep
        if llm is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in our process
            sharded = distributed.is_distributed()
            extra = {"distributed_executor_backend": "external_launcher"} if sharded else {}
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            llm = vllm.LLM(
                model=str(model_path),
                skip_tokenizer_init=True,
                dtype="bfloat16" if dtype == torch.float32 else str(dtype).removeprefix("torch."),
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=sampling.max_prompt_length + sampling.max_completion_length,
                logprobs_mode="processed_logprobs",
                enable_sleep_mode=sleep,
                seed=seed + distributed.rank(),
                **extra,
            )
        self.llm = llm
        # vLLM's copy differs from the policy until the first push: the cold start (or a
        # resume) changed the policy's weights since model_path was written.
        self._stale = True
        self.asleep = False

    # --- weights ----------------------------------------------------------------------

    def sync_weights(self) -> None:
        """The policy changed: push its weights before the next generation."""
        self._stale = True

    def mark_weights_current(self) -> None:
        """vLLM's copy already is the policy's (the policy was loaded from model_path and has
        not changed, as in grpo-eval and grpo-sample): the next generate() pushes nothing."""
        self._stale = False

    def _policy_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of every parameter and buffer vLLM loads; sharded (FSDP)
        parameters are gathered one at a time, by every rank in the same order. A LoRA policy
        sends its merged weights (base + adapters), under the model's own names."""
        if lora_mod.is_lora(self.model):
            yield from lora_mod.merged_weights(self.model)
            return
        names = {name for name, _ in self.model.named_parameters()}
        for name, tensor in self.model.state_dict().items():
            if name not in names:
                continue  # tied duplicates and buffers vLLM computes itself
            full = getattr(tensor, "full_tensor", None)
            yield name, (full() if full is not None else tensor).detach()

    def _push_weights(self) -> None:
        weights = self._policy_weights()
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        driver = getattr(executor, "driver_worker", None)
        runner = getattr(getattr(driver, "worker", driver), "model_runner", None)
        target = getattr(runner, "model", None)
        if target is not None:  # in process: hand over the tensors themselves
            target.load_weights(weights)
        else:
            materialised = list(weights)
            self.llm.collective_rpc(
                lambda worker: worker.model_runner.model.load_weights(materialised)
            )
        self.llm.reset_prefix_cache()
        self._stale = False

    # --- generation -------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, prompts: list[str], num_generations: int, *, greedy: bool = False
    ) -> Rollout:
        """As TransformersEngine.generate: rows [i*G, (i+1)*G) belong to prompts[i]."""
        sampling = self.sampling
        device = next(self.model.parameters()).device
        ids, mask = tokenize_prompts(
            self.tokenizer, prompts, sampling.max_prompt_length, sampling.prompt_overflow, device
        )
        self._wake_with_current_weights()
        g = 1 if greedy else num_generations
        params = self._sampling_params(g, greedy)
        requests = [
            {"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask, strict=True)
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)  # free the KV cache for the update
            self.asleep = True
        completions, logps = self._completions(outputs, g)
        return rollout_from_tokens(
            self.tokenizer,
            ids.repeat_interleave(g, 0),
            mask.repeat_interleave(g, 0),
            completions,
            logps,
            max_completion_length=sampling.max_completion_length,
        )

    def _wake_with_current_weights(self) -> None:
        """Before a generation: wake vLLM if it sleeps, and push the policy's weights if they
        changed since the last push."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        if self._stale:
            self._push_weights()

    def _sampling_params(self, g: int, greedy: bool):
        """vLLM's SamplingParams for g completions per prompt: ours (temperature, top_p), or
        argmax when greedy; token ids out (no detokenizing) with the sampled token's log-prob."""
        sampling = self.sampling
        return self.vllm.SamplingParams(
            n=g,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_completion_length,
            logprobs=0,
            stop_token_ids=[] if sampling.ignore_eos else [self.tokenizer.eos_token_id],
            ignore_eos=sampling.ignore_eos,
            detokenize=False,
        )

    def _completions(self, outputs, g: int) -> tuple[list[list[int]], list[list[float]]]:
        """(token ids, sampled log-probs) of each completion in vLLM's request outputs, g per
        request in request order, each request's in vLLM's index order; a completion that
        stopped on EOS without returning it gets the EOS back (log-prob NaN)."""
        completions, logps = [], []
        for request in outputs:
            if len(request.outputs) != g:
                raise RuntimeError(f"vllm returned {len(request.outputs)} completions, not {g}")
            for out in sorted(request.outputs, key=lambda o: o.index):
                tokens, logp = self._completion(out)
                completions.append(tokens)
                logps.append(logp)
        return completions, logps

    def _completion(self, out) -> tuple[list[int], list[float]]:
        """(token ids, sampled log-probs) of one vLLM CompletionOutput, with the EOS appended
        when it stopped on EOS without returning it."""
        eos = self.tokenizer.eos_token_id
        tokens = list(out.token_ids)
        steps = out.logprobs or [None] * len(tokens)
        logp = [_sampled_logprob(step, tok) for step, tok in zip(steps, tokens, strict=True)]
        if (
            out.finish_reason == "stop"
            and (not tokens or tokens[-1] != eos)
            and len(tokens) < self.sampling.max_completion_length
        ):
            tokens.append(eos)  # stopped on EOS without returning it
            logp.append(float("nan"))  # unknown: the correction treats it as 1
        return tokens, logp


def _sampled_logprob(step, token: int) -> float:
    """The log-prob vLLM reports for the sampled token at one position (NaN if none)."""
    if step is None or token not in step:
        return float("nan")
    entry = step[token]
    return float(getattr(entry, "logprob", entry))
