/* alltoall, alltoallv, barrier: argument checks, then the backend. */
#include <stdlib.h>
#include <string.h>

#include "api.h"

/* Convert per-peer element counts/displacements to bytes; check signs, overflow and
 * pointers. `what` names the side ("send"/"recv"). Fills bytes[] and displ[] and the byte
 * extent [lo, hi) actually touched (lo = hi = 0 when nothing is). */
static epx_status_t epx__check_side(epx_comm_t c, const char *what, const void *buf, const int64_t *counts,
                                    const int64_t *displs, size_t es, int64_t *bytes, int64_t *displ, int64_t *lo,
                                    int64_t *hi)
{
    *lo = INT64_MAX;
    *hi = 0;
    if (!counts || !displs)
        return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "%scounts or %s displacements is NULL", what, what);
    for (int p = 0; p < c->nranks; p++) {
        if (counts[p] < 0)
            return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "%scounts[%d] = %lld is negative", what, p,
                             (long long)counts[p]);
        if (displs[p] < 0)
            return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "%s displacement [%d] = %lld is negative", what, p,
                             (long long)displs[p]);
        if (counts[p] > INT64_MAX / (int64_t)es || displs[p] > INT64_MAX / (int64_t)es ||
            counts[p] * (int64_t)es > INT64_MAX - displs[p] * (int64_t)es)
            return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "%s count/displacement [%d] = %lld/%lld overflows",
                             what, p, (long long)counts[p], (long long)displs[p]);
        bytes[p] = counts[p] * (int64_t)es;
        displ[p] = displs[p] * (int64_t)es;
        if (bytes[p] > 0) {
            *lo = EPX__MIN(*lo, displ[p]);
            *hi = EPX__MAX(*hi, displ[p] + bytes[p]);
        }
    }
    if (*hi == 0) {
        *lo = 0;
        return EPX_SUCCESS;
    }
    if (!buf) return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "%s buffer is NULL but has data", what);
    if ((uintptr_t)buf % es)
        return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "%s buffer %p is not aligned to its %zu-byte elements",
                         what, buf, es);
    if ((uint64_t)*hi > UINTPTR_MAX - (uintptr_t)buf)
        return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "%s buffer range wraps the address space", what);
    return EPX_SUCCESS;
}

static epx_status_t epx__check_xfer(epx_comm_t c, const void *send, const int64_t *sendcounts,
                                    const int64_t *sdispls, void *recv, const int64_t *recvcounts,
                                    const int64_t *rdispls, epx_dtype_t dtype, void *stream, epx__cpu_xfer_t *x)
{
    int64_t *sb = c->scratch, *sd = sb + c->nranks, *rb = sd + c->nranks, *rd = rb + c->nranks;
    size_t es = epx_dtype_size(dtype);
    if (es == 0) return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "dtype = %d is not an epx_dtype_t", (int)dtype);
    if (stream && !c->cuda)
        return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "stream must be NULL on the CPU backend");
    int64_t slo, shi, rlo, rhi;
    EPX__CHECK(epx__check_side(c, "send", send, sendcounts, sdispls, es, sb, sd, &slo, &shi));
    EPX__CHECK(epx__check_side(c, "recv", recv, recvcounts, rdispls, es, rb, rd, &rlo, &rhi));
    if (c->cuda && ((shi > slo && !epx__cuda_is_device_ptr(send)) || (rhi > rlo && !epx__cuda_is_device_ptr(recv))))
        return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "send and recv must be device memory on the CUDA backend");
    if (shi > slo && rhi > rlo) {
        uintptr_t s0 = (uintptr_t)send + (uintptr_t)slo, s1 = (uintptr_t)send + (uintptr_t)shi;
        uintptr_t r0 = (uintptr_t)recv + (uintptr_t)rlo, r1 = (uintptr_t)recv + (uintptr_t)rhi;
        if (s0 < r1 && r0 < s1)
            return epx__fail(&c->err, EPX_ERR_INVALID_ARGUMENT, "send and recv buffers overlap");
    }
    if (sb[c->rank] != rb[c->rank])
        return epx__fail(&c->err, EPX_ERR_MISMATCH, "rank %d sends itself %lld elements but expects %lld", c->rank,
                         (long long)sendcounts[c->rank], (long long)recvcounts[c->rank]);
    *x = (epx__cpu_xfer_t){send, sb, sd, recv, rb, rd};
    return EPX_SUCCESS;
}

/* Run one validated exchange on the communicator's backend. */
static epx_status_t epx__exchange(epx_comm_t c, const epx__cpu_xfer_t *x, epx_status_t local, void *stream)
{
    if (c->xh || c->hier) epx__comm_fault_begin(c, local, true); /* EPX_FAULT across hosts */
    if (c->xh) return epx__xhost_alltoallv(c->xh, x, local, stream, &c->err);
    if (c->cuda) return epx__cuda_alltoallv(c->cuda, x, local, stream, &c->err);
    if (c->hier) return epx__hier_alltoallv(c->hier, x, local, &c->err);
    return epx__cpu_alltoallv(c->cpu, x, local, &c->err);
}

epx_status_t epx_alltoallv(epx_comm_t comm, const void *send, const int64_t *sendcounts, const int64_t *sdispls,
                           void *recv, const int64_t *recvcounts, const int64_t *rdispls, epx_dtype_t dtype,
                           void *stream)
{
    EPX__CHECK(epx__comm_check(comm));
    epx__cpu_xfer_t x;
    epx_status_t local =
        epx__check_xfer(comm, send, sendcounts, sdispls, recv, recvcounts, rdispls, dtype, stream, &x);
    return epx__comm_result(comm, epx__exchange(comm, local == EPX_SUCCESS ? &x : NULL, local, stream));
}

epx_status_t epx_alltoallv_device(epx_comm_t comm, const void *send, const int64_t *sendcounts, const int64_t *sdispls,
                                  void *recv, const int64_t *recvcounts, const int64_t *rdispls, epx_dtype_t dtype,
                                  void *stream)
{
    EPX__CHECK(epx__comm_check(comm));
    if (!comm->cuda) /* alike on every rank: no collective step is needed */
        return epx__fail(&comm->err, EPX_ERR_UNSUPPORTED, "epx_alltoallv_device needs the CUDA backend");
    epx_status_t local = EPX_SUCCESS;
    size_t es = epx_dtype_size(dtype);
    const void *arrays[] = {sendcounts, sdispls, recvcounts, rdispls};
    static const char *names[] = {"sendcounts", "sdispls", "recvcounts", "rdispls"};
    if (es == 0) local = epx__fail(&comm->err, EPX_ERR_INVALID_ARGUMENT, "dtype = %d is not an epx_dtype_t", (int)dtype);
    for (int i = 0; i < 4 && local == EPX_SUCCESS; i++)
        if (!arrays[i] || !epx__cuda_is_device_ptr(arrays[i]) || (uintptr_t)arrays[i] % 8)
            local = epx__fail(&comm->err, EPX_ERR_INVALID_ARGUMENT, "%s must be 8-byte aligned device memory", names[i]);
    if (local == EPX_SUCCESS && (!send || !recv || !epx__cuda_is_device_ptr(send) || !epx__cuda_is_device_ptr(recv)))
        local = epx__fail(&comm->err, EPX_ERR_INVALID_ARGUMENT, "send and recv must be device memory");
    if (local == EPX_SUCCESS && ((uintptr_t)send % es || (uintptr_t)recv % es))
        local = epx__fail(&comm->err, EPX_ERR_INVALID_ARGUMENT, "send or recv is not aligned to its %zu-byte elements", es);
    epx__cuda_counts_t k = {send, sendcounts, sdispls, recv, recvcounts, rdispls, (int64_t)es};
    if (comm->xh) {
        epx__comm_fault_begin(comm, local, true); /* EPX_FAULT across hosts */
        return epx__comm_result(comm, epx__xhost_alltoallv_device(comm->xh, &k, local, stream, &comm->err));
    }
    return epx__comm_result(comm, epx__cuda_alltoallv_device(comm->cuda, &k, local, stream, &comm->err));
}

epx_status_t epx_alltoall(epx_comm_t comm, const void *send, void *recv, size_t count, epx_dtype_t dtype,
                          void *stream)
{
    EPX__CHECK(epx__comm_check(comm));
    int n = comm->nranks;
    /* Counts and displacements in elements, after the byte arrays in scratch (nothing
     * allocated here: a failure before the exchange would leave the peers waiting). */
    int64_t *cnt = comm->scratch + 4 * (size_t)n, *dsp = cnt + n;
    epx_status_t local = EPX_SUCCESS;
    if (count > (size_t)INT64_MAX / (size_t)n)
        local = epx__fail(&comm->err, EPX_ERR_INVALID_ARGUMENT, "count = %zu overflows", count);
    for (int p = 0; p < n; p++) {
        cnt[p] = local == EPX_SUCCESS ? (int64_t)count : 0;
        dsp[p] = local == EPX_SUCCESS ? (int64_t)count * p : 0;
    }
    epx__cpu_xfer_t x;
    if (local == EPX_SUCCESS) local = epx__check_xfer(comm, send, cnt, dsp, recv, cnt, dsp, dtype, stream, &x);
    return epx__comm_result(comm, epx__exchange(comm, local == EPX_SUCCESS ? &x : NULL, local, stream));
}

epx_status_t epx_barrier(epx_comm_t comm, void *stream)
{
    EPX__CHECK(epx__comm_check(comm));
    epx_status_t local = EPX_SUCCESS;
    if (stream && !comm->cuda)
        local = epx__fail(&comm->err, EPX_ERR_INVALID_ARGUMENT, "stream must be NULL on the CPU backend");
    if (comm->xh) {
        epx__comm_fault_begin(comm, local, false); /* EPX_FAULT across hosts (no sizes to announce) */
        return epx__comm_result(comm, epx__xhost_barrier(comm->xh, local, stream, &comm->err));
    }
    if (comm->cuda) return epx__comm_result(comm, epx__cuda_barrier(comm->cuda, local, stream, &comm->err));
    int64_t *z = comm->scratch;
    memset(z, 0, 4 * sizeof(int64_t) * (size_t)comm->nranks);
    epx__cpu_xfer_t x = {NULL, z, z, NULL, z, z};
    return epx__comm_result(comm, epx__exchange(comm, local == EPX_SUCCESS ? &x : NULL, local, NULL));
}
