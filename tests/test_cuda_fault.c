/*
 * Faults injected with EPX_FAULT on the CUDA backend: a delayed rank, a rank that dies in
 * its host exchange, after it (before enqueuing any kernel) or after enqueuing its kernels,
 * and a rank that announces a wrong size; on alltoall (eager and direct paths), alltoallv,
 * alltoallv_device, MoE dispatch (with the count read back, and without host
 * synchronisation), combine, and low-latency dispatch and combine. The faulty rank is the
 * last one. Outputs live in device memory, are poisoned in stream order before the faulty
 * call and read back after the stream drained.
 *
 * What must hold (README, "Errors"), for every survivor, within EPX_TIMEOUT_MS plus slack
 * (the call, then a stream synchronisation, then epx_comm_get_async_error):
 *   - a delay below the timeout (before the host exchange, or between it and the kernels):
 *     everything succeeds, data exact, no asynchronous error;
 *   - a delay past the timeout between the host exchange and the kernels: the call or the
 *     asynchronous error says EPX_ERR_TIMEOUT (or EPX_ERR_PEER_FAILURE); each output byte
 *     holds its poison or the exact value; the late rank ends too (its next call at the
 *     latest fails);
 *   - delay_host (one host): the same delay at the call's start, before its first host
 *     round: as above, and the others' call itself returns within the timeout plus 1 s
 *     (they gave up in that round, so the call's later host rounds fail at once);
 *   - invalid_late (one host): delay_host, with rank 0 passing a NULL input (send, x or y)
 *     in the same call: its own rejection must not hide the broken round (it too returns
 *     EPX_ERR_TIMEOUT or EPX_ERR_PEER_FAILURE, its communicator broken);
 *   - nomem_late (one host; calls that map peers' buffers, as nomem): rank 0's first
 *     mapping fails (nomem) in the call where the last rank sleeps past the timeout before
 *     the host round that agrees on the mappings (at=mapped): rank 0's own
 *     EPX_ERR_NO_MEMORY must not hide that round's failure (every rank EPX_ERR_TIMEOUT or
 *     EPX_ERR_PEER_FAILURE within the timeout, the late one when it wakes; communicator
 *     broken; nothing written anywhere);
 *   - a rank killed in its host exchange or before its kernels: the call or the asynchronous
 *     error says EPX_ERR_TIMEOUT or EPX_ERR_PEER_FAILURE; poison or exact per byte;
 *   - killed after enqueuing its kernels: the same, or (its kernels ran before the process
 *     ended) success with exact data, and then the next call fails;
 *   - a wrong size: alltoall(v): the two ranks of the pair EPX_ERR_MISMATCH, the others
 *     EPX_ERR_REMOTE_INVALID; MoE: every rank EPX_ERR_MISMATCH; nothing written, the
 *     communicator usable. alltoallv_device (counts on the device): the sender's
 *     asynchronous error is EPX_ERR_MISMATCH and that pair moved nothing, every other pair
 *     exact;
 *   - nomem (one host only): the faulty rank's first mapping of a peer's buffer in the call
 *     fails (as when every CUDA IPC slot is held): in calls that map (direct alltoall,
 *     alltoallv_device, dispatch, the SM combine) it returns EPX_ERR_NO_MEMORY and the
 *     others EPX_ERR_REMOTE_INVALID at once, nothing written, the communicator usable; the
 *     other calls succeed, data exact;
 *   - a broken communicator answers every later call at once with its error; a new one (a
 *     new unique id) over the ranks still alive works, data checked.
 *
 * Across hosts (EPX_LOCAL_SIZE set and below NRANKS, as ctest's nccl_fault_* set it: the
 * communicator spans simulated hosts of EPX_LOCAL_SIZE ranks, host h on device h % devices,
 * NCCL between them: src/xhost). Every call there agrees on the host over the TCP bootstrap
 * and does not wait for its own device work, so outcomes come from the calls' statuses
 * more than from asynchronous errors. Differences from the above:
 *   - timeout 4000 ms and long delay 7000 ms (NCCL's set-up must fit in the timeout);
 *   - after a successful call the stream is waited for at most the timeout plus slack,
 *     never without bound: NCCL work left waiting for a dead or late peer must be ended by
 *     then (src/nccl's watchdog aborts the NCCL link EPX_TIMEOUT_MS after the stream
 *     reached it), and the asynchronous error then says why;
 *   - delay_long fires at the call's start (at=host): every rank fails in the call's first
 *     bootstrap round (EPX_ERR_TIMEOUT, or EPX_ERR_PEER_FAILURE once the round broke), the
 *     late rank too when it wakes; nothing written on any rank;
 *   - kill_host: the survivors fail in the first bootstrap round (a closed socket:
 *     EPX_ERR_PEER_FAILURE within milliseconds, every rank of the round), nothing written;
 *   - kill_enqueue / kill_launched: the call may succeed with its NCCL work left waiting;
 *     the stream then drains within the timeout plus slack (the watchdog) with an
 *     asynchronous failure (EPX_ERR_TIMEOUT, EPX_ERR_PEER_FAILURE or EPX_ERR_NCCL), or,
 *     where the dead rank's part had crossed, exact data and a failing next call; the
 *     next call fails within the timeout plus slack, low-latency calls as high-throughput
 *     ones (both enqueue their rows after their last bootstrap round). Once the
 *     communicator broke its NCCL link is aborted, so the stream must drain within the
 *     slack; outputs are not checked then (undefined: kernels behind aborted NCCL work read
 *     staging that never filled), except after a success that drained (exact);
 *   - count: alltoallv_device agrees on its counts on the host there, so it answers as
 *     alltoallv (the pair EPX_ERR_MISMATCH, the others EPX_ERR_REMOTE_INVALID, nothing
 *     written, usable);
 *   - fail_enqueue (only here: EPX_FAULT fail): the faulty rank's device records a failure
 *     after the call's last host round, and the call still moves everything. No rank may
 *     succeed (one that succeeded on rows a failed gateway forwarded would): within the
 *     slack (no timeout) the faulty rank gets EPX_ERR_TIMEOUT and every other rank
 *     EPX_ERR_PEER_FAILURE, relayed with the data (its host-mates' from inside the host: the
 *     message says "inside the host"), each output byte poison or exact; or, on another
 *     host, where a rank that failed at once broke its communicator and so aborted NCCL transfers
 *     in flight to this one (its call succeeded, its stream waited), a failure within the
 *     timeout plus slack (the watchdog ended the transfers; a host-mate's device wait on
 *     such a rank may time out first). The communicator is broken; a new one over all
 *     ranks works;
 *   - recovery after a kill: hosts must be of equal size, so the ranks of the hosts that
 *     lost no rank make the new communicator and the dead rank's host-mates one each, alone.
 * It exits 77, saying why, with fewer GPUs than hosts (unless EPX_TEST_FAKE_NCCL=1: NCCL
 * is tests/fake_nccl.c, which takes several ranks of one GPU) or without NCCL.
 *
 * Usage: test_cuda_fault --cuda OP NRANKS [FAULT...]. Forks its own ranks (rank r on device
 * r % devices); CUDA is touched only in the ranks. Exits 77, saying why, without a GPU.
 * EPX_TEST_FAULT_TIMEOUT_MS changes the timeout (the long delay is 3000 ms more).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "launch.h"
#include "testlib.h"

#ifdef EPX_HAVE_CUDA
#include <cuda_runtime_api.h>

#define SHORT_MS 300
#define RECOVERY_TIMEOUT_MS 20000
#define SLACK_MS 3000
#define HOST_ROUND_SLACK_MS 1000
#define POISON 0xEE
#define FAULT_EXIT 86 /* EPX__FAULT_EXIT_CODE */
#define MAXR 8

/* The communicator's timeout and the long delay (past it): 2000 and 5000 ms on one host;
 * across hosts 4000 and 7000 (NCCL's set-up must fit in the timeout), or
 * EPX_TEST_FAULT_TIMEOUT_MS and 3000 more. */
static int timeout_ms = 2000, long_ms = 5000;
/* Ranks per simulated host (EPX_LOCAL_SIZE) when the communicator spans several hosts
 * (src/xhost: NCCL between hosts, one GPU per host); 0 on one host. */
static int hosts_ls;
static const char *sname(epx_status_t st) { return epx_status_name(st); }

#define CK(x)                                                                                 \
    do {                                                                                      \
        cudaError_t e_ = (x);                                                                 \
        if (e_ != cudaSuccess) TEST_FAIL_("%s: %s", #x, cudaGetErrorString(e_));              \
    } while (0)

typedef enum {
    OP_A2A_EAGER, OP_A2A_DIRECT, OP_A2AV, OP_A2AV_DEVICE, OP_DISPATCH, OP_DISPATCH_NOSYNC, OP_COMBINE, OP_LL_DISPATCH,
    OP_LL_COMBINE, OP_NUM
} op_t;
static const char *op_names[] = {"a2a_eager", "a2a_direct", "alltoallv", "a2av_device", "dispatch",
                                 "dispatch_nosync", "combine", "ll_dispatch", "ll_combine"};
typedef enum {
    F_DELAY_SHORT, F_DELAY_ENQUEUE, F_DELAY_LONG, F_KILL_HOST, F_KILL_ENQUEUE, F_KILL_LAUNCHED, F_COUNT, F_FAIL_ENQUEUE,
    F_NOMEM, F_DELAY_HOST, F_INVALID_LATE, F_NOMEM_LATE, F_NUM
} fault_t;
static const char *fault_names[] = {"delay_short",  "delay_enqueue", "delay_long",   "kill_host", "kill_enqueue",
                                    "kill_launched", "count",        "fail_enqueue", "nomem",
                                    "delay_host",   "invalid_late", "nomem_late"};

static bool is_kill(fault_t f) { return f == F_KILL_HOST || f == F_KILL_ENQUEUE || f == F_KILL_LAUNCHED; }
static bool is_moe(op_t op) { return op >= OP_DISPATCH; }
/* Does op map peers' buffers in each call (where EPX_FAULT nomem and at=mapped fire)? Not
 * eager alltoall(v), low latency, or the combine on copy engines (EPX_CUDA_SMS=0). */
static bool op_maps(op_t op)
{
    const char *sms = getenv("EPX_CUDA_SMS");
    bool ce = sms && atoi(sms) <= 0;
    return op == OP_A2A_DIRECT || op == OP_A2AV_DEVICE || op == OP_DISPATCH || op == OP_DISPATCH_NOSYNC ||
           (op == OP_COMBINE && !ce);
}
static bool is_ll(op_t op) { return op >= OP_LL_DISPATCH; }

#define H 64 /* MoE hidden */
#define T 16 /* tokens per rank (= max_tokens_per_rank) */
#define K 2
#define LOCAL_EXPERTS 4

#include "fault_data.h"

typedef struct {
    void *dev;
    uint8_t *expect; /* after a success */
    uint8_t *care;   /* 0 where a success may write anything (NULL: every byte counts) */
    uint8_t *got;
    size_t bytes;
} out_t;

typedef struct {
    op_t op;
    int me, R;
    epx_comm_t comm;
    cudaStream_t s;
    /* alltoall(v) */
    void *send, *recv;
    size_t count;
    int64_t sc[MAXR], sd[MAXR], rc[MAXR], rd[MAXR];
    int64_t *dcounts; /* device: sc, sd, rc, rd */
    /* MoE */
    epx_moe_t moe;
    epx_moe_handle_t handle;
    void *x, *topk, *recv_x, *y, *combined, *weights;
    int32_t *src_rank, *src_token, *recv_count;
    int64_t *dnum;
    int64_t cap, rows, num_recv;
    out_t outs[4];
    int nouts;
    bool invalid; /* the next run passes a NULL input (a rejection of this rank's own) */
} ctx_t;
static void *dalloc(size_t n)
{
    void *p = NULL;
    CK(cudaMalloc(&p, n ? n : 1));
    return p;
}
/* Upload on the ranks' stream and wait: a cudaMemcpy from pageable memory may return before
 * its DMA has landed, and it is not ordered before work on a non-blocking stream. */
static void put(cudaStream_t s, void *d, const void *h, size_t n)
{
    CK(cudaMemcpyAsync(d, h, n, cudaMemcpyHostToDevice, s));
    CK(cudaStreamSynchronize(s));
}

/* Wait at most `ms` for the stream; true when it ran everything (a device fault fails). */
static bool drain(cudaStream_t s, double ms)
{
    double t0 = test_now_ms();
    for (;;) {
        cudaError_t ce = cudaStreamQuery(s);
        if (ce == cudaSuccess) return true;
        if (ce != cudaErrorNotReady)
            TEST_FAIL_("the stream failed (%s): a device fault, not a clean timeout", cudaGetErrorString(ce));
        if (test_now_ms() - t0 > ms) return false;
        usleep(1000);
    }
}

/* Drain the stream. Across hosts bounded, so that NCCL work left waiting for a dead peer
 * fails the test instead of hanging it; on one host every device wait is bounded itself. */
static void sync_stream(cudaStream_t s, const char *what)
{
    if (!hosts_ls) {
        CK(cudaStreamSynchronize(s));
        return;
    }
    if (!drain(s, timeout_ms + SLACK_MS))
        TEST_FAIL_("%s: the stream still waits after %d ms (NCCL work left waiting for a peer)", what,
                   timeout_ms + SLACK_MS);
}

static out_t *add_out(ctx_t *c, void *dev, size_t bytes)
{
    out_t *o = &c->outs[c->nouts++];
    o->dev = dev;
    o->bytes = bytes;
    o->expect = xmalloc(bytes);
    o->got = xmalloc(bytes);
    memset(o->expect, POISON, bytes);
    return o;
}

static void bf16_put(uint8_t *b, size_t at, float v)
{
    uint16_t u = epx_float_to_bf16(v);
    memcpy(b + at * 2, &u, 2);
}

/* The (source, token) pairs a rank's local expert l gets, in slot order (sources, then
 * tokens ascending). */
static int ll_slots(int R, int me, int l, int *src, int *tok)
{
    int n = 0, e = me * LOCAL_EXPERTS + l;
    for (int p = 0; p < R; p++)
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++)
                if (expert_of(R, p, t, k) == e) src[n] = p, tok[n++] = t;
    return n;
}
static int ll_slot_of(int R, int src, int t, int e)
{
    int sr[MAXR * T * K], tk[MAXR * T * K];
    int n = ll_slots(R, e / LOCAL_EXPERTS, e % LOCAL_EXPERTS, sr, tk);
    for (int i = 0; i < n; i++)
        if (sr[i] == src && tk[i] == t) return i;
    return -1;
}

static epx_status_t ctx_run(ctx_t *c);

static void ctx_setup(ctx_t *c, op_t op, epx_comm_t comm, cudaStream_t s)
{
    memset(c, 0, sizeof *c);
    c->op = op;
    c->comm = comm;
    c->s = s;
    ASSERT_OK(epx_comm_rank(comm, &c->me));
    ASSERT_OK(epx_comm_size(comm, &c->R));
    int me = c->me, R = c->R;
    if (op == OP_A2A_EAGER || op == OP_A2A_DIRECT) {
        c->count = op == OP_A2A_EAGER ? 512 : 256 << 10;
        size_t n = c->count * (size_t)R;
        uint8_t *hs = xmalloc(n);
        c->send = dalloc(n), c->recv = dalloc(n);
        out_t *o = add_out(c, c->recv, n);
        for (int p = 0; p < R; p++)
            for (size_t i = 0; i < c->count; i++) {
                hs[(size_t)p * c->count + i] = a2a_byte(me, p, i);
                o->expect[(size_t)p * c->count + i] = a2a_byte(p, me, i);
            }
        put(s, c->send, hs, n);
        free(hs);
        return;
    }
    if (op == OP_A2AV || op == OP_A2AV_DEVICE) {
        int64_t sn = 0, rn = 0;
        for (int p = 0; p < R; p++) {
            c->sc[p] = v_count(me, p) * (op == OP_A2AV_DEVICE ? 40 : 1), c->sd[p] = sn, sn += c->sc[p] + 3;
            c->rc[p] = v_count(p, me) * (op == OP_A2AV_DEVICE ? 40 : 1), c->rd[p] = rn, rn += c->rc[p] + 5;
        }
        uint8_t *hs = xmalloc((size_t)sn);
        c->send = dalloc((size_t)sn), c->recv = dalloc((size_t)rn);
        out_t *o = add_out(c, c->recv, (size_t)rn);
        for (int p = 0; p < R; p++) {
            for (int64_t i = 0; i < c->sc[p]; i++) hs[c->sd[p] + i] = a2a_byte(me, p, (size_t)i);
            for (int64_t i = 0; i < c->rc[p]; i++) o->expect[c->rd[p] + i] = a2a_byte(p, me, (size_t)i);
        }
        put(s, c->send, hs, (size_t)sn);
        free(hs);
        if (op == OP_A2AV_DEVICE) {
            c->dcounts = dalloc(4 * sizeof(int64_t) * MAXR);
            put(s, c->dcounts, c->sc, sizeof c->sc), put(s, c->dcounts + MAXR, c->sd, sizeof c->sd);
            put(s, c->dcounts + 2 * MAXR, c->rc, sizeof c->rc), put(s, c->dcounts + 3 * MAXR, c->rd, sizeof c->rd);
        }
        return;
    }
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = H;
    cfg.max_tokens_per_rank = T;
    cfg.num_experts = LOCAL_EXPERTS * R;
    cfg.max_topk = K;
    cfg.dtype = EPX_BF16;
    cfg.index_dtype = EPX_I32;
    cfg.mode = is_ll(op) ? EPX_MOE_LOW_LATENCY : EPX_MOE_HIGH_THROUGHPUT;
    ASSERT_OK(epx_moe_create(comm, &cfg, &c->moe));
    c->cap = (int64_t)R * T;
    uint16_t hx[T * H];
    int32_t ht[T * K];
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < K; k++) ht[t * K + k] = expert_of(R, me, t, k);
        for (int h = 0; h < H; h++) hx[t * H + h] = x_val(me, t, h);
    }
    ASSERT_OK(epx_mem_alloc(comm, sizeof hx, &c->x));
    put(s, c->x, hx, sizeof hx);
    c->topk = dalloc(sizeof ht);
    put(s, c->topk, ht, sizeof ht);
    size_t slots = (size_t)LOCAL_EXPERTS * (size_t)c->cap;
    if (is_ll(op)) {
        c->recv_x = dalloc(slots * H * 2);
        c->recv_count = dalloc(sizeof(int32_t) * LOCAL_EXPERTS);
        c->src_rank = dalloc(sizeof(int32_t) * slots);
        c->src_token = dalloc(sizeof(int32_t) * slots);
        int sr[MAXR * T * K], tk[MAXR * T * K];
        out_t *ox = NULL, *oc = NULL, *os = NULL, *ot = NULL;
        if (op == OP_LL_DISPATCH) {
            ox = add_out(c, c->recv_x, slots * H * 2), oc = add_out(c, c->recv_count, 4 * LOCAL_EXPERTS);
            os = add_out(c, c->src_rank, 4 * slots), ot = add_out(c, c->src_token, 4 * slots);
            ox->care = xmalloc(slots * H * 2);
        }
        uint16_t *hy = xmalloc(slots * H * 2);
        /* What the dispatch writes (a combine's setup checks it: y is filled by these slots). */
        int32_t *want = xmalloc(sizeof(int32_t) * (LOCAL_EXPERTS + 2 * slots)), *got = xmalloc(sizeof(int32_t) * slots);
        for (int l = 0; l < LOCAL_EXPERTS; l++) {
            int n = ll_slots(R, me, l, sr, tk);
            want[l] = n;
            for (int64_t i = 0; i < c->cap; i++) {
                size_t sl = (size_t)l * (size_t)c->cap + (size_t)i;
                int32_t a = i < n ? sr[i] : -1, b = i < n ? tk[i] : -1;
                want[LOCAL_EXPERTS + sl] = a, want[LOCAL_EXPERTS + slots + sl] = b;
                for (int h = 0; h < H && i < n; h++) hy[sl * H + h] = epx_float_to_bf16((float)(g_val(b, h) * (me + 1)));
                if (!ox) continue;
                memcpy(os->expect + sl * 4, &a, 4), memcpy(ot->expect + sl * 4, &b, 4);
                for (int h = 0; h < H && i < n; h++) {
                    uint16_t v = x_val(a, b, h);
                    memcpy(ox->expect + (sl * H + h) * 2, &v, 2);
                    ox->care[(sl * H + h) * 2] = ox->care[(sl * H + h) * 2 + 1] = 1;
                }
            }
            if (oc) memcpy(oc->expect + 4 * l, &n, 4);
        }
        if (op == OP_LL_COMBINE) {
            epx_moe_ll_dispatch_in_t in = {c->x, c->topk, T, K};
            epx_moe_ll_dispatch_out_t out = {c->recv_x, NULL, c->recv_count, c->src_rank, c->src_token};
            ASSERT_OK(epx_moe_ll_dispatch(c->moe, &in, &out, &c->handle, s));
            c->y = dalloc(slots * H * 2);
            put(s, c->y, hy, slots * H * 2);
            float w[T * K];
            for (int i = 0; i < T * K; i++) w[i] = 1.0f;
            c->weights = dalloc(sizeof w);
            put(s, c->weights, w, sizeof w);
            c->combined = dalloc(T * H * 2);
            out_t *o = add_out(c, c->combined, T * H * 2);
            for (int t = 0; t < T; t++)
                for (int h = 0; h < H; h++) {
                    float acc = 0.0f;
                    for (int k = 0; k < K; k++) {
                        int e = expert_of(R, me, t, k);
                        ASSERT(ll_slot_of(R, me, t, e) >= 0);
                        acc += (float)(g_val(t, h) * (e / LOCAL_EXPERTS + 1));
                    }
                    bf16_put(o->expect, (size_t)t * H + (size_t)h, acc);
                }
            CK(cudaStreamSynchronize(s));
            /* A wrong combine after a wrong dispatch says so here. */
            const char *names[] = {"recv_count", "recv_src_rank", "recv_src_token"};
            const int32_t *dev[] = {c->recv_count, c->src_rank, c->src_token};
            size_t len[] = {LOCAL_EXPERTS, slots, slots}, at = 0;
            for (int a = 0; a < 3; at += len[a], a++) {
                CK(cudaMemcpy(got, dev[a], sizeof(int32_t) * len[a], cudaMemcpyDeviceToHost));
                for (size_t i = 0; i < len[a]; i++)
                    if (got[i] != want[at + i])
                        TEST_FAIL_("rank %d: the dispatch before the combine: %s[%zu] = %d, expected %d", me, names[a],
                                   i, got[i], want[at + i]);
            }
        }
        free(hy), free(want), free(got);
        return;
    }
    c->recv_x = dalloc((size_t)c->cap * H * 2);
    c->src_rank = dalloc(sizeof(int32_t) * (size_t)c->cap);
    c->src_token = dalloc(sizeof(int32_t) * (size_t)c->cap);
    if (op == OP_DISPATCH_NOSYNC) c->dnum = dalloc(sizeof(int64_t));
    int64_t n = 0;
    int32_t rows_src[MAXR * T], rows_tok[MAXR * T];
    for (int p = 0; p < R; p++)
        for (int t = 0; t < T; t++)
            if (goes_to(R, p, t, me)) rows_src[n] = p, rows_tok[n++] = t;
    c->rows = n;
    if (op != OP_COMBINE) {
        out_t *ox = add_out(c, c->recv_x, (size_t)c->cap * H * 2), *os = add_out(c, c->src_rank, 4 * (size_t)c->cap);
        out_t *ot = add_out(c, c->src_token, 4 * (size_t)c->cap);
        for (int64_t i = 0; i < n; i++) {
            for (int h = 0; h < H; h++) {
                uint16_t v = x_val(rows_src[i], rows_tok[i], h);
                memcpy(ox->expect + (size_t)(i * H + h) * 2, &v, 2);
            }
            memcpy(os->expect + (size_t)i * 4, &rows_src[i], 4);
            memcpy(ot->expect + (size_t)i * 4, &rows_tok[i], 4);
        }
        if (c->dnum) {
            out_t *on = add_out(c, c->dnum, sizeof(int64_t));
            memcpy(on->expect, &n, sizeof n);
        }
        return;
    }
    epx_moe_dispatch_in_t in = {c->x, NULL, c->topk, NULL, T, K};
    epx_moe_dispatch_out_t out = {c->recv_x, NULL, NULL, NULL, c->src_rank, c->src_token, NULL, c->cap, 0, NULL};
    ASSERT_OK(epx_moe_dispatch(c->moe, &in, &out, &c->handle, s));
    ASSERT_EQ(out.num_recv_tokens, n);
    uint16_t *hy = xmalloc((size_t)(n > 0 ? n : 1) * H * 2);
    for (int64_t i = 0; i < n; i++)
        for (int h = 0; h < H; h++) hy[i * H + h] = epx_float_to_bf16((float)(g_val(rows_tok[i], h) * (me + 1)));
    c->y = dalloc((size_t)(n > 0 ? n : 1) * H * 2);
    put(s, c->y, hy, (size_t)n * H * 2);
    free(hy);
    c->combined = dalloc(T * H * 2);
    out_t *o = add_out(c, c->combined, T * H * 2);
    for (int t = 0; t < T; t++) {
        int w = 0;
        for (int q = 0; q < R; q++) w += goes_to(R, me, t, q) ? q + 1 : 0;
        for (int h = 0; h < H; h++) bf16_put(o->expect, (size_t)t * H + (size_t)h, (float)(g_val(t, h) * w));
    }
    CK(cudaStreamSynchronize(s));
}

static void ctx_poison(ctx_t *c)
{
    for (int i = 0; i < c->nouts; i++) CK(cudaMemsetAsync(c->outs[i].dev, POISON, c->outs[i].bytes, c->s));
    CK(cudaStreamSynchronize(c->s));
    c->num_recv = -7;
}

static epx_status_t ctx_run(ctx_t *c)
{
    const void *send = c->invalid ? NULL : c->send, *x = c->invalid ? NULL : c->x, *y = c->invalid ? NULL : c->y;
    switch (c->op) {
    case OP_A2A_EAGER:
    case OP_A2A_DIRECT: return epx_alltoall(c->comm, send, c->recv, c->count, EPX_U8, c->s);
    case OP_A2AV: return epx_alltoallv(c->comm, send, c->sc, c->sd, c->recv, c->rc, c->rd, EPX_U8, c->s);
    case OP_A2AV_DEVICE:
        return epx_alltoallv_device(c->comm, send, c->dcounts, c->dcounts + MAXR, c->recv, c->dcounts + 2 * MAXR,
                                    c->dcounts + 3 * MAXR, EPX_U8, c->s);
    case OP_DISPATCH:
    case OP_DISPATCH_NOSYNC: {
        epx_moe_dispatch_in_t in = {x, NULL, c->topk, NULL, T, K};
        epx_moe_dispatch_out_t out = {c->recv_x, NULL, NULL, NULL, c->src_rank, c->src_token, NULL, c->cap, c->num_recv,
                                      (int64_t *)c->dnum};
        epx_moe_handle_t h = NULL;
        epx_status_t st = epx_moe_dispatch(c->moe, &in, &out, &h, c->s);
        c->num_recv = out.num_recv_tokens;
        if (st == EPX_SUCCESS) {
            ASSERT(h != NULL);
            epx_moe_handle_destroy(h);
        } else {
            ASSERT(h == NULL);
        }
        return st;
    }
    case OP_COMBINE: {
        epx_moe_combine_in_t in = {y, NULL};
        epx_moe_combine_out_t out = {c->combined, NULL};
        return epx_moe_combine(c->moe, c->handle, &in, &out, c->s);
    }
    case OP_LL_DISPATCH: {
        epx_moe_ll_dispatch_in_t in = {x, c->topk, T, K};
        epx_moe_ll_dispatch_out_t out = {c->recv_x, NULL, c->recv_count, c->src_rank, c->src_token};
        epx_moe_handle_t h = NULL;
        epx_status_t st = epx_moe_ll_dispatch(c->moe, &in, &out, &h, c->s);
        if (st == EPX_SUCCESS) epx_moe_handle_destroy(h);
        return st;
    }
    case OP_LL_COMBINE: {
        epx_moe_ll_combine_in_t in = {y, c->weights};
        return epx_moe_ll_combine(c->moe, c->handle, &in, c->combined, c->s);
    }
    default: return EPX_ERR_INTERNAL;
    }
}

typedef enum { EXACT, UNTOUCHED, OLD_OR_NEW } check_t;

/* Before a wrong combine output fails the test: for each wrong token, the factor each of its
 * first channels holds (value / g_val: a combine sums g_val times rank + 1 over the ranks the
 * token went to (high-throughput) or over its experts' ranks, one term per expert (low
 * latency)), so the log says which contributions went missing or came twice. */
static void combine_report(const ctx_t *c, const out_t *o, const char *what)
{
    const uint16_t *got = (const uint16_t *)o->got, *want = (const uint16_t *)o->expect;
    for (int t = 0; t < T; t++) {
        if (memcmp(got + t * H, want + t * H, H * 2) == 0) continue;
        char line[256];
        int n = snprintf(line, sizeof line, "%s: token %d (experts", what, t);
        for (int k = 0; k < K; k++) n += snprintf(line + n, sizeof line - (size_t)n, " %d", expert_of(c->R, c->me, t, k));
        n += snprintf(line + n, sizeof line - (size_t)n, "): factor %g, got", epx_bf16_to_float(want[t * H]) / g_val(t, 0));
        for (int h = 0; h < 8 && n < (int)sizeof line - 16; h++)
            n += snprintf(line + n, sizeof line - (size_t)n, " %g", epx_bf16_to_float(got[t * H + h]) / g_val(t, h));
        printf("%s\n", line);
    }
    fflush(stdout);
}

/* Drain the stream (a context broken by a device fault may fail here: then the test
 * reports it) and compare every output with what a success leaves. skip_from/to: a byte
 * range of output 0 that must stay poison instead (the pair of a device-count mismatch). */
static void ctx_check_range(ctx_t *c, check_t how, const char *what, size_t skip_from, size_t skip_to)
{
    sync_stream(c->s, what);
    for (int i = 0; i < c->nouts; i++) {
        out_t *o = &c->outs[i];
        CK(cudaMemcpy(o->got, o->dev, o->bytes, cudaMemcpyDeviceToHost));
        for (size_t j = 0; j < o->bytes; j++) {
            if (o->care && !o->care[j]) continue;
            uint8_t b = o->got[j], e = o->expect[j];
            check_t h = i == 0 && j >= skip_from && j < skip_to ? UNTOUCHED : how;
            bool ok = h == EXACT ? b == e : h == UNTOUCHED ? b == POISON : b == POISON || b == e;
            if (!ok && o->dev == c->combined && h == EXACT) combine_report(c, o, what);
            if (!ok)
                TEST_FAIL_("%s: output %d byte %zu is 0x%02x; expected %s (0x%02x, poison 0x%02x)", what, i, j, b,
                           h == EXACT ? "the exact value" : h == UNTOUCHED ? "the poison" : "poison or exact", e, POISON);
        }
    }
    if (c->op == OP_DISPATCH) {
        bool exact = c->num_recv == c->rows, old = c->num_recv == -7;
        if (how == EXACT ? !exact : how == UNTOUCHED ? !old : !(exact || old))
            TEST_FAIL_("%s: num_recv_tokens = %lld (rows %lld)", what, (long long)c->num_recv, (long long)c->rows);
    }
}
static void ctx_check(ctx_t *c, check_t how, const char *what) { ctx_check_range(c, how, what, 0, 0); }

static void ctx_free(ctx_t *c)
{
    sync_stream(c->s, "freeing the buffers");
    epx_moe_handle_destroy(c->handle);
    if (c->x) epx_mem_free(c->comm, c->x);
    epx_moe_destroy(c->moe);
    void *d[] = {c->send, c->recv, c->dcounts, c->topk, c->recv_x, c->y, c->combined, c->weights,
                 c->src_rank, c->src_token, c->recv_count, c->dnum};
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++) cudaFree(d[i]);
    for (int i = 0; i < c->nouts; i++) free(c->outs[i].expect), free(c->outs[i].got), free(c->outs[i].care);
}

static epx_comm_t make_comm(int R, int rank, const epx_unique_id_t *id, int device, int64_t tmo)
{
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.backend = EPX_BACKEND_CUDA;
    cfg.device = device;
    cfg.timeout_ms = tmo;
    epx_comm_t comm;
    epx_status_t st = epx_comm_init_rank(&comm, R, rank, id, &cfg);
    if (st == EPX_ERR_UNSUPPORTED && hosts_ls) { /* no NCCL here: every rank says so */
        printf("SKIPPED: CUDA across hosts is not available here (%s)\n", epx_get_last_error());
        fflush(stdout);
        _exit(TEST_SKIP);
    }
    if (st != EPX_SUCCESS) TEST_FAIL_("epx_comm_init_rank -> %s: %s", epx_status_name(st), epx_get_last_error());
    return comm;
}

static void recover(op_t op, int R, int rank, const epx_unique_id_t *id, int device, cudaStream_t s)
{
    epx_comm_t comm = make_comm(R, rank, id, device, RECOVERY_TIMEOUT_MS);
    ctx_t c;
    ctx_setup(&c, op, comm, s);
    ctx_poison(&c);
    ASSERT_OK(ctx_run(&c));
    ctx_check(&c, EXACT, "new communicator");
    epx_status_t async;
    ASSERT_OK(epx_comm_get_async_error(comm, &async));
    ASSERT_EQ(async, EPX_SUCCESS);
    ctx_free(&c);
    ASSERT_OK(epx_comm_destroy(comm));
}

/* The step of the operation under test: after the MoE context (1), for combine its
 * dispatch, and one healthy run of the operation. */
static int fault_step(op_t op) { return (is_moe(op) ? 1 : 0) + (op == OP_COMBINE || op == OP_LL_COMBINE ? 1 : 0) + 2; }

/* The call's status, else what the device recorded (after the stream drained). Across
 * hosts a success is followed by a bounded wait: NCCL work left waiting for a peer must
 * have been ended by then (src/nccl's watchdog), and the asynchronous error says why. */
static epx_status_t settle(ctx_t *c, epx_status_t st)
{
    if (hosts_ls) {
        if (st != EPX_SUCCESS) return st; /* the stream may hold NCCL work: not waited for here */
        if (!drain(c->s, timeout_ms + SLACK_MS))
            TEST_FAIL_("the stream still waits %d ms after a call that succeeded (NCCL work left waiting for a "
                       "peer was not ended: the NCCL watchdog)",
                       timeout_ms + SLACK_MS);
    } else {
        cudaError_t ce = cudaStreamSynchronize(c->s);
        if (ce != cudaSuccess)
            TEST_FAIL_("the stream failed (%s): a device fault, not a clean timeout", cudaGetErrorString(ce));
    }
    epx_status_t async = EPX_SUCCESS;
    ASSERT_OK(epx_comm_get_async_error(c->comm, &async));
    return st != EPX_SUCCESS ? st : async;
}

/* A failure status for a peer that stalled or died (across hosts NCCL may say it first). */
static bool is_failure(epx_status_t st)
{
    return st == EPX_ERR_TIMEOUT || st == EPX_ERR_PEER_FAILURE || (hosts_ls && st == EPX_ERR_NCCL);
}

/* After a fault the communicator must survive: the next call (healthy: a fault fires once)
 * succeeds with exact data and no asynchronous error. */
static void expect_usable(ctx_t *c, const char *what)
{
    ctx_poison(c);
    ASSERT_OK(ctx_run(c));
    ctx_check(c, EXACT, what);
    ASSERT_EQ(settle(c, EPX_SUCCESS), EPX_SUCCESS);
}

static int rank_main(op_t op, fault_t f, int rank, int R, int ndev, const epx_unique_id_t *id,
                     const epx_unique_id_t *id2)
{
    test_rank = rank;
    char what[128];
    snprintf(what, sizeof what, "%s/%s np%d%s rank %d", op_names[op], fault_names[f], R, hosts_ls ? " hosts" : "",
             rank);
    int device = (hosts_ls ? rank / hosts_ls : rank) % ndev; /* across hosts: one GPU per host */
    CK(cudaSetDevice(device));
    CK(cudaFree(NULL)); /* the context, before the communicator's clock starts */
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    epx_comm_t comm = make_comm(R, rank, id, device, timeout_ms);
    ctx_t c;
    ctx_setup(&c, op, comm, s);
    ctx_poison(&c);
    ASSERT_OK(ctx_run(&c)); /* healthy first */
    ctx_check(&c, EXACT, what);
    ASSERT_EQ(settle(&c, EPX_SUCCESS), EPX_SUCCESS);
    bool bad = rank == R - 1;

    ctx_poison(&c);
    c.invalid = f == F_INVALID_LATE && rank == 0;
    double t0 = test_now_ms();
    epx_status_t st = ctx_run(&c); /* the faulty rank's step: a kill ends its process here */
    double t_call = test_now_ms() - t0;
    c.invalid = false;
    epx_status_t res = settle(&c, st);
    double dt = test_now_ms() - t0;
    printf("%s: call %s after %.0f ms, then %s after %.0f ms%s%s\n", what, epx_status_name(st), t_call, sname(res), dt,
           res ? ": " : "", res ? epx_comm_get_last_error(comm) : "");
    fflush(stdout);

    bool broken = false;
    bool failed = is_failure(res);
    switch (f) {
    case F_DELAY_SHORT:
    case F_DELAY_ENQUEUE:
        if (res != EPX_SUCCESS) TEST_FAIL_("%s: %s (%s)", what, sname(res), epx_comm_get_last_error(comm));
        ctx_check(&c, EXACT, what);
        if (dt > SHORT_MS + SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);
        break;
    case F_DELAY_LONG:
    case F_DELAY_HOST:
    case F_INVALID_LATE: /* delay_host, rank 0's own rejection in the call not hiding the broken round */
        broken = true;
        /* delay_host (one host): the others give up in the call's first host round, so the
         * call's later host rounds fail at once: the call returns within one timeout. */
        if (f != F_DELAY_LONG && !bad && t_call > timeout_ms + HOST_ROUND_SLACK_MS)
            TEST_FAIL_("%s: the call took %.0f ms, timeout %d ms (a timeout per host round?)", what, t_call, timeout_ms);
        if (hosts_ls) {
            /* At the call's start: every rank fails in the first bootstrap round, the others at
             * their timeout (or at once, as the round breaks), the late rank when it wakes. */
            if (!failed) TEST_FAIL_("%s: got %s, expected a timeout or peer failure", what, sname(res));
            double most = bad ? long_ms + timeout_ms + SLACK_MS : timeout_ms + SLACK_MS;
            if (dt > most) TEST_FAIL_("%s: took %.0f ms, timeout %d ms", what, dt, timeout_ms);
            ctx_check(&c, UNTOUCHED, what);
            break;
        }
        if (bad) {
            if (dt > long_ms + timeout_ms + SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);
            if (res == EPX_SUCCESS) { /* its part may complete; the next call sees the others gave up */
                ctx_check(&c, OLD_OR_NEW, what);
                res = settle(&c, ctx_run(&c));
                printf("%s: next call %s\n", what, epx_status_name(res));
                failed = is_failure(res);
            }
            if (!failed) TEST_FAIL_("%s: the late rank got %s", what, epx_status_name(res));
        } else {
            if (!failed) TEST_FAIL_("%s: got %s, expected a timeout", what, epx_status_name(res));
            if (dt > timeout_ms + SLACK_MS) TEST_FAIL_("%s: took %.0f ms, timeout %d ms", what, dt, timeout_ms);
        }
        ctx_check(&c, OLD_OR_NEW, what);
        break;
    case F_KILL_HOST:
    case F_KILL_ENQUEUE:
    case F_KILL_LAUNCHED:
        broken = true;
        /* Across hosts a success may leave the stream waiting: time the call alone then. */
        if ((hosts_ls ? t_call : dt) > timeout_ms + SLACK_MS)
            TEST_FAIL_("%s: took %.0f ms, timeout %d ms", what, hosts_ls ? t_call : dt, timeout_ms);
        if (hosts_ls && f == F_KILL_HOST && !failed) /* the first bootstrap round of the call fails */
            TEST_FAIL_("%s: got %s, expected a timeout or peer failure", what, sname(res));
        if (res == EPX_SUCCESS) {
            /* Only when the dead rank's kernels ran (or, in the host exchange, it had posted
             * everything this rank needed and the device part did not need it): exact data,
             * and the next call fails. */
            if (f == F_KILL_ENQUEUE) TEST_FAIL_("%s: succeeded although the dead rank enqueued nothing", what);
            ctx_check(&c, EXACT, what);
            t0 = test_now_ms();
            epx_status_t next = ctx_run(&c);
            res = hosts_ls ? next : settle(&c, next);
            printf("%s: next call %s after %.0f ms%s%s\n", what, epx_status_name(res), test_now_ms() - t0,
                   res ? ": " : "", res ? epx_comm_get_last_error(comm) : "");
            if (test_now_ms() - t0 > timeout_ms + SLACK_MS)
                TEST_FAIL_("%s: the next call took %.0f ms", what, test_now_ms() - t0);
            failed = is_failure(res);
        }
        if (!failed) TEST_FAIL_("%s: got %s, expected a timeout or peer failure", what, sname(res));
        if (!hosts_ls) {
            ctx_check(&c, OLD_OR_NEW, what);
            break;
        }
        /* The communicator broke, so its NCCL link is aborted: NCCL work still on the stream
         * ends at once. A kill at the call's start stopped every rank before anything moved;
         * after the agreement, outputs are undefined (kernels behind aborted NCCL work read
         * staging that never filled). */
        t0 = test_now_ms();
        if (!drain(s, SLACK_MS))
            TEST_FAIL_("%s: the stream still waits %d ms after the communicator broke (NCCL work not aborted)", what,
                       SLACK_MS);
        printf("%s: stream drained %.0f ms after the failure\n", what, test_now_ms() - t0);
        if (f == F_KILL_HOST) ctx_check(&c, UNTOUCHED, what);
        break;
    case F_NOMEM: {
        /* One host only (main). Calls that map peers' buffers: the faulty rank's first
         * mapping fails after the host rounds, and every rank still agrees before anything is
         * enqueued (the faulty rank EPX_ERR_NO_MEMORY, the others EPX_ERR_REMOTE_INVALID, at
         * once, nothing written, usable). The others (eager alltoall(v), low latency, the
         * copy-engine combine) map nothing in the call: it succeeds. */
        bool maps = op_maps(op);
        epx_status_t want = !maps ? EPX_SUCCESS : bad ? EPX_ERR_NO_MEMORY : EPX_ERR_REMOTE_INVALID;
        if (res != want)
            TEST_FAIL_("%s: got %s, expected %s (%s)", what, sname(res), epx_status_name(want),
                       res ? epx_comm_get_last_error(comm) : "");
        ctx_check(&c, maps ? UNTOUCHED : EXACT, what);
        if (dt > SLACK_MS) TEST_FAIL_("%s: took %.0f ms (nothing should wait for a timeout)", what, dt);
        expect_usable(&c, what);
        break;
    }
    case F_NOMEM_LATE:
        /* One host, calls that map (main): rank 0 enters the mappings' agreement with its own
         * EPX_ERR_NO_MEMORY, the last rank stalls before it; nothing is enqueued anywhere. */
        broken = true;
        if (!failed) TEST_FAIL_("%s: got %s, expected a timeout or peer failure", what, sname(res));
        if (dt > (bad ? long_ms : 0) + timeout_ms + SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);
        ctx_check(&c, UNTOUCHED, what);
        break;
    case F_COUNT:
        if (op == OP_A2AV_DEVICE && !hosts_ls) {
            /* Only the sender sees it, on the device; its pair moved nothing. */
            broken = true;
            if (bad) {
                if (res != EPX_ERR_MISMATCH) TEST_FAIL_("%s: got %s, expected EPX_ERR_MISMATCH", what, epx_status_name(res));
                ctx_check(&c, EXACT, what);
            } else {
                ASSERT_EQ(res, EPX_SUCCESS);
                size_t from = rank == 0 ? (size_t)c.rd[R - 1] : 0, to = rank == 0 ? from + (size_t)c.rc[R - 1] : 0;
                ctx_check_range(&c, EXACT, what, from, to);
            }
            if (dt > SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);
            break;
        }
        {
            bool pair = is_moe(op) || bad || rank == 0;
            epx_status_t want = pair ? EPX_ERR_MISMATCH : EPX_ERR_REMOTE_INVALID;
            if (res != want) TEST_FAIL_("%s: got %s, expected %s", what, sname(res), epx_status_name(want));
        }
        ctx_check(&c, UNTOUCHED, what);
        if (dt > SLACK_MS) TEST_FAIL_("%s: took %.0f ms", what, dt);
        expect_usable(&c, what);
        break;
    case F_FAIL_ENQUEUE:
        /* Across hosts only (main): the faulty rank's device fails ahead of everything its call
         * enqueues (a kernel on its stream), and the call still moves everything. Every rank
         * fails in this call, with no timeout to wait for: the faulty one with its own error,
         * the others with the relayed one (statuses with the NCCL groups; FAILED flags inside
         * a host). */
        broken = true;
        if (res == EPX_SUCCESS) TEST_FAIL_("%s: succeeded on what a failed rank sent or forwarded", what);
        /* The faulty rank and its host-mates learn it on their own devices (the injection
         * runs first on its stream; their exchange inside the host with it runs before any
         * status from another host is checked): strict whatever happens on the network. */
        bool near = bad || (hosts_ls > 0 && rank / hosts_ls == (R - 1) / hosts_ls);
        if (near || st != EPX_SUCCESS || dt <= SLACK_MS) {
            if (res != (bad ? EPX_ERR_TIMEOUT : EPX_ERR_PEER_FAILURE))
                TEST_FAIL_("%s: got %s, expected %s", what, sname(res),
                           bad ? "EPX_ERR_TIMEOUT (injected)" : "EPX_ERR_PEER_FAILURE (relayed)");
            /* The faulty rank's host-mates hear it inside the host (FAILED flags; cuda.c's
             * message): their local exchange with it runs before any status from another host
             * is checked. */
            const char *msg = epx_comm_get_last_error(comm);
            if (bad && !strstr(msg, "injected"))
                TEST_FAIL_("%s: the faulty rank's error is not its injected failure: %s", what, msg);
            if (near && !bad && !strstr(msg, "inside the host"))
                TEST_FAIL_("%s: a host-mate of the faulty rank got %s, not relayed inside the host: %s", what,
                           sname(res), msg);
            if (dt > SLACK_MS) TEST_FAIL_("%s: took %.0f ms (nothing should wait for a timeout)", what, dt);
            ctx_check(&c, OLD_OR_NEW, what);
            break;
        }
        /* On another host: a rank that failed at once breaks its communicator, which aborts
         * its NCCL link; that may cut short its rail peers' transfers with it, whose streams
         * then wait, as after a kill, until the watchdog ends them (outputs undefined: kernels
         * behind aborted NCCL work); a host-mate's device wait for such a rank may time out
         * first. */
        if (!is_failure(res))
            TEST_FAIL_("%s: the stream drained after %.0f ms with %s, expected a failure", what, dt, sname(res));
        break;
    default: break;
    }
    if (!broken) {
        ctx_free(&c);
        ASSERT_OK(epx_comm_destroy(comm));
        return 0;
    }
    if (!(f == F_COUNT && !bad)) { /* a broken communicator answers at once */
        epx_status_t async = EPX_SUCCESS;
        ASSERT_OK(epx_comm_get_async_error(comm, &async));
        ASSERT(async != EPX_SUCCESS);
        t0 = test_now_ms();
        ASSERT_STATUS(ctx_run(&c), async);
        if (test_now_ms() - t0 > 200) TEST_FAIL_("%s: a call on the broken communicator took %.0f ms", what, test_now_ms() - t0);
    }
    ctx_free(&c);
    ASSERT_OK(epx_comm_abort(comm));
    if (hosts_ls && is_kill(f)) {
        /* Hosts must be of equal size: the hosts that lost no rank (those before the dead,
         * last rank's) make the new communicator; its host-mates one each, alone. */
        int whole = R - hosts_ls;
        if (rank < whole) {
            recover(op, whole, rank, id2, device, s);
        } else {
            epx_unique_id_t own;
            ASSERT_OK(epx_get_unique_id(&own));
            recover(op, 1, 0, &own, device, s);
        }
    } else {
        recover(op, is_kill(f) ? R - 1 : R, rank, id2, device, s);
    }
    CK(cudaStreamDestroy(s));
    fflush(stdout);
    return 0;
}

static int scenario(op_t op, fault_t f, int R, int ndev)
{
    int step = fault_step(op), bad = R - 1;
    char text[160] = "";
    switch (f) {
    case F_DELAY_SHORT: snprintf(text, sizeof text, "delay:rank=%d,step=%d,ms=%d", bad, step, SHORT_MS); break;
    case F_DELAY_ENQUEUE: snprintf(text, sizeof text, "delay:rank=%d,step=%d,ms=%d,at=enqueue", bad, step, SHORT_MS); break;
    case F_DELAY_LONG: /* across hosts at the call's start (see the header) */
        snprintf(text, sizeof text, "delay:rank=%d,step=%d,ms=%d,at=%s", bad, step, long_ms,
                 hosts_ls ? "host" : "enqueue");
        break;
    case F_KILL_HOST: snprintf(text, sizeof text, "kill:rank=%d,step=%d", bad, step); break;
    case F_KILL_ENQUEUE: snprintf(text, sizeof text, "kill:rank=%d,step=%d,at=enqueue", bad, step); break;
    case F_KILL_LAUNCHED: snprintf(text, sizeof text, "kill:rank=%d,step=%d,at=launched", bad, step); break;
    case F_COUNT: snprintf(text, sizeof text, "count:rank=%d,step=%d", bad, step); break;
    case F_FAIL_ENQUEUE: snprintf(text, sizeof text, "fail:rank=%d,step=%d,at=enqueue", bad, step); break;
    case F_NOMEM: snprintf(text, sizeof text, "nomem:rank=%d,step=%d", bad, step); break;
    case F_DELAY_HOST:
    case F_INVALID_LATE: snprintf(text, sizeof text, "delay:rank=%d,step=%d,ms=%d,at=host", bad, step, long_ms); break;
    case F_NOMEM_LATE:
        snprintf(text, sizeof text, "nomem:rank=0,step=%d;delay:rank=%d,step=%d,ms=%d,at=mapped", step, bad, step,
                 long_ms);
        break;
    default: break;
    }
    setenv("EPX_FAULT", text, 1);
    int ids[2];
    ASSERT(pipe(ids) == 0);
    fault_ids_t both;
    fflush(stdout);
    pid_t pids[MAXR];
    for (int r = 0; r < R; r++) {
        pids[r] = fork();
        ASSERT(pids[r] >= 0);
        if (pids[r] != 0) continue;
        test_rank = r;
        fault_ids_share(r, R, ids, &both);
        int rc = rank_main(op, f, r, R, ndev, &both.id, &both.id2);
        fflush(stdout);
        _exit(rc);
    }
    int failed = 0, skipped = 0;
    for (int r = 0; r < R; r++) {
        int status;
        ASSERT(waitpid(pids[r], &status, 0) == pids[r]);
        int want = is_kill(f) && r == R - 1 ? FAULT_EXIT : 0;
        if (WIFEXITED(status) && WEXITSTATUS(status) == TEST_SKIP) {
            skipped = 1; /* the communicator cannot be made here (make_comm said why) */
        } else if (!WIFEXITED(status) || WEXITSTATUS(status) != want) {
            fprintf(stderr, "FAIL %s/%s np%d: rank %d ended with status 0x%x (expected exit %d)\n", op_names[op],
                    fault_names[f], R, r, status, want);
            failed = 1;
        }
    }
    close(ids[1]);
    bool got = read(ids[0], &both, sizeof both) == sizeof both;
    close(ids[0]);
    char idtext[EPX_UNIQUE_ID_STRLEN];
    if (got && epx_unique_id_to_string(&both.id, idtext, sizeof idtext) == EPX_SUCCESS) epx_launch_cleanup_shm(idtext);
    return failed ? 1 : skipped ? TEST_SKIP : 0;
}

/* Devices, counted in a child: the parent forks ranks afterwards and must not hold CUDA. */
static int count_devices(char *why, size_t len)
{
    int fd[2];
    ASSERT(pipe(fd) == 0);
    pid_t pid = fork();
    ASSERT(pid >= 0);
    if (pid == 0) {
        int n = 0;
        cudaError_t e = cudaGetDeviceCount(&n);
        char msg[200];
        snprintf(msg, sizeof msg, "%d %s", e == cudaSuccess ? n : 0, e == cudaSuccess ? "devices" : cudaGetErrorString(e));
        /* "N reason": N devices, then why */
        ssize_t w = write(fd[1], msg, strlen(msg) + 1);
        _exit(w > 0 ? 0 : 1);
    }
    close(fd[1]);
    char msg[200] = "";
    ssize_t n = read(fd[0], msg, sizeof msg - 1);
    close(fd[0]);
    int status;
    waitpid(pid, &status, 0);
    int ndev = n > 0 ? atoi(msg) : 0;
    const char *sp = strchr(msg, ' ');
    snprintf(why, len, "%s", n > 0 && sp ? sp + 1 : "the probe failed");
    return ndev;
}
#endif

int main(int argc, char **argv)
{
    test_rank = 0;
#ifndef EPX_HAVE_CUDA
    (void)argc, (void)argv;
    printf("SKIPPED: this build has no CUDA backend\n");
    return TEST_SKIP;
#else
    int a = 1;
    if (a < argc && !strcmp(argv[a], "--cuda")) a++;
    if (argc - a < 2) {
        fprintf(stderr, "usage: %s [--cuda] OP NRANKS [FAULT...]\n", argv[0]);
        return 2;
    }
    op_t op = OP_NUM;
    for (int i = 0; i < OP_NUM; i++)
        if (!strcmp(argv[a], op_names[i])) op = (op_t)i;
    int R = atoi(argv[a + 1]);
    if (op == OP_NUM || R < 2 || R > MAXR) {
        fprintf(stderr, "bad op or NRANKS (2..%d)\n", MAXR);
        return 2;
    }
    /* Across simulated hosts when EPX_LOCAL_SIZE leaves more than one host. */
    const char *lss = getenv("EPX_LOCAL_SIZE"), *tms = getenv("EPX_TEST_FAULT_TIMEOUT_MS");
    int ls = lss ? atoi(lss) : 0;
    if (ls > 0 && R > ls) {
        if (R % ls) {
            fprintf(stderr, "NRANKS %d is not a multiple of EPX_LOCAL_SIZE %d (hosts of equal size)\n", R, ls);
            return 2;
        }
        hosts_ls = ls;
        timeout_ms = 4000;
    }
    if (tms && atoi(tms) > 0) timeout_ms = atoi(tms);
    long_ms = timeout_ms + 3000;
    char why[200];
    int ndev = count_devices(why, sizeof why);
    if (ndev < 1) {
        printf("SKIPPED: no CUDA device here (%s)\n", why);
        return TEST_SKIP;
    }
    const char *fake = getenv("EPX_TEST_FAKE_NCCL"); /* NCCL is tests/fake_nccl.c: ranks may share a GPU */
    if (hosts_ls && ndev < R / hosts_ls && !(fake && atoi(fake))) {
        printf("SKIPPED: %d simulated hosts need %d GPUs (one per host: NCCL takes one rank per GPU); %d here\n",
               R / hosts_ls, R / hosts_ls, ndev);
        return TEST_SKIP;
    }
    bool want[F_NUM] = {false};
    int nwant = 0;
    for (int i = a + 2; i < argc; i++)
        for (int f = 0; f < F_NUM; f++)
            if (!strcmp(argv[i], fault_names[f])) want[f] = true, nwant++;
    int passed = 0;
    for (int f = 0; f < F_NUM; f++) {
        if (nwant && !want[f]) continue;
        if (f == F_FAIL_ENQUEUE && !hosts_ls) {
            printf("scenario %s/%s np%d: not run (EPX_FAULT fail fires across hosts only)\n", op_names[op],
                   fault_names[f], R);
            continue;
        }
        if ((f == F_DELAY_HOST || f == F_INVALID_LATE) && hosts_ls) {
            printf("scenario %s/%s np%d hosts: not run (across hosts delay_long is at=host)\n", op_names[op],
                   fault_names[f], R);
            continue;
        }
        if (f == F_NOMEM_LATE && (hosts_ls || !op_maps(op))) {
            printf("scenario %s/%s np%d%s: not run (%s)\n", op_names[op], fault_names[f], R, hosts_ls ? " hosts" : "",
                   hosts_ls ? "EPX_FAULT nomem on CUDA is tested on one host" : "the call maps no peer's buffer");
            continue;
        }
        if (f == F_NOMEM && hosts_ls) {
            printf("scenario %s/%s np%d hosts: not run (EPX_FAULT nomem on CUDA is tested on one host)\n",
                   op_names[op], fault_names[f], R);
            continue;
        }
        fflush(stdout);
        double t0 = test_now_ms();
        pid_t pid = fork();
        ASSERT(pid >= 0);
        if (pid == 0) _exit(scenario(op, (fault_t)f, R, ndev));
        int status;
        ASSERT(waitpid(pid, &status, 0) == pid);
        if (WIFEXITED(status) && WEXITSTATUS(status) == TEST_SKIP) {
            printf("SKIPPED: scenario %s/%s np%d could not make its communicator (see above)\n", op_names[op],
                   fault_names[f], R);
            return TEST_SKIP;
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            TEST_FAIL_("scenario %s/%s np%d%s failed (status 0x%x)", op_names[op], fault_names[f], R,
                       hosts_ls ? " hosts" : "", status);
        printf("scenario %s/%s np%d%s passed in %.0f ms\n", op_names[op], fault_names[f], R, hosts_ls ? " hosts" : "",
               test_now_ms() - t0);
        passed++;
    }
    test_done(passed);
    return 0;
#endif
}
