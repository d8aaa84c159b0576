"""Forward + backward of the GRPO loss: ours vs the PyTorch reference, torch.compile and Liger.

    python -m benchmarks.bench_grpo_loss [--importance-level sequence] [--beta 0]
        [--bias-correction-kl on,off] [--smoke]

Effective GB/s counts the logits read once plus the gradient written once: the least any
implementation must move, so the number is comparable across providers and with the
copy-bandwidth floor, the "clone" provider (a clone of the logits: one read, one write).
(Liger also sweeps one ignored extra position per sequence, see common.pad_for_liger; it is
not counted.)

--bias-correction-kl runs every provider once per value of use_bias_correction_kl (TRL's
DeepSeek-V3.2 KL weighting, on by default in TRL and in GRPOLossConfig); each row records its
value in the bias_correction_kl column (on/off). It changes nothing when --beta is 0.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import common

SHAPES = ["8x1024x151936", "16x1024x151936", "32x512x32000"]
SMOKE_SHAPES = ["2x8x1000", "3x5x777"]
PROVIDERS = ["clone", "eager", "compile", "ours", "ours_inplace", "liger", "liger_inplace"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--importance-level", choices=["token", "sequence"], default="token")
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient")
    parser.add_argument(
        "--inplace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the *_inplace providers (gradient written into logits)",
    )
    parser.add_argument(
        "--bias-correction-kl",
        type=_on_off_list,
        default=[True],
        metavar="on,off",
        help="use_bias_correction_kl values to run, comma list (default on)",
    )


def _on_off_list(text: str) -> list[bool]:
    values = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if not words or any(w not in values for w in words):
        raise argparse.ArgumentTypeError(f"expected a comma list of on/off, got {text!r}")
    return list(dict.fromkeys(values[w] for w in words))  # in order, without repeats


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


def make_inputs(shape: common.Shape, args: argparse.Namespace, ref: Any) -> common.Inputs:
    b, t, v = shape
    dev = args.device
    logits = (torch.randn(b, t, v, device=dev, dtype=args.dtype) * 2).requires_grad_()
    ids = torch.randint(v, (b, t), device=dev)
    # Ragged completions: up to a quarter of each row is padding, as in a real batch.
    lengths = t - torch.randint(0, t // 4 + 1, (b,), device=dev)
    mask = (torch.arange(t, device=dev) < lengths[:, None]).float()
    # One sequence at a time: the reference holds fp32 copies of its input's logits.
    logp = torch.cat([ref.token_logprobs_ref(logits[i : i + 1], ids[i : i + 1]) for i in range(b)])
    return {
        "logits": logits,
        "ids": ids,
        "advantages": torch.randn(b, device=dev),
        "mask": mask,
        # Off-policy by a little, so that ratios differ from 1 and some tokens get clipped.
        "old_logp": logp + 0.05 * torch.randn_like(logp),
        "ref_logp": logp + 0.05 * torch.randn_like(logp) if args.beta else None,
    }


def loss_and_grad(
    loss_fn: Callable[..., Any], logits: torch.Tensor, inp: common.Inputs, **kwargs: Any
) -> Callable[[], Any]:
    """A timed call: the loss, then its gradient wrt logits.

    autograd.grad rather than backward(): nothing accumulates into logits.grad, which would
    add a read-modify-write of the whole gradient to every call.
    """

    def fn() -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_fn(
            logits,
            inp["ids"],
            inp["advantages"],
            inp["mask"],
            inp["old_logp"],
            inp["ref_logp"],
            **kwargs,
        )[0]
        (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad

    return fn


def builders(
    args: argparse.Namespace, kernels: Any, ref: Any, bias_correction_kl: bool = True
) -> dict[str, common.Builder]:
    # The keyword options of GRPOLossConfig (kernels and reference take them alike).
    ours_kw = {
        "beta": args.beta,
        "importance_level": args.importance_level,
        "use_bias_correction_kl": bias_correction_kl,
    }

    def ours(inplace: bool) -> common.Builder:
        def build(inp: common.Inputs) -> Callable[[], Any]:
            if not inplace:
                return loss_and_grad(kernels.grpo_loss, inp["logits"], inp, **ours_kw)
            # inplace=True overwrites the logits with their gradient, so every timed call
            # after the first reads the previous call's gradient. The values do not change
            # the work done, only the loss, so that is fine for timing as long as they stay
            # finite (run_bench checks after timing). A private copy, filled like the
            # shared logits, keeps the other providers' inputs intact.
            logits = inp["logits"].detach().clone().requires_grad_()
            return loss_and_grad(kernels.grpo_loss, logits, inp, inplace=True, **ours_kw)

        return build

    def liger(inplace: bool) -> common.Builder:
        def build(inp: common.Inputs) -> Callable[[], Any]:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            # Same problem as ours: temperature 1, symmetric clip 0.2, grpo aggregation and
            # the same use_bias_correction_kl (Liger defaults to temperature 0.9, eps_high
            # 0.4, dapo and no bias correction). With reduce=True it returns
            # (loss, [kl_mean, clip_ratio]); in-place reuse as for ours_inplace.
            def liger_loss(
                logits: torch.Tensor,
                ids: torch.Tensor,
                adv: torch.Tensor,
                mask: torch.Tensor,
                old: torch.Tensor,
                ref_logp: Any,
            ) -> Any:
                return triton_grpo_loss(
                    logits,
                    old,
                    ref_logp,
                    ids,
                    adv,
                    mask,
                    temperature=1.0,
                    beta=args.beta,
                    eps_low=0.2,
                    eps_high=0.2,
                    inplace=inplace,
                    loss_type="grpo",
                    importance_sampling_level=args.importance_level,
                    use_bias_correction_kl=bias_correction_kl,
                    reduce=True,
                )

            padded = common.pad_for_liger(inp["logits"]).requires_grad_()
            return loss_and_grad(liger_loss, padded, inp)

        return build

    return {
        # The floor: one read of the logits and one write of a tensor of their size.
        "clone": lambda inp: lambda: inp["logits"].detach().clone(),
        "eager": lambda inp: loss_and_grad(ref.grpo_loss_ref, inp["logits"], inp, **ours_kw),
        "compile": lambda inp: loss_and_grad(
            common.compiled(ref.grpo_loss_ref), inp["logits"], inp, **ours_kw
        ),
        "ours": ours(inplace=False),
        "ours_inplace": ours(inplace=True),
        "liger": liger(inplace=False),
        "liger_inplace": liger(inplace=True),
    }


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(
        __doc__.splitlines()[0],
        providers=PROVIDERS,
        shapes=SHAPES,
        smoke_shapes=SMOKE_SHAPES,
        add_arguments=add_arguments,
        argv=argv,
    )
    if not args.inplace:
        args.providers = [p for p in args.providers if not p.endswith("_inplace")]
    kernels, ref = common.import_kernels()
    for bias_correction_kl in args.bias_correction_kl:
        common.run_bench(
            "grpo_loss",
            args,
            lambda shape: make_inputs(shape, args, ref),
            builders(args, kernels, ref, bias_correction_kl),
            bytes_fn=lambda inp: 2 * inp["logits"].numel() * inp["logits"].element_size(),
            extra={
                "importance_level": args.importance_level,
                "beta": args.beta,
                "bias_correction_kl": on_off(bias_correction_kl),
            },
        )


if __name__ == "__main__":
    main()
