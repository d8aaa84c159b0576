"""Checkpoints: a resumed run continues bit-exactly (weights, optimizer, scheduler, RNG),
a save that fails midway leaves the previous checkpoint intact, and bad checkpoints (another
format included) fail with errors naming the path. Other world sizes: test_distributed.py."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import grpo.checkpoint
from grpo.checkpoint import (
    capture_rng,
    find_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from grpo.models import load_model, make_tiny, save_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "qwen2", family="qwen2")


def _setup(tiny: Path):
    model, tok = load_model(tiny, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return model, tok, opt, sched


def _step(model, opt, sched) -> tuple[float, tuple]:
    """One optimizer step on random ids; also draws from every RNG a trainer may use."""
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    draws = (random.random(), float(np.random.rand()), torch.rand(()).item())
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), draws


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))


def test_resume_is_bit_exact(tiny, tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model, tok, opt, sched = _setup(tiny)
    for _ in range(2):
        _step(model, opt, sched)
    state = {"step": 2, "data_position": 7, "seen": [1, 2]}
    path = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, state)
    assert path == tmp_path / "checkpoint"
    assert json.loads((path / "state.json").read_text()) == state
    assert find_checkpoint(tmp_path) == path
    expected = [_step(model, opt, sched) for _ in range(2)]
    expected_params, expected_lr = _params(model), sched.get_last_lr()

    model2, _, opt2, sched2 = _setup(tiny)
    param_objects = [id(p) for p in model2.parameters()]
    torch.manual_seed(123)  # move every RNG elsewhere: only the checkpoint may put them back
    random.seed(123)
    np.random.seed(123)
    assert load_checkpoint(path, model2, opt2, sched2, device="cpu") == state
    assert [id(p) for p in model2.parameters()] == param_objects  # loaded in place
    got = [_step(model2, opt2, sched2) for _ in range(2)]
    assert got == expected
    assert sched2.get_last_lr() == expected_lr
    for name, p in model2.named_parameters():
        assert torch.equal(p, expected_params[name]), name


def test_layout_and_the_hf_export(tiny, tmp_path):
    """One layout: dcp/ (what resuming reads), model/ in HF layout (what users load), the
    versioned trainer state with one RNG state per process, state.json."""
    model, tok, opt, sched = _setup(tiny)
    _step(model, opt, sched)
    path = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, {"step": 1})
    assert sorted(p.name for p in path.iterdir()) == \
        ["checksums.json", "dcp", "model", "state.json", "trainer_state.pt"]
    checksums = json.loads((path / "checksums.json").read_text())
    assert checksums["algorithm"] == "sha256"
    assert sorted(checksums["files"]) == sorted(
        p.relative_to(path).as_posix() for p in path.rglob("*")
        if p.is_file() and p.name != "checksums.json")
    assert sorted(p.name for p in (path / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    assert trainer_state["version"] == grpo.checkpoint.FORMAT_VERSION
    assert isinstance(trainer_state["rng"], list) and len(trainer_state["rng"]) == 1
    exported, tok2 = load_model(path / "model", dtype=torch.float32)
    for name, p in exported.named_parameters():
        assert torch.equal(p, model.get_parameter(name)), name
    assert tok2("1+2").input_ids == tok("1+2").input_ids


def test_rng_round_trip():
    states = capture_rng()
    before = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    restore_rng(states)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == before


def test_failed_save_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    model, tok, opt, sched = _setup(tiny)
    _step(model, opt, sched)
    path = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, {"step": 1})
    saved = _params(model)
    _step(model, opt, sched)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the worst case: not even an Exception

    # torch.save runs after the model files are written: the crash is midway through.
    monkeypatch.setattr(grpo.checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, tok, opt, sched, {"step": 2})
    monkeypatch.undo()
    assert _leftovers(tmp_path) == []
    assert json.loads((path / "state.json").read_text()) == {"step": 1}
    model2, _, opt2, sched2 = _setup(tiny)
    assert load_checkpoint(path, model2, opt2, sched2, device="cpu") == {"step": 1}
    for name, p in model2.named_parameters():
        assert torch.equal(p, saved[name]), name


def test_crash_between_the_renames_is_repaired(tiny, tmp_path, monkeypatch):
    model, tok, opt, sched = _setup(tiny)
    path = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, {"step": 1})
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".checkpoint.tmp-") and Path(dst) == path:
            # The old checkpoint is already aside, the new one not yet in place.
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr("grpo.files.os.replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, tok, opt, sched, {"step": 2})
    monkeypatch.undo()
    assert not path.exists()
    assert find_checkpoint(tmp_path) == path
    assert json.loads((path / "state.json").read_text()) == {"step": 1}
    assert _leftovers(tmp_path) == []


def test_find_checkpoint_prefers_a_complete_new_one(tiny, tmp_path):
    assert find_checkpoint(tmp_path) is None
    model, tok, opt, sched = _setup(tiny)
    old = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, {"step": 1})
    new = save_checkpoint(tmp_path / "new", model, tok, opt, sched, {"step": 2})
    # The state a kill between the two renames leaves: the new checkpoint complete under its
    # temp name, the previous one moved aside, and an incomplete temp dir of an older crash.
    os.replace(new, tmp_path / ".checkpoint.tmp-aaaaaaaa")
    os.replace(old, tmp_path / ".checkpoint.old-bbbbbbbb")
    (tmp_path / ".checkpoint.tmp-cccccccc" / "model").mkdir(parents=True)
    path = find_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoint"
    assert json.loads((path / "state.json").read_text()) == {"step": 2}
    assert _leftovers(tmp_path) == []


def _without_checksums(path: Path) -> Path:
    """The checkpoint as a version before checksums wrote it."""
    (path / "checksums.json").unlink()
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    del trainer_state["checksums"]
    torch.save(trainer_state, path / "trainer_state.pt")
    return path


def test_incomplete_checkpoints_fail_clearly(tiny, tmp_path):
    model, tok, opt, sched = _setup(tiny)
    good = save_checkpoint(tmp_path / "good", model, tok, opt, sched, {"step": 1})

    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "absent", model, opt, sched, device="cpu")

    for name in ("trainer_state.pt", "state.json", "model", "dcp"):
        bad = tmp_path / f"no-{name}"
        shutil.copytree(good, bad)
        target = bad / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(FileNotFoundError, match=rf"no-{name}.*missing {name}"):
            load_checkpoint(bad, model, opt, sched, device="cpu")
        _without_checksums(bad) if name != "trainer_state.pt" else None
        with pytest.raises(FileNotFoundError, match=rf"no-{name}.*missing {name}"):
            load_checkpoint(bad, model, opt, sched, device="cpu")

    # What a checkpoint without checksums (an older one) still gets checked for: checksums
    # would refuse each of these first (test_a_damaged_file_is_refused_before_loading).
    good = _without_checksums(good)
    bad = tmp_path / "truncated"
    shutil.copytree(good, bad)
    data = (bad / "trainer_state.pt").read_bytes()
    (bad / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.*cannot read trainer state"):
        load_checkpoint(bad, model, opt, sched, device="cpu")

    torch.save({"optimizer": {}}, bad / "trainer_state.pt")
    with pytest.raises(ValueError, match="lacks version, scheduler, rng, state"):
        load_checkpoint(bad, model, opt, sched, device="cpu")

    bad = tmp_path / "no-metadata"
    shutil.copytree(good, bad)
    (bad / "dcp" / ".metadata").unlink()
    with pytest.raises(ValueError, match="no-metadata/dcp: cannot read its metadata"):
        load_checkpoint(bad, model, opt, sched, device="cpu")

    bad = tmp_path / "torn-shard"
    shutil.copytree(good, bad)
    (shard,) = (bad / "dcp").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match="torn-shard/dcp: cannot load"):
        load_checkpoint(bad, model, opt, sched, device="cpu")


@pytest.mark.parametrize("name", ["dcp/__0_0.distcp", "dcp/.metadata", "trainer_state.pt",
                                  "model/model.safetensors", "state.json", "checksums.json"])
def test_a_damaged_file_is_refused_before_loading(tiny, tmp_path, name):
    """A byte changed anywhere in the checkpoint (here in the middle of each file): refused,
    naming the file, and the model, optimizer and scheduler are left as they were."""
    model, tok, opt, sched = _setup(tiny)
    _step(model, opt, sched)
    path = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, {"step": 1})
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x40
    (path / name).write_bytes(bytes(data))
    model2, _, opt2, sched2 = _setup(tiny)
    before = _params(model2)
    expected = (rf"{path / name}: unreadable" if name == "checksums.json" else
                rf"{path / name}: damaged, its contents differ from the checksum recorded")
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(path, model2, opt2, sched2, device="cpu")
    for key, p in model2.named_parameters():
        assert torch.equal(p, before[key]), key
    assert not opt2.state and sched2.last_epoch == 0


def test_checkpoints_without_checksums(tiny, tmp_path):
    """One saved before checksums were recorded loads as before; one of ours that lost its
    checksums.json is refused (its trainer state says it had one)."""
    model, tok, opt, sched = _setup(tiny)
    _step(model, opt, sched)
    path = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, {"step": 1})
    (path / "checksums.json").unlink()
    model2, _, opt2, sched2 = _setup(tiny)
    with pytest.raises(ValueError, match=r"checksums.json: missing, so the checkpoint cannot "
                                         r"be checked"):
        load_checkpoint(path, model2, opt2, sched2, device="cpu")
    _without_checksums(save_checkpoint(path, model, tok, opt, sched, {"step": 1}))
    assert load_checkpoint(path, model2, opt2, sched2, device="cpu") == {"step": 1}
    for key, p in model2.named_parameters():
        assert torch.equal(p, model.get_parameter(key)), key


def test_a_checkpoint_before_the_first_step_changes_nothing(tiny, tmp_path):
    """Saving (the cold start's checkpoint) and loading a checkpoint whose optimizer has not
    stepped yet leave the optimizer without state: DCP's zero state (Adam's step count 1)
    would change the bias correction of every following step."""
    torch.manual_seed(0)
    model, tok, opt, sched = _setup(tiny)
    path = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, {"step": 0})
    assert not opt.state
    model2, _, opt2, sched2 = _setup(tiny)
    load_checkpoint(path, model2, opt2, sched2, device="cpu")
    assert not opt2.state
    torch.manual_seed(1)
    _step(model, opt, sched)
    torch.manual_seed(1)
    _step(model2, opt2, sched2)
    for key, p in model2.named_parameters():
        assert torch.equal(p, model.get_parameter(key)), key


def test_mismatched_optimizer_or_scheduler_changes_nothing(tiny, tmp_path):
    model, tok, opt, _ = _setup(tiny)
    path = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, None, {"step": 1})
    model2, _, _, sched2 = _setup(tiny)
    before = _params(model2)
    with pytest.raises(ValueError, match="without a scheduler"):
        load_checkpoint(path, model2, sched2.optimizer, sched2, device="cpu")
    head_only = torch.optim.AdamW([model2.lm_head.weight])
    with pytest.raises(ValueError, match="parameter groups"):
        load_checkpoint(path, model2, head_only, None, device="cpu")
    for name, p in model2.named_parameters():
        assert torch.equal(p, before[name]), name


def test_weights_of_another_model_fail_clearly(tiny, tmp_path):
    model, tok, opt, sched = _setup(tiny)
    path = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, {"step": 1})
    other, _ = load_model(make_tiny(tmp_path / "wider", family="qwen2", hidden=32),
                          dtype=torch.float32)
    before = _params(other)
    other_opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(ValueError, match=r"checkpoint/dcp: weights do not match the model: "
                                         r"lm_head.weight, model.embed_tokens.weight"):
        load_checkpoint(path, other, other_opt, None, device="cpu")
    for name, p in other.named_parameters():
        assert torch.equal(p, before[name]), name


def _format_1_checkpoint(path: Path, model, tok, opt, sched, sharded: bool = False) -> Path:
    """The layout before format 2, as its save_checkpoint wrote it."""
    save_model(model, tok, path / "model")
    torch.save({"version": 1, "optimizer": None if sharded else opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": [capture_rng()] if sharded else
                capture_rng(), "state": {"step": 1}}, path / "trainer_state.pt")
    if sharded:
        (path / "sharded").mkdir()
    (path / "state.json").write_text('{"step": 1}\n')
    return path


@pytest.mark.parametrize("sharded", [False, True])
def test_an_old_format_checkpoint_says_what_to_do(tiny, tmp_path, sharded):
    model, tok, opt, sched = _setup(tiny)
    _step(model, opt, sched)
    path = _format_1_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, sharded)
    assert find_checkpoint(tmp_path) == path
    model2, _, opt2, sched2 = _setup(tiny)
    before = _params(model2)
    with pytest.raises(ValueError, match=r"checkpoint format 1, written by an older version.*"
                                         r"Resume it with the version that wrote it.*"
                                         rf"--model {path / 'model'}"):
        load_checkpoint(path, model2, opt2, sched2, device="cpu")
    for name, p in model2.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not opt2.state and sched2.last_epoch == 0
    # Its model/ is still what users load.
    exported, _ = load_model(path / "model", dtype=torch.float32)
    for name, p in exported.named_parameters():
        assert torch.equal(p, model.get_parameter(name)), name


def test_a_newer_format_is_refused(tiny, tmp_path):
    model, tok, opt, sched = _setup(tiny)
    path = save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, {"step": 1})
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    _without_checksums(path)  # not to be refused as damaged first
    torch.save({**trainer_state, "version": 3}, path / "trainer_state.pt")
    with pytest.raises(ValueError, match="checkpoint format 3; this version of the trainer "
                                         "reads format 2 only"):
        load_checkpoint(path, model, opt, sched, device="cpu")


def test_state_must_be_json(tiny, tmp_path):
    model, tok, opt, sched = _setup(tiny)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "checkpoint", model, tok, opt, sched, {"step": object()})
    assert list(tmp_path.iterdir()) == []
