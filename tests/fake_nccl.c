/*
 * A stand-in for libnccl.so.2, for tests only: the NCCL calls epx makes (src/nccl/nccl.c),
 * with point-to-point transfers through POSIX shared memory, so that CUDA across simulated
 * hosts runs where NCCL itself cannot: several ranks on one GPU (NCCL refuses two ranks of
 * one device). Loaded instead of NCCL through LD_LIBRARY_PATH (tests/CMakeLists.txt:
 * fake_nccl_* tests).
 *
 * Semantics kept: a group's sends and receives between the same two ranks match in order;
 * the data a send reads is what the stream produced before it, and a receive's data is
 * there for what the stream runs after it (each copy runs on the operation's stream, which
 * is drained before the shared memory goes: a plain cudaMemcpy from pageable memory may
 * return before its data has landed). Not kept: asynchrony (ncclGroupEnd waits for the
 * stream, copies through the host and returns when its receives are in) and NCCL's own
 * failure handling (a receive whose sender never comes fails after FAKE_NCCL_TIMEOUT_MS,
 * default 60000, with ncclRemoteError).
 *
 * A message from rank s to rank d, the n-th between them on a communicator, is one shared
 * memory object named after the communicator, s, d and n: the sender writes the bytes, then
 * a ready word; the receiver waits for it, copies, and unlinks the object.
 */
#include <cuda_runtime_api.h>
#include <fcntl.h>
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

typedef struct fake_comm {
    char name[64]; /* from the unique id */
    int nranks, rank, device;
    ncclResult_t err;
    char last[256];
    uint64_t *sent, *received; /* [nranks]: messages so far, per peer */
} *ncclComm_t;

typedef struct {
    int send;
    void *buf;
    size_t bytes;
    int peer;
    ncclComm_t comm;
    cudaStream_t stream;
} fake_op_t;

static __thread int depth;
static __thread int nops;
static __thread fake_op_t ops[FAKE_MAX_OPS];

/* Bytes of one element of NCCL's data types (ncclInt8 ... ncclFloat8e5m2), 0 for others. */
/* How long a receive waits for its sender, and a clean destroy for its receivers (µs). */
static long long fake_timeout_us(void)
{
    const char *tm = getenv("FAKE_NCCL_TIMEOUT_MS");
    return 1000LL * (tm ? atoll(tm) : 60000);
}

static size_t fake_type_size(ncclDataType_t t)
{
    static const size_t sizes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2, 1, 1};
    return t >= 0 && t < (int)(sizeof sizes / sizeof sizes[0]) ? sizes[t] : 0;
}

static void fake_name(const ncclComm_t c, int src, int dst, uint64_t n, char *out, size_t len)
{
    snprintf(out, len, "/%s-%d-%d-%llu", c->name, src, dst, (unsigned long long)n);
}

static ncclResult_t fake_fail(ncclComm_t c, ncclResult_t r, const char *what)
{
    if (c) {
        c->err = r;
        snprintf(c->last, sizeof c->last, "fake NCCL: %s", what);
    }
    return r;
}

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

ncclResult_t ncclCommInitRankConfig(ncclComm_t *out, int nranks, ncclUniqueId id, int rank, void *config)
{
    (void)config;
    *out = NULL;
    if (nranks < 1 || nranks > FAKE_MAX_RANKS || rank < 0 || rank >= nranks) return ncclInvalidArgument;
    ncclComm_t c = calloc(1, sizeof *c);
    if (!c) return ncclSystemError;
    c->sent = calloc((size_t)nranks, sizeof *c->sent);
    c->received = calloc((size_t)nranks, sizeof *c->received);
    if (!c->sent || !c->received || cudaGetDevice(&c->device) != cudaSuccess) {
        free(c->sent), free(c->received), free(c);
        return ncclSystemError;
    }
    memcpy(c->name, id.internal, sizeof c->name - 1);
    c->nranks = nranks;
    c->rank = rank;
    *out = c;
    return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t *r)
{
    *r = c ? c->err : ncclInvalidArgument;
    return ncclSuccess;
}

/* Messages I sent that are still there: with `wait`, a clean end, until their receivers
 * took them (bounded, as a peer may still be on its way to its receives); then, or at once
 * (abort: a peer may be gone), they are removed. */
static void fake_unread(ncclComm_t c, int wait)
{
    char name[128];
    long long left_us = fake_timeout_us();
    for (int p = 0; p < c->nranks; p++)
        for (uint64_t n = 0; n < c->sent[p]; n++) {
            fake_name(c, c->rank, p, n, name, sizeof name);
            for (; wait && left_us > 0; left_us -= 100) {
                int fd = shm_open(name, O_RDONLY, 0600);
                if (fd < 0) break; /* taken */
                close(fd);
                usleep(100);
            }
            shm_unlink(name); /* fails harmlessly where the receiver took it */
        }
}

static ncclResult_t fake_free(ncclComm_t c, int wait)
{
    if (!c) return ncclInvalidArgument;
    fake_unread(c, wait);
    free(c->sent), free(c->received), free(c);
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t c) { return fake_free(c, 0); }
ncclResult_t ncclCommDestroy(ncclComm_t c) { return fake_free(c, 1); }
ncclResult_t ncclCommFinalize(ncclComm_t c) { return c ? ncclSuccess : ncclInvalidArgument; }
ncclResult_t ncclCommCount(const ncclComm_t c, int *n) { return *n = c->nranks, ncclSuccess; }
ncclResult_t ncclCommUserRank(const ncclComm_t c, int *r) { return *r = c->rank, ncclSuccess; }
ncclResult_t ncclCommCuDevice(const ncclComm_t c, int *d) { return *d = c->device, ncclSuccess; }
const char *ncclGetLastError(ncclComm_t c) { return c ? c->last : ""; }

const char *ncclGetErrorString(ncclResult_t r)
{
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    default: return "unknown result code";
    }
}

/* One message out: host copy of the device bytes into a new object, then its ready word. */
static ncclResult_t fake_send(const fake_op_t *o)
{
    ncclComm_t c = o->comm;
    char name[128];
    fake_name(c, c->rank, o->peer, c->sent[o->peer]++, name, sizeof name);
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
    if (o->bytes && (cudaMemcpyAsync(m + 64, o->buf, o->bytes, cudaMemcpyDefault, o->stream) != cudaSuccess ||
                     cudaStreamSynchronize(o->stream) != cudaSuccess))
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
    fake_name(c, o->peer, c->rank, c->received[o->peer]++, name, sizeof name);
    long long limit_us = fake_timeout_us(), waited_us = 0;
    char *m = MAP_FAILED;
    size_t len = 0;
    for (;;) {
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
        if (waited_us > limit_us) return fake_fail(c, ncclRemoteError, "a receive's sender never came");
        usleep(50);
        waited_us += 50;
    }
    ncclResult_t r = ncclSuccess;
    uint64_t bytes = *(uint64_t *)(m + 8);
    if (*(uint64_t *)m != 1 || bytes != o->bytes)
        r = fake_fail(c, ncclInvalidUsage, "a send and its receive differ in size (or the send failed)");
    else if (bytes && (cudaMemcpyAsync(o->buf, m + 64, bytes, cudaMemcpyDefault, o->stream) != cudaSuccess ||
                       cudaStreamSynchronize(o->stream) != cudaSuccess)) /* landed before the source goes */
        r = fake_fail(c, ncclUnhandledCudaError, "cudaMemcpyAsync (receive)");
    munmap(m, len);
    shm_unlink(name);
    return r;
}

/* The queued operations: every stream they use drained, then the sends, then the receives
 * (sends never wait, so no order of groups across ranks deadlocks). */
static ncclResult_t fake_run(void)
{
    ncclResult_t r = ncclSuccess;
    for (int i = 0; i < nops && r == ncclSuccess; i++)
        if (ops[i].comm->err != ncclSuccess) r = ops[i].comm->err;
    for (int i = 0; i < nops && r == ncclSuccess; i++)
        if (cudaStreamSynchronize(ops[i].stream) != cudaSuccess)
            r = fake_fail(ops[i].comm, ncclUnhandledCudaError, "cudaStreamSynchronize");
    for (int i = 0; i < nops && r == ncclSuccess; i++)
        if (ops[i].send) r = fake_send(&ops[i]);
    for (int i = 0; i < nops && r == ncclSuccess; i++)
        if (!ops[i].send) r = fake_recv(&ops[i]);
    nops = 0;
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
    ops[nops++] = (fake_op_t){send, (void *)buf, count * fake_type_size(t), peer, c, stream};
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
