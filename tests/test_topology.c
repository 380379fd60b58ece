/*
 * Topology: with EPX_LOCAL_SIZE unset every rank of this machine is on one host; with
 * EPX_LOCAL_SIZE=S ranks are grouped in blocks of S consecutive ranks (simulated hosts).
 * Run through epx-run (or mpirun with --mpi); the expected local size comes as the one
 * argument that is not a flag (0 = one host).
 */
#include <stdlib.h>

#include "testlib.h"

int main(int argc, char **argv)
{
    test_init(argc, argv);
    int me, R, S = 0;
    for (int i = 1; i < argc; i++)
        if (argv[i][0] != '-') S = atoi(argv[i]);
    epx_comm_t comm = test_comm_from_env(&me, &R);
    epx_comm_info_t info;
    ASSERT_OK(epx_comm_info(comm, &info));
    ASSERT_EQ(info.rank, me);
    ASSERT_EQ(info.nranks, R);
    if (S <= 0) {
        ASSERT_EQ(info.num_hosts, 1);
        ASSERT_EQ(info.host, 0);
        ASSERT_EQ(info.local_rank, me);
        ASSERT_EQ(info.local_size, R);
    } else {
        ASSERT_EQ(info.num_hosts, (R + S - 1) / S);
        ASSERT_EQ(info.host, me / S);
        ASSERT_EQ(info.local_rank, me % S);
        ASSERT_EQ(info.local_size, me / S == R / S ? R % S : S);
    }
    ASSERT_EQ(info.backend, EPX_BACKEND_CPU);
    ASSERT_OK(epx_barrier(comm, NULL));
    test_finish(comm, 1);
    return 0;
}
