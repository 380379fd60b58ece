/*
 * The EPX_* tunables at communicator creation (README, "Tunables"): an integer outside its
 * range fails creation with EPX_ERR_INVALID_ARGUMENT naming the variable; on 2 ranks where
 * only rank 1 has the bad value, rank 1 gets that and rank 0 EPX_ERR_REMOTE_INVALID, both
 * at once (well inside the 5 s timeout). The ends of each range are accepted (a
 * communicator is made and an alltoall checked), and a value that does not parse is
 * replaced by the default (a warning). Variables are read once per process, so every case
 * runs in fresh processes; this one never touches epx itself.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testlib.h"

#define TIMEOUT_MS 5000

typedef struct {
    const char *var, *value;
    bool ok; /* accepted */
} env_case_t;

static const env_case_t cases[] = {
    {"EPX_MOE_CHUNKS", "5", false},    {"EPX_MOE_CHUNKS", "-1", false},  {"EPX_MOE_CHUNKS", "4", true},
    {"EPX_MOE_CHUNKS", "0", true},     {"EPX_MOE_LL_HOST", "2", false},  {"EPX_MOE_LL_HOST", "-2", false},
    {"EPX_MOE_LL_HOST", "-1", true},   {"EPX_MOE_LL_HOST", "1", true},   {"EPX_CPU_CMA", "2", false},
    {"EPX_CPU_CMA", "-1", false},      {"EPX_CPU_CMA", "0", true},       {"EPX_CUDA_CE_SMS", "0", false},
    {"EPX_CUDA_CE_SMS", "1", true},    {"EPX_CUDA_SMS", "-1", false},    {"EPX_CUDA_SMS", "0", true},
    {"EPX_CPU_SPIN_US", "-5", false},  {"EPX_CPU_SPIN_US", "0", true},   {"EPX_CPU_YIELD_MS", "-1", false},
    {"EPX_CPU_YIELD_MS", "0", true},   {"EPX_LOCAL_SIZE", "-1", false},  {"EPX_LOCAL_SIZE", "0", true},
    {"EPX_CPU_F16C", "2", false},      {"EPX_CPU_F16C", "0", true},
    {"EPX_CPU_SPIN_US", "3000000000", false}, {"EPX_MOE_CHUNKS", "abc", true}, /* not a number: the default */
};

/* Rank r of R over `id`, the case's value set when `bad`: create, then (accepted) one
 * alltoall checked. Exit 0 when the outcome is the expected one. */
static int rank_main(const env_case_t *c, int r, int R, const epx_unique_id_t *id, bool bad)
{
    test_rank = r;
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.backend = EPX_BACKEND_CPU;
    cfg.timeout_ms = TIMEOUT_MS;
    epx_comm_t comm = NULL;
    double t0 = test_now_ms();
    epx_status_t st = epx_comm_init_rank(&comm, R, r, id, &cfg);
    double ms = test_now_ms() - t0;
    epx_status_t want = c->ok ? EPX_SUCCESS : bad ? EPX_ERR_INVALID_ARGUMENT : EPX_ERR_REMOTE_INVALID;
    if (st != want)
        TEST_FAIL_("%s=%s%s: creation returned %s, expected %s (%s)", c->var, c->value, bad ? "" : " (on a peer)",
                   epx_status_name(st), epx_status_name(want), epx_get_last_error());
    if (ms > TIMEOUT_MS / 2) TEST_FAIL_("%s=%s: creation took %.0f ms", c->var, c->value, ms);
    if (!c->ok && bad && !strstr(epx_get_last_error(), c->var))
        TEST_FAIL_("%s=%s: the message does not name the variable: %s", c->var, c->value, epx_get_last_error());
    if (!c->ok) return 0;
    int32_t send[8], recv[8];
    for (int p = 0; p < R; p++) send[p] = r * 100 + p, recv[p] = -1;
    ASSERT_OK(epx_alltoall(comm, send, recv, 1, EPX_I32, NULL));
    for (int p = 0; p < R; p++) ASSERT_EQ(recv[p], p * 100 + r);
    ASSERT_OK(epx_comm_destroy(comm));
    return 0;
}

/* The case on R ranks (forked), the last one with the value: 0 when every rank passed. */
static int run_case(const env_case_t *c, int R)
{
    int fd[2];
    ASSERT(pipe(fd) == 0);
    pid_t pid[2];
    for (int r = 0; r < R; r++) {
        pid[r] = fork();
        ASSERT(pid[r] >= 0);
        if (pid[r]) continue;
        if (r == R - 1) setenv(c->var, c->value, 1); /* before epx reads any */
        epx_unique_id_t id;
        if (r == 0) { /* rank 0 makes the id and hands it on */
            ASSERT_OK(epx_get_unique_id(&id));
            for (int q = 1; q < R; q++) ASSERT(write(fd[1], &id, sizeof id) == (ssize_t)sizeof id);
        } else {
            ASSERT(read(fd[0], &id, sizeof id) == (ssize_t)sizeof id);
        }
        _exit(rank_main(c, r, R, &id, r == R - 1));
    }
    close(fd[0]), close(fd[1]);
    int failed = 0;
    for (int r = 0; r < R; r++) {
        int status;
        ASSERT(waitpid(pid[r], &status, 0) == pid[r]);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed = 1;
    }
    return failed;
}

int main(void)
{
    test_rank = 0;
    int failed = 0, passed = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int R = 1; R <= 2; R++) {
            int f = run_case(&cases[i], R);
            printf("%s=%s on %d rank%s: %s\n", cases[i].var, cases[i].value, R, R > 1 ? "s (the last one)" : "",
                   f ? "FAILED" : cases[i].ok ? "accepted" : "refused");
            failed += f, passed += !f;
        }
    if (failed) TEST_FAIL_("%d cases failed", failed);
    test_done(passed);
    return 0;
}
