/*
 * The GPU's float32 conversions (src/core/convert.h: FP8 e4m3, bf16 and f16 pairs, each one
 * instruction on the GPUs that have it) against the formulas the CPU backend runs, for
 * every float32 bit pattern in both halves of the pair: dispatched FP8 rows and combined
 * bf16/f16 sums must be the same bits on both backends. A conversion is skipped (saying why)
 * on a GPU without its instruction (FP8: compute capability 8.9; bf16, f16: 8.0) or when the
 * build's GPU code is for a target below that; exits 77 when all are, or without a GPU.
 */
#include <cuda_runtime.h>
#include <stdio.h>

#include "core/convert.h"

#define TEST_SKIP 77

enum { CONV_FP8, CONV_BF16, CONV_F16, CONV_COUNT };
static const char *const conv_name[CONV_COUNT] = {"fp8 e4m3", "bf16", "f16"};
static const int conv_arch[CONV_COUNT] = {89, 80, 80}; /* where convert.h uses the instruction */

struct conv_result {
    unsigned long long mismatches, nan_pairs;
    unsigned int first_input, first_got, first_want; /* the lowest mismatching input */
    int arch;                                        /* the GPU code's target (__CUDA_ARCH__ / 10) */
};

/* The pair (lo, hi) on the GPU's path and by the host's formula. */
static __device__ void conv_pair(int which, float lo, float hi, unsigned int *got, unsigned int *want)
{
    switch (which) {
    case CONV_FP8:
        *got = epx__fp8x2_from_f32(lo, hi);
        *want = epx__fp8_from_f32_formula(lo) | (unsigned int)epx__fp8_from_f32_formula(hi) << 8;
        break;
    case CONV_BF16:
        *got = epx__bf16x2_from_f32(lo, hi);
        *want = epx__f32_to_bf16(lo) | (unsigned int)epx__f32_to_bf16(hi) << 16;
        break;
    default:
        *got = epx__f16x2_from_f32(lo, hi);
        *want = epx__f32_to_f16(lo) | (unsigned int)epx__f32_to_f16(hi) << 16;
        break;
    }
}

/* Input u goes to the low half, its bit complement to the high half of the same pair. */
static __global__ void conv_check(int which, conv_result *r)
{
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
#ifdef __CUDA_ARCH__
    if (blockIdx.x == 0 && threadIdx.x == 0) r->arch = __CUDA_ARCH__ / 10;
#endif
    unsigned long long nans = 0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32);
         i += stride) {
        unsigned int u = (unsigned int)i, got, want;
        float lo = epx__bits_f32(u), hi = epx__bits_f32(~u);
        nans += lo != lo || hi != hi;
        conv_pair(which, lo, hi, &got, &want);
        if (got == want) continue;
        atomicAdd(&r->mismatches, 1ull);
        if (atomicMin(&r->first_input, u) > u) { /* racy among mismatches, enough to print one */
            r->first_got = got;
            r->first_want = want;
        }
    }
    atomicAdd(&r->nan_pairs, nans);
}

int main(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        printf("SKIPPED: no CUDA device here (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return TEST_SKIP;
    }
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return 1;
    int failed = 0, checked = 0, cc = prop.major * 10 + prop.minor;
    for (int which = 0; which < CONV_COUNT; which++) {
        if (cc < conv_arch[which]) {
            printf("skipped %s: %s (sm_%d) lacks its conversion instruction; the GPU runs the CPU's formula\n",
                   conv_name[which], prop.name, cc);
            continue;
        }
        conv_result init = {0, 0, 0xffffffffu, 0, 0, 0}, r;
        conv_result *d = NULL;
        if (cudaMalloc(&d, sizeof *d) != cudaSuccess ||
            cudaMemcpy(d, &init, sizeof init, cudaMemcpyHostToDevice) != cudaSuccess)
            return 1;
        conv_check<<<prop.multiProcessorCount * 8, 256>>>(which, d);
        e = cudaDeviceSynchronize();
        if (e != cudaSuccess || cudaMemcpy(&r, d, sizeof r, cudaMemcpyDeviceToHost) != cudaSuccess) {
            printf("FAIL: the %s check kernel: %s\n", conv_name[which],
                   cudaGetErrorString(e != cudaSuccess ? e : cudaGetLastError()));
            return 1;
        }
        cudaFree(d);
        if (r.arch < conv_arch[which]) { /* the kernel compared the formula with itself: nothing was checked */
            printf("skipped %s: this build's GPU code is for sm_%d (CMAKE_CUDA_ARCHITECTURES), below sm_%d, so the "
                   "GPU runs the CPU's formula\n", conv_name[which], r.arch, conv_arch[which]);
            continue;
        }
        checked++;
        /* A half is NaN for 2^24 - 2 patterns (2^23 - 1 of each sign), and never both halves
         * (~u's exponent is 0 where u's is all ones). */
        printf("%s on %s (sm_%d%d): 2^32 float32 inputs in each half (%llu pairs with a NaN), %llu mismatches\n",
               conv_name[which], prop.name, prop.major, prop.minor, r.nan_pairs, r.mismatches);
        if (r.nan_pairs != 2ull * ((1ull << 24) - 2)) {
            printf("FAIL: the NaN inputs were not all visited\n");
            failed = 1;
        }
        if (r.mismatches) {
            printf("FAIL: input 0x%08x: pair 0x%08x on the GPU, 0x%08x by the formula\n", r.first_input, r.first_got,
                   r.first_want);
            failed = 1;
        }
    }
    if (failed) return 1;
    if (!checked) {
        printf("SKIPPED: no conversion instruction to check here (see above)\n");
        return TEST_SKIP;
    }
    printf("test_cuda_convert: passed\n");
    return 0;
}
