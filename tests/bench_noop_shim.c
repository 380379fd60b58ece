/*
 * A broken library for the benchmark's own test (LD_PRELOADed into epx-bench): epx_alltoall
 * of f32 data does nothing when called again with the count of its previous f32 call, and
 * epx_moe_combine and epx_moe_ll_combine do nothing after their first call. Their first calls are right, so only a
 * benchmark that checks the outputs of its later (timed) calls sees the damage; with the
 * shim, epx-bench must report wrong values and fail.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <stddef.h>

#include "epx.h"

epx_status_t epx_alltoall(epx_comm_t comm, const void *send, void *recv, size_t count, epx_dtype_t dtype,
                          void *stream)
{
    static size_t last = (size_t)-1;
    static epx_status_t (*real)(epx_comm_t, const void *, void *, size_t, epx_dtype_t, void *);
    if (!real) *(void **)&real = dlsym(RTLD_NEXT, "epx_alltoall");
    if (dtype != EPX_F32) return real(comm, send, recv, count, dtype, stream); /* the bench's own gathers */
    if (count == last) return EPX_SUCCESS;
    last = count;
    return real(comm, send, recv, count, dtype, stream);
}

epx_status_t epx_moe_combine(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_combine_in_t *in,
                             epx_moe_combine_out_t *out, void *stream)
{
    static int calls;
    static epx_status_t (*real)(epx_moe_t, epx_moe_handle_t, const epx_moe_combine_in_t *, epx_moe_combine_out_t *,
                                void *);
    if (!real) *(void **)&real = dlsym(RTLD_NEXT, "epx_moe_combine");
    if (calls++ > 0) return EPX_SUCCESS;
    return real(moe, handle, in, out, stream);
}

epx_status_t epx_moe_ll_combine(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_ll_combine_in_t *in, void *out,
                                void *stream)
{
    static int calls;
    static epx_status_t (*real)(epx_moe_t, epx_moe_handle_t, const epx_moe_ll_combine_in_t *, void *, void *);
    if (!real) *(void **)&real = dlsym(RTLD_NEXT, "epx_moe_ll_combine");
    if (calls++ > 0) return EPX_SUCCESS;
    return real(moe, handle, in, out, stream);
}
