/*
 * Bad arguments: each case is passed by one rank while the others pass valid arguments.
 * The bad rank gets a specific status, the others EPX_ERR_REMOTE_INVALID (or MISMATCH for
 * the pair whose counts disagree), nobody's output changes, and a valid exchange works
 * right after every case. Buffers on the backend under test (--cuda: device memory).
 */
#include <stdlib.h>
#include <string.h>

#include "testlib.h"

#define NMAX 16
#define COUNT 8

#define ELEMS (NMAX * COUNT + 8)

static int me, R;
static epx_comm_t comm;
static int32_t *send_buf, *recv_buf; /* on the backend under test */
static int32_t send_host[ELEMS], recv_host[ELEMS];
static int64_t counts[NMAX], displs[NMAX];

static void reset(void)
{
    for (int i = 0; i < ELEMS; i++) send_host[i] = me * 100000 + i;
    test_buf_put(send_buf, send_host, sizeof send_host);
    test_buf_poison(recv_buf, 0xA5, sizeof recv_host);
    for (int p = 0; p < R; p++) counts[p] = COUNT, displs[p] = (int64_t)p * COUNT;
}

static void expect_untouched(const char *what)
{
    test_buf_get(recv_host, recv_buf, sizeof recv_host);
    const uint8_t *b = (const uint8_t *)recv_host;
    for (size_t i = 0; i < sizeof recv_host; i++)
        if (b[i] != 0xA5) TEST_FAIL_("case %s: recv byte %zu changed after a failed call", what, i);
}

static void valid_exchange(void)
{
    reset();
    ASSERT_OK(epx_alltoallv(comm, send_buf, counts, displs, recv_buf, counts, displs, EPX_I32, test_stream()));
    test_buf_get(recv_host, recv_buf, sizeof recv_host);
    for (int p = 0; p < R; p++)
        for (int i = 0; i < COUNT; i++) ASSERT_EQ(recv_host[p * COUNT + i], p * 100000 + me * COUNT + i);
}

typedef enum {
    NULL_SEND, NULL_RECV, NULL_COUNTS, NULL_DISPLS, NEG_COUNT, NEG_DISPL, HUGE_COUNT, BAD_DTYPE, STREAM,
    OVERLAP, MISALIGNED, NEG_DISPL1, NCASES
} bad_case_t;
static const char *names[] = {"NULL send", "NULL recv", "NULL counts", "NULL displs", "negative count",
                              "negative displacement", "overflowing count", "unknown dtype", "non-NULL stream",
                              "overlapping buffers", "misaligned buffer", "displacement -1"};

static epx_status_t call_case(bad_case_t k, bool bad)
{
    const void *s = send_buf;
    void *r = recv_buf;
    const int64_t *sc = counts, *sd = displs, *rc = counts, *rd = displs;
    int64_t mod[NMAX];
    memcpy(mod, counts, sizeof mod);
    epx_dtype_t dt = EPX_I32;
    void *stream = test_stream();
    if (bad) {
        switch (k) {
        case NULL_SEND: s = NULL; break;
        case NULL_RECV: r = NULL; break;
        case NULL_COUNTS: sc = NULL; break;
        case NULL_DISPLS: rd = NULL; break;
        case NEG_COUNT: mod[(me + 1) % R] = -1, sc = mod; break;
        case NEG_DISPL: mod[0] = -4, sd = mod; break;
        case HUGE_COUNT: mod[(me + 1) % R] = INT64_MAX / 2, sc = mod; break;
        case BAD_DTYPE: dt = (epx_dtype_t)42; break;
        case STREAM: stream = (void *)0x1; break; /* CPU only (on CUDA, cudaStreamLegacy) */
        case OVERLAP: r = (void *)(send_buf + 4); break;
        case MISALIGNED: s = (const char *)send_buf + 1; break;
        case NEG_DISPL1: /* one element before send, still inside send_buf: no overlap with recv */
            s = send_buf + COUNT, memcpy(mod, displs, sizeof mod), mod[R - 1] = -1, sd = mod;
            break;
        default: break;
        }
    }
    return epx_alltoallv(comm, s, sc, sd, r, rc, rd, dt, stream);
}

int main(int argc, char **argv)
{
    test_init(argc, argv);
    comm = test_comm_from_env(&me, &R);
    ASSERT(R <= NMAX);
    send_buf = test_buf_alloc(sizeof send_host);
    recv_buf = test_buf_alloc(sizeof recv_host);
    int passed = 0;
    for (int k = 0; k < NCASES; k++) {
        if (k == STREAM && test_on_cuda()) continue;
        int bad_rank = k % R;
        reset();
        epx_status_t st = call_case((bad_case_t)k, me == bad_rank);
        epx_status_t want = me == bad_rank ? EPX_ERR_INVALID_ARGUMENT : EPX_ERR_REMOTE_INVALID;
        if (st != want)
            TEST_FAIL_("case %s: got %s, expected %s (%s)", names[k], epx_status_name(st), epx_status_name(want),
                       epx_comm_get_last_error(comm));
        ASSERT(strlen(epx_comm_get_last_error(comm)) > 0);
        if (k != OVERLAP || me != bad_rank) expect_untouched(names[k]);
        valid_exchange();
        passed++;
    }
    /* Counts that disagree between rank a (sends 3 to b) and rank b (expects COUNT). */
    if (R >= 2) {
        int a = 0, bb = R - 1;
        reset();
        int64_t sc[NMAX];
        memcpy(sc, counts, sizeof sc);
        if (me == a) sc[bb] = 3;
        epx_status_t st = epx_alltoallv(comm, send_buf, sc, displs, recv_buf, counts, displs, EPX_I32, test_stream());
        if (me == a || me == bb) {
            ASSERT_STATUS(st, EPX_ERR_MISMATCH);
            expect_untouched("mismatch");
        } else if (test_on_cuda()) { /* the others: told by the host round (README) */
            ASSERT_STATUS(st, EPX_ERR_REMOTE_INVALID);
            expect_untouched("mismatch elsewhere");
        } else {
            ASSERT_OK(st); /* the others complete */
        }
        valid_exchange();
        passed++;
    }
    /* Self counts that disagree are caught locally. */
    {
        reset();
        int64_t rc[NMAX];
        memcpy(rc, counts, sizeof rc);
        rc[me] = COUNT - 1;
        epx_status_t st = epx_alltoallv(comm, send_buf, counts, displs, recv_buf, rc, displs, EPX_I32, test_stream());
        ASSERT(st == EPX_ERR_MISMATCH || (R > 1 && st == EPX_ERR_REMOTE_INVALID));
        expect_untouched("self mismatch");
        valid_exchange();
        passed++;
    }
    /* Send and recv that touch but do not overlap (one allocation, either first) are valid. */
    int32_t *both = test_buf_alloc(sizeof(int32_t) * 2 * NMAX * COUNT);
    for (int order = 0; order < 2; order++) {
        reset();
        static int32_t host[2 * NMAX * COUNT];
        int sat = order ? R * COUNT : 0, rat = order ? 0 : R * COUNT;
        for (int i = 0; i < R * COUNT; i++) host[sat + i] = me * 100000 + i, host[rat + i] = -1;
        test_buf_put(both, host, sizeof host);
        epx_status_t st =
            epx_alltoallv(comm, both + sat, counts, displs, both + rat, counts, displs, EPX_I32, test_stream());
        if (st != EPX_SUCCESS)
            TEST_FAIL_("adjacent buffers (%s first): %s (%s)", order ? "recv" : "send", epx_status_name(st),
                       epx_comm_get_last_error(comm));
        test_buf_get(host, both, sizeof host);
        for (int p = 0; p < R; p++)
            for (int i = 0; i < COUNT; i++) ASSERT_EQ(host[rat + p * COUNT + i], p * 100000 + me * COUNT + i);
        valid_exchange();
    }
    test_buf_free(both);
    passed++;
    /* Zero counts everywhere: no buffer is touched, whatever the displacements say (NULL). */
    {
        int64_t zero[NMAX] = {0};
        ASSERT_OK(epx_alltoallv(comm, NULL, zero, displs, NULL, zero, displs, EPX_I32, test_stream()));
        valid_exchange();
        passed++;
    }
    /* alltoall and barrier with bad arguments on every rank at once. */
    reset();
    void *stream = test_stream();
    ASSERT_STATUS(epx_alltoall(comm, send_buf, recv_buf, 1, (epx_dtype_t)-1, stream), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_alltoall(comm, NULL, recv_buf, 1, EPX_I32, stream), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_alltoall(comm, send_buf, recv_buf, SIZE_MAX / 2, EPX_I32, stream), EPX_ERR_INVALID_ARGUMENT);
    if (!test_on_cuda()) ASSERT_STATUS(epx_barrier(comm, (void *)0x1), EPX_ERR_INVALID_ARGUMENT);
    expect_untouched("alltoall");
    ASSERT_OK(epx_alltoall(comm, send_buf, recv_buf, 0, EPX_I32, stream));
    expect_untouched("alltoall of 0");
    valid_exchange();
    passed++;
    /* Local calls. */
    ASSERT_STATUS(epx_alltoall(NULL, send_buf, recv_buf, 1, EPX_I32, NULL), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_mem_free(comm, send_buf), EPX_ERR_INVALID_ARGUMENT); /* not epx's: refused, not freed */
    void *mine = NULL, *kept = NULL;
    ASSERT_OK(epx_mem_alloc(comm, 64, &mine));
    ASSERT_OK(epx_mem_alloc(comm, 64, &kept)); /* released with the communicator */
    ASSERT_OK(epx_mem_free(comm, mine));
    ASSERT_STATUS(epx_mem_free(comm, mine), EPX_ERR_INVALID_ARGUMENT); /* twice */
    ASSERT_STATUS(epx_mem_alloc(comm, 16, NULL), EPX_ERR_INVALID_ARGUMENT);
    void *big = (void *)&big;
    ASSERT_STATUS(epx_mem_alloc(comm, SIZE_MAX, &big), EPX_ERR_INVALID_ARGUMENT);
    ASSERT(big == NULL);
    if (!test_on_cuda()) { /* more than /dev/shm holds: a status now, not SIGBUS at first touch */
        big = (void *)&big;
        ASSERT_STATUS(epx_mem_alloc(comm, (size_t)1 << 50, &big), EPX_ERR_NO_MEMORY);
        ASSERT(big == NULL);
    }
    ASSERT_STATUS(epx_comm_rank(comm, NULL), EPX_ERR_INVALID_ARGUMENT);
    valid_exchange();
    passed++;
    /* A configuration only one rank rejects (each case on another rank): that rank gets
     * EPX_ERR_INVALID_ARGUMENT and its own message, the others EPX_ERR_REMOTE_INVALID at once
     * (their timeout is a minute; over MPI they used to wait forever), and the first
     * communicator still works. */
    if (!test_on_cuda()) {
        const char *names[] = {"cfg.size", "cfg.backend", "cfg.timeout_ms"};
        for (int k = 0; k < 3; k++) {
            int bad = k % R;
            epx_config_t good = EPX_CONFIG_INITIALIZER, wrong = EPX_CONFIG_INITIALIZER;
            good.timeout_ms = wrong.timeout_ms = 60000;
            if (k == 0) wrong.size = 3;
            if (k == 1) wrong.backend = 42;
            if (k == 2) wrong.timeout_ms = -5;
            double t0 = test_now_ms();
            epx_comm_t c = NULL;
            epx_status_t st = test_comm_again(comm, me == bad ? &wrong : &good, &c);
            epx_status_t want = me == bad ? EPX_ERR_INVALID_ARGUMENT : EPX_ERR_REMOTE_INVALID;
            if (st != want)
                TEST_FAIL_("creation with a bad %s on rank %d: got %s, expected %s (%s)", names[k], bad,
                           epx_status_name(st), epx_status_name(want), epx_get_last_error());
            if (me == bad && !strstr(epx_get_last_error(), names[k]))
                TEST_FAIL_("creation with a bad %s: the message does not name it: %s", names[k], epx_get_last_error());
            ASSERT(c == NULL);
            if (test_now_ms() - t0 > 20000)
                TEST_FAIL_("creation with a bad %s on rank %d took %.0f ms", names[k], bad, test_now_ms() - t0);
            valid_exchange();
            passed++;
        }
    }
    /* EPX_TEST_MOE_MISMATCH (the ranks started with different EPX_MOE_CHUNKS, across hosts):
     * creating a MoE context fails on every rank with EPX_ERR_MISMATCH, and the communicator
     * still works. */
    if (getenv("EPX_TEST_MOE_MISMATCH")) {
        epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
        cfg.hidden = 64, cfg.max_tokens_per_rank = 8, cfg.num_experts = 2 * R, cfg.max_topk = 2;
        epx_moe_t moe = NULL;
        ASSERT_STATUS(epx_moe_create(comm, &cfg, &moe), EPX_ERR_MISMATCH);
        ASSERT(moe == NULL);
        valid_exchange();
        passed++;
    }
    test_buf_free(send_buf);
    test_buf_free(recv_buf);
    test_finish(comm, passed);
    return 0;
}
