/*
 * Ranks as threads of one process, through the public API on the CPU backend: three
 * communicators made at once, then alltoalls and MoE dispatch + combine (an identity
 * expert) on each, every element checked; twice, one after the other. For
 * ThreadSanitizer (scripts/test.sh runs it there): what a process shares between its
 * communicators (logging, tunables, fault bookkeeping, the list of live segments) must
 * be safe when several are made and used on different threads.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "testlib.h"

#define TR 3    /* ranks */
#define TN 1000 /* alltoall elements per pair */
#define TT 64   /* tokens per rank */
#define TH 256  /* hidden */
#define TK 2

typedef struct {
    epx_unique_id_t id;
    int rank;
    int checked;
} thread_arg_t;

static void *rank_thread(void *p)
{
    thread_arg_t *a = p;
    int me = a->rank;
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.backend = EPX_BACKEND_CPU;
    cfg.timeout_ms = 30000; /* a hang fails in 30 s, not the default 300 */
    epx_comm_t comm;
    ASSERT_OK(epx_comm_init_rank(&comm, TR, me, &a->id, &cfg));
    int32_t *send = malloc(sizeof(int32_t) * TN * TR), *recv = malloc(sizeof(int32_t) * TN * TR);
    for (int it = 0; it < 20; it++) {
        for (int i = 0; i < TN * TR; i++) send[i] = it * 1000000 + me * 10000 + i;
        ASSERT_OK(epx_alltoall(comm, send, recv, TN, EPX_I32, NULL));
        for (int q = 0; q < TR; q++)
            for (int i = 0; i < TN; i++)
                if (recv[q * TN + i] != it * 1000000 + q * 10000 + me * TN + i)
                    TEST_FAIL_("rank %d, alltoall %d: element %d from rank %d wrong", me, it, i, q);
        a->checked++;
    }
    epx_moe_config_t mc = EPX_MOE_CONFIG_INITIALIZER;
    mc.hidden = TH, mc.max_tokens_per_rank = TT, mc.num_experts = 4 * TR, mc.max_topk = TK;
    mc.dtype = EPX_F32, mc.index_dtype = EPX_I32;
    epx_moe_t moe;
    ASSERT_OK(epx_moe_create(comm, &mc, &moe));
    int cap = TT * TR;
    float *x = malloc(sizeof(float) * TT * TH), *rx = malloc(sizeof(float) * cap * TH);
    float *out = malloc(sizeof(float) * TT * TH), *w = malloc(sizeof(float) * TT * TK);
    float *rw = malloc(sizeof(float) * cap * TK);
    int32_t *idx = malloc(sizeof(int32_t) * TT * TK);
    for (int it = 0; it < 10; it++) {
        /* Two experts a token, on one rank or two: out = x times the ranks (the sum of the
         * rows, exact in float32). */
        for (int t = 0; t < TT; t++) {
            for (int h = 0; h < TH; h++) x[t * TH + h] = (float)(it + t + h + me);
            idx[t * TK] = (t + me + it) % (4 * TR), idx[t * TK + 1] = (t + me + it + 5) % (4 * TR);
            w[t * TK] = 0.5f, w[t * TK + 1] = 0.25f;
        }
        epx_moe_dispatch_in_t din = {x, NULL, idx, w, TT, TK};
        epx_moe_dispatch_out_t dout;
        memset(&dout, 0, sizeof dout);
        dout.recv_x = rx, dout.recv_topk_weights = rw, dout.capacity = cap;
        epx_moe_handle_t h;
        ASSERT_OK(epx_moe_dispatch(moe, &din, &dout, &h, NULL));
        epx_moe_combine_in_t cin = {rx, rw};
        epx_moe_combine_out_t cout = {out, NULL};
        ASSERT_OK(epx_moe_combine(moe, h, &cin, &cout, NULL));
        ASSERT_OK(epx_moe_handle_destroy(h));
        for (int t = 0; t < TT; t++) {
            float ranks = idx[t * TK] / 4 == idx[t * TK + 1] / 4 ? 1.0f : 2.0f;
            for (int h = 0; h < TH; h++)
                if (out[t * TH + h] != ranks * x[t * TH + h])
                    TEST_FAIL_("rank %d, MoE %d: out[%d, %d] = %g, expected %g", me, it, t, h, out[t * TH + h],
                               ranks * x[t * TH + h]);
        }
        a->checked++;
    }
    ASSERT_OK(epx_moe_destroy(moe));
    ASSERT_OK(epx_comm_destroy(comm));
    free(send), free(recv), free(x), free(rx), free(out), free(w), free(rw), free(idx);
    return NULL;
}

int main(void)
{
    test_rank = 0;
    int passed = 0;
    for (int round = 0; round < 2; round++) {
        epx_unique_id_t id;
        ASSERT_OK(epx_get_unique_id(&id));
        pthread_t th[TR];
        thread_arg_t args[TR];
        for (int r = 0; r < TR; r++) {
            args[r] = (thread_arg_t){id, r, 0};
            ASSERT(pthread_create(&th[r], NULL, rank_thread, &args[r]) == 0);
        }
        for (int r = 0; r < TR; r++) {
            pthread_join(th[r], NULL);
            ASSERT_EQ(args[r].checked, 30);
            passed += args[r].checked;
        }
    }
    test_done(passed);
    return 0;
}
