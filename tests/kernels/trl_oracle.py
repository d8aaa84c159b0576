"""TRL 1.16's GRPOTrainer as an oracle for the GRPO loss: a tiny random Qwen2, two unequal
micro-batches of one accumulation window, and TRL's own `_compute_loss` run on them.

The trainer is built from a real `GRPOConfig` for every case (it takes milliseconds on a tiny
model), so each option reaches `_compute_loss` through TRL's own `__init__` (epsilon_high's
default, the entropy-bonus switch, the fused LM head with the sampling temperature, ...).
Only what the training loop would set is set by hand: `current_gradient_accumulation_steps`
(Trainer's inner loop sets it per window) and train mode.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from grpo.models.tiny import char_tokenizer

# The tiny policy: an odd vocabulary, GQA (4 query heads on 2 key/value heads), 2 layers.
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 107, 32, 2, 4, 2
ACCUM = 2  # gradient_accumulation_steps: the two micro-batches form one window
PROMPT_LEN, COMPLETION_LEN = 4, 5
MAX_COMPLETION_LENGTH = 8  # > COMPLETION_LEN, so dr_grpo's constant differs from T

# TRL GRPOConfig field -> GRPOLossConfig field, where the names differ.
TRL_TO_OURS = {
    "epsilon": "eps_low",
    "epsilon_high": "eps_high",
    "importance_sampling_level": "importance_level",
}


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """A random tiny Qwen2 (fp32) and the char tokenizer, saved in HF layout to `path`. The
    reference model TRL builds for beta > 0 is loaded from this path."""
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng():  # a fixed init without touching the global generator
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # larger logits than the 0.02-std init, so ratios and entropies vary
        model.lm_head.weight.mul_(25.0)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def load_model(path: Path) -> transformers.Qwen2ForCausalLM:
    model = transformers.Qwen2ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.train()


def build_trainer(model, out_dir: Path, **grpo_options):
    """A GRPOTrainer on `model` (patched in place with TRL's fused LM head) whose GRPOConfig
    takes `grpo_options` (loss_type, beta, epsilon, ...). With beta > 0 TRL loads a reference
    model from model.config's path (from load_model); `_compute_loss` does not use it (the
    reference log-probs are an input)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    options = dict(max_completion_length=MAX_COMPLETION_LENGTH)
    options.update(grpo_options)
    args = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        per_device_train_batch_size=2,
        num_generations=2,
        gradient_accumulation_steps=ACCUM,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        **options,
    )
    dataset = Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+3=", "4+4="]})

    def reward(completions, **kwargs):
        return [0.0] * len(completions)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=char_tokenizer(),
        )
    # What Trainer's training loop sets for each accumulation window of ACCUM micro-batches.
    trainer.current_gradient_accumulation_steps = ACCUM
    trainer.model.train()
    assert trainer.model is model
    assert trainer.args.steps_per_generation == ACCUM
    assert trainer.accelerator.num_processes == 1
    return trainer


@dataclass
class MicroBatch:
    prompt_ids: torch.Tensor  # (B, P), left padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (B, T), right padded
    completion_mask: torch.Tensor
    advantages: torch.Tensor  # (B,)
    old_logp: torch.Tensor | None  # (B, T) or None (on-policy)
    ref_logp: torch.Tensor | None
    sampler_logp: torch.Tensor | None
    is_ratio: torch.Tensor | None = None  # TRL's importance_sampling_ratio (the vLLM correction)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def current_logp(model, mb: MicroBatch, temperature: float) -> torch.Tensor:
    """The policy's log-probs of the completion tokens (at `temperature`), without grad."""
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        logits = logits[:, PROMPT_LEN - 1 : -1].float() / temperature
        return logits.log_softmax(-1).gather(-1, mb.completion_ids.unsqueeze(-1)).squeeze(-1)


def make_micro_batches(
    model,
    temperature: float,
    *,
    on_policy: bool,
    with_ref: bool,
    with_sampler: bool,
    with_is_ratio: bool = False,
    seed: int = 0,
) -> list[MicroBatch]:
    """Two unequal micro-batches (4 and 2 sequences) of one window: prompts with left padding,
    completions with a ragged mask (one row fully masked), advantages of both signs and one
    zero; old log-probs = the current ones + noise (and a shift per sequence) large enough that
    clipping happens; ref and sampler log-probs further off; the sampler importance ratio with
    TRL's 1 on masked tokens."""
    gen = torch.Generator().manual_seed(seed)
    prompt_masks = (
        torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]),
        torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]]),
    )
    completion_masks = (
        torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]]),
        torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    )
    advantages = (torch.tensor([0.9, -1.3, 0.4, 0.0]), torch.tensor([-0.7, 1.1]))
    # Old log-probs are shifted per sequence too, so that sequence-level ratios cross both clip
    # bounds: about exp(0.5) on sequence 0 (A > 0: clipped high; A < 0: not clipped) and
    # exp(-0.5) on sequence 1 (A < 0: clipped low; A > 0: not clipped).
    shifts = (torch.tensor([[0.5], [-0.5], [0.0], [0.2]]), torch.tensor([[0.5], [-0.5]]))
    pad = char_tokenizer().pad_token_id
    out = []
    for pm, cm, adv, shift in zip(prompt_masks, completion_masks, advantages, shifts, strict=True):
        b = pm.shape[0]
        prompt_ids = torch.randint(3, VOCAB, (b, PROMPT_LEN), generator=gen)
        prompt_ids = prompt_ids.masked_fill(pm == 0, pad)
        completion_ids = torch.randint(3, VOCAB, (b, COMPLETION_LEN), generator=gen)
        completion_ids = completion_ids.masked_fill(cm == 0, pad)
        mb = MicroBatch(prompt_ids, pm, completion_ids, cm, adv, None, None, None)
        logp = current_logp(model, mb, temperature)
        noise = lambda scale: scale * torch.randn(logp.shape, generator=gen)  # noqa: B023
        if not on_policy:
            mb.old_logp = logp + noise(0.3) - shift
        if with_ref:
            mb.ref_logp = logp + noise(0.5)
        if with_sampler:
            mb.sampler_logp = logp + noise(0.6)
        if with_is_ratio:  # as TRL makes it (token_truncate): exp((old - sampler) * mask) <= cap
            mb.is_ratio = torch.exp(noise(0.3) * cm).clamp(max=1.5)
        out.append(mb)
    return out


def num_items(batches: list[MicroBatch]) -> torch.Tensor:
    """TRL's num_items_in_batch: the completion tokens of the whole generation batch."""
    return sum(mb.completion_mask.sum() for mb in batches).float()


def trl_inputs(mb: MicroBatch, n_items: torch.Tensor) -> dict:
    inputs = dict(
        prompt_ids=mb.prompt_ids,
        prompt_mask=mb.prompt_mask,
        completion_ids=mb.completion_ids,
        completion_mask=mb.completion_mask,
        advantages=mb.advantages,
        num_items_in_batch=n_items,
    )
    if mb.old_logp is not None:
        inputs["old_per_token_logps"] = mb.old_logp
    if mb.ref_logp is not None:
        inputs["ref_per_token_logps"] = mb.ref_logp
    if mb.sampler_logp is not None:
        inputs["sampling_per_token_logps"] = mb.sampler_logp
    if mb.is_ratio is not None:
        inputs["importance_sampling_ratio"] = mb.is_ratio
    return inputs


def grads_of(model) -> dict[str, torch.Tensor]:
    return {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }


def trl_step(trainer, batches: list[MicroBatch]) -> tuple[torch.Tensor, dict, dict]:
    """TRL's `_compute_loss` and backward on each micro-batch of the window: the summed loss,
    the summed parameter gradients and the metrics as `log()` averages them (NaN left out)."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    n_items = num_items(batches)
    total = torch.zeros(())
    for mb in batches:
        loss = trainer._compute_loss(model, trl_inputs(mb, n_items))
        loss.backward()
        total = total + loss.detach()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    metrics = {}
    for key, values in trainer._metrics["train"].items():
        valid = [v for v in values if not math.isnan(v)]
        metrics[key] = sum(valid) / len(valid) if valid else None
    trainer._metrics["train"].clear()
    return total, grads, metrics
