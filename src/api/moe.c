/* MoE entry points: configuration and argument checks, handles, then the backend. */
#include <stdlib.h>
#include <string.h>

#include "api.h"

struct epx_moe {
    epx_comm_t comm;       /* NULL once the communicator was destroyed or aborted */
    struct epx_moe *next;  /* in comm->moes */
    epx__moe_shape_t shape;
    epx__cpu_moe_t *cpu;   /* one of the three backends */
    epx__cuda_moe_t *cuda;
    epx__hier_moe_t *hier;
    epx__xhost_moe_t *xh; /* CUDA across hosts */
    struct epx_moe_handle *handles; /* live handles (released when the context goes first) */
};

/* A low-latency handle's state: ready (its dispatch received, no combine pending), or a
 * send of its own pending. */
enum { EPX__LL_READY = 0, EPX__LL_DISPATCH_PENDING = 1, EPX__LL_COMBINE_PENDING = 2 };
/* Kinds of low-latency send (index of epx_comm's pending queues). */
enum { EPX__LL_KIND_DISPATCH = 0, EPX__LL_KIND_COMBINE = 1 };
static const char *const epx__ll_kind_names[] = {"dispatch", "combine"};

struct epx_moe_handle {
    epx_moe_t moe; /* NULL once the context was destroyed: the handle then holds nothing */
    struct epx_moe_handle *prev, *next; /* in moe->handles */
    int mode;
    int ll_state;
    epx__cpu_moe_handle_t *cpu;
    epx__cuda_moe_handle_t *cuda;
    epx__hier_moe_handle_t *hier;
    epx__xhost_moe_handle_t *xh;
};

static int64_t epx__handle_rows(epx_moe_handle_t h)
{
    return h->xh     ? epx__xhost_moe_handle_rows(h->xh)
           : h->cuda ? epx__cuda_moe_handle_rows(h->cuda)
           : h->hier ? epx__hier_moe_handle_rows(h->hier)
                     : epx__cpu_moe_handle_rows(h->cpu);
}

static int epx__handle_tokens(epx_moe_handle_t h)
{
    return h->xh     ? epx__xhost_moe_handle_tokens(h->xh)
           : h->cuda ? epx__cuda_moe_handle_tokens(h->cuda)
           : h->hier ? epx__hier_moe_handle_tokens(h->hier)
                     : epx__cpu_moe_handle_tokens(h->cpu);
}

/* Does handle h have a low-latency send pending on a healthy communicator (then neither it
 * nor its context may go)? */
static bool epx__handle_busy(epx_moe_handle_t h)
{
    epx_comm_t c = h->moe->comm;
    return h->ll_state != EPX__LL_READY && c && c->async_error == EPX_SUCCESS;
}

/* Release what handle h holds in its context and backends (its context still alive, no
 * send of it pending unless the communicator is broken: it is then forgotten); h itself
 * stays, holding nothing. */
static void epx__handle_release(epx_moe_handle_t h)
{
    epx_moe_t moe = h->moe;
    epx_comm_t c = moe->comm;
    for (int kind = 0; c && h->ll_state != EPX__LL_READY && kind < 2; kind++)
        for (int i = c->ll_npending[kind] - 1; i >= 0; i--)
            if (c->ll_pending[kind][i] == h) {
                for (int j = i; j + 1 < c->ll_npending[kind]; j++) c->ll_pending[kind][j] = c->ll_pending[kind][j + 1];
                c->ll_pending[kind][--c->ll_npending[kind]] = NULL;
            }
    if (h->prev) h->prev->next = h->next;
    else moe->handles = h->next;
    if (h->next) h->next->prev = h->prev;
    epx__cpu_moe_handle_free(h->cpu);
    epx__cuda_moe_handle_free(h->cuda);
    epx__hier_moe_handle_free(moe->hier, h->hier); /* hier, xh: NULL once the comm is gone */
    epx__xhost_moe_handle_free(moe->xh, h->xh);
    h->moe = NULL, h->prev = h->next = NULL;
    h->cpu = NULL, h->cuda = NULL, h->hier = NULL, h->xh = NULL;
}

/* Is the context on the GPU (routing and buffers in device memory)? */
#define EPX__ON_GPU(moe) ((moe)->cuda != NULL || (moe)->xh != NULL)

static bool epx__is_token_dtype(int d) { return d == EPX_BF16 || d == EPX_F16 || d == EPX_F32 || d == EPX_FP8_E4M3; }
static bool epx__is_combine_dtype(int d) { return d == EPX_BF16 || d == EPX_F16 || d == EPX_F32; }

/* Check a configuration and derive the shape the backends use. */
static epx_status_t epx__moe_shape(int nranks, int rank, const epx_moe_config_t *u, epx__moe_shape_t *s,
                                   epx__errbuf_t *err)
{
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    if (!u) return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg is NULL");
    if (u->size < offsetof(epx_moe_config_t, num_sms) + sizeof(int) || u->size > sizeof cfg)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.size = %zu: start from EPX_MOE_CONFIG_INITIALIZER", u->size);
    memcpy(&cfg, u, u->size);
    if (cfg.hidden < 1) return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.hidden = %d must be >= 1", cfg.hidden);
    if (cfg.max_tokens_per_rank < 0 || cfg.max_tokens_per_rank > (1 << 24))
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.max_tokens_per_rank = %d is outside [0, 2^24]",
                         cfg.max_tokens_per_rank);
    if (cfg.num_experts < 1 || cfg.num_experts % nranks != 0)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.num_experts = %d must be a positive multiple of the %d ranks",
                         cfg.num_experts, nranks);
    if (cfg.max_topk < 1 || cfg.max_topk > EPX_MOE_MAX_TOPK)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.max_topk = %d is outside [1, %d]", cfg.max_topk,
                         EPX_MOE_MAX_TOPK);
    if (!epx__is_token_dtype(cfg.dtype))
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.dtype = %d: use EPX_BF16, EPX_F16, EPX_F32 or EPX_FP8_E4M3",
                         cfg.dtype);
    if (cfg.combine_dtype == EPX_UNSET) cfg.combine_dtype = cfg.dtype == EPX_FP8_E4M3 ? EPX_BF16 : cfg.dtype;
    if (!epx__is_combine_dtype(cfg.combine_dtype))
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.combine_dtype = %d: use EPX_BF16, EPX_F16 or EPX_F32",
                         cfg.combine_dtype);
    if (cfg.index_dtype != EPX_I32 && cfg.index_dtype != EPX_I64)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.index_dtype = %d: use EPX_I32 or EPX_I64", cfg.index_dtype);
    if (cfg.mode != EPX_MOE_HIGH_THROUGHPUT && cfg.mode != EPX_MOE_LOW_LATENCY)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.mode = %d is not an epx_moe_mode_t", cfg.mode);
    if (cfg.num_sms < 0 && cfg.num_sms != EPX_UNSET && cfg.num_sms != EPX_MOE_COPY_ENGINES)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT,
                         "cfg.num_sms = %d: use a count > 0, 0 or EPX_UNSET (EPX_CUDA_SMS), or EPX_MOE_COPY_ENGINES",
                         cfg.num_sms);
    if (cfg.expert_alignment < 1)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.expert_alignment = %d must be >= 1", cfg.expert_alignment);
    if (cfg.ll_fp8 && (cfg.mode != EPX_MOE_LOW_LATENCY || cfg.dtype != EPX_BF16))
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.ll_fp8 needs mode EPX_MOE_LOW_LATENCY and dtype EPX_BF16");
    if (cfg.scale_format != EPX_SCALE_F32 && cfg.scale_format != EPX_SCALE_UE8M0)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "cfg.scale_format = %d is not an epx_scale_format_t",
                         cfg.scale_format);
    if (cfg.mode == EPX_MOE_LOW_LATENCY && (int64_t)nranks * cfg.max_tokens_per_rank > (1 << 30))
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT,
                         "low-latency slots per expert: %d ranks x max_tokens_per_rank %d is over 2^30", nranks,
                         cfg.max_tokens_per_rank);
    if (cfg.mode == EPX_MOE_LOW_LATENCY && cfg.dtype == EPX_FP8_E4M3)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT,
                         "low-latency dispatch takes bf16/f16/f32 tokens (set ll_fp8 to quantise bf16 to FP8)");
    *s = (epx__moe_shape_t){0};
    s->nranks = nranks;
    s->rank = rank;
    s->hidden = cfg.hidden;
    s->max_tokens = cfg.max_tokens_per_rank;
    s->num_experts = cfg.num_experts;
    s->local_experts = cfg.num_experts / nranks;
    s->max_topk = cfg.max_topk;
    s->dtype = (epx_dtype_t)cfg.dtype;
    s->combine_dtype = (epx_dtype_t)cfg.combine_dtype;
    s->index_dtype = (epx_dtype_t)cfg.index_dtype;
    s->mode = cfg.mode;
    s->alignment = cfg.expert_alignment;
    s->ll_fp8 = cfg.ll_fp8 != 0;
    s->scale_format = cfg.scale_format;
    s->row_bytes = (size_t)cfg.hidden * epx_dtype_size(s->dtype);
    s->scale_cols = (size_t)(cfg.hidden + EPX__FP8_BLOCK - 1) / EPX__FP8_BLOCK;
    s->combine_row_bytes = (size_t)cfg.hidden * epx_dtype_size(s->combine_dtype);
    s->ll_slots = (size_t)nranks * (size_t)cfg.max_tokens_per_rank;
    s->num_sms = cfg.num_sms == EPX_UNSET ? 0 : cfg.num_sms;
    return EPX_SUCCESS;
}

epx_status_t epx_moe_create(epx_comm_t comm, const epx_moe_config_t *cfg, epx_moe_t *out)
{
    EPX__CHECK(epx__comm_check(comm));
    /* Whatever fails here, this rank still takes part in the creation's vote (else its
     * peers would wait for it until their timeout): with a stand-in context when the
     * allocation fails. */
    epx_status_t local = EPX_SUCCESS;
    struct epx_moe stand_in = {0};
    epx_moe_t m = calloc(1, sizeof *m);
    if (!out)
        local = epx__fail(&comm->err, EPX_ERR_INVALID_ARGUMENT, "moe is NULL");
    else
        *out = NULL;
    if (!m) {
        m = &stand_in;
        if (local == EPX_SUCCESS) local = epx__fail(&comm->err, EPX_ERR_NO_MEMORY, "out of memory");
    }
    m->comm = comm;
    if (local == EPX_SUCCESS) local = epx__moe_shape(comm->nranks, comm->rank, cfg, &m->shape, &comm->err);
    uint64_t hash = epx__hash64(&m->shape.hidden, offsetof(epx__moe_shape_t, num_sms) - offsetof(epx__moe_shape_t, hidden), 0);
    if (comm->hier || comm->xh) epx__comm_fault_begin(comm, local, false); /* EPX_FAULT across hosts: a step */
    epx_status_t st = comm->xh     ? epx__xhost_moe_create(comm->xh, &m->shape, hash, local, &m->xh, &comm->err)
                      : comm->cuda ? epx__cuda_moe_create(comm->cuda, &m->shape, hash, local, &m->cuda, &comm->err)
                      : comm->hier ? epx__hier_moe_create(comm->hier, &m->shape, hash, local, &m->hier, &comm->err)
                                   : epx__cpu_moe_create(comm->cpu, &m->shape, hash, local, &m->cpu, &comm->err);
    if (st == EPX_ERR_REMOTE_INVALID && local != EPX_SUCCESS) st = local;
    st = epx__comm_result(comm, st);
    if (st != EPX_SUCCESS) {
        if (m != &stand_in) free(m);
        return st;
    }
    m->next = comm->moes;
    comm->moes = m;
    *out = m;
    return EPX_SUCCESS;
}

epx_status_t epx_moe_device_memory(const epx_moe_config_t *cfg, int nranks, int64_t *bytes)
{
    if (!bytes) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "bytes is NULL");
    if (nranks < 1) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "nranks = %d must be >= 1", nranks);
    epx__moe_shape_t s;
    EPX__CHECK(epx__moe_shape(nranks, 0, cfg, &s, NULL));
    int64_t n = epx__cuda_comm_device_bytes(nranks) + epx__cuda_moe_device_bytes(&s);
    if (n == 0) return epx__fail(NULL, EPX_ERR_UNSUPPORTED, "no CUDA backend in this build");
    *bytes = n;
    return EPX_SUCCESS;
}

epx_status_t epx_moe_destroy(epx_moe_t moe)
{
    if (!moe) return EPX_SUCCESS;
    for (epx_moe_handle_t h = moe->handles; h; h = h->next)
        if (epx__handle_busy(h))
            return epx__fail(&moe->comm->err, EPX_ERR_INVALID_USAGE,
                             "a handle of this context has a pending low-latency send: receive it before destroying "
                             "the context");
    while (moe->handles) epx__handle_release(moe->handles); /* they stay, holding nothing */
    if (moe->comm) {
        epx_moe_t *p = &moe->comm->moes;
        while (*p && *p != moe) p = &(*p)->next;
        if (*p) *p = moe->next;
    }
    epx__cpu_moe_destroy(moe->cpu);
    epx__cuda_moe_destroy(moe->cuda); /* device memory only once detached: safe after its communicator */
    epx__hier_moe_destroy(moe->hier);
    epx__xhost_moe_destroy(moe->xh);
    free(moe);
    return EPX_SUCCESS;
}

void epx__moe_detach_all(epx_comm_t comm)
{
    for (epx_moe_t m = comm->moes, next; m; m = next) {
        next = m->next;
        epx__cpu_moe_destroy(m->cpu); /* lives in the communicator's shared memory */
        epx__hier_moe_destroy(m->hier); /* and in its host and network transports */
        epx__cuda_moe_detach(m->cuda);   /* its mappings pinned in the communicator's IPC cache */
        epx__xhost_moe_destroy(m->xh);   /* lives in the communicator's transports */
        m->xh = NULL;
        m->cpu = NULL;
        m->hier = NULL;
        m->comm = NULL;
        m->next = NULL;
    }
    comm->moes = NULL;
}

epx_status_t epx_moe_max_recv_tokens(epx_moe_t moe, int64_t *rows)
{
    if (!moe || !rows) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "moe or rows is NULL");
    *rows = (int64_t)moe->shape.nranks * moe->shape.max_tokens;
    return EPX_SUCCESS;
}

/* ---- Argument checks ------------------------------------------------------------------- */

#define EPX__REQUIRE(cond, ...)                                                                     \
    do {                                                                                            \
        if (!(cond)) return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, __VA_ARGS__);                  \
    } while (0)

static bool epx__aligned(const void *p, size_t a) { return ((uintptr_t)p % a) == 0; }

/* A buffer that must be there (when `needed`) and aligned to its elements. */
static epx_status_t epx__check_buf(epx__errbuf_t *err, const char *name, const void *p, bool needed, size_t align)
{
    EPX__REQUIRE(!needed || p, "%s is NULL", name);
    EPX__REQUIRE(!p || epx__aligned(p, align), "%s = %p is not aligned to %zu bytes", name, p, align);
    return EPX_SUCCESS;
}

static epx_status_t epx__check_tokens(const epx__moe_shape_t *s, epx__errbuf_t *err, int T, int K)
{
    EPX__REQUIRE(T >= 0 && T <= s->max_tokens, "num_tokens = %d is outside [0, max_tokens_per_rank = %d]", T,
                 s->max_tokens);
    EPX__REQUIRE(K >= 1 && K <= s->max_topk, "topk = %d is outside [1, max_topk = %d]", K, s->max_topk);
    return EPX_SUCCESS;
}

/* Device routing (CUDA) is validated on the device, by the backend. */
static epx_status_t epx__check_routing(const epx__moe_shape_t *s, epx__errbuf_t *err, const void *topk_idx, int T, int K,
                                       bool on_device)
{
    size_t is = epx_dtype_size(s->index_dtype);
    EPX__CHECK(epx__check_buf(err, "topk_idx", topk_idx, T > 0, is));
    if (on_device) return EPX_SUCCESS;
    return epx__topk_validate(topk_idx, s->index_dtype, T, K, s->num_experts, err);
}

static epx_status_t epx__check_dispatch(const epx__moe_shape_t *s, epx__errbuf_t *err, const epx_moe_dispatch_in_t *in,
                                        const epx_moe_dispatch_out_t *out, bool cached, bool on_device)
{
    EPX__REQUIRE(in && out, "in or out is NULL");
    bool fp8 = s->dtype == EPX_FP8_E4M3;
    int T = in->num_tokens;
    size_t es = epx_dtype_size(s->dtype);
    if (!cached) {
        EPX__CHECK(epx__check_tokens(s, err, T, in->topk));
        EPX__CHECK(epx__check_routing(s, err, in->topk_idx, T, in->topk, on_device));
        EPX__CHECK(epx__check_buf(err, "in.topk_weights", in->topk_weights, false, 4));
    }
    EPX__CHECK(epx__check_buf(err, "in.x", in->x, T > 0, es));
    EPX__CHECK(epx__check_buf(err, "in.x_scales", in->x_scales, fp8 && T > 0, 4));
    EPX__REQUIRE(out->capacity >= 0, "out.capacity = %lld is negative", (long long)out->capacity);
    bool rows = out->capacity > 0;
    EPX__CHECK(epx__check_buf(err, "out.recv_x", out->recv_x, rows, es));
    EPX__CHECK(epx__check_buf(err, "out.recv_x_scales", out->recv_x_scales, fp8 && rows, 4));
    if (cached) return EPX_SUCCESS;
    EPX__CHECK(epx__check_buf(err, "out.recv_topk_idx", out->recv_topk_idx, false, epx_dtype_size(s->index_dtype)));
    EPX__CHECK(epx__check_buf(err, "out.recv_topk_weights", out->recv_topk_weights, false, 4));
    EPX__CHECK(epx__check_buf(err, "out.num_recv_tokens_device", out->num_recv_tokens_device, false, 8));
    EPX__REQUIRE(!on_device || !out->num_recv_tokens_device || epx__cuda_is_device_ptr(out->num_recv_tokens_device),
                 "out.num_recv_tokens_device must be device memory on the CUDA backend");
    EPX__CHECK(epx__check_buf(err, "out.recv_src_rank", out->recv_src_rank, false, 4));
    EPX__CHECK(epx__check_buf(err, "out.recv_src_token", out->recv_src_token, false, 4));
    return epx__check_buf(err, "out.num_recv_tokens_per_expert", out->num_recv_tokens_per_expert, false, 4);
}

/* Checks that fail without taking part in the collective: they fail alike on every rank
 * (a NULL context, a broken communicator, a call of the other mode). */
static epx_status_t epx__check_moe_call(epx_moe_t moe, int mode)
{
    if (!moe) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "moe is NULL");
    if (!moe->comm)
        return epx__fail(NULL, EPX_ERR_ABORTED, "the communicator of this MoE context was destroyed or aborted");
    EPX__CHECK(epx__comm_check(moe->comm));
    epx__errbuf_t *err = &moe->comm->err;
    if (moe->shape.mode != mode)
        return epx__fail(err, EPX_ERR_INVALID_USAGE, "this MoE context was created for %s mode",
                         moe->shape.mode == EPX_MOE_LOW_LATENCY ? "low-latency" : "high-throughput");
    return EPX_SUCCESS;
}

/* The local verdict on a call whose context is valid: `st` from the checks. A handle of
 * another context or mode is rejected here too. */
static epx_status_t epx__check_handle(epx_moe_t moe, epx_moe_handle_t h, int mode)
{
    epx__errbuf_t *err = &moe->comm->err;
    EPX__REQUIRE(h, "handle is NULL");
    if (!h->moe) return epx__fail(err, EPX_ERR_INVALID_USAGE, "the handle's MoE context was destroyed");
    EPX__REQUIRE(h->moe == moe && h->mode == mode, "handle was made by another MoE context or mode");
    return EPX_SUCCESS;
}

/* ---- Calls ----------------------------------------------------------------------------- */

epx_status_t epx_moe_layout(epx_moe_t moe, const void *topk_idx, int num_tokens, int topk, int32_t *per_rank,
                            int32_t *per_expert, uint8_t *in_rank, void *stream)
{
    if (!moe) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "moe is NULL");
    if (!moe->comm)
        return epx__fail(NULL, EPX_ERR_ABORTED, "the communicator of this MoE context was destroyed or aborted");
    epx__errbuf_t *err = &moe->comm->err;
    const epx__moe_shape_t *s = &moe->shape;
    EPX__REQUIRE(!stream || EPX__ON_GPU(moe), "stream must be NULL on the CPU backend");
    EPX__CHECK(epx__check_tokens(s, err, num_tokens, topk));
    EPX__CHECK(epx__check_routing(s, err, topk_idx, num_tokens, topk, EPX__ON_GPU(moe)));
    EPX__CHECK(epx__check_buf(err, "num_tokens_per_rank", per_rank, false, 4));
    EPX__CHECK(epx__check_buf(err, "num_tokens_per_expert", per_expert, false, 4));
    /* Across hosts the layout waits for the stream, which a broken communicator's NCCL
     * link may hold up: fail at once with what broke it, as the collective calls do. */
    if (moe->xh) EPX__CHECK(epx__comm_check(moe->comm));
    if (moe->xh)
        return epx__xhost_moe_layout(moe->xh, topk_idx, num_tokens, topk, per_rank, per_expert, in_rank, stream, err);
    if (moe->cuda)
        return epx__cuda_moe_layout(moe->cuda, topk_idx, num_tokens, topk, per_rank, per_expert, in_rank, stream, err);
    return epx__layout(topk_idx, s->index_dtype, num_tokens, topk, s->num_experts, s->nranks, per_rank, per_expert,
                       in_rank);
}

/* A handle is allocated before the collective part of a dispatch (its failure is then this
 * rank's verdict, agreed by all), and filled after it. */
static epx_moe_handle_t epx__handle_alloc(epx_moe_t moe, epx_status_t *local)
{
    if (*local != EPX_SUCCESS) return NULL;
    epx_moe_handle_t h = calloc(1, sizeof *h);
    if (!h) *local = epx__fail(&moe->comm->err, EPX_ERR_NO_MEMORY, "out of memory");
    return h;
}

static void epx__handle_fill(epx_moe_handle_t h, epx_moe_t moe, int mode, epx__cpu_moe_handle_t *cpu,
                             epx__cuda_moe_handle_t *cuda, epx__hier_moe_handle_t *hier, epx__xhost_moe_handle_t *xh)
{
    h->xh = xh;
    h->moe = moe;
    h->mode = mode;
    h->cpu = cpu;
    h->cuda = cuda;
    h->hier = hier;
    h->prev = NULL;
    h->next = moe->handles;
    if (h->next) h->next->prev = h;
    moe->handles = h;
}

#define EPX__STREAM_CHECK(moe, err, stream)                                                                       \
    ((stream) && !EPX__ON_GPU(moe) ? epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "stream must be NULL on the CPU backend") \
                              : EPX_SUCCESS)

epx_status_t epx_moe_dispatch(epx_moe_t moe, const epx_moe_dispatch_in_t *in, epx_moe_dispatch_out_t *out,
                              epx_moe_handle_t *handle, void *stream)
{
    EPX__CHECK(epx__check_moe_call(moe, EPX_MOE_HIGH_THROUGHPUT));
    epx__errbuf_t *err = &moe->comm->err;
    epx_status_t local = EPX__STREAM_CHECK(moe, err, stream);
    if (local == EPX_SUCCESS) local = epx__check_dispatch(&moe->shape, err, in, out, false, EPX__ON_GPU(moe));
    if (local == EPX_SUCCESS && !handle) local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "handle is NULL");
    epx_moe_handle_t hn = epx__handle_alloc(moe, &local);
    epx__cpu_moe_handle_t *h = NULL;
    epx__cuda_moe_handle_t *hc = NULL;
    epx__hier_moe_handle_t *hh = NULL;
    epx__xhost_moe_handle_t *hx = NULL;
    if (moe->hier || moe->xh) epx__comm_fault_begin(moe->comm, local, true);
    epx_status_t st = moe->xh     ? epx__xhost_moe_dispatch(moe->xh, in, out, local, &hx, stream, err)
                      : moe->cuda ? epx__cuda_moe_dispatch(moe->cuda, in, out, local, &hc, stream, err)
                      : moe->hier ? epx__hier_moe_dispatch(moe->hier, in, out, local, &hh, err)
                                  : epx__cpu_moe_dispatch(moe->cpu, in, out, local, &h, err);
    st = epx__comm_result(moe->comm, st);
    if (st != EPX_SUCCESS) {
        free(hn);
        return st;
    }
    epx__handle_fill(hn, moe, EPX_MOE_HIGH_THROUGHPUT, h, hc, hh, hx);
    *handle = hn;
    return EPX_SUCCESS;
}

epx_status_t epx_moe_dispatch_cached(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_dispatch_in_t *in,
                                     epx_moe_dispatch_out_t *out, void *stream)
{
    EPX__CHECK(epx__check_moe_call(moe, EPX_MOE_HIGH_THROUGHPUT));
    epx__errbuf_t *err = &moe->comm->err;
    epx_status_t local = EPX__STREAM_CHECK(moe, err, stream);
    if (local == EPX_SUCCESS) local = epx__check_handle(moe, handle, EPX_MOE_HIGH_THROUGHPUT);
    if (local == EPX_SUCCESS) local = epx__check_dispatch(&moe->shape, err, in, out, true, EPX__ON_GPU(moe));
    if (local == EPX_SUCCESS && in->num_tokens != epx__handle_tokens(handle))
        local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "in.num_tokens = %d but the handle routed %d tokens",
                          in->num_tokens, epx__handle_tokens(handle));
    /* A handle whose row count stayed on the device needs room for the worst case. */
    int64_t need = local == EPX_SUCCESS ? epx__handle_rows(handle) : 0;
    if (need < 0) need = (int64_t)moe->shape.nranks * moe->shape.max_tokens;
    if (local == EPX_SUCCESS && out->capacity < need)
        local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "out.capacity = %lld but the handle may have received %lld rows",
                          (long long)out->capacity, (long long)need);
    bool ok = local == EPX_SUCCESS;
    if (moe->hier || moe->xh) epx__comm_fault_begin(moe->comm, local, true);
    epx_status_t st =
        moe->xh     ? epx__xhost_moe_dispatch_cached(moe->xh, ok ? handle->xh : NULL, in, out, local, stream, err)
        : moe->cuda ? epx__cuda_moe_dispatch_cached(moe->cuda, ok ? handle->cuda : NULL, in, out, local, stream, err)
        : moe->hier ? epx__hier_moe_dispatch_cached(moe->hier, ok ? handle->hier : NULL, in, out, local, err)
                    : epx__cpu_moe_dispatch_cached(moe->cpu, ok ? handle->cpu : NULL, in, out, local, err);
    return epx__comm_result(moe->comm, st);
}

epx_status_t epx_moe_combine(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_combine_in_t *in,
                             epx_moe_combine_out_t *out, void *stream)
{
    EPX__CHECK(epx__check_moe_call(moe, EPX_MOE_HIGH_THROUGHPUT));
    epx__errbuf_t *err = &moe->comm->err;
    const epx__moe_shape_t *s = &moe->shape;
    epx_status_t local = EPX__STREAM_CHECK(moe, err, stream);
    if (local == EPX_SUCCESS) local = epx__check_handle(moe, handle, EPX_MOE_HIGH_THROUGHPUT);
    if (local == EPX_SUCCESS && (!in || !out)) local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "in or out is NULL");
    if (local == EPX_SUCCESS) {
        size_t es = epx_dtype_size(s->combine_dtype);
        int64_t rows = epx__handle_rows(handle);
        int T = epx__handle_tokens(handle);
        local = epx__check_buf(err, "in.y", in->y, rows != 0, es); /* -1: not known on the host */
        if (local == EPX_SUCCESS) local = epx__check_buf(err, "in.topk_weights", in->topk_weights, false, 4);
        if (local == EPX_SUCCESS) local = epx__check_buf(err, "out.out", out->out, T > 0, es);
        if (local == EPX_SUCCESS) local = epx__check_buf(err, "out.out_topk_weights", out->out_topk_weights, false, 4);
    }
    bool ok = local == EPX_SUCCESS;
    if (moe->hier || moe->xh) epx__comm_fault_begin(moe->comm, local, true);
    epx_status_t st = moe->xh     ? epx__xhost_moe_combine(moe->xh, ok ? handle->xh : NULL, in, out, local, stream, err)
                      : moe->cuda ? epx__cuda_moe_combine(moe->cuda, ok ? handle->cuda : NULL, in, out, local, stream, err)
                      : moe->hier ? epx__hier_moe_combine(moe->hier, ok ? handle->hier : NULL, in, out, local, err)
                                  : epx__cpu_moe_combine(moe->cpu, ok ? handle->cpu : NULL, in, out, local, err);
    return epx__comm_result(moe->comm, st);
}

/* Can a low-latency send of `kind` start (a whole call when !split)? The local verdict. */
static epx_status_t epx__ll_can_send(epx_comm_t c, int kind, bool split)
{
    const char *name = epx__ll_kind_names[kind];
    if (!split && c->ll_npending[kind] > 0)
        return epx__fail(&c->err, EPX_ERR_INVALID_USAGE, "a low-latency %s send is pending: call epx_moe_ll_%s_recv first",
                         name, name);
    if (split && c->ll_npending[kind] == 2)
        return epx__fail(&c->err, EPX_ERR_INVALID_USAGE, "two low-latency %s sends are pending already (the most in flight)",
                         name);
    return EPX_SUCCESS;
}

static void epx__ll_push(epx_comm_t c, int kind, epx_moe_handle_t h)
{
    c->ll_pending[kind][c->ll_npending[kind]++] = h;
    h->ll_state = kind == EPX__LL_KIND_DISPATCH ? EPX__LL_DISPATCH_PENDING : EPX__LL_COMBINE_PENDING;
}

static epx_status_t epx__ll_dispatch(epx_moe_t moe, const epx_moe_ll_dispatch_in_t *in, epx_moe_ll_dispatch_out_t *out,
                                     epx_moe_handle_t *handle, bool split, void *stream)
{
    EPX__CHECK(epx__check_moe_call(moe, EPX_MOE_LOW_LATENCY));
    epx__errbuf_t *err = &moe->comm->err;
    const epx__moe_shape_t *s = &moe->shape;
    epx_status_t local = EPX__STREAM_CHECK(moe, err, stream);
    if (local == EPX_SUCCESS) local = epx__ll_can_send(moe->comm, EPX__LL_KIND_DISPATCH, split);
    if (local == EPX_SUCCESS && (!in || !out || !handle))
        local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "in, out or handle is NULL");
    if (local == EPX_SUCCESS) local = epx__check_tokens(s, err, in->num_tokens, in->topk);
    if (local == EPX_SUCCESS)
        local = epx__check_routing(s, err, in->topk_idx, in->num_tokens, in->topk, EPX__ON_GPU(moe));
    if (local == EPX_SUCCESS) local = epx__check_buf(err, "in.x", in->x, in->num_tokens > 0, epx_dtype_size(s->dtype));
    bool slots = s->ll_slots > 0;
    if (local == EPX_SUCCESS)
        local = epx__check_buf(err, "out.recv_x", out->recv_x, slots, s->ll_fp8 ? 1 : epx_dtype_size(s->dtype));
    if (local == EPX_SUCCESS)
        local = epx__check_buf(err, "out.recv_x_scales", out->recv_x_scales, s->ll_fp8 && slots,
                               s->scale_format == EPX_SCALE_UE8M0 ? 1 : 4);
    if (local == EPX_SUCCESS) local = epx__check_buf(err, "out.recv_count", out->recv_count, false, 4);
    if (local == EPX_SUCCESS) local = epx__check_buf(err, "out.recv_src_rank", out->recv_src_rank, false, 4);
    if (local == EPX_SUCCESS) local = epx__check_buf(err, "out.recv_src_token", out->recv_src_token, false, 4);
    epx_moe_handle_t hn = epx__handle_alloc(moe, &local);
    epx__cpu_moe_handle_t *h = NULL;
    epx__cuda_moe_handle_t *hc = NULL;
    epx__hier_moe_handle_t *hh = NULL;
    epx__xhost_moe_handle_t *hx = NULL;
    /* The CUDA backends split (across hosts, up to EPX__LL_MAX_SRCS ranks); the others move
     * everything in the send and their receive only keeps the order. */
    if (moe->hier || moe->xh) epx__comm_fault_begin(moe->comm, local, true);
    epx_status_t st = moe->xh     ? epx__xhost_moe_ll_dispatch(moe->xh, in, out, local, split, &hx, stream, err)
                      : moe->cuda ? epx__cuda_moe_ll_dispatch(moe->cuda, in, out, local, split, &hc, stream, err)
                      : moe->hier ? epx__hier_moe_ll_dispatch(moe->hier, in, out, local, &hh, err)
                                  : epx__cpu_moe_ll_dispatch(moe->cpu, in, out, local, &h, err);
    st = epx__comm_result(moe->comm, st);
    if (st != EPX_SUCCESS) {
        free(hn);
        return st;
    }
    epx__handle_fill(hn, moe, EPX_MOE_LOW_LATENCY, h, hc, hh, hx);
    *handle = hn;
    if (split) epx__ll_push(moe->comm, EPX__LL_KIND_DISPATCH, hn);
    return EPX_SUCCESS;
}

epx_status_t epx_moe_ll_dispatch(epx_moe_t moe, const epx_moe_ll_dispatch_in_t *in, epx_moe_ll_dispatch_out_t *out,
                                 epx_moe_handle_t *handle, void *stream)
{
    return epx__ll_dispatch(moe, in, out, handle, false, stream);
}

epx_status_t epx_moe_ll_dispatch_send(epx_moe_t moe, const epx_moe_ll_dispatch_in_t *in, epx_moe_ll_dispatch_out_t *out,
                                      epx_moe_handle_t *handle, void *stream)
{
    return epx__ll_dispatch(moe, in, out, handle, true, stream);
}

static epx_status_t epx__ll_combine(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_ll_combine_in_t *in, void *out,
                                    bool split, void *stream)
{
    EPX__CHECK(epx__check_moe_call(moe, EPX_MOE_LOW_LATENCY));
    epx__errbuf_t *err = &moe->comm->err;
    const epx__moe_shape_t *s = &moe->shape;
    epx_status_t local = EPX__STREAM_CHECK(moe, err, stream);
    if (local == EPX_SUCCESS) local = epx__check_handle(moe, handle, EPX_MOE_LOW_LATENCY);
    if (local == EPX_SUCCESS && handle->ll_state != EPX__LL_READY)
        local = epx__fail(err, EPX_ERR_INVALID_USAGE, "the handle's %s is still pending: receive it first",
                          handle->ll_state == EPX__LL_DISPATCH_PENDING ? "dispatch" : "combine");
    if (local == EPX_SUCCESS) local = epx__ll_can_send(moe->comm, EPX__LL_KIND_COMBINE, split);
    if (local == EPX_SUCCESS && !in) local = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "in is NULL");
    if (local == EPX_SUCCESS) {
        int T = epx__handle_tokens(handle);
        size_t es = epx_dtype_size(s->combine_dtype);
        local = epx__check_buf(err, "in.y", in->y, s->ll_slots > 0, es);
        if (local == EPX_SUCCESS) local = epx__check_buf(err, "in.topk_weights", in->topk_weights, T > 0, 4);
        if (local == EPX_SUCCESS) local = epx__check_buf(err, "out", out, T > 0, es);
    }
    bool ok = local == EPX_SUCCESS;
    if (moe->hier || moe->xh) epx__comm_fault_begin(moe->comm, local, true);
    epx_status_t st =
        moe->xh     ? epx__xhost_moe_ll_combine(moe->xh, ok ? handle->xh : NULL, in, out, local, split, stream, err)
        : moe->cuda ? epx__cuda_moe_ll_combine(moe->cuda, ok ? handle->cuda : NULL, in, out, local, split, stream, err)
        : moe->hier ? epx__hier_moe_ll_combine(moe->hier, ok ? handle->hier : NULL, in, out, local, err)
                    : epx__cpu_moe_ll_combine(moe->cpu, ok ? handle->cpu : NULL, in, out, local, err);
    st = epx__comm_result(moe->comm, st);
    if (st == EPX_SUCCESS && split) epx__ll_push(moe->comm, EPX__LL_KIND_COMBINE, handle);
    return st;
}

epx_status_t epx_moe_ll_combine(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_ll_combine_in_t *in, void *out,
                                void *stream)
{
    return epx__ll_combine(moe, handle, in, out, false, stream);
}

epx_status_t epx_moe_ll_combine_send(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_ll_combine_in_t *in,
                                     void *out, void *stream)
{
    return epx__ll_combine(moe, handle, in, out, true, stream);
}

/* The receive of the oldest pending send of `kind`, which must be handle's. Local. */
static epx_status_t epx__ll_recv(epx_moe_t moe, epx_moe_handle_t handle, int kind, void *stream)
{
    EPX__CHECK(epx__check_moe_call(moe, EPX_MOE_LOW_LATENCY));
    epx_comm_t c = moe->comm;
    EPX__CHECK(EPX__STREAM_CHECK(moe, &c->err, stream));
    EPX__CHECK(epx__check_handle(moe, handle, EPX_MOE_LOW_LATENCY));
    const char *name = epx__ll_kind_names[kind];
    if (c->ll_npending[kind] == 2 && c->ll_pending[kind][1] == handle)
        return epx__fail(&c->err, EPX_ERR_INVALID_USAGE, "an older low-latency %s send must be received first", name);
    if (c->ll_npending[kind] == 0 || c->ll_pending[kind][0] != handle)
        return epx__fail(&c->err, EPX_ERR_INVALID_USAGE, "no low-latency %s send is pending on this handle", name);
    epx_status_t st = EPX_SUCCESS;
    if (moe->xh)
        st = epx__comm_result(c, epx__xhost_moe_ll_recv(moe->xh, handle->xh, kind == EPX__LL_KIND_COMBINE, stream, &c->err));
    else if (moe->cuda)
        st = epx__comm_result(c, epx__cuda_moe_ll_recv(moe->cuda, handle->cuda, kind == EPX__LL_KIND_COMBINE, stream,
                                                       &c->err));
    if (st != EPX_SUCCESS) return st;
    c->ll_pending[kind][0] = c->ll_pending[kind][1];
    c->ll_pending[kind][1] = NULL;
    c->ll_npending[kind]--;
    handle->ll_state = EPX__LL_READY;
    return EPX_SUCCESS;
}

epx_status_t epx_moe_ll_dispatch_recv(epx_moe_t moe, epx_moe_handle_t handle, void *stream)
{
    return epx__ll_recv(moe, handle, EPX__LL_KIND_DISPATCH, stream);
}

epx_status_t epx_moe_ll_combine_recv(epx_moe_t moe, epx_moe_handle_t handle, void *stream)
{
    return epx__ll_recv(moe, handle, EPX__LL_KIND_COMBINE, stream);
}

epx_status_t epx_moe_handle_destroy(epx_moe_handle_t handle)
{
    if (!handle) return EPX_SUCCESS;
    if (handle->moe) {
        if (epx__handle_busy(handle))
            return epx__fail(&handle->moe->comm->err, EPX_ERR_INVALID_USAGE,
                             "the handle has a pending low-latency send: receive it before destroying the handle");
        epx__handle_release(handle);
    }
    free(handle);
    return EPX_SUCCESS;
}

epx_status_t epx_moe_handle_num_recv_tokens(epx_moe_handle_t handle, int64_t *rows)
{
    if (!handle || !rows) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "handle or rows is NULL");
    if (!handle->moe) return epx__fail(NULL, EPX_ERR_INVALID_USAGE, "the handle's MoE context was destroyed");
    *rows = handle->mode == EPX_MOE_HIGH_THROUGHPUT ? epx__handle_rows(handle) : -1; /* low latency: recv_count */
    return EPX_SUCCESS;
}
