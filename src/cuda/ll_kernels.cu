/*
 * CUDA backend kernels for low-latency MoE dispatch and combine (no host synchronisation).
 *
 * Dispatch pushes: every rank writes each of its tokens once per destination rank (FP8
 * quantised on the way when asked) into that rank's staging area, and its routing to every
 * rank; then it sets its LL flag there. A receiver, once every flag is set, lays the rows
 * out per local expert (sources ascending, tokens ascending: the CPU backend's order) with
 * local copies, and every rank derives the slots of its own tokens from the same routing.
 * Combine sums, per token, a float32 partial per expert rank (its rows in k order), then
 * the partials in rank order (products rounded, no FMA: build with --fmad=false), as the
 * CPU backend does. On one host the expert's rank forms the partial where the rows lie
 * and pushes it home (one row per token and rank, instead of one per expert); the weights
 * it needs come from the send. Across hosts the home pulls every row.
 *
 * Each half (dispatch send, dispatch receive, combine send, combine receive) is its own
 * kernel numbered by its own sequence in device memory, so a send and its receive can be
 * enqueued apart with other work between them, and two batches can be in flight: the
 * staging area has two halves (by the send's parity), and a dispatch send waits until
 * every rank received what the send two before it left in the half it is about to fill
 * (known at once when the calls come whole, see epx__ll_half_free). A combine on one host
 * relies on the stream order instead (its send n comes after its receive n - 2, which met
 * every peer's: see epx__k_llc_combine).
 *
 * Across hosts (src/xhost) the sources are the ranks of every host (srcs, numbered
 * globally; this host's are dest0 ..): a send also writes its whole block (header and
 * every row) for its rail peers, src/xhost moves the blocks over NCCL, and the forward
 * kernel pushes what arrived into this host's staging areas as its sources would have,
 * then sets the flags; the receive is the same kernel. A combine receive first gathers, for
 * each rail peer, the rows of its tokens' experts on this host (the gather kernel), src/xhost
 * sends them home, and the sum reads each row from the local peer that holds it or from
 * what came home: the same rows in the same order, so the same bits. The send and
 * receive kernels have an instance for each (template X: across hosts), the combine a
 * kernel for each, so one host runs none of the code the path across hosts needs (the
 * bounded waits still check the relay flag at run time, every 256th poll).
 */
#include <cuda_runtime.h>
#include <limits.h>

#include "../core/convert.h"
#include "flags.cuh"
#include "moe_common.cuh"
#include "probe.cuh"

static __device__ __forceinline__ long long epx__ll_expert(const epx__ll_args_t *a, long long i)
{
    return a->index_i64 ? ((const long long *)a->topk_idx)[i] : (long long)((const int *)a->topk_idx)[i];
}

/* Item i of a grid-stride loop as (row, col) = (i / n, i % n), stepped by the stride
 * without a division per item (a 64-bit division is a long chain of instructions; one per
 * item cost the dispatch send 1-2.6 us). n >= 1. */
typedef struct {
    long long row, col, n, srow, scol;
} epx__ll_walk_t;
static __device__ __forceinline__ epx__ll_walk_t epx__ll_walk(long long i, long long stride, long long n)
{
    epx__ll_walk_t w = {i / n, i % n, n, stride / n, stride % n};
    return w;
}
static __device__ __forceinline__ void epx__ll_step(epx__ll_walk_t *w)
{
    w->row += w->srow;
    w->col += w->scol;
    if (w->col >= w->n) w->col -= w->n, w->row++;
}

/* Source p's header and rows in the staging area `base` of parity `par`. */
static __device__ __forceinline__ int *epx__ll_hdr(const epx__ll_args_t *a, char *base, int par, int p)
{
    return (int *)(base + (long long)par * a->half_bytes + (long long)p * a->hdr_bytes);
}
static __device__ __forceinline__ char *epx__ll_row(const epx__ll_args_t *a, char *base, int par, int p, long long t)
{
    return base + (long long)par * a->half_bytes + (long long)a->srcs * a->hdr_bytes +
           ((long long)p * a->max_tokens + t) * a->srow;
}

/* Row t of a rail block (its header first). */
static __device__ __forceinline__ char *epx__ll_blk_row(const epx__ll_args_t *a, const char *blk, long long t)
{
    return (char *)blk + a->hdr_bytes + t * a->srow;
}

/* The local rank (0 .. nranks - 1) that holds expert e, or -1 (another host's, or no expert).
 * X: across hosts (on one host every expert is a local rank's). */
template <bool X> static __device__ __forceinline__ int epx__ll_holder(const epx__ll_args_t *a, long long e)
{
    if (e < 0 || e >= a->num_experts) return -1;
    if (!X) return (int)e / a->local_experts; /* 32 bits: a far shorter division */
    int q = (int)e / a->local_experts - a->dest0;
    return q >= 0 && q < a->nranks ? q : -1;
}

/* A rail block's header fields [1..3] for sequence n: whether my device has failed (or,
 * !whole, the block lacks some of its contents); `y`: a combine's y block. */
static __device__ __forceinline__ void epx__ll_tag(const epx__cuda_dev_t *d, int *h, unsigned long long n, int y,
                                                   bool whole)
{
    bool failed = !whole || *(volatile unsigned int *)d->failed != 0;
    int code = failed ? *(volatile int *)&d->err->code : 0;
    h[1] = (int)(unsigned)n;
    h[2] = (failed ? EPX__LL_TAG_FAILED : EPX__LL_TAG_FINE) + (y ? EPX__LL_YTAG : 0);
    h[3] = code == 0 || code == EPX__ERR_CLAIMED ? (int)EPX_ERR_PEER_FAILURE : code;
}

/* Threads p < nranks, with the failure relay on (across hosts): relay my device's failure
 * to local peer p (before a flag to it), or take in the one peer p relayed (after its
 * flag). Without the relay nothing at all: the operation number is a load, which a
 * release store after it would wait for. X: may the relay be on? Only across hosts, where
 * the kernels run their X instances (src/xhost turns it on; a low-latency context there
 * always has rails); the single-host instances compile without it (skipped at run time,
 * its code still cost the combine 0.3 us). */
template <bool X> static __device__ __forceinline__ void epx__ll_relay_out(const epx__cuda_dev_t *d)
{
    if (X && d->relay && (int)threadIdx.x < d->nranks) epx__relay_out(d, (int)threadIdx.x, epx__op_number(d));
}
template <bool X> static __device__ __forceinline__ void epx__ll_relay_in(const epx__cuda_dev_t *d)
{
    if (X && d->relay && (int)threadIdx.x < d->nranks) epx__relay_in(d, (int)threadIdx.x, epx__op_number(d));
}

/* After a block's waits, with the failure relay on (across hosts): take in the failures
 * local peers relayed with their flags (they may have sent what they had incompletely),
 * then whether my device is still sound. A block of a rank that is not writes nothing (its
 * outputs keep what they held). Without the relay (one host) true at once, with no load
 * on the kernel's critical path. Every thread of the block calls it. */
template <bool X> static __device__ __forceinline__ bool epx__ll_sound(const epx__cuda_dev_t *d)
{
    __shared__ int sound; /* one read for the block: its threads cannot disagree */
    if (!X || !d->relay) return true;
    epx__ll_relay_in<X>(d);
    __syncthreads();
    if (threadIdx.x == 0) sound = *(volatile unsigned int *)d->failed == 0;
    __syncthreads();
    return sound != 0;
}

/* Did the block (y: a y block) with header h come for sequence n from a peer that had not
 * failed? */
static __device__ __forceinline__ bool epx__ll_tag_fine(const int *h, unsigned long long n, int y)
{
    return ((volatile const int *)h)[1] == (int)(unsigned)n &&
           ((volatile const int *)h)[2] == EPX__LL_TAG_FINE + (y ? EPX__LL_YTAG : 0);
}

/* It did not (or its contents are out of range): record EPX_ERR_PEER_FAILURE from global
 * rank `from` (rail slot hp), as a status across hosts would (the first error stays). */
static __device__ void epx__ll_tag_fail(const epx__cuda_dev_t *d, const int *h, unsigned long long n, int from, int hp,
                                        int y)
{
    volatile const int *v = (volatile const int *)h;
    int yt = y ? EPX__LL_YTAG : 0;
    bool came = v[1] == (int)(unsigned)n && (v[2] == EPX__LL_TAG_FINE + yt || v[2] == EPX__LL_TAG_FAILED + yt);
    epx__record_error(d, EPX_ERR_PEER_FAILURE, came ? from : -1, (unsigned long long)hp,
                      came ? (unsigned long long)(unsigned)v[3] : 0ull, EPX__RELAYED_ACROSS);
}

/* Is the staging half that send n fills free at every rank (each received send n - 2)?
 * A rank whose LL flag says it had received all before a send >= n - 1 is; for another,
 * wait (bounded) for its receive sequence, read over NVLink. My own receive n - 2 normally
 * came before this send on my stream (at most two sends are pending); its counter is
 * checked too, for receives enqueued on another stream. Every thread of the block calls it.
 * A receive's counter is a system-scope release (epx__ll_complete): its reads of the
 * staging area come before it, so a send that acquired it may overwrite what they read. */
static __device__ bool epx__ll_half_free(const epx__cuda_dev_t *d, unsigned long long n)
{
    __shared__ int ok;
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    int q = (int)threadIdx.x;
    if (n > 2 && q == d->rank && !epx__wait_geq(d, d->ll_seq + EPX__LL_DISPATCH_RECVD, n - 2, q)) ok = 0;
    if (n > 2 && q < d->nranks && q != d->rank) {
        unsigned long long v = epx__ld_acquire_sys(d->flags + ((size_t)EPX__FLAG_LL * d->nranks + q) * EPX__FLAG_STRIDE);
        if (!((v >> 1) >= n - 1 && (v & 1ull))) {
            const unsigned long long *recvd =
                (const unsigned long long *)((const char *)d->peer_flags[q] + ((const char *)d->ll_seq - (const char *)d->flags)) +
                EPX__LL_DISPATCH_RECVD;
            if (!epx__wait_geq(d, recvd, n - 2, q)) ok = 0;
        }
    }
    __syncthreads();
    int r = ok;
    __syncthreads();
    return r;
}

/* The rows of dispatch send n, mine and those I push for others, are in every local
 * rank's staging: LL flag 2 n + c at each (c: I had received every dispatch before n),
 * after my device's failure, if any, is relayed. Threads p < nranks of the last block. */
template <bool X> static __device__ __forceinline__ void epx__ll_signal(const epx__cuda_dev_t *d, unsigned long long n)
{
    /* An acquire: when my receive of n - 1 ran on another stream, its release (its reads of
     * my staging are over) then reaches the peers through my flag's release. */
    unsigned long long recvd;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(recvd) : "l"(d->ll_seq + EPX__LL_DISPATCH_RECVD) : "memory");
    unsigned long long caught_up = recvd + 1ull >= n;
    epx__ll_relay_out<X>(d);
    epx__signal_peers(d, EPX__FLAG_LL, 2 * n + caught_up);
}

/* One thread's 8 e4m3 channels (ch) of a staged row, and its block's scale when it holds
 * the block's first channels. */
static __device__ __forceinline__ void epx__ll_put_fp8(const epx__ll_args_t &a, char *dst, long long ch, uint2 qv,
                                                       uint32_t bits)
{
    ((uint2 *)dst)[ch] = qv;
    if ((ch & 15) == 0) {
        if (a.ue8m0)
            ((uint8_t *)(dst + a.scale_off))[ch / 16] = (uint8_t)bits;
        else
            ((uint32_t *)(dst + a.scale_off))[ch / 16] = bits;
    }
}

/* Programmatic dependent launch (sm_90): a receive enqueued right behind its send (one
 * host, a whole call) is launched while the send runs, so its launch and its first steps
 * overlap the send; before it reads the staging area it waits for the send's grid to have
 * finished and its writes to be visible (epx__ll_after_send). Without such a launch both
 * are no-ops. The receive cannot starve the send: it starts only once every send block has
 * let it (each does so first), so every send block already holds its SM. A split send lets
 * the caller's next kernel start early too, if the caller launches it so (its own
 * griddepcontrol.wait then orders it after the send). The receive's bounded wait for its
 * peers' flags starts while the send runs: its EPX_TIMEOUT_MS includes the send's. Builds
 * without an sm_90 target never launch it so (EPX_CUDA_NO_PDL, cmake/cuda.cmake): their
 * code has no wait. */
static __device__ __forceinline__ void epx__ll_let_receive_start()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
static __device__ __forceinline__ void epx__ll_after_send()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* The local ranks that hold token t's experts (bit q: rank q), in every lane of a half
 * warp whose items are all token t's (has: it has items): lane h reads expert h (K <=
 * EPX_MOE_MAX_TOPK = 16) and the half warp ORs their bits, one load and one division a
 * lane instead of K each (the K-loop per item was most of the send's instructions).
 * Whole warps call it. */
template <bool X>
static __device__ __forceinline__ unsigned epx__ll_token_mask(const epx__ll_args_t &a, long long t, bool has)
{
    int h = (int)(threadIdx.x & 15);
    unsigned bit = 0;
    if (has && h < a.topk) {
        int q = epx__ll_holder<X>(&a, epx__ll_expert(&a, t * a.topk + h));
        if (q >= 0) bit = 1u << q;
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) bit |= __shfl_xor_sync(0xffffffffu, bit, o);
    return bit;
}

/* Across hosts: step i of sequence n reached (epx__ll_rail_t.mark; one thread writes it). */
static __device__ __forceinline__ void epx__ll_mark(const epx__ll_rail_t &r, int i, unsigned long long n)
{
    if (r.mark) *(volatile unsigned long long *)(r.mark + i) = n;
}

/* A thread takes 16 bytes of a token's row (a.vec: rows of 16-byte chunks; FP8: 8 bf16
 * channels), else warp w takes (token, destination) pairs; the grid also writes my routing
 * to every rank. X (across hosts): my whole block also goes to a.rail.out (its header
 * tagged), and the flags are left to the forward kernel. The single-host instance compiles
 * without that code (it cost one host 1.4-1.8 us a dispatch when it was only skipped at run
 * time). */
template <bool X> static __global__ void __launch_bounds__(512, 1) epx__k_ll_send(epx__cuda_dev_t d, epx__ll_args_t a)
{
    if (!X) epx__ll_let_receive_start();
    EPX__PROBE(0, EPX__PS_START);
    unsigned long long n = epx__ll_next(&d, EPX__LL_DISPATCH_SENT);
    int par = (int)(n & 1ull), me = X ? a.me_src : a.rank, R = a.nranks, K = a.topk, T = a.num_tokens;
    char *rail = X ? a.rail.out : (char *)0;
    /* The half of this parity was last filled by send n - 2: every rank must have received
     * it. (After a failed wait nothing is sent: the communicator is broken.) */
    bool live = epx__ll_half_free(&d, n);
    EPX__PROBE(0, EPX__PS_FREE);
    if (!live) T = 0;
    /* My routing to every rank and to my rail block, spread over the grid: each entry
     * loaded once (one block doing it all took a round trip per entry it loaded). */
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)T * K;
         i += (long long)gridDim.x * blockDim.x) {
        long long e = epx__ll_expert(&a, i);
        int v = e < -1 || e >= a.num_experts ? -2 : (int)e; /* -2: out of range */
        for (int q = 0; q < R; q++) epx__ll_hdr(&a, a.stage[q], par, me)[4 + i] = v;
        if (X) ((int *)rail)[4 + i] = v;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0 && live)
        for (int q = 0; q < R; q++) epx__ll_hdr(&a, a.stage[q], par, me)[0] = T;
    EPX__PROBE(0, EPX__PS_ROUTE);
    if (a.vec) {
        /* Each thread: 16 bytes of one token's row, loaded once, stored to every destination
         * (FP8: a half warp is one 128-channel block, its amax by shuffles). */
        long long row_in = (long long)a.hidden * a.in_bytes;
        long long chunks = row_in / 16, per_token = (chunks + 15) / 16 * 16; /* whole half warps */
        long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x, nthreads = (long long)gridDim.x * blockDim.x;
        long long n_items = (long long)T * per_token;
        /* The loop bound is the warp's first item, so whole warps take part in the shuffles
         * (blockDim is a multiple of 32, so tid - lane is). Item i: chunk ch of token t. */
        epx__ll_walk_t w = epx__ll_walk(tid, nthreads, per_token);
        for (long long i = tid; i - (threadIdx.x & 31) < n_items; i += nthreads, epx__ll_step(&w)) {
            long long t = w.row, ch = w.col;
            bool has = i < n_items && ch < chunks; /* this thread has channels of a row */
            uint4 v = make_uint4(0, 0, 0, 0); /* loaded first: in flight during the mask's shuffles */
            if (has) v = ((const uint4 *)((const char *)a.x + t * row_in))[ch];
            unsigned mask = epx__ll_token_mask<X>(a, t, i < n_items);
            if (!a.fp8) {
                for (int q = 0; has && q < R; q++)
                    if ((mask >> q) & 1u) ((uint4 *)epx__ll_row(&a, a.stage[q], par, me, t))[ch] = v;
                if (X && has) ((uint4 *)epx__ll_blk_row(&a, rail, t))[ch] = v;
                continue;
            }
            unsigned u[4] = {v.x, v.y, v.z, v.w};
            float f[8], amax = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) f[2 * j] = epx__bits_f32(u[j] << 16), f[2 * j + 1] = epx__bits_f32(u[j] & 0xffff0000u);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float m = fabsf(f[j]);
                amax = m > amax ? m : amax; /* NaN never wins */
            }
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) { /* within the half warp: one 128-channel block */
                float m = __shfl_xor_sync(0xffffffffu, amax, o);
                amax = m > amax ? m : amax;
            }
            uint32_t bits;
            float inv = epx__fp8_block_scale(amax, a.ue8m0, &bits);
            uint2 qv;
            qv.x = epx__fp8x2_from_f32(__fmul_rn(f[0], inv), __fmul_rn(f[1], inv)) |
                   (uint32_t)epx__fp8x2_from_f32(__fmul_rn(f[2], inv), __fmul_rn(f[3], inv)) << 16;
            qv.y = epx__fp8x2_from_f32(__fmul_rn(f[4], inv), __fmul_rn(f[5], inv)) |
                   (uint32_t)epx__fp8x2_from_f32(__fmul_rn(f[6], inv), __fmul_rn(f[7], inv)) << 16;
            for (int q = 0; has && q < R; q++)
                if ((mask >> q) & 1u) epx__ll_put_fp8(a, epx__ll_row(&a, a.stage[q], par, me, t), ch, qv, bits);
            if (X && has) epx__ll_put_fp8(a, epx__ll_blk_row(&a, rail, t), ch, qv, bits);
        }
    }
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    int D = R + (X ? 1 : 0); /* destination D - 1 is my rail block, when there is one */
    for (long long i = warp; !a.vec && i < (long long)T * D; i += nwarps) {
        long long t = i / D;
        int q = (int)((i + a.rank) % D); /* spread the first writes over the peers */
        bool to_q = q == R;
        for (int k = 0; k < K && q < R; k++) to_q = to_q || epx__ll_holder<X>(&a, epx__ll_expert(&a, t * K + k)) == q;
        if (!to_q) continue;
        char *dst = q < R ? epx__ll_row(&a, a.stage[q], par, me, t) : epx__ll_blk_row(&a, rail, t);
        const char *src = (const char *)a.x + t * (long long)a.hidden * a.in_bytes;
        if (a.fp8)
            epx__ll_quantize_row((const uint16_t *)src, a.hidden, a.ue8m0, (uint8_t *)dst, dst + a.scale_off);
        else
            epx__warp_copy(dst, src, a.row_bytes);
    }
    /* The last block to finish tells every rank that my rows and routing are there (across
     * hosts the forward kernel does, after the rail peers' blocks). */
    EPX__PROBE(0, EPX__PS_ROWS);
    /* Blocks decide `live` each on its own (one's wait may time out while another's is
     * met): the rows and routing are all there only if every block was. My stores, system-
     * wide, before the block is counted. */
    bool all;
    if (!epx__ll_last_block_all(&d, EPX__LL_DISPATCH_SENT, live, &all, true)) return;
    /* Across hosts, my rail block's header: FINE only if every block wrote its share and my
     * device has not failed. */
    if (X && threadIdx.x == 0) {
        *a.rail.live = all;
        ((int *)rail)[0] = a.num_tokens;
        epx__ll_tag(&d, (int *)rail, n, 0, all);
        epx__ll_mark(a.rail, 0, n); /* the rail transfers come next */
    }
    if (!X && all) epx__ll_signal<false>(&d, n);
    epx__ll_complete(&d, EPX__LL_DISPATCH_SENT, n);
    EPX__PROBE(0, EPX__PS_DONE);
}

/* Across hosts: warp w takes (rail peer, token, local destination) triples of the blocks
 * my rail peers sent (each checked first); block 0 writes their routing to every local rank. */
static __global__ void __launch_bounds__(512) epx__k_ll_forward(epx__cuda_dev_t d, epx__ll_args_t a)
{
    __shared__ int tp[EPX__LL_MAX_SRCS]; /* each rail slot's T, or -1: nothing to forward */
    unsigned long long n = *(volatile unsigned long long *)(d.ll_seq + EPX__LL_DISPATCH_SENT); /* my send's */
    int par = (int)(n & 1ull), R = a.nranks, K = a.topk, M = a.max_tokens, NH = a.rail.nhosts;
    bool live = *(volatile int *)a.rail.live != 0;
    if (blockIdx.x == 0 && threadIdx.x == 0) epx__ll_mark(a.rail, 1, n); /* the rail transfers are done */
    for (int hp = threadIdx.x; hp < NH; hp += blockDim.x) {
        const int *h = (const int *)(a.rail.in + (long long)hp * a.rail.blk);
        int v = -1;
        if (live && hp != a.rail.host) {
            int t = ((volatile const int *)h)[0];
            if (epx__ll_tag_fine(h, n, 0) && t >= 0 && t <= M)
                v = t;
            else if (blockIdx.x == 0) /* every block sees the same; one records it */
                epx__ll_tag_fail(&d, h, n, hp * R + a.rank, hp, 0);
        }
        tp[hp] = v;
    }
    __syncthreads();
    if (blockIdx.x == 0)
        for (int hp = 0; hp < NH; hp++) {
            if (tp[hp] < 0) continue;
            const int *in = (const int *)(a.rail.in + (long long)hp * a.rail.blk);
            for (int q = 0; q < R; q++) {
                int *h = epx__ll_hdr(&a, a.stage[q], par, hp * R + a.rank);
                if (threadIdx.x == 0) h[0] = tp[hp];
                for (long long i = threadIdx.x; i < (long long)tp[hp] * K; i += blockDim.x) h[4 + i] = in[4 + i];
            }
        }
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    long long per_host = (long long)M * R;
    for (long long i = warp; i < NH * per_host; i += nwarps) {
        int hp = (int)(i / per_host);
        long long t = (i % per_host) / R;
        int q = (int)((i + a.rank) % R);
        if (t >= tp[hp]) continue;
        const char *blk = a.rail.in + (long long)hp * a.rail.blk;
        const int *id = (const int *)blk + 4 + t * K;
        bool to_q = false;
        for (int k = 0; k < K; k++) to_q = to_q || epx__ll_holder<true>(&a, id[k]) == q;
        if (to_q) epx__warp_copy(epx__ll_row(&a, a.stage[q], par, hp * R + a.rank, t), epx__ll_blk_row(&a, blk, t), a.srow);
    }
    if (!epx__ll_last_block_all(&d, EPX__LL_FORWARD, true, (bool *)0, true)) return; /* my rows, system-wide */
    if (live)
        epx__ll_signal<true>(&d, n);
    else /* my send failed: the peers stop waiting for my flag */
        epx__ll_relay_out<true>(&d);
}

/* Blocks of 512 threads (16 warps) for a kernel across hosts with `warps` items of a warp
 * each: one block per 16, at least 1, at most 264 (two per SM; the blocks stride). */
static int epx__ll_rail_grid(long long warps)
{
    long long blocks = (warps + 15) / 16;
    return (int)(blocks < 1 ? 1 : blocks > 264 ? 264 : blocks);
}

extern "C" int epx__cuda_launch_ll_forward(const epx__cuda_dev_t *d, const epx__ll_args_t *a, void *stream)
{
    int blocks = epx__ll_rail_grid((long long)a->rail.nhosts * a->max_tokens * a->nranks);
    epx__k_ll_forward<<<blocks, 512, 0, (cudaStream_t)stream>>>(*d, *a);
    return (int)cudaGetLastError();
}

/* Blocks of `kernel` (at `threads` per block) resident on the current device at once,
 * cached per device: grids no larger than this run in one wave, so no block starts its
 * flag waits after others have finished. */
static int epx__ll_resident(const void *kernel, int threads, int slot)
{
    static int cache[32][16]; /* threads of a process may fill it at once: the same answer */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 16) dev = 0;
    int n = __atomic_load_n(&cache[slot][dev], __ATOMIC_RELAXED);
    if (n > 0) return n;
    int sms = 0, per_sm = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
    n = (sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
    __atomic_store_n(&cache[slot][dev], n, __ATOMIC_RELAXED);
    return n;
}

/* X's instance of a kernel (its slot in epx__ll_resident's cache is 4 more across hosts). */
#define EPX__LL_PICK(X, kernel) ((X) ? (const void *)kernel<true> : (const void *)kernel<false>)

/* Which instance a call runs: across hosts (rails) or not. The single-host instances have
 * no failure relay, which only src/xhost turns on, for contexts that always have rails. */
static bool epx__ll_across(const epx__cuda_dev_t *d, const epx__ll_rail_t *r, cudaError_t *bad)
{
    *bad = r->nhosts == 0 && d->relay ? cudaErrorInvalidValue : cudaSuccess;
    return r->nhosts > 0;
}

extern "C" int epx__cuda_launch_ll_send(const epx__cuda_dev_t *d, const epx__ll_args_t *a, int blocks, void *stream)
{
    cudaError_t bad;
    bool X = epx__ll_across(d, &a->rail, &bad);
    if (bad != cudaSuccess) return (int)bad;
    /* most: blocks of 512 resident at once, one an SM (the send's 80 registers allow no more) */
    int most = epx__ll_resident(EPX__LL_PICK(X, epx__k_ll_send), 512, X ? 4 : 0), threads = 512;
    if (blocks > most) blocks = most;
    /* A small vectorised send on more SMs, in narrower blocks (down to 128 threads): its
     * time is the instructions each SM issues (T = 1, H = 7168: 2 blocks of 512 -> 8 of 128). The
     * kernel takes any multiple of 32 threads >= nranks. */
    while (a->vec && threads > 128 && 2 * blocks <= most) threads /= 2, blocks *= 2;
    if (a->vec) { /* then no block without items (T = 1, H = 7168: 7 of 128) */
        long long items = (long long)a->num_tokens * (((long long)a->hidden * a->in_bytes / 16 + 15) / 16 * 16);
        long long need = (items + threads - 1) / threads;
        if (need < blocks) blocks = need > 1 ? (int)need : 1;
    }
#ifdef EPX_LL_PROBE
    epx__probe_dump(stream);
    epx__probe_grid[0] = blocks;
#endif
    if (X)
        epx__k_ll_send<true><<<blocks, threads, 0, (cudaStream_t)stream>>>(*d, *a);
    else
        epx__k_ll_send<false><<<blocks, threads, 0, (cudaStream_t)stream>>>(*d, *a);
    return (int)cudaGetLastError();
}

/* Threads per receive block: 256 keep a block per expert resident at once for E up to
 * 3 x SMs (a 512-thread grid of 288 blocks ran in two waves: 3 us more at T=1); 512 when
 * an expert may get more rows than 256 threads have warps (each copies a row at a time:
 * at T=256, 256 threads cost 3 us more). */
#define EPX__LL_RECV_THREADS 512

/* The staged routing of pair j = j0 + threadIdx.x (source j / M, token j % M), loaded as it
 * lies: its K ids in v (16 bytes at a time when K % 4 == 0, every load in flight; -1 past
 * the last source and past K). It does not look at the source's T, so the loads may go out
 * before the headers are read: epx__ll_ids_store drops the tokens past T. */
typedef struct {
    int v[EPX_MOE_MAX_TOPK];
    int p, t;
} epx__ll_ids_t;
template <bool X>
static __device__ __forceinline__ void epx__ll_ids_load(const epx__ll_args_t &a, int par, long long j0,
                                                        epx__ll_ids_t *r)
{
    int R = X ? a.srcs : a.nranks, K = a.topk, M = a.max_tokens;
    int j = (int)j0 + (int)threadIdx.x; /* R * M <= 2^30 (epx__moe_shape) */
    r->p = j / M, r->t = j % M;
    const int *id = r->p < R ? epx__ll_hdr(&a, a.stage[a.rank], par, r->p) + 4 + (long long)r->t * K : (const int *)0;
    if ((K & 3) == 0) {
#pragma unroll
        for (int k = 0; k < EPX_MOE_MAX_TOPK; k += 4) {
            int4 x = make_int4(-1, -1, -1, -1);
            if (id && k < K) x = *(const int4 *)(id + k);
            r->v[k] = x.x, r->v[k + 1] = x.y, r->v[k + 2] = x.z, r->v[k + 3] = x.w;
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < EPX_MOE_MAX_TOPK; k++) r->v[k] = id && k < K ? id[k] : -1;
}

/* Block-wide, after epx__ll_ids_load (tp: every source's T, read): the pairs' ids into
 * ids[threadIdx.x * K + k] (16-byte aligned rows when K % 4 == 0, as epx__ll_hits reads
 * them), -1 for a token past its source's T. The caller syncs the block after it. */
static __device__ __forceinline__ void epx__ll_ids_store(const epx__ll_ids_t &r, int K, int R, const int *tp, int *ids)
{
    bool in = r.p < R && r.t < tp[r.p < R ? r.p : 0];
    int *row = ids + threadIdx.x * K;
    if ((K & 3) == 0) {
#pragma unroll
        for (int k = 0; k < EPX_MOE_MAX_TOPK; k += 4)
            if (k < K)
                *(int4 *)(row + k) = in ? make_int4(r.v[k], r.v[k + 1], r.v[k + 2], r.v[k + 3]) : make_int4(-1, -1, -1, -1);
        return;
    }
#pragma unroll
    for (int k = 0; k < EPX_MOE_MAX_TOPK; k++)
        if (k < K) row[k] = in ? r.v[k] : -1;
}

/* Which of a token's K staged ids (id: 16-byte aligned when K % 4 == 0) name expert e, as
 * a bit mask (bit k). A thread's ids lie K words apart from the next thread's: read one by
 * one, a warp's reads of one k would hit the same banks (8-way at K = 8); 16 bytes at a time
 * they take the fewest wavefronts. */
static __device__ __forceinline__ unsigned epx__ll_hits(const int *id, int K, int e)
{
    unsigned hit = 0;
    if ((K & 3) == 0) {
        for (int k = 0; k < K; k += 4) {
            int4 v = *(const int4 *)(id + k);
            hit |= (unsigned)(v.x == e) << k | (unsigned)(v.y == e) << (k + 1) | (unsigned)(v.z == e) << (k + 2) |
                   (unsigned)(v.w == e) << (k + 3);
        }
        return hit;
    }
    for (int k = 0; k < K; k++) hit |= (unsigned)(id[k] == e) << k;
    return hit;
}

/* Block e (striding) walks every source's staged tokens for expert e in order: the
 * position of each is its slot. My tokens' positions go to the handle; for my own
 * experts the rows are copied into place. The grid writes the handle's routing arrays
 * together. False (in every block) when some source's routing was bad: nothing but
 * recv_count (-1) is written then. */
template <bool X> static __device__ bool epx__ll_receive_body(const epx__ll_args_t &a, int par);

/* NT threads a block: 512 at two blocks an SM (64 registers, a few spills), 256 at three
 * (up to 85 registers: no spills; still a block per expert at once for E up to 3 x SMs). */
template <bool X, int NT>
static __global__ void __launch_bounds__(NT, NT == EPX__LL_RECV_THREADS ? 2 : 3) epx__k_ll_receive(epx__cuda_dev_t d,
                                                                                                  epx__ll_args_t a)
{
    EPX__PROBE(1, EPX__PR_START);
    unsigned long long n = epx__ll_next(&d, EPX__LL_DISPATCH_RECVD);
    bool live = epx__wait_peers(&d, EPX__FLAG_LL, 2 * n);
    EPX__PROBE(1, EPX__PR_FLAGS);
    if (!X) epx__ll_after_send(); /* my own rows and routing */
    EPX__PROBE(1, EPX__PR_SENT);
    bool ok = live && epx__ll_sound<X>(&d) && epx__ll_receive_body<X>(a, (int)(n & 1ull));
    bool all;
    if (!epx__ll_last_block_all(&d, EPX__LL_DISPATCH_RECVD, ok, &all)) return;
    /* Unless every block wrote its share of the handle, a combine along it writes nothing. */
    if (threadIdx.x == 0) *a.h_bad = all ? 0 : 1;
    /* Sources may read this (over NVLink) before refilling the half: every block's reads of
     * it are over (the last-block count is an acq_rel atomic). No flag is pushed to them: a
     * store to a peer at the end of this kernel cost 4-7 us. */
    epx__ll_complete(&d, EPX__LL_DISPATCH_RECVD, n);
    EPX__PROBE(1, EPX__PR_DONE);
}

template <bool X> static __device__ bool epx__ll_receive_body(const epx__ll_args_t &a, int par)
{
    __shared__ int bad, tp[X ? EPX__LL_MAX_SRCS : EPX__CUDA_MAX_RANKS];
    __shared__ int list_p[EPX__LL_RECV_THREADS], list_t[EPX__LL_RECV_THREADS];
    __shared__ __align__(16) int ids[EPX__LL_RECV_THREADS * EPX_MOE_MAX_TOPK]; /* a block-sized group's routing */
    /* me: my staging area (local rank); ms: my source number; R sources */
    int me = a.rank, ms = X ? a.me_src : a.rank, R = X ? a.srcs : a.nranks, K = a.topk, M = a.max_tokens;
    int L = a.local_experts, LS = a.nranks, rail_hosts = X && a.rail.topk ? a.rail.nhosts : 0;
    /* Every block checks every source's routing before writing: all reach one verdict. The
     * headers are read at once (a thread each); when one block-sized group holds every
     * (source, token), its routing is loaded before them (one round trip for both), checked
     * here and scanned below for every expert of the block; else the entries are checked
     * with several loads in flight per thread. This pass is latency, not bytes. */
    bool one_group = (long long)R * M <= (long long)blockDim.x;
    epx__ll_ids_t group;
    if (one_group) epx__ll_ids_load<X>(a, par, 0, &group);
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    if ((int)threadIdx.x < R) { /* R <= EPX__LL_MAX_SRCS <= blockDim.x */
        int v = *(volatile const int *)epx__ll_hdr(&a, a.stage[me], par, (int)threadIdx.x);
        tp[threadIdx.x] = v;
        if (v < 0 || v > M) bad = 1;
    }
    __syncthreads();
    long long per = (long long)M * K;
    bool ok = true; /* a thread stops at its own first bad entry (reading `bad` here would race) */
    if (one_group && !bad) { /* (with a bad T the verdict is in) */
        epx__ll_ids_store(group, K, R, tp, ids);
        __syncthreads();
        ok = epx__ll_hits(ids + threadIdx.x * K, K, -2) == 0; /* -2: out of range */
    }
    for (long long j0 = 0; !one_group && ok && j0 < R * per; j0 += 4LL * blockDim.x) {
        int v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            long long j = j0 + (long long)u * blockDim.x + threadIdx.x, i = j % per;
            int p = (int)(j / per);
            v[u] = p < R && i < (long long)tp[p] * K ? epx__ll_hdr(&a, a.stage[me], par, p)[4 + i] : 0;
        }
#pragma unroll
        for (int u = 0; u < 4; u++) ok = ok && v[u] != -2;
    }
    if (!ok) bad = 1;
    __syncthreads();
    if (bad) {
        for (int l = threadIdx.x; blockIdx.x == 0 && l < L && a.recv_count; l += blockDim.x) a.recv_count[l] = -1;
        return false;
    }
    EPX__PROBE(1, EPX__PR_VERDICT);
    {
        /* The handle's routing arrays, spread over the grid (one block writing them all took
         * a round trip per entry it loaded, on the path of the kernel's last block). */
        long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x, G = (long long)gridDim.x * blockDim.x;
        /* My routing as my send staged it (the caller's topk_idx may be gone by now). */
        const int *mine = epx__ll_hdr(&a, a.stage[me], par, ms) + 4;
        for (long long i = g; i < (long long)a.num_tokens * K; i += G) {
            int e = mine[i];
            a.h_topk[i] = e;
            if (e < 0) a.h_slot[i] = -1;
        }
        /* On one host every source's T, and every peer's routing, for the combine's partial
         * sums (my own tokens' partials come from h_topk). */
        for (int p = 0; !X && a.h_ptok && p < R; p++) {
            const int *ids_p = epx__ll_hdr(&a, a.stage[me], par, p) + 4;
            if (g == 0) a.h_ptok[p] = tp[p];
            for (long long i = g; p != me && i < (long long)tp[p] * K; i += G)
                a.h_proute[(long long)p * M * K + i] = ids_p[i];
        }
        /* Across hosts, my rail peers' routing too (-1 past their T), for the combine's gather. */
        for (int hp = 0; X && hp < rail_hosts; hp++) {
            int p = hp * LS + me, tpp = hp == a.rail.host ? 0 : tp[p];
            const int *ids_p = epx__ll_hdr(&a, a.stage[me], par, p) + 4;
            for (long long i = g; i < (long long)M * K; i += G)
                a.rail.topk[(long long)hp * M * K + i] = i < (long long)tpp * K ? ids_p[i] : -1;
        }
    }
    EPX__PROBE(1, EPX__PR_HANDLE);
    int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int e = blockIdx.x; e < a.num_experts; e += gridDim.x) {
        bool mine = e / L == (X ? a.dest0 : 0) + me;
        bool here = X && rail_hosts > 0 && e / L / LS == a.rail.host; /* my rail peers' slots here matter */
        int l = e % L, base = 0;
        for (long long j0 = 0; j0 < (long long)R * M; j0 += blockDim.x) {
            int j = (int)j0 + (int)threadIdx.x, p = j / M, t = j % M; /* R * M <= 2^30 */
            if (!one_group) { /* the group's routing (the last group's scan and copies are over) */
                epx__ll_ids_t g;
                epx__ll_ids_load<X>(a, par, j0, &g);
                epx__ll_ids_store(g, K, R, tp, ids);
                __syncthreads();
            }
            unsigned hit = epx__ll_hits(ids + threadIdx.x * K, K, e); /* -1 past T: no expert */
            int flag = hit != 0;
            int total, pos = epx__block_scan(flag, &total);
            if (flag) {
                int slot = base + pos;
                /* The slots of my tokens, and (across hosts) of my rail peers' here. */
                int *at_k = p == ms ? a.h_slot + t * K
                            : here && p % LS == me ? a.rail.slot + ((long long)(p / LS) * M + t) * K
                                                   : (int *)0;
                for (int k = 0; at_k && k < K; k++)
                    if ((hit >> k) & 1u) at_k[k] = slot;
                if (mine) {
                    int *pslot = !X && a.h_pslot ? a.h_pslot + ((long long)p * M + t) * K : (int *)0;
                    for (int k = 0; pslot && k < K; k++)
                        if ((hit >> k) & 1u) pslot[k] = slot;
                    list_p[pos] = p, list_t[pos] = (int)t;
                    long long at = (long long)l * a.slots + slot;
                    if (a.recv_src_rank) a.recv_src_rank[at] = p;
                    if (a.recv_src_token) a.recv_src_token[at] = (int)t;
                }
            }
            __syncthreads();
            if (e == (int)blockIdx.x && j0 == 0) EPX__PROBE(1, EPX__PR_SCAN);
            for (int i = warp; mine && i < total; i += nwarps) {
                long long at = (long long)l * a.slots + base + i;
                const char *src = epx__ll_row(&a, a.stage[me], par, list_p[i], list_t[i]);
                if (a.fp8)
                    epx__warp_copy2(a.recv_x + at * a.row_bytes, src, a.row_bytes, a.recv_scales + at * a.scale_bytes,
                                    src + a.scale_off, a.scale_bytes);
                else
                    epx__warp_copy(a.recv_x + at * a.row_bytes, src, a.row_bytes);
            }
            base += total;
            __syncthreads();
        }
        if (!mine) continue;
        if (threadIdx.x == 0 && a.recv_count) a.recv_count[l] = base;
        for (long long s = base + threadIdx.x; s < a.slots; s += blockDim.x) {
            if (a.recv_src_rank) a.recv_src_rank[(long long)l * a.slots + s] = -1;
            if (a.recv_src_token) a.recv_src_token[(long long)l * a.slots + s] = -1;
        }
    }
    EPX__PROBE(1, EPX__PR_ROWS);
    return true;
}

extern "C" int epx__cuda_launch_ll_receive(const epx__cuda_dev_t *d, const epx__ll_args_t *a, int behind_send,
                                           void *stream)
{
    long long rows = (long long)a->srcs * a->max_tokens * a->topk; /* at most, over all experts */
    int threads = rows > 8LL * a->num_experts ? EPX__LL_RECV_THREADS : EPX__LL_RECV_THREADS / 2;
    int blocks = a->num_experts < 1024 ? a->num_experts : 1024;
    cudaError_t bad;
    bool X = epx__ll_across(d, &a->rail, &bad);
    if (bad != cudaSuccess) return (int)bad;
    bool big = threads == EPX__LL_RECV_THREADS;
    void (*kernel)(epx__cuda_dev_t, epx__ll_args_t) =
        X ? (big ? epx__k_ll_receive<true, EPX__LL_RECV_THREADS> : epx__k_ll_receive<true, EPX__LL_RECV_THREADS / 2>)
          : (big ? epx__k_ll_receive<false, EPX__LL_RECV_THREADS> : epx__k_ll_receive<false, EPX__LL_RECV_THREADS / 2>);
    int most = epx__ll_resident((const void *)kernel, threads, (big ? 1 : 3) + (X ? 4 : 0));
    if (blocks > most) blocks = most; /* blocks stride over the experts */
#ifdef EPX_LL_PROBE
    epx__probe_grid[1] = blocks;
#endif
    /* Started early behind its send: the blocks that fit beside the send's wait for the
     * flags while it runs. One H200: 1 us less at T = 1; since the
     * send issues a fraction of its old instructions, 1.1-1.6 us less at T = 64-256 too
     * (before that the early blocks cost a send that filled the SMs 1-2 us). */
#ifndef EPX_CUDA_NO_PDL
    if (!X && behind_send) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.gridDim = dim3((unsigned)blocks);
        cfg.blockDim = dim3((unsigned)threads);
        cfg.stream = (cudaStream_t)stream;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        if (cudaLaunchKernelEx(&cfg, kernel, *d, *a) == cudaSuccess) return (int)cudaSuccess;
        (void)cudaGetLastError(); /* refused: an ordinary launch below */
    }
#else
    (void)behind_send;
#endif
    void *args[] = {(void *)d, (void *)a};
    cudaError_t e = cudaLaunchKernel((const void *)kernel, dim3((unsigned)blocks), dim3((unsigned)threads), args, 0,
                                     (cudaStream_t)stream);
    (void)cudaGetLastError(); /* this launch's error is returned, not left for the next launcher to report */
    return (int)e;
}

/* ---- Combine ------------------------------------------------------------------------------ */

/* A thread's V channels (from ch * V; V: 1, 4 or 8) of a float32 row; and the store. */
template <int V> static __device__ __forceinline__ void epx__llc_load_f32(const char *row, long long ch, float *f)
{
    if constexpr (V == 1) {
        f[0] = ((const float *)row)[ch];
    } else {
#pragma unroll
        for (int i = 0; i < V / 4; i++) {
            float4 a = ((const float4 *)row)[ch * (V / 4) + i];
            f[4 * i] = a.x, f[4 * i + 1] = a.y, f[4 * i + 2] = a.z, f[4 * i + 3] = a.w;
        }
    }
}
template <int V> static __device__ __forceinline__ void epx__llc_store_f32(char *row, long long ch, const float *f)
{
    if constexpr (V == 1) {
        ((float *)row)[ch] = f[0];
    } else {
#pragma unroll
        for (int i = 0; i < V / 4; i++)
            ((float4 *)row)[ch * (V / 4) + i] = make_float4(f[4 * i], f[4 * i + 1], f[4 * i + 2], f[4 * i + 3]);
    }
}

/* How a combine instance goes through rows of dtype DT: a thread takes V channels at a
 * time, loaded as one `raw`: with DT a dtype, one 16-byte chunk (bf16, f16: 8 channels;
 * f32: 4); with DT -1 (any dtype, c.dtype, for rows that do not allow 16-byte accesses),
 * one channel, as float32. */
template <int DT> struct epx__llc_vec {
    static const int V = epx__chunk<DT>::n;
    typedef uint4 raw;
};
template <> struct epx__llc_vec<-1> {
    static const int V = 1;
    typedef float raw;
};

/* The same channels of a row, copied as they are. */
template <int DT>
static __device__ __forceinline__ void epx__llc_copy(char *dst, const char *src, int dtype, long long ch)
{
    if constexpr (DT >= 0)
        ((uint4 *)dst)[ch] = ((const uint4 *)src)[ch];
    else if (dtype == EPX_F32)
        ((uint32_t *)dst)[ch] = ((const uint32_t *)src)[ch];
    else
        ((uint16_t *)dst)[ch] = ((const uint16_t *)src)[ch];
}

/* part[j] += w * f[j] for each channel, the product rounded first (no FMA). */
template <int V> static __device__ __forceinline__ void epx__llc_add(float *part, float w, const float *f)
{
#pragma unroll
    for (int j = 0; j < V; j++) part[j] = __fadd_rn(part[j], __fmul_rn(w, f[j]));
}

/* What a thread of the vectorised sum needs of its token before any row: the token's K
 * experts, slots and weights (-1 / 0 past K). KM: the kernel instance's bound on K (8, or
 * EPX_MOE_MAX_TOPK): the arrays live in registers, twice as many at 16. */
template <int KM> struct epx__llc_meta_t {
    int e[KM], slot[KM];
    float w[KM];
};

/* Token t's meta, every load issued at once (none depends on another). The handle's arrays
 * are my dispatch receive's and the weights the caller's, all ready when the kernel starts:
 * the first item's loads go out before the waits for the peers. */
template <int KM>
static __device__ __forceinline__ void epx__llc_meta(const epx__ll_combine_t &c, long long t, epx__llc_meta_t<KM> *m)
{
#pragma unroll
    for (int k = 0; k < KM; k++) {
        bool in = k < c.topk;
        long long i = t * c.topk + k;
        m->e[k] = in ? c.h_topk[i] : -1;
        m->slot[k] = in ? c.h_slot[i] : 0;
        m->w[k] = in ? c.w[i] : 0.0f;
    }
}

template <int KM, int DT>
static __device__ void epx__ll_combine_body(const epx__ll_combine_t &c, epx__llc_meta_t<KM> *m0);

/* Across hosts: where the row of (token t, its k-th expert e, slot) lies: in the expert's
 * local rank's y, or in what its host's gateway sent home. */
static __device__ __forceinline__ const char *epx__llc_row(const epx__ll_combine_t &c, int e, long long t, int k,
                                                          int slot, long long row_bytes)
{
    int g = e / c.local_experts, q = g - c.dest0;
    if (q >= 0 && q < c.nranks) return c.y[q] + ((long long)(e % c.local_experts) * c.slots + slot) * row_bytes;
    return c.rail.y_in + (long long)(g / c.nranks) * c.rail.yblk + 128 + (t * c.topk + k) * row_bytes;
}

/* Across hosts: did every rail peer's y block come for receive n, from a peer that had not
 * failed? Block 0 records the first that did not. */
static __device__ bool epx__llc_homes_ok(const epx__cuda_dev_t *d, const epx__ll_combine_t &c, unsigned long long n)
{
    __shared__ int ok;
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    for (int hp = threadIdx.x; hp < c.rail.nhosts; hp += blockDim.x) {
        const int *h = (const int *)(c.rail.y_in + (long long)hp * c.rail.yblk);
        if (hp == c.rail.host || epx__ll_tag_fine(h, n, 1)) continue;
        ok = 0;
        if (blockIdx.x == 0) epx__ll_tag_fail(d, h, n, hp * c.nranks + d->rank, hp, 1);
    }
    __syncthreads();
    int r = ok;
    __syncthreads();
    return r;
}

/* Across hosts a combine receive is one kernel: every block waits until the peers published
 * their expert outputs (with send_too, after publishing mine), sums its tokens' rows; the
 * last block to finish tells the peers it is done reading theirs and waits until they are
 * done with mine (my outputs may then be overwritten). */
template <int KM, int DT>
static __global__ void __launch_bounds__(256, 2) epx__k_ll_combine(epx__cuda_dev_t d, epx__ll_combine_t c, int send_too)
{
    const long long chunks = c.hidden / epx__llc_vec<DT>::V;
    unsigned long long n = epx__ll_next(&d, EPX__LL_COMBINE_RECVD);
    if (blockIdx.x == 0 && threadIdx.x == 0) epx__ll_mark(c.rail, 3, n); /* the rail transfers are done */
    /* Mine, loaded before the waits (a chain of round trips otherwise): whether the routing
     * was bad at dispatch or my device has failed since (its receive may not have written the
     * handle), and my first vectorised item's meta. */
    int bad = *c.h_bad | (int)*(volatile const unsigned int *)d.failed;
    epx__llc_meta_t<KM> m0;
    long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (DT >= 0 && i0 < (long long)c.num_tokens * chunks) epx__llc_meta(c, i0 / chunks, &m0);
    if (send_too) epx__ll_relay_out<true>(&d), epx__signal_peers(&d, EPX__FLAG_LLC_ARRIVE, n);
    bool live = epx__wait_peers(&d, EPX__FLAG_LLC_ARRIVE, n);
    bool homes = live && epx__llc_homes_ok(&d, c, n); /* every rail peer's rows came */
    if (homes && epx__ll_sound<true>(&d) && !bad) /* bad routing or failed: nothing */
        epx__ll_combine_body<KM, DT>(c, &m0);
    if (!epx__ll_last_block(&d, EPX__LL_COMBINE_RECVD)) return;
    if (live) {
        epx__ll_relay_out<true>(&d);
        epx__signal_peers(&d, EPX__FLAG_LLC_DONE, n); /* done reading the peers' outputs */
        if (epx__wait_peers(&d, EPX__FLAG_LLC_DONE, n)) epx__ll_relay_in<true>(&d);
    }
    if (send_too) epx__ll_complete(&d, EPX__LL_COMBINE_SENT, n);
    epx__ll_complete(&d, EPX__LL_COMBINE_RECVD, n);
}

/* Combine send: one block publishes my expert outputs. */
static __global__ void epx__k_ll_combine_send(epx__cuda_dev_t d)
{
    unsigned long long n = epx__ll_next(&d, EPX__LL_COMBINE_SENT);
    epx__ll_relay_out<true>(&d); /* one kernel for both (the relay is checked at run time) */
    epx__signal_peers(&d, EPX__FLAG_LLC_ARRIVE, n);
    epx__ll_complete(&d, EPX__LL_COMBINE_SENT, n);
}

/* DT a dtype (rows that allow 16-byte accesses): each thread takes one 16-byte chunk of a
 * token at a time (epx__llc_vec), m0 holding its first item's meta. DT -1: one block per
 * token, each thread owning channels h (strided). Either way the token's rows are summed as
 * epx.h says: a partial sum per expert rank (its rows in k order, from +0), then the
 * partials over the ranks ascending (from +0; a single partial gives the same bits as
 * summing it directly). */
template <int KM, int DT>
static __device__ void epx__ll_combine_body(const epx__ll_combine_t &c, epx__llc_meta_t<KM> *m0)
{
    int K = c.topk, H = c.hidden;
    long long es = c.dtype == EPX_F32 ? 4 : 2, row_bytes = (long long)H * es;
    if constexpr (DT >= 0) {
        /* Every contributing row's load in flight before the sums (rank by rank ascending,
         * k ascending in each). */
        const int E = epx__llc_vec<DT>::V;
        long long chunks = H / E, n_items = (long long)c.num_tokens * chunks;
        long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        for (long long i = i0; i < n_items; i += (long long)gridDim.x * blockDim.x) {
            long long t = i / chunks, ch = i % chunks;
            if (i != i0) epx__llc_meta(c, t, m0);
            uint4 v[KM]; /* static indices only: the arrays stay in registers */
#pragma unroll
            for (int k = 0; k < KM; k++)
                if (m0->e[k] >= 0) v[k] = ((const uint4 *)epx__llc_row(c, m0->e[k], t, k, m0->slot[k], row_bytes))[ch];
            float acc[E];
#pragma unroll
            for (int j = 0; j < E; j++) acc[j] = 0.0f;
            /* Rank by rank up: a rank's experts are the ids [q L, (q + 1) L); `lo`: the
             * first id not summed yet (the -1 ids never count). */
            for (int lo = 0;;) {
                int first = INT_MAX;
#pragma unroll
                for (int k = 0; k < KM; k++) first = m0->e[k] >= lo && m0->e[k] < first ? m0->e[k] : first;
                if (first == INT_MAX) break;
                int hi = (first / c.local_experts + 1) * c.local_experts;
                float part[E];
#pragma unroll
                for (int j = 0; j < E; j++) part[j] = 0.0f;
#pragma unroll
                for (int k = 0; k < KM; k++) {
                    if (m0->e[k] < lo || m0->e[k] >= hi) continue;
                    /* At 16 the weights held too would spill (116 bytes): read again (L1). */
                    float wk = KM <= 8 ? m0->w[k] : c.w[t * c.topk + k], f[E];
                    epx__chunk_unpack<DT>(v[k], f);
                    epx__llc_add<E>(part, wk, f);
                }
#pragma unroll
                for (int j = 0; j < E; j++) acc[j] = __fadd_rn(acc[j], part[j]);
                lo = hi;
            }
            ((uint4 *)(c.out + t * row_bytes))[ch] = epx__chunk_pack<DT>(acc);
        }
    } else {
        for (int t = blockIdx.x; t < c.num_tokens; t += gridDim.x) {
            epx__ll_terms_t o;
            o.n = 0;
            for (int k = 0; k < K; k++) {
                int e = c.h_topk[t * K + k];
                if (e >= 0)
                    epx__ll_add_term(&o, epx__llc_row(c, e, t, k, c.h_slot[t * K + k], row_bytes),
                                     c.w[(long long)t * K + k], e / c.local_experts);
            }
            epx__ll_sum_token(&o, c.out + (long long)t * row_bytes, H, c.dtype, threadIdx.x, blockDim.x);
        }
    }
}

/* Across hosts, a combine receive's first step (it keeps no sequence: n is the receive's
 * that follows on the stream). One warp per (rail peer, token, k). */
static __global__ void __launch_bounds__(512) epx__k_ll_gather(epx__cuda_dev_t d, epx__ll_combine_t c)
{
    unsigned long long n = epx__ll_next(&d, EPX__LL_COMBINE_RECVD);
    bool live = epx__wait_peers(&d, EPX__FLAG_LLC_ARRIVE, n);
    int K = c.topk, M = c.max_tokens, L = c.local_experts, NH = c.rail.nhosts;
    long long rb = (long long)c.hidden * (c.dtype == EPX_F32 ? 4 : 2), per_host = (long long)M * K;
    /* An unsound rank's dispatch receive may not have written the handle's arrays: its block
     * goes home marked failed (below), rows unwritten. */
    if (live && epx__ll_sound<true>(&d) && !*c.h_bad) {
        long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
        long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
        for (long long i = warp; i < NH * per_host; i += nwarps) {
            int hp = (int)(i / per_host);
            long long j = i % per_host;
            int e = c.rail.topk[i], slot = c.rail.slot[i]; /* [hp, t, k] */
            if (hp == c.rail.host || e < 0 || e / L / c.nranks != c.rail.host || slot < 0 || slot >= c.slots) continue;
            const char *src = c.y[e / L - c.dest0] + ((long long)(e % L) * c.slots + slot) * rb;
            epx__warp_copy(c.rail.y_out + (long long)hp * c.rail.yblk + 128 + j * rb, src, rb);
        }
    }
    /* The headers last: a failure met above goes home with them. */
    __threadfence();
    if (!epx__ll_last_block(&d, EPX__LL_GATHER)) return;
    for (int hp = threadIdx.x; hp < NH; hp += blockDim.x) {
        if (hp == c.rail.host) continue;
        int *h = (int *)(c.rail.y_out + (long long)hp * c.rail.yblk);
        h[0] = 0;
        epx__ll_tag(&d, h, n, 1, true);
    }
    if (threadIdx.x == 0) epx__ll_mark(c.rail, 2, n); /* the rail transfers come next */
}

extern "C" int epx__cuda_launch_ll_gather(const epx__cuda_dev_t *d, const epx__ll_combine_t *c, void *stream)
{
    int blocks = epx__ll_rail_grid((long long)c->rail.nhosts * c->max_tokens * c->topk);
    epx__k_ll_gather<<<blocks, 512, 0, (cudaStream_t)stream>>>(*d, *c);
    return (int)cudaGetLastError();
}

/* ---- Combine on one host: each expert rank sends home one row per token ------------------ */

/* Source p's weights [max_tokens, K] in the combine half `par` of staging `base`. */
static __device__ __forceinline__ float *epx__llc_wts(const epx__ll_combine_t &c, char *base, int par, int p)
{
    return (float *)(base + par * c.chalf + c.cw_off) + (long long)p * c.max_tokens * c.topk;
}

/* The row expert rank q sent home for token t of the staging's owner. */
static __device__ __forceinline__ char *epx__llc_home(const epx__ll_combine_t &c, char *base, int par, int q,
                                                      long long t)
{
    return base + par * c.chalf + c.cp_off + ((long long)q * c.max_tokens + t) * c.prow;
}

/* Block-wide: my weights [T, K] into every peer's combine staging (source me, half par),
 * then LLC_ARRIVE = n at each. */
static __device__ void epx__llc_publish(const epx__cuda_dev_t *d, const epx__ll_combine_t &c, unsigned long long n)
{
    int par = (int)(n & 1ull);
    long long cnt = (long long)c.num_tokens * c.topk;
    for (int q = 0; q < c.nranks; q++) {
        if (q == c.rank) continue;
        float *dst = epx__llc_wts(c, c.cstage[q], par, c.rank);
        for (long long i = threadIdx.x; i < cnt; i += blockDim.x) dst[i] = c.w[i];
    }
    epx__block_fence_sys(c.nranks > 1 && threadIdx.x < cnt); /* the threads that stored */
    epx__signal_peers(d, EPX__FLAG_LLC_ARRIVE, n);
}

/* A thread's channels of a row: loaded (epx__llc_vec), and as float32 (exact). */
static __device__ __forceinline__ void epx__llc_fetch(const char *row, int, long long ch, uint4 *r)
{
    *r = ((const uint4 *)row)[ch];
}
static __device__ __forceinline__ void epx__llc_fetch(const char *row, int dtype, long long ch, float *r)
{
    *r = epx__load_elem(row, dtype, ch);
}
template <int DT> static __device__ __forceinline__ void epx__llc_unpack(const uint4 &r, float *f)
{
    epx__chunk_unpack<DT>(r, f);
}
template <int DT> static __device__ __forceinline__ void epx__llc_unpack(const float &r, float *f) { f[0] = r; }

/* The slot of a token's k-th expert: held for the first N, else read (`at`: the token's). */
template <int N> static __device__ __forceinline__ int epx__llc_slot(const int *held, const int *at, int k)
{
    return k < N ? held[k] : at[k];
}

/* Every peer p's tokens with experts here (ptok[p]: p's T): into p's staging, for each, the
 * y row of its one expert here, or the partial over its experts here (k ascending, from
 * +0). A thread takes V channels of one token at a time; its loads go out in waves: the
 * routing, all at once; then the rows 8 at once, each wave's slots first. Returns whether
 * the thread wrote anything. */
template <int KM, int DT>
static __device__ __noinline__ bool epx__llc_send_home(const epx__ll_combine_t &c, int par, const int *ptok)
{
    static_assert(KM <= 8 || KM % 8 == 0, "rows are loaded 8 at once");
    const int V = epx__llc_vec<DT>::V, K8 = KM < 8 ? KM : 8;
    bool pushed = false;
    int K = c.topk, M = c.max_tokens, me = c.rank, dtype = c.dtype;
    int lo = me * c.local_experts, hi = lo + c.local_experts;
    long long rb = (long long)c.hidden * (dtype == EPX_F32 ? 4 : 2), chunks = c.hidden / V;
    long long n_items = (long long)(c.nranks - 1) * c.most_tokens * chunks; /* the peers' rows, not mine */
    long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    epx__ll_walk_t w = epx__ll_walk(i0, stride, chunks); /* row j * most_tokens + t: peer j's token t */
#pragma unroll 1
    for (long long i = i0; i < n_items; i += stride, epx__ll_step(&w)) {
        int p = (int)w.row / c.most_tokens, t = (int)w.row % c.most_tokens; /* < 2^30 (epx__moe_shape) */
        p += p >= me; /* peer j is rank j, or j + 1 from mine on */
        long long ch = w.col;
        if (t >= ptok[p]) continue;
        long long at = ((long long)p * M + t) * K;
        int e[KM];
        unsigned mask = 0;
#pragma unroll
        for (int k = 0; k < KM; k++) {
            e[k] = k < K ? c.h_proute[at + k] : -1;
            if (e[k] >= lo && e[k] < hi) mask |= 1u << k;
        }
        if (!mask) continue;
        char *dst = epx__llc_home(c, c.cstage[p], par, me, t);
        const float *wts = epx__llc_wts(c, c.cstage[me], par, p) + t * K;
        int slot[K8]; /* the first 8 (the rest, at K > 8, with their rows) */
#pragma unroll
        for (int k = 0; k < K8; k++) slot[k] = (mask >> k) & 1u ? c.h_pslot[at + k] : 0;
        pushed = true;
        if ((mask & (mask - 1)) == 0) { /* one expert here: its row as it is */
#pragma unroll
            for (int k = 0; k < KM; k++)
                if ((mask >> k) & 1u) {
                    long long row = (long long)(e[k] - lo) * c.slots + epx__llc_slot<K8>(slot, c.h_pslot + at, k);
                    epx__llc_copy<DT>(dst, c.y[me] + row * rb, dtype, ch);
                }
            continue;
        }
        float part[V];
#pragma unroll
        for (int j = 0; j < V; j++) part[j] = 0.0f;
#pragma unroll
        for (int k0 = 0; k0 < KM; k0 += 8) { /* the rows 8 at once (16 at once spilled) */
            typename epx__llc_vec<DT>::raw r[8];
#pragma unroll
            for (int k = k0; k < k0 + 8; k++)
                if ((mask >> k) & 1u) {
                    long long row = (long long)(e[k] - lo) * c.slots + epx__llc_slot<K8>(slot, c.h_pslot + at, k);
                    epx__llc_fetch(c.y[me] + row * rb, dtype, ch, &r[k - k0]);
                }
#pragma unroll
            for (int k = k0; k < k0 + 8; k++) {
                if (!((mask >> k) & 1u)) continue;
                float f[V];
                epx__llc_unpack<DT>(r[k - k0], f);
                epx__llc_add<V>(part, wts[k], f); /* staged here: a short trip, after the rows' */
            }
        }
        epx__llc_store_f32<V>(dst, ch, part);
    }
    return pushed;
}

/* My tokens: out[t] = over the expert ranks ascending (from +0), each one's partial: mine
 * from my y, a peer's as it sent it home (a y row to weigh here when the token has one
 * expert there). A thread's loads: the token's routing at once, with its rows here when K
 * <= 8; then each peer rank's row home. At K > 8 my partial comes first, its rows 8 at
 * once (16 rows' registers at once spilled 224-376 bytes; the K <= 8 instance keeps the
 * one wave: summed before the ranks' loop it took 0.7-3.5 us longer at T = 128). */
template <int KM, int DT> static __device__ __noinline__ void epx__llc_sum_home(const epx__ll_combine_t &c, int par)
{
    static_assert(KM <= 8 || KM % 8 == 0, "rows are loaded 8 at once");
    const int V = epx__llc_vec<DT>::V, K8 = KM < 8 ? KM : 8;
    /* The slots and weights read with the routing: all at K <= 8; at K > 8 the first 8, none
     * for f32 (its items are twice as many: fewer registers held won, 34.6 against 41.6 us). */
    const int HELD = KM <= 8 ? KM : DT == EPX_F32 ? 0 : 8, NH = HELD ? HELD : 1;
    int K = c.topk, L = c.local_experts, me = c.rank, dtype = c.dtype;
    long long rb = (long long)c.hidden * (dtype == EPX_F32 ? 4 : 2), chunks = c.hidden / V;
    long long n_items = (long long)c.num_tokens * chunks;
    long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    epx__ll_walk_t it = epx__ll_walk(i0, stride, chunks);
#pragma unroll 1
    for (long long i = i0; i < n_items; i += stride, epx__ll_step(&it)) {
        long long t = it.row, ch = it.col;
        int e[KM], slot[NH];
        float w[NH];
        typename epx__llc_vec<DT>::raw r[K8];
#pragma unroll
        for (int k = 0; k < KM; k++) {
            bool in = k < K;
            e[k] = in ? c.h_topk[t * K + k] : -1;
            int s = in ? c.h_slot[t * K + k] : 0;
            float wk = in ? c.w[t * K + k] : 0.0f;
            if (k < HELD) slot[k] = s, w[k] = wk; /* (the others' loads are dropped, unused) */
            if constexpr (KM <= 8)
                if (e[k] >= me * L && e[k] < (me + 1) * L)
                    epx__llc_fetch(c.y[me] + ((long long)(e[k] - me * L) * c.slots + slot[k]) * rb, dtype, ch, &r[k]);
        }
        float mine[V]; /* K > 8: my partial (k ascending, from +0) */
#pragma unroll
        for (int j = 0; j < V; j++) mine[j] = 0.0f;
        if constexpr (KM > 8) {
#pragma unroll
            for (int k0 = 0; k0 < KM; k0 += 8) {
#pragma unroll
                for (int k = k0; k < k0 + 8; k++)
                    if (e[k] >= me * L && e[k] < (me + 1) * L) {
                        int sk = epx__llc_slot<HELD>(slot, c.h_slot + t * K, k);
                        long long row = (long long)(e[k] - me * L) * c.slots + sk;
                        epx__llc_fetch(c.y[me] + row * rb, dtype, ch, &r[k - k0]);
                    }
#pragma unroll
                for (int k = k0; k < k0 + 8; k++) {
                    if (!(e[k] >= me * L && e[k] < (me + 1) * L)) continue;
                    float f[V];
                    epx__llc_unpack<DT>(r[k - k0], f);
                    epx__llc_add<V>(mine, k < HELD ? w[k] : c.w[t * K + k], f);
                }
            }
        }
        float acc[V];
#pragma unroll
        for (int j = 0; j < V; j++) acc[j] = 0.0f;
        /* Rank by rank up: rank q's experts are the ids [q L, (q + 1) L); `lo`: the first id
         * not summed yet (the -1 ids never count). */
        for (int lo = 0;;) {
            int first = INT_MAX;
#pragma unroll
            for (int k = 0; k < KM; k++) first = e[k] >= lo && e[k] < first ? e[k] : first;
            if (first == INT_MAX) break;
            int q = first / L, hi = (q + 1) * L;
            unsigned mask = 0;
#pragma unroll
            for (int k = 0; k < KM; k++) mask |= (unsigned)(e[k] >= lo && e[k] < hi) << k;
            float part[V];
#pragma unroll
            for (int j = 0; j < V; j++) part[j] = 0.0f;
            const char *home = epx__llc_home(c, c.cstage[me], par, q, t);
            if (q != me && (mask & (mask - 1)) != 0) {
                epx__llc_load_f32<V>(home, ch, part);
            } else if (q != me) { /* one expert there: its y row, weighed here */
                typename epx__llc_vec<DT>::raw h;
                epx__llc_fetch(home, dtype, ch, &h);
                float f[V];
                epx__llc_unpack<DT>(h, f);
                if constexpr (KM > 8) { /* (the weights past the first wave are not held) */
                    epx__llc_add<V>(part, c.w[t * K + __ffs(mask) - 1], f);
                } else {
#pragma unroll
                    for (int k = 0; k < KM; k++)
                        if ((mask >> k) & 1u) epx__llc_add<V>(part, w[k], f);
                }
            } else if constexpr (KM > 8) {
#pragma unroll
                for (int j = 0; j < V; j++) part[j] = mine[j];
            } else {
#pragma unroll
                for (int k = 0; k < KM; k++) {
                    if (!((mask >> k) & 1u)) continue;
                    float f[V];
                    epx__llc_unpack<DT>(r[k], f);
                    epx__llc_add<V>(part, w[k], f);
                }
            }
#pragma unroll
            for (int j = 0; j < V; j++) acc[j] = __fadd_rn(acc[j], part[j]);
            lo = hi;
        }
        if constexpr (DT >= 0)
            ((uint4 *)(c.out + t * rb))[ch] = epx__chunk_pack<DT>(acc);
        else
            epx__store_elem(c.out + t * rb, dtype, ch, acc[0]);
    }
}

/* A combine receive on one host is one kernel (with send_too, after the send's step): every
 * block waits for the peers' weights, sends its share of the rows home; the last block to
 * finish tells the peers theirs are in (LLC_PART); every block then waits for every peer's
 * and sums its share of my tokens. A block's wait depends on every other block of its
 * grid and of the peers' having run: the launch is cooperative (every block resident at
 * once, or the launch fails). The two steps are functions of their own, and c is read
 * where it lies (__grid_constant__): inlined into one kernel they spilled (248 bytes of
 * stores at K <= 8; each alone needs 105-114 registers), and one rank on an H200 took
 * 21.4-21.7 us at T = 128 against 15.7 as now. */
template <int KM, int DT>
static __global__ void __launch_bounds__(256, 2)
    epx__k_llc_combine(epx__cuda_dev_t d, const __grid_constant__ epx__ll_combine_t c, int send_too)
{
    __shared__ int ptok[EPX__CUDA_MAX_RANKS];
    unsigned long long n = epx__ll_next(&d, EPX__LL_COMBINE_RECVD);
    int par = (int)(n & 1ull);
    /* Bad routing at dispatch (or its receive failed: the handle was not written): nothing is
     * read or written, but the flags still go out. When my device has failed since, the
     * peers still get their rows (the handle and y are sound), my outputs nothing. */
    int bad = *c.h_bad, failed = (int)*(volatile const unsigned int *)d.failed;
    if ((int)threadIdx.x < c.nranks) ptok[threadIdx.x] = bad ? 0 : c.h_ptok[threadIdx.x];
    EPX__PROBE(2, EPX__PC_START);
    if (send_too && blockIdx.x == 0) epx__llc_publish(&d, c, n);
    bool live = epx__wait_peers(&d, EPX__FLAG_LLC_ARRIVE, n); /* syncs the block: ptok is set */
    EPX__PROBE(2, EPX__PC_ARRIVE);
    bool pushed = live && !bad && epx__llc_send_home<KM, DT>(c, par, ptok);
    EPX__PROBE(2, EPX__PC_PUSHED);
    /* All or nothing: when a block's wait failed, no LLC_PART goes out (the peers then time
     * out, rather than sum rows that were not pushed). The block's pushes, system-wide,
     * before it is counted (no fence when none pushed). */
    bool all;
    if (epx__ll_last_block_all(&d, EPX__LL_PART, live, &all, pushed) && all)
        epx__signal_peers(&d, EPX__FLAG_LLC_PART, n);
    bool home = live && epx__wait_peers(&d, EPX__FLAG_LLC_PART, n);
    EPX__PROBE(2, EPX__PC_PART);
    if (home && !bad && !failed) epx__llc_sum_home<KM, DT>(c, par);
    EPX__PROBE(2, EPX__PC_SUM);
    if (!epx__ll_last_block(&d, EPX__LL_COMBINE_RECVD)) return;
    if (send_too) epx__ll_complete(&d, EPX__LL_COMBINE_SENT, n);
    epx__ll_complete(&d, EPX__LL_COMBINE_RECVD, n);
    EPX__PROBE(2, EPX__PC_DONE);
}

/* Combine send on one host: one block pushes my weights. */
static __global__ void __launch_bounds__(256) epx__k_llc_send(epx__cuda_dev_t d, epx__ll_combine_t c)
{
    unsigned long long n = epx__ll_next(&d, EPX__LL_COMBINE_SENT);
    epx__llc_publish(&d, c, n);
    epx__ll_complete(&d, EPX__LL_COMBINE_SENT, n);
}

extern "C" int epx__cuda_launch_ll_combine_send(const epx__cuda_dev_t *d, const epx__ll_combine_t *c, void *stream)
{
    cudaError_t bad;
    bool X = epx__ll_across(d, &c->rail, &bad);
    if (bad != cudaSuccess) return (int)bad;
    if (X)
        epx__k_ll_combine_send<<<1, 32, 0, (cudaStream_t)stream>>>(*d);
    else
        epx__k_llc_send<<<1, 256, 0, (cudaStream_t)stream>>>(*d, *c);
    return (int)cudaGetLastError();
}

extern "C" int epx__cuda_launch_ll_combine(const epx__cuda_dev_t *d, const epx__ll_combine_t *c, int send_too,
                                           int blocks, void *stream)
{
    cudaError_t bad;
    bool X = epx__ll_across(d, &c->rail, &bad);
    if (bad != cudaSuccess) return (int)bad;
    bool k8 = c->topk <= 8; /* the instance whose per-token arrays hold 8 (no spills) */
    /* An instance per dtype when rows allow 16-byte accesses (the dtype known when
     * compiled; a thread per (token, 16-byte chunk)), else one for any (di 0). */
    int di = !c->vec ? 0 : c->dtype == EPX_BF16 ? 1 : c->dtype == EPX_F16 ? 2 : 3, ki = k8 ? 0 : 1;
    static const int per_item[4] = {epx__llc_vec<-1>::V, epx__llc_vec<EPX_BF16>::V, epx__llc_vec<EPX_F16>::V,
                                    epx__llc_vec<EPX_F32>::V};
    long long chunks = c->hidden / per_item[di];
    void (*kernel)(epx__cuda_dev_t, epx__ll_combine_t, int);
    if (X) {
        static void (*const across[4][2])(epx__cuda_dev_t, epx__ll_combine_t, int) = {
            {epx__k_ll_combine<8, -1>, epx__k_ll_combine<EPX_MOE_MAX_TOPK, -1>},
            {epx__k_ll_combine<8, EPX_BF16>, epx__k_ll_combine<EPX_MOE_MAX_TOPK, EPX_BF16>},
            {epx__k_ll_combine<8, EPX_F16>, epx__k_ll_combine<EPX_MOE_MAX_TOPK, EPX_F16>},
            {epx__k_ll_combine<8, EPX_F32>, epx__k_ll_combine<EPX_MOE_MAX_TOPK, EPX_F32>}};
        if (di) { /* enough threads for every item at once, up to a bound */
            long long b = ((long long)c->num_tokens * chunks + 255) / 256;
            blocks = (int)(b < 2048 ? (b > 0 ? b : 1) : 2048);
        }
        kernel = across[di][ki];
        int resident = epx__ll_resident((const void *)kernel, 256, 17 + 2 * di + ki);
        if (blocks > resident) blocks = resident; /* blocks stride over the work; even with no tokens */
        kernel<<<blocks, 256, 0, (cudaStream_t)stream>>>(*d, *c, send_too);
        return (int)cudaGetLastError();
    }
    /* One host: a thread per item (token, chunk) on the larger side (the peers' tokens here,
     * or mine), as many as are resident at once (a cooperative launch). */
    static void (*const one_host[4][2])(epx__cuda_dev_t, epx__ll_combine_t, int) = {
        {epx__k_llc_combine<8, -1>, epx__k_llc_combine<EPX_MOE_MAX_TOPK, -1>},
        {epx__k_llc_combine<8, EPX_BF16>, epx__k_llc_combine<EPX_MOE_MAX_TOPK, EPX_BF16>},
        {epx__k_llc_combine<8, EPX_F16>, epx__k_llc_combine<EPX_MOE_MAX_TOPK, EPX_F16>},
        {epx__k_llc_combine<8, EPX_F32>, epx__k_llc_combine<EPX_MOE_MAX_TOPK, EPX_F32>}};
    kernel = one_host[di][ki];
    long long most = (long long)(c->nranks - 1) * c->most_tokens;
    long long b = ((most > c->num_tokens ? most : c->num_tokens) * chunks + 255) / 256;
    int resident = epx__ll_resident((const void *)kernel, 256, 9 + 2 * di + ki);
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
#ifdef EPX_LL_PROBE
    epx__probe_grid[2] = (int)(b < 1 ? 1 : b < resident ? b : resident);
#endif
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.gridDim = dim3((unsigned)(b < 1 ? 1 : b < resident ? b : resident));
    cfg.blockDim = dim3(256);
    cfg.stream = (cudaStream_t)stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, *d, *c, send_too);
    (void)cudaGetLastError(); /* this launch's error is returned, not left for the next launcher to report */
    return (int)e;
}
