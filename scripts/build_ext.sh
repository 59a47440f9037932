#!/usr/bin/env bash
# Builds the C++ extension fdiv_kernels._C in place, printing one line per compiled file with the
# time so far, so that a first build (about 10 files, 13 minutes on 2 cores) is not a silent wait.
# Objects persist in build/temp.* (setup.py): a rebuild compiles only what changed, and the
# editable install and the wheel that follow reuse them. The full compiler output goes to
# build/build_ext.log and is shown when the build fails.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
log=build/build_ext.log
echo "building the C++ extension: about 10 files, 13 minutes on 2 cores the first time, seconds" \
     "when nothing changed (log: $log)"
start=$SECONDS
# ninja prints "[k/N] <command>" per step; keep the counter and the source file.
python setup.py build_ext --inplace > >(tee "$log" | while IFS= read -r line; do
    if [[ $line =~ ^\[([0-9]+/[0-9]+)\].*-c[[:space:]]+([^[:space:]]*/)?(csrc/[^[:space:]]+\.(cpp|cu)) ]]; then
        printf '  [%s] %s done (%d s)\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[3]}" $((SECONDS - start))
    fi
done) 2>&1
rc=$?
wait  # the progress filter
if [ "$rc" -ne 0 ]; then
    echo "the C++ build failed (exit $rc); the end of $log:"
    tail -n 60 "$log"
    exit "$rc"
fi
echo "C++ extension built in $((SECONDS - start)) s"
