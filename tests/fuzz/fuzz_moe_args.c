/*
 * Fuzz target: MoE argument validation through the public API, on a one-rank CPU
 * communicator created once.
 *
 * The input builds an epx_moe_config_t (valid values and edge values for every field, the
 * `size` field too) and, when the context is created, one round of calls of its mode:
 *   high-throughput  epx_moe_layout, epx_moe_dispatch, epx_moe_combine, epx_moe_dispatch_cached
 *   low-latency      epx_moe_ll_dispatch, epx_moe_ll_combine
 * with T and K in and out of range, top-k entries valid, -1 or out of range, and every
 * pointer present, NULL or misaligned, and output capacities below, at and above need.
 *
 * Checked against a predicate written here from epx.h: each call succeeds exactly when the
 * arguments are valid, else returns EPX_ERR_INVALID_ARGUMENT; on failure no output byte
 * (nor the out structs, nor *handle) changed; on success the outputs match what one rank
 * must get (rows in token order, the token's data, local ids, counts; combine: each
 * token's single row). A mismatch aborts. Bytes past the input's end read as zeros, which
 * decode to good pointers and fitting capacities, so short seeds reach the success paths.
 */
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "epx.h"
#include "fuzz_input.h"

#define POISON 0xA5
#define PAD 64
#define MAX_T 24
#define MAX_H 300

static epx_comm_t comm;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    setenv("EPX_DEBUG", "NONE", 0);
    epx_unique_id_t id;
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.backend = EPX_BACKEND_CPU;
    if (epx_get_unique_id(&id) != EPX_SUCCESS || epx_comm_init_rank(&comm, 1, 0, &id, &cfg) != EPX_SUCCESS) {
        fprintf(stderr, "fuzz_moe_args: no one-rank communicator: %s\n", epx_get_last_error());
        abort();
    }
    return 0;
}

/* ---- Buffers: present, NULL or misaligned by one byte; poisoned, with a poisoned pad ---- */

typedef struct {
    char *base;
    char *ptr; /* what the call gets: NULL, base, or base + 1 */
    size_t bytes;
    bool misaligned;
} buf_t;

static buf_t buf_make(fuzz_in_t *in, size_t bytes)
{
    buf_t b = {0};
    b.bytes = bytes;
    b.base = malloc(bytes + PAD);
    memset(b.base, POISON, bytes + PAD);
    uint32_t how = fuzz_u8(in) % 16; /* 0 (also past the input's end): a good pointer */
    b.ptr = how == 15 ? NULL : how == 14 ? b.base + 1 : b.base;
    b.misaligned = how == 14;
    return b;
}
static bool buf_poisoned(const buf_t *b)
{
    for (size_t i = 0; i < b->bytes + PAD; i++)
        if ((uint8_t)b->base[i] != POISON) return false;
    return true;
}
static void buf_fill(buf_t *b, fuzz_in_t *in)
{
    if (!b->ptr) return;
    for (size_t i = 0; i < b->bytes; i++) b->ptr[i] = (char)fuzz_u8(in);
}
/* Misaligned for an element of `es` bytes (a one-byte offset only matters above 1). */
static bool buf_bad_align(const buf_t *b, size_t es) { return b->misaligned && es > 1; }
static void buf_free(buf_t *b) { free(b->base); }

/* ---- Values: mostly in range, sometimes an edge ------------------------------------------ */

static int pick(fuzz_in_t *in, int lo, int hi, const int *edges, int nedges)
{
    uint32_t k = fuzz_u8(in);
    if (k % 8 == 7 && nedges > 0) return edges[(k >> 3) % (uint32_t)nedges];
    return lo + fuzz_below(in, hi - lo + 1);
}

static const int edge_any[] = {-1, 0, EPX_UNSET, INT32_MIN, INT32_MAX, 7, 8};
#define NEDGE (int)(sizeof edge_any / sizeof edge_any[0])

static bool is_token_dtype(int d) { return d == EPX_BF16 || d == EPX_F16 || d == EPX_F32 || d == EPX_FP8_E4M3; }
static bool is_combine_dtype(int d) { return d == EPX_BF16 || d == EPX_F16 || d == EPX_F32; }

/* The rules of epx.h for a configuration on one rank. */
static bool cfg_valid(const epx_moe_config_t *c, int *cdtype)
{
    *cdtype = c->combine_dtype == EPX_UNSET ? (c->dtype == EPX_FP8_E4M3 ? EPX_BF16 : c->dtype) : c->combine_dtype;
    size_t min_size = offsetof(epx_moe_config_t, num_sms) + sizeof(int);
    return c->size >= min_size && c->size <= sizeof(epx_moe_config_t) && c->hidden >= 1 &&
           c->max_tokens_per_rank >= 0 && c->max_tokens_per_rank <= (1 << 24) && c->num_experts >= 1 &&
           c->max_topk >= 1 && c->max_topk <= EPX_MOE_MAX_TOPK && is_token_dtype(c->dtype) &&
           is_combine_dtype(*cdtype) && (c->index_dtype == EPX_I32 || c->index_dtype == EPX_I64) &&
           (c->mode == EPX_MOE_HIGH_THROUGHPUT || c->mode == EPX_MOE_LOW_LATENCY) && c->expert_alignment >= 1 &&
           (!c->ll_fp8 || (c->mode == EPX_MOE_LOW_LATENCY && c->dtype == EPX_BF16)) &&
           (c->scale_format == EPX_SCALE_F32 || c->scale_format == EPX_SCALE_UE8M0) &&
           !(c->mode == EPX_MOE_LOW_LATENCY && c->dtype == EPX_FP8_E4M3) &&
           (c->num_sms >= 0 || c->num_sms == EPX_UNSET || c->num_sms == EPX_MOE_COPY_ENGINES);
}

static size_t dsize(int d)
{
    return d == EPX_FP8_E4M3 ? 1 : d == EPX_F32 ? 4 : 2;
}

static float to_float(int d, const void *p, size_t i)
{
    switch (d) {
    case EPX_F32: return ((const float *)p)[i];
    case EPX_BF16: return epx_bf16_to_float(((const uint16_t *)p)[i]);
    case EPX_F16: return epx_f16_to_float(((const uint16_t *)p)[i]);
    default: return epx_fp8_e4m3_to_float(((const uint8_t *)p)[i]);
    }
}
static bool same_value(float a, float b) { return a == b || (isnan(a) && isnan(b)); }

/* ---- One case ------------------------------------------------------------------------------- */

typedef struct {
    epx_moe_config_t cfg;
    int cdtype, H, M, E, K, T, maxk;
    size_t es, ces, is, sc; /* element sizes, scale columns */
    bool fp8;
    buf_t idx;
    int64_t *ids; /* entries as int64 */
    bool routing_ok;
    int64_t n;     /* rows a valid dispatch receives (one rank: tokens with an expert) */
    int32_t *row_of; /* token -> its row, or -1 */
} case_t;

static int64_t entry(fuzz_in_t *in, int E)
{
    uint32_t kind = fuzz_u8(in) % 16;
    if (kind == 0) return -1;
    if (kind == 1) return E;
    if (kind == 2) return -2;
    if (kind == 3) return (int64_t)(int32_t)fuzz_u32(in);
    return (int64_t)(fuzz_u16(in) % (uint32_t)E);
}

/* T, K and the routing table (read by dispatch, layout and ll_dispatch). */
static void make_routing(case_t *c, fuzz_in_t *in)
{
    static const int edge_t[] = {-1, INT32_MIN, INT32_MAX};
    c->T = pick(in, 0, c->M + 1, edge_t, 3);
    c->K = pick(in, 0, c->maxk + 1, edge_t, 3);
    int tn = c->T < 0 ? 0 : c->T > c->M + 1 ? c->M + 1 : c->T;
    int kn = c->K < 0 ? 0 : c->K > c->maxk + 1 ? c->maxk + 1 : c->K;
    c->idx = buf_make(in, (size_t)tn * (size_t)kn * c->is);
    c->ids = calloc((size_t)tn * (size_t)kn + 1, sizeof(int64_t));
    bool tk_ok = c->T >= 0 && c->T <= c->M && c->K >= 1 && c->K <= c->maxk;
    c->routing_ok = tk_ok && !(c->T > 0 && !c->idx.ptr) && !buf_bad_align(&c->idx, c->is);
    bool clean = fuzz_u8(in) % 4 != 3; /* mostly valid entries, so the calls get through */
    for (int i = 0; i < tn * kn; i++) {
        int64_t v = clean ? (fuzz_u8(in) % 5 == 4 ? -1 : (int64_t)(fuzz_u16(in) % (uint32_t)c->E)) : entry(in, c->E);
        if (c->is == 4) v = (int32_t)v;
        c->ids[i] = v;
        if (c->idx.ptr) {
            if (c->is == 4) memcpy(c->idx.ptr + 4 * (size_t)i, &(int32_t){(int32_t)v}, 4);
            else memcpy(c->idx.ptr + 8 * (size_t)i, &v, 8);
        }
        if (tk_ok && (v < -1 || v >= c->E)) c->routing_ok = false;
    }
    c->row_of = malloc(sizeof(int32_t) * (size_t)(tn + 1));
    c->n = 0;
    for (int t = 0; t < tn; t++) {
        bool any = false;
        for (int k = 0; k < kn; k++) any |= c->ids[t * kn + k] >= 0;
        c->row_of[t] = any ? (int32_t)c->n++ : -1;
    }
}

static epx_moe_t create(case_t *c, fuzz_in_t *in)
{
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    size_t min_size = offsetof(epx_moe_config_t, num_sms) + sizeof(int);
    size_t edge_size[] = {0, min_size - 4, min_size, sizeof cfg + 8, 1u << 20};
    uint32_t sz = fuzz_u8(in) % 16;
    if (sz >= 11) cfg.size = edge_size[sz - 11];
    static const int edge_h[] = {0, -1, INT32_MIN};
    static const int edge_m[] = {-1, INT32_MIN, (1 << 24) + 1, INT32_MAX};
    cfg.hidden = pick(in, 1, MAX_H, edge_h, 3);
    cfg.max_tokens_per_rank = pick(in, 0, MAX_T, edge_m, 4);
    cfg.num_experts = pick(in, 1, 40, edge_h, 3);
    cfg.max_topk = pick(in, 0, EPX_MOE_MAX_TOPK + 1, edge_any, NEDGE);
    cfg.dtype = pick(in, EPX_F16, EPX_FP8_E4M3, edge_any, NEDGE);
    cfg.combine_dtype = fuzz_u8(in) % 2 ? EPX_UNSET : pick(in, EPX_F16, EPX_F32, edge_any, NEDGE);
    cfg.index_dtype = pick(in, EPX_I32, EPX_I64, edge_any, NEDGE);
    cfg.mode = pick(in, 0, 1, edge_any, NEDGE);
    cfg.expert_alignment = pick(in, 1, 20, edge_any, NEDGE);
    cfg.ll_fp8 = fuzz_u8(in) % 4 == 1 ? pick(in, 0, 2, edge_any, NEDGE) : 0;
    cfg.scale_format = pick(in, 0, 1, edge_any, NEDGE);
    cfg.num_sms = pick(in, -1, 200, edge_any, NEDGE);
    c->cfg = cfg;
    bool valid = cfg_valid(&cfg, &c->cdtype);
    epx_moe_t moe = (epx_moe_t)&c->cfg; /* a sentinel: must become NULL on failure */
    epx_status_t st = epx_moe_create(comm, &cfg, &moe);
    FUZZ_CHECK((st == EPX_SUCCESS) == valid, "create: status %d, reference says %s (%s)", (int)st,
               valid ? "valid" : "invalid", epx_get_last_error());
    if (!valid) {
        FUZZ_CHECK(st == EPX_ERR_INVALID_ARGUMENT, "invalid config: status %d", (int)st);
        FUZZ_CHECK(moe == NULL, "failed create left *moe set");
        return NULL;
    }
    c->H = cfg.hidden;
    c->M = cfg.max_tokens_per_rank;
    c->E = cfg.num_experts;
    c->maxk = cfg.max_topk;
    c->es = dsize(cfg.dtype);
    c->ces = dsize(c->cdtype);
    c->is = cfg.index_dtype == EPX_I32 ? 4 : 8;
    c->sc = (size_t)(c->H + 127) / 128;
    c->fp8 = cfg.dtype == EPX_FP8_E4M3;
    int64_t rows = -1;
    FUZZ_CHECK(epx_moe_max_recv_tokens(moe, &rows) == EPX_SUCCESS && rows == c->M, "max_recv_tokens %lld", (long long)rows);
    return moe;
}

static int64_t pick_capacity(fuzz_in_t *in, int64_t n, int M)
{
    switch (fuzz_u8(in) % 6) {
    case 1: return -1;
    case 2: return 0;
    case 3: return n - 1;
    case 4: return n + 2;
    case 5: return M;
    default: return n;
    }
}

static int clamp_rows(int v, int hi) { return v < 0 ? 0 : v > hi ? hi : v; }

static void expect_failed(epx_status_t st, const char *call, buf_t *const *bufs, int nbufs)
{
    FUZZ_CHECK(st == EPX_ERR_INVALID_ARGUMENT, "%s: status %d on invalid arguments", call, (int)st);
    for (int i = 0; i < nbufs; i++) FUZZ_CHECK(buf_poisoned(bufs[i]), "%s failed but wrote output %d", call, i);
}

/* Rows [n, capacity) and the pad after them still poisoned. */
static void expect_tail(const buf_t *b, size_t used, const char *what)
{
    if (!b->ptr) return;
    size_t from = (size_t)(b->ptr - b->base) + used;
    for (size_t i = from; i < b->bytes + PAD; i++)
        FUZZ_CHECK((uint8_t)b->base[i] == POISON, "%s written past its %zu used bytes", what, used);
}

static void run_ht(epx_moe_t moe, case_t *c, fuzz_in_t *in)
{
    make_routing(c, in);
    int tn = clamp_rows(c->T, c->M + 1), kn = clamp_rows(c->K, c->maxk + 1);
    size_t H = (size_t)c->H;

    /* Layout. */
    {
        buf_t pr = buf_make(in, 4), pe = buf_make(in, 4 * (size_t)c->E), ir = buf_make(in, (size_t)tn);
        void *stream = fuzz_u8(in) % 16 == 15 ? (void *)&pr : NULL;
        bool ok = c->routing_ok && !stream && !buf_bad_align(&pr, 4) && !buf_bad_align(&pe, 4);
        epx_status_t st = epx_moe_layout(moe, c->idx.ptr, c->T, c->K, (int32_t *)pr.ptr, (int32_t *)pe.ptr,
                                         (uint8_t *)ir.ptr, stream);
        FUZZ_CHECK((st == EPX_SUCCESS) == ok, "layout: status %d, reference %d (%s)", (int)st, ok, epx_get_last_error());
        if (!ok) {
            buf_t *outs[] = {&pr, &pe, &ir};
            expect_failed(st, "layout", outs, 3);
        } else {
            if (pr.ptr) FUZZ_CHECK(*(int32_t *)pr.ptr == c->n, "layout: %d tokens to rank 0, want %lld",
                                   *(int32_t *)pr.ptr, (long long)c->n);
            for (int e = 0; pe.ptr && e < c->E; e++) {
                int32_t want = 0;
                for (int t = 0; t < tn; t++) {
                    bool hit = false;
                    for (int k = 0; k < kn; k++) hit |= c->ids[t * kn + k] == e;
                    want += hit;
                }
                FUZZ_CHECK(((int32_t *)pe.ptr)[e] == want, "layout: expert %d", e);
            }
            for (int t = 0; ir.ptr && t < tn; t++)
                FUZZ_CHECK((uint8_t)ir.ptr[t] == (c->row_of[t] >= 0), "layout: is_token_in_rank[%d]", t);
        }
        buf_free(&pr), buf_free(&pe), buf_free(&ir);
    }

    /* Dispatch. */
    buf_t x = buf_make(in, (size_t)tn * H * c->es), xs = buf_make(in, (size_t)tn * c->sc * 4),
          w = buf_make(in, (size_t)tn * (size_t)kn * 4);
    buf_fill(&x, in), buf_fill(&xs, in), buf_fill(&w, in);
    int64_t cap = pick_capacity(in, c->n, c->M);
    size_t ca = cap < 0 ? 0 : (size_t)cap;
    buf_t rx = buf_make(in, ca * H * c->es), rxs = buf_make(in, ca * c->sc * 4),
          ri = buf_make(in, ca * (size_t)kn * c->is), rw = buf_make(in, ca * (size_t)kn * 4),
          rsr = buf_make(in, ca * 4), rst = buf_make(in, ca * 4), rpe = buf_make(in, (size_t)c->E * 4);
    uint32_t nulls = fuzz_u8(in);
    bool in_null = nulls % 32 == 31, out_null = nulls % 32 == 30, h_null = nulls % 32 == 29;
    int T = c->T;
    bool ok = !in_null && !out_null && c->routing_ok && !buf_bad_align(&w, 4) && !(T > 0 && !x.ptr) &&
              !buf_bad_align(&x, c->es) && !(c->fp8 && T > 0 && !xs.ptr) && !buf_bad_align(&xs, 4) && cap >= 0 &&
              !(cap > 0 && !rx.ptr) && !buf_bad_align(&rx, c->es) && !(c->fp8 && cap > 0 && !rxs.ptr) &&
              !buf_bad_align(&rxs, 4) && !buf_bad_align(&ri, c->is) && !buf_bad_align(&rw, 4) &&
              !buf_bad_align(&rsr, 4) && !buf_bad_align(&rst, 4) && !buf_bad_align(&rpe, 4) && !h_null &&
              cap >= c->n;
    epx_moe_dispatch_in_t din = {x.ptr, (const float *)xs.ptr, c->idx.ptr, (const float *)w.ptr, c->T, c->K};
    epx_moe_dispatch_out_t dout = {rx.ptr, (float *)rxs.ptr, ri.ptr, (float *)rw.ptr, (int32_t *)rsr.ptr,
                                   (int32_t *)rst.ptr, (int32_t *)rpe.ptr, cap, -7, NULL};
    epx_moe_dispatch_out_t dout0 = dout;
    epx_moe_handle_t h = NULL;
    epx_status_t st = epx_moe_dispatch(moe, in_null ? NULL : &din, out_null ? NULL : &dout, h_null ? NULL : &h, NULL);
    FUZZ_CHECK((st == EPX_SUCCESS) == ok, "dispatch: status %d, reference %d (%s)", (int)st, ok, epx_get_last_error());
    buf_t *douts[] = {&rx, &rxs, &ri, &rw, &rsr, &rst, &rpe};
    if (!ok) {
        expect_failed(st, "dispatch", douts, 7);
        FUZZ_CHECK(memcmp(&dout, &dout0, sizeof dout) == 0 && h == NULL, "failed dispatch changed out or *handle");
        goto free_dispatch;
    }
    int64_t n = c->n, rows = -1;
    FUZZ_CHECK(dout.num_recv_tokens == n, "dispatch: %lld rows, want %lld", (long long)dout.num_recv_tokens, (long long)n);
    FUZZ_CHECK(h && epx_moe_handle_num_recv_tokens(h, &rows) == EPX_SUCCESS && rows == n, "handle rows");
    for (int t = 0; t < tn; t++) {
        int64_t r = c->row_of[t];
        if (r < 0) continue;
        FUZZ_CHECK(!memcmp(rx.ptr + r * H * c->es, x.ptr + t * H * c->es, H * c->es), "recv_x row %lld", (long long)r);
        if (c->fp8 && rxs.ptr)
            FUZZ_CHECK(!memcmp(rxs.ptr + r * c->sc * 4, xs.ptr + t * c->sc * 4, c->sc * 4), "recv_x_scales row");
        for (int k = 0; k < kn; k++) {
            int64_t e = c->ids[t * kn + k];
            if (ri.ptr) {
                int64_t got = c->is == 4 ? ((int32_t *)(void *)ri.ptr)[r * kn + k] : ((int64_t *)(void *)ri.ptr)[r * kn + k];
                FUZZ_CHECK(got == (e >= 0 ? e : -1), "recv_topk_idx[%lld, %d] = %lld", (long long)r, k, (long long)got);
            }
            if (rw.ptr && w.ptr) {
                float zero = 0.0f, *want = e >= 0 ? (float *)(void *)(w.ptr + 4 * (size_t)(t * kn + k)) : &zero;
                FUZZ_CHECK(!memcmp(rw.ptr + 4 * (size_t)(r * kn + k), want, 4), "recv_topk_weights[%lld, %d]", (long long)r, k);
            }
        }
        if (rsr.ptr) FUZZ_CHECK(((int32_t *)(void *)rsr.ptr)[r] == 0, "recv_src_rank");
        if (rst.ptr) FUZZ_CHECK(((int32_t *)(void *)rst.ptr)[r] == t, "recv_src_token");
    }
    expect_tail(&rx, (size_t)n * H * c->es, "recv_x");
    expect_tail(&rxs, c->fp8 ? (size_t)n * c->sc * 4 : 0, "recv_x_scales");
    expect_tail(&ri, (size_t)n * (size_t)kn * c->is, "recv_topk_idx");
    expect_tail(&rw, w.ptr ? (size_t)n * (size_t)kn * 4 : 0, "recv_topk_weights");
    expect_tail(&rsr, (size_t)n * 4, "recv_src_rank");
    expect_tail(&rst, (size_t)n * 4, "recv_src_token");
    for (int e = 0; rpe.ptr && e < c->E; e++) {
        int64_t cnt = 0;
        for (int t = 0; t < tn; t++) {
            bool hit = false;
            for (int k = 0; k < kn; k++) hit |= c->ids[t * kn + k] == e;
            cnt += hit;
        }
        int64_t a = c->cfg.expert_alignment, want = (cnt + a - 1) / a * a;
        FUZZ_CHECK(((int32_t *)(void *)rpe.ptr)[e] == want, "num_recv_tokens_per_expert[%d] = %d, want %lld", e,
                   ((int32_t *)(void *)rpe.ptr)[e], (long long)want);
    }

    /* Combine along the handle. */
    {
        buf_t y = buf_make(in, (size_t)n * H * c->ces), yw = buf_make(in, (size_t)n * (size_t)kn * 4),
              o = buf_make(in, (size_t)tn * H * c->ces), ow = buf_make(in, (size_t)tn * (size_t)kn * 4);
        buf_fill(&y, in), buf_fill(&yw, in);
        uint32_t cn = fuzz_u8(in);
        bool hn = cn % 32 == 31, cin_null = cn % 32 == 30, cout_null = cn % 32 == 29;
        bool cok = !hn && !cin_null && !cout_null && !(n > 0 && !y.ptr) && !buf_bad_align(&y, c->ces) &&
                   !buf_bad_align(&yw, 4) && !(T > 0 && !o.ptr) && !buf_bad_align(&o, c->ces) && !buf_bad_align(&ow, 4);
        epx_moe_combine_in_t cin = {y.ptr, (const float *)yw.ptr};
        epx_moe_combine_out_t cout = {o.ptr, (float *)ow.ptr};
        st = epx_moe_combine(moe, hn ? NULL : h, cin_null ? NULL : &cin, cout_null ? NULL : &cout, NULL);
        FUZZ_CHECK((st == EPX_SUCCESS) == cok, "combine: status %d, reference %d (%s)", (int)st, cok, epx_get_last_error());
        if (!cok) {
            buf_t *couts[] = {&o, &ow};
            expect_failed(st, "combine", couts, 2);
        } else {
            for (int t = 0; t < tn; t++) {
                int64_t r = c->row_of[t];
                for (size_t j = 0; j < H; j++) {
                    float got = to_float(c->cdtype, o.ptr, (size_t)t * H + j);
                    if (r < 0) FUZZ_CHECK(got == 0.0f && !signbit(got), "combine: token %d sent nowhere not +0", t);
                    else FUZZ_CHECK(same_value(got, to_float(c->cdtype, y.ptr, (size_t)r * H + j)), "combine: token %d", t);
                }
                for (int k = 0; ow.ptr && k < kn; k++) {
                    float got = ((float *)(void *)ow.ptr)[t * kn + k];
                    float want = r >= 0 && yw.ptr ? ((float *)(void *)yw.ptr)[r * kn + k] : 0.0f;
                    FUZZ_CHECK(same_value(got, 0.0f + want), "combine: out_topk_weights[%d, %d]", t, k);
                }
            }
            expect_tail(&o, (size_t)tn * H * c->ces, "combine out");
            expect_tail(&ow, (size_t)tn * (size_t)kn * 4, "combine out_topk_weights");
        }
        buf_free(&y), buf_free(&yw), buf_free(&o), buf_free(&ow);
    }

    /* Cached dispatch: new data along the same routing; other outputs left alone. */
    {
        int T2 = fuzz_u8(in) % 8 == 7 ? pick(in, -1, c->M + 1, NULL, 0) : T;
        int tn2 = clamp_rows(T2, c->M + 1);
        buf_t x2 = buf_make(in, (size_t)tn2 * H * c->es), xs2 = buf_make(in, (size_t)tn2 * c->sc * 4);
        buf_fill(&x2, in), buf_fill(&xs2, in);
        int64_t cap2 = pick_capacity(in, n, c->M);
        size_t ca2 = cap2 < 0 ? 0 : (size_t)cap2;
        buf_t rx2 = buf_make(in, ca2 * H * c->es), rxs2 = buf_make(in, ca2 * c->sc * 4), spare = buf_make(in, ca2 * 8 * 16);
        uint32_t cn = fuzz_u8(in);
        bool hn = cn % 32 == 31;
        bool cok = !hn && !(T2 > 0 && !x2.ptr) && !buf_bad_align(&x2, c->es) && !(c->fp8 && T2 > 0 && !xs2.ptr) &&
                   !buf_bad_align(&xs2, 4) && cap2 >= 0 && !(cap2 > 0 && !rx2.ptr) && !buf_bad_align(&rx2, c->es) &&
                   !(c->fp8 && cap2 > 0 && !rxs2.ptr) && !buf_bad_align(&rxs2, 4) && T2 == T && cap2 >= n;
        epx_moe_dispatch_in_t in2 = {x2.ptr, (const float *)xs2.ptr, NULL, NULL, T2, 0};
        int32_t *sp = spare.ptr ? (int32_t *)(void *)spare.base : NULL;
        epx_moe_dispatch_out_t out2 = {rx2.ptr, (float *)rxs2.ptr, sp, (float *)sp, sp, sp, sp, cap2, -9, NULL};
        epx_moe_dispatch_out_t out20 = out2;
        st = epx_moe_dispatch_cached(moe, hn ? NULL : h, &in2, &out2, NULL);
        FUZZ_CHECK((st == EPX_SUCCESS) == cok, "cached dispatch: status %d, reference %d (%s)", (int)st, cok,
                   epx_get_last_error());
        FUZZ_CHECK(memcmp(&out2, &out20, sizeof out2) == 0, "cached dispatch changed the out struct");
        FUZZ_CHECK(buf_poisoned(&spare), "cached dispatch wrote an output it must leave alone");
        if (!cok) {
            buf_t *couts[] = {&rx2, &rxs2};
            expect_failed(st, "cached dispatch", couts, 2);
        } else {
            for (int t = 0; t < tn; t++) {
                int64_t r = c->row_of[t];
                if (r < 0) continue;
                FUZZ_CHECK(!memcmp(rx2.ptr + r * H * c->es, x2.ptr + t * H * c->es, H * c->es), "cached recv_x row");
                if (c->fp8 && rxs2.ptr)
                    FUZZ_CHECK(!memcmp(rxs2.ptr + r * c->sc * 4, xs2.ptr + t * c->sc * 4, c->sc * 4), "cached scales row");
            }
            expect_tail(&rx2, (size_t)n * H * c->es, "cached recv_x");
            expect_tail(&rxs2, c->fp8 ? (size_t)n * c->sc * 4 : 0, "cached recv_x_scales");
        }
        buf_free(&x2), buf_free(&xs2), buf_free(&rx2), buf_free(&rxs2), buf_free(&spare);
    }
    FUZZ_CHECK(epx_moe_handle_destroy(h) == EPX_SUCCESS, "handle destroy");
free_dispatch:
    buf_free(&x), buf_free(&xs), buf_free(&w);
    for (int i = 0; i < 7; i++) buf_free(douts[i]);
}

static uint16_t from_float(int d, float f)
{
    return d == EPX_BF16 ? epx_float_to_bf16(f) : epx_float_to_f16(f);
}

static void run_ll(epx_moe_t moe, case_t *c, fuzz_in_t *in)
{
    make_routing(c, in);
    int tn = clamp_rows(c->T, c->M + 1), kn = clamp_rows(c->K, c->maxk + 1);
    size_t H = (size_t)c->H, L = (size_t)c->E, S = (size_t)c->M; /* one rank: R * M slots */
    bool fp8 = c->cfg.ll_fp8 != 0, ue8 = c->cfg.scale_format == EPX_SCALE_UE8M0;
    size_t res = fp8 ? 1 : c->es, sb = ue8 ? 1 : 4;
    buf_t x = buf_make(in, (size_t)tn * H * c->es);
    buf_fill(&x, in);
    buf_t rx = buf_make(in, L * S * H * res), rxs = buf_make(in, L * S * c->sc * sb), rc = buf_make(in, L * 4),
          rsr = buf_make(in, L * S * 4), rst = buf_make(in, L * S * 4);
    uint32_t nulls = fuzz_u8(in);
    bool in_null = nulls % 32 == 31, out_null = nulls % 32 == 30, h_null = nulls % 32 == 29, stream = nulls % 32 == 28;
    int T = c->T;
    bool ok = !in_null && !out_null && !h_null && !stream && c->routing_ok && !(T > 0 && !x.ptr) &&
              !buf_bad_align(&x, c->es) && !(S > 0 && !rx.ptr) && !buf_bad_align(&rx, res) &&
              !(fp8 && S > 0 && !rxs.ptr) && !buf_bad_align(&rxs, sb) && !buf_bad_align(&rc, 4) &&
              !buf_bad_align(&rsr, 4) && !buf_bad_align(&rst, 4);
    epx_moe_ll_dispatch_in_t din = {x.ptr, c->idx.ptr, c->T, c->K};
    epx_moe_ll_dispatch_out_t dout = {rx.ptr, rxs.ptr, (int32_t *)rc.ptr, (int32_t *)rsr.ptr, (int32_t *)rst.ptr};
    epx_moe_ll_dispatch_out_t dout0 = dout;
    epx_moe_handle_t h = NULL;
    epx_status_t st = epx_moe_ll_dispatch(moe, in_null ? NULL : &din, out_null ? NULL : &dout, h_null ? NULL : &h,
                                          stream ? (void *)&dout : NULL);
    FUZZ_CHECK((st == EPX_SUCCESS) == ok, "ll_dispatch: status %d, reference %d (%s)", (int)st, ok, epx_get_last_error());
    buf_t *outs[] = {&rx, &rxs, &rc, &rsr, &rst};
    if (!ok) {
        expect_failed(st, "ll_dispatch", outs, 5);
        FUZZ_CHECK(memcmp(&dout, &dout0, sizeof dout) == 0 && h == NULL, "failed ll_dispatch changed out or *handle");
        goto done;
    }
    /* Slots of expert l: the tokens that chose it (once each), ascending. */
    int32_t *slot = malloc(sizeof(int32_t) * (L * (size_t)tn + 1)); /* slot[l * tn + t] or -1 */
    for (size_t l = 0; l < L; l++) {
        int32_t cnt = 0;
        for (int t = 0; t < tn; t++) {
            bool hit = false;
            for (int k = 0; k < kn; k++) hit |= c->ids[t * kn + k] == (int64_t)l;
            slot[l * (size_t)tn + (size_t)t] = hit ? cnt : -1;
            if (!hit) continue;
            if (rsr.ptr) FUZZ_CHECK(((int32_t *)(void *)rsr.ptr)[l * S + (size_t)cnt] == 0, "ll recv_src_rank");
            if (rst.ptr) FUZZ_CHECK(((int32_t *)(void *)rst.ptr)[l * S + (size_t)cnt] == t, "ll recv_src_token");
            if (!fp8)
                FUZZ_CHECK(!memcmp(rx.ptr + (l * S + (size_t)cnt) * H * res, x.ptr + (size_t)t * H * res, H * res),
                           "ll recv_x of expert %zu slot %d", l, cnt);
            cnt++;
        }
        if (rc.ptr) FUZZ_CHECK(((int32_t *)(void *)rc.ptr)[l] == cnt, "ll recv_count[%zu]", l);
        for (size_t s = (size_t)cnt; s < S; s++) {
            if (rsr.ptr) FUZZ_CHECK(((int32_t *)(void *)rsr.ptr)[l * S + s] == -1, "ll recv_src_rank past the count");
            if (rst.ptr) FUZZ_CHECK(((int32_t *)(void *)rst.ptr)[l * S + s] == -1, "ll recv_src_token past the count");
        }
    }

    /* Combine: out[t] = sum over k of w[t,k] * y[e_k][slot], float32, products rounded. */
    {
        buf_t y = buf_make(in, L * S * H * c->ces), w = buf_make(in, (size_t)tn * (size_t)kn * 4),
              o = buf_make(in, (size_t)tn * H * c->ces);
        buf_fill(&y, in), buf_fill(&w, in);
        uint32_t cn = fuzz_u8(in);
        bool hn = cn % 32 == 31, cin_null = cn % 32 == 30, cstream = cn % 32 == 29;
        bool cok = !hn && !cin_null && !cstream && !(S > 0 && !y.ptr) && !buf_bad_align(&y, c->ces) &&
                   !(T > 0 && !w.ptr) && !buf_bad_align(&w, 4) && !(T > 0 && !o.ptr) && !buf_bad_align(&o, c->ces);
        epx_moe_ll_combine_in_t cin = {y.ptr, (const float *)w.ptr};
        st = epx_moe_ll_combine(moe, hn ? NULL : h, cin_null ? NULL : &cin, o.ptr, cstream ? (void *)&cin : NULL);
        FUZZ_CHECK((st == EPX_SUCCESS) == cok, "ll_combine: status %d, reference %d (%s)", (int)st, cok,
                   epx_get_last_error());
        if (!cok) {
            buf_t *couts[] = {&o};
            expect_failed(st, "ll_combine", couts, 1);
        } else {
            for (int t = 0; t < tn; t++)
                for (size_t j = 0; j < H; j++) {
                    float acc = 0.0f;
                    for (int k = 0; k < kn; k++) {
                        int64_t e = c->ids[t * kn + k];
                        if (e < 0) continue;
                        size_t s = (size_t)slot[(size_t)e * (size_t)tn + (size_t)t];
                        float wk;
                        memcpy(&wk, w.ptr + 4 * (size_t)(t * kn + k), 4);
                        float prod = wk * to_float(c->cdtype, y.ptr, ((size_t)e * S + s) * H + j);
                        acc = acc + prod;
                    }
                    float want = c->cdtype == EPX_F32 ? acc : to_float(c->cdtype, &(uint16_t){from_float(c->cdtype, acc)}, 0);
                    FUZZ_CHECK(same_value(to_float(c->cdtype, o.ptr, (size_t)t * H + j), want),
                               "ll_combine: token %d channel %zu", t, j);
                }
            expect_tail(&o, (size_t)tn * H * c->ces, "ll_combine out");
        }
        buf_free(&y), buf_free(&w), buf_free(&o);
    }
    free(slot);
    FUZZ_CHECK(epx_moe_handle_destroy(h) == EPX_SUCCESS, "handle destroy");
done:
    for (int i = 0; i < 5; i++) buf_free(outs[i]);
    buf_free(&x);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_in_t in = {data, size};
    case_t c;
    memset(&c, 0, sizeof c);
    epx_moe_t moe = create(&c, &in);
    if (!moe) return 0;
    if (c.cfg.mode == EPX_MOE_HIGH_THROUGHPUT) run_ht(moe, &c, &in);
    else run_ll(moe, &c, &in);
    /* The communicator must still be healthy after every rejected call. */
    epx_status_t async = EPX_ERR_INTERNAL;
    FUZZ_CHECK(epx_comm_get_async_error(comm, &async) == EPX_SUCCESS && async == EPX_SUCCESS, "communicator broken");
    FUZZ_CHECK(epx_moe_destroy(moe) == EPX_SUCCESS, "moe destroy");
    buf_free(&c.idx);
    free(c.ids);
    free(c.row_of);
    return 0;
}
