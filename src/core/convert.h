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

#endif /* EPX_CONVERT_H */
