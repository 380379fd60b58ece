/*
 * The count agreement of alltoallv across GPU hosts (src/xhost/counts.h), on the CPU: every
 * rank of a simulated communicator makes its cards, the cards travel as the bootstrap
 * alltoall moves them (a failed rank 0 relays zeros for all but its own), and each rank's
 * verdict, error message and rounds must be what the full matrix of counts gives (the
 * reference below: the check epx__xhost_alltoallv made on the gathered matrix before).
 * Fixed cases, then random matrices with and without mismatches and failed ranks, on hosts
 * of 1, 2, 3 and 4 ranks.
 */
#include <string.h>

#include "testlib.h"
#include "xhost/counts.h"

#define MAXR 12

/* The verdict of rank `me` from every rank's counts: S[p][q] what p sends q, E[p][q] what p
 * expects from q, st[p] p's status. */
static epx_status_t ref_verdict(int R, int me, const int64_t *S, const int64_t *E, const epx_status_t *st,
                                epx__errbuf_t *err)
{
#define RS(p, q) S[(p)*R + (q)]
#define RE(p, q) E[(p)*R + (q)]
    if (st[me] != EPX_SUCCESS) return st[me];
    for (int p = 0; p < R; p++)
        if (st[p] != EPX_SUCCESS)
            return epx__fail(err, EPX_ERR_REMOTE_INVALID, "rank %d rejected its arguments (%s); nothing was changed", p,
                             epx_status_name(st[p]));
    for (int q = 0; q < R; q++)
        if (RS(me, q) != RE(q, me) || RS(q, me) != RE(me, q))
            return epx__fail(err, EPX_ERR_MISMATCH,
                             "rank %d and rank %d disagree on their counts (%lld/%lld sent, %lld/%lld expected); "
                             "nothing was written",
                             me, q, (long long)RS(me, q), (long long)RS(q, me), (long long)RE(q, me),
                             (long long)RE(me, q));
    for (int p = 0; p < R; p++)
        for (int q = 0; q < R; q++)
            if (RS(p, q) != RE(q, p))
                return epx__fail(err, p == me || q == me ? EPX_ERR_MISMATCH : EPX_ERR_REMOTE_INVALID,
                                 "rank %d sends %lld bytes to rank %d, which expects %lld; nothing was written", p,
                                 (long long)RS(p, q), q, (long long)RE(q, p));
    return EPX_SUCCESS;
#undef RS
#undef RE
}

/* Run the two rounds for every rank; check them against the reference; return rank
 * `probe`'s verdict (and its message in *msg). */
static epx_status_t simulate(int R, int ls, const int64_t *S, const int64_t *E, const epx_status_t *st, int probe,
                             epx__errbuf_t *msg)
{
    size_t B = epx__xc_words(ls);
    static int64_t cards[MAXR * MAXR * 6], in[MAXR * MAXR * 6], recs[MAXR * EPX__XC_REC];
    ASSERT(R <= MAXR && B <= 6);
    for (int p = 0; p < R; p++) epx__xc_cards(cards + (size_t)p * R * B, R, ls, st[p], S + p * R, E + p * R);
    for (int q = 0; q < R; q++)
        for (int p = 0; p < R; p++) {
            int64_t *to = in + ((size_t)q * R + p) * B;
            if (st[0] != EPX_SUCCESS && p != 0) /* epx__boot_alltoall_fail on rank 0 */
                memset(to, 0, sizeof *to * B);
            else
                memcpy(to, cards + ((size_t)p * R + q) * B, sizeof *to * B);
        }
    epx_status_t got[MAXR];
    epx__errbuf_t err[MAXR];
    int second = 0; /* ranks that take part in round 2 */
    for (int me = 0; me < R; me++) {
        got[me] = st[me] != EPX_SUCCESS ? st[me] : epx__xc_statuses(in + (size_t)me * R * B, R, ls, &err[me]);
        second += got[me] == EPX_SUCCESS;
    }
    ASSERT(second == 0 || second == R); /* the same rounds on every rank */
    for (int me = 0; me < R && second; me++)
        got[me] = epx__xc_pairs(in + (size_t)me * R * B, R, ls, me, S + me * R, E + me * R, recs + me * EPX__XC_REC,
                                &err[me]);
    for (int me = 0; me < R && second; me++)
        if (got[me] == EPX_SUCCESS) got[me] = epx__xc_verdict(recs, R, me, &err[me]);
    for (int me = 0; me < R; me++) {
        epx__errbuf_t want;
        epx_status_t ref = ref_verdict(R, me, S, E, st, &want);
        ASSERT_STATUS(got[me], ref);
        if (ref != EPX_SUCCESS && st[me] == EPX_SUCCESS && strcmp(err[me].msg, want.msg) != 0)
            TEST_FAIL_("rank %d of %d (ls %d): \"%s\", expected \"%s\"", me, R, ls, err[me].msg, want.msg);
        if (ref != EPX_SUCCESS) continue;
        /* What the data steps read: what every rank sends each rank of my host. */
        for (int p = 0; p < R; p++)
            for (int j = 0; j < ls; j++)
                ASSERT_EQ(epx__xc_sent(in + (size_t)me * R * B, ls, p, j), S[p * R + me / ls * ls + j]);
    }
    if (msg && got[probe] != EPX_SUCCESS) *msg = err[probe];
    return got[probe];
}

/* Consistent counts: E = S transposed. */
static void consistent(int R, uint64_t *seed, int64_t *S, int64_t *E)
{
    for (int p = 0; p < R; p++)
        for (int q = 0; q < R; q++) {
            uint64_t r = test_rand(seed);
            S[p * R + q] = r % 4 == 0 ? 0 : (int64_t)(r >> 8 & 0xffff) + (r % 7 == 0 ? (int64_t)1 << 40 : 0);
        }
    for (int p = 0; p < R; p++)
        for (int q = 0; q < R; q++) E[q * R + p] = S[p * R + q];
}

static void fixed_cases(void)
{
    uint64_t seed = 7;
    int64_t S[MAXR * MAXR], E[MAXR * MAXR];
    epx_status_t st[MAXR] = {0};
    epx__errbuf_t msg;
    int layouts[][2] = {{4, 2}, {4, 1}, {6, 2}, {1, 1}, {2, 1}};
    for (size_t k = 0; k < EPX__ARRAY_LEN(layouts); k++) {
        int R = layouts[k][0], ls = layouts[k][1];
        consistent(R, &seed, S, E);
        for (int me = 0; me < R; me++) ASSERT_OK(simulate(R, ls, S, E, st, me, NULL));
        if (R < 4) continue;
        /* Rank 2 expects one byte more from rank 1: MISMATCH on both, the others name the pair. */
        E[2 * R + 1] += 1;
        ASSERT_STATUS(simulate(R, ls, S, E, st, 1, &msg), EPX_ERR_MISMATCH);
        ASSERT(strstr(msg.msg, "rank 1 and rank 2 disagree"));
        ASSERT_STATUS(simulate(R, ls, S, E, st, 2, &msg), EPX_ERR_MISMATCH);
        ASSERT(strstr(msg.msg, "rank 2 and rank 1 disagree"));
        ASSERT_STATUS(simulate(R, ls, S, E, st, 3, &msg), EPX_ERR_REMOTE_INVALID);
        ASSERT(strstr(msg.msg, "rank 1 sends"));
        ASSERT_STATUS(simulate(R, ls, S, E, st, 0, &msg), EPX_ERR_REMOTE_INVALID);
        /* A rank that rejected its arguments outranks the mismatch; rank 0 failing too (it
         * relays zeros then) is named first. */
        st[3] = EPX_ERR_INVALID_ARGUMENT;
        ASSERT_STATUS(simulate(R, ls, S, E, st, 3, NULL), EPX_ERR_INVALID_ARGUMENT);
        ASSERT_STATUS(simulate(R, ls, S, E, st, 1, &msg), EPX_ERR_REMOTE_INVALID);
        ASSERT(strstr(msg.msg, "rank 3 rejected its arguments (EPX_ERR_INVALID_ARGUMENT)"));
        st[0] = EPX_ERR_NO_MEMORY;
        ASSERT_STATUS(simulate(R, ls, S, E, st, 2, &msg), EPX_ERR_REMOTE_INVALID);
        ASSERT(strstr(msg.msg, "rank 0 rejected its arguments (EPX_ERR_NO_MEMORY)"));
        st[0] = st[3] = EPX_SUCCESS;
    }
}

static void random_cases(void)
{
    uint64_t seed = 2024;
    int64_t S[MAXR * MAXR], E[MAXR * MAXR];
    int layouts[][2] = {{1, 1}, {2, 1}, {3, 1}, {5, 1}, {4, 2}, {6, 2}, {8, 2}, {6, 3}, {9, 3}, {8, 4}, {12, 4}};
    int bad_seen = 0, mismatch_seen = 0;
    for (size_t k = 0; k < EPX__ARRAY_LEN(layouts); k++)
        for (int trial = 0; trial < 300; trial++) {
            int R = layouts[k][0], ls = layouts[k][1];
            epx_status_t st[MAXR] = {0};
            consistent(R, &seed, S, E);
            int n = (int)(test_rand(&seed) % 4); /* disagreeing counts, either side, self pairs too */
            for (int m = 0; m < n; m++) {
                int p = (int)(test_rand(&seed) % (uint64_t)R), q = (int)(test_rand(&seed) % (uint64_t)R);
                int64_t *c = test_rand(&seed) % 2 ? &S[p * R + q] : &E[q * R + p];
                *c += 1 + (int64_t)(test_rand(&seed) % 3);
            }
            if (test_rand(&seed) % 5 == 0) {
                static const epx_status_t codes[] = {EPX_ERR_INVALID_ARGUMENT, EPX_ERR_MISMATCH, EPX_ERR_NO_MEMORY,
                                                     EPX_ERR_INVALID_USAGE};
                for (int b = 0; b < 1 + (int)(test_rand(&seed) % 2); b++)
                    st[test_rand(&seed) % (uint64_t)R] = codes[test_rand(&seed) % 4];
            }
            epx_status_t v = simulate(R, ls, S, E, st, (int)(test_rand(&seed) % (uint64_t)R), NULL);
            bad_seen += v != EPX_SUCCESS && v != EPX_ERR_MISMATCH && v != EPX_ERR_REMOTE_INVALID;
            mismatch_seen += v == EPX_ERR_MISMATCH;
        }
    ASSERT(bad_seen > 0 && mismatch_seen > 0);
}

int main(void)
{
    test_rank = 0;
    fixed_cases();
    random_cases();
    test_done(2);
    return 0;
}
