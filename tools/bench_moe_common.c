/*
 * epx-bench moe: the code the CPU and CUDA MoE benchmarks share (bench_moe_common.h).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench_moe_common.h"

#define SEED BENCH_MOE_SEED
#define SCALE_BLOCK BENCH_MOE_SCALE_BLOCK

const char *const bench_moe_op_name[NOPS] = {"layout", "dispatch", "combine"};

static void *xmalloc(const bench_moe_data_t *d, size_t bytes) { return d->alloc(d->alloc_ctx, bytes); }

/* ---- Data --------------------------------------------------------------------------------- */

void bench_moe_gen_row(const bench_moe_data_t *d, int s, int t, uint8_t *row, float *scales)
{
    uint64_t base = key4(SEED, (uint64_t)s, (uint64_t)t, 1);
    if (d->fp8 && !d->ll) {
        for (int h = 0; h < d->H; h += 8) {
            uint64_t r = mix64(base + (uint64_t)h);
            for (int j = 0; j < 8 && h + j < d->H; j++, r >>= 8) {
                /* sign, exponent field 4..11, 3 mantissa bits: never zero, never NaN */
                row[h + j] = (uint8_t)((r & 0x80) | ((4 + ((r >> 3) & 7)) << 3) | (r & 7));
            }
        }
        for (int i = 0; i < d->S; i++) {
            uint64_t r = mix64(base ^ (0x5ca1e0000ull + (uint64_t)i));
            scales[i] = (1.0f + (float)(r & 0xffff) / 65536.0f) * (1.0f / 64.0f);
        }
    } else {
        int es = (int)epx_dtype_size(d->xdt), per = 8 / es; /* elements per 64 random bits */
        for (int h = 0; h < d->H; h += per) {
            uint64_t r = mix64(base + (uint64_t)h);
            for (int j = 0; j < per && h + j < d->H; j++, r >>= 8 * es) {
                /* sign, exponent 2^-2 .. 2^1 (magnitude in [0.25, 4): never zero), the other bits random */
                if (d->xdt == EPX_F32)
                    ((uint32_t *)row)[h + j] = (uint32_t)((r & 0x807fffffu) | (125 + ((r >> 23) & 3)) << 23);
                else if (d->xdt == EPX_F16)
                    ((uint16_t *)row)[h + j] = (uint16_t)((r & 0x83ff) | (13 + ((r >> 10) & 3)) << 10);
                else
                    ((uint16_t *)row)[h + j] = (uint16_t)((r & 0x807f) | (125 + ((r >> 7) & 3)) << 7);
            }
        }
    }
}

void bench_moe_set_dtypes(bench_moe_data_t *d, const bench_opts_t *o)
{
    d->fp8 = o->dtype == EPX_FP8_E4M3;
    d->xdt = d->fp8 ? EPX_BF16 : (epx_dtype_t)o->dtype;
    d->cdt = o->combine_dtype != EPX_UNSET ? (epx_dtype_t)o->combine_dtype : d->fp8 ? EPX_BF16 : d->xdt;
}

void bench_moe_make_y_row(const bench_moe_data_t *d, const uint8_t *row, const float *scales, float mult, void *y)
{
    for (int h = 0; h < d->H; h++) dt_store(d->cdt, y, (size_t)h, row_val(d, row, scales, h) * mult);
}

/* The header documents only the scale; q's formula (multiply by 448 / amax rather than
 * divide by the scale) is the library's, needed for equal bits. */
void bench_moe_quantize_row(const bench_moe_data_t *d, const uint16_t *x, uint8_t *q, float *scales)
{
    for (int bl = 0; bl < d->S; bl++) {
        int h0 = bl * SCALE_BLOCK, h1 = h0 + SCALE_BLOCK < d->H ? h0 + SCALE_BLOCK : d->H;
        float amax = 0;
        for (int h = h0; h < h1; h++) {
            float a = fabsf(bf2f(x[h]));
            amax = a > amax ? a : amax;
        }
        if (!(amax >= 1e-4f)) amax = 1e-4f;
        scales[bl] = amax / 448.0f;
        float inv = 448.0f / amax;
        for (int h = h0; h < h1; h++) q[h] = f2fp8(bf2f(x[h]) * inv);
    }
}

void bench_moe_gen_routing(bench_moe_data_t *d, double skew)
{
    int R = d->R, T = d->T, K = d->K, E = d->E;
    d->topk = (int32_t *)xmalloc(d, sizeof(int32_t) * (size_t)R * T * K);
    d->w = (float *)xmalloc(d, sizeof(float) * (size_t)R * T * K);
    int *perm = (int *)xmalloc(d, sizeof(int) * (size_t)E);
    double *wz = (double *)xmalloc(d, sizeof(double) * (size_t)E);
    uint8_t *taken = (uint8_t *)xmalloc(d, (size_t)E);
    rng_t pr = {key4(SEED, 0xfeed, 0, 3)};
    for (int i = 0; i < E; i++) perm[i] = i;
    for (int i = E - 1; i > 0; i--) {
        int j = (int)(rng_next(&pr) % (uint64_t)(i + 1)), tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
    for (int i = 0; i < E; i++) wz[i] = pow((double)(i + 1), -skew);
    for (int s = 0; s < R; s++)
        for (int t = 0; t < T; t++) {
            rng_t r = {key4(SEED, (uint64_t)s, (uint64_t)t, 2)};
            int32_t *e = d->topk + tk(d, s, t);
            memset(taken, 0, (size_t)E);
            for (int k = 0; k < K; k++) {
                int pick;
                if (skew > 0) { /* without replacement, proportional to the remaining weights */
                    double tot = 0;
                    for (int i = 0; i < E; i++) tot += taken[i] ? 0 : wz[i];
                    double u = rng_unit(&r) * tot;
                    pick = -1;
                    for (int i = 0; i < E; i++) {
                        if (taken[i]) continue;
                        pick = i;
                        if ((u -= wz[i]) < 0) break;
                    }
                    taken[pick] = 1;
                    e[k] = perm[pick];
                } else {
                    do pick = (int)(rng_next(&r) % (uint64_t)E);
                    while (taken[pick]);
                    taken[pick] = 1;
                    e[k] = pick;
                }
                d->w[tk(d, s, t) + k] = 0.05f + 0.95f * (float)rng_unit(&r);
            }
        }
    d->dest = (uint8_t *)xmalloc(d, (size_t)R * T * R);
    memset(d->dest, 0, (size_t)R * T * R);
    for (int s = 0; s < R; s++)
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++) d->dest[((int64_t)s * T + t) * R + d->topk[tk(d, s, t) + k] / d->L] = 1;
    free(perm);
    free(wz);
    free(taken);
}

void bench_moe_count_rows(const bench_moe_data_t *d, int q, int64_t *rows, int64_t *link)
{
    *rows = *link = 0;
    for (int s = 0; s < d->R; s++)
        for (int t = 0; t < d->T; t++) {
            int64_t c = 0;
            if (d->ll) {
                for (int k = 0; k < d->K; k++) c += d->topk[tk(d, s, t) + k] / d->L == q;
            } else {
                c = d->dest[((int64_t)s * d->T + t) * d->R + q];
            }
            *rows += c;
            if (s != q) *link += c;
        }
}

/* ht: for each rank r the token went to, in ascending order, + cdt(value * mult_of(r));
 * ll: for each rank r ascending, + the sum (from 0) over the k ascending whose expert lives
 * on r of w[t, k] * cdt(value * mult_of(expert)). */
void bench_moe_expected_combine(const bench_moe_data_t *d, void *out)
{
    int H = d->H, K = d->K, q = d->me;
    uint8_t *row = (uint8_t *)xmalloc(d, (size_t)H * sizeof(float));
    uint8_t *qx = (uint8_t *)xmalloc(d, (size_t)H);
    float *sc = (float *)xmalloc(d, sizeof(float) * (size_t)(d->S ? d->S : 1));
    float *val = (float *)xmalloc(d, sizeof(float) * (size_t)H), *acc = (float *)xmalloc(d, sizeof(float) * (size_t)H);
    float *part = (float *)xmalloc(d, sizeof(float) * (size_t)H);
    for (int t = 0; t < d->T; t++) {
        bench_moe_gen_row(d, q, t, row, sc);
        if (d->ll && d->fp8) {
            bench_moe_quantize_row(d, (const uint16_t *)row, qx, sc);
            for (int h = 0; h < H; h++) val[h] = row_val(d, qx, sc, h);
        } else {
            for (int h = 0; h < H; h++) val[h] = row_val(d, row, sc, h);
        }
        for (int h = 0; h < H; h++) acc[h] = 0.0f;
        if (d->ll) {
            for (int r = 0; r < d->R; r++) {
                bool any = false;
                for (int k = 0; k < K; k++) {
                    int e = d->topk[tk(d, q, t) + k];
                    if (e < 0 || e / d->L != r) continue;
                    if (!any)
                        for (int h = 0; h < H; h++) part[h] = 0.0f;
                    any = true;
                    float wk = d->w[tk(d, q, t) + k], mu = mult_of(e);
                    for (int h = 0; h < H; h++) part[h] += wk * dt_round(d->cdt, val[h] * mu);
                }
                for (int h = 0; any && h < H; h++) acc[h] += part[h];
            }
        } else {
            for (int r = 0; r < d->R; r++) {
                if (!d->dest[((int64_t)q * d->T + t) * d->R + r]) continue;
                float mu = mult_of(r);
                for (int h = 0; h < H; h++) acc[h] += dt_round(d->cdt, val[h] * mu);
            }
        }
        dt_store_row(d->cdt, (uint8_t *)out + (size_t)t * H * epx_dtype_size(d->cdt), acc, H);
    }
    free(row);
    free(qx);
    free(sc);
    free(val);
    free(acc);
    free(part);
}

int64_t bench_moe_check_conversions(bench_moe_data_t *d, int samples, bool fp8)
{
    int64_t bad = 0;
    for (int i = 0; i < 256; i++) d->fp8_tab[i] = epx_fp8_e4m3_to_float((uint8_t)i);
    rng_t r = {key4(SEED, 7, 7, 7)};
    for (int i = 0; i < samples; i++) {
        uint32_t u = (uint32_t)rng_next(&r);
        if (i < 65536) u = (uint32_t)i << 16 | (u & 0xffff); /* every exponent, sign */
        float f;
        memcpy(&f, &u, 4);
        if (isnan(f)) continue;
        bad += f2bf(f) != epx_float_to_bf16(f);
        bad += f2h(f) != epx_float_to_f16(f);
        if (fp8) bad += f2fp8(f) != epx_float_to_fp8_e4m3(f);
    }
    for (int i = 0; i < 65536; i++) {
        uint16_t v = (uint16_t)i;
        float a = bf2f(v), e = epx_bf16_to_float(v);
        bad += !isnan(a) && memcmp(&a, &e, 4) != 0;
        a = h2f(v), e = epx_f16_to_float(v);
        bad += !isnan(a) != !isnan(e) || (!isnan(a) && memcmp(&a, &e, 4) != 0);
    }
    for (uint16_t v = 0; v < 0x7c00; v++) { /* f16 ties: each midpoint (to 65536 last) and its neighbours */
        float lo = h2f(v), hi = v == 0x7bff ? 65536.0f : h2f((uint16_t)(v + 1)), mid = lo + (hi - lo) * 0.5f;
        float near[3] = {nextafterf(mid, 0.0f), mid, nextafterf(mid, INFINITY)};
        for (int j = 0; j < 6; j++) {
            float f = j < 3 ? near[j] : -near[j - 3];
            bad += f2h(f) != epx_float_to_f16(f);
        }
    }
    return bad;
}

/* ---- Checking ----------------------------------------------------------------------------- */

int64_t bench_moe_cmp_elems(const void *a_, const void *e_, const void *o_, size_t n, size_t es, int64_t *diff)
{
    const uint8_t *a = (const uint8_t *)a_, *e = (const uint8_t *)e_, *o = (const uint8_t *)o_;
    if (!memcmp(a, e, n * es) && (!o || !memcmp(a, o, n * es))) return 0;
    int64_t w = 0;
    for (size_t i = 0; i < n; i++) {
        bool bad_o = o && memcmp(a + i * es, o + i * es, es) != 0;
        w += memcmp(a + i * es, e + i * es, es) != 0 || bad_o;
        if (diff) *diff += bad_o;
    }
    return w;
}

void bench_moe_ref_layout(const bench_moe_data_t *d, const int64_t *idx, layout_out_t *o)
{
    int R = d->R, K = d->K, L = d->L;
    memset(o->per_rank, 0, sizeof(int32_t) * (size_t)R);
    memset(o->per_expert, 0, sizeof(int32_t) * (size_t)d->E);
    memset(o->in_rank, 0, (size_t)d->T * R);
    for (int t = 0; t < d->T; t++) {
        uint8_t *f = o->in_rank + (int64_t)t * R;
        for (int k = 0; k < K; k++) {
            int64_t e = idx[(int64_t)t * K + k];
            if (e < 0) continue;
            o->per_expert[e]++;
            f[e / L] = 1;
        }
        for (int r = 0; r < R; r++) o->per_rank[r] += f[r];
    }
}

int64_t bench_moe_check_layout(const bench_moe_data_t *d, const layout_out_t *a, const layout_out_t *e,
                               const layout_out_t *o, int64_t *diff)
{
    return bench_moe_cmp_elems(a->per_rank, e->per_rank, o ? o->per_rank : NULL, (size_t)d->R, 4, diff) +
           bench_moe_cmp_elems(a->per_expert, e->per_expert, o ? o->per_expert : NULL, (size_t)d->E, 4, diff) +
           bench_moe_cmp_elems(a->in_rank, e->in_rank, o ? o->in_rank : NULL, (size_t)d->T * d->R, 1, diff);
}

int64_t bench_moe_check_ll_dispatch(const bench_moe_data_t *d, const ll_out_t *a, const ll_out_t *o, int64_t *diff,
                                    int64_t RT, size_t row)
{
    int K = d->K, L = d->L, q = d->me;
    int64_t wrong = 0;
    uint8_t *x = (uint8_t *)xmalloc(d, sizeof(float) * (size_t)d->H); /* ll: d->xdt tokens in */
    uint8_t *qx = (uint8_t *)xmalloc(d, (size_t)d->H);
    float *qs = (float *)xmalloc(d, sizeof(float) * (size_t)(d->S ? d->S : 1));
    int32_t minus1[1] = {-1};
    for (int l = 0; l < L; l++) {
        int e = q * L + l;
        int64_t i = 0;
        for (int s = 0; s < d->R; s++)
            for (int t = 0; t < d->T; t++) {
                bool hit = false;
                for (int k = 0; k < K; k++) hit |= d->topk[tk(d, s, t) + k] == e;
                if (!hit) continue;
                int64_t slot = (int64_t)l * RT + i++;
                bench_moe_gen_row(d, s, t, x, NULL);
                const void *want = x;
#define OTHER(f, off) (o ? (const void *)(o->f + (off)) : NULL)
                if (d->fp8) {
                    bench_moe_quantize_row(d, (const uint16_t *)x, qx, qs);
                    want = qx;
                    wrong += bench_moe_cmp_elems(a->xs + slot * d->S, qs, OTHER(xs, slot * d->S), (size_t)d->S, 4, diff);
                }
                wrong += bench_moe_cmp_elems(a->x + slot * (int64_t)row, want, OTHER(x, slot * (int64_t)row),
                                             (size_t)d->H, row_es(d), diff);
                int32_t v[2] = {s, t};
                wrong += bench_moe_cmp_elems(a->src_rank + slot, &v[0], OTHER(src_rank, slot), 1, 4, diff);
                wrong += bench_moe_cmp_elems(a->src_token + slot, &v[1], OTHER(src_token, slot), 1, 4, diff);
            }
        int32_t cnt = (int32_t)i;
        wrong += bench_moe_cmp_elems(a->count + l, &cnt, OTHER(count, l), 1, 4, diff);
        for (int64_t j = i; j < RT; j++) { /* past the count: -1 */
            int64_t slot = (int64_t)l * RT + j;
            wrong += bench_moe_cmp_elems(a->src_rank + slot, minus1, OTHER(src_rank, slot), 1, 4, diff);
            wrong += bench_moe_cmp_elems(a->src_token + slot, minus1, OTHER(src_token, slot), 1, 4, diff);
        }
#undef OTHER
    }
    free(x);
    free(qx);
    free(qs);
    return wrong;
}

void bench_moe_ll_make_y(const bench_moe_data_t *d, const ll_out_t *a, int64_t RT, size_t row, uint8_t *y,
                         size_t y_row)
{
    for (int l = 0; l < d->L; l++) {
        int64_t c = a->count[l] < 0 ? 0 : a->count[l] > RT ? RT : a->count[l];
        float mu = mult_of(d->me * d->L + l);
        for (int64_t i = 0; i < c; i++) {
            int64_t slot = (int64_t)l * RT + i;
            const uint8_t *r = a->x + slot * (int64_t)row;
            const float *sc = d->fp8 ? a->xs + slot * d->S : NULL;
            bench_moe_make_y_row(d, r, sc, mu, y + slot * (int64_t)y_row);
        }
    }
}

int64_t bench_moe_check_ht_dispatch(const bench_moe_data_t *d, const ht_out_t *a, const ht_out_t *o, int64_t *diff,
                                    int64_t n_exp, int64_t cap)
{
    int K = d->K, L = d->L, q = d->me;
    size_t row_bytes = (size_t)d->H * row_es(d);
    int64_t wrong = 0, n = a->n < 0 ? 0 : a->n > cap ? cap : a->n;
    if (a->n != n_exp) wrong += a->n > n_exp ? a->n - n_exp : n_exp - a->n;
    if (o && o->n != a->n && diff) ++*diff;
    uint8_t *row = (uint8_t *)xmalloc(d, row_bytes);
    float *sc = (float *)xmalloc(d, sizeof(float) * (size_t)d->S);
    int64_t eidx[EPX_MOE_MAX_TOPK];
    float ew[EPX_MOE_MAX_TOPK];
    int32_t *per_expert = (int32_t *)xmalloc(d, sizeof(int32_t) * (size_t)L);
    memset(per_expert, 0, sizeof(int32_t) * (size_t)L);
    int64_t i = 0, no = o ? (o->n < 0 ? 0 : o->n > cap ? cap : o->n) : 0;
    for (int s = 0; s < d->R; s++)
        for (int t = 0; t < d->T; t++) {
            if (!d->dest[((int64_t)s * d->T + t) * d->R + q]) continue;
            for (int k = 0; k < K; k++) {
                int e = d->topk[tk(d, s, t) + k];
                eidx[k] = e / L == q ? e % L : -1;
                ew[k] = eidx[k] >= 0 ? d->w[tk(d, s, t) + k] : 0.0f;
                if (eidx[k] >= 0) per_expert[eidx[k]]++;
            }
            if (i < n) {
                bench_moe_gen_row(d, s, t, row, sc);
                bool oi = o && i < no; /* the other contender has this row too */
#define OTHER(f, off) (oi ? (const void *)(o->f + (off)) : NULL)
                wrong += bench_moe_cmp_elems(a->x + i * (int64_t)row_bytes, row, OTHER(x, i * (int64_t)row_bytes),
                                             (size_t)d->H, row_es(d), diff);
                if (d->fp8)
                    wrong += bench_moe_cmp_elems(a->xs + i * d->S, sc, OTHER(xs, i * d->S), (size_t)d->S, 4, diff);
                wrong += bench_moe_cmp_elems(a->idx + i * K, eidx, OTHER(idx, i * K), (size_t)K, 8, diff);
                wrong += bench_moe_cmp_elems(a->w + i * K, ew, OTHER(w, i * K), (size_t)K, 4, diff);
                int32_t v[2] = {s, t};
                wrong += bench_moe_cmp_elems(a->src_rank + i, &v[0], OTHER(src_rank, i), 1, 4, diff);
                wrong += bench_moe_cmp_elems(a->src_token + i, &v[1], OTHER(src_token, i), 1, 4, diff);
#undef OTHER
            }
            i++;
        }
    wrong += bench_moe_cmp_elems(a->per_expert, per_expert, o ? o->per_expert : NULL, (size_t)L, 4, diff);
    free(row);
    free(sc);
    free(per_expert);
    return wrong;
}

/* ---- Results ------------------------------------------------------------------------------- */

int bench_moe_gather(bench_ctx_t *b, bench_moe_report_t *r, double med[2][NOPS], int64_t wrong[2][NOPS],
                     int64_t diff[NOPS], int ncs, double rows_mean, double link_mean, size_t wire_row, size_t y_row)
{
    memset(r->time_us, 0, sizeof r->time_us);
    memset(r->wrong, 0, sizeof r->wrong);
    for (int op = 0; op < NOPS; op++) {
        for (int c = 0; c < ncs; c++) {
            r->time_us[c][op] = bench_max(b, med[c][op]);
            r->wrong[c][op] = bench_sum(b, (double)wrong[c][op]);
        }
        r->diff[op] = bench_sum(b, (double)diff[op]);
    }
    r->logical[OP_LAYOUT] = r->link[OP_LAYOUT] = 0;
    r->logical[OP_DISPATCH] = rows_mean * (double)wire_row;
    r->logical[OP_COMBINE] = rows_mean * (double)y_row;
    r->link[OP_DISPATCH] = link_mean * (double)wire_row;
    r->link[OP_COMBINE] = link_mean * (double)y_row;
    int any_wrong = 0;
    for (int op = 0; op < NOPS; op++)
        any_wrong |= r->wrong[0][op] > 0 || r->wrong[1][op] > 0 || r->diff[op] > 0;
    return any_wrong;
}

void bench_moe_print(const bench_moe_report_t *r, const char *json_path)
{
    FILE *json = NULL;
    if (json_path && !(json = fopen(json_path, "w"))) perror(json_path);
    printf("# %-9s %10s %12s %10s %7s", "op", "time_us", "logical_GB/s", "link_GB/s", "#wrong");
    if (r->baseline) printf(" | %11s %7s %8s", "baseline_us", "#wrong", "speedup");
    printf("\n");
    if (json) fprintf(json, "[");
    for (int op = 0; op < NOPS; op++) {
        double t = r->time_us[0][op], bt = r->time_us[1][op];
        double lg = t > 0 ? r->logical[op] / t / 1e3 : 0, lk = t > 0 ? r->link[op] / t / 1e3 : 0;
        double speedup = r->baseline && t > 0 ? bt / t : 0;
        if (op == OP_LAYOUT)
            printf("  %-9s %10.2f %12s %10s %7.0f", bench_moe_op_name[op], t, "-", "-", r->wrong[0][op]);
        else
            printf("  %-9s %10.2f %12.3f %10.3f %7.0f", bench_moe_op_name[op], t, lg, lk, r->wrong[0][op]);
        if (r->baseline) printf(" | %11.2f %7.0f %7.2fx", bt, r->wrong[1][op], speedup);
        printf("\n");
        if (!json) continue;
        fprintf(json,
                "%s\n  {\"op\": \"%s\", \"mode\": \"%s\", \"dtype\": \"%s\", \"combine_dtype\": \"%s\", "
                "\"backend\": \"%s\", \"ranks\": %d, ",
                op ? "," : "", bench_moe_op_name[op], r->mode, r->dtype, r->combine_dtype, r->backend, r->ranks);
        if (r->gpus >= 0) fprintf(json, "\"gpus\": %d, ", r->gpus);
        fprintf(json, "\"tokens\": %d, \"hidden\": %d, \"topk\": %d, \"experts\": %d, \"skew\": %g, ", r->tokens,
                r->hidden, r->topk, r->experts, r->skew);
        if (r->registered >= 0) fprintf(json, "\"registered\": %s, ", r->registered ? "true" : "false");
        fprintf(json, "\"iters\": %d, ", r->iters);
        if (r->warmup >= 0) fprintf(json, "\"warmup\": %d, ", r->warmup);
        if (r->timing) fprintf(json, "\"timing\": \"%s\", ", r->timing);
        fprintf(json,
                "\"time_us\": %.3f, \"logical_bytes\": %.0f, \"link_bytes\": %.0f, \"logical_gbs\": %.4f, "
                "\"link_gbs\": %.4f, \"wrong\": %.0f, ",
                t, r->logical[op], r->link[op], lg, lk, r->wrong[0][op]);
        if (r->checked >= 0) fprintf(json, "\"checked\": %s, ", r->checked ? "true" : "false");
        fprintf(json,
                "\"diff_vs_baseline\": %.0f, \"baseline\": \"%s\", \"baseline_time_us\": %.3f, "
                "\"baseline_wrong\": %.0f, \"speedup\": %.4f",
                r->diff[op], r->baseline ? (op == OP_LAYOUT ? r->baseline_layout : r->baseline_moe) : "none",
                r->baseline ? bt : 0.0, r->wrong[1][op], speedup);
        if (r->device_mem >= 0) fprintf(json, ", \"epx_device_mem_bytes\": %.0f", r->device_mem);
        if (r->graph_us[op] > 0) fprintf(json, ", \"graph_time_us\": %.3f", r->graph_us[op]);
        if (op == OP_COMBINE && r->pair_graph_us > 0) fprintf(json, ", \"pair_graph_time_us\": %.3f", r->pair_graph_us);
        fprintf(json, "}");
    }
    if (json) {
        fprintf(json, "\n]\n");
        fclose(json);
    }
}
