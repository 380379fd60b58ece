/*
 * src/nccl: the transport between GPU hosts — NCCL point-to-point. Uses src/core and the
 * CUDA runtime only; no NCCL type appears here, so the layers above compile without
 * nccl.h. Built from nccl.c when NCCL's headers are found (libnccl.so.2 is loaded at run
 * time, so libepx loads on machines without it), else from stub.c.
 *
 * Every wait is bounded: communicators are non-blocking (blocking = 0) and each wait polls
 * ncclCommGetAsyncError and the stream until a deadline; past it an owned communicator is
 * aborted and the call returns EPX_ERR_TIMEOUT. NCCL errors return EPX_ERR_NCCL. A
 * communicator's creation may also watch its peers (epx__nccl_watch_t) and give up early.
 *
 * Between calls an owned communicator has a watchdog thread: a group that its stream
 * reached EPX_TIMEOUT_MS ago and that has not finished (a peer that died or stalled after
 * the call returned), or an error NCCL reports, aborts it, so work left on the caller's
 * streams ends; every later call then returns that verdict (epx__nccl_check_async too).
 * Groups enqueued on a capturing stream are not followed (a graph's replays are its
 * caller's: the layer above may watch them, epx__nccl_watch_between).
 * Entry points may be called from any thread; they take turns on a communicator.
 */
#ifndef EPX_NCCL_H
#define EPX_NCCL_H

#include "../core/core.h"

#define EPX__NCCL_ID_BYTES 128 /* sizeof(ncclUniqueId) */

typedef struct epx__nccl epx__nccl_t;

/* Is NCCL usable here (built in, library loadable)? On false, *why says why. */
bool epx__nccl_available(const char **why);

/* What a wait for peers also looks at, about every millisecond: a failure `check` returns
 * (a peer that NCCL waits for is gone, e.g. its TCP link closed) ends the wait at once. */
typedef struct {
    epx_status_t (*check)(void *ctx, epx__errbuf_t *err);
    void *ctx;
} epx__nccl_watch_t;

/* A new unique id (on one rank; hand it to the others). */
epx_status_t epx__nccl_get_id(void *id, epx__errbuf_t *err);
/* Collective over the `nranks` ranks given `id`: a communicator on the current device,
 * created non-blocking and waited for until `timeout_ms`. `watch` (may be NULL) is checked
 * while the creation waits for the peers: on its failure the creation is abandoned (the
 * communicator aborted) and its status returned, so a peer that failed before or in its
 * own creation costs milliseconds, not the timeout. */
epx_status_t epx__nccl_create(epx__nccl_t **nccl, int nranks, int rank, const void *id, int64_t timeout_ms,
                              const epx__nccl_watch_t *watch, epx__errbuf_t *err);
/* Wrap the caller's ncclComm_t (not owned: never destroyed or aborted here). */
epx_status_t epx__nccl_adopt(epx__nccl_t **nccl, void *nccl_comm, int64_t timeout_ms, epx__errbuf_t *err);
/* What the watchdog also looks at (owned communicators; set once, before any work): when
 * `failed` fails (this rank's device recorded an error: its results are void), a group left
 * waiting is given a quarter of EPX_TIMEOUT_MS, not all of it (long enough for the groups
 * that carry this rank's failure to its peers), and the communicator is then aborted with
 * its status. When `stalled` fails (work on the device has waited on NCCL transfers for
 * EPX_TIMEOUT_MS where the watchdog follows no group: a CUDA graph's replay), the
 * communicator is aborted at once with its status. Either may be NULL. Checks run on the
 * watchdog's thread, with the communicator held: cheap, thread-safe, and never calling into
 * src/nccl; once one failed it is not called again. */
void epx__nccl_watch_between(epx__nccl_t *nccl, const epx__nccl_watch_t *failed, const epx__nccl_watch_t *stalled);
/* Local. `abort`: ncclCommAbort instead of a clean destroy (owned communicators only). */
void epx__nccl_destroy(epx__nccl_t *nccl, bool abort);
/* After a failure that left some peers' operations unmatched: an owned communicator is
 * aborted now (its peers' NCCL operations then fail instead of waiting); an adopted one is
 * left to its owner. Either way every later call on `nccl` fails at once with
 * EPX_ERR_ABORTED. Local; idempotent. */
void epx__nccl_abort(epx__nccl_t *nccl);
bool epx__nccl_aborted(epx__nccl_t *nccl);
/* The error that broke the communicator without a call of epx's: the watchdog's verdict, or
 * one NCCL reports now (EPX_ERR_NCCL); EPX_SUCCESS while healthy (or NULL). Local. */
epx_status_t epx__nccl_check_async(epx__nccl_t *nccl, epx__errbuf_t *err);
int epx__nccl_rank(const epx__nccl_t *nccl);
int epx__nccl_size(const epx__nccl_t *nccl);
/* The CUDA device of the communicator. */
int epx__nccl_device(const epx__nccl_t *nccl);

/* Enqueue one group on `stream` (a cudaStream_t): sbytes[p] bytes of device memory from
 * sbuf[p] to peer p, rbytes[p] from peer p into rbuf[p] (0 = none); with stat_bytes > 0
 * also, with every peer p where stat_with[p] (data or not; both sides must name each
 * other), stat_bytes from sstat to the peer and from it into rstat + p * stat_bytes (a
 * status that travels with the data). Returns once NCCL has enqueued the group; the data
 * is there when the stream reaches it. */
epx_status_t epx__nccl_post(epx__nccl_t *nccl, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                            const int64_t *rbytes, const unsigned char *stat_with, const void *sstat, void *rstat,
                            size_t stat_bytes, void *stream, uint64_t deadline, epx__errbuf_t *err);
/* Wait until `stream` has run everything enqueued so far, watching the communicator. */
epx_status_t epx__nccl_wait(epx__nccl_t *nccl, void *stream, uint64_t deadline, epx__errbuf_t *err);
/* The same exchange for host buffers: staged through device memory on an internal
 * stream; complete on return. rbuf[p] may be NULL: what p sends is then dropped. */
epx_status_t epx__nccl_host_xchg(epx__nccl_t *nccl, const void *const *sbuf, const int64_t *sbytes,
                                 void *const *rbuf, const int64_t *rbytes, uint64_t deadline, epx__errbuf_t *err);

#endif /* EPX_NCCL_H */
