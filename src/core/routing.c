/* Routing: validation, conversion and layout of top-k expert indices. */
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
    if (index_dtype == EPX_I32) {
        memcpy(out, topk_idx, sizeof(int32_t) * (size_t)num_tokens * (size_t)topk);
        return;
    }
    for (int64_t i = 0; i < (int64_t)num_tokens * topk; i++) out[i] = (int32_t)((const int64_t *)topk_idx)[i];
}

void epx__layout_i32(const int32_t *topk, int num_tokens, int topk_k, int num_experts, int nranks,
                     int32_t *per_rank, int32_t *per_expert, uint8_t *in_rank)
{
    int L = num_experts / nranks;
    if (per_rank) memset(per_rank, 0, sizeof(int32_t) * (size_t)nranks);
    if (per_expert) memset(per_expert, 0, sizeof(int32_t) * (size_t)num_experts);
    for (int64_t t = 0; t < num_tokens; t++) {
        const int32_t *row = topk + t * topk_k;
        uint8_t *mask = in_rank ? in_rank + t * nranks : NULL;
        if (mask) memset(mask, 0, (size_t)nranks);
        for (int k = 0; k < topk_k; k++) {
            int32_t e = row[k];
            if (e < 0) continue;
            bool first_e = true, first_r = true;
            for (int j = 0; j < k; j++) {
                if (row[j] == e) first_e = false;
                if (row[j] >= 0 && row[j] / L == e / L) first_r = false;
            }
            if (first_e && per_expert) per_expert[e]++;
            if (first_r) {
                if (per_rank) per_rank[e / L]++;
                if (mask) mask[e / L] = 1;
            }
        }
    }
}
