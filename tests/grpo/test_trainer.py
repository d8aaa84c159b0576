"""The GRPO loop on tiny models on the CPU: a few steps end to end (dense and MoE), loss
bookkeeping under gradient accumulation, resume equivalence, and the CLI's errors."""

from __future__ import annotations

import dataclasses
import json
import math
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo.build import build_trainer
from grpo.cli.train import main
from grpo.config import GRPOConfig, parse_config
from grpo.metrics import read_metrics
from grpo.models import load_model, make_tiny
from grpo.rollout import Rollout

from .runs import comparable, grpo_train, interrupt_after

FAST = dict(steps=3, sft_steps=2, prompts_per_step=2, num_generations=4,
            max_completion_length=12, eval_size=8, micro_batch_size=4, progress=False,
            rewards=["accuracy", "format"], dynamic_sampling=False, temperature=1.0)


def bad_count_reward(completions, **kwargs):
    return [1.0] * (len(completions) + 1)


def nan_reward(completions, **kwargs):
    return [float("nan")] * len(completions)


def _config(tmp_path, **overrides) -> GRPOConfig:
    values = {**FAST, "output_dir": str(tmp_path / "run"), **overrides}
    return GRPOConfig.from_flat(values)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_three_steps_end_to_end(tmp_path, kind):
    model = "" if kind == "dense" else str(make_tiny(tmp_path / "moe", kind="moe"))
    cfg = _config(tmp_path, model=model, beta=0.04 if kind == "moe" else 0.0,
                  num_iterations=2 if kind == "moe" else 1)
    summary = build_trainer(cfg).train()
    run = tmp_path / "run"
    assert summary["grpo_steps"] == 3 and 0.0 <= summary["accuracy_after_grpo"] <= 1.0
    assert json.loads((run / "summary.json").read_text())["grpo_steps"] == 3
    assert json.loads((run / "config.json").read_text())["sampling"]["num_generations"] == 4
    lines = read_metrics(run / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3]
    for key in ("reward", "reward/accuracy", "reward/format", "accuracy", "frac_zero_std",
                "completion_length", "truncated", "clip_ratio/region_mean", "entropy", "grad_norm",
                "lr", "tokens_per_s", "seconds_generate", "seconds_update"):
        assert key in lines[-1], key
    assert ("kl" in lines[-1]) == (cfg.loss.beta > 0)
    assert all(math.isfinite(line["loss"]) for line in lines)
    if kind == "moe":  # routing replay on by default: its figures are logged
        assert lines[-1]["routing_mismatch"] == 0.0  # fp32 on the CPU routes alike
        assert lines[-1]["logp_gap_replay"] < 1e-4
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ours, _ = load_model(run / "final", dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(run / "final")
    ids = torch.randint(0, ours.config.vocab_size, (1, 5))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo",
                                       "vespo", "bnpo"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, loss_type):
    """Micro-batches of 3 (uneven) accumulate exactly the gradient of the whole batch in
    one call, with truncated completions masked and off-policy ratios that clip. bnpo is the
    exception by definition (TRL: each micro-batch's own token mean over the accumulation
    steps): there the two differ, and one micro-batch equals dapo."""
    trainer = build_trainer(_config(tmp_path, loss_type=loss_type, num_iterations=2,
                                  mask_truncated_completions=True, eps_high=0.2 if
                                  loss_type != "cispo" else 1.1))
    batch = trainer.sample_batch()
    n = len(batch.rollout)
    batch.advantages = torch.randn(n, generator=torch.Generator().manual_seed(1))
    old = trainer.policy_logprobs(trainer.model, batch.rollout)
    old = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))
    mask = batch.rollout.completion_mask.float() * (~batch.rollout.truncated).float()[:, None]
    mask[0, :] = 1.0  # whatever the sampler did, some tokens count
    grads = []
    for micro in (n, 3):
        trainer.forward.micro_batch_size = micro
        trainer.accumulate_gradients(batch, mask, old, None)
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
        trainer.optimizer.zero_grad(set_to_none=True)
    assert any(g.abs().sum() > 0 for g in grads[0])
    if loss_type == "bnpo":
        assert any(not torch.allclose(a, w, rtol=1e-3, atol=1e-6)
                   for w, a in zip(*grads, strict=True))
        trainer.forward.micro_batch_size = n
        trainer.cfg.loss = dataclasses.replace(trainer.cfg.loss, loss_type="dapo")
        trainer.accumulate_gradients(batch, mask, old, None)
        grads[1] = [p.grad.clone() for p in trainer.model.parameters()]
    for whole, accumulated in zip(*grads, strict=True):
        torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7)


def test_mu_iterations_are_optimizer_steps(tmp_path):
    """GRPO's mu inner iterations each update the policy (so the later ones are off-policy
    and clip), while the learning-rate schedule advances once per GRPO step."""
    trainer = build_trainer(_config(tmp_path, steps=2, num_iterations=3, eps_low=0.01,
                                  eps_high=0.01, learning_rate=1e-2, lr_schedule="linear",
                                  rewards=["tests.grpo.dist_worker:length_reward"]))
    trainer.train()
    steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {6}
    assert trainer.scheduler.last_epoch == 2
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # Later passes left the trust region.
    assert any(line["clip_ratio/region_mean"] > 0 for line in lines)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    opts = dict(steps=4, save_every=2, dynamic_sampling=True)
    build_trainer(_config(tmp_path / "a", **opts)).train()
    build_trainer(_config(tmp_path / "b", **{**opts, "steps": 2})).train()
    build_trainer(_config(tmp_path / "b", **opts, resume=True, resume_override=["steps"])).train()
    whole = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], resumed[2:], strict=True):
        assert comparable(a) == pytest.approx(comparable(b), nan_ok=True)


def test_cli_rejects_bad_input(tmp_path, capsys):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": oops}\n')
    no_answers = tmp_path / "noans.jsonl"
    no_answers.write_text('{"prompt": "1+1"}\n{"prompt": "2+2"}\n')
    cases = [
        (["--data", str(no_answers), "--eval-size", "1"], "noans.jsonl:1: missing 'answer'"),
        (["--model", str(tmp_path / "nowhere")], "is not a directory with a config.json"),
        (["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--data", str(bad_jsonl)], "bad.jsonl:2"),
        (["--num-generations", "1"], "num_generations (G) must be >= 2"),
        (["--max-completion-length", "0"], "max_completion_length must be >= 1"),
        (["--top-entropy-quantile", "1.5"], "top_entropy_quantile must lie in [0, 1]"),
        (["--loss-type", "sapo", "--delta", "2"], "has no clipped ratio"),
    ]
    for args, message in cases:
        code = main([*args, "--output-dir", str(tmp_path / "run"), "--no-progress"])
        assert code == 2, args
        assert message in capsys.readouterr().err, args


def test_output_dir_holding_another_run(tmp_path):
    build_trainer(_config(tmp_path, steps=1)).train()
    with pytest.raises(ValueError, match="holds another run; pass --resume"):
        build_trainer(_config(tmp_path, steps=1))
    build_trainer(_config(tmp_path, steps=1, overwrite=True))  # replaces it


def test_long_prompts_error_when_asked(tmp_path):
    trainer = build_trainer(_config(tmp_path, max_prompt_length=3, prompt_overflow="error"))
    with pytest.raises(ValueError, match="exceed max_prompt_length=3"):
        trainer.sample_batch()
    trainer = build_trainer(_config(tmp_path, max_prompt_length=3, overwrite=True))
    with pytest.warns(UserWarning, match="keeping their last tokens"):
        assert trainer.sample_batch().rollout.prompt_ids.shape[1] == 3


@pytest.mark.parametrize("reward, message", [
    ("tests.grpo.test_trainer:bad_count_reward", "bad_count_reward"),
    ("tests.grpo.test_trainer:nan_reward", "nan_reward"),
])
def test_bad_reward_functions_stop_training(tmp_path, reward, message):
    trainer = build_trainer(_config(tmp_path, rewards=["accuracy", reward]))
    with pytest.raises(RuntimeError, match=message):
        trainer.sample_batch()


def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("num_generations: 4\nbeta: 0.1\nrewards: [accuracy]\n")
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), "--beta", "0.2",
                        "--task-args", '{"digits": 3}', "--no-progress",
                        "--output-dir", str(tmp_path / "r")])
    assert (cfg.sampling.num_generations, cfg.loss.beta, cfg.data.rewards, cfg.data.task_args,
            cfg.run.progress) == \
        (4, 0.2, ["accuracy"], {"digits": 3}, False)
    assert cfg.optim.learning_rate == 5e-5 and cfg.data.template == "short"  # the DEMO preset
    assert cfg.sampling.dynamic_sampling and cfg.data.task_args == {"digits": 3}
    (tmp_path / "c.json").write_text(json.dumps({"num_generation": 4}))
    with pytest.raises(ValueError, match="unknown fields"):
        parse_config(["--config", str(tmp_path / "c.json")])


def test_loss_options_reach_the_kernels(tmp_path):
    """TRL's defaults (dapo, beta 0, the bias-corrected KL, eps_high = eps_low) and every
    loss flag land in the GRPOLossConfig the trainer hands to the kernels."""
    from grpo.kernels import GRPOLossConfig

    cfg = parse_config(["--model", "", "--output-dir", str(tmp_path / "a")])
    assert cfg.loss == GRPOLossConfig(
        loss_type="dapo", temperature=cfg.sampling.temperature,
        max_completion_length=cfg.sampling.max_completion_length)
    flags = ["--loss-type", "vespo", "--beta", "0.04", "--no-use-bias-correction-kl",
             "--eps-low", "0.1", "--entropy-coef", "0.01", "--vespo-k-pos", "1.5",
             "--vespo-lambda-neg", "2.5", "--top-entropy-quantile", "0.2",
             "--off-policy-mask-threshold", "0.5", "--importance-level", "sequence",
             "--sapo-temperature-neg", "2", "--output-dir", str(tmp_path / "b")]
    loss = parse_config(flags).loss
    assert (loss.loss_type, loss.beta, loss.use_bias_correction_kl, loss.eps_low,
            loss.eps_high, loss.entropy_coef, loss.vespo_k_pos, loss.vespo_lambda_neg,
            loss.top_entropy_quantile, loss.off_policy_mask_threshold, loss.importance_level,
            loss.sapo_temperature_neg) == ("vespo", 0.04, False, 0.1, 0.1, 0.01, 1.5, 2.5,
                                           0.2, 0.5, "sequence", 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_one_step_on_gpu_with_triton_kernels(tmp_path, kind):
    model = "" if kind == "dense" else str(make_tiny(tmp_path / "moe", kind="moe"))
    cfg = _config(tmp_path, model=model, device="cuda", kernel_backend="triton", steps=1,
                  beta=0.04, num_iterations=2)
    summary = build_trainer(cfg).train()
    line = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert summary["device"].startswith("cuda") and math.isfinite(line["loss"])


def test_moe_routing_replay_lines_up_with_the_sampler(tmp_path):
    """Rollouts of different prompt widths are re-padded when dynamic sampling stacks them;
    the replayed routing must stay on its tokens and give each the sampler's log-prob."""
    model = str(make_tiny(tmp_path / "moe", kind="moe"))
    trainer = build_trainer(_config(tmp_path, model=model))
    assert trainer.replay is not None
    parts = [trainer.engine.generate(prompts, 2) for prompts in (["1+2\n"], ["123+456\n",
                                                                           "7+8\n"])]
    rollout = Rollout.cat(parts, trainer.tokenizer.pad_token_id)
    layers, n, seq, _ = rollout.routing.shape
    assert (layers, n) == (2, 6)
    assert seq == rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1] - 1
    logp = trainer.policy_logprobs(trainer.model, rollout)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(logp[mask], rollout.sampler_logp[mask], rtol=1e-4, atol=1e-4)
    # A free forward of the padded batch routes (CPU, fp32) as the sampler did, token by token.
    attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    with torch.no_grad(), trainer.replay.record(num_rows=n):
        trainer.model(input_ids=torch.cat([rollout.prompt_ids, rollout.completion_ids], 1),
                      attention_mask=attention,
                      position_ids=(attention.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    free = trainer.replay.recorded()[:, :, :-1]
    real = attention[:, :-1].bool()
    agree = (free[:, real] == rollout.routing[:, real]).all(-1).float().mean()
    assert agree > 0.99, agree


def test_frozen_router_and_aux_loss(tmp_path):
    model = str(make_tiny(tmp_path / "moe", kind="moe"))
    trainer = build_trainer(_config(tmp_path, model=model, freeze_router=True,
                                  router_aux_loss_coef=0.01, learning_rate=1e-2))
    routers = [r.weight.detach().clone() for r in trainer.replay.routers]
    metrics = trainer.step()
    assert metrics["aux_loss"] > 0  # the router's loss reached the kernels' loss
    assert all(torch.equal(r.weight, before)
               for r, before in zip(trainer.replay.routers, routers, strict=True))
    with pytest.raises(ValueError, match="needs an MoE model"):
        build_trainer(_config(tmp_path, routing_replay=True, overwrite=True))


def test_moe_step_with_replay_off(tmp_path):
    model = str(make_tiny(tmp_path / "moe", kind="moe"))
    trainer = build_trainer(_config(tmp_path, model=model, routing_replay=False))
    assert trainer.replay is None
    metrics = trainer.step()
    assert math.isfinite(metrics["loss"]) and "routing_mismatch" not in metrics


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_fused_lm_head_path_matches_logits_path(tmp_path, kind):
    """--fused-loss (the GPU default): the loss from the last hidden states gives the same
    log-probs and gradients as logits + grpo_loss."""
    model = "" if kind == "dense" else str(make_tiny(tmp_path / "moe", kind="moe"))
    trainer = build_trainer(_config(tmp_path, model=model, fused_loss=False, beta=0.04,
                                  num_iterations=2))
    batch = trainer.sample_batch()
    batch.advantages = torch.randn(len(batch.rollout), generator=torch.Generator().manual_seed(3))
    mask = batch.rollout.completion_mask.float()
    results = []
    for fused in (False, True):
        trainer.forward.fused = fused
        old = trainer.policy_logprobs(trainer.model, batch.rollout)
        trainer.accumulate_gradients(batch, mask, old - 0.1, old + 0.2)
        results.append((old, [p.grad.clone() for p in trainer.model.parameters()]))
        trainer.optimizer.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for fused_grad, logits_grad in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(fused_grad, logits_grad, rtol=1e-4, atol=1e-6)


def _poison(trainer, bad_steps: set[int]) -> None:
    """The loss (hence every gradient) becomes NaN on the given GRPO steps (1-based), padded
    (the step's loss function) or packed (the one each packed micro-batch makes)."""

    def poisoning(loss_fn):
        def poisoned(*args, **kwargs):
            loss, stats = loss_fn(*args, **kwargs)
            if trainer.state["step"] + 1 in bad_steps:
                loss = loss * float("nan")
            return loss, stats

        return poisoned

    trainer.parts.loss_fn = poisoning(trainer.parts.loss_fn)
    packed_loss_fn = trainer.forward.packed_loss_fn

    def packed(*args, **kwargs):
        loss_fn, aux = packed_loss_fn(*args, **kwargs)
        return poisoning(loss_fn), aux

    trainer.forward.packed_loss_fn = packed


def test_a_non_finite_step_is_skipped(tmp_path):
    trainer = build_trainer(_config(tmp_path, steps=4))
    _poison(trainer, {2})
    trainer.train()
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [line["skipped_nonfinite"] for line in lines] == [0, 1, 0, 0]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert (tmp_path / "run" / "checkpoint" / "state.json").is_file()


def test_non_finite_steps_in_a_row_stop_before_any_checkpoint(tmp_path, capsys):
    from grpo.trainer import NonFiniteError

    trainer = build_trainer(_config(tmp_path, steps=6, max_nonfinite_steps=2))
    _poison(trainer, {2, 3, 4})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteError, match="2 steps in a row had a non-finite loss"):
        trainer.train()
    # The only checkpoint is the cold start's (step 0): the steps wrote none.
    checkpoint = tmp_path / "run" / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 0
    cold_start = sorted((p, p.read_bytes()) for p in checkpoint.rglob("*") if p.is_file())
    assert trainer.state["step"] == 2  # steps 1 and 2 ran; the third raised
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(),
                                                     strict=True))  # step 1 was applied
    # Weights that did turn non-finite are never checkpointed.
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="not writing a checkpoint"):
        trainer.save_checkpoint()
    assert sorted((p, p.read_bytes()) for p in checkpoint.rglob("*") if p.is_file()) == cold_start


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    """--overwrite never deletes a model, a project or a user's file: any directory that is
    not a run of ours is refused, naming what was found, and left as it was."""
    model = make_tiny(tmp_path / "m2")
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(ValueError, match="not a grpo-train run directory"):
        build_trainer(_config(tmp_path, output_dir=str(model), overwrite=True))
    assert sorted(p.name for p in model.iterdir()) == before
    project = tmp_path / "src"
    project.mkdir()
    (project / "main.py").write_text("print('mine')\n")
    with pytest.raises(ValueError, match=r"found main\.py"):
        build_trainer(_config(tmp_path, output_dir=str(project)))
    assert [p.name for p in project.iterdir()] == ["main.py"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        build_trainer(_config(tmp_path, output_dir=str(a_file)))
    # A run directory in which the user left a file of theirs is not cleared either.
    run = tmp_path / "run"
    build_trainer(_config(tmp_path, steps=1))
    (run / "my-notes.md").write_text("keep me")
    with pytest.raises(ValueError, match="my-notes.md"):
        build_trainer(_config(tmp_path, steps=1, overwrite=True))
    assert (run / "my-notes.md").read_text() == "keep me" and (run / "config.json").is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_checkpoint_and_resume_exactly(tmp_path, signum):
    """A real grpo-train process: the signal ends it after the current step with a checkpoint
    and exit status 128 + signal; --resume then gives the metrics of an uninterrupted run."""
    out = tmp_path / "run"
    proc = grpo_train(out)
    interrupt_after(proc, out / "metrics.jsonl", 2, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "checkpoint in" in err and "--resume" in err and "Traceback" not in err, err
    done = json.loads((out / "checkpoint" / "state.json").read_text())
    assert 2 <= done["step"] < 6, done
    if signum == signal.SIGTERM:
        return  # the resume below is the same for both; run it once
    resumed = grpo_train(out, "--resume")
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    whole = grpo_train(tmp_path / "whole")
    _, err = whole.communicate(timeout=180)
    assert whole.returncode == 0, err
    a = [comparable(x) for x in read_metrics(out / "metrics.jsonl")]
    b = [comparable(x) for x in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    assert a == b
