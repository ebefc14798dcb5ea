#!/usr/bin/env bash
# GPU check for a lent machine (image: python3 with torch + CUDA nvcc at /usr/local/cuda,
# no network). Run from anywhere inside a copy of the repository:
#
#     bash bench/gpu/check.sh
#
# 1. builds the extension from source with the CUDA kernels (sm_90);
# 2. runs the CUDA cases of the kernel and op-property tests;
# 3. runs the CUDA op-property tests (every op, random shapes, dtypes and strided
#    views) under compute-sanitizer memcheck and racecheck, few examples each,
#    when the tool works;
# 4. bench/gpu/check_kernels.py: every op on CUDA against the CPU op, the machine's
#    copy-bandwidth and torch.mm ceilings, kernel timings against them;
# 5. the CUDA cases of the whole suite, best effort.
#
# Every step has its own time limit and the whole run a budget: a step that would
# start with too little of it left is skipped and marked so. The summary ends with
# a table of the steps (pass / FAIL / timeout / skipped). The summary goes to
# bench/results/gpu_check.txt (check_kernels.py's results to gpu_check.json), and to
# $OUT when set, with the full logs. Without a GPU the build and tests still run
# and check_kernels.py falls back to CPU sizes.
#   SVEN_EXT_CHECK_SANITIZER=0          skip step 3
#   SVEN_EXT_CHECK_BUDGET_S=540         the whole run's budget in seconds
#   SVEN_EXT_CHECK_SANITIZER_EXAMPLES=3 hypothesis examples per test under the sanitizer
set -uo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
results=bench/results
mkdir -p "$results"
log_dir=$(mktemp -d)
summary="$results/gpu_check.txt"
: >"$summary"
status=0
start=$SECONDS
budget=${SVEN_EXT_CHECK_BUDGET_S:-540}
table=()  # "| step | result | seconds |" rows

say() { echo "$*" | tee -a "$summary"; }
step() { say ""; say "== $* ($((SECONDS - start)) s)"; }
# run NAME TIMEOUT CMD...: output to $log_dir/NAME.log, its tail to the summary, a
# row to the table. The limit shrinks to what is left of the budget; with under
# 20 s left the step is skipped (exit 125).
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 20 ]; then
    say "-- $name: skipped, ${left} s of the budget left"
    table+=("| $name | skipped (budget) | 0 |")
    status=1
    return 125
  fi
  [ "$limit" -le "$left" ] || limit=$left
  local rc=0 began=$SECONDS
  timeout "$limit" "$@" >"$log_dir/$name.log" 2>&1 || rc=$?
  tail -n "${TAIL_LINES:-15}" "$log_dir/$name.log" | tee -a "$summary"
  say "-- $name: exit $rc"
  local result=pass
  case $rc in
    0) ;;
    124) result="timeout (${limit} s)" ;;
    *) result="FAIL (exit $rc)" ;;
  esac
  table+=("| $name | $result | $((SECONDS - began)) |")
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}
finish() {
  say ""
  say "| step | result | seconds |"
  say "|---|---|---|"
  local row
  for row in "${table[@]}"; do say "$row"; done
  say ""
  say "== done in $((SECONDS - start)) s, status $status"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$summary" "$OUT/gpu_check.txt"
    [ -f "$results/gpu_check.json" ] && cp "$results/gpu_check.json" "$OUT/gpu_check.json"
    # One archive of the full logs (the summary only keeps their tails).
    tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$log_dir" . 2>/dev/null
  fi
  exit "$status"
}

step "machine"
say "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$summary"
else
  say "nvidia-smi not found"
fi
say "$($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu visible", torch.cuda.is_available())' 2>&1)"
say "nvcc: $(/usr/local/cuda/bin/nvcc --version 2>/dev/null | tail -n 1 || echo missing)"

step "build (setup.py build_ext --inplace, sm_90)"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -x "$CUDA_HOME/bin/nvcc" ]; then export SVEN_EXT_CUDA=1; fi
if ! run build 420 "$PY" setup.py build_ext --inplace; then
  say "build failed: see the build log"
  finish
fi
grep -E "warning" "$log_dir/build.log" | grep -E "csrc/" | head -n 20 | tee -a "$summary"
run import 120 "$PY" -c "import sven_ext; print('sven_ext', sven_ext.__version__, 'CUDA kernels:', sven_ext.WITH_CUDA)"

step "kernel and op-property tests (CUDA cases)"
export PYTHONUNBUFFERED=1
TAIL_LINES=8 run tests_kernels 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_random.py tests/test_gram_kernels.py \
  tests/test_sketch_kernels.py tests/test_subset_kernels.py tests/test_op_properties_*.py -k cuda -rs

# On PATH, or in the toolkit (bin/ or its own folder, depending on the toolkit's packaging).
sanitizer=$(command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" \
  "$CUDA_HOME/compute-sanitizer/compute-sanitizer" 2>/dev/null | head -n 1)
if [ "${SVEN_EXT_CHECK_SANITIZER:-1}" = 1 ] && [ -n "$sanitizer" ] \
  && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  step "compute-sanitizer: CUDA op-property tests"
  # Few examples per test: every launch is instrumented. Only the extension's kernels
  # (namespace sven_ext) are checked; torch's own are left alone, which also saves time.
  # No caching allocator, so an access past a tensor's end is past an allocation's end.
  # memcheck: every CUDA case (the rejections too: a failed check must launch nothing
  # bad); racecheck: the cases that run the shared-memory kernels.
  for tool in memcheck racecheck; do
    select="cuda"
    [ "$tool" = racecheck ] && select="cuda and matches_reference"
    SVEN_EXT_TEST_MAX_EXAMPLES=${SVEN_EXT_CHECK_SANITIZER_EXAMPLES:-3} PYTORCH_NO_CUDA_MEMORY_CACHING=1 TAIL_LINES=6 \
      run "sanitizer_$tool" 150 "$sanitizer" --tool "$tool" --error-exitcode 3 --kernel-name kns=sven_ext \
      "$PY" -m pytest -q -x -p no:cacheprovider tests/test_op_properties_*.py -k "$select"
  done
else
  say "compute-sanitizer: skipped (SVEN_EXT_CHECK_SANITIZER=0, no tool, or no GPU visible)"
  table+=("| sanitizer | skipped (no tool or GPU) | 0 |")
fi

step "CUDA vs CPU, ceilings, kernel timings"
TAIL_LINES=200 run check_kernels 240 "$PY" bench/gpu/check_kernels.py --json "$results/gpu_check.json"

step "whole suite, CUDA cases (best effort)"
TAIL_LINES=8 run tests_all 120 "$PY" -m pytest -q -p no:cacheprovider tests -k cuda --continue-on-collection-errors

finish
