#!/bin/bash
export NCCL_NVLS_ENABLE=0
export NCCL_HOME=$(python3 -c "import site; print(site.getsitepackages()[0])")/nvidia/nccl
source scripts/build-trees.sh
t0=$(date +%s)
build_trees . > $OUT/build.log 2>&1 || { echo BUILD FAILED; tail -50 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
# negative control: the stall watch not registered
mkdir -p /tmp/nostall && tar --exclude=./build-gpu -cf - . | tar -xf - -C /tmp/nostall
sed -i 's/epx__nccl_watch_between(xh->nccl, &device, &stall);/epx__nccl_watch_between(xh->nccl, \&device, NULL);/' /tmp/nostall/src/xhost/xhost.c
grep -c "&device, NULL" /tmp/nostall/src/xhost/xhost.c
(build_trees /tmp/nostall > $OUT/nostall_build.log 2>&1 && cd /tmp/nostall/build-gpu && ctest --timeout 60 -R "^fake_nccl_graph_stall_np2_hosts2$" -V > $OUT/nostall.log 2>&1; echo "nostall rc $?" >> $OUT/nostall.log) &
cd build-gpu
ctest --timeout 100 -R "^fake_nccl_graph_stall_np[24]_hosts2$" -V 2>&1 | grep -E "stalled replay|Passed|Failed|FAIL|rank .*:" > $OUT/stall_v.log
cat $OUT/stall_v.log | head -20
echo "stall -V done $(( $(date +%s) - t0 )) s"
ctest --timeout 250 -j 4 -L fake_nccl -E "^fake_nccl_graph_" > $OUT/fake_all.log 2>&1
tail -15 $OUT/fake_all.log
echo "fake label done $(( $(date +%s) - t0 )) s"
wait
tail -8 $OUT/nostall.log
cd ..
EPX_LOCAL_SIZE=1 LD_LIBRARY_PATH=$PWD/build-gpu/tests/fake_nccl timeout 120 build-gpu/bin/epx-bench moe --backend cuda --ranks 2 --mode ll --tokens 128 --hidden 7168 --topk 8 --experts 288 --dtype fp8 -n 10 -w 3 > $OUT/bench_fake.log 2>&1
echo "bench rc $?"; tail -15 $OUT/bench_fake.log
echo "all done $(( $(date +%s) - t0 )) s"
