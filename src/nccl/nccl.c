/* src/nccl with NCCL: libnccl.so.2 loaded at run time, non-blocking communicators. */
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

struct epx__nccl {
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

/* Wait for a non-blocking call on *comm to finish (its state leaves ncclInProgress), running
 * `watch` (may be NULL) about every millisecond. At the deadline, or when the watch fails, an
 * owned communicator is aborted and *comm becomes NULL (never aborted twice). */
static epx_status_t epx__nc_settle(ncclComm_t *comm, bool owned, uint64_t deadline, const epx__nccl_watch_t *watch,
                                   epx__errbuf_t *err, const char *what)
{
    uint64_t next_watch = epx__now_ns() + EPX__NC_WATCH_NS;
    for (;;) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t r = epx__nc.async_error(*comm, &state);
        if (r != ncclSuccess) return epx__nc_fail(*comm, r, err, what);
        if (state == ncclSuccess) return EPX_SUCCESS;
        if (state != ncclInProgress) return epx__nc_fail(*comm, state, err, what);
        uint64_t now = epx__now_ns();
        if (now >= deadline) {
            if (owned) epx__nc.abort(*comm), *comm = NULL;
            return epx__fail(err, EPX_ERR_TIMEOUT, "%s: NCCL did not finish within EPX_TIMEOUT_MS%s", what,
                             owned ? " (communicator aborted)" : "");
        }
        if (watch && now >= next_watch) {
            epx__errbuf_t why;
            epx_status_t w = watch->check(watch->ctx, &why);
            if (w != EPX_SUCCESS) {
                if (owned) epx__nc.abort(*comm), *comm = NULL;
                const char *name = epx_status_name(w), *msg = why.msg; /* "NAME: text": the text */
                size_t k = strlen(name);
                if (strncmp(msg, name, k) == 0 && msg[k] == ':' && msg[k + 1] == ' ') msg += k + 2;
                return epx__fail(err, w, "%s abandoned%s: %s", what, owned ? " (communicator aborted)" : "", msg);
            }
            next_watch = now + EPX__NC_WATCH_NS;
        }
        sched_yield();
    }
}

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
    n->owned = true;
    n->timeout_ms = timeout_ms;
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0; /* every wait is ours, bounded */
    ncclResult_t r = epx__nc.init_rank_config(&n->comm, nranks, u, rank, &cfg);
    epx_status_t st = EPX_SUCCESS;
    if (r != ncclSuccess && r != ncclInProgress)
        st = epx__nc_fail(n->comm, r, err, "ncclCommInitRankConfig");
    if (st == EPX_SUCCESS)
        st = epx__nc_settle(&n->comm, true, epx__deadline_after_ms(timeout_ms), watch, err,
                            "NCCL init (ncclCommInitRankConfig)");
    if (st == EPX_SUCCESS) st = epx__nc_finish(n, err);
    if (st != EPX_SUCCESS) {
        epx__nccl_destroy(n, true);
        return st;
    }
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

void epx__nccl_destroy(epx__nccl_t *n, bool abort)
{
    if (!n) return;
    if (n->owned && n->comm) {
        /* A clean finalize is collective and may wait on peers: bounded, else abort. On a
         * non-blocking communicator it normally answers ncclInProgress. */
        ncclResult_t f = abort ? ncclInternalError : epx__nc.finalize(n->comm);
        bool clean = (f == ncclSuccess || f == ncclInProgress) &&
                     epx__nc_settle(&n->comm, true, epx__deadline_after_ms(EPX__MIN(n->timeout_ms, (int64_t)10000)),
                                    NULL, NULL, "ncclCommFinalize") == EPX_SUCCESS;
        if (clean)
            epx__nc.destroy(n->comm);
        else if (n->comm) /* not already aborted by the settle */
            epx__nc.abort(n->comm);
    }
    /* Stream-ordered (where CUDA can): a kernel of an adopted communicator that was not
     * aborted may spin on the stream forever, and neither call waits for it. */
    epx__nc_staging_free(n);
    if (n->stream) cudaStreamDestroy(n->stream);
    cudaGetLastError();
    free(n->ds);
    free(n->dr);
    free(n);
}

void epx__nccl_abort(epx__nccl_t *n)
{
    if (!n || n->dead) return;
    n->dead = true;
    if (n->owned && n->comm) {
        EPX_WARN(NET, "NCCL communicator (rank %d of %d) aborted after a failure", n->rank, n->nranks);
        epx__nc.abort(n->comm);
        n->comm = NULL;
    }
}

bool epx__nccl_aborted(const epx__nccl_t *n) { return n->dead || !n->comm; }

int epx__nccl_rank(const epx__nccl_t *n) { return n->rank; }
int epx__nccl_size(const epx__nccl_t *n) { return n->nranks; }
int epx__nccl_device(const epx__nccl_t *n) { return n->device; }

epx_status_t epx__nccl_post(epx__nccl_t *n, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                            const int64_t *rbytes, const unsigned char *stat_with, const void *sstat, void *rstat,
                            size_t stat_bytes, void *stream, uint64_t deadline, epx__errbuf_t *err)
{
    EPX__CHECK(epx__nc_live(n, err));
    bool any = false;
    for (int p = 0; p < n->nranks; p++) any = any || sbytes[p] > 0 || rbytes[p] > 0 || (stat_bytes && stat_with[p]);
    if (!any) return EPX_SUCCESS;
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
    return epx__nc_settle(&n->comm, n->owned, deadline, NULL, err, "ncclSend/ncclRecv group");
}

epx_status_t epx__nccl_wait(epx__nccl_t *n, void *stream, uint64_t deadline, epx__errbuf_t *err)
{
    EPX__CHECK(epx__nc_live(n, err));
    for (unsigned spin = 0;; spin++) {
        cudaError_t ce = cudaStreamQuery((cudaStream_t)stream);
        if (ce != cudaSuccess && ce != cudaErrorNotReady)
            return epx__fail(err, EPX_ERR_CUDA, "waiting for NCCL's stream: %s", cudaGetErrorString(ce));
        /* Looked at once more after the stream ran: an error may have ended its work early. */
        ncclResult_t state = ncclSuccess;
        ncclResult_t r = epx__nc.async_error(n->comm, &state);
        if (r != ncclSuccess || (state != ncclSuccess && state != ncclInProgress))
            return epx__nc_fail(n->comm, r != ncclSuccess ? r : state, err, "NCCL exchange");
        if (ce == cudaSuccess) return EPX_SUCCESS;
        if (epx__now_ns() >= deadline) {
            if (n->owned) epx__nc.abort(n->comm), n->comm = NULL;
            return epx__fail(err, EPX_ERR_TIMEOUT,
                             "an NCCL exchange did not finish within EPX_TIMEOUT_MS (a peer is late or gone)%s",
                             n->owned ? "; NCCL communicator aborted" : "; abort the NCCL communicator");
        }
        if (spin > 64) sched_yield();
    }
}

epx_status_t epx__nccl_host_xchg(epx__nccl_t *n, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                                 const int64_t *rbytes, uint64_t deadline, epx__errbuf_t *err)
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
    if (st == EPX_SUCCESS) st = epx__nccl_post(n, ds, sbytes, dr, rbytes, NULL, NULL, NULL, 0, n->stream, deadline, err);
    if (st == EPX_SUCCESS) st = epx__nccl_wait(n, n->stream, deadline, err);
    for (int p = 0; p < P && st == EPX_SUCCESS; p++)
        if (rbytes[p] > 0 && rbuf[p]) {
            ce = cudaMemcpy(rbuf[p], dr[p], (size_t)rbytes[p], cudaMemcpyDeviceToHost);
            if (ce != cudaSuccess) st = epx__fail(err, EPX_ERR_CUDA, "NCCL staging copy back: %s", cudaGetErrorString(ce));
        }
    return st;
}
