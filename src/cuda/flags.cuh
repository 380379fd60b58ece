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
                if (atomicCAS((int *)&e->code, 0, EPX__ERR_CLAIMED) != 0) return 0; /* the first error stays */
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

#endif
