/*
 * src/xhost kernels: gathers of rows by reference (packing per-destination buffers before
 * NCCL and the intra-host exchange, and the final placement of dispatch), and the home
 * reduction of combine, which sums every token's rows with the single-host combine's
 * arithmetic (epx__moe_reduce_token of src/cuda), so that the bits are the same.
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

/* One warp per row. */
static __global__ void __launch_bounds__(512) epx__k_xh_gather(epx__xh_gather_t g)
{
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long j = warp; j < g.n; j += nwarps) {
        long long ref = g.ref[j];
        epx__warp_copy(g.row + j * g.row_stride, epx__xh_row(&g.src, ref), g.row_bytes);
        const char *a = epx__xh_aux(&g.src, ref);
        if (g.aux && a) epx__warp_copy(g.aux + j * g.aux_stride, a, g.aux_bytes);
    }
}

extern "C" int epx__xh_launch_gather(const epx__xh_gather_t *g, int blocks, void *stream)
{
    if (g->n <= 0) return (int)cudaSuccess;
    long long need = (g->n * 32 + 511) / 512;
    if (blocks > need) blocks = (int)need;
    if (blocks < 1) blocks = 1;
    epx__k_xh_gather<<<blocks, 512, 0, (cudaStream_t)stream>>>(*g);
    return (int)cudaGetLastError();
}

/* One warp per token, as the single-host combine. */
static __global__ void __launch_bounds__(512) epx__k_xh_reduce(epx__xh_reduce_t c)
{
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    int H = c.hidden;
    long long row_bytes = (long long)H * (c.dtype == EPX_F32 ? 4 : 2);
    for (long long t = warp; t < c.num_tokens; t += nwarps) {
        const char *src[EPX_MOE_MAX_TOPK];
        const float *wsrc[EPX_MOE_MAX_TOPK];
        long long a = c.first[t];
        int n = (int)(c.first[t + 1] - a);
        if (n > EPX_MOE_MAX_TOPK) n = EPX_MOE_MAX_TOPK; /* a token reaches at most K ranks */
        long long my_ref = (int)(threadIdx.x & 31) < n ? c.ref[a + (threadIdx.x & 31)] : 0; /* all in one load */
        for (int i = 0; i < n; i++) {
            long long ref = __shfl_sync(0xffffffffu, my_ref, i);
            src[i] = epx__xh_row(&c.src, ref);
            wsrc[i] = (const float *)epx__xh_aux(&c.src, ref);
        }
        bool vec = c.dtype == EPX_BF16 && (H % 8) == 0 && ((unsigned long long)c.out & 15ull) == 0;
        epx__moe_reduce_token(src, wsrc, n, c.out + t * row_bytes, c.out_w ? c.out_w + t * c.topk : (float *)0, H,
                              c.dtype, c.topk, vec, (const float *)0);
    }
}

extern "C" int epx__xh_launch_reduce(const epx__xh_reduce_t *r, int blocks, void *stream)
{
    if (r->num_tokens <= 0) return (int)cudaSuccess;
    long long need = ((long long)r->num_tokens * 32 + 511) / 512;
    if (blocks > need) blocks = (int)need;
    if (blocks < 1) blocks = 1;
    epx__k_xh_reduce<<<blocks, 512, 0, (cudaStream_t)stream>>>(*r);
    return (int)cudaGetLastError();
}
