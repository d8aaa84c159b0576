"""A GRPO run with a deterministic fake rollout engine, for the distributed tests.

Run as `python -m tests.grpo.dist_worker OUT MODEL [flags]` (one process) or under
`torchrun --nproc-per-node 2` (two): the completions depend only on the prompt and the
sample's index, so the runs see the same global batch and must give the same losses,
advantages and parameters. Rank 0 writes OUT.record.json (beside the run directory, which
holds only what a run writes) with each step's metrics and the advantages of the whole batch
in prompt order.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from grpo import distributed
from grpo.build import build_trainer
from grpo.config import parse_config
from grpo.rollout import rollout_from_tokens, tokenize_prompts


class FakeEngine:
    """Completions from a hash of (prompt, sample index): fixed, however prompts are batched."""

    def __init__(self, tokenizer, max_completion_length: int):
        self.tokenizer, self.max_len = tokenizer, max_completion_length
        self.syncs = 0

    def generate(self, prompts, num_generations, *, greedy=False):
        ids, mask = tokenize_prompts(self.tokenizer, prompts, 64, "truncate",
                                     torch.device("cpu"))
        completions = []
        for p in prompts:
            for j in range(1 if greedy else num_generations):
                h = hashlib.sha256(f"{p}|{j}".encode()).digest()
                length = 2 + h[0] % (self.max_len - 1)
                tokens = [5 + b % 20 for b in h[1:1 + length]]
                if h[31] % 3:  # two thirds stop on EOS, the rest are truncated
                    tokens = tokens[:-1] + [self.tokenizer.eos_token_id]
                completions.append(tokens[:self.max_len])
        g = 1 if greedy else num_generations
        return rollout_from_tokens(self.tokenizer, ids.repeat_interleave(g, 0),
                                   mask.repeat_interleave(g, 0), completions,
                                   max_completion_length=self.max_len)

    def sync_weights(self):
        self.syncs += 1


def length_reward(completions, **kwargs):
    """Deterministic and varied within a group: the completion's length modulo 4."""
    return [float(len(c) % 4) for c in completions]


def sparse_reward(completions, prompts, **kwargs):
    """Only prompts whose hash is odd get varied rewards: the others' groups carry no signal,
    so dynamic sampling keeps different numbers of groups on different ranks."""
    odd = [hashlib.sha256(p.encode()).digest()[0] % 2 for p in prompts]
    return [float(len(c) % 4) * o for c, o in zip(completions, odd, strict=True)]


def main(argv: list[str]) -> None:
    out, model = argv[0], argv[1]
    config = parse_config([
        "--model", model, "--output-dir", out, "--task", "arithmetic", "--template", "none",
        "--rewards", "tests.grpo.dist_worker:length_reward", "--sft-steps", "0",
        "--prompts-per-step", "4", "--num-generations", "4", "--micro-batch-size", "3",
        "--max-completion-length", "10", "--eval-size", "3", "--learning-rate", "1e-3",
        "--no-dynamic-sampling", "--no-progress", "--dtype", "fp32", "--device", "cpu",
        *argv[2:]])
    trainer = build_trainer(config)
    # The real engine first, greedy on fixed prompts (the same batch on every rank): under FSDP
    # it decodes with gathered weights, and must answer as one process does.
    prompts = [trainer.prompt(ex) for ex in trainer.eval_examples[:3]]
    greedy = trainer.engine.generate(prompts, 1, greedy=True).texts
    trainer.engine = FakeEngine(trainer.tokenizer, config.sampling.max_completion_length)
    record = []
    sample = trainer.sample_batch

    def recorded_sample():
        batch = sample()
        advantages, _ = distributed.gather_rows(batch.advantages.cpu())
        record.append({"advantages": advantages.tolist(),
                       "rows": distributed.all_gather_objects(len(batch.rollout))})
        return batch

    trainer.sample_batch = recorded_sample
    step = trainer.step

    def recorded_step():
        metrics = step()
        record[-1].update(loss=metrics["loss"], kl=metrics.get("kl"),
                          grad_norm=metrics["grad_norm"], reward=metrics["reward"])
        return metrics

    trainer.step = recorded_step
    finished = False
    try:
        trainer.train()
        if distributed.is_main():
            Path(f"{out}.record.json").write_text(json.dumps(
                {"steps": record, "syncs": trainer.engine.syncs, "greedy": greedy,
                 "world": distributed.world_size()}))
        finished = True
    finally:
        left_group = distributed.shutdown(wait_for_peers=finished)
    if left_group:
        distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1:])
