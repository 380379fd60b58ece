/*
 * Test helpers: assertion macros that report file/line/rank and exit non-zero, a seeded
 * RNG, and the communicator every multi-rank test starts from.
 */
#ifndef EPX_TESTLIB_H
#define EPX_TESTLIB_H

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "epx.h"

extern int test_rank;

#define TEST_FAIL_(...)                                                                       \
    do {                                                                                      \
        fprintf(stderr, "FAIL %s:%d (rank %d): ", __FILE__, __LINE__, test_rank);             \
        fprintf(stderr, __VA_ARGS__);                                                         \
        fprintf(stderr, "\n");                                                                \
        fflush(stderr);                                                                       \
        fflush(stdout);                                                                       \
        _Exit(1);                                                                             \
    } while (0)

#define ASSERT(cond)                                                                          \
    do {                                                                                      \
        if (!(cond)) TEST_FAIL_("%s", #cond);                                                 \
    } while (0)
#define ASSERT_EQ(a, b)                                                                       \
    do {                                                                                      \
        long long a_ = (long long)(a), b_ = (long long)(b);                                   \
        if (a_ != b_) TEST_FAIL_("%s == %s (%lld vs %lld)", #a, #b, a_, b_);                  \
    } while (0)
#define ASSERT_OK(expr)                                                                       \
    do {                                                                                      \
        epx_status_t s_ = (expr);                                                             \
        if (s_ != EPX_SUCCESS)                                                                \
            TEST_FAIL_("%s -> %s: %s", #expr, epx_status_name(s_), epx_get_last_error());     \
    } while (0)
#define ASSERT_STATUS(expr, want)                                                             \
    do {                                                                                      \
        epx_status_t s_ = (expr);                                                             \
        if (s_ != (want))                                                                     \
            TEST_FAIL_("%s -> %s, expected %s (%s)", #expr, epx_status_name(s_),              \
                       epx_status_name(want), epx_get_last_error());                          \
    } while (0)

/* splitmix64: deterministic across ranks for the same seed. */
static inline uint64_t test_rand(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static inline uint64_t test_mix(uint64_t a, uint64_t b, uint64_t c, uint64_t d)
{
    uint64_t s = a * 0x100000001b3ull ^ (b << 21) ^ (c << 42) ^ d * 0x9e3779b97f4a7c15ull;
    return test_rand(&s);
}

/* Exit status that ctest reports as "skipped" (SKIP_RETURN_CODE). */
#define TEST_SKIP 77

/* Parse the common flags (--cuda: run on the CUDA backend, one device per local rank,
 * round robin; --pool, with --cuda: every device buffer of test_buf_alloc comes from the
 * device's stream-ordered pool (cudaMallocAsync), memory CUDA IPC cannot share, as PyTorch's
 * expandable segments; --pool without --cuda fails: host buffers have no pool; --mpi:
 * initialise MPI and make communicators with epx_comm_init_mpi on MPI_COMM_WORLD — run under
 * mpirun; exits with TEST_SKIP in a build without MPI). Exits with TEST_SKIP, saying why,
 * when --cuda is given but this machine or build has no CUDA device (or, with --pool, no
 * stream-ordered pool). Returns true when on CUDA. */
bool test_init(int argc, char **argv);
bool test_on_cuda(void);
/* --pool: the test's device buffers lie in a stream-ordered pool. */
bool test_on_pool(void);
/* test_init for tests that exist only for the CUDA backend: without --cuda they exit with
 * TEST_SKIP, saying so. */
void test_init_cuda_only(int argc, char **argv);

/* Create the communicator from the epx-run environment, or from MPI_COMM_WORLD with --mpi
 * (sets test_rank). */
epx_comm_t test_comm_from_env(int *rank, int *nranks);
/* Another communicator over the same ranks, made as the first was (from MPI_COMM_WORLD with
 * --mpi, else from an id rank 0 makes and sends through `comm`), with cfg (NULL: the backend
 * under test): what the creation returned, *out on success. Collective. */
epx_status_t test_comm_again(epx_comm_t comm, const epx_config_t *cfg, epx_comm_t *out);
/* A monotonic clock, in milliseconds. */
double test_now_ms(void);

/* Buffers on the backend under test (device memory on CUDA: cudaMalloc, or the pool with
 * --pool), and copies to/from the host. */
void *test_buf_alloc(size_t bytes);
void test_buf_free(void *p);
/* The same, from cudaMalloc even with --pool (memory CUDA IPC can share); on the CPU as
 * above. Free it with test_buf_free_ipc. */
void *test_buf_alloc_ipc(size_t bytes);
void test_buf_free_ipc(void *p);
void test_buf_put(void *dst, const void *host_src, size_t bytes);
void test_buf_get(void *host_dst, const void *src, size_t bytes);
/* Fill with `byte`, in stream order (asynchronous on CUDA). */
void test_buf_poison(void *p, int byte, size_t bytes);
/* The stream calls are enqueued on (NULL on the CPU), and a wait for it. */
void *test_stream(void);
void test_sync(void);
/* What this rank enqueues next starts `ms` later: a host function that sleeps on the
 * stream (CUDA), or a sleep now (CPU). */
void test_stream_hold(int ms);

/* Every test prints one closing line through this: "N passed, 0 failed". */
void test_done(int passed);
/* End a test that ran on `comm`: the communicator must still be healthy (no asynchronous
 * error); destroy it and print the closing line. */
void test_finish(epx_comm_t comm, int passed);

#endif
