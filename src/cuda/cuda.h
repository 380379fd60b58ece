/*
 * src/cuda: the CUDA backend for the GPUs of one host. Data moves GPU to GPU over NVLink
 * (copy engines and SM loads/stores on CUDA IPC mappings); device-side flags order the
 * ranks' streams, with bounded waits. Control (handle exchange, argument agreement) goes
 * through the CPU backend's shared-memory transport (src/cpu), which this layer builds on;
 * it never calls upward.
 *
 * Every operation is enqueued on the caller's stream. An operation has a number n kept in
 * device memory (so a captured graph replays correctly): its kernels read n = epoch + 1,
 * and the last kernel of the operation sets epoch = n. Peers are ordered with two flags per
 * (peer, kind) in each rank's device memory: *arrive* (the peer's stream reached operation
 * n: its inputs are ready and its outputs free) and *done* (the peer finished reading my
 * memory for operation n). A wait that passes EPX_TIMEOUT_MS writes the error to host
 * memory and returns: the call after it reports EPX_ERR_TIMEOUT instead of hanging.
 */
#ifndef EPX_CUDA_H
#define EPX_CUDA_H

#include "../cpu/cpu.h"
#include "dev.h"

typedef struct epx__cuda epx__cuda_t;

/* Collective over the host transport: pick the device, allocate and map the flags and
 * eager slots of every rank. device < 0: the current device. */
epx_status_t epx__cuda_create(epx__cuda_t **cuda, epx__cpu_t *host, int rank, int nranks, int device,
                              int64_t timeout_ms, epx__errbuf_t *err);
void epx__cuda_destroy(epx__cuda_t *cuda);
/* Arm the faults of EPX_FAULT for this rank; steps count the CUDA operations (core/fault.h). */
void epx__cuda_set_fault(epx__cuda_t *cuda, const epx__fault_t *fault);

/* EPX_SUCCESS, or the error a device wait reported (timeout, peer failure). */
epx_status_t epx__cuda_check_async(epx__cuda_t *cuda, epx__errbuf_t *err);
/* Has the device recorded an error other than a count mismatch (a failure its results
 * cannot survive)? One read of host-mapped memory, nothing logged: for any thread. */
bool epx__cuda_has_failed(const epx__cuda_t *cuda);

/* In-band failure relay, for data that leaves the host after device waits (src/xhost: rows
 * sent on over NCCL after an intra-host exchange), EPX__CUDA_STATUS_BYTES a status.
 * status_out enqueues on `stream` this rank's status into out (device memory): whether its
 * device recorded an error before that point (a wait that timed out, a relayed failure;
 * not a count mismatch alone, as inside the host) and which, `rank` (the caller's numbering) and `seq` (the exchange's
 * number, the same at both ends, never 0), to go with the data. status_check enqueues a
 * look at the statuses that must have come into `in` (device memory, a status per slot):
 * slots first + j * step for j < count, but `self`. One that failed, or that is not a
 * status of exchange `seq` (it never came: the exchange was cut short), becomes this rank's
 * device error, EPX_ERR_PEER_FAILURE naming that rank (or, missing, the slot), reported as
 * a wait's error is (the first error stays). Both fail only on a CUDA launch error. */
#define EPX__CUDA_STATUS_BYTES 16
/* The same inside the host, for a communicator whose ranks send on what they received
 * (src/xhost's gateways): from now on, a rank whose device has recorded an error (but a
 * count mismatch, which stops no wait) by the time it tells a peer that its segments of an
 * alltoallv exchange (epx__cuda_alltoallv, epx__cuda_a2a_*) are written says so with them,
 * and the peer records EPX_ERR_PEER_FAILURE naming it (the first error stays). Call it on
 * every rank, before the first exchange. */
void epx__cuda_relay_failures(epx__cuda_t *cuda);
/* EPX_FAULT fail (core/fault.h): enqueue on `stream` a kernel that records EPX_ERR_TIMEOUT
 * on this rank's device, as a device wait that timed out would (the first error stays).
 * Ordered with the caller's kernels as a real device failure is: the kernels enqueued
 * before it (an earlier call's, still queued) run as if nothing failed, those after it see
 * the failure. Fails only on a CUDA launch error. */
epx_status_t epx__cuda_inject_failure(epx__cuda_t *cuda, void *stream, epx__errbuf_t *err);
typedef struct {
    int first, step, count, self;
} epx__cuda_status_slots_t;
epx_status_t epx__cuda_status_out(epx__cuda_t *cuda, int rank, unsigned seq, void *out, void *stream,
                                  epx__errbuf_t *err);
epx_status_t epx__cuda_status_check(epx__cuda_t *cuda, const void *in, const epx__cuda_status_slots_t *slots,
                                    unsigned seq, void *stream, epx__errbuf_t *err);

/* Device memory (cudaMalloc, 256-byte aligned). */
epx_status_t epx__cuda_mem_alloc(epx__cuda_t *cuda, size_t bytes, void **ptr, epx__errbuf_t *err);
epx_status_t epx__cuda_mem_free(epx__cuda_t *cuda, void *ptr, epx__errbuf_t *err);

/* Calls that must not be captured into a CUDA graph: EPX_ERR_INVALID_USAGE ("stream ... is
 * being captured into a CUDA graph, but <why>") while `stream` is capturing,
 * EPX_ERR_INVALID_ARGUMENT when CUDA cannot tell (not a stream), else EPX_SUCCESS. */
epx_status_t epx__cuda_refuse_capture(void *stream, const char *why, epx__errbuf_t *err);
/* Is `stream` being captured (or can CUDA not tell)? For code that then keeps its work on
 * that stream. */
bool epx__cuda_capturing(void *stream);

/* alltoallv of device buffers, byte counts on the host, enqueued on `stream`. */
epx_status_t epx__cuda_alltoallv(epx__cuda_t *cuda, const epx__cpu_xfer_t *x, epx_status_t local_status,
                                 void *stream, epx__errbuf_t *err);
/* The same in two halves, for callers that agree with more ranks than this host's before
 * anything moves (src/xhost). prepare makes, for `n` exchanges (at most
 * EPX__CUDA_A2A_MAX_OPS, enqueued later in that order), every host exchange, check,
 * allocation and mapping, with `local` as this rank's verdict: this host's ranks make the
 * same host exchanges whatever their verdicts; the result is this rank's (a mapping can
 * fail on one rank only). enqueue(i) then only launches exchange i on `stream` and fails
 * only on a CUDA launch error. x[i] must stay valid until exchange i is enqueued. */
#define EPX__CUDA_A2A_MAX_OPS 5
typedef struct epx__cuda_a2a epx__cuda_a2a_t;
epx_status_t epx__cuda_a2a_prepare(epx__cuda_t *cuda, const epx__cpu_xfer_t *const *x, int n, epx_status_t local,
                                   void *stream, epx__cuda_a2a_t **plan, epx__errbuf_t *err);
epx_status_t epx__cuda_a2a_enqueue(epx__cuda_t *cuda, const epx__cuda_a2a_t *plan, int i, void *stream,
                                   epx__errbuf_t *err);
void epx__cuda_a2a_free(epx__cuda_a2a_t *plan);
/* alltoallv whose counts and displacements (elements) live in device memory. */
typedef struct {
    const void *send;
    const int64_t *send_counts, *send_displs;
    void *recv;
    const int64_t *recv_counts, *recv_displs;
    int64_t elem_bytes;
} epx__cuda_counts_t;
epx_status_t epx__cuda_alltoallv_device(epx__cuda_t *cuda, const epx__cuda_counts_t *k, epx_status_t local_status,
                                        void *stream, epx__errbuf_t *err);
/* Device memory a communicator of n ranks allocates per rank (its control memory), and a
 * MoE context with one live handle; 0 in builds without CUDA. */
int64_t epx__cuda_comm_device_bytes(int nranks);
int64_t epx__cuda_moe_device_bytes(const epx__moe_shape_t *s);
/* Enqueue a barrier of the ranks' streams. */
epx_status_t epx__cuda_barrier(epx__cuda_t *cuda, epx_status_t local_status, void *stream, epx__errbuf_t *err);

/* ---- MoE, high-throughput (moe.c); the same contract as the CPU backend's. ---- */
typedef struct epx__cuda_moe epx__cuda_moe_t;
typedef struct epx__cuda_moe_handle epx__cuda_moe_handle_t;
epx_status_t epx__cuda_moe_create(epx__cuda_t *c, const epx__moe_shape_t *shape, uint64_t hash, epx_status_t local,
                                  epx__cuda_moe_t **out, epx__errbuf_t *err);
void epx__cuda_moe_destroy(epx__cuda_moe_t *m);
/* Its communicator is going: give back what the context holds in it (the rest is freed by
 * epx__cuda_moe_destroy, which may come later). */
void epx__cuda_moe_detach(epx__cuda_moe_t *m);
/* Local, device-side layout, nothing waited for; bad ids make every count -1 (epx.h). */
epx_status_t epx__cuda_moe_layout(epx__cuda_moe_t *m, const void *topk_idx, int num_tokens, int topk, int32_t *per_rank,
                                  int32_t *per_expert, uint8_t *in_rank, void *stream, epx__errbuf_t *err);
epx_status_t epx__cuda_moe_dispatch(epx__cuda_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                    epx_status_t local, epx__cuda_moe_handle_t **handle, void *stream,
                                    epx__errbuf_t *err);
epx_status_t epx__cuda_moe_dispatch_cached(epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h,
                                           const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                           epx_status_t local, void *stream, epx__errbuf_t *err);
epx_status_t epx__cuda_moe_combine(epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h, const epx_moe_combine_in_t *in,
                                   epx_moe_combine_out_t *out, epx_status_t local, void *stream, epx__errbuf_t *err);
void epx__cuda_moe_handle_free(epx__cuda_moe_handle_t *h);
/* h's context is gone: free its host memory; its device arrays are left allocated (a
 * cudaFree may wait for device work that never ends, such as NCCL kernels waiting for a dead
 * peer, and the handle cannot tell). */
void epx__cuda_moe_handle_abandon(epx__cuda_moe_handle_t *h);
int64_t epx__cuda_moe_handle_rows(const epx__cuda_moe_handle_t *h);
int epx__cuda_moe_handle_tokens(const epx__cuda_moe_handle_t *h);
int epx__cuda_moe_handle_topk(const epx__cuda_moe_handle_t *h);

/* Is this a device pointer CUDA knows? */
bool epx__cuda_is_device_ptr(const void *p);

/* Low-latency dispatch/combine: no host synchronisation; the routing is checked on the
 * device (bad ids anywhere: every recv_count is -1 and nothing else is written, and the
 * combine along that handle writes nothing). With `split`, only the send half is enqueued
 * and epx__cuda_moe_ll_recv enqueues the receive later; the caller keeps the order (at
 * most two sends of a kind pending, received oldest first, none pending for a whole call). */
epx_status_t epx__cuda_moe_ll_dispatch(epx__cuda_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                       epx_moe_ll_dispatch_out_t *out, epx_status_t local, bool split,
                                       epx__cuda_moe_handle_t **handle, void *stream, epx__errbuf_t *err);
epx_status_t epx__cuda_moe_ll_combine(epx__cuda_moe_t *m, epx__cuda_moe_handle_t *h, const epx_moe_ll_combine_in_t *in,
                                      void *out, epx_status_t local, bool split, void *stream, epx__errbuf_t *err);
/* The receive half of the split send pending on h: the dispatch's (combine = false) or the
 * combine's. Local: enqueues one kernel. */
epx_status_t epx__cuda_moe_ll_recv(epx__cuda_moe_t *m, epx__cuda_moe_handle_t *h, bool combine, void *stream,
                                   epx__errbuf_t *err);

/* ---- Low-latency across hosts (src/xhost): this host's part of a context over all ranks ----
 * The context is made over this host's ranks (c) with the shape of all of them: every rank
 * is a source (staging for each), this host's are ranks host * c->nranks ... Every rank
 * sends its whole source block to its rail peers (the ranks of its local index on the other
 * hosts), which forward it here as its source would have pushed it; a combine sends home,
 * along the same rails, the rows of a rail peer's tokens whose experts live on this host.
 * Then a dispatch is: epx__cuda_moe_ll_dispatch (its send: rows to the local ranks and to
 * rails.out; the receive is always left to epx__cuda_moe_ll_recv), the caller's NCCL step
 * (rails.out to every rail peer, theirs into rails.in + host * blk), epx__cuda_moe_ll_forward,
 * then epx__cuda_moe_ll_recv; a combine: epx__cuda_moe_ll_combine (its send),
 * epx__cuda_moe_ll_gather, the NCCL step (rails.y_out + p's host * yblk to rail peer p,
 * theirs into rails.y_in likewise), then epx__cuda_moe_ll_recv. Every rank must make the
 * same calls in the same order; the steps of one call run on one stream. */
/* Make the rail buffers (device memory of the context) for `nhosts` hosts, this one
 * `host`, and describe them in *rails (the handle's arrays unset). `mark` (NULL: none):
 * four host-mapped words the kernels keep up to date around the NCCL steps (epx__ll_rail_t).
 * Before any dispatch. Local; a failure leaves the context as it was. */
epx_status_t epx__cuda_moe_ll_rails(epx__cuda_moe_t *m, int nhosts, int host, unsigned long long *mark,
                                    epx__ll_rail_t *rails, epx__errbuf_t *err);
/* Make sure the next low-latency dispatch on m allocates nothing for its handle (a spare,
 * device arrays included, is kept ready), so that a caller that agrees with other hosts
 * before that dispatch (src/xhost) can make running out of memory part of its verdict. Local. */
epx_status_t epx__cuda_moe_reserve(epx__cuda_moe_t *m, epx__errbuf_t *err);
/* The forward step of h's dispatch (after the NCCL step, on its stream). Local. */
epx_status_t epx__cuda_moe_ll_forward(epx__cuda_moe_t *m, epx__cuda_moe_handle_t *h, void *stream,
                                      epx__errbuf_t *err);
/* The gather step of h's combine receive (before its NCCL step). Local. */
epx_status_t epx__cuda_moe_ll_gather(epx__cuda_moe_t *m, epx__cuda_moe_handle_t *h, void *stream, epx__errbuf_t *err);

#endif /* EPX_CUDA_H */
