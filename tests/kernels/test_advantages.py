"""group_advantages against group_advantages_ref: scales, weighted reward columns with NaN,
unscorable completions (every column NaN, TRL 1.16), all-equal groups, strided and integer
rewards; the reference pinned by hand; and errors."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.kernels import group_advantages
from grpo.kernels.reference import combine_rewards, group_advantages_ref, scorable

from .helpers import assert_close

NAN = float("nan")


def _rewards(device, n_groups, group_size, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (n_groups * group_size, cols), generator=gen).float()
    r[:group_size] = 1.0  # first group all equal: zero std, zero advantage
    r[group_size + 1, 0] = float("nan")  # that reward function does not apply here
    r = (
        r
        + 0.25 * torch.randn(r.shape, generator=gen) * (torch.arange(len(r)) >= group_size)[:, None]
    )
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


def _unscorable_rewards(n_groups, group_size, cols, seed=0):
    """Random rewards where every NaN case of TRL 1.16 occurs: group 0 one unscorable row,
    group 1 all unscorable, group 2 one scorable row, group 3 partial-NaN columns (cols > 1),
    group 4 equal scorable rewards plus an unscorable row, the rest random with NaN."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (n_groups, group_size, cols), generator=gen).float()
    r = r + 0.25 * torch.randn(r.shape, generator=gen)
    r[0, 1] = NAN
    r[1] = NAN
    r[2, :-1] = NAN
    if cols > 1:
        r[3, ::2, 0] = NAN  # one function does not apply: the others' nansum counts
        r[3, 1, 1:] = NAN
    r[4] = 1.0
    r[4, -1] = NAN
    rest = r[5:]
    rest[torch.rand(rest.shape, generator=gen) < 0.3] = NAN
    return r.reshape(n_groups * group_size, cols)


def _assert_stats(stats, gold_stats):
    for k in gold_stats:
        torch.testing.assert_close(
            stats[k].double(),
            gold_stats[k].double(),
            rtol=1e-5,
            atol=1e-6,
            equal_nan=True,
            msg=lambda m, k=k: f"{k}: {m}",
        )


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size, cols", [(4, 1), (3, 1), (5, 3), (7, 2)])
def test_unscorable_matches_reference(device, scale, group_size, cols):
    r = _unscorable_rewards(8, group_size, cols).to(device)
    weights = torch.tensor([1.0, -0.5, 2.0][:cols], device=device) if cols > 1 else None
    rewards = r if cols > 1 else r[:, 0]  # R = 1 as (N,): a NaN reward is unscorable
    adv, stats = group_advantages(rewards, group_size, weights=weights, scale=scale)
    gold, gold_stats = group_advantages_ref(rewards, group_size, weights=weights, scale=scale)
    assert torch.isfinite(adv).all()
    assert_close(adv, gold, "advantages")
    _assert_stats(stats, gold_stats)
    grouped = adv.view(8, group_size)
    assert (adv[~scorable(rewards)] == 0).all()  # unscorable: no signal
    assert (grouped[1:3] == 0).all()  # all unscorable; a single scorable completion
    assert (grouped[4] == 0).all()  # equal scorable rewards
    assert (grouped[0] != 0).any()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_nothing_scorable_enough(device, scale):
    """Fewer than 2 scorable rewards in every group (and in the batch): all advantages 0,
    reward_std NaN as TRL logs it."""
    r = torch.full((9,), NAN, device=device)
    r[4] = 2.0
    adv, stats = group_advantages(r, 3, scale=scale, eps=0.0)
    gold, gold_stats = group_advantages_ref(r, 3, scale=scale, eps=0.0)
    assert (adv == 0).all() and (gold == 0).all()
    _assert_stats(stats, gold_stats)
    assert stats["reward_mean"].item() == 2.0 and math.isnan(stats["reward_std"].item())
    assert stats["frac_zero_std"].item() == 0.0  # NaN std is not zero std


@pytest.mark.parametrize("fn", [group_advantages, group_advantages_ref])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unscorable_by_hand(device, fn, scale):
    """G = 4, R = 2, weights (1, 0.5), eps = 0; r = nansum of the weighted columns.
    group 0: r = 0, unscorable, 0 + 0.5 * 2, 2 -> scorable (0, 1, 2): mean 1, std 1
    group 1: one scorable (r = 5): std NaN -> 0;  group 2: all unscorable -> 0
    group 3: r = 1, 0 + 0.5 * 2, 2 - 0.5 * 2, unscorable -> equal: 0.
    (nansum-as-0 would give group 0 r = (0, 0, 1, 2), mean 0.75, and nonzero groups 1-3.)"""
    rows = [
        [0, NAN],
        [NAN, NAN],
        [0, 2],
        [2, NAN],  # group 0
        [NAN, NAN],
        [NAN, NAN],
        [5, NAN],
        [NAN, NAN],  # group 1
        [NAN, NAN],
        [NAN, NAN],
        [NAN, NAN],
        [NAN, NAN],  # group 2
        [1, NAN],
        [NAN, 2],
        [2, -2],
        [NAN, NAN],  # group 3
    ]
    r = torch.tensor(rows, device=device)
    adv, stats = fn(r, 4, weights=torch.tensor([1.0, 0.5], device=device), scale=scale, eps=0.0)
    # Scorable r over the batch: 0, 1, 2, 5, 1, 1, 1 (mean 11/7); deviations x 7 squared: 770.
    batch_std = math.sqrt(770 / 49 / 6)
    std = {"group": 1.0, "batch": batch_std, "none": 1.0}[scale]
    expected = torch.zeros(16)
    expected[:4] = torch.tensor([-1.0, 0.0, 0.0, 1.0]) / std
    assert_close(adv, expected.to(device), "advantages")
    assert stats["reward_mean"].item() == pytest.approx(11 / 7)
    reward_std = batch_std if scale == "batch" else 0.5  # nanmean of (1, NaN, NaN, 0)
    assert stats["reward_std"].item() == pytest.approx(reward_std, rel=1e-6)
    assert stats["frac_zero_std"].item() == 0.25  # group 3; groups 1 and 2 have NaN std


def test_combine_rewards_keeps_nansum():
    r = torch.tensor([[1.0, NAN], [NAN, NAN], [2.0, 3.0]])
    w = torch.tensor([1.0, 2.0])
    assert combine_rewards(r, w).tolist() == [1.0, 0.0, 8.0]
    assert combine_rewards(r, w, unscorable_nan=True).isnan().tolist() == [False, True, False]
    assert scorable(r).tolist() == [True, False, True]
    assert scorable(torch.tensor([NAN, 1.0])).tolist() == [False, True]


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
