"""load_model / save_model against transformers' own from_pretrained, for every family:
same logits and gradients, bit-exact round trips, and a clear error for every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from grpo import models
from grpo.models import CheckpointError, load_model, make_tiny, save_model
from grpo.models.layout import MOE_FAMILIES, SUPPORTED_FAMILIES


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny(root / fam, kind="moe" if fam in MOE_FAMILIES else "dense",
                           family=fam) for fam in SUPPORTED_FAMILIES}


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _shard_of(path: Path, key_part: str) -> tuple[Path, str]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in index if key_part in k)
    return path / index[key], key


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_matches_transformers_from_pretrained(tiny_dirs, family):
    path = tiny_dirs[family]
    ours, tok = load_model(path, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert ours.training and tok is not None
    theirs.train()
    if family in MOE_FAMILIES:  # experts of one layer lie in more than one shard file
        index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        layer = [f for k, f in index.items() if ".layers.1." in k and ".experts." in k]
        assert len(set(layer)) > 1
    ids = _ids(ours.config.vocab_size)
    out_ours, out_theirs = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    (out_ours.float().logsumexp(-1).mean()).backward()
    (out_theirs.float().logsumexp(-1).mean()).backward()
    params_theirs = dict(theirs.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if any(k in name for k in ("embed_tokens", "experts.gate_up_proj", "mlp.gate.weight",
                                   "layers.1.self_attn.o_proj")):
            torch.testing.assert_close(p.grad, params_theirs[name].grad, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_round_trip_is_bit_exact_and_readable_by_transformers(tiny_dirs, family, tmp_path):
    model, tok = load_model(tiny_dirs[family], dtype=torch.bfloat16)
    out = save_model(model, tok, tmp_path / "saved", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    if family in MOE_FAMILIES:  # one tensor per expert, as HF checkpoints store them
        assert not any(k.endswith("gate_up_proj") for k in index)
        assert any(".experts.3." in k for k in index)
    again, _ = load_model(out, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    theirs = AutoModelForCausalLM.from_pretrained(out)
    assert theirs.dtype == torch.bfloat16
    for name, p in theirs.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name]), name


def test_bf16_load_keeps_fp32_buffers_and_recomputes_rotary(tiny_dirs):
    model, _ = load_model(tiny_dirs["deepseek_v3"], dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_dirs["deepseek_v3"], dtype=torch.bfloat16)
    buffers = dict(theirs.named_buffers())
    for name, buf in model.named_buffers():
        assert buf.dtype == buffers[name].dtype, name
        torch.testing.assert_close(buf, buffers[name], rtol=0, atol=0)
    bias = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert bias and all(b.dtype == torch.float32 and b.abs().sum() > 0 for b in bias)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_tokenizer_keeps_its_own_pipeline(tiny_dirs, tmp_path):
    """The character tokenizer survives load -> save -> load: spaces stay tokens (transformers'
    AutoTokenizer would swap in the family's byte-level pipeline and drop them)."""
    text = "<think>12-5=7, so 7</think> <answer>7</answer>"
    model, tok = load_model(tiny_dirs["qwen2"], dtype=torch.float32)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) - sum(len(t) - 1 for t in ("<think>", "</think>", "<answer>",
                                                               "</answer>"))
    assert tok.decode(ids) == text
    save_model(model, tok, tmp_path / "saved")
    _, again = load_model(tmp_path / "saved", dtype=torch.float32)
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_tied_embeddings_stay_one_tensor(tmp_path):
    src = make_tiny(tmp_path / "src", family="qwen2")
    config = json.loads((src / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied")
    shutil.copy(src / "tokenizer.json", tmp_path / "tied")
    shutil.copy(src / "tokenizer_config.json", tmp_path / "tied")
    ours, _ = load_model(tmp_path / "tied", dtype=torch.float32)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    ids = _ids(config["vocab_size"])
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)


def test_stacked_checkpoints_are_accepted(tiny_dirs, tmp_path):
    model, tok = load_model(tiny_dirs["qwen3_moe"], dtype=torch.float32)
    stacked = tmp_path / "stacked"
    shutil.copytree(tiny_dirs["qwen3_moe"], stacked)
    for f in stacked.glob("model*.safetensors*"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(stacked / "model.safetensors"))
    again, _ = load_model(stacked, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["eager", "grouped_mm", "triton"])
def test_moe_backends_agree_and_train_with_checkpointing(tiny_dirs, backend):
    model, _ = load_model(tiny_dirs["qwen2_moe"], dtype=torch.float32, moe_backend=backend)
    assert model.config._experts_implementation == backend
    ref, _ = load_model(tiny_dirs["qwen2_moe"], dtype=torch.float32, moe_backend="eager")
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    (enable or model.gradient_checkpointing_enable)()
    model(ids).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n)


def _rewrite(file: Path, edit) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_error_missing_config(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(path)


def test_error_unsupported_model_type(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'; supported: qwen2"):
        load_model(path)


def test_error_missing_tensor(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen3_moe"], tmp_path)
    file, key = _shard_of(path, "layers.1.mlp.experts.2.up_proj")
    _rewrite(file, lambda t: t.pop(key))
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"][key]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing .*layers\.1\.mlp\.experts\.gate_up_proj"
                                              r"\[expert 2\]\.up"):
        load_model(path)


def test_error_unexpected_tensor(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    file, _ = _shard_of(path, "layers.0.")
    _rewrite(file, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = file.name
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{file.name}: unexpected tensor model\.layers\.0"
                                              r"\.mlp\.extra\.weight"):
        load_model(path)


def test_error_shape_mismatch(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    file, key = _shard_of(path, "layers.1.mlp.down_proj")
    _rewrite(file, lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"tensor {key} has shape .* expected"):
        load_model(path)


def test_error_integer_tensor(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    file, key = _shard_of(path, "layers.0.input_layernorm")
    _rewrite(file, lambda t: t.update({key: t[key].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"{key} has dtype torch.int32, expected floating"):
        load_model(path)


def test_error_truncated_and_corrupt_files(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    file, _ = _shard_of(path, "layers.0.")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 64])
    with pytest.raises(CheckpointError, match=rf"{file.name}: truncated or corrupt"):
        load_model(path)
    file.write_bytes(b"\xff" * 16 + data[16:])
    with pytest.raises(CheckpointError, match=rf"{file.name}: truncated or corrupt"):
        load_model(path)


def test_error_index_names_missing_shard(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    file, _ = _shard_of(path, "layers.1.")
    file.unlink()
    with pytest.raises(CheckpointError, match=rf"names shard {file.name}, which does not exist"):
        load_model(path)


def test_error_tensor_in_a_shard_but_not_in_the_index(tiny_dirs, tmp_path):
    """A shard holding a tensor the index places elsewhere (or nowhere): which copy is right
    cannot be told, so neither is loaded."""
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    file0, key0 = _shard_of(path, "embed_tokens")
    file1, _ = _shard_of(path, "lm_head")
    assert file0 != file1
    copy = load_file(file0)[key0]
    _rewrite(file1, lambda t: t.update({key0: torch.zeros_like(copy)}))
    with pytest.raises(CheckpointError, match=rf"{file1.name} holds {key0}, which the index"):
        load_model(path)


def test_error_tensor_in_two_shards_without_an_index(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    file0, key0 = _shard_of(path, "embed_tokens")
    file1, _ = _shard_of(path, "lm_head")
    (path / "model.safetensors.index.json").unlink()
    _rewrite(file1, lambda t: t.update({key0: load_file(file0)[key0] * 0}))
    with pytest.raises(CheckpointError, match=rf"{key0} is in two shards, {file0.name} and "
                                              rf"{file1.name}"):
        load_model(path)


def test_error_index_lists_a_tensor_twice(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    index_file = path / "model.safetensors.index.json"
    text = index_file.read_text()
    first = text.index('"model.')
    line_end = text.index("\n", first)
    index_file.write_text(text[:line_end] + "\n" + text[first:line_end] + text[line_end:])
    with pytest.raises(CheckpointError, match="not a safetensors index .* listed twice"):
        load_model(path)


def test_error_config_json_not_json(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    (path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json: not a JSON file"):
        load_model(path)


def test_error_bad_options_and_missing_tokenizer(tiny_dirs, tmp_path):
    with pytest.raises(CheckpointError, match="dtype must be a floating"):
        load_model(tiny_dirs["qwen2"], dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown moe_backend"):
        load_model(tiny_dirs["qwen3_moe"], moe_backend="cuda")
    with pytest.raises(ValueError, match="unknown attn"):
        load_model(tiny_dirs["qwen2"], attn="flash")
    path = _copy(tiny_dirs["qwen2"], tmp_path)
    for f in path.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_model(path)


def test_save_never_leaves_a_half_written_checkpoint(tiny_dirs, tmp_path, monkeypatch):
    model, tok = load_model(tiny_dirs["qwen2"], dtype=torch.float32)
    target = save_model(model, tok, tmp_path / "ckpt", max_shard_size="40KB")
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(models.saving, "save_file", failing_save_file)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tok, target, max_shard_size="40KB")
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left


def test_experts_stack_in_place(tiny_dirs):
    """Every expert piece lands in its slice of the stacked tensor: compare with the
    per-expert tensors of the file."""
    path = tiny_dirs["mixtral"]
    model, _ = load_model(path, dtype=torch.float32)
    file, key = _shard_of(path, "layers.1.block_sparse_moe.experts.3.w3")
    with safe_open(str(file), "pt") as f:
        up = f.get_tensor(key)
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(gate_up[3, gate_up.shape[1] // 2:], up)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_gpu_forward_backward(tiny_dirs, family):
    model, _ = load_model(tiny_dirs[family], dtype=torch.bfloat16, device="cuda")
    ids = _ids(model.config.vocab_size).cuda()
    loss = model(ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
