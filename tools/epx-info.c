/* epx-info: version, build features and every tunable with its value and default. */
#include <stdio.h>
#include <string.h>

#include "epx.h"

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
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
    return 0;
}
