/* Internals of src/xhost shared by its files. */
#ifndef EPX_XHOST_INTERNAL_H
#define EPX_XHOST_INTERNAL_H

#include "xhost.h"

struct epx__xhost {
    epx__boot_t *boot;
    epx__cpu_t *cpu;
    epx__cuda_t *cuda;
    epx__nccl_t *nccl; /* a rail (peers = hosts) or the adopted one (peers = ranks) */
    bool adopted;
    int rank, nranks, host, num_hosts, lrank, ls;
    int64_t timeout_ms;
    epx__hier_t *hier; /* MoE */
    char *gw, *fwd;    /* alltoallv device staging */
    size_t gw_bytes, fwd_bytes;
    char *stat;        /* alltoallv statuses (device): mine, then one slot per NCCL peer [P]; one
                        * buffer for every call, as gw and fwd: calls are ordered on one stream */
    unsigned seq;      /* alltoallv calls so far (numbers their statuses; never 0) */
    /* Per-call arrays, made at creation so that a call's data steps allocate nothing:
     * NCCL peers' pointers and sizes [P], the two intra-host exchanges' arrays [8 * ls]. */
    const void **sp;
    void **rp;
    int64_t *sb, *lx;
    unsigned char *rail; /* [P]: 1 for the NCCL peers on my rail but me (those statuses go to) */
    /* The rounds across hosts (xhost.c): direct links to my rail peers (link i: the one on
     * host epx__xh_rail_host(xh, i)), their buffers [NH - 1], the host step's arrays [3 * ls]. */
    epx__boot_links_t *links;
    const void **rs;
    void **rr;
    int64_t *rx;
    /* How far the low-latency kernels got around their NCCL steps (epx__ll_rail_t.mark; the
     * calls of a communicator run one after another, so one set serves all its contexts):
     * host-mapped [4], and its device address. The watchdog's look at them (its thread only):
     * the pairs last seen unequal, and since when (0: not stalled). */
    unsigned long long *marks, *marks_dev;
    unsigned long long stall_seen[4];
    uint64_t stall_since_ns;
    /* EPX_FAULT for the call in progress (epx__xhost_fault_set; cleared by the next call). */
    const epx__fault_t *fault;
    uint32_t fault_step;
    bool fault_count;   /* announce a wrong size */
    bool fault_enqueue; /* at=enqueue entries may be due: fire them at the call's enqueue point */
};

/* The host of my i-th rail peer (hosts ascending, mine left out). */
static inline int epx__xh_rail_host(const epx__xhost_t *xh, int i) { return i < xh->host ? i : i + 1; }

/* The NCCL peer index of rank p, which must be on my rail (or -1). */
static inline int epx__xh_peer(const epx__xhost_t *xh, int p)
{
    if (p % xh->ls != xh->lrank) return -1;
    return xh->adopted ? p : p / xh->ls;
}

/* Where my rail peers' statuses land among the NCCL peers' slots (cuda.h). */
static inline epx__cuda_status_slots_t epx__xh_rail_slots(const epx__xhost_t *xh)
{
    return (epx__cuda_status_slots_t){xh->adopted ? xh->lrank : 0, xh->adopted ? xh->ls : 1, xh->num_hosts,
                                      epx__nccl_rank(xh->nccl)};
}

/* Everyone's `len` bytes (rank-major into `all`): over the bootstrap during creation, then
 * inside the host and along the rail (xhost.c). Fails only when the round broke, or, after
 * creation, when a rank took part with a failure (epx__xh_allgather_fail). */
epx_status_t epx__xh_allgather(epx__xhost_t *xh, const void *mine, void *all, size_t len, epx__errbuf_t *err);
/* Take part in such a round with the failure `st`, without buffers; returns st, or what
 * broke the round. During creation the others see st in my part (an int64 first); after
 * it, their round fails (EPX_ERR_REMOTE_INVALID naming a rank that failed). */
epx_status_t epx__xh_allgather_fail(epx__xhost_t *xh, epx_status_t st, size_t len, epx__errbuf_t *err);
/* v[0..n) summed over every rank (wrapping int64), in place: over the bootstrap, or inside
 * the host and along the rail. Every rank must call it; fails only when the round broke. */
epx_status_t epx__xh_allreduce(epx__xhost_t *xh, int64_t *v, int n, epx__errbuf_t *err);
/* One round of every rank's status: `local` when it failed, EPX_ERR_REMOTE_INVALID ("rank p
 * <what> (status)") when another rank's did, else what broke the round. */
epx_status_t epx__xh_vote(epx__xhost_t *xh, epx_status_t local, const char *what, epx__errbuf_t *err);
/* Can a call run here? Not after the NCCL link was aborted (EPX_ERR_ABORTED, or the
 * watchdog's verdict). Local; waits for nothing. */
epx_status_t epx__xh_live(epx__xhost_t *xh, epx__errbuf_t *err);
/* The same for a call that waits on the host: also not while `stream` is being captured
 * into a CUDA graph (EPX_ERR_INVALID_USAGE). */
epx_status_t epx__xh_usable(epx__xhost_t *xh, void *stream, epx__errbuf_t *err);
/* EPX_FAULT `count` for this call: true once (the caller announces the wrong size). */
static inline bool epx__xh_take_count(epx__xhost_t *xh)
{
    bool c = xh->fault_count;
    xh->fault_count = false;
    return c;
}
/* EPX_FAULT at=enqueue: the call has made its last host round and enqueues nothing on
 * `stream` before this returns; a due `delay` sleeps, a due `kill` ends the process, a due
 * `fail` enqueues on `stream` a failure of this rank's device (epx__cuda_inject_failure),
 * ahead of the call's work. Fires once per call; fails only on that kernel's launch. */
epx_status_t epx__xh_fault_enqueue(epx__xhost_t *xh, void *stream, epx__errbuf_t *err);
/* Wait (bounded) until `stream` has run what was enqueued. */
epx_status_t epx__xh_sync(epx__xhost_t *xh, void *stream, epx__errbuf_t *err);

#endif
