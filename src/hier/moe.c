/*
 * src/hier: MoE dispatch and combine across hosts (see hier.h for the scheme).
 *
 * Dispatch, on every rank:
 *   verdict  one alltoall of small fixed blocks: to every rank, my verdict on my arguments,
 *            my call (kind, top-k, handle) and the tokens I send it, its host and, as its
 *            gateway, its host's ranks — so that all ranks reach the same verdict before
 *            anything is written, and every gateway and receiver knows what it gets from
 *            whom (O(R) bytes per rank); then, as only a receiver knows its rows (and the
 *            memory of the steps below is sized by them), one allreduce of a few values
 *            tells every rank whose output capacity is short or who could not make that
 *            memory (a low-latency dispatch makes it for the most its static shapes allow
 *            before its verdict, and has no second round);
 *   tokens   my tokens' routing (token id, top-k, weights) and rows (and FP8 scales), one
 *            record each, to my gateway on each other host that holds one of their experts
 *            (MPI); then every rank of this host gets, from each local rank acting as
 *            forwarder, the records of the tokens it needs, ordered by (source rank, token)
 *            (shared memory). In a high-throughput dispatch, to a gateway alone on its
 *            host, rows of at least 512 bytes go in messages of their own, received in
 *            place in its output (every such record is its own row, already in output
 *            order): no copy out of the records; runs of consecutive tokens are sent from
 *            x where they lie, one message each (up to 32 runs a pair; else packed). A
 *            cached dispatch sends the rows alone along the handle.
 * A forwarder's *entries* are its own tokens and the tokens its sources sent it, ordered by
 * (source rank, token): each receiver merges the streams of its local forwarders into that
 * order, which is the output row order of the single-host backend, and copies each row
 * once into the caller's output.
 *
 * Cached dispatch, the low-latency slots (which rows go where) and both combines run the
 * handle's row plan (plan.c: the counts of every transfer and the source of every row
 * copy), the same plan the GPU path across hosts (src/xhost) runs on the device.
 *
 * Combine: every receiver sends its rows back to the forwarders they came from (shared
 * memory); each gateway sends the rows of its sources on other hosts home as they are
 * (MPI), and each home rank reduces every token's rows itself, in the single-host order
 * (ascending rank; low-latency: w[t,k] * y per expert rank in ascending k, then the ranks
 * ascending, one row per (token, expert)),
 * with the reduction of src/cpu. No partial sum crosses a host, so the result is the
 * single-host one bit for bit and no step waits for another host's reduction.
 *
 * Buffers that outlive a call (work buffers of the context) are reused; a handle's arrays
 * lie in an arena that a freed handle hands back to its context, and a call's own arrays in
 * the context's scratch arena: a warm call allocates only small index arrays.
 *
 * Every call allocates what it needs (buffers grown, room reserved in the arenas and in the
 * MPI link's requests, a handle's row plan built) before the ranks agree, and its outcome is
 * part of the agreement: a rank out of memory returns EPX_ERR_NO_MEMORY and the others
 * EPX_ERR_REMOTE_INVALID at once, nothing written. After it only the exchanges can fail,
 * among them src/cpu's mapping of a local rank's buffer that grew in the same call
 * (epx__left_peers covers that).
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { EPX__H_DISPATCH = 1, EPX__H_CACHED, EPX__H_COMBINE, EPX__H_LL_DISPATCH, EPX__H_LL_COMBINE };
static const char *const epx__h_op_names[] = {"?", "dispatch", "cached dispatch", "combine", "low-latency dispatch",
                                              "low-latency combine"};
/* Message steps of one operation (tags). */
enum { EPX__ST_TOKENS = 1, EPX__ST_ROWS = 2, EPX__ST_HOME = 3 };

struct epx__hier_moe_handle {
    uint32_t id;
    int mode;
    int T, K, has_w;
    int64_t rows;    /* rows received (high-throughput) */
    int32_t *topk;   /* [T, K] my routing */
    /* Forwarder side: entries ordered by (source, token). */
    int64_t nent;
    int32_t *ent_src, *ent_tok, *ent_topk; /* [nent], [nent], [nent, K] */
    int64_t *ent_fidx;                     /* row in the forwarded buffer, -1 for my own tokens */
    int64_t *fwd_count, *fwd_first;        /* [R]: tokens forwarded to me by each source */
    int64_t *src_tokens;                   /* [R]: each rank's token count in this dispatch */
    int64_t nfwd;
    int64_t *to_first; /* [LS + 1]: entries sent to each local rank, ... */
    int64_t *to_ent;   /* ... in entry order */
    /* Receiver side. */
    int64_t *from_first; /* [LS + 1]: records from each local forwarder, ... */
    int64_t *from_row;   /* ... and the merged position of each: (source, token) order */
    int64_t *row_rec;    /* [rows]: the record of each merged row (inverse of from_row) */
    int32_t *row_topk;   /* [rows, K]: the routing of each merged row */
    int32_t *row_src, *row_tok; /* [rows] */
    /* What calls along the (const) handle add to it: the row plan of the CPU path's calls
     * (epx__handle_plan), built by the first that needs it, then the same for every call
     * (by peer, the handle's chunks); and the arena every array of the handle lies in. */
    struct {
        bool built;
        epx__hier_xplan_t x;
        epx__arena_t mem;
    } *plan;
};

/* ---- Helpers ------------------------------------------------------------------------------ */

static const epx__topo_t *epx__t(const epx__hier_moe_t *m) { return epx__hier_topo(m->h); }

/* The rank of host k that acts for source rank p there. */
static int epx__gw(const epx__topo_t *t, int p, int k)
{
    return t->host_ranks[t->host_first[k] + t->lrank_of[p] % t->host_size[k]];
}

/* Does a token (top-k row) have an expert on rank q (which holds experts [q L, q L + L):
 * a range check, no division; -1 is in no range) / on host k (the context's table)? */
static bool epx__to_rank(const int32_t *topk, int K, int L, int q)
{
    int lo = q * L;
    for (int k = 0; k < K; k++)
        if ((unsigned)(topk[k] - lo) < (unsigned)L) return true;
    return false;
}

static bool epx__to_host(const epx__hier_moe_t *m, const int32_t *topk, int K, int host)
{
    for (int k = 0; k < K; k++)
        if (topk[k] >= 0 && m->host_of_expert[topk[k]] == host) return true;
    return false;
}

/* n elements from arena a (zeroed with `zero`); NULL once *st fails. */
static void *epx__aalloc(epx__arena_t *a, size_t n, size_t size, bool zero, epx_status_t *st, epx__errbuf_t *err)
{
    if (*st != EPX_SUCCESS) return NULL;
    void *p = epx__arena_alloc(a, n, size, zero);
    if (!p) *st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    return p;
}

/* EPX_FAULT nomem (epx__hier_fault_nomem): true once, where the call first allocates what it
 * needs; the verdict clears what no allocation took. */
static bool epx__fault_nomem(epx__hier_moe_t *m)
{
    bool f = m->h->fault_nomem;
    m->h->fault_nomem = false;
    return f;
}

/* v when in [0, L) (a local expert id), else -1; without a branch. */
static inline int32_t epx__lid_or_none(int32_t v, int L)
{
    int32_t in = -(int32_t)((unsigned)v < (unsigned)L); /* all ones when mine */
    return (v & in) | ~in;
}

/* Work buffer `i` of m with room for `bytes` (contents undefined); NULL once *st fails. */
static void *epx__buf(epx__hier_moe_t *m, int i, size_t bytes, epx_status_t *st, epx__errbuf_t *err)
{
    if (*st != EPX_SUCCESS) return NULL;
    if (i >= EPX__NREG) {
        *st = epx__hier_grow(&m->buf[i], &m->cap[i], EPX__MAX(bytes, (size_t)1), err);
        return *st == EPX_SUCCESS ? m->buf[i] : NULL;
    }
    if (m->buf[i] && m->cap[i] >= bytes) return m->buf[i];
    /* Peers are done with it: every exchange that exposed it has returned. */
    size_t want = EPX__MAX(EPX__MAX(bytes, (size_t)1 << 16), m->cap[i] + m->cap[i] / 2);
    if (m->buf[i]) epx__cpu_mem_free(m->h->cpu, m->buf[i], NULL);
    m->buf[i] = NULL, m->cap[i] = 0;
    void *p = NULL;
    *st = epx__cpu_mem_alloc(m->h->cpu, want, &p, err);
    if (*st != EPX_SUCCESS) return NULL;
    m->buf[i] = p, m->cap[i] = want;
    return p;
}

/* Exchange packed segments with the local ranks (byte counts per local rank): copied into
 * recv; or, with seg (recv NULL), src/cpu's zero-copy exchange: seg[l] points to what local
 * rank l sends me where it lies (send must be registered memory), until epx__route_end,
 * the exchange left open (m->fan_open) on success. */
static epx_status_t epx__local_exchange(epx__hier_moe_t *m, const void *send, const int64_t *sbytes, void *recv,
                                        const int64_t *rbytes, const char **seg, epx__errbuf_t *err)
{
    int LS = epx__t(m)->local_size;
    int64_t *d = m->h->lx, so = 0, ro = 0; /* [2 LS] of it: nothing to allocate mid-call */
    for (int l = 0; l < LS; l++) {
        d[l] = so, d[LS + l] = ro;
        so += sbytes[l], ro += rbytes[l];
    }
    epx__cpu_xfer_t x = {send, sbytes, d, recv, rbytes, d + LS};
    epx_status_t st = seg ? epx__cpu_exchange_begin(m->h->cpu, &x, seg, EPX_SUCCESS, err)
                          : epx__cpu_alltoallv(m->h->cpu, &x, EPX_SUCCESS, err);
    if (seg) m->fan_open = st == EPX_SUCCESS;
    return st;
}

static epx_status_t epx__local_xchg(epx__hier_moe_t *m, const void *send, const int64_t *sbytes, void *recv,
                                    const int64_t *rbytes, epx__errbuf_t *err)
{
    return epx__local_exchange(m, send, sbytes, recv, rbytes, NULL, err);
}

/* A failure after the verdict, before this rank did its part of the call's exchanges (an
 * exchange inside the host, e.g. mapping a local rank's buffer: what the call allocates
 * comes before the verdict): its peers wait in them for it. Tell the local ranks now (shared
 * memory: they fail at once instead of at their timeout) and have src/api break the
 * communicator (epx__hier_take_left) rather than leave it looking usable. */
static void epx__left_peers(epx__hier_moe_t *m, epx_status_t st)
{
    m->h->left = st;
    epx__cpu_mark_broken(m->h->cpu);
}

/* Close what epx__route left open, with the status of what came after it: returns after
 * the local ranks finished reading my records (then they may be rewritten). */
static epx_status_t epx__route_end(epx__hier_moe_t *m, epx_status_t st, epx__errbuf_t *err)
{
    if (!m->fan_open) return st;
    m->fan_open = false;
    return epx__cpu_exchange_end(m->h->cpu, st, err);
}

/* Exchange packed segments with other ranks over MPI (byte counts per rank, 0 = none);
 * segments lie back to back in rank order. */
static epx_status_t epx__net_xchg(epx__hier_moe_t *m, int tag, const char *send, const int64_t *sbytes, char *recv,
                                  const int64_t *rbytes, epx__errbuf_t *err)
{
    int R = epx__t(m)->nranks;
    const void **sp = m->h->sp; /* nothing to allocate mid-call */
    void **rp = m->h->rp;
    int64_t so = 0, ro = 0;
    for (int p = 0; p < R; p++) {
        sp[p] = send + so, rp[p] = recv + ro;
        so += sbytes[p], ro += rbytes[p];
    }
    return epx__hier_net_xchg(m->h, tag, sp, sbytes, rp, rbytes, err);
}

/* ---- Verdict --------------------------------------------------------------------------------- */

/* What a dispatch learns from the verdict: from my per_rank[R] (tokens I send each rank)
 * and per_host[hosts] (tokens I send each host), read when local is a success, every rank
 * gets lanes[l], the rows local rank l forwards it (rows in all), fwd_count[R], the tokens
 * each source sends it as their gateway (0 for the others), tokens[R], every rank's token
 * count (mine is T), and fan, the records it fans out inside its host (one per entry, its
 * own tokens and its sources', and rank of its host the entry has an expert on; self of
 * them to itself): what the routing step's buffers hold. */
typedef struct {
    const int32_t *per_rank, *per_host;
    int T;
    int64_t *lanes, *fwd_count, *tokens;
    int64_t rows, fan, self;
} epx__flows_t;

/* The block rank p sends rank q in the verdict's alltoall: p's card (its verdict on its own
 * arguments and, when that is a success, its call: operation, top-k, weights and, in a
 * dispatch, p's token count in the upper 32 bits) and, in a dispatch, the flows from p to q
 * (the tokens p sends q, and q's host; when q is p's gateway on another host, the sum over
 * that host's ranks of the tokens p sends each: the records q fans out for p; zero in other
 * calls). Blocks have one size in every call, so that ranks that made different calls
 * still complete the round and learn it. */
enum { EPX__V_STATUS, EPX__V_CALL, EPX__V_ROUTING, EPX__V_CARD };                   /* every call */
enum { EPX__V_TO_RANK = EPX__V_CARD, EPX__V_TO_HOST, EPX__V_TO_FAN, EPX__V_FLOWS }; /* a dispatch */
/* The second round of a high-throughput dispatch: ranks whose output is short, and the sums
 * of their rank, capacity and rows; ranks that could not make their routing step's arrays,
 * and the sums of their rank and status. */
enum { EPX__C_SHORT, EPX__C_RANK, EPX__C_CAPACITY, EPX__C_ROWS, EPX__C_FAILED, EPX__C_FRANK, EPX__C_FSTATUS, EPX__C_N };

/* Every call starts here: all ranks learn every rank's verdict on its arguments and its call
 * (kind, top-k, handle, weights) and reach the same verdict before anything is written.
 * One alltoall of small fixed blocks (every rank sees every card, so the verdict is the same
 * on every rank); with f (a dispatch), f->lanes, rows, fwd_count, tokens and fan get what
 * arrives (a high-throughput dispatch then meets again: epx__verdict_rows). */
static epx_status_t epx__verdict(epx__hier_moe_t *m, epx_status_t local, int op, int K, int has_w, uint32_t routing,
                                 epx__flows_t *f, epx__errbuf_t *err)
{
    const epx__topo_t *t = epx__t(m);
    /* One block size for every operation: ranks that called different operations must
     * still complete the same alltoall to learn that they did. */
    int R = t->nranks, me = t->rank, W = EPX__V_FLOWS, LS = t->local_size;
    int64_t *out = m->verdict, *in = out + (size_t)R * W; /* allocated at creation: every rank joins */
    int64_t fault = m->h->fault_count; /* EPX_FAULT count: announce a top-k one larger */
    m->h->fault_count = m->h->fault_nomem = false;
    memset(out, 0, sizeof *out * (size_t)R * W);
    for (int q = 0; q < R; q++) {
        int64_t *b = out + (size_t)q * W;
        b[EPX__V_STATUS] = local;
        if (local != EPX_SUCCESS) continue;
        b[EPX__V_CALL] = op | (int64_t)(K + fault) << 8 | (int64_t)has_w << 16 | (int64_t)(f ? f->T : 0) << 32;
        b[EPX__V_ROUTING] = routing;
        if (!f) continue;
        int k = t->host_of[q];
        b[EPX__V_TO_RANK] = f->per_rank[q], b[EPX__V_TO_HOST] = f->per_host[k];
        for (int l = 0; k != t->host && epx__gw(t, me, k) == q && l < t->host_size[k]; l++)
            b[EPX__V_TO_FAN] += f->per_rank[t->host_ranks[t->host_first[k] + l]];
    }
    epx_status_t st = m->h->link.alltoall(m->h->link.ctx, out, in, W, err);
    if (st == EPX_SUCCESS && local != EPX_SUCCESS) st = local;
    for (int p = 0; p < R && st == EPX_SUCCESS; p++)
        if (in[(size_t)p * W + EPX__V_STATUS] != EPX_SUCCESS)
            st = epx__fail(err, EPX_ERR_REMOTE_INVALID, "rank %d rejected its arguments (%s); nothing was changed", p,
                           epx_status_name((epx_status_t)in[(size_t)p * W + EPX__V_STATUS]));
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
        const int64_t *o = in + (size_t)p * W;
        int64_t call = o[EPX__V_CALL];
        int oop = (int)(call & 0xff), ok = (int)(call >> 8 & 0xff), ow = (int)(call >> 16 & 1);
        if (oop != op)
            st = epx__fail(err, EPX_ERR_MISMATCH, "rank %d called %s while rank %d called %s", p,
                           epx__h_op_names[oop >= 1 && oop <= 5 ? oop : 0], me, epx__h_op_names[op]);
        else if (ok != K)
            st = epx__fail(err, EPX_ERR_MISMATCH, "rank %d passed topk = %d, rank %d passed %d", p, ok, me, K);
        else if (o[EPX__V_ROUTING] != routing)
            st = epx__fail(err, EPX_ERR_MISMATCH,
                           "rank %d passed the handle of another dispatch than rank %d (operation %u vs %u)", p, me,
                           (unsigned)o[EPX__V_ROUTING], routing);
        else if (ow != has_w)
            st = epx__fail(err, EPX_ERR_MISMATCH, "rank %d %s topk_weights, rank %d %s", p,
                           ow ? "passed" : "did not pass", me, has_w ? "did" : "did not");
    }
    if (st != EPX_SUCCESS || !f) return st;

    /* Source p's tokens for me pass through local rank lrank(p) % LS of my host; as p's
     * gateway on my host I forward the tokens p sends my host, to each local rank those it
     * sends that rank (to me: those it sends me). */
    f->rows = 0, f->fan = f->self = f->per_rank[me];
    memset(f->lanes, 0, sizeof *f->lanes * (size_t)LS);
    for (int l = 0; l < LS; l++)
        if (l != t->local_rank) f->fan += f->per_rank[t->host_ranks[t->host_first[t->host] + l]];
    for (int p = 0; p < R; p++) {
        const int64_t *b = in + (size_t)p * W;
        bool src = t->host_of[p] != t->host && epx__gw(t, p, t->host) == me;
        f->lanes[t->lrank_of[p] % LS] += b[EPX__V_TO_RANK];
        f->fwd_count[p] = src ? b[EPX__V_TO_HOST] : 0;
        f->tokens[p] = b[EPX__V_CALL] >> 32;
        f->rows += b[EPX__V_TO_RANK];
        if (src) f->fan += b[EPX__V_TO_FAN], f->self += b[EPX__V_TO_RANK];
    }
    return EPX_SUCCESS;
}

/* The second round of a high-throughput dispatch, after a verdict that succeeded (then on
 * every rank): one allreduce of the ranks whose capacity is below the rows they receive and
 * of those whose routing step's arrays could not be made (`local`: this rank's outcome;
 * the rows are what the verdict told), so that every rank fails alike: a rank that failed
 * with its own status (a short one EPX_ERR_INVALID_ARGUMENT), the others with
 * EPX_ERR_REMOTE_INVALID; nothing is written. */
static epx_status_t epx__verdict_rows(epx__hier_moe_t *m, epx_status_t local, int64_t capacity, int64_t n,
                                      epx__errbuf_t *err)
{
    int me = epx__t(m)->rank;
    bool short_me = n > capacity, fail_me = local != EPX_SUCCESS;
    int64_t c[EPX__C_N] = {short_me, short_me ? me : 0, short_me ? capacity : 0, short_me ? n : 0,
                           fail_me,  fail_me ? me : 0,  fail_me ? local : 0};
    EPX__CHECK(m->h->link.allreduce_sum(m->h->link.ctx, c, EPX__C_N, err));
    if (fail_me) return local; /* (its message is in err) */
    if (c[EPX__C_SHORT] == 0 && c[EPX__C_FAILED] == 0) return EPX_SUCCESS;
    if (short_me && c[EPX__C_SHORT] == 1)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT,
                         "out.capacity = %lld rows, but this rank receives %lld (num_recv_tokens tells)",
                         (long long)capacity, (long long)n);
    if (short_me)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT,
                         "out.capacity = %lld rows, but this rank receives %lld (num_recv_tokens tells); "
                         "%lld other ranks' out.capacity is short too",
                         (long long)capacity, (long long)n, (long long)c[EPX__C_SHORT] - 1);
    if (c[EPX__C_FAILED] == 1)
        return epx__fail(err, EPX_ERR_REMOTE_INVALID,
                         "rank %d could not make its part of the dispatch (%s); nothing was changed",
                         (int)c[EPX__C_FRANK], epx_status_name((epx_status_t)c[EPX__C_FSTATUS]));
    if (c[EPX__C_FAILED] > 1)
        return epx__fail(err, EPX_ERR_REMOTE_INVALID,
                         "%lld ranks could not make their part of the dispatch; nothing was changed",
                         (long long)c[EPX__C_FAILED]);
    if (c[EPX__C_SHORT] == 1)
        return epx__fail(err, EPX_ERR_REMOTE_INVALID,
                         "rank %d's out.capacity (%lld rows) is below the %lld it receives", (int)c[EPX__C_RANK],
                         (long long)c[EPX__C_CAPACITY], (long long)c[EPX__C_ROWS]);
    return epx__fail(err, EPX_ERR_REMOTE_INVALID, "%lld ranks' out.capacity is below the rows they receive",
                     (long long)c[EPX__C_SHORT]);
}

/* ---- Create / destroy ------------------------------------------------------------------------ */

epx_status_t epx__hier_moe_create(epx__hier_t *h, const epx__moe_shape_t *shape, uint64_t config_hash,
                                  epx_status_t local, epx__hier_moe_t **out, epx__errbuf_t *err)
{
    epx__hier_moe_t *m = calloc(1, sizeof *m);
    if (!m) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    m->h = h;
    m->s = *shape;
    if (local == EPX_SUCCESS && shape->ll_fp8) {
        size_t sb = shape->scale_format == EPX_SCALE_UE8M0 ? 1 : 4;
        m->ll_q = malloc(EPX__MAX((size_t)shape->max_tokens * (size_t)shape->hidden, (size_t)1));
        m->ll_scales = malloc(EPX__MAX((size_t)shape->max_tokens * shape->scale_cols * sb, (size_t)1));
        if (!m->ll_q || !m->ll_scales) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    }
    const epx__topo_t *t = epx__hier_topo(h);
    int R = t->nranks;
    m->verdict = malloc(sizeof *m->verdict * 2 * (size_t)R * EPX__V_FLOWS);
    if (local == EPX_SUCCESS) /* a valid shape: E = R * L */
        m->rank_of_expert = malloc(2 * sizeof *m->rank_of_expert * (size_t)EPX__MAX(shape->num_experts, 1));
    if ((!m->verdict || !m->rank_of_expert) && local == EPX_SUCCESS)
        local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    /* The MPI link's collectives work in a buffer of the net's: room for the verdict's now
     * (a call that grew it would leave its peers in the verdict when that failed). */
    if (local == EPX_SUCCESS && h->net)
        local = epx__net_room(h->net, 2 * (size_t)R * (size_t)EPX__MAX((int)EPX__V_FLOWS, (int)EPX__C_N), 0, err);
    if (local == EPX_SUCCESS) m->host_of_expert = m->rank_of_expert + shape->num_experts;
    for (int e = 0; local == EPX_SUCCESS && e < shape->num_experts; e++) {
        m->rank_of_expert[e] = e / shape->local_experts;
        m->host_of_expert[e] = t->host_of[m->rank_of_expert[e]];
    }
    int64_t *v = calloc(2 * (size_t)R, sizeof *v);
    epx_status_t st = v ? EPX_SUCCESS : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (st == EPX_SUCCESS) {
        v[t->rank] = local;
        /* EPX_MOE_CHUNKS shapes every call's plan: a rank with another fails here. */
        uint64_t chunks = (uint64_t)epx__param_int(EPX__P_MOE_CHUNKS);
        v[R + t->rank] = (int64_t)(config_hash ^ (chunks * 0x9E3779B97F4A7C15ull));
        st = h->link.allreduce_sum(h->link.ctx, v, 2 * R, err);
    }
    if (st == EPX_SUCCESS && local != EPX_SUCCESS) st = local;
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
        if (v[p] != EPX_SUCCESS)
            st = epx__fail(err, EPX_ERR_REMOTE_INVALID, "rank %d rejected its MoE configuration (%s)", p,
                           epx_status_name((epx_status_t)v[p]));
        else if (v[R + p] != v[R + t->rank])
            st = epx__fail(err, EPX_ERR_MISMATCH, "rank %d's MoE configuration (or EPX_MOE_CHUNKS) differs from rank %d's",
                           p, t->rank);
    }
    free(v);
    if (st != EPX_SUCCESS) {
        epx__hier_moe_destroy(m);
        return st;
    }
    *out = m;
    return EPX_SUCCESS;
}

void epx__hier_moe_destroy(epx__hier_moe_t *m)
{
    if (!m) return;
    free(m->ll_q);
    free(m->ll_scales);
    free(m->verdict);
    free(m->rank_of_expert);
    epx__arena_free(&m->spare), epx__arena_free(&m->tmp);
    for (int i = 0; i < EPX__NBUF; i++) {
        if (i < EPX__NREG && m->buf[i]) epx__cpu_mem_free(m->h->cpu, m->buf[i], NULL);
        if (i >= EPX__NREG) free(m->buf[i]);
    }
    free(m);
}

void epx__hier_moe_handle_free(epx__hier_moe_t *m, epx__hier_moe_handle_t *h)
{
    if (!h) return;
    if (h->plan) {
        if (h->plan->built) epx__hier_xplan_free(&h->plan->x);
        epx__arena_t *a = &h->plan->mem;
        epx__arena_reset(a);
        if (m && epx__arena_capacity(a) >= epx__arena_capacity(&m->spare)) {
            epx__arena_t keep = *a; /* the larger of the two stays with the context */
            *a = m->spare, m->spare = keep;
        }
        epx__arena_free(a);
    }
    free(h->plan);
    free(h);
}

epx__arena_t *epx__hier_moe_handle_mem(const epx__hier_moe_handle_t *h) { return &h->plan->mem; }

int64_t epx__hier_moe_handle_rows(const epx__hier_moe_handle_t *h) { return h->rows; }
int epx__hier_moe_handle_tokens(const epx__hier_moe_handle_t *h) { return h->T; }
int epx__hier_moe_handle_topk(const epx__hier_moe_handle_t *h) { return h->K; }

/* ---- Routing: meta step ----------------------------------------------------------------------- */

/* Token rows that travel with the routing: my token i is pb bytes at x + i * pb, then sb
 * bytes of scales at xs + i * sb (xs may be NULL when sb = 0). */
typedef struct {
    const char *x, *xs;
    size_t pb, sb;
} epx__payload_t;

/* Where each merged row's payload lies once epx__route returns: pay[r], and its scales at
 * scl[r] when the payload has them (else scl is NULL): a record another local rank packed
 * for me (in its memory: valid until epx__route_end), a record a source sent me as its
 * gateway, or my own token's row (valid until the context's next call, as both arrays,
 * which lie in its scratch); pay[r] NULL for a row received in place in the caller's
 * output (its scales then lie in the short record its source sent me). */
typedef struct {
    const char **pay, **scl;
} epx__rowsrc_t;

/* Where entry e's payload lies (*scl: its scales, NULL without): in the record its source
 * sent me (fwd, records of `rec` bytes, the payload at `mrec`; with `direct` the record
 * holds the scales alone, there, and the row is already in the caller's output: NULL), or
 * my token's row. */
static const char *epx__ent_src(const epx__hier_moe_handle_t *hd, const epx__payload_t *pl, const char *fwd, size_t rec,
                                size_t mrec, bool direct, int64_t e, const char **scl)
{
    if (hd->ent_fidx[e] >= 0) {
        const char *pay = fwd + (size_t)hd->ent_fidx[e] * rec + mrec;
        *scl = pl->sb ? pay + (direct ? 0 : pl->pb) : NULL;
        return direct ? NULL : pay;
    }
    *scl = pl->sb ? pl->xs + (size_t)hd->ent_tok[e] * pl->sb : NULL;
    return pl->x + (size_t)hd->ent_tok[e] * pl->pb;
}

/* Rows of at least this many bytes go straight into the output of a gateway alone on its
 * host (epx__route): below it the extra rounds (one per run, up to EPX__DIRECT_RUNS) cost
 * more than the copies they save. */
#define EPX__DIRECT_MIN 512

/* Rows that go straight to a rank travel as runs of consecutive tokens, one message each,
 * sent from the caller's x where they lie (no packing), when a pair has at most this many
 * runs; else packed into one message. */
#define EPX__DIRECT_RUNS 32

/* The runs of consecutive token ids among those added (ascending), at most
 * EPX__DIRECT_RUNS: first token and length of each; n = -1 when there are more. */
typedef struct {
    int n;
    int32_t first[EPX__DIRECT_RUNS], len[EPX__DIRECT_RUNS];
} epx__runs_t;

static void epx__runs_add(epx__runs_t *r, int32_t tok)
{
    if (r->n < 0) return;
    if (r->n > 0 && r->first[r->n - 1] + r->len[r->n - 1] == tok) {
        r->len[r->n - 1]++;
        return;
    }
    if (r->n == EPX__DIRECT_RUNS) {
        r->n = -1;
        return;
    }
    r->first[r->n] = tok, r->len[r->n] = 1, r->n++;
}

/* Does a high-throughput dispatch's rows go straight to rank p (alone on its host)? The
 * same answer on every rank: from the shape and the topology. */
static bool epx__direct_to(const epx__hier_moe_t *m, const epx__payload_t *pl, bool ht, int p)
{
    const epx__topo_t *t = epx__t(m);
    return ht && pl->pb >= EPX__DIRECT_MIN && t->host_size[t->host_of[p]] == 1;
}

/* What a dispatch's routing step (epx__route) works with, made before the ranks agree
 * (epx__route_prep, epx__route_room) so that once they did the step allocates nothing: a
 * rank out of memory then fails in the vote with every rank, instead of leaving its peers in
 * the step's exchanges. Sizes of a record (src, token, top-k, weights; then the payload):
 * its routing, the whole record (aligned), one whose row goes straight, those I get. Per
 * rank and per local rank, in the call's scratch: the arrays of the exchanges below. */
typedef struct {
    size_t mrec, rec, drec, rin;
    bool din;                                 /* rows reach me straight */
    int64_t *sc, *sb, *rb, *xsb, *xrb, *xoff; /* [R]; xoff: where p's next rows go in my output */
    const void **xsp;                         /* [R] */
    void **xrp;                               /* [R] */
    const char **xpack;                       /* [R]: where my packed rows to p lie */
    epx__runs_t *srun, *rrun;                 /* [R]: runs of my tokens to p, of p's to me (straight) */
    int64_t *lsb, *lrb, *lcnt, *lrc;          /* [LS] */
    const char **lseg;                        /* [LS] */
    int64_t stot, xtot;                       /* bytes to my gateways: records, then rows packed */
    int64_t dtot;                             /* bytes of my rows that go straight (packed or not) */
} epx__rt_t;

/* Before the verdict (my arguments passed): the routing step's arrays, the handle's [R]
 * ones, and the send buffer to my gateways, which my own routing sizes (f's per_host): my
 * tokens' records for each other host and, to a gateway alone on its host that more than
 * EPX__DIRECT_RUNS runs of my tokens reach straight, their rows packed. Local. */
static epx_status_t epx__route_prep(epx__hier_moe_t *m, epx__hier_moe_handle_t *hd, const epx__payload_t *pl, bool ht,
                                    const epx__flows_t *f, epx__rt_t *rt, epx__errbuf_t *err)
{
    const epx__topo_t *t = epx__t(m);
    int R = t->nranks, me = t->rank, LS = t->local_size, K = hd->K, T = hd->T, W = hd->has_w ? K : 0;
    epx__arena_t *hm = &hd->plan->mem, *tmp = &m->tmp;
    epx_status_t st = EPX_SUCCESS;
    memset(rt, 0, sizeof *rt);
    rt->mrec = sizeof(int32_t) * (size_t)(2 + K + W);
    rt->rec = EPX__ALIGN_UP(rt->mrec + pl->pb + pl->sb, sizeof(int64_t)); /* records stay aligned */
    rt->drec = EPX__ALIGN_UP(rt->mrec + pl->sb, sizeof(int64_t));
    rt->din = epx__direct_to(m, pl, ht, me);
    rt->rin = rt->din ? rt->drec : rt->rec;
    int64_t **r64[] = {&rt->sc, &rt->sb, &rt->rb, &rt->xsb, &rt->xrb, &rt->xoff};
    for (size_t i = 0; i < sizeof r64 / sizeof *r64; i++)
        *r64[i] = epx__aalloc(tmp, (size_t)R, 8, true, &st, err);
    int64_t **l64[] = {&rt->lsb, &rt->lrb, &rt->lcnt, &rt->lrc};
    for (size_t i = 0; i < sizeof l64 / sizeof *l64; i++)
        *l64[i] = epx__aalloc(tmp, (size_t)LS, 8, true, &st, err);
    rt->xsp = epx__aalloc(tmp, (size_t)R, sizeof *rt->xsp, true, &st, err);
    rt->xrp = epx__aalloc(tmp, (size_t)R, sizeof *rt->xrp, true, &st, err);
    rt->xpack = epx__aalloc(tmp, (size_t)R, sizeof *rt->xpack, true, &st, err);
    rt->srun = epx__aalloc(tmp, (size_t)R, sizeof *rt->srun, true, &st, err);
    rt->rrun = epx__aalloc(tmp, (size_t)R, sizeof *rt->rrun, true, &st, err);
    rt->lseg = epx__aalloc(tmp, (size_t)LS, sizeof *rt->lseg, true, &st, err);
    hd->fwd_count = epx__aalloc(hm, (size_t)R, 8, false, &st, err);
    hd->fwd_first = epx__aalloc(hm, (size_t)R, 8, false, &st, err);
    hd->src_tokens = epx__aalloc(hm, (size_t)R, 8, false, &st, err);
    if (st != EPX_SUCCESS) return st;
    /* Counts: my tokens per other host, to my gateway there. Rows that go straight travel
     * either as runs of my tokens, read from x where they lie, or (more runs than
     * EPX__DIRECT_RUNS) packed in the same order after every record. */
    for (int k = 0; k < t->num_hosts; k++)
        if (k != t->host) rt->sc[epx__gw(t, me, k)] = f->per_host[k];
    for (int p = 0; p < R; p++) {
        bool dout = epx__direct_to(m, pl, ht, p);
        for (int64_t i = 0; dout && rt->sc[p] && i < T; i++)
            if (epx__to_host(m, hd->topk + i * K, K, t->host_of[p])) epx__runs_add(&rt->srun[p], (int32_t)i);
        rt->sb[p] = rt->sc[p] * (int64_t)(dout ? rt->drec : rt->rec), rt->stot += rt->sb[p];
        if (dout && rt->srun[p].n < 0) rt->xtot += rt->sc[p] * (int64_t)pl->pb;
        if (dout) rt->dtot += rt->sc[p] * (int64_t)pl->pb;
    }
    (void)epx__buf(m, EPX__B_SEND, (size_t)(rt->stot + rt->xtot), &st, err);
    return st;
}

/* The sizes the rest of a routing step takes: tokens my sources forward me, rows I receive,
 * entries I fan out to the local ranks (self of them to myself). */
typedef struct {
    int64_t nfwd, rows, fan, self;
} epx__rt_size_t;

/* The rest of a routing step's memory for sizes n, exact (what the verdict told) or bounds
 * (a low-latency dispatch, before its verdict; with `plan`, room for the row plan the
 * dispatch then builds): the buffers of the records forwarded to me (FWD) and of those to
 * the local ranks (LSEND), room in the handle's memory and the call's scratch for every
 * array epx__route (and epx__hier_xplan_build) makes there, and the MPI link's room for the
 * step's batches (the records; the rows that go straight, each exchange of them at most all
 * of them). Local. */
static epx_status_t epx__route_room(epx__hier_moe_t *m, epx__hier_moe_handle_t *hd, const epx__rt_t *rt,
                                    const epx__payload_t *pl, const epx__rt_size_t *n, bool plan, epx__errbuf_t *err)
{
    int LS = epx__t(m)->local_size, K = hd->K, W = hd->has_w ? K : 0;
    size_t nent = (size_t)hd->T + (size_t)n->nfwd, rows = (size_t)n->rows, hb = 0, tb = 0;
    epx__arena_need_add(&hb, nent, 4), epx__arena_need_add(&hb, nent, 4), epx__arena_need_add(&hb, nent * (size_t)K, 4);
    epx__arena_need_add(&hb, nent, 8), epx__arena_need_add(&hb, (size_t)LS + 1, 8), epx__arena_need_add(&hb, (size_t)LS + 1, 8);
    epx__arena_need_add(&hb, (size_t)n->fan, 8), epx__arena_need_add(&hb, rows, 8), epx__arena_need_add(&hb, rows, 8);
    epx__arena_need_add(&hb, rows * (size_t)K, 4), epx__arena_need_add(&hb, rows, 4), epx__arena_need_add(&hb, rows, 4);
    epx__arena_need_add(&tb, nent * (size_t)W, 4), epx__arena_need_add(&tb, rows, sizeof(char *));
    if (pl->sb) epx__arena_need_add(&tb, rows, sizeof(char *));
    if (W) epx__arena_need_add(&tb, rows * (size_t)K, 4);
    if (plan) {
        size_t pa, pz;
        epx__hier_xplan_need(m, hd->mode == EPX_MOE_LOW_LATENCY, hd->T, K, (int64_t)nent, n->nfwd, n->rows,
                             n->fan - n->self, &pa, &pz);
        epx__arena_need_add(&hb, pa, 1), epx__arena_need_add(&tb, pz, 1);
    }
    epx_status_t st = EPX_SUCCESS;
    (void)epx__buf(m, EPX__B_FWD, (size_t)n->nfwd * rt->rin, &st, err);
    (void)epx__buf(m, EPX__B_LSEND, (size_t)(n->fan - n->self) * rt->rec, &st, err);
    if (st == EPX_SUCCESS && (!epx__arena_reserve(&hd->plan->mem, hb) || !epx__arena_reserve(&m->tmp, tb)))
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the routing step (%zu and %zu bytes)", hb, tb);
    int64_t net = EPX__MAX(rt->stot + n->nfwd * (int64_t)rt->rin, rt->dtot + (rt->din ? n->nfwd * (int64_t)pl->pb : 0));
    if (st == EPX_SUCCESS && m->h->net) st = epx__net_room(m->h->net, 0, net, err);
    return st;
}

/* Send my routing and rows to my gateways, build the entries, fan both out to the other
 * local ranks and merge what arrives, with my entries for me, into (source, token) order:
 * two steps (MPI, then shared memory), sized by what the verdict told (f), with what
 * epx__route_prep and epx__route_room made (rt; the arrays below take the room reserved).
 * Fills the handle; writes nothing of the caller's but, with xout (a high-throughput
 * dispatch: the caller's recv_x, its capacity checked), the rows that reach me straight:
 * when I am alone on my host, every record a source sends me is a row of mine, and they
 * lie in my output in the order they come (sources ascending, then tokens). Their rows
 * then travel in messages of their own, received in place (epx__direct_to), and the
 * records keep the routing and scales. `w` = my weights [T, K] when hd->has_w; then *row_w
 * gets the weights of every merged row. On success *rs says where each merged row's
 * payload lies (pay[r] NULL without payload, or when the row is in place); with payload
 * some of it lies in other local ranks' memory: the exchange stays open, and the caller,
 * once it has read the rows, calls epx__route_end (also when it fails meanwhile). */
static epx_status_t epx__route(epx__hier_moe_t *m, epx__hier_moe_handle_t *hd, const float *w, const epx__payload_t *pl,
                               bool ht, char *xout, const epx__flows_t *f, const epx__rt_t *rt, uint32_t seq,
                               float **row_w, epx__rowsrc_t *rs, epx__errbuf_t *err)
{
    const epx__topo_t *t = epx__t(m);
    int R = t->nranks, me = t->rank, LS = t->local_size, ml = t->local_rank, L = m->s.local_experts, K = hd->K;
    int T = hd->T, W = hd->has_w ? K : 0;
    size_t mrec = rt->mrec, rec = rt->rec, drec = rt->drec, rin = rt->rin;
    bool din = rt->din;
    rs->pay = rs->scl = NULL;
    epx_status_t st = EPX_SUCCESS;
    bool met = false; /* reached the local exchange: from there src/cpu tells the local ranks */
    int64_t *sc = rt->sc, *sb = rt->sb, *rb = rt->rb, *xsb = rt->xsb, *xrb = rt->xrb, *xoff = rt->xoff;
    const void **xsp = rt->xsp;
    void **xrp = rt->xrp;
    const char **xpack = rt->xpack;
    epx__runs_t *srun = rt->srun, *rrun = rt->rrun;
    int64_t *lsb = rt->lsb, *lrb = rt->lrb, *lcnt = rt->lcnt, *lrc = rt->lrc;
    const char **lseg = rt->lseg;                      /* [LS]: what each local rank sends me, where it lies */
    epx__arena_t *hm = &hd->plan->mem, *tmp = &m->tmp; /* the handle's arrays; this call's */
    char *sbuf = NULL, *rbuf = NULL;
    memcpy(hd->fwd_count, f->fwd_count, sizeof(int64_t) * (size_t)R);
    memcpy(hd->src_tokens, f->tokens, sizeof(int64_t) * (size_t)R);
    /* Routing records to the gateways, in token order (the rows that go straight after
     * them, epx__route_prep). Rows that reach me straight: source p's right after the rows
     * of the sources below it (mine: my tokens for me). */
    int64_t stot = rt->stot, rtot = 0, at = 0;
    for (int p = 0; p < R; p++) {
        rb[p] = hd->fwd_count[p] * (int64_t)rin, rtot += rb[p];
        hd->fwd_first[p] = hd->nfwd;
        hd->nfwd += hd->fwd_count[p];
    }
    for (int p = 0; din && p < R; p++) /* (fwd_count[me] is 0; per_rank[me]: my tokens for me) */
        xoff[p] = at, at += p == me ? f->per_rank[me] : hd->fwd_count[p];
    sbuf = epx__buf(m, EPX__B_SEND, (size_t)(stot + rt->xtot), &st, err);
    rbuf = epx__buf(m, EPX__B_FWD, (size_t)rtot, &st, err);
    if (st != EPX_SUCCESS) goto done;
    {
        char *o = sbuf, *xo = sbuf + stot;
        for (int p = 0; p < R; p++) {
            bool dout = epx__direct_to(m, pl, ht, p), pack = dout && srun[p].n < 0;
            xpack[p] = xo;
            if (!sc[p]) continue;
            for (int64_t i = 0; i < T; i++) {
                if (!epx__to_host(m, hd->topk + i * K, K, t->host_of[p])) continue;
                int32_t *r = (int32_t *)o;
                r[0] = me, r[1] = (int32_t)i;
                memcpy(r + 2, hd->topk + i * K, sizeof(int32_t) * (size_t)K);
                if (W) memcpy(r + 2 + K, w + i * K, sizeof(float) * (size_t)K);
                char *row = pack ? xo : dout ? NULL : o + mrec, *scales = o + mrec + (dout ? 0 : pl->pb);
                if (pl->pb && row) memcpy(row, pl->x + (size_t)i * pl->pb, pl->pb);
                if (pl->sb) memcpy(scales, pl->xs + (size_t)i * pl->sb, pl->sb);
                o += dout ? drec : rec, xo += pack ? pl->pb : 0;
            }
        }
    }
    EPX__CHECK_GOTO(epx__net_xchg(m, epx__hier_tag(seq, EPX__ST_TOKENS), sbuf, sb, rbuf, rb, err), st, done);
    /* The rows that go straight: exchange j moves each pair's run j (a packed pair: all in
     * exchange 0), so that both ends of a pair see its messages in one order. The runs of
     * what a source sends me come from its records (their token ids), as it found them.
     * Point to point: a pair with nothing to move posts nothing, and a rank stops after its
     * own last message. A failed wait leaves rows of the caller's output written (outputs
     * are undefined after such a status). */
    if (ht && pl->pb >= EPX__DIRECT_MIN) {
        int calls = 0;
        for (int p = 0; p < R; p++) {
            for (int64_t j = 0; din && j < hd->fwd_count[p]; j++)
                epx__runs_add(&rrun[p], ((const int32_t *)(rbuf + (size_t)(hd->fwd_first[p] + j) * rin))[1]);
            bool dout = epx__direct_to(m, pl, ht, p);
            int sm = !dout || !sc[p] ? 0 : srun[p].n < 0 ? 1 : srun[p].n;
            int rm = !din || !hd->fwd_count[p] ? 0 : rrun[p].n < 0 ? 1 : rrun[p].n;
            calls = EPX__MAX(calls, EPX__MAX(sm, rm));
        }
        for (int j = 0; j < calls && st == EPX_SUCCESS; j++) {
            for (int p = 0; p < R; p++) {
                bool dout = epx__direct_to(m, pl, ht, p);
                xsb[p] = xrb[p] = 0;
                if (dout && sc[p] && srun[p].n < 0 && j == 0)
                    xsp[p] = xpack[p], xsb[p] = sc[p] * (int64_t)pl->pb;
                else if (dout && sc[p] && j < srun[p].n)
                    xsp[p] = pl->x + (size_t)srun[p].first[j] * pl->pb, xsb[p] = srun[p].len[j] * (int64_t)pl->pb;
                if (din && hd->fwd_count[p] && rrun[p].n < 0 && j == 0)
                    xrp[p] = xout + (size_t)xoff[p] * pl->pb, xrb[p] = hd->fwd_count[p] * (int64_t)pl->pb;
                else if (din && hd->fwd_count[p] && j < rrun[p].n) {
                    xrp[p] = xout + (size_t)xoff[p] * pl->pb, xrb[p] = rrun[p].len[j] * (int64_t)pl->pb;
                    xoff[p] += rrun[p].len[j];
                }
            }
            st = epx__hier_net_xchg(m->h, epx__hier_tag(seq, EPX__ST_ROWS), xsp, xsb, xrp, xrb, err);
        }
        if (st != EPX_SUCCESS) goto done;
    }

    /* Entries: my tokens and the forwarded ones, by (source, token). Records keep their
     * weights (own tokens: w) in `ew`. */
    hd->nent = T + hd->nfwd;
    hd->ent_src = epx__aalloc(hm, (size_t)hd->nent, 4, false, &st, err);
    hd->ent_tok = epx__aalloc(hm, (size_t)hd->nent, 4, false, &st, err);
    hd->ent_topk = epx__aalloc(hm, (size_t)hd->nent * (size_t)K, 4, false, &st, err);
    hd->ent_fidx = epx__aalloc(hm, (size_t)hd->nent, 8, false, &st, err);
    float *ew = epx__aalloc(tmp, (size_t)hd->nent * (size_t)W, 4, false, &st, err);
    hd->to_first = epx__aalloc(hm, (size_t)LS + 1, 8, true, &st, err);
    hd->from_first = epx__aalloc(hm, (size_t)LS + 1, 8, true, &st, err);
    if (st != EPX_SUCCESS) goto done;
    {
        int64_t e = 0, f = 0;
        for (int p = 0; p < R; p++) {
            int64_t n = p == me ? T : hd->fwd_count[p];
            for (int64_t i = 0; i < n; i++, e++) {
                if (p == me) {
                    hd->ent_src[e] = me, hd->ent_tok[e] = (int32_t)i, hd->ent_fidx[e] = -1;
                    memcpy(hd->ent_topk + e * K, hd->topk + i * K, sizeof(int32_t) * (size_t)K);
                    if (W) memcpy(ew + e * W, w + i * K, sizeof(float) * (size_t)K);
                } else {
                    const int32_t *r = (const int32_t *)(rbuf + (size_t)f * rin);
                    hd->ent_src[e] = r[0], hd->ent_tok[e] = r[1], hd->ent_fidx[e] = f++;
                    memcpy(hd->ent_topk + e * K, r + 2, sizeof(int32_t) * (size_t)K);
                    if (W) memcpy(ew + e * W, r + 2 + K, sizeof(float) * (size_t)K);
                }
            }
        }
    }
    /* Fan-out lists: the entries each local rank needs (as many as the verdict said). */
    if (st == EPX_SUCCESS) {
        for (int64_t e = 0; e < hd->nent; e++)
            for (int l = 0; l < LS; l++) lcnt[l] += epx__to_rank(hd->ent_topk + e * K, K, L, t->host_ranks[t->host_first[t->host] + l]);
        for (int l = 0; l < LS; l++) hd->to_first[l + 1] = hd->to_first[l] + lcnt[l];
        if (hd->to_first[LS] != f->fan)
            st = epx__fail(err, EPX_ERR_INTERNAL, "the verdict gives me %lld records to fan out, I have %lld",
                           (long long)f->fan, (long long)hd->to_first[LS]);
        if (st == EPX_SUCCESS) hd->to_ent = epx__aalloc(hm, (size_t)hd->to_first[LS], 8, false, &st, err);
    }
    if (st == EPX_SUCCESS) {
        for (int l = 0; l < LS; l++) {
            int q = t->host_ranks[t->host_first[t->host] + l];
            int64_t a = hd->to_first[l];
            for (int64_t e = 0; e < hd->nent; e++)
                if (epx__to_rank(hd->ent_topk + e * K, K, L, q)) hd->to_ent[a++] = e;
        }
        memcpy(lrc, f->lanes, sizeof(int64_t) * (size_t)LS);
    }
    /* Routing records to the other local ranks; merge what they send me, read where it lies
     * in their memory (no copy: the exchange stays open until epx__route_end), with my own
     * entries for me, which are never copied either: their routing is read from the
     * entries, their payload where it lies (my token's row, or the record a source sent
     * me). In lsend, local rank l's segment starts at its records' index, less mine when l
     * is above me. */
    char *lsend = NULL;
    int64_t self = 0;
    if (st == EPX_SUCCESS) {
        self = lcnt[ml];
        if (lrc[ml] != self)
            st = epx__fail(err, EPX_ERR_INTERNAL, "the verdict gives me %lld of my own records, I have %lld",
                           (long long)lrc[ml], (long long)self);
    }
    if (st == EPX_SUCCESS) {
        for (int l = 0; l < LS; l++) {
            lsb[l] = l == ml ? 0 : lcnt[l] * (int64_t)rec;
            lrb[l] = l == ml ? 0 : lrc[l] * (int64_t)rec;
            hd->from_first[l + 1] = hd->from_first[l] + lrc[l];
        }
        lsend = epx__buf(m, EPX__B_LSEND, (size_t)(hd->to_first[LS] - self) * rec, &st, err);
        hd->rows = hd->from_first[LS];
        hd->from_row = epx__aalloc(hm, (size_t)hd->rows, 8, false, &st, err);
        hd->row_rec = epx__aalloc(hm, (size_t)hd->rows, 8, false, &st, err);
        hd->row_topk = epx__aalloc(hm, (size_t)hd->rows * (size_t)K, 4, false, &st, err);
        hd->row_src = epx__aalloc(hm, (size_t)hd->rows, 4, false, &st, err);
        hd->row_tok = epx__aalloc(hm, (size_t)hd->rows, 4, false, &st, err);
        rs->pay = epx__aalloc(tmp, (size_t)hd->rows, sizeof *rs->pay, false, &st, err);
        rs->scl = pl->sb ? epx__aalloc(tmp, (size_t)hd->rows, sizeof *rs->scl, false, &st, err) : NULL;
    }
    if (st == EPX_SUCCESS) {
        for (int l = 0; l < LS; l++) {
            if (l == ml) continue;
            for (int64_t a = hd->to_first[l]; a < hd->to_first[l + 1]; a++) {
                int64_t e = hd->to_ent[a];
                int32_t *r = (int32_t *)(lsend + (size_t)(a - (l > ml ? self : 0)) * rec);
                r[0] = hd->ent_src[e], r[1] = hd->ent_tok[e];
                memcpy(r + 2, hd->ent_topk + e * K, sizeof(int32_t) * (size_t)K);
                if (W) memcpy(r + 2 + K, ew + e * W, sizeof(float) * (size_t)K);
                if (pl->pb) { /* the row, then its scales (din: no other local rank) */
                    const char *scl, *pay = epx__ent_src(hd, pl, rbuf, rin, mrec, din, e, &scl);
                    memcpy((char *)r + mrec, pay, pl->pb);
                    if (scl) memcpy((char *)r + mrec + pl->pb, scl, pl->sb);
                }
            }
        }
        met = true;
        st = epx__local_exchange(m, lsend, lsb, NULL, lrb, lseg, err);
    }
    if (st == EPX_SUCCESS && W) *row_w = epx__aalloc(tmp, (size_t)hd->rows * (size_t)K, 4, false, &st, err);
    if (st == EPX_SUCCESS) {
        /* Source p's tokens come from local forwarder lrank(p) % LS, in token order. */
        int64_t *next = lcnt, row = 0;
        for (int l = 0; l < LS; l++) next[l] = hd->from_first[l];
        for (int p = 0; p < R; p++) {
            int l = t->lrank_of[p] % LS;
            for (; next[l] < hd->from_first[l + 1]; next[l]++, row++) {
                int64_t a = next[l];
                const int32_t *tk; /* the routing: K ids, then (W) the weights */
                const char *pay = NULL, *scl = NULL; /* none in a plan without payload */
                int32_t tok;
                if (l == ml) {
                    int64_t e = hd->to_ent[hd->to_first[ml] + a - hd->from_first[ml]];
                    if (hd->ent_src[e] != p) break;
                    tok = hd->ent_tok[e], tk = hd->ent_topk + e * K;
                    if (W) memcpy(*row_w + row * K, ew + e * W, sizeof(float) * (size_t)K);
                    if (pl->pb) pay = epx__ent_src(hd, pl, rbuf, rin, mrec, din, e, &scl);
                } else {
                    const int32_t *r = (const int32_t *)(lseg[l] + (size_t)(a - hd->from_first[l]) * rec);
                    if (r[0] != p) break;
                    tok = r[1], tk = r + 2;
                    if (W) memcpy(*row_w + row * K, r + 2 + K, sizeof(float) * (size_t)K);
                    if (pl->pb) pay = (const char *)r + mrec, scl = pay + pl->pb;
                }
                hd->row_rec[row] = a;
                hd->from_row[a] = row;
                hd->row_src[row] = p;
                hd->row_tok[row] = tok;
                memcpy(hd->row_topk + row * K, tk, sizeof(int32_t) * (size_t)K);
                rs->pay[row] = pay;
                if (rs->scl) rs->scl[row] = scl;
            }
        }
        if (row != hd->rows)
            st = epx__fail(err, EPX_ERR_INTERNAL, "merged %lld of %lld rows", (long long)row, (long long)hd->rows);
    }
done:
    if (st != EPX_SUCCESS || !pl->pb) st = epx__route_end(m, st, err); /* nothing more is read */
    if (st != EPX_SUCCESS) rs->pay = rs->scl = NULL;
    /* Failed before my part of the exchanges was done (an exchange; or an allocation the
     * room made before the verdict missed, a bug): my peers wait in them for me. Tell my
     * local ranks now (they fail at once instead of at their timeout) and break the
     * communicator (src/api), not leave it looking usable. */
    if (st != EPX_SUCCESS && !met) epx__left_peers(m, st);
    return st;
}

/* ---- High-throughput dispatch ------------------------------------------------------------------ */

/* A handle of m, its arrays in the memory the last handle freed left (m->spare). */
static epx__hier_moe_handle_t *epx__handle_new(epx__hier_moe_t *m, uint32_t id, int mode, int T, int K, int has_w)
{
    epx__hier_moe_handle_t *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    h->id = id, h->mode = mode, h->T = T, h->K = K, h->has_w = has_w;
    h->plan = calloc(1, sizeof *h->plan);
    if (!h->plan) {
        free(h);
        return NULL;
    }
    h->plan->mem = m->spare;
    m->spare = (epx__arena_t){NULL, 0};
    h->topk = epx__arena_alloc(&h->plan->mem, (size_t)T * (size_t)K, sizeof *h->topk, false);
    if (h->topk) return h;
    epx__hier_moe_handle_free(m, h);
    return NULL;
}

/* The flows of a dispatch before its verdict: my tokens per rank and per host, counted in
 * one pass over hd's routing (none when hd is NULL: this rank failed). Fails only for
 * memory. */
static epx_status_t epx__flows_new(const epx__hier_moe_t *m, epx__flows_t *f, const epx__hier_moe_handle_t *hd)
{
    const epx__topo_t *t = epx__t(m);
    int R = t->nranks, NH = t->num_hosts;
    int32_t *pr = calloc(2 * ((size_t)R + (size_t)NH), sizeof *pr); /* counts, then stamps */
    int64_t *c = calloc(2 * (size_t)R + (size_t)t->local_size, sizeof *c);
    f->per_rank = pr, f->per_host = pr ? pr + R : NULL, f->T = hd ? hd->T : 0;
    f->fwd_count = c, f->tokens = c ? c + R : NULL, f->lanes = c ? c + 2 * R : NULL;
    f->rows = f->fan = f->self = 0;
    if (!pr || !c) return EPX_ERR_NO_MEMORY;
    int32_t *rank_seen = pr + R + NH, *host_seen = rank_seen + R; /* 1 + the last token counted */
    for (int i = 0; hd && i < hd->T; i++) {
        const int32_t *tk = hd->topk + (size_t)i * hd->K;
        for (int k = 0; k < hd->K; k++) {
            if (tk[k] < 0) continue;
            int q = m->rank_of_expert[tk[k]], h = t->host_of[q];
            if (rank_seen[q] == i + 1) continue;
            rank_seen[q] = i + 1, pr[q]++;
            if (host_seen[h] != i + 1) host_seen[h] = i + 1, pr[R + h]++;
        }
    }
    return EPX_SUCCESS;
}

static void epx__flows_free(epx__flows_t *f) { free((void *)f->per_rank), free(f->fwd_count); }

/* The start of an operation: its number. */
static uint32_t epx__op_begin(epx__hier_moe_t *m)
{
    epx__arena_reset(&m->tmp);
    return ++m->h->seq;
}

/* A high-throughput dispatch; with !payload, the plan alone: the routing records travel
 * without rows, and recv_x / recv_x_scales are neither read nor written. */
static epx_status_t epx__dispatch(epx__hier_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                  epx_status_t local, bool payload, epx__hier_moe_handle_t **handle, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    int L = s->local_experts, me = s->rank;
    uint32_t seq = epx__op_begin(m);
    epx__hier_moe_handle_t *hd = NULL;
    int K = local == EPX_SUCCESS ? in->topk : 0, has_w = local == EPX_SUCCESS && in->topk_weights;
    if (local == EPX_SUCCESS) {
        hd = epx__fault_nomem(m) ? NULL : epx__handle_new(m, seq, EPX_MOE_HIGH_THROUGHPUT, in->num_tokens, K, has_w);
        if (!hd) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the handle");
    }
    if (local == EPX_SUCCESS) epx__topk_to_i32(in->topk_idx, s->index_dtype, in->num_tokens, K, hd->topk);
    int64_t n = 0;
    epx__flows_t f;
    if (epx__flows_new(m, &f, local == EPX_SUCCESS ? hd : NULL) != EPX_SUCCESS && local == EPX_SUCCESS)
        local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    /* The counts of the outputs, made before the verdict (after the exchanges a failure
     * here would be this rank's alone): [L] not mine, and 1 + the last row counted. */
    int64_t *per_expert = NULL, *last = NULL;
    if (local == EPX_SUCCESS) {
        per_expert = epx__aalloc(&m->tmp, (size_t)L + 1, sizeof *per_expert, true, &local, err);
        last = epx__aalloc(&m->tmp, (size_t)L + 1, sizeof *last, true, &local, err);
    }
    bool fp8 = s->dtype == EPX_FP8_E4M3;
    size_t sb = fp8 ? s->scale_cols * sizeof(float) : 0;
    epx__payload_t pl = {in ? in->x : NULL, fp8 && in ? (const char *)in->x_scales : NULL, s->row_bytes, sb};
    if (!payload) pl = (epx__payload_t){NULL, NULL, 0, 0};
    epx__rt_t rt;
    if (local == EPX_SUCCESS) local = epx__route_prep(m, hd, &pl, true, &f, &rt, err);
    epx_status_t st = epx__verdict(m, local, EPX__H_DISPATCH, K, has_w, 0, &f, err);
    if (st == EPX_SUCCESS) {
        /* Sized by the verdict, the routing step's memory; then every rank learns whether
         * every rank has it and room for its rows (nothing is allocated after this). */
        n = f.rows;
        epx__rt_size_t z = {0, n, f.fan, f.self};
        for (int p = 0; p < epx__t(m)->nranks; p++)
            z.nfwd += f.fwd_count[p];
        epx_status_t mine = epx__route_room(m, hd, &rt, &pl, &z, false, err);
        st = epx__verdict_rows(m, mine, out->capacity, n, err);
    }
    float *row_w = NULL;
    epx__rowsrc_t rs = {NULL, NULL};
    if (st == EPX_SUCCESS)
        st = epx__route(m, hd, in->topk_weights, &pl, true, out->recv_x, &f, &rt, seq, &row_w, &rs, err);
    epx__flows_free(&f);
    if (st == EPX_SUCCESS && hd->rows != n)
        st = epx__fail(err, EPX_ERR_INTERNAL, "received %lld rows, expected %lld", (long long)hd->rows, (long long)n);
    if (st == EPX_SUCCESS) {
        /* The caller's outputs, now that every rank agreed (what still fails, a local rank
         * that gave up while I read its records, breaks the communicator). Branch-free:
         * about half the entries are mine, in no order a predictor could learn. */
        int64_t N = hd->rows, NK = N * K;
        const int32_t *rt = hd->row_topk; /* [N, K]; my local expert e - lo when in [0, L) */
        int lo = me * L;
        char *ox = out->recv_x;
        for (int64_t r = 0; r < N && payload; r++) /* (NULL: the row came straight into place) */
            if (rs.pay[r]) memcpy(ox + (size_t)r * s->row_bytes, rs.pay[r], s->row_bytes);
        for (int64_t r = 0; r < N && payload && fp8 && out->recv_x_scales; r++)
            memcpy(out->recv_x_scales + (size_t)r * s->scale_cols, rs.scl[r], sb);
        if (N && out->recv_src_rank) memcpy(out->recv_src_rank, hd->row_src, sizeof(int32_t) * (size_t)N);
        if (N && out->recv_src_token) memcpy(out->recv_src_token, hd->row_tok, sizeof(int32_t) * (size_t)N);
        if (out->recv_topk_idx && s->index_dtype == EPX_I32) {
            int32_t *o = out->recv_topk_idx;
            for (int64_t i = 0; i < NK; i++) o[i] = epx__lid_or_none(rt[i] - lo, L);
        } else if (out->recv_topk_idx) {
            int64_t *o = out->recv_topk_idx;
            for (int64_t i = 0; i < NK; i++) o[i] = epx__lid_or_none(rt[i] - lo, L);
        }
        float *ow = has_w ? out->recv_topk_weights : NULL;
        for (int64_t i = 0; i < NK && ow; i++) {
            uint32_t b;
            memcpy(&b, &row_w[i], sizeof b);
            b &= ~(uint32_t)(epx__lid_or_none(rt[i] - lo, L) >> 31); /* +0 where not mine */
            memcpy(&ow[i], &b, sizeof b);
        }
        for (int64_t r = 0; r < N; r++) /* an expert named twice in a row counts once */
            for (int k = 0; k < K; k++) {
                int32_t lid = epx__lid_or_none(rt[r * K + k] - lo, L), at = lid + ((lid >> 31) & (L + 1));
                per_expert[at] += last[at] != r + 1;
                last[at] = r + 1;
            }
        if (st == EPX_SUCCESS && out->num_recv_tokens_per_expert)
            for (int l = 0; l < L; l++)
                out->num_recv_tokens_per_expert[l] = (int32_t)EPX__ALIGN_UP(per_expert[l], (int64_t)s->alignment);
        if (st == EPX_SUCCESS) {
            out->num_recv_tokens = hd->rows;
            if (out->num_recv_tokens_device) *out->num_recv_tokens_device = hd->rows;
        }
    }
    st = epx__route_end(m, st, err);
    if (st != EPX_SUCCESS) {
        epx__hier_moe_handle_free(m, hd);
        return st;
    }
    *handle = hd;
    return EPX_SUCCESS;
}

epx_status_t epx__hier_moe_dispatch(epx__hier_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                    epx_status_t local, epx__hier_moe_handle_t **handle, epx__errbuf_t *err)
{
    return epx__dispatch(m, in, out, local, true, handle, err);
}

epx_status_t epx__hier_moe_dispatch_plan(epx__hier_moe_t *m, const epx_moe_dispatch_in_t *in,
                                         epx_moe_dispatch_out_t *out, epx_status_t local,
                                         epx__hier_moe_handle_t **handle, epx__errbuf_t *err)
{
    return epx__dispatch(m, in, out, local, false, handle, err);
}

epx_status_t epx__hier_moe_agree(epx__hier_moe_t *m, const epx__hier_moe_handle_t *hd, bool combine, bool has_w,
                                 epx_status_t local, epx__errbuf_t *err)
{
    (void)epx__op_begin(m);
    bool ok = local == EPX_SUCCESS;
    int op = !combine ? EPX__H_CACHED : m->s.mode == EPX_MOE_LOW_LATENCY ? EPX__H_LL_COMBINE : EPX__H_COMBINE;
    return epx__verdict(m, local, op, ok ? hd->K : 0, ok && combine && has_w, ok ? hd->id : 0, NULL, err);
}

void epx__hier_moe_handle_plan(const epx__hier_moe_handle_t *h, epx__hier_plan_t *p)
{
    *p = (epx__hier_plan_t){h->T,        h->K,        h->has_w,       h->mode == EPX_MOE_LOW_LATENCY,
                            h->rows,     h->topk,     h->nent,        h->ent_src,
                            h->ent_tok,  h->ent_topk, h->ent_fidx,    h->fwd_count,
                            h->nfwd,     h->to_first, h->to_ent,      h->from_first,
                            h->from_row, h->row_rec,  h->row_topk,    h->row_src,
                            h->row_tok,  h->src_tokens};
}

/* ---- Rows along the row plan (plan.c; the GPU path across hosts runs the same) --------------- */

/* The chunks of a call along hd (plan.c): the CPU path runs them one after the other
 * (no overlap), so 1 unless EPX_MOE_CHUNKS says otherwise. */
static int epx__chunks(const epx__hier_moe_t *m, const epx__hier_moe_handle_t *hd)
{
    return epx__hier_call_chunks(&m->s, false, hd->src_tokens, epx__t(m)->nranks);
}

/* The handle's row plan for the CPU path (by peer, its chunks), built by the first call
 * along the handle that needs it (a failed build leaves no plan, its memory stays in the
 * handle's arena: the next call tries again) and kept for the others, which would each
 * build the same one; the builder's scratch is the call's. Local. */
static epx_status_t epx__handle_plan(epx__hier_moe_t *m, const epx__hier_moe_handle_t *hd, const epx__hier_xplan_t **x,
                                     epx__errbuf_t *err)
{
    if (!hd->plan->built) {
        EPX__CHECK(epx__hier_xplan_build(m, hd, true, epx__chunks(m, hd), &hd->plan->x, err));
        hd->plan->built = true;
    }
    *x = &hd->plan->x;
    return EPX_SUCCESS;
}

/* What a call along a handle works with. */
typedef struct {
    const epx__hier_xplan_t *x; /* the handle's row plan */
    int64_t *nb;                /* room for 2 R + 2 LS byte counts */
    char *send, *recv;          /* across hosts */
    char *lsend, *lrecv;        /* inside the host */
} epx__work_t;

/* The work of a call along hd, made before its verdict so that what fails here (memory)
 * reaches every rank through it: after the verdict only the exchanges can fail. `home`: a
 * combine's buffers (rows back home), else a cached dispatch's; records of `rec` bytes; and
 * the MPI link's room for the network step (each chunk's batch at most all of it).
 * Local; `local` (this rank's verdict on its arguments) when that failed, hd unread. */
static epx_status_t epx__work(epx__hier_moe_t *m, const epx__hier_moe_handle_t *hd, bool home, size_t rec,
                              epx_status_t local, epx__work_t *w, epx__errbuf_t *err)
{
    memset(w, 0, sizeof *w);
    if (local != EPX_SUCCESS) return local;
    if (epx__fault_nomem(m)) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory (EPX_FAULT nomem)");
    const epx__topo_t *t = epx__t(m);
    EPX__CHECK(epx__handle_plan(m, hd, &w->x, err));
    const epx__hier_xplan_t *x = w->x;
    epx_status_t st = EPX_SUCCESS;
    w->nb = epx__aalloc(&m->tmp, 2 * (size_t)t->nranks + 2 * (size_t)t->local_size, 8, false, &st, err);
    if (home) {
        w->lsend = epx__buf(m, EPX__B_LSEND, (size_t)epx__hier_part_at(x->n_back_send, x->parts) * rec, &st, err);
        w->lrecv = epx__buf(m, EPX__B_RECV, (size_t)epx__hier_part_at(x->n_back_recv, x->parts) * rec, &st, err);
        w->send = epx__buf(m, EPX__B_SEND, (size_t)x->n_home_send * rec, &st, err);
        w->recv = epx__buf(m, EPX__B_HOME, (size_t)x->n_home_recv * rec, &st, err);
    } else {
        w->send = epx__buf(m, EPX__B_SEND, (size_t)x->n_gw * rec, &st, err);
        w->recv = epx__buf(m, EPX__B_FWD, (size_t)x->n_fwd * rec, &st, err);
        w->lsend = epx__buf(m, EPX__B_LSEND, (size_t)epx__hier_part_at(x->n_fan, x->parts) * rec, &st, err);
        w->lrecv = epx__buf(m, EPX__B_RECV, (size_t)epx__hier_part_at(x->n_lrecv, x->parts) * rec, &st, err);
    }
    int64_t net = (home ? x->n_home_send + x->n_home_recv : x->n_gw + x->n_fwd) * (int64_t)rec;
    if (st == EPX_SUCCESS && m->h->net) st = epx__net_room(m->h->net, 0, net, err);
    return st;
}

/* Where references point (kinds EPX__HIER_*): rows and their auxiliary parts (FP8 scales or
 * top-k weights; aux NULL: none). */
typedef struct {
    const char *row[3], *aux[3];
    size_t row_stride[3], aux_stride[3];
} epx__srcs_t;

static void epx__src_set(epx__srcs_t *s, int k, const void *row, size_t row_stride, const void *aux, size_t aux_stride)
{
    s->row[k] = row, s->row_stride[k] = row_stride, s->aux[k] = aux, s->aux_stride[k] = aux_stride;
}

static const char *epx__src_row(const epx__srcs_t *s, int64_t ref)
{
    int k = EPX__HIER_REF_KIND(ref);
    return s->row[k] + (size_t)EPX__HIER_REF_INDEX(ref) * s->row_stride[k];
}

static const char *epx__src_aux(const epx__srcs_t *s, int64_t ref)
{
    int k = EPX__HIER_REF_KIND(ref);
    return s->aux[k] ? s->aux[k] + (size_t)EPX__HIER_REF_INDEX(ref) * s->aux_stride[k] : NULL;
}

/* dst row j = rb bytes of ref[j]; with aux, dst aux j = ab bytes of its auxiliary part. */
static void epx__gather(const epx__srcs_t *s, const int64_t *ref, int64_t n, char *row, size_t row_stride, size_t rb,
                        char *aux, size_t aux_stride, size_t ab)
{
    for (int64_t j = 0; j < n; j++) {
        memcpy(row + (size_t)j * row_stride, epx__src_row(s, ref[j]), rb);
        const char *a = epx__src_aux(s, ref[j]);
        if (aux && a) memcpy(aux + (size_t)j * aux_stride, a, ab);
    }
}

/* Byte counts of `rec`-byte records: out[i] = cnt[i] * rec. */
static void epx__bytes(int64_t *out, const int64_t *cnt, int n, size_t rec)
{
    for (int i = 0; i < n; i++) out[i] = cnt[i] * (int64_t)rec;
}

/* The network step of a row plan in `chunks` chunks (hier.h: the buffers lie chunk by
 * chunk, each chunk's segments by rank): one exchange per chunk, in order, scnt[c * R + p]
 * records of `rec` bytes from send to rank p, rcnt[c * R + p] from p into recv. nb is room
 * for 2 * R byte counts. */
static epx_status_t epx__net_chunks(epx__hier_moe_t *m, int tag, int chunks, const char *send, const int64_t *scnt,
                                    char *recv, const int64_t *rcnt, size_t rec, int64_t *nb, epx__errbuf_t *err)
{
    int R = epx__t(m)->nranks;
    for (int c = 0; c < chunks; c++) {
        epx__bytes(nb, scnt + (size_t)c * R, R, rec), epx__bytes(nb + R, rcnt + (size_t)c * R, R, rec);
        EPX__CHECK(epx__net_xchg(m, tag, send, nb, recv, nb + R, err));
        for (int p = 0; p < R; p++) send += nb[p], recv += nb[R + p];
    }
    return EPX_SUCCESS;
}

/* The exchange inside the host along a row plan built peer-major (hier.h: all parts of a
 * local rank's records back to back, so one exchange moves them): the records gathered from
 * refs into send, then exchanged into recv. cs / cr [parts * LS]: records to / from each
 * local rank, by part; ns [parts]: the parts' totals. A record is `rec` bytes: rb of its
 * row, and with aux ab more at offset ao; nb is room for 2 * LS byte counts. Every local
 * rank takes part. */
static epx_status_t epx__local_both(epx__hier_moe_t *m, int parts, const epx__srcs_t *src, const int64_t *refs,
                                    const int64_t *cs, const int64_t *ns, const int64_t *cr, char *send, char *recv,
                                    size_t rec, size_t rb, bool aux, size_t ao, size_t ab, int64_t *nb,
                                    epx__errbuf_t *err)
{
    int LS = epx__t(m)->local_size;
    epx__gather(src, refs, epx__hier_part_at(ns, parts), send, rec, rb, aux ? send + ao : NULL, rec, ab);
    for (int l = 0; l < LS; l++) {
        nb[l] = nb[LS + l] = 0;
        for (int q = 0; q < parts; q++) nb[l] += cs[q * LS + l] * (int64_t)rec, nb[LS + l] += cr[q * LS + l] * (int64_t)rec;
    }
    return epx__local_xchg(m, send, nb, recv, nb + LS, err);
}

epx_status_t epx__hier_moe_dispatch_cached(epx__hier_moe_t *m, const epx__hier_moe_handle_t *hd,
                                           const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                           epx_status_t local, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    const epx__topo_t *t = epx__t(m);
    int R = t->nranks;
    uint32_t seq = epx__op_begin(m);
    bool ok = local == EPX_SUCCESS;
    bool fp8 = s->dtype == EPX_FP8_E4M3;
    size_t rb = s->row_bytes, sb = fp8 ? s->scale_cols * sizeof(float) : 0, ao = EPX__ALIGN_UP(rb, 16);
    size_t rec = ao + EPX__ALIGN_UP(sb, 16);
    epx__work_t w;
    local = epx__work(m, hd, false, rec, local, &w, err);
    epx_status_t st = epx__verdict(m, local, EPX__H_CACHED, ok ? hd->K : 0, 0, ok ? hd->id : 0, NULL, err);
    if (st != EPX_SUCCESS) return st;
    const epx__hier_xplan_t *x = w.x;
    int64_t *nb = w.nb;
    char *send = w.send, *fwd = w.recv, *lsend = w.lsend, *lrecv = w.lrecv;
    {
        int64_t *lb = nb + 2 * R;
        /* Scales travel whenever the dtype has them: a rank without tokens may pass no
         * x_scales and still forward and receive other ranks' rows (and their scales). */
        const float *xs = fp8 ? in->x_scales : NULL;
        epx__srcs_t src;
        memset(&src, 0, sizeof src);
        epx__src_set(&src, EPX__HIER_X, in->x, rb, xs, sb);
        epx__src_set(&src, EPX__HIER_FWD, fwd, rec, fp8 ? fwd + ao : NULL, rec);
        epx__src_set(&src, EPX__HIER_LRECV, lrecv, rec, fp8 ? lrecv + ao : NULL, rec);
        /* To my gateways on the other hosts, then from each to the local ranks (one exchange
         * for both parts: no overlap here), then into place. */
        epx__gather(&src, x->gw, x->n_gw, send, rec, rb, fp8 ? send + ao : NULL, rec, sb);
        st = epx__net_chunks(m, epx__hier_tag(seq, EPX__ST_ROWS), x->chunks, send, x->gw_chunk, fwd, x->fwd_chunk, rec,
                             nb, err);
        if (st == EPX_SUCCESS)
            st = epx__local_both(m, x->parts, &src, x->fan, x->fan_send, x->n_fan, x->fan_recv, lsend, lrecv, rec, rb, fp8, ao, sb,
                                 lb, err);
        if (st == EPX_SUCCESS)
            epx__gather(&src, x->out, x->rows, out->recv_x, rb, rb, fp8 ? (char *)out->recv_x_scales : NULL, sb, sb);
    }
    if (st != EPX_SUCCESS) epx__left_peers(m, st); /* (e.g. mapping a local rank's buffer failed) */
    return st;
}

/* The record of a combine's rows: the row, then (with weights) its top-k weights. */
static size_t epx__home_rec(const epx__hier_moe_t *m, int K, bool has_w)
{
    return EPX__ALIGN_UP(m->s.combine_row_bytes, 16) + (has_w ? EPX__ALIGN_UP(sizeof(float) * (size_t)K, 16) : 0);
}

/* Steps 1 and 2 of a combine along wk (epx__work, home): my rows back to the local ranks
 * that forwarded them (shared memory, both parts at once), then, as gateway, my sources' rows
 * home as they are (MPI). y holds the expert outputs (crow bytes a row), w (NULL: none
 * travel) their top-k weights [rows, K]. On success *src says where every row of step 3 lies. */
static epx_status_t epx__rows_home(epx__hier_moe_t *m, const epx__work_t *wk, const void *y, const float *w,
                                   uint32_t seq, epx__srcs_t *src, epx__errbuf_t *err)
{
    const epx__topo_t *t = epx__t(m);
    const epx__hier_xplan_t *x = wk->x;
    int R = t->nranks;
    size_t crow = m->s.combine_row_bytes, wb = sizeof(float) * (size_t)x->K, ao = EPX__ALIGN_UP(crow, 16);
    size_t rec = epx__home_rec(m, x->K, w != NULL);
    epx_status_t st = EPX_SUCCESS;
    int64_t *nb = wk->nb;
    char *lsend = wk->lsend, *c1 = wk->lrecv, *send = wk->send, *home = wk->recv;
    {
        int64_t *lb = nb + 2 * R;
        memset(src, 0, sizeof *src);
        epx__src_set(src, EPX__HIER_Y, y, crow, w, wb);
        epx__src_set(src, EPX__HIER_C1, c1, rec, w ? c1 + ao : NULL, rec);
        epx__src_set(src, EPX__HIER_HOME, home, rec, w ? home + ao : NULL, rec);
        st = epx__local_both(m, x->parts, src, x->c1, x->back_send, x->n_back_send, x->back_recv, lsend, c1, rec, crow,
                             w != NULL, ao, wb, lb, err);
        if (st == EPX_SUCCESS) {
            epx__gather(src, x->home, x->n_home_send, send, rec, crow, w ? send + ao : NULL, rec, wb);
            st = epx__net_chunks(m, epx__hier_tag(seq, EPX__ST_HOME), x->chunks, send, x->home_send_chunk, home,
                                 x->home_recv_chunk, rec, nb, err);
        }
    }
    return st;
}

epx_status_t epx__hier_moe_combine(epx__hier_moe_t *m, const epx__hier_moe_handle_t *hd,
                                   const epx_moe_combine_in_t *in, epx_moe_combine_out_t *out, epx_status_t local,
                                   epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    uint32_t seq = epx__op_begin(m);
    bool ok = local == EPX_SUCCESS;
    int has_w = ok && in->topk_weights;
    epx__work_t wk;
    local = epx__work(m, hd, true, ok ? epx__home_rec(m, hd->K, has_w) : 0, local, &wk, err);
    epx_status_t st =
        epx__verdict(m, local, EPX__H_COMBINE, ok ? hd->K : 0, has_w, ok ? hd->id : 0, NULL, err);
    if (st != EPX_SUCCESS) return st;
    const epx__hier_xplan_t *x = wk.x;
    int K = hd->K;
    size_t crow = s->combine_row_bytes;
    epx__srcs_t src;
    st = epx__rows_home(m, &wk, in->y, has_w ? in->topk_weights : NULL, seq, &src, err);
    if (st != EPX_SUCCESS) epx__left_peers(m, st); /* (e.g. mapping a local rank's buffer failed) */
    /* At home: each token's rows in ascending rank order, summed from +0; the weights likewise. */
    for (int i = 0; i < x->T && st == EPX_SUCCESS; i++) {
        const char *rows[EPX_MOE_MAX_TOPK];
        int n = (int)(x->first[i + 1] - x->first[i]);
        for (int j = 0; j < n; j++) rows[j] = epx__src_row(&src, x->tok[x->first[i] + j]);
        epx__cpu_reduce_rows((char *)out->out + (size_t)i * crow, s->combine_dtype, rows, NULL, n, s->hidden);
        if (!out->out_topk_weights) continue;
        for (int j = 0; j < n && has_w; j++) rows[j] = epx__src_aux(&src, x->tok[x->first[i] + j]);
        epx__cpu_reduce_rows(out->out_topk_weights + (size_t)i * K, EPX_F32, rows, NULL, has_w ? n : 0, K);
    }
    return st;
}

/* ---- Low-latency ------------------------------------------------------------------------------------ */

/* A low-latency dispatch; with !payload, the plan alone: the routing records travel without
 * rows, in->x is not read and nothing of the caller's is written (out may be NULL). */
static epx_status_t epx__ll_dispatch(epx__hier_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                     epx_moe_ll_dispatch_out_t *out, epx_status_t local, bool payload,
                                     epx__hier_moe_handle_t **handle, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    int H = s->hidden;
    uint32_t seq = epx__op_begin(m);
    epx__hier_moe_handle_t *hd = NULL;
    int K = local == EPX_SUCCESS ? in->topk : 0;
    if (local == EPX_SUCCESS) {
        hd = epx__fault_nomem(m) ? NULL : epx__handle_new(m, seq, EPX_MOE_LOW_LATENCY, in->num_tokens, K, 0);
        if (!hd) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the handle");
    }
    if (local == EPX_SUCCESS) epx__topk_to_i32(in->topk_idx, s->index_dtype, in->num_tokens, K, hd->topk);
    epx__flows_t f;
    if (epx__flows_new(m, &f, local == EPX_SUCCESS ? hd : NULL) != EPX_SUCCESS && local == EPX_SUCCESS)
        local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    size_t sbytes = s->scale_format == EPX_SCALE_UE8M0 ? 1 : 4;
    size_t rb = s->ll_fp8 ? (size_t)H : s->row_bytes, sb = s->ll_fp8 ? s->scale_cols * sbytes : 0;
    epx__payload_t pl =
        payload ? (epx__payload_t){in ? in->x : NULL, NULL, rb, sb} : (epx__payload_t){NULL, NULL, 0, 0};
    epx__rt_t rt;
    if (local == EPX_SUCCESS) local = epx__route_prep(m, hd, &pl, false, &f, &rt, err);
    if (local == EPX_SUCCESS) {
        /* The shapes are static: every rank sends at most max_tokens, so the routing step's
         * memory (and the row plan's) can be made for the most it may take before the
         * verdict, which then tells every rank whether every rank has it (nothing is
         * allocated after it): as sources I forward for a gateway, each rank's batch as
         * rows, all of them to every local rank they may reach. */
        const epx__topo_t *t = epx__t(m);
        int LS = t->local_size, me = t->rank;
        int64_t mine = 0, cap = s->max_tokens;
        for (int l = 0; l < LS; l++)
            mine += f.per_rank[t->host_ranks[t->host_first[t->host] + l]];
        epx__rt_size_t z = {0, hd->T + (int64_t)(t->nranks - 1) * cap, 0, 0};
        for (int p = 0; p < t->nranks; p++)
            z.nfwd += t->host_of[p] != t->host && epx__gw(t, p, t->host) == me ? cap : 0;
        z.fan = mine + z.nfwd * EPX__MIN(LS, K);
        z.self = z.fan - (mine - f.per_rank[me] + z.nfwd * EPX__MIN(LS - 1, K));
        local = epx__route_room(m, hd, &rt, &pl, &z, payload, err);
    }
    epx_status_t st = epx__verdict(m, local, EPX__H_LL_DISPATCH, K, 0, 0, &f, err);
    if (st == EPX_SUCCESS && payload && s->ll_fp8) {
        /* Quantise each token once, here. */
        for (int t = 0; t < hd->T; t++)
            epx__fp8_quantize_row((const uint16_t *)in->x + (size_t)t * (size_t)H, H, s->scale_format,
                                  m->ll_q + (size_t)t * (size_t)H, m->ll_scales + (size_t)t * sb);
        pl.x = (const char *)m->ll_q, pl.xs = m->ll_scales;
    }
    epx__rowsrc_t rs = {NULL, NULL};
    if (st == EPX_SUCCESS) st = epx__route(m, hd, NULL, &pl, false, NULL, &f, &rt, seq, NULL, &rs, err);
    epx__flows_free(&f);
    const epx__hier_xplan_t *xp = NULL; /* the handle's: its combine runs along it */
    if (st == EPX_SUCCESS && payload) st = epx__handle_plan(m, hd, &xp, err);
    if (st == EPX_SUCCESS && payload) {
        /* The caller's outputs, now that every rank agreed: each row into its slots, in the
         * row plan's order (local expert, then source rank and token ascending). */
        for (int64_t j = 0; j < xp->n_place; j++) {
            size_t slot = (size_t)xp->pslot[j];
            memcpy((char *)out->recv_x + slot * rb, rs.pay[xp->prow[j]], rb);
            if (sb) memcpy((char *)out->recv_x_scales + slot * sb, rs.scl[xp->prow[j]], sb);
            if (out->recv_src_rank) out->recv_src_rank[slot] = (int32_t)(xp->psrc[j] >> 32);
            if (out->recv_src_token) out->recv_src_token[slot] = (int32_t)(xp->psrc[j] & 0xffffffff);
        }
        for (int l = 0; l < s->local_experts; l++) {
            if (out->recv_count) out->recv_count[l] = (int32_t)xp->count[l];
            epx__ll_slots_unfilled(out->recv_src_rank, out->recv_src_token, s->ll_slots, l, (size_t)xp->count[l]);
        }
    }
    st = epx__route_end(m, st, err);
    if (st != EPX_SUCCESS) {
        epx__hier_moe_handle_free(m, hd);
        return st;
    }
    *handle = hd;
    return EPX_SUCCESS;
}

epx_status_t epx__hier_moe_ll_dispatch(epx__hier_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                       epx_moe_ll_dispatch_out_t *out, epx_status_t local,
                                       epx__hier_moe_handle_t **handle, epx__errbuf_t *err)
{
    return epx__ll_dispatch(m, in, out, local, true, handle, err);
}

epx_status_t epx__hier_moe_ll_dispatch_plan(epx__hier_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                            epx_status_t local, epx__hier_moe_handle_t **handle, epx__errbuf_t *err)
{
    return epx__ll_dispatch(m, in, NULL, local, false, handle, err);
}

epx_status_t epx__hier_moe_ll_combine(epx__hier_moe_t *m, const epx__hier_moe_handle_t *hd,
                                      const epx_moe_ll_combine_in_t *in, void *out, epx_status_t local,
                                      epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    uint32_t seq = epx__op_begin(m);
    bool ok = local == EPX_SUCCESS;
    epx__work_t wk;
    local = epx__work(m, hd, true, ok ? epx__home_rec(m, hd->K, false) : 0, local, &wk, err);
    epx_status_t st =
        epx__verdict(m, local, EPX__H_LL_COMBINE, ok ? hd->K : 0, 0, ok ? hd->id : 0, NULL, err);
    if (st != EPX_SUCCESS) return st;
    const epx__hier_xplan_t *x = wk.x;
    int K = hd->K;
    size_t crow = s->combine_row_bytes;
    epx__srcs_t src;
    st = epx__rows_home(m, &wk, in->y, NULL, seq, &src, err);
    if (st != EPX_SUCCESS) epx__left_peers(m, st);
    /* At home: out[t] = over the ranks ascending, the sum of each rank's w[t, k] * the row
     * of expert k, the valid k ascending (as on one host: epx__cpu_reduce_ll). */
    for (int i = 0; i < x->T && st == EPX_SUCCESS; i++) {
        const char *rows[EPX_MOE_MAX_TOPK];
        float w[EPX_MOE_MAX_TOPK];
        int32_t rank[EPX_MOE_MAX_TOPK];
        int n = (int)(x->first[i + 1] - x->first[i]);
        for (int j = 0; j < n; j++) {
            size_t k = (size_t)x->tk[x->first[i] + j];
            rows[j] = epx__src_row(&src, x->tok[x->first[i] + j]);
            w[j] = in->topk_weights[(size_t)i * (size_t)K + k];
            rank[j] = (int32_t)x->rk[x->first[i] + j];
        }
        epx__cpu_reduce_ll((char *)out + (size_t)i * crow, s->combine_dtype, rows, w, rank, n, s->hidden);
    }
    return st;
}
