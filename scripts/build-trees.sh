# shellcheck shell=bash
# Sourced by scripts/ab.sh and scripts/flake.sh: build_trees TREE... builds each epx source
# tree in its own build-gpu/ (Release, NCCL_HOME when set; an existing one is reused), all
# at once. Returns 1 after printing the log's tail when one fails (the others stopped).
build_trees() {
    local pids=() t i
    for t in "$@"; do
        (cd "$t" && mkdir -p build-gpu &&
            cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release ${NCCL_HOME:+-DNCCL_HOME=$NCCL_HOME} >build-gpu/build.log 2>&1 &&
            cmake --build build-gpu -j "$(nproc)" >>build-gpu/build.log 2>&1) &
        pids+=($!)
    done
    local trees=("$@")
    for i in "${!trees[@]}"; do
        wait "${pids[$i]}" || {
            echo "build of ${trees[$i]} failed"
            tail -30 "${trees[$i]}/build-gpu/build.log"
            kill "${pids[@]}" 2>/dev/null
            wait
            return 1
        }
    done
}
