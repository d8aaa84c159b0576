"""Tiny random checkpoints and a character tokenizer, for tests and the demo.

Everything here is built offline: the tokenizer comes from the `tokenizers` library and the
models from `transformers` configs, so no hub access is needed. `make_tiny` writes a real
HF-layout directory (config.json, sharded safetensors + index, tokenizer files) that both
`transformers.AutoModelForCausalLM.from_pretrained` and our own `grpo.models.load_model` read, for
dense families and for each MoE router flavour we support.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

UNK, EOS, PAD = "<unk>", "<|endoftext|>", "<|pad|>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# model_type -> "dense" | "moe": the families make_tiny can build (and the loaders must handle).
TINY_FAMILIES: dict[str, str] = {
    "qwen2": "dense",
    "qwen3": "dense",
    "llama": "dense",
    "qwen2_moe": "moe",
    "qwen3_moe": "moe",
    "mixtral": "moe",
    "olmoe": "moe",
    "deepseek_v3": "moe",
}
_DEFAULT_FAMILY = {"dense": "qwen2", "moe": "qwen3_moe"}


def char_tokenizer(extra_chars: str = "") -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII char, tab and newline.

    The R1 tags are single tokens added as *normal* added tokens, so that
    `decode(..., skip_special_tokens=True)` keeps them (rewards parse them from completions),
    while EOS, PAD and UNK are special and dropped.
    """
    specials = [UNK, EOS, PAD]
    chars = [chr(i) for i in range(32, 127)] + ["\t", "\n"]
    chars += [c for c in dict.fromkeys(extra_chars) if c not in chars]
    vocab = {tok: i for i, tok in enumerate(specials + chars + list(TAGS))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    # Oniguruma's "." skips newlines and rejects (?s), hence [\s\S]: every char on its own.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join tokens with no separator, so decode(encode(s)) == s
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAGS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=4096,
        # The default clean-up would turn " ," into "," and break the round trip.
        clean_up_tokenization_spaces=False,
    )


def _family_kwargs(
    family: str, hidden: int, experts: int, top_k: int, moe_intermediate: int | None = None
) -> dict:
    """Architecture-specific config kwargs. Router settings are explicit (and differ from the
    class defaults where that is meaningful) so tests exercise config-driven router maths."""
    moe_intermediate = moe_intermediate or hidden // 2
    routed = dict(
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_intermediate
    )
    if family == "qwen2_moe":
        return dict(
            routed,
            shared_expert_intermediate_size=hidden,
            norm_topk_prob=True,
            decoder_sparse_step=1,
        )
    if family == "qwen3_moe":
        return dict(routed, norm_topk_prob=True, decoder_sparse_step=1)
    if family == "mixtral":
        return dict(num_local_experts=experts, num_experts_per_tok=top_k)
    if family == "olmoe":
        return dict(num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=False)
    if family == "deepseek_v3":
        # Grouped sigmoid routing with a correction bias, scaling and one shared expert;
        # layer 0 dense (first_k_dense_replace=1), MLA attention with a q LoRA.
        return dict(
            n_routed_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=moe_intermediate,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            first_k_dense_replace=1,
            q_lora_rank=hidden // 2,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    return {}


def make_tiny(
    path: str | os.PathLike,
    kind: str = "dense",
    family: str | None = None,
    vocab: int | None = None,
    *,
    hidden: int = 64,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
    max_shard_size: int | str = "150KB",
    dtype: torch.dtype = torch.float32,
    intermediate: int | None = None,
    moe_intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    tie_embeddings: bool = False,
) -> Path:
    """Write a tiny random `family` checkpoint with the char tokenizer to `path`; return it.

    With the defaults (fp32), the routed experts of every MoE layer (>= 196 KB) straddle shard
    files, which is the case a streaming loader must get right. The shape arguments
    (intermediate [2 * hidden], moe_intermediate [hidden // 2], heads, kv_heads, head_dim
    [hidden // heads], tie_embeddings, and a vocab larger than the tokenizer) also build
    random models with a real model's shapes, for benchmarks.
    """
    if kind not in _DEFAULT_FAMILY:
        raise ValueError(f"kind must be 'dense' or 'moe', got {kind!r}")
    family = family or _DEFAULT_FAMILY[kind]
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {TINY_FAMILIES}")
    if TINY_FAMILIES[family] != kind:
        raise ValueError(f"family {family!r} is {TINY_FAMILIES[family]}, not kind={kind!r}")
    tokenizer = char_tokenizer()
    n_tok = len(tokenizer)
    vocab = vocab if vocab is not None else -(-n_tok // 8) * 8
    if vocab < n_tok:
        raise ValueError(f"vocab={vocab} is smaller than the tokenizer ({n_tok} tokens)")

    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_embeddings,
        # The tokenizer has no BOS; like Qwen, use EOS in its place.
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(_family_kwargs(family, hidden, experts, top_k, moe_intermediate))
    if family in ("olmoe", "deepseek_v3"):  # no head_dim in their configs (MLA has its own)
        kwargs.pop("head_dim")
    if family == "deepseek_v3":  # MLA expands k/v per query head; GQA grouping would not fit
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    config = transformers.AutoConfig.for_model(family, **kwargs)

    torch.manual_seed(seed)
    # dtype here (not a later .to) so transformers keeps its fp32-strict buffers in fp32.
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if family == "deepseek_v3":
        # transformers inits the bias to zero, which would hide bugs in how it is applied.
        g = torch.Generator().manual_seed(seed + 1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=g))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    return Path(path)
