/*
 * src/xhost: the CUDA backend for GPUs on several hosts. It composes, per host, the
 * single-host CUDA backend (src/cuda, over this host's ranks: CUDA IPC, NVLink) with NCCL
 * between hosts (src/nccl), and runs MoE through the hierarchical algorithm of src/hier
 * over an NCCL link. It calls only those layers and src/core; control (agreement on
 * arguments) goes over the communicator's TCP bootstrap.
 *
 * Hosts must hold the same number of ranks, numbered consecutively (host h holds ranks
 * h*LS .. h*LS+LS-1), as with EPX_LOCAL_SIZE or a block placement. NCCL connects *rails*:
 * the ranks of one local index on every host (one communicator per rail, made by epx; or
 * the caller's communicator over all ranks, adopted). Data between two hosts only ever
 * travels along a rail: a segment from rank (A, i) to rank (B, j) goes to (B, i) over NCCL,
 * then to (B, j) inside host B.
 *
 * alltoall(v): on the device, on the caller's stream — the host-local pairs through the
 * CUDA backend; the others as above (grouped ncclSend/ncclRecv, one group per destination
 * local index, then one intra-host exchange of the forwarded segments and device copies
 * into place). Two host rounds of O(R) bytes per rank first agree on every rank's counts
 * (counts.h; MPI semantics: a mismatched pair fails with EPX_ERR_MISMATCH, the other ranks
 * with EPX_ERR_REMOTE_INVALID, nothing written). Then every step that can fail (staging, the
 * intra-host exchanges' host rounds and mappings: src/cuda's prepare half) runs before a
 * second round, the verdict of every rank; after it only CUDA or NCCL calls can fail, and
 * such a failure aborts the NCCL link so that the peers fail instead of waiting.
 *
 * Failures travel with the data: every rank's status goes with the NCCL groups to its rail
 * peers (the last group of an alltoall(v), every group of MoE), numbered per group, and a
 * failed or missing one fails the receiving rank's device before it forwards or places
 * anything; inside a host the CUDA backend's failure relay (epx__cuda_relay_failures, on for
 * every rank here) carries a failure with the segments, so no rank succeeds on what a failed
 * gateway sent on.
 *
 * Every call but the low-latency ones on the device waits on the host, so it cannot be
 * captured in a CUDA graph: a capturing stream is refused (EPX_ERR_INVALID_USAGE) before any
 * collective step, as is any call once the NCCL link was aborted (EPX_ERR_ABORTED).
 *
 * MoE (moe.c), high-throughput and low-latency, keeps the rows on the device: the host
 * reads back the routing only, plans with src/hier's algorithm (a token crosses to each
 * destination host once, to the rank of the same local index, and fans out inside the host;
 * combine sends rows home unreduced and sums them at home: high-throughput in ascending rank
 * order, low-latency weighted, per expert rank in ascending k), and the rows move with gather kernels, NCCL
 * along the rails and the CUDA backend's alltoallv inside a host; low-latency FP8 is
 * quantised on the device, and each received row is placed into its experts' slots by one
 * kernel. Results are bit-identical to the single-host backends. High-throughput calls wait
 * on the host (moe.c says for what). Low-latency calls, up to EPX__LL_MAX_SRCS ranks and
 * unless EPX_MOE_LL_HOST=1, run on the device instead: src/cuda's low-latency kernels over
 * this host's ranks with every rank a source, fixed-size blocks along the rails over NCCL
 * (by default up to 4 hosts: the combine's blocks hold N times the rows needed)
 * between their steps (moe.c, "Low-latency on the device"); they wait for nothing on the
 * host and can be captured (the round agreeing on the call runs at capture time). In a
 * replay no call watches the NCCL steps: the kernels around them keep host-mapped marks
 * (xh->marks), and the NCCL watchdog aborts the link when one has not moved for
 * EPX_TIMEOUT_MS.
 * The low-latency path is part of a context's configuration: ranks whose EPX_MOE_LL_HOST
 * (or mode) would take different paths fail its creation with EPX_ERR_MISMATCH.
 */
#ifndef EPX_XHOST_H
#define EPX_XHOST_H

#include "../cuda/cuda.h"
#include "../hier/hier.h"
#include "../nccl/nccl.h"

typedef struct epx__xhost epx__xhost_t;

/* Collective over every rank (the bootstrap `boot` spans them all; `cpu` and `cuda` span
 * this host's ranks). Creates the TCP links along the rails, then the rail NCCL
 * communicators, or takes `adopted` (an NCCL communicator over all ranks, rank r = epx
 * rank r; ownership passes here). Fails alike on every rank; `local` is this rank's verdict
 * on what came before (others then fail too). A rank whose NCCL creation fails, or that
 * dies in it, stops its rail peers' creations within milliseconds (they watch its links),
 * so a failure costs no rank EPX_TIMEOUT_MS. Owns none of boot, cpu, cuda. */
epx_status_t epx__xhost_create(epx__xhost_t **xh, epx__boot_t *boot, epx__cpu_t *cpu, epx__cuda_t *cuda,
                               epx__nccl_t *adopted, int rank, int nranks, const int *host_of, const int *lrank_of,
                               int64_t timeout_ms, epx_status_t local, epx__errbuf_t *err);
void epx__xhost_destroy(epx__xhost_t *xh, bool abort);

/* EPX_FAULT (core/fault.h). src/api counts the steps (every collective call is one) and,
 * on an armed communicator, calls this at the start of every call, after it fired the
 * `host` entries itself: `count` makes the call announce a wrong size (alltoall(v): one
 * byte more to rank + 1 than it sends, in the agreement on counts; MoE: a top-k one
 * larger, in src/hier's verdict; barrier and epx_moe_create announce none); `enqueue`
 * makes it fire the entries of `fault` with at=enqueue for `step` at its enqueue point:
 * alltoall(v) and MoE (high-throughput and low-latency) after their last bootstrap round,
 * before anything goes on the stream; barrier after its round. Both hold for one call. */
void epx__xhost_fault_set(epx__xhost_t *xh, const epx__fault_t *fault, uint32_t step, bool count, bool enqueue);
/* The communicator broke, or an abort frees it (src/api): abort the NCCL link now, so
 * that NCCL work already on this rank's streams ends instead of waiting for a peer that is
 * gone (a stream synchronisation before epx_comm_abort then returns; the MoE contexts'
 * teardown finds their device work ended), and the peers' NCCL waits fail. Local;
 * idempotent. An adopted NCCL communicator is only marked (left to its owner). */
void epx__xhost_mark_broken(epx__xhost_t *xh);
/* An error that broke the NCCL link between calls (src/nccl's watchdog: NCCL work left on
 * a stream waited EPX_TIMEOUT_MS for a peer, or NCCL reported an error); EPX_SUCCESS while
 * healthy (or xh NULL). Local. */
epx_status_t epx__xhost_check_async(epx__xhost_t *xh, epx__errbuf_t *err);

/* The contracts of their src/cuda namesakes, over every rank. */
epx_status_t epx__xhost_alltoallv(epx__xhost_t *xh, const epx__cpu_xfer_t *x, epx_status_t local, void *stream,
                                  epx__errbuf_t *err);
/* Counts in device memory: read back once (a wait for the stream), then as above. */
epx_status_t epx__xhost_alltoallv_device(epx__xhost_t *xh, const epx__cuda_counts_t *k, epx_status_t local,
                                         void *stream, epx__errbuf_t *err);
/* Every rank's stream has reached the barrier when it returns. */
epx_status_t epx__xhost_barrier(epx__xhost_t *xh, epx_status_t local, void *stream, epx__errbuf_t *err);

/* ---- MoE (moe.c): the contract of the src/cuda MoE functions. ---- */
typedef struct epx__xhost_moe epx__xhost_moe_t;
typedef struct epx__xhost_moe_handle epx__xhost_moe_handle_t;
epx_status_t epx__xhost_moe_create(epx__xhost_t *xh, const epx__moe_shape_t *shape, uint64_t hash, epx_status_t local,
                                   epx__xhost_moe_t **out, epx__errbuf_t *err);
void epx__xhost_moe_destroy(epx__xhost_moe_t *m);
/* Local layout: the routing is read back and laid out on the host. */
epx_status_t epx__xhost_moe_layout(epx__xhost_moe_t *m, const void *topk_idx, int num_tokens, int topk,
                                   int32_t *per_rank, int32_t *per_expert, uint8_t *in_rank, void *stream,
                                   epx__errbuf_t *err);
epx_status_t epx__xhost_moe_dispatch(epx__xhost_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                     epx_status_t local, epx__xhost_moe_handle_t **handle, void *stream,
                                     epx__errbuf_t *err);
epx_status_t epx__xhost_moe_dispatch_cached(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h,
                                            const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                            epx_status_t local, void *stream, epx__errbuf_t *err);
epx_status_t epx__xhost_moe_combine(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h,
                                    const epx_moe_combine_in_t *in, epx_moe_combine_out_t *out, epx_status_t local,
                                    void *stream, epx__errbuf_t *err);
/* Low-latency: on the device (moe.c, "Low-latency on the device"; by default up to 4 hosts
 * and EPX__LL_MAX_SRCS ranks), with `split` as src/cuda's (epx__xhost_moe_ll_recv then enqueues
 * the receive: for a combine, its gather, NCCL and sum); above that on the host path, which
 * moves everything in the send (its receive does nothing). */
epx_status_t epx__xhost_moe_ll_dispatch(epx__xhost_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                        epx_moe_ll_dispatch_out_t *out, epx_status_t local, bool split,
                                        epx__xhost_moe_handle_t **handle, void *stream, epx__errbuf_t *err);
epx_status_t epx__xhost_moe_ll_combine(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h,
                                       const epx_moe_ll_combine_in_t *in, void *out, epx_status_t local, bool split,
                                       void *stream, epx__errbuf_t *err);
epx_status_t epx__xhost_moe_ll_recv(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h, bool combine, void *stream,
                                    epx__errbuf_t *err);
/* Local. m (NULL once the context is gone) keeps the handle's host memory for the next. */
void epx__xhost_moe_handle_free(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h);
int64_t epx__xhost_moe_handle_rows(const epx__xhost_moe_handle_t *h);
int epx__xhost_moe_handle_tokens(const epx__xhost_moe_handle_t *h);

#endif /* EPX_XHOST_H */
