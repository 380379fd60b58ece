/*
 * A stand-in for libnccl.so.2, for tests only: the NCCL calls epx makes (src/nccl/nccl.c),
 * with point-to-point transfers through POSIX shared memory, so that CUDA across simulated
 * hosts runs where NCCL itself cannot: several ranks on one GPU (NCCL refuses two ranks of
 * one device). Loaded instead of NCCL through LD_LIBRARY_PATH (tests/CMakeLists.txt:
 * fake_nccl_* tests).
 *
 * Asynchronous, like NCCL: ncclGroupEnd (and a lone ncclSend/ncclRecv) hands the group to
 * its communicator's worker thread and returns at once, without waiting for the device. The
 * worker runs the communicator's groups in the order they were posted: it waits until every
 * stream of the group has reached it (an event recorded there), makes the sends, sleeps
 * FAKE_NCCL_DELAY_US (default 0), then makes the receives, copying through pinned memory on
 * a non-blocking stream of its own.
 * Meanwhile each stream of the group is held at the group by a host function, released when
 * the worker is done: what the stream runs after the group sees the received data, and work
 * on another stream that does not wait for it may read the receive buffers before they are
 * written (the delay widens that window, so that a missing join shows as wrong data).
 *
 * Semantics kept: sends and receives between the same two ranks on a communicator match in
 * order; a send reads what its stream produced before the group. Errors met while moving data
 * (a receive whose sender never comes within FAKE_NCCL_TIMEOUT_MS, default 60000:
 * ncclRemoteError; a send and its receive of different sizes: ncclInvalidUsage; a failed
 * copy: ncclUnhandledCudaError) stick to the communicator and are reported by
 * ncclCommGetAsyncError and ncclGetLastError; the group's streams are released all the same,
 * with the receives not made yet left as they were, and later groups are refused.
 * ncclCommAbort gives up the groups in flight at once; ncclCommDestroy lets them finish
 * (bounded by the same timeout). Not kept: NCCL's own failure handling (what a kernel does
 * when a peer goes, error codes beyond the above, the in-progress states of a non-blocking
 * communicator) and graph capture (a group on a capturing stream is refused).
 *
 * A message from rank s to rank d, the n-th between them on a communicator, is one shared
 * memory object named after the communicator, s, d and n: the sender writes the bytes, then
 * a ready word; the receiver waits for it, copies, and unlinks the object. The numbers are
 * given when a group is posted, so groups in flight keep their order.
 */
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7
} ncclResult_t;
typedef int ncclDataType_t;
typedef struct {
    char internal[128];
} ncclUniqueId;

#define FAKE_MAX_RANKS 1024
#define FAKE_MAX_OPS 4096
#define FAKE_CHUNK ((size_t)4 << 20) /* bytes of a worker's pinned buffer */

typedef struct fake_comm *ncclComm_t;

typedef struct {
    int send;
    void *buf;
    size_t bytes;
    int peer;
    ncclComm_t comm;
    cudaStream_t stream;
    uint64_t n; /* the message's number between me and peer, given when the group is posted */
} fake_op_t;

/* One communicator's part of a posted group, as its worker runs it. Freed by the last of
 * its holders (the worker, and each host function holding one of its streams): a host
 * function may run after its communicator is gone, so it reads nothing else. */
typedef struct fake_batch {
    struct fake_batch *next; /* in the communicator's queue */
    ncclComm_t comm;
    int nops, nstreams;
    fake_op_t *ops;        /* a copy of the group's operations on comm */
    cudaStream_t *streams; /* their distinct streams */
    cudaEvent_t *start;    /* [nstreams]: where the group is on each; the worker destroys them */
    int refs, done;        /* under fake_hold_mu */
} fake_batch_t;

struct fake_comm {
    char name[64]; /* from the unique id */
    int nranks, rank, device;
    long long timeout_us, delay_us; /* FAKE_NCCL_TIMEOUT_MS, FAKE_NCCL_DELAY_US */
    uint64_t *sent, *received;      /* [nranks]: messages posted so far, per peer (by the posting thread) */
    cudaStream_t copy;              /* the worker's: non-blocking, so it never waits for a held stream */
    char *pin;                      /* the worker's: FAKE_CHUNK pinned bytes (fake_pin_take) */
    pthread_t worker;
    int abort;                      /* atomic: the worker gives up what it waits for */
    pthread_mutex_t mu;             /* guards what follows */
    pthread_cond_t cv;              /* a batch was queued, or stop */
    fake_batch_t *head, *tail;      /* posted, not yet taken by the worker */
    int stop, exited;               /* no more batches will come; the worker has ended */
    ncclResult_t err;               /* the first error: sticks */
    char last[256];                 /* its words, written once, before err */
};

static __thread int depth;
static __thread int nops;
static __thread fake_op_t ops[FAKE_MAX_OPS];

/* Where host functions wait for their batch (one for the process: a host function must not
 * touch its communicator, which may be gone by the time its stream reaches it). */
static pthread_mutex_t fake_hold_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t fake_hold_cv = PTHREAD_COND_INITIALIZER;

/* Pinned buffers of FAKE_CHUNK bytes, those of ended communicators kept for later ones, a
 * list through their first bytes: never given back to CUDA (cudaFreeHost may wait for the
 * device, where a stream may still be held or stuck). */
static pthread_mutex_t fake_pool_mu = PTHREAD_MUTEX_INITIALIZER;
static void *fake_pool;

static char *fake_pin_take(void)
{
    pthread_mutex_lock(&fake_pool_mu);
    void *p = fake_pool;
    if (p) fake_pool = *(void **)p;
    pthread_mutex_unlock(&fake_pool_mu);
    if (!p && cudaHostAlloc(&p, FAKE_CHUNK, cudaHostAllocPortable) != cudaSuccess) p = NULL;
    return p;
}

static void fake_pin_give(void *p)
{
    pthread_mutex_lock(&fake_pool_mu);
    *(void **)p = fake_pool;
    fake_pool = p;
    pthread_mutex_unlock(&fake_pool_mu);
}

/* How long a receive waits for its sender, and a clean destroy for its receivers (µs). */
static long long fake_timeout_us(void)
{
    const char *tm = getenv("FAKE_NCCL_TIMEOUT_MS");
    return 1000LL * (tm ? atoll(tm) : 60000);
}

/* How long the worker sleeps before each batch's receives (µs, FAKE_NCCL_DELAY_US). */
static long long fake_delay_us(void)
{
    const char *d = getenv("FAKE_NCCL_DELAY_US");
    long long us = d ? atoll(d) : 0;
    return us > 0 ? us : 0;
}

/* Bytes of one element of NCCL's data types (ncclInt8 ... ncclFloat8e5m2), 0 for others. */
static size_t fake_type_size(ncclDataType_t t)
{
    static const size_t sizes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2, 1, 1};
    return t >= 0 && t < (int)(sizeof sizes / sizeof sizes[0]) ? sizes[t] : 0;
}

static void fake_name(const ncclComm_t c, int src, int dst, uint64_t n, char *out, size_t len)
{
    snprintf(out, len, "/%s-%d-%d-%llu", c->name, src, dst, (unsigned long long)n);
}

/* Record an error on c (the first one sticks) and return r. */
static ncclResult_t fake_fail(ncclComm_t c, ncclResult_t r, const char *what)
{
    if (c) {
        pthread_mutex_lock(&c->mu);
        if (c->err == ncclSuccess) {
            snprintf(c->last, sizeof c->last, "fake NCCL: %s", what);
            c->err = r;
        }
        pthread_mutex_unlock(&c->mu);
    }
    return r;
}

static ncclResult_t fake_err(ncclComm_t c)
{
    pthread_mutex_lock(&c->mu);
    ncclResult_t r = c->err;
    pthread_mutex_unlock(&c->mu);
    return r;
}

static int fake_aborted(ncclComm_t c) { return __atomic_load_n(&c->abort, __ATOMIC_ACQUIRE); }

static void fake_batch_free(fake_batch_t *b)
{
    free(b->ops), free(b->streams), free(b->start), free(b);
}

/* One holder lets go of b; with `finish` (the worker, or a group that failed to post) its
 * streams are released first. The last holder frees it. Calls no CUDA API. */
static void fake_unref(fake_batch_t *b, int finish)
{
    pthread_mutex_lock(&fake_hold_mu);
    if (finish) {
        b->done = 1;
        pthread_cond_broadcast(&fake_hold_cv);
    }
    int last = --b->refs == 0;
    pthread_mutex_unlock(&fake_hold_mu);
    if (last) fake_batch_free(b);
}

/* The host function on each stream of a batch: the stream goes no further until the worker
 * is done with the batch (or gave it up). Calls no CUDA API. */
static void CUDART_CB fake_hold(void *arg)
{
    fake_batch_t *b = arg;
    pthread_mutex_lock(&fake_hold_mu);
    while (!b->done) pthread_cond_wait(&fake_hold_cv, &fake_hold_mu);
    pthread_mutex_unlock(&fake_hold_mu);
    fake_unref(b, 0);
}

/* ---- The worker ------------------------------------------------------------------------ */

/* Until the stream has run everything before the group (its start event), or an abort. */
static ncclResult_t fake_reached(ncclComm_t c, cudaEvent_t e)
{
    for (unsigned spin = 0;; spin++) {
        cudaError_t ce = cudaEventQuery(e);
        if (ce == cudaSuccess) return ncclSuccess;
        if (ce != cudaErrorNotReady) return fake_fail(c, ncclUnhandledCudaError, "a stream failed before its group");
        if (fake_aborted(c)) return fake_fail(c, ncclInternalError, "communicator aborted");
        if (spin < 64)
            sched_yield();
        else
            usleep(20);
    }
}

/* Sleep `us` µs, less on an abort. */
static ncclResult_t fake_nap(ncclComm_t c, long long us)
{
    for (; us > 0; us -= 1000) {
        if (fake_aborted(c)) return fake_fail(c, ncclInternalError, "communicator aborted");
        usleep(us < 1000 ? (useconds_t)us : 1000);
    }
    return ncclSuccess;
}

/* `bytes` from the device to shared memory (to_shm), or back, through the worker's pinned
 * buffer on its own stream, each piece landed before the next: the copies need none of
 * CUDA's staging of pageable memory, which work on a held stream could keep busy. */
static int fake_copy(ncclComm_t c, char *dst, const char *src, size_t bytes, int to_shm)
{
    for (size_t off = 0; off < bytes; off += FAKE_CHUNK) {
        size_t k = bytes - off < FAKE_CHUNK ? bytes - off : FAKE_CHUNK;
        if (!to_shm) memcpy(c->pin, src + off, k);
        if (cudaMemcpyAsync(to_shm ? c->pin : dst + off, to_shm ? src + off : c->pin, k, cudaMemcpyDefault,
                            c->copy) != cudaSuccess ||
            cudaStreamSynchronize(c->copy) != cudaSuccess)
            return 0;
        if (to_shm) memcpy(dst + off, c->pin, k);
    }
    return 1;
}

/* One message out: the device bytes into a new object, then its ready word. */
static ncclResult_t fake_send(const fake_op_t *o)
{
    ncclComm_t c = o->comm;
    if (fake_aborted(c)) return fake_fail(c, ncclInternalError, "communicator aborted");
    char name[128];
    fake_name(c, c->rank, o->peer, o->n, name, sizeof name);
    int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) return fake_fail(c, ncclSystemError, "shm_open (send)");
    size_t len = 64 + o->bytes;
    /* Allocated now (not a sparse object): a full /dev/shm is an error here, not SIGBUS later. */
    char *m = posix_fallocate(fd, 0, (off_t)len) == 0 ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                                                     : MAP_FAILED;
    close(fd);
    if (m == MAP_FAILED) {
        shm_unlink(name);
        return fake_fail(c, ncclSystemError, "no room in shared memory (send)");
    }
    ncclResult_t r = ncclSuccess;
    if (!fake_copy(c, m + 64, o->buf, o->bytes, 1))
        r = fake_fail(c, ncclUnhandledCudaError, "cudaMemcpyAsync (send)");
    *(uint64_t *)(m + 8) = o->bytes;
    __atomic_store_n((uint64_t *)m, r == ncclSuccess ? 1ull : 2ull, __ATOMIC_RELEASE);
    munmap(m, len);
    return r;
}

/* One message in: wait for its object to be ready, copy it to the device, remove it. */
static ncclResult_t fake_recv(const fake_op_t *o)
{
    ncclComm_t c = o->comm;
    char name[128];
    fake_name(c, o->peer, c->rank, o->n, name, sizeof name);
    long long waited_us = 0;
    char *m = MAP_FAILED;
    size_t len = 0;
    for (;;) {
        if (fake_aborted(c)) return fake_fail(c, ncclInternalError, "communicator aborted");
        int fd = shm_open(name, O_RDWR, 0600);
        if (fd >= 0) {
            off_t size = lseek(fd, 0, SEEK_END);
            if (size >= 64) {
                len = (size_t)size;
                m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            }
            close(fd);
            if (m != MAP_FAILED && __atomic_load_n((uint64_t *)m, __ATOMIC_ACQUIRE) != 0) break;
            if (m != MAP_FAILED) munmap(m, len);
            m = MAP_FAILED;
        }
        if (waited_us > c->timeout_us) return fake_fail(c, ncclRemoteError, "a receive's sender never came");
        usleep(50);
        waited_us += 50;
    }
    ncclResult_t r = ncclSuccess;
    uint64_t bytes = *(uint64_t *)(m + 8);
    if (*(uint64_t *)m != 1 || bytes != o->bytes)
        r = fake_fail(c, ncclInvalidUsage, "a send and its receive differ in size (or the send failed)");
    else if (!fake_copy(c, o->buf, m + 64, bytes, 0)) /* landed before the source goes */
        r = fake_fail(c, ncclUnhandledCudaError, "cudaMemcpyAsync (receive)");
    munmap(m, len);
    shm_unlink(name);
    return r;
}

/* One batch: its streams reach it, then the sends, the delay, the receives. Stops at the
 * first error or an abort, and does nothing on a communicator that failed before: the
 * receives not made are left as they were. Sends wait for nothing but their own streams, so
 * no order of batches across ranks deadlocks. */
static void fake_batch_run(fake_batch_t *b)
{
    ncclComm_t c = b->comm;
    ncclResult_t r = fake_aborted(c) ? ncclInternalError : fake_err(c);
    for (int i = 0; i < b->nstreams && r == ncclSuccess; i++) r = fake_reached(c, b->start[i]);
    for (int i = 0; i < b->nops && r == ncclSuccess; i++)
        if (b->ops[i].send) r = fake_send(&b->ops[i]);
    if (r == ncclSuccess) r = fake_nap(c, c->delay_us);
    for (int i = 0; i < b->nops && r == ncclSuccess; i++)
        if (!b->ops[i].send) r = fake_recv(&b->ops[i]);
}

/* The communicator's batches, in posting order, until it stops and none is left. Each
 * batch's streams are released when it is done, whatever happened. */
static void *fake_worker(void *arg)
{
    ncclComm_t c = arg;
    int device_ok = cudaSetDevice(c->device) == cudaSuccess;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->head && !c->stop) pthread_cond_wait(&c->cv, &c->mu);
        fake_batch_t *b = c->head;
        if (!b) break;
        if (!(c->head = b->next)) c->tail = NULL;
        pthread_mutex_unlock(&c->mu);
        if (device_ok)
            fake_batch_run(b);
        else
            fake_fail(c, ncclUnhandledCudaError, "cudaSetDevice (worker)");
        for (int i = 0; i < b->nstreams; i++) cudaEventDestroy(b->start[i]);
        fake_unref(b, 1);
        pthread_mutex_lock(&c->mu);
    }
    c->exited = 1;
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* ---- Communicators --------------------------------------------------------------------- */

ncclResult_t ncclGetUniqueId(ncclUniqueId *id)
{
    static unsigned counter;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    memset(id, 0, sizeof *id);
    snprintf(id->internal, sizeof id->internal, "epxfakenccl-%d-%u-%lx", (int)getpid(), counter++,
             (unsigned long)ts.tv_nsec);
    return ncclSuccess;
}

/* What init made, once no worker runs. */
static void fake_comm_free(ncclComm_t c)
{
    if (c->copy) cudaStreamDestroy(c->copy);
    if (c->pin) fake_pin_give(c->pin);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c->sent), free(c->received), free(c);
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *out, int nranks, ncclUniqueId id, int rank, void *config)
{
    (void)config;
    *out = NULL;
    if (nranks < 1 || nranks > FAKE_MAX_RANKS || rank < 0 || rank >= nranks) return ncclInvalidArgument;
    ncclComm_t c = calloc(1, sizeof *c);
    if (!c) return ncclSystemError;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    c->sent = calloc((size_t)nranks, sizeof *c->sent);
    c->received = calloc((size_t)nranks, sizeof *c->received);
    ncclResult_t r = ncclSuccess;
    if (!c->sent || !c->received)
        r = ncclSystemError;
    else if (cudaGetDevice(&c->device) != cudaSuccess ||
             cudaStreamCreateWithFlags(&c->copy, cudaStreamNonBlocking) != cudaSuccess)
        c->copy = NULL, r = ncclUnhandledCudaError;
    else if (!(c->pin = fake_pin_take()))
        r = ncclUnhandledCudaError;
    memcpy(c->name, id.internal, sizeof c->name - 1);
    c->nranks = nranks;
    c->rank = rank;
    c->timeout_us = fake_timeout_us();
    c->delay_us = fake_delay_us();
    if (r == ncclSuccess && pthread_create(&c->worker, NULL, fake_worker, c) != 0) r = ncclSystemError;
    if (r != ncclSuccess) {
        fake_comm_free(c);
        return r;
    }
    *out = c;
    return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t *r)
{
    *r = c ? fake_err(c) : ncclInvalidArgument;
    return ncclSuccess;
}

static int fake_exited(ncclComm_t c)
{
    pthread_mutex_lock(&c->mu);
    int e = c->exited;
    pthread_mutex_unlock(&c->mu);
    return e;
}

/* Messages I sent that are still there: with `wait`, a clean end, until their receivers
 * took them (bounded, as a peer may still be on its way to its receives); then, or at once
 * (abort: a peer may be gone), they are removed. Only once the worker has ended. */
static void fake_unread(ncclComm_t c, int wait)
{
    char name[128];
    long long left_us = c->timeout_us;
    for (int p = 0; p < c->nranks; p++)
        for (uint64_t n = 0; n < c->sent[p]; n++) {
            fake_name(c, c->rank, p, n, name, sizeof name);
            for (; wait && left_us > 0; left_us -= 100) {
                int fd = shm_open(name, O_RDONLY, 0600);
                if (fd < 0) break; /* taken */
                close(fd);
                usleep(100);
            }
            shm_unlink(name); /* fails harmlessly where the receiver took it or it was never made */
        }
}

/* End the worker, then free. With `clean`, the batches posted finish first (bounded by
 * FAKE_NCCL_TIMEOUT_MS, after which they are given up); else they are given up at once.
 * Either way every stream held is released, and nothing the worker uses is freed before it
 * has ended. */
static ncclResult_t fake_free(ncclComm_t c, int clean)
{
    if (!c) return ncclInvalidArgument;
    if (!clean) __atomic_store_n(&c->abort, 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    for (long long left_us = c->timeout_us; clean && left_us > 0 && !fake_exited(c); left_us -= 100) usleep(100);
    __atomic_store_n(&c->abort, 1, __ATOMIC_RELEASE); /* what is left gives up */
    pthread_join(c->worker, NULL);
    fake_unread(c, clean);
    fake_comm_free(c);
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t c) { return fake_free(c, 0); }
ncclResult_t ncclCommDestroy(ncclComm_t c) { return fake_free(c, 1); }
ncclResult_t ncclCommFinalize(ncclComm_t c) { return c ? ncclSuccess : ncclInvalidArgument; }
ncclResult_t ncclCommCount(const ncclComm_t c, int *n) { return *n = c->nranks, ncclSuccess; }
ncclResult_t ncclCommUserRank(const ncclComm_t c, int *r) { return *r = c->rank, ncclSuccess; }
ncclResult_t ncclCommCuDevice(const ncclComm_t c, int *d) { return *d = c->device, ncclSuccess; }

/* The communicator's error in words; "" while it has none (its words, once set, never change). */
const char *ncclGetLastError(ncclComm_t c) { return c && fake_err(c) != ncclSuccess ? c->last : ""; }

const char *ncclGetErrorString(ncclResult_t r)
{
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    default: return "unknown result code";
    }
}

/* ---- Posting groups -------------------------------------------------------------------- */

/* c's operations among ops[from, to) as a batch for its worker: copied, with their distinct
 * streams and a start event for each (not recorded yet). */
static ncclResult_t fake_batch_new(ncclComm_t c, int from, int to, fake_batch_t **out)
{
    int n = 0;
    for (int i = from; i < to; i++) n += ops[i].comm == c;
    fake_batch_t *b = calloc(1, sizeof *b);
    if (b) {
        b->ops = malloc((size_t)n * sizeof *b->ops);
        b->streams = malloc((size_t)n * sizeof *b->streams);
        b->start = malloc((size_t)n * sizeof *b->start);
    }
    if (!b || !b->ops || !b->streams || !b->start) {
        if (b) fake_batch_free(b);
        return fake_fail(c, ncclSystemError, "out of memory");
    }
    b->comm = c;
    b->refs = 1; /* the worker's */
    for (int i = from; i < to; i++) {
        if (ops[i].comm != c) continue;
        b->ops[b->nops++] = ops[i];
        int s = 0;
        while (s < b->nstreams && b->streams[s] != ops[i].stream) s++;
        if (s == b->nstreams) b->streams[b->nstreams++] = ops[i].stream;
    }
    for (int s = 0; s < b->nstreams; s++)
        if (cudaEventCreateWithFlags(&b->start[s], cudaEventDisableTiming) != cudaSuccess) {
            while (s-- > 0) cudaEventDestroy(b->start[s]);
            fake_batch_free(b);
            return fake_fail(c, ncclUnhandledCudaError, "cudaEventCreateWithFlags");
        }
    *out = b;
    return ncclSuccess;
}

/* The group posted: one batch per communicator, queued for its worker, each of its streams
 * held at the group until the worker is done. Every start is recorded before any hold, so a
 * hold for one communicator never delays another's batch. Returns without waiting for the
 * device; on an error nothing is queued, no message number is used, and nothing stays held. */
static ncclResult_t fake_run(void)
{
    int n = nops;
    nops = 0;
    ncclResult_t r = ncclSuccess;
    for (int i = 0; i < n && r == ncclSuccess; i++) r = fake_err(ops[i].comm); /* a broken one takes no more */
    fake_batch_t **bs = r == ncclSuccess ? calloc((size_t)n, sizeof *bs) : NULL;
    if (r == ncclSuccess && !bs) r = ncclSystemError;
    int nb = 0;
    for (int i = 0; i < n && r == ncclSuccess; i++) {
        int k = 0;
        while (k < nb && bs[k]->comm != ops[i].comm) k++;
        if (k == nb && (r = fake_batch_new(ops[i].comm, i, n, &bs[nb])) == ncclSuccess) nb++;
    }
    for (int k = 0; k < nb && r == ncclSuccess; k++)
        for (int s = 0; s < bs[k]->nstreams && r == ncclSuccess; s++) {
            enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
            if (cudaStreamIsCapturing(bs[k]->streams[s], &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone)
                r = fake_fail(bs[k]->comm, ncclInvalidUsage, "a group on a capturing stream (not supported)");
            else if (cudaEventRecord(bs[k]->start[s], bs[k]->streams[s]) != cudaSuccess)
                r = fake_fail(bs[k]->comm, ncclUnhandledCudaError, "cudaEventRecord (group start)");
        }
    for (int k = 0; k < nb && r == ncclSuccess; k++)
        for (int s = 0; s < bs[k]->nstreams && r == ncclSuccess; s++) {
            pthread_mutex_lock(&fake_hold_mu); /* a host function of this batch may be running */
            bs[k]->refs++;
            pthread_mutex_unlock(&fake_hold_mu);
            if (cudaLaunchHostFunc(bs[k]->streams[s], fake_hold, bs[k]) != cudaSuccess) {
                fake_unref(bs[k], 0);
                r = fake_fail(bs[k]->comm, ncclUnhandledCudaError, "cudaLaunchHostFunc (group hold)");
            }
        }
    for (int k = 0; k < nb; k++) {
        fake_batch_t *b = bs[k];
        ncclComm_t c = b->comm;
        if (r != ncclSuccess) { /* released at once, the worker's reference dropped */
            for (int s = 0; s < b->nstreams; s++) cudaEventDestroy(b->start[s]);
            fake_unref(b, 1);
            continue;
        }
        for (int i = 0; i < b->nops; i++) {
            fake_op_t *o = &b->ops[i];
            o->n = o->send ? c->sent[o->peer]++ : c->received[o->peer]++;
        }
        pthread_mutex_lock(&c->mu);
        if (c->tail)
            c->tail->next = b;
        else
            c->head = b;
        c->tail = b;
        pthread_cond_signal(&c->cv);
        pthread_mutex_unlock(&c->mu);
    }
    free(bs);
    return r;
}

ncclResult_t ncclGroupStart(void)
{
    depth++;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void)
{
    if (depth <= 0) return ncclInvalidUsage;
    return --depth == 0 ? fake_run() : ncclSuccess;
}

static ncclResult_t fake_queue(int send, const void *buf, size_t count, ncclDataType_t t, int peer, ncclComm_t c,
                               cudaStream_t stream)
{
    if (!c || peer < 0 || peer >= c->nranks || fake_type_size(t) == 0) return ncclInvalidArgument;
    if (nops == FAKE_MAX_OPS) return fake_fail(c, ncclInvalidUsage, "too many operations in one group");
    ops[nops++] = (fake_op_t){send, (void *)buf, count * fake_type_size(t), peer, c, stream, 0};
    return depth > 0 ? ncclSuccess : fake_run();
}

ncclResult_t ncclSend(const void *buf, size_t count, ncclDataType_t t, int peer, ncclComm_t c, cudaStream_t stream)
{
    return fake_queue(1, buf, count, t, peer, c, stream);
}

ncclResult_t ncclRecv(void *buf, size_t count, ncclDataType_t t, int peer, ncclComm_t c, cudaStream_t stream)
{
    return fake_queue(0, buf, count, t, peer, c, stream);
}
