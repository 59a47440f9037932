#!/usr/bin/env bash
# One command for a lent GPU (H100/H200; GPU time comes in short windows): every answer from one
# run, within 8 minutes.
#   1 build      the CUDA extension for this GPU's arch (TORCH_CUDA_ARCH_LIST, e.g. 9.0a)
#   2 tests      tests/test_gpu.py with compiled Triton (TRITON_INTERPRET=0)
#   3 memcheck   compute-sanitizer --tool memcheck on scripts/sanitize_cuda_calls.py
#   4 racecheck  compute-sanitizer --tool racecheck on the same calls
#   5 bench      bf16, N = 8192, V in {32000, 128256, 262144}, every backend and installed peer
#                -> bench/results/<date>-<gpu>.{json,md} (device name and versions inside)
# Each step has its own `timeout` (seconds below; 470 s in all), prints its progress, and a failing
# step does not stop the next. A summary of every step comes last.
#
# Exit status: 0 when every step passed or was skipped because there is no GPU (a CPU machine:
# every step says "no GPU"), 1 when any step failed or timed out. Logs: $GPU_CHECK_LOGS (default
# a fresh temporary directory, printed).
set -uo pipefail
cd "$(dirname "$0")/.."

T_BUILD=${T_BUILD:-150} T_TESTS=${T_TESTS:-150} T_SAN=${T_SAN:-40} T_BENCH=${T_BENCH:-90}
LOGS="${GPU_CHECK_LOGS:-$(mktemp -d)}"
mkdir -p "$LOGS"
# Triton compiles each kernel variant on first launch; one cache for every step.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$LOGS/triton-cache}"
export TRITON_DEFAULT_FP_FUSION=1
declare -a SUMMARY=()
status=0
start=$(date +%s)

cap=""
if command -v nvidia-smi >/dev/null 2>&1; then
  cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')"
fi
gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
echo "gpu_check: ${gpu_name:-no GPU} (compute capability ${cap:-none}); logs in $LOGS"

# step NAME SECONDS COMMAND...: run with a timeout, log to $LOGS/NAME.log (tail shown), record.
step() {
  local name="$1" secs="$2"; shift 2
  local t0=$(date +%s)
  echo "== $name (timeout ${secs}s): $*"
  if [ -z "$cap" ]; then
    echo "   no GPU: skipped"
    SUMMARY+=("$name: skipped (no GPU)")
    return 0
  fi
  timeout --kill-after=10 "$secs" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$LOGS/$name.log" | sed 's/^/   /'
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    SUMMARY+=("$name: ok (${dt}s)")
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    SUMMARY+=("$name: TIMEOUT after ${secs}s (log $LOGS/$name.log)"); status=1
  else
    SUMMARY+=("$name: FAILED rc=$rc (${dt}s, log $LOGS/$name.log)"); status=1
  fi
}

arch=""
[ -n "$cap" ] && arch="$cap" && case "$cap" in 9.0|10.0|10.3|12.0) arch="${cap}a" ;; esac

# Then fdiv_kernels.info: what was built and what each backend can do on this machine.
step build "$T_BUILD" bash -c "TORCH_CUDA_ARCH_LIST='$arch' MAX_JOBS=$(nproc) \
  python -m pip install -q --no-build-isolation -e . && python -m fdiv_kernels.info"
step tests "$T_TESTS" env TRITON_INTERPRET=0 python -m pytest tests/test_gpu.py -q -rf \
  -p no:cacheprovider
SAN=""
for cand in "$(command -v compute-sanitizer || true)" /usr/local/cuda/bin/compute-sanitizer \
            /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then SAN="$cand"; break; fi
done
if [ -z "$SAN" ] && [ -n "$cap" ]; then
  echo "== memcheck / racecheck: compute-sanitizer not found"
  SUMMARY+=("memcheck: FAILED (compute-sanitizer not found)" "racecheck: FAILED (not found)")
  status=1
else
  for tool in memcheck racecheck; do
    step "$tool" "$T_SAN" "$SAN" --tool "$tool" --error-exitcode 3 \
      python scripts/sanitize_cuda_calls.py
  done
fi
slug="$(echo "${gpu_name:-gpu}" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')"
out="bench/results/$(date -u +%Y-%m-%d)-${slug}"
step bench "$T_BENCH" bash -c "python -m fdiv_kernels.bench --device cuda --dtype bfloat16 \
  --ops divergence,softmax_stats --shapes 8192x32000 8192x128256 8192x262144 \
  --json '$out.json' > '$out.md'"

echo
echo "gpu_check summary ($(( $(date +%s) - start )) s):"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
[ -n "$cap" ] && [ -f "$out.json" ] && echo "  results: $out.json, $out.md"
exit $status
