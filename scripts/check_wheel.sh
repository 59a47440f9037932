#!/usr/bin/env bash
# CI: the package as a user installs it. Builds a wheel and an sdist, checks the sdist's file list,
# installs the wheel into a fresh virtual environment outside the tree and runs a smoke test
# there (scripts/smoke_installed.py), so a file missing from the package fails CI.
# Run after scripts/test.sh: the wheel reuses the C++ objects that build left in build/temp.*
# (a build from the sdist would recompile everything, ~13 minutes: only its file list is checked).
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(pwd)
start=$SECONDS
python -m pip install -q build
mkdir -p build
rm -rf dist
python -m build --no-isolation --wheel --outdir dist . > build/wheel.log 2>&1 \
    || { tail -n 40 build/wheel.log; exit 1; }
python -m build --no-isolation --sdist --outdir dist . > build/sdist.log 2>&1 \
    || { tail -n 40 build/sdist.log; exit 1; }
wheel=$(ls dist/*.whl)
sdist=$(ls dist/*.tar.gz)
echo "built $wheel and $sdist ($((SECONDS - start)) s)"

# The sdist must hold what a build from it needs.
python - "$sdist" <<'PY'
import sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
need = ["setup.py", "pyproject.toml", "README.md", "csrc/ops.cpp", "csrc/common/ids.h",
        "csrc/common/divergence_terms.h", "triton_kernels/ids.py", "fdiv_kernels/__init__.py"]
need += ["csrc/cuda/bindings.cpp", "scripts/constraints.txt", "CHANGELOG.md"]
missing = [n for n in need if n not in names]
for kind, ext in (("C++ sources", ".cpp"), ("headers", ".h"), ("CUDA sources", ".cu"),
                  ("Triton kernels", ".py")):
    if not any(n.endswith(ext) and n.startswith(("csrc/", "triton_kernels/")) for n in names):
        missing.append(f"any {kind}")
if missing:
    sys.exit(f"the sdist lacks {missing}")
print(f"sdist: {len(names)} files, the C++ sources and headers, CUDA sources, Triton kernels")
PY

# The wheel holds the product only: the package (with its C++ extension and Triton kernels), no
# developer tooling (tools/: the Triton compile checker, the spot-check and bench scripts).
python - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
tooling = [n for n in names if "triton_compile_check" in n or n.startswith("tools/")]
need = ["fdiv_kernels/core/_ops.py", "fdiv_kernels/fused_linear/_engine.py",
        "fdiv_kernels/triton_kernels/divergence.py"]
missing = [n for n in need if n not in names]
if tops != {"fdiv_kernels"} or tooling or missing or not any(n.endswith(".so") for n in names):
    sys.exit(f"wheel content: top-level {sorted(tops)}, tooling {tooling}, missing {missing}")
print(f"wheel: {len(names)} files, only fdiv_kernels (with _C and triton_kernels), no tooling")
PY

# A clean environment outside the tree; --system-site-packages keeps the installed torch (and the
# test tools) instead of downloading another, and the wheel goes in without dependencies.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --force-reinstall "$tree/$wheel"
# From outside the tree, without PYTHONPATH: the tree's fdiv_kernels must not be what imports
# (the smoke test checks the imported path).
(cd "$work" && env -u PYTHONPATH FDIV_SOURCE_TREE="$tree" "$work/venv/bin/python" \
    "$tree/scripts/smoke_installed.py")
echo "wheel check passed in $((SECONDS - start)) s"
