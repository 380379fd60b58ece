/* src/xhost: the count agreement of an alltoallv across hosts (counts.h). */
#include <string.h>

#include "counts.h"

void epx__xc_cards(int64_t *out, int nranks, int ls, epx_status_t local, const int64_t *send_bytes,
                   const int64_t *recv_bytes)
{
    size_t B = epx__xc_words(ls);
    memset(out, 0, sizeof *out * B * (size_t)nranks);
    for (int q = 0; q < nranks; q++) {
        int64_t *c = out + (size_t)q * B;
        c[0] = local;
        if (local != EPX_SUCCESS) continue;
        c[1] = recv_bytes[q];
        memcpy(c + 2, send_bytes + (size_t)(q / ls * ls), sizeof *c * (size_t)ls);
    }
}

epx_status_t epx__xc_statuses(const int64_t *in, int nranks, int ls, epx__errbuf_t *err)
{
    size_t B = epx__xc_words(ls);
    for (int p = 0; p < nranks; p++)
        if (in[(size_t)p * B] != EPX_SUCCESS)
            return epx__fail(err, EPX_ERR_REMOTE_INVALID, "rank %d rejected its arguments (%s); nothing was changed", p,
                             epx_status_name((epx_status_t)in[(size_t)p * B]));
    return EPX_SUCCESS;
}

epx_status_t epx__xc_pairs(const int64_t *in, int nranks, int ls, int me, const int64_t *send_bytes,
                           const int64_t *recv_bytes, int64_t rec[EPX__XC_REC], epx__errbuf_t *err)
{
    size_t B = epx__xc_words(ls);
    int j = me % ls;
    rec[0] = -1, rec[1] = rec[2] = 0;
    for (int q = 0; q < nranks && rec[0] < 0; q++)
        if (send_bytes[q] != in[(size_t)q * B + 1]) rec[0] = q, rec[1] = send_bytes[q], rec[2] = in[(size_t)q * B + 1];
    for (int q = 0; q < nranks; q++) {
        int64_t expects = in[(size_t)q * B + 1], sends = epx__xc_sent(in, ls, q, j);
        if (send_bytes[q] != expects || sends != recv_bytes[q])
            return epx__fail(err, EPX_ERR_MISMATCH,
                             "rank %d and rank %d disagree on their counts (%lld/%lld sent, %lld/%lld expected); "
                             "nothing was written",
                             me, q, (long long)send_bytes[q], (long long)sends, (long long)expects,
                             (long long)recv_bytes[q]);
    }
    return EPX_SUCCESS;
}

epx_status_t epx__xc_verdict(const int64_t *recs, int nranks, int me, epx__errbuf_t *err)
{
    for (int p = 0; p < nranks; p++) {
        const int64_t *r = recs + (size_t)p * EPX__XC_REC;
        if (r[0] >= 0)
            return epx__fail(err, p == me || r[0] == me ? EPX_ERR_MISMATCH : EPX_ERR_REMOTE_INVALID,
                             "rank %d sends %lld bytes to rank %d, which expects %lld; nothing was written", p,
                             (long long)r[1], (int)r[0], (long long)r[2]);
    }
    return EPX_SUCCESS;
}
