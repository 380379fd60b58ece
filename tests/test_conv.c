/*
 * Element conversions (epx_*_to_float / epx_float_to_*) against independent definitions:
 * every code of e4m3, bf16 and f16 decodes to the value its sign/exponent/fraction
 * formula gives; encode(decode(c)) == c for every non-NaN code; encoding random floats,
 * ties, values a float-ulp either side of ties, overflow, subnormals and NaNs equals a
 * nearest-value search (e4m3: brute force over all 254 finite codes; bf16/f16: rounding in
 * double arithmetic), ties to an even fraction. The double-arithmetic reference of
 * moe_ref.c, used by test_moe, is checked against the brute force too. The library's FP8
 * quantisation of a row (src/core, vectorised) equals moe_ref's on rows of every kind of
 * finite value and NaN: random bits, ordinary values, tiny ones, blocks of NaN only, and
 * row lengths that are not a multiple of the 128-channel block.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "core/core.h"
#include "moe_ref.h"
#include "testlib.h"

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bitsf(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Same float, bit for bit, or both NaN. */
static int same_float(float a, float b)
{
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    return fbits(a) == fbits(b);
}

/* ---- e4m3 -------------------------------------------------------------------------------- */

/* e4m3fn by its definition, written out once more by hand (not via moe_ref). */
static double e4m3_value(int c)
{
    int s = (c >> 7) & 1, e = (c >> 3) & 15, m = c & 7;
    double v = e == 0 ? m * pow(2.0, -9) : (8 + m) * pow(2.0, e - 10); /* (1 + m/8) * 2^(e-7) */
    return s ? -v : v;
}
static int e4m3_is_nan_code(int c) { return (c & 0x7F) == 0x7F; }

/* Nearest finite code with f's sign; on a tie the even fraction (even code). */
static uint8_t e4m3_brute(float f)
{
    int sign = signbit(f) ? 0x80 : 0;
    double a = fabs((double)f);
    int best = 0;
    double bestd = INFINITY;
    for (int c = 0; c <= 0x7E; c++) {
        double d = fabs(a - e4m3_value(c));
        if (d < bestd || (d == bestd && (c & 1) == 0)) best = c, bestd = d;
    }
    return (uint8_t)(sign | best);
}

static void check_e4m3_encode(float f, const char *what)
{
    uint8_t got = epx_float_to_fp8_e4m3(f);
    if (isnan(f)) {
        if (!e4m3_is_nan_code(got)) TEST_FAIL_("e4m3(%s NaN 0x%08x) = 0x%02x, expected a NaN code", what, fbits(f), got);
        return;
    }
    uint8_t want = e4m3_brute(f);
    if (got != want)
        TEST_FAIL_("e4m3(%s %.9g = 0x%08x) = 0x%02x (%g), expected 0x%02x (%g)", what, (double)f, fbits(f), got,
                   e4m3_value(got), want, e4m3_value(want));
    uint8_t ref = moe_ref_float_to_e4m3(f);
    if (ref != want) TEST_FAIL_("moe_ref e4m3(%.9g) = 0x%02x, brute force 0x%02x (reference bug)", (double)f, ref, want);
}

static int test_e4m3(void)
{
    /* Decode every code. */
    for (int c = 0; c < 256; c++) {
        float got = epx_fp8_e4m3_to_float((uint8_t)c);
        if (e4m3_is_nan_code(c)) {
            if (!isnan(got)) TEST_FAIL_("e4m3 decode 0x%02x = %g, expected NaN", c, (double)got);
            ASSERT(isnan(moe_ref_e4m3_to_float((uint8_t)c)));
            continue;
        }
        float want = (float)e4m3_value(c);
        if (c == 0x80) want = -0.0f;
        if (!same_float(got, want)) TEST_FAIL_("e4m3 decode 0x%02x = %.9g, expected %.9g", c, (double)got, (double)want);
        if (!same_float(moe_ref_e4m3_to_float((uint8_t)c), want)) TEST_FAIL_("moe_ref e4m3 decode 0x%02x", c);
    }
    ASSERT(epx_fp8_e4m3_to_float(0x7E) == 448.0f);
    ASSERT(epx_fp8_e4m3_to_float(0xFE) == -448.0f);
    ASSERT(epx_fp8_e4m3_to_float(0x01) == ldexpf(1.0f, -9));
    ASSERT(epx_fp8_e4m3_to_float(0x08) == ldexpf(1.0f, -6));
    ASSERT(epx_fp8_e4m3_to_float(0x38) == 1.0f);
    ASSERT(signbit(epx_fp8_e4m3_to_float(0x80)) && epx_fp8_e4m3_to_float(0x80) == 0.0f);

    /* Round trip. */
    for (int c = 0; c < 256; c++) {
        if (e4m3_is_nan_code(c)) continue;
        uint8_t back = epx_float_to_fp8_e4m3(epx_fp8_e4m3_to_float((uint8_t)c));
        if (back != c) TEST_FAIL_("e4m3 encode(decode(0x%02x)) = 0x%02x", c, back);
    }
    ASSERT_EQ(epx_float_to_fp8_e4m3(-0.0f), 0x80);
    ASSERT_EQ(epx_float_to_fp8_e4m3(0.0f), 0x00);

    /* Ties between neighbouring codes, and one float ulp either side of them. */
    for (int c = 0; c < 0x7E; c++) {
        for (int s = 0; s < 2; s++) {
            double lo = e4m3_value(c), hi = e4m3_value(c + 1);
            float mid = (float)((lo + hi) / 2); /* exact: needs 5 significant bits */
            ASSERT((double)mid == (lo + hi) / 2);
            if (s) mid = -mid;
            check_e4m3_encode(mid, "tie");
            check_e4m3_encode(nextafterf(mid, INFINITY), "tie+");
            check_e4m3_encode(nextafterf(mid, -INFINITY), "tie-");
            check_e4m3_encode(s ? -(float)lo : (float)lo, "exact");
        }
    }
    /* Explicit ties to even. */
    ASSERT_EQ(epx_float_to_fp8_e4m3(ldexpf(1.0f, -10)), 0x00);       /* 0 vs 2^-9: to 0 */
    ASSERT_EQ(epx_float_to_fp8_e4m3(-ldexpf(1.0f, -10)), 0x80);
    ASSERT_EQ(epx_float_to_fp8_e4m3(3 * ldexpf(1.0f, -10)), 0x02);   /* 1 vs 2 (x 2^-9): to 2 */
    ASSERT_EQ(epx_float_to_fp8_e4m3(1.0625f), 0x38);                 /* 1 vs 1.125: to 1 */
    ASSERT_EQ(epx_float_to_fp8_e4m3(1.1875f), 0x3A);                 /* 1.125 vs 1.25: to 1.25 */
    ASSERT_EQ(epx_float_to_fp8_e4m3(nextafterf(1.0625f, 2.0f)), 0x39);
    /* Saturation. */
    float big[] = {448.0f, 449.0f, 463.99f, 464.0f, 464.01f, 480.0f, 500.0f, 1e6f, 1e30f, FLT_MAX};
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) {
        ASSERT_EQ(epx_float_to_fp8_e4m3(big[i]), 0x7E);
        ASSERT_EQ(epx_float_to_fp8_e4m3(-big[i]), 0xFE);
        check_e4m3_encode(big[i], "big");
    }
    /* Infinity: the spec saturates finite values; accept 448 or a NaN code. */
    uint8_t pinf = epx_float_to_fp8_e4m3(INFINITY), ninf = epx_float_to_fp8_e4m3(-INFINITY);
    ASSERT(pinf == 0x7E || pinf == 0x7F);
    ASSERT(ninf == 0xFE || ninf == 0xFF);
    /* NaNs, including ones whose payload is only in the low bits. */
    uint32_t nans[] = {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu, 0x7FA00000u};
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) check_e4m3_encode(bitsf(nans[i]), "nan");
    /* Tiny values and float subnormals. */
    float tiny[] = {ldexpf(1.0f, -9), ldexpf(1.0f, -11), ldexpf(1.0f, -126), ldexpf(1.0f, -149), 1e-30f,
                    ldexpf(1.0f, -10) * 1.0000001f};
    for (size_t i = 0; i < sizeof tiny / sizeof tiny[0]; i++) {
        check_e4m3_encode(tiny[i], "tiny");
        check_e4m3_encode(-tiny[i], "tiny");
    }

    /* Random floats: in range (exponents 2^-12 .. 2^9), and any bit pattern. */
    uint64_t s = 12345;
    for (int i = 0; i < 200000; i++) {
        uint64_t r = test_rand(&s);
        uint32_t exp = (uint32_t)(127 - 12 + (int)(r % 22));
        uint32_t u = (uint32_t)((r >> 8) & 0x807FFFFFu) | (exp << 23);
        check_e4m3_encode(bitsf(u), "random");
        check_e4m3_encode(bitsf((uint32_t)(r >> 32)), "random bits");
    }
    return 1;
}

/* ---- bf16 / f16 ----------------------------------------------------------------------------- */

/* Generic decode by formula. */
static double decode_fields(unsigned v, int exp_bits, int mant_bits)
{
    int bias = (1 << (exp_bits - 1)) - 1;
    unsigned s = v >> (exp_bits + mant_bits), e = (v >> mant_bits) & ((1u << exp_bits) - 1),
             m = v & ((1u << mant_bits) - 1);
    double val;
    if (e == (1u << exp_bits) - 1)
        val = m ? NAN : INFINITY;
    else if (e == 0)
        val = ldexp((double)m, 1 - bias - mant_bits);
    else
        val = ldexp((double)((1u << mant_bits) + m), (int)e - bias - mant_bits);
    return s ? -val : val;
}

typedef struct {
    const char *name;
    int exp_bits, mant_bits;
    float (*dec)(uint16_t);
    uint16_t (*enc)(float);
    uint16_t (*ref)(float);
} fmt16_t;

/* Nearest-even rounding to the format, independently of moe_ref: walk the codes around
 * the value (monotone order of non-negative codes) and pick the nearer, ties even. */
static uint16_t nearest16(const fmt16_t *F, float f)
{
    unsigned sign = signbit(f) ? 0x8000u : 0;
    unsigned inf = ((1u << F->exp_bits) - 1) << F->mant_bits;
    if (isnan(f)) return (uint16_t)(sign | inf | (1u << (F->mant_bits - 1)));
    double a = fabs((double)f);
    if (isinf(f)) return (uint16_t)(sign | inf);
    /* Binary search for the largest code with value <= a among 0..inf. */
    unsigned lo = 0, hi = inf; /* value(lo) <= a; value(inf) = inf > a */
    while (hi - lo > 1) {
        unsigned mid = (lo + hi) / 2;
        if (decode_fields(mid, F->exp_bits, F->mant_bits) <= a)
            lo = mid;
        else
            hi = mid;
    }
    double vlo = decode_fields(lo, F->exp_bits, F->mant_bits);
    unsigned pick;
    if (vlo == a)
        pick = lo;
    else if (hi == inf) {
        /* Beyond the largest finite value: the "next" value is 2^(emax+1) for overflow. */
        double next = ldexp(1.0, (1 << (F->exp_bits - 1)));
        double dl = a - vlo, dh = next - a;
        pick = (dl < dh || (dl == dh && (lo & 1) == 0)) ? lo : inf;
    } else {
        double vhi = decode_fields(hi, F->exp_bits, F->mant_bits);
        double dl = a - vlo, dh = vhi - a;
        pick = (dl < dh || (dl == dh && (lo & 1) == 0)) ? lo : hi;
    }
    return (uint16_t)(sign | pick);
}

static int is_nan16(const fmt16_t *F, uint16_t v)
{
    unsigned inf = ((1u << F->exp_bits) - 1) << F->mant_bits;
    return (v & inf) == inf && (v & ((1u << F->mant_bits) - 1)) != 0;
}

static void check16(const fmt16_t *F, float f, const char *what)
{
    uint16_t got = F->enc(f);
    if (isnan(f)) {
        if (!is_nan16(F, got)) TEST_FAIL_("%s(%s NaN 0x%08x) = 0x%04x, expected a NaN", F->name, what, fbits(f), got);
        ASSERT(is_nan16(F, F->ref(f)));
        return;
    }
    uint16_t want = nearest16(F, f);
    if (got != want)
        TEST_FAIL_("%s(%s %.9g = 0x%08x) = 0x%04x, expected 0x%04x", F->name, what, (double)f, fbits(f), got, want);
    uint16_t ref = F->ref(f);
    if (ref != want) TEST_FAIL_("moe_ref %s(%.9g) = 0x%04x, expected 0x%04x (reference bug)", F->name, (double)f, ref, want);
}

static int test_fmt16(const fmt16_t *F)
{
    unsigned inf = ((1u << F->exp_bits) - 1) << F->mant_bits;
    for (unsigned c = 0; c < 65536; c++) {
        double want = decode_fields(c, F->exp_bits, F->mant_bits);
        float got = F->dec((uint16_t)c);
        if (isnan(want)) {
            if (!isnan(got)) TEST_FAIL_("%s decode 0x%04x = %g, expected NaN", F->name, c, (double)got);
            continue;
        }
        float wf = (float)want;
        if (c == 0x8000) wf = -0.0f;
        if (!same_float(got, wf)) TEST_FAIL_("%s decode 0x%04x = %.9g, expected %.9g", F->name, c, (double)got, want);
        uint16_t back = F->enc(got);
        if (back != c) TEST_FAIL_("%s encode(decode(0x%04x)) = 0x%04x", F->name, c, back);
        /* Ties with the next code and one float ulp either side (finite neighbours). */
        unsigned mag = c & 0x7FFF;
        if (mag < inf - 1) {
            double next = decode_fields(c + 1, F->exp_bits, F->mant_bits);
            float mid = (float)((want + next) / 2);
            ASSERT((double)mid == (want + next) / 2);
            check16(F, mid, "tie");
            check16(F, nextafterf(mid, INFINITY), "tie+");
            check16(F, nextafterf(mid, -INFINITY), "tie-");
        }
    }
    check16(F, -0.0f, "-0");
    ASSERT_EQ(F->enc(-0.0f), 0x8000);
    ASSERT_EQ(F->enc(0.0f), 0);
    /* Overflow: the largest finite value, the tie with "2^(emax+1)", and beyond. */
    double maxv = decode_fields(inf - 1, F->exp_bits, F->mant_bits);
    double over = ldexp(1.0, 1 << (F->exp_bits - 1));
    float edge[] = {(float)maxv, (float)((maxv + over) / 2), nextafterf((float)((maxv + over) / 2), 0),
                    nextafterf((float)((maxv + over) / 2), INFINITY), (float)over, FLT_MAX, INFINITY};
    for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++) {
        if (isinf(edge[i]) && i + 1 < sizeof edge / sizeof edge[0]) continue; /* bf16: over = 2^128 = inf */
        check16(F, edge[i], "edge");
        check16(F, -edge[i], "edge");
    }
    ASSERT_EQ(F->enc(INFINITY), inf);
    ASSERT_EQ(F->enc(-INFINITY), 0x8000 | inf);
    uint32_t nans[] = {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu, 0x7F80FFFFu, 0x7F810000u};
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) check16(F, bitsf(nans[i]), "nan");
    /* Float subnormals and the format's own subnormal range. */
    float tiny[] = {ldexpf(1.0f, -149), ldexpf(3.0f, -149), ldexpf(1.0f, -127), ldexpf(1.0f, -133),
                    ldexpf(1.0f, -134), ldexpf(3.0f, -135), ldexpf(1.0f, -24), ldexpf(1.0f, -25), ldexpf(3.0f, -26),
                    ldexpf(1.0f, -14), ldexpf(1.0f, -15), ldexpf(1.0f, -26)};
    for (size_t i = 0; i < sizeof tiny / sizeof tiny[0]; i++) {
        check16(F, tiny[i], "tiny");
        check16(F, -tiny[i], "tiny");
        check16(F, nextafterf(tiny[i], 0), "tiny-");
        check16(F, nextafterf(tiny[i], 1), "tiny+");
    }
    /* Random floats: any bit pattern, values around the format's range, exact ties. */
    uint64_t s = 777 + (uint64_t)F->mant_bits;
    int emax = 1 << (F->exp_bits - 1);
    for (int i = 0; i < 1000000; i++) {
        uint64_t r = test_rand(&s);
        check16(F, bitsf((uint32_t)r), "random bits");
        int e = (int)((r >> 32) % (unsigned)(2 * emax + 2 * F->mant_bits + 8)) - emax - F->mant_bits - 4;
        if (e < -126) e = -126;
        if (e > 127) e = 127;
        uint32_t u = (uint32_t)((r >> 9) & 0x807FFFFFu) | ((uint32_t)(e + 127) << 23);
        check16(F, bitsf(u), "random");
        /* A tie: the dropped bits are exactly one half. */
        int drop = 23 - F->mant_bits;
        uint32_t tie = (u & ~((1u << drop) - 1)) | (1u << (drop - 1));
        check16(F, bitsf(tie), "random tie");
    }
    return 1;
}

/* ---- FP8 quantisation of a row ---------------------------------------------------------- */

static int test_quant_rows(void)
{
    static const int lens[] = {1, 77, 127, 128, 129, 300, 7168};
    uint64_t s = 99;
    uint16_t x[7168];
    uint8_t q[7168], rq[7168];
    uint32_t sc[64], rsc[64];
    for (int it = 0; it < 600; it++) {
        int n = lens[it % 7], kind = it / 7 % 5;
        for (int h = 0; h < n; h++) {
            uint64_t r = test_rand(&s);
            uint16_t v = (uint16_t)r, sign = (uint16_t)(r & 0x8000);
            if (kind == 1) v = sign | (uint16_t)((r & 0x7f) | (0x3c00 + (r >> 16) % 0x600)); /* 2^-7 .. 2^5 */
            if (kind == 2) v = sign | (uint16_t)(r & 0xff); /* zeros, subnormals */
            if (kind == 3) v = sign | (uint16_t)((r >> 20) % 16 ? 0x3f00 | (r & 0xff) : 0x7f80 | (r & 0x7f));
            if (kind == 4) /* NaN only; every other row one ordinary value a block */
                v = h % 128 == 127 && it % 2 ? (uint16_t)(sign | 0x3f80) : (uint16_t)(sign | 0x7fc0 | (r & 1));
            x[h] = (v & 0x7fff) == 0x7f80 ? v | 1 : v; /* no infinity (moe_ref takes frexpf of it) */
        }
        for (int fmt = 0; fmt < 2; fmt++) {
            int f = fmt ? EPX_SCALE_UE8M0 : EPX_SCALE_F32;
            memset(sc, 0, sizeof sc), memset(rsc, 0, sizeof rsc);
            epx__fp8_quantize_row(x, n, f, q, sc);
            moe_ref_quant_row(x, n, f, rq, rsc);
            for (int h = 0; h < n; h++) { /* a NaN's sign: the library writes 0x7f, moe_ref keeps it */
                if (q[h] == rq[h] || (e4m3_is_nan_code(q[h]) && e4m3_is_nan_code(rq[h]))) continue;
                TEST_FAIL_("quantised row (n %d, kind %d, format %d) channel %d: 0x%02x, want 0x%02x", n, kind, f, h,
                           q[h], rq[h]);
            }
            if (memcmp(sc, rsc, sizeof sc) != 0)
                TEST_FAIL_("quantised row (n %d, kind %d, format %d): scales differ", n, kind, f);
        }
    }
    return 1;
}

/* Blocks with an infinity (which test_quant_rows leaves out: moe_ref takes frexpf of the
 * scale). Infinity is a magnitude like any other (only NaN never wins, as on the GPU), so
 * the block's amax is infinite: its F32 scale is +inf and UE8M0's the largest, 2^127
 * (254); the multiplier 448 / amax is 0, so every finite channel quantises to a zero and
 * the infinite one to a NaN code or, saturated, +-448. The other blocks are quantised as
 * if alone (moe_ref on the block). */
static int test_quant_inf(void)
{
    static const int lens[] = {1, 128, 300, 7168};
    uint64_t s = 2024;
    uint16_t x[7168];
    uint8_t q[7168], rq[128];
    uint32_t sc[64], rsc[2];
    for (int it = 0; it < 200; it++) {
        int n = lens[it % 4], nb = (n + 127) / 128;
        for (int h = 0; h < n; h++) {
            uint64_t r = test_rand(&s);
            uint16_t v = (uint16_t)((r & 0x8000) | (0x3c00 + (r >> 16) % 0x600) | (r & 0x7f)); /* 2^-7 .. 2^5 */
            if ((r >> 40) % 32 == 0) v = (uint16_t)((r & 0x8000) | 0x7fc0 | ((r >> 20) & 0x3f)); /* a NaN */
            x[h] = v;
        }
        bool *inf_block = calloc((size_t)nb, sizeof *inf_block);
        for (int b = 0; b < nb; b++) {
            uint64_t r = test_rand(&s);
            if (b > 0 && r % 3) continue; /* block 0 always, others one in three */
            int lo = b * 128, len = n - lo < 128 ? n - lo : 128, at = lo + (int)((r >> 8) % (uint64_t)len);
            x[at] = (uint16_t)(((r >> 20) & 1) << 15 | 0x7f80);
            inf_block[b] = true;
        }
        for (int fmt = 0; fmt < 2; fmt++) {
            int f = fmt ? EPX_SCALE_UE8M0 : EPX_SCALE_F32;
            memset(sc, 0, sizeof sc);
            epx__fp8_quantize_row(x, n, f, q, sc);
            for (int b = 0; b < nb; b++) {
                int lo = b * 128, hi = lo + 128 < n ? lo + 128 : n;
                uint32_t got_scale = f == EPX_SCALE_UE8M0 ? ((const uint8_t *)sc)[b] : sc[b];
                if (!inf_block[b]) {
                    memset(rsc, 0, sizeof rsc);
                    moe_ref_quant_row(x + lo, hi - lo, f, rq, rsc);
                    uint32_t want_scale = f == EPX_SCALE_UE8M0 ? ((const uint8_t *)rsc)[0] : rsc[0];
                    if (got_scale != want_scale)
                        TEST_FAIL_("row with infinities (n %d, format %d): block %d scale 0x%x, want 0x%x", n, f, b,
                                   got_scale, want_scale);
                    for (int h = lo; h < hi; h++)
                        if (q[h] != rq[h - lo] && !(e4m3_is_nan_code(q[h]) && e4m3_is_nan_code(rq[h - lo])))
                            TEST_FAIL_("row with infinities (n %d, format %d): channel %d = 0x%02x, want 0x%02x", n, f,
                                       h, q[h], rq[h - lo]);
                    continue;
                }
                uint32_t want_scale = f == EPX_SCALE_UE8M0 ? 254u : 0x7f800000u;
                if (got_scale != want_scale)
                    TEST_FAIL_("row with infinities (n %d, format %d): infinite block %d scale 0x%x, want 0x%x", n, f, b,
                               got_scale, want_scale);
                for (int h = lo; h < hi; h++) {
                    bool is_inf = (x[h] & 0x7fff) == 0x7f80, is_nan = (x[h] & 0x7fff) > 0x7f80;
                    bool ok = is_nan   ? e4m3_is_nan_code(q[h])
                              : is_inf ? e4m3_is_nan_code(q[h]) || q[h] == ((x[h] >> 8 & 0x80) | 0x7e)
                                       : (q[h] & 0x7f) == 0;
                    if (!ok)
                        TEST_FAIL_("row with infinities (n %d, format %d): block %d channel %d (bf16 0x%04x) = 0x%02x", n,
                                   f, b, h, x[h], q[h]);
                }
            }
        }
        free(inf_block);
    }
    return 1;
}

/* The CPU's vectorisable f16 conversions (convert.h, epx__f16_to_f32_sel / epx__f32_to_f16_sel)
 * give the formulas' bits: every f16; and every float32 whose low 13 bits (the ones f16
 * rounds off) are one of the patterns around a rounding boundary, for every sign, exponent
 * and high fraction (2^19 of those), plus random floats. The canonical NaN of the combines'
 * sums (epx__nan_canon): every NaN to 0x7fffffff, everything else unchanged. */
static int test_f16_sel(void)
{
    for (uint32_t v = 0; v < 65536; v++) {
        float a = epx__f16_to_f32_sel((uint16_t)v), b = epx__f16_to_f32((uint16_t)v);
        if (fbits(a) != fbits(b)) TEST_FAIL_("f16 0x%04x: 0x%08x selected, 0x%08x by the formula", v, fbits(a), fbits(b));
    }
    static const uint32_t lows[] = {0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x0800, 0x17FF};
    for (uint32_t hi = 0; hi < (1u << 19); hi++)
        for (size_t k = 0; k < sizeof lows / sizeof lows[0]; k++) {
            float f = bitsf(hi << 13 | lows[k]);
            if (epx__f32_to_f16_sel(f) != epx__f32_to_f16(f))
                TEST_FAIL_("float 0x%08x: f16 0x%04x selected, 0x%04x by the formula", fbits(f), epx__f32_to_f16_sel(f),
                           epx__f32_to_f16(f));
        }
    uint64_t s = 99;
    for (int i = 0; i < 1 << 22; i++) {
        float f = bitsf((uint32_t)test_rand(&s));
        if (epx__f32_to_f16_sel(f) != epx__f32_to_f16(f))
            TEST_FAIL_("float 0x%08x: f16 0x%04x selected, 0x%04x by the formula", fbits(f), epx__f32_to_f16_sel(f),
                       epx__f32_to_f16(f));
        uint32_t c = fbits(epx__nan_canon(f));
        if (isnan(f) ? c != 0x7FFFFFFFu : c != fbits(f))
            TEST_FAIL_("epx__nan_canon(0x%08x) = 0x%08x", fbits(f), c);
    }
    ASSERT_EQ(fbits(epx__nan_canon(bitsf(0xFFC00000u))), 0x7FFFFFFF); /* x86's default NaN */
    ASSERT_EQ(fbits(epx__nan_canon(bitsf(0x7F800000u))), 0x7F800000); /* infinity stays */
    return 1;
}

int main(void)
{
    test_rank = 0;
    int passed = 0;
    passed += test_f16_sel();
    passed += test_e4m3();
    passed += test_quant_rows();
    passed += test_quant_inf();
    fmt16_t bf16 = {"bf16", 8, 7, epx_bf16_to_float, epx_float_to_bf16, moe_ref_float_to_bf16};
    fmt16_t f16 = {"f16", 5, 10, epx_f16_to_float, epx_float_to_f16, moe_ref_float_to_f16};
    passed += test_fmt16(&bf16);
    passed += test_fmt16(&f16);
    /* A few spot values. */
    ASSERT_EQ(epx_float_to_bf16(1.0f), 0x3F80);
    ASSERT_EQ(epx_float_to_bf16(bitsf(0x3F808000u)), 0x3F80); /* tie, even stays */
    ASSERT_EQ(epx_float_to_bf16(bitsf(0x3F818000u)), 0x3F82); /* tie, odd rounds up */
    ASSERT_EQ(epx_float_to_bf16(bitsf(0x3F808001u)), 0x3F81);
    ASSERT_EQ(epx_float_to_bf16(bitsf(0x7F7FFFFFu)), 0x7F80); /* FLT_MAX overflows */
    ASSERT_EQ(epx_float_to_f16(65504.0f), 0x7BFF);
    ASSERT_EQ(epx_float_to_f16(65519.996f), 0x7BFF);
    ASSERT_EQ(epx_float_to_f16(65520.0f), 0x7C00);
    ASSERT_EQ(epx_float_to_f16(ldexpf(1.0f, -24)), 0x0001);
    ASSERT_EQ(epx_float_to_f16(ldexpf(1.0f, -25)), 0x0000);
    ASSERT_EQ(epx_float_to_f16(ldexpf(3.0f, -26)), 0x0001);
    ASSERT_EQ(epx_float_to_f16(ldexpf(3.0f, -25)), 0x0002);
    ASSERT(epx_f16_to_float(0x3C00) == 1.0f);
    ASSERT(epx_bf16_to_float(0xC000) == -2.0f);
    passed++;
    test_done(passed);
    return 0;
}
