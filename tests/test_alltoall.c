/*
 * alltoall / alltoallv against an independent sequential reference: random counts (zeros
 * included, some above the eager size), random gaps and orders of displacements, random
 * data, every dtype, registered and malloc'd send buffers, outputs poisoned before each
 * call and gaps checked to stay poisoned. --large adds a 256 MiB-per-rank alltoall;
 * --no-cma forces the staging path; --cuda runs it all on the CUDA backend (device buffers,
 * the caller's stream); --pool with --cuda takes every test buffer but the registered ones
 * from the stream-ordered pool (memory CUDA IPC cannot share: the peers then write into epx's
 * staging buffer, and check_alltoall's back-to-back calls with rank 0 held check that the
 * copy out of it is ordered with the next call's writes).
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testlib.h"

#define POISON 0xA5

/* Byte b of element i that rank src sends rank dst in round `round`. */
static uint8_t data_byte(int round, int src, int dst, int64_t byte)
{
    return (uint8_t)test_mix((uint64_t)round, (uint64_t)src, (uint64_t)dst, (uint64_t)byte);
}

typedef struct {
    int64_t *counts;   /* [src][dst] elements */
    int64_t *sdispls;  /* [src][dst] */
    int64_t *rdispls;  /* [dst][src] */
    int64_t *send_len; /* [src] extent in elements */
    int64_t *recv_len; /* [dst] */
} plan_t;

/* Every rank derives the same plan from the round number. */
static void make_plan(plan_t *p, int R, int round, int64_t max_count)
{
    uint64_t s = 1000 + (uint64_t)round;
    for (int a = 0; a < R; a++)
        for (int b = 0; b < R; b++) {
            uint64_t r = test_rand(&s);
            int64_t c = (r % 4 == 0) ? 0 : (int64_t)(test_rand(&s) % (uint64_t)(max_count + 1));
            p->counts[a * R + b] = c;
        }
    /* Displacements: segments in a random order with random gaps. */
    for (int side = 0; side < 2; side++) {
        for (int a = 0; a < R; a++) {
            int order[64];
            for (int i = 0; i < R; i++) order[i] = i;
            for (int i = R - 1; i > 0; i--) {
                int j = (int)(test_rand(&s) % (uint64_t)(i + 1)), t = order[i];
                order[i] = order[j], order[j] = t;
            }
            int64_t off = (int64_t)(test_rand(&s) % 5);
            for (int i = 0; i < R; i++) {
                int b = order[i];
                int64_t c = side == 0 ? p->counts[a * R + b] : p->counts[b * R + a];
                (side == 0 ? p->sdispls : p->rdispls)[a * R + b] = off;
                off += c + (int64_t)(test_rand(&s) % 3);
            }
            (side == 0 ? p->send_len : p->recv_len)[a] = off;
        }
    }
}

static int check_round(epx_comm_t comm, int me, int R, int round, epx_dtype_t dt, int64_t max_count, bool registered)
{
    size_t es = epx_dtype_size(dt);
    plan_t p;
    p.counts = calloc((size_t)(R * R), 8);
    p.sdispls = calloc((size_t)(R * R), 8);
    p.rdispls = calloc((size_t)(R * R), 8);
    p.send_len = calloc((size_t)R, 8);
    p.recv_len = calloc((size_t)R, 8);
    make_plan(&p, R, round, max_count);

    int64_t sendcounts[64], recvcounts[64];
    for (int q = 0; q < R; q++) {
        sendcounts[q] = p.counts[me * R + q];
        recvcounts[q] = p.counts[q * R + me];
    }
    size_t sbytes = (size_t)p.send_len[me] * es + 1, rbytes = (size_t)p.recv_len[me] * es + 1;
    uint8_t *send, *recv = test_buf_alloc(rbytes), *hsend = malloc(sbytes), *hrecv = malloc(rbytes);
    if (registered)
        ASSERT_OK(epx_mem_alloc(comm, sbytes, (void **)&send));
    else
        send = test_buf_alloc(sbytes);
    memset(hsend, 0x5C, sbytes);
    for (int q = 0; q < R; q++)
        for (int64_t b = 0; b < sendcounts[q] * (int64_t)es; b++)
            hsend[p.sdispls[me * R + q] * (int64_t)es + b] = data_byte(round, me, q, b);
    test_buf_put(send, hsend, sbytes);
    memset(hrecv, POISON, rbytes);
    test_buf_put(recv, hrecv, rbytes);

    ASSERT_OK(epx_alltoallv(comm, send, sendcounts, &p.sdispls[me * R], recv, recvcounts, &p.rdispls[me * R], dt,
                            test_stream()));
    test_buf_get(hrecv, recv, rbytes);

    /* Reference: every byte of every segment, and the gaps untouched. */
    uint8_t *expect = malloc(rbytes);
    memset(expect, POISON, rbytes);
    for (int q = 0; q < R; q++)
        for (int64_t b = 0; b < recvcounts[q] * (int64_t)es; b++)
            expect[p.rdispls[me * R + q] * (int64_t)es + b] = data_byte(round, q, me, b);
    for (size_t i = 0; i < rbytes; i++)
        if (hrecv[i] != expect[i])
            TEST_FAIL_("round %d dtype %s: recv byte %zu = 0x%02x, expected 0x%02x", round, epx_dtype_name(dt), i,
                       hrecv[i], expect[i]);
    if (registered)
        ASSERT_OK(epx_mem_free(comm, send));
    else
        test_buf_free(send);
    test_buf_free(recv);
    free(hsend), free(hrecv), free(expect);
    free(p.counts), free(p.sdispls), free(p.rdispls), free(p.send_len), free(p.recv_len);
    return 1;
}

/* Plain alltoall of `count` elements per peer, twice back to back with other data (rank 0's
 * stream held first: its peers run ahead), each checked. */
static int check_alltoall(epx_comm_t comm, int me, int R, size_t count, bool registered)
{
    size_t bytes = count * (size_t)R * 4;
    uint32_t *send[2], *drecv[2], *hsend = malloc(bytes + 4), *recv = malloc(bytes + 4);
    for (int c = 0; c < 2; c++) {
        if (registered)
            ASSERT_OK(epx_mem_alloc(comm, bytes + 4, (void **)&send[c]));
        else
            send[c] = test_buf_alloc(bytes + 4);
        for (int q = 0; q < R; q++)
            for (size_t i = 0; i < count; i++)
                hsend[(size_t)q * count + i] = (uint32_t)test_mix(7 + (uint64_t)c, (uint64_t)me, (uint64_t)q, i);
        test_buf_put(send[c], hsend, bytes + 4);
        drecv[c] = test_buf_alloc(bytes + 4);
        memset(recv, POISON, bytes + 4);
        test_buf_put(drecv[c], recv, bytes + 4);
    }
    if (me == 0) test_stream_hold(20);
    for (int c = 0; c < 2; c++) ASSERT_OK(epx_alltoall(comm, send[c], drecv[c], count, EPX_F32, test_stream()));
    for (int c = 0; c < 2; c++) {
        test_buf_get(recv, drecv[c], bytes + 4);
        for (int q = 0; q < R; q++)
            for (size_t i = 0; i < count; i++) {
                uint32_t want = (uint32_t)test_mix(7 + (uint64_t)c, (uint64_t)q, (uint64_t)me, i);
                if (recv[(size_t)q * count + i] != want)
                    TEST_FAIL_("alltoall count %zu, call %d: element %zu from rank %d wrong", count, c, i, q);
            }
        ASSERT_EQ(((uint8_t *)recv)[bytes], POISON);
        if (registered)
            ASSERT_OK(epx_mem_free(comm, send[c]));
        else
            test_buf_free(send[c]);
        test_buf_free(drecv[c]);
    }
    free(hsend), free(recv);
    return 1;
}

/* Back-to-back alltoalls of changing sizes (every path, in every order), each on output
 * poisoned in stream order right before it and checked: catches a peer writing before
 * this rank is ready, or a rank finishing before every write has landed. */
static int stress(epx_comm_t comm, int me, int R, int rounds)
{
    static const size_t counts[] = {3, 2048, 40000, 300000, 1 << 20, 5000000};
    size_t maxc = 5000000, bytes = maxc * (size_t)R * 4;
    uint32_t *send = test_buf_alloc(bytes), *recv = test_buf_alloc(bytes), *host = malloc(bytes);
    uint64_t seed = 99;
    for (int it = 0; it < rounds; it++) {
        size_t count = counts[test_rand(&seed) % (sizeof counts / sizeof counts[0])];
        for (int q = 0; q < R; q++)
            for (size_t i = 0; i < count; i++) host[(size_t)q * count + i] = (uint32_t)test_mix((uint64_t)it, (uint64_t)me, (uint64_t)q, i);
        test_buf_put(send, host, count * (size_t)R * 4);
        test_buf_poison(recv, 0xA5, count * (size_t)R * 4);
        ASSERT_OK(epx_alltoall(comm, send, recv, count, EPX_F32, test_stream()));
        test_buf_get(host, recv, count * (size_t)R * 4);
        for (int q = 0; q < R; q++)
            for (size_t i = 0; i < count; i++)
                if (host[(size_t)q * count + i] != (uint32_t)test_mix((uint64_t)it, (uint64_t)q, (uint64_t)me, i))
                    TEST_FAIL_("stress round %d (count %zu): element %zu from rank %d wrong", it, count, i, q);
    }
    test_buf_free(send), test_buf_free(recv), free(host);
    return rounds;
}

/* A slot that carried a large eager segment and then, two operations later, a small one:
 * the small one's reader must wait for its data, not take what the large one left there.
 * Word 1 and word 3 of the large segment's 16-byte unit k hold k + 1, so that for any
 * operation number up to 1250 some stale unit looks like one of the small segment's lines
 * (with the default EPX_CUDA_EAGER_BYTES the large segment goes as raw bytes, the small
 * one as lines with the operation number in those words); rank 0 sends the small one
 * 200 ms late, so the others read their slots first. Run first: operation numbers small. */
static int stale_slot(epx_comm_t comm, int me, int R)
{
    const size_t big = 20000, small = 8192; /* bytes per pair */
    uint32_t *send = test_buf_alloc(big * (size_t)R), *recv = test_buf_alloc(big * (size_t)R);
    uint32_t *host = malloc(big * (size_t)R);
    for (int op = 0; op < 3; op++) {
        size_t bytes = op == 0 ? big : small, n = bytes / 4;
        for (int q = 0; q < R; q++)
            for (size_t w = 0; w < n; w++)
                host[(size_t)q * n + w] = op == 0 && w % 2 == 1 ? (uint32_t)(w / 4 + 1)
                                                                : (uint32_t)test_mix(7000u + (uint64_t)op, (uint64_t)me, (uint64_t)q, w);
        test_buf_put(send, host, bytes * (size_t)R);
        test_buf_poison(recv, POISON, bytes * (size_t)R);
        if (op == 2 && me == 0) test_stream_hold(200);
        ASSERT_OK(epx_alltoall(comm, send, recv, bytes, EPX_U8, test_stream()));
        test_buf_get(host, recv, bytes * (size_t)R);
        for (int q = 0; q < R; q++)
            for (size_t w = 0; w < n; w++) {
                uint32_t want = op == 0 && w % 2 == 1 ? (uint32_t)(w / 4 + 1)
                                                      : (uint32_t)test_mix(7000u + (uint64_t)op, (uint64_t)q, (uint64_t)me, w);
                if (host[(size_t)q * n + w] != want)
                    TEST_FAIL_("stale slot, operation %d: word %zu from rank %d is 0x%08x, expected 0x%08x", op, w, q,
                               host[(size_t)q * n + w], want);
            }
    }
    test_buf_free(send), test_buf_free(recv), free(host);
    return 1;
}

int main(int argc, char **argv)
{
    bool large = false;
    test_init(argc, argv);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--large")) large = true;
        if (!strcmp(argv[i], "--no-cma")) setenv("EPX_CPU_CMA", "0", 1);
    }
    int me, R, passed = 0;
    epx_comm_t comm = test_comm_from_env(&me, &R);
    ASSERT(R <= 64);

    passed += stale_slot(comm, me, R);
    static const epx_dtype_t dtypes[] = {EPX_U8, EPX_I32, EPX_I64, EPX_F16, EPX_BF16, EPX_F32, EPX_FP8_E4M3};
    int round = 0;
    for (int rep = 0; rep < 3; rep++)
        for (size_t d = 0; d < sizeof dtypes / sizeof dtypes[0]; d++) {
            int64_t max_count = (rep == 2 ? 40000 : rep == 1 ? 3000 : 17) / (int64_t)epx_dtype_size(dtypes[d]);
            passed += check_round(comm, me, R, round++, dtypes[d], max_count, false);
            passed += check_round(comm, me, R, round++, dtypes[d], max_count, true);
        }
    /* Zero-size and sizes around the eager threshold, then a barrier. */
    size_t counts[] = {0, 1, 7, 4096, 4097, 100000};
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        passed += check_alltoall(comm, me, R, counts[i], false);
        passed += check_alltoall(comm, me, R, counts[i], true);
    }
    ASSERT_OK(epx_barrier(comm, test_stream()));
    test_sync();
    passed++;
    passed += stress(comm, me, R, test_on_cuda() ? 60 : 10);
    if (large) {
        /* 256 MiB sent per rank. */
        size_t count = ((size_t)256 << 20) / 4 / (size_t)R;
        passed += check_alltoall(comm, me, R, count, true);
        passed += check_alltoall(comm, me, R, count, false);
    }
    test_finish(comm, passed);
    return 0;
}
