/*
 * CUDA backend, host side: device setup, CUDA IPC mappings (of epx's control memory at
 * creation, of the callers' buffers on demand, cached), and the alltoallv paths.
 */
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

bool epx__cuda_is_device_ptr(const void *p)
{
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return a.type == cudaMemoryTypeDevice;
}

/* Take part in one host exchange with a local failure `st` (posted: the others return
 * EPX_ERR_REMOTE_INVALID promptly instead of timing out), and return st or what broke. */
epx_status_t epx__host_fail(epx__cpu_t *host, epx_status_t st, epx__errbuf_t *err)
{
    epx_status_t r = epx__cpu_alltoallv(host, NULL, st, err);
    return r != EPX_SUCCESS ? r : st;
}

/* Exchange `bytes` of `mine` with every rank through the host transport (allgather). */
epx_status_t epx__host_allgather(epx__cpu_t *host, int nranks, const void *mine, void *all, size_t bytes,
                                        epx_status_t local, epx__errbuf_t *err)
{
    char *send = malloc(bytes * (size_t)nranks);
    int64_t *cnt = malloc(sizeof(int64_t) * 2 * (size_t)nranks);
    if (!send || !cnt) {
        free(send), free(cnt);
        if (local == EPX_SUCCESS) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        return epx__host_fail(host, local, err);
    }
    for (int p = 0; p < nranks; p++) {
        memcpy(send + (size_t)p * bytes, mine, bytes);
        cnt[p] = (int64_t)bytes;
        cnt[nranks + p] = (int64_t)bytes * p;
    }
    epx__cpu_xfer_t x = {send, cnt, cnt + nranks, all, cnt, cnt + nranks};
    epx_status_t st = epx__cpu_alltoallv(host, local == EPX_SUCCESS ? &x : NULL, local, err);
    free(send);
    free(cnt);
    return st;
}

epx_status_t epx__host_agree(epx__cuda_t *c, epx_status_t st, epx__errbuf_t *err)
{
    int32_t v = st, all[EPX__CUDA_MAX_RANKS];
    /* With st a failure the round returns st, or what broke it (a late or dead peer: that
     * status and message, not st's, since the communicator cannot go on). */
    return epx__host_allgather(c->host, c->nranks, &v, all, sizeof v, st, err);
}

/* Control memory of a communicator: flags, eager slots (two parities), then 512 bytes of
 * words from epoch_off, each word (or array) on a 64-byte line of its own: +0 epoch, +64
 * direct_ops, +128 blocks_left, +256 ll_seq[4] (the peers read it), +320 ll_blocks[7], +384
 * failed (only my device's kernels touch it); the rest is free. Zero at creation
 * (cudaMemset), as the error record is; neither is ever reset: an error the device records
 * breaks the communicator for good (api/comm.c: epx__comm_break; the caller aborts it and
 * makes a new one). */
static size_t epx__ctrl_layout(int nranks, size_t *eager_bytes, size_t *eager_off, size_t *epoch_off)
{
    int64_t eager = epx__param_int(EPX__P_CUDA_EAGER_BYTES);
    *eager_bytes = (size_t)EPX__ALIGN_UP(EPX__MAX(eager, (int64_t)16), 128);
    size_t flags_bytes = (size_t)EPX__FLAG_KINDS * (size_t)nranks * EPX__FLAG_STRIDE * 8;
    *eager_off = EPX__ALIGN_UP(flags_bytes, 256);
    *epoch_off = *eager_off + 2 * (size_t)nranks * (EPX__SLOT_HDR + *eager_bytes);
    return *epoch_off + 512;
}

int64_t epx__cuda_comm_device_bytes(int nranks)
{
    size_t a, b, c;
    return (int64_t)epx__ctrl_layout(nranks, &a, &b, &c);
}

epx_status_t epx__cuda_create(epx__cuda_t **out, epx__cpu_t *host, int rank, int nranks, int device,
                              int64_t timeout_ms, epx__errbuf_t *err)
{
    epx_status_t local = EPX_SUCCESS;
    epx__cuda_t *c = calloc(1, sizeof *c);
    cudaIpcMemHandle_t mine, *all = calloc((size_t)nranks, sizeof *all);
    if (!c || !all) {
        free(c), free(all);
        return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    }
    memset(&mine, 0, sizeof mine);
    c->graph_holds = calloc(1, sizeof *c->graph_holds);
    if (!c->graph_holds) {
        free(c), free(all);
        return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    }
    c->graph_holds->refs = 1;
    c->host = host;
    c->rank = rank;
    c->nranks = nranks;
    size_t eager_bytes, eager_off, epoch_off;
    c->ctrl_bytes = epx__ctrl_layout(nranks, &eager_bytes, &eager_off, &epoch_off);

    if (nranks > EPX__CUDA_MAX_RANKS)
        local = epx__fail(err, EPX_ERR_UNSUPPORTED, "the CUDA backend takes at most %d ranks per host (got %d)",
                          EPX__CUDA_MAX_RANKS, nranks);
    cudaError_t ce = cudaSuccess;
    if (local == EPX_SUCCESS) {
        ce = device >= 0 ? cudaSetDevice(device) : cudaGetDevice(&device);
        if (ce == cudaSuccess) ce = cudaMalloc(&c->ctrl, c->ctrl_bytes);
        if (ce == cudaSuccess) ce = cudaMemset(c->ctrl, 0, c->ctrl_bytes);
        if (ce == cudaSuccess) ce = cudaIpcGetMemHandle(&mine, c->ctrl);
        if (ce == cudaSuccess) ce = cudaHostAlloc((void **)&c->err_host, sizeof *c->err_host, cudaHostAllocMapped);
        if (ce == cudaSuccess) memset(c->err_host, 0, sizeof *c->err_host);
        if (ce == cudaSuccess) ce = cudaHostGetDevicePointer((void **)&c->dev.err, c->err_host, 0);
        if (ce == cudaSuccess) ce = cudaStreamCreateWithFlags(&c->side, cudaStreamNonBlocking);
        if (ce == cudaSuccess) ce = cudaEventCreateWithFlags(&c->fork, cudaEventDisableTiming);
        if (ce == cudaSuccess) ce = cudaEventCreateWithFlags(&c->join, cudaEventDisableTiming);
        if (ce == cudaSuccess) ce = cudaDeviceSynchronize();
        if (ce != cudaSuccess && device < 0) /* no device to speak of (none, or no driver) */
            local = epx__fail(err, EPX_ERR_CUDA, "CUDA setup: %s", cudaGetErrorString(ce));
        else if (ce != cudaSuccess)
            local = epx__fail(err, EPX_ERR_CUDA, "CUDA setup on device %d: %s", device, cudaGetErrorString(ce));
    }
    c->device = device;
    epx_status_t st = epx__host_allgather(host, nranks, &mine, all, sizeof mine, local, err);
    const bool met = st == EPX_SUCCESS; /* the same on every rank */
    for (int p = 0; p < nranks && st == EPX_SUCCESS; p++) {
        if (p == rank) {
            c->peer_ctrl[p] = c->ctrl;
            continue;
        }
        ce = cudaIpcOpenMemHandle(&c->peer_ctrl[p], all[p], cudaIpcMemLazyEnablePeerAccess);
        if (ce != cudaSuccess)
            st = epx__fail(err, EPX_ERR_CUDA, "opening rank %d's control memory (CUDA IPC): %s", p,
                           cudaGetErrorString(ce));
    }
    free(all);
    /* Nobody uses a mapping before everyone has opened theirs. */
    /* Also a barrier: nobody uses a mapping before everyone has opened theirs. The sizes
     * that shape the control memory and the path choice must agree. */
    c->ce_bytes = epx__param_int(EPX__P_CUDA_COPY_ENGINE_BYTES);
    int64_t sizes[2] = {(int64_t)eager_bytes, c->ce_bytes}, *allsz = calloc(2 * (size_t)nranks, sizeof *allsz);
    /* Every rank that made the first round makes this one, whatever failed since (an IPC
     * open fails on one rank only): the others then fail at once instead of waiting for it. */
    if (!allsz && st == EPX_SUCCESS) st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (met)
        st = st == EPX_SUCCESS ? epx__host_allgather(host, nranks, sizes, allsz, sizeof sizes, EPX_SUCCESS, err)
                               : epx__host_fail(host, st, err);
    for (int p = 0; p < nranks && st == EPX_SUCCESS; p++)
        if (allsz[2 * p] != sizes[0] || allsz[2 * p + 1] != sizes[1])
            st = epx__fail(err, EPX_ERR_MISMATCH,
                           "rank %d has other EPX_CUDA_EAGER_BYTES / EPX_CUDA_COPY_ENGINE_BYTES than rank %d", p, rank);
    free(allsz);
    if (st != EPX_SUCCESS) {
        epx__cuda_destroy(c);
        return st;
    }
    epx__cuda_dev_t *d = &c->dev;
    d->rank = rank;
    d->nranks = nranks;
    d->flags = (unsigned long long *)c->ctrl;
    d->eager = (char *)c->ctrl + eager_off;
    d->epoch = (unsigned long long *)((char *)c->ctrl + epoch_off);
    d->direct_ops = (unsigned long long *)((char *)c->ctrl + epoch_off + 64);
    d->blocks_left = (unsigned int *)((char *)c->ctrl + epoch_off + 128);
    d->ll_seq = (unsigned long long *)((char *)c->ctrl + epoch_off + 256);
    d->ll_blocks = (unsigned int *)((char *)c->ctrl + epoch_off + 320);
    d->failed = (unsigned int *)((char *)c->ctrl + epoch_off + 384);
    d->eager_bytes = eager_bytes;
    d->timeout_ns = epx__ms_to_ns(timeout_ms);
    for (int p = 0; p < nranks; p++) {
        d->peer_flags[p] = (unsigned long long *)c->peer_ctrl[p];
        d->peer_eager[p] = (char *)c->peer_ctrl[p] + eager_off;
    }
    EPX_INFO(CUDA, "rank %d: CUDA backend on device %d, %d ranks mapped, eager %zu bytes/peer", rank, device, nranks,
             eager_bytes);
    *out = c;
    return EPX_SUCCESS;
}

void epx__cuda_set_fault(epx__cuda_t *c, const epx__fault_t *fault) { c->fault = *fault; }

void epx__cuda_fault_begin_slow(epx__cuda_t *c)
{
    epx__fault_delay_at(&c->fault, c->fault_step, EPX__FAULT_AT_HOST);
    epx__fault_spec_t f;
    if (epx__fault_due(&c->fault, EPX__FAULT_KILL, c->fault_step, EPX__FAULT_AT_HOST, &f))
        epx__cpu_fault_kill_next(c->host, &f); /* fires in this call's first host exchange */
}

void epx__cuda_fault_at_slow(epx__cuda_t *c, int at)
{
    epx__fault_delay_at(&c->fault, c->fault_step, at);
    epx__fault_spec_t f;
    if (!epx__fault_take_at(&c->fault, EPX__FAULT_KILL, c->fault_step, at, &f)) return;
    /* The peers got this rank's host exchanges up to the agreement on the mappings
     * (mapped), or all of them (enqueue, launched); none (mapped, enqueue) or all
     * (launched) of its kernels are on its stream, not waited for. */
    epx__fault_exit(&f, at == EPX__FAULT_AT_LAUNCHED ? c->nranks - 1 : 0, c->nranks - 1);
}

bool epx__cuda_fault_count_slow(epx__cuda_t *c)
{
    epx__fault_spec_t f;
    return c->nranks > 1 && epx__fault_take(&c->fault, EPX__FAULT_COUNT, c->fault_step, &f);
}

/* ---- Graph holds on IPC mappings (internal.h) ---------------------------------------- */

static void epx__ipc_graph_holds_release(epx__ipc_graph_holds_t *h)
{
    if (h && __atomic_sub_fetch(&h->refs, 1, __ATOMIC_ACQ_REL) == 0) free(h);
}

typedef struct {
    epx__ipc_graph_holds_t *holds;
    int slot;
} epx__ipc_graph_hold_t;

/* A graph holding a slot is gone (a CUDA user object's destructor: no CUDA call). */
static void CUDART_CB epx__ipc_graph_gone(void *arg)
{
    epx__ipc_graph_hold_t *g = arg;
    __atomic_sub_fetch(&g->holds->held[g->slot], 1, __ATOMIC_ACQ_REL);
    epx__ipc_graph_holds_release(g->holds);
    free(g);
}

epx_status_t epx__cuda_capture_graph(void *stream, cudaGraph_t *graph, epx__errbuf_t *err)
{
    enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    cudaGraph_t g = NULL;
#if CUDART_VERSION >= 13000
    cudaError_t ce = cudaStreamGetCaptureInfo((cudaStream_t)stream, &cs, NULL, &g, NULL, NULL, NULL);
#else
    cudaError_t ce = cudaStreamGetCaptureInfo_v2((cudaStream_t)stream, &cs, NULL, &g, NULL, NULL);
#endif
    *graph = NULL;
    if (ce == cudaSuccess && cs == cudaStreamCaptureStatusNone) return EPX_SUCCESS;
    if (ce == cudaSuccess && (cs != cudaStreamCaptureStatusActive || !g)) ce = cudaErrorStreamCaptureInvalidated;
    if (ce != cudaSuccess) {
        cudaGetLastError();
        return epx__fail(err, EPX_ERR_CUDA, "the CUDA graph being captured on stream %p: %s", stream,
                         cudaGetErrorString(ce));
    }
    *graph = g;
    return EPX_SUCCESS;
}

/* `graph` (being captured) holds mapping slot `slot` until it and its instances are
 * destroyed. */
static epx_status_t epx__ipc_graph_hold(epx__cuda_t *c, int slot, cudaGraph_t graph, epx__errbuf_t *err)
{
    epx__ipc_graph_hold_t *g = malloc(sizeof *g);
    if (!g) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    *g = (epx__ipc_graph_hold_t){c->graph_holds, slot};
    __atomic_add_fetch(&c->graph_holds->refs, 1, __ATOMIC_ACQ_REL);
    __atomic_add_fetch(&c->graph_holds->held[slot], 1, __ATOMIC_ACQ_REL);
    cudaUserObject_t o;
    cudaError_t ce = cudaUserObjectCreate(&o, g, epx__ipc_graph_gone, 1, cudaUserObjectNoDestructorSync);
    if (ce != cudaSuccess) {
        epx__ipc_graph_gone(g);
    } else {
        ce = cudaGraphRetainUserObject(graph, o, 1, cudaGraphUserObjectMove);
        if (ce != cudaSuccess) cudaUserObjectRelease(o, 1); /* (its destructor drops the hold) */
    }
    if (ce != cudaSuccess) {
        cudaGetLastError();
        return epx__fail(err, EPX_ERR_CUDA, "holding a peer's buffer mapping for the CUDA graph being captured: %s",
                         cudaGetErrorString(ce));
    }
    return EPX_SUCCESS;
}

static bool epx__ipc_graph_held(const epx__cuda_t *c, int slot)
{
    return __atomic_load_n(&c->graph_holds->held[slot], __ATOMIC_ACQUIRE) > 0;
}

void epx__cuda_destroy(epx__cuda_t *c)
{
    if (!c) return;
    for (int i = 0; i < EPX__IPC_CACHE; i++)
        if (c->ipc[i].ptr) cudaIpcCloseMemHandle(c->ipc[i].ptr);
    for (int p = 0; p < c->nranks; p++)
        if (p != c->rank && c->peer_ctrl[p]) cudaIpcCloseMemHandle(c->peer_ctrl[p]);
    if (c->ctrl) cudaFree(c->ctrl);
    if (c->err_host) cudaFreeHost(c->err_host);
    if (c->side) cudaStreamDestroy(c->side);
    if (c->fork) cudaEventDestroy(c->fork);
    if (c->join) cudaEventDestroy(c->join);
    for (int i = 0; i < c->num_mem; i++) cudaFree(c->mem[i]);
    free(c->mem);
    epx__stage_buf_free(&c->a2a_stage);
    epx__ipc_graph_holds_release(c->graph_holds);
    cudaGetLastError();
    free(c);
}

bool epx__cuda_has_failed(const epx__cuda_t *c)
{
    int code = ((volatile epx__cuda_err_t *)c->err_host)->code;
    return code != 0 && code != EPX__ERR_CLAIMED && code != EPX_ERR_MISMATCH;
}

epx_status_t epx__cuda_check_async(epx__cuda_t *c, epx__errbuf_t *err)
{
    volatile epx__cuda_err_t *e = c->err_host;
    if (e->code == 0 || e->code == EPX__ERR_CLAIMED) return EPX_SUCCESS; /* claimed: seen on a later poll */
    __sync_synchronize();
    if (e->peer == EPX__PEER_INJECTED)
        return epx__fail(err, (epx_status_t)e->code, "local rank %d: a failure injected on the device (EPX_FAULT fail)",
                         c->rank);
    /* epx__cuda_relay_failures; tests/test_cuda_fault.c (fail_enqueue) tells this message by
     * its "inside the host": keep those words. */
    if (e->code == EPX_ERR_PEER_FAILURE && e->wanted == EPX__RELAYED_LOCAL)
        return epx__fail(err, EPX_ERR_PEER_FAILURE,
                         "local rank %d: local rank %d had failed, or learnt of a failure, before it sent its part of "
                         "an exchange inside the host (by operation %llu); what it sent may be incomplete",
                         c->rank, e->peer, (unsigned long long)e->op);
    if (e->code == EPX_ERR_PEER_FAILURE && e->peer < 0) /* relayed: a status that never came */
        return epx__fail(err, EPX_ERR_PEER_FAILURE,
                         "local rank %d: the status of NCCL peer %llu did not come with its data (its exchange was cut "
                         "short); what arrived here is incomplete",
                         c->rank, (unsigned long long)e->op);
    if (e->code == EPX_ERR_PEER_FAILURE) /* relayed (epx__cuda_status_check) */
        return epx__fail(err, EPX_ERR_PEER_FAILURE,
                         "local rank %d: rank %d (of the whole communicator) had failed (%s on its device) before it "
                         "sent its part of an exchange across hosts; what arrived here is incomplete",
                         c->rank, e->peer, epx_status_name((epx_status_t)(int32_t)e->seen));
    if (e->code == EPX_ERR_MISMATCH)
        return epx__fail(err, EPX_ERR_MISMATCH,
                         "rank %d: epx_alltoallv_device: rank %d expects %lld elements from this rank, which sends %lld "
                         "(operation %llu)",
                         c->rank, e->peer, (long long)e->seen, (long long)e->wanted, (unsigned long long)e->op);
    return epx__fail(err, (epx_status_t)e->code,
                     "rank %d: a device wait for rank %d timed out (operation %llu; flag at %llu, wanted %llu)", c->rank,
                     e->peer, (unsigned long long)e->op, (unsigned long long)e->seen, (unsigned long long)e->wanted);
}

void epx__cuda_relay_failures(epx__cuda_t *c) { c->dev.relay = 1; }

epx_status_t epx__cuda_inject_failure(epx__cuda_t *c, void *stream, epx__errbuf_t *err)
{
    cudaError_t ce = (cudaError_t)epx__cuda_launch_inject(&c->dev, EPX_ERR_TIMEOUT, stream);
    if (ce != cudaSuccess)
        return epx__fail(err, EPX_ERR_CUDA, "EPX_FAULT fail on the device: %s", cudaGetErrorString(ce));
    return EPX_SUCCESS;
}

epx_status_t epx__cuda_status_out(epx__cuda_t *c, int rank, unsigned seq, void *out, void *stream, epx__errbuf_t *err)
{
    cudaError_t ce = (cudaError_t)epx__cuda_launch_status_out(&c->dev, rank, seq, (int *)out, stream);
    if (ce != cudaSuccess) return epx__fail(err, EPX_ERR_CUDA, "status for the peers: %s", cudaGetErrorString(ce));
    return EPX_SUCCESS;
}

epx_status_t epx__cuda_status_check(epx__cuda_t *c, const void *in, const epx__cuda_status_slots_t *slots,
                                    unsigned seq, void *stream, epx__errbuf_t *err)
{
    cudaError_t ce = (cudaError_t)epx__cuda_launch_status_check(&c->dev, (const int *)in, slots->first, slots->step,
                                                                slots->count, slots->self, seq, stream);
    if (ce != cudaSuccess) return epx__fail(err, EPX_ERR_CUDA, "the peers' statuses: %s", cudaGetErrorString(ce));
    return EPX_SUCCESS;
}

epx_status_t epx__cuda_mem_alloc(epx__cuda_t *c, size_t bytes, void **ptr, epx__errbuf_t *err)
{
    if (c->num_mem == c->cap_mem) {
        int cap = c->cap_mem ? 2 * c->cap_mem : 8;
        void **m = realloc(c->mem, sizeof *m * (size_t)cap);
        if (!m) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        c->mem = m, c->cap_mem = cap;
    }
    EPX__CUDA_TRY(cudaMalloc(ptr, EPX__MAX(bytes, (size_t)1)), err, "epx_mem_alloc");
    c->mem[c->num_mem++] = *ptr;
    return EPX_SUCCESS;
}

/* Only what epx_mem_alloc returned on this communicator: anything else (a caller's own
 * cudaMalloc, a framework's pool) is refused, not freed. */
epx_status_t epx__cuda_mem_free(epx__cuda_t *c, void *ptr, epx__errbuf_t *err)
{
    for (int i = 0; i < c->num_mem; i++) {
        if (c->mem[i] != ptr) continue;
        c->mem[i] = c->mem[--c->num_mem];
        EPX__CUDA_TRY(cudaFree(ptr), err, "epx_mem_free");
        return EPX_SUCCESS;
    }
    return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "epx_mem_free: %p was not returned by epx_mem_alloc on this communicator",
                     ptr);
}

/* ---- IPC of callers' buffers ------------------------------------------------------------ */

/* Two driver calls, reached through the runtime so that libepx never links libcuda (which
 * machines without a GPU lack). */
typedef CUresult (*epx__pfn_range_t)(CUdeviceptr *base, size_t *size, CUdeviceptr p);
typedef CUresult (*epx__pfn_attr_t)(void *data, CUpointer_attribute attr, CUdeviceptr p);

static epx__pfn_range_t epx__get_range;
static epx__pfn_attr_t epx__get_attr;
static pthread_once_t epx__driver_once = PTHREAD_ONCE_INIT;

/* Once per process (communicators may be made and used on several threads at once): both
 * entry points, or neither. */
static void epx__driver_lookup(void)
{
    enum cudaDriverEntryPointQueryResult q1, q2;
    epx__pfn_range_t r = NULL;
    epx__pfn_attr_t a = NULL;
    cudaError_t e1 =
        cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", (void **)&r, 12000, cudaEnableDefault, &q1);
    cudaError_t e2 =
        cudaGetDriverEntryPointByVersion("cuPointerGetAttribute", (void **)&a, 12000, cudaEnableDefault, &q2);
    if (e1 != cudaSuccess || e2 != cudaSuccess || q1 != cudaDriverEntryPointSuccess ||
        q2 != cudaDriverEntryPointSuccess || !r || !a) {
        cudaGetLastError();
        return;
    }
    epx__get_range = r;
    epx__get_attr = a;
}

static epx_status_t epx__driver_calls(epx__pfn_range_t *range, epx__pfn_attr_t *attr, epx__errbuf_t *err)
{
    pthread_once(&epx__driver_once, epx__driver_lookup);
    if (!epx__get_range || !epx__get_attr)
        return epx__fail(err, EPX_ERR_CUDA,
                         "cannot reach the CUDA driver's cuMemGetAddressRange/cuPointerGetAttribute");
    *range = epx__get_range;
    *attr = epx__get_attr;
    return EPX_SUCCESS;
}

/* Does the driver say that `p` lies in memory cudaIpcGetMemHandle cannot take (a
 * stream-ordered pool, cuMemCreate)? (It writes a boolean: whatever its width, a word that
 * starts at 1 reads 0 only when it wrote false.) */
static bool epx__ipc_incapable(epx__pfn_attr_t get_attr, const void *p)
{
    unsigned long long capable = 1;
    CUresult r = get_attr(&capable, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, (CUdeviceptr)(uintptr_t)p);
    return r == CUDA_SUCCESS && capable == 0;
}

static bool epx__unshareable_known(const epx__cuda_t *c, unsigned long long id)
{
    for (int i = 0; i < EPX__EXPORT_CACHE && id != 0; i++)
        if (c->unshareable[i] == id) return true;
    return false;
}

static void epx__unshareable_add(epx__cuda_t *c, unsigned long long id)
{
    if (id == 0) return;
    c->unshareable[c->next_unshareable] = id;
    c->next_unshareable = (c->next_unshareable + 1) % EPX__EXPORT_CACHE;
}

epx_status_t epx__ipc_export_if(epx__cuda_t *c, const void *p, epx__ipc_card_t *card, bool *shareable,
                                epx__errbuf_t *err)
{
    epx__pfn_range_t get_range = NULL;
    epx__pfn_attr_t get_attr = NULL;
    EPX__CHECK(epx__driver_calls(&get_range, &get_attr, err));
    CUdeviceptr base = 0;
    size_t size = 0;
    CUresult r = get_range(&base, &size, (CUdeviceptr)(uintptr_t)p);
    if (r != CUDA_SUCCESS) {
        *shareable = false;
        memset(card, 0, sizeof *card);
        if (epx__ipc_incapable(get_attr, p)) return EPX_SUCCESS; /* in case a driver gives no range for such memory */
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "buffer %p is not device memory CUDA can share (error %d)", p,
                         (int)r);
    }
    unsigned long long id = 0;
    get_attr(&id, CU_POINTER_ATTRIBUTE_BUFFER_ID, (CUdeviceptr)(uintptr_t)p);
    *shareable = false;
    memset(card, 0, sizeof *card);
    if (epx__unshareable_known(c, id)) return EPX_SUCCESS; /* (no CUDA call for it again) */
    card->buffer_id = id;
    card->base_offset = (int64_t)((uintptr_t)p - (uintptr_t)base);
    *shareable = true;
    for (int i = 0; i < EPX__EXPORT_CACHE && id != 0; i++)
        if (c->exports[i].id == id) {
            card->handle = c->exports[i].handle;
            return EPX_SUCCESS;
        }
    cudaError_t ce = cudaIpcGetMemHandle(&card->handle, (void *)(uintptr_t)base);
    if (ce != cudaSuccess) {
        cudaGetLastError(); /* a later launch check must not take this failure for its own */
        if (!epx__ipc_incapable(get_attr, p)) /* some other failure: as before */
            return epx__fail(err, EPX_ERR_UNSUPPORTED,
                             "buffer %p cannot be shared through CUDA IPC (%s): allocate it with cudaMalloc or "
                             "epx_mem_alloc",
                             p, cudaGetErrorString(ce));
        EPX_INFO(CUDA, "rank %d: buffer %p cannot be shared through CUDA IPC (a stream-ordered pool, or cuMemCreate)",
                 c->rank, p);
        epx__unshareable_add(c, id);
        *shareable = false;
        memset(card, 0, sizeof *card);
        return EPX_SUCCESS;
    }
    c->exports[c->next_export] = (epx__export_t){id, card->handle};
    c->next_export = (c->next_export + 1) % EPX__EXPORT_CACHE;
    return EPX_SUCCESS;
}

epx_status_t epx__ipc_export(epx__cuda_t *c, const void *p, epx__ipc_card_t *card, epx__errbuf_t *err)
{
    bool shareable = true;
    EPX__CHECK(epx__ipc_export_if(c, p, card, &shareable, err));
    if (!shareable)
        return epx__fail(err, EPX_ERR_UNSUPPORTED,
                         "buffer %p lies in memory CUDA IPC cannot share (a stream-ordered pool such as "
                         "cudaMallocAsync's, or cuMemCreate's as in PyTorch's expandable segments), which this call "
                         "cannot stage: allocate it with cudaMalloc or epx_mem_alloc",
                         p);
    return EPX_SUCCESS;
}

/* ---- Staging buffers (memory CUDA IPC cannot share) ------------------------------------------ */

epx_status_t epx__stage_buf_reserve(epx__stage_buf_t *b, size_t need, bool keep, const char *what, void *stream,
                                    epx__errbuf_t *err)
{
    bool capturing = epx__cuda_capturing(stream);
    if (need > b->bytes && capturing)
        return epx__fail(err, EPX_ERR_INVALID_USAGE,
                         "stream %p is being captured into a CUDA graph, but the call needs %zu bytes of epx's "
                         "staging for its %s in memory CUDA IPC cannot share (a stream-ordered pool, cuMemCreate), "
                         "more than epx holds (%zu), and cannot grow it during a capture: make a call as large "
                         "before the capture, or use cudaMalloc or epx_mem_alloc memory",
                         stream, need, what, b->bytes);
    keep = b->ptr && (keep || b->captured);
    if (need > b->bytes && keep) {
        void **kept = realloc(b->kept, sizeof *kept * (size_t)(b->num_kept + 1));
        if (!kept) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        b->kept = kept;
    }
    if (need > b->bytes) {
        size_t bytes = EPX__ALIGN_UP(EPX__MAX(need, b->bytes + b->bytes / 2), (size_t)1 << 16);
        char *fresh = NULL;
        if (cudaMalloc((void **)&fresh, bytes) != cudaSuccess) {
            cudaGetLastError();
            return epx__fail(err, EPX_ERR_NO_MEMORY, "no device memory (%zu bytes) to stage the %s in memory CUDA IPC "
                             "cannot share", bytes, what);
        }
        if (keep) {
            b->kept[b->num_kept++] = b->ptr;
        } else if (b->ptr) {
            cudaDeviceSynchronize();
            cudaFree(b->ptr);
            cudaGetLastError();
        }
        EPX_INFO(CUDA, "%zu bytes of staging for %s in memory CUDA IPC cannot share", bytes, what);
        *b = (epx__stage_buf_t){fresh, bytes, false, b->kept, b->num_kept};
    }
    b->captured = b->captured || capturing;
    return EPX_SUCCESS;
}

void epx__stage_buf_free(epx__stage_buf_t *b)
{
    cudaFree(b->ptr);
    for (int i = 0; i < b->num_kept; i++) cudaFree(b->kept[i]);
    free(b->kept);
    cudaGetLastError();
    memset(b, 0, sizeof *b);
}

/* A peer's allocation, opened once and cached. A peer that freed an allocation we still
 * map and got a new one at the same address makes the open fail as "already mapped": the
 * stale mappings of that peer are then dropped (after this stream's work, which may still
 * use the others) and the open retried. */
static epx_status_t epx__ipc_get(epx__cuda_t *c, int peer, const epx__ipc_card_t *card, char **base, int pin,
                                int *slot, epx__errbuf_t *err)
{
    epx__fault_spec_t f; /* EPX_FAULT nomem: as when every slot is held */
    if (__builtin_expect(c->fault.armed, 0) && epx__fault_take(&c->fault, EPX__FAULT_NOMEM, c->fault_step, &f))
        return epx__fail(err, EPX_ERR_NO_MEMORY, "every CUDA IPC mapping slot is held (EPX_FAULT nomem)");
    epx__ipc_entry_t *victim = NULL;
    for (int i = 0; i < EPX__IPC_CACHE; i++) {
        epx__ipc_entry_t *e = &c->ipc[i];
        if (e->ptr && e->peer == peer && e->buffer_id == card->buffer_id &&
            memcmp(&e->handle, &card->handle, sizeof e->handle) == 0) {
            e->last_use = ++c->use_clock;
            e->pins += pin;
            *base = e->ptr;
            *slot = i;
            return EPX_SUCCESS;
        }
        if (e->pins || epx__ipc_graph_held(c, i)) continue; /* held by a context or a graph: never evicted */
        if (!victim || !e->ptr || (victim->ptr && e->last_use < victim->last_use)) victim = e;
    }
    if (!victim)
        return epx__fail(err, EPX_ERR_NO_MEMORY, "every CUDA IPC mapping slot is held by a MoE context or a CUDA graph");
    if (victim->ptr) {
        /* Work already enqueued may still use the mapping: let the device finish first. */
        cudaDeviceSynchronize();
        cudaIpcCloseMemHandle(victim->ptr);
        c->ipc_closed++;
    }
    victim->ptr = NULL;
    void *p = NULL;
    cudaError_t ce = cudaIpcOpenMemHandle(&p, card->handle, cudaIpcMemLazyEnablePeerAccess);
    if (ce == cudaErrorAlreadyMapped) {
        /* This also closes mappings the current call took earlier: c->ipc_closed moves, and
         * the call maps its buffers again (a pointer it holds may be gone). */
        cudaGetLastError();
        cudaDeviceSynchronize();
        int dropped = 0;
        for (int i = 0; i < EPX__IPC_CACHE; i++)
            if (c->ipc[i].ptr && c->ipc[i].peer == peer && !c->ipc[i].pins && !epx__ipc_graph_held(c, i)) {
                cudaIpcCloseMemHandle(c->ipc[i].ptr);
                c->ipc[i].ptr = NULL;
                dropped++;
            }
        c->ipc_closed++;
        EPX_INFO(CUDA, "rank %d: rank %d reuses an address mapped here: %d of its mappings dropped", c->rank, peer,
                 dropped);
        ce = cudaIpcOpenMemHandle(&p, card->handle, cudaIpcMemLazyEnablePeerAccess);
    }
    if (ce != cudaSuccess)
        return epx__fail(err, EPX_ERR_CUDA, "opening rank %d's buffer (CUDA IPC): %s", peer, cudaGetErrorString(ce));
    *victim = (epx__ipc_entry_t){peer, card->buffer_id, card->handle, p, ++c->use_clock, pin};
    *base = p;
    *slot = (int)(victim - c->ipc);
    return EPX_SUCCESS;
}

epx_status_t epx__ipc_open(epx__cuda_t *c, int peer, const epx__ipc_card_t *card, char **base, cudaGraph_t graph,
                           epx__errbuf_t *err)
{
    int slot;
    EPX__CHECK(epx__ipc_get(c, peer, card, base, 0, &slot, err));
    return graph ? epx__ipc_graph_hold(c, slot, graph, err) : EPX_SUCCESS;
}

epx_status_t epx__ipc_pin(epx__cuda_t *c, int peer, const epx__ipc_card_t *card, char **base, epx__errbuf_t *err)
{
    int slot;
    return epx__ipc_get(c, peer, card, base, 1, &slot, err);
}

void epx__ipc_unpin(epx__cuda_t *c, int peer, const void *base)
{
    for (int i = 0; i < EPX__IPC_CACHE; i++)
        if (c->ipc[i].ptr == base && c->ipc[i].peer == peer && c->ipc[i].pins > 0) {
            c->ipc[i].pins--;
            return;
        }
}

/* ---- alltoallv ---------------------------------------------------------------------------- */

/* `in`: the peers' cards; `out`: mine, as announced (x's counts, unless a fault changed them). */
static epx_status_t epx__check_cards(const epx__cuda_t *c, const epx__a2a_card_t *in, const epx__a2a_card_t *out,
                                     epx__errbuf_t *err)
{
    for (int p = 0; p < c->nranks; p++) {
        if (in[p].send_bytes != out[p].recv_bytes)
            return epx__fail(err, EPX_ERR_MISMATCH, "rank %d sends %lld bytes to rank %d, which expects %lld", p,
                             (long long)in[p].send_bytes, c->rank, (long long)out[p].recv_bytes);
        if (in[p].recv_bytes != out[p].send_bytes)
            return epx__fail(err, EPX_ERR_MISMATCH, "rank %d sends %lld bytes to rank %d, which expects %lld", c->rank,
                             (long long)out[p].send_bytes, p, (long long)in[p].recv_bytes);
    }
    return EPX_SUCCESS;
}

/* The path of one alltoallv, chosen from the largest pair of any rank (so all agree). */
typedef enum { EPX__PATH_EAGER, EPX__PATH_DIRECT, EPX__PATH_COPY_ENGINE } epx__path_t;

/* Enqueue the three paths. `dst[p]` is where my segment for p goes (p's receive buffer,
 * mapped here; mine for p == me). */
static cudaError_t epx__enqueue_eager(epx__cuda_t *c, const epx__cpu_xfer_t *x, void *stream)
{
    epx__cuda_a2a_args_t a;
    memset(&a, 0, sizeof a);
    a.send = x->send;
    a.recv = x->recv;
    for (int p = 0; p < c->nranks; p++) {
        a.send_bytes[p] = x->send_bytes[p];
        a.send_displ[p] = x->send_displ[p];
        a.recv_bytes[p] = x->recv_bytes[p];
        a.recv_displ[p] = x->recv_displ[p];
    }
    return (cudaError_t)epx__cuda_launch_eager_alltoallv(&c->dev, &a, stream);
}

static cudaError_t epx__enqueue_direct(epx__cuda_t *c, const epx__cpu_xfer_t *x, char *const *dst, void *stream)
{
    epx__cuda_direct_args_t a;
    memset(&a, 0, sizeof a);
    for (int p = 0; p < c->nranks; p++) {
        a.src[p] = (const char *)x->send + x->send_displ[p];
        a.dst[p] = dst[p];
        a.bytes[p] = x->send_bytes[p];
    }
    return (cudaError_t)epx__cuda_launch_direct_alltoallv(&c->dev, &a, stream);
}

/* Copy engines: wait until every peer's stream is here (its receive buffer is free), push
 * my segments into the peers, my own beside them on a second stream, then signal done and
 * wait until every peer has pushed into me. */
static cudaError_t epx__enqueue_copy_engine(epx__cuda_t *c, const epx__cpu_xfer_t *x, char *const *dst, void *stream)
{
    int R = c->nranks, me = c->rank;
    cudaStream_t s = (cudaStream_t)stream;
    cudaError_t ce = (cudaError_t)epx__cuda_launch_signal_wait(&c->dev, EPX__FLAG_ARRIVE, 0, stream);
    bool self = ce == cudaSuccess && x->send_bytes[me] > 0;
    if (self) {
        ce = cudaEventRecord(c->fork, s);
        if (ce == cudaSuccess) ce = cudaStreamWaitEvent(c->side, c->fork, 0);
        if (ce == cudaSuccess)
            ce = cudaMemcpyAsync(dst[me], (const char *)x->send + x->send_displ[me], (size_t)x->send_bytes[me],
                                 cudaMemcpyDeviceToDevice, c->side);
        if (ce == cudaSuccess) ce = cudaEventRecord(c->join, c->side);
    }
    for (int i = 1; i < R && ce == cudaSuccess; i++) {
        int p = (me + i) % R;
        if (x->send_bytes[p] > 0)
            ce = cudaMemcpyAsync(dst[p], (const char *)x->send + x->send_displ[p], (size_t)x->send_bytes[p],
                                 cudaMemcpyDeviceToDevice, s);
    }
    if (ce == cudaSuccess && self) ce = cudaStreamWaitEvent(s, c->join, 0);
    if (ce == cudaSuccess) ce = (cudaError_t)epx__cuda_launch_signal_wait(&c->dev, EPX__FLAG_DONE, 1, stream);
    return ce;
}

/* Send each peer its card (cards[p], `bytes` each) and get theirs (into cards + R). */
epx_status_t epx__swap_cards(epx__cuda_t *c, void *cards, size_t bytes, epx_status_t local, epx__errbuf_t *err)
{
    int R = c->nranks;
    int64_t *cnt = malloc(sizeof(int64_t) * 2 * (size_t)R);
    if (!cnt) return epx__host_fail(c->host, local != EPX_SUCCESS ? local : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    for (int p = 0; p < R; p++) {
        cnt[p] = (int64_t)bytes;
        cnt[R + p] = (int64_t)bytes * p;
    }
    epx__cpu_xfer_t hx = {cards, cnt, cnt + R, (char *)cards + bytes * (size_t)R, cnt, cnt + R};
    epx_status_t st = epx__cpu_alltoallv(c->host, local == EPX_SUCCESS ? &hx : NULL, local, err);
    free(cnt);
    return st;
}

epx_status_t epx__cuda_refuse_capture(void *stream, const char *why, epx__errbuf_t *err)
{
    enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    cudaError_t ce = cudaStreamIsCapturing((cudaStream_t)stream, &cs);
    if (ce != cudaSuccess) {
        cudaGetLastError();
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "stream %p: %s", stream, cudaGetErrorString(ce));
    }
    if (cs != cudaStreamCaptureStatusNone)
        return epx__fail(err, EPX_ERR_INVALID_USAGE, "stream %p is being captured into a CUDA graph, but %s", stream, why);
    return EPX_SUCCESS;
}

bool epx__cuda_capturing(void *stream)
{
    enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing((cudaStream_t)stream, &cs) == cudaSuccess) return cs != cudaStreamCaptureStatusNone;
    cudaGetLastError();
    return true;
}

/* One exchange of a plan: its path, and for the peer-writing paths the peers' receive
 * buffers (their cards, then the mappings of them: dst[p] is where my segment for p goes),
 * and where the peers write mine: into it, or (`stage`) into epx's buffer for it. */
typedef struct {
    const epx__cpu_xfer_t *x;
    epx__path_t path;
    epx__ipc_card_t in[EPX__CUDA_MAX_RANKS];
    char *dst[EPX__CUDA_MAX_RANKS];
    char *stage;
} epx__a2a_op_t;

struct epx__cuda_a2a {
    int n;
    epx__a2a_op_t op[EPX__CUDA_A2A_MAX_OPS];
};

/* ---- Receive buffers CUDA IPC cannot share ---------------------------------------------------
 *
 * When my receive buffer of an exchange that peers write into (direct or copy-engine path)
 * lies in memory CUDA IPC cannot share, my card shows the peers epx's buffer c->a2a_stage
 * instead (op->stage): they write their segments there at the offsets they have in my
 * receive buffer, and once the path's last wait is over (its kernels, earlier on my stream,
 * saw every peer's writes complete: the direct kernel's WRITTEN counts, the copy-engine
 * path's DONE) epx__a2a_copy_out copies them into place on my stream. My own segment goes
 * straight into my buffer. The peers write into mine only after my ARRIVE of the operation
 * (the direct kernel's first step, the copy-engine path's first signal), which comes after
 * the previous operation's copy-out on my stream: so the buffer is free again by then, and
 * the copy-out reads it before any later operation may write it. A peer needs to know
 * nothing: it writes where my card says. A failure to make the buffer is this rank's
 * verdict in the host round that swaps the cards. */

/* Bytes of my receive buffer the peers write: up to the end of the last of their segments. */
static size_t epx__recv_extent(const epx__cuda_t *c, const epx__cpu_xfer_t *x)
{
    int64_t end = 0;
    for (int p = 0; p < c->nranks; p++)
        if (p != c->rank && x->recv_bytes[p] > 0) end = EPX__MAX(end, x->recv_displ[p] + x->recv_bytes[p]);
    return (size_t)end;
}

/* My card for op's receive buffer: its own, or epx's staging buffer (op->stage) when CUDA IPC
 * cannot share it. `keep`: an earlier exchange of the plan promised the staging buffer to the
 * peers already (a buffer it outgrows is kept). */
static epx_status_t epx__recv_card(epx__cuda_t *c, epx__a2a_op_t *op, bool keep, void *stream, epx__ipc_card_t *mine,
                                   epx__errbuf_t *err)
{
    bool shareable;
    EPX__CHECK(epx__ipc_export_if(c, op->x->recv, mine, &shareable, err));
    if (shareable) return EPX_SUCCESS;
    EPX__CHECK(epx__stage_buf_reserve(&c->a2a_stage, epx__recv_extent(c, op->x), keep, "alltoall(v) receive buffer",
                                      stream, err));
    op->stage = c->a2a_stage.ptr;
    return epx__ipc_export(c, op->stage, mine, err); /* cudaMalloc'd: shareable */
}

/* After the path of an exchange whose receive buffer is staged: the peers' segments into place. */
static cudaError_t epx__a2a_copy_out(const epx__cuda_t *c, const epx__a2a_op_t *op, void *stream)
{
    const epx__cpu_xfer_t *x = op->x;
    cudaError_t ce = cudaSuccess;
    for (int p = 0; p < c->nranks && ce == cudaSuccess; p++)
        if (p != c->rank && x->recv_bytes[p] > 0)
            ce = cudaMemcpyAsync((char *)x->recv + x->recv_displ[p], op->stage + x->recv_displ[p],
                                 (size_t)x->recv_bytes[p], cudaMemcpyDeviceToDevice, (cudaStream_t)stream);
    return ce;
}

/* Swap receive-buffer cards for op (a second host exchange, made only by operations too
 * large for the eager slots); the mapping comes later (epx__a2a_map). `keep`, `stream`: as
 * epx__recv_card's. */
static epx_status_t epx__swap_destinations(epx__cuda_t *c, epx__a2a_op_t *op, bool keep, void *stream,
                                           epx__errbuf_t *err)
{
    int R = c->nranks, me = c->rank;
    const epx__cpu_xfer_t *x = op->x;
    epx__ipc_card_t *cards = calloc(2 * (size_t)R, sizeof *cards), mine;
    if (!cards) return epx__host_fail(c->host, epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory"), err);
    memset(&mine, 0, sizeof mine);
    bool receives = false;
    for (int p = 0; p < R; p++) receives = receives || (p != me && x->recv_bytes[p] > 0);
    epx_status_t local = receives ? epx__recv_card(c, op, keep, stream, &mine, err) : EPX_SUCCESS;
    for (int p = 0; p < R; p++) {
        cards[p] = mine;
        cards[p].recv_displ = x->recv_displ[p];
    }
    epx_status_t st = epx__swap_cards(c, cards, sizeof mine, local, err);
    if (st == EPX_SUCCESS) memcpy(op->in, cards + R, sizeof *cards * (size_t)R);
    free(cards);
    return st;
}

/* Map the peers' receive buffers of every peer-writing exchange in the plan, again while an
 * open closes mappings taken before (epx__ipc_get). Local. */
static epx_status_t epx__a2a_map(epx__cuda_t *c, epx__cuda_a2a_t *plan, void *stream, epx__errbuf_t *err)
{
    int R = c->nranks, me = c->rank;
    cudaGraph_t graph;
    EPX__CHECK(epx__cuda_capture_graph(stream, &graph, err));
    for (int pass = 0;; pass++) {
        uint64_t closed = c->ipc_closed;
        epx_status_t st = EPX_SUCCESS;
        for (int i = 0; i < plan->n && st == EPX_SUCCESS; i++) {
            epx__a2a_op_t *op = &plan->op[i];
            if (op->path == EPX__PATH_EAGER) continue;
            op->dst[me] = (char *)op->x->recv + op->x->recv_displ[me];
            for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
                if (p == me || op->x->send_bytes[p] == 0) continue;
                st = epx__ipc_open(c, p, &op->in[p], &op->dst[p], graph, err);
                if (st == EPX_SUCCESS) op->dst[p] += op->in[p].base_offset + op->in[p].recv_displ;
            }
        }
        if (st != EPX_SUCCESS || c->ipc_closed == closed) return st;
        if (pass == 2) return epx__fail(err, EPX_ERR_CUDA, "CUDA IPC: the mappings of one call kept being replaced");
    }
}

/* The host exchanges of one exchange: counts agreed (a mismatch fails every rank), path
 * chosen, the peers' receive buffers' cards swapped when needed (`keep`, `stream`: as
 * epx__recv_card's). Every rank makes the same host exchanges whatever `local` says. */
static epx_status_t epx__a2a_plan_op(epx__cuda_t *c, epx__a2a_op_t *op, epx_status_t local, bool keep, void *stream,
                                     epx__errbuf_t *err)
{
    int R = c->nranks;
    const epx__cpu_xfer_t *x = op->x;
    epx__a2a_card_t *cards = calloc(2 * (size_t)R, sizeof *cards), mine;
    if (!cards) { /* still one host exchange, so the others return at once */
        if (local == EPX_SUCCESS) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        return epx__host_fail(c->host, local, err);
    }
    /* Agree on the counts on the host, before anything is enqueued. */
    memset(&mine, 0, sizeof mine);
    for (int p = 0; p < R && local == EPX_SUCCESS; p++)
        mine.max_pair_bytes = EPX__MAX(mine.max_pair_bytes, EPX__MAX(x->send_bytes[p], x->recv_bytes[p]));
    for (int p = 0; p < R; p++) {
        cards[p] = mine;
        if (local == EPX_SUCCESS) {
            cards[p].send_bytes = x->send_bytes[p];
            cards[p].recv_bytes = x->recv_bytes[p];
        }
    }
    if (local == EPX_SUCCESS && epx__cuda_fault_count(c)) cards[(c->rank + 1) % R].send_bytes += 1;
    epx_status_t st = epx__swap_cards(c, cards, sizeof mine, local, err);
    const epx__a2a_card_t *in = cards + R;
    /* A disagreement is seen only by the two ranks of the pair: agree on the verdict, so
     * that no rank enqueues an operation the others skip. Every rank gets here or none
     * does (the swap fails on all ranks alike). */
    if (st == EPX_SUCCESS) st = epx__host_agree(c, epx__check_cards(c, in, cards, err), err);
    int64_t global_max = 0;
    for (int p = 0; p < R && st == EPX_SUCCESS; p++) global_max = EPX__MAX(global_max, in[p].max_pair_bytes);
    op->path = global_max <= (int64_t)c->dev.eager_bytes ? EPX__PATH_EAGER
               : global_max <= c->ce_bytes               ? EPX__PATH_DIRECT
                                                         : EPX__PATH_COPY_ENGINE;
    /* Larger operations write straight into the peers' receive buffers. */
    if (st == EPX_SUCCESS && op->path != EPX__PATH_EAGER) st = epx__swap_destinations(c, op, keep, stream, err);
    free(cards);
    return st;
}

/* epx__cuda_a2a_prepare; with `vote`, the mappings (which fail on one rank only) are
 * agreed on by one more host round when an exchange needs them (the path, and whether the
 * host rounds succeeded, are the same on every rank). */
static epx_status_t epx__a2a_prepare(epx__cuda_t *c, const epx__cpu_xfer_t *const *x, int n, epx_status_t local,
                                     void *stream, bool vote, epx__cuda_a2a_t **out, epx__errbuf_t *err)
{
    *out = NULL;
    epx__cuda_a2a_t *plan = calloc(1, sizeof *plan);
    if (!plan && local == EPX_SUCCESS) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (n < 1 || n > EPX__CUDA_A2A_MAX_OPS) {
        free(plan);
        return epx__fail(err, EPX_ERR_INTERNAL, "an alltoallv plan of %d exchanges", n);
    }
    bool staged = false; /* an exchange so far writes into epx's staging buffer */
    for (int i = 0; i < n; i++) {
        if (!plan) {
            local = epx__host_fail(c->host, local, err); /* each exchange's first host round */
            continue;
        }
        plan->op[i].x = local == EPX_SUCCESS ? x[i] : NULL;
        local = epx__a2a_plan_op(c, &plan->op[i], local, staged, stream, err);
        staged = staged || plan->op[i].stage;
    }
    if (!plan) return local;
    plan->n = n;
    bool maps = false;
    for (int i = 0; i < n && local == EPX_SUCCESS; i++) maps = maps || plan->op[i].path != EPX__PATH_EAGER;
    if (local == EPX_SUCCESS) local = epx__a2a_map(c, plan, stream, err);
    if (vote && maps) local = epx__host_agree_mapped(c, local, err);
    if (local != EPX_SUCCESS) {
        free(plan);
        return local;
    }
    *out = plan;
    return EPX_SUCCESS;
}

epx_status_t epx__cuda_a2a_prepare(epx__cuda_t *c, const epx__cpu_xfer_t *const *x, int n, epx_status_t local,
                                   void *stream, epx__cuda_a2a_t **out, epx__errbuf_t *err)
{
    return epx__a2a_prepare(c, x, n, local, stream, false, out, err); /* the caller votes (src/xhost) */
}

epx_status_t epx__cuda_a2a_enqueue(epx__cuda_t *c, const epx__cuda_a2a_t *plan, int i, void *stream,
                                   epx__errbuf_t *err)
{
    const epx__a2a_op_t *op = &plan->op[i];
    if (i == 0) epx__cuda_fault_at(c, EPX__FAULT_AT_ENQUEUE);
    cudaError_t ce = op->path == EPX__PATH_EAGER    ? epx__enqueue_eager(c, op->x, stream)
                     : op->path == EPX__PATH_DIRECT ? epx__enqueue_direct(c, op->x, op->dst, stream)
                                                    : epx__enqueue_copy_engine(c, op->x, op->dst, stream);
    if (ce == cudaSuccess && op->stage) ce = epx__a2a_copy_out(c, op, stream);
    if (ce != cudaSuccess) return epx__fail(err, EPX_ERR_CUDA, "alltoallv enqueue: %s", cudaGetErrorString(ce));
    if (i == plan->n - 1) epx__cuda_fault_at(c, EPX__FAULT_AT_LAUNCHED);
    return EPX_SUCCESS;
}

void epx__cuda_a2a_free(epx__cuda_a2a_t *plan) { free(plan); }

epx_status_t epx__cuda_alltoallv(epx__cuda_t *c, const epx__cpu_xfer_t *x, epx_status_t local, void *stream,
                                 epx__errbuf_t *err)
{
    epx__cuda_fault_begin(c);
    epx__cuda_a2a_t *plan;
    epx_status_t st = epx__a2a_prepare(c, &x, 1, local, stream, true, &plan, err);
    if (st == EPX_SUCCESS) st = epx__cuda_a2a_enqueue(c, plan, 0, stream, err);
    epx__cuda_a2a_free(plan);
    return st;
}

epx_status_t epx__cuda_alltoallv_device(epx__cuda_t *c, const epx__cuda_counts_t *k, epx_status_t local, void *stream,
                                        epx__errbuf_t *err)
{
    int R = c->nranks, me = c->rank;
    /* One host round (at call or capture time): where every rank's receive buffer and
     * receive counts are. The counts themselves are read on the device. */
    typedef struct {
        epx__ipc_card_t recv, counts, displs;
    } card_t;
    epx__cuda_fault_begin(c);
    card_t mine, *cards = calloc(2 * (size_t)R, sizeof *cards);
    if (!cards) {
        if (local == EPX_SUCCESS) local = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        return epx__host_fail(c->host, local, err);
    }
    memset(&mine, 0, sizeof mine);
    if (local == EPX_SUCCESS) local = epx__ipc_export(c, k->recv, &mine.recv, err);
    if (local == EPX_SUCCESS) local = epx__ipc_export(c, k->recv_counts, &mine.counts, err);
    if (local == EPX_SUCCESS) local = epx__ipc_export(c, k->recv_displs, &mine.displs, err);
    for (int p = 0; p < R; p++) cards[p] = mine;
    epx_status_t st = epx__swap_cards(c, cards, sizeof mine, local, err);
    const bool met = st == EPX_SUCCESS; /* the same on every rank */
    const card_t *in = cards + R;
    epx__cuda_direct_args_t a;
    memset(&a, 0, sizeof a);
    a.elem = k->elem_bytes;
    a.send_counts = (const long long *)k->send_counts;
    a.send_displs = (const long long *)k->send_displs;
    cudaGraph_t graph = NULL;
    if (st == EPX_SUCCESS) st = epx__cuda_capture_graph(stream, &graph, err);
    /* Mapped again when an open in this call closed mappings it took before (ipc_get). */
    for (int pass = 0; st == EPX_SUCCESS; pass++) {
        uint64_t closed = c->ipc_closed;
        for (int p = 0; p < R && st == EPX_SUCCESS; p++) {
            a.src[p] = (const char *)k->send;
            if (p == me) {
                a.dst[p] = (char *)k->recv;
                a.recv_counts[p] = (const long long *)k->recv_counts;
                a.recv_displs[p] = (const long long *)k->recv_displs;
                continue;
            }
            char *base;
            st = epx__ipc_open(c, p, &in[p].recv, &base, graph, err);
            a.dst[p] = base + in[p].recv.base_offset;
            if (st == EPX_SUCCESS) st = epx__ipc_open(c, p, &in[p].counts, &base, graph, err);
            a.recv_counts[p] = (const long long *)(base + in[p].counts.base_offset);
            if (st == EPX_SUCCESS) st = epx__ipc_open(c, p, &in[p].displs, &base, graph, err);
            a.recv_displs[p] = (const long long *)(base + in[p].displs.base_offset);
        }
        if (st != EPX_SUCCESS || c->ipc_closed == closed) break;
        if (pass == 2) st = epx__fail(err, EPX_ERR_CUDA, "CUDA IPC: the mappings of one call kept being replaced");
    }
    free(cards);
    if (met) st = epx__host_agree_mapped(c, st, err); /* a mapping fails on one rank only */
    if (st != EPX_SUCCESS) return st;
    if (epx__cuda_fault_count(c)) a.fault_to = (me + 1) % R + 1; /* one element more to the next rank */
    epx__cuda_fault_at(c, EPX__FAULT_AT_ENQUEUE);
    cudaError_t ce = (cudaError_t)epx__cuda_launch_direct_alltoallv(&c->dev, &a, stream);
    if (ce != cudaSuccess) return epx__fail(err, EPX_ERR_CUDA, "alltoallv_device enqueue: %s", cudaGetErrorString(ce));
    epx__cuda_fault_at(c, EPX__FAULT_AT_LAUNCHED);
    return EPX_SUCCESS;
}

epx_status_t epx__cuda_barrier(epx__cuda_t *c, epx_status_t local, void *stream, epx__errbuf_t *err)
{
    /* Agree on the host first, so that a rejected call enqueues nothing anywhere. */
    epx__cuda_fault_begin(c);
    int dummy = 0, all[EPX__CUDA_MAX_RANKS];
    epx_status_t st = epx__host_allgather(c->host, c->nranks, &dummy, all, sizeof dummy, local, err);
    if (st != EPX_SUCCESS) return st;
    epx__cuda_fault_at(c, EPX__FAULT_AT_ENQUEUE);
    cudaError_t ce = (cudaError_t)epx__cuda_launch_signal_wait(&c->dev, EPX__FLAG_ARRIVE, 1, stream);
    if (ce != cudaSuccess) return epx__fail(err, EPX_ERR_CUDA, "barrier enqueue: %s", cudaGetErrorString(ce));
    epx__cuda_fault_at(c, EPX__FAULT_AT_LAUNCHED);
    return EPX_SUCCESS;
}
