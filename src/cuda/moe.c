/*
 * CUDA backend: high-throughput MoE dispatch, cached dispatch and combine, on the caller's
 * stream. Each call first agrees on the host (one round through the control plane: shapes,
 * IPC handles of the buffers peers will read), maps the peers' buffers (cached), then
 * enqueues: wait for every peer's stream (ARRIVE), the kernels, signal DONE; on the SM path
 * the first kernel that reads the peers takes the ARRIVE step and the last one DONE
 * (flags.cuh: epx__arrive, epx__done), so combine is one launch and dispatch three (count,
 * rows, gather), cached dispatch one. Dispatch reads
 * back one small count matrix (a stream synchronisation) to size its output and to check
 * every rank's routing before any row is written; a failure there is agreed on by all
 * ranks and the operation still completes on the device, so the streams stay in step.
 * When every rank gives a worst-case capacity and asks for the row count on the device,
 * dispatch skips that read-back: every rank checks every rank's routing on the device
 * (so all reach the same verdict without asking) and nothing waits for the device.
 *
 * On copy engines (EPX_MOE_COPY_ENGINES, epx.h) the payload is pushed instead: dispatch
 * always reads the counts back, packs my rows per destination into my staging buffer (a
 * local kernel, in stages) while a second stream copies each stage into the peers' recv_x
 * (cudaMemcpyAsync on the IPC mappings), my own rows go straight into my recv_x, and the
 * DONE signal after the copies tells every peer its rows are in. Combine copies each
 * source's contiguous expert outputs (and weights) into the staging of the tokens' rank,
 * signals DONE, and that rank reduces with the SM path's kernel. The routing outputs are
 * the SM path's (the same row kernel reads every rank's routing).
 */
#include "internal.h"

enum { EPX__COP_DISPATCH = 1, EPX__COP_CACHED, EPX__COP_COMBINE, EPX__COP_LL_DISPATCH, EPX__COP_LL_COMBINE };

struct epx__cuda_moe {
    epx__cuda_t *c;
    epx__moe_shape_t s;
    int blocks;          /* SM budget of the copy kernels */
    int *d_counts;       /* [R, R], then the row kernel's block counter; zero, and d_bad[0]
                            EPX__MOE_NO_BAD, outside a dispatch's count and row kernels */
    bool counts_dirty;   /* a count kernel ran without its row kernel: reset them first */
    int *d_chunk_counts; /* [R, chunks, R] */
    int chunks;          /* ceil(max_tokens / EPX__MOE_CHUNK) */
    long long *d_bad;    /* [2]: dispatch's bad-routing word, then layout's (layout may run on
                            another stream while a dispatch's kernels still read theirs) */
    int *d_expert_counts; /* [L] */
    int *d_layout_scratch; /* [R + E + 1], zero between layouts */
    int *h_counts;       /* pinned: [R, R], then the bad entry (8-byte aligned), then (copy
                            engines) my tokens' counts per chunk [chunks, R]: epx__h_bad,
                            epx__h_chunks */
    /* Low-latency: my staging area (peers push into it) and everyone's, mapped here. */
    char *stage;
    char *peer_stage[EPX__CUDA_MAX_RANKS];
    epx__ll_rail_t rails;  /* across hosts (nhosts > 0; epx__cuda_moe_ll_rails), rails.out its memory */
    void *stage_open[EPX__CUDA_MAX_RANKS]; /* the peers' staging mappings pinned in the IPC cache */
    long long ll_srow, ll_hdr, ll_half;
    /* One host: after the two dispatch halves, the combine's two (epx__ll_combine_t). */
    long long ll_chalf, ll_cp_off, ll_prow;
    /* Copy engines: `stage` holds the rows I send (dispatch) or receive (combine). */
    bool ce;
    size_t ce_scale_off, ce_w_off;   /* where FP8 scales (dispatch) and weights (combine) start */
    cudaStream_t ce_stream;          /* the dispatch's copies, beside its packs */
    cudaEvent_t ce_ev[4], ce_join;   /* stage i packed; every copy done */
    epx__cuda_moe_handle_t *spare; /* freed handles, their device arrays kept (no cudaMalloc per call) */
    epx__stage_buf_t in_stage; /* high-throughput inputs peers read that CUDA IPC cannot share,
                                  copied here per call (epx__stage_inputs) */
};

struct epx__cuda_moe_handle {
    uint32_t id;
    int num_tokens, topk;
    int64_t rows;                  /* host copy of the row count; -1 when not read back */
    long long *d_rows;             /* the row count on the device (-1: bad routing) */
    int *d_src_rank, *d_src_token; /* [R * max_tokens] */
    int *d_send_row;               /* [max_tokens, R] */
    int *d_slot, *d_topk, *d_bad;  /* low-latency: [max_tokens, K] slots and experts; bad flag */
    int *d_rail;                   /* across hosts: [2, nhosts, max_tokens, K] (epx__ll_rail_t topk, slot) */
    int *d_peers;                  /* one host: [R] every rank's T, then [2, R, max_tokens, K] their
                                      routing and slots here (epx__ll_args_t h_ptok ..) */
    int most_tokens;               /* low-latency: the largest T of any rank */
    int *h_cnt;                    /* copy engines: the count matrix [R, R], then my tokens'
                                      per chunk [chunks, R] (host copies of the dispatch's) */
    epx__ll_args_t ll_recv;        /* low-latency: the receive half of a split dispatch */
    epx__ll_combine_t ll_comb;     /* and of a split combine */
    epx__ipc_card_t *ll_ycards;    /* [R] where the peers' y of that combine lie (mapped again at
                                      the receive: a mapping may be closed in between) */
    epx__cuda_moe_t *owner;
    epx__cuda_moe_handle_t *next_spare;
};

/* One host: a combine half of rank o holds each source's weights [R, M, K] (float32), then,
 * from *cp_off, the rows each expert rank sends home for o's tokens [R, M] of *prow bytes
 * (a y row, or a float32 partial). Returns the half's bytes. */
static long long epx__llc_layout(const epx__moe_shape_t *s, long long *cp_off, long long *prow)
{
    long long M = EPX__MAX(s->max_tokens, 1), R = s->nranks;
    *cp_off = EPX__ALIGN_UP(R * M * s->max_topk * 4, 256);
    *prow = EPX__ALIGN_UP((long long)s->hidden * 4, 16);
    return EPX__ALIGN_UP(*cp_off + R * M * *prow, 256);
}

/* Ints of a handle's d_peers (one host). */
static size_t epx__ll_peers_ints(const epx__moe_shape_t *s)
{
    return (size_t)s->nranks * (1 + 2 * (size_t)EPX__MAX(s->max_tokens, 1) * (size_t)s->max_topk);
}

/* A handle with device arrays of the largest size, reused when one was freed. */
static epx__cuda_moe_handle_t *epx__handle_get(epx__cuda_moe_t *m)
{
    epx__cuda_moe_handle_t *h = m->spare;
    if (h) {
        m->spare = h->next_spare;
        return h;
    }
    h = calloc(1, sizeof *h);
    if (!h) return NULL;
    h->owner = m;
    if ((m->s.mode == EPX_MOE_LOW_LATENCY && !(h->ll_ycards = calloc((size_t)m->c->nranks, sizeof *h->ll_ycards))) ||
        (m->ce && !(h->h_cnt = calloc((size_t)m->c->nranks * (size_t)(m->c->nranks + m->chunks), sizeof *h->h_cnt)))) {
        free(h->ll_ycards);
        free(h);
        return NULL;
    }
    size_t rows = (size_t)m->c->nranks * (size_t)EPX__MAX(m->s.max_tokens, 1);
    size_t tk = (size_t)EPX__MAX(m->s.max_tokens, 1) * (size_t)m->s.max_topk;
    size_t rail = 2 * (size_t)m->rails.nhosts * tk;
    size_t peers = m->s.mode == EPX_MOE_LOW_LATENCY && m->rails.nhosts == 0 ? epx__ll_peers_ints(&m->s) : 0;
    if ((rail && cudaMalloc((void **)&h->d_rail, sizeof(int) * rail) != cudaSuccess) ||
        (peers && cudaMalloc((void **)&h->d_peers, sizeof(int) * peers) != cudaSuccess) ||
        cudaMalloc((void **)&h->d_src_rank, sizeof(int) * rows) != cudaSuccess ||
        cudaMalloc((void **)&h->d_src_token, sizeof(int) * rows) != cudaSuccess ||
        cudaMalloc((void **)&h->d_send_row, sizeof(int) * rows) != cudaSuccess ||
        cudaMalloc((void **)&h->d_rows, sizeof(long long)) != cudaSuccess ||
        (m->s.mode == EPX_MOE_LOW_LATENCY &&
         (cudaMalloc((void **)&h->d_slot, sizeof(int) * tk) != cudaSuccess ||
          cudaMalloc((void **)&h->d_topk, sizeof(int) * tk) != cudaSuccess ||
          cudaMalloc((void **)&h->d_bad, sizeof(int)) != cudaSuccess))) {
        cudaGetLastError();
        cudaFree(h->d_src_rank), cudaFree(h->d_src_token), cudaFree(h->d_send_row), cudaFree(h->d_rows);
        cudaFree(h->d_slot), cudaFree(h->d_topk), cudaFree(h->d_bad), cudaFree(h->d_rail), cudaFree(h->d_peers);
        free(h->ll_ycards);
        free(h->h_cnt);
        free(h);
        return NULL;
    }
    return h;
}

/* The context's rails (across hosts; none on one host) with h's arrays for my rail peers:
 * their routing, then their slots, [nhosts, max_tokens, max_topk] each. */
static epx__ll_rail_t epx__ll_rails_of(const epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h)
{
    epx__ll_rail_t r = m->rails;
    size_t tk = (size_t)EPX__MAX(m->s.max_tokens, 1) * (size_t)m->s.max_topk;
    if (r.nhosts > 0) r.topk = h->d_rail, r.slot = h->d_rail + (size_t)r.nhosts * tk;
    return r;
}

/* h's d_peers as the kernels see it (all NULL across hosts). */
static void epx__ll_peers_of(const epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h, int **ptok, int **proute,
                             int **pslot)
{
    size_t R = (size_t)m->s.nranks, tk = R * (size_t)EPX__MAX(m->s.max_tokens, 1) * (size_t)m->s.max_topk;
    *ptok = h->d_peers;
    *proute = h->d_peers ? h->d_peers + R : NULL;
    *pslot = h->d_peers ? h->d_peers + R + tk : NULL;
}

static void epx__handle_release(epx__cuda_moe_handle_t *h)
{
    cudaFree(h->d_src_rank);
    cudaFree(h->d_src_token);
    cudaFree(h->d_send_row);
    cudaFree(h->d_rows);
    cudaFree(h->d_slot), cudaFree(h->d_topk), cudaFree(h->d_bad), cudaFree(h->d_rail), cudaFree(h->d_peers);
    cudaGetLastError();
    free(h->ll_ycards);
    free(h->h_cnt);
    free(h);
}

/* What every rank tells the others at each MoE call. */
typedef struct {
    int32_t op, num_tokens, topk, has_weights;
    uint32_t routing_id;
    int32_t device_count; /* dispatch: the caller wants the row count on the device */
    int64_t capacity;
    epx__ipc_card_t x, scales, topk_idx, weights; /* buffers peers read (y: in x) */
    epx__ipc_card_t recv_x, recv_scales;          /* copy engines: buffers peers write */
} epx__moe_card_t;

#define EPX__CUDA_CHECK(call, st, err)                                                               \
    do {                                                                                             \
        cudaError_t e_ = (call);                                                                     \
        if (e_ != cudaSuccess && (st) == EPX_SUCCESS)                                                \
            (st) = epx__fail(err, EPX_ERR_CUDA, "%s: %s", #call, cudaGetErrorString(e_));            \
    } while (0)

/* The low-latency staging area: per source, a header (T, then int32 routing [M, K]) and
 * M rows of srow bytes (the row as received, then its scales when quantised); two of them. */
static void epx__ll_layout(const epx__moe_shape_t *s, long long *srow, long long *hdr, long long *half)
{
    long long M = EPX__MAX(s->max_tokens, 1), sb = s->scale_format == EPX_SCALE_UE8M0 ? 1 : 4;
    long long row = s->ll_fp8 ? EPX__ALIGN_UP((long long)s->hidden, 16) + (long long)s->scale_cols * sb : (long long)s->row_bytes;
    *srow = EPX__ALIGN_UP(row, 16);
    *hdr = EPX__ALIGN_UP(16 + 4 * M * s->max_topk, 128);
    *half = EPX__ALIGN_UP(s->nranks * *hdr + s->nranks * M * *srow, 256);
}

/* Where the read-back bad entry and per-chunk counts lie in m->h_counts. */
static long long *epx__h_bad(const epx__cuda_moe_t *m)
{
    int R = m->c->nranks;
    return (long long *)(void *)(m->h_counts + R * R + (R * R) % 2);
}
static int *epx__h_chunks(const epx__cuda_moe_t *m) { return (int *)(void *)(epx__h_bad(m) + 1); }

/* Does this context move its high-throughput payload with copy engines (epx.h)? */
static bool epx__moe_wants_ce(const epx__moe_shape_t *s)
{
    if (s->mode != EPX_MOE_HIGH_THROUGHPUT) return false;
    if (s->num_sms == EPX_MOE_COPY_ENGINES) return true;
    return s->num_sms <= 0 && epx__param_int(EPX__P_CUDA_SMS) <= 0;
}

/* The copy-engine staging buffer: the rows I send in a dispatch (then their FP8 scales at
 * *scale_off), or the rows peers send me in a combine (then their weights at *w_off);
 * (R - 1) * max_tokens rows either way. Returns its size. */
static size_t epx__ce_layout(const epx__moe_shape_t *s, size_t *scale_off, size_t *w_off)
{
    size_t rows = (size_t)(s->nranks - 1) * (size_t)s->max_tokens;
    *scale_off = EPX__ALIGN_UP(rows * s->row_bytes, (size_t)256);
    size_t dispatch = *scale_off + (s->dtype == EPX_FP8_E4M3 ? rows * s->scale_cols * 4 : 0);
    *w_off = EPX__ALIGN_UP(rows * s->combine_row_bytes, (size_t)256);
    size_t combine = *w_off + rows * (size_t)s->max_topk * 4;
    return EPX__MAX(EPX__MAX(dispatch, combine), (size_t)256);
}

/* Everyone's staging area (low-latency, or copy engines), mapped here (one host round at
 * creation, then one to agree that every rank mapped every peer's). The mappings are
 * pinned in the IPC cache for the context's life: kernels, copies and captured graphs hold
 * these pointers. */
static epx_status_t epx__map_stages(epx__cuda_moe_t *m, epx__errbuf_t *err)
{
    epx__cuda_t *c = m->c;
    int R = c->nranks;
    epx__ipc_card_t mine, *cards = calloc(2 * (size_t)R, sizeof *cards);
    if (!cards) /* still the swap's round (the others then skip the vote, as this rank does) */
        return epx__host_fail(c->host, epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    epx_status_t local = epx__ipc_export(c, m->stage, &mine, err);
    for (int p = 0; p < R; p++) cards[p] = mine;
    epx_status_t st = epx__swap_cards(c, cards, sizeof mine, local, err);
    if (st != EPX_SUCCESS) { /* on every rank: nobody maps, nobody votes */
        free(cards);
        return st;
    }
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
        if (p == c->rank) {
            m->peer_stage[p] = m->stage;
            continue;
        }
        char *base = NULL;
        st = epx__ipc_pin(c, p, &cards[R + p], &base, err);
        m->stage_open[p] = base;
        if (st == EPX_SUCCESS) m->peer_stage[p] = base + cards[R + p].base_offset;
    }
    free(cards);
    /* Agree on the outcome: every rank that made the swap votes, whatever its mapping did
     * (deciding by this rank's status alone, a rank whose swap failed locally with one of
     * the mapping's statuses would wait in a vote the others skip). */
    return epx__host_agree_mapped(c, st, err);
}

epx_status_t epx__cuda_moe_create(epx__cuda_t *c, const epx__moe_shape_t *shape, uint64_t hash, epx_status_t local,
                                  epx__cuda_moe_t **out, epx__errbuf_t *err)
{
    int R = c->nranks;
    epx__cuda_fault_begin(c);
    epx__cuda_moe_t *m = calloc(1, sizeof *m);
    uint64_t *all = calloc(2 * (size_t)R, sizeof *all);
    if (!m || !all) {
        free(m), free(all);
        return epx__host_fail(c->host, local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    }
    m->c = c;
    m->s = *shape;
    /* Copy engines: the local pack and reduce kernels get EPX_CUDA_CE_SMS blocks (and so
     * does low-latency's fallback grid when EPX_CUDA_SMS is 0). */
    m->ce = epx__moe_wants_ce(shape);
    int64_t sms = shape->num_sms > 0 ? shape->num_sms : epx__param_int(EPX__P_CUDA_SMS);
    if (m->ce || sms <= 0) sms = epx__param_int(EPX__P_CUDA_CE_SMS);
    int dev_sms = 0;
    if (cudaDeviceGetAttribute(&dev_sms, cudaDevAttrMultiProcessorCount, c->device) == cudaSuccess && dev_sms > 0)
        sms = EPX__MIN(sms, (int64_t)dev_sms);
    m->blocks = (int)EPX__MAX(sms, (int64_t)1);
    if (local == EPX_SUCCESS) {
        m->chunks = EPX__MAX((shape->max_tokens + EPX__MOE_CHUNK - 1) / EPX__MOE_CHUNK, 1);
        cudaError_t ce = cudaMalloc((void **)&m->d_counts, sizeof(int) * (size_t)(R * R + 1));
        if (ce == cudaSuccess) ce = cudaMemset(m->d_counts, 0, sizeof(int) * (size_t)(R * R + 1));
        if (ce == cudaSuccess)
            ce = cudaMalloc((void **)&m->d_chunk_counts, sizeof(int) * (size_t)R * (size_t)R * (size_t)m->chunks);
        if (ce == cudaSuccess) ce = cudaMalloc((void **)&m->d_bad, 2 * sizeof(long long));
        if (ce == cudaSuccess) ce = cudaMemset(m->d_bad, 0x7f, 2 * sizeof(long long)); /* EPX__MOE_NO_BAD */
        if (ce == cudaSuccess) ce = cudaMalloc((void **)&m->d_expert_counts, sizeof(int) * (size_t)EPX__MAX(shape->local_experts, 1));
        if (ce == cudaSuccess)
            ce = cudaMalloc((void **)&m->d_layout_scratch, sizeof(int) * (size_t)(R + shape->num_experts + 1));
        if (ce == cudaSuccess) ce = cudaMemset(m->d_layout_scratch, 0, sizeof(int) * (size_t)(R + shape->num_experts + 1));
        if (ce == cudaSuccess)
            ce = cudaHostAlloc((void **)&m->h_counts, sizeof(int) * (size_t)R * (size_t)(R + m->chunks) + 16, 0);
        if (ce == cudaSuccess && shape->mode == EPX_MOE_LOW_LATENCY) {
            epx__ll_layout(shape, &m->ll_srow, &m->ll_hdr, &m->ll_half);
            if (shape->nranks == R) m->ll_chalf = epx__llc_layout(shape, &m->ll_cp_off, &m->ll_prow); /* one host */
            ce = cudaMalloc((void **)&m->stage, 2 * (size_t)(m->ll_half + m->ll_chalf));
        }
        if (ce == cudaSuccess && m->ce) {
            ce = cudaMalloc((void **)&m->stage, epx__ce_layout(shape, &m->ce_scale_off, &m->ce_w_off));
            if (ce == cudaSuccess) ce = cudaStreamCreateWithFlags(&m->ce_stream, cudaStreamNonBlocking);
            for (int i = 0; i < 4 && ce == cudaSuccess; i++) ce = cudaEventCreateWithFlags(&m->ce_ev[i], cudaEventDisableTiming);
            if (ce == cudaSuccess) ce = cudaEventCreateWithFlags(&m->ce_join, cudaEventDisableTiming);
        }
        /* The memsets above run on the legacy stream, which the caller's non-blocking
         * streams do not wait for: finish them before any call can use the words. */
        if (ce == cudaSuccess) ce = cudaDeviceSynchronize();
        if (ce != cudaSuccess) local = epx__fail(err, EPX_ERR_CUDA, "MoE setup: %s", cudaGetErrorString(ce));
    }
    /* The path is part of the configuration: a pushing rank needs pushing peers. */
    uint64_t mine[2] = {hash, m->ce};
    epx_status_t st = epx__host_allgather(c->host, R, mine, all, sizeof mine, local, err);
    for (int p = 0; p < R && st == EPX_SUCCESS; p++)
        if (all[2 * p] != hash)
            st = epx__fail(err, EPX_ERR_MISMATCH, "rank %d's MoE configuration differs from rank %d's", p, c->rank);
        else if (all[2 * p + 1] != mine[1])
            st = epx__fail(err, EPX_ERR_MISMATCH,
                           "rank %d moves the MoE payload with %s, rank %d with %s (cfg.num_sms / EPX_CUDA_SMS)", p,
                           all[2 * p + 1] ? "copy engines" : "SMs", c->rank, m->ce ? "copy engines" : "SMs");
    free(all);
    if (st == EPX_SUCCESS && (shape->mode == EPX_MOE_LOW_LATENCY || m->ce)) st = epx__map_stages(m, err);
    if (st != EPX_SUCCESS) {
        epx__cuda_moe_destroy(m);
        return st;
    }
    *out = m;
    return EPX_SUCCESS;
}

int64_t epx__cuda_moe_device_bytes(const epx__moe_shape_t *s)
{
    int64_t R = s->nranks, M = EPX__MAX(s->max_tokens, 1), chunks = EPX__MAX((s->max_tokens + EPX__MOE_CHUNK - 1) / EPX__MOE_CHUNK, 1);
    int64_t context = 4 * (R * R + 1 + R * R * chunks + EPX__MAX(s->local_experts, 1) + R + s->num_experts + 1) + 16;
    int64_t handle = 3 * 4 * R * M + 8; /* each live dispatch handle */
    if (s->mode == EPX_MOE_LOW_LATENCY) {
        long long srow, hdr, half;
        epx__ll_layout(s, &srow, &hdr, &half);
        long long cp_off, prow;
        context += 2 * half + 2 * epx__llc_layout(s, &cp_off, &prow);
        handle += 2 * 4 * M * s->max_topk + 4 + 4 * (int64_t)epx__ll_peers_ints(s);
    }
    if (epx__moe_wants_ce(s)) {
        size_t a, b;
        context += (int64_t)epx__ce_layout(s, &a, &b);
    }
    return context + handle;
}

void epx__cuda_moe_detach(epx__cuda_moe_t *m)
{
    if (!m) return;
    for (int p = 0; p < EPX__CUDA_MAX_RANKS; p++)
        if (m->stage_open[p]) epx__ipc_unpin(m->c, p, m->stage_open[p]);
    memset(m->stage_open, 0, sizeof m->stage_open);
}

void epx__cuda_moe_destroy(epx__cuda_moe_t *m)
{
    if (!m) return;
    epx__cuda_moe_detach(m);
    cudaFree(m->d_counts);
    cudaFree(m->d_chunk_counts);
    cudaFree(m->d_bad);
    cudaFree(m->d_expert_counts);
    cudaFree(m->d_layout_scratch);
    cudaFree(m->stage);
    cudaFree(m->rails.out);
    epx__stage_buf_free(&m->in_stage);
    if (m->ce_stream) cudaStreamDestroy(m->ce_stream);
    for (int i = 0; i < 4; i++)
        if (m->ce_ev[i]) cudaEventDestroy(m->ce_ev[i]);
    if (m->ce_join) cudaEventDestroy(m->ce_join);
    if (m->h_counts) cudaFreeHost(m->h_counts);
    while (m->spare) {
        epx__cuda_moe_handle_t *h = m->spare;
        m->spare = h->next_spare;
        epx__handle_release(h);
    }
    cudaGetLastError();
    free(m);
}

void epx__cuda_moe_handle_abandon(epx__cuda_moe_handle_t *h)
{
    if (!h) return;
    free(h->ll_ycards);
    free(h->h_cnt);
    free(h);
}

/* Back to the context's spares: a later dispatch reuses the device arrays. Kernels still
 * in flight on the stream that used them run before any later use of the same stream. */
void epx__cuda_moe_handle_free(epx__cuda_moe_handle_t *h)
{
    if (!h) return;
    h->next_spare = h->owner->spare;
    h->owner->spare = h;
}

int64_t epx__cuda_moe_handle_rows(const epx__cuda_moe_handle_t *h) { return h->rows; }
int epx__cuda_moe_handle_tokens(const epx__cuda_moe_handle_t *h) { return h->num_tokens; }
int epx__cuda_moe_handle_topk(const epx__cuda_moe_handle_t *h) { return h->topk; }

epx_status_t epx__cuda_moe_layout(epx__cuda_moe_t *m, const void *topk_idx, int num_tokens, int topk, int32_t *per_rank,
                                  int32_t *per_expert, uint8_t *in_rank, void *stream, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    epx__moe_routing_t rt;
    memset(&rt, 0, sizeof rt);
    rt.rank = m->c->rank;
    rt.nranks = m->c->nranks;
    rt.num_experts = s->num_experts;
    rt.local_experts = s->local_experts;
    rt.topk = topk;
    rt.index_i64 = s->index_dtype == EPX_I64;
    rt.topk_idx[rt.rank] = topk_idx;
    rt.num_tokens[rt.rank] = num_tokens;
    epx_status_t st = EPX_SUCCESS;
    /* Checked and laid out in one launch, nothing waited for: bad ids give -1 counts. */
    EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_moe_layout_checked(&rt, per_rank, per_expert, in_rank, m->d_bad + 1,
                                                                     m->d_layout_scratch,
                                                                     m->blocks, stream),
                    st, err);
    return st;
}

/* ---- The host round ------------------------------------------------------------------------ */

/* Export the buffers peers will read into my card (NULL or empty ones stay unset). */
static epx_status_t epx__card_export(epx__cuda_t *c, epx__ipc_card_t *card, const void *p, size_t bytes,
                                     epx__errbuf_t *err)
{
    memset(card, 0, sizeof *card);
    if (!p || bytes == 0) return EPX_SUCCESS;
    return epx__ipc_export(c, p, card, err);
}

/* ---- Inputs CUDA IPC cannot share ------------------------------------------------------------
 *
 * A buffer peers read (x, x_scales, topk_idx, topk_weights of a dispatch; x, x_scales of a
 * cached dispatch; y, topk_weights of a combine) may lie in memory CUDA IPC cannot share (a
 * stream-ordered pool, cuMemCreate). Such a buffer is copied, on the call's stream, into the
 * context's in_stage, and my card shows the peers that copy; this rank's own kernels still
 * read the caller's buffer (the same bytes). A peer needs to know nothing of it: it maps
 * whatever card it gets. The copies are enqueued before the host round, and a failure to
 * allocate or enqueue them is the call's `local` status there, so every rank fails the call
 * together and no peer reads a copy that was not made.
 *
 * Why the copies are ordered with the peers' reads. A peer reads my inputs of operation n
 * only after it acquired my ARRIVE n, and my ARRIVE n is released (at system scope, after
 * everything before it on my stream: flags.cuh) by the first kernel of the operation that
 * takes that step (dispatch: the count kernel; cached dispatch: the gather kernel; combine:
 * the combine kernel), which comes after the copies on the same stream. A peer is done
 * reading before it signals DONE n, which my stream waits for in the operation's DONE step
 * (flags.cuh: epx__done; epx__moe_finish) before anything enqueued later on it, such as the
 * next call's copies into in_stage (the calls of a context run in order, on one stream or on
 * streams the caller orders, as its other buffers require). A call that fails after its
 * copies were enqueued (another rank's verdict) signals no ARRIVE: nobody reads what they
 * wrote, and the next call writes in_stage again before its own ARRIVE. */

/* An input to stage: copied into in_stage at `off`, its card then pointed there. */
typedef struct {
    const void *src;
    size_t off;
    long long rows, row_bytes; /* rows at most (all copied when dev_rows is NULL) */
    const long long *dev_rows; /* else the row count, on the device (a combine without host
                                  synchronisation: epx__cuda_launch_copy_rows) */
    epx__ipc_card_t *card;
} epx__stage_in_t;

/* A call's inputs to stage. */
#define EPX__STAGE_MAX 4
typedef struct {
    int n;
    size_t need; /* bytes of in_stage their copies take */
    epx__stage_in_t in[EPX__STAGE_MAX];
} epx__stage_t;

/* epx__card_export of an input peers read: `rows` rows of `row_bytes` at most, their number
 * in `dev_rows` on the device when not NULL. Memory CUDA IPC cannot share is added to stg
 * (its card left zero until epx__stage_inputs), unless no peer reads it (one rank). */
static epx_status_t epx__input_export(epx__cuda_moe_t *m, epx__stage_t *stg, epx__ipc_card_t *card, const void *p,
                                      size_t rows, size_t row_bytes, const long long *dev_rows, epx__errbuf_t *err)
{
    memset(card, 0, sizeof *card);
    if (!p || rows * row_bytes == 0) return EPX_SUCCESS;
    bool shareable;
    EPX__CHECK(epx__ipc_export_if(m->c, p, card, &shareable, err));
    if (shareable || m->c->nranks == 1) return EPX_SUCCESS;
    if (stg->n == EPX__STAGE_MAX) return epx__fail(err, EPX_ERR_INTERNAL, "more than %d MoE inputs to stage", stg->n);
    size_t off = EPX__ALIGN_UP(stg->need, (size_t)256);
    stg->in[stg->n++] = (epx__stage_in_t){p, off, (long long)rows, (long long)row_bytes, dev_rows, card};
    stg->need = off + rows * row_bytes;
    return EPX_SUCCESS;
}

/* One staging copy, on `stream`. */
static cudaError_t epx__stage_copy(const epx__cuda_moe_t *m, const epx__stage_in_t *in, void *stream)
{
    char *dst = m->in_stage.ptr + in->off;
    if (in->dev_rows)
        return (cudaError_t)epx__cuda_launch_copy_rows(dst, in->src, in->dev_rows, in->rows, in->row_bytes, m->blocks,
                                                       stream);
    return cudaMemcpyAsync(dst, in->src, (size_t)(in->rows * in->row_bytes), cudaMemcpyDeviceToDevice,
                           (cudaStream_t)stream);
}

/* Stage the inputs in stg (when there are any; see the top of this section): in_stage made
 * large enough, each input copied into it on `stream`, its card pointed at its copy. Before
 * the host round; a failure is the call's `local` status there. */
static epx_status_t epx__stage_inputs(epx__cuda_moe_t *m, epx__stage_t *stg, void *stream, epx__errbuf_t *err)
{
    if (stg->n == 0) return EPX_SUCCESS;
    EPX__CHECK(epx__stage_buf_reserve(&m->in_stage, stg->need, false, "MoE inputs", stream, err));
    epx__ipc_card_t card;
    EPX__CHECK(epx__ipc_export(m->c, m->in_stage.ptr, &card, err)); /* cudaMalloc'd: shareable */
    for (int i = 0; i < stg->n; i++) {
        cudaError_t ce = epx__stage_copy(m, &stg->in[i], stream);
        if (ce != cudaSuccess) {
            cudaGetLastError();
            return epx__fail(err, EPX_ERR_CUDA, "copying a MoE input that CUDA IPC cannot share: %s",
                             cudaGetErrorString(ce));
        }
        *stg->in[i].card = card;
        stg->in[i].card->base_offset += (int64_t)stg->in[i].off;
    }
    return EPX_SUCCESS;
}

/* A peer's buffer mapped here (mine as is), or NULL when it exported none. */
static epx_status_t epx__card_map(epx__cuda_t *c, int p, const epx__ipc_card_t *card, const void *own,
                                  const char **out, cudaGraph_t graph, epx__errbuf_t *err)
{
    *out = NULL;
    if (p == c->rank) {
        *out = own;
        return EPX_SUCCESS;
    }
    if (card->buffer_id == 0 && card->base_offset == 0 && memcmp(&card->handle, &(cudaIpcMemHandle_t){0}, sizeof card->handle) == 0)
        return EPX_SUCCESS;
    char *base;
    EPX__CHECK(epx__ipc_open(c, p, card, &base, graph, err));
    *out = base + card->base_offset;
    return EPX_SUCCESS;
}

/* Swap cards; check that all ranks make the same call. `in` gets everyone's. */
static epx_status_t epx__moe_meet(epx__cuda_moe_t *m, epx__moe_card_t *mine, epx__moe_card_t *in, epx_status_t local,
                                  epx__errbuf_t *err)
{
    int R = m->c->nranks;
    epx__moe_card_t *cards = calloc(2 * (size_t)R, sizeof *cards);
    if (!cards)
        return epx__host_fail(m->c->host, local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    for (int p = 0; p < R; p++) cards[p] = *mine;
    epx_status_t st = epx__swap_cards(m->c, cards, sizeof *mine, local, err);
    memcpy(in, cards + R, sizeof *in * (size_t)R);
    free(cards);
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
        if (in[p].op != mine->op || in[p].topk != mine->topk)
            st = epx__fail(err, EPX_ERR_MISMATCH, "rank %d made another MoE call (or top-k) than rank %d", p, m->c->rank);
        else if (in[p].routing_id != mine->routing_id)
            st = epx__fail(err, EPX_ERR_MISMATCH, "rank %d passed the handle of another dispatch than rank %d", p,
                           m->c->rank);
        else if (in[p].has_weights != mine->has_weights)
            st = epx__fail(err, EPX_ERR_MISMATCH, "ranks %d and %d disagree on passing topk_weights", p, m->c->rank);
        else if (in[p].num_tokens < 0 || in[p].num_tokens > m->s.max_tokens) /* peers would read past its routing */
            st = epx__fail(err, EPX_ERR_MISMATCH, "rank %d announces %d tokens, outside [0, max_tokens_per_rank = %d]", p,
                           (int)in[p].num_tokens, m->s.max_tokens);
    }
    return st;
}

/* Complete the operation on the device (DONE, epoch advances) whatever happened after the
 * streams met, so that every rank's next operation has the same number. */
static epx_status_t epx__moe_finish(epx__cuda_moe_t *m, epx_status_t st, void *stream, epx__errbuf_t *err)
{
    cudaError_t ce = (cudaError_t)epx__cuda_launch_signal_wait(&m->c->dev, EPX__FLAG_DONE, 1, stream);
    if (ce != cudaSuccess && st == EPX_SUCCESS)
        st = epx__fail(err, EPX_ERR_CUDA, "MoE completion: %s", cudaGetErrorString(ce));
    return st;
}

/* Copy engines write into the peers' buffers, so a rank whose enqueue failed after the
 * ranks agreed (`agreed` is success, `st` not) must not send DONE over the holes it left:
 * it withholds the signal, and the peers' bounded waits time out naming it (their call's
 * outputs are then not to be trusted; the error surfaces at their next call). */
static epx_status_t epx__moe_finish_after(epx__cuda_moe_t *m, epx_status_t agreed, epx_status_t st, void *stream,
                                          epx__errbuf_t *err)
{
    if (m->ce && agreed == EPX_SUCCESS && st != EPX_SUCCESS) return st;
    return epx__moe_finish(m, st, stream, err);
}

/* A kernel that was to take the ARRIVE step could not be launched: ARRIVE on its own, so
 * that the peers' waits end (a second ARRIVE is harmless: flags only grow). */
static void epx__moe_arrive_instead(epx__cuda_moe_t *m, void *stream)
{
    (void)epx__cuda_launch_signal_wait(&m->c->dev, EPX__FLAG_ARRIVE, 0, stream);
}

/* ---- Copy engines ---------------------------------------------------------------------------- */

/* Where rank p's rows start in rank q's recv_x: the rows q receives from ranks before p. */
static int64_t epx__ce_base(const int *cnt, int R, int p, int q)
{
    int64_t n = 0;
    for (int s = 0; s < p; s++) n += cnt[s * R + q];
    return n;
}

/* Where, in rank p's staging, lie the rows p exchanges with rank r (p's tokens at r): after
 * those of every rank before r but p itself (which stages nothing of its own). */
static int64_t epx__ce_stage_row(const int *cnt, int R, int p, int r)
{
    int64_t n = 0;
    for (int s = 0; s < r; s++)
        if (s != p) n += cnt[p * R + s];
    return n;
}

/* Every peer's recv_x (and FP8 recv_x_scales), as mapped here, into dx and ds. */
static epx_status_t epx__map_recv(epx__cuda_moe_t *m, const epx__moe_card_t *cards, const epx_moe_dispatch_out_t *out,
                                  char **dx, char **ds, cudaGraph_t graph, epx__errbuf_t *err)
{
    epx__cuda_t *c = m->c;
    for (int p = 0; p < c->nranks; p++) {
        bool own = p == c->rank;
        const char *ptr;
        EPX__CHECK(epx__card_map(c, p, &cards[p].recv_x, own ? out->recv_x : NULL, &ptr, graph, err));
        dx[p] = (char *)(uintptr_t)ptr;
        ds[p] = NULL;
        if (m->s.dtype == EPX_FP8_E4M3) {
            EPX__CHECK(epx__card_map(c, p, &cards[p].recv_scales, own ? (const void *)out->recv_x_scales : NULL, &ptr,
                                     graph, err));
            ds[p] = (char *)(uintptr_t)ptr;
        }
    }
    return EPX_SUCCESS;
}

/* Copy-engine dispatch along h (its send rows and host counts), enqueued after the streams
 * met: my rows for the peers packed into my staging in up to four stages of whole token
 * chunks, each stage copied into the peers' recv_x (dx, ds: mapped here) on ce_stream as
 * soon as it is packed, while the next is packed; then my own rows straight into my
 * recv_x. The stream waits for every copy, so a signal after this orders them. */
static epx_status_t epx__ce_dispatch_rows(epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h,
                                          const epx_moe_dispatch_in_t *in, const epx_moe_dispatch_out_t *out,
                                          char *const *dx, char *const *ds, void *stream, epx__errbuf_t *err)
{
    int R = m->c->nranks, me = m->c->rank;
    bool fp8 = m->s.dtype == EPX_FP8_E4M3;
    const int *cnt = h->h_cnt, *chunk = h->h_cnt + R * R;
    /* Under capture (a cached dispatch) the copies go on the caller's stream: ce_stream,
     * shared by the context's calls, never joins a capture (it would stay in it). */
    cudaStream_t s = (cudaStream_t)stream, cs = epx__cuda_capturing(stream) ? s : m->ce_stream;
    epx__moe_pack_t k;
    memset(&k, 0, sizeof k);
    k.x = (const char *)in->x;
    k.scales = fp8 ? (const char *)in->x_scales : NULL;
    k.send_row = h->d_send_row;
    k.nranks = R;
    k.rank = me;
    k.row_bytes = (long long)m->s.row_bytes;
    k.scale_bytes = fp8 ? (long long)m->s.scale_cols * 4 : 0;
    int64_t peer_rows = 0, at[EPX__CUDA_MAX_RANKS], sent[EPX__CUDA_MAX_RANKS];
    for (int q = 0; q < R; q++) {
        at[q] = epx__ce_stage_row(cnt, R, me, q);
        sent[q] = 0;
        k.base[q] = epx__ce_base(cnt, R, me, q);
        k.dst[q] = m->stage + at[q] * k.row_bytes;
        k.dst_s[q] = m->stage + m->ce_scale_off + at[q] * k.scale_bytes;
        if (q != me) peer_rows += cnt[me * R + q];
    }
    int T = h->num_tokens, chunks = (T + EPX__MOE_CHUNK - 1) / EPX__MOE_CHUNK;
    /* Stages of at least 2 MiB: each copy costs microseconds of its own. */
    int64_t stages = peer_rows == 0 ? 0 : EPX__MAX(peer_rows * k.row_bytes >> 21, (int64_t)1);
    stages = EPX__MIN(EPX__MIN(stages, (int64_t)4), (int64_t)chunks);
    cudaError_t e = cudaSuccess;
    bool forked = false; /* ce_stream waits on this call: it must join the stream again, whatever fails */
    for (int g = 0; g < (int)stages && e == cudaSuccess; g++) {
        int c0 = (int)(chunks * g / stages), c1 = (int)(chunks * (g + 1) / stages);
        k.t0 = c0 * EPX__MOE_CHUNK;
        k.t1 = EPX__MIN(c1 * EPX__MOE_CHUNK, T);
        e = (cudaError_t)epx__cuda_launch_moe_pack(&k, m->blocks, stream);
        if (e == cudaSuccess && cs != s) e = cudaEventRecord(m->ce_ev[g], s);
        if (e == cudaSuccess && cs != s) e = cudaStreamWaitEvent(cs, m->ce_ev[g], 0);
        forked = forked || (e == cudaSuccess && cs != s);
        for (int i = 1; i < R && e == cudaSuccess; i++) {
            int q = (me + i) % R;
            int64_t n = 0;
            for (int cc = c0; cc < c1; cc++) n += chunk[cc * R + q];
            if (n == 0) continue;
            int64_t from = at[q] + sent[q], to = k.base[q] + sent[q];
            e = cudaMemcpyAsync(dx[q] + to * k.row_bytes, m->stage + from * k.row_bytes, (size_t)(n * k.row_bytes),
                                cudaMemcpyDeviceToDevice, cs);
            if (e == cudaSuccess && fp8)
                e = cudaMemcpyAsync(ds[q] + to * k.scale_bytes, m->stage + m->ce_scale_off + from * k.scale_bytes,
                                    (size_t)(n * k.scale_bytes), cudaMemcpyDeviceToDevice, cs);
            sent[q] += n;
        }
    }
    /* My own rows: a local copy, beside the last copies. */
    k.self = 1;
    k.t0 = 0;
    k.t1 = T;
    k.dst[me] = (char *)out->recv_x;
    k.dst_s[me] = (char *)out->recv_x_scales;
    k.base[me] = 0;
    if (e == cudaSuccess && cnt[me * R + me] > 0) e = (cudaError_t)epx__cuda_launch_moe_pack(&k, m->blocks, stream);
    if (forked) { /* also after a failure: no copy may outlive the DONE signal after this */
        cudaError_t j = cudaEventRecord(m->ce_join, cs);
        if (j == cudaSuccess) j = cudaStreamWaitEvent(s, m->ce_join, 0);
        if (j != cudaSuccess) j = cudaStreamSynchronize(cs); /* last resort: wait on the host */
        if (e == cudaSuccess) e = j;
    }
    if (e != cudaSuccess)
        return epx__fail(err, EPX_ERR_CUDA, "copy-engine dispatch enqueue: %s", cudaGetErrorString(e));
    return EPX_SUCCESS;
}

/* ---- Dispatch -------------------------------------------------------------------------------- */

/* Every rank's token rows (and FP8 scales), as mapped here, into g->x and g->scales. */
static epx_status_t epx__map_tokens(epx__cuda_moe_t *m, const epx__moe_card_t *cards, const epx_moe_dispatch_in_t *in,
                                    epx__moe_gather_t *g, cudaGraph_t graph, epx__errbuf_t *err)
{
    epx__cuda_t *c = m->c;
    for (int p = 0; p < c->nranks; p++) {
        bool own = p == c->rank;
        EPX__CHECK(epx__card_map(c, p, &cards[p].x, own ? in->x : NULL, &g->x[p], graph, err));
        if (m->s.dtype == EPX_FP8_E4M3)
            EPX__CHECK(epx__card_map(c, p, &cards[p].scales, own ? (const void *)in->x_scales : NULL, &g->scales[p],
                                     graph, err));
    }
    return EPX_SUCCESS;
}

/* The rest of a gather along handle h: which rows, from where, into out. */
static void epx__gather_along(const epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h, epx_moe_dispatch_out_t *out,
                              epx__moe_gather_t *g)
{
    bool fp8 = m->s.dtype == EPX_FP8_E4M3;
    g->src_rank = h->d_src_rank;
    g->src_token = h->d_src_token;
    g->rows = h->d_rows;
    g->row_bytes = (long long)m->s.row_bytes;
    g->scale_bytes = fp8 ? (long long)(m->s.scale_cols * 4) : 0;
    g->recv_x = out->recv_x;
    g->recv_scales = fp8 ? (char *)out->recv_x_scales : NULL;
}

/* Rows rank q receives, from the count matrix read back from the device. */
static int64_t epx__rows_of(const epx__cuda_moe_t *m, int q)
{
    int R = m->c->nranks;
    int64_t n = 0;
    for (int p = 0; p < R; p++) n += m->h_counts[p * R + q];
    return n;
}

/* A dispatch's rows along h: pulled by the gather kernel (g: every rank's tokens, mapped),
 * which also takes the operation's `steps` (EPX__STEP_*; *finished then says whether DONE
 * was enqueued so), or on copy engines pushed into the peers' recv_x (dx, ds) when nothing
 * failed so far (steps are not taken there: the caller enqueues them). */
static epx_status_t epx__move_rows(epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h, const epx_moe_dispatch_in_t *in,
                                   epx_moe_dispatch_out_t *out, epx__moe_gather_t *g, char *const *dx, char *const *ds,
                                   epx_status_t st, int steps, bool *finished, void *stream, epx__errbuf_t *err)
{
    *finished = false;
    if (st != EPX_SUCCESS) return st;
    if (m->ce) return epx__ce_dispatch_rows(m, h, in, out, dx, ds, stream, err);
    epx__gather_along(m, h, out, g);
    EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_moe_gather(g, &m->c->dev, steps, m->blocks, stream), st, err);
    *finished = st == EPX_SUCCESS && (steps & EPX__STEP_DONE);
    return st;
}

/* The rest of a dispatch once the counts are on the device: lay out the rows (every rank,
 * whatever `st` says, so the operation completes everywhere), gather them, finish. n: the
 * rows I receive, or -1 when not read back. */
static epx_status_t epx__moe_lay_out(epx__cuda_moe_t *m, const epx__moe_routing_t *rt, epx__moe_gather_t *g,
                                     const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out, char *const *dx,
                                     char *const *ds, epx_status_t st, int64_t n, epx__cuda_moe_handle_t *h,
                                     epx__cuda_moe_handle_t **handle, void *stream, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    epx__cuda_t *c = m->c;
    epx_status_t agreed = st;
    bool finished = false; /* the gather kernel took the DONE step */
    if (st == EPX_SUCCESS) {
        h->id = (uint32_t)(c->ops_started + 1);
        h->num_tokens = rt->num_tokens[c->rank];
        h->topk = rt->topk;
        h->rows = n;
        int R = c->nranks;
        if (m->ce) { /* the count matrix, then my tokens' per chunk, as read back */
            memcpy(h->h_cnt, m->h_counts, sizeof(int) * (size_t)R * (size_t)R);
            memcpy(h->h_cnt + R * R, epx__h_chunks(m), sizeof(int) * (size_t)R * (size_t)m->chunks);
        }
        epx__moe_rows_out_t o = {m->d_counts, m->d_chunk_counts, m->chunks, out->recv_topk_idx, out->recv_topk_weights,
                                 out->recv_src_rank, out->recv_src_token, m->d_expert_counts,
                                 out->num_recv_tokens_per_expert, s->alignment, h->d_src_rank, h->d_src_token,
                                 h->d_send_row, m->d_bad, h->d_rows, (long long *)out->num_recv_tokens_device};
        EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_moe_rows(rt, &o, stream), st, err);
        if (st == EPX_SUCCESS) m->counts_dirty = false; /* the row kernel leaves them ready */
        st = epx__move_rows(m, h, in, out, g, dx, ds, st, EPX__STEP_DONE, &finished, stream, err);
    }
    c->ops_started++;
    if (!finished) st = epx__moe_finish_after(m, agreed, st, stream, err);
    if (st != EPX_SUCCESS) {
        epx__cuda_moe_handle_free(h);
        return st;
    }
    epx__cuda_fault_at(c, EPX__FAULT_AT_LAUNCHED);
    out->num_recv_tokens = n;
    *handle = h;
    return EPX_SUCCESS;
}

epx_status_t epx__cuda_moe_dispatch(epx__cuda_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                    epx_status_t local, epx__cuda_moe_handle_t **handle, void *stream,
                                    epx__errbuf_t *err)
{
    epx__cuda_t *c = m->c;
    const epx__moe_shape_t *s = &m->s;
    int R = c->nranks, me = c->rank;
    bool fp8 = s->dtype == EPX_FP8_E4M3;
    epx__cuda_fault_begin(c);
    epx__moe_card_t mine, *cards = calloc((size_t)R, sizeof *cards);
    if (!cards)
        return epx__host_fail(c->host, local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    memset(&mine, 0, sizeof mine);
    mine.op = EPX__COP_DISPATCH;
    epx__stage_t stg = {0};
    /* The handle before the host round: running out of device memory is this rank's
     * verdict (on copy engines the peers' outputs depend on my copies). */
    epx__cuda_moe_handle_t *h = NULL;
    if (local == EPX_SUCCESS && !(h = epx__handle_get(m)))
        local = epx__fail(err, EPX_ERR_NO_MEMORY, "no device memory for the handle");
    if (local == EPX_SUCCESS) {
        size_t T = (size_t)in->num_tokens, K = (size_t)in->topk;
        mine.num_tokens = in->num_tokens;
        mine.topk = in->topk;
        mine.has_weights = in->topk_weights != NULL;
        mine.capacity = out->capacity;
        mine.device_count = out->num_recv_tokens_device != NULL;
        if (m->ce) { /* peers write my outputs; nobody reads my tokens */
            size_t cap = (size_t)EPX__MAX(out->capacity, (int64_t)0);
            /* it reads the counts back to the host: not while capturing */
            local = epx__cuda_refuse_capture(stream,
                                             "epx_moe_dispatch on copy engines (num_sms = EPX_MOE_COPY_ENGINES or "
                                             "EPX_CUDA_SMS=0) reads the row counts back to the host: dispatch before "
                                             "the capture (cached dispatches and combines can be captured), or give "
                                             "the context an SM budget",
                                             err);
            if (local == EPX_SUCCESS) local = epx__card_export(c, &mine.recv_x, out->recv_x, cap * s->row_bytes, err);
            if (local == EPX_SUCCESS && fp8)
                local = epx__card_export(c, &mine.recv_scales, out->recv_x_scales, cap * s->scale_cols * 4, err);
        } else {
            local = epx__input_export(m, &stg, &mine.x, in->x, T, s->row_bytes, NULL, err);
            if (local == EPX_SUCCESS && fp8)
                local = epx__input_export(m, &stg, &mine.scales, in->x_scales, T, s->scale_cols * 4, NULL, err);
        }
        if (local == EPX_SUCCESS)
            local = epx__input_export(m, &stg, &mine.topk_idx, in->topk_idx, T, K * epx_dtype_size(s->index_dtype),
                                      NULL, err);
        if (local == EPX_SUCCESS)
            local = epx__input_export(m, &stg, &mine.weights, in->topk_weights, T, K * 4, NULL, err);
        if (local == EPX_SUCCESS && epx__cuda_fault_count(c)) mine.num_tokens = s->max_tokens + 1;
    }
    if (local == EPX_SUCCESS) local = epx__stage_inputs(m, &stg, stream, err);
    epx_status_t st = epx__moe_meet(m, &mine, cards, local, err);
    const bool met = st == EPX_SUCCESS; /* the same on every rank */
    cudaGraph_t graph = NULL; /* the graph being captured, if any, holds the mappings */
    if (st == EPX_SUCCESS) st = epx__cuda_capture_graph(stream, &graph, err);
    epx__moe_routing_t rt;
    memset(&rt, 0, sizeof rt);
    epx__moe_gather_t g;
    memset(&g, 0, sizeof g);
    char *dx[EPX__CUDA_MAX_RANKS] = {0}, *ds[EPX__CUDA_MAX_RANKS] = {0};
    rt.rank = me;
    rt.nranks = R;
    rt.num_experts = s->num_experts;
    rt.local_experts = s->local_experts;
    rt.topk = mine.topk;
    rt.index_i64 = s->index_dtype == EPX_I64;
    /* Every peer's buffers mapped here; again when an open of this call closed mappings
     * it took before (a peer reusing an address: see epx__ipc_get), so that no kernel gets
     * a pointer into a closed mapping. */
    for (int pass = 0; st == EPX_SUCCESS; pass++) {
        uint64_t closed = c->ipc_closed;
        for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
            rt.num_tokens[p] = cards[p].num_tokens;
            const char *ptr;
            st = epx__card_map(c, p, &cards[p].topk_idx, p == me ? in->topk_idx : NULL, &ptr, graph, err);
            rt.topk_idx[p] = ptr;
            if (st == EPX_SUCCESS) st = epx__card_map(c, p, &cards[p].weights, p == me ? in->topk_weights : NULL, &ptr, graph, err);
            rt.weights[p] = (const float *)ptr;
        }
        if (st == EPX_SUCCESS)
            st = m->ce ? epx__map_recv(m, cards, out, dx, ds, graph, err) : epx__map_tokens(m, cards, in, &g, graph, err);
        if (st != EPX_SUCCESS || c->ipc_closed == closed) break;
        if (pass == 2) st = epx__fail(err, EPX_ERR_CUDA, "CUDA IPC: the mappings of one call kept being replaced");
    }
    if (met) st = epx__host_agree_mapped(c, st, err); /* a mapping fails on one rank only */
    if (st != EPX_SUCCESS) {
        free(cards);
        epx__cuda_moe_handle_free(h);
        return st; /* every rank failed here: nothing enqueued but its staging copies, if any */
    }

    /* Without host synchronisation only when every rank can take the worst case and reads
     * the count on the device: the cards are the same everywhere, so all ranks choose alike. */
    bool no_sync = !m->ce; /* copy engines size their copies on the host */
    for (int p = 0; p < R; p++)
        no_sync = no_sync && cards[p].device_count && cards[p].capacity >= (int64_t)R * s->max_tokens;

    /* The streams meet in the count kernel (ARRIVE), which counts every source's tokens for
     * every rank; read the counts back. */
    cudaStream_t strm = (cudaStream_t)stream;
    epx__cuda_fault_at(c, EPX__FAULT_AT_ENQUEUE);
    if (m->counts_dirty) { /* the last count kernel's words were not reset by a row kernel */
        EPX__CUDA_CHECK(cudaMemsetAsync(m->d_bad, 0x7f, sizeof(long long), strm), st, err);
        EPX__CUDA_CHECK(cudaMemsetAsync(m->d_counts, 0, sizeof(int) * (size_t)(R * R + 1), strm), st, err);
    }
    m->counts_dirty = true;
    epx_status_t before = st;
    EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_moe_count(&rt, m->d_counts, m->d_chunk_counts, m->chunks, m->d_bad,
                                                            no_sync, m->d_expert_counts, &c->dev, stream),
                    st, err);
    if (before == EPX_SUCCESS && st != EPX_SUCCESS) epx__moe_arrive_instead(m, stream);
    if (no_sync) {
        free(cards);
        return epx__moe_lay_out(m, &rt, &g, in, out, dx, ds, st, -1, h, handle, stream, err);
    }
    EPX__CUDA_CHECK(cudaMemcpyAsync(m->h_counts, m->d_counts, sizeof(int) * (size_t)R * (size_t)R, cudaMemcpyDeviceToHost, strm),
                    st, err);
    long long *h_bad = epx__h_bad(m);
    EPX__CUDA_CHECK(cudaMemcpyAsync(h_bad, m->d_bad, sizeof(long long), cudaMemcpyDeviceToHost, strm), st, err);
    if (m->ce) /* and my tokens' counts per chunk: the stages of the copies */
        EPX__CUDA_CHECK(cudaMemcpyAsync(epx__h_chunks(m), m->d_chunk_counts + (size_t)me * m->chunks * R,
                                        sizeof(int) * (size_t)R * (size_t)m->chunks, cudaMemcpyDeviceToHost, strm),
                        st, err);
    EPX__CUDA_CHECK(cudaStreamSynchronize(strm), st, err);
    if (st != EPX_SUCCESS) {
        free(cards);
        epx__cuda_moe_handle_free(h);
        return st; /* a CUDA failure: the communicator is no longer trustworthy */
    }
    /* Every rank's verdict: its routing, and every output's capacity (all ranks see the
     * same count matrix, so they agree on capacity without another round). */
    epx_status_t verdict = EPX_SUCCESS;
    if (*h_bad != EPX__MOE_NO_BAD)
        verdict = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "topk_idx[token %lld, k %lld] is not an expert id in [-1, %d)",
                            *h_bad / mine.topk, *h_bad % mine.topk, s->num_experts);
    int32_t v = verdict, all[EPX__CUDA_MAX_RANKS];
    st = epx__host_allgather(c->host, R, &v, all, sizeof v, verdict, err);
    /* A rank whose own output is short says so; the others name the first short rank. */
    int64_t n = 0, short_rows = 0;
    int short_q = -1;
    for (int q = 0; q < R && st == EPX_SUCCESS; q++) {
        int64_t rows = epx__rows_of(m, q);
        if (q == me) n = rows;
        if (rows > cards[q].capacity && short_q < 0) short_q = q, short_rows = rows;
    }
    if (st == EPX_SUCCESS && n > cards[me].capacity)
        st = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "out.capacity = %lld rows, but this rank receives %lld",
                       (long long)cards[me].capacity, (long long)n);
    else if (st == EPX_SUCCESS && short_q >= 0)
        st = epx__fail(err, EPX_ERR_REMOTE_INVALID, "rank %d's out.capacity is below the %lld rows it receives",
                       short_q, (long long)short_rows);
    free(cards);
    return epx__moe_lay_out(m, &rt, &g, in, out, dx, ds, st, n, h, handle, stream, err);
}

epx_status_t epx__cuda_moe_dispatch_cached(epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h,
                                           const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                           epx_status_t local, void *stream, epx__errbuf_t *err)
{
    epx__cuda_t *c = m->c;
    const epx__moe_shape_t *s = &m->s;
    int R = c->nranks;
    bool fp8 = s->dtype == EPX_FP8_E4M3;
    epx__cuda_fault_begin(c);
    epx__moe_card_t mine, *cards = calloc((size_t)R, sizeof *cards);
    if (!cards)
        return epx__host_fail(c->host, local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    memset(&mine, 0, sizeof mine);
    mine.op = EPX__COP_CACHED;
    epx__stage_t stg = {0};
    if (local == EPX_SUCCESS) {
        mine.topk = h->topk + (epx__cuda_fault_count(c) ? 1 : 0);
        mine.routing_id = h->id;
        if (m->ce) { /* peers write my outputs: the rows the handle received */
            local = epx__card_export(c, &mine.recv_x, out->recv_x, (size_t)h->rows * s->row_bytes, err);
            if (local == EPX_SUCCESS && fp8)
                local = epx__card_export(c, &mine.recv_scales, out->recv_x_scales, (size_t)h->rows * s->scale_cols * 4, err);
        } else {
            size_t T = (size_t)h->num_tokens;
            local = epx__input_export(m, &stg, &mine.x, in->x, T, s->row_bytes, NULL, err);
            if (local == EPX_SUCCESS && fp8)
                local = epx__input_export(m, &stg, &mine.scales, in->x_scales, T, s->scale_cols * 4, NULL, err);
        }
    }
    if (local == EPX_SUCCESS) local = epx__stage_inputs(m, &stg, stream, err);
    epx_status_t st = epx__moe_meet(m, &mine, cards, local, err);
    const bool met = st == EPX_SUCCESS; /* the same on every rank */
    cudaGraph_t graph = NULL; /* the graph being captured, if any, holds the mappings */
    if (st == EPX_SUCCESS) st = epx__cuda_capture_graph(stream, &graph, err);
    epx__moe_gather_t g;
    memset(&g, 0, sizeof g);
    char *dx[EPX__CUDA_MAX_RANKS] = {0}, *ds[EPX__CUDA_MAX_RANKS] = {0};
    for (int pass = 0; st == EPX_SUCCESS; pass++) { /* see epx__cuda_moe_dispatch */
        uint64_t closed = c->ipc_closed;
        st = m->ce ? epx__map_recv(m, cards, out, dx, ds, graph, err) : epx__map_tokens(m, cards, in, &g, graph, err);
        if (st != EPX_SUCCESS || c->ipc_closed == closed) break;
        if (pass == 2) st = epx__fail(err, EPX_ERR_CUDA, "CUDA IPC: the mappings of one call kept being replaced");
    }
    free(cards);
    if (met) st = epx__host_agree_mapped(c, st, err); /* a mapping fails on one rank only */
    if (st != EPX_SUCCESS) return st;
    /* The streams meet (ARRIVE): in the gather kernel, or before the copies. */
    epx__cuda_fault_at(c, EPX__FAULT_AT_ENQUEUE);
    if (m->ce) EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_signal_wait(&c->dev, EPX__FLAG_ARRIVE, 0, stream), st, err);
    bool finished;
    st = epx__move_rows(m, h, in, out, &g, dx, ds, st, EPX__STEP_ARRIVE | EPX__STEP_DONE, &finished, stream, err);
    c->ops_started++;
    if (!finished && !m->ce) epx__moe_arrive_instead(m, stream);
    if (!finished) st = epx__moe_finish_after(m, EPX_SUCCESS, st, stream, err); /* the ranks agreed: st failing is mine */
    if (st == EPX_SUCCESS) epx__cuda_fault_at(c, EPX__FAULT_AT_LAUNCHED);
    return st;
}

/* ---- Combine --------------------------------------------------------------------------------- */

/* Copy-engine combine along h, after the streams met: my expert outputs (and weights) for
 * each peer, contiguous in y, copied into that peer's staging; DONE (every peer's copies
 * into mine are complete), then the SM path's reduction over my own y and my staging. A
 * failure of mine here (`st` at entry included) withholds my DONE (epx__moe_finish_after). */
static epx_status_t epx__ce_combine(epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h, const epx_moe_combine_in_t *in,
                                    epx__moe_combine_t *k, epx_status_t st, void *stream, epx__errbuf_t *err)
{
    epx__cuda_t *c = m->c;
    int R = c->nranks, me = c->rank;
    const int *cnt = h->h_cnt;
    long long rb = (long long)m->s.combine_row_bytes, wb = (long long)h->topk * 4;
    cudaStream_t s = (cudaStream_t)stream;
    cudaError_t e = cudaSuccess;
    for (int i = 1; i < R && e == cudaSuccess && st == EPX_SUCCESS; i++) {
        int p = (me + i) % R;
        int64_t n = cnt[p * R + me], from = epx__ce_base(cnt, R, p, me), to = epx__ce_stage_row(cnt, R, p, me);
        if (n == 0) continue;
        e = cudaMemcpyAsync(m->peer_stage[p] + to * rb, (const char *)in->y + from * rb, (size_t)(n * rb),
                            cudaMemcpyDeviceToDevice, s);
        if (e == cudaSuccess && in->topk_weights)
            e = cudaMemcpyAsync(m->peer_stage[p] + m->ce_w_off + to * wb, (const char *)in->topk_weights + from * wb,
                                (size_t)(n * wb), cudaMemcpyDeviceToDevice, s);
    }
    if (e != cudaSuccess) st = epx__fail(err, EPX_ERR_CUDA, "copy-engine combine enqueue: %s", cudaGetErrorString(e));
    c->ops_started++;
    st = epx__moe_finish_after(m, EPX_SUCCESS, st, stream, err); /* the ranks agreed: st failing is mine */
    if (st != EPX_SUCCESS) return st;
    for (int r = 0; r < R; r++) {
        if (r == me) {
            k->y[r] = (const char *)in->y;
            k->w[r] = in->topk_weights;
            continue;
        }
        int64_t at = epx__ce_stage_row(cnt, R, me, r);
        k->y[r] = m->stage + at * rb;
        k->w[r] = in->topk_weights ? (const float *)(const void *)(m->stage + m->ce_w_off + at * wb) : NULL;
        k->row_base[r] = epx__ce_base(cnt, R, me, r);
    }
    EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_moe_combine(k, NULL, 0, m->blocks, stream), st, err);
    if (st == EPX_SUCCESS) epx__cuda_fault_at(c, EPX__FAULT_AT_LAUNCHED);
    return st;
}

epx_status_t epx__cuda_moe_combine(epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h, const epx_moe_combine_in_t *in,
                                   epx_moe_combine_out_t *out, epx_status_t local, void *stream, epx__errbuf_t *err)
{
    epx__cuda_t *c = m->c;
    const epx__moe_shape_t *s = &m->s;
    int R = c->nranks, me = c->rank;
    epx__cuda_fault_begin(c);
    epx__moe_card_t mine, *cards = calloc((size_t)R, sizeof *cards);
    if (!cards)
        return epx__host_fail(c->host, local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    memset(&mine, 0, sizeof mine);
    mine.op = EPX__COP_COMBINE;
    epx__stage_t stg = {0};
    if (local == EPX_SUCCESS) {
        mine.topk = h->topk + (epx__cuda_fault_count(c) ? 1 : 0);
        mine.routing_id = h->id;
        mine.has_weights = in->topk_weights != NULL;
        /* Unknown on the host: at most R * max_tokens rows (at least one: y is exported whatever
         * was given), the count on the device for a staging copy. */
        size_t rows = h->rows >= 0 ? (size_t)h->rows : (size_t)EPX__MAX((int64_t)R * s->max_tokens, (int64_t)1);
        const long long *dev_rows = h->rows >= 0 ? NULL : h->d_rows;
        if (!m->ce) { /* copy engines: y and the weights are only read here */
            local = epx__input_export(m, &stg, &mine.x, in->y, rows, s->combine_row_bytes, dev_rows, err);
            if (local == EPX_SUCCESS)
                local = epx__input_export(m, &stg, &mine.weights, in->topk_weights, rows, (size_t)h->topk * 4, dev_rows,
                                          err);
        }
    }
    if (local == EPX_SUCCESS) local = epx__stage_inputs(m, &stg, stream, err);
    epx_status_t st = epx__moe_meet(m, &mine, cards, local, err);
    const bool met = st == EPX_SUCCESS; /* the same on every rank */
    cudaGraph_t graph = NULL; /* the graph being captured, if any, holds the mappings */
    if (st == EPX_SUCCESS && !m->ce) st = epx__cuda_capture_graph(stream, &graph, err);
    epx__moe_combine_t k;
    memset(&k, 0, sizeof k);
    for (int pass = 0; st == EPX_SUCCESS && !m->ce; pass++) { /* see epx__cuda_moe_dispatch */
        uint64_t closed = c->ipc_closed;
        for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
            const char *ptr = NULL;
            st = epx__card_map(c, p, &cards[p].x, p == me ? in->y : NULL, &k.y[p], graph, err);
            if (st == EPX_SUCCESS) st = epx__card_map(c, p, &cards[p].weights, p == me ? in->topk_weights : NULL, &ptr, graph, err);
            k.w[p] = (const float *)ptr;
        }
        if (st != EPX_SUCCESS || c->ipc_closed == closed) break;
        if (pass == 2) st = epx__fail(err, EPX_ERR_CUDA, "CUDA IPC: the mappings of one call kept being replaced");
    }
    free(cards);
    if (met && !m->ce) st = epx__host_agree_mapped(c, st, err); /* a mapping fails on one rank only */
    if (st != EPX_SUCCESS) return st;
    epx__cuda_fault_at(c, EPX__FAULT_AT_ENQUEUE);
    k.send_row = h->d_send_row;
    k.rows = h->d_rows;
    k.num_tokens = h->num_tokens;
    k.nranks = R;
    k.topk = h->topk;
    k.hidden = s->hidden;
    k.dtype = s->combine_dtype;
    k.out = out->out;
    k.out_w = out->out_topk_weights;
    if (m->ce) {
        EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_signal_wait(&c->dev, EPX__FLAG_ARRIVE, 0, stream), st, err);
        return epx__ce_combine(m, h, in, &k, st, stream, err);
    }
    /* One kernel: the streams meet (ARRIVE), the reduction, DONE; a separate DONE only when
     * it could not be launched. */
    EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_moe_combine(&k, &c->dev, EPX__STEP_ARRIVE | EPX__STEP_DONE, m->blocks,
                                                              stream),
                    st, err);
    c->ops_started++;
    if (st != EPX_SUCCESS) {
        epx__moe_arrive_instead(m, stream);
        st = epx__moe_finish(m, st, stream, err);
    }
    if (st == EPX_SUCCESS) epx__cuda_fault_at(c, EPX__FAULT_AT_LAUNCHED);
    return st;
}

/* ---- Low-latency ------------------------------------------------------------------------------ */

/* Every rank's y of a low-latency combine (the cards in h->ll_ycards, mine = own) into
 * k->y, mapped again until no mapping closed while they were taken. */
static epx_status_t epx__ll_map_y(epx__cuda_t *c, epx__cuda_moe_handle_t *h, const void *own, epx__ll_combine_t *k,
                                  void *stream, epx__errbuf_t *err)
{
    cudaGraph_t graph;
    EPX__CHECK(epx__cuda_capture_graph(stream, &graph, err));
    for (int pass = 0;; pass++) {
        uint64_t closed = c->ipc_closed;
        for (int p = 0; p < c->nranks; p++)
            EPX__CHECK(epx__card_map(c, p, &h->ll_ycards[p], p == c->rank ? own : NULL, &k->y[p], graph, err));
        if (c->ipc_closed == closed) return EPX_SUCCESS;
        if (pass == 2) return epx__fail(err, EPX_ERR_CUDA, "CUDA IPC: the mappings of one call kept being replaced");
    }
}

/* Blocks of a combine receive without 16-byte rows: one per token, up to 1024. */
#define EPX__LL_COMBINE_BLOCKS(h) EPX__MIN(EPX__MAX((h)->num_tokens, 1), 1024)

epx_status_t epx__cuda_moe_ll_dispatch(epx__cuda_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                       epx_moe_ll_dispatch_out_t *out, epx_status_t local, bool split,
                                       epx__cuda_moe_handle_t **handle, void *stream, epx__errbuf_t *err)
{
    epx__cuda_t *c = m->c;
    const epx__moe_shape_t *s = &m->s;
    int R = c->nranks;
    epx__cuda_fault_begin(c);
    epx__moe_card_t mine, *cards = calloc((size_t)R, sizeof *cards);
    if (!cards) /* still the meet's round, so that the others fail at once */
        return epx__host_fail(c->host, local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    memset(&mine, 0, sizeof mine);
    mine.op = EPX__COP_LL_DISPATCH;
    if (local == EPX_SUCCESS) mine.num_tokens = in->num_tokens, mine.topk = in->topk;
    if (local == EPX_SUCCESS && epx__cuda_fault_count(c)) mine.num_tokens = s->max_tokens + 1; /* EPX_FAULT */
    epx__cuda_moe_handle_t *h = NULL;
    if (local == EPX_SUCCESS && !(h = epx__handle_get(m)))
        local = epx__fail(err, EPX_ERR_NO_MEMORY, "no device memory for the handle");
    epx_status_t st = epx__moe_meet(m, &mine, cards, local, err);
    int most_tokens = 0;
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) most_tokens = EPX__MAX(most_tokens, cards[p].num_tokens);
    free(cards);
    if (st != EPX_SUCCESS) {
        if (h) epx__cuda_moe_handle_free(h);
        return st; /* nothing was enqueued anywhere */
    }
    epx__ll_args_t a;
    memset(&a, 0, sizeof a);
    a.rank = c->rank, a.nranks = R, a.num_experts = s->num_experts, a.local_experts = s->local_experts;
    a.topk = in->topk, a.max_tokens = s->max_tokens, a.hidden = s->hidden, a.num_tokens = in->num_tokens;
    a.index_i64 = s->index_dtype == EPX_I64, a.fp8 = s->ll_fp8, a.ue8m0 = s->scale_format == EPX_SCALE_UE8M0;
    a.in_bytes = (int)epx_dtype_size(s->dtype);
    a.srow = m->ll_srow, a.hdr_bytes = m->ll_hdr, a.half_bytes = m->ll_half;
    a.row_bytes = s->ll_fp8 ? s->hidden : (long long)s->row_bytes;
    a.scale_bytes = s->ll_fp8 ? (long long)s->scale_cols * (a.ue8m0 ? 1 : 4) : 0;
    a.scale_off = EPX__ALIGN_UP(a.row_bytes, 16);
    a.vec = (long long)s->hidden * a.in_bytes % 16 == 0 && ((uintptr_t)in->x & 15u) == 0; /* FP8: bf16 x */
    a.slots = (long long)s->ll_slots;
    a.x = in->x, a.topk_idx = in->topk_idx;
    for (int p = 0; p < R; p++) a.stage[p] = m->peer_stage[p];
    a.dest0 = m->rails.host * R, a.srcs = s->nranks, a.me_src = a.dest0 + c->rank;
    a.rail = epx__ll_rails_of(m, h);
    a.recv_x = out->recv_x, a.recv_scales = out->recv_x_scales;
    a.recv_count = out->recv_count, a.recv_src_rank = out->recv_src_rank, a.recv_src_token = out->recv_src_token;
    a.h_slot = h->d_slot, a.h_topk = h->d_topk, a.h_bad = h->d_bad;
    epx__ll_peers_of(m, h, &a.h_ptok, &a.h_proute, &a.h_pslot);
    h->most_tokens = EPX__MIN(most_tokens, s->max_tokens);
    h->id = (uint32_t)(c->ops_started + 1);
    h->num_tokens = in->num_tokens;
    h->topk = in->topk;
    h->rows = 0;
    /* Latency-bound: a grid as large as the work (one thread per 16 bytes of a token's row). */
    long long items = (long long)in->num_tokens * (((long long)s->hidden * a.in_bytes / 16 + 15) / 16 * 16);
    int send_blocks = a.vec ? (int)EPX__MIN(EPX__MAX((items + 511) / 512, 1LL), 1024LL) : m->blocks;
    epx__cuda_fault_at(c, EPX__FAULT_AT_ENQUEUE);
    EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_ll_send(&c->dev, &a, send_blocks, stream), st, err);
    if (split || a.rail.nhosts > 0) /* across hosts the receive comes after the forward step */
        h->ll_recv = a;
    else
        EPX__CUDA_CHECK(
            (cudaError_t)epx__cuda_launch_ll_receive(&c->dev, &a, st == EPX_SUCCESS, stream), st, err);
    if (st == EPX_SUCCESS) epx__cuda_fault_at(c, EPX__FAULT_AT_LAUNCHED);
    c->ops_started++;
    if (st != EPX_SUCCESS) {
        epx__cuda_moe_handle_free(h);
        return st;
    }
    *handle = h;
    return EPX_SUCCESS;
}

epx_status_t epx__cuda_moe_ll_combine(epx__cuda_moe_t *m, epx__cuda_moe_handle_t *h, const epx_moe_ll_combine_in_t *in,
                                      void *out, epx_status_t local, bool split, void *stream, epx__errbuf_t *err)
{
    epx__cuda_t *c = m->c;
    const epx__moe_shape_t *s = &m->s;
    int R = c->nranks;
    epx__cuda_fault_begin(c);
    epx__moe_card_t mine, *cards = calloc((size_t)R, sizeof *cards);
    if (!cards) /* still the meet's round, so that the others fail at once */
        return epx__host_fail(c->host, local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    memset(&mine, 0, sizeof mine);
    mine.op = EPX__COP_LL_COMBINE;
    bool across = m->rails.nhosts > 0; /* else nobody reads a peer's y: it is not exported */
    if (local == EPX_SUCCESS) {
        mine.topk = h->topk + (epx__cuda_fault_count(c) ? 1 : 0); /* EPX_FAULT count */
        mine.routing_id = h->id;
        mine.has_weights = 1;
        if (across)
            local = epx__card_export(c, &mine.x, in->y, (size_t)s->local_experts * s->ll_slots * s->combine_row_bytes, err);
    }
    epx_status_t st = epx__moe_meet(m, &mine, cards, local, err);
    epx__ll_combine_t k;
    memset(&k, 0, sizeof k);
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) h->ll_ycards[p] = cards[p].x;
    free(cards);
    if (st == EPX_SUCCESS && across) st = epx__ll_map_y(c, h, in->y, &k, stream, err);
    if (st != EPX_SUCCESS) return st;
    k.y[c->rank] = in->y;
    k.w = in->topk_weights;
    k.h_slot = h->d_slot, k.h_topk = h->d_topk, k.h_bad = h->d_bad;
    k.num_tokens = h->num_tokens, k.topk = h->topk, k.local_experts = s->local_experts, k.hidden = s->hidden;
    k.dtype = s->combine_dtype, k.slots = (long long)s->ll_slots;
    k.out = out;
    k.vec = s->hidden % (s->combine_dtype == EPX_F32 ? 4 : 8) == 0 && ((uintptr_t)out & 15u) == 0;
    for (int p = 0; p < R; p++) /* a remap keeps the offsets; on one host only mine is read */
        k.vec = k.vec && ((!across && p != c->rank) || ((uintptr_t)k.y[p] & 15u) == 0);
    k.nranks = R, k.dest0 = m->rails.host * R, k.max_tokens = s->max_tokens;
    k.rail = epx__ll_rails_of(m, h);
    if (!across) {
        for (int p = 0; p < R; p++) k.cstage[p] = m->peer_stage[p] + 2 * m->ll_half;
        k.chalf = m->ll_chalf, k.cw_off = 0, k.cp_off = m->ll_cp_off, k.prow = m->ll_prow;
        int *ptok, *proute, *pslot;
        epx__ll_peers_of(m, h, &ptok, &proute, &pslot);
        k.h_ptok = ptok, k.h_proute = proute, k.h_pslot = pslot;
        k.rank = c->rank, k.most_tokens = h->most_tokens;
    }
    epx__cuda_fault_at(c, EPX__FAULT_AT_ENQUEUE);
    if (split || across) { /* across hosts the receive comes after the gather and NCCL steps */
        h->ll_comb = k;
        EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_ll_combine_send(&c->dev, &k, stream), st, err);
    } else {
        EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_ll_combine(&c->dev, &k, 1, EPX__LL_COMBINE_BLOCKS(h), stream),
                        st, err);
    }
    if (st == EPX_SUCCESS) epx__cuda_fault_at(c, EPX__FAULT_AT_LAUNCHED);
    c->ops_started++;
    return st;
}

epx_status_t epx__cuda_moe_ll_recv(epx__cuda_moe_t *m, epx__cuda_moe_handle_t *h, bool combine, void *stream,
                                   epx__errbuf_t *err)
{
    epx_status_t st = EPX_SUCCESS;
    if (combine && m->rails.nhosts > 0) /* the peers' y again: calls since the send may have closed a mapping */
        EPX__CHECK(epx__ll_map_y(m->c, h, h->ll_comb.y[m->c->rank], &h->ll_comb, stream, err));
    if (combine)
        EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_ll_combine(&m->c->dev, &h->ll_comb, 0, EPX__LL_COMBINE_BLOCKS(h),
                                                                  stream),
                        st, err);
    else
        EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_ll_receive(&m->c->dev, &h->ll_recv, 0, stream), st, err);
    return st;
}

/* ---- Low-latency across hosts ------------------------------------------------------------------ */

epx_status_t epx__cuda_moe_ll_rails(epx__cuda_moe_t *m, int nhosts, int host, unsigned long long *mark,
                                    epx__ll_rail_t *rails, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    if (s->mode != EPX_MOE_LOW_LATENCY || m->spare || m->rails.nhosts || nhosts < 1 || host < 0 || host >= nhosts ||
        s->nranks != nhosts * m->c->nranks || s->nranks > EPX__LL_MAX_SRCS)
        return epx__fail(err, EPX_ERR_INTERNAL, "low-latency rails: not for this context (%d ranks, %d hosts)", s->nranks,
                         nhosts);
    epx__ll_rail_t r;
    memset(&r, 0, sizeof r);
    r.nhosts = nhosts, r.host = host, r.mark = mark;
    r.blk = EPX__ALIGN_UP(m->ll_hdr + (long long)EPX__MAX(s->max_tokens, 1) * m->ll_srow, 256);
    r.yblk = EPX__ALIGN_UP(128 + (long long)EPX__MAX(s->max_tokens, 1) * s->max_topk * (long long)s->combine_row_bytes, 256);
    size_t bytes = (size_t)r.blk * (size_t)(1 + nhosts) + 2 * (size_t)r.yblk * (size_t)nhosts + 256;
    char *mem = NULL;
    cudaError_t ce = cudaMalloc((void **)&mem, bytes);
    /* Headers zero: no block counts as arrived before its first transfer. */
    if (ce == cudaSuccess) ce = cudaMemset(mem, 0, bytes);
    if (ce == cudaSuccess) ce = cudaDeviceSynchronize(); /* the memset ran on the legacy stream */
    if (ce != cudaSuccess) {
        cudaFree(mem);
        cudaGetLastError();
        return epx__fail(err, EPX_ERR_CUDA, "low-latency rails (%zu bytes): %s", bytes, cudaGetErrorString(ce));
    }
    r.out = mem;
    r.in = mem + r.blk;
    r.y_out = mem + r.blk * (1 + nhosts);
    r.y_in = r.y_out + r.yblk * nhosts;
    r.live = (int *)(void *)(r.y_out + 2 * r.yblk * nhosts);
    m->rails = r;
    *rails = r;
    return EPX_SUCCESS;
}

epx_status_t epx__cuda_moe_reserve(epx__cuda_moe_t *m, epx__errbuf_t *err)
{
    if (m->spare) return EPX_SUCCESS;
    epx__cuda_moe_handle_t *h = epx__handle_get(m);
    if (!h) return epx__fail(err, EPX_ERR_NO_MEMORY, "no device memory for the handle");
    epx__cuda_moe_handle_free(h); /* the next epx__handle_get takes it */
    return EPX_SUCCESS;
}

epx_status_t epx__cuda_moe_ll_forward(epx__cuda_moe_t *m, epx__cuda_moe_handle_t *h, void *stream, epx__errbuf_t *err)
{
    epx_status_t st = EPX_SUCCESS;
    EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_ll_forward(&m->c->dev, &h->ll_recv, stream), st, err);
    return st;
}

epx_status_t epx__cuda_moe_ll_gather(epx__cuda_moe_t *m, epx__cuda_moe_handle_t *h, void *stream, epx__errbuf_t *err)
{
    epx_status_t st = EPX_SUCCESS;
    /* The peers' y again: calls since the send may have closed a mapping. */
    EPX__CHECK(epx__ll_map_y(m->c, h, h->ll_comb.y[m->c->rank], &h->ll_comb, stream, err));
    EPX__CUDA_CHECK((cudaError_t)epx__cuda_launch_ll_gather(&m->c->dev, &h->ll_comb, stream), st, err);
    return st;
}
