/*
 * Out of memory in a MoE call across CPU hosts, at every allocation libepx makes in it:
 * run under mpiexec as 4 ranks (EPX_LOCAL_SIZE=2: hosts of 2; 1: hosts of 1) with
 * LD_PRELOAD=oom_shim, which fails the N-th allocation (or shared mmap) that libepx makes in
 * the call on one rank, for N = 1, 2, ... until the call makes fewer. `test_oom OP`, OP one
 * of dispatch, cached, combine, ll_dispatch, ll_combine: for each N, on a new communicator
 * and context, the dispatch a call along a handle needs runs first, unarmed; without `cold`
 * also the call itself, once, on another handle kept alive (so that the call still makes its
 * handle, routing step and row plan anew, but the buffers it exposes to its local peers
 * already have their size: mapping a local peer's buffer that grew in the call comes after
 * the verdict, docs/RELIABILITY.md; ctest runs cold on hosts of 1 and for the calls along a
 * handle). Then the call with the failure armed. Every N must end promptly and cleanly: the
 * failing rank returns EPX_ERR_NO_MEMORY (or EPX_ERR_SYSTEM) and every other rank
 * EPX_ERR_REMOTE_INVALID, each well before the timeout, with its outputs untouched; or every
 * rank succeeds with the outputs of the same call unarmed, bit for bit. Then the same call
 * again succeeds on every rank, promptly, with those outputs (the communicator is usable
 * and the ranks agree). TEST_OOM_VERBOSE=1 prints every rank's outcome of every N. Exits 77
 * (skipped) without the shim.
 *
 * `test_oom alltoallv`: an alltoallv across hosts whose messages between rank 0 and rank 2
 * (on another host in either grouping) are 4 GiB and 8 bytes each way, more MPI requests than
 * the batch of a message per rank the communicator holds, with rank 0's first allocation in
 * the call failing (the room for those requests). The same prompt, clean outcome; then a
 * small alltoallv succeeds on every rank. Its big buffers are address space only, never
 * touched (the receive buffers are not even accessible): nothing of them may move.
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
#include <sys/mman.h>
#include <time.h>

#include "epx.h"
#include "epx_mpi.h"

enum { H = 128, T = 512, K = 3, E = 8, R = 4, L = E / R, MAXT = 512, SLOTS = R * MAXT, TIMEOUT_MS = 1000 };
enum { OP_DISPATCH, OP_CACHED, OP_COMBINE, OP_LL_DISPATCH, OP_LL_COMBINE, NOPS };
static const char *const op_names[NOPS] = {"dispatch", "cached", "combine", "ll_dispatch", "ll_combine"};
static const int op_target[NOPS] = {0, 3, 1, 2, 1}; /* the rank whose allocations fail */
enum { SENTINEL = 0xa5 };

static int me;
static char said[2][300]; /* what this rank's armed call and the next one said */
#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "FAIL %s:%d (rank %d): %s: ", __FILE__, __LINE__, me, #cond);                              \
            fprintf(stderr, __VA_ARGS__);                                                                              \
            fprintf(stderr, " [rank %d said: \"%s\", then \"%s\"]\n", me, said[0], said[1]);                           \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                                              \
        }                                                                                                              \
    } while (0)
#define OK(call) CHECK((call) == EPX_SUCCESS, "%s", epx_get_last_error())

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Inputs (the same in every call) and every output of every op, in one block so that one
 * snapshot and one sentinel fill cover them. */
static float x[T * H], w[T * K];
static int64_t idx[T * K];
static float y[SLOTS * L * H]; /* expert outputs: the dispatch's rows (high-throughput) or slots (low-latency) */
static float yw[R * MAXT * K]; /* and the weights the high-throughput dispatch received */
static struct {
    float rx[R * MAXT * H], rw[R * MAXT * K];
    int64_t ridx[R * MAXT * K];
    int32_t src_rank[R * MAXT], src_tok[R * MAXT], per_expert[L];
    int64_t num_recv;
    float out_c[T * H], out_w[T * K];
    float lrx[L * SLOTS * H];
    int32_t lcount[L], lsrc_rank[L * SLOTS], lsrc_tok[L * SLOTS];
    float lout[T * H];
} o, ref;

/* One call of kind op (a dispatch makes *h, the others go along it) into o. */
static int call(epx_moe_t moe, int op, epx_moe_handle_t *h)
{
    epx_moe_dispatch_in_t din = {x, NULL, idx, w, T, K};
    epx_moe_dispatch_out_t dout = {o.rx, NULL, o.ridx, o.rw, o.src_rank, o.src_tok, o.per_expert, R * MAXT, -1, NULL};
    epx_moe_combine_in_t cin = {y, NULL};
    epx_moe_combine_out_t cout = {o.out_c, o.out_w};
    epx_moe_ll_dispatch_in_t lin = {x, idx, T, K};
    epx_moe_ll_dispatch_out_t lout = {o.lrx, NULL, o.lcount, o.lsrc_rank, o.lsrc_tok};
    epx_moe_ll_combine_in_t lcin = {y, w};
    int st = EPX_SUCCESS;
    memset(&o, SENTINEL, sizeof o);
    switch (op) {
    case OP_DISPATCH:
        st = epx_moe_dispatch(moe, &din, &dout, h, NULL);
        break;
    case OP_CACHED:
        st = epx_moe_dispatch_cached(moe, *h, &din, &dout, NULL);
        break;
    case OP_COMBINE:
        cin.topk_weights = yw;
        st = epx_moe_combine(moe, *h, &cin, &cout, NULL);
        break;
    case OP_LL_DISPATCH:
        st = epx_moe_ll_dispatch(moe, &lin, &lout, h, NULL);
        break;
    default:
        st = epx_moe_ll_combine(moe, *h, &lcin, o.lout, NULL);
        break;
    }
    if ((op == OP_DISPATCH || op == OP_CACHED) && st == EPX_SUCCESS) o.num_recv = dout.num_recv_tokens;
    return st;
}

/* Whether o holds nothing but the sentinel. */
static int untouched(void)
{
    const unsigned char *p = (const unsigned char *)&o;
    for (size_t i = 0; i < sizeof o; i++)
        if (p[i] != SENTINEL) return 0;
    return 1;
}

static epx_status_t context(int ll, epx_comm_t *comm, epx_moe_t *moe)
{
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.backend = EPX_BACKEND_CPU, cfg.timeout_ms = TIMEOUT_MS;
    OK(epx_comm_init_mpi(comm, MPI_COMM_WORLD, &cfg));
    epx_moe_config_t mc = EPX_MOE_CONFIG_INITIALIZER;
    mc.hidden = H, mc.max_tokens_per_rank = MAXT, mc.num_experts = E, mc.max_topk = K, mc.dtype = EPX_F32;
    mc.index_dtype = EPX_I64, mc.mode = ll ? EPX_MOE_LOW_LATENCY : EPX_MOE_HIGH_THROUGHPUT;
    return epx_moe_create(*comm, &mc, moe);
}

/* test_oom alltoallv (above). */
static int big_alltoallv(int (*arm)(long))
{
    const int64_t big = ((int64_t)4 << 30) + 8;
    const int tgt = 0, peer = me == 0 ? 2 : me == 2 ? 0 : -1;
    char *sbuf = mmap(NULL, (size_t)big, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    char *rbuf = mmap(NULL, (size_t)big, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    CHECK(sbuf != MAP_FAILED && rbuf != MAP_FAILED, "no address space for 2 x %lld bytes", (long long)big);
    int64_t cnt[R] = {0}, dsp[R] = {0};
    if (peer >= 0) cnt[peer] = big;
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.backend = EPX_BACKEND_CPU, cfg.timeout_ms = TIMEOUT_MS;
    epx_comm_t comm;
    OK(epx_comm_init_mpi(&comm, MPI_COMM_WORLD, &cfg));
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == tgt) arm(1);
    double t0 = now_ms();
    int st = epx_alltoallv(comm, sbuf, cnt, dsp, rbuf, cnt, dsp, EPX_U8, NULL);
    double dt = now_ms() - t0;
    int fired = me == tgt ? arm(0) : 0;
    snprintf(said[0], sizeof said[0], "%s", st == EPX_SUCCESS ? "" : epx_get_last_error());
    /* Then usable: one element to every rank. */
    int64_t s[R], r[R], one[R], at[R];
    for (int p = 0; p < R; p++)
        s[p] = me * 10 + p, r[p] = -1, one[p] = 1, at[p] = p;
    int st2 = epx_alltoallv(comm, s, one, at, r, one, at, EPX_I64, NULL);
    snprintf(said[1], sizeof said[1], "%s", st2 == EPX_SUCCESS ? "" : epx_get_last_error());
    int got = 1;
    for (int p = 0; p < R; p++)
        got &= r[p] == p * 10 + me;
    int mine[5] = {st, (int)dt, fired, st2, got}, all[R][5];
    MPI_Allgather(mine, 5, MPI_INT, all, 5, MPI_INT, MPI_COMM_WORLD);
    CHECK(all[tgt][2], "rank %d's call made no allocation to fail", tgt);
    for (int p = 0; p < R; p++)
        CHECK(all[p][0] == (p == tgt ? EPX_ERR_NO_MEMORY : EPX_ERR_REMOTE_INVALID) && all[p][1] < TIMEOUT_MS / 2,
              "rank %d's call returned %s after %d ms (rank %d: %s)", p, epx_status_name(all[p][0]), all[p][1], tgt,
              epx_status_name(all[tgt][0]));
    for (int p = 0; p < R; p++)
        CHECK(all[p][3] == EPX_SUCCESS && all[p][4], "rank %d's next alltoallv returned %s%s", p,
              epx_status_name(all[p][3]), all[p][4] ? "" : " (wrong data)");
    epx_comm_destroy(comm);
    munmap(sbuf, (size_t)big), munmap(rbuf, (size_t)big);
    if (me == 0) printf("test_oom alltoallv: passed (4 GiB each way between ranks 0 and 2, rank 0 out of memory)\n");
    MPI_Finalize();
    return 0;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int np;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    int (*arm)(long) = (int (*)(long))dlsym(RTLD_DEFAULT, "epx_test_oom_arm");
    if (arm && np == R && argc > 1 && !strcmp(argv[1], "alltoallv")) return big_alltoallv(arm);
    int op = NOPS;
    for (int i = 0; argc > 1 && i < NOPS; i++)
        if (!strcmp(argv[1], op_names[i])) op = i;
    CHECK(op < NOPS, "usage: test_oom dispatch|cached|combine|ll_dispatch|ll_combine [cold] | alltoallv");
    /* cold: the call is the first of its kind on its context. */
    const int cold = argc > 2 && !strcmp(argv[2], "cold");
    if (!arm || np != R) {
        if (me == 0) printf("test_oom: skipped (needs LD_PRELOAD=oom_shim and %d ranks)\n", R);
        MPI_Finalize();
        return 77;
    }
    const int tgt = op_target[op], ll = op >= OP_LL_DISPATCH, base = ll ? OP_LL_DISPATCH : OP_DISPATCH;
    for (int i = 0; i < T * H; i++) x[i] = (float)(me * 100 + i % 97);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++)
            idx[t * K + k] = (t + 3 * k + me) % 9 == 8 ? -1 : (t * 5 + k * 3 + me) % E, w[t * K + k] = 0.5f + 0.25f * k;
    /* The reference, unarmed: the dispatch gives the expert outputs (its rows) and weights. */
    epx_comm_t comm;
    epx_moe_t moe;
    epx_moe_handle_t h = NULL;
    OK(context(ll, &comm, &moe));
    OK(call(moe, base, &h));
    if (ll)
        memcpy(y, o.lrx, sizeof o.lrx);
    else
        memcpy(y, o.rx, sizeof o.rx), memcpy(yw, o.rw, sizeof o.rw);
    if (op != base) OK(call(moe, op, &h));
    ref = o;
    epx_moe_handle_destroy(h), epx_moe_destroy(moe), epx_comm_destroy(comm);
    int cases = 0, failed = 0;
    for (long n = 1; n < 1000; n++) {
        OK(context(ll, &comm, &moe));
        /* Unarmed first: warm, the same calls on a handle kept alive (the buffers the call
         * exposes get their size; its handle and row plan are made anew); then the dispatch
         * the call goes along. */
        epx_moe_handle_t hw = NULL, hc = NULL, hn = NULL, hn2 = NULL;
        if (!cold) OK(call(moe, base, &hw));
        if (!cold && op != base) OK(call(moe, op, &hw));
        if (op != base) OK(call(moe, base, &hc));
        MPI_Barrier(MPI_COMM_WORLD);
        if (me == tgt) arm(n);
        double t0 = now_ms();
        int st = call(moe, op, op == base ? &hn : &hc);
        double dt = now_ms() - t0;
        int fired = me == tgt ? arm(0) : 0;
        int same = !memcmp(&o, &ref, sizeof o), clean = untouched();
        snprintf(said[0], sizeof said[0], "%s", st == EPX_SUCCESS ? "" : epx_get_last_error());
        t0 = now_ms();
        int st2 = call(moe, op, op == base ? &hn2 : &hc);
        double dt2 = now_ms() - t0;
        snprintf(said[1], sizeof said[1], "%s", st2 == EPX_SUCCESS ? "" : epx_get_last_error());
        int same2 = !memcmp(&o, &ref, sizeof o);
        epx_moe_handle_destroy(hw), epx_moe_handle_destroy(hc), epx_moe_handle_destroy(hn), epx_moe_handle_destroy(hn2);
        int mine[7] = {st, (int)dt, fired, same, clean, st2, (int)dt2}, all[R][7];
        MPI_Allgather(mine, 7, MPI_INT, all, 7, MPI_INT, MPI_COMM_WORLD);
        epx_moe_destroy(moe);
        epx_comm_destroy(comm);
        if (getenv("TEST_OOM_VERBOSE")) /* every rank's outcome of every N */
            fprintf(stderr,
                    "n=%ld rank %d: %s after %d ms (fired %d, as unarmed %d, untouched %d), then %s [%s] [%s]\n", n, me,
                    epx_status_name(st), (int)dt, fired, same, clean, epx_status_name(st2), said[0], said[1]);
        if (!all[tgt][2]) break; /* the call made fewer than n allocations */
        cases++;
        int ts = all[tgt][0];
        CHECK(ts == EPX_SUCCESS || ts == EPX_ERR_NO_MEMORY || ts == EPX_ERR_SYSTEM, "n=%ld: rank %d's call returned %s",
              n, tgt, epx_status_name(ts));
        failed += ts != EPX_SUCCESS;
        for (int p = 0; p < R; p++) {
            /* Prompt and clean: everyone fails with the failing rank, at once, writing nothing. */
            CHECK(all[p][1] < TIMEOUT_MS / 2, "n=%ld: rank %d's call returned %s after %d ms (rank %d: %s)", n, p,
                  epx_status_name(all[p][0]), all[p][1], tgt, epx_status_name(ts));
            if (ts == EPX_SUCCESS)
                CHECK(all[p][0] == EPX_SUCCESS && all[p][3], "n=%ld: rank %d succeeded, rank %d returned %s%s", n, tgt,
                      p, epx_status_name(all[p][0]), all[p][3] ? "" : " (outputs differ from the unarmed call's)");
            else
                CHECK((p == tgt || all[p][0] == EPX_ERR_REMOTE_INVALID) && all[p][4],
                      "n=%ld: rank %d failed (%s), rank %d returned %s%s", n, tgt, epx_status_name(ts), p,
                      epx_status_name(all[p][0]), all[p][4] ? "" : " and wrote outputs");
            /* And then usable: the same call succeeds everywhere, as unarmed. */
            CHECK(all[p][5] == EPX_SUCCESS && all[p][6] < TIMEOUT_MS / 2,
                  "n=%ld: after %s on rank %d, rank %d's next call returned %s after %d ms", n, epx_status_name(ts),
                  tgt, p, epx_status_name(all[p][5]), all[p][6]);
        }
        CHECK(same2, "n=%ld: after %s on rank %d, the next call's outputs differ from the unarmed call's", n,
              epx_status_name(ts), tgt);
    }
    CHECK(cases > 0, "the call made no allocation to fail");
    if (me == 0)
        printf("test_oom %s%s: passed (%d allocations failed in turn on rank %d: %d failed the call on every rank at "
               "once, %d were absorbed)\n",
               op_names[op], cold ? " cold" : "", cases, tgt, failed, cases - failed);
    MPI_Finalize();
    return 0;
}
