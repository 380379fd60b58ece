/* Communicator creation, topology, teardown, registered memory. */
#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "api.h"

/* What every rank tells the others at creation. */
typedef struct {
    char hostname[64];
    uint64_t host_hash; /* hostname + boot id: ranks that can share memory */
    uint64_t config_hash;
    int32_t pid;
    int32_t backend;
    int32_t version;
    int32_t status; /* this rank's verdict on its own configuration (EPX_SUCCESS: valid) */
} epx__rank_info_t;

static uint64_t epx__host_hash(char *hostname, size_t len)
{
    memset(hostname, 0, len);
    gethostname(hostname, len - 1);
    uint64_t h = epx__hash64(hostname, strlen(hostname), 0);
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        char boot[64] = {0};
        if (fgets(boot, sizeof boot, f)) h = epx__hash64(boot, strlen(boot), h);
        fclose(f);
    }
    return h;
}

static epx_status_t epx__resolve_backend(const epx_config_t *cfg, int *backend)
{
    int b = cfg->backend;
    if (b == EPX_UNSET) {
        const char *s = epx__param_str(EPX__P_BACKEND);
        if (!strcasecmp(s, "cpu"))
            b = EPX_BACKEND_CPU;
        else if (!strcasecmp(s, "cuda"))
            b = EPX_BACKEND_CUDA;
        else if (!strcasecmp(s, "auto"))
            b = EPX_BACKEND_AUTO;
        else
            return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "EPX_BACKEND=%s: expected auto, cpu or cuda", s);
    }
    if (b == EPX_BACKEND_AUTO) b = cfg->device != EPX_UNSET ? EPX_BACKEND_CUDA : EPX_BACKEND_CPU;
    if (b != EPX_BACKEND_CPU && b != EPX_BACKEND_CUDA) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "cfg.backend = %d is not an epx_backend_t", b);
    *backend = b;
    return EPX_SUCCESS;
}

/* Group ranks into hosts: blocks of EPX_LOCAL_SIZE, or by host hash. */
static void epx__topology(epx_comm_t c, const epx__rank_info_t *all)
{
    int64_t ls = epx__param_int(EPX__P_LOCAL_SIZE);
    if (ls > 0) {
        c->local_size = (int)EPX__MIN(ls, (int64_t)c->nranks);
        c->host = c->rank / c->local_size;
        c->local_rank = c->rank % c->local_size;
        c->num_hosts = (c->nranks + c->local_size - 1) / c->local_size;
        if (c->host == c->num_hosts - 1 && c->nranks % c->local_size) c->local_size = c->nranks % c->local_size;
        return;
    }
    c->num_hosts = 0;
    c->local_rank = c->local_size = 0;
    for (int r = 0; r < c->nranks; r++) {
        bool first = true;
        for (int q = 0; q < r; q++) first = first && all[q].host_hash != all[r].host_hash;
        if (first) {
            if (all[r].host_hash == all[c->rank].host_hash) c->host = c->num_hosts;
            c->num_hosts++;
        }
        if (all[r].host_hash == all[c->rank].host_hash) {
            if (r < c->rank) c->local_rank++;
            c->local_size++;
        }
    }
}

epx_status_t epx_get_unique_id(epx_unique_id_t *id)
{
    if (!id) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "id is NULL");
    return epx__boot_create_id(id, NULL);
}

epx_status_t epx_unique_id_to_string(const epx_unique_id_t *id, char *buf, size_t len)
{
    if (!id || !buf) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "id or buf is NULL");
    return epx__id_format(id, buf, len);
}

epx_status_t epx_unique_id_from_string(const char *text, epx_unique_id_t *id)
{
    if (!id || !text) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "text or id is NULL");
    return epx__id_parse(text, id);
}

/* The caller's configuration completed with defaults: backend and timeout; the EPX_*
 * tunables checked (epx__params_check). */
static epx_status_t epx__config_resolve(const epx_config_t *user_cfg, epx_config_t *cfg, int *backend,
                                        int64_t *timeout_ms)
{
    *cfg = (epx_config_t)EPX_CONFIG_INITIALIZER;
    if (user_cfg) {
        if (user_cfg->size < offsetof(epx_config_t, device) + sizeof(int) || user_cfg->size > sizeof *cfg)
            return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT,
                             "cfg.size = %zu: start the config from EPX_CONFIG_INITIALIZER", user_cfg->size);
        memcpy(cfg, user_cfg, user_cfg->size);
    }
    EPX__CHECK(epx__resolve_backend(cfg, backend));
    *timeout_ms = cfg->timeout_ms == EPX_UNSET ? epx__param_int(EPX__P_TIMEOUT_MS) : cfg->timeout_ms;
    if (*timeout_ms <= 0)
        return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "%s = %lld must be > 0",
                         cfg->timeout_ms == EPX_UNSET ? "EPX_TIMEOUT_MS" : "cfg.timeout_ms", (long long)*timeout_ms);
    return epx__params_check();
}

/* A rank that rejects its own configuration still meets the others in the creation's first
 * exchange, so that they fail at once (EPX_ERR_REMOTE_INVALID) instead of waiting for it
 * until their timeout (or, over MPI, forever). What it needs for that: a timeout to meet
 * them with (the valid one of cfg.timeout_ms, EPX_TIMEOUT_MS, the table's default) and its
 * own message, kept to be returned at the end. */
typedef struct {
    epx_status_t status;
    char why[EPX__ERRMSG_LEN];
} epx__rejected_t;

static void epx__reject(epx__rejected_t *rj, epx_status_t st, const epx_config_t *user_cfg, int *backend,
                        int64_t *timeout_ms)
{
    rj->status = st;
    const char *msg = epx_get_last_error(), *colon = strstr(msg, ": ");
    snprintf(rj->why, sizeof rj->why, "%s", colon ? colon + 2 : msg);
    *backend = -1;
    bool has = user_cfg && user_cfg->size >= offsetof(epx_config_t, timeout_ms) + sizeof user_cfg->timeout_ms &&
               user_cfg->size <= sizeof *user_cfg;
    *timeout_ms = epx__timeout_fallback(has ? user_cfg->timeout_ms : EPX_UNSET);
}

int64_t epx__timeout_fallback(int64_t cfg_timeout_ms)
{
    if (cfg_timeout_ms > 0) return cfg_timeout_ms; /* EPX_UNSET is negative */
    int64_t t = epx__param_int(EPX__P_TIMEOUT_MS);
    return t > 0 ? t : 300000; /* EPX_TIMEOUT_MS's default (core.h) */
}

/* The rejecting rank's return, whatever happened after its rejection. */
static epx_status_t epx__rejected(const epx__rejected_t *rj) { return epx__fail(NULL, rj->status, "%s", rj->why); }

/* Have this host's shared memory (local ranks) name its ranks by their ranks in the
 * communicator in its messages, and count host exchanges there (several a call). */
static epx_status_t epx__comm_name_local_ranks(epx_comm_t c, const int *host_of, const int *lrank_of)
{
    int *names = malloc(sizeof *names * (size_t)c->local_size);
    if (!names) return epx__fail(&c->err, EPX_ERR_NO_MEMORY, "out of memory");
    for (int r = 0; r < c->nranks; r++)
        if (host_of[r] == c->host) names[lrank_of[r]] = r;
    epx_status_t st = epx__cpu_name_ranks(c->cpu, names, &c->err);
    free(names);
    epx__cpu_serve_rounds(c->cpu);
    return st;
}

/* A CUDA communicator whose ranks are on several hosts: this host's ranks get their own
 * bootstrap, shared memory and CUDA backend; NCCL joins the hosts (src/xhost). */
static epx_status_t epx__comm_init_xhost(epx_comm_t c, const epx__rank_info_t *all, int device, epx__nccl_t *nccl,
                                         const epx__fault_t *fault)
{
    int R = c->nranks;
    int *host_of = malloc(sizeof(int) * 2 * (size_t)R), *lrank_of = host_of ? host_of + R : NULL;
    struct {
        int64_t status;
        epx_unique_id_t id;
    } card, *cards = calloc((size_t)R, sizeof card);
    int32_t *pids = malloc(sizeof(int32_t) * (size_t)c->local_size);
    memset(&card, 0, sizeof card);
    card.status = host_of && cards && pids ? EPX_SUCCESS : epx__fail(&c->err, EPX_ERR_NO_MEMORY, "out of memory");
    int first = -1;
    if (card.status == EPX_SUCCESS) {
        /* Everyone's host and local rank, as epx__topology numbers them. */
        int64_t ls = epx__param_int(EPX__P_LOCAL_SIZE);
        int nh = 0;
        for (int r = 0; r < R; r++) {
            if (ls > 0) {
                int l = (int)EPX__MIN(ls, (int64_t)R);
                host_of[r] = r / l, lrank_of[r] = r % l;
                continue;
            }
            host_of[r] = -1, lrank_of[r] = 0;
            for (int q = 0; q < r; q++)
                if (all[q].host_hash == all[r].host_hash) host_of[r] = host_of[q], lrank_of[r]++;
            if (host_of[r] < 0) host_of[r] = nh++;
        }
        for (int r = 0; r < R && first < 0; r++)
            if (host_of[r] == c->host) first = r;
        if (c->local_rank == 0) card.status = epx__boot_create_id(&card.id, &c->err);
    }
    /* Every rank's status travels with the ids: a failure here stops every rank at once. */
    epx_status_t st = cards ? epx__boot_allgather(c->boot, &card, cards, sizeof card, &c->err)
                            : epx__boot_allgather_fail(c->boot, &card, sizeof card.status, sizeof card, &c->err);
    if (st == EPX_SUCCESS) st = (epx_status_t)card.status;
    for (int r = 0; r < R && st == EPX_SUCCESS; r++)
        if (cards[r].status != EPX_SUCCESS)
            st = epx__fail(&c->err, EPX_ERR_REMOTE_INVALID, "rank %d could not start its part of the communicator (%s)",
                           r, epx_status_name((epx_status_t)cards[r].status));
    if (st != EPX_SUCCESS) {
        free(host_of), free(cards), free(pids);
        epx__nccl_destroy(nccl, false);
        return st;
    }
    c->nonce = epx__id_nonce(&cards[first].id);
    int32_t pid = (int32_t)getpid();
    epx_status_t local = epx__boot_init(&c->host_boot, c->local_size, c->local_rank, &cards[first].id, &pid,
                                        sizeof pid, pids, c->timeout_ms, &c->err);
    free(pids);
    if (local == EPX_SUCCESS)
        local = epx__cpu_create(&c->cpu, c->host_boot, c->local_rank, c->local_size, c->nonce, c->timeout_ms, fault,
                                &c->err);
    if (local == EPX_SUCCESS) local = epx__comm_name_local_ranks(c, host_of, lrank_of);
    if (local == EPX_SUCCESS)
        local = epx__cuda_create(&c->cuda, c->cpu, c->local_rank, c->local_size, device, c->timeout_ms, &c->err);
    /* xhost agrees on every step; it runs even after a local failure so that no rank waits. */
    st = epx__xhost_create(&c->xh, c->boot, c->cpu, c->cuda, nccl, c->rank, R, host_of, lrank_of, c->timeout_ms,
                           local, &c->err);
    if (local != EPX_SUCCESS) st = local;
    /* EPX_FAULT: src/api counts the collective calls (epx__comm_fault_begin), as across CPU
     * hosts; the host's shared memory and CUDA backend (local ranks) stay unarmed. */
    if (st == EPX_SUCCESS) c->fault = *fault;
    free(host_of), free(cards);
    return st;
}

epx_status_t epx_comm_init_rank(epx_comm_t *out, int nranks, int rank, const epx_unique_id_t *id,
                                const epx_config_t *user_cfg)
{
    return epx__comm_init(out, nranks, rank, id, user_cfg, NULL);
}

epx_status_t epx__comm_init(epx_comm_t *out, int nranks, int rank, const epx_unique_id_t *id,
                            const epx_config_t *user_cfg, void *nccl)
{
    if (!out) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "comm is NULL");
    *out = NULL;
    if (!id) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "id is NULL");
    if (nccl && (rank < 0 || rank >= nranks)) epx__nccl_destroy(nccl, false), nccl = NULL;
    if (nranks < 1) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "nranks = %d must be >= 1", nranks);
    if (rank < 0 || rank >= nranks)
        return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "rank = %d is outside [0, %d)", rank, nranks);
    epx_config_t cfg;
    int backend;
    int64_t timeout_ms;
    epx__fault_t fault;
    epx_status_t st = epx__config_resolve(user_cfg, &cfg, &backend, &timeout_ms);
    epx__log_set_rank(rank);
    if (st == EPX_SUCCESS) st = epx__fault_parse(epx__param_str(EPX__P_FAULT), rank, &fault, NULL);
    epx__rejected_t rj = {EPX_SUCCESS, ""};
    if (st != EPX_SUCCESS && nranks > 1) { /* alone, nobody to tell: the id stays unused */
        epx__reject(&rj, st, user_cfg, &backend, &timeout_ms);
        memset(&fault, 0, sizeof fault);
        st = EPX_SUCCESS;
    }
    epx__rank_info_t mine, *all = NULL;
    epx_comm_t c = st == EPX_SUCCESS ? calloc(1, sizeof *c) : NULL;
    if (st == EPX_SUCCESS && !c) st = epx__fail(NULL, EPX_ERR_NO_MEMORY, "out of memory");
    if (st != EPX_SUCCESS) {
        epx__nccl_destroy(nccl, false); /* an adopted NCCL communicator's wrapper (the comm stays the caller's) */
        return st;
    }
    c->rank = rank;
    c->nranks = nranks;
    c->backend = backend;
    c->timeout_ms = timeout_ms;
    c->nonce = epx__id_nonce(id);
    epx__log_set_rank(rank);

    memset(&mine, 0, sizeof mine);
    mine.host_hash = epx__host_hash(mine.hostname, sizeof mine.hostname);
    mine.pid = (int32_t)getpid();
    mine.backend = backend;
    mine.version = EPX_VERSION_CODE;
    mine.status = rj.status;
    mine.config_hash = epx__hash64(&mine.backend, 2 * sizeof(int32_t), 0);
    all = calloc((size_t)nranks, sizeof *all);
    c->scratch = calloc(EPX__SCRATCH_PER_RANK * (size_t)nranks, sizeof(int64_t));
    if (!all || !c->scratch) {
        st = epx__fail(&c->err, EPX_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }
    EPX__CHECK_GOTO(epx__boot_init(&c->boot, nranks, rank, id, &mine, sizeof mine, all, timeout_ms, &c->err), st, fail);
    if (rj.status != EPX_SUCCESS) goto fail;
    for (int r = 0; r < nranks; r++) {
        if (all[r].status != EPX_SUCCESS) {
            st = epx__fail(&c->err, EPX_ERR_REMOTE_INVALID, "rank %d rejected its own configuration (%s)", r,
                           epx_status_name((epx_status_t)all[r].status));
            goto fail;
        }
    }
    for (int r = 0; r < nranks; r++) {
        if (all[r].config_hash != mine.config_hash) {
            st = epx__fail(&c->err, EPX_ERR_MISMATCH,
                           "rank %d's configuration differs from rank %d's (backend %d vs %d, version %d vs %d)", r,
                           rank, all[r].backend, backend, all[r].version, EPX_VERSION_CODE);
            goto fail;
        }
    }
    epx__topology(c, all);
    if (backend == EPX_BACKEND_CUDA && c->num_hosts > 1) {
        epx__nccl_t *n = nccl; /* passes to the xhost layer */
        nccl = NULL;
        EPX__CHECK_GOTO(epx__comm_init_xhost(c, all, cfg.device == EPX_UNSET ? -1 : cfg.device, n, &fault), st, fail);
        free(all);
        EPX_INFO(INIT, "rank %d/%d: CUDA comm ready across hosts (host %d/%d, local %d/%d)", rank, nranks, c->host,
                 c->num_hosts, c->local_rank, c->local_size);
        *out = c;
        return EPX_SUCCESS;
    }
    for (int r = 0; r < nranks; r++) {
        if (all[r].host_hash != mine.host_hash) {
            st = epx__fail(&c->err, EPX_ERR_UNSUPPORTED,
                           "rank %d is on host %s, rank %d on %s: CPU communicators across hosts need the MPI "
                           "engine, not built here",
                           r, all[r].hostname, rank, mine.hostname);
            goto fail;
        }
    }
    EPX__CHECK_GOTO(epx__cpu_create(&c->cpu, c->boot, rank, nranks, c->nonce, timeout_ms, &fault, &c->err), st, fail);
    /* On CUDA the faults aim at the CUDA operations (each makes several host exchanges). */
    epx__fault_t host_fault = fault;
    if (backend == EPX_BACKEND_CUDA) memset(&host_fault, 0, sizeof host_fault);
    epx__cpu_set_fault(c->cpu, &host_fault);
    if (backend == EPX_BACKEND_CUDA) epx__cpu_serve_rounds(c->cpu);
    if (backend == EPX_BACKEND_CUDA) {
        EPX__CHECK_GOTO(epx__cuda_create(&c->cuda, c->cpu, rank, nranks, cfg.device == EPX_UNSET ? -1 : cfg.device,
                                         timeout_ms, &c->err),
                        st, fail);
        epx__cuda_set_fault(c->cuda, &fault);
    }
    free(all);
    epx__nccl_destroy(nccl, false); /* adopted, but every rank is on this host: not needed */
    EPX_INFO(INIT, "rank %d/%d: comm ready (host %d/%d, local %d/%d)", rank, nranks, c->host, c->num_hosts,
             c->local_rank, c->local_size);
    *out = c;
    return EPX_SUCCESS;
fail:
    free(all);
    epx__nccl_destroy(nccl, false);
    epx__xhost_destroy(c->xh, true);
    epx__cuda_destroy(c->cuda);
    epx__cpu_destroy(c->cpu, true);
    epx__boot_close(c->host_boot);
    epx__boot_close(c->boot);
    free(c->scratch);
    free(c);
    return rj.status != EPX_SUCCESS ? epx__rejected(&rj) : st;
}

epx_status_t epx_comm_init_from_env(epx_comm_t *comm, const epx_config_t *cfg)
{
    int64_t rank = epx__param_int(EPX__P_RANK), nranks = epx__param_int(EPX__P_NRANKS);
    const char *text = epx__param_str(EPX__P_UNIQUE_ID);
    if (comm) *comm = NULL;
    if (nranks < 1 || nranks > (1 << 20) || rank < 0 || rank >= nranks || !text[0])
        return epx__fail(NULL, EPX_ERR_INVALID_USAGE,
                         "EPX_RANK, EPX_NRANKS and EPX_UNIQUE_ID must be set (run under epx-run); got %lld, %lld, \"%s\"",
                         (long long)rank, (long long)nranks, text);
    epx_unique_id_t id;
    EPX__CHECK(epx__id_parse(text, &id));
    return epx_comm_init_rank(comm, (int)nranks, (int)rank, &id, cfg);
}

/* Agree on a status over MPI: the worst (lowest) of all ranks'; a rank that was fine
 * reports the others' failure as EPX_ERR_REMOTE_INVALID-like breakage of the init. */
static epx_status_t epx__net_agree(epx_comm_t c, epx_status_t st)
{
    int64_t v = st;
    int64_t *all = malloc(sizeof(int64_t) * (size_t)c->nranks);
    if (!all) return st != EPX_SUCCESS ? st : epx__fail(&c->err, EPX_ERR_NO_MEMORY, "out of memory");
    epx_status_t ag = epx__net_allgather(c->net, &v, all, sizeof v, &c->err);
    for (int r = 0; r < c->nranks && ag == EPX_SUCCESS && st == EPX_SUCCESS; r++)
        if (all[r] != EPX_SUCCESS)
            st = epx__fail(&c->err, (epx_status_t)all[r] == EPX_ERR_MISMATCH ? EPX_ERR_MISMATCH : EPX_ERR_REMOTE_INVALID,
                           "rank %d failed to create its part of the communicator (%s)", r,
                           epx_status_name((epx_status_t)all[r]));
    free(all);
    return st != EPX_SUCCESS ? st : ag;
}

epx_status_t epx__comm_init_net(epx_comm_t *out, const void *mpi_comm, const epx_config_t *user_cfg)
{
    if (!out) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "comm is NULL");
    *out = NULL;
    epx_config_t cfg;
    int backend;
    int64_t timeout_ms;
    epx__rejected_t rj = {EPX_SUCCESS, ""};
    epx_status_t st = epx__config_resolve(user_cfg, &cfg, &backend, &timeout_ms);
    if (st != EPX_SUCCESS) epx__reject(&rj, st, user_cfg, &backend, &timeout_ms);
    epx_comm_t c = calloc(1, sizeof *c);
    if (!c) return epx__fail(NULL, EPX_ERR_NO_MEMORY, "out of memory");
    st = epx__net_create(&c->net, mpi_comm, timeout_ms, &c->err);
    if (st != EPX_SUCCESS) {
        free(c);
        return rj.status != EPX_SUCCESS ? epx__rejected(&rj) : st;
    }
    int R = c->nranks = epx__net_size(c->net);
    c->rank = epx__net_rank(c->net);
    c->backend = backend;
    c->timeout_ms = timeout_ms;
    epx__log_set_rank(c->rank);
    int *host_of = calloc(2 * (size_t)R, sizeof(int)), *lrank_of = host_of ? host_of + R : NULL;
    c->scratch = calloc(EPX__SCRATCH_PER_RANK * (size_t)R, sizeof(int64_t));
    epx__fault_t fault;
    epx_status_t local = rj.status;
    if (local == EPX_SUCCESS) local = epx__fault_parse(epx__param_str(EPX__P_FAULT), c->rank, &fault, &c->err);
    if (local == EPX_SUCCESS && (!host_of || !c->scratch)) local = epx__fail(&c->err, EPX_ERR_NO_MEMORY, "out of memory");
    if (local == EPX_SUCCESS && backend != EPX_BACKEND_CPU)
        local = epx__fail(&c->err, EPX_ERR_UNSUPPORTED, "communicators made from MPI run the CPU backend only");
    /* Every rank must run the same version and backend. */
    uint64_t mine[2] = {(uint64_t)backend, EPX_VERSION_CODE}, *all = malloc(sizeof mine * (size_t)R);
    if (!all) local = epx__fail(&c->err, EPX_ERR_NO_MEMORY, "out of memory");
    st = epx__net_agree(c, local); /* on failure too, `all` is freed below */
    if (st == EPX_SUCCESS) st = epx__net_allgather(c->net, mine, all, sizeof mine, &c->err);
    for (int r = 0; r < R && st == EPX_SUCCESS; r++)
        if (all[2 * r] != mine[0] || all[2 * r + 1] != mine[1])
            st = epx__fail(&c->err, EPX_ERR_MISMATCH,
                           "rank %d's configuration differs from rank %d's (backend %d vs %d, version %d vs %d)", r,
                           c->rank, (int)all[2 * r], backend, (int)all[2 * r + 1], EPX_VERSION_CODE);
    free(all);
    if (st != EPX_SUCCESS) goto fail;

    /* Hosts, then this host's shared memory: a rendezvous id made by its local rank 0. */
    int64_t ls = epx__param_int(EPX__P_LOCAL_SIZE);
    int machine = 0; /* ranks sharing this machine's cores */
    EPX__CHECK_GOTO(
        epx__net_topology(c->net, (int)EPX__MAX(EPX__MIN(ls, (int64_t)R), 0), host_of, lrank_of, &machine, &c->err),
        st, fail);
    c->host = host_of[c->rank];
    c->local_rank = lrank_of[c->rank];
    c->num_hosts = c->local_size = 0;
    for (int r = 0; r < R; r++) {
        c->num_hosts = EPX__MAX(c->num_hosts, host_of[r] + 1);
        c->local_size += host_of[r] == c->host;
    }
    struct {
        int64_t status;
        epx_unique_id_t id;
    } card;
    memset(&card, 0, sizeof card);
    if (c->local_rank == 0) card.status = epx__boot_create_id(&card.id, &c->err);
    EPX__CHECK_GOTO(epx__net_host_bcast(c->net, &card, sizeof card, &c->err), st, fail);
    local = card.status == EPX_SUCCESS
                ? EPX_SUCCESS
                : epx__fail(&c->err, (epx_status_t)card.status, "local rank 0 of host %d could not create the rendezvous id",
                            c->host);
    EPX__CHECK_GOTO(epx__net_agree(c, local), st, fail);
    c->nonce = epx__id_nonce(&card.id);
    int32_t pid = (int32_t)getpid(), *pids = malloc(sizeof(int32_t) * (size_t)c->local_size);
    local = pids ? epx__boot_init(&c->boot, c->local_size, c->local_rank, &card.id, &pid, sizeof pid, pids, timeout_ms,
                                  &c->err)
                 : epx__fail(&c->err, EPX_ERR_NO_MEMORY, "out of memory");
    free(pids);
    if (local == EPX_SUCCESS)
        local = epx__cpu_create(&c->cpu, c->boot, c->local_rank, c->local_size, c->nonce, timeout_ms, &fault, &c->err);
    if (local == EPX_SUCCESS) epx__cpu_share_cores(c->cpu, machine);
    if (local == EPX_SUCCESS && c->num_hosts > 1) local = epx__comm_name_local_ranks(c, host_of, lrank_of);
    if (local == EPX_SUCCESS && c->num_hosts > 1)
        local = epx__hier_create(&c->hier, c->cpu, c->net, host_of, lrank_of, &c->err);
    /* EPX_FAULT: on one host the shared-memory backend counts its operations (local rank =
     * rank there); across hosts src/api counts the collective calls (epx__comm_fault_begin). */
    if (local == EPX_SUCCESS && c->hier) c->fault = fault;
    else if (local == EPX_SUCCESS) epx__cpu_set_fault(c->cpu, &fault);
    EPX__CHECK_GOTO(epx__net_agree(c, local), st, fail);
    free(host_of);
    EPX_INFO(INIT, "rank %d/%d: comm ready over MPI (host %d/%d, local %d/%d)", c->rank, R, c->host, c->num_hosts,
             c->local_rank, c->local_size);
    *out = c;
    return EPX_SUCCESS;
fail:
    free(host_of);
    epx__hier_destroy(c->hier);
    epx__cpu_destroy(c->cpu, true);
    epx__boot_close(c->boot);
    epx__net_destroy(c->net, false);
    free(c->scratch);
    free(c);
    return rj.status != EPX_SUCCESS ? epx__rejected(&rj) : st;
}

static void epx__comm_free(epx_comm_t c, bool abort)
{
    /* Abort first: NCCL work a dead peer left on the streams ends, so the MoE contexts'
     * waits for their last device work end at once and their staging is freed. */
    if (abort) epx__xhost_mark_broken(c->xh);
    epx__moe_detach_all(c);
    epx__xhost_destroy(c->xh, abort);
    epx__cuda_destroy(c->cuda);
    epx__hier_destroy(c->hier);
    epx__cpu_destroy(c->cpu, abort);
    epx__boot_close(c->host_boot);
    epx__boot_close(c->boot);
    epx__net_destroy(c->net, abort);
    free(c->scratch);
    free(c);
}

epx_status_t epx_comm_destroy(epx_comm_t comm)
{
    if (comm) epx__comm_free(comm, comm->async_error != EPX_SUCCESS);
    return EPX_SUCCESS;
}

epx_status_t epx_comm_abort(epx_comm_t comm)
{
    if (comm) epx__comm_free(comm, true);
    return EPX_SUCCESS;
}

/* Record the error that broke the communicator (the first one) and tell the peers, so
 * that those waiting on this rank, or about to read what it posted, fail at once. */
static void epx__comm_break(epx_comm_t comm, epx_status_t st)
{
    if (comm->async_error != EPX_SUCCESS) return;
    comm->async_error = st;
    memcpy(comm->async_msg, comm->err.msg, sizeof comm->async_msg);
    epx__cpu_mark_broken(comm->cpu);
    epx__xhost_mark_broken(comm->xh); /* NCCL work left on the streams ends now */
}

/* Pick up an error the device recorded (a timed-out wait, mismatched device counts), then
 * one that broke the NCCL link between hosts since the last call (src/nccl's watchdog). */
static void epx__comm_poll(epx_comm_t comm)
{
    if (comm->async_error != EPX_SUCCESS) return;
    epx_status_t st = comm->cuda ? epx__cuda_check_async(comm->cuda, &comm->err) : EPX_SUCCESS;
    if (st == EPX_SUCCESS) st = epx__xhost_check_async(comm->xh, &comm->err);
    if (st != EPX_SUCCESS) epx__comm_break(comm, st);
}

epx_status_t epx__comm_check(epx_comm_t comm)
{
    if (!comm) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "comm is NULL");
    epx__comm_poll(comm);
    if (comm->async_error != EPX_SUCCESS)
        return epx__fail(&comm->err, comm->async_error,
                         "the communicator is broken (abort it and create a new one) by: %.400s", comm->async_msg);
    return EPX_SUCCESS;
}

bool epx__status_breaks(epx_status_t st)
{
    switch (st) {
    case EPX_ERR_TIMEOUT:
    case EPX_ERR_PEER_FAILURE:
    case EPX_ERR_ABORTED:
    case EPX_ERR_CUDA:
    case EPX_ERR_NCCL:
    case EPX_ERR_MPI:
    case EPX_ERR_INTERNAL: return true;
    default: return false;
    }
}

void epx__comm_fault_slow(epx_comm_t c, epx_status_t local, bool sized)
{
    const uint32_t step = c->fault_step;
    epx__fault_delay(&c->fault, step);
    epx__fault_spec_t f;
    if (epx__fault_take(&c->fault, EPX__FAULT_KILL, step, &f)) epx__fault_exit(&f, 0, c->nranks - 1);
    bool count =
        sized && local == EPX_SUCCESS && c->nranks > 1 && epx__fault_take(&c->fault, EPX__FAULT_COUNT, step, &f);
    if (count && c->hier) epx__hier_fault_count(c->hier);
    if (c->hier && local == EPX_SUCCESS && epx__fault_take(&c->fault, EPX__FAULT_NOMEM, step, &f))
        epx__hier_fault_nomem(c->hier);
    if (c->hier) epx__hier_fault_slow(c->hier, epx__fault_take(&c->fault, EPX__FAULT_SLOW, step, &f) ? f.ms : 0);
    if (c->xh) {
        bool enq = epx__fault_due(&c->fault, EPX__FAULT_DELAY, step, EPX__FAULT_AT_ENQUEUE, &f) ||
                   epx__fault_due(&c->fault, EPX__FAULT_KILL, step, EPX__FAULT_AT_ENQUEUE, &f) ||
                   epx__fault_due(&c->fault, EPX__FAULT_FAIL, step, EPX__FAULT_AT_ENQUEUE, &f);
        epx__xhost_fault_set(c->xh, &c->fault, step, count, enq);
        c->fault_launched = epx__fault_due(&c->fault, EPX__FAULT_KILL, step, EPX__FAULT_AT_LAUNCHED, &f);
    }
}

/* EPX_FAULT kill at=launched across GPU hosts: the call returned success, its work is
 * enqueued and not waited for. */
static void epx__comm_fault_launched(epx_comm_t c, epx_status_t st)
{
    c->fault_launched = false;
    epx__fault_spec_t f;
    if (st == EPX_SUCCESS && epx__fault_take_at(&c->fault, EPX__FAULT_KILL, c->fault_step, EPX__FAULT_AT_LAUNCHED, &f))
        epx__fault_exit(&f, c->nranks - 1, c->nranks - 1);
}

epx_status_t epx__comm_result(epx_comm_t comm, epx_status_t st)
{
    if (__builtin_expect(comm->fault_launched, 0)) epx__comm_fault_launched(comm, st);
    /* A host round that failed (a peer late or gone: this rank's transport gave up) under a
     * status of the call's own that does not break (a mismatch the rounds agreed on first):
     * the communicator cannot go on, and the call says why. */
    if (!epx__status_breaks(st) && comm->cpu) {
        epx_status_t gone = epx__cpu_given_up(comm->cpu, &comm->err); /* (writes only a failure) */
        if (gone != EPX_SUCCESS) st = gone;
    }
    if (epx__status_breaks(st)) epx__comm_break(comm, st);
    /* Across CPU hosts a MoE call that failed after its verdict (epx__hier_take_left) left
     * its peers in the call: whatever its status, the communicator cannot go on. */
    epx_status_t left = comm->hier ? epx__hier_take_left(comm->hier) : EPX_SUCCESS;
    if (left != EPX_SUCCESS) epx__comm_break(comm, st != EPX_SUCCESS ? st : left);
    return st;
}

epx_status_t epx_comm_rank(epx_comm_t comm, int *rank)
{
    if (!comm || !rank) return epx__fail(comm ? &comm->err : NULL, EPX_ERR_INVALID_ARGUMENT, "comm or rank is NULL");
    *rank = comm->rank;
    return EPX_SUCCESS;
}

epx_status_t epx_comm_size(epx_comm_t comm, int *nranks)
{
    if (!comm || !nranks) return epx__fail(comm ? &comm->err : NULL, EPX_ERR_INVALID_ARGUMENT, "comm or nranks is NULL");
    *nranks = comm->nranks;
    return EPX_SUCCESS;
}

epx_status_t epx_comm_info(epx_comm_t comm, epx_comm_info_t *info)
{
    if (!comm || !info) return epx__fail(comm ? &comm->err : NULL, EPX_ERR_INVALID_ARGUMENT, "comm or info is NULL");
    info->rank = comm->rank;
    info->nranks = comm->nranks;
    info->local_rank = comm->local_rank;
    info->local_size = comm->local_size;
    info->host = comm->host;
    info->num_hosts = comm->num_hosts;
    info->backend = comm->backend;
    return EPX_SUCCESS;
}

const char *epx_comm_get_last_error(epx_comm_t comm) { return comm ? comm->err.msg : epx_get_last_error(); }

epx_status_t epx_comm_get_async_error(epx_comm_t comm, epx_status_t *async_error)
{
    if (!comm || !async_error) return epx__fail(comm ? &comm->err : NULL, EPX_ERR_INVALID_ARGUMENT, "comm or async_error is NULL");
    epx__comm_poll(comm);
    *async_error = comm->async_error;
    return EPX_SUCCESS;
}

epx_status_t epx_mem_alloc(epx_comm_t comm, size_t bytes, void **ptr)
{
    EPX__CHECK(epx__comm_check(comm));
    if (!ptr) return epx__fail(&comm->err, EPX_ERR_INVALID_ARGUMENT, "ptr is NULL");
    *ptr = NULL;
    if (bytes > (size_t)PTRDIFF_MAX)
        return epx__fail(&comm->err, EPX_ERR_INVALID_ARGUMENT, "bytes = %zu is larger than any allocation can be", bytes);
    if (comm->cuda) return epx__cuda_mem_alloc(comm->cuda, bytes, ptr, &comm->err);
    return epx__cpu_mem_alloc(comm->cpu, bytes, ptr, &comm->err);
}

epx_status_t epx_mem_free(epx_comm_t comm, void *ptr)
{
    if (!comm) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "comm is NULL");
    if (!ptr) return EPX_SUCCESS;
    if (comm->cuda) return epx__cuda_mem_free(comm->cuda, ptr, &comm->err);
    return epx__cpu_mem_free(comm->cpu, ptr, &comm->err);
}
