/*
 * What kernels see of a communicator (passed by value), and the kernel launchers. Shared
 * by the host code (C) and the kernels (CUDA C).
 */
#ifndef EPX_CUDA_DEV_H
#define EPX_CUDA_DEV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EPX__CUDA_MAX_RANKS 32   /* ranks of one host */
#define EPX__FLAG_STRIDE 16      /* u64 per flag: one 128-byte line each */
#define EPX__SLOT_HDR 128        /* eager slot: flag line, then data */

/* ARRIVE and DONE hold operation numbers; WRITTEN counts the blocks of a peer's direct
 * kernels that finished writing into me (EPX__DIRECT_BLOCKS per operation); FAILED, with
 * the failure relay on (`relay`), the last operation whose segments a peer sent me after
 * its device had recorded an error (they may carry what it received incompletely). The
 * low-latency flags hold low-latency sequence numbers (see ll_seq): LL, 2 s + c for the
 * dispatch send s whose rows and routing a peer finished pushing into me, c = 1 when that
 * peer had then received every dispatch before s (so it no longer reads the staging half
 * that send s + 1 fills); LLC_ARRIVE, the combine send a peer made (on one host its
 * weights are in my staging; across hosts its expert outputs are published); LLC_DONE
 * (across hosts), the combine receive a peer finished (it no longer reads mine); LLC_PART
 * (one host), the combine receive whose partial sums for my tokens a peer pushed into me. */
enum {
    EPX__FLAG_ARRIVE = 0,
    EPX__FLAG_DONE = 1,
    EPX__FLAG_WRITTEN = 2,
    EPX__FLAG_LL = 3,
    EPX__FLAG_LLC_ARRIVE = 4,
    EPX__FLAG_LLC_DONE = 5,
    EPX__FLAG_FAILED = 6,
    EPX__FLAG_LLC_PART = 7,
    EPX__FLAG_KINDS = 8
};

/* Low-latency sequences (ll_seq[] and their last-block counters ll_blocks[]): each counts
 * the kernels of its kind my stream finished. Sends and receives are numbered apart, so
 * two batches can be in flight between a send and its receive. */
enum { EPX__LL_DISPATCH_SENT = 0, EPX__LL_DISPATCH_RECVD = 1, EPX__LL_COMBINE_SENT = 2, EPX__LL_COMBINE_RECVD = 3 };
/* Kernels (or steps) that count their blocks but keep no sequence of their own (they run
 * under the dispatch send's, and the combine receive's, number): ll_blocks[] only. FORWARD
 * and GATHER across hosts; PART, a combine receive's blocks done pushing partial sums. */
enum { EPX__LL_FORWARD = 4, EPX__LL_GATHER = 5, EPX__LL_PART = 6 };

/* Blocks of the direct alltoallv kernel: the same on every rank by construction. */
#define EPX__DIRECT_BLOCKS 32

/* Error record in host-mapped memory, written once, by the first error the device records
 * (flags.cuh: epx__record_error, its only writer): its code is claimed (EPX__ERR_CLAIMED,
 * "being written": not an error yet), the fields written, then the status stored. An
 * EPX_ERR_PEER_FAILURE says in `wanted` where it came from (a status across hosts, or a
 * local peer's FAILED flag); `peer` EPX__PEER_INJECTED marks a failure that EPX_FAULT
 * injected (core/fault.h: fail; a kernel, epx__cuda_launch_inject). */
#define EPX__ERR_CLAIMED (-2147483647 - 1)
enum { EPX__RELAYED_ACROSS = 0, EPX__RELAYED_LOCAL = 1 };
#define EPX__PEER_INJECTED (-2)
typedef struct {
    int32_t code; /* 0, or an epx_status_t */
    int32_t peer;
    uint64_t op;
    uint64_t seen, wanted;
} epx__cuda_err_t;

typedef struct {
    int rank, nranks;
    unsigned long long *epoch;  /* operations finished by my stream */
    unsigned long long *direct_ops; /* of which direct alltoallv kernels (same on every rank) */
    unsigned int *blocks_left;  /* scratch counter for "last block" detection */
    unsigned long long *ll_seq; /* [4] low-latency sequences (EPX__LL_*) */
    unsigned int *ll_blocks;    /* [7] their "last block" counters, then FORWARD's, GATHER's, PART's */
    unsigned long long *flags;  /* mine: [kind][src] * EPX__FLAG_STRIDE */
    unsigned long long *peer_flags[EPX__CUDA_MAX_RANKS];
    char *eager;                /* mine: [parity][src] slots of eager_bytes + EPX__SLOT_HDR */
    char *peer_eager[EPX__CUDA_MAX_RANKS];
    unsigned long long eager_bytes;
    epx__cuda_err_t *err;       /* device pointer to host-mapped memory */
    unsigned int *failed;       /* nonzero once my device has recorded an error other than
                                   EPX_ERR_MISMATCH, even one being written (epx__record_error
                                   sets it first): what the failure relay reads, in device
                                   memory (the record is a PCIe trip away) */
    unsigned long long timeout_ns;
    int relay;                  /* the failure relay of the alltoallv kernels (epx__cuda_relay_failures) */
} epx__cuda_dev_t;

/* Per-peer byte counts and displacements of one small alltoallv (by value). */
typedef struct {
    const char *send;
    char *recv;
    long long send_bytes[EPX__CUDA_MAX_RANKS], send_displ[EPX__CUDA_MAX_RANKS];
    long long recv_bytes[EPX__CUDA_MAX_RANKS], recv_displ[EPX__CUDA_MAX_RANKS];
} epx__cuda_a2a_args_t;

/* One direct alltoallv: every rank writes each peer's segment straight into that peer's
 * receive buffer (mapped here), with SM stores. dst[p] is already offset; dst[me] is mine. */
typedef struct {
    const char *src[EPX__CUDA_MAX_RANKS];
    char *dst[EPX__CUDA_MAX_RANKS];
    long long bytes[EPX__CUDA_MAX_RANKS];
    /* Counts on the device (elem > 0): src, dst and bytes come from these instead (dst[p]
     * is then p's receive buffer, not yet offset). Each peer's are mapped here. */
    long long elem;
    const long long *send_counts, *send_displs; /* mine */
    const long long *recv_counts[EPX__CUDA_MAX_RANKS], *recv_displs[EPX__CUDA_MAX_RANKS];
    int fault_to; /* EPX_FAULT count (device counts): 1 + the peer I announce one element too many; 0: none */
} epx__cuda_direct_args_t;

/* ---- MoE high-throughput (moe_kernels.cu) ---- */

/* Every rank's routing, as mapped here. */
typedef struct {
    int rank, nranks, num_experts, local_experts, topk, index_i64;
    const void *topk_idx[EPX__CUDA_MAX_RANKS]; /* [T_p, K] of each rank */
    const float *weights[EPX__CUDA_MAX_RANKS]; /* [T_p, K] or NULL */
    int num_tokens[EPX__CUDA_MAX_RANKS];
} epx__moe_routing_t;

/* Tokens of one source handled by one block of the count and row kernels. */
#define EPX__MOE_CHUNK 256
/* The bad-entry word before the count kernel (every byte 0x7f): above any t * K + k. */
#define EPX__MOE_NO_BAD 0x7f7f7f7f7f7f7f7fLL

/* Outputs of the row pass (any may be NULL except the handle's arrays). */
typedef struct {
    int *counts;             /* [R, R]: tokens of rank p for rank r; then the kernel's block
                                counter: the last block zeroes both (see epx__cuda_launch_moe_rows) */
    const int *chunk_counts; /* [R, chunks, R]: the same per chunk of EPX__MOE_CHUNK tokens */
    int chunks;
    void *recv_topk_idx;   /* [cap, K] local ids */
    float *recv_topk_weights;
    int *recv_src_rank, *recv_src_token;
    int *expert_counts;    /* [L] scratch, zeroed by the count kernel */
    int *per_expert;       /* [L] the caller's rows per expert, rounded up to `align`, or NULL */
    int align;
    int *h_src_rank, *h_src_token; /* [cap] the handle's copy */
    int *h_send_row;       /* [T_me, R] */
    long long *bad;        /* the count kernel's verdict: rows are laid out only when clean */
    long long *h_rows;     /* the handle's row count: N, or -1 when the routing was bad */
    long long *num_recv;   /* the caller's copy of h_rows (device), or NULL */
} epx__moe_rows_out_t;

typedef struct {
    const char *x[EPX__CUDA_MAX_RANKS];      /* rows of each rank */
    const char *scales[EPX__CUDA_MAX_RANKS]; /* FP8 scales of each rank, or NULL */
    const int *src_rank, *src_token;         /* [rows] */
    const long long *rows;                   /* device: rows to copy (none when < 0) */
    long long row_bytes, scale_bytes;
    char *recv_x, *recv_scales;
} epx__moe_gather_t;

/* Copy-engine dispatch, the local half: my tokens [t0, t1) copied, each to every rank q it
 * goes to (send_row[t, q] >= 0), as row send_row[t, q] - base[q] of dst[q] (scales of
 * dst_s[q]); with `self` only q = me, else every q but me. */
typedef struct {
    const char *x, *scales;                  /* my rows and FP8 scales (or NULL) */
    const int *send_row;                     /* [T, R] */
    int nranks, rank, self, t0, t1;
    long long row_bytes, scale_bytes;
    char *dst[EPX__CUDA_MAX_RANKS], *dst_s[EPX__CUDA_MAX_RANKS];
    long long base[EPX__CUDA_MAX_RANKS];
} epx__moe_pack_t;

typedef struct {
    const char *y[EPX__CUDA_MAX_RANKS];      /* [N_r, H] of each rank (row_base[r] is its first row) */
    const float *w[EPX__CUDA_MAX_RANKS];     /* [N_r, K] of each rank, or NULL */
    long long row_base[EPX__CUDA_MAX_RANKS]; /* row i of rank r is y[r][i - row_base[r]] (0: all of N_r) */
    const int *send_row;                     /* [T, R] */
    const long long *rows;                   /* the handle's row count: nothing is written when < 0 */
    int num_tokens, nranks, topk, hidden, dtype; /* dtype: epx_dtype_t of y and out */
    char *out;
    float *out_w;
} epx__moe_combine_t;

/* ---- MoE low-latency (ll_kernels.cu) ---- */

/* Sources of a low-latency context: at most this many ranks (the receive reads each one's
 * count with a thread of its own, and keeps it in shared memory). */
#define EPX__LL_MAX_SRCS 256
/* A block header across hosts (int32): [0] T (dispatch), [1] the sequence number of the
 * send or receive it belongs to, [2] EPX__LL_TAG_FINE or _FAILED (the sender's device had
 * recorded an error), [3] that error's code. A block whose [1] and [2] do not say this
 * operation (its transfer was cut short) counts as a failed peer's. A combine's y blocks
 * carry the same fields with tags of their own (EPX__LL_YTAG), so a block of one kind is
 * never taken for the other. */
enum { EPX__LL_TAG_FAILED = 0x4c4c4601, EPX__LL_TAG_FINE = 0x4c4c4602 };
#define EPX__LL_YTAG 0x100 /* added to a tag in a y block */

/* Low-latency across hosts (src/xhost): every rank sends its whole source block (header,
 * then max_tokens rows as staged) to the rank of its local index on every other host (its
 * rail peers) over NCCL, and that rank forwards it inside its host. Blocks are `blk`
 * bytes. The combine sends home, along the same rails, one row per (token, k) whose expert
 * lives on the gateway's host: y blocks of `yblk` bytes (a 128-byte header as above, then
 * rows [max_tokens, K]). */
typedef struct {
    int nhosts, host;     /* 0 on one host */
    char *out;            /* my source block for the rails */
    const char *in;       /* [nhosts] the blocks my rail peers sent me (mine unused) */
    long long blk;
    int *live;            /* device: 1 when my last send found its staging half free */
    int *topk, *slot;     /* the handle: [nhosts, max_tokens, K] my rail peers' routing, and
                             each (token, k)'s slot where its expert is on my host */
    char *y_out;          /* [nhosts] y blocks for my rail peers (mine unused) */
    const char *y_in;     /* [nhosts] y blocks they sent me (mine unused) */
    long long yblk;
    /* Host-mapped, or NULL: how far my steps around the NCCL transfers got, for src/xhost's
     * watch (a graph replay has no host call to time them): [0] the sequence of my last
     * dispatch send done before its rail transfers, [1] of my last forward after them; [2]
     * and [3] the same around a combine receive's (gather, then sum). Unequal pairs: a
     * transfer in flight. */
    unsigned long long *mark;
} epx__ll_rail_t;

/* One low-latency dispatch. Every rank owns a staging area that peers push into, two of
 * them (by the parity of the send's sequence number); each holds, per source rank, a header (T, then its routing
 * as int32 [max_tokens, K]) and its token rows [max_tokens] of srow bytes (the row as
 * received: FP8 bytes then scales when quantised, else the input row). */
typedef struct {
    int rank, nranks, num_experts, local_experts, topk, max_tokens, hidden, num_tokens;
    int index_i64, fp8, ue8m0, in_bytes;       /* in_bytes: bytes per input element */
    long long srow, row_bytes, scale_bytes;    /* staged row, its payload, its scales */
    long long scale_off;                       /* where the scales start in a staged row */
    int vec;                                   /* rows of 16-byte chunks, 16-byte aligned x:
                                                  one thread per chunk */
    long long hdr_bytes, half_bytes;           /* one source's header; one parity's area */
    long long slots;                           /* R * max_tokens slots per local expert */
    const void *x, *topk_idx;                  /* mine */
    char *stage[EPX__CUDA_MAX_RANKS];          /* every rank's staging area, mapped here */
    char *recv_x, *recv_scales;                /* [L, slots, row] and [L, slots, scale] */
    int *recv_count, *recv_src_rank, *recv_src_token;
    int *h_slot, *h_topk;                      /* the handle: [T, K] slot and expert of mine */
    int *h_bad;                                /* the handle: 1 when some routing was bad */
    /* The handle, one host only (else NULL), for the combine: every source's T, its routing
     * [srcs, max_tokens, K] (its first T tokens; a peer's only, not mine) and, where the
     * expert is mine, the slot. */
    int *h_ptok, *h_proute, *h_pslot;
    /* Sources: srcs ranks (all of them; nranks on one host), mine is me_src; this host's
     * ranks (nranks, flags and staging) are sources dest0 .. dest0 + nranks - 1. */
    int srcs, me_src, dest0;
    epx__ll_rail_t rail;                       /* across hosts */
} epx__ll_args_t;

typedef struct {
    const char *y[EPX__CUDA_MAX_RANKS]; /* each local rank's [L, slots, H] expert outputs, mapped */
    const float *w;                     /* [T, K] */
    const int *h_slot, *h_topk, *h_bad;
    int num_tokens, topk, local_experts, hidden, dtype;
    int vec;                            /* rows of 16-byte chunks (H % 8 == 0, f32: H % 4), y and
                                           out 16-byte aligned */
    long long slots;
    char *out;
    int nranks, dest0, max_tokens;      /* this host's ranks are dest0 .. dest0 + nranks - 1 */
    epx__ll_rail_t rail;                /* across hosts: rows of other hosts' experts come in y_in */
    /* One host: each rank's combine staging (two halves of chalf bytes, by the sequence's
     * parity), mapped here. The half of rank o holds each source p's weights [max_tokens, K]
     * (float32, from cw_off), and, from cp_off, what each expert rank q sent home for o's
     * tokens [q, max_tokens] (rows of prow bytes; see epx__cuda_launch_ll_combine). */
    char *cstage[EPX__CUDA_MAX_RANKS];
    long long chalf, cw_off, cp_off, prow;
    const int *h_ptok, *h_proute, *h_pslot; /* the handle's (epx__ll_args_t) */
    int rank, most_tokens;                  /* my rank; the largest T of any rank */
} epx__ll_combine_t;

/* Dispatch send s: once every destination is done with the staging half of s's parity
 * (its receive s - 2 finished: known from its LL flag, else read from its sequence), push
 * my rows (quantised when fp8) and my routing into the peers' staging areas, then set my
 * LL flag at each. */
int epx__cuda_launch_ll_send(const epx__cuda_dev_t *d, const epx__ll_args_t *a, int blocks, void *stream);
/* Dispatch receive s (the oldest send not received): wait for every peer's LL flag, then
 * lay out my experts' slots (sources ascending, tokens ascending) and the handle's slots;
 * with bad routing anywhere, every count is -1 and nothing else is written. `behind_send`:
 * enqueued right behind send s on one host; it may then start while the send runs
 * (programmatic dependent launch; it waits for the send's grid before reading). */
int epx__cuda_launch_ll_receive(const epx__cuda_dev_t *d, const epx__ll_args_t *a, int behind_send, void *stream);
/* Across hosts, after the send's NCCL step (on its stream): the blocks my rail peers sent
 * (checked: a missing or failed one records EPX_ERR_PEER_FAILURE) into the staging areas
 * of this host's ranks, as if their sources had pushed them; then my LL flag at each, for
 * my send and these (the send left it to this kernel). */
int epx__cuda_launch_ll_forward(const epx__cuda_dev_t *d, const epx__ll_args_t *a, void *stream);
/* Across hosts, the combine receive's first step: wait for every local peer's LLC_ARRIVE,
 * then into my y block for each rail peer, the row of every (token, k) of its whose expert
 * lives on this host, and the block's header. */
int epx__cuda_launch_ll_gather(const epx__cuda_dev_t *d, const epx__ll_combine_t *c, void *stream);
/* Combine send s. Across hosts: my expert outputs are ready to be read (LLC_ARRIVE = s at
 * every peer). On one host: my weights pushed into every peer's combine staging, then
 * LLC_ARRIVE = s there. */
int epx__cuda_launch_ll_combine_send(const epx__cuda_dev_t *d, const epx__ll_combine_t *c, void *stream);
/* Combine receive s (with `send_too`, send s first, in the same kernel): out[t] = over the
 * expert ranks ascending, the sum of each rank's partial, the sum of w[t,k] * y[e_k][slot]
 * over its k ascending (float32 products and sums: epx.h). Across hosts: wait for every
 * peer's LLC_ARRIVE, read the rows, then tell the peers and wait until all are done
 * reading. On one host the expert's rank adds up the partial: wait for every peer's
 * LLC_ARRIVE (its weights are here, and it is done with what I last sent it in this
 * half), push into each peer p, for each of its tokens with experts here, one row: the
 * y row itself when the token has one expert here, else the float32 partial; LLC_PART = s
 * at p; then wait for every peer's LLC_PART and sum. Nobody reads a peer's y. */
int epx__cuda_launch_ll_combine(const epx__cuda_dev_t *d, const epx__ll_combine_t *c, int send_too, int blocks,
                                void *stream); /* blocks: across hosts only (one host sizes its own grid) */

/* counts[p, r] (zero before: see the row kernel) and chunk_counts[p, c, r] for every source
 * p and chunk c; *bad (EPX__MOE_NO_BAD before) = first t*K+k of my routing out of [-1, E),
 * or with `check_all` a value below EPX__MOE_NO_BAD when any rank's routing has one (every
 * rank then agrees without asking the others); expert_counts[L] zeroed for the row kernel.
 * One block per (source, chunk). With `arrive` (the communicator), the kernel also is the
 * operation's ARRIVE step (epx__arrive: each block waits for its source). */
int epx__cuda_launch_moe_count(const epx__moe_routing_t *r, int *counts, int *chunk_counts, int chunks, long long *bad,
                               int check_all, int *expert_counts, const epx__cuda_dev_t *arrive, void *stream);
/* My routing checked and laid out in one launch of at most `blocks` blocks: every output
 * written (any may be NULL), or, when an expert id is out of [-1, E), -1 in every count
 * (in_rank then undefined). *bad is EPX__MOE_NO_BAD before and after; scratch: [R + E + 1]
 * ints of epx's own, zero before and after. */
int epx__cuda_launch_moe_layout_checked(const epx__moe_routing_t *r, int *per_rank, int *per_expert,
                                        unsigned char *in_rank, long long *bad, int *scratch, int blocks, void *stream);
/* Rows of every source for me, their routing outputs, my tokens' rows at every rank and the
 * rows per expert; nothing but h_rows = -1 (and num_recv) when *bad says the routing was
 * bad. Its last block leaves counts (and its counter) zero and *bad EPX__MOE_NO_BAD, as the
 * next count kernel needs them. */
int epx__cuda_launch_moe_rows(const epx__moe_routing_t *r, const epx__moe_rows_out_t *o, void *stream);
/* Steps of an operation that a kernel can take itself (flags.cuh: epx__arrive, epx__done),
 * each instead of a launch of epx__cuda_launch_signal_wait: ARRIVE before its reads of the
 * peers, DONE (the operation complete) after them. */
enum { EPX__STEP_ARRIVE = 1, EPX__STEP_DONE = 2 };
/* Copy rows (and scales) from their sources; `steps` (with d, the communicator) as above. */
int epx__cuda_launch_moe_gather(const epx__moe_gather_t *g, const epx__cuda_dev_t *d, int steps, int blocks,
                                void *stream);
/* Sum every token's rows in ascending rank order (float32 from +0), then cast; `steps` as
 * above (with steps, the kernel runs even without tokens). */
int epx__cuda_launch_moe_combine(const epx__moe_combine_t *c, const epx__cuda_dev_t *d, int steps, int blocks,
                                 void *stream);
/* Copy-engine dispatch: pack my rows of tokens [t0, t1) into their destinations (local). */
int epx__cuda_launch_moe_pack(const epx__moe_pack_t *k, int blocks, void *stream);
/* Copy rows [0, n) of `row_bytes` each from src to dst (local), n = *rows read on the device
 * in stream order, taken as 0 when negative and as max_rows above it. */
int epx__cuda_launch_copy_rows(void *dst, const void *src, const long long *rows, long long max_rows,
                               long long row_bytes, int blocks, void *stream);

/* Signal `kind` to every peer and wait for theirs (bounded); with `finish`, the operation
 * is complete afterwards (epoch advances). Returns a cudaError_t as int. */
int epx__cuda_launch_signal_wait(const epx__cuda_dev_t *d, int kind, int finish, void *stream);
/* The whole of a small alltoallv in one kernel, through the eager slots. */
int epx__cuda_launch_eager_alltoallv(const epx__cuda_dev_t *d, const epx__cuda_a2a_args_t *a, void *stream);
/* The whole of a mid-size alltoallv in one kernel, written straight into the peers. */
int epx__cuda_launch_direct_alltoallv(const epx__cuda_dev_t *d, const epx__cuda_direct_args_t *a, void *stream);
/* The failure relay of cuda.h (epx__cuda_status_out / _check): a status is int32 {failed,
 * rank, the error code seen, 0}. */
int epx__cuda_launch_status_out(const epx__cuda_dev_t *d, int rank, unsigned seq, int *out, void *stream);
int epx__cuda_launch_status_check(const epx__cuda_dev_t *d, const int *in, int first, int step, int count, int self,
                                  unsigned seq, void *stream);
/* EPX_FAULT fail (cuda.h: epx__cuda_inject_failure): record `code` on my device, peer
 * EPX__PEER_INJECTED, op, seen and wanted 0 (the first error stays). */
int epx__cuda_launch_inject(const epx__cuda_dev_t *d, int code, void *stream);

#ifdef __cplusplus
}
#endif

#endif
