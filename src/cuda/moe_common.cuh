/*
 * Device helpers shared by the MoE kernels (moe_kernels.cu, ll_kernels.cu).
 */
#ifndef EPX_CUDA_MOE_COMMON_CUH
#define EPX_CUDA_MOE_COMMON_CUH

#include <cuda_runtime.h>

#include "../core/convert.h"
#include "dev.h"
#include "epx.h"

static __device__ __forceinline__ long long epx__topk_get(const epx__moe_routing_t *r, int p, long long i)
{
    return r->index_i64 ? ((const long long *)r->topk_idx[p])[i] : (long long)((const int *)r->topk_idx[p])[i];
}

/* Exclusive prefix of `flag` over the block (blockDim.x a multiple of 32, <= 1024); returns
 * this thread's position and sets *total. */
static __device__ int epx__block_scan(int flag, int *total)
{
    __shared__ int warp_sums[32];
    __shared__ int sum;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    unsigned ballot = __ballot_sync(0xffffffffu, flag);
    int in_warp = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) warp_sums[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
        int v = lane < nwarps ? warp_sums[lane] : 0, incl = v;
        for (int o = 1; o < 32; o <<= 1) {
            int n = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += n;
        }
        if (lane < nwarps) warp_sums[lane] = incl - v;
        if (lane == 31) sum = incl;
    }
    __syncthreads();
    int pos = warp_sums[warp] + in_warp;
    *total = sum;
    __syncthreads();
    return pos;
}

/* Warp-wide copy; 16-byte words, eight loads in flight per lane, when both ends allow. */
static __device__ void epx__warp_copy(char *dst, const char *src, long long bytes)
{
    int lane = threadIdx.x & 31;
    long long done = 0;
    if ((((unsigned long long)dst | (unsigned long long)src) & 15ull) == 0) {
        const uint4 *s = (const uint4 *)src;
        uint4 *d = (uint4 *)dst;
        long long n = bytes / 16, i = lane;
        for (; i < n; i += 8 * 32) { /* the tail too keeps its loads in flight */
            uint4 v[8];
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (i + j * 32 < n) v[j] = s[i + j * 32];
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (i + j * 32 < n) d[i + j * 32] = v[j];
        }
        done = n * 16;
    } else if ((((unsigned long long)dst | (unsigned long long)src) & 3ull) == 0) {
        const unsigned *s = (const unsigned *)src;
        unsigned *d = (unsigned *)dst;
        long long n = bytes / 4;
        for (long long i = lane; i < n; i += 32) d[i] = s[i];
        done = n * 4;
    }
    for (long long i = done + lane; i < bytes; i += 32) dst[i] = src[i];
}

/* epx__warp_copy of a row and then of a short second block (an FP8 row's scales): when the
 * block is at most one 16-byte word a lane, that word is loaded before the row and stored
 * after it, so the two copies share their trips to memory. */
static __device__ void epx__warp_copy2(char *dst, const char *src, long long bytes, char *dst2, const char *src2,
                                       long long bytes2)
{
    int lane = threadIdx.x & 31;
    if (bytes2 > 32 * 16 || (bytes2 & 15) || (((unsigned long long)dst2 | (unsigned long long)src2) & 15ull)) {
        epx__warp_copy(dst, src, bytes);
        epx__warp_copy(dst2, src2, bytes2);
        return;
    }
    bool mine = lane * 16 < bytes2;
    uint4 w;
    if (mine) w = ((const uint4 *)src2)[lane];
    epx__warp_copy(dst, src, bytes);
    if (mine) ((uint4 *)dst2)[lane] = w;
}

/* One element of a row of dtype bf16, f16 or f32, as float32 / stored from float32. */
static __device__ __forceinline__ float epx__load_elem(const char *row, int dtype, long long h)
{
    switch (dtype) {
    case EPX_BF16: return epx__bf16_to_f32(((const uint16_t *)row)[h]);
    case EPX_F16: return epx__f16_to_f32(((const uint16_t *)row)[h]);
    default: return ((const float *)row)[h];
    }
}

static __device__ __forceinline__ void epx__store_elem(char *row, int dtype, long long h, float v)
{
    switch (dtype) {
    case EPX_BF16: ((uint16_t *)row)[h] = (uint16_t)epx__bf16x2_from_f32(v, 0.0f); break;
    case EPX_F16: ((uint16_t *)row)[h] = (uint16_t)epx__f16x2_from_f32(v, 0.0f); break;
    default: ((float *)row)[h] = v; break;
    }
}

/* Eight float32 values rounded to bf16 (the CPU backend's rounding), in one 16-byte word. */
static __device__ __forceinline__ uint4 epx__pack_bf16x8(const float *a)
{
    return make_uint4(epx__bf16x2_from_f32(a[0], a[1]), epx__bf16x2_from_f32(a[2], a[3]),
                      epx__bf16x2_from_f32(a[4], a[5]), epx__bf16x2_from_f32(a[6], a[7]));
}

/* The float32 values of one 16-byte chunk of a row of dtype DT (bf16, f16: 8; f32: 4),
 * exact for every value but NaN, and a chunk of float32 values rounded back as the CPU
 * backend rounds. A NaN may come out of the unpacking with other payload bits than
 * epx__load_elem gives it; the GPU's adds and products return the canonical NaN for any NaN
 * operand, so no sum shows the difference. */
template <int DT> struct epx__chunk {
    static_assert(DT == EPX_BF16 || DT == EPX_F16, "a chunk's dtype: bf16, f16 or f32");
    static const int n = 8;
};
template <> struct epx__chunk<EPX_F32> {
    static const int n = 4;
};
template <int DT> static __device__ __forceinline__ void epx__chunk_unpack(uint4 v, float *f)
{
    unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        if constexpr (DT == EPX_F32) {
            f[j] = epx__bits_f32(u[j]);
        } else if constexpr (DT == EPX_F16) {
            asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %2;\n cvt.f32.f16 %0, lo;\n cvt.f32.f16 %1, hi;\n}"
                : "=f"(f[2 * j]), "=f"(f[2 * j + 1])
                : "r"(u[j]));
        } else {
            f[2 * j] = epx__bits_f32(u[j] << 16), f[2 * j + 1] = epx__bits_f32(u[j] & 0xffff0000u);
        }
    }
}
template <int DT> static __device__ __forceinline__ uint4 epx__chunk_pack(const float *a)
{
    if constexpr (DT == EPX_F32)
        return make_uint4(epx__f32_bits(a[0]), epx__f32_bits(a[1]), epx__f32_bits(a[2]), epx__f32_bits(a[3]));
    else if constexpr (DT == EPX_F16)
        return make_uint4(epx__f16x2_from_f32(a[0], a[1]), epx__f16x2_from_f32(a[2], a[3]),
                          epx__f16x2_from_f32(a[4], a[5]), epx__f16x2_from_f32(a[6], a[7]));
    else
        return epx__pack_bf16x8(a);
}

/* The sum of n <= NR 16-byte-aligned rows of dtype DT, `chunks` 16-byte chunks each, by one
 * warp (see epx__moe_reduce_token): each lane loads U chunks of every row before it adds
 * any, so NR * U 16-byte loads are in flight per lane; each chunk's terms are then added in
 * row order from +0. */
template <int DT, int NR, int U>
static __device__ __forceinline__ void epx__reduce_rows(const char *const *src, int n, char *out, int chunks)
{
    const int E = epx__chunk<DT>::n;
    int lane = threadIdx.x & 31;
    for (int ch0 = lane; ch0 < chunks; ch0 += 32 * U) {
        uint4 v[NR][U];
#pragma unroll
        for (int i = 0; i < NR; i++)
#pragma unroll
            for (int u = 0; u < U; u++) {
                int ch = ch0 + u * 32;
                if (i < n && ch < chunks) v[i][u] = ((const uint4 *)src[i])[ch];
            }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int ch = ch0 + u * 32;
            if (ch >= chunks) break;
            float acc[E];
#pragma unroll
            for (int j = 0; j < E; j++) acc[j] = 0.0f;
#pragma unroll
            for (int i = 0; i < NR; i++) {
                if (i >= n) break;
                float f[E];
                epx__chunk_unpack<DT>(v[i][u], f);
#pragma unroll
                for (int j = 0; j < E; j++) acc[j] = __fadd_rn(acc[j], f[j]);
            }
            ((uint4 *)out)[ch] = epx__chunk_pack<DT>(acc);
        }
    }
}

/* As epx__reduce_rows for any n: four rows at a time, four chunks of each in flight per
 * lane, the sums carried across the groups of rows. */
template <int DT>
static __device__ __forceinline__ void epx__reduce_rows_many(const char *const *src, int n, char *out, int chunks)
{
    const int E = epx__chunk<DT>::n;
    int lane = threadIdx.x & 31;
    for (int ch0 = lane; ch0 < chunks; ch0 += 32 * 4) {
        float acc[4][E];
#pragma unroll
        for (int u = 0; u < 4; u++)
#pragma unroll
            for (int j = 0; j < E; j++) acc[u][j] = 0.0f;
        for (int i0 = 0; i0 < n; i0 += 4) {
            uint4 v[4][4];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    int ch = ch0 + u * 32;
                    if (i0 + i < n && ch < chunks) v[i][u] = ((const uint4 *)src[i0 + i])[ch];
                }
#pragma unroll
            for (int i = 0; i < 4; i++) {
                if (i0 + i >= n) break;
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    float f[E];
                    epx__chunk_unpack<DT>(v[i][u], f);
#pragma unroll
                    for (int j = 0; j < E; j++) acc[u][j] = __fadd_rn(acc[u][j], f[j]);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int ch = ch0 + u * 32;
            if (ch >= chunks) break;
            ((uint4 *)out)[ch] = epx__chunk_pack<DT>(acc[u]);
        }
    }
}

template <int DT, int MAXR>
static __device__ __forceinline__ void epx__reduce_rows_any(const char *const *src, int n, char *out, int chunks)
{
    if (MAXR <= 2)
        epx__reduce_rows<DT, 2, 4>(src, n, out, chunks);
    else
        epx__reduce_rows_many<DT>(src, n, out, chunks);
}

/* One token of a high-throughput combine, by one warp: out = the n rows src[0..n) summed
 * in that order (float32 from +0, then cast to dtype); out_w[k] = the sum of the non-NULL
 * wsrc[i][k] (0 when none) unless out_w is NULL. Rows whose length is a multiple of 16
 * bytes go 16 bytes at a time when out and every src are 16-byte aligned, else element by
 * element: the same bits either way. DT: the dtype (bf16, f16 or f32), known when
 * compiled; MAXR bounds n. Shared by the single-host combine (moe_kernels.cu) and the
 * combine across hosts (src/xhost), so that they reduce with the same arithmetic. (The
 * low-latency combines sum weighted terms by rank: epx__ll_sum_token.) */
template <int MAXR, int DT>
static __device__ __forceinline__ void epx__moe_reduce_token(const char *const *src, const float *const *wsrc, int n,
                                                             char *out, float *out_w, int H, int topk)
{
    const int E = epx__chunk<DT>::n;
    int lane = threadIdx.x & 31;
    bool vec = H % E == 0 && ((unsigned long long)out & 15ull) == 0;
    for (int i = 0; vec && i < n; i++) vec = ((unsigned long long)src[i] & 15ull) == 0;
    if (vec) {
        epx__reduce_rows_any<DT, MAXR>(src, n, out, H / E);
    } else {
        for (long long h = lane; h < H; h += 32) {
            float acc = 0.0f;
            for (int i = 0; i < n; i++) acc = __fadd_rn(acc, epx__load_elem(src[i], DT, h));
            epx__store_elem(out, DT, h, acc);
        }
    }
    if (out_w && lane < topk) {
        float acc = 0.0f;
        for (int i = 0; i < n; i++)
            if (wsrc[i]) acc = __fadd_rn(acc, wsrc[i][lane]);
        out_w[lane] = acc;
    }
}

/* One warp: quantise channels [lo, lo + 128) of a bf16 row of H to e4m3 with one scale
 * (the CPU backend's arithmetic, see epx__fp8_quantize_row) into q and scales (UE8M0: one
 * byte per block, else float32). */
static __device__ __forceinline__ void epx__ll_quantize_block(const uint16_t *x, int H, int lo, int ue8m0, uint8_t *q,
                                                              char *scales)
{
    int lane = threadIdx.x & 31;
    float v[4], amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int h = lo + lane * 4 + j;
        v[j] = h < H ? epx__bf16_to_f32(x[h]) : 0.0f;
        float m = fabsf(v[j]);
        amax = m > amax ? m : amax; /* NaN never wins */
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m = __shfl_xor_sync(0xffffffffu, amax, o);
        amax = m > amax ? m : amax;
    }
    uint32_t bits;
    float inv = epx__fp8_block_scale(amax, ue8m0, &bits);
    if (lane == 0) {
        if (ue8m0)
            ((uint8_t *)scales)[lo / 128] = (uint8_t)bits;
        else
            ((uint32_t *)scales)[lo / 128] = bits;
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int h = lo + lane * 4 + j;
        if (h < H) q[h] = epx__fp8_from_f32(__fmul_rn(v[j], inv));
    }
}

/* The terms of one token's low-latency combine (epx.h), shared by ll_kernels.cu's combine
 * across hosts (its element-by-element instance) and src/xhost's: term i is
 * w[i] * rows[i], its expert on rank g[i]. epx__ll_add_term, called in ascending k, keeps
 * them by rank ascending, k ascending within a rank (a stable insertion); then
 * epx__ll_sum_token sums them. */
typedef struct {
    const char *rows[EPX_MOE_MAX_TOPK];
    float w[EPX_MOE_MAX_TOPK];
    int g[EPX_MOE_MAX_TOPK], n;
} epx__ll_terms_t;
static __device__ __forceinline__ void epx__ll_add_term(epx__ll_terms_t *o, const char *row, float w, int g)
{
    int i = o->n++;
    for (; i > 0 && o->g[i - 1] > g; i--) o->rows[i] = o->rows[i - 1], o->w[i] = o->w[i - 1], o->g[i] = o->g[i - 1];
    o->rows[i] = row, o->w[i] = w, o->g[i] = g;
}

/* out = cast to dtype of the float32 sum, from +0, over the ranks of o (ascending) of each
 * rank's partial sum (from +0) of its terms, each product rounded before it is added (no
 * FMA). Threads first, first + stride, ... own the channels: one 16-byte chunk at a time when
 * DT is dtype known when compiled and the rows and out allow 16-byte accesses, else one
 * channel at a time (the same bits). */
template <int DT = -1>
static __device__ void epx__ll_sum_token(const epx__ll_terms_t *o, char *out, int H, int dtype, int first, int stride)
{
    int n = o->n;
    if constexpr (DT >= 0) {
        const int E = epx__chunk<DT>::n;
        bool vec = H % E == 0 && ((unsigned long long)out & 15ull) == 0;
        for (int i = 0; vec && i < n; i++) vec = ((unsigned long long)o->rows[i] & 15ull) == 0;
        if (vec) {
            for (int ch = first; ch < H / E; ch += stride) {
                float acc[E], part[E];
#pragma unroll
                for (int j = 0; j < E; j++) acc[j] = part[j] = 0.0f;
                for (int i = 0; i < n; i++) {
                    float f[E];
                    epx__chunk_unpack<DT>(((const uint4 *)o->rows[i])[ch], f);
#pragma unroll
                    for (int j = 0; j < E; j++) part[j] = __fadd_rn(part[j], __fmul_rn(o->w[i], f[j]));
                    if (i + 1 < n && o->g[i + 1] == o->g[i]) continue; /* the rank's partial goes on */
#pragma unroll
                    for (int j = 0; j < E; j++) acc[j] = __fadd_rn(acc[j], part[j]), part[j] = 0.0f;
                }
                ((uint4 *)out)[ch] = epx__chunk_pack<DT>(acc);
            }
            return;
        }
    }
    for (long long h = first; h < H; h += stride) {
        float acc = 0.0f, part = 0.0f;
        for (int i = 0; i < n; i++) {
            part = __fadd_rn(part, __fmul_rn(o->w[i], epx__load_elem(o->rows[i], dtype, h)));
            if (i + 1 < n && o->g[i + 1] == o->g[i]) continue;
            acc = __fadd_rn(acc, part), part = 0.0f;
        }
        epx__store_elem(out, dtype, h, acc);
    }
}

/* One warp: a whole row, block by block. Shared by the single-host low-latency dispatch
 * (ll_kernels.cu); src/xhost quantises by block. */
static __device__ void epx__ll_quantize_row(const uint16_t *x, int H, int ue8m0, uint8_t *q, char *scales)
{
    for (int lo = 0; lo < H; lo += 128) epx__ll_quantize_block(x, H, lo, ue8m0, q, scales);
}

#endif
