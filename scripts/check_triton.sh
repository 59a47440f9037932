#!/usr/bin/env bash
# Compile every launched Triton kernel variant with Triton's real compiler for sm_80 and sm_90a,
# no GPU needed (the interpreter, which runs the tests, accepts code the compiler rejects). What is
# compiled, and why a covering subset in CI, is in tools/triton_compile_check.py. Fails on
# a compile error, a kernel no launcher reaches, or a spill not allowed there. Needs the package
# importable (after `pip install -e .`, as scripts/test.sh does). Extra arguments go to the checker
# (--all, --json PATH, --md PATH, --list).
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
# A fresh cache, so every variant is really compiled (and timed), unless the caller keeps one.
if [ -z "${TRITON_CACHE_DIR:-}" ]; then
  TRITON_CACHE_DIR="$(mktemp -d)"
  export TRITON_CACHE_DIR
  trap 'rm -rf "$TRITON_CACHE_DIR"' EXIT
fi
python tools/triton_compile_check.py --jobs 2 "$@"
