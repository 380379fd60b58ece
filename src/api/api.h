/*
 * src/api: the public entry points. Validates arguments, owns the communicator object and
 * calls down into a backend (src/cpu, src/cuda, src/hier over src/cpu and src/net) and
 * src/core.
 */
#ifndef EPX_API_H
#define EPX_API_H

#include "../core/core.h"
#include "../cpu/cpu.h"
#include "../cuda/cuda.h"
#include "../hier/hier.h"
#include "../xhost/xhost.h"

/* int64 words of epx_comm's scratch per rank (coll.c). */
#define EPX__SCRATCH_PER_RANK 6

struct epx_comm {
    int rank, nranks;
    int local_rank, local_size, host, num_hosts;
    int backend;
    int64_t timeout_ms;
    uint64_t nonce;
    epx__boot_t *boot;
    epx__cpu_t *cpu;   /* shared memory: the CPU backend, and the control plane of CUDA */
    epx__cuda_t *cuda; /* the CUDA backend, when in use */
    epx__net_t *net;   /* MPI, when the comm was made from an MPI communicator */
    epx__hier_t *hier; /* the CPU backend across hosts (cpu = this host's ranks), when in use */
    epx__xhost_t *xh;  /* CUDA across hosts (cpu, cuda = this host's ranks; NCCL between), when in use */
    epx__boot_t *host_boot; /* the bootstrap of this host's ranks (CUDA across hosts) */
    epx_status_t async_error; /* set once a timeout or peer failure broke the comm */
    char async_msg[EPX__ERRMSG_LEN]; /* and the message that said why */
    int64_t *scratch;         /* EPX__SCRATCH_PER_RANK * nranks: byte counts for the backend, then
                                 alltoall's element counts (coll.c) */
    struct epx_moe *moes;     /* live MoE contexts, detached when the comm goes */
    /* Low-latency sends not yet received, oldest first: [0] dispatches, [1] combines. */
    struct epx_moe_handle *ll_pending[2][2];
    int ll_npending[2];
    /* EPX_FAULT on a communicator across hosts (hier, xh): its collective calls so far.
     * (On one host the backends count their own operations.) */
    epx__fault_t fault;
    uint32_t fault_step;
    bool fault_launched; /* an at=launched kill may be due when this call returns (xh) */
    epx__errbuf_t err;
};

/* The communicator is going (destroy or abort): release what its MoE contexts hold in
 * it; calls on them then return EPX_ERR_ABORTED until they are destroyed. */
void epx__moe_detach_all(epx_comm_t comm);

/* epx_comm_init_mpi's work, with `mpi_comm` pointing to the MPI_Comm (comm.c). */
epx_status_t epx__comm_init_net(epx_comm_t *comm, const void *mpi_comm, const epx_config_t *cfg);

/* A timeout a rank can meet the others with when its own is invalid: cfg_timeout_ms when
 * valid (> 0, not EPX_UNSET), else EPX_TIMEOUT_MS when valid, else its default. */
int64_t epx__timeout_fallback(int64_t cfg_timeout_ms);
/* epx_comm_init_rank's work; `nccl` (an epx__nccl_t *, or NULL) is an adopted NCCL
 * communicator that a CUDA communicator across hosts uses instead of making its own. */
epx_status_t epx__comm_init(epx_comm_t *comm, int nranks, int rank, const epx_unique_id_t *id, const epx_config_t *cfg,
                            void *nccl);

/* Validate `comm` and that it is still healthy; on error return the status to give back. */
epx_status_t epx__comm_check(epx_comm_t comm);
/* Does a collective call that returned `st` leave the communicator broken? Timeouts,
 * peer failures, aborts, errors of an engine (CUDA, NCCL, MPI) and internal errors do. */
bool epx__status_breaks(epx_status_t st);
/* The start of a collective call on a communicator across hosts (core/fault.h; CPU over
 * MPI, or CUDA over NCCL): the next step; a due `delay` sleeps, a due `kill` ends the
 * process (before the call posts anything), a due `count` (taken only when `local` is a
 * success and the call announces sizes: not epx_moe_create, nor barrier across GPU hosts)
 * makes the call announce a wrong size. Across GPU hosts src/xhost also learns which
 * at=enqueue entries may fire in the call, and an at=launched kill fires as the call
 * returns (epx__comm_result). Nothing when unarmed. */
void epx__comm_fault_slow(epx_comm_t comm, epx_status_t local, bool sized);
static inline void epx__comm_fault_begin(epx_comm_t comm, epx_status_t local, bool sized)
{
    comm->fault_step++;
    if (__builtin_expect(comm->fault.armed, 0)) epx__comm_fault_slow(comm, local, sized);
}

/* Record `st` from a backend call: statuses that break the comm break it (for good).
 * Every collective call returns through here, once. */
epx_status_t epx__comm_result(epx_comm_t comm, epx_status_t st);

#endif /* EPX_API_H */
