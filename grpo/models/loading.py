"""load_model: a local Hugging Face checkpoint -> (transformers model, tokenizer).

The model is built with its parameters on the meta device (buffers such as rotary
frequencies are computed for real), every parameter is then allocated once on the target
device and dtype, and each checkpoint tensor is streamed into it: one safe_open per shard,
one tensor in host memory at a time, per-expert tensors copied straight into their slice
of the stacked (E, 2I, H) / (E, H, I) expert parameters. Every parameter must be filled
exactly: missing, unexpected and mis-shaped tensors are CheckpointErrors naming the file
and tensor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from grpo.kernels import moe_experts

from .layout import CheckpointError, ExpertPiece, check_family, to_model_name

MOE_BACKENDS = ("auto", "grouped_mm", "eager", "triton")
ATTN_BACKENDS = ("auto", "sdpa", "eager", "flash_attention_2")
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    moe_backend: str = "auto",
    attn: str = "auto",
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM (dense or MoE) and its tokenizer from a local HF-format directory.

    dtype: floating dtype of the parameters (fp32 buffers and the modules transformers
    keeps in fp32 stay fp32). moe_backend: experts implementation in transformers' experts
    dispatch ("auto": grouped_mm on CUDA, eager on CPU). attn: "auto" picks flash-attn 2
    when installed and on CUDA, else SDPA. The model is returned in train mode.
    """
    path = Path(path)
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating torch dtype, got {dtype}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: not a JSON file ({e})") from e
    config = AutoConfig.from_pretrained(path)
    check_family(config.model_type, str(config_file))

    config._attn_implementation = _pick_attn(attn, device)
    with _parameters_on_meta():
        # Built in fp32 whatever config.json says: buffers (rotary frequencies, router
        # biases) stay fp32; parameters get `dtype` when they are allocated.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _set_experts_backend(model, moe_backend, device)
    model.config.dtype = dtype
    _materialise(model, dtype, device)
    _stream_checkpoint(model, path, config.model_type)
    model.train()
    return model, _load_tokenizer(path)


def _pick_attn(attn: str, device: torch.device) -> str:
    if attn not in ATTN_BACKENDS:
        raise ValueError(f"unknown attn {attn!r}; expected one of {ATTN_BACKENDS}")
    if attn != "auto":
        return attn
    has_flash = importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if has_flash and device.type == "cuda" else "sdpa"


def _set_experts_backend(model: PreTrainedModel, moe_backend: str, device: torch.device) -> None:
    if moe_backend not in MOE_BACKENDS:
        raise ValueError(f"unknown moe_backend {moe_backend!r}; expected one of {MOE_BACKENDS}")
    if not any(hasattr(m, "gate_up_proj") for m in model.modules()):
        return  # dense model
    if moe_backend == "auto":
        # grouped_mm until our kernel has been measured faster on the device.
        moe_backend = "grouped_mm" if device.type == "cuda" else "eager"
    if moe_backend == "triton":
        register_triton_experts()
        for module in model.modules():
            if hasattr(module, "gate_up_proj"):
                _check_triton_experts(module)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(moe_backend)
    else:  # transformers versions that only read the config
        model.config._experts_implementation = moe_backend


def _triton_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts interface -> grpo.kernels.moe_experts (stacked SwiGLU experts)."""
    return moe_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)


def register_triton_experts() -> None:
    """Make "triton" a valid experts implementation in transformers' dispatch."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("triton", _triton_experts_forward)


def _check_triton_experts(module: nn.Module) -> None:
    """Our kernel computes silu(gate) * up with [gate; up] stacked, no bias, not transposed."""
    act = type(getattr(module, "act_fn", None)).__name__
    unsupported = [
        name
        for name, bad in (
            ("bias", getattr(module, "has_bias", False)),
            ("transposed weights", getattr(module, "is_transposed", False)),
            ("interleaved gate/up", not getattr(module, "is_concatenated", True)),
            (f"activation {act}", act not in ("SiLU", "SiLUActivation")),
        )
        if bad
    ]
    if unsupported:
        raise ValueError(
            f"moe_backend='triton' does not support {', '.join(unsupported)} "
            f"in {type(module).__name__}; use grouped_mm"
        )


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init) and buffers for real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _keeps_fp32(model: PreTrainedModel, name: str) -> bool:
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return any(k in name.split(".") or name.endswith(k) for k in keep)


def _materialise(model: PreTrainedModel, dtype: torch.dtype, device: torch.device) -> None:
    """Allocate every meta parameter once (tied parameters stay one tensor) on the device."""
    new_params: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in new_params:
                full = f"{module_name}.{name}" if module_name else name
                want = torch.float32 if _keeps_fp32(model, full) else dtype
                data = torch.empty(param.shape, dtype=want, device=device)
                new_params[id(param)] = nn.Parameter(data, param.requires_grad)
            module._parameters[name] = new_params[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index or from the *.safetensors files."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(), object_pairs_hook=_no_repeats)["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        shards = {name: path / file for name, file in weight_map.items()}
        for shard in sorted(set(shards.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index} names shard {shard.name}, which does not exist")
        return shards
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    shards: dict[str, Path] = {}
    for file in files:
        with _open_shard(file) as f:
            for name in f.keys():
                if name in shards:  # which copy is right cannot be told: neither is loaded
                    raise CheckpointError(
                        f"{name} is in two shards, {shards[name].name} and {file.name}"
                    )
                shards[name] = file
    return shards


def _no_repeats(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique (json.loads keeps the last of repeated keys)."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"{key} is listed twice")
        seen[key] = value
    return seen


@contextlib.contextmanager
def _open_shard(file: Path) -> Iterator:
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from e
    with handle as f:
        yield f


def _stream_checkpoint(model: PreTrainedModel, path: Path, model_type: str) -> None:
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    aliases = _tied_aliases(model)
    ignore = [re.compile(p) for p in model._keys_to_ignore_on_load_unexpected or ()]
    non_persistent = {
        f"{mn}.{b}" if mn else b
        for mn, m in model.named_modules()
        for b in m._non_persistent_buffers_set
    }
    loaded: set[str] = set()
    pieces: dict[str, set[tuple[int, str]]] = defaultdict(set)

    by_file: dict[Path, list[str]] = defaultdict(list)
    for key, file in _weight_map(path).items():
        by_file[file].append(key)
    for file, keys in sorted(by_file.items()):
        with _open_shard(file) as f:
            available = set(f.keys())
            unindexed = sorted(available - set(keys))
            if unindexed:  # the index places them elsewhere, or nowhere: ambiguous either way
                raise CheckpointError(
                    f"{file} holds {_some(unindexed)}, which the index "
                    f"(model.safetensors.index.json) does not place in this shard"
                )
            for key in keys:
                if key not in available:
                    raise CheckpointError(f"{file}: index says it holds {key}, but it does not")
                name = to_model_name(key, model_type)
                if isinstance(name, ExpertPiece):
                    _copy_piece(f, key, file, name, targets)
                    pieces[name.param].add((name.expert, name.part))
                    continue
                if name in aliases:
                    continue  # tied to a parameter loaded under its other name
                if name not in targets:
                    if name in non_persistent or any(p.search(name) for p in ignore):
                        continue
                    raise CheckpointError(
                        f"{file}: unexpected tensor {key} (no such parameter "
                        f"or buffer in {type(model).__name__})"
                    )
                _copy(f, key, file, targets[name], adopt=True)
                loaded.add(name)
    _check_complete(path, targets, aliases, non_persistent, loaded, pieces)


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _tied_aliases(model: PreTrainedModel) -> set[str]:
    kept = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept


def _read(f, key: str, file: Path, expected: tuple[int, ...]) -> torch.Tensor:
    found = tuple(f.get_slice(key).get_shape())
    if found != expected:
        raise CheckpointError(f"{file}: tensor {key} has shape {found}, expected {expected}")
    try:
        tensor = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read tensor {key} ({e})") from e
    if not tensor.dtype.is_floating_point:
        raise CheckpointError(f"{file}: tensor {key} has dtype {tensor.dtype}, expected floating")
    return tensor


def _copy(f, key: str, file: Path, target: torch.Tensor, adopt: bool = False) -> None:
    """Fill target from the checkpoint. With adopt, a host tensor of the same dtype takes
    the file's memory-mapped storage instead (no copy; pages are read when first used and
    copied on first write, so the file is never modified)."""
    tensor = _read(f, key, file, tuple(target.shape))
    if adopt and target.device.type == "cpu" and tensor.dtype == target.dtype:
        target.data = tensor
        return
    with torch.no_grad():
        target.copy_(tensor)


def _copy_piece(f, key: str, file: Path, piece: ExpertPiece, targets: dict) -> None:
    stacked = targets.get(piece.param)
    if stacked is None:
        raise CheckpointError(
            f"{file}: unexpected tensor {key} (no stacked experts {piece.param} in the model)"
        )
    if piece.expert >= stacked.shape[0]:
        raise CheckpointError(
            f"{file}: tensor {key} is expert {piece.expert}, but the model "
            f"has {stacked.shape[0]} experts"
        )
    if piece.part == "down":
        view = stacked[piece.expert]  # (H, I)
    else:
        inter = stacked.shape[1] // 2
        view = (
            stacked[piece.expert, :inter] if piece.part == "gate" else stacked[piece.expert, inter:]
        )  # (I, H)
    _copy(f, key, file, view)


def _check_complete(path, targets, aliases, non_persistent, loaded, pieces) -> None:
    missing = []
    for name, tensor in targets.items():
        if name in loaded or name in non_persistent or name in aliases:
            continue
        if name in pieces:
            parts = ("down",) if name.endswith("down_proj") else ("gate", "up")
            want = {(e, p) for e in range(tensor.shape[0]) for p in parts}
            missing += [f"{name}[expert {e}].{p}" for e, p in sorted(want - pieces[name])]
            continue
        missing.append(name)
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(
            f"{path}: tensors missing from the checkpoint: {', '.join(missing[:8])}{more}"
        )


def _load_tokenizer(path: Path):
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer files (expected one of {_TOKENIZER_FILES})")
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("tokenizer_class") in _GENERIC_TOKENIZERS and (path / "tokenizer.json").is_file():
        # AutoTokenizer would pick the model family's class (e.g. Qwen2Tokenizer), which
        # rebuilds the pipeline and silently changes how a custom tokenizer.json encodes.
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
