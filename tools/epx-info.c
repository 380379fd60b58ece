/* epx-info: version, build features and every tunable with its value and default.
 *   epx-info [--moe RANKS TOKENS HIDDEN EXPERTS TOPK [bf16|fp8]]
 * With --moe, also the device memory the CUDA backend allocates per rank for that
 * high-throughput configuration. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "epx.h"

static int moe_memory(char **a, int n)
{
    if (n < 5) {
        fprintf(stderr, "usage: epx-info --moe RANKS TOKENS HIDDEN EXPERTS TOPK [bf16|fp8]\n");
        return 2;
    }
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    int ranks = atoi(a[0]);
    cfg.max_tokens_per_rank = atoi(a[1]);
    cfg.hidden = atoi(a[2]);
    cfg.num_experts = atoi(a[3]);
    cfg.max_topk = atoi(a[4]);
    if (n > 5 && !strcmp(a[5], "fp8")) cfg.dtype = EPX_FP8_E4M3;
    int64_t bytes;
    epx_status_t st = epx_moe_device_memory(&cfg, ranks, &bytes);
    if (st != EPX_SUCCESS) {
        fprintf(stderr, "epx-info: %s: %s\n", epx_status_name(st), epx_get_last_error());
        return 1;
    }
    printf("\nCUDA device memory per rank (communicator + MoE context + one dispatch handle), %d ranks, T=%d H=%d "
           "E=%d K=%d %s: %lld bytes (%.2f MiB)\n",
           ranks, cfg.max_tokens_per_rank, cfg.hidden, cfg.num_experts, cfg.max_topk,
           cfg.dtype == EPX_FP8_E4M3 ? "fp8" : "bf16", (long long)bytes, (double)bytes / 1048576.0);
    return 0;
}

int main(int argc, char **argv)
{
    int v = epx_get_version();
    printf("epx %d.%d.%d (header %d.%d.%d)\n", v / 10000, v / 100 % 100, v % 100, EPX_VERSION_MAJOR,
           EPX_VERSION_MINOR, EPX_VERSION_PATCH);
#ifdef EPX_HAVE_CUDA
    printf("backends: cpu (shared memory), cuda (CUDA IPC over NVLink)\n\n");
#else
    printf("backends: cpu (shared memory); cuda not built (no CUDA toolkit at build time)\n\n");
#endif
    printf("%-22s %-8s %-10s %-10s %s\n", "variable", "type", "value", "default", "description");
    for (int i = 0; i < epx_param_count(); i++) {
        epx_param_info_t p;
        if (epx_param_get(i, &p) != EPX_SUCCESS) return 1;
        printf("%-22s %-8s %-10s %-10s %s\n", p.name, p.type, p.value[0] ? p.value : "\"\"",
               p.default_value[0] ? p.default_value : "\"\"", p.description);
    }
    if (argc > 1 && !strcmp(argv[1], "--moe")) return moe_memory(argv + 2, argc - 2);
    return 0;
}
