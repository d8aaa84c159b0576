"""End to end: full GRPO steps of our trainer vs TRL's GRPOTrainer on one device.

    python -m benchmarks.bench_step [--model dense|moe|both] [--steps 3] [--prompts 16] [--G 8]
                                    [--tokens 256] [--providers ours,ours-logits,trl] [--tiny]

A step is rollout (prompts x G completions of exactly --tokens new tokens: EOS is never
sampled, so every provider generates the same number of tokens), rewards, old-policy and
reference log-probs, mu=2 optimizer steps on the batch (beta=0.04). Models are random-init
checkpoints written to a temporary directory: "dense" has Qwen2.5-0.5B's shapes (494M
parameters, tied embeddings), "moe" Qwen3-MoE-style shapes that fit one GPU (12 layers, hidden
1024, 64 experts, top-8, expert width 384: 1.25B parameters). The tokenizer is the character
tokenizer of grpo.models.tiny (no hub access); only the model's vocabulary is Qwen's 151936.

For each (model, provider) it prints seconds per phase (generate, rewards + log-probs, update),
seconds per step, generation tokens/s (completion tokens / generate seconds), step tokens/s and
peak GPU memory, appends the rows to benchmarks/results/step.csv and draws the phase breakdown
to benchmarks/results/step.png. TRL runs only when `trl` is installed: its transformers
`generate` path, bf16, the same model, batch and settings. One TRL "round" (one generation
batch) is mu optimizer steps; ours is one step accumulating mu passes: the same forward and
backward work, one optimizer update fewer.

On a GPU each (model, provider) runs in its own process so that peak memory, compile caches and
CUDA graph pools of one cannot leak into the next. --tiny runs small shapes on a CPU (no CSV).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

PHASES = ("generate", "logprobs", "update")
# name -> make_tiny arguments. Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads of 64 with 2 KV
# heads, MLP 4864, tied embeddings. The MoE: Qwen3-MoE layers at a width that fits one GPU.
MODELS: dict[str, dict[str, Any]] = {
    "dense": dict(kind="dense", family="qwen2", vocab=151936, hidden=896, layers=24, heads=14,
                  kv_heads=2, head_dim=64, intermediate=4864, tie_embeddings=True),
    "moe": dict(kind="moe", family="qwen3_moe", vocab=151936, hidden=1024, layers=12, heads=16,
                kv_heads=4, head_dim=64, experts=64, top_k=8, moe_intermediate=384),
}
TINY_MODELS: dict[str, dict[str, Any]] = {
    "dense": dict(kind="dense", family="qwen2", hidden=64, layers=2),
    "moe": dict(kind="moe", family="qwen3_moe", hidden=64, layers=2, experts=8, top_k=2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("dense", "moe", "both"), default="both")
    parser.add_argument("--providers", default="ours,trl",
                        help="comma list of ours, ours-logits (ours with the lm_head outside "
                             "the loss: materialised logits + grpo_loss), ours-padded (ours "
                             "without packing), trl")
    parser.add_argument("--steps", type=int, help="measured steps (rounds) [3; 1 with --tiny]")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps first (compilation, allocator, autotuning)")
    parser.add_argument("--prompts", type=int, help="prompts per step [16; 2 with --tiny]")
    parser.add_argument("--G", type=int, help="completions per prompt [8; 2 with --tiny]")
    parser.add_argument("--tokens", type=int, help="new tokens per completion [256; 8 --tiny]")
    parser.add_argument("--micro-batch", type=int, default=16,
                        help="completions per forward/backward (both providers)")
    parser.add_argument("--template", default="r1zero", help="prompt template (see grpo.data)")
    parser.add_argument("--lengths", choices=("full", "lognormal"), default="full",
                        help="completion lengths the training passes see: full (--tokens "
                             "each), or lognormal (each sampled completion cut to a log-normal "
                             "length, median --tokens/8, sigma 1, capped at --tokens: EOS "
                             "with a long tail, where packing matters)")
    parser.add_argument("--generation-cache", choices=("dynamic", "static"),
                        help="ours: rollout KV cache [the trainer's default]")
    parser.add_argument("--compile-generation", action=argparse.BooleanOptionalAction,
                        help="ours: compiled decoding [the trainer's default]")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=True, help="both providers")
    parser.add_argument("--tiny", action="store_true", help="small shapes, CPU; no CSV")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction,
                        help="each (model, provider) in its own process [on with CUDA]")
    parser.add_argument("--no-save", action="store_true", help="do not append to results/")
    parser.add_argument("--save", action="store_true", help="append to results/ even on CPU")
    parser.add_argument("--plot", type=Path, help="phase chart path [results/step.png]")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # model:provider:checkpoint
    args = parser.parse_args(argv)
    small = args.tiny
    args.steps = args.steps if args.steps is not None else (1 if small else 3)
    args.prompts = args.prompts or (2 if small else 16)
    args.G = args.G or (2 if small else 8)
    args.tokens = args.tokens or (8 if small else 256)
    args.models = ["dense", "moe"] if args.model == "both" else [args.model]
    args.providers = args.providers.split(",")
    unknown = set(args.providers) - set(RUNNERS)
    if unknown:
        parser.error(f"unknown provider(s) {sorted(unknown)}")
    if not common.has_cuda() and not small:
        parser.exit(2, f"{parser.prog}: the full-size step needs a CUDA GPU; on a machine "
                       "without one, run it with --tiny.\n")
    if args.isolate is None:
        args.isolate = common.has_cuda()
    args.save = (args.save or not small) and not args.no_save
    return args


def build_checkpoint(name: str, path: Path, tiny: bool) -> int:
    """A random-init checkpoint of `name`'s shapes at `path`; returns its parameter count."""
    from grpo.models import make_tiny

    spec = dict((TINY_MODELS if tiny else MODELS)[name])
    dtype = torch.float32 if tiny else torch.bfloat16
    make_tiny(path, spec.pop("kind"), dtype=dtype, max_shard_size="2GB", **spec)
    return _param_count(path)


def _param_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(f.get_slice(key).get_shape())
    return total


def _examples(n: int, seed: int) -> list[dict]:
    from grpo import data, tasks

    task = tasks.make_task("arithmetic")
    _, stream = data.task_splits(task, seed, 1)
    return stream.next_batch(n)


def _sync() -> None:
    if common.has_cuda():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    gc.collect()
    if common.has_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if common.has_cuda() else float("nan")


def _cut_to_long_tail(trainer, tokens: int, seed: int = 0) -> None:
    """Make trainer.sample_batch cut every completion to a log-normal length (median tokens/8,
    sigma 1, capped at tokens), as if EOS had been sampled there: the training passes then
    see a long-tailed mix. Generation still produces every token (its time is unchanged)."""
    sample, gen = trainer.sample_batch, torch.Generator().manual_seed(seed)

    def cut():
        batch = sample()
        r = batch.rollout
        n = len(r)
        lengths = common.lognormal_lengths(
            n, median=max(1.0, tokens / 8), sigma=1.0, cap=tokens, generator=gen
        ).to(r.completion_mask.device)
        columns = torch.arange(r.completion_ids.shape[1], device=lengths.device)
        keep = columns[None] < lengths[:, None]
        r.completion_mask = r.completion_mask * keep
        r.completion_ids = torch.where(keep, r.completion_ids, trainer.tokenizer.pad_token_id)
        if r.sampler_logp is not None:
            r.sampler_logp = r.sampler_logp * keep
        r.truncated = lengths == tokens
        return batch

    trainer.sample_batch = cut


def run_ours(args: argparse.Namespace, checkpoint: Path, workdir: Path,
             fused_loss: bool | None = None, packing: bool | None = None) -> dict[str, Any]:
    """Our GRPOTrainer: `warmup` untimed steps, then `steps` timed ones (phase seconds from
    the step's own metrics). fused_loss, packing: None is the trainer's default (fused on a
    GPU; packing with flash-attention or sdpa)."""
    from grpo.build import build_trainer
    from grpo.config import GRPOConfig

    _reset_peak()
    cfg = GRPOConfig.from_flat(
        model=str(checkpoint), output_dir=str(workdir / "ours"), overwrite=True,
        template=args.template, prompts_per_step=args.prompts, num_generations=args.G,
        max_completion_length=args.tokens, ignore_eos=True, num_iterations=2, beta=0.04,
        temperature=1.0, dynamic_sampling=False, micro_batch_size=args.micro_batch,
        gradient_checkpointing=args.gradient_checkpointing, rewards=["accuracy"],
        generation_cache=args.generation_cache, compile_generation=args.compile_generation,
        steps=args.warmup + args.steps, sft_steps=0, eval_size=1, progress=False,
        fused_loss=fused_loss, packing=packing)
    trainer = build_trainer(cfg)
    if args.lengths == "lognormal":
        _cut_to_long_tail(trainer, args.tokens)
    # As train() does when beta > 0: the frozen reference, loaded from the same checkpoint.
    trainer.ref_model = trainer.load_reference()
    records = []
    for i in range(args.warmup + args.steps):
        _sync()
        start = time.perf_counter()
        metrics = trainer.step()
        _sync()
        seconds = time.perf_counter() - start
        if i >= args.warmup:
            records.append({"step": seconds, **{p: metrics[f"seconds_{p}"] for p in PHASES}})
        # The token counts behind tokens/s assume full-length completions: check it.
        if args.lengths == "full" and metrics["completion_length"] != args.tokens:
            raise RuntimeError(f"mean completion length {metrics['completion_length']}, "
                               f"expected {args.tokens}: EOS was sampled")
    engine = trainer.engine
    return {"records": records, "peak_gib": _peak_gib(),
            "engine": f"{engine.cache}{'+compile' if engine.compile else ''}"
                      f"{'+fused-loss' if trainer.forward.fused else ''}"
                      f"{'+packing' if trainer.forward.packing else ''}"}


def run_trl(args: argparse.Namespace, checkpoint: Path, workdir: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer (transformers generate) on the same checkpoint, prompts and settings.
    A round is one generation batch: mu = 2 optimizer steps, the first of which generates."""
    import datasets
    import transformers
    import trl

    from grpo import data
    from grpo.rewards import accuracy_reward

    _reset_peak()
    cuda = common.has_cuda()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.bfloat16 if cuda else torch.float32)
    rounds = args.warmup + args.steps
    examples = _examples(rounds * args.prompts, seed=0)
    rows = [{"prompt": data.format_prompt(ex, args.template, tokenizer), "answer": ex["answer"]}
            for ex in examples]
    per_round = args.prompts * args.G
    micro = min(args.micro_batch, per_round)
    config = trl.GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_round // micro, num_generations=args.G,
        max_completion_length=args.tokens, num_iterations=2, beta=0.04, temperature=1.0,
        learning_rate=1e-6, bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=args.gradient_checkpointing, max_steps=2 * rounds,
        generation_kwargs={"min_new_tokens": args.tokens},  # EOS never sampled, as ours
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        shuffle_dataset=False)

    def accuracy(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [float(r or 0.0) for r in accuracy_reward(completions, answer)]

    trainer = trl.GRPOTrainer(model=model, reward_funcs=accuracy, args=config,
                              train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tokenizer)
    times: dict[str, list[float]] = {"generate": [], "score": []}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **kw: Any) -> Any:
            _sync()
            start = time.perf_counter()
            out = fn(*a, **kw)
            _sync()
            times[name].append(time.perf_counter() - start)
            return out
        return call

    # _generate is the sampling alone; _generate_and_score_completions adds rewards and the
    # old/reference log-probs around it (TRL 1.x method names).
    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("score",
                                                    trainer._generate_and_score_completions)
    ends: list[float] = []

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            if not ends:
                _sync()
                ends.append(time.perf_counter())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            _sync()
            ends.append(time.perf_counter())

    trainer.add_callback(StepTimes())
    trainer.remove_callback(transformers.PrinterCallback)  # a dict per step; the table suffices
    trainer.train()
    records = []
    for r in range(args.warmup, rounds):
        seconds = ends[2 * r + 2] - ends[2 * r]
        generate, score = times["generate"][r], times["score"][r]
        records.append({"step": seconds, "generate": generate, "logprobs": score - generate,
                        "update": seconds - score})
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h]
    if any(length != args.tokens for length in lengths):
        raise RuntimeError(f"TRL's mean completion lengths {lengths}, expected {args.tokens}")
    return {"records": records, "peak_gib": _peak_gib(), "engine": "trl-generate"}


RUNNERS = {"ours": run_ours, "ours-logits": functools.partial(run_ours, fused_loss=False),
           "ours-padded": functools.partial(run_ours, packing=False), "trl": run_trl}


def summarise(model: str, provider: str, params: int, result: dict, args: argparse.Namespace
              ) -> dict[str, Any]:
    records = result["records"]

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in records)

    tokens = args.prompts * args.G * args.tokens
    step, generate = mean("step"), mean("generate")
    return {
        "provider": provider,
        "shape": f"{args.prompts}x{args.G}x{args.tokens}"
                 + ("-lognormal" if args.lengths == "lognormal" else ""),
        "dtype": "bf16" if common.has_cuda() else "fp32", "ms": 1e3 * step,
        "peak_extra_mib": float("nan"),  # whole-run peak instead: peak_gib
        "model": model, "params_m": params / 1e6, "engine": result["engine"],
        "steps": len(records), "step_s": step, "step_s_min": min(r["step"] for r in records),
        "step_s_max": max(r["step"] for r in records), "generate_s": generate,
        "logprobs_s": mean("logprobs"), "update_s": mean("update"),
        "gen_tokens_per_s": tokens / generate, "step_tokens_per_s": tokens / step,
        "peak_gib": result["peak_gib"], "mu": 2, "beta": 0.04,
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def _worker(args: argparse.Namespace) -> None:
    """Child process of an isolated run: one (model, provider); the result as JSON on the
    last stdout line."""
    model, provider, checkpoint, params = args.worker.split(":", 3)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        result = RUNNERS[provider](args, Path(checkpoint), Path(tmp))
    print("RESULT " + json.dumps(summarise(model, provider, int(params), result, args)))


def _run_isolated(model: str, provider: str, checkpoint: Path, params: int,
                  argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_step", *argv,
           "--worker", f"{model}:{provider}:{checkpoint}:{params}"]
    out = subprocess.run(cmd, cwd=common.REPO_ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(common.REPO_ROOT)})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"exit {out.returncode}: {out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@contextlib.contextmanager
def _checkpoint(name: str, tiny: bool) -> Iterator[tuple[Path, int]]:
    with tempfile.TemporaryDirectory(prefix=f"bench_step_{name}_") as tmp:
        path = Path(tmp) / name
        start = time.perf_counter()
        params = build_checkpoint(name, path, tiny)
        print(f"{name}: {params / 1e6:.1f}M parameters, written in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        yield path, params


def plot_phases(rows: list[dict[str, Any]], out: Path) -> Path:
    """Stacked bars, one per (model, provider): seconds of each phase of one step."""
    from benchmarks.plot import plt, save_figure  # the Agg backend, set on import

    labels = [f"{r['model']}\n{r['provider']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        heights = [float(r[f"{phase}_s"]) for r in rows]
        ax.bar(labels, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for i, r in enumerate(rows):
        peak = float(r["peak_gib"])
        label = f"{float(r['step_s']):.2f} s" + ("" if math.isnan(peak) else f"\n{peak:.1f} GiB")
        ax.text(i, bottom[i], label, ha="center", va="bottom", fontsize=7)
    r0 = rows[0]
    ax.set_ylabel("seconds per GRPO step (lower is better)")
    ax.set_title(f"GRPO step on {common.device_name()}: {r0['shape']} (prompts x G x tokens), "
                 f"mu=2, beta=0.04", fontsize=9)
    ax.margins(y=0.2)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return []
    if not common.has_cuda():
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows: list[dict[str, Any]] = []
    for model in args.models:
        with _checkpoint(model, args.tiny) as (path, params):
            for provider in args.providers:
                if provider == "trl" and not _has_trl():
                    print("note: trl skipped: trl is not installed", flush=True)
                    continue
                try:
                    if args.isolate:
                        row = _run_isolated(model, provider, path, params, argv)
                    else:
                        with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
                            result = RUNNERS[provider](args, path, Path(tmp))
                        row = summarise(model, provider, params, result, args)
                except Exception as exc:  # one failing provider must not end the whole run
                    print(f"note: {provider} failed on {model}: {type(exc).__name__}: {exc}",
                          flush=True)
                    continue
                rows.append(row)
                if args.save:  # at once: a run stopped later keeps the providers it finished
                    common.append_results("step", [row])
                print(f"{model:>6} {provider:>5} {row['step_s']:8.3f} s/step  generate "
                      f"{row['generate_s']:.3f} s ({row['gen_tokens_per_s']:.0f} tok/s)",
                      flush=True)
    print()
    print(f"GRPO step on {common.device_name()} (git {common.git_sha()})")
    shown = ("model", "provider", "engine", "params_m", "step_s", "generate_s", "logprobs_s",
             "update_s", "gen_tokens_per_s", "step_tokens_per_s", "peak_gib")
    common.print_table([{k: r[k] for k in shown} for r in rows])
    for model in args.models:
        by = {r["provider"]: r for r in rows if r["model"] == model}
        if "ours" in by and "trl" in by:
            print(f"{model}: ours is {by['trl']['step_s'] / by['ours']['step_s']:.2f}x TRL's "
                  f"throughput, peak memory {by['ours']['peak_gib']:.2f} vs "
                  f"{by['trl']['peak_gib']:.2f} GiB")
    if args.save and rows:
        print(f"appended {len(rows)} rows to {common.RESULTS_DIR / 'step.csv'}")
    if rows and (args.save or args.plot):
        print(f"wrote {plot_phases(rows, args.plot or common.RESULTS_DIR / 'step.png')}")
    return rows


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


if __name__ == "__main__":
    main()
