/*
 * The GPU's float32 -> FP8 e4m3 conversion (src/core/convert.h, epx__fp8x2_from_f32: one
 * instruction on compute capability 8.9 and up) against the formula the CPU backend runs,
 * for every float32 bit pattern, in both halves of the pair: the dispatch's FP8 rows must
 * be the same bits on both backends. Exits 77 (skipped, saying why) without a GPU, on a GPU
 * without the instruction, or when the build's GPU code does not use it.
 */
#include <cuda_runtime.h>
#include <stdio.h>

#include "core/convert.h"

#define TEST_SKIP 77

struct fp8_result {
    unsigned long long mismatches;
    unsigned int first_input, first_got, first_want; /* the lowest mismatching input */
    int instruction;                                 /* the GPU code converts with cvt (sm_89 and up) */
};

/* Input u goes to the low half, its bit complement to the high half of the same pair. */
static __global__ void fp8_check(fp8_result *r)
{
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
#if __CUDA_ARCH__ >= 890
    if (blockIdx.x == 0 && threadIdx.x == 0) r->instruction = 1;
#endif
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32);
         i += stride) {
        unsigned int u = (unsigned int)i;
        float lo = epx__bits_f32(u), hi = epx__bits_f32(~u);
        unsigned int got = epx__fp8x2_from_f32(lo, hi);
        unsigned int want = epx__fp8_from_f32_formula(lo) | (unsigned int)epx__fp8_from_f32_formula(hi) << 8;
        if (got == want) continue;
        atomicAdd(&r->mismatches, 1ull);
        if (atomicMin(&r->first_input, u) > u) { /* racy among mismatches, enough to print one */
            r->first_got = got;
            r->first_want = want;
        }
    }
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
    if (prop.major * 10 + prop.minor < 89) {
        printf("SKIPPED: %s (sm_%d%d) has no FP8 conversion instruction; the GPU runs the CPU's formula\n", prop.name,
               prop.major, prop.minor);
        return TEST_SKIP;
    }
    fp8_result init = {0, 0xffffffffu, 0, 0, 0}, r;
    fp8_result *d = NULL;
    if (cudaMalloc(&d, sizeof *d) != cudaSuccess || cudaMemcpy(d, &init, sizeof init, cudaMemcpyHostToDevice) != cudaSuccess)
        return 1;
    fp8_check<<<prop.multiProcessorCount * 8, 256>>>(d);
    e = cudaDeviceSynchronize();
    if (e != cudaSuccess || cudaMemcpy(&r, d, sizeof r, cudaMemcpyDeviceToHost) != cudaSuccess) {
        printf("FAIL: the check kernel: %s\n", cudaGetErrorString(e != cudaSuccess ? e : cudaGetLastError()));
        return 1;
    }
    cudaFree(d);
    if (!r.instruction) { /* the kernel compared the formula with itself: nothing was checked */
        printf("SKIPPED: this build's GPU code is for a target below sm_89 (CMAKE_CUDA_ARCHITECTURES), so the GPU "
               "runs the CPU's formula and the instruction is not used\n");
        return TEST_SKIP;
    }
    printf("fp8 e4m3 on %s (sm_%d%d): 2^32 float32 inputs in each half, %llu mismatches\n", prop.name, prop.major,
           prop.minor, r.mismatches);
    if (r.mismatches) {
        printf("FAIL: input 0x%08x: pair 0x%04x on the GPU, 0x%04x by the formula\n", r.first_input, r.first_got,
               r.first_want);
        return 1;
    }
    printf("test_cuda_fp8: passed\n");
    return 0;
}
