"""TransformersEngine's cache, compile and EOS options against the default engine."""

from __future__ import annotations

import pytest
import torch

from grpo.config import GRPOConfig
from grpo.models import load_model, make_tiny
from grpo.rollout import SamplingParams, TransformersEngine

PROMPTS = ["12+34=", "7+8=", "99+1="]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("tiny") / "m", family="qwen2", hidden=64, layers=2)
    return load_model(path, dtype=torch.float32)


def _rollout(tiny, greedy: bool, **options):
    model, tokenizer = tiny
    sampling = SamplingParams(max_prompt_length=16, max_completion_length=24, temperature=0.7,
                              ignore_eos=options.pop("ignore_eos", False))
    engine = TransformersEngine(model, tokenizer, sampling, **options)
    torch.manual_seed(0)
    return engine, engine.generate(PROMPTS, 4, greedy=greedy)


@pytest.mark.parametrize("greedy", [True, False])
def test_static_cache_samples_what_the_dynamic_cache_samples(tiny, greedy):
    _, dynamic = _rollout(tiny, greedy)
    engine, static = _rollout(tiny, greedy, cache="static")
    assert engine.cache == "static" and not engine.compile
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    assert torch.equal(static.completion_mask, dynamic.completion_mask)
    torch.testing.assert_close(static.sampler_logp, dynamic.sampler_logp, rtol=1e-5, atol=1e-5)


def test_defaults_on_cpu_are_the_dynamic_cache_uncompiled(tiny):
    engine, _ = _rollout(tiny, True, cache=None, compile=None)
    assert (engine.cache, engine.compile) == ("dynamic", False)


def _teacher_forced_logp_matches(tiny, r, tol: float) -> None:
    model, _ = tiny
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    n = r.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, -(n + 1):-1].float() / 0.7, -1)
    logp = logp.gather(-1, r.completion_ids[..., None]).squeeze(-1)
    m = r.completion_mask.bool()
    torch.testing.assert_close(r.sampler_logp[m], logp[m].to(r.sampler_logp.device),
                               rtol=tol, atol=tol)


def test_sampler_logp_is_the_log_softmax_of_the_warped_scores(tiny):
    """The recorder gives log p(token) under the sampling (temperature-warped) distribution."""
    _, r = _rollout(tiny, False)
    _teacher_forced_logp_matches(tiny, r, 1e-4)


@pytest.mark.gpu
def test_compiled_static_decoding_on_gpu(tmp_path):
    """The default CUDA engine (static cache, compiled decoding, CUDA graphs) samples tokens
    whose recorded log-probs match a plain forward over the finished sequences."""
    path = make_tiny(tmp_path / "m", family="qwen2", hidden=64, layers=2)
    tiny = load_model(path, dtype=torch.float32, device="cuda")
    for _ in range(2):  # the second call replays the captured graphs
        engine, r = _rollout(tiny, False, cache=None, compile=None)
        assert (engine.cache, engine.compile) == ("static", True)
        _teacher_forced_logp_matches(tiny, r, 1e-3)


def test_ignore_eos_samples_full_length_completions(tiny):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    # Make EOS by far the likeliest token: without ignore_eos every row stops at once.
    with torch.no_grad():
        saved = model.lm_head.weight[eos].clone()
        model.lm_head.weight[eos] = 50 * model.model.embed_tokens.weight.std()
    try:
        _, stopped = _rollout(tiny, False)
        _, full = _rollout(tiny, False, ignore_eos=True)
    finally:
        with torch.no_grad():
            model.lm_head.weight[eos] = saved
    assert stopped.lengths.float().mean() < 24
    assert (full.lengths == 24).all() and not (full.completion_ids == eos).any()
    assert full.truncated.all()


def test_bad_options(tiny, tmp_path):
    model, tokenizer = tiny
    sampling = SamplingParams(max_prompt_length=8, max_completion_length=8)
    with pytest.raises(ValueError, match="static KV cache"):
        TransformersEngine(model, tokenizer, sampling, cache="dynamic", compile=True)
    with pytest.raises(ValueError, match="cache must be"):
        TransformersEngine(model, tokenizer, sampling, cache="paged")
    with pytest.raises(ValueError, match="compile_generation needs"):
        GRPOConfig.from_flat(output_dir=str(tmp_path), generation_cache="dynamic",
                   compile_generation=True).resolve()
