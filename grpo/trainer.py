"""The GRPO training loop (DeepSeek-R1-Zero), readable top to bottom.

One optimizer step:
    prompts -> G completions each (rollout) -> rewards -> group_advantages
    -> old-policy log-probs (only when mu > 1) and reference log-probs (only when beta > 0)
    -> mu passes over micro-batches with grpo_loss (gradient accumulation)
    -> clip, optimizer step -> metrics, eval, checkpoint.
Around it: the cold start (supervised warm-up on worked solutions), held-out evaluation
before and after GRPO, and the run directory (config, metrics, curves, summary, final/).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kernels
from kernels import reference
from models import load_model, make_tiny, save_model
from models.layout import MOE_FAMILIES
from models.routing_replay import RoutingReplay

from . import data as data_mod
from . import rewards as rewards_mod
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import GRPOConfig
from .evaluation import reward_columns
from .metrics import RunLogger
from .rollout import Rollout, TransformersEngine
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


class GRPOTrainer:
    def __init__(self, config: GRPOConfig):
        self.cfg = config.resolve()
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
            else config.device)
        self.dtype = DTYPES["bf16" if self.device.type == "cuda" else "fp32"] \
            if config.dtype == "auto" else DTYPES[config.dtype]
        self.run_dir = Path(self.cfg.output_dir)
        # Data first: a bad dataset fails before anything is written or loaded.
        self.task, self.eval_examples, self.stream = self._load_data()
        self._prepare_run_dir()
        _seed_everything(self.cfg.seed)
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
        self.engine = TransformersEngine(
            self.model, self.tokenizer, max_prompt_length=self.cfg.max_prompt_length,
            max_completion_length=self.cfg.max_completion_length,
            temperature=self.cfg.temperature, top_p=self.cfg.top_p,
            overflow=self.cfg.prompt_overflow, replay=self.replay)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.learning_rate,
                                           weight_decay=self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ref_model = None
        self._aux_loss = None  # the router's load-balancing loss of the last forward
        self.state = {"step": 0, "data_position": 0, "sft_done": False, "eval": {}}

    # --- setup ------------------------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        holds_run = (self.run_dir / "config.json").is_file()
        if self.cfg.resume:
            if find_checkpoint(self.run_dir) is None:
                raise ValueError(f"--resume: {self.run_dir} has no checkpoint to resume from")
        elif holds_run and not self.cfg.overwrite:
            raise ValueError(f"{self.run_dir} holds another run; pass --resume to continue it "
                             f"or --overwrite to replace it")
        elif holds_run:
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.run_dir / "config.json", self.cfg.to_dict())

    def _select_kernels(self) -> None:
        backend = self.cfg.kernel_backend
        fused = self.cfg.fused_loss
        if fused is None:
            fused = self.device.type == "cuda" and backend != "reference"
        # The load-balancing loss comes from the full model's forward: not with the fused path.
        self.fused = bool(fused) and self.cfg.router_aux_loss_coef == 0
        probe = torch.empty(0, device=self.device)
        if backend == "triton" and not kernels._checks.use_triton(probe):
            raise ValueError("kernel_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1)")
        if backend == "reference":
            self.loss_fn, self.logprobs_fn = reference.grpo_loss_ref, reference.token_logprobs_ref
        else:
            self.loss_fn, self.logprobs_fn = kernels.grpo_loss, kernels.token_logprobs

    def _load_policy(self):
        path = Path(self.cfg.model) if self.cfg.model else self.run_dir / "init-model"
        if not self.cfg.model and not (path / "config.json").is_file():
            # The built-in demo model: a small Qwen2 with the character tokenizer.
            make_tiny(path, family="qwen2", hidden=128, layers=4, seed=self.cfg.seed)
        model, tokenizer = load_model(path, dtype=self.dtype, device=self.device)
        if self.cfg.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
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
        return RoutingReplay(self.model) if is_moe and wanted is not False else None

    def _load_data(self):
        if self.cfg.data:
            needs_answer = "accuracy" in (self.cfg.rewards or ["accuracy"])
            examples = data_mod.load_jsonl(self.cfg.data, require_answer=needs_answer)
            if self.cfg.eval_size >= len(examples):
                raise ValueError(f"{self.cfg.data} has {len(examples)} examples: not enough "
                                 f"for eval_size={self.cfg.eval_size} plus training")
            train, evals = data_mod.split_examples(examples, self.cfg.eval_size, self.cfg.seed)
            return None, evals, data_mod.JsonlStream(train, self.cfg.seed)
        task = data_mod.make_task(self.cfg.task, **self.cfg.task_args)
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
        if cfg.resume:
            self.state = load_checkpoint(find_checkpoint(self.run_dir), self.model,
                                         self.optimizer, self.scheduler, device=self.device)
            self.stream.position = self.state["data_position"]
        if not self.state["sft_done"]:
            self._cold_start()
        if "before_grpo" not in self.state["eval"]:
            self.state["eval"]["before_grpo"] = self.evaluate()
        print(f"held-out accuracy before GRPO: "
              f"{self.state['eval']['before_grpo']['accuracy']:.3f}", flush=True)
        logger = RunLogger(self.run_dir, cfg.steps, start_step=self.state["step"],
                           tensorboard=cfg.tensorboard, show_progress=cfg.progress)
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
            save_model(self.model, self.tokenizer, self.run_dir / "final")
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
        }
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
            loss = run_sft(self.model, self.tokenizer, pairs, steps=self.cfg.sft_steps,
                           lr=self.cfg.sft_learning_rate, batch_size=self.cfg.sft_batch_size,
                           seed=self.cfg.seed, show_progress=self.cfg.progress)
            print(f"cold start: {self.cfg.sft_steps} SFT steps, final loss {loss:.3f}",
                  flush=True)
            # The reference of the RL stage is the cold-started policy: keep it on disk.
            save_model(self.model, self.tokenizer, self.run_dir / "cold-start")
        self.state["sft_done"] = True

    def _reference_model(self):
        source = self.run_dir / "cold-start"
        if not (source / "config.json").is_file():
            source = Path(self.cfg.model) if self.cfg.model else self.run_dir / "init-model"
        device = torch.device("cpu") if self.cfg.ref_on_cpu else self.device
        ref, _ = load_model(source, dtype=self.dtype, device=device)
        ref.eval().requires_grad_(False)
        return ref

    def _save_checkpoint(self) -> None:
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
        old_logp = self._logprobs(self.model, rollout) if self.cfg.num_iterations > 1 else None
        ref_logp = self._reference_logprobs(rollout) if self.cfg.beta > 0 else None
        t2 = time.perf_counter()
        routing_stats = self._routing_metrics(rollout) if self.replay is not None else {}
        loss_stats = {**self.accumulate_gradients(batch, loss_mask, old_logp, ref_logp),
                      **routing_stats}
        grad_norm = self._optimizer_step()
        t3 = time.perf_counter()
        return self._step_metrics(batch, loss_stats, grad_norm, t3 - t0,
                                  {"generate": t1 - t0, "logprobs": t2 - t1, "update": t3 - t2})

    def sample_batch(self) -> Batch:
        """Rollouts and advantages for prompts_per_step prompts; with dynamic sampling,
        groups whose rewards are all equal are dropped and more prompts drawn."""
        cfg, g = self.cfg, self.cfg.num_generations
        kept: list[tuple[dict, Rollout, torch.Tensor]] = []
        failures: dict[str, int] = {}
        rounds = groups = zero_std = 0
        while True:
            need = cfg.prompts_per_step - len(kept)
            examples = self.stream.next_batch(need)
            rollout = self.engine.generate([self._prompt(ex) for ex in examples], g)
            rewards, fails = self._score(examples, rollout)
            for name, n in fails.items():
                failures[name] = failures.get(name, 0) + n
            total = reference.combine_rewards(rewards, self.reward_weights).view(-1, g)
            for i, ex in enumerate(examples):
                informative = bool((total[i] != total[i, 0]).any())
                groups += 1
                zero_std += not informative
                if informative or not cfg.dynamic_sampling:
                    rows = slice(i * g, (i + 1) * g)
                    kept.append((ex, _rows(rollout, rows), rewards[rows]))
            rounds += 1
            if len(kept) >= cfg.prompts_per_step or not cfg.dynamic_sampling \
                    or rounds >= cfg.max_sampling_rounds:
                break
        if not kept:  # dynamic sampling found no group with signal: train on the last draw
            kept = [(ex, _rows(rollout, slice(i * g, (i + 1) * g)), rewards[i * g:(i + 1) * g])
                    for i, ex in enumerate(examples)]
        examples = [k[0] for k in kept]
        rollout = _concat_rollouts([k[1] for k in kept], self.tokenizer.pad_token_id)
        rewards = torch.cat([k[2] for k in kept])
        advantages, adv_stats = kernels.group_advantages(
            rewards.to(self.device), g, weights=self.reward_weights.to(self.device),
            scale=cfg.scale_rewards)
        return Batch(examples, rollout, rewards, advantages, adv_stats, failures,
                     zero_std / groups)

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
        if not self.cfg.ref_on_cpu or self.device.type == "cpu":
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
        for rows in _micro_batches(len(rollout), self.cfg.micro_batch_size):
            ids, t = rollout.completion_ids[rows], self.cfg.temperature
            if self.fused:
                states, weight = self._forward_logits(model, rollout, rows, hidden=True)
                parts.append(kernels.token_logprobs_from_hidden(states, weight.to(states.device),
                                                                ids, temperature=t))
            else:
                logits = self._forward_logits(model, rollout, rows)
                parts.append(self.logprobs_fn(logits, ids, temperature=t))
            self._clear_replay()
        model.train(was_training)
        return torch.cat(parts)  # (N, C) fp32

    def accumulate_gradients(self, batch: Batch, loss_mask: torch.Tensor, old_logp,
                             ref_logp) -> dict:
        """mu passes of forward+backward over micro-batches; the accumulated gradient is
        that of the whole batch in one call (per-micro-batch weights, global num_items).
        Returns the loss and token-weighted means of the loss statistics."""
        cfg, rollout = self.cfg, batch.rollout
        n = len(rollout)
        # The dapo/bnpo/cispo normaliser: all tokens of the optimizer step, after all masks.
        num_items = loss_mask.sum().clamp(min=1.0)
        totals: dict[str, float] = {}
        tokens = 0.0
        self.model.train()
        for _ in range(cfg.num_iterations):
            for rows in _micro_batches(n, cfg.micro_batch_size):
                if self.fused:  # the lm_head inside the loss: no (mb, C, V) logits
                    states, weight = self._forward_logits(self.model, rollout, rows,
                                                          hidden=True)
                    loss_fn = functools.partial(kernels.linear_grpo_loss, states, weight)
                else:
                    loss_fn = functools.partial(self.loss_fn,
                                                self._forward_logits(self.model, rollout, rows))
                loss, stats = loss_fn(
                    rollout.completion_ids[rows], batch.advantages[rows],
                    loss_mask[rows], None if old_logp is None else old_logp[rows],
                    None if ref_logp is None else ref_logp[rows],
                    temperature=cfg.temperature, beta=cfg.beta, eps_low=cfg.eps_low,
                    eps_high=cfg.eps_high, delta=cfg.delta, loss_type=cfg.loss_type,
                    importance_level=cfg.importance_level,
                    max_completion_length=cfg.max_completion_length, num_items=num_items,
                    entropy_coef=cfg.entropy_coef,
                    # The lm_head's backward does not need its output: on the GPU the
                    # gradient overwrites the logits instead of doubling their memory.
                    inplace=self.device.type == "cuda")
                if cfg.loss_type in ("grpo", "dr_grpo"):
                    # These average over the micro-batch's sequences: weight by its share.
                    loss = loss * ((rows.stop - rows.start) / n)
                if cfg.router_aux_loss_coef > 0 and self._aux_loss is not None:
                    loss = loss + cfg.router_aux_loss_coef * self._aux_loss * \
                        ((rows.stop - rows.start) / n)
                loss.backward()
                self._clear_replay()  # kept until here: checkpointing recomputes in backward
                weight = float(loss_mask[rows].sum())
                tokens += weight
                totals["loss"] = totals.get("loss", 0.0) + loss.item() / cfg.num_iterations
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value) * weight
        return {k: (v if k == "loss" else v / max(tokens, 1.0)) for k, v in totals.items()}

    def _optimizer_step(self) -> float:
        cfg = self.cfg
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _step_metrics(self, batch: Batch, loss_stats: dict, grad_norm: float, seconds: float,
                      phases: dict) -> dict:
        rollout, rewards = batch.rollout, batch.rewards
        total = reference.combine_rewards(rewards, self.reward_weights)
        lengths = rollout.lengths.float()
        metrics = {
            "reward": float(total.mean()), "reward_std": float(total.std()),
            "frac_zero_std": batch.frac_zero_std,
            "completion_length": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "truncated": float(rollout.truncated.float().mean()),
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
        for name, count in batch.failures.items():
            metrics[f"reward_failures/{name}"] = count
        return metrics

    # --- evaluation -------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batch_size: int = 256) -> dict:
        """Greedy held-out accuracy and format rate."""
        check = rewards_mod.REWARDS[self.task.rewards[0] if self.task else "accuracy"]
        correct, formatted = [], []
        for i in range(0, len(self.eval_examples), batch_size):
            examples = self.eval_examples[i:i + batch_size]
            rollout = self.engine.generate([self._prompt(ex) for ex in examples], 1, greedy=True)
            columns = {key: [ex.get(key) for ex in examples] for key in examples[0]}
            correct += check(rollout.texts, **columns)
            formatted += rewards_mod.REWARDS["format"](rollout.texts)
        return {"accuracy": float(np.mean(correct)), "format": float(np.mean(formatted))}


# --- helpers ------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _micro_batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _rows(rollout: Rollout, rows: slice) -> Rollout:
    routing = None if rollout.routing is None else rollout.routing[:, rows]
    return Rollout(rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                   rollout.completion_ids[rows], rollout.completion_mask[rows],
                   rollout.truncated[rows], rollout.sampler_logp[rows], rollout.texts[rows],
                   routing)


def _concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts of different widths: prompts re-padded on the left, completions on
    the right."""
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
        # (L, n, P_i + C_i - 1, k): the prompt part is padded on the left, the rest right.
        def pad_routing(r: Rollout) -> torch.Tensor:
            p_i = r.prompt_ids.shape[1]
            front, back = r.routing[:, :, :p_i], r.routing[:, :, p_i:]
            front = torch.nn.functional.pad(front, (0, 0, p - p_i, 0))
            back = torch.nn.functional.pad(back, (0, 0, 0, c - 1 - back.shape[2]))
            return torch.cat([front, back], dim=2)

        routing = torch.cat([pad_routing(r) for r in parts], dim=1)
    return Rollout(
        torch.cat([left(r.prompt_ids, p, pad_id) for r in parts]),
        torch.cat([left(r.prompt_mask, p, 0) for r in parts]),
        torch.cat([right(r.completion_ids, c, pad_id) for r in parts]),
        torch.cat([right(r.completion_mask, c, 0) for r in parts]),
        torch.cat([r.truncated for r in parts]),
        torch.cat([right(r.sampler_logp, c, 0.0) for r in parts]),
        [t for r in parts for t in r.texts],
        routing,
    )


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)
