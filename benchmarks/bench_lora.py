"""LoRA against full fine-tuning: trainable parameters, optimizer state, reference model and
GRPO step time (grpo.lora, `grpo-train --lora-rank R`).

    python -m benchmarks.bench_lora [--steps 4] [--ranks 8 16] [--smoke]

Measured, on whatever device runs it, for the tiny models: the demo's Qwen2 (0.62 M
parameters) and a tiny Qwen3-MoE. Each configuration builds a trainer (beta 0.04, so a
reference is in play: a second model for full fine-tuning, the adapters-off policy for LoRA),
runs one warm-up GRPO step and then --steps timed steps (the demo's batch: 16 prompts x 8
completions of up to 64 tokens), and reports the trainable parameters, the AdamW state
bytes after the steps, the reference model's bytes and the mean CPU time of a step (this
process's, all threads: on a machine shared with other jobs wall time means little), with
its update phase (reference log-probs, forward+backward, optimizer step: all but sampling).

Computed, not measured (meta device, no memory): the same counts for Qwen2.5-7B's
architecture with rank 16 on every linear projection, in bf16 with fp32 adapters, as the
trainer keeps them on one GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from grpo import lora as lora_mod
from grpo.build import build_trainer
from grpo.config import DEMO_MODEL, GRPOConfig
from grpo.models import make_tiny

MODELS = {
    "demo qwen2 (0.62 M)": dict(kind="dense", **DEMO_MODEL),
    "tiny qwen3-moe": dict(kind="moe", family="qwen3_moe", hidden=64, layers=2),
}
# Qwen2.5-7B's config.json (the values that set the parameter count).
QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def measure(model_dir: Path, run_dir: Path, rank: int, steps: int, smoke: bool) -> dict:
    """One configuration (rank 0: full fine-tuning): its counts and step times."""
    values = dict(
        model=str(model_dir),
        output_dir=str(run_dir),
        template="short",
        sft_steps=0,
        steps=steps + 1,
        beta=0.04,
        prompts_per_step=2 if smoke else 16,
        num_generations=8,
        max_completion_length=8 if smoke else 64,
        micro_batch_size=64,
        temperature=0.7,
        learning_rate=5e-4 if rank else 5e-5,
        dynamic_sampling=False,
        progress=False,
        lora_rank=rank,
    )
    trainer = build_trainer(GRPOConfig.from_flat(values))
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    reference_bytes = 0
    if rank == 0:
        trainer.ref_model = trainer.load_reference()
        reference_bytes = sum(p.numel() * p.element_size() for p in trainer.ref_model.parameters())
    # CPU time of this process (both threads), which a machine shared with other jobs
    # inflates far less than wall time; the sampling's share is measured apart.
    sampling = [0.0]
    sample = trainer.sample_batch

    def timed_sample():
        start = time.process_time()
        try:
            return sample()
        finally:
            sampling[0] += time.process_time() - start

    trainer.sample_batch = timed_sample
    times, updates = [], []
    for i in range(steps + 1):
        start, sampling[0] = time.process_time(), 0.0
        trainer.step()
        if i:  # the first step warms up
            times.append(time.process_time() - start)
            updates.append(times[-1] - sampling[0])
    return {
        "rank": rank,
        "trainable": trainable,
        "total": total,
        "optimizer_bytes": _state_bytes(trainer.optimizer),
        "reference_bytes": reference_bytes,
        "step_s": sum(times) / len(times),
        "update_s": sum(updates) / len(updates),
    }


def computed_7b(rank: int = 16) -> dict:
    """Counts for Qwen2.5-7B's architecture (meta device): full fine-tuning in bf16 (AdamW's
    two moments in the parameters' dtype) against LoRA with fp32 adapters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", **QWEN25_7B)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    settings = lora_mod.LoRASettings.create(rank)
    lora_mod.apply_lora(model, settings, base="qwen2.5-7b")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "total": total,
        "weight_bytes": weight_bytes,
        "full_optimizer_bytes": 2 * weight_bytes,
        "lora_trainable": trainable,
        "lora_optimizer_bytes": 2 * 4 * trainable,
        "rank": rank,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed GRPO steps per run")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--smoke", action="store_true", help="tiny batches, one step")
    args = parser.parse_args(argv)
    steps = 1 if args.smoke else args.steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in MODELS.items():
            model_dir = make_tiny(Path(tmp) / name.split()[1], seed=0, **spec)
            for rank in [0, *args.ranks]:
                run_dir = Path(tmp) / f"run-{name.split()[1]}-{rank}"
                rows.append({"model": name, **measure(model_dir, run_dir, rank, steps, args.smoke)})
    print(
        f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, "
        f"threads: {torch.get_num_threads()}, timed steps: {steps}"
    )
    print(
        "| model | training | trainable params | optimizer state | reference model | "
        "step (CPU s) | of which update |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kind = "full" if r["rank"] == 0 else f"LoRA r={r['rank']}"
        share = f" ({100 * r['trainable'] / r['total']:.1f} %)" if r["rank"] else ""
        reference = (
            f"{r['reference_bytes'] / 2**10:.0f} KiB" if r["rank"] == 0 else "0 (adapters off)"
        )
        print(
            f"| {r['model']} | {kind} | {r['trainable']:,}{share} | "
            f"{r['optimizer_bytes'] / 2**10:.0f} KiB | {reference} | {r['step_s']:.2f} s | "
            f"{r['update_s']:.2f} s |"
        )
    big = computed_7b()
    gib = 2**30
    print(
        f"\nQwen2.5-7B (computed): {big['total'] / 1e9:.2f} B parameters, weights "
        f"{big['weight_bytes'] / gib:.1f} GiB bf16 (= the reference model LoRA saves); "
        f"AdamW state full {big['full_optimizer_bytes'] / gib:.1f} GiB (bf16 moments) vs "
        f"LoRA r={big['rank']} {big['lora_trainable'] / 1e6:.1f} M trainable, "
        f"{big['lora_optimizer_bytes'] / 2**20:.0f} MiB (fp32 moments)"
    )
    return rows


if __name__ == "__main__":
    main()
