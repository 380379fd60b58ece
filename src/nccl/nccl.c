/* src/nccl with NCCL: libnccl.so.2 loaded at run time, non-blocking communicators. */
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nccl.h"

_Static_assert(sizeof(ncclUniqueId) == EPX__NCCL_ID_BYTES, "ncclUniqueId size");

/* The NCCL calls epx makes, resolved once. */
static struct {
    ncclResult_t (*get_unique_id)(ncclUniqueId *);
    ncclResult_t (*init_rank_config)(ncclComm_t *, int, ncclUniqueId, int, ncclConfig_t *);
    ncclResult_t (*async_error)(ncclComm_t, ncclResult_t *);
    ncclResult_t (*abort)(ncclComm_t);
    ncclResult_t (*finalize)(ncclComm_t);
    ncclResult_t (*destroy)(ncclComm_t);
    ncclResult_t (*group_start)(void);
    ncclResult_t (*group_end)(void);
    ncclResult_t (*send)(const void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*recv)(void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*count)(const ncclComm_t, int *);
    ncclResult_t (*user_rank)(const ncclComm_t, int *);
    ncclResult_t (*cu_device)(const ncclComm_t, int *);
    const char *(*error_string)(ncclResult_t);
    const char *(*last_error)(ncclComm_t);
    bool ok;
    char why[256];
} epx__nc;
static pthread_once_t epx__nc_once = PTHREAD_ONCE_INIT;

static void epx__nc_load(void)
{
    /* The process's NCCL when one is loaded already (torch, the caller's), else ours. */
    static const char *const names[] = {"libnccl.so.2", "libnccl.so",
#ifdef EPX_NCCL_LIBRARY
                                        EPX_NCCL_LIBRARY
#endif
    };
    void *lib = NULL;
    for (size_t i = 0; i < EPX__ARRAY_LEN(names) && !lib; i++) lib = dlopen(names[i], RTLD_NOW | RTLD_GLOBAL);
    if (!lib) {
        snprintf(epx__nc.why, sizeof epx__nc.why, "libnccl.so.2 could not be loaded (%s)", dlerror());
        return;
    }
#define EPX__SYM(field, name)                                                                                  \
    do {                                                                                                       \
        *(void **)&epx__nc.field = dlsym(lib, name);                                                           \
        if (!epx__nc.field) {                                                                                  \
            snprintf(epx__nc.why, sizeof epx__nc.why, "libnccl.so.2 lacks %s (NCCL >= 2.19 needed)", name);    \
            return;                                                                                            \
        }                                                                                                      \
    } while (0)
    EPX__SYM(get_unique_id, "ncclGetUniqueId");
    EPX__SYM(init_rank_config, "ncclCommInitRankConfig");
    EPX__SYM(async_error, "ncclCommGetAsyncError");
    EPX__SYM(abort, "ncclCommAbort");
    EPX__SYM(finalize, "ncclCommFinalize");
    EPX__SYM(destroy, "ncclCommDestroy");
    EPX__SYM(group_start, "ncclGroupStart");
    EPX__SYM(group_end, "ncclGroupEnd");
    EPX__SYM(send, "ncclSend");
    EPX__SYM(recv, "ncclRecv");
    EPX__SYM(count, "ncclCommCount");
    EPX__SYM(user_rank, "ncclCommUserRank");
    EPX__SYM(cu_device, "ncclCommCuDevice");
    EPX__SYM(error_string, "ncclGetErrorString");
    EPX__SYM(last_error, "ncclGetLastError");
#undef EPX__SYM
    epx__nc.ok = true;
}

bool epx__nccl_available(const char **why)
{
    pthread_once(&epx__nc_once, epx__nc_load);
    if (why) *why = epx__nc.why;
    return epx__nc.ok;
}

/* One NCCL group the watchdog follows: `start` recorded on its stream before it, `end` after. */
typedef struct {
    cudaEvent_t start, end;
    uint64_t reached_ns; /* when the watchdog first saw `start` done (the stream reached the group); 0 before */
    bool live;           /* recorded and not yet seen done */
} epx__nc_watched_t;

#define EPX__NC_RING 64 /* groups followed at once; while all are in flight, a newer one is not followed */

struct epx__nccl {
    /* One thread on the communicator at a time, as NCCL requires: every entry point below
     * and the watchdog hold it; the internal helpers (epx__nc_*) expect it held. */
    pthread_mutex_t mu;
    ncclComm_t comm; /* NULL once aborted here */
    bool owned;
    bool dead; /* epx__nccl_abort was called (an adopted communicator is left to its owner) */
    int rank, nranks, device;
    int64_t timeout_ms;
    cudaStream_t stream; /* host-staged exchanges */
    char *dbuf;          /* their device staging, stream-ordered on `stream`: freeing it never waits */
    size_t dbuf_bytes;
    bool dbuf_sync;      /* no stream-ordered allocator here: dbuf is cudaMalloc'd */
    const void **ds; /* [nranks] staging pointers of one exchange */
    void **dr;
    /* The watchdog (owned communicators): a thread that, between epx's calls, aborts the
     * communicator when a group its stream reached EPX_TIMEOUT_MS ago has not finished, or
     * NCCL reports an error; its verdict (dog_status, dog_msg) answers every later call. */
    bool dog_on, dog_stop;
    pthread_t dog;
    pthread_cond_t dog_cv; /* CLOCK_MONOTONIC; signalled to stop */
    epx__nc_watched_t ring[EPX__NC_RING];
    int ring_next;
    epx__nccl_watch_t dog_watch, dog_stall; /* epx__nccl_watch_between's failed, stalled; check NULL: none */
    epx_status_t watch_failed;   /* what dog_watch said once it failed (not asked again) */
    char watch_msg[EPX__ERRMSG_LEN];
    epx_status_t dog_status;
    char dog_msg[EPX__ERRMSG_LEN];
    /* ncclCommAbort's thread (owned communicators; started before NCCL's init, so that no
     * abort runs on a caller's thread): it waits for abort_comm under abort_mu, takes it
     * (abort_taken: it no longer touches n), aborts it and ends. epx__nccl_destroy joins
     * it within a bound, or lets it go. Lock order: mu, then abort_mu. */
    pthread_t aborter;
    bool aborter_on;
    pthread_mutex_t abort_mu;
    pthread_cond_t abort_cv;
    ncclComm_t abort_comm;
    int abort_device;
    bool abort_quit, abort_taken;
};

static void epx__nc_staging_free(epx__nccl_t *n)
{
    if (n->dbuf && n->dbuf_sync)
        cudaFree(n->dbuf);
    else if (n->dbuf)
        cudaFreeAsync(n->dbuf, n->stream);
    n->dbuf = NULL;
    n->dbuf_bytes = 0;
}

/* The staging of host exchanges, grown (never shrunk) on the internal stream. */
static epx_status_t epx__nc_staging(epx__nccl_t *n, size_t bytes, epx__errbuf_t *err)
{
    if (bytes <= n->dbuf_bytes) return EPX_SUCCESS;
    epx__nc_staging_free(n);
    size_t want = EPX__MAX(bytes, (size_t)1 << 20);
    cudaError_t ce = n->dbuf_sync ? cudaErrorNotSupported : cudaMallocAsync((void **)&n->dbuf, want, n->stream);
    if (ce == cudaErrorNotSupported) {
        cudaGetLastError();
        n->dbuf_sync = true;
        ce = cudaMalloc((void **)&n->dbuf, want);
    }
    if (ce != cudaSuccess) {
        n->dbuf = NULL;
        cudaGetLastError();
        return epx__fail(err, EPX_ERR_CUDA, "NCCL staging (%zu bytes): %s", want, cudaGetErrorString(ce));
    }
    n->dbuf_bytes = want;
    return EPX_SUCCESS;
}

/* Can the communicator still move data? */
static epx_status_t epx__nc_live(const epx__nccl_t *n, epx__errbuf_t *err)
{
    if (n->dog_status != EPX_SUCCESS)
        return epx__fail(err, n->dog_status, "the NCCL watchdog aborted the communicator: %s", n->dog_msg);
    if (n->dead || !n->comm)
        return epx__fail(err, EPX_ERR_ABORTED,
                         "the NCCL communicator was aborted after an earlier failure: abort the epx communicator and "
                         "create a new one");
    return EPX_SUCCESS;
}

static epx_status_t epx__nc_fail(ncclComm_t comm, ncclResult_t r, epx__errbuf_t *err, const char *what)
{
    const char *last = comm ? epx__nc.last_error(comm) : NULL;
    return epx__fail(err, EPX_ERR_NCCL, "%s: %s%s%s", what, epx__nc.error_string(r), last && last[0] ? ": " : "",
                     last ? last : "");
}

#define EPX__NC_WATCH_NS 1000000 /* how often a wait runs its watch */

/* EPX_ERR_NCCL about `what` when NCCL reports an error on comm now (its state neither a
 * success nor in progress), else EPX_SUCCESS. */
static epx_status_t epx__nc_async(ncclComm_t comm, epx__errbuf_t *err, const char *what)
{
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = epx__nc.async_error(comm, &state);
    if (r == ncclSuccess && (state == ncclSuccess || state == ncclInProgress)) return EPX_SUCCESS;
    return epx__nc_fail(comm, r != ncclSuccess ? r : state, err, what);
}

/* The text of an error message ("NAME: text", NAME that of st). */
static const char *epx__nc_text(epx_status_t st, const epx__errbuf_t *e)
{
    const char *name = epx_status_name(st), *msg = e->msg;
    size_t k = strlen(name);
    return strncmp(msg, name, k) == 0 && msg[k] == ':' && msg[k + 1] == ' ' ? msg + k + 2 : msg;
}

/* The abort thread: waits for a communicator to abort (or to be told to quit), aborts it. In
 * relaxed capture mode, so that ncclCommAbort never invalidates another thread's capture. */
static void *epx__nc_aborter(void *arg)
{
    epx__nccl_t *n = arg;
    enum cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    pthread_mutex_lock(&n->abort_mu);
    while (!n->abort_comm && !n->abort_quit) pthread_cond_wait(&n->abort_cv, &n->abort_mu);
    ncclComm_t c = n->abort_comm;
    int device = n->abort_device;
    n->abort_taken = true;
    pthread_cond_broadcast(&n->abort_cv);
    pthread_mutex_unlock(&n->abort_mu); /* n is not touched from here: destroy may free it */
    if (c) {
        cudaSetDevice(device);
        epx__nc.abort(c);
    }
    return NULL;
}

static bool epx__nc_aborter_start(epx__nccl_t *n)
{
    if (pthread_mutex_init(&n->abort_mu, NULL) != 0) return false;
    if (pthread_cond_init(&n->abort_cv, NULL) != 0) {
        pthread_mutex_destroy(&n->abort_mu);
        return false;
    }
    if (pthread_create(&n->aborter, NULL, epx__nc_aborter, n) != 0) {
        pthread_cond_destroy(&n->abort_cv);
        pthread_mutex_destroy(&n->abort_mu);
        return false;
    }
    n->aborter_on = true;
    return true;
}

/* End n's communicator now (mu held, or no other epx thread on n): n->comm becomes NULL.
 * ncclCommAbort first raises NCCL's abort flags, so that its kernels, running or queued on
 * any stream, end; but it returns only once every CUDA graph that captured work on the
 * communicator is destroyed. So the abort thread runs it, and no caller, watchdog or call,
 * waits for the application's graphs. */
static void epx__nc_abort_now(epx__nccl_t *n)
{
    ncclComm_t c = n->comm;
    n->comm = NULL;
    if (!c) return;
    if (!n->aborter_on) { /* (an owned communicator always has the thread) */
        epx__nc.abort(c);
        return;
    }
    pthread_mutex_lock(&n->abort_mu);
    n->abort_comm = c; /* (one communicator, aborted once: n->comm is NULL from here) */
    n->abort_device = n->device;
    pthread_cond_signal(&n->abort_cv);
    pthread_mutex_unlock(&n->abort_mu);
}

/* Wait for a non-blocking call on n->comm to finish (its state leaves ncclInProgress), running
 * `watch` (may be NULL) about every millisecond. At the deadline, or when the watch fails, an
 * owned communicator is aborted and *comm becomes NULL (never aborted twice). */
static epx_status_t epx__nc_settle(epx__nccl_t *n, bool owned, uint64_t deadline, const epx__nccl_watch_t *watch,
                                   epx__errbuf_t *err, const char *what)
{
    ncclComm_t *comm = &n->comm;
    uint64_t next_watch = epx__now_ns() + EPX__NC_WATCH_NS;
    for (;;) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t r = epx__nc.async_error(*comm, &state);
        if (r != ncclSuccess) return epx__nc_fail(*comm, r, err, what);
        if (state == ncclSuccess) return EPX_SUCCESS;
        if (state != ncclInProgress) return epx__nc_fail(*comm, state, err, what);
        uint64_t now = epx__now_ns();
        if (now >= deadline) {
            if (owned) epx__nc_abort_now(n);
            return epx__fail(err, EPX_ERR_TIMEOUT, "%s: NCCL did not finish within EPX_TIMEOUT_MS%s", what,
                             owned ? " (communicator aborted)" : "");
        }
        if (watch && now >= next_watch) {
            epx__errbuf_t why = {{0}};
            epx_status_t w = watch->check(watch->ctx, &why);
            if (w != EPX_SUCCESS) {
                if (owned) epx__nc_abort_now(n);
                return epx__fail(err, w, "%s abandoned%s: %s", what, owned ? " (communicator aborted)" : "",
                                 epx__nc_text(w, &why));
            }
            next_watch = now + EPX__NC_WATCH_NS;
        }
        sched_yield();
    }
}

/* ---- The watchdog -------------------------------------------------------------------------------- */

/* Before a group is enqueued on `stream` (mu held): its slot in the ring, `start` recorded
 * there; NULL when nothing is followed (no watchdog, a capturing stream, an event CUDA
 * would not record, or every slot holds a group still in flight: the oldest ones stay
 * followed, as the communicator runs its groups in order and a hang stops the oldest). The
 * slot counts once epx__nc_followed recorded its end. */
static epx__nc_watched_t *epx__nc_follow(epx__nccl_t *n, cudaStream_t stream)
{
    if (!n->dog_on) return NULL;
    enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    epx__nc_watched_t *w = &n->ring[n->ring_next]; /* the oldest slot */
    if (w->live && cudaEventQuery(w->end) == cudaErrorNotReady) return NULL;
    w->live = false;
    if (cudaStreamIsCapturing(stream, &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone ||
        cudaEventRecord(w->start, stream) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return w;
}

/* After the group of slot w was enqueued on `stream` (mu held): its end recorded; followed. */
static void epx__nc_followed(epx__nccl_t *n, epx__nc_watched_t *w, cudaStream_t stream)
{
    if (!w) return;
    if (cudaEventRecord(w->end, stream) != cudaSuccess) {
        cudaGetLastError();
        return;
    }
    w->reached_ns = 0;
    w->live = true;
    n->ring_next = (n->ring_next + 1) % EPX__NC_RING;
}

/* The watchdog's verdict (mu held): the communicator aborted, every later call answered with st. */
static void epx__nc_dog_abort(epx__nccl_t *n, epx_status_t st, const char *msg)
{
    snprintf(n->dog_msg, sizeof n->dog_msg, "%s", msg);
    n->dog_status = st;
    EPX_WARN(NET, "NCCL communicator (rank %d of %d) aborted by the watchdog: %s", n->rank, n->nranks, msg);
    epx__nc_abort_now(n);
    n->dead = true;
}

/* One look (mu held, no epx call in nccl.c): every followed group that is done leaves the
 * ring; the oldest one left, once its stream has reached it, is at the head of the
 * communicator's queue (NCCL runs a communicator's groups in the order they were posted,
 * whatever their streams): when it has been there EPX_TIMEOUT_MS without finishing, or NCCL
 * reports an error, the communicator is aborted. Work queued before a group (the caller's on
 * its stream, earlier groups) does not count against it. So it is when the stalled watch
 * fails (first). */
static void epx__nc_dog_look(epx__nccl_t *n)
{
    if (n->dog_stall.check) {
        epx__errbuf_t why = {{0}};
        epx_status_t st = n->dog_stall.check(n->dog_stall.ctx, &why);
        if (st != EPX_SUCCESS) {
            epx__nc_dog_abort(n, st, epx__nc_text(st, &why));
            return;
        }
    }
    if (n->dog_watch.check && n->watch_failed == EPX_SUCCESS) {
        epx__errbuf_t why = {{0}};
        epx_status_t st = n->dog_watch.check(n->dog_watch.ctx, &why);
        if (st != EPX_SUCCESS) {
            snprintf(n->watch_msg, sizeof n->watch_msg, "%s", epx__nc_text(st, &why));
            n->watch_failed = st;
        }
    }
    uint64_t now = epx__now_ns(), limit = epx__ms_to_ns(n->timeout_ms);
    if (n->watch_failed != EPX_SUCCESS) limit /= 4;
    bool head = true; /* no older group is still in flight */
    for (int k = 0; k < EPX__NC_RING; k++) { /* oldest first */
        epx__nc_watched_t *w = &n->ring[(n->ring_next + k) % EPX__NC_RING];
        if (!w->live) continue;
        if (cudaEventQuery(w->end) != cudaErrorNotReady) { /* done (a device error shows elsewhere) */
            w->live = false;
            continue;
        }
        if (!head) continue;
        head = false;
        if (!w->reached_ns) {
            if (cudaEventQuery(w->start) == cudaSuccess) w->reached_ns = now;
            continue;
        }
        if (now - w->reached_ns >= limit) {
            char msg[EPX__ERRMSG_LEN];
            if (n->watch_failed != EPX_SUCCESS)
                snprintf(msg, sizeof msg,
                         "an NCCL exchange that its stream reached %.0f ms ago had not finished, after: %.300s",
                         (double)(now - w->reached_ns) / 1e6, n->watch_msg);
            else
                snprintf(msg, sizeof msg,
                         "an NCCL exchange that its stream reached %.0f ms ago has not finished (EPX_TIMEOUT_MS %lld: "
                         "a peer is late or gone)",
                         (double)(now - w->reached_ns) / 1e6, (long long)n->timeout_ms);
            epx__nc_dog_abort(n, n->watch_failed != EPX_SUCCESS ? n->watch_failed : EPX_ERR_TIMEOUT, msg);
            return;
        }
    }
    cudaGetLastError(); /* an event query's error is not this thread's to keep */
    epx__errbuf_t why = {{0}};
    epx_status_t st = epx__nc_async(n->comm, &why, "NCCL reported an error");
    if (st != EPX_SUCCESS) epx__nc_dog_abort(n, st, epx__nc_text(st, &why));
}

static void *epx__nc_dog_main(void *arg)
{
    epx__nccl_t *n = arg;
    cudaSetDevice(n->device);
    /* Its queries never invalidate another thread's graph capture. */
    enum cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    int64_t period_ns = (int64_t)EPX__MIN(EPX__MAX(epx__ms_to_ns(n->timeout_ms) / 16, (uint64_t)1000000), (uint64_t)100000000);
    pthread_mutex_lock(&n->mu);
    while (!n->dog_stop && n->comm) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t ns = ts.tv_nsec + period_ns;
        ts.tv_sec += (time_t)(ns / 1000000000), ts.tv_nsec = (long)(ns % 1000000000);
        pthread_cond_timedwait(&n->dog_cv, &n->mu, &ts);
        if (!n->dog_stop && n->comm) epx__nc_dog_look(n);
    }
    pthread_mutex_unlock(&n->mu);
    return NULL;
}

/* Start the watchdog of an owned communicator. Without one (no events or thread) epx's own
 * calls still bound every wait: work left on a stream then waits for the next call. */
static void epx__nc_dog_start(epx__nccl_t *n)
{
    for (int i = 0; i < EPX__NC_RING; i++)
        if (cudaEventCreateWithFlags(&n->ring[i].start, cudaEventDisableTiming) != cudaSuccess ||
            cudaEventCreateWithFlags(&n->ring[i].end, cudaEventDisableTiming) != cudaSuccess) {
            cudaGetLastError();
            EPX_WARN(NET, "NCCL watchdog not started (no CUDA events)");
            return;
        }
    pthread_condattr_t ca;
    bool cv = pthread_condattr_init(&ca) == 0;
    if (cv) {
        cv = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) == 0 && pthread_cond_init(&n->dog_cv, &ca) == 0;
        pthread_condattr_destroy(&ca);
    }
    if (cv && pthread_create(&n->dog, NULL, epx__nc_dog_main, n) == 0) {
        n->dog_on = true;
        return;
    }
    if (cv) pthread_cond_destroy(&n->dog_cv);
    EPX_WARN(NET, "NCCL watchdog not started (no thread)");
}

/* Stop it (joined) and free its events. */
static void epx__nc_dog_stop(epx__nccl_t *n)
{
    if (n->dog_on) {
        pthread_mutex_lock(&n->mu);
        n->dog_stop = true;
        pthread_cond_signal(&n->dog_cv);
        pthread_mutex_unlock(&n->mu);
        pthread_join(n->dog, NULL);
        pthread_cond_destroy(&n->dog_cv);
        n->dog_on = false;
    }
    for (int i = 0; i < EPX__NC_RING; i++) {
        if (n->ring[i].start) cudaEventDestroy(n->ring[i].start);
        if (n->ring[i].end) cudaEventDestroy(n->ring[i].end);
        n->ring[i].start = n->ring[i].end = NULL;
    }
}

/* ---- Communicators ---------------------------------------------------------------------------------- */

epx_status_t epx__nccl_get_id(void *id, epx__errbuf_t *err)
{
    const char *why;
    if (!epx__nccl_available(&why)) return epx__fail(err, EPX_ERR_UNSUPPORTED, "NCCL: %s", why);
    ncclUniqueId u;
    ncclResult_t r = epx__nc.get_unique_id(&u);
    if (r != ncclSuccess) return epx__nc_fail(NULL, r, err, "ncclGetUniqueId");
    memcpy(id, &u, sizeof u);
    return EPX_SUCCESS;
}

static epx_status_t epx__nc_finish(epx__nccl_t *n, epx__errbuf_t *err)
{
    ncclResult_t r;
    if ((r = epx__nc.count(n->comm, &n->nranks)) != ncclSuccess ||
        (r = epx__nc.user_rank(n->comm, &n->rank)) != ncclSuccess ||
        (r = epx__nc.cu_device(n->comm, &n->device)) != ncclSuccess)
        return epx__nc_fail(n->comm, r, err, "querying the NCCL communicator");
    cudaError_t ce = cudaSetDevice(n->device);
    if (ce == cudaSuccess) ce = cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking);
    if (ce != cudaSuccess) {
        n->stream = NULL;
        return epx__fail(err, EPX_ERR_CUDA, "NCCL staging stream: %s", cudaGetErrorString(ce));
    }
    /* Everything a host exchange needs, so that it fails only in NCCL. */
    n->ds = calloc((size_t)n->nranks, sizeof *n->ds);
    n->dr = calloc((size_t)n->nranks, sizeof *n->dr);
    if (!n->ds || !n->dr) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    return epx__nc_staging(n, 1, err);
}

epx_status_t epx__nccl_create(epx__nccl_t **out, int nranks, int rank, const void *id, int64_t timeout_ms,
                              const epx__nccl_watch_t *watch, epx__errbuf_t *err)
{
    *out = NULL;
    const char *why;
    if (!epx__nccl_available(&why)) return epx__fail(err, EPX_ERR_UNSUPPORTED, "NCCL: %s", why);
    epx__nccl_t *n = calloc(1, sizeof *n);
    if (!n) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    pthread_mutex_init(&n->mu, NULL);
    n->owned = true;
    n->timeout_ms = timeout_ms;
    if (!epx__nc_aborter_start(n)) {
        epx__nccl_destroy(n, true);
        return epx__fail(err, EPX_ERR_SYSTEM, "no thread for the NCCL communicator's abort (pthread_create)");
    }
    if (cudaGetDevice(&n->device) != cudaSuccess) cudaGetLastError(); /* NCCL's, until epx__nc_finish asks it */
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0; /* every wait is ours, bounded */
    ncclResult_t r = epx__nc.init_rank_config(&n->comm, nranks, u, rank, &cfg);
    epx_status_t st = EPX_SUCCESS;
    if (r != ncclSuccess && r != ncclInProgress)
        st = epx__nc_fail(n->comm, r, err, "ncclCommInitRankConfig");
    if (st == EPX_SUCCESS)
        st = epx__nc_settle(n, true, epx__deadline_after_ms(timeout_ms), watch, err,
                            "NCCL init (ncclCommInitRankConfig)");
    if (st == EPX_SUCCESS) st = epx__nc_finish(n, err);
    if (st != EPX_SUCCESS) {
        epx__nccl_destroy(n, true);
        return st;
    }
    epx__nc_dog_start(n);
    EPX_INFO(NET, "NCCL communicator: rank %d of %d on device %d", n->rank, n->nranks, n->device);
    *out = n;
    return EPX_SUCCESS;
}

epx_status_t epx__nccl_adopt(epx__nccl_t **out, void *comm, int64_t timeout_ms, epx__errbuf_t *err)
{
    *out = NULL;
    const char *why;
    if (!epx__nccl_available(&why)) return epx__fail(err, EPX_ERR_UNSUPPORTED, "NCCL: %s", why);
    epx__nccl_t *n = calloc(1, sizeof *n);
    if (!n) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    pthread_mutex_init(&n->mu, NULL);
    n->comm = (ncclComm_t)comm;
    n->timeout_ms = timeout_ms;
    epx_status_t st = epx__nc_finish(n, err);
    if (st != EPX_SUCCESS) {
        epx__nccl_destroy(n, false);
        return st;
    }
    *out = n;
    return EPX_SUCCESS;
}

/* End the abort thread: told to quit when it has nothing to abort, else waited for — an
 * abort ends once the CUDA graphs that captured work on the communicator are destroyed, so
 * past a bound it is let go (it no longer touches n), and a graph the application keeps
 * does not hold up the destruction of the communicator. */
static void epx__nc_aborter_end(epx__nccl_t *n)
{
    pthread_mutex_lock(&n->abort_mu);
    bool aborting = n->abort_comm != NULL;
    n->abort_quit = true;
    pthread_cond_broadcast(&n->abort_cv);
    while (!n->abort_taken) pthread_cond_wait(&n->abort_cv, &n->abort_mu);
    pthread_mutex_unlock(&n->abort_mu);
    int64_t ms = EPX__MIN(n->timeout_ms, (int64_t)10000);
    if (aborting) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += (time_t)(ms / 1000);
        until.tv_nsec += (long)(ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
        aborting = pthread_timedjoin_np(n->aborter, NULL, &until) != 0;
    } else {
        pthread_join(n->aborter, NULL);
    }
    if (aborting) {
        EPX_WARN(NET, "ncclCommAbort (rank %d of %d) has not returned after %lld ms: CUDA graphs that captured epx "
                      "calls on this communicator are still alive (destroy them before the communicator); it "
                      "completes when they are destroyed",
                 n->rank, n->nranks, (long long)ms);
        pthread_detach(n->aborter);
    }
    pthread_cond_destroy(&n->abort_cv);
    pthread_mutex_destroy(&n->abort_mu);
    n->aborter_on = false;
}

void epx__nccl_destroy(epx__nccl_t *n, bool abort)
{
    if (!n) return;
    epx__nc_dog_stop(n); /* no other thread on n from here */
    if (n->owned && n->comm) {
        /* A clean finalize is collective and may wait on peers: bounded, else abort. On a
         * non-blocking communicator it normally answers ncclInProgress. */
        ncclResult_t f = abort ? ncclInternalError : epx__nc.finalize(n->comm);
        bool clean = (f == ncclSuccess || f == ncclInProgress) &&
                     epx__nc_settle(n, true, epx__deadline_after_ms(EPX__MIN(n->timeout_ms, (int64_t)10000)),
                                    NULL, NULL, "ncclCommFinalize") == EPX_SUCCESS;
        if (clean)
            epx__nc.destroy(n->comm);
        else /* (a no-op when the settle aborted it) */
            epx__nc_abort_now(n);
    }
    if (n->aborter_on) epx__nc_aborter_end(n);
    /* Stream-ordered (where CUDA can): a kernel of an adopted communicator that was not
     * aborted may spin on the stream forever, and neither call waits for it. */
    epx__nc_staging_free(n);
    if (n->stream) cudaStreamDestroy(n->stream);
    cudaGetLastError();
    free(n->ds);
    free(n->dr);
    pthread_mutex_destroy(&n->mu);
    free(n);
}

void epx__nccl_abort(epx__nccl_t *n)
{
    if (!n) return;
    pthread_mutex_lock(&n->mu);
    if (!n->dead) {
        n->dead = true;
        if (n->owned && n->comm) {
            EPX_WARN(NET, "NCCL communicator (rank %d of %d) aborted after a failure", n->rank, n->nranks);
            epx__nc_abort_now(n);
        }
    }
    pthread_mutex_unlock(&n->mu);
}

void epx__nccl_watch_between(epx__nccl_t *n, const epx__nccl_watch_t *failed, const epx__nccl_watch_t *stalled)
{
    pthread_mutex_lock(&n->mu);
    if (failed) n->dog_watch = *failed;
    if (stalled) n->dog_stall = *stalled;
    pthread_mutex_unlock(&n->mu);
}

bool epx__nccl_aborted(epx__nccl_t *n)
{
    pthread_mutex_lock(&n->mu);
    bool gone = n->dead || !n->comm;
    pthread_mutex_unlock(&n->mu);
    return gone;
}

epx_status_t epx__nccl_check_async(epx__nccl_t *n, epx__errbuf_t *err)
{
    if (!n) return EPX_SUCCESS;
    pthread_mutex_lock(&n->mu);
    epx_status_t st = EPX_SUCCESS;
    if (n->dog_status != EPX_SUCCESS) {
        st = epx__nc_live(n, err);
    } else if (n->comm && !n->dead) {
        st = epx__nc_async(n->comm, err, "NCCL reported an error");
    }
    pthread_mutex_unlock(&n->mu);
    return st;
}

int epx__nccl_rank(const epx__nccl_t *n) { return n->rank; }
int epx__nccl_size(const epx__nccl_t *n) { return n->nranks; }
int epx__nccl_device(const epx__nccl_t *n) { return n->device; }

/* epx__nccl_post, mu held. */
static epx_status_t epx__nc_post(epx__nccl_t *n, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                                 const int64_t *rbytes, const unsigned char *stat_with, const void *sstat, void *rstat,
                                 size_t stat_bytes, void *stream, uint64_t deadline, epx__errbuf_t *err)
{
    EPX__CHECK(epx__nc_live(n, err));
    bool any = false;
    for (int p = 0; p < n->nranks; p++) any = any || sbytes[p] > 0 || rbytes[p] > 0 || (stat_bytes && stat_with[p]);
    if (!any) return EPX_SUCCESS;
    epx__nc_watched_t *w = epx__nc_follow(n, (cudaStream_t)stream);
    ncclResult_t r = epx__nc.group_start();
    for (int p = 0; p < n->nranks && r == ncclSuccess; p++) {
        if (sbytes[p] > 0) r = epx__nc.send(sbuf[p], (size_t)sbytes[p], ncclChar, p, n->comm, (cudaStream_t)stream);
        if (r == ncclSuccess && rbytes[p] > 0)
            r = epx__nc.recv(rbuf[p], (size_t)rbytes[p], ncclChar, p, n->comm, (cudaStream_t)stream);
        if (stat_bytes == 0 || !stat_with[p]) continue;
        if (r == ncclSuccess) r = epx__nc.send(sstat, stat_bytes, ncclChar, p, n->comm, (cudaStream_t)stream);
        if (r == ncclSuccess)
            r = epx__nc.recv((char *)rstat + (size_t)p * stat_bytes, stat_bytes, ncclChar, p, n->comm,
                             (cudaStream_t)stream);
    }
    ncclResult_t e = epx__nc.group_end(); /* always closes the group */
    if (r == ncclSuccess) r = e;
    if (r != ncclSuccess && r != ncclInProgress) return epx__nc_fail(n->comm, r, err, "ncclSend/ncclRecv group");
    EPX__CHECK(epx__nc_settle(n, n->owned, deadline, NULL, err, "ncclSend/ncclRecv group"));
    epx__nc_followed(n, w, (cudaStream_t)stream);
    return EPX_SUCCESS;
}

epx_status_t epx__nccl_post(epx__nccl_t *n, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                            const int64_t *rbytes, const unsigned char *stat_with, const void *sstat, void *rstat,
                            size_t stat_bytes, void *stream, uint64_t deadline, epx__errbuf_t *err)
{
    pthread_mutex_lock(&n->mu);
    epx_status_t st = epx__nc_post(n, sbuf, sbytes, rbuf, rbytes, stat_with, sstat, rstat, stat_bytes, stream,
                                   deadline, err);
    pthread_mutex_unlock(&n->mu);
    return st;
}

/* epx__nccl_wait, mu held. */
static epx_status_t epx__nc_wait(epx__nccl_t *n, void *stream, uint64_t deadline, epx__errbuf_t *err)
{
    EPX__CHECK(epx__nc_live(n, err));
    for (unsigned spin = 0;; spin++) {
        cudaError_t ce = cudaStreamQuery((cudaStream_t)stream);
        if (ce != cudaSuccess && ce != cudaErrorNotReady)
            return epx__fail(err, EPX_ERR_CUDA, "waiting for NCCL's stream: %s", cudaGetErrorString(ce));
        /* Looked at once more after the stream ran: an error may have ended its work early. */
        EPX__CHECK(epx__nc_async(n->comm, err, "NCCL exchange"));
        if (ce == cudaSuccess) return EPX_SUCCESS;
        if (epx__now_ns() >= deadline) {
            if (n->owned) epx__nc_abort_now(n);
            return epx__fail(err, EPX_ERR_TIMEOUT,
                             "an NCCL exchange did not finish within EPX_TIMEOUT_MS (a peer is late or gone)%s",
                             n->owned ? "; NCCL communicator aborted" : "; abort the NCCL communicator");
        }
        if (spin > 64) sched_yield();
    }
}

epx_status_t epx__nccl_wait(epx__nccl_t *n, void *stream, uint64_t deadline, epx__errbuf_t *err)
{
    pthread_mutex_lock(&n->mu);
    epx_status_t st = epx__nc_wait(n, stream, deadline, err);
    pthread_mutex_unlock(&n->mu);
    return st;
}

/* epx__nccl_host_xchg, mu held. */
static epx_status_t epx__nc_host_xchg(epx__nccl_t *n, const void *const *sbuf, const int64_t *sbytes,
                                      void *const *rbuf, const int64_t *rbytes, uint64_t deadline, epx__errbuf_t *err)
{
    EPX__CHECK(epx__nc_live(n, err));
    int P = n->nranks;
    size_t total = 0;
    for (int p = 0; p < P; p++) total += (size_t)EPX__ALIGN_UP(sbytes[p], 256) + (size_t)EPX__ALIGN_UP(rbytes[p], 256);
    if (total == 0) return EPX_SUCCESS;
    EPX__CHECK(epx__nc_staging(n, total, err));
    const void **ds = n->ds;
    void **dr = n->dr;
    size_t off = 0;
    cudaError_t ce = cudaSuccess;
    for (int p = 0; p < P; p++) {
        ds[p] = n->dbuf + off;
        if (sbytes[p] > 0 && ce == cudaSuccess)
            ce = cudaMemcpyAsync(n->dbuf + off, sbuf[p], (size_t)sbytes[p], cudaMemcpyHostToDevice, n->stream);
        off += (size_t)EPX__ALIGN_UP(sbytes[p], 256);
        dr[p] = n->dbuf + off;
        off += (size_t)EPX__ALIGN_UP(rbytes[p], 256);
    }
    epx_status_t st = ce == cudaSuccess ? EPX_SUCCESS
                                        : epx__fail(err, EPX_ERR_CUDA, "NCCL staging copy: %s", cudaGetErrorString(ce));
    if (st == EPX_SUCCESS) st = epx__nc_post(n, ds, sbytes, dr, rbytes, NULL, NULL, NULL, 0, n->stream, deadline, err);
    if (st == EPX_SUCCESS) st = epx__nc_wait(n, n->stream, deadline, err);
    for (int p = 0; p < P && st == EPX_SUCCESS; p++)
        if (rbytes[p] > 0 && rbuf[p]) {
            ce = cudaMemcpy(rbuf[p], dr[p], (size_t)rbytes[p], cudaMemcpyDeviceToHost);
            if (ce != cudaSuccess) st = epx__fail(err, EPX_ERR_CUDA, "NCCL staging copy back: %s", cudaGetErrorString(ce));
        }
    return st;
}

epx_status_t epx__nccl_host_xchg(epx__nccl_t *n, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                                 const int64_t *rbytes, uint64_t deadline, epx__errbuf_t *err)
{
    pthread_mutex_lock(&n->mu);
    epx_status_t st = epx__nc_host_xchg(n, sbuf, sbytes, rbuf, rbytes, deadline, err);
    pthread_mutex_unlock(&n->mu);
    return st;
}
