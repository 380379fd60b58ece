#!/usr/bin/env bash
# On the GPU machine: build two (or more) source trees and run the same benchmarks on each,
# the builds alternating, so a change is measured against its base in one run (same
# machine, same clocks, same neighbours).
#   scripts/ab.sh A_TREE B_TREE [TREE...] [ROUNDS]   (default 2 rounds: A B A B)
# A tree is a directory holding an epx source tree (e.g. made here with
# `git archive REV | tar -x -C ab-a`); each is built in its own build-gpu/. The benchmarks are
# AB_CASES (one epx-bench argument list per line; default: high-throughput MoE T=4096 and
# T=1 bf16/fp8, alltoall 1K-64K and low-latency FP8 T=1/128, all at the default SM budget,
# --baseline none). Every output goes to $OUT/ab_<tree>_r<round>.txt; $OUT/ab.txt holds one
# line per case and round with each build's time per op.
set -uo pipefail
TREES=() ROUNDS=2
for x in "$@"; do
    if [[ $x =~ ^[0-9]+$ ]]; then ROUNDS=$x; else TREES+=("$x"); fi
done
OUT=${OUT:-$PWD/ab-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NG=$(nvidia-smi -L | wc -l)
DEFAULT_CASES="moe --tokens 4096 --hidden 7168 --topk 8 --experts 256 --mode ht --dtype bf16 -n 20 -w 5 -c 1
moe --tokens 4096 --hidden 7168 --topk 8 --experts 256 --mode ht --dtype fp8 -n 20 -w 5 -c 1
moe --tokens 1 --hidden 7168 --topk 8 --experts 256 --mode ht --dtype bf16 -n 50 -w 10 -c 1
alltoall -b 1K -e 64K -f 4 -n 50 -w 10 -c 1
moe --tokens 1 --hidden 7168 --topk 8 --experts 288 --mode ll --dtype fp8 -n 50 -w 10
moe --tokens 128 --hidden 7168 --topk 8 --experts 288 --mode ll --dtype fp8 -n 50 -w 10"
CASES=${AB_CASES:-$DEFAULT_CASES}
# shellcheck source=scripts/build-trees.sh
source "$(dirname "$0")/build-trees.sh"
build_trees "${TREES[@]}" || exit 1
: >"$OUT/ab.txt"
for ((r = 1; r <= ROUNDS; r++)); do
    for t in "${TREES[@]}"; do
        log="$OUT/ab_$(basename "$t")_r$r.txt"
        : >"$log"
        while IFS= read -r c; do
            [ -n "$c" ] || continue
            # shellcheck disable=SC2086 # a case is an argument list
            echo "## $c" >>"$log"
            "$t/build-gpu/bin/epx-bench" $c --backend cuda --ranks "${AB_RANKS:-$NG}" --baseline none >>"$log" 2>&1 ||
                echo "## exit $?" >>"$log"
        done <<<"$CASES"
    done
    # One line per case: the ops' medians of A then B (the rows under the header line).
    for t in "${TREES[@]}"; do
        awk -v tree="$(basename "$t")" -v r="$r" '
            { sub(/^\[[0-9]+\] /, "") }
            /^## / { c = substr($0, 4); next }
            /^ +[a-z_0-9]+ +[0-9.]+ / { line[c] = line[c] " " $1 "=" $2; next }
            END { for (k in line) printf "r%s %-8s %s |%s\n", r, tree, k, line[k] }' \
            "$OUT/ab_$(basename "$t")_r$r.txt" | sort >>"$OUT/ab.txt"
    done
done
cat "$OUT/ab.txt"
