"""Supervised fine-tuning on (prompt, completion) pairs: DeepSeek-R1's cold start, and
distillation into a student (the command is grpo-sft, grpo/cli/sft.py).

The loss is the mean token cross-entropy over completion tokens only (the prompt is
context), each completion ending with EOS so the model learns to stop: `sft_loss`, or
`sft_loss_packed`, which concatenates short examples into rows of up to max_length tokens
(`pack`), each attending only to itself (positions restarting per example, from which
transformers builds the block-diagonal causal mask, as for grpo-train's packing), so the
loss is that of the unpacked batch with less padding. `run_sft` trains with either;
grpo-train's cold start calls it too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from tqdm import tqdm


def encode_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, len(p)


def sft_loss(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Mean cross-entropy of the completion tokens of a batch of pairs (right-padded)."""
    encoded = [encode_pair(tokenizer, p, c) for p, c in pairs]
    width = max(len(ids) for ids, _ in encoded)
    device = next(model.parameters()).device
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (row, n_prompt) in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, n_prompt : len(row)] = torch.tensor(row[n_prompt:])
        mask[i, : len(row)] = 1
    logits = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
    ).logits[:, :-1]  # (B, L-1, V)
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels[:, 1:].flatten().to(device)
    )


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


def sft_loss_packed(
    model, tokenizer, pairs: Sequence[tuple[str, str]], max_length: int
) -> torch.Tensor:
    """sft_loss with the pairs packed into rows of up to max_length tokens. Each example keeps
    its own positions (from 0) and attention block, so the value equals sft_loss's."""
    encoded = [encode_pair(tokenizer, p, c) for p, c in pairs]
    rows = pack([len(ids) for ids, _ in encoded], max_length)
    width = max(sum(len(encoded[i][0]) for i in row) for row in rows)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            tokens, n_prompt = encoded[i]
            end = start + len(tokens)
            ids[r, start:end] = torch.tensor(tokens)
            # The shift below scores position t's logits against token t+1; an example's
            # first token would be scored against the previous example's last logits, so it
            # gets no label (unpacked, nothing predicts position 0 either).
            labels[r, start + n_prompt : end] = torch.tensor(tokens[n_prompt:])
            labels[r, start] = -100
            positions[r, start:end] = torch.arange(len(tokens))
            start = end
    # No attention mask: transformers reads the example boundaries from the position ids
    # (a position that does not follow its predecessor starts a sequence; each padding token,
    # at position 0, is one of its own), the mechanism grpo-train's packing uses
    # (grpo/packing.py): flash-attention's varlen kernel, or a block-diagonal causal mask.
    inputs = dict(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False)
    logits = model(**inputs).logits[:, :-1]  # (rows, L-1, V)
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels[:, 1:].flatten().to(device)
    )


def run_sft(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    warmup: int = 10,
    show_progress: bool = True,
    packing: int | None = None,
) -> float:
    """Train in place for `steps` AdamW steps (cosine decay after warmup) on batches drawn
    from pairs in shuffled epochs. Returns the final batch loss. packing=N packs each batch
    into rows of up to N tokens (same examples per step, same loss, less padding)."""
    if not pairs:
        raise ValueError("no (prompt, completion) pairs to train on")
    if packing is not None and packing < 1:
        raise ValueError(f"packing length must be >= 1, got {packing}")
    rng = random.Random(seed)
    order: list[int] = []
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = max(steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (
            1 + torch.cos(torch.tensor(torch.pi * (step - warmup) / max(total - warmup, 1))).item()
        )

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
        loss = (
            sft_loss(model, tokenizer, batch)
            if packing is None
            else sft_loss_packed(model, tokenizer, batch, packing)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    return loss_value
