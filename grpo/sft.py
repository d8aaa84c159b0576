"""Supervised fine-tuning on (prompt, completion) pairs: DeepSeek-R1's cold start.

The loss is the mean token cross-entropy over completion tokens only (the prompt is
context), each completion ending with EOS so the model learns to stop.

    python -m grpo.sft --model DIR --data pairs.jsonl --steps 300 --output-dir out/
    python -m grpo.sft --task arithmetic --steps 300 --output-dir out/   # built-in model
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm


def _encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, len(p)


def sft_loss(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Mean cross-entropy of the completion tokens of a batch of pairs (right-padded)."""
    encoded = [_encode(tokenizer, p, c) for p, c in pairs]
    width = max(len(ids) for ids, _ in encoded)
    device = next(model.parameters()).device
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (row, n_prompt) in enumerate(encoded):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, n_prompt:len(row)] = torch.tensor(row[n_prompt:])
        mask[i, :len(row)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   use_cache=False).logits[:, :-1]  # (B, L-1, V)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                             labels[:, 1:].flatten().to(device))


def run_sft(model, tokenizer, pairs: Sequence[tuple[str, str]], *, steps: int, lr: float,
            batch_size: int, seed: int = 0, warmup: int = 10,
            show_progress: bool = True) -> float:
    """Train in place for `steps` AdamW steps (cosine decay after warmup) on batches drawn
    from pairs in shuffled epochs. Returns the final batch loss."""
    if not pairs:
        raise ValueError("no (prompt, completion) pairs to train on")
    rng = random.Random(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total = max(steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (step - warmup) /
                                                 max(total - warmup, 1))).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc="cold start", disable=not show_progress, dynamic_ncols=True)
    for _ in bar:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            batch.append(pairs[order.pop()])
        loss = sft_loss(model, tokenizer, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    return loss_value


def main(argv: list[str] | None = None) -> None:
    from models import load_model, make_tiny, save_model

    from . import data as data_mod

    parser = argparse.ArgumentParser(prog="python -m grpo.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="HF model directory (default: built-in tiny)")
    parser.add_argument("--data", default="", help="JSONL with prompt and completion columns")
    parser.add_argument("--task", default="arithmetic", help="built-in task (without --data)")
    parser.add_argument("--template", default=None, help="prompt template (see grpo-train)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=None, help="[1e-5; 3e-3 built-in model]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    path = Path(args.model) if args.model else make_tiny(out.with_name(out.name + "-init"),
                                                         family="qwen2", hidden=128, layers=4,
                                                         seed=args.seed)
    model, tokenizer = load_model(path, dtype=dtype, device=device)
    template = args.template or ("short" if not args.model else "r1zero")
    if args.data:
        examples = data_mod.load_jsonl(args.data)
        missing = [i for i, ex in enumerate(examples) if "completion" not in ex]
        if missing:
            raise ValueError(f"{args.data}: example {missing[0] + 1} has no 'completion'")
        pairs = [(data_mod.format_prompt(ex, template, tokenizer), ex["completion"])
                 for ex in examples]
    else:
        task = data_mod.make_task(args.task)
        stream = data_mod.TrainStream(task, args.seed, exclude=set())
        pairs = [(data_mod.format_prompt(ex, template, tokenizer), task.solution(ex))
                 for ex in stream.next_batch(args.steps * args.batch_size)]
    lr = args.lr or (3e-3 if not args.model else 1e-5)
    loss = run_sft(model, tokenizer, pairs, steps=args.steps, lr=lr,
                   batch_size=args.batch_size, seed=args.seed)
    save_model(model, tokenizer, out)
    print(f"final loss {loss:.4f}; model saved to {out}")


if __name__ == "__main__":
    main()
