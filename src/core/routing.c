/* Routing: validation, conversion and layout of top-k expert indices. */
#include <stdlib.h>
#include <string.h>

#include "core.h"

/* The pass over the ids read as U (uint32_t or uint64_t: the same bits as the signed ids). */
#define EPX__ANY_BAD_LOOP(U)                                                                       \
    do {                                                                                           \
        const U *p = (const U *)topk_idx;                                                          \
        U bad = 0, e = (U)num_experts;                                                             \
        for (int64_t i = 0; i < n; i++) {                                                          \
            U u = p[i] + 1u;                                                                       \
            bad |= u | (e - u);                                                                    \
        }                                                                                          \
        return bad >> (8 * sizeof(U) - 1);                                                         \
    } while (0)

/* Is any of the n entries out of [-1, E)? One branch-free pass that the compiler
 * vectorises (an AVX2 clone too): u = e + 1, taken unsigned, is bad exactly when u > E;
 * with E < 2^31 that is when u or E - u has its top bit set (u >= 2^(w-1), or E < u below
 * it), which needs no unsigned compare (SSE2 and AVX2 have none: the compare form ran
 * scalar, 45-48 us for 32k int64 ids against 9-10 now; docs/PERF.md). */
EPX__MULTIVERSION
static bool epx__topk_any_bad(const void *topk_idx, epx_dtype_t index_dtype, int64_t n, int num_experts)
{
    if (index_dtype == EPX_I32) EPX__ANY_BAD_LOOP(uint32_t);
    EPX__ANY_BAD_LOOP(uint64_t);
}

epx_status_t epx__topk_validate(const void *topk_idx, epx_dtype_t index_dtype, int num_tokens, int topk,
                                int num_experts, epx__errbuf_t *err)
{
    if (num_tokens <= 0 || !epx__topk_any_bad(topk_idx, index_dtype, (int64_t)num_tokens * topk, num_experts))
        return EPX_SUCCESS;
    for (int64_t t = 0; t < num_tokens; t++) /* name the first bad entry */
        for (int k = 0; k < topk; k++) {
            int64_t e = epx__topk_at(topk_idx, index_dtype, t, topk, k);
            if (e < -1 || e >= num_experts)
                return epx__fail(err, EPX_ERR_INVALID_ARGUMENT,
                                 "topk_idx[token %lld, k %d] = %lld is not an expert id in [-1, %d)", (long long)t, k,
                                 (long long)e, num_experts);
        }
    return EPX_SUCCESS;
}

void epx__topk_to_i32(const void *topk_idx, epx_dtype_t index_dtype, int num_tokens, int topk, int32_t *out)
{
    if (num_tokens <= 0) return; /* topk_idx may be NULL then: not even a zero-length memcpy */
    if (index_dtype == EPX_I32) {
        memcpy(out, topk_idx, sizeof(int32_t) * (size_t)num_tokens * (size_t)topk);
        return;
    }
    for (int64_t i = 0; i < (int64_t)num_tokens * topk; i++) out[i] = (int32_t)((const int64_t *)topk_idx)[i];
}

int epx__topk_ranks(const int32_t *tk, int K, const int32_t *rank_of_expert, int nranks, int *ranks)
{
    int n = 0;
    if (nranks <= 64) { /* a bit per rank, read back in order: no sort */
        uint64_t set = 0;
        for (int k = 0; k < K; k++)
            if (tk[k] >= 0) set |= (uint64_t)1 << rank_of_expert[tk[k]];
        for (; set; set &= set - 1) ranks[n++] = __builtin_ctzll(set);
        return n;
    }
    for (int k = 0; k < K; k++) {
        if (tk[k] < 0) continue;
        int r = rank_of_expert[tk[k]], j = n;
        bool dup = false;
        for (int a = 0; a < n; a++) dup = dup || ranks[a] == r;
        if (dup) continue;
        while (j > 0 && ranks[j - 1] > r) ranks[j] = ranks[j - 1], j--;
        ranks[j] = r, n++;
    }
    return n;
}

/* The layout's loop over ids of one index type (I: int32_t or int64_t); last_e[e]: 1 + the
 * last token counted at expert e, so that a repeated expert counts once. Up to 64 ranks a
 * token's ranks are a bit set, counted and marked once per rank it reaches (no branch per
 * id on whether its rank was seen: half of those mispredict); above, last_r likewise. */
#define EPX__LAYOUT_LOOP(I)                                                                        \
    do {                                                                                           \
        const I *ids = (const I *)topk;                                                            \
        for (int64_t t = 0; t < num_tokens; t++) {                                                 \
            uint64_t set = 0;                                                                      \
            for (int k = 0; k < topk_k; k++) {                                                     \
                I e = ids[t * topk_k + k];                                                         \
                if (e < 0) continue;                                                               \
                if (last_e[e] != t + 1) last_e[e] = (int32_t)(t + 1), per_e[e]++;                  \
                int32_t r = rank_of[e];                                                            \
                if (nranks <= 64) {                                                                \
                    set |= (uint64_t)1 << r;                                                       \
                } else if (last_r[r] != t + 1) {                                                   \
                    last_r[r] = (int32_t)(t + 1), per_r[r]++;                                      \
                    if (in_rank) in_rank[t * nranks + r] = 1;                                      \
                }                                                                                  \
            }                                                                                      \
            for (; set; set &= set - 1) {                                                          \
                int r = __builtin_ctzll(set);                                                      \
                per_r[r]++;                                                                        \
                if (in_rank) in_rank[t * nranks + r] = 1;                                          \
            }                                                                                      \
        }                                                                                          \
    } while (0)

epx_status_t epx__layout(const void *topk, epx_dtype_t index_dtype, int num_tokens, int topk_k, int num_experts,
                         int nranks, int32_t *per_rank, int32_t *per_expert, uint8_t *in_rank)
{
    int L = num_experts / nranks;
    /* last_r, last_e (zeroed), rank_of, then the counts when the caller wants none of them;
     * on the stack when small (a small layout's time was mostly this memory's calloc). */
    int32_t small[1024];
    size_t words = 2 * (size_t)nranks + 3 * (size_t)num_experts;
    int32_t *last_r = words <= sizeof small / sizeof small[0] ? small : malloc(sizeof(int32_t) * words);
    if (!last_r) return epx__fail(NULL, EPX_ERR_NO_MEMORY, "out of memory");
    memset(last_r, 0, sizeof(int32_t) * ((size_t)nranks + (size_t)num_experts));
    int32_t *last_e = last_r + nranks, *rank_of = last_e + num_experts, *scratch = rank_of + num_experts;
    int32_t *per_r = per_rank ? per_rank : scratch, *per_e = per_expert ? per_expert : scratch + nranks;
    for (int r = 0, e = 0; r < nranks; r++) /* no division per expert: it was most of a small layout */
        for (int l = 0; l < L; l++) rank_of[e++] = r;
    memset(per_r, 0, sizeof(int32_t) * (size_t)nranks);
    memset(per_e, 0, sizeof(int32_t) * (size_t)num_experts);
    if (in_rank) memset(in_rank, 0, (size_t)num_tokens * (size_t)nranks);
    if (num_tokens > 0 && index_dtype == EPX_I32)
        EPX__LAYOUT_LOOP(int32_t);
    else if (num_tokens > 0)
        EPX__LAYOUT_LOOP(int64_t);
    if (last_r != small) free(last_r);
    return EPX_SUCCESS;
}

void epx__ll_slots_unfilled(int32_t *src_rank, int32_t *src_token, size_t slots, int l, size_t filled)
{
    if (filled >= slots) return;
    size_t at = (size_t)l * slots, bytes = sizeof(int32_t) * (slots - filled);
    if (src_rank) memset(src_rank + at + filled, 0xff, bytes); /* -1 in every int32 */
    if (src_token) memset(src_token + at + filled, 0xff, bytes);
}
