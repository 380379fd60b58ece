#!/usr/bin/env bash
# scaling_check.sh: docs/SCALING.md's check against the code. Runs epx-bench moe over MPI on
# simulated hosts under tools/mpi_count.c (a PMPI shim counting the bytes src/hier hands to
# MPI, per step and destination) and compares every count with tools/scaling_model.py's
# exact count for the bench's routing (to the byte) and with its closed form (uniform routing).
#
#   usage: tools/scaling_check.sh [BUILD_DIR]   (default build: a Release build with MPI)
#   env:   MPICC (default mpicc), MPIEXEC (default mpiexec), PYTHON (default python3),
#          EPX_SCALING_CHECK_OUT (where the counts and reports go; default BUILD_DIR/scaling_check)
# Ends with "scaling_check: passed" (exit 0) or "scaling_check: FAILED" (exit 1).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
MPICC=${MPICC:-mpicc}
MPIEXEC=${MPIEXEC:-mpiexec}
PY=${PYTHON:-python3}
OUTDIR=${EPX_SCALING_CHECK_OUT:-$BUILD/scaling_check}
BENCH=$BUILD/bin/epx-bench
[ -x "$BENCH" ] || { echo "scaling_check: no $BENCH (build first)"; exit 1; }
mkdir -p "$OUTDIR"
SHIM=$(cd "$OUTDIR" && pwd)/epx_mpicount.so
"$MPICC" -shared -fPIC -O2 -o "$SHIM" tools/mpi_count.c
MPIFLAGS=(--oversubscribe --bind-to none)
[ "$(id -u)" = 0 ] && MPIFLAGS+=(--allow-run-as-root)

fail=0
run() { # ranks local mode dtype skew experts
    local n=$1 l=$2 mode=$3 dt=$4 skew=$5 ex=$6
    local name="np${n}_local${l}_${mode}_${dt}_skew${skew}" args
    args=(--tokens 512 --hidden 2048 --topk 8 --experts "$ex" --mode "$mode" --dtype "$dt" --skew "$skew")
    "$MPIEXEC" -n "$n" "${MPIFLAGS[@]}" -x LD_PRELOAD="$SHIM" -x EPX_LOCAL_SIZE="$l" \
        "$BENCH" moe --ranks "$n" --init mpi --baseline none "${args[@]}" -n 3 -w 1 -c 1 \
        >"$OUTDIR/$name.bench" 2>"$OUTDIR/$name.counts"
    if "$PY" tools/scaling_model.py check --ranks "$n" --local "$l" "${args[@]}" --counts "$OUTDIR/$name.counts" \
        >"$OUTDIR/$name.md"; then
        echo "passed  $name"
    else
        echo "FAILED  $name (see $OUTDIR/$name.md)"
        grep '^check: ' "$OUTDIR/$name.md" | head -5
        fail=1
    fi
}
# 2 hosts of 2 (the tables of docs/SCALING.md), every mode and dtype, uniform and Zipf routing
run 4 2 ht bf16 0 32
run 4 2 ht fp8 0 32
run 4 2 ll fp8 0 32
run 4 2 ll bf16 0 32
run 4 2 ht bf16 1 32
run 4 2 ll fp8 1 32
# more host pairs: 3 hosts of 2, 4 hosts of 2; and 2 hosts of 4
run 6 2 ht bf16 0 48
run 8 2 ht fp8 0 32
run 8 2 ll fp8 0 32
run 8 4 ht bf16 0 32
run 8 4 ll bf16 0 32
if [ $fail = 0 ]; then echo "scaling_check: passed"; else echo "scaling_check: FAILED"; exit 1; fi
