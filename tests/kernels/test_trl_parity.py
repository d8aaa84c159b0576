"""Parity with TRL 1.16 itself: `GRPOTrainer._compute_loss` on a tiny random Qwen2 against our
GRPO loss on the same model, for every loss type, importance level and loss option of TRL's.

One optimizer step of TWO UNEQUAL micro-batches (4 and 2 sequences; left-padded prompts,
ragged completion masks, one completion fully masked; gradient_accumulation_steps=2): TRL
runs `_compute_loss` + backward on each, from a trainer built with a real `GRPOConfig` per case
(see tests/kernels/trl_oracle.py); we run, on the same nn.Module, the model's logits at the
positions that predict the completion (logits[:, P-1:-1]) through our loss with
num_items=num_items_in_batch and accumulation_steps=2, as the SPEC says one reproduces one TRL
micro-batch. Compared: the window's summed loss, every parameter's summed gradient (fp32, tight
tolerances) and TRL's logged metrics (`_metrics["train"]` averaged over the micro-batches as
`GRPOTrainer.log` does) against our stats averaged the same way.

Our side runs three ways: "ref" (`grpo_loss_ref`, plain PyTorch), "triton" (`grpo_loss`: the
Triton kernels, in the interpreter without a GPU) and "linear" (`linear_grpo_loss` on the
backbone's hidden states and lm_head.weight; on the LINEAR_CASES). The last tests flip one
option on our side only, or nudge one metric, and check that the comparison notices.

Choices, and why:
- Old log-probs are the current ones + N(0, 0.3) noise + a shift of +-0.5 on some sequences
  (off-policy: token and sequence ratios cross both clip bounds and delta; see
  trl_oracle.make_micro_batches), except in the on-policy cases (TRL: old_per_token_logps
  absent, i.e. per_token_logps.detach(); ours: old_logp=None), where the bias-corrected KL's
  gradient differs from plain k3's.
- The sampler's importance ratio (the vLLM correction) is an input of `_compute_loss`, but
  GRPOConfig(use_vllm=True) needs vLLM: the is_ratio cases build the trainer without it and
  then set the two attributes `_compute_loss` reads (use_vllm,
  vllm_importance_sampling_correction). The ratio is 1 on masked tokens, as TRL makes it.
- cispo's cap is epsilon_high, which defaults to epsilon (0.2) in TRL: every ratio is then
  capped. The token-level cispo cases set epsilon_high=1.1 so that both sides of the cap
  occur; the sequence-level ones keep the default.
- max_completion_length is 8 > T = 5, so dr_grpo's constant is not the padded length.
- Tolerances (fp32): loss rtol 1e-5 / atol 1e-6; each gradient element rtol 1e-4 / atol
  2e-6 x the largest gradient element (the largest observed error is ~0.7e-6 x, in VESPO, whose
  weight amplifies the roundoff of a sequence's log-ratio by |k - lambda w|, here up to ~20);
  metrics rel 1e-5 / abs 1e-6. A wrong option is off by orders of magnitude more.
- TRL's fused LM head divides by the temperature given to GRPOConfig (baked in when the
  trainer is built); the trainer is rebuilt per case (milliseconds), temperatures alternate
  between 1.0 and 0.7.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from grpo.kernels import GRPOLossConfig, grpo_loss, linear_grpo_loss
from grpo.kernels.reference import grpo_loss_ref

from . import trl_oracle as oracle

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

TRL_VERSION = "1.16.0"
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
PATHS = ("ref", "triton", "linear")
CLIP_STATS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
)


def _case(
    name: str, on_policy: bool = False, sampler: bool = False, is_ratio: bool = False, **options
) -> dict:
    """options: GRPOConfig's; sampler: pass sampling_per_token_logps (the off-policy mask's
    drift, default old); is_ratio: pass TRL's vLLM importance_sampling_ratio."""
    return dict(name=name, on_policy=on_policy, sampler=sampler, is_ratio=is_ratio, options=options)


def _matrix() -> list[dict]:
    """Every loss type x importance level x beta in {0, 0.04}, temperatures alternating."""
    cases = []
    for i, (lt, lvl, beta) in enumerate(
        (lt, lvl, beta)
        for lt in LOSS_TYPES
        for lvl in ("token", "sequence")
        for beta in (0.0, 0.04)
    ):
        options = dict(
            loss_type=lt,
            importance_sampling_level=lvl,
            beta=beta,
            temperature=(1.0, 0.7)[(i // 2 + i // 4) % 2],
        )
        if lt == "cispo" and lvl == "token":
            options["epsilon_high"] = 1.1
        cases.append(_case(f"{lt}-{lvl[:3]}-beta{beta}-t{options['temperature']}", **options))
    return cases


EXTRA_CASES = [
    _case("grpo-tok-nobiascorr", loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
    _case(
        "dapo-seq-nobiascorr",
        loss_type="dapo",
        importance_sampling_level="sequence",
        beta=0.04,
        use_bias_correction_kl=False,
        temperature=0.7,
    ),
    _case("dr_grpo-entropy", loss_type="dr_grpo", beta=0.04, entropy_coef=0.01),
    _case("dapo-entropy", loss_type="dapo", entropy_coef=0.01, temperature=0.7),
    _case("grpo-topentropy", loss_type="grpo", beta=0.04, top_entropy_quantile=0.2),
    _case(
        "dapo-topentropy-entropy",
        loss_type="dapo",
        top_entropy_quantile=0.2,
        entropy_coef=0.01,
        temperature=0.7,
    ),
    _case(
        "grpo-offpolicymask-sampler",
        sampler=True,
        loss_type="grpo",
        beta=0.04,
        off_policy_mask_threshold=0.05,
    ),
    _case(
        "bnpo-offpolicymask-old", loss_type="bnpo", off_policy_mask_threshold=0.05, temperature=0.7
    ),
    _case(
        "vespo-offpolicymask-sampler",
        sampler=True,
        loss_type="vespo",
        off_policy_mask_threshold=0.05,
    ),
    _case("grpo-delta", loss_type="grpo", beta=0.04, delta=1.5, temperature=0.7),
    _case("luspo-seq-delta", loss_type="luspo", importance_sampling_level="sequence", delta=1.05),
    _case("dapo-epshigh", loss_type="dapo", epsilon=0.1, epsilon_high=0.28),
    _case("cispo-epshigh", loss_type="cispo", beta=0.04, epsilon_high=0.28, temperature=0.7),
    _case(
        "sapo-temps",
        loss_type="sapo",
        beta=0.04,
        sapo_temperature_pos=0.5,
        sapo_temperature_neg=2.0,
        temperature=0.7,
    ),
    _case(
        "vespo-kl",
        loss_type="vespo",
        vespo_k_pos=1.5,
        vespo_lambda_pos=2.5,
        vespo_k_neg=2.5,
        vespo_lambda_neg=1.5,
        beta=0.04,
    ),
    _case("grpo-isratio-kl", is_ratio=True, loss_type="grpo", beta=0.04, temperature=0.7),
    _case(
        "dapo-seq-isratio", is_ratio=True, loss_type="dapo", importance_sampling_level="sequence"
    ),
    _case("cispo-isratio", is_ratio=True, loss_type="cispo", epsilon_high=1.1, beta=0.04),
    _case("sapo-isratio-entropy", is_ratio=True, loss_type="sapo", entropy_coef=0.01),
    _case("vespo-isratio", is_ratio=True, loss_type="vespo", beta=0.04, temperature=0.7),
    _case("grpo-onpolicy-kl", on_policy=True, loss_type="grpo", beta=0.04),
    _case(
        "grpo-seq-onpolicy-kl",
        on_policy=True,
        loss_type="grpo",
        importance_sampling_level="sequence",
        beta=0.04,
        temperature=0.7,
    ),
    _case(
        "dapo-onpolicy-nobiascorr",
        on_policy=True,
        loss_type="dapo",
        beta=0.04,
        use_bias_correction_kl=False,
    ),
    _case("cispo-onpolicy-kl", on_policy=True, loss_type="cispo", beta=0.04, epsilon_high=5.0),
]
CASES = _matrix() + EXTRA_CASES
# The linear path on a few cases that between them cover its per-token, sequence and
# whole-call options.
LINEAR_CASES = (
    "vespo-isratio",
    "grpo-tok-beta0.04-t1.0",
    "dapo-seq-beta0.04-t1.0",
    "vespo-tok-beta0.0-t0.7",
    "dr_grpo-entropy",
    "grpo-topentropy",
    "grpo-offpolicymask-sampler",
    "grpo-onpolicy-kl",
)


def our_config(trl_options: dict) -> GRPOLossConfig:
    """The GRPOLossConfig of a case's GRPOConfig options (dr_grpo's constant included)."""
    fields = {oracle.TRL_TO_OURS.get(k, k): v for k, v in trl_options.items()}
    fields.setdefault("max_completion_length", oracle.MAX_COMPLETION_LENGTH)
    return GRPOLossConfig(**fields)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy machine the thread
    pool's waiting made this file 4x slower (62 s against 14 s on 2 loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return oracle.save_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"))


def trl_run(model_dir, out_dir, case: dict):
    """Build the model and TRL's trainer for `case`, make the window's micro-batches, run TRL."""
    model = oracle.load_model(model_dir)
    trainer = oracle.build_trainer(model, out_dir, **case["options"])
    if case["is_ratio"]:
        # The sampler correction needs vLLM to generate, not to compute the loss:
        # _compute_loss reads only these two attributes (VESPO reads the ratio regardless).
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    batches = oracle.make_micro_batches(
        model,
        case["options"].get("temperature", 1.0),
        on_policy=case["on_policy"],
        with_ref=case["options"].get("beta", 0.0) != 0.0,
        with_sampler=case["sampler"],
        with_is_ratio=case["is_ratio"],
    )
    return model, batches, oracle.trl_step(trainer, batches)


def our_step(
    path: str,
    model,
    batches,
    cfg: GRPOLossConfig,
    accumulation_steps: int = 2,
    num_items: str | None = "window",  # "window": TRL's num_items_in_batch; None: our default
    sampler: bool = True,
    is_ratio: bool = True,
):
    """Our loss on each micro-batch with backward: (summed loss, summed grads, stats lists).
    sampler / is_ratio False drop the sampler log-probs / importance ratios."""
    model.zero_grad(set_to_none=True)
    n_items = oracle.num_items(batches) if num_items == "window" else num_items
    total, stats = torch.zeros(()), {}
    for mb in batches:
        args = (mb.completion_ids, mb.advantages, mb.completion_mask, mb.old_logp, mb.ref_logp)
        kw = dict(
            config=cfg,
            sampler_logp=mb.sampler_logp if sampler else None,
            importance_sampling_ratio=mb.is_ratio if is_ratio else None,
            num_items=n_items,
            accumulation_steps=accumulation_steps,
        )
        if path == "linear":
            hidden = model.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
            hidden = hidden.last_hidden_state[:, oracle.PROMPT_LEN - 1 : -1]
            loss, s = linear_grpo_loss(hidden, model.lm_head.weight, *args, **kw)
        else:
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            logits = logits[:, oracle.PROMPT_LEN - 1 : -1]  # logits[:, t] predicts completion[:, t]
            assert logits.shape[1] == mb.completion_ids.shape[1]
            loss, s = (grpo_loss_ref if path == "ref" else grpo_loss)(logits, *args, **kw)
        loss.backward()
        total = total + loss.detach()
        for k, v in s.items():
            stats.setdefault(k, []).append(float(v))
    grads = oracle.grads_of(model)
    model.zero_grad(set_to_none=True)
    return total, grads, stats


def _log_mean(values: list[float]) -> float | None:
    """GRPOTrainer.log's average of a metric's per-micro-batch values: NaN left out."""
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else None


def compare(ours, theirs, beta: float, loss_tol: tuple[float, float] = (1e-5, 1e-6)) -> None:
    """Loss, every parameter gradient and the comparable metrics; raises AssertionError."""
    loss, grads, stats = ours
    t_loss, t_grads, t_metrics = theirs
    scale = max(g.abs().max().item() for g in t_grads.values())
    assert scale > 0 and math.isfinite(scale), f"TRL's gradients are degenerate ({scale})"
    torch.testing.assert_close(
        loss,
        t_loss,
        rtol=loss_tol[0],
        atol=loss_tol[1],
        msg=lambda m: f"loss: ours {loss.item()} TRL {t_loss.item()}; {m}",
    )
    for name, t_grad in t_grads.items():
        torch.testing.assert_close(
            grads[name],
            t_grad,
            rtol=1e-4,
            atol=2e-6 * scale,
            msg=lambda m, name=name: f"grad of {name}: {m}",
        )
    compared = ["entropy"] + (["kl"] if beta != 0.0 else [])
    compared += [k for k in t_metrics if k.startswith(("clip_ratio/", "cispo_", "vespo/"))]
    for key in compared:
        assert key in stats, f"stat {key!r} missing from ours ({sorted(stats)})"
        ours_v, trl_v = _log_mean(stats[key]), t_metrics[key]
        if trl_v is None:
            assert ours_v is None, f"{key}: ours {ours_v}, TRL none (all NaN)"
            continue
        assert ours_v is not None and math.isclose(ours_v, trl_v, rel_tol=1e-5, abs_tol=1e-6), (
            f"metric {key}: ours {ours_v} TRL {trl_v}"
        )


def test_trl_is_the_oracle_version():
    """The kernels follow TRL 1.16's _compute_loss; another TRL may legitimately differ."""
    assert trl.__version__ == TRL_VERSION, (
        f"trl {trl.__version__}, the parity is with {TRL_VERSION}"
    )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_loss_grads_metrics_match_trl(case, model_dir, tmp_path):
    model, batches, theirs = trl_run(model_dir, tmp_path, case)
    assert theirs[0].isfinite() and theirs[0] != 0
    cfg = our_config(case["options"])
    beta = case["options"].get("beta", 0.0)
    paths = PATHS if case["name"] in LINEAR_CASES else PATHS[:2]
    for path in paths:
        # The interpreted kernels' VESPO loss sits about 1e-4 (relative) from our reference on
        # transformers 5.25's logits (vespo-kl: ref -0.0310762, triton -0.0310727, TRL
        # -0.0310755), where the reference path matches TRL to 2e-5: the kernel's fp32 sums
        # before VESPO's exponentiated weights. Its gradients and metrics keep the strict
        # tolerances; the loss gets 2e-4 relative, still far below a wrong option's change.
        loose = path != "ref" and cfg.loss_type == "vespo"
        loss_tol = (2e-4, 0.0) if loose else (1e-5, 1e-6)
        try:
            compare(our_step(path, model, batches, cfg), theirs, beta, loss_tol)
        except AssertionError as e:
            raise AssertionError(f"[{path}] {e}") from None


def test_named_cases_exist():
    names = {c["name"] for c in CASES}
    named = set(LINEAR_CASES) | {m[0] for m in MUTATIONS}
    assert named <= names, sorted(named - names)


# One option wrong on our side only (TRL keeps the case's): the comparison must notice. The
# keys starting with "_" are our_step's arguments instead of GRPOLossConfig fields.
MUTATIONS = [
    ("grpo-tok-nobiascorr", dict(use_bias_correction_kl=True)),
    ("grpo-onpolicy-kl", dict(use_bias_correction_kl=False)),
    ("grpo-seq-onpolicy-kl", dict(use_bias_correction_kl=False)),
    ("dr_grpo-entropy", dict(max_completion_length=None)),  # T = 5 instead of 8
    ("bnpo-tok-beta0.0-t0.7", dict(loss_type="grpo")),
    ("grpo-tok-beta0.0-t1.0", dict(_accumulation_steps=1)),
    ("dapo-tok-beta0.0-t0.7", dict(_num_items=None)),  # each call's tokens x 2: 22, 16 vs 19
    ("dapo-entropy", dict(entropy_coef=0.0)),
    ("grpo-topentropy", dict(top_entropy_quantile=0.3)),
    ("grpo-offpolicymask-sampler", dict(_sampler=False)),  # the mask from old_logp instead
    ("sapo-temps", dict(sapo_temperature_neg=1.05)),
    ("vespo-kl", dict(vespo_lambda_neg=2.0)),
    ("grpo-delta", dict(temperature=1.0)),
    ("grpo-isratio-kl", dict(_is_ratio=False)),
    ("vespo-isratio", dict(_is_ratio=False)),
]


@pytest.mark.parametrize(
    "name,wrong", MUTATIONS, ids=[m[0] + "-" + ",".join(m[1]).strip("_") for m in MUTATIONS]
)
def test_comparison_detects_a_wrong_option(name, wrong, model_dir, tmp_path):
    case = next(c for c in CASES if c["name"] == name)
    model, batches, theirs = trl_run(model_dir, tmp_path, case)
    right = our_config(case["options"])
    compare(our_step("ref", model, batches, right), theirs, right.beta)  # the right one passes
    fields = {k: v for k, v in wrong.items() if not k.startswith("_")}
    step_kw = {k[1:]: v for k, v in wrong.items() if k.startswith("_")}
    cfg = dataclasses.replace(right, **fields)
    with pytest.raises(AssertionError):
        compare(our_step("ref", model, batches, cfg, **step_kw), theirs, right.beta)


def test_comparison_detects_a_wrong_metric(model_dir, tmp_path):
    """Each compared metric, off by 1e-3 on our side only, fails the comparison."""
    case = next(c for c in CASES if c["name"] == "grpo-tok-beta0.04-t1.0")
    model, batches, theirs = trl_run(model_dir, tmp_path, case)
    cfg = our_config(case["options"])
    loss, grads, stats = our_step("ref", model, batches, cfg)
    compare((loss, grads, stats), theirs, cfg.beta)
    keys = ["kl", "entropy", *CLIP_STATS]
    for key in keys:
        assert theirs[2][key] is not None, key
        wrong = {**stats, key: [v + 1e-3 for v in stats[key]]}
        with pytest.raises(AssertionError, match=key):
            compare((loss, grads, wrong), theirs, cfg.beta)
