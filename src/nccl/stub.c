/* src/nccl in a build without NCCL headers: every entry point says so. */
#include "nccl.h"

#define EPX__NO_NCCL(err) epx__fail(err, EPX_ERR_UNSUPPORTED, "this build of epx has no NCCL engine (no NCCL at build time)")

bool epx__nccl_available(const char **why)
{
    if (why) *why = "this build of epx has no NCCL engine";
    return false;
}
epx_status_t epx__nccl_get_id(void *id, epx__errbuf_t *err) { return (void)id, EPX__NO_NCCL(err); }
epx_status_t epx__nccl_create(epx__nccl_t **nccl, int nranks, int rank, const void *id, int64_t timeout_ms,
                              const epx__nccl_watch_t *watch, epx__errbuf_t *err)
{
    (void)nranks, (void)rank, (void)id, (void)timeout_ms, (void)watch;
    *nccl = NULL;
    return EPX__NO_NCCL(err);
}
epx_status_t epx__nccl_adopt(epx__nccl_t **nccl, void *nccl_comm, int64_t timeout_ms, epx__errbuf_t *err)
{
    (void)nccl_comm, (void)timeout_ms;
    *nccl = NULL;
    return EPX__NO_NCCL(err);
}
void epx__nccl_destroy(epx__nccl_t *nccl, bool abort) { (void)nccl, (void)abort; }
void epx__nccl_abort(epx__nccl_t *nccl) { (void)nccl; }
void epx__nccl_watch_between(epx__nccl_t *nccl, const epx__nccl_watch_t *failed, const epx__nccl_watch_t *stalled)
{
    (void)nccl, (void)failed, (void)stalled;
}
bool epx__nccl_aborted(epx__nccl_t *nccl) { return (void)nccl, true; }
epx_status_t epx__nccl_check_async(epx__nccl_t *nccl, epx__errbuf_t *err) { return (void)nccl, (void)err, EPX_SUCCESS; }
int epx__nccl_rank(const epx__nccl_t *nccl) { return (void)nccl, 0; }
int epx__nccl_size(const epx__nccl_t *nccl) { return (void)nccl, 1; }
int epx__nccl_device(const epx__nccl_t *nccl) { return (void)nccl, -1; }
epx_status_t epx__nccl_post(epx__nccl_t *nccl, const void *const *sbuf, const int64_t *sbytes, void *const *rbuf,
                            const int64_t *rbytes, const unsigned char *stat_with, const void *sstat, void *rstat,
                            size_t stat_bytes, void *stream, uint64_t deadline, epx__errbuf_t *err)
{
    (void)nccl, (void)sbuf, (void)sbytes, (void)rbuf, (void)rbytes, (void)stream, (void)deadline;
    (void)stat_with, (void)sstat, (void)rstat, (void)stat_bytes;
    return EPX__NO_NCCL(err);
}
epx_status_t epx__nccl_wait(epx__nccl_t *nccl, void *stream, uint64_t deadline, epx__errbuf_t *err)
{
    (void)nccl, (void)stream, (void)deadline;
    return EPX__NO_NCCL(err);
}
epx_status_t epx__nccl_host_xchg(epx__nccl_t *nccl, const void *const *sbuf, const int64_t *sbytes,
                                 void *const *rbuf, const int64_t *rbytes, uint64_t deadline, epx__errbuf_t *err)
{
    (void)nccl, (void)sbuf, (void)sbytes, (void)rbuf, (void)rbytes, (void)deadline;
    return EPX__NO_NCCL(err);
}
