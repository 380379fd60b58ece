/*
 * epx-bench moe: epx MoE layout / dispatch / combine vs the same routing done with
 * MPI_Alltoallv (pack, counts exchange, rows, unpack; combine: rows back, float32 sum), in
 * the same run, iterations alternating between the two.
 *
 * Data: every rank's tokens, routing and weights are a pure function of (seed, rank,
 * token), so any rank can regenerate what any other rank sends; the checks compare every
 * output value with that expectation (and, with MPI, epx's outputs with the baseline's,
 * bitwise). Expert outputs y are a function of the received row and of where it was
 * received (the holding rank in high-throughput mode, the expert in low-latency mode), so
 * the home rank can recompute the exact combined sum.
 */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

#define SEED 0x6570782d6d6f6521ull
#define SCALE_BLOCK 128

/* ---- Element conversions (inline, so that both contenders' loops are plain C) ---------- */

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

/* ---- The benchmark's state ------------------------------------------------------------- */

typedef struct { /* high-throughput dispatch outputs */
    uint8_t *x;
    float *xs;
    int64_t *idx;
    float *w;
    int32_t *src_rank, *src_token, *per_expert;
    int64_t n;
} ht_out_t;

typedef struct { /* low-latency dispatch outputs */
    uint8_t *x;
    float *xs;
    int32_t *count, *src_rank, *src_token;
} ll_out_t;

typedef struct { /* layout outputs */
    int32_t *per_rank, *per_expert;
    uint8_t *in_rank;
} layout_out_t;

#ifdef EPX_HAVE_MPI
typedef struct { /* the MPI_Alltoallv baseline: its buffers and the routing of its last dispatch */
    MPI_Datatype row_t, scale_t, meta_t, y_t;
    int *scount, *sdispl, *rcount, *rdispl, *cur;
    uint8_t *sendx, *recvx, *csend, *crecv, *qx;
    float *sends, *recvs, *qs, *acc;
    int32_t *smeta, *rmeta; /* ht: [token, K local ids, K weights]; ll: [token] */
    uint8_t *in;            /* ht: [T, R] token goes to rank */
    int *cnt_send, *cnt_recv, *slotoff; /* ll: [R*L] rows per (rank, local expert); [L*R] */
    int64_t *pos;           /* ll: [T*K] row of (t, k) in the packed send (and combine receive) order */
    int64_t n;              /* rows received */
} baseline_t;
#endif

typedef struct {
    bench_ctx_t *b;
    int R, me, T, H, K, E, L, S;
    bool ll, fp8, reg;
    size_t in_row;   /* bytes of one row of x as passed to dispatch */
    size_t row;      /* bytes of one received row's elements (fp8: H, bf16: 2H) */
    size_t wire_row; /* row + its scale bytes */
    size_t y_row;    /* one row of the combine dtype (bf16): 2H */
    int64_t cap;     /* ht: rows of the dispatch outputs; ll: L * R * T slots */
    int64_t RT;      /* ll: slots per local expert, R * T */
    float fp8_tab[256];

    int32_t *topk;   /* [R, T, K] expert of every rank's tokens */
    float *w;        /* [R, T, K] their weights */
    uint8_t *dest;   /* [R, T, R] token (s, t) goes to rank q (ht) */
    int64_t n_exp;   /* rows this rank receives */

    /* inputs */
    uint8_t *x;
    float *xs;
    int64_t *idx;
    epx_moe_t moe;
    /* outputs */
    ht_out_t ht[2]; /* 0: epx, 1: baseline */
    ll_out_t llo[2];
    layout_out_t lay[2];
    uint8_t *y;
    uint8_t *cout[2];
#ifdef EPX_HAVE_MPI
    baseline_t bl;
#endif
} bm_t;

static void *xmalloc(bm_t *m, size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) bench_die(m->b, "malloc", EPX_ERR_NO_MEMORY);
    return p;
}

static void *buf_alloc(bm_t *m, size_t bytes)
{
    if (!m->reg) return xmalloc(m, bytes);
    void *p = NULL;
    epx_status_t st = epx_mem_alloc(m->b->comm, bytes ? bytes : 1, &p);
    if (st != EPX_SUCCESS) bench_die(m->b, "epx_mem_alloc", st);
    return p;
}

static void buf_free(bm_t *m, void *p)
{
    if (m->reg)
        epx_mem_free(m->b->comm, p);
    else
        free(p);
}

static inline int64_t tk(const bm_t *m, int s, int t) { return ((int64_t)s * m->T + t) * m->K; }

/* Multiplier applied by the expert side: y = cast(value * mult). ht: by holding rank;
 * ll: by global expert. */
static inline float mult_of(int v) { return 1.0f + 0.25f * (float)(v % 5); }

/* Row t of rank s as given to dispatch: bf16 [H], or fp8 [H] with float scales [S]. */
static void gen_row(const bm_t *m, int s, int t, uint8_t *row, float *scales)
{
    uint64_t base = key4(SEED, (uint64_t)s, (uint64_t)t, 1);
    if (m->fp8 && !m->ll) {
        for (int h = 0; h < m->H; h += 8) {
            uint64_t r = mix64(base + (uint64_t)h);
            for (int j = 0; j < 8 && h + j < m->H; j++, r >>= 8) {
                /* sign, exponent field 4..11, 3 mantissa bits: never zero, never NaN */
                row[h + j] = (uint8_t)((r & 0x80) | ((4 + ((r >> 3) & 7)) << 3) | (r & 7));
            }
        }
        for (int i = 0; i < m->S; i++) {
            uint64_t r = mix64(base ^ (0x5ca1e0000ull + (uint64_t)i));
            scales[i] = (1.0f + (float)(r & 0xffff) / 65536.0f) * (1.0f / 64.0f);
        }
    } else {
        uint16_t *v = (uint16_t *)row;
        for (int h = 0; h < m->H; h += 4) {
            uint64_t r = mix64(base + (uint64_t)h);
            for (int j = 0; j < 4 && h + j < m->H; j++, r >>= 16) {
                /* sign, exponent 125..128 (0.25 .. 4), 7 mantissa bits: never zero */
                uint16_t e = (uint16_t)(125 + ((r >> 7) & 3));
                v[h + j] = (uint16_t)((r & 0x8000) | (e << 7) | (r & 0x7f));
            }
        }
    }
}

/* Low-latency FP8: per 128 channels, scale = amax / 448 (float32) and q = fp8(x * (448 / amax)),
 * amax clamped to >= 1e-4. The header documents only the scale; q's formula (multiply by
 * 448 / amax rather than divide by the scale) is the library's, needed for equal bits. */
static void quantize_row(const bm_t *m, const uint16_t *x, uint8_t *q, float *scales)
{
    for (int bl = 0; bl < m->S; bl++) {
        int h0 = bl * SCALE_BLOCK, h1 = h0 + SCALE_BLOCK < m->H ? h0 + SCALE_BLOCK : m->H;
        float amax = 0;
        for (int h = h0; h < h1; h++) {
            float a = fabsf(bf2f(x[h]));
            amax = a > amax ? a : amax;
        }
        if (!(amax >= 1e-4f)) amax = 1e-4f;
        scales[bl] = amax / 448.0f;
        float inv = 448.0f / amax;
        for (int h = h0; h < h1; h++) q[h] = f2fp8(bf2f(x[h]) * inv);
    }
}

/* Value of element h of a received row (as it lies in recv_x). */
static inline float row_val(const bm_t *m, const uint8_t *row, const float *scales, int h)
{
    if (m->fp8) return m->fp8_tab[row[h]] * scales[h / SCALE_BLOCK];
    return bf2f(((const uint16_t *)row)[h]);
}

/* Routing of every rank's tokens: K distinct experts, uniform or Zipf(skew) over a fixed
 * random permutation of the experts; weights in [0.05, 1). */
static void gen_routing(bm_t *m, double skew)
{
    int R = m->R, T = m->T, K = m->K, E = m->E;
    m->topk = xmalloc(m, sizeof(int32_t) * (size_t)R * T * K);
    m->w = xmalloc(m, sizeof(float) * (size_t)R * T * K);
    int *perm = xmalloc(m, sizeof(int) * (size_t)E);
    double *wz = xmalloc(m, sizeof(double) * (size_t)E);
    uint8_t *taken = xmalloc(m, (size_t)E);
    rng_t pr = {key4(SEED, 0xfeed, 0, 3)};
    for (int i = 0; i < E; i++) perm[i] = i;
    for (int i = E - 1; i > 0; i--) {
        int j = (int)(rng_next(&pr) % (uint64_t)(i + 1)), tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
    for (int i = 0; i < E; i++) wz[i] = pow((double)(i + 1), -skew);
    for (int s = 0; s < R; s++)
        for (int t = 0; t < T; t++) {
            rng_t r = {key4(SEED, (uint64_t)s, (uint64_t)t, 2)};
            int32_t *e = m->topk + tk(m, s, t);
            memset(taken, 0, (size_t)E);
            for (int k = 0; k < K; k++) {
                int pick;
                if (skew > 0) { /* without replacement, proportional to the remaining weights */
                    double tot = 0;
                    for (int i = 0; i < E; i++) tot += taken[i] ? 0 : wz[i];
                    double u = rng_unit(&r) * tot;
                    pick = -1;
                    for (int i = 0; i < E; i++) {
                        if (taken[i]) continue;
                        pick = i;
                        if ((u -= wz[i]) < 0) break;
                    }
                    taken[pick] = 1;
                    e[k] = perm[pick];
                } else {
                    do pick = (int)(rng_next(&r) % (uint64_t)E);
                    while (taken[pick]);
                    taken[pick] = 1;
                    e[k] = pick;
                }
                m->w[tk(m, s, t) + k] = 0.05f + 0.95f * (float)rng_unit(&r);
            }
        }
    m->dest = xmalloc(m, (size_t)R * T * R);
    memset(m->dest, 0, (size_t)R * T * R);
    for (int s = 0; s < R; s++)
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++) m->dest[((int64_t)s * T + t) * R + m->topk[tk(m, s, t) + k] / m->L] = 1;
    free(perm);
    free(wz);
    free(taken);
}

/* Rows each rank receives and the part of them that crossed from another rank. */
static void count_rows(const bm_t *m, int q, int64_t *rows, int64_t *link)
{
    *rows = *link = 0;
    for (int s = 0; s < m->R; s++)
        for (int t = 0; t < m->T; t++) {
            int64_t c = 0;
            if (m->ll) {
                for (int k = 0; k < m->K; k++) c += m->topk[tk(m, s, t) + k] / m->L == q;
            } else {
                c = m->dest[((int64_t)s * m->T + t) * m->R + q];
            }
            *rows += c;
            if (s != q) *link += c;
        }
}

/* ---- Checking ----------------------------------------------------------------------------- */

/* Count elements of size es (n of them) where a differs from the expected e, or from the
 * other contender's o (when given); *diff counts those differing from o. */
static int64_t cmp_elems(const void *a_, const void *e_, const void *o_, size_t n, size_t es, int64_t *diff)
{
    const uint8_t *a = a_, *e = e_, *o = o_;
    if (!memcmp(a, e, n * es) && (!o || !memcmp(a, o, n * es))) return 0;
    int64_t w = 0;
    for (size_t i = 0; i < n; i++) {
        bool bad_o = o && memcmp(a + i * es, o + i * es, es) != 0;
        w += memcmp(a + i * es, e + i * es, es) != 0 || bad_o;
        if (diff) *diff += bad_o;
    }
    return w;
}

static int64_t check_layout(bm_t *m, const layout_out_t *a, const layout_out_t *e)
{
    return cmp_elems(a->per_rank, e->per_rank, NULL, (size_t)m->R, 4, NULL) +
           cmp_elems(a->per_expert, e->per_expert, NULL, (size_t)m->E, 4, NULL) +
           cmp_elems(a->in_rank, e->in_rank, NULL, (size_t)m->T * m->R, 1, NULL);
}

static int64_t check_ht_dispatch(bm_t *m, const ht_out_t *a, const ht_out_t *o, int64_t *diff)
{
    int K = m->K, L = m->L, q = m->me;
    int64_t wrong = 0, n = a->n < 0 ? 0 : a->n > m->cap ? m->cap : a->n;
    if (a->n != m->n_exp) wrong += a->n > m->n_exp ? a->n - m->n_exp : m->n_exp - a->n;
    if (o && o->n != a->n) ++*diff;
    uint8_t *row = xmalloc(m, m->in_row);
    float *sc = xmalloc(m, sizeof(float) * (size_t)m->S);
    int64_t eidx[EPX_MOE_MAX_TOPK];
    float ew[EPX_MOE_MAX_TOPK];
    int32_t *per_expert = xmalloc(m, sizeof(int32_t) * (size_t)L);
    memset(per_expert, 0, sizeof(int32_t) * (size_t)L);
    int64_t i = 0;
    for (int s = 0; s < m->R; s++)
        for (int t = 0; t < m->T; t++) {
            if (!m->dest[((int64_t)s * m->T + t) * m->R + q]) continue;
            for (int k = 0; k < K; k++) {
                int e = m->topk[tk(m, s, t) + k];
                eidx[k] = e / L == q ? e % L : -1;
                ew[k] = eidx[k] >= 0 ? m->w[tk(m, s, t) + k] : 0.0f;
                if (eidx[k] >= 0) per_expert[eidx[k]]++;
            }
            if (i < n) {
                gen_row(m, s, t, row, sc);
                size_t es = m->fp8 ? 1 : 2;
#define OTHER(f, off) (o ? (const void *)(o->f + (off)) : NULL)
                wrong += cmp_elems(a->x + i * m->row, row, OTHER(x, i * (int64_t)m->row), (size_t)m->H, es, diff);
                if (m->fp8)
                    wrong += cmp_elems(a->xs + i * m->S, sc, OTHER(xs, i * m->S), (size_t)m->S, 4, diff);
                wrong += cmp_elems(a->idx + i * K, eidx, OTHER(idx, i * K), (size_t)K, 8, diff);
                wrong += cmp_elems(a->w + i * K, ew, OTHER(w, i * K), (size_t)K, 4, diff);
                int32_t v[2] = {s, t};
                wrong += cmp_elems(a->src_rank + i, &v[0], OTHER(src_rank, i), 1, 4, diff);
                wrong += cmp_elems(a->src_token + i, &v[1], OTHER(src_token, i), 1, 4, diff);
            }
            i++;
        }
    wrong += cmp_elems(a->per_expert, per_expert, OTHER(per_expert, 0), (size_t)L, 4, diff);
#undef OTHER
    free(row);
    free(sc);
    free(per_expert);
    return wrong;
}

static int64_t check_ll_dispatch(bm_t *m, const ll_out_t *a, const ll_out_t *o, int64_t *diff)
{
    int K = m->K, L = m->L, q = m->me;
    int64_t wrong = 0, RT = m->RT;
    uint16_t *x = xmalloc(m, m->in_row);
    uint8_t *qx = xmalloc(m, (size_t)m->H);
    float *qs = xmalloc(m, sizeof(float) * (size_t)m->S);
    int32_t minus1[1] = {-1};
    for (int l = 0; l < L; l++) {
        int e = q * L + l;
        int64_t i = 0;
        for (int s = 0; s < m->R; s++)
            for (int t = 0; t < m->T; t++) {
                bool hit = false;
                for (int k = 0; k < K; k++) hit |= m->topk[tk(m, s, t) + k] == e;
                if (!hit) continue;
                int64_t slot = (int64_t)l * RT + i++;
                gen_row(m, s, t, (uint8_t *)x, NULL);
                const void *want = x;
#define OTHER(f, off) (o ? (const void *)(o->f + (off)) : NULL)
                if (m->fp8) {
                    quantize_row(m, x, qx, qs);
                    want = qx;
                    wrong += cmp_elems(a->xs + slot * m->S, qs, OTHER(xs, slot * m->S), (size_t)m->S, 4, diff);
                }
                wrong += cmp_elems(a->x + slot * (int64_t)m->row, want, OTHER(x, slot * (int64_t)m->row),
                                   (size_t)m->H, m->fp8 ? 1 : 2, diff);
                int32_t v[2] = {s, t};
                wrong += cmp_elems(a->src_rank + slot, &v[0], OTHER(src_rank, slot), 1, 4, diff);
                wrong += cmp_elems(a->src_token + slot, &v[1], OTHER(src_token, slot), 1, 4, diff);
            }
        int32_t cnt = (int32_t)i;
        wrong += cmp_elems(a->count + l, &cnt, OTHER(count, l), 1, 4, diff);
        for (int64_t j = i; j < RT; j++) { /* past the count: -1 */
            int64_t slot = (int64_t)l * RT + j;
            wrong += cmp_elems(a->src_rank + slot, minus1, OTHER(src_rank, slot), 1, 4, diff);
            wrong += cmp_elems(a->src_token + slot, minus1, OTHER(src_token, slot), 1, 4, diff);
        }
#undef OTHER
    }
    free(x);
    free(qx);
    free(qs);
    return wrong;
}

/* Expected combine output of this rank's tokens, [T, H] bf16. */
static void expected_combine(bm_t *m, uint16_t *out)
{
    int H = m->H, K = m->K, q = m->me;
    uint8_t *row = xmalloc(m, m->in_row);
    uint8_t *qx = xmalloc(m, (size_t)H);
    float *sc = xmalloc(m, sizeof(float) * (size_t)(m->S ? m->S : 1));
    float *val = xmalloc(m, sizeof(float) * (size_t)H), *acc = xmalloc(m, sizeof(float) * (size_t)H);
    for (int t = 0; t < m->T; t++) {
        gen_row(m, q, t, row, sc);
        if (m->ll && m->fp8) {
            quantize_row(m, (const uint16_t *)row, qx, sc);
            for (int h = 0; h < H; h++) val[h] = row_val(m, qx, sc, h);
        } else {
            for (int h = 0; h < H; h++) val[h] = row_val(m, row, sc, h);
        }
        for (int h = 0; h < H; h++) acc[h] = 0.0f;
        if (m->ll) {
            for (int k = 0; k < K; k++) {
                int e = m->topk[tk(m, q, t) + k];
                float wk = m->w[tk(m, q, t) + k], mu = mult_of(e);
                for (int h = 0; h < H; h++) acc[h] += wk * bf2f(f2bf(val[h] * mu));
            }
        } else {
            for (int r = 0; r < m->R; r++) {
                if (!m->dest[((int64_t)q * m->T + t) * m->R + r]) continue;
                float mu = mult_of(r);
                for (int h = 0; h < H; h++) acc[h] += bf2f(f2bf(val[h] * mu));
            }
        }
        for (int h = 0; h < H; h++) out[(int64_t)t * H + h] = f2bf(acc[h]);
    }
    free(row);
    free(qx);
    free(sc);
    free(val);
    free(acc);
}

/* The expert side: y from the rows epx received (a function of the row and of where it
 * was received), in the layout the combine reads. */
static void make_y(bm_t *m)
{
    int H = m->H;
    if (m->ll) {
        const ll_out_t *a = &m->llo[0];
        for (int l = 0; l < m->L; l++) {
            int64_t c = a->count[l] < 0 ? 0 : a->count[l] > m->RT ? m->RT : a->count[l];
            float mu = mult_of(m->me * m->L + l);
            for (int64_t i = 0; i < c; i++) {
                int64_t slot = (int64_t)l * m->RT + i;
                const uint8_t *r = a->x + slot * (int64_t)m->row;
                const float *sc = m->fp8 ? a->xs + slot * m->S : NULL;
                uint16_t *y = (uint16_t *)(m->y + slot * (int64_t)m->y_row);
                for (int h = 0; h < H; h++) y[h] = f2bf(row_val(m, r, sc, h) * mu);
            }
        }
    } else {
        const ht_out_t *a = &m->ht[0];
        int64_t n = a->n < 0 ? 0 : a->n > m->cap ? m->cap : a->n;
        float mu = mult_of(m->me);
        for (int64_t i = 0; i < n; i++) {
            const uint8_t *r = a->x + i * (int64_t)m->row;
            const float *sc = m->fp8 ? a->xs + i * m->S : NULL;
            uint16_t *y = (uint16_t *)(m->y + i * (int64_t)m->y_row);
            for (int h = 0; h < H; h++) y[h] = f2bf(row_val(m, r, sc, h) * mu);
        }
    }
}

/* ---- The contenders ------------------------------------------------------------------------ */

static void ref_layout(bm_t *m, layout_out_t *o)
{
    int R = m->R, K = m->K, L = m->L;
    memset(o->per_rank, 0, sizeof(int32_t) * (size_t)R);
    memset(o->per_expert, 0, sizeof(int32_t) * (size_t)m->E);
    memset(o->in_rank, 0, (size_t)m->T * R);
    for (int t = 0; t < m->T; t++) {
        uint8_t *f = o->in_rank + (int64_t)t * R;
        for (int k = 0; k < K; k++) {
            int64_t e = m->idx[(int64_t)t * K + k];
            if (e < 0) continue;
            o->per_expert[e]++;
            f[e / L] = 1;
        }
        for (int r = 0; r < R; r++) o->per_rank[r] += f[r];
    }
}

static void epx_layout(bm_t *m, layout_out_t *o)
{
    epx_status_t st = epx_moe_layout(m->moe, m->idx, m->T, m->K, o->per_rank, o->per_expert, o->in_rank, NULL);
    if (st != EPX_SUCCESS) bench_die(m->b, "epx_moe_layout", st);
}

static epx_moe_handle_t epx_dispatch(bm_t *m)
{
    epx_moe_handle_t h = NULL;
    epx_status_t st;
    if (m->ll) {
        ll_out_t *a = &m->llo[0];
        epx_moe_ll_dispatch_in_t in = {m->x, m->idx, m->T, m->K};
        epx_moe_ll_dispatch_out_t out = {a->x, m->fp8 ? (void *)a->xs : NULL, a->count, a->src_rank, a->src_token};
        st = epx_moe_ll_dispatch(m->moe, &in, &out, &h, NULL);
        if (st != EPX_SUCCESS) bench_die(m->b, "epx_moe_ll_dispatch", st);
    } else {
        ht_out_t *a = &m->ht[0];
        epx_moe_dispatch_in_t in = {m->x, m->fp8 ? m->xs : NULL, m->idx, m->w + tk(m, m->me, 0), m->T, m->K};
        epx_moe_dispatch_out_t out = {a->x, m->fp8 ? a->xs : NULL, a->idx, a->w, a->src_rank, a->src_token,
                                      a->per_expert, m->cap, -1};
        st = epx_moe_dispatch(m->moe, &in, &out, &h, NULL);
        if (st != EPX_SUCCESS) bench_die(m->b, "epx_moe_dispatch", st);
        a->n = out.num_recv_tokens;
    }
    return h;
}

static void epx_combine(bm_t *m, epx_moe_handle_t h)
{
    epx_status_t st;
    if (m->ll) {
        epx_moe_ll_combine_in_t in = {m->y, m->w + tk(m, m->me, 0)};
        st = epx_moe_ll_combine(m->moe, h, &in, m->cout[0], NULL);
        if (st != EPX_SUCCESS) bench_die(m->b, "epx_moe_ll_combine", st);
    } else {
        epx_moe_combine_in_t in = {m->y, NULL};
        epx_moe_combine_out_t out = {m->cout[0], NULL};
        st = epx_moe_combine(m->moe, h, &in, &out, NULL);
        if (st != EPX_SUCCESS) bench_die(m->b, "epx_moe_combine", st);
    }
}

#ifdef EPX_HAVE_MPI
static void mpi_ok(bm_t *m, int rc, const char *what)
{
    if (rc != MPI_SUCCESS) bench_die(m->b, what, EPX_ERR_MPI);
}

static void bl_init(bm_t *m)
{
    baseline_t *bl = &m->bl;
    int R = m->R, T = m->T, K = m->K, L = m->L, S = m->S;
    int64_t maxsend, maxrecv;
    if (m->ll) {
        maxsend = (int64_t)T * K;
        maxrecv = (int64_t)R * T * (K < L ? K : L);
    } else {
        maxsend = (int64_t)T * (K < R ? K : R);
        maxrecv = m->cap;
    }
    int meta_ints = m->ll ? 1 : 1 + 2 * K;
    mpi_ok(m, MPI_Type_contiguous((int)m->row, MPI_BYTE, &bl->row_t), "MPI_Type_contiguous");
    mpi_ok(m, MPI_Type_contiguous(S > 0 ? S : 1, MPI_FLOAT, &bl->scale_t), "MPI_Type_contiguous");
    mpi_ok(m, MPI_Type_contiguous(meta_ints, MPI_INT32_T, &bl->meta_t), "MPI_Type_contiguous");
    mpi_ok(m, MPI_Type_contiguous((int)m->y_row, MPI_BYTE, &bl->y_t), "MPI_Type_contiguous");
    MPI_Type_commit(&bl->row_t);
    MPI_Type_commit(&bl->scale_t);
    MPI_Type_commit(&bl->meta_t);
    MPI_Type_commit(&bl->y_t);
    bl->scount = xmalloc(m, sizeof(int) * (size_t)R);
    bl->sdispl = xmalloc(m, sizeof(int) * (size_t)R);
    bl->rcount = xmalloc(m, sizeof(int) * (size_t)R);
    bl->rdispl = xmalloc(m, sizeof(int) * (size_t)R);
    bl->cur = xmalloc(m, sizeof(int) * (size_t)R);
    bl->sendx = xmalloc(m, (size_t)maxsend * m->row);
    bl->sends = xmalloc(m, sizeof(float) * (size_t)maxsend * S);
    bl->smeta = xmalloc(m, sizeof(int32_t) * (size_t)maxsend * meta_ints);
    bl->rmeta = xmalloc(m, sizeof(int32_t) * (size_t)maxrecv * meta_ints);
    bl->crecv = xmalloc(m, (size_t)maxsend * m->y_row);
    bl->acc = xmalloc(m, sizeof(float) * (size_t)m->H);
    if (m->ll) {
        bl->recvx = xmalloc(m, (size_t)maxrecv * m->row);
        bl->recvs = xmalloc(m, sizeof(float) * (size_t)maxrecv * S);
        bl->csend = xmalloc(m, (size_t)maxrecv * m->y_row);
        bl->cnt_send = xmalloc(m, sizeof(int) * (size_t)R * L);
        bl->cnt_recv = xmalloc(m, sizeof(int) * (size_t)R * L);
        bl->slotoff = xmalloc(m, sizeof(int) * (size_t)R * L);
        bl->pos = xmalloc(m, sizeof(int64_t) * (size_t)T * K);
        if (m->fp8) {
            bl->qx = xmalloc(m, (size_t)T * m->H);
            bl->qs = xmalloc(m, sizeof(float) * (size_t)T * S);
        }
    } else {
        bl->in = xmalloc(m, (size_t)T * R);
    }
}

static void bl_free(bm_t *m)
{
    baseline_t *bl = &m->bl;
    MPI_Type_free(&bl->row_t);
    MPI_Type_free(&bl->scale_t);
    MPI_Type_free(&bl->meta_t);
    MPI_Type_free(&bl->y_t);
    void *ps[] = {bl->scount, bl->sdispl, bl->rcount, bl->rdispl, bl->cur, bl->sendx, bl->recvx, bl->csend,
                  bl->crecv, bl->qx, bl->sends, bl->recvs, bl->qs, bl->acc, bl->smeta, bl->rmeta, bl->in,
                  bl->cnt_send, bl->cnt_recv, bl->slotoff, bl->pos};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) free(ps[i]);
}

static int prefix(const int *count, int *displ, int n)
{
    int s = 0;
    for (int i = 0; i < n; i++) displ[i] = s, s += count[i];
    return s;
}

/* High-throughput dispatch: per destination rank, the tokens with an expert there, in
 * token order; counts by MPI_Alltoall; rows (scales) and [token, local ids, weights] by
 * MPI_Alltoallv; the rows land in recv_x directly (source-rank-major, like epx). */
static void bl_ht_dispatch(bm_t *m)
{
    baseline_t *bl = &m->bl;
    ht_out_t *o = &m->ht[1];
    int R = m->R, T = m->T, K = m->K, L = m->L, S = m->S, MI = 1 + 2 * K;
    const float *w = m->w + tk(m, m->me, 0);
    memset(bl->scount, 0, sizeof(int) * (size_t)R);
    for (int t = 0; t < T; t++) {
        uint8_t *f = bl->in + (int64_t)t * R;
        memset(f, 0, (size_t)R);
        for (int k = 0; k < K; k++) {
            int64_t e = m->idx[(int64_t)t * K + k];
            if (e >= 0) f[e / L] = 1;
        }
        for (int r = 0; r < R; r++) bl->scount[r] += f[r];
    }
    prefix(bl->scount, bl->sdispl, R);
    memcpy(bl->cur, bl->sdispl, sizeof(int) * (size_t)R);
    for (int t = 0; t < T; t++) {
        const uint8_t *f = bl->in + (int64_t)t * R;
        for (int r = 0; r < R; r++) {
            if (!f[r]) continue;
            int64_t j = bl->cur[r]++;
            memcpy(bl->sendx + j * (int64_t)m->row, m->x + (int64_t)t * m->row, m->row);
            if (m->fp8) memcpy(bl->sends + j * S, m->xs + (int64_t)t * S, sizeof(float) * (size_t)S);
            int32_t *mt = bl->smeta + j * MI;
            mt[0] = t;
            for (int k = 0; k < K; k++) {
                int64_t e = m->idx[(int64_t)t * K + k];
                int32_t loc = e >= 0 && e / L == r ? (int32_t)(e % L) : -1;
                float wk = loc >= 0 ? w[(int64_t)t * K + k] : 0.0f;
                mt[1 + k] = loc;
                memcpy(&mt[1 + K + k], &wk, 4);
            }
        }
    }
    mpi_ok(m, MPI_Alltoall(bl->scount, 1, MPI_INT, bl->rcount, 1, MPI_INT, MPI_COMM_WORLD), "MPI_Alltoall");
    int64_t n = 0;
    for (int r = 0; r < R; r++) bl->rdispl[r] = (int)n, n += bl->rcount[r];
    if (n > m->cap) bench_die(m->b, "baseline dispatch (output capacity)", EPX_ERR_INTERNAL);
    mpi_ok(m, MPI_Alltoallv(bl->sendx, bl->scount, bl->sdispl, bl->row_t, o->x, bl->rcount, bl->rdispl, bl->row_t,
                            MPI_COMM_WORLD), "MPI_Alltoallv");
    if (m->fp8)
        mpi_ok(m, MPI_Alltoallv(bl->sends, bl->scount, bl->sdispl, bl->scale_t, o->xs, bl->rcount, bl->rdispl,
                                bl->scale_t, MPI_COMM_WORLD), "MPI_Alltoallv");
    mpi_ok(m, MPI_Alltoallv(bl->smeta, bl->scount, bl->sdispl, bl->meta_t, bl->rmeta, bl->rcount, bl->rdispl,
                            bl->meta_t, MPI_COMM_WORLD), "MPI_Alltoallv");
    memset(o->per_expert, 0, sizeof(int32_t) * (size_t)L);
    for (int s = 0; s < R; s++)
        for (int64_t j = bl->rdispl[s]; j < bl->rdispl[s] + bl->rcount[s]; j++) {
            const int32_t *mt = bl->rmeta + j * MI;
            o->src_rank[j] = s;
            o->src_token[j] = mt[0];
            for (int k = 0; k < K; k++) {
                o->idx[j * K + k] = mt[1 + k];
                if (mt[1 + k] >= 0) o->per_expert[mt[1 + k]]++;
            }
            memcpy(o->w + j * K, mt + 1 + K, sizeof(float) * (size_t)K);
        }
    o->n = bl->n = n;
}

/* High-throughput combine: the y rows go back (they lie grouped by source rank already),
 * then each token's rows are summed in float32 in ascending rank order. */
static void bl_ht_combine(bm_t *m)
{
    baseline_t *bl = &m->bl;
    int R = m->R, H = m->H;
    mpi_ok(m, MPI_Alltoallv(m->y, bl->rcount, bl->rdispl, bl->y_t, bl->crecv, bl->scount, bl->sdispl, bl->y_t,
                            MPI_COMM_WORLD), "MPI_Alltoallv");
    memcpy(bl->cur, bl->sdispl, sizeof(int) * (size_t)R);
    float *acc = bl->acc;
    uint16_t *out = (uint16_t *)m->cout[1];
    for (int t = 0; t < m->T; t++) {
        const uint8_t *f = bl->in + (int64_t)t * R;
        for (int h = 0; h < H; h++) acc[h] = 0.0f;
        for (int r = 0; r < R; r++) {
            if (!f[r]) continue;
            const uint16_t *y = (const uint16_t *)(bl->crecv + (int64_t)bl->cur[r]++ * m->y_row);
            for (int h = 0; h < H; h++) acc[h] += bf2f(y[h]);
        }
        uint16_t *dst = out + (int64_t)t * H;
        for (int h = 0; h < H; h++) dst[h] = f2bf(acc[h]);
    }
}

/* Low-latency dispatch: one row per (token, expert), packed by (destination rank, local
 * expert, token); counts per (rank, expert) by MPI_Alltoall; rows (scales) and token ids
 * by MPI_Alltoallv; unpacked into the expert-major slots (source rank, then token order). */
static void bl_ll_dispatch(bm_t *m)
{
    baseline_t *bl = &m->bl;
    ll_out_t *o = &m->llo[1];
    int R = m->R, T = m->T, K = m->K, L = m->L, S = m->S, RL = R * L;
    int64_t RT = m->RT;
    memset(bl->cnt_send, 0, sizeof(int) * (size_t)RL);
    for (int64_t i = 0; i < (int64_t)T * K; i++)
        if (m->idx[i] >= 0) bl->cnt_send[m->idx[i]]++;
    int *off = bl->slotoff; /* scratch here: send cursor per (rank, expert) */
    prefix(bl->cnt_send, off, RL);
    for (int r = 0; r < R; r++) {
        bl->sdispl[r] = off[r * L];
        bl->scount[r] = 0;
        for (int l = 0; l < L; l++) bl->scount[r] += bl->cnt_send[r * L + l];
    }
    const uint8_t *src = m->x;
    const float *srcs = NULL;
    if (m->fp8) {
        for (int t = 0; t < T; t++)
            quantize_row(m, (const uint16_t *)(m->x + (int64_t)t * m->in_row), bl->qx + (int64_t)t * m->H,
                         bl->qs + (int64_t)t * S);
        src = bl->qx;
        srcs = bl->qs;
    }
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int64_t e = m->idx[(int64_t)t * K + k];
            if (e < 0) continue;
            int64_t j = off[e]++;
            bl->pos[(int64_t)t * K + k] = j;
            memcpy(bl->sendx + j * (int64_t)m->row, src + (int64_t)t * m->row, m->row);
            if (srcs) memcpy(bl->sends + j * S, srcs + (int64_t)t * S, sizeof(float) * (size_t)S);
            bl->smeta[j] = t;
        }
    mpi_ok(m, MPI_Alltoall(bl->cnt_send, L, MPI_INT, bl->cnt_recv, L, MPI_INT, MPI_COMM_WORLD), "MPI_Alltoall");
    for (int s = 0; s < R; s++) {
        bl->rcount[s] = 0;
        for (int l = 0; l < L; l++) bl->rcount[s] += bl->cnt_recv[s * L + l];
    }
    bl->n = prefix(bl->rcount, bl->rdispl, R);
    mpi_ok(m, MPI_Alltoallv(bl->sendx, bl->scount, bl->sdispl, bl->row_t, bl->recvx, bl->rcount, bl->rdispl,
                            bl->row_t, MPI_COMM_WORLD), "MPI_Alltoallv");
    if (m->fp8)
        mpi_ok(m, MPI_Alltoallv(bl->sends, bl->scount, bl->sdispl, bl->scale_t, bl->recvs, bl->rcount, bl->rdispl,
                                bl->scale_t, MPI_COMM_WORLD), "MPI_Alltoallv");
    mpi_ok(m, MPI_Alltoallv(bl->smeta, bl->scount, bl->sdispl, bl->meta_t, bl->rmeta, bl->rcount, bl->rdispl,
                            bl->meta_t, MPI_COMM_WORLD), "MPI_Alltoallv");
    for (int l = 0; l < L; l++) { /* slot of the first row from source s for expert l */
        int c = 0;
        for (int s = 0; s < R; s++) bl->slotoff[l * R + s] = c, c += bl->cnt_recv[s * L + l];
        o->count[l] = c;
    }
    for (int s = 0; s < R; s++) {
        int64_t j = bl->rdispl[s];
        for (int l = 0; l < L; l++)
            for (int i = 0; i < bl->cnt_recv[s * L + l]; i++, j++) {
                int64_t slot = (int64_t)l * RT + bl->slotoff[l * R + s] + i;
                memcpy(o->x + slot * (int64_t)m->row, bl->recvx + j * (int64_t)m->row, m->row);
                if (m->fp8) memcpy(o->xs + slot * S, bl->recvs + j * S, sizeof(float) * (size_t)S);
                o->src_rank[slot] = s;
                o->src_token[slot] = bl->rmeta[j];
            }
    }
    for (int l = 0; l < L; l++)
        for (int64_t i = o->count[l]; i < RT; i++) o->src_rank[l * RT + i] = o->src_token[l * RT + i] = -1;
}

/* Low-latency combine: the y rows of every slot go back to their source, packed in the
 * order it sent them; there out[t] = sum over k ascending of w[t,k] * y (float32). */
static void bl_ll_combine(bm_t *m)
{
    baseline_t *bl = &m->bl;
    int R = m->R, L = m->L, H = m->H, K = m->K;
    int64_t j = 0;
    for (int s = 0; s < R; s++)
        for (int l = 0; l < L; l++) {
            int c = bl->cnt_recv[s * L + l];
            int64_t slot = (int64_t)l * m->RT + bl->slotoff[l * R + s];
            memcpy(bl->csend + j * (int64_t)m->y_row, m->y + slot * (int64_t)m->y_row, (size_t)c * m->y_row);
            j += c;
        }
    mpi_ok(m, MPI_Alltoallv(bl->csend, bl->rcount, bl->rdispl, bl->y_t, bl->crecv, bl->scount, bl->sdispl, bl->y_t,
                            MPI_COMM_WORLD), "MPI_Alltoallv");
    float *acc = bl->acc;
    const float *w = m->w + tk(m, m->me, 0);
    uint16_t *out = (uint16_t *)m->cout[1];
    for (int t = 0; t < m->T; t++) {
        for (int h = 0; h < H; h++) acc[h] = 0.0f;
        for (int k = 0; k < K; k++) {
            if (m->idx[(int64_t)t * K + k] < 0) continue;
            const uint16_t *y = (const uint16_t *)(bl->crecv + bl->pos[(int64_t)t * K + k] * (int64_t)m->y_row);
            float wk = w[(int64_t)t * K + k];
            for (int h = 0; h < H; h++) acc[h] += wk * bf2f(y[h]);
        }
        uint16_t *dst = out + (int64_t)t * H;
        for (int h = 0; h < H; h++) dst[h] = f2bf(acc[h]);
    }
}

static void bl_dispatch(bm_t *m)
{
    if (m->ll)
        bl_ll_dispatch(m);
    else
        bl_ht_dispatch(m);
}

static void bl_combine(bm_t *m)
{
    if (m->ll)
        bl_ll_combine(m);
    else
        bl_ht_combine(m);
}
#endif

/* ---- Setup -------------------------------------------------------------------------------- */

/* The conversions above must agree bit for bit with the library's. */
static int64_t check_conversions(bm_t *m)
{
    int64_t bad = 0;
    for (int i = 0; i < 256; i++) m->fp8_tab[i] = epx_fp8_e4m3_to_float((uint8_t)i);
    rng_t r = {key4(SEED, 7, 7, 7)};
    for (int i = 0; i < 1 << 20; i++) {
        uint32_t u = (uint32_t)rng_next(&r);
        if (i < 65536) u = (uint32_t)i << 16 | (u & 0xffff); /* every exponent, sign */
        float f;
        memcpy(&f, &u, 4);
        if (isnan(f)) continue;
        bad += f2bf(f) != epx_float_to_bf16(f);
        bad += f2fp8(f) != epx_float_to_fp8_e4m3(f);
    }
    for (int i = 0; i < 65536; i++) {
        uint16_t v = (uint16_t)i;
        float a = bf2f(v), e = epx_bf16_to_float(v);
        bad += !isnan(a) && memcmp(&a, &e, 4) != 0;
    }
    return bad;
}

static void alloc_outputs(bm_t *m)
{
    int K = m->K, L = m->L, S = m->S;
    int ncont = m->b->mpi ? 2 : 1;
    for (int c = 0; c < 2; c++) { /* the layout reference is used even without a baseline */
        layout_out_t *lo = &m->lay[c];
        lo->per_rank = xmalloc(m, sizeof(int32_t) * (size_t)m->R);
        lo->per_expert = xmalloc(m, sizeof(int32_t) * (size_t)m->E);
        lo->in_rank = xmalloc(m, (size_t)m->T * m->R);
    }
    for (int c = 0; c < ncont; c++) {
        m->cout[c] = xmalloc(m, (size_t)m->T * m->y_row);
        if (m->ll) {
            ll_out_t *o = &m->llo[c];
            o->x = xmalloc(m, (size_t)m->cap * m->row);
            o->xs = m->fp8 ? xmalloc(m, sizeof(float) * (size_t)m->cap * S) : NULL;
            o->count = xmalloc(m, sizeof(int32_t) * (size_t)L);
            o->src_rank = xmalloc(m, sizeof(int32_t) * (size_t)m->cap);
            o->src_token = xmalloc(m, sizeof(int32_t) * (size_t)m->cap);
        } else {
            ht_out_t *o = &m->ht[c];
            o->x = xmalloc(m, (size_t)m->cap * m->row);
            o->xs = m->fp8 ? xmalloc(m, sizeof(float) * (size_t)m->cap * S) : NULL;
            o->idx = xmalloc(m, sizeof(int64_t) * (size_t)m->cap * K);
            o->w = xmalloc(m, sizeof(float) * (size_t)m->cap * K);
            o->src_rank = xmalloc(m, sizeof(int32_t) * (size_t)m->cap);
            o->src_token = xmalloc(m, sizeof(int32_t) * (size_t)m->cap);
            o->per_expert = xmalloc(m, sizeof(int32_t) * (size_t)L);
        }
    }
}

static void free_outputs(bm_t *m)
{
    for (int c = 0; c < 2; c++) {
        free(m->lay[c].per_rank), free(m->lay[c].per_expert), free(m->lay[c].in_rank);
        free(m->cout[c]);
        ll_out_t *l = &m->llo[c];
        free(l->x), free(l->xs), free(l->count), free(l->src_rank), free(l->src_token);
        ht_out_t *h = &m->ht[c];
        free(h->x), free(h->xs), free(h->idx), free(h->w), free(h->src_rank), free(h->src_token), free(h->per_expert);
    }
}

/* Poison contender c's outputs of one op (0 layout, 1 dispatch, 2 combine). */
static void poison(bm_t *m, int c, int op)
{
    if (op == 0) {
        memset(m->lay[c].per_rank, 0xA5, sizeof(int32_t) * (size_t)m->R);
        memset(m->lay[c].per_expert, 0xA5, sizeof(int32_t) * (size_t)m->E);
        memset(m->lay[c].in_rank, 0xA5, (size_t)m->T * m->R);
    } else if (op == 2) {
        memset(m->cout[c], 0xA5, (size_t)m->T * m->y_row);
    } else if (m->ll) {
        ll_out_t *o = &m->llo[c];
        memset(o->x, 0xA5, (size_t)m->cap * m->row);
        if (o->xs) memset(o->xs, 0xA5, sizeof(float) * (size_t)m->cap * m->S);
        memset(o->count, 0xA5, sizeof(int32_t) * (size_t)m->L);
        memset(o->src_rank, 0xA5, sizeof(int32_t) * (size_t)m->cap);
        memset(o->src_token, 0xA5, sizeof(int32_t) * (size_t)m->cap);
    } else {
        ht_out_t *o = &m->ht[c];
        memset(o->x, 0xA5, (size_t)m->cap * m->row);
        if (o->xs) memset(o->xs, 0xA5, sizeof(float) * (size_t)m->cap * m->S);
        memset(o->idx, 0xA5, sizeof(int64_t) * (size_t)m->cap * m->K);
        memset(o->w, 0xA5, sizeof(float) * (size_t)m->cap * m->K);
        memset(o->src_rank, 0xA5, sizeof(int32_t) * (size_t)m->cap);
        memset(o->src_token, 0xA5, sizeof(int32_t) * (size_t)m->cap);
        memset(o->per_expert, 0xA5, sizeof(int32_t) * (size_t)m->L);
        o->n = -1;
    }
}

#ifdef EPX_HAVE_MPI
static void mpi_barrier(void) { MPI_Barrier(MPI_COMM_WORLD); }
#endif

/* ---- The run ------------------------------------------------------------------------------ */

enum { OP_LAYOUT, OP_DISPATCH, OP_COMBINE, NOPS };
static const char *const op_name[NOPS] = {"layout", "dispatch", "combine"};

int bench_moe(bench_ctx_t *b)
{
    const bench_opts_t *o = &b->opt;
    bm_t mm = {0}, *m = &mm;
    m->b = b;
    m->R = b->nranks, m->me = b->rank, m->T = o->tokens, m->H = o->hidden, m->K = o->topk, m->E = o->experts;
    m->ll = !strcmp(o->mode, "ll");
    m->fp8 = !strcmp(o->dtype, "fp8");
    m->reg = !o->unregistered;
    if (m->E % m->R != 0 || m->K > m->E || m->K > EPX_MOE_MAX_TOPK) {
        if (b->rank == 0)
            fprintf(stderr, "epx-bench moe: need experts (%d) a multiple of ranks (%d) and topk (%d) <= min(experts, %d)\n",
                    m->E, m->R, m->K, EPX_MOE_MAX_TOPK);
        return 2;
    }
    m->L = m->E / m->R;
    m->S = (m->H + SCALE_BLOCK - 1) / SCALE_BLOCK;
    m->in_row = (size_t)m->H * (m->fp8 && !m->ll ? 1 : 2);
    m->row = (size_t)m->H * (m->fp8 ? 1 : 2);
    m->wire_row = m->row + (m->fp8 ? sizeof(float) * (size_t)m->S : 0);
    m->y_row = (size_t)m->H * 2;
    m->RT = (int64_t)m->R * m->T;
    int R = m->R, T = m->T, K = m->K;

    int64_t conv_bad = check_conversions(m);
    if (conv_bad) {
        fprintf(stderr, "epx-bench moe: rank %d: %" PRId64 " conversions differ from the library's\n", b->rank, conv_bad);
        return 1;
    }

    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = m->H;
    cfg.max_tokens_per_rank = T;
    cfg.num_experts = m->E;
    cfg.max_topk = K;
    cfg.dtype = m->fp8 && !m->ll ? EPX_FP8_E4M3 : EPX_BF16;
    cfg.combine_dtype = EPX_BF16;
    cfg.index_dtype = EPX_I64;
    cfg.mode = m->ll ? EPX_MOE_LOW_LATENCY : EPX_MOE_HIGH_THROUGHPUT;
    cfg.ll_fp8 = m->ll && m->fp8;
    cfg.scale_format = EPX_SCALE_F32;
    epx_status_t st = epx_moe_create(b->comm, &cfg, &m->moe);
    if (st != EPX_SUCCESS) bench_die(b, "epx_moe_create", st);
    if (m->ll) {
        m->cap = (int64_t)m->L * m->RT;
    } else {
        st = epx_moe_max_recv_tokens(m->moe, &m->cap);
        if (st != EPX_SUCCESS) bench_die(b, "epx_moe_max_recv_tokens", st);
    }

    /* Routing and inputs. */
    double t_setup = bench_now_us();
    gen_routing(m, o->skew);
    int64_t rows, link_rows;
    count_rows(m, m->me, &rows, &link_rows);
    m->n_exp = rows;
    m->x = buf_alloc(m, (size_t)T * m->in_row);
    m->xs = m->fp8 && !m->ll ? buf_alloc(m, sizeof(float) * (size_t)T * m->S) : NULL;
    for (int t = 0; t < T; t++)
        gen_row(m, m->me, t, m->x + (int64_t)t * m->in_row, m->xs ? m->xs + (int64_t)t * m->S : NULL);
    m->idx = xmalloc(m, sizeof(int64_t) * (size_t)T * K);
    for (int64_t i = 0; i < (int64_t)T * K; i++) m->idx[i] = m->topk[tk(m, m->me, 0) + i];
    m->y = buf_alloc(m, (size_t)m->cap * m->y_row);
    alloc_outputs(m);
#ifdef EPX_HAVE_MPI
    if (b->mpi) bl_init(m);
#endif
    int ncs = b->mpi ? 2 : 1;
    double rows_mean = bench_sum(b, (double)rows) / R, rows_max = bench_max(b, (double)rows);
    double link_mean = bench_sum(b, (double)link_rows) / R;

    if (b->rank == 0) {
        printf("# epx-bench moe: backend %s, %d ranks, mode %s, %s tokens (combine bf16), T=%d H=%d K=%d E=%d (%d per "
               "rank), %s routing, %d iterations (median, max over ranks), %d warm-up, %s x/y; baseline %s\n",
               o->backend, R, m->ll ? "ll (low-latency)" : "ht (high-throughput)",
               m->fp8 ? (m->ll ? "bf16 -> fp8 e4m3 (ll_fp8, f32 scales)" : "fp8 e4m3 + f32 scales") : "bf16", T, m->H,
               K, m->E, m->L, o->skew > 0 ? "zipf" : "uniform", o->iters, o->warmup,
               m->reg ? "registered" : "malloc",
               b->mpi ? "MPI_Alltoallv (pack, MPI_Alltoall of counts, MPI_Alltoallv, unpack; layout: a C loop)"
                      : "none");
        if (o->skew > 0) printf("# zipf exponent %.3g over a fixed random permutation of the experts\n", o->skew);
        printf("# rows received per rank: mean %.1f, max %.0f (link: mean %.1f); bytes per row: dispatch %zu, "
               "combine %zu; GB/s = mean bytes per rank / time; setup %.1f s\n",
               rows_mean, rows_max, link_mean, m->wire_row, m->y_row, (bench_now_us() - t_setup) / 1e6);
        fflush(stdout);
    }

    /* Checked runs on poisoned outputs. */
    int64_t wrong[2][NOPS] = {{0}}, diff[NOPS] = {0};
    layout_out_t *ref = &m->lay[1];
    ref_layout(m, ref); /* the reference the epx layout is checked with */
    if (o->check) {
        poison(m, 0, OP_LAYOUT);
        epx_layout(m, &m->lay[0]);
        wrong[0][OP_LAYOUT] = check_layout(m, &m->lay[0], ref);
    }
    if (o->check) poison(m, 0, OP_DISPATCH);
    epx_moe_handle_t h = epx_dispatch(m);
#ifdef EPX_HAVE_MPI
    if (b->mpi) {
        if (o->check) poison(m, 1, OP_DISPATCH);
        bl_dispatch(m);
    }
#endif
    if (o->check) {
        if (m->ll) {
            wrong[0][OP_DISPATCH] = check_ll_dispatch(m, &m->llo[0], b->mpi ? &m->llo[1] : NULL, &diff[OP_DISPATCH]);
            if (b->mpi) wrong[1][OP_DISPATCH] = check_ll_dispatch(m, &m->llo[1], NULL, NULL);
        } else {
            wrong[0][OP_DISPATCH] = check_ht_dispatch(m, &m->ht[0], b->mpi ? &m->ht[1] : NULL, &diff[OP_DISPATCH]);
            if (b->mpi) wrong[1][OP_DISPATCH] = check_ht_dispatch(m, &m->ht[1], NULL, NULL);
        }
    }
    make_y(m);
    if (o->check) poison(m, 0, OP_COMBINE);
    epx_combine(m, h);
    epx_moe_handle_destroy(h);
#ifdef EPX_HAVE_MPI
    if (b->mpi) {
        if (o->check) poison(m, 1, OP_COMBINE);
        bl_combine(m);
    }
#endif
    if (o->check) {
        uint16_t *want = xmalloc(m, (size_t)T * m->y_row);
        expected_combine(m, want);
        size_t n = (size_t)T * m->H;
        wrong[0][OP_COMBINE] = cmp_elems(m->cout[0], want, b->mpi ? m->cout[1] : NULL, n, 2, &diff[OP_COMBINE]);
        if (b->mpi) wrong[1][OP_COMBINE] = cmp_elems(m->cout[1], want, NULL, n, 2, NULL);
        free(want);
    }

    /* Warm-up and timed iterations, alternating epx and the baseline. */
    int iters = o->iters;
    double *tm = xmalloc(m, sizeof(double) * (size_t)iters * 2 * NOPS);
#define TM(c, op, i) tm[((c) * NOPS + (op)) * iters + (i)]
    for (int i = -o->warmup; i < iters; i++) {
        double t0, t1;
        for (int c = 0; c < ncs; c++) {
            /* layout (local) */
            t0 = bench_now_us();
            if (c == 0)
                epx_layout(m, &m->lay[0]);
            else
                ref_layout(m, &m->lay[1]);
            t1 = bench_now_us();
            if (i >= 0) TM(c, OP_LAYOUT, i) = t1 - t0;
            if (c == 0) {
                bench_barrier(b);
                t0 = bench_now_us();
                h = epx_dispatch(m);
                t1 = bench_now_us();
                if (i >= 0) TM(0, OP_DISPATCH, i) = t1 - t0;
                bench_barrier(b);
                t0 = bench_now_us();
                epx_combine(m, h);
                t1 = bench_now_us();
                if (i >= 0) TM(0, OP_COMBINE, i) = t1 - t0;
                epx_moe_handle_destroy(h);
            }
#ifdef EPX_HAVE_MPI
            else {
                mpi_barrier();
                t0 = bench_now_us();
                bl_dispatch(m);
                t1 = bench_now_us();
                if (i >= 0) TM(1, OP_DISPATCH, i) = t1 - t0;
                mpi_barrier();
                t0 = bench_now_us();
                bl_combine(m);
                t1 = bench_now_us();
                if (i >= 0) TM(1, OP_COMBINE, i) = t1 - t0;
            }
#endif
        }
    }
    double med[2][NOPS] = {{0}};
    for (int c = 0; c < ncs; c++)
        for (int op = 0; op < NOPS; op++) med[c][op] = bench_median(&TM(c, op, 0), iters);
#undef TM
    free(tm);

    /* Results: max over ranks of the medians; bytes as the mean per rank. */
    double time_us[2][NOPS] = {{0}}, wrong_all[2][NOPS] = {{0}}, diff_all[NOPS] = {0};
    for (int op = 0; op < NOPS; op++) {
        for (int c = 0; c < ncs; c++) {
            time_us[c][op] = bench_max(b, med[c][op]);
            wrong_all[c][op] = bench_sum(b, (double)wrong[c][op]);
        }
        diff_all[op] = bench_sum(b, (double)diff[op]);
    }
    double logical[NOPS] = {0, rows_mean * (double)m->wire_row, rows_mean * (double)m->y_row};
    double link[NOPS] = {0, link_mean * (double)m->wire_row, link_mean * (double)m->y_row};
    int any_wrong = 0;
    for (int op = 0; op < NOPS; op++)
        any_wrong |= wrong_all[0][op] > 0 || wrong_all[1][op] > 0 || diff_all[op] > 0;

    if (b->rank == 0) {
        FILE *json = NULL;
        if (o->json && !(json = fopen(o->json, "w"))) perror(o->json);
        printf("# %-9s %10s %12s %10s %7s", "op", "time_us", "logical_GB/s", "link_GB/s", "#wrong");
        if (b->mpi) printf(" | %11s %7s %8s", "baseline_us", "#wrong", "speedup");
        printf("\n");
        if (json) fprintf(json, "[");
        for (int op = 0; op < NOPS; op++) {
            double t = time_us[0][op], bt = time_us[1][op];
            double lg = t > 0 ? logical[op] / t / 1e3 : 0, lk = t > 0 ? link[op] / t / 1e3 : 0;
            double speedup = b->mpi && t > 0 ? bt / t : 0;
            if (op == OP_LAYOUT)
                printf("  %-9s %10.2f %12s %10s %7.0f", op_name[op], t, "-", "-", wrong_all[0][op]);
            else
                printf("  %-9s %10.2f %12.3f %10.3f %7.0f", op_name[op], t, lg, lk, wrong_all[0][op]);
            if (b->mpi) printf(" | %11.2f %7.0f %7.2fx", bt, wrong_all[1][op], speedup);
            printf("\n");
            if (json)
                fprintf(json,
                        "%s\n  {\"op\": \"%s\", \"mode\": \"%s\", \"dtype\": \"%s\", \"backend\": \"%s\", \"ranks\": %d, "
                        "\"tokens\": %d, \"hidden\": %d, \"topk\": %d, \"experts\": %d, \"skew\": %g, "
                        "\"registered\": %s, \"iters\": %d, \"time_us\": %.3f, \"logical_bytes\": %.0f, "
                        "\"link_bytes\": %.0f, \"logical_gbs\": %.4f, \"link_gbs\": %.4f, \"wrong\": %.0f, "
                        "\"diff_vs_baseline\": %.0f, \"baseline\": \"%s\", \"baseline_time_us\": %.3f, "
                        "\"baseline_wrong\": %.0f, \"speedup\": %.4f}",
                        op ? "," : "", op_name[op], m->ll ? "ll" : "ht", m->fp8 ? "fp8" : "bf16", o->backend, R, T,
                        m->H, K, m->E, o->skew, m->reg ? "true" : "false", iters, t, logical[op], link[op], lg, lk,
                        wrong_all[0][op], diff_all[op],
                        b->mpi ? (op == OP_LAYOUT ? "c_loop" : "MPI_Alltoallv") : "none", b->mpi ? bt : 0.0,
                        wrong_all[1][op], speedup);
        }
        if (json) {
            fprintf(json, "\n]\n");
            fclose(json);
        }
        if (b->mpi && (diff_all[OP_DISPATCH] > 0 || diff_all[OP_COMBINE] > 0))
            printf("# epx and the baseline differ in %.0f dispatch and %.0f combine values (counted in epx's #wrong)\n",
                   diff_all[OP_DISPATCH], diff_all[OP_COMBINE]);
        if (any_wrong) printf("# FAILED: wrong values found\n");
        fflush(stdout);
    }

#ifdef EPX_HAVE_MPI
    if (b->mpi) bl_free(m);
#endif
    free_outputs(m);
    buf_free(m, m->x);
    if (m->xs) buf_free(m, m->xs);
    buf_free(m, m->y);
    free(m->idx);
    free(m->topk);
    free(m->w);
    free(m->dest);
    epx_moe_destroy(m->moe);
    return any_wrong ? 1 : 0;
}
