/*
 * CUDA backend kernels: flags between ranks (release/acquire at system scope, bounded
 * waits) and the one-kernel small alltoallv. Written in C style.
 */
#include <cuda_runtime.h>

#include "dev.h"
#include "epx.h"

#include "flags.cuh"

/* ---- Signal and wait ---------------------------------------------------------------------- */

/* With the failure relay on, every signal says whether my device had failed by then, and the
 * signal that finishes the operation (the copy-engine path's DONE) brings the peers' word. */
static __global__ void epx__k_signal_wait(epx__cuda_dev_t d, int kind, int finish)
{
    unsigned long long n = epx__op_number(&d);
    int p = (int)threadIdx.x;
    if (p < d.nranks && p != d.rank) {
        epx__relay_out(&d, p, n);
        epx__st_release_sys(epx__flag(&d, d.peer_flags[p], kind, d.rank), n);
        if (epx__wait_geq(&d, epx__flag(&d, d.flags, kind, p), n, p) && finish) epx__relay_in(&d, p, n);
    }
    if (finish) epx__finish_op(&d, n);
}

extern "C" int epx__cuda_launch_signal_wait(const epx__cuda_dev_t *d, int kind, int finish, void *stream)
{
    int threads = (d->nranks + 31) / 32 * 32;
    epx__k_signal_wait<<<1, threads, 0, (cudaStream_t)stream>>>(*d, kind, finish);
    return (int)cudaGetLastError();
}

/* ---- Small alltoallv through the eager slots ------------------------------------------------ */

/* Block-wide copy of `bytes` (16- or 4-byte words when both ends allow it; 16-byte
 * loads are issued four at a time per thread to keep several in flight). */
static __device__ void epx__block_copy(char *dst, const char *src, long long bytes)
{
    unsigned long long align = (unsigned long long)dst | (unsigned long long)src;
    long long done = 0;
    if ((align & 15ull) == 0) {
        long long n16 = bytes / 16, stride = (long long)blockDim.x;
        const uint4 *s = (const uint4 *)src;
        uint4 *t = (uint4 *)dst;
        long long i = threadIdx.x;
        for (; i + 3 * stride < n16; i += 4 * stride) {
            uint4 a = s[i], b = s[i + stride], c = s[i + 2 * stride], e = s[i + 3 * stride];
            t[i] = a, t[i + stride] = b, t[i + 2 * stride] = c, t[i + 3 * stride] = e;
        }
        for (; i < n16; i += stride) t[i] = s[i];
        done = n16 * 16;
    } else if ((align & 3ull) == 0) {
        long long n4 = bytes / 4;
        const unsigned *s = (const unsigned *)src;
        unsigned *t = (unsigned *)dst;
        for (long long i = threadIdx.x; i < n4; i += blockDim.x) t[i] = s[i];
        done = n4 * 4;
    }
    for (long long i = done + threadIdx.x; i < bytes; i += blockDim.x) dst[i] = src[i];
}

/* ---- Lines: 8 bytes of data and the operation's flag in every 16 bytes ----------------- */

/* A line is {lo, f, hi, f}. Each 8-byte half is stored and loaded in one piece, so a reader
 * that sees flag f in both halves holds both data words of operation f: no fence before a
 * flag, no flag round trip after the data (this relies on an aligned 8-byte half of a
 * 16-byte store arriving whole, over NVLink too, as NCCL's LL protocol does). f is the
 * operation number n mapped to [1, 2^32 - 1] (epx__line_flag): never 0, the value of a
 * fresh slot and of a slot's words a raw segment left (the reader clears them after its
 * copy), and never the number of the slot's previous operation n - 2. */
static __device__ __forceinline__ unsigned epx__line_flag(unsigned long long n)
{
    return (unsigned)(n % 0xffffffffull) + 1u;
}

static __device__ __forceinline__ void epx__st_line(uint4 *p, uint4 v)
{
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

static __device__ __forceinline__ uint4 epx__ld_line(const uint4 *p)
{
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

/* Bytes [8i, 8i + 8) of src[0, bytes), zeros past the end, as two little-endian words. */
static __device__ __forceinline__ uint2 epx__load8(const char *src, long long bytes, long long i)
{
    long long o = 8 * i;
    if (o + 8 <= bytes && ((unsigned long long)(src + o) & 7ull) == 0) return *(const uint2 *)(src + o);
    unsigned long long w = 0;
    for (int j = 0; j < 8 && o + j < bytes; j++) w |= (unsigned long long)(unsigned char)src[o + j] << (8 * j);
    return make_uint2((unsigned)w, (unsigned)(w >> 32));
}

/* The inverse: dst[8i, min(8i + 8, bytes)) from two words. */
static __device__ __forceinline__ void epx__store8(char *dst, long long bytes, long long i, uint2 v)
{
    long long o = 8 * i;
    if (o + 8 <= bytes && ((unsigned long long)(dst + o) & 7ull) == 0) {
        *(uint2 *)(dst + o) = v;
        return;
    }
    unsigned long long w = (unsigned long long)v.x | (unsigned long long)v.y << 32;
    for (int j = 0; j < 8 && o + j < bytes; j++) dst[o + j] = (char)(w >> (8 * j));
}

/* Lines a segment of `bytes` takes: at least one, so that a peer always hears from me. */
static __device__ __forceinline__ long long epx__lines(long long bytes) { return bytes > 0 ? (bytes + 7) / 8 : 1; }

/* Block-wide: src[0, bytes) as lines of flag f into a peer's slot. */
static __device__ void epx__lines_put(uint4 *slot, const char *src, long long bytes, unsigned f)
{
    for (long long i = threadIdx.x; i < epx__lines(bytes); i += blockDim.x) {
        uint2 v = epx__load8(src, bytes, i);
        epx__st_line(slot + i, make_uint4(v.x, f, v.y, f));
    }
}

/* Block-wide: the peer's segment from my slot into dst[0, bytes), each line as soon as it
 * carries flag f (bounded waits). 0 when a wait failed: the lines that had arrived are
 * written, the others not. With `relay` every thread fences after its loads, before the
 * block's barrier: what the peer wrote before its lines (a relayed failure) is then
 * visible to the thread that looks after it. */
static __device__ int epx__lines_get(const epx__cuda_dev_t *d, char *dst, const uint4 *slot, long long bytes,
                                     unsigned long long n, int peer, bool relay)
{
    __shared__ int ok;
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    unsigned f = epx__line_flag(n);
    bool good = true;
    for (long long i = threadIdx.x; good && i < epx__lines(bytes); i += blockDim.x) {
        unsigned long long start = epx__globaltimer();
        uint4 v = epx__ld_line(slot + i);
        for (unsigned iter = 1; good && !(v.y == f && v.w == f); iter++) {
            if ((iter & 255u) == 0) /* (the flag read back as an operation number: 0 for none) */
                good = epx__keep_waiting(d, start, peer, v.y ? v.y - 1u : 0u, n);
            v = epx__ld_line(slot + i);
        }
        if (good) epx__store8(dst, bytes, i, make_uint2(v.x, v.z));
    }
    if (!good) ok = 0;
    if (relay) __threadfence_system();
    __syncthreads();
    int r = ok;
    __syncthreads();
    return r;
}

/* Block p sends my segment for rank p into p's slot, then receives p's segment for me.
 * Segments up to half a slot go as lines (the pair's count, agreed on the host, picks the
 * format on both sides); larger ones as data, a system fence, then the slot's flag. A slot
 * (one per parity) is written again two operations later: by then the peer has heard from
 * me in the operation between (every operation waits on every pair), which my stream ran
 * after this kernel, so my reads and clears of the slot are over. */
static __global__ void epx__k_eager_alltoallv(epx__cuda_dev_t d, epx__cuda_a2a_args_t a)
{
    __shared__ int ok;
    unsigned long long n = epx__op_number(&d);
    int p = (int)blockIdx.x, me = d.rank, R = d.nranks;
    size_t slot = EPX__SLOT_HDR + d.eager_bytes, par = (size_t)(n & 1ull);
    long long line_max = (long long)d.eager_bytes / 2;
    if (p == me) {
        epx__block_copy(a.recv + a.recv_displ[me], a.send + a.send_displ[me], a.send_bytes[me]);
    } else {
        char *s = d.peer_eager[p] + (par * R + me) * slot;
        char *mine = d.eager + (par * R + p) * slot;
        if (d.relay) { /* the same for the whole block: its barrier stays legal */
            if (threadIdx.x == 0) epx__relay_out(&d, p, n); /* before the lines, or the slot's flag */
            __syncthreads();
            __threadfence_system(); /* in every thread: each line it stores follows a relayed failure */
        }
        if (a.send_bytes[p] <= line_max) {
            epx__lines_put((uint4 *)(s + EPX__SLOT_HDR), a.send + a.send_displ[p], a.send_bytes[p], epx__line_flag(n));
        } else {
            epx__block_copy(s + EPX__SLOT_HDR, a.send + a.send_displ[p], a.send_bytes[p]);
            epx__block_fence_sys(true); /* the block's stores reach the peer before the flag */
            if (threadIdx.x == 0) epx__st_release_sys((unsigned long long *)s, n);
        }
        if (a.recv_bytes[p] <= line_max) {
            if (epx__lines_get(&d, a.recv + a.recv_displ[p], (const uint4 *)(mine + EPX__SLOT_HDR), a.recv_bytes[p], n,
                               p, d.relay) &&
                threadIdx.x == 0 && d.relay)
                epx__relay_in(&d, p, n); /* every thread fenced after its lines, then the barrier */
        } else {
            if (threadIdx.x == 0) ok = epx__wait_geq(&d, (const unsigned long long *)mine, n, p);
            if (threadIdx.x == 0 && ok) epx__relay_in(&d, p, n);
            __syncthreads();
            if (ok) {
                epx__block_copy(a.recv + a.recv_displ[p], mine + EPX__SLOT_HDR, a.recv_bytes[p]);
                /* Raw bytes left in the slot could look like a later operation's lines
                 * (words 1 and 3 of a 16-byte unit equal to its flag): clear them. The
                 * peer writes this slot again only after my next operation's signal,
                 * which follows this kernel. */
                __syncthreads();
                uint4 *u = (uint4 *)(mine + EPX__SLOT_HDR);
                for (long long i = threadIdx.x; i < (a.recv_bytes[p] + 15) / 16; i += blockDim.x)
                    u[i] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    }
    epx__finish_op(&d, n);
}

extern "C" int epx__cuda_launch_eager_alltoallv(const epx__cuda_dev_t *d, const epx__cuda_a2a_args_t *a, void *stream)
{
    epx__k_eager_alltoallv<<<d->nranks, 256, 0, (cudaStream_t)stream>>>(*d, *a);
    return (int)cudaGetLastError();
}

/* ---- Mid-size alltoallv written straight into the peers ------------------------------------------ */

/* The bytes of all segments, concatenated in rank order, are split evenly over the blocks.
 * Before writing into a peer a block waits for the peer's arrival (its receive buffer is
 * free); after its writes every block adds 1 to its WRITTEN counter at every peer. The
 * last block to finish waits until every peer's blocks have written into me. */
/* A pair's counts disagree (device counts): record it; the pair moves nothing. */
static __device__ void epx__record_mismatch(const epx__cuda_dev_t *d, int peer, unsigned long long n, long long mine,
                                            long long theirs)
{
    epx__record_error(d, EPX_ERR_MISMATCH, peer, n, (unsigned long long)theirs, (unsigned long long)mine);
}

static __global__ void epx__k_direct_alltoallv(epx__cuda_dev_t d, epx__cuda_direct_args_t a)
{
    __shared__ int ok;
    unsigned long long n = epx__op_number(&d);
    int me = d.rank, R = d.nranks;
    /* Each pair's bytes and source, from the arguments or from my device counts. */
    __shared__ long long bytes[EPX__CUDA_MAX_RANKS];
    __shared__ const char *src[EPX__CUDA_MAX_RANKS];
    if ((int)threadIdx.x < R) {
        int p = (int)threadIdx.x;
        bytes[p] = a.bytes[p], src[p] = a.src[p];
        if (a.elem > 0) {
            long long c = a.send_counts[p], s = a.send_displs[p];
            bytes[p] = c > 0 && s >= 0 ? c * a.elem : 0;
            src[p] += (s >= 0 ? s : 0) * a.elem;
            if (p + 1 == a.fault_to) bytes[p] += a.elem; /* injected: the pair disagrees, nothing moves */
        }
    }
    __syncthreads();
    if (blockIdx.x == 0 && (int)threadIdx.x < R && (int)threadIdx.x != me)
        epx__st_release_sys(d.peer_flags[threadIdx.x] + ((size_t)EPX__FLAG_ARRIVE * R + me) * EPX__FLAG_STRIDE, n);
    long long total = 0;
    for (int p = 0; p < R; p++) total += bytes[p];
    long long chunk = ((total + gridDim.x - 1) / gridDim.x + 15) / 16 * 16;
    long long lo = chunk * blockIdx.x, hi = lo + chunk < total ? lo + chunk : total, base = 0;
    for (int i = 0; i < R; i++) {
        int p = (me + i) % R; /* rank order would send every block to the same peer first */
        long long b0 = base, b1 = base + bytes[p];
        base = b1;
        long long s0 = lo > b0 ? lo : b0, s1 = hi < b1 ? hi : b1;
        if (s0 >= s1) continue;
        if (p != me) {
            if (threadIdx.x == 0)
                ok = epx__wait_geq(&d, d.flags + ((size_t)EPX__FLAG_ARRIVE * R + p) * EPX__FLAG_STRIDE, n, p);
            __syncthreads();
            int good = ok;
            __syncthreads(); /* everyone has read `ok` before thread 0 may set it again */
            if (!good) break;
        }
        char *dst = a.dst[p];
        if (a.elem > 0) { /* the peer's side, read once its stream is here */
            long long theirs = a.recv_counts[p][me], at = a.recv_displs[p][me];
            if (theirs * a.elem != bytes[p] || at < 0) {
                if (threadIdx.x == 0) epx__record_mismatch(&d, p, n, bytes[p] / a.elem, theirs);
                continue;
            }
            dst += at * a.elem;
        }
        epx__block_copy(dst + (s0 - b0), src[p] + (s0 - b0), s1 - s0);
    }
    /* Device counts: a pair I send nothing to must expect nothing. Checked before any block
     * tells p it is done (after that p may rewrite its counts for its next operation). */
    if (a.elem > 0 && blockIdx.x == 0 && (int)threadIdx.x < R && bytes[threadIdx.x] == 0) {
        int p = (int)threadIdx.x;
        if (p == me || epx__wait_geq(&d, d.flags + ((size_t)EPX__FLAG_ARRIVE * R + p) * EPX__FLAG_STRIDE, n, p)) {
            long long theirs = a.recv_counts[p][me];
            if (theirs != 0) epx__record_mismatch(&d, p, n, 0, theirs);
        }
    }
    if ((int)threadIdx.x < R) epx__relay_out(&d, (int)threadIdx.x, n); /* also for segments this block skipped */
    epx__block_fence_sys(true); /* the block's stores reach the peers before the counts */
    if (threadIdx.x == 0)
        for (int p = 0; p < R; p++)
            if (p != me) atomicAdd_system(d.peer_flags[p] + ((size_t)EPX__FLAG_WRITTEN * R + me) * EPX__FLAG_STRIDE, 1ull);
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        unsigned prev = atomicAdd(d.blocks_left, 1u);
        ok = prev == gridDim.x - 1;
    }
    __syncthreads();
    if (!ok) return;
    /* The last block: everyone's writes into me are complete, then the epoch advances. */
    int p = (int)threadIdx.x;
    if (p < R && p != me &&
        epx__wait_geq(&d, d.flags + ((size_t)EPX__FLAG_WRITTEN * R + p) * EPX__FLAG_STRIDE,
                      (*(volatile unsigned long long *)d.direct_ops + 1ull) * (unsigned long long)gridDim.x, p))
        epx__relay_in(&d, p, n);
    __syncthreads();
    if (threadIdx.x == 0) {
        *d.blocks_left = 0;
        *(volatile unsigned long long *)d.direct_ops += 1ull;
        __threadfence();
        *(volatile unsigned long long *)d.epoch = n;
        __threadfence();
    }
}

extern "C" int epx__cuda_launch_direct_alltoallv(const epx__cuda_dev_t *d, const epx__cuda_direct_args_t *a,
                                                 void *stream)
{
    epx__k_direct_alltoallv<<<EPX__DIRECT_BLOCKS, 512, 0, (cudaStream_t)stream>>>(*d, *a);
    return (int)cudaGetLastError();
}

/* ---- The failure relay (cuda.h: epx__cuda_status_out / _check) ---- */

/* A status: [0] 1 failed or 2 fine, [1] the sender's rank, [2] its error, [3] the exchange. */
enum { EPX__STATUS_FAILED = 1, EPX__STATUS_FINE = 2 };

static __global__ void epx__k_status_out(epx__cuda_dev_t d, int rank, unsigned seq, int *out)
{
    /* Failed as the relay inside the host says it (d.failed: even an error being written,
     * never a count mismatch alone); the record's code, when there is one, says which. */
    bool failed = *(volatile unsigned int *)d.failed != 0;
    int code = failed ? *(volatile int *)&d.err->code : 0;
    out[0] = failed ? EPX__STATUS_FAILED : EPX__STATUS_FINE, out[1] = rank;
    out[2] = code == 0 || code == EPX__ERR_CLAIMED ? (int)EPX_ERR_PEER_FAILURE : code, out[3] = (int)seq;
}

static __global__ void epx__k_status_check(epx__cuda_dev_t d, const int *in, int first, int step, int count, int self,
                                           unsigned seq)
{
    for (int j = 0; j < count; j++) {
        int i = first + j * step;
        if (i == self) continue;
        const int *s = in + 4 * i;
        bool missing = (unsigned)s[3] != seq || (s[0] != EPX__STATUS_FAILED && s[0] != EPX__STATUS_FINE);
        if (!missing && s[0] == EPX__STATUS_FINE) continue;
        epx__record_error(&d, EPX_ERR_PEER_FAILURE, missing ? -1 : s[1], (unsigned long long)i,
                          missing ? 0ull : (unsigned long long)(unsigned)s[2], EPX__RELAYED_ACROSS);
        return; /* the first error stays */
    }
}

int epx__cuda_launch_status_out(const epx__cuda_dev_t *d, int rank, unsigned seq, int *out, void *stream)
{
    epx__k_status_out<<<1, 1, 0, (cudaStream_t)stream>>>(*d, rank, seq, out);
    return (int)cudaGetLastError();
}

int epx__cuda_launch_status_check(const epx__cuda_dev_t *d, const int *in, int first, int step, int count, int self,
                                  unsigned seq, void *stream)
{
    if (count < 1) return (int)cudaSuccess;
    epx__k_status_check<<<1, 1, 0, (cudaStream_t)stream>>>(*d, in, first, step, count, self, seq);
    return (int)cudaGetLastError();
}

/* ---- EPX_FAULT fail (cuda.h: epx__cuda_inject_failure) ---- */

static __global__ void epx__k_inject(epx__cuda_dev_t d, int code)
{
    epx__record_error(&d, code, EPX__PEER_INJECTED, 0, 0, 0); /* the first error stays */
}

int epx__cuda_launch_inject(const epx__cuda_dev_t *d, int code, void *stream)
{
    epx__k_inject<<<1, 1, 0, (cudaStream_t)stream>>>(*d, code);
    return (int)cudaGetLastError();
}
