"""Everything a GRPO run is made of, built from its config: `build_trainer(config)`.

The order matters: the data and the rewards first (a bad dataset, or a code reward without
its sandbox, fails before anything is written or loaded), then the run directory, the seed,
the policy (sharded under torchrun), its routing replay, the rollout engine and the
optimizer. The frozen reference model is the
cold-started policy, so it is loaded after the cold start by `load_reference`.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from grpo import kernels
from grpo.kernels import reference
from grpo.models import load_model, make_tiny
from grpo.models.layout import MOE_FAMILIES
from grpo.models.routing_replay import RoutingReplay

from . import data as data_mod
from . import distributed as dist_mod
from . import files
from . import lora as lora_mod
from . import packing as packing_mod
from . import rewards as rewards_mod
from . import tasks as tasks_mod
from .checkpoint import find_checkpoint
from .config import (
    DEMO_MODEL,
    RESUME_FREE,
    GRPOConfig,
    is_demo,
    read_run_config,
    resume_mismatches,
)
from .policy import PolicyForward
from .rewards import code as code_mod
from .rollout import SamplingParams, make_engine
from .trainer import GRPOTrainer, TrainerParts

DEFAULT_EVAL_SIZE = 200  # held-out prompts of a task, and at most of a dataset
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_trainer(config: GRPOConfig) -> GRPOTrainer:
    """The trainer of `config` with all its parts built."""
    return GRPOTrainer(build_parts(config))


def build_parts(config: GRPOConfig) -> TrainerParts:
    cfg = config.resolve()
    dist_mod.init_from_env()
    rank, world = dist_mod.rank(), dist_mod.world_size()
    if cfg.sampling.prompts_per_step % world:
        raise ValueError(
            f"prompts_per_step={cfg.sampling.prompts_per_step} must be a multiple "
            f"of the number of processes ({world})"
        )
    device, dtype, compute_dtype = _device_and_dtypes(cfg, world)
    run_dir = Path(cfg.run.output_dir)
    task, eval_examples, stream = load_data(cfg)
    reward_fns, reward_weights = _rewards(cfg, task)
    created: list[Path] = []
    try:
        created += lock_run_dir(cfg, run_dir)  # before anything in it is read or changed
        lora_mod.check_resume(cfg, run_dir)  # a LoRA checkpoint for a full run, or the reverse
        created += prepare_run_dir(cfg, run_dir)
        seed_everything(cfg.run.seed + rank)
        loss_fn, logprobs_fn, fused = _select_kernels(cfg, device, world)
        model, tokenizer = _load_policy(cfg, run_dir, dtype, device, compute_dtype, world)
        replay = _routing_replay(cfg, model)
        engine = _rollout_engine(cfg, model, tokenizer, replay, run_dir)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],  # LoRA: the adapters only
            lr=cfg.optim.learning_rate,
            weight_decay=cfg.optim.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
        forward = PolicyForward(
            device=device,
            micro_batch_size=cfg.optim.micro_batch_size,
            temperature=cfg.sampling.temperature,
            fused=fused,
            logprobs_fn=logprobs_fn,
            replay=replay,
            router_aux_loss=cfg.loss.router_aux_loss_coef > 0,
            packing=_packing(cfg, model),
            micro_batch_tokens=cfg.optim.micro_batch_tokens,
        )
    except BaseException:
        undo_start(cfg, run_dir, created)
        raise
    return TrainerParts(
        cfg,
        run_dir,
        rank,
        world,
        device,
        dtype,
        compute_dtype,
        task,
        eval_examples,
        stream,
        model,
        tokenizer,
        replay,
        engine,
        reward_fns,
        reward_weights,
        optimizer,
        scheduler,
        forward,
        loss_fn,
        lora_mod.LoRASettings.from_config(cfg),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(cfg: GRPOConfig, step: int) -> float:
    """The learning-rate multiplier at a GRPO step: linear warmup, then constant, linear or
    cosine decay to 0 at the last step."""
    o = cfg.optim
    warmup, total = o.warmup_steps, max(o.steps, 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if o.lr_schedule == "linear":
        return 1.0 - progress
    if o.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def load_data(cfg: GRPOConfig):
    """(task or None, held-out examples, training stream)."""
    d, seed = cfg.data, cfg.run.seed
    if d.data:
        needs_answer = "accuracy" in (d.rewards or ["accuracy"])
        examples = data_mod.load_jsonl(d.data, require_answer=needs_answer)
        # A small dataset holds out a fifth of itself unless told otherwise.
        eval_size = d.eval_size or min(DEFAULT_EVAL_SIZE, max(1, len(examples) // 5))
        if eval_size >= len(examples):
            raise ValueError(
                f"{d.data} has {len(examples)} examples: not enough for "
                f"eval_size={eval_size} plus training"
            )
        train, evals = data_mod.split_examples(examples, eval_size, seed)
        return None, evals, data_mod.JsonlStream(train, seed)
    task = tasks_mod.make_task(d.task, **d.task_args)
    evals, stream = data_mod.task_splits(task, seed, d.eval_size or DEFAULT_EVAL_SIZE)
    return task, evals, stream


# What a run writes into its directory: --overwrite removes these and nothing else.
RUN_FILES = ("config.json", "metrics.jsonl", "curves.png", "summary.json")
RUN_DIRS = ("checkpoint", "cold-start", "final", "init-model", "tensorboard")
# The lock of the process that writes the directory (files.lock_directory). It stays through
# --overwrite: a run deletes it only in a directory it created itself and gives up again.
RUN_LOCK = ".grpo-train.lock"


def lock_run_dir(cfg: GRPOConfig, run_dir: Path) -> list[Path]:
    """Rank 0 creates the run directory if needed and locks it for the rest of the process:
    a second grpo-train on it (a new run, --resume or --overwrite) is refused with
    files.DirectoryLocked on every rank, before it reads or changes anything. The other ranks
    take no lock (only rank 0 writes the directory). Returns what was created (for
    `undo_start`); nothing is locked where the directory is a file or --resume finds none,
    which prepare_run_dir then refuses."""
    created: list[Path] = []
    busy = None
    # A path under a file or a --resume of nothing: prepare_run_dir refuses it by name.
    makeable = not run_dir.is_file() and files.file_in_path(run_dir) is None
    if dist_mod.is_main() and makeable and (run_dir.is_dir() or not cfg.run.resume):
        try:
            run_dir.mkdir(parents=True)
            created.append(run_dir)
        except FileExistsError:  # there already, or another run made it a moment ago
            pass
        try:
            if files.lock_directory(run_dir, RUN_LOCK):
                created.append(run_dir / RUN_LOCK)
        except files.DirectoryLocked as e:
            busy = (
                f"--output-dir {e}: wait for it to end or choose another directory; "
                f"nothing was changed"
            )
    busy = dist_mod.broadcast_object(busy)
    if busy:
        raise files.DirectoryLocked(busy)
    return created


def prepare_run_dir(cfg: GRPOConfig, run_dir: Path) -> list[Path]:
    """Rank 0 checks and prepares the run directory; the others wait for its verdict. A run
    only ever deletes what a run of ours wrote: a directory that holds anything else (a model,
    a project) is refused, naming what was found. --resume refuses a config that differs from
    the saved one except in cfg.run.resume_override's fields (config.json then records the
    new values). Runs after lock_run_dir, which created the directory. Returns what was
    created (for `undo_start`)."""
    error, created = None, []
    if dist_mod.is_main():
        error = _run_dir_error(cfg, run_dir)
        if error is None and cfg.run.resume:
            saved = read_run_config(run_dir / "config.json") or {}
            if any(saved.get(n, v) != v for n, v in cfg.flat().items() if n not in RESUME_FREE):
                files.write_json(run_dir / "config.json", cfg.to_dict())
        elif error is None:
            if cfg.run.overwrite or _failed_start(run_dir):
                for name in RUN_FILES + RUN_DIRS:
                    files.remove(run_dir / name)
            files.write_json(run_dir / "config.json", cfg.to_dict())
            created.append(run_dir / "config.json")
    error = dist_mod.broadcast_object(error)
    if error:
        raise ValueError(error)
    return created


def undo_start(cfg: GRPOConfig, run_dir: Path, created: list[Path]) -> None:
    """After a start that failed before training: remove what lock_run_dir and
    prepare_run_dir created and the demo's init-model, so the same command can simply be run
    again."""
    if not dist_mod.is_main():
        return
    if run_dir / "config.json" in created:  # the start got that far: it may have made one
        files.remove(run_dir / "init-model")
    lock = run_dir / RUN_LOCK
    if lock not in created:
        files.unlock_directory(run_dir, RUN_LOCK)
    for path in reversed(created):
        if path == lock:  # deleted while still held: see files.lock_directory
            files.unlock_directory(run_dir, RUN_LOCK, remove_file=True)
        elif path.is_dir():
            with contextlib.suppress(OSError):  # not empty: something else is there now
                path.rmdir()
        else:
            files.remove(path)


def _run_dir_error(cfg: GRPOConfig, run_dir: Path) -> str | None:
    if run_dir.exists() and not run_dir.is_dir():
        return f"--output-dir {run_dir} is a file, not a directory"
    blocker = files.file_in_path(run_dir)
    if blocker is not None:
        return f"--output-dir {run_dir}: {blocker} is a file, not a directory"
    if not run_dir.is_dir() or not _entries(run_dir):
        return f"--resume: {run_dir} holds no run" if cfg.run.resume else None
    foreign = sorted(name for name in _entries(run_dir) if not _ours(name))
    saved = read_run_config(run_dir / "config.json")
    if foreign or saved is None:
        found = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        return (
            f"--output-dir {run_dir} is not empty and not a grpo-train run directory "
            f"(found {found or 'a config.json of something else'}): choose a new directory; "
            f"nothing was changed"
        )
    if cfg.run.resume:
        if find_checkpoint(run_dir) is None:
            return f"--resume: {run_dir} has no checkpoint to resume from"
        mismatches = resume_mismatches(cfg, saved)
        if mismatches:
            names = " ".join(m.split(":")[0] for m in mismatches)
            return (
                f"--resume: the run in {run_dir} was started with other values: "
                f"{'; '.join(mismatches)}. Resume with the saved values (drop these flags), or "
                f"change them on purpose with --resume-override {names}"
            )
        return None
    if not cfg.run.overwrite and not _failed_start(run_dir):
        return (
            f"{run_dir} holds another run; pass --resume to continue it or --overwrite to "
            f"replace it"
        )
    return None


def _failed_start(run_dir: Path) -> bool:
    """A run directory whose run never trained (it stopped while loading, before any metrics
    or checkpoint): nothing in it is worth keeping, so it may be reused without --overwrite."""
    if not _entries(run_dir) <= {"config.json", "init-model"}:
        return False
    return read_run_config(run_dir / "config.json") is not None


def _entries(run_dir: Path) -> set[str]:
    """The names in a run directory, less its lock file (in a directory of its own while any
    grpo-train is starting or running there)."""
    return {p.name for p in run_dir.iterdir() if p.name != RUN_LOCK}


def _ours(name: str) -> bool:
    """A name a run writes, or one of files.py's temporary names for it."""
    known = RUN_FILES + RUN_DIRS
    if name in known:
        return True
    hidden = name.startswith(".") and (".tmp-" in name or ".old-" in name)
    return hidden and name[1:].split(".tmp-")[0].split(".old-")[0] in known


def _device_and_dtypes(cfg: GRPOConfig, world: int):
    m = cfg.model
    if m.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {m.device}: no CUDA device is available (torch {torch.__version__}, "
            f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use "
            f"--device cpu or auto"
        )
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if m.device == "auto" else m.device
    )
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = (
        DTYPES["bf16" if device.type == "cuda" else "fp32"]
        if m.dtype == "auto"
        else DTYPES[m.dtype]
    )
    # Sharded runs keep fp32 master parameters and compute in the chosen dtype.
    if world > 1 and dtype != torch.float32:
        return device, torch.float32, dtype
    return device, dtype, None


def _packing(cfg: GRPOConfig, model) -> bool:
    """--packing / --no-packing; by default on where attention stays within each sequence:
    flash-attention (its varlen kernel) and sdpa (grpo.packing's segment attention), and with
    a token budget. Eager and flex attention would get a dense block-diagonal mask over the
    whole packed row, whose L^2 attention measured slower than padding (docs/packing.md)."""
    if cfg.optim.packing is not None:
        return bool(cfg.optim.packing)
    attention = getattr(model.config, "_attn_implementation", "") or ""
    return (
        attention.startswith("flash")
        or attention in ("sdpa", packing_mod.SEGMENT_ATTENTION)
        or cfg.optim.micro_batch_tokens > 0
    )


def _select_kernels(cfg: GRPOConfig, device: torch.device, world: int):
    """(loss_fn, logprobs_fn, fused lm_head loss on or off)."""
    backend = cfg.model.kernel_backend
    fused = cfg.model.fused_loss
    if fused is None:
        fused = device.type == "cuda" and backend != "reference"
    # The load-balancing loss comes from the full model's forward: not with the fused path.
    # Nor with FSDP: the lm_head weight is only gathered inside the model's own forward.
    fused = bool(fused) and cfg.loss.router_aux_loss_coef == 0 and world == 1
    if backend == "triton" and not kernels._checks.use_triton(torch.empty(0, device=device)):
        raise ValueError("kernel_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1)")
    if backend == "reference":
        return reference.grpo_loss_ref, reference.token_logprobs_ref, fused
    return kernels.grpo_loss, kernels.token_logprobs, fused


def _load_policy(cfg, run_dir, dtype, device, compute_dtype, world):
    path = Path(cfg.model.path) if cfg.model.path else run_dir / "init-model"
    if is_demo(cfg.model.path) and not (path / "config.json").is_file() and dist_mod.is_main():
        # The built-in demo model: a small Qwen2 with the character tokenizer.
        make_tiny(path, **DEMO_MODEL, seed=cfg.run.seed)
    dist_mod.barrier()
    # A resumed LoRA run's base is its merged cold start (the adapters apply to it).
    path = lora_mod.resume_base(cfg, run_dir) or path
    model, tokenizer = load_model(path, dtype=dtype, device=device)
    lora = lora_mod.LoRASettings.from_config(cfg)
    if lora is not None:  # before sharding: FSDP2 shards the adapters with their layers
        lora_mod.apply_lora(model, lora, base=path, seed=cfg.run.seed)
    if cfg.model.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    if world > 1:
        dist_mod.shard_model(model, compute_dtype=compute_dtype)
    return model, tokenizer


def _routing_replay(cfg: GRPOConfig, model) -> RoutingReplay | None:
    """MoE policies record the sampler's experts and replay them in training; the router can
    be frozen. The reference model never replays."""
    is_moe = model.config.model_type in MOE_FAMILIES
    if cfg.moe.freeze_router and is_moe:
        for block in model.modules():
            if hasattr(getattr(block, "experts", None), "gate_up_proj"):
                block.gate.requires_grad_(False)
    wanted = cfg.moe.routing_replay
    if wanted and not is_moe:
        raise ValueError(f"--routing-replay needs an MoE model, got {model.config.model_type}")
    if cfg.rollout.engine == "vllm":
        if wanted:
            raise ValueError(
                "--routing-replay needs --rollout transformers: vLLM does not "
                "report the experts it used"
            )
        wanted = False
    return RoutingReplay(model) if is_moe and wanted is not False else None


def _rollout_engine(cfg: GRPOConfig, model, tokenizer, replay, run_dir: Path):
    s, r = cfg.sampling, cfg.rollout
    sampling = SamplingParams(
        max_prompt_length=cfg.data.max_prompt_length,
        max_completion_length=s.max_completion_length,
        temperature=s.temperature,
        top_p=s.top_p,
        prompt_overflow=cfg.data.prompt_overflow,
        ignore_eos=s.ignore_eos,
    )
    if r.engine == "vllm":
        options = dict(
            model_path=cfg.model.path or str(run_dir / "init-model"),
            seed=cfg.run.seed,
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            sleep=r.vllm_sleep,
        )
    else:
        if r.sampler_correction != "none" and s.top_p < 1:
            warnings.warn(
                "the transformers engine records log-probs after top_p; with "
                "top_p < 1 the sampler correction is biased",
                stacklevel=2,
            )
        options = dict(replay=replay, cache=r.generation_cache, compile=r.compile_generation)
    return make_engine(r.engine, model, tokenizer, sampling, **options)


def _rewards(cfg: GRPOConfig, task) -> tuple[list, torch.Tensor]:
    d = cfg.data
    names = list(d.rewards) or list(task.rewards if task else ("accuracy", "format"))
    if cfg.sampling.overlong_buffer > 0 and "overlong" not in names:
        names.append("overlong")
    reward_fns = [rewards_mod.resolve_reward(spec) for spec in names]
    # The code reward with this run's limits, its sandbox checked now (how to install
    # bubblewrap when it is missing; what --code-sandbox none exposes).
    reward_fns = code_mod.with_code_settings(reward_fns, code_mod.settings_from(d))
    weights = list(d.reward_weights) or [1.0] * len(reward_fns)
    weights += [1.0] * (len(reward_fns) - len(weights))
    return reward_fns, torch.tensor(weights, dtype=torch.float32)
