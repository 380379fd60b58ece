/*
 * src/xhost: MoE across GPU hosts.
 *
 * Dispatch, cached dispatch and combine, high-throughput and low-latency, keep the payload
 * on the device.
 * The host reads back only the routing (topk_idx, T*K ids; with weights, T*K floats) after
 * one wait for the caller's stream (every call waits there, so a worst-case capacity with a
 * device row count changes only what num_recv_tokens shows: -1), and computes the plan with
 * src/hier's algorithm (epx__hier_moe_dispatch_plan: src/hier's verdict and routing records,
 * 72 B per row crossing, host-staged over NCCL; no rows), which also yields recv_topk_idx,
 * recv_topk_weights, recv_src_rank/token and the per-expert counts (copied up). The handle's
 * row plan (src/hier/plan.c: counts and row references, the same plan the CPU backend runs
 * for cached dispatch and combine) is uploaded once per dispatch. Then, on the caller's
 * stream (the NCCL step on a side stream when there are local ranks: "Overlap" below), after
 * one more bootstrap round (staging and the intra-host exchange prepared on
 * every rank, or nobody moves):
 *   dispatch  gather my rows for each other host (one per token and destination host) into
 *             S_GW; one grouped ncclSend/ncclRecv along my rail (GPU i of every host) into
 *             the gateways' S_FWD; each gateway gathers, from S_FWD and its own x, the rows
 *             each other local GPU needs and they cross over CUDA IPC (src/cuda alltoallv:
 *             NVLink); a final gather writes recv_x (and FP8 scales) in (source rank,
 *             token) order: the single-host order. Rows meant for myself are never copied
 *             between buffers, only placed.
 *   combine   the reverse, rows home unreduced: each receiver's rows back to their forwarder
 *             (CUDA IPC), each gateway's rows of its sources home (NCCL along the rail), and
 *             at home one kernel sums every token's rows in ascending rank order in float32
 *             from +0 with the single-host CUDA combine's code (epx__moe_reduce_token): the
 *             same bits.
 * Overlap: with local ranks, the NCCL step runs on a side stream (after a fork event on
 * the caller's stream, which then waits for its join event) in chunks (by token index;
 * EPX_MOE_CHUNKS, or from the dispatch's largest batch: src/hier's plan; every call along
 * a handle runs its dispatch's chunks), and each intra-host exchange runs in parts by
 * where the token's source is and its chunk: a dispatch sends the local ranks' own tokens
 * over NVLink while NCCL runs, then the forwarded ones of each chunk as soon as that
 * chunk has crossed, while the next one crosses; a combine sends back the rows of tokens
 * from other hosts chunk by chunk, their forwarders sending each chunk on over NCCL while
 * the next comes back, then, while NCCL runs, the rows of this host's tokens.
 *
 * Bytes per GPU and direction for T = 4096, H = 7168, K = 8, E = 256 (uniform routing; a
 * token reaches a given host with p = 0.9965, a given rank of 2x2 with 0.9036); BF16 row
 * 14336 B, FP8 record 7392 B (e4m3 row + 56 float scales):
 *   2 hosts x 1 GPU: NIC (rail peer) 4082 rows = 58.5 MB BF16 / 30.2 MB FP8; no NVLink;
 *                    N = 8163 rows received (117 MB); HBM ~ 350 MB (pack, place).
 *   2 hosts x 2 GPUs: NIC the same 58.5 / 30.2 MB per GPU (so 117 / 60 MB per host pair and
 *                    direction); NVLink 7402 rows sent per GPU (3701 own + 3701 forwarded) =
 *                    106 MB BF16 / 55 MB FP8; N = 14804 rows (212 MB); HBM ~ 750 MB.
 *   Combine (BF16 expert outputs) moves the same rows back (+ 32 B of weights per row when
 *   passed); routing records add 0.29 MB per GPU over the NIC (dispatch only).
 * Expected on 400 Gb/s NICs (46 GB/s usable, docs/SCALING.md): dispatch ~1.3 ms BF16 /
 * 0.66 ms FP8 on the NIC, plus ~0.15-0.35 ms NVLink at 2x2 (the forwarded half; the own
 * half, the same again, overlaps the NIC step) and ~0.1-0.2 ms of
 * HBM passes, plus the host part (one stream wait, 3 bootstrap rounds, the routing-record
 * exchange, the plan: ~1-3 ms, not measured); combine the same. On the test machine (2 GPUs
 * as 2 hosts over NCCL sockets on lo) the payload steps are the NCCL baseline's.
 *
 * Low-latency dispatch and combine run on the device (section "Low-latency on the device")
 * up to 4 hosts and EPX__LL_MAX_SRCS ranks (EPX_MOE_LL_HOST changes that); else they run the same
 * machinery as high-throughput with a low-latency row plan. The
 * host reads back topk_idx alone (T*K ids; the weights stay on the device) after the wait
 * for the caller's stream; src/hier plans (epx__hier_moe_ll_dispatch_plan: its verdict and
 * routing records, 40 B per token and destination host at K = 8, host-staged over NCCL; no
 * rows), and the handle's row plan (src/hier/plan.c, the plan the CPU backend's low-latency
 * slots and combine run: one record per token and destination rank as above, the slot of
 * every (row, expert) received, the rows of the combine) is uploaded once per dispatch.
 * Then, after the same bootstrap round, on the caller's stream:
 *   dispatch  with FP8, one kernel quantises each of my tokens once (epx__ll_quantize_block,
 *             the CPU backend's arithmetic) into S_Q; the records (the e4m3 row and its
 *             scales, or the dtype's row) move as high-throughput rows do; one kernel then
 *             copies every received row into the slot of each of its experts here (slots of
 *             an expert by source rank, then token, ascending: the CPU backend's order),
 *             writes recv_src_rank / recv_src_token (-1 past the count) and recv_count.
 *   combine   rows home unreduced, one per (token, distinct expert), a token's rows for a
 *             rank back to back by local expert (src/hier's low-latency combine): back to
 *             their forwarder (CUDA IPC), home along the rail (NCCL); at home one kernel
 *             sums each token's valid k, each term the float32 product w[t, k] * y
 *             rounded before it is added, a partial per expert rank (k ascending) from +0,
 *             then the partials (ranks ascending) from +0 (epx__ll_sum_token): the CPU
 *             backend's bits.
 * That path waits on the host, so it cannot be captured in a CUDA graph and
 * a split send does all the work (its receive keeps the order only): per dispatch the stream
 * wait and the read-back of the ids, a bootstrap round (bad routing), src/hier's verdict (an
 * alltoall of small blocks over the bootstrap) and routing records (over NCCL, then shared
 * memory inside a host), the plan and its upload, and the staging round; per combine the
 * wait, a bootstrap round, the verdict and the staging round. Only then are kernels and
 * NCCL enqueued.
 *
 * Bytes per GPU and direction for T = 128, H = 7168, K = 8, E = 288 (uniform routing,
 * distinct experts: a token reaches the other host with p = 0.9965, a given rank of 2x2 with
 * 0.9031, and has 4 experts on a host of 144, 2 on a rank of 72); FP8 record 7392 B (e4m3
 * row + 56 float32 scales; UE8M0 7232 B), BF16 row 14336 B:
 *   dispatch  2x1: NIC 127.5 records = 0.94 MB FP8 / 1.83 MB BF16; no NVLink; 255.5 rows
 *             received, 1024 slots filled.
 *             2x2: NIC the same 0.94 / 1.83 MB; NVLink 231 records (115.6 own + 115.6
 *             forwarded) = 1.71 MB FP8 / 3.31 MB BF16.
 *   combine   (BF16) 2x1: NIC 512 rows = 7.34 MB. 2x2: NIC 512 rows = 7.34 MB (the rail
 *             peer's tokens' experts on my host), NVLink 512 rows = 7.34 MB back to the
 *             forwarders. Four times a (token, rank) combine's bytes: no partial sum may
 *             cross, or the float32 rounding would differ from the single-host sum in k
 *             order.
 *   Routing records add 5 KB per GPU over the NIC (dispatch only); HBM passes are small.
 *
 * The CUDA backend checks routing on the device where it skips host synchronisation; this
 * path keeps its visible behaviour: when every rank's dispatch is of that kind (low-latency
 * always; high-throughput with a worst-case capacity and a device row count) and some rank
 * has a bad expert id, every rank succeeds, the counts say -1, nothing else is written, and
 * calls along that handle write nothing. One bootstrap round per call agrees on that.
 *
 * Ordering: every call makes the caller's stream wait for the last call's device work
 * (m->done, whatever stream it ran on) and then waits for that stream (bounded, watching
 * NCCL), so the staging is free when a call starts; work enqueued after the last bootstrap
 * round can fail only in a CUDA or NCCL call, and such a failure aborts the NCCL link.
 */
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "dev.h"
#include "internal.h"

enum { B_IDX, B_W, B_RIDX, B_RW, B_SR, B_ST, B_PE, B_CNT, B_LAY, B_N };
enum { S_GW, S_FWD, S_LSEND, S_LRECV, S_Q, S_N }; /* device staging (see epx__stage) */

struct epx__xhost_moe {
    epx__xhost_t *xh;
    epx__moe_shape_t s;
    epx__hier_moe_t *hm;
    char *buf[B_N]; /* host mirrors, grown on demand */
    size_t cap[B_N];
    char *stage[S_N]; /* device staging of the rows */
    size_t stage_cap[S_N];
    int64_t *lx; /* [MAX_PARTS * 4 * LS]: the intra-host exchanges' byte counts and displacements */
    epx__cpu_xfer_t lxf[EPX__HIER_MAX_PARTS]; /* those exchanges, by part: an epx__cuda_a2a_t
                                                 plan points here until enqueued */
    int sms;
    cudaEvent_t done;  /* recorded at the end of every call that enqueued work */
    cudaStream_t side; /* the NCCL step of a call with an intra-host exchange runs here ... */
    cudaEvent_t fork, join; /* ... after `fork` on the caller's stream, which waits for `join` */
    cudaEvent_t ev[EPX__HIER_MAX_CHUNKS]; /* chunk c's hand-over between the two streams */
    /* device (epx__cuda_status_*): my status for the NCCL peers in each chunk's group
     * [MAX_CHUNKS], then theirs [MAX_CHUNKS][P]; the number of each chunk's group (the same
     * on both ends of a pair: every rank posts the same groups on a context), from seq */
    char *stat;
    unsigned seq, chunk_seq[EPX__HIER_MAX_CHUNKS];
    /* Low-latency on the device (see "Low-latency on the device" below): this host's part
     * of a src/cuda context over every rank, and its rail buffers; NULL: the host path. */
    epx__cuda_moe_t *ll;
    epx__ll_rail_t rails;
    uint32_t ll_calls; /* low-latency dispatches so far: a combine names its dispatch by it */
};

_Static_assert(EPX__HIER_MAX_PARTS <= EPX__CUDA_A2A_MAX_OPS, "an intra-host exchange per part of the row plan");

/* Chunk c's statuses in m->stat: mine, then the P peers'. */
static char *epx__stat_mine(const epx__xhost_moe_t *m, int c) { return m->stat + (size_t)c * EPX__CUDA_STATUS_BYTES; }
static char *epx__stat_theirs(const epx__xhost_moe_t *m, int c)
{
    size_t P = (size_t)epx__nccl_size(m->xh->nccl);
    return m->stat + EPX__CUDA_STATUS_BYTES * (EPX__HIER_MAX_CHUNKS + (size_t)c * P);
}

/* A handle's row plan (src/hier's epx__hier_xplan_t: counts on the host), its references
 * in device memory. */
typedef struct {
    epx__hier_xplan_t h;
    bool keep_dev;  /* the NCCL link died: leave cudaMalloc'd memory (cudaFree could wait) */
    long long *dev; /* the references, sections as in h: */
    const long long *d_gw, *d_fan, *d_out, *d_c1, *d_home, *d_first, *d_tok;
    const long long *d_tk, *d_rk, *d_prow, *d_pslot, *d_psrc, *d_count; /* low-latency */
    bool dev_async;    /* dev is stream-ordered (cudaMallocAsync): freed without waiting */
    int device;        /* dev's */
    cudaEvent_t used;  /* recorded after every call that read dev */
} epx__xh_plan_t;

struct epx__xhost_moe_handle {
    epx__cuda_moe_handle_t *ch; /* low-latency on the device: the src/cuda handle; the rest unused */
    uint32_t ll_id;             /* its dispatch's number (m->ll_calls) */
    epx__hier_moe_handle_t *hh;
    int T;
    int64_t n;     /* rows received */
    int64_t shown; /* what the caller sees: n, or -1 (no host synchronisation) */
    bool bad;      /* bad routing seen "on the device": calls along it write nothing */
    int chunks;    /* of the network step of every call along it: the same on every rank */
    epx__xh_plan_t xp;
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
    if (*st != EPX_SUCCESS || !dst || !src || !bytes) return;
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
    if (!all) return epx__xh_allgather_fail(m->xh, *local, sizeof code, err);
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

/* EPX_FAULT `count` of this call: src/hier's next verdict (the one this call makes right
 * after) announces a top-k one larger. */
static void epx__fault_count(epx__xhost_moe_t *m)
{
    if (epx__xh_take_count(m->xh)) epx__hier_fault_count(m->xh->hier);
}

/* Make `stream` wait for the last call's device work, whatever stream that ran on (it may
 * still use the staging; a wait for `stream` then covers both). In a CUDA graph (only the
 * low-latency calls on the device get there) the order is the graph's and its stream's:
 * epx.h's rule that a communicator's calls run one after another. */
static epx_status_t epx__after_last(epx__xhost_moe_t *m, void *stream, epx__errbuf_t *err)
{
    if (epx__cuda_capturing(stream)) return EPX_SUCCESS;
    cudaError_t ce = cudaStreamWaitEvent((cudaStream_t)stream, m->done, 0);
    if (ce != cudaSuccess) return epx__fail(err, EPX_ERR_CUDA, "ordering after the last MoE call: %s", cudaGetErrorString(ce));
    return EPX_SUCCESS;
}

/* Wait for the caller's stream, then read the routing and check it. *bad: an id out of
 * range (err says which); the return value is another failure. */
static epx_status_t epx__routing(epx__xhost_moe_t *m, const void *topk, int T, int K, void *stream, int32_t **ids,
                                 bool *bad, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    *bad = false;
    EPX__CHECK(epx__xh_usable(m->xh, stream, err)); /* before anything waits on the stream */
    EPX__CHECK(epx__after_last(m, stream, err));
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

/* Does a context of this shape run low-latency on the device (else on the host path)?
 * EPX_MOE_LL_HOST: 0 yes, 1 no, -1 up to 4 hosts (the device path's combine sends N times
 * the rows needed with N hosts: see "Low-latency on the device"). */
static bool epx__ll_on_device(const epx__moe_shape_t *s, int nhosts)
{
    int64_t p = epx__param_int(EPX__P_MOE_LL_HOST);
    return s->mode == EPX_MOE_LOW_LATENCY && s->nranks <= EPX__LL_MAX_SRCS && (p == 0 || (p < 0 && nhosts <= 4));
}

/* The events a context makes: done, fork, join, then one per chunk. */
enum { EPX__XH_NEV = 3 + EPX__HIER_MAX_CHUNKS };

/* A failed creation's undoing: the first `made` of the events ev, the side stream and the
 * statuses, in that order; then m. */
static void epx__xhost_moe_create_undo(epx__xhost_moe_t *m, cudaEvent_t *const *ev, int made)
{
    for (int i = 0; i < made && i < EPX__XH_NEV; i++) cudaEventDestroy(*ev[i]);
    if (made > EPX__XH_NEV) cudaStreamDestroy(m->side);
    if (made > EPX__XH_NEV + 1) cudaFree(m->stat);
    if (m) free(m->lx);
    free(m);
}

epx_status_t epx__xhost_moe_create(epx__xhost_t *xh, const epx__moe_shape_t *shape, uint64_t hash, epx_status_t local,
                                   epx__xhost_moe_t **out, epx__errbuf_t *err)
{
    epx__xhost_moe_t *m = calloc(1, sizeof *m);
    if (!m && local == EPX_SUCCESS) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    int made = 0; /* of the EPX__XH_NEV events, side, stat, in that order */
    cudaEvent_t *ev[EPX__XH_NEV];
    if (m && local == EPX_SUCCESS) {
        m->xh = xh;
        m->lx = calloc(EPX__HIER_MAX_PARTS * 4 * (size_t)xh->ls, sizeof *m->lx);
        if (!m->lx) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        int dev = 0;
        cudaError_t ce = cudaGetDevice(&dev);
        if (ce == cudaSuccess) ce = cudaDeviceGetAttribute(&m->sms, cudaDevAttrMultiProcessorCount, dev);
        ev[0] = &m->done, ev[1] = &m->fork, ev[2] = &m->join;
        for (int c = 0; c < EPX__HIER_MAX_CHUNKS; c++) ev[3 + c] = &m->ev[c];
        while (ce == cudaSuccess && made < EPX__XH_NEV)
            if ((ce = cudaEventCreateWithFlags(ev[made], cudaEventDisableTiming)) == cudaSuccess) made++;
        if (ce == cudaSuccess && (ce = cudaStreamCreateWithFlags(&m->side, cudaStreamNonBlocking)) == cudaSuccess) made++;
        size_t sb = EPX__CUDA_STATUS_BYTES * EPX__HIER_MAX_CHUNKS * (1 + (size_t)epx__nccl_size(xh->nccl));
        if (ce == cudaSuccess && (ce = cudaMalloc((void **)&m->stat, sb)) == cudaSuccess) made++;
        if (ce != cudaSuccess && local == EPX_SUCCESS)
            local = epx__fail(err, EPX_ERR_CUDA, "MoE across hosts: %s", cudaGetErrorString(ce));
    }
    /* Low-latency on the device: this host's ranks make their part (a collective among
     * them); src/hier's creation below makes every rank's verdict on it. Every rank must
     * take that path or none (the mode and EPX_MOE_LL_HOST decide it): one round first
     * counts the ranks that would, and those that failed already. */
    int64_t v[2] = {local == EPX_SUCCESS && epx__ll_on_device(shape, xh->num_hosts), local != EPX_SUCCESS};
    epx_status_t st = epx__xh_allreduce(xh, v, 2, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_create_undo(m, ev, made);
        return st;
    }
    if (local == EPX_SUCCESS && v[1] == 0 && v[0] != 0 && v[0] != xh->nranks)
        local = epx__fail(err, EPX_ERR_MISMATCH,
                          "%lld of %d ranks would run low latency on the device, the others on the host "
                          "(their mode or EPX_MOE_LL_HOST differs)",
                          (long long)v[0], xh->nranks);
    epx__cuda_moe_t *ll = NULL;
    epx__ll_rail_t rails;
    memset(&rails, 0, sizeof rails);
    if (v[1] == 0 && v[0] == xh->nranks) {
        epx_status_t c = epx__cuda_moe_create(xh->cuda, shape, hash, local, &ll, err);
        if (c == EPX_SUCCESS) c = epx__cuda_moe_ll_rails(ll, xh->num_hosts, xh->host, xh->marks_dev, &rails, err);
        if (local == EPX_SUCCESS) local = c;
    }
    epx__hier_moe_t *hm = NULL;
    st = epx__hier_moe_create(xh->hier, shape, hash, local, &hm, err);
    if (st != EPX_SUCCESS) {
        epx__cuda_moe_destroy(ll);
        epx__xhost_moe_create_undo(m, ev, made);
        return st;
    }
    m->xh = xh, m->s = *shape, m->hm = hm;
    m->ll = ll, m->rails = rails;
    *out = m;
    return EPX_SUCCESS;
}

void epx__xhost_moe_destroy(epx__xhost_moe_t *m)
{
    if (!m) return;
    epx__hier_moe_destroy(m->hm);
    for (int b = 0; b < B_N; b++) free(m->buf[b]);
    /* After a failure NCCL's kernels may still wait on the stream (an adopted communicator
     * is left to its owner, or a peer died after the last call's agreement and nothing broke
     * the communicator yet), and cudaFree would wait for them: leave the memory then, once
     * the last call's device work has not ended within EPX_TIMEOUT_MS. A link of epx's own
     * that was aborted (every communicator that breaks, or is aborted, aborts it) has ended
     * its kernels, so the wait is short and the staging is freed; an adopted one that was
     * only marked dead is looked at once, not waited for. */
    bool marked = m->xh->adopted && epx__nccl_aborted(m->xh->nccl), keep = false;
    uint64_t deadline = marked ? 0 : epx__deadline_after_ms(m->xh->timeout_ms);
    while (!keep && cudaEventQuery(m->done) == cudaErrorNotReady) {
        if (epx__now_ns() >= deadline) keep = true;
        sched_yield();
    }
    for (int b = 0; b < S_N; b++)
        if (m->stage[b] && !keep) cudaFree(m->stage[b]);
    if (m->ll) epx__cuda_moe_detach(m->ll); /* its mappings, in the communicator's IPC cache */
    if (!keep) epx__cuda_moe_destroy(m->ll);
    if (!keep) cudaFree(m->stat);
    cudaEventDestroy(m->done), cudaEventDestroy(m->fork), cudaEventDestroy(m->join);
    for (int c = 0; c < EPX__HIER_MAX_CHUNKS; c++) cudaEventDestroy(m->ev[c]);
    cudaStreamDestroy(m->side); /* returns at once; its work (done before m->done) ends on its own */
    cudaGetLastError();
    free(m->lx);
    free(m);
}

static void epx__plan_free(epx__xh_plan_t *x);

void epx__xhost_moe_handle_free(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h)
{
    if (!h) return;
    if (h->ch && m) epx__cuda_moe_handle_free(h->ch);
    if (h->ch && !m) epx__cuda_moe_handle_abandon(h->ch); /* its context is gone */
    epx__hier_moe_handle_free(m ? m->hm : NULL, h->hh);
    epx__plan_free(&h->xp);
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
    if (*local == EPX_SUCCESS) *local = epx__after_last(m, stream, err);
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

/* ---- The plan on the host, the rows on the device ----------------------------------------- */

/* Staging of a context in device memory (grown on demand; calls are ordered by m->done):
 * dispatch: S_GW my records for my gateways (NCCL send), S_FWD what my rail peers sent me
 * as their gateway (NCCL receive), S_LSEND / S_LRECV the fan-out to and from the local
 * ranks (CUDA IPC), S_Q my rows quantised (low-latency FP8); combine: S_LSEND / S_LRECV the
 * rows going back to the forwarders, S_GW the rows a gateway sends home, S_FWD what the
 * gateways send me home. */
enum { K_X = EPX__HIER_X, K_FWD = EPX__HIER_FWD, K_LRECV = EPX__HIER_LRECV }; /* dispatch: where rows come from */
enum { K_Y = EPX__HIER_Y, K_C1 = EPX__HIER_C1, K_HOME = EPX__HIER_HOME };     /* combine */

/* The kernels' share of the device. */
static int epx__blocks(const epx__xhost_moe_t *m) { return 2 * EPX__MAX(m->sms, 1); }

/* Make sure stage buffer b holds `bytes` (contents dropped). Every call has waited for
 * every earlier one (m->done) first, and peers finished writing into mine before my stream
 * went on, so the old buffer is free. */
static epx_status_t epx__stage(epx__xhost_moe_t *m, int b, size_t bytes, epx__errbuf_t *err)
{
    if (bytes <= m->stage_cap[b]) return EPX_SUCCESS;
    if (m->stage[b]) cudaFree(m->stage[b]);
    m->stage[b] = NULL, m->stage_cap[b] = 0;
    size_t want = EPX__MAX(bytes + bytes / 4, (size_t)1 << 20);
    cudaError_t ce = cudaMalloc((void **)&m->stage[b], want);
    if (ce != cudaSuccess) {
        cudaGetLastError();
        m->stage[b] = NULL;
        return epx__fail(err, EPX_ERR_NO_MEMORY, "MoE staging in device memory (%zu bytes): %s", want,
                         cudaGetErrorString(ce));
    }
    m->stage_cap[b] = want;
    return EPX_SUCCESS;
}

/* The stream of `device` on which plans are freed: made once, kept. NULL if it cannot be. */
static cudaStream_t epx__free_stream(int device)
{
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    static cudaStream_t streams[64];
    if (device < 0 || device >= (int)EPX__ARRAY_LEN(streams)) return NULL;
    pthread_mutex_lock(&mu);
    if (!streams[device]) {
        int cur = -1;
        cudaGetDevice(&cur);
        if (cudaSetDevice(device) != cudaSuccess ||
            cudaStreamCreateWithFlags(&streams[device], cudaStreamNonBlocking) != cudaSuccess)
            streams[device] = NULL;
        if (cur >= 0) cudaSetDevice(cur);
        cudaGetLastError();
    }
    cudaStream_t s = streams[device];
    pthread_mutex_unlock(&mu);
    return s;
}

/* Free a plan. Never waits for the device: the calls that read it may still wait for a
 * peer that is gone, until the NCCL link is aborted (cudaFree would wait with them, and so
 * would epx_moe_handle_destroy, forever). Stream-ordered memory is freed on an internal
 * stream after its last use; cudaMalloc'd memory (no stream-ordered allocator) as before. */
static void epx__plan_free(epx__xh_plan_t *x)
{
    epx__hier_xplan_free(&x->h);
    if (x->dev && x->dev_async) {
        int cur = -1;
        cudaGetDevice(&cur);
        cudaStream_t fs = epx__free_stream(x->device);
        if (fs && x->used && cudaSetDevice(x->device) == cudaSuccess &&
            cudaStreamWaitEvent(fs, x->used, 0) == cudaSuccess)
            cudaFreeAsync(x->dev, fs); /* else left: freeing it could wait */
        if (cur >= 0) cudaSetDevice(cur);
    } else if (x->dev && !x->keep_dev) {
        cudaFree(x->dev);
    }
    if (x->used) cudaEventDestroy(x->used); /* pending waits on it still hold */
    cudaGetLastError();
    memset(x, 0, sizeof *x);
}

_Static_assert(EPX__XH_REF(2, 5) == EPX__HIER_REF(2, 5) && EPX__XH_REF_KIND(EPX__HIER_REF(3, 7)) == 3 &&
                   EPX__XH_REF_INDEX(EPX__HIER_REF(1, 123456789)) == 123456789,
               "src/xhost's kernels read src/hier's references");

/* The handle's chunks of the network step (src/hier's rule, from every rank's batch in the
 * dispatch's verdict: the same on every rank, which a rank that fails later still knows;
 * chunks only where forwarding can overlap NCCL), then its row plan (src/hier's, on the
 * host), the references uploaded on `stream` (idle). Local; fails for memory, or
 * EPX_ERR_INTERNAL when the plan does not add up. */
static epx_status_t epx__plan_build(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h, void *stream, epx__errbuf_t *err)
{
    epx__xh_plan_t *x = &h->xp;
    epx__hier_plan_t hp;
    epx__hier_moe_handle_plan(h->hh, &hp);
    h->chunks = epx__hier_call_chunks(&m->s, m->xh->ls > 1, hp.src_tokens, m->xh->nranks);
    /* Part-major: one exchange per part. */
    EPX__CHECK(epx__hier_xplan_build(m->hm, h->hh, false, h->chunks, &x->h, err));
    size_t bytes = sizeof(long long) * EPX__MAX(x->h.nref, (size_t)1);
    cudaError_t ce = cudaGetDevice(&x->device);
    if (ce == cudaSuccess) ce = cudaEventCreateWithFlags(&x->used, cudaEventDisableTiming);
    if (ce != cudaSuccess) {
        x->used = NULL;
        return epx__fail(err, EPX_ERR_CUDA, "the row plan's event: %s", cudaGetErrorString(ce));
    }
    /* Stream-ordered where the device has the allocator (so that freeing it never waits). */
    x->dev_async = true;
    ce = cudaMallocAsync((void **)&x->dev, bytes, (cudaStream_t)stream);
    if (ce == cudaErrorNotSupported) {
        cudaGetLastError();
        x->dev_async = false;
        ce = cudaMalloc((void **)&x->dev, bytes);
    }
    if (ce != cudaSuccess) {
        cudaGetLastError();
        x->dev = NULL;
        return epx__fail(err, EPX_ERR_NO_MEMORY, "the row plan in device memory (%zu bytes): %s", bytes,
                         cudaGetErrorString(ce));
    }
    /* From pageable memory: the call returns once the source was taken. */
    ce = cudaMemcpyAsync(x->dev, x->h.ref, sizeof(long long) * x->h.nref, cudaMemcpyHostToDevice, (cudaStream_t)stream);
    /* The upload is the plan's first use: its free (stream-ordered, on another stream) must
     * wait for it even when no call gets to enqueue anything along the plan (a failed
     * verdict frees the handle at once). Without the record the free leaves the memory. */
    cudaError_t re = cudaEventRecord(x->used, (cudaStream_t)stream);
    if (re != cudaSuccess) cudaEventDestroy(x->used), x->used = NULL;
    if (ce == cudaSuccess) ce = re;
    if (ce != cudaSuccess) return epx__fail(err, EPX_ERR_CUDA, "uploading the row plan: %s", cudaGetErrorString(ce));
    const int64_t *r = x->h.ref;
    x->d_gw = x->dev + (x->h.gw - r), x->d_fan = x->dev + (x->h.fan - r), x->d_out = x->dev + (x->h.out - r);
    x->d_c1 = x->dev + (x->h.c1 - r), x->d_home = x->dev + (x->h.home - r);
    x->d_first = x->dev + (x->h.first - r), x->d_tok = x->dev + (x->h.tok - r);
    if (x->h.ll) {
        x->d_tk = x->dev + (x->h.tk - r), x->d_rk = x->dev + (x->h.rk - r), x->d_prow = x->dev + (x->h.prow - r);
        x->d_pslot = x->dev + (x->h.pslot - r), x->d_psrc = x->dev + (x->h.psrc - r);
        x->d_count = x->dev + (x->h.count - r);
    }
    return EPX_SUCCESS;
}

static epx_status_t epx__launched(int ce, const char *what, epx__errbuf_t *err)
{
    if (ce == cudaSuccess) return EPX_SUCCESS;
    return epx__fail(err, EPX_ERR_CUDA, "%s: %s", what, cudaGetErrorString((cudaError_t)ce));
}

/* One NCCL group along my rail, chunk c of a call's network step: scnt[p] records of `rec`
 * bytes from `send` to rank p and rcnt[p] from p into `recv`, segments back to back in rank
 * order; with them my status (whether my device failed before this point) to every rail
 * peer, theirs into chunk c's slots of m->stat. The stream that reads what arrives checks
 * those first (epx__peers_ok). */
static epx_status_t epx__post(epx__xhost_moe_t *m, int c, const char *send, const int64_t *scnt, char *recv,
                              const int64_t *rcnt, size_t rec, void *stream, epx__errbuf_t *err)
{
    epx__xhost_t *xh = m->xh;
    int P = epx__nccl_size(xh->nccl);
    const void **sp = xh->sp;
    void **rp = xh->rp;
    int64_t *sb = xh->sb, *rb = sb + P, so = 0, ro = 0;
    memset(sp, 0, sizeof *sp * (size_t)P), memset(rp, 0, sizeof *rp * (size_t)P);
    memset(sb, 0, sizeof *sb * 2 * (size_t)P);
    for (int p = 0; p < xh->nranks; p++) {
        if (!scnt[p] && !rcnt[p]) continue;
        int q = epx__xh_peer(xh, p);
        if (q < 0 || p == xh->rank)
            return epx__fail(err, EPX_ERR_INTERNAL, "MoE across hosts: rank %d is not on rank %d's rail", p, xh->rank);
        sp[q] = send + (size_t)so * rec, sb[q] = scnt[p] * (int64_t)rec;
        rp[q] = recv + (size_t)ro * rec, rb[q] = rcnt[p] * (int64_t)rec;
        so += scnt[p], ro += rcnt[p];
    }
    /* Statuses go to every rail peer, data or not, numbered: a rail peer whose status of
     * this group does not arrive (the group was cut short) counts as failed. */
    if (++m->seq == 0) m->seq = 1;
    m->chunk_seq[c] = m->seq;
    char *mine = epx__stat_mine(m, c), *theirs = epx__stat_theirs(m, c);
    EPX__CHECK(epx__cuda_status_out(xh->cuda, xh->rank, m->seq, mine, stream, err));
    return epx__nccl_post(xh->nccl, sp, sb, rp, rb, xh->rail, mine, theirs, EPX__CUDA_STATUS_BYTES, stream,
                          epx__deadline_after_ms(xh->timeout_ms), err);
}

/* Chunk c of the network step along x: a dispatch's records from S_GW to the gateways into
 * S_FWD, a combine's rows home likewise. */
static epx_status_t epx__post_chunk(epx__xhost_moe_t *m, const epx__xh_plan_t *x, bool combine, int c, size_t rec,
                                    void *stream, epx__errbuf_t *err)
{
    int R = m->xh->nranks;
    const int64_t *sc = combine ? x->h.home_send_chunk : x->h.gw_chunk;
    const int64_t *rc = combine ? x->h.home_recv_chunk : x->h.fwd_chunk;
    /* Chunk c starts after the earlier chunks' segments (hier.h). */
    return epx__post(m, c, m->stage[S_GW] + (size_t)epx__hier_part_at(sc, c * R) * rec, sc + (size_t)c * R,
                     m->stage[S_FWD] + (size_t)epx__hier_part_at(rc, c * R) * rec, rc + (size_t)c * R, rec, stream,
                     err);
}

/* After chunks [c, c + n) of epx__post, on the stream that reads what they brought: a peer
 * that had failed before it sent (or whose status never came) makes this rank's device
 * record EPX_ERR_PEER_FAILURE (its rows are incomplete), so that this rank fails too
 * instead of succeeding on them. */
static epx_status_t epx__peers_ok(epx__xhost_moe_t *m, int c, int n, void *stream, epx__errbuf_t *err)
{
    const epx__xhost_t *xh = m->xh;
    epx__cuda_status_slots_t rail = epx__xh_rail_slots(xh);
    for (int i = c; i < c + n; i++)
        EPX__CHECK(epx__cuda_status_check(xh->cuda, epx__stat_theirs(m, i), &rail, m->chunk_seq[i], stream, err));
    return EPX_SUCCESS;
}

/* Part `part` (src/hier/hier.h) of the intra-host exchange of a dispatch (!combine: the
 * fan-out) or of a combine (the rows back to their forwarders): byte counts and
 * displacements per local rank in m->lx, the part's segments in S_LSEND and S_LRECV. */
static epx__cpu_xfer_t epx__local_xfer(epx__xhost_moe_t *m, const epx__xh_plan_t *x, bool combine, int part,
                                       size_t rec)
{
    int LS = m->xh->ls;
    int64_t *sb = m->lx + (size_t)part * 4 * LS, *sd = sb + LS, *rb = sb + 2 * LS, *rd = sb + 3 * LS;
    const int64_t *sc = (combine ? x->h.back_send : x->h.fan_send) + part * LS;
    const int64_t *rc = (combine ? x->h.back_recv : x->h.fan_recv) + part * LS;
    int64_t so = epx__hier_part_at(combine ? x->h.n_back_send : x->h.n_fan, part);
    int64_t ro = epx__hier_part_at(combine ? x->h.n_back_recv : x->h.n_lrecv, part);
    so *= (int64_t)rec, ro *= (int64_t)rec;
    for (int l = 0; l < LS; l++) {
        sb[l] = sc[l] * (int64_t)rec, sd[l] = so, so += sb[l];
        rb[l] = rc[l] * (int64_t)rec, rd[l] = ro, ro += rb[l];
    }
    return (epx__cpu_xfer_t){m->stage[S_LSEND], sb, sd, m->stage[S_LRECV], rb, rd};
}

/* Record sizes: a dispatch row and its scales (high-throughput: a row of the dtype and, for
 * FP8, float32 scales; low-latency: the e4m3 row and its scales with ll_fp8, else a row of
 * the dtype), a combine row (and top-k weights); each part starts 16-byte aligned. */
static size_t epx__drec(const epx__moe_shape_t *s, size_t *rb, size_t *sb)
{
    if (s->mode == EPX_MOE_LOW_LATENCY) {
        *rb = s->ll_fp8 ? (size_t)s->hidden : s->row_bytes;
        *sb = s->ll_fp8 ? s->scale_cols * (s->scale_format == EPX_SCALE_UE8M0 ? 1 : sizeof(float)) : 0;
    } else {
        *rb = s->row_bytes;
        *sb = s->dtype == EPX_FP8_E4M3 ? s->scale_cols * sizeof(float) : 0;
    }
    return EPX__ALIGN_UP(*rb, 16) + EPX__ALIGN_UP(*sb, 16);
}

static size_t epx__crec(const epx__moe_shape_t *s, int K, bool has_w)
{
    return EPX__ALIGN_UP(s->combine_row_bytes, 16) + (has_w ? EPX__ALIGN_UP(sizeof(float) * (size_t)K, 16) : 0);
}

/* The part of the intra-host exchange that runs i-th (of 1 + chunks): a dispatch sends the
 * local ranks' own tokens while the NCCL step runs, then each chunk's forwarded ones once
 * that chunk has crossed; a combine sends first, chunk by chunk, the rows the forwarders
 * send on over NCCL (each chunk's NCCL group follows its part), then, while NCCL runs,
 * those that are then home. */
static int epx__part_order(bool combine, int i, int chunks)
{
    if (!combine) return i;
    return i < chunks ? EPX__HIER_REMOTE + i : EPX__HIER_LOCAL;
}

/* Everything a dispatch or a combine along h may fail on before it moves anything: the
 * staging, and the intra-host exchange's host rounds and mappings (this host's ranks make
 * them whatever their verdicts). Then every rank's verdict (one bootstrap round). `ready`
 * is this rank's status so far; unless a success, h's row plan may hold nothing. */
static epx_status_t epx__ready(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h, bool combine, bool has_w,
                               epx_status_t ready, void *stream, epx__cuda_a2a_t **plan, epx__errbuf_t *err)
{
    *plan = NULL;
    const epx__xh_plan_t *x = &h->xp;
    size_t rb, sb, rec = combine ? epx__crec(&m->s, x->h.K, has_w) : epx__drec(&m->s, &rb, &sb);
    if (ready == EPX_SUCCESS) {
        size_t need[S_N];
        need[S_GW] = (size_t)(combine ? x->h.n_home_send : x->h.n_gw) * rec;
        need[S_FWD] = (size_t)(combine ? x->h.n_home_recv : x->h.n_fwd) * rec;
        const int64_t *ns = combine ? x->h.n_back_send : x->h.n_fan, *nr = combine ? x->h.n_back_recv : x->h.n_lrecv;
        need[S_LSEND] = (size_t)epx__hier_part_at(ns, x->h.parts) * rec;
        need[S_LRECV] = (size_t)epx__hier_part_at(nr, x->h.parts) * rec;
        need[S_Q] = !combine && m->s.mode == EPX_MOE_LOW_LATENCY && m->s.ll_fp8 ? (size_t)x->h.T * rec : 0;
        for (int b = 0; b < S_N && ready == EPX_SUCCESS; b++) ready = epx__stage(m, b, need[b], err);
    }
    if (m->xh->ls > 1) {
        /* Every part, in the order they run (epx__part_order); the plan keeps the pointers
         * (epx__cuda_a2a_enqueue reads them later): not on the stack. A failed rank (its row
         * plan may hold nothing) takes part with as many as the others: h->chunks, the
         * same on every rank, gives every plan's parts. */
        int NP = 1 + h->chunks;
        const epx__cpu_xfer_t *ops[EPX__HIER_MAX_PARTS];
        memset(m->lxf, 0, sizeof m->lxf);
        for (int i = 0; i < NP; i++) {
            int part = epx__part_order(combine, i, NP - 1);
            if (ready == EPX_SUCCESS) m->lxf[part] = epx__local_xfer(m, x, combine, part, rec);
            ops[i] = &m->lxf[part];
        }
        ready = epx__cuda_a2a_prepare(m->xh->cuda, ops, NP, ready, stream, plan, err);
    }
    epx_status_t st = epx__xh_vote(m->xh, ready, combine ? "could not prepare its part of the combine; nothing was written"
                                                         : "could not prepare its part of the dispatch; nothing was written",
                                   err);
    if (st != EPX_SUCCESS) {
        epx__cuda_a2a_free(*plan);
        *plan = NULL;
    }
    return st;
}

/* A dispatch's network step along x on m->side, after what `stream` has so far (fork):
 * chunk by chunk, each chunk's group, then m->ev[c] (what `stream` waits for before it
 * forwards that chunk). `join` is recorded on m->side whatever happens (a failed post may
 * still have enqueued work there), and `stream` must then wait for it (epx__join, on every
 * path) before the call ends. */
static epx_status_t epx__post_side(epx__xhost_moe_t *m, const epx__xh_plan_t *x, size_t rec, void *stream,
                                   epx__errbuf_t *err)
{
    cudaError_t ce = cudaEventRecord(m->fork, (cudaStream_t)stream);
    if (ce == cudaSuccess) ce = cudaStreamWaitEvent(m->side, m->fork, 0);
    epx_status_t st = epx__launched(ce, "starting the NCCL step on its stream", err);
    for (int c = 0; c < x->h.chunks && st == EPX_SUCCESS; c++) {
        st = epx__post_chunk(m, x, false, c, rec, m->side, err);
        if (st == EPX_SUCCESS) st = epx__launched(cudaEventRecord(m->ev[c], m->side), "marking an NCCL chunk", err);
    }
    ce = cudaEventRecord(m->join, m->side);
    return st != EPX_SUCCESS ? st : epx__launched(ce, "ending the NCCL step on its stream", err);
}

/* Make `stream` wait for the NCCL step on m->side, whatever `st` (how enqueueing went since:
 * its failure is returned first), so that m->done also covers it; then the peers' statuses
 * of chunks [c, c + n) (epx__peers_ok). */
static epx_status_t epx__join(epx__xhost_moe_t *m, epx_status_t st, int c, int n, void *stream, epx__errbuf_t *err)
{
    cudaError_t ce = cudaStreamWaitEvent((cudaStream_t)stream, m->join, 0);
    EPX__CHECK(st);
    EPX__CHECK(epx__launched(ce, "joining the NCCL step", err));
    return n > 0 ? epx__peers_ok(m, c, n, stream, err) : EPX_SUCCESS;
}

/* The n records of g from its at-th on (references and destination rows alike). */
static epx__xh_gather_t epx__gather_from(const epx__xh_gather_t *g, int64_t at, int64_t n)
{
    epx__xh_gather_t p = *g;
    p.ref += at, p.n = (long long)n, p.row += at * p.row_stride;
    if (p.aux) p.aux += at * p.aux_stride;
    return p;
}

/* Part `part` (src/hier/hier.h) of the intra-host exchange along x, the plan's i-th: its
 * records gathered by g (g->ref the parts' references back to back, n[] their counts, into
 * S_LSEND) at the part's offset, then the exchange enqueued. */
static epx_status_t epx__local_part(epx__xhost_moe_t *m, const epx__xh_gather_t *g, const int64_t *n, int part,
                                    const epx__cuda_a2a_t *plan, int i, void *stream, epx__errbuf_t *err)
{
    epx__xh_gather_t p = epx__gather_from(g, epx__hier_part_at(n, part), n[part]);
    EPX__CHECK(epx__launched(epx__xh_launch_gather(&p, epx__blocks(m), stream), "packing rows for the local ranks",
                             err));
    return epx__cuda_a2a_enqueue(m->xh->cuda, plan, i, stream, err);
}

/* Enqueue the rows of a dispatch along x: xr / xs my rows and their scales (xs NULL unless
 * the dtype has them; low-latency FP8: xr bf16, quantised here first), into place:
 * high-throughput (ll NULL) recv_x / recv_xs in row order; low-latency the slots of ll,
 * their sources and counts. Only CUDA or NCCL calls fail here. */
static epx_status_t epx__rows_enqueue(epx__xhost_moe_t *m, const epx__xh_plan_t *x, const void *xr, const float *xs,
                                      void *recv_x, float *recv_xs, const epx_moe_ll_dispatch_out_t *ll,
                                      const epx__cuda_a2a_t *plan, void *stream, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    size_t rb, sb, rec = epx__drec(s, &rb, &sb), ao = EPX__ALIGN_UP(rb, 16);
    /* Scales travel whenever the dtype has them: a rank without tokens may pass no x_scales
     * and still forward and receive other ranks' rows (and their scales). */
    bool sc = sb > 0, quant = ll && s->ll_fp8;
    int blocks = epx__blocks(m);
    epx__xh_src_t src;
    memset(&src, 0, sizeof src);
    src.row[K_X] = quant ? m->stage[S_Q] : (const char *)xr, src.row_stride[K_X] = (long long)(quant ? rec : rb);
    src.aux[K_X] = !sc ? NULL : quant ? m->stage[S_Q] + ao : (const char *)xs;
    src.aux_stride[K_X] = (long long)(quant ? rec : sb);
    src.row[K_FWD] = m->stage[S_FWD], src.row_stride[K_FWD] = (long long)rec;
    src.aux[K_FWD] = sc ? m->stage[S_FWD] + ao : NULL, src.aux_stride[K_FWD] = (long long)rec;
    src.row[K_LRECV] = m->stage[S_LRECV], src.row_stride[K_LRECV] = (long long)rec;
    src.aux[K_LRECV] = sc ? m->stage[S_LRECV] + ao : NULL, src.aux_stride[K_LRECV] = (long long)rec;
    /* 0. Low-latency FP8: each of my tokens quantised once, into records in S_Q. */
    if (quant) {
        epx__xh_quant_t q = {(const unsigned short *)xr, x->h.T, s->hidden, s->scale_format == EPX_SCALE_UE8M0,
                             m->stage[S_Q], (long long)rec, (long long)ao};
        EPX__CHECK(epx__launched(epx__xh_launch_quantize(&q, blocks, stream), "quantising the rows to FP8", err));
    }
    /* 1. My rows for each other host, packed, then along the rail to my gateways there. */
    epx__xh_gather_t g = {src, x->d_gw, x->h.n_gw, m->stage[S_GW], (long long)rec, (long long)rb,
                          sc ? m->stage[S_GW] + ao : NULL, (long long)rec, (long long)sb};
    EPX__CHECK(epx__launched(epx__xh_launch_gather(&g, blocks, stream), "packing rows for the gateways", err));
    int C = x->h.chunks;
    if (!plan) {
        for (int c = 0; c < C; c++) EPX__CHECK(epx__post_chunk(m, x, false, c, rec, stream, err));
        EPX__CHECK(epx__peers_ok(m, 0, C, stream, err));
    } else {
        /* 2. The rows each other local rank needs, over CUDA IPC: the local ranks' own tokens
         * while NCCL runs on the side stream, then (as gateway) each chunk of what NCCL
         * brings once it is here, while the next one crosses. */
        epx_status_t st = epx__post_side(m, x, rec, stream, err);
        g = (epx__xh_gather_t){src, x->d_fan, 0, m->stage[S_LSEND], (long long)rec, (long long)rb,
                               sc ? m->stage[S_LSEND] + ao : NULL, (long long)rec, (long long)sb};
        if (st == EPX_SUCCESS) st = epx__local_part(m, &g, x->h.n_fan, EPX__HIER_LOCAL, plan, 0, stream, err);
        for (int c = 0; c < C && st == EPX_SUCCESS; c++) {
            st = epx__launched(cudaStreamWaitEvent((cudaStream_t)stream, m->ev[c], 0), "waiting for an NCCL chunk", err);
            if (st == EPX_SUCCESS) st = epx__peers_ok(m, c, 1, stream, err);
            if (st == EPX_SUCCESS) st = epx__local_part(m, &g, x->h.n_fan, EPX__HIER_REMOTE + c, plan, 1 + c, stream, err);
        }
        EPX__CHECK(epx__join(m, st, 0, 0, stream, err));
    }
    /* 3. Every row into place: in (source rank, token) order, or into the slots of its
     * experts here (sources ascending, tokens ascending), with the slots' sources and counts. */
    if (!ll) {
        g = (epx__xh_gather_t){src, x->d_out, x->h.rows, recv_x, (long long)rb, (long long)rb,
                               sc && recv_xs ? (char *)recv_xs : NULL, (long long)sb, (long long)sb};
        return epx__launched(epx__xh_launch_gather(&g, blocks, stream), "placing the received rows", err);
    }
    epx__xh_place_t p;
    memset(&p, 0, sizeof p);
    p.g = (epx__xh_gather_t){src, x->d_out, x->h.n_place, ll->recv_x, (long long)rb, (long long)rb,
                             sc ? ll->recv_x_scales : NULL, (long long)sb, (long long)sb};
    p.row = x->d_prow, p.slot = x->d_pslot, p.src = x->d_psrc, p.count = x->d_count;
    p.L = s->local_experts, p.slots = (long long)s->ll_slots;
    p.recv_count = ll->recv_count, p.src_rank = ll->recv_src_rank, p.src_token = ll->recv_src_token;
    return epx__launched(epx__xh_launch_place(&p, blocks, stream), "placing the received rows in their slots", err);
}

/* Steps 1 and 2 of a combine along x (the rows go home unreduced): my rows back to the local
 * ranks that forwarded them (CUDA IPC: first those of tokens from other hosts, which their
 * forwarders send on; the others while NCCL runs), and, as gateway, the rows of my sources
 * on other hosts home as they are (NCCL, on the side stream when there are local ranks).
 * y holds the expert outputs, w (NULL: none travel) their top-k weights [rows, K]. *src
 * says where every row of the home reduction lies. Only CUDA or NCCL calls fail here. */
static epx_status_t epx__rows_home(epx__xhost_moe_t *m, const epx__xh_plan_t *x, const void *y, const float *w,
                                   const epx__cuda_a2a_t *plan, void *stream, epx__xh_src_t *src, epx__errbuf_t *err)
{
    bool has_w = w != NULL;
    size_t crow = m->s.combine_row_bytes, rec = epx__crec(&m->s, x->h.K, has_w), ao = EPX__ALIGN_UP(crow, 16);
    size_t wb = sizeof(float) * (size_t)x->h.K;
    int blocks = epx__blocks(m);
    memset(src, 0, sizeof *src);
    src->row[K_Y] = y, src->row_stride[K_Y] = (long long)crow;
    src->aux[K_Y] = (const char *)w, src->aux_stride[K_Y] = (long long)wb;
    src->row[K_C1] = m->stage[S_LRECV], src->row_stride[K_C1] = (long long)rec;
    src->aux[K_C1] = has_w ? m->stage[S_LRECV] + ao : NULL, src->aux_stride[K_C1] = (long long)rec;
    src->row[K_HOME] = m->stage[S_FWD], src->row_stride[K_HOME] = (long long)rec;
    src->aux[K_HOME] = has_w ? m->stage[S_FWD] + ao : NULL, src->aux_stride[K_HOME] = (long long)rec;
    epx__xh_gather_t c1 = {*src, x->d_c1, 0, m->stage[S_LSEND], (long long)rec, (long long)crow,
                           has_w ? m->stage[S_LSEND] + ao : NULL, (long long)rec, (long long)wb};
    epx__xh_gather_t g = {*src, x->d_home, x->h.n_home_send, m->stage[S_GW], (long long)rec, (long long)crow,
                          has_w ? m->stage[S_GW] + ao : NULL, (long long)rec, (long long)wb};
    int C = x->h.chunks, R = m->xh->nranks;
    if (!plan) { /* no local ranks: as gateway, the rows of my sources on other hosts home (NCCL) */
        EPX__CHECK(epx__launched(epx__xh_launch_gather(&g, blocks, stream), "packing rows to send home", err));
        for (int c = 0; c < C; c++) EPX__CHECK(epx__post_chunk(m, x, true, c, rec, stream, err));
        return epx__peers_ok(m, 0, C, stream, err);
    }
    /* Chunk by chunk: 1. my rows of that chunk's tokens from other hosts back to the local
     * ranks that forwarded them (CUDA IPC); 2. once they are here, on the side stream, as
     * gateway, that chunk's rows of my sources on other hosts home as they are (NCCL), while
     * the next chunk goes back. Then, while NCCL runs, my rows of this host's tokens back. */
    epx_status_t st = EPX_SUCCESS;
    for (int c = 0; c < C && st == EPX_SUCCESS; c++) {
        st = epx__local_part(m, &c1, x->h.n_back_send, EPX__HIER_REMOTE + c, plan, c, stream, err);
        if (st == EPX_SUCCESS) {
            cudaError_t ce = cudaEventRecord(m->ev[c], (cudaStream_t)stream);
            if (ce == cudaSuccess) ce = cudaStreamWaitEvent(m->side, m->ev[c], 0);
            st = epx__launched(ce, "handing a chunk to the NCCL stream", err);
        }
        if (st == EPX_SUCCESS) {
            int64_t at = epx__hier_part_at(x->h.home_send_chunk, c * R);
            epx__xh_gather_t gc = epx__gather_from(&g, at, epx__hier_part_at(x->h.home_send_chunk, (c + 1) * R) - at);
            st = epx__launched(epx__xh_launch_gather(&gc, blocks, m->side), "packing rows to send home", err);
        }
        if (st == EPX_SUCCESS) st = epx__post_chunk(m, x, true, c, rec, m->side, err);
    }
    cudaError_t ce = cudaEventRecord(m->join, m->side); /* whatever happened: epx__join waits */
    if (st == EPX_SUCCESS) st = epx__launched(ce, "ending the NCCL step on its stream", err);
    if (st == EPX_SUCCESS) st = epx__local_part(m, &c1, x->h.n_back_send, EPX__HIER_LOCAL, plan, C, stream, err);
    return epx__join(m, st, 0, C, stream, err);
}

/* The end of a call that enqueued work along plan x (all of it, or part: `st` is how the
 * enqueueing went): later calls wait for it (m->done), whatever their stream, and so does
 * the plan's free (x->used); the intra-host exchange `plan` is freed. On failure, with the
 * peers' operations posted, the NCCL link is aborted so that they fail instead of waiting.
 * Returns st, or the failure to record. */
static epx_status_t epx__call_end(epx__xhost_moe_t *m, const epx__xh_plan_t *x, epx__cuda_a2a_t *plan, epx_status_t st,
                                  void *stream, epx__errbuf_t *err)
{
    cudaError_t ce = cudaEventRecord(m->done, (cudaStream_t)stream);
    cudaError_t cu = cudaEventRecord(x->used, (cudaStream_t)stream);
    if (ce == cudaSuccess) ce = cu;
    if (st == EPX_SUCCESS && ce != cudaSuccess)
        st = epx__fail(err, EPX_ERR_CUDA, "recording the MoE call's end: %s", cudaGetErrorString(ce));
    epx__cuda_a2a_free(plan);
    if (st != EPX_SUCCESS) epx__nccl_abort(m->xh->nccl);
    return st;
}

/* The same for a dispatch, which also hands out its handle h: on failure h is freed (its
 * plan memory left, as the stream may still read it). */
static epx_status_t epx__dispatch_end(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h, epx__cuda_a2a_t *plan,
                                      epx_status_t st, void *stream, epx__xhost_moe_handle_t **handle,
                                      epx__errbuf_t *err)
{
    st = epx__call_end(m, &h->xp, plan, st, stream, err);
    if (st != EPX_SUCCESS) {
        h->xp.keep_dev = true;
        epx__xhost_moe_handle_free(m, h);
        return st;
    }
    *handle = h;
    return EPX_SUCCESS;
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
        epx__xhost_moe_handle_free(m, h);
        return st;
    }
    if (skip) { /* as the CUDA backend's device check: counts -1, nothing else written */
        static const int64_t minus1 = -1;
        if (h) h->bad = true, h->n = 0, h->shown = -1;
        out->num_recv_tokens = -1;
        epx__h2d(out->num_recv_tokens_device, &minus1, sizeof minus1, stream, &st, err);
        if (st != EPX_SUCCESS) {
            epx__xhost_moe_handle_free(m, h);
            return st;
        }
        *handle = h;
        return EPX_SUCCESS;
    }
    if (local == EPX_SUCCESS && bad) local = EPX_ERR_INVALID_ARGUMENT; /* err names the token */
    size_t isz = epx_dtype_size(s->index_dtype);
    bool has_w = local == EPX_SUCCESS && in->topk_weights;
    /* 1. The plan, on the host (src/hier's, with the routing records alone: no rows): the
     * verdict of every rank, the routing outputs (into host mirrors), the handle. */
    epx_moe_dispatch_in_t hin = {0};
    epx_moe_dispatch_out_t hout = {0};
    if (local == EPX_SUCCESS) {
        epx_status_t ls = EPX_SUCCESS;
        int64_t cap = out->capacity;
        hin = (epx_moe_dispatch_in_t){NULL, NULL, ids,
                                      has_w ? epx__hb(m, B_W, sizeof(float) * (size_t)T * (size_t)K, &ls, err) : NULL,
                                      T, K};
        hout.recv_topk_idx = out->recv_topk_idx ? epx__hb(m, B_RIDX, (size_t)cap * (size_t)K * isz, &ls, err) : NULL;
        hout.recv_topk_weights =
            has_w && out->recv_topk_weights ? epx__hb(m, B_RW, (size_t)cap * (size_t)K * 4, &ls, err) : NULL;
        hout.recv_src_rank = out->recv_src_rank ? epx__hb(m, B_SR, (size_t)cap * 4, &ls, err) : NULL;
        hout.recv_src_token = out->recv_src_token ? epx__hb(m, B_ST, (size_t)cap * 4, &ls, err) : NULL;
        hout.num_recv_tokens_per_expert =
            out->num_recv_tokens_per_expert ? epx__hb(m, B_PE, (size_t)s->local_experts * 4, &ls, err) : NULL;
        hout.capacity = cap;
        if (ls == EPX_SUCCESS && has_w)
            ls = epx__d2h((void *)hin.topk_weights, in->topk_weights, sizeof(float) * (size_t)T * (size_t)K, err);
        local = ls;
    }
    epx__hier_moe_handle_t *hh = NULL;
    epx__fault_count(m);
    st = epx__hier_moe_dispatch_plan(m->hm, &hin, &hout, local, &hh, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(m, h);
        return st;
    }
    int64_t N = hout.num_recv_tokens;
    size_t n = (size_t)N;
    h->hh = hh, h->n = N, h->shown = nosync ? -1 : N;
    /* 2. The plan on the device; staging; the intra-host exchange prepared; every rank's verdict. */
    epx__cuda_a2a_t *plan = NULL;
    st = epx__ready(m, h, false, false, epx__plan_build(m, h, stream, err), stream, &plan, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(m, h);
        return st;
    }
    /* 3. Enqueue: the routing outputs (the stream is idle: these copies return at once),
     * then the rows. A failure now, with peers' operations posted, aborts the NCCL link. */
    st = epx__xh_fault_enqueue(m->xh, stream, err);
    epx__h2d(out->recv_topk_idx, hout.recv_topk_idx, n * (size_t)K * isz, stream, &st, err);
    epx__h2d(out->recv_topk_weights, hout.recv_topk_weights, n * (size_t)K * 4, stream, &st, err);
    epx__h2d(out->recv_src_rank, hout.recv_src_rank, n * 4, stream, &st, err);
    epx__h2d(out->recv_src_token, hout.recv_src_token, n * 4, stream, &st, err);
    epx__h2d(out->num_recv_tokens_per_expert, hout.num_recv_tokens_per_expert, (size_t)s->local_experts * 4, stream,
             &st, err);
    epx__h2d(out->num_recv_tokens_device, &N, sizeof N, stream, &st, err);
    if (st == EPX_SUCCESS)
        st = epx__rows_enqueue(m, &h->xp, in->x, s->dtype == EPX_FP8_E4M3 ? in->x_scales : NULL, out->recv_x,
                               out->recv_x_scales, NULL, plan, stream, err);
    st = epx__dispatch_end(m, h, plan, st, stream, handle, err);
    if (st == EPX_SUCCESS) out->num_recv_tokens = h->shown;
    return st;
}

epx_status_t epx__xhost_moe_dispatch_cached(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h,
                                            const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                            epx_status_t local, void *stream, epx__errbuf_t *err)
{
    bool skip = false;
    EPX__CHECK(epx__pre_handle(m, h, &local, stream, &skip, err));
    if (skip) return EPX_SUCCESS;
    bool ok = local == EPX_SUCCESS;
    epx__fault_count(m);
    EPX__CHECK(epx__hier_moe_agree(m->hm, ok ? h->hh : NULL, false, false, local, err));
    epx__cuda_a2a_t *plan = NULL;
    EPX__CHECK(epx__ready(m, h, false, false, EPX_SUCCESS, stream, &plan, err));
    epx_status_t st = epx__xh_fault_enqueue(m->xh, stream, err);
    if (st == EPX_SUCCESS)
        st = epx__rows_enqueue(m, &h->xp, in->x, m->s.dtype == EPX_FP8_E4M3 ? in->x_scales : NULL, out->recv_x,
                               out->recv_x_scales, NULL, plan, stream, err);
    return epx__call_end(m, &h->xp, plan, st, stream, err);
}

epx_status_t epx__xhost_moe_combine(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h,
                                    const epx_moe_combine_in_t *in, epx_moe_combine_out_t *out, epx_status_t local,
                                    void *stream, epx__errbuf_t *err)
{
    const epx__moe_shape_t *s = &m->s;
    bool skip = false;
    EPX__CHECK(epx__pre_handle(m, h, &local, stream, &skip, err));
    if (skip) return EPX_SUCCESS;
    bool ok = local == EPX_SUCCESS, has_w = ok && in->topk_weights;
    epx__fault_count(m);
    EPX__CHECK(epx__hier_moe_agree(m->hm, ok ? h->hh : NULL, true, has_w, local, err));
    const epx__xh_plan_t *x = &h->xp;
    epx__cuda_a2a_t *plan = NULL;
    EPX__CHECK(epx__ready(m, h, true, has_w, EPX_SUCCESS, stream, &plan, err));
    epx_status_t st = epx__xh_fault_enqueue(m->xh, stream, err);
    epx__xh_src_t src;
    if (st == EPX_SUCCESS) st = epx__rows_home(m, x, in->y, has_w ? in->topk_weights : NULL, plan, stream, &src, err);
    /* 3. At home: every token's rows summed in ascending rank order, as on one host. */
    if (st == EPX_SUCCESS) {
        epx__xh_reduce_t r = {src, x->d_first, x->d_tok, x->h.T, x->h.K, s->hidden, (int)s->combine_dtype, out->out,
                              out->out_topk_weights, NULL, NULL, NULL};
        st = epx__launched(epx__xh_launch_reduce(&r, epx__blocks(m), stream), "reducing at home", err);
    }
    return epx__call_end(m, x, plan, st, stream, err);
}

/* ---- Low-latency on the device ----------------------------------------------------------------
 * No plan, no read-back, nothing waited for on the host: src/cuda's low-latency kernels run
 * over this host's ranks with every rank of every host as a source (cuda.h, "Low-latency
 * across hosts"), and NCCL moves fixed-size blocks along the rails between their steps.
 * Per call one bootstrap round agrees on the call (its kind, top-k, and for a combine its
 * dispatch) and on every rank's status; src/cuda's round among this host's ranks follows.
 * After the first, a failure aborts the NCCL link (the peers' transfers fail instead of
 * waiting). A block that does not come (a transfer cut short) or comes from a failed peer
 * fails the receiving rank's device, which relays it inside its host, as statuses do on the
 * host path.
 *
 * So a call can be captured in a CUDA graph: its rounds run at capture time, and its
 * kernels number their steps on the device. A replay is timed by no call: the kernels on
 * either side of each NCCL step write their sequence into host-mapped marks (xh->marks),
 * which the NCCL watchdog reads (epx__xh_watch_stall).
 *
 * Bytes per GPU and direction, M = max_tokens: a dispatch sends its whole block (header,
 * M records) to every rail peer, needed or not (a token reaches a given other host with
 * p = 0.9965 at 2 hosts, K = 8: almost always; 1/p more than needed: 1.5x at 8 hosts); a
 * combine sends each rail peer M * K rows, of which only those of its tokens' experts on
 * this host are written and needed (1/N of them with N hosts): N times the bytes needed.
 * At T = M = 128, H = 7168, K = 8, 2 hosts of 1: dispatch 0.95 MB FP8 (0.94 needed),
 * combine 14.7 MB BF16 (7.34 needed). The fixed sizes keep the host out (docs/SCALING.md,
 * "Low latency across hosts on the device"); EPX_MOE_LL_HOST=1 moves only what is needed.
 * Inside a host the forward kernel pushes each record over NVLink to the local ranks that
 * hold its experts, as a local source does. */

enum { EPX__LLOP_DISPATCH = 1, EPX__LLOP_COMBINE = 2 };

/* The call's round: every rank's status, kind (split or whole, captured or not), top-k and dispatch number. A
 * rank that failed makes the others fail with EPX_ERR_REMOTE_INVALID (itself: its own
 * error); a call that differs, EPX_ERR_MISMATCH everywhere (a split combine moves its rows
 * in its receive, a whole one at once: their NCCL steps would not meet). */
static epx_status_t epx__ll_round(epx__xhost_moe_t *m, int op, bool split, int topk, uint32_t id, epx_status_t local,
                                  void *stream, epx__errbuf_t *err)
{
    epx__xhost_t *xh = m->xh;
    if (epx__xh_take_count(xh)) topk++; /* EPX_FAULT count */
    if (split) op |= 4;
    if (epx__cuda_capturing(stream)) op |= 8; /* NCCL's transfers are captured on every rank or none */
    int64_t mine[4] = {local, op, topk, id}, *all = malloc(sizeof mine * (size_t)xh->nranks);
    if (!all && local == EPX_SUCCESS) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (!all) return epx__xh_allgather_fail(xh, local, sizeof mine, err);
    epx_status_t st = epx__xh_allgather(xh, mine, all, sizeof mine, err);
    if (st == EPX_SUCCESS) st = local;
    for (int p = 0; p < xh->nranks && st == EPX_SUCCESS; p++)
        if (all[4 * p] != EPX_SUCCESS)
            st = epx__fail(err, EPX_ERR_REMOTE_INVALID, "rank %d failed its low-latency call (%s)", p,
                           epx_status_name((epx_status_t)all[4 * p]));
    for (int p = 0; p < xh->nranks && st == EPX_SUCCESS; p++)
        if (all[4 * p + 1] != op || all[4 * p + 2] != topk || all[4 * p + 3] != (int64_t)id)
            st = epx__fail(err, EPX_ERR_MISMATCH,
                           "rank %d made another low-latency call (split or whole, top-k, captured in a CUDA "
                           "graph or not, or combined another dispatch) than rank %d",
                           p, xh->rank);
    free(all);
    return st;
}

/* Along my rail: `bytes` from out (+ the peer's host * stride, or the same block to every
 * peer when stride is 0) to each rail peer, theirs into in + their host * bytes_stride. */
static epx_status_t epx__ll_post(epx__xhost_moe_t *m, const char *out, long long stride, char *in, long long in_stride,
                                 long long bytes, void *stream, epx__errbuf_t *err)
{
    epx__xhost_t *xh = m->xh;
    int P = epx__nccl_size(xh->nccl);
    int64_t *sb = xh->sb, *rb = sb + P;
    memset(xh->sp, 0, sizeof *xh->sp * (size_t)P), memset(xh->rp, 0, sizeof *xh->rp * (size_t)P);
    memset(sb, 0, sizeof *sb * 2 * (size_t)P);
    for (int i = 0; i < xh->num_hosts - 1; i++) {
        int hp = epx__xh_rail_host(xh, i), q = epx__xh_peer(xh, hp * xh->ls + xh->lrank);
        xh->sp[q] = out + (size_t)hp * (size_t)stride, sb[q] = bytes;
        xh->rp[q] = in + (size_t)hp * (size_t)in_stride, rb[q] = bytes;
    }
    return epx__nccl_post(xh->nccl, xh->sp, sb, xh->rp, rb, xh->rail, NULL, NULL, 0, stream,
                          epx__deadline_after_ms(xh->timeout_ms), err);
}

/* The y blocks' size for a combine of top-k K: the header, then [max_tokens, K] rows. */
static long long epx__ll_ybytes(const epx__xhost_moe_t *m, int K)
{
    return 128 + (long long)EPX__MAX(m->s.max_tokens, 1) * K * (long long)m->s.combine_row_bytes;
}

/* The end of a call that may have enqueued work: later calls wait for it (m->done; not
 * in a CUDA graph, epx__after_last); on failure after the round the NCCL link is aborted. */
static epx_status_t epx__ll_end(epx__xhost_moe_t *m, epx_status_t st, void *stream, epx__errbuf_t *err)
{
    cudaError_t ce = epx__cuda_capturing(stream) ? cudaSuccess : cudaEventRecord(m->done, (cudaStream_t)stream);
    if (st == EPX_SUCCESS && ce != cudaSuccess)
        st = epx__fail(err, EPX_ERR_CUDA, "recording the MoE call's end: %s", cudaGetErrorString(ce));
    if (st != EPX_SUCCESS) epx__nccl_abort(m->xh->nccl);
    return st;
}

/* The combine's receive steps on h: the gather, the rows home, the sum. */
static epx_status_t epx__ll_combine_recv(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h, void *stream,
                                         epx__errbuf_t *err)
{
    long long yb = epx__ll_ybytes(m, epx__cuda_moe_handle_topk(h->ch));
    EPX__CHECK(epx__cuda_moe_ll_gather(m->ll, h->ch, stream, err));
    EPX__CHECK(epx__ll_post(m, m->rails.y_out, m->rails.yblk, (char *)m->rails.y_in, m->rails.yblk, yb, stream, err));
    return epx__cuda_moe_ll_recv(m->ll, h->ch, true, stream, err);
}

static epx_status_t epx__ll_dispatch_dev(epx__xhost_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                         epx_moe_ll_dispatch_out_t *out, epx_status_t local, bool split,
                                         epx__xhost_moe_handle_t **handle, void *stream, epx__errbuf_t *err)
{
    if (local == EPX_SUCCESS) local = epx__xh_live(m->xh, err);
    if (local == EPX_SUCCESS) local = epx__after_last(m, stream, err);
    /* The src/cuda handle's device memory now: its lack is this rank's verdict in the round
     * (after it, a failure aborts the NCCL link and breaks every host). */
    if (local == EPX_SUCCESS) local = epx__cuda_moe_reserve(m->ll, err);
    epx__xhost_moe_handle_t *h = epx__handle_new(local == EPX_SUCCESS ? in->num_tokens : 0, &local, err);
    uint32_t id = ++m->ll_calls;
    epx_status_t st =
        epx__ll_round(m, EPX__LLOP_DISPATCH, split, local == EPX_SUCCESS ? in->topk : 0, id, local, stream, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(m, h);
        return st;
    }
    h->ll_id = id;
    st = epx__xh_fault_enqueue(m->xh, stream, err);
    /* Its send (this host's round first: every local rank takes part, failed or not). */
    st = epx__cuda_moe_ll_dispatch(m->ll, in, out, st, true, &h->ch, stream, err);
    if (st == EPX_SUCCESS)
        st = epx__ll_post(m, m->rails.out, 0, (char *)m->rails.in, m->rails.blk, m->rails.blk, stream, err);
    if (st == EPX_SUCCESS) st = epx__cuda_moe_ll_forward(m->ll, h->ch, stream, err);
    if (st == EPX_SUCCESS && !split) st = epx__cuda_moe_ll_recv(m->ll, h->ch, false, stream, err);
    st = epx__ll_end(m, st, stream, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(m, h);
        return st;
    }
    *handle = h;
    return EPX_SUCCESS;
}

static epx_status_t epx__ll_combine_dev(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h,
                                        const epx_moe_ll_combine_in_t *in, void *out, epx_status_t local, bool split,
                                        void *stream, epx__errbuf_t *err)
{
    if (local == EPX_SUCCESS) local = epx__xh_live(m->xh, err);
    if (local == EPX_SUCCESS) local = epx__after_last(m, stream, err);
    bool ok = local == EPX_SUCCESS;
    EPX__CHECK(epx__ll_round(m, EPX__LLOP_COMBINE, split, ok ? epx__cuda_moe_handle_topk(h->ch) : 0, ok ? h->ll_id : 0,
                             local, stream, err));
    epx_status_t st = epx__xh_fault_enqueue(m->xh, stream, err);
    st = epx__cuda_moe_ll_combine(m->ll, ok ? h->ch : NULL, in, out, st, true, stream, err);
    if (st == EPX_SUCCESS && !split) st = epx__ll_combine_recv(m, h, stream, err);
    return epx__ll_end(m, st, stream, err);
}

epx_status_t epx__xhost_moe_ll_recv(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h, bool combine, void *stream,
                                    epx__errbuf_t *err)
{
    if (!m->ll) return EPX_SUCCESS; /* the host path moved everything in the send */
    epx_status_t st = epx__xh_live(m->xh, err);
    if (st == EPX_SUCCESS) st = epx__after_last(m, stream, err);
    if (st != EPX_SUCCESS) { /* nothing enqueued, but the peers' steps would wait for this one's */
        epx__nccl_abort(m->xh->nccl);
        return st;
    }
    st = combine ? epx__ll_combine_recv(m, h, stream, err) : epx__cuda_moe_ll_recv(m->ll, h->ch, false, stream, err);
    return epx__ll_end(m, st, stream, err);
}

/* ---- Low-latency: the plan on the host, the rows on the device ----------------------------- */

epx_status_t epx__xhost_moe_ll_dispatch(epx__xhost_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                        epx_moe_ll_dispatch_out_t *out, epx_status_t local, bool split,
                                        epx__xhost_moe_handle_t **handle, void *stream, epx__errbuf_t *err)
{
    if (m->ll) return epx__ll_dispatch_dev(m, in, out, local, split, handle, stream, err);
    const epx__moe_shape_t *s = &m->s;
    int T = local == EPX_SUCCESS ? in->num_tokens : 0, K = local == EPX_SUCCESS ? in->topk : 0, L = s->local_experts;
    bool bad = false, skip = false;
    int32_t *ids = NULL, *minus1 = NULL;
    if (local == EPX_SUCCESS) local = epx__routing(m, in->topk_idx, T, K, stream, &ids, &bad, err);
    /* The handle (and the counts of a skip) before the round: running out of memory is this
     * rank's verdict. */
    epx__xhost_moe_handle_t *h = epx__handle_new(T, &local, err);
    if (local == EPX_SUCCESS) minus1 = epx__hb(m, B_CNT, sizeof(int32_t) * (size_t)EPX__MAX(L, 1), &local, err);
    epx_status_t st = epx__pre(m, (bad ? EPX__PRE_BAD : 0) | EPX__PRE_NOSYNC, &local, &skip, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(m, h);
        return st;
    }
    if (skip) { /* as the CUDA backend's device check: counts -1, nothing else written; no rank failed */
        h->bad = true;
        for (int l = 0; l < L; l++) minus1[l] = -1;
        epx__h2d(out->recv_count, minus1, sizeof(int32_t) * (size_t)L, stream, &st, err);
        if (st == EPX_SUCCESS) st = epx__xh_sync(m->xh, stream, err); /* the mirror is reused */
        if (st != EPX_SUCCESS) {
            epx__xhost_moe_handle_free(m, h);
            return st;
        }
        *handle = h;
        return EPX_SUCCESS;
    }
    if (local == EPX_SUCCESS && bad) local = EPX_ERR_INVALID_ARGUMENT; /* err names the token */
    /* 1. The plan, on the host (src/hier's, with the routing records alone: no rows): the
     * verdict of every rank, the handle. */
    epx_moe_ll_dispatch_in_t hin = {NULL, ids, T, K};
    epx__hier_moe_handle_t *hh = NULL;
    epx__fault_count(m);
    st = epx__hier_moe_ll_dispatch_plan(m->hm, &hin, local, &hh, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(m, h);
        return st;
    }
    h->hh = hh;
    /* 2. The row plan on the device; staging; the intra-host exchange prepared; every rank's verdict. */
    epx__cuda_a2a_t *plan = NULL;
    st = epx__ready(m, h, false, false, epx__plan_build(m, h, stream, err), stream, &plan, err);
    if (st != EPX_SUCCESS) {
        epx__xhost_moe_handle_free(m, h);
        return st;
    }
    /* 3. Enqueue the rows (quantised first with FP8), then their slots, sources and counts.
     * A failure now, with peers' operations posted, aborts the NCCL link. */
    st = epx__xh_fault_enqueue(m->xh, stream, err);
    if (st == EPX_SUCCESS) st = epx__rows_enqueue(m, &h->xp, in->x, NULL, NULL, NULL, out, plan, stream, err);
    return epx__dispatch_end(m, h, plan, st, stream, handle, err);
}

epx_status_t epx__xhost_moe_ll_combine(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h,
                                       const epx_moe_ll_combine_in_t *in, void *out, epx_status_t local, bool split,
                                       void *stream, epx__errbuf_t *err)
{
    if (m->ll) return epx__ll_combine_dev(m, h, in, out, local, split, stream, err);
    const epx__moe_shape_t *s = &m->s;
    bool skip = false;
    EPX__CHECK(epx__pre_handle(m, h, &local, stream, &skip, err));
    if (skip) return EPX_SUCCESS;
    bool ok = local == EPX_SUCCESS;
    epx__fault_count(m);
    EPX__CHECK(epx__hier_moe_agree(m->hm, ok ? h->hh : NULL, true, false, local, err));
    const epx__xh_plan_t *x = &h->xp;
    epx__cuda_a2a_t *plan = NULL;
    EPX__CHECK(epx__ready(m, h, true, false, EPX_SUCCESS, stream, &plan, err));
    epx_status_t st = epx__xh_fault_enqueue(m->xh, stream, err);
    epx__xh_src_t src;
    if (st == EPX_SUCCESS) st = epx__rows_home(m, x, in->y, NULL, plan, stream, &src, err);
    /* 3. At home: out[t] = over the ranks ascending, each rank's sum of w[t, k] * the row of
     * expert k over its valid k ascending (epx.h). */
    if (st == EPX_SUCCESS) {
        epx__xh_reduce_t r = {src, x->d_first, x->d_tok, x->h.T, x->h.K, s->hidden, (int)s->combine_dtype, out,
                              NULL, in->topk_weights, x->d_tk, x->d_rk};
        st = epx__launched(epx__xh_launch_reduce(&r, epx__blocks(m), stream), "reducing at home", err);
    }
    return epx__call_end(m, x, plan, st, stream, err);
}
