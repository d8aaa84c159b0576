"""Training checkpoints that a crash can never destroy: model, optimizer, scheduler, RNG, state.

A checkpoint is one directory:

    checkpoint/
      model/              HF-format model + tokenizer (models.save_model), loadable anywhere
      trainer_state.pt    {"optimizer", "scheduler", "rng", "state", "version"} (torch.save)
      state.json          the trainer's JSON-able `state` (step, data position...), for humans

It is built whole as a hidden sibling `.checkpoint.tmp-XXXXXXXX` and only then swapped in
(the previous checkpoint is moved aside, the new one renamed into place, the old one
deleted), so at every moment a complete checkpoint exists on disk. The one window where
`checkpoint` itself is absent (between the two renames) is repaired by `find_checkpoint`.
One process writes a run directory at a time; leftovers of a crashed save are removed by the
next successful one.

A distributed run (FSDP2-sharded policy, see grpo/distributed.py) writes the same layout plus
`sharded/`, a torch.distributed.checkpoint directory with the model and optimizer state in
shards, written by every rank in parallel. It is resharded on load, so a run can resume with
any number of processes (one included, without torchrun); `model/` is the gathered model,
written by rank 0. Each rank's RNG state is kept; a different world size re-seeds instead.
A single-process checkpoint resumes under torchrun too: every rank shards the full state.

`trainer_state.pt` holds only tensors and plain Python values, so it is read with
`torch.load(weights_only=True)`: loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import load_model, save_model
from models.saving import _replace_dir

from . import distributed

CHECKPOINT_NAME = "checkpoint"
MODEL_DIR = "model"
TRAINER_STATE = "trainer_state.pt"
STATE_JSON = "state.json"
SHARDED_DIR = "sharded"
_FORMAT_VERSION = 1
_TRAINER_KEYS = ("optimizer", "scheduler", "rng", "state")


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    tokenizer: object | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    state: dict[str, Any],
) -> Path:
    """Write a complete checkpoint to `path`, replacing any previous one atomically.

    state: JSON-able trainer state (step, data position, ...); it comes back from
    `load_checkpoint` as given. Returns `path`.
    """
    path = Path(path)
    # Serialise first: a state that is not JSON-able fails before anything is written.
    state_text = json.dumps(state, indent=2) + "\n"
    if distributed.is_sharded(model):
        return _save_sharded(path, model, tokenizer, optimizer, scheduler, state, state_text)
    trainer_state = {
        "version": _FORMAT_VERSION,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng(),
        "state": state,
    }
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_model(model, tokenizer, tmp / MODEL_DIR)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        # Written last: a temp dir holding state.json is complete (find_checkpoint relies on it).
        (tmp / STATE_JSON).write_text(state_text)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_leftovers(path)
    return path


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    *,
    device: str | torch.device,
) -> dict[str, Any]:
    """Restore a checkpoint into the existing model, optimizer and scheduler; return `state`.

    The weights are copied into `model`'s own parameters (so the optimizer's references stay
    valid) in the model's dtype; the optimizer state is loaded onto `device` (that of the
    parameters); Python, NumPy, torch and CUDA RNG states are restored last, so the run
    continues exactly as if it had never stopped. Everything is read and checked before
    anything is modified: FileNotFoundError for missing pieces, ValueError (models'
    CheckpointError included) for unreadable or mismatched ones, each naming the path.
    """
    path = Path(path)
    _check_files(path)
    trainer_state = _read_trainer_state(path / TRAINER_STATE, device)
    if (path / SHARDED_DIR).is_dir():
        return _load_sharded(path, trainer_state, model, optimizer, scheduler)
    _check_optimizer(path, trainer_state["optimizer"], optimizer)
    if scheduler is not None and trainer_state["scheduler"] is None:
        raise ValueError(f"{path}: checkpoint was saved without a scheduler, but one was given")

    # A fresh copy on the host, not on `device`: it is only a source of tensors (memory-mapped
    # from the files), so loading never needs room for a second model on the accelerator.
    fresh, _ = load_model(path / MODEL_DIR, dtype=_model_dtype(model), device="cpu")
    weights = fresh.state_dict()
    _check_weights(path, weights, model.state_dict())
    if distributed.is_sharded(model):  # a single-process checkpoint, resumed under torchrun
        _load_full_into_sharded(model, optimizer, weights, trainer_state["optimizer"])
    else:
        model.load_state_dict(weights)
        optimizer.load_state_dict(trainer_state["optimizer"])
    del fresh, weights
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    # Last: building the fresh model above draws from the torch RNG (parameter init).
    _restore_rngs(trainer_state)
    return trainer_state["state"]


def _load_full_into_sharded(model, optimizer, weights: dict, optim_state: dict) -> None:
    """Every rank shards a full (single-process) model and optimizer state into its FSDP
    model. The saved optimizer numbers its parameters in model.parameters() order; the
    sharded one is keyed by parameter names (the same names under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = [name for name, _ in model.named_parameters()]
    by_name = {
        "state": {names[i]: value for i, value in optim_state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                         for group in optim_state["param_groups"]],
    }
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))


def _save_sharded(path: Path, model, tokenizer, optimizer, scheduler, state: dict,
                  state_text: str) -> Path:
    """The distributed save: a collective, every rank calls it with its shard."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.parent / distributed.broadcast_object(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    rngs = distributed.all_gather_objects(capture_rng())
    try:
        if distributed.is_main():
            tmp.mkdir(parents=True)
        distributed.barrier()
        distributed.save_full_model(model, tokenizer, tmp / MODEL_DIR)
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state},
                 checkpoint_id=str(tmp / SHARDED_DIR))
        distributed.barrier()
        if distributed.is_main():
            torch.save({"version": _FORMAT_VERSION, "optimizer": None,
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "rng": rngs, "world_size": distributed.world_size(), "state": state},
                       tmp / TRAINER_STATE)
            (tmp / STATE_JSON).write_text(state_text)
            _replace_dir(tmp, path)
            _remove_leftovers(path)
    except BaseException:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier()
    return path


def _load_sharded(path: Path, trainer_state: dict, model, optimizer, scheduler) -> dict:
    """Resharding load of a distributed checkpoint, into a sharded or a plain model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    saved = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(saved, checkpoint_id=str(path / SHARDED_DIR))
    except Exception as e:  # missing keys, wrong shapes, truncated shards
        raise ValueError(f"{path / SHARDED_DIR}: cannot load into this model and optimizer "
                         f"({type(e).__name__}: {e})") from e
    set_state_dict(model, optimizer, model_state_dict=saved["model"],
                   optim_state_dict=saved["optimizer"])
    if scheduler is not None:
        if trainer_state["scheduler"] is None:
            raise ValueError(f"{path}: checkpoint was saved without a scheduler, but one was "
                             f"given")
        scheduler.load_state_dict(trainer_state["scheduler"])
    _restore_rngs(trainer_state)
    return trainer_state["state"]


def _restore_rngs(trainer_state: dict) -> None:
    """This rank's RNG states; with another number of processes than the run that saved them,
    seeds from the step and rank instead (the data order is global, only sampling differs)."""
    rngs = trainer_state["rng"]
    if isinstance(rngs, dict):  # a single-process run's state
        rngs = [rngs]
    if len(rngs) == distributed.world_size():
        restore_rng(rngs[distributed.rank()])
        return
    step = int(trainer_state["state"].get("step", 0))
    seed = 1_000_003 * step + distributed.rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from, `run_dir/checkpoint`, or None when there is none.

    If a crash fell between the two renames of a save, `checkpoint` is missing but the new
    one (complete, under its temp name) or the previous one (moved aside) is still there:
    the newest complete one is renamed back into place and returned.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_NAME
    if path.is_dir():
        return path

    def newest_first(pattern: str) -> list[Path]:
        found = [d for d in run_dir.glob(pattern) if _is_complete(d)]
        return sorted(found, key=lambda d: (d / STATE_JSON).stat().st_mtime, reverse=True)

    # A complete temp dir is always newer than the checkpoint moved aside during its swap.
    candidates = newest_first(f".{CHECKPOINT_NAME}.tmp-*") + \
        newest_first(f".{CHECKPOINT_NAME}.old-*")
    if not candidates:
        return None
    os.replace(candidates[0], path)
    _remove_leftovers(path)
    return path


def capture_rng() -> dict[str, Any]:
    """The states of Python's `random`, NumPy's global RNG, torch CPU and every CUDA device.

    Only tensors and plain values, so that `torch.load(weights_only=True)` reads them back.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        # Only when CUDA is in use: querying it otherwise would create a context per device.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng(states: dict[str, Any]) -> None:
    """Restore RNG states from `capture_rng` (CUDA states for the devices present now)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = states["numpy"]
    np.random.set_state((
        np_state["name"],
        np_state["keys"].cpu().numpy().astype(np.uint32),
        np_state["pos"],
        np_state["has_gauss"],
        np_state["cached_gaussian"],
    ))
    # RNG states must be CPU byte tensors, whatever map_location the file was loaded with.
    torch.set_rng_state(states["torch"].cpu())
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), i)


def _is_complete(path: Path) -> bool:
    return (path / MODEL_DIR).is_dir() and (path / TRAINER_STATE).is_file() and \
        (path / STATE_JSON).is_file()


def _remove_leftovers(path: Path) -> None:
    """Delete temp and moved-aside dirs of `path` that crashed saves left behind (each can
    be a whole model); only called once a complete checkpoint is in place."""
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for stale in path.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _check_files(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no checkpoint directory")
    missing = [name for name in (MODEL_DIR, TRAINER_STATE, STATE_JSON)
               if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")


def _read_trainer_state(file: Path, device: str | torch.device) -> dict[str, Any]:
    try:
        trainer_state = torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt or foreign file: torch raises many kinds
        raise ValueError(f"{file}: cannot read trainer state ({type(e).__name__}: {e})") from e
    if not isinstance(trainer_state, dict):
        raise ValueError(f"{file}: not a trainer state (a {type(trainer_state).__name__})")
    missing = [key for key in _TRAINER_KEYS if key not in trainer_state]
    if missing:
        raise ValueError(f"{file}: trainer state lacks {', '.join(missing)}")
    return trainer_state


def _check_optimizer(path: Path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's own check, done before the model is touched (it raises only later)."""
    saved_sizes = [len(g["params"]) for g in saved.get("param_groups", [])]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise ValueError(f"{path}: optimizer parameter groups have sizes {saved_sizes}, "
                         f"but the given optimizer has {sizes}")


def _check_weights(path: Path, saved: dict, current: dict) -> None:
    mismatched = sorted(set(saved) ^ set(current))
    mismatched += [k for k in saved if k in current and saved[k].shape != current[k].shape]
    if mismatched:
        more = f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""
        raise ValueError(f"{path / MODEL_DIR}: weights do not match the model: "
                         f"{', '.join(mismatched[:5])}{more}")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model was loaded in (fp32-kept modules aside, as load_model does)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
