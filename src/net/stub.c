/* src/net in a build without MPI: every entry point says so. */
#include "net.h"

#define EPX__NO_MPI(err) epx__fail(err, EPX_ERR_UNSUPPORTED, "this build of epx has no MPI engine (no MPI at build time)")

epx_status_t epx__net_create(epx__net_t **net, const void *mpi_comm, int64_t timeout_ms, epx__errbuf_t *err)
{
    (void)mpi_comm, (void)timeout_ms;
    *net = NULL;
    return EPX__NO_MPI(err);
}
void epx__net_destroy(epx__net_t *net, bool broken) { (void)net, (void)broken; }
void epx__net_abandon(void *buf) { (void)buf; }
void epx__net_on_progress(epx__net_t *net, void (*fn)(void *ctx), void *ctx) { (void)net, (void)fn, (void)ctx; }
int epx__net_rank(const epx__net_t *net) { return (void)net, 0; }
int epx__net_size(const epx__net_t *net) { return (void)net, 1; }
epx_status_t epx__net_topology(epx__net_t *net, int local_size, int *host_of, int *lrank_of, int *machine_ranks,
                               epx__errbuf_t *err)
{
    (void)net, (void)local_size, (void)host_of, (void)lrank_of, (void)machine_ranks;
    return EPX__NO_MPI(err);
}
epx_status_t epx__net_host_bcast(epx__net_t *net, void *buf, size_t len, epx__errbuf_t *err)
{
    (void)net, (void)buf, (void)len;
    return EPX__NO_MPI(err);
}
epx_status_t epx__net_allgather(epx__net_t *net, const void *mine, void *all, size_t len, epx__errbuf_t *err)
{
    (void)net, (void)mine, (void)all, (void)len;
    return EPX__NO_MPI(err);
}
epx_status_t epx__net_allreduce_sum(epx__net_t *net, int64_t *v, int n, epx__errbuf_t *err)
{
    (void)net, (void)v, (void)n;
    return EPX__NO_MPI(err);
}
epx_status_t epx__net_alltoall(epx__net_t *net, const int64_t *send, int64_t *recv, int words, epx__errbuf_t *err)
{
    (void)net, (void)send, (void)recv, (void)words;
    return EPX__NO_MPI(err);
}
epx_status_t epx__net_room(epx__net_t *net, size_t coll, int64_t bytes, epx__errbuf_t *err)
{
    (void)net, (void)coll, (void)bytes;
    return EPX__NO_MPI(err);
}
epx_status_t epx__net_start(epx__net_t *net, int tag, const void *const *sbuf, const int64_t *sbytes,
                            void *const *rbuf, const int64_t *rbytes, epx__errbuf_t *err)
{
    (void)net, (void)tag, (void)sbuf, (void)sbytes, (void)rbuf, (void)rbytes;
    return EPX__NO_MPI(err);
}
epx_status_t epx__net_wait(epx__net_t *net, epx__errbuf_t *err)
{
    (void)net;
    return EPX__NO_MPI(err);
}
