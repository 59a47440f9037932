#!/usr/bin/env bash
# The main job (README): installs on a fresh machine, then runs the benchmark suite.
# A machine that already has torch (e.g. a CUDA build) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || {
    echo "installing torch 2.13.0 (CPU) ..."
    python -m pip install -q "torch==2.13.0"
}
python -m pip install -q "setuptools>=64" wheel ninja
# The C++ build first, with a line per compiled file (a first build takes ~13 minutes on 2 cores);
# the editable install below then finds every object built and only links.
bash scripts/build_ext.sh
echo "installing fdiv-kernels (editable) and its bench dependencies ..."
python -m pip install -q --no-build-isolation -e ".[bench]"
python -m fdiv_kernels.bench "$@"
