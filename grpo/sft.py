"""Supervised fine-tuning on (prompt, completion) pairs: DeepSeek-R1's cold start.

The loss is the mean token cross-entropy over completion tokens only (the prompt is
context), each completion ending with EOS so the model learns to stop.

    python -m grpo.sft --model DIR --data pairs.jsonl --steps 300 --output-dir out/
    python -m grpo.sft --task arithmetic --steps 300 --output-dir out/   # built-in model

Distillation is this command on a teacher's samples (grpo.sample): `--model` is the student
(any architecture models.load_model reads, dense or MoE), or without it a fresh built-in
tiny model of --tiny-hidden x --tiny-layers. `--packing` concatenates short examples into
rows of up to --max-length tokens, each attending only to itself (block-diagonal causal mask,
positions restarting per example), so the loss is that of the unpacked batch with less
padding.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
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


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of examples per packed row, in order: a row takes examples while their total
    length stays within max_length (an example longer than that gets a row of its own)."""
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if rows and used + n <= max_length:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = n
    return rows


def _block_causal_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask: token q sees token k iff k <= q in the same example.
    Padding (segment -1) sees only itself, which keeps its softmax finite; it has no label."""
    same = segments[:, :, None] == segments[:, None, :]
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (same & causal & (segments >= 0)[:, :, None]) | torch.eye(length, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def sft_loss_packed(model, tokenizer, pairs: Sequence[tuple[str, str]],
                    max_length: int) -> torch.Tensor:
    """sft_loss with the pairs packed into rows of up to max_length tokens. Each example keeps
    its own positions (from 0) and attention block, so the value equals sft_loss's."""
    encoded = [_encode(tokenizer, p, c) for p, c in pairs]
    rows = pack([len(ids) for ids, _ in encoded], max_length)
    width = max(sum(len(encoded[i][0]) for i in row) for row in rows)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            tokens, n_prompt = encoded[i]
            end = start + len(tokens)
            ids[r, start:end] = torch.tensor(tokens)
            # The shift below scores position t's logits against token t+1; an example's
            # first token would be scored against the previous example's last logits, so it
            # gets no label (unpacked, nothing predicts position 0 either).
            labels[r, start + n_prompt:end] = torch.tensor(tokens[n_prompt:])
            labels[r, start] = -100
            positions[r, start:end] = torch.arange(len(tokens))
            segments[r, start:end] = i
            start = end
    inputs = dict(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False)
    if not model.config._attn_implementation.startswith("flash"):
        dtype = next(model.parameters()).dtype
        inputs["attention_mask"] = _block_causal_mask(segments, dtype).to(device)
    # else flash-attention: transformers reads the example boundaries from the position ids.
    logits = model(**inputs).logits[:, :-1]  # (rows, L-1, V)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                             labels[:, 1:].flatten().to(device))


def run_sft(model, tokenizer, pairs: Sequence[tuple[str, str]], *, steps: int, lr: float,
            batch_size: int, seed: int = 0, warmup: int = 10,
            show_progress: bool = True, packing: int | None = None) -> float:
    """Train in place for `steps` AdamW steps (cosine decay after warmup) on batches drawn
    from pairs in shuffled epochs. Returns the final batch loss. packing=N packs each batch
    into rows of up to N tokens (same examples per step, same loss, less padding)."""
    if not pairs:
        raise ValueError("no (prompt, completion) pairs to train on")
    if packing is not None and packing < 1:
        raise ValueError(f"packing length must be >= 1, got {packing}")
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
        loss = sft_loss(model, tokenizer, batch) if packing is None else \
            sft_loss_packed(model, tokenizer, batch, packing)
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
    from . import tasks as tasks_mod
    from .evaluation import resolve_template

    parser = argparse.ArgumentParser(prog="python -m grpo.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="HF model directory (default: built-in tiny)")
    parser.add_argument("--tiny-hidden", type=int, default=128,
                        help="without --model: hidden size of the fresh tiny Qwen2")
    parser.add_argument("--tiny-layers", type=int, default=4,
                        help="without --model: layers of the fresh tiny Qwen2")
    parser.add_argument("--data", default="", help="JSONL with prompt and completion columns")
    parser.add_argument("--task", default="arithmetic", help="built-in task (without --data)")
    parser.add_argument("--task-args", type=json.loads, default={},
                        help="task options as JSON, e.g. '{\"operators\": \"+\"}'")
    parser.add_argument("--eval-size", type=int, default=200,
                        help="grpo-train's held-out prompts (same --seed) to leave out")
    parser.add_argument("--template", default=None,
                        help="prompt template [short for character tokenizers, else r1zero]")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=None, help="[1e-5; 3e-3 built-in model]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--packing", action="store_true",
                        help="pack short examples into rows of up to --max-length tokens")
    parser.add_argument("--max-length", type=int, default=512, help="packed row length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.model and not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model {args.model!r} is not a directory with a config.json")
    path = Path(args.model) if args.model else make_tiny(out.with_name(out.name + "-init"),
                                                         family="qwen2", hidden=args.tiny_hidden,
                                                         layers=args.tiny_layers,
                                                         seed=args.seed)
    model, tokenizer = load_model(path, dtype=dtype, device=device)
    # The template grpo-train and grpo.eval pick for this tokenizer, so a distilled student
    # is trained on the prompts it will be evaluated on.
    template = resolve_template(args.template, tokenizer)
    if args.data:
        examples = data_mod.load_jsonl(args.data)
        missing = [i for i, ex in enumerate(examples) if "completion" not in ex]
        if missing:
            raise ValueError(f"{args.data}: example {missing[0] + 1} has no 'completion'")
        pairs = [(data_mod.format_prompt(ex, template, tokenizer), ex["completion"])
                 for ex in examples]
    else:
        task = tasks_mod.make_task(args.task, **args.task_args)
        # Never the prompts grpo-train and grpo.eval hold out, so evaluation stays clean.
        _, stream = data_mod.task_splits(task, args.seed, args.eval_size)
        pairs = [(data_mod.format_prompt(ex, template, tokenizer), task.solution(ex))
                 for ex in stream.next_batch(args.steps * args.batch_size)]
    lr = args.lr or (3e-3 if not args.model else 1e-5)
    start = time.perf_counter()
    loss = run_sft(model, tokenizer, pairs, steps=args.steps, lr=lr,
                   batch_size=args.batch_size, seed=args.seed,
                   packing=args.max_length if args.packing else None)
    save_model(model, tokenizer, out)
    print(f"final loss {loss:.4f} after {args.steps} steps on {len(pairs)} examples "
          f"({time.perf_counter() - start:.0f} s); model saved to {out}")


def cli() -> int:
    """The console script `grpo-sft`: main() with bad input reported in one line (exit 2)."""
    try:
        main()
    except ValueError as e:  # bad input: a message, not a traceback
        print(f"grpo.sft: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
