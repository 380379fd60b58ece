/* src/hier: topology, and alltoallv over shared memory inside a host and MPI between hosts. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* What each side of a pair tells the other before an exchange. */
typedef struct epx__card {
    int64_t status;
    int64_t send_bytes; /* to the receiver of the card */
    int64_t recv_bytes; /* from it */
    int64_t inlined;    /* bytes of the data to the receiver that follow the card */
} epx__card_t;

/* alltoallv: data of at most this many bytes to a rank on another host follows its card in
 * one message (a round fewer; copied into place after the verdict, like a message). The
 * whole letter, 4000 bytes, stays within what MPI libraries send at once without waiting
 * for the receiver (Open MPI's shared-memory transport: about 4 KiB), for past that the
 * message costs a round of its own. */
#define EPX__HIER_INLINE 3968
/* A card and the room for its data: a letter. */
#define EPX__LETTER (sizeof(epx__card_t) + EPX__HIER_INLINE)

/* Letter p of my outbox (box 0) or inbox (box 1). */
static epx__card_t *epx__letter(const epx__hier_t *h, int box, int p)
{
    return (epx__card_t *)(h->letters + ((size_t)box * (size_t)h->t.nranks + (size_t)p) * EPX__LETTER);
}

epx_status_t epx__hier_grow(char **buf, size_t *cap, size_t bytes, epx__errbuf_t *err)
{
    if (*cap >= bytes && *buf) return EPX_SUCCESS;
    size_t want = EPX__MAX(bytes, 2 * *cap);
    want = EPX__MAX(want, (size_t)64);
    char *p = realloc(*buf, want);
    if (!p) return err ? epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory (%zu bytes)", want) : EPX_ERR_NO_MEMORY;
    *buf = p;
    *cap = want;
    return EPX_SUCCESS;
}

epx_status_t epx__hier_net_xchg(epx__hier_t *h, int tag, const void *const *sbuf, const int64_t *sbytes,
                                void *const *rbuf, const int64_t *rbytes, epx__errbuf_t *err)
{
    return h->link.xchg(h->link.ctx, tag, sbuf, sbytes, rbuf, rbytes, err);
}

/* The MPI link. */
static epx_status_t epx__mpi_allreduce(void *ctx, int64_t *v, int n, epx__errbuf_t *err)
{
    return epx__net_allreduce_sum(ctx, v, n, err);
}

static epx_status_t epx__mpi_alltoall(void *ctx, const int64_t *send, int64_t *recv, int words, epx__errbuf_t *err)
{
    return epx__net_alltoall(ctx, send, recv, words, err);
}

static epx_status_t epx__mpi_xchg(void *ctx, int tag, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                                  const int64_t *rbytes, epx__errbuf_t *err)
{
    EPX__CHECK(epx__net_start(ctx, tag, sbuf, sbytes, rbuf, rbytes, err));
    return epx__net_wait(ctx, err);
}

/* An MPI message of mine completed: my local ranks waiting for me in shared memory see me
 * move (epx__cpu_progress), and an EPX_FAULT `slow` pauses here. */
static void epx__mpi_progress(void *ctx)
{
    epx__hier_t *h = ctx;
    epx__cpu_progress(h->cpu);
    if (__builtin_expect(h->slow_ms > 0, 0)) epx__fault_sleep_ms(h->slow_ms);
}

epx_status_t epx__hier_create(epx__hier_t **out, epx__cpu_t *cpu, epx__net_t *net, const int *host_of,
                              const int *lrank_of, epx__errbuf_t *err)
{
    epx__hier_link_t link = {net, epx__mpi_allreduce, epx__mpi_alltoall, epx__mpi_xchg};
    EPX__CHECK(epx__hier_create_link(out, cpu, &link, epx__net_rank(net), epx__net_size(net), host_of, lrank_of, err));
    (*out)->net = net;
    epx__net_on_progress(net, epx__mpi_progress, *out);
    /* alltoallv's letters, and a message to and from every rank in a batch, taken now:
     * calls do not allocate them. */
    (*out)->letters = malloc(EPX__LETTER * 2 * (size_t)epx__net_size(net));
    epx_status_t st =
        (*out)->letters ? epx__net_room(net, 0, 0, err) : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (st != EPX_SUCCESS) {
        epx__hier_destroy(*out);
        *out = NULL;
    }
    return st;
}

epx_status_t epx__hier_create_link(epx__hier_t **out, epx__cpu_t *cpu, const epx__hier_link_t *link, int me, int R,
                                   const int *host_of, const int *lrank_of, epx__errbuf_t *err)
{
    epx__hier_t *h = calloc(1, sizeof *h);
    if (!h) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    epx__topo_t *t = &h->t;
    t->rank = me;
    t->nranks = R;
    int H = 0;
    for (int r = 0; r < R; r++) H = EPX__MAX(H, host_of[r] + 1);
    t->num_hosts = H;
    t->host_of = malloc(sizeof(int) * (size_t)R);
    t->lrank_of = malloc(sizeof(int) * (size_t)R);
    t->host_ranks = malloc(sizeof(int) * (size_t)R);
    t->host_size = calloc((size_t)H, sizeof(int));
    t->host_first = calloc((size_t)H + 1, sizeof(int));
    if (!t->host_of || !t->lrank_of || !t->host_ranks || !t->host_size || !t->host_first) {
        epx__hier_destroy(h);
        return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    }
    memcpy(t->host_of, host_of, sizeof(int) * (size_t)R);
    memcpy(t->lrank_of, lrank_of, sizeof(int) * (size_t)R);
    for (int r = 0; r < R; r++) t->host_size[host_of[r]]++;
    for (int k = 0; k < H; k++) t->host_first[k + 1] = t->host_first[k] + t->host_size[k];
    for (int r = 0; r < R; r++) t->host_ranks[t->host_first[host_of[r]] + lrank_of[r]] = r;
    t->host = host_of[me];
    t->local_rank = lrank_of[me];
    t->local_size = t->host_size[t->host];
    h->sp = malloc(sizeof *h->sp * (size_t)R);
    h->rp = malloc(sizeof *h->rp * (size_t)R);
    h->sb = malloc(sizeof *h->sb * 2 * (size_t)R);
    h->lx = malloc(sizeof *h->lx * 4 * (size_t)t->local_size);
    h->bad = malloc(sizeof *h->bad * (size_t)R);
    if (!h->sp || !h->rp || !h->sb || !h->lx || !h->bad) {
        epx__hier_destroy(h);
        return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    }
    h->cpu = cpu;
    h->link = *link;
    *out = h;
    return EPX_SUCCESS;
}

void epx__hier_destroy(epx__hier_t *h)
{
    if (!h) return;
    if (h->net) epx__net_on_progress(h->net, NULL, NULL);
    free(h->t.host_of);
    free(h->t.lrank_of);
    free(h->t.host_ranks);
    free(h->t.host_size);
    free(h->t.host_first);
    free(h->scratch);
    free(h->letters), free((void *)h->sp), free(h->rp), free(h->sb), free(h->lx), free(h->bad);
    free(h);
}

const epx__topo_t *epx__hier_topo(const epx__hier_t *h) { return &h->t; }

void epx__hier_fault_count(epx__hier_t *h) { h->fault_count = true; }
void epx__hier_fault_nomem(epx__hier_t *h) { h->fault_nomem = true; }
void epx__hier_fault_slow(epx__hier_t *h, int ms) { h->slow_ms = ms; }

epx_status_t epx__hier_take_left(epx__hier_t *h)
{
    epx_status_t st = h ? h->left : EPX_SUCCESS;
    if (h) h->left = EPX_SUCCESS;
    return st;
}

/* alltoallv's cards (step 1): to every rank my verdict on my arguments and my counts for
 * it, and to another host's rank small data after the card (an inbox letter has room for
 * it: a shorter message fits the receive); theirs into my inbox. `fault`: EPX_FAULT count. */
static epx_status_t epx__a2a_cards(epx__hier_t *h, const epx__cpu_xfer_t *x, epx_status_t local, uint32_t seq,
                                   bool fault, epx__errbuf_t *err)
{
    const epx__topo_t *t = &h->t;
    int R = t->nranks, me = t->rank;
    const void **sp = h->sp;
    void **rp = h->rp;
    int64_t *sb = h->sb, *rb = h->sb + R;
    for (int p = 0; p < R; p++) {
        bool ok = local == EPX_SUCCESS, inter = t->host_of[p] != t->host;
        int64_t il = ok && inter && x->send_bytes[p] <= EPX__HIER_INLINE ? x->send_bytes[p] : 0;
        epx__card_t *o = epx__letter(h, 0, p);
        *o = (epx__card_t){local, ok ? x->send_bytes[p] : 0, ok ? x->recv_bytes[p] : 0, il};
        if (il) memcpy(o + 1, (const char *)x->send + x->send_displ[p], (size_t)il);
        sp[p] = o, rp[p] = epx__letter(h, 1, p);
        sb[p] = p == me ? 0 : (int64_t)sizeof(epx__card_t) + il;
        rb[p] = p == me ? 0 : (int64_t)sizeof(epx__card_t) + (inter ? EPX__HIER_INLINE : 0);
    }
    *epx__letter(h, 1, me) = *epx__letter(h, 0, me);
    if (fault && local == EPX_SUCCESS && R > 1) epx__letter(h, 0, (me + 1) % R)->send_bytes += 1;
    epx_status_t st = epx__hier_net_xchg(h, epx__hier_tag(seq, 0), sp, sb, rp, rb, err);
    if (st != EPX_SUCCESS) {
        /* A late peer's MPI may still read my letters (sends are not taken back) or write
         * its own into them: they are MPI's now (the communicator is broken by this). */
        epx__net_abandon(h->letters);
        h->letters = NULL;
    }
    return st;
}

/* alltoallv's verdict (step 2), once every card arrived (so every rank reaches the same):
 * EPX_ERR_REMOTE_INVALID when a rank rejected its arguments; else h->bad[p] tells the pairs
 * whose counts disagree (bad on both sides: such a pair moves nothing, inside the host
 * too), and *verdict is EPX_ERR_MISMATCH naming the first, or EPX_SUCCESS. */
static epx_status_t epx__a2a_verdict(epx__hier_t *h, epx_status_t *verdict, epx__errbuf_t *err)
{
    int R = h->t.nranks, me = h->t.rank;
    for (int p = 0; p < R; p++)
        if (epx__letter(h, 1, p)->status != EPX_SUCCESS)
            return epx__fail(err, EPX_ERR_REMOTE_INVALID, "rank %d rejected its arguments (%s); nothing was changed",
                             p, epx_status_name((epx_status_t)epx__letter(h, 1, p)->status));
    *verdict = EPX_SUCCESS;
    for (int p = 0; p < R; p++) {
        const epx__card_t *in = epx__letter(h, 1, p), *out = epx__letter(h, 0, p);
        h->bad[p] = in->send_bytes != out->recv_bytes || in->recv_bytes != out->send_bytes;
        if (!h->bad[p] || *verdict != EPX_SUCCESS) continue;
        bool into_me = in->send_bytes != out->recv_bytes;
        *verdict = epx__fail(err, EPX_ERR_MISMATCH,
                             "rank %d sends %lld bytes to rank %d, which expects %lld; nothing was written",
                             into_me ? p : me, (long long)(into_me ? in->send_bytes : out->send_bytes),
                             into_me ? me : p, (long long)(into_me ? out->recv_bytes : in->recv_bytes));
    }
    return EPX_SUCCESS;
}

epx_status_t epx__hier_alltoallv(epx__hier_t *h, const epx__cpu_xfer_t *x, epx_status_t local, epx__errbuf_t *err)
{
    const epx__topo_t *t = &h->t;
    int R = t->nranks, LS = t->local_size;
    if (!h->net) return epx__fail(err, EPX_ERR_INTERNAL, "hierarchical alltoallv needs the MPI engine");
    if (!h->letters) return epx__fail(err, EPX_ERR_INTERNAL, "alltoallv after its exchange of cards failed");
    const uint32_t seq = ++h->seq;
    const bool fault = h->fault_count; /* EPX_FAULT count: announce a byte more to rank + 1 */
    const bool nomem = h->fault_nomem; /* EPX_FAULT nomem: no scratch for a disagreeing pair */
    h->fault_count = h->fault_nomem = false;
    epx_status_t st = EPX_SUCCESS;
    const void **sp = h->sp;
    void **rp = h->rp;
    int64_t *sb = h->sb, *rb = h->sb + R, *lx = h->lx;
    bool *bad = h->bad;

    /* 0. Room for my messages to and from the other hosts (over 1 GiB a message takes more
     * MPI requests than the batch of a message per rank made at creation), before the cards:
     * a rank out of memory says so in them, and nothing is allocated after them. */
    if (local == EPX_SUCCESS) {
        int64_t bytes = 0;
        for (int p = 0; p < R; p++)
            if (t->host_of[p] != t->host) bytes += x->send_bytes[p] + x->recv_bytes[p];
        local = epx__net_room(h->net, 0, bytes, err);
    }

    /* 1. Cards (and small data to other hosts); 2. the verdict. */
    EPX__CHECK(epx__a2a_cards(h, x, local, seq, fault, err));
    if (local != EPX_SUCCESS) return local;
    epx_status_t verdict = EPX_SUCCESS;
    EPX__CHECK(epx__a2a_verdict(h, &verdict, err));

    /* 3. Data. A rank of a disagreeing pair still serves its other peers, but receives into
     * scratch: its own buffer stays untouched. Without memory for the scratch it receives
     * them in place (their segments of its output written, the pair's not): leaving the
     * exchange would leave its good peers waiting. */
    size_t scratch_need = 0;
    if (verdict != EPX_SUCCESS)
        for (int p = 0; p < R; p++) scratch_need += bad[p] ? 0 : (size_t)x->recv_bytes[p];
    char *sink = verdict != EPX_SUCCESS && !nomem &&
                         epx__hier_grow(&h->scratch, &h->scratch_bytes, scratch_need, NULL) == EPX_SUCCESS
                     ? h->scratch
                     : NULL;
    size_t off = 0;
    int64_t *lsb = lx, *lsd = lx + LS, *lrb = lx + 2 * LS, *lrd = lx + 3 * LS;
    for (int p = 0; p < R; p++) {
        bool inter = t->host_of[p] != t->host;
        int64_t rdisp = x->recv_displ[p];
        if (sink && !bad[p]) rdisp = (int64_t)off, off += (size_t)x->recv_bytes[p];
        char *rbase = sink ? sink : (char *)x->recv;
        /* What came with the card (a good pair: all of it) is placed now; either side of a
         * pair knows from the sender's card whether a message follows. */
        const epx__card_t *in = epx__letter(h, 1, p);
        bool came = inter && !bad[p] && in->inlined > 0 && in->inlined == x->recv_bytes[p] &&
                    in->inlined <= EPX__HIER_INLINE; /* (always both, from a sender of this code) */
        if (came) memcpy(rbase + rdisp, in + 1, (size_t)x->recv_bytes[p]);
        sp[p] = (const char *)x->send + x->send_displ[p];
        rp[p] = rbase + rdisp;
        sb[p] = inter && !bad[p] && !epx__letter(h, 0, p)->inlined ? x->send_bytes[p] : 0;
        rb[p] = inter && !bad[p] && !came ? x->recv_bytes[p] : 0;
        if (!inter) {
            int l = t->lrank_of[p];
            lsb[l] = bad[p] ? 0 : x->send_bytes[p], lsd[l] = x->send_displ[p];
            lrb[l] = bad[p] ? 0 : x->recv_bytes[p], lrd[l] = rdisp;
        }
    }
    EPX__CHECK(epx__net_start(h->net, epx__hier_tag(seq, 1), sp, sb, (void *const *)rp, rb, err));
    /* Inside the host, while the messages fly (a pair that disagrees moves nothing). */
    epx__cpu_xfer_t lxf = {x->send, lsb, lsd, sink ? sink : x->recv, lrb, lrd};
    epx_status_t cst = epx__cpu_alltoallv(h->cpu, &lxf, EPX_SUCCESS, err);
    st = epx__net_wait(h->net, err);
    if (st == EPX_SUCCESS && cst != EPX_SUCCESS && cst != EPX_ERR_MISMATCH) st = cst;
    return st == EPX_SUCCESS ? verdict : st;
}
