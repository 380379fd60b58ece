/* epx_comm_init_nccl: the caller's NCCL communicator carries epx's rendezvous id, then
 * joins the communicator as its inter-host transport. */
#include <stdlib.h>
#include <string.h>

#include "epx_cuda.h"

#include "api.h"
#include "../nccl/nccl.h"

/* What rank 0 tells everyone: the verdict of every rank and, on success, the id. */
typedef struct {
    int64_t status;
    int64_t who; /* the first rank that failed */
    epx_unique_id_t id;
} epx__nccl_card_t;

/* Agree over NCCL (every rank's status to rank 0, then rank 0's verdict and id to all):
 * two exchanges with rank 0 only, under one deadline. A rank that cannot take part fails
 * at once; the others then time out within timeout_ms. */
static epx_status_t epx__nccl_rendezvous(epx__nccl_t *n, epx_status_t local, epx__nccl_card_t *card,
                                         int64_t timeout_ms)
{
    int R = epx__nccl_size(n), me = epx__nccl_rank(n);
    uint64_t deadline = epx__deadline_after_ms(timeout_ms);
    const void **sp = calloc((size_t)R, sizeof *sp);
    void **rp = calloc((size_t)R, sizeof *rp);
    int64_t *sb = calloc(2 * (size_t)R, sizeof *sb), *rb = sb ? sb + R : NULL;
    int64_t *votes = me == 0 ? calloc((size_t)R, sizeof *votes) : NULL;
    epx_status_t st = EPX_SUCCESS;
    if (!sp || !rp || !sb) {
        st = epx__fail(NULL, EPX_ERR_NO_MEMORY, "out of memory");
        goto out;
    }
    /* 1. Statuses to rank 0 (rank 0 without room for them takes part and votes no). */
    int64_t mine = local;
    if (me == 0 && !votes && local == EPX_SUCCESS) local = epx__fail(NULL, EPX_ERR_NO_MEMORY, "out of memory");
    for (int p = 1; p < R; p++) {
        if (me == 0) rp[p] = votes ? &votes[p] : NULL, rb[p] = (int64_t)sizeof mine;
        if (me == p) sp[0] = &mine, sb[0] = (int64_t)sizeof mine;
    }
    st = epx__nccl_host_xchg(n, sp, sb, rp, rb, deadline, NULL);
    if (st != EPX_SUCCESS) goto out;
    /* 2. Rank 0's verdict and id to everyone. */
    if (me == 0) {
        card->status = local, card->who = 0;
        for (int p = 1; p < R && card->status == EPX_SUCCESS && votes; p++)
            if (votes[p] != EPX_SUCCESS) card->status = votes[p], card->who = p;
        if (card->status == EPX_SUCCESS) card->status = epx__boot_create_id(&card->id, NULL);
    }
    memset(sp, 0, sizeof *sp * (size_t)R), memset(rp, 0, sizeof *rp * (size_t)R);
    memset(sb, 0, sizeof *sb * 2 * (size_t)R);
    for (int p = 1; p < R; p++) {
        if (me == 0) sp[p] = card, sb[p] = (int64_t)sizeof *card;
        if (me == p) rp[0] = card, rb[0] = (int64_t)sizeof *card;
    }
    st = epx__nccl_host_xchg(n, sp, sb, rp, rb, deadline, NULL);
    if (st == EPX_SUCCESS && local != EPX_SUCCESS) st = local; /* err already says why */
    if (st == EPX_SUCCESS && card->status != EPX_SUCCESS)
        st = card->who == me ? (epx_status_t)card->status /* rank 0's id */
                             : epx__fail(NULL, EPX_ERR_REMOTE_INVALID, "rank %lld could not join epx_comm_init_nccl (%s)",
                                         (long long)card->who, epx_status_name((epx_status_t)card->status));
out:
    free(sp), free(rp), free(sb), free(votes);
    return st;
}

epx_status_t epx_comm_init_nccl(epx_comm_t *comm, void *nccl_comm, const epx_config_t *user_cfg)
{
    if (!comm) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "comm is NULL");
    *comm = NULL;
    if (!nccl_comm) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "nccl_comm is NULL");
    /* Checks of this rank's arguments are votes in the rendezvous: every rank fails alike. */
    epx_status_t local = EPX_SUCCESS;
    epx_config_t cfg = EPX_CONFIG_INITIALIZER;
    if (user_cfg) {
        if (user_cfg->size < offsetof(epx_config_t, device) + sizeof(int) || user_cfg->size > sizeof cfg)
            local = epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT,
                              "cfg.size = %zu: start the config from EPX_CONFIG_INITIALIZER", user_cfg->size);
        else
            memcpy(&cfg, user_cfg, user_cfg->size);
    }
    if (local == EPX_SUCCESS && cfg.backend == EPX_BACKEND_CPU)
        local = epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "epx_comm_init_nccl makes CUDA communicators (cfg.backend)");
    cfg.backend = EPX_BACKEND_CUDA;
    int64_t timeout_ms = cfg.timeout_ms == EPX_UNSET ? epx__param_int(EPX__P_TIMEOUT_MS) : cfg.timeout_ms;
    if (timeout_ms <= 0) {
        if (local == EPX_SUCCESS)
            local = epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "timeout_ms = %lld must be > 0", (long long)timeout_ms);
        timeout_ms = epx__timeout_fallback(EPX_UNSET); /* to meet the others with */
    }
    epx__nccl_t *n = NULL;
    EPX__CHECK(epx__nccl_adopt(&n, nccl_comm, timeout_ms, NULL)); /* without it, no way to tell the others */
    int R = epx__nccl_size(n), me = epx__nccl_rank(n), dev = epx__nccl_device(n);
    if (local == EPX_SUCCESS && cfg.device != EPX_UNSET && cfg.device != dev)
        local = epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT,
                          "cfg.device = %d, but the NCCL communicator's rank %d is on CUDA device %d", cfg.device, me,
                          dev);
    cfg.device = dev;
    epx__nccl_card_t card;
    memset(&card, 0, sizeof card);
    epx_status_t st = epx__nccl_rendezvous(n, local, &card, timeout_ms);
    if (st != EPX_SUCCESS) {
        /* Never waits: an exchange that timed out may leave NCCL kernels on the device. */
        epx__nccl_destroy(n, false);
        return st;
    }
    return epx__comm_init(comm, R, me, &card.id, &cfg, n);
}
