"""Input validation shared by the public ops, and the choice between Triton and reference.

Every check runs before any launch so that bad input fails with a ValueError that names the
problem instead of a wrong answer or a fault inside a kernel. Checks that need the values
(id range, finiteness) are batched into one device->host copy: the one host sync of a call.
`value_checks(False)` (or `validate=False` on a call) skips them, so that a caller that checks
its inputs once (`check_values`, as the trainer does once per step) runs every kernel call
without synchronising the device; shape, dtype and device checks always run (no sync).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping

import torch

from .loss_config import GRPOLossConfig
from .reference import SCALES

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, so it is read once here too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_VALUE_CHECKS = contextvars.ContextVar("kernels_value_checks", default=True)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the value checks of the kernel calls in this block on or off (on by default).

    The value checks (ids inside the vocabulary, finite advantages, log-probs, rewards and
    importance ratios, expert ids in range) read the tensors' values: one host sync per call.
    Off, no call synchronises the device, and bad values give wrong results instead of a
    ValueError: check them once yourself with `check_values`. A call's own `validate=True`
    or `validate=False` overrides this."""
    token = _VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def checking(validate: bool | None) -> bool:
    """Whether a call runs its value checks: its own `validate`, else the value_checks
    context (on by default)."""
    return _VALUE_CHECKS.get() if validate is None else bool(validate)


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors run them only under the interpreter."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def row_config(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for kernels that sweep one vocabulary row per program."""
    if device.type != "cuda":
        return min(next_pow2(vocab), 1024), 4  # interpreter: few, wide numpy steps
    block = min(next_pow2(vocab), 4096)
    return block, 8 if block >= 4096 else 4


def check_logits_ids(logits: torch.Tensor, ids: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"{name} must be a (B, T, V) tensor, got shape {shape}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.shape[-1] < 1 or logits.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride on the vocabulary dim, got strides "
            f"{tuple(logits.stride())}; call .contiguous() first"
        )
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != tuple(logits.shape[:2]):
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids)
        raise ValueError(f"ids must have shape (B, T) = {tuple(logits.shape[:2])}, got {shape}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    if ids.device != logits.device:
        raise ValueError(f"ids are on {ids.device} but {name} on {logits.device}")


def check_bt(t: torch.Tensor | None, name: str, like: torch.Tensor) -> None:
    """A (B, T) per-token tensor (mask, old_logp, ref_logp) on logits' device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(like.shape[:2]):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
        raise ValueError(f"{name} must have shape (B, T) = {tuple(like.shape[:2])}, got {shape}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but logits on {like.device}")


def check_values(
    ids: torch.Tensor | None = None,
    vocab: int | None = None,
    finite: Mapping[str, torch.Tensor | None] | None = None,
) -> None:
    """One host sync for all value checks: ids in [0, vocab) and every named tensor finite
    (None entries are skipped). A failure names the tensor and its first bad position."""
    tensors = {k: v for k, v in (finite or {}).items() if v is not None}
    flags = [((ids < 0) | (ids >= vocab)).any()] if ids is not None else []
    flags += [~torch.isfinite(t).all() for t in tensors.values()]
    if not flags:
        return
    bad = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    if ids is not None and bad.pop(0):
        lo, hi = int(ids.min()), int(ids.max())
        raise ValueError(f"ids must lie in [0, V) = [0, {vocab}), got values in [{lo}, {hi}]")
    for (name, t), is_bad in zip(tensors.items(), bad, strict=True):
        if is_bad:
            where = tuple(int(i) for i in torch.nonzero(~torch.isfinite(t))[0])
            raise ValueError(f"{name} contains NaN or inf: {name}{list(where)} = {t[where].item()}")


def check_loss_inputs(
    like: torch.Tensor,
    ids: torch.Tensor,
    vocab: int,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    cfg: GRPOLossConfig,
    *,
    sampler_logp: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items: float | torch.Tensor | None = None,
    num_sequences: float | None = None,
    accumulation_steps: int = 1,
    validate: bool | None = None,
) -> None:
    """The per-token and per-sequence inputs of a GRPO loss over `like` (B, T, ...) with
    vocabulary `vocab`, and the counts of its normalisers (the options checked themselves
    when the GRPOLossConfig was built). With value checks on (`checking(validate)`), also ids
    in [0, vocab) and advantages, old_logp, ref_logp (when beta > 0) and
    importance_sampling_ratio finite: one host sync."""
    check_bt(mask, "mask", like)
    check_bt(old_logp, "old_logp", like)
    check_bt(ref_logp, "ref_logp", like)
    check_bt(sampler_logp, "sampler_logp", like)
    check_bt(importance_sampling_ratio, "importance_sampling_ratio", like)
    batch, seq_len = like.shape[0], like.shape[1]
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in (
        (batch,),
        (batch, seq_len),
    ):
        shape = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else advantages
        raise ValueError(
            f"advantages must have shape (B,) = ({batch},) or (B, T) = "
            f"({batch}, {seq_len}), got {shape}"
        )
    if advantages.device != like.device:
        raise ValueError(f"advantages are on {advantages.device} but the inputs on {like.device}")
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"beta={cfg.beta} > 0 needs ref_logp (the reference model's log-probs)")
    values = checking(validate)
    # A tensor's value is a host sync: checked with the other values.
    if (
        num_items is not None
        and (values or not isinstance(num_items, torch.Tensor))
        and not float(num_items) > 0
    ):
        raise ValueError(f"num_items must be > 0, got {float(num_items)}")
    if num_sequences is not None and not float(num_sequences) > 0:
        raise ValueError(f"num_sequences must be > 0, got {float(num_sequences)}")
    if int(accumulation_steps) != accumulation_steps or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps}")
    if values:
        check_values(
            ids,
            vocab,
            {
                "advantages": advantages,
                "old_logp": old_logp,
                "ref_logp": ref_logp if cfg.beta > 0 else None,
                "importance_sampling_ratio": importance_sampling_ratio,
            },
        )


def token_advantages(advantages: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """(B,) per-sequence or (B, T) per-token advantages as one fp32 value per token (B*T,)."""
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv[:, None]
    return adv.expand(batch, seq_len).reshape(-1).contiguous()


def check_rewards(
    rewards: torch.Tensor, group_size: int, weights: torch.Tensor | None, scale: str
) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() not in (1, 2):
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards)
        raise ValueError(f"rewards must be (N,) or (N, R), got {shape}")
    n = rewards.shape[0]
    if n == 0 or rewards.numel() == 0:
        raise ValueError(f"rewards are empty: shape {tuple(rewards.shape)}")
    if int(group_size) != group_size or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size}")
    if n % group_size:
        raise ValueError(f"N = {n} rewards is not a multiple of group_size = {group_size}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    if weights is not None:
        cols = rewards.shape[1] if rewards.dim() == 2 else 1
        if tuple(weights.shape) != (cols,):
            got = tuple(weights.shape)
            raise ValueError(f"weights must have shape (R,) = ({cols},), got {got}")
