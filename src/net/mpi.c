/* src/net over MPI: a duplicated communicator, host grouping, bounded nonblocking waits. */
#include <limits.h>
#include <mpi.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "net.h"

/* Largest piece of one message (MPI counts are int). */
#define EPX__NET_CHUNK ((int64_t)1 << 30)

struct epx__net {
    MPI_Comm comm, host_comm;
    int rank, nranks;
    int64_t timeout_ms;
    MPI_Request *reqs; /* of the batch in flight: its receives first */
    int *done;         /* room for cap_reqs indices (MPI_Testsome's) */
    int nreqs, nrecv, cap_reqs;
    int64_t *coll; /* the buffer of the collectives (abandoned when one fails) */
    size_t cap_coll;
    void (*progress)(void *ctx); /* epx__net_on_progress */
    void *progress_ctx;
};

/* Buffers MPI may still use after a wait gave up on them (epx__net_abandon), kept
 * reachable here for the process's life. */
#define EPX__NET_ABANDONED_MAX 64
static void *epx__net_abandoned[EPX__NET_ABANDONED_MAX];
static int epx__net_nabandoned;
static pthread_mutex_t epx__net_abandoned_lock = PTHREAD_MUTEX_INITIALIZER;

void epx__net_abandon(void *buf)
{
    pthread_mutex_lock(&epx__net_abandoned_lock);
    if (epx__net_nabandoned < EPX__NET_ABANDONED_MAX) epx__net_abandoned[epx__net_nabandoned++] = buf;
    pthread_mutex_unlock(&epx__net_abandoned_lock); /* past the bound: left unreferenced, still never freed */
}

static epx_status_t epx__mpi_fail(epx__errbuf_t *err, int rc, const char *what)
{
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
    text[len] = '\0';
    return epx__fail(err, EPX_ERR_MPI, "%s failed: %s", what, len ? text : "unknown MPI error");
}

#define EPX__MPI_CHECK(call, what)                                                                \
    do {                                                                                          \
        int rc_ = (call);                                                                         \
        if (rc_ != MPI_SUCCESS) return epx__mpi_fail(err, rc_, what);                             \
    } while (0)

epx_status_t epx__net_create(epx__net_t **out, const void *mpi_comm, int64_t timeout_ms, epx__errbuf_t *err)
{
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (!init || fin) return epx__fail(err, EPX_ERR_INVALID_USAGE, "MPI is not initialised (call MPI_Init first)");
    epx__net_t *n = calloc(1, sizeof *n);
    if (!n) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    n->comm = n->host_comm = MPI_COMM_NULL;
    n->timeout_ms = timeout_ms;
    int rc = MPI_Comm_dup(*(const MPI_Comm *)mpi_comm, &n->comm);
    if (rc != MPI_SUCCESS) {
        free(n);
        return epx__mpi_fail(err, rc, "MPI_Comm_dup");
    }
    MPI_Comm_set_errhandler(n->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(n->comm, &n->rank);
    MPI_Comm_size(n->comm, &n->nranks);
    *out = n;
    return EPX_SUCCESS;
}

void epx__net_destroy(epx__net_t *n, bool broken)
{
    if (!n) return;
    int fin = 0;
    MPI_Finalized(&fin);
    if (!broken && !fin) {
        if (n->host_comm != MPI_COMM_NULL) MPI_Comm_free(&n->host_comm);
        MPI_Comm_free(&n->comm);
    }
    free(n->reqs);
    free(n->done);
    free(n->coll);
    free(n);
}

int epx__net_rank(const epx__net_t *n) { return n->rank; }
int epx__net_size(const epx__net_t *n) { return n->nranks; }

epx_status_t epx__net_topology(epx__net_t *n, int local_size, int *host_of, int *lrank_of, int *machine_ranks,
                               epx__errbuf_t *err)
{
    int R = n->nranks;
    int leader = 0; /* lowest rank of my host */
    MPI_Comm shared;
    EPX__MPI_CHECK(MPI_Comm_split_type(n->comm, MPI_COMM_TYPE_SHARED, n->rank, MPI_INFO_NULL, &shared),
                   "MPI_Comm_split_type");
    int rc = MPI_Comm_size(shared, machine_ranks);
    const char *what = "MPI_Comm_size";
    if (rc == MPI_SUCCESS && local_size > 0) {
        leader = n->rank / local_size * local_size;
    } else if (rc == MPI_SUCCESS) {
        what = "MPI_Allreduce";
        rc = MPI_Allreduce(&n->rank, &leader, 1, MPI_INT, MPI_MIN, shared);
    }
    MPI_Comm_free(&shared);
    if (rc != MPI_SUCCESS) return epx__mpi_fail(err, rc, what);
    int *leaders = malloc(sizeof(int) * (size_t)R);
    if (!leaders) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    rc = MPI_Allgather(&leader, 1, MPI_INT, leaders, 1, MPI_INT, n->comm);
    if (rc != MPI_SUCCESS) {
        free(leaders);
        return epx__mpi_fail(err, rc, "MPI_Allgather");
    }
    /* Hosts numbered in the order of their leaders; local ranks in rank order. */
    int hosts = 0;
    for (int r = 0; r < R; r++) {
        if (leaders[r] == r) {
            host_of[r] = hosts++;
            lrank_of[r] = 0;
        } else {
            host_of[r] = host_of[leaders[r]];
            int l = 0;
            for (int q = 0; q < r; q++) l += leaders[q] == leaders[r];
            lrank_of[r] = l;
        }
    }
    free(leaders);
    if (n->host_comm != MPI_COMM_NULL) MPI_Comm_free(&n->host_comm);
    EPX__MPI_CHECK(MPI_Comm_split(n->comm, host_of[n->rank], n->rank, &n->host_comm), "MPI_Comm_split");
    MPI_Comm_set_errhandler(n->host_comm, MPI_ERRORS_RETURN);
    return EPX_SUCCESS;
}

epx_status_t epx__net_host_bcast(epx__net_t *n, void *buf, size_t len, epx__errbuf_t *err)
{
    if (n->host_comm == MPI_COMM_NULL) return epx__fail(err, EPX_ERR_INTERNAL, "host broadcast before the topology");
    EPX__MPI_CHECK(MPI_Bcast(buf, (int)len, MPI_BYTE, 0, n->host_comm), "MPI_Bcast");
    return EPX_SUCCESS;
}

epx_status_t epx__net_allgather(epx__net_t *n, const void *mine, void *all, size_t len, epx__errbuf_t *err)
{
    EPX__MPI_CHECK(MPI_Allgather(mine, (int)len, MPI_BYTE, all, (int)len, MPI_BYTE, n->comm), "MPI_Allgather");
    return EPX_SUCCESS;
}

/* Poll `reqs` to completion, yielding the core between polls; `done` has room for count
 * indices. EPX_ERR_TIMEOUT once none of them completed for the net's timeout (counted from
 * the start, and again from each completion: a large batch that moves is not a stall). */
static epx_status_t epx__net_poll(epx__net_t *n, MPI_Request *reqs, int count, int *done, const char *what,
                                  epx__errbuf_t *err)
{
    const uint64_t window = epx__ms_to_ns(n->timeout_ms); /* saturates: a huge timeout never ends */
    uint64_t last = epx__now_ns(); /* the start, or the last completion */
    for (unsigned i = 0;; i++) {
        int got = 0;
        int rc = MPI_Testsome(count, reqs, &got, done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS) return epx__mpi_fail(err, rc, what);
        if (got == MPI_UNDEFINED) return EPX_SUCCESS; /* none left active (count 0 included) */
        if (got > 0) {
            for (int k = 0; k < got && n->progress; k++) n->progress(n->progress_ctx);
            last = epx__now_ns(); /* after the hooks: what they take is this rank's own time */
        } else if (i >= 64) {
            if (epx__now_ns() - last >= window)
                return epx__fail(err, EPX_ERR_TIMEOUT, "rank %d timed out in %s: nothing arrived or left for %lld ms",
                                 n->rank, what, (long long)n->timeout_ms);
            sched_yield();
        }
    }
}

void epx__net_on_progress(epx__net_t *n, void (*fn)(void *ctx), void *ctx)
{
    n->progress = fn;
    n->progress_ctx = ctx;
}

/* The collectives work in a buffer of the net's own: one that timed out stays in flight (a
 * nonblocking collective cannot be cancelled), and a late peer's part may still complete it,
 * so its buffer is abandoned (once per broken communicator), never the caller's. */
static epx_status_t epx__net_coll_buf(epx__net_t *n, size_t count, int64_t **buf, epx__errbuf_t *err)
{
    if (count > n->cap_coll || !n->coll) {
        free(n->coll);
        n->cap_coll = 0;
        n->coll = malloc(sizeof *n->coll * EPX__MAX(count, (size_t)1));
        if (!n->coll) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        n->cap_coll = EPX__MAX(count, (size_t)1);
    }
    *buf = n->coll;
    return EPX_SUCCESS;
}

/* Wait for the collective `req` started on n->coll; past the timeout the buffer is MPI's. */
static epx_status_t epx__net_coll_wait(epx__net_t *n, MPI_Request *req, const char *what, epx__errbuf_t *err)
{
    int done;
    epx_status_t st = epx__net_poll(n, req, 1, &done, what, err);
    if (st != EPX_SUCCESS) {
        epx__net_abandon(n->coll); /* still MPI's */
        n->coll = NULL;
        n->cap_coll = 0;
    }
    return st;
}

epx_status_t epx__net_allreduce_sum(epx__net_t *n, int64_t *v, int count, epx__errbuf_t *err)
{
    int64_t *b = NULL;
    EPX__CHECK(epx__net_coll_buf(n, (size_t)count, &b, err));
    memcpy(b, v, sizeof *v * (size_t)count);
    MPI_Request req;
    EPX__MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, b, count, MPI_INT64_T, MPI_SUM, n->comm, &req), "MPI_Iallreduce");
    epx_status_t st = epx__net_coll_wait(n, &req, "MPI_Iallreduce", err);
    if (st == EPX_SUCCESS) memcpy(v, b, sizeof *v * (size_t)count);
    return st;
}

epx_status_t epx__net_alltoall(epx__net_t *n, const int64_t *send, int64_t *recv, int words, epx__errbuf_t *err)
{
    size_t all = (size_t)n->nranks * (size_t)words; /* send, then recv, in the net's buffer */
    int64_t *b = NULL;
    EPX__CHECK(epx__net_coll_buf(n, 2 * all, &b, err));
    memcpy(b, send, sizeof *send * all);
    MPI_Request req;
    EPX__MPI_CHECK(MPI_Ialltoall(b, words, MPI_INT64_T, b + all, words, MPI_INT64_T, n->comm, &req), "MPI_Ialltoall");
    epx_status_t st = epx__net_coll_wait(n, &req, "MPI_Ialltoall", err);
    if (st == EPX_SUCCESS) memcpy(recv, b + all, sizeof *recv * all);
    return st;
}

static epx_status_t epx__net_reserve(epx__net_t *n, int64_t want, epx__errbuf_t *err)
{
    if (want <= n->cap_reqs) return EPX_SUCCESS;
    if (want > INT_MAX) return epx__fail(err, EPX_ERR_NO_MEMORY, "a batch of %lld MPI requests", (long long)want);
    MPI_Request *r = realloc(n->reqs, sizeof *r * (size_t)want);
    if (r) n->reqs = r;
    int *d = r ? realloc(n->done, sizeof *d * (size_t)want) : NULL;
    if (!d) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    n->done = d;
    n->cap_reqs = (int)want;
    return EPX_SUCCESS;
}

static void epx__net_drop(epx__net_t *n);

epx_status_t epx__net_room(epx__net_t *n, size_t coll, int64_t bytes, epx__errbuf_t *err)
{
    int64_t *b = NULL;
    if (coll) EPX__CHECK(epx__net_coll_buf(n, coll, &b, err));
    /* A message of len > 0 bytes takes ceil(len / CHUNK) <= 1 + floor(len / CHUNK) requests,
     * and the floors of a batch's messages add up to at most floor(bytes / CHUNK). */
    return epx__net_reserve(n, 2 * (int64_t)n->nranks + EPX__MAX(bytes, (int64_t)0) / EPX__NET_CHUNK, err);
}

epx_status_t epx__net_start(epx__net_t *n, int tag, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                            const int64_t *rbytes, epx__errbuf_t *err)
{
    int64_t pieces = 0;
    for (int p = 0; p < n->nranks; p++)
        pieces += (sbytes[p] + EPX__NET_CHUNK - 1) / EPX__NET_CHUNK + (rbytes[p] + EPX__NET_CHUNK - 1) / EPX__NET_CHUNK;
    EPX__CHECK(epx__net_reserve(n, pieces, err)); /* grows only past the room callers made (epx__net_room) */
    n->nreqs = n->nrecv = 0;
    /* Receives first, so that eager sends find them posted. */
    for (int side = 0; side < 2; side++)
        for (int i = 0; i < n->nranks; i++) {
            int p = (n->rank + (side ? i : n->nranks - i)) % n->nranks;
            int64_t len = side ? sbytes[p] : rbytes[p];
            for (int64_t off = 0; off < len; off += EPX__NET_CHUNK) {
                int piece = (int)EPX__MIN(EPX__NET_CHUNK, len - off);
                int rc = side ? MPI_Isend((const char *)sbuf[p] + off, piece, MPI_BYTE, p, tag, n->comm, &n->reqs[n->nreqs])
                              : MPI_Irecv((char *)rbuf[p] + off, piece, MPI_BYTE, p, tag, n->comm, &n->reqs[n->nreqs]);
                if (rc != MPI_SUCCESS) { /* what was posted must not land later in memory taken back */
                    epx_status_t st = epx__mpi_fail(err, rc, side ? "MPI_Isend" : "MPI_Irecv");
                    epx__net_drop(n);
                    return st;
                }
                n->nreqs++;
                n->nrecv += !side;
            }
        }
    return EPX_SUCCESS;
}

/* A batch whose wait failed (the communicator is broken by it): no late message may land
 * in memory the caller takes back. The receives still pending are cancelled (one already
 * matched completes first, given a short grace), the sends are left to MPI. */
static void epx__net_drop(epx__net_t *n)
{
    const uint64_t grace = epx__deadline_after_ms(200);
    for (int i = 0; i < n->nreqs; i++) {
        if (n->reqs[i] == MPI_REQUEST_NULL) continue;
        if (i >= n->nrecv) {
            MPI_Request_free(&n->reqs[i]);
            continue;
        }
        MPI_Cancel(&n->reqs[i]);
        int done = 0;
        while (MPI_Test(&n->reqs[i], &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && !done && epx__now_ns() < grace)
            sched_yield();
        if (!done)
            EPX_WARN(NET, "rank %d: a receive of a failed exchange could not be cancelled; its buffer stays MPI's",
                     n->rank);
    }
    n->nreqs = n->nrecv = 0;
}

epx_status_t epx__net_wait(epx__net_t *n, epx__errbuf_t *err)
{
    epx_status_t st = epx__net_poll(n, n->reqs, n->nreqs, n->done, "a point-to-point exchange", err);
    if (st == EPX_SUCCESS) n->nreqs = n->nrecv = 0;
    else epx__net_drop(n);
    return st;
}
