/* epx-run: start N local ranks of a program with the epx bootstrap environment.
 *   epx-run -n N [--timeout SEC] [--] prog args...                                    */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch.h"

static int usage(void)
{
    fprintf(stderr,
            "usage: epx-run -n N [--timeout SEC] [--] program [args...]\n"
            "  Starts N ranks of program on this host with EPX_RANK, EPX_NRANKS, EPX_LOCAL_RANK and\n"
            "  EPX_UNIQUE_ID set (epx_comm_init_from_env reads them), prefixes their output with\n"
            "  \"[rank] \", and stops every rank as soon as one fails or the timeout passes.\n"
            "  Exit status: 0 if all ranks exit 0; 124 on timeout; else the failing rank's status.\n");
    return 2;
}

int main(int argc, char **argv)
{
    int n = 0;
    double timeout = 0;
    int i = 1;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        if ((!strcmp(argv[i], "-n") || !strcmp(argv[i], "--np")) && i + 1 < argc) {
            n = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--timeout") && i + 1 < argc) {
            timeout = atof(argv[++i]);
        } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            return usage();
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "epx-run: unknown option %s\n", argv[i]);
            return usage();
        } else {
            break;
        }
    }
    if (n < 1 || n > 4096 || i >= argc) return usage();
    return epx_launch(n, timeout, argv + i);
}
