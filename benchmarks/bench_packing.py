"""Padded against packed training forwards (grpo/packing.py) on one GRPO batch: tokens the
model processes per step and the time of the step's training passes (old-policy log-probs,
then forward + backward over the micro-batches), same batch, same weights.

    python -m benchmarks.bench_packing --lengths demo       # the embedded default's rollouts
    python -m benchmarks.bench_packing --lengths lognormal  # a long-tailed length mix

demo: the built-in model after its cold start samples 16 prompts x 8 completions (max 64
tokens) with the embedded default's settings. lognormal: the same model and prompts, with
completion lengths drawn from a log-normal (median --median tokens, sigma --sigma) capped at
--max-completion-length, random tokens (the cost does not depend on which).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import common
from grpo.build import build_trainer
from grpo.config import parse_config
from grpo.packing import sequence_lengths


def _lognormal_batch(batch, args, pad_id: int, vocab: int):
    r = batch.rollout
    gen = torch.Generator().manual_seed(args.seed)
    n = len(r)
    lengths = common.lognormal_lengths(
        n, median=args.median, sigma=args.sigma, cap=args.max_completion_length, generator=gen
    )
    width = int(lengths.max())
    ids = torch.randint(3, vocab, (n, width), generator=gen)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    r.completion_ids = torch.where(mask.bool(), ids, pad_id)
    r.completion_mask = mask
    r.truncated = lengths == args.max_completion_length
    r.sampler_logp = torch.zeros(n, width)
    r.routing = None
    return batch


def _time(trainer, batch, packing: bool, repeats: int) -> list[float]:
    fwd, rollout = trainer.forward, batch.rollout
    fwd.packing = packing
    mask = rollout.completion_mask.float()
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        old = trainer.policy_logprobs(trainer.model, rollout)
        trainer.accumulate_gradients(batch, mask, old, None)
        times.append(time.perf_counter() - start)
        trainer.model.zero_grad(set_to_none=True)
    trainer.model.load_state_dict(state)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", choices=("demo", "lognormal"), default="demo")
    parser.add_argument("--median", type=int, default=40)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--max-completion-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/bench-packing")
    args = parser.parse_args()
    cfg = parse_config(["--output-dir", args.output_dir, "--overwrite", "--no-progress"])
    trainer = build_trainer(cfg)
    trainer._cold_start()
    batch = trainer.sample_batch()
    if args.lengths == "lognormal":
        vocab = trainer.model.get_output_embeddings().weight.shape[0]
        batch = _lognormal_batch(batch, args, trainer.tokenizer.pad_token_id, vocab)
    r = batch.rollout
    fed = int(sequence_lengths(r)[2].sum())
    rows, mb = len(r), trainer.forward.micro_batch_size
    padded = sum(
        min(mb, rows - i) * (r.prompt_ids.shape[1] + r.completion_ids.shape[1])
        for i in range(0, rows, mb)
    )
    lengths = r.completion_mask.sum(-1).float()
    print(
        f"{args.lengths}: {rows} rows, completion length mean {lengths.mean():.1f} max "
        f"{int(lengths.max())}, prompt width {r.prompt_ids.shape[1]}, micro-batch {mb} rows"
    )
    print(f"tokens per forward pass: padded {padded}, packed {fed} ({fed / padded:.1%})")
    for packing in (False, True, False, True):  # interleaved: the machine's load drifts
        times = _time(trainer, batch, packing, args.repeats)
        name = "packed" if packing else "padded"
        print(
            f"{name}: median {statistics.median(times):.3f} s (min {min(times):.3f}) per "
            f"old-logp + update pass, {args.repeats} repeats, {torch.get_num_threads()} threads"
        )


if __name__ == "__main__":
    main()
