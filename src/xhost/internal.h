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
};

/* The NCCL peer index of rank p, which must be on my rail (or -1). */
static inline int epx__xh_peer(const epx__xhost_t *xh, int p)
{
    if (p % xh->ls != xh->lrank) return -1;
    return xh->adopted ? p : p / xh->ls;
}

/* Everyone's `len` bytes over the bootstrap (rank-major into `all`). */
epx_status_t epx__xh_allgather(epx__xhost_t *xh, const void *mine, void *all, size_t len, epx__errbuf_t *err);
/* Wait (bounded) until `stream` has run what was enqueued. */
epx_status_t epx__xh_sync(epx__xhost_t *xh, void *stream, epx__errbuf_t *err);

#endif
