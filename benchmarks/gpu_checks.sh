#!/usr/bin/env bash
# The checks that need a GPU, in stages that each fit one 10-minute device call:
#   bash benchmarks/gpu_checks.sh tests     # every test on the GPU, the gpu-marked ones included
#   bash benchmarks/gpu_checks.sh kernels   # kernel benchmarks (vs eager, torch.compile, Liger)
#   bash benchmarks/gpu_checks.sh step      # bench_step: a full GRPO step, ours vs TRL
#   bash benchmarks/gpu_checks.sh load      # bench_load on CUDA
# Peers (liger-kernel, trl) are used when importable: on a machine without the internet,
# install their wheels first (see the device tool's README). Results are appended to
# benchmarks/results/*.csv with the GPU name and git sha; logs and a tarball of results/ go
# to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, \
transformers.__version__)" | tee -a "$out/gpu.txt"
case "${1:-}" in
  tests)
    python -m pytest -q -x tests 2>&1 | tee "$out/tests.log"
    ;;
  kernels)
    for cmd in "bench_grpo_loss --beta 0.04 --bias-correction-kl on,off" \
               "bench_grpo_loss --importance-level sequence" \
               "bench_logprobs" "bench_advantages" "bench_moe" "bench_linear_grpo_loss"; do
      # shellcheck disable=SC2086
      python -m benchmarks.$cmd 2>&1 | tee -a "$out/kernels.log"
    done
    ;;
  step)
    python -m benchmarks.bench_step --providers ours,ours-logits,trl 2>&1 | tee "$out/step.log"
    ;;
  load)
    python -m benchmarks.bench_load --device cuda 2>&1 | tee "$out/load.log"
    ;;
  *)
    echo "usage: $0 tests|kernels|step|load" >&2
    exit 2
    ;;
esac
tar czf "$out/results.tgz" benchmarks/results  # one file: the device tool returns few
