"""grpo_loss against grpo_loss_ref: values, gradients and statistics over the options,
fp32 and bf16, odd vocabularies, ragged masks, strided logits, in place or not; and errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from grpo.kernels import grpo_loss
from grpo.kernels.reference import LOSS_TYPES, grpo_loss_ref, stat_names, token_logprobs_ref

from .helpers import assert_close, assert_within_ref_error

B, T = 4, 6


def _cases() -> list[dict]:
    """Every loss_type x importance_level x beta, with the other options cycled so that each
    value of each option meets many of the others (a full product is too slow under the
    interpreter)."""
    base = [(lt, lvl, beta) for lt in LOSS_TYPES for lvl in ("token", "sequence")
            for beta in (0.0, 0.04)]
    cases = []
    for i, (lt, lvl, beta) in enumerate(base * 2):
        cases.append(dict(
            loss_type=lt, importance_level=lvl, beta=beta,
            delta=None if lt in ("cispo", "sapo", "vespo") or i % 3 else 1.15,
            temperature=(1.0, 0.7)[i % 2],
            entropy_coef=(0.0, 0.01)[(i // 2) % 2],
            use_bias_correction_kl=(True, False)[(i // 3) % 2],
            accumulation_steps=(1, 2)[(i // 5) % 2],
            sampler=bool((i // 7) % 2),
            top_entropy_quantile=(1.0, 1.0, 0.5)[i % 3],
            off_policy_mask_threshold=(None, None, None, 0.05)[(i // 2) % 4],
            dtype=(torch.float32, torch.bfloat16)[(i // 3) % 2],
            vocab=(1000, 4099)[(i // 4) % 2],
            inplace=bool((i // 5) % 2) ^ bool(i % 2),
            strided=bool(i % 4 == 1 or i % 5 == 0),
            on_policy=i % 7 == 4,
        ))
    return cases


def _case_id(c: dict) -> str:
    return (f"{c['loss_type']}-{c['importance_level'][:3]}-b{c['beta']}-d{c['delta']}"
            f"-t{c['temperature']}-e{c['entropy_coef']}-{str(c['dtype'])[6:]}-V{c['vocab']}"
            f"-{'inpl' if c['inplace'] else 'copy'}{'-strided' if c['strided'] else ''}"
            f"{'-onpol' if c['on_policy'] else ''}{'' if c['use_bias_correction_kl'] else '-k3'}"
            f"-acc{c['accumulation_steps']}{'-isr' if c['sampler'] else ''}"
            f"-q{c['top_entropy_quantile']}-opm{c['off_policy_mask_threshold']}")


def make_inputs(device: str, vocab: int, dtype: torch.dtype, strided: bool, seed: int = 0):
    """Logits with a ragged mask (one row all zero), off-policy old/ref log-probs far enough
    from the current ones that clipping happens, advantages of both signs."""
    gen = torch.Generator().manual_seed(seed)
    if strided:  # a (B, T+3, V) buffer sliced in time: non-contiguous batch stride
        full = (torch.randn(B, T + 3, vocab, generator=gen) * 2.0).to(device=device, dtype=dtype)
        logits = full[:, 1:T + 1]
    else:
        logits = (torch.randn(B, T, vocab, generator=gen) * 2.0).to(device=device, dtype=dtype)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2] = 0
    mask[3, 2:] = 0
    adv = torch.tensor([1.0, -0.7, 0.4, -1.3])
    base = token_logprobs_ref(logits.cpu(), ids)
    old = base + 0.35 * torch.randn(B, T, generator=gen)
    ref = base + 0.5 * torch.randn(B, T, generator=gen)
    sampler = base + 0.3 * torch.randn(B, T, generator=gen)
    isr = torch.exp(0.2 * torch.randn(B, T, generator=gen)).clamp(max=1.1) * mask
    return {
        "logits": logits,
        "ids": ids.to(device),
        "adv": adv.to(device),
        "mask": mask.to(device),
        "old": old.to(device),
        "ref": ref.to(device),
        "sampler": sampler.to(device),
        "isr": isr.to(device),
    }


def _run(fn, logits, inp, opts, old):
    """Loss, stats and d loss / d logits for one implementation on its own copy of logits."""
    x = logits.clone().detach().requires_grad_()
    loss, stats = fn(x, inp["ids"], inp["adv"], inp["mask"], old, inp["ref"], **opts)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, x.grad.detach().clone()


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_matches_reference(case, device):
    c = dict(case)
    dtype, vocab, strided, on_policy, sampler = (c.pop(k) for k in (
        "dtype", "vocab", "strided", "on_policy", "sampler"))
    inp = make_inputs(device, vocab, dtype, strided)
    old = None if on_policy else inp["old"]
    if sampler:
        c.update(sampler_logp=inp["sampler"], importance_sampling_ratio=inp["isr"])
    ref_opts = {k: v for k, v in c.items() if k != "inplace"}

    # Ours, on a fresh tensor with the case's layout (inplace writes into the strided view).
    x = make_inputs(device, vocab, dtype, strided)["logits"].requires_grad_()
    assert x.is_contiguous() != strided
    loss, stats = grpo_loss(x, inp["ids"], inp["adv"], inp["mask"], old, inp["ref"], **c)
    loss.backward()
    grad = x.grad

    gold_loss, gold_stats, gold_grad = _run(grpo_loss_ref, inp["logits"].float(), inp, ref_opts,
                                            old)
    assert set(stats) == set(gold_stats) == set(stat_names(c["loss_type"],
                                                           c["importance_level"]))
    if dtype == torch.float32:
        # VESPO's weight exp(lambda + k log w - lambda w) amplifies the 1e-7 relative
        # differences of two logsumexp orders by |k - lambda w| over a sum of T log-ratios.
        rtol = 2e-4 if c["loss_type"] == "vespo" else 1e-5
        assert_close(loss, gold_loss, "loss", rtol=rtol)
        assert_close(grad, gold_grad, "grad", rtol=max(rtol, 1e-4), atol=1e-6)
        for k in gold_stats:
            assert_close(stats[k], gold_stats[k], f"stat {k}", rtol=rtol)
    else:
        rl, rs, rg = _run(grpo_loss_ref, inp["logits"], inp, ref_opts, old)
        assert grad.dtype == dtype
        assert_within_ref_error(loss, gold_loss, rl, 1e-5, "loss")
        assert_within_ref_error(grad.float(), gold_grad, rg.float(), 1e-6, "grad")
        for k in gold_stats:
            assert_within_ref_error(stats[k], gold_stats[k], rs[k], 1e-5, f"stat {k}")
    # The masked rows carry no gradient at all.
    assert (grad[inp["mask"] == 0] == 0).all()


def test_minus_inf_logits_get_no_gradient_and_no_nan(device):
    inp = make_inputs(device, 300, torch.float32, False)
    inp["logits"][..., 250:] = float("-inf")
    inp["ids"] = inp["ids"] % 250
    opts = dict(beta=0.04, entropy_coef=0.01)
    loss, stats, grad = _run(grpo_loss, inp["logits"], inp, opts, inp["old"])
    cut = dict(inp, logits=inp["logits"][..., :250].contiguous())
    gold, gold_stats, gold_grad = _run(grpo_loss_ref, cut["logits"], cut, opts, inp["old"])
    assert_close(loss, gold, "loss")
    assert_close(grad[..., :250], gold_grad, "grad", rtol=1e-4, atol=1e-6)
    assert (grad[..., 250:] == 0).all()
    assert all(torch.isfinite(v) for v in stats.values())


def test_clipping_and_kl_are_exercised(device):
    """The shared inputs really clip on both sides and have a non-zero KL, so the
    comparisons above cover the clipped branches."""
    inp = make_inputs(device, 1000, torch.float32, False)
    _, stats = grpo_loss(inp["logits"], inp["ids"], inp["adv"], inp["mask"], inp["old"],
                         inp["ref"], beta=0.04)
    low, high = stats["clip_ratio/low_mean"], stats["clip_ratio/high_mean"]
    assert low > 0 and high > 0 and stats["kl"] > 0
    assert stats["clip_ratio/region_mean"] == low + high


def test_inplace_consumes_logits_and_saves_memory(device):
    inp = make_inputs(device, 1000, torch.float32, False)
    x = inp["logits"].clone().requires_grad_()
    loss, _ = grpo_loss(x, inp["ids"], inp["adv"], inp["mask"], inp["old"], inplace=True)
    loss.backward()
    assert x.grad.data_ptr() == x.data_ptr()  # the gradient is the logits' own storage
    _, _, gold = _run(grpo_loss_ref, inp["logits"], inp, {}, inp["old"])
    assert_close(x.grad, gold, "inplace grad", rtol=1e-4, atol=1e-6)


def test_inplace_is_refused_when_autograd_saved_the_logits(device):
    """Overwriting logits that another op saved for its backward must not silently corrupt
    that backward: the bumped version counter makes autograd raise."""
    inp = make_inputs(device, 1000, torch.float32, False)
    w = torch.full((1000,), 0.5, device=device, requires_grad=True)
    logits = torch.tanh(inp["logits"] * w)  # tanh saves its output for its backward
    loss, _ = grpo_loss(logits, inp["ids"], inp["adv"], inp["mask"], inp["old"], inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_sequence_level_equals_trl_sequence_ratio(device):
    """GSPO's token form in DESIGN.md gives the same loss and gradient as TRL's sequence
    ratio exp(mean_t log r) with autograd through the mean, for every aggregation."""
    inp = make_inputs(device, 1000, torch.float32, False)
    m, adv = inp["mask"], inp["adv"].unsqueeze(-1)
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        x = inp["logits"].clone().requires_grad_()
        logp = torch.log_softmax(x, -1).gather(-1, inp["ids"].unsqueeze(-1)).squeeze(-1)
        len_b = m.sum(-1, keepdim=True).clamp(min=1)
        coef1 = torch.exp(((logp - inp["old"]) * m).sum(-1, keepdim=True) / len_b)
        coef2 = coef1.clamp(0.8, 1.2)
        per_tok = -torch.min(coef1 * adv, coef2 * adv).expand_as(logp)
        if loss_type == "grpo":
            trl = ((per_tok * m).sum(-1) / len_b.squeeze(-1)).mean()
        elif loss_type == "bnpo":
            trl = (per_tok * m).sum() / m.sum()
        else:
            trl = (per_tok * m).sum() / (B * T)
        trl.backward()
        y = inp["logits"].clone().requires_grad_()
        ours, _ = grpo_loss(y, inp["ids"], inp["adv"], m, inp["old"], loss_type=loss_type,
                            importance_level="sequence")
        ours.backward()
        assert_close(ours, trl.detach(), f"{loss_type} loss")
        assert_close(y.grad, x.grad, f"{loss_type} grad", rtol=1e-4, atol=1e-7)


def test_num_items_makes_micro_batches_add_up(device):
    """dapo with num_items = the whole batch's token count: the sum of micro-batch losses
    and gradients equals the loss and gradient of the whole batch in one call."""
    inp = make_inputs(device, 1000, torch.float32, False)
    total = inp["mask"].sum()
    x = inp["logits"].clone().requires_grad_()
    whole, _ = grpo_loss(x, inp["ids"], inp["adv"], inp["mask"], inp["old"], loss_type="dapo")
    whole.backward()
    y = inp["logits"].clone().requires_grad_()
    parts = 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        part, _ = grpo_loss(y[sl], inp["ids"][sl], inp["adv"][sl], inp["mask"][sl],
                            inp["old"][sl], loss_type="dapo", num_items=total)
        part.backward()
        parts = parts + part.detach()
    assert_close(parts, whole.detach(), "summed loss")
    assert_close(y.grad, x.grad, "accumulated grad", rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grad_output_scales_gradient(device, level):
    inp = make_inputs(device, 1000, torch.float32, False)
    x = inp["logits"].clone().requires_grad_()
    loss, _ = grpo_loss(x, inp["ids"], inp["adv"], inp["mask"], inp["old"],
                        importance_level=level)
    (loss * 3.0).backward()
    _, _, gold = _run(grpo_loss_ref, inp["logits"], inp, {"importance_level": level},
                      inp["old"])
    assert_close(x.grad, 3.0 * gold, "scaled grad", rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("importance_level", ["token", "sequence"])
def test_all_masked_is_zero_not_nan(device, importance_level):
    inp = make_inputs(device, 1000, torch.float32, False)
    x = inp["logits"].clone().requires_grad_()
    zeros = torch.zeros_like(inp["mask"])
    for loss_type in ("grpo", "dapo"):
        loss, stats = grpo_loss(x, inp["ids"], inp["adv"], zeros, inp["old"], inp["ref"],
                                beta=0.04, loss_type=loss_type, importance_level=importance_level)
        loss.backward()
        assert loss.item() == 0.0
        # Per-sequence token shares over no token are NaN, as TRL's (sequence level: a ratio of
        # exactly 1 per sequence, unclipped).
        extremes = ("clip_ratio/low_min", "clip_ratio/high_max")
        assert all(v.item() == 0.0 for k, v in stats.items() if k not in extremes), stats
        assert all(stats[k].isnan() == (importance_level == "token") for k in extremes), stats
        assert (x.grad == 0).all()
        x.grad = None


def test_no_grad_only_reads(device):
    inp = make_inputs(device, 1000, torch.float32, False)
    x = inp["logits"].clone().requires_grad_()
    before = x.detach().clone()
    with torch.no_grad():
        loss, stats = grpo_loss(x, inp["ids"], inp["adv"], inp["mask"], inp["old"], inp["ref"],
                                beta=0.04, inplace=True)
    assert not loss.requires_grad
    assert torch.equal(x.detach(), before)
    gold, gold_stats = grpo_loss_ref(before, inp["ids"], inp["adv"], inp["mask"], inp["old"],
                                     inp["ref"], beta=0.04)
    assert_close(loss, gold, "no-grad loss")
    for k in gold_stats:
        assert_close(stats[k], gold_stats[k], k)


def test_backward_twice_is_a_clear_error(device):
    inp = make_inputs(device, 1000, torch.float32, False)
    x = inp["logits"].clone().requires_grad_()
    loss, _ = grpo_loss(x, inp["ids"], inp["adv"], inp["mask"], inp["old"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def _bad_calls(inp):
    x, ids, adv, mask, old, ref = (inp[k] for k in ("logits", "ids", "adv", "mask", "old", "ref"))
    bad_ids_hi, bad_ids_lo = ids.clone(), ids.clone()
    bad_ids_hi[0, 0] = x.shape[-1]
    bad_ids_lo[1, 1] = -1
    nan_adv, inf_adv = adv.clone(), adv.clone()
    nan_adv[0], inf_adv[1] = float("nan"), float("inf")
    wide = torch.randn(B, T, 2 * x.shape[-1], device=x.device)[..., ::2]
    return {
        "ids shape": ((x, ids[:, :-1], adv, mask), {}, "ids must have shape"),
        "logits rank": ((x[0], ids, adv, mask), {}, r"\(B, T, V\)"),
        "logits dtype": ((x.to(torch.int32), ids, adv, mask), {}, "float32, float16"),
        "ids dtype": ((x, ids.float(), adv, mask), {}, "integer"),
        "mask shape": ((x, ids, adv, mask[:, :-1]), {}, "mask must have shape"),
        "adv shape": ((x, ids, adv[:-1], mask), {}, "advantages must have shape"),
        "old shape": ((x, ids, adv, mask, old[:-1]), {}, "old_logp must have shape"),
        "ref shape": ((x, ids, adv, mask, None, ref[:, 1:]), {"beta": 0.1}, "ref_logp must"),
        "id too large": ((x, bad_ids_hi, adv, mask), {}, r"ids must lie in \[0, V\)"),
        "negative id": ((x, bad_ids_lo, adv, mask), {}, r"ids must lie in \[0, V\)"),
        "vocab stride": ((wide, ids, adv, mask), {}, "unit stride"),
        "beta without ref": ((x, ids, adv, mask), {"beta": 0.04}, "needs ref_logp"),
        "loss type": ((x, ids, adv, mask), {"loss_type": "ppo"}, "unknown loss_type"),
        "level": ((x, ids, adv, mask), {"importance_level": "seq"}, "unknown importance"),
        "cispo delta": ((x, ids, adv, mask), {"loss_type": "cispo", "delta": 2.0}, "delta"),
        "quantile": ((x, ids, adv, mask), {"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
        "isr shape": ((x, ids, adv, mask), {"importance_sampling_ratio": adv},
                      "importance_sampling_ratio must have shape"),
        "accumulation": ((x, ids, adv, mask), {"accumulation_steps": 0}, "accumulation_steps"),
        "num_sequences": ((x, ids, adv, mask), {"num_sequences": 0}, "num_sequences"),
        "nan adv": ((x, ids, nan_adv, mask), {}, "advantages contains NaN"),
        "inf adv": ((x, ids, inf_adv, mask), {}, "advantages contains NaN or inf"),
        "temperature": ((x, ids, adv, mask), {"temperature": 0.0}, "temperature"),
        "num_items": ((x, ids, adv, mask), {"loss_type": "dapo", "num_items": 0}, "num_items"),
    }


@pytest.mark.parametrize("name", list(_bad_calls(make_inputs("cpu", 50, torch.float32, False))))
def test_bad_input_is_a_clear_error_before_launch(device, name):
    inp = make_inputs(device, 50, torch.float32, False)
    args, kwargs, match = _bad_calls(inp)[name]
    before = args[0].clone()
    with pytest.raises(ValueError, match=match):
        grpo_loss(*args, inplace=True, **kwargs)
    assert torch.equal(args[0], before)  # nothing was launched over the logits


def _compiled_count(kernel) -> int:
    try:  # triton's per-device cache: (kernel_cache, ...) in 3.x
        return len(kernel.device_caches[torch.cuda.current_device()][0])
    except (AttributeError, KeyError, IndexError, TypeError):
        pytest.skip("this triton version does not expose its kernel cache")


@pytest.mark.gpu
def test_large_grid_and_no_recompile(device):
    """B*T above 65,535 rows runs (1-D grid), and a new T, temperature, eps or beta reuses
    the compiled kernel."""
    from grpo.kernels.grpo_loss import _grpo_token_kernel

    vocab = 256
    counts = []
    for seq_len, temp, eps, beta in ((70_000, 1.0, 0.2, 0.01), (1_003, 0.7, 0.3, 0.04)):
        inp = {"ids": torch.randint(0, vocab, (1, seq_len), device=device),
               "adv": torch.ones(1, device=device),
               "mask": torch.ones(1, seq_len, device=device),
               "ref": torch.zeros(1, seq_len, device=device)}
        logits = torch.randn(1, seq_len, vocab, device=device)
        opts = dict(temperature=temp, eps_low=eps, eps_high=eps, beta=beta)
        loss, _, grad = _run(grpo_loss, logits, inp, opts, inp["ref"])
        counts.append(_compiled_count(_grpo_token_kernel))
        gold, _, gold_grad = _run(grpo_loss_ref, logits, inp, opts, inp["ref"])
        assert_close(loss, gold, "loss", rtol=1e-4)
        assert_close(grad, gold_grad, "grad", rtol=1e-3, atol=1e-8)
    assert counts[1] == counts[0], counts


def _long_and_wide(device, dtype, batch, seq_len, vocab, hidden_size):
    """grpo_loss (token level, beta 0.04, dapo, in place) and token_logprobs against the
    reference on (batch, seq_len, vocab) logits; linear_grpo_loss too when hidden_size."""
    from grpo.kernels import linear_grpo_loss, token_logprobs

    gen = torch.Generator(device=device).manual_seed(seq_len)
    logits = (torch.randn(batch, seq_len, vocab, device=device, generator=gen) * 2).to(dtype)
    ids = torch.randint(0, vocab, (batch, seq_len), device=device, generator=gen)
    mask = (torch.rand(batch, seq_len, device=device, generator=gen) > 0.1).float()
    base = token_logprobs_ref(logits, ids)
    inp = {"ids": ids, "adv": torch.randn(batch, device=device, generator=gen), "mask": mask,
           "ref": base + 0.3 * torch.randn(base.shape, device=device, generator=gen)}
    old = base + 0.3 * torch.randn(base.shape, device=device, generator=gen)
    opts = dict(beta=0.04, loss_type="dapo")
    x = logits.clone().requires_grad_()
    loss, stats = grpo_loss(x, ids, inp["adv"], mask, old, inp["ref"], inplace=True, **opts)
    loss.backward()
    gold_loss, gold_stats, gold_grad = _run(grpo_loss_ref, logits.float(), inp, opts, old)
    logp = token_logprobs(logits, ids)
    gold_logp = token_logprobs_ref(logits.float(), ids)
    if dtype == torch.float32:
        assert_close(loss, gold_loss, "loss", rtol=1e-4)
        assert_close(x.grad, gold_grad, "grad", rtol=1e-3, atol=1e-7)
        assert_close(logp, gold_logp, "logp", rtol=1e-5, atol=1e-5)
        for k in gold_stats:
            assert_close(stats[k], gold_stats[k], f"stat {k}", rtol=1e-4)
    else:
        rl, rs, rg = _run(grpo_loss_ref, logits, inp, opts, old)
        assert_within_ref_error(loss, gold_loss, rl, 1e-5, "loss")
        assert_within_ref_error(x.grad.float(), gold_grad, rg.float(), 1e-7, "grad")
        assert_within_ref_error(logp, gold_logp, token_logprobs_ref(logits, ids), 2e-5, "logp")
        for k in gold_stats:
            assert_within_ref_error(stats[k], gold_stats[k], rs[k], 1e-5, f"stat {k}")
    if not hidden_size:
        return
    hidden = torch.randn(batch, seq_len, hidden_size, device=device, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=gen)
              / hidden_size**0.5 * 3).to(dtype)

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        out, _ = fn(h, w, ids, inp["adv"], mask, old, inp["ref"], **opts)
        out.backward()
        return out.detach(), h.grad.float(), w.grad.float()

    def materialised(h, w, *args, **kw):
        return grpo_loss_ref(h @ w.t(), *args, **kw)

    ours = run(linear_grpo_loss, hidden, weight)
    gold = run(materialised, hidden.float(), weight.float())
    ref = run(materialised, hidden, weight)  # the reference's own error at this dtype
    for o, g, r, name in zip(ours, gold, ref, ("linear loss", "d hidden", "d weight"),
                             strict=True):
        if dtype == torch.float32:
            assert_close(o, g, name, rtol=1e-4, atol=1e-7)
        else:
            assert_within_ref_error(o, g, r, 1e-6, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, seq_len, vocab, hidden_size",
                         [(1, 131_072, 256, 0), (2, 48, 151_936, 64)])
def test_gpu_long_rows_and_qwen_vocab(dtype, batch, seq_len, vocab, hidden_size):
    """On CUDA at the sizes that matter: T = 131,072 rows in one call (no grid limit) and
    Qwen's V = 151,936, bf16 and fp32."""
    _long_and_wide("cuda", dtype, batch, seq_len, vocab, hidden_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_long_and_wide_small(device, dtype):
    """The same checks at sizes the interpreter gets through (and that keep them honest)."""
    _long_and_wide(device, dtype, 2, 40, 700, 24)


def test_cases_cover_every_option():
    cases = _cases()
    for key in ("delta", "temperature", "entropy_coef", "dtype", "vocab", "inplace", "strided",
                "on_policy", "use_bias_correction_kl", "accumulation_steps", "sampler",
                "top_entropy_quantile", "off_policy_mask_threshold"):
        assert len({str(c[key]) for c in cases}) == 2, key
    pairs = {(c["dtype"], c["inplace"], c["importance_level"]) for c in cases}
    assert len(pairs) == 8
    assert len(list(itertools.product(LOSS_TYPES, (0.0, 0.04)))) == len(
        {(c["loss_type"], c["beta"]) for c in cases})


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("cispo", "token"),
                                             ("grpo", "sequence")])
def test_per_token_advantages(loss_type, level, device):
    """(B, T) advantages, e.g. scaled by a truncated importance weight of the sampler: the
    kernel against the reference, and a row-constant (B, T) equal to the (B,) form."""
    inp = make_inputs(device, 1000, torch.float32, False)
    gen = torch.Generator().manual_seed(3)
    weight = (0.5 + 1.5 * torch.rand(B, T, generator=gen)).to(device)  # positive, varied
    per_token = dict(inp, adv=inp["adv"][:, None] * weight)
    opts = dict(loss_type=loss_type, importance_level=level, beta=0.04)
    loss, stats, grad = _run(grpo_loss, inp["logits"], per_token, opts, inp["old"])
    gold, gold_stats, gold_grad = _run(grpo_loss_ref, inp["logits"], per_token, opts, inp["old"])
    assert_close(loss, gold, "loss")
    assert_close(grad, gold_grad, "grad", rtol=1e-4, atol=1e-6)
    for k in gold_stats:
        assert_close(stats[k], gold_stats[k], f"stat {k}")
    plain, _, plain_grad = _run(grpo_loss, inp["logits"], inp, opts, inp["old"])
    assert not torch.allclose(grad, plain_grad)  # the weights reached the gradient
    expanded = dict(inp, adv=inp["adv"][:, None].expand(B, T))
    same, _, same_grad = _run(grpo_loss, inp["logits"], expanded, opts, inp["old"])
    assert_close(same, plain, "loss")
    assert_close(same_grad, plain_grad, "grad", rtol=1e-6, atol=1e-8)


def test_router_aux_loss_joins_as_trl_adds_it(device):
    """aux_loss (an MoE router's load-balancing loss, with its own graph) adds
    router_aux_loss_coef * aux / accumulation_steps, on the kernel and reference paths."""
    inp = make_inputs(device, 1000, torch.float32, False)
    router = torch.tensor(0.7, device=device, requires_grad=True)
    for fn in (grpo_loss, grpo_loss_ref):
        x = inp["logits"].clone().requires_grad_()
        plain, _ = fn(x, inp["ids"], inp["adv"], inp["mask"], inp["old"], accumulation_steps=2)
        loss, stats = fn(x, inp["ids"], inp["adv"], inp["mask"], inp["old"], accumulation_steps=2,
                         aux_loss=router * 2.0, router_aux_loss_coef=0.01)
        loss.backward()
        assert_close(loss, plain.detach() + 0.01 * 1.4 / 2, "loss with aux")
        assert_close(router.grad, torch.tensor(0.01 * 2.0 / 2), "d loss / d aux")
        assert_close(stats["aux_loss"], torch.tensor(1.4), "aux_loss stat")
        router.grad = None
