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

uint8_t epx_float_to_fp8_e4m3(float f) { return epx__fp8_from_f32(f); }

/* Vectorised (each loop one pass of independent lanes): the block's largest |x| as the
 * largest magnitude bits (bf16 magnitudes order as their bits; NaN bits, above
 * infinity's, count as 0: NaN never wins, as with fmaxf), then the formula per element. */
EPX__MULTIVERSION_V4
static void fp8_quantize_row(const uint16_t *restrict x, int hidden, int scale_format, uint8_t *restrict q,
                             void *scales)
{
    for (int b = 0; b * EPX__FP8_BLOCK < hidden; b++) {
        int lo = b * EPX__FP8_BLOCK, hi = EPX__MIN(hidden, lo + EPX__FP8_BLOCK);
        uint32_t mag = 0;
        for (int h = lo; h < hi; h++) {
            uint32_t a = x[h] & 0x7fffu;
            a &= -(uint32_t)(a <= 0x7f80u); /* a mask, not a select: the max stays a reduction */
            mag = a > mag ? a : mag;
        }
        uint32_t bits;
        float inv = epx__fp8_block_scale(epx__bf16_to_f32((uint16_t)mag), scale_format, &bits);
        if (scale_format == EPX_SCALE_UE8M0)
            ((uint8_t *)scales)[b] = (uint8_t)bits;
        else
            ((uint32_t *)scales)[b] = bits;
        for (int h = lo; h < hi; h++) q[h] = epx__fp8_from_f32(epx__bf16_to_f32(x[h]) * inv);
    }
}

/* The clones' dispatcher stays inside libepx only when the multiversioned function is static
 * (GCC exports a global one's resolver in spite of -fvisibility=hidden). */
void epx__fp8_quantize_row(const uint16_t *restrict x, int hidden, int scale_format, uint8_t *restrict q,
                           void *scales)
{
    fp8_quantize_row(x, hidden, scale_format, q, scales);
}
