/*
 * Soak: a long randomized run of exchanges, every output checked against the sequential
 * reference (moe_ref.c). Each round draws, from the shared seed, one of
 *
 *   high-throughput  dispatch, cached dispatch (new data), combine (with the dispatched
 *                    weights): 3 exchanges
 *   low-latency      dispatch, combine: 2 exchanges (whole calls or send/receive halves)
 *   alltoallv        random counts (zeros too) and gaps between segments: 1 exchange
 *   alltoall         a random count per peer: 1 exchange
 *
 * with a fresh random shape for MoE rounds: hidden 1..320 (odd sizes, partial FP8 blocks,
 * now and then 2048..7168), max_tokens 1..32 with T = 0..max on each rank (0 on some),
 * E = R*L with L = 1..12, K = 1..16, token dtype bf16/f16/f32/fp8 (high-throughput) or
 * bf16/f16/f32 and FP8 quantisation with F32 or UE8M0 scales (low-latency), combine dtype,
 * int32/int64 indices, expert alignment, uniform or Zipf-skewed routing with -1 entries and
 * duplicates. Outputs are poisoned before each call; rows past what was received must stay
 * poisoned. Combine and low-latency results are compared bit for bit.
 *
 *   --iters N    exchanges to run (default 200); the long soak is --iters 10000
 *   --seed S     seed (default 1); a failure prints the round and its seed
 *   --cuda       on the CUDA backend (every library buffer in device memory; exit 77
 *                without a GPU)
 *   --mpi        under mpirun, over epx_comm_init_mpi (EPX_LOCAL_SIZE simulates hosts)
 */
#include <math.h>
#include <string.h>
#include <time.h>

#include "moe_ref.h"
#include "testlib.h"

#define MAXR 64
#define POISON 0xA5

static epx_comm_t comm;
static int me, R;
static uint64_t round_seed;
static int round_no;

#define CHECK(cond, ...)                                                                      \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "round %d (seed 0x%016llx): ", round_no, (unsigned long long)round_seed); \
            TEST_FAIL_(__VA_ARGS__);                                                          \
        }                                                                                     \
    } while (0)

/* ---- Shared random world: every rank derives every rank's inputs -------------------------- */

static uint64_t rnd(uint64_t *s, uint64_t n) { return test_rand(s) % n; }

/* A finite value of moderate size, as `dtype` holds it (rounded), from random bits r. */
static float gen_value(int dtype, uint64_t r)
{
    double m = (double)(r >> 11) * 0x1p-53 * 2.0 - 1.0;
    int e = (int)((r >> 3) % 9) - 4;
    float v = (float)ldexp(m, e);
    if ((r & 7) == 0) v = 0.0f;
    uint8_t tmp[4];
    moe_ref_store(dtype, tmp, 0, v);
    return moe_ref_load(dtype, tmp, 0);
}

/* Element `i` of the stream `tag` of (a, b): random access, identical on every rank. */
static uint64_t elem(uint64_t tag, int a, int b, int64_t i)
{
    uint64_t s = test_mix(round_seed, tag, (uint64_t)(uint32_t)a << 32 | (uint32_t)b, (uint64_t)i);
    return test_rand(&s);
}

typedef struct {
    int mode, ll_fp8, sfmt;
    int H, M, E, L, K, maxk, dtype, cdtype, idtype, align, es, ces, is;
    size_t sc; /* scale columns */
    int T[MAXR];
    int64_t *idx[MAXR];
    float *w[MAXR];
    moe_ref_routing_t rt;
} world_t;

static void world_make(world_t *W, bool ll)
{
    uint64_t s = test_mix(round_seed, 1, 0, 0);
    memset(W, 0, sizeof *W);
    W->mode = ll ? EPX_MOE_LOW_LATENCY : EPX_MOE_HIGH_THROUGHPUT;
    W->H = rnd(&s, 20) == 0 ? 2048 + (int)rnd(&s, 5121) : 1 + (int)rnd(&s, 320);
    W->M = 1 + (int)rnd(&s, 32);
    W->L = 1 + (int)rnd(&s, 12);
    W->E = R * W->L;
    W->K = 1 + (int)rnd(&s, EPX_MOE_MAX_TOPK);
    W->maxk = W->K + (int)rnd(&s, EPX_MOE_MAX_TOPK - W->K + 1);
    static const int tok[] = {EPX_BF16, EPX_F16, EPX_F32, EPX_FP8_E4M3};
    static const int comb[] = {EPX_UNSET, EPX_BF16, EPX_F16, EPX_F32};
    static const int aligns[] = {1, 1, 2, 3, 16, 128};
    W->dtype = tok[rnd(&s, ll ? 3 : 4)];
    W->ll_fp8 = ll && rnd(&s, 2) == 0;
    if (W->ll_fp8) W->dtype = EPX_BF16;
    W->sfmt = rnd(&s, 2) ? EPX_SCALE_UE8M0 : EPX_SCALE_F32;
    W->cdtype = comb[rnd(&s, 4)];
    int cd = W->cdtype == EPX_UNSET ? (W->dtype == EPX_FP8_E4M3 ? EPX_BF16 : W->dtype) : W->cdtype;
    W->idtype = rnd(&s, 2) ? EPX_I32 : EPX_I64;
    W->align = ll ? 1 : aligns[rnd(&s, 6)];
    W->es = moe_ref_elem_size(W->dtype);
    W->ces = moe_ref_elem_size(cd);
    W->is = W->idtype == EPX_I32 ? 4 : 8;
    W->sc = (size_t)(W->H + 127) / 128;
    W->cdtype = cd;
    int skew = (int)rnd(&s, 3);     /* 0 uniform, 1 Zipf-like, 2 one hot expert */
    int neg = (int)rnd(&s, 4) * 10; /* percent of -1 entries */
    int hot = (int)rnd(&s, (uint64_t)W->E);
    for (int p = 0; p < R; p++) {
        int zero = rnd(&s, 6) == 0;
        W->T[p] = zero ? 0 : (int)rnd(&s, (uint64_t)W->M + 1);
        size_t n = (size_t)W->T[p] * (size_t)W->K;
        W->idx[p] = malloc(sizeof(int64_t) * (n + 1));
        W->w[p] = malloc(sizeof(float) * (n + 1));
        for (size_t i = 0; i < n; i++) {
            int64_t e;
            if ((int)rnd(&s, 100) < neg)
                e = -1;
            else if (skew == 1) {
                double u = (double)(test_rand(&s) >> 11) * 0x1p-53;
                e = (int64_t)(u * u * u * W->E);
            } else if (skew == 2 && rnd(&s, 2))
                e = hot;
            else
                e = (int64_t)rnd(&s, (uint64_t)W->E);
            W->idx[p][i] = e;
            W->w[p][i] = (float)((double)(test_rand(&s) >> 40) * 0x1p-24);
        }
    }
    W->rt.R = R;
    W->rt.E = W->E;
    W->rt.K = W->K;
    W->rt.T = W->T;
    W->rt.idx = (const int64_t *const *)W->idx;
}

static void world_free(world_t *W)
{
    for (int p = 0; p < R; p++) free(W->idx[p]), free(W->w[p]);
}

/* Token rows of rank p: generation `gen` (0 dispatch, 1 cached dispatch). */
static void x_row(const world_t *W, int p, int t, int gen, void *dst)
{
    for (int h = 0; h < W->H; h++) {
        uint64_t r = elem(10 + (uint64_t)gen, p, t, h);
        if (W->dtype == EPX_FP8_E4M3) {
            uint8_t b = (uint8_t)(r >> 24);
            if ((b & 0x7F) == 0x7F) b ^= 1; /* not NaN */
            ((uint8_t *)dst)[h] = b;
        } else
            moe_ref_store(W->dtype, dst, h, gen_value(W->dtype, r));
    }
}
static void scales_row(const world_t *W, int p, int t, int gen, float *dst)
{
    for (size_t b = 0; b < W->sc; b++) dst[b] = gen_value(EPX_F32, elem(20 + (uint64_t)gen, p, t, (int64_t)b));
}
/* Combine input of rank r for token (p, t) (high-throughput), or expert e's output (low latency). */
static void y_row_cb(void *ctx, int r, int p, int t, int H, float *row)
{
    const world_t *W = ctx;
    for (int h = 0; h < H; h++) row[h] = gen_value(W->cdtype, elem(30 + (uint64_t)r, p, t, h));
}
/* The weights row rank r holds for token (p, t) after dispatch: w where the expert is on r. */
static void yw_row_cb(void *ctx, int r, int p, int t, int K, float *row)
{
    const world_t *W = ctx;
    for (int k = 0; k < K; k++) {
        int64_t e = W->idx[p][(int64_t)t * K + k];
        row[k] = e >= 0 && e / W->L == r ? W->w[p][(int64_t)t * K + k] : 0.0f;
    }
}

/* ---- Buffers on the backend under test ------------------------------------------------------ */

typedef struct {
    void *dev;
    size_t bytes;
    uint8_t *host;
} buf_t;

static buf_t buf_out(size_t bytes)
{
    buf_t b = {test_buf_alloc(bytes + 64), bytes, malloc(bytes + 64)};
    test_buf_poison(b.dev, POISON, bytes + 64);
    return b;
}
static buf_t buf_in(const void *host, size_t bytes)
{
    buf_t b = {test_buf_alloc(bytes + 64), bytes, malloc(bytes + 64)};
    memcpy(b.host, host, bytes);
    test_buf_put(b.dev, host, bytes);
    return b;
}
static void buf_fetch(buf_t *b) { test_buf_get(b->host, b->dev, b->bytes + 64); }
static void buf_free(buf_t *b)
{
    test_buf_free(b->dev);
    free(b->host);
}
/* Bytes [from, bytes + 64) still poisoned. */
static void expect_poison(const buf_t *b, size_t from, const char *what)
{
    for (size_t i = from; i < b->bytes + 64; i++)
        CHECK(b->host[i] == POISON, "%s: byte %zu written (only %zu bytes were due)", what, i, from);
}

static epx_moe_t moe_create(const world_t *W)
{
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = W->H;
    cfg.max_tokens_per_rank = W->M;
    cfg.num_experts = W->E;
    cfg.max_topk = W->maxk;
    cfg.dtype = W->dtype;
    cfg.combine_dtype = W->cdtype;
    cfg.index_dtype = W->idtype;
    cfg.mode = W->mode;
    cfg.expert_alignment = W->align;
    cfg.ll_fp8 = W->ll_fp8;
    cfg.scale_format = W->sfmt;
    epx_moe_t moe;
    epx_status_t st = epx_moe_create(comm, &cfg, &moe);
    CHECK(st == EPX_SUCCESS, "moe_create: %s (%s)", epx_status_name(st), epx_get_last_error());
    return moe;
}

/* This rank's routing in the configured index dtype. */
static buf_t idx_in(const world_t *W)
{
    size_t n = (size_t)W->T[me] * (size_t)W->K;
    uint8_t *h = malloc(n * 8 + 8);
    for (size_t i = 0; i < n; i++) {
        if (W->is == 4) ((int32_t *)(void *)h)[i] = (int32_t)W->idx[me][i];
        else ((int64_t *)(void *)h)[i] = W->idx[me][i];
    }
    buf_t b = buf_in(h, n * (size_t)W->is);
    free(h);
    return b;
}

static buf_t x_in(const world_t *W, int gen, buf_t *scales)
{
    int T = W->T[me];
    size_t rb = (size_t)W->H * (size_t)W->es;
    uint8_t *h = malloc((size_t)T * rb + 1);
    float *sh = malloc((size_t)T * W->sc * 4 + 4);
    for (int t = 0; t < T; t++) {
        x_row(W, me, t, gen, h + (size_t)t * rb);
        scales_row(W, me, t, gen, sh + (size_t)t * W->sc);
    }
    buf_t b = buf_in(h, (size_t)T * rb);
    if (scales) *scales = buf_in(sh, (size_t)T * W->sc * 4);
    free(h), free(sh);
    return b;
}

static int64_t idx_at(const world_t *W, const uint8_t *b, int64_t i)
{
    return W->is == 4 ? ((const int32_t *)(const void *)b)[i] : ((const int64_t *)(const void *)b)[i];
}

/* ---- High-throughput: dispatch, cached dispatch, combine -------------------------------------- */

static void check_rows(const world_t *W, const moe_ref_recv_t *ref, buf_t *rx, buf_t *rxs, int gen, const char *what)
{
    size_t rb = (size_t)W->H * (size_t)W->es;
    uint8_t *want = malloc(rb + 1);
    float *ws = malloc(W->sc * 4 + 4);
    buf_fetch(rx);
    if (rxs) buf_fetch(rxs);
    for (int64_t r = 0; r < ref->n; r++) {
        x_row(W, ref->src_rank[r], ref->src_token[r], gen, want);
        CHECK(!memcmp(rx->host + (size_t)r * rb, want, rb), "%s: row %lld (token %d of rank %d) differs", what,
              (long long)r, ref->src_token[r], ref->src_rank[r]);
        if (rxs) {
            scales_row(W, ref->src_rank[r], ref->src_token[r], gen, ws);
            CHECK(!memcmp(rxs->host + (size_t)r * W->sc * 4, ws, W->sc * 4), "%s: scales of row %lld differ", what,
                  (long long)r);
        }
    }
    expect_poison(rx, (size_t)ref->n * rb, what);
    if (rxs) expect_poison(rxs, (size_t)ref->n * W->sc * 4, what);
    free(want), free(ws);
}

static int run_ht(int *exchanges)
{
    world_t W;
    world_make(&W, false);
    epx_moe_t moe = moe_create(&W);
    int T = W.T[me], K = W.K;
    bool fp8 = W.dtype == EPX_FP8_E4M3;
    moe_ref_recv_t ref;
    moe_ref_dispatch(&W.rt, (const float *const *)W.w, me, W.align, &ref);
    int64_t cap = ref.n + (int64_t)(elem(2, me, 0, 0) % 3);
    size_t rb = (size_t)W.H * (size_t)W.es, ucap = (size_t)cap;

    buf_t xs, x = x_in(&W, 0, &xs), idx = idx_in(&W), w = buf_in(W.w[me], (size_t)T * (size_t)K * 4);
    buf_t rx = buf_out(ucap * rb), rxs = buf_out(ucap * W.sc * 4), ri = buf_out(ucap * (size_t)K * (size_t)W.is),
          rw = buf_out(ucap * (size_t)K * 4), rsr = buf_out(ucap * 4), rst = buf_out(ucap * 4),
          rpe = buf_out((size_t)W.L * 4);
    epx_moe_dispatch_in_t in = {x.dev, fp8 ? xs.dev : NULL, idx.dev, w.dev, T, K};
    epx_moe_dispatch_out_t out = {rx.dev, fp8 ? rxs.dev : NULL, ri.dev, rw.dev, rsr.dev, rst.dev, rpe.dev, cap, -1, NULL};
    epx_moe_handle_t h;
    epx_status_t st = epx_moe_dispatch(moe, &in, &out, &h, test_stream());
    CHECK(st == EPX_SUCCESS, "dispatch: %s (%s)", epx_status_name(st), epx_get_last_error());
    CHECK(out.num_recv_tokens == ref.n, "dispatch: %lld rows, reference %lld", (long long)out.num_recv_tokens,
          (long long)ref.n);
    check_rows(&W, &ref, &rx, fp8 ? &rxs : NULL, 0, "dispatch recv_x");
    buf_fetch(&ri), buf_fetch(&rw), buf_fetch(&rsr), buf_fetch(&rst), buf_fetch(&rpe);
    for (int64_t r = 0; r < ref.n; r++) {
        CHECK(((int32_t *)(void *)rsr.host)[r] == ref.src_rank[r], "recv_src_rank[%lld]", (long long)r);
        CHECK(((int32_t *)(void *)rst.host)[r] == ref.src_token[r], "recv_src_token[%lld]", (long long)r);
        for (int k = 0; k < K; k++) {
            CHECK(idx_at(&W, ri.host, r * K + k) == ref.topk_idx[r * K + k], "recv_topk_idx[%lld, %d]", (long long)r, k);
            CHECK(!memcmp(rw.host + 4 * (size_t)(r * K + k), &ref.topk_weights[r * K + k], 4),
                  "recv_topk_weights[%lld, %d]", (long long)r, k);
        }
    }
    for (int l = 0; l < W.L; l++)
        CHECK(((int32_t *)(void *)rpe.host)[l] == ref.per_expert[l], "num_recv_tokens_per_expert[%d] = %d, reference %d",
              l, ((int32_t *)(void *)rpe.host)[l], ref.per_expert[l]);
    expect_poison(&rsr, (size_t)ref.n * 4, "recv_src_rank");

    /* Cached dispatch: new data along the same routing. */
    buf_t xs2, x2 = x_in(&W, 1, &xs2);
    test_buf_poison(rx.dev, POISON, rx.bytes + 64);
    test_buf_poison(rxs.dev, POISON, rxs.bytes + 64);
    epx_moe_dispatch_in_t in2 = {x2.dev, fp8 ? xs2.dev : NULL, NULL, NULL, T, K};
    st = epx_moe_dispatch_cached(moe, h, &in2, &out, test_stream());
    CHECK(st == EPX_SUCCESS, "cached dispatch: %s (%s)", epx_status_name(st), epx_get_last_error());
    check_rows(&W, &ref, &rx, fp8 ? &rxs : NULL, 1, "cached dispatch recv_x");

    /* Combine: y rows generated per (this rank, source), the dispatched weights alongside. */
    size_t crb = (size_t)W.H * (size_t)W.ces;
    uint8_t *yh = malloc((size_t)ref.n * crb + 1);
    float *row = malloc(sizeof(float) * ((size_t)W.H + (size_t)K) + 4);
    for (int64_t r = 0; r < ref.n; r++) {
        y_row_cb(&W, me, ref.src_rank[r], ref.src_token[r], W.H, row);
        for (int hh = 0; hh < W.H; hh++) moe_ref_store(W.cdtype, yh + (size_t)r * crb, hh, row[hh]);
    }
    buf_t y = buf_in(yh, (size_t)ref.n * crb), o = buf_out((size_t)T * crb), ow = buf_out((size_t)T * (size_t)K * 4);
    epx_moe_combine_in_t cin = {y.dev, rw.dev};
    epx_moe_combine_out_t cout = {o.dev, ow.dev};
    st = epx_moe_combine(moe, h, &cin, &cout, test_stream());
    CHECK(st == EPX_SUCCESS, "combine: %s (%s)", epx_status_name(st), epx_get_last_error());
    buf_fetch(&o), buf_fetch(&ow);
    uint8_t want[4];
    for (int t = 0; t < T; t++) {
        moe_ref_combine_row(&W.rt, me, t, W.H, y_row_cb, &W, row, NULL, NULL);
        for (int hh = 0; hh < W.H; hh++) {
            moe_ref_store(W.cdtype, want, 0, row[hh]);
            CHECK(!memcmp(o.host + (size_t)t * crb + (size_t)hh * (size_t)W.ces, want, (size_t)W.ces),
                  "combine out[%d][%d] = %g, reference %g", t, hh,
                  (double)moe_ref_load(W.cdtype, o.host, (int64_t)t * W.H + hh), (double)row[hh]);
        }
        moe_ref_combine_row(&W.rt, me, t, K, yw_row_cb, &W, row, NULL, NULL);
        CHECK(!memcmp(ow.host + (size_t)t * (size_t)K * 4, row, (size_t)K * 4), "combine out_topk_weights of token %d", t);
    }
    expect_poison(&o, (size_t)T * crb, "combine out");
    free(yh), free(row);
    ASSERT_OK(epx_moe_handle_destroy(h));
    ASSERT_OK(epx_moe_destroy(moe));
    buf_t *all[] = {&x, &xs, &idx, &w, &rx, &rxs, &ri, &rw, &rsr, &rst, &rpe, &x2, &xs2, &y, &o, &ow};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) buf_free(all[i]);
    moe_ref_recv_free(&ref);
    world_free(&W);
    *exchanges += 3;
    return 1;
}

/* ---- Low-latency: dispatch, combine ------------------------------------------------------------ */

static int run_ll(int *exchanges)
{
    world_t W;
    world_make(&W, true);
    epx_moe_t moe = moe_create(&W);
    int T = W.T[me], K = W.K, H = W.H, L = W.L;
    size_t RM = (size_t)R * (size_t)W.M, slots = (size_t)L * RM;
    size_t orow = W.ll_fp8 ? (size_t)H : (size_t)H * (size_t)W.es, sb = W.sfmt == EPX_SCALE_UE8M0 ? 1 : 4;
    buf_t x = x_in(&W, 0, NULL), idx = idx_in(&W);
    buf_t rx = buf_out(slots * orow), rxs = buf_out(slots * W.sc * sb), rc = buf_out((size_t)L * 4),
          rsr = buf_out(slots * 4), rst = buf_out(slots * 4);
    epx_moe_ll_dispatch_in_t in = {x.dev, idx.dev, T, K};
    epx_moe_ll_dispatch_out_t out = {rx.dev, W.ll_fp8 ? rxs.dev : NULL, rc.dev, rsr.dev, rst.dev};
    epx_moe_handle_t h;
    bool split = (round_seed >> 17) & 1; /* through the send/receive halves */
    epx_status_t st = split ? epx_moe_ll_dispatch_send(moe, &in, &out, &h, test_stream())
                            : epx_moe_ll_dispatch(moe, &in, &out, &h, test_stream());
    if (split && st == EPX_SUCCESS) st = epx_moe_ll_dispatch_recv(moe, h, test_stream());
    CHECK(st == EPX_SUCCESS, "ll dispatch: %s (%s)", epx_status_name(st), epx_get_last_error());
    int32_t *cnt = malloc(sizeof(int32_t) * (size_t)L), *sr = malloc(sizeof(int32_t) * slots + 4),
            *stk = malloc(sizeof(int32_t) * slots + 4);
    moe_ref_ll_slots(&W.rt, me, W.M, cnt, sr, stk);
    buf_fetch(&rx), buf_fetch(&rxs), buf_fetch(&rc), buf_fetch(&rsr), buf_fetch(&rst);
    CHECK(!memcmp(rc.host, cnt, (size_t)L * 4), "ll recv_count differs");
    CHECK(!memcmp(rsr.host, sr, slots * 4), "ll recv_src_rank differs");
    CHECK(!memcmp(rst.host, stk, slots * 4), "ll recv_src_token differs");
    uint8_t *xr = malloc((size_t)H * 4 + 4), *q = malloc((size_t)H + 4), *qs = malloc(W.sc * 4 + 4);
    for (int l = 0; l < L; l++)
        for (int32_t i = 0; i < cnt[l]; i++) {
            size_t s = (size_t)l * RM + (size_t)i;
            x_row(&W, sr[s], stk[s], 0, xr);
            if (!W.ll_fp8) {
                CHECK(!memcmp(rx.host + s * orow, xr, orow), "ll recv_x of expert %d slot %d", l, i);
                continue;
            }
            moe_ref_quant_row((const uint16_t *)(const void *)xr, H, W.sfmt, q, qs);
            CHECK(!memcmp(rx.host + s * orow, q, (size_t)H), "ll fp8 recv_x of expert %d slot %d", l, i);
            CHECK(!memcmp(rxs.host + s * W.sc * sb, qs, W.sc * sb), "ll fp8 scales of expert %d slot %d", l, i);
        }

    /* Combine: y of every filled slot = expert e's output for that token. */
    size_t crb = (size_t)H * (size_t)W.ces;
    uint8_t *yh = malloc(slots * crb + 1);
    memset(yh, 0, slots * crb + 1);
    float *row = malloc(sizeof(float) * (size_t)H + 4);
    for (int l = 0; l < L; l++)
        for (int32_t i = 0; i < cnt[l]; i++) {
            size_t s = (size_t)l * RM + (size_t)i;
            y_row_cb(&W, me * L + l, sr[s], stk[s], H, row);
            for (int hh = 0; hh < H; hh++) moe_ref_store(W.cdtype, yh + s * crb, hh, row[hh]);
        }
    buf_t y = buf_in(yh, slots * crb), w = buf_in(W.w[me], (size_t)T * (size_t)K * 4), o = buf_out((size_t)T * crb);
    epx_moe_ll_combine_in_t cin = {y.dev, w.dev};
    st = split ? epx_moe_ll_combine_send(moe, h, &cin, o.dev, test_stream())
               : epx_moe_ll_combine(moe, h, &cin, o.dev, test_stream());
    if (split && st == EPX_SUCCESS) st = epx_moe_ll_combine_recv(moe, h, test_stream());
    CHECK(st == EPX_SUCCESS, "ll combine: %s (%s)", epx_status_name(st), epx_get_last_error());
    buf_fetch(&o);
    uint8_t want[4];
    for (int t = 0; t < T; t++) {
        moe_ref_ll_combine_row(&W.rt, me, t, H, W.w[me], y_row_cb, &W, row, NULL, NULL);
        for (int hh = 0; hh < H; hh++) {
            moe_ref_store(W.cdtype, want, 0, row[hh]);
            CHECK(!memcmp(o.host + (size_t)t * crb + (size_t)hh * (size_t)W.ces, want, (size_t)W.ces),
                  "ll combine out[%d][%d] = %g, reference %g", t, hh,
                  (double)moe_ref_load(W.cdtype, o.host, (int64_t)t * H + hh), (double)row[hh]);
        }
    }
    expect_poison(&o, (size_t)T * crb, "ll combine out");
    free(cnt), free(sr), free(stk), free(xr), free(q), free(qs), free(yh), free(row);
    ASSERT_OK(epx_moe_handle_destroy(h));
    ASSERT_OK(epx_moe_destroy(moe));
    buf_t *all[] = {&x, &idx, &rx, &rxs, &rc, &rsr, &rst, &y, &w, &o};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) buf_free(all[i]);
    world_free(&W);
    *exchanges += 2;
    return 1;
}

/* ---- alltoall / alltoallv ----------------------------------------------------------------------- */

static const int a2a_dtypes[] = {EPX_U8, EPX_I32, EPX_I64, EPX_F16, EPX_BF16, EPX_F32, EPX_FP8_E4M3};

/* Byte j of the segment rank p sends to rank q. */
static uint8_t seg_byte(int p, int q, int64_t j) { return (uint8_t)(elem(40, p, q, j) >> 32); }

static int run_a2a(bool vector, int *exchanges)
{
    uint64_t s = test_mix(round_seed, 3, 0, 0);
    int dt = a2a_dtypes[rnd(&s, 7)];
    size_t es = epx_dtype_size((epx_dtype_t)dt);
    int big = rnd(&s, 10) == 0;
    /* counts[p][q]: elements p sends q (the same table on every rank). */
    int64_t *cnt = malloc(sizeof(int64_t) * (size_t)R * (size_t)R);
    int64_t same = (int64_t)rnd(&s, big ? 40000 : 300);
    for (int i = 0; i < R * R; i++) {
        bool zero = rnd(&s, 5) == 0;
        cnt[i] = !vector ? same : zero ? 0 : (int64_t)rnd(&s, big ? 40000 : 300);
    }
    int64_t *sc = malloc(sizeof(int64_t) * (size_t)R * 4), *sd = sc + R, *rcv = sc + 2 * R, *rd = sc + 3 * R;
    int64_t soff = 0, roff = 0;
    for (int q = 0; q < R; q++) {
        int64_t gap = vector ? (int64_t)(elem(41, me, q, 0) % 5) : 0;
        sc[q] = cnt[me * R + q];
        sd[q] = soff + gap;
        soff = sd[q] + sc[q];
        rcv[q] = cnt[q * R + me];
        rd[q] = roff + gap;
        roff = rd[q] + rcv[q];
    }
    if (!vector) soff = roff = same * R;
    /* Moved as bytes: any bits will do, NaN patterns of the float dtypes included. */
    uint8_t *sh = malloc((size_t)soff * es + 1);
    memset(sh, 0x5A, (size_t)soff * es + 1);
    for (int q = 0; q < R; q++)
        for (int64_t j = 0; j < sc[q] * (int64_t)es; j++) sh[(size_t)sd[q] * es + (size_t)j] = seg_byte(me, q, j);
    buf_t sb = buf_in(sh, (size_t)soff * es), rb = buf_out((size_t)roff * es);
    epx_status_t st = vector ? epx_alltoallv(comm, sb.dev, sc, sd, rb.dev, rcv, rd, (epx_dtype_t)dt, test_stream())
                             : epx_alltoall(comm, sb.dev, rb.dev, (size_t)same, (epx_dtype_t)dt, test_stream());
    CHECK(st == EPX_SUCCESS, "%s: %s (%s)", vector ? "alltoallv" : "alltoall", epx_status_name(st),
          epx_get_last_error());
    buf_fetch(&rb);
    size_t at = 0;
    for (int q = 0; q < R; q++) {
        size_t from = vector ? (size_t)rd[q] * es : (size_t)q * (size_t)same * es;
        for (; at < from; at++) CHECK(rb.host[at] == POISON, "gap byte %zu written", at);
        for (int64_t j = 0; j < rcv[q] * (int64_t)es; j++, at++)
            CHECK(rb.host[at] == seg_byte(q, me, j), "%s: byte %lld from rank %d differs",
                  vector ? "alltoallv" : "alltoall", (long long)j, q);
    }
    expect_poison(&rb, at, vector ? "alltoallv recv" : "alltoall recv");
    buf_free(&sb), buf_free(&rb);
    free(sh), free(sc), free(cnt);
    *exchanges += 1;
    return 1;
}

int main(int argc, char **argv)
{
    long iters = 200;
    uint64_t seed = 1;
    test_init(argc, argv);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = strtol(argv[++i], NULL, 0);
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 0);
    }
    comm = test_comm_from_env(&me, &R);
    ASSERT(R <= MAXR);
    int exchanges = 0, counts[4] = {0, 0, 0, 0};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (round_no = 0; exchanges < iters; round_no++) {
        round_seed = test_mix(seed, (uint64_t)round_no, 0x50a4, 0);
        uint64_t s = round_seed;
        int kind = (int)rnd(&s, 8); /* 0-3 HT, 4-5 LL, 6 alltoallv, 7 alltoall */
        if (kind < 4) counts[0] += run_ht(&exchanges);
        else if (kind < 6) counts[1] += run_ll(&exchanges);
        else if (kind == 6) counts[2] += run_a2a(true, &exchanges);
        else counts[3] += run_a2a(false, &exchanges);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (me == 0)
        printf("soak: %d exchanges in %d rounds on %d ranks (%s): %d high-throughput, %d low-latency, %d alltoallv, "
               "%d alltoall; %.1f s\n",
               exchanges, round_no, R, test_on_cuda() ? "cuda" : "cpu", counts[0], counts[1], counts[2], counts[3],
               (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    test_finish(comm, round_no);
    return 0;
}
