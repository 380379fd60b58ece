/*
 * epx-bench internals: options, the per-rank context and shared helpers (timing, max over
 * ranks, JSON output). One file per benchmark (bench_alltoall.c, bench_moe.c).
 */
#ifndef EPX_BENCH_H
#define EPX_BENCH_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "epx.h"

#ifdef EPX_HAVE_MPI
#include <mpi.h>

#include "epx_mpi.h"
#endif

/* C linkage also when included from CUDA C (bench_cuda_moe.cu, compiled as C++ by nvcc). */
#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *op; /* "alltoall", "moe" */
    int ranks;
    const char *backend;
    int64_t min_bytes, max_bytes;
    double factor;
    int iters, warmup;
    int check;
    const char *json;
    const char *baseline; /* auto, mpi, none */
    const char *init;     /* id, mpi: how the communicator is made */
    bool unregistered;
    bool pool; /* CUDA moe: epx's device buffers from the stream-ordered pool (cudaMallocAsync) */
    double timeout_s;
    /* moe */
    int tokens, hidden, topk, experts;
    int dtype;         /* the dispatch's tokens: EPX_BF16, EPX_F16, EPX_F32 or EPX_FP8_E4M3 (fp8) */
    int combine_dtype; /* the combine's y and out: EPX_BF16, EPX_F16, EPX_F32, or EPX_UNSET (epx's default) */
    const char *mode;  /* ht, ll */
    double skew;       /* Zipf exponent over experts; 0 = uniform */
    const char *count; /* CUDA ht dispatch: "device" (no host sync) or "host" (count read back) */
} bench_opts_t;

typedef struct {
    bench_opts_t opt;
    epx_comm_t comm;
    int rank, nranks;
    bool mpi; /* MPI is initialised: baselines run */
} bench_ctx_t;

/* Monotonic time in microseconds. */
double bench_now_us(void);
/* Median of v[0..n) (reorders v). */
double bench_median(double *v, int n);
/* Max / sum of `v` over all ranks (collective). */
double bench_max(bench_ctx_t *b, double v);
double bench_sum(bench_ctx_t *b, double v);
/* Median over the iterations of the max over the ranks of t[0..n) (collective; every rank
 * gives its n per-iteration times, in iteration order): the time the collective took. */
double bench_median_of_max(bench_ctx_t *b, const double *t, int n);
/* The element counts per peer of an alltoall sweep from min_bytes to max_bytes (bytes sent
 * per rank) by `factor`: each size rounded down to a multiple of 4 * nranks, duplicates
 * dropped, a size of 0 followed by the smallest non-zero one. Returns how many (malloc'd
 * in *counts). */
int bench_a2a_counts(const bench_opts_t *o, int nranks, int64_t **counts);
/* The options' name of a dtype: epx_dtype_name's, "fp8" for EPX_FP8_E4M3. */
const char *bench_dtype_name(int dtype);
/* Barrier through epx (collective). */
void bench_barrier(bench_ctx_t *b);
/* What to print for a failed status: msg (epx's last-error text, which starts with the
 * status's name) when it is set, else the status's name. */
const char *bench_status_text(epx_status_t st, const char *msg);
/* Abort the whole run with a message (all ranks die; the launcher reports it). */
void bench_die(bench_ctx_t *b, const char *what, epx_status_t st);

int bench_alltoall(bench_ctx_t *b);
/* The CUDA backend's alltoall against ncclAlltoAll (bench_cuda.c). */
int bench_cuda_alltoall(bench_ctx_t *b);
/* alltoall data: element i that rank `me` sends each peer, and a count of the received
 * elements that differ from what the peers sent. */
void bench_a2a_fill(uint32_t *send, int me, int nranks, int64_t count);
int64_t bench_a2a_verify(const uint32_t *recv, int me, int nranks, int64_t count);
int bench_moe(bench_ctx_t *b);
/* Can `ranks` ranks run the MoE benchmark with these experts and top-k? If not, says why
 * on stderr (when `say`). */
bool bench_moe_shape_ok(int experts, int ranks, int topk, bool say);
/* The CUDA backend's high-throughput MoE (layout, dispatch, combine) against the same
 * routing done with NCCL send/recv (bench_cuda_moe.cu; built only with CUDA). */
int bench_cuda_moe(bench_ctx_t *b);

#ifdef __cplusplus
}
#endif

#endif
