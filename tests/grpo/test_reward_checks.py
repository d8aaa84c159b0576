"""Rewards that make no sense stop the run or warn: a reward's output is checked strictly
(a list of numbers or None, one per completion, small enough for the group statistics), a
reward may not change its arguments, and rewards that never apply are named."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grpo.cli.train import main
from grpo.kernels import group_advantages
from grpo.rewards import REWARD_LIMIT, RewardError, UnscoredWatch, looked_for, score

TEXTS = ["a", "b", "c"]
COLUMNS = {"answer": ["1", "2", "3"], "max_completion_length": 8}


def _score(fn):
    return score([("r", fn)], list(TEXTS), {k: list(v) if isinstance(v, list) else v
                                             for k, v in COLUMNS.items()})


@pytest.mark.parametrize("bad,what", [
    ({"a": 1.0, "b": 0.0, "c": 1.0}, "returned dict, not a list of numbers"),
    ("101", "returned str, not a list of numbers"),
    ({1.0, 0.0, 0.5}, "returned set, not a list of numbers"),
    (["1", "0", "1"], "returned '1' for completion 0, not a number"),
    (1.0, "returned float, not a list of numbers"),
])
def test_output_that_is_not_a_list_of_numbers(bad, what):
    with pytest.raises(RewardError, match=what):
        _score(lambda completions, **kw: bad)


@pytest.mark.parametrize("good", [
    [1, 0.5, None], (1.0, 0.0, 1.0), np.array([1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0]),
])
def test_sequences_of_numbers_are_accepted(good):
    rewards, _ = _score(lambda completions, **kw: good)
    assert rewards.shape == (3, 1)


@pytest.mark.parametrize("big", [1e20, -1e16, 1e39])
def test_rewards_that_would_overflow_the_group_statistics(big):
    with pytest.raises(RewardError, match="the group statistics would overflow"):
        _score(lambda completions, **kw: [0.0, big, 1.0])
    rewards, _ = _score(lambda completions, **kw: [0.0, REWARD_LIMIT, 1.0])
    assert torch.isfinite(rewards).all()


def test_rewards_at_the_limit_give_finite_advantages():
    rewards = torch.tensor([REWARD_LIMIT, -REWARD_LIMIT] * 512)
    advantages, stats = group_advantages(rewards, 8, scale="batch")
    assert torch.isfinite(advantages).all() and math.isfinite(float(stats["reward_std"]))


@pytest.mark.parametrize("mutate,what", [
    (lambda completions, kw: completions.clear(), "completions"),
    (lambda completions, kw: completions.__setitem__(0, "forged"), "completions"),
    (lambda completions, kw: kw["answer"].append("4"), "answer"),
    (lambda completions, kw: kw.pop("answer"), None),  # its own kwargs dict: harmless
])
def test_a_reward_may_not_change_its_arguments(mutate, what):
    def reward(completions, **kw):
        n = len(completions)
        mutate(completions, kw)
        return [1.0] * n

    if what is None:
        assert _score(reward)[0].shape == (3, 1)
        return
    with pytest.raises(RewardError, match=rf"reward 'r' modified its arguments \({what}\)"):
        _score(reward)


def test_looked_for_names_a_rewards_columns():
    def reward(completions, prompts, test, entry_point=None, *, memory=0, **kwargs):
        return []

    assert looked_for(reward) == ["test", "entry_point", "memory"]
    assert looked_for(lambda completions, **kw: []) == []


def test_unscored_watch_warns_once_then_stops():
    def code(completions, test=None, **kw):
        return [None] * len(completions)

    def fmt(completions, **kw):
        return [1.0] * len(completions)

    watch = UnscoredWatch([("code", code), ("format", fmt)], patience=2)
    some = torch.tensor([[math.nan, 1.0], [math.nan, 0.0]])
    with pytest.warns(UserWarning, match=r"reward 'code' gave None for all 2 completions: it "
                      r"looks for test \(missing: test\); the data has answer, tests"):
        watch.update(some, ["answer", "tests"])
    watch.update(some, ["answer", "tests"])  # warned once; format still scores: no stop
    none = torch.full((2, 2), math.nan)
    with pytest.warns(UserWarning, match="reward 'format' gave None"):
        watch.update(none, ["answer"])
    watch.update(some, ["answer"])  # a scored step resets the count
    watch.update(none, ["answer"])
    with pytest.raises(RewardError, match="no completion got a reward in 2 steps in a row"):
        watch.update(none, ["answer"])


def test_a_run_whose_reward_never_applies_stops(tmp_path, capsys, monkeypatch):
    (tmp_path / "never_reward.py").write_text(
        "def r(completions, tests=None, **kw):\n"
        "    return [None] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    warned = r"reward 'r' gave None for all 4 completions: it looks for tests \(missing: tests\)"
    with pytest.warns(UserWarning, match=warned):
        code = main(["--steps", "6", "--sft-steps", "1", "--prompts-per-step", "2",
                     "--num-generations", "2", "--max-completion-length", "8", "--eval-size",
                     "4", "--no-progress", "--device", "cpu", "--output-dir", str(out),
                     "--rewards", "never_reward:r"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "no completion got a reward in 3 steps in a row" in err, err
