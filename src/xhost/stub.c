/* src/xhost in a build without CUDA: there are no CUDA communicators to join. */
#include "xhost.h"

#define EPX__NO_XHOST(err) epx__fail(err, EPX_ERR_UNSUPPORTED, "this build of epx has no CUDA backend")

epx_status_t epx__xhost_create(epx__xhost_t **xh, epx__boot_t *boot, epx__cpu_t *cpu, epx__cuda_t *cuda,
                               epx__nccl_t *adopted, int rank, int nranks, const int *host_of, const int *lrank_of,
                               int64_t timeout_ms, epx_status_t local, epx__errbuf_t *err)
{
    (void)boot, (void)cpu, (void)cuda, (void)rank, (void)nranks, (void)host_of, (void)lrank_of, (void)timeout_ms;
    (void)local;
    epx__nccl_destroy(adopted, false);
    *xh = NULL;
    return EPX__NO_XHOST(err);
}
void epx__xhost_destroy(epx__xhost_t *xh, bool abort) { (void)xh, (void)abort; }
void epx__xhost_fault_set(epx__xhost_t *xh, const epx__fault_t *fault, uint32_t step, bool count, bool enqueue)
{
    (void)xh, (void)fault, (void)step, (void)count, (void)enqueue;
}
void epx__xhost_mark_broken(epx__xhost_t *xh) { (void)xh; }
epx_status_t epx__xhost_check_async(epx__xhost_t *xh, epx__errbuf_t *err) { return (void)xh, (void)err, EPX_SUCCESS; }
epx_status_t epx__xhost_alltoallv(epx__xhost_t *xh, const epx__cpu_xfer_t *x, epx_status_t local, void *stream,
                                  epx__errbuf_t *err)
{
    (void)xh, (void)x, (void)local, (void)stream;
    return EPX__NO_XHOST(err);
}
epx_status_t epx__xhost_alltoallv_device(epx__xhost_t *xh, const epx__cuda_counts_t *k, epx_status_t local,
                                         void *stream, epx__errbuf_t *err)
{
    (void)xh, (void)k, (void)local, (void)stream;
    return EPX__NO_XHOST(err);
}
epx_status_t epx__xhost_barrier(epx__xhost_t *xh, epx_status_t local, void *stream, epx__errbuf_t *err)
{
    (void)xh, (void)local, (void)stream;
    return EPX__NO_XHOST(err);
}
epx_status_t epx__xhost_moe_create(epx__xhost_t *xh, const epx__moe_shape_t *shape, uint64_t hash, epx_status_t local,
                                   epx__xhost_moe_t **out, epx__errbuf_t *err)
{
    (void)xh, (void)shape, (void)hash, (void)local, (void)out;
    return EPX__NO_XHOST(err);
}
void epx__xhost_moe_destroy(epx__xhost_moe_t *m) { (void)m; }
epx_status_t epx__xhost_moe_layout(epx__xhost_moe_t *m, const void *topk_idx, int num_tokens, int topk,
                                   int32_t *per_rank, int32_t *per_expert, uint8_t *in_rank, void *stream,
                                   epx__errbuf_t *err)
{
    (void)m, (void)topk_idx, (void)num_tokens, (void)topk, (void)per_rank, (void)per_expert, (void)in_rank, (void)stream;
    return EPX__NO_XHOST(err);
}
epx_status_t epx__xhost_moe_dispatch(epx__xhost_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                     epx_status_t local, epx__xhost_moe_handle_t **handle, void *stream,
                                     epx__errbuf_t *err)
{
    (void)m, (void)in, (void)out, (void)local, (void)handle, (void)stream;
    return EPX__NO_XHOST(err);
}
epx_status_t epx__xhost_moe_dispatch_cached(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h,
                                            const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                            epx_status_t local, void *stream, epx__errbuf_t *err)
{
    (void)m, (void)h, (void)in, (void)out, (void)local, (void)stream;
    return EPX__NO_XHOST(err);
}
epx_status_t epx__xhost_moe_combine(epx__xhost_moe_t *m, const epx__xhost_moe_handle_t *h,
                                    const epx_moe_combine_in_t *in, epx_moe_combine_out_t *out, epx_status_t local,
                                    void *stream, epx__errbuf_t *err)
{
    (void)m, (void)h, (void)in, (void)out, (void)local, (void)stream;
    return EPX__NO_XHOST(err);
}
epx_status_t epx__xhost_moe_ll_dispatch(epx__xhost_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                        epx_moe_ll_dispatch_out_t *out, epx_status_t local, bool split,
                                        epx__xhost_moe_handle_t **handle, void *stream, epx__errbuf_t *err)
{
    (void)m, (void)in, (void)out, (void)local, (void)split, (void)handle, (void)stream;
    return EPX__NO_XHOST(err);
}
epx_status_t epx__xhost_moe_ll_combine(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h,
                                       const epx_moe_ll_combine_in_t *in, void *out, epx_status_t local, bool split,
                                       void *stream, epx__errbuf_t *err)
{
    (void)m, (void)h, (void)in, (void)out, (void)local, (void)split, (void)stream;
    return EPX__NO_XHOST(err);
}
epx_status_t epx__xhost_moe_ll_recv(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h, bool combine, void *stream,
                                    epx__errbuf_t *err)
{
    (void)m, (void)h, (void)combine, (void)stream;
    return EPX__NO_XHOST(err);
}
void epx__xhost_moe_handle_free(epx__xhost_moe_t *m, epx__xhost_moe_handle_t *h)
{
    (void)m, (void)h;
}
int64_t epx__xhost_moe_handle_rows(const epx__xhost_moe_handle_t *h) { return (void)h, 0; }
int epx__xhost_moe_handle_tokens(const epx__xhost_moe_handle_t *h) { return (void)h, 0; }
