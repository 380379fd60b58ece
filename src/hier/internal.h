/* Internals of src/hier shared by its files. */
#ifndef EPX_HIER_INTERNAL_H
#define EPX_HIER_INTERNAL_H

#include "hier.h"

struct epx__hier {
    epx__topo_t t;
    epx__cpu_t *cpu;
    epx__net_t *net;       /* MPI, or NULL on a link of another kind */
    epx__hier_link_t link; /* what MoE calls */
    uint32_t seq; /* operations so far (the same on every rank): tags of their messages */
    bool fault_count; /* EPX_FAULT count in the next operation (epx__hier_fault_count) */
    bool fault_nomem; /* EPX_FAULT nomem in the next operation (epx__hier_fault_nomem) */
    int slow_ms;      /* EPX_FAULT slow in this operation (epx__hier_fault_slow) */
    epx_status_t left; /* a MoE call failed after its verdict, its peers still in it (epx__hier_take_left) */
    char *scratch;
    size_t scratch_bytes;
    /* Arrays of a call (one at a time), made at creation so that a call allocates nothing
     * once its peers expect it (a rank that failed there would leave them waiting):
     * alltoallv's letters out and in [2 R] (MPI only: a card and room for small data),
     * net pointers [R] x 2 and sizes [2 R], local transfer [4 LS] and bad pairs [R];
     * MoE's exchanges use sp, rp and lx too (moe.c). */
    char *letters;
    const void **sp;
    void **rp;
    int64_t *sb, *lx;
    bool *bad;
};

/* Work buffers of a context, kept across calls: once warm, the data path neither allocates
 * nor faults pages in. Those the local ranks read from (B_SEND, B_LSEND) are registered
 * shared memory: peers read them where they are, without a system call. */
enum { EPX__B_SEND, EPX__B_LSEND, EPX__B_FWD, EPX__B_RECV, EPX__B_HOME, EPX__NBUF };
enum { EPX__NREG = 2 }; /* buffers below this index are registered */

struct epx__hier_moe {
    epx__hier_t *h;
    epx__moe_shape_t s;
    uint8_t *ll_q;   /* low-latency FP8: my tokens quantised, [max_tokens, H] */
    char *ll_scales; /* and their scales */
    char *buf[EPX__NBUF];
    size_t cap[EPX__NBUF];
    int64_t *verdict; /* the verdict's blocks out and in, [2, R, EPX__V_FLOWS] */
    int32_t *rank_of_expert, *host_of_expert; /* [E]: expert e's rank, and its host */
    bool fan_open;      /* epx__route left its intra-host exchange open (epx__route_end) */
    epx__arena_t spare; /* the memory of the last handle freed, for the next */
    epx__arena_t tmp;   /* a call's own arrays, released when the next call starts */
};

/* The arena a handle's arrays (and its row plan) lie in, recycled through its context. */
epx__arena_t *epx__hier_moe_handle_mem(const epx__hier_moe_handle_t *h);

/* Tag of step `step` (< 64) of operation `seq`. */
static inline int epx__hier_tag(uint32_t seq, int step) { return (int)((seq & 63u) << 6) | (step & 63); }

/* Grow a malloc'd buffer to at least `bytes` (err NULL: fail without a message). */
epx_status_t epx__hier_grow(char **buf, size_t *cap, size_t bytes, epx__errbuf_t *err);

/* Point-to-point batch over the net: start and wait. */
epx_status_t epx__hier_net_xchg(epx__hier_t *h, int tag, const void *const *sbuf, const int64_t *sbytes,
                                void *const *rbuf, const int64_t *rbytes, epx__errbuf_t *err);

#endif
