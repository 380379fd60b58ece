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

static inline uint32_t epx__f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float epx__u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float epx_bf16_to_float(uint16_t v) { return epx__bf16_to_f32(v); }

uint16_t epx_float_to_bf16(float f) { return epx__f32_to_bf16(f); }

float epx_f16_to_float(uint16_t v)
{
    uint32_t sign = (uint32_t)(v & 0x8000u) << 16, exp = (v >> 10) & 0x1fu, mant = v & 0x3ffu;
    if (exp == 0x1f) return epx__u2f(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0) return epx__u2f(sign);
        /* Subnormal: mant * 2^-24, exact in float. */
        float f = (float)mant * 0x1p-24f;
        return sign ? -f : f;
    }
    return epx__u2f(sign | ((exp + 112u) << 23) | (mant << 13));
}

/* Shift right by `shift` bits rounding to nearest even. */
static inline uint32_t epx__shift_rne(uint32_t v, unsigned shift)
{
    if (shift == 0) return v;
    if (shift > 31) return 0;
    uint32_t r = v >> shift, rem = v & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return r;
}

uint16_t epx_float_to_f16(float f)
{
    uint32_t u = epx__f2u(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t exp = (u >> 23) & 0xffu, mant = u & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0u));
    int e = (int)exp - 127 + 15;
    if (e <= 0) {
        if (exp == 0) return sign; /* float subnormals are far below half's range */
        unsigned shift = (unsigned)(14 - e);
        if (shift > 25) return sign;
        return (uint16_t)(sign | epx__shift_rne(mant | 0x800000u, shift));
    }
    uint32_t r = epx__shift_rne(((uint32_t)e << 23) | mant, 13);
    if (r >= 0x7c00u) return (uint16_t)(sign | 0x7c00u);
    return (uint16_t)(sign | r);
}

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

uint8_t epx_float_to_fp8_e4m3(float f)
{
    uint32_t u = epx__f2u(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7f; /* NaN */
    if (epx__u2f(a) >= EPX__FP8_MAX) return (uint8_t)(sign | 0x7e); /* saturate, inf included */
    uint32_t exp = a >> 23, mant = a & 0x7fffffu;
    if ((int)exp - 127 < -6) {
        /* Subnormal range: units of 2^-9. a * 512 is exact; round to nearest even. */
        if (exp == 0) return sign;
        unsigned shift = 141u - exp; /* (mant | 2^23) * 2^(exp - 150) / 2^-9 */
        return (uint8_t)(sign | epx__shift_rne(mant | 0x800000u, shift));
    }
    uint32_t r = epx__shift_rne(((exp - 120u) << 23) | mant, 20);
    if (r > 0x7eu) r = 0x7eu;
    return (uint8_t)(sign | r);
}

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

void epx__fp8_quantize_row(const uint16_t *x, int hidden, int scale_format, uint8_t *q, void *scales)
{
    for (int b = 0; b * EPX__FP8_BLOCK < hidden; b++) {
        int lo = b * EPX__FP8_BLOCK, hi = EPX__MIN(hidden, lo + EPX__FP8_BLOCK);
        float amax = 0.0f;
        for (int h = lo; h < hi; h++) amax = fmaxf(amax, fabsf(epx_bf16_to_float(x[h])));
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
            float prod = epx_bf16_to_float(x[h]) * inv;
            q[h] = epx_float_to_fp8_e4m3(prod);
        }
    }
}
