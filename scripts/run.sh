#!/usr/bin/env bash
# Build epx and run the main job: MoE dispatch/combine (DeepSeek-V3 shape) and the alltoall
# sweep of epx-bench, each with its baseline measured in the same run — on the GPUs when
# there are any (vs NCCL), otherwise on the CPU backend with 4 local ranks (vs MPI).
# Results also go to build/bench-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS=${RANKS:-4}
export NCCL_NVLS_ENABLE=0
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
./build/bin/epx-info | head -2
B=./build/bin/epx-bench
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NGPU=$(nvidia-smi -L | wc -l)
    echo "# $NGPU GPU(s): CUDA backend, one rank per GPU"
    for d in bf16 fp8; do
        $B moe --backend cuda --ranks "$NGPU" --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype $d --mode ht \
            -n 20 -w 5 --json build/bench-moe-ht-$d.json
    done
    $B alltoall --backend cuda --ranks "$NGPU" -b 1K -e 1G -f 4 -n 20 -w 5 -c 1 --json build/bench-alltoall.json
else
    echo "# no GPU: CPU backend, $RANKS local ranks"
    $B moe --backend cpu --ranks "$RANKS" --tokens 1024 --hidden 7168 --topk 8 --experts 256 --dtype bf16 --mode ht \
        -n 10 -w 2 --json build/bench-moe-ht.json
    $B moe --backend cpu --ranks "$RANKS" --tokens 128 --hidden 7168 --topk 8 --experts 288 --dtype fp8 --mode ll \
        -n 10 -w 2 --json build/bench-moe-ll.json
    $B alltoall --backend cpu --ranks "$RANKS" -b 1K -e 64M -f 4 -n 20 -w 5 -c 1 --json build/bench-alltoall.json
fi
echo "# results also in build/bench-*.json"
