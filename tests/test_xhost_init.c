/*
 * CUDA across hosts: a rank whose NCCL initialisation fails stops every rank's
 * epx_comm_init soon, not at EPX_TIMEOUT_MS. Run with --cuda under epx-run with
 * EPX_LOCAL_SIZE (simulated hosts) over tests/fake_nccl.c with FAKE_NCCL_INIT_JOIN=1 (init
 * waits for every rank, as NCCL's does) and FAKE_NCCL_FAIL_INIT_RANK=f (rank f's init fails
 * at once). Rank f fails with EPX_ERR_NCCL; its rail peers, whose init waits for it, abandon
 * theirs (EPX_ERR_PEER_FAILURE); every other rank learns it in the vote
 * (EPX_ERR_REMOTE_INVALID). Every rank returns within 5 s; EPX_TIMEOUT_MS is set far above.
 */
#include <string.h>
#include <time.h>

#include "testlib.h"

int main(int argc, char **argv)
{
    test_init_cuda_only(argc, argv);
    const char *f = getenv("FAKE_NCCL_FAIL_INIT_RANK"), *r = getenv("EPX_RANK"), *ls = getenv("EPX_LOCAL_SIZE");
    const char *tm = getenv("EPX_TIMEOUT_MS");
    if (!f || !r || !ls || atoi(ls) < 1 || !tm || atoll(tm) < 15000)
        TEST_FAIL_("run under epx-run with FAKE_NCCL_FAIL_INIT_RANK, EPX_LOCAL_SIZE and EPX_TIMEOUT_MS >= 15000 set");
    int fail = atoi(f), me = atoi(r), LS = atoi(ls);
    test_rank = me;
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.backend = EPX_BACKEND_CUDA; /* on the device test_init chose */
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    epx_comm_t comm = NULL;
    epx_status_t st = epx_comm_init_from_env(&comm, &cfg);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = 1e3 * (double)(t1.tv_sec - t0.tv_sec) + 1e-6 * (double)(t1.tv_nsec - t0.tv_nsec);
    printf("rank %d: epx_comm_init_from_env -> %s after %.0f ms (%s)\n", me, epx_status_name(st), ms,
           st == EPX_SUCCESS ? "" : epx_get_last_error());
    fflush(stdout);
    ASSERT(comm == NULL);
    epx_status_t want = me == fail ? EPX_ERR_NCCL : me % LS == fail % LS ? EPX_ERR_PEER_FAILURE : EPX_ERR_REMOTE_INVALID;
    ASSERT_STATUS(st, want);
    if (ms > 5000) TEST_FAIL_("rank %d returned after %.0f ms (rank %d's NCCL init failed)", me, ms, fail);
    test_done(1);
    return 0;
}
