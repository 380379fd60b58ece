/*
 * A stalled peer on the CUDA backend: rank 1's stream is held by a 4 s host callback, so
 * its part of the exchange starts late; rank 0's device wait must give up after the
 * configured timeout (1.5 s) instead of hanging the GPU, and the call after it must report
 * EPX_ERR_TIMEOUT at once. Run with 2 ranks and --cuda.
 */
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "testlib.h"

#ifdef EPX_HAVE_CUDA
#include <cuda_runtime_api.h>

static void CUDART_CB hold_stream(void *arg)
{
    (void)arg;
    sleep(4);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
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
    size_t count = 1 << 18; /* 1 MiB to each peer: the direct kernel path */
    void *send = test_buf_alloc(count * 4 * R), *recv = test_buf_alloc(count * 4 * R);
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, test_stream())); /* healthy first */
    test_sync();
    if (me == 1) ASSERT(cudaLaunchHostFunc(test_stream(), hold_stream, NULL) == cudaSuccess);
    double t0 = now_ms();
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, test_stream())); /* enqueued: no error yet */
    if (me == 0) {
        test_sync();
        double waited = now_ms() - t0;
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
