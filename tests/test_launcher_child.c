/* A rank program for test_launcher.sh: `hello` (prints, then a barrier through epx),
 * `fail1` (rank 1 exits 3, the others would sleep), `kill1` (rank 1 dies by SIGKILL holding a
 * registered region),
 * `sleep` (everyone sleeps). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "epx.h"

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "hello";
    int rank = atoi(getenv("EPX_RANK") ? getenv("EPX_RANK") : "-1");
    if (!strcmp(mode, "hello")) {
        epx_comm_t comm;
        if (epx_comm_init_from_env(&comm, NULL) != EPX_SUCCESS) return 5;
        printf("hello from %d of %s\npartial line without newline", rank, getenv("EPX_NRANKS"));
        fflush(stdout);
        fprintf(stderr, "stderr from %d\n", rank);
        if (epx_barrier(comm, NULL) != EPX_SUCCESS) return 6;
        epx_comm_destroy(comm);
        return 0;
    }
    if (!strcmp(mode, "fail1") && rank == 1) {
        usleep(200000);
        return 3;
    }
    if (!strcmp(mode, "kill1")) {
        /* Rank 1 dies holding a registered region; epx-run must remove its name. */
        epx_comm_t comm;
        void *p;
        if (epx_comm_init_from_env(&comm, NULL) != EPX_SUCCESS || epx_mem_alloc(comm, 4096, &p) != EPX_SUCCESS)
            return 5;
        if (rank == 0) printf("id %s\n", getenv("EPX_UNIQUE_ID"));
        fflush(stdout);
        /* Rank 0 has printed before rank 1 leaves the barrier (slow builds, e.g. TSan,
         * were killed before they printed). */
        if (epx_barrier(comm, NULL) != EPX_SUCCESS) return 6;
        if (rank == 1) raise(SIGKILL);
    }
    sleep(100);
    return 0;
}
