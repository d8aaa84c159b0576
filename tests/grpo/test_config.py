"""GRPOConfig: nested sections, the flat flags and file keys users have, the DEMO preset."""

from __future__ import annotations

import dataclasses
import re

import pytest

from grpo.config import DEMO, FLAT, SECTIONS, GRPOConfig, build_parser, is_demo, parse_config

# Every flag / YAML key of the flat GRPOConfig before the nested redesign: all must still work.
OLD_FLAT_FIELDS = (
    "model", "task", "task_args", "data", "template", "rewards", "reward_weights",
    "reward_errors", "prompts_per_step", "num_generations", "max_prompt_length",
    "prompt_overflow", "max_completion_length", "temperature", "top_p", "generation_cache",
    "compile_generation", "ignore_eos", "dynamic_sampling", "max_sampling_rounds", "rollout",
    "sampler_correction", "sampler_correction_cap", "vllm_gpu_memory_utilization", "vllm_sleep",
    "num_iterations", "beta", "use_bias_correction_kl", "eps_low", "eps_high", "delta",
    "loss_type", "importance_level", "sapo_temperature_pos", "sapo_temperature_neg",
    "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "top_entropy_quantile",
    "off_policy_mask_threshold", "scale_rewards", "mask_truncated_completions", "overlong_buffer",
    "entropy_coef", "steps", "learning_rate", "lr_schedule", "warmup_steps", "weight_decay",
    "max_grad_norm", "micro_batch_size", "gradient_checkpointing", "dtype", "device",
    "kernel_backend", "fused_loss", "ref_on_cpu", "routing_replay", "freeze_router",
    "router_aux_loss_coef", "seed", "sft_steps", "sft_data", "sft_learning_rate",
    "sft_batch_size", "eval_every", "eval_size", "save_every", "output_dir", "run_name", "resume",
    "overwrite", "tensorboard", "progress",
)


def _value(name: str):
    """A valid non-default value for a flat option."""
    section, attr = FLAT[name]
    f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == attr)
    special = {"model": "", "task": "countdown", "data": "", "template": "none",
               "rewards": ["accuracy"], "reward_weights": [2.0], "reward_errors": "zero",
               "prompt_overflow": "error", "rollout": "transformers", "generation_cache": "static",
               "sampler_correction": "token_mask", "lr_schedule": "cosine", "dtype": "fp32",
               "device": "cpu", "kernel_backend": "reference", "loss_type": "sapo",
               "importance_level": "sequence", "scale_rewards": "batch", "task_args": {"count": 3},
               "output_dir": "somewhere", "run_name": "r", "sft_data": "", "resume": False,
               "overwrite": True, "compile_generation": False, "top_p": 0.9, "delta": None,
               "vllm_gpu_memory_utilization": 0.5, "top_entropy_quantile": 0.5,
               "off_policy_mask_threshold": 0.5, "eps_high": 0.28, "eval_size": 50}
    if name in special:
        return special[name]
    default = f.default
    if isinstance(default, bool) or default is None and "bool" in str(f.type):
        return not default if default is not None else True
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default + 0.25
    raise AssertionError(f"no test value for {name}")


def test_every_old_flag_and_key_still_works(tmp_path):
    assert set(OLD_FLAT_FIELDS) <= set(FLAT)
    parser_flags = {a.dest for a in build_parser()._actions}
    for name in OLD_FLAT_FIELDS:
        assert name in parser_flags, name
        value = _value(name)
        cfg = GRPOConfig.from_flat({"output_dir": str(tmp_path), name: value})
        section, attr = FLAT[name]
        assert getattr(getattr(cfg, section), attr) == value, name
        assert cfg.flat()[name] == value, name


def test_flags_file_and_nested_sections(tmp_path):
    (tmp_path / "c.yaml").write_text("beta: 0.1\nsampling: {num_generations: 4}\n"
                                     "optim:\n  learning_rate: 0.001\n")
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), "--eps-low", "0.1",
                        "--temperature", "0.9", "--output-dir", str(tmp_path / "r")])
    assert (cfg.loss.beta, cfg.sampling.num_generations, cfg.optim.learning_rate) == \
        (0.1, 4, 0.001)
    # eps_high falls back to the new eps_low (TRL's epsilon_high=None); the loss sees the
    # sampler's temperature and length.
    assert (cfg.loss.eps_low, cfg.loss.eps_high) == (0.1, 0.1)
    assert cfg.loss.temperature == cfg.sampling.temperature == 0.9
    assert cfg.loss.max_completion_length == cfg.sampling.max_completion_length
    with pytest.raises(ValueError, match="unknown fields"):
        GRPOConfig.from_flat(epsilon=0.2)


def test_demo_preset_only_without_a_model(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    demo = GRPOConfig.from_flat(output_dir=str(tmp_path / "a"))
    real = GRPOConfig.from_flat(model=str(model), output_dir=str(tmp_path / "b"))
    assert is_demo(demo.model.path) and not is_demo(real.model.path)
    flat_demo = demo.flat()
    for name, value in DEMO.items():
        assert flat_demo[name] == value, name
    assert demo.data.task_args == {"operators": "+"} and real.data.task_args == {}
    assert (real.data.template, real.sampling.max_completion_length, real.optim.steps) == \
        ("r1zero", 256, 200)
    # A value the user gives beats the preset.
    assert GRPOConfig.from_flat(steps=5, output_dir=str(tmp_path / "c")).optim.steps == 5


def test_file_values_are_converted_to_their_types(tmp_path):
    """YAML reads 1e-5 as a string, and users write booleans and single rewards as strings."""
    (tmp_path / "c.yaml").write_text(
        'learning_rate: 1e-5\ndynamic_sampling: "false"\nrewards: accuracy\n'
        'num_generations: "4"\ntask_args: \'{"digits": 3}\'\n')
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "r")])
    assert cfg.optim.learning_rate == 1e-5 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.sampling.dynamic_sampling is False
    assert cfg.data.rewards == ["accuracy"]
    assert cfg.sampling.num_generations == 4 and cfg.data.task_args == {"digits": 3}


def test_every_bad_value_is_named_in_one_message(tmp_path):
    (tmp_path / "c.yaml").write_text(
        'num_generations: four\nloss_type: ppo\ndynamic_sampling: "maybe"\nrollout: 3\n')
    with pytest.raises(ValueError) as error:
        parse_config(["--config", str(tmp_path / "c.yaml")])
    message = str(error.value)
    for part in ("num_generations: expected int, got 'four'", "loss_type: 'ppo' is not one of",
                 "dynamic_sampling: expected bool", "rollout: expected str"):
        assert part in message, message


@pytest.mark.parametrize("flags, field", [
    (["--reward-weights", "nan"], "reward_weights must be finite"),
    (["--learning-rate", "inf"], "learning_rate must be finite"),
    (["--entropy-coef", "nan"], "entropy_coef must be >= 0"),
    (["--beta", "-1"], "beta must be >= 0"),
    (["--eps-low", "-1"], "eps_low must be >= 0"),
    (["--delta", "0"], "delta must be > 0"),
    (["--save-every", "-1"], "save_every and eval_every must be >= 0"),
    (["--warmup-steps", "-5"], "warmup_steps must be >= 0"),
    (["--max-grad-norm", "-1"], "max_grad_norm must be >= 0"),
    (["--overlong-buffer", "64"], "overlong_buffer must lie in [0, max_completion_length=64)"),
    (["--dtype", "fp16"], "--dtype fp16 is not supported for training"),
])
def test_out_of_range_values_fail_before_anything_loads(tmp_path, flags, field):
    """Checked when the config is built: no model is loaded, no directory created."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(field)):
        parse_config([*flags, "--output-dir", str(out)])
    assert not out.exists()
