/*
 * epx with NCCL: communicators whose GPUs span several hosts. Installed with every build;
 * epx_comm_init_nccl returns EPX_ERR_UNSUPPORTED (with a message) in builds without NCCL
 * or where libnccl.so.2 cannot be loaded. No NCCL header is needed to include this one.
 *
 * A CUDA communicator made by epx_comm_init_rank / epx_comm_init_from_env whose ranks are
 * on several hosts (or on hosts simulated with EPX_LOCAL_SIZE) creates its NCCL
 * communicators itself, from epx's bootstrap. epx_comm_init_nccl adopts the caller's
 * instead. Either way hosts must hold the same number of ranks, numbered consecutively.
 *
 * CUDA graphs across hosts: the low-latency MoE calls (epx_moe_ll_*) can be captured, as
 * on one host, where they run on the device (the default up to 4 hosts; not with
 * EPX_MOE_LL_HOST=1, nor beyond 256 ranks): the ranks agree on each call at capture time, and a replay moves
 * everything with kernels and NCCL transfers on the stream. Every rank must capture the
 * same calls and replay them in the same order. A replay that waits on NCCL transfers
 * longer than EPX_TIMEOUT_MS (a rank on another host late or gone) makes epx's watchdog
 * abort the NCCL communicators epx made, so the stream ends; the communicator then reports
 * the error (epx_comm_get_async_error): destroy the graph, then abort the communicator
 * (NCCL's abort completes only once the graphs holding its work are gone; epx's runs on a
 * thread of its own, which epx_comm_destroy / epx_comm_abort wait for up to
 * min(EPX_TIMEOUT_MS, 10 s) and then leave running, with a warning; a destroy also waits
 * that long for NCCL's own finalisation first). With an adopted
 * NCCL communicator nothing aborts it and no watchdog times a replay: a replay whose peer
 * is gone waits until the caller aborts the NCCL communicator. Every
 * other collective call (barrier, alltoall, alltoallv, alltoallv_device, high-throughput
 * MoE, and low-latency on the host) and epx_moe_layout waits on the host, for its stream
 * and for the other hosts, so none can be captured. Given a stream that is being captured,
 * such a call fails before any collective step and leaves the capture valid: with
 * EPX_ERR_INVALID_USAGE on the capturing ranks, EPX_ERR_REMOTE_INVALID on the others
 * (epx_moe_layout, a local call, on the calling rank only); nothing is changed and the
 * communicator stays usable. The single-host rules of epx.h apply on one host.
 */
#ifndef EPX_PUBLIC_CUDA_H
#define EPX_PUBLIC_CUDA_H

#include "epx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Collective over the ranks of `nccl_comm`, an ncclComm_t passed as a pointer (ncclComm_t
 * is itself a pointer type: pass it as is). epx rank r is NCCL rank r; cfg may be NULL
 * (the backend is CUDA; cfg.device defaults to the NCCL communicator's device, and any
 * other device is EPX_ERR_INVALID_ARGUMENT). NCCL
 * carries epx's rendezvous id from rank 0 to the others, then the communicator is made as
 * by epx_comm_init_rank. When its ranks span several hosts, epx moves data between hosts
 * on `nccl_comm` (point-to-point, on the streams the calls are given); on one host it
 * uses NVLink only. The caller keeps ownership: destroy the epx communicator before
 * nccl_comm. epx never aborts it: after EPX_ERR_TIMEOUT, EPX_ERR_NCCL or
 * EPX_ERR_PEER_FAILURE the caller must ncclCommAbort it first, then epx_comm_abort (NCCL
 * kernels left running would otherwise hold up the device). Between calls no watchdog
 * aborts it (as one does the NCCL communicators epx makes): NCCL work a call left on a
 * stream waits for a dead peer until the caller aborts nccl_comm; epx_comm_get_async_error
 * reports an error NCCL reports on it. Waits are bounded by
 * EPX_TIMEOUT_MS only on a non-blocking NCCL communicator (ncclConfig_t.blocking = 0); a
 * blocking one may wait inside NCCL while a peer is late. Do not call it inside the
 * caller's own ncclGroupStart/End. Fails alike on every rank: a rank's bad argument is
 * agreed over NCCL (EPX_ERR_REMOTE_INVALID on the others); a rank that cannot take part at
 * all makes the others fail within EPX_TIMEOUT_MS, and then NCCL kernels may be left on the
 * communicator's streams: ncclCommAbort it. The error path never waits for the device. */
EPX_API epx_status_t epx_comm_init_nccl(epx_comm_t *comm, void *nccl_comm, const epx_config_t *cfg);

#ifdef __cplusplus
}
#endif

#endif /* EPX_PUBLIC_CUDA_H */
