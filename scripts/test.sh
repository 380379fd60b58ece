#!/usr/bin/env bash
# Build epx and pass every test: the normal build, then the same suite under
# AddressSanitizer + UndefinedBehaviorSanitizer (EPX_TEST_SANITIZERS=0 skips that part).
# GPU tests run only where a GPU is present; elsewhere they are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}

build_and_test() { # dir, cmake args...
    local dir=$1
    shift
    cmake -S . -B "$dir" "$@" >/dev/null
    cmake --build "$dir" -j "$JOBS"
    ctest --test-dir "$dir" --output-on-failure -j "${CTEST_JOBS:-1}"
}

echo "== build + tests (Release)"
build_and_test build -DCMAKE_BUILD_TYPE=Release
if [ "${EPX_TEST_SANITIZERS:-1}" != 0 ]; then
    echo "== build + tests (AddressSanitizer + UndefinedBehaviorSanitizer)"
    build_and_test build-asan -DCMAKE_BUILD_TYPE=Debug -DEPX_SANITIZE=ON
fi
