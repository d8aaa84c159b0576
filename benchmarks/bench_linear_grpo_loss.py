"""GRPO loss from hidden states, forward+backward: materialised logits vs the fused lm_head.

    python -m benchmarks.bench_linear_grpo_loss [--beta 0.04] [--smoke]

Shapes are NxHxV (tokens x hidden x vocabulary). TFLOP/s counts the three GEMMs every
provider needs (h @ W^T and its two backward GEMMs: 6 N H V), so the figures compare
directly with the "gemms" provider (those three GEMMs alone, with a fixed d logits), the floor
the fused loss should approach. "liger" is Liger-Kernel's chunked LigerFusedLinearGRPOLoss on
the same problem (one sequence per chunk, its default; eager unless --liger-compiled).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import common

SHAPES = ["8192x896x151936", "8192x3584x151936"]
SMOKE_SHAPES = ["12x24x257"]
PROVIDERS = ["gemms", "eager", "materialised_ours", "fused_ours", "liger"]
SEQ = 1024  # tokens per sequence: N = B * SEQ (smoke: one sequence per 4 tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient")
    parser.add_argument("--liger-compiled", action="store_true",
                        help="Liger's torch.compile'd chunks (its default; minutes to compile)")


def make_inputs(shape: common.Shape, args: argparse.Namespace) -> common.Inputs:
    n, h, v = shape
    seq = SEQ if n % SEQ == 0 else 4
    b, t = n // seq, seq
    dev, dt = args.device, args.dtype
    hidden = torch.randn(b, t, h, device=dev, dtype=dt).requires_grad_()
    weight = (torch.randn(v, h, device=dev, dtype=dt) / h**0.5).requires_grad_()
    ids = torch.randint(v, (b, t), device=dev)
    zeros = torch.zeros(b, t, device=dev)
    return {"hidden": hidden, "weight": weight, "ids": ids,
            "advantages": torch.randn(b, device=dev), "mask": torch.ones(b, t, device=dev),
            "old_logp": zeros - 5.0, "ref_logp": zeros - 5.0 if args.beta else None}


def builders(args: argparse.Namespace, kernels: Any, ref: Any) -> dict[str, common.Builder]:
    def loss_args(inp: common.Inputs) -> tuple:
        return (inp["ids"], inp["advantages"], inp["mask"], inp["old_logp"], inp["ref_logp"])

    def grads(fn: Callable[[common.Inputs], torch.Tensor]) -> common.Builder:
        def build(inp: common.Inputs) -> Callable[[], Any]:
            def call() -> Any:
                loss = fn(inp)
                return torch.autograd.grad(loss, (inp["hidden"], inp["weight"]))
            return call
        return build

    def materialised(loss_fn: Callable[..., Any]) -> Callable[[common.Inputs], torch.Tensor]:
        return lambda inp: loss_fn(inp["hidden"] @ inp["weight"].t(), *loss_args(inp),
                                   beta=args.beta)[0]

    def gemms(inp: common.Inputs) -> Callable[[], Any]:
        # logits = h W^T, then d h = g W and d W = g^T h for a fixed g: the 6 N H V floor.
        h, w = inp["hidden"], inp["weight"]
        g = torch.randn(*h.shape[:-1], w.shape[0], device=h.device, dtype=h.dtype)
        return lambda: torch.autograd.grad(h @ w.t(), (h, w), g)

    def liger(inp: common.Inputs) -> Callable[[], Any]:
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

        # Our defaults on its side: grpo aggregation, TRL's bias-corrected KL (Liger's
        # default is dapo without it).
        module = LigerFusedLinearGRPOLoss(
            beta=args.beta, compiled=args.liger_compiled, use_ref_model=args.beta != 0,
            loss_type="grpo", use_bias_correction_kl=True)

        def call() -> Any:
            loss, _ = module(inp["hidden"], inp["weight"], inp["ids"], inp["mask"],
                             inp["advantages"], ref_per_token_logps=inp["ref_logp"],
                             old_per_token_logps=inp["old_logp"])
            return torch.autograd.grad(loss, (inp["hidden"], inp["weight"]))

        return call

    return {
        "gemms": gemms,
        "eager": grads(materialised(ref.grpo_loss_ref)),
        "materialised_ours": grads(materialised(kernels.grpo_loss)),
        "fused_ours": grads(lambda inp: kernels.linear_grpo_loss(
            inp["hidden"], inp["weight"], *loss_args(inp), beta=args.beta)[0]),
        "liger": liger,
    }


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__.splitlines()[0], providers=PROVIDERS, shapes=SHAPES,
                             smoke_shapes=SMOKE_SHAPES, add_arguments=add_arguments, argv=argv)
    kernels, ref = common.import_kernels()
    common.run_bench(
        "linear_grpo_loss", args, lambda shape: make_inputs(shape, args),
        builders(args, kernels, ref),
        flops_fn=lambda inp: 6.0 * inp["hidden"][..., 0].numel() * inp["hidden"].shape[-1]
        * inp["weight"].shape[0],
        extra={"beta": args.beta},
    )


if __name__ == "__main__":
    main()
