/*
 * CUDA graphs: an alltoall captured once per path (eager slots, direct kernel) and replayed
 * 200 times, each replay with new data and a poisoned output, every element checked. The
 * host agrees on the arguments at capture time; replays need no host work (epx keeps the
 * operation number on the device); the direct one survives, halfway, 300 eager calls that
 * map new peer buffers (more than the mapping cache holds). Then a MoE dispatch (worst-case capacity, count on the
 * device: no host synchronisation) + an identity expert + combine, captured once and
 * replayed with new tokens AND new routing every time: rows, sources, count and combined
 * output all checked; the same for low-latency dispatch + combine, 1000 replays, and for two
 * batches in flight through the low-latency send/receive halves, 500 replays. Then
 * epx_alltoallv_device: counts in device memory, changed before
 * every replay, and a count mismatch that must surface as an asynchronous error. Run with
 * 2+ ranks and --cuda.
 *
 * With the high-throughput payload on copy engines (--copy-engines, or EPX_CUDA_SMS=0 in the
 * environment) a dispatch reads its counts back to the host: capturing one must fail with
 * EPX_ERR_INVALID_USAGE on every rank, leave the capture intact and the communicator
 * healthy. The MoE part then dispatches outside the graph and captures a cached dispatch +
 * identity expert + combine along that handle, replayed with new tokens every time.
 *
 * With --pool every buffer comes from the stream-ordered pool (memory CUDA IPC cannot share):
 * the alltoalls then receive through epx's staging buffer (the copies out of it inside the
 * captures; the mapping churn maps nothing new then: the peers keep writing into the same
 * staging buffer), the MoE parts run on the inputs epx stages, a captured
 * call that would have to grow a staging buffer is refused (pool_a2a_capture_refused,
 * replay_pool_growth, which also replays a graph whose staging buffer was outgrown since),
 * and alltoallv_device is refused (EPX_ERR_UNSUPPORTED: its buffers cannot be staged).
 *
 * Across hosts (EPX_LOCAL_SIZE; the fake NCCL of the fake_nccl_* tests replays captured
 * groups) only the low-latency calls can be captured: --ll-only runs those two parts alone;
 * --ll-stall runs stall_ll (a rank that stalls while its peers replay: nothing may hang).
 */
#include <string.h>
#include <unistd.h>

#include "testlib.h"

#ifdef EPX_HAVE_CUDA
#include <cuda_runtime_api.h>
#define CU(x)                                                                                 \
    do {                                                                                      \
        cudaError_t e_ = (x);                                                                 \
        if (e_ != cudaSuccess) TEST_FAIL_("%s: %s", #x, cudaGetErrorString(e_));              \
    } while (0)

/* Eager alltoalls of `count` elements, each into new receive buffers (all kept until the end):
 * every rank maps R - 1 new peer buffers per call, more than its mapping cache holds, so
 * that every mapping not held by a context or a graph is closed. */
static void churn_mappings(epx_comm_t comm, int R, size_t count, const uint32_t *send, cudaStream_t s)
{
    enum { CALLS = 300 }; /* > EPX__IPC_CACHE (src/cuda/internal.h) */
    void **bufs = malloc(CALLS * sizeof *bufs);
    ASSERT(bufs);
    for (int i = 0; i < CALLS; i++) {
        bufs[i] = test_buf_alloc(count * (size_t)R * 4);
        ASSERT_OK(epx_alltoall(comm, send, bufs[i], count, EPX_F32, s));
    }
    test_sync();
    ASSERT_OK(epx_barrier(comm, s)); /* nobody frees a buffer a peer still writes */
    for (int i = 0; i < CALLS; i++) test_buf_free(bufs[i]);
    free(bufs);
}

/* `churn`: halfway, the mapping cache is churned (churn_mappings): the graph's mappings of
 * the peers' buffers must survive it. */
static int replay(epx_comm_t comm, int me, int R, size_t count, int rounds, bool churn)
{
    cudaStream_t s = test_stream();
    size_t bytes = count * (size_t)R * 4;
    uint32_t *send = test_buf_alloc(bytes), *recv = test_buf_alloc(bytes), *host = malloc(bytes);
    /* One ordinary call first: maps the peers' buffers outside the capture. */
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, s));
    test_sync();
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, s));
    CU(cudaStreamEndCapture(s, &graph));
    CU(cudaGraphInstantiate(&exec, graph, 0));
    for (int it = 0; it < rounds; it++) {
        if (churn && it == rounds / 2) churn_mappings(comm, R, count, send, s);
        for (int q = 0; q < R; q++)
            for (size_t i = 0; i < count; i++)
                host[(size_t)q * count + i] = (uint32_t)test_mix((uint64_t)it + 1000, (uint64_t)me, (uint64_t)q, i);
        test_buf_put(send, host, bytes);
        test_buf_poison(recv, 0xA5, bytes);
        CU(cudaGraphLaunch(exec, s));
        test_buf_get(host, recv, bytes);
        for (int q = 0; q < R; q++)
            for (size_t i = 0; i < count; i++)
                if (host[(size_t)q * count + i] != (uint32_t)test_mix((uint64_t)it + 1000, (uint64_t)q, (uint64_t)me, i))
                    TEST_FAIL_("replay %d (count %zu): element %zu from rank %d wrong", it, count, i, q);
    }
    /* The communicator still works outside the graph afterwards. */
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, s));
    test_sync();
    CU(cudaGraphExecDestroy(exec));
    CU(cudaGraphDestroy(graph));
    test_buf_free(send), test_buf_free(recv), free(host);
    return rounds;
}

/* A call captured into `graph` that the library had to refuse (status st): every rank gets
 * EPX_ERR_INVALID_USAGE naming CUDA graphs, `what` says which call; the graph is dropped and
 * the communicator is still healthy. */
static void expect_capture_refused(epx_comm_t comm, epx_status_t st, cudaGraph_t graph, const char *what)
{
    if (st != EPX_ERR_INVALID_USAGE || !strstr(epx_comm_get_last_error(comm), "CUDA graph"))
        TEST_FAIL_("%s: got %s (%s), expected EPX_ERR_INVALID_USAGE naming CUDA graphs", what, epx_status_name(st),
                   epx_comm_get_last_error(comm));
    CU(cudaGraphDestroy(graph));
    epx_status_t async = EPX_ERR_INTERNAL;
    ASSERT_OK(epx_comm_get_async_error(comm, &async));
    ASSERT_EQ(async, EPX_SUCCESS);
}

/* --pool: epx's staging buffer for receive buffers CUDA IPC cannot share cannot grow during a
 * capture: a captured alltoall larger than any before fails on every rank with
 * EPX_ERR_INVALID_USAGE, the capture intact, nothing written; the same call outside works. */
static int pool_a2a_capture_refused(epx_comm_t comm, int me, int R)
{
    cudaStream_t s = test_stream();
    size_t count = 1000000, bytes = count * (size_t)R * 4; /* direct kernel, 10 x replay's */
    uint32_t *send = test_buf_alloc(bytes), *recv = test_buf_alloc(bytes), *host = malloc(bytes);
    for (int q = 0; q < R; q++)
        for (size_t i = 0; i < count; i++)
            host[(size_t)q * count + i] = (uint32_t)test_mix(4242, (uint64_t)me, (uint64_t)q, i);
    test_buf_put(send, host, bytes);
    test_buf_poison(recv, 0xA5, bytes);
    cudaGraph_t graph;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    epx_status_t st = epx_alltoall(comm, send, recv, count, EPX_F32, s);
    CU(cudaStreamEndCapture(s, &graph));
    expect_capture_refused(comm, st, graph, "--pool: a captured alltoall that must grow the staging buffer");
    ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, s));
    test_buf_get(host, recv, bytes);
    for (int q = 0; q < R; q++)
        for (size_t i = 0; i < count; i++)
            if (host[(size_t)q * count + i] != (uint32_t)test_mix(4242, (uint64_t)q, (uint64_t)me, i))
                TEST_FAIL_("--pool: alltoall after a refused capture: element %zu from rank %d wrong", i, q);
    test_buf_free(send), test_buf_free(recv), free(host);
    return 1;
}

/* ---- alltoallv with its counts on the device -------------------------------------------- */

/* Elements rank p sends rank q in round `it` (0 to 300, zero now and then). */
static int64_t v_count(int it, int p, int q)
{
    uint64_t v = test_mix((uint64_t)it + 555, (uint64_t)p, (uint64_t)q, 1);
    return (v & 3) == 0 ? 0 : (int64_t)(v >> 8) % 301;
}

/* Counts and displacements of round `it` for rank me: sends packed in rank order, receives
 * in reverse rank order with a gap, so displacements matter. */
static void v_layout(int it, int me, int R, int64_t *sc, int64_t *sd, int64_t *rc, int64_t *rd)
{
    int64_t s = 0, r = 3;
    for (int q = 0; q < R; q++) sc[q] = v_count(it, me, q), sd[q] = s, s += sc[q];
    for (int q = R - 1; q >= 0; q--) rc[q] = v_count(it, q, me), rd[q] = r, r += rc[q] + 5;
}

/* One direct call, then a graph replayed with new counts (written in stream order before
 * each launch) and new data; every element and the untouched gaps checked. */
static int alltoallv_device(epx_comm_t comm, int me, int R, int rounds)
{
    cudaStream_t s = test_stream();
    size_t cap = (size_t)R * 310 + 8;
    uint32_t *send = test_buf_alloc(cap * 4), *recv = test_buf_alloc(cap * 4), *hs = malloc(cap * 4), *hr = malloc(cap * 4);
    int64_t *d = test_buf_alloc(4 * (size_t)R * 8), *h = malloc(4 * (size_t)R * 8);
    int64_t *sc = h, *sd = h + R, *rc = h + 2 * R, *rd = h + 3 * R;
    cudaGraph_t graph;
    cudaGraphExec_t exec = NULL;
    for (int it = -1; it < rounds; it++) {
        v_layout(it, me, R, sc, sd, rc, rd);
        for (int q = 0; q < R; q++)
            for (int64_t i = 0; i < sc[q]; i++) hs[sd[q] + i] = (uint32_t)test_mix((uint64_t)it + 9, (uint64_t)me, (uint64_t)q, (uint64_t)i);
        test_buf_put(send, hs, cap * 4);
        test_buf_put(d, h, 4 * (size_t)R * 8);
        test_buf_poison(recv, 0xA5, cap * 4);
        if (it < 0) { /* the direct call */
            ASSERT_OK(epx_alltoallv_device(comm, send, d, d + R, recv, d + 2 * R, d + 3 * R, EPX_F32, s));
        } else {
            if (!exec) {
                CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
                ASSERT_OK(epx_alltoallv_device(comm, send, d, d + R, recv, d + 2 * R, d + 3 * R, EPX_F32, s));
                CU(cudaStreamEndCapture(s, &graph));
                CU(cudaGraphInstantiate(&exec, graph, 0));
            }
            CU(cudaGraphLaunch(exec, s));
        }
        test_buf_get(hr, recv, cap * 4);
        size_t at = 0;
        for (int q = R - 1; q >= 0; q--) {
            for (; at < (size_t)rd[q]; at++)
                if (hr[at] != 0xA5A5A5A5u) TEST_FAIL_("round %d: gap element %zu was written", it, at);
            for (int64_t i = 0; i < rc[q]; i++, at++)
                if (hr[at] != (uint32_t)test_mix((uint64_t)it + 9, (uint64_t)q, (uint64_t)me, (uint64_t)i))
                    TEST_FAIL_("round %d: element %lld from rank %d wrong", it, (long long)i, q);
        }
    }
    CU(cudaGraphExecDestroy(exec));
    CU(cudaGraphDestroy(graph));
    test_buf_free(send), test_buf_free(recv), test_buf_free(d), free(hs), free(hr), free(h);
    return rounds + 1;
}

/* --pool: alltoallv_device's peers write its receive buffer and read its counts, which the
 * library cannot stage: every rank refuses the call (EPX_ERR_UNSUPPORTED, naming the memory),
 * nothing written, the communicator usable. */
static int alltoallv_device_refused(epx_comm_t comm, int R)
{
    cudaStream_t s = test_stream();
    uint32_t *send = test_buf_alloc(64 * 4), *recv = test_buf_alloc(64 * 4), hr[64];
    int64_t h[4 * 32], *d = test_buf_alloc(sizeof h);
    for (int q = 0; q < R; q++) h[q] = 2, h[R + q] = 2 * q, h[2 * R + q] = 2, h[3 * R + q] = 2 * q;
    test_buf_put(d, h, sizeof h);
    test_buf_poison(recv, 0xA5, 64 * 4);
    epx_status_t st = epx_alltoallv_device(comm, send, d, d + R, recv, d + 2 * R, d + 3 * R, EPX_F32, s);
    if (st != EPX_ERR_UNSUPPORTED || !strstr(epx_comm_get_last_error(comm), "cannot share"))
        TEST_FAIL_("--pool: alltoallv_device -> %s (%s), expected EPX_ERR_UNSUPPORTED (memory CUDA IPC cannot share)",
                   epx_status_name(st), epx_comm_get_last_error(comm));
    test_buf_get(hr, recv, 64 * 4);
    for (int i = 0; i < 64; i++)
        if (hr[i] != 0xA5A5A5A5u) TEST_FAIL_("--pool: a refused alltoallv_device wrote element %d", i);
    ASSERT_OK(epx_barrier(comm, s));
    test_sync();
    test_buf_free(send), test_buf_free(recv), test_buf_free(d);
    return 1;
}

/* Last: rank 0 sends rank 1 one element more than rank 1 expects. Rank 0's communicator
 * reports EPX_ERR_MISMATCH, nothing of that pair is written, and no rank hangs. */
static void alltoallv_device_mismatch(epx_comm_t comm, int me, int R)
{
    cudaStream_t s = test_stream();
    uint32_t *send = test_buf_alloc(64 * 4), *recv = test_buf_alloc(64 * 4), hr[64];
    int64_t h[4 * 32], *d = test_buf_alloc(sizeof h);
    for (int q = 0; q < R; q++) h[q] = 2, h[R + q] = 2 * q, h[2 * R + q] = 2, h[3 * R + q] = 2 * q;
    if (me == 0) { /* 3 elements for rank 1 (which expects 2); the later sends move up one */
        h[1] = 3;
        for (int q = 2; q < R; q++) h[R + q] = 2 * q + 1;
    }
    test_buf_put(d, h, sizeof h);
    test_buf_poison(recv, 0xA5, 64 * 4);
    test_buf_poison(send, 0x11, 64 * 4);
    ASSERT_OK(epx_alltoallv_device(comm, send, d, d + R, recv, d + 2 * R, d + 3 * R, EPX_F32, s));
    test_buf_get(hr, recv, 64 * 4);
    epx_status_t async = EPX_SUCCESS;
    ASSERT_OK(epx_comm_get_async_error(comm, &async));
    if (me == 0 && async != EPX_ERR_MISMATCH)
        TEST_FAIL_("a count mismatch gave async error %s, expected EPX_ERR_MISMATCH", epx_status_name(async));
    if (me == 1 && (hr[0] != 0xA5A5A5A5u || hr[1] != 0xA5A5A5A5u)) TEST_FAIL_("the mismatched pair wrote data");
    test_buf_free(send), test_buf_free(recv), test_buf_free(d);
}

/* ---- MoE: dispatch + identity expert + combine ----------------------------------------- */

enum { GT = 64, GH = 256, GK = 4 }; /* tokens per rank, hidden, top-k; E = 4 R */

/* Replay `it`: expert id of (rank p, token t, k), -1 for about one entry in eight. */
static int64_t g_expert(int it, int p, int t, int k, int E)
{
    uint64_t v = test_mix((uint64_t)it + 77, (uint64_t)p, (uint64_t)t, (uint64_t)k);
    return (v & 7) == 0 ? -1 : (int64_t)((v >> 3) % (uint64_t)E);
}
static uint16_t g_x(int it, int p, int t, int h)
{
    /* a bf16 with a small exponent range and random mantissa (sums stay finite) */
    uint64_t v = test_mix((uint64_t)it + 99, (uint64_t)p, (uint64_t)t, (uint64_t)h);
    return (uint16_t)(0x3c00u + (v & 0x3ffu)) ^ (uint16_t)((v >> 20) & 0x8000u);
}
static unsigned g_mask(int it, int p, int t, int E, int R)
{
    unsigned m = 0;
    for (int k = 0; k < GK; k++) {
        int64_t e = g_expert(it, p, t, k, E);
        if (e >= 0) m |= 1u << (int)(e / (E / R));
    }
    return m;
}

static bool copy_engines; /* high-throughput MoE on copy engines (--copy-engines or EPX_CUDA_SMS=0) */
static int num_sms = EPX_UNSET;

/* Rows of replay `it` in recv (n of them; the first T tokens of every rank, routing of
 * replay `route`), checked against what every rank sent. */
static void check_moe_rows(int it, int route, int me, int R, int E, int T, int64_t n, const uint16_t *hrecv,
                           const int32_t *hsr, const int32_t *hst)
{
    int64_t row = 0;
    for (int p = 0; p < R; p++)
        for (int t = 0; t < T; t++) {
            if (!((g_mask(route, p, t, E, R) >> me) & 1u)) continue;
            if (hsr && row < n && (hsr[row] != p || hst[row] != t))
                TEST_FAIL_("replay %d: row %lld from (%d, %d), expected (%d, %d)", it, (long long)row, hsr[row],
                           hst[row], p, t);
            for (int hh = 0; row < n && hh < GH; hh++)
                if (hrecv[row * GH + hh] != g_x(it, p, t, hh))
                    TEST_FAIL_("replay %d: recv_x[%lld][%d] wrong", it, (long long)row, hh);
            row++;
        }
    if (n != row) TEST_FAIL_("replay %d: num_recv_tokens_device = %lld, expected %lld", it, (long long)n, (long long)row);
}

/* check_moe_rows of every token, and the combine of the identity expert in out. */
static void check_moe(int it, int route, int me, int R, int E, int64_t n, const uint16_t *hrecv, const int32_t *hsr,
                      const int32_t *hst, const uint16_t *hout)
{
    check_moe_rows(it, route, me, R, E, GT, n, hrecv, hsr, hst);
    /* Combine of the identity: each token's row summed once per rank it went to. */
    for (int t = 0; t < GT; t++) {
        int copies = __builtin_popcount(g_mask(route, me, t, E, R));
        for (int hh = 0; hh < GH; hh++) {
            float v = epx_bf16_to_float(g_x(it, me, t, hh)), acc = 0.0f;
            for (int i = 0; i < copies; i++) acc += v;
            if (hout[t * GH + hh] != epx_float_to_bf16(acc))
                TEST_FAIL_("replay %d: combine out[%d][%d] = 0x%x, expected 0x%x", it, t, hh, hout[t * GH + hh],
                           epx_float_to_bf16(acc));
        }
    }
}

/* Tokens of replay `it` (hx, then x on the device), and the routing of replay `route`
 * (hidx, then idx). */
static void put_tokens(int it, int me, uint16_t *hx, uint16_t *x)
{
    for (int t = 0; t < GT; t++)
        for (int hh = 0; hh < GH; hh++) hx[t * GH + hh] = g_x(it, me, t, hh);
    test_buf_put(x, hx, (size_t)GT * GH * 2);
}

static void put_routing(int route, int me, int E, int64_t *hidx, int64_t *idx)
{
    for (int t = 0; t < GT; t++)
        for (int k = 0; k < GK; k++) hidx[t * GK + k] = g_expert(route, me, t, k, E);
    test_buf_put(idx, hidx, sizeof(int64_t) * GT * GK);
}

/* Copy engines: a captured dispatch fails cleanly; a dispatch outside the graph, then a
 * cached dispatch + identity expert + combine along its handle, captured and replayed
 * with new tokens every time. */
static int replay_moe_ce(epx_comm_t comm, int me, int R, int rounds)
{
    cudaStream_t s = test_stream();
    int E = 4 * R;
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = GH, cfg.max_tokens_per_rank = GT, cfg.num_experts = E, cfg.max_topk = GK, cfg.num_sms = num_sms;
    epx_moe_t moe;
    ASSERT_OK(epx_moe_create(comm, &cfg, &moe));
    int64_t cap;
    ASSERT_OK(epx_moe_max_recv_tokens(moe, &cap));
    size_t xb = (size_t)GT * GH * 2, rb = (size_t)cap * GH * 2;
    uint16_t *x = test_buf_alloc(xb), *recv = test_buf_alloc(rb), *out = test_buf_alloc(xb);
    int64_t *idx = test_buf_alloc(sizeof(int64_t) * GT * GK), *count = test_buf_alloc(sizeof(int64_t));
    uint16_t *hx = malloc(xb), *hrecv = malloc(rb), *hout = malloc(xb);
    int64_t *hidx = malloc(sizeof(int64_t) * GT * GK);
    epx_moe_dispatch_in_t in = {x, NULL, idx, NULL, GT, GK};
    epx_moe_dispatch_out_t dout = {recv, NULL, NULL, NULL, NULL, NULL, NULL, cap, 0, count};
    epx_moe_combine_in_t cin = {recv, NULL};
    epx_moe_combine_out_t cout = {out, NULL};
    put_tokens(0, me, hx, x);
    put_routing(0, me, E, hidx, idx);

    /* A dispatch cannot be captured: every rank refuses it, nothing is enqueued. */
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    epx_moe_handle_t h = NULL;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    epx_status_t st = epx_moe_dispatch(moe, &in, &dout, &h, s);
    CU(cudaStreamEndCapture(s, &graph));
    ASSERT(h == NULL);
    expect_capture_refused(comm, st, graph, "captured dispatch on copy engines");

    /* Outside the graph: the count comes back to the host too. */
    ASSERT_OK(epx_moe_dispatch(moe, &in, &dout, &h, s));
    if (dout.num_recv_tokens < 0) TEST_FAIL_("dispatch on copy engines: num_recv_tokens = %lld", (long long)dout.num_recv_tokens);
    int64_t n = dout.num_recv_tokens;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    ASSERT_OK(epx_moe_dispatch_cached(moe, h, &in, &dout, s));
    ASSERT_OK(epx_moe_combine(moe, h, &cin, &cout, s));
    CU(cudaStreamEndCapture(s, &graph));
    CU(cudaGraphInstantiate(&exec, graph, 0));
    for (int it = 1; it <= rounds; it++) {
        put_tokens(it, me, hx, x);
        test_buf_poison(recv, 0xA5, rb);
        test_buf_poison(out, 0xA5, xb);
        CU(cudaGraphLaunch(exec, s));
        test_buf_get(hrecv, recv, rb);
        test_buf_get(hout, out, xb);
        check_moe(it, 0, me, R, E, n, hrecv, NULL, NULL, hout);
    }
    CU(cudaGraphExecDestroy(exec));
    CU(cudaGraphDestroy(graph));
    ASSERT_OK(epx_moe_handle_destroy(h));
    test_sync();
    ASSERT_OK(epx_moe_destroy(moe));
    test_buf_free(x), test_buf_free(recv), test_buf_free(out), test_buf_free(idx), test_buf_free(count);
    free(hx), free(hrecv), free(hout), free(hidx);
    return rounds + 1;
}

static int replay_moe(epx_comm_t comm, int me, int R, int rounds)
{
    if (copy_engines) return replay_moe_ce(comm, me, R, rounds);
    cudaStream_t s = test_stream();
    int E = 4 * R;
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = GH, cfg.max_tokens_per_rank = GT, cfg.num_experts = E, cfg.max_topk = GK;
    epx_moe_t moe;
    ASSERT_OK(epx_moe_create(comm, &cfg, &moe));
    int64_t cap;
    ASSERT_OK(epx_moe_max_recv_tokens(moe, &cap));
    size_t xb = (size_t)GT * GH * 2, rb = (size_t)cap * GH * 2;
    uint16_t *x = test_buf_alloc(xb), *recv = test_buf_alloc(rb), *out = test_buf_alloc(xb);
    int64_t *idx = test_buf_alloc(sizeof(int64_t) * GT * GK), *count = test_buf_alloc(sizeof(int64_t));
    int32_t *src_rank = test_buf_alloc(sizeof(int32_t) * (size_t)cap), *src_token = test_buf_alloc(sizeof(int32_t) * (size_t)cap);
    uint16_t *hx = malloc(xb), *hrecv = malloc(rb), *hout = malloc(xb);
    int64_t *hidx = malloc(sizeof(int64_t) * GT * GK);
    int32_t *hsr = malloc(sizeof(int32_t) * (size_t)cap), *hst = malloc(sizeof(int32_t) * (size_t)cap);
    epx_moe_dispatch_in_t in = {x, NULL, idx, NULL, GT, GK};
    epx_moe_dispatch_out_t dout = {recv, NULL, NULL, NULL, src_rank, src_token, NULL, cap, 0, count};
    epx_moe_combine_in_t cin = {recv, NULL}; /* the identity expert: y = recv_x */
    epx_moe_combine_out_t cout = {out, NULL};
    /* One ordinary round first: maps the peers' buffers outside the capture. */
    put_tokens(-1, me, hx, x);
    put_routing(-1, me, E, hidx, idx);
    epx_moe_handle_t h;
    ASSERT_OK(epx_moe_dispatch(moe, &in, &dout, &h, s));
    ASSERT_EQ(dout.num_recv_tokens, -1);
    ASSERT_OK(epx_moe_combine(moe, h, &cin, &cout, s));
    ASSERT_OK(epx_moe_handle_destroy(h));
    test_sync();

    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    ASSERT_OK(epx_moe_dispatch(moe, &in, &dout, &h, s));
    ASSERT_OK(epx_moe_combine(moe, h, &cin, &cout, s));
    CU(cudaStreamEndCapture(s, &graph));
    CU(cudaGraphInstantiate(&exec, graph, 0));
    for (int it = 0; it < rounds; it++) {
        put_tokens(it, me, hx, x);
        put_routing(it, me, E, hidx, idx);
        test_buf_poison(recv, 0xA5, rb);
        test_buf_poison(out, 0xA5, xb);
        test_buf_poison(src_rank, 0xA5, sizeof(int32_t) * (size_t)cap);
        test_buf_poison(count, 0xA5, sizeof(int64_t));
        CU(cudaGraphLaunch(exec, s));
        int64_t n;
        test_buf_get(&n, count, sizeof n);
        test_buf_get(hrecv, recv, rb);
        test_buf_get(hsr, src_rank, sizeof(int32_t) * (size_t)cap);
        test_buf_get(hst, src_token, sizeof(int32_t) * (size_t)cap);
        test_buf_get(hout, out, xb);
        /* Rows: every source's tokens bound for me, sources ascending, tokens ascending. */
        check_moe(it, it, me, R, E, n, hrecv, hsr, hst, hout);
    }
    CU(cudaGraphExecDestroy(exec));
    CU(cudaGraphDestroy(graph));
    ASSERT_OK(epx_moe_handle_destroy(h));
    /* The context still works outside the graph afterwards. */
    ASSERT_OK(epx_moe_dispatch(moe, &in, &dout, &h, s));
    ASSERT_OK(epx_moe_handle_destroy(h));
    test_sync();
    ASSERT_OK(epx_moe_destroy(moe));
    test_buf_free(x), test_buf_free(recv), test_buf_free(out), test_buf_free(idx), test_buf_free(count);
    test_buf_free(src_rank), test_buf_free(src_token);
    free(hx), free(hrecv), free(hout), free(hidx), free(hsr), free(hst);
    return rounds;
}
/* --pool: a MoE context stages the inputs peers read (memory CUDA IPC cannot share) in a
 * buffer of its own, which cannot grow during a capture: a captured dispatch that needs it
 * fails on every rank with EPX_ERR_INVALID_USAGE, the capture intact, nothing enqueued. And a
 * buffer a graph captured outlives its growth: a cached dispatch of one token per rank,
 * captured on the first buffer (64 KiB), replayed after an ordinary dispatch and combine (with
 * weights) of every token outgrew it (R x 33 KiB). */
static int replay_pool_growth(epx_comm_t comm, int me, int R, int rounds)
{
    cudaStream_t s = test_stream();
    int E = 4 * R;
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = GH, cfg.max_tokens_per_rank = GT, cfg.num_experts = E, cfg.max_topk = GK;
    epx_moe_t moe;
    ASSERT_OK(epx_moe_create(comm, &cfg, &moe));
    int64_t cap, n;
    ASSERT_OK(epx_moe_max_recv_tokens(moe, &cap));
    size_t xb = (size_t)GT * GH * 2, rb = (size_t)cap * GH * 2, wb = (size_t)cap * GK * 4;
    uint16_t *x = test_buf_alloc(xb), *recv = test_buf_alloc(rb), *out = test_buf_alloc(xb);
    int64_t *idx = test_buf_alloc(sizeof(int64_t) * GT * GK), *count = test_buf_alloc(sizeof(int64_t));
    float *w = test_buf_alloc(wb);
    uint16_t *hx = malloc(xb), *hrecv = malloc(rb);
    int64_t *hidx = malloc(sizeof(int64_t) * GT * GK);
    put_tokens(0, me, hx, x);
    put_routing(0, me, E, hidx, idx);
    test_buf_poison(w, 0, wb);
    epx_moe_dispatch_in_t one = {x, NULL, idx, NULL, 1, GK}, all = {x, NULL, idx, NULL, GT, GK};
    epx_moe_dispatch_out_t dout = {recv, NULL, NULL, NULL, NULL, NULL, NULL, cap, 0, count};
    epx_moe_handle_t h = NULL, h2;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    epx_status_t st = epx_moe_dispatch(moe, &one, &dout, &h, s);
    CU(cudaStreamEndCapture(s, &graph));
    ASSERT(h == NULL);
    expect_capture_refused(comm, st, graph, "--pool: a captured dispatch that must grow the staging buffer");

    dout.num_recv_tokens_device = NULL; /* the row count read back: the handle's for the check */
    ASSERT_OK(epx_moe_dispatch(moe, &one, &dout, &h, s));
    n = dout.num_recv_tokens;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    ASSERT_OK(epx_moe_dispatch_cached(moe, h, &one, &dout, s));
    CU(cudaStreamEndCapture(s, &graph));
    CU(cudaGraphInstantiate(&exec, graph, 0));
    dout.num_recv_tokens_device = count;
    ASSERT_OK(epx_moe_dispatch(moe, &all, &dout, &h2, s));
    epx_moe_combine_in_t cin = {recv, w};
    epx_moe_combine_out_t cout = {out, NULL};
    ASSERT_OK(epx_moe_combine(moe, h2, &cin, &cout, s));
    ASSERT_OK(epx_moe_handle_destroy(h2));
    test_sync();
    for (int it = 1; it <= rounds; it++) {
        put_tokens(it, me, hx, x);
        test_buf_poison(recv, 0xA5, rb);
        CU(cudaGraphLaunch(exec, s));
        test_buf_get(hrecv, recv, rb);
        check_moe_rows(it, 0, me, R, E, 1, n, hrecv, NULL, NULL);
    }
    CU(cudaGraphExecDestroy(exec));
    CU(cudaGraphDestroy(graph));
    ASSERT_OK(epx_moe_handle_destroy(h));
    test_sync();
    ASSERT_OK(epx_moe_destroy(moe));
    test_buf_free(x), test_buf_free(recv), test_buf_free(out), test_buf_free(idx), test_buf_free(count);
    test_buf_free(w), free(hx), free(hrecv), free(hidx);
    return rounds + 1;
}

/* ---- Low-latency: dispatch + identity expert + combine, 1000 replays ------------------------ */

static float g_weight(int it, int p, int t, int k)
{
    return (float)(test_mix((uint64_t)it + 31, (uint64_t)p, (uint64_t)t, (uint64_t)k) >> 40) * 0x1p-24f;
}

/* Low-latency dispatch + identity expert + combine in a graph. With `split`, two batches
 * in flight through the send/receive halves: send A, send B, receive A, receive B, for
 * dispatch and then combine; batch b of replay `it` uses data generation 2 * it + b. */
static int replay_ll(epx_comm_t comm, int me, int R, int rounds, bool split)
{
    cudaStream_t s = test_stream();
    int E = 4 * R, L = 4, NB = split ? 2 : 1;
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = GH, cfg.max_tokens_per_rank = GT, cfg.num_experts = E, cfg.max_topk = GK, cfg.mode = EPX_MOE_LOW_LATENCY;
    epx_moe_t moe;
    ASSERT_OK(epx_moe_create(comm, &cfg, &moe));
    size_t slots = (size_t)R * GT, xb = (size_t)GT * GH * 2, rb = (size_t)L * slots * GH * 2;
    struct {
        uint16_t *x, *recv, *out;
        int64_t *idx;
        float *w;
        int32_t *count;
        epx_moe_handle_t h;
    } b[2];
    float *hw = malloc(sizeof(float) * GT * GK);
    int32_t hcount[4];
    uint16_t *hx = malloc(xb), *hout = malloc(xb);
    int64_t *hidx = malloc(sizeof(int64_t) * GT * GK);
    for (int i = 0; i < NB; i++) {
        b[i].x = test_buf_alloc(xb), b[i].recv = test_buf_alloc(rb), b[i].out = test_buf_alloc(xb);
        b[i].idx = test_buf_alloc(sizeof(int64_t) * GT * GK);
        b[i].w = test_buf_alloc(sizeof(float) * GT * GK);
        b[i].count = test_buf_alloc(sizeof(int32_t) * (size_t)L);
    }
#define L_PUT(gen, i)                                                                              \
    do {                                                                                           \
        for (int t = 0; t < GT; t++) {                                                             \
            for (int h = 0; h < GH; h++) hx[t * GH + h] = g_x(gen, me, t, h);                      \
            for (int k = 0; k < GK; k++) {                                                         \
                hidx[t * GK + k] = g_expert(gen, me, t, k, E);                                     \
                hw[t * GK + k] = g_weight(gen, me, t, k);                                          \
            }                                                                                      \
        }                                                                                          \
        test_buf_put(b[i].x, hx, xb);                                                              \
        test_buf_put(b[i].idx, hidx, sizeof(int64_t) * GT * GK);                                   \
        test_buf_put(b[i].w, hw, sizeof(float) * GT * GK);                                         \
    } while (0)
    /* Enqueue the whole step: every batch's dispatch, then every batch's combine. */
#define L_STEP()                                                                                   \
    do {                                                                                           \
        for (int i = 0; i < NB; i++) {                                                             \
            epx_moe_ll_dispatch_in_t in = {b[i].x, b[i].idx, GT, GK};                              \
            epx_moe_ll_dispatch_out_t dout = {b[i].recv, NULL, b[i].count, NULL, NULL};            \
            ASSERT_OK(split ? epx_moe_ll_dispatch_send(moe, &in, &dout, &b[i].h, s)                \
                            : epx_moe_ll_dispatch(moe, &in, &dout, &b[i].h, s));                   \
        }                                                                                          \
        for (int i = 0; split && i < NB; i++) ASSERT_OK(epx_moe_ll_dispatch_recv(moe, b[i].h, s)); \
        for (int i = 0; i < NB; i++) {                                                             \
            epx_moe_ll_combine_in_t cin = {b[i].recv, b[i].w}; /* the identity expert */           \
            ASSERT_OK(split ? epx_moe_ll_combine_send(moe, b[i].h, &cin, b[i].out, s)              \
                            : epx_moe_ll_combine(moe, b[i].h, &cin, b[i].out, s));                 \
        }                                                                                          \
        for (int i = 0; split && i < NB; i++) ASSERT_OK(epx_moe_ll_combine_recv(moe, b[i].h, s));  \
    } while (0)
    for (int i = 0; i < NB; i++) L_PUT(-1 - i, i);
    L_STEP(); /* maps y outside the capture */
    for (int i = 0; i < NB; i++) ASSERT_OK(epx_moe_handle_destroy(b[i].h));
    test_sync();
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    L_STEP();
    CU(cudaStreamEndCapture(s, &graph));
    CU(cudaGraphInstantiate(&exec, graph, 0));
    for (int it = 0; it < rounds; it++) {
        for (int i = 0; i < NB; i++) {
            L_PUT(NB * it + i, i);
            test_buf_poison(b[i].out, 0xA5, xb);
            test_buf_poison(b[i].count, 0xA5, sizeof(int32_t) * (size_t)L);
        }
        CU(cudaGraphLaunch(exec, s));
        for (int i = 0; i < NB; i++) {
            int gen = NB * it + i;
            test_buf_get(hcount, b[i].count, sizeof(int32_t) * (size_t)L);
            test_buf_get(hout, b[i].out, xb);
            for (int l = 0; l < L; l++) {
                int e = me * L + l, n = 0;
                for (int p = 0; p < R; p++)
                    for (int t = 0; t < GT; t++) {
                        bool to = false;
                        for (int k = 0; k < GK; k++) to = to || g_expert(gen, p, t, k, E) == e;
                        n += to;
                    }
                if (hcount[l] != n)
                    TEST_FAIL_("ll replay %d batch %d: recv_count[%d] = %d, expected %d", it, i, l, hcount[l], n);
            }
            for (int t = 0; t < GT; t++)
                for (int hh = 0; hh < GH; hh++) {
                    /* A partial sum per expert rank (k ascending), then the ranks ascending. */
                    float v = epx_bf16_to_float(g_x(gen, me, t, hh)), acc = 0.0f;
                    for (int q = 0; q < R; q++) {
                        float part = 0.0f;
                        bool any = false;
                        for (int k = 0; k < GK; k++)
                            if (g_expert(gen, me, t, k, E) >= 0 && g_expert(gen, me, t, k, E) / L == q) {
                                float prod = g_weight(gen, me, t, k) * v;
                                part += prod, any = true;
                            }
                        if (any) acc += part;
                    }
                    if (hout[t * GH + hh] != epx_float_to_bf16(acc))
                        TEST_FAIL_("ll replay %d batch %d: combine out[%d][%d] = 0x%x, expected 0x%x", it, i, t, hh,
                                   hout[t * GH + hh], epx_float_to_bf16(acc));
                }
        }
    }
#undef L_PUT
#undef L_STEP
    CU(cudaGraphExecDestroy(exec));
    CU(cudaGraphDestroy(graph));
    for (int i = 0; i < NB; i++) ASSERT_OK(epx_moe_handle_destroy(b[i].h));
    test_sync();
    ASSERT_OK(epx_moe_destroy(moe));
    for (int i = 0; i < NB; i++) {
        test_buf_free(b[i].x), test_buf_free(b[i].recv), test_buf_free(b[i].out), test_buf_free(b[i].idx);
        test_buf_free(b[i].w), test_buf_free(b[i].count);
    }
    free(hx), free(hout), free(hidx), free(hw);
    return rounds;
}

/* ---- Low-latency across hosts: graphs that outlive a peer or the communicator ---------- */

/* EPX_TIMEOUT_MS, which the test named `flag` needs set (at most 10 s). */
static double env_timeout_ms(const char *flag)
{
    const char *tms = getenv("EPX_TIMEOUT_MS");
    double timeout_ms = tms ? atof(tms) : 0;
    if (timeout_ms <= 0 || timeout_ms > 10000) TEST_FAIL_("%s needs EPX_TIMEOUT_MS set, at most 10000", flag);
    return timeout_ms;
}

/* A low-latency dispatch + combine captured in a graph (instantiated), with its context,
 * buffers and inputs. */
typedef struct {
    epx_moe_t moe;
    uint16_t *x, *recv, *out;
    int64_t *idx;
    float *w;
    int32_t *count;
    epx_moe_handle_t h; /* the captured dispatch's */
    cudaGraph_t graph;
    cudaGraphExec_t exec;
} ll_graph_t;

/* With `warm`, one call outside the capture first (it maps the peers' buffers). */
static void ll_graph_make(ll_graph_t *g, epx_comm_t comm, int me, int R, cudaStream_t s, bool warm)
{
    int E = 4 * R;
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = GH, cfg.max_tokens_per_rank = GT, cfg.num_experts = E, cfg.max_topk = GK, cfg.mode = EPX_MOE_LOW_LATENCY;
    ASSERT_OK(epx_moe_create(comm, &cfg, &g->moe));
    size_t xb = (size_t)GT * GH * 2, rb = (size_t)4 * R * GT * GH * 2;
    g->x = test_buf_alloc(xb), g->recv = test_buf_alloc(rb), g->out = test_buf_alloc(xb);
    g->idx = test_buf_alloc(sizeof(int64_t) * GT * GK);
    g->w = test_buf_alloc(sizeof(float) * GT * GK);
    g->count = test_buf_alloc(sizeof(int32_t) * 4);
    uint16_t *hx = malloc(xb);
    int64_t *hidx = malloc(sizeof(int64_t) * GT * GK);
    float *hw = malloc(sizeof(float) * GT * GK);
    for (int t = 0; t < GT; t++) {
        for (int h = 0; h < GH; h++) hx[t * GH + h] = g_x(0, me, t, h);
        for (int k = 0; k < GK; k++) hidx[t * GK + k] = g_expert(0, me, t, k, E), hw[t * GK + k] = g_weight(0, me, t, k);
    }
    test_buf_put(g->x, hx, xb);
    test_buf_put(g->idx, hidx, sizeof(int64_t) * GT * GK);
    test_buf_put(g->w, hw, sizeof(float) * GT * GK);
    free(hx), free(hidx), free(hw);
    epx_moe_ll_dispatch_in_t in = {g->x, g->idx, GT, GK};
    epx_moe_ll_dispatch_out_t dout = {g->recv, NULL, g->count, NULL, NULL};
    epx_moe_ll_combine_in_t cin = {g->recv, g->w};
    if (warm) {
        ASSERT_OK(epx_moe_ll_dispatch(g->moe, &in, &dout, &g->h, s));
        ASSERT_OK(epx_moe_ll_combine(g->moe, g->h, &cin, g->out, s));
        ASSERT_OK(epx_moe_handle_destroy(g->h));
        test_sync();
    }
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    ASSERT_OK(epx_moe_ll_dispatch(g->moe, &in, &dout, &g->h, s));
    ASSERT_OK(epx_moe_ll_combine(g->moe, g->h, &cin, g->out, s));
    CU(cudaStreamEndCapture(s, &g->graph));
    CU(cudaGraphInstantiate(&g->exec, g->graph, 0));
}

/* The graph, then the buffers. The handle and the context are the caller's to release
 * (in the order the test is about); so is the graph, before them (then set it NULL). */
static void ll_graph_free(ll_graph_t *g)
{
    if (g->exec) CU(cudaGraphExecDestroy(g->exec));
    if (g->graph) CU(cudaGraphDestroy(g->graph));
    test_buf_free(g->x), test_buf_free(g->recv), test_buf_free(g->out), test_buf_free(g->idx), test_buf_free(g->w);
    test_buf_free(g->count);
}

/* Across hosts (EPX_LOCAL_SIZE): a low-latency dispatch + combine captured and replayed
 * (once after every rank idled 1.5 x EPX_TIMEOUT_MS: no error); then the last rank sleeps
 * 8 x EPX_TIMEOUT_MS before its next replay while the others
 * replay at once. No call of epx's times those replays; still nothing may hang: every
 * rank's stream finishes (epx's NCCL watchdog aborts the link under a replay that waits on
 * the transfers longer than EPX_TIMEOUT_MS, and device waits are bounded), and every rank's
 * communicator then reports an error. The graph is destroyed before the communicator (NCCL's
 * abort waits for the graphs that captured its work). Leaves the communicator broken. */
static int stall_ll(epx_comm_t comm, int me, int R)
{
    double timeout_ms = env_timeout_ms("--ll-stall");
    cudaStream_t s = test_stream();
    ll_graph_t g;
    ll_graph_make(&g, comm, me, R, s, true);
    epx_status_t async = EPX_ERR_INTERNAL;
    for (int it = 0; it < 3; it++) {
        CU(cudaGraphLaunch(g.exec, s));
        CU(cudaStreamSynchronize(s));
    }
    /* Idle longer than the timeout between replays is no stall. */
    usleep((useconds_t)(1500.0 * timeout_ms));
    CU(cudaGraphLaunch(g.exec, s));
    CU(cudaStreamSynchronize(s));
    ASSERT_OK(epx_comm_get_async_error(comm, &async));
    ASSERT_EQ(async, EPX_SUCCESS);
    ASSERT_OK(epx_barrier(comm, s)); /* every rank is here: the next replay starts together */
    test_sync();
    if (me == R - 1) usleep((useconds_t)(8000.0 * timeout_ms));
    double t0 = test_now_ms();
    CU(cudaGraphLaunch(g.exec, s));
    CU(cudaStreamSynchronize(s));
    /* Without the watch the others would wait for the sleeper: 8 timeouts. */
    double waited = test_now_ms() - t0, bound = 4 * timeout_ms + 3000;
    if (waited > bound) TEST_FAIL_("the stalled replay held the stream %.0f ms (more than %.0f)", waited, bound);
    /* The verdict may come a watchdog period after the stream ran (a device-side error on a
     * rank that NCCL did not hold). */
    for (double t1 = test_now_ms(); test_now_ms() - t1 < 2 * timeout_ms; usleep(10000)) {
        ASSERT_OK(epx_comm_get_async_error(comm, &async));
        if (async != EPX_SUCCESS) break;
    }
    if (async == EPX_SUCCESS) TEST_FAIL_("the stalled replay left the communicator healthy");
    printf("rank %d: stalled replay ended after %.0f ms, communicator reports %s\n", me, waited, epx_status_name(async));
    CU(cudaGraphExecDestroy(g.exec));
    CU(cudaGraphDestroy(g.graph));
    g.exec = NULL, g.graph = NULL;
    epx_moe_handle_destroy(g.h); /* the communicator is broken: statuses are not the point */
    epx_moe_destroy(g.moe);
    ll_graph_free(&g);
    return 1;
}

/* Across hosts: epx_comm_destroy while a graph that captured low-latency calls still lives
 * (against epx.h's advice: NCCL's finalize, then its abort, wait for such graphs). It must
 * return within its bound: the clean finalize waits at most min(EPX_TIMEOUT_MS, 10 s), then
 * the abort thread is waited for as long and let go, with a warning. The graph is destroyed
 * afterwards, which lets that thread end. Consumes the communicator. */
static int destroy_before_graph(epx_comm_t comm, int me, int R)
{
    double timeout_ms = env_timeout_ms("--ll-destroy-first");
    cudaStream_t s = test_stream();
    ll_graph_t g;
    ll_graph_make(&g, comm, me, R, s, false);
    CU(cudaGraphLaunch(g.exec, s));
    CU(cudaStreamSynchronize(s));
    ASSERT_OK(epx_moe_handle_destroy(g.h));
    ASSERT_OK(epx_moe_destroy(g.moe));
    ASSERT_OK(epx_barrier(comm, s));
    test_sync();
    double t0 = test_now_ms();
    ASSERT_OK(epx_comm_destroy(comm));
    double waited = test_now_ms() - t0, bound = 2 * timeout_ms + 3000;
    if (waited > bound) TEST_FAIL_("epx_comm_destroy with a live graph took %.0f ms (more than %.0f)", waited, bound);
    printf("rank %d: epx_comm_destroy with a live graph returned after %.0f ms\n", me, waited);
    ll_graph_free(&g);
    return 1;
}

#endif

int main(int argc, char **argv)
{
    test_init_cuda_only(argc, argv);
#ifdef EPX_HAVE_CUDA
    bool ll_only = false, ll_stall = false, ll_destroy_first = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--copy-engines")) copy_engines = true, num_sms = EPX_MOE_COPY_ENGINES;
        ll_only = ll_only || !strcmp(argv[i], "--ll-only");
        ll_stall = ll_stall || !strcmp(argv[i], "--ll-stall");
        ll_destroy_first = ll_destroy_first || !strcmp(argv[i], "--ll-destroy-first");
    }
    const char *env_sms = getenv("EPX_CUDA_SMS");
    if (env_sms && atoi(env_sms) <= 0) copy_engines = true;
    int me, R, passed = 0;
    epx_comm_t comm = test_comm_from_env(&me, &R);
    if (ll_destroy_first) {
        passed += destroy_before_graph(comm, me, R);
        test_done(passed);
        return 0;
    }
    if (ll_only || ll_stall) { /* across hosts only the low-latency calls can be captured (epx_cuda.h) */
        if (ll_only) {
            passed += replay_ll(comm, me, R, 200, false);
            passed += replay_ll(comm, me, R, 100, true);
        }
        if (ll_stall)
            passed += stall_ll(comm, me, R), epx_comm_abort(comm);
        else
            ASSERT_OK(epx_comm_destroy(comm));
        test_done(passed);
        return 0;
    }
    if (test_on_pool() && copy_engines) {
        fprintf(stderr, "--pool with copy engines: peers write recv_x there, which must be memory CUDA IPC can "
                        "share\n");
        return 2;
    }
    passed += replay(comm, me, R, 100, 200, false);   /* eager slots */
    passed += replay(comm, me, R, 100000, 200, true); /* direct kernel; the peers' buffers mapped in the graph */
    if (test_on_pool()) passed += pool_a2a_capture_refused(comm, me, R);
    passed += replay_moe(comm, me, R, 200);
    if (test_on_pool()) passed += replay_pool_growth(comm, me, R, 50);
    passed += replay_ll(comm, me, R, 1000, false);
    passed += replay_ll(comm, me, R, 500, true); /* two batches in flight, send/receive halves */
    if (test_on_pool()) { /* its buffers cannot be staged */
        passed += alltoallv_device_refused(comm, R);
        test_finish(comm, passed);
        return 0;
    }
    passed += alltoallv_device(comm, me, R, 100);
    alltoallv_device_mismatch(comm, me, R); /* breaks rank 0's communicator: last */
    epx_comm_destroy(comm); /* rank 0's is broken: its status is not the point here */
    test_done(passed + 1);
#endif
    return 0;
}
