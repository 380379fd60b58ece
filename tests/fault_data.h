/*
 * What the fault tests (test_fault.c on the CPU backend, test_cuda_fault.c on CUDA) send: the
 * same small, reproducible alltoall(v) bytes and MoE routing, so that every surviving rank
 * can check every output byte. The includer defines K (top-k) and LOCAL_EXPERTS.
 */
#ifndef EPX_TESTS_FAULT_DATA_H
#define EPX_TESTS_FAULT_DATA_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "testlib.h"

/* Byte i of what rank src sends rank dst; the alltoallv count from src to dst. */
static inline uint8_t a2a_byte(int src, int dst, size_t i) { return (uint8_t)((src * 31 + dst * 7 + (int)(i % 1000)) % 200); }
static inline int64_t v_count(int src, int dst) { return 100 + 37 * src + 13 * dst; }

/* Expert k of token t of rank src (two distinct experts when K = 2), and whether the token
 * goes to rank q. */
static inline int32_t expert_of(int R, int src, int t, int k)
{
    int E = LOCAL_EXPERTS * R;
    int e0 = (src * 5 + t * 3) % E;
    return k == 0 ? e0 : (e0 + 1 + t % (E > 1 ? E - 1 : 1)) % E;
}
static inline bool goes_to(int R, int src, int t, int q)
{
    for (int k = 0; k < K; k++)
        if (expert_of(R, src, t, k) / LOCAL_EXPERTS == q) return true;
    return false;
}

/* bf16 bits of channel h of token t of rank src; the expert's factor for combine inputs. */
static inline uint16_t x_val(int src, int t, int h) { return (uint16_t)(((src * 16 + t) % 100) << 8 | (h % 100)); }
static inline int g_val(int t, int h) { return (t + h) % 4 + 1; }

static inline void *xmalloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    ASSERT(p);
    return p;
}

/* The two rendezvous ids of a scenario (the communicator under test, and the one built
 * after it), made by forked rank 0 and passed to the others through a pipe (one write and
 * one read each: atomic). Rank 0 writes R copies: R - 1 ranks and the parent, which reads
 * the last to clean up. */
typedef struct {
    epx_unique_id_t id, id2;
} fault_ids_t;

static inline void fault_ids_share(int r, int R, const int fds[2], fault_ids_t *ids)
{
    if (r == 0) {
        ASSERT_OK(epx_get_unique_id(&ids->id));
        ASSERT_OK(epx_get_unique_id(&ids->id2));
        for (int i = 0; i < R; i++) ASSERT(write(fds[1], ids, sizeof *ids) == sizeof *ids);
    } else {
        close(fds[1]); /* EOF, not a hang, should rank 0 fail */
        ASSERT(read(fds[0], ids, sizeof *ids) == sizeof *ids);
    }
}

#endif
