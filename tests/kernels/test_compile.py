"""Every Triton kernel compiles for an H100/H200 (sm_90) through the real compiler at each
configuration its launcher uses on CUDA, and none spills registers. Runs without a GPU:
triton's bundled ptxas does the work, and its report (`ptxas -v`) gives registers and spills.

The interpreter accepts code the compiler rejects, and a kernel that spills inside a GEMM's
main loop loses more than any tile choice gains, so both are checked here. The launch keywords
(block sizes, num_warps, num_stages, DOT_PRECISION) come from the functions the launchers call
themselves (moe.launch_configs, _checks.row_config, grpo_loss.scale_config,
advantages.launch_config), so this test and the launchers cannot drift apart, and every
top-level @triton.jit kernel of grpo/kernels/ must appear. The integer arguments take the values of
a real launch (Qwen3-30B-A3B's experts and widths that are not multiples of 16, Qwen's
vocabulary and an odd one), so triton specialises them as it does at launch (multiples of 16,
ones) and the unaligned worst case is covered too.

The compile runs in a subprocess with TRITON_INTERPRET unset, a fresh cache (a cached kernel
prints no ptxas report) and TRITON_DUMP_PTXAS_LOG=1; triton is pointed at sm_90 through a
stand-in driver, since this machine has none. `python -m tests.kernels.test_compile` prints the
table of registers and spills.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = ("grpo_loss", "logprobs", "advantages", "moe")
# Qwen3-30B-A3B's experts (hidden 2048, expert width 768, top-8), and widths that are not
# multiples of 16 (triton then cannot prove aligned, vectorisable rows: the worst case).
MOE_SHAPES = ((2048, 768, 8), (2050, 770, 8))
VOCABS = (151936, 50257)  # Qwen's (a multiple of 16) and GPT-2's (odd)
SEQ_LEN = 1024
# The constexpr flag sets of the one-pass GRPO kernel that the tests compile: every flag on
# and off at least once, each policy kind.
GRPO_FLAGS = (
    dict(HAS_OLD=True, HAS_REF=True, HAS_ISR=True, USE_DELTA=True, POLICY=0, BIAS_KL=True,
         ENTROPY_GRAD=True),
    dict(HAS_OLD=False, HAS_REF=True, HAS_ISR=False, USE_DELTA=False, POLICY=1, BIAS_KL=False,
         ENTROPY_GRAD=False),
    dict(HAS_OLD=True, HAS_REF=False, HAS_ISR=True, USE_DELTA=False, POLICY=2, BIAS_KL=True,
         ENTROPY_GRAD=True),
)
_REPORT = re.compile(
    r"Compiling entry function '(?P<name>\w+)'.*?"
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads.*?Used (?P<regs>\d+) registers", re.S)


@dataclass
class Launch:
    label: str
    kernel: Any  # a triton JITFunction
    args: tuple  # MockTensor for tensors, python ints and floats for scalars
    kwargs: dict  # constexprs and launch options, as the launcher passes them


def cuda_launches() -> list[Launch]:
    """Every kernel at every configuration its launcher picks on CUDA, for bf16, fp16 and
    fp32 inputs, with MockTensor stand-ins (16-byte aligned, as torch's allocations are)."""
    import torch
    from triton.runtime.jit import MockTensor

    from grpo.kernels._checks import row_config

    m = {name: importlib.import_module(f"grpo.kernels.{name}") for name in MODULES}
    cuda = torch.device("cuda")
    f32, i32, i64 = torch.float32, torch.int32, torch.int64

    def t(dtype):
        return MockTensor(dtype)

    launches = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        dname = str(dt).removeprefix("torch.")
        for vocab in VOCABS:
            block, warps = row_config(vocab, cuda)
            row = dict(BLOCK_V=block, num_warps=warps)
            strides = (SEQ_LEN * vocab, vocab)
            tag = f"{dname} V={vocab}"
            lp, g = m["logprobs"], m["grpo_loss"]
            launches.append(Launch(f"{tag}", lp._logprobs_kernel, (
                t(dt), t(i64), t(f32), t(f32), t(f32), SEQ_LEN, vocab, *strides, 1.4427),
                dict(WITH_ENTROPY=True, **row)))
            launches.append(Launch(f"{tag}", lp._logprobs_backward_kernel, (
                t(dt), t(dt), t(i64), t(f32), t(f32), t(f32), t(f32), SEQ_LEN, vocab,
                *strides, *strides, 1.4427, 1.0), dict(WITH_ENTROPY=True, **row)))
            for flags in GRPO_FLAGS:
                launches.append(Launch(f"{tag} policy {flags['POLICY']}", g._grpo_token_kernel, (
                    t(dt), t(dt), t(i64), *(t(f32) for _ in range(9)), t(torch.int8), SEQ_LEN,
                    vocab, *strides, *strides, 1.4427, 1.0, 0.04, 0.2, 0.28, 2.0, t(f32), 1.0,
                    1.05), dict(**flags, **row)))
        # The backward's grad_output scaling: logits' gradients, d hidden and d weight rows.
        for width in (*VOCABS, 896, 3584):
            launches.append(Launch(f"{dname} C={width}", g._scale_rows_kernel, (
                t(dt), t(f32), 8192, SEQ_LEN, width, SEQ_LEN * width, width),
                g.scale_config(width, cuda)))
        moe = m["moe"]
        cfg = moe.launch_configs(cuda, dt)
        route = (t(i32), t(i32), t(i32), t(i32))  # order, tile_expert, tile_row, end
        for h, inter, topk in MOE_SHAPES:
            tag = f"{dname} H={h} I={inter}"
            launches += [
                Launch(tag, moe._gate_up_fwd_kernel, (
                    t(dt), t(dt), *route, t(dt), t(dt), h, inter, topk), cfg["gate_up_fwd"]),
                Launch(f"{tag} fwd", moe._rows_scatter_kernel, (
                    t(dt), t(dt), route[0], t(f32), *route[1:], t(dt), inter, h, h * inter, 1,
                    inter), dict(SCALE=True, **cfg["rows_scatter"])),
                Launch(f"{tag} bwd", moe._rows_scatter_kernel, (
                    t(dt), t(dt), route[0], t(f32), *route[1:], t(f32), 2 * inter, h,
                    2 * inter * h, h, 1), dict(SCALE=False, **cfg["rows_scatter"])),
                Launch(tag, moe._act_bwd_kernel, (
                    t(dt), t(dt), t(dt), route[0], t(f32), *route[1:], t(dt), t(f32), h, inter,
                    topk, -(-inter // cfg["act_bwd"]["BLOCK_N"])), cfg["act_bwd"]),
                Launch(tag, moe._down_bwd_kernel, (
                    t(dt), t(dt), t(i32), t(f32), t(i32), t(i32), t(dt), h, inter, topk),
                    cfg["down_bwd"]),
                Launch(tag, moe._gate_up_bwd_kernel, (
                    t(dt), t(dt), t(i32), t(i32), t(i32), t(dt), h, inter, topk),
                    cfg["gate_up_bwd"]),
            ]
    adv = m["advantages"]
    for group_size, cols in ((8, 1), (16, 3)):
        launches.append(Launch(f"G={group_size} R={cols}", adv._group_advantages_kernel, (
            t(f32), t(f32), t(f32), t(f32), t(f32), t(f32), t(f32), group_size, cols, cols, 1,
            1e-4), dict(HAS_WEIGHTS=True, SCALE=1, **adv.launch_config(group_size, cols))))
    return launches


class _Sm90Driver:
    """Enough of a triton driver for `kernel.warmup` to compile for sm_90 without a GPU."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


_REPORTS: dict[int, dict[str, int]] = {}  # id(compiled kernel) -> its ptxas report


def compile_launch(launch: Launch) -> dict[str, Any]:
    """Compile one launch for sm_90; -> its ptxas report (registers, spill bytes, stack)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # triton prints the ptxas log (TRITON_DUMP_PTXAS_LOG)
        compiled = launch.kernel.warmup(*launch.args, grid=(1,), **launch.kwargs)
    name = launch.kernel.fn.__name__
    found = [r for r in _REPORT.finditer(out.getvalue()) if r["name"] == name]
    if not found and id(compiled) in _REPORTS:  # the same specialisation as an earlier launch
        report = _REPORTS[id(compiled)]
    elif len(found) == 1:
        r = found[0]
        report = {"regs": int(r["regs"]), "spill_stores": int(r["stores"]),
                  "spill_loads": int(r["loads"]), "stack": int(r["stack"])}
        _REPORTS[id(compiled)] = report
    else:
        raise RuntimeError(f"{name} {launch.label}: expected one ptxas report, got "
                           f"{len(found)}:\n{out.getvalue()[-2000:]}")
    return {"kernel": name, "config": launch.label, **report}


def _options(kwargs: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_V", "BLOCK_C", "BLOCK_G", "ROWS",
            "num_warps", "num_stages")
    short = {"num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k.removeprefix('BLOCK_'))}={kwargs[k]}" for k in keys
                    if k in kwargs)


def compile_all() -> list[dict[str, Any]]:
    from triton.runtime import driver

    driver.set_active(_Sm90Driver())
    rows = []
    for launch in cuda_launches():
        row = compile_launch(launch)
        row["options"] = _options(launch.kwargs)
        rows.append(row)
    return rows


def jit_kernels() -> set[str]:
    """Names of every top-level @triton.jit kernel (launched, name ending in _kernel)."""
    import triton

    names = set()
    for name in MODULES:
        mod = importlib.import_module(f"grpo.kernels.{name}")
        names |= {k for k, v in vars(mod).items()
                  if isinstance(v, triton.runtime.JITFunction) and k.endswith("_kernel")}
    return names


def main() -> int:
    rows = compile_all()
    print(f"{'kernel':28} {'config':26} {'options':34} regs spill_st spill_ld stack")
    for r in rows:
        print(f"{r['kernel']:28} {r['config']:26} {r['options']:34} {r['regs']:4d} "
              f"{r['spill_stores']:8d} {r['spill_loads']:8d} {r['stack']:5d}")
    missing = jit_kernels() - {r["kernel"] for r in rows}
    if missing:
        print(f"not compiled (add them to cuda_launches): {sorted(missing)}")
        return 1
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    print(f"compiled {len(rows)} kernel configurations for sm_90, {len(spills)} with spills")
    return 1 if spills else 0


def test_kernels_compile_for_sm90_without_spills():
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1",
                   TRITON_DEFAULT_FP_FUSION="1")
        done = subprocess.run([sys.executable, "-m", "tests.kernels.test_compile"], env=env,
                              capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = re.search(r"compiled (\d+) kernel configurations for sm_90, 0 with spills",
                        done.stdout)
    assert summary and int(summary[1]) >= 80, done.stdout[-3000:]


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
