"""Plain-PyTorch references: the specification of every op in `kernels`.

Read this file as the definition of GRPO's per-token maths. Every function computes in fp32
whatever the input dtype, keeps autograd intact where a gradient exists, and favours clarity
over speed. The Triton kernels are tested against these functions.

Conventions follow TRL's GRPOTrainer:
    z       = logits / temperature                                  # (B, T, V)
    logp    = z[id] - logsumexp(z)                                  # (B, T)
    r       = exp(logp - old_logp)        (old_logp None: on-policy, r == 1 but with gradient)
    PPO:    l = -min(r' * A, clamp(r, 1 - eps_low, 1 + eps_high) * A),  r' = min(r, delta)
    CISPO:  l = -sg(min(r, eps_high)) * A * logp
    GSPO:   r -> s_bt = sg(s_b) * exp(logp - sg(logp)),  s_b = exp(sum_t m (logp - old) / len_b)
    KL k3:  l += beta * (exp(ref - logp) - (ref - logp) - 1)
    bonus:  l -= entropy_coef * H_t
and the loss aggregates the masked per-token `l` by `loss_type` (see `aggregation_weights`).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_LEVELS = ("token", "sequence")
SCALES = ("group", "batch", "none")
STAT_NAMES = ("kl", "clip_low", "clip_high", "clip_region", "entropy", "logp_mean")
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate",
                       "sequence_mask")


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
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight w (B, T) of each token's loss, so that loss = sum(w * l).

    grpo:               m / (len_b * B), len_b = max(sum_t m, 1)   (mean of sequence means)
    dr_grpo:            m / (B * max_completion_length)           (default T)
    bnpo, dapo, cispo:  m / num_items                             (default max(sum m, 1))
    """
    m = mask.float()  # (B, T)
    batch, seq_len = m.shape
    if loss_type == "grpo":
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * batch)
    if loss_type == "dr_grpo":
        return m / (batch * (max_completion_length or seq_len))
    if num_items is None:
        num_items = m.sum().clamp(min=1.0)
    return m / num_items


def grpo_per_token_loss(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "grpo",
    importance_level: str = "token",
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's per-token loss `l` (B, T) from the policy's log-probs and entropies (B, T).

    Differentiable in logp and entropy. Also returns the per-token terms behind the
    statistics: kl (B, T) and the boolean clip_low / clip_high (B, T).
    """
    m = mask.float()  # (B, T)
    # (B, 1) one advantage per sequence, or (B, T) per token (e.g. scaled by an importance
    # weight of the sampler): every use below broadcasts either way.
    adv = advantages.float().unsqueeze(-1) if advantages.dim() == 1 else advantages.float()
    old = logp.detach() if old_logp is None else old_logp.float()
    log_ratio = logp - old  # (B, T)

    if importance_level == "sequence":
        # GSPO: one ratio per sequence; its token form gives each token the sequence's
        # value and routes the gradient through that token's own log-prob.
        len_b = m.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
        seq_log_ratio = (log_ratio * m).sum(-1, keepdim=True) / len_b  # (B, 1)
        ratio = seq_log_ratio.detach().exp() * torch.exp(logp - logp.detach())  # (B, T)
    else:
        ratio = torch.exp(log_ratio)  # (B, T)

    if loss_type == "cispo":
        capped = torch.clamp(ratio, max=eps_high).detach()
        per_token = -capped * adv * logp
        clip_low = torch.zeros_like(ratio, dtype=torch.bool)
        clip_high = (ratio > eps_high) & (adv > 0)
    else:
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
        per_token = -torch.min(unclipped * adv, clipped * adv)
        clip_low = (ratio < 1.0 - eps_low) & (adv < 0)
        clip_high = (ratio > 1.0 + eps_high) & (adv > 0)

    if ref_logp is not None and beta != 0.0:
        diff = ref_logp.float() - logp
        kl = torch.exp(diff) - diff - 1.0  # k3 estimator, >= 0
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logp)
    if entropy_coef != 0.0:
        per_token = per_token - entropy_coef * entropy
    return per_token, {"kl": kl, "clip_low": clip_low, "clip_high": clip_high}


def grpo_stats(
    terms: dict[str, torch.Tensor], logp: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Masked token means of the statistics named in STAT_NAMES (0-dim fp32 tensors)."""
    m = mask.float()
    low, high = terms["clip_low"], terms["clip_high"]
    return {
        "kl": masked_mean(terms["kl"].detach().float(), m),
        "clip_low": masked_mean(low.float(), m),
        "clip_high": masked_mean(high.float(), m),
        "clip_region": masked_mean((low | high).float(), m),
        "entropy": masked_mean(entropy.detach().float(), m),
        "logp_mean": masked_mean(logp.detach().float(), m),
    }


def grpo_loss_ref(
    logits: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "grpo",
    importance_level: str = "token",
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    inplace: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss and its statistics; autograd gives d loss / d logits.

    logits (B, T, V) with logits[b, t] predicting ids[b, t]; advantages (B,) or (B, T); mask
    (B, T); old_logp, ref_logp (B, T). `inplace` is accepted for signature parity and ignored.
    Returns (loss 0-dim fp32, stats dict of 0-dim fp32 tensors named in STAT_NAMES).
    """
    del inplace
    log_probs, entropy = _log_softmax_and_entropy(logits, temperature)  # (B, T, V), (B, T)
    logp = log_probs.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    per_token, terms = grpo_per_token_loss(
        logp, entropy, advantages, mask, old_logp, ref_logp, beta=beta, eps_low=eps_low,
        eps_high=eps_high, delta=delta, loss_type=loss_type, importance_level=importance_level,
        entropy_coef=entropy_coef,
    )
    weights = aggregation_weights(mask, loss_type, max_completion_length, num_items)
    loss = (per_token * weights).sum()
    return loss, grpo_stats(terms, logp, entropy, mask)


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


def combine_rewards(rewards: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) or (N, R) rewards -> (N,) fp32. Columns are weighted and summed ignoring NaN, as
    TRL does: a NaN means that reward function does not apply to that sample."""
    r = rewards.float()
    if r.dim() == 1:
        r = r.unsqueeze(-1)
    if weights is not None:
        r = r * weights.float().to(r.device)
    return torch.nansum(r, dim=-1)


def group_advantages_ref(
    rewards: torch.Tensor,
    group_size: int,
    *,
    weights: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO advantages: each reward minus its group's mean, scaled by a std.

    rewards (N,) or (N, R), N = num_prompts * group_size with groups contiguous.
    scale "group": / (group std + eps); "batch": / (std of all N rewards + eps); "none": as is.
    std is the unbiased sample std. Groups whose rewards are all equal (std ~ 0, as
    torch.isclose(std, 0)) get advantage exactly 0. Stats: reward_mean (over all N),
    reward_std (mean over groups of the std used to scale: group std, or the batch std),
    frac_zero_std (fraction of groups with all-equal rewards).
    """
    r = combine_rewards(rewards, weights)  # (N,)
    grouped = r.view(-1, group_size)  # (P, G)
    mean = grouped.mean(-1, keepdim=True)  # (P, 1)
    std = grouped.std(-1, keepdim=True)  # (P, 1), unbiased
    zero_std = std <= 1e-8
    centred = grouped - mean
    if scale == "group":
        scale_std = std
        adv = centred / (std + eps)
    elif scale == "batch":
        scale_std = r.std().expand_as(std)
        adv = centred / (scale_std + eps)
    else:
        scale_std = std
        adv = centred
    adv = torch.where(zero_std, torch.zeros_like(adv), adv)
    stats = {
        "reward_mean": r.mean(),
        "reward_std": scale_std.mean(),
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
