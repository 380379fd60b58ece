/* Internals of src/hier shared by its files. */
#ifndef EPX_HIER_INTERNAL_H
#define EPX_HIER_INTERNAL_H

#include "hier.h"

struct epx__hier {
    epx__topo_t t;
    epx__cpu_t *cpu;
    epx__net_t *net;       /* MPI, or NULL on a link of another kind */
    epx__hier_link_t link; /* what MoE calls */
    int64_t timeout_ms;
    uint32_t seq; /* operations so far (the same on every rank): tags of their messages */
    bool fault_count; /* EPX_FAULT count in the next operation (epx__hier_fault_count) */
    char *scratch;
    size_t scratch_bytes;
};

/* Tag of step `step` (< 64) of operation `seq`. */
static inline int epx__hier_tag(uint32_t seq, int step) { return (int)((seq & 63u) << 6) | (step & 63); }

/* Grow a malloc'd buffer to at least `bytes`. */
epx_status_t epx__hier_grow(char **buf, size_t *cap, size_t bytes, epx__errbuf_t *err);

/* Point-to-point batch over the net: start and wait. */
epx_status_t epx__hier_net_xchg(epx__hier_t *h, int tag, const void *const *sbuf, const int64_t *sbytes,
                                void *const *rbuf, const int64_t *rbytes, uint64_t deadline, epx__errbuf_t *err);

#endif
