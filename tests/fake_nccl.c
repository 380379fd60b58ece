/*
 * A stand-in for libnccl.so.2, for tests only: the NCCL calls epx makes (src/nccl/nccl.c)
 * and those of epx-bench's baselines, with point-to-point transfers through POSIX shared memory, so that CUDA across simulated
 * hosts runs where NCCL itself cannot: several ranks on one GPU (NCCL refuses two ranks of
 * one device). Loaded instead of NCCL through LD_LIBRARY_PATH (tests/CMakeLists.txt:
 * fake_nccl_* tests).
 *
 * Asynchronous, like NCCL: ncclGroupEnd (and a lone ncclSend/ncclRecv) enqueues the group
 * on its streams and returns at once. On each stream of the group: the sends' bytes are
 * copied into pinned host memory, the stream writes "reached" (a stream memory operation
 * on a mapped host word), waits (another one) until the communicator's worker thread says
 * the group is done, then copies the received bytes from pinned memory into place. The
 * worker runs the communicator's groups in the order they were posted: it waits until every
 * stream of the group has reached it, writes the sends into shared memory, sleeps
 * FAKE_NCCL_DELAY_US (default 0), reads the receives, and releases the streams. It makes no
 * CUDA call, so nothing the caller's thread does in CUDA (a cudaMemcpy, a cudaFree that
 * waits for the device) can stop it: as with NCCL, a held stream waits only for the peers.
 * Work on another stream that does not wait for the group may read the receive buffers
 * before they are written; the delay widens that window, so that a missing join shows as
 * wrong data. FAKE_NCCL_SYNC=1: ncclGroupEnd also waits until its receives are in.
 *
 * Semantics kept: sends and receives between the same two ranks on a communicator match in
 * order; a send reads what its stream produced before the group. Errors met while moving data
 * (a receive whose sender never comes within FAKE_NCCL_TIMEOUT_MS, default 60000:
 * ncclRemoteError; a send and its receive of different sizes: ncclInvalidUsage) stick to the
 * communicator and are reported by ncclCommGetAsyncError and ncclGetLastError; the group's
 * streams are released all the same, with unspecified bytes in its receive buffers (as with
 * NCCL), and later groups are refused. ncclCommAbort gives up the groups in flight at once;
 * ncclCommDestroy lets them finish (bounded by the same timeout). Not kept: NCCL's own
 * failure handling (what a kernel does when a peer goes, error codes beyond the above, the
 * in-progress states of a non-blocking communicator, but for the one below).
 *
 * Graph capture: a group whose operations are all on one stream being captured becomes, per
 * communicator, a template: a copy of its operations, a pinned buffer for each, and a mapped
 * host word `done`. What the stream captures: the sends' copies into those buffers, a host
 * function (fake_replay_post), a wait until done is 1, the receives' copies out of them. At
 * each replay CUDA runs the host function once the sends are copied; it posts the group to
 * the worker as the communicator's next batch, numbering its messages then, and the worker
 * sets done once through with it (the stream has reached it: the worker waits for no stream).
 * So a graph's groups get their message numbers when a replay reaches them, eager groups
 * when posted: a test that mixes eager groups and replays on one communicator must keep them
 * in the same order on every rank, e.g. synchronise the stream between a replay and the next
 * eager call (also, an eager group posted while a replay is on its way to its group, on a
 * stream that runs it after the replay, would hold the worker for good: the worker takes
 * batches in number order). A captured group on several streams, or on captured and
 * uncaptured ones, is refused (ncclInvalidUsage). A template is never freed, as a graph may
 * be replayed at any time: a replay on a communicator destroyed or aborted, or one that
 * failed, posts nothing and lets its stream go on at once (unspecified bytes in the receive
 * buffers). A template runs one replay at a time: a replay that finds the last one still in
 * flight (one graph instantiated twice, run at once) fails the communicator, ncclInvalidUsage.
 * FAKE_NCCL_SYNC does not apply to captured groups. As with NCCL, ncclCommAbort and
 * ncclCommDestroy release the streams at once but return only once every graph holding a
 * template of the communicator (and its instances) is destroyed (a CUDA user object counts
 * them); ncclCommFinalize answers ncclInProgress, and ncclCommGetAsyncError stays so, while
 * such a graph lives.
 *
 * Initialisation, for epx's failure paths in it: FAKE_NCCL_INIT_JOIN=1 makes it wait for the
 * peers as NCCL's does: ncclCommInitRankConfig answers ncclInProgress, and the communicator
 * stays so (ncclCommGetAsyncError) until every rank of the id has called it; it never gives
 * up by itself, only ncclCommAbort ends it. Unset, a communicator is ready on return.
 * FAKE_NCCL_FAIL_INIT_RANK=r: in the process whose EPX_RANK (epx-run's rank) is r,
 * ncclCommInitRankConfig fails at once with ncclSystemError, making nothing.
 *
 * A message from rank s to rank d, the n-th between them on a communicator, is one shared
 * memory object named after the communicator, s, d and n: the sender writes the bytes, then
 * a ready word; the receiver waits for it, copies, and unlinks the object. The numbers are
 * given when a group is posted (a captured one: when a replay reaches it), so groups in
 * flight keep their order.
 */
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
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
#define FAKE_MAX_STREAMS 64 /* distinct streams one communicator's groups may use */

typedef struct fake_comm *ncclComm_t;

typedef struct {
    int send;
    void *buf;
    size_t bytes;
    int peer;
    ncclComm_t comm;
    cudaStream_t stream;
    uint64_t n; /* the message's number between me and peer, given when the group is posted (or replayed) */
    char *pin;  /* its bytes in pinned host memory (NULL for none) */
    int slot;   /* its stream's slot in the communicator (eager groups) */
} fake_op_t;

/* A captured group's part on one communicator (module comment), for every replay of its
 * graph. Never freed: a graph may be replayed at any time, even after the communicator is
 * gone (then `dead`), and its pinned memory cannot be given back (cudaFreeHost may wait for
 * a held stream); nor is one whose capture failed. */
typedef struct fake_tmpl {
    struct fake_tmpl *next; /* the communicator's templates */
    ncclComm_t comm;
    int dead; /* the communicator is destroyed or aborted (by fake_post_mu) */
    int nops;
    fake_op_t *ops;          /* with their own pinned buffers (pin) */
    volatile uint32_t *done; /* mapped host word: 0 while a replay's batch is in flight, else 1 */
    CUdeviceptr ddone;       /* its device address */
} fake_tmpl_t;

/* One communicator's part of a posted group, as its worker runs it (the worker frees it). */
typedef struct fake_batch {
    struct fake_batch *next; /* in the communicator's queue */
    ncclComm_t comm;
    uint32_t q;  /* its number on the communicator, from 1 */
    int failed;  /* posting failed half way: the worker only releases the streams */
    int nops, nslots;
    fake_op_t *ops;    /* a copy of the group's operations on comm */
    int *slots;        /* the slots of their distinct streams (none for a replay's) */
    fake_tmpl_t *tmpl; /* a replay's template: the worker sets its done word when through */
} fake_batch_t;

struct fake_comm {
    char name[64]; /* from the unique id */
    int nranks, rank, device, sync;
    long long timeout_us, delay_us; /* FAKE_NCCL_TIMEOUT_MS, FAKE_NCCL_DELAY_US */
    uint64_t *sent, *received;      /* [nranks]: messages posted so far, per peer (by fake_post_mu) */
    /* Mapped host words (never freed: a stream stuck for good may still wait on them):
     * word[0] the last batch done (the streams wait for it), word[1 + i] the last batch the
     * stream of slot i reached (it writes it). dword: their device address. */
    volatile uint32_t *word;
    CUdeviceptr dword;
    cudaStream_t slot[FAKE_MAX_STREAMS]; /* by fake_post_mu; a slot is taken over by */
    uint32_t slot_q[FAKE_MAX_STREAMS];   /* another stream once its last batch, slot_q, is done */
    int nslot;
    uint32_t q;         /* batches posted (by fake_post_mu) */
    fake_tmpl_t *tmpls; /* captured groups (by fake_post_mu) */
    int graphs;         /* atomic: CUDA graphs (and their instances) holding a template of c */
    int finalizing;     /* atomic: ncclCommFinalize was called */
    pthread_t worker;
    int abort;          /* atomic: the worker gives up what it waits for */
    pthread_mutex_t mu; /* guards what follows */
    pthread_cond_t cv;  /* a batch was queued, or stop */
    fake_batch_t *head, *tail; /* posted, not yet taken by the worker */
    uint32_t taken;            /* the last batch the worker finished */
    int stop, exited;          /* no more batches will come; the worker has ended */
    ncclResult_t err;          /* the first error: sticks */
    char last[256];            /* its words, written once, before err */
    struct fake_join *join;    /* FAKE_NCCL_INIT_JOIN: mapped while the init waits for peers */
};

/* FAKE_NCCL_INIT_JOIN: where the ranks of one id meet, in shared memory named after it.
 * Each sets its byte on joining; each that has seen every byte counts itself in `seen`, and
 * the last one removes the object. */
typedef struct fake_join {
    uint32_t seen;
    unsigned char in[FAKE_MAX_RANKS];
} fake_join_t;

static __thread int depth;
static __thread int nops;
static __thread fake_op_t ops[FAKE_MAX_OPS];

/* Held while batches are numbered and queued, by ncclGroupEnd's thread and by CUDA's
 * host-function thread (replays), so that each communicator's batches reach its worker in
 * number order (its streams wait for word[0] to reach their number); held by nothing that
 * waits for a stream or the worker. */
static pthread_mutex_t fake_post_mu = PTHREAD_MUTEX_INITIALIZER;

/* cuStreamWaitValue32 / cuStreamWriteValue32, from the driver (fake_driver). */
typedef CUresult (*fake_memop_fn)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
static fake_memop_fn fake_wait32, fake_write32;
static pthread_once_t fake_driver_once = PTHREAD_ONCE_INIT;

static void fake_driver_load(void)
{
    enum cudaDriverEntryPointQueryResult q1, q2;
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", (void **)&fake_wait32, 12000, cudaEnableDefault, &q1) !=
            cudaSuccess ||
        q1 != cudaDriverEntryPointSuccess)
        fake_wait32 = NULL;
    if (cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", (void **)&fake_write32, 12000, cudaEnableDefault,
                                         &q2) != cudaSuccess ||
        q2 != cudaDriverEntryPointSuccess)
        fake_write32 = NULL;
}

static int fake_driver(void)
{
    pthread_once(&fake_driver_once, fake_driver_load);
    return fake_wait32 && fake_write32;
}

/* cudaHostAlloc, also while a stream is being captured (a capture in global mode, this
 * thread's or another's, would refuse it, and be invalidated). */
static cudaError_t fake_host_alloc(void **p, size_t bytes, unsigned flags)
{
    enum cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    cudaError_t ce = cudaHostAlloc(p, bytes, flags);
    cudaThreadExchangeStreamCaptureMode(&mode);
    return ce;
}

/* Pinned host buffers, for every communicator of the process (posting threads only): one is
 * free again once its event (recorded on its stream after the last copy that uses it) has
 * completed. Never given back to CUDA (cudaFreeHost may wait for the device, where a stream
 * may be held). */
typedef struct {
    char *p;
    size_t cap;
    cudaEvent_t ev;
    int recorded, taken; /* taken: by the group being posted */
} fake_pin_t;
static pthread_mutex_t fake_pin_mu = PTHREAD_MUTEX_INITIALIZER;
static fake_pin_t *fake_pins;
static int fake_npins, fake_cap_pins;

/* A free pinned buffer of at least `bytes`, taken (index, or -1). */
static int fake_pin_take(size_t bytes)
{
    pthread_mutex_lock(&fake_pin_mu);
    int got = -1;
    for (int i = 0; i < fake_npins && got < 0; i++) {
        fake_pin_t *b = &fake_pins[i];
        if (!b->taken && b->cap >= bytes && (!b->recorded || cudaEventQuery(b->ev) == cudaSuccess)) got = i;
    }
    if (got < 0 && fake_npins == fake_cap_pins) {
        int cap = fake_cap_pins ? 2 * fake_cap_pins : 64;
        fake_pin_t *n = realloc(fake_pins, (size_t)cap * sizeof *n);
        if (n) fake_pins = n, fake_cap_pins = cap;
    }
    if (got < 0 && fake_npins < fake_cap_pins) {
        fake_pin_t b = {NULL, 4096, NULL, 0, 0};
        while (b.cap < bytes) b.cap *= 2;
        if (fake_host_alloc((void **)&b.p, b.cap, cudaHostAllocPortable) == cudaSuccess) {
            if (cudaEventCreateWithFlags(&b.ev, cudaEventDisableTiming) == cudaSuccess)
                fake_pins[got = fake_npins++] = b;
            else
                cudaFreeHost(b.p); /* never used: nothing waits on it */
        }
    }
    if (got >= 0) fake_pins[got].taken = 1;
    pthread_mutex_unlock(&fake_pin_mu);
    return got;
}

/* Buffer i is in use until what `stream` has now is done (record = 0: never used, free now;
 * if the event cannot be recorded the buffer stays taken for good). */
static cudaError_t fake_pin_give(int i, cudaStream_t stream, int record)
{
    pthread_mutex_lock(&fake_pin_mu);
    cudaError_t ce = record ? cudaEventRecord(fake_pins[i].ev, stream) : cudaSuccess;
    if (record && ce == cudaSuccess) fake_pins[i].recorded = 1;
    if (ce == cudaSuccess) fake_pins[i].taken = 0;
    pthread_mutex_unlock(&fake_pin_mu);
    return ce;
}

static char *fake_pin_ptr(int i)
{
    pthread_mutex_lock(&fake_pin_mu); /* fake_pins may move while another thread grows it */
    char *p = fake_pins[i].p;
    pthread_mutex_unlock(&fake_pin_mu);
    return p;
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

/* Has the 32-bit sequence word w reached q (wrapping, as CU_STREAM_WAIT_VALUE_GEQ)? */
static int fake_reached_q(const volatile uint32_t *w, uint32_t q)
{
    return (int32_t)(__atomic_load_n(w, __ATOMIC_ACQUIRE) - q) >= 0;
}

/* ---- The worker (no CUDA calls) ----------------------------------------------------------- */

/* Until the stream of slot i has run everything before batch q, or an abort. */
static ncclResult_t fake_reached(ncclComm_t c, int i, uint32_t q)
{
    for (unsigned spin = 0; !fake_reached_q(&c->word[1 + i], q); spin++) {
        if (fake_aborted(c)) return fake_fail(c, ncclInternalError, "communicator aborted");
        if (spin < 64)
            sched_yield();
        else
            usleep(20);
    }
    return ncclSuccess;
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

/* One message out: the pinned bytes into a new object, then its ready word. */
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
    if (o->bytes) memcpy(m + 64, o->pin, o->bytes);
    *(uint64_t *)(m + 8) = o->bytes;
    __atomic_store_n((uint64_t *)m, 1ull, __ATOMIC_RELEASE);
    munmap(m, len);
    return ncclSuccess;
}

/* One message in: wait for its object to be ready, copy it into pinned memory, remove it. */
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
    if (bytes != o->bytes)
        r = fake_fail(c, ncclInvalidUsage, "a send and its receive differ in size");
    else if (bytes)
        memcpy(o->pin, m + 64, bytes);
    munmap(m, len);
    shm_unlink(name);
    return r;
}

/* One batch: its streams reach it (a replay's has), then the sends, the delay, the receives;
 * then, whatever happened, its streams are released (a replay's through its done word).
 * Stops at the first error or an abort, and moves nothing on a communicator that failed
 * before. Sends wait for nothing but their own streams, so no order of batches across ranks
 * deadlocks. */
static void fake_batch_run(fake_batch_t *b)
{
    ncclComm_t c = b->comm;
    ncclResult_t r = b->failed || fake_aborted(c) ? ncclInternalError : fake_err(c);
    for (int i = 0; i < b->nslots && r == ncclSuccess; i++) r = fake_reached(c, b->slots[i], b->q);
    for (int i = 0; i < b->nops && r == ncclSuccess; i++)
        if (b->ops[i].send) r = fake_send(&b->ops[i]);
    if (r == ncclSuccess) r = fake_nap(c, c->delay_us);
    for (int i = 0; i < b->nops && r == ncclSuccess; i++)
        if (!b->ops[i].send) r = fake_recv(&b->ops[i]);
    __atomic_store_n(&c->word[0], b->q, __ATOMIC_RELEASE);
    if (b->tmpl) __atomic_store_n(b->tmpl->done, 1u, __ATOMIC_RELEASE);
}

/* The communicator's batches, in posting order, until it stops and none is left. */
static void *fake_worker(void *arg)
{
    ncclComm_t c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->head && !c->stop) pthread_cond_wait(&c->cv, &c->mu);
        fake_batch_t *b = c->head;
        if (!b) break;
        if (!(c->head = b->next)) c->tail = NULL;
        pthread_mutex_unlock(&c->mu);
        fake_batch_run(b);
        free(b->ops), free(b->slots), free(b);
        pthread_mutex_lock(&c->mu);
        c->taken++;
        pthread_cond_broadcast(&c->cv);
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

/* What init made, once no worker runs (the mapped words stay: see struct fake_comm). */
static void fake_comm_free(ncclComm_t c)
{
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c->sent), free(c->received), free(c);
}

static void fake_join_name(const ncclComm_t c, char *out, size_t len) { snprintf(out, len, "/%s-join", c->name); }

/* FAKE_NCCL_INIT_JOIN: c joins its id's meeting place (NULL on a system error). */
static fake_join_t *fake_join(ncclComm_t c)
{
    char name[128];
    fake_join_name(c, name, sizeof name);
    int fd = shm_open(name, O_CREAT | O_RDWR, 0600);
    if (fd < 0) return NULL;
    /* Every rank sizes it alike: the first one's zeros stay, nobody's bytes are lost. */
    fake_join_t *j = ftruncate(fd, sizeof *j) == 0 ? mmap(NULL, sizeof *j, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                                                   : MAP_FAILED;
    close(fd);
    if (j == MAP_FAILED) return NULL;
    __atomic_store_n(&j->in[c->rank], 1, __ATOMIC_RELEASE);
    return j;
}

/* Has every rank joined? Once it has, c leaves the meeting place (the last one removes it). */
static int fake_joined(ncclComm_t c)
{
    for (int p = 0; p < c->nranks; p++)
        if (!__atomic_load_n(&c->join->in[p], __ATOMIC_ACQUIRE)) return 0;
    char name[128];
    fake_join_name(c, name, sizeof name);
    if (__atomic_add_fetch(&c->join->seen, 1, __ATOMIC_ACQ_REL) == (uint32_t)c->nranks) shm_unlink(name);
    munmap(c->join, sizeof *c->join);
    c->join = NULL;
    return 1;
}

/* A communicator given up while it waits for its peers: the meeting place goes too (the
 * peers that mapped it keep it; they wait on until their own abort). */
static void fake_leave(ncclComm_t c)
{
    if (!c->join) return;
    char name[128];
    fake_join_name(c, name, sizeof name);
    munmap(c->join, sizeof *c->join);
    c->join = NULL;
    shm_unlink(name);
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *out, int nranks, ncclUniqueId id, int rank, void *config)
{
    (void)config;
    *out = NULL;
    if (nranks < 1 || nranks > FAKE_MAX_RANKS || rank < 0 || rank >= nranks) return ncclInvalidArgument;
    const char *fail = getenv("FAKE_NCCL_FAIL_INIT_RANK"), *me = getenv("EPX_RANK");
    if (fail && me && atoi(fail) == atoi(me)) return ncclSystemError;
    ncclComm_t c = calloc(1, sizeof *c);
    if (!c) return ncclSystemError;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    c->sent = calloc((size_t)nranks, sizeof *c->sent);
    c->received = calloc((size_t)nranks, sizeof *c->received);
    void *w = NULL, *dw = NULL;
    ncclResult_t r = ncclSuccess;
    if (!c->sent || !c->received)
        r = ncclSystemError;
    else if (!fake_driver() || cudaGetDevice(&c->device) != cudaSuccess ||
             fake_host_alloc(&w, sizeof(uint32_t) * (1 + FAKE_MAX_STREAMS),
                             cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess)
        w = NULL, r = ncclUnhandledCudaError;
    else if (cudaHostGetDevicePointer(&dw, w, 0) != cudaSuccess)
        r = ncclUnhandledCudaError;
    if (w) memset(w, 0, sizeof(uint32_t) * (1 + FAKE_MAX_STREAMS));
    c->word = w, c->dword = (CUdeviceptr)(uintptr_t)dw;
    memcpy(c->name, id.internal, sizeof c->name - 1);
    c->nranks = nranks;
    c->rank = rank;
    c->timeout_us = fake_timeout_us();
    c->delay_us = fake_delay_us();
    const char *sync = getenv("FAKE_NCCL_SYNC");
    c->sync = sync && atoi(sync) != 0;
    const char *join = getenv("FAKE_NCCL_INIT_JOIN");
    if (r == ncclSuccess && join && atoi(join) != 0 && !(c->join = fake_join(c))) r = ncclSystemError;
    if (r == ncclSuccess && pthread_create(&c->worker, NULL, fake_worker, c) != 0) r = ncclSystemError;
    if (r != ncclSuccess) {
        fake_leave(c);
        if (w) cudaFreeHost(w); /* no stream ever waited on it */
        fake_comm_free(c);
        return r;
    }
    *out = c;
    return c->join ? ncclInProgress : ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t *out, int nranks, ncclUniqueId id, int rank)
{
    return ncclCommInitRankConfig(out, nranks, id, rank, NULL);
}

/* A finalize stays in progress while a graph holds c (as NCCL's, which waits for them). */
static int fake_finalizing(ncclComm_t c)
{
    return __atomic_load_n(&c->finalizing, __ATOMIC_ACQUIRE) && __atomic_load_n(&c->graphs, __ATOMIC_ACQUIRE) > 0;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t *r)
{
    *r = !c ? ncclInvalidArgument
         : (c->join && !fake_joined(c)) || fake_finalizing(c) ? ncclInProgress
                                                                : fake_err(c);
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
 * (abort: a peer may be gone), they are removed; so are those sent to me that I did not
 * take. Only once the worker has ended. */
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
    for (int p = 0; p < c->nranks; p++) /* and those sent to me that I never took (a peer died) */
        for (uint64_t n = 0; n < c->received[p]; n++) {
            fake_name(c, p, c->rank, n, name, sizeof name);
            shm_unlink(name);
        }
}

/* End the worker, then free. With `clean`, the batches posted finish first (bounded by
 * FAKE_NCCL_TIMEOUT_MS, after which they are given up); else they are given up at once.
 * Either way every stream held is released (replays' too), later replays of c's captured
 * groups post nothing, and nothing the worker uses is freed before it has ended. */
static ncclResult_t fake_free(ncclComm_t c, int clean)
{
    if (!c) return ncclInvalidArgument;
    pthread_mutex_lock(&fake_post_mu); /* from here no replay posts to c (fake_replay_post) */
    for (fake_tmpl_t *t = c->tmpls; t; t = t->next) t->dead = 1;
    pthread_mutex_unlock(&fake_post_mu);
    if (!clean) __atomic_store_n(&c->abort, 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    for (long long left_us = c->timeout_us; clean && left_us > 0 && !fake_exited(c); left_us -= 100) usleep(100);
    __atomic_store_n(&c->abort, 1, __ATOMIC_RELEASE); /* what is left gives up (and is released) */
    pthread_join(c->worker, NULL);
    __atomic_store_n(&c->word[0], c->q, __ATOMIC_RELEASE); /* (the worker released them all already) */
    fake_unread(c, clean);
    fake_leave(c);
    /* As NCCL's: the communicator goes only once every graph that captured work on it is
     * destroyed (its streams were released above, so that the graphs' replays end). */
    while (__atomic_load_n(&c->graphs, __ATOMIC_ACQUIRE) > 0) usleep(1000);
    fake_comm_free(c);
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t c) { return fake_free(c, 0); }
ncclResult_t ncclCommDestroy(ncclComm_t c) { return fake_free(c, 1); }
ncclResult_t ncclCommFinalize(ncclComm_t c)
{
    if (!c) return ncclInvalidArgument;
    __atomic_store_n(&c->finalizing, 1, __ATOMIC_RELEASE);
    return fake_finalizing(c) ? ncclInProgress : ncclSuccess;
}
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

/* The slot of `stream` on c for batch q: its own, else a new one, else one whose last batch
 * is done (its word then holds less than q), or -1 when none is free. */
static int fake_slot(ncclComm_t c, cudaStream_t stream, uint32_t q)
{
    int i = 0;
    while (i < c->nslot && c->slot[i] != stream) i++;
    if (i == c->nslot && c->nslot == FAKE_MAX_STREAMS) {
        pthread_mutex_lock(&c->mu);
        for (i = 0; i < c->nslot && (int32_t)(c->taken - c->slot_q[i]) < 0; i++) continue;
        pthread_mutex_unlock(&c->mu);
        if (i == c->nslot) return -1;
    }
    if (i == c->nslot) c->nslot++;
    c->slot[i] = stream, c->slot_q[i] = q;
    return i;
}

/* c's operations among ops[from, to) as its next batch for its worker: copied, with their
 * streams' slots. */
static ncclResult_t fake_batch_new(ncclComm_t c, int from, int to, fake_batch_t **out)
{
    int n = 0;
    for (int i = from; i < to; i++) n += ops[i].comm == c;
    fake_batch_t *b = calloc(1, sizeof *b);
    if (b) {
        b->ops = malloc((size_t)n * sizeof *b->ops);
        b->slots = malloc((size_t)n * sizeof *b->slots);
    }
    if (!b || !b->ops || !b->slots) {
        if (b) free(b->ops), free(b->slots), free(b);
        return fake_fail(c, ncclSystemError, "out of memory");
    }
    b->comm = c;
    b->q = c->q + 1;
    for (int i = from; i < to; i++) {
        if (ops[i].comm != c) continue;
        fake_op_t *o = &b->ops[b->nops++];
        *o = ops[i];
        if ((o->slot = fake_slot(c, o->stream, b->q)) < 0) {
            free(b->ops), free(b->slots), free(b);
            return fake_fail(c, ncclInvalidUsage, "too many streams on one communicator");
        }
        int s = 0;
        while (s < b->nslots && b->slots[s] != o->slot) s++;
        if (s == b->nslots) b->slots[b->nslots++] = o->slot;
    }
    *out = b;
    return ncclSuccess;
}

/* Enqueue batch b on its streams (module comment). Returns whether some stream of b waits
 * for the batch (then b must reach the worker, which releases it); *r the first failure
 * (b->failed: the worker moves nothing). */
static int fake_enqueue(fake_batch_t *b, ncclResult_t *r)
{
    ncclComm_t c = b->comm;
    int pins[FAKE_MAX_OPS], waits = 0;
    for (int i = 0; i < b->nops; i++) pins[i] = -1;
    for (int i = 0; i < b->nops && *r == ncclSuccess; i++)
        if (b->ops[i].bytes) {
            if ((pins[i] = fake_pin_take(b->ops[i].bytes)) < 0)
                *r = fake_fail(c, ncclSystemError, "no pinned memory");
            else
                b->ops[i].pin = fake_pin_ptr(pins[i]);
        }
    for (int s = 0; s < b->nslots && *r == ncclSuccess; s++) {
        int slot = b->slots[s];
        cudaStream_t st = c->slot[slot];
        for (int i = 0; i < b->nops && *r == ncclSuccess; i++) {
            fake_op_t *o = &b->ops[i];
            if (o->slot == slot && o->send && o->bytes &&
                cudaMemcpyAsync(o->pin, o->buf, o->bytes, cudaMemcpyDeviceToHost, st) != cudaSuccess)
                *r = fake_fail(c, ncclUnhandledCudaError, "cudaMemcpyAsync (send)");
        }
        if (*r == ncclSuccess && fake_write32((CUstream)st, c->dword + sizeof(uint32_t) * (1 + (size_t)slot), b->q,
                                              CU_STREAM_WRITE_VALUE_DEFAULT) != CUDA_SUCCESS)
            *r = fake_fail(c, ncclUnhandledCudaError, "cuStreamWriteValue32 (group reached)");
        if (*r == ncclSuccess) {
            if (fake_wait32((CUstream)st, c->dword, b->q, CU_STREAM_WAIT_VALUE_GEQ) == CUDA_SUCCESS)
                waits++;
            else
                *r = fake_fail(c, ncclUnhandledCudaError, "cuStreamWaitValue32 (group done)");
        }
        for (int i = 0; i < b->nops && *r == ncclSuccess; i++) {
            fake_op_t *o = &b->ops[i];
            if (o->slot == slot && !o->send && o->bytes &&
                cudaMemcpyAsync(o->buf, o->pin, o->bytes, cudaMemcpyHostToDevice, st) != cudaSuccess)
                *r = fake_fail(c, ncclUnhandledCudaError, "cudaMemcpyAsync (receive)");
        }
        /* This stream's buffers are in use until it has run what it has now. */
        for (int i = 0; i < b->nops; i++)
            if (b->ops[i].slot == slot && pins[i] >= 0) {
                if (fake_pin_give(pins[i], st, 1) != cudaSuccess && *r == ncclSuccess)
                    *r = fake_fail(c, ncclUnhandledCudaError, "cudaEventRecord (pinned buffer in use)");
                pins[i] = -1;
            }
    }
    for (int i = 0; i < b->nops; i++)
        if (pins[i] >= 0) fake_pin_give(pins[i], NULL, 0); /* no stream got to use it */
    b->failed = *r != ncclSuccess;
    return waits > 0;
}

/* b, numbered c->q + 1, to its communicator's worker: its messages numbered, then queued
 * behind the batches before it (by fake_post_mu's holder). */
static void fake_post(fake_batch_t *b)
{
    ncclComm_t c = b->comm;
    c->q = b->q;
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
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* Is the group ops[0, n) being captured? Either none of its streams is, or all its operations
 * are on one stream that is; anything else (a captured group on several streams, or on
 * captured and uncaptured ones, a capture already invalidated, a failed query) is recorded
 * on each of its communicators, and returned in *r. */
static int fake_capturing(int n, ncclResult_t *r)
{
    int capturing = 0, several = 0;
    ncclResult_t e = ncclSuccess;
    const char *why = NULL;
    for (int i = 0; i < n && !why; i++) {
        enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        if (cudaStreamIsCapturing(ops[i].stream, &cs) != cudaSuccess)
            e = ncclUnhandledCudaError, why = "cudaStreamIsCapturing";
        else if (cs == cudaStreamCaptureStatusInvalidated)
            e = ncclUnhandledCudaError, why = "a group on a stream whose capture was invalidated";
        capturing |= cs == cudaStreamCaptureStatusActive;
        several |= ops[i].stream != ops[0].stream;
    }
    if (!why && capturing && several)
        e = ncclInvalidUsage, why = "a captured group on several streams, or on captured and uncaptured ones (not "
                                    "supported)";
    for (int i = 0; i < n && why; i++) *r = fake_fail(ops[i].comm, e, why);
    return capturing && !why;
}

/* At each replay of template t's graph, on CUDA's host-function thread once the stream has
 * copied the sends: t's operations to the worker as the communicator's next batch, numbered
 * as an eager group is when posted; the worker sets done when through. Where the
 * communicator is gone or failed before, or memory is short, nothing is posted (no message
 * numbers taken) and the stream goes on at once. Makes no CUDA call and waits for nothing
 * but fake_post_mu. */
static void CUDART_CB fake_replay_post(void *arg)
{
    fake_tmpl_t *t = arg;
    pthread_mutex_lock(&fake_post_mu);
    ncclComm_t c = t->dead ? NULL : t->comm; /* (fake_free sets dead before it stops c) */
    int again = c && __atomic_exchange_n(t->done, 0u, __ATOMIC_ACQ_REL) == 0; /* the last one in flight */
    fake_batch_t *b = NULL;
    if (again)
        fake_fail(c, ncclInvalidUsage, "a captured group replayed while its last replay is in flight (one graph run "
                                       "twice at once?)");
    else if (c && fake_err(c) == ncclSuccess) {
        b = calloc(1, sizeof *b);
        if (b && !(b->ops = malloc((size_t)t->nops * sizeof *b->ops))) free(b), b = NULL;
        if (!b) fake_fail(c, ncclSystemError, "out of memory (a captured group's replay)");
    }
    if (b) {
        b->comm = c, b->tmpl = t, b->q = c->q + 1, b->nops = t->nops;
        memcpy(b->ops, t->ops, (size_t)t->nops * sizeof *b->ops);
        fake_post(b); /* the worker's from here on */
    }
    pthread_mutex_unlock(&fake_post_mu);
    if (!b && !again) __atomic_store_n(t->done, 1u, __ATOMIC_RELEASE); /* (again: that replay's batch will) */
}

/* The last graph (or instance) holding a template of c is gone (a CUDA user object's
 * destructor: no CUDA call). */
static void CUDART_CB fake_graph_gone(void *arg) { __atomic_sub_fetch(&((ncclComm_t)arg)->graphs, 1, __ATOMIC_ACQ_REL); }

/* The graph being captured on `st` holds c until it and its instances are destroyed. */
static cudaError_t fake_graph_holds(ncclComm_t c, cudaStream_t st)
{
    enum cudaStreamCaptureStatus cs;
    cudaGraph_t g = NULL;
#if CUDART_VERSION >= 13000
    cudaError_t ce = cudaStreamGetCaptureInfo(st, &cs, NULL, &g, NULL, NULL, NULL);
#else
    cudaError_t ce = cudaStreamGetCaptureInfo_v2(st, &cs, NULL, &g, NULL, NULL);
#endif
    cudaUserObject_t o;
    if (ce == cudaSuccess) ce = cudaUserObjectCreate(&o, c, fake_graph_gone, 1, cudaUserObjectNoDestructorSync);
    if (ce != cudaSuccess) return ce;
    __atomic_add_fetch(&c->graphs, 1, __ATOMIC_ACQ_REL);
    ce = cudaGraphRetainUserObject(g, o, 1, cudaGraphUserObjectMove);
    if (ce != cudaSuccess) cudaUserObjectRelease(o, 1); /* (its destructor then counts it out) */
    return ce;
}

/* c's operations among ops[from, to), all on one capturing stream, as a template captured
 * there (module comment): the sends' copies into its buffers, fake_replay_post, the wait for
 * its done word, the receives' copies out of them. */
static ncclResult_t fake_capture_comm(ncclComm_t c, int from, int to)
{
    cudaStream_t st = ops[from].stream;
    int n = 0;
    for (int i = from; i < to; i++) n += ops[i].comm == c;
    fake_tmpl_t *t = calloc(1, sizeof *t);
    if (t && !(t->ops = malloc((size_t)n * sizeof *t->ops))) free(t), t = NULL;
    if (!t) return fake_fail(c, ncclSystemError, "out of memory");
    t->comm = c;
    ncclResult_t r = ncclSuccess;
    void *done = NULL, *ddone = NULL;
    if (fake_host_alloc(&done, sizeof(uint32_t), cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess ||
        cudaHostGetDevicePointer(&ddone, done, 0) != cudaSuccess)
        r = fake_fail(c, ncclUnhandledCudaError, "cudaHostAlloc (a captured group's done word)");
    for (int i = from; i < to && r == ncclSuccess; i++) {
        if (ops[i].comm != c) continue;
        fake_op_t *o = &t->ops[t->nops++];
        *o = ops[i];
        if (o->bytes && fake_host_alloc((void **)&o->pin, o->bytes, cudaHostAllocPortable) != cudaSuccess)
            r = fake_fail(c, ncclUnhandledCudaError, "cudaHostAlloc (a captured group's pinned buffer)");
    }
    if (r == ncclSuccess && fake_graph_holds(c, st) != cudaSuccess)
        r = fake_fail(c, ncclUnhandledCudaError, "a CUDA user object (the graph's hold on the communicator)");
    if (r != ncclSuccess) return r; /* nothing captured: t is left as it is */
    t->done = done, t->ddone = (CUdeviceptr)(uintptr_t)ddone;
    *t->done = 1;
    pthread_mutex_lock(&fake_post_mu);
    t->next = c->tmpls, c->tmpls = t;
    pthread_mutex_unlock(&fake_post_mu);
    for (int i = 0; i < t->nops && r == ncclSuccess; i++) {
        fake_op_t *o = &t->ops[i];
        if (o->send && o->bytes &&
            cudaMemcpyAsync(o->pin, o->buf, o->bytes, cudaMemcpyDeviceToHost, st) != cudaSuccess)
            r = fake_fail(c, ncclUnhandledCudaError, "cudaMemcpyAsync (a captured send)");
    }
    if (r == ncclSuccess && cudaLaunchHostFunc(st, fake_replay_post, t) != cudaSuccess)
        r = fake_fail(c, ncclUnhandledCudaError, "cudaLaunchHostFunc (a captured group's post)");
    if (r == ncclSuccess && fake_wait32((CUstream)st, t->ddone, 1, CU_STREAM_WAIT_VALUE_EQ) != CUDA_SUCCESS)
        r = fake_fail(c, ncclUnhandledCudaError, "cuStreamWaitValue32 under capture (a captured group's done)");
    for (int i = 0; i < t->nops && r == ncclSuccess; i++) {
        fake_op_t *o = &t->ops[i];
        if (!o->send && o->bytes &&
            cudaMemcpyAsync(o->buf, o->pin, o->bytes, cudaMemcpyHostToDevice, st) != cudaSuccess)
            r = fake_fail(c, ncclUnhandledCudaError, "cudaMemcpyAsync (a captured receive)");
    }
    return r;
}

/* The group posted: one batch per communicator, enqueued on its streams and queued for its
 * worker (a captured group: one template per communicator, captured on its stream, in the
 * order of the communicators' first operations). Returns without waiting for the device
 * (FAKE_NCCL_SYNC, eager groups only: once its receives are in). On an error the
 * communicator takes no more groups; a batch some stream already waits for still goes to
 * the worker, which then only releases it. */
static ncclResult_t fake_run(void)
{
    int n = nops;
    nops = 0;
    ncclResult_t r = ncclSuccess;
    for (int i = 0; i < n && r == ncclSuccess; i++) r = fake_err(ops[i].comm); /* a broken one takes no more */
    if (r == ncclSuccess && fake_capturing(n, &r)) {
        for (int i = 0; i < n && r == ncclSuccess; i++) {
            int k = 0;
            while (k < i && ops[k].comm != ops[i].comm) k++;
            if (k == i) r = fake_capture_comm(ops[i].comm, i, n);
        }
        return r;
    }
    fake_batch_t **bs = r == ncclSuccess ? calloc((size_t)n, sizeof *bs) : NULL;
    uint32_t *wait_q = r == ncclSuccess ? calloc((size_t)n, sizeof *wait_q) : NULL; /* FAKE_NCCL_SYNC */
    ncclComm_t *wait_c = r == ncclSuccess ? calloc((size_t)n, sizeof *wait_c) : NULL;
    if (r == ncclSuccess && (!bs || !wait_q || !wait_c)) r = ncclSystemError;
    int nb = 0;
    pthread_mutex_lock(&fake_post_mu);
    for (int i = 0; i < n && r == ncclSuccess; i++) {
        int k = 0;
        while (k < nb && bs[k]->comm != ops[i].comm) k++;
        if (k == nb && (r = fake_batch_new(ops[i].comm, i, n, &bs[nb])) == ncclSuccess) nb++;
    }
    for (int k = 0; k < nb; k++) {
        fake_batch_t *b = bs[k];
        ncclComm_t c = b->comm;
        if (r != ncclSuccess || !fake_enqueue(b, &r)) {
            free(b->ops), free(b->slots), free(b);
            bs[k] = NULL;
            continue;
        }
        if (c->sync) wait_c[k] = c, wait_q[k] = b->q;
        bs[k] = NULL; /* the worker's from here on (it frees it): not read again */
        fake_post(b);
    }
    pthread_mutex_unlock(&fake_post_mu);
    /* FAKE_NCCL_SYNC: until the worker is done with each batch and its streams have run the
     * receives' copies. */
    for (int k = 0; k < nb && r == ncclSuccess; k++) {
        ncclComm_t c = wait_c[k];
        uint32_t q = wait_q[k];
        if (!c) continue;
        pthread_mutex_lock(&c->mu);
        while ((int32_t)(c->taken - q) < 0 && !c->exited) pthread_cond_wait(&c->cv, &c->mu);
        pthread_mutex_unlock(&c->mu);
        for (int i = 0; i < n; i++)
            if (ops[i].comm == c) cudaStreamSynchronize(ops[i].stream);
    }
    free(bs), free(wait_q), free(wait_c);
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
    ops[nops++] = (fake_op_t){send, (void *)buf, count * fake_type_size(t), peer, c, stream, 0, NULL, -1};
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

/* The collectives epx-bench's baselines call (so the bench runs over the fake too), as one
 * group of a send and a receive of `count` elements with every rank: alltoall sends block
 * p of `send` to rank p, allgather all of `send` to every rank; both receive rank p's into
 * block p of `recv`. */
static ncclResult_t fake_exchange(const void *send, bool blocks, void *recv, size_t count, ncclDataType_t t,
                                  ncclComm_t c, cudaStream_t stream)
{
    if (!c || fake_type_size(t) == 0) return ncclInvalidArgument;
    size_t b = count * fake_type_size(t);
    ncclResult_t r = ncclGroupStart();
    for (int p = 0; p < c->nranks && r == ncclSuccess; p++) {
        r = ncclSend((const char *)send + (blocks ? p * b : 0), count, t, p, c, stream);
        if (r == ncclSuccess) r = ncclRecv((char *)recv + p * b, count, t, p, c, stream);
    }
    ncclResult_t e = ncclGroupEnd();
    return r != ncclSuccess ? r : e;
}

ncclResult_t ncclAlltoAll(const void *send, void *recv, size_t count, ncclDataType_t t, ncclComm_t c,
                          cudaStream_t stream)
{
    return fake_exchange(send, true, recv, count, t, c, stream);
}

ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, ncclDataType_t t, ncclComm_t c,
                           cudaStream_t stream)
{
    return fake_exchange(send, false, recv, count, t, c, stream);
}
