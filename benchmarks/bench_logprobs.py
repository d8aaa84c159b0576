"""Per-token log-probs without grad (old/ref policy pass): ours vs reference, compile, Liger.

    python -m benchmarks.bench_logprobs [--entropy] [--smoke]

GB/s counts one read of the logits, the least this op must move. Floors: "read" (one read of
the logits: their max over V) and "clone" (one read and one write: half its time is one read at
the copy bandwidth).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import common

SHAPES = ["8x1024x151936", "16x1024x151936", "32x512x32000"]
SMOKE_SHAPES = ["2x8x1000", "3x5x777"]
PROVIDERS = ["read", "clone", "eager", "compile", "ours", "liger"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entropy", action="store_true", help="also return per-token entropy")


def make_inputs(shape: common.Shape, args: argparse.Namespace) -> common.Inputs:
    b, t, v = shape
    logits = torch.randn(b, t, v, device=args.device, dtype=args.dtype) * 2
    return {"logits": logits, "ids": torch.randint(v, (b, t), device=args.device)}


def builders(args: argparse.Namespace, kernels: Any, ref: Any) -> dict[str, common.Builder]:
    def call(fn: Callable[..., Any]) -> common.Builder:
        def build(inp: common.Inputs) -> Callable[[], Any]:
            return lambda: fn(inp["logits"], inp["ids"], return_entropy=args.entropy)

        return build

    def liger(inp: common.Inputs) -> Callable[[], Any]:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

        if args.entropy:
            raise NotImplementedError("Liger's fused_selective_log_softmax has no entropy")
        padded = common.pad_for_liger(inp["logits"])
        # No mask: every position is computed, as ours does.
        return lambda: fused_selective_log_softmax(padded, inp["ids"], temperature=1.0)

    return {
        "read": lambda inp: lambda: torch.amax(inp["logits"], dim=-1),
        "clone": lambda inp: lambda: inp["logits"].clone(),
        "eager": call(ref.token_logprobs_ref),
        "compile": call(common.compiled(ref.token_logprobs_ref)),
        "ours": call(kernels.token_logprobs),
        "liger": liger,
    }


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__.splitlines()[0], providers=PROVIDERS, shapes=SHAPES,
                             smoke_shapes=SMOKE_SHAPES, add_arguments=add_arguments, argv=argv)
    kernels, ref = common.import_kernels()
    # Inference-mode work: no autograd bookkeeping in any provider.
    with torch.no_grad():
        common.run_bench(
            "logprobs", args, lambda shape: make_inputs(shape, args), builders(args, kernels, ref),
            bytes_fn=lambda inp: inp["logits"].numel() * inp["logits"].element_size(),
            extra={"entropy": args.entropy},
        )


if __name__ == "__main__":
    main()
