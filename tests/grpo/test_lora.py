"""LoRA policies (grpo.lora, `--lora-rank`) on tiny models on the CPU: only the adapters learn,
the reference is the base with the adapters off, exports load in transformers and peft,
adapter-only checkpoints resume exactly, MoE with routing replay (and the stacked experts
through peft's target_parameters), the rollout engines sample the current policy, and bad
flags are clear errors. The two-process (FSDP2) run is in test_distributed.py."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from peft import PeftModel
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from grpo import lora as lora_mod
from grpo.build import build_trainer
from grpo.checkpoint import load_checkpoint
from grpo.cli.train import main as train_main
from grpo.config import GRPOConfig, build_parser
from grpo.metrics import read_metrics
from grpo.models import load_model, make_tiny
from tests.grpo.test_rollout_engines import _FakeLLM, _SamplingParams

FAST = dict(steps=2, sft_steps=2, sft_batch_size=8, prompts_per_step=2, num_generations=4,
            max_completion_length=8, eval_size=4, micro_batch_size=4, progress=False,
            dynamic_sampling=False, temperature=1.0, template="none",
            rewards=["tests.grpo.dist_worker:length_reward"], learning_rate=1e-2, lora_rank=4)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("lora") / "dense", family="qwen2", hidden=32,
                     layers=2)


def _config(tmp_path, model, name="run", **overrides) -> GRPOConfig:
    values = {**FAST, "model": str(model), "output_dir": str(tmp_path / name), **overrides}
    return GRPOConfig.from_flat(values)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def _base(model) -> dict[str, torch.Tensor]:
    return {lora_mod._strip(n): p.detach().clone() for n, p in model.named_parameters()
            if ".lora_" not in n}


def test_only_adapters_learn_reference_is_base_and_exports_load(tmp_path, dense):
    cfg = _config(tmp_path, dense, beta=0.04, num_iterations=2)
    trainer = build_trainer(cfg)
    model = trainer.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    summary = trainer.train()
    run = tmp_path / "run"
    assert trainer.ref_model is None  # the reference is the policy with its adapters off
    info = summary["lora"]
    assert info["trainable_parameters"] == sum(p.numel() for p in model.parameters()
                                               if p.requires_grad)
    assert info["trainable_parameters"] < info["total_parameters"] / 4
    assert info["reference_bytes_saved"] == 4 * (info["total_parameters"]
                                                 - info["trainable_parameters"])
    assert 0 < info["optimizer_state_bytes"] <= 8 * info["trainable_parameters"] + 1024
    assert all("kl" in line for line in read_metrics(run / "metrics.jsonl"))

    # The base is the cold-started model, bit for bit, after the GRPO steps; the adapters moved.
    cold, _ = load_model(run / "cold-start", dtype=torch.float32)
    cold_state = cold.state_dict()
    for name, value in _base(model).items():
        assert torch.equal(value, cold_state[name]), name
    assert any(v.abs().max() > 0 for n, v in _adapters(model).items() if ".lora_B." in n)

    # final/: merged (transformers reads it) and final/adapter/ (peft reads it onto the base).
    ids = torch.randint(0, 90, (2, 9))
    want = _logits(model.eval(), ids)
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    torch.testing.assert_close(_logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    adapter = run / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str((run / "cold-start").resolve())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        run / "cold-start"), adapter)
    torch.testing.assert_close(_logits(peft_model, ids), want, rtol=1e-5, atol=1e-5)
    ours, _ = lora_mod.load_adapter_model(adapter, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(_logits(ours, ids), want, rtol=1e-5, atol=1e-5)
    # The merged weights are peft's merge_and_unload of the same adapter.
    peft_merged = peft_model.merge_and_unload().state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, peft_merged[name], rtol=0, atol=1e-6, msg=name)

    # Reference log-probs (adapters off) equal those of the separately loaded base model, and
    # the adapters are back on after it.
    rollout = trainer.engine.generate([trainer.prompt(e) for e in trainer.eval_examples[:2]], 2)
    ref = trainer._reference_logprobs(rollout)
    torch.testing.assert_close(ref, trainer.forward.logprobs(cold, rollout), rtol=0, atol=1e-6)
    policy = trainer.policy_logprobs(model, rollout)
    assert (policy - ref).abs().max() > 1e-3
    # The transformers engine sampled with the adapters on: its log-probs are the trainer's.
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampler_logp[mask], policy[mask], rtol=0, atol=2e-5)

    # One more GRPO step changes the adapters and leaves every base weight bit-identical.
    base, adapters = _base(model), _adapters(model)
    trainer.step()
    for name, value in _base(model).items():
        assert torch.equal(value, base[name]), name
    assert any(not torch.equal(v, adapters[n]) for n, v in _adapters(model).items())


def test_fused_loss_checkpointing_and_packing_give_the_same_adapter_gradients(tmp_path, dense):
    grads = []
    variants = [{}, {"fused_loss": True}, {"gradient_checkpointing": True}, {"packing": True}]
    for i, variant in enumerate(variants):
        trainer = build_trainer(_config(tmp_path, dense, f"r{i}", sft_steps=0,
                                        **{"fused_loss": False, **variant}))
        for n, p in trainer.model.named_parameters():
            if ".lora_B." in n:  # nonzero B, so that A gets a gradient too
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(0)
        batch = trainer.sample_batch()
        batch.advantages = torch.randn(len(batch.rollout),
                                       generator=torch.Generator().manual_seed(3))
        old = trainer.policy_logprobs(trainer.model, batch.rollout)
        trainer.accumulate_gradients(batch, batch.rollout.completion_mask.float(), old - 0.1,
                                     None)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == {n for n in grads[0] if ".lora_" in n}  # no base gradients
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)


def _comparable(line: dict) -> dict:
    return {k: v for k, v in line.items() if not k.startswith(("seconds", "tokens_per_s"))}


def test_adapter_only_checkpoint_resumes_exactly(tmp_path, dense):
    opts = dict(steps=4, save_every=2, beta=0.04)
    build_trainer(_config(tmp_path / "a", dense, **opts)).train()
    build_trainer(_config(tmp_path / "b", dense, **{**opts, "steps": 2})).train()
    checkpoint = tmp_path / "b" / "run" / "checkpoint"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model").exists()
    # dcp/ holds the adapters and their two Adam moments, nothing of the frozen base.
    saved = FileSystemReader(str(checkpoint / "dcp")).read_metadata().state_dict_metadata
    tensors = {k: v.size.numel() for k, v in saved.items() if hasattr(v, "size")}
    weights = {k for k in tensors if k.startswith("model.")}
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    adapter_numel = sum(tensors[k] for k in weights)
    moments = sum(n for k, n in tensors.items() if k.endswith(("exp_avg", "exp_avg_sq")))
    assert moments == 2 * adapter_numel
    build_trainer(_config(tmp_path / "b", dense, **opts, resume=True,
                          resume_override=["steps"])).train()
    whole = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], resumed[2:], strict=True):
        assert _comparable(a) == pytest.approx(_comparable(b), nan_ok=True)
    wa = load_model(tmp_path / "a" / "run" / "final", dtype=torch.float32)[0].state_dict()
    wb = load_model(tmp_path / "b" / "run" / "final", dtype=torch.float32)[0].state_dict()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_resume_of_the_other_kind_and_bad_flags_are_clear_errors(tmp_path, dense, capsys):
    full = _config(tmp_path, dense, "full", lora_rank=0, steps=1, sft_steps=0)
    full_trainer = build_trainer(full)
    full_trainer.train()
    with pytest.raises(ValueError, match="a full fine-tuning checkpoint, without LoRA adapters"):
        build_trainer(_config(tmp_path, dense, "full", steps=2, sft_steps=0, resume=True,
                              resume_override=["steps", "lora_rank"]))
    lora = _config(tmp_path, dense, "lora", steps=1, sft_steps=0)
    build_trainer(lora).train()
    with pytest.raises(ValueError, match=r"a LoRA checkpoint .*\(--lora-rank 4 --lora-alpha 8 "):
        build_trainer(_config(tmp_path, dense, "lora", lora_rank=0, steps=2, sft_steps=0,
                              resume=True, resume_override=["steps", "lora_rank"]))
    with pytest.raises(ValueError, match=r"differ from this run's .*rank 8"):
        build_trainer(_config(tmp_path, dense, "lora", lora_rank=8, steps=2, sft_steps=0,
                              resume=True, resume_override=["steps", "lora_rank"]))
    # The checkpoint's own check, for callers of load_checkpoint.
    with pytest.raises(ValueError, match="a LoRA checkpoint"):
        load_checkpoint(tmp_path / "lora" / "checkpoint", full_trainer.model,
                        full_trainer.optimizer, None, device="cpu")

    common = ["--model", str(dense), "--output-dir", str(tmp_path / "bad"), "--no-progress"]
    cases = [
        (["--lora-alpha", "16"], "--lora-alpha given without --lora-rank"),
        (["--lora-target-modules", "q_proj"], "LoRA needs a rank >= 1"),
        (["--lora-rank", "-1"], "lora_rank must be an integer >= 0"),
        (["--lora-rank", "4", "--lora-alpha", "0"], "lora_alpha must be finite and > 0"),
        (["--lora-rank", "4", "--lora-dropout", "1"], "lora_dropout must lie in [0, 1)"),
        (["--lora-rank", "4", "--ref-on-cpu"], "--ref-on-cpu does not apply with --lora-rank"),
        (["--lora-rank", "4", "--lora-target-modules", "qkv_proj"],
         "'qkv_proj' matches no module of this qwen2 model; its linear projections: down_proj"),
        (["--lora-rank", "4", "--lora-target-modules", "lm_head"],
         "the lm_head and the embeddings stay frozen"),
        (["--lora-rank", "4", "--lora-target-modules", "mlp"], "not a linear projection"),
        (["--lora-rank", "4", "--lora-target-parameters", "experts"],
         "matches no stacked expert parameter of this qwen2 model"),
        (["--lora-rank", "4", "--lora-target-parameters", "experts", "--lora-dropout", "0.1"],
         "needs --lora-dropout 0"),
    ]
    for args, message in cases:
        assert train_main([*common, *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "bad").exists()  # nothing was left behind


def test_help_documents_lora_and_its_learning_rate():
    text = build_parser().format_help()
    for flag in ("--lora-rank", "--lora-alpha", "--lora-dropout", "--lora-target-modules",
                 "--lora-target-parameters"):
        assert flag in text
    assert "10x the full fine-tuning rate" in " ".join(text.split())


@pytest.fixture
def vllm_stand_in(monkeypatch):
    """test_rollout_engines' stand-in `vllm` module (vLLM 0.33's API on a plain model)."""
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = _FakeLLM, _SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    _FakeLLM.instances.clear()


def test_vllm_engine_samples_the_merged_policy(tmp_path, dense, vllm_stand_in):
    """The vLLM engine gets base + adapters merged after each step, under the model's own
    names, and samples exactly the policy: importance ratios of 1."""
    cfg = _config(tmp_path, dense, rollout="vllm", vllm_sleep=True)
    trainer = build_trainer(cfg)
    trainer.train()
    llm = _FakeLLM.instances[-1]
    assert llm.loads == cfg.optim.steps + 1  # before the first rollout and after each step
    state = llm.net.state_dict()
    merged = dict(lora_mod.merged_weights(trainer.model))
    assert merged.keys() == {n for n, _ in llm.net.named_parameters()}
    for name, value in merged.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6, msg=name)
    moved = max(float((value - load_model(tmp_path / "run" / "cold-start")[0].state_dict()[
        name]).abs().max()) for name, value in merged.items())
    assert moved > 1e-4  # the adapters changed the weights vLLM holds
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    # Qwen2-MoE: attention, a shared expert (dense MLP) and 8 stacked routed experts per layer.
    return make_tiny(tmp_path_factory.mktemp("lora") / "moe", kind="moe", family="qwen2_moe",
                     hidden=32)


def test_moe_with_routing_replay(tmp_path, moe):
    """Default targets: attention and the shared expert; the stacked experts, the routers and
    the shared-expert gate stay frozen. Routing replay lines the training forwards up with
    the sampler, the reference (adapters off) never replays, and the base stays put."""
    trainer = build_trainer(_config(tmp_path, moe, sft_steps=0, beta=0.04, num_iterations=2))
    model = trainer.model
    assert trainer.replay is not None and len(trainer.replay.routers) == 2
    config = lora_mod.lora_config(model)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"}
    adapted = {n.split(".lora_")[0] for n in _adapters(model)}
    assert any(".shared_expert.gate_proj" in n for n in adapted)
    assert not any(".experts" in n or "gate." in n or n.endswith("_gate") for n in adapted)
    base = _base(model)
    for _ in range(2):
        metrics = trainer.step()
    assert metrics["routing_mismatch"] == 0.0 and metrics["logp_gap_replay"] < 1e-4
    assert metrics["kl"] > 0  # the adapters moved the policy away from the reference
    for name, value in _base(model).items():
        assert torch.equal(value, base[name]), name


def test_moe_stacked_experts_through_target_parameters(tmp_path, moe):
    """--lora-target-parameters experts: peft's ParamWrapper on the stacked (E, 2I, H) and
    (E, H, I) parameters, with routing replay; the merged final/ and final/adapter/ (peft)
    give the policy's logits."""
    trainer = build_trainer(_config(tmp_path, moe, sft_steps=0, steps=2,
                                    lora_target_parameters=["experts"]))
    model = trainer.model
    assert len(trainer.replay.routers) == 2  # found through the adapter wrappers
    experts = [n for n in _adapters(model) if ".experts." in n]
    assert len(experts) == 2 * 2 * 2  # 2 layers x (gate_up, down) x (A, B)
    base, adapters = _base(model), _adapters(model)
    trainer.train()
    assert all(torch.equal(v, base[n]) for n, v in _base(model).items())
    assert all(not torch.equal(v, adapters[n]) for n, v in _adapters(model).items()
               if ".experts." in n and ".lora_B." in n)
    ids = torch.randint(0, 90, (2, 9))
    want = _logits(model.eval(), ids)
    merged, _ = load_model(tmp_path / "run" / "final", dtype=torch.float32)
    torch.testing.assert_close(_logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe),
                                           tmp_path / "run" / "final" / "adapter")
    torch.testing.assert_close(_logits(peft_model, ids), want, rtol=1e-5, atol=1e-5)


def test_expert_adapters_run_through_the_triton_experts_kernel(moe):
    """The stacked experts' adapters on moe_backend="triton" (grpo.kernels.moe_experts; in the
    interpreter on a CPU) give the eager experts' logits and adapter gradients."""
    settings = lora_mod.LoRASettings.create(4, target_parameters=["experts"])
    results = []
    for backend in ("eager", "triton"):
        model, _ = load_model(moe, dtype=torch.float32, moe_backend=backend)
        lora_mod.apply_lora(model, settings, base=moe, seed=0)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
        ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(0))
        logits = model(ids).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if ".experts." in n and
                 p.grad is not None}
        results.append((logits.detach(), grads))
    (eager, eager_grads), (triton, triton_grads) = results
    torch.testing.assert_close(triton, eager, rtol=1e-4, atol=1e-5)
    assert len(eager_grads) == 8 and eager_grads.keys() == triton_grads.keys()
    for n in eager_grads:
        torch.testing.assert_close(triton_grads[n], eager_grads[n], rtol=1e-3, atol=1e-6, msg=n)


def test_grpo_sft_with_lora_and_eval_and_sample_accept_the_adapter(tmp_path, dense, capsys):
    from grpo.cli.eval import main as eval_main
    from grpo.cli.sample import main as sample_main
    from grpo.cli.sft import main as sft_main

    out = tmp_path / "sft"
    args = ["--model", str(dense), "--steps", "3", "--batch-size", "4", "--lr", "1e-2",
            "--output-dir", str(out)]
    assert sft_main([*args, "--lora-alpha", "8"]) == 2
    assert "--lora-alpha given without --lora-rank" in capsys.readouterr().err
    assert sft_main([*args, "--lora-rank", "4"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(dense.resolve())
    ids = torch.randint(0, 90, (2, 9))
    merged = _logits(load_model(out, dtype=torch.float32)[0], ids)
    adapted, _ = lora_mod.load_adapter_model(out / "adapter", dtype=torch.float32, device="cpu")
    torch.testing.assert_close(_logits(adapted, ids), merged, rtol=1e-5, atol=1e-5)
    assert (merged - _logits(load_model(dense, dtype=torch.float32)[0], ids)).abs().max() > 1e-4
    reports = []
    for model in (out, out / "adapter"):
        report = tmp_path / f"{model.name}.json"
        assert eval_main(["--model", str(model), "--num-prompts", "3", "--samples", "2",
                          "--greedy", "--max-completion-length", "6", "--no-progress",
                          "--output", str(report)]) == 0
        metrics = json.loads(report.read_text())["metrics"]
        reports.append({k: v for k, v in metrics.items() if k != "seconds"})
    assert reports[0] == reports[1]
    assert sample_main(["--model", str(out / "adapter"), "--num-prompts", "2", "--samples", "2",
                        "--keep", "all", "--max-completion-length", "6", "--no-progress",
                        "--output", str(tmp_path / "pairs.jsonl")]) == 0
    assert (tmp_path / "pairs.jsonl").read_text().count("completion") == 4
