#!/usr/bin/env bash
# The test command (README): installs everything on a fresh CPU machine, then runs the suite.
# torch is pinned to the CPU build first so nothing below pulls another one; the extension is built
# with --no-build-isolation against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
# A machine that already has torch (e.g. a CUDA build) keeps it.
python -c "import torch" 2>/dev/null || {
    echo "installing torch 2.13.0 (CPU) ..."
    python -m pip install -q "torch==2.13.0"
}
python -m pip install -q "setuptools>=64" wheel ninja
# The C++ build first, with a line per compiled file (a first build takes ~13 minutes on 2 cores);
# the editable install below then finds every object built and only links.
bash scripts/build_ext.sh
echo "installing fdiv-kernels (editable) and its test dependencies ..."
python -m pip install -q --no-build-isolation -e ".[test]"
python -m pip install -q -c scripts/constraints.txt -r scripts/requirements-integrations.txt
python -m fdiv_kernels.info
# Kernels run under the Triton interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1).
python -m pytest tests -q -p no:cacheprovider --durations=25 "$@"
