/*
 * src/hier: the row plan of a high-throughput handle (hier.h, epx__hier_xplan_t): from the
 * handle's routing plan, the count of every transfer and the source of every row copy, as
 * references. The CPU path (moe.c: cached dispatch, combine) runs it in host memory; the
 * GPU path across hosts (src/xhost) uploads the references and runs the same plan with
 * device kernels, NCCL and CUDA IPC. Pure C, local.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static bool epx__goes_host(const epx__topo_t *t, const int32_t *tk, int K, int L, int k)
{
    for (int j = 0; j < K; j++)
        if (tk[j] >= 0 && t->host_of[tk[j] / L] == k) return true;
    return false;
}

static bool epx__goes_rank(const int32_t *tk, int K, int L, int q)
{
    for (int j = 0; j < K; j++)
        if (tk[j] >= 0 && tk[j] / L == q) return true;
    return false;
}

/* The ranks a token goes to, ascending, each once; returns how many. */
static int epx__dest_ranks(const int32_t *tk, int K, int L, int *ranks)
{
    int n = 0;
    for (int k = 0; k < K; k++) {
        if (tk[k] < 0) continue;
        int r = tk[k] / L, j = n;
        bool dup = false;
        for (int a = 0; a < n; a++) dup = dup || ranks[a] == r;
        if (dup) continue;
        while (j > 0 && ranks[j - 1] > r) ranks[j] = ranks[j - 1], j--;
        ranks[j] = r, n++;
    }
    return n;
}

/* The rank of host k that acts for source rank p there (its gateway). */
static int epx__gw(const epx__topo_t *t, int p, int k)
{
    return t->host_ranks[t->host_first[k] + t->lrank_of[p] % t->host_size[k]];
}

void epx__hier_xplan_free(epx__hier_xplan_t *x)
{
    free(x->mem);
    free(x->ref);
    memset(x, 0, sizeof *x);
}

epx_status_t epx__hier_xplan_build(const epx__hier_t *hier, const epx__hier_moe_handle_t *h, int local_experts,
                                   epx__hier_xplan_t *x, epx__errbuf_t *err)
{
    const epx__topo_t *t = epx__hier_topo(hier);
    int R = t->nranks, LS = t->local_size, NH = t->num_hosts, me = t->rank, ml = t->local_rank, A = t->host;
    int L = local_experts;
    epx__hier_plan_t P;
    epx__hier_moe_handle_plan(h, &P);
    int K = P.K, T = P.T;
    const int64_t *tf = P.to_first, *ff = P.from_first;
    memset(x, 0, sizeof *x);
    epx_status_t st = EPX_SUCCESS;
    x->mem = calloc(4 * (size_t)R + 4 * (size_t)LS, sizeof *x->mem);
    int64_t *ent_ref = malloc(sizeof *ent_ref * (size_t)EPX__MAX(P.nent * LS, (int64_t)1));
    int64_t *cur = calloc((size_t)NH, sizeof *cur);
    int *ranks = malloc(sizeof *ranks * (size_t)EPX__MAX(K, 1));
    if (!x->mem || !ent_ref || !cur || !ranks) {
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the row plan");
        goto done;
    }
    x->gw_send = x->mem, x->fwd_recv = x->mem + R, x->home_send = x->mem + 2 * R, x->home_recv = x->mem + 3 * R;
    x->fan_send = x->mem + 4 * R, x->fan_recv = x->fan_send + LS, x->fan_first = x->fan_recv + LS;
    x->lrecv_first = x->fan_first + LS;
    x->T = T, x->K = K, x->rows = P.rows;
    /* Dispatch: my tokens to my gateway on each other host; what my sources send me; the
     * fan-out to and from the other local ranks (mine to me is never copied). */
    for (int k = 0; k < NH; k++) {
        if (k == A) continue;
        int64_t n = 0;
        for (int i = 0; i < T; i++) n += epx__goes_host(t, P.topk + (size_t)i * K, K, L, k);
        x->gw_send[epx__gw(t, me, k)] = n, x->n_gw += n;
    }
    for (int p = 0; p < R; p++) x->fwd_recv[p] = P.fwd_count[p], x->n_fwd += P.fwd_count[p];
    for (int l = 0; l < LS; l++) {
        x->fan_first[l] = x->n_fan, x->lrecv_first[l] = x->n_lrecv;
        if (l == ml) continue;
        x->fan_send[l] = tf[l + 1] - tf[l], x->fan_recv[l] = ff[l + 1] - ff[l];
        x->n_fan += x->fan_send[l], x->n_lrecv += x->fan_recv[l];
    }
    if (tf[ml + 1] - tf[ml] != ff[ml + 1] - ff[ml] || x->n_fwd != P.nfwd) {
        st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan does not add up (%lld rows to myself, %lld from)",
                       (long long)(tf[ml + 1] - tf[ml]), (long long)(ff[ml + 1] - ff[ml]));
        goto done;
    }
    /* Combine: where the row of entry e from local rank l lies at its forwarder (mine: in
     * y; the others': in what they sent back); the records each gateway sends home (per
     * entry, local ranks ascending) and those I get home from each gateway (per token, that
     * host's ranks ascending). */
    for (int64_t i = 0; i < P.nent * LS; i++) ent_ref[i] = -1;
    for (int l = 0; l < LS; l++)
        for (int64_t a = tf[l]; a < tf[l + 1]; a++)
            ent_ref[P.to_ent[a] * LS + l] = l != ml ? EPX__HIER_REF(EPX__HIER_C1, x->fan_first[l] + a - tf[l])
                                                    : EPX__HIER_REF(EPX__HIER_Y, P.from_row[ff[ml] + a - tf[ml]]);
    for (int64_t e = 0; e < P.nent; e++) {
        int p = P.ent_src[e];
        if (t->host_of[p] == A) continue;
        for (int l = 0; l < LS; l++) x->home_send[p] += ent_ref[e * LS + l] >= 0;
    }
    for (int p = 0; p < R; p++) x->n_home_send += x->home_send[p];
    for (int k = 0; k < NH; k++) {
        if (k == A) continue;
        int64_t n = 0;
        for (int i = 0; i < T; i++)
            for (int l = 0; l < t->host_size[k]; l++)
                n += epx__goes_rank(P.topk + (size_t)i * K, K, L, t->host_ranks[t->host_first[k] + l]);
        x->home_recv[epx__gw(t, me, k)] = n, x->n_home_recv += n;
    }
    for (int i = 0; i < T; i++) x->n_tok += epx__dest_ranks(P.topk + (size_t)i * K, K, L, ranks);
    /* The references, in one array: gw, fan, out, c1, home, first, tok. */
    int64_t rows = P.rows;
    x->nref = (size_t)(x->n_gw + x->n_fan + rows + x->n_lrecv + x->n_home_send + T + 1 + x->n_tok);
    x->ref = malloc(sizeof *x->ref * EPX__MAX(x->nref, (size_t)1));
    if (!x->ref) {
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory for the row plan");
        goto done;
    }
    int64_t *o = x->ref;
    x->gw = o;
    for (int p = 0; p < R; p++) { /* segments by gateway rank */
        int k = t->host_of[p];
        if (k == A || epx__gw(t, me, k) != p) continue;
        for (int i = 0; i < T; i++)
            if (epx__goes_host(t, P.topk + (size_t)i * K, K, L, k)) *o++ = EPX__HIER_REF(EPX__HIER_X, i);
    }
    x->fan = o;
    for (int l = 0; l < LS; l++) {
        if (l == ml) continue;
        for (int64_t a = tf[l]; a < tf[l + 1]; a++) {
            int64_t e = P.to_ent[a];
            *o++ = P.ent_fidx[e] >= 0 ? EPX__HIER_REF(EPX__HIER_FWD, P.ent_fidx[e])
                                      : EPX__HIER_REF(EPX__HIER_X, P.ent_tok[e]);
        }
    }
    x->out = o;
    for (int64_t r = 0; r < rows; r++) o[r] = -1;
    for (int l = 0; l < LS; l++)
        for (int64_t a = ff[l]; a < ff[l + 1]; a++) {
            int64_t r = P.from_row[a], e = l == ml ? P.to_ent[tf[ml] + a - ff[ml]] : -1;
            if (r < 0 || r >= rows) continue;
            o[r] = l != ml               ? EPX__HIER_REF(EPX__HIER_LRECV, x->lrecv_first[l] + a - ff[l])
                   : P.ent_fidx[e] >= 0 ? EPX__HIER_REF(EPX__HIER_FWD, P.ent_fidx[e])
                                        : EPX__HIER_REF(EPX__HIER_X, P.ent_tok[e]);
        }
    for (int64_t r = 0; r < rows && st == EPX_SUCCESS; r++)
        if (o[r] < 0) st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan has no source for row %lld", (long long)r);
    if (st != EPX_SUCCESS) goto done;
    o += rows;
    x->c1 = o;
    for (int l = 0; l < LS; l++) {
        if (l == ml) continue;
        for (int64_t a = ff[l]; a < ff[l + 1]; a++) *o++ = EPX__HIER_REF(EPX__HIER_Y, P.from_row[a]);
    }
    x->home = o;
    for (int64_t e = 0; e < P.nent; e++) {
        if (t->host_of[P.ent_src[e]] == A) continue;
        for (int l = 0; l < LS; l++)
            if (ent_ref[e * LS + l] >= 0) *o++ = ent_ref[e * LS + l];
    }
    x->first = o;
    o += T + 1;
    x->tok = o;
    int64_t acc = 0, e0 = 0;
    for (int p = 0; p < R; p++) { /* home records lie by gateway rank */
        int k = t->host_of[p];
        if (k != A && epx__gw(t, me, k) == p) cur[k] = acc, acc += x->home_recv[p];
    }
    for (int p = 0; p < me; p++) e0 += P.fwd_count[p]; /* my entries follow the lower sources' */
    x->first[0] = 0;
    for (int i = 0; i < T && st == EPX_SUCCESS; i++) {
        int n = epx__dest_ranks(P.topk + (size_t)i * K, K, L, ranks);
        if (e0 + i >= P.nent || P.ent_src[e0 + i] != me || P.ent_tok[e0 + i] != i) {
            st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan misplaces token %d", i);
            break;
        }
        for (int j = 0; j < n; j++) {
            int r = ranks[j];
            int64_t ref = t->host_of[r] == A ? ent_ref[(e0 + i) * LS + t->lrank_of[r]]
                                             : EPX__HIER_REF(EPX__HIER_HOME, cur[t->host_of[r]]++);
            if (ref < 0) st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan misses token %d's row at rank %d", i, r);
            *o++ = ref;
        }
        x->first[i + 1] = x->first[i] + n;
    }
    if (st == EPX_SUCCESS && (size_t)(o - x->ref) != x->nref)
        st = epx__fail(err, EPX_ERR_INTERNAL, "the row plan has %zu references, %zu expected", (size_t)(o - x->ref),
                       x->nref);
done:
    free(ent_ref), free(cur), free(ranks);
    if (st != EPX_SUCCESS) epx__hier_xplan_free(x);
    return st;
}
