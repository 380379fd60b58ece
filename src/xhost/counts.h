/*
 * src/xhost: how the ranks of an alltoallv across hosts agree on their counts. Host code
 * only (no CUDA), built into every build so that the CPU tests check it.
 *
 * Ranks lie consecutively on hosts of `ls` ranks. Two bootstrap rounds, each moving O(R)
 * bytes per rank:
 *
 * 1. An alltoall of cards: rank p sends rank q the epx__xc_words(ls) int64
 *      [0]      p's verdict on its own arguments (an epx_status_t),
 *      [1]      the bytes p expects from q,
 *      [2 + j]  the bytes p sends rank host(q) * ls + j, for j < ls,
 *    so q learns every count between itself and each rank and, as the gateway of its rail,
 *    what its rail peers send each rank of its host (epx__xc_sent). A failed rank's cards
 *    carry its status and zeros. The statuses decide alike on every rank whether to go on.
 * 2. When every status is success: an allgather of each rank's first mismatched send
 *    (EPX__XC_REC words).
 *
 * Every rank then returns what the full matrix of counts would tell it: its own failure;
 * else EPX_ERR_REMOTE_INVALID naming the first rank that rejected its arguments; else
 * EPX_ERR_MISMATCH for the first rank it disagrees with; else EPX_ERR_REMOTE_INVALID for
 * the first disagreeing pair (p, q) in rank order; else success.
 */
#ifndef EPX_XHOST_COUNTS_H
#define EPX_XHOST_COUNTS_H

#include "../core/core.h"

/* int64 words of a card (round 1) and of a record (round 2). */
static inline size_t epx__xc_words(int ls) { return 2 + (size_t)ls; }
#define EPX__XC_REC 3

/* From the cards I received (rank-major): the bytes rank p sends rank j of my host. */
static inline int64_t epx__xc_sent(const int64_t *in, int ls, int p, int j)
{
    return in[(size_t)p * epx__xc_words(ls) + 2 + (size_t)j];
}

/* My card for every rank into `out` (nranks cards); the counts only when local is
 * EPX_SUCCESS (send_bytes and recv_bytes may then be NULL), zeros otherwise. */
void epx__xc_cards(int64_t *out, int nranks, int ls, epx_status_t local, const int64_t *send_bytes,
                   const int64_t *recv_bytes);

/* After round 1: EPX_ERR_REMOTE_INVALID naming the first rank whose card says it failed,
 * else EPX_SUCCESS. Every rank's cards carry its one status, so this is alike everywhere. */
epx_status_t epx__xc_statuses(const int64_t *in, int nranks, int ls, epx__errbuf_t *err);

/* After round 1, when every status is success: my record for round 2 (rec = {the first rank
 * q that expects from me another count than I send, what I send, what it expects}; q = -1
 * when none) and my verdict on my own pairs: EPX_ERR_MISMATCH for the first rank with which
 * I disagree in either direction, else EPX_SUCCESS. */
epx_status_t epx__xc_pairs(const int64_t *in, int nranks, int ls, int me, const int64_t *send_bytes,
                           const int64_t *recv_bytes, int64_t rec[EPX__XC_REC], epx__errbuf_t *err);

/* After round 2 (every rank's record, rank-major), on a rank whose own pairs agree:
 * EPX_ERR_REMOTE_INVALID naming the first disagreeing pair, else EPX_SUCCESS. */
epx_status_t epx__xc_verdict(const int64_t *recs, int nranks, int me, epx__errbuf_t *err);

#endif /* EPX_XHOST_COUNTS_H */
