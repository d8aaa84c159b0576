"""group_advantages against group_advantages_ref: scales, weighted reward columns with NaN,
all-equal groups, strided and integer rewards; and errors."""

from __future__ import annotations

import pytest
import torch

from kernels import group_advantages
from kernels.reference import group_advantages_ref

from .helpers import assert_close


def _rewards(device, n_groups, group_size, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (n_groups * group_size, cols), generator=gen).float()
    r[:group_size] = 1.0  # first group all equal: zero std, zero advantage
    r[group_size + 1, 0] = float("nan")  # that reward function does not apply here
    r = r + 0.25 * torch.randn(r.shape, generator=gen) * (torch.arange(len(r)) >= group_size)[
        :, None]
    return r.to(device)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size, cols", [(4, 1), (8, 3), (5, 2), (16, 1)])
def test_matches_reference(device, scale, group_size, cols):
    r = _rewards(device, 6, group_size, cols)
    weights = torch.linspace(1.0, 0.5, cols, device=device) if cols > 1 else None
    rewards = r if cols > 1 else r[:, 0].nan_to_num(0.0)
    adv, stats = group_advantages(rewards, group_size, weights=weights, scale=scale)
    gold, gold_stats = group_advantages_ref(rewards, group_size, weights=weights, scale=scale)
    assert adv.dtype == torch.float32 and adv.shape == (rewards.shape[0],)
    assert_close(adv, gold, "advantages")
    for k in gold_stats:
        assert_close(stats[k], gold_stats[k], k)
    assert (adv[:group_size] == 0).all()
    assert stats["frac_zero_std"].item() == pytest.approx(1 / 6)


def test_group_scaling_by_hand(device):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], device=device)
    adv, stats = group_advantages(r, 4, eps=0.0)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / std
    assert_close(adv, expected.to(device), "advantages")
    assert stats["reward_mean"].item() == pytest.approx(1.25)
    assert stats["frac_zero_std"].item() == 0.5


def test_strided_and_integer_rewards(device):
    r = torch.randint(0, 2, (2, 24), device=device)  # (R, N) -> transposed (N, R) view
    adv, _ = group_advantages(r.t(), 8, weights=torch.tensor([1.0, 2.0], device=device))
    gold, _ = group_advantages_ref(r.t(), 8, weights=torch.tensor([1.0, 2.0]))
    assert_close(adv, gold.to(device), "advantages")


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.zeros(10), 4), {}, "not a multiple of group_size"),
        ((torch.zeros(8), 1), {}, "group_size must be an integer >= 2"),
        ((torch.zeros(0), 4), {}, "empty"),
        ((torch.zeros(8, 2, 1), 4), {}, r"\(N,\) or \(N, R\)"),
        ((torch.zeros(8, 2), 4), {"weights": torch.ones(3)}, r"weights must have shape"),
        ((torch.zeros(8), 4), {"scale": "global"}, "unknown scale"),
    ],
)
def test_bad_input_is_a_clear_error(device, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(args[0].to(device), *args[1:], **kwargs)
