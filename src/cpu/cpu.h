/*
 * src/cpu: the CPU backend for the ranks of one host — POSIX shared memory between
 * processes, copies and reductions on the CPU. Uses src/core only.
 *
 * Protocol. Every rank owns one shared segment holding a `done` flag, an `aborted` flag, a
 * descriptor line per (operation parity, reader) and an eager slot per (parity, reader).
 * An operation with sequence number n (the same on every rank: collectives are called in
 * the same order) goes:
 *   1. write, for each peer, what I send it and where it can read it (my eager slot for
 *      small messages, a registered region, or my private memory through
 *      process_vm_readv), what I expect from it, and my verdict on my own arguments; then
 *      publish the operation number in that line (release);
 *   2. acquire every peer's line for me, validate both sides of every pair, then *pull*:
 *      copy what each peer sends me straight from where it lies into my receive buffer;
 *   3. publish `done` = n; if peers read memory the caller owns, wait for their done >= n.
 * A rank posts n+1 only after finishing its reads of n, and a rank starts n+2 only after
 * seeing every post of n+1: so the parity block of n is never rewritten while read.
 * Every wait polls briefly, then yields, then sleeps on a futex; it ends with
 * EPX_ERR_TIMEOUT once the peer showed no progress for the timeout (a rank stamps its
 * `alive_ns` after every piece of data it copies, and relays a later stamp of a peer it
 * waits for) and EPX_ERR_PEER_FAILURE as soon as the peer's process is gone or has aborted
 * or given up. A rank whose wait failed gives up on the communicator at once (its
 * `aborted` flag says so): its later operations fail at once with that status, posting
 * nothing (so the rule above holds for the blocks it posted).
 * A peer that gave up after it released an operation (it finished it, and its readers of
 * exposed memory finished) still lets a slow reader of that operation succeed.
 */
#ifndef EPX_CPU_H
#define EPX_CPU_H

#include "../core/core.h"
#include "../core/fault.h"

typedef struct epx__cpu epx__cpu_t;

/* Collective over `boot`: create, map and cross-check the segments of all ranks. All ranks
 * must be on this host. `fault` (may be NULL): a `kill` at step 0 fires here. A failed
 * creation leaves no name of its own in /dev/shm, nor one of a peer that died in it. */
epx_status_t epx__cpu_create(epx__cpu_t **cpu, epx__boot_t *boot, int rank, int nranks,
                             uint64_t nonce, int64_t timeout_ms, const epx__fault_t *fault, epx__errbuf_t *err);
/* Local. With `abort`, peers waiting on this rank fail promptly with EPX_ERR_PEER_FAILURE. */
void epx__cpu_destroy(epx__cpu_t *cpu, bool abort);
/* This rank gives up on the communicator (an operation timed out or failed): peers waiting
 * on it, or about to read what it posted, fail promptly with EPX_ERR_PEER_FAILURE. */
void epx__cpu_mark_broken(epx__cpu_t *cpu);
/* EPX_SUCCESS; or, once this rank gave up on the communicator because a wait for its peers
 * failed (a timeout, a peer gone), that failure's status, its message written again to err
 * (may be NULL). Every operation then fails at once with it, writing nothing. */
epx_status_t epx__cpu_given_up(epx__cpu_t *cpu, epx__errbuf_t *err);
/* Local: name the local ranks in messages by their ranks in a communicator across hosts
 * (names[l]: local rank l's; copied). */
epx_status_t epx__cpu_name_ranks(epx__cpu_t *cpu, const int *names, epx__errbuf_t *err);
/* Local: this shared memory carries the host exchanges of another layer's calls (CUDA,
 * across hosts), several a call: its messages count "host exchanges", not operations. */
void epx__cpu_serve_rounds(epx__cpu_t *cpu);
/* Local: `ranks` processes of the communicator share this machine's cores (more than the
 * local ranks when hosts are simulated). Past the cores online, a wait spins at most 2 µs
 * before it yields (set at creation for the local ranks alone). */
void epx__cpu_share_cores(epx__cpu_t *cpu, int ranks);
/* This rank made progress outside shared memory (a message of another transport moved):
 * its local peers waiting for it restart their clocks, as after a piece it copies. */
void epx__cpu_progress(epx__cpu_t *cpu);
/* Arm the faults of EPX_FAULT for this rank (see core/fault.h). */
void epx__cpu_set_fault(epx__cpu_t *cpu, const epx__fault_t *fault);
/* The CUDA backend's `kill` at host: this entry (and no other) fires in the next host
 * exchange (posted to half of the peers, then the process ends). */
void epx__cpu_fault_kill_next(epx__cpu_t *cpu, const epx__fault_spec_t *spec);

/* Registered memory: shared-memory regions peers map on first use. */
epx_status_t epx__cpu_mem_alloc(epx__cpu_t *cpu, size_t bytes, void **ptr, epx__errbuf_t *err);
epx_status_t epx__cpu_mem_free(epx__cpu_t *cpu, void *ptr, epx__errbuf_t *err);

/* One alltoallv in bytes. All arrays have nranks entries; callers have validated them
 * (non-negative, no overflow, no overlap of send and recv). */
typedef struct {
    const void *send;
    const int64_t *send_bytes, *send_displ;
    void *recv;
    const int64_t *recv_bytes, *recv_displ;
} epx__cpu_xfer_t;

/* Run one exchange. `local_status` != EPX_SUCCESS means this rank rejected its own
 * arguments (already reported in err): it still takes part, so that every rank returns
 * without writing anything — the others with EPX_ERR_REMOTE_INVALID. `x` may then be
 * NULL. A count that disagrees with the peer's fails both ranks of the pair with
 * EPX_ERR_MISMATCH, before anything is written there. */
epx_status_t epx__cpu_alltoallv(epx__cpu_t *cpu, const epx__cpu_xfer_t *x, epx_status_t local_status,
                                epx__errbuf_t *err);

/* A zero-copy exchange, in two halves: as epx__cpu_alltoallv, but instead of copying what
 * peer p sends me, seg[p] points to it where it lies (NULL when p sends nothing; mine: my
 * send buffer), valid until epx__cpu_exchange_end. The senders' buffers must be
 * registered memory (epx__cpu_mem_alloc) unless their segments fit the eager slots. A
 * failure of the exchange itself ends it (no end then); on success the rank must call
 * epx__cpu_exchange_end next, before any other operation on `cpu`, with the status of what
 * it did in between; end returns after every peer is done reading what I exposed, and
 * fails as alltoallv's reads would when a peer gave up meanwhile. */
epx_status_t epx__cpu_exchange_begin(epx__cpu_t *cpu, const epx__cpu_xfer_t *x, const char **seg,
                                     epx_status_t local_status, epx__errbuf_t *err);
epx_status_t epx__cpu_exchange_end(epx__cpu_t *cpu, epx_status_t st, epx__errbuf_t *err);

/* ---- MoE (moe.c). Arguments were validated by the caller; `local_status` != success means
 * this rank rejected its own arguments: it takes part so that every rank fails alike. ---- */

typedef struct epx__cpu_moe epx__cpu_moe_t;
typedef struct epx__cpu_moe_handle epx__cpu_moe_handle_t;

/* Collective: allocate this rank's board (a registered region peers read the routing
 * from) and learn the others'. EPX_ERR_MISMATCH when config hashes differ. */
epx_status_t epx__cpu_moe_create(epx__cpu_t *c, const epx__moe_shape_t *shape, uint64_t config_hash,
                                 epx_status_t local_status, epx__cpu_moe_t **moe, epx__errbuf_t *err);
void epx__cpu_moe_destroy(epx__cpu_moe_t *m);

epx_status_t epx__cpu_moe_dispatch(epx__cpu_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                   epx_status_t local_status, epx__cpu_moe_handle_t **handle, epx__errbuf_t *err);
epx_status_t epx__cpu_moe_dispatch_cached(epx__cpu_moe_t *m, const epx__cpu_moe_handle_t *h,
                                          const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                          epx_status_t local_status, epx__errbuf_t *err);
epx_status_t epx__cpu_moe_combine(epx__cpu_moe_t *m, const epx__cpu_moe_handle_t *h, const epx_moe_combine_in_t *in,
                                  epx_moe_combine_out_t *out, epx_status_t local_status, epx__errbuf_t *err);
epx_status_t epx__cpu_moe_ll_dispatch(epx__cpu_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                      epx_moe_ll_dispatch_out_t *out, epx_status_t local_status,
                                      epx__cpu_moe_handle_t **handle, epx__errbuf_t *err);
epx_status_t epx__cpu_moe_ll_combine(epx__cpu_moe_t *m, const epx__cpu_moe_handle_t *h,
                                     const epx_moe_ll_combine_in_t *in, void *out, epx_status_t local_status,
                                     epx__errbuf_t *err);
/* out[h] = cast to `dtype` of the float32 sum, from +0 and in the order given, of w[i] *
 * rows[i][h] (w == NULL: of rows[i][h]); each weighted term is rounded (product), then
 * added: no FMA. The reduction of every high-throughput combine (the low-latency one:
 * epx__cpu_reduce_ll): same inputs, same bits. */
void epx__cpu_reduce_rows(void *out, epx_dtype_t dtype, const char *const *rows, const float *w, int n, int H);
/* The low-latency combine of one token (epx.h): its n <= EPX_MOE_MAX_TOPK terms w[i] *
 * rows[i] in ascending k, rank[i] the rank that holds the term's expert; out = cast of the
 * float32 sum, from +0, over the ranks ascending of each rank's partial sum (from +0, its
 * terms in ascending k). */
void epx__cpu_reduce_ll(void *out, epx_dtype_t dtype, const char *const *rows, const float *w, const int32_t *rank,
                        int n, int H);

void epx__cpu_moe_handle_free(epx__cpu_moe_handle_t *h);
int64_t epx__cpu_moe_handle_rows(const epx__cpu_moe_handle_t *h);
int epx__cpu_moe_handle_tokens(const epx__cpu_moe_handle_t *h);

#endif /* EPX_CPU_H */
