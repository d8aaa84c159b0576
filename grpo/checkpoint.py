"""Training checkpoints: one format at any number of processes, never destroyed by a crash.

A checkpoint is one directory, the same for one process and for N under torchrun:

    checkpoint/
      dcp/              model and optimizer state, torch.distributed.checkpoint (DCP): one
                        `__R_0.distcp` file per process that saved it, plus `.metadata`
      model/            the model in Hugging Face layout + tokenizer (grpo.models.save_model), for
                        users: `load_model`, `from_pretrained` and `--model` read it; resuming
                        does not (dcp/ holds the same weights)
      adapter/          instead of model/ for a LoRA policy (grpo.lora): the adapters in
                        PEFT's format; dcp/ then holds only the adapters and their optimizer
                        state (the frozen base is re-read from where the run took it)
      trainer_state.pt  {"version", "scheduler", "rng", "state"} (torch.save, by rank 0)
      checksums.json    the SHA-256 of every other file, state.json included; checked before
                        anything is loaded
      state.json        the trainer's `state` (step, data position...) as JSON, for humans;
                        written last, so a directory holding it is complete

DCP names every tensor by its parameter name and records which slice of the full tensor each
process wrote, so `dcp/` loads into a plain model or into an FSDP2-sharded one over any
number of processes, resharding on the way: a run resumes with another world size, one
process (without torchrun) included. Without a process group DCP reads and writes in the
one process. `model/` is gathered and written by rank 0 (fp32 master weights under FSDP).

`rng` is a list with one `capture_rng()` dict per rank. Resumed by as many processes as saved
it, each rank gets its own states back and the run continues exactly; by another number,
each rank re-seeds from the step and its rank (the data order is global, only sampling
differs). `version` is checked on load: a checkpoint in another format, such as format 1
(before: `model/` + the optimizer inside `trainer_state.pt`, `sharded/` under torchrun),
fails with a ValueError that says what to do.

The directory is built whole under a hidden sibling name `.checkpoint.tmp-XXXXXXXX` and only
then swapped in (grpo.files), so at every moment a complete checkpoint exists on disk; the one
window where `checkpoint` itself is absent (between the two renames of the swap) is repaired
by `find_checkpoint`. One run writes a run directory at a time; leftovers of a crashed save
are removed by the next successful one.

A file whose bytes changed after the save (a flipped bit on the disk, a copy cut short, a shard
from another checkpoint) fails the checksum and the checkpoint is refused, naming the file,
before the model is touched: DCP would otherwise load damaged tensor data without noticing.
A checkpoint saved before checksums were recorded (no `checksums.json`, and no `checksums`
key in its trainer state) is loaded unchecked, as before.

`trainer_state.pt` holds only tensors and plain values and is read with
`torch.load(weights_only=True)`. DCP itself unpickles its `.metadata` and the optimizer's
non-tensor values (torch 2.13): load only checkpoints you trust, as with any DCP checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed, files
from . import lora as lora_mod

CHECKPOINT_NAME = "checkpoint"
DCP_DIR = "dcp"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"  # LoRA checkpoints: in place of model/
TRAINER_STATE = "trainer_state.pt"
STATE_JSON = "state.json"
CHECKSUMS = "checksums.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
FORMAT_VERSION = 2
_PARTS = (DCP_DIR, MODEL_DIR, TRAINER_STATE, STATE_JSON)
_TRAINER_KEYS = ("version", "scheduler", "rng", "state")


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    tokenizer: object | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    state: dict[str, Any],
) -> Path:
    """Write a complete checkpoint to `path`, replacing any previous one atomically.

    A collective under torchrun: every rank calls it (each writes its shard of dcp/; rank 0
    writes the rest). state: JSON-able trainer state (step, data position, ...); it comes back
    from `load_checkpoint` as given. Returns `path`.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    # Serialise first: a state that is not JSON-able fails before anything is written.
    state_text = json.dumps(state, indent=2) + "\n"
    main = distributed.is_main()
    rngs = distributed.all_gather_objects(capture_rng())
    temp = distributed.broadcast_object(files.temp_path(path))
    with (
        _full_disk_named(path, model, optimizer),
        files.atomic_path(path, temp=temp, owner=main) as tmp,
    ):
        if main:
            tmp.mkdir()
        distributed.barrier()
        adapter_only = _adapter_only(model)
        if adapter_only:
            lora_mod.save_adapter(model, tokenizer, tmp / ADAPTER_DIR)
        else:
            lora_mod.save_full_model(model, tokenizer, tmp / MODEL_DIR)
        # get_state_dict gives an optimizer without state (a checkpoint before the first
        # step: the cold start's) a zero state by taking a step with learning rate 0. That
        # state, Adam's step count among it, must not carry over into the run.
        fresh = not optimizer.state
        model_state, optim_state = get_state_dict(
            model, optimizer, options=_state_options(adapter_only)
        )
        if fresh:
            optimizer.state.clear()
        with _dcp_errors():
            _dcp().save(
                {"model": model_state, "optimizer": optim_state},
                checkpoint_id=str(tmp / DCP_DIR),
                no_dist=not distributed.is_distributed(),
            )
        distributed.barrier()
        if main:
            trainer_state = {
                "version": FORMAT_VERSION,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rngs,
                "state": state,
                "optimizer_fresh": fresh,
                # A checkpoint of ours that lacks checksums.json was damaged, not older.
                "checksums": CHECKSUMS,
            }
            files.torch_save(trainer_state, tmp / TRAINER_STATE)
            _write_checksums(tmp, {STATE_JSON: state_text.encode()})
            # Written last: a temp dir holding state.json is complete (find_checkpoint).
            (tmp / STATE_JSON).write_text(state_text)
    if main:
        _remove_leftovers(path)
    distributed.barrier()
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

    A collective under torchrun. The model may be plain or FSDP2-sharded, over any number of
    processes. Weights and optimizer state are copied into the model's own parameters and the
    optimizer's own state (so references to them stay valid), in their dtypes and on their
    devices; Python, NumPy, torch and CUDA RNG states are restored last, so the run continues
    exactly as if it had never stopped. The format version, the files, the scheduler and the
    names and shapes of every saved tensor are checked before the model is modified:
    FileNotFoundError for missing pieces, ValueError for another format and unreadable or
    mismatched pieces, each naming the path. Before all that, every file's checksum: a file
    whose bytes changed since the save is a ValueError naming it.
    device: where the trainer's tensors live (`trainer_state.pt` is mapped there).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no checkpoint directory")
    # Rank 0 reads every file once; the verdict goes to all ranks.
    found = distributed.broadcast_object(_checksum_error(path) if distributed.is_main() else None)
    if found:
        missing, message = found
        raise FileNotFoundError(message) if missing else ValueError(message)
    # The version first: a checkpoint of another format lacks some of this format's parts.
    if (path / TRAINER_STATE).exists():
        trainer_state = _read_trainer_state(path, device)
        if trainer_state.get("checksums") and not (path / CHECKSUMS).exists():
            raise ValueError(
                f"{path / CHECKSUMS}: missing, so the checkpoint cannot be checked; restore the "
                f"file, or start the run again with --overwrite"
            )
    adapter_only = _adapter_only(model)
    if adapter_only or (path / ADAPTER_DIR).is_dir():  # a LoRA run, or a LoRA checkpoint
        mismatch = lora_mod.checkpoint_mismatch(path, lora_mod.settings_of(model), model)
        if mismatch:
            raise ValueError(mismatch)
    missing = [name for name in _parts(adapter_only) if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    if scheduler is not None and trainer_state["scheduler"] is None:
        raise ValueError(f"{path}: checkpoint was saved without a scheduler, but one was given")

    # State dicts of the model's and optimizer's own tensors, keyed by parameter name as saved
    # (a fresh optimizer first gets its zero state, from a step with learning rate 0): DCP
    # reads into them, each process its own slice, and set_state_dict installs them.
    model_state, optim_state = get_state_dict(
        model, optimizer, options=_state_options(adapter_only)
    )
    _check_saved_tensors(path / DCP_DIR, model_state, optim_state)
    loaded = {"model": model_state, "optimizer": optim_state}
    try:
        with _dcp_errors():
            _dcp().load(
                loaded, checkpoint_id=str(path / DCP_DIR), no_dist=not distributed.is_distributed()
            )
    except Exception as e:  # truncated or corrupt shards
        raise ValueError(
            f"{path / DCP_DIR}: cannot load into this model and optimizer ({type(e).__name__}: {e})"
        ) from e
    set_state_dict(
        model,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optimizer"],
        options=_state_options(adapter_only, load=True),
    )
    if trainer_state.get("optimizer_fresh"):  # saved before the first step: see save
        optimizer.state.clear()
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    _restore_rngs(trainer_state)
    return trainer_state["state"]


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
    candidates = newest_first(f".{CHECKPOINT_NAME}.tmp-*") + newest_first(
        f".{CHECKPOINT_NAME}.old-*"
    )
    if not candidates:
        return None
    files.replace(candidates[0], path)
    _remove_leftovers(path)
    return path


def file_digests(root: Path, names: list[str]) -> dict[str, str]:
    """{name: SHA-256 hex digest} of the files root/name. Several files are hashed at once:
    hashlib releases the GIL, and a checkpoint holds a few large files (the shards)."""

    def digest(name: str) -> str:
        h = hashlib.sha256()
        with open(root / name, "rb") as f:  # (hashlib.file_digest is Python >= 3.11 only)
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(digest, names), strict=True))


def _write_checksums(directory: Path, pending: dict[str, bytes]) -> None:
    """directory/checksums.json: the SHA-256 of every file in the directory, and of the
    files in `pending` ({name: contents}) that are written after it."""
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    digests = file_digests(directory, names)
    digests.update({name: hashlib.sha256(data).hexdigest() for name, data in pending.items()})
    record = {"algorithm": "sha256", "files": dict(sorted(digests.items()))}
    (directory / CHECKSUMS).write_text(json.dumps(record, indent=1) + "\n")


def _checksum_error(path: Path) -> tuple[bool, str] | None:
    """(whether files are missing, why) when the checkpoint at `path` cannot be trusted: a
    file missing, or changed since the save (naming it); None when every file is as saved,
    and for a checkpoint without checksums.json (an older one)."""
    manifest = path / CHECKSUMS
    if not manifest.exists():
        return None
    try:
        recorded = json.loads(manifest.read_text())["files"]
        if not isinstance(recorded, dict):
            raise TypeError(f"'files' is a {type(recorded).__name__}")
        # A digest damaged into another well-formed one would blame its file instead.
        bad = [n for n, d in recorded.items() if not (isinstance(d, str) and _SHA256.fullmatch(d))]
        if bad:
            raise ValueError(f"not a SHA-256 digest for {_first(sorted(bad))}")
    except Exception as e:
        return False, (
            f"{manifest}: unreadable ({type(e).__name__}: {e}); restore it from a copy, or "
            f"start the run again with --overwrite"
        )
    missing = sorted(name for name in recorded if not (path / name).is_file())
    if missing:
        return True, f"{path}: incomplete checkpoint, missing {_first(missing)}"
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    unlisted = sorted(present - set(recorded) - {CHECKSUMS})
    if unlisted:  # a name damaged in checksums.json, or a file from elsewhere
        return False, (
            f"{manifest}: does not list {_first(unlisted)}, which the checkpoint holds; "
            f"restore the checkpoint from a copy, or start the run again with --overwrite"
        )
    digests = file_digests(path, sorted(recorded))
    changed = sorted(name for name, digest in digests.items() if digest != recorded[name])
    if changed:
        return False, (
            f"{path / changed[0]}: damaged, its contents differ from the checksum recorded at "
            f"the save"
            + (f" (and {_first(changed[1:])})" if len(changed) > 1 else "")
            + "; nothing was loaded. Restore the checkpoint from a copy, or start the run "
            "again with --overwrite"
        )
    return None


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
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].cpu().numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    # RNG states must be CPU byte tensors, whatever map_location the file was loaded with.
    torch.set_rng_state(states["torch"].cpu())
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), i)


def _restore_rngs(trainer_state: dict) -> None:
    """This rank's RNG states; with another number of processes than the run that saved them,
    seeds from the step and rank instead (the data order is global, only sampling differs)."""
    rngs = trainer_state["rng"]
    if len(rngs) == distributed.world_size():
        restore_rng(rngs[distributed.rank()])
        return
    step = int(trainer_state["state"].get("step", 0))
    seed = 1_000_003 * step + distributed.rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _full_disk_named(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """A checkpoint write that failed for lack of space raises OSError(ENOSPC), whoever wrote.

    DCP writes its shards with torch.save into a stream, whose zip writer reports a full disk
    as a RuntimeError ("unexpected pos"); when the filesystem then has less room than the
    checkpoint needs, that is what happened, and the error says so."""
    try:
        yield
    except RuntimeError as e:
        tensors = [p for p in model.parameters()] + [
            t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
        ]
        needed = sum(t.numel() * t.element_size() for t in tensors) + sum(
            p.numel() * p.element_size() for p in model.parameters()
        )  # dcp/ (weights and optimizer state) and the weights again in model/
        free = shutil.disk_usage(path.parent).free
        if free >= needed:
            raise
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: the checkpoint needs about {needed / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free",
            str(path),
        ) from e


def _dcp():
    """torch.distributed.checkpoint, imported on first use (it pulls in much of torch)."""
    import torch.distributed.checkpoint as dcp

    return dcp


@contextmanager
def _dcp_errors():
    """Around a DCP save or load: this process's own error, and no single-process warning.

    DCP reports any failure, KeyboardInterrupt included, as a CheckpointException (a
    BaseException) that lists every rank's; this rank's own exception is raised instead, so
    Ctrl-C stays a KeyboardInterrupt and a full disk an OSError. Another rank's failure
    becomes a RuntimeError. DCP also warns on every single-process call that it assumes one
    process: that is what we ask for (no_dist), so the warning is dropped.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
            )
            yield
    except CheckpointException as e:
        own = e.failures.get(distributed.rank())
        if own is None:
            raise RuntimeError(str(e)) from e
        exc = own[0]
        raise exc.with_traceback(exc.__traceback__) from exc.__cause__


def _read_trainer_state(path: Path, device: str | torch.device) -> dict[str, Any]:
    """trainer_state.pt, checked: readable, a dict, our format version, every key present."""
    file = path / TRAINER_STATE
    try:
        trainer_state = torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt or foreign file: torch raises many kinds
        raise ValueError(f"{file}: cannot read trainer state ({type(e).__name__}: {e})") from e
    if not isinstance(trainer_state, dict):
        raise ValueError(f"{file}: not a trainer state (a {type(trainer_state).__name__})")
    version = trainer_state.get("version")
    if version is not None and version != FORMAT_VERSION:
        raise ValueError(_other_format(path, version))
    missing = [key for key in _TRAINER_KEYS if key not in trainer_state]
    if missing:
        raise ValueError(f"{file}: trainer state lacks {', '.join(missing)}")
    return trainer_state


def _other_format(path: Path, version: Any) -> str:
    if isinstance(version, int) and version < FORMAT_VERSION:
        return (
            f"{path}: checkpoint format {version}, written by an older version of this trainer "
            f"(model/ and trainer_state.pt, without {DCP_DIR}/); this version reads format "
            f"{FORMAT_VERSION} only. Resume it with the version that wrote it, or start a new "
            f"run from its weights: --model {path / MODEL_DIR} (the optimizer, scheduler and "
            f"data position start afresh)"
        )
    return (
        f"{path}: checkpoint format {version!r}; this version of the trainer reads format "
        f"{FORMAT_VERSION} only (a newer trainer wrote it?)"
    )


def _check_saved_tensors(dcp_dir: Path, model_state: dict, optim_state: dict) -> None:
    """Compare what dcp/ holds (names, shapes, number of parameter groups; from its metadata)
    with the model and optimizer given, so that a mismatch fails before anything is loaded."""
    try:
        saved = _dcp().FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata
    except Exception as e:
        raise ValueError(f"{dcp_dir}: cannot read its metadata ({type(e).__name__}: {e})") from e

    def mismatches(prefix: str, given: dict[str, Any]) -> list[str]:
        names = {key for key in saved if key.startswith(prefix)}
        bad = sorted(names ^ set(given))
        for key, value in given.items():
            size = getattr(saved.get(key), "size", None)
            if size is not None and isinstance(value, torch.Tensor) and value.shape != size:
                bad.append(key)
        return sorted({key[len(prefix) :] for key in bad})

    bad = mismatches("model.", {f"model.{k}": v for k, v in model_state.items()})
    if bad:
        raise ValueError(f"{dcp_dir}: weights do not match the model: {_first(bad)}")
    given_state = {
        f"optimizer.state.{name}.{key}": value
        for name, values in optim_state["state"].items()
        for key, value in values.items()
    }
    bad = mismatches("optimizer.state.", given_state)
    groups = {key.split(".")[2] for key in saved if key.startswith("optimizer.param_groups.")}
    if bad or len(groups) != len(optim_state["param_groups"]):
        raise ValueError(
            f"{dcp_dir}: optimizer parameter groups do not match the checkpoint's "
            f"({len(groups)} groups saved, {len(optim_state['param_groups'])} given"
            + (f"; state differs for {_first(bad)})" if bad else ")")
        )


def _first(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _is_complete(path: Path) -> bool:
    return any(all((path / name).exists() for name in _parts(a)) for a in (False, True))


def _adapter_only(model: torch.nn.Module) -> bool:
    """A LoRA policy (grpo.lora): its checkpoints hold the adapters, not the base."""
    return lora_mod.is_lora(model)


def _parts(adapter_only: bool) -> tuple[str, ...]:
    """What a complete checkpoint holds: adapter/ in place of model/ for LoRA."""
    return tuple(ADAPTER_DIR if adapter_only and p == MODEL_DIR else p for p in _PARTS)


def _state_options(adapter_only: bool, *, load: bool = False):
    """DCP's state-dict options: LoRA saves and loads the trainable parameters (the adapters)
    only, the base being frozen; on load the base is then absent from the state by design
    (the names and shapes of what is present are checked by _check_saved_tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=adapter_only, strict=not (adapter_only and load))


def _remove_leftovers(path: Path) -> None:
    """Delete temp and moved-aside dirs of `path` that crashed saves left behind (each can
    be a whole model); only called once a complete checkpoint is in place."""
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for stale in path.parent.glob(pattern):
            files.remove(stale)
