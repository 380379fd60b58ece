/*
 * A stalled peer on the CUDA backend: rank 1's stream is held by a 4 s host callback, so
 * its part of the exchange starts late; rank 0's device wait must give up after the
 * configured timeout (1.5 s) instead of hanging the GPU, and the call after it must report
 * EPX_ERR_TIMEOUT at once. Run with 2 ranks and --cuda.
 *
 * With --ll, a low-latency combine enqueued behind a dispatch whose receive timed out: rank
 * 1 starts 2.5 s late, rank 0's dispatch receive gives up at 1.5 s and its combine starts
 * at about 4.5 s, when rank 1's combine has already published (so rank 0's combine waits
 * for nothing). The handle's arrays were never written by that receive; the combine must
 * write nothing (its output keeps its poison), fault nothing (a sticky CUDA error would
 * fail the stream), and the next call must report EPX_ERR_TIMEOUT.
 */
#include <errno.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "testlib.h"

#ifdef EPX_HAVE_CUDA
#include <cuda_runtime_api.h>

/* Holds the stream for *(int *)arg ms (4000 when arg is NULL). */
static void CUDART_CB hold_stream(void *arg)
{
    int ms = arg ? *(const int *)arg : 4000;
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

#define LL_H 256
#define LL_T 8
#define LL_K 2
#define LL_L 2 /* experts per rank */

static void ll_case(epx_comm_t comm, int me)
{
    static const int late_ms = 2500, then_ms = 3000; /* rank 1 before dispatch; rank 0 after */
    int R = 2, E = LL_L * R;
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = LL_H, cfg.max_tokens_per_rank = LL_T, cfg.num_experts = E, cfg.max_topk = LL_K;
    cfg.dtype = EPX_BF16, cfg.index_dtype = EPX_I32, cfg.mode = EPX_MOE_LOW_LATENCY;
    epx_moe_t moe;
    ASSERT_OK(epx_moe_create(comm, &cfg, &moe));
    uint64_t rng = 77 + (uint64_t)me;
    uint16_t hx[LL_T * LL_H];
    int32_t ht[LL_T * LL_K];
    float hw[LL_T * LL_K];
    for (int i = 0; i < LL_T * LL_H; i++) hx[i] = epx_float_to_bf16((float)(test_rand(&rng) % 64) - 32.0f);
    for (int t = 0; t < LL_T; t++)
        for (int k = 0; k < LL_K; k++) ht[t * LL_K + k] = (t + k) % E, hw[t * LL_K + k] = 0.5f + (float)k;
    size_t slots = (size_t)LL_L * R * LL_T, out_bytes = (size_t)LL_T * LL_H * 2;
    void *x = test_buf_alloc(sizeof hx), *topk = test_buf_alloc(sizeof ht), *w = test_buf_alloc(sizeof hw);
    void *recv_x = test_buf_alloc(slots * LL_H * 2), *y = test_buf_alloc(slots * LL_H * 2);
    void *out = test_buf_alloc(out_bytes);
    int32_t *count = test_buf_alloc(sizeof(int32_t) * LL_L);
    ASSERT(cudaMemcpyAsync(x, hx, sizeof hx, cudaMemcpyHostToDevice, (cudaStream_t)test_stream()) == cudaSuccess);
    ASSERT(cudaMemcpyAsync(topk, ht, sizeof ht, cudaMemcpyHostToDevice, (cudaStream_t)test_stream()) == cudaSuccess);
    ASSERT(cudaMemcpyAsync(w, hw, sizeof hw, cudaMemcpyHostToDevice, (cudaStream_t)test_stream()) == cudaSuccess);
    ASSERT(cudaMemsetAsync(y, 0x3c, slots * LL_H * 2, (cudaStream_t)test_stream()) == cudaSuccess); /* ~0.0115 */
    test_sync(); /* the uploads (on the ranks' non-blocking stream) before the peers read y */
    epx_moe_ll_dispatch_in_t in = {x, topk, LL_T, LL_K};
    epx_moe_ll_dispatch_out_t dout = {recv_x, NULL, count, NULL, NULL};
    epx_moe_ll_combine_in_t cin = {y, w};
    epx_moe_handle_t warm = NULL, h = NULL;
    ASSERT_OK(epx_moe_ll_dispatch(moe, &in, &dout, &warm, test_stream())); /* healthy first */
    ASSERT_OK(epx_moe_ll_combine(moe, warm, &cin, out, test_stream()));
    test_sync();
    ASSERT_OK(epx_moe_handle_destroy(warm)); /* its memory may come back to the next handle */
    ASSERT(cudaMemsetAsync(out, 0xEE, out_bytes, (cudaStream_t)test_stream()) == cudaSuccess);
    if (me == 1) ASSERT(cudaLaunchHostFunc(test_stream(), hold_stream, (void *)&late_ms) == cudaSuccess);
    ASSERT_OK(epx_moe_ll_dispatch(moe, &in, &dout, &h, test_stream())); /* enqueued: no error yet */
    if (me == 0) ASSERT(cudaLaunchHostFunc(test_stream(), hold_stream, (void *)&then_ms) == cudaSuccess);
    ASSERT_OK(epx_moe_ll_combine(moe, h, &cin, out, test_stream()));
    cudaError_t ce = cudaStreamSynchronize((cudaStream_t)test_stream());
    if (ce != cudaSuccess) TEST_FAIL_("rank %d: the stream failed (%s): a device fault", me, cudaGetErrorString(ce));
    if (me == 0) {
        uint8_t got[LL_T * LL_H * 2];
        ASSERT(cudaMemcpy(got, out, out_bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
        for (size_t i = 0; i < out_bytes; i++)
            if (got[i] != 0xEE) TEST_FAIL_("rank 0: the combine after a timed-out receive wrote byte %zu", i);
        epx_status_t st = epx_moe_ll_dispatch(moe, &in, &dout, &h, test_stream());
        ASSERT_STATUS(st, EPX_ERR_TIMEOUT);
        printf("rank 0: the combine wrote nothing; next call: %s\n", epx_comm_get_last_error(comm));
    }
    /* rank 1: its late part may finish or time out itself; it ended (the stream drained) */
    epx_moe_destroy(moe);
}
#endif

int main(int argc, char **argv)
{
    test_init_cuda_only(argc, argv);
#ifdef EPX_HAVE_CUDA
    setenv("EPX_TIMEOUT_MS", "1500", 1);
    int me, R;
    epx_comm_t comm = test_comm_from_env(&me, &R);
    ASSERT_EQ(R, 2);
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--ll")) {
            ll_case(comm, me);
            epx_comm_abort(comm);
            test_done(1);
            return 0;
        }
    size_t count = 1 << 18; /* 1 MiB to each peer: the direct kernel path */
    void *send = test_buf_alloc(count * 4 * R), *recv = test_buf_alloc(count * 4 * R);
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, test_stream())); /* healthy first */
    test_sync();
    if (me == 1) ASSERT(cudaLaunchHostFunc(test_stream(), hold_stream, NULL) == cudaSuccess);
    double t0 = test_now_ms();
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, test_stream())); /* enqueued: no error yet */
    if (me == 0) {
        test_sync();
        double waited = test_now_ms() - t0;
        epx_status_t async = EPX_SUCCESS;
        ASSERT_OK(epx_comm_get_async_error(comm, &async));
        /* get_async_error reports what the comm knows; the next call reads the device record. */
        epx_status_t st = epx_alltoall(comm, send, recv, count, EPX_F32, test_stream());
        ASSERT_STATUS(st, EPX_ERR_TIMEOUT);
        ASSERT(strstr(epx_comm_get_last_error(comm), "rank 1") != NULL);
        if (waited > 3500) TEST_FAIL_("the device wait took %.0f ms; the timeout is 1500 ms", waited);
        printf("rank 0: device wait gave up after %.0f ms: %s\n", waited, epx_comm_get_last_error(comm));
    } else {
        test_sync(); /* our late part: it may finish or time out itself; it must end */
    }
    epx_comm_abort(comm);
    test_done(1);
#endif
    return 0;
}
