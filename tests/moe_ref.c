/*
 * Sequential MoE reference (see moe_ref.h). Deliberately simple: loops in the order the
 * specification states them, no cleverness.
 */
#include "moe_ref.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* ---- Conversions ----------------------------------------------------------------------- */

double moe_ref_round(double v, int mant_bits, int emin)
{
    if (v == 0 || isnan(v) || isinf(v)) return v;
    int e;
    (void)frexp(fabs(v), &e); /* |v| = m * 2^e, m in [0.5, 1): leading bit 2^(e-1) */
    int lead = e - 1;
    if (lead < emin) lead = emin; /* subnormal range: fixed quantum */
    double quantum = ldexp(1.0, lead - mant_bits);
    double q = v / quantum; /* exact: power-of-two scaling of a float value */
    double r = nearbyint(q); /* default rounding mode: to nearest, ties to even */
    return r * quantum;
}

static float from_fields(int sign, int exp_field, int mant, int mant_bits, int bias)
{
    double v;
    if (exp_field == 0)
        v = ldexp((double)mant, 1 - bias - mant_bits);
    else
        v = ldexp(1.0 + ldexp((double)mant, -mant_bits), exp_field - bias);
    return (float)(sign ? -v : v);
}

/* bf16 is by definition the upper half of a binary32 (test_conv checks the library's
 * decoding against the sign/exponent/fraction formula). */
float moe_ref_bf16_to_float(uint16_t v)
{
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float moe_ref_f16_to_float(uint16_t v)
{
    int s = v >> 15, e = (v >> 10) & 0x1F, m = v & 0x3FF;
    if (e == 0x1F) return m ? NAN : (s ? -INFINITY : INFINITY);
    return from_fields(s, e, m, 10, 15);
}

float moe_ref_e4m3_to_float(uint8_t v)
{
    int s = v >> 7, e = (v >> 3) & 0xF, m = v & 7;
    if (e == 0xF && m == 7) return NAN;
    return from_fields(s, e, m, 3, 7);
}

/* Fields of a finite value that is exactly representable in the format. */
static unsigned encode_fields(double a, int mant_bits, int bias)
{
    if (a == 0) return 0;
    int e;
    (void)frexp(a, &e);
    int lead = e - 1;
    if (lead < 1 - bias) return (unsigned)(a / ldexp(1.0, 1 - bias - mant_bits)); /* subnormal */
    unsigned m = (unsigned)((a / ldexp(1.0, lead) - 1.0) * ldexp(1.0, mant_bits));
    return ((unsigned)(lead + bias) << mant_bits) | m;
}

uint16_t moe_ref_float_to_bf16(float f)
{
    unsigned sign = signbit(f) ? 0x8000u : 0;
    if (isnan(f)) return (uint16_t)(sign | 0x7FC0);
    double r = moe_ref_round((double)f, 7, -126);
    double a = fabs(r), max = ldexp(2.0 - ldexp(1.0, -7), 127);
    if (a > max) return (uint16_t)(sign | 0x7F80);
    return (uint16_t)(sign | encode_fields(a, 7, 127));
}

uint16_t moe_ref_float_to_f16(float f)
{
    unsigned sign = signbit(f) ? 0x8000u : 0;
    if (isnan(f)) return (uint16_t)(sign | 0x7E00);
    double r = moe_ref_round((double)f, 10, -14);
    double a = fabs(r);
    if (a > 65504.0) return (uint16_t)(sign | 0x7C00);
    return (uint16_t)(sign | encode_fields(a, 10, 15));
}

uint8_t moe_ref_float_to_e4m3(float f)
{
    unsigned sign = signbit(f) ? 0x80u : 0;
    if (isnan(f)) return (uint8_t)(sign | 0x7F);
    double r = moe_ref_round((double)f, 3, -6);
    double a = fabs(r);
    if (a > 448.0) a = 448.0; /* saturate */
    return (uint8_t)(sign | encode_fields(a, 3, 7));
}

int moe_ref_elem_size(int dtype)
{
    switch (dtype) {
    case EPX_BF16:
    case EPX_F16: return 2;
    case EPX_F32: return 4;
    case EPX_FP8_E4M3: return 1;
    default: return 0;
    }
}

float moe_ref_load(int dtype, const void *buf, int64_t i)
{
    switch (dtype) {
    case EPX_BF16: return moe_ref_bf16_to_float(((const uint16_t *)buf)[i]);
    case EPX_F16: return moe_ref_f16_to_float(((const uint16_t *)buf)[i]);
    case EPX_FP8_E4M3: return moe_ref_e4m3_to_float(((const uint8_t *)buf)[i]);
    default: {
        float f;
        memcpy(&f, (const char *)buf + 4 * i, 4);
        return f;
    }
    }
}

void moe_ref_store(int dtype, void *buf, int64_t i, float f)
{
    switch (dtype) {
    case EPX_BF16: ((uint16_t *)buf)[i] = moe_ref_float_to_bf16(f); break;
    case EPX_F16: ((uint16_t *)buf)[i] = moe_ref_float_to_f16(f); break;
    case EPX_FP8_E4M3: ((uint8_t *)buf)[i] = moe_ref_float_to_e4m3(f); break;
    default: memcpy((char *)buf + 4 * i, &f, 4); break;
    }
}

/* ---- Routing --------------------------------------------------------------------------- */

int moe_ref_token_to_rank(const moe_ref_routing_t *rt, int p, int t, int q)
{
    int L = rt->E / rt->R;
    for (int k = 0; k < rt->K; k++) {
        int64_t e = rt->idx[p][(int64_t)t * rt->K + k];
        if (e >= 0 && e / L == q) return 1;
    }
    return 0;
}

static int token_has_expert(const moe_ref_routing_t *rt, int p, int t, int64_t e)
{
    for (int k = 0; k < rt->K; k++)
        if (rt->idx[p][(int64_t)t * rt->K + k] == e) return 1;
    return 0;
}

void moe_ref_layout(const moe_ref_routing_t *rt, int p, int32_t *per_rank, int32_t *per_expert, uint8_t *in_rank)
{
    for (int q = 0; q < rt->R; q++) per_rank[q] = 0;
    for (int e = 0; e < rt->E; e++) per_expert[e] = 0;
    for (int t = 0; t < rt->T[p]; t++) {
        for (int q = 0; q < rt->R; q++) {
            int in = moe_ref_token_to_rank(rt, p, t, q);
            in_rank[(int64_t)t * rt->R + q] = (uint8_t)in;
            per_rank[q] += in;
        }
        for (int e = 0; e < rt->E; e++) per_expert[e] += token_has_expert(rt, p, t, e);
    }
}

void moe_ref_dispatch(const moe_ref_routing_t *rt, const float *const *w, int q, int align, moe_ref_recv_t *out)
{
    int R = rt->R, K = rt->K, L = rt->E / rt->R;
    int64_t n = 0;
    for (int p = 0; p < R; p++)
        for (int t = 0; t < rt->T[p]; t++) n += moe_ref_token_to_rank(rt, p, t, q);
    out->n = n;
    out->src_rank = malloc(sizeof(int32_t) * (size_t)(n + 1));
    out->src_token = malloc(sizeof(int32_t) * (size_t)(n + 1));
    out->topk_idx = malloc(sizeof(int64_t) * (size_t)(n * K + 1));
    out->topk_weights = malloc(sizeof(float) * (size_t)(n * K + 1));
    out->per_expert = calloc((size_t)L + 1, sizeof(int32_t));
    int64_t row = 0;
    for (int p = 0; p < R; p++)
        for (int t = 0; t < rt->T[p]; t++) {
            if (!moe_ref_token_to_rank(rt, p, t, q)) continue;
            out->src_rank[row] = p;
            out->src_token[row] = t;
            for (int k = 0; k < K; k++) {
                int64_t e = rt->idx[p][(int64_t)t * K + k];
                int here = e >= 0 && e / L == q;
                out->topk_idx[row * K + k] = here ? e % L : -1;
                out->topk_weights[row * K + k] = (here && w) ? w[p][(int64_t)t * K + k] : 0.0f;
            }
            row++;
        }
    for (int l = 0; l < L; l++) {
        int32_t c = 0;
        for (int64_t r = 0; r < n; r++) {
            int has = 0;
            for (int k = 0; k < K; k++) has |= out->topk_idx[r * K + k] == l;
            c += has;
        }
        out->per_expert[l] = (c + align - 1) / align * align;
    }
}

void moe_ref_recv_free(moe_ref_recv_t *r)
{
    free(r->src_rank);
    free(r->src_token);
    free(r->topk_idx);
    free(r->topk_weights);
    free(r->per_expert);
    memset(r, 0, sizeof *r);
}

void moe_ref_combine_row(const moe_ref_routing_t *rt, int p, int t, int H, moe_ref_row_fn y, void *ctx, float *acc,
                         double *sum64, double *abs64)
{
    float *v = malloc(sizeof(float) * (size_t)H + 1);
    for (int h = 0; h < H; h++) {
        acc[h] = 0.0f;
        if (sum64) sum64[h] = 0;
        if (abs64) abs64[h] = 0;
    }
    for (int r = 0; r < rt->R; r++) {
        if (!moe_ref_token_to_rank(rt, p, t, r)) continue;
        y(ctx, r, p, t, H, v);
        for (int h = 0; h < H; h++) {
            acc[h] = acc[h] + v[h];
            if (sum64) sum64[h] += (double)v[h];
            if (abs64) abs64[h] += fabs((double)v[h]);
        }
    }
    free(v);
}

/* ---- Low-latency ----------------------------------------------------------------------- */

void moe_ref_ll_slots(const moe_ref_routing_t *rt, int q, int M, int32_t *count, int32_t *src_rank,
                      int32_t *src_token)
{
    int R = rt->R, L = rt->E / rt->R;
    int64_t RM = (int64_t)R * M;
    for (int l = 0; l < L; l++) {
        int64_t e = (int64_t)q * L + l;
        int32_t c = 0;
        for (int64_t i = 0; i < RM; i++) src_rank[l * RM + i] = src_token[l * RM + i] = -1;
        for (int p = 0; p < R; p++)
            for (int t = 0; t < rt->T[p]; t++)
                if (token_has_expert(rt, p, t, e)) {
                    src_rank[l * RM + c] = p;
                    src_token[l * RM + c] = t;
                    c++;
                }
        count[l] = c;
    }
}

void moe_ref_quant_row(const uint16_t *x, int n, int scale_format, uint8_t *q, void *scales)
{
    int nb = (n + 127) / 128;
    for (int b = 0; b < nb; b++) {
        int lo = b * 128, hi = lo + 128 < n ? lo + 128 : n;
        float amax = 0.0f;
        for (int h = lo; h < hi; h++) {
            float a = fabsf(moe_ref_bf16_to_float(x[h]));
            if (a > amax) amax = a;
        }
        if (amax < 1e-4f) amax = 1e-4f;
        float mul;
        if (scale_format == EPX_SCALE_UE8M0) {
            float s = amax / 448.0f;
            int e;
            float m = frexpf(s, &e); /* s = m * 2^e, m in [0.5, 1) */
            int pw = (m == 0.5f) ? e - 1 : e; /* smallest power of two >= s: 2^pw */
            ((uint8_t *)scales)[b] = (uint8_t)(pw + 127);
            mul = ldexpf(1.0f, -pw);
        } else {
            float scale = amax / 448.0f;
            ((float *)scales)[b] = scale;
            mul = 448.0f / amax;
        }
        for (int h = lo; h < hi; h++) {
            float prod = moe_ref_bf16_to_float(x[h]) * mul;
            q[h] = moe_ref_float_to_e4m3(prod);
        }
    }
}

void moe_ref_ll_combine_row(const moe_ref_routing_t *rt, int p, int t, int H, const float *w, moe_ref_row_fn y,
                            void *ctx, float *acc, double *sum64, double *abs64)
{
    float *v = malloc(sizeof(float) * (size_t)H + 1);
    for (int h = 0; h < H; h++) {
        acc[h] = 0.0f;
        if (sum64) sum64[h] = 0;
        if (abs64) abs64[h] = 0;
    }
    float *part = malloc(sizeof(float) * (size_t)H + 1);
    int L = rt->E / rt->R;
    for (int q = 0; q < rt->R; q++) {
        bool any = false;
        for (int k = 0; k < rt->K; k++) {
            int64_t e = rt->idx[p][(int64_t)t * rt->K + k];
            if (e < 0 || e / L != q) continue;
            if (!any)
                for (int h = 0; h < H; h++) part[h] = 0.0f;
            any = true;
            float wk = w[(int64_t)t * rt->K + k];
            y(ctx, (int)e, p, t, H, v);
            for (int h = 0; h < H; h++) {
                float prod = wk * v[h];
                part[h] = part[h] + prod;
                if (sum64) sum64[h] += (double)wk * (double)v[h];
                if (abs64) abs64[h] += fabs((double)wk * (double)v[h]);
            }
        }
        for (int h = 0; any && h < H; h++) acc[h] = acc[h] + part[h];
    }
    free(v), free(part);
}
