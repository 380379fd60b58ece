/*
 * Sequential reference for the MoE API and the element conversions, written from the
 * specification in epx.h (not from the library): no communication, one rank's view of
 * every rank's inputs. Exact float32 operations where the library promises bits (combine,
 * FP8 quantisation); float64 companions for tolerance checks. Build with
 * -ffp-contract=off (no FMA).
 */
#ifndef EPX_MOE_REF_H
#define EPX_MOE_REF_H

#include <stdint.h>

#include "epx.h"

/* ---- Conversions (independent of the library: rounding done in double arithmetic) ---- */

/* Round the finite value v (exactly representable as a double) to the nearest value with
 * `mant_bits` fraction bits and minimum normal exponent `emin` (subnormals below it), ties
 * to an even last fraction bit. No overflow handling: the caller compares with its max. */
double moe_ref_round(double v, int mant_bits, int emin);

/* Decode by formula (sign, exponent, fraction; NaN and infinity per format). */
float moe_ref_bf16_to_float(uint16_t v);
float moe_ref_f16_to_float(uint16_t v);
float moe_ref_e4m3_to_float(uint8_t v); /* e4m3fn: bias 7, no inf, 0x7F/0xFF NaN */

/* Round to nearest even; bf16/f16 overflow to infinity, e4m3 saturates finite values to
 * +-448; NaN gives a NaN code (bf16 0x7FC0 / f16 0x7E00 / e4m3 0x7F with the input's sign). */
uint16_t moe_ref_float_to_bf16(float f);
uint16_t moe_ref_float_to_f16(float f);
uint8_t moe_ref_float_to_e4m3(float f);

/* Element `i` of `buf` (dtype BF16, F16, F32 or FP8_E4M3) as float. */
float moe_ref_load(int dtype, const void *buf, int64_t i);
/* Store f into element i of buf, rounded to nearest even. */
void moe_ref_store(int dtype, void *buf, int64_t i, float f);
/* Bytes of one element (the four float dtypes). */
int moe_ref_elem_size(int dtype);

/* ---- Routing ------------------------------------------------------------------------- */

/* Every rank's routing: T[p] tokens, idx[p] = [T[p] * K] expert ids (-1 = none). */
typedef struct {
    int R, E, K;
    const int *T;
    const int64_t *const *idx;
} moe_ref_routing_t;

/* Does token t of rank p go to rank q (at least one of its experts lives there)? */
int moe_ref_token_to_rank(const moe_ref_routing_t *rt, int p, int t, int q);

/* epx_moe_layout of rank p's routing. Outputs [R], [E], [T*R]. */
void moe_ref_layout(const moe_ref_routing_t *rt, int p, int32_t *per_rank, int32_t *per_expert,
                    uint8_t *in_rank);

/* High-throughput dispatch as seen by receiving rank q. */
typedef struct {
    int64_t n;            /* rows */
    int32_t *src_rank;    /* [n] */
    int32_t *src_token;   /* [n] */
    int64_t *topk_idx;    /* [n * K] local expert ids or -1 */
    float *topk_weights;  /* [n * K] weight or 0 (when weights were given) */
    int32_t *per_expert;  /* [L] rows per local expert, rounded up to the alignment */
} moe_ref_recv_t;

/* w[p] = [T[p] * K] weights of rank p (NULL: topk_weights not computed). Allocates. */
void moe_ref_dispatch(const moe_ref_routing_t *rt, const float *const *w, int q, int align, moe_ref_recv_t *out);
void moe_ref_recv_free(moe_ref_recv_t *r);

/* A row of H float values that `rank` holds for token src_token of src_rank: the
 * combine input y of that rank (high-throughput) or expert `rank`'s output (low-latency). */
typedef void (*moe_ref_row_fn)(void *ctx, int rank, int src_rank, int src_token, int H, float *row);

/* High-throughput combine of token t of home rank p: acc[h] = 0.0f, then for every rank r
 * the token went to, ascending, acc[h] = acc[h] + y(r)[h] in float32 (the caller casts).
 * sum64/abs64 (may be NULL) get the float64 sum and sum of magnitudes for a tolerance
 * check. Used with H = K for the combined top-k weights. */
void moe_ref_combine_row(const moe_ref_routing_t *rt, int p, int t, int H, moe_ref_row_fn y, void *ctx, float *acc,
                         double *sum64, double *abs64);

/* ---- Low-latency --------------------------------------------------------------------- */

/* Slots of rank q: count[L], src_rank/src_token [L * R * M] (-1 past the count), packed by
 * source rank ascending, then source token ascending, once per (token, expert). */
void moe_ref_ll_slots(const moe_ref_routing_t *rt, int q, int M, int32_t *count, int32_t *src_rank,
                      int32_t *src_token);

/* FP8 quantisation of one row of n bf16 values in blocks of 128: q[n] e4m3 codes and
 * scales [ceil(n/128)] as float (EPX_SCALE_F32) or UE8M0 bytes (EPX_SCALE_UE8M0). */
void moe_ref_quant_row(const uint16_t *x, int n, int scale_format, uint8_t *q, void *scales);

/* Low-latency combine of token t of rank p, a partial sum per expert rank: acc[h] = 0.0f;
 * for each rank q ascending that holds one of the token's experts: part[h] = 0.0f, then for
 * k ascending with e = idx[t,k] >= 0 on rank q: part[h] = part[h] + (float)(w[t,k] * y(e)[h])
 * (product rounded to float); then acc[h] = acc[h] + part[h]. The caller rounds acc to bf16.
 * w = rank p's weights [T*K]; y gets (expert e, p, t). */
void moe_ref_ll_combine_row(const moe_ref_routing_t *rt, int p, int t, int H, const float *w, moe_ref_row_fn y,
                            void *ctx, float *acc, double *sum64, double *abs64);

#endif
