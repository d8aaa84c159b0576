"""The GRPO training loop (DeepSeek-R1-Zero), readable top to bottom.

One GRPO step (`step`):
    sample_batch: prompts -> G completions each (engine.generate) -> rewards (score)
                  -> group_advantages (kernels)
    -> old-policy log-probs (when mu > 1 or the sampler correction is on) and reference
       log-probs (when beta > 0): policy_logprobs
    -> mu times: accumulate_gradients (grpo_loss / linear_grpo_loss over micro-batches),
       clip, optimizer.step()
    -> metrics (grpo.metrics.step_metrics), eval, checkpoint.
Around it (`train`): the cold start (supervised warm-up on worked solutions), held-out
evaluation before and after GRPO, and the run directory (config, metrics, curves, summary,
final/). The parts come built by grpo.build.build_trainer. Under torchrun every rank runs this
loop on its own prompts with the policy sharded by FSDP2; grpo/distributed.py says what is
reduced across ranks and why.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo import kernels
from grpo.kernels import reference
from grpo.models.routing_replay import RoutingReplay

from . import data as data_mod
from . import distributed as dist_mod
from . import files, interrupts
from . import lora as lora_mod
from . import rewards as rewards_mod
from . import tasks as tasks_mod
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import GRPOConfig
from .evaluation import greedy_accuracy
from .interrupts import Interrupted
from .metrics import (
    RunLogger,
    SilentLogger,
    global_token_means,
    process_seconds,
    reduce_loss_stats,
    step_metrics,
)
from .policy import PolicyForward, load_frozen_model
from .rollout import Rollout
from .sft import run_sft


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf (loss, gradients or weights) and stopped."""


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


@dataclass
class TrainerParts:
    """What GRPOTrainer runs on. dtype is the parameters' (fp32 master weights when sharded),
    compute_dtype the forward's when it differs (None otherwise)."""

    config: GRPOConfig
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    compute_dtype: torch.dtype | None
    task: tasks_mod.Task | None  # None with a JSONL dataset
    eval_examples: list[dict]
    stream: Any  # TrainStream or JsonlStream
    model: torch.nn.Module
    tokenizer: Any
    replay: RoutingReplay | None
    engine: Any  # grpo.rollout.Engine
    reward_fns: list[tuple[str, Any]]
    reward_weights: torch.Tensor  # (R,)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    forward: PolicyForward
    loss_fn: Any  # kernels.grpo_loss or reference.grpo_loss_ref
    lora: lora_mod.LoRASettings | None = None  # LoRA adapters (None: the full model)


class GRPOTrainer:
    def __init__(self, parts: TrainerParts):
        self.parts = parts
        self.cfg, self.run_dir = parts.config, parts.run_dir
        self.rank, self.world, self.device = parts.rank, parts.world, parts.device
        self.model, self.tokenizer, self.engine = parts.model, parts.tokenizer, parts.engine
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.forward, self.replay = parts.forward, parts.replay
        self.task, self.eval_examples, self.stream = parts.task, parts.eval_examples, parts.stream
        self.reward_fns, self.reward_weights = parts.reward_fns, parts.reward_weights
        self.unscored = rewards_mod.UnscoredWatch(self.reward_fns, rewards_mod.UNSCORED_PATIENCE)
        self.ref_model = None  # loaded after the cold start (it is the cold-started policy)
        self.state = {"step": 0, "data_position": 0, "sft_done": False, "eval": {}}
        self.signals = interrupts.Signals(mode="defer")
        # Under torchrun every rank must stop at the same point (FSDP's collectives need them
        # all), so nothing is dropped at once there: each rank finishes the part it is in.
        self._drop = "drop" if self.world == 1 else "defer"
        self._saved_step: int | None = None  # the step of the checkpoint on disk, if any
        self._doing = "start-up"  # for the message of a signal that stops the run at once

    def prompt(self, example: dict) -> str:
        return data_mod.format_prompt(example, self.cfg.data.template, self.tokenizer)

    def policy_logprobs(self, model, rollout: Rollout) -> torch.Tensor:
        """log p(completion token) (N, C) fp32 under the policy (replaying the sampler's
        experts) or the reference model."""
        return self.forward.logprobs(model, rollout, replay=model is self.model)

    # --- the run ----------------------------------------------------------------------

    def train(self) -> dict:
        """The whole run: resume or cold start, held-out evaluation, the GRPO steps,
        evaluation again, the checkpoint, final/ and summary.json.

        SIGINT or SIGTERM anywhere in it ends the run with `Interrupted` and the last good
        state on disk (grpo.interrupts): loading and evaluations are dropped at once, the
        cold start and a GRPO step finish and are saved, a write completes. The cold start
        gets a checkpoint of its own, and a signal during the last evaluation still saves the
        GRPO steps."""
        with self.signals.installed():
            try:
                return self._train()
            except interrupts.Stop as e:
                where = "twice, stopped at once" if e.again else f"during {self._doing}"
                raise self._interrupted(e.signum, where) from None

    def _train(self) -> dict:
        start = time.perf_counter()
        self._doing = "the loading of the checkpoint"
        with self.signals.phase(self._drop):
            self._resume()
        if not self.state["sft_done"]:
            if self._cold_start():
                self.save_checkpoint()  # minutes of SFT are not redone after a crash
            self._stop_if_signalled("after the cold start")
        if "before_grpo" not in self.state["eval"]:
            self._doing = "the evaluation before GRPO"
            with self.signals.phase(self._drop):
                self.state["eval"]["before_grpo"] = self.evaluate()
        before = self.state["eval"]["before_grpo"]
        if dist_mod.is_main():
            print(f"held-out accuracy before GRPO: {before['accuracy']:.3f}", flush=True)
        logger = self._logger()
        try:
            if self.cfg.loss.beta > 0 and self.parts.lora is None:
                # (With LoRA the reference is the policy with its adapters off: no model.)
                self._doing = "the loading of the reference model"
                with self.signals.phase(self._drop):
                    self.ref_model = self.load_reference()
            self._run_steps(logger)
            after = None
            self._doing = "the evaluation after GRPO"
            with contextlib.suppress(interrupts.Stop):  # the steps are saved all the same
                with self.signals.phase(self._drop):
                    after = self.evaluate()
            if after is not None:
                logger.message(f"held-out accuracy after GRPO: {after['accuracy']:.3f}")
            self.save_checkpoint()
            self._stop_if_signalled(f"during {self._doing}" if after is None else "at the end")
            with self.signals.phase("hold"):
                self._write_final()
                logger.plot()
        finally:
            logger.close()
        summary = {
            "accuracy_before_grpo": before["accuracy"],
            "accuracy_after_grpo": after["accuracy"],
            "format_before_grpo": before["format"],
            "format_after_grpo": after["format"],
            "grpo_steps": self.state["step"],
            "eval_size": len(self.eval_examples),
            "seconds": time.perf_counter() - start,
            "seconds_wall": process_seconds(),  # the whole command, imports included
            "device": str(self.device),
            "processes": self.world,
        }
        if self.parts.lora is not None:
            summary["lora"] = lora_mod.describe(self.model, self.optimizer, self.cfg.loss.beta)
        if dist_mod.is_main():
            with self.signals.phase("hold"):
                files.write_json(self.run_dir / "summary.json", summary)
        self._stop_if_signalled("at the end")
        return summary

    def _resume(self) -> None:
        """Back to the checkpoint's state with --resume."""
        if not self.cfg.run.resume:
            return
        path = find_checkpoint(self.run_dir) if dist_mod.is_main() else None
        dist_mod.barrier()  # rank 0 may have repaired a checkpoint interrupted mid-swap
        self._saved_step = -1  # on disk already, whatever happens while it loads
        self.state = load_checkpoint(
            path or self.run_dir / "checkpoint",
            self.model,
            self.optimizer,
            self.scheduler,
            device=self.device,
        )
        self._saved_step = self.state["step"]
        self.stream.position = self.state["data_position"]

    def _write_final(self) -> None:
        # In the dtype a single process trains in (sharded runs keep fp32 master weights).
        lora_mod.save_full_model(
            self.model, self.tokenizer, self.run_dir / "final", dtype=self.parts.compute_dtype
        )
        if self.parts.lora is not None:  # final/ is merged; final/adapter/ in PEFT's format
            adapter_dir = self.run_dir / "final" / "adapter"
            lora_mod.save_adapter(self.model, self.tokenizer, adapter_dir)

    def _signalled(self) -> int:
        """The signal any rank received, 0 if none (a collective: every rank decides alike)."""
        return int(dist_mod.all_reduce(float(self.signals.first), op="max"))

    def _stop_if_signalled(self, where: str) -> None:
        """A safe point: `Interrupted` if any rank received a signal."""
        stop = self._signalled()
        if stop:
            raise self._interrupted(stop, where)

    def _interrupted(self, signum: int, where: str) -> Interrupted:
        name = signal.Signals(signum).name
        path = self.run_dir / "checkpoint"
        if self._saved_step is None:
            kept = "nothing was saved; start the run again with --overwrite"
        else:
            step = "" if self._saved_step < 0 else f" (step {self._saved_step})"
            kept = f"checkpoint in {path}{step}; continue with the same command and --resume"
        return Interrupted(signum, f"{name} {where}: {kept}")

    def _logger(self):
        run = self.cfg.run
        if not dist_mod.is_main():
            return SilentLogger()
        return RunLogger(
            self.run_dir,
            self.cfg.optim.steps,
            start_step=self.state["step"],
            tensorboard=run.tensorboard,
            show_progress=run.progress,
        )

    def _run_steps(self, logger) -> None:
        """GRPO steps up to optim.steps, with the periodic evaluations and checkpoints. SIGINT
        (Ctrl-C) or SIGTERM (a scheduler's warning) ends the run after the current step,
        with a checkpoint: `Interrupted`."""
        steps, run = self.cfg.optim.steps, self.cfg.run
        with self.signals.phase("defer"):
            while self.state["step"] < steps:
                self._doing = f"step {self.state['step'] + 1}"
                metrics = self.step()
                self.state["step"] += 1
                self.state["data_position"] = self.stream.position
                step = self.state["step"]
                if run.eval_every and step % run.eval_every == 0 and step < steps:
                    metrics["eval_accuracy"] = self.evaluate()["accuracy"]
                logger.log(step, metrics)
                stop = self._signalled()
                if (run.save_every and step % run.save_every == 0 and step < steps) or stop:
                    self.save_checkpoint()
                    stop = self._signalled()  # one that came during the save stops here too
                if stop:
                    raise self._interrupted(stop, f"after step {step}")

    def _cold_start(self) -> bool:
        """The supervised cold start, if the config asks for one (returns whether it trained):
        a signal waits for its end, to be saved with it."""
        c = self.cfg.cold_start
        self._doing = "the cold start"
        if c.sft_steps > 0:
            if c.sft_data:
                examples = data_mod.load_jsonl(c.sft_data, require_completion=True)
                pairs = [(self.prompt(ex), ex["completion"]) for ex in examples]
            elif self.task is not None:
                # Worked solutions of training prompts (never the held-out ones).
                held_out = {e["prompt"] for e in self.eval_examples}
                stream = data_mod.TrainStream(self.task, self.cfg.run.seed + 7, exclude=held_out)
                examples = stream.next_batch(c.sft_examples or c.sft_steps * c.sft_batch_size)
                pairs = [(self.prompt(ex), self.task.solution(ex)) for ex in examples]
            elif all("completion" in ex for ex in self.stream.examples):
                # A dataset whose rows carry a worked completion (examples/code): its
                # training rows, never the held-out ones.
                pairs = [(self.prompt(ex), ex["completion"]) for ex in self.stream.examples]
            else:
                raise ValueError(
                    "--sft-steps with --data needs --sft-data (prompt and completion columns) "
                    "or a 'completion' column in the dataset"
                )
            # Data parallel under torchrun: each rank its own batches, FSDP averages gradients.
            with self.signals.phase("defer"):
                loss = run_sft(
                    self.model,
                    self.tokenizer,
                    pairs,
                    steps=c.sft_steps,
                    lr=c.sft_learning_rate,
                    batch_size=c.sft_batch_size,
                    seed=self.cfg.run.seed + self.rank,
                    show_progress=self.cfg.run.progress and dist_mod.is_main(),
                )
            if dist_mod.is_main():
                print(f"cold start: {c.sft_steps} SFT steps, final loss {loss:.3f}", flush=True)
            with self.signals.phase("hold"):
                # The reference of the RL stage is the cold-started policy: keep it on disk.
                lora_mod.save_full_model(self.model, self.tokenizer, self.run_dir / "cold-start")
                if self.parts.lora is not None:
                    # The cold start's adapters become the base (the reference, with the
                    # adapters off) and GRPO's start from zero; cold-start/ holds that base.
                    lora_mod.merge_and_reset(
                        self.model, base=self.run_dir / "cold-start", seed=self.cfg.run.seed
                    )
        self.state["sft_done"] = True
        return c.sft_steps > 0

    def save_checkpoint(self) -> None:
        """A collective under torchrun: every rank writes its shard. Never from non-finite
        weights: the checkpoint on disk stays the last good one."""
        finite = all(
            bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
            for p in self.model.parameters()
        )
        if dist_mod.all_reduce(float(not finite), op="max") > 0:
            raise NonFiniteError(
                f"the weights hold NaN or inf: not writing a checkpoint over "
                f"{self.run_dir / 'checkpoint'}"
            )
        # Whole or not at all, whatever signals come meanwhile (a second Ctrl-C included).
        with self.signals.phase("hold"):
            save_checkpoint(
                self.run_dir / "checkpoint",
                self.model,
                self.tokenizer,
                self.optimizer,
                self.scheduler,
                copy.deepcopy(self.state),
            )
        self._saved_step = self.state["step"]

    # --- one GRPO step ----------------------------------------------------------------

    def step(self) -> dict:
        t0 = time.perf_counter()
        batch = self.sample_batch()
        t1 = time.perf_counter()
        # The kernels' value checks once per step (one host sync); the log-prob, loss and
        # experts calls of the step then skip theirs, so that none of them waits for the GPU.
        vocab = self.model.get_output_embeddings().weight.shape[0]
        kernels.check_values(batch.rollout.completion_ids, vocab, {"advantages": batch.advantages})
        with kernels.value_checks(False):
            return self._learn(batch, t0, t1)

    def _learn(self, batch: Batch, t0: float, t1: float) -> dict:
        """Log-probs, the mu optimizer steps and the metrics of one sampled batch."""
        cfg = self.cfg
        rollout = batch.rollout
        loss_mask = rollout.completion_mask.float()
        if cfg.sampling.mask_truncated_completions:
            loss_mask = loss_mask * (~rollout.truncated).float()[:, None]
        correction = cfg.rollout.sampler_correction != "none"
        mu = cfg.optim.num_iterations
        old_logp = self.policy_logprobs(self.model, rollout) if mu > 1 or correction else None
        ref_logp = self._reference_logprobs(rollout) if cfg.loss.beta > 0 else None
        is_weights, extra = None, {}
        if correction:  # pi_old / pi_sampler on the policy term
            is_weights, is_stats = reference.sampler_importance_weights(
                old_logp,
                rollout.sampler_logp.to(old_logp.device),
                loss_mask.to(old_logp.device),
                mode=cfg.rollout.sampler_correction,
                cap=cfg.rollout.sampler_correction_cap,
            )
            extra = global_token_means(is_stats, loss_mask.sum())
            is_weights = is_weights.to(self.device)
            if mu == 1:
                old_logp = None  # on-policy: the ratio is exactly 1, as without the correction
        t2 = time.perf_counter()
        routing = self.forward.routing_metrics(self.model, rollout) if self.replay else {}
        # mu optimizer steps on the same batch (GRPO's inner iterations): from the second on,
        # the policy has moved away from the one that sampled, and the ratio and its clipping
        # come into play.
        passes, skipped = [], 0
        for _ in range(mu):
            stats = self.accumulate_gradients(batch, loss_mask, old_logp, ref_logp, is_weights)
            stats["grad_norm"], applied = self._optimizer_step(stats["loss"])
            skipped += not applied
            passes.append(stats)
        self._count_nonfinite(skipped)
        self.scheduler.step()  # one scheduler step per GRPO step, whatever mu
        self.engine.sync_weights()  # engines with their own copy of the weights
        loss_stats = {key: sum(p[key] for p in passes) / len(passes) for key in passes[0]}
        grad_norm = loss_stats.pop("grad_norm")
        loss_stats.update(routing, **extra, skipped_nonfinite=skipped)
        t3 = time.perf_counter()
        phases = {"generate": t1 - t0, "logprobs": t2 - t1, "update": t3 - t2}
        return step_metrics(
            batch.rollout,
            batch.all_rewards,
            batch.failures,
            batch.frac_zero_std,
            self.reward_fns,
            self.reward_weights,
            loss_stats,
            grad_norm=grad_norm,
            lr=self.scheduler.get_last_lr()[0],
            seconds=t3 - t0,
            phases=phases,
            beta=cfg.loss.beta,
        )

    def sample_batch(self) -> Batch:
        """Rollouts and advantages for prompts_per_step prompts (this rank's share under
        torchrun); with dynamic sampling, groups whose rewards are all equal are dropped and
        more prompts drawn."""
        g = self.cfg.sampling.num_generations
        kept, failures, frac_zero_std = self._sample_groups()
        rollout = Rollout.cat([k[1] for k in kept], self.tokenizer.pad_token_id)
        rewards = torch.cat([k[2] for k in kept])
        # Normalised over the whole batch of every rank: equal to one process's advantages
        # also for scale_rewards="batch" (groups never straddle ranks).
        all_rewards, offset = dist_mod.gather_rows(rewards)
        # Every rank sees every rank's rewards: all stop together or none does.
        self.unscored.update(all_rewards, rewards_mod.example_columns([k[0] for k in kept]))
        advantages, adv_stats = kernels.group_advantages(
            all_rewards.to(self.device),
            g,
            weights=self.reward_weights.to(self.device),
            scale=self.cfg.sampling.scale_rewards,
        )
        advantages = advantages[offset : offset + rewards.shape[0]]
        return Batch(
            [k[0] for k in kept],
            rollout,
            rewards,
            advantages,
            adv_stats,
            failures,
            frac_zero_std,
            all_rewards,
        )

    def _sample_groups(self) -> tuple[list, dict[str, int], float]:
        """([(example, its G rollouts, their rewards)], reward failures, the share of sampled
        groups (every rank's) whose rewards were all equal)."""
        s, g = self.cfg.sampling, self.cfg.sampling.num_generations
        quota = s.prompts_per_step // self.world
        kept: list[tuple[dict, Rollout, torch.Tensor]] = []
        failures: dict[str, int] = {}
        rounds = groups = zero_std = 0
        while True:
            # One global stream: every rank draws the same examples and takes its slice, and
            # all ranks generate equally often (FSDP's collectives need every rank).
            need = int(dist_mod.all_reduce(quota - len(kept), op="max"))
            last_round = rounds >= (s.max_sampling_rounds if s.dynamic_sampling else 1)
            if need == 0 or (rounds and last_round):
                break
            drawn = self.stream.next_batch(need * self.world)
            examples = drawn[self.rank * need : (self.rank + 1) * need]
            rollout = self.engine.generate([self.prompt(ex) for ex in examples], g)
            rewards, fails = self._score(examples, rollout)
            for name, n in fails.items():
                failures[name] = failures.get(name, 0) + n
            # Unscorable completions (every reward None) are NaN: a group needs two scorable
            # ones that differ to carry a signal, as group_advantages decides.
            total = reference.combine_rewards(rewards, self.reward_weights, unscorable_nan=True)
            for i, ex in enumerate(examples):
                informative = bool(reference.nanstd(total.view(-1, g)[i]) > 1e-8)
                groups += 1
                zero_std += not informative
                if (informative or not s.dynamic_sampling) and len(kept) < quota:
                    rows = slice(i * g, (i + 1) * g)
                    kept.append((ex, rollout.select(rows), rewards[rows]))
            rounds += 1
        if not kept:  # dynamic sampling found no group with signal: train on the last draw
            kept = [
                (ex, rollout.select(slice(i * g, (i + 1) * g)), rewards[i * g : (i + 1) * g])
                for i, ex in enumerate(examples)
            ]
        counts = dist_mod.all_reduce(torch.tensor([zero_std, groups], dtype=torch.float64))
        return kept, failures, float(counts[0] / counts[1])

    def _score(self, examples: list[dict], rollout: Rollout) -> tuple[torch.Tensor, dict]:
        s = self.cfg.sampling
        columns = rewards_mod.reward_columns(
            examples,
            s.num_generations,
            rollout.lengths.tolist(),
            rollout.truncated.tolist(),
            s.max_completion_length,
        )
        return rewards_mod.score(
            self.reward_fns, rollout.texts, columns, on_error=self.cfg.data.reward_errors
        )

    def load_reference(self) -> torch.nn.Module:
        """The frozen reference: the cold-started policy (else the initial one), from disk, on
        the CPU with ref_on_cpu (one process only), sharded like the policy under torchrun."""
        m, p = self.cfg.model, self.parts
        source = self.run_dir / "cold-start"
        if not (source / "config.json").is_file():
            source = Path(m.path) if m.path else self.run_dir / "init-model"
        on_cpu = m.ref_on_cpu and self.world == 1
        device = torch.device("cpu") if on_cpu else self.device
        return load_frozen_model(
            source, dtype=p.dtype, device=device, world=self.world, compute_dtype=p.compute_dtype
        )

    def _reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        if self.parts.lora is not None:  # the base model: the policy with its adapters off
            with lora_mod.adapters_disabled(self.model):
                return self.forward.logprobs(self.model, rollout, replay=False)
        if not self.cfg.model.ref_on_cpu or self.device.type == "cpu" or self.world > 1:
            return self.policy_logprobs(self.ref_model, rollout)
        self.ref_model.to(self.device)  # on the accelerator only while it is used
        try:
            return self.policy_logprobs(self.ref_model, rollout)
        finally:
            self.ref_model.to("cpu")

    def accumulate_gradients(
        self,
        batch: Batch,
        loss_mask: torch.Tensor,
        old_logp,
        ref_logp,
        is_weights: torch.Tensor | None = None,
    ) -> dict:
        """One pass of forward+backward over micro-batches; the accumulated gradient is that
        of the whole batch in one call. The kernels normalise; this passes them the step's
        counts (every rank's): tokens, sequences and micro-batches.
        is_weights (N, C): the sampler correction on the policy term (TRL's
        importance_sampling_ratio). Returns the loss and the means of the loss statistics
        (token-weighted; the per-sequence extremes *_min / *_max as extremes)."""
        rollout, fwd = batch.rollout, self.forward
        parts = fwd.micro_batches(len(rollout), rollout)
        counts = dict(
            num_sequences=int(dist_mod.all_reduce(len(rollout))),
            num_items=dist_mod.all_reduce(loss_mask.sum()).clamp(min=1.0),
            accumulation_steps=int(dist_mod.all_reduce(sum(real for _, real in parts))),
        )
        # The engine's own log-probs tell the off-policy mask how far the sampler was (TRL
        # uses vLLM's); the transformers engine samples with the trainer's weights.
        vllm = self.cfg.rollout.engine == "vllm"
        per_token = dict(
            mask=loss_mask,
            old_logp=old_logp,
            ref_logp=ref_logp,
            sampler_logp=rollout.sampler_logp.to(self.device) if vllm else None,
            importance_sampling_ratio=is_weights,
        )
        totals: dict[str, float] = {}
        extremes: dict[str, list[float]] = {}
        tokens = 0.0
        self.model.train()
        for rows, real in parts:
            with fwd.replaying(rollout, rows):  # kept through backward: checkpointing recomputes
                loss, stats = self._micro_batch_loss(batch, rows, per_token, counts)
                if self.world > 1:
                    # The loss is this rank's share of the step's (global counts) and FSDP
                    # averages gradients over ranks. (set_gradient_divide_factor(1.0) would
                    # make it sum, but reduces with PREMUL_SUM, which gloo refuses.)
                    loss = loss * (self.world if real else 0.0)
                loss.backward()
            if not real:
                continue
            weight = float(loss_mask[rows].sum())
            tokens += weight
            totals["loss"] = totals.get("loss", 0.0) + loss.item() / self.world
            for key, value in stats.items():
                if key.endswith(("_min", "_max")):
                    extremes.setdefault(key, []).append(float(value))
                else:
                    totals[key] = totals.get(key, 0.0) + float(value) * weight
        return reduce_loss_stats(totals, tokens, extremes)

    def _micro_batch_loss(self, batch: Batch, rows: slice, per_token: dict, counts: dict):
        """The GRPO loss of one micro-batch (the kernels' (loss, stats)): logits, or the last
        hidden states with the lm_head fused into the loss."""
        fwd, loss_cfg = self.forward, self.cfg.loss
        rollout = batch.rollout
        if fwd.packing:  # one padding-free row; the lm_head on the completion tokens only
            loss_fn, aux = fwd.packed_loss_fn(self.model, rollout, rows)
        elif fwd.fused:  # the lm_head inside the loss: no (mb, C, V) logits
            states, weight = fwd.hidden(self.model, rollout, rows)
            loss_fn, aux = functools.partial(kernels.linear_grpo_loss, states, weight), None
        else:
            logits, aux = fwd.logits(self.model, rollout, rows)
            loss_fn = functools.partial(self.parts.loss_fn, logits)
        sliced = {k: None if v is None else v[rows] for k, v in per_token.items()}
        return loss_fn(
            rollout.completion_ids[rows],
            batch.advantages[rows],
            sliced.pop("mask"),
            sliced.pop("old_logp"),
            sliced.pop("ref_logp"),
            config=loss_cfg,
            # The lm_head's backward does not need its output: on the GPU the gradient
            # overwrites the logits instead of doubling their memory.
            inplace=self.device.type == "cuda",
            aux_loss=aux if loss_cfg.router_aux_loss_coef > 0 else None,
            **sliced,
            **counts,
        )

    def _optimizer_step(self, loss: float) -> tuple[float, bool]:
        """(gradient norm, whether the step was applied): a non-finite loss or gradient norm
        is dropped instead of turning every weight NaN."""
        max_norm = self.cfg.optim.max_grad_norm
        grad_norm = dist_mod.local_value(
            torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), max_norm if max_norm > 0 else float("inf")
            )
        )
        applied = math.isfinite(grad_norm) and math.isfinite(loss)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    def _count_nonfinite(self, skipped: int) -> None:
        """Stop after max_nonfinite_steps GRPO steps in a row with a skipped update."""
        run = self.state.get("nonfinite_in_a_row", 0) + 1 if skipped else 0
        self.state["nonfinite_in_a_row"] = run
        limit = self.cfg.optim.max_nonfinite_steps
        if run >= limit:
            raise NonFiniteError(
                f"{run} steps in a row had a non-finite loss or gradient (step "
                f"{self.state['step'] + 1}); stopped without writing a checkpoint. The last "
                f"checkpoint, if any, is in {self.run_dir / 'checkpoint'}: lower the learning "
                f"rate or check the rewards, then --resume"
            )

    # --- evaluation -------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Greedy held-out accuracy and format rate."""
        if self.task:
            check = self.task.reward_functions()[0][1]
        else:  # a dataset: its correctness reward (accuracy, or code)
            check = rewards_mod.correctness_reward(self.reward_fns)
        result = greedy_accuracy(self.engine, self.eval_examples, self.prompt, check)
        rewards_mod.reward_metrics(self.reward_fns)  # the evaluation's counts are no step's
        return result
