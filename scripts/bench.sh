#!/usr/bin/env bash
# The main job (README): installs on a fresh machine, then runs the benchmark suite.
# A machine that already has torch (e.g. a CUDA build) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q "setuptools>=64" wheel ninja
python -m pip install -q --no-build-isolation -e ".[bench]"
python -m fdiv_kernels.bench "$@"
