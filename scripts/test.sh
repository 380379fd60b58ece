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

# Python package (python/epx) against build/lib/libepx.so: numpy, several ranks through epx-run.
python_tests() {
    local py
    for py in ${PYTHON:-} python3 /usr/bin/python3; do
        if command -v "$py" >/dev/null && "$py" -c "import numpy" 2>/dev/null; then
            echo "== Python tests ($py)"
            if "$py" -c "import pytest" 2>/dev/null; then
                EPX_BUILD_DIR=build PYTHONPATH=python "$py" -m pytest -q python/tests
            else
                EPX_BUILD_DIR=build PYTHONPATH=python "$py" -m unittest discover -s python/tests -p "test_*.py"
            fi
            return
        fi
    done
    echo "== Python tests skipped: no python3 with numpy (apt-get install python3-numpy python3-pytest)"
}
python_tests
if [ "${EPX_TEST_SANITIZERS:-1}" != 0 ]; then
    echo "== build + tests (AddressSanitizer + UndefinedBehaviorSanitizer)"
    build_and_test build-asan -DCMAKE_BUILD_TYPE=Debug -DEPX_SANITIZE=ON
fi
