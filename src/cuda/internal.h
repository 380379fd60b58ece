/*
 * CUDA backend internals shared by its host files (cuda.c: communicator, IPC, alltoallv;
 * moe.c: MoE dispatch/combine).
 */
#ifndef EPX_CUDA_INTERNAL_H
#define EPX_CUDA_INTERNAL_H

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <stdlib.h>
#include <string.h>

#include "cuda.h"
#include "dev.h"

#define EPX__IPC_CACHE 256 /* > 4 buffers x 31 peers: one call never evicts its own */
#define EPX__EXPORT_CACHE 8

/* One of my allocations and its IPC handle. */
typedef struct {
    unsigned long long id; /* CUDA's unique buffer id */
    cudaIpcMemHandle_t handle;
} epx__export_t;

#define EPX__CUDA_TRY(call, err, what)                                                              \
    do {                                                                                            \
        cudaError_t e_ = (call);                                                                    \
        if (e_ != cudaSuccess)                                                                      \
            return epx__fail(err, EPX_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(e_), #call);  \
    } while (0)

/* A buffer of epx's that the peers reach instead of a caller's buffer CUDA IPC cannot share
 * (epx__ipc_export_if): the data is copied into it, or out of it, on the call's stream. */
typedef struct {
    char *ptr;
    size_t bytes;
    bool captured; /* a capture used it: a graph may still copy into or out of it */
    void **kept;   /* buffers it replaced that a graph (or an exchange not yet enqueued) may use */
    int num_kept;
} epx__stage_buf_t;

/* Per mapping slot, the CUDA graphs alive (with their instances) whose captured work uses
 * it: a slot held by one is never evicted. Shared with the graphs' user objects, whose
 * destructors run on a CUDA thread, perhaps after the communicator is gone: atomics, and
 * freed by whoever drops the last reference. */
typedef struct {
    int refs;                  /* the communicator's, and one per hold */
    int held[EPX__IPC_CACHE];  /* holds per slot */
} epx__ipc_graph_holds_t;

/* A peer allocation opened here. */
typedef struct {
    int peer;
    unsigned long long buffer_id;
    cudaIpcMemHandle_t handle;
    void *ptr;
    uint64_t last_use;
    int pins; /* contexts holding it for their life (never evicted while > 0) */
} epx__ipc_entry_t;

struct epx__cuda {
    epx__cpu_t *host;
    int rank, nranks, device;
    epx__cuda_dev_t dev;   /* what kernels get */
    void *ctrl;            /* my flags, eager slots, epoch */
    size_t ctrl_bytes;
    void *peer_ctrl[EPX__CUDA_MAX_RANKS];
    epx__cuda_err_t *err_host;
    cudaStream_t side;     /* the self copy runs beside the peers' */
    cudaEvent_t fork, join;
    epx__ipc_entry_t ipc[EPX__IPC_CACHE];
    epx__ipc_graph_holds_t *graph_holds;
    uint64_t use_clock;
    epx__export_t exports[EPX__EXPORT_CACHE]; /* my allocations exported lately */
    int next_export;
    unsigned long long unshareable[EPX__EXPORT_CACHE]; /* buffer ids CUDA IPC cannot share, seen lately */
    int next_unshareable;
    uint64_t ops_started; /* MoE operations, the same count on every rank (names handles) */
    int64_t ce_bytes;     /* EPX_CUDA_COPY_ENGINE_BYTES, agreed at creation */
    uint64_t ipc_closed;  /* mappings closed so far (a call re-reads the ones it took when this moves) */
    epx__fault_t fault;   /* EPX_FAULT (core/fault.h) */
    uint32_t fault_step;  /* CUDA operations started (collective calls), for EPX_FAULT */
    void **mem;           /* epx_mem_alloc's allocations, freed at the latest with the communicator */
    int num_mem, cap_mem;
    epx__stage_buf_t a2a_stage; /* alltoall(v) receive buffers CUDA IPC cannot share: the peers write here */
};

/* ---- Fault injection (EPX_FAULT): one predictable branch per hook when unarmed ---- */
void epx__cuda_fault_begin_slow(epx__cuda_t *c);
void epx__cuda_fault_at_slow(epx__cuda_t *c, int at);
bool epx__cuda_fault_count_slow(epx__cuda_t *c);
/* At the start of every collective call: the step, a delay or a kill at host. */
static inline void epx__cuda_fault_begin(epx__cuda_t *c)
{
    c->fault_step++;
    if (__builtin_expect(c->fault.armed, 0)) epx__cuda_fault_begin_slow(c);
}
/* Before the host round on the call's mappings (EPX__FAULT_AT_MAPPED), after the host
 * exchanges, before the first kernel (EPX__FAULT_AT_ENQUEUE), or after the last one
 * (EPX__FAULT_AT_LAUNCHED): a delay or a kill due there. */
static inline void epx__cuda_fault_at(epx__cuda_t *c, int at)
{
    if (__builtin_expect(c->fault.armed, 0)) epx__cuda_fault_at_slow(c, at);
}
/* A `count` fault due in this call: the caller announces a wrong size. */
static inline bool epx__cuda_fault_count(epx__cuda_t *c)
{
    return __builtin_expect(c->fault.armed, 0) && epx__cuda_fault_count_slow(c);
}

/* What one rank tells another about an alltoallv: how much each sends the other... */
typedef struct {
    int64_t send_bytes, recv_bytes;
    int64_t max_pair_bytes; /* largest of my sends and receives */
} epx__a2a_card_t;

/* ... and, unless the operation is small enough for the eager slots, where in my receive
 * buffer the other's segment goes (peers write into it). */
typedef struct {
    cudaIpcMemHandle_t handle; /* of the allocation holding my receive buffer */
    unsigned long long buffer_id;
    int64_t base_offset;       /* recv - allocation base */
    int64_t recv_displ;
} epx__ipc_card_t;


/* Everyone's `bytes` of `mine` (rank-major into `all`) through the host transport. */
epx_status_t epx__host_allgather(epx__cpu_t *host, int nranks, const void *mine, void *all, size_t bytes,
                                 epx_status_t local, epx__errbuf_t *err);
/* Take part in one host exchange with the local failure `st` (the others get
 * EPX_ERR_REMOTE_INVALID at once instead of timing out); returns st, or what broke. */
epx_status_t epx__host_fail(epx__cpu_t *host, epx_status_t st, epx__errbuf_t *err);
/* Every rank's verdict on a step that may fail on one rank only (mapping the peers'
 * buffers), before anything is enqueued: every rank of the host calls it with its status
 * (one host round); returns st, or EPX_ERR_REMOTE_INVALID when another rank failed, or
 * what broke the round. */
epx_status_t epx__host_agree(epx__cuda_t *c, epx_status_t st, epx__errbuf_t *err);
/* epx__host_agree on the mappings of the peers' buffers a call just made; a delay or a
 * kill of EPX_FAULT at=mapped fires first. */
static inline epx_status_t epx__host_agree_mapped(epx__cuda_t *c, epx_status_t st, epx__errbuf_t *err)
{
    epx__cuda_fault_at(c, EPX__FAULT_AT_MAPPED);
    return epx__host_agree(c, st, err);
}
/* Send each peer its card (cards[p], `bytes` each) and get theirs (into cards + R * bytes). */
epx_status_t epx__swap_cards(epx__cuda_t *c, void *cards, size_t bytes, epx_status_t local, epx__errbuf_t *err);
/* The IPC handle of the allocation holding p, and p's offset in it (handles cached by CUDA's
 * unique buffer id, so a freed and reallocated address is never confused). Memory CUDA IPC
 * cannot share (a stream-ordered pool, cuMemCreate) is EPX_ERR_UNSUPPORTED; memory that is
 * not device memory, EPX_ERR_INVALID_ARGUMENT. */
epx_status_t epx__ipc_export(epx__cuda_t *c, const void *p, epx__ipc_card_t *card, epx__errbuf_t *err);
/* The same, but memory CUDA IPC cannot share is no error: *shareable is then false and the
 * card zero (the caller stages p's data in memory of its own). That is known from the failure
 * of cudaIpcGetMemHandle, confirmed by the driver (not IPC-capable), and remembered by buffer
 * id, so that no call fails again for it; shareable memory takes the very calls
 * epx__ipc_export always made. */
epx_status_t epx__ipc_export_if(epx__cuda_t *c, const void *p, epx__ipc_card_t *card, bool *shareable,
                                epx__errbuf_t *err);
/* The same, held until epx__ipc_unpin (kernels and captured graphs keep the pointer). */
epx_status_t epx__ipc_pin(epx__cuda_t *c, int peer, const epx__ipc_card_t *card, char **base, epx__errbuf_t *err);
void epx__ipc_unpin(epx__cuda_t *c, int peer, const void *base);
/* A peer's allocation mapped here (cached); *base is the allocation's base. With a `graph`
 * (being captured: epx__cuda_capture_graph), the graph holds the mapping (never evicted)
 * until it and its instances are destroyed. */
epx_status_t epx__ipc_open(epx__cuda_t *c, int peer, const epx__ipc_card_t *card, char **base, cudaGraph_t graph,
                           epx__errbuf_t *err);
/* Make b hold `need` bytes for a call on `stream` that stages `what` (for the messages), and
 * note whether a capture uses it. It grows only outside a capture (cudaMalloc is not allowed
 * in every capture mode): while capturing, a need above its size is EPX_ERR_INVALID_USAGE. The
 * buffer it replaces is kept until epx__stage_buf_free when a capture used it or when `keep`
 * (an exchange already promised it to the peers but is not enqueued yet); else freed once the
 * device is idle: every call that used it is complete, and their last waits are past, so no
 * peer reads or writes it any more. Growth is geometric (1.5x, 64 KiB granules). */
epx_status_t epx__stage_buf_reserve(epx__stage_buf_t *b, size_t need, bool keep, const char *what, void *stream,
                                    epx__errbuf_t *err);
void epx__stage_buf_free(epx__stage_buf_t *b);
/* The graph being captured on `stream` (*graph), NULL when none; EPX_ERR_CUDA when CUDA
 * cannot tell or the capture was invalidated. Asked once per call. */
epx_status_t epx__cuda_capture_graph(void *stream, cudaGraph_t *graph, epx__errbuf_t *err);

#endif
