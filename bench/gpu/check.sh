#!/usr/bin/env bash
# GPU check for a lent machine (image: python3 with torch + CUDA nvcc at /usr/local/cuda,
# no network). Run from anywhere inside a copy of the repository:
#
#     bash bench/gpu/check.sh
#
# 1. builds the extension from source with the CUDA kernels (sm_90);
# 2. runs the CUDA cases of the kernel tests (and of the whole suite, best effort);
# 3. bench/gpu/check_kernels.py: every op on CUDA against the CPU op, the machine's
#    copy-bandwidth and torch.mm ceilings, kernel timings against them;
# 4. compute-sanitizer memcheck and racecheck on small Gram and sketch calls, when the tool works.
#
# Prints a short summary; full logs go to bench/results/gpu_check.txt (and
# gpu_check.json), and to $OUT when set. Without a GPU the build and tests still
# run and check_kernels.py falls back to CPU sizes. Target: under 5 minutes.
#   SVEN_EXT_CHECK_SANITIZER=0   skip step 4
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

say() { echo "$*" | tee -a "$summary"; }
step() { say ""; say "== $* ($((SECONDS - start)) s)"; }
# run NAME TIMEOUT CMD...: output to $log_dir/NAME.log, its tail to the summary.
run() {
  local name=$1 limit=$2
  shift 2
  local rc=0
  timeout "$limit" "$@" >"$log_dir/$name.log" 2>&1 || rc=$?
  tail -n "${TAIL_LINES:-15}" "$log_dir/$name.log" | tee -a "$summary"
  say "-- $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}
finish() {
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

step "kernel tests (CUDA cases)"
export PYTHONUNBUFFERED=1
TAIL_LINES=8 run tests_kernels 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_random.py tests/test_gram_kernels.py \
  tests/test_sketch_kernels.py -k cuda -rs
step "whole suite, CUDA cases (best effort)"
TAIL_LINES=8 run tests_all 120 "$PY" -m pytest -q -p no:cacheprovider tests -k cuda --continue-on-collection-errors

step "CUDA vs CPU, ceilings, kernel timings"
TAIL_LINES=200 run check_kernels 300 "$PY" bench/gpu/check_kernels.py --json "$results/gpu_check.json"

if [ "${SVEN_EXT_CHECK_SANITIZER:-1}" = 1 ] && command -v compute-sanitizer >/dev/null 2>&1 \
  && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  step "compute-sanitizer on small Gram calls"
  small='import torch, sven_ext
from sven_ext import ops
for b, t, da, dd in [(3, 5, 7, 9), (70, 1, 3, 2), (2, 70, 3, 17)]:
    a = torch.randn(b, t, da, device="cuda"); d = torch.randn(b, t, dd, device="cuda")
    i = torch.randint(0, 3, (b, t), device="cuda")
    ops.seq_gram(a, d); ops.seq_gram(a.double(), d.double()); ops.embedding_gram(i, d)
torch.cuda.synchronize(); print("sanitized calls done")'
  for tool in memcheck racecheck; do
    # No caching allocator, so an access past a tensor's end is past an allocation's end.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 TAIL_LINES=6 run "sanitizer_$tool" 240 compute-sanitizer --tool "$tool" \
      --error-exitcode 3 --kernel-name kns=gram_kernel "$PY" -c "$small"
  done
  step "compute-sanitizer on small sketch calls"
  small_sketch='import torch, sven_ext
from sven_ext import ops
for r, t, din, dout, cols in [(3, 2, 5, 7, 9), (70, 1, 9, 30, 40), (130, 2, 13, 11, 65)]:
    a = torch.randn(r, t, din, device="cuda"); d = torch.randn(r, t, dout, device="cuda")
    z = torch.randn(dout, din, cols, device="cuda")
    ops.linear_sketch(a, d, seed=1, stream=2, cols=cols); ops.linear_project(a.double(), d.double(), z.double())
torch.cuda.synchronize(); print("sanitized calls done")'
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 TAIL_LINES=6 run "sanitizer_sketch_$tool" 180 compute-sanitizer --tool "$tool" \
      --error-exitcode 3 --kernel-name kns=sketch_kernel "$PY" -c "$small_sketch"
  done
fi

finish
