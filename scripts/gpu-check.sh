#!/usr/bin/env bash
# On the GPU machine (see ../shared/DEVICE.md): build with CUDA and NCCL (from the pip
# layout when it is not in the CUDA toolkit), run the whole test suite — CPU and GPU — and
# the benchmarks, and leave logs and JSON under $OUT (default: build-gpu/out).
#   scripts/gpu-check.sh [quick|gpu]   (quick: no benchmarks; gpu: only the GPU tests and the MoE benchmark)
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
if [ -z "${NCCL_HOME:-}" ]; then
    SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
    [ -n "$SP" ] && [ -d "$SP/nvidia/nccl" ] && export NCCL_HOME="$SP/nvidia/nccl"
fi
{
    date -u
    git log -1 --oneline 2>/dev/null || true
    nvidia-smi -L
    nvidia-smi topo -m
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release ${NCCL_HOME:+-DNCCL_HOME=$NCCL_HOME} 2>&1 | tee "$OUT/build.log" | grep -E "epx:|Error"
cmake --build build-gpu -j "$(nproc)" >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
rc=0
# CPU tests in parallel, then the GPU ones one at a time (ranks sharing a GPU time-slice).
[ "${1:-}" = gpu ] || ctest --test-dir build-gpu --output-on-failure -j 8 -LE cuda --timeout 600 >"$OUT/ctest_cpu.log" 2>&1 || rc=1
ctest --test-dir build-gpu --output-on-failure -L cuda --timeout 600 >"$OUT/ctest_cuda.log" 2>&1 || rc=1
grep -hE "tests passed|Failed|\*\*\*|Skipped" "$OUT"/ctest_*.log | tail -30
if [ "${1:-}" != quick ]; then
    B=build-gpu/bin/epx-bench
    NG=$(nvidia-smi -L | wc -l)
    {
        $B moe --backend cuda --ranks "$NG" --tokens 64 --hidden 200 --topk 4 --experts 8 -n 3 -w 1 || rc=1
        for d in bf16 fp8; do
            $B moe --backend cuda --ranks "$NG" --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype $d --mode ht \
                -n 20 -w 5 -c 1 --json "$OUT/moe_ht_$d.json" || rc=1
        done
        [ "${1:-}" = gpu ] || $B alltoall --backend cuda --ranks "$NG" -b 1K -e 1G -f 4 -n 20 -w 5 -c 1 \
            --json "$OUT/alltoall_cuda.json" || rc=1
    } 2>&1 | tee "$OUT/bench.txt" | grep -vE "progress"
fi
exit $rc
