/*
 * Out of memory in a MoE call across CPU hosts, at every allocation libepx makes in it:
 * run under mpiexec as 4 ranks in hosts of 2 (EPX_LOCAL_SIZE=2) with LD_PRELOAD=oom_shim,
 * which fails the N-th allocation (or shared mmap) of the call on rank R, for N = 1, 2, ...
 * until the call makes fewer. `test_oom dispatch`: rank 0's second dispatch;
 * `test_oom combine`: rank 1's first combine (its work buffers grow before the verdict; its
 * local peer's buffers were mapped by the dispatch already, so the mapping failure after
 * the verdict that epx__left_peers covers there is not reached: that path is checked by the
 * dispatch case). For each N, on a new communicator: the call on rank R returns success
 * (right row count) or EPX_ERR_NO_MEMORY / EPX_ERR_SYSTEM; when that failure left its peers
 * in the call (some of them time out or see a peer failure), rank 0 broke its communicator
 * (its next call fails at once) and told its host (its local peer fails at once, or
 * succeeded); otherwise the peers got success or EPX_ERR_REMOTE_INVALID and every rank's
 * next call succeeds. Exits 77 (skipped) without the shim.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "epx.h"
#include "epx_mpi.h"

enum { H = 256, T = 16, K = 3, MAXT = 32, TIMEOUT_MS = 1000 };

static int me;
#define CHECK(cond, ...)                                                                      \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "FAIL %s:%d (rank %d): %s: ", __FILE__, __LINE__, me, #cond);     \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fprintf(stderr, "\n");                                                            \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                     \
        }                                                                                     \
    } while (0)

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int broken_peer(int st) { return st == EPX_ERR_TIMEOUT || st == EPX_ERR_PEER_FAILURE; }

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int R;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &R);
    int (*arm)(long) = (int (*)(long))dlsym(RTLD_DEFAULT, "epx_test_oom_arm");
    const int combine = argc > 1 && !strcmp(argv[1], "combine"), tgt = combine ? 1 : 0, buddy = tgt ^ 1;
    static float out_c[T * H], out_w[T * K], y[4 * MAXT * H];
    if (!arm || R != 4) {
        if (me == 0) printf("test_oom: skipped (needs LD_PRELOAD=oom_shim and 4 ranks)\n");
        MPI_Finalize();
        return 77;
    }
    static float x[T * H], w[T * K], rx[4 * MAXT * H], rw[4 * MAXT * K];
    static int64_t idx[T * K], ridx[4 * MAXT * K];
    for (int i = 0; i < T * H; i++) x[i] = (float)(me * 100 + i % 97);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) idx[t * K + k] = (t + 3 * k + me) % 9 == 8 ? -1 : (t * 5 + k * 3 + me) % 8, w[t * K + k] = 1.0f;
    epx_moe_dispatch_in_t in = {x, NULL, idx, w, T, K};
    int cases = 0, left = 0;
    for (long n = 1; n < 500; n++) {
        epx_config_t cfg = EPX_CONFIG_INITIALIZER;
        cfg.backend = EPX_BACKEND_CPU, cfg.timeout_ms = TIMEOUT_MS;
        epx_comm_t comm;
        epx_moe_t moe;
        CHECK(epx_comm_init_mpi(&comm, MPI_COMM_WORLD, &cfg) == EPX_SUCCESS, "%s", epx_get_last_error());
        epx_moe_config_t mc = EPX_MOE_CONFIG_INITIALIZER;
        mc.hidden = H, mc.max_tokens_per_rank = MAXT, mc.num_experts = 8, mc.max_topk = K, mc.dtype = EPX_F32;
        CHECK(epx_moe_create(comm, &mc, &moe) == EPX_SUCCESS, "%s", epx_get_last_error());
        epx_moe_dispatch_out_t out = {rx, NULL, ridx, rw, NULL, NULL, NULL, 4 * MAXT, -1, NULL};
        epx_moe_handle_t h = NULL;
        CHECK(epx_moe_dispatch(moe, &in, &out, &h, NULL) == EPX_SUCCESS, "%s", epx_get_last_error());
        int64_t rows = out.num_recv_tokens;
        if (!combine) epx_moe_handle_destroy(h), h = NULL;
        for (int64_t i = 0; i < rows * H; i++) y[i] = rx[i];
        epx_moe_combine_in_t cin = {y, rw};
        epx_moe_combine_out_t cout = {out_c, out_w};
        MPI_Barrier(MPI_COMM_WORLD);
        if (me == tgt) arm(n);
        double t0 = now_ms();
        out.num_recv_tokens = -1;
        epx_moe_handle_t h2 = NULL;
        int st = combine ? epx_moe_combine(moe, h, &cin, &cout, NULL) : epx_moe_dispatch(moe, &in, &out, &h2, NULL);
        double dt = now_ms() - t0;
        int fired = me == tgt ? arm(0) : 0;
        int64_t got = combine ? rows : out.num_recv_tokens;
        epx_moe_handle_destroy(h2), h2 = NULL;
        t0 = now_ms();
        int st2 = combine ? epx_moe_combine(moe, h, &cin, &cout, NULL) : epx_moe_dispatch(moe, &in, &out, &h2, NULL);
        double dt2 = now_ms() - t0;
        epx_moe_handle_destroy(h2);
        epx_moe_handle_destroy(h);
        int mine[3] = {st, (int)dt, fired}, all[4][3];
        MPI_Allgather(mine, 3, MPI_INT, all, 3, MPI_INT, MPI_COMM_WORLD);
        if (!all[tgt][2]) { /* the call made fewer than n allocations */
            epx_moe_destroy(moe), epx_comm_destroy(comm);
            break;
        }
        cases++;
        CHECK(all[tgt][0] == EPX_SUCCESS || all[tgt][0] == EPX_ERR_NO_MEMORY || all[tgt][0] == EPX_ERR_SYSTEM,
              "n=%ld: rank %d's call returned %s", n, tgt, epx_status_name(all[tgt][0]));
        if (st == EPX_SUCCESS) CHECK(got == rows, "n=%ld: %lld rows, expected %lld", n, (long long)got, (long long)rows);
        int stuck = 0;
        for (int p = 0; p < 4; p++) stuck |= p != tgt && broken_peer(all[p][0]);
        if (stuck) {
            left++;
            /* Rank tgt left its peers in the call: it must not look usable, and its host must know. */
            if (me == tgt)
                CHECK(st2 != EPX_SUCCESS && dt2 < TIMEOUT_MS / 2,
                      "n=%ld: after a failure that left the peers in the call, the next call returned %s after %.0f ms",
                      n, epx_status_name(st2), dt2);
            if (me == buddy)
                CHECK(dt < TIMEOUT_MS / 2 || st == EPX_SUCCESS,
                      "n=%ld: rank %d failed (%s) and rank %d (its host) returned %s after %.0f ms, not at once", n, tgt,
                      epx_status_name(all[tgt][0]), me, epx_status_name(st), dt);
        } else {
            for (int p = 0; p < 4; p++)
                CHECK(p == tgt || all[p][0] == EPX_SUCCESS || all[p][0] == EPX_ERR_REMOTE_INVALID, "n=%ld: rank %d returned %s", n, p,
                      epx_status_name(all[p][0]));
            CHECK(st2 == EPX_SUCCESS, "n=%ld: the communicator is not usable after %s: %s", n,
                  epx_status_name(all[tgt][0]), epx_get_last_error());
        }
        epx_moe_destroy(moe);
        epx_comm_destroy(comm);
    }
    if (me == 0) printf("test_oom %s: passed (%d allocations failed in turn, %d left the peers in the call)\n", combine ? "combine" : "dispatch", cases, left);
    MPI_Finalize();
    return 0;
}
