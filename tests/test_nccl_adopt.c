/*
 * epx_comm_init_nccl: the test makes an NCCL communicator itself (its id carried by a
 * CPU epx communicator), hands it to epx, and runs alltoall and alltoallv on the result,
 * checking every element. Run with --cuda under epx-run (one rank per GPU); with
 * EPX_LOCAL_SIZE the ranks form several simulated hosts and epx moves data between them
 * on the adopted communicator.
 */
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <string.h>

#include "epx_cuda.h"
#include "testlib.h"

int main(int argc, char **argv)
{
    test_init_cuda_only(argc, argv);
    int me, R;
    /* The NCCL id travels over a CPU communicator (rank 0's, to everyone). */
    epx_config_t ccfg = EPX_CONFIG_INITIALIZER;
    ccfg.backend = EPX_BACKEND_CPU;
    epx_comm_t cpu;
    ASSERT_OK(epx_comm_init_from_env(&cpu, &ccfg));
    ASSERT_OK(epx_comm_rank(cpu, &me));
    ASSERT_OK(epx_comm_size(cpu, &R));
    test_rank = me;
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (me == 0) ASSERT(ncclGetUniqueId(&id) == ncclSuccess);
    char *send = calloc((size_t)R, sizeof id), *recv = calloc((size_t)R, sizeof id);
    if (me == 0)
        for (int p = 0; p < R; p++) memcpy(send + (size_t)p * sizeof id, &id, sizeof id);
    ASSERT_OK(epx_alltoall(cpu, send, recv, sizeof id, EPX_U8, NULL));
    memcpy(&id, recv, sizeof id); /* rank 0's segment */
    ASSERT_OK(epx_comm_destroy(cpu));
    ncclComm_t nc;
    ASSERT(ncclCommInitRank(&nc, R, id, me) == ncclSuccess);

    epx_comm_t comm;
    ASSERT_OK(epx_comm_init_nccl(&comm, nc, NULL));
    epx_comm_info_t info;
    ASSERT_OK(epx_comm_info(comm, &info));
    printf("rank %d: adopted NCCL, host %d of %d\n", me, info.host, info.num_hosts);
    int passed = 0;
    cudaStream_t s;
    ASSERT(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess);
    for (size_t count = 1; count <= (1u << 18); count *= 64) {
        size_t n = count * (size_t)R;
        int32_t *h = malloc(sizeof(int32_t) * n), *d_s, *d_r;
        for (size_t i = 0; i < n; i++) h[i] = (int32_t)(me * 1000003 + (int)i);
        ASSERT(cudaMalloc((void **)&d_s, sizeof(int32_t) * n) == cudaSuccess);
        ASSERT(cudaMalloc((void **)&d_r, sizeof(int32_t) * n) == cudaSuccess);
        ASSERT(cudaMemcpy(d_s, h, sizeof(int32_t) * n, cudaMemcpyHostToDevice) == cudaSuccess);
        ASSERT_OK(epx_alltoall(comm, d_s, d_r, count, EPX_I32, s));
        ASSERT(cudaStreamSynchronize(s) == cudaSuccess);
        ASSERT(cudaMemcpy(h, d_r, sizeof(int32_t) * n, cudaMemcpyDeviceToHost) == cudaSuccess);
        for (int p = 0; p < R; p++)
            for (size_t i = 0; i < count; i++)
                if (h[(size_t)p * count + i] != (int32_t)(p * 1000003 + (int)((size_t)me * count + i)))
                    TEST_FAIL_("alltoall count %zu: element %zu from rank %d is %d", count, i, p, h[(size_t)p * count + i]);
        passed++;
        cudaFree(d_s), cudaFree(d_r), free(h);
    }
    ASSERT_OK(epx_barrier(comm, s));
    ASSERT_OK(epx_comm_destroy(comm));
    ASSERT(ncclCommDestroy(nc) == ncclSuccess);
    free(send), free(recv);
    test_done(passed);
    return 0;
}
