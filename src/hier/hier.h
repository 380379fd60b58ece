/*
 * src/hier: the CPU backend for ranks on several hosts. It composes the shared-memory
 * backend of src/cpu (the ranks of this host, numbered by local rank) with the MPI
 * transport of src/net (between hosts); it calls only those two and src/core.
 *
 * alltoall(v): every rank sends every peer's segment itself — through shared memory
 * inside the host, through MPI (point to point, one message per pair) to other hosts.
 * First one small message per pair carries each side's byte counts and its verdict on its
 * own arguments, so that every rank decides before anything is written, as on one host.
 *
 * MoE (moe.c): a token crosses to each destination host once, to its *gateway* there —
 * the rank whose local index is the source's local index (modulo that host's size) —
 * which fans it out to the local ranks that need it. Combine walks back: the receivers
 * return their rows to the gateway, which sends them on to the token's home rank as they
 * are, one message per (gateway, source); the home rank sums each token's rows in the
 * single-host order (float32, ascending rank, from +0; low-latency: w * y in ascending k),
 * so the result equals the single-host one bit for bit. (Adding per-host partial sums
 * instead would change the float32 rounding; chaining a float32 partial sum from host to
 * host keeps the bits but makes every host wait for the previous one.)
 */
#ifndef EPX_HIER_H
#define EPX_HIER_H

#include "../cpu/cpu.h"
#include "../net/net.h"

/* Which rank is where. */
typedef struct {
    int rank, nranks;
    int host, num_hosts;
    int local_rank, local_size;
    int *host_of;    /* [R] */
    int *lrank_of;   /* [R] */
    int *host_size;  /* [hosts] */
    int *host_first; /* [hosts]: start of the host's ranks in host_ranks */
    int *host_ranks; /* [R]: host_ranks[host_first[h] + l] = rank of local rank l of host h */
} epx__topo_t;

typedef struct epx__hier epx__hier_t;

/* The transport between hosts that MoE runs on: MPI (src/net), or NCCL for GPU ranks (the
 * link src/xhost builds: host buffers staged through device memory). Both calls are
 * collective in the sense of the MPI ones they stand for and bounded by `deadline`:
 *   allreduce_sum  v[0..n) summed over all ranks, in place;
 *   xchg           sbytes[p] bytes from sbuf[p] to rank p, rbytes[p] from p into rbuf[p]
 *                  (0 = none), complete on return; `tag` tells concurrent batches apart. */
typedef struct {
    void *ctx;
    epx_status_t (*allreduce_sum)(void *ctx, int64_t *v, int n, uint64_t deadline, epx__errbuf_t *err);
    epx_status_t (*xchg)(void *ctx, int tag, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                         const int64_t *rbytes, uint64_t deadline, epx__errbuf_t *err);
} epx__hier_link_t;

/* Local: build the backend over this host's `cpu` (local ranks) and `net` (all ranks).
 * host_of / lrank_of are copied. Owns neither cpu nor net. */
epx_status_t epx__hier_create(epx__hier_t **hier, epx__cpu_t *cpu, epx__net_t *net, const int *host_of,
                              const int *lrank_of, int64_t timeout_ms, epx__errbuf_t *err);
/* The same over another link (MoE only: epx__hier_alltoallv needs an MPI net). The link's
 * point-to-point pairs are those of MoE: a rank and the rank of the same local index on
 * another host (hosts of equal size). */
epx_status_t epx__hier_create_link(epx__hier_t **hier, epx__cpu_t *cpu, const epx__hier_link_t *link, int rank,
                                   int nranks, const int *host_of, const int *lrank_of, int64_t timeout_ms,
                                   epx__errbuf_t *err);
void epx__hier_destroy(epx__hier_t *hier);
const epx__topo_t *epx__hier_topo(const epx__hier_t *hier);

/* EPX_FAULT `count` (core/fault.h; set by src/api, which counts the steps): the next
 * operation announces a wrong size. alltoall(v): one byte more to rank + 1 than it sends
 * (the pair returns EPX_ERR_MISMATCH, the others succeed); a MoE call: a top-k one larger
 * than its own in the verdict (every rank returns EPX_ERR_MISMATCH). Nothing is written. */
void epx__hier_fault_count(epx__hier_t *hier);

/* Same contract as epx__cpu_alltoallv, over every rank (arrays indexed by rank). */
epx_status_t epx__hier_alltoallv(epx__hier_t *hier, const epx__cpu_xfer_t *x, epx_status_t local_status,
                                 epx__errbuf_t *err);

/* ---- MoE (moe.c): the contract of the src/cpu MoE functions. ---- */
typedef struct epx__hier_moe epx__hier_moe_t;
typedef struct epx__hier_moe_handle epx__hier_moe_handle_t;

epx_status_t epx__hier_moe_create(epx__hier_t *h, const epx__moe_shape_t *shape, uint64_t config_hash,
                                  epx_status_t local_status, epx__hier_moe_t **moe, epx__errbuf_t *err);
void epx__hier_moe_destroy(epx__hier_moe_t *m);
epx_status_t epx__hier_moe_dispatch(epx__hier_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                    epx_status_t local_status, epx__hier_moe_handle_t **handle, epx__errbuf_t *err);
epx_status_t epx__hier_moe_dispatch_cached(epx__hier_moe_t *m, const epx__hier_moe_handle_t *h,
                                           const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                           epx_status_t local_status, epx__errbuf_t *err);
epx_status_t epx__hier_moe_combine(epx__hier_moe_t *m, const epx__hier_moe_handle_t *h,
                                   const epx_moe_combine_in_t *in, epx_moe_combine_out_t *out,
                                   epx_status_t local_status, epx__errbuf_t *err);
epx_status_t epx__hier_moe_ll_dispatch(epx__hier_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                       epx_moe_ll_dispatch_out_t *out, epx_status_t local_status,
                                       epx__hier_moe_handle_t **handle, epx__errbuf_t *err);
epx_status_t epx__hier_moe_ll_combine(epx__hier_moe_t *m, const epx__hier_moe_handle_t *h,
                                      const epx_moe_ll_combine_in_t *in, void *out, epx_status_t local_status,
                                      epx__errbuf_t *err);
void epx__hier_moe_handle_free(epx__hier_moe_handle_t *h);
int64_t epx__hier_moe_handle_rows(const epx__hier_moe_handle_t *h);
int epx__hier_moe_handle_tokens(const epx__hier_moe_handle_t *h);
int epx__hier_moe_handle_topk(const epx__hier_moe_handle_t *h);

#endif /* EPX_HIER_H */
