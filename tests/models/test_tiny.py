"""Tests for grpo/models/tiny.py: the char tokenizer and the tiny random checkpoints."""

import json
import re
from collections import defaultdict

import pytest
import torch
import transformers
from safetensors.torch import load_file

from grpo.models.tiny import TAGS, TINY_FAMILIES, char_tokenizer, make_tiny

TEXTS = [
    "<think>2+3=5\nok</think><answer>5</answer>",
    "  leading spaces, a comma , and a dot . then\ttab\n\nand (brackets) {x} ~`'\"\\|",
    "<think> spaced </think> <answer> 42 </answer>",
    "",
]
MOE = [f for f, kind in TINY_FAMILIES.items() if kind == "moe"]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_tags_and_specials(tok):
    for tag in TAGS:
        assert len(tok(tag)["input_ids"]) == 1, tag
    ids = tok("<think>ab</think><answer>c</answer>")["input_ids"]
    assert len(ids) == 7  # four tags + three characters
    specials = {tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert len(specials) == 3 and None not in specials
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    # Rewards read the tags from decoded completions: they must survive skip_special_tokens,
    # while EOS and padding must not.
    padded = ids + [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]
    assert tok.decode(padded, skip_special_tokens=True) == "<think>ab</think><answer>c</answer>"
    assert tok.decode(padded).endswith("<|endoftext|><|pad|><|pad|>")
    assert tok("é")["input_ids"] == [tok.unk_token_id]


def test_tokenizer_extra_chars():
    tok = char_tokenizer(extra_chars="éé→")
    assert len(tok) == len(char_tokenizer()) + 2
    text = "é → e"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.unk_token_id not in tok(text)["input_ids"]


def test_tokenizer_save_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok2) == len(tok) and tok2.get_vocab() == tok.get_vocab()
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert tok2(text)["input_ids"] == ids
        assert tok2.decode(ids) == text
    assert (tok2.eos_token_id, tok2.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    tags = "<answer>7</answer>"
    ids = tok2(tags)["input_ids"] + [tok2.eos_token_id]
    assert tok2.decode(ids, skip_special_tokens=True) == tags


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_make_tiny_reloads_with_transformers(family, tmp_path):
    kind = TINY_FAMILIES[family]
    path = make_tiny(tmp_path / family, kind, family)
    assert (path / "config.json").exists() and list(path.glob("*.safetensors"))
    config = transformers.AutoConfig.from_pretrained(path)
    assert config.model_type == family
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert config.vocab_size % 8 == 0 and config.vocab_size >= len(tok)
    assert (config.eos_token_id, config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert not config.tie_word_embeddings
    if kind == "moe":
        assert config.num_experts_per_tok == 2

    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([tok("<think>1+2=3</think><answer>3</answer>")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 0.01


def _expert_files(path):
    """layer -> set of shard files that hold that layer's routed experts."""
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    files = defaultdict(set)
    for name, file in weight_map.items():
        m = re.search(r"layers\.(\d+)\..*\bexperts\.\d+\.", name)  # not shared_expert(s)
        if m:
            files[int(m[1])].add(file)
    return files


@pytest.mark.parametrize("family", MOE)
def test_moe_experts_straddle_shards(family, tmp_path):
    path = make_tiny(tmp_path, "moe", family)
    files = _expert_files(path)
    # deepseek_v3 keeps layer 0 dense (first_k_dense_replace=1).
    assert sorted(files) == ([1] if family == "deepseek_v3" else [0, 1])
    for layer, shards in files.items():
        assert len(shards) > 1, f"layer {layer} experts all in {shards}"


def test_deepseek_router_settings(tmp_path):
    path = make_tiny(tmp_path, "moe", "deepseek_v3")
    config = transformers.AutoConfig.from_pretrained(path)
    assert (config.n_routed_experts, config.n_group, config.topk_group) == (8, 2, 1)
    assert config.routed_scaling_factor == 2.5 and config.first_k_dense_replace == 1
    tensors = {}
    for file in path.glob("*.safetensors"):
        tensors.update(load_file(file))
    bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and (bias != 0).all()


def test_defaults_seed_vocab_dtype(tmp_path):
    def weights(path):
        out = {}
        for file in path.glob("*.safetensors"):
            out.update(load_file(file))
        return out

    a = weights(make_tiny(tmp_path / "a", seed=1))
    b = weights(make_tiny(tmp_path / "b", seed=1))
    c = weights(make_tiny(tmp_path / "c", seed=2, vocab=200, dtype=torch.bfloat16))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "a").model_type == "qwen2"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    emb = "model.embed_tokens.weight"
    assert c[emb].shape[0] == 200 and c[emb].dtype == torch.bfloat16
    assert not torch.equal(a[emb].float(), c[emb][: a[emb].shape[0]].float())
    moe = transformers.AutoConfig.from_pretrained(make_tiny(tmp_path / "m", "moe"))
    assert moe.model_type == "qwen3_moe" and moe.norm_topk_prob


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="dense", family="gpt2"), "unknown family 'gpt2'"),
        (dict(kind="dense", family="mixtral"), "'mixtral' is moe, not kind='dense'"),
        (dict(kind="moe", family="qwen3"), "'qwen3' is dense, not kind='moe'"),
        (dict(kind="sparse"), "kind must be"),
        (dict(kind="dense", vocab=50), r"vocab=50 is smaller than the tokenizer \(104 tokens\)"),
    ],
)
def test_make_tiny_errors(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        make_tiny(tmp_path, **kwargs)
    assert not (tmp_path / "config.json").exists()
