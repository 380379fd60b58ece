/* epx-run: start N local ranks of a program with the epx bootstrap environment.
 *   epx-run -n N [--timeout SEC] [--] prog args...                                    */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch.h"

/* The usage text, to stdout with status 0 when asked for (--help), else to stderr with 2. */
static int usage(int status)
{
    fprintf(status ? stderr : stdout,
            "usage: epx-run -n N [--timeout SEC] [--] program [args...]\n"
            "  Starts N (1-4096; --np N alike) ranks of program on this host with EPX_RANK, EPX_NRANKS,\n"
            "  EPX_LOCAL_RANK and EPX_UNIQUE_ID set (epx_comm_init_from_env reads them), prefixes their\n"
            "  output with \"[rank] \", and stops every rank as soon as one fails or the timeout (seconds,\n"
            "  > 0; default: none) passes.\n"
            "  Exit status: 0 if all ranks exit 0; 124 on timeout; else the failing rank's status.\n");
    return status;
}

/* A whole number in [lo, hi], or a positive number of seconds (hi < 0), from text. */
static bool parse_num(const char *v, double lo, double hi, double *out)
{
    char *end;
    double x = strtod(v, &end);
    if (end == v || *end || x < lo || (hi >= 0 && (x > hi || x != (double)(long)x))) return false;
    *out = x;
    return true;
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
        bool takes = !strcmp(argv[i], "-n") || !strcmp(argv[i], "--np") || !strcmp(argv[i], "--timeout");
        if (takes && i + 1 >= argc) {
            fprintf(stderr, "epx-run: %s needs a value\n", argv[i]);
            return usage(2);
        }
        double x;
        if (!strcmp(argv[i], "-n") || !strcmp(argv[i], "--np")) {
            if (!parse_num(argv[++i], 1, 4096, &x)) {
                fprintf(stderr, "epx-run: -n %s: the rank count must be a whole number in 1-4096\n", argv[i]);
                return usage(2);
            }
            n = (int)x;
        } else if (!strcmp(argv[i], "--timeout")) {
            if (!parse_num(argv[++i], 1e-3, -1, &x)) {
                fprintf(stderr, "epx-run: --timeout %s: seconds, a number > 0\n", argv[i]);
                return usage(2);
            }
            timeout = x;
        } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            return usage(0);
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "epx-run: unknown option %s\n", argv[i]);
            return usage(2);
        } else {
            break;
        }
    }
    if (n < 1) fprintf(stderr, "epx-run: -n N is missing\n");
    else if (i >= argc) fprintf(stderr, "epx-run: no program to run\n");
    if (n < 1 || i >= argc) return usage(2);
    return epx_launch(n, timeout, argv + i);
}
