"""GRPOConfig: every knob of a run, documented, settable from CLI flags and YAML/JSON files.

Precedence: dataclass defaults < the --config file < command-line flags. Fields whose
default depends on the model (learning rate, lengths, ...) default to None and are
resolved by `resolve()`: with no --model the run uses the built-in tiny model and the
embedded demo's values, otherwise values suited to a real pretrained model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernels import GRPOLossConfig
from kernels.reference import IMPORTANCE_LEVELS, LOSS_TYPES, SAMPLER_CORRECTIONS, SCALES


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class GRPOConfig:
    # --- model and data ---
    model: str = _f("", "local HF model directory; empty: the built-in tiny Qwen2 demo model")
    task: str = _f("arithmetic", "built-in task: arithmetic, countdown, sort, reverse")
    task_args: dict = _f({}, "task options as JSON, e.g. '{\"digits\": 3, \"operators\": \"+-\"}'")
    data: str = _f("", "JSONL dataset with prompt and answer columns (replaces --task)")
    template: str = _f(None, "prompt template: r1zero, short, chat (tokenizer's), none "
                             "[r1zero; short for the built-in model]")
    rewards: list = _f([], "reward functions: accuracy, format, language, countdown, "
                           "overlong, or package.module:function [the task's: accuracy and "
                           "format; countdown and format for countdown]")
    reward_weights: list = _f([], "one weight per reward function (default all 1)")
    reward_errors: str = _f("raise", "a reward function that raises: raise (stop) or zero",
                            choices=("raise", "zero"))
    # --- sampling ---
    prompts_per_step: int = _f(16, "prompts per optimizer step")
    num_generations: int = _f(8, "G: completions per prompt (>= 2)")
    max_prompt_length: int = _f(512, "longer prompts are left-truncated (or see --prompt-overflow)")
    prompt_overflow: str = _f("truncate", "prompts over max_prompt_length: truncate or error",
                              choices=("truncate", "error"))
    max_completion_length: int = _f(None, "max new tokens per completion [256; 64 built-in]")
    temperature: float = _f(None, "sampling temperature (also used in the loss) [1.0; 0.7 "
                                  "built-in]")
    top_p: float = _f(1.0, "nucleus sampling")
    generation_cache: str = _f(None, "rollout KV cache: dynamic, or static (preallocated; "
                                     "lets the decoding forward be compiled) [static on GPU, "
                                     "dynamic on CPU]", choices=("dynamic", "static"))
    compile_generation: bool = _f(None, "torch.compile the decoding forward (CUDA graphs on a "
                                        "GPU; needs the static cache) [on on GPU with SDPA "
                                        "attention unless routing replay records]")
    ignore_eos: bool = _f(False, "never sample EOS: every completion is max_completion_length "
                                 "tokens long (benchmarks)")
    dynamic_sampling: bool = _f(None, "DAPO: drop groups whose rewards are all equal and draw "
                                      "more prompts [off; on built-in]")
    max_sampling_rounds: int = _f(4, "with dynamic sampling: rounds of extra prompts per step")
    rollout: str = _f("transformers", "rollout engine: transformers (generate) or vllm "
                                      "(colocated, needs the vllm package and a GPU)",
                      choices=("transformers", "vllm"))
    sampler_correction: str = _f(None, "importance weights pi_old / pi_sampler on the advantages "
                                       "for the sampler/trainer mismatch: none, token_truncate "
                                       "(TIS), token_mask, sequence_truncate, sequence_mask "
                                       "[token_truncate with vllm; none]",
                                 choices=SAMPLER_CORRECTIONS)
    sampler_correction_cap: float = _f(2.0, "cap of those importance weights")
    vllm_gpu_memory_utilization: float = _f(0.3, "vllm: share of GPU memory for weights and "
                                                 "KV cache (the trainer needs the rest)")
    vllm_sleep: bool = _f(False, "vllm: release its KV cache while the trainer updates")
    # --- loss (TRL 1.16's GRPOConfig names and defaults; see kernels/reference.py) ---
    num_iterations: int = _f(1, "mu: optimizer steps on each batch (GRPO's inner iterations)")
    beta: float = _f(None, "KL coefficient (k3) to the frozen reference model [0.0]")
    use_bias_correction_kl: bool = _f(True, "multiply the per-token KL by the importance ratio "
                                            "(DeepSeek-V3.2's unbiased KL gradient; TRL's "
                                            "default)")
    eps_low: float = _f(0.2, "lower clip range of the ratio (TRL: epsilon)")
    eps_high: float = _f(None, "upper clip range (TRL: epsilon_high; cispo: the cap of the "
                               "ratio; DAPO suggests 0.28, ScaleRL 5.0 for cispo) [eps_low]")
    delta: float = _f(None, "two-sided clipping: cap of the unclipped ratio (INTELLECT-2)")
    loss_type: str = _f(None, "grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo (as TRL) "
                              "[dapo]", choices=LOSS_TYPES)
    importance_level: str = _f("token", "token, or sequence (GSPO; TRL: "
                                        "importance_sampling_level)", choices=IMPORTANCE_LEVELS)
    sapo_temperature_pos: float = _f(1.0, "sapo: gate temperature for positive advantages")
    sapo_temperature_neg: float = _f(1.05, "sapo: gate temperature for the others")
    vespo_k_pos: float = _f(2.0, "vespo: power of the gamma weight, advantages >= 0")
    vespo_lambda_pos: float = _f(3.0, "vespo: decay of the gamma weight, advantages >= 0")
    vespo_k_neg: float = _f(3.0, "vespo: power of the gamma weight, advantages < 0")
    vespo_lambda_neg: float = _f(2.0, "vespo: decay of the gamma weight, advantages < 0")
    top_entropy_quantile: float = _f(1.0, "train only on the tokens whose entropy is in this top "
                                          "quantile of the micro-batch's (0.2 in 'Beyond the "
                                          "80/20 rule'; 1: all tokens)")
    off_policy_mask_threshold: float = _f(None, "DeepSeek-V3.2's off-policy sequence mask: drop "
                                                "negative-advantage sequences whose mean "
                                                "sampler-vs-policy KL exceeds this (e.g. 0.5)")
    scale_rewards: str = _f("group", "advantage scaling: group, batch, none", choices=SCALES)
    mask_truncated_completions: bool = _f(False, "exclude completions without EOS from the loss")
    overlong_buffer: int = _f(0, "DAPO soft overlong punishment zone in tokens (0: off)")
    entropy_coef: float = _f(0.0, "entropy bonus: minus this times the micro-batch's token-mean "
                                  "entropy, whatever the loss type (as TRL)")
    # --- optimisation ---
    steps: int = _f(None, "GRPO optimizer steps [200; 320 built-in]")
    learning_rate: float = _f(None, "peak learning rate [1e-6; 5e-5 built-in]")
    lr_schedule: str = _f("constant", "constant, linear or cosine decay after warmup",
                          choices=("constant", "linear", "cosine"))
    warmup_steps: int = _f(0, "linear warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    micro_batch_size: int = _f(None, "completions per forward/backward; gradient accumulation "
                                     "covers the rest [8; 64 built-in]")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward")
    dtype: str = _f("auto", "bf16, fp16, fp32; auto: bf16 on GPU, fp32 on CPU")
    device: str = _f("auto", "cuda, cpu; auto: cuda when available")
    kernel_backend: str = _f("auto", "auto (Triton on GPU), triton, reference (PyTorch)",
                             choices=("auto", "triton", "reference"))
    fused_loss: bool = _f(None, "GRPO loss and log-probs straight from the last hidden states "
                                "(lm_head fused in, no (B, T, V) logits) [on on GPU]")
    ref_on_cpu: bool = _f(False, "keep the reference model on the CPU between uses")
    routing_replay: bool = _f(None, "MoE: record the experts each token used while sampling and "
                                    "replay them in the training forwards [on for MoE models]")
    freeze_router: bool = _f(False, "MoE: keep the router weights fixed")
    router_aux_loss_coef: float = _f(0.0, "MoE: weight of the load-balancing auxiliary loss")
    seed: int = _f(0, "seed of data, sampling and initialisation")
    # --- cold start ---
    sft_steps: int = _f(None, "supervised cold-start steps before GRPO [0; 200 built-in]")
    sft_data: str = _f("", "JSONL with prompt and completion for the cold start "
                           "(default: the task's worked solutions)")
    sft_learning_rate: float = _f(None, "cold-start learning rate [1e-5; 3e-3 built-in]")
    sft_batch_size: int = _f(32, "cold-start examples per step")
    # --- evaluation, checkpoints, output ---
    eval_every: int = _f(0, "evaluate every N steps (0: only before and after GRPO)")
    eval_size: int = _f(200, "held-out prompts, never trained on")
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end)")
    output_dir: str = _f("", "run directory [runs/<run_name>]")
    run_name: str = _f("", "run name [task-model-seed]")
    resume: bool = _f(False, "continue the run in --output-dir from its checkpoint")
    overwrite: bool = _f(False, "replace an existing run in --output-dir")
    tensorboard: bool = _f(False, "also write TensorBoard event files (needs tensorboard)")
    progress: bool = _f(True, "show the progress bar")

    @property
    def builtin_model(self) -> bool:
        return not self.model

    def resolve(self) -> GRPOConfig:
        """Fill model-dependent defaults and check values; returns self."""
        tiny = self.builtin_model
        defaults = {
            "template": "short" if tiny else "r1zero",
            "max_completion_length": 64 if tiny else 256,
            "temperature": 0.7 if tiny else 1.0,
            "dynamic_sampling": tiny,
            "steps": 320 if tiny else 200,
            "learning_rate": 5e-5 if tiny else 1e-6,
            "micro_batch_size": 64 if tiny else 8,
            "sft_steps": 200 if tiny else 0,
            "sft_learning_rate": 3e-3 if tiny else 1e-5,
            "sampler_correction": "token_truncate" if self.rollout == "vllm" else "none",
            # TRL's defaults; the embedded demo was tuned with exactly these, so they are
            # pinned for it whatever the library defaults become.
            "loss_type": "dapo",
            "beta": 0.0,
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if tiny and self.task == "arithmetic" and not self.task_args and not self.data:
            # The demo: 2-digit additions, whose carries a 0.6M-parameter model can learn.
            self.task_args = {"operators": "+"}
        if tiny and not self.rewards:
            # The cold start already teaches the format; a format reward on top would only
            # add variance (a rare malformed sample makes every wrong answer look good).
            self.rewards = ["accuracy"]
        if not self.run_name:
            model = Path(self.model).name if self.model else "tiny"
            source = Path(self.data).stem if self.data else self.task
            self.run_name = f"{source}-{model}-seed{self.seed}"
        if not self.output_dir:
            self.output_dir = str(Path("runs") / self.run_name)
        if self.eps_high is None:
            self.eps_high = self.eps_low
        self.validate()
        return self

    def loss_config(self) -> GRPOLossConfig:
        """The loss options of this run (validated there: bad values raise ValueError)."""
        return GRPOLossConfig(
            temperature=self.temperature, beta=self.beta, eps_low=self.eps_low,
            eps_high=self.eps_high, delta=self.delta, loss_type=self.loss_type,
            importance_level=self.importance_level,
            max_completion_length=self.max_completion_length, entropy_coef=self.entropy_coef,
            use_bias_correction_kl=self.use_bias_correction_kl,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg, vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
            top_entropy_quantile=self.top_entropy_quantile,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            router_aux_loss_coef=self.router_aux_loss_coef)

    def validate(self) -> None:
        checks = [
            (self.num_generations >= 2, f"num_generations (G) must be >= 2, got "
                                        f"{self.num_generations}: GRPO compares answers "
                                        f"within a group"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (self.max_completion_length >= 1, f"max_completion_length must be >= 1, got "
                                              f"{self.max_completion_length}"),
            (self.max_prompt_length >= 1, "max_prompt_length must be >= 1"),
            (self.num_iterations >= 1, "num_iterations must be >= 1"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.generation_cache in (None, "dynamic", "static"),
             f"generation_cache must be dynamic or static, got {self.generation_cache!r}"),
            (not (self.compile_generation and self.generation_cache == "dynamic"),
             "compile_generation needs generation_cache=static"),
            (self.steps >= 0 and self.sft_steps >= 0, "steps and sft_steps must be >= 0"),
            (self.eval_size >= 1, "eval_size must be >= 1"),
            (self.sampler_correction_cap > 0, "sampler_correction_cap must be > 0"),
            (0 < self.vllm_gpu_memory_utilization < 1, "vllm_gpu_memory_utilization must be "
                                                       "in (0, 1)"),
            (not self.reward_weights or not self.rewards
             or len(self.reward_weights) == len(self.rewards),
             f"reward_weights has {len(self.reward_weights)} values for "
             f"{len(self.rewards)} reward functions"),
            (self.dtype in ("auto", "bf16", "fp16", "fp32"), f"unknown dtype {self.dtype!r}"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.loss_config()  # the loss options, checked where they are defined
        if self.model and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model path {self.model!r} is not a directory with a config.json")
        if self.data and not Path(self.data).is_file():
            raise ValueError(f"dataset {self.data!r} does not exist")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- CLI and files --------------------------------------------------------------------

def _field_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(GRPOConfig)
    t = hints[f.name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def build_parser(prog: str = "grpo-train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="GRPO training (DeepSeek-R1-Zero recipe). With no arguments: "
        "a tiny model learns arithmetic on the CPU in minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML or JSON file of GRPOConfig fields")
    for f in dataclasses.fields(GRPOConfig):
        t = _field_type(f)
        flags = ["--" + f.name.replace("_", "-")]
        if f.name == "rewards":
            flags.append("--reward")
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"help": help_text, "dest": f.name}
        if t is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif t is list:
            kwargs.update(nargs="+", type=float if f.name.endswith("weights") else str)
        elif t is dict:
            kwargs["type"] = json.loads
        else:
            kwargs["type"] = t
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(*flags, **kwargs)
    return parser


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of GRPOConfig fields")
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}")
    return values


def parse_config(argv: list[str] | None = None, prog: str = "grpo-train") -> GRPOConfig:
    """defaults < --config file < flags, then resolve()."""
    flags = vars(build_parser(prog).parse_args(argv))
    values = load_config_file(flags.pop("config")) if "config" in flags else {}
    values.update(flags)
    return GRPOConfig(**values).resolve()
