"""Value checks and host syncs: NaN/inf log-probs and rewards give the same kind of result on
the Triton path and the reference (a clear error with the checks on, NaN propagated with them
off); `value_checks(False)` / `validate=False` leave no host sync in the loss, log-prob and
experts calls or their backward (checked on the CPU with a dispatch mode that records every
op that synchronises a CUDA device, and on a GPU with torch.cuda.set_sync_debug_mode)."""

from __future__ import annotations

import importlib
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo import kernels
from grpo.kernels import (
    check_values,
    group_advantages,
    grpo_loss,
    linear_grpo_loss,
    moe_experts,
    token_logprobs,
    token_logprobs_from_hidden,
    value_checks,
)
from grpo.kernels.reference import group_advantages_ref, grpo_loss_ref

from .test_grpo_loss import make_inputs as loss_inputs
from .test_linear_grpo_loss import make_inputs as linear_inputs
from .test_moe import make_inputs as moe_inputs

NAN, INF = float("nan"), float("inf")
# The paths of each public function: the Triton kernels (interpreted without a GPU) and the
# PyTorch reference the function falls back to (use_triton False).
PATHS = ["triton", "reference"]


@pytest.fixture
def path(request, monkeypatch):
    if request.param == "reference":
        for mod in ("grpo_loss", "linear_grpo_loss", "advantages", "logprobs", "moe"):
            monkeypatch.setattr(importlib.import_module(f"grpo.kernels.{mod}"), "use_triton",
                                lambda t: False)
    return request.param


def _loss_grad(fn, x, inp, old, **opts):
    x = x.detach().clone().requires_grad_()
    loss, _ = fn(x, inp["ids"], inp["adv"], inp["mask"], old, inp["ref"], **opts)
    loss.backward()
    return loss.detach(), x.grad


# ----------------------------------------------------------------------- NaN in old_logp


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("bad, name", [(NAN, "old_logp"), (INF, "old_logp"), (NAN, "ref_logp")])
def test_non_finite_logp_is_a_clear_error(device, path, bad, name):
    inp = loss_inputs(device, 50, torch.float32, False)
    old, ref = inp["old"].clone(), inp["ref"].clone()
    (old if name == "old_logp" else ref)[2, 3] = bad  # a masked token: checked all the same
    before = inp["logits"].clone()
    with pytest.raises(ValueError, match=rf"{name} contains NaN or inf: {name}\[2, 3\]"):
        grpo_loss(inp["logits"], inp["ids"], inp["adv"], inp["mask"], old, ref, beta=0.04,
                  inplace=True)
    assert torch.equal(inp["logits"], before)
    h, w, ids, adv, mask, old_h, ref_h = linear_inputs(device, torch.float32)
    (old_h if name == "old_logp" else ref_h)[0, 1] = bad
    with pytest.raises(ValueError, match=rf"{name}\[0, 1\]"):
        linear_grpo_loss(h, w, ids, adv, mask, old_h, ref_h, beta=0.04)


def test_ref_logp_is_not_checked_without_kl(device):
    """beta = 0 ignores ref_logp: its values are not the call's business."""
    inp = loss_inputs(device, 50, torch.float32, False)
    ref = torch.full_like(inp["ref"], NAN)
    loss, _ = grpo_loss(inp["logits"], inp["ids"], inp["adv"], inp["mask"], inp["old"], ref)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("opts", [
    dict(), dict(delta=1.15), dict(loss_type="cispo"), dict(loss_type="sapo"),
    dict(beta=0.04), dict(importance_level="sequence"),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "grpo")
def test_unchecked_nan_old_logp_propagates_like_the_reference(device, opts):
    """Checks off: a NaN old log-prob at a loss token gives a NaN loss and NaN gradients in
    the same rows on both paths (no finite loss hiding NaN gradients), and the other rows
    agree."""
    inp = loss_inputs(device, 50, torch.float32, False)
    old = inp["old"].clone()
    old[0, 2] = NAN  # a loss token (mask 1)
    assert inp["mask"][0, 2] == 1
    loss, grad = _loss_grad(grpo_loss, inp["logits"], inp, old, validate=False, **opts)
    gold_loss, gold = _loss_grad(grpo_loss_ref, inp["logits"], inp, old, **opts)
    assert gold_loss.isnan() and loss.isnan()
    nan_rows, gold_nan_rows = grad.isnan().any(-1), gold.isnan().any(-1)
    assert nan_rows[0, 2] and torch.equal(nan_rows, gold_nan_rows)
    assert torch.equal(grad.isnan().all(-1), nan_rows)  # a NaN row is NaN throughout
    torch.testing.assert_close(grad[~nan_rows], gold[~gold_nan_rows], rtol=1e-4, atol=1e-6)


def test_unchecked_nan_old_logp_linear(device):
    h, w, ids, adv, mask, old, ref = linear_inputs(device, torch.float32)
    old[0, 1] = NAN
    h = h.detach().clone().requires_grad_()
    loss, _ = linear_grpo_loss(h, w, ids, adv, mask, old, ref, beta=0.04, validate=False)
    loss.backward()
    assert loss.isnan()
    assert h.grad[0, 1].isnan().all() and torch.isfinite(h.grad[1:]).all()


# ----------------------------------------------------------------------- inf rewards


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("bad", [INF, -INF])
def test_inf_reward_is_a_clear_error(device, path, bad):
    r = torch.randint(0, 2, (16, 3)).float()
    r[5, 1] = bad
    r[6, 0] = NAN  # NaN stays legal: that reward function does not apply
    with pytest.raises(ValueError, match=rf"rewards\[5, 1\] = {bad} \(completion 5, reward "
                                         r"function 1\)"):
        group_advantages(r.to(device), 8, weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"rewards\[9\] = inf \(completion 9\)"):
        group_advantages(torch.ones(16, device=device).index_fill(0, torch.tensor([9]), INF),
                         4)


def test_inf_reward_in_the_reference_itself():
    r = torch.zeros(8)
    r[3] = INF
    with pytest.raises(ValueError, match=r"rewards\[3\] = inf"):
        group_advantages_ref(r, 4)


def test_unchecked_inf_reward_gives_its_group_nan(device):
    """Checks off (the caller validated elsewhere): only the infinite reward's group is NaN."""
    r = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(1)).float()
    r[5] = INF
    adv, _ = group_advantages(r.to(device), 4, validate=False)
    assert adv[4:8].isnan().all() and torch.isfinite(adv[:4]).all() and \
        torch.isfinite(adv[8:]).all()
    gold, _ = group_advantages_ref(r[8:], 4)
    torch.testing.assert_close(adv[8:].cpu(), gold)


# ----------------------------------------------------------------------- the switches


def test_value_checks_context_and_keyword(device):
    inp = loss_inputs(device, 50, torch.float32, False)
    adv = inp["adv"].clone()
    adv[1] = NAN
    args = (inp["logits"], inp["ids"], adv, inp["mask"], inp["old"])
    with pytest.raises(ValueError, match=r"advantages contains NaN or inf: advantages\[1\]"):
        grpo_loss(*args)
    with value_checks(False):
        loss, _ = grpo_loss(*args)  # unchecked: the NaN reaches the loss
        assert loss.isnan()
        with pytest.raises(ValueError, match="advantages"):
            grpo_loss(*args, validate=True)  # the call's own keyword wins
        with value_checks(True), pytest.raises(ValueError, match="advantages"):
            grpo_loss(*args)
    with pytest.raises(ValueError, match="advantages"):  # back on after the block
        grpo_loss(*args)
    assert torch.isnan(grpo_loss(*args, validate=False)[0])


def test_check_values_names_the_first_bad_value(device):
    ids = torch.tensor([[0, 3], [2, 1]], device=device)
    check_values(ids, 4, {"a": torch.zeros(3, device=device), "b": None})
    with pytest.raises(ValueError, match=r"ids must lie in \[0, V\) = \[0, 3\)"):
        check_values(ids, 3)
    with pytest.raises(ValueError, match=r"a contains NaN or inf: a\[1, 0\] = -inf"):
        check_values(finite={"a": torch.tensor([[0.0, 1.0], [-INF, NAN]], device=device)})


# ----------------------------------------------------------------------- host syncs


_TRITON_DIR = os.path.dirname(__import__("triton").__file__)
_ATEN = torch.ops.aten
# Ops that make the host wait for a CUDA device: reading a value (item, bool, float, int),
# data-dependent shapes (nonzero, boolean indexing, masked_select), and host data copied
# onto the device (torch.tensor / as_tensor of Python values: a synchronous pageable copy).
_SYNCING = {_ATEN._local_scalar_dense.default, _ATEN.nonzero.default, _ATEN.is_nonzero.default,
            _ATEN.masked_select.default, _ATEN.equal.default, _ATEN.lift_fresh.default,
            _ATEN.unique_consecutive.default, _ATEN._unique2.default,
            _ATEN.bincount.default,  # CUDA sizes its output from the input's max
            _ATEN.repeat_interleave.Tensor}


class SyncRecorder(TorchDispatchMode):
    """Records every op of our host code that would synchronise a CUDA device (the Triton
    interpreter's own tensor handling, which a GPU run does not have, is left out)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def _record(self, what: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if any(f.filename.startswith(_TRITON_DIR) for f in stack):
            return
        ours = [f for f in stack if f"{os.sep}kernels{os.sep}" in f.filename]
        where = f"{ours[-1].filename.rsplit(os.sep, 1)[-1]}:{ours[-1].lineno}" if ours else "?"
        self.syncs.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING:
            self._record(str(func))
        elif func in (_ATEN.index.Tensor, _ATEN.index_put_.default, _ATEN.index_put.default):
            index = args[1]
            if any(i is not None and i.dtype == torch.bool for i in index):
                self._record(f"{func} with a boolean index")
        return func(*args, **kwargs)


@pytest.fixture
def no_host_read(monkeypatch):
    """tolist() and numpy() read values without a dispatched op: record them too."""
    recorder = SyncRecorder()
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, _original=original, _name=name, **kw):
            recorder._record(f"Tensor.{_name}")
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return recorder


def _hot_path_inputs(device):
    """Inputs of every hot-path call, made (and copied to the device) up front."""
    inp = loss_inputs(device, 300, torch.float32, False)
    return {"loss": inp, "linear": linear_inputs(device, torch.float32),
            "moe": moe_inputs(13, 24, 20, 5, 2, device=device),
            "num_items": inp["mask"].sum()}


def _hot_path_calls(inputs, **opts):
    """Forward and backward of every kernel call of a training step, each in its usual
    form; opts (validate=...) go to every call."""
    inp = inputs["loss"]
    dapo = dict(loss_type="dapo", num_items=inputs["num_items"], num_sequences=4.0,
                accumulation_steps=2, beta=0.04)
    for extra in (dict(), dict(entropy_coef=0.01), dict(importance_level="sequence"),
                  dict(top_entropy_quantile=0.5)):
        x = inp["logits"].clone().requires_grad_()
        loss, stats = grpo_loss(x, inp["ids"], inp["adv"], inp["mask"], inp["old"],
                                inp["ref"], importance_sampling_ratio=inp["isr"], **dapo,
                                **extra, **opts)
        (loss * 0.5).backward()  # a grad_output that is not 1
        yield "grpo_loss", x.grad
    yield "token_logprobs", token_logprobs(inp["logits"], inp["ids"], return_entropy=True,
                                           **opts)
    h, w, ids, adv, mask, old, ref = inputs["linear"]
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = linear_grpo_loss(h, w, ids, adv, mask, old, ref, beta=0.04, **opts)
    loss.backward()
    yield "linear_grpo_loss", (h.grad, w.grad)
    yield "token_logprobs_from_hidden", token_logprobs_from_hidden(h, w, ids, **opts)
    hidden, gate_up, down, topk, weights, grad = inputs["moe"]
    hidden = hidden.clone().requires_grad_()
    out = moe_experts(hidden, gate_up, down, topk, weights, **opts)
    out.backward(grad)
    yield "moe_experts", hidden.grad


def test_unchecked_calls_never_synchronise(device, no_host_read):
    inputs = _hot_path_inputs(device)
    with no_host_read:
        outputs = list(_hot_path_calls(inputs, validate=False))
    assert len(outputs) == 8
    assert no_host_read.syncs == []


def test_sync_recorder_sees_the_value_checks(device, no_host_read):
    """The recorder is not blind: the same calls with their value checks on do sync, once
    per call (the id range and finiteness checks share one device-to-host copy)."""
    inputs = _hot_path_inputs(device)
    with no_host_read:
        names = [name for name, _ in _hot_path_calls(inputs)]
    assert len(names) == 8
    assert len(no_host_read.syncs) >= 8, no_host_read.syncs


def test_value_checks_off_by_context(device, no_host_read):
    inputs = _hot_path_inputs(device)
    with no_host_read, value_checks(False):
        list(_hot_path_calls(inputs))
    assert no_host_read.syncs == []


@pytest.mark.gpu
def test_no_sync_on_cuda():
    """On the device itself: forward and backward of grpo_loss, token_logprobs and
    linear_grpo_loss with the checks off raise nothing under sync debug mode "error"."""
    inputs = _hot_path_inputs("cuda")
    list(_hot_path_calls(inputs, validate=False))  # compile and warm up first
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = list(_hot_path_calls(inputs, validate=False))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert [name for name, _ in outputs] == [
        "grpo_loss", "grpo_loss", "grpo_loss", "grpo_loss", "token_logprobs",
        "linear_grpo_loss", "token_logprobs_from_hidden", "moe_experts"]
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError):  # and the mode does catch a sync
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.zeros(1, device="cuda").item()
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def test_kernels_exports():
    assert kernels.value_checks is value_checks and kernels.check_values is check_values
