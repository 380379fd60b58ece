/*
 * src/core in one process: status strings, dtypes, tunables, size parsing, the unique id's
 * text form (round trip and malformed input), and the bootstrap with ranks as threads
 * (allgather, alltoall, barrier, a rank-count mismatch that fails every rank, and a rank
 * that leaves before a round: every other rank of the round fails at once, not at its
 * timeout), and its direct links (rails of simulated hosts: every byte, a failed status, a
 * peer that leaves; the watch that sees it go without reading a round's bytes), and
 * EPX_FAULT's text (every kind, where each fires, what a bad entry says), and arenas
 * (alignment, zeroing, growth into a chain, one block after a reset, overflow).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "api/api.h"
#include "core/core.h"
#include "core/fault.h"
#include "cpu/cpu.h"
#include "cpu/shm.h"
#include "testlib.h"

/* Ranks as threads: fn(args + r * stride) for r < n at once; returns once all have. */
static void run_threads(int n, void *(*fn)(void *), void *args, size_t stride)
{
    pthread_t th[16];
    ASSERT(n <= 16);
    for (int r = 0; r < n; r++) ASSERT(pthread_create(&th[r], NULL, fn, (char *)args + (size_t)r * stride) == 0);
    for (int r = 0; r < n; r++) pthread_join(th[r], NULL);
}

static void test_status(void)
{
    ASSERT(strcmp(epx_status_string(EPX_SUCCESS), "success") == 0);
    ASSERT(strcmp(epx_status_name(EPX_ERR_TIMEOUT), "EPX_ERR_TIMEOUT") == 0);
    ASSERT(strcmp(epx_status_string((epx_status_t)12345), "unknown status") == 0);
    ASSERT_EQ(epx_get_version(), EPX_VERSION_CODE);
    ASSERT_EQ(epx_dtype_size(EPX_BF16), 2);
    ASSERT_EQ(epx_dtype_size(EPX_FP8_E4M3), 1);
    ASSERT_EQ(epx_dtype_size(EPX_I64), 8);
    ASSERT_EQ(epx_dtype_size((epx_dtype_t)99), 0);
    ASSERT(strcmp(epx_dtype_name(EPX_FP8_E4M3), "fp8_e4m3") == 0);
}

static void test_params(void)
{
    int64_t v;
    ASSERT(epx__parse_size("64K", &v) && v == 65536);
    ASSERT(epx__parse_size("3M", &v) && v == 3 << 20);
    ASSERT(epx__parse_size("2G", &v) && v == 2ll << 30);
    ASSERT(epx__parse_size("17", &v) && v == 17);
    ASSERT(!epx__parse_size("", &v));
    ASSERT(!epx__parse_size("-1", &v));
    ASSERT(!epx__parse_size("12X", &v));
    ASSERT(!epx__parse_size("99999999999999999999G", &v));
    ASSERT(epx_param_count() >= 10);
    bool seen_timeout = false;
    for (int i = 0; i < epx_param_count(); i++) {
        epx_param_info_t p;
        ASSERT_OK(epx_param_get(i, &p));
        ASSERT(p.name && strncmp(p.name, "EPX_", 4) == 0 && p.description[0]);
        seen_timeout |= strcmp(p.name, "EPX_TIMEOUT_MS") == 0;
    }
    ASSERT(seen_timeout);
    epx_param_info_t p;
    ASSERT_STATUS(epx_param_get(-1, &p), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_param_get(epx_param_count(), &p), EPX_ERR_INVALID_ARGUMENT);
}

/* Deadlines: a timeout too large to count in nanoseconds (EPX_TIMEOUT_MS=INT64_MAX, meant as
 * "never") is a deadline that never passes, not one that wrapped around into the past: a
 * bootstrap with it completes. */
static void test_deadlines(void)
{
    uint64_t now = epx__now_ns();
    ASSERT(epx__deadline_after_ms(0) <= epx__now_ns());
    ASSERT(epx__deadline_after_ms(1000) >= now + 1000000000ull);
    ASSERT(epx__deadline_after_ms(INT64_MAX) > now + (uint64_t)1e18);
    ASSERT(epx__deadline_after_ms(INT64_MAX / 1000000) > now + (uint64_t)1e18);
    ASSERT_EQ(epx__ms_to_ns(-5), 0);
    ASSERT_EQ(epx__ms_to_ns(0), 0);
    ASSERT_EQ(epx__ms_to_ns(1500), 1500000000ull);
    ASSERT_EQ(epx__ms_to_ns(INT64_MAX), UINT64_MAX);
    ASSERT_EQ(epx__ms_to_ns((int64_t)(UINT64_MAX / 1000000ull) + 1), UINT64_MAX);
    epx_unique_id_t id;
    epx__errbuf_t err;
    epx__boot_t *boot;
    int info = 7, all[1];
    ASSERT_OK(epx__boot_create_id(&id, &err));
    ASSERT_OK(epx__boot_init(&boot, 1, 0, &id, &info, sizeof info, all, INT64_MAX, &err));
    ASSERT_EQ(all[0], 7);
    ASSERT_OK(epx__boot_barrier(boot, &err));
    epx__boot_close(boot);
}

static void test_ids(void)
{
    epx_unique_id_t id, back;
    char text[EPX_UNIQUE_ID_STRLEN];
    ASSERT_OK(epx_get_unique_id(&id));
    ASSERT_OK(epx_unique_id_to_string(&id, text, sizeof text));
    ASSERT(strncmp(text, "epx1:127.0.0.1:", 15) == 0);
    ASSERT_OK(epx_unique_id_from_string(text, &back));
    ASSERT(memcmp(&id, &back, sizeof id) == 0);
    ASSERT_OK(epx_unique_id_from_string("epx1:[::1]:80:00000000000000ff", &back));
    ASSERT_STATUS(epx_unique_id_to_string(&id, text, 10), EPX_ERR_INVALID_ARGUMENT);
    static const char *bad[] = {"", "epx1:", "epx2:127.0.0.1:80:0123456789abcdef", "epx1:127.0.0.1:0:0123456789abcdef",
                                "epx1:127.0.0.1:65536:0123456789abcdef", "epx1:127.0.0.1:80:0123456789abcde",
                                "epx1:127.0.0.1:80:0123456789abcdefa", "epx1:300.0.0.1:80:0123456789abcdef",
                                "epx1:[::1:80:0123456789abcdef", "epx1:127.0.0.1::0123456789abcdef",
                                "epx1:127.0.0.1:80:0123456789abcdeg", "epx1:127.0.0.1:80"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ASSERT_STATUS(epx_unique_id_from_string(bad[i], &back), EPX_ERR_INVALID_ARGUMENT);
    epx_unique_id_t zero;
    memset(&zero, 0, sizeof zero);
    epx_comm_t comm;
    ASSERT_STATUS(epx_comm_init_rank(&comm, 1, 0, &zero, NULL), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_comm_init_rank(&comm, 2, 2, &id, NULL), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_comm_init_rank(&comm, 0, 0, &id, NULL), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_comm_init_rank(NULL, 1, 0, &id, NULL), EPX_ERR_INVALID_ARGUMENT);
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.size = 3;
    ASSERT_STATUS(epx_comm_init_rank(&comm, 1, 0, &id, &cfg), EPX_ERR_INVALID_ARGUMENT);
    cfg = (epx_config_t)EPX_CONFIG_INITIALIZER;
    cfg.timeout_ms = -5;
    ASSERT_STATUS(epx_comm_init_rank(&comm, 1, 0, &id, &cfg), EPX_ERR_INVALID_ARGUMENT);
}

typedef struct {
    epx_unique_id_t id;
    int rank, nranks_claimed;
    epx_status_t status;
    int64_t timeout_ms;
    int delay_ms; /* before it starts */
    double ms;    /* how long its creation took */
} boot_arg_t;

static void *boot_thread(void *argp)
{
    boot_arg_t *a = argp;
    int info = 1000 + a->rank, all[8];
    epx__boot_t *boot;
    epx__errbuf_t err;
    usleep((useconds_t)a->delay_ms * 1000);
    double t0 = test_now_ms();
    a->status = epx__boot_init(&boot, a->nranks_claimed, a->rank, &a->id, &info, sizeof info, all, a->timeout_ms, &err);
    a->ms = test_now_ms() - t0;
    if (a->status != EPX_SUCCESS) return NULL;
    for (int r = 0; r < a->nranks_claimed; r++) ASSERT_EQ(all[r], 1000 + r);
    int mine = a->rank * 7, got[8];
    ASSERT_OK(epx__boot_allgather(boot, &mine, got, sizeof mine, &err));
    for (int r = 0; r < a->nranks_claimed; r++) ASSERT_EQ(got[r], r * 7);
    /* A sum longer than the root's bounce buffer, then a round the last rank takes part in
     * without buffers: everyone sees its part and the round ends. */
    int64_t v[1100];
    for (int i = 0; i < 1100; i++) v[i] = i * (a->rank + 1);
    ASSERT_OK(epx__boot_allreduce_sum(boot, v, 1100, &err));
    int64_t R = a->nranks_claimed;
    for (int i = 0; i < 1100; i++) ASSERT_EQ(v[i], (int64_t)i * R * (R + 1) / 2);
    int64_t part[3] = {a->rank + 1, 5, 6}, parts[8 * 3];
    int f = R > 2 ? 0 : (int)R - 1; /* rank 0 relays: the others then get zeros but its part */
    if (a->rank == f)
        ASSERT_OK(epx__boot_allgather_fail(boot, part, sizeof part[0], sizeof part, &err));
    else
        ASSERT_OK(epx__boot_allgather(boot, part, parts, sizeof part, &err));
    for (int r = 0; r < R && a->rank != f; r++) {
        ASSERT_EQ(parts[r * 3], r == f || f != 0 ? r + 1 : 0);
        ASSERT_EQ(parts[r * 3 + 1], r == f || f == 0 ? 0 : 5);
    }
    ASSERT_OK(epx__boot_barrier(boot, &err));
    epx__boot_close(boot);
    return NULL;
}

/* Ranks from `late` on start 300 ms after the others; every rank must be done in 2 s. */
static void run_boot_id(const epx_unique_id_t *idp, int nranks, const int *claimed, epx_status_t expect,
                        int64_t timeout_ms, int late)
{
    epx_unique_id_t id = *idp;
    boot_arg_t args[8];
    for (int r = 0; r < nranks; r++) {
        args[r] = (boot_arg_t){id, r, claimed[r], EPX_SUCCESS, timeout_ms, r >= late ? 300 : 0, 0};
    }
    run_threads(nranks, boot_thread, args, sizeof args[0]);
    for (int r = 0; r < nranks; r++) {
        ASSERT_STATUS(args[r].status, expect);
        if (args[r].ms > 2000) TEST_FAIL_("rank %d of %d took %.0f ms to get %s", r, nranks, args[r].ms, epx_status_name(expect));
    }
}

static void run_boot(int nranks, const int *claimed, epx_status_t expect)
{
    epx_unique_id_t id;
    ASSERT_OK(epx_get_unique_id(&id));
    run_boot_id(&id, nranks, claimed, expect, 5000, nranks);
}

typedef struct {
    epx_unique_id_t id;
    int rank;
    epx_status_t st;
    double ms;
    char msg[512];
} missing_arg_t;

static void *missing_thread(void *p)
{
    missing_arg_t *a = p;
    int info = 1, all[4];
    epx__boot_t *boot = NULL;
    epx__errbuf_t err;
    memset(&err, 0, sizeof err);
    double t0 = test_now_ms();
    a->st = epx__boot_init(&boot, 4, a->rank, &a->id, &info, sizeof info, all, 800, &err);
    a->ms = test_now_ms() - t0;
    snprintf(a->msg, sizeof a->msg, "%s", err.msg);
    if (a->st == EPX_SUCCESS) epx__boot_close(boot);
    return NULL;
}

/* Ranks 0 and 1 of 4 come, 2 and 3 never: both fail with EPX_ERR_TIMEOUT about their
 * timeout (800 ms), and the message says how many ranks never came and names the first. */
static void test_missing_rank(void)
{
    missing_arg_t a[2];
    epx_unique_id_t id;
    ASSERT_OK(epx_get_unique_id(&id));
    for (int r = 0; r < 2; r++) {
        a[r] = (missing_arg_t){id, r, EPX_SUCCESS, 0, ""};
    }
    run_threads(2, missing_thread, a, sizeof a[0]);
    for (int r = 0; r < 2; r++) {
        ASSERT_STATUS(a[r].st, EPX_ERR_TIMEOUT);
        if (!strstr(a[r].msg, "2 of 4 ranks never reached the rendezvous") || !strstr(a[r].msg, "(rank 2 and others)"))
            TEST_FAIL_("rank %d: the timeout does not name the missing ranks: %s", r, a[r].msg);
        if (a[r].ms > 2000) TEST_FAIL_("rank %d: timed out after %.0f ms (timeout 800 ms)", r, a[r].ms);
    }
}

/* The rendezvous address takes no connection (its accept queue is full, as at a host that
 * drops SYNs): creation ends at its timeout, not after the kernel's SYN retries (~2 min). */
static void test_connect_bounded(void)
{
    int l = socket(AF_INET, SOCK_STREAM, 0), s[2];
    struct sockaddr_in a = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    socklen_t alen = sizeof a;
    ASSERT(bind(l, (struct sockaddr *)&a, sizeof a) == 0 && listen(l, 0) == 0);
    ASSERT(getsockname(l, (struct sockaddr *)&a, &alen) == 0);
    for (int i = 0; i < 2; i++) { /* fill the queue; nobody accepts */
        s[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        connect(s[i], (struct sockaddr *)&a, sizeof a);
    }
    usleep(100 * 1000);
    char text[EPX_UNIQUE_ID_STRLEN];
    snprintf(text, sizeof text, "epx1:127.0.0.1:%u:0123456789abcdef", (unsigned)ntohs(a.sin_port));
    epx_unique_id_t id;
    ASSERT_OK(epx_unique_id_from_string(text, &id));
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.timeout_ms = 1000;
    epx_comm_t comm;
    double t0 = test_now_ms();
    ASSERT_STATUS(epx_comm_init_rank(&comm, 2, 1, &id, &cfg), EPX_ERR_TIMEOUT);
    double ms = test_now_ms() - t0;
    if (ms > 5000) TEST_FAIL_("creation with a 1 s timeout took %.0f ms (connect not bounded)", ms);
    close(s[0]), close(s[1]), close(l);
}

/* Connections to the rendezvous port that are not ranks (a port scanner that connects and
 * waits, a client that sends a few bytes of something else): the ranks behind them meet at
 * once, not after the listener gave up on the strays (10 s), nor at their timeout (3 s). */
static void test_stray_connections(void)
{
    epx_unique_id_t id;
    char text[EPX_UNIQUE_ID_STRLEN];
    ASSERT_OK(epx_get_unique_id(&id));
    ASSERT_OK(epx_unique_id_to_string(&id, text, sizeof text));
    unsigned port = 0;
    ASSERT(sscanf(text, "epx1:127.0.0.1:%u:", &port) == 1);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    int s[3];
    for (int i = 0; i < 3; i++) {
        s[i] = socket(AF_INET, SOCK_STREAM, 0);
        ASSERT(connect(s[i], (struct sockaddr *)&a, sizeof a) == 0);
        if (i == 1) ASSERT(write(s[i], "GET / HTTP/1.0\r\n", 16) == 16);
    }
    usleep(100 * 1000); /* the listener has them before the ranks come */
    int two[] = {2, 2};
    double t0 = test_now_ms();
    run_boot_id(&id, 2, two, EPX_SUCCESS, 3000, 2);
    double ms = test_now_ms() - t0;
    if (ms > 2000) TEST_FAIL_("2 ranks took %.0f ms to meet behind stray connections", ms);
    for (int i = 0; i < 3; i++) close(s[i]);
}

/* A rank (`gone`) that closes its bootstrap instead of taking part in the next round (an
 * allgather, or with `sum` an allreduce): every other rank's round fails with
 * EPX_ERR_PEER_FAILURE well before the 5 s timeout, whichever rank waits on whom. */
typedef struct {
    epx_unique_id_t id;
    int rank, nranks, gone;
    bool sum;
    pthread_barrier_t *stay; /* the others keep their bootstrap open until all are done */
    epx_status_t status;
    double ms;
} leave_arg_t;

static void *leave_thread(void *argp)
{
    leave_arg_t *a = argp;
    int info = a->rank, all[8];
    epx__boot_t *boot;
    epx__errbuf_t err;
    ASSERT_OK(epx__boot_init(&boot, a->nranks, a->rank, &a->id, &info, sizeof info, all, 5000, &err));
    ASSERT_OK(epx__boot_barrier(boot, &err));
    double t0 = test_now_ms();
    if (a->rank != a->gone) {
        int64_t v[4] = {1, 2, 3, 4}, got[8 * 4];
        a->status =
            a->sum ? epx__boot_allreduce_sum(boot, v, 4, &err) : epx__boot_allgather(boot, v, got, sizeof v, &err);
    }
    a->ms = test_now_ms() - t0;
    if (a->rank != a->gone) pthread_barrier_wait(a->stay); /* no close tells anyone */
    epx__boot_close(boot);
    return NULL;
}

/* Block q of rank r's send buffer in the alltoall tests: pseudo-random bytes of (round, r, q). */
static void a2a_fill(unsigned char *buf, size_t len, int round, int r, int q)
{
    uint64_t s = test_mix((uint64_t)round, (uint64_t)r, (uint64_t)q, len), w = 0;
    for (size_t i = 0; i < len; i++) {
        if (i % 8 == 0) w = test_rand(&s);
        buf[i] = (unsigned char)(w >> (i % 8 * 8));
    }
}

typedef struct {
    epx_unique_id_t id;
    int rank, nranks;
} a2a_arg_t;

/* Rounds of epx__boot_alltoall with block sizes 0, odd and 100 KB, each block checked byte
 * for byte; then one round per failing rank f (rank 0 and the last) where f takes part
 * through epx__boot_alltoall_fail: the others see f's head and zeros in its block (and, when
 * rank 0 relays so, zeros in every other block too), and a healthy round follows. */
static void *a2a_thread(void *argp)
{
    a2a_arg_t *a = argp;
    int R = a->nranks, me = a->rank, info = me, all[8];
    epx__boot_t *boot;
    epx__errbuf_t err;
    ASSERT_OK(epx__boot_init(&boot, R, me, &a->id, &info, sizeof info, all, 10000, &err));
    static const size_t lens[] = {0, 1, 13, 8, 100000, 24};
    size_t most = 100000;
    unsigned char *send = malloc((size_t)R * most), *recv = malloc((size_t)R * most), *want = malloc(most);
    ASSERT(send && recv && want);
    int round = 0;
    for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++, round++) {
        size_t len = lens[k];
        for (int q = 0; q < R; q++) a2a_fill(send + (size_t)q * len, len, round, me, q);
        memset(recv, 0xa5, (size_t)R * most);
        ASSERT_OK(epx__boot_alltoall(boot, send, recv, len, &err));
        for (int r = 0; r < R; r++) {
            a2a_fill(want, len, round, r, me);
            ASSERT(memcmp(recv + (size_t)r * len, want, len) == 0);
        }
        if (len < most) ASSERT_EQ(recv[(size_t)R * len], 0xa5); /* nothing past the R blocks */
    }
    int fails[2] = {0, R - 1};
    for (int n = 0; n < (R > 1 ? 2 : 1); n++, round++) {
        int f = fails[n];
        size_t len = 40;
        int64_t head[2] = {-(int64_t)(f + 1), 1234};
        if (me == f) {
            ASSERT_OK(epx__boot_alltoall_fail(boot, head, sizeof head[0], len, &err));
            continue;
        }
        for (int q = 0; q < R; q++) a2a_fill(send + (size_t)q * len, len, round, me, q);
        ASSERT_OK(epx__boot_alltoall(boot, send, recv, len, &err));
        for (int r = 0; r < R; r++) {
            unsigned char *got = recv + (size_t)r * len;
            if (r == f || f == 0) {
                int64_t h;
                memcpy(&h, got, sizeof h);
                ASSERT_EQ(h, r == f ? head[0] : 0);
                for (size_t i = sizeof h; i < len; i++) ASSERT_EQ(got[i], 0);
            } else {
                a2a_fill(want, len, round, r, me);
                ASSERT(memcmp(got, want, len) == 0);
            }
        }
    }
    for (int q = 0; q < R; q++) a2a_fill(send + (size_t)q * 5, 5, round, me, q);
    ASSERT_OK(epx__boot_alltoall(boot, send, recv, 5, &err));
    for (int r = 0; r < R; r++) {
        a2a_fill(want, 5, round, r, me);
        ASSERT(memcmp(recv + (size_t)r * 5, want, 5) == 0);
    }
    free(send), free(recv), free(want);
    epx__boot_close(boot);
    return NULL;
}

static void run_boot_leave(int nranks, int gone, bool sum)
{
    epx_unique_id_t id;
    ASSERT_OK(epx_get_unique_id(&id));
    leave_arg_t args[8];
    pthread_barrier_t stay;
    pthread_barrier_init(&stay, NULL, (unsigned)nranks - 1);
    for (int r = 0; r < nranks; r++) {
        args[r] = (leave_arg_t){id, r, nranks, gone, sum, &stay, EPX_SUCCESS, 0};
    }
    run_threads(nranks, leave_thread, args, sizeof args[0]);
    pthread_barrier_destroy(&stay);
    for (int r = 0; r < nranks; r++) {
        if (r == gone) continue;
        ASSERT_STATUS(args[r].status, EPX_ERR_PEER_FAILURE);
        if (args[r].ms > 2000) TEST_FAIL_("rank %d failed its round after %.0f ms (rank %d left)", r, args[r].ms, gone);
    }
}

static void run_alltoall(int nranks)
{
    epx_unique_id_t id;
    ASSERT_OK(epx_get_unique_id(&id));
    a2a_arg_t args[8];
    for (int r = 0; r < nranks; r++) {
        args[r] = (a2a_arg_t){id, r, nranks};
    }
    run_threads(nranks, a2a_thread, args, sizeof args[0]);
}

/* Direct links along rails: ranks as NH hosts of LS, rank h * LS + i linked with every
 * (g, i). Rounds of 0, odd and 300 KB messages (past the socket buffers: the links must run
 * full duplex), each message checked byte for byte; a round where rank `bad` sends a failed
 * status and no buffers nor length (its peers get EPX_ERR_REMOTE_INVALID, and it drops what
 * the others sent: the links stay in step, a healthy round follows), then a timeout (EPX_ERR_PEER_FAILURE); then rank `bad` leaves: its peers' watch
 * (epx__boot_links_watch) says so within milliseconds, and their round fails at once with
 * EPX_ERR_PEER_FAILURE, well before the 5 s timeout. Before that the watch on live links:
 * idle, and with a peer's round waiting unread, which it leaves for the round. */
typedef struct {
    epx_unique_id_t id;
    int rank, NH, LS, bad;
    pthread_barrier_t *stay;
} links_arg_t;

static void *links_thread(void *argp)
{
    links_arg_t *a = argp;
    int R = a->NH * a->LS, me = a->rank, info = me, all[16], peers[16], n = 0;
    epx__boot_t *boot;
    epx__boot_links_t *links;
    epx__errbuf_t err;
    ASSERT_OK(epx__boot_init(&boot, R, me, &a->id, &info, sizeof info, all, 5000, &err));
    for (int h = 0; h < a->NH; h++)
        if (h != me / a->LS) peers[n++] = h * a->LS + me % a->LS;
    ASSERT_OK(epx__boot_links_create(boot, peers, n, &links, &err));
    static const size_t lens[] = {0, 13, 300000, 8};
    size_t most = 300000;
    unsigned char *buf = malloc(2 * (size_t)n * most + most), *want = buf + 2 * (size_t)n * most;
    const void *sp[16];
    void *rp[16];
    ASSERT(buf);
    for (int k = 0; k < 4; k++) {
        size_t len = lens[k];
        for (int i = 0; i < n; i++) {
            sp[i] = buf + (size_t)i * most, rp[i] = buf + (size_t)(n + i) * most;
            a2a_fill((unsigned char *)sp[i], len, 100 + k, me, peers[i]);
            memset(rp[i], 0xa5, most);
        }
        ASSERT_OK(epx__boot_links_xchg(links, EPX_SUCCESS, sp, rp, len, &err));
        for (int i = 0; i < n; i++) {
            a2a_fill(want, len, 100 + k, peers[i], me);
            ASSERT(memcmp(rp[i], want, len) == 0);
            if (len < most) ASSERT_EQ(((unsigned char *)rp[i])[len], 0xa5);
        }
    }
    /* The watch: a live idle link is fine; so is one with a peer's round waiting unread (the
     * ranks of host 1 come late to this round), and the round then gets every byte. */
    ASSERT_OK(epx__boot_links_watch(links, &err));
    if (me / a->LS == 1) {
        nanosleep(&(struct timespec){0, 20 * 1000000}, NULL); /* the others' messages are in by now */
        for (int k = 0; k < 3; k++) ASSERT_OK(epx__boot_links_watch(links, &err));
    }
    for (int i = 0; i < n; i++) a2a_fill((unsigned char *)sp[i], 1000, 200, me, peers[i]), memset(rp[i], 0xa5, 1000);
    ASSERT_OK(epx__boot_links_xchg(links, EPX_SUCCESS, sp, rp, 1000, &err));
    for (int i = 0; i < n; i++) {
        a2a_fill(want, 1000, 200, peers[i], me);
        ASSERT(memcmp(rp[i], want, 1000) == 0);
    }
    ASSERT_OK(epx__boot_links_watch(links, &err));
    /* A failed status: no data from it; the others' still arrive at it (into nothing). */
    bool linked_to_bad = false;
    for (int i = 0; i < n; i++) linked_to_bad = linked_to_bad || peers[i] == a->bad;
    epx_status_t st = epx__boot_links_xchg(links, me == a->bad ? EPX_ERR_NO_MEMORY : EPX_SUCCESS,
                                           me == a->bad ? NULL : sp, me == a->bad ? NULL : rp, me == a->bad ? 0 : 77,
                                           &err);
    ASSERT_STATUS(st, linked_to_bad ? EPX_ERR_REMOTE_INVALID : EPX_SUCCESS);
    ASSERT_OK(epx__boot_links_xchg(links, EPX_SUCCESS, sp, rp, 5, &err));
    /* A round that broke behind a peer (its status a timeout) reads as a peer failure. */
    st = epx__boot_links_xchg(links, me == a->bad ? EPX_ERR_TIMEOUT : EPX_SUCCESS, sp, rp, 3, &err);
    ASSERT_STATUS(st, linked_to_bad ? EPX_ERR_PEER_FAILURE : EPX_SUCCESS);
    ASSERT_OK(epx__boot_links_xchg(links, EPX_SUCCESS, sp, rp, 5, &err));
    /* The bad rank leaves. */
    if (me == a->bad) {
        epx__boot_links_close(links);
    } else {
        double t0 = test_now_ms();
        /* Its peers' watch sees it go, polled every millisecond as a wait would. */
        double ms = 0;
        for (st = EPX_SUCCESS; linked_to_bad && st == EPX_SUCCESS && ms < 2000;) {
            st = epx__boot_links_watch(links, &err);
            nanosleep(&(struct timespec){0, 1000000}, NULL);
            ms = test_now_ms() - t0;
        }
        if (linked_to_bad) {
            ASSERT_STATUS(st, EPX_ERR_PEER_FAILURE);
            if (ms > 500) TEST_FAIL_("rank %d's watch saw rank %d leave after %.0f ms", me, a->bad, ms);
            ASSERT_STATUS(epx__boot_links_watch(links, &err), EPX_ERR_PEER_FAILURE); /* and still does */
        } else {
            ASSERT_OK(epx__boot_links_watch(links, &err));
        }
        t0 = test_now_ms();
        st = epx__boot_links_xchg(links, EPX_SUCCESS, sp, rp, 64, &err);
        ms = test_now_ms() - t0;
        ASSERT_STATUS(st, linked_to_bad ? EPX_ERR_PEER_FAILURE : EPX_SUCCESS);
        if (ms > 2000) TEST_FAIL_("rank %d failed its round after %.0f ms (rank %d left)", me, ms, a->bad);
        pthread_barrier_wait(a->stay);
        epx__boot_links_close(links);
    }
    free(buf);
    epx__boot_close(boot);
    return NULL;
}

static void run_links(int NH, int LS, int bad)
{
    epx_unique_id_t id;
    ASSERT_OK(epx_get_unique_id(&id));
    int R = NH * LS;
    links_arg_t args[16];
    pthread_barrier_t stay;
    pthread_barrier_init(&stay, NULL, (unsigned)R - 1);
    for (int r = 0; r < R; r++) {
        args[r] = (links_arg_t){id, r, NH, LS, bad, &stay};
    }
    run_threads(R, links_thread, args, sizeof args[0]);
    pthread_barrier_destroy(&stay);
}

/* epx_moe_device_memory: grows with the shape; bad configurations rejected; without CUDA
 * in the build it says so. The CUDA alltoallv_device refuses the CPU backend. */
static void test_moe_memory(void)
{
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = 7168, cfg.max_tokens_per_rank = 4096, cfg.num_experts = 256, cfg.max_topk = 8;
    int64_t a = -1;
#ifdef EPX_HAVE_CUDA
    int64_t b = -1;
    ASSERT_OK(epx_moe_device_memory(&cfg, 2, &a));
    ASSERT_OK(epx_moe_device_memory(&cfg, 8, &b));
    ASSERT(a > 0 && b > a && b < ((int64_t)1 << 30)); /* the bound: <= 1 GiB per rank */
#else
    ASSERT_STATUS(epx_moe_device_memory(&cfg, 2, &a), EPX_ERR_UNSUPPORTED);
#endif
    ASSERT_STATUS(epx_moe_device_memory(&cfg, 3, &a), EPX_ERR_INVALID_ARGUMENT); /* 256 % 3 */
    ASSERT_STATUS(epx_moe_device_memory(&cfg, 0, &a), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_moe_device_memory(NULL, 2, &a), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_moe_device_memory(&cfg, 2, NULL), EPX_ERR_INVALID_ARGUMENT);
    /* Low latency: ranks x max_tokens_per_rank slots per expert, at most 2^30. */
    cfg.mode = EPX_MOE_LOW_LATENCY, cfg.max_tokens_per_rank = 1 << 24;
    ASSERT_STATUS(epx_moe_device_memory(&cfg, 128, &a), EPX_ERR_INVALID_ARGUMENT);
    ASSERT(epx_moe_device_memory(&cfg, 64, &a) != EPX_ERR_INVALID_ARGUMENT);
}

/* EPX_FAULT's text: every kind, where each may fire, and what a bad entry says. Only
 * epx__fault_due is used (it marks nothing fired). */
static void test_fault_parse(void)
{
    epx__fault_t f;
    epx__errbuf_t err;
    epx__fault_spec_t s;
    ASSERT_OK(epx__fault_parse("", 0, &f, &err));
    ASSERT(!f.armed);
    ASSERT_OK(epx__fault_parse("delay:rank=1,step=2,ms=5; fail:rank=0,step=3", 0, &f, &err));
    ASSERT(f.armed);
    ASSERT_EQ(f.n, 2);
    ASSERT(epx__fault_due(&f, EPX__FAULT_FAIL, 3, EPX__FAULT_AT_ENQUEUE, &s)); /* fail: at=enqueue by default */
    ASSERT(!epx__fault_due(&f, EPX__FAULT_FAIL, 3, EPX__FAULT_AT_HOST, &s));
    ASSERT(!epx__fault_due(&f, EPX__FAULT_FAIL, 2, EPX__FAULT_AT_ENQUEUE, &s));
    ASSERT(!epx__fault_due(&f, EPX__FAULT_DELAY, 2, EPX__FAULT_AT_HOST, &s)); /* aimed at rank 1 */
    ASSERT_OK(epx__fault_parse("fail:rank=2,step=1,at=enqueue;kill:rank=2,step=4,at=launched", 2, &f, &err));
    ASSERT(epx__fault_due(&f, EPX__FAULT_KILL, 4, EPX__FAULT_AT_LAUNCHED, &s));
    ASSERT_OK(epx__fault_parse("delay:rank=0,step=2,ms=7,at=mapped", 0, &f, &err));
    ASSERT(epx__fault_due(&f, EPX__FAULT_DELAY, 2, EPX__FAULT_AT_MAPPED, &s));
    ASSERT_EQ(s.ms, 7);
    ASSERT(!epx__fault_due(&f, EPX__FAULT_DELAY, 2, EPX__FAULT_AT_HOST, &s));
    ASSERT(!epx__fault_due(&f, EPX__FAULT_DELAY, 2, EPX__FAULT_AT_ENQUEUE, &s));
    ASSERT_OK(epx__fault_parse("kill:rank=1,step=0", 1, &f, &err)); /* the creation */
    ASSERT(epx__fault_due(&f, EPX__FAULT_KILL, 0, EPX__FAULT_AT_HOST, &s));
    ASSERT(!epx__fault_due(&f, EPX__FAULT_KILL, 1, EPX__FAULT_AT_HOST, &s));
    ASSERT_OK(epx__fault_parse("slow:rank=0,step=3,ms=9", 0, &f, &err));
    ASSERT(epx__fault_due(&f, EPX__FAULT_SLOW, 3, EPX__FAULT_AT_HOST, &s));
    ASSERT_EQ(s.ms, 9);
    ASSERT(!epx__fault_due(&f, EPX__FAULT_SLOW, 2, EPX__FAULT_AT_HOST, &s));
    static const struct {
        const char *text, *says;
    } bad[] = {
        {"fail:rank=0,step=1,at=host", "only enqueue"},
        {"delay:rank=0,step=1,ms=1,at=launched", "host, mapped or enqueue"},
        {"kill:rank=0,step=1,at=later", "host, mapped, enqueue or launched"},
        {"count:rank=0,step=1,at=enqueue", "unknown key"},
        {"crash:rank=0,step=1", "delay, kill, count, fail, nomem or slow"},
        {"slow:rank=0,step=1,ms=1,at=enqueue", "unknown key"},
        {"slow:rank=0,step=1", "and ms=M"},
        {"nomem:rank=0,step=1,at=host", "unknown key"},
        {"fail:rank=0", "needs rank=R and step=N"},
        {"kill:rank=0", "needs rank=R and step=N"},
        {"fail:rank=0,step=0", "takes only kill at host"},
        {"kill:rank=0,step=0,at=enqueue", "takes only kill at host"},
        {"kill:rank=0,step=-1", "out of range"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ASSERT_STATUS(epx__fault_parse(bad[i].text, 0, &f, &err), EPX_ERR_INVALID_ARGUMENT);
        if (!strstr(err.msg, bad[i].says)) TEST_FAIL_("EPX_FAULT=\"%s\": %s (expected \"%s\")", bad[i].text, err.msg, bad[i].says);
        ASSERT(!f.armed);
    }
}

/* Arenas: every allocation aligned, disjoint from the others and writable; zeroed when
 * asked; a use that outgrew its block gets one block of the whole after a reset, and from
 * then on the same use takes no new memory (the same addresses again). */
static void test_arena(void)
{
    epx__arena_t a = {NULL, 0};
    ASSERT_EQ(epx__arena_capacity(&a), 0);
    char *p[40], *prev = NULL;
    size_t n[40];
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 40; i++) {
            n[i] = (size_t)(i * 7919) % 50000; /* 0 included; about 1 MB in all: several blocks */
            p[i] = epx__arena_alloc(&a, n[i], 1, i % 2 == 0);
            ASSERT(p[i] != NULL);
            ASSERT_EQ((uintptr_t)p[i] % 64, 0);
            for (size_t j = 0; j < n[i] && i % 2 == 0; j++)
                if (p[i][j]) TEST_FAIL_("round %d: allocation %d byte %zu not zeroed", round, i, j);
            memset(p[i], 0x5a ^ i, n[i]);
        }
        for (int i = 0; i < 40; i++)
            for (size_t j = 0; j < n[i]; j++)
                if (p[i][j] != (char)(0x5a ^ i)) TEST_FAIL_("round %d: allocation %d overwritten at %zu", round, i, j);
        if (round == 2) ASSERT(p[0] == prev); /* one block since round 1: the same memory */
        prev = p[0];
        epx__arena_reset(&a);
        size_t used = 0;
        for (int i = 0; i < 40; i++) used += n[i];
        ASSERT(used > 512 * 1024 && epx__arena_capacity(&a) >= used);
    }
    ASSERT(epx__arena_alloc(&a, SIZE_MAX / 2, 4, false) == NULL);
    ASSERT(epx__arena_alloc(&a, 3, SIZE_MAX / 2, false) == NULL);
    epx__arena_free(&a);
    ASSERT_EQ(epx__arena_capacity(&a), a.want);
    /* A reservation: the allocations it covers follow one another in one block (none of them
     * allocates), whatever the arena held before; one past it may take a new block. */
    for (int round = 0; round < 3; round++) {
        epx__arena_t r = {NULL, 0};
        size_t m[6] = {0, 1, 64, 65, 100000, 3}, need = 0;
        for (int i = 0; i < round; i++)
            ASSERT(epx__arena_alloc(&r, 60000, 1, false) != NULL);
        for (int i = 0; i < 6; i++)
            need += epx__arena_need(m[i], 8);
        ASSERT_EQ(epx__arena_need(0, 8), 64);
        ASSERT_EQ(epx__arena_need(9, 8), 128);
        ASSERT(epx__arena_reserve(&r, need));
        char *q = epx__arena_alloc(&r, m[0], 8, false), *next = q + epx__arena_need(m[0], 8);
        for (int i = 1; i < 6; i++) {
            q = epx__arena_alloc(&r, m[i], 8, true);
            if (q != next)
                TEST_FAIL_("round %d: reserved allocation %d at %p, expected %p", round, i, (void *)q, (void *)next);
            next = q + epx__arena_need(m[i], 8);
        }
        epx__arena_free(&r);
    }
    ASSERT(!epx__arena_reserve(&a, SIZE_MAX - 8));
    ASSERT_EQ(epx__arena_need(3, SIZE_MAX / 2), SIZE_MAX);
}

/* Registered regions: an address is in a region only from its base up to, not including,
 * its end: one past the end, even with length 0, is not (it may be the next region's start,
 * and the staging copy was once found so in its neighbour). Regions of every size class,
 * each looked up at its base, inside, at its last byte and one past its end. */
static void test_region_find(void)
{
    epx_unique_id_t id;
    epx__errbuf_t err;
    epx__boot_t *boot;
    int info = 0, all[1];
    ASSERT_OK(epx__boot_create_id(&id, &err));
    ASSERT_OK(epx__boot_init(&boot, 1, 0, &id, &info, sizeof info, all, 5000, &err));
    epx__cpu_t *c;
    ASSERT_OK(epx__cpu_create(&c, boot, 0, 1, epx__id_nonce(&id), 5000, NULL, &err));
    char *r[6];
    size_t size[6] = {4096, 4096, 8192, 65536, 4096, 12288};
    for (int i = 0; i < 6; i++) ASSERT_OK(epx__cpu_mem_alloc(c, size[i], (void **)&r[i], &err));
    for (int i = 0; i < 6; i++) {
        epx__loc_t loc, base;
        ASSERT(epx__region_find(c, r[i], size[i], &base));
        ASSERT(base.kind == EPX__LOC_REGION && base.addr == 0 && base.region_size == size[i]);
        ASSERT(epx__region_find(c, r[i] + 100, 0, &loc) && loc.region_id == base.region_id && loc.addr == 100);
        ASSERT(epx__region_find(c, r[i] + size[i] - 1, 1, &loc) && loc.region_id == base.region_id);
        ASSERT(!epx__region_find(c, r[i], size[i] + 1, &loc));
        bool found = epx__region_find(c, r[i] + size[i], 0, &loc);
        if (found && loc.region_id == base.region_id)
            TEST_FAIL_("region %d: the address one past its end was found in it", i);
        if (found && loc.addr >= loc.region_size) TEST_FAIL_("region %d's end found past another region's end", i);
    }
    epx__cpu_destroy(c, false);
    epx__boot_close(boot);
}

/* src/cpu: a rank whose wait for a peer failed gives up on the communicator at once. Its
 * next operation fails at once with the same status and message instead of waiting one
 * more timeout (a CUDA call makes several host rounds), and the late peer, when it comes,
 * fails at once with EPX_ERR_PEER_FAILURE instead of reading what the others posted. The
 * last rank starts its first exchange GIVEUP_LATE_MS after the others (timeout 300 ms). */
#define GIVEUP_TIMEOUT_MS 300
#define GIVEUP_LATE_MS 1000
typedef struct {
    epx_unique_id_t id;
    int rank, nranks;
    pthread_barrier_t *done;
    epx_status_t st[2];
    double ms[2];
    char msg[2][EPX__ERRMSG_LEN];
} giveup_arg_t;

static void *giveup_thread(void *argp)
{
    giveup_arg_t *a = argp;
    int R = a->nranks, me = a->rank, info = me, all[8];
    epx__boot_t *boot;
    epx__cpu_t *c;
    epx__errbuf_t err;
    ASSERT_OK(epx__boot_init(&boot, R, me, &a->id, &info, sizeof info, all, 10000, &err));
    ASSERT_OK(epx__cpu_create(&c, boot, me, R, epx__id_nonce(&a->id), GIVEUP_TIMEOUT_MS, NULL, &err));
    bool late = me == R - 1;
    if (late) usleep(GIVEUP_LATE_MS * 1000);
    int64_t bytes[8], displ[8];
    int32_t send[8], recv[8];
    for (int p = 0; p < R; p++) bytes[p] = 4, displ[p] = 4 * p, send[p] = me * 100 + p;
    epx__cpu_xfer_t x = {send, bytes, displ, recv, bytes, displ};
    for (int k = 0; k < (late ? 1 : 2); k++) {
        double t0 = test_now_ms();
        a->st[k] = epx__cpu_alltoallv(c, &x, EPX_SUCCESS, &err);
        a->ms[k] = test_now_ms() - t0;
        memcpy(a->msg[k], err.msg, sizeof err.msg);
    }
    pthread_barrier_wait(a->done);
    epx__cpu_destroy(c, false);
    epx__boot_close(boot);
    return NULL;
}

static void run_give_up(int R)
{
    epx_unique_id_t id;
    ASSERT_OK(epx_get_unique_id(&id));
    giveup_arg_t args[8];
    pthread_barrier_t done;
    pthread_barrier_init(&done, NULL, (unsigned)R);
    for (int r = 0; r < R; r++) {
        memset(&args[r], 0, sizeof args[r]);
        args[r].id = id, args[r].rank = r, args[r].nranks = R, args[r].done = &done;
    }
    run_threads(R, giveup_thread, args, sizeof args[0]);
    pthread_barrier_destroy(&done);
    for (int r = 0; r < R - 1; r++) {
        giveup_arg_t *a = &args[r];
        printf("give up, %d ranks: rank %d: %s after %.0f ms, then %s after %.0f ms\n", R, r, epx_status_name(a->st[0]),
               a->ms[0], epx_status_name(a->st[1]), a->ms[1]);
        if (a->st[0] != EPX_ERR_TIMEOUT && a->st[0] != EPX_ERR_PEER_FAILURE)
            TEST_FAIL_("rank %d: the exchange the last rank missed returned %s", r, epx_status_name(a->st[0]));
        ASSERT_STATUS(a->st[1], a->st[0]);
        if (a->ms[1] > 100) TEST_FAIL_("rank %d: the exchange after a failed one took %.0f ms", r, a->ms[1]);
        const char *first = strstr(a->msg[0], ": ");
        if (!first || !strstr(a->msg[1], first + 2))
            TEST_FAIL_("rank %d: the second failure says \"%s\", the first \"%s\"", r, a->msg[1], a->msg[0]);
    }
    giveup_arg_t *late = &args[R - 1];
    printf("give up, %d ranks: the late rank: %s after %.0f ms\n", R, epx_status_name(late->st[0]), late->ms[0]);
    ASSERT_STATUS(late->st[0], EPX_ERR_PEER_FAILURE);
    if (late->ms[0] > 200) TEST_FAIL_("the late rank took %.0f ms to fail", late->ms[0]);
}

/* src/cpu: a rank that gave up writes nothing more. Rank 0 finishes exchange 1, times out in
 * exchange 2 (rank 1 is still a slow reader of exchange 1: EPX_FAULT delay at=enqueue) and
 * makes exchange 3, of the same parity as 1, with other data, as a caller with several
 * rounds per call does. Exchange 3 must fail at once without writing, so that rank 1,
 * reading exchange 1 late (rank 0 had released it), gets rank 0's exchange-1 bytes. */
typedef struct {
    epx_unique_id_t id;
    int rank;
    pthread_barrier_t *done;
    epx_status_t st[3];
    int32_t got[3];
} ahead_arg_t;

static void *ahead_thread(void *argp)
{
    ahead_arg_t *a = argp;
    int me = a->rank, info = me, all[2];
    epx__boot_t *boot;
    epx__cpu_t *c;
    epx__errbuf_t err;
    ASSERT_OK(epx__boot_init(&boot, 2, me, &a->id, &info, sizeof info, all, 10000, &err));
    ASSERT_OK(epx__cpu_create(&c, boot, me, 2, epx__id_nonce(&a->id), GIVEUP_TIMEOUT_MS, NULL, &err));
    epx__fault_t f;
    ASSERT_OK(epx__fault_parse("delay:rank=1,step=1,ms=800,at=enqueue", me, &f, &err));
    epx__cpu_set_fault(c, &f);
    int64_t bytes[2] = {4, 4}, displ[2] = {0, 4};
    int32_t send[2], recv[2];
    epx__cpu_xfer_t x = {send, bytes, displ, recv, bytes, displ};
    for (int k = 0; k < (me == 0 ? 3 : 1); k++) {
        send[0] = send[1] = me * 1000 + k + 1, recv[0] = recv[1] = -1;
        a->st[k] = epx__cpu_alltoallv(c, &x, EPX_SUCCESS, &err);
        a->got[k] = recv[1 - me];
    }
    pthread_barrier_wait(a->done); /* both done before either unmaps */
    epx__cpu_destroy(c, false);
    epx__boot_close(boot);
    return NULL;
}

static void test_give_up_writes_nothing(void)
{
    epx_unique_id_t id;
    ASSERT_OK(epx_get_unique_id(&id));
    ahead_arg_t args[2];
    pthread_barrier_t done;
    pthread_barrier_init(&done, NULL, 2);
    for (int r = 0; r < 2; r++) {
        memset(&args[r], 0, sizeof args[r]);
        args[r].id = id, args[r].rank = r, args[r].done = &done;
    }
    run_threads(2, ahead_thread, args, sizeof args[0]);
    pthread_barrier_destroy(&done);
    printf("give up, then write: rank 0: %s (got %d), %s, %s; the slow reader: %s, got %d\n",
           epx_status_name(args[0].st[0]), args[0].got[0], epx_status_name(args[0].st[1]),
           epx_status_name(args[0].st[2]), epx_status_name(args[1].st[0]), args[1].got[0]);
    ASSERT_STATUS(args[0].st[0], EPX_SUCCESS);
    ASSERT_EQ(args[0].got[0], 1001);
    ASSERT_STATUS(args[0].st[1], EPX_ERR_TIMEOUT);
    ASSERT_STATUS(args[0].st[2], EPX_ERR_TIMEOUT);
    ASSERT_STATUS(args[1].st[0], EPX_SUCCESS); /* rank 0 released exchange 1 before it gave up */
    ASSERT_EQ(args[1].got[0], 1);
}

/* src/api's net (epx__comm_result): a call whose own status does not break the
 * communicator (here EPX_ERR_MISMATCH) while its transport gave up in one of the call's host
 * rounds returns the round's failure and breaks the communicator. Every backend now returns
 * the round's status at its source (3a8e8f4), so the net is reached here directly: rank 0's
 * transport times out in an exchange rank 1 never makes. */
#define NET_TIMEOUT_MS 1000 /* (the communicator's creation too, on a loaded machine) */
typedef struct {
    epx_unique_id_t id;
    int rank;
    pthread_barrier_t *done;
    epx_status_t st, next;
} net_arg_t;

static void *net_thread(void *argp)
{
    net_arg_t *a = argp;
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    cfg.backend = EPX_BACKEND_CPU;
    cfg.timeout_ms = NET_TIMEOUT_MS;
    epx_comm_t comm;
    ASSERT_OK(epx_comm_init_rank(&comm, 2, a->rank, &a->id, &cfg));
    if (a->rank == 0) {
        int64_t bytes[2] = {4, 4}, displ[2] = {0, 4};
        int32_t send[2] = {1, 2}, recv[2];
        epx__cpu_xfer_t x = {send, bytes, displ, recv, bytes, displ};
        epx__errbuf_t err;
        ASSERT_STATUS(epx__cpu_alltoallv(comm->cpu, &x, EPX_SUCCESS, &err), EPX_ERR_TIMEOUT);
        a->st = epx__comm_result(comm, EPX_ERR_MISMATCH);
        a->next = epx_barrier(comm, NULL); /* broken: fails at once */
    }
    pthread_barrier_wait(a->done); /* rank 1 stays until rank 0 is done */
    epx_comm_abort(comm);
    return NULL;
}

static void test_result_net(void)
{
    epx_unique_id_t id;
    ASSERT_OK(epx_get_unique_id(&id));
    net_arg_t args[2];
    pthread_barrier_t done;
    pthread_barrier_init(&done, NULL, 2);
    for (int r = 0; r < 2; r++) {
        args[r] = (net_arg_t){id, r, &done, EPX_SUCCESS, EPX_SUCCESS};
    }
    run_threads(2, net_thread, args, sizeof args[0]);
    pthread_barrier_destroy(&done);
    printf("result net: %s, then %s\n", epx_status_name(args[0].st), epx_status_name(args[0].next));
    ASSERT_STATUS(args[0].st, EPX_ERR_TIMEOUT);
    ASSERT_STATUS(args[0].next, EPX_ERR_TIMEOUT);
}

/* Routing helpers of src/core against definitions written out here: the layout (tokens
 * per rank counted once per rank, per expert once per expert, the token-rank mask) and a
 * token's ranks (distinct, ascending), for rank counts on both sides of the 64-rank bit
 * set, both index dtypes, -1 entries and repeated ids; the id check at its edges; the
 * low-latency slots past the filled ones set to -1, and only those. */
static void test_routing(void)
{
    static const int rank_counts[] = {1, 2, 3, 63, 64, 65, 100, 130};
    uint64_t seed = 4242;
    for (size_t ri = 0; ri < sizeof rank_counts / sizeof rank_counts[0]; ri++)
        for (int L = 1; L <= 3; L += 2)
            for (int it = 0; it < 12; it++) {
                int R = rank_counts[ri], E = R * L, K = 1 + (int)(test_rand(&seed) % EPX_MOE_MAX_TOPK);
                int T = (int)(test_rand(&seed) % 40);
                bool i64 = it % 2;
                int32_t *ids = malloc(sizeof(int32_t) * (size_t)(T * K + 1));
                int64_t *ids64 = malloc(sizeof(int64_t) * (size_t)(T * K + 1));
                int32_t *rank_of = malloc(sizeof(int32_t) * (size_t)E);
                for (int e = 0; e < E; e++) rank_of[e] = e / L;
                for (int i = 0; i < T * K; i++) {
                    uint64_t r = test_rand(&seed);
                    /* -1, a repeat of the token's previous id, or any expert (often a high rank) */
                    int32_t e = (int32_t)(r % (uint64_t)E);
                    if (r >> 60 == 0) e = -1;
                    else if (r >> 60 == 1 && i % K) e = ids[i - 1];
                    else if (r >> 60 == 2) e = E - 1 - (int32_t)((r >> 8) % (uint64_t)L); /* the last rank's */
                    ids[i] = e, ids64[i] = e;
                }
                int32_t *pr = malloc(sizeof(int32_t) * (size_t)R), *pe = malloc(sizeof(int32_t) * (size_t)E);
                int32_t *wr = calloc((size_t)R, sizeof(int32_t)), *we = calloc((size_t)E, sizeof(int32_t));
                uint8_t *ir = malloc((size_t)(T * R + 1)), *wir = calloc((size_t)(T * R + 1), 1);
                for (int t = 0; t < T; t++) {
                    for (int q = 0; q < R; q++)
                        for (int k = 0; k < K; k++)
                            if (ids[t * K + k] >= 0 && ids[t * K + k] / L == q) wir[t * R + q] = 1;
                    for (int q = 0; q < R; q++) wr[q] += wir[t * R + q];
                    for (int e = 0; e < E; e++) {
                        int has = 0;
                        for (int k = 0; k < K; k++) has |= ids[t * K + k] == e;
                        we[e] += has;
                    }
                    /* A token's ranks: distinct, ascending. */
                    int ranks[EPX_MOE_MAX_TOPK], n = epx__topk_ranks(ids + t * K, K, rank_of, R, ranks), j = 0;
                    for (int q = 0; q < R; q++) {
                        if (!wir[t * R + q]) continue;
                        if (j >= n || ranks[j] != q)
                            TEST_FAIL_("R %d L %d token %d: epx__topk_ranks entry %d = %d, expected rank %d (n %d)", R, L,
                                       t, j, j < n ? ranks[j] : -1, q, n);
                        j++;
                    }
                    if (j != n) TEST_FAIL_("R %d L %d token %d: epx__topk_ranks gave %d ranks, expected %d", R, L, t, n, j);
                }
                memset(pr, 0x5a, sizeof(int32_t) * (size_t)R), memset(pe, 0x5a, sizeof(int32_t) * (size_t)E);
                memset(ir, 0x5a, (size_t)(T * R + 1));
                ASSERT_OK(epx__layout(i64 ? (const void *)ids64 : (const void *)ids, i64 ? EPX_I64 : EPX_I32, T, K, E, R,
                                      pr, pe, ir));
                for (int q = 0; q < R; q++)
                    if (pr[q] != wr[q]) TEST_FAIL_("R %d L %d: layout per_rank[%d] = %d, expected %d", R, L, q, pr[q], wr[q]);
                for (int e = 0; e < E; e++)
                    if (pe[e] != we[e]) TEST_FAIL_("R %d L %d: layout per_expert[%d] = %d, expected %d", R, L, e, pe[e], we[e]);
                for (int i = 0; i < T * R; i++)
                    if (ir[i] != wir[i])
                        TEST_FAIL_("R %d L %d: layout in_rank[t %d, r %d] = %d, expected %d", R, L, i / R, i % R, ir[i], wir[i]);
                ASSERT_EQ(ir[T * R], 0x5a);
                free(ids), free(ids64), free(rank_of), free(pr), free(pe), free(wr), free(we), free(ir), free(wir);
            }

    /* The id check: [-1, E) passes, E and -2 (and an int64 id past int32) do not. */
    for (int E = 1; E <= 300; E += 37) {
        int32_t ok32[3] = {-1, 0, E - 1};
        int64_t ok64[3] = {-1, 0, E - 1};
        ASSERT_OK(epx__topk_validate(ok32, EPX_I32, 1, 3, E, NULL));
        ASSERT_OK(epx__topk_validate(ok64, EPX_I64, 1, 3, E, NULL));
        int64_t bad[] = {E, -2, E + 1, INT32_MIN, INT32_MAX, (int64_t)1 << 32, ((int64_t)1 << 32) - 1};
        for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++)
            for (int at = 0; at < 3; at++) {
                int32_t v32[3] = {0, -1, E - 1};
                int64_t v64[3] = {0, -1, E - 1};
                v64[at] = bad[b];
                ASSERT_STATUS(epx__topk_validate(v64, EPX_I64, 1, 3, E, NULL), EPX_ERR_INVALID_ARGUMENT);
                ASSERT_STATUS(epx__topk_validate(v64, EPX_I64, 3, 1, E, NULL), EPX_ERR_INVALID_ARGUMENT);
                if (bad[b] < INT32_MIN || bad[b] > INT32_MAX) continue;
                v32[at] = (int32_t)bad[b];
                ASSERT_STATUS(epx__topk_validate(v32, EPX_I32, 1, 3, E, NULL), EPX_ERR_INVALID_ARGUMENT);
                ASSERT_STATUS(epx__topk_validate(v32, EPX_I32, 3, 1, E, NULL), EPX_ERR_INVALID_ARGUMENT);
            }
    }

    /* Low-latency slots of local expert l past the `filled` ones: -1, nothing else written. */
    enum { SLOTS = 7, NL = 3 };
    for (int l = 0; l < NL; l++)
        for (int filled = 0; filled <= SLOTS; filled++) {
            int32_t sr[SLOTS * NL], st[SLOTS * NL];
            for (int i = 0; i < SLOTS * NL; i++) sr[i] = st[i] = 1000 + i;
            epx__ll_slots_unfilled(sr, st, SLOTS, l, (size_t)filled);
            for (int i = 0; i < SLOTS * NL; i++) {
                bool unfilled = i / SLOTS == l && i % SLOTS >= filled;
                int32_t want = unfilled ? -1 : 1000 + i;
                if (sr[i] != want || st[i] != want)
                    TEST_FAIL_("ll_slots_unfilled(l %d, filled %d): slot %d = %d/%d, expected %d", l, filled, i, sr[i],
                               st[i], want);
            }
            epx__ll_slots_unfilled(NULL, st, SLOTS, l, (size_t)filled); /* either output may be NULL */
        }
}

int main(void)
{
    test_rank = 0;
    test_status();
    test_arena();
    test_params();
    test_deadlines();
    test_ids();
    test_connect_bounded();
    test_fault_parse();
    int four[] = {4, 4, 4, 4};
    run_boot(4, four, EPX_SUCCESS);
    int one[] = {1};
    run_boot(1, one, EPX_SUCCESS);
    test_stray_connections();
    test_missing_rank();
    /* Rank 1 claims 3 ranks while the others claim 2: every rank fails, none hangs. */
    int sizes[] = {1, 2, 3, 5};
    for (int k = 0; k < 4; k++) run_alltoall(sizes[k]);
    int differ[] = {2, 3};
    run_boot(2, differ, EPX_ERR_MISMATCH);
    /* Rank 1 claims 3 of 4 ranks, and ranks 2 and 3 come after the rendezvous failed: they
     * get EPX_ERR_MISMATCH at once too, not EPX_ERR_TIMEOUT at their timeout (5 s). */
    int differ_late[] = {4, 3, 4, 4};
    epx_unique_id_t late_id;
    ASSERT_OK(epx_get_unique_id(&late_id));
    run_boot_id(&late_id, 4, differ_late, EPX_ERR_MISMATCH, 5000, 2);
    run_boot_leave(4, 3, false); /* rank 0 sees it; ranks 1 and 2 wait on rank 0 */
    run_boot_leave(3, 1, true);
    run_boot_leave(3, 0, false); /* the root itself */
    run_links(3, 2, 3);
    run_links(4, 1, 0);
    run_links(2, 3, 2);
    run_give_up(2);
    run_give_up(3);
    test_give_up_writes_nothing();
    test_result_net();
    /* A single-rank communicator works end to end. */
    epx_unique_id_t id;
    epx_comm_t comm;
    ASSERT_OK(epx_get_unique_id(&id));
    ASSERT_OK(epx_comm_init_rank(&comm, 1, 0, &id, NULL));
    epx_comm_info_t info;
    ASSERT_OK(epx_comm_info(comm, &info));
    ASSERT_EQ(info.nranks, 1);
    ASSERT_EQ(info.num_hosts, 1);
    int x = 42, y = 0;
    ASSERT_OK(epx_alltoall(comm, &x, &y, 1, EPX_I32, NULL));
    ASSERT_EQ(y, 42);
    int64_t c1[1] = {1};
    ASSERT_STATUS(epx_alltoallv_device(comm, &x, c1, c1, &y, c1, c1, EPX_I32, NULL), EPX_ERR_UNSUPPORTED);
    ASSERT_OK(epx_comm_destroy(comm));
    test_moe_memory();
    test_region_find();
    test_routing();
    test_done(24);
    return 0;
}
