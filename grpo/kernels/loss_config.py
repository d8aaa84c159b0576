"""The options of the GRPO loss, defined and validated once.

`GRPOLossConfig` is taken by `grpo_loss`, `linear_grpo_loss` and `reference.grpo_loss_ref`;
each also accepts the fields as keywords (they override the config). Field names are TRL's
(`GRPOConfig` of TRL 1.16) except where ours predate them: eps_low = TRL's `epsilon`,
eps_high = `epsilon_high`, importance_level = `importance_sampling_level`. Defaults are TRL's,
except loss_type: the kernels default to "grpo" (the algorithm they are named after), the
trainer to TRL's "dapo".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Options of the GRPO objective (semantics: grpo/kernels/reference.py, grpo_objective)."""

    temperature: float = 1.0
    beta: float = 0.0  # KL coefficient; > 0 needs ref_logp
    eps_low: float = 0.2  # TRL: epsilon
    eps_high: float | None = None  # TRL: epsilon_high; None -> eps_low (also cispo's cap)
    delta: float | None = None  # two-sided clipping (INTELLECT-2): r' = min(r, delta)
    loss_type: str = "grpo"
    importance_level: str = "token"  # TRL: importance_sampling_level
    max_completion_length: int | None = None  # dr_grpo's constant (None: T of the call)
    entropy_coef: float = 0.0
    use_bias_correction_kl: bool = True
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    router_aux_loss_coef: float = 0.0  # MoE: weight of the aux_loss passed to the call

    def __post_init__(self) -> None:
        if self.eps_high is None:
            object.__setattr__(self, "eps_high", self.eps_low)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        if self.importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(
                f"unknown importance_level {self.importance_level!r}; expected one "
                f"of {IMPORTANCE_LEVELS}"
            )
        _positive(self, "temperature", "sapo_temperature_pos", "sapo_temperature_neg")
        _non_negative(
            self,
            "beta",
            "eps_low",
            "eps_high",
            "entropy_coef",
            "vespo_k_pos",
            "vespo_lambda_pos",
            "vespo_k_neg",
            "vespo_lambda_neg",
            "router_aux_loss_coef",
        )
        if self.delta is not None and not self.delta > 0:
            raise ValueError(f"delta must be > 0 (or None), got {self.delta}")
        if self.loss_type in ("cispo", "sapo", "vespo") and self.delta is not None:
            raise ValueError(
                f"loss_type={self.loss_type!r} has no clipped ratio: delta must be None"
            )
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(
                f"max_completion_length must be >= 1, got {self.max_completion_length}"
            )
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(
                f"top_entropy_quantile must lie in [0, 1], got {self.top_entropy_quantile}"
            )
        if self.off_policy_mask_threshold is not None and not math.isfinite(
            self.off_policy_mask_threshold
        ):
            raise ValueError(
                f"off_policy_mask_threshold must be finite (or None), got "
                f"{self.off_policy_mask_threshold}"
            )

    @property
    def one_pass(self) -> bool:
        """Whether every token's loss and gradient follow from that token alone (and counts
        known beforehand): then the Triton kernel writes the gradient in the forward sweep.
        Sequence ratios, VESPO's sequence weight, the off-policy sequence mask and the entropy
        quantile need every token's log-prob or entropy first."""
        return (
            self.importance_level == "token"
            and self.loss_type != "vespo"
            and self.off_policy_mask_threshold is None
            and self.top_entropy_quantile >= 1.0
        )


FIELDS = frozenset(f.name for f in dataclasses.fields(GRPOLossConfig))


def resolve(config: GRPOLossConfig | None, options: dict) -> GRPOLossConfig:
    """The config a call runs with: `config` (default GRPOLossConfig()) with the keyword
    options replacing its fields."""
    unknown = sorted(set(options) - FIELDS)
    if unknown:
        raise TypeError(f"unknown GRPO loss option(s) {unknown}; the options are {sorted(FIELDS)}")
    if config is None:
        return GRPOLossConfig(**options)
    if not isinstance(config, GRPOLossConfig):
        raise TypeError(f"config must be a GRPOLossConfig, got {type(config).__name__}")
    if not options:
        return config
    return dataclasses.replace(config, **options)


def _positive(cfg: GRPOLossConfig, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")


def _non_negative(cfg: GRPOLossConfig, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
