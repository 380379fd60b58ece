/*
 * epx-bench moe --backend cuda: epx's high-throughput MoE (layout, dispatch, combine) on the
 * CUDA backend against the same routing done with NCCL, in the same processes, on the same
 * device inputs, iterations alternating between the two.
 *
 * One rank per GPU (device = EPX_LOCAL_RANK % number of GPUs). Times come from CUDA events
 * on the caller's stream around the call, after a 512 MiB memset that flushes L2 and then a
 * device-side barrier (epx_barrier); median over the iterations of the max over ranks (through the host
 * communicator). epx's dispatch reads a count matrix back once (a stream synchronisation),
 * and so does the baseline's: both event times include it.
 *
 * The baseline (built with NCCL): dispatch = a routing kernel (per destination rank, each
 * token's row in the packed send buffer, and the counts), ncclAllGather of the counts with a
 * host read-back to size the receives, a pack kernel copying every token once per
 * destination rank (rank-major, tokens ascending: epx's row order), grouped ncclSend /
 * ncclRecv of the rows (as bytes: H elements of --dtype), FP8 scales and [token, local ids,
 * weights] records, and an unpack kernel for the routing outputs; combine = grouped ncclSend
 * / ncclRecv of the expert outputs back to their tokens' ranks, then a reduce kernel summing
 * each token's rows in ascending rank order in float32 from +0.0f (no FMA: built with
 * --fmad=false) and casting to the combine dtype (--combine-dtype: bf16, f16 or f32) with
 * round-to-nearest-even, the math of epx, so the outputs compare bitwise. Its layout is one
 * plain kernel.
 *
 * Data: the tokens, routing and weights are the CPU bench's (bench_moe.c): a pure function
 * of (seed, rank, token), so every rank regenerates every rank's data on the host and
 * checks every output value. Expert outputs y of a received row are the row times a factor
 * of the receiving rank, computed on the host from the expected rows, so the combine's
 * reference is known exactly too.
 *
 * Written in C style; compiled as CUDA C by nvcc (sm_90, --fmad=false).
 */
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifdef EPX_HAVE_NCCL
#include <nccl.h>
#endif

#include "bench.h"
#include "bench_moe_common.h"

#define SCALE_BLOCK BENCH_MOE_SCALE_BLOCK
#define MAX_RANKS 32          /* ranks of one host on the CUDA backend (EPX__CUDA_MAX_RANKS) */
#define WAIT_LIMIT_S 360.0    /* a longer wait for the device is reported as a hang (past EPX_TIMEOUT_MS) */
#define FLUSH_BYTES ((size_t)512 << 20)

/* ---- State ------------------------------------------------------------------------------------ */

#ifdef EPX_HAVE_NCCL
typedef struct { /* the NCCL baseline: buffers and the routing of its last dispatch */
    int32_t *d_pos;     /* [T, R]: row of token t in the segment it sends rank r, or -1 */
    int32_t *d_cnt;     /* [R]: tokens I send each rank */
    int32_t *d_cnt_all; /* [R, R]: everyone's, by ncclAllGather */
    int32_t *h_cnt_all; /* pinned read-back */
    uint8_t *d_sendx;   /* [maxsend, row] */
    float *d_sends;     /* [maxsend, S] (fp8) */
    int32_t *d_smeta, *d_rmeta; /* [rows, 1 + 2K]: token, K local ids, K weights (bits) */
    uint8_t *d_crecv;   /* [maxsend, y_row]: expert outputs of my tokens, send order */
    cudaEvent_t counted; /* the counts have landed on the host */
    int64_t scount[MAX_RANKS], sdispl[MAX_RANKS + 1], rcount[MAX_RANKS], rdispl[MAX_RANKS + 1];
    int64_t n;
} baseline_t;
#endif

typedef struct {
    bench_ctx_t *b;
    bench_moe_data_t d; /* sizes, FP8 and every rank's routing (bench_moe_common.h; always ht) */
    int dev, ndev, sms;
    bool nccl;
    size_t row;      /* bytes of one token row: H of FP8 or of the tokens' dtype (d.xdt) */
    size_t wire_row; /* row + its scales */
    size_t y_row;    /* one row of y / out in the combine dtype (d.cdt): H elements */
    int64_t cap;     /* rows of the dispatch outputs (epx_moe_max_recv_tokens) */
    int64_t n_exp;   /* rows this rank should receive */
    int64_t *h_idx;  /* [T, K] this rank's topk_idx (host copy) */

    /* device */
    epx_comm_t gpu;
    epx_moe_t moe;
    cudaStream_t stream;
    cudaEvent_t ev0, ev1;
    void *flush;
    uint8_t *d_x;
    float *d_xs, *d_w;
    int64_t *d_idx;
    uint8_t *d_y;
    ht_out_t d_out[2];  /* 0: epx, 1: baseline */
    layout_out_t d_lay[2];
    uint8_t *d_cout[2];
    epx_moe_handle_t h, h_new; /* the last epx dispatch's handle; the one being made */
    int64_t *d_count;          /* epx's num_recv_tokens_device, or NULL (--count host) */
    /* --mode ll: epx runs low-latency dispatch/combine (d.xdt input; with --dtype fp8 bf16,
     * quantised to FP8 by the dispatch); the baseline exchanges the same routing as in ht mode. */
    bool ll;
    uint8_t *ll_x, *ll_recv, *ll_y;
    float *ll_scales;
    int32_t *ll_count, *ll_src_rank, *ll_src_token;
    size_t ll_slots;
    double epx_mem;            /* device memory the epx comm + MoE context took (bytes) */
#ifdef EPX_HAVE_NCCL
    ncclComm_t nc;
    baseline_t bl;
#endif
} gm_t;

/* ---- Failing clearly ---------------------------------------------------------------------- */

static void gm_fail(gm_t *m, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void gm_fail(gm_t *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "epx-bench moe --backend cuda: rank %d: ", m ? m->d.me : -1);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    fflush(stderr);
    fflush(stdout);
    /* Peers waiting on this rank fail promptly instead of timing out. */
    if (m && m->gpu) epx_comm_abort(m->gpu);
    if (m && m->b && m->b->comm) epx_comm_abort(m->b->comm);
    _exit(3);
}

static void cuda_ok(gm_t *m, cudaError_t e, const char *what)
{
    if (e != cudaSuccess) gm_fail(m, "%s failed: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

#define CK(m, call) cuda_ok((m), (call), #call)
/* After a kernel launch: a bad configuration shows here, a fault at the next wait. */
#define LAUNCHED(m, name) cuda_ok((m), cudaGetLastError(), "launch of kernel " name)

static void epx_ok(gm_t *m, epx_status_t st, const char *what)
{
    if (st == EPX_SUCCESS) return;
    const char *msg = m->gpu ? epx_comm_get_last_error(m->gpu) : "";
    if (!msg || !*msg) msg = epx_get_last_error();
    gm_fail(m, "%s failed: %s", what, bench_status_text(st, msg));
}

#ifdef EPX_HAVE_NCCL
static void nccl_ok(gm_t *m, ncclResult_t r, const char *what)
{
    if (r == ncclSuccess) return;
    const char *last = "";
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= 21300
    if (m->nc) last = ncclGetLastError(m->nc);
#endif
    gm_fail(m, "%s failed: %s%s%s", what, ncclGetErrorString(r), last && *last ? ": " : "", last ? last : "");
}
#define NK(m, call) nccl_ok((m), (call), #call)
#endif

static void *xmalloc(gm_t *m, size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) gm_fail(m, "out of host memory (%zu bytes)", bytes);
    return p;
}

static void *xalloc(void *m, size_t bytes) { return xmalloc((gm_t *)m, bytes); }

static void *dmalloc(gm_t *m, size_t bytes, const char *what)
{
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
    if (e != cudaSuccess)
        gm_fail(m, "cudaMalloc of %s (%.1f MiB) on device %d failed: %s", what, (double)bytes / 1048576.0, m->dev,
                cudaGetErrorString(e));
    return p;
}

/* A buffer given to epx: dmalloc's, or with --pool from the stream-ordered pool (memory CUDA
 * IPC cannot share: epx stages the inputs the peers read), usable on any stream on return. */
static void *emalloc(gm_t *m, size_t bytes, const char *what)
{
    if (!m->b->opt.pool) return dmalloc(m, bytes, what);
    void *p = NULL;
    cudaError_t e = cudaMallocAsync(&p, bytes ? bytes : 256, 0);
    if (e == cudaSuccess) e = cudaStreamSynchronize(0);
    if (e != cudaSuccess)
        gm_fail(m, "cudaMallocAsync of %s (%.1f MiB) on device %d failed: %s", what, (double)bytes / 1048576.0, m->dev,
                cudaGetErrorString(e));
    return p;
}

/* Wait for `ev` (or the whole stream when NULL) without hanging forever: spin for a second,
 * then poll; watch NCCL's asynchronous errors; give up with a message after WAIT_LIMIT_S. */
static void wait_for(gm_t *m, cudaEvent_t ev, const char *what)
{
    double t0 = bench_now_us();
    for (long it = 0;; it++) {
        cudaError_t e = ev ? cudaEventQuery(ev) : cudaStreamQuery(m->stream);
        if (e == cudaSuccess) return;
        if (e != cudaErrorNotReady)
            gm_fail(m, "waiting for %s: %s (%s; a kernel faulted or a peer broke the run)", what, cudaGetErrorString(e),
                    cudaGetErrorName(e));
        if (it % 256 != 255) continue;
        double s = (bench_now_us() - t0) / 1e6;
#ifdef EPX_HAVE_NCCL
        if (m->nccl && m->nc) {
            ncclResult_t ar = ncclSuccess;
            if (ncclCommGetAsyncError(m->nc, &ar) == ncclSuccess && ar != ncclSuccess)
                gm_fail(m, "waiting for %s: NCCL reports an asynchronous error: %s", what, ncclGetErrorString(ar));
        }
#endif
        if (s > WAIT_LIMIT_S)
            gm_fail(m, "waited %.0f s for %s: the ranks' streams are out of step or a peer is stuck", s, what);
        if (s > 1.0) usleep(200);
    }
}

/* Rank 0's `bytes` to every rank, through the host communicator. */
static void host_bcast(gm_t *m, void *buf, size_t bytes)
{
    int R = m->d.R;
    char *send = (char *)xmalloc(m, bytes * (size_t)R), *recv = (char *)xmalloc(m, bytes * (size_t)R);
    for (int p = 0; p < R; p++) memcpy(send + (size_t)p * bytes, buf, bytes);
    epx_status_t st = epx_alltoall(m->b->comm, send, recv, bytes, EPX_U8, NULL);
    if (st != EPX_SUCCESS)
        gm_fail(m, "host broadcast failed: %s", bench_status_text(st, epx_comm_get_last_error(m->b->comm)));
    memcpy(buf, recv, bytes); /* what rank 0 sent me */
    free(send);
    free(recv);
}

/* Expert outputs y [cap, H] (d.cdt) of the rows this rank should receive, in epx's row order
 * (source rank, then source token): cdt(value * mult_of(me)). */
static void make_y(gm_t *m, uint8_t *y)
{
    int q = m->d.me;
    uint8_t *row = (uint8_t *)xmalloc(m, m->row);
    float *sc = (float *)xmalloc(m, sizeof(float) * (size_t)m->d.S);
    float mu = mult_of(q);
    memset(y, 0, (size_t)m->cap * m->y_row);
    int64_t i = 0;
    for (int s = 0; s < m->d.R; s++)
        for (int t = 0; t < m->d.T; t++) {
            if (!m->d.dest[((int64_t)s * m->d.T + t) * m->d.R + q]) continue;
            if (i >= m->cap) break;
            bench_moe_gen_row(&m->d, s, t, row, sc);
            bench_moe_make_y_row(&m->d, row, sc, mu, y + i * (int64_t)m->y_row);
            i++;
        }
    free(row);
    free(sc);
}

/* ---- Checking ----------------------------------------------------------------------------- */

/* ---- Baseline kernels --------------------------------------------------------------------- */
#ifdef EPX_HAVE_NCCL

/* Ranks token t goes to, as a bit mask (ids out of [0, E) ignored). */
static __device__ __forceinline__ unsigned bl_dest_mask(const long long *idx, long long t, int K, int E, int L)
{
    unsigned mask = 0;
    for (int k = 0; k < K; k++) {
        long long e = idx[t * K + k];
        if (e >= 0 && e < E) mask |= 1u << (int)(e / L);
    }
    return mask;
}

static __device__ __forceinline__ float bl_bf2f(unsigned short v) { return __uint_as_float((unsigned)v << 16); }

static __device__ __forceinline__ unsigned short bl_f2bf(float f) /* round to nearest even */
{
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static __device__ __forceinline__ float bl_h2f(unsigned short v) { return __half2float(__ushort_as_half(v)); }

/* Round to nearest even (subnormals too; never NaN here: the bench's data has none). */
static __device__ __forceinline__ unsigned short bl_f2h(float f) { return __half_as_ushort(__float2half_rn(f)); }

/* The combine dtype dt (EPX_BF16, EPX_F16, EPX_F32) of y and out: element i of p as float32
 * (exact), and f rounded to dt (nearest even) into element i of p. */
static __device__ __forceinline__ float bl_load(int dt, const uint8_t *p, long long i)
{
    if (dt == EPX_F32) return ((const float *)p)[i];
    unsigned short v = ((const unsigned short *)p)[i];
    return dt == EPX_F16 ? bl_h2f(v) : bl_bf2f(v);
}

static __device__ __forceinline__ void bl_store(int dt, uint8_t *p, long long i, float f)
{
    if (dt == EPX_F32)
        ((float *)p)[i] = f;
    else
        ((unsigned short *)p)[i] = dt == EPX_F16 ? bl_f2h(f) : bl_f2bf(f);
}

/* acc[j] += element j of a 16-byte chunk of dt (8 of bf16 or f16, 4 of f32), each add rounded. */
static __device__ __forceinline__ void bl_add_chunk(int dt, float acc[8], uint4 v)
{
    unsigned u[4] = {v.x, v.y, v.z, v.w};
    if (dt == EPX_F32) {
#pragma unroll
        for (int j = 0; j < 4; j++) acc[j] = __fadd_rn(acc[j], __uint_as_float(u[j]));
    } else if (dt == EPX_F16) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            acc[2 * j] = __fadd_rn(acc[2 * j], bl_h2f((unsigned short)(u[j] & 0xffffu)));
            acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], bl_h2f((unsigned short)(u[j] >> 16)));
        }
    } else {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            acc[2 * j] = __fadd_rn(acc[2 * j], __uint_as_float(u[j] << 16));
            acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], __uint_as_float(u[j] & 0xffff0000u));
        }
    }
}

/* The chunk of dt whose elements are acc's, rounded (bl_add_chunk's layout). */
static __device__ __forceinline__ uint4 bl_pack_chunk(int dt, const float acc[8])
{
    if (dt == EPX_F32)
        return make_uint4(__float_as_uint(acc[0]), __float_as_uint(acc[1]), __float_as_uint(acc[2]),
                          __float_as_uint(acc[3]));
    unsigned u[4];
#pragma unroll
    for (int j = 0; j < 4; j++)
        u[j] = dt == EPX_F16 ? (unsigned)bl_f2h(acc[2 * j]) | ((unsigned)bl_f2h(acc[2 * j + 1]) << 16)
                             : (unsigned)bl_f2bf(acc[2 * j]) | ((unsigned)bl_f2bf(acc[2 * j + 1]) << 16);
    return make_uint4(u[0], u[1], u[2], u[3]);
}

/* Warp-wide copy: 16-byte words (four in flight per lane) when both ends allow. */
static __device__ void bl_warp_copy(uint8_t *dst, const uint8_t *src, long long bytes)
{
    int lane = threadIdx.x & 31;
    long long done = 0;
    unsigned long long a = (unsigned long long)dst | (unsigned long long)src;
    if ((a & 15ull) == 0) {
        const uint4 *s = (const uint4 *)src;
        uint4 *d = (uint4 *)dst;
        long long n = bytes / 16, i = lane;
        for (; i + 96 < n; i += 128) {
            uint4 v0 = s[i], v1 = s[i + 32], v2 = s[i + 64], v3 = s[i + 96];
            d[i] = v0, d[i + 32] = v1, d[i + 64] = v2, d[i + 96] = v3;
        }
        for (; i < n; i += 32) d[i] = s[i];
        done = n * 16;
    } else if ((a & 3ull) == 0) {
        const unsigned *s = (const unsigned *)src;
        unsigned *d = (unsigned *)dst;
        long long n = bytes / 4;
        for (long long i = lane; i < n; i += 32) d[i] = s[i];
        done = n * 4;
    }
    for (long long i = done + lane; i < bytes; i += 32) dst[i] = src[i];
}

/* Layout: one thread per token (outputs zeroed before). */
static __global__ void bl_k_layout(const long long *idx, int T, int K, int E, int L, int R, int *per_rank,
                                   int *per_expert, unsigned char *in_rank)
{
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < T; t += (long long)gridDim.x * blockDim.x) {
        unsigned mask = bl_dest_mask(idx, t, K, E, L);
        for (int q = 0; q < R; q++) {
            unsigned in = (mask >> q) & 1u;
            in_rank[t * R + q] = (unsigned char)in;
            if (in) atomicAdd(&per_rank[q], 1);
        }
        for (int k = 0; k < K; k++) {
            long long e = idx[t * K + k];
            if (e < 0 || e >= E) continue;
            bool dup = false;
            for (int j = 0; j < k; j++) dup = dup || idx[t * K + j] == e;
            if (!dup) atomicAdd(&per_expert[e], 1);
        }
    }
}

/* Exclusive prefix of `flag` over the block (blockDim.x a multiple of 32); *total = the sum. */
static __device__ int bl_block_scan(int flag, int *total)
{
    __shared__ int warp_base[32];
    __shared__ int sum;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) warp_base[warp] = __popc(ballot);
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (int i = 0; i < nwarps; i++) {
            int v = warp_base[i];
            warp_base[i] = s;
            s += v;
        }
        sum = s;
    }
    __syncthreads();
    int pos = warp_base[warp] + __popc(ballot & ((1u << lane) - 1u));
    *total = sum;
    __syncthreads();
    return pos;
}

/* Block r: the row of each token in the segment I send rank r (tokens ascending), and the
 * count. */
static __global__ void bl_k_route(const long long *idx, int T, int K, int E, int L, int R, int *pos, int *cnt)
{
    int r = (int)blockIdx.x;
    int next = 0;
    for (int base = 0; base < T; base += (int)blockDim.x) {
        int t = base + (int)threadIdx.x, total;
        int flag = t < T && ((bl_dest_mask(idx, t, K, E, L) >> r) & 1u);
        int p = bl_block_scan(flag, &total);
        if (t < T) pos[(long long)t * R + r] = flag ? next + p : -1;
        next += total;
    }
    if (threadIdx.x == 0) cnt[r] = next;
}

typedef struct {
    const uint8_t *x;
    const float *xs; /* NULL unless fp8 */
    const long long *idx;
    const float *w;
    const int *pos, *cnt;
    uint8_t *sendx;
    float *sends;
    int *smeta;
    int T, K, L, R, S;
    long long row_bytes;
} bl_pack_t;

/* One warp per token: its row (scales, routing record) once into each destination's segment. */
static __global__ void bl_k_pack(bl_pack_t a)
{
    long long sd[MAX_RANKS];
    long long s = 0;
    for (int r = 0; r < a.R; r++) sd[r] = s, s += a.cnt[r];
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    int lane = threadIdx.x & 31, K = a.K, MI = 1 + 2 * a.K;
    for (long long t = warp; t < a.T; t += nwarps)
        for (int r = 0; r < a.R; r++) {
            int p = a.pos[t * a.R + r];
            if (p < 0) continue;
            long long j = sd[r] + p;
            bl_warp_copy(a.sendx + j * a.row_bytes, a.x + t * a.row_bytes, a.row_bytes);
            if (a.xs) bl_warp_copy((uint8_t *)(a.sends + j * a.S), (const uint8_t *)(a.xs + t * a.S), 4LL * a.S);
            int *mt = a.smeta + j * MI;
            if (lane == 0) mt[0] = (int)t;
            for (int k = lane; k < K; k += 32) {
                long long e = a.idx[t * K + k];
                int loc = e >= 0 && e / a.L == r ? (int)(e % a.L) : -1;
                mt[1 + k] = loc;
                mt[1 + K + k] = __float_as_int(loc >= 0 ? a.w[t * K + k] : 0.0f);
            }
        }
}

typedef struct {
    const int *rmeta;
    long long n;
    int K, R;
    long long rdispl[MAX_RANKS + 1];
    long long *idx;
    float *w;
    int *src_rank, *src_token, *per_expert; /* per_expert zeroed before */
} bl_unpack_t;

/* One thread per received row: the routing outputs from its record. */
static __global__ void bl_k_unpack(bl_unpack_t a)
{
    int K = a.K, MI = 1 + 2 * K;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < a.n; j += (long long)gridDim.x * blockDim.x) {
        int p = 0;
        while (p + 1 < a.R && j >= a.rdispl[p + 1]) p++;
        const int *mt = a.rmeta + j * MI;
        a.src_rank[j] = p;
        a.src_token[j] = mt[0];
        for (int k = 0; k < K; k++) {
            int loc = mt[1 + k];
            a.idx[j * K + k] = loc;
            a.w[j * K + k] = __int_as_float(mt[1 + K + k]);
            if (loc < 0) continue;
            bool dup = false;
            for (int i = 0; i < k; i++) dup = dup || mt[1 + i] == loc;
            if (!dup) atomicAdd(&a.per_expert[loc], 1);
        }
    }
}

typedef struct {
    const uint8_t *crecv; /* [rows, H] of dt, segment of rank r at sdispl[r] */
    const int *pos;       /* [T, R] */
    long long sdispl[MAX_RANKS];
    int T, R, H;
    int dt;       /* the combine dtype: EPX_BF16, EPX_F16 or EPX_F32 */
    uint8_t *out; /* [T, H] of dt */
} bl_reduce_t;

/* One warp per token: sum its rows in ascending rank order in float32 from +0.0f (each add
 * rounded; no FMA), then round to dt. 16-byte chunks when a row is whole ones. */
static __global__ void bl_k_reduce(bl_reduce_t a)
{
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    int lane = threadIdx.x & 31, R = a.R, H = a.H, dt = a.dt;
    long long row_bytes = (dt == EPX_F32 ? 4LL : 2LL) * H;
    for (long long t = warp; t < a.T; t += nwarps) {
        const uint8_t *src[MAX_RANKS];
        int n = 0;
        for (int r = 0; r < R; r++) {
            int p = a.pos[t * R + r];
            if (p >= 0) src[n++] = a.crecv + (a.sdispl[r] + p) * row_bytes;
        }
        uint8_t *out = a.out + t * row_bytes;
        bool vec = (row_bytes % 16) == 0 && (((unsigned long long)a.out | (unsigned long long)a.crecv) & 15ull) == 0;
        if (vec) {
            for (int ch = lane; ch < (int)(row_bytes / 16); ch += 32) {
                float acc[8];
#pragma unroll
                for (int j = 0; j < 8; j++) acc[j] = 0.0f;
                for (int i = 0; i < n; i++) bl_add_chunk(dt, acc, ((const uint4 *)src[i])[ch]);
                ((uint4 *)out)[ch] = bl_pack_chunk(dt, acc);
            }
        } else {
            for (int h = lane; h < H; h += 32) {
                float acc = 0.0f;
                for (int i = 0; i < n; i++) acc = __fadd_rn(acc, bl_load(dt, src[i], h));
                bl_store(dt, out, h, acc);
            }
        }
    }
}

static int grid_for(const gm_t *m, long long work_items, int per_block)
{
    long long b = (work_items + per_block - 1) / per_block, lim = (long long)m->sms * 8;
    if (b < 1) b = 1;
    return (int)(b < lim ? b : lim);
}
#endif /* EPX_HAVE_NCCL */

/* ---- The contenders ---------------------------------------------------------------------- */

static void epx_layout_op(gm_t *m)
{
    layout_out_t *o = &m->d_lay[0];
    epx_ok(m, epx_moe_layout(m->moe, m->d_idx, m->d.T, m->d.K, o->per_rank, o->per_expert, o->in_rank, m->stream),
           "epx_moe_layout");
}

static void epx_ll_dispatch_op(gm_t *m)
{
    epx_moe_ll_dispatch_in_t in = {m->ll_x, m->d_idx, m->d.T, m->d.K};
    epx_moe_ll_dispatch_out_t out = {m->ll_recv, m->ll_scales, m->ll_count, m->ll_src_rank, m->ll_src_token};
    m->h_new = NULL;
    epx_ok(m, epx_moe_ll_dispatch(m->moe, &in, &out, &m->h_new, m->stream), "epx_moe_ll_dispatch");
}

/* A new handle in m->h_new; the caller retires the old one outside any timed region. */
static void epx_dispatch_op(gm_t *m)
{
    if (m->ll) {
        epx_ll_dispatch_op(m);
        return;
    }
    ht_out_t *a = &m->d_out[0];
    epx_moe_dispatch_in_t in;
    memset(&in, 0, sizeof in);
    in.x = m->d_x;
    in.x_scales = m->d.fp8 ? m->d_xs : NULL;
    in.topk_idx = m->d_idx;
    in.topk_weights = m->d_w;
    in.num_tokens = m->d.T;
    in.topk = m->d.K;
    epx_moe_dispatch_out_t out;
    memset(&out, 0, sizeof out);
    out.recv_x = a->x;
    out.recv_x_scales = m->d.fp8 ? a->xs : NULL;
    out.recv_topk_idx = a->idx;
    out.recv_topk_weights = a->w;
    out.recv_src_rank = a->src_rank;
    out.recv_src_token = a->src_token;
    out.num_recv_tokens_per_expert = a->per_expert;
    out.capacity = m->cap;
    out.num_recv_tokens = -1;
    out.num_recv_tokens_device = m->d_count;
    m->h_new = NULL;
    epx_ok(m, epx_moe_dispatch(m->moe, &in, &out, &m->h_new, m->stream), "epx_moe_dispatch");
    a->n = out.num_recv_tokens; /* -1 without host synchronisation: fetch_dispatch reads d_count */
}

static void epx_combine_op(gm_t *m)
{
    if (!m->h) gm_fail(m, "internal: combine without a dispatch handle");
    if (m->ll) {
        epx_moe_ll_combine_in_t lin = {m->ll_y, m->d_w};
        epx_ok(m, epx_moe_ll_combine(m->moe, m->h, &lin, m->d_cout[0], m->stream), "epx_moe_ll_combine");
        return;
    }
    epx_moe_combine_in_t in;
    memset(&in, 0, sizeof in);
    in.y = m->d_y;
    in.topk_weights = NULL;
    epx_moe_combine_out_t out;
    memset(&out, 0, sizeof out);
    out.out = m->d_cout[0];
    out.out_topk_weights = NULL;
    epx_ok(m, epx_moe_combine(m->moe, m->h, &in, &out, m->stream), "epx_moe_combine");
}

/* L2 flush, then the device barrier: the ranks' streams leave the barrier together, so that
 * the start events are lined up (flushing after the barrier let a rank whose flush ended
 * first start its clock and then wait, inside the timed region, for a peer still flushing). */
static void flush_then_barrier(gm_t *m)
{
    CK(m, cudaMemsetAsync(m->flush, 0x5a, FLUSH_BYTES, m->stream));
    epx_ok(m, epx_barrier(m->gpu, m->stream), "epx_barrier (device barrier before a timed run)");
}

/* Stand-in for the work a caller runs between a send half and its receive: spins `ns`. */
static __global__ void bench_spin(unsigned long long ns)
{
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); while (t - t0 < ns);
}

/* Low-latency through the halves, in one graph: dispatch send, SPIN_US of other work,
 * dispatch receive, combine send, SPIN_US, combine receive, with an event around each half.
 * The median over `iters` replays (L2 flush, device barrier before each) of each half's
 * time, in us (med[4]: the other work, SPIN_US, timed the same way): what the halves
 * cost on the critical path when the other work hides the transfer. */
#define SPIN_US 30
static void bench_ll_split(gm_t *m, int iters, int warmup, double med[5])
{
    cudaEvent_t ev[8];
    for (int i = 0; i < 8; i++) CK(m, cudaEventCreate(&ev[i]));
    epx_moe_ll_dispatch_in_t in = {m->ll_x, m->d_idx, m->d.T, m->d.K};
    epx_moe_ll_dispatch_out_t out = {m->ll_recv, m->ll_scales, m->ll_count, m->ll_src_rank, m->ll_src_token};
    epx_moe_ll_combine_in_t lin = {m->ll_y, m->d_w};
    epx_moe_handle_t h = NULL;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(m, cudaStreamBeginCapture(m->stream, cudaStreamCaptureModeRelaxed));
    CK(m, cudaEventRecordWithFlags(ev[0], m->stream, cudaEventRecordExternal));
    epx_ok(m, epx_moe_ll_dispatch_send(m->moe, &in, &out, &h, m->stream), "epx_moe_ll_dispatch_send");
    CK(m, cudaEventRecordWithFlags(ev[1], m->stream, cudaEventRecordExternal));
    bench_spin<<<1, 1, 0, m->stream>>>(SPIN_US * 1000ull);
    CK(m, cudaEventRecordWithFlags(ev[2], m->stream, cudaEventRecordExternal));
    epx_ok(m, epx_moe_ll_dispatch_recv(m->moe, h, m->stream), "epx_moe_ll_dispatch_recv");
    CK(m, cudaEventRecordWithFlags(ev[3], m->stream, cudaEventRecordExternal));
    epx_ok(m, epx_moe_ll_combine_send(m->moe, h, &lin, m->d_cout[0], m->stream), "epx_moe_ll_combine_send");
    CK(m, cudaEventRecordWithFlags(ev[4], m->stream, cudaEventRecordExternal));
    bench_spin<<<1, 1, 0, m->stream>>>(SPIN_US * 1000ull);
    CK(m, cudaEventRecordWithFlags(ev[5], m->stream, cudaEventRecordExternal));
    epx_ok(m, epx_moe_ll_combine_recv(m->moe, h, m->stream), "epx_moe_ll_combine_recv");
    CK(m, cudaEventRecordWithFlags(ev[6], m->stream, cudaEventRecordExternal));
    CK(m, cudaStreamEndCapture(m->stream, &graph));
    CK(m, cudaGraphInstantiate(&exec, graph, 0));
    double *t = (double *)xmalloc(m, sizeof(double) * 5 * (size_t)iters);
    static const int from[5] = {0, 2, 3, 5, 1}; /* the last: the other work itself, as a check of the timing */
    for (int i = -warmup; i < iters; i++) {
        flush_then_barrier(m);
        CK(m, cudaGraphLaunch(exec, m->stream));
        CK(m, cudaEventRecord(ev[7], m->stream));
        wait_for(m, ev[7], "a split graph replay");
        for (int k = 0; k < 5 && i >= 0; k++) {
            float ms = 0;
            CK(m, cudaEventElapsedTime(&ms, ev[from[k]], ev[from[k] + 1]));
            t[k * iters + i] = 1000.0 * (double)ms;
        }
    }
    for (int k = 0; k < 5; k++) med[k] = bench_median_of_max(m->b, t + k * iters, iters);
    free(t);
    CK(m, cudaGraphExecDestroy(exec));
    CK(m, cudaGraphDestroy(graph));
    epx_moe_handle_destroy(h);
    for (int i = 0; i < 8; i++) cudaEventDestroy(ev[i]);
}

/* The epx dispatch just made is now the last one: free the one before (a local cudaFree). */
/* Does epx move the high-throughput payload with copy engines here (EPX_CUDA_SMS <= 0)? */
static bool epx_on_copy_engines(const gm_t *m)
{
    const char *sms = getenv("EPX_CUDA_SMS");
    return !m->ll && sms && atoi(sms) <= 0;
}

static void epx_retire_handle(gm_t *m)
{
    if (!m->h_new) return;
    if (m->h) epx_moe_handle_destroy(m->h);
    m->h = m->h_new;
    m->h_new = NULL;
}

#ifdef EPX_HAVE_NCCL
static void bl_layout_op(gm_t *m)
{
    layout_out_t *o = &m->d_lay[1];
    CK(m, cudaMemsetAsync(o->per_rank, 0, sizeof(int32_t) * (size_t)m->d.R, m->stream));
    CK(m, cudaMemsetAsync(o->per_expert, 0, sizeof(int32_t) * (size_t)m->d.E, m->stream));
    bl_k_layout<<<grid_for(m, m->d.T, 256), 256, 0, m->stream>>>((const long long *)m->d_idx, m->d.T, m->d.K, m->d.E, m->d.L,
                                                               m->d.R, o->per_rank, o->per_expert, o->in_rank);
    LAUNCHED(m, "bl_k_layout");
}

static void bl_dispatch_op(gm_t *m)
{
    baseline_t *bl = &m->bl;
    ht_out_t *o = &m->d_out[1];
    int R = m->d.R, me = m->d.me, S = m->d.S;
    cudaStream_t st = m->stream;
    /* Counts and each token's place in the send buffer; everyone's counts; read back. */
    bl_k_route<<<R, 1024, 0, st>>>((const long long *)m->d_idx, m->d.T, m->d.K, m->d.E, m->d.L, R, bl->d_pos, bl->d_cnt);
    LAUNCHED(m, "bl_k_route");
    NK(m, ncclAllGather(bl->d_cnt, bl->d_cnt_all, (size_t)R, ncclInt32, m->nc, st));
    CK(m, cudaMemcpyAsync(bl->h_cnt_all, bl->d_cnt_all, sizeof(int32_t) * (size_t)R * R, cudaMemcpyDeviceToHost, st));
    CK(m, cudaEventRecord(bl->counted, st));
    /* Pack while the counts come back. */
    bl_pack_t pk;
    memset(&pk, 0, sizeof pk);
    pk.x = m->d_x;
    pk.xs = m->d.fp8 ? m->d_xs : NULL;
    pk.idx = (const long long *)m->d_idx;
    pk.w = m->d_w;
    pk.pos = bl->d_pos;
    pk.cnt = bl->d_cnt;
    pk.sendx = bl->d_sendx;
    pk.sends = bl->d_sends;
    pk.smeta = bl->d_smeta;
    pk.T = m->d.T, pk.K = m->d.K, pk.L = m->d.L, pk.R = R, pk.S = S;
    pk.row_bytes = (long long)m->row;
    bl_k_pack<<<grid_for(m, (long long)m->d.T * 32, 256), 256, 0, st>>>(pk);
    LAUNCHED(m, "bl_k_pack");
    wait_for(m, bl->counted, "the baseline's count read-back");
    int64_t n = 0, s = 0;
    for (int p = 0; p < R; p++) {
        bl->scount[p] = bl->h_cnt_all[me * R + p];
        bl->rcount[p] = bl->h_cnt_all[p * R + me];
        bl->sdispl[p] = s, s += bl->scount[p];
        bl->rdispl[p] = n, n += bl->rcount[p];
    }
    bl->sdispl[R] = s, bl->rdispl[R] = n;
    if (n > m->cap || n < 0)
        gm_fail(m, "baseline dispatch: %" PRId64 " rows to receive, more than the capacity %" PRId64, n, m->cap);
    bl->n = n;
    CK(m, cudaMemsetAsync(o->per_expert, 0, sizeof(int32_t) * (size_t)m->d.L, st));
    /* Rows (scales, records) of every pair; rows land in recv_x in source-rank order. */
    size_t row = m->row, srow = sizeof(float) * (size_t)S, mrow = sizeof(int32_t) * (size_t)(1 + 2 * m->d.K);
    NK(m, ncclGroupStart());
    for (int p = 0; p < R; p++) {
        if (bl->scount[p] > 0) {
            size_t c = (size_t)bl->scount[p], d = (size_t)bl->sdispl[p];
            NK(m, ncclSend(bl->d_sendx + d * row, c * row, ncclUint8, p, m->nc, st));
            if (m->d.fp8) NK(m, ncclSend((uint8_t *)bl->d_sends + d * srow, c * srow, ncclUint8, p, m->nc, st));
            NK(m, ncclSend((uint8_t *)bl->d_smeta + d * mrow, c * mrow, ncclUint8, p, m->nc, st));
        }
        if (bl->rcount[p] > 0) {
            size_t c = (size_t)bl->rcount[p], d = (size_t)bl->rdispl[p];
            NK(m, ncclRecv(o->x + d * row, c * row, ncclUint8, p, m->nc, st));
            if (m->d.fp8) NK(m, ncclRecv((uint8_t *)o->xs + d * srow, c * srow, ncclUint8, p, m->nc, st));
            NK(m, ncclRecv((uint8_t *)bl->d_rmeta + d * mrow, c * mrow, ncclUint8, p, m->nc, st));
        }
    }
    NK(m, ncclGroupEnd());
    if (n > 0) {
        bl_unpack_t up;
        memset(&up, 0, sizeof up);
        up.rmeta = bl->d_rmeta;
        up.n = n;
        up.K = m->d.K, up.R = R;
        for (int p = 0; p <= R; p++) up.rdispl[p] = bl->rdispl[p];
        up.idx = (long long *)o->idx;
        up.w = o->w;
        up.src_rank = o->src_rank;
        up.src_token = o->src_token;
        up.per_expert = o->per_expert;
        bl_k_unpack<<<grid_for(m, n, 256), 256, 0, st>>>(up);
        LAUNCHED(m, "bl_k_unpack");
    }
    o->n = n;
}

static void bl_combine_op(gm_t *m)
{
    baseline_t *bl = &m->bl;
    int R = m->d.R;
    cudaStream_t st = m->stream;
    size_t yr = m->y_row;
    NK(m, ncclGroupStart());
    for (int p = 0; p < R; p++) {
        if (bl->rcount[p] > 0)
            NK(m, ncclSend(m->d_y + (size_t)bl->rdispl[p] * yr, (size_t)bl->rcount[p] * yr, ncclUint8, p, m->nc, st));
        if (bl->scount[p] > 0)
            NK(m, ncclRecv(bl->d_crecv + (size_t)bl->sdispl[p] * yr, (size_t)bl->scount[p] * yr, ncclUint8, p, m->nc,
                           st));
    }
    NK(m, ncclGroupEnd());
    bl_reduce_t rd;
    memset(&rd, 0, sizeof rd);
    rd.crecv = bl->d_crecv;
    rd.pos = bl->d_pos;
    for (int p = 0; p < R; p++) rd.sdispl[p] = bl->sdispl[p];
    rd.T = m->d.T, rd.R = R, rd.H = m->d.H, rd.dt = (int)m->d.cdt;
    rd.out = m->d_cout[1];
    bl_k_reduce<<<grid_for(m, (long long)m->d.T * 32, 256), 256, 0, st>>>(rd);
    LAUNCHED(m, "bl_k_reduce");
}

static void bl_init(gm_t *m)
{
    baseline_t *bl = &m->bl;
    int R = m->d.R, T = m->d.T, K = m->d.K;
    int64_t maxsend = (int64_t)T * (K < R ? K : R); /* a token goes to at most min(K, R) ranks */
    size_t mrow = sizeof(int32_t) * (size_t)(1 + 2 * K);
    bl->d_pos = (int32_t *)dmalloc(m, sizeof(int32_t) * (size_t)T * R, "baseline positions");
    bl->d_cnt = (int32_t *)dmalloc(m, sizeof(int32_t) * (size_t)R, "baseline counts");
    bl->d_cnt_all = (int32_t *)dmalloc(m, sizeof(int32_t) * (size_t)R * R, "baseline count matrix");
    CK(m, cudaHostAlloc((void **)&bl->h_cnt_all, sizeof(int32_t) * (size_t)R * R, cudaHostAllocDefault));
    bl->d_sendx = (uint8_t *)dmalloc(m, (size_t)maxsend * m->row, "baseline send rows");
    bl->d_sends = m->d.fp8 ? (float *)dmalloc(m, sizeof(float) * (size_t)maxsend * m->d.S, "baseline send scales") : NULL;
    bl->d_smeta = (int32_t *)dmalloc(m, (size_t)maxsend * mrow, "baseline send records");
    bl->d_rmeta = (int32_t *)dmalloc(m, (size_t)m->cap * mrow, "baseline receive records");
    bl->d_crecv = (uint8_t *)dmalloc(m, (size_t)maxsend * m->y_row, "baseline combine receive");
    CK(m, cudaEventCreateWithFlags(&bl->counted, cudaEventDisableTiming));
}

static void bl_free(gm_t *m)
{
    baseline_t *bl = &m->bl;
    cudaFree(bl->d_pos);
    cudaFree(bl->d_cnt);
    cudaFree(bl->d_cnt_all);
    cudaFreeHost(bl->h_cnt_all);
    cudaFree(bl->d_sendx);
    cudaFree(bl->d_sends);
    cudaFree(bl->d_smeta);
    cudaFree(bl->d_rmeta);
    cudaFree(bl->d_crecv);
    cudaEventDestroy(bl->counted);
}
#endif

/* Enqueue contender c's op (0 epx, 1 baseline). */
static void run_op(gm_t *m, int c, int op)
{
    if (c == 0) {
        if (op == OP_LAYOUT) epx_layout_op(m);
        else if (op == OP_DISPATCH) epx_dispatch_op(m);
        else epx_combine_op(m);
        return;
    }
#ifdef EPX_HAVE_NCCL
    if (op == OP_LAYOUT) bl_layout_op(m);
    else if (op == OP_DISPATCH) bl_dispatch_op(m);
    else bl_combine_op(m);
#else
    gm_fail(m, "internal: no baseline in this build");
#endif
}

/* One timed run: L2 flush, device barrier, events around the call (us). */
static double time_op(gm_t *m, int c, int op)
{
    flush_then_barrier(m);
    CK(m, cudaEventRecord(m->ev0, m->stream));
    run_op(m, c, op);
    CK(m, cudaEventRecord(m->ev1, m->stream));
    char what[64];
    snprintf(what, sizeof what, "the timed %s %s", c == 0 ? "epx" : "NCCL baseline", bench_moe_op_name[op]);
    wait_for(m, m->ev1, what);
    float ms = 0;
    CK(m, cudaEventElapsedTime(&ms, m->ev0, m->ev1));
    if (c == 0 && op == OP_DISPATCH) epx_retire_handle(m);
    return 1000.0 * (double)ms;
}

/* ---- Device buffers --------------------------------------------------------------------- */

static void alloc_outputs(gm_t *m, int ncont)
{
    int K = m->d.K, L = m->d.L, S = m->d.S;
    for (int c = 0; c < ncont; c++) {
        layout_out_t *lo = &m->d_lay[c];
        lo->per_rank = (int32_t *)emalloc(m, sizeof(int32_t) * (size_t)m->d.R, "layout num_tokens_per_rank");
        lo->per_expert = (int32_t *)emalloc(m, sizeof(int32_t) * (size_t)m->d.E, "layout num_tokens_per_expert");
        lo->in_rank = (uint8_t *)emalloc(m, (size_t)m->d.T * m->d.R, "layout is_token_in_rank");
        ht_out_t *o = &m->d_out[c];
        o->x = (uint8_t *)emalloc(m, (size_t)m->cap * m->row, "recv_x");
        o->xs = m->d.fp8 ? (float *)emalloc(m, sizeof(float) * (size_t)m->cap * S, "recv_x_scales") : NULL;
        o->idx = (int64_t *)emalloc(m, sizeof(int64_t) * (size_t)m->cap * K, "recv_topk_idx");
        o->w = (float *)emalloc(m, sizeof(float) * (size_t)m->cap * K, "recv_topk_weights");
        o->src_rank = (int32_t *)emalloc(m, sizeof(int32_t) * (size_t)m->cap, "recv_src_rank");
        o->src_token = (int32_t *)emalloc(m, sizeof(int32_t) * (size_t)m->cap, "recv_src_token");
        o->per_expert = (int32_t *)emalloc(m, sizeof(int32_t) * (size_t)L, "num_recv_tokens_per_expert");
        o->n = -1;
        m->d_cout[c] = (uint8_t *)emalloc(m, (size_t)m->d.T * m->y_row, "combine out");
    }
}

static void free_outputs(gm_t *m)
{
    for (int c = 0; c < 2; c++) {
        layout_out_t *lo = &m->d_lay[c];
        ht_out_t *o = &m->d_out[c];
        void *ps[] = {lo->per_rank, lo->per_expert, lo->in_rank, o->x, o->xs, o->idx, o->w,
                      o->src_rank, o->src_token, o->per_expert, m->d_cout[c]};
        for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++)
            if (ps[i]) cudaFree(ps[i]);
    }
}

/* Bytes of one low-latency slot of recv_x: FP8 when the dispatch quantises, else the tokens'. */
static size_t ll_row(const gm_t *m) { return (size_t)m->d.H * row_es(&m->d); }

/* Host copies of epx's low-latency dispatch outputs (freed by free_ll). */
static void fetch_ll(gm_t *m, ll_out_t *h)
{
    size_t L = (size_t)m->d.L, n = L * m->ll_slots, S = (size_t)m->d.S;
    h->x = (uint8_t *)xmalloc(m, n * ll_row(m));
    h->xs = m->ll_scales ? (float *)xmalloc(m, sizeof(float) * n * S) : NULL;
    h->count = (int32_t *)xmalloc(m, sizeof(int32_t) * L);
    h->src_rank = (int32_t *)xmalloc(m, sizeof(int32_t) * n);
    h->src_token = (int32_t *)xmalloc(m, sizeof(int32_t) * n);
    CK(m, cudaMemcpy(h->x, m->ll_recv, n * ll_row(m), cudaMemcpyDeviceToHost));
    if (h->xs) CK(m, cudaMemcpy(h->xs, m->ll_scales, sizeof(float) * n * S, cudaMemcpyDeviceToHost));
    CK(m, cudaMemcpy(h->count, m->ll_count, sizeof(int32_t) * L, cudaMemcpyDeviceToHost));
    CK(m, cudaMemcpy(h->src_rank, m->ll_src_rank, sizeof(int32_t) * n, cudaMemcpyDeviceToHost));
    CK(m, cudaMemcpy(h->src_token, m->ll_src_token, sizeof(int32_t) * n, cudaMemcpyDeviceToHost));
}

static void free_ll(ll_out_t *h)
{
    free(h->x);
    free(h->xs);
    free(h->count);
    free(h->src_rank);
    free(h->src_token);
}

/* Poison contender c's outputs of one op, in stream order. */
static void poison(gm_t *m, int c, int op)
{
    cudaStream_t st = m->stream;
    if (op == OP_LAYOUT) {
        layout_out_t *lo = &m->d_lay[c];
        CK(m, cudaMemsetAsync(lo->per_rank, 0xA5, sizeof(int32_t) * (size_t)m->d.R, st));
        CK(m, cudaMemsetAsync(lo->per_expert, 0xA5, sizeof(int32_t) * (size_t)m->d.E, st));
        CK(m, cudaMemsetAsync(lo->in_rank, 0xA5, (size_t)m->d.T * m->d.R, st));
    } else if (op == OP_COMBINE) {
        CK(m, cudaMemsetAsync(m->d_cout[c], 0xA5, (size_t)m->d.T * m->y_row, st));
    } else if (c == 0 && m->ll) {
        size_t L = (size_t)m->d.L, n = L * m->ll_slots;
        CK(m, cudaMemsetAsync(m->ll_recv, 0xA5, n * ll_row(m), st));
        if (m->ll_scales) CK(m, cudaMemsetAsync(m->ll_scales, 0xA5, sizeof(float) * n * m->d.S, st));
        CK(m, cudaMemsetAsync(m->ll_count, 0xA5, sizeof(int32_t) * L, st));
        CK(m, cudaMemsetAsync(m->ll_src_rank, 0xA5, sizeof(int32_t) * n, st));
        CK(m, cudaMemsetAsync(m->ll_src_token, 0xA5, sizeof(int32_t) * n, st));
    } else {
        ht_out_t *o = &m->d_out[c];
        CK(m, cudaMemsetAsync(o->x, 0xA5, (size_t)m->cap * m->row, st));
        if (o->xs) CK(m, cudaMemsetAsync(o->xs, 0xA5, sizeof(float) * (size_t)m->cap * m->d.S, st));
        CK(m, cudaMemsetAsync(o->idx, 0xA5, sizeof(int64_t) * (size_t)m->cap * m->d.K, st));
        CK(m, cudaMemsetAsync(o->w, 0xA5, sizeof(float) * (size_t)m->cap * m->d.K, st));
        CK(m, cudaMemsetAsync(o->src_rank, 0xA5, sizeof(int32_t) * (size_t)m->cap, st));
        CK(m, cudaMemsetAsync(o->src_token, 0xA5, sizeof(int32_t) * (size_t)m->cap, st));
        CK(m, cudaMemsetAsync(o->per_expert, 0xA5, sizeof(int32_t) * (size_t)m->d.L, st));
        o->n = -1;
    }
}

/* Host copies of contender c's outputs (allocated here, freed by free_host_out). */
static void fetch_layout(gm_t *m, int c, layout_out_t *h)
{
    layout_out_t *d = &m->d_lay[c];
    h->per_rank = (int32_t *)xmalloc(m, sizeof(int32_t) * (size_t)m->d.R);
    h->per_expert = (int32_t *)xmalloc(m, sizeof(int32_t) * (size_t)m->d.E);
    h->in_rank = (uint8_t *)xmalloc(m, (size_t)m->d.T * m->d.R);
    CK(m, cudaMemcpy(h->per_rank, d->per_rank, sizeof(int32_t) * (size_t)m->d.R, cudaMemcpyDeviceToHost));
    CK(m, cudaMemcpy(h->per_expert, d->per_expert, sizeof(int32_t) * (size_t)m->d.E, cudaMemcpyDeviceToHost));
    CK(m, cudaMemcpy(h->in_rank, d->in_rank, (size_t)m->d.T * m->d.R, cudaMemcpyDeviceToHost));
}

static void free_layout(layout_out_t *h)
{
    free(h->per_rank);
    free(h->per_expert);
    free(h->in_rank);
}

static void fetch_dispatch(gm_t *m, int c, ht_out_t *h)
{
    const ht_out_t *d = &m->d_out[c];
    int64_t n = d->n;
    if (c == 0 && n < 0 && m->d_count) CK(m, cudaMemcpy(&n, m->d_count, sizeof n, cudaMemcpyDeviceToHost));
    n = n < 0 ? 0 : n > m->cap ? m->cap : n;
    size_t K = (size_t)m->d.K, rows = (size_t)(n > 0 ? n : 1);
    h->n = n;
    h->x = (uint8_t *)xmalloc(m, rows * m->row);
    h->xs = m->d.fp8 ? (float *)xmalloc(m, sizeof(float) * rows * m->d.S) : NULL;
    h->idx = (int64_t *)xmalloc(m, sizeof(int64_t) * rows * K);
    h->w = (float *)xmalloc(m, sizeof(float) * rows * K);
    h->src_rank = (int32_t *)xmalloc(m, sizeof(int32_t) * rows);
    h->src_token = (int32_t *)xmalloc(m, sizeof(int32_t) * rows);
    h->per_expert = (int32_t *)xmalloc(m, sizeof(int32_t) * (size_t)m->d.L);
    size_t nn = (size_t)n;
    if (nn) {
        CK(m, cudaMemcpy(h->x, d->x, nn * m->row, cudaMemcpyDeviceToHost));
        if (m->d.fp8) CK(m, cudaMemcpy(h->xs, d->xs, sizeof(float) * nn * m->d.S, cudaMemcpyDeviceToHost));
        CK(m, cudaMemcpy(h->idx, d->idx, sizeof(int64_t) * nn * K, cudaMemcpyDeviceToHost));
        CK(m, cudaMemcpy(h->w, d->w, sizeof(float) * nn * K, cudaMemcpyDeviceToHost));
        CK(m, cudaMemcpy(h->src_rank, d->src_rank, sizeof(int32_t) * nn, cudaMemcpyDeviceToHost));
        CK(m, cudaMemcpy(h->src_token, d->src_token, sizeof(int32_t) * nn, cudaMemcpyDeviceToHost));
    }
    CK(m, cudaMemcpy(h->per_expert, d->per_expert, sizeof(int32_t) * (size_t)m->d.L, cudaMemcpyDeviceToHost));
}

static void free_dispatch(ht_out_t *h)
{
    free(h->x);
    free(h->xs);
    free(h->idx);
    free(h->w);
    free(h->src_rank);
    free(h->src_token);
    free(h->per_expert);
}

/* One checked round of each op and contender on poisoned outputs: adds the wrong values and
 * the differences between the contenders. */
static void checked_round(gm_t *m, int ncs, int64_t wrong[2][NOPS], int64_t diff[NOPS])
{
    int R = m->d.R, T = m->d.T;
    layout_out_t ref, got[2];
    ref.per_rank = (int32_t *)xmalloc(m, sizeof(int32_t) * (size_t)R);
    ref.per_expert = (int32_t *)xmalloc(m, sizeof(int32_t) * (size_t)m->d.E);
    ref.in_rank = (uint8_t *)xmalloc(m, (size_t)T * R);
    bench_moe_ref_layout(&m->d, m->h_idx, &ref);
    for (int c = 0; c < ncs; c++) {
        poison(m, c, OP_LAYOUT);
        run_op(m, c, OP_LAYOUT);
        wait_for(m, NULL, c == 0 ? "the checked epx layout" : "the checked NCCL baseline layout");
        fetch_layout(m, c, &got[c]);
    }
    wrong[0][OP_LAYOUT] += bench_moe_check_layout(&m->d, &got[0], &ref, ncs > 1 ? &got[1] : NULL, &diff[OP_LAYOUT]);
    if (ncs > 1) wrong[1][OP_LAYOUT] += bench_moe_check_layout(&m->d, &got[1], &ref, NULL, NULL);
    for (int c = 0; c < ncs; c++) free_layout(&got[c]);
    free_layout(&ref);

    /* Dispatch and combine. In ll mode epx's outputs are the low-latency ones (checked with
     * d.ll set; the expert side's y is made from what arrived), the baseline's the
     * high-throughput ones, and the two are not compared with each other. */
    ht_out_t hd[2];
    ll_out_t lo;
    for (int c = 0; c < ncs; c++) {
        poison(m, c, OP_DISPATCH);
        run_op(m, c, OP_DISPATCH);
        wait_for(m, NULL, c == 0 ? "the checked epx dispatch" : "the checked NCCL baseline dispatch");
        if (c == 0) epx_retire_handle(m);
        if (c == 0 && m->ll)
            fetch_ll(m, &lo);
        else
            fetch_dispatch(m, c, &hd[c]);
    }
    int64_t RT = (int64_t)m->ll_slots;
    if (m->ll) {
        m->d.ll = true;
        wrong[0][OP_DISPATCH] += bench_moe_check_ll_dispatch(&m->d, &lo, NULL, NULL, RT, ll_row(m));
        size_t ybytes = (size_t)m->d.L * m->ll_slots * m->y_row;
        uint8_t *hy = (uint8_t *)xmalloc(m, ybytes);
        memset(hy, 0x3c, ybytes); /* slots past each expert's count: never read */
        bench_moe_ll_make_y(&m->d, &lo, RT, ll_row(m), hy, m->y_row);
        m->d.ll = false;
        CK(m, cudaMemcpy(m->ll_y, hy, ybytes, cudaMemcpyHostToDevice));
        free(hy);
        free_ll(&lo);
    } else {
        wrong[0][OP_DISPATCH] += bench_moe_check_ht_dispatch(&m->d, &hd[0], ncs > 1 ? &hd[1] : NULL,
                                                            &diff[OP_DISPATCH], m->n_exp, m->cap);
    }
    if (ncs > 1) wrong[1][OP_DISPATCH] += bench_moe_check_ht_dispatch(&m->d, &hd[1], NULL, NULL, m->n_exp, m->cap);
    for (int c = m->ll ? 1 : 0; c < ncs; c++) free_dispatch(&hd[c]);

    uint8_t *want[2] = {(uint8_t *)xmalloc(m, (size_t)T * m->y_row), NULL};
    uint8_t *got_c[2] = {NULL, NULL};
    m->d.ll = m->ll;
    bench_moe_expected_combine(&m->d, want[0]);
    m->d.ll = false;
    want[1] = m->ll ? (uint8_t *)xmalloc(m, (size_t)T * m->y_row) : want[0];
    if (m->ll) bench_moe_expected_combine(&m->d, want[1]);
    for (int c = 0; c < ncs; c++) {
        poison(m, c, OP_COMBINE);
        run_op(m, c, OP_COMBINE);
        wait_for(m, NULL, c == 0 ? "the checked epx combine" : "the checked NCCL baseline combine");
        got_c[c] = (uint8_t *)xmalloc(m, (size_t)T * m->y_row);
        CK(m, cudaMemcpy(got_c[c], m->d_cout[c], (size_t)T * m->y_row, cudaMemcpyDeviceToHost));
    }
    size_t n = (size_t)T * m->d.H, es = epx_dtype_size(m->d.cdt);
    bool same = ncs > 1 && !m->ll; /* compared with each other */
    wrong[0][OP_COMBINE] += bench_moe_cmp_elems(got_c[0], want[0], same ? got_c[1] : NULL, n, es, &diff[OP_COMBINE]);
    if (ncs > 1) wrong[1][OP_COMBINE] += bench_moe_cmp_elems(got_c[1], want[1], NULL, n, es, NULL);
    if (want[1] != want[0]) free(want[1]);
    free(want[0]);
    free(got_c[0]);
    free(got_c[1]);
}

/* ---- The run --------------------------------------------------------------------------- */

int bench_cuda_moe(bench_ctx_t *b)
{
    const bench_opts_t *o = &b->opt;
    static gm_t mm;
    gm_t *m = &mm;
    memset(m, 0, sizeof *m);
    m->b = b;
    m->d.alloc = xalloc, m->d.alloc_ctx = m;
    m->d.R = b->nranks, m->d.me = b->rank, m->d.T = o->tokens, m->d.H = o->hidden, m->d.K = o->topk, m->d.E = o->experts;
    bench_moe_set_dtypes(&m->d, o);
    m->ll = !strcmp(o->mode, "ll");
    if (!bench_moe_shape_ok(m->d.E, m->d.R, m->d.K, b->rank == 0)) return 2;
    if (m->d.R > MAX_RANKS) {
        if (b->rank == 0) fprintf(stderr, "epx-bench moe --backend cuda: at most %d ranks (%d)\n", MAX_RANKS, m->d.R);
        return 2;
    }
    int R = m->d.R, T = m->d.T, K = m->d.K;
    m->d.L = m->d.E / R;
    m->d.S = (m->d.H + SCALE_BLOCK - 1) / SCALE_BLOCK;
    m->row = (size_t)m->d.H * row_es(&m->d);
    m->wire_row = m->row + (m->d.fp8 ? sizeof(float) * (size_t)m->d.S : 0);
    m->y_row = (size_t)m->d.H * epx_dtype_size(m->d.cdt);

    int64_t conv_bad = bench_moe_check_conversions(&m->d, 1 << 18, false);
    if (conv_bad) gm_fail(m, "%" PRId64 " host conversions differ from the library's (a build problem)", conv_bad);

    /* The device: one per local rank, round robin. */
    cudaError_t ce = cudaGetDeviceCount(&m->ndev);
    if (ce != cudaSuccess || m->ndev < 1)
        gm_fail(m, "no usable CUDA device (cudaGetDeviceCount: %s, %d devices)",
                ce != cudaSuccess ? cudaGetErrorString(ce) : "ok", ce == cudaSuccess ? m->ndev : 0);
    const char *lr = getenv("EPX_LOCAL_RANK");
    m->dev = (lr ? atoi(lr) : b->rank) % m->ndev;
    if (m->dev < 0) m->dev = -m->dev;
    CK(m, cudaSetDevice(m->dev));
    CK(m, cudaFree(0)); /* create the context now, so that the memory reading below is epx's */
    CK(m, cudaDeviceGetAttribute(&m->sms, cudaDevAttrMultiProcessorCount, m->dev));
    if (m->sms < 1) m->sms = 1;
    size_t free0 = 0, free1 = 0, total = 0;
    CK(m, cudaMemGetInfo(&free0, &total));

    /* The CUDA communicator and the MoE context. */
    epx_unique_id_t id;
    memset(&id, 0, sizeof id);
    if (b->rank == 0) {
        epx_status_t st = epx_get_unique_id(&id);
        if (st != EPX_SUCCESS) gm_fail(m, "epx_get_unique_id failed: %s", bench_status_text(st, epx_get_last_error()));
    }
    host_bcast(m, &id, sizeof id);
    epx_config_t ccfg = EPX_CONFIG_INITIALIZER;
    ccfg.backend = EPX_BACKEND_CUDA;
    ccfg.device = m->dev;
    epx_ok(m, epx_comm_init_rank(&m->gpu, R, b->rank, &id, &ccfg), "CUDA communicator creation (epx_comm_init_rank)");
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = m->d.H;
    cfg.max_tokens_per_rank = T;
    cfg.num_experts = m->d.E;
    cfg.max_topk = K;
    cfg.dtype = m->d.fp8 ? EPX_FP8_E4M3 : m->d.xdt;
    cfg.combine_dtype = o->combine_dtype; /* EPX_UNSET: epx's default, which m->d.cdt is */
    cfg.index_dtype = EPX_I64;
    cfg.mode = m->ll ? EPX_MOE_LOW_LATENCY : EPX_MOE_HIGH_THROUGHPUT;
    if (m->ll) cfg.dtype = m->d.xdt, cfg.ll_fp8 = m->d.fp8;
    epx_ok(m, epx_moe_create(m->gpu, &cfg, &m->moe), "epx_moe_create (CUDA)");
    epx_ok(m, epx_moe_max_recv_tokens(m->moe, &m->cap), "epx_moe_max_recv_tokens");
    if (strcmp(o->count, "host") != 0) m->d_count = (int64_t *)emalloc(m, sizeof(int64_t), "num_recv_tokens_device");
    CK(m, cudaDeviceSynchronize());
    CK(m, cudaMemGetInfo(&free1, &total));
    m->epx_mem = free0 > free1 ? (double)(free0 - free1) : 0.0;

    /* The NCCL baseline. Never NVLink multicast (NVLS). */
#ifdef EPX_HAVE_NCCL
    m->nccl = strcmp(o->baseline, "none") != 0;
    if (m->nccl) {
        const char *nv = getenv("NCCL_NVLS_ENABLE");
        if (nv && strcmp(nv, "0") != 0 && b->rank == 0)
            fprintf(stderr, "epx-bench moe: NCCL_NVLS_ENABLE=%s overridden to 0 (no NVLink multicast)\n", nv);
        if (!nv || strcmp(nv, "0") != 0) setenv("NCCL_NVLS_ENABLE", "0", 1);
        ncclUniqueId nid;
        memset(&nid, 0, sizeof nid);
        if (b->rank == 0) NK(m, ncclGetUniqueId(&nid));
        host_bcast(m, &nid, sizeof nid);
        ncclResult_t nr = ncclCommInitRank(&m->nc, R, nid, b->rank);
        if (nr != ncclSuccess) {
            m->nc = NULL;
            nccl_ok(m, nr, "ncclCommInitRank");
        }
    }
#endif
    CK(m, cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking));
    CK(m, cudaEventCreate(&m->ev0));
    CK(m, cudaEventCreate(&m->ev1));
    m->flush = dmalloc(m, FLUSH_BYTES, "the L2 flush buffer");

    /* Routing and inputs, on the host from the seeds, then on the device. */
    double t_setup = bench_now_us();
    bench_moe_gen_routing(&m->d, o->skew);
    int64_t rows, link_rows;
    bench_moe_count_rows(&m->d, m->d.me, &rows, &link_rows);
    m->n_exp = rows;
    if (m->ll) { /* the bytes reported: ll receives one row per (token, expert), as the CPU bench counts */
        m->d.ll = true;
        bench_moe_count_rows(&m->d, m->d.me, &rows, &link_rows);
        m->d.ll = false;
    }
    uint8_t *hx = (uint8_t *)xmalloc(m, (size_t)T * m->row);
    float *hxs = (float *)xmalloc(m, sizeof(float) * (size_t)T * m->d.S);
    m->h_idx = (int64_t *)xmalloc(m, sizeof(int64_t) * (size_t)T * K);
    for (int t = 0; t < T; t++) bench_moe_gen_row(&m->d, m->d.me, t, hx + (int64_t)t * m->row, hxs + (int64_t)t * m->d.S);
    for (int64_t i = 0; i < (int64_t)T * K; i++) m->h_idx[i] = m->d.topk[tk(&m->d, m->d.me, 0) + i];
    uint8_t *hy = (uint8_t *)xmalloc(m, (size_t)m->cap * m->y_row);
    make_y(m, hy);
    m->d_x = (uint8_t *)emalloc(m, (size_t)T * m->row, "x");
    m->d_xs = m->d.fp8 ? (float *)emalloc(m, sizeof(float) * (size_t)T * m->d.S, "x_scales") : NULL;
    m->d_idx = (int64_t *)emalloc(m, sizeof(int64_t) * (size_t)T * K, "topk_idx");
    m->d_w = (float *)emalloc(m, sizeof(float) * (size_t)T * K, "topk_weights");
    m->d_y = (uint8_t *)emalloc(m, (size_t)m->cap * m->y_row, "y (expert outputs)");
    CK(m, cudaMemcpy(m->d_x, hx, (size_t)T * m->row, cudaMemcpyHostToDevice));
    if (m->d.fp8) CK(m, cudaMemcpy(m->d_xs, hxs, sizeof(float) * (size_t)T * m->d.S, cudaMemcpyHostToDevice));
    CK(m, cudaMemcpy(m->d_idx, m->h_idx, sizeof(int64_t) * (size_t)T * K, cudaMemcpyHostToDevice));
    CK(m, cudaMemcpy(m->d_w, m->d.w + tk(&m->d, m->d.me, 0), sizeof(float) * (size_t)T * K, cudaMemcpyHostToDevice));
    CK(m, cudaMemcpy(m->d_y, hy, (size_t)m->cap * m->y_row, cudaMemcpyHostToDevice));
    if (m->ll) { /* d.xdt tokens in, expert-major outputs, and y in the same slot layout */
        size_t L = (size_t)m->d.L, S = (size_t)m->d.S, xrow = (size_t)m->d.H * epx_dtype_size(m->d.xdt);
        m->ll_slots = (size_t)R * (size_t)T;
        uint8_t *hb = (uint8_t *)xmalloc(m, xrow * (size_t)T);
        m->d.ll = true; /* d.xdt rows (bf16 with FP8) from the seeds, as the checks expect them */
        for (int t = 0; t < T; t++) bench_moe_gen_row(&m->d, m->d.me, t, hb + (size_t)t * xrow, NULL);
        m->d.ll = false;
        m->ll_x = (uint8_t *)emalloc(m, xrow * (size_t)T, "ll x");
        CK(m, cudaMemcpy(m->ll_x, hb, xrow * (size_t)T, cudaMemcpyHostToDevice));
        free(hb);
        m->ll_recv = (uint8_t *)emalloc(m, L * m->ll_slots * ll_row(m), "ll recv_x");
        m->ll_scales = m->d.fp8 ? (float *)emalloc(m, sizeof(float) * L * m->ll_slots * S, "ll recv_x_scales") : NULL;
        m->ll_count = (int32_t *)emalloc(m, sizeof(int32_t) * L, "ll recv_count");
        m->ll_src_rank = (int32_t *)emalloc(m, sizeof(int32_t) * L * m->ll_slots, "ll recv_src_rank");
        m->ll_src_token = (int32_t *)emalloc(m, sizeof(int32_t) * L * m->ll_slots, "ll recv_src_token");
        m->ll_y = (uint8_t *)emalloc(m, L * m->ll_slots * m->y_row, "ll y");
        CK(m, cudaMemset(m->ll_y, 0x3c, L * m->ll_slots * m->y_row));
    }
    CK(m, cudaDeviceSynchronize()); /* pageable copies may return before they land */
    free(hx);
    free(hxs);
    free(hy);
    int ncs = m->nccl ? 2 : 1;
    alloc_outputs(m, ncs);
#ifdef EPX_HAVE_NCCL
    if (m->nccl) bl_init(m);
#endif
    double rows_mean = bench_sum(b, (double)rows) / R, rows_max = bench_max(b, (double)rows);
    double link_mean = bench_sum(b, (double)link_rows) / R;
    double epx_mem = bench_max(b, m->epx_mem);
    int ndev_min = (int)-bench_max(b, -(double)m->ndev);

    if (b->rank == 0) {
        if (m->ll)
            printf("# mode ll: epx runs low-latency dispatch (%s tokens%s, expert-major slots) and combine (weighted); "
                   "the baseline moves the same routing as in ht mode (its outputs checked as in ht mode)\n",
                   epx_dtype_name(m->d.xdt), m->d.fp8 ? " quantised to FP8 by the dispatch" : "");
        printf("# epx-bench moe: backend cuda, %d ranks on %d GPU(s), mode %s, %s tokens (combine "
               "%s), T=%d H=%d K=%d E=%d (%d per rank), %s routing, %d iterations (CUDA events, median of the max "
               "over ranks), %d warm-up, L2 flushed; baseline %s\n",
               R, ndev_min < R ? ndev_min : R, m->ll ? "ll (low-latency)" : "ht (high-throughput)",
               m->d.fp8 ? (m->ll ? "bf16 -> fp8 e4m3 (ll_fp8, f32 scales)" : "fp8 e4m3 + f32 scales")
                        : epx_dtype_name(m->d.xdt),
               epx_dtype_name(m->d.cdt), T, m->d.H, K, m->d.E, m->d.L,
               o->skew > 0 ? "zipf" : "uniform", o->iters, o->warmup,
               m->nccl ? "NCCL (layout kernel; counts by ncclAllGather + read-back, pack kernel, grouped "
                         "ncclSend/ncclRecv, unpack; combine: ncclSend/ncclRecv back, reduce kernel)"
                       : "none");
        if (o->skew > 0) printf("# zipf exponent %.3g over a fixed random permutation of the experts\n", o->skew);
        const char *sms = getenv("EPX_CUDA_SMS");
        if (epx_on_copy_engines(m))
            printf("# epx: copy engines (EPX_CUDA_SMS=%s: the payload moves with cudaMemcpyAsync; pack and reduce "
                   "kernels use %s blocks, EPX_CUDA_CE_SMS; the baseline's kernels use all SMs); dispatch with the "
                   "count read back to the host (one stream synchronisation)\n",
                   sms, getenv("EPX_CUDA_CE_SMS") ? getenv("EPX_CUDA_CE_SMS") : "32 (default)");
        else
            printf("# epx: SM budget %s (EPX_CUDA_SMS; the baseline's kernels use all SMs); dispatch %s\n",
                   sms ? sms : "24 (default)",
                   m->d_count ? "without host synchronisation (worst-case capacity, count on the device)"
                              : "with the count read back to the host (one stream synchronisation)");
        if (ndev_min < R)
            printf("# note: %d ranks share %d GPU(s): times are not those of one rank per GPU\n", R, ndev_min);
        if (o->pool)
            printf("# --pool: every buffer given to epx (and the baseline's inputs) from the stream-ordered pool: "
                   "memory CUDA IPC cannot share, so epx copies each input its peers read into a buffer of its own "
                   "first (not counted below)\n");
        printf("# rows received per rank: mean %.1f, max %.0f (link: mean %.1f); bytes per row: dispatch %zu, "
               "combine %zu; GB/s = mean bytes per rank / time; setup %.1f s\n",
               rows_mean, rows_max, link_mean, m->wire_row, m->y_row, (bench_now_us() - t_setup) / 1e6);
        printf("# epx device memory (communicator + MoE context, cudaMemGetInfo before/after, max over ranks): %.1f MiB\n",
               epx_mem / 1048576.0);
        fflush(stdout);
    }

    /* Checked runs on poisoned outputs. */
    int64_t wrong[2][NOPS], diff[NOPS];
    memset(wrong, 0, sizeof wrong);
    memset(diff, 0, sizeof diff);
    bool check = o->check;
    /* Checked before the timed iterations and again after them (a call that goes wrong, or
     * does nothing, only after its first would pass the first check). */
    if (check) checked_round(m, ncs, wrong, diff);

    /* Warm-up and timed iterations, alternating epx and the baseline. */
    int iters = o->iters;
    double *tm = (double *)xmalloc(m, sizeof(double) * (size_t)iters * 2 * NOPS);
    memset(tm, 0, sizeof(double) * (size_t)iters * 2 * NOPS);
#define TM(c, op, i) tm[((c) * NOPS + (op)) * iters + (i)]
    for (int i = -o->warmup; i < iters; i++)
        for (int c = 0; c < ncs; c++)
            for (int op = 0; op < NOPS; op++) {
                double us = time_op(m, c, op);
                if (i >= 0) TM(c, op, i) = us;
            }
    double med[2][NOPS];
    memset(med, 0, sizeof med);
    for (int c = 0; c < ncs; c++)
        for (int op = 0; op < NOPS; op++) med[c][op] = bench_median_of_max(b, &TM(c, op, 0), iters);
#undef TM
    free(tm);
    CK(m, cudaStreamSynchronize(m->stream));
    if (check) checked_round(m, ncs, wrong, diff);
    /* Dispatch, combine and layout, each alone, captured in CUDA graphs and timed like the ops
     * (device barrier, L2 flush, events around one replay: no host work inside, so the
     * difference to the ops' times is the host's share: the argument round and the launches);
     * then, ll, dispatch + combine in one graph, replayed back to back. High-throughput
     * dispatch can be captured only on the SM path with the count on the device. */
    double graph_us = 0, graph_op[3] = {0, 0, 0}, split_us[5] = {0, 0, 0, 0, 0};
    epx_comm_info_t ci;
    /* Across hosts (NCCL) only low-latency on the device can be captured: not the layout, nor
     * high-throughput or the host path (EPX_MOE_LL_HOST=1, by default beyond 4 hosts, always
     * beyond 256 ranks), which wait on the host (epx_cuda.h; README, EPX_MOE_LL_HOST). */
    const char *llh = getenv("EPX_MOE_LL_HOST");
    char *end = NULL;
    long ll_host = llh && *llh ? strtol(llh, &end, 10) : -1; /* -1, 0 or 1: creation refuses others */
    if (end && *end) ll_host = -1; /* not a number: the library takes the default, saying so */
    bool info = epx_comm_info(m->gpu, &ci) == EPX_SUCCESS, one = info && ci.num_hosts == 1;
    bool ll_dev = m->ll && ci.nranks <= 256 && (ll_host == 0 || (ll_host < 0 && ci.num_hosts <= 4));
    bool graphs = info && (one ? m->ll || (m->d_count && !epx_on_copy_engines(m)) : ll_dev);
    if (graphs) {
        for (int g = 0; g < (one ? 3 : 2); g++) { /* dispatch, combine, layout (one host) */
            cudaGraph_t graph;
            cudaGraphExec_t exec;
            epx_retire_handle(m);
            CK(m, cudaStreamBeginCapture(m->stream, cudaStreamCaptureModeRelaxed));
            if (g == 0) epx_dispatch_op(m);
            else if (g == 1) epx_combine_op(m);
            else epx_layout_op(m);
            CK(m, cudaStreamEndCapture(m->stream, &graph));
            CK(m, cudaGraphInstantiate(&exec, graph, 0));
            double *tg = (double *)xmalloc(m, sizeof(double) * (size_t)iters);
            for (int i = -o->warmup; i < iters; i++) {
                flush_then_barrier(m);
                CK(m, cudaEventRecord(m->ev0, m->stream));
                CK(m, cudaGraphLaunch(exec, m->stream));
                CK(m, cudaEventRecord(m->ev1, m->stream));
                wait_for(m, m->ev1, "a graph replay");
                float ms = 0;
                CK(m, cudaEventElapsedTime(&ms, m->ev0, m->ev1));
                if (i >= 0) tg[i] = 1000.0 * (double)ms;
            }
            graph_op[g] = bench_median_of_max(b, tg, iters);
            free(tg);
            CK(m, cudaGraphExecDestroy(exec));
            CK(m, cudaGraphDestroy(graph));
        }
    }
    if (graphs && m->ll) {
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        epx_retire_handle(m);
        CK(m, cudaStreamBeginCapture(m->stream, cudaStreamCaptureModeRelaxed));
        epx_ll_dispatch_op(m);
        epx_retire_handle(m);
        epx_combine_op(m);
        CK(m, cudaStreamEndCapture(m->stream, &graph));
        CK(m, cudaGraphInstantiate(&exec, graph, 0));
        CK(m, cudaGraphLaunch(exec, m->stream));
        epx_ok(m, epx_barrier(m->gpu, m->stream), "epx_barrier");
        int reps = 200;
        CK(m, cudaEventRecord(m->ev0, m->stream));
        for (int i = 0; i < reps; i++) CK(m, cudaGraphLaunch(exec, m->stream));
        CK(m, cudaEventRecord(m->ev1, m->stream));
        wait_for(m, m->ev1, "the graph replays");
        float ms = 0;
        CK(m, cudaEventElapsedTime(&ms, m->ev0, m->ev1));
        graph_us = bench_max(b, 1000.0 * (double)ms / reps);
        CK(m, cudaGraphExecDestroy(exec));
        CK(m, cudaGraphDestroy(graph));
        bench_ll_split(m, iters, o->warmup, split_us);
    }
    epx_status_t async = EPX_SUCCESS;
    if (epx_comm_get_async_error(m->gpu, &async) == EPX_SUCCESS && async != EPX_SUCCESS)
        gm_fail(m, "the CUDA communicator reports an asynchronous error: %s",
                bench_status_text(async, epx_comm_get_last_error(m->gpu)));

    /* Results: median over the iterations of the max over ranks; bytes as the mean per rank. */
    bench_moe_report_t rep;
    memset(&rep, 0, sizeof rep);
    int any_wrong = bench_moe_gather(b, &rep, med, wrong, diff, 2, rows_mean, link_mean, m->wire_row, m->y_row);

    if (b->rank == 0) {
        rep.mode = m->ll ? "ll" : "ht", rep.dtype = bench_dtype_name(o->dtype), rep.backend = "cuda";
        rep.combine_dtype = epx_dtype_name(m->d.cdt);
        rep.ranks = R, rep.gpus = ndev_min < R ? ndev_min : R, rep.tokens = T, rep.hidden = m->d.H, rep.topk = K;
        rep.experts = m->d.E, rep.skew = o->skew, rep.registered = -1, rep.iters = iters, rep.warmup = o->warmup;
        rep.timing = "cuda_events_l2_flushed", rep.checked = check ? 1 : 0, rep.baseline = m->nccl;
        rep.baseline_layout = "cuda_kernel", rep.device_mem = epx_mem;
        /* ll: the baseline moves ht rows (one a token and rank, FP8 given, not quantised), not
         * ll's (one a token and expert): its name says so, since its speedup is not like for like */
        rep.baseline_moe = m->ll ? "nccl_send_recv_ht_rows" : "nccl_send_recv";
        if (graphs)
            rep.graph_us[OP_DISPATCH] = graph_op[0], rep.graph_us[OP_COMBINE] = graph_op[1], rep.graph_us[OP_LAYOUT] = graph_op[2];
        rep.pair_graph_us = graph_us;
        bench_moe_print(&rep, o->json);
        if (m->nccl && (rep.diff[OP_LAYOUT] > 0 || rep.diff[OP_DISPATCH] > 0 || rep.diff[OP_COMBINE] > 0))
            printf("# epx and the baseline differ in %.0f layout, %.0f dispatch and %.0f combine values (counted in "
                   "epx's #wrong)\n",
                   rep.diff[OP_LAYOUT], rep.diff[OP_DISPATCH], rep.diff[OP_COMBINE]);
        if (!check) printf("# not checked (-c 0)\n");
        if (any_wrong) printf("# FAILED: wrong values found\n");
        if (graphs && !m->ll)
            printf("# epx from CUDA graphs (no host work; median, L2 flushed): layout %.2f us, dispatch %.2f us, combine "
                   "%.2f us\n",
                   graph_op[2], graph_op[0], graph_op[1]);
        if (graphs && m->ll) {
            printf("# epx ll from CUDA graphs (no host work; median, L2 flushed): ");
            if (one) printf("layout %.2f us, ", graph_op[2]); /* across hosts the layout cannot be captured */
            printf("dispatch %.2f us, combine %.2f us; dispatch + combine in one graph replayed back to back: %.2f us "
                   "per pair\n",
                   graph_op[0], graph_op[1], graph_us);
        }
        if (graphs && m->ll)
            printf("# epx ll halves in one graph, %d us of other work between send and receive (median, L2 flushed): "
                   "dispatch send %.2f us + receive %.2f us; combine send %.2f us + receive %.2f us (the other work "
                   "measured the same way: %.2f us)%s\n",
                   SPIN_US, split_us[0], split_us[1], split_us[2], split_us[3], split_us[4],
                   one ? "" : "; across hosts the NCCL transfers run on the stream inside the halves (the dispatch's "
                              "in its send, the combine's in its receive), so the other work hides none of them");
        fflush(stdout);
    }

    /* Teardown: every rank is past its last collective call here. */
    if (o->pool) CK(m, cudaDeviceSynchronize()); /* cudaFree of pool memory does not wait for the device */
    if (m->h) epx_moe_handle_destroy(m->h);
    m->h = NULL;
#ifdef EPX_HAVE_NCCL
    if (m->nccl) {
        bl_free(m);
        ncclCommDestroy(m->nc);
        m->nc = NULL;
    }
#endif
    free_outputs(m);
    void *llp[] = {m->ll_x, m->ll_recv, m->ll_scales, m->ll_count, m->ll_src_rank, m->ll_src_token, m->ll_y};
    for (size_t i = 0; i < sizeof llp / sizeof llp[0]; i++)
        if (llp[i]) cudaFree(llp[i]);
    if (m->d_count) cudaFree(m->d_count);
    cudaFree(m->d_x);
    if (m->d_xs) cudaFree(m->d_xs);
    cudaFree(m->d_idx);
    cudaFree(m->d_w);
    cudaFree(m->d_y);
    cudaFree(m->flush);
    cudaEventDestroy(m->ev0);
    cudaEventDestroy(m->ev1);
    cudaStreamDestroy(m->stream);
    free(m->h_idx);
    free(m->d.topk);
    free(m->d.w);
    free(m->d.dest);
    epx_moe_destroy(m->moe);
    epx_comm_destroy(m->gpu);
    m->gpu = NULL;
    return any_wrong ? 1 : 0;
}
