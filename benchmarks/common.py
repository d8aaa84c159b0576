"""Harness shared by the bench_<op>.py scripts.

It owns everything that is not specific to one op: the command line, which providers can
run here, timing, peak memory, the printed table and the results CSV. A script only says how
to build its inputs, how each provider runs, and how many bytes one call moves.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import gc
import importlib
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

# Without a GPU the Triton kernels can only run in the interpreter, and that has to be chosen
# before triton is first imported: `import triton` builds triton.language's own @triton.jit
# helpers, which fail inside interpreted kernels if they were built for the compiler. So this
# module imports triton only lazily, and the scripts import it before kernels or triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
# BENCH_RESULTS_DIR redirects the CSVs (gpu_checks.sh --cpu-smoke writes to a scratch folder).
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).resolve().parent
                   / "results")
# gpu_checks.sh tags every row of one run with GPU_CHECKS_RUN, so that its summary reads that
# run's rows only (the CSVs keep every run).
RUN_ID = os.environ.get("GPU_CHECKS_RUN", "")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Fixed leading columns keep CSVs from different scripts and runs comparable; a script's
# extra keys (beta, importance_level, ...) are appended after them.
COLUMNS = [
    "timestamp", "gpu", "git_sha", "torch", "triton", "op", "provider", "shape", "dtype",
    "ms", "gbps", "tflops", "peak_extra_mib", "run",
]

Shape = tuple[int, ...]
Inputs = dict[str, Any]
# A builder turns one shape's inputs into the zero-argument callable that is timed. The
# callable returns the tensors that must come out finite (loss, gradient, ...).
Builder = Callable[[Inputs], Callable[[], Any]]


def has_cuda() -> bool:
    return torch.cuda.is_available()


def import_kernels() -> tuple[ModuleType, ModuleType]:
    """Import `grpo.kernels` and its reference (interpreted without a GPU, see the top)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    kernels = importlib.import_module("grpo.kernels")
    return kernels, importlib.import_module("grpo.kernels.reference")


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile of a reference function, compiled on its first call.

    Lazy, so that a torch without a working compiler fails inside run_bench (a note, the
    provider skipped) rather than while the script sets up.
    """
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return _compile(fn)(*args, **kwargs)

    return call


@functools.cache
def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    # dynamic=False: each benchmark shape gets its own specialised graph, the best case for
    # the compiler, rather than one graph with symbolic sizes.
    return torch.compile(fn, dynamic=False)


def time_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median time of one call of `fn` in ms (`warmup`, `rep` are in ms, as in do_bench)."""
    if has_cuda():
        # do_bench flushes L2 between calls and times with CUDA events, so a kernel
        # cannot look faster by reading the previous call's data from cache.
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    # CPU (smoke runs, usually under the Triton interpreter): one call can take seconds,
    # so size the loop from a first call. These numbers only show that the script works.
    start = time.perf_counter()
    fn()
    first = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(max(1, min(50, int(rep / max(first, 1e-3))))):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory one call of `fn` allocates above what was live before it, in MiB."""
    if not has_cuda():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def device_name() -> str:
    return torch.cuda.get_device_name() if has_cuda() else "cpu"


def git_sha() -> str:
    """The checkout's short sha; GIT_SHA overrides it (a copy of the tree without .git)."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _fmt(value: Any, csv: bool = False) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if csv:
            return f"{value:.6g}"
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"  # tiny smoke-run rates would all print as 0.000
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def _columns(rows: Iterable[Mapping[str, Any]], first: Sequence[str] = ()) -> list[str]:
    cols = list(first)
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def append_results(op: str, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Append `rows` to benchmarks/results/<op>.csv, adding run metadata to each row.

    The whole file is rewritten to a temp file and moved into place: a crash never leaves a
    half-written CSV, and a row with a new extra key widens the header of older rows.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{op}.csv"
    import triton

    meta = {
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpu": device_name(), "git_sha": git_sha(), "torch": torch.__version__,
        "triton": triton.__version__, "op": op, "run": RUN_ID,
    }
    new = [{**meta, **{k: _fmt(v, csv=True) for k, v in row.items()}} for row in rows]
    old: list[dict[str, str]] = []
    if path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    header = _columns(old + new, COLUMNS)
    fd, tmp = tempfile.mkstemp(dir=RESULTS_DIR, prefix=f".{op}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(old + new)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def print_table(rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        print("(no results)")
        return
    cols = _columns(rows)
    cells = [[_fmt(row.get(c, "")) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        # Numbers right-aligned so that their decimal points line up.
        return "  ".join(
            v.rjust(w) if _is_number(v) else v.ljust(w) for v, w in zip(values, widths, strict=True)
        ).rstrip()

    print(line(cols))
    print(line(["-" * w for w in widths]))
    for r in cells:
        print(line(r))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_shape(text: str) -> Shape:
    return tuple(int(x) for x in text.lower().split("x"))


def shape_str(shape: Shape) -> str:
    return "x".join(map(str, shape))


def parse_args(
    description: str,
    *,
    providers: Sequence[str],
    shapes: Sequence[str],
    smoke_shapes: Sequence[str],
    dtype: str = "bf16",
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """The command line every bench script shares, plus the script's own flags.

    Resolves on the namespace: shapes (tuples), dtype (torch dtype), dtype_name, providers
    (list), device, save. Exits when there is no GPU and --smoke was not given.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shapes", help=f"comma list, default {','.join(shapes)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help=f"default {dtype} (fp32 with --smoke)")
    parser.add_argument("--providers", help=f"comma list of {','.join(providers)} (default all)")
    parser.add_argument("--warmup", type=int, default=25, help="warm-up time in ms")
    parser.add_argument("--rep", type=int, default=100, help="measuring time in ms")
    parser.add_argument("--no-save", action="store_true", help="do not append to results/")
    parser.add_argument("--save", action="store_true", help="append to results/ even with --smoke")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes; runs on CPU in the Triton interpreter; no CSV")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)

    args.device = "cuda" if has_cuda() else "cpu"
    if args.device == "cpu" and not args.smoke:
        parser.exit(2, f"{parser.prog}: this benchmark needs a CUDA GPU; on a machine without "
                       "one, run it with --smoke to check the script in the Triton interpreter.\n")
    if args.device == "cpu":
        # Smoke shapes gain nothing from threads, and OpenMP's spin-waits make a run crawl
        # (0.3 -> 24 ms per call measured) while another process holds the cores.
        torch.set_num_threads(1)
    if args.shapes:
        args.shapes = [parse_shape(s) for s in args.shapes.split(",")]
    else:
        args.shapes = [parse_shape(s) for s in (smoke_shapes if args.smoke else shapes)]
    args.dtype_name = args.dtype or ("fp32" if args.smoke else dtype)
    args.dtype = DTYPES[args.dtype_name]
    args.providers = args.providers.split(",") if args.providers else list(providers)
    unknown = [p for p in args.providers if p not in providers]
    if unknown:
        parser.error(f"unknown provider(s) {unknown}; choose from {list(providers)}")
    # Smoke runs are checks, not measurements: keep them out of the results unless asked.
    args.save = (args.save or not args.smoke) and not args.no_save
    return args


def skip_reason(provider: str, args: argparse.Namespace) -> str | None:
    """Why `provider` cannot run on this machine, or None when it can."""
    if provider.startswith("compile") and args.device != "cuda":
        return f"{provider} skipped: torch.compile is not benchmarked on a CPU smoke run"
    if provider.startswith("liger"):
        if args.device != "cuda":
            return f"{provider} skipped: Liger-Kernel needs a CUDA GPU"
        if importlib.util.find_spec("liger_kernel") is None:
            return f"{provider} skipped: liger_kernel is not installed"
    return None


def pad_for_liger(logits: torch.Tensor) -> torch.Tensor:
    """Liger's GRPO ops take the model's (B, T+1, V) logits and drop the last position.

    Its logits[:, t] predicts ids[:, t] for t < T, the same alignment as ours, so one extra
    (ignored) row per sequence gives it the same problem.
    """
    b, t, v = logits.shape
    padded = logits.new_zeros(b, t + 1, v)
    padded[:, :t] = logits.detach()
    return padded


def _all_finite(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return not out.is_floating_point() or bool(torch.isfinite(out).all())
    if isinstance(out, Mapping):
        return all(_all_finite(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return all(_all_finite(v) for v in out)
    return True


def run_bench(
    op: str,
    args: argparse.Namespace,
    make_inputs: Callable[[Shape], Inputs],
    builders: Mapping[str, Builder],
    *,
    bytes_fn: Callable[[Inputs], float] | None = None,
    flops_fn: Callable[[Inputs], float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Time every requested provider at every shape; print the table; save the rows."""
    rows: list[dict[str, Any]] = []
    notes: set[str] = set()

    def note(msg: str) -> None:
        if msg not in notes:
            notes.add(msg)
            print(f"note: {msg}", flush=True)

    for shape in args.shapes:
        torch.manual_seed(0)
        inputs = make_inputs(shape)
        for name in args.providers:
            reason = skip_reason(name, args)
            if reason:
                note(reason)
                continue
            fn = None
            try:
                fn = builders[name](inputs)
                # The first call also pays for compilation and autotuning: keep it untimed.
                if not _all_finite(fn()):
                    raise FloatingPointError("non-finite output")
                ms = time_ms(fn, args.warmup, args.rep)
                mib = peak_extra_mib(fn)
                # In-place providers keep reusing their buffer: check it is still sane.
                if not _all_finite(fn()):
                    raise FloatingPointError("non-finite output after timing")
            except Exception as exc:  # one failing provider must not end the whole run
                note(f"{name} failed at {shape_str(shape)}: {type(exc).__name__}: {exc}")
                continue
            finally:
                del fn
                _release_memory()
            row: dict[str, Any] = {
                "provider": name, "shape": shape_str(shape), "dtype": args.dtype_name, "ms": ms,
            }
            if bytes_fn is not None:
                row["gbps"] = bytes_fn(inputs) / (ms * 1e6)
            if flops_fn is not None:
                row["tflops"] = flops_fn(inputs) / (ms * 1e9)
            row["peak_extra_mib"] = mib
            row.update(extra or {})
            rows.append(row)
            print(f"{name:>14} {shape_str(shape):>18} {ms:10.3f} ms", flush=True)
        del inputs
        _release_memory()

    print()
    print(f"{op} on {device_name()} ({args.dtype_name}, git {git_sha()})")
    print_table(rows)
    if args.save and rows:
        print(f"appended {len(rows)} rows to {append_results(op, rows)}")
    return rows


def _release_memory() -> None:
    # Each provider should start from the same allocator state, not inherit another's
    # cached blocks (peak memory) or fragmentation.
    gc.collect()
    if has_cuda():
        torch.cuda.empty_cache()


def lognormal_lengths(
    n: int, *, median: float, sigma: float, cap: int, generator: torch.Generator
) -> torch.Tensor:
    """(n,) int64 lengths from a log-normal (median, sigma), rounded and clamped to [1, cap]:
    the long-tailed completion lengths of the packing benchmarks."""
    noise = torch.randn(n, generator=generator) * sigma
    lengths = torch.exp(noise + torch.log(torch.tensor(float(median))))
    return lengths.round().long().clamp(1, cap)
