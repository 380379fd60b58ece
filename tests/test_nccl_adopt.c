/*
 * epx_comm_init_nccl: the test makes an NCCL communicator itself (its id carried by a
 * CPU epx communicator), hands it to epx, and runs alltoall and alltoallv on the result,
 * checking every element. Run with --cuda under epx-run (one rank per GPU); with
 * EPX_LOCAL_SIZE the ranks form several simulated hosts and epx moves data between them
 * on the adopted communicator.
 *
 * Also: a cfg.device other than the NCCL communicator's fails on every rank (the others
 * learn it over NCCL) and leaves the NCCL communicator usable; across hosts, calls on a
 * stream being captured into a CUDA graph fail alike on every rank, leave the capture
 * valid and the communicator working.
 */
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <string.h>

#include "epx_cuda.h"
#include "testlib.h"

/* Begin capturing s (when `capture`), expect `want` from the call, end the capture: it must
 * still be valid (epx refused before touching the stream). */
#define CAPTURED(capture, call, want)                                                          \
    do {                                                                                       \
        if (capture) ASSERT(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed) == cudaSuccess); \
        ASSERT_STATUS(call, want);                                                             \
        if (capture) {                                                                         \
            cudaGraph_t g = NULL;                                                              \
            ASSERT(cudaStreamEndCapture(s, &g) == cudaSuccess);                               \
            ASSERT(cudaGraphDestroy(g) == cudaSuccess);                                        \
        }                                                                                      \
    } while (0)

/* Across hosts calls wait on the host: a capturing stream is refused on every rank alike,
 * before any collective step; the communicator then works. */
static void test_capture(epx_comm_t comm, cudaStream_t s, int me, int R)
{
    size_t n = 4 * (size_t)R;
    int32_t *d_s, *d_r, h[4 * 64];
    ASSERT(R <= 64);
    ASSERT(cudaMalloc((void **)&d_s, sizeof(int32_t) * n) == cudaSuccess);
    ASSERT(cudaMalloc((void **)&d_r, sizeof(int32_t) * n) == cudaSuccess);
    for (size_t i = 0; i < n; i++) h[i] = (int32_t)(me * 1000 + (int)i);
    /* On s (a copy from pageable memory is not ordered before work on a non-blocking stream). */
    ASSERT(cudaMemcpyAsync(d_s, h, sizeof(int32_t) * n, cudaMemcpyHostToDevice, s) == cudaSuccess);
    ASSERT(cudaStreamSynchronize(s) == cudaSuccess);
    CAPTURED(true, epx_alltoall(comm, d_s, d_r, 4, EPX_I32, s), EPX_ERR_INVALID_USAGE);
    CAPTURED(true, epx_barrier(comm, s), EPX_ERR_INVALID_USAGE);
    /* Only rank 0 captures: it says why, the others that it refused. */
    CAPTURED(me == 0, epx_alltoall(comm, d_s, d_r, 4, EPX_I32, s),
             me == 0 ? EPX_ERR_INVALID_USAGE : EPX_ERR_REMOTE_INVALID);
    /* MoE: the (local) layout and a dispatch, with no tokens. */
    epx_moe_config_t mc = EPX_MOE_CONFIG_INITIALIZER;
    mc.hidden = 128, mc.max_tokens_per_rank = 4, mc.num_experts = 2 * R, mc.max_topk = 1;
    epx_moe_t moe;
    ASSERT_OK(epx_moe_create(comm, &mc, &moe));
    epx_moe_dispatch_in_t in = {NULL, NULL, NULL, NULL, 0, 1};
    epx_moe_dispatch_out_t out;
    memset(&out, 0, sizeof out);
    epx_moe_handle_t handle = NULL;
    CAPTURED(true, epx_moe_layout(moe, NULL, 0, 1, NULL, NULL, NULL, s), EPX_ERR_INVALID_USAGE);
    CAPTURED(true, epx_moe_dispatch(moe, &in, &out, &handle, s), EPX_ERR_INVALID_USAGE);
    ASSERT(handle == NULL);
    ASSERT_OK(epx_moe_dispatch(moe, &in, &out, &handle, s));
    ASSERT_EQ(out.num_recv_tokens, 0);
    ASSERT_OK(epx_moe_handle_destroy(handle));
    ASSERT_OK(epx_moe_destroy(moe));
    /* Still working. */
    ASSERT_OK(epx_alltoall(comm, d_s, d_r, 4, EPX_I32, s));
    ASSERT(cudaStreamSynchronize(s) == cudaSuccess);
    ASSERT(cudaMemcpy(h, d_r, sizeof(int32_t) * n, cudaMemcpyDeviceToHost) == cudaSuccess);
    for (int p = 0; p < R; p++)
        for (int i = 0; i < 4; i++) ASSERT_EQ(h[p * 4 + i], p * 1000 + me * 4 + i);
    cudaFree(d_s), cudaFree(d_r);
}

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
    int ndev = 0;
    ASSERT(cudaGetDeviceCount(&ndev) == cudaSuccess);
    if (ndev < R) { /* every rank sees the same count: all skip */
        printf("SKIPPED: %d ranks need %d GPUs (NCCL takes one rank per GPU); %d here\n", R, R, ndev);
        ASSERT_OK(epx_comm_destroy(cpu));
        return TEST_SKIP;
    }
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
    /* The last rank names another device: it fails with INVALID_ARGUMENT, the others with
     * REMOTE_INVALID, nobody waits; then every rank does; then all is well. */
    int dev;
    ASSERT(cudaGetDevice(&dev) == cudaSuccess);
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.device = me == R - 1 ? dev + 1 : dev;
    ASSERT_STATUS(epx_comm_init_nccl(&comm, nc, &cfg), R == 1 || me == R - 1 ? EPX_ERR_INVALID_ARGUMENT
                                                                             : EPX_ERR_REMOTE_INVALID);
    ASSERT(comm == NULL);
    cfg.device = dev + 1;
    ASSERT_STATUS(epx_comm_init_nccl(&comm, nc, &cfg), EPX_ERR_INVALID_ARGUMENT);
    cfg.device = dev;
    ASSERT_OK(epx_comm_init_nccl(&comm, nc, &cfg));
    ASSERT_OK(epx_comm_destroy(comm));
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
        ASSERT(cudaMemcpyAsync(d_s, h, sizeof(int32_t) * n, cudaMemcpyHostToDevice, s) == cudaSuccess);
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
    if (info.num_hosts > 1) {
        test_capture(comm, s, me, R);
        passed++;
    }
    ASSERT_OK(epx_barrier(comm, s));
    ASSERT_OK(epx_comm_destroy(comm));
    ASSERT(ncclCommDestroy(nc) == ncclSuccess);
    free(send), free(recv);
    test_done(passed);
    return 0;
}
