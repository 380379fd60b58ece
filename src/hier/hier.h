/*
 * src/hier: the CPU backend for ranks on several hosts. It composes the shared-memory
 * backend of src/cpu (the ranks of this host, numbered by local rank) with the MPI
 * transport of src/net (between hosts); it calls only those two and src/core.
 *
 * alltoall(v): every rank sends every peer's segment itself — through shared memory
 * inside the host, through MPI (point to point, one message per pair) to other hosts.
 * First one small message per pair carries each side's byte counts and its verdict on its
 * own arguments, so that every rank decides before anything is written, as on one host;
 * a segment of at most 3968 bytes to another host rides in that message (placed after the
 * verdict), so small exchanges take one round.
 *
 * MoE (moe.c): a token crosses to each destination host once, to its *gateway* there —
 * the rank whose local index is the source's local index (modulo that host's size) —
 * which fans it out to the local ranks that need it. Combine walks back: the receivers
 * return their rows to the gateway, which sends them on to the token's home rank as they
 * are, one message per (gateway, source); the home rank sums each token's rows in the
 * single-host order (float32, ascending rank, from +0; low-latency: w * y per rank in
 * ascending k, then the ranks ascending),
 * so the result equals the single-host one bit for bit. (Adding per-host partial sums
 * instead would change the float32 rounding; chaining a float32 partial sum from host to
 * host keeps the bits but makes every host wait for the previous one.)
 */
#ifndef EPX_HIER_H
#define EPX_HIER_H

#include "../cpu/cpu.h"
#include "../net/net.h"

/* Which rank is where. */
typedef struct {
    int rank, nranks;
    int host, num_hosts;
    int local_rank, local_size;
    int *host_of;    /* [R] */
    int *lrank_of;   /* [R] */
    int *host_size;  /* [hosts] */
    int *host_first; /* [hosts]: start of the host's ranks in host_ranks */
    int *host_ranks; /* [R]: host_ranks[host_first[h] + l] = rank of local rank l of host h */
} epx__topo_t;

typedef struct epx__hier epx__hier_t;

/* The transport between hosts that MoE runs on: MPI (src/net), or NCCL for GPU ranks (the
 * link src/xhost builds: host buffers staged through device memory; its collectives run
 * over the bootstrap). Every call is collective in the sense of the MPI one it stands for,
 * and its wait for the peers is bounded by the communicator's timeout from its own start
 * (MPI: and again from each message of an xchg that completes; EPX_ERR_TIMEOUT past it):
 *   allreduce_sum  v[0..n) summed over all ranks, in place;
 *   alltoall       block q (`words` int64) of send[R * words] arrives as block `rank` of
 *                  rank q's recv[R * words] (not overlapping send);
 *   xchg           sbytes[p] bytes from sbuf[p] to rank p, rbytes[p] from p into rbuf[p]
 *                  (0 = none), complete on return; `tag` tells concurrent batches apart. */
typedef struct {
    void *ctx;
    epx_status_t (*allreduce_sum)(void *ctx, int64_t *v, int n, epx__errbuf_t *err);
    epx_status_t (*alltoall)(void *ctx, const int64_t *send, int64_t *recv, int words, epx__errbuf_t *err);
    epx_status_t (*xchg)(void *ctx, int tag, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                         const int64_t *rbytes, epx__errbuf_t *err);
} epx__hier_link_t;

/* Local: build the backend over this host's `cpu` (local ranks) and `net` (all ranks).
 * host_of / lrank_of are copied. Owns neither cpu nor net. */
epx_status_t epx__hier_create(epx__hier_t **hier, epx__cpu_t *cpu, epx__net_t *net, const int *host_of,
                              const int *lrank_of, epx__errbuf_t *err);
/* The same over another link (MoE only: epx__hier_alltoallv needs an MPI net). The link's
 * point-to-point pairs are those of MoE: a rank and the rank of the same local index on
 * another host (hosts of equal size). */
epx_status_t epx__hier_create_link(epx__hier_t **hier, epx__cpu_t *cpu, const epx__hier_link_t *link, int rank,
                                   int nranks, const int *host_of, const int *lrank_of, epx__errbuf_t *err);
void epx__hier_destroy(epx__hier_t *hier);
const epx__topo_t *epx__hier_topo(const epx__hier_t *hier);

/* EPX_FAULT `count` (core/fault.h; set by src/api, which counts the steps): the next
 * operation announces a wrong size. alltoall(v): one byte more to rank + 1 than it sends
 * (the pair returns EPX_ERR_MISMATCH, the others succeed); a MoE call: a top-k one larger
 * than its own in the verdict (every rank returns EPX_ERR_MISMATCH). Nothing is written. */
void epx__hier_fault_count(epx__hier_t *hier);
/* EPX_FAULT `nomem`: the next MoE call fails as if out of memory where it first allocates
 * what it needs, before its verdict (a dispatch: its handle; a call along a handle: its row
 * plan and work buffers): that rank returns EPX_ERR_NO_MEMORY, the others
 * EPX_ERR_REMOTE_INVALID, nothing is written. alltoall(v): a rank of a disagreeing pair gets
 * no scratch for its good peers' segments, and receives them in place (the pair still
 * fails with EPX_ERR_MISMATCH, the others succeed; nothing else changes). */
void epx__hier_fault_nomem(epx__hier_t *hier);
/* EPX_FAULT `slow` (ms > 0; 0 ends it): the operation that starts pauses ms after each of
 * its MPI requests that completes (collectives' too). src/api sets it before every
 * operation while a fault aims at this rank. */
void epx__hier_fault_slow(epx__hier_t *hier, int ms);
/* The status of a MoE call that failed on this rank after its verdict, before it had done
 * its part of the call's exchanges (an exchange inside the host, such as mapping a local
 * rank's buffer that grew in the call; every allocation comes before the verdict and is
 * part of it): its peers are still
 * in the call, so the communicator cannot go on. Its local ranks were told at once (shared
 * memory: EPX_ERR_PEER_FAILURE there); src/api breaks the communicator with it. Cleared
 * by the call; EPX_SUCCESS when none. */
epx_status_t epx__hier_take_left(epx__hier_t *hier);

/* Same contract as epx__cpu_alltoallv, over every rank (arrays indexed by rank). */
epx_status_t epx__hier_alltoallv(epx__hier_t *hier, const epx__cpu_xfer_t *x, epx_status_t local_status,
                                 epx__errbuf_t *err);

/* ---- MoE (moe.c): the contract of the src/cpu MoE functions. ---- */
typedef struct epx__hier_moe epx__hier_moe_t;
typedef struct epx__hier_moe_handle epx__hier_moe_handle_t;

epx_status_t epx__hier_moe_create(epx__hier_t *h, const epx__moe_shape_t *shape, uint64_t config_hash,
                                  epx_status_t local_status, epx__hier_moe_t **moe, epx__errbuf_t *err);
void epx__hier_moe_destroy(epx__hier_moe_t *m);
epx_status_t epx__hier_moe_dispatch(epx__hier_moe_t *m, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                    epx_status_t local_status, epx__hier_moe_handle_t **handle, epx__errbuf_t *err);
epx_status_t epx__hier_moe_dispatch_cached(epx__hier_moe_t *m, const epx__hier_moe_handle_t *h,
                                           const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                                           epx_status_t local_status, epx__errbuf_t *err);
epx_status_t epx__hier_moe_combine(epx__hier_moe_t *m, const epx__hier_moe_handle_t *h,
                                   const epx_moe_combine_in_t *in, epx_moe_combine_out_t *out,
                                   epx_status_t local_status, epx__errbuf_t *err);
epx_status_t epx__hier_moe_ll_dispatch(epx__hier_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                       epx_moe_ll_dispatch_out_t *out, epx_status_t local_status,
                                       epx__hier_moe_handle_t **handle, epx__errbuf_t *err);
epx_status_t epx__hier_moe_ll_combine(epx__hier_moe_t *m, const epx__hier_moe_handle_t *h,
                                      const epx_moe_ll_combine_in_t *in, void *out, epx_status_t local_status,
                                      epx__errbuf_t *err);
/* Local. m (NULL once the context is gone) keeps the handle's memory for its next handle. */
void epx__hier_moe_handle_free(epx__hier_moe_t *m, epx__hier_moe_handle_t *h);

/* ---- The plan of a dispatch, for a caller that moves the rows itself (src/xhost: device
 * memory, NCCL, CUDA IPC). ---- */

/* epx__hier_moe_dispatch without rows: the same verdict, routing records and outputs, but
 * in->x / x_scales are not read and out->recv_x / recv_x_scales not written. The handle
 * holds the plan (epx__hier_moe_handle_plan); epx__hier_moe_dispatch_cached and
 * epx__hier_moe_combine work along it as along any. */
epx_status_t epx__hier_moe_dispatch_plan(epx__hier_moe_t *m, const epx_moe_dispatch_in_t *in,
                                         epx_moe_dispatch_out_t *out, epx_status_t local,
                                         epx__hier_moe_handle_t **handle, epx__errbuf_t *err);
/* epx__hier_moe_ll_dispatch without rows and outputs: the same verdict and routing records;
 * in->x is not read and nothing of the caller's is written (the row plan of the handle says
 * what goes where). epx__hier_moe_ll_combine works along the handle as along any. */
epx_status_t epx__hier_moe_ll_dispatch_plan(epx__hier_moe_t *m, const epx_moe_ll_dispatch_in_t *in,
                                            epx_status_t local, epx__hier_moe_handle_t **handle, epx__errbuf_t *err);
/* The agreement a cached dispatch (!combine) or a combine (low-latency in a low-latency
 * context) along `hd` starts with (one alltoall of small cards: every rank's verdict,
 * operation, top-k, handle and, for combine, whether it passed weights), without moving
 * anything. hd is read only when local is a success. */
epx_status_t epx__hier_moe_agree(epx__hier_moe_t *m, const epx__hier_moe_handle_t *hd, bool combine, bool has_w,
                                 epx_status_t local, epx__errbuf_t *err);

/* What a handle planned (read-only views of its arrays, valid while it lives). Ranks of a
 * host are numbered by local index l; entries e are the tokens this rank forwards (its own
 * and those its rail peers on other hosts sent it), ordered by (source rank, token); rows
 * r are what this rank received, in output order ((source rank, token) ascending).
 *   my tokens       topk [T, K] (int32); ll: a low-latency dispatch made the handle;
 *   entries         ent_src, ent_tok [nent], ent_topk [nent, K]; ent_fidx [nent]: row in
 *                   the forwarded buffer (what rail peers sent me, by source rank, then
 *                   token), -1 for my own;
 *   forwarded       fwd_count [R]: tokens source p sent me as its gateway (nfwd in all);
 *   fan-out         to_ent [to_first[l] .. to_first[l + 1]): entries sent to local rank l,
 *                   in entry order;
 *   fan-in          from_row [from_first[l] .. from_first[l + 1]): output row of each record
 *                   forwarder l sent me, in its order; row_rec [rows]: the inverse;
 *   rows            row_topk [rows, K], row_src, row_tok [rows]: routing and source;
 *   sources         src_tokens [R]: every rank's token count in the dispatch. */
typedef struct {
    int T, K, has_w, ll;
    int64_t rows;
    const int32_t *topk;
    int64_t nent;
    const int32_t *ent_src, *ent_tok, *ent_topk;
    const int64_t *ent_fidx;
    const int64_t *fwd_count;
    int64_t nfwd;
    const int64_t *to_first, *to_ent;
    const int64_t *from_first, *from_row, *row_rec;
    const int32_t *row_topk, *row_src, *row_tok;
    const int64_t *src_tokens;
} epx__hier_plan_t;
void epx__hier_moe_handle_plan(const epx__hier_moe_handle_t *h, epx__hier_plan_t *plan);

/* The rows of that plan (plan.c): the count of every transfer and, for every row copy, a
 * reference to its source: a kind (which buffer) in the top byte and a row index below.
 *   dispatch (cached dispatch across hosts; the rows of any dispatch on the GPU path):
 *     1. gather gw[n_gw] (from X, my rows) into the records for my gateways,
 *        gw_chunk[c * R + p] for gateway rank p in chunk c; exchange (between hosts, chunk
 *        by chunk) into FWD, fwd_chunk[c * R + p] records from source p;
 *     2. gather fan (from FWD or X) into the records for the local ranks and exchange them
 *        (inside the host) into LRECV, in parts (below): part q's records for local rank
 *        l, fan_send[q * LS + l] of them, and from it, fan_recv[q * LS + l];
 *     3. gather out[rows] (from LRECV, FWD or X) into the output rows;
 *        low-latency: row prow[j] of out goes to slot pslot[j] (local expert l's slots
 *        start at l * ll_slots), j < n_place in slot order (local expert, then row order:
 *        sources ascending, tokens ascending); psrc[j] = source rank << 32 | token;
 *        count[l] rows fill local expert l (recv_count). A row goes to each of its distinct
 *        experts here once.
 *   combine: rows go home unreduced. High-throughput: one row per (token, rank it went to);
 *   low-latency: one per (token, distinct expert), a record's rows (a token's for one rank)
 *   back to back by ascending local expert.
 *     1. gather c1 (from Y, the expert outputs: high-throughput row r, low-latency slot
 *        l * ll_slots + i) into the rows back to the local forwarders and exchange them
 *        into C1, in parts: back_send[q * LS + l] to local rank l, back_recv[q * LS + l]
 *        from it;
 *     2. gather home[n_home_send] (from C1 or Y) into the rows home, home_send_chunk[c * R
 *        + p] to home rank p in chunk c; exchange (between hosts, chunk by chunk) into
 *        HOME, home_recv_chunk[c * R + g] from gateway g;
 *     3. out[t] = the rows tok[first[t] .. first[t + 1]) (from Y, C1 or HOME) summed:
 *        high-throughput one per rank, in that order (ascending rank), the order of the
 *        single-host backends; low-latency one per valid k, in ascending k, row j weighted
 *        by w[t, tk[j]], its expert on rank rk[j], summed as on one host (epx.h: a partial
 *        sum per rank, k ascending in it, then the ranks ascending).
 * The exchanges inside the host come in parts, by where the token's source is:
 * EPX__HIER_LOCAL (this host: a dispatch record of its forwarder's own token, which needs
 * nothing from the network; a combine record that goes straight home) and, for another
 * host, one part per chunk of the network step, EPX__HIER_REMOTE + c (forwarded after
 * chunk c of a dispatch's network step; sent on home in chunk c of a combine's), so that
 * the local part runs while the network step does, and each chunk's part while the next
 * chunk crosses. Token t of a source with T tokens is in chunk c = t * chunks / T (every
 * rank learns every T from the dispatch's verdict). The network buffers (gw, FWD, home,
 * HOME) lie chunk by chunk, each chunk's segments by rank, as their *_chunk counts
 * [chunks * R] say.
 * Two layouts of the references, LSEND/LRECV and C1 (by_peer when built):
 *   part-major (the GPU path: one exchange per part): a part's references, its send and
 *     its receive buffer follow the earlier parts' (part q of fan starts at fan + the sum
 *     of n_fan[< q], its records at LSEND + that, its receive at LRECV + the sum of
 *     n_lrecv[< q]; the same for c1, back_send and back_recv), each part's segments by
 *     local rank;
 *   peer-major (the CPU path: one exchange, no overlap): by local rank, each one's parts in
 *     order back to back, so that local rank l's segment holds the sum over parts q of
 *     fan_send[q * LS + l] records (the same for the others).
 * Segments lie back to back in rank (local rank) order, each record one row (and its
 * scales or weights). Mine to me never travels: those rows are read where they are. */
#define EPX__HIER_REF(kind, index) (((int64_t)(kind) << 56) | (int64_t)(index))
#define EPX__HIER_REF_KIND(ref) ((int)((ref) >> 56))
#define EPX__HIER_REF_INDEX(ref) ((ref) & ((INT64_C(1) << 56) - 1))
enum { EPX__HIER_X = 0, EPX__HIER_FWD = 1, EPX__HIER_LRECV = 2 }; /* dispatch sources */
enum { EPX__HIER_Y = 0, EPX__HIER_C1 = 1, EPX__HIER_HOME = 2 };   /* combine sources */
#define EPX__HIER_MAX_CHUNKS EPX__MOE_MAX_CHUNKS /* of the network step */
enum { EPX__HIER_LOCAL = 0, EPX__HIER_REMOTE = 1, EPX__HIER_MAX_PARTS = 1 + EPX__HIER_MAX_CHUNKS };
typedef struct {
    int chunks, parts;                                          /* parts = 1 + chunks */
    int64_t *gw_chunk, *fwd_chunk, *home_send_chunk, *home_recv_chunk; /* [chunks * R] records */
    int64_t *fan_send, *fan_recv, *back_send, *back_recv;       /* [parts * LS] */
    int64_t n_fan[EPX__HIER_MAX_PARTS], n_lrecv[EPX__HIER_MAX_PARTS]; /* per part */
    int64_t n_back_send[EPX__HIER_MAX_PARTS], n_back_recv[EPX__HIER_MAX_PARTS];
    int64_t n_gw, n_fwd, n_home_send, n_home_recv, n_tok, rows, n_place;
    int T, K;
    bool ll;
    int64_t *ref; /* every reference and index, nref in all: the sections below point into it */
    size_t nref;
    int64_t *gw, *fan, *out, *c1, *home, *first, *tok;
    int64_t *tk, *rk, *prow, *pslot, *psrc, *count; /* low-latency: [n_tok] x 2, [n_place] x 3, [L]; else NULL */
    int64_t *mem; /* the count arrays */
} epx__hier_xplan_t;
/* Local: the row plan of handle h of context m. `chunks` (1 .. EPX__HIER_MAX_CHUNKS) must
 * be the same on every rank. The plan's arrays lie in the handle's memory (they last as
 * long as the handle), the builder's scratch in m's (until m's next call). On failure
 * (memory, or EPX_ERR_INTERNAL when the plan does not add up) *x holds nothing. */
epx_status_t epx__hier_xplan_build(epx__hier_moe_t *m, const epx__hier_moe_handle_t *h, bool by_peer, int chunks,
                                   epx__hier_xplan_t *x, epx__errbuf_t *err);
/* Bounds of the memory epx__hier_xplan_build takes (by peer or not, any chunks) for a
 * handle of a low-latency (ll) or high-throughput dispatch of T tokens of top-k K, with at
 * most nent entries of which nfwd forwarded, rows rows and fan records to the other local
 * ranks: *plan bytes of the handle's arena, *scratch of the context's scratch (as
 * epx__arena_need counts them), so that a caller that reserved them (epx__arena_reserve)
 * before its verdict builds the plan after it without allocating. Local. */
void epx__hier_xplan_need(const epx__hier_moe_t *m, bool ll, int T, int K, int64_t nent, int64_t nfwd, int64_t rows,
                          int64_t fan, size_t *plan, size_t *scratch);
/* The chunks of the network step of a MoE dispatch of shape s and of every call along its
 * handle, from src_tokens[R] (every rank's batch in the dispatch, the plan's src_tokens:
 * every rank gets the same): EPX_MOE_CHUNKS when set; else, where the forwarding can
 * overlap the network (`overlap`: the GPU path with several ranks per host), one per 8 MiB
 * of the rows of the dispatch's largest batch, at least 1 and at most
 * EPX__HIER_MAX_CHUNKS; else 1. */
int epx__hier_call_chunks(const epx__moe_shape_t *s, bool overlap, const int64_t *src_tokens, int R);
/* Where part `part` starts in a part-major buffer whose parts hold n[0..] records. */
static inline int64_t epx__hier_part_at(const int64_t *n, int part)
{
    int64_t at = 0;
    for (int q = 0; q < part; q++) at += n[q];
    return at;
}
void epx__hier_xplan_free(epx__hier_xplan_t *x);
int64_t epx__hier_moe_handle_rows(const epx__hier_moe_handle_t *h);
int epx__hier_moe_handle_tokens(const epx__hier_moe_handle_t *h);
int epx__hier_moe_handle_topk(const epx__hier_moe_handle_t *h);

#endif /* EPX_HIER_H */
