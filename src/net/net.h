/*
 * src/net: the transport between hosts for CPU ranks — MPI. Uses src/core only; no MPI
 * type appears here, so the layers above compile without mpi.h. Built from mpi.c when MPI
 * is found, else from stub.c (every entry point says so).
 *
 * Point-to-point exchanges are nonblocking underneath and every wait polls, yielding the
 * core between polls, bounded by the timeout the net was made with, counted from the
 * wait's start and again from each of its requests that completes (EPX_ERR_TIMEOUT past
 * it, never a hang).
 */
#ifndef EPX_NET_H
#define EPX_NET_H

#include "../core/core.h"

typedef struct epx__net epx__net_t;

/* Collective over the MPI communicator at `mpi_comm` (an MPI_Comm *): duplicate it, with
 * errors returned rather than fatal. */
epx_status_t epx__net_create(epx__net_t **net, const void *mpi_comm, int64_t timeout_ms, epx__errbuf_t *err);
/* Local: free the duplicate (MPI_Comm_free is collective in MPI; a broken comm is leaked
 * instead). */
void epx__net_destroy(epx__net_t *net, bool broken);

int epx__net_rank(const epx__net_t *net);
int epx__net_size(const epx__net_t *net);

/* Local: call fn(ctx) once for every MPI request of this net that completes, as its wait
 * sees it, collectives' too (a sign of this rank's progress for those who wait for it by
 * other means; NULL: none). The wait's own clock restarts after the calls. */
void epx__net_on_progress(epx__net_t *net, void (*fn)(void *ctx), void *ctx);

/* A buffer that MPI may still read or write after a wait on it failed (a send it was not
 * asked to take back, a receive it could not cancel): never freed, kept reachable for the
 * process's life (at most 64 are remembered; past that they are just never freed). */
void epx__net_abandon(void *buf);

/* Collective: group the ranks into hosts — blocks of `local_size` consecutive ranks when
 * > 0 (simulated hosts), else the ranks that share memory (MPI_COMM_TYPE_SHARED). Fills,
 * for every rank r, host_of[r] (hosts numbered by their lowest rank) and lrank_of[r] (its
 * index among its host's ranks, ascending rank order), and *machine_ranks (the ranks that
 * share memory with this one: more than its host's when hosts are simulated), and keeps a
 * communicator of this rank's host for epx__net_host_bcast. */
epx_status_t epx__net_topology(epx__net_t *net, int local_size, int *host_of, int *lrank_of, int *machine_ranks,
                               epx__errbuf_t *err);
/* Collective over this rank's host: `len` bytes from its local rank 0 to the others. */
epx_status_t epx__net_host_bcast(epx__net_t *net, void *buf, size_t len, epx__errbuf_t *err);

/* Collective: everyone's `len` bytes, rank-major. */
epx_status_t epx__net_allgather(epx__net_t *net, const void *mine, void *all, size_t len, epx__errbuf_t *err);
/* Collective: v[0..n) summed over all ranks, in place. */
epx_status_t epx__net_allreduce_sum(epx__net_t *net, int64_t *v, int n, epx__errbuf_t *err);
/* Collective: block q (`words` int64) of send[R * words] arrives as block `rank` of rank q's
 * recv[R * words]. Moves R * words * 8 bytes each way per rank.
 * Both collectives work in a buffer of the net's (the caller's arrays are free on return,
 * whatever the outcome) and end at the timeout with EPX_ERR_TIMEOUT (the net is then broken). */
epx_status_t epx__net_alltoall(epx__net_t *net, const int64_t *send, int64_t *recv, int words, epx__errbuf_t *err);

/* Local: room for the collectives above up to `coll` int64 (an alltoall's send and receive:
 * 2 R words) and for batches that move up to `bytes` in all, sent and received (a message
 * to and from every rank, and the further MPI requests of messages over 1 GiB), so that a
 * call within them allocates nothing once its peers expect it (a rank out of memory there
 * would leave them waiting). */
epx_status_t epx__net_room(epx__net_t *net, size_t coll, int64_t bytes, epx__errbuf_t *err);
/* Start one batch of point-to-point messages: sbytes[p] bytes from sbuf[p] to rank p and
 * rbytes[p] bytes from rank p into rbuf[p] (0 = no message), all with `tag` (0..4095:
 * batches in flight together need distinct tags). The sizes must match the peers'. One
 * batch at a time per net: epx__net_wait ends it. */
epx_status_t epx__net_start(epx__net_t *net, int tag, const void *const *sbuf, const int64_t *sbytes,
                            void *const *rbuf, const int64_t *rbytes, epx__errbuf_t *err);
/* Wait for the batch started last. EPX_ERR_TIMEOUT once none of its messages completed
 * for the timeout (the net is then broken). */
epx_status_t epx__net_wait(epx__net_t *net, epx__errbuf_t *err);

#endif /* EPX_NET_H */
