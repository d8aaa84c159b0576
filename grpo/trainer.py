"""The GRPO training loop (DeepSeek-R1-Zero), readable top to bottom.

One GRPO step:
    prompts -> G completions each (rollout) -> rewards -> group_advantages
    -> old-policy log-probs (when mu > 1 or the sampler correction is on) and reference
       log-probs (when beta > 0)
    -> mu times: a pass over micro-batches with grpo_loss (gradient accumulation), clip,
       optimizer step -> metrics, eval, checkpoint.
Around it: the cold start (supervised warm-up on worked solutions), held-out evaluation
before and after GRPO, and the run directory (config, metrics, curves, summary, final/).
Under torchrun every rank runs this loop on its own prompts with the policy sharded by FSDP2;
grpo/distributed.py says what is reduced across ranks and why.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kernels
from kernels import reference
from models import load_model, make_tiny
from models.layout import MOE_FAMILIES
from models.routing_replay import RoutingReplay

from . import data as data_mod
from . import distributed as dist_mod
from . import rewards as rewards_mod
from . import tasks as tasks_mod
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import GRPOConfig
from .evaluation import reward_columns
from .files import atomic_write
from .metrics import RunLogger
from .rollout import Rollout, SamplingParams, make_engine
from .sft import run_sft

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Batch:
    """One step's data: examples, their G rollouts each, rewards and advantages."""

    examples: list[dict]  # (P,) prompts of the kept groups
    rollout: Rollout  # (N = P * G) completions
    rewards: torch.Tensor  # (N, R) per reward function
    advantages: torch.Tensor  # (N,)
    adv_stats: dict
    failures: dict
    frac_zero_std: float  # over every sampled group, before dynamic sampling drops any
    all_rewards: torch.Tensor  # (N_all, R) every rank's rewards (= rewards in one process)


class GRPOTrainer:
    def __init__(self, config: GRPOConfig):
        self.cfg = config.resolve()
        dist_mod.init_from_env()
        self.rank, self.world = dist_mod.rank(), dist_mod.world_size()
        if self.cfg.prompts_per_step % self.world:
            raise ValueError(f"prompts_per_step={self.cfg.prompts_per_step} must be a multiple "
                             f"of the number of processes ({self.world})")
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
            else config.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = DTYPES["bf16" if self.device.type == "cuda" else "fp32"] \
            if config.dtype == "auto" else DTYPES[config.dtype]
        # Sharded runs keep fp32 master parameters and compute in self.dtype.
        self.compute_dtype = None
        if self.world > 1 and self.dtype != torch.float32:
            self.compute_dtype, self.dtype = self.dtype, torch.float32
        self.run_dir = Path(self.cfg.output_dir)
        # Data first: a bad dataset fails before anything is written or loaded.
        self.task, self.eval_examples, self.stream = self._load_data()
        self._prepare_run_dir()
        _seed_everything(self.cfg.seed + self.rank)
        self._select_kernels()
        self.model, self.tokenizer = self._load_policy()
        names = list(self.cfg.rewards) or list(self.task.rewards if self.task else
                                               ("accuracy", "format"))
        if self.cfg.overlong_buffer > 0 and "overlong" not in names:
            names.append("overlong")
        self.reward_fns = [rewards_mod.resolve_reward(spec) for spec in names]
        weights = list(self.cfg.reward_weights) or [1.0] * len(self.reward_fns)
        weights += [1.0] * (len(self.reward_fns) - len(weights))
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.replay = self._routing_replay()
        self.engine = self._rollout_engine()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.learning_rate,
                                           weight_decay=self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ref_model = None
        self._aux_loss = None  # the router's load-balancing loss of the last forward
        self.state = {"step": 0, "data_position": 0, "sft_done": False, "eval": {}}

    # --- setup ------------------------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        """Rank 0 checks and prepares the run directory; the others wait for its verdict."""
        error = None
        if dist_mod.is_main():
            holds_run = (self.run_dir / "config.json").is_file()
            if self.cfg.resume:
                if find_checkpoint(self.run_dir) is None:
                    error = f"--resume: {self.run_dir} has no checkpoint to resume from"
            elif holds_run and not self.cfg.overwrite:
                error = (f"{self.run_dir} holds another run; pass --resume to continue it "
                         f"or --overwrite to replace it")
            elif holds_run:
                shutil.rmtree(self.run_dir)
            if error is None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                _write_json(self.run_dir / "config.json", self.cfg.to_dict())
        error = dist_mod.broadcast_object(error)
        if error:
            raise ValueError(error)

    def _select_kernels(self) -> None:
        self.loss_config = self.cfg.loss_config()
        backend = self.cfg.kernel_backend
        fused = self.cfg.fused_loss
        if fused is None:
            fused = self.device.type == "cuda" and backend != "reference"
        # The load-balancing loss comes from the full model's forward: not with the fused path.
        # Nor with FSDP: the lm_head weight is only gathered inside the model's own forward.
        self.fused = bool(fused) and self.cfg.router_aux_loss_coef == 0 and self.world == 1
        probe = torch.empty(0, device=self.device)
        if backend == "triton" and not kernels._checks.use_triton(probe):
            raise ValueError("kernel_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1)")
        if backend == "reference":
            self.loss_fn, self.logprobs_fn = reference.grpo_loss_ref, reference.token_logprobs_ref
        else:
            self.loss_fn, self.logprobs_fn = kernels.grpo_loss, kernels.token_logprobs

    def _load_policy(self):
        path = Path(self.cfg.model) if self.cfg.model else self.run_dir / "init-model"
        if not self.cfg.model and not (path / "config.json").is_file() and dist_mod.is_main():
            # The built-in demo model: a small Qwen2 with the character tokenizer.
            make_tiny(path, family="qwen2", hidden=128, layers=4, seed=self.cfg.seed)
        dist_mod.barrier()
        model, tokenizer = load_model(path, dtype=self.dtype, device=self.device)
        if self.cfg.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
        if self.world > 1:
            dist_mod.shard_model(model, compute_dtype=self.compute_dtype)
        return model, tokenizer

    def _routing_replay(self) -> RoutingReplay | None:
        """MoE policies record the sampler's experts and replay them in training; the router
        can be frozen. The reference model never replays."""
        is_moe = self.model.config.model_type in MOE_FAMILIES
        if self.cfg.freeze_router and is_moe:
            for block in self.model.modules():
                if hasattr(getattr(block, "experts", None), "gate_up_proj"):
                    block.gate.requires_grad_(False)
        wanted = self.cfg.routing_replay
        if wanted and not is_moe:
            raise ValueError(f"--routing-replay needs an MoE model, got "
                             f"{self.model.config.model_type}")
        if self.cfg.rollout == "vllm":
            if wanted:
                raise ValueError("--routing-replay needs --rollout transformers: vLLM does not "
                                 "report the experts it used")
            wanted = False
        return RoutingReplay(self.model) if is_moe and wanted is not False else None

    def _rollout_engine(self):
        cfg = self.cfg
        sampling = SamplingParams(max_prompt_length=cfg.max_prompt_length,
                                  max_completion_length=cfg.max_completion_length,
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  prompt_overflow=cfg.prompt_overflow, ignore_eos=cfg.ignore_eos)
        if cfg.rollout == "vllm":
            options = dict(model_path=cfg.model or str(self.run_dir / "init-model"),
                           seed=cfg.seed, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                           sleep=cfg.vllm_sleep)
        else:
            if cfg.sampler_correction != "none" and cfg.top_p < 1:
                warnings.warn("the transformers engine records log-probs after top_p; with "
                              "top_p < 1 the sampler correction is biased", stacklevel=2)
            options = dict(replay=self.replay, cache=cfg.generation_cache,
                           compile=cfg.compile_generation)
        return make_engine(cfg.rollout, self.model, self.tokenizer, sampling, **options)

    def _load_data(self):
        if self.cfg.data:
            needs_answer = "accuracy" in (self.cfg.rewards or ["accuracy"])
            examples = data_mod.load_jsonl(self.cfg.data, require_answer=needs_answer)
            if self.cfg.eval_size >= len(examples):
                raise ValueError(f"{self.cfg.data} has {len(examples)} examples: not enough "
                                 f"for eval_size={self.cfg.eval_size} plus training")
            train, evals = data_mod.split_examples(examples, self.cfg.eval_size, self.cfg.seed)
            return None, evals, data_mod.JsonlStream(train, self.cfg.seed)
        task = tasks_mod.make_task(self.cfg.task, **self.cfg.task_args)
        evals, stream = data_mod.task_splits(task, self.cfg.seed, self.cfg.eval_size)
        return task, evals, stream

    def _lr_factor(self, step: int) -> float:
        warmup, total = self.cfg.warmup_steps, max(self.cfg.steps, 1)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if self.cfg.lr_schedule == "linear":
            return 1.0 - progress
        if self.cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _prompt(self, example: dict) -> str:
        return data_mod.format_prompt(example, self.cfg.template, self.tokenizer)

    # --- the run ----------------------------------------------------------------------

    def train(self) -> dict:
        start = time.perf_counter()
        cfg = self.cfg
        main = dist_mod.is_main()
        if cfg.resume:
            path = find_checkpoint(self.run_dir) if main else None
            dist_mod.barrier()  # rank 0 may have repaired a checkpoint interrupted mid-swap
            self.state = load_checkpoint(path or self.run_dir / "checkpoint", self.model,
                                         self.optimizer, self.scheduler, device=self.device)
            self.stream.position = self.state["data_position"]
        if not self.state["sft_done"]:
            self._cold_start()
        if "before_grpo" not in self.state["eval"]:
            self.state["eval"]["before_grpo"] = self.evaluate()
        if main:
            print(f"held-out accuracy before GRPO: "
                  f"{self.state['eval']['before_grpo']['accuracy']:.3f}", flush=True)
        logger = RunLogger(self.run_dir, cfg.steps, start_step=self.state["step"],
                           tensorboard=cfg.tensorboard, show_progress=cfg.progress) if main \
            else _SilentLogger()
        try:
            if cfg.beta > 0:
                self.ref_model = self._reference_model()
            while self.state["step"] < cfg.steps:
                metrics = self.step()
                self.state["step"] += 1
                self.state["data_position"] = self.stream.position
                step = self.state["step"]
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    metrics["eval_accuracy"] = self.evaluate()["accuracy"]
                logger.log(step, metrics)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    self._save_checkpoint()
            after = self.evaluate()
            logger.message(f"held-out accuracy after GRPO: {after['accuracy']:.3f}")
            self._save_checkpoint()
            # In the dtype a single process trains in (sharded runs keep fp32 master weights).
            dist_mod.save_full_model(self.model, self.tokenizer, self.run_dir / "final",
                                     dtype=self.compute_dtype)
            logger.plot()
        finally:
            logger.close()
        summary = {
            "accuracy_before_grpo": self.state["eval"]["before_grpo"]["accuracy"],
            "accuracy_after_grpo": after["accuracy"],
            "format_before_grpo": self.state["eval"]["before_grpo"]["format"],
            "format_after_grpo": after["format"],
            "grpo_steps": self.state["step"],
            "eval_size": len(self.eval_examples),
            "seconds": time.perf_counter() - start,
            "device": str(self.device),
            "processes": self.world,
        }
        if main:
            _write_json(self.run_dir / "summary.json", summary)
        return summary

    def _cold_start(self) -> None:
        if self.cfg.sft_steps > 0:
            if self.cfg.sft_data:
                pairs = [(self._prompt(ex), ex["completion"])
                         for ex in data_mod.load_jsonl(self.cfg.sft_data)]
            elif self.task is not None:
                # Worked solutions of training prompts (never the held-out ones).
                sft_stream = data_mod.TrainStream(self.task, self.cfg.seed + 7,
                                                  exclude={e["prompt"] for e in self.eval_examples})
                examples = sft_stream.next_batch(self.cfg.sft_steps * self.cfg.sft_batch_size)
                pairs = [(self._prompt(ex), self.task.solution(ex)) for ex in examples]
            else:
                raise ValueError("--sft-steps with --data needs --sft-data (prompt and "
                                 "completion columns)")
            # Data parallel under torchrun: each rank its own batches, FSDP averages gradients.
            loss = run_sft(self.model, self.tokenizer, pairs, steps=self.cfg.sft_steps,
                           lr=self.cfg.sft_learning_rate, batch_size=self.cfg.sft_batch_size,
                           seed=self.cfg.seed + self.rank,
                           show_progress=self.cfg.progress and dist_mod.is_main())
            if dist_mod.is_main():
                print(f"cold start: {self.cfg.sft_steps} SFT steps, final loss {loss:.3f}",
                      flush=True)
            # The reference of the RL stage is the cold-started policy: keep it on disk.
            dist_mod.save_full_model(self.model, self.tokenizer, self.run_dir / "cold-start")
        self.state["sft_done"] = True

    def _reference_model(self):
        source = self.run_dir / "cold-start"
        if not (source / "config.json").is_file():
            source = Path(self.cfg.model) if self.cfg.model else self.run_dir / "init-model"
        device = torch.device("cpu") if self.cfg.ref_on_cpu and self.world == 1 else self.device
        ref, _ = load_model(source, dtype=self.dtype, device=device)
        ref.eval().requires_grad_(False)
        if self.world > 1:  # sharded like the policy (ref_on_cpu does not apply)
            dist_mod.shard_model(ref, compute_dtype=self.compute_dtype)
        return ref

    def _save_checkpoint(self) -> None:
        # A collective under torchrun: every rank writes its shard.
        save_checkpoint(self.run_dir / "checkpoint", self.model, self.tokenizer,
                        self.optimizer, self.scheduler, copy.deepcopy(self.state))

    # --- one GRPO step ----------------------------------------------------------------

    def step(self) -> dict:
        t0 = time.perf_counter()
        batch = self.sample_batch()
        t1 = time.perf_counter()
        rollout = batch.rollout
        loss_mask = rollout.completion_mask.float()
        if self.cfg.mask_truncated_completions:
            loss_mask = loss_mask * (~rollout.truncated).float()[:, None]
        correction = self.cfg.sampler_correction != "none"
        old_logp = self._logprobs(self.model, rollout) \
            if self.cfg.num_iterations > 1 or correction else None
        ref_logp = self._reference_logprobs(rollout) if self.cfg.beta > 0 else None
        is_weights, extra = None, {}
        if correction:  # pi_old / pi_sampler on the advantages
            is_weights, is_stats = reference.sampler_importance_weights(
                old_logp, rollout.sampler_logp.to(old_logp.device), loss_mask.to(old_logp.device),
                mode=self.cfg.sampler_correction, cap=self.cfg.sampler_correction_cap)
            extra = self._global_token_means(is_stats, loss_mask.sum())
            is_weights = is_weights.to(self.device)
            if self.cfg.num_iterations == 1:
                old_logp = None  # on-policy: the ratio is exactly 1, as without the correction
        t2 = time.perf_counter()
        routing_stats = self._routing_metrics(rollout) if self.replay is not None else {}
        # mu optimizer steps on the same batch (GRPO's inner iterations): from the second on,
        # the policy has moved away from the one that sampled, and the ratio and its clipping
        # come into play.
        passes = []
        for _ in range(self.cfg.num_iterations):
            stats = self.accumulate_gradients(batch, loss_mask, old_logp, ref_logp, is_weights)
            stats["grad_norm"] = self._optimizer_step()
            passes.append(stats)
        self.scheduler.step()  # one scheduler step per GRPO step, whatever mu
        self.engine.sync_weights()  # engines with their own copy of the weights
        loss_stats = {key: sum(p[key] for p in passes) / len(passes) for key in passes[0]}
        grad_norm = loss_stats.pop("grad_norm")
        loss_stats.update(routing_stats, **extra)
        t3 = time.perf_counter()
        return self._step_metrics(batch, loss_stats, grad_norm, t3 - t0,
                                  {"generate": t1 - t0, "logprobs": t2 - t1, "update": t3 - t2})

    def sample_batch(self) -> Batch:
        """Rollouts and advantages for prompts_per_step prompts (this rank's share under
        torchrun); with dynamic sampling, groups whose rewards are all equal are dropped and
        more prompts drawn."""
        cfg, g = self.cfg, self.cfg.num_generations
        quota = cfg.prompts_per_step // self.world
        kept: list[tuple[dict, Rollout, torch.Tensor]] = []
        failures: dict[str, int] = {}
        rounds = groups = zero_std = 0
        while True:
            # One global stream: every rank draws the same examples and takes its slice, and
            # all ranks generate equally often (FSDP's collectives need every rank).
            need = int(dist_mod.all_reduce(quota - len(kept), op="max"))
            if need == 0 or (rounds and (not cfg.dynamic_sampling
                                         or rounds >= cfg.max_sampling_rounds)):
                break
            drawn = self.stream.next_batch(need * self.world)
            examples = drawn[self.rank * need:(self.rank + 1) * need]
            rollout = self.engine.generate([self._prompt(ex) for ex in examples], g)
            rewards, fails = self._score(examples, rollout)
            for name, n in fails.items():
                failures[name] = failures.get(name, 0) + n
            # Unscorable completions (every reward None) are NaN: a group needs two scorable
            # ones that differ to carry a signal, as group_advantages decides.
            total = reference.combine_rewards(rewards, self.reward_weights,
                                              unscorable_nan=True).view(-1, g)
            for i, ex in enumerate(examples):
                informative = bool(reference.nanstd(total[i]) > 1e-8)
                groups += 1
                zero_std += not informative
                if (informative or not cfg.dynamic_sampling) and len(kept) < quota:
                    rows = slice(i * g, (i + 1) * g)
                    kept.append((ex, rollout.select(rows), rewards[rows]))
            rounds += 1
        if not kept:  # dynamic sampling found no group with signal: train on the last draw
            kept = [(ex, rollout.select(slice(i * g, (i + 1) * g)), rewards[i * g:(i + 1) * g])
                    for i, ex in enumerate(examples)]
        examples = [k[0] for k in kept]
        rollout = Rollout.cat([k[1] for k in kept], self.tokenizer.pad_token_id)
        rewards = torch.cat([k[2] for k in kept])
        # Normalised over the whole batch of every rank: equal to one process's advantages
        # also for scale_rewards="batch" (groups never straddle ranks).
        all_rewards, offset = dist_mod.gather_rows(rewards)
        advantages, adv_stats = kernels.group_advantages(
            all_rewards.to(self.device), g, weights=self.reward_weights.to(self.device),
            scale=cfg.scale_rewards)
        advantages = advantages[offset:offset + rewards.shape[0]]
        zero_std, groups = dist_mod.all_reduce(torch.tensor([zero_std, groups],
                                                            dtype=torch.float64)).tolist()
        return Batch(examples, rollout, rewards, advantages, adv_stats, failures,
                     zero_std / groups, all_rewards)

    def _score(self, examples: list[dict], rollout: Rollout) -> tuple[torch.Tensor, dict]:
        columns = reward_columns(examples, self.cfg.num_generations, rollout.lengths.tolist(),
                                 rollout.truncated.tolist(), self.cfg.max_completion_length)
        return rewards_mod.score(self.reward_fns, rollout.texts, columns,
                                 on_error=self.cfg.reward_errors)

    def _forward_logits(self, model, rollout: Rollout, rows: slice, replay: bool = True,
                        hidden: bool = False):
        """Logits (mb, C, V) at the positions that predict the completion tokens; with
        hidden=True the last hidden states there (mb, C, H) and the lm_head weight instead."""
        input_ids = torch.cat([rollout.prompt_ids[rows], rollout.completion_ids[rows]], 1)
        attention = torch.cat([rollout.prompt_mask[rows], rollout.completion_mask[rows]], 1)
        # Positions as generate() numbers them: left padding does not count.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        n = rollout.completion_ids.shape[1]
        dev = next(model.parameters()).device
        if replay and model is self.model and self.replay is not None \
                and rollout.routing is not None:
            self.replay.set(rollout.routing[:, rows])  # until the caller's clear()
        inputs = dict(input_ids=input_ids.to(dev), attention_mask=attention.to(dev),
                      position_ids=positions.to(dev), use_cache=False)
        if hidden:
            states = model.get_decoder()(**inputs).last_hidden_state[:, -(n + 1):-1]
            return states.to(self.device), model.get_output_embeddings().weight
        aux = {"output_router_logits": True} if self.cfg.router_aux_loss_coef > 0 else {}
        out = model(**inputs, logits_to_keep=n + 1, **aux)
        self._aux_loss = getattr(out, "aux_loss", None)
        return out.logits[:, :-1].to(self.device)

    def _clear_replay(self) -> None:
        if self.replay is not None:
            self.replay.clear()

    def _reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        if not self.cfg.ref_on_cpu or self.device.type == "cpu" or self.world > 1:
            return self._logprobs(self.ref_model, rollout)
        self.ref_model.to(self.device)  # on the accelerator only while it is used
        try:
            return self._logprobs(self.ref_model, rollout)
        finally:
            self.ref_model.to("cpu")

    @torch.no_grad()
    def _routing_metrics(self, rollout: Rollout) -> dict:
        """On the first micro-batch: the share of token-layer routing decisions where a free
        training forward differs from the rollout, and mean |sampler logp - training logp|
        without and with replay (equal only at top_p = 1: the sampler's logp is warped)."""
        rows = _micro_batches(len(rollout), self.cfg.micro_batch_size)[0]
        ids, mask = rollout.completion_ids[rows], rollout.completion_mask[rows].bool()
        sampler = rollout.sampler_logp[rows][mask]
        was_training = self.model.training
        self.model.eval()
        with self.replay.record(num_rows=rows.stop - rows.start):
            free = self._forward_logits(self.model, rollout, rows, replay=False)
        free_routing = self.replay.recorded()[:, :, :-1]
        replayed = self._forward_logits(self.model, rollout, rows)
        self._clear_replay()
        self.model.train(was_training)
        real = torch.cat([rollout.prompt_mask[rows], rollout.completion_mask[rows]], 1)
        real = real[:, :-1].bool().cpu()
        differs = (free_routing[:, real] != rollout.routing[:, rows][:, real]).any(-1)
        t = self.cfg.temperature
        logp = {name: self.logprobs_fn(logits, ids, temperature=t)[mask]
                for name, logits in (("free", free), ("replay", replayed))}
        return {"routing_mismatch": float(differs.float().mean()),
                "logp_gap_no_replay": float((logp["free"] - sampler).abs().mean()),
                "logp_gap_replay": float((logp["replay"] - sampler).abs().mean())}

    @torch.no_grad()
    def _logprobs(self, model, rollout: Rollout) -> torch.Tensor:
        was_training = model.training
        model.eval()
        parts = []
        for rows, real in self._micro_batches(len(rollout)):
            ids, t = rollout.completion_ids[rows], self.cfg.temperature
            if self.fused:
                states, weight = self._forward_logits(model, rollout, rows, hidden=True)
                logp = kernels.token_logprobs_from_hidden(states, weight.to(states.device), ids,
                                                          temperature=t)
            else:
                logp = self.logprobs_fn(self._forward_logits(model, rollout, rows), ids,
                                        temperature=t)
            if real:
                parts.append(logp)
            self._clear_replay()
        model.train(was_training)
        return torch.cat(parts)  # (N, C) fp32

    def _global_token_means(self, means: dict, tokens: torch.Tensor) -> dict[str, float]:
        """Token-weighted means over every rank of per-rank means."""
        keys = sorted(means)
        local = [float(means[k]) * float(tokens) for k in keys] + [float(tokens)]
        summed = dist_mod.all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()
        return {k: v / max(summed[-1], 1.0) for k, v in zip(keys, summed[:-1], strict=True)}

    def accumulate_gradients(self, batch: Batch, loss_mask: torch.Tensor, old_logp,
                             ref_logp, is_weights: torch.Tensor | None = None) -> dict:
        """One pass of forward+backward over micro-batches; the accumulated gradient is that
        of the whole batch in one call. The kernels normalise; this passes them the step's
        counts (every rank's): tokens, sequences and micro-batches.
        is_weights (N, C): the sampler correction on the policy term (TRL's
        importance_sampling_ratio). Returns the loss and the means of the loss statistics
        (token-weighted; the per-sequence extremes *_min / *_max as extremes)."""
        cfg, rollout = self.cfg, batch.rollout
        parts = self._micro_batches(len(rollout))
        counts = dict(
            num_sequences=int(dist_mod.all_reduce(len(rollout))),
            num_items=dist_mod.all_reduce(loss_mask.sum()).clamp(min=1.0),
            accumulation_steps=int(dist_mod.all_reduce(sum(real for _, real in parts))))
        # The engine's own log-probs tell the off-policy mask how far the sampler was (TRL
        # uses vLLM's); the transformers engine samples with the trainer's weights.
        sampler_logp = rollout.sampler_logp.to(self.device) if cfg.rollout == "vllm" else None
        totals: dict[str, float] = {}
        extremes: dict[str, list[float]] = {}
        tokens = 0.0
        self.model.train()
        for rows, real in parts:
            if self.fused:  # the lm_head inside the loss: no (mb, C, V) logits
                states, weight = self._forward_logits(self.model, rollout, rows,
                                                      hidden=True)
                loss_fn = functools.partial(kernels.linear_grpo_loss, states, weight)
            else:
                loss_fn = functools.partial(self.loss_fn,
                                            self._forward_logits(self.model, rollout, rows))
            loss, stats = loss_fn(
                rollout.completion_ids[rows], batch.advantages[rows], loss_mask[rows],
                None if old_logp is None else old_logp[rows],
                None if ref_logp is None else ref_logp[rows], config=self.loss_config,
                sampler_logp=None if sampler_logp is None else sampler_logp[rows],
                importance_sampling_ratio=None if is_weights is None else is_weights[rows],
                # The lm_head's backward does not need its output: on the GPU the
                # gradient overwrites the logits instead of doubling their memory.
                inplace=self.device.type == "cuda",
                aux_loss=self._aux_loss if cfg.router_aux_loss_coef > 0 else None, **counts)
            if self.world > 1:
                # The loss is this rank's share of the step's (global counts) and FSDP
                # averages gradients over ranks. (set_gradient_divide_factor(1.0) would make
                # it sum, but reduces with PREMUL_SUM, which gloo refuses.)
                loss = loss * (self.world if real else 0.0)
            loss.backward()
            self._clear_replay()  # kept until here: checkpointing recomputes in backward
            if not real:
                continue
            if self.world > 1:
                loss = loss / self.world
            weight = float(loss_mask[rows].sum())
            tokens += weight
            totals["loss"] = totals.get("loss", 0.0) + loss.item()
            for key, value in stats.items():
                if key.endswith(("_min", "_max")):
                    extremes.setdefault(key, []).append(float(value))
                else:
                    totals[key] = totals.get(key, 0.0) + float(value) * weight
        if self.world > 1:
            keys = sorted(totals)
            summed = dist_mod.all_reduce(torch.tensor([totals[k] for k in keys] + [tokens],
                                                      dtype=torch.float64)).tolist()
            totals, tokens = dict(zip(keys, summed[:-1], strict=True)), summed[-1]
        means = {k: (v if k == "loss" else v / max(tokens, 1.0)) for k, v in totals.items()}
        for key, values in sorted(extremes.items()):
            pick = min if key.endswith("_min") else max
            local = [v for v in values if v == v] or [float("nan")]
            gathered = [v for v in dist_mod.all_gather_objects(pick(local)) if v == v]
            means[key] = pick(gathered) if gathered else float("nan")
        return means

    def _micro_batches(self, n: int) -> list[tuple[slice, bool]]:
        """(rows, real) of this rank's micro-batches, padded with zero-weight repeats of the
        first up to the largest count of any rank: FSDP needs every rank in every forward."""
        parts = _micro_batches(n, self.cfg.micro_batch_size)
        count = int(dist_mod.all_reduce(len(parts), op="max"))
        return [(rows, True) for rows in parts] + [(parts[0], False)] * (count - len(parts))

    def _optimizer_step(self) -> float:
        cfg = self.cfg
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = dist_mod.local_value(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _step_metrics(self, batch: Batch, loss_stats: dict, grad_norm: float, seconds: float,
                      phases: dict) -> dict:
        rollout, rewards = batch.rollout, batch.all_rewards  # every rank's rows
        total = reference.combine_rewards(rewards, self.reward_weights, unscorable_nan=True)
        lengths = dist_mod.gather_rows(rollout.lengths.float())[0]
        truncated = dist_mod.gather_rows(rollout.truncated.float())[0]
        failures: dict[str, int] = {}
        for part in dist_mod.all_gather_objects(batch.failures):
            for name, count in part.items():
                failures[name] = failures.get(name, 0) + count
        metrics = {
            # Over scorable completions, as TRL logs them.
            "reward": float(total.nanmean()), "reward_std": float(reference.nanstd(total)),
            "frac_zero_std": batch.frac_zero_std,
            "completion_length": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "truncated": float(truncated.mean()),
            "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": float(lengths.sum()) / seconds,
            **{f"seconds_{k}": v for k, v in phases.items()},
            **{k: v for k, v in loss_stats.items()},
        }
        if self.cfg.beta == 0:
            metrics.pop("kl", None)  # there is no reference model: nothing was measured
        for j, (name, _) in enumerate(self.reward_fns):
            column = rewards[:, j]
            metrics[f"reward/{name}"] = float(torch.nanmean(column))
            metrics[f"reward_std/{name}"] = float(column[~column.isnan()].std()) \
                if (~column.isnan()).sum() > 1 else float("nan")
        acc = [n for n, _ in self.reward_fns if n in ("accuracy", "countdown")]
        metrics["accuracy"] = metrics[f"reward/{acc[0]}"] if acc else float("nan")
        for name, count in failures.items():
            metrics[f"reward_failures/{name}"] = count
        return metrics

    # --- evaluation -------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batch_size: int = 256) -> dict:
        """Greedy held-out accuracy and format rate."""
        check = rewards_mod.REWARDS[self.task.rewards[0] if self.task else "accuracy"]
        # Under torchrun each rank answers every world-th prompt, in equally many batches.
        mine = self.eval_examples[self.rank::self.world]
        batches = -(-len(self.eval_examples[::self.world]) // batch_size)
        correct, formatted = [], []
        for i in range(0, batches * batch_size, batch_size):
            examples = mine[i:i + batch_size] or self.eval_examples[:1]  # a rank with none
            rollout = self.engine.generate([self._prompt(ex) for ex in examples], 1, greedy=True)
            if not mine[i:i + batch_size]:
                continue
            columns = {key: [ex.get(key) for ex in examples] for key in examples[0]}
            correct += check(rollout.texts, **columns)
            formatted += rewards_mod.REWARDS["format"](rollout.texts)
        if self.world > 1:
            sums = dist_mod.all_reduce(torch.tensor([sum(correct), sum(formatted), len(correct)],
                                                    dtype=torch.float64)).tolist()
            return {"accuracy": sums[0] / sums[2], "format": sums[1] / sums[2]}
        return {"accuracy": float(np.mean(correct)), "format": float(np.mean(formatted))}


# --- helpers ------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _micro_batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class _SilentLogger:
    """Ranks other than 0 log nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def plot(self) -> None:
        pass

    def close(self) -> None:
        pass


def _write_json(path: Path, value: dict) -> None:
    atomic_write(path, json.dumps(value, indent=2, default=str))
