"""RoutingReplay on every MoE family: recording during generate, replay of exactly those ids
in the training forward (also in gradient checkpointing's recompute), weights recomputed
from the router so it keeps its gradient."""

from __future__ import annotations

import pytest
import torch

from grpo.models import load_model, make_tiny
from grpo.models.layout import MOE_FAMILIES
from grpo.models.routing_replay import RoutingReplay


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {fam: make_tiny(root / fam, kind="moe", family=fam) for fam in MOE_FAMILIES}


def _rollout(model, tok, replay):
    prompts = tok(["12+7\n", "3+45\n", "9+9\n"], return_tensors="pt", padding=True,
                  padding_side="left")
    model.eval()
    torch.manual_seed(0)
    with replay.record(num_rows=3):
        out = model.generate(**prompts, do_sample=True, max_new_tokens=6, min_new_tokens=6,
                             pad_token_id=tok.pad_token_id, top_k=None)
    attention = torch.cat([prompts["attention_mask"], torch.ones_like(out[:, prompts[
        "input_ids"].shape[1]:])], 1)
    return out, attention


def _forward(model, ids, attention):
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=attention, position_ids=positions,
                 use_cache=False).logits


def _spy(model, seen):
    def hook(module, args, output):
        seen.append(args[1].clone())
    return [block.experts.register_forward_hook(hook) for block in model.modules()
            if hasattr(getattr(block, "experts", None), "gate_up_proj")]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_replays_the_recorded_ids(moe_dirs, family):
    model, tok = load_model(moe_dirs[family], dtype=torch.float32)
    replay = RoutingReplay(model)
    ids, attention = _rollout(model, tok, replay)
    routing = replay.recorded()  # (L, N, S - 1, k)
    assert routing.shape[1:3] == (3, ids.shape[1] - 1) and routing.dtype == torch.int16
    free = _forward(model, ids, attention)
    seen: list[torch.Tensor] = []
    handles = _spy(model, seen)
    replay.set(routing)
    replayed = _forward(model, ids, attention)
    for h in handles:
        h.remove()
    for layer, used in enumerate(seen):
        used = used.view(3, ids.shape[1], -1)[:, :-1]
        assert torch.equal(used, routing[layer].long()), layer
    # On the CPU in fp32 generate routes as the full forward does: same ids, same weights.
    torch.testing.assert_close(replayed, free, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_forced_routing_changes_output_and_router_learns(moe_dirs, family):
    model, tok = load_model(moe_dirs[family], dtype=torch.float32)
    replay = RoutingReplay(model)
    ids, attention = _rollout(model, tok, replay)
    routing = replay.recorded()
    num_experts = model.config.num_experts if family != "deepseek_v3" else \
        model.config.n_routed_experts
    shifted = (routing.long() + 1) % num_experts
    free = _forward(model, ids, attention)
    model.train()
    replay.set(shifted)
    forced = _forward(model, ids, attention)
    assert not torch.allclose(forced, free)
    forced.logsumexp(-1).mean().backward()
    grads = [r.weight.grad for r in replay.routers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)

    # Gradient checkpointing recomputes the forward during backward: same ids, same grads.
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    _forward(model, ids, attention).logsumexp(-1).mean().backward()
    replay.clear()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad,
                                   rtol=1e-5, atol=1e-7)


def test_dense_models_are_refused(tmp_path):
    model, _ = load_model(make_tiny(tmp_path / "dense"), dtype=torch.float32)
    with pytest.raises(ValueError, match="needs an MoE model"):
        RoutingReplay(model)
