/*
 * src/xhost kernels: gathers of rows by reference (packing per-destination buffers before
 * NCCL and the intra-host exchange, and the final placement of dispatch: rows in order, or
 * low-latency slots with their sources), the low-latency FP8 quantisation, and the home
 * reduction of combine, which sums every token's rows with the single-host combine's
 * arithmetic (epx__moe_reduce_token of src/cuda; low-latency: epx__ll_sum_token), so that
 * the bits are the same.
 */
#include <cuda_runtime.h>

#include "../cuda/moe_common.cuh"
#include "dev.h"

static __device__ __forceinline__ const char *epx__xh_row(const epx__xh_src_t *s, long long ref)
{
    int k = EPX__XH_REF_KIND(ref);
    return s->row[k] + EPX__XH_REF_INDEX(ref) * s->row_stride[k];
}

static __device__ __forceinline__ const char *epx__xh_aux(const epx__xh_src_t *s, long long ref)
{
    int k = EPX__XH_REF_KIND(ref);
    return s->aux[k] ? s->aux[k] + EPX__XH_REF_INDEX(ref) * s->aux_stride[k] : (const char *)0;
}

/* One warp: the row (and auxiliary part) of `ref` into g's destination row d. */
static __device__ __forceinline__ void epx__xh_copy(const epx__xh_gather_t *g, long long ref, long long d)
{
    epx__warp_copy(g->row + d * g->row_stride, epx__xh_row(&g->src, ref), g->row_bytes);
    const char *a = epx__xh_aux(&g->src, ref);
    if (g->aux && a) epx__warp_copy(g->aux + d * g->aux_stride, a, g->aux_bytes);
}

/* Blocks of 512 threads for `threads` threads of work, at most `blocks`, at least one. */
static int epx__xh_grid(long long threads, int blocks)
{
    long long need = (threads + 511) / 512;
    if (blocks > need) blocks = (int)need;
    return blocks < 1 ? 1 : blocks;
}

/* One warp per row. */
static __global__ void __launch_bounds__(512) epx__k_xh_gather(epx__xh_gather_t g)
{
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long j = warp; j < g.n; j += nwarps) epx__xh_copy(&g, g.ref[j], j);
}

extern "C" int epx__xh_launch_gather(const epx__xh_gather_t *g, int blocks, void *stream)
{
    if (g->n <= 0) return (int)cudaSuccess;
    epx__k_xh_gather<<<epx__xh_grid(g->n * 32, blocks), 512, 0, (cudaStream_t)stream>>>(*g);
    return (int)cudaGetLastError();
}

/* One warp per filled slot; then a thread per slot for the sources of the empty ones and
 * per local expert for the counts (disjoint writes). */
static __global__ void __launch_bounds__(512) epx__k_xh_place(epx__xh_place_t p)
{
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x, nthreads = (long long)gridDim.x * blockDim.x;
    for (long long j = tid >> 5; j < p.g.n; j += nthreads >> 5) {
        long long d = p.slot[j];
        epx__xh_copy(&p.g, p.g.ref[p.row[j]], d);
        if ((threadIdx.x & 31) == 0) {
            long long s = p.src[j];
            if (p.src_rank) p.src_rank[d] = (int)(s >> 32);
            if (p.src_token) p.src_token[d] = (int)(s & 0xffffffffll);
        }
    }
    for (long long i = tid; (p.src_rank || p.src_token) && i < (long long)p.L * p.slots; i += nthreads) {
        if (i % p.slots < p.count[i / p.slots]) continue;
        if (p.src_rank) p.src_rank[i] = -1;
        if (p.src_token) p.src_token[i] = -1;
    }
    for (long long l = tid; p.recv_count && l < p.L; l += nthreads) p.recv_count[l] = (int)p.count[l];
}

extern "C" int epx__xh_launch_place(const epx__xh_place_t *p, int blocks, void *stream)
{
    long long threads = p->g.n * 32, slots = (long long)p->L * p->slots;
    if (threads < slots) threads = slots;
    if (threads < p->L) threads = p->L;
    if (threads <= 0) return (int)cudaSuccess;
    epx__k_xh_place<<<epx__xh_grid(threads, blocks), 512, 0, (cudaStream_t)stream>>>(*p);
    return (int)cudaGetLastError();
}

/* One warp per 128-channel block of a token. */
static __global__ void __launch_bounds__(512) epx__k_xh_quantize(epx__xh_quant_t q)
{
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    int nb = (q.hidden + 127) / 128;
    for (long long i = warp; i < (long long)q.num_tokens * nb; i += nwarps) {
        long long t = i / nb;
        char *rec = q.q + t * q.stride;
        epx__ll_quantize_block((const uint16_t *)q.x + t * q.hidden, q.hidden, (int)(i % nb) * 128, q.ue8m0,
                               (uint8_t *)rec, rec + q.scale_off);
    }
}

extern "C" int epx__xh_launch_quantize(const epx__xh_quant_t *q, int blocks, void *stream)
{
    long long items = (long long)q->num_tokens * ((q->hidden + 127) / 128);
    if (items <= 0) return (int)cudaSuccess;
    epx__k_xh_quantize<<<epx__xh_grid(items * 32, blocks), 512, 0, (cudaStream_t)stream>>>(*q);
    return (int)cudaGetLastError();
}

/* One warp per token, as the single-host combine; DT is c.dtype (an instance per dtype, as
 * there). */
template <int DT> static __global__ void __launch_bounds__(512) epx__k_xh_reduce(epx__xh_reduce_t c)
{
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    int H = c.hidden, lane = (int)(threadIdx.x & 31);
    long long row_bytes = (long long)H * (DT == EPX_F32 ? 4 : 2);
    for (long long t = warp; t < c.num_tokens && c.w; t += nwarps) { /* low latency: weighted, by rank */
        long long a = c.first[t];
        int n = (int)(c.first[t + 1] - a);
        if (n > EPX_MOE_MAX_TOPK) n = EPX_MOE_MAX_TOPK; /* a token has at most K rows */
        long long my_ref = lane < n ? c.ref[a + lane] : 0;
        float my_w = lane < n ? c.w[t * c.topk + c.wk[a + lane]] : 0.0f;
        int my_g = lane < n ? (int)c.rk[a + lane] : 0;
        epx__ll_terms_t o;
        o.n = 0;
        for (int i = 0; i < n; i++)
            epx__ll_add_term(&o, epx__xh_row(&c.src, __shfl_sync(0xffffffffu, my_ref, i)),
                             __shfl_sync(0xffffffffu, my_w, i), __shfl_sync(0xffffffffu, my_g, i));
        epx__ll_sum_token<DT>(&o, c.out + t * row_bytes, H, DT, lane, 32);
    }
    for (long long t = warp; t < c.num_tokens && !c.w; t += nwarps) { /* high throughput: in rank order */
        const char *src[EPX_MOE_MAX_TOPK];
        const float *wsrc[EPX_MOE_MAX_TOPK];
        long long a = c.first[t];
        int n = (int)(c.first[t + 1] - a);
        if (n > EPX_MOE_MAX_TOPK) n = EPX_MOE_MAX_TOPK; /* a token has at most K rows */
        /* Every row's reference in one load per lane. */
        long long my_ref = lane < n ? c.ref[a + lane] : 0;
        for (int i = 0; i < n; i++) {
            long long ref = __shfl_sync(0xffffffffu, my_ref, i);
            src[i] = epx__xh_row(&c.src, ref);
            wsrc[i] = (const float *)epx__xh_aux(&c.src, ref);
        }
        char *out = c.out + t * row_bytes;
        float *out_w = c.out_w ? c.out_w + t * c.topk : (float *)0;
        epx__moe_reduce_token<EPX__CUDA_MAX_RANKS, DT>(src, wsrc, n, out, out_w, H, c.topk);
    }
}

extern "C" int epx__xh_launch_reduce(const epx__xh_reduce_t *r, int blocks, void *stream)
{
    if (r->num_tokens <= 0) return (int)cudaSuccess;
    int grid = epx__xh_grid((long long)r->num_tokens * 32, blocks);
    cudaStream_t s = (cudaStream_t)stream;
    switch (r->dtype) {
    case EPX_BF16: epx__k_xh_reduce<EPX_BF16><<<grid, 512, 0, s>>>(*r); break;
    case EPX_F16: epx__k_xh_reduce<EPX_F16><<<grid, 512, 0, s>>>(*r); break;
    default: epx__k_xh_reduce<EPX_F32><<<grid, 512, 0, s>>>(*r); break;
    }
    return (int)cudaGetLastError();
}
