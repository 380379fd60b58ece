/*
 * epx-bench alltoall --backend cuda: epx_alltoall on the CUDA backend against
 * ncclAlltoAll on the same device buffers, in the same processes, iterations alternating.
 * Each rank drives the GPU (local rank) % (number of GPUs). Times come from CUDA events
 * around the call on the caller's stream, after a device-side barrier and with L2 flushed
 * (a 512 MiB memset) before every timed iteration; median over the iterations of the max over
 * the ranks.
 * graph_us: the same epx call captured once in a CUDA graph and replayed (no host work);
 * burst_us: 20 calls back to back between one pair of events, per call (as nccl-tests).
 * With -c 1 every contender's output is checked on poisoned buffers before the warm-up and
 * again after the timed calls (epx's graph replay too).
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

#ifndef EPX_HAVE_CUDA
int bench_cuda_alltoall(bench_ctx_t *b)
{
    (void)b;
    fprintf(stderr, "epx-bench: this build has no CUDA backend\n");
    return 2;
}
#else
#include <cuda_runtime_api.h>
#ifdef EPX_HAVE_NCCL
#include <nccl.h>
#endif

#define CUDA_CHECK(b, x)                                                                         \
    do {                                                                                         \
        cudaError_t e_ = (x);                                                                    \
        if (e_ != cudaSuccess) {                                                                 \
            fprintf(stderr, "epx-bench: rank %d: %s: %s\n", (b)->rank, #x, cudaGetErrorString(e_)); \
            exit(3);                                                                             \
        }                                                                                        \
    } while (0)

typedef struct {
    bench_ctx_t *b;
    epx_comm_t gpu; /* the CUDA communicator */
    cudaStream_t stream;
    cudaEvent_t start, stop;
    void *flush;
    size_t flush_bytes;
#ifdef EPX_HAVE_NCCL
    ncclComm_t nccl;
#endif
} gpu_ctx_t;

/* Rank 0's `bytes` to every rank, through the host communicator. */
static void host_bcast(bench_ctx_t *b, void *buf, size_t bytes)
{
    char *send = malloc(bytes * (size_t)b->nranks), *recv = malloc(bytes * (size_t)b->nranks);
    for (int p = 0; p < b->nranks; p++) memcpy(send + (size_t)p * bytes, buf, bytes);
    epx_status_t st = epx_alltoall(b->comm, send, recv, bytes, EPX_U8, NULL);
    if (st != EPX_SUCCESS) bench_die(b, "host broadcast", st);
    memcpy(buf, recv, bytes); /* what rank 0 sent me */
    free(send), free(recv);
}

typedef int (*gpu_op_t)(gpu_ctx_t *g, const void *send, void *recv, size_t count);

static int op_epx(gpu_ctx_t *g, const void *send, void *recv, size_t count)
{
    epx_status_t st = epx_alltoall(g->gpu, send, recv, count, EPX_F32, g->stream);
    if (st != EPX_SUCCESS) bench_die(g->b, "epx_alltoall (cuda)", st);
    return 0;
}

/* epx's call captured once in a CUDA graph; replays need no host work. */
static cudaGraphExec_t epx_graph;

static int op_epx_graph(gpu_ctx_t *g, const void *send, void *recv, size_t count)
{
    (void)send, (void)recv, (void)count;
    CUDA_CHECK(g->b, cudaGraphLaunch(epx_graph, g->stream));
    return 0;
}

static void capture_epx(gpu_ctx_t *g, const void *send, void *recv, size_t count)
{
    cudaGraph_t graph;
    CUDA_CHECK(g->b, cudaStreamBeginCapture(g->stream, cudaStreamCaptureModeRelaxed));
    op_epx(g, send, recv, count);
    CUDA_CHECK(g->b, cudaStreamEndCapture(g->stream, &graph));
    CUDA_CHECK(g->b, cudaGraphInstantiate(&epx_graph, graph, 0));
    CUDA_CHECK(g->b, cudaGraphDestroy(graph));
}

#ifdef EPX_HAVE_NCCL
static int op_nccl(gpu_ctx_t *g, const void *send, void *recv, size_t count)
{
    ncclResult_t r = ncclAlltoAll(send, recv, count, ncclFloat, g->nccl, g->stream);
    if (r != ncclSuccess) {
        fprintf(stderr, "epx-bench: ncclAlltoAll: %s\n", ncclGetErrorString(r));
        exit(3);
    }
    return 0;
}
#endif

/* One timed run of `op`: L2 flush, device barrier, events around the call. */
static float time_once(gpu_ctx_t *g, gpu_op_t op, const void *send, void *recv, size_t count)
{
    /* Flush L2 first, then line the ranks' streams up, so that one rank's flush time is
     * not counted as the other's wait. */
    CUDA_CHECK(g->b, cudaMemsetAsync(g->flush, 0x5a, g->flush_bytes, g->stream));
    epx_status_t st = epx_barrier(g->gpu, g->stream);
    if (st != EPX_SUCCESS) bench_die(g->b, "epx_barrier (cuda)", st);
    CUDA_CHECK(g->b, cudaEventRecord(g->start, g->stream));
    op(g, send, recv, count);
    CUDA_CHECK(g->b, cudaEventRecord(g->stop, g->stream));
    CUDA_CHECK(g->b, cudaEventSynchronize(g->stop));
    float ms = 0;
    CUDA_CHECK(g->b, cudaEventElapsedTime(&ms, g->start, g->stop));
    return ms * 1000.0f;
}

/* Back-to-back: `n` calls between one pair of events (after the flush and the barrier),
 * so that launches overlap execution as in nccl-tests; returns the time per call. */
static float time_burst(gpu_ctx_t *g, gpu_op_t op, const void *send, void *recv, size_t count, int n)
{
    CUDA_CHECK(g->b, cudaMemsetAsync(g->flush, 0x5a, g->flush_bytes, g->stream));
    epx_status_t st = epx_barrier(g->gpu, g->stream);
    if (st != EPX_SUCCESS) bench_die(g->b, "epx_barrier (cuda)", st);
    CUDA_CHECK(g->b, cudaEventRecord(g->start, g->stream));
    for (int i = 0; i < n; i++) op(g, send, recv, count);
    CUDA_CHECK(g->b, cudaEventRecord(g->stop, g->stream));
    CUDA_CHECK(g->b, cudaEventSynchronize(g->stop));
    float ms = 0;
    CUDA_CHECK(g->b, cudaEventElapsedTime(&ms, g->start, g->stop));
    return ms * 1000.0f / (float)n;
}

static int64_t checked_run(gpu_ctx_t *g, gpu_op_t op, const void *send, void *recv, uint32_t *host, size_t count)
{
    size_t bytes = count * (size_t)g->b->nranks * 4;
    CUDA_CHECK(g->b, cudaMemsetAsync(recv, 0xA5, bytes, g->stream));
    op(g, send, recv, count);
    CUDA_CHECK(g->b, cudaStreamSynchronize(g->stream));
    CUDA_CHECK(g->b, cudaMemcpy(host, recv, bytes, cudaMemcpyDeviceToHost));
    return bench_a2a_verify(host, g->b->rank, g->b->nranks, (int64_t)count);
}

int bench_cuda_alltoall(bench_ctx_t *b)
{
    const bench_opts_t *o = &b->opt;
    int R = b->nranks, ndev = 0;
    gpu_ctx_t g;
    memset(&g, 0, sizeof g);
    g.b = b;
    CUDA_CHECK(b, cudaGetDeviceCount(&ndev));
    const char *lr = getenv("EPX_LOCAL_RANK");
    int dev = (lr ? atoi(lr) : b->rank) % ndev;
    CUDA_CHECK(b, cudaSetDevice(dev));
    epx_unique_id_t id;
    if (b->rank == 0 && epx_get_unique_id(&id) != EPX_SUCCESS) bench_die(b, "epx_get_unique_id", EPX_ERR_SYSTEM);
    host_bcast(b, &id, sizeof id);
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.backend = EPX_BACKEND_CUDA;
    cfg.device = dev;
    epx_status_t st = epx_comm_init_rank(&g.gpu, R, b->rank, &id, &cfg);
    if (st != EPX_SUCCESS) bench_die(b, "CUDA communicator creation", st);
    bool nccl = false;
#ifdef EPX_HAVE_NCCL
    nccl = strcmp(o->baseline, "none") != 0;
    if (nccl) {
        ncclUniqueId nid;
        if (b->rank == 0) ncclGetUniqueId(&nid);
        host_bcast(b, &nid, sizeof nid);
        if (ncclCommInitRank(&g.nccl, R, nid, b->rank) != ncclSuccess) {
            fprintf(stderr, "epx-bench: ncclCommInitRank failed\n");
            return 3;
        }
    }
#endif
    CUDA_CHECK(b, cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking));
    CUDA_CHECK(b, cudaEventCreate(&g.start));
    CUDA_CHECK(b, cudaEventCreate(&g.stop));
    g.flush_bytes = (size_t)512 << 20;
    CUDA_CHECK(b, cudaMalloc(&g.flush, g.flush_bytes));

    int64_t max_count = o->max_bytes / (4 * R) > 1 ? o->max_bytes / (4 * R) : 1;
    size_t max_bytes = (size_t)max_count * (size_t)R * 4;
    void *send = NULL, *recv = NULL;
    if (epx_mem_alloc(g.gpu, max_bytes, &send) != EPX_SUCCESS || epx_mem_alloc(g.gpu, max_bytes, &recv) != EPX_SUCCESS)
        bench_die(b, "device buffers", EPX_ERR_NO_MEMORY);
    uint32_t *host = malloc(max_bytes);

    if (b->rank == 0) {
        printf("# epx-bench alltoall: backend cuda, %d ranks on %d GPU(s), f32, %d iterations (CUDA events, median of the "
               "max over ranks), %d warm-up, L2 flushed; baseline %s\n",
               R, ndev, o->iters, o->warmup, nccl ? "ncclAlltoAll" : "none");
        printf("# %12s %10s %10s %10s %7s %9s %9s", "bytes", "time_us", "algbw_GB/s", "busbw_GB/s", "#wrong", "graph_us",
               "burst_us");
        if (nccl) printf(" | %10s %7s %8s %9s", "nccl_us", "#wrong", "speedup", "burst_us");
        printf("\n");
    }
    FILE *json = NULL;
    if (b->rank == 0 && o->json && !(json = fopen(o->json, "w"))) perror(o->json);
    if (json) fprintf(json, "[");
    int any_wrong = 0, idx = 0;
    int64_t *counts;
    int nsizes = bench_a2a_counts(o, R, &counts);
    for (; idx < nsizes; idx++) {
        size_t count = (size_t)counts[idx];
        int64_t bytes = (int64_t)count * 4 * R;
        bench_a2a_fill(host, b->rank, R, (int64_t)count);
        CUDA_CHECK(b, cudaMemcpyAsync(send, host, (size_t)bytes, cudaMemcpyHostToDevice, g.stream));
        CUDA_CHECK(b, cudaStreamSynchronize(g.stream));
        int64_t wrong = o->check ? checked_run(&g, op_epx, send, recv, host, count) : 0, nwrong = 0;
#ifdef EPX_HAVE_NCCL
        if (nccl && o->check) nwrong = checked_run(&g, op_nccl, send, recv, host, count);
#endif
        for (int i = 0; i < o->warmup; i++) {
            op_epx(&g, send, recv, count);
#ifdef EPX_HAVE_NCCL
            if (nccl) op_nccl(&g, send, recv, count);
#endif
        }
        capture_epx(&g, send, recv, count);
        double *te = malloc(sizeof(double) * (size_t)o->iters), *tn = malloc(sizeof(double) * (size_t)o->iters);
        double *tg = malloc(sizeof(double) * (size_t)o->iters);
        for (int i = 0; i < o->iters; i++) {
            te[i] = time_once(&g, op_epx, send, recv, count);
            tg[i] = time_once(&g, op_epx_graph, send, recv, count);
#ifdef EPX_HAVE_NCCL
            tn[i] = nccl ? time_once(&g, op_nccl, send, recv, count) : 0;
#else
            tn[i] = 0;
#endif
        }
        double t = bench_median_of_max(b, te, o->iters), nt = bench_median_of_max(b, tn, o->iters);
        double gt = bench_median_of_max(b, tg, o->iters);
        double bt_epx = bench_max(b, time_burst(&g, op_epx, send, recv, count, 20)), bt_nccl = 0;
#ifdef EPX_HAVE_NCCL
        if (nccl) bt_nccl = bench_max(b, time_burst(&g, op_nccl, send, recv, count, 20));
#endif
        /* Checked again after the timed calls (a call that goes wrong, or does nothing, only
         * after its first would pass the first check): the eager call, a graph replay, NCCL. */
        if (o->check) {
            wrong += checked_run(&g, op_epx, send, recv, host, count);
            wrong += checked_run(&g, op_epx_graph, send, recv, host, count);
#ifdef EPX_HAVE_NCCL
            if (nccl) nwrong += checked_run(&g, op_nccl, send, recv, host, count);
#endif
        }
        double w = bench_sum(b, (double)wrong), nw = bench_sum(b, (double)nwrong);
        free(te), free(tn), free(tg);
        CUDA_CHECK(b, cudaGraphExecDestroy(epx_graph));
        any_wrong |= w > 0 || nw > 0;
        if (b->rank == 0) {
            double algbw = t > 0 ? (double)bytes / t / 1e3 : 0, busbw = algbw * (R - 1) / R;
            printf("  %12" PRId64 " %10.2f %10.3f %10.3f %7.0f %9.2f %9.2f", bytes, t, algbw, busbw, w, gt, bt_epx);
            if (nccl) printf(" | %10.2f %7.0f %7.2fx %9.2f", nt, nw, t > 0 ? nt / t : 0, bt_nccl);
            printf("\n");
            fflush(stdout);
            if (json)
                fprintf(json,
                        "%s\n  {\"op\": \"alltoall\", \"backend\": \"cuda\", \"ranks\": %d, \"bytes\": %" PRId64
                        ", \"time_us\": %.3f, \"algbw_gbs\": %.4f, \"busbw_gbs\": %.4f, \"wrong\": %.0f, "
                        "\"baseline\": \"%s\", \"baseline_time_us\": %.3f, \"baseline_wrong\": %.0f, \"graph_time_us\": %.3f, "
                        "\"burst_time_us\": %.3f, \"baseline_burst_time_us\": %.3f}",
                        idx ? "," : "", R, bytes, t, algbw, busbw, w, nccl ? "ncclAlltoAll" : "none", nt, nw, gt, bt_epx, bt_nccl);
        }
    }
    if (json) {
        fprintf(json, "\n]\n");
        fclose(json);
    }
    free(counts);
    if (b->rank == 0 && any_wrong) printf("# FAILED: wrong values found\n");
    epx_mem_free(g.gpu, send);
    epx_mem_free(g.gpu, recv);
    free(host);
    cudaFree(g.flush);
#ifdef EPX_HAVE_NCCL
    if (nccl) ncclCommDestroy(g.nccl);
#endif
    epx_comm_destroy(g.gpu);
    return any_wrong ? 1 : 0;
}
#endif
