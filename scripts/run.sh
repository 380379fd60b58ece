#!/usr/bin/env bash
# Build epx and run the main job: the alltoall sweep of epx-bench with its baseline in the
# same run, on the GPUs when there are any, otherwise on the CPU backend with 4 local ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS=${RANKS:-4}
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
./build/bin/epx-info | head -2
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "# GPUs found, but this build has no CUDA backend yet: running the CPU backend"
fi
./build/bin/epx-bench alltoall --backend cpu --ranks "$RANKS" -b 1K -e 64M -f 4 -n 20 -w 5 -c 1 \
    --json build/bench-alltoall.json
echo "# results also in build/bench-alltoall.json"
