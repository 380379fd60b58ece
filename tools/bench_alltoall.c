/* epx-bench alltoall: epx_alltoall vs MPI_Alltoall on the same bytes, in the same run. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

/* The 32-bit value rank `src` sends to rank `dst` at element `i`. */
static uint32_t pattern(int src, int dst, int64_t i)
{
    uint64_t x = ((uint64_t)(uint32_t)src << 48) ^ ((uint64_t)(uint32_t)dst << 32) ^ (uint64_t)i;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 29;
    return (uint32_t)x;
}

void bench_a2a_fill(uint32_t *send, int me, int nranks, int64_t count)
{
    for (int p = 0; p < nranks; p++)
        for (int64_t i = 0; i < count; i++) send[(int64_t)p * count + i] = pattern(me, p, i);
}

int64_t bench_a2a_verify(const uint32_t *recv, int me, int nranks, int64_t count)
{
    int64_t wrong = 0;
    for (int p = 0; p < nranks; p++)
        for (int64_t i = 0; i < count; i++) wrong += recv[(int64_t)p * count + i] != pattern(p, me, i);
    return wrong;
}

typedef epx_status_t (*a2a_fn)(bench_ctx_t *b, const void *send, void *recv, int64_t count);

static epx_status_t run_epx(bench_ctx_t *b, const void *send, void *recv, int64_t count)
{
    return epx_alltoall(b->comm, send, recv, (size_t)count, EPX_F32, NULL);
}

#ifdef EPX_HAVE_MPI
static epx_status_t run_mpi(bench_ctx_t *b, const void *send, void *recv, int64_t count)
{
    (void)b;
    return MPI_Alltoall(send, (int)count, MPI_FLOAT, recv, (int)count, MPI_FLOAT, MPI_COMM_WORLD) == MPI_SUCCESS
               ? EPX_SUCCESS
               : EPX_ERR_MPI;
}
static void mpi_barrier(bench_ctx_t *b)
{
    (void)b;
    MPI_Barrier(MPI_COMM_WORLD);
}
#endif

/* One contender of a size: how to run it and what it measured. */
typedef struct {
    const char *name;
    a2a_fn fn;
    void (*barrier)(bench_ctx_t *);
    double median_us; /* median over the iterations of the max over the ranks (all ranks) */
    int64_t wrong;
} contender_t;

/* A checked run of contender k on poisoned output: adds its wrong elements. */
static void checked_run(bench_ctx_t *b, contender_t *c, const uint32_t *send, uint32_t *recv, int64_t count)
{
    memset(recv, 0xA5, (size_t)count * (size_t)b->nranks * 4);
    epx_status_t st = c->fn(b, send, recv, count);
    if (st != EPX_SUCCESS) bench_die(b, c->name, st);
    c->wrong += bench_a2a_verify(recv, b->rank, b->nranks, count);
}

/* One size: a checked run of each contender on poisoned output, warm-up, then timed
 * iterations, each after a barrier, alternating between the contenders so that the
 * machine's noise falls on all of them alike; then each contender checked again, so that
 * a call that goes wrong (or does nothing) only after its first is caught too. */
static void measure(bench_ctx_t *b, contender_t *cs, int ncs, const uint32_t *send, uint32_t *recv, int64_t count)
{
    int iters = b->opt.iters;
    double *t = malloc(sizeof(double) * (size_t)(iters * ncs));
    for (int k = 0; k < ncs; k++) {
        cs[k].wrong = 0;
        if (b->opt.check) checked_run(b, &cs[k], send, recv, count);
        for (int i = 0; i < b->opt.warmup; i++) {
            epx_status_t st = cs[k].fn(b, send, recv, count);
            if (st != EPX_SUCCESS) bench_die(b, cs[k].name, st);
        }
    }
    for (int i = 0; i < iters; i++)
        for (int k = 0; k < ncs; k++) {
            cs[k].barrier(b);
            double t0 = bench_now_us();
            epx_status_t st = cs[k].fn(b, send, recv, count);
            t[k * iters + i] = bench_now_us() - t0;
            if (st != EPX_SUCCESS) bench_die(b, cs[k].name, st);
        }
    /* Each iteration's time is its slowest rank's; the median of those (max of the ranks'
     * medians, as before, is never larger and can be much smaller when the ranks' slow
     * iterations differ). */
    for (int k = 0; k < ncs; k++) cs[k].median_us = bench_median_of_max(b, t + k * iters, iters);
    free(t);
    for (int k = 0; k < ncs && b->opt.check; k++) checked_run(b, &cs[k], send, recv, count);
}

/* Median time of one memcpy of `bytes` on rank 0 while the others wait (the floor a
 * single-copy exchange is compared with). Returns it on every rank. */
static double measure_memcpy(bench_ctx_t *b, void *dst, const void *src, size_t bytes)
{
    double med = 0;
    bench_barrier(b);
    if (b->rank == 0) {
        double *t = malloc(sizeof(double) * (size_t)b->opt.iters);
        for (int i = 0; i < b->opt.warmup + b->opt.iters; i++) {
            double t0 = bench_now_us();
            memcpy(dst, src, bytes);
            if (i >= b->opt.warmup) t[i - b->opt.warmup] = bench_now_us() - t0;
        }
        med = bench_median(t, b->opt.iters);
        free(t);
    }
    return bench_max(b, med);
}

int bench_alltoall(bench_ctx_t *b)
{
    const bench_opts_t *o = &b->opt;
    int R = b->nranks;
    int64_t max_count = o->max_bytes / (4 * R);
    if (max_count < 1) max_count = 1;
    size_t max_bytes = (size_t)max_count * (size_t)R * 4;
    uint32_t *send = NULL, *recv = malloc(max_bytes);
    epx_status_t st = EPX_SUCCESS;
    if (o->unregistered)
        send = malloc(max_bytes);
    else
        st = epx_mem_alloc(b->comm, max_bytes, (void **)&send);
    if (st != EPX_SUCCESS || !send || !recv) bench_die(b, "buffer allocation", st ? st : EPX_ERR_NO_MEMORY);

    FILE *json = NULL;
    if (b->rank == 0) {
        printf("# epx-bench alltoall: backend %s, %d ranks, f32, %d iterations (median of the max over ranks), %d warm-up, "
               "%s send buffers, baseline %s\n",
               o->backend, R, o->iters, o->warmup, o->unregistered ? "malloc" : "registered",
               b->mpi ? "MPI_Alltoall" : "none");
        printf("# %12s %10s %10s %10s %7s %10s", "bytes", "time_us", "algbw_GB/s", "busbw_GB/s", "#wrong",
               "memcpy_us");
        if (b->mpi) printf(" | %10s %7s %8s", "mpi_us", "#wrong", "speedup");
        printf("\n");
        if (o->json && !(json = fopen(o->json, "w"))) perror(o->json);
        if (json) fprintf(json, "[");
    }
    int64_t *counts;
    int nsizes = bench_a2a_counts(o, R, &counts);
    int idx = 0, any_wrong = 0;
    double sweep_start = bench_now_us();
    for (; idx < nsizes; idx++) {
        int64_t count = counts[idx];
        int64_t bytes = count * 4 * R;
        bench_a2a_fill(send, b->rank, R, count);
        contender_t cs[2] = {{"epx_alltoall", run_epx, bench_barrier, 0, 0}};
        int ncs = 1;
#ifdef EPX_HAVE_MPI
        if (b->mpi) cs[ncs++] = (contender_t){"MPI_Alltoall", run_mpi, mpi_barrier, 0, 0};
#endif
        measure(b, cs, ncs, send, recv, count);
        double t = cs[0].median_us;
        double wrong_all = bench_sum(b, (double)cs[0].wrong);
        double mt = 0, mwrong_all = 0;
        if (ncs > 1) {
            mt = cs[1].median_us;
            mwrong_all = bench_sum(b, (double)cs[1].wrong);
        }
        double mc = measure_memcpy(b, recv, send, (size_t)bytes);
        any_wrong |= wrong_all > 0 || mwrong_all > 0;
        if (b->rank == 0) {
            double algbw = t > 0 ? (double)bytes / t / 1e3 : 0;
            double busbw = algbw * (R - 1) / R;
            printf("  %12" PRId64 " %10.2f %10.3f %10.3f %7.0f %10.2f", bytes, t, algbw, busbw, wrong_all, mc);
            if (b->mpi) printf(" | %10.2f %7.0f %7.2fx", mt, mwrong_all, t > 0 ? mt / t : 0);
            printf("\n");
            fflush(stdout);
            if (json)
                fprintf(json,
                        "%s\n  {\"op\": \"alltoall\", \"backend\": \"%s\", \"ranks\": %d, \"bytes\": %" PRId64
                        ", \"time_us\": %.3f, \"algbw_gbs\": %.4f, \"busbw_gbs\": %.4f, \"wrong\": %.0f, "
                        "\"baseline\": \"%s\", \"baseline_time_us\": %.3f, \"baseline_wrong\": %.0f, \"memcpy_time_us\": %.3f}",
                        idx ? "," : "", o->backend, R, bytes, t, algbw, busbw, wrong_all,
                        b->mpi ? "MPI_Alltoall" : "none", b->mpi ? mt : 0.0, mwrong_all, mc);
            if (nsizes > 4)
                fprintf(stderr, "# progress: %d/%d sizes, %.1f s\n", idx + 1, nsizes,
                        (bench_now_us() - sweep_start) / 1e6);
        }
    }
    if (json) {
        fprintf(json, "\n]\n");
        fclose(json);
    }
    free(counts);
    if (b->rank == 0 && any_wrong) printf("# FAILED: wrong values found\n");
    if (o->unregistered)
        free(send);
    else
        epx_mem_free(b->comm, send);
    free(recv);
    return any_wrong ? 1 : 0;
}
