/*
 * Faults injected with EPX_FAULT (a delayed rank, a rank that dies in the middle of an
 * operation, a rank that announces a wrong size) and a rank that aborts while the others
 * are inside an operation, on alltoall, alltoallv, MoE dispatch and combine and their
 * low-latency forms (CPU backend). The faulty rank is always the last one.
 *
 * What must hold (README, "Errors"):
 *   - every rank returns within the timeout (plus slack for a loaded machine), none hangs;
 *   - a delay shorter than the timeout changes nothing: every rank succeeds, data exact;
 *   - a longer delay: the others return EPX_ERR_TIMEOUT (or EPX_ERR_PEER_FAILURE, when they
 *     see another survivor give up first) and the late rank EPX_ERR_PEER_FAILURE; nobody
 *     wrote a byte of its outputs;
 *   - a rank killed after posting to half of its peers: the survivors return
 *     EPX_ERR_PEER_FAILURE (or EPX_ERR_TIMEOUT); each output byte holds either its old value
 *     or the one a successful call writes. A survivor that had everything it needed from
 *     the dead rank and exposed no buffer to it (alltoallv through eager slots) may succeed
 *     with exact data; its next call then fails;
 *   - a wrong size: the ranks that see it return EPX_ERR_MISMATCH (alltoall(v): the two
 *     ranks of the pair, the others succeed with exact data; MoE: every rank) without
 *     writing anything, and the communicator stays usable;
 *   - an abort: the others return EPX_ERR_PEER_FAILURE well before the timeout without
 *     writing anything;
 *   - kill_slow_reader: the kill, while rank 0 is still in the healthy operation before it
 *     (a delay once it holds every post, before it reads: EPX_FAULT at=enqueue). Ranks that
 *     exposed nothing to it finish that operation, and the survivors give up on the dead
 *     rank in the next one; rank 0's healthy operation must still succeed, as must
 *     everything else a kill allows;
 *   - count_slow_reader (alltoall(v), 3+ ranks): a wrong size between the last rank and rank
 *     0 while rank 1, outside that pair, sleeps 1.6 x the timeout before it reads. The pair
 *     returns EPX_ERR_MISMATCH, or EPX_ERR_TIMEOUT when it exposed its send buffer to rank 1
 *     and waited for it in vain (then it has given up: rank 1 must not trust that buffer),
 *     writing nothing, and rewrites its send buffer. Rank 1 succeeds with exact data or
 *     fails with each output byte old or exact; never a success with what the pair wrote
 *     afterwards;
 *   - kill_reading: the last rank dies once it holds every post of the operation, its own
 *     all made, before it reads: the others read what it posted (its memory may be gone,
 *     its shared memory is not) and must end as after a kill;
 *   - invalid_late: delay_long, with rank 0 passing a NULL input (send, x or y) in the same
 *     call: its round breaks, so it too must return EPX_ERR_TIMEOUT (or PEER_FAILURE) and
 *     its communicator is broken, not its own EPX_ERR_INVALID_ARGUMENT on a communicator
 *     that looks usable;
 *   - slow_reader: the last rank pauses 0.6 x the timeout after each piece it copies
 *     (EPX_FAULT slow; at least two pieces in every op, alltoall 9 MiB per peer), so that it
 *     reads for longer than the timeout (checked) while the others wait for it, to finish
 *     reading their buffers or to arrive in the next call: without the restart of their
 *     clocks every op fails. It keeps moving, so nobody times out: every rank succeeds with
 *     exact data and the communicator stays usable;
 *   - slow_relay (alltoallv, 3+ ranks): the same slow last rank reads 12 MiB from rank 1,
 *     which waits for it to finish; rank 0 sends only eager messages, is done at once, and in
 *     the next call waits for rank 1, which is still waiting on the slow rank. Rank 1 passes
 *     the slow rank's progress on, so rank 0 must not time out either: both calls succeed
 *     with exact data everywhere;
 *   - stall_chain: slow_relay with pauses of 1.5 x the timeout: the slow rank has stalled.
 *     Rank 1 must time out naming it, and rank 0, whose last sign of progress from rank 1
 *     was relayed (its clock runs out with rank 1's), must not blame rank 1 but learn that it
 *     gave up: EPX_ERR_PEER_FAILURE. Nobody hangs; the slow rank fails when it wakes;
 *   - a broken communicator reports its error (epx_comm_get_async_error) and every later
 *     call returns it at once; a new communicator (a new unique id) over the ranks still
 *     alive then works, data checked.
 *
 * Usage: test_fault OP NRANKS [FAULT...] with OP alltoall, alltoallv, dispatch, combine,
 * ll_dispatch or ll_combine and FAULT delay_short, delay_long, kill, count, abort,
 * kill_slow_reader, count_slow_reader, kill_reading, invalid_late, slow_reader, slow_relay or
 * stall_chain (default: all of them).
 * Forks its own ranks: epx-run would stop the others as soon as one rank dies.
 */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "launch.h"
#include "testlib.h"

#define TIMEOUT_MS 400          /* the communicators under test */
#define RECOVERY_TIMEOUT_MS 10000 /* the communicator built afterwards */
#define SLACK_MS 1500           /* scheduling on a loaded 2-core machine, sanitizers */
#define POISON 0xEE
#define FAULT_EXIT 86 /* EPX__FAULT_EXIT_CODE */
#define MAXR 8

typedef enum { OP_ALLTOALL, OP_ALLTOALLV, OP_DISPATCH, OP_COMBINE, OP_LL_DISPATCH, OP_LL_COMBINE, OP_COUNT } op_t;
typedef enum {
    F_DELAY_SHORT,
    F_DELAY_LONG,
    F_KILL,
    F_COUNT,
    F_ABORT,
    F_KILL_SLOW_READER,
    F_COUNT_SLOW_READER,
    F_KILL_READING,
    F_INVALID_LATE,
    F_SLOW_READER,
    F_SLOW_RELAY,
    F_STALL_CHAIN,
    F_NUM
} fault_t;
static const char *op_names[] = {"alltoall", "alltoallv", "dispatch", "combine", "ll_dispatch", "ll_combine"};
#define IS_LL(op) ((op) == OP_LL_DISPATCH || (op) == OP_LL_COMBINE)
static const char *fault_names[] = {"delay_short",      "delay_long",        "kill",        "count", "abort",
                                    "kill_slow_reader", "count_slow_reader", "kill_reading", "invalid_late",
                                    "slow_reader",      "slow_relay",        "stall_chain"};

/* ---- One operation with its inputs, outputs and the image a success leaves ---------- */

#define H 64 /* MoE hidden */
#define T 16 /* MoE tokens per rank (= max_tokens_per_rank) */
#define K 2
#define LOCAL_EXPERTS 4

#include "fault_data.h"

/* alltoall's bytes per peer: 64 KiB, slow_reader 9 MiB (several pieces of src/cpu's copies). */
static size_t a2a_count = 64 << 10;

typedef struct {
    void *buf;
    uint8_t *expect; /* after a success; POISON where a success writes nothing */
    size_t bytes;
} out_t;

typedef struct {
    op_t op;
    int me, R;
    epx_comm_t comm;
    /* alltoall(v) */
    uint8_t *send, *recv;
    size_t count; /* alltoall: bytes per peer */
    int64_t sc[MAXR], sd[MAXR], rc[MAXR], rd[MAXR];
    /* MoE */
    epx_moe_t moe;
    epx_moe_handle_t handle; /* combine: the dispatch it combines along */
    uint16_t *x;             /* registered */
    int32_t topk[T * K];
    int64_t cap, rows;
    uint16_t *recv_x, *y, *combined;
    int32_t *src_rank, *src_token;
    int64_t num_recv;
    /* low-latency: [L, R*T] slots; expected outputs learnt from the first (healthy) run, whose
     * values test_moe checks against its reference */
    int32_t *recv_count;
    float w[T * K];
    bool learn;
    bool invalid; /* the next run passes a NULL input (a rejection of this rank's own) */
    out_t outs[4];
    int nouts;
} ctx_t;


static void add_out(ctx_t *c, void *buf, size_t bytes)
{
    out_t *o = &c->outs[c->nouts++];
    o->buf = buf;
    o->bytes = bytes;
    o->expect = xmalloc(bytes);
    memset(o->expect, POISON, bytes);
}

/* Low-latency dispatch or combine (after epx_moe_create); outputs learnt from the first run. */
static void ll_setup(ctx_t *c)
{
    int me = c->me, R = c->R;
    size_t slots = (size_t)LOCAL_EXPERTS * (size_t)R * T;
    ASSERT_OK(epx_mem_alloc(c->comm, sizeof(uint16_t) * T * H, (void **)&c->x));
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < K; k++) c->topk[t * K + k] = expert_of(R, me, t, k), c->w[t * K + k] = 0.25f * (float)(k + 1);
        for (int h = 0; h < H; h++) c->x[t * H + h] = x_val(me, t, h);
    }
    c->recv_x = xmalloc(sizeof(uint16_t) * slots * H);
    c->recv_count = xmalloc(sizeof(int32_t) * LOCAL_EXPERTS);
    c->src_rank = xmalloc(sizeof(int32_t) * slots);
    c->src_token = xmalloc(sizeof(int32_t) * slots);
    c->learn = true;
    if (c->op == OP_LL_DISPATCH) {
        add_out(c, c->recv_x, sizeof(uint16_t) * slots * H);
        add_out(c, c->recv_count, sizeof(int32_t) * LOCAL_EXPERTS);
        add_out(c, c->src_rank, sizeof(int32_t) * slots);
        add_out(c, c->src_token, sizeof(int32_t) * slots);
        return;
    }
    /* Combine along a dispatch; the experts return their inputs (y = recv_x). */
    epx_moe_ll_dispatch_in_t in = {c->x, c->topk, T, K};
    epx_moe_ll_dispatch_out_t out = {c->recv_x, NULL, c->recv_count, c->src_rank, c->src_token};
    ASSERT_OK(epx_moe_ll_dispatch(c->moe, &in, &out, &c->handle, NULL));
    c->y = xmalloc(sizeof(uint16_t) * slots * H);
    memcpy(c->y, c->recv_x, sizeof(uint16_t) * slots * H);
    c->combined = xmalloc(sizeof(uint16_t) * T * H);
    add_out(c, c->combined, sizeof(uint16_t) * T * H);
}

/* Set up the operation on `comm` (the collective calls it needs come first: MoE create,
 * and for combine the dispatch it combines along). */
static void ctx_setup(ctx_t *c, op_t op, epx_comm_t comm)
{
    memset(c, 0, sizeof *c);
    c->op = op;
    c->comm = comm;
    ASSERT_OK(epx_comm_rank(comm, &c->me));
    ASSERT_OK(epx_comm_size(comm, &c->R));
    int me = c->me, R = c->R;
    if (op == OP_ALLTOALL) {
        c->count = a2a_count; /* above the eager size: peers read the send buffer itself */
        c->send = xmalloc(c->count * (size_t)R);
        c->recv = xmalloc(c->count * (size_t)R);
        add_out(c, c->recv, c->count * (size_t)R);
        for (int p = 0; p < R; p++)
            for (size_t i = 0; i < c->count; i++) {
                c->send[(size_t)p * c->count + i] = a2a_byte(me, p, i);
                c->outs[0].expect[(size_t)p * c->count + i] = a2a_byte(p, me, i);
            }
        return;
    }
    if (op == OP_ALLTOALLV) {
        /* Uneven, all below the eager size; gaps between the segments stay untouched. */
        int64_t s = 0, r = 0;
        for (int p = 0; p < R; p++) {
            c->sc[p] = v_count(me, p), c->sd[p] = s, s += c->sc[p] + 3;
            c->rc[p] = v_count(p, me), c->rd[p] = r, r += c->rc[p] + 5;
        }
        c->send = xmalloc((size_t)s);
        c->recv = xmalloc((size_t)r);
        add_out(c, c->recv, (size_t)r);
        for (int p = 0; p < R; p++)
            for (int64_t i = 0; i < c->sc[p]; i++) c->send[c->sd[p] + i] = a2a_byte(me, p, (size_t)i);
        for (int p = 0; p < R; p++)
            for (int64_t i = 0; i < c->rc[p]; i++) c->outs[0].expect[c->rd[p] + i] = a2a_byte(p, me, (size_t)i);
        return;
    }
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = H;
    cfg.max_tokens_per_rank = T;
    cfg.num_experts = LOCAL_EXPERTS * R;
    cfg.max_topk = K;
    cfg.dtype = EPX_BF16;
    cfg.index_dtype = EPX_I32;
    if (IS_LL(op)) cfg.mode = EPX_MOE_LOW_LATENCY;
    ASSERT_OK(epx_moe_create(comm, &cfg, &c->moe));
    if (IS_LL(op)) {
        ll_setup(c);
        return;
    }
    ASSERT_OK(epx_moe_max_recv_tokens(c->moe, &c->cap));
    ASSERT_OK(epx_mem_alloc(comm, sizeof(uint16_t) * T * H, (void **)&c->x));
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < K; k++) c->topk[t * K + k] = expert_of(R, me, t, k);
        for (int h = 0; h < H; h++) c->x[t * H + h] = x_val(me, t, h);
    }
    c->recv_x = xmalloc(sizeof(uint16_t) * (size_t)c->cap * H);
    c->src_rank = xmalloc(sizeof(int32_t) * (size_t)c->cap);
    c->src_token = xmalloc(sizeof(int32_t) * (size_t)c->cap);
    /* The rows this rank receives, by (source rank, source token). */
    int64_t n = 0;
    int32_t rows_src[MAXR * T], rows_tok[MAXR * T];
    for (int p = 0; p < R; p++)
        for (int t = 0; t < T; t++)
            if (goes_to(R, p, t, me)) rows_src[n] = p, rows_tok[n++] = t;
    c->rows = n;
    if (op == OP_DISPATCH) {
        add_out(c, c->recv_x, sizeof(uint16_t) * (size_t)c->cap * H);
        add_out(c, c->src_rank, sizeof(int32_t) * (size_t)c->cap);
        add_out(c, c->src_token, sizeof(int32_t) * (size_t)c->cap);
        for (int64_t i = 0; i < n; i++) {
            for (int h = 0; h < H; h++) {
                uint16_t v = x_val(rows_src[i], rows_tok[i], h);
                memcpy(c->outs[0].expect + (size_t)(i * H + h) * 2, &v, 2);
            }
            memcpy(c->outs[1].expect + (size_t)i * 4, &rows_src[i], 4);
            memcpy(c->outs[2].expect + (size_t)i * 4, &rows_tok[i], 4);
        }
        return;
    }
    /* Combine: dispatch first (checked), then experts that return g(t, h) * (me + 1). */
    epx_moe_dispatch_in_t in = {c->x, NULL, c->topk, NULL, T, K};
    epx_moe_dispatch_out_t out = {c->recv_x, NULL, NULL, NULL, c->src_rank, c->src_token, NULL, c->cap, 0, NULL};
    ASSERT_OK(epx_moe_dispatch(c->moe, &in, &out, &c->handle, NULL));
    ASSERT_EQ(out.num_recv_tokens, n);
    c->y = xmalloc(sizeof(uint16_t) * (size_t)(n > 0 ? n : 1) * H);
    for (int64_t i = 0; i < n; i++) {
        ASSERT_EQ(c->src_rank[i], rows_src[i]);
        ASSERT_EQ(c->src_token[i], rows_tok[i]);
        for (int h = 0; h < H; h++) c->y[i * H + h] = epx_float_to_bf16((float)(g_val(rows_tok[i], h) * (me + 1)));
    }
    c->combined = xmalloc(sizeof(uint16_t) * T * H);
    add_out(c, c->combined, sizeof(uint16_t) * T * H);
    for (int t = 0; t < T; t++) {
        int w = 0;
        for (int q = 0; q < R; q++) w += goes_to(R, me, t, q) ? q + 1 : 0;
        for (int h = 0; h < H; h++) {
            uint16_t v = epx_float_to_bf16((float)(g_val(t, h) * w));
            memcpy(c->outs[0].expect + (size_t)(t * H + h) * 2, &v, 2);
        }
    }
}

static void ctx_poison(ctx_t *c)
{
    for (int i = 0; i < c->nouts; i++) memset(c->outs[i].buf, POISON, c->outs[i].bytes);
    c->num_recv = -7;
}

static epx_status_t ctx_run(ctx_t *c)
{
    const void *send = c->invalid ? NULL : c->send, *x = c->invalid ? NULL : c->x, *y = c->invalid ? NULL : c->y;
    switch (c->op) {
    case OP_ALLTOALL: return epx_alltoall(c->comm, send, c->recv, c->count, EPX_U8, NULL);
    case OP_ALLTOALLV: return epx_alltoallv(c->comm, send, c->sc, c->sd, c->recv, c->rc, c->rd, EPX_U8, NULL);
    case OP_DISPATCH: {
        epx_moe_dispatch_in_t in = {x, NULL, c->topk, NULL, T, K};
        epx_moe_dispatch_out_t out = {c->recv_x, NULL, NULL, NULL, c->src_rank, c->src_token, NULL, c->cap, c->num_recv, NULL};
        epx_moe_handle_t h = NULL;
        epx_status_t st = epx_moe_dispatch(c->moe, &in, &out, &h, NULL);
        c->num_recv = out.num_recv_tokens;
        if (st == EPX_SUCCESS) {
            ASSERT(h != NULL);
            epx_moe_handle_destroy(h);
        } else {
            ASSERT(h == NULL); /* no handle out of a failed dispatch */
        }
        return st;
    }
    case OP_COMBINE: {
        epx_moe_combine_in_t in = {y, NULL};
        epx_moe_combine_out_t out = {c->combined, NULL};
        return epx_moe_combine(c->moe, c->handle, &in, &out, NULL);
    }
    case OP_LL_DISPATCH: {
        epx_moe_ll_dispatch_in_t in = {x, c->topk, T, K};
        epx_moe_ll_dispatch_out_t out = {c->recv_x, NULL, c->recv_count, c->src_rank, c->src_token};
        epx_moe_handle_t h = NULL;
        epx_status_t st = epx_moe_ll_dispatch(c->moe, &in, &out, &h, NULL);
        ASSERT((st == EPX_SUCCESS) == (h != NULL));
        epx_moe_handle_destroy(h);
        return st;
    }
    case OP_LL_COMBINE: {
        epx_moe_ll_combine_in_t in = {y, c->w};
        return epx_moe_ll_combine(c->moe, c->handle, &in, c->combined, NULL);
    }
    default: return EPX_ERR_INTERNAL;
    }
}

typedef enum { EXACT, UNTOUCHED, OLD_OR_NEW } check_t;

/* EXACT: what a success leaves; UNTOUCHED: nothing written; OLD_OR_NEW: each byte either
 * untouched or what a success writes there. */
static void ctx_check(ctx_t *c, check_t how, const char *what)
{
    if (c->learn && how == EXACT) { /* the first healthy run tells */
        for (int i = 0; i < c->nouts; i++) memcpy(c->outs[i].expect, c->outs[i].buf, c->outs[i].bytes);
        c->learn = false;
        return;
    }
    for (int i = 0; i < c->nouts; i++) {
        const uint8_t *b = c->outs[i].buf, *e = c->outs[i].expect;
        for (size_t j = 0; j < c->outs[i].bytes; j++) {
            bool ok = how == EXACT ? b[j] == e[j] : how == UNTOUCHED ? b[j] == POISON : b[j] == POISON || b[j] == e[j];
            if (!ok)
                TEST_FAIL_("%s: output %d byte %zu is 0x%02x; expected %s (0x%02x, poison 0x%02x)", what, i, j, b[j],
                           how == EXACT ? "the exact value" : how == UNTOUCHED ? "the poison" : "poison or exact",
                           e[j], POISON);
        }
    }
    if (c->op == OP_DISPATCH) {
        bool exact = c->num_recv == c->rows, old = c->num_recv == -7;
        if (how == EXACT ? !exact : how == UNTOUCHED ? !old : !(exact || old))
            TEST_FAIL_("%s: num_recv_tokens = %lld (rows %lld)", what, (long long)c->num_recv, (long long)c->rows);
    }
}

/* A count fault's outcome: the mismatched ranks fail with nothing written, the others get
 * exact data; nobody waits for a timeout. */
static void expect_count(ctx_t *c, bool mismatched, epx_status_t st, double dt, const char *what)
{
    if (mismatched) {
        ASSERT_STATUS(st, EPX_ERR_MISMATCH);
        ctx_check(c, UNTOUCHED, what);
    } else {
        ASSERT_OK(st);
        ctx_check(c, EXACT, what);
    }
    if (dt > SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);
}

static void ctx_free(ctx_t *c)
{
    epx_moe_handle_destroy(c->handle);
    if (c->x) ASSERT_OK(epx_mem_free(c->comm, c->x));
    epx_moe_destroy(c->moe);
    free(c->send), free(c->recv), free(c->recv_x), free(c->y), free(c->combined), free(c->src_rank), free(c->src_token);
    free(c->recv_count);
    for (int i = 0; i < c->nouts; i++) free(c->outs[i].expect);
}

/* One healthy, checked operation on a new communicator. */
static void recover(op_t op, int nranks, int rank, const epx_unique_id_t *id)
{
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.timeout_ms = RECOVERY_TIMEOUT_MS;
    epx_comm_t comm;
    ASSERT_OK(epx_comm_init_rank(&comm, nranks, rank, id, &cfg));
    ctx_t c;
    ctx_setup(&c, op, comm);
    ctx_poison(&c);
    ASSERT_OK(ctx_run(&c));
    ctx_check(&c, EXACT, "new communicator");
    ctx_free(&c);
    epx_status_t async;
    ASSERT_OK(epx_comm_get_async_error(comm, &async));
    ASSERT_EQ(async, EPX_SUCCESS);
    ASSERT_OK(epx_comm_destroy(comm));
}

/* The step (operation number) of the operation under test: after the MoE context (1) and,
 * for combine, its dispatch; and after one healthy run of the operation. */
static int fault_step(op_t op)
{
    return (op >= OP_DISPATCH ? 1 : 0) + (op == OP_COMBINE || op == OP_LL_COMBINE ? 1 : 0) + 2;
}

/* The ranks (processes) of a scenario meet here once their buffers are filled, before their
 * first call (and slow_reader's before its call after the checks): filling or checking tens
 * of MiB may take one rank longer than the communicators' timeout after another (three
 * ranks on two cores, sanitizers), and time between calls counts. */
static pthread_barrier_t *start_line;

static void start_together(void) { pthread_barrier_wait(start_line); }

/* Scenarios in which the last rank's process ends. */
static bool killed(fault_t f) { return f == F_KILL || f == F_KILL_SLOW_READER || f == F_KILL_READING; }

/* count_slow_reader after the faulty call (module comment); every rank then starts over
 * on a new communicator, whatever its outcome. */
static int slow_reader_after_count(ctx_t *c, epx_status_t st, const char *what, const epx_unique_id_t *id2)
{
    int rank = c->me, R = c->R;
    op_t op = c->op;
    if (rank == 0 || rank == R - 1) {
        if (st != EPX_ERR_MISMATCH && st != EPX_ERR_TIMEOUT)
            TEST_FAIL_("%s: got %s, expected a mismatch (or a timeout waiting for the slow reader)", what,
                       epx_status_name(st));
        ctx_check(c, UNTOUCHED, what);
        size_t bytes = op == OP_ALLTOALL ? c->count * (size_t)R : (size_t)(c->sd[R - 1] + c->sc[R - 1]);
        for (size_t i = 0; i < bytes; i++) c->send[i] = (uint8_t)~c->send[i]; /* the call returned: mine again */
        usleep(2 * TIMEOUT_MS * 1000); /* alive while the slow reader reads */
    } else if (st == EPX_SUCCESS) {
        ctx_check(c, EXACT, what);
    } else {
        if (st != EPX_ERR_PEER_FAILURE && st != EPX_ERR_TIMEOUT)
            TEST_FAIL_("%s: got %s, expected success or a peer failure", what, epx_status_name(st));
        ctx_check(c, OLD_OR_NEW, what);
    }
    epx_comm_t comm = c->comm;
    ctx_free(c);
    ASSERT_OK(epx_comm_abort(comm));
    recover(op, R, rank, id2);
    return 0;
}

/* An alltoallv of bytes (a2a_byte) between hand-made counts: rank me's send buffer for
 * sc / sd, and the check of what it received through rc / rd (old_ok: a failed call, each
 * byte still POISON or exact); `what` names the call in a failure. */
static void v_fill(uint8_t *send, const int64_t *sc, const int64_t *sd, int R, int me)
{
    for (int p = 0; p < R; p++)
        for (int64_t i = 0; i < sc[p]; i++) send[sd[p] + i] = a2a_byte(me, p, (size_t)i);
}

static void v_check(const uint8_t *recv, const int64_t *rc, const int64_t *rd, int R, int me, bool old_ok,
                    const char *what)
{
    for (int p = 0; p < R; p++)
        for (int64_t i = 0; i < rc[p]; i++) {
            uint8_t b = recv[rd[p] + i];
            if (b != a2a_byte(p, me, (size_t)i) && !(old_ok && b == POISON))
                TEST_FAIL_("%s: byte %lld from rank %d %s", what, (long long)i, p,
                           old_ok ? "neither old nor exact" : "wrong");
        }
}

/* slow_relay and stall_chain (module comment): two alltoallv calls, the first (step 1) with
 * the slow rank. */
static int slow_relay_main(int rank, int R, const epx_unique_id_t *id, bool stall)
{
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.timeout_ms = TIMEOUT_MS;
    epx_comm_t comm;
    ASSERT_OK(epx_comm_init_rank(&comm, R, rank, id, &cfg));
    const int64_t big = 12 << 20, small = 16; /* small: eager, nothing exposed */
    int64_t sc[MAXR], sd[MAXR], rc[MAXR], rd[MAXR], s = 0, r = 0;
    for (int p = 0; p < R; p++) {
        sc[p] = rank == 1 && p == R - 1 ? big : small, sd[p] = s, s += sc[p];
        rc[p] = p == 1 && rank == R - 1 ? big : small, rd[p] = r, r += rc[p];
    }
    uint8_t *send = xmalloc((size_t)s), *recv = xmalloc((size_t)r);
    v_fill(send, sc, sd, R, rank);
    start_together();
    for (int call = 1; call <= 2; call++) {
        memset(recv, POISON, (size_t)r);
        double t0 = test_now_ms();
        epx_status_t st = epx_alltoallv(comm, send, sc, sd, recv, rc, rd, EPX_U8, NULL);
        double dt = test_now_ms() - t0;
        printf("alltoallv/%s np%d rank %d call %d: %s after %.0f ms%s%s\n", stall ? "stall_chain" : "slow_relay", R,
               rank, call, epx_status_name(st), dt, st ? ": " : "", st ? epx_comm_get_last_error(comm) : "");
        fflush(stdout);
        if (stall && (rank == 1 || rank == R - 1 || call == 2)) {
            const char *msg = epx_comm_get_last_error(comm);
            if (rank == 1 && (st != EPX_ERR_TIMEOUT || !strstr(msg, "rank 1 timed out waiting for rank")))
                TEST_FAIL_("stall_chain rank 1: %s (%s), expected its timeout on the slow rank", epx_status_name(st),
                           msg);
            if (rank == 0 && (st != EPX_ERR_PEER_FAILURE || !strstr(msg, "rank 1 gave up")))
                TEST_FAIL_("stall_chain rank 0: %s (%s), expected rank 1's giving up", epx_status_name(st), msg);
            if (rank == 1) usleep(TIMEOUT_MS * 1000); /* gave up, not yet aborted, while rank 0 looks */
            if (st != EPX_ERR_TIMEOUT && st != EPX_ERR_PEER_FAILURE)
                TEST_FAIL_("stall_chain rank %d call %d: %s (%s)", rank, call, epx_status_name(st), msg);
            if (dt > 3 * TIMEOUT_MS + SLACK_MS) TEST_FAIL_("stall_chain rank %d call %d took %.0f ms", rank, call, dt);
            break;
        }
        ASSERT_OK(st);
        char what[64];
        snprintf(what, sizeof what, "slow_relay rank %d call %d", rank, call);
        v_check(recv, rc, rd, R, rank, false, what);
        if (call == 1 && rank == R - 1 && dt <= 2 * TIMEOUT_MS)
            TEST_FAIL_("slow_relay: the slow reader took %.0f ms, not over twice the timeout (%d ms)", dt, TIMEOUT_MS);
    }
    free(send), free(recv);
    if (stall) ASSERT_OK(epx_comm_abort(comm));
    else ASSERT_OK(epx_comm_destroy(comm));
    return 0;
}

static int rank_main(op_t op, fault_t f, int rank, int R, const epx_unique_id_t *id, const epx_unique_id_t *id2)
{
    if (f == F_SLOW_RELAY || f == F_STALL_CHAIN) return slow_relay_main(rank, R, id, f == F_STALL_CHAIN);
    test_rank = rank;
    char what[96];
    snprintf(what, sizeof what, "%s/%s np%d rank %d", op_names[op], fault_names[f], R, rank);
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.timeout_ms = f == F_ABORT ? RECOVERY_TIMEOUT_MS : TIMEOUT_MS; /* abort: must not need the timeout */
    epx_comm_t comm;
    ASSERT_OK(epx_comm_init_rank(&comm, R, rank, id, &cfg));
    ctx_t c;
    ctx_setup(&c, op, comm);
    ctx_poison(&c);
    start_together();
    ASSERT_OK(ctx_run(&c)); /* healthy first */
    ctx_check(&c, EXACT, what);
    bool bad = rank == R - 1;

    if (f == F_ABORT && bad) {
        usleep(100 * 1000); /* the others are inside the operation by now */
        ctx_free(&c);
        ASSERT_OK(epx_comm_abort(comm));
        printf("%s: aborted its communicator\n", what);
        recover(op, R, rank, id2);
        return 0;
    }
    ctx_poison(&c);
    c.invalid = f == F_INVALID_LATE && rank == 0;
    double t0 = test_now_ms();
    epx_status_t st = ctx_run(&c); /* the faulty rank's step: a kill ends its process here */
    double dt = test_now_ms() - t0;
    c.invalid = false;
    printf("%s: %s after %.0f ms%s%s\n", what, epx_status_name(st), dt, st ? ": " : "",
           st ? epx_comm_get_last_error(comm) : "");
    fflush(stdout);

    if (f == F_COUNT_SLOW_READER) return slow_reader_after_count(&c, st, what, id2);
    bool pair = op <= OP_ALLTOALLV ? (bad || rank == 0) : true; /* who sees a wrong size */
    bool broken = false;
    switch (f) {
    case F_DELAY_SHORT:
        ASSERT_OK(st);
        ctx_check(&c, EXACT, what);
        if (dt > TIMEOUT_MS / 4 + SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);
        break;
    case F_SLOW_READER:
        ASSERT_OK(st);
        ctx_check(&c, EXACT, what);
        if (bad && dt <= TIMEOUT_MS)
            TEST_FAIL_("%s: the slow reader took %.0f ms, not longer than the timeout (%d ms)", what, dt, TIMEOUT_MS);
        ctx_poison(&c);
        start_together(); /* after checking 27 MiB, which the timeout between calls would count */
        ASSERT_OK(ctx_run(&c)); /* still usable */
        ctx_check(&c, EXACT, what);
        break;
    case F_DELAY_LONG:
    case F_INVALID_LATE: /* rank 0's rejection of its own input does not hide the broken round */
        if (bad) {
            ASSERT_STATUS(st, EPX_ERR_PEER_FAILURE); /* the others gave up on it */
            if (dt > 3 * TIMEOUT_MS + TIMEOUT_MS + SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);
        } else {
            if (st != EPX_ERR_TIMEOUT && st != EPX_ERR_PEER_FAILURE)
                TEST_FAIL_("%s: got %s, expected a timeout", what, epx_status_name(st));
            if (dt > TIMEOUT_MS + SLACK_MS) TEST_FAIL_("%s: took %.0f ms, timeout %d ms", what, dt, TIMEOUT_MS);
        }
        ctx_check(&c, UNTOUCHED, what);
        broken = true;
        break;
    case F_KILL:
    case F_KILL_SLOW_READER:
    case F_KILL_READING:
        if (dt > TIMEOUT_MS + SLACK_MS) TEST_FAIL_("%s: took %.0f ms, timeout %d ms", what, dt, TIMEOUT_MS);
        if (st == EPX_SUCCESS && op == OP_ALLTOALLV) {
            ctx_check(&c, EXACT, what);
            t0 = test_now_ms();
            st = ctx_run(&c); /* the next call must see the death */
            dt = test_now_ms() - t0;
            printf("%s: next call %s after %.0f ms\n", what, epx_status_name(st), dt);
            if (dt > TIMEOUT_MS + SLACK_MS) TEST_FAIL_("%s: next call took %.0f ms", what, dt);
        }
        if (st != EPX_ERR_PEER_FAILURE && st != EPX_ERR_TIMEOUT)
            TEST_FAIL_("%s: got %s, expected a peer failure", what, epx_status_name(st));
        ctx_check(&c, OLD_OR_NEW, what);
        broken = true;
        break;
    case F_COUNT:
        expect_count(&c, pair, st, dt, what);
        /* Still usable: the next call is healthy (the fault fires once). */
        ctx_poison(&c);
        ASSERT_OK(ctx_run(&c));
        ctx_check(&c, EXACT, what);
        break;
    case F_ABORT:
        ASSERT_STATUS(st, EPX_ERR_PEER_FAILURE);
        ctx_check(&c, UNTOUCHED, what);
        if (dt > 100 + SLACK_MS) TEST_FAIL_("%s: took %.0f ms after an abort", what, dt);
        broken = true;
        break;
    default: break;
    }
    epx_status_t async;
    ASSERT_OK(epx_comm_get_async_error(comm, &async));
    if (!broken) {
        ASSERT_EQ(async, EPX_SUCCESS);
        ctx_free(&c);
        ASSERT_OK(epx_comm_destroy(comm));
        return 0;
    }
    ASSERT(async == st);
    t0 = test_now_ms();
    ASSERT_STATUS(ctx_run(&c), async); /* stays broken, answers at once */
    if (test_now_ms() - t0 > 200) TEST_FAIL_("%s: a call on the broken communicator took %.0f ms", what, test_now_ms() - t0);
    if (c.moe) {
        /* A MoE context outlives its communicator: calls on it return EPX_ERR_ABORTED. */
        ASSERT_OK(epx_comm_abort(comm));
        c.x = NULL; /* registered memory went with the communicator */
        ASSERT_STATUS(ctx_run(&c), EPX_ERR_ABORTED);
        ctx_free(&c);
    } else {
        ctx_free(&c);
        ASSERT_OK(epx_comm_abort(comm));
    }
    /* A new communicator over the ranks still alive (the killed one was the last). */
    recover(op, killed(f) ? R - 1 : R, rank, id2);
    fflush(stdout);
    return 0;
}

/* One scenario in a process of its own, so that EPX_FAULT is read afresh. */
static int scenario(op_t op, fault_t f, int R)
{
    int step = fault_step(op);
    char text[128] = "";
    a2a_count = 64 << 10;
    switch (f) {
    case F_DELAY_SHORT: snprintf(text, sizeof text, "delay:rank=%d,step=%d,ms=%d", R - 1, step, TIMEOUT_MS / 4); break;
    case F_DELAY_LONG: snprintf(text, sizeof text, "delay:rank=%d,step=%d,ms=%d", R - 1, step, 3 * TIMEOUT_MS); break;
    case F_KILL: snprintf(text, sizeof text, "kill:rank=%d,step=%d", R - 1, step); break;
    case F_KILL_SLOW_READER:
        snprintf(text, sizeof text, "delay:rank=0,step=%d,ms=%d,at=enqueue;kill:rank=%d,step=%d", step - 1,
                 TIMEOUT_MS / 2, R - 1, step);
        break;
    case F_COUNT_SLOW_READER:
        snprintf(text, sizeof text, "count:rank=%d,step=%d;delay:rank=1,step=%d,ms=%d,at=enqueue", R - 1, step, step,
                 TIMEOUT_MS * 8 / 5);
        break;
    case F_KILL_READING: snprintf(text, sizeof text, "kill:rank=%d,step=%d,at=enqueue", R - 1, step); break;
    case F_INVALID_LATE: snprintf(text, sizeof text, "delay:rank=%d,step=%d,ms=%d", R - 1, step, 3 * TIMEOUT_MS); break;
    case F_COUNT: snprintf(text, sizeof text, "count:rank=%d,step=%d", R - 1, step); break;
    case F_SLOW_READER:
        snprintf(text, sizeof text, "slow:rank=%d,step=%d,ms=%d", R - 1, step, TIMEOUT_MS * 3 / 5);
        a2a_count = 9 << 20;
        break;
    case F_SLOW_RELAY: snprintf(text, sizeof text, "slow:rank=%d,step=1,ms=%d", R - 1, TIMEOUT_MS / 2); break;
    case F_STALL_CHAIN: snprintf(text, sizeof text, "slow:rank=%d,step=1,ms=%d", R - 1, 3 * TIMEOUT_MS / 2); break;
    default: break;
    }
    setenv("EPX_FAULT", text, 1);
    /* Rank 0 makes the ids (and runs their listeners) and hands them out through a pipe:
     * this process forks before any thread exists (fork beside a starting thread can
     * deadlock the child, in sanitizer builds especially). */
    int ids[2];
    ASSERT(pipe(ids) == 0);
    start_line = mmap(NULL, sizeof *start_line, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    ASSERT(start_line != MAP_FAILED);
    pthread_barrierattr_t battr;
    ASSERT(pthread_barrierattr_init(&battr) == 0);
    ASSERT(pthread_barrierattr_setpshared(&battr, PTHREAD_PROCESS_SHARED) == 0);
    ASSERT(pthread_barrier_init(start_line, &battr, (unsigned)R) == 0);
    pthread_barrierattr_destroy(&battr);
    fault_ids_t both;
    const epx_unique_id_t *id = &both.id, *id2 = &both.id2;
    fflush(stdout);
    pid_t pids[MAXR];
    for (int r = 0; r < R; r++) {
        pids[r] = fork();
        ASSERT(pids[r] >= 0);
        if (pids[r] != 0) continue;
        test_rank = r;
        fault_ids_share(r, R, ids, &both);
        int rc = rank_main(op, f, r, R, id, id2);
        fflush(stdout);
        _exit(rc);
    }
    int failed = 0;
    for (int r = 0; r < R; r++) {
        int status;
        ASSERT(waitpid(pids[r], &status, 0) == pids[r]);
        int want = killed(f) && r == R - 1 ? FAULT_EXIT : 0;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != want) {
            fprintf(stderr, "FAIL %s/%s np%d: rank %d ended with status 0x%x (expected exit %d)\n", op_names[op],
                    fault_names[f], R, r, status, want);
            failed = 1;
        }
    }
    pthread_barrier_destroy(start_line);
    munmap(start_line, sizeof *start_line);
    close(ids[1]);
    bool got = read(ids[0], &both, sizeof both) == sizeof both;
    close(ids[0]);
    char idtext[EPX_UNIQUE_ID_STRLEN];
    if (got && epx_unique_id_to_string(id, idtext, sizeof idtext) == EPX_SUCCESS)
        epx_launch_cleanup_shm(idtext); /* what the killed rank left */
    return failed;
}

#ifdef EPX_HAVE_MPI
/* ---- Across hosts: the ranks of mpirun over epx_comm_init_mpi (hosts simulated with
 * EPX_LOCAL_SIZE). EPX_FAULT aims several entries at the last rank of one communicator,
 * one step each (every collective call is a step):
 *   setup + 1  healthy, checked;
 *   setup + 2  delay 100 ms: every rank succeeds, data exact;
 *   setup + 3  count: the pair (alltoall(v): the last rank and rank 0) or every rank (MoE)
 *              returns EPX_ERR_MISMATCH without writing, the others succeed, data exact;
 *              alltoall(v) also nomem: the last rank has no scratch for its good peers'
 *              segments and receives them in place (its output: each byte old or new),
 *              nobody waits for the timeout;
 *   setup + 4  healthy, checked: the communicator is still usable;
 *   setup + 5  MoE nomem: the last rank returns EPX_ERR_NO_MEMORY, the others
 *              EPX_ERR_REMOTE_INVALID, at once, nothing written (alltoall(v): healthy);
 *   setup + 6  healthy, checked: still usable;
 *   setup + 7  delay 3 x timeout: the others return EPX_ERR_TIMEOUT (or PEER_FAILURE) within
 *              the timeout, writing nothing, the late rank fails when it wakes (nobody
 *              answers it any more) or, alltoall(v) with no peer on its host, succeeds with
 *              exact data (its peers' small segments came with their cards before they gave
 *              up) and fails in its next call; the communicator is broken: later calls
 *              fail at once;
 * then a new communicator over MPI_COMM_WORLD runs a checked call. With `kill` (run under
 * mpirun --enable-recovery, which lets the others live on): setup + 2 ends the last rank's
 * process before it posts anything; the survivors must fail within the timeout, each output
 * byte poison or exact, and then build a communicator without it (MPI_Comm_create_group)
 * that works; rank 0 prints "passed on N survivors" only when every survivor passed. */
#include "epx_mpi.h"

#define MPI_TIMEOUT_MS 500

static epx_comm_t mpi_comm(MPI_Comm world, int timeout_ms)
{
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.timeout_ms = timeout_ms;
    epx_comm_t comm;
    ASSERT_OK(epx_comm_init_mpi(&comm, world, &cfg));
    return comm;
}

/* One call of the test with its status, time and per-rank line. */
static epx_status_t mpi_call(ctx_t *c, const char *what, double *dt)
{
    ctx_poison(c);
    double t0 = test_now_ms();
    epx_status_t st = ctx_run(c);
    *dt = test_now_ms() - t0;
    printf("%s: %s after %.0f ms%s%s\n", what, epx_status_name(st), *dt, st ? ": " : "",
           st ? epx_comm_get_last_error(c->comm) : "");
    fflush(stdout);
    return st;
}

static bool is_failure(epx_status_t st) { return st == EPX_ERR_TIMEOUT || st == EPX_ERR_PEER_FAILURE; }

/* After a status that broke the communicator: it says so, answers every call at once, and
 * goes (a MoE context outlives it, its calls then return EPX_ERR_ABORTED). */
static void mpi_broken(ctx_t *c, epx_status_t st, const char *what)
{
    epx_status_t async;
    ASSERT_OK(epx_comm_get_async_error(c->comm, &async));
    ASSERT(async == st);
    double t0 = test_now_ms();
    ASSERT_STATUS(ctx_run(c), async);
    if (test_now_ms() - t0 > 200) TEST_FAIL_("%s: a call on the broken communicator took %.0f ms", what, test_now_ms() - t0);
    ASSERT_OK(epx_comm_abort(c->comm));
    if (c->moe) {
        c->x = NULL; /* registered memory went with the communicator */
        ASSERT_STATUS(ctx_run(c), EPX_ERR_ABORTED);
    }
}

/* A healthy, checked call on a new communicator over `world` (low-latency: against what
 * `ref` learnt, when it ran on as many ranks). */
static void mpi_recover(op_t op, MPI_Comm world, const ctx_t *ref, const char *what)
{
    epx_comm_t comm = mpi_comm(world, RECOVERY_TIMEOUT_MS);
    ctx_t c;
    ctx_setup(&c, op, comm);
    if (c.learn && ref && ref->R == c.R) {
        for (int i = 0; i < c.nouts; i++) memcpy(c.outs[i].expect, ref->outs[i].expect, c.outs[i].bytes);
        c.learn = false;
    }
    double dt;
    ASSERT_OK(mpi_call(&c, what, &dt));
    ctx_check(&c, EXACT, what);
    ctx_free(&c);
    epx_status_t async;
    ASSERT_OK(epx_comm_get_async_error(comm, &async));
    ASSERT_EQ(async, EPX_SUCCESS);
    ASSERT_OK(epx_comm_destroy(comm));
}

static int mpi_main(op_t op, bool kill)
{
    int me, R;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &R);
    test_rank = me;
    const int bad = R - 1, s0 = fault_step(op) - 2; /* the steps of the setup */
    const bool late = me == bad;
    char what[96];
    epx_comm_t comm = mpi_comm(MPI_COMM_WORLD, MPI_TIMEOUT_MS);
    epx_comm_info_t info;
    ASSERT_OK(epx_comm_info(comm, &info));
    ASSERT(info.num_hosts > 1); /* the MPI path across hosts */
    ctx_t c;
    ctx_setup(&c, op, comm);
    double dt;
    snprintf(what, sizeof what, "mpi %s np%d rank %d healthy", op_names[op], R, me);
    ASSERT_OK(mpi_call(&c, what, &dt)); /* step s0 + 1 */
    ctx_check(&c, EXACT, what);
    epx_status_t st;

    if (kill) {
        MPI_Barrier(MPI_COMM_WORLD);
        snprintf(what, sizeof what, "mpi %s np%d rank %d kill", op_names[op], R, me);
        st = mpi_call(&c, what, &dt); /* step s0 + 2: the last rank's process ends here */
        if (late) TEST_FAIL_("%s: still alive after its kill", what);
        if (!is_failure(st)) TEST_FAIL_("%s: got %s, expected a timeout or peer failure", what, epx_status_name(st));
        if (dt > MPI_TIMEOUT_MS + SLACK_MS) TEST_FAIL_("%s: took %.0f ms, timeout %d ms", what, dt, MPI_TIMEOUT_MS);
        ctx_check(&c, OLD_OR_NEW, what);
        mpi_broken(&c, st, what);
        ctx_free(&c);
        /* The survivors, without the dead rank (MPI_Comm_create_group involves only them). */
        MPI_Group all, alive;
        MPI_Comm_group(MPI_COMM_WORLD, &all);
        MPI_Group_excl(all, 1, &bad, &alive);
        MPI_Comm survivors;
        ASSERT(MPI_Comm_create_group(MPI_COMM_WORLD, alive, 7, &survivors) == MPI_SUCCESS);
        snprintf(what, sizeof what, "mpi %s np%d rank %d after the kill", op_names[op], R, me);
        mpi_recover(op, survivors, NULL, what);
        int ok = 1, all_ok = 0;
        ASSERT(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, survivors) == MPI_SUCCESS);
        if (me == 0 && all_ok) printf("mpi_fault %s kill: passed on %d survivors\n", op_names[op], R - 1);
        fflush(NULL);
        /* Without the fault-tolerance extensions MPI does not define MPI_Finalize after a
         * process failed, and Open MPI 4.1 can hang in it (seen under load): end here. */
        _exit(0);
    }

    MPI_Barrier(MPI_COMM_WORLD);
    snprintf(what, sizeof what, "mpi %s np%d rank %d delay_short", op_names[op], R, me);
    ASSERT_OK(mpi_call(&c, what, &dt)); /* step s0 + 2 */
    ctx_check(&c, EXACT, what);
    if (dt > 100 + SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);

    MPI_Barrier(MPI_COMM_WORLD);
    snprintf(what, sizeof what, "mpi %s np%d rank %d count", op_names[op], R, me);
    st = mpi_call(&c, what, &dt); /* step s0 + 3 */
    bool pair = op <= OP_ALLTOALLV ? (late || me == (bad + 1) % R) : true;
    if (op <= OP_ALLTOALLV && late) { /* nomem too: its good peers' segments in place */
        ASSERT_STATUS(st, EPX_ERR_MISMATCH);
        ctx_check(&c, OLD_OR_NEW, what);
        if (dt > SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);
    } else {
        expect_count(&c, pair, st, dt, what);
    }
    snprintf(what, sizeof what, "mpi %s np%d rank %d after count", op_names[op], R, me);
    ASSERT_OK(mpi_call(&c, what, &dt)); /* step s0 + 4: still usable */
    ctx_check(&c, EXACT, what);

    MPI_Barrier(MPI_COMM_WORLD);
    snprintf(what, sizeof what, "mpi %s np%d rank %d %s", op_names[op], R, me, op <= OP_ALLTOALLV ? "healthy" : "nomem");
    st = mpi_call(&c, what, &dt); /* step s0 + 5 */
    if (op <= OP_ALLTOALLV) {
        ASSERT_OK(st);
        ctx_check(&c, EXACT, what);
    } else {
        ASSERT_STATUS(st, late ? EPX_ERR_NO_MEMORY : EPX_ERR_REMOTE_INVALID);
        ctx_check(&c, UNTOUCHED, what);
    }
    if (dt > SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);
    snprintf(what, sizeof what, "mpi %s np%d rank %d after nomem", op_names[op], R, me);
    ASSERT_OK(mpi_call(&c, what, &dt)); /* step s0 + 6: still usable */
    ctx_check(&c, EXACT, what);

    MPI_Barrier(MPI_COMM_WORLD);
    snprintf(what, sizeof what, "mpi %s np%d rank %d delay_long", op_names[op], R, me);
    st = mpi_call(&c, what, &dt); /* step s0 + 7 */
    if (late && st == EPX_SUCCESS && op <= OP_ALLTOALLV && info.local_size == 1) {
        /* All it needs came before its peers gave up (alltoall(v): small data to another
         * host travels with the card, and every peer is on another host): a success with
         * exact data, as README allows; its next call fails. */
        ctx_check(&c, EXACT, what);
        snprintf(what, sizeof what, "mpi %s np%d rank %d after delay_long", op_names[op], R, me);
        st = mpi_call(&c, what, &dt);
    }
    if (!is_failure(st)) TEST_FAIL_("%s: got %s, expected a timeout or peer failure", what, epx_status_name(st));
    double bound = (late ? 4 * MPI_TIMEOUT_MS : MPI_TIMEOUT_MS) + SLACK_MS;
    if (dt > bound) TEST_FAIL_("%s: took %.0f ms, at most %.0f expected", what, dt, bound);
    /* Those on time gave up before any data moved; the late rank may have copied its own
     * segment before it saw that nobody answers. */
    ctx_check(&c, late ? OLD_OR_NEW : UNTOUCHED, what);
    mpi_broken(&c, st, what);
    snprintf(what, sizeof what, "mpi %s np%d rank %d new communicator", op_names[op], R, me);
    mpi_recover(op, MPI_COMM_WORLD, &c, what);
    ctx_free(&c);
    if (me == 0)
        printf("mpi_fault %s np%d: passed (faults at steps %d, %d, %d and %d)\n", op_names[op], R, s0 + 2, s0 + 3,
               s0 + 5, s0 + 7);
    return 0;
}

/* `slow` (test_fault --mpi alltoallv slow; hosts of 2+ ranks): alltoallv calls in which each
 * rank exchanges 1 MiB with every rank of its own host (shared memory) and nothing with the
 * other hosts, so that only the calls' small cards cross over MPI. At step 2 the last rank
 * pauses 0.6 x the timeout after each of its MPI messages that completes (EPX_FAULT slow):
 * its local peers then wait for it in shared memory for as long as its cards take (over
 * twice the timeout, checked), while it shows progress only in MPI. It passes that on to
 * them (src/hier -> src/cpu), so nobody times out: every rank succeeds with exact data,
 * at steps 1 (healthy), 2 and 3 (healthy: the communicator is still usable).
 * `stall`: pauses of 1.5 x the timeout at step 2. Its local peers must time out naming it
 * by its rank in the communicator, the other hosts' ranks (done with it once its cards
 * left) succeed, and the slow rank learns that its peers gave up; nobody hangs. */
static int mpi_slow_main(bool stall)
{
    int me, R;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &R);
    test_rank = me;
    epx_comm_t comm = mpi_comm(MPI_COMM_WORLD, MPI_TIMEOUT_MS);
    epx_comm_info_t info;
    ASSERT_OK(epx_comm_info(comm, &info));
    ASSERT(info.num_hosts > 1 && info.local_size > 1 && info.host == me / info.local_size); /* EPX_LOCAL_SIZE blocks */
    const int64_t n = 1 << 20;
    int64_t sc[MAXR], sd[MAXR], rc[MAXR], rd[MAXR], tot = 0;
    ASSERT(R <= MAXR);
    for (int p = 0; p < R; p++) {
        sc[p] = rc[p] = p / info.local_size == info.host ? n : 0;
        sd[p] = rd[p] = tot, tot += sc[p];
    }
    uint8_t *send = xmalloc((size_t)tot), *recv = xmalloc((size_t)tot);
    v_fill(send, sc, sd, R, me);
    const bool local_of_slow = me != R - 1 && me / info.local_size == (R - 1) / info.local_size;
    for (int step = 1; step <= 3; step++) {
        MPI_Barrier(MPI_COMM_WORLD); /* each call on its own: nobody waits in the next one */
        memset(recv, POISON, (size_t)tot);
        double t0 = test_now_ms();
        epx_status_t st = epx_alltoallv(comm, send, sc, sd, recv, rc, rd, EPX_U8, NULL);
        double dt = test_now_ms() - t0;
        const char *msg = epx_comm_get_last_error(comm);
        printf("mpi alltoallv np%d rank %d %s step %d: %s after %.0f ms%s%s\n", R, me, stall ? "stall" : "slow", step,
               epx_status_name(st), dt, st ? ": " : "", st ? msg : "");
        fflush(stdout);
        char what[64];
        snprintf(what, sizeof what, "%s step %d rank %d", stall ? "stall" : "slow", step, me);
        if (stall && step == 2 && (local_of_slow || me == R - 1)) { /* (the others succeed) */
            char want[64];
            snprintf(want, sizeof want, "timed out waiting for rank %d's", R - 1);
            if (local_of_slow && (st != EPX_ERR_TIMEOUT || !strstr(msg, want)))
                TEST_FAIL_("stall rank %d: %s (%s), expected a timeout naming rank %d", me, epx_status_name(st), msg,
                           R - 1);
            if (me == R - 1 && st != EPX_ERR_PEER_FAILURE)
                TEST_FAIL_("stall: the slow rank got %s (%s), expected a peer failure", epx_status_name(st), msg);
            double bound = (me == R - 1 ? 2 * (R - 1) * 1.5 * MPI_TIMEOUT_MS : MPI_TIMEOUT_MS) + SLACK_MS;
            if (dt > bound) TEST_FAIL_("stall rank %d took %.0f ms (at most %.0f expected)", me, dt, bound);
            v_check(recv, rc, rd, R, me, true, what); /* a failed call */
            break;
        }
        ASSERT_OK(st);
        v_check(recv, rc, rd, R, me, false, what);
        if (step == 2 && me == R - 1 && dt <= 2 * MPI_TIMEOUT_MS)
            TEST_FAIL_("slow: the slow rank took %.0f ms, not over twice the timeout (%d ms)", dt, MPI_TIMEOUT_MS);
        if (stall && step == 2) break; /* its host's ranks gave up */
    }
    free(send), free(recv);
    epx_status_t async;
    ASSERT_OK(epx_comm_get_async_error(comm, &async));
    if (async != EPX_SUCCESS) ASSERT_OK(epx_comm_abort(comm));
    else ASSERT_OK(epx_comm_destroy(comm));
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0) printf("mpi_fault alltoallv %s np%d: passed\n", stall ? "stall" : "slow", R);
    return 0;
}
#endif

int main(int argc, char **argv)
{
    test_rank = 0;
#ifdef EPX_HAVE_MPI
    /* test_fault --mpi OP [kill] under mpirun (hosts simulated with EPX_LOCAL_SIZE). */
    if (argc >= 3 && !strcmp(argv[1], "--mpi")) {
        op_t op = OP_COUNT;
        for (int i = 0; i < OP_COUNT; i++)
            if (!strcmp(argv[2], op_names[i])) op = (op_t)i;
        bool kill = argc >= 4 && !strcmp(argv[3], "kill"), stall = argc >= 4 && !strcmp(argv[3], "stall");
        bool slow = stall || (argc >= 4 && !strcmp(argv[3], "slow"));
        if (op == OP_COUNT || (slow && op != OP_ALLTOALLV)) {
            fprintf(stderr, "usage: %s --mpi OP [kill] | --mpi alltoallv slow|stall\n", argv[0]);
            return 2;
        }
        /* Before the library reads its variables (at the first communicator). */
        char text[200];
        int s0 = fault_step(op) - 2, world = 0;
        test_init(argc, argv);
        MPI_Comm_size(MPI_COMM_WORLD, &world);
        if (kill)
            snprintf(text, sizeof text, "kill:rank=%d,step=%d", world - 1, s0 + 2);
        else if (slow)
            snprintf(text, sizeof text, "slow:rank=%d,step=2,ms=%d", world - 1, MPI_TIMEOUT_MS * (stall ? 15 : 6) / 10);
        else
            snprintf(text, sizeof text,
                     "delay:rank=%d,step=%d,ms=100;count:rank=%d,step=%d;nomem:rank=%d,step=%d;delay:rank=%d,step=%d,ms=%d",
                     world - 1, s0 + 2, world - 1, s0 + 3, world - 1, op <= OP_ALLTOALLV ? s0 + 3 : s0 + 5, world - 1,
                     s0 + 7, 3 * MPI_TIMEOUT_MS);
        setenv("EPX_FAULT", text, 1);
        return slow ? mpi_slow_main(stall) : mpi_main(op, kill);
    }
#endif
    if (argc < 3) {
        fprintf(stderr, "usage: %s alltoall|alltoallv|dispatch|combine|ll_dispatch|ll_combine NRANKS [FAULT...]\n",
                argv[0]);
        return 2;
    }
    op_t op = OP_COUNT;
    for (int i = 0; i < OP_COUNT; i++)
        if (!strcmp(argv[1], op_names[i])) op = (op_t)i;
    int R = atoi(argv[2]);
    if (op == OP_COUNT || R < 2 || R > MAXR) {
        fprintf(stderr, "bad op or NRANKS (2..%d)\n", MAXR);
        return 2;
    }
    bool want[F_NUM] = {false};
    int nwant = 0;
    for (int i = 3; i < argc; i++)
        for (int f = 0; f < F_NUM; f++)
            if (!strcmp(argv[i], fault_names[f])) want[f] = true, nwant++;
    int passed = 0;
    for (int f = 0; f < F_NUM; f++) {
        if (nwant && !want[f]) continue;
        bool needs_v = f == F_SLOW_RELAY || f == F_STALL_CHAIN;
        bool needs_3 = f == F_COUNT_SLOW_READER || needs_v;
        if (needs_3 && (R < 3 || op > OP_ALLTOALLV || (needs_v && op != OP_ALLTOALLV))) {
            printf("scenario %s/%s np%d not run: it needs %s and 3 or more ranks\n", op_names[op], fault_names[f], R,
                   needs_v ? "alltoallv" : "alltoall(v)");
            continue;
        }
        fflush(stdout);
        double t0 = test_now_ms();
        pid_t pid = fork();
        ASSERT(pid >= 0);
        if (pid == 0) _exit(scenario(op, (fault_t)f, R));
        int status;
        ASSERT(waitpid(pid, &status, 0) == pid);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            TEST_FAIL_("scenario %s/%s np%d failed (status 0x%x)", op_names[op], fault_names[f], R, status);
        printf("scenario %s/%s np%d passed in %.0f ms\n", op_names[op], fault_names[f], R, test_now_ms() - t0);
        passed++;
    }
    test_done(passed);
    return 0;
}
