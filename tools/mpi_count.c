/*
 * mpi_count.c: an MPI profiling (PMPI) shim that counts the bytes epx's scale-out path
 * hands to MPI, by message step and destination, so that docs/SCALING.md can compare the
 * model's byte counts with what the code sends (tools/scaling_model.py check). Not part of
 * the library or its build.
 *
 *   mpicc -shared -fPIC -O2 -o build/epx_mpicount.so tools/mpi_count.c
 *   mpiexec -n 4 -x LD_PRELOAD=$PWD/build/epx_mpicount.so -x EPX_LOCAL_SIZE=2 \
 *       ./build/bin/epx-bench moe --ranks 4 --init mpi --baseline none ...
 *
 * src/net sends every point-to-point piece with MPI_Isend and a tag made by
 * epx__hier_tag(seq, step) (src/hier/internal.h): the low 6 bits are the step of the
 * operation, the next 6 the operation's sequence number modulo 64. Steps:
 *   MoE (src/hier/moe.c)          1 tokens: routing records with their rows (dispatch),
 *                                 2 rows of a cached dispatch, 3 home: combine rows sent home;
 *   alltoall(v) (src/hier/hier.c) 0 cards (byte counts and verdict, to every other rank),
 *                                 1 data (to the ranks of other hosts).
 * Step 1 is shared: its sends belong to an alltoall(v) when the operation that made them
 * (the sends since the sequence number last changed) also sent cards, to a MoE dispatch
 * otherwise; the bench's barriers and result gathers are alltoall(v)s.
 * MPI_Ialltoall carries the verdicts (one per MoE operation); MPI_Iallreduce the agreement
 * at MoE creation and the capacity round of every high-throughput dispatch.
 *
 * At MPI_Finalize each rank prints, on stderr, one line per step: the bytes sent, the
 * operations that sent in that step (a change of the sequence number between two sends of
 * the step starts one) and the MPI messages (src/net splits large segments); then, for the
 * MoE steps, one line per destination rank (of MPI_COMM_WORLD) that was sent anything. The
 * collectives count the bytes this rank hands them: an allreduce its vector, an alltoall its
 * whole send buffer (its own block included).
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

enum { CARDS, A2A, TOKENS, ROWS, HOME, NSTEP };
static const char *const step_name[NSTEP] = {"cards", "a2a", "tokens", "rows", "home"};
static int64_t bytes[NSTEP], ops[NSTEP], msgs[NSTEP], other_bytes, allreduce_bytes, allreduce_calls, alltoall_bytes,
    alltoall_calls;
static int last_seq[NSTEP] = {-1, -1, -1, -1, -1};
static int cur_seq = -1, cur_a2a;       /* the operation of the last send, and whether it sent cards */
static int64_t *dest_bytes, *dest_msgs; /* [NSTEP][world size] */
static int world = 0;

static int world_rank_of(int dest, MPI_Comm comm)
{
    MPI_Group g, w;
    int out = MPI_UNDEFINED;
    if (comm == MPI_COMM_WORLD) return dest;
    PMPI_Comm_group(comm, &g);
    PMPI_Comm_group(MPI_COMM_WORLD, &w);
    PMPI_Group_translate_ranks(g, 1, &dest, w, &out);
    PMPI_Group_free(&g);
    PMPI_Group_free(&w);
    return out;
}

int MPI_Isend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm, MPI_Request *req)
{
    int size = 0;
    PMPI_Type_size(dt, &size);
    int64_t b = (int64_t)count * size;
    int step = tag >= 0 ? tag & 63 : -1, seq = tag >= 0 ? (tag >> 6) & 63 : -1, k = -1;
    if (step >= 0 && step <= 3) {
        if (seq != cur_seq) cur_seq = seq, cur_a2a = 0;
        if (step == 0) cur_a2a = 1;
        k = step == 0 ? CARDS : step == 1 ? (cur_a2a ? A2A : TOKENS) : step == 2 ? ROWS : HOME;
    }
    if (k < 0) {
        other_bytes += b;
    } else {
        if (seq != last_seq[k]) ops[k]++, last_seq[k] = seq;
        bytes[k] += b;
        msgs[k]++;
        if (!world) {
            PMPI_Comm_size(MPI_COMM_WORLD, &world);
            dest_bytes = calloc((size_t)NSTEP * (size_t)world, sizeof *dest_bytes);
            dest_msgs = calloc((size_t)NSTEP * (size_t)world, sizeof *dest_msgs);
        }
        int d = world_rank_of(dest, comm);
        if (dest_bytes && dest_msgs && d >= 0 && d < world) {
            dest_bytes[k * world + d] += b;
            dest_msgs[k * world + d]++;
        }
    }
    return PMPI_Isend(buf, count, dt, dest, tag, comm, req);
}

int MPI_Iallreduce(const void *sbuf, void *rbuf, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm, MPI_Request *req)
{
    int size = 0;
    PMPI_Type_size(dt, &size);
    allreduce_bytes += (int64_t)count * size;
    allreduce_calls++;
    return PMPI_Iallreduce(sbuf, rbuf, count, dt, op, comm, req);
}

int MPI_Ialltoall(const void *sbuf, int scount, MPI_Datatype sdt, void *rbuf, int rcount, MPI_Datatype rdt,
                  MPI_Comm comm, MPI_Request *req)
{
    int size = 0, n = 0;
    PMPI_Type_size(sdt, &size);
    PMPI_Comm_size(comm, &n);
    alltoall_bytes += (int64_t)scount * size * n;
    alltoall_calls++;
    return PMPI_Ialltoall(sbuf, scount, sdt, rbuf, rcount, rdt, comm, req);
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
    fprintf(stderr, "mpicount rank=%d step=alltoall bytes=%lld ops=%lld msgs=0\n", rank, (long long)alltoall_bytes,
            (long long)alltoall_calls);
    for (int k = TOKENS; k <= HOME && dest_bytes && dest_msgs; k++)
        for (int d = 0; d < world; d++)
            if (dest_msgs[k * world + d])
                fprintf(stderr, "mpicount rank=%d step=%s dest=%d bytes=%lld msgs=%lld\n", rank, step_name[k], d,
                        (long long)dest_bytes[k * world + d], (long long)dest_msgs[k * world + d]);
    fflush(stderr);
    free(dest_bytes), free(dest_msgs);
    return PMPI_Finalize();
}
