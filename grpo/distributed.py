"""Data-parallel GRPO with torch.distributed: `torchrun --nproc-per-node N -m grpo.cli.train ...`.

Design (what the trainer relies on):
- Every rank runs the same loop on its own prompts. A prompt's G completions stay on one
  rank, so group normalisation needs no communication; the few batch-wide quantities (the
  dapo/bnpo token count, `scale_rewards="batch"`, metrics) are reduced across ranks.
- The policy and the reference model are sharded with FSDP2 (`fully_shard` on every decoder
  layer, then on the root). On CUDA the parameters stay fp32 (the optimizer's master copy)
  while forward and backward run in bf16 and gradients are reduced in fp32.
- Every FSDP collective must be entered by all ranks: ranks with fewer micro-batches run
  zero-weight ones, and generation uses `synced_gpus` so no rank stops decoding early.

Without torchrun (no WORLD_SIZE in the environment) nothing here changes the single-process
path: `world_size()` is 1 and every helper is the identity.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group that torchrun describes in the environment (NCCL on CUDA, gloo
    on CPU). Returns whether this is a distributed run. Idempotent."""
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return True


def shutdown(*, wait_for_peers: bool) -> bool:
    """Leave the process group; returns whether there was one. wait_for_peers (after a run that
    finished on every rank): a barrier first, so no rank leaves while a peer still works (rank
    0 writing the final model). After an error, leave at once: peers may never reach it."""
    if not dist.is_initialized():
        return False
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()
    return True


def exit_process(code: int) -> NoReturn:
    """End a process that has left its process group, skipping the interpreter's and C++'s
    teardown. Once FSDP2/DTensor have used a gloo group, torch (2.13) keeps it alive past
    destroy_process_group and gc, threads and all; a normal exit with those threads up aborts
    the process now and then ("terminate called without an active exception"), which
    torchrun reports as a failed run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return (
        torch.device("cuda", torch.cuda.current_device())
        if is_distributed() and dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def all_reduce(values: torch.Tensor | float, op: str = "sum") -> torch.Tensor:
    """Sum or max over ranks of a tensor (or number), returned on the tensor's device."""
    tensor = torch.as_tensor(
        values, dtype=torch.float64 if not isinstance(values, torch.Tensor) else None
    )
    if not is_distributed():
        return tensor
    work = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(
        work, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    )
    return work.to(tensor.device)


def all_gather_objects(value: Any) -> list[Any]:
    """[value of rank 0, value of rank 1, ...] (any picklable value)."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any) -> Any:
    """Rank 0's value, on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's (n_r, ...) tensor along dim 0 in rank order (sizes may
    differ); also return where this rank's rows start."""
    if not is_distributed():
        return tensor, 0
    parts = all_gather_objects(tensor.detach().cpu())
    offset = sum(p.shape[0] for p in parts[: rank()])
    return torch.cat(parts).to(tensor.device), offset


# --- FSDP2 ------------------------------------------------------------------------------


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers causal LM (the units FSDP shards)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers to shard")
    return list(layers)


def shard_model(model: torch.nn.Module, *, compute_dtype: torch.dtype | None) -> torch.nn.Module:
    """Shard `model` in place with FSDP2 over all ranks: each decoder layer is one unit (its
    parameters are gathered just for its forward and backward), the root holds embeddings,
    final norm and lm_head. compute_dtype: the forward/backward dtype (gradients reduced in
    fp32); None computes in the parameters' dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if compute_dtype is not None
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on the host, on rank 0 (None elsewhere). A collective
    when the model is sharded: every rank must call it."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if is_main() else None


def cast_parameters(state: dict, model: torch.nn.Module, dtype: torch.dtype | None) -> dict:
    """`state` with the floating-point parameters of `model` cast to dtype (buffers as they
    are); unchanged when dtype is None."""
    if dtype is None:
        return state
    params = {name for name, _ in model.named_parameters()}
    return {
        k: v.to(dtype) if k in params and v.is_floating_point() else v for k, v in state.items()
    }


def local_value(x: torch.Tensor | float) -> float:
    """A Python float from a tensor that may be a replicated DTensor (e.g. a clipped norm)."""
    full = getattr(x, "full_tensor", None)
    return float(full() if full is not None else x)
