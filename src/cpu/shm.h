/*
 * Internals of the CPU backend shared by its operations: the segment layout, the flag
 * waits, registered regions and reads of peer memory. See cpu.h for the protocol.
 */
#ifndef EPX_CPU_SHM_H
#define EPX_CPU_SHM_H

#include <stdatomic.h>
#include <sys/types.h>

#include "cpu.h"

#define EPX__SEG_MAGIC 0x47455359u
#define EPX__MAX_PEER_REGIONS 32
/* Copies go in pieces of at most this many bytes, each one a sign of progress (epx__moved). */
#define EPX__PIECE ((size_t)4 << 20)

/* Where a peer can read bytes of mine. */
typedef enum {
    EPX__LOC_NONE = 0,   /* nothing to read */
    EPX__LOC_EAGER = 1,  /* my eager slot [parity][reader] */
    EPX__LOC_REGION = 2, /* a registered region: id, size, offset */
    EPX__LOC_CMA = 3     /* my private memory at `addr`, read with process_vm_readv */
} epx__loc_kind_t;

typedef struct {
    uint32_t kind;
    uint32_t region_id;
    uint64_t region_size;
    uint64_t addr; /* region offset (REGION) or virtual address (CMA) */
} epx__loc_t;

typedef struct {
    _Atomic uint32_t value;
    _Atomic uint32_t waiters; /* sleepers on `value`: the poster wakes them */
} epx__flag_t;

/* Per (operation parity, reader): one cache line that the reader acquires — the post flag
 * (the operation number), my verdict on my own arguments, what I send the reader and
 * where it can read it, and what I expect from the reader. */
typedef struct {
    _Alignas(EPX__CACHELINE) epx__flag_t post;
    int32_t status;
    uint32_t kind; /* epx__call_kind_t: a peer in another kind of call is a mismatch */
    int64_t send_bytes;
    int64_t recv_bytes;
    epx__loc_t loc;
} epx__desc_t;
_Static_assert(sizeof(epx__desc_t) == EPX__CACHELINE, "descriptor is one cache line");

typedef struct {
    uint32_t magic;
    int32_t rank, nranks;
    int32_t pid;
    uint64_t nonce;
    uint64_t cma_probe_addr; /* address of a known word, to test process_vm_readv */
    uint64_t eager_bytes;
    /* Region ids 1 .. this were (or were about to be) created: the names a survivor removes
     * when my process died without removing them (epx__cpu_destroy). */
    _Atomic uint32_t regions_named;
    uint64_t pidns; /* my pid namespace (0: unknown); my region names carry it with my pid */
    /* The last operation whose posted data my readers may still use safely: its exposed
     * memory's readers were done (or it exposed none; its eager data stays until two
     * operations later). Never moves once `aborted` is set. */
    _Atomic uint32_t released_through;
    _Alignas(EPX__CACHELINE) epx__flag_t done; /* last operation whose reads I finished */
    _Alignas(EPX__CACHELINE) epx__flag_t aborted; /* EPX__ABORTED or EPX__BROKEN once set */
    /* When I last showed progress (the host's monotonic clock, read coarsely: up to a tick
     * late): I copied a piece (at most EPX__PIECE bytes) of an operation's data, or a peer I
     * was waiting for showed progress (relayed, so that a rank waiting on me then waits on).
     * A peer waiting for me counts its timeout from this when it is later than its wait's
     * start. */
    _Alignas(EPX__CACHELINE) _Atomic uint64_t alive_ns;
    _Atomic int32_t waiting_on; /* the peer I wait for past the spin, plus 1 (0: none) */
} epx__seg_hdr_t;

/* Values of the `aborted` flag: the rank aborted its communicator, or gave up on it (a
 * wait timed out or saw a failure). Either way it keeps none of its promises: peers must
 * not trust what it posted. */
#define EPX__ABORTED 1u
#define EPX__BROKEN 2u

typedef struct {
    uint32_t id;
    void *base;
    size_t size;
    uint64_t last_use;
} epx__region_t;

typedef struct {
    epx__seg_hdr_t *hdr; /* the peer's segment, mapped here */
    epx__region_t regions[EPX__MAX_PEER_REGIONS]; /* its regions mapped here (cache) */
    uint64_t liveness_check_ns;
} epx__peer_t;

/* An alltoallv-like operation's state between its opening and its end (alltoall.c). */
typedef struct {
    uint32_t seq;
    bool exposed; /* peers read memory of mine that outlives the operation */
} epx__xop_t;

struct epx__cpu {
    int rank, nranks;
    int *names; /* the communicator's rank of each local rank, for messages (NULL: the same) */
    bool rounds; /* its operations are host exchanges of another layer's calls (messages say so) */
    uint64_t nonce;
    int64_t timeout_ms;
    uint64_t spin_ns, yield_ns; /* how long a wait polls, then yields, before sleeping */
    size_t eager_bytes;
    bool cma_ok;
    /* A word whose address and value every peer knows, to test process_vm_readv (one per
     * communicator: several may be made at once by threads of one process). */
    volatile uint64_t cma_probe_word;
    uint32_t seq; /* last operation number */
    /* Set when a wait of this rank for its peers failed (epx__cpu_give_up): from then on
     * every operation fails at once with this status and message, before it writes or posts
     * anything (a slow reader may still read what this rank posted for an operation it had
     * released, and the next operation of the same parity would overwrite that). */
    epx_status_t gave_up;
    char gave_up_why[EPX__ERRMSG_LEN];
    epx__fault_t fault; /* EPX_FAULT, parsed at creation (fault.h) */

    void *seg;        /* my segment */
    size_t seg_bytes; /* every segment has this size */
    epx__peer_t *peers;

    epx__region_t *regions; /* my registered regions */
    int num_regions, cap_regions;
    uint32_t next_region_id;
    /* Freed regions whose names stay until every peer is past the operation in which it
     * was freed (a slower peer may still open it by name for that operation). */
    struct {
        uint32_t id, seq;
    } *retired;
    int num_retired, cap_retired;
    void *staging; /* a registered region for staging unregistered sends */
    size_t staging_bytes;
    uint64_t use_clock;
    epx__xop_t open; /* the exchange epx__cpu_exchange_begin left open */
    struct epx__cpu *live_prev, *live_next; /* the process's live instances (shm.c) */
};

/* Segment layout. */
epx__desc_t *epx__seg_desc(void *seg, int nranks, uint32_t seq, int peer);
char *epx__seg_eager(void *seg, int nranks, size_t eager_bytes, uint32_t seq, int peer);

/* Sequence numbers wrap: a >= b in the window sense. */
static inline bool epx__seq_geq(uint32_t a, uint32_t b) { return (int32_t)(a - b) >= 0; }

/* Publish `value` on a flag (release) and wake sleepers. */
void epx__flag_post(epx__flag_t *flag, uint32_t value);
/* Wait until `flag` (in peer's segment) >= target. PEER_FAILURE as soon as the peer is
 * gone, aborted or gave up; TIMEOUT once the peer showed no progress for the
 * communicator's timeout: counted from the wait's start, or from the peer's `alive_ns` when
 * that is later (read at every poll after the first spin, at least every 5 ms), so a slow
 * peer that moves, or one that waits for such a peer, is not a stalled one. A later
 * `alive_ns` seen is relayed into this rank's own (stamps are read with up to a tick of the
 * coarse clock's lateness allowed for). When the clock runs out on a peer that is itself
 * waiting (its `waiting_on`), it gets 100 ms more, so that its own verdict on the rank it
 * waits for (it gives up, naming that rank) comes first; else the timeout says whom it was
 * waiting for. A timeout names the peer's last operation on flag or, when given, its twin
 * (the same flag of the other parity: the peer may be one operation further than flag
 * shows). */
epx_status_t epx__flag_wait(epx__cpu_t *c, int peer, epx__flag_t *flag, const epx__flag_t *twin, uint32_t target,
                            const char *what, epx__errbuf_t *err);
/* Wait for every peer's post of operation `seq` to me (descriptor lines), then check that no
 * peer gave up without releasing what it posted (epx__peers_check). A failure leaves the
 * operation out of step: this rank gives up on the communicator (see gave_up). */
epx_status_t epx__wait_posts(epx__cpu_t *c, uint32_t seq, epx__errbuf_t *err);
/* Wait for every peer's done >= seq. */
epx_status_t epx__wait_dones(epx__cpu_t *c, uint32_t seq, epx__errbuf_t *err);

/* ---- One collective operation (see the protocol in cpu.h) ---- */

/* Start the next operation: its number (and a `delay` fault, when one is due). */
static inline uint32_t epx__op_begin(epx__cpu_t *c)
{
    uint32_t seq = ++c->seq;
    if (__builtin_expect(c->fault.armed, 0)) epx__fault_delay(&c->fault, seq);
    return seq;
}

/* Local rank r as messages name it: its rank in the communicator. */
static inline int epx__rank_name(const epx__cpu_t *c, int r) { return c->names ? c->names[r] : r; }

/* What messages call an operation of this shared memory. */
static inline const char *epx__op_word(const epx__cpu_t *c) { return c->rounds ? "host exchange" : "operation"; }

/* A sign of progress for the peers waiting for me: alive_ns is now. */
static inline void epx__stamp_alive(epx__cpu_t *c)
{
    atomic_store_explicit(&((epx__seg_hdr_t *)c->seg)->alive_ns, epx__now_coarse_ns(), memory_order_relaxed);
}

/* I copied another piece of data in operation `seq`: tell the peers waiting for me
 * (alive_ns), and pause when a `slow` fault aims at the operation. */
static inline void epx__moved(epx__cpu_t *c, uint32_t seq)
{
    epx__stamp_alive(c);
    if (__builtin_expect(c->fault.armed, 0)) epx__fault_slow(&c->fault, seq);
}

/* Has any peer aborted or given up on the communicator without having released what it
 * posted for operation `seq` (released_through)? Then what it posted (buffers the caller
 * owns) may be gone: EPX_ERR_PEER_FAILURE. Flags only, no system call. Checked once the
 * posts are acquired, before anything is written, and again after the reads, before a
 * success is returned: a peer gives up before it returns to its caller, so a read that
 * started before that check saw the peer's buffers intact. */
epx_status_t epx__peers_check(epx__cpu_t *c, uint32_t seq, epx__errbuf_t *err);

/* The kinds of operations: every rank must be in the same kind (the descriptors of the
 * others are laid out differently, and an older operation's may still be there). */
typedef enum { EPX__CALL_EXCHANGE = 1, EPX__CALL_MOE = 2 } epx__call_kind_t;

/* Post operation `seq` of `kind` to every peer with my verdict on my arguments (descriptor
 * fields other than the flag, status and kind must already be written). */
void epx__op_post(epx__cpu_t *c, uint32_t seq, epx__call_kind_t kind, epx_status_t status);
/* After epx__wait_posts: EPX_ERR_MISMATCH if a peer is in another kind of operation, else
 * EPX_ERR_REMOTE_INVALID if any peer rejected its arguments. */
epx_status_t epx__op_check_remote(epx__cpu_t *c, uint32_t seq, epx__call_kind_t kind, epx__errbuf_t *err);
/* Publish done = seq and, when peers read memory the caller owns (`exposed`), wait until
 * they all finished; then the operation is released (released_through). Returns `st`; when
 * that wait fails, its error whatever st was, and this rank gives up on the communicator
 * first (a reader may still be in memory its caller is about to take back). */
epx_status_t epx__op_finish(epx__cpu_t *c, uint32_t seq, bool exposed, epx_status_t st, epx__errbuf_t *err);

/* Buffers of mine that peers will read during one operation. */
typedef struct {
    const void *ptr;
    size_t bytes;
    epx__loc_t loc; /* out */
} epx__expose_t;
/* Fill each buffer's location: its registered region, else my memory for
 * process_vm_readv, else a copy in the staging region. Sets *exposed when peers will read
 * memory the caller owns or the staging region (then epx__op_finish must wait for them). */
epx_status_t epx__expose_buffers(epx__cpu_t *c, epx__expose_t *bufs, int n, bool *exposed, epx__errbuf_t *err);

/* Copy n rows of `row_bytes` from what `peer` exposed at `loc` (row i at byte offset
 * offsets[i]) to dst + i * dst_stride. */
epx_status_t epx__peer_rows_copy(epx__cpu_t *c, int peer, const epx__loc_t *loc, uint32_t seq, const int64_t *offsets,
                                 int64_t n, size_t row_bytes, char *dst, size_t dst_stride, epx__errbuf_t *err);
/* Pointers to n rows of `peer` at `loc`: straight into the mapping when it is mapped here,
 * else gathered into `scratch` (n * row_bytes). */
epx_status_t epx__peer_rows_ptrs(epx__cpu_t *c, int peer, const epx__loc_t *loc, uint32_t seq, const int64_t *offsets,
                                 int64_t n, size_t row_bytes, char *scratch, const char **ptrs, epx__errbuf_t *err);

/* Find my registered region holding [p, p+len), p inside it (an address one past a region's
 * end is not in it, even for len 0: it may be the start of the next region); fill `loc`
 * (addr = offset). */
bool epx__region_find(epx__cpu_t *c, const void *p, size_t len, epx__loc_t *loc);
/* A registered region of at least `bytes` to stage unregistered sends. */
epx_status_t epx__staging_get(epx__cpu_t *c, size_t bytes, void **base, epx__loc_t *loc,
                              epx__errbuf_t *err);

/* memcpy in pieces, each one a sign of progress (epx__moved) in operation `seq`. */
void epx__copy_moving(epx__cpu_t *c, uint32_t seq, void *dst, const void *src, size_t len);
/* Copy `len` bytes at offset `off` of what `peer` published in `loc` into `dst`. */
epx_status_t epx__peer_read(epx__cpu_t *c, int peer, const epx__loc_t *loc, uint32_t seq, uint64_t off,
                            void *dst, size_t len, epx__errbuf_t *err);
/* Make `loc` directly addressable here if it can be (eager, region, and anything of my
 * own when peer is this rank); NULL for a peer's CMA location. */
epx_status_t epx__peer_map(epx__cpu_t *c, int peer, const epx__loc_t *loc, uint32_t seq,
                           const char **base, epx__errbuf_t *err);

#endif /* EPX_CPU_SHM_H */
