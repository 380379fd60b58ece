/*
 * CUDA backend kernels: flags between ranks (release/acquire at system scope, bounded
 * waits) and the one-kernel small alltoallv. Written in C style.
 */
#include <cuda_runtime.h>

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

/* Wait until *flag >= target. On timeout (or when another wait already failed) record the
 * error and return 0. */
static __device__ int epx__wait_geq(const epx__cuda_dev_t *d, const unsigned long long *flag, unsigned long long target,
                                    int peer)
{
    unsigned long long start = epx__globaltimer();
    for (unsigned iter = 1;; iter++) {
        unsigned long long v = epx__ld_acquire_sys(flag);
        if (v >= target) return 1;
        if ((iter & 255u) == 0) {
            volatile epx__cuda_err_t *e = d->err;
            if (e->code != 0) return 0;
            if (epx__globaltimer() - start > d->timeout_ns) {
                e->peer = peer;
                e->op = target;
                e->seen = v;
                e->wanted = target;
                __threadfence_system();
                e->code = EPX_ERR_TIMEOUT;
                __threadfence_system();
                return 0;
            }
            __nanosleep(64);
        }
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

/* ---- Signal and wait ---------------------------------------------------------------------- */

static __global__ void epx__k_signal_wait(epx__cuda_dev_t d, int kind, int finish)
{
    unsigned long long n = epx__op_number(&d);
    int p = (int)threadIdx.x;
    if (p < d.nranks && p != d.rank)
        epx__st_release_sys(d.peer_flags[p] + ((size_t)kind * d.nranks + d.rank) * EPX__FLAG_STRIDE, n);
    if (p < d.nranks && p != d.rank)
        epx__wait_geq(&d, d.flags + ((size_t)kind * d.nranks + p) * EPX__FLAG_STRIDE, n, p);
    if (finish) epx__finish_op(&d, n);
}

extern "C" int epx__cuda_launch_signal_wait(const epx__cuda_dev_t *d, int kind, int finish, void *stream)
{
    int threads = (d->nranks + 31) / 32 * 32;
    epx__k_signal_wait<<<1, threads, 0, (cudaStream_t)stream>>>(*d, kind, finish);
    return (int)cudaGetLastError();
}

/* ---- Small alltoallv through the eager slots ------------------------------------------------ */

/* Block-wide copy of `bytes` (16-byte vectors when both ends allow it). */
static __device__ void epx__block_copy(char *dst, const char *src, long long bytes)
{
    if ((((unsigned long long)dst | (unsigned long long)src) & 15ull) == 0) {
        long long n16 = bytes / 16;
        const uint4 *s = (const uint4 *)src;
        uint4 *t = (uint4 *)dst;
        for (long long i = threadIdx.x; i < n16; i += blockDim.x) t[i] = s[i];
        for (long long i = n16 * 16 + threadIdx.x; i < bytes; i += blockDim.x) dst[i] = src[i];
    } else {
        for (long long i = threadIdx.x; i < bytes; i += blockDim.x) dst[i] = src[i];
    }
}

/* Block p sends my segment for rank p into p's slot, then receives p's segment for me. */
static __global__ void epx__k_eager_alltoallv(epx__cuda_dev_t d, epx__cuda_a2a_args_t a)
{
    __shared__ int ok;
    unsigned long long n = epx__op_number(&d);
    int p = (int)blockIdx.x, me = d.rank, R = d.nranks;
    size_t slot = EPX__SLOT_HDR + d.eager_bytes, par = (size_t)(n & 1ull);
    if (p == me) {
        epx__block_copy(a.recv + a.recv_displ[me], a.send + a.send_displ[me], a.send_bytes[me]);
    } else {
        char *s = d.peer_eager[p] + (par * R + me) * slot;
        epx__block_copy(s + EPX__SLOT_HDR, a.send + a.send_displ[p], a.send_bytes[p]);
        __syncthreads();
        if (threadIdx.x == 0) epx__st_release_sys((unsigned long long *)s, n);
        char *mine = d.eager + (par * R + p) * slot;
        if (threadIdx.x == 0) ok = epx__wait_geq(&d, (const unsigned long long *)mine, n, p);
        __syncthreads();
        if (ok) epx__block_copy(a.recv + a.recv_displ[p], mine + EPX__SLOT_HDR, a.recv_bytes[p]);
    }
    epx__finish_op(&d, n);
}

extern "C" int epx__cuda_launch_eager_alltoallv(const epx__cuda_dev_t *d, const epx__cuda_a2a_args_t *a, void *stream)
{
    epx__k_eager_alltoallv<<<d->nranks, 256, 0, (cudaStream_t)stream>>>(*d, *a);
    return (int)cudaGetLastError();
}
