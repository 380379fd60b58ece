/*
 * CUDA graphs: an alltoall captured once per path (eager slots, direct kernel) and replayed
 * 200 times, each replay with new data and a poisoned output, every element checked. The
 * host agrees on the arguments at capture time; replays need no host work (epx keeps the
 * operation number on the device). Run with 2+ ranks and --cuda.
 */
#include <string.h>

#include "testlib.h"

#ifdef EPX_HAVE_CUDA
#include <cuda_runtime_api.h>
#define CU(x)                                                                                 \
    do {                                                                                      \
        cudaError_t e_ = (x);                                                                 \
        if (e_ != cudaSuccess) TEST_FAIL_("%s: %s", #x, cudaGetErrorString(e_));              \
    } while (0)

static int replay(epx_comm_t comm, int me, int R, size_t count, int rounds)
{
    cudaStream_t s = test_stream();
    size_t bytes = count * (size_t)R * 4;
    uint32_t *send = test_buf_alloc(bytes), *recv = test_buf_alloc(bytes), *host = malloc(bytes);
    /* One ordinary call first: maps the peers' buffers outside the capture. */
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, s));
    test_sync();
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, s));
    CU(cudaStreamEndCapture(s, &graph));
    CU(cudaGraphInstantiate(&exec, graph, 0));
    for (int it = 0; it < rounds; it++) {
        for (int q = 0; q < R; q++)
            for (size_t i = 0; i < count; i++)
                host[(size_t)q * count + i] = (uint32_t)test_mix((uint64_t)it + 1000, (uint64_t)me, (uint64_t)q, i);
        test_buf_put(send, host, bytes);
        test_buf_poison(recv, 0xA5, bytes);
        CU(cudaGraphLaunch(exec, s));
        test_buf_get(host, recv, bytes);
        for (int q = 0; q < R; q++)
            for (size_t i = 0; i < count; i++)
                if (host[(size_t)q * count + i] != (uint32_t)test_mix((uint64_t)it + 1000, (uint64_t)q, (uint64_t)me, i))
                    TEST_FAIL_("replay %d (count %zu): element %zu from rank %d wrong", it, count, i, q);
    }
    /* The communicator still works outside the graph afterwards. */
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, s));
    test_sync();
    CU(cudaGraphExecDestroy(exec));
    CU(cudaGraphDestroy(graph));
    test_buf_free(send), test_buf_free(recv), free(host);
    return rounds;
}
#endif

int main(int argc, char **argv)
{
    test_init_cuda_only(argc, argv);
#ifdef EPX_HAVE_CUDA
    int me, R, passed = 0;
    epx_comm_t comm = test_comm_from_env(&me, &R);
    passed += replay(comm, me, R, 100, 200);    /* eager slots */
    passed += replay(comm, me, R, 100000, 200); /* direct kernel */
    test_finish(comm, passed);
#endif
    return 0;
}
