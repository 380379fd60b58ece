/*
 * CPU backend: alltoallv by pulling (see the protocol in cpu.h).
 */
#include <stddef.h>
#include <string.h>

#include "shm.h"

/* Describe where each peer can read what I send it: small messages are copied into my
 * eager slots; the rest is read from the send buffer itself, exposed as one extent (see
 * epx__expose_buffers). Returns through `exposed` whether peers will read memory the
 * caller owns or the staging region (then we must wait for them). */
static epx_status_t epx__publish_sends(epx__cpu_t *c, const epx__cpu_xfer_t *x, uint32_t seq, bool *exposed,
                                       epx__errbuf_t *err)
{
    int me = c->rank;
    *exposed = false;
    /* Extent [lo, hi) of the send buffer that peers read beyond the eager path. */
    int64_t lo = INT64_MAX, hi = 0;
    for (int p = 0; p < c->nranks; p++) {
        if (p == me || x->send_bytes[p] <= (int64_t)c->eager_bytes) continue;
        lo = EPX__MIN(lo, x->send_displ[p]);
        hi = EPX__MAX(hi, x->send_displ[p] + x->send_bytes[p]);
    }
    epx__loc_t big = {EPX__LOC_NONE, 0, 0, 0};
    if (hi > 0) {
        epx__expose_t extent = {(const char *)x->send + lo, (size_t)(hi - lo), {0, 0, 0, 0}};
        EPX__CHECK(epx__expose_buffers(c, &extent, 1, exposed, err));
        big = extent.loc; /* where send + lo lies */
    }
    for (int p = 0; p < c->nranks; p++) {
        epx__desc_t *d = epx__seg_desc(c->seg, c->nranks, seq, p);
        d->send_bytes = x->send_bytes[p];
        d->recv_bytes = x->recv_bytes[p];
        d->loc = (epx__loc_t){EPX__LOC_NONE, 0, 0, 0};
        if (p == me || x->send_bytes[p] == 0) continue;
        if (x->send_bytes[p] <= (int64_t)c->eager_bytes) {
            memcpy(epx__seg_eager(c->seg, c->nranks, c->eager_bytes, seq, p), (const char *)x->send + x->send_displ[p],
                   (size_t)x->send_bytes[p]);
            d->loc.kind = EPX__LOC_EAGER;
        } else {
            d->loc = big;
            d->loc.addr += (uint64_t)(x->send_displ[p] - lo);
        }
    }
    return EPX_SUCCESS;
}

/* A `count` fault: announce one byte more to the next rank than I send it. */
static void epx__fault_count(epx__cpu_t *c, uint32_t seq)
{
    epx__fault_spec_t f;
    if (c->nranks < 2 || !epx__fault_take(&c->fault, EPX__FAULT_COUNT, seq, &f)) return;
    epx__seg_desc(c->seg, c->nranks, seq, (c->rank + 1) % c->nranks)->send_bytes += 1;
}

/* Both sides of every pair this rank is part of must agree; and nobody may have rejected
 * its arguments. Checked before anything is written. */
static epx_status_t epx__check_peers(epx__cpu_t *c, uint32_t seq, epx__errbuf_t *err)
{
    int me = c->rank;
    EPX__CHECK(epx__op_check_remote(c, seq, EPX__CALL_EXCHANGE, err));
    for (int p = 0; p < c->nranks; p++) {
        if (p == me) continue;
        const epx__desc_t *theirs = epx__seg_desc(c->peers[p].hdr, c->nranks, seq, me);
        const epx__desc_t *mine = epx__seg_desc(c->seg, c->nranks, seq, p);
        if (theirs->send_bytes != mine->recv_bytes)
            return epx__fail(err, EPX_ERR_MISMATCH,
                             "rank %d sends %lld bytes to rank %d, which expects %lld; nothing was written",
                             epx__rank_name(c, p), (long long)theirs->send_bytes, epx__rank_name(c, me),
                             (long long)mine->recv_bytes);
        if (theirs->recv_bytes != mine->send_bytes)
            return epx__fail(err, EPX_ERR_MISMATCH,
                             "rank %d sends %lld bytes to rank %d, which expects %lld; nothing was written",
                             epx__rank_name(c, me), (long long)mine->send_bytes, epx__rank_name(c, p),
                             (long long)theirs->recv_bytes);
    }
    return EPX_SUCCESS;
}

/* Open the next operation: publish and post what I send (a failure here is local and is
 * posted as such) and acquire every peer's post. *broken when that failed, or when this
 * rank had given up before (then nothing is written or posted): return the status as it
 * is, peers fail too. Else the verdict on every pair I am part of, checked
 * before anything is read or written; the operation must then be finished
 * (epx__op_finish) whatever comes next. */
static epx_status_t epx__xop_open(epx__cpu_t *c, const epx__cpu_xfer_t *x, epx_status_t local_status, epx__xop_t *op,
                                  bool *broken, epx__errbuf_t *err)
{
    /* Peers finished their reads of operation seq-2 (same parity) before they posted
     * seq-1, which this rank saw before it returned from seq-1: the block is free. */
    op->seq = epx__op_begin(c);
    op->exposed = false;
    epx_status_t gone = epx__cpu_given_up(c, err); /* then write and post nothing */
    *broken = gone != EPX_SUCCESS;
    if (*broken) return gone;
    if (local_status == EPX_SUCCESS) local_status = epx__publish_sends(c, x, op->seq, &op->exposed, err);
    if (__builtin_expect(c->fault.armed, 0) && local_status == EPX_SUCCESS) epx__fault_count(c, op->seq);
    epx__op_post(c, op->seq, EPX__CALL_EXCHANGE, local_status);
    epx_status_t st = epx__wait_posts(c, op->seq, err);
    *broken = st != EPX_SUCCESS;
    if (*broken) return st;
    return local_status != EPX_SUCCESS ? local_status : epx__check_peers(c, op->seq, err);
}

/* What peer p sends me in operation seq: its descriptor, checked (a region range in
 * bounds). */
static epx_status_t epx__peer_send(epx__cpu_t *c, int p, uint32_t seq, const epx__desc_t **d, epx__errbuf_t *err)
{
    *d = epx__seg_desc(c->peers[p].hdr, c->nranks, seq, c->rank);
    const epx__loc_t *l = &(*d)->loc;
    if ((*d)->send_bytes > 0 && l->kind == EPX__LOC_REGION &&
        (l->addr > l->region_size || (uint64_t)(*d)->send_bytes > l->region_size - l->addr))
        return epx__fail(err, EPX_ERR_INTERNAL, "rank %d published a region range out of bounds", epx__rank_name(c, p));
    return EPX_SUCCESS;
}

epx_status_t epx__cpu_alltoallv(epx__cpu_t *c, const epx__cpu_xfer_t *x, epx_status_t local_status,
                                epx__errbuf_t *err)
{
    const int me = c->rank;
    epx__xop_t op;
    bool broken;
    epx_status_t st = epx__xop_open(c, x, local_status, &op, &broken, err);
    if (broken) return st;
    /* Pull. */
    if (st == EPX_SUCCESS && x->send_bytes[me] > 0)
        epx__copy_moving(c, op.seq, (char *)x->recv + x->recv_displ[me], (const char *)x->send + x->send_displ[me],
                         (size_t)x->send_bytes[me]);
    for (int i = 1; i < c->nranks && st == EPX_SUCCESS; i++) {
        int p = (me + i) % c->nranks;
        const epx__desc_t *d;
        st = epx__peer_send(c, p, op.seq, &d, err);
        if (st == EPX_SUCCESS && d->send_bytes > 0)
            st = epx__peer_read(c, p, &d->loc, op.seq, 0, (char *)x->recv + x->recv_displ[p], (size_t)d->send_bytes,
                                err);
    }
    /* Nobody gave up while I read; then done: if peers read memory the caller owns, it
     * must stay put until they finish. */
    if (st == EPX_SUCCESS) st = epx__peers_check(c, op.seq, err);
    return epx__op_finish(c, op.seq, op.exposed, st, err);
}

epx_status_t epx__cpu_exchange_begin(epx__cpu_t *c, const epx__cpu_xfer_t *x, const char **seg,
                                     epx_status_t local_status, epx__errbuf_t *err)
{
    const int me = c->rank;
    epx__xop_t op;
    bool broken;
    epx_status_t st = epx__xop_open(c, x, local_status, &op, &broken, err);
    if (broken) return st;
    for (int p = 0; p < c->nranks && st == EPX_SUCCESS; p++) {
        const epx__desc_t *d;
        seg[p] = NULL;
        if (p == me) {
            if (x->send_bytes[me] > 0) seg[p] = (const char *)x->send + x->send_displ[me];
            continue;
        }
        st = epx__peer_send(c, p, op.seq, &d, err);
        if (st != EPX_SUCCESS || d->send_bytes == 0) continue;
        if (d->loc.kind != EPX__LOC_REGION && d->loc.kind != EPX__LOC_EAGER)
            st = epx__fail(err, EPX_ERR_INTERNAL, "rank %d's segment is not in memory that can be mapped here",
                           epx__rank_name(c, p));
        else
            st = epx__peer_map(c, p, &d->loc, op.seq, &seg[p], err);
    }
    if (st != EPX_SUCCESS) return epx__op_finish(c, op.seq, op.exposed, st, err);
    c->open = op;
    return EPX_SUCCESS;
}

epx_status_t epx__cpu_exchange_end(epx__cpu_t *c, epx_status_t st, epx__errbuf_t *err)
{
    /* Nobody gave up while I read what they exposed; then done, waiting for the readers of
     * mine when it is memory that outlives the operation. */
    if (st == EPX_SUCCESS) st = epx__peers_check(c, c->open.seq, err);
    return epx__op_finish(c, c->open.seq, c->open.exposed, st, err);
}
