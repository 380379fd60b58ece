/* src/xhost: creation, the NCCL link of src/hier, alltoallv and barrier across hosts. */
#include <cuda_runtime_api.h>
#include <stdlib.h>
#include <string.h>

#include "counts.h"
#include "internal.h"

/* ---- Rounds across hosts ------------------------------------------------------------------
 * Once the links exist (after creation), a round goes in two steps, so that no rank handles
 * more than its host's share: (1) inside the host, over shared memory (xh->cpu), each local
 * rank gets what its rail needs; (2) along the rail, with the same local rank of every other
 * host (xh->links, TCP). A rank that failed still takes part in both (its status travels in
 * place of its data), so every rank of every host ends the round, with an error. Before the
 * links exist the bootstrap's star carries the rounds. */

/* The rail step of a round after the host step ended with `a`: `len` bytes of rs[i] to the
 * rail peer on host epx__xh_rail_host(xh, i), from it into rr[i]. Returns a, or what failed here. */
static epx_status_t epx__xh_rail_step(epx__xhost_t *xh, epx_status_t a, const void *const *rs, void *const *rr,
                                      size_t len, epx__errbuf_t *err)
{
    bool ok = a == EPX_SUCCESS;
    epx_status_t b = epx__boot_links_xchg(xh->links, a, ok ? rs : NULL, ok ? rr : NULL, len, ok ? err : NULL);
    return ok ? b : a;
}

/* The host step: `each` bytes to every local rank j from send + sd[j] (sd NULL: all from
 * send), `each` from it into recv + rd[j]; with st a failure this rank takes part without
 * data. */
static epx_status_t epx__xh_host_step(epx__xhost_t *xh, epx_status_t st, const void *send, const int64_t *sd,
                                      void *recv, const int64_t *rd, size_t each, epx__errbuf_t *err)
{
    int LS = xh->ls;
    int64_t *bytes = xh->rx, *srd = xh->rx + LS;
    for (int j = 0; j < LS; j++) bytes[j] = (int64_t)each, srd[j] = sd ? sd[j] : 0;
    epx__cpu_xfer_t x = {send, bytes, srd, recv, bytes, rd};
    return epx__cpu_alltoallv(xh->cpu, st == EPX_SUCCESS ? &x : NULL, st, err);
}

/* A round in which this rank takes part with its failure st (its message already in err)
 * and no data. Returns st, or what broke the host step (its status and message: a late or
 * dead local peer, after which this rank's transport has given up). */
static epx_status_t epx__xh_round_fail(epx__xhost_t *xh, epx_status_t st, epx__errbuf_t *err)
{
    epx_status_t a = epx__xh_host_step(xh, st, NULL, NULL, NULL, NULL, 0, err);
    epx__xh_rail_step(xh, a, NULL, NULL, 0, NULL);
    return a;
}

epx_status_t epx__xh_allgather(epx__xhost_t *xh, const void *mine, void *all, size_t len, epx__errbuf_t *err)
{
    if (!xh->links) return epx__boot_allgather(xh->boot, mine, all, len, err);
    int LS = xh->ls, H0 = xh->host * LS, n = xh->num_hosts - 1;
    int64_t *rd = xh->rx + 2 * LS;
    for (int j = 0; j < LS; j++) rd[j] = (int64_t)((size_t)(H0 + j) * len);
    epx_status_t a = epx__xh_host_step(xh, EPX_SUCCESS, mine, NULL, all, rd, len, err);
    const char *host = (const char *)all + (size_t)H0 * len;
    for (int i = 0; i < n; i++)
        xh->rs[i] = host, xh->rr[i] = (char *)all + (size_t)epx__xh_rail_host(xh, i) * LS * len;
    return epx__xh_rail_step(xh, a, xh->rs, xh->rr, (size_t)LS * len, err);
}

epx_status_t epx__xh_allgather_fail(epx__xhost_t *xh, epx_status_t st, size_t len, epx__errbuf_t *err)
{
    if (xh->links) return epx__xh_round_fail(xh, st, err);
    int64_t v = st;
    epx_status_t r = epx__boot_allgather_fail(xh->boot, &v, sizeof v, len, err);
    return r != EPX_SUCCESS ? r : st;
}

/* An alltoall of `len`-byte blocks (block q of send to rank q, block p of recv from p). */
static epx_status_t epx__xh_alltoall(epx__xhost_t *xh, const void *send, void *recv, size_t len, epx__errbuf_t *err)
{
    if (!xh->links) return epx__boot_alltoall(xh->boot, send, recv, len, err);
    int LS = xh->ls, NH = xh->num_hosts, H = xh->host, n = NH - 1, R = xh->nranks;
    /* For local rank j: my blocks for (h, j), h = 0..NH-1; from it: its blocks for (h, me). */
    char *to = malloc(EPX__MAX((2 * (size_t)R + (size_t)n * LS) * len, (size_t)1));
    if (!to) return epx__xh_round_fail(xh, epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    char *from = to + (size_t)R * len, *rail = from + (size_t)R * len;
    int64_t *d = xh->rx + 2 * LS;
    for (int j = 0; j < LS; j++) {
        d[j] = (int64_t)((size_t)j * NH * len);
        for (int h = 0; h < NH; h++)
            memcpy(to + ((size_t)j * NH + h) * len, (const char *)send + ((size_t)h * LS + j) * len, len);
    }
    epx_status_t a = epx__xh_host_step(xh, EPX_SUCCESS, to, d, from, d, (size_t)NH * len, err);
    /* To the rail peer on host h: the blocks of my host's ranks for it; mine from there go
     * straight into place (host h's ranks are consecutive). */
    for (int j = 0; j < LS && a == EPX_SUCCESS; j++) {
        memcpy((char *)recv + ((size_t)H * LS + j) * len, from + ((size_t)j * NH + H) * len, len);
        for (int i = 0; i < n; i++) {
            int h = epx__xh_rail_host(xh, i);
            memcpy(rail + ((size_t)i * LS + j) * len, from + ((size_t)j * NH + h) * len, len);
        }
    }
    for (int i = 0; i < n; i++) {
        xh->rs[i] = rail + (size_t)i * LS * len;
        xh->rr[i] = (char *)recv + (size_t)epx__xh_rail_host(xh, i) * LS * len;
    }
    epx_status_t st = epx__xh_rail_step(xh, a, xh->rs, xh->rr, (size_t)LS * len, err);
    free(to);
    return st;
}

/* Take part in such an alltoall with my failure st (every other rank's round fails). */
static epx_status_t epx__xh_alltoall_fail(epx__xhost_t *xh, epx_status_t st, size_t len, epx__errbuf_t *err)
{
    if (xh->links) return epx__xh_round_fail(xh, st, err);
    int64_t v = st;
    epx_status_t r = epx__boot_alltoall_fail(xh->boot, &v, sizeof v, len, err);
    return r != EPX_SUCCESS ? r : st;
}

epx_status_t epx__xh_allreduce(epx__xhost_t *xh, int64_t *v, int n, epx__errbuf_t *err)
{
    if (!xh->links) return epx__boot_allreduce_sum(xh->boot, v, (size_t)n, err);
    int LS = xh->ls, NH = xh->num_hosts, m = NH - 1;
    size_t row = sizeof *v * (size_t)n;
    uint64_t *t = malloc(EPX__MAX(((size_t)LS + 1 + (size_t)m) * row, (size_t)1));
    if (!t) return epx__xh_round_fail(xh, epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    uint64_t *mine = t + (size_t)LS * n;
    int64_t *rd = xh->rx + 2 * LS;
    for (int j = 0; j < LS; j++) rd[j] = (int64_t)((size_t)j * row);
    epx_status_t a = epx__xh_host_step(xh, EPX_SUCCESS, v, NULL, t, rd, row, err);
    memset(mine, 0, row);
    for (int j = 0; j < LS && a == EPX_SUCCESS; j++)
        for (int k = 0; k < n; k++) mine[k] += t[(size_t)j * n + k];
    for (int i = 0; i < m; i++) xh->rs[i] = mine, xh->rr[i] = mine + (size_t)(1 + i) * n;
    epx_status_t st = epx__xh_rail_step(xh, a, xh->rs, xh->rr, row, err);
    for (int i = 1; i <= m && st == EPX_SUCCESS; i++)
        for (int k = 0; k < n; k++) mine[k] += mine[(size_t)i * n + k];
    if (st == EPX_SUCCESS) memcpy(v, mine, row);
    free(t);
    return st;
}

epx_status_t epx__xh_vote(epx__xhost_t *xh, epx_status_t local, const char *what, epx__errbuf_t *err)
{
    int64_t v = local, *all = malloc(sizeof *all * (size_t)xh->nranks);
    if (!all)
        return epx__xh_allgather_fail(xh, local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"),
                                      sizeof v, err);
    epx_status_t st = epx__xh_allgather(xh, &v, all, sizeof v, err);
    if (st == EPX_SUCCESS) st = local;
    for (int p = 0; p < xh->nranks && st == EPX_SUCCESS; p++)
        if (all[p] != EPX_SUCCESS)
            st = epx__fail(err, EPX_ERR_REMOTE_INVALID, "rank %d %s (%s)", p, what,
                           epx_status_name((epx_status_t)all[p]));
    free(all);
    return st;
}

epx_status_t epx__xh_live(epx__xhost_t *xh, epx__errbuf_t *err)
{
    EPX__CHECK(epx__nccl_check_async(xh->nccl, err)); /* the watchdog's verdict, if it just gave one */
    if (epx__nccl_aborted(xh->nccl))
        return epx__fail(err, EPX_ERR_ABORTED, "the NCCL link between hosts was aborted after an earlier failure: "
                                               "abort the communicator and create a new one");
    return EPX_SUCCESS;
}

epx_status_t epx__xh_usable(epx__xhost_t *xh, void *stream, epx__errbuf_t *err)
{
    EPX__CHECK(epx__xh_live(xh, err));
    return epx__cuda_refuse_capture(stream,
                                    "this call across hosts waits on the host (for the stream and for the other "
                                    "hosts): make it outside the capture",
                                    err);
}

epx_status_t epx__xh_sync(epx__xhost_t *xh, void *stream, epx__errbuf_t *err)
{
    return epx__nccl_wait(xh->nccl, stream, epx__deadline_after_ms(xh->timeout_ms), err);
}

void epx__xhost_mark_broken(epx__xhost_t *xh)
{
    if (xh) epx__nccl_abort(xh->nccl);
}

epx_status_t epx__xhost_check_async(epx__xhost_t *xh, epx__errbuf_t *err)
{
    return xh ? epx__nccl_check_async(xh->nccl, err) : EPX_SUCCESS;
}

/* ---- EPX_FAULT ------------------------------------------------------------------------------ */

void epx__xhost_fault_set(epx__xhost_t *xh, const epx__fault_t *fault, uint32_t step, bool count, bool enqueue)
{
    xh->fault = fault, xh->fault_step = step;
    xh->fault_count = count, xh->fault_enqueue = enqueue;
}

epx_status_t epx__xh_fault_enqueue(epx__xhost_t *xh, void *stream, epx__errbuf_t *err)
{
    if (!xh->fault_enqueue) return EPX_SUCCESS;
    xh->fault_enqueue = false;
    epx__fault_delay_at(xh->fault, xh->fault_step, EPX__FAULT_AT_ENQUEUE);
    epx__fault_spec_t f;
    if (epx__fault_take_at(xh->fault, EPX__FAULT_KILL, xh->fault_step, EPX__FAULT_AT_ENQUEUE, &f))
        epx__fault_exit(&f, 0, xh->nranks - 1);
    if (epx__fault_take_at(xh->fault, EPX__FAULT_FAIL, xh->fault_step, EPX__FAULT_AT_ENQUEUE, &f))
        return epx__cuda_inject_failure(xh->cuda, stream, err);
    return EPX_SUCCESS;
}

/* ---- The link src/hier's MoE runs on ----------------------------------------------------- */

/* Every round is bounded by EPX_TIMEOUT_MS from its own start (hier.h). */
static epx_status_t epx__link_allreduce(void *ctx, int64_t *v, int n, epx__errbuf_t *err)
{
    return epx__xh_allreduce(ctx, v, n, err);
}

static epx_status_t epx__link_alltoall(void *ctx, const int64_t *send, int64_t *recv, int words, epx__errbuf_t *err)
{
    return epx__xh_alltoall(ctx, send, recv, sizeof *send * (size_t)words, err);
}

static epx_status_t epx__link_xchg(void *ctx, int tag, const void *const *sbuf, const int64_t *sbytes,
                                   void *const *rbuf, const int64_t *rbytes, epx__errbuf_t *err)
{
    epx__xhost_t *xh = ctx;
    (void)tag; /* one batch at a time, matched in order */
    int P = epx__nccl_size(xh->nccl);
    const void **sp = xh->sp;
    void **rp = xh->rp;
    int64_t *sb = xh->sb, *rb = sb + P;
    memset(sp, 0, sizeof *sp * (size_t)P), memset(rp, 0, sizeof *rp * (size_t)P);
    memset(sb, 0, sizeof *sb * 2 * (size_t)P);
    epx_status_t st = EPX_SUCCESS;
    for (int p = 0; p < xh->nranks && st == EPX_SUCCESS; p++) {
        if (sbytes[p] == 0 && rbytes[p] == 0) continue;
        int q = epx__xh_peer(xh, p);
        if (q < 0 || p == xh->rank) {
            st = epx__fail(err, EPX_ERR_INTERNAL, "xhost link: rank %d is not on rank %d's rail", p, xh->rank);
            break;
        }
        sp[q] = sbuf[p], sb[q] = sbytes[p];
        rp[q] = rbuf[p], rb[q] = rbytes[p];
    }
    if (st == EPX_SUCCESS)
        st = epx__nccl_host_xchg(xh->nccl, sp, sb, rp, rb, epx__deadline_after_ms(xh->timeout_ms), err);
    return st;
}

/* ---- Create / destroy ------------------------------------------------------------------ */

/* The per-call arrays (internal.h). */
static epx_status_t epx__xh_arrays(epx__xhost_t *xh, epx__errbuf_t *err)
{
    size_t P = (size_t)epx__nccl_size(xh->nccl);
    xh->sp = calloc(P, sizeof *xh->sp);
    xh->rp = calloc(P, sizeof *xh->rp);
    xh->sb = calloc(2 * P, sizeof *xh->sb);
    xh->lx = calloc(8 * (size_t)xh->ls, sizeof *xh->lx);
    xh->rail = calloc(P, sizeof *xh->rail);
    size_t n = (size_t)xh->num_hosts;
    xh->rx = calloc(3 * (size_t)xh->ls, sizeof *xh->rx);
    xh->rs = calloc(n, sizeof *xh->rs);
    xh->rr = calloc(n, sizeof *xh->rr);
    if (!xh->sp || !xh->rp || !xh->sb || !xh->lx || !xh->rail || !xh->rx || !xh->rs || !xh->rr)
        return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    for (int p = xh->lrank; p < xh->nranks; p += xh->ls)
        if (p != xh->rank) xh->rail[epx__xh_peer(xh, p)] = 1;
    return EPX_SUCCESS;
}

static const char epx__xh_create_what[] = "failed to create its part of the NCCL engine";

/* What the creation of a rail's NCCL communicator watches: the links to my rail peers. */
static epx_status_t epx__xh_watch_rail(void *links, epx__errbuf_t *err)
{
    return epx__boot_links_watch(links, err);
}

/* The NCCL watchdog's look at this rank's device (epx__nccl_watch_between). */
static epx_status_t epx__xh_watch_device(void *cuda, epx__errbuf_t *err)
{
    return epx__cuda_has_failed(cuda) ? epx__cuda_check_async(cuda, err) : EPX_SUCCESS;
}

/* The NCCL watchdog's look at the low-latency kernels' marks (epx__nccl_watch_between): a
 * step around NCCL transfers that has not moved for EPX_TIMEOUT_MS (the transfers wait for
 * a rank on another host that is late or gone), or a quarter of it once this rank's device
 * has failed (as the watchdog's own rule for its groups). Calls wait for their own groups;
 * this one is for what runs with no call to watch it: a CUDA graph's replays. */
static epx_status_t epx__xh_watch_stall(void *arg, epx__errbuf_t *err)
{
    epx__xhost_t *xh = arg;
    unsigned long long v[4];
    for (int i = 0; i < 4; i++) v[i] = __atomic_load_n(&xh->marks[i], __ATOMIC_ACQUIRE);
    bool stuck = v[0] != v[1] || v[2] != v[3];
    uint64_t now = epx__now_ns();
    if (!stuck || memcmp(v, xh->stall_seen, sizeof v) != 0) {
        memcpy(xh->stall_seen, v, sizeof v);
        xh->stall_since_ns = stuck ? now : 0;
        return EPX_SUCCESS;
    }
    bool failed = epx__cuda_has_failed(xh->cuda);
    if (now - xh->stall_since_ns < epx__ms_to_ns(xh->timeout_ms) / (failed ? 4 : 1)) return EPX_SUCCESS;
    bool dispatch = v[0] != v[1];
    return epx__fail(err, EPX_ERR_TIMEOUT,
                     "the NCCL transfers of this rank's low-latency %s %llu have waited %.0f ms (EPX_TIMEOUT_MS "
                     "%lld%s: a rank on another host is late or gone)",
                     dispatch ? "dispatch" : "combine", dispatch ? v[0] : v[2],
                     (double)(now - xh->stall_since_ns) / 1e6, (long long)xh->timeout_ms,
                     failed ? ", a quarter of it after this rank's device failed" : "");
}

/* What every rank tells the others first: its verdict and, on host 0, its rail's NCCL id. */
typedef struct {
    int64_t status;
    char id[EPX__NCCL_ID_BYTES];
} epx__rail_card_t;

epx_status_t epx__xhost_create(epx__xhost_t **out, epx__boot_t *boot, epx__cpu_t *cpu, epx__cuda_t *cuda,
                               epx__nccl_t *adopted, int rank, int nranks, const int *host_of, const int *lrank_of,
                               int64_t timeout_ms, epx_status_t local, epx__errbuf_t *err)
{
    *out = NULL;
    epx__xhost_t *xh = calloc(1, sizeof *xh);
    if (!xh) { /* the first round still, so that the others fail at once */
        int64_t v = local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        epx__boot_allgather_fail(boot, &v, sizeof v, sizeof(epx__rail_card_t), err);
        epx__nccl_destroy(adopted, false);
        return (epx_status_t)v;
    }
    xh->boot = boot, xh->cpu = cpu, xh->cuda = cuda;
    xh->rank = rank, xh->nranks = nranks, xh->timeout_ms = timeout_ms;
    xh->host = host_of[rank], xh->lrank = lrank_of[rank];
    xh->nccl = adopted, xh->adopted = adopted != NULL;
    for (int p = 0; p < nranks; p++) xh->num_hosts = EPX__MAX(xh->num_hosts, host_of[p] + 1);
    xh->ls = nranks / EPX__MAX(xh->num_hosts, 1);
    for (int p = 0; p < nranks && local == EPX_SUCCESS; p++)
        if (host_of[p] != p / xh->ls || lrank_of[p] != p % xh->ls || xh->ls * xh->num_hosts != nranks)
            local = epx__fail(err, EPX_ERR_UNSUPPORTED,
                              "CUDA across hosts needs hosts of equal size holding consecutive ranks (rank %d is "
                              "local rank %d of host %d)",
                              p, lrank_of[p], host_of[p]);
    if (local == EPX_SUCCESS && adopted && epx__nccl_size(adopted) != nranks)
        local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "the NCCL communicator has %d ranks, epx's %d",
                          epx__nccl_size(adopted), nranks);
    /* Rails: rank (0, i) makes rail i's id. */
    const char *why;
    if (local == EPX_SUCCESS && !epx__nccl_available(&why))
        local = epx__fail(err, EPX_ERR_UNSUPPORTED, "NCCL: %s", why);
    if (local == EPX_SUCCESS) {
        cudaError_t ce = cudaHostAlloc((void **)&xh->marks, 4 * sizeof *xh->marks, cudaHostAllocMapped);
        if (ce == cudaSuccess) ce = cudaHostGetDevicePointer((void **)&xh->marks_dev, xh->marks, 0);
        if (ce == cudaSuccess) memset(xh->marks, 0, 4 * sizeof *xh->marks);
        if (ce != cudaSuccess) {
            cudaGetLastError();
            local = epx__fail(err, EPX_ERR_CUDA, "mapped host memory: %s", cudaGetErrorString(ce));
        }
    }
    epx__rail_card_t card, *cards = calloc((size_t)nranks, sizeof card);
    memset(&card, 0, sizeof card);
    if (!cards && local == EPX_SUCCESS) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (local == EPX_SUCCESS && !adopted && xh->host == 0) local = epx__nccl_get_id(card.id, err);
    card.status = local;
    epx_status_t st = cards ? epx__xh_allgather(xh, &card, cards, sizeof card, err)
                            : epx__xh_allgather_fail(xh, local, sizeof card, err);
    if (st == EPX_SUCCESS) st = local;
    for (int p = 0; p < nranks && st == EPX_SUCCESS; p++)
        if (cards[p].status != EPX_SUCCESS)
            st = epx__fail(err, cards[p].status == EPX_ERR_UNSUPPORTED ? EPX_ERR_UNSUPPORTED : EPX_ERR_REMOTE_INVALID,
                           "rank %d could not join the NCCL engine (%s)", p,
                           epx_status_name((epx_status_t)cards[p].status));
    /* The links along my rail, before NCCL: its creation watches them. Until creation ends the
     * votes still go over the bootstrap's star (xh->links is set last), so that links a
     * failed rank closed break no vote; from then on the rounds across hosts take them (see
     * above). */
    epx__boot_links_t *links = NULL;
    if (st == EPX_SUCCESS) {
        int n = xh->num_hosts - 1, *peers = calloc((size_t)EPX__MAX(n, 1), sizeof *peers);
        for (int i = 0; peers && i < n; i++) peers[i] = epx__xh_rail_host(xh, i) * xh->ls + xh->lrank;
        epx_status_t mine = peers ? epx__boot_links_create(boot, peers, n, &links, err)
                                  : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        free(peers);
        st = epx__xh_vote(xh, mine, epx__xh_create_what, err);
    }
    /* The rail's NCCL communicator. A rank that fails here closes its links at once: its rail
     * peers' creations, which wait for it, see them close and give up within milliseconds
     * (so does a rail peer that dies), and every rank meets at the vote. */
    if (st == EPX_SUCCESS) {
        epx__nccl_watch_t watch = {epx__xh_watch_rail, links};
        epx_status_t mine = adopted ? EPX_SUCCESS
                                    : epx__nccl_create(&xh->nccl, xh->num_hosts, xh->host, cards[xh->lrank].id,
                                                       timeout_ms, &watch, err);
        if (mine == EPX_SUCCESS) mine = epx__xh_arrays(xh, err);
        if (mine != EPX_SUCCESS) epx__boot_links_close(links), links = NULL;
        st = epx__xh_vote(xh, mine, epx__xh_create_what, err);
    }
    if (st == EPX_SUCCESS) xh->links = links;
    else epx__boot_links_close(links);
    free(cards);
    if (st == EPX_SUCCESS) {
        epx__hier_link_t link = {xh, epx__link_allreduce, epx__link_alltoall, epx__link_xchg};
        st = epx__xh_vote(xh, epx__hier_create_link(&xh->hier, cpu, &link, rank, nranks, host_of, lrank_of, err),
                          epx__xh_create_what, err);
    }
    if (st != EPX_SUCCESS) {
        epx__xhost_destroy(xh, true);
        return st;
    }
    epx__cuda_relay_failures(cuda); /* gateways send on what they received (every rank of the host) */
    if (!adopted) {
        epx__nccl_watch_t device = {epx__xh_watch_device, cuda}, stall = {epx__xh_watch_stall, xh};
        epx__nccl_watch_between(xh->nccl, &device, &stall);
    }
    EPX_INFO(NET, "rank %d: CUDA across %d hosts of %d ranks, NCCL %s", rank, xh->num_hosts, xh->ls,
             adopted ? "adopted" : "rails");
    *out = xh;
    return EPX_SUCCESS;
}

void epx__xhost_destroy(epx__xhost_t *xh, bool abort)
{
    if (!xh) return;
    epx__hier_destroy(xh->hier);
    /* NCCL first: after a failure its kernels may still spin, and cudaFree would wait for them. */
    epx__nccl_destroy(xh->nccl, abort);
    if (xh->gw) cudaFree(xh->gw);
    if (xh->fwd) cudaFree(xh->fwd);
    if (xh->stat) cudaFree(xh->stat);
    if (xh->marks) cudaFreeHost(xh->marks);
    cudaGetLastError();
    epx__boot_links_close(xh->links);
    free(xh->sp), free(xh->rp), free(xh->sb), free(xh->lx), free(xh->rail);
    free(xh->rx), free(xh->rs), free(xh->rr);
    free(xh);
}

/* ---- alltoallv ---------------------------------------------------------------------------- */

static epx_status_t epx__grow_dev(char **buf, size_t *cap, size_t bytes, epx__errbuf_t *err)
{
    if (bytes <= *cap) return EPX_SUCCESS;
    if (*buf) cudaFree(*buf);
    *buf = NULL;
    *cap = 0;
    size_t want = EPX__MAX(bytes, (size_t)1 << 20);
    cudaError_t ce = cudaMalloc((void **)buf, want);
    if (ce != cudaSuccess) return epx__fail(err, EPX_ERR_CUDA, "alltoallv staging (%zu bytes): %s", want, cudaGetErrorString(ce));
    *cap = want;
    return EPX_SUCCESS;
}

epx_status_t epx__xhost_alltoallv(epx__xhost_t *xh, const epx__cpu_xfer_t *x, epx_status_t local, void *stream,
                                  epx__errbuf_t *err)
{
    int R = xh->nranks, me = xh->rank, LS = xh->ls, NH = xh->num_hosts, i = xh->lrank, H0 = xh->host * LS;
    size_t B = epx__xc_words(LS);
    if (local == EPX_SUCCESS) local = epx__xh_usable(xh, stream, err);
    /* My count cards, the ones I receive, every rank's record (counts.h); then my send
     * counts as announced (EPX_FAULT count: one byte more to rank me + 1). */
    int64_t *out = calloc((2 * B + EPX__XC_REC + 1) * (size_t)R, sizeof *out);
    int64_t *in = out ? out + B * (size_t)R : NULL, *recs = out ? in + B * (size_t)R : NULL;
    int64_t *sent = out ? recs + EPX__XC_REC * (size_t)R : NULL;
    if (!out && local == EPX_SUCCESS) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    bool fault = epx__xh_take_count(xh);
    if (local == EPX_SUCCESS) {
        memcpy(sent, x->send_bytes, sizeof *sent * (size_t)R);
        if (fault && R > 1) sent[(me + 1) % R] += 1;
    }
    /* 1. The counts: every rank reaches the same verdict, in the same rounds, before anything
     * moves. A failed rank's cards carry only its status; the round then ends every call. */
    if (!out) return epx__xh_alltoall_fail(xh, local, sizeof *out * B, err);
    epx__xc_cards(out, R, LS, local, sent, local == EPX_SUCCESS ? x->recv_bytes : NULL);
    epx_status_t st = epx__xh_alltoall(xh, out, in, sizeof *out * B, err);
    if (st == EPX_SUCCESS) st = local;
    if (st == EPX_SUCCESS) st = epx__xc_statuses(in, R, LS, err);
    if (st == EPX_SUCCESS) { /* every status is success: on every rank, then */
        int64_t rec[EPX__XC_REC];
        epx_status_t mine = epx__xc_pairs(in, R, LS, me, sent, x->recv_bytes, rec, err);
        st = epx__xh_allgather(xh, rec, recs, sizeof rec, err);
        if (st == EPX_SUCCESS) st = mine;
        if (st == EPX_SUCCESS) st = epx__xc_verdict(recs, R, me, err);
    }
    if (st != EPX_SUCCESS) {
        free(out);
        return st;
    }
/* What rank p sends rank q of my host: the cards hold it for every p. */
#define EPX__SEND(p, q) epx__xc_sent(in, LS, p, (q) - H0)
    /* 2. Everything that can fail: staging, the intra-host exchanges' host rounds and
     * mappings (the pairs inside the host, straight between the callers' buffers; then the
     * forwarded segments, xh->gw to xh->fwd). Then one verdict of every rank: a failure
     * anywhere stops every host before anything is enqueued. */
    int P = epx__nccl_size(xh->nccl);
    const void **sp = xh->sp;
    void **rp = xh->rp;
    int64_t *sb = xh->sb, *rb = sb + P, *lx = xh->lx;
    int64_t *lsb = lx, *lsd = lx + LS, *lrb = lx + 2 * LS, *lrd = lx + 3 * LS;
    int64_t *fsb = lx + 4 * LS, *fsd = lx + 5 * LS, *frb = lx + 6 * LS, *frd = lx + 7 * LS;
    for (int l = 0; l < LS; l++) {
        lsb[l] = x->send_bytes[H0 + l], lsd[l] = x->send_displ[H0 + l];
        lrb[l] = x->recv_bytes[H0 + l], lrd[l] = x->recv_displ[H0 + l];
    }
    /* As gateway I receive, for each local index j, the segments of my rail peers (A, i)
     * for rank (my host, j), host-major: the j blocks lie back to back in xh->gw; block j
     * goes on to local rank j, which gets its own rail's blocks in xh->fwd. */
    size_t gw_total = 0, fwd_total = 0;
    int64_t roff = 0;
    for (int j = 0; j < LS; j++) {
        int64_t n = 0, m = 0;
        for (int A = 0; A < NH; A++)
            if (A != xh->host) n += EPX__SEND(A * LS + i, H0 + j), m += EPX__SEND(A * LS + j, me);
        fsd[j] = (int64_t)gw_total, fsb[j] = j == i ? 0 : n;
        frd[j] = roff, frb[j] = j == i ? 0 : m;
        gw_total += (size_t)n;
        roff += frb[j];
    }
    fwd_total = (size_t)roff;
    epx_status_t ready = EPX_SUCCESS;
    if (!xh->stat) {
        cudaError_t ce = cudaMalloc((void **)&xh->stat, (size_t)(1 + P) * EPX__CUDA_STATUS_BYTES);
        if (ce != cudaSuccess) {
            xh->stat = NULL;
            ready = epx__fail(err, EPX_ERR_CUDA, "alltoallv statuses: %s", cudaGetErrorString(ce));
        }
    }
    if (ready == EPX_SUCCESS && (gw_total > xh->gw_bytes || fwd_total > xh->fwd_bytes)) {
        ready = epx__xh_sync(xh, stream, err); /* earlier calls may still read the staging */
        if (ready == EPX_SUCCESS) ready = epx__grow_dev(&xh->gw, &xh->gw_bytes, gw_total, err);
        if (ready == EPX_SUCCESS) ready = epx__grow_dev(&xh->fwd, &xh->fwd_bytes, fwd_total, err);
    }
    epx__cpu_xfer_t lxf = {x->send, lsb, lsd, x->recv, lrb, lrd}, fx = {xh->gw, fsb, fsd, xh->fwd, frb, frd};
    const epx__cpu_xfer_t *ops[2] = {&lxf, &fx};
    epx__cuda_a2a_t *plan = NULL;
    ready = epx__cuda_a2a_prepare(xh->cuda, ops, LS > 1 ? 2 : 1, ready, stream, &plan, err);
    st = epx__xh_vote(xh, ready, "could not prepare its part of the alltoallv; nothing was written", err);
    if (st != EPX_SUCCESS) {
        epx__cuda_a2a_free(plan);
        free(out);
        return st;
    }
    /* 3. Enqueue. Only a CUDA or NCCL call fails here, with peers' operations posted: the
     * NCCL link is then aborted, so that they fail instead of waiting. The last NCCL group
     * carries every rank's status to its rail peers, numbered by call (as MoE's, moe.c): one
     * that failed, or that did not come (the groups were cut short), fails this rank's
     * device before it forwards or places anything, and the forwarding tells the local
     * ranks (src/cuda's failure relay). */
    st = epx__xh_fault_enqueue(xh, stream, err);
    if (++xh->seq == 0) xh->seq = 1;
    char *mine = xh->stat, *theirs = xh->stat + EPX__CUDA_STATUS_BYTES;
    if (st == EPX_SUCCESS) st = epx__cuda_a2a_enqueue(xh->cuda, plan, 0, stream, err);
    uint64_t deadline = epx__deadline_after_ms(xh->timeout_ms);
    size_t off = 0;
    for (int j = 0; j < LS && st == EPX_SUCCESS; j++) { /* one NCCL group per destination local index */
        memset(sp, 0, sizeof *sp * (size_t)P), memset(rp, 0, sizeof *rp * (size_t)P);
        memset(sb, 0, sizeof *sb * 2 * (size_t)P);
        for (int B = 0; B < NH; B++) {
            if (B == xh->host) continue;
            int g = B * LS + i, q = epx__xh_peer(xh, g), dst = B * LS + j, src = g;
            sp[q] = (const char *)x->send + x->send_displ[dst], sb[q] = x->send_bytes[dst];
            rp[q] = xh->gw + off, rb[q] = EPX__SEND(src, H0 + j);
            off += (size_t)rb[q];
        }
        bool last = j == LS - 1;
        if (last) st = epx__cuda_status_out(xh->cuda, me, xh->seq, mine, stream, err);
        if (st == EPX_SUCCESS)
            st = epx__nccl_post(xh->nccl, sp, sb, rp, rb, last ? xh->rail : NULL, last ? mine : NULL,
                                last ? theirs : NULL, last ? EPX__CUDA_STATUS_BYTES : 0, stream, deadline, err);
    }
    epx__cuda_status_slots_t rail = epx__xh_rail_slots(xh);
    if (st == EPX_SUCCESS) st = epx__cuda_status_check(xh->cuda, theirs, &rail, xh->seq, stream, err);
    if (st == EPX_SUCCESS && LS > 1) st = epx__cuda_a2a_enqueue(xh->cuda, plan, 1, stream, err);
    /* Into place: my own block of xh->gw and what the other gateways forwarded. */
    if (st == EPX_SUCCESS) {
        size_t o = (size_t)fsd[i], fo = 0;
        cudaError_t ce = cudaSuccess;
        for (int l = 0; l < LS && ce == cudaSuccess; l++)
            for (int A = 0; A < NH && ce == cudaSuccess; A++) {
                if (A == xh->host) continue;
                int src = A * LS + l;
                size_t n = (size_t)EPX__SEND(src, me);
                const char *from = l == i ? xh->gw + o : xh->fwd + fo;
                if (n) ce = cudaMemcpyAsync((char *)x->recv + x->recv_displ[src], from, n, cudaMemcpyDeviceToDevice,
                                            (cudaStream_t)stream);
                if (l == i)
                    o += n;
                else
                    fo += n;
            }
        if (ce != cudaSuccess) st = epx__fail(err, EPX_ERR_CUDA, "alltoallv copies: %s", cudaGetErrorString(ce));
    }
    if (st != EPX_SUCCESS) epx__nccl_abort(xh->nccl);
#undef EPX__SEND
    epx__cuda_a2a_free(plan);
    free(out);
    return st;
}

epx_status_t epx__xhost_alltoallv_device(epx__xhost_t *xh, const epx__cuda_counts_t *k, epx_status_t local,
                                         void *stream, epx__errbuf_t *err)
{
    int R = xh->nranks;
    if (local == EPX_SUCCESS) local = epx__xh_usable(xh, stream, err);
    int64_t *h = calloc(8 * (size_t)R, sizeof *h);
    if (!h) /* still the round of epx__xhost_alltoallv, so that the others fail at once */
        return epx__xhost_alltoallv(
            xh, NULL, local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), stream, err);
    int64_t *sc = h, *sd = h + R, *rc = h + 2 * R, *rd = h + 3 * R, *b = h + 4 * R;
    const int64_t *src[4] = {k->send_counts, k->send_displs, k->recv_counts, k->recv_displs};
    if (local == EPX_SUCCESS) local = epx__xh_sync(xh, stream, err);
    for (int a = 0; a < 4 && local == EPX_SUCCESS; a++) {
        cudaError_t ce = cudaMemcpy(h + (size_t)a * R, src[a], sizeof *h * (size_t)R, cudaMemcpyDeviceToHost);
        if (ce != cudaSuccess) local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "reading the device counts: %s", cudaGetErrorString(ce));
    }
    for (int p = 0; p < R && local == EPX_SUCCESS; p++) {
        int64_t most = INT64_MAX / (int64_t)k->elem_bytes;
        if (sc[p] < 0 || sd[p] < 0 || rc[p] < 0 || rd[p] < 0)
            local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "a device count or displacement for rank %d is negative", p);
        else if (sc[p] > most || sd[p] > most || rc[p] > most || rd[p] > most)
            local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "a device count or displacement for rank %d is too large", p);
        if (local != EPX_SUCCESS) break;
        b[p] = sc[p] * k->elem_bytes, b[R + p] = sd[p] * k->elem_bytes;
        b[2 * R + p] = rc[p] * k->elem_bytes, b[3 * R + p] = rd[p] * k->elem_bytes;
    }
    epx__cpu_xfer_t x = {k->send, b, b + R, k->recv, b + 2 * R, b + 3 * R};
    epx_status_t st = epx__xhost_alltoallv(xh, local == EPX_SUCCESS ? &x : NULL, local, stream, err);
    free(h);
    return st;
}

epx_status_t epx__xhost_barrier(epx__xhost_t *xh, epx_status_t local, void *stream, epx__errbuf_t *err)
{
    if (local == EPX_SUCCESS) local = epx__xh_usable(xh, stream, err);
    if (local == EPX_SUCCESS) local = epx__xh_sync(xh, stream, err);
    epx_status_t st = epx__xh_vote(xh, local, "could not enter the barrier", err);
    if (st == EPX_SUCCESS) st = epx__xh_fault_enqueue(xh, stream, err);
    return st;
}
