"""How checkpoint tensor names map onto the parameters of transformers' model classes.

Hugging Face checkpoints store MoE experts one tensor per expert and projection:
    ...mlp.experts.{e}.gate_proj.weight (I, H)    ...mlp.experts.{e}.up_proj.weight (I, H)
    ...mlp.experts.{e}.down_proj.weight (H, I)
    Mixtral: ...block_sparse_moe.experts.{e}.w1 / w3 / w2.weight (gate / up / down)
while transformers (5.x) computes with stacked experts:
    ...mlp.experts.gate_up_proj (E, 2I, H) = [gate; up] per expert
    ...mlp.experts.down_proj    (E, H, I)
This module is the two-way name map; loading.py and saving.py do the I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DENSE_FAMILIES = ("qwen2", "qwen3", "llama")
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3")
SUPPORTED_FAMILIES = DENSE_FAMILIES + MOE_FAMILIES

# Renames from checkpoint names to model names, per family (applied in order).
_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {"mixtral": ((".block_sparse_moe.", ".mlp."),)}
# Per-expert projection names in checkpoints: gate, up, down.
_PROJ_NAMES: dict[str, tuple[str, str, str]] = {"mixtral": ("w1", "w3", "w2")}
_DEFAULT_PROJ = ("gate_proj", "up_proj", "down_proj")
_PART_OF_PROJ = {
    "gate_proj": "gate",
    "w1": "gate",
    "up_proj": "up",
    "w3": "up",
    "down_proj": "down",
    "w2": "down",
}
_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and tensor."""


@dataclass(frozen=True)
class ExpertPiece:
    """One expert's projection inside a stacked experts tensor."""

    param: str  # model parameter name, e.g. model.layers.3.mlp.experts.gate_up_proj
    expert: int
    part: str  # "gate", "up" or "down"


def check_family(model_type: str, where: str) -> None:
    if model_type not in SUPPORTED_FAMILIES:
        raise CheckpointError(
            f"{where}: unsupported model_type {model_type!r}; supported: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )


def to_model_name(key: str, model_type: str) -> str | ExpertPiece:
    """Checkpoint tensor name -> model parameter/buffer name, or the expert piece it fills."""
    for old, new in _RENAMES.get(model_type, ()):
        key = key.replace(old, new)
    match = _EXPERT_KEY.match(key)
    if match is None:
        return key
    # Either naming is accepted on load (transformers 5 itself writes Mixtral both ways).
    part = _PART_OF_PROJ.get(match["proj"])
    if part is None:
        return key  # not a projection we stack: left for the unexpected-tensor check
    stacked = "gate_up_proj" if part in ("gate", "up") else "down_proj"
    return ExpertPiece(f"{match['prefix']}.{stacked}", int(match["expert"]), part)


def expert_checkpoint_name(param: str, expert: int, part: str, model_type: str) -> str:
    """Inverse of to_model_name for one expert piece."""
    prefix = param.rsplit(".", 1)[0]  # ...mlp.experts
    for old, new in reversed(_RENAMES.get(model_type, ())):
        prefix = prefix.replace(new, old)
    gate, up, down = _PROJ_NAMES.get(model_type, _DEFAULT_PROJ)
    proj = {"gate": gate, "up": up, "down": down}[part]
    return f"{prefix}.{expert}.{proj}.weight"


def checkpoint_name(param: str, model_type: str) -> str:
    """Inverse of to_model_name for a tensor stored as is."""
    for old, new in reversed(_RENAMES.get(model_type, ())):
        param = param.replace(new, old)
    return param


def is_stacked_experts(param: str) -> bool:
    return param.endswith(".experts.gate_up_proj") or param.endswith(".experts.down_proj")
