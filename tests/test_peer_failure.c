/*
 * A dead, stalled or aborting peer: the survivors return EPX_ERR_PEER_FAILURE or
 * EPX_ERR_TIMEOUT within the configured timeout instead of hanging, the communicator then
 * reports the error, and a new communicator works. Forks its own ranks (epx-run would stop
 * the survivors as soon as one rank dies).
 */
#include <dirent.h>
#include <poll.h>
#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "launch.h"
#include "testlib.h"

#define NR 3
#define FAULT_EXIT 86 /* EPX__FAULT_EXIT_CODE */
/* The communicators' timeout: 1.5 s, or EPX_TEST_PEER_TIMEOUT_MS (sanitizer builds set 4 s:
 * there three forked ranks may take longer than 1.5 s to meet on a loaded 2-core machine). */
static int timeout_ms = 1500;
#define PARENT_WAIT_MS 90000 /* the parent's bound on any rank (ctest's is 120 s): it names it */

typedef enum { DIE_BETWEEN, KILLED_DURING, STALL, ABORT, ALL_KILLED, DIES_CREATING } scenario_t;
static const char *names[] = {"dies between calls", "killed during a large exchange", "stalls", "aborts",
                              "every rank killed", "dies while the communicator is created"};

/* Rank NR-1 writes here once its healthy exchanges are done (then the parent may kill it). */
static int ready_fd = -1;
/* Shared by the forked ranks (and the parent):
 *   healthy_done  survivors that finished their healthy exchanges: none starts on the
 *                 failure until all have, or a fast survivor's reaction to it (its abort)
 *                 could break a slow one's last healthy exchange;
 *   id, id_ready  the scenario's unique id, made by rank 0 after the fork: the parent never
 *                 runs the id's listener thread, so it forks with one thread (a child forked
 *                 while another thread held a lock, e.g. the allocator's under ASan, could
 *                 hang on it). */
typedef struct {
    int healthy_done;
    int id_ready;
    epx_unique_id_t id;
} shared_t;
static shared_t *sh;

/* Rank `rank` of one scenario; rank NR-1 misbehaves. Exit 0 = behaved as expected. */
static int rank_main(scenario_t sc, int rank)
{
    test_rank = rank;
    if (rank != NR - 1) close(ready_fd); /* only rank NR-1 writes: its end alone keeps the pipe open */
    if (rank == 0) {
        ASSERT_OK(epx_get_unique_id(&sh->id));
        __atomic_store_n(&sh->id_ready, 1, __ATOMIC_RELEASE);
    }
    for (double t = test_now_ms(); !__atomic_load_n(&sh->id_ready, __ATOMIC_ACQUIRE);) {
        if (test_now_ms() - t > 30000) TEST_FAIL_("rank 0 made no unique id in 30 s");
        usleep(1000);
    }
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.timeout_ms = timeout_ms;
    epx_comm_t comm;
    if (sc == DIES_CREATING) {
        /* Rank NR-1 ends its process once its shared segment exists, before the others have
         * mapped it (EPX_FAULT step 0; read at this process's first epx call, here). */
        char fault[64];
        snprintf(fault, sizeof fault, "kill:rank=%d,step=0", NR - 1);
        if (rank == NR - 1) setenv("EPX_FAULT", fault, 1);
        double t0 = test_now_ms();
        epx_status_t st = epx_comm_init_rank(&comm, NR, rank, &sh->id, &cfg);
        double waited = test_now_ms() - t0;
        if (rank == NR - 1) TEST_FAIL_("%s: the fault did not fire (%s)", names[sc], epx_status_name(st));
        if (st != EPX_ERR_PEER_FAILURE && st != EPX_ERR_TIMEOUT)
            TEST_FAIL_("%s: creation returned %s, expected a peer failure or a timeout", names[sc], epx_status_name(st));
        if (waited > timeout_ms + 1000) TEST_FAIL_("%s: took %.0f ms, timeout is %d ms", names[sc], waited, timeout_ms);
        printf("rank %d, peer %s: %s after %.0f ms: %s\n", rank, names[sc], epx_status_name(st), waited,
               epx_get_last_error());
        fflush(stdout);
        return 0;
    }
    ASSERT_OK(epx_comm_init_rank(&comm, NR, rank, &sh->id, &cfg));
    size_t count = sc == KILLED_DURING ? (16u << 20) : 64;
    uint8_t *send, *recv = malloc(count * NR);
    ASSERT_OK(epx_mem_alloc(comm, count * NR, (void **)&send));
    memset(send, rank, count * NR);
    for (int i = 0; i < 2; i++) ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_U8, NULL));
    if (sc == ALL_KILLED) raise(SIGKILL); /* nobody removes anything: the next process here does */
    bool bad = rank == NR - 1;
    if (!bad) {
        __atomic_add_fetch(&sh->healthy_done, 1, __ATOMIC_SEQ_CST);
        for (double t = test_now_ms(); __atomic_load_n(&sh->healthy_done, __ATOMIC_SEQ_CST) < NR - 1;) {
            if (test_now_ms() - t > 30000) TEST_FAIL_("the other survivors' healthy exchanges did not end");
            usleep(1000);
        }
    }
    if (bad) {
        switch (sc) {
        case DIE_BETWEEN: _exit(0);
        case KILLED_DURING:
            if (write(ready_fd, "r", 1) != 1) _exit(9);
            for (;;) epx_alltoall(comm, send, recv, count, EPX_U8, NULL); /* parent kills us */
        case STALL: sleep(3 * timeout_ms / 1000 + 2); exit(0); /* without destroying: its names go at exit */
        case ABORT: usleep(100000); epx_comm_abort(comm); _exit(0);
        case ALL_KILLED:
        case DIES_CREATING: _exit(9); /* (gone above) */
        }
    }
    double t0 = test_now_ms();
    epx_status_t st = EPX_SUCCESS;
    for (int i = 0; i < 1000 && st == EPX_SUCCESS; i++) {
        t0 = test_now_ms();
        st = epx_alltoall(comm, send, recv, count, EPX_U8, NULL);
    }
    double waited = test_now_ms() - t0;
    epx_status_t want = sc == STALL ? EPX_ERR_TIMEOUT : EPX_ERR_PEER_FAILURE;
    /* A survivor may also see the other survivor's failure first (it stopped answering). */
    if (st != want && !(st == EPX_ERR_TIMEOUT || st == EPX_ERR_PEER_FAILURE))
        TEST_FAIL_("%s: got %s (%s)", names[sc], epx_status_name(st), epx_comm_get_last_error(comm));
    if (sc != STALL && st != EPX_ERR_PEER_FAILURE)
        TEST_FAIL_("%s: got %s, expected EPX_ERR_PEER_FAILURE (%s)", names[sc], epx_status_name(st),
                   epx_comm_get_last_error(comm));
    if (waited > timeout_ms + 1000) TEST_FAIL_("%s: took %.0f ms, timeout is %d ms", names[sc], waited, timeout_ms);
    printf("rank %d, peer %s: %s after %.0f ms: %s\n", rank, names[sc], epx_status_name(st), waited,
           epx_comm_get_last_error(comm));
    epx_status_t async;
    ASSERT_OK(epx_comm_get_async_error(comm, &async));
    ASSERT(async == EPX_ERR_PEER_FAILURE || async == EPX_ERR_TIMEOUT);
    ASSERT_STATUS(epx_alltoall(comm, send, recv, count, EPX_U8, NULL), async); /* stays broken, no hang */
    ASSERT_OK(epx_comm_abort(comm));
    free(recv);
    fflush(stdout);
    return 0;
}

/* How many /dev/shm names start with prefix (printed when `say`). */
static int shm_names(const char *prefix, bool say)
{
    DIR *d = opendir("/dev/shm");
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) {
            if (say) printf("left in /dev/shm: %s\n", e->d_name);
            n++;
        }
    if (d) closedir(d);
    return n;
}

static void run_scenario(scenario_t sc)
{
    fflush(stdout);
    int ready[2];
    ASSERT(pipe(ready) == 0);
    memset(sh, 0, sizeof *sh);
    ready_fd = ready[1];
    pid_t pids[NR];
    for (int r = 0; r < NR; r++) {
        pids[r] = fork();
        ASSERT(pids[r] >= 0);
        if (pids[r] == 0) _exit(rank_main(sc, r));
    }
    close(ready[1]); /* only rank NR-1 writes: if it ends early, end-of-file, not a hang */
    if (sc == KILLED_DURING) {
        char c;
        struct pollfd pfd = {ready[0], POLLIN, 0};
        if (poll(&pfd, 1, PARENT_WAIT_MS) != 1 || read(ready[0], &c, 1) != 1) { /* its healthy exchanges are over,
                                                                                  or it failed or hung before */
            for (int r = 0; r < NR; r++) kill(pids[r], SIGKILL);
            TEST_FAIL_("scenario '%s': rank %d ended before its healthy exchanges were done", names[sc], NR - 1);
        }
        usleep(100000);
        kill(pids[NR - 1], SIGKILL);
    }
    close(ready[0]);
    double t0 = test_now_ms();
    for (int r = 0; r < NR; r++) {
        int status = 0;
        while (waitpid(pids[r], &status, WNOHANG) == 0) { /* bounded: a hung rank is named, not waited for */
            if (test_now_ms() - t0 > PARENT_WAIT_MS) {
                for (int q = 0; q < NR; q++) kill(pids[q], SIGKILL);
                TEST_FAIL_("scenario '%s': rank %d still running after %d s", names[sc], r, PARENT_WAIT_MS / 1000);
            }
            usleep(10000);
        }
        bool ok = sc == ALL_KILLED                    ? WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL
                  : sc == DIES_CREATING && r == NR - 1 ? WIFEXITED(status) && WEXITSTATUS(status) == FAULT_EXIT
                  : r == NR - 1                        ? true
                                                       : WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!ok) { /* the others go too: a child left running would hold ctest's output open */
            for (int q = 0; q < NR; q++) kill(pids[q], SIGKILL);
            TEST_FAIL_("scenario '%s': rank %d failed (status 0x%x)", names[sc], r, status);
        }
    }
    /* No shared-memory name of the scenario's communicator is left: the survivors removed
     * the dead rank's (killed, or gone with _exit), the others removed their own (at abort,
     * or at exit without destroying anything). When every rank was killed, their names stay
     * until the next epx process here starts (the next scenario's ranks: checked there). */
    static char killed_all[64]; /* the names' prefix of an ALL_KILLED scenario, checked next */
    char text[EPX_UNIQUE_ID_STRLEN], prefix[64];
    ASSERT(sh->id_ready);
    ASSERT_OK(epx_unique_id_to_string(&sh->id, text, sizeof text));
    snprintf(prefix, sizeof prefix, "epx-%s-", strrchr(text, ':') + 1);
    int left = shm_names(prefix, sc != ALL_KILLED);
    if (sc == ALL_KILLED) {
        if (left < NR) TEST_FAIL_("scenario '%s': %d names left, expected each rank's", names[sc], left);
        snprintf(killed_all, sizeof killed_all, "%s", prefix);
        return;
    }
    epx_launch_cleanup_shm(text);
    if (left) TEST_FAIL_("scenario '%s': %d shared-memory names left behind", names[sc], left);
    if (killed_all[0] && (left = shm_names(killed_all, true)) != 0)
        TEST_FAIL_("%d names of the scenario where every rank was killed are still there", left);
    killed_all[0] = '\0';
}

int main(void)
{
    test_rank = 0;
    const char *t = getenv("EPX_TEST_PEER_TIMEOUT_MS");
    if (t && atoi(t) > 0) timeout_ms = atoi(t);
    sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    ASSERT(sh != MAP_FAILED);
    for (int sc = DIE_BETWEEN; sc <= ABORT; sc++) run_scenario((scenario_t)sc);
    /* Every rank killed (their names stay), then a fresh communicator works, and its ranks
     * remove the names the killed ones left. */
    run_scenario(ALL_KILLED);
    run_scenario(ABORT);
    /* A rank gone while the communicator is made: the others fail in time and remove its
     * segment's name. */
    run_scenario(DIES_CREATING);
    test_done(7);
    return 0;
}
