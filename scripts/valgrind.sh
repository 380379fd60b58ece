#!/usr/bin/env bash
# valgrind memcheck on small multi-rank CPU runs: no memory errors and no leaks (definite,
# indirect or possible) in any rank. Skipped, saying so, where valgrind is not installed.
#   usage: scripts/valgrind.sh [BUILD_DIR]   (default build; a normal, uninstrumented build)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
if ! command -v valgrind >/dev/null 2>&1; then
    echo "valgrind.sh: SKIPPED: valgrind is not installed (apt-get install valgrind)"
    exit 0
fi
VG=(valgrind -q --leak-check=full --show-leak-kinds=definite,indirect,possible
    --errors-for-leak-kinds=definite,indirect,possible --error-exitcode=99)
run() { # nranks, program args...
    local n=$1
    shift
    echo "== valgrind: $n ranks: $*"
    local start=$SECONDS
    "$BUILD/bin/epx-run" -n "$n" --timeout 600 -- "${VG[@]}" "$BUILD/bin/$@"
    echo "   ($((SECONDS - start)) s)"
}
run 2 test_alltoall
run 3 test_badargs
run 2 test_moe --random 5
run 3 test_soak --iters 100 --seed 7
echo "valgrind: no errors, no leaks"
