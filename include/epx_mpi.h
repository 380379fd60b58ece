/*
 * epx over MPI: communicators made from an MPI communicator (CPU ranks on one or several
 * hosts). Installed and built when the library was built with MPI; include <mpi.h> first
 * or let this header do it.
 */
#ifndef EPX_MPI_H
#define EPX_MPI_H

#include <mpi.h>

#include "epx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Collective over `mpi_comm` (MPI must be initialised): a communicator of the same ranks,
 * rank r of epx being rank r of mpi_comm. Ranks are grouped into hosts by shared memory
 * (MPI_COMM_TYPE_SHARED), or in blocks of EPX_LOCAL_SIZE consecutive ranks when that is
 * set, to simulate several hosts. Inside a host ranks exchange through shared memory;
 * between hosts through MPI on a duplicate of mpi_comm, made here. A communicator that
 * spans several hosts runs every operation of the CPU backend with the same results, bit
 * for bit, as the ranks on one host would get. The CPU backend only (cfg may be NULL; a
 * rank that asks for cfg.backend CUDA gets EPX_ERR_UNSUPPORTED, the others
 * EPX_ERR_REMOTE_INVALID). Fails on every rank alike. Destroy the communicator before
 * MPI_Finalize. */
EPX_API epx_status_t epx_comm_init_mpi(epx_comm_t *comm, MPI_Comm mpi_comm, const epx_config_t *cfg);

#ifdef __cplusplus
}
#endif

#endif /* EPX_MPI_H */
