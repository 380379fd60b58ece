/*
 * CUDA backend kernels for high-throughput MoE dispatch and combine. Every rank reads the
 * others' routing, token rows and expert outputs through CUDA IPC mappings (NVLink) and
 * writes only its own memory: dispatch pulls the rows it receives, combine pulls each of
 * its tokens' rows and reduces them in registers. The order of every sum is fixed (ranks
 * ascending, float32 from +0, no FMA: build with --fmad=false) so the bits match the CPU
 * backend.
 */
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <string.h>

#include "../core/convert.h"
#include "flags.cuh"
#include "moe_common.cuh"

namespace cg = cooperative_groups;

/* An id in staged routing that is not an expert id in [-1, E). */
#define EPX__BAD_ID (-2147483647 - 1)

/* The ids of n tokens of source p from token t0 on, into ids[n * K] (shared memory), as int:
 * an id outside [-1, E) becomes EPX__BAD_ID. Consecutive threads read consecutive ids and
 * each keeps eight loads in flight: the routing of peers crosses NVLink, where a chain of
 * dependent loads would cost a round trip each. The caller syncs the block after it. */
static __device__ __forceinline__ void epx__stage_ids(const epx__moe_routing_t *r, int p, long long t0, int n, int *ids)
{
    long long K = r->topk, n_ids = (long long)n * K, first = t0 * K;
    for (long long base = 0; base < n_ids; base += 8LL * blockDim.x) {
        long long v[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            long long i = base + (long long)j * blockDim.x + threadIdx.x;
            if (i < n_ids) v[j] = epx__topk_get(r, p, first + i);
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            long long i = base + (long long)j * blockDim.x + threadIdx.x;
            if (i < n_ids) ids[i] = v[j] >= -1 && v[j] < r->num_experts ? (int)v[j] : EPX__BAD_ID;
        }
    }
}

/* The same for n floats from src (top-k weights). */
static __device__ __forceinline__ void epx__stage_floats(const float *src, long long n, float *dst)
{
    for (long long base = 0; base < n; base += 8LL * blockDim.x) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            long long i = base + (long long)j * blockDim.x + threadIdx.x;
            if (i < n) v[j] = src[i];
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            long long i = base + (long long)j * blockDim.x + threadIdx.x;
            if (i < n) dst[i] = v[j];
        }
    }
}

/* Ranks a token with these staged ids goes to, as a bit mask (bad entries ignored). */
static __device__ unsigned epx__dest_mask(const int *ids, int K, int L)
{
    unsigned mask = 0;
    for (int k = 0; k < K; k++)
        if (ids[k] >= 0) mask |= 1u << (ids[k] / L);
    return mask;
}

/* Whether ids[k] already appeared among ids[0 .. k). */
static __device__ __forceinline__ bool epx__seen_before(const int *ids, int k)
{
    for (int j = 0; j < k; j++)
        if (ids[j] == ids[k]) return true;
    return false;
}

/* ---- Counts --------------------------------------------------------------------------------- */

static __global__ void __launch_bounds__(EPX__MOE_CHUNK)
    epx__k_moe_count(epx__moe_routing_t r, int *counts, int *chunk_counts, int chunks, long long *bad, int check_all,
                     int *expert_counts, epx__cuda_dev_t d, int arrive)
{
    __shared__ int cnt[EPX__CUDA_MAX_RANKS];
    __shared__ int ids[EPX__MOE_CHUNK * EPX_MOE_MAX_TOPK];
    int p = (int)blockIdx.y, c = (int)blockIdx.x, K = r.topk;
    if (arrive) epx__arrive(&d, p); /* source p's routing is ready */
    if ((int)threadIdx.x < r.nranks) cnt[threadIdx.x] = 0;
    if (p == 0 && c == 0)
        for (int l = threadIdx.x; l < r.local_experts; l += blockDim.x) expert_counts[l] = 0;
    long long t0 = (long long)c * EPX__MOE_CHUNK, t = t0 + threadIdx.x;
    long long left = (long long)r.num_tokens[p] - t0;
    int n = left <= 0 ? 0 : left < EPX__MOE_CHUNK ? (int)left : EPX__MOE_CHUNK;
    epx__stage_ids(&r, p, t0, n, ids);
    __syncthreads();
    if ((int)threadIdx.x < n) {
        const int *my = ids + threadIdx.x * K;
        if (p == r.rank || check_all)
            for (int k = 0; k < K; k++)
                if (my[k] == EPX__BAD_ID) {
                    atomicMin((unsigned long long *)bad, (unsigned long long)(t * K + k));
                    break;
                }
        unsigned m = epx__dest_mask(my, K, r.local_experts);
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

/* The dev struct a launch passes: the communicator's when the kernel takes steps of the
 * operation, else zeros (never read). */
static epx__cuda_dev_t epx__dev_or_none(const epx__cuda_dev_t *d)
{
    epx__cuda_dev_t none;
    if (d) return *d;
    memset(&none, 0, sizeof none);
    return none;
}

extern "C" int epx__cuda_launch_moe_count(const epx__moe_routing_t *r, int *counts, int *chunk_counts, int chunks,
                                          long long *bad, int check_all, int *expert_counts, const epx__cuda_dev_t *arrive,
                                          void *stream)
{
    dim3 grid((unsigned)chunks, (unsigned)r->nranks);
    (void)cudaGetLastError(); /* what is returned below is this launch's */
    epx__k_moe_count<<<grid, EPX__MOE_CHUNK, 0, (cudaStream_t)stream>>>(*r, counts, chunk_counts, chunks, bad, check_all,
                                                                          expert_counts, epx__dev_or_none(arrive),
                                                                          arrive != NULL);
    return (int)cudaGetLastError();
}

/* ---- Layout (local) -------------------------------------------------------------------------- */

#define EPX__LAYOUT_SHARED 4096 /* the last-block kernel's counters kept in shared memory when R + E fits */
#define EPX__LAYOUT_THREADS 256
#define EPX__LAYOUT_CLUSTER_BLOCKS 16 /* above the portable 8: allowed once per process */
#define EPX__LAYOUT_SMEM(R, E) (sizeof(int) * ((size_t)(R) + (size_t)(E))) /* the counters */

/* Token t of my routing: its K ids loaded at once (one token's ids are contiguous, so a
 * warp's loads share their lines; no shared-memory staging), each expert counted once into
 * c[R + e]. Returns the ranks the token goes to as a bit mask; sets *bad when an id is
 * outside [-1, E) (not counted). */
static __device__ __forceinline__ unsigned epx__layout_token(const epx__moe_routing_t &r, long long t, int *c, bool *bad)
{
    int K = r.topk, E = r.num_experts, R = r.nranks;
    int e[EPX_MOE_MAX_TOPK];
#pragma unroll
    for (int k = 0; k < EPX_MOE_MAX_TOPK; k++)
        if (k < K) {
            long long v = epx__topk_get(&r, r.rank, t * K + k);
            e[k] = v >= -1 && v < E ? (int)v : EPX__BAD_ID;
        }
    unsigned m = 0;
#pragma unroll
    for (int k = 0; k < EPX_MOE_MAX_TOPK; k++) {
        if (k >= K) break;
        if (e[k] == EPX__BAD_ID) *bad = true;
        if (e[k] < 0) continue;
        m |= 1u << (e[k] / r.local_experts);
        if (!epx__seen_before(e, k)) atomicAdd(&c[R + e[k]], 1); /* unrolled: e stays in registers */
    }
    return m;
}

/* Every block's share of my tokens, a token per thread at a time (whole warps together):
 * counts into c ([R] per rank, a warp's at once, then [E] per expert; shared or global
 * memory) and each token's is_token_in_rank row. Returns whether this thread saw an id
 * outside [-1, E). */
static __device__ bool epx__layout_tokens(const epx__moe_routing_t &r, int *c, unsigned char *in_rank)
{
    int R = r.nranks;
    long long T = r.num_tokens[r.rank];
    bool bad = false;
    for (long long t0 = (long long)blockIdx.x * blockDim.x; t0 < T; t0 += (long long)gridDim.x * blockDim.x) {
        long long t = t0 + threadIdx.x;
        unsigned m = t < T ? epx__layout_token(r, t, c, &bad) : 0u;
        for (int q = 0; in_rank && t < T && q < R; q++) in_rank[t * R + q] = (m >> q) & 1u;
        for (int q = 0; q < R; q++) {
            unsigned b = __ballot_sync(0xffffffffu, (m >> q) & 1u);
            if ((threadIdx.x & 31) == 0 && b) atomicAdd(&c[q], __popc(b));
        }
    }
    return bad;
}

/* Block 0's counters as the outputs (-1 in every count when an id was bad). */
static __device__ __forceinline__ void epx__layout_write(const epx__moe_routing_t &r, const int *cnt, bool bad,
                                                         int *per_rank, int *per_expert)
{
    int R = r.nranks;
    for (int i = threadIdx.x; i < R + r.num_experts; i += blockDim.x) {
        int v = bad ? -1 : cnt[i];
        if (i < R && per_rank) per_rank[i] = v;
        if (i >= R && per_expert) per_expert[i - R] = v;
    }
}

/* The cluster barrier in two halves (sm_90): arrive releases this thread's writes (shared
 * memory of the cluster's blocks included), wait acquires every arrived thread's. A thread
 * that exits counts as arrived. */
static __device__ __forceinline__ void epx__cluster_arrive()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release;" ::: "memory");
#endif
}
static __device__ __forceinline__ void epx__cluster_wait()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire;" ::: "memory");
#endif
}

/* The whole layout in one block (C false: looping over T when it must; any device) or in
 * one cluster of blocks (C: sm_90 clusters). Every block counts its share in its shared
 * memory (EPX__LAYOUT_SMEM); in a cluster every other block then adds its counters into block 0's
 * through distributed shared memory and exits, and block 0 writes the counts once they are
 * all in. No global scratch, no grid-wide atomics, one cluster meeting on the path (the
 * first, for block 0's zeros, is long past when it is waited for). */
template <bool C>
static __global__ void __launch_bounds__(EPX__LAYOUT_THREADS)
    epx__k_moe_layout_block(epx__moe_routing_t r, int *per_rank, int *per_expert, unsigned char *in_rank)
{
    extern __shared__ int cnt[];
    __shared__ int bad;
    for (int i = threadIdx.x; i < r.nranks + r.num_experts; i += blockDim.x) cnt[i] = 0;
    if (threadIdx.x == 0) bad = 0;
    if (C) epx__cluster_arrive(); /* block 0's zeros come before the other blocks' adds */
    __syncthreads();
    int any = __syncthreads_or(epx__layout_tokens(r, cnt, in_rank));
    if (!C) {
        epx__layout_write(r, cnt, any, per_rank, per_expert);
        return;
    }
#if __CUDA_ARCH__ >= 900 /* clusters: epx__layout_cluster_most never picks the C instance elsewhere */
    cg::cluster_group cluster = cg::this_cluster();
    bool first = cluster.block_rank() == 0;
    epx__cluster_wait();
    if (!first) {
        int *to = cluster.map_shared_rank(cnt, 0);
        for (int i = threadIdx.x; i < r.nranks + r.num_experts; i += blockDim.x)
            if (cnt[i]) atomicAdd(&to[i], cnt[i]);
    }
    if (threadIdx.x == 0 && any) atomicOr(cluster.map_shared_rank(&bad, 0), 1);
    epx__cluster_arrive(); /* my adds are in block 0's counters */
    if (!first) return;    /* nobody reads my shared memory */
    epx__cluster_wait();
    epx__layout_write(r, cnt, *(volatile int *)&bad != 0, per_rank, per_expert);
#endif
}

/* The same for any R + E and any device, without a grid-wide meeting: every block counts
 * its share (in shared memory when R + E fits, then one global add per counter into
 * `scratch` [R + E], zero between calls); the last block to finish (scratch[R + E] counts
 * them) has every count and the verdict: it writes the counts (-1 when an id was bad) and
 * leaves scratch and *bad ready for the next call. */
static __global__ void __launch_bounds__(EPX__LAYOUT_THREADS)
    epx__k_moe_layout(epx__moe_routing_t r, int *per_rank, int *per_expert, unsigned char *in_rank, long long *bad,
                      int *scratch)
{
    __shared__ int cnt[EPX__LAYOUT_SHARED];
    __shared__ int last;
    int R = r.nranks, E = r.num_experts;
    bool shared = R + E <= EPX__LAYOUT_SHARED;
    int *c = shared ? cnt : scratch;
    for (int i = threadIdx.x; shared && i < R + E; i += blockDim.x) cnt[i] = 0;
    __syncthreads();
    if (epx__layout_tokens(r, c, in_rank)) atomicMin((unsigned long long *)bad, 0ull);
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

/* The largest layout cluster of the current device: 16 blocks where it allows clusters
 * above the portable 8 and 16 fit its SMs, else 8; 0 where the device has no clusters or
 * the cluster kernel was built for an older architecture (the last-block kernel then runs).
 * Asked once per device (the setting that allows 16 stays with the device's context);
 * cfg/attr: the launch's, overwritten. */
static int epx__layout_cluster_most(cudaLaunchConfig_t *cfg, cudaLaunchAttribute *attr)
{
    static int known[64]; /* per device: the answer + 1, 0 while unknown (the same on every thread) */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
    int k = __atomic_load_n(&known[dev], __ATOMIC_RELAXED);
    if (k) return k - 1;
    cudaFuncAttributes fa;
    int clusters = 0;
    if (cudaFuncGetAttributes(&fa, epx__k_moe_layout_block<true>) != cudaSuccess || fa.ptxVersion < 90 ||
        cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, dev) != cudaSuccess || !clusters) {
        (void)cudaGetLastError(); /* a refusal is no launch's error */
        __atomic_store_n(&known[dev], 1, __ATOMIC_RELAXED);
        return 0;
    }
    int most = 8, fits = 0;
    attr->val.clusterDim.x = EPX__LAYOUT_CLUSTER_BLOCKS;
    cfg->gridDim = dim3(EPX__LAYOUT_CLUSTER_BLOCKS);
    if (cudaFuncSetAttribute(epx__k_moe_layout_block<true>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveClusters(&fits, epx__k_moe_layout_block<true>, cfg) != cudaSuccess)
        (void)cudaGetLastError(); /* a refusal is no launch's error */
    else if (fits >= 1)
        most = EPX__LAYOUT_CLUSTER_BLOCKS;
    __atomic_store_n(&known[dev], most + 1, __ATOMIC_RELAXED);
    return most;
}

extern "C" int epx__cuda_launch_moe_layout_checked(const epx__moe_routing_t *r, int *per_rank, int *per_expert,
                                                   unsigned char *in_rank, long long *bad, int *scratch, int blocks,
                                                   void *stream)
{
    long long T = r->num_tokens[r->rank];
    long long need = (T + EPX__LAYOUT_THREADS - 1) / EPX__LAYOUT_THREADS;
    size_t smem = EPX__LAYOUT_SMEM(r->nranks, r->num_experts);
    bool fits = smem + 64 <= 48 * 1024; /* 64: static shared memory */
    (void)cudaGetLastError();           /* what is returned below is this launch's */
    if (fits && (need <= 1 || blocks <= 1)) { /* one block, looping over T when it must */
        epx__k_moe_layout_block<false>
            <<<1, EPX__LAYOUT_THREADS, smem, (cudaStream_t)stream>>>(*r, per_rank, per_expert, in_rank);
        return (int)cudaGetLastError();
    }
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.blockDim = dim3(EPX__LAYOUT_THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = (cudaStream_t)stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int most = fits ? epx__layout_cluster_most(&cfg, attr) : 0;
    if (most > 0) {
        int nb = (int)(need < most ? need : most);
        if (nb > blocks) nb = blocks > 0 ? blocks : 1;
        attr[0].val.clusterDim.x = (unsigned)nb;
        cfg.gridDim = dim3((unsigned)nb);
        if (cudaLaunchKernelEx(&cfg, epx__k_moe_layout_block<true>, *r, per_rank, per_expert, in_rank) == cudaSuccess)
            return (int)cudaSuccess;
        (void)cudaGetLastError(); /* refused (a cluster shape the device does not take): the kernel below */
    }
    if (blocks > need) blocks = (int)(need > 0 ? need : 1);
    epx__k_moe_layout<<<blocks, EPX__LAYOUT_THREADS, 0, (cudaStream_t)stream>>>(*r, per_rank, per_expert, in_rank, bad, scratch);
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
static __device__ void epx__moe_rows_chunk(const epx__moe_routing_t &r, const epx__moe_rows_out_t &o, int p, int c)
{
    __shared__ int ids[EPX__MOE_CHUNK * EPX_MOE_MAX_TOPK];
    __shared__ float w[EPX__MOE_CHUNK * EPX_MOE_MAX_TOPK];
    int me = r.rank, R = r.nranks, K = r.topk, L = r.local_experts;
    long long T = r.num_tokens[p], t0 = (long long)c * EPX__MOE_CHUNK, t = t0 + threadIdx.x;
    int n = T - t0 < EPX__MOE_CHUNK ? (int)(T - t0) : EPX__MOE_CHUNK;
    const float *weights = o.recv_topk_weights ? r.weights[p] : (const float *)0;
    epx__stage_ids(&r, p, t0, n, ids);
    if (weights) epx__stage_floats(weights + t0 * K, (long long)n * K, w);
    __syncthreads();
    const int *my = ids + threadIdx.x * K;
    unsigned mask = t < T ? epx__dest_mask(my, K, L) : 0u;
    int flag = (mask >> me) & 1u, total;
    int pos = epx__block_scan(flag, &total);
    if (flag) {
        long long row = epx__rows_before(&o, R, p, c, me) + pos;
        o.h_src_rank[row] = p;
        o.h_src_token[row] = (int)t;
        if (o.recv_src_rank) o.recv_src_rank[row] = p;
        if (o.recv_src_token) o.recv_src_token[row] = (int)t;
        for (int k = 0; k < K; k++) {
            int e = my[k];
            bool here = e >= 0 && e / L == me;
            int local = here ? e % L : -1;
            if (o.recv_topk_idx) {
                if (r.index_i64)
                    ((long long *)o.recv_topk_idx)[row * K + k] = local;
                else
                    ((int *)o.recv_topk_idx)[row * K + k] = local;
            }
            if (weights) o.recv_topk_weights[row * K + k] = here ? w[threadIdx.x * K + k] : 0.0f;
            if (here && !epx__seen_before(my, k)) atomicAdd(&o.expert_counts[local], 1);
        }
    }
    if (p != me) return;
    for (int q = 0; q < R; q++) {
        int f = (mask >> q) & 1u, tot;
        int at = epx__block_scan(f, &tot);
        if (t < T) o.h_send_row[t * R + q] = f ? (int)(epx__rows_before(&o, R, me, c, q) + at) : -1;
    }
}

static __global__ void __launch_bounds__(EPX__MOE_CHUNK) epx__k_moe_rows(epx__moe_routing_t r, epx__moe_rows_out_t o)
{
    __shared__ int last;
    int p = (int)blockIdx.y, c = (int)blockIdx.x, me = r.rank, R = r.nranks;
    bool clean = *(volatile long long *)o.bad == EPX__MOE_NO_BAD;
    if (p == 0 && c == 0 && threadIdx.x == 0) {
        long long n = 0;
        for (int s = 0; s < R; s++) n += o.counts[s * R + me];
        *o.h_rows = clean ? n : -1;
        if (o.num_recv) *o.num_recv = clean ? n : -1;
    }
    if (clean && (long long)c * EPX__MOE_CHUNK < r.num_tokens[p]) epx__moe_rows_chunk(r, o, p, c);
    /* The last block: every block has read counts and *bad and added its expert counts. */
    __syncthreads();
    int *done = o.counts + R * R;
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(done, 1) == (int)(gridDim.x * gridDim.y) - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int l = threadIdx.x; clean && o.per_expert && l < r.local_experts; l += blockDim.x) {
        int v = *(volatile int *)&o.expert_counts[l];
        o.per_expert[l] = (v + o.align - 1) / o.align * o.align;
    }
    for (int i = threadIdx.x; i <= R * R; i += blockDim.x) o.counts[i] = 0;
    if (threadIdx.x == 0) *o.bad = EPX__MOE_NO_BAD;
}

extern "C" int epx__cuda_launch_moe_rows(const epx__moe_routing_t *r, const epx__moe_rows_out_t *o, void *stream)
{
    dim3 grid((unsigned)o->chunks, (unsigned)r->nranks);
    epx__k_moe_rows<<<grid, EPX__MOE_CHUNK, 0, (cudaStream_t)stream>>>(*r, *o);
    return (int)cudaGetLastError();
}

/* ---- Gather --------------------------------------------------------------------------------- */

/* Rows are grouped by source: odd warps walk them from the end, so that reads from the
 * last sources (over NVLink) and from the first ones (often local) are in flight together.
 * Without the ARRIVE step the peers' x is read with plain loads and no acquire here: the
 * count kernel, earlier on this stream, acquired every source's ARRIVE of this operation
 * (epx__arrive), and a peer writes its x again only after my DONE of it. */
static __device__ void epx__gather_row(const epx__moe_gather_t *g, long long row)
{
    int p = g->src_rank[row];
    long long t = g->src_token[row];
    epx__warp_copy(g->recv_x + row * g->row_bytes, g->x[p] + t * g->row_bytes, g->row_bytes);
    if (g->recv_scales && g->scales[p])
        epx__warp_copy(g->recv_scales + row * g->scale_bytes, g->scales[p] + t * g->scale_bytes, g->scale_bytes);
}

static __global__ void __launch_bounds__(1024) epx__k_moe_gather(epx__moe_gather_t g, epx__cuda_dev_t d, int steps)
{
    if (steps & EPX__STEP_ARRIVE) epx__arrive(&d, -1);
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    long long fw = (nwarps + 1) / 2, bw = nwarps / 2, idx = warp >> 1, rows = *g.rows;
    long long split = bw ? (rows + 1) / 2 : rows;
    if (!(warp & 1) || !bw) {
        for (long long row = bw ? idx : warp; row < split; row += bw ? fw : nwarps) epx__gather_row(&g, row);
    } else {
        for (long long row = rows - 1 - idx; row >= split; row -= bw) epx__gather_row(&g, row);
    }
    if (steps & EPX__STEP_DONE) epx__done(&d);
}

extern "C" int epx__cuda_launch_moe_gather(const epx__moe_gather_t *g, const epx__cuda_dev_t *d, int steps, int blocks,
                                           void *stream)
{
    (void)cudaGetLastError(); /* what is returned below is this launch's */
    epx__k_moe_gather<<<blocks, 1024, 0, (cudaStream_t)stream>>>(*g, epx__dev_or_none(d), d ? steps : 0);
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

/* ---- Staging copy (an input CUDA IPC cannot share, its row count on the device) --------------- */

/* One warp per row. */
static __global__ void __launch_bounds__(512)
    epx__k_copy_rows(char *dst, const char *src, const long long *rows, long long max_rows, long long row_bytes)
{
    long long n = *rows < 0 ? 0 : *rows < max_rows ? *rows : max_rows;
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long r = warp; r < n; r += nwarps) epx__warp_copy(dst + r * row_bytes, src + r * row_bytes, row_bytes);
}

extern "C" int epx__cuda_launch_copy_rows(void *dst, const void *src, const long long *rows, long long max_rows,
                                          long long row_bytes, int blocks, void *stream)
{
    if (max_rows <= 0 || row_bytes <= 0) return (int)cudaSuccess;
    (void)cudaGetLastError(); /* what is returned below is this launch's */
    epx__k_copy_rows<<<blocks, 512, 0, (cudaStream_t)stream>>>((char *)dst, (const char *)src, rows, max_rows,
                                                                row_bytes);
    return (int)cudaGetLastError();
}

/* ---- Combine -------------------------------------------------------------------------------- */

/* One warp per token. Rows of a multiple of 16 bytes go 16 bytes at a time, four chunks of
 * every contributing rank in flight per lane; other shapes element by element. DT is
 * c.dtype: one instance per dtype keeps each in its register bound without spills. */
template <int MAXR, int DT>
static __global__ void __launch_bounds__(MAXR <= 2 ? 1024 : 512)
    epx__k_moe_combine(epx__moe_combine_t c, epx__cuda_dev_t d, int steps)
{
    if (steps & EPX__STEP_ARRIVE) epx__arrive(&d, -1);
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    int R = c.nranks, H = c.hidden, lane = threadIdx.x & 31;
    long long es = DT == EPX_F32 ? 4 : 2, row_bytes = (long long)H * es;
    /* Nothing to combine when the dispatch found bad routing (rows < 0). Lane r reads where
     * the token's row at rank r lies (R <= 32): one load, not R in a row, issued a token ahead. */
    long long T = *c.rows < 0 ? 0 : c.num_tokens;
    int next = lane < R && warp < T ? c.send_row[warp * R + lane] : -1;
    for (long long t = warp; t < T; t += nwarps) {
        const char *src[MAXR];
        const float *wsrc[MAXR];
        int n = 0, my_row = next;
        next = lane < R && t + nwarps < T ? c.send_row[(t + nwarps) * R + lane] : -1;
        for (int r = 0; r < R; r++) {
            int row = __shfl_sync(0xffffffffu, my_row, r);
            if (row < 0) continue;
            long long at = (long long)row - c.row_base[r];
            src[n] = c.y[r] + at * row_bytes;
            wsrc[n++] = c.w[r] ? c.w[r] + at * c.topk : (const float *)0;
        }
        epx__moe_reduce_token<MAXR, DT>(src, wsrc, n, c.out + t * row_bytes, c.out_w ? c.out_w + t * c.topk : (float *)0,
                                        H, c.topk);
    }
    if (steps & EPX__STEP_DONE) epx__done(&d);
}

template <int DT>
static void epx__launch_moe_combine(const epx__moe_combine_t *c, const epx__cuda_dev_t *d, int steps, int blocks,
                                    cudaStream_t stream)
{
    if (c->nranks <= 2) /* at most two rows a token: half the registers, twice the warps */
        epx__k_moe_combine<2, DT><<<blocks, 1024, 0, stream>>>(*c, epx__dev_or_none(d), steps);
    else
        epx__k_moe_combine<EPX__CUDA_MAX_RANKS, DT><<<blocks, 512, 0, stream>>>(*c, epx__dev_or_none(d), steps);
}

extern "C" int epx__cuda_launch_moe_combine(const epx__moe_combine_t *c, const epx__cuda_dev_t *d, int steps, int blocks,
                                            void *stream)
{
    if (!d) steps = 0;
    if (c->num_tokens == 0 && !steps) return (int)cudaSuccess;
    (void)cudaGetLastError(); /* what is returned below is this launch's */
    switch (c->dtype) {
    case EPX_BF16: epx__launch_moe_combine<EPX_BF16>(c, d, steps, blocks, (cudaStream_t)stream); break;
    case EPX_F16: epx__launch_moe_combine<EPX_F16>(c, d, steps, blocks, (cudaStream_t)stream); break;
    default: epx__launch_moe_combine<EPX_F32>(c, d, steps, blocks, (cudaStream_t)stream); break;
    }
    return (int)cudaGetLastError();
}
