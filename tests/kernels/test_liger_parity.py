"""Parity with Liger-Kernel's chunked `LigerFusedLinearGRPOLoss` (liger_kernel.chunked_loss,
plain PyTorch, runs on the CPU): loss, d hidden, d weight and the stats whose names map, in
fp32 at tight tolerances, on tiny odd shapes with ragged masks (one row all masked), for
every option both implementations have. Our side runs twice: the reference
(`grpo_loss_ref` on the materialised logits hidden @ weight.T) and `linear_grpo_loss` (the
Triton kernels; in the interpreter without a GPU). A last test flips one option on our side
only and checks that the comparison notices.

Liger (0.8.5) covers: loss types grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo;
importance_sampling_level token and sequence (sequence only for the PPO family: Liger raises
for cispo, sapo and vespo); beta with the k3 KL estimator exp(ref - logp) - (ref - logp) - 1,
as TRL; use_bias_correction_kl (KL times the unclipped importance ratio, before delta, as TRL;
Liger's default is False, TRL's and ours True: every case sets it on both sides alike, the
cases run it on and off); epsilon_low / epsilon_high (cispo's cap is epsilon_high, as TRL);
delta; temperature; sapo and vespo parameters; num_items_in_batch (dapo, cispo, vespo);
vllm_is_ratio (= TRL's importance_sampling_ratio and ours: multiplies the per-token policy
loss before the KL is added; vespo folds it into phi instead), so the vLLM IS correction is
common ground in this version and is tested.

Where Liger differs from TRL 1.16 (and so from us), only the common ground is tested:
- luspo, token level: Liger computes sum(per_token_loss * mask.sum(1)) / (B T), the unmasked
  per-token loss; TRL (per_token_loss * mask).sum(-1).mean(). Equal only with no masked
  token, so luspo token level runs on a full mask. Sequence level without KL or IS ratio the
  per-token loss is (B, 1) and the two agree on any mask (tested with the ragged one);
  sequence level with beta > 0 the KL makes it (B, T) again: full mask.
- Clip stats at sequence level: TRL averages the (B, 1) clip flags over sequences (all-masked
  ones included); Liger expands them over the tokens and averages over masked tokens. Only
  token-level clip stats are compared.
- No entropy bonus, entropy stat, top_entropy_quantile or off_policy_mask_threshold in Liger:
  entropy_coef 0, quantile 1, no mask threshold here.
- Gradient accumulation: Liger has no current_gradient_accumulation_steps (grpo, bnpo,
  dr_grpo, sapo, luspo are not divided by it, and num_items_in_batch is not rescaled by
  steps / steps_per_generation): accumulation_steps=1 here.
- Advantages: Liger takes (B,) only. Stats: Liger returns [kl (if beta != 0), clip ratio];
  its clip ratio is TRL's clip_ratio/region_mean (cispo: cispo_clip_ratio); it has no
  low/high split, no phi_seq_mean.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from grpo.kernels import GRPOLossConfig, linear_grpo_loss
from grpo.kernels._checks import use_triton
from grpo.kernels.reference import grpo_loss_ref

from .helpers import assert_close

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

B, T, H, V = 4, 5, 16, 67
PPO_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Every case starts from these: off-policy ratios that cross both clip bounds, KL on with
# TRL's bias correction, a temperature that is not 1.
BASE = dict(temperature=0.7, beta=0.04, eps_low=0.2, eps_high=0.28, use_bias_correction_kl=True)
ADVANTAGES = [0.9, -1.2, 0.5, -0.7]
LOG_RATIO = torch.tensor(
    [
        [0.9, -0.5, 0.3, 0.2, 0.6],
        [0.5, -0.6, -0.7, 0.35, -0.15],  # ragged mask: the first 3 count
        [0.3, -0.2, 0.1, 0.4, -0.6],  # ragged mask: all masked
        [-0.1, 0.45, 0.1, -0.05, 0.25],  # ragged mask: the first 4 count
    ]
)


@dataclass(frozen=True)
class Case:
    name: str
    options: dict = field(default_factory=dict)  # GRPOLossConfig fields over BASE
    on_policy: bool = False  # old_logp None: ratio exactly 1 (its gradient still flows)
    is_ratio: bool = False  # pass a vLLM importance-sampling ratio
    num_items: int | None = None  # dapo/cispo/vespo normaliser (Liger: num_items_in_batch)
    full_mask: bool = False  # no masked token (luspo, see the docstring)

    def config(self) -> GRPOLossConfig:
        return GRPOLossConfig(**{**BASE, **self.options})


CASES = [
    # token level
    Case("grpo", dict(loss_type="grpo", delta=1.5)),
    Case("grpo-beta0", dict(loss_type="grpo", beta=0.0)),
    Case("grpo-nobiascorr", dict(loss_type="grpo", use_bias_correction_kl=False)),
    Case("grpo-onpolicy", dict(loss_type="grpo"), on_policy=True),
    Case(
        "grpo-onpolicy-nobiascorr",
        dict(loss_type="grpo", use_bias_correction_kl=False),
        on_policy=True,
    ),
    Case("grpo-isratio", dict(loss_type="grpo", delta=1.5), is_ratio=True),
    Case("grpo-defaults", dict(loss_type="grpo", temperature=1.0, beta=0.0, eps_high=None)),
    Case("bnpo", dict(loss_type="bnpo")),
    Case("dr_grpo", dict(loss_type="dr_grpo")),  # max_completion_length: T
    Case("dr_grpo-maxlen", dict(loss_type="dr_grpo", max_completion_length=8)),
    Case("dapo", dict(loss_type="dapo", delta=1.5)),
    Case("dapo-numitems", dict(loss_type="dapo"), num_items=23),
    Case("cispo", dict(loss_type="cispo", eps_high=1.3), is_ratio=True),
    Case(
        "cispo-numitems",
        dict(loss_type="cispo", eps_high=1.1, use_bias_correction_kl=False),
        num_items=31,
    ),
    Case("sapo", dict(loss_type="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.3)),
    Case("vespo", dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5)),
    Case("vespo-isratio", dict(loss_type="vespo", beta=0.0), is_ratio=True, num_items=19),
    Case("luspo", dict(loss_type="luspo", delta=1.5), full_mask=True),
    # sequence level (GSPO)
    Case("grpo-seq", dict(loss_type="grpo", importance_level="sequence")),
    Case(
        "grpo-seq-isratio",
        dict(loss_type="grpo", importance_level="sequence", delta=1.1),
        is_ratio=True,
    ),
    Case("bnpo-seq", dict(loss_type="bnpo", importance_level="sequence", delta=1.1)),
    Case(
        "dr_grpo-seq",
        dict(loss_type="dr_grpo", importance_level="sequence", use_bias_correction_kl=False),
    ),
    Case("dapo-seq", dict(loss_type="dapo", importance_level="sequence")),
    Case("luspo-seq", dict(loss_type="luspo", importance_level="sequence", beta=0.0)),
    Case("luspo-seq-kl", dict(loss_type="luspo", importance_level="sequence"), full_mask=True),
]


def make_inputs(device: str, case: Case, seed: int = 0) -> dict:
    cfg = case.config()
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5 * 2
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T)
    if not case.full_mask:
        mask[1, 3:] = 0
        mask[2] = 0  # all masked
        mask[3, 4:] = 0
    logp = torch.log_softmax(hidden @ weight.t() / cfg.temperature, -1)
    logp = logp.gather(-1, ids[..., None])[..., 0]
    # Old log-probs set by hand (ratio = exp(LOG_RATIO)), so that unmasked tokens fall below
    # 1 - eps_low with A < 0, above 1 + eps_high with A > 0, above delta 1.5 with A < 0 (where
    # delta changes the loss), and in between; and at sequence level row 0 is clipped high,
    # row 1 low. Ref log-probs and the IS ratio are random.
    old = logp - LOG_RATIO
    ref = logp + 0.5 * torch.randn(B, T, generator=gen)
    # As TRL makes it: exp((old - sampler) * mask), exactly 1 on masked tokens (VESPO sums its
    # log over all T positions in TRL and Liger, over the masked ones in ours).
    is_ratio = torch.exp(0.3 * torch.randn(B, T, generator=gen) * mask)
    tensors = dict(
        hidden=hidden,
        weight=weight,
        ids=ids,
        mask=mask,
        adv=torch.tensor(ADVANTAGES),
        old=old,
        ref=ref,
        is_ratio=is_ratio,
    )
    return {k: v.to(device) for k, v in tensors.items()}


def _leaves(inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        inp["hidden"].detach().clone().requires_grad_(),
        inp["weight"].detach().clone().requires_grad_(),
    )


def run_liger(inp: dict, case: Case, cfg: GRPOLossConfig) -> tuple:
    """Liger's loss, stats (under our names) and gradients for `cfg`."""
    assert cfg.entropy_coef == 0 and cfg.top_entropy_quantile == 1
    assert cfg.off_policy_mask_threshold is None
    module = liger_grpo.LigerFusedLinearGRPOLoss(
        beta=cfg.beta,
        compiled=False,
        use_ref_model=cfg.beta != 0,
        chunk_size=1,  # one sequence per chunk: its normalisers must span the whole batch
        epsilon_low=cfg.eps_low,
        epsilon_high=cfg.eps_high,
        loss_type=cfg.loss_type,
        max_completion_length=cfg.max_completion_length or T,
        importance_sampling_level=cfg.importance_level,
        sapo_temperature_pos=cfg.sapo_temperature_pos,
        sapo_temperature_neg=cfg.sapo_temperature_neg,
        temperature=cfg.temperature,
        delta=cfg.delta,
        use_bias_correction_kl=cfg.use_bias_correction_kl,
        vespo_k_pos=cfg.vespo_k_pos,
        vespo_lambda_pos=cfg.vespo_lambda_pos,
        vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg,
    )
    h, w = _leaves(inp)
    loss, metrics = module(
        h,
        w,
        inp["ids"],
        inp["mask"],
        inp["adv"],
        ref_per_token_logps=inp["ref"] if cfg.beta != 0 else None,
        old_per_token_logps=None if case.on_policy else inp["old"],
        vllm_is_ratio=inp["is_ratio"] if case.is_ratio else None,
        num_items_in_batch=case.num_items,
    )
    loss.backward()
    metrics = list(metrics)
    stats = {}
    if cfg.beta != 0:
        stats["kl"] = metrics.pop(0)
    (clip,) = metrics
    if cfg.importance_level == "token":  # sequence level: see the docstring
        if cfg.loss_type in PPO_FAMILY:
            stats["clip_ratio/region_mean"] = clip
        elif cfg.loss_type == "cispo":
            stats["cispo_clip_ratio"] = clip
    return loss.detach(), stats, h.grad, w.grad


def run_ours(path: str, inp: dict, case: Case, cfg: GRPOLossConfig) -> tuple:
    h, w = _leaves(inp)
    args = (
        inp["ids"],
        inp["adv"],
        inp["mask"],
        None if case.on_policy else inp["old"],
        inp["ref"] if cfg.beta != 0 else None,
    )
    kw = dict(
        config=cfg,
        importance_sampling_ratio=inp["is_ratio"] if case.is_ratio else None,
        num_items=case.num_items,
    )
    if path == "reference":
        loss, stats = grpo_loss_ref(h @ w.t(), *args, **kw)
    else:  # chunks of 3 rows: chunk boundaries fall inside sequences
        assert use_triton(h), "linear_grpo_loss would run its PyTorch fallback here"
        loss, stats = linear_grpo_loss(h, w, *args, chunk_size=3, **kw)
    loss.backward()
    return loss.detach(), stats, h.grad, w.grad


def compare(ours: tuple, theirs: tuple) -> None:
    """fp32 on both sides: agreement to rounding (rtol 1e-5, atol 1e-6 on values of order 1)."""
    loss, stats, d_hidden, d_weight = ours
    l_loss, l_stats, l_hidden, l_weight = theirs
    assert_close(loss, l_loss, "loss")
    assert_close(d_hidden, l_hidden, "d hidden")
    assert_close(d_weight, l_weight, "d weight")
    for name, value in l_stats.items():
        assert name in stats, f"stat {name!r} missing from ours ({sorted(stats)})"
        assert_close(stats[name], value, name)


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_liger(device, case, path):
    inp = make_inputs(device, case)
    cfg = case.config()
    theirs = run_liger(inp, case, cfg)
    assert all(torch.isfinite(t).all() for t in (theirs[0], theirs[2], theirs[3]))
    compare(run_ours(path, inp, case, cfg), theirs)


def test_cases_exercise_clipping(device):
    """The data do what the cases rely on (see make_inputs): unmasked tokens on every side of
    the clip range and of delta, with the advantage sign for which that side matters."""
    case = CASES[0]
    inp = make_inputs(device, case)
    cfg = case.config()
    logp = torch.log_softmax(inp["hidden"] @ inp["weight"].t() / cfg.temperature, -1)
    ratio = torch.exp(logp.gather(-1, inp["ids"][..., None])[..., 0] - inp["old"])
    on, pos = inp["mask"].bool(), (inp["adv"] > 0)[:, None]
    for side in (
        (ratio < 1 - cfg.eps_low) & ~pos,
        (ratio > 1 + cfg.eps_high) & pos,
        (ratio > cfg.delta) & ~pos,
        (ratio > 1 - cfg.eps_low) & (ratio < 1 + cfg.eps_high),
    ):
        assert (side & on).any()
    assert 0 < run_liger(inp, case, cfg)[1]["clip_ratio/region_mean"] < 1


# One option set differently on our side only: the comparison must fail. Each would be a
# plausible porting slip (Liger's default for the flag, symmetric clipping, a forgotten delta
# or temperature, the sapo temperatures swapped, dr_grpo's constant left at T).
WRONG = [
    ("grpo", "use_bias_correction_kl", False),
    ("grpo-onpolicy", "use_bias_correction_kl", False),
    ("grpo", "eps_high", 0.2),
    ("grpo", "delta", None),
    ("grpo", "temperature", 1.0),
    ("sapo", "sapo_temperature_neg", 0.9),
    ("dr_grpo-maxlen", "max_completion_length", None),
]


@pytest.mark.parametrize("case_name, option, value", WRONG)
def test_comparison_catches_a_wrong_option(device, case_name, option, value):
    case = next(c for c in CASES if c.name == case_name)
    inp = make_inputs(device, case)
    cfg = case.config()
    theirs = run_liger(inp, case, cfg)
    compare(run_ours("reference", inp, case, cfg), theirs)  # the right option passes
    wrong = dataclasses.replace(cfg, **{option: value})
    with pytest.raises(AssertionError):
        compare(run_ours("reference", inp, case, wrong), theirs)
