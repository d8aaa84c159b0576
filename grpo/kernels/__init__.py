"""Triton kernels for GRPO, each with a plain-PyTorch reference in grpo.kernels.reference.

CUDA tensors run the Triton kernels; CPU tensors run the reference, or the Triton
kernels themselves under the interpreter when TRITON_INTERPRET=1 is set before import.
Value checks (one host sync per call) can be skipped with `value_checks(False)` or a call's
`validate=False`, after checking once with `check_values`.
"""

from ._checks import check_values, value_checks
from .advantages import group_advantages
from .grpo_loss import grpo_loss
from .linear_grpo_loss import linear_grpo_loss, token_logprobs_from_hidden
from .logprobs import token_logprobs
from .loss_config import GRPOLossConfig
from .moe import moe_experts

__all__ = [
    "GRPOLossConfig",
    "check_values",
    "group_advantages",
    "grpo_loss",
    "linear_grpo_loss",
    "moe_experts",
    "token_logprobs",
    "token_logprobs_from_hidden",
    "value_checks",
]
