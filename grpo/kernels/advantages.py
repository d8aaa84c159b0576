"""Group-relative advantages: the critic-free baseline of GRPO.

Shapes: rewards (N,) or (N, R) for R reward functions (any real dtype, any strides),
weights (R,); N = num_prompts * group_size with each prompt's group contiguous.
Output advantages (N,) fp32. Semantics: grpo/kernels/reference.py (group_advantages_ref).

One program per group: it loads the group's G x R rewards, combines the columns with the
weights ignoring NaN (TRL's nansum: a NaN means a reward function does not apply), and
writes (r - mean) scaled by the group's unbiased std ("group"), by the std of all scorable
rewards ("batch", computed beforehand), or unscaled ("none"). As in TRL 1.16, a completion
NaN in every column is unscorable: it is left out of its group's mean and std and gets 0.
Groups with all-equal scorable rewards, or fewer than 2 of them, get exactly 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._checks import check_rewards, checking, next_pow2, use_triton

SCALE_MODES = {"group": 0, "batch": 1, "none": 2}


@triton.jit
def _group_advantages_kernel(
    rew_ptr,
    wts_ptr,
    batch_std_ptr,
    adv_ptr,
    mean_ptr,
    std_ptr,
    count_ptr,
    G,
    R,
    stride_n,
    stride_r,
    eps,
    HAS_WEIGHTS: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    g_offs = tl.arange(0, BLOCK_G)
    r_offs = tl.arange(0, BLOCK_R)
    rows = group * G + g_offs
    valid = g_offs < G
    ptrs = rew_ptr + rows[:, None] * stride_n + r_offs[None, :] * stride_r
    # Padding lanes load NaN, so that padded rows come out unscorable and padded columns
    # drop out of the nansum like a reward function that does not apply.
    x = tl.load(ptrs, mask=valid[:, None] & (r_offs[None, :] < R), other=float("nan")).to(
        tl.float32
    )
    ok = tl.sum((x == x).to(tl.int32), 1) > 0  # scorable: some reward function applies
    if HAS_WEIGHTS:
        x = x * tl.load(wts_ptr + r_offs, mask=r_offs < R, other=0.0)[None, :]
    r = tl.sum(tl.where(x == x, x, 0.0), 1)  # nansum, (BLOCK_G,)
    n_ok = tl.sum(ok.to(tl.float32), 0)
    mean = tl.sum(tl.where(ok, r, 0.0), 0) / tl.maximum(n_ok, 1.0)  # nanmean
    centred = tl.where(ok, r - mean, 0.0)
    std = tl.sqrt(tl.sum(centred * centred, 0) / tl.maximum(n_ok - 1.0, 1.0))  # nanstd
    # No signal: all-equal rewards, or fewer than 2 scorable (TRL: NaN std -> advantage 0).
    flat = (std <= 1e-8) | (n_ok < 2.0)
    if SCALE == 0:
        adv = centred / (tl.where(flat, 1.0, std) + eps)  # no 0/0 when eps == 0
    elif SCALE == 1:
        adv = centred / (tl.load(batch_std_ptr) + eps)
    else:
        adv = centred
    adv = tl.where(ok, tl.where(flat, 0.0, adv), 0.0)  # unscorable, flat group: exactly 0
    tl.store(adv_ptr + rows, adv, mask=valid)
    # NaN statistics where TRL's are NaN, so that the caller can skip those groups.
    tl.store(mean_ptr + group, tl.where(n_ok > 0.0, mean, float("nan")))
    tl.store(std_ptr + group, tl.where(n_ok > 1.0, std, float("nan")))
    tl.store(count_ptr + group, n_ok)


def launch_config(group_size: int, cols: int) -> dict[str, int]:
    """Launch keywords of the kernel (one group's G x R rewards in one block), shared with
    tests/kernels/test_compile.py."""
    return {"BLOCK_G": next_pow2(group_size), "BLOCK_R": next_pow2(cols), "num_warps": 4}


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    weights: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-4,
    validate: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantages (N,) fp32 and stats {reward_mean, reward_std, frac_zero_std}.

    rewards (N,) or (N, R); weights (R,) combine the R reward functions; NaN: the function
    does not apply, NaN in every column: unscorable (advantage 0, out of the group's stats).
    scale: "group" (r - mean) / (group std + eps), "batch" / (std of all scorable r + eps),
    "none" r - mean. validate: an infinite reward is a ValueError naming it (one host sync;
    the reference always checks); None follows grpo.kernels.value_checks. Unchecked, the kernel
    gives an infinite reward's group NaN advantages.
    """
    check_rewards(rewards, group_size, weights, scale)
    group_size = int(group_size)
    if weights is not None:
        weights = weights.to(device=rewards.device, dtype=torch.float32)
    if checking(validate) and use_triton(rewards):
        reference.check_rewards_finite(rewards)
    if not use_triton(rewards):
        return reference.group_advantages_ref(
            rewards, group_size, weights=weights, scale=scale, eps=eps
        )
    n = rewards.shape[0]
    n_groups = n // group_size
    r2d = rewards if rewards.dim() == 2 else rewards.unsqueeze(-1)  # (N, R)
    if not r2d.dtype.is_floating_point:
        r2d = r2d.float()
    dev = rewards.device
    adv = torch.empty(n, device=dev, dtype=torch.float32)
    group_mean = torch.empty(n_groups, device=dev, dtype=torch.float32)
    group_std = torch.empty(n_groups, device=dev, dtype=torch.float32)
    group_count = torch.empty(n_groups, device=dev, dtype=torch.float32)
    # The batch std needs every group first: one small reduction before the launch, over the
    # scorable rewards only (TRL's nanstd of rewards with the unscorable ones NaN).
    if scale == "batch":
        batch_std = reference.nanstd(
            reference.combine_rewards(r2d, weights, unscorable_nan=True)
        ).reshape(1)
    else:
        batch_std = group_std
    _group_advantages_kernel[(n_groups,)](
        r2d,
        weights if weights is not None else group_std,
        batch_std,
        adv,
        group_mean,
        group_std,
        group_count,
        group_size,
        r2d.shape[1],
        r2d.stride(0),
        r2d.stride(1),
        float(eps),
        HAS_WEIGHTS=weights is not None,
        SCALE=SCALE_MODES[scale],
        **launch_config(group_size, r2d.shape[1]),
    )
    zero_std = group_std <= 1e-8  # NaN (< 2 scorable) is not zero
    stats = {
        # Mean of the scorable rewards: the groups weighted by their scorable counts.
        "reward_mean": (group_mean * group_count).nansum() / group_count.sum(),
        "reward_std": batch_std[0] if scale == "batch" else group_std.nanmean(),
        "frac_zero_std": zero_std.float().mean(),
    }
    return adv, stats
