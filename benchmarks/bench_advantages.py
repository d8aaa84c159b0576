"""Group-relative advantages from rewards: ours vs the reference (and torch.compile).

    python -m benchmarks.bench_advantages [--scale group|batch|none] [--smoke]

A shape is NxG for rewards (N,) in groups of G, or NxGxR for (N, R) rewards from R reward
functions. GB/s counts the rewards read once and the fp32 advantages written once.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import common

SHAPES = [f"{n}x{g}{r}" for n in (1024, 16384, 131072) for g in (8, 16) for r in ("", "x4")]
SMOKE_SHAPES = ["64x8", "48x16x3"]
PROVIDERS = ["eager", "compile", "ours"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", choices=["group", "batch", "none"], default="group")


def make_inputs(shape: common.Shape, args: argparse.Namespace) -> common.Inputs:
    n, g, *r = shape
    # 0/1 rewards as from an accuracy check: some groups agree (zero std), as in training.
    rewards = torch.randint(0, 2, (n, *r), device=args.device).to(args.dtype)
    weights = torch.rand(*r, device=args.device) if r else None
    return {"rewards": rewards, "group_size": g, "weights": weights}


def builders(args: argparse.Namespace, kernels: Any, ref: Any) -> dict[str, common.Builder]:
    def call(fn: Callable[..., Any]) -> common.Builder:
        def build(inp: common.Inputs) -> Callable[[], Any]:
            return lambda: fn(inp["rewards"], inp["group_size"], weights=inp["weights"],
                              scale=args.scale)

        return build

    return {
        "eager": call(ref.group_advantages_ref),
        "compile": call(common.compiled(ref.group_advantages_ref)),
        "ours": call(kernels.group_advantages),
    }


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__.splitlines()[0], providers=PROVIDERS, shapes=SHAPES,
                             smoke_shapes=SMOKE_SHAPES, dtype="fp32",
                             add_arguments=add_arguments, argv=argv)
    kernels, ref = common.import_kernels()
    common.run_bench(
        "advantages", args, lambda shape: make_inputs(shape, args), builders(args, kernels, ref),
        bytes_fn=lambda inp: (inp["rewards"].numel() * inp["rewards"].element_size()
                              + inp["rewards"].shape[0] * 4),
        extra={"scale": args.scale},
    )


if __name__ == "__main__":
    main()
