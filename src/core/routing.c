/* Routing: validation, conversion and layout of top-k expert indices. */
#include <stdlib.h>
#include <string.h>

#include "core.h"

epx_status_t epx__topk_validate(const void *topk_idx, epx_dtype_t index_dtype, int num_tokens, int topk,
                                int num_experts, epx__errbuf_t *err)
{
    for (int64_t t = 0; t < num_tokens; t++)
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

epx_status_t epx__layout(const void *topk, epx_dtype_t index_dtype, int num_tokens, int topk_k, int num_experts,
                         int nranks, int32_t *per_rank, int32_t *per_expert, uint8_t *in_rank)
{
    int L = num_experts / nranks;
    /* last_r[r] / last_e[e]: 1 + the last token counted there, so duplicates count once. */
    int32_t *last_r = calloc((size_t)nranks + 2 * (size_t)num_experts, sizeof(int32_t));
    if (!last_r) return epx__fail(NULL, EPX_ERR_NO_MEMORY, "out of memory");
    int32_t *last_e = last_r + nranks, *rank_of = last_e + num_experts;
    for (int e = 0; e < num_experts; e++) rank_of[e] = e / L;
    if (per_rank) memset(per_rank, 0, sizeof(int32_t) * (size_t)nranks);
    if (per_expert) memset(per_expert, 0, sizeof(int32_t) * (size_t)num_experts);
    if (in_rank) memset(in_rank, 0, (size_t)num_tokens * (size_t)nranks);
    for (int64_t t = 0; t < num_tokens; t++) {
        for (int k = 0; k < topk_k; k++) {
            int64_t e = epx__topk_at(topk, index_dtype, t, topk_k, k);
            if (e < 0) continue;
            if (last_e[e] != t + 1) {
                last_e[e] = (int32_t)(t + 1);
                if (per_expert) per_expert[e]++;
            }
            int32_t r = rank_of[e];
            if (last_r[r] != t + 1) {
                last_r[r] = (int32_t)(t + 1);
                if (per_rank) per_rank[r]++;
                if (in_rank) in_rank[t * nranks + r] = 1;
            }
        }
    }
    free(last_r);
    return EPX_SUCCESS;
}
