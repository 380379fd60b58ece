#!/usr/bin/env bash
# On the GPU machine: how often does a test fail? Build each source tree (as scripts/ab.sh
# does: a directory holding an epx source tree, e.g. `git archive REV | tar -x -C t1`; `.` is
# this one) and run the ctest cases matching REGEX N times on each, the trees in turn.
#   scripts/flake.sh N REGEX TREE [TREE...]
# Prints one line per run and a count per tree; the output of every failing run goes to
# $OUT/flake_<tree>_<run>.log (default OUT: flake-out). Exit status 1 when any run failed.
set -uo pipefail
[ $# -ge 3 ] || { sed -n '2,8p' "$0"; exit 2; }
N=$1 REGEX=$2
shift 2
TREES=("$@")
OUT=${OUT:-$PWD/flake-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# shellcheck source=scripts/build-trees.sh
source "$(dirname "$0")/build-trees.sh"
build_trees "${TREES[@]}" || exit 1
declare -A FAILS
rc=0
for ((r = 1; r <= N; r++)); do
    for t in "${TREES[@]}"; do
        name=$(basename "$(cd "$t" && pwd)")
        log="$OUT/flake_${name}_$r.log"
        # A skipped test (no GPU: exit 77) or a regex that matches nothing is no pass.
        if ctest --test-dir "$t/build-gpu" --output-on-failure --no-tests=error -R "$REGEX" --timeout 300 >"$log" 2>&1 &&
            ! grep -qE '\*\*\*Skipped|Not Run' "$log"; then
            echo "run $r $name: passed"
            rm -f "$log"
        else
            echo "run $r $name: FAILED ($(grep -m1 -E '^FAIL|\*\*\*[A-Z]|No tests were found' "$log" | cut -c1-160))"
            FAILS[$name]=$((${FAILS[$name]:-0} + 1))
            rc=1
        fi
    done
done
for t in "${TREES[@]}"; do
    name=$(basename "$(cd "$t" && pwd)")
    echo "$name: ${FAILS[$name]:-0} of $N runs failed"
done
exit $rc
