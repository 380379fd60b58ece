/* The CUDA backend's entry points in a build without CUDA: every one says so. */
#include "cuda.h"

epx_status_t epx__cuda_create(epx__cuda_t **cuda, epx__cpu_t *host, int rank, int nranks, int device,
                              int64_t timeout_ms, epx__errbuf_t *err)
{
    (void)host, (void)rank, (void)nranks, (void)device, (void)timeout_ms;
    *cuda = NULL;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "this build of epx has no CUDA backend (no CUDA toolkit at build time)");
}

void epx__cuda_destroy(epx__cuda_t *cuda) { (void)cuda; }

epx_status_t epx__cuda_check_async(epx__cuda_t *cuda, epx__errbuf_t *err)
{
    (void)cuda, (void)err;
    return EPX_SUCCESS;
}

epx_status_t epx__cuda_mem_alloc(epx__cuda_t *cuda, size_t bytes, void **ptr, epx__errbuf_t *err)
{
    (void)cuda, (void)bytes, (void)ptr;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}

epx_status_t epx__cuda_mem_free(epx__cuda_t *cuda, void *ptr, epx__errbuf_t *err)
{
    (void)cuda, (void)ptr;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}

epx_status_t epx__cuda_alltoallv(epx__cuda_t *cuda, const epx__cpu_xfer_t *x, epx_status_t local_status, void *stream,
                                 epx__errbuf_t *err)
{
    (void)cuda, (void)x, (void)local_status, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}

epx_status_t epx__cuda_barrier(epx__cuda_t *cuda, epx_status_t local_status, void *stream, epx__errbuf_t *err)
{
    (void)cuda, (void)local_status, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}

bool epx__cuda_is_device_ptr(const void *p)
{
    (void)p;
    return false;
}
