/* epx_comm_init_nccl: the caller's NCCL communicator carries epx's rendezvous id, then
 * joins the communicator as its inter-host transport. */
#include <stdlib.h>
#include <string.h>

#include "epx_cuda.h"

#include "api.h"
#include "../nccl/nccl.h"

epx_status_t epx_comm_init_nccl(epx_comm_t *comm, void *nccl_comm, const epx_config_t *user_cfg)
{
    if (!comm) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "comm is NULL");
    *comm = NULL;
    if (!nccl_comm) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "nccl_comm is NULL");
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    if (user_cfg) {
        if (user_cfg->size < offsetof(epx_config_t, device) + sizeof(int) || user_cfg->size > sizeof cfg)
            return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT,
                             "cfg.size = %zu: start the config from EPX_CONFIG_INITIALIZER", user_cfg->size);
        memcpy(&cfg, user_cfg, user_cfg->size);
    }
    if (cfg.backend == EPX_BACKEND_CPU)
        return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "epx_comm_init_nccl makes CUDA communicators (cfg.backend)");
    cfg.backend = EPX_BACKEND_CUDA;
    int64_t timeout_ms = cfg.timeout_ms == EPX_UNSET ? epx__param_int(EPX__P_TIMEOUT_MS) : cfg.timeout_ms;
    epx__nccl_t *n = NULL;
    EPX__CHECK(epx__nccl_adopt(&n, nccl_comm, timeout_ms, NULL));
    int R = epx__nccl_size(n), me = epx__nccl_rank(n);
    if (cfg.device == EPX_UNSET) cfg.device = epx__nccl_device(n);
    /* Rank 0's id to everyone, over NCCL (a status travels with it). */
    struct {
        int64_t status;
        epx_unique_id_t id;
    } card;
    memset(&card, 0, sizeof card);
    if (me == 0) card.status = epx__boot_create_id(&card.id, NULL);
    const void **sp = calloc((size_t)R, sizeof *sp);
    void **rp = calloc((size_t)R, sizeof *rp);
    int64_t *sb = calloc(2 * (size_t)R, sizeof *sb), *rb = sb ? sb + R : NULL;
    epx_status_t st = sp && rp && sb ? EPX_SUCCESS : epx__fail(NULL, EPX_ERR_NO_MEMORY, "out of memory");
    for (int p = 1; p < R && st == EPX_SUCCESS; p++) {
        if (me == 0) sp[p] = &card, sb[p] = (int64_t)sizeof card;
        if (me == p) rp[0] = &card, rb[0] = (int64_t)sizeof card;
    }
    if (st == EPX_SUCCESS) st = epx__nccl_host_xchg(n, sp, sb, rp, rb, epx__deadline_after_ms(timeout_ms), NULL);
    free(sp), free(rp), free(sb);
    if (st == EPX_SUCCESS && card.status != EPX_SUCCESS)
        st = epx__fail(NULL, me == 0 ? (epx_status_t)card.status : EPX_ERR_REMOTE_INVALID,
                       "rank 0 could not create the rendezvous id");
    if (st != EPX_SUCCESS) {
        epx__nccl_destroy(n, false);
        return st;
    }
    return epx__comm_init(comm, R, me, &card.id, &cfg, n);
}
