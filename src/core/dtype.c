/* Element types: sizes, names, and bit-exact conversions (round to nearest even). */
#include <math.h>
#include <string.h>

#include "core.h"

size_t epx_dtype_size(epx_dtype_t dtype)
{
    static const size_t sizes[EPX_NUM_DTYPES] = {1, 4, 8, 2, 2, 4, 1};
    return (unsigned)dtype < EPX_NUM_DTYPES ? sizes[dtype] : 0;
}

const char *epx_dtype_name(epx_dtype_t dtype)
{
    static const char *names[EPX_NUM_DTYPES] = {"u8", "i32", "i64", "f16", "bf16", "f32", "fp8_e4m3"};
    return (unsigned)dtype < EPX_NUM_DTYPES ? names[dtype] : "unknown";
}

#define epx__f2u epx__f32_bits
#define epx__u2f epx__bits_f32

float epx_bf16_to_float(uint16_t v) { return epx__bf16_to_f32(v); }

uint16_t epx_float_to_bf16(float f) { return epx__f32_to_bf16(f); }

float epx_f16_to_float(uint16_t v) { return epx__f16_to_f32(v); }

uint16_t epx_float_to_f16(float f) { return epx__f32_to_f16(f); }

float epx_fp8_e4m3_to_float(uint8_t v)
{
    uint32_t e = (v >> 3) & 0xfu, m = v & 7u;
    float f;
    if (e == 15 && m == 7)
        f = NAN;
    else if (e == 0)
        f = (float)m * 0x1p-9f;
    else
        f = epx__u2f(((e + 120u) << 23) | (m << 20));
    return (v & 0x80u) ? -f : f;
}

/* float32 -> e4m3fn, round to nearest even, finite overflow and infinities saturate to
 * +-448, NaN -> 0x7f. Branch-free: quantisation runs it on every element. */
static inline uint8_t epx__fp8_from_f32(float f)
{
    uint32_t u = epx__f2u(f), a = u & 0x7fffffffu, sign = (u >> 24) & 0x80u, exp = a >> 23;
    /* Normal range (exponent >= -6): rebias the exponent, keep 3 mantissa bits. */
    uint32_t v = a - (120u << 23);
    uint32_t rn = (v + 0x7ffffu + ((v >> 20) & 1u)) >> 20;
    /* Below: units of 2^-9, i.e. (mantissa | 2^23) >> (141 - exp), rounded. */
    /* A shift of 25 or more leaves 0 for any m < 2^24, so 32 bits suffice. */
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t sh = exp <= 120u ? EPX__MIN(141u - exp, 25u) : 25u;
    uint32_t rs = (m + ((1u << (sh - 1)) - 1u) + ((m >> sh) & 1u)) >> sh;
    uint32_t r = exp <= 120u ? rs : rn;
    r = r > 0x7eu ? 0x7eu : r;
    return (uint8_t)(a > 0x7f800000u ? 0x7fu : (r | sign));
}

uint8_t epx_float_to_fp8_e4m3(float f) { return epx__fp8_from_f32(f); }

float epx__load_float(const void *row, epx_dtype_t dtype, size_t i)
{
    switch (dtype) {
    case EPX_BF16: return epx_bf16_to_float(((const uint16_t *)row)[i]);
    case EPX_F16: return epx_f16_to_float(((const uint16_t *)row)[i]);
    case EPX_F32: return ((const float *)row)[i];
    case EPX_FP8_E4M3: return epx_fp8_e4m3_to_float(((const uint8_t *)row)[i]);
    default: return 0.0f;
    }
}

void epx__store_float(void *row, epx_dtype_t dtype, size_t i, float v)
{
    switch (dtype) {
    case EPX_BF16: ((uint16_t *)row)[i] = epx_float_to_bf16(v); break;
    case EPX_F16: ((uint16_t *)row)[i] = epx_float_to_f16(v); break;
    case EPX_F32: ((float *)row)[i] = v; break;
    case EPX_FP8_E4M3: ((uint8_t *)row)[i] = epx_float_to_fp8_e4m3(v); break;
    default: break;
    }
}

EPX__MULTIVERSION
void epx__fp8_quantize_row(const uint16_t *x, int hidden, int scale_format, uint8_t *q, void *scales)
{
    for (int b = 0; b * EPX__FP8_BLOCK < hidden; b++) {
        int lo = b * EPX__FP8_BLOCK, hi = EPX__MIN(hidden, lo + EPX__FP8_BLOCK);
        float amax = 0.0f;
        for (int h = lo; h < hi; h++) {
            float a = fabsf(epx__bf16_to_f32(x[h]));
            amax = a > amax ? a : amax; /* NaN never wins, as with fmaxf */
        }
        if (!(amax >= 1e-4f)) amax = 1e-4f; /* also catches NaN */
        float s = amax / EPX__FP8_MAX;
        float inv;
        if (scale_format == EPX_SCALE_UE8M0) {
            uint32_t u = epx__f2u(s);
            uint32_t exp = u >> 23;
            if (u & 0x7fffffu) exp++; /* round up to the next power of two */
            if (exp > 254u) exp = 254u;
            ((uint8_t *)scales)[b] = (uint8_t)exp;
            inv = epx__u2f((254u - exp) << 23); /* 2^(127 - exp): exact */
        } else {
            ((float *)scales)[b] = s;
            inv = EPX__FP8_MAX / amax;
        }
        for (int h = lo; h < hi; h++) {
            float prod = epx__bf16_to_f32(x[h]) * inv;
            q[h] = epx__fp8_from_f32(prod);
        }
    }
}
