"""MoE experts (routed SwiGLU), forward + backward: ours vs the eager loop, transformers' grouped_mm
experts and torch._grouped_mm.

    python -m benchmarks.bench_moe [--smoke]

"hf_grouped_mm" is transformers' own "grouped_mm" experts implementation (the one
`load_model(moe_backend="auto")` picks on a GPU) on a Qwen3-MoE experts module holding the same
weights; "grouped_mm" the same maths written here on torch._grouped_mm. Shapes are
tokens x H x I x E x topk. TFLOP/s counts the matmuls of forward + backward,
3 x the forward's 2 * N * k * (H * 2I + I * H); ms is one forward and one backward giving
the gradients of hidden, gate_up, down and the routing weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks import common

# Qwen3-30B-A3B at two batch sizes, then OLMoE-1B-7B.
SHAPES = ["16384x2048x768x128x8", "4096x2048x768x128x8", "16384x2048x1024x64x8"]
SMOKE_SHAPES = ["13x24x20x5x2", "7x32x16x4x3"]
PROVIDERS = ["eager", "hf_grouped_mm", "grouped_mm", "ours"]


def make_inputs(shape: common.Shape, device: str, dtype: torch.dtype) -> common.Inputs:
    n, h, inter, e, k = shape
    ids = torch.rand(n, e, device=device).topk(k, dim=-1).indices  # distinct experts per token

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).requires_grad_()

    return {
        "hidden": leaf(torch.randn(n, h, device=device)),
        "gate_up": leaf(torch.randn(e, 2 * inter, h, device=device) / h**0.5),
        "down": leaf(torch.randn(e, h, inter, device=device) / inter**0.5),
        "topk_ids": ids,
        "topk_weights": leaf(torch.softmax(torch.randn(n, k, device=device), -1)),
        "grad": torch.randn(n, h, device=device, dtype=dtype),
    }


def grouped_mm_experts(hidden, gate_up, down, topk_ids, topk_weights):
    """The same op from torch's grouped GEMM: gather the rows sorted by expert, two grouped
    matmuls, weight, scatter back to pair order and sum the k slots."""
    n, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    x = hidden[order // k]  # (P, H) sorted by expert
    pre = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offs)  # (P, 2I)
    gate, up = pre.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, down.transpose(1, 2), offs=offs)
    y = y * topk_weights.reshape(-1)[order, None].to(y.dtype)
    pairs = torch.empty_like(y).index_copy(0, order, y)  # back to pair order
    return pairs.view(n, k, -1).float().sum(1).to(hidden.dtype)


def hf_grouped_mm(inp: common.Inputs) -> Callable[[], Any]:
    """transformers' grouped_mm experts forward on a Qwen3MoeExperts module built on the meta
    device, its weights replaced by (views of) the benchmark's."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    e, two_i, h = inp["gate_up"].shape
    config = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=two_i // 2, num_experts=e,
                            hidden_act="silu")
    config._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        module = Qwen3MoeExperts(config)
    module.gate_up_proj = torch.nn.Parameter(inp["gate_up"].detach())
    module.down_proj = torch.nn.Parameter(inp["down"].detach())
    leaves = [inp["hidden"], module.gate_up_proj, module.down_proj, inp["topk_weights"]]

    def step() -> Any:
        out = module(inp["hidden"], inp["topk_ids"], inp["topk_weights"])
        return out.detach(), torch.autograd.grad(out, leaves, inp["grad"])

    return step


def builders(kernels: Any, ref: Any) -> dict[str, common.Builder]:
    def call(fn: Callable[..., Any]) -> common.Builder:
        def build(inp: common.Inputs) -> Callable[[], Any]:
            leaves = [inp[k] for k in ("hidden", "gate_up", "down", "topk_weights")]

            def step() -> Any:
                out = fn(inp["hidden"], inp["gate_up"], inp["down"], inp["topk_ids"],
                         inp["topk_weights"])
                grads = torch.autograd.grad(out, leaves, inp["grad"])
                return out.detach(), grads

            return step

        return build

    return {
        "eager": call(ref.moe_experts_ref),
        "hf_grouped_mm": hf_grouped_mm,
        "grouped_mm": call(grouped_mm_experts),
        "ours": call(kernels.moe_experts),
    }


def flops(inp: common.Inputs) -> float:
    n, k = inp["topk_ids"].shape
    e, two_i, h = inp["gate_up"].shape
    return 3 * 2 * n * k * (h * two_i + (two_i // 2) * h)


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__.splitlines()[0], providers=PROVIDERS, shapes=SHAPES,
                             smoke_shapes=SMOKE_SHAPES, argv=argv)
    if "grouped_mm" in args.providers and not (
        args.device == "cuda" and hasattr(torch, "_grouped_mm")
    ):
        print("note: grouped_mm skipped: needs torch._grouped_mm on a CUDA GPU", flush=True)
        args.providers.remove("grouped_mm")
    kernels, ref = common.import_kernels()
    common.run_bench(
        "moe", args, lambda shape: make_inputs(shape, args.device, args.dtype),
        builders(kernels, ref), flops_fn=flops,
    )


if __name__ == "__main__":
    main()
