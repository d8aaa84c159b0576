#!/usr/bin/env bash
# The whole GPU proof (issue 15) in one command, sized for one 10-minute device call:
#
#   bash benchmarks/gpu_checks.sh [--wheels DIR] [--budget SECONDS] [STAGE ...]
#   bash benchmarks/gpu_checks.sh --cpu-smoke      # the same script on tiny shapes, on a CPU
#
# Stages, run in this order; no STAGE runs tests, kernels and step, then summary:
#   tests    the kernel tests on CUDA (values and gradients against the reference, bf16 and
#            fp32; T = 131,072 rows and V = 151,936 among them), then the other gpu-marked tests
#   kernels  python -m benchmarks.proof kernels: grpo_loss (token and sequence level),
#            token_logprobs, linear_grpo_loss, moe_experts against Liger, transformers'
#            grouped_mm, the GEMMs alone and the clone floor, in one process
#   step     bench_step on Qwen2.5-0.5B's shapes (16 prompts x 8, 256 new tokens, mu 2, beta
#            0.04): TRL's GRPOTrainer and ours, then ours with the fused lm_head off
#   summary  python -m benchmarks.proof summary: every target as a ratio of this run
#   load     bench_load on CUDA (not in the default run)
#   packing  bench_step with long-tailed completion lengths (issue 18): ours packed against
#            ours padded, seconds per phase and peak memory (not in the default run)
# Each stage has a time limit (LIMIT below: 130 + 160 + 200 s) and the run a budget (--budget,
# default 540 s = 9 minutes): a stage gets at most what is left, keeping SUMMARY_RESERVE for the
# summary, and a stage that would get less than MIN_STAGE is skipped with a line saying so. A
# stage at its limit is interrupted (SIGINT: pytest writes its report, the benchmarks keep the
# rows they finished) and the next one starts.
#
# --wheels DIR installs the carried peer wheels (liger-kernel, trl and what they need) with
# pip --no-index --find-links DIR, torch, triton and transformers pinned to what is there; a
# peer that is absent afterwards is skipped with one line (its providers print a note).
# Every CSV row gets the GPU name, torch and triton versions, the git sha (GIT_SHA, or git's)
# and this run's id (GPU_CHECKS_RUN) in benchmarks/results/ (--cpu-smoke: a scratch folder).
# Three files go to $OUT when set, else to /tmp/gpu-checks-<run>: gpu-checks.log (the console),
# summary.txt and gpu-checks.tgz (every stage's log and test report, and the results CSVs).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET=540
SUMMARY_RESERVE=25
MIN_STAGE=30
declare -A LIMIT=([tests]=130 [kernels]=160 [step]=200 [load]=240 [packing]=200)
smoke=0
wheels=""
stages=()
while (($#)); do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --wheels) wheels=${2:?--wheels needs a folder}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    tests | kernels | step | load | packing | summary) stages+=("$1") ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--cpu-smoke] [--wheels DIR] [--budget S] [tests|kernels|step|load|packing|summary ...]" >&2
       exit 2 ;;
  esac
  shift
done
((${#stages[@]})) || stages=(tests kernels step)

export PYTHONUNBUFFERED=1
export GPU_CHECKS_RUN=${GPU_CHECKS_RUN:-$(date -u +%Y%m%dT%H%M%SZ)}
export GIT_SHA=${GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
out=${OUT:-/tmp/gpu-checks-$GPU_CHECKS_RUN}
scratch=$(mktemp -d /tmp/gpu-checks.XXXXXX)
logs="$scratch/logs"
mkdir -p "$out" "$logs"
if ((smoke)); then
  # Tiny shapes in the Triton interpreter, rows into a scratch folder, not benchmarks/results.
  export BENCH_RESULTS_DIR=${BENCH_RESULTS_DIR:-$scratch/results}
  export TRITON_INTERPRET=1
  LIMIT=([tests]=60 [kernels]=120 [step]=120 [load]=120 [packing]=120)
fi
results=${BENCH_RESULTS_DIR:-benchmarks/results}
mkdir -p "$results"
start=$SECONDS
status=0

left() { echo $((BUDGET - (SECONDS - start))); }

# run_stage NAME COMMAND...: the command under the stage's limit (SIGINT first, so pytest
# writes its report and the benchmarks keep the rows they finished), its output in the log.
run_stage() {
  local name=$1 limit=${LIMIT[$1]:-120}
  shift
  local room=$(($(left) - SUMMARY_RESERVE))
  ((room < limit)) && limit=$room
  if ((limit < MIN_STAGE)); then
    echo "=== $name: skipped, ${room}s of the ${BUDGET}s budget left"
    return 0
  fi
  echo "=== $name (limit ${limit}s, $(($(left)))s of the budget left): $*"
  local t0=$SECONDS rc
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$logs/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0))
  case $rc in
    0) echo "=== $name: done in ${took}s" ;;
    124 | 130 | 137) echo "=== $name: stopped at its ${limit}s limit (after ${took}s)"; status=1 ;;
    *) echo "=== $name: exit $rc after ${took}s"; status=1 ;;
  esac
  echo "$name $rc $took" >>"$logs/stages.txt"
}

install_peers() {
  if [[ ! -d $wheels ]]; then
    echo "peers: --wheels $wheels is not a folder: nothing installed"
    return
  fi
  local pins="$logs/pins.txt"
  "$PY" -c 'import torch, triton, transformers as t
print(f"torch=={torch.__version__}\ntriton=={triton.__version__}\ntransformers=={t.__version__}")' >"$pins"
  for peer in liger-kernel trl; do
    if "$PY" -m pip install -q --no-index --find-links "$wheels" -c "$pins" "$peer" \
        >>"$logs/wheels.log" 2>&1; then
      echo "peer $peer: installed from $wheels"
    else
      echo "peer $peer: not installed from $wheels (logs/wheels.log)"
    fi
  done
}

report_peers() {
  local module peer version
  for peer in liger-kernel:liger_kernel trl:trl; do
    module=${peer#*:}
    if version=$("$PY" -c "import importlib.metadata as m, $module; print(m.version('${peer%%:*}'))" 2>/dev/null); then
      echo "peer ${peer%%:*} $version: present"
    else
      echo "peer ${peer%%:*}: absent, its providers are skipped"
    fi
  done
}

stage_tests() {
  if ((smoke)); then  # the pipeline only: the CUDA cases skip on a CPU
    run_stage tests "$PY" -m pytest -q -p no:cacheprovider -rfE --junitxml="$logs/tests.xml" \
      -m gpu tests/kernels/test_validation.py tests/kernels/test_grpo_loss.py
    return
  fi
  # The kernels against their references on CUDA (their gpu-marked cases included), then the
  # other gpu-marked tests; in parallel where pytest-xdist is there (compiles dominate).
  local par=""
  "$PY" -c "import xdist" 2>/dev/null && par="-n 8"
  run_stage tests bash -c "rc=0; '$PY' -m pytest -q -p no:cacheprovider -rfE $par \
      --junitxml='$logs/tests.xml' tests/kernels/test_grpo_loss.py \
      tests/kernels/test_logprobs.py tests/kernels/test_linear_grpo_loss.py \
      tests/kernels/test_moe.py tests/kernels/test_advantages.py \
      tests/kernels/test_validation.py || rc=1; \
    '$PY' -m pytest -q -p no:cacheprovider -rfE $par --junitxml='$logs/tests-gpu.xml' \
      -m gpu tests/models tests/grpo || rc=1; exit \$rc"
}

stage_kernels() {
  if ((smoke)); then
    run_stage kernels "$PY" -m benchmarks.proof kernels --smoke --warmup 1 --rep 1
  else
    run_stage kernels "$PY" -m benchmarks.proof kernels
  fi
}

stage_step() {
  # TRL's GRPOTrainer (first: its time is bounded) and ours with the trainer's defaults, 2
  # measured rounds after 1 warm-up each, then ours with the lm_head outside the loss for its
  # peak memory (1 round, no compiled decoding). Each row is saved as soon as it is measured.
  if ((smoke)); then  # one process: no compiled decoding on a CPU anyway
    run_stage step "$PY" -m benchmarks.bench_step --tiny --save --model dense \
      --providers ours,trl,ours-logits --warmup 0 --steps 1
  else
    run_stage step bash -c "'$PY' -m benchmarks.bench_step --model dense --providers trl,ours \
      --warmup 1 --steps 2 && '$PY' -m benchmarks.bench_step --model dense \
      --providers ours-logits --no-compile-generation --warmup 0 --steps 1"
  fi
}

stage_packing() {
  # EOS with a long tail (each completion cut to a log-normal length, median 32 of 256), the
  # trainer's defaults packed (flash-attention's varlen kernel, else sdpa per sequence) and
  # padded, each in its own process, 1 warm-up and 2 measured steps.
  if ((smoke)); then
    run_stage packing "$PY" -m benchmarks.bench_step --tiny --save --model dense \
      --providers ours,ours-padded --lengths lognormal --tokens 32 --warmup 0 --steps 1
  else
    run_stage packing "$PY" -m benchmarks.bench_step --model dense --providers ours,ours-padded \
      --lengths lognormal --warmup 1 --steps 2
  fi
}

main() {
  echo "GPU proof run $GPU_CHECKS_RUN, git $GIT_SHA, budget ${BUDGET}s, stages: ${stages[*]}"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "no nvidia-smi: no GPU here"
  fi
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  [[ -n $wheels ]] && install_peers
  report_peers
  for stage in "${stages[@]}"; do
    case $stage in
      tests) stage_tests ;;
      kernels) stage_kernels ;;
      step) stage_step ;;
      load) run_stage load "$PY" -m benchmarks.bench_load --device cuda ;;
      packing) stage_packing ;;
    esac
  done
  local flags=(--logs "$logs")
  ((smoke)) && flags+=(--smoke)
  "$PY" -m benchmarks.proof summary "${flags[@]}" | tee "$out/summary.txt"
  ((PIPESTATUS[0] == 0)) || status=1
  local res
  res=$(cd "$results" && pwd)
  tar czf "$out/gpu-checks.tgz" -C "$scratch" logs -C "$(dirname "$res")" "$(basename "$res")"
  echo "total $((SECONDS - start))s; gpu-checks.log, summary.txt and gpu-checks.tgz in $out"
  return "$status"
}

main 2>&1 | tee "$out/gpu-checks.log"
status=${PIPESTATUS[0]}
rm -rf "$scratch"
exit "$status"
