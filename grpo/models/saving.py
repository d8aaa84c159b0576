"""save_model: a transformers model (+ tokenizer) -> a Hugging Face directory.

Experts are written one tensor per expert and projection, as the original checkpoints
and transformers' own save_pretrained store them, so any HF tool can read the result.
Shards are cut at max_shard_size with a model.safetensors.index.json; one shard is a
plain model.safetensors. Everything is written into a temporary sibling directory that
replaces `path` only once complete, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from .layout import check_family, checkpoint_name, expert_checkpoint_name, is_stacked_experts

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def save_model(
    model: PreTrainedModel,
    tokenizer: object | None,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model (config, generation config, safetensors shards) and tokenizer to path.

    state_dict: the tensors to write instead of model.state_dict() (e.g. the gathered full
    state of a sharded model); same names."""
    path = Path(path)
    model_type = model.config.model_type
    check_family(model_type, type(model).__name__)
    limit = _parse_size(max_shard_size)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_shards(model, tmp, limit, state_dict)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * _UNITS[unit])
    return int(text)


def _checkpoint_tensors(
    model: PreTrainedModel, state_dict: dict[str, torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every saved tensor; experts split per expert. Views are
    yielded; the shard writer copies them to host memory one shard at a time."""
    model_type = model.config.model_type
    names = {name for name, _ in model.named_parameters()}  # tied duplicates removed
    names |= {name for name, _ in model.named_buffers()}
    state = model.state_dict() if state_dict is None else state_dict
    for name, tensor in state.items():
        if name not in names:
            continue
        if not is_stacked_experts(name):
            yield checkpoint_name(name, model_type), tensor
            continue
        for e in range(tensor.shape[0]):
            if name.endswith("down_proj"):
                yield expert_checkpoint_name(name, e, "down", model_type), tensor[e]
            else:
                inter = tensor.shape[1] // 2
                yield expert_checkpoint_name(name, e, "gate", model_type), tensor[e, :inter]
                yield expert_checkpoint_name(name, e, "up", model_type), tensor[e, inter:]


def _write_shards(
    model: PreTrainedModel,
    directory: Path,
    limit: int,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in _checkpoint_tensors(model, state_dict):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        # Own contiguous host copies: safetensors refuses views that share storage.
        tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in shard}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move tmp into place; an existing checkpoint is moved aside first, removed after."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
