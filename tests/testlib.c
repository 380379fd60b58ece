#include "testlib.h"

#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef EPX_HAVE_MPI
#include "epx_mpi.h"
#endif
#ifdef EPX_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#if defined(EPX_HAVE_MPI) && defined(EPX_TEST_KEEP_DSOS)
/* Sanitizer builds: Open MPI unloads its components before LeakSanitizer runs, whose
 * reports then name no module and escape the suppressions (lsan_mpi.supp). Keeping every
 * loaded library mapped lets them match. */
int dlclose(void *handle);
int dlclose(void *handle)
{
    (void)handle;
    return 0;
}
#endif

int test_rank = -1;
static bool test_cuda;
static bool test_pool;
static bool test_mpi;
static int test_device = -1;
#ifdef EPX_HAVE_CUDA
static cudaStream_t test_cuda_stream;
#define CUDA_OK(x)                                                                            \
    do {                                                                                      \
        cudaError_t e_ = (x);                                                                 \
        if (e_ != cudaSuccess) TEST_FAIL_("%s: %s", #x, cudaGetErrorString(e_));              \
    } while (0)
#endif

#ifdef EPX_HAVE_MPI
static void test_mpi_finalize(void)
{
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) MPI_Finalize();
}
#endif

bool test_init(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--cuda")) test_cuda = true;
        if (!strcmp(argv[i], "--mpi")) test_mpi = true;
        if (!strcmp(argv[i], "--pool")) test_pool = true;
    }
    if (test_pool && !test_cuda) {
        fprintf(stderr, "--pool is for the CUDA backend (device buffers from a stream-ordered pool): add --cuda\n");
        exit(2);
    }
    if (test_mpi) {
#ifdef EPX_HAVE_MPI
        MPI_Init(&argc, &argv);
        atexit(test_mpi_finalize);
#else
        printf("SKIPPED: this build has no MPI engine\n");
        fflush(stdout);
        exit(TEST_SKIP);
#endif
    }
    if (!test_cuda) return false;
#ifdef EPX_HAVE_CUDA
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        printf("SKIPPED: no CUDA device here (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        fflush(stdout);
        exit(TEST_SKIP);
    }
    const char *lr = getenv("EPX_LOCAL_RANK");
    test_device = (lr ? atoi(lr) : 0) % n;
    /* EPX_TEST_GPU_PER_HOST=1: each simulated host (EPX_LOCAL_SIZE ranks) shares one GPU,
     * so that NCCL, which takes one rank per GPU, can join the hosts. */
    const char *gph = getenv("EPX_TEST_GPU_PER_HOST"), *ls = getenv("EPX_LOCAL_SIZE");
    if (gph && atoi(gph) == 1 && ls && atoi(ls) > 0) {
        const char *nr = getenv("EPX_NRANKS");
        int hosts = nr ? (atoi(nr) + atoi(ls) - 1) / atoi(ls) : 1;
        if (hosts > n) { /* two hosts on one GPU: NCCL refuses two ranks of one device */
            printf("SKIPPED: %d simulated hosts need %d GPUs (one each: NCCL takes one rank per GPU); %d here\n",
                   hosts, hosts, n);
            fflush(stdout);
            exit(TEST_SKIP);
        }
        test_device = ((lr ? atoi(lr) : 0) / atoi(ls)) % n;
    }
    CUDA_OK(cudaSetDevice(test_device));
    int pools = 0;
    CUDA_OK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, test_device));
    if (test_pool && !pools) {
        printf("SKIPPED: --pool: device %d has no stream-ordered memory pool\n", test_device);
        fflush(stdout);
        exit(TEST_SKIP);
    }
    CUDA_OK(cudaStreamCreateWithFlags(&test_cuda_stream, cudaStreamNonBlocking));
    return true;
#else
    (void)argv;
    printf("SKIPPED: this build has no CUDA backend\n");
    fflush(stdout);
    exit(TEST_SKIP);
#endif
}

bool test_on_cuda(void) { return test_cuda; }
bool test_on_pool(void) { return test_pool; }

void test_init_cuda_only(int argc, char **argv)
{
    if (test_init(argc, argv)) return;
    printf("SKIPPED: a CUDA-only test; run it with --cuda\n");
    fflush(stdout);
    exit(TEST_SKIP);
}

void *test_buf_alloc(size_t bytes)
{
    void *p = NULL;
#ifdef EPX_HAVE_CUDA
    if (test_cuda) {
        /* EPX_TEST_MIN_ALLOC=N: every device buffer at least N bytes (sanitizer experiments). */
        const char *min = getenv("EPX_TEST_MIN_ALLOC");
        size_t floor = min ? (size_t)strtoull(min, NULL, 0) : 1;
        if (!test_pool) {
            CUDA_OK(cudaMalloc(&p, bytes > floor ? bytes : floor));
            return p;
        }
        CUDA_OK(cudaMallocAsync(&p, bytes > floor ? bytes : floor, test_cuda_stream));
        CUDA_OK(cudaStreamSynchronize(test_cuda_stream)); /* usable on any stream from here on */
        return p;
    }
#endif
    p = malloc(bytes ? bytes : 1);
    ASSERT(p);
    return p;
}

void test_buf_free(void *p)
{
#ifdef EPX_HAVE_CUDA
    if (test_cuda) {
        /* Pool memory: after the work on the test stream (the tests use no other). */
        if (p) CUDA_OK(test_pool ? cudaFreeAsync(p, test_cuda_stream) : cudaFree(p));
        return;
    }
#endif
    free(p);
}

void *test_buf_alloc_ipc(size_t bytes)
{
    bool pool = test_pool;
    test_pool = false;
    void *p = test_buf_alloc(bytes);
    test_pool = pool;
    return p;
}

void test_buf_free_ipc(void *p)
{
    bool pool = test_pool;
    test_pool = false;
    test_buf_free(p);
    test_pool = pool;
}

void test_buf_put(void *dst, const void *src, size_t bytes)
{
#ifdef EPX_HAVE_CUDA
    if (test_cuda) {
        /* In stream order, and finished on return (a plain cudaMemcpy from pageable
         * memory may return before the data lands). */
        CUDA_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, test_cuda_stream));
        CUDA_OK(cudaStreamSynchronize(test_cuda_stream));
        return;
    }
#endif
    memcpy(dst, src, bytes);
}

void test_buf_get(void *dst, const void *src, size_t bytes)
{
#ifdef EPX_HAVE_CUDA
    if (test_cuda) {
        CUDA_OK(cudaStreamSynchronize(test_cuda_stream));
        CUDA_OK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
        return;
    }
#endif
    memcpy(dst, src, bytes);
}

void test_buf_poison(void *p, int byte, size_t bytes)
{
#ifdef EPX_HAVE_CUDA
    if (test_cuda) {
        CUDA_OK(cudaMemsetAsync(p, byte, bytes, test_cuda_stream));
        return;
    }
#endif
    memset(p, byte, bytes);
}

void *test_stream(void)
{
#ifdef EPX_HAVE_CUDA
    if (test_cuda) return test_cuda_stream;
#endif
    return NULL;
}

#ifdef EPX_HAVE_CUDA
static void CUDART_CB test_sleep_ms(void *ms)
{
    usleep((useconds_t)(uintptr_t)ms * 1000u);
}
#endif

void test_stream_hold(int ms)
{
#ifdef EPX_HAVE_CUDA
    if (test_cuda) {
        CUDA_OK(cudaLaunchHostFunc(test_cuda_stream, test_sleep_ms, (void *)(uintptr_t)ms));
        return;
    }
#endif
    usleep((useconds_t)ms * 1000u);
}

void test_sync(void)
{
#ifdef EPX_HAVE_CUDA
    if (test_cuda) CUDA_OK(cudaStreamSynchronize(test_cuda_stream));
#endif
}

epx_comm_t test_comm_from_env(int *rank, int *nranks)
{
    epx_comm_t comm;
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    if (test_cuda) {
        cfg.backend = EPX_BACKEND_CUDA;
        cfg.device = test_device;
    }
#ifdef EPX_HAVE_MPI
    if (test_mpi) {
        int r = -1;
        MPI_Comm_rank(MPI_COMM_WORLD, &r);
        test_rank = r;
        ASSERT_OK(epx_comm_init_mpi(&comm, MPI_COMM_WORLD, &cfg));
    } else
#endif
        ASSERT_OK(epx_comm_init_from_env(&comm, &cfg));
    ASSERT_OK(epx_comm_rank(comm, rank));
    ASSERT_OK(epx_comm_size(comm, nranks));
    test_rank = *rank;
    return comm;
}

epx_status_t test_comm_again(epx_comm_t comm, const epx_config_t *cfg, epx_comm_t *out)
{
    epx_config_t mine = EPX_CONFIG_INITIALIZER;
    if (!cfg && test_cuda) {
        mine.backend = EPX_BACKEND_CUDA;
        mine.device = test_device;
        cfg = &mine;
    }
#ifdef EPX_HAVE_MPI
    if (test_mpi) return epx_comm_init_mpi(out, MPI_COMM_WORLD, cfg);
#endif
    int me, R;
    ASSERT_OK(epx_comm_rank(comm, &me));
    ASSERT_OK(epx_comm_size(comm, &R));
    size_t bytes = sizeof(epx_unique_id_t) * (size_t)R;
    epx_unique_id_t *ids = calloc((size_t)R, sizeof *ids);
    void *dsend = test_buf_alloc(bytes), *drecv = test_buf_alloc(bytes);
    ASSERT(ids);
    if (me == 0) {
        ASSERT_OK(epx_get_unique_id(&ids[0]));
        for (int p = 1; p < R; p++) ids[p] = ids[0];
    }
    test_buf_put(dsend, ids, bytes);
    ASSERT_OK(epx_alltoall(comm, dsend, drecv, sizeof *ids, EPX_U8, test_stream()));
    test_buf_get(ids, drecv, bytes);
    epx_status_t st = epx_comm_init_rank(out, R, me, &ids[0], cfg);
    free(ids);
    test_buf_free(dsend), test_buf_free(drecv);
    return st;
}

double test_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

void test_finish(epx_comm_t comm, int passed)
{
    epx_status_t async;
    ASSERT_OK(epx_comm_get_async_error(comm, &async));
    ASSERT_EQ(async, EPX_SUCCESS);
    ASSERT_OK(epx_comm_destroy(comm));
    test_done(passed);
}

void test_done(int passed)
{
    if (test_rank <= 0) printf("%d passed, 0 failed\n", passed);
    fflush(stdout);
}
