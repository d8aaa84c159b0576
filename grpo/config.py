"""GRPOConfig: every knob of a run, in one small dataclass per component, documented with its
real default; settable from flat command-line flags and YAML/JSON keys.

    model     which checkpoint, dtype and device, kernels, the reference model's placement
    data      task or dataset, prompt template, reward functions, held-out split
    sampling  prompts and completions per step, generation length and temperature, DAPO's
              dynamic sampling, masks and reward shaping of the samples
    rollout   the generation engine and the sampler correction
    loss      grpo.kernels.GRPOLossConfig: the GRPO objective (TRL 1.16's names and defaults)
    optim     steps, learning rate and its schedule, micro-batches, GRPO's mu iterations
    moe       routing replay and the router
    cold_start  supervised warm-up before GRPO
    run       seed, output directory, checkpoints, evaluation cadence, logging

Flags and file keys are flat (`--beta`, `beta: 0.04`): each field has one flat name (its own
name, except `model.path` <- `model` and `rollout.engine` <- `rollout`), and `FLAT` maps it
to its place. Precedence: defaults < the DEMO preset (with no --model: the built-in tiny
model) < the --config file < command-line flags. The few defaults that depend on the device
are None and documented as such (decided where the device is known).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo.kernels import GRPOLossConfig
from grpo.kernels.reference import IMPORTANCE_LEVELS, LOSS_TYPES, SAMPLER_CORRECTIONS, SCALES

from .lora import LR_HELP, check_settings


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    path: str = _f(
        "", "local HF model directory; empty: the built-in tiny Qwen2 demo model", flag="model"
    )
    dtype: str = _f(
        "auto",
        "bf16 or fp32 (fp16 is refused: AdamW overflows it); auto: bf16 on GPU, fp32 on CPU",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    device: str = _f("auto", "cuda, cpu; auto: cuda when available")
    kernel_backend: str = _f(
        "auto",
        "auto (Triton on GPU), triton, reference (PyTorch)",
        choices=("auto", "triton", "reference"),
    )
    fused_loss: bool = _f(
        None,
        "GRPO loss and log-probs straight from the last hidden states "
        "(lm_head fused in, no (B, T, V) logits); None: on on GPU",
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward")
    ref_on_cpu: bool = _f(False, "keep the reference model on the CPU between uses")

    def check(self) -> list[str]:
        """What is wrong with these settings, one message each (empty: nothing)."""
        checks = [
            (
                re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
                f"device {self.device!r}: expected auto, cpu, cuda or cuda:N",
            ),
            # Adam's second moments overflow fp16 (every weight NaN after a step): fp16 needs
            # fp32 master weights, which this trainer keeps only under FSDP.
            (
                self.dtype != "fp16",
                "--dtype fp16 is not supported for training: AdamW on "
                "fp16 parameters overflows; use bf16 (GPUs) or fp32",
            ),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class DataConfig:
    task: str = _f("arithmetic", "built-in task: arithmetic, countdown, sort, reverse")
    task_args: dict = _f({}, 'task options as JSON, e.g. \'{"digits": 3, "operators": "+-"}\'')
    data: str = _f("", "JSONL dataset with prompt and answer columns (replaces --task)")
    template: str = _f("r1zero", "prompt template: r1zero, short, chat (tokenizer's), none")
    rewards: list = _f(
        [],
        "reward functions: accuracy, format, language, countdown, overlong, code, "
        "or package.module:function; empty: the task's",
    )
    reward_weights: list = _f([], "one weight per reward function (default all 1)")
    reward_errors: str = _f(
        "raise", "a reward function that raises: raise (stop) or zero", choices=("raise", "zero")
    )
    max_prompt_length: int = _f(512, "longer prompts are left-truncated (or see --prompt-overflow)")
    prompt_overflow: str = _f(
        "truncate",
        "prompts over max_prompt_length: truncate or error",
        choices=("truncate", "error"),
    )
    eval_size: int | None = _f(
        None,
        "held-out prompts, never trained on (None: 200, or a fifth of a --data file of "
        "fewer than 1000 examples)",
    )
    # The code reward (grpo.rewards.code): programs run against the example's tests.
    code_score: str = _f(
        "all",
        "code reward: all (1 when every test passes, else 0, as R1) or pass_rate (the "
        "fraction of tests passed)",
        choices=("all", "pass_rate"),
    )
    code_timeout: float = _f(
        5.0, "code reward: wall-clock seconds per test (CPU seconds: this rounded up, plus 1)"
    )
    code_memory_mb: int = _f(
        1024,
        "code reward: memory of all the processes of a sample together (a cgroup, where one "
        "can be had) and address space of each, MB",
    )
    code_sandbox: str = _f(
        "bwrap",
        "code reward: where programs run: bwrap (bubblewrap: apt-get install bubblewrap) or "
        "none (no isolation: the programs can reach your files, network and processes)",
        choices=("bwrap", "none"),
    )

    def check(self) -> list[str]:
        """What is wrong with these settings, one message each (empty: nothing)."""
        checks = [
            (self.max_prompt_length >= 1, "max_prompt_length must be >= 1"),
            (
                math.isfinite(self.code_timeout) and self.code_timeout > 0,
                f"code_timeout must be a positive number of seconds, got {self.code_timeout}",
            ),
            (
                self.code_memory_mb >= 64,
                f"code_memory_mb must be >= 64 (the interpreter's own need), got "
                f"{self.code_memory_mb}",
            ),
            (self.eval_size is None or self.eval_size >= 1, "eval_size must be >= 1"),
            (
                not self.reward_weights
                or not self.rewards
                or len(self.reward_weights) == len(self.rewards),
                f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} "
                f"reward functions",
            ),
            (
                all(math.isfinite(w) for w in self.reward_weights),
                f"reward_weights must be finite, got {self.reward_weights}",
            ),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class SamplingConfig:
    prompts_per_step: int = _f(16, "prompts per optimizer step")
    num_generations: int = _f(8, "G: completions per prompt (>= 2)")
    max_completion_length: int = _f(256, "max new tokens per completion")
    temperature: float = _f(1.0, "sampling temperature (also used in the loss)")
    top_p: float = _f(1.0, "nucleus sampling")
    ignore_eos: bool = _f(
        False,
        "never sample EOS: every completion is max_completion_length tokens long (benchmarks)",
    )
    dynamic_sampling: bool = _f(
        False, "DAPO: drop groups whose rewards are all equal and draw more prompts"
    )
    max_sampling_rounds: int = _f(4, "with dynamic sampling: rounds of extra prompts per step")
    scale_rewards: str = _f("group", "advantage scaling: group, batch, none", choices=SCALES)
    mask_truncated_completions: bool = _f(False, "exclude completions without EOS from the loss")
    overlong_buffer: int = _f(0, "DAPO soft overlong punishment zone in tokens (0: off)")

    def check(self) -> list[str]:
        """What is wrong with these settings, one message each (empty: nothing)."""
        checks = [
            (
                self.num_generations >= 2,
                f"num_generations (G) must be >= 2, got "
                f"{self.num_generations}: GRPO compares answers within a group",
            ),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (
                self.max_completion_length >= 1,
                f"max_completion_length must be >= 1, got {self.max_completion_length}",
            ),
            (self.temperature > 0, "temperature must be > 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (
                0 <= self.overlong_buffer < self.max_completion_length,
                f"overlong_buffer must lie in [0, max_completion_length="
                f"{self.max_completion_length}), got {self.overlong_buffer}",
            ),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class RolloutConfig:
    engine: str = _f(
        "transformers",
        "rollout engine: transformers (generate) or vllm "
        "(colocated, needs the vllm package and a GPU)",
        flag="rollout",
        choices=("transformers", "vllm"),
    )
    generation_cache: str = _f(
        None,
        "rollout KV cache: dynamic, or static (preallocated; lets "
        "the decoding forward be compiled); None: static on GPU, "
        "dynamic on CPU",
        choices=("dynamic", "static"),
    )
    compile_generation: bool = _f(
        None,
        "torch.compile the decoding forward (CUDA graphs on a "
        "GPU; needs the static cache); None: on on GPU with SDPA "
        "attention unless routing replay records",
    )
    sampler_correction: str = _f(
        None,
        "importance weights pi_old / pi_sampler on the policy "
        "term for the sampler/trainer mismatch: none, "
        "token_truncate (TIS), token_mask, sequence_truncate, "
        "sequence_mask; None: token_truncate with vllm, else none",
        choices=SAMPLER_CORRECTIONS,
    )
    sampler_correction_cap: float = _f(2.0, "cap of those importance weights")
    vllm_gpu_memory_utilization: float = _f(
        0.3, "vllm: share of GPU memory for weights and KV cache (the trainer needs the rest)"
    )
    vllm_sleep: bool = _f(False, "vllm: release its KV cache while the trainer updates")

    def check(self) -> list[str]:
        """What is wrong with these settings, one message each (empty: nothing)."""
        checks = [
            (
                not (self.compile_generation and self.generation_cache == "dynamic"),
                "compile_generation needs generation_cache=static",
            ),
            (self.sampler_correction_cap > 0, "sampler_correction_cap must be > 0"),
            (
                0 < self.vllm_gpu_memory_utilization < 1,
                "vllm_gpu_memory_utilization must be in (0, 1)",
            ),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class OptimConfig:
    steps: int = _f(200, "GRPO optimizer steps")
    learning_rate: float = _f(1e-6, LR_HELP)
    lr_schedule: str = _f(
        "constant",
        "constant, linear or cosine decay after warmup",
        choices=("constant", "linear", "cosine"),
    )
    warmup_steps: int = _f(0, "linear warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    micro_batch_size: int = _f(
        8, "completions per forward/backward; gradient accumulation covers the rest"
    )
    packing: bool = _f(
        None,
        "padding-free training forwards: a micro-batch's sequences in one row, the lm_head on "
        "completion tokens only (same loss and gradients); None: on with flash-attention, sdpa "
        "(attention per sequence) or --micro-batch-tokens, off with eager attention (see "
        "docs/packing.md)",
    )
    micro_batch_tokens: int = _f(
        0, "with packing: micro-batches of at most this many tokens (0: micro_batch_size rows)"
    )
    num_iterations: int = _f(1, "mu: optimizer steps on each batch (GRPO's inner iterations)")
    max_nonfinite_steps: int = _f(
        3,
        "a step whose loss or gradient norm is not finite is skipped; this many in a row stop "
        "the run (before any checkpoint is written)",
    )

    def check(self) -> list[str]:
        """What is wrong with these settings, one message each (empty: nothing)."""
        finite = all(
            math.isfinite(v) for v in (self.learning_rate, self.max_grad_norm, self.weight_decay)
        )
        checks = [
            (self.num_iterations >= 1, "num_iterations must be >= 1"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.micro_batch_tokens >= 0, "micro_batch_tokens must be >= 0"),
            (
                self.micro_batch_tokens == 0 or self.packing is not False,
                "micro_batch_tokens needs packing (drop --no-packing)",
            ),
            (self.steps >= 0, "steps must be >= 0"),
            (
                finite and self.learning_rate > 0,
                f"learning_rate must be finite and > 0, got {self.learning_rate}",
            ),
            (
                self.max_grad_norm >= 0,
                f"max_grad_norm must be >= 0 (0: off), got {self.max_grad_norm}",
            ),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.max_nonfinite_steps >= 1, "max_nonfinite_steps must be >= 1"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class MoEConfig:
    routing_replay: bool = _f(
        None,
        "MoE: record the experts each token used while sampling and "
        "replay them in the training forwards; None: on for MoE "
        "models",
    )
    freeze_router: bool = _f(False, "MoE: keep the router weights fixed")

    def check(self) -> list[str]:
        """Nothing here can be wrong on its own: a non-MoE model ignores both."""
        return []


@dataclass
class ColdStartConfig:
    sft_steps: int = _f(0, "supervised cold-start steps before GRPO")
    sft_data: str = _f(
        "",
        "JSONL with prompt and completion for the cold start (default: the "
        "task's worked solutions)",
    )
    sft_learning_rate: float = _f(1e-5, "cold-start learning rate")
    sft_batch_size: int = _f(32, "cold-start examples per step")
    sft_examples: int = _f(
        0,
        "distinct worked examples of the task the cold start learns from, in shuffled epochs "
        "(0: sft_steps x sft_batch_size, each seen once)",
    )

    def check(self) -> list[str]:
        """What is wrong with these settings, one message each (empty: nothing)."""
        checks = [
            (self.sft_steps >= 0, "sft_steps must be >= 0"),
            (self.sft_examples >= 0, "sft_examples must be >= 0"),
            (
                self.sft_learning_rate > 0 and self.sft_batch_size >= 1,
                "sft_learning_rate must be > 0 and sft_batch_size >= 1",
            ),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class LoRAConfig:
    lora_rank: int = _f(
        0,
        "train LoRA adapters of this rank r (peft) instead of the model; the reference model "
        "is then the policy with its adapters off (no second copy of the weights); 0: train "
        "the full model",
    )
    lora_alpha: float = _f(None, "LoRA alpha: the update is alpha / r x B A; None: 2 x rank")
    lora_dropout: float = _f(0.0, "dropout on the adapters' input")
    lora_target_modules: list = _f(
        [],
        "linear projections to adapt, by name (peft's target_modules, e.g. q_proj v_proj; "
        "all-linear); empty: every linear projection of attention and the dense MLP (MoE: and "
        "the shared experts); the lm_head and the embeddings stay frozen",
    )
    lora_target_parameters: list = _f(
        [],
        "MoE: stacked expert parameters to adapt too (peft's target_parameters, e.g. "
        "mlp.experts.gate_up_proj mlp.experts.down_proj, or experts for both); empty: the "
        "routed experts stay frozen",
    )

    def check(self) -> list[str]:
        """What is wrong with these settings, one message each (empty: nothing)."""
        return check_settings(
            self.lora_rank,
            self.lora_alpha,
            self.lora_dropout,
            self.lora_target_modules,
            self.lora_target_parameters,
        )


@dataclass
class RunConfig:
    seed: int = _f(0, "seed of data, sampling and initialisation")
    eval_every: int = _f(0, "evaluate every N steps (0: only before and after GRPO)")
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end)")
    output_dir: str = _f("", "run directory; empty: runs/<run_name>")
    run_name: str = _f("", "run name; empty: <task>-<model>-seed<seed>")
    resume: bool = _f(False, "continue the run in --output-dir from its checkpoint")
    overwrite: bool = _f(False, "replace an existing run in --output-dir")
    resume_override: list = _f(
        [],
        "with --resume: the fields allowed to differ from the run's saved config.json "
        "(e.g. steps learning_rate); any other difference is refused",
    )
    tensorboard: bool = _f(False, "also write TensorBoard event files (needs tensorboard)")
    progress: bool = _f(True, "show the progress bar")

    def check(self) -> list[str]:
        """What is wrong with these settings, one message each (empty: nothing)."""
        overrides = {n.replace("-", "_") for n in self.resume_override}
        checks = [
            (
                not overrides - set(FLAT),
                f"resume_override: unknown fields {sorted(overrides - set(FLAT))}",
            ),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
            (
                self.save_every >= 0 and self.eval_every >= 0,
                "save_every and eval_every must be >= 0 (0: off)",
            ),
        ]
        return [message for ok, message in checks if not ok]


# The loss options' help (GRPOLossConfig is the kernels' frozen dataclass, documented there).
LOSS_HELP = {
    "beta": "KL coefficient (k3) to the frozen reference model",
    "use_bias_correction_kl": "multiply the per-token KL by the importance ratio "
    "(DeepSeek-V3.2's unbiased KL gradient; TRL's default)",
    "eps_low": "lower clip range of the ratio (TRL: epsilon)",
    "eps_high": "upper clip range (TRL: epsilon_high; cispo: the cap of the ratio; DAPO "
    "suggests 0.28, ScaleRL 5.0 for cispo); None: eps_low",
    "delta": "two-sided clipping: cap of the unclipped ratio (INTELLECT-2)",
    "loss_type": "grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo (as TRL)",
    "importance_level": "token, or sequence (GSPO; TRL: importance_sampling_level)",
    "entropy_coef": "entropy bonus: minus this times the micro-batch's token-mean entropy, "
    "whatever the loss type (as TRL)",
    "sapo_temperature_pos": "sapo: gate temperature for positive advantages",
    "sapo_temperature_neg": "sapo: gate temperature for the others",
    "vespo_k_pos": "vespo: power of the gamma weight, advantages >= 0",
    "vespo_lambda_pos": "vespo: decay of the gamma weight, advantages >= 0",
    "vespo_k_neg": "vespo: power of the gamma weight, advantages < 0",
    "vespo_lambda_neg": "vespo: decay of the gamma weight, advantages < 0",
    "top_entropy_quantile": "train only on the tokens whose entropy is in this top quantile of "
    "the micro-batch's (0.2 in 'Beyond the 80/20 rule'; 1: all tokens)",
    "off_policy_mask_threshold": "DeepSeek-V3.2's off-policy sequence mask: drop "
    "negative-advantage sequences whose mean sampler-vs-policy KL "
    "exceeds this (e.g. 0.5)",
    "router_aux_loss_coef": "MoE: weight of the router's load-balancing auxiliary loss",
}
LOSS_CHOICES = {"loss_type": LOSS_TYPES, "importance_level": IMPORTANCE_LEVELS}
# Set from the sampling section, never on their own: the loss must see what the sampler did.
LOSS_FROM_SAMPLING = ("temperature", "max_completion_length")

SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "sampling": SamplingConfig,
    "rollout": RolloutConfig,
    "loss": GRPOLossConfig,
    "optim": OptimConfig,
    "moe": MoEConfig,
    "cold_start": ColdStartConfig,
    "lora": LoRAConfig,
    "run": RunConfig,
}


def _flat_names() -> dict[str, tuple[str, str]]:
    names = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if section == "loss" and f.name in LOSS_FROM_SAMPLING:
                continue
            names[f.metadata.get("flag", f.name)] = (section, f.name)
    return names


FLAT: dict[str, tuple[str, str]] = _flat_names()  # flag/key name -> (section, field)

# The embedded demo (no --model): a 0.8M-parameter Qwen2 learns 2-digit additions on a CPU in
# minutes. Every command (grpo-train, grpo-eval, grpo-sample, grpo-sft) decides demo mode by
# is_demo() and takes these values unless the user set them.
DEMO: dict[str, Any] = {
    "template": "short",
    "max_completion_length": 64,
    "temperature": 0.7,
    "dynamic_sampling": True,
    "steps": 320,
    "learning_rate": 5e-5,
    "micro_batch_size": 64,
    # The cold start: 400 steps over a fixed pool of 256 worked solutions (50 epochs); GRPO
    # then learns from fresh prompts and a reward. 200 steps left one seed in five at 12.5 %,
    # where GRPO gained 8.5 points (benchmarks/results/demo_seeds.csv).
    "sft_steps": 400,
    "sft_learning_rate": 3e-3,
    "sft_examples": 256,
    # The cold start already teaches the format; a format reward on top would only add
    # variance (a rare malformed sample makes every wrong answer look good).
    "rewards": ["accuracy"],
    # The loss it was tuned with (TRL's defaults), pinned whatever the defaults become.
    "loss_type": "dapo",
    "beta": 0.0,
}
# The built-in model (grpo.models.make_tiny) that grpo-train and grpo-sft create without --model.
DEMO_MODEL = {"family": "qwen2", "hidden": 128, "layers": 4}
# With the demo's arithmetic task: 2-digit additions, whose carries the tiny model can learn.
DEMO_TASK_ARGS = {"operators": "+"}


def is_demo(model_path: str) -> bool:
    """Demo mode: no model given, so the built-in tiny model is trained or loaded."""
    return not model_path


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: GRPOLossConfig = field(default_factory=lambda: GRPOLossConfig(loss_type="dapo"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_flat(cls, values: dict[str, Any] | None = None, **more: Any) -> GRPOConfig:
        """A resolved config from flat keys (flags, file keys): the defaults, the DEMO preset
        when no model is given, then the values."""
        values = {**(values or {}), **more}
        unknown = sorted(set(values) - set(FLAT))
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        cfg = cls()
        preset = dict(DEMO) if is_demo(values.get("model", "")) else {}
        if preset and values.get("task", "arithmetic") == "arithmetic" and "data" not in values:
            preset["task_args"] = dict(DEMO_TASK_ARGS)
        cfg.set_flat({**preset, **values})
        return cfg.resolve()

    def set_flat(self, values: dict[str, Any]) -> None:
        """Set fields by flat name, each value converted to its field's type (YAML reads
        `1e-5` as a string); one ValueError lists every value that does not fit."""
        loss, errors = {}, []
        for name, value in values.items():
            try:
                value = typed_value(name, value)
            except ValueError as e:
                errors.append(str(e))
                continue
            section, attr = FLAT[name]
            if section == "loss":
                loss[attr] = value
            else:
                setattr(getattr(self, section), attr, value)
        if loss:
            if "eps_low" in loss and "eps_high" not in loss:
                loss["eps_high"] = None  # falls back to the new eps_low, as TRL's epsilon_high
            try:
                self.loss = dataclasses.replace(self.loss, **loss)
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise ValueError("bad configuration: " + "; ".join(errors))

    def flat(self) -> dict[str, Any]:
        """Flat key -> value (what config.json records and --config files hold)."""
        return {name: getattr(getattr(self, s), a) for name, (s, a) in FLAT.items()}

    def resolve(self) -> GRPOConfig:
        """Fill what follows from other fields and check every value; returns self."""
        d, r = self.data, self.run
        if self.rollout.sampler_correction is None:
            self.rollout.sampler_correction = (
                "token_truncate" if self.rollout.engine == "vllm" else "none"
            )
        if not r.run_name:
            model = Path(self.model.path).name if self.model.path else "tiny"
            source = Path(d.data).stem if d.data else d.task
            r.run_name = f"{source}-{model}-seed{r.seed}"
        if not r.output_dir:
            r.output_dir = str(Path("runs") / r.run_name)
        # The loss sees the sampler's temperature and length (and validates itself).
        self.loss = dataclasses.replace(
            self.loss,
            temperature=self.sampling.temperature,
            max_completion_length=self.sampling.max_completion_length,
        )
        self.validate()
        return self

    def validate(self) -> None:
        """Every section's check, then what spans sections and what is on disk: one
        ValueError naming every problem found."""
        # The loss section (grpo.kernels.GRPOLossConfig) checks itself when it is built.
        sections = [getattr(self, name) for name in SECTIONS if name != "loss"]
        errors = [message for section in sections for message in section.check()]
        if self.lora.lora_rank and self.model.ref_on_cpu:
            errors.append(
                "--ref-on-cpu does not apply with --lora-rank: the reference model is the "
                "policy itself with its adapters off"
            )
        if errors:
            raise ValueError("bad configuration: " + "; ".join(errors))
        if self.model.path and not (Path(self.model.path) / "config.json").is_file():
            raise ValueError(
                f"model path {self.model.path!r} is not a directory with a config.json"
            )
        for flag, given in (("--data", self.data.data), ("--sft-data", self.cold_start.sft_data)):
            if given and Path(given).is_dir():
                raise ValueError(f"{flag} {given!r} is a directory, not a JSONL file")
            if given and not Path(given).is_file():
                raise ValueError(f"{flag}: dataset {given!r} does not exist")

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def typed_value(name: str, value: Any) -> Any:
    """`value` for the flat field `name` converted to the field's type, or a ValueError that
    names the field, the value and what is expected. Numbers and booleans may come as strings
    (as YAML and JSON files hold them), a single string where a list is expected becomes a
    one-element list, and choices are checked."""
    if name not in FLAT:
        raise ValueError(f"unknown field {name!r}")
    section, attr = FLAT[name]
    f, t = _field(name), _field_type(name)
    nullable = f.default is None or "None" in str(f.type)
    if value is None and nullable:
        return None
    try:
        value = _convert(t, value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {t.__name__}, got {value!r}") from None
    choices = LOSS_CHOICES.get(attr) if section == "loss" else f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {list(choices)}")
    return value


def _convert(t: type, value: Any) -> Any:
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(value)
    if t is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value.strip()) if isinstance(value, str) else int(value)
    if t is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    if t is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, (list, dict)) for v in items):
            raise ValueError(value)
        return list(items)
    if t is dict:
        value = json.loads(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ValueError(value)
        return value
    return value


# --- CLI and files --------------------------------------------------------------------


def _field(name: str) -> dataclasses.Field:
    section, attr = FLAT[name]
    return next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == attr)


def _field_type(name: str) -> type:
    section, attr = FLAT[name]
    t = typing.get_type_hints(SECTIONS[section])[attr]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def build_parser(prog: str = "grpo-train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="GRPO training (DeepSeek-R1-Zero recipe). With no arguments: "
        "a tiny model learns arithmetic on the CPU in minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON file of GRPOConfig fields")
    for section in SECTIONS:
        group = parser.add_argument_group(section)
        for name, (sec, attr) in FLAT.items():
            if sec != section:
                continue
            f = _field(name)
            t = _field_type(name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = LOSS_HELP.get(attr, "") if section == "loss" else f.metadata["help"]
            if name in DEMO:
                help_text += f" [{default!r}; {DEMO[name]!r} for the built-in model]"
            else:
                help_text += f" [{default!r}]"
            flags = ["--" + name.replace("_", "-")] + (["--reward"] if name == "rewards" else [])
            kwargs: dict[str, Any] = {"help": help_text, "dest": name}
            if t is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif t is list:
                kwargs.update(nargs="+", type=float if name.endswith("weights") else str)
            elif t is dict:
                kwargs["type"] = json.loads
            else:
                kwargs["type"] = t
            choices = LOSS_CHOICES.get(attr) if section == "loss" else f.metadata.get("choices")
            if choices:
                kwargs["choices"] = choices
            group.add_argument(*flags, **kwargs)
    return parser


def load_config_file(path: str | Path) -> dict:
    """Flat keys from a YAML or JSON file; a section may also be given nested
    (`loss: {beta: 0.04}`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory, not a YAML or JSON file")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except ValueError as e:  # json.JSONDecodeError
        raise ValueError(f"config file {path}: not valid JSON ({e})") from None
    except Exception as e:  # yaml.YAMLError, whose message spans lines
        problem = " ".join(str(e).split())
        raise ValueError(f"config file {path}: not valid YAML ({problem})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of GRPOConfig fields")
    flat = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict) and key not in FLAT:
            flat.update(value)  # a nested section: its fields are flat names too
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(FLAT))
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}")
    return flat


def parse_config(argv: list[str] | None = None, prog: str = "grpo-train") -> GRPOConfig:
    """defaults < DEMO (no --model) < --config file < flags, then resolve(). With --resume the
    run's saved config.json takes the place of the defaults and DEMO: a resumed run is the
    saved one, plus the values given (which build.prepare_run_dir then checks against it)."""
    flags = vars(build_parser(prog).parse_args(argv))
    values = load_config_file(flags.pop("config")) if "config" in flags else {}
    values.update(flags)
    cfg = GRPOConfig.from_flat(values)
    if cfg.run.resume:
        saved = read_run_config(Path(cfg.run.output_dir) / "config.json")
        if saved is not None:
            for name in ("resume", "overwrite", "resume_override"):  # this command's own
                saved.pop(name, None)
            return GRPOConfig.from_flat({**saved, **values})
    return cfg


# --- resuming ----------------------------------------------------------------------------

# Fields that do not change what a run computes: a resumed run may differ in these freely.
RESUME_FREE = frozenset(
    ("output_dir", "run_name", "resume", "overwrite", "resume_override", "progress",
     "tensorboard", "save_every", "device")
)  # fmt: skip


def read_run_config(path: str | Path) -> dict[str, Any] | None:
    """The flat fields of a config.json that a grpo-train run wrote, or None when `path` is
    not one (missing, not JSON, a model's config.json). Nested (current) and flat (runs
    written before the nested config) layouts both read."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    if {"sampling", "loss", "run"} <= set(value):
        return {
            name: value[s][a]
            for name, (s, a) in FLAT.items()
            if isinstance(value.get(s), dict) and a in value[s]
        }
    if "num_generations" in value:
        return {k: v for k, v in value.items() if k in FLAT}
    return None


def resume_mismatches(cfg: GRPOConfig, saved: dict[str, Any]) -> list[str]:
    """The fields in which `cfg` differs from a run's saved flat config, other than the free
    ones and cfg.run.resume_override's, as 'name: saved X, now Y'."""
    allowed = RESUME_FREE | {name.replace("-", "_") for name in cfg.run.resume_override}
    out = []
    for name, now in cfg.flat().items():
        if name in allowed or name not in saved:
            continue
        try:
            before = typed_value(name, saved[name])
        except ValueError:
            before = saved[name]
        if before != now:
            out.append(f"{name}: saved {before!r}, now {now!r}")
    return out
