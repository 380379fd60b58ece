/*
 * Element conversions as inline functions shared by host code (C) and kernels (CUDA C), so
 * that both produce the same bits: round to nearest even, NaN stays NaN (quiet).
 */
#ifndef EPX_CONVERT_H
#define EPX_CONVERT_H

#include <stdint.h>

#ifdef __CUDACC__
#define EPX__HD static __host__ __device__ __forceinline__
#else
#define EPX__HD static inline
#endif

EPX__HD uint32_t epx__f32_bits(float f)
{
    union {
        float f;
        uint32_t u;
    } x;
    x.f = f;
    return x.u;
}

EPX__HD float epx__bits_f32(uint32_t u)
{
    union {
        uint32_t u;
        float f;
    } x;
    x.u = u;
    return x.f;
}

EPX__HD float epx__bf16_to_f32(uint16_t v) { return epx__bits_f32((uint32_t)v << 16); }

EPX__HD uint16_t epx__f32_to_bf16(float f)
{
    uint32_t u = epx__f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* f, or the canonical NaN (bits 0x7fffffff) when f is NaN: what a GPU's float32 arithmetic
 * returns for every NaN result, where x86's passes on an operand's payload or makes its own
 * default NaN. The CPU backend's combine sums go through it, so that a NaN comes out with
 * the same bits on every backend (bf16 and f16: 0x7fff, by the roundings below). */
EPX__HD float epx__nan_canon(float f)
{
    uint32_t u = epx__f32_bits(f), nan = 0u - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u); /* a mask: vectorises */
    return epx__bits_f32((0x7fffffffu & nan) | (u & ~nan));
}

/* Two float32 -> bf16 as epx__f32_to_bf16 gives them, lo in the low half. On compute
 * capability 8.0 and up one instruction (cvt.rn.bf16x2.f32) when neither is NaN; a NaN keeps
 * the formula's bits (the instruction's NaN is canonical). tests/test_cuda_convert.cu checks
 * every float32 in both halves. The formula's bit arithmetic took most of the instructions
 * of the combines' sums, which at 24 SMs it bounded. */
EPX__HD uint32_t epx__bf16x2_from_f32(float lo, float hi)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (lo == lo && hi == hi) {
        uint32_t r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
#endif
    return epx__f32_to_bf16(lo) | (uint32_t)epx__f32_to_bf16(hi) << 16;
}

/* v >> shift, rounded to nearest even (shift <= 31). */
EPX__HD uint32_t epx__shift_rne(uint32_t v, unsigned shift)
{
    if (shift == 0) return v;
    if (shift > 31) return 0;
    uint32_t r = v >> shift, rem = v & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return r;
}

EPX__HD float epx__f16_to_f32(uint16_t v)
{
    uint32_t sign = (uint32_t)(v & 0x8000u) << 16, exp = (v >> 10) & 0x1fu, mant = v & 0x3ffu;
    if (exp == 0x1f) return epx__bits_f32(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        float f = (float)mant * 5.9604644775390625e-8f; /* mant * 2^-24, exact */
        return sign ? -f : f;
    }
    return epx__bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

EPX__HD uint16_t epx__f32_to_f16(float f)
{
    uint32_t u = epx__f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t exp = (u >> 23) & 0xffu, mant = u & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0u));
    int e = (int)exp - 127 + 15;
    if (e <= 0) {
        if (exp == 0) return sign;
        unsigned shift = (unsigned)(14 - e);
        if (shift > 25) return sign;
        return (uint16_t)(sign | epx__shift_rne(mant | 0x800000u, shift));
    }
    uint32_t r = epx__shift_rne(((uint32_t)e << 23) | mant, 13);
    if (r >= 0x7c00u) return (uint16_t)(sign | 0x7c00u);
    return (uint16_t)(sign | r);
}

/* epx__f16_to_f32 and epx__f32_to_f16 without branches (masks), the same bits for
 * every input (tests/test_conv.c checks): for loops over rows that should vectorise (the
 * CPU backend's f16 sums). Below 2^-14 the float additions round to multiples of 2^-24,
 * to nearest even, as the formula's shift does. */
EPX__HD float epx__f16_to_f32_sel(uint16_t v)
{
    uint32_t sign = (uint32_t)(v & 0x8000u) << 16, exp = (v >> 10) & 0x1fu, mant = v & 0x3ffu;
    uint32_t normal = ((exp + 112u) << 23) | (mant << 13), special = 0x7f800000u | (mant << 13);
    uint32_t sub = epx__f32_bits((float)(int32_t)mant * 5.9604644775390625e-8f); /* mant * 2^-24, exact */
    uint32_t is_special = 0u - (uint32_t)(exp == 0x1fu), is_sub = 0u - (uint32_t)(exp == 0); /* masks */
    return epx__bits_f32(sign | (special & is_special) | (sub & is_sub) | (normal & ~(is_special | is_sub)));
}
EPX__HD uint16_t epx__f32_to_f16_sel(float f)
{
    uint32_t u = epx__f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    uint32_t r = a - (112u << 23); /* the exponent rebiased (127 -> 15); 13 bits rounded off */
    uint32_t normal = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    uint32_t sub = epx__f32_bits(epx__bits_f32(a) * 16777216.0f + 8388608.0f) - 0x4b000000u; /* units of 2^-24 */
    uint32_t low = 0u - (uint32_t)(a < 0x38800000u);  /* below 2^-14 */
    uint32_t big = 0u - (uint32_t)(a >= 0x477ff000u); /* 65520 and up (and infinity): infinity */
    uint32_t nan = 0u - (uint32_t)(a > 0x7f800000u);  /* NaN: quiet, the payload's top */
    uint32_t v = (sub & low) | (normal & ~low);
    v = (0x7c00u & big) | (v & ~big);
    v = ((0x7e00u | ((a >> 13) & 0x3ffu)) & nan) | (v & ~nan);
    return (uint16_t)(sign | v);
}

/* Two float32 -> f16 as epx__f32_to_f16 gives them, lo in the low half: on compute
 * capability 8.0 and up cvt.rn.f16x2.f32 when neither is NaN, as epx__bf16x2_from_f32. */
EPX__HD uint32_t epx__f16x2_from_f32(float lo, float hi)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (lo == lo && hi == hi) {
        uint32_t r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
#endif
    return epx__f32_to_f16(lo) | (uint32_t)epx__f32_to_f16(hi) << 16;
}

/* float32 -> e4m3fn, round to nearest even, finite overflow and infinities saturate to
 * +-448, NaN -> 0x7f. Branch-free: quantisation runs it on every element. The formula,
 * for every target (epx__fp8_from_f32 is what callers use). */
EPX__HD uint8_t epx__fp8_from_f32_formula(float f)
{
    uint32_t u = epx__f32_bits(f), a = u & 0x7fffffffu, sign = (u >> 24) & 0x80u, exp = a >> 23;
    /* Normal range (exponent >= -6): rebias the exponent, keep 3 mantissa bits. */
    uint32_t v = a - (120u << 23);
    uint32_t rn = (v + 0x7ffffu + ((v >> 20) & 1u)) >> 20;
    /* Below: units of 2^-9, i.e. (mantissa | 2^23) >> (141 - exp), rounded. */
    /* A shift of 25 or more leaves 0 for any m < 2^24, so 32 bits suffice. */
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t sh = exp <= 120u ? (141u - exp < 25u ? 141u - exp : 25u) : 25u;
    uint32_t rs = (m + ((1u << (sh - 1)) - 1u) + ((m >> sh) & 1u)) >> sh;
    uint32_t r = exp <= 120u ? rs : rn;
    r = r > 0x7eu ? 0x7eu : r;
    return (uint8_t)(a > 0x7f800000u ? 0x7fu : (r | sign));
}

/* Two float32 -> e4m3fn as epx__fp8_from_f32_formula does (lo in the low byte). On a GPU
 * of compute capability 8.9 and up one instruction, cvt.rn.satfinite.e4m3x2.f32, whose
 * bits equal the formula's for every float32 (tests/test_cuda_convert.cu checks all 2^32);
 * the formula took most of the low-latency dispatch's instructions per row chunk. */
EPX__HD uint16_t epx__fp8x2_from_f32(float lo, float hi)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint16_t r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (uint16_t)(epx__fp8_from_f32_formula(lo) | (uint32_t)epx__fp8_from_f32_formula(hi) << 8);
#endif
}
EPX__HD uint8_t epx__fp8_from_f32(float f) { return (uint8_t)epx__fp8x2_from_f32(f, 0.0f); }

/* The scale of one block of 128 channels whose largest |x| (NaN ignored) is amax: its
 * stored bits (float32 amax / 448, or with ue8m0 the biased exponent of the next power of
 * two) and the multiplier that quantises the block. One IEEE float32 operation each. */
EPX__HD float epx__fp8_block_scale(float amax, int ue8m0, uint32_t *bits)
{
    if (!(amax >= 1e-4f)) amax = 1e-4f; /* also catches NaN */
    float s = amax / 448.0f;
    if (ue8m0) {
        uint32_t u = epx__f32_bits(s), exp = u >> 23;
        if (u & 0x7fffffu) exp++; /* round up to the next power of two */
        if (exp > 254u) exp = 254u;
        *bits = exp;
        return epx__bits_f32((254u - exp) << 23); /* 2^(127 - exp), exact; 0 at exp 254 (amax inf) */
    }
    *bits = epx__f32_bits(s);
    return 448.0f / amax;
}

#endif /* EPX_CONVERT_H */
