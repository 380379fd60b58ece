/*
 * src/hier: the row plan of a handle (hier.h, epx__hier_xplan_t): from the handle's routing
 * plan, the count of every transfer and the source of every row copy, as references. The
 * CPU path (moe.c: cached dispatch, combine, the low-latency slots and combine) runs it in
 * host memory; the GPU path across hosts (src/xhost) uploads the references and runs the
 * same plan with device kernels, NCCL and CUDA IPC. Pure C, local.
 *
 * High-throughput and low-latency plans share the dispatch (one record per token and
 * destination rank) and the shape of the combine; a low-latency combine record holds one
 * row per distinct expert of the token at that rank (ascending local expert), so that the
 * home rank can weight each (token, k) as the single-host combine does.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* An expert id's rank (id / L), looked up in the context's table: the builder visits every
 * top-k entry several times, and a division each time was most of its work. (On my rank,
 * the local id is id - me L.) */
typedef struct {
    const int32_t *rank; /* [num_experts] */
    int nranks;
} epx__eid_t;

static bool epx__goes_host(const epx__topo_t *t, const int32_t *tk, int K, const epx__eid_t *ex, int k)
{
    for (int j = 0; j < K; j++)
        if (tk[j] >= 0 && t->host_of[ex->rank[tk[j]]] == k) return true;
    return false;
}

static bool epx__goes_rank(const int32_t *tk, int K, const epx__eid_t *ex, int q)
{
    for (int j = 0; j < K; j++)
        if (tk[j] >= 0 && ex->rank[tk[j]] == q) return true;
    return false;
}

/* A token's distinct expert ids, ascending, and the first k naming each: a rank's experts
 * are a run (rank q holds ids [q L, q L + L)), by ascending local id. */
typedef struct {
    int n;
    int32_t id[EPX_MOE_MAX_TOPK];
    int kf[EPX_MOE_MAX_TOPK];
} epx__tokex_t;

static void epx__tokex(const int32_t *tk, int K, epx__tokex_t *t)
{
    t->n = 0;
    for (int k = 0; k < K; k++) {
        int32_t e = tk[k];
        if (e < 0) continue;
        int j = t->n;
        while (j > 0 && t->id[j - 1] > e) j--;
        if (j > 0 && t->id[j - 1] == e) continue; /* named before */
        for (int a = t->n; a > j; a--) t->id[a] = t->id[a - 1], t->kf[a] = t->kf[a - 1];
        t->id[j] = e, t->kf[j] = k, t->n++;
    }
}

/* Where rank q's run starts in t, and (*len) how long it is. */
static int epx__tokex_run(const epx__tokex_t *t, int q, int L, int *len)
{
    int a = 0;
    while (a < t->n && t->id[a] < q * L) a++;
    int b = a;
    while (b < t->n && t->id[b] < q * L + L) b++;
    *len = b - a;
    return a;
}

/* The place of expert id e in t (it is there). */
static int epx__tokex_at(const epx__tokex_t *t, int32_t e)
{
    int a = 0;
    while (t->id[a] != e) a++;
    return a;
}

/* How many distinct experts of a token are on rank q (no order needed). */
static int epx__distinct_on(const int32_t *tk, int K, const epx__eid_t *ex, int q)
{
    int n = 0;
    for (int k = 0; k < K; k++) {
        if (tk[k] < 0 || ex->rank[tk[k]] != q) continue;
        bool dup = false;
        for (int j = 0; j < k; j++) dup |= tk[j] == tk[k];
        n += !dup;
    }
    return n;
}

int epx__hier_call_chunks(const epx__moe_shape_t *s, bool overlap, const int64_t *src_tokens, int R)
{
    int64_t set = epx__param_int(EPX__P_MOE_CHUNKS);
    if (set > 0) return (int)EPX__MIN(set, (int64_t)EPX__HIER_MAX_CHUNKS);
    if (!overlap) return 1;
    int64_t T = 0; /* the largest batch of the call: every rank knows every rank's */
    for (int p = 0; p < R; p++) T = EPX__MAX(T, src_tokens[p]);
    /* A row as it crosses: low-latency FP8 quantises (e4m3 and its scales), else the dtype's
     * row and, for FP8, float32 scales. */
    size_t row = s->row_bytes, scales = s->dtype == EPX_FP8_E4M3 ? s->scale_cols * sizeof(float) : 0;
    if (s->mode == EPX_MOE_LOW_LATENCY && s->ll_fp8)
        row = (size_t)s->hidden, scales = s->scale_cols * (s->scale_format == EPX_SCALE_UE8M0 ? 1 : sizeof(float));
    uint64_t bytes = (uint64_t)T * (row + scales), per = (uint64_t)8 << 20;
    uint64_t c = (bytes + per - 1) / per;
    return c < 1 ? 1 : c > EPX__HIER_MAX_CHUNKS ? EPX__HIER_MAX_CHUNKS : (int)c;
}

/* The chunk of the network step that token `tok` of a source of `tokens` takes (hier.h). */
static int epx__chunk(int chunks, int64_t tokens, int tok)
{
    if (chunks <= 1) return 0;
    int64_t c = (int64_t)tok * chunks / EPX__MAX(tokens, (int64_t)1);
    return c < chunks ? (int)c : chunks - 1;
}

/* The a-th segment (a < parts * LS) of a buffer in the layout of hier.h: its part and local
 * rank. */
static void epx__seg(int a, int LS, int parts, bool by_peer, int *part, int *l)
{
    *part = by_peer ? a % parts : a / LS;
    *l = by_peer ? a / parts : a % LS;
}

/* From the counts n[q * LS + l] of a buffer in that layout: each part's total tot[q] and
 * (first not NULL) where each segment starts, first[q * LS + l]. */
static void epx__part_first(const int64_t *n, int LS, int parts, bool by_peer, int64_t *first, int64_t *tot)
{
    int64_t at = 0;
    for (int q = 0; q < parts; q++) tot[q] = 0;
    for (int a = 0; a < parts * LS; a++) {
        int q, l;
        epx__seg(a, LS, parts, by_peer, &q, &l);
        if (first) first[q * LS + l] = at;
        at += n[q * LS + l], tot[q] += n[q * LS + l];
    }
}

/* The rank of host k that acts for source rank p there (its gateway). */
static int epx__gw(const epx__topo_t *t, int p, int k)
{
    return t->host_ranks[t->host_first[k] + t->lrank_of[p] % t->host_size[k]];
}

/* What the builder reads. */
typedef struct {
    epx__hier_plan_t P;
    const epx__topo_t *t;
    int chunks;
    int K, L, me;
    epx__eid_t ex;
    bool ll;
    int64_t slots;
    const int64_t *rslot; /* low-latency [rows, K]: row r's position among its expert's slots, at
                             the first k naming each of my experts; else -1 */
    const int64_t *yslot; /* low-latency [rows, K]: row r's slots here, its experts by local id */
    /* Up to 64 ranks: the ranks and the hosts each of my tokens goes to, as bit sets found
     * once (each pass over my tokens asked the routing again: K lookups a question); NULL
     * above 64 ranks, where the questions go to the routing. */
    const uint64_t *rset, *hset;
} epx__pb_t;

/* Does my token i go to host k / to rank q? */
static inline bool epx__mine_to_host(const epx__pb_t *b, int i, int k)
{
    if (b->hset) return (b->hset[i] >> k) & 1u;
    return epx__goes_host(b->t, b->P.topk + (size_t)i * b->K, b->K, &b->ex, k);
}
static inline bool epx__mine_to_rank(const epx__pb_t *b, int i, int q)
{
    if (b->rset) return (b->rset[i] >> q) & 1u;
    return epx__goes_rank(b->P.topk + (size_t)i * b->K, b->K, &b->ex, q);
}

/* The ranks my token i goes to, ascending, into ranks[K]; returns how many. */
static int epx__mine_ranks(const epx__pb_t *b, int i, int *ranks)
{
    if (!b->rset) return epx__topk_ranks(b->P.topk + (size_t)i * b->K, b->K, b->ex.rank, b->ex.nranks, ranks);
    int n = 0;
    for (uint64_t set = b->rset[i]; set; set &= set - 1) ranks[n++] = __builtin_ctzll(set);
    return n;
}

/* The part of the exchanges inside the host that token `tok` of source rank p takes here
 * (hier.h): EPX__HIER_LOCAL when p is on this host, else its chunk's. */
static int epx__part(const epx__pb_t *b, int p, int tok)
{
    if (b->t->host_of[p] == b->t->host) return EPX__HIER_LOCAL;
    return EPX__HIER_REMOTE + epx__chunk(b->chunks, b->P.src_tokens[p], tok);
}

/* Rows of the combine record of a token (routing tk) for rank q, which it goes to. */
static int64_t epx__rec_rows(const epx__pb_t *b, const int32_t *tk, int q)
{
    return b->ll ? epx__distinct_on(tk, b->K, &b->ex, q) : 1;
}

/* Row j of the combine record that starts at `ref`: in C1 or HOME rows lie back to back;
 * Y (mine, never copied) names my row r, whose low-latency rows are the slots of its
 * experts. */
static int64_t epx__rec_row(const epx__pb_t *b, int64_t ref, int j)
{
    if (!b->ll || EPX__HIER_REF_KIND(ref) != EPX__HIER_Y) return ref + j;
    return EPX__HIER_REF(EPX__HIER_Y, b->yslot[EPX__HIER_REF_INDEX(ref) * b->K + j]);
}

void epx__hier_xplan_free(epx__hier_xplan_t *x) { memset(x, 0, sizeof *x); } /* its memory is the handle's */

static void epx__need_add(size_t *bytes, int64_t n, size_t size)
{
    epx__arena_need_add(bytes, (size_t)EPX__MAX(n, (int64_t)0), size);
}

void epx__hier_xplan_need(const epx__hier_moe_t *m, bool ll, int T, int K, int64_t nent, int64_t nfwd, int64_t rows,
                          int64_t fan, size_t *plan, size_t *scratch)
{
    const epx__topo_t *t = epx__hier_topo(m->h);
    int64_t R = t->nranks, LS = t->local_size, NH = t->num_hosts, L = m->s.local_experts;
    int64_t C = EPX__HIER_MAX_CHUNKS, NP = 1 + C, KL = EPX__MIN((int64_t)K, L);
    /* The references (epx__hier_xplan_build: nref), each section at its most: gw (a token
     * per other host), fan, out, c1 (a row per distinct expert of mine), home (a forwarded
     * token's rows: at most one per expert), first, tok (one per valid k), then low latency
     * tk, rk, prow, pslot, psrc (a row per distinct expert of mine) and count. */
    int64_t nref = T * (NH - 1) + fan + rows + rows * (ll ? KL : 1) + nfwd * K + T + 1 + (int64_t)T * K;
    if (ll) nref += 2 * (int64_t)T * K + 3 * rows * KL + L;
    size_t a = 0, z = 0;
    epx__need_add(&a, 4 * R * C + 4 * NP * LS, 8);
    epx__need_add(&a, nref, 8);
    epx__need_add(&z, 2 * NP * LS, 8);                              /* lfirst */
    epx__need_add(&z, nent * LS, 8);                                /* ent_ref */
    epx__need_add(&z, C * NH, 8);                                   /* cur */
    epx__need_add(&z, C * R, 8);                                    /* fcur */
    epx__need_add(&z, nent, 8);                                     /* efidx */
    epx__need_add(&z, L, 8);                                        /* cnt */
    epx__need_add(&z, L + 1, 8);                                    /* pfirst */
    epx__need_add(&z, ll ? rows * K : 0, 8);                        /* rslot */
    epx__need_add(&z, ll ? rows * K : 0, 8);                        /* yslot */
    if (R <= 64) epx__need_add(&z, 2 * (int64_t)EPX__MAX(T, 1), 8); /* rset */
    *plan = a, *scratch = z;
}

epx_status_t epx__hier_xplan_build(epx__hier_moe_t *m, const epx__hier_moe_handle_t *h, bool by_peer, int chunks,
                                   epx__hier_xplan_t *x, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    const epx__topo_t *t = epx__hier_topo(m->h);
    int R = t->nranks, LS = t->local_size, NH = t->num_hosts, me = t->rank, ml = t->local_rank, A = t->host;
    int L = s->local_experts;
    epx__pb_t b;
    memset(&b, 0, sizeof b);
    epx__hier_moe_handle_plan(h, &b.P);
    const epx__hier_plan_t *P = &b.P;
    int K = P->K, T = P->T;
    b.K = K, b.L = L, b.me = me, b.ll = P->ll, b.slots = (int64_t)s->ll_slots;
    b.t = t, b.chunks = chunks;
    const int64_t *tf = P->to_first, *ff = P->from_first;
    int64_t rows = P->rows;
    memset(x, 0, sizeof *x);
    epx__arena_t *a = epx__hier_moe_handle_mem(h), *z = &m->tmp; /* the plan's arrays; the builder's */
    if (K > EPX_MOE_MAX_TOPK) return epx__fail(err, EPX_ERR_INTERNAL, "the row plan got top-k %d", K);
    if (chunks < 1 || chunks > EPX__HIER_MAX_CHUNKS)
        return epx__fail(err, EPX_ERR_INTERNAL, "the row plan got %d chunks", chunks);
    int C = chunks, NP = 1 + chunks;
    x->chunks = C, x->parts = NP;
    epx_status_t st = EPX_SUCCESS;
    x->mem = epx__arena_alloc(a, 4 * (size_t)R * (size_t)C + 4 * (size_t)NP * (size_t)LS, sizeof *x->mem, true);
    /* Where each part's segment from (to) each local rank starts in LRECV (C1). */
    int64_t *lfirst = epx__arena_alloc(z, 2 * (size_t)NP * (size_t)LS, sizeof *lfirst, false), *cfirst = NULL;
    int64_t *ent_ref = epx__arena_alloc(z, (size_t)(P->nent * LS), sizeof *ent_ref, false);
    /* Per (chunk, host): where the next home row lies in HOME; per (chunk, source): where
     * the next forwarded record lies in FWD; each forwarded entry's record there. */
    int64_t *cur = epx__arena_alloc(z, (size_t)C * (size_t)NH, sizeof *cur, true);
    int64_t *fcur = epx__arena_alloc(z, (size_t)C * (size_t)R, sizeof *fcur, true);
    int64_t *efidx = epx__arena_alloc(z, (size_t)P->nent, sizeof *efidx, false);
    int64_t *cnt = epx__arena_alloc(z, (size_t)L, sizeof *cnt, true);
    int64_t *pfirst = epx__arena_alloc(z, (size_t)L + 1, sizeof *pfirst, true);
    int64_t *rslot = epx__arena_alloc(z, (size_t)(b.ll ? rows * K : 0), sizeof *rslot, false);
    int64_t *yslot = epx__arena_alloc(z, (size_t)(b.ll ? rows * K : 0), sizeof *yslot, false);
    int ranks[EPX_MOE_MAX_TOPK];
    int64_t base[EPX_MOE_MAX_TOPK];
    uint64_t *rset = R <= 64 ? epx__arena_alloc(z, 2 * (size_t)EPX__MAX(T, 1), sizeof *rset, false) : NULL;
    if (!x->mem || !lfirst || !ent_ref || !cur || !fcur || !efidx || !cnt || !pfirst || !rslot || !yslot ||
        (R <= 64 && !rset)) {
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the row plan");
        goto done;
    }
    b.rslot = rslot, b.yslot = yslot;
    b.ex.rank = m->rank_of_expert, b.ex.nranks = R;
    for (int i = 0; rset && i < T; i++) {
        uint64_t rs = 0, hs = 0;
        for (int k = 0; k < K; k++) {
            int32_t e = P->topk[(size_t)i * K + k];
            if (e < 0) continue;
            rs |= (uint64_t)1 << b.ex.rank[e];
            hs |= (uint64_t)1 << m->host_of_expert[e];
        }
        rset[i] = rs, rset[T + i] = hs;
    }
    b.rset = rset, b.hset = rset ? rset + T : NULL;
    cfirst = lfirst + NP * LS;
    x->gw_chunk = x->mem, x->fwd_chunk = x->gw_chunk + C * R;
    x->home_send_chunk = x->fwd_chunk + C * R, x->home_recv_chunk = x->home_send_chunk + C * R;
    x->fan_send = x->home_recv_chunk + C * R, x->fan_recv = x->fan_send + NP * LS;
    x->back_send = x->fan_recv + NP * LS, x->back_recv = x->back_send + NP * LS;
    x->T = T, x->K = K, x->rows = rows, x->ll = b.ll;
    /* Dispatch: my tokens to my gateway on each other host; what my sources send me; the
     * fan-out to and from the other local ranks (mine to me is never copied). */
    for (int k = 0; k < NH; k++) {
        if (k == A) continue;
        int g = epx__gw(t, me, k);
        for (int i = 0; i < T; i++)
            if (epx__mine_to_host(&b, i, k)) x->gw_chunk[epx__chunk(C, T, i) * R + g]++, x->n_gw++;
    }
    for (int p = 0; p < R; p++) x->n_fwd += P->fwd_count[p];
    /* What my rail peers forward through me, chunk by chunk (FWD's layout, hier.h). */
    if (P->src_tokens[me] != T) {
        st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan has %lld tokens of mine, %d here",
                       (long long)P->src_tokens[me], T);
        goto done;
    }
    for (int64_t e = 0; e < P->nent; e++) {
        int p = P->ent_src[e];
        if (P->ent_fidx[e] >= 0) x->fwd_chunk[epx__chunk(C, P->src_tokens[p], P->ent_tok[e]) * R + p]++;
    }
    int64_t at = 0;
    for (int c = 0; c < C; c++)
        for (int p = 0; p < R; p++) fcur[c * R + p] = at, at += x->fwd_chunk[c * R + p];
    for (int64_t e = 0; e < P->nent; e++) {
        int p = P->ent_src[e];
        efidx[e] = P->ent_fidx[e] < 0 ? -1 : fcur[epx__chunk(C, P->src_tokens[p], P->ent_tok[e]) * R + p]++;
    }
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
        int64_t n = 0;
        for (int c = 0; c < C; c++) n += x->fwd_chunk[c * R + p];
        if (n != P->fwd_count[p])
            st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan forwards %lld of source %d's %lld tokens", (long long)n, p,
                           (long long)P->fwd_count[p]);
    }
    if (st != EPX_SUCCESS) goto done;
    if (tf[ml + 1] - tf[ml] != ff[ml + 1] - ff[ml] || x->n_fwd != P->nfwd) {
        st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan does not add up (%lld rows to myself, %lld from)",
                       (long long)(tf[ml + 1] - tf[ml]), (long long)(ff[ml + 1] - ff[ml]));
        goto done;
    }
    for (int64_t a = 0; a < ff[LS]; a++)
        if (P->from_row[a] < 0 || P->from_row[a] >= rows) {
            st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan names row %lld of %lld", (long long)P->from_row[a],
                           (long long)rows);
            goto done;
        }
    for (int l = 0; l < LS; l++) {
        if (l == ml) continue;
        for (int64_t a = tf[l]; a < tf[l + 1]; a++) {
            int64_t e = P->to_ent[a];
            x->fan_send[epx__part(&b, P->ent_src[e], P->ent_tok[e]) * LS + l]++;
        }
        for (int64_t a = ff[l]; a < ff[l + 1]; a++) {
            int64_t r = P->from_row[a];
            x->fan_recv[epx__part(&b, P->row_src[r], P->row_tok[r]) * LS + l]++;
        }
    }
    epx__part_first(x->fan_send, LS, NP, by_peer, NULL, x->n_fan);
    epx__part_first(x->fan_recv, LS, NP, by_peer, lfirst, x->n_lrecv);
    /* Low-latency slots: per local expert, my rows in row order (a row once per distinct
     * expert). */
    for (int64_t r = 0; b.ll && r < rows; r++) {
        const int32_t *tk = P->row_topk + r * K;
        for (int k = 0; k < K; k++) {
            rslot[r * K + k] = -1;
            if (tk[k] < 0 || b.ex.rank[tk[k]] != me) continue;
            bool dup = false;
            for (int j = 0; j < k; j++) dup = dup || tk[j] == tk[k];
            if (!dup) rslot[r * K + k] = cnt[tk[k] - me * L]++;
        }
    }
    for (int64_t r = 0; b.ll && r < rows; r++) {
        epx__tokex_t tx;
        int ne, at;
        epx__tokex(P->row_topk + r * K, K, &tx);
        at = epx__tokex_run(&tx, me, L, &ne);
        for (int j = 0; j < ne; j++)
            yslot[r * K + j] = (tx.id[at + j] - me * L) * b.slots + rslot[r * K + tx.kf[at + j]];
    }
    for (int l = 0; l < L; l++) pfirst[l + 1] = pfirst[l] + (b.ll ? cnt[l] : 0);
    x->n_place = pfirst[L];
    /* Combine: the rows I send back to each local forwarder, part by part (my rows from it,
     * in its order, those of the part); where the record of entry e from local rank l lies at
     * its forwarder (mine: my row in y; the others': in its part of what they sent back, from
     * its first row on); the rows each gateway sends home (per entry, local ranks ascending)
     * and those I get home from each gateway (per token, that host's ranks ascending). */
    for (int l = 0; l < LS; l++)
        for (int64_t a = ff[l]; a < ff[l + 1] && l != ml; a++) {
            int64_t r = P->from_row[a];
            x->back_send[epx__part(&b, P->row_src[r], P->row_tok[r]) * LS + l] += epx__rec_rows(&b, P->row_topk + r * K, me);
        }
    for (int l = 0; l < LS; l++)
        for (int64_t a = tf[l]; a < tf[l + 1] && l != ml; a++) {
            int64_t e = P->to_ent[a];
            x->back_recv[epx__part(&b, P->ent_src[e], P->ent_tok[e]) * LS + l] +=
                epx__rec_rows(&b, P->ent_topk + e * K, t->host_ranks[t->host_first[A] + l]);
        }
    epx__part_first(x->back_send, LS, NP, by_peer, NULL, x->n_back_send);
    epx__part_first(x->back_recv, LS, NP, by_peer, cfirst, x->n_back_recv);
    for (int64_t i = 0; i < P->nent * LS; i++) ent_ref[i] = -1;
    for (int l = 0; l < LS; l++) {
        int q = t->host_ranks[t->host_first[A] + l];
        for (int64_t a = tf[l]; a < tf[l + 1]; a++) {
            int64_t e = P->to_ent[a];
            if (l == ml) {
                ent_ref[e * LS + l] = EPX__HIER_REF(EPX__HIER_Y, P->from_row[ff[ml] + a - tf[ml]]);
                continue;
            }
            int64_t *c = &cfirst[epx__part(&b, P->ent_src[e], P->ent_tok[e]) * LS + l];
            ent_ref[e * LS + l] = EPX__HIER_REF(EPX__HIER_C1, *c);
            *c += epx__rec_rows(&b, P->ent_topk + e * K, q);
        }
    }
    for (int64_t e = 0; e < P->nent; e++) {
        int p = P->ent_src[e], c = epx__chunk(C, P->src_tokens[p], P->ent_tok[e]);
        if (t->host_of[p] == A) continue;
        for (int l = 0; l < LS; l++)
            if (ent_ref[e * LS + l] >= 0) {
                int64_t n = epx__rec_rows(&b, P->ent_topk + e * K, t->host_ranks[t->host_first[A] + l]);
                x->home_send_chunk[c * R + p] += n, x->n_home_send += n;
            }
    }
    for (int k = 0; k < NH; k++) {
        if (k == A) continue;
        int g = epx__gw(t, me, k);
        for (int i = 0; i < T; i++)
            for (int l = 0; l < t->host_size[k]; l++) {
                int q = t->host_ranks[t->host_first[k] + l];
                if (!epx__mine_to_rank(&b, i, q)) continue;
                int64_t n = epx__rec_rows(&b, P->topk + (size_t)i * K, q);
                x->home_recv_chunk[epx__chunk(C, T, i) * R + g] += n, x->n_home_recv += n;
            }
    }
    for (int i = 0; i < T; i++) {
        const int32_t *tk = P->topk + (size_t)i * K;
        if (!b.ll) x->n_tok += epx__mine_ranks(&b, i, ranks);
        for (int k = 0; k < K && b.ll; k++) x->n_tok += tk[k] >= 0;
    }
    /* The references, in one array: gw, fan, out, c1, home, first, tok, then (low-latency)
     * tk, rk, prow, pslot, psrc, count. */
    x->nref = (size_t)(x->n_gw + epx__hier_part_at(x->n_fan, NP) + rows + epx__hier_part_at(x->n_back_send, NP) +
                       x->n_home_send + T + 1 + x->n_tok);
    if (b.ll) x->nref += (size_t)(2 * x->n_tok + 3 * x->n_place + L);
    x->ref = epx__arena_alloc(a, x->nref, sizeof *x->ref, false);
    if (!x->ref) {
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the row plan");
        goto done;
    }
    int64_t *o = x->ref;
    x->gw = o;
    for (int c = 0; c < C; c++)
        for (int p = 0; p < R; p++) { /* segments by chunk, then by gateway rank */
            int k = t->host_of[p];
            if (k == A || epx__gw(t, me, k) != p) continue;
            for (int i = 0; i < T; i++)
                if (epx__chunk(C, T, i) == c && epx__mine_to_host(&b, i, k)) *o++ = EPX__HIER_REF(EPX__HIER_X, i);
        }
    x->fan = o;
    for (int g = 0; g < NP * LS; g++) {
        int part, l;
        epx__seg(g, LS, NP, by_peer, &part, &l);
        for (int64_t a = tf[l]; a < tf[l + 1] && l != ml; a++) {
            int64_t e = P->to_ent[a];
            if (epx__part(&b, P->ent_src[e], P->ent_tok[e]) != part) continue;
            *o++ = efidx[e] >= 0 ? EPX__HIER_REF(EPX__HIER_FWD, efidx[e]) : EPX__HIER_REF(EPX__HIER_X, P->ent_tok[e]);
        }
    }
    x->out = o;
    for (int64_t r = 0; r < rows; r++) o[r] = -1;
    for (int l = 0; l < LS; l++)
        for (int64_t a = ff[l]; a < ff[l + 1]; a++) {
            int64_t r = P->from_row[a], e = l == ml ? P->to_ent[tf[ml] + a - ff[ml]] : -1;
            o[r] = l != ml ? EPX__HIER_REF(EPX__HIER_LRECV, lfirst[epx__part(&b, P->row_src[r], P->row_tok[r]) * LS + l]++)
                   : efidx[e] >= 0 ? EPX__HIER_REF(EPX__HIER_FWD, efidx[e])
                                   : EPX__HIER_REF(EPX__HIER_X, P->ent_tok[e]);
        }
    for (int64_t r = 0; r < rows && st == EPX_SUCCESS; r++)
        if (o[r] < 0) st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan has no source for row %lld", (long long)r);
    if (st != EPX_SUCCESS) goto done;
    o += rows;
    x->c1 = o;
    for (int g = 0; g < NP * LS; g++) {
        int part, l;
        epx__seg(g, LS, NP, by_peer, &part, &l);
        for (int64_t a = ff[l]; a < ff[l + 1] && l != ml; a++) {
            int64_t r = P->from_row[a], n = epx__rec_rows(&b, P->row_topk + r * K, me);
            if (epx__part(&b, P->row_src[r], P->row_tok[r]) != part) continue;
            for (int j = 0; j < n; j++) *o++ = epx__rec_row(&b, EPX__HIER_REF(EPX__HIER_Y, r), j);
        }
    }
    x->home = o;
    for (int c = 0; c < C; c++) /* by chunk, then entry (source rank, token) */
        for (int64_t e = 0; e < P->nent; e++) {
            int p = P->ent_src[e];
            if (t->host_of[p] == A || epx__chunk(C, P->src_tokens[p], P->ent_tok[e]) != c) continue;
            for (int l = 0; l < LS; l++) {
                if (ent_ref[e * LS + l] < 0) continue;
                int64_t n = epx__rec_rows(&b, P->ent_topk + e * K, t->host_ranks[t->host_first[A] + l]);
                for (int j = 0; j < n; j++) *o++ = epx__rec_row(&b, ent_ref[e * LS + l], j);
            }
        }
    x->first = o;
    o += T + 1;
    x->tok = o;
    x->tk = b.ll ? x->tok + x->n_tok : NULL;
    x->rk = b.ll ? x->tk + x->n_tok : NULL;
    int64_t acc = 0, e0 = 0;
    for (int c = 0; c < C; c++)
        for (int p = 0; p < R; p++) { /* home rows lie by chunk, then by gateway rank */
            int k = t->host_of[p];
            if (k != A && epx__gw(t, me, k) == p) cur[c * NH + k] = acc, acc += x->home_recv_chunk[c * R + p];
        }
    for (int p = 0; p < me; p++) e0 += P->fwd_count[p]; /* my entries follow the lower sources' */
    x->first[0] = 0;
    for (int i = 0; i < T && st == EPX_SUCCESS; i++) {
        const int32_t *tk = P->topk + (size_t)i * K;
        int n = epx__mine_ranks(&b, i, ranks);
        if (e0 + i >= P->nent || P->ent_src[e0 + i] != me || P->ent_tok[e0 + i] != i) {
            st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan misplaces token %d", i);
            break;
        }
        /* The first row of each destination rank's record, in ascending rank order (low
         * latency: a record has a row per distinct expert there, by local id: tx's runs). */
        int64_t *ci = cur + epx__chunk(C, T, i) * NH;
        epx__tokex_t tx;
        int run_at[EPX_MOE_MAX_TOPK], run_len = 1;
        if (b.ll) epx__tokex(tk, K, &tx);
        for (int j = 0; j < n; j++) {
            int r = ranks[j], k = t->host_of[r];
            if (b.ll) run_at[j] = epx__tokex_run(&tx, r, L, &run_len);
            base[j] = k == A ? ent_ref[(e0 + i) * LS + t->lrank_of[r]] : EPX__HIER_REF(EPX__HIER_HOME, ci[k]);
            if (k != A) ci[k] += run_len;
            if (base[j] < 0) st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan misses token %d's row at rank %d", i, r);
        }
        int64_t m = 0;
        for (int j = 0; j < n && !b.ll; j++) o[m++] = base[j];
        for (int k = 0; k < K && b.ll && st == EPX_SUCCESS; k++) {
            if (tk[k] < 0) continue;
            int r = b.ex.rank[tk[k]], j = 0;
            while (j < n - 1 && ranks[j] != r) j++;
            x->tk[o - x->tok + m] = k, x->rk[o - x->tok + m] = r;
            o[m++] = epx__rec_row(&b, base[j], epx__tokex_at(&tx, tk[k]) - run_at[j]);
        }
        o += m;
        x->first[i + 1] = x->first[i] + m;
    }
    if (st != EPX_SUCCESS) goto done;
    if (b.ll) {
        /* Each filled slot: its row, its place, its source; in slot order. */
        o += 2 * x->n_tok; /* tk, rk */
        x->prow = o, x->pslot = o + x->n_place, x->psrc = o + 2 * x->n_place, x->count = o + 3 * x->n_place;
        for (int64_t r = 0; r < rows; r++) {
            const int32_t *tk = P->row_topk + r * K;
            for (int k = 0; k < K; k++) {
                if (rslot[r * K + k] < 0) continue;
                int l = tk[k] - me * L; /* rslot is set for my experts only */
                int64_t j = pfirst[l] + rslot[r * K + k];
                x->prow[j] = r, x->pslot[j] = l * b.slots + rslot[r * K + k];
                x->psrc[j] = (int64_t)((uint64_t)(uint32_t)P->row_src[r] << 32 | (uint32_t)P->row_tok[r]);
            }
        }
        for (int l = 0; l < L; l++) x->count[l] = cnt[l];
        o = x->count + L;
    }
    if ((size_t)(o - x->ref) != x->nref)
        st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan has %zu references, %zu expected", (size_t)(o - x->ref),
                       x->nref);
done:
    if (st != EPX_SUCCESS) epx__hier_xplan_free(x); /* what it took stays with the handle */
    return st;
}
