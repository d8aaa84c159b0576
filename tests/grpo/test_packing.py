"""Padding-free GRPO (grpo/packing.py): a packed step's loss and gradients equal the padded
step's (dense and MoE with routing replay, beta > 0, mu = 2, masked truncated completions,
the sampler correction), token-budget micro-batches equal one batch, the lm_head sees exactly
the completion tokens, and the recorded experts follow their tokens into the packed row."""

from __future__ import annotations

import math

import pytest
import torch

from grpo import packing
from grpo.build import build_trainer
from grpo.config import GRPOConfig, parse_config
from grpo.models import load_model, make_tiny

BASE = dict(
    steps=1,
    sft_steps=0,
    prompts_per_step=2,
    num_generations=4,
    max_completion_length=12,
    eval_size=8,
    progress=False,
    rewards=["accuracy", "format"],
    dynamic_sampling=False,
    temperature=1.0,
    beta=0.04,
    num_iterations=2,
    mask_truncated_completions=True,
    sampler_correction="token_truncate",
    learning_rate=1e-2,
    overwrite=True,
    kernel_backend="reference",
)  # the PyTorch ops (the Triton interpreter is slow)
LENGTHS = [12, 12, 3, 7, 1, 12, 5, 9]  # completion lengths: long tail, two truncated


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: make_tiny(root / kind, kind=kind) for kind in ("dense", "moe")}


def _trainer(tmp_path, model, name, **overrides):
    values = {**BASE, "model": str(model), "output_dir": str(tmp_path / name), **overrides}
    return build_trainer(GRPOConfig.from_flat(values))


def _fixed_batch(trainer, model_path, moe: bool):
    """A sampled batch with ragged completions (some truncated), random advantages and, for
    MoE, recorded experts that a free forward would not choose (so replay must place them)."""
    batch = trainer.sample_batch()
    r = batch.rollout
    gen = torch.Generator().manual_seed(0)
    for i, n in enumerate(LENGTHS):
        r.completion_mask[i, n:] = 0
        r.completion_ids[i, n:] = trainer.tokenizer.pad_token_id
        r.sampler_logp[i, n:] = 0.0
        r.truncated[i] = n == 12 and i < 2
    batch.advantages = torch.randn(len(r), generator=gen)
    if moe:
        layers, n, s, k = r.routing.shape
        experts = trainer.replay.routers[0].weight.shape[0]
        random = torch.rand(layers, n, s, experts, generator=gen).argsort(-1)[..., :k]
        r.routing = random.to(r.routing.dtype)
    ref = load_model(model_path, dtype=torch.float32)[0]
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return batch, ref


def _run_step(trainer, batch, ref):
    """One GRPO step (mu = 2 optimizer steps) on `batch`: its metrics and the gradients of
    each optimizer step."""
    trainer.ref_model = ref
    trainer.sample_batch = lambda: batch
    grads, apply = [], trainer._optimizer_step

    def record(loss):
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
        return apply(loss)

    trainer._optimizer_step = record
    return trainer.step(), grads


def _assert_same_step(a, b):
    (metrics_a, grads_a), (metrics_b, grads_b) = a, b
    assert len(grads_a) == len(grads_b) == 2
    for key in ("loss", "grad_norm", "kl", "entropy", "clip_ratio/region_mean"):
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-5, abs=1e-7), key
    for step_a, step_b in zip(grads_a, grads_b, strict=True):
        for x, y in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kind,fused", [("dense", False), ("dense", True), ("moe", False)])
def test_packed_step_equals_padded(tmp_path, models, kind, fused):
    """Padded one batch (8 rows), packed in micro-batches of 3 rows, and packed under a token
    budget of 14 (several bins, a sequence over the budget alone): the same step."""
    opts = dict(fused_loss=fused)
    padded = _trainer(tmp_path, models[kind], "padded", packing=False, micro_batch_size=8, **opts)
    batch, ref = _fixed_batch(padded, models[kind], kind == "moe")
    rollout = batch.rollout
    assert 0 < float(rollout.completion_mask.sum()) < rollout.completion_mask.numel()
    runs = {"padded": _run_step(padded, batch, ref)}
    assert math.isfinite(runs["padded"][0]["loss"]) and runs["padded"][0]["kl"] > 0
    cases = {"rows": dict(micro_batch_size=3), "budget": dict(micro_batch_tokens=14)}
    if kind == "moe" or fused:
        del cases["rows"]  # the budget only (time)
    for name, extra in cases.items():
        trainer = _trainer(tmp_path, models[kind], name, packing=True, **extra, **opts)
        assert trainer.forward.packing
        if name == "budget":
            bins = trainer.forward.micro_batches(len(rollout), rollout)
            fed = packing.sequence_lengths(rollout)[2]
            assert len(bins) >= 3
            assert any(len(rows) == 1 and fed[rows].item() > 14 for rows, _ in bins)
            assert all(fed[rows].sum() <= 14 or len(rows) == 1 for rows, _ in bins)
        _assert_same_step(runs["padded"], _run_step(trainer, batch, ref))


def test_router_aux_loss_packed_equals_padded(tmp_path, models):
    """With the router's load-balancing loss (every token fed, the last of each completion
    too), the packed step equals the padded one: the aux loss counts the same tokens. Same
    micro-batches (the loss balances each forward's tokens, so it depends on them)."""
    opts = dict(router_aux_loss_coef=0.01)
    padded = _trainer(tmp_path, models["moe"], "padded", packing=False, micro_batch_size=8, **opts)
    batch, ref = _fixed_batch(padded, models["moe"], moe=True)
    want = _run_step(padded, batch, ref)
    assert want[0]["aux_loss"] > 0
    packed = _trainer(tmp_path, models["moe"], "packed", packing=True, micro_batch_size=8, **opts)
    assert packed.forward.router_aux_loss
    got = _run_step(packed, batch, ref)
    assert got[0]["aux_loss"] == pytest.approx(want[0]["aux_loss"], rel=1e-5)
    _assert_same_step(want, got)


def test_replay_places_the_recorded_experts(tmp_path, models):
    """With recorded experts a free forward would not choose, packed log-probs equal padded
    ones only with replay, and differ without it (the check can fail)."""
    trainer = _trainer(tmp_path, models["moe"], "run", packing=False, micro_batch_size=3)
    batch, _ = _fixed_batch(trainer, models["moe"], moe=True)
    rollout, mask = batch.rollout, batch.rollout.completion_mask.bool()
    want = trainer.policy_logprobs(trainer.model, rollout)
    trainer.forward.packing = True
    got = trainer.policy_logprobs(trainer.model, rollout)
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)
    free = trainer.forward.logprobs(trainer.model, rollout, replay=False)
    assert (free[mask] - want[mask]).abs().max() > 1e-3


@pytest.mark.parametrize("fused", [False, True])
def test_lm_head_sees_only_completion_tokens(tmp_path, models, monkeypatch, fused):
    trainer = _trainer(
        tmp_path, models["dense"], "run", packing=True, micro_batch_size=3, fused_loss=fused
    )
    batch, ref = _fixed_batch(trainer, models["dense"], moe=False)
    rows_seen: list[int] = []
    if fused:  # the lm_head weight goes straight into CompactLogprobs
        apply = packing.CompactLogprobs.apply

        policy_weight = trainer.model.get_output_embeddings().weight

        def spy(inputs, weight, *args):
            assert weight is not None and inputs.shape[-1] == weight.shape[1]
            if weight.data_ptr() == policy_weight.data_ptr():  # not the reference model's
                rows_seen.append(inputs.shape[0])
            return apply(inputs, weight, *args)

        monkeypatch.setattr(packing.CompactLogprobs, "apply", spy)
    else:
        trainer.model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: rows_seen.append(args[0].shape[:-1].numel())
        )
    tokens = int(batch.rollout.completion_mask.sum())
    trainer.policy_logprobs(trainer.model, batch.rollout)  # the old-policy pass
    assert sum(rows_seen) == tokens and len(rows_seen) == 3  # 3 micro-batches of <= 3 rows
    rows_seen.clear()
    _run_step(trainer, batch, ref)  # old-policy pass + 2 training passes (ref: another model)
    assert sum(rows_seen) == 3 * tokens


def test_first_fit_decreasing():
    costs = [5, 9, 2, 14, 7, 3, 3, 1]
    bins = packing.first_fit_decreasing(costs, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(costs)))
    assert [3] in bins  # over the budget: alone
    assert all(sum(costs[i] for i in b) <= 10 for b in bins if b != [3])
    assert bins == [[3], [1, 7], [4, 5], [0, 2, 6]]  # 14 | 9+1 | 7+3 | 5+3+2 (next-fit: 6)
    with pytest.raises(ValueError, match="budget"):
        packing.first_fit_decreasing(costs, 0)


def test_pack_layout(tmp_path, models):
    trainer = _trainer(tmp_path, models["dense"], "run", packing=True)
    batch, _ = _fixed_batch(trainer, models["dense"], moe=False)
    r = batch.rollout
    rows = torch.tensor([2, 4, 0])
    packed = packing.pack(r, rows)
    p_len, c_len, fed = packing.sequence_lengths(r.select(rows))
    assert len(packed) == int(fed.sum()) and packed.pred.numel() == int(c_len.sum())
    starts = (packed.position_ids[0] == 0).nonzero()[:, 0].tolist()
    order = sorted(range(3), key=lambda i: (int(fed[i]), i))  # shortest first
    assert starts == [0, int(fed[order[0]]), int(fed[order[0]] + fed[order[1]])]
    assert packed.segments == tuple(zip(starts, [*starts[1:], len(packed)], strict=True))
    full = torch.cat([r.prompt_ids[rows], r.completion_ids[rows]], 1)
    assert torch.equal(packed.input_ids[0], full[packed.token_row, packed.token_col])
    # the hidden state at pred predicts the token at (out_row, out_col); it is fed just before
    width_p = r.prompt_ids.shape[1]
    assert torch.equal(packed.token_row[packed.pred], packed.out_row)
    assert torch.equal(packed.token_col[packed.pred], width_p + packed.out_col - 1)
    routing = torch.arange(full.shape[1] - 1)[None, None, :, None].expand(1, 3, -1, 2)
    placed = packed.routing(routing)[0, 0, :, 0]
    assert torch.equal(placed, packed.token_col)
    kept = packing.pack(r, rows, keep_last=True)  # the last token of a full completion: -1
    last = kept.token_col == full.shape[1] - 1
    assert last.any() and (kept.routing(routing)[0, 0, last] == -1).all()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_segment_attention_equals_the_block_diagonal_mask(tmp_path, models, kind):
    """sdpa per sequence (packing.use_segment_attention; grouped-query heads, sequences of
    equal and of different lengths) gives the outputs and gradients of transformers' dense
    block-diagonal mask, and leaves every other forward (padded, with a mask) as sdpa's."""
    trainer = _trainer(tmp_path, models[kind], "run", packing=True, micro_batch_size=8)
    batch, _ = _fixed_batch(trainer, models[kind], moe=False)
    packed = packing.pack(batch.rollout, slice(0, 8))
    lengths = [end - start for start, end in packed.segments]
    assert len(set(lengths)) < len(lengths) < len(packed)  # repeated lengths, several
    model = load_model(models[kind], dtype=torch.float32)[0]
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg._attn_implementation == "sdpa"
    inputs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    padded = dict(input_ids=batch.rollout.prompt_ids, attention_mask=batch.rollout.prompt_mask)

    def run(**extra):
        model.zero_grad()
        out = model(**inputs, **extra).logits
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want, want_grads = run()  # sdpa with the (L, L) block-diagonal mask
    with torch.no_grad():
        want_padded = model(**padded).logits
    assert packing.use_segment_attention(model)
    assert model.config._attn_implementation == packing.SEGMENT_ATTENTION
    got, got_grads = run(
        attention_mask=torch.ones_like(packed.input_ids), packed_segments=packed.segments
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads, strict=True):  # fp32 sums in another order
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits, want_padded)
    wrong, _ = run(attention_mask=torch.ones_like(packed.input_ids))  # no segments: one
    assert (wrong - want).abs().max() > 1e-3  # causal sequence over all: the check can fail


def test_segments_that_do_not_tile_the_row_are_an_error():
    module = torch.nn.Module()
    q = torch.randn(1, 4, 6, 8)
    kv = torch.randn(1, 2, 6, 8)
    for segments in (((0, 2), (3, 6)), ((0, 2), (2, 5)), ((1, 6),)):
        with pytest.raises(ValueError, match="tile"):
            packing._segment_sdpa(module, q, kv, kv, None, packed_segments=segments)
    out, _ = packing._segment_sdpa(module, q, kv, kv, None, packed_segments=((0, 2), (2, 6)))
    assert out.shape == (1, 6, 4, 8)


def test_packing_is_on_by_default_where_attention_stays_within_sequences(tmp_path, models):
    from types import SimpleNamespace

    from grpo.build import _packing

    assert _trainer(tmp_path, models["dense"], "sdpa").forward.packing  # the CPU's default
    cfg = GRPOConfig.from_flat({"output_dir": str(tmp_path / "r")})
    for attention, on in (
        ("sdpa", True),
        ("flash_attention_2", True),
        ("eager", False),
        ("flex_attention", False),
        (packing.SEGMENT_ATTENTION, True),
    ):
        model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attention))
        assert _packing(cfg, model) is on, attention
    cfg.optim.packing = False
    assert not _packing(cfg, SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa")))


def test_flags(tmp_path):
    out = ["--output-dir", str(tmp_path / "r")]
    cfg = parse_config([*out, "--no-packing"])
    assert cfg.optim.packing is False and cfg.optim.micro_batch_tokens == 0
    cfg = parse_config([*out, "--packing", "--micro-batch-tokens", "4096"])
    assert cfg.optim.packing is True and cfg.optim.micro_batch_tokens == 4096
    with pytest.raises(ValueError, match="micro_batch_tokens needs packing"):
        parse_config([*out, "--no-packing", "--micro-batch-tokens", "4096"])
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 0"):
        parse_config([*out, "--micro-batch-tokens", "-1"])


def test_two_processes_packed_match_one_padded(tmp_path):
    """torchrun (FSDP2, gloo): two processes packing under a token budget (their bin counts
    may differ: zero-weight repeats even them out) equal one padded process."""
    from .test_distributed import COMMON, _assert_same_run, _run

    model = make_tiny(tmp_path / "model", family="qwen2", hidden=64, layers=2)
    flags = [*COMMON, "--loss-type", "dapo", "--scale-rewards", "batch"]
    one = _run(1, tmp_path / "one", model, *flags, "--no-packing")
    two = _run(2, tmp_path / "two", model, *flags, "--packing", "--micro-batch-tokens", "40")
    assert two["world"] == 2
    _assert_same_run(one, two, tmp_path / "one", tmp_path / "two", model)
