/*
 * epx-bench: benchmarks with the nccl-tests interface and a baseline in the same run.
 *
 *   epx-bench alltoall --ranks N --backend cpu -b MIN -e MAX -f FACTOR -n ITERS -w WARMUP
 *                      -c 1 [--json FILE] [--baseline auto|mpi|none] [--unregistered]
 *   epx-bench moe --ranks N --backend cpu --tokens T --hidden H --topk K --experts E
 *                 --dtype bf16|f16|f32|fp8 --mode ht|ll [--combine-dtype bf16|f16|f32] [--skew S]
 *                 -n ITERS -w WARMUP -c 1
 *                 [--json FILE] [--baseline auto|mpi|none] [--unregistered]
 *   epx-bench moe --backend cuda --ranks N ... --mode ht [--baseline auto|none]
 *                 (one rank per GPU; baseline: the same routing with NCCL send/recv)
 *
 * Started by hand, it launches its own ranks: through mpiexec when built with MPI (so that
 * MPI_Alltoall runs on the same bytes in the same processes), else with the epx launcher.
 * Under epx-run or mpiexec it runs as one rank. --init mpi makes the communicator with
 * epx_comm_init_mpi (several hosts, or hosts simulated with EPX_LOCAL_SIZE).
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "launch.h"

double bench_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e6 * (double)ts.tv_sec + 1e-3 * (double)ts.tv_nsec;
}

static int bench_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double bench_median(double *v, int n)
{
    if (n <= 0) return 0;
    qsort(v, (size_t)n, sizeof *v, bench_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

const char *bench_status_text(epx_status_t st, const char *msg)
{
    return msg && *msg ? msg : epx_status_name(st);
}

void bench_die(bench_ctx_t *b, const char *what, epx_status_t st)
{
    fprintf(stderr, "epx-bench: rank %d: %s failed: %s\n", b->rank, what,
            bench_status_text(st, b->comm ? epx_comm_get_last_error(b->comm) : epx_get_last_error()));
    fflush(stderr);
    if (b->comm) epx_comm_abort(b->comm);
    _exit(3);
}

static void bench_gather(bench_ctx_t *b, double v, double *all)
{
    double *send = malloc(sizeof(double) * (size_t)b->nranks);
    for (int i = 0; i < b->nranks; i++) send[i] = v;
    epx_status_t st = epx_alltoall(b->comm, send, all, 1, EPX_I64, NULL);
    free(send);
    if (st != EPX_SUCCESS) bench_die(b, "gather of results", st);
}

double bench_max(bench_ctx_t *b, double v)
{
    double *all = malloc(sizeof(double) * (size_t)b->nranks), m = -INFINITY;
    bench_gather(b, v, all);
    for (int i = 0; i < b->nranks; i++) m = all[i] > m ? all[i] : m;
    free(all);
    return m;
}

double bench_median_of_max(bench_ctx_t *b, const double *t, int n)
{
    int R = b->nranks;
    double *send = malloc(sizeof(double) * (size_t)n * (size_t)R), *all = malloc(sizeof(double) * (size_t)n * (size_t)R);
    double *mx = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    for (int p = 0; p < R; p++) memcpy(send + (size_t)p * (size_t)n, t, sizeof(double) * (size_t)n);
    epx_status_t st = epx_alltoall(b->comm, send, all, (size_t)n, EPX_I64, NULL);
    if (st != EPX_SUCCESS) bench_die(b, "gather of results", st);
    for (int i = 0; i < n; i++) {
        mx[i] = -INFINITY;
        for (int p = 0; p < R; p++) mx[i] = all[(size_t)p * (size_t)n + (size_t)i] > mx[i] ? all[(size_t)p * (size_t)n + (size_t)i] : mx[i];
    }
    double med = bench_median(mx, n);
    free(send), free(all), free(mx);
    return med;
}

double bench_sum(bench_ctx_t *b, double v)
{
    double *all = malloc(sizeof(double) * (size_t)b->nranks), s = 0;
    bench_gather(b, v, all);
    for (int i = 0; i < b->nranks; i++) s += all[i];
    free(all);
    return s;
}

int bench_a2a_counts(const bench_opts_t *o, int nranks, int64_t **counts)
{
    int n = 0, cap = 16;
    int64_t *c = malloc(sizeof(int64_t) * (size_t)cap), unit = 4 * (int64_t)nranks;
    for (double s = (double)o->min_bytes; s <= (double)o->max_bytes * 1.0000001; s *= o->factor) {
        int64_t cnt = (int64_t)s / unit;
        if (n == 0 || cnt != c[n - 1]) {
            if (n == cap) c = realloc(c, sizeof(int64_t) * (size_t)(cap *= 2));
            c[n++] = cnt;
        }
        if (s < (double)unit) s = (double)unit / o->factor; /* 0 (or below one element a peer): next the smallest */
    }
    *counts = c;
    return n;
}

void bench_barrier(bench_ctx_t *b)
{
    epx_status_t st = epx_barrier(b->comm, NULL);
    if (st != EPX_SUCCESS) bench_die(b, "barrier", st);
}

static int usage_to(FILE *f, int status)
{
    fprintf(f,
            "usage: epx-bench alltoall|moe [options]\n"
            "  alltoall: epx_alltoall vs MPI_Alltoall over a range of sizes\n"
            "  moe:      epx MoE layout, dispatch, combine vs the same routing with MPI_Alltoallv\n"
            "common options:\n"
            "  -r, --ranks N      ranks to launch (default 2; ignored under epx-run/mpiexec)\n"
            "  --backend B        cpu, or cuda (one rank per GPU; baselines: ncclAlltoAll, and for moe\n"
            "                     the same routing with NCCL send/recv)\n"
            "  -n, --iters N      timed iterations per size / op (default 20)\n"
            "  -w, --warmup N     untimed iterations per size / op (default 5)\n"
            "  -c, --check 0|1    verify every element (default 1)\n"
            "  --json FILE        write the results as a JSON list\n"
            "  --baseline B       auto (MPI when built with it), mpi, none\n"
            "  --init I           id: communicator from a rendezvous id (one host); mpi: from\n"
            "                     MPI_COMM_WORLD with epx_comm_init_mpi (hosts by shared memory,\n"
            "                     or simulated with EPX_LOCAL_SIZE); mpi needs mpiexec\n"
            "  --unregistered     send from malloc memory instead of epx_mem_alloc memory\n"
            "  --pool             moe --backend cuda: every buffer given to epx from the stream-ordered pool\n"
            "                     (cudaMallocAsync: memory CUDA IPC cannot share, so epx stages the inputs;\n"
            "                     not with EPX_CUDA_SMS=0, nor --mode ll across hosts)\n"
            "  --timeout SEC      launcher timeout (default 1800)\n"
            "alltoall:\n"
            "  -b, --minbytes S   smallest size, bytes sent per rank (K/M/G suffixes; default 1K)\n"
            "  -e, --maxbytes S   largest size (default 64M)\n"
            "  -f, --stepfactor F size multiplier (default 4)\n"
            "moe:\n"
            "  --tokens T         tokens per rank (default 4096)\n"
            "  --hidden H         hidden size (default 7168)\n"
            "  --topk K           experts per token, distinct (default 8, at most 16)\n"
            "  --experts E        experts in all, a multiple of the ranks (default 256)\n"
            "  --dtype D          the dispatch's tokens: bf16 (default), f16, f32, or fp8 (ht: e4m3\n"
            "                     tokens with f32 scales per 128 channels; ll: bf16 tokens quantised by\n"
            "                     the dispatch)\n"
            "  --combine-dtype D  the combine's expert outputs y and output: bf16, f16, f32 (default:\n"
            "                     epx's, the tokens' dtype, bf16 with fp8)\n"
            "  --mode M           ht (high-throughput, rank-major) or ll (low-latency, expert-major)\n"
            "  --skew S           Zipf exponent of the expert popularity (default 0: uniform)\n"
            "  --count C          CUDA ht dispatch: device (default; worst-case capacity, count on the\n"
            "                     device, no host synchronisation) or host (the count read back)\n"
            "  (the CUDA SM budget is EPX_CUDA_SMS, default 24; EPX_CUDA_SMS=0 moves the ht payload\n"
            "  with copy engines, its pack/reduce kernels on EPX_CUDA_CE_SMS blocks, default 32)\n");
    return status;
}
static int usage(void) { return usage_to(stderr, 2); }

static bool is_help(const char *a) { return !strcmp(a, "-h") || !strcmp(a, "--help"); }

static bool parse_size(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0)) return false;
    double m = 1;
    if (*end == 'K' || *end == 'k') m = 1024.0, end++;
    else if (*end == 'M' || *end == 'm') m = 1048576.0, end++;
    else if (*end == 'G' || *end == 'g') m = 1073741824.0, end++;
    if (*end == 'B') end++;
    if (*end || !(v * m < 9.2e18)) return false; /* past INT64_MAX (or NaN): refused, not wrapped */
    *out = (int64_t)(v * m);
    return true;
}

const char *bench_dtype_name(int dtype)
{
    return dtype == EPX_FP8_E4M3 ? "fp8" : epx_dtype_name((epx_dtype_t)dtype);
}

/* The dtype named s (bench_dtype_name): bf16, f16, f32 or, with fp8_ok, fp8; -1 for another name. */
static int parse_dtype(const char *s, bool fp8_ok)
{
    static const epx_dtype_t ok[] = {EPX_BF16, EPX_F16, EPX_F32, EPX_FP8_E4M3};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0] - !fp8_ok; i++)
        if (!strcmp(s, bench_dtype_name(ok[i]))) return ok[i];
    return -1;
}

static bool under_mpi(void)
{
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK");
}

static int parse_args(int argc, char **argv, bench_opts_t *o)
{
    *o = (bench_opts_t){.op = NULL, .ranks = 2, .backend = "cpu", .min_bytes = 1024, .max_bytes = 64 << 20,
                        .factor = 4, .iters = 20, .warmup = 5, .check = 1, .json = NULL, .baseline = "auto", .init = "id",
                        .unregistered = false, .timeout_s = 1800, .tokens = 4096, .hidden = 7168, .topk = 8,
                        .experts = 256, .dtype = EPX_BF16, .combine_dtype = EPX_UNSET, .mode = "ht", .skew = 0,
                        .count = "device"};
    if (argc < 2) return usage();
    for (int i = 1; i < argc; i++)
        if (is_help(argv[i])) return usage_to(stdout, 0), -1; /* -1: done, main exits 0 */
    o->op = argv[1];
    if (strcmp(o->op, "alltoall") != 0 && strcmp(o->op, "moe") != 0) {
        fprintf(stderr, "epx-bench: unknown benchmark '%s'\n", o->op);
        return usage();
    }
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(s, l) (!strcmp(a, s) || !strcmp(a, l))
        if (!strcmp(a, "--unregistered")) {
            o->unregistered = true;
            continue;
        }
        if (!strcmp(a, "--pool")) {
            o->pool = true;
            continue;
        }
        if (!v) {
            fprintf(stderr, "epx-bench: %s needs a value\n", a);
            return usage();
        }
        i++;
        bool ok = true;
        if (OPT("-r", "--ranks")) o->ranks = atoi(v), ok = o->ranks >= 1 && o->ranks <= 1024;
        else if (!strcmp(a, "--backend")) o->backend = v, ok = !strcmp(v, "cpu") || !strcmp(v, "cuda");
        else if (OPT("-b", "--minbytes")) ok = parse_size(v, &o->min_bytes);
        else if (OPT("-e", "--maxbytes")) ok = parse_size(v, &o->max_bytes);
        else if (OPT("-f", "--stepfactor")) o->factor = atof(v), ok = o->factor > 1;
        else if (OPT("-n", "--iters")) o->iters = atoi(v), ok = o->iters >= 1;
        else if (OPT("-w", "--warmup")) o->warmup = atoi(v), ok = o->warmup >= 0;
        else if (OPT("-c", "--check")) o->check = atoi(v);
        else if (!strcmp(a, "--json")) o->json = v;
        else if (!strcmp(a, "--baseline")) o->baseline = v, ok = !strcmp(v, "auto") || !strcmp(v, "mpi") || !strcmp(v, "none");
        else if (!strcmp(a, "--timeout")) o->timeout_s = atof(v);
        else if (!strcmp(a, "--init")) o->init = v, ok = !strcmp(v, "id") || !strcmp(v, "mpi");
        else if (!strcmp(a, "--tokens")) o->tokens = atoi(v), ok = o->tokens >= 1;
        else if (!strcmp(a, "--hidden")) o->hidden = atoi(v), ok = o->hidden >= 1;
        else if (!strcmp(a, "--topk")) o->topk = atoi(v), ok = o->topk >= 1 && o->topk <= EPX_MOE_MAX_TOPK;
        else if (!strcmp(a, "--experts")) o->experts = atoi(v), ok = o->experts >= 1;
        else if (!strcmp(a, "--dtype")) o->dtype = parse_dtype(v, true), ok = o->dtype >= 0;
        else if (!strcmp(a, "--combine-dtype")) o->combine_dtype = parse_dtype(v, false), ok = o->combine_dtype >= 0;
        else if (!strcmp(a, "--mode")) o->mode = v, ok = !strcmp(v, "ht") || !strcmp(v, "ll");
        else if (!strcmp(a, "--skew")) o->skew = atof(v), ok = o->skew >= 0;
        else if (!strcmp(a, "--count")) o->count = v, ok = !strcmp(v, "device") || !strcmp(v, "host");
        else {
            fprintf(stderr, "epx-bench: unknown option %s\n", a);
            return usage();
        }
#undef OPT
        if (!ok) {
            fprintf(stderr, "epx-bench: bad value for %s: %s\n", a, v);
            return usage();
        }
    }
    if (o->max_bytes < o->min_bytes) o->max_bytes = o->min_bytes;
    if (o->pool && (strcmp(o->op, "moe") != 0 || strcmp(o->backend, "cuda") != 0)) {
        fprintf(stderr, "epx-bench: --pool is for moe --backend cuda (device buffers from a pool)\n");
        return usage();
    }
    const char *sms = getenv("EPX_CUDA_SMS");
    if (o->pool && sms && atoi(sms) == 0) { /* the peers write recv_x: it must be shareable */
        fprintf(stderr, "epx-bench: --pool does not work with the copy-engine path (EPX_CUDA_SMS=0)\n");
        return usage();
    }
    /* Checked again by each rank (the rank count may come from the launcher); said here
     * before any rank starts when the launch is ours. */
    if (!strcmp(o->op, "moe") && !getenv("EPX_RANK") && !under_mpi() &&
        !bench_moe_shape_ok(o->experts, o->ranks, o->topk, true))
        return 2;
    return 0;
}

/* Re-run this command as N ranks: under mpiexec when MPI baselines are wanted, else with
 * the epx launcher. */
static int launch_self(bench_opts_t *o, int argc, char **argv)
{
    static char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        perror("epx-bench: readlink /proc/self/exe");
        return 1;
    }
    self[n] = '\0';
    char **args = calloc((size_t)argc + 16, sizeof *args);
#ifdef EPX_HAVE_MPI
    if (strcmp(o->backend, "cpu") == 0 && (strcmp(o->baseline, "none") != 0 || !strcmp(o->init, "mpi")) &&
        access(EPX_MPIEXEC, X_OK) == 0) {
        static char nbuf[16];
        snprintf(nbuf, sizeof nbuf, "%d", o->ranks);
        int k = 0;
        args[k++] = EPX_MPIEXEC;
        args[k++] = "-n";
        args[k++] = nbuf;
#ifdef OMPI_MAJOR_VERSION
        args[k++] = "--oversubscribe";
        args[k++] = "--bind-to";
        args[k++] = "none";
        if (geteuid() == 0) args[k++] = "--allow-run-as-root";
#endif
        args[k++] = self;
        for (int i = 1; i < argc; i++) args[k++] = argv[i];
        int rc = epx_run_timed(o->timeout_s, args); /* --timeout bounds the whole run here too */
        free(args);
        return rc;
    }
#endif
    if ((!strcmp(o->baseline, "mpi") && !strcmp(o->backend, "cpu")) || !strcmp(o->init, "mpi")) {
        fprintf(stderr, "epx-bench: --baseline mpi and --init mpi need a build with MPI and mpiexec\n");
        return 1;
    }
    args[0] = self;
    for (int i = 1; i < argc; i++) args[i] = argv[i];
    args[argc] = NULL;
    int rc = epx_launch(o->ranks, o->timeout_s, args);
    free(args);
    return rc;
}

int main(int argc, char **argv)
{
    bench_ctx_t b = {0};
    int rc = parse_args(argc, argv, &b.opt);
    if (rc) return rc < 0 ? 0 : rc;
    bool in_epx_run = getenv("EPX_RANK") != NULL;
    if (!in_epx_run && !under_mpi()) return launch_self(&b.opt, argc, argv);

    epx_status_t st;
    if (in_epx_run && !strcmp(b.opt.init, "mpi")) {
        fprintf(stderr, "epx-bench: --init mpi runs under mpiexec, not epx-run\n");
        return 2;
    }
    if (in_epx_run) {
        st = epx_comm_init_from_env(&b.comm, NULL);
    } else {
#ifdef EPX_HAVE_MPI
        MPI_Init(&argc, &argv);
        MPI_Comm_rank(MPI_COMM_WORLD, &b.rank);
        MPI_Comm_size(MPI_COMM_WORLD, &b.nranks);
        if (!strcmp(b.opt.init, "mpi")) {
            st = epx_comm_init_mpi(&b.comm, MPI_COMM_WORLD, NULL);
        } else {
            epx_unique_id_t id;
            if (b.rank == 0 && epx_get_unique_id(&id) != EPX_SUCCESS) bench_die(&b, "epx_get_unique_id", EPX_ERR_SYSTEM);
            MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
            st = epx_comm_init_rank(&b.comm, b.nranks, b.rank, &id, NULL);
        }
        b.mpi = strcmp(b.opt.baseline, "none") != 0;
#else
        fprintf(stderr, "epx-bench: started by mpiexec but built without MPI\n");
        return 1;
#endif
    }
    if (st != EPX_SUCCESS) bench_die(&b, "communicator creation", st);
    epx_comm_rank(b.comm, &b.rank);
    epx_comm_size(b.comm, &b.nranks);

    if (!strcmp(b.opt.backend, "cuda"))
#ifdef EPX_HAVE_CUDA
        rc = !strcmp(b.opt.op, "alltoall") ? bench_cuda_alltoall(&b) : bench_cuda_moe(&b);
#else
        rc = !strcmp(b.opt.op, "alltoall") ? bench_cuda_alltoall(&b)
                                           : (fprintf(stderr, "epx-bench: this build has no CUDA backend\n"), 2);
#endif
    else
        rc = !strcmp(b.opt.op, "moe") ? bench_moe(&b) : bench_alltoall(&b);

    /* Rank 0 prints the results after the last gather; a rank that returned non-zero (wrong
     * values) and exited before it had printed them made the launcher stop rank 0 midway
     * (the table and the FAILED line lost). Every rank waits here for rank 0's output. */
    fflush(stdout);
    bench_barrier(&b);
    epx_comm_destroy(b.comm);
#ifdef EPX_HAVE_MPI
    if (!in_epx_run) MPI_Finalize();
#endif
    fflush(stdout);
    return rc;
}
