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

void epx__cuda_set_fault(epx__cuda_t *cuda, const epx__fault_t *fault) { (void)cuda, (void)fault; }

bool epx__cuda_has_failed(const epx__cuda_t *cuda) { return (void)cuda, false; }
epx_status_t epx__cuda_check_async(epx__cuda_t *cuda, epx__errbuf_t *err)
{
    (void)cuda, (void)err;
    return EPX_SUCCESS;
}

void epx__cuda_relay_failures(epx__cuda_t *cuda) { (void)cuda; }

epx_status_t epx__cuda_inject_failure(epx__cuda_t *cuda, void *stream, epx__errbuf_t *err)
{
    (void)cuda, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}

epx_status_t epx__cuda_status_out(epx__cuda_t *cuda, int rank, unsigned seq, void *out, void *stream,
                                  epx__errbuf_t *err)
{
    (void)cuda, (void)rank, (void)seq, (void)out, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}

epx_status_t epx__cuda_status_check(epx__cuda_t *cuda, const void *in, const epx__cuda_status_slots_t *slots,
                                    unsigned seq, void *stream, epx__errbuf_t *err)
{
    (void)cuda, (void)in, (void)slots, (void)seq, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
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

epx_status_t epx__cuda_alltoallv_device(epx__cuda_t *cuda, const epx__cuda_counts_t *k, epx_status_t local_status,
                                        void *stream, epx__errbuf_t *err)
{
    (void)cuda, (void)k, (void)local_status, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}

epx_status_t epx__cuda_moe_ll_dispatch(epx__cuda_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                       epx_moe_ll_dispatch_out_t *out, epx_status_t local, bool split,
                                       epx__cuda_moe_handle_t **handle, void *stream, epx__errbuf_t *err)
{
    (void)m, (void)in, (void)out, (void)local, (void)split, (void)handle, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}

epx_status_t epx__cuda_moe_ll_combine(epx__cuda_moe_t *m, epx__cuda_moe_handle_t *h, const epx_moe_ll_combine_in_t *in,
                                      void *out, epx_status_t local, bool split, void *stream, epx__errbuf_t *err)
{
    (void)m, (void)h, (void)in, (void)out, (void)local, (void)split, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}

epx_status_t epx__cuda_moe_ll_recv(epx__cuda_moe_t *m, epx__cuda_moe_handle_t *h, bool combine, void *stream,
                                   epx__errbuf_t *err)
{
    (void)m, (void)h, (void)combine, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}

int64_t epx__cuda_comm_device_bytes(int nranks)
{
    (void)nranks;
    return 0;
}

int64_t epx__cuda_moe_device_bytes(const epx__moe_shape_t *s)
{
    (void)s;
    return 0;
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

epx_status_t epx__cuda_moe_create(epx__cuda_t *c, const epx__moe_shape_t *shape, uint64_t hash, epx_status_t local,
                                  epx__cuda_moe_t **out, epx__errbuf_t *err)
{
    (void)c, (void)shape, (void)hash, (void)local;
    *out = NULL;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}
void epx__cuda_moe_detach(epx__cuda_moe_t *m) { (void)m; }

void epx__cuda_moe_destroy(epx__cuda_moe_t *m) { (void)m; }
epx_status_t epx__cuda_moe_layout(epx__cuda_moe_t *m, const void *topk_idx, int num_tokens, int topk, int32_t *per_rank,
                                  int32_t *per_expert, uint8_t *in_rank, void *stream, epx__errbuf_t *err)
{
    (void)m, (void)topk_idx, (void)num_tokens, (void)topk, (void)per_rank, (void)per_expert, (void)in_rank, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}
epx_status_t epx__cuda_moe_dispatch(epx__cuda_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                    epx_status_t local, epx__cuda_moe_handle_t **handle, void *stream,
                                    epx__errbuf_t *err)
{
    (void)m, (void)in, (void)out, (void)local, (void)handle, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}
epx_status_t epx__cuda_moe_dispatch_cached(epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h,
                                           const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                           epx_status_t local, void *stream, epx__errbuf_t *err)
{
    (void)m, (void)h, (void)in, (void)out, (void)local, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}
epx_status_t epx__cuda_moe_combine(epx__cuda_moe_t *m, const epx__cuda_moe_handle_t *h, const epx_moe_combine_in_t *in,
                                   epx_moe_combine_out_t *out, epx_status_t local, void *stream, epx__errbuf_t *err)
{
    (void)m, (void)h, (void)in, (void)out, (void)local, (void)stream;
    return epx__fail(err, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
}
void epx__cuda_moe_handle_free(epx__cuda_moe_handle_t *h) { (void)h; }
int64_t epx__cuda_moe_handle_rows(const epx__cuda_moe_handle_t *h)
{
    (void)h;
    return 0;
}
int epx__cuda_moe_handle_tokens(const epx__cuda_moe_handle_t *h)
{
    (void)h;
    return 0;
}
