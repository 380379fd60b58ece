/* epx_comm_init_mpi (built with MPI only): the MPI_Comm crosses into the library here. */
#include "epx_mpi.h"

#include "api.h"

epx_status_t epx_comm_init_mpi(epx_comm_t *comm, MPI_Comm mpi_comm, const epx_config_t *cfg)
{
    return epx__comm_init_net(comm, &mpi_comm, cfg);
}
