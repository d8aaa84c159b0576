"""Rollout engines behind one interface: Rollouts from token lists, the sampler correction
(importance weights pi_old / pi_sampler), the trainer with the correction on, and the vLLM
engine driven through a stand-in `vllm` module that speaks vLLM 0.33's API (the real package
needs a GPU)."""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from grpo.build import build_trainer
from grpo.config import GRPOConfig
from grpo.kernels.reference import sampler_importance_weights
from grpo.metrics import read_metrics
from grpo.models import char_tokenizer, load_model, make_tiny
from grpo.rollout import (
    Rollout,
    SamplingParams,
    engine_options,
    make_engine,
    rollout_from_tokens,
    tokenize_prompts,
)

FAST = dict(steps=2, sft_steps=0, prompts_per_step=2, num_generations=4,
            max_completion_length=12, eval_size=4, micro_batch_size=4, progress=False,
            dynamic_sampling=False, temperature=1.0)


def test_rollout_from_tokens_masks_by_length_even_when_pad_is_eos():
    tok = char_tokenizer()
    tok.pad_token = tok.eos_token  # the hard case: the mask cannot come from pad ids
    ids, mask = tokenize_prompts(tok, ["1+1=", "22+3="], 16, "error", torch.device("cpu"))
    eos = tok.eos_token_id
    a, b = tok("2", add_special_tokens=False)["input_ids"], tok("25", add_special_tokens=False)[
        "input_ids"]
    r = rollout_from_tokens(tok, ids, mask, [a + [eos], b], [[-0.1, -0.2], [-0.3, float("nan")]],
                            max_completion_length=4)
    assert r.completion_mask.tolist() == [[1, 1], [1, 1]]
    assert r.truncated.tolist() == [False, True]
    assert r.texts == ["2", "25"]
    assert math.isnan(r.sampler_logp[1, 1]) and r.sampler_logp[0, 1] == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="exceeds max_completion_length"):
        rollout_from_tokens(tok, ids, mask, [a * 5, b], max_completion_length=4)


def _tokens(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_rollout_select_and_cat_keep_rows_and_padding():
    tok = char_tokenizer()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    cpu = torch.device("cpu")
    ids, mask = tokenize_prompts(tok, ["1+1=", "12+3="], 16, "error", cpu)
    wide = rollout_from_tokens(tok, ids, mask, [_tokens(tok, "2") + [eos], _tokens(tok, "153")],
                               max_completion_length=4)
    ids, mask = tokenize_prompts(tok, ["7="], 16, "error", cpu)
    narrow = rollout_from_tokens(tok, ids, mask, [[eos]], max_completion_length=4)
    # Row indices, a bool mask and a slice pick the same rows, every field alike.
    for rows in ([1], torch.tensor([False, True]), slice(1, 2)):
        r = wide.select(rows)
        assert r.texts == ["153"] and r.truncated.tolist() == [True]
        assert torch.equal(r.prompt_ids, wide.prompt_ids[1:]) and r.lengths.tolist() == [3]
    both = Rollout.cat([narrow, wide.select([1, 0])], pad)
    assert both.texts == ["", "153", "2"] and both.lengths.tolist() == [1, 3, 2]
    # Prompts re-padded on the left, completions on the right.
    assert both.prompt_ids.shape == (3, 5) and both.prompt_mask[0].tolist() == [0, 0, 0, 1, 1]
    assert both.prompt_ids[0, :3].tolist() == [pad] * 3
    assert both.completion_ids[0].tolist() == [eos, pad, pad]
    assert both.completion_mask[0].tolist() == [1, 0, 0]
    assert Rollout.cat([wide], pad) is wide


def test_make_engine_takes_only_the_chosen_engines_options():
    model = tok = None  # options are checked before an engine is built
    sampling = SamplingParams(max_prompt_length=8, max_completion_length=4)
    assert engine_options("transformers") == ("replay", "cache", "compile")
    assert "gpu_memory_utilization" in engine_options("vllm")
    with pytest.raises(TypeError, match="transformers rollout engine does not take sleep"):
        make_engine("transformers", model, tok, sampling, sleep=True)
    with pytest.raises(ValueError, match="rollout must be one of"):
        make_engine("sglang", model, tok, sampling)


def test_sampler_importance_weights_by_hand():
    trainer = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -0.5, 0.0]])
    sampler = torch.tensor([[-1.0, -1.0, float("nan")], [0.0, -0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    e = math.e
    w, stats = sampler_importance_weights(trainer, sampler, mask, mode="token_truncate", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 1.0], [e ** -0.5, 1.0, 0.0]]))
    assert stats["is_capped"] == pytest.approx(1 / 5)
    assert stats["is_ratio_mean"] == pytest.approx((e + 1 + 1 + e ** -0.5 + 1) / 5)
    w, _ = sampler_importance_weights(trainer, sampler, mask, mode="token_mask", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 1.0], [e ** -0.5, 1.0, 0.0]]))
    # Sequence modes: the product of the ratios of the sequence's real tokens.
    w, _ = sampler_importance_weights(trainer, sampler, mask, mode="sequence_truncate", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 2.0], [e ** -0.5, e ** -0.5, 0.0]]))
    w, _ = sampler_importance_weights(trainer, sampler, mask, mode="sequence_mask", cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[e, e, e], [e ** -0.5, e ** -0.5, 0.0]]))
    with pytest.raises(ValueError, match="mode"):
        sampler_importance_weights(trainer, sampler, mask, mode="none")


def test_correction_scales_the_policy_gradient(tmp_path):
    """Constant importance weights c scale the gradient of the surrogate by c (beta = 0)."""
    trainer = build_trainer(GRPOConfig.from_flat(FAST, output_dir=str(tmp_path / "run")))
    batch = trainer.sample_batch()
    batch.advantages = torch.randn(len(batch.rollout), generator=torch.Generator().manual_seed(0))
    mask = batch.rollout.completion_mask.float()
    grads = []
    for weights in (None, torch.full_like(mask, 0.5)):
        trainer.accumulate_gradients(batch, mask, None, None, weights)
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
        trainer.optimizer.zero_grad(set_to_none=True)
    for plain, half in zip(*grads, strict=True):
        torch.testing.assert_close(half, 0.5 * plain, rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_trainer_with_the_correction_on_the_transformers_engine(tmp_path):
    """The transformers engine samples from the policy itself: its recorded log-probs equal
    the trainer's, so every importance ratio is 1 and none is capped."""
    cfg = GRPOConfig.from_flat(FAST, output_dir=str(tmp_path / "run"),
                               sampler_correction="token_truncate")
    build_trainer(cfg).train()
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert last["is_capped"] == 0.0


# --- vLLM, through a stand-in module -------------------------------------------------------

@dataclass
class _Logprob:
    logprob: float
    rank: int | None = 1
    decoded_token: str | None = None


@dataclass
class _CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None


@dataclass
class _RequestOutput:
    outputs: list


class _SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _FakeLLM:
    """Samples with the tiny model it loaded (plain PyTorch), reporting processed log-probs;
    load_weights copies into that model, as vLLM's model does."""

    instances: list[_FakeLLM] = []

    def __init__(self, model, **kwargs):
        self.kwargs = kwargs
        self.net, _ = load_model(model, dtype=torch.float32)
        self.loads, self.resets, self.sleeps, self.wakes = 0, 0, 0, 0
        runner = types.SimpleNamespace(model=types.SimpleNamespace(
            load_weights=self._load_weights))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))
        _FakeLLM.instances.append(self)

    def _load_weights(self, weights):
        state = self.net.state_dict()
        for name, tensor in weights:
            state[name].copy_(tensor)
        self.loads += 1

    def reset_prefix_cache(self):
        self.resets += 1

    def sleep(self, level=1):
        self.sleeps += 1

    def wake_up(self):
        self.wakes += 1

    @torch.no_grad()
    def generate(self, requests, params, use_tqdm=True):
        gen = torch.Generator().manual_seed(0)
        outs = []
        for req in requests:
            completions = []
            for j in range(params.n):
                ids = list(req["prompt_token_ids"])
                tokens, logps, reason = [], [], "length"
                for _ in range(params.max_tokens):
                    logits = self.net(torch.tensor([ids])).logits[0, -1].float()
                    if params.temperature == 0:
                        lp = torch.log_softmax(logits, -1)
                        tok = int(lp.argmax())
                    else:
                        lp = torch.log_softmax(logits / params.temperature, -1)
                        tok = int(torch.multinomial(lp.exp(), 1, generator=gen))
                    tokens.append(tok)
                    logps.append({tok: _Logprob(float(lp[tok]))})
                    ids.append(tok)
                    if tok in params.stop_token_ids:
                        reason = "stop"
                        break
                completions.append(_CompletionOutput(j, "", tokens, None, logps, reason))
            outs.append(_RequestOutput(completions))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = _FakeLLM, _SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    _FakeLLM.instances.clear()
    return module


def test_vllm_engine_in_the_trainer(tmp_path, fake_vllm):
    model = make_tiny(tmp_path / "model", family="qwen2", hidden=64, layers=2)
    cfg = GRPOConfig.from_flat(FAST, model=str(model), output_dir=str(tmp_path / "run"),
                     rollout="vllm", vllm_sleep=True, template="none")
    trainer = build_trainer(cfg)
    assert cfg.rollout.sampler_correction == "token_truncate"  # the default with vllm
    trainer.train()
    llm = _FakeLLM.instances[-1]
    assert llm.kwargs["skip_tokenizer_init"] and llm.kwargs["logprobs_mode"] == \
        "processed_logprobs"
    assert llm.kwargs["max_model_len"] == \
        cfg.data.max_prompt_length + cfg.sampling.max_completion_length
    # Weights pushed before the first rollout and after each of the 2 optimizer steps, once
    # each; the prefix cache dropped each time; the KV cache released around every update.
    assert llm.loads == llm.resets == 3
    assert llm.sleeps >= 2 and llm.wakes >= 2
    for name, p in trainer.model.state_dict().items():
        torch.testing.assert_close(llm.net.state_dict()[name], p, msg=name)
    # The engine sampled with the policy's weights: the trainer's log-probs agree with the
    # sampler's, so the importance ratios are 1.
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)


def test_vllm_engine_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    cfg = GRPOConfig.from_flat(FAST, output_dir=str(tmp_path / "run"), rollout="vllm")
    with pytest.raises(ValueError, match="needs the vllm package"):
        build_trainer(cfg)
    moe = make_tiny(tmp_path / "moe", kind="moe")
    cfg = GRPOConfig.from_flat(FAST, model=str(moe), output_dir=str(tmp_path / "run2"),
                               rollout="vllm", routing_replay=True)
    with pytest.raises(ValueError, match="routing-replay needs --rollout transformers"):
        build_trainer(cfg)


def test_eval_and_sample_with_the_vllm_engine(tmp_path, fake_vllm, capsys):
    """grpo-eval and grpo-sample on --rollout vllm: one engine for all their sampling, no
    weight push (vLLM loaded the same checkpoint), the same report as with transformers."""
    from grpo.cli.eval import main as eval_main
    from grpo.cli.sample import main as sample_main

    model = make_tiny(tmp_path / "m", hidden=32, layers=1)
    out = tmp_path / "report.json"
    rc = eval_main(["--model", str(model), "--num-prompts", "3", "--samples", "2", "--greedy",
                    "--max-completion-length", "6", "--no-progress", "--output", str(out),
                    "--rollout", "vllm"])
    assert rc == 0 and "cons@2" in capsys.readouterr().out
    assert len(_FakeLLM.instances) == 1 and _FakeLLM.instances[0].loads == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["prompts"] == 3 and 1 <= metrics["completion_length"] <= 6
    rc = sample_main(["--model", str(model), "--num-prompts", "3", "--samples", "2",
                      "--keep", "all", "--max-completion-length", "6", "--no-progress",
                      "--output", str(tmp_path / "pairs.jsonl"), "--rollout", "vllm"])
    assert rc == 0 and len(_FakeLLM.instances) == 2
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert rows and all("completion" in row for row in rows)
