/*
 * The chunks of the network step of a MoE call across hosts (src/hier/plan.c,
 * epx__hier_call_chunks), on the CPU: where the forwarding overlaps the network, one per
 * 8 MiB of the rows as they cross (FP8: with their float32 scales; low-latency FP8: the
 * e4m3 row and its float32 or UE8M0 scales, whatever the dtype) of the dispatch's largest batch,
 * wherever it is (the largest T over every rank), at least 1 and at most
 * EPX__HIER_MAX_CHUNKS, whatever max_tokens; 1 where nothing overlaps; EPX_MOE_CHUNKS when set
 * (communicator creation refuses a value outside 0 to 4; this level still clamps).
 *   test_hier_chunks          the rule (EPX_MOE_CHUNKS is dropped from the environment first)
 *   test_hier_chunks --set N  run with EPX_MOE_CHUNKS=N (N > 0): every call gives min(N, max)
 * Also the ranks a token goes to (epx__topk_ranks, src/core/routing.c), against a plain
 * reference: from 1 to 1000 ranks, both of its ways (a bit set up to 64 ranks, insertion
 * above), random ids with repeats and -1 entries.
 */
#include <string.h>

#include "hier/hier.h"
#include "testlib.h"

#define MAXR 8

typedef struct {
    const char *name;
    int H;
    epx_dtype_t dtype;
    bool overlap;
    int R;
    int64_t tokens[MAXR]; /* every rank's T in the dispatch */
    int want;             /* without EPX_MOE_CHUNKS */
    int ll;               /* 0: high-throughput; low-latency: 1 FP8 (float32 scales), 2 FP8 (UE8M0), 3 bf16 */
} ccase_t;

/* BF16 rows at H = 7168 are 14336 B (585 per 8 MiB); FP8 7168 + 56 * 4 = 7392 B (1134). */
static const ccase_t cases[] = {
    {"T = 0 everywhere", 7168, EPX_BF16, true, 4, {0, 0, 0, 0}, 1, 0},
    {"small batch", 7168, EPX_BF16, true, 4, {128, 64, 0, 100}, 1, 0},
    {"full batch T = 4096 (7 by size)", 7168, EPX_BF16, true, 4, {4096, 4096, 4096, 4096}, 4, 0},
    {"largest on rank 1", 7168, EPX_BF16, true, 4, {0, 1024, 3, 7}, 2, 0},
    {"largest on rank 2", 7168, EPX_BF16, true, 4, {10, 20, 1500, 30}, 3, 0},
    {"largest on the last of 8", 7168, EPX_BF16, true, 8, {1, 2, 3, 4, 5, 6, 7, 1800}, 4, 0},
    {"exactly 8 MiB", 4096, EPX_BF16, true, 4, {1024, 0, 512, 0}, 1, 0},
    {"8 MiB and a row", 4096, EPX_BF16, true, 4, {0, 0, 0, 1025}, 2, 0},
    {"fp8 full batch", 7168, EPX_FP8_E4M3, true, 4, {4096, 4096, 4096, 4096}, 4, 0},
    {"fp8 below 8 MiB", 7168, EPX_FP8_E4M3, true, 4, {0, 1134, 0, 0}, 1, 0},
    {"fp8 above 8 MiB with its scales", 7168, EPX_FP8_E4M3, true, 4, {0, 0, 1135, 0}, 2, 0},
    {"one rank", 7168, EPX_BF16, true, 1, {1200}, 3, 0},
    {"no overlap, full batch", 7168, EPX_BF16, false, 4, {4096, 4096, 4096, 4096}, 1, 0},
    {"no overlap, fp8", 7168, EPX_FP8_E4M3, false, 4, {0, 4096, 0, 0}, 1, 0},
    /* Low-latency FP8 of bf16 tokens: 7392 B a row with float32 scales, 7224 with UE8M0. */
    {"ll fp8 below 8 MiB", 7168, EPX_BF16, true, 4, {0, 1134, 0, 0}, 1, 1},
    {"ll fp8 above 8 MiB", 7168, EPX_BF16, true, 4, {1135, 0, 0, 0}, 2, 1},
    {"ll fp8 ue8m0 below 8 MiB", 7168, EPX_BF16, true, 4, {0, 0, 1161, 0}, 1, 2},
    {"ll fp8 ue8m0 above 8 MiB", 7168, EPX_BF16, true, 4, {0, 0, 1162, 0}, 2, 2},
    {"ll fp8 full batch", 7168, EPX_BF16, true, 4, {4096, 4096, 4096, 4096}, 4, 1},
    {"ll bf16 below 8 MiB", 7168, EPX_BF16, true, 4, {585, 0, 0, 0}, 1, 3},
    {"ll bf16 above 8 MiB", 7168, EPX_BF16, true, 4, {586, 0, 0, 0}, 2, 3},
};

static epx__moe_shape_t shape(const ccase_t *c)
{
    epx__moe_shape_t s;
    memset(&s, 0, sizeof s);
    s.nranks = c->R, s.hidden = c->H, s.max_tokens = 4096, s.dtype = c->dtype;
    s.row_bytes = (size_t)c->H * epx_dtype_size(c->dtype);
    s.scale_cols = ((size_t)c->H + 127) / 128;
    s.mode = c->ll ? EPX_MOE_LOW_LATENCY : EPX_MOE_HIGH_THROUGHPUT;
    s.ll_fp8 = c->ll == 1 || c->ll == 2;
    s.scale_format = c->ll == 2 ? EPX_SCALE_UE8M0 : EPX_SCALE_F32;
    return s;
}

/* epx__topk_ranks against marks per rank read back in order; returns the checks made. */
static int check_dest_ranks(void)
{
    static const int nranks[] = {1, 2, 3, 63, 64, 65, 129, 257, 1000};
    static int32_t rank_of[3000];
    unsigned seed = 12345u;
    int checks = 0;
    for (size_t c = 0; c < sizeof nranks / sizeof nranks[0]; c++) {
        int R = nranks[c];
        for (int L = 1; L <= 3; L++) {
            int E = R * L;
            for (int e = 0; e < E; e++) rank_of[e] = e / L;
            for (int iter = 0; iter < 200; iter++) {
                int K = 1 + (int)((seed = seed * 1103515245u + 12345u) >> 16) % EPX_MOE_MAX_TOPK;
                int32_t tk[EPX_MOE_MAX_TOPK];
                for (int k = 0; k < K; k++) {
                    unsigned v = (seed = seed * 1103515245u + 12345u) >> 16;
                    /* about one in eight -1, one in four a repeat of an earlier id */
                    tk[k] = v % 8 == 0 ? -1 : k > 0 && v % 4 == 1 ? tk[(v >> 3) % (unsigned)k] : (int32_t)(v % (unsigned)E);
                }
                char mark[1000] = {0};
                int want[EPX_MOE_MAX_TOPK], nw = 0, got[EPX_MOE_MAX_TOPK];
                for (int k = 0; k < K; k++)
                    if (tk[k] >= 0) mark[rank_of[tk[k]]] = 1;
                for (int r = 0; r < R; r++)
                    if (mark[r]) want[nw++] = r;
                int ng = epx__topk_ranks(tk, K, rank_of, R, got);
                if (ng != nw) TEST_FAIL_("%d ranks, L %d: %d destination ranks, expected %d", R, L, ng, nw);
                for (int i = 0; i < nw; i++)
                    if (got[i] != want[i])
                        TEST_FAIL_("%d ranks, L %d: destination %d is rank %d, expected %d", R, L, i, got[i], want[i]);
                checks++;
            }
        }
    }
    return checks;
}

int main(int argc, char **argv)
{
    test_rank = 0;
    int set = 0;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--set") && i + 1 < argc) set = atoi(argv[++i]);
    if (set > 0) {
        const char *env = getenv("EPX_MOE_CHUNKS");
        if (!env || atoi(env) != set)
            TEST_FAIL_("--set %d wants EPX_MOE_CHUNKS=%d, not %s", set, set, env ? env : "unset");
    } else {
        unsetenv("EPX_MOE_CHUNKS"); /* read on first use: after this */
    }
    int passed = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const ccase_t *c = &cases[i];
        epx__moe_shape_t s = shape(c);
        int want = set > 0 ? (set < EPX__HIER_MAX_CHUNKS ? set : EPX__HIER_MAX_CHUNKS) : c->want;
        int got = epx__hier_call_chunks(&s, c->overlap, c->tokens, c->R);
        if (got != want) TEST_FAIL_("%s: %d chunks, expected %d", c->name, got, want);
        passed++;
    }
    passed += check_dest_ranks();
    test_done(passed);
    return 0;
}
