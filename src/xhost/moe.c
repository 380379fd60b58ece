/*
 * src/xhost: MoE across GPU hosts — SIMPLIFIED (see xhost.h): each call waits for the
 * caller's stream, copies its device inputs to host memory, runs src/hier's algorithm
 * (NCCL between hosts, shared memory inside a host) and copies the outputs back on the
 * caller's stream. Only rows that exist are copied (N received rows; in low-latency mode
 * the filled slots of each expert).
 *
 * The CUDA backend checks routing on the device where it skips host synchronisation; this
 * path keeps its visible behaviour: when every rank's dispatch is of that kind (low-latency
 * always; high-throughput with a worst-case capacity and a device row count) and some rank
 * has a bad expert id, every rank succeeds, the counts say -1, nothing else is written, and
 * calls along that handle write nothing. One bootstrap round per call agrees on that.
 */
#include <cuda_runtime_api.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { B_X, B_XS, B_IDX, B_W, B_RX, B_RXS, B_RIDX, B_RW, B_SR, B_ST, B_PE, B_Y, B_OUT, B_OUTW, B_CNT, B_LAY, B_N };

struct epx__xhost_moe {
    epx__xhost_t *xh;
    epx__moe_shape_t s;
    epx__hier_moe_t *hm;
    char *buf[B_N]; /* host mirrors, grown on demand */
    size_t cap[B_N];
};

struct epx__xhost_moe_handle {
    epx__hier_moe_handle_t *hh;
    int T;
    int64_t n;     /* rows received */
    int64_t shown; /* what the caller sees: n, or -1 (no host synchronisation) */
    bool bad;      /* bad routing seen "on the device": calls along it write nothing */
    int32_t *cnt;  /* low-latency: rows per local expert */
};

static void *epx__hb(epx__xhost_moe_t *m, int b, size_t bytes, epx_status_t *st, epx__errbuf_t *err)
{
    if (*st != EPX_SUCCESS) return NULL;
    bytes = EPX__MAX(bytes, (size_t)64);
    if (bytes > m->cap[b]) {
        free(m->buf[b]);
        m->buf[b] = malloc(bytes);
        m->cap[b] = m->buf[b] ? bytes : 0;
        if (!m->buf[b]) *st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory (%zu bytes of host staging)", bytes);
    }
    return m->buf[b];
}

static epx_status_t epx__d2h(void *dst, const void *src, size_t bytes, epx__errbuf_t *err)
{
    if (!bytes) return EPX_SUCCESS;
    cudaError_t ce = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
    if (ce != cudaSuccess)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "reading an input from the device: %s", cudaGetErrorString(ce));
    return EPX_SUCCESS;
}

/* Enqueue a copy of an output on the caller's stream (from pageable memory: the call
 * returns once the source was taken). */
static void epx__h2d(void *dst, const void *src, size_t bytes, void *stream, epx_status_t *st, epx__errbuf_t *err)
{
    if (*st != EPX_SUCCESS || !dst || !bytes) return;
    cudaError_t ce = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream);
    if (ce != cudaSuccess) *st = epx__fail(err, EPX_ERR_CUDA, "writing an output to the device: %s", cudaGetErrorString(ce));
}

enum { EPX__PRE_BAD = 1, EPX__PRE_ERR = 2, EPX__PRE_NOSYNC = 4 };

/* One bootstrap round: does every rank skip (some routing bad, nobody else failing, every
 * rank's call of the no-sync kind)? `code` says bad and nosync; *local failing adds
 * EPX__PRE_ERR (and becomes EPX_ERR_NO_MEMORY when the round's buffer cannot be had: this
 * rank still takes part). Returns what broke the round. */
static epx_status_t epx__pre(epx__xhost_moe_t *m, int64_t code, epx_status_t *local, bool *skip, epx__errbuf_t *err)
{
    int R = m->xh->nranks;
    int64_t *all = malloc(sizeof *all * (size_t)R);
    *skip = false;
    if (!all && *local == EPX_SUCCESS) *local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (*local != EPX_SUCCESS) code |= EPX__PRE_ERR;
    if (!all) return epx__boot_allgather_fail(m->xh->boot, &code, sizeof code, sizeof code, err);
    epx_status_t st = epx__xh_allgather(m->xh, &code, all, sizeof code, err);
    bool bad = false, other = false, nosync = true;
    for (int p = 0; p < R; p++) {
        bad = bad || (all[p] & EPX__PRE_BAD);
        other = other || (all[p] & EPX__PRE_ERR);
        nosync = nosync && (all[p] & EPX__PRE_NOSYNC);
    }
    *skip = bad && !other && nosync;
    free(all);
    return st;
}

/* Wait for the caller's stream, then read the routing and check it. *bad: an id out of
 * range (err says which); the return value is another failure. */
static epx_status_t epx__routing(epx__xhost_moe_t *m, const void *topk, int T, int K, void *stream, int32_t **ids,
                                 bool *bad, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    *bad = false;
    EPX__CHECK(epx__xh_usable(m->xh, stream, err)); /* before anything waits on the stream */
    EPX__CHECK(epx__xh_sync(m->xh, stream, err));
    epx_status_t st = EPX_SUCCESS;
    size_t is = epx_dtype_size(s->index_dtype);
    void *h = epx__hb(m, B_IDX, (size_t)T * (size_t)K * is, &st, err);
    if (st == EPX_SUCCESS) st = epx__d2h(h, topk, (size_t)T * (size_t)K * is, err);
    if (st == EPX_SUCCESS && epx__topk_validate(h, s->index_dtype, T, K, s->num_experts, err) != EPX_SUCCESS)
        *bad = true;
    *ids = h;
    return st;
}

epx_status_t epx__xhost_moe_create(epx__xhost_t *xh, const epx__moe_shape_t *shape, uint64_t hash, epx_status_t local,
                                   epx__xhost_moe_t **out, epx__errbuf_t *err)
{
    epx__xhost_moe_t *m = calloc(1, sizeof *m);
    if (!m) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    epx__hier_moe_t *hm = NULL;
    epx_status_t st = epx__hier_moe_create(xh->hier, shape, hash, local, &hm, err);
    if (st != EPX_SUCCESS) {
        free(m);
        return st;
    }
    m->xh = xh, m->s = *shape, m->hm = hm;
    *out = m;
    return EPX_SUCCESS;
}

void epx__xhost_moe_destroy(epx__xhost_moe_t *m)
{
    if (!m) return;
    epx__hier_moe_destroy(m->hm);
    for (int b = 0; b < B_N; b++) free(m->buf[b]);
    free(m);
}

void epx__xhost_moe_handle_free(epx__xhost_moe_handle_t *h)
{
    if (!h) return;
    epx__hier_moe_handle_free(h->hh);
    free(h->cnt);
    free(h);
}

int64_t epx__xhost_moe_handle_rows(const epx__xhost_moe_handle_t *h) { return h->shown; }
int epx__xhost_moe_handle_tokens(const epx__xhost_moe_handle_t *h) { return h->T; }

/* The start of a call along handle h (cached dispatch, combine): drain the stream, then the
 * round of epx__pre. *skip when every rank skips; else a handle whose dispatch had bad
 * routing makes *local an argument error. */
static epx_status_t epx__pre_handle(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h, epx_status_t *local,
                                    void *stream, bool *skip, epx__errbuf_t *err)
{
    if (*local == EPX_SUCCESS) *local = epx__xh_usable(m->xh, stream, err);
    if (*local == EPX_SUCCESS) *local = epx__xh_sync(m->xh, stream, err);
    bool bad = *local == EPX_SUCCESS && h->bad;
    EPX__CHECK(epx__pre(m, (bad ? EPX__PRE_BAD : 0) | EPX__PRE_NOSYNC, local, skip, err));
    if (!*skip && bad) *local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "the handle's dispatch had bad routing");
    return EPX_SUCCESS;
}

epx_status_t epx__xhost_moe_layout(epx__xhost_moe_t *m, const void *topk_idx, int T, int K, int32_t *per_rank,
                                   int32_t *per_expert, uint8_t *in_rank, void *stream, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    int32_t *ids;
    bool bad;
    EPX__CHECK(epx__routing(m, topk_idx, T, K, stream, &ids, &bad, err));
    epx_status_t st = EPX_SUCCESS;
    size_t R = (size_t)s->nranks, E = (size_t)s->num_experts;
    char *h = epx__hb(m, B_LAY, sizeof(int32_t) * (R + E) + (size_t)T * R, &st, err);
    if (st != EPX_SUCCESS) return st;
    int32_t *pr = (int32_t *)h, *pe = pr + R;
    uint8_t *ir = (uint8_t *)(pe + E);
    if (bad) /* as the single-host CUDA layout: -1 counts, is_token_in_rank not written */
        for (size_t i = 0; i < R + E; i++) pr[i] = -1;
    else
        EPX__CHECK(epx__layout(ids, s->index_dtype, T, K, s->num_experts, s->nranks, pr, pe, ir));
    epx__h2d(per_rank, pr, sizeof(int32_t) * R, stream, &st, err);
    epx__h2d(per_expert, pe, sizeof(int32_t) * E, stream, &st, err);
    if (!bad) epx__h2d(in_rank, ir, (size_t)T * R, stream, &st, err);
    if (st == EPX_SUCCESS) st = epx__xh_sync(m->xh, stream, err); /* the mirror is reused */
    return st;
}

static epx__xhost_moe_handle_t *epx__handle_new(int T, epx_status_t *st, epx__errbuf_t *err)
{
    if (*st != EPX_SUCCESS) return NULL;
    epx__xhost_moe_handle_t *h = calloc(1, sizeof *h);
    if (!h) *st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the handle");
    if (h) h->T = T;
    return h;
}

epx_status_t epx__xhost_moe_dispatch(epx__xhost_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                     epx_status_t local, epx__xhost_moe_handle_t **handle, void *stream,
                                     epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    int T = local == EPX_SUCCESS ? in->num_tokens : 0, K = local == EPX_SUCCESS ? in->topk : 0;
    bool bad = false, nosync = false, skip = false;
    int32_t *ids = NULL;
    if (local == EPX_SUCCESS) {
        local = epx__routing(m, in->topk_idx, T, K, stream, &ids, &bad, err);
        nosync = out->num_recv_tokens_device && out->capacity >= (int64_t)s->nranks * s->max_tokens;
    }
    /* The handle before the round: running out of memory is this rank's verdict. */
    epx__xhost_moe_handle_t *h = epx__handle_new(T, &local, err);
    int64_t code = (bad ? EPX__PRE_BAD : 0) | (nosync ? EPX__PRE_NOSYNC : 0);
    epx_status_t st = epx__pre(m, code, &local, &skip, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(h);
        return st;
    }
    if (skip) { /* as the CUDA backend's device check: counts -1, nothing else written */
        static const int64_t minus1 = -1;
        if (h) h->bad = true, h->n = 0, h->shown = -1;
        out->num_recv_tokens = -1;
        epx__h2d(out->num_recv_tokens_device, &minus1, sizeof minus1, stream, &st, err);
        if (st != EPX_SUCCESS) {
            epx__xhost_moe_handle_free(h);
            return st;
        }
        *handle = h;
        return EPX_SUCCESS;
    }
    if (local == EPX_SUCCESS && bad) local = EPX_ERR_INVALID_ARGUMENT; /* err names the token */
    size_t isz = epx_dtype_size(s->index_dtype), sc = s->scale_cols * sizeof(float);
    bool fp8 = s->dtype == EPX_FP8_E4M3;
    epx_moe_dispatch_in_t hin = {0};
    epx_moe_dispatch_out_t hout = {0};
    if (local == EPX_SUCCESS) {
        epx_status_t ls = EPX_SUCCESS;
        int64_t cap = out->capacity;
        hin = (epx_moe_dispatch_in_t){epx__hb(m, B_X, (size_t)T * s->row_bytes, &ls, err),
                                      fp8 ? epx__hb(m, B_XS, (size_t)T * sc, &ls, err) : NULL, ids,
                                      in->topk_weights ? epx__hb(m, B_W, sizeof(float) * (size_t)T * (size_t)K, &ls, err) : NULL,
                                      T, K};
        hout.recv_x = epx__hb(m, B_RX, (size_t)cap * s->row_bytes, &ls, err);
        hout.recv_x_scales = fp8 ? epx__hb(m, B_RXS, (size_t)cap * sc, &ls, err) : NULL;
        hout.recv_topk_idx = out->recv_topk_idx ? epx__hb(m, B_RIDX, (size_t)cap * (size_t)K * isz, &ls, err) : NULL;
        hout.recv_topk_weights = out->recv_topk_weights ? epx__hb(m, B_RW, (size_t)cap * (size_t)K * 4, &ls, err) : NULL;
        hout.recv_src_rank = out->recv_src_rank ? epx__hb(m, B_SR, (size_t)cap * 4, &ls, err) : NULL;
        hout.recv_src_token = out->recv_src_token ? epx__hb(m, B_ST, (size_t)cap * 4, &ls, err) : NULL;
        hout.num_recv_tokens_per_expert =
            out->num_recv_tokens_per_expert ? epx__hb(m, B_PE, (size_t)s->local_experts * 4, &ls, err) : NULL;
        hout.capacity = cap;
        /* Rows from sources without weights leave recv_topk_weights as it was: start the
         * mirror from the caller's buffer, since all written rows are copied back. */
        if (ls == EPX_SUCCESS && hout.recv_topk_weights)
            ls = epx__d2h(hout.recv_topk_weights, out->recv_topk_weights, (size_t)cap * (size_t)K * 4, err);
        if (ls == EPX_SUCCESS) ls = epx__d2h((void *)hin.x, in->x, (size_t)T * s->row_bytes, err);
        if (ls == EPX_SUCCESS && fp8) ls = epx__d2h((void *)hin.x_scales, in->x_scales, (size_t)T * sc, err);
        if (ls == EPX_SUCCESS && in->topk_weights)
            ls = epx__d2h((void *)hin.topk_weights, in->topk_weights, sizeof(float) * (size_t)T * (size_t)K, err);
        local = ls;
    }
    epx__hier_moe_handle_t *hh = NULL;
    st = epx__hier_moe_dispatch(m->hm, &hin, &hout, local, &hh, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(h);
        return st;
    }
    int64_t N = hout.num_recv_tokens;
    size_t n = (size_t)N;
    epx__h2d(out->recv_x, hout.recv_x, n * s->row_bytes, stream, &st, err);
    if (fp8) epx__h2d(out->recv_x_scales, hout.recv_x_scales, n * sc, stream, &st, err); /* else not an output */
    epx__h2d(out->recv_topk_idx, hout.recv_topk_idx, n * (size_t)K * isz, stream, &st, err);
    epx__h2d(out->recv_topk_weights, hout.recv_topk_weights, n * (size_t)K * 4, stream, &st, err);
    epx__h2d(out->recv_src_rank, hout.recv_src_rank, n * 4, stream, &st, err);
    epx__h2d(out->recv_src_token, hout.recv_src_token, n * 4, stream, &st, err);
    epx__h2d(out->num_recv_tokens_per_expert, hout.num_recv_tokens_per_expert, (size_t)s->local_experts * 4, stream,
             &st, err);
    epx__h2d(out->num_recv_tokens_device, &N, sizeof N, stream, &st, err);
    h->hh = hh, h->n = N, h->shown = nosync ? -1 : N;
    out->num_recv_tokens = h->shown;
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(h);
        return st;
    }
    *handle = h;
    return EPX_SUCCESS;
}

epx_status_t epx__xhost_moe_dispatch_cached(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h,
                                            const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                            epx_status_t local, void *stream, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    bool skip = false;
    EPX__CHECK(epx__pre_handle(m, h, &local, stream, &skip, err));
    if (skip) return EPX_SUCCESS;
    bool fp8 = s->dtype == EPX_FP8_E4M3;
    size_t sc = s->scale_cols * sizeof(float);
    epx_moe_dispatch_in_t hin = {0};
    epx_moe_dispatch_out_t hout = {0};
    int T = local == EPX_SUCCESS ? h->T : 0;
    size_t n = local == EPX_SUCCESS ? (size_t)h->n : 0;
    if (local == EPX_SUCCESS) {
        epx_status_t ls = EPX_SUCCESS;
        hin.x = epx__hb(m, B_X, (size_t)T * s->row_bytes, &ls, err);
        hin.x_scales = fp8 ? epx__hb(m, B_XS, (size_t)T * sc, &ls, err) : NULL;
        hin.num_tokens = T;
        hout.recv_x = epx__hb(m, B_RX, n * s->row_bytes, &ls, err);
        hout.recv_x_scales = fp8 ? epx__hb(m, B_RXS, n * sc, &ls, err) : NULL;
        hout.capacity = (int64_t)n;
        if (ls == EPX_SUCCESS) ls = epx__d2h((void *)hin.x, in->x, (size_t)T * s->row_bytes, err);
        if (ls == EPX_SUCCESS && fp8) ls = epx__d2h((void *)hin.x_scales, in->x_scales, (size_t)T * sc, err);
        local = ls;
    }
    epx_status_t st = epx__hier_moe_dispatch_cached(m->hm, local == EPX_SUCCESS ? h->hh : NULL, &hin, &hout, local, err);
    if (st != EPX_SUCCESS) return st;
    epx__h2d(out->recv_x, hout.recv_x, n * s->row_bytes, stream, &st, err);
    if (fp8) epx__h2d(out->recv_x_scales, hout.recv_x_scales, n * sc, stream, &st, err); /* else not an output */
    return st;
}

epx_status_t epx__xhost_moe_combine(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h,
                                    const epx_moe_combine_in_t *in, epx_moe_combine_out_t *out, epx_status_t local,
                                    void *stream, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    bool skip = false;
    EPX__CHECK(epx__pre_handle(m, h, &local, stream, &skip, err));
    if (skip) return EPX_SUCCESS;
    size_t n = local == EPX_SUCCESS ? (size_t)h->n : 0, crow = s->combine_row_bytes;
    int T = local == EPX_SUCCESS ? h->T : 0;
    size_t K = local == EPX_SUCCESS ? (size_t)epx__hier_moe_handle_topk(h->hh) : 0;
    epx_moe_combine_in_t hin = {0};
    epx_moe_combine_out_t hout = {0};
    if (local == EPX_SUCCESS) {
        epx_status_t ls = EPX_SUCCESS;
        hin.y = epx__hb(m, B_Y, n * crow, &ls, err);
        hin.topk_weights = in->topk_weights ? epx__hb(m, B_W, n * K * 4, &ls, err) : NULL;
        hout.out = epx__hb(m, B_OUT, (size_t)T * crow, &ls, err);
        hout.out_topk_weights = out->out_topk_weights ? epx__hb(m, B_OUTW, (size_t)T * K * 4, &ls, err) : NULL;
        if (ls == EPX_SUCCESS) ls = epx__d2h((void *)hin.y, in->y, n * crow, err);
        if (ls == EPX_SUCCESS && in->topk_weights) ls = epx__d2h((void *)hin.topk_weights, in->topk_weights, n * K * 4, err);
        local = ls;
    }
    epx_status_t st = epx__hier_moe_combine(m->hm, local == EPX_SUCCESS ? h->hh : NULL, &hin, &hout, local, err);
    if (st != EPX_SUCCESS) return st;
    epx__h2d(out->out, hout.out, (size_t)T * crow, stream, &st, err);
    epx__h2d(out->out_topk_weights, hout.out_topk_weights, (size_t)T * K * 4, stream, &st, err);
    return st;
}

/* Low-latency row and scale bytes of a slot. */
static void epx__ll_sizes(const epx__moe_shape_t *s, size_t *rb, size_t *sb)
{
    *rb = s->ll_fp8 ? (size_t)s->hidden : s->row_bytes;
    *sb = s->ll_fp8 ? s->scale_cols * (s->scale_format == EPX_SCALE_UE8M0 ? 1 : 4) : 0;
}

epx_status_t epx__xhost_moe_ll_dispatch(epx__xhost_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                        epx_moe_ll_dispatch_out_t *out, epx_status_t local,
                                        epx__xhost_moe_handle_t **handle, void *stream, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    int T = local == EPX_SUCCESS ? in->num_tokens : 0, K = local == EPX_SUCCESS ? in->topk : 0, L = s->local_experts;
    bool bad = false, skip = false;
    int32_t *ids = NULL;
    if (local == EPX_SUCCESS) local = epx__routing(m, in->topk_idx, T, K, stream, &ids, &bad, err);
    /* The handle before the round: running out of memory is this rank's verdict. */
    epx__xhost_moe_handle_t *h = epx__handle_new(T, &local, err);
    if (h) h->cnt = calloc((size_t)EPX__MAX(L, 1), sizeof(int32_t));
    if (h && !h->cnt) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the handle");
    epx_status_t st = epx__pre(m, (bad ? EPX__PRE_BAD : 0) | EPX__PRE_NOSYNC, &local, &skip, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(h);
        return st;
    }
    if (skip) { /* no rank failed: h is there */
        h->bad = true;
        for (int l = 0; l < L; l++) h->cnt[l] = -1;
        epx__h2d(out->recv_count, h->cnt, sizeof(int32_t) * (size_t)L, stream, &st, err);
        if (st == EPX_SUCCESS) st = epx__xh_sync(m->xh, stream, err); /* h->cnt is the source */
        if (st != EPX_SUCCESS) {
            epx__xhost_moe_handle_free(h);
            return st;
        }
        *handle = h;
        return EPX_SUCCESS;
    }
    if (local == EPX_SUCCESS && bad) local = EPX_ERR_INVALID_ARGUMENT;
    size_t rb, sb, slots = s->ll_slots;
    epx__ll_sizes(s, &rb, &sb);
    epx_moe_ll_dispatch_in_t hin = {0};
    epx_moe_ll_dispatch_out_t hout = {0};
    if (local == EPX_SUCCESS) {
        epx_status_t ls = EPX_SUCCESS;
        hin = (epx_moe_ll_dispatch_in_t){epx__hb(m, B_X, (size_t)T * s->row_bytes, &ls, err), ids, T, K};
        hout.recv_x = epx__hb(m, B_RX, (size_t)L * slots * rb, &ls, err);
        hout.recv_x_scales = sb ? epx__hb(m, B_RXS, (size_t)L * slots * sb, &ls, err) : NULL;
        hout.recv_count = h->cnt;
        hout.recv_src_rank = out->recv_src_rank ? (int32_t *)epx__hb(m, B_SR, (size_t)L * slots * 4, &ls, err) : NULL;
        hout.recv_src_token = out->recv_src_token ? (int32_t *)epx__hb(m, B_ST, (size_t)L * slots * 4, &ls, err) : NULL;
        if (ls == EPX_SUCCESS) ls = epx__d2h((void *)hin.x, in->x, (size_t)T * s->row_bytes, err);
        local = ls;
    }
    epx__hier_moe_handle_t *hh = NULL;
    st = epx__hier_moe_ll_dispatch(m->hm, &hin, &hout, local, &hh, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(h);
        return st;
    }
    h->hh = hh;
    for (int l = 0; l < L; l++) {
        size_t o = (size_t)l * slots, c = (size_t)h->cnt[l];
        epx__h2d((char *)out->recv_x + o * rb, (char *)hout.recv_x + o * rb, c * rb, stream, &st, err);
        if (sb) epx__h2d((char *)out->recv_x_scales + o * sb, (char *)hout.recv_x_scales + o * sb, c * sb, stream, &st, err);
    }
    epx__h2d(out->recv_count, h->cnt, sizeof(int32_t) * (size_t)L, stream, &st, err);
    epx__h2d(out->recv_src_rank, hout.recv_src_rank, (size_t)L * slots * 4, stream, &st, err);
    epx__h2d(out->recv_src_token, hout.recv_src_token, (size_t)L * slots * 4, stream, &st, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(h);
        return st;
    }
    *handle = h;
    return EPX_SUCCESS;
}

epx_status_t epx__xhost_moe_ll_combine(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h,
                                       const epx_moe_ll_combine_in_t *in, void *out, epx_status_t local, void *stream,
                                       epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    bool skip = false;
    EPX__CHECK(epx__pre_handle(m, h, &local, stream, &skip, err));
    if (skip) return EPX_SUCCESS;
    int T = local == EPX_SUCCESS ? h->T : 0, L = s->local_experts;
    size_t K = local == EPX_SUCCESS ? (size_t)epx__hier_moe_handle_topk(h->hh) : 0, crow = s->combine_row_bytes;
    size_t slots = s->ll_slots;
    epx_moe_ll_combine_in_t hin = {0};
    void *hout = NULL;
    if (local == EPX_SUCCESS) {
        epx_status_t ls = EPX_SUCCESS;
        char *y = epx__hb(m, B_Y, (size_t)L * slots * crow, &ls, err);
        hin.y = y;
        hin.topk_weights = (const float *)epx__hb(m, B_W, (size_t)T * K * 4, &ls, err);
        hout = epx__hb(m, B_OUT, (size_t)T * crow, &ls, err);
        for (int l = 0; l < L && ls == EPX_SUCCESS; l++) /* only the filled slots are read */
            ls = epx__d2h(y + (size_t)l * slots * crow, (const char *)in->y + (size_t)l * slots * crow,
                          (size_t)h->cnt[l] * crow, err);
        if (ls == EPX_SUCCESS) ls = epx__d2h((void *)hin.topk_weights, in->topk_weights, (size_t)T * K * 4, err);
        local = ls;
    }
    epx_status_t st = epx__hier_moe_ll_combine(m->hm, local == EPX_SUCCESS ? h->hh : NULL, &hin, hout, local, err);
    if (st != EPX_SUCCESS) return st;
    epx__h2d(out, hout, (size_t)T * crow, stream, &st, err);
    return st;
}
