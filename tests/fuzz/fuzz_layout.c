/*
 * Fuzz target: routing validation and layout (src/core/routing.c), called directly.
 *
 * The input picks R ranks, E = R * L experts, T tokens, K, the index dtype and every
 * top-k entry (valid ids, -1, or any 32/64-bit value). Checked against a reference written
 * here from the definitions in epx.h: epx__topk_validate accepts exactly the tables whose
 * entries all lie in [-1, E) and names the first bad (token, k) in row-major order; for
 * valid tables, epx__layout's tokens per rank (once per rank), tokens per expert (once per
 * token) and is_token_in_rank, with any subset of the outputs NULL, and epx__topk_to_i32.
 */
#include <stdbool.h>
#include <string.h>

#include "core/core.h"
#include "fuzz_input.h"

#define MAX_R 100 /* above 64 too: the layout counts ranks two ways */
#define MAX_L 40
#define MAX_T 64

static int64_t entry(fuzz_in_t *in, int E)
{
    uint32_t kind = fuzz_u8(in);
    switch (kind % 8) {
    case 0: return -1;
    case 1: return (int64_t)(int32_t)fuzz_u32(in); /* any int32 */
    case 2: return (int64_t)fuzz_bytes(in, 8);     /* any int64 */
    case 3: return E + (int64_t)(kind >> 3) - 2;   /* around the upper bound */
    case 4: return (int64_t)((uint64_t)fuzz_u8(in) << 32) + (kind >> 3); /* truncates to a valid int32 */
    default: return (int64_t)(fuzz_u16(in) % (uint32_t)E);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_in_t in = {data, size};
    int R = 1 + fuzz_below(&in, MAX_R);
    int L = 1 + fuzz_below(&in, MAX_L);
    int E = R * L;
    int T = fuzz_below(&in, MAX_T + 1);
    int K = 1 + fuzz_below(&in, EPX_MOE_MAX_TOPK);
    bool i32 = fuzz_u8(&in) & 1;
    uint32_t null_mask = fuzz_u8(&in);
    epx_dtype_t idt = i32 ? EPX_I32 : EPX_I64;

    /* The table as the caller would hold it, and its int64 values as the library reads them. */
    int64_t *want = malloc(sizeof(int64_t) * (size_t)(T * K + 1));
    void *idx = malloc((i32 ? 4 : 8) * (size_t)(T * K + 1));
    for (int i = 0; i < T * K; i++) {
        int64_t v = entry(&in, E);
        if (i32) {
            ((int32_t *)idx)[i] = (int32_t)v;
            want[i] = (int32_t)v;
        } else {
            ((int64_t *)idx)[i] = v;
            want[i] = v;
        }
    }

    int first_bad = -1;
    for (int i = 0; i < T * K && first_bad < 0; i++)
        if (want[i] < -1 || want[i] >= E) first_bad = i;

    epx__errbuf_t err;
    memset(&err, 0, sizeof err);
    epx_status_t st = epx__topk_validate(idx, idt, T, K, E, &err);
    if (first_bad >= 0) {
        FUZZ_CHECK(st == EPX_ERR_INVALID_ARGUMENT, "status %d for a bad entry at %d", (int)st, first_bad);
        char where[64];
        snprintf(where, sizeof where, "[token %d, k %d]", first_bad / K, first_bad % K);
        FUZZ_CHECK(strstr(err.msg, where) != NULL, "message \"%s\" does not name %s", err.msg, where);
        free(idx);
        free(want);
        return 0;
    }
    FUZZ_CHECK(st == EPX_SUCCESS, "status %d for a valid table", (int)st);

    /* Reference layout: for every token, the set of its ranks and experts. */
    int32_t ref_rank[MAX_R] = {0}, ref_exp[MAX_R * MAX_L] = {0};
    uint8_t *ref_in = calloc((size_t)(T * R + 1), 1);
    for (int t = 0; t < T; t++) {
        bool rank_hit[MAX_R] = {false}, exp_hit[MAX_R * MAX_L] = {false};
        for (int k = 0; k < K; k++) {
            int64_t e = want[t * K + k];
            if (e == -1) continue;
            exp_hit[e] = true;
            rank_hit[e / L] = true;
        }
        for (int e = 0; e < E; e++) ref_exp[e] += exp_hit[e];
        for (int r = 0; r < R; r++) {
            ref_rank[r] += rank_hit[r];
            ref_in[t * R + r] = rank_hit[r];
        }
    }

    int32_t *per_rank = null_mask & 1 ? NULL : malloc(sizeof(int32_t) * (size_t)R);
    int32_t *per_exp = null_mask & 2 ? NULL : malloc(sizeof(int32_t) * (size_t)E);
    uint8_t *in_rank = null_mask & 4 ? NULL : malloc((size_t)(T * R + 1));
    if (per_rank) memset(per_rank, 0xA5, sizeof(int32_t) * (size_t)R);
    if (per_exp) memset(per_exp, 0xA5, sizeof(int32_t) * (size_t)E);
    if (in_rank) memset(in_rank, 0xA5, (size_t)(T * R + 1));
    st = epx__layout(idx, idt, T, K, E, R, per_rank, per_exp, in_rank);
    FUZZ_CHECK(st == EPX_SUCCESS, "layout status %d", (int)st);
    for (int r = 0; per_rank && r < R; r++)
        FUZZ_CHECK(per_rank[r] == ref_rank[r], "tokens to rank %d: %d, reference %d", r, per_rank[r], ref_rank[r]);
    for (int e = 0; per_exp && e < E; e++)
        FUZZ_CHECK(per_exp[e] == ref_exp[e], "tokens to expert %d: %d, reference %d", e, per_exp[e], ref_exp[e]);
    for (int i = 0; in_rank && i < T * R; i++)
        FUZZ_CHECK(in_rank[i] == ref_in[i], "is_token_in_rank[%d, %d] = %d, reference %d", i / R, i % R, in_rank[i],
                   ref_in[i]);
    if (in_rank) FUZZ_CHECK(in_rank[T * R] == 0xA5, "is_token_in_rank written past [T, R]");

    int32_t *as_i32 = malloc(sizeof(int32_t) * (size_t)(T * K + 1));
    epx__topk_to_i32(idx, idt, T, K, as_i32);
    for (int i = 0; i < T * K; i++)
        FUZZ_CHECK(as_i32[i] == want[i], "topk_to_i32[%d] = %d, reference %lld", i, as_i32[i], (long long)want[i]);

    free(as_i32);
    free(per_rank);
    free(per_exp);
    free(in_rank);
    free(ref_in);
    free(idx);
    free(want);
    return 0;
}
