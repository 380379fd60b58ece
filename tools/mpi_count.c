/*
 * mpi_count.c: an MPI profiling (PMPI) shim that counts the bytes epx's scale-out path
 * hands to MPI, by message step, so that docs/SCALING.md can compare the model's byte
 * counts with what the code sends. Not part of the library or its build.
 *
 *   mpicc -shared -fPIC -O2 -o build/epx_mpicount.so tools/mpi_count.c
 *   mpiexec -n 4 -x LD_PRELOAD=$PWD/build/epx_mpicount.so -x EPX_LOCAL_SIZE=2 \
 *       ./build/bin/epx-bench moe --ranks 4 --init mpi --baseline none ...
 *
 * src/net sends every point-to-point piece with MPI_Isend and a tag made by
 * epx__hier_tag(seq, step) (src/hier/internal.h): the low 6 bits are the step of the
 * operation (0 counts: no longer sent, 1 tokens: routing records with their rows, 2 rows
 * of a cached dispatch, 3 home: combine rows sent home),
 * the next 6 the operation's sequence number modulo 64. At MPI_Finalize each rank prints,
 * on stderr, one line per step: the bytes sent, and the number of operations that sent in
 * that step (a change of the sequence number between two sends of the step starts one).
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>

enum { NSTEP = 4 }; /* counts, tokens, rows, home */
static const char *const step_name[NSTEP] = {"counts", "tokens", "rows", "home"};
static int64_t bytes[NSTEP], ops[NSTEP], msgs[NSTEP], other_bytes, allreduce_bytes, allreduce_calls;
static int last_seq[NSTEP] = {-1, -1, -1, -1};

static int bucket(int step)
{
    return step < NSTEP ? step : -1;
}

int MPI_Isend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm, MPI_Request *req)
{
    int size = 0;
    PMPI_Type_size(dt, &size);
    int64_t b = (int64_t)count * size;
    int k = tag >= 0 ? bucket(tag & 63) : -1;
    if (k < 0) {
        other_bytes += b;
    } else {
        int seq = (tag >> 6) & 63;
        if (seq != last_seq[k]) ops[k]++, last_seq[k] = seq;
        bytes[k] += b;
        msgs[k]++;
    }
    return PMPI_Isend(buf, count, dt, dest, tag, comm, req);
}

int MPI_Iallreduce(const void *sbuf, void *rbuf, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm,
                   MPI_Request *req)
{
    int size = 0;
    PMPI_Type_size(dt, &size);
    allreduce_bytes += (int64_t)count * size;
    allreduce_calls++;
    return PMPI_Iallreduce(sbuf, rbuf, count, dt, op, comm, req);
}

int MPI_Finalize(void)
{
    int rank = -1;
    PMPI_Comm_rank(MPI_COMM_WORLD, &rank);
    for (int k = 0; k < NSTEP; k++)
        fprintf(stderr, "mpicount rank=%d step=%s bytes=%lld ops=%lld msgs=%lld\n", rank, step_name[k],
                (long long)bytes[k], (long long)ops[k], (long long)msgs[k]);
    fprintf(stderr, "mpicount rank=%d step=other bytes=%lld ops=0 msgs=0\n", rank, (long long)other_bytes);
    fprintf(stderr, "mpicount rank=%d step=allreduce bytes=%lld ops=%lld msgs=0\n", rank, (long long)allreduce_bytes,
            (long long)allreduce_calls);
    fflush(stderr);
    return PMPI_Finalize();
}
