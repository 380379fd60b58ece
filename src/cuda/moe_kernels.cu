/*
 * CUDA backend kernels for high-throughput MoE dispatch and combine. Every rank reads the
 * others' routing, token rows and expert outputs through CUDA IPC mappings (NVLink) and
 * writes only its own memory: dispatch pulls the rows it receives, combine pulls each of
 * its tokens' rows and reduces them in registers. The order of every sum is fixed (ranks
 * ascending, float32 from +0, no FMA: build with --fmad=false) so the bits match the CPU
 * backend.
 */
#include <cuda_runtime.h>

#include "../core/convert.h"
#include "moe_common.cuh"

/* Ranks token t of source p goes to, as a bit mask (entries out of range ignored). */
static __device__ unsigned epx__dest_mask(const epx__moe_routing_t *r, int p, long long t)
{
    unsigned mask = 0;
    for (int k = 0; k < r->topk; k++) {
        long long e = epx__topk_get(r, p, t * r->topk + k);
        if (e >= 0 && e < r->num_experts) mask |= 1u << (int)(e / r->local_experts);
    }
    return mask;
}

/* ---- Counts --------------------------------------------------------------------------------- */

static __global__ void __launch_bounds__(EPX__MOE_CHUNK)
    epx__k_moe_count(epx__moe_routing_t r, int *counts, int *chunk_counts, int chunks, long long *bad, int check_all)
{
    __shared__ int cnt[EPX__CUDA_MAX_RANKS];
    int p = (int)blockIdx.y, c = (int)blockIdx.x;
    if ((int)threadIdx.x < r.nranks) cnt[threadIdx.x] = 0;
    __syncthreads();
    long long t = (long long)c * EPX__MOE_CHUNK + threadIdx.x;
    if (t < r.num_tokens[p]) {
        if (p == r.rank || check_all)
            for (int k = 0; k < r.topk; k++) {
                long long e = epx__topk_get(&r, p, t * r.topk + k);
                if (e < -1 || e >= r.num_experts) atomicMin((unsigned long long *)bad, (unsigned long long)(t * r.topk + k));
            }
        unsigned m = epx__dest_mask(&r, p, t);
        while (m) {
            int q = __ffs(m) - 1;
            m &= m - 1;
            atomicAdd(&cnt[q], 1);
        }
    }
    __syncthreads();
    int q = (int)threadIdx.x;
    if (q < r.nranks) {
        chunk_counts[((long long)p * chunks + c) * r.nranks + q] = cnt[q];
        if (cnt[q]) atomicAdd(&counts[p * r.nranks + q], cnt[q]);
    }
}

extern "C" int epx__cuda_launch_moe_count(const epx__moe_routing_t *r, int *counts, int *chunk_counts, int chunks,
                                          long long *bad, int check_all, void *stream)
{
    dim3 grid((unsigned)chunks, (unsigned)r->nranks);
    epx__k_moe_count<<<grid, EPX__MOE_CHUNK, 0, (cudaStream_t)stream>>>(*r, counts, chunk_counts, chunks, bad, check_all);
    return (int)cudaGetLastError();
}

/* ---- Layout (local) -------------------------------------------------------------------------- */

/* The whole layout in one launch, without a grid-wide meeting: every block checks and
 * counts its share of the tokens (in shared memory, then one global add per counter into
 * `scratch` [R + E], zero between calls) and writes their is_token_in_rank; the last block
 * to finish (scratch[R + E] counts them) has every count and the verdict: it writes the
 * counts (-1 when an id was bad) and leaves scratch and *bad ready for the next call. */
#define EPX__LAYOUT_SHARED 4096 /* counters kept in shared memory when R + E fits */
static __global__ void __launch_bounds__(512)
    epx__k_moe_layout(epx__moe_routing_t r, int *per_rank, int *per_expert, unsigned char *in_rank, long long *bad,
                      int *scratch)
{
    __shared__ int cnt[EPX__LAYOUT_SHARED];
    __shared__ int last;
    int me = r.rank, R = r.nranks, K = r.topk, E = r.num_experts;
    long long T = r.num_tokens[me], tid = (long long)blockIdx.x * blockDim.x + threadIdx.x,
              nthreads = (long long)gridDim.x * blockDim.x;
    bool shared = R + E <= EPX__LAYOUT_SHARED;
    int *c = shared ? cnt : scratch; /* [R] per rank, then [E] per expert */
    for (int i = threadIdx.x; shared && i < R + E; i += blockDim.x) cnt[i] = 0;
    __syncthreads();
    bool bad_seen = false;
    for (long long t = tid; t < T; t += nthreads) {
        unsigned m = 0;
        for (int k = 0; k < K; k++) {
            long long e = epx__topk_get(&r, me, t * K + k);
            if (e < -1 || e >= E) {
                bad_seen = true;
                continue;
            }
            if (e < 0) continue;
            m |= 1u << (int)(e / r.local_experts);
            bool dup = false;
            for (int j = 0; j < k; j++) dup = dup || epx__topk_get(&r, me, t * K + j) == e;
            if (!dup) atomicAdd(&c[R + e], 1);
        }
        for (int q = 0; in_rank && q < R; q++) in_rank[t * R + q] = (m >> q) & 1u;
        while (m) {
            int q = __ffs(m) - 1;
            m &= m - 1;
            atomicAdd(&c[q], 1);
        }
    }
    if (bad_seen) atomicMin((unsigned long long *)bad, 0ull);
    __syncthreads();
    for (int i = threadIdx.x; shared && i < R + E; i += blockDim.x)
        if (cnt[i]) atomicAdd(&scratch[i], cnt[i]);
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(&scratch[R + E], 1) == (int)gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    bool clean = *(volatile long long *)bad == EPX__MOE_NO_BAD;
    for (int i = threadIdx.x; i < R + E; i += blockDim.x) {
        int v = clean ? *(volatile int *)&scratch[i] : -1;
        if (i < R && per_rank) per_rank[i] = v;
        if (i >= R && per_expert) per_expert[i - R] = v;
        scratch[i] = 0;
    }
    if (threadIdx.x == 0) {
        *bad = EPX__MOE_NO_BAD;
        scratch[R + E] = 0;
    }
}

extern "C" int epx__cuda_launch_moe_layout_checked(const epx__moe_routing_t *r, int *per_rank, int *per_expert,
                                                   unsigned char *in_rank, long long *bad, int *scratch, int blocks,
                                                   void *stream)
{
    long long need = ((long long)r->num_tokens[r->rank] + 511) / 512;
    if (blocks > need) blocks = (int)(need > 0 ? need : 1);
    epx__k_moe_layout<<<blocks, 512, 0, (cudaStream_t)stream>>>(*r, per_rank, per_expert, in_rank, bad, scratch);
    return (int)cudaGetLastError();
}

/* ---- Rows ----------------------------------------------------------------------------------- */

/* Rows before chunk c of source p bound for rank q: every earlier source's tokens for q,
 * then source p's earlier chunks'. */
static __device__ long long epx__rows_before(const epx__moe_rows_out_t *o, int R, int p, int c, int q)
{
    long long n = 0;
    for (int s = 0; s < p; s++) n += o->counts[s * R + q];
    for (int i = 0; i < c; i++) n += o->chunk_counts[((long long)p * o->chunks + i) * R + q];
    return n;
}

/* Block (c, p) lays out the rows chunk c of source p sends me; the blocks of my own source
 * also compute where each of my tokens lands at every rank. */
static __global__ void __launch_bounds__(EPX__MOE_CHUNK) epx__k_moe_rows(epx__moe_routing_t r, epx__moe_rows_out_t o)
{
    int p = (int)blockIdx.y, c = (int)blockIdx.x, me = r.rank, R = r.nranks, K = r.topk, L = r.local_experts;
    long long T = r.num_tokens[p], t = (long long)c * EPX__MOE_CHUNK + threadIdx.x;
    bool clean = *o.bad == EPX__MOE_NO_BAD;
    if (p == 0 && c == 0 && threadIdx.x == 0) {
        long long n = 0;
        for (int s = 0; s < R; s++) n += o.counts[s * R + me];
        *o.h_rows = clean ? n : -1;
        if (o.num_recv) *o.num_recv = clean ? n : -1;
    }
    if (!clean || (long long)c * EPX__MOE_CHUNK >= T) return;
    unsigned mask = t < T ? epx__dest_mask(&r, p, t) : 0u;
    int flag = (mask >> me) & 1u, total;
    int pos = epx__block_scan(flag, &total);
    if (flag) {
        long long row = epx__rows_before(&o, R, p, c, me) + pos;
        o.h_src_rank[row] = p;
        o.h_src_token[row] = (int)t;
        if (o.recv_src_rank) o.recv_src_rank[row] = p;
        if (o.recv_src_token) o.recv_src_token[row] = (int)t;
        for (int k = 0; k < K; k++) {
            long long e = epx__topk_get(&r, p, t * K + k);
            bool here = e >= 0 && e / L == me;
            long long local = here ? e % L : -1;
            if (o.recv_topk_idx) {
                if (r.index_i64)
                    ((long long *)o.recv_topk_idx)[row * K + k] = local;
                else
                    ((int *)o.recv_topk_idx)[row * K + k] = (int)local;
            }
            if (o.recv_topk_weights && r.weights[p]) o.recv_topk_weights[row * K + k] = here ? r.weights[p][t * K + k] : 0.0f;
            if (!here) continue;
            bool dup = false;
            for (int j = 0; j < k; j++) dup = dup || epx__topk_get(&r, p, t * K + j) == e;
            if (!dup) atomicAdd(&o.expert_counts[local], 1);
        }
    }
    if (p != me) return;
    for (int q = 0; q < R; q++) {
        int f = (mask >> q) & 1u, tot;
        int at = epx__block_scan(f, &tot);
        if (t < T) o.h_send_row[t * R + q] = f ? (int)(epx__rows_before(&o, R, me, c, q) + at) : -1;
    }
}

extern "C" int epx__cuda_launch_moe_rows(const epx__moe_routing_t *r, const epx__moe_rows_out_t *o, void *stream)
{
    dim3 grid((unsigned)o->chunks, (unsigned)r->nranks);
    epx__k_moe_rows<<<grid, EPX__MOE_CHUNK, 0, (cudaStream_t)stream>>>(*r, *o);
    return (int)cudaGetLastError();
}

static __global__ void epx__k_moe_align(const int *counts, int *out, int L, int align, const long long *rows)
{
    if (*rows < 0) return;
    for (int l = threadIdx.x; l < L; l += blockDim.x) out[l] = (counts[l] + align - 1) / align * align;
}

extern "C" int epx__cuda_launch_moe_align(const int *expert_counts, int *out, int L, int align, const long long *rows,
                                          void *stream)
{
    epx__k_moe_align<<<1, 256, 0, (cudaStream_t)stream>>>(expert_counts, out, L, align, rows);
    return (int)cudaGetLastError();
}

/* ---- Gather --------------------------------------------------------------------------------- */

/* Rows are grouped by source: odd warps walk them from the end, so that reads from the
 * last sources (over NVLink) and from the first ones (often local) are in flight together. */
static __device__ void epx__gather_row(const epx__moe_gather_t *g, long long row)
{
    int p = g->src_rank[row];
    long long t = g->src_token[row];
    epx__warp_copy(g->recv_x + row * g->row_bytes, g->x[p] + t * g->row_bytes, g->row_bytes);
    if (g->recv_scales && g->scales[p])
        epx__warp_copy(g->recv_scales + row * g->scale_bytes, g->scales[p] + t * g->scale_bytes, g->scale_bytes);
}

static __global__ void __launch_bounds__(1024) epx__k_moe_gather(epx__moe_gather_t g)
{
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    long long fw = (nwarps + 1) / 2, bw = nwarps / 2, idx = warp >> 1, rows = *g.rows;
    long long split = bw ? (rows + 1) / 2 : rows;
    if (!(warp & 1) || !bw) {
        for (long long row = bw ? idx : warp; row < split; row += bw ? fw : nwarps) epx__gather_row(&g, row);
    } else {
        for (long long row = rows - 1 - idx; row >= split; row -= bw) epx__gather_row(&g, row);
    }
}

extern "C" int epx__cuda_launch_moe_gather(const epx__moe_gather_t *g, int blocks, void *stream)
{
    epx__k_moe_gather<<<blocks, 1024, 0, (cudaStream_t)stream>>>(*g);
    return (int)cudaGetLastError();
}

/* ---- Pack (copy-engine dispatch) -------------------------------------------------------------- */

/* One warp per token: its row (and scales) to each destination of the pass. */
static __global__ void __launch_bounds__(512) epx__k_moe_pack(epx__moe_pack_t k)
{
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    int R = k.nranks;
    for (long long t = k.t0 + warp; t < k.t1; t += nwarps) {
        const char *src = k.x + t * k.row_bytes;
        /* self: q = me only; else every other rank, from me + 1 on */
        for (int i = k.self ? 0 : 1; i < (k.self ? 1 : R); i++) {
            int q = (k.rank + i) % R, row = k.send_row[t * R + q];
            if (row < 0) continue;
            long long at = (long long)row - k.base[q];
            epx__warp_copy(k.dst[q] + at * k.row_bytes, src, k.row_bytes);
            if (k.scales) epx__warp_copy(k.dst_s[q] + at * k.scale_bytes, k.scales + t * k.scale_bytes, k.scale_bytes);
        }
    }
}

extern "C" int epx__cuda_launch_moe_pack(const epx__moe_pack_t *k, int blocks, void *stream)
{
    long long need = ((long long)(k->t1 - k->t0) * 32 + 511) / 512;
    if (need <= 0) return (int)cudaSuccess;
    if (blocks > need) blocks = (int)need;
    epx__k_moe_pack<<<blocks, 512, 0, (cudaStream_t)stream>>>(*k);
    return (int)cudaGetLastError();
}

/* ---- Combine -------------------------------------------------------------------------------- */

/* One warp per token. bf16 rows of a multiple of 8 elements go 16 bytes at a time, four
 * chunks of every contributing rank in flight per lane; other shapes element by element. */
static __global__ void __launch_bounds__(512) epx__k_moe_combine(epx__moe_combine_t c)
{
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    int R = c.nranks, H = c.hidden;
    long long es = c.dtype == EPX_F32 ? 4 : 2, row_bytes = (long long)H * es;
    if (*c.rows < 0) return; /* the dispatch found bad routing: nothing to combine */
    for (long long t = warp; t < c.num_tokens; t += nwarps) {
        const char *src[EPX__CUDA_MAX_RANKS];
        const float *wsrc[EPX__CUDA_MAX_RANKS];
        int n = 0;
        for (int r = 0; r < R; r++) {
            int row = c.send_row[t * R + r];
            if (row < 0) continue;
            long long at = (long long)row - c.row_base[r];
            src[n] = c.y[r] + at * row_bytes;
            wsrc[n++] = c.w[r] ? c.w[r] + at * c.topk : (const float *)0;
        }
        bool vec = c.dtype == EPX_BF16 && (H % 8) == 0 && ((unsigned long long)c.out & 15ull) == 0;
        epx__moe_reduce_token(src, wsrc, n, c.out + t * row_bytes, c.out_w ? c.out_w + t * c.topk : (float *)0, H,
                              c.dtype, c.topk, vec);
    }
}

extern "C" int epx__cuda_launch_moe_combine(const epx__moe_combine_t *c, int blocks, void *stream)
{
    if (c->num_tokens > 0) epx__k_moe_combine<<<blocks, 512, 0, (cudaStream_t)stream>>>(*c);
    return (int)cudaGetLastError();
}
