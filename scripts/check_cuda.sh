#!/usr/bin/env bash
# Compile-check the CUDA kernels without a GPU and without a CUDA build of torch: every
# csrc/cuda/*.cu through nvcc -c for sm_80 and sm_90a (the archs setup.py builds by default), with
# the defines torch's cpp_extension passes to nvcc, into a temporary directory. Fails on any error.
# bindings.cpp (the torch glue) needs CUDA torch headers and is built only by setup.py.
#
# nvcc is looked up in $CUDA_HOME/bin, then PATH, then /usr/local/cuda*/bin. Without one the check
# is skipped (exit 0) unless FDIV_REQUIRE_NVCC=1. Jobs: $MAX_JOBS, default the core count.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=""
for cand in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc \
            $(ls -d /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -V -r); do
  if [ -n "$cand" ] && [ -x "$cand" ]; then NVCC="$cand"; break; fi
done
if [ -z "$NVCC" ]; then
  echo "check_cuda: no nvcc found; skipping the CUDA compile check"
  [ "${FDIV_REQUIRE_NVCC:-0}" = "1" ] && exit 1
  exit 0
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
FLAGS=(-c -std=c++17 -O3 -Icsrc -DFDIV_WITH_CUDA
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
       -Werror=all-warnings
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a)
JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
echo "check_cuda: $("$NVCC" --version | tail -n 1) | $JOBS jobs | sm_80 + sm_90a"

start=$(date +%s)
status=0
pids=()
names=()
for src in csrc/cuda/*.cu; do
  name="$(basename "$src" .cu)"
  ( "$NVCC" "${FLAGS[@]}" "$src" -o "$OUT/$name.o" > "$OUT/$name.log" 2>&1 ) &
  pids+=($!)
  names+=("$name")
  # Bound the parallel jobs.
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
done
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "  ok    ${names[$i]}.cu"
  else
    echo "  FAIL  ${names[$i]}.cu"
    cat "$OUT/${names[$i]}.log"
    status=1
  fi
done
echo "check_cuda: $(( $(date +%s) - start )) s, $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
