#!/usr/bin/env bash
# Build epx and pass every test:
#   1. Release build + the whole suite, then the Python suite (again with ml_dtypes from pip
#      when it can be fetched; EPX_TEST_ML_DTYPES=0 skips that run)
#   2. AddressSanitizer + UndefinedBehaviorSanitizer build + the suite (large cases left out)
#   3. ThreadSanitizer build (clang when present) + the CPU suite (large and 8-rank cases
#      left out)
#   4. libFuzzer targets, EPX_FUZZ_SECONDS each (default 60; needs clang)
#   5. valgrind memcheck on small multi-rank runs of the Release build (when installed)
# EPX_TEST_SANITIZERS=0 skips 2, EPX_TEST_TSAN=0 skips 3, EPX_TEST_FUZZ=0 skips 4,
# EPX_TEST_VALGRIND=0 skips 5. GPU tests run only where a GPU is present; elsewhere they
# are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}
have() { command -v "$1" >/dev/null 2>&1; }

build_and_test() { # dir, cmake args... [-- ctest args...]; ctest runs under $RUN_PREFIX
    local dir=$1
    shift
    local cargs=() targs=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do cargs+=("$1"); shift; done
    [ $# -gt 0 ] && shift && targs=("$@")
    cmake -S . -B "$dir" "${cargs[@]}" >/dev/null
    cmake --build "$dir" -j "$JOBS"
    ${RUN_PREFIX:-} ctest --test-dir "$dir" --output-on-failure -j "${CTEST_JOBS:-1}" "${targs[@]}"
}

stage() { echo "== $* ($(date +%T))"; }

stage "build + tests (Release)"
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
# Again where ml_dtypes is installed (epx's bf16 and fp8 numpy outputs then have its dtypes,
# not raw bits), in a venv over the system's packages (pip may bring a newer numpy into it).
# Skipped, saying so, when pip cannot fetch it (no network) or EPX_TEST_ML_DTYPES=0.
python_tests_ml_dtypes() {
    local venv=build/venv-ml-dtypes
    if [ "${EPX_TEST_ML_DTYPES:-1}" = 0 ] || ! /usr/bin/python3 -c "import numpy, pytest" 2>/dev/null; then
        echo "== Python tests with ml_dtypes skipped (EPX_TEST_ML_DTYPES=0, or no /usr/bin/python3 with numpy and pytest)"
        return
    fi
    if ! { [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"; } >/dev/null 2>&1 ||
        ! timeout 300 "$venv/bin/python" -m pip install -q --retries 1 --timeout 20 ml_dtypes >/dev/null 2>&1; then
        echo "== Python tests with ml_dtypes skipped: no venv (apt-get install python3-venv) or pip could not fetch ml_dtypes"
        return
    fi
    echo "== Python tests with ml_dtypes ($("$venv/bin/python" -c 'import ml_dtypes, numpy; print("ml_dtypes", ml_dtypes.__version__, "numpy", numpy.__version__)'))"
    EPX_BUILD_DIR=build PYTHONPATH=python "$venv/bin/python" -m pytest -q python/tests
}
python_tests_ml_dtypes
if [ "${EPX_TEST_SANITIZERS:-1}" != 0 ]; then
    stage "build + tests (AddressSanitizer + UndefinedBehaviorSanitizer)"
    # With the low-latency kernels' timing probe (src/cuda/probe.cuh) compiled in, so that
    # measuring build keeps compiling; it only adds block barriers and timestamps. The
    # *_large cases (the same code at larger sizes; stage 1 runs them) are left out: on 2
    # cores they took 2 of this stage's 7 minutes.
    build_and_test build-asan -DCMAKE_BUILD_TYPE=Debug -DEPX_SANITIZE=ON -DEPX_LL_PROBE=ON -- -E '_large$'
fi
if [ "${EPX_TEST_TSAN:-1}" != 0 ]; then
    stage "build + CPU tests (ThreadSanitizer)"
    tsan_cc=cc
    have clang && tsan_cc=clang
    # TSan sees races between the threads of one process (the ranks are processes): the
    # 8-rank cases add nothing the 2-5-rank ones do not, and took 1.5 minutes on 2 cores.
    # Without address randomisation where setarch can turn it off: TSan's runtime crashed
    # now and then at start-up on this kernel's layout (28 random mmap bits).
    tsan_prefix=
    setarch "$(uname -m)" -R true 2>/dev/null && tsan_prefix="setarch $(uname -m) -R"
    RUN_PREFIX=$tsan_prefix CC=$tsan_cc build_and_test build-tsan -DCMAKE_BUILD_TYPE=Debug -DEPX_TSAN=ON -DEPX_WITH_CUDA=OFF \
        -- -LE cuda -E '_large$|_np8$'
fi
if [ "${EPX_TEST_FUZZ:-1}" != 0 ]; then
    stage "fuzz (${EPX_FUZZ_SECONDS:-60} s per target)"
    if have clang; then
        ./scripts/fuzz.sh
    else
        echo "fuzz: SKIPPED: clang is not installed (apt-get install clang)"
    fi
fi
if [ "${EPX_TEST_VALGRIND:-1}" != 0 ]; then
    stage "valgrind memcheck"
    ./scripts/valgrind.sh build
fi
stage "all passed"
