/*
 * Device-side ordering primitives shared by the CUDA kernels: release/acquire at system
 * scope, bounded waits that record which peer stalled, operation numbers, and the
 * last-block-finishes-the-operation step.
 */
#ifndef EPX_CUDA_FLAGS_CUH
#define EPX_CUDA_FLAGS_CUH

#include "dev.h"
#include "epx.h"

/* ---- Ordering primitives ----------------------------------------------------------------- */

static __device__ __forceinline__ void epx__st_release_sys(unsigned long long *p, unsigned long long v)
{
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

static __device__ __forceinline__ unsigned long long epx__ld_acquire_sys(const unsigned long long *p)
{
    unsigned long long v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

static __device__ __forceinline__ unsigned long long epx__globaltimer(void)
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

static __device__ __forceinline__ unsigned long long epx__op_number(const epx__cuda_dev_t *d)
{
    return *(volatile unsigned long long *)d->epoch + 1ull;
}

/* ---- The device's error record (dev.h: epx__cuda_err_t) ------------------------------------ */

/* Record error `code` (an epx_status_t) with its fields, unless an error is recorded (or
 * being recorded) already: the first error stays. First my device is marked failed
 * (d->failed, whichever error stays: the failure relay passes it on), unless `code` is
 * EPX_ERR_MISMATCH: a count mismatch (device counts) is no failure to relay, as it stops no
 * wait (epx__keep_waiting) and the rank that records it reports it itself; the mark follows
 * the code given, never the record (whose EPX__ERR_CLAIMED may be a mismatch being
 * written). Then the code is claimed (EPX__ERR_CLAIMED), the fields written and the code
 * published, each step fenced at system scope (the host reads the record in that order,
 * cuda.c: epx__cuda_check_async). True when this call's error is the one recorded. */
static __device__ bool epx__record_error(const epx__cuda_dev_t *d, int code, int peer, unsigned long long op,
                                         unsigned long long seen, unsigned long long wanted)
{
    volatile epx__cuda_err_t *e = d->err;
    if (code != EPX_ERR_MISMATCH) *(volatile unsigned int *)d->failed = 1u; /* read by my kernels only */
    if (atomicCAS((int *)&e->code, 0, EPX__ERR_CLAIMED) != 0) return false; /* the first error stays */
    e->peer = peer;
    e->op = op;
    e->seen = seen;
    e->wanted = wanted;
    __threadfence_system();
    e->code = code;
    __threadfence_system();
    return true;
}

/* ---- The failure relay inside a host (d->relay: cuda.h, epx__cuda_relay_failures) ---------- */

/* Flag `kind` from rank `from` in `owner`'s flags (mine: d->flags; a peer's: d->peer_flags[p]). */
static __device__ __forceinline__ unsigned long long *epx__flag(const epx__cuda_dev_t *d, unsigned long long *owner,
                                                               int kind, int from)
{
    return owner + ((size_t)kind * d->nranks + from) * EPX__FLAG_STRIDE;
}

/* One thread per peer p, before the store that tells p my segments of operation n are
 * written (a release store, or a system fence then a store; by this thread, or by another
 * after a barrier and its fence): when the relay is on and my
 * device has recorded an error other than a count mismatch (even one being written:
 * d->failed), FAILED from me = n at p first. */
static __device__ __forceinline__ void epx__relay_out(const epx__cuda_dev_t *d, int p, unsigned long long n)
{
    if (!d->relay || p == d->rank || *(volatile unsigned int *)d->failed == 0) return;
    epx__st_release_sys(epx__flag(d, d->peer_flags[p], EPX__FLAG_FAILED, d->rank), n);
    __threadfence_system(); /* before later relaxed stores too (the eager lines) */
}

/* Record EPX_ERR_PEER_FAILURE, relayed by local peer p with operation n (the first error stays). */
static __device__ void epx__relay_record(const epx__cuda_dev_t *d, int p, unsigned long long n)
{
    epx__record_error(d, EPX_ERR_PEER_FAILURE, p, n, 0, EPX__RELAYED_LOCAL);
}

/* Has peer p relayed a failure with its operation n or a later one? */
static __device__ __forceinline__ bool epx__relayed(const epx__cuda_dev_t *d, int p, unsigned long long n)
{
    return epx__ld_acquire_sys(epx__flag(d, d->flags, EPX__FLAG_FAILED, p)) >= n;
}

/* One thread per peer p, once it has seen (acquire, or a relaxed load then a system fence)
 * that p's segments of operation n are here: when p relayed a failure with them, record it. */
static __device__ void epx__relay_in(const epx__cuda_dev_t *d, int p, unsigned long long n)
{
    if (d->relay && p != d->rank && epx__relayed(d, p, n)) epx__relay_record(d, p, n);
}

/* Called every 256th round of a spin that began at `start`: 1 to keep waiting; 0 when
 * another wait already failed, when the peer relayed a failure with this operation or a
 * later one (a failed rank waits for nobody and may run ahead: what I wait for may never
 * come; recorded as relayed), or when this wait timed out (the first error is recorded:
 * the peer, the value seen and the one wanted). A recorded count mismatch (device counts)
 * stops no wait: the peers still write into my buffers, and the operation must not end
 * before they have. */
static __device__ int epx__keep_waiting(const epx__cuda_dev_t *d, unsigned long long start, int peer,
                                        unsigned long long seen, unsigned long long target)
{
    volatile epx__cuda_err_t *e = d->err;
    int code = e->code;
    if (code != 0 && code != EPX_ERR_MISMATCH && code != EPX__ERR_CLAIMED) return 0;
    if (d->relay && peer >= 0 && peer < d->nranks && peer != d->rank) {
        unsigned long long n = epx__op_number(d);
        if (epx__relayed(d, peer, n)) {
            epx__relay_record(d, peer, n);
            return 0;
        }
    }
    if (epx__globaltimer() - start > d->timeout_ns) {
        epx__record_error(d, EPX_ERR_TIMEOUT, peer, target, seen, target); /* the first error stays */
        return 0;
    }
    __nanosleep(64);
    return 1;
}

/* Wait until *flag >= target. On timeout (or when another wait already failed) record the
 * error and return 0. */
static __device__ int epx__wait_geq(const epx__cuda_dev_t *d, const unsigned long long *flag, unsigned long long target,
                                    int peer)
{
    unsigned long long start = epx__globaltimer();
    for (unsigned iter = 1;; iter++) {
        unsigned long long v = epx__ld_acquire_sys(flag);
        if (v >= target) return 1;
        if ((iter & 255u) == 0 && !epx__keep_waiting(d, start, peer, v, target)) return 0;
    }
}

/* This block is the last of the grid to finish: advance the epoch. */
static __device__ void epx__finish_op(const epx__cuda_dev_t *d, unsigned long long n)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        unsigned prev = atomicAdd(d->blocks_left, 1u);
        if (prev == gridDim.x - 1) {
            *d->blocks_left = 0;
            __threadfence();
            *(volatile unsigned long long *)d->epoch = n;
            __threadfence();
        }
    }
}

/* ---- Low-latency sequences ---------------------------------------------------------------- */

/* Number of the low-latency kernel of `kind` (EPX__LL_*) my stream runs now. */
static __device__ __forceinline__ unsigned long long epx__ll_next(const epx__cuda_dev_t *d, int kind)
{
    return *(volatile unsigned long long *)(d->ll_seq + kind) + 1ull;
}

/* Every thread of the block calls it, with `any`: did this thread store anything that a
 * peer must see? When some thread did, thread 0 fences at system scope after the barrier.
 * The barrier orders every thread's stores (NVLink pushes included) before thread 0's
 * fence and what thread 0 writes after it (a flag, a count): a fence then a write, the
 * release pattern at system scope. A thread other than 0 that writes a flag after this must
 * make it a release store (cumulative: it orders what the barrier ordered before it), or
 * fence itself; a relaxed store of its own is not ordered by thread 0's fence. One
 * fence a block, not one a thread: a fence in every thread cost the low-latency dispatch
 * send 1.6-1.8 us at T >= 128 (one H100). */
static __device__ __forceinline__ void epx__fence_sys(void) { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
static __device__ __forceinline__ void epx__block_fence_sys(bool any)
{
    if (__syncthreads_or(any) && threadIdx.x == 0) epx__fence_sys();
}

/* Every thread of every block calls this at its end, or at the end of a step counted
 * under a kind of its own (once per kind and kernel), with `ok` the same in the whole
 * block: true in the one block that gets here last (all other blocks of the grid have
 * finished, or finished that step), whose counter is then reset; *all (when not NULL):
 * every block came with ok. `pushed`: did this thread store anything a peer must see? When
 * some thread did, thread 0 fences at system scope after the barrier, before the count
 * (as epx__block_fence_sys, sharing the count's barrier). Grids of fewer than 65 536 blocks
 * (a failed block counts in the upper half of the word). */
static __device__ bool epx__ll_last_block_all(const epx__cuda_dev_t *d, int kind, bool ok, bool *all,
                                              bool pushed = false)
{
    __shared__ int last, fine;
    int sys = __syncthreads_or(pushed);
    if (threadIdx.x == 0) {
        if (sys) epx__fence_sys();
        /* acq_rel: this block's work (ordered by the barrier) before the count, and the
         * last block sees every other block's. One trip, not a fence and then an atomic. */
        unsigned prev, add = ok ? 1u : 0x10001u;
        asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;"
                     : "=r"(prev)
                     : "l"(d->ll_blocks + kind), "r"(add)
                     : "memory");
        last = (prev & 0xffffu) == gridDim.x - 1;
        fine = ok && (prev >> 16) == 0;
        if (last) d->ll_blocks[kind] = 0;
    }
    __syncthreads();
    if (all) *all = fine;
    return last;
}
static __device__ __forceinline__ bool epx__ll_last_block(const epx__cuda_dev_t *d, int kind)
{
    return epx__ll_last_block_all(d, kind, true, (bool *)0);
}

/* The last block: the kernel of `kind` numbered s is complete on my stream (a release
 * store: what the grid did comes before it; nothing after it in the kernel needs ordering,
 * the kernel's end does that for my stream). A counter that only my own GPU reads takes a
 * GPU-scope release; the dispatch receive's is also read by the peers over NVLink
 * (epx__ll_half_free, ld.acquire.sys) before they refill my staging, so it is released at
 * system scope: a GPU-scope store and another GPU's acquire are not a synchronising pair
 * in the PTX memory model. */
static __device__ __forceinline__ void epx__ll_complete(const epx__cuda_dev_t *d, int kind, unsigned long long s)
{
    if (threadIdx.x != 0) return;
    if (kind == EPX__LL_DISPATCH_RECVD)
        epx__st_release_sys(d->ll_seq + kind, s);
    else
        asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(d->ll_seq + kind), "l"(s) : "memory");
}

/* Threads p < R, p != me: flag `kind` from me = v at rank p, released at system scope: what
 * came before it on my stream, and what my grid did before it (ordered to this thread by a
 * barrier or the last-block count), reads of p's memory included, comes before p's acquire
 * of it. (A flag that only says "my reads are over" needs the release too: a relaxed store,
 * even after a GPU-scope fence, does not synchronise with another GPU's acquire in the PTX
 * memory model.) */
static __device__ __forceinline__ void epx__signal_peers(const epx__cuda_dev_t *d, int kind, unsigned long long v)
{
    int p = (int)threadIdx.x;
    if (p >= d->nranks || p == d->rank) return;
    epx__st_release_sys(d->peer_flags[p] + ((size_t)kind * d->nranks + d->rank) * EPX__FLAG_STRIDE, v);
}

/* Every thread of the block: 1 when every peer's flag `kind` here reached v (bounded). */
static __device__ int epx__wait_peers(const epx__cuda_dev_t *d, int kind, unsigned long long v)
{
    __shared__ int ok;
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    int p = (int)threadIdx.x;
    if (p < d->nranks && p != d->rank &&
        !epx__wait_geq(d, d->flags + ((size_t)kind * d->nranks + p) * EPX__FLAG_STRIDE, v, p))
        ok = 0;
    __syncthreads();
    int r = ok;
    __syncthreads();
    return r;
}

/* ---- An operation's ARRIVE and DONE steps inside its kernels ------------------------------ */

/* ARRIVE at the start of a kernel, instead of a launch of its own: every block tells every
 * peer my stream got to this operation (the same value each time: no block waits on
 * another block of mine being scheduled), then waits (bounded) until peer p got there too,
 * or with p < 0 every peer: after it the block may read their inputs. Every thread of
 * every block calls it, first. */
static __device__ void epx__arrive(const epx__cuda_dev_t *d, int p)
{
    unsigned long long n = epx__op_number(d);
    epx__signal_peers(d, EPX__FLAG_ARRIVE, n);
    if (p < 0) {
        epx__wait_peers(d, EPX__FLAG_ARRIVE, n);
        return;
    }
    if (threadIdx.x == 0 && p != d->rank)
        epx__wait_geq(d, d->flags + ((size_t)EPX__FLAG_ARRIVE * d->nranks + p) * EPX__FLAG_STRIDE, n, p);
    __syncthreads();
}

/* DONE at the end of a kernel, instead of a launch of its own: the block that finishes last
 * (every other block's reads of the peers are over) tells every peer, waits (bounded) until
 * every peer has told me, and completes the operation (the epoch advances), as a launch of
 * epx__cuda_launch_signal_wait(DONE, finish) after the kernel would. Every thread of every
 * block calls it once, last. */
static __device__ void epx__done(const epx__cuda_dev_t *d)
{
    __shared__ int last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(d->blocks_left, 1u) == gridDim.x * gridDim.y - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    unsigned long long n = epx__op_number(d);
    epx__signal_peers(d, EPX__FLAG_DONE, n);
    epx__wait_peers(d, EPX__FLAG_DONE, n);
    if (threadIdx.x == 0) {
        *d->blocks_left = 0;
        __threadfence();
        *(volatile unsigned long long *)d->epoch = n;
        __threadfence();
    }
}

#endif
