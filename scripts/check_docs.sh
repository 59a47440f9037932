#!/usr/bin/env bash
# CI: the documentation site builds with no warning (mkdocs build --strict: broken links, pages
# missing from the nav, docstrings that do not parse). The pages' Python blocks are executed by
# tests/test_docs.py. Run after scripts/test.sh (the package is installed); installs the [docs]
# extra's requirements with the constraints file, so no other torch is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
mapfile -t reqs < <(python - <<'PY'
import importlib.metadata as m
for r in m.requires("fdiv-kernels") or []:
    if 'extra == "docs"' in r:
        print(r.split(";")[0].strip())
PY
)
if [ "${#reqs[@]}" -eq 0 ]; then
    echo "the installed fdiv-kernels has no [docs] extra: run scripts/test.sh first" >&2
    exit 1
fi
python -m pip install -q -c scripts/constraints.txt "${reqs[@]}"
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --site-dir build/site
echo "documentation built in $((SECONDS - start)) s (build/site)"
