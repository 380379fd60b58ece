#!/usr/bin/env bash
# Build the libFuzzer targets (tests/fuzz) with clang and run each for a bounded time,
# starting from the seed corpora in tests/fuzz/corpus/<target>/ (read only; new inputs go
# to the build folder). Fails when a target finds anything (crash, sanitizer report,
# mismatch with its reference, timeout, leak) and prints the executions each one reached.
#
#   EPX_FUZZ_SECONDS   seconds per target (default 60)
#   EPX_FUZZ_TARGETS   targets to run (default: all three)
#   EPX_FUZZ_BUILD     build folder (default build-fuzz)
#   CC                 the clang to use (default clang)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${EPX_FUZZ_SECONDS:-60}
TARGETS=${EPX_FUZZ_TARGETS:-"fuzz_moe_args fuzz_layout fuzz_unique_id"}
BUILD=${EPX_FUZZ_BUILD:-build-fuzz}
JOBS=${JOBS:-$(nproc)}
CLANG=${CC:-clang}
case "$("$CLANG" --version 2>/dev/null | head -1)" in
*clang*) ;;
*) echo "fuzz.sh: needs clang with libFuzzer (CC=$CLANG is not clang)" >&2; exit 1 ;;
esac

CC=$CLANG cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEPX_FUZZ=ON -DEPX_WITH_CUDA=OFF \
    -DEPX_WITH_MPI=OFF -DBUILD_TESTING=OFF >/dev/null
# shellcheck disable=SC2086
cmake --build "$BUILD" -j "$JOBS" --target $TARGETS

summary=""
status=0
for t in $TARGETS; do
    work="$BUILD/fuzz-work/$t"
    rm -rf "$work"
    mkdir -p "$work/corpus" "$work/artifacts"
    echo "== $t: ${SECONDS_EACH} s"
    rc=0
    "$BUILD/bin/$t" "$work/corpus" "tests/fuzz/corpus/$t" -max_total_time="$SECONDS_EACH" -timeout=30 \
        -print_final_stats=1 -artifact_prefix="$work/artifacts/" >"$work/log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/log" | tail -1)
    cov=$(grep -E '^#[0-9]+' "$work/log" | tail -1 | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    found=$(find "$work/artifacts" -type f | wc -l)
    if [ "$rc" -ne 0 ] || [ "$found" -ne 0 ]; then
        status=1
        tail -40 "$work/log"
        echo "FAIL $t: exit $rc, $found input(s) in $work/artifacts"
        summary+="$t: FAILED after ${execs:-?} executions"$'\n'
    else
        summary+="$t: ${execs:-?} executions in ${SECONDS_EACH} s, coverage ${cov:-?} points, nothing found"$'\n'
    fi
done
echo "== fuzz summary"
printf '%s' "$summary"
exit $status
