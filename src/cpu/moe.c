/*
 * CPU backend: MoE dispatch and combine, high-throughput and low-latency.
 *
 * Every rank owns a *board*, a registered region with one section per operation parity.
 * An operation writes its section — the operation kind, T, K, its routing (top-k as
 * int32, weights, tokens per rank and per expert) and where its token buffers can be read
 * — then posts (the protocol of cpu.h). After acquiring every post, each rank reads the
 * boards it needs and pulls its rows straight from the sources' buffers: every byte is
 * copied once, by the rank that receives it, in parallel on all ranks. All ranks see the
 * same boards, so checks that involve several ranks (output capacity, consistent calls)
 * reach the same verdict everywhere before anything is written.
 */
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#define EPX__F16C 1 /* an F16C variant of the f16 sums, taken when the CPU has it */
#endif

#include "shm.h"

enum { EPX__OP_DISPATCH = 1, EPX__OP_CACHED, EPX__OP_COMBINE, EPX__OP_LL_DISPATCH, EPX__OP_LL_COMBINE };
static const char *const epx__op_names[] = {"?", "dispatch", "cached dispatch", "combine", "low-latency dispatch",
                                            "low-latency combine"};

/* Tokens of a combine processed together (bounds the gather scratch). */
#define EPX__CHUNK 32

typedef struct {
    int32_t op;
    int32_t num_tokens;
    int32_t topk;
    int32_t has_weights;
    uint32_t routing_id; /* the dispatch that made the handle (cached dispatch, combines) */
    int32_t pad_;
    int64_t capacity;
    epx__loc_t x, scales, y, weights;
} epx__board_hdr_t;

typedef struct {
    epx__board_hdr_t *hdr;
    int32_t *per_rank;   /* [R] tokens to each rank */
    int32_t *per_expert; /* [E] tokens to each expert */
    int32_t *topk;       /* [max_tokens, max_topk] */
    float *weights;      /* [max_tokens, max_topk] */
} epx__board_t;

struct epx__cpu_moe {
    epx__cpu_t *cpu;
    epx__moe_shape_t s;
    size_t section_bytes; /* one parity of a board */
    void *board;          /* mine: 2 sections */
    epx__loc_t *boards;   /* [R] where each rank's board is */
    int64_t *offsets;     /* scratch: [R * max_tokens] row offsets */
    int64_t *ll_ent;      /* low-latency receive: (source << 32 | token) per slot of my experts */
    size_t ll_ent_cap;
    int64_t *ll_at;       /* low-latency receive: [2 L + 1] where each local expert's entries start, and
                             the next place in each (their total may pass int32 where each fits) */
    char *scratch;        /* gather space for rows read with process_vm_readv */
    size_t scratch_bytes;
    uint8_t *ll_q;        /* low-latency FP8: my tokens quantised once, [max_tokens, H] */
    char *ll_scales;      /* and their scales, [max_tokens, scale_cols] */
    int32_t *recount;     /* scratch of epx__boards_check, epx__dispatch_home_rows and the low-latency
                             home slots: [2 * (R + E)] */
    int32_t *rank_of;     /* [E]: expert e's rank, e / L (a table: a division per id was a
                             third of a dispatch's time at small rows) */
};

struct epx__cpu_moe_handle {
    uint32_t id; /* the operation number of the dispatch that made it */
    int mode;
    int num_tokens, topk;
    int64_t rows; /* received rows (high-throughput) */
    /* High-throughput: where my tokens went, and where my rows came from. */
    int32_t *send_row;   /* [T, R]: row in rank r's output, -1 if not sent there */
    int64_t *recv_start; /* [R] first row from each source */
    int64_t *recv_count; /* [R] rows from each source */
    int32_t *recv_token; /* [rows] token index on the source */
    /* Low-latency: my routing and the slot of each (token, k). */
    int32_t *topk_idx; /* [T, K] */
    int32_t *slot;     /* [T, K]: slot in expert topk_idx's region, -1 for no expert */
};

/* ---- Boards ----------------------------------------------------------------------------- */

static size_t epx__board_section_bytes(const epx__moe_shape_t *s)
{
    size_t b = EPX__ALIGN_UP(sizeof(epx__board_hdr_t), EPX__CACHELINE);
    b += EPX__ALIGN_UP(sizeof(int32_t) * (size_t)s->nranks, EPX__CACHELINE);
    b += EPX__ALIGN_UP(sizeof(int32_t) * (size_t)s->num_experts, EPX__CACHELINE);
    b += 2 * EPX__ALIGN_UP(sizeof(int32_t) * (size_t)s->max_tokens * (size_t)s->max_topk, EPX__CACHELINE);
    return b;
}

static epx__board_t epx__board_at(const epx__cpu_moe_t *m, const char *base, uint32_t seq)
{
    const epx__moe_shape_t *s = &m->s;
    char *p = (char *)base + (seq & 1u) * m->section_bytes;
    epx__board_t b;
    b.hdr = (epx__board_hdr_t *)p;
    p += EPX__ALIGN_UP(sizeof(epx__board_hdr_t), EPX__CACHELINE);
    b.per_rank = (int32_t *)p;
    p += EPX__ALIGN_UP(sizeof(int32_t) * (size_t)s->nranks, EPX__CACHELINE);
    b.per_expert = (int32_t *)p;
    p += EPX__ALIGN_UP(sizeof(int32_t) * (size_t)s->num_experts, EPX__CACHELINE);
    b.topk = (int32_t *)p;
    p += EPX__ALIGN_UP(sizeof(int32_t) * (size_t)s->max_tokens * (size_t)s->max_topk, EPX__CACHELINE);
    b.weights = (float *)p;
    return b;
}

/* Every rank's board section of operation `seq` (after the posts were acquired). */
static epx_status_t epx__boards_read(epx__cpu_moe_t *m, uint32_t seq, epx__board_t *out, epx__errbuf_t *err)
{
    for (int p = 0; p < m->s.nranks; p++) {
        const char *base = m->board;
        if (p != m->s.rank) EPX__CHECK(epx__peer_map(m->cpu, p, &m->boards[p], seq, &base, err));
        out[p] = epx__board_at(m, base, seq);
    }
    return EPX_SUCCESS;
}

/* All ranks must be making the same call: same kind, same top-k, same routing. */
static epx_status_t epx__boards_agree(const epx__cpu_moe_t *m, const epx__board_t *b, epx__errbuf_t *err)
{
    const epx__board_hdr_t *me = b[m->s.rank].hdr;
    for (int p = 0; p < m->s.nranks; p++) {
        const epx__board_hdr_t *h = b[p].hdr;
        if (h->op != me->op)
            return epx__fail(err, EPX_ERR_MISMATCH, "rank %d called %s while rank %d called %s", p,
                             epx__op_names[h->op >= 1 && h->op <= 5 ? h->op : 0], m->s.rank, epx__op_names[me->op]);
        if (h->topk != me->topk)
            return epx__fail(err, EPX_ERR_MISMATCH, "rank %d passed topk = %d, rank %d passed %d", p, h->topk, m->s.rank,
                             me->topk);
        if (h->routing_id != me->routing_id)
            return epx__fail(err, EPX_ERR_MISMATCH,
                             "rank %d passed the handle of another dispatch than rank %d (operation %u vs %u)", p,
                             m->s.rank, h->routing_id, me->routing_id);
        if (h->has_weights != me->has_weights)
            return epx__fail(err, EPX_ERR_MISMATCH, "rank %d %s topk_weights, rank %d %s", p,
                             h->has_weights ? "passed" : "did not pass", m->s.rank, me->has_weights ? "did" : "did not");
    }
    return EPX_SUCCESS;
}

/* Every board must describe a call its rank validated: T and K within the configuration
 * and, for a dispatch, expert ids in [-1, E) with tokens per rank and per expert that
 * match them (receivers place rows by those counts). Every rank checks every board, so all
 * reach the same verdict before anything is written. O(R * T * K). */
static epx_status_t epx__boards_check(const epx__cpu_moe_t *m, const epx__board_t *b, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    int R = s->nranks, E = s->num_experts;
    int op = b[s->rank].hdr->op;
    bool routing = op == EPX__OP_DISPATCH || op == EPX__OP_LL_DISPATCH;
    for (int p = 0; p < R; p++) {
        const epx__board_t *bp = &b[p];
        int T = bp->hdr->num_tokens, K = bp->hdr->topk;
        if (T < 0 || T > s->max_tokens || K < 1 || K > s->max_topk)
            return epx__fail(err, EPX_ERR_MISMATCH,
                             "rank %d announced num_tokens = %d, topk = %d (limits %d and %d); nothing was written", p, T,
                             K, s->max_tokens, s->max_topk);
        if (!routing) continue;
        int32_t *per_rank = m->recount, *per_expert = per_rank + R, *last_r = per_expert + E, *last_e = last_r + R;
        memset(m->recount, 0, sizeof(int32_t) * 2 * ((size_t)R + (size_t)E));
        for (int64_t t = 0; t < T; t++)
            for (int k = 0; k < K; k++) {
                int32_t e = bp->topk[t * K + k];
                if (e < -1 || e >= E)
                    return epx__fail(err, EPX_ERR_MISMATCH,
                                     "rank %d announced expert id %d for its token %lld (k %d), outside [-1, %d); "
                                     "nothing was written",
                                     p, e, (long long)t, k, E);
                if (e < 0) continue;
                if (last_e[e] != t + 1) last_e[e] = (int32_t)(t + 1), per_expert[e]++;
                int32_t r = m->rank_of[e];
                if (last_r[r] != t + 1) last_r[r] = (int32_t)(t + 1), per_rank[r]++;
            }
        if (memcmp(per_rank, bp->per_rank, sizeof(int32_t) * (size_t)R) ||
            memcmp(per_expert, bp->per_expert, sizeof(int32_t) * (size_t)E))
            return epx__fail(err, EPX_ERR_MISMATCH,
                             "rank %d announced token counts that disagree with its routing; nothing was written", p);
    }
    return EPX_SUCCESS;
}

/* Does token t of a board go to rank q (high-throughput) / to expert e (low-latency)? */
static inline bool epx__goes_to_rank(const int32_t *topk, int K, int64_t t, const int32_t *rank_of, int q)
{
    for (int k = 0; k < K; k++) {
        int32_t e = topk[t * K + k];
        if (e >= 0 && rank_of[e] == q) return true;
    }
    return false;
}

static epx_status_t epx__scratch(epx__cpu_moe_t *m, size_t bytes, epx__errbuf_t *err)
{
    if (m->scratch_bytes >= bytes) return EPX_SUCCESS;
    free(m->scratch);
    m->scratch = malloc(bytes);
    m->scratch_bytes = m->scratch ? bytes : 0;
    return m->scratch ? EPX_SUCCESS : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory (%zu bytes of scratch)", bytes);
}

/* ---- Create / destroy ------------------------------------------------------------------- */

epx_status_t epx__cpu_moe_create(epx__cpu_t *c, const epx__moe_shape_t *shape, uint64_t config_hash,
                                 epx_status_t local_status, epx__cpu_moe_t **out, epx__errbuf_t *err)
{
    int R = c->nranks;
    epx_status_t st = EPX_SUCCESS;
    epx__cpu_moe_t *m = calloc(1, sizeof *m);
    struct card {
        uint64_t hash;
        epx__loc_t board;
    } *cards = calloc(2 * (size_t)R, sizeof *cards);
    int64_t *counts = calloc(2 * (size_t)R, sizeof *counts);
    if (!m || !cards || !counts) {
        free(m), free(cards), free(counts);
        return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    }
    m->cpu = c;
    m->s = *shape;
    if (local_status == EPX_SUCCESS) {
        m->section_bytes = EPX__ALIGN_UP(epx__board_section_bytes(shape), 4096);
        size_t rows = (size_t)R * (size_t)EPX__MAX(shape->max_tokens, 1);
        m->boards = calloc((size_t)R, sizeof *m->boards);
        m->offsets = calloc(rows, sizeof *m->offsets);
        m->recount = calloc(2 * ((size_t)R + (size_t)shape->num_experts), sizeof *m->recount);
        m->ll_at = calloc(2 * (size_t)shape->local_experts + 1, sizeof *m->ll_at);
        m->rank_of = malloc(sizeof *m->rank_of * (size_t)EPX__MAX(shape->num_experts, 1));
        for (int e = 0; m->rank_of && e < shape->num_experts; e++) m->rank_of[e] = e / shape->local_experts;
        if (!m->boards || !m->offsets || !m->recount || !m->ll_at || !m->rank_of)
            local_status = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        else
            local_status = epx__cpu_mem_alloc(c, 2 * m->section_bytes, &m->board, err);
    }
    if (local_status == EPX_SUCCESS && shape->ll_fp8) {
        /* Registered, so receivers copy the quantised rows straight out of it. */
        size_t sb = shape->scale_format == EPX_SCALE_UE8M0 ? 1 : 4;
        size_t q = EPX__ALIGN_UP((size_t)shape->max_tokens * (size_t)shape->hidden, EPX__CACHELINE);
        void *p = NULL;
        local_status = epx__cpu_mem_alloc(c, q + (size_t)shape->max_tokens * shape->scale_cols * sb, &p, err);
        m->ll_q = p;
        m->ll_scales = p ? (char *)p + q : NULL;
    }
    /* One exchange: every rank's config hash and board location. */
    struct card mine = {config_hash, {EPX__LOC_NONE, 0, 0, 0}};
    if (local_status == EPX_SUCCESS) epx__region_find(c, m->board, 2 * m->section_bytes, &mine.board);
    int64_t *cnt = counts, *dsp = counts + R;
    for (int p = 0; p < R; p++) {
        cards[p] = mine;
        cnt[p] = (int64_t)sizeof mine;
        dsp[p] = (int64_t)sizeof mine * p;
    }
    epx__cpu_xfer_t x = {cards, cnt, dsp, cards + R, cnt, dsp};
    st = epx__cpu_alltoallv(c, local_status == EPX_SUCCESS ? &x : NULL, local_status, err);
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
        if (cards[R + p].hash != config_hash)
            st = epx__fail(err, EPX_ERR_MISMATCH, "rank %d's MoE configuration differs from rank %d's", p, c->rank);
        else
            m->boards[p] = cards[R + p].board;
    }
    free(cards);
    free(counts);
    if (st != EPX_SUCCESS) {
        epx__cpu_moe_destroy(m);
        return st;
    }
    *out = m;
    return EPX_SUCCESS;
}

void epx__cpu_moe_destroy(epx__cpu_moe_t *m)
{
    if (!m) return;
    if (m->board) epx__cpu_mem_free(m->cpu, m->board, NULL);
    if (m->ll_q) epx__cpu_mem_free(m->cpu, m->ll_q, NULL);
    free(m->boards);
    free(m->offsets);
    free(m->ll_ent);
    free(m->ll_at);
    free(m->recount);
    free(m->rank_of);
    free(m->scratch);
    free(m);
}

void epx__cpu_moe_handle_free(epx__cpu_moe_handle_t *h)
{
    if (!h) return;
    free(h->send_row);
    free(h->recv_start);
    free(h->recv_count);
    free(h->recv_token);
    free(h->topk_idx);
    free(h->slot);
    free(h);
}

int64_t epx__cpu_moe_handle_rows(const epx__cpu_moe_handle_t *h) { return h->rows; }
int epx__cpu_moe_handle_tokens(const epx__cpu_moe_handle_t *h) { return h->num_tokens; }

/* ---- Operation skeleton -------------------------------------------------------------------- */

typedef struct {
    uint32_t seq;
    bool exposed;        /* peers read my memory (always my board, often the caller's): wait for them at the end */
    bool broken;         /* a wait for posts failed, or this rank had given up: nothing to finish */
    epx__board_t mine;   /* my board section for this operation */
    epx__board_t *b;     /* every rank's, after epx__op_meet */
} epx__op_t;

/* A `count` fault: announce a wrong shape (see core/fault.h). */
static void epx__fault_count(epx__cpu_moe_t *m, epx__op_t *op)
{
    epx__fault_spec_t f;
    if (!epx__fault_take(&m->cpu->fault, EPX__FAULT_COUNT, op->seq, &f)) return;
    epx__board_hdr_t *h = op->mine.hdr;
    if (h->op == EPX__OP_DISPATCH || h->op == EPX__OP_LL_DISPATCH) {
        if (h->num_tokens > 0)
            op->mine.topk[0] = m->s.num_experts;
        else
            h->num_tokens = m->s.max_tokens + 1;
    } else {
        h->topk += 1;
    }
}

/* Start an operation; returns `local`, or (this rank gave up on the communicator) the
 * status it gave up with: then nothing is written to the board (the caller's writes are
 * under local == EPX_SUCCESS) and epx__op_meet posts nothing. */
static epx_status_t epx__op_start(epx__cpu_moe_t *m, epx__op_t *op, int kind, epx_status_t local, epx__errbuf_t *err)
{
    op->seq = epx__op_begin(m->cpu);
    op->exposed = true; /* peers read my board (opened by name on first use): wait for them */
    op->b = NULL;
    epx_status_t gone = epx__cpu_given_up(m->cpu, err);
    op->broken = gone != EPX_SUCCESS;
    if (op->broken) return gone;
    op->mine = epx__board_at(m, m->board, op->seq);
    memset(op->mine.hdr, 0, sizeof *op->mine.hdr);
    op->mine.hdr->op = kind;
    op->b = malloc(sizeof *op->b * (size_t)m->s.nranks);
    return local;
}

/* Post, acquire every post, check everyone's verdict and that the calls agree, and read
 * the boards into op->b. A failure before the posts are acquired breaks the communicator;
 * later ones are ordinary statuses. Either way the caller ends with epx__op_end. */
static epx_status_t epx__op_meet(epx__cpu_moe_t *m, epx__op_t *op, epx_status_t local, epx__errbuf_t *err)
{
    if (op->broken) return local; /* this rank gave up before (epx__op_start) */
    if (local == EPX_SUCCESS && !op->b) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (__builtin_expect(m->cpu->fault.armed, 0) && local == EPX_SUCCESS) epx__fault_count(m, op);
    epx__op_post(m->cpu, op->seq, EPX__CALL_MOE, local);
    epx_status_t st = epx__wait_posts(m->cpu, op->seq, err);
    op->broken = st != EPX_SUCCESS;
    if (st != EPX_SUCCESS) return st;
    if (local != EPX_SUCCESS) return local;
    EPX__CHECK(epx__op_check_remote(m->cpu, op->seq, EPX__CALL_MOE, err));
    EPX__CHECK(epx__boards_read(m, op->seq, op->b, err));
    EPX__CHECK(epx__boards_agree(m, op->b, err));
    return epx__boards_check(m, op->b, err);
}

/* Finish the operation (see epx__op_finish) and release what it held. */
static epx_status_t epx__op_end(epx__cpu_moe_t *m, epx__op_t *op, epx_status_t st, epx__errbuf_t *err)
{
    free(op->b);
    if (op->broken) return st;
    if (st == EPX_SUCCESS) st = epx__peers_check(m->cpu, op->seq, err); /* nobody gave up while I read */
    return epx__op_finish(m->cpu, op->seq, op->exposed, st, err);
}

/* Hand a new handle out on success, free it otherwise. */
static epx_status_t epx__handle_out(epx__cpu_moe_handle_t *h, epx_status_t st, epx__cpu_moe_handle_t **out)
{
    if (st != EPX_SUCCESS) {
        epx__cpu_moe_handle_free(h);
        return st;
    }
    *out = h;
    return EPX_SUCCESS;
}

/* ---- Rows ---------------------------------------------------------------------------------- */

/* Block of channels reduced in registers / L1 at a time. */
#define EPX__HBLOCK 512

/* The end of the run of terms from i0 on that share grp[i0] (all n without grp). */
static inline int epx__run_end(const int32_t *grp, int i0, int n)
{
    int i1 = i0 + 1;
    while (i1 < n && (!grp || grp[i1] == grp[i0])) i1++;
    return i1;
}

/* Element j of a row of dtype dt as float32, and v rounded into it. */
static inline __attribute__((always_inline)) float epx__row_elem(const char *row, epx_dtype_t dt, int j)
{
    switch (dt) {
    case EPX_BF16: return epx__bf16_to_f32(((const uint16_t *)row)[j]);
    case EPX_F16: return epx__f16_to_f32_sel(((const uint16_t *)row)[j]);
    default: return ((const float *)row)[j];
    }
}
static inline __attribute__((always_inline)) void epx__row_store(char *row, epx_dtype_t dt, int j, float v)
{
    switch (dt) {
    case EPX_BF16: ((uint16_t *)row)[j] = epx__f32_to_bf16(v); break;
    case EPX_F16: ((uint16_t *)row)[j] = epx__f32_to_f16_sel(v); break;
    default: ((float *)row)[j] = v; break;
    }
}

#if EPX__F16C
/* Whether f16 sums use F16C: the CPU has AVX2 and F16C, and EPX_CPU_F16C is not 0. Decided
 * once, at the first f16 sum. */
static pthread_once_t epx__f16c_once = PTHREAD_ONCE_INIT;
static bool epx__f16c_on;
static void epx__f16c_decide(void)
{
    unsigned a, b, c, d;
    __builtin_cpu_init();
    epx__f16c_on = epx__param_int(EPX__P_CPU_F16C) != 0 && __builtin_cpu_supports("avx2") &&
                   __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}

/* n f16 values as float32 and n float32 rounded to f16 (to nearest even), by F16C: the bits
 * of epx__f16_to_f32_sel / epx__f32_to_f16_sel for every value but a NaN, whose payload
 * may differ (the sums store any NaN as the canonical NaN, whose f16 bits both give). */
__attribute__((target("avx2,f16c"))) static inline void epx__f16c_load(float *dst, const uint16_t *src, int n)
{
    int j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j))));
    for (; j < n; j++) dst[j] = _cvtsh_ss(src[j]);
}
__attribute__((target("avx2,f16c"))) static inline void epx__f16c_store(uint16_t *dst, const float *src, int n)
{
    int j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; j < n; j++) dst[j] = _cvtss_sh(src[j], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif

/* out[h] = cast(sum over i in order of w_i * rows[i][h]) in float32, starting from +0;
 * with w == NULL the terms are the rows themselves (no multiply). Two roundings per
 * weighted term (product, then sum): no FMA, so other backends can match the bits. With
 * grp, runs of equal grp[i] are summed first (each from +0), then the runs' sums in order
 * (a single run gives the same bits as no grp: a sum from +0 is never -0). A NaN sum is
 * stored as the canonical NaN (epx__nan_canon), as a GPU's arithmetic makes it.
 * dt (bf16, f16 or f32) and f16c are constants where this is inlined (the functions below):
 * each inner loop is then one pass of independent lanes, which vectorises. f16c: f16 rows
 * go through float32 blocks converted by F16C (the same bits). */
static inline __attribute__((always_inline)) void epx__reduce_rows_dt(char *out, epx_dtype_t dt, bool f16c,
                                                                      const char *const *rows, const float *w,
                                                                      const int32_t *grp, int n, int H)
{
    size_t es = dt == EPX_F32 ? 4 : 2;
    float acc[EPX__HBLOCK], part[EPX__HBLOCK];
#if EPX__F16C
    float conv[EPX__HBLOCK]; /* f16c: a row's block as float32 */
#endif
    epx_dtype_t rdt = f16c ? EPX_F32 : dt; /* the dtype the sums read */
    for (int h0 = 0; h0 < H; h0 += EPX__HBLOCK) {
        int nb = EPX__MIN(EPX__HBLOCK, H - h0);
        for (int j = 0; j < nb; j++) acc[j] = 0.0f;
        for (int i0 = 0, i1; i0 < n; i0 = i1) {
            i1 = epx__run_end(grp, i0, n);
            bool later = i0 > 0; /* the first run sums into acc itself: +0 + its sum is its sum */
            float *sum = later ? part : acc;
            for (int j = 0; later && j < nb; j++) part[j] = 0.0f;
            for (int i = i0; i < i1; i++) {
                const char *r = rows[i] + (size_t)h0 * es;
#if EPX__F16C
                if (f16c) epx__f16c_load(conv, (const uint16_t *)r, nb), r = (const char *)conv;
#endif
                if (w) {
                    float wi = w[i];
                    for (int j = 0; j < nb; j++) {
                        float prod = wi * epx__row_elem(r, rdt, j);
                        sum[j] += prod;
                    }
                } else {
                    for (int j = 0; j < nb; j++) sum[j] += epx__row_elem(r, rdt, j);
                }
            }
            for (int j = 0; later && j < nb; j++) acc[j] += part[j];
        }
        char *o = out + (size_t)h0 * es;
        if (f16c) {
#if EPX__F16C
            for (int j = 0; j < nb; j++) acc[j] = epx__nan_canon(acc[j]);
            epx__f16c_store((uint16_t *)o, acc, nb);
#endif
        } else {
            for (int j = 0; j < nb; j++) epx__row_store(o, dt, j, epx__nan_canon(acc[j]));
        }
    }
}

EPX__MULTIVERSION
static void epx__reduce_rows_bf16(char *out, const char *const *rows, const float *w, const int32_t *grp, int n, int H)
{
    epx__reduce_rows_dt(out, EPX_BF16, false, rows, w, grp, n, H);
}
EPX__MULTIVERSION
static void epx__reduce_rows_f16(char *out, const char *const *rows, const float *w, const int32_t *grp, int n, int H)
{
    epx__reduce_rows_dt(out, EPX_F16, false, rows, w, grp, n, H);
}
#if EPX__F16C
__attribute__((target("avx2,f16c"))) static void epx__reduce_rows_f16c(char *out, const char *const *rows,
                                                                       const float *w, const int32_t *grp, int n, int H)
{
    epx__reduce_rows_dt(out, EPX_F16, true, rows, w, grp, n, H);
}
#endif
EPX__MULTIVERSION
static void epx__reduce_rows_f32(char *out, const char *const *rows, const float *w, const int32_t *grp, int n, int H)
{
    epx__reduce_rows_dt(out, EPX_F32, false, rows, w, grp, n, H);
}

/* dtype: the combine's (bf16, f16 or f32: epx__is_combine_dtype). */
static void epx__reduce_rows(void *out, epx_dtype_t dtype, const char *const *rows, const float *w, const int32_t *grp,
                             int n, int H)
{
    if (dtype == EPX_BF16)
        epx__reduce_rows_bf16(out, rows, w, grp, n, H);
#if EPX__F16C
    else if (dtype == EPX_F16 && (pthread_once(&epx__f16c_once, epx__f16c_decide), epx__f16c_on))
        epx__reduce_rows_f16c(out, rows, w, grp, n, H);
#endif
    else if (dtype == EPX_F16)
        epx__reduce_rows_f16(out, rows, w, grp, n, H);
    else
        epx__reduce_rows_f32(out, rows, w, grp, n, H);
}

void epx__cpu_reduce_rows(void *out, epx_dtype_t dtype, const char *const *rows, const float *w, int n, int H)
{
    epx__reduce_rows(out, dtype, rows, w, NULL, n, H);
}

void epx__cpu_reduce_ll(void *out, epx_dtype_t dtype, const char *const *rows, const float *w, const int32_t *rank,
                        int n, int H)
{
    const char *r[EPX_MOE_MAX_TOPK];
    float wr[EPX_MOE_MAX_TOPK];
    int32_t g[EPX_MOE_MAX_TOPK];
    n = EPX__MIN(n, EPX_MOE_MAX_TOPK);
    for (int i = 0; i < n; i++) { /* a stable insertion by rank: k stays ascending within one */
        int j = i;
        for (; j > 0 && g[j - 1] > rank[i]; j--) r[j] = r[j - 1], wr[j] = wr[j - 1], g[j] = g[j - 1];
        r[j] = rows[i], wr[j] = w[i], g[j] = rank[i];
    }
    epx__reduce_rows(out, dtype, r, wr, g, n, H);
}

/* Work space of epx__gather_ptrs for up to `cap` rows. */
typedef struct {
    int64_t cap;
    int64_t *offs;
    int32_t *idx;
    const char **tmp;
} epx__gather_t;

static epx_status_t epx__gather_init(epx__gather_t *g, int64_t cap, epx__errbuf_t *err)
{
    g->cap = cap;
    g->offs = malloc(sizeof *g->offs * (size_t)cap);
    g->idx = malloc(sizeof *g->idx * (size_t)cap);
    g->tmp = malloc(sizeof *g->tmp * (size_t)cap);
    if (g->offs && g->idx && g->tmp) return EPX_SUCCESS;
    free(g->offs), free(g->idx), free(g->tmp);
    g->offs = NULL, g->idx = NULL, g->tmp = NULL;
    return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
}

static void epx__gather_free(epx__gather_t *g) { free(g->offs), free(g->idx), free(g->tmp); }

/* Pointers to rows of several ranks: entry i is the row at byte offset offsets[i] of what
 * rank ranks[i] exposed at locs[ranks[i]] (n <= g->cap). Rows that must be read with
 * process_vm_readv land in the scratch space. */
static epx_status_t epx__gather_ptrs(epx__cpu_moe_t *m, epx__gather_t *g, uint32_t seq, const epx__loc_t *const *locs,
                                     const int32_t *ranks, const int64_t *offsets, int64_t n, size_t row_bytes,
                                     const char **ptrs, epx__errbuf_t *err)
{
    EPX__CHECK(epx__scratch(m, (size_t)n * row_bytes, err));
    size_t used = 0;
    for (int p = 0; p < m->s.nranks; p++) {
        int64_t k = 0;
        for (int64_t i = 0; i < n; i++)
            if (ranks[i] == p) g->offs[k] = offsets[i], g->idx[k++] = (int32_t)i;
        if (k == 0) continue;
        EPX__CHECK(epx__peer_rows_ptrs(m->cpu, p, locs[p], seq, g->offs, k, row_bytes, m->scratch + used, g->tmp, err));
        for (int64_t j = 0; j < k; j++) ptrs[g->idx[j]] = g->tmp[j];
        used += (size_t)k * row_bytes;
    }
    return EPX_SUCCESS;
}

/* ---- High-throughput dispatch ---------------------------------------------------------------- */

/* Write my part of a dispatch (routing and where my tokens are) into my board. */
static epx_status_t epx__dispatch_publish(epx__cpu_moe_t *m, epx__op_t *op, const epx_moe_dispatch_in_t *in,
                                          const epx_moe_dispatch_out_t *out, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    epx__board_t *b = &op->mine;
    int T = in->num_tokens, K = in->topk;
    b->hdr->num_tokens = T;
    b->hdr->topk = K;
    b->hdr->has_weights = in->topk_weights != NULL;
    b->hdr->capacity = out->capacity;
    epx__topk_to_i32(in->topk_idx, s->index_dtype, T, K, b->topk);
    if (in->topk_weights) memcpy(b->weights, in->topk_weights, sizeof(float) * (size_t)T * (size_t)K);
    EPX__CHECK(epx__layout(b->topk, EPX_I32, T, K, s->num_experts, s->nranks, b->per_rank, b->per_expert, NULL));
    epx__expose_t bufs[2] = {{in->x, (size_t)T * s->row_bytes, {0, 0, 0, 0}},
                             {s->dtype == EPX_FP8_E4M3 ? in->x_scales : NULL, (size_t)T * s->scale_cols * 4, {0, 0, 0, 0}}};
    EPX__CHECK(epx__expose_buffers(m->cpu, bufs, 2, &op->exposed, err));
    b->hdr->x = bufs[0].loc;
    b->hdr->scales = bufs[1].loc;
    return EPX_SUCCESS;
}

/* Every rank's output must hold what it receives; all ranks reach the same verdict: a rank
 * whose own output is short says so (EPX_ERR_INVALID_ARGUMENT), the others name the first
 * short rank (EPX_ERR_REMOTE_INVALID). */
static epx_status_t epx__check_capacity(const epx__cpu_moe_t *m, const epx__board_t *b, int64_t *mine,
                                        epx__errbuf_t *err)
{
    int R = m->s.nranks, me = m->s.rank, first = -1;
    int64_t first_n = 0;
    for (int q = 0; q < R; q++) {
        int64_t n = 0;
        for (int p = 0; p < R; p++) n += b[p].per_rank[q];
        if (q == me) *mine = n;
        if (n > b[q].hdr->capacity && first < 0) first = q, first_n = n;
    }
    if (*mine > b[me].hdr->capacity)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT,
                         "out.capacity = %lld rows, but this rank receives %lld (num_recv_tokens tells)",
                         (long long)b[me].hdr->capacity, (long long)*mine);
    if (first >= 0)
        return epx__fail(err, EPX_ERR_REMOTE_INVALID,
                         "rank %d's out.capacity (%lld rows) is below the %lld it receives", first,
                         (long long)b[first].hdr->capacity, (long long)first_n);
    return EPX_SUCCESS;
}

/* Pull the rows of source p along a list of its tokens into rows [row, row + n). */
static epx_status_t epx__pull_token_rows(epx__cpu_moe_t *m, uint32_t seq, int p, const epx__board_t *bp,
                                         const int32_t *tokens, int64_t n, int64_t row, epx_moe_dispatch_out_t *out,
                                         epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    if (n == 0) return EPX_SUCCESS; /* recv_x may be NULL (capacity 0) */
    for (int64_t i = 0; i < n; i++) m->offsets[i] = (int64_t)tokens[i] * (int64_t)s->row_bytes;
    EPX__CHECK(epx__peer_rows_copy(m->cpu, p, &bp->hdr->x, seq, m->offsets, n, s->row_bytes,
                                   (char *)out->recv_x + (size_t)row * s->row_bytes, s->row_bytes, err));
    if (s->dtype == EPX_FP8_E4M3 && out->recv_x_scales) {
        size_t sb = s->scale_cols * sizeof(float);
        for (int64_t i = 0; i < n; i++) m->offsets[i] = (int64_t)tokens[i] * (int64_t)sb;
        EPX__CHECK(epx__peer_rows_copy(m->cpu, p, &bp->hdr->scales, seq, m->offsets, n, sb,
                                       (char *)(out->recv_x_scales + (size_t)row * s->scale_cols), sb, err));
    }
    return EPX_SUCCESS;
}

/* Receive side of a dispatch: pull every row, fill the per-row outputs and the handle. */
static epx_status_t epx__dispatch_receive(epx__cpu_moe_t *m, uint32_t seq, const epx__board_t *b,
                                          epx_moe_dispatch_out_t *out, epx__cpu_moe_handle_t *h, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    int R = s->nranks, L = s->local_experts, q = s->rank, K = b[q].hdr->topk;
    int64_t row = 0, stamp = 0;
    /* per_expert[L], then last[L]: the stamp of the last (source, token) counted at each of
     * my experts, so that an expert a token names twice counts once (no compare with the
     * token's earlier ids: that loop held a fifth of the dispatch's own profile). */
    int64_t *per_expert = calloc(2 * (size_t)L, sizeof *per_expert), *last = per_expert + L;
    if (!per_expert) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    epx_status_t st = EPX_SUCCESS;
    /* The per-row outputs, looked up once (stores through them could alias the structs). */
    int32_t *idx32 = out->recv_topk_idx && s->index_dtype == EPX_I32 ? (int32_t *)out->recv_topk_idx : NULL;
    int64_t *idx64 = out->recv_topk_idx && s->index_dtype != EPX_I32 ? (int64_t *)out->recv_topk_idx : NULL;
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
        const epx__board_t *bp = &b[p];
        float *w = bp->hdr->has_weights ? out->recv_topk_weights : NULL;
        const float *bw = bp->weights;
        int64_t n = 0, T = bp->hdr->num_tokens;
        for (int64_t t = 0; t < T; t++) {
            if (!epx__goes_to_rank(bp->topk, K, t, m->rank_of, q)) continue;
            int64_t r = row + n++;
            stamp++;
            h->recv_token[r] = (int32_t)t;
            if (out->recv_src_rank) out->recv_src_rank[r] = p;
            if (out->recv_src_token) out->recv_src_token[r] = (int32_t)t;
            for (int k = 0; k < K; k++) {
                int32_t e = bp->topk[t * K + k];
                bool here = e >= 0 && m->rank_of[e] == q;
                int32_t l = here ? e - q * L : -1;
                if (idx32) idx32[r * K + k] = l;
                if (idx64) idx64[r * K + k] = l;
                if (w) w[r * K + k] = here ? bw[t * K + k] : 0.0f;
                if (here && last[l] != stamp) last[l] = stamp, per_expert[l]++;
            }
        }
        h->recv_start[p] = row;
        h->recv_count[p] = n;
        st = epx__pull_token_rows(m, seq, p, bp, h->recv_token + row, n, row, out, err);
        row += n;
    }
    if (out->num_recv_tokens_per_expert)
        for (int l = 0; l < L; l++)
            out->num_recv_tokens_per_expert[l] = (int32_t)EPX__ALIGN_UP(per_expert[l], (int64_t)s->alignment);
    free(per_expert);
    h->rows = row;
    return st;
}

/* Home side: for each of my tokens, its row in every receiver's output (tokens ascending
 * at each receiver, after the rows of the ranks before me). One pass over my routing. */
static void epx__dispatch_home_rows(const epx__cpu_moe_t *m, const epx__board_t *b, epx__cpu_moe_handle_t *h)
{
    int R = m->s.nranks, me = m->s.rank, K = h->topk;
    const epx__board_t *mine = &b[me];
    int32_t *next = m->recount; /* [R]: the next row at each receiver */
    for (int r = 0; r < R; r++) {
        next[r] = 0;
        for (int p = 0; p < me; p++) next[r] += b[p].per_rank[r];
    }
    for (int64_t t = 0; t < h->num_tokens; t++) {
        int32_t *row = h->send_row + t * R;
        for (int r = 0; r < R; r++) row[r] = -1;
        int ranks[EPX_MOE_MAX_TOPK], n = epx__topk_ranks(mine->topk + t * K, K, m->rank_of, R, ranks);
        for (int j = 0; j < n; j++) row[ranks[j]] = next[ranks[j]]++; /* each rank once: no load of a row just stored */
    }
}

static epx__cpu_moe_handle_t *epx__handle_new(const epx__cpu_moe_t *m, uint32_t id, int mode, int T, int K)
{
    epx__cpu_moe_handle_t *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    int R = m->s.nranks;
    size_t tk = (size_t)EPX__MAX(T, 1) * (size_t)EPX__MAX(K, 1);
    h->id = id;
    h->mode = mode;
    h->num_tokens = T;
    h->topk = K;
    if (mode == EPX_MOE_HIGH_THROUGHPUT) {
        h->send_row = malloc(sizeof(int32_t) * (size_t)EPX__MAX(T, 1) * (size_t)R);
        h->recv_start = calloc((size_t)R, sizeof(int64_t));
        h->recv_count = calloc((size_t)R, sizeof(int64_t));
        h->recv_token = malloc(sizeof(int32_t) * (size_t)R * (size_t)EPX__MAX(m->s.max_tokens, 1));
        if (h->send_row && h->recv_start && h->recv_count && h->recv_token) return h;
    } else {
        h->topk_idx = malloc(sizeof(int32_t) * tk);
        h->slot = malloc(sizeof(int32_t) * tk);
        if (h->topk_idx && h->slot) return h;
    }
    epx__cpu_moe_handle_free(h);
    return NULL;
}

epx_status_t epx__cpu_moe_dispatch(epx__cpu_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                   epx_status_t local, epx__cpu_moe_handle_t **handle, epx__errbuf_t *err)
{
    epx__op_t op;
    local = epx__op_start(m, &op, EPX__OP_DISPATCH, local, err);
    epx__cpu_moe_handle_t *h = NULL;
    if (local == EPX_SUCCESS) {
        h = epx__handle_new(m, op.seq, EPX_MOE_HIGH_THROUGHPUT, in->num_tokens, in->topk);
        if (!h) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the handle");
    }
    if (local == EPX_SUCCESS) local = epx__dispatch_publish(m, &op, in, out, err);
    epx_status_t st = epx__op_meet(m, &op, local, err);
    const epx__board_t *b = op.b;
    int64_t n = -1;
    if (st == EPX_SUCCESS) st = epx__check_capacity(m, b, &n, err);
    if (st == EPX_SUCCESS) { /* on failure nothing changes: the message says n */
        out->num_recv_tokens = n;
        if (out->num_recv_tokens_device) *out->num_recv_tokens_device = n;
    }
    if (st == EPX_SUCCESS) {
        st = epx__dispatch_receive(m, op.seq, b, out, h, err);
        epx__dispatch_home_rows(m, b, h);
    }
    return epx__handle_out(h, epx__op_end(m, &op, st, err), handle);
}

epx_status_t epx__cpu_moe_dispatch_cached(epx__cpu_moe_t *m, const epx__cpu_moe_handle_t *h,
                                          const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                          epx_status_t local, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    epx__op_t op;
    local = epx__op_start(m, &op, EPX__OP_CACHED, local, err);
    if (local == EPX_SUCCESS) {
        op.mine.hdr->num_tokens = h->num_tokens;
        op.mine.hdr->topk = h->topk;
        op.mine.hdr->routing_id = h->id;
        epx__expose_t bufs[2] = {
            {in->x, (size_t)h->num_tokens * s->row_bytes, {0, 0, 0, 0}},
            {s->dtype == EPX_FP8_E4M3 ? in->x_scales : NULL, (size_t)h->num_tokens * s->scale_cols * 4, {0, 0, 0, 0}}};
        local = epx__expose_buffers(m->cpu, bufs, 2, &op.exposed, err);
        op.mine.hdr->x = bufs[0].loc;
        op.mine.hdr->scales = bufs[1].loc;
    }
    epx_status_t st = epx__op_meet(m, &op, local, err);
    const epx__board_t *b = op.b;
    for (int p = 0; p < s->nranks && st == EPX_SUCCESS; p++)
        st = epx__pull_token_rows(m, op.seq, p, &b[p], h->recv_token + h->recv_start[p], h->recv_count[p],
                                  h->recv_start[p], out, err);
    return epx__op_end(m, &op, st, err);
}

/* ---- High-throughput combine ------------------------------------------------------------------ */

/* A token's rows in ascending rank order: rows[0..n) = ptrs[slot[r]] for the ranks r < R it
 * went to (slot[r] >= 0); returns n. */
static int epx__token_rows(const int32_t *slot, int R, const char *const *ptrs, const char **rows)
{
    int n = 0;
    for (int r = 0; r < R; r++)
        if (slot[r] >= 0) rows[n++] = ptrs[slot[r]];
    return n;
}

epx_status_t epx__cpu_moe_combine(epx__cpu_moe_t *m, const epx__cpu_moe_handle_t *h, const epx_moe_combine_in_t *in,
                                  epx_moe_combine_out_t *out, epx_status_t local, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    int R = s->nranks, H = s->hidden;
    epx__op_t op;
    local = epx__op_start(m, &op, EPX__OP_COMBINE, local, err);
    if (local == EPX_SUCCESS) {
        op.mine.hdr->num_tokens = h->num_tokens;
        op.mine.hdr->topk = h->topk;
        op.mine.hdr->routing_id = h->id;
        op.mine.hdr->has_weights = in->topk_weights != NULL;
        epx__expose_t bufs[2] = {{in->y, (size_t)h->rows * s->combine_row_bytes, {0, 0, 0, 0}},
                                 {in->topk_weights, (size_t)h->rows * (size_t)h->topk * 4, {0, 0, 0, 0}}};
        local = epx__expose_buffers(m->cpu, bufs, 2, &op.exposed, err);
        op.mine.hdr->y = bufs[0].loc;
        op.mine.hdr->weights = bufs[1].loc;
    }
    epx_status_t st = epx__op_meet(m, &op, local, err);
    const epx__board_t *b = op.b;
    int64_t cap = (int64_t)EPX__CHUNK * R;
    const epx__loc_t **ylocs = malloc(sizeof *ylocs * (size_t)R), **wlocs = malloc(sizeof *wlocs * (size_t)R);
    int32_t *ranks = malloc(sizeof *ranks * (size_t)cap);
    int64_t *offs = malloc(sizeof *offs * (size_t)cap);
    int32_t *slot_of = malloc(sizeof *slot_of * (size_t)cap);
    const char **ptrs = malloc(sizeof *ptrs * (size_t)cap), **rows = malloc(sizeof *rows * (size_t)R);
    epx__gather_t g = {0, NULL, NULL, NULL};
    if (st == EPX_SUCCESS && (!ylocs || !wlocs || !ranks || !offs || !slot_of || !ptrs || !rows))
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (st == EPX_SUCCESS) st = epx__gather_init(&g, cap, err);
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) ylocs[p] = &b[p].hdr->y, wlocs[p] = &b[p].hdr->weights;
    int K = st == EPX_SUCCESS ? h->topk : 0;
    for (int64_t t0 = 0; st == EPX_SUCCESS && t0 < h->num_tokens; t0 += EPX__CHUNK) {
        int64_t t1 = EPX__MIN(t0 + EPX__CHUNK, (int64_t)h->num_tokens), n = 0;
        for (int64_t t = t0; t < t1; t++)
            for (int r = 0; r < R; r++) {
                int32_t row = h->send_row[t * R + r];
                slot_of[(t - t0) * R + r] = row >= 0 ? (int32_t)n : -1;
                if (row >= 0) ranks[n] = r, offs[n++] = (int64_t)row * (int64_t)s->combine_row_bytes;
            }
        st = epx__gather_ptrs(m, &g, op.seq, ylocs, ranks, offs, n, s->combine_row_bytes, ptrs, err);
        for (int64_t t = t0; t < t1 && st == EPX_SUCCESS; t++) {
            int nr = epx__token_rows(slot_of + (t - t0) * R, R, ptrs, rows);
            epx__cpu_reduce_rows((char *)out->out + (size_t)t * s->combine_row_bytes, s->combine_dtype, rows, NULL, nr, H);
        }
        if (st != EPX_SUCCESS || !out->out_topk_weights || !op.mine.hdr->has_weights) continue;
        size_t wb = sizeof(float) * (size_t)K;
        for (int64_t i = 0; i < n; i++) offs[i] = offs[i] / (int64_t)s->combine_row_bytes * (int64_t)wb;
        st = epx__gather_ptrs(m, &g, op.seq, wlocs, ranks, offs, n, wb, ptrs, err);
        for (int64_t t = t0; t < t1 && st == EPX_SUCCESS; t++) { /* the weights: rows of K float32 */
            int nr = epx__token_rows(slot_of + (t - t0) * R, R, ptrs, rows);
            epx__cpu_reduce_rows(out->out_topk_weights + t * K, EPX_F32, rows, NULL, nr, K);
        }
    }
    if (st == EPX_SUCCESS && out->out_topk_weights && !op.mine.hdr->has_weights)
        memset(out->out_topk_weights, 0, sizeof(float) * (size_t)h->num_tokens * (size_t)K);
    epx__gather_free(&g);
    free(ylocs), free(wlocs), free(ranks), free(offs), free(slot_of), free(ptrs), free(rows);
    return epx__op_end(m, &op, st, err);
}

/* ---- Low-latency dispatch / combine ------------------------------------------------------------- */

/* The first j <= k with tk[j] == tk[k]: a token's repeated id counts at its first k. */
static inline int epx__first_k(const int32_t *tk, int k)
{
    int j = 0;
    while (tk[j] != tk[k]) j++;
    return j;
}

/* Token tk's id k as a local expert of the rank whose experts start at lo (L of them), or
 * -1: another rank's, none, or named at an earlier k. */
static inline int32_t epx__my_first_lid(const int32_t *tk, int k, int32_t lo, int L)
{
    int32_t l = tk[k] - lo;
    return l >= 0 && l < L && epx__first_k(tk, k) == k ? l : -1;
}

/* Room for n low-latency receive entries in m->ll_ent (kept across calls). */
static epx_status_t epx__grow_ent(epx__cpu_moe_t *m, size_t n, epx__errbuf_t *err)
{
    if (m->ll_ent_cap >= n) return EPX_SUCCESS;
    int64_t *p = realloc(m->ll_ent, sizeof *p * EPX__MAX(n, (size_t)1));
    if (!p) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the low-latency receive");
    m->ll_ent = p, m->ll_ent_cap = n;
    return EPX_SUCCESS;
}

epx_status_t epx__cpu_moe_ll_dispatch(epx__cpu_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                      epx_moe_ll_dispatch_out_t *out, epx_status_t local,
                                      epx__cpu_moe_handle_t **handle, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    int R = s->nranks, L = s->local_experts, me = s->rank, H = s->hidden;
    epx__op_t op;
    local = epx__op_start(m, &op, EPX__OP_LL_DISPATCH, local, err);
    epx__cpu_moe_handle_t *h = NULL;
    if (local == EPX_SUCCESS) {
        h = epx__handle_new(m, op.seq, EPX_MOE_LOW_LATENCY, in->num_tokens, in->topk);
        if (!h) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the handle");
    }
    if (local == EPX_SUCCESS) {
        epx__board_t *mb = &op.mine;
        mb->hdr->num_tokens = in->num_tokens;
        mb->hdr->topk = in->topk;
        epx__topk_to_i32(in->topk_idx, s->index_dtype, in->num_tokens, in->topk, mb->topk);
        local = epx__layout(mb->topk, EPX_I32, in->num_tokens, in->topk, s->num_experts, R, mb->per_rank,
                            mb->per_expert, NULL);
    }
    if (local == EPX_SUCCESS) {
        epx__board_t *mb = &op.mine;
        size_t sb = s->scale_format == EPX_SCALE_UE8M0 ? 1 : 4, T = (size_t)in->num_tokens;
        epx__expose_t bufs[2] = {{in->x, T * s->row_bytes, {0, 0, 0, 0}}, {NULL, 0, {0, 0, 0, 0}}};
        if (s->ll_fp8) {
            /* Quantise each token once, here; receivers copy FP8 rows and scales. */
            for (size_t t = 0; t < T; t++)
                epx__fp8_quantize_row((const uint16_t *)in->x + t * (size_t)H, H, s->scale_format,
                                      m->ll_q + t * (size_t)H, m->ll_scales + t * s->scale_cols * sb);
            bufs[0] = (epx__expose_t){m->ll_q, T * (size_t)H, {0, 0, 0, 0}};
            bufs[1] = (epx__expose_t){m->ll_scales, T * s->scale_cols * sb, {0, 0, 0, 0}};
        }
        local = epx__expose_buffers(m->cpu, bufs, 2, &op.exposed, err);
        mb->hdr->x = bufs[0].loc;
        mb->hdr->scales = bufs[1].loc;
    }
    epx_status_t st = epx__op_meet(m, &op, local, err);
    const epx__board_t *b = op.b;
    int K = st == EPX_SUCCESS ? b[me].hdr->topk : 0;
    size_t out_row = s->ll_fp8 ? (size_t)H : s->row_bytes;
    size_t scale_bytes = s->scale_format == EPX_SCALE_UE8M0 ? 1 : 4;
    /* Receive: for each local expert, rows packed by source rank, then token. One pass over
     * every source's routing sorts the (source, token) pairs of my experts by expert, stable
     * (counts, then places): they come out in slot order (a scan of all routing per expert
     * was most of a dispatch at T=128). at[l] .. at[l + 1]: local expert l's pairs. */
    int64_t *at = m->ll_at, *next = at + L + 1; /* [L + 1], [L] */
    if (st == EPX_SUCCESS) {
        memset(at, 0, sizeof *at * ((size_t)L + 1));
        for (int p = 0; p < R; p++)
            for (int64_t t = 0; t < b[p].hdr->num_tokens; t++)
                for (int k = 0; k < K; k++) {
                    int32_t l = epx__my_first_lid(b[p].topk + t * K, k, me * L, L);
                    if (l >= 0) at[l + 1]++;
                }
        for (int l = 0; l < L; l++) at[l + 1] += at[l], next[l] = at[l];
        st = epx__grow_ent(m, (size_t)at[L], err);
    }
    for (int p = 0; p < R && st == EPX_SUCCESS; p++)
        for (int64_t t = 0; t < b[p].hdr->num_tokens; t++)
            for (int k = 0; k < K; k++) {
                int32_t l = epx__my_first_lid(b[p].topk + t * K, k, me * L, L);
                if (l >= 0) m->ll_ent[next[l]++] = (int64_t)p << 32 | t;
            }
    for (int l = 0; l < L && st == EPX_SUCCESS; l++) {
        int64_t slot = 0;
        for (int64_t i = at[l], j; i < at[l + 1] && st == EPX_SUCCESS; i = j) {
            int p = (int)(m->ll_ent[i] >> 32); /* the run of source p's tokens */
            for (j = i; j < at[l + 1] && (int)(m->ll_ent[j] >> 32) == p; j++) {}
            const epx__board_t *bp = &b[p];
            int64_t n = j - i;
            size_t first = (size_t)l * s->ll_slots + (size_t)slot;
            for (int64_t q = 0; q < n; q++) {
                int32_t t = (int32_t)(m->ll_ent[i + q] & 0xffffffff);
                if (out->recv_src_rank) out->recv_src_rank[first + (size_t)q] = p;
                if (out->recv_src_token) out->recv_src_token[first + (size_t)q] = t;
                m->offsets[q] = (int64_t)t * (int64_t)out_row;
            }
            /* n = 0 skips the copies: recv_x may be NULL when there are no slots. */
            if (n > 0)
                st = epx__peer_rows_copy(m->cpu, p, &bp->hdr->x, op.seq, m->offsets, n, out_row,
                                         (char *)out->recv_x + first * out_row, out_row, err);
            if (s->ll_fp8 && n > 0 && st == EPX_SUCCESS) {
                size_t srow = s->scale_cols * scale_bytes;
                for (int64_t q = 0; q < n; q++) m->offsets[q] = (m->ll_ent[i + q] & 0xffffffff) * (int64_t)srow;
                st = epx__peer_rows_copy(m->cpu, p, &bp->hdr->scales, op.seq, m->offsets, n, srow,
                                         (char *)out->recv_x_scales + first * srow, srow, err);
            }
            slot += n;
        }
        if (out->recv_count) out->recv_count[l] = (int32_t)slot;
        epx__ll_slots_unfilled(out->recv_src_rank, out->recv_src_token, s->ll_slots, l, (size_t)slot);
    }
    /* Home side: the slot of each (token, k) in its expert's region. */
    if (st == EPX_SUCCESS) {
        const epx__board_t *mine = &b[me];
        memcpy(h->topk_idx, mine->topk, sizeof(int32_t) * (size_t)h->num_tokens * (size_t)K);
        /* Expert e's next slot starts after the lower sources' tokens for it; my tokens
         * take them in token order, a token once per expert (its repeated ids share it). */
        int32_t *nxt = m->recount; /* [E] */
        for (int e = 0; e < s->num_experts; e++) {
            nxt[e] = 0;
            for (int p = 0; p < me; p++) nxt[e] += b[p].per_expert[e];
        }
        for (int64_t t = 0; t < h->num_tokens; t++) {
            const int32_t *tk = mine->topk + t * K;
            for (int k = 0; k < K; k++) {
                int j = epx__first_k(tk, k);
                h->slot[t * K + k] = tk[k] < 0 ? -1 : j < k ? h->slot[t * K + j] : nxt[tk[k]]++;
            }
        }
    }
    return epx__handle_out(h, epx__op_end(m, &op, st, err), handle);
}

epx_status_t epx__cpu_moe_ll_combine(epx__cpu_moe_t *m, const epx__cpu_moe_handle_t *h,
                                     const epx_moe_ll_combine_in_t *in, void *out, epx_status_t local,
                                     epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    int R = s->nranks, L = s->local_experts, H = s->hidden;
    epx__op_t op;
    local = epx__op_start(m, &op, EPX__OP_LL_COMBINE, local, err);
    if (local == EPX_SUCCESS) {
        op.mine.hdr->num_tokens = h->num_tokens;
        op.mine.hdr->topk = h->topk;
        op.mine.hdr->routing_id = h->id;
        epx__expose_t bufs[1] = {{in->y, (size_t)L * s->ll_slots * s->combine_row_bytes, {0, 0, 0, 0}}};
        local = epx__expose_buffers(m->cpu, bufs, 1, &op.exposed, err);
        op.mine.hdr->y = bufs[0].loc;
    }
    epx_status_t st = epx__op_meet(m, &op, local, err);
    const epx__board_t *b = op.b;
    int K = st == EPX_SUCCESS ? h->topk : 0;
    int64_t cap = (int64_t)EPX__CHUNK * EPX__MAX(K, 1);
    const epx__loc_t **ylocs = malloc(sizeof *ylocs * (size_t)R);
    int32_t *ranks = malloc(sizeof *ranks * (size_t)cap), *slot_of = malloc(sizeof *slot_of * (size_t)cap);
    int64_t *offs = malloc(sizeof *offs * (size_t)cap);
    const char **ptrs = malloc(sizeof *ptrs * (size_t)cap), **rows = malloc(sizeof *rows * (size_t)EPX__MAX(K, 1));
    float *w = malloc(sizeof *w * (size_t)EPX__MAX(K, 1));
    epx__gather_t g = {0, NULL, NULL, NULL};
    if (st == EPX_SUCCESS && (!ylocs || !ranks || !slot_of || !offs || !ptrs || !rows || !w))
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (st == EPX_SUCCESS) st = epx__gather_init(&g, cap, err);
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) ylocs[p] = &b[p].hdr->y;
    for (int64_t t0 = 0; st == EPX_SUCCESS && t0 < h->num_tokens; t0 += EPX__CHUNK) {
        int64_t t1 = EPX__MIN(t0 + EPX__CHUNK, (int64_t)h->num_tokens), n = 0;
        for (int64_t t = t0; t < t1; t++)
            for (int k = 0; k < K; k++) {
                int32_t e = h->topk_idx[t * K + k];
                slot_of[(t - t0) * K + k] = e >= 0 ? (int32_t)n : -1;
                if (e < 0) continue;
                int32_t r = m->rank_of[e];
                ranks[n] = r;
                offs[n++] = ((int64_t)(e - r * L) * (int64_t)s->ll_slots + h->slot[t * K + k]) *
                            (int64_t)s->combine_row_bytes;
            }
        st = epx__gather_ptrs(m, &g, op.seq, ylocs, ranks, offs, n, s->combine_row_bytes, ptrs, err);
        for (int64_t t = t0; t < t1 && st == EPX_SUCCESS; t++) {
            int nr = 0;
            int32_t rk[EPX_MOE_MAX_TOPK];
            for (int k = 0; k < K; k++) {
                int32_t i = slot_of[(t - t0) * K + k];
                if (i < 0) continue;
                rows[nr] = ptrs[i];
                rk[nr] = ranks[i];
                w[nr++] = in->topk_weights[t * K + k];
            }
            epx__cpu_reduce_ll((char *)out + (size_t)t * s->combine_row_bytes, s->combine_dtype, rows, w, rk, nr, H);
        }
    }
    epx__gather_free(&g);
    free(ylocs), free(ranks), free(slot_of), free(offs), free(ptrs), free(rows), free(w);
    return epx__op_end(m, &op, st, err);
}
