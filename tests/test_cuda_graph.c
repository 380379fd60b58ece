/*
 * CUDA graphs: an alltoall captured once per path (eager slots, direct kernel) and replayed
 * 200 times, each replay with new data and a poisoned output, every element checked. The
 * host agrees on the arguments at capture time; replays need no host work (epx keeps the
 * operation number on the device). Then a MoE dispatch (worst-case capacity, count on the
 * device: no host synchronisation) + an identity expert + combine, captured once and
 * replayed with new tokens AND new routing every time: rows, sources, count and combined
 * output all checked. Run with 2+ ranks and --cuda.
 */
#include <string.h>

#include "testlib.h"

#ifdef EPX_HAVE_CUDA
#include <cuda_runtime_api.h>
#define CU(x)                                                                                 \
    do {                                                                                      \
        cudaError_t e_ = (x);                                                                 \
        if (e_ != cudaSuccess) TEST_FAIL_("%s: %s", #x, cudaGetErrorString(e_));              \
    } while (0)

static int replay(epx_comm_t comm, int me, int R, size_t count, int rounds)
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

static int replay_moe(epx_comm_t comm, int me, int R, int rounds)
{
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
    /* Inputs of replay `it` onto the device. */
#define G_PUT(it)                                                                                  \
    do {                                                                                           \
        for (int t = 0; t < GT; t++) {                                                             \
            for (int h = 0; h < GH; h++) hx[t * GH + h] = g_x(it, me, t, h);                       \
            for (int k = 0; k < GK; k++) hidx[t * GK + k] = g_expert(it, me, t, k, E);             \
        }                                                                                          \
        test_buf_put(x, hx, xb);                                                                   \
        test_buf_put(idx, hidx, sizeof(int64_t) * GT * GK);                                        \
    } while (0)
    /* One ordinary round first: maps the peers' buffers outside the capture. */
    G_PUT(-1);
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
        G_PUT(it);
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
        int64_t row = 0;
        for (int p = 0; p < R; p++)
            for (int t = 0; t < GT; t++) {
                if (!((g_mask(it, p, t, E, R) >> me) & 1u)) continue;
                if (row < n && (hsr[row] != p || hst[row] != t))
                    TEST_FAIL_("replay %d: row %lld from (%d, %d), expected (%d, %d)", it, (long long)row, hsr[row],
                               hst[row], p, t);
                for (int hh = 0; row < n && hh < GH; hh++)
                    if (hrecv[row * GH + hh] != g_x(it, p, t, hh))
                        TEST_FAIL_("replay %d: recv_x[%lld][%d] wrong", it, (long long)row, hh);
                row++;
            }
        if (n != row) TEST_FAIL_("replay %d: num_recv_tokens_device = %lld, expected %lld", it, (long long)n, (long long)row);
        /* Combine of the identity: each token's row summed once per rank it went to. */
        for (int t = 0; t < GT; t++) {
            int copies = __builtin_popcount(g_mask(it, me, t, E, R));
            for (int hh = 0; hh < GH; hh++) {
                float v = epx_bf16_to_float(g_x(it, me, t, hh)), acc = 0.0f;
                for (int i = 0; i < copies; i++) acc += v;
                if (hout[t * GH + hh] != epx_float_to_bf16(acc))
                    TEST_FAIL_("replay %d: combine out[%d][%d] = 0x%x, expected 0x%x", it, t, hh, hout[t * GH + hh],
                               epx_float_to_bf16(acc));
            }
        }
    }
    CU(cudaGraphExecDestroy(exec));
    CU(cudaGraphDestroy(graph));
    ASSERT_OK(epx_moe_handle_destroy(h));
    /* The context still works outside the graph afterwards. */
    ASSERT_OK(epx_moe_dispatch(moe, &in, &dout, &h, s));
    ASSERT_OK(epx_moe_handle_destroy(h));
    test_sync();
    ASSERT_OK(epx_moe_destroy(moe));
#undef G_PUT
    test_buf_free(x), test_buf_free(recv), test_buf_free(out), test_buf_free(idx), test_buf_free(count);
    test_buf_free(src_rank), test_buf_free(src_token);
    free(hx), free(hrecv), free(hout), free(hidx), free(hsr), free(hst);
    return rounds;
}
#endif

int main(int argc, char **argv)
{
    test_init_cuda_only(argc, argv);
#ifdef EPX_HAVE_CUDA
    int me, R, passed = 0;
    epx_comm_t comm = test_comm_from_env(&me, &R);
    passed += replay(comm, me, R, 100, 200);    /* eager slots */
    passed += replay(comm, me, R, 100000, 200); /* direct kernel */
    passed += replay_moe(comm, me, R, 200);
    test_finish(comm, passed);
#endif
    return 0;
}
