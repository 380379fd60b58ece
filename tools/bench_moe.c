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
#include "bench_moe_common.h"

#define SCALE_BLOCK BENCH_MOE_SCALE_BLOCK

/* The baseline's sums get an AVX2 clone next to the default one, as epx's own sums do
 * (src/core/core.h), so that both sides of a comparison use the same instruction set. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define BL_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define BL_MULTIVERSION
#endif

/* ---- The benchmark's state ------------------------------------------------------------- */

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
    bench_moe_data_t d; /* sizes, flags and every rank's routing (bench_moe_common.h) */
    bool reg;
    size_t in_row;   /* bytes of one row of x as passed to dispatch */
    size_t row;      /* bytes of one received row's elements: H of FP8 or of the tokens' dtype */
    size_t wire_row; /* row + its scale bytes */
    size_t y_row;    /* one row of the combine dtype (d.cdt): H elements */
    int64_t cap;     /* ht: rows of the dispatch outputs; ll: L * R * T slots */
    int64_t RT;      /* ll: slots per local expert, R * T */
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

static void *xalloc(void *m, size_t bytes) { return xmalloc((bm_t *)m, bytes); }

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

/* ---- Checking ----------------------------------------------------------------------------- */

static void make_y(bm_t *m)
{
    if (m->d.ll) {
        bench_moe_ll_make_y(&m->d, &m->llo[0], m->RT, m->row, m->y, m->y_row);
    } else {
        const ht_out_t *a = &m->ht[0];
        int64_t n = a->n < 0 ? 0 : a->n > m->cap ? m->cap : a->n;
        float mu = mult_of(m->d.me);
        for (int64_t i = 0; i < n; i++) {
            const float *sc = m->d.fp8 ? a->xs + i * m->d.S : NULL;
            bench_moe_make_y_row(&m->d, a->x + i * (int64_t)m->row, sc, mu, m->y + i * (int64_t)m->y_row);
        }
    }
}

/* ---- The contenders ------------------------------------------------------------------------ */

static void epx_layout(bm_t *m, layout_out_t *o)
{
    epx_status_t st = epx_moe_layout(m->moe, m->idx, m->d.T, m->d.K, o->per_rank, o->per_expert, o->in_rank, NULL);
    if (st != EPX_SUCCESS) bench_die(m->b, "epx_moe_layout", st);
}

static epx_moe_handle_t epx_dispatch(bm_t *m)
{
    epx_moe_handle_t h = NULL;
    epx_status_t st;
    if (m->d.ll) {
        ll_out_t *a = &m->llo[0];
        epx_moe_ll_dispatch_in_t in = {m->x, m->idx, m->d.T, m->d.K};
        epx_moe_ll_dispatch_out_t out = {a->x, m->d.fp8 ? (void *)a->xs : NULL, a->count, a->src_rank, a->src_token};
        st = epx_moe_ll_dispatch(m->moe, &in, &out, &h, NULL);
        if (st != EPX_SUCCESS) bench_die(m->b, "epx_moe_ll_dispatch", st);
    } else {
        ht_out_t *a = &m->ht[0];
        epx_moe_dispatch_in_t in = {m->x, m->d.fp8 ? m->xs : NULL, m->idx, m->d.w + tk(&m->d, m->d.me, 0), m->d.T, m->d.K};
        epx_moe_dispatch_out_t out = {a->x, m->d.fp8 ? a->xs : NULL, a->idx, a->w, a->src_rank, a->src_token,
                                      a->per_expert, m->cap, -1, NULL};
        st = epx_moe_dispatch(m->moe, &in, &out, &h, NULL);
        if (st != EPX_SUCCESS) bench_die(m->b, "epx_moe_dispatch", st);
        a->n = out.num_recv_tokens;
    }
    return h;
}

static void epx_combine(bm_t *m, epx_moe_handle_t h)
{
    epx_status_t st;
    if (m->d.ll) {
        epx_moe_ll_combine_in_t in = {m->y, m->d.w + tk(&m->d, m->d.me, 0)};
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
    int R = m->d.R, T = m->d.T, K = m->d.K, L = m->d.L, S = m->d.S;
    int64_t maxsend, maxrecv;
    if (m->d.ll) {
        maxsend = (int64_t)T * K;
        maxrecv = (int64_t)R * T * (K < L ? K : L);
    } else {
        maxsend = (int64_t)T * (K < R ? K : R);
        maxrecv = m->cap;
    }
    int meta_ints = m->d.ll ? 1 : 1 + 2 * K;
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
    bl->acc = xmalloc(m, 2 * sizeof(float) * (size_t)m->d.H); /* the sum, then (ll) a rank's part */
    if (m->d.ll) {
        bl->recvx = xmalloc(m, (size_t)maxrecv * m->row);
        bl->recvs = xmalloc(m, sizeof(float) * (size_t)maxrecv * S);
        bl->csend = xmalloc(m, (size_t)maxrecv * m->y_row);
        bl->cnt_send = xmalloc(m, sizeof(int) * (size_t)R * L);
        bl->cnt_recv = xmalloc(m, sizeof(int) * (size_t)R * L);
        bl->slotoff = xmalloc(m, sizeof(int) * (size_t)R * L);
        bl->pos = xmalloc(m, sizeof(int64_t) * (size_t)T * K);
        if (m->d.fp8) {
            bl->qx = xmalloc(m, (size_t)T * m->d.H);
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
    int R = m->d.R, T = m->d.T, K = m->d.K, L = m->d.L, S = m->d.S, MI = 1 + 2 * K;
    const float *w = m->d.w + tk(&m->d, m->d.me, 0);
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
            if (m->d.fp8) memcpy(bl->sends + j * S, m->xs + (int64_t)t * S, sizeof(float) * (size_t)S);
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
    if (m->d.fp8)
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
 * then each token's rows are summed in float32 in ascending rank order, rounded to the
 * combine dtype. */
BL_MULTIVERSION static void bl_ht_combine(bm_t *m)
{
    baseline_t *bl = &m->bl;
    int R = m->d.R, H = m->d.H;
    mpi_ok(m, MPI_Alltoallv(m->y, bl->rcount, bl->rdispl, bl->y_t, bl->crecv, bl->scount, bl->sdispl, bl->y_t,
                            MPI_COMM_WORLD), "MPI_Alltoallv");
    memcpy(bl->cur, bl->sdispl, sizeof(int) * (size_t)R);
    float *acc = bl->acc;
    epx_dtype_t cdt = m->d.cdt;
    for (int t = 0; t < m->d.T; t++) {
        const uint8_t *f = bl->in + (int64_t)t * R;
        for (int h = 0; h < H; h++) acc[h] = 0.0f;
        for (int r = 0; r < R; r++) {
            if (!f[r]) continue;
            dt_axpy_row(cdt, acc, 1.0f, bl->crecv + (int64_t)bl->cur[r]++ * m->y_row, H);
        }
        dt_store_row(cdt, m->cout[1] + (int64_t)t * m->y_row, acc, H);
    }
}

/* Low-latency dispatch: one row per (token, expert), packed by (destination rank, local
 * expert, token); counts per (rank, expert) by MPI_Alltoall; rows (scales) and token ids
 * by MPI_Alltoallv; unpacked into the expert-major slots (source rank, then token order). */
static void bl_ll_dispatch(bm_t *m)
{
    baseline_t *bl = &m->bl;
    ll_out_t *o = &m->llo[1];
    int R = m->d.R, T = m->d.T, K = m->d.K, L = m->d.L, S = m->d.S, RL = R * L;
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
    if (m->d.fp8) {
        for (int t = 0; t < T; t++)
            bench_moe_quantize_row(&m->d, (const uint16_t *)(m->x + (int64_t)t * m->in_row), bl->qx + (int64_t)t * m->d.H,
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
    if (m->d.fp8)
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
                if (m->d.fp8) memcpy(o->xs + slot * S, bl->recvs + j * S, sizeof(float) * (size_t)S);
                o->src_rank[slot] = s;
                o->src_token[slot] = bl->rmeta[j];
            }
    }
    for (int l = 0; l < L; l++)
        for (int64_t i = o->count[l]; i < RT; i++) o->src_rank[l * RT + i] = o->src_token[l * RT + i] = -1;
}

/* Low-latency combine: the y rows of every slot go back to their source, packed in the
 * order it sent them; there out[t] = over the ranks ascending, the sum of each rank's
 * w[t,k] * y over its k ascending (float32; the library's order, epx.h), rounded to the
 * combine dtype. */
BL_MULTIVERSION static void bl_ll_combine(bm_t *m)
{
    baseline_t *bl = &m->bl;
    int R = m->d.R, L = m->d.L, H = m->d.H, K = m->d.K;
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
    const float *w = m->d.w + tk(&m->d, m->d.me, 0);
    epx_dtype_t cdt = m->d.cdt;
    float *part = acc + H;
    for (int t = 0; t < m->d.T; t++) {
        for (int h = 0; h < H; h++) acc[h] = 0.0f;
        for (int r = 0; r < R; r++) {
            bool any = false;
            for (int k = 0; k < K; k++) {
                int64_t e = m->idx[(int64_t)t * K + k];
                if (e < 0 || e / L != r) continue;
                if (!any)
                    for (int h = 0; h < H; h++) part[h] = 0.0f;
                any = true;
                const uint8_t *y = bl->crecv + bl->pos[(int64_t)t * K + k] * (int64_t)m->y_row;
                dt_axpy_row(cdt, part, w[(int64_t)t * K + k], y, H);
            }
            for (int h = 0; any && h < H; h++) acc[h] += part[h];
        }
        dt_store_row(cdt, m->cout[1] + (int64_t)t * m->y_row, acc, H);
    }
}

static void bl_dispatch(bm_t *m)
{
    if (m->d.ll)
        bl_ll_dispatch(m);
    else
        bl_ht_dispatch(m);
}

static void bl_combine(bm_t *m)
{
    if (m->d.ll)
        bl_ll_combine(m);
    else
        bl_ht_combine(m);
}
#endif

/* ---- Setup -------------------------------------------------------------------------------- */

static void alloc_outputs(bm_t *m)
{
    int K = m->d.K, L = m->d.L, S = m->d.S;
    int ncont = m->b->mpi ? 2 : 1;
    for (int c = 0; c < 2; c++) { /* the layout reference is used even without a baseline */
        layout_out_t *lo = &m->lay[c];
        lo->per_rank = xmalloc(m, sizeof(int32_t) * (size_t)m->d.R);
        lo->per_expert = xmalloc(m, sizeof(int32_t) * (size_t)m->d.E);
        lo->in_rank = xmalloc(m, (size_t)m->d.T * m->d.R);
    }
    for (int c = 0; c < ncont; c++) {
        m->cout[c] = xmalloc(m, (size_t)m->d.T * m->y_row);
        if (m->d.ll) {
            ll_out_t *o = &m->llo[c];
            o->x = xmalloc(m, (size_t)m->cap * m->row);
            o->xs = m->d.fp8 ? xmalloc(m, sizeof(float) * (size_t)m->cap * S) : NULL;
            o->count = xmalloc(m, sizeof(int32_t) * (size_t)L);
            o->src_rank = xmalloc(m, sizeof(int32_t) * (size_t)m->cap);
            o->src_token = xmalloc(m, sizeof(int32_t) * (size_t)m->cap);
        } else {
            ht_out_t *o = &m->ht[c];
            o->x = xmalloc(m, (size_t)m->cap * m->row);
            o->xs = m->d.fp8 ? xmalloc(m, sizeof(float) * (size_t)m->cap * S) : NULL;
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
        memset(m->lay[c].per_rank, 0xA5, sizeof(int32_t) * (size_t)m->d.R);
        memset(m->lay[c].per_expert, 0xA5, sizeof(int32_t) * (size_t)m->d.E);
        memset(m->lay[c].in_rank, 0xA5, (size_t)m->d.T * m->d.R);
    } else if (op == 2) {
        memset(m->cout[c], 0xA5, (size_t)m->d.T * m->y_row);
    } else if (m->d.ll) {
        ll_out_t *o = &m->llo[c];
        memset(o->x, 0xA5, (size_t)m->cap * m->row);
        if (o->xs) memset(o->xs, 0xA5, sizeof(float) * (size_t)m->cap * m->d.S);
        memset(o->count, 0xA5, sizeof(int32_t) * (size_t)m->d.L);
        memset(o->src_rank, 0xA5, sizeof(int32_t) * (size_t)m->cap);
        memset(o->src_token, 0xA5, sizeof(int32_t) * (size_t)m->cap);
    } else {
        ht_out_t *o = &m->ht[c];
        memset(o->x, 0xA5, (size_t)m->cap * m->row);
        if (o->xs) memset(o->xs, 0xA5, sizeof(float) * (size_t)m->cap * m->d.S);
        memset(o->idx, 0xA5, sizeof(int64_t) * (size_t)m->cap * m->d.K);
        memset(o->w, 0xA5, sizeof(float) * (size_t)m->cap * m->d.K);
        memset(o->src_rank, 0xA5, sizeof(int32_t) * (size_t)m->cap);
        memset(o->src_token, 0xA5, sizeof(int32_t) * (size_t)m->cap);
        memset(o->per_expert, 0xA5, sizeof(int32_t) * (size_t)m->d.L);
        o->n = -1;
    }
}

#ifdef EPX_HAVE_MPI
static void mpi_barrier(void) { MPI_Barrier(MPI_COMM_WORLD); }
#endif

/* One round of each op and contender on poisoned outputs, checked (with -c 1; without,
 * the round still runs: the baseline's combine needs its dispatch, y epx's): adds the wrong
 * values and the differences between the contenders. */
static void checked_round(bm_t *m, int64_t wrong[2][NOPS], int64_t diff[NOPS])
{
    bench_ctx_t *b = m->b;
    const bench_opts_t *o = &b->opt;
    int T = m->d.T;
    layout_out_t *ref = &m->lay[1];
    bench_moe_ref_layout(&m->d, m->idx, ref); /* the reference the epx layout is checked with */
    if (o->check) {
        poison(m, 0, OP_LAYOUT);
        epx_layout(m, &m->lay[0]);
        wrong[0][OP_LAYOUT] += bench_moe_check_layout(&m->d, &m->lay[0], ref, NULL, NULL);
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
        if (m->d.ll) {
            wrong[0][OP_DISPATCH] += bench_moe_check_ll_dispatch(&m->d, &m->llo[0], b->mpi ? &m->llo[1] : NULL, &diff[OP_DISPATCH], m->RT, m->row);
            if (b->mpi) wrong[1][OP_DISPATCH] += bench_moe_check_ll_dispatch(&m->d, &m->llo[1], NULL, NULL, m->RT, m->row);
        } else {
            wrong[0][OP_DISPATCH] += bench_moe_check_ht_dispatch(&m->d, &m->ht[0], b->mpi ? &m->ht[1] : NULL,
                                                                 &diff[OP_DISPATCH], m->n_exp, m->cap);
            if (b->mpi) wrong[1][OP_DISPATCH] += bench_moe_check_ht_dispatch(&m->d, &m->ht[1], NULL, NULL, m->n_exp, m->cap);
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
        uint8_t *want = xmalloc(m, (size_t)T * m->y_row);
        bench_moe_expected_combine(&m->d, want);
        size_t n = (size_t)T * m->d.H, es = epx_dtype_size(m->d.cdt);
        wrong[0][OP_COMBINE] +=
            bench_moe_cmp_elems(m->cout[0], want, b->mpi ? m->cout[1] : NULL, n, es, &diff[OP_COMBINE]);
        if (b->mpi) wrong[1][OP_COMBINE] += bench_moe_cmp_elems(m->cout[1], want, NULL, n, es, NULL);
        free(want);
    }
}

/* ---- The run ------------------------------------------------------------------------------ */

bool bench_moe_shape_ok(int experts, int ranks, int topk, bool say)
{
    bool ok = experts % ranks == 0 && topk <= experts && topk <= EPX_MOE_MAX_TOPK;
    if (!ok && say)
        fprintf(stderr, "epx-bench moe: need experts (%d) a multiple of ranks (%d) and topk (%d) <= min(experts, %d)\n",
                experts, ranks, topk, EPX_MOE_MAX_TOPK);
    return ok;
}

int bench_moe(bench_ctx_t *b)
{
    const bench_opts_t *o = &b->opt;
    bm_t mm = {0}, *m = &mm;
    m->b = b;
    m->d.alloc = xalloc, m->d.alloc_ctx = m;
    m->d.R = b->nranks, m->d.me = b->rank, m->d.T = o->tokens, m->d.H = o->hidden, m->d.K = o->topk, m->d.E = o->experts;
    m->d.ll = !strcmp(o->mode, "ll");
    bench_moe_set_dtypes(&m->d, o);
    m->reg = !o->unregistered;
    if (!bench_moe_shape_ok(m->d.E, m->d.R, m->d.K, b->rank == 0)) return 2;
    m->d.L = m->d.E / m->d.R;
    m->d.S = (m->d.H + SCALE_BLOCK - 1) / SCALE_BLOCK;
    m->in_row = (size_t)m->d.H * (m->d.fp8 && !m->d.ll ? 1 : epx_dtype_size(m->d.xdt));
    m->row = (size_t)m->d.H * row_es(&m->d);
    m->wire_row = m->row + (m->d.fp8 ? sizeof(float) * (size_t)m->d.S : 0);
    m->y_row = (size_t)m->d.H * epx_dtype_size(m->d.cdt);
    m->RT = (int64_t)m->d.R * m->d.T;
    int R = m->d.R, T = m->d.T, K = m->d.K;

    int64_t conv_bad = bench_moe_check_conversions(&m->d, 1 << 20, true);
    if (conv_bad) {
        fprintf(stderr, "epx-bench moe: rank %d: %" PRId64 " conversions differ from the library's\n", b->rank, conv_bad);
        return 1;
    }

    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = m->d.H;
    cfg.max_tokens_per_rank = T;
    cfg.num_experts = m->d.E;
    cfg.max_topk = K;
    cfg.dtype = m->d.fp8 && !m->d.ll ? EPX_FP8_E4M3 : m->d.xdt;
    cfg.combine_dtype = o->combine_dtype; /* EPX_UNSET: epx's default, which m->d.cdt is */
    cfg.index_dtype = EPX_I64;
    cfg.mode = m->d.ll ? EPX_MOE_LOW_LATENCY : EPX_MOE_HIGH_THROUGHPUT;
    cfg.ll_fp8 = m->d.ll && m->d.fp8;
    cfg.scale_format = EPX_SCALE_F32;
    epx_status_t st = epx_moe_create(b->comm, &cfg, &m->moe);
    if (st != EPX_SUCCESS) bench_die(b, "epx_moe_create", st);
    if (m->d.ll) {
        m->cap = (int64_t)m->d.L * m->RT;
    } else {
        st = epx_moe_max_recv_tokens(m->moe, &m->cap);
        if (st != EPX_SUCCESS) bench_die(b, "epx_moe_max_recv_tokens", st);
    }

    /* Routing and inputs. */
    double t_setup = bench_now_us();
    bench_moe_gen_routing(&m->d, o->skew);
    int64_t rows, link_rows;
    bench_moe_count_rows(&m->d, m->d.me, &rows, &link_rows);
    m->n_exp = rows;
    m->x = buf_alloc(m, (size_t)T * m->in_row);
    m->xs = m->d.fp8 && !m->d.ll ? buf_alloc(m, sizeof(float) * (size_t)T * m->d.S) : NULL;
    for (int t = 0; t < T; t++)
        bench_moe_gen_row(&m->d, m->d.me, t, m->x + (int64_t)t * m->in_row, m->xs ? m->xs + (int64_t)t * m->d.S : NULL);
    m->idx = xmalloc(m, sizeof(int64_t) * (size_t)T * K);
    for (int64_t i = 0; i < (int64_t)T * K; i++) m->idx[i] = m->d.topk[tk(&m->d, m->d.me, 0) + i];
    m->y = buf_alloc(m, (size_t)m->cap * m->y_row);
    alloc_outputs(m);
#ifdef EPX_HAVE_MPI
    if (b->mpi) bl_init(m);
#endif
    int ncs = b->mpi ? 2 : 1;
    double rows_mean = bench_sum(b, (double)rows) / R, rows_max = bench_max(b, (double)rows);
    double link_mean = bench_sum(b, (double)link_rows) / R;

    if (b->rank == 0) {
        printf("# epx-bench moe: backend %s, %d ranks, mode %s, %s tokens (combine %s), T=%d H=%d K=%d E=%d (%d per "
               "rank), %s routing, %d iterations (median of the max over ranks), %d warm-up, %s x/y; baseline %s\n",
               o->backend, R, m->d.ll ? "ll (low-latency)" : "ht (high-throughput)",
               m->d.fp8 ? (m->d.ll ? "bf16 -> fp8 e4m3 (ll_fp8, f32 scales)" : "fp8 e4m3 + f32 scales")
                        : epx_dtype_name(m->d.xdt),
               epx_dtype_name(m->d.cdt), T, m->d.H, K, m->d.E, m->d.L, o->skew > 0 ? "zipf" : "uniform", o->iters,
               o->warmup, m->reg ? "registered" : "malloc",
               b->mpi ? "MPI_Alltoallv (pack, MPI_Alltoall of counts, MPI_Alltoallv, unpack; layout: a C loop)"
                      : "none");
        if (o->skew > 0) printf("# zipf exponent %.3g over a fixed random permutation of the experts\n", o->skew);
        printf("# rows received per rank: mean %.1f, max %.0f (link: mean %.1f); bytes per row: dispatch %zu, "
               "combine %zu; GB/s = mean bytes per rank / time; setup %.1f s\n",
               rows_mean, rows_max, link_mean, m->wire_row, m->y_row, (bench_now_us() - t_setup) / 1e6);
        fflush(stdout);
    }

    /* Checked runs on poisoned outputs, before the timed iterations and after them (a call
     * that goes wrong, or does nothing, only after its first would pass the first). */
    int64_t wrong[2][NOPS] = {{0}}, diff[NOPS] = {0};
    checked_round(m, wrong, diff);
    epx_moe_handle_t h;

    /* Warm-up and timed iterations, alternating epx and the baseline. */
    int iters = o->iters;
    double *tm = xmalloc(m, sizeof(double) * (size_t)iters * 2 * NOPS);
#define TM(c, op, i) tm[((c) * NOPS + (op)) * iters + (i)]
    for (int i = -o->warmup; i < iters; i++) {
        double t0, t1;
        for (int c = 0; c < ncs; c++) {
            /* layout (local), each contender timed on its second run, its inputs and outputs
             * in cache as after the gate that made the routing (else whichever ran first
             * paid the other's misses: 6.4 against 1.5 us for epx at T=32) */
            for (int rep = 0; rep < 2; rep++) {
                t0 = bench_now_us();
                if (c == 0)
                    epx_layout(m, &m->lay[0]);
                else
                    bench_moe_ref_layout(&m->d, m->idx, &m->lay[1]);
                t1 = bench_now_us();
            }
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
        for (int op = 0; op < NOPS; op++) med[c][op] = bench_median_of_max(b, &TM(c, op, 0), iters);
#undef TM
    free(tm);
    if (o->check) checked_round(m, wrong, diff);

    /* Results: median over the iterations of the max over ranks; bytes as the mean per rank. */
    bench_moe_report_t rep = {0};
    int any_wrong = bench_moe_gather(b, &rep, med, wrong, diff, ncs, rows_mean, link_mean, m->wire_row, m->y_row);

    if (b->rank == 0) {
        rep.mode = m->d.ll ? "ll" : "ht", rep.dtype = bench_dtype_name(o->dtype), rep.backend = o->backend;
        rep.combine_dtype = epx_dtype_name(m->d.cdt);
        rep.ranks = R, rep.gpus = -1, rep.tokens = T, rep.hidden = m->d.H, rep.topk = K, rep.experts = m->d.E;
        rep.skew = o->skew, rep.registered = m->reg, rep.iters = iters, rep.warmup = -1, rep.timing = NULL;
        rep.checked = -1, rep.baseline = b->mpi, rep.baseline_layout = "c_loop", rep.baseline_moe = "MPI_Alltoallv";
        rep.device_mem = -1;
        bench_moe_print(&rep, o->json);
        if (b->mpi && (rep.diff[OP_DISPATCH] > 0 || rep.diff[OP_COMBINE] > 0))
            printf("# epx and the baseline differ in %.0f dispatch and %.0f combine values (counted in epx's #wrong)\n",
                   rep.diff[OP_DISPATCH], rep.diff[OP_COMBINE]);
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
    free(m->d.topk);
    free(m->d.w);
    free(m->d.dest);
    epx_moe_destroy(m->moe);
    return any_wrong ? 1 : 0;
}
