/* epx-info: version, build features and every tunable with its value and default.
 *   epx-info [--moe RANKS TOKENS HIDDEN EXPERTS TOPK [bf16|fp8]]
 * With --moe, also the device memory the CUDA backend allocates per rank for that
 * high-throughput configuration. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "epx.h"

/* Are --moe's arguments well formed (their values are the library's to check)? */
static bool moe_args_ok(char **a, int n)
{
    if (n < 5 || n > 6 || (n == 6 && strcmp(a[5], "fp8") != 0 && strcmp(a[5], "bf16") != 0)) {
        fprintf(stderr, "usage: epx-info --moe RANKS TOKENS HIDDEN EXPERTS TOPK [bf16|fp8]\n");
        return false;
    }
    return true;
}

static int moe_memory(char **a, int n)
{
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    int ranks = atoi(a[0]);
    cfg.max_tokens_per_rank = atoi(a[1]);
    cfg.hidden = atoi(a[2]);
    cfg.num_experts = atoi(a[3]);
    cfg.max_topk = atoi(a[4]);
    if (n == 6 && !strcmp(a[5], "fp8")) cfg.dtype = EPX_FP8_E4M3;
    int64_t bytes;
    epx_status_t st = epx_moe_device_memory(&cfg, ranks, &bytes);
    if (st != EPX_SUCCESS) {
        const char *msg = epx_get_last_error(); /* starts with the status's name */
        fprintf(stderr, "epx-info: %s\n", *msg ? msg : epx_status_name(st));
        return 1;
    }
    printf("\nCUDA device memory per rank (communicator + MoE context + one dispatch handle), %d ranks, T=%d H=%d "
           "E=%d K=%d %s: %lld bytes (%.2f MiB)\n",
           ranks, cfg.max_tokens_per_rank, cfg.hidden, cfg.num_experts, cfg.max_topk,
           cfg.dtype == EPX_FP8_E4M3 ? "fp8" : "bf16", (long long)bytes, (double)bytes / 1048576.0);
    return 0;
}

static int usage(FILE *f, int status)
{
    fprintf(f, "usage: epx-info [--moe RANKS TOKENS HIDDEN EXPERTS TOPK [bf16|fp8]]\n"
               "  The library's version, its backends and every tunable (environment variable) with its\n"
               "  value here and its default; with --moe, also the device memory the CUDA backend\n"
               "  allocates per rank for that high-throughput configuration.\n");
    return status;
}

int main(int argc, char **argv)
{
    if (argc > 1 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) return usage(stdout, 0);
    if (argc > 1 && strcmp(argv[1], "--moe") != 0) {
        fprintf(stderr, "epx-info: unknown argument %s\n", argv[1]);
        return usage(stderr, 2);
    }
    if (argc > 1 && !moe_args_ok(argv + 2, argc - 2)) return 2;
    int v = epx_get_version();
    printf("epx %d.%d.%d (header %d.%d.%d)\n", v / 10000, v / 100 % 100, v % 100, EPX_VERSION_MAJOR,
           EPX_VERSION_MINOR, EPX_VERSION_PATCH);
#ifdef EPX_HAVE_CUDA
    printf("backends: cpu (shared memory), cuda (CUDA IPC over NVLink)\n\n");
#else
    printf("backends: cpu (shared memory); cuda not built (no CUDA toolkit at build time)\n\n");
#endif
    printf("%-26s %-8s %-10s %-10s %s\n", "variable", "type", "value", "default", "description");
    for (int i = 0; i < epx_param_count(); i++) {
        epx_param_info_t p;
        if (epx_param_get(i, &p) != EPX_SUCCESS) return 1;
        printf("%-26s %-8s %-10s %-10s %s\n", p.name, p.type, p.value[0] ? p.value : "\"\"",
               p.default_value[0] ? p.default_value : "\"\"", p.description);
    }
    if (argc > 1 && !strcmp(argv[1], "--moe")) return moe_memory(argv + 2, argc - 2);
    return 0;
}
