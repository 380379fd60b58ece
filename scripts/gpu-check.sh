#!/usr/bin/env bash
# On the GPU machine (see ../shared/DEVICE.md): build with CUDA and NCCL (from the pip
# layout when it is not in the CUDA toolkit), run the tests and the benchmarks, and leave
# logs and JSON under $OUT (default: build-gpu/out).
#   scripts/gpu-check.sh [STAGE...]     default: cpu cuda bench
# Stages (the build always runs first):
#   cpu       the CPU tests (ctest -LE cuda)
#   cuda      the GPU tests (ctest -L cuda)
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck on the 2-rank GPU suite
#   bench     MoE (bf16, fp8) and alltoall benchmarks at the default SM budget
#   sweep     MoE bf16/fp8 with all SMs, and bf16 with the count read back to the host
#   python    the Python package's tests with torch on the GPUs (python/tests)
#   ll        low-latency MoE: T = 1, 8, 32, 128, 256 (FP8 dispatch), and T = 128 with bf16
#   soak      the long soak on the CUDA backend: SOAK_ITERS (default 10000) exchanges on 2 ranks
#   nccl      CUDA across hosts: the nccl_* tests but nccl_fault_* (2 GPUs as 2 hosts, NCCL on
#             sockets; `fault` runs nccl_fault_*), then
#             alltoall and MoE (HT bf16 T=4096, LL fp8 T=128) benchmarks across the 2
#             simulated hosts, the NCCL baselines on the same transport in the same run
#   fault     injected faults on the CUDA backend (tests/test_cuda_fault.c): every operation and
#             fault on FAULT_NP ranks (default "2"; "2 3" adds 3 ranks sharing the GPUs), one
#             log per operation and rank count (fault_<op>_np<N>.log: every rank's status and time);
#             then MoE dispatch and combine on copy engines (FAULT_CE_OPS, fault_ce_<op>_np<N>.log);
#             then across 2 simulated hosts (CUDA over NCCL, as ctest's nccl_fault_*): FAULT_HOSTS_NP
#             ranks (default "2 4"), ops FAULT_HOSTS_OPS, logs fault_hosts_<op>_np<N>.log
#   fake      CUDA across simulated hosts over tests/fake_nccl.c (a test-only NCCL: ranks may
#             share a GPU): ctest -L fake_nccl, the suites and the injected faults (~4 min)
#   fakepaths fail_enqueue and kill_enqueue over the fake NCCL (2 hosts of 2) on the direct
#             alltoallv path, copy engines and EPX_MOE_CHUNKS=3, for FAULT_PATH_OPS (default
#             "alltoallv dispatch"; fakepaths.log, ~2 min)
#   fakebench the path across hosts timed over the fake NCCL on one GPU (2 simulated hosts
#             of 1 rank, both on GPU 0): MoE HT T=4096 and LL T=128 at H=7168 and at tiny
#             rows (H=128: the host's share of a call: routing read-back, plans, rounds);
#             not NCCL's times (the fake moves bytes through host memory on one thread)
#   ce        high-throughput MoE on copy engines: the cuda_ce tests (also part of cuda), then
#             bf16 and fp8 benchmarks with EPX_CUDA_SMS=0, and bf16 with 132 pack/reduce blocks
#   probe     per-block timestamps of the low-latency kernels (a measuring build in
#             build-gpu-probe, cmake -DEPX_LL_PROBE=ON; src/cuda/probe.cuh) at T = 1 and 128, every
#             rank on its GPU: probe.txt (each step's spread over the blocks, per rank)
#   targets   the targets of issues 4 and 5 against the JSON that `bench` and `ll` wrote in
#             this $OUT (tools/targets.py; run it after them: `bench ll targets`), targets.txt
#   quick     cpu cuda (no benchmarks)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
if [ -z "${NCCL_HOME:-}" ]; then
    SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
    [ -n "$SP" ] && [ -d "$SP/nvidia/nccl" ] && export NCCL_HOME="$SP/nvidia/nccl"
fi
STAGES=${*:-cpu cuda bench}
STAGES=${STAGES/quick/cpu cuda}
has() { [[ " $STAGES " == *" $1 "* ]]; }
{
    date -u
    # The device machine's copy of .git may be stale: the caller passes the commit it ran.
    echo "commit: ${EPX_COMMIT:-$(git log -1 --format=%h 2>/dev/null || echo unknown)}"
    echo "stages: $STAGES"
    nvidia-smi -L
    nvidia-smi topo -m
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release ${NCCL_HOME:+-DNCCL_HOME=$NCCL_HOME} 2>&1 | tee "$OUT/build.log" | grep -E "epx:|Error"
cmake --build build-gpu -j "$(nproc)" >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
rc=0
B=build-gpu/bin
NG=$(nvidia-smi -L | wc -l)
# CPU tests in parallel, then the GPU ones one at a time (ranks sharing a GPU time-slice).
if has cpu; then
    ctest --test-dir build-gpu --output-on-failure -j 8 -LE cuda --timeout 600 >"$OUT/ctest_cpu.log" 2>&1 || rc=1
    grep -hE "tests passed|Failed|\*\*\*" "$OUT/ctest_cpu.log" | tail -15
fi
if has cuda; then
    ctest --test-dir build-gpu --output-on-failure -L cuda -LE fault --timeout 600 >"$OUT/ctest_cuda.log" 2>&1 || rc=1
    grep -hE "Test +#|tests passed|Failed|\*\*\*" "$OUT/ctest_cuda.log" | tail -30
fi
if has fake; then
    ctest --test-dir build-gpu --output-on-failure -L fake_nccl --timeout 300 >"$OUT/ctest_fake.log" 2>&1 || rc=1
    grep -hE "Test +#|tests passed|Failed|\*\*\*" "$OUT/ctest_fake.log" | sort -u | tail -20
fi
if has fakepaths; then
    # fail_enqueue and kill_enqueue across 2 simulated hosts of 2 over the fake NCCL, on the
    # paths the ctest cases do not take: direct alltoallv, copy engines, 3 network chunks.
    FN=$PWD/build-gpu/tests/fake_nccl
    for op in ${FAULT_PATH_OPS:-alltoallv dispatch}; do
        for v in EPX_CUDA_EAGER_BYTES=16 EPX_CUDA_COPY_ENGINE_BYTES=0 EPX_MOE_CHUNKS=3; do
            env $v LD_LIBRARY_PATH=$FN EPX_LOCAL_SIZE=2 EPX_TEST_FAKE_NCCL=1 FAKE_NCCL_DELAY_US=2000 timeout 150 \
                $B/test_cuda_fault --cuda $op 4 fail_enqueue kill_enqueue >>"$OUT/fakepaths.log" 2>&1
            s=$?
            [ $s = 0 ] || rc=1
            echo "fakepaths $op $v: exit $s"
        done
    done
fi
if has sanitize; then
    # The library recovers from cudaErrorAlreadyMapped by design: API errors are not reported.
    CS="compute-sanitizer --error-exitcode 9 --report-api-errors no"
    for run in "memcheck test_alltoall --cuda" "memcheck test_moe --cuda --random 4" "memcheck test_cuda_graph --cuda" \
        "racecheck test_moe --cuda --random 2" "synccheck test_moe --cuda --random 2"; do
            tool=${run%% *} t=${run#* }
            log="$OUT/sanitize_${tool}_${t%% *}.log"
            timeout ${SANITIZE_S:-80} $B/epx-run -n 2 --timeout $((${SANITIZE_S:-80} - 5)) -- $CS --tool $tool $B/$t >"$log" 2>&1
            s=$?
            [ $s = 0 ] || rc=1
            echo "compute-sanitizer $tool $t: exit $s; $(grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY|passed' "$log" | tr '\n' ' ')"
    done
fi
if has fault; then
    for n in ${FAULT_NP:-2}; do
        for op in ${FAULT_OPS:-a2a_eager a2a_direct alltoallv a2av_device dispatch dispatch_nosync combine ll_dispatch ll_combine}; do
            log="$OUT/fault_${op}_np$n.log"
            t0=$(date +%s)
            timeout 280 $B/test_cuda_fault --cuda "$op" "$n" >"$log" 2>&1
            s=$?
            [ $s = 0 ] || rc=1
            echo "fault $op np$n: exit $s in $(($(date +%s) - t0)) s; $(grep -cE '^scenario .* passed' "$log") scenarios passed$(grep -hE '^FAIL' "$log" | head -3 | sed 's/^/ | /' | tr '\n' ' ')"
        done
        for op in ${FAULT_CE_OPS-dispatch combine}; do # MoE on copy engines
            log="$OUT/fault_ce_${op}_np$n.log"
            t0=$(date +%s)
            EPX_CUDA_SMS=0 timeout 280 $B/test_cuda_fault --cuda "$op" "$n" >"$log" 2>&1
            s=$?
            [ $s = 0 ] || rc=1
            echo "fault (copy engines) $op np$n: exit $s in $(($(date +%s) - t0)) s; $(grep -cE '^scenario .* passed' "$log") scenarios passed$(grep -hE '^FAIL' "$log" | head -3 | sed 's/^/ | /' | tr '\n' ' ')"
        done
    done
    for n in ${FAULT_HOSTS_NP-2 4}; do # 2 hosts of n/2 ranks, one GPU each, NCCL on sockets
        for op in ${FAULT_HOSTS_OPS:-a2a_direct alltoallv a2av_device dispatch combine ll_dispatch ll_combine}; do
            log="$OUT/fault_hosts_${op}_np$n.log"
            t0=$(date +%s)
            env NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo EPX_LOCAL_SIZE=$((n / 2)) \
                timeout 280 $B/test_cuda_fault --cuda "$op" "$n" >"$log" 2>&1
            s=$?
            [ $s = 0 ] || rc=1
            echo "fault (2 hosts) $op np$n: exit $s in $(($(date +%s) - t0)) s; $(grep -cE '^scenario .* passed' "$log") scenarios passed$(grep -hE '^FAIL|^SKIPPED' "$log" | head -3 | sed 's/^/ | /' | tr '\n' ' ')"
        done
    done
fi
if has python; then
    PYTHONPATH=python EPX_BUILD_DIR=build-gpu python3 -m pytest -q python/tests >"$OUT/python.log" 2>&1 || rc=1
    tail -5 "$OUT/python.log"
fi
bench_moe() { # json-name, extra args...
    local name=$1
    shift
    $B/epx-bench moe --backend cuda --ranks "$NG" --tokens 4096 --hidden 7168 --topk 8 --experts 256 --mode ht \
        -n 20 -w 5 -c 1 --json "$OUT/$name.json" "$@" || rc=1
}
if has bench; then
    {
        $B/epx-bench moe --backend cuda --ranks "$NG" --tokens 64 --hidden 200 --topk 4 --experts 8 -n 3 -w 1 || rc=1
        bench_moe moe_ht_bf16 --dtype bf16
        bench_moe moe_ht_fp8 --dtype fp8
        $B/epx-bench alltoall --backend cuda --ranks "$NG" -b 1K -e 1G -f 4 -n 20 -w 5 -c 1 \
            --json "$OUT/alltoall_cuda.json" || rc=1
        exit $rc # the group runs in a subshell: its failures reach rc through the pipeline
    } 2>&1 | tee "$OUT/bench.txt" | grep -vE "progress" || rc=1
fi
if has sweep; then
    {
        EPX_CUDA_SMS=132 bench_moe moe_ht_bf16_132sms --dtype bf16
        EPX_CUDA_SMS=132 bench_moe moe_ht_fp8_132sms --dtype fp8
        bench_moe moe_ht_bf16_hostcount --dtype bf16 --count host
        exit $rc # the group runs in a subshell: its failures reach rc through the pipeline
    } 2>&1 | tee "$OUT/sweep.txt" | grep -vE "progress" || rc=1
fi
if has ce; then
    ctest --test-dir build-gpu --output-on-failure -L cuda_ce --timeout 600 >"$OUT/ctest_ce.log" 2>&1 || rc=1
    grep -hE "Test +#|tests passed|Failed|\*\*\*" "$OUT/ctest_ce.log" | tail -15
    {
        EPX_CUDA_SMS=0 bench_moe moe_ht_bf16_ce --dtype bf16
        EPX_CUDA_SMS=0 bench_moe moe_ht_fp8_ce --dtype fp8
        EPX_CUDA_SMS=0 EPX_CUDA_CE_SMS=132 bench_moe moe_ht_bf16_ce_132sms --dtype bf16
        exit $rc # the group runs in a subshell: its failures reach rc through the pipeline
    } 2>&1 | tee "$OUT/ce.txt" | grep -vE "progress" || rc=1
fi
if has nccl; then
    ctest --test-dir build-gpu --output-on-failure -R '^nccl_' -LE fault --timeout 600 >"$OUT/ctest_nccl.log" 2>&1 || rc=1
    grep -hE "Test +#|tests passed|Failed|\*\*\*" "$OUT/ctest_nccl.log" | tail -20
    {
        export EPX_LOCAL_SIZE=1 NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo NCCL_NVLS_ENABLE=0
        $B/epx-bench alltoall --backend cuda --ranks 2 -b 1K -e 256M -f 16 -n 20 -w 5 -c 1 \
            --json "$OUT/nccl_alltoall.json" || rc=1
        $B/epx-bench moe --backend cuda --ranks 2 --tokens 4096 --hidden 7168 --topk 8 --experts 256 --mode ht \
            --dtype bf16 -n 20 -w 5 -c 1 --json "$OUT/nccl_moe_ht_bf16.json" || rc=1
        $B/epx-bench moe --backend cuda --ranks 2 --tokens 128 --hidden 7168 --topk 8 --experts 288 --mode ll \
            --dtype fp8 -n 20 -w 5 --json "$OUT/nccl_moe_ll_fp8_t128.json" || rc=1
        exit $rc # the group runs in a subshell: its failures reach rc through the pipeline
    } 2>&1 | tee "$OUT/nccl_bench.txt" | grep -vE "progress" || rc=1
fi
if has fakebench; then
    {
        for H in 128 7168; do
            env LD_LIBRARY_PATH="$PWD/build-gpu/tests/fake_nccl" EPX_LOCAL_SIZE=1 $B/epx-bench moe --backend cuda --ranks 2 \
                --tokens 4096 --hidden $H --topk 8 --experts 256 --mode ht --dtype bf16 -n 20 -w 3 -c 1 --baseline none \
                --json "$OUT/fake_moe_ht_h$H.json" || rc=1
            env LD_LIBRARY_PATH="$PWD/build-gpu/tests/fake_nccl" EPX_LOCAL_SIZE=1 $B/epx-bench moe --backend cuda --ranks 2 \
                --tokens 128 --hidden $H --topk 8 --experts 288 --mode ll --dtype fp8 -n 30 -w 5 --baseline none \
                --json "$OUT/fake_moe_ll_h$H.json" || rc=1
        done
        exit $rc # the group runs in a subshell: its failures reach rc through the pipeline
    } 2>&1 | tee "$OUT/fakebench.txt" | grep -vE "progress" || rc=1
fi
if has soak; then
    t0=$(date +%s)
    $B/epx-run -n 2 --timeout 550 -- $B/test_soak --cuda --iters "${SOAK_ITERS:-10000}" --seed 11 >"$OUT/soak.log" 2>&1 || rc=1
    echo "soak (cuda, 2 ranks, ${SOAK_ITERS:-10000} iterations): $(tail -2 "$OUT/soak.log" | tr '\n' ' ') in $(($(date +%s) - t0)) s"
fi
if has ll; then
    {
        for t in 1 8 32 128 256; do
            $B/epx-bench moe --backend cuda --ranks "$NG" --tokens $t --hidden 7168 --topk 8 --experts 288 --mode ll \
                --dtype fp8 -n 50 -w 10 --json "$OUT/moe_ll_fp8_t$t.json" || rc=1
        done
        $B/epx-bench moe --backend cuda --ranks "$NG" --tokens 128 --hidden 7168 --topk 8 --experts 288 --mode ll \
            --dtype bf16 -n 50 -w 10 --json "$OUT/moe_ll_bf16_t128.json" || rc=1
        exit $rc # the group runs in a subshell: its failures reach rc through the pipeline
    } 2>&1 | tee "$OUT/ll.txt" | grep -vE "progress" || rc=1
fi
if has probe; then
    # A measuring build of its own (cmake -DEPX_LL_PROBE=ON, src/cuda/probe.cuh): each rank's
    # per-block timestamps of its dispatch kernels and (one host) its combine at T = 1 and 128,
    # every rank on its GPU.
    cmake -S . -B build-gpu-probe -DCMAKE_BUILD_TYPE=Release -DEPX_LL_PROBE=ON ${NCCL_HOME:+-DNCCL_HOME=$NCCL_HOME} \
        >"$OUT/probe_build.log" 2>&1 && cmake --build build-gpu-probe -j "$(nproc)" --target epx-bench \
        >>"$OUT/probe_build.log" 2>&1 || { tail -20 "$OUT/probe_build.log"; rc=1; }
    for t in 1 128; do
        echo "## T=$t, $NG ranks" >>"$OUT/probe.txt"
        EPX_PROBE_AT=30 EPX_PROBE_FILE="$OUT/probe.txt" build-gpu-probe/bin/epx-bench moe --backend cuda --ranks "$NG" \
            --tokens $t --hidden 7168 --topk 8 --experts 288 --mode ll --dtype fp8 -n 40 -w 10 --baseline none \
            >/dev/null 2>>"$OUT/probe.txt" || rc=1
    done
    cat "$OUT/probe.txt"
fi
if has targets; then
    python3 tools/targets.py "$OUT" --gpus "$NG" | tee "$OUT/targets.txt"
fi
exit $rc
