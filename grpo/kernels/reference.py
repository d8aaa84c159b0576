"""Plain-PyTorch references: the specification of every op in `kernels`.

Read this file as the definition of GRPO's maths. Every function computes in fp32 whatever the
input dtype, keeps autograd intact where a gradient exists, and favours clarity over speed.
The Triton kernels are tested against these functions, and these against TRL 1.16 itself
(tests/kernels/test_trl_parity.py): `grpo_objective` is TRL's `GRPOTrainer._compute_loss`.

Per token, with m the completion mask, A the advantage and sg() stop-gradient:
    z       = logits / temperature                                  # (B, T, V)
    logp    = z[id] - logsumexp(z)                                  # (B, T)
    r       = exp(logp - old_logp)        (old_logp None: on-policy, r == 1 but with gradient)
    sequence level (GSPO): r -> s_b = exp(sum_t m (logp - old_logp) / len_b),
                           len_b = max(sum_t m, 1)
The policy term l_pg by loss_type (see `policy_loss`), times the off-policy sequence mask, the
high-entropy token mask and the sampler's importance weights when enabled, plus the KL:
    l = l_pg + beta * k3 * (r if use_bias_correction_kl),  k3 = exp(ref - logp) - (ref - logp) - 1
aggregated by loss_type (see `aggregation_weights`), minus the entropy bonus
    entropy_coef * (token mean of the entropy over the call's loss tokens) / accumulation_steps.
"""

from __future__ import annotations

import math

import torch

from .loss_config import IMPORTANCE_LEVELS, LOSS_TYPES, GRPOLossConfig, resolve

__all__ = ["IMPORTANCE_LEVELS", "LOSS_TYPES", "GRPOLossConfig"]

SCALES = ("group", "batch", "none")
PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the clipped surrogate
CLIP_STATS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
)
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def stat_names(loss_type: str, importance_level: str = "token") -> tuple[str, ...]:
    """The statistics a loss call returns: TRL's names (kl, entropy, clip_ratio/*,
    cispo_clip_ratio, vespo/phi_seq_mean) and our logp_mean. At sequence level TRL's clip
    ratios are shares of sequences; the *_tokens variants give the shares of tokens."""
    names = ["kl", "entropy", "logp_mean"]
    if loss_type in PPO_LOSS_TYPES:
        names += CLIP_STATS
        if importance_level == "sequence":
            names += [f"{n}_tokens" for n in CLIP_STATS[:3]]
    elif loss_type == "cispo":
        names.append("cispo_clip_ratio")
    elif loss_type == "vespo":
        names.append("vespo/phi_seq_mean")
    return tuple(names)


def _log_softmax_and_entropy(
    logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float() / temperature  # (B, T, V)
    log_probs = torch.log_softmax(z, dim=-1)  # (B, T, V)
    probs = log_probs.exp()
    # p * log p is 0 where p == 0, also for logits at -inf (0 * -inf would be NaN).
    plogp = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
    entropy = -plogp.sum(-1)  # (B, T)
    return log_probs, entropy


def token_logprobs_ref(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), ids (B, T) -> log p(ids) (B, T) fp32 [, entropy (B, T) fp32]."""
    with torch.no_grad():
        log_probs, entropy = _log_softmax_and_entropy(logits, temperature)
        logp = log_probs.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (logp, entropy) if return_entropy else logp


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(m * x) / sum(m) over all tokens; 0 (not NaN) when the mask is empty."""
    denom = mask.sum()
    total = (x * mask).sum()
    return torch.where(denom > 0, total / denom.clamp(min=1e-30), torch.zeros_like(total))


def aggregation_weights(
    mask: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    num_sequences: float | None = None,
    accumulation_steps: int = 1,
) -> torch.Tensor:
    """Weight w (B, T) of each token's loss l, so that the call's loss is sum(w * l) (before
    the entropy bonus). With S = num_sequences (default B * accumulation_steps), N = num_items
    (default max(sum m, 1) * accumulation_steps), len_b = max(sum_t m, 1):

    grpo, sapo:          m / (len_b * S)       mean of sequence means (GRPO, arXiv:2402.03300)
    bnpo:                m / (max(sum m, 1) * accumulation_steps)   the call's own token mean
    dr_grpo:             m / (S * max_completion_length)   (Dr. GRPO, arXiv:2503.20783)
    dapo, cispo, vespo:  m / N                 token mean over the optimizer step (DAPO)
    luspo:               m / S                 sequence sums (LUSPO, arXiv:2602.05261)

    TRL divides each micro-batch's grpo/sapo/bnpo/dr_grpo/luspo loss by the accumulation steps,
    which is what the defaults of S give; a caller whose micro-batches differ in size passes
    the step's S so that every sequence weighs the same.
    """
    m = mask.float()  # (B, T)
    batch, seq_len = m.shape
    acc = float(accumulation_steps)
    seqs = float(num_sequences) if num_sequences is not None else batch * acc
    if loss_type in ("grpo", "sapo"):
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * seqs)
    if loss_type == "bnpo":
        return m / (m.sum().clamp(min=1.0) * acc)
    if loss_type == "dr_grpo":
        return m / (seqs * (max_completion_length or seq_len))
    if loss_type == "luspo":
        return m / seqs
    if num_items is None:
        num_items = m.sum().clamp(min=1.0) * acc
    if isinstance(num_items, torch.Tensor):  # a count on the device: no host sync
        return m / num_items.to(device=m.device, dtype=torch.float32).clamp(min=1.0)
    return m / max(float(num_items), 1.0)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """TRL's top_entropy_quantile (Beyond the 80/20 rule, arXiv:2506.01939): the loss tokens
    whose entropy is >= the (1 - quantile) quantile of the call's loss-token entropies
    (B, T) bool. quantile 0 keeps the highest-entropy token(s) only."""
    ent = entropy.detach().float()
    # nanquantile over the loss tokens (the others NaN): no boolean indexing, no host sync.
    # No loss token: a NaN threshold, and no token passes it.
    tokens = torch.where(mask.bool(), ent, float("nan")).reshape(-1)
    threshold = torch.nanquantile(tokens, 1.0 - quantile)
    return ((ent * mask.float()) >= threshold) & mask.bool()


def off_policy_mask(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv:2512.02556, eq. 9), as TRL: keep a
    sequence unless its advantage is negative and its mean sampler-vs-current KL estimate
    sum_t m (sampler_logp - logp) / len_b exceeds threshold. advantages (B, 1) or (B, T);
    returns 0/1 of the same shape. A NaN sampler log-prob (unknown) counts as no drift."""
    m = mask.float()
    drift = torch.nan_to_num(sampler_logp.float() - logp.detach(), nan=0.0)  # (B, T)
    mean_drift = (drift * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_drift <= threshold)).float()


def vespo_weights(
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    importance_sampling_ratio: torch.Tensor | None,
    cfg: GRPOLossConfig,
) -> torch.Tensor:
    """VESPO's gamma weight (arXiv:2602.10693) of each sequence, detached, as TRL:
    phi(w) = exp(lambda + k log w - lambda w), w = exp(sum_t m log r_t) (times the sampler's
    importance ratios), k and lambda by the sign of A (>= 0: the _pos pair); log w is clamped
    to [log 1e-8, 20]."""
    lower = math.log(1e-8)
    m = mask.float()
    with torch.no_grad():
        seq = (torch.clamp(log_ratio.detach(), -20.0, 20.0) * m).sum(-1, keepdim=True)  # (B, 1)
        if importance_sampling_ratio is not None:
            # TRL's ratio is 1 outside the completion; ours may be 0 there: count loss tokens.
            log_is = torch.clamp(torch.log(importance_sampling_ratio.float()), lower, 20.0)
            seq = seq + (log_is * m).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, lower, 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
        lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def policy_loss(
    logp: torch.Tensor,
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    cfg: GRPOLossConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy-gradient term per token and the clipping flags (low, high), for a ratio that
    carries its gradient (per token (B, T), or per sequence (B, 1)):

    PPO family (grpo, bnpo, dr_grpo, dapo, luspo):
        -min(r' A, clamp(r, 1 - eps_low, 1 + eps_high) A),
        r' = min(r, delta) when delta is set (INTELLECT-2, arXiv:2505.07291); the clip flags
        use r' as TRL does: low = r' < 1 - eps_low and A < 0, high = r' > 1 + eps_high and A > 0
    cispo (MiniMax-M1, arXiv:2506.13585):  -sg(min(r, eps_high)) A logp; high = r > eps_high, A > 0
    sapo (arXiv:2511.20347):  -sigmoid(tau (r - 1)) 4 / tau A, tau = sapo_temperature_pos if A > 0
        else sapo_temperature_neg
    vespo: -phi A logp, phi from `vespo_weights` (applied by the caller)
    """
    none = torch.zeros_like(ratio * advantages, dtype=torch.bool)
    if cfg.loss_type == "cispo":
        capped = torch.clamp(ratio, max=cfg.eps_high).detach()
        return -capped * advantages * logp, none, (ratio > cfg.eps_high) & (advantages > 0)
    if cfg.loss_type == "sapo":
        tau = torch.where(advantages > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        return -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * advantages, none, none
    clipped = torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    if cfg.delta is not None:
        ratio = torch.clamp(ratio, max=cfg.delta)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    low = (ratio < 1.0 - cfg.eps_low) & (advantages < 0)
    high = (ratio > 1.0 + cfg.eps_high) & (advantages > 0)
    return loss, low, high


def grpo_objective(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    config: GRPOLossConfig,
    sampler_logp: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items: float | torch.Tensor | None = None,
    num_sequences: float | None = None,
    accumulation_steps: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one call (a micro-batch) from the policy's log-probs and entropies
    (B, T), differentiable in both: TRL 1.16's `_compute_loss`, step by step.

    advantages (B,) or (B, T); mask, old_logp, ref_logp, sampler_logp (the engine's log-probs,
    for the off-policy mask; default old_logp) and importance_sampling_ratio (the sampler
    correction pi_old / pi_sampler, which multiplies the policy term, not the KL; VESPO folds
    it into phi instead) are (B, T). Returns (loss, terms): the per-token kl (B, T), the clip
    flags and VESPO's phi, from which `grpo_stats` makes the statistics.
    """
    cfg = config
    m = mask.float()  # (B, T)
    adv = advantages.float().unsqueeze(-1) if advantages.dim() == 1 else advantages.float()
    old = logp.detach() if old_logp is None else old_logp.float()
    entropy_mask = None
    if cfg.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy, m, cfg.top_entropy_quantile).float()
    if cfg.off_policy_mask_threshold is not None:
        drift_from = old if sampler_logp is None else sampler_logp
        keep = off_policy_mask(adv, logp, drift_from, m, cfg.off_policy_mask_threshold)

    log_ratio = logp - old  # (B, T)
    if cfg.importance_level == "sequence":
        # GSPO (arXiv:2507.18071): one ratio per sequence, its gradient spread over its tokens.
        len_b = m.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
        log_ratio_seq = (log_ratio * m).sum(-1, keepdim=True) / len_b
        ratio = torch.exp(log_ratio_seq)  # (B, 1)
    else:
        ratio = torch.exp(log_ratio)  # (B, T)

    kl = torch.zeros_like(logp)
    if cfg.beta != 0.0:
        diff = ref_logp.float() - logp
        kl = torch.exp(diff) - diff - 1.0  # k3, >= 0
        if cfg.use_bias_correction_kl:
            # DeepSeek-V3.2: weighting k3 by the (undetached) ratio makes its gradient the
            # unbiased reverse-KL gradient; on-policy the value is unchanged, the gradient not.
            kl = kl * ratio

    phi = None
    if cfg.loss_type == "vespo":
        phi = vespo_weights(adv, log_ratio, m, importance_sampling_ratio, cfg)
        per_token = -phi * adv * logp
        low = high = torch.zeros_like(per_token, dtype=torch.bool)
    else:
        per_token, low, high = policy_loss(logp, ratio, adv, cfg)
    if cfg.off_policy_mask_threshold is not None:
        per_token = per_token * keep
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if importance_sampling_ratio is not None and cfg.loss_type != "vespo":
        per_token = per_token * importance_sampling_ratio.float()
    if cfg.beta != 0.0:
        per_token = per_token + cfg.beta * kl

    weights = aggregation_weights(
        m,
        cfg.loss_type,
        max_completion_length=cfg.max_completion_length,
        num_items=num_items,
        num_sequences=num_sequences,
        accumulation_steps=accumulation_steps,
    )
    loss = (per_token * weights).sum()
    if cfg.entropy_coef != 0.0:
        # TRL's bonus: the token mean of the entropy over the tokens the policy term acts on,
        # per call and whatever the loss type, divided by the accumulation steps.
        em = m if entropy_mask is None else m * entropy_mask
        bonus = (entropy * em).sum() / em.sum().clamp(min=1.0) / accumulation_steps
        loss = loss - cfg.entropy_coef * bonus
    return loss, {"kl": kl.expand_as(m), "clip_low": low, "clip_high": high, "phi": phi}


def _share(flags: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """TRL's global_masked_mean: per-sequence values (B, 1) average over sequences, per-token
    values over loss tokens."""
    flags = flags.float()
    if flags.shape[-1] == 1:
        return flags.sum() / max(flags.shape[0], 1)
    return (flags * m).sum() / m.sum().clamp(min=1.0)


def grpo_stats(
    cfg: GRPOLossConfig,
    terms: dict[str, torch.Tensor | None],
    logp: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The statistics of `stat_names` as 0-dim fp32 tensors, with TRL's meanings: kl is the
    token mean of the (bias-corrected) k3; clip ratios are shares of loss tokens, or of
    sequences at sequence level; low_min / high_max the extreme per-sequence shares."""
    m = mask.float()
    stats = {
        "kl": masked_mean(terms["kl"].detach().float(), m),
        "entropy": masked_mean(entropy.detach().float(), m),
        "logp_mean": masked_mean(logp.detach().float(), m),
    }
    low, high = terms["clip_low"], terms["clip_high"]
    if cfg.loss_type in PPO_LOSS_TYPES:
        for name, flags in (("low", low), ("high", high), ("region", low | high)):
            stats[f"clip_ratio/{name}_mean"] = _share(flags, m)
            if cfg.importance_level == "sequence":
                stats[f"clip_ratio/{name}_mean_tokens"] = masked_mean(flags.float().expand_as(m), m)
        per_seq = [
            f.float().squeeze(-1) if f.shape[-1] == 1 else (f.float() * m).sum(-1) / m.sum(-1)
            for f in (low, high)
        ]
        # The extremes over sequences with loss tokens (NaN share: none), NaN if there is no
        # such sequence; computed without boolean indexing (no host sync).
        lows, highs = per_seq
        low_min = torch.where(lows.isnan(), float("inf"), lows).amin()
        high_max = torch.where(highs.isnan(), float("-inf"), highs).amax()
        stats["clip_ratio/low_min"] = torch.where(low_min.isinf(), float("nan"), low_min)
        stats["clip_ratio/high_max"] = torch.where(high_max.isinf(), float("nan"), high_max)
    elif cfg.loss_type == "cispo":
        stats["cispo_clip_ratio"] = _share(high, m)
    elif cfg.loss_type == "vespo":
        stats["vespo/phi_seq_mean"] = _share(terms["phi"], m)
    return {k: v.float() for k, v in stats.items()}


def grpo_loss_ref(
    logits: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    config: GRPOLossConfig | None = None,
    sampler_logp: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items: float | torch.Tensor | None = None,
    num_sequences: float | None = None,
    accumulation_steps: int = 1,
    aux_loss: torch.Tensor | None = None,
    inplace: bool = False,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss and its statistics; autograd gives d loss / d logits.

    logits (B, T, V) with logits[b, t] predicting ids[b, t]; the rest as `grpo_objective`;
    options: a GRPOLossConfig and/or its fields as keywords. `inplace` is accepted for
    signature parity and ignored. Returns (loss 0-dim fp32, stats of `stat_names`).
    """
    del inplace
    cfg = resolve(config, options)
    log_probs, entropy = _log_softmax_and_entropy(logits, cfg.temperature)  # (B, T, V), (B, T)
    logp = log_probs.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    loss, terms = grpo_objective(
        logp,
        entropy,
        advantages,
        mask,
        old_logp,
        ref_logp if cfg.beta != 0 else None,
        config=cfg,
        sampler_logp=sampler_logp,
        importance_sampling_ratio=importance_sampling_ratio,
        num_items=num_items,
        num_sequences=num_sequences,
        accumulation_steps=accumulation_steps,
    )
    return add_aux_loss(
        loss, grpo_stats(cfg, terms, logp, entropy, mask), aux_loss, cfg, accumulation_steps
    )


def add_aux_loss(
    loss: torch.Tensor,
    stats: dict[str, torch.Tensor],
    aux_loss: torch.Tensor | None,
    cfg: GRPOLossConfig,
    accumulation_steps: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An MoE router's load-balancing loss (0-dim, from the model's forward) joins the loss as
    router_aux_loss_coef * aux_loss / accumulation_steps, as TRL adds it; logged as aux_loss."""
    if aux_loss is None:
        return loss, stats
    stats = {**stats, "aux_loss": aux_loss.detach().float().reshape(())}
    if cfg.router_aux_loss_coef == 0.0:
        return loss, stats
    return loss + cfg.router_aux_loss_coef * aux_loss.float() / accumulation_steps, stats


def sampler_importance_weights(
    trainer_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "token_truncate",
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights (B, T) that correct for sampling from a slightly different policy
    (an inference engine's kernels, precision or stale weights) than the trainer's old policy.

    The per-token ratio is pi_old / pi_sampler = exp(trainer_logp - sampler_logp) (a NaN
    sampler log-prob, one the engine did not report, counts as ratio 1). Modes:
    - token_truncate (TIS): min(ratio, cap) per token;
    - token_mask: the ratio, or 0 where it exceeds cap (the token leaves the loss);
    - sequence_truncate / sequence_mask: the same with the sequence's ratio, the product of
      its tokens' ratios, given to each of its tokens.
    The weights multiply the advantages (the policy-gradient term, not the KL), as in TRL and
    verl. Stats: is_ratio_mean (masked mean of the raw ratio), is_capped (share of tokens
    truncated or masked).
    """
    if mode not in SAMPLER_CORRECTIONS or mode == "none":
        raise ValueError(f"mode must be one of {SAMPLER_CORRECTIONS[1:]}, got {mode!r}")
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    m = mask.float()
    log_ratio = torch.nan_to_num(trainer_logp.float() - sampler_logp.float(), nan=0.0) * m
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(m)  # (B, T)
    ratio = torch.exp(log_ratio)
    over = ratio > cap
    if mode.endswith("truncate"):
        weights = torch.clamp(ratio, max=cap)
    else:
        weights = torch.where(over, torch.zeros_like(ratio), ratio)
    stats = {"is_ratio_mean": masked_mean(ratio, m), "is_capped": masked_mean(over.float(), m)}
    return weights * m, stats


def combine_rewards(
    rewards: torch.Tensor, weights: torch.Tensor | None = None, *, unscorable_nan: bool = False
) -> torch.Tensor:
    """(N,) or (N, R) rewards -> (N,) fp32. Columns are weighted and summed ignoring NaN, as
    TRL does: a NaN (TRL's None) means that reward function does not apply to that sample.
    A row that is NaN in every column (see `scorable`) sums to 0, or to NaN if `unscorable_nan`
    (TRL 1.16's `rewards[unscorable_mask] = nan`)."""
    r = rewards.float()
    if r.dim() == 1:
        r = r.unsqueeze(-1)
    if weights is not None:
        r = r * weights.float().to(r.device)
    total = torch.nansum(r, dim=-1)
    if unscorable_nan:
        total = torch.where(scorable(rewards), total, float("nan"))
    return total


def scorable(rewards: torch.Tensor) -> torch.Tensor:
    """(N,) or (N, R) rewards -> (N,) bool: some column is not NaN. TRL 1.16 calls the other
    rows (every reward function returned None) unscorable."""
    r = rewards.float()
    return ~torch.isnan(r if r.dim() == 2 else r.unsqueeze(-1)).all(dim=-1)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """TRL's `trl.trainer.utils.nanstd`: the unbiased std of the non-NaN values; NaN if there
    are fewer than 2."""
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    std = torch.where(count > 1, var.sqrt(), float("nan"))
    return std if keepdim else std.reshape(()) if dim is None else std.squeeze(dim)


def check_rewards_finite(rewards: torch.Tensor) -> None:
    """A reward is a number or NaN (the reward function does not apply, TRL's None); an
    infinite one has no advantage (its group's mean and std are inf or NaN): a ValueError
    naming the first, by completion (row) and reward function (column). One host sync."""
    r = rewards.float()
    if rewards.is_floating_point() and bool(r.isinf().any()):
        where = [int(i) for i in torch.nonzero(r.isinf())[0]]
        column = f", reward function {where[1]}" if r.dim() == 2 else ""
        raise ValueError(
            f"rewards must be finite or NaN (NaN: the reward function does not "
            f"apply): rewards{where} = {r[tuple(where)].item()} (completion "
            f"{where[0]}{column})"
        )


def group_advantages_ref(
    rewards: torch.Tensor,
    group_size: int,
    *,
    weights: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO advantages: each reward minus its group's mean, scaled by a std. TRL 1.16's
    GRPOTrainer._generate_and_score_completions, multi_objective_aggregation="sum_then_normalize".

    rewards (N,) or (N, R), N = num_prompts * group_size with groups contiguous; r =
    combine_rewards (NaN columns skipped). A completion NaN in every column (every reward
    function returned None) is unscorable: its r is NaN, so it is left out of its group's mean
    (nanmean) and std. std is TRL's `nanstd`: unbiased over the scorable r, NaN if fewer than 2.
    scale "group": (r - mean) / (group std + eps); "batch": / (std of all scorable r + eps);
    "none": r - mean. NaN advantages become 0 (TRL's nan_to_num): unscorable completions, and
    groups with < 2 scorable completions ("group"; with "batch" and "none" r - mean is 0 there).
    Ours on top: a group whose scorable r are all equal (std <= 1e-8) gets exactly 0 (TRL:
    about 0 / (std + eps)), and an infinite reward is a ValueError (check_rewards_finite;
    TRL's advantages would be NaN or huge). Stats: reward_mean (mean of the scorable r, TRL's
    logged reward), reward_std (mean over groups of the std used, NaN ones skipped: group
    std, or the batch std), frac_zero_std (fraction of groups with group std <= 1e-8; a NaN
    std, < 2 scorable, is not zero, as TRL's isclose; TRL's "batch" counts the batch std
    instead).
    """
    check_rewards_finite(rewards)
    r = combine_rewards(rewards, weights, unscorable_nan=True)  # (N,)
    grouped = r.view(-1, group_size)  # (P, G)
    mean = grouped.nanmean(-1, keepdim=True)  # (P, 1)
    std = nanstd(grouped, -1, keepdim=True)  # (P, 1)
    zero_std = std <= 1e-8
    centred = grouped - mean
    if scale == "group":
        scale_std = std
        adv = centred / (std + eps)
    elif scale == "batch":
        scale_std = nanstd(r).expand_as(std)
        adv = centred / (scale_std + eps)
    else:
        scale_std = std
        adv = centred
    adv = torch.nan_to_num(torch.where(zero_std, torch.zeros_like(adv), adv), nan=0.0)
    stats = {
        "reward_mean": r.nanmean(),
        "reward_std": scale_std.nanmean(),
        "frac_zero_std": zero_std.float().mean(),
    }
    return adv.reshape(-1), stats


def moe_experts_ref(
    hidden: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts, the plain loop over experts (as transformers' eager experts).

    hidden (N, H); gate_up (E, 2I, H), rows [0, I) gate and [I, 2I) up; down (E, H, I);
    topk_ids (N, k) in [0, E); topk_weights (N, k). For each token n and slot j, e = ids[n, j]:
        out[n] += weights[n, j] * down[e] @ (silu(gate[e] @ h_n) * (up[e] @ h_n))
    fp32 maths, output in hidden's dtype; gradients reach every float input.
    """
    x = hidden.float()  # (N, H)
    out = torch.zeros_like(x)
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(topk_ids == e)  # the (token, slot) pairs routed to e
        if tok.numel() == 0:
            continue
        pre = x[tok] @ gate_up[e].float().T  # (n_e, 2I)
        act = torch.nn.functional.silu(pre[:, :inter]) * pre[:, inter:]  # (n_e, I)
        y = act @ down[e].float().T  # (n_e, H)
        out = out.index_add(0, tok, y * topk_weights[tok, slot].float()[:, None])
    return out.to(hidden.dtype)
