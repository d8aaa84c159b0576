"""LoRA policies with peft: `--lora-rank R` trains low-rank adapters instead of the model.

The adapters are injected in place (`peft.inject_adapter_in_model`): the policy stays the
transformers model it was, so `generate`, FSDP2's `fully_shard`, routing replay and the fused
lm_head loss see the same object, and every base weight is frozen (`requires_grad=False`;
the optimizer holds the adapters only). Adapters are kept in fp32 whatever the base dtype
(as peft's `autocast_adapter_dtype`).

    targets     by default every linear projection of attention and of the dense MLP (MoE:
                attention and the shared experts); never the lm_head, the embeddings or a
                router. The stacked routed experts (E, 2I, H) / (E, H, I) are adapted only when
                asked (`--lora-target-parameters`, peft's `target_parameters`): peft then adds
                W + B A to the whole expert stack in every forward, a transient copy of the
                layer's expert weights, which a model that needs LoRA to fit can rarely afford.
    reference   the policy with its adapters switched off (`adapters_disabled`): the frozen
                reference of the KL term costs no memory at all.
    cold start  the supervised warm-up trains the adapters too; they are then merged into
                the base and restarted at zero (`merge_and_reset`), so the reference (the base)
                is the cold-started policy, as in full fine-tuning, and `cold-start/` holds
                the base the GRPO adapters apply to.
    export      `save_merged`: base + adapters merged, in Hugging Face layout under the
                original parameter names (transformers and `load_model` read it);
                `save_adapter`: PEFT's own format (`adapter_config.json`,
                `adapter_model.safetensors`; `PeftModel.from_pretrained` reads it), whose
                `base_model_name_or_path` names the base directory. `merged_weights` streams
                the merged tensors one at a time (the vLLM engine's weight push).
    checkpoints adapter-only (grpo.checkpoint): `dcp/` holds the adapters and their optimizer
                state, `adapter/` the adapters in PEFT's format; the base is re-read from
                `cold-start/` (or the model) on --resume (`resume_base`).

Everything here also works on an FSDP2-sharded model: full tensors are gathered one at a time
(`full_tensor`, a collective every rank enters in the same order) and written back shard by
shard.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grpo.models import load_model, save_model

from . import distributed as dist_mod
from . import files

ADAPTER = "default"  # peft's adapter name; PEFT's files store the weights without it
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PeftModel's prefix of the model's own parameter names
_ATTR = "_grpo_lora_config"  # the peft LoraConfig of an adapted model
# peft's name for "every linear layer": accepted as --lora-target-modules all-linear.
ALL_LINEAR = "all-linear"
# --lora-target-parameters experts: both stacked expert projections of every MoE layer.
EXPERTS = "experts"
_EXPERT_PARAMS = ("experts.gate_up_proj", "experts.down_proj")

LR_HELP = (
    "peak learning rate (with --lora-rank: the adapters' rate, usually about 10x the full "
    "fine-tuning rate, e.g. 1e-5 to 2e-4)"
)


@dataclass(frozen=True)
class LoRASettings:
    """The adapters asked for: rank r, scale alpha (the update is alpha / r x B A), dropout on
    the adapters' input, and the names of the targets (empty: the defaults)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    target_parameters: tuple[str, ...] = ()

    @classmethod
    def create(
        cls,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules=(),
        target_parameters=(),
    ) -> LoRASettings | None:
        """The settings of the flags, or None for rank 0 (LoRA off); bad values raise one
        ValueError naming each."""
        errors = check_settings(rank, alpha, dropout, target_modules, target_parameters)
        if errors:
            raise ValueError("bad configuration: " + "; ".join(errors))
        if rank == 0:
            return None
        return cls(
            rank,
            float(alpha) if alpha is not None else 2.0 * rank,
            float(dropout),
            tuple(target_modules),
            tuple(target_parameters),
        )

    @classmethod
    def from_config(cls, cfg) -> LoRASettings | None:
        """From GRPOConfig's lora section (None: full fine-tuning)."""
        c = cfg.lora
        return cls.create(
            c.lora_rank,
            c.lora_alpha,
            c.lora_dropout,
            c.lora_target_modules,
            c.lora_target_parameters,
        )

    def flags(self) -> str:
        """The command-line flags that ask for these adapters."""
        out = f"--lora-rank {self.rank} --lora-alpha {self.alpha:g}"
        if self.target_modules:
            out += " --lora-target-modules " + " ".join(self.target_modules)
        if self.target_parameters:
            out += " --lora-target-parameters " + " ".join(self.target_parameters)
        return out


def check_settings(rank, alpha, dropout, target_modules, target_parameters) -> list[str]:
    """Every problem with these LoRA flags, as messages (empty: fine)."""
    errors = []
    if not isinstance(rank, int) or rank < 0:
        errors.append(f"lora_rank must be an integer >= 0 (0: full fine-tuning), got {rank!r}")
        return errors
    if rank == 0:
        given = [
            name
            for name, value in (
                ("--lora-alpha", alpha is not None),
                ("--lora-dropout", bool(dropout)),
                ("--lora-target-modules", bool(target_modules)),
                ("--lora-target-parameters", bool(target_parameters)),
            )
            if value
        ]
        if given:
            errors.append(
                f"{', '.join(given)} given without --lora-rank: LoRA needs a rank >= 1 "
                f"(e.g. --lora-rank 16); rank 0 trains the full model"
            )
        return errors
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        errors.append(f"lora_alpha must be finite and > 0, got {alpha}")
    if not (math.isfinite(dropout) and 0 <= dropout < 1):
        errors.append(f"lora_dropout must lie in [0, 1), got {dropout}")
    if target_parameters and dropout:
        errors.append(
            "--lora-target-parameters (stacked experts) needs --lora-dropout 0: peft cannot "
            "apply dropout to the input of a parameter's update"
        )
    for name in list(target_modules) + list(target_parameters):
        if not isinstance(name, str) or not name.strip():
            errors.append(f"LoRA target names must be non-empty strings, got {name!r}")
    return errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """grpo-sft's LoRA flags (grpo-train's come from grpo.config's lora section)."""
    group = parser.add_argument_group("lora")
    group.add_argument(
        "--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0: full model)"
    )
    group.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha [2 x rank]")
    group.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    group.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=[],
        help="linear projections to adapt [attention and dense MLP]",
    )
    group.add_argument(
        "--lora-target-parameters",
        nargs="+",
        default=[],
        help="MoE: stacked expert parameters to adapt, e.g. experts [none]",
    )


def settings_from_args(args: argparse.Namespace) -> LoRASettings | None:
    return LoRASettings.create(
        args.lora_rank,
        args.lora_alpha,
        args.lora_dropout,
        args.lora_target_modules,
        args.lora_target_parameters,
    )


# --- targets ----------------------------------------------------------------------------


def _layer_prefixes(model: nn.Module) -> list[str]:
    """Module names of the decoder layers (where adapters may go)."""
    layers = {id(layer) for layer in dist_mod.decoder_layers(model)}
    return [name + "." for name, m in model.named_modules() if id(m) in layers]


def default_target_modules(model: nn.Module) -> list[str]:
    """The leaf names of every nn.Linear inside the decoder layers except gates (routers and
    Qwen2-MoE's shared-expert gate): attention, the dense MLP and shared experts."""
    names = set()
    for layer in dist_mod.decoder_layers(model):
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and not leaf.endswith("gate"):
                names.add(leaf)
    return sorted(names)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def resolve_targets(model: nn.Module, settings: LoRASettings) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) for peft, checked against the model: every name
    must match at least one linear projection (resp. stacked expert parameter) inside the
    decoder layers, and nothing else; the lm_head and the embeddings stay frozen."""
    family = model.config.model_type
    prefixes = _layer_prefixes(model)
    defaults = default_target_modules(model)
    modules = [m for t in settings.target_modules for m in (defaults if t == ALL_LINEAR else [t])]
    modules = list(dict.fromkeys(modules or defaults))
    named = dict(model.named_modules())
    errors = []
    for target in modules:
        hits = [name for name in named if name and _matches(name, target)]
        if not hits:
            errors.append(
                f"--lora-target-modules: {target!r} matches no module of this {family} model; "
                f"its linear projections: {', '.join(defaults)}"
            )
            continue
        for name in hits:
            module = named[name]
            if not name.startswith(tuple(prefixes)):
                errors.append(
                    f"--lora-target-modules: {target!r} matches {name}, outside the decoder "
                    f"layers: the lm_head and the embeddings stay frozen"
                )
            elif not isinstance(module, nn.Linear):
                hint = (
                    " (stacked experts: --lora-target-parameters experts)"
                    if hasattr(module, "gate_up_proj")
                    else ""
                )
                errors.append(
                    f"--lora-target-modules: {target!r} matches {name}, a "
                    f"{type(module).__name__}, not a linear projection{hint}"
                )
            else:
                continue
            break
    stacked = sorted(
        {
            f"{mn}.{pn}"
            for mn, m in named.items()
            for pn, p in m.named_parameters(recurse=False)
            if p.dim() == 3 and pn in ("gate_up_proj", "down_proj")
        }
    )
    parameters = [
        p for t in settings.target_parameters for p in (_EXPERT_PARAMS if t == EXPERTS else [t])
    ]
    for target in dict.fromkeys(parameters):
        if not any(_matches(name, target) for name in stacked):
            available = sorted({".".join(n.split(".")[-3:]) for n in stacked}) or ["none"]
            errors.append(
                f"--lora-target-parameters: {target!r} matches no stacked expert parameter of "
                f"this {family} model (these are: {', '.join(available)})"
            )
    if errors:
        raise ValueError("; ".join(errors))
    return modules, list(dict.fromkeys(parameters))


# --- the adapters -----------------------------------------------------------------------


def lora_config(model: nn.Module):
    """The peft LoraConfig of an adapted model (`apply_lora`), else None."""
    return getattr(model, _ATTR, None)


def is_lora(model: nn.Module) -> bool:
    return lora_config(model) is not None


def settings_of(model: nn.Module) -> LoRASettings | None:
    """The settings an adapted model was made with (targets resolved), else None."""
    c = lora_config(model)
    if c is None:
        return None
    return LoRASettings(
        c.r,
        float(c.lora_alpha),
        float(c.lora_dropout),
        tuple(sorted(c.target_modules)),
        tuple(sorted(c.target_parameters or ())),
    )


def apply_lora(model: nn.Module, settings: LoRASettings, *, base: str | Path, seed: int = 0):
    """Inject the adapters into `model` in place (before sharding it), freeze everything else,
    keep the adapters in fp32; returns the peft LoraConfig. base: the directory of the base
    weights (recorded as `base_model_name_or_path`). The adapters' initial values come from
    `seed` alone, so every process of a run starts from the same ones."""
    from peft import LoraConfig, inject_adapter_in_model

    modules, parameters = resolve_targets(model, settings)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=modules,
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(Path(base).resolve()),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        adapter = _is_adapter_name(name)
        if adapter and p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(adapter)
    setattr(model, _ATTR, config)
    return config


def _is_adapter_name(name: str) -> bool:
    return f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model inside: every adapter switched off (the reference model for free)."""
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@dataclass(frozen=True)
class _Target:
    """One adapted weight: where its base tensor, its A and B live (state-dict names), the
    name it has in the merged model, and how peft shapes the update."""

    base: str  # e.g. model.layers.0.self_attn.q_proj.base_layer.weight
    a: str
    b: str
    merged: str  # e.g. model.layers.0.self_attn.q_proj.weight
    scaling: float
    experts: int  # 1: a (out, in) weight; E: a stacked (E, ., .) expert parameter
    swapped: bool  # peft's (E, out, in) layout (ours) rather than (E, in, out)


def _strip(name: str) -> str:
    """A parameter's name in the model without adapters."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _targets(model: nn.Module) -> list[_Target]:
    from peft.tuners.lora import LoraLayer, ParamWrapper

    out = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or ADAPTER not in layer.lora_A:
            continue
        inner, path = layer, name
        while isinstance(inner, LoraLayer):
            inner, path = inner.base_layer, path + ".base_layer"
        param = layer.parameter_name if isinstance(layer, ParamWrapper) else "weight"
        wrapper = isinstance(layer, ParamWrapper)
        out.append(
            _Target(
                base=f"{path}.{param}",
                a=f"{name}.lora_A.{ADAPTER}.weight",
                b=f"{name}.lora_B.{ADAPTER}.weight",
                merged=_strip(f"{name}.{param}"),
                scaling=float(layer.scaling[ADAPTER]),
                experts=layer.num_experts if wrapper else 1,
                swapped=bool(getattr(layer, "_did_swap_in_out_features", False)),
            )
        )
    return out


def _merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: _Target) -> torch.Tensor:
    """weight + scaling x B A in fp32, in weight's dtype (peft's update, expert by expert for
    stacked experts: A (r E, in), B (out, r E))."""
    a, b = a.float().to(weight.device), b.float().to(weight.device)
    if t.experts == 1:
        delta = b @ a
    else:
        a = a.reshape(t.experts, -1, a.shape[-1])  # (E, r, in)
        b = b.reshape(b.shape[0], -1, t.experts)  # (out, r, E)
        delta = torch.einsum("ore,eri->eoi" if t.swapped else "ore,eri->eio", b, a)
    return (weight.float() + t.scaling * delta).to(weight.dtype)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter: a collective when sharded."""
    full = getattr(tensor, "full_tensor", None)
    return (full() if full is not None else tensor).detach()


@torch.no_grad()
def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a full value into a parameter in place (into this rank's shard when sharded)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(value)


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full state dict of the adapted `model` (names with base_layer and lora_A/B) ->
    the merged model's, under the original names."""
    targets = _targets(model)
    skip = {t.a for t in targets} | {t.b for t in targets}
    out = {_strip(k): v for k, v in state.items() if k not in skip}
    for t in targets:
        out[t.merged] = _merge(out[t.merged], state[t.a], state[t.b], t)
    return out


def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(original name, merged full tensor) of every parameter, one at a time: what an engine
    with its own copy of the weights (vLLM) loads. Every rank must iterate it (gathers)."""
    params = dict(model.named_parameters())
    targets = {t.base: t for t in _targets(model)}
    skip = {n for t in targets.values() for n in (t.a, t.b)}
    for name, param in params.items():
        if name in skip:
            continue
        full, t = _full(param), targets.get(name)
        if t is not None:
            full = _merge(full, _full(params[t.a]), _full(params[t.b]), t)
        yield _strip(name), full


def merge_and_reset(model: nn.Module, *, base: str | Path, seed: int = 0) -> None:
    """Fold the adapters into the base weights and restart them (A as peft initialises it, B
    zero): the policy is unchanged and its base now is it (after the cold start, so that the
    reference, the base, is the cold-started policy). base: the directory that holds the
    merged weights from now on. A collective when sharded."""
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed + 1)
    # Sharded: merged on the host, as save_merged merges the gathered state, so that the
    # weights saved to cold-start/ (the base on --resume) are these, bit for bit.
    host = dist_mod.is_sharded(model)
    for t in _targets(model):
        a, b = params[t.a], params[t.b]
        w, wa, wb = (_full(x).cpu() if host else _full(x) for x in (params[t.base], a, b))
        merged = _merge(w, wa, wb, t)
        _assign(params[t.base], merged)
        fresh = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        _assign(a, fresh.to(a.device))
        _assign(b, torch.zeros(b.shape, dtype=b.dtype, device=b.device))
    lora_config(model).base_model_name_or_path = str(Path(base).resolve())


# --- saving and loading -----------------------------------------------------------------


def _skeleton(model: nn.Module):
    """The model's architecture without adapters, on the meta device (no memory): the
    parameter names, config and generation config save_model writes under."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    skeleton.config = model.config
    skeleton.generation_config = model.generation_config
    return skeleton


def save_full_model(
    model: torch.nn.Module, tokenizer: object | None, path: Path, dtype: torch.dtype | None = None
) -> None:
    """grpo.models.save_model for a sharded or plain model: every rank calls it, rank 0 writes.
    dtype: cast the parameters to it (fp32 master weights saved as the compute dtype). A
    model with LoRA adapters is saved merged, under its original parameter names."""
    if is_lora(model):
        save_merged(model, tokenizer, path, dtype)
        return
    state = dist_mod.full_state_dict(model)
    if dist_mod.is_main():
        save_model(model, tokenizer, path, state_dict=dist_mod.cast_parameters(state, model, dtype))
    dist_mod.barrier()


def save_merged(
    model: nn.Module, tokenizer, path: str | Path, dtype: torch.dtype | None = None
) -> None:
    """Base + adapters merged, in Hugging Face layout (grpo.models.save_model) under the original
    names: a plain model for transformers, load_model, --model. Every rank calls it; rank 0
    writes. dtype: cast the parameters to it."""
    state = dist_mod.full_state_dict(model)
    if dist_mod.is_main():
        skeleton = _skeleton(model)
        merged = dist_mod.cast_parameters(merged_state_dict(model, state), skeleton, dtype)
        save_model(skeleton, tokenizer, path, state_dict=merged)
    dist_mod.barrier()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The adapters' full tensors under PEFT's file names, on rank 0 (None elsewhere); a
    collective when sharded."""
    if dist_mod.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
        )
        state = get_model_state_dict(model, options=options)
        if not dist_mod.is_main():
            return None
    else:
        state = {n: p.detach() for n, p in model.named_parameters()}
    return {
        _PEFT_PREFIX + k.replace(f".{ADAPTER}.", "."): v
        for k, v in state.items()
        if _is_adapter_name(k)
    }


def save_adapter(model: nn.Module, tokenizer, path: str | Path) -> None:
    """The adapters in PEFT's format (adapter_config.json, adapter_model.safetensors) and the
    tokenizer, written atomically; `PeftModel.from_pretrained(base, path)` reads it, with base
    the model named in base_model_name_or_path. Every rank calls it; rank 0 writes."""
    from safetensors.torch import save_file

    state = adapter_state_dict(model)
    if dist_mod.is_main():
        with files.atomic_path(path) as tmp:
            tmp.mkdir()
            tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            lora_config(model).save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    dist_mod.barrier()


def is_adapter_dir(path: str | Path) -> bool:
    """A directory in PEFT's adapter format (and not a whole model)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / ADAPTER_CONFIG
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read the adapter's config ({e})") from e
    if not isinstance(value, dict) or value.get("peft_type") != "LORA":
        raise ValueError(f"{file}: not a LoRA adapter config")
    return value


def adapter_base(path: str | Path) -> Path:
    """The base model directory a PEFT adapter directory applies to."""
    config = read_adapter_config(path)
    base = config.get("base_model_name_or_path") or ""
    if not base or not (Path(base) / "config.json").is_file():
        raise ValueError(
            f"{Path(path) / ADAPTER_CONFIG}: its base model {base!r} (base_model_name_or_path) "
            f"is not a model directory here; the adapter applies to that model"
        )
    return Path(base)


def load_adapter_model(path: str | Path, *, dtype: torch.dtype, device):
    """(model, tokenizer) of a PEFT adapter directory: its base (load_model) with the
    adapters merged in (peft's merge_and_unload): a plain transformers model."""
    from peft import PeftModel

    base = adapter_base(path)
    model, tokenizer = load_model(base, dtype=dtype, device=device)
    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return merged, tokenizer


# --- runs and checkpoints ---------------------------------------------------------------


def resume_base(cfg, run_dir: Path) -> Path | None:
    """Where a resumed LoRA run's base weights are: the merged cold start, when the run had
    one (None: the model it started from)."""
    cold = Path(run_dir) / "cold-start"
    if cfg.lora.lora_rank and cfg.run.resume and (cold / "config.json").is_file():
        return cold
    return None


def checkpoint_mismatch(path: Path, settings: LoRASettings | None, model=None) -> str | None:
    """Why the checkpoint at `path` cannot be resumed with these LoRA settings (None: it
    can): a LoRA checkpoint without LoRA, a full one with LoRA, or other adapters. model: the
    adapted model, whose resolved targets are compared too."""
    path = Path(path)
    adapter, full = path / "adapter", path / "model"
    if adapter.is_dir() and settings is None:
        saved = read_adapter_config(adapter)
        r, alpha = saved.get("r"), float(saved.get("lora_alpha", 0))
        return (
            f"{path}: a LoRA checkpoint (adapters of rank {r}, alpha {alpha:g}; the base "
            f"weights are not in it), but this run has no --lora-rank: resume with the run's "
            f"LoRA flags (--lora-rank {r} --lora-alpha {alpha:g} ...)"
        )
    if settings is None:
        return None
    if not adapter.is_dir():
        if not full.is_dir():
            return None  # incomplete: load_checkpoint names what is missing
        return (
            f"{path}: a full fine-tuning checkpoint, without LoRA adapters, but --lora-rank "
            f"{settings.rank} was given: resume it without the LoRA flags, or start a new LoRA "
            f"run from its weights with --model {full}"
        )
    saved = read_adapter_config(adapter)
    have = {"rank": saved.get("r"), "alpha": float(saved.get("lora_alpha", 0))}
    want = {"rank": settings.rank, "alpha": settings.alpha}
    config = lora_config(model) if model is not None else None
    if config is not None:
        for key, field in (
            ("target modules", "target_modules"),
            ("target parameters", "target_parameters"),
        ):
            have[key] = sorted(saved.get(field) or [])
            want[key] = sorted(getattr(config, field) or [])
    if have != want:
        return (
            f"{path}: its LoRA adapters ({_describe(have)}) differ from this run's "
            f"({_describe(want)}): resume with the checkpoint's LoRA flags"
        )
    return None


def _describe(values: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())


def check_resume(cfg, run_dir: Path) -> None:
    """Before anything loads: --resume of a run whose checkpoint is of the other kind (LoRA
    or full) is a ValueError saying what to do."""
    path = Path(run_dir) / "checkpoint"
    if cfg.run.resume and path.is_dir():
        error = checkpoint_mismatch(path, LoRASettings.from_config(cfg))
        if error:
            raise ValueError(error)


def describe(model: nn.Module, optimizer: torch.optim.Optimizer | None, beta: float) -> dict:
    """What LoRA saves: trainable and total parameters, the optimizer state's bytes, and the
    bytes of the reference model that the adapters-off policy replaces (when beta > 0)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if not _is_adapter_name(n)
    )
    state_bytes = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    state_bytes += value.numel() * value.element_size()
    config = lora_config(model)
    return {
        "rank": config.r,
        "alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "target_parameters": sorted(config.target_parameters or []),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "optimizer_state_bytes": state_bytes,
        "reference_bytes_saved": base_bytes if beta > 0 else 0,
    }
