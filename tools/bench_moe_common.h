/*
 * epx-bench moe: what the CPU benchmark (bench_moe.c) and the CUDA one (bench_cuda_moe.cu)
 * share: the host element conversions, the deterministic data (every rank's tokens, routing
 * and weights as a pure function of (seed, rank, token)), the expected outputs, the checks,
 * and the results (table and JSON). Plain C; C linkage also when included from CUDA C.
 */
#ifndef EPX_BENCH_MOE_COMMON_H
#define EPX_BENCH_MOE_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bench.h"

#ifdef __cplusplus
extern "C" {
#endif

#define BENCH_MOE_SEED 0x6570782d6d6f6521ull
#define BENCH_MOE_SCALE_BLOCK 128

/* ---- Element conversions (inline, so that the CPU baseline's loops are plain C) ---------- */

static inline float bf2f(uint16_t v)
{
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, like epx_float_to_bf16 (checked against it at start-up). */
static inline uint16_t f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* f16 -> float (exact, subnormals too), like epx_f16_to_float (checked against it at start-up).
 * Branch-free (masks, not selects the compiler may turn into branches), so that the
 * baseline's sums vectorise. */
static inline float h2f(uint16_t v)
{
    uint32_t sign = (uint32_t)(v & 0x8000u) << 16, e = (v >> 10) & 0x1fu, mant = v & 0x3ffu;
    uint32_t normal = (e + 112u) << 23 | mant << 13, special = 0x7f800000u | mant << 13; /* inf, NaN */
    float sub = (float)(int32_t)mant * 5.9604644775390625e-8f; /* zero, subnormal: mant * 2^-24 */
    uint32_t su;
    memcpy(&su, &sub, 4);
    uint32_t is_special = 0u - (uint32_t)(e == 0x1fu), is_sub = 0u - (uint32_t)(e == 0);
    uint32_t u = sign | (special & is_special) | (su & is_sub) | (normal & ~(is_special | is_sub));
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float -> f16, round to nearest even, subnormals too, overflow to infinity, like
 * epx_float_to_f16 (checked against it at start-up). Branch-free (masks), so that the
 * baseline's rounding loop vectorises. */
static inline uint16_t f2h(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    /* normal: rebias the exponent (127 -> 15), round the mantissa to 10 bits */
    uint32_t r = a - (112u << 23);
    uint32_t normal = (r + 0xfffu + ((r >> 13) & 1)) >> 13;
    /* below 2^-14: multiples of 2^-24, rounded to nearest even by the float addition */
    float af, mf;
    memcpy(&af, &a, 4);
    mf = af * 16777216.0f + 8388608.0f;
    uint32_t mu;
    memcpy(&mu, &mf, 4);
    uint32_t low = 0u - (uint32_t)(a < 0x38800000u);  /* 1024 -> 0x400 = 2^-14, the smallest normal */
    uint32_t big = 0u - (uint32_t)(a >= 0x477ff000u); /* >= 65520 (and inf): infinity */
    uint32_t nan = 0u - (uint32_t)(a > 0x7f800000u);  /* NaN: quiet */
    uint32_t v = ((mu - 0x4b000000u) & low) | (normal & ~low);
    v = (0x7c00u & big) | (v & ~big);
    v = ((0x7e00u | ((a >> 13) & 0x3ffu)) & nan) | (v & ~nan);
    return (uint16_t)(sign | v);
}

/* float -> FP8 E4M3 (bias 7, max 448, no infinities), round to nearest even, saturating,
 * like epx_float_to_fp8_e4m3 (checked against it at start-up). Branch-free, so that the
 * baseline's quantisation loop vectorises. */
static inline uint8_t f2fp8(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 24) & 0x80, a = u & 0x7fffffffu;
    /* normal: round the mantissa to 3 bits; (exponent << 3 | mantissa) - (120 << 3) */
    uint32_t r = a + 0x7ffffu + ((a >> 20) & 1);
    uint32_t normal = (r >> 20) - (120u << 3);
    /* below 2^-6: multiples of 2^-9, rounded to nearest even by the float addition */
    float af, mf;
    memcpy(&af, &a, 4);
    mf = af * 512.0f + 8388608.0f;
    uint32_t mu;
    memcpy(&mu, &mf, 4);
    uint32_t sub = mu - 0x4b000000u; /* 8 -> 0x08 = 2^-6, the smallest normal */
    uint32_t v = a < 0x3c800000u ? sub : normal;
    v = a >= 0x43e00000u ? 0x7eu : v; /* >= 448 (and inf): saturate */
    v = a > 0x7f800000u ? 0x7fu : v;  /* NaN */
    return (uint8_t)(sign | v);
}

/* ---- Rows of EPX_BF16, EPX_F16 or EPX_F32: the tokens (unless FP8), y and out ---------------- */

/* Element i of p, of dtype t, as float32 (exact). */
static inline float dt_load(epx_dtype_t t, const void *p, size_t i)
{
    if (t == EPX_F32) return ((const float *)p)[i];
    uint16_t v = ((const uint16_t *)p)[i];
    return t == EPX_F16 ? h2f(v) : bf2f(v);
}

/* f rounded to t (nearest even) into element i of p. */
static inline void dt_store(epx_dtype_t t, void *p, size_t i, float f)
{
    if (t == EPX_F32)
        ((float *)p)[i] = f;
    else
        ((uint16_t *)p)[i] = t == EPX_F16 ? f2h(f) : f2bf(f);
}

/* f rounded to t and back: the float32 value of dt_store's element. */
static inline float dt_round(epx_dtype_t t, float f)
{
    return t == EPX_F32 ? f : t == EPX_F16 ? h2f(f2h(f)) : bf2f(f2bf(f));
}

/* acc[h] += w * y[h] for h < n, in float32 (w == 1: the plain sum), y of dtype t. One loop per
 * dtype, so that the baselines' sums stay plain loops. */
static inline void dt_axpy_row(epx_dtype_t t, float *acc, float w, const void *y, int n)
{
    if (t == EPX_F32) {
        const float *v = (const float *)y;
        for (int h = 0; h < n; h++) acc[h] += w * v[h];
    } else if (t == EPX_F16) {
        const uint16_t *v = (const uint16_t *)y;
        for (int h = 0; h < n; h++) acc[h] += w * h2f(v[h]);
    } else {
        const uint16_t *v = (const uint16_t *)y;
        for (int h = 0; h < n; h++) acc[h] += w * bf2f(v[h]);
    }
}

/* dst[h] = src[h] rounded to t, for h < n. */
static inline void dt_store_row(epx_dtype_t t, void *dst, const float *src, int n)
{
    if (t == EPX_F32) {
        memcpy(dst, src, sizeof(float) * (size_t)n);
    } else if (t == EPX_F16) {
        uint16_t *d = (uint16_t *)dst;
        for (int h = 0; h < n; h++) d[h] = f2h(src[h]);
    } else {
        uint16_t *d = (uint16_t *)dst;
        for (int h = 0; h < n; h++) d[h] = f2bf(src[h]);
    }
}

/* ---- Deterministic data ----------------------------------------------------------------- */

static inline uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static inline uint64_t key4(uint64_t a, uint64_t b, uint64_t c, uint64_t d)
{
    return mix64(mix64(mix64(mix64(a) ^ b) ^ c) ^ d);
}

typedef struct {
    uint64_t s;
} rng_t;

static inline uint64_t rng_next(rng_t *r)
{
    r->s += 0x9e3779b97f4a7c15ull;
    return mix64(r->s);
}

static inline double rng_unit(rng_t *r) /* [0, 1) */
{
    return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* ---- The shared state -------------------------------------------------------------------- */

typedef struct {
    int R, me, T, H, K, E, L, S; /* ranks, this rank, tokens, hidden, top-k, experts, per rank, scales */
    bool ll;  /* low-latency mode (the CUDA bench sets it around what concerns its ll outputs) */
    bool fp8; /* FP8 rows: given to dispatch (high-throughput) or sent (low-latency ll_fp8) */
    epx_dtype_t xdt; /* tokens not FP8: EPX_BF16 (with fp8: what ll_fp8 quantises), EPX_F16 or EPX_F32 */
    epx_dtype_t cdt; /* the combine's y and out: EPX_BF16, EPX_F16 or EPX_F32 */
    float fp8_tab[256]; /* FP8 E4M3 -> float, the library's */

    int32_t *topk; /* [R, T, K] expert of every rank's tokens */
    float *w;      /* [R, T, K] their weights */
    uint8_t *dest; /* [R, T, R] token (s, t) goes to rank q */

    /* Host allocation: never returns NULL (the benchmark's own, which fails the run). */
    void *(*alloc)(void *ctx, size_t bytes);
    void *alloc_ctx;
} bench_moe_data_t;

typedef struct { /* high-throughput dispatch outputs (host, or device pointers in the CUDA bench) */
    uint8_t *x;
    float *xs;
    int64_t *idx;
    float *w;
    int32_t *src_rank, *src_token, *per_expert;
    int64_t n; /* rows received (host value) */
} ht_out_t;

typedef struct { /* low-latency dispatch outputs: [L, RT] slots (host copies) */
    uint8_t *x;
    float *xs;
    int32_t *count, *src_rank, *src_token;
} ll_out_t;

typedef struct { /* layout outputs */
    int32_t *per_rank, *per_expert;
    uint8_t *in_rank;
} layout_out_t;

static inline int64_t tk(const bench_moe_data_t *d, int s, int t) { return ((int64_t)s * d->T + t) * d->K; }

/* Multiplier applied by the expert side: y = cdt(value * mult). ht: by holding rank;
 * ll: by global expert. */
static inline float mult_of(int v) { return 1.0f + 0.25f * (float)(v % 5); }

/* Bytes of one element of a received row (recv_x): 1 (FP8) or the tokens' dtype's. */
static inline size_t row_es(const bench_moe_data_t *d) { return d->fp8 ? 1 : epx_dtype_size(d->xdt); }

/* Value of element h of a received row (as it lies in recv_x). */
static inline float row_val(const bench_moe_data_t *d, const uint8_t *row, const float *scales, int h)
{
    if (d->fp8) return d->fp8_tab[row[h]] * scales[h / BENCH_MOE_SCALE_BLOCK];
    return dt_load(d->xdt, row, (size_t)h);
}

/* d->fp8, d->xdt and d->cdt from the options (o->combine_dtype EPX_UNSET: epx's default, the
 * tokens' dtype, bf16 with FP8; epx.h, cfg.combine_dtype). */
void bench_moe_set_dtypes(bench_moe_data_t *d, const bench_opts_t *o);
/* The expert side's output for one received row (scales: FP8 only): y[h] = row_val(h) * mult
 * rounded to d->cdt, for h < H. */
void bench_moe_make_y_row(const bench_moe_data_t *d, const uint8_t *row, const float *scales, float mult, void *y);
/* Row t of rank s as given to dispatch: d->xdt [H] (sign, magnitude in [0.25, 4), every
 * mantissa bit random), or (high-throughput FP8) fp8 [H] with float scales [S]. */
void bench_moe_gen_row(const bench_moe_data_t *d, int s, int t, uint8_t *row, float *scales);
/* Low-latency FP8: per 128 channels, scale = amax / 448 (float32) and q = fp8(x * (448 / amax)),
 * amax clamped to >= 1e-4. */
void bench_moe_quantize_row(const bench_moe_data_t *d, const uint16_t *x, uint8_t *q, float *scales);
/* Routing of every rank's tokens (d->topk, d->w, d->dest): K distinct experts, uniform or
 * Zipf(skew) over a fixed random permutation of the experts; weights in [0.05, 1). */
void bench_moe_gen_routing(bench_moe_data_t *d, double skew);
/* Rows rank q receives and the part of them that crossed from another rank. */
void bench_moe_count_rows(const bench_moe_data_t *d, int q, int64_t *rows, int64_t *link);
/* Expected combine output of this rank's tokens, [T, H] of d->cdt (float32 sums from +0.0f
 * of the y elements' values, rounded to d->cdt). */
void bench_moe_expected_combine(const bench_moe_data_t *d, void *out);
/* Fills d->fp8_tab and counts the host conversions that differ from the library's over
 * `samples` floats (bf16 and f16 always, FP8 too when `fp8`), every bf16 and f16, and the
 * floats at and next to each midpoint of two f16 (the rounding ties). */
int64_t bench_moe_check_conversions(bench_moe_data_t *d, int samples, bool fp8);

/* Elements of size es (n of them) where a differs from the expected e, or from the other
 * contender's o (when given); *diff counts those differing from o. */
int64_t bench_moe_cmp_elems(const void *a, const void *e, const void *o, size_t n, size_t es, int64_t *diff);
/* Wrong values in a low-latency dispatch's outputs a (slots of `row` bytes, RT per local
 * expert; ll_fp8: quantised rows and their scales) against the expected ones, recomputed
 * from the seeds; with o, the elements where a and o differ are added to *diff. d->ll. */
int64_t bench_moe_check_ll_dispatch(const bench_moe_data_t *d, const ll_out_t *a, const ll_out_t *o, int64_t *diff,
                                    int64_t RT, size_t row);
/* The expert side of low latency: y (d->cdt, y_row bytes a slot, the slots of a) = each
 * received row's value times mult_of(its global expert), for the first count[l] slots of
 * each local expert (the others are left alone). */
void bench_moe_ll_make_y(const bench_moe_data_t *d, const ll_out_t *a, int64_t RT, size_t row, uint8_t *y,
                         size_t y_row);
/* The reference layout of this rank's topk_idx [T, K] (ids < 0 skipped): a plain C loop. */
void bench_moe_ref_layout(const bench_moe_data_t *d, const int64_t *idx, layout_out_t *o);
/* Layout outputs a against the expected e (and the other contender's o, when given). */
int64_t bench_moe_check_layout(const bench_moe_data_t *d, const layout_out_t *a, const layout_out_t *e,
                               const layout_out_t *o, int64_t *diff);
/* High-throughput dispatch outputs (host copies) against the expected rows: n_exp rows,
 * output capacity cap. */
int64_t bench_moe_check_ht_dispatch(const bench_moe_data_t *d, const ht_out_t *a, const ht_out_t *o, int64_t *diff,
                                    int64_t n_exp, int64_t cap);

/* ---- Results ------------------------------------------------------------------------------- */

enum { OP_LAYOUT, OP_DISPATCH, OP_COMBINE, NOPS };
extern const char *const bench_moe_op_name[NOPS];

typedef struct {
    /* the run, as written in the JSON records; optional fields are left out when negative / NULL */
    const char *mode, *dtype, *combine_dtype, *backend;
    int ranks, gpus; /* gpus: -1 = none written */
    int tokens, hidden, topk, experts;
    double skew;
    int registered; /* -1 = none written */
    int iters, warmup; /* warmup: -1 = none written */
    const char *timing; /* NULL = none written */
    int checked;        /* -1 = none written */
    bool baseline;      /* a baseline ran: its columns and fields */
    const char *baseline_layout, *baseline_moe; /* its names for the layout and the other ops */
    double device_mem; /* < 0 = none written */
    /* epx's op captured in a CUDA graph and replayed (median of the max over ranks), and (ll) one
     * graph of dispatch + combine replayed back to back, per pair; 0 = none written */
    double graph_us[NOPS], pair_graph_us;
    /* the results (all ranks): max over ranks of the times given (the benches give the
     * median over the iterations of the max over ranks, the same on every rank), sums of the
     * wrong counts */
    double time_us[2][NOPS], wrong[2][NOPS], diff[NOPS];
    double logical[NOPS], link[NOPS]; /* mean bytes per rank */
} bench_moe_report_t;

/* Collective: the report's results from this rank's medians med[c][op] (contenders
 * c < ncs), wrong counts and differences, and the mean rows (link rows) per rank; returns
 * whether anything was wrong or differed. */
int bench_moe_gather(bench_ctx_t *b, bench_moe_report_t *r, double med[2][NOPS], int64_t wrong[2][NOPS],
                     int64_t diff[NOPS], int ncs, double rows_mean, double link_mean, size_t wire_row, size_t y_row);
/* Rank 0: the results table on stdout and, with a path, the JSON records. */
void bench_moe_print(const bench_moe_report_t *r, const char *json_path);

#ifdef __cplusplus
}
#endif

#endif
