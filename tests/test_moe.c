/*
 * MoE dispatch/combine against the sequential reference in moe_ref.c. Every rank derives
 * every rank's routing and data from a shared seed, so it can compute what it must
 * receive. Outputs are poisoned before every call; rows past the received count (and a
 * guard past the capacity) must stay poisoned.
 *
 *   layout          counts per rank / expert and the token-rank mask (NULL outputs too)
 *   high-throughput dispatch (every output, both index dtypes, every dtype, FP8 scales
 *                   with a partial last block, alignment 1 and > 1, uniform / Zipf /
 *                   one-expert / duplicate / no-expert routing, -1 entries, T = 0 on some
 *                   ranks, K = 1..9 and EPX_MOE_MAX_TOPK, E = R .. 288), cached dispatch
 *                   (new data, other outputs untouched, topk fields ignored), combine
 *                   bit-exact against float32 ascending-rank sums (and within a tolerance
 *                   of float64 sums), with and without weights, 3 identical repeats
 *   low-latency     slot layout (exact order on the CPU backend, per (expert, source)
 *                   sets elsewhere), bf16 and FP8 quantisation with F32 and UE8M0 scales,
 *                   combine bit-exact (float32 products, a partial sum per expert rank
 *                   in ascending k, then the ranks ascending)
 *   two handles     two dispatches alive at once, cached dispatch / combine on each
 *   random          --random N (default 100) small configurations drawn from --seed S
 *   bad input       one rank bad, the others valid: statuses, nothing written, and a valid
 *                   call right after; output capacity short on one and on two ranks; calls
 *                   that differ between ranks (top-k, operation, handle, weights: not on
 *                   CUDA); invalid and mismatched configurations at create
 *   --large         DeepSeek-like: T = 512..4096, H = 7168, K = 8, E = 256 (HT); low-latency
 *                   T = 16..128, H = 7168, K = 8 (FP8 with both scale formats, bf16 Zipf)
 *   --chunks        across hosts, the network step in chunks by default (one per 8 MiB of
 *                   the dispatch's largest batch, src/hier): T = max_tokens = 640 on one
 *                   rank (not rank 0), 0 on another, random between on the others (FP32
 *                   H = 4096, low-latency H = 7168: 2 chunks, every rank), then BF16
 *                   H = 7168, max_tokens 1536 (3 chunks by max_tokens) with T <= 96 on
 *                   every rank (1 chunk)
 *   --case NAME     only the fixed high-throughput cases whose name contains NAME
 *   --ll            only the low-latency cases: fixed, split, pipeline, random and bad
 *   --copy-engines  every context with num_sms = EPX_MOE_COPY_ENGINES (on the CUDA backend
 *                   of one host: the payload moves on copy engines; dispatch then always
 *                   reads its counts back, so num_recv_tokens is always filled), plus a
 *                   create where one rank asks for SMs instead (EPX_ERR_MISMATCH)
 *   --cuda          all of it on the CUDA backend: every buffer the library reads or writes
 *                   is device memory (inputs put from a host copy, outputs poisoned in
 *                   stream order and fetched back before the checks), calls on the test
 *                   stream; exit 77 when the backend has no MoE (EPX_ERR_UNSUPPORTED).
 *                   Bad expert ids in low-latency dispatch are caught on the device there
 *                   (the call succeeds, every recv_count is -1, nothing else is written).
 *   --pool          with --cuda: every device buffer of the test from the stream-ordered pool
 *                   (cudaMallocAsync: memory CUDA IPC cannot share, as PyTorch's expandable
 *                   segments), so the library stages every input peers read; plus calls
 *                   back to back with one rank's stream held (staged copies must not overtake
 *                   the peers' reads), a copy-engine dispatch, whose recv_x peers write,
 *                   refused with EPX_ERR_UNSUPPORTED, and one with recv_x from cudaMalloc
 *                   (its routing inputs staged). Not with --copy-engines.
 *
 * EPX_TEST_LL_ANY_ORDER=1 accepts any order of low-latency slots within an (expert, source
 * rank) group (a backend may document arrival order; the CPU and CUDA ones give the exact
 * order: sources ascending, tokens ascending).
 */
#include <math.h>
#include <string.h>

#include "moe_ref.h"
#include "testlib.h"

#ifdef EPX_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <unistd.h>

static void CUDART_CB hold_30ms(void *arg)
{
    (void)arg;
    usleep(30000);
}
#endif

/* Hold this rank's stream (CUDA) for 30 ms: its peers run ahead of it. */
static void hold_stream(void)
{
#ifdef EPX_HAVE_CUDA
    if (test_on_cuda()) ASSERT(cudaLaunchHostFunc((cudaStream_t)test_stream(), hold_30ms, NULL) == cudaSuccess);
#endif
}

#define MAXR 64
#define POISON 0xA5
#define GUARD 64 /* poisoned bytes after every output buffer */

static epx_comm_t comm;
static int me, R;
static bool exact_ll_order = true;
static int num_sms = EPX_UNSET; /* cfg.num_sms of every context (--copy-engines) */

/* ---- Cases ------------------------------------------------------------------------------ */

typedef enum { ROUTE_UNIFORM, ROUTE_ZIPF, ROUTE_ONE, ROUTE_DUP, ROUTE_NONE } route_t;

enum {
    F_REPEAT = 1,      /* run 3 times, bits identical */
    F_NO_WEIGHTS = 2,  /* dispatch without topk_weights */
    F_NULL_OUTS = 4,   /* optional dispatch outputs NULL */
    F_REG = 8,         /* x in registered memory */
    F_T_ZERO = 16,     /* T = 0 on every rank */
    F_T_FULL = 32,     /* T = max_tokens on every rank */
    F_EXACT_CAP = 64,  /* capacity = N exactly */
    F_MAX_CAP = 128,   /* capacity = epx_moe_max_recv_tokens */
    F_T_WIDE = 256,    /* T in [M/8, M] (large case) */
    F_T_SMALL = 512,   /* T in [0, M/16] on every rank: a batch far below max_tokens */
    F_SPECIAL = 1024,  /* combine inputs (y, the weights summed or, low latency, applied) hold infinities and NaNs */
    F_SHIFT = 2048,    /* low latency: on odd ranks x, y and out lie one element past a 16-byte boundary */
};

typedef struct {
    const char *name;
    int E; /* > 0: experts (rounded down to a multiple of R); <= 0: -E * R */
    int K, H, M;
    int dtype, cdtype, idtype, align;
    route_t route;
    int neg_pct;
    int flags;
    int maxk;     /* cfg.max_topk if > K */
    int mode, ll_fp8, sfmt;
} mcase_t;

/* ---- World: every rank's routing, derived from the seed ------------------------------------ */

typedef struct {
    const mcase_t *c;
    int E, L, K, H, M, nb, maxk;
    int dtype, cdtype, idtype, align;
    int es, ces, isz;
    uint64_t seed;
    int T[MAXR];
    int64_t *idx[MAXR];
    float *w[MAXR];
    moe_ref_routing_t rt;
} world_t;

static uint64_t row_seed(const world_t *W, uint64_t tag, int a, int b)
{
    return test_mix(W->seed, tag, (uint64_t)(uint32_t)a, (uint64_t)(uint32_t)b);
}
/* Element i of the random stream starting at s (random access into splitmix64). */
static uint64_t elem_rand(uint64_t s, int64_t i)
{
    uint64_t st = s + (uint64_t)i * 0x9e3779b97f4a7c15ull;
    return test_rand(&st);
}

/* Random bits of a value of dtype dt: exponents 2^(off-spread) .. 2^(off+spread), 1/64 zeros
 * (both signs), FP8 any non-NaN code. */
static uint32_t gen_bits(int dt, uint64_t r, int off, int spread)
{
    uint32_t sign = (uint32_t)(r & 1);
    if ((r >> 58) == 0) return dt == EPX_F32 ? sign << 31 : dt == EPX_FP8_E4M3 ? sign << 7 : sign << 15;
    int e = (int)((((r >> 8) & 0xFFFF) * (uint64_t)(2 * spread + 1)) >> 16) - spread + off;
    switch (dt) {
    case EPX_BF16: return sign << 15 | (uint32_t)(127 + e) << 7 | (uint32_t)((r >> 20) & 0x7F);
    case EPX_F16: return sign << 15 | (uint32_t)(15 + e) << 10 | (uint32_t)((r >> 20) & 0x3FF);
    case EPX_F32: return sign << 31 | (uint32_t)(127 + e) << 23 | (uint32_t)((r >> 20) & 0x7FFFFF);
    default: {
        uint32_t b = (uint32_t)(r >> 20) & 0xFF;
        if ((b & 0x7F) == 0x7F) b ^= 1;
        return b;
    }
    }
}
static void put_bits(int dt, void *buf, int64_t i, uint32_t v)
{
    switch (moe_ref_elem_size(dt)) {
    case 1: ((uint8_t *)buf)[i] = (uint8_t)v; break;
    case 2: ((uint16_t *)buf)[i] = (uint16_t)v; break;
    default: ((uint32_t *)buf)[i] = v; break;
    }
}
static uint32_t get_bits(int dt, const void *buf, int64_t i)
{
    switch (moe_ref_elem_size(dt)) {
    case 1: return ((const uint8_t *)buf)[i];
    case 2: return ((const uint16_t *)buf)[i];
    default: return ((const uint32_t *)buf)[i];
    }
}

/* Token row x of rank p, token t, generation gen (0 dispatch, 1.. cached dispatches).
 * bf16 rows have 128-blocks that are all zero or tiny (below the FP8 amax floor). */
static void x_row(const world_t *W, int p, int t, int gen, void *dst)
{
    uint64_t s = row_seed(W, 100 + (uint64_t)gen, p, t);
    for (int b = 0; b * 128 < W->H; b++) {
        int style = (int)(elem_rand(s, -1 - b) % 16);
        for (int h = b * 128; h < W->H && h < (b + 1) * 128; h++) {
            uint64_t r = elem_rand(s, h);
            uint32_t v;
            if (W->dtype == EPX_BF16 && style == 0)
                v = (uint32_t)(r & 1) << 15;
            else if (W->dtype == EPX_BF16 && style == 1)
                v = gen_bits(EPX_BF16, r, -20, 4);
            else
                v = gen_bits(W->dtype, r, 0, W->dtype == EPX_F16 ? 6 : 8);
            put_bits(W->dtype, dst, h, v);
        }
    }
}
static void x_scales_row(const world_t *W, int p, int t, int gen, float *dst)
{
    uint64_t s = row_seed(W, 200 + (uint64_t)gen, p, t);
    for (int b = 0; b < W->nb; b++) {
        uint64_t r = elem_rand(s, b);
        dst[b] = ldexpf(1.0f + (float)(r % 4096) / 4096.0f, (int)((r >> 20) % 11) - 5);
    }
}

/* With F_SPECIAL, about one element in 12 of a combine input (dtype dt, random r) becomes
 * +inf, -inf or a NaN of random sign and payload: sums then meet inf - inf and NaN
 * operands, and a NaN result must come out as the canonical NaN on every backend. */
static bool special_bits(const world_t *W, int dt, uint64_t r, uint32_t *bits)
{
    if (!(W->c->flags & F_SPECIAL) || r % 12 != 0) return false;
    r /= 12;
    int sbit = dt == EPX_F32 ? 31 : 15, mant = dt == EPX_F32 ? 23 : dt == EPX_F16 ? 10 : 7;
    uint32_t exp = (dt == EPX_F16 ? 0x1Fu : 0xFFu) << mant, mmask = (1u << mant) - 1u;
    uint32_t payload = r % 3 == 0 ? (uint32_t)((r >> 8) & mmask) | 1u : 0; /* one in three a NaN */
    *bits = (uint32_t)((r >> 2) & 1) << sbit | exp | payload;
    return true;
}

/* A canonical NaN's bits in dtype dt: what the library stores for a NaN sum. */
static uint32_t canon_nan_bits(int dt)
{
    return dt == EPX_F32 ? 0x7FFFFFFFu : 0x7FFFu;
}

/* Combine input of rank r for token (p, t): bits in the combine dtype. One token in three
 * gets "cancelling" rows: ranks 0, 3, 6.. send a large value and ranks 1, 4, 7.. its
 * negation, so the float32 sum depends on the order in which ranks are added. */
static void y_bits_row(const world_t *W, int r, int p, int t, int H, uint32_t *bits)
{
    uint64_t s = row_seed(W, 300 + (uint64_t)r, p, t), shared = row_seed(W, 350, p, t);
    bool cancel = shared % 3 == 0 && r % 3 != 2;
    int big = W->cdtype == EPX_F16 ? 8 : 14;
    for (int h = 0; h < H; h++) {
        if (cancel) {
            uint32_t b = gen_bits(W->cdtype, (elem_rand(shared, h) | 1ull << 63) & ~1ull, big, 2); /* > 0 */
            int sbit = W->cdtype == EPX_F32 ? 31 : 15;
            bits[h] = b | (uint32_t)(r % 3) << sbit;
        } else {
            bits[h] = gen_bits(W->cdtype, elem_rand(s, h), 0, W->cdtype == EPX_F16 ? 6 : 8);
        }
        special_bits(W, W->cdtype, elem_rand(s ^ 0x5bec1a1ull, h), &bits[h]);
    }
}
static float bits_to_float(int dt, uint32_t bits)
{
    uint8_t buf[4];
    put_bits(dt, buf, 0, bits);
    return moe_ref_load(dt, buf, 0);
}
static void y_row_cb(void *ctx, int r, int p, int t, int H, float *row)
{
    const world_t *W = ctx;
    uint32_t *bits = malloc(sizeof(uint32_t) * (size_t)H + 4);
    y_bits_row(W, r, p, t, H, bits);
    for (int h = 0; h < H; h++) row[h] = bits_to_float(W->cdtype, bits[h]);
    free(bits);
}
/* Combine weights input of rank r for token (p, t): K floats. */
static float gen_weight(uint64_t r)
{
    if (r % 97 == 0) return 0.0f;
    uint32_t u = (uint32_t)((r >> 8) & 0x7FFFFF) | (uint32_t)(127 - (int)((r >> 40) % 6)) << 23;
    if ((r >> 50) % 8 == 0) u |= 0x80000000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static void yw_row_cb(void *ctx, int r, int p, int t, int K, float *row)
{
    const world_t *W = ctx;
    uint64_t s = row_seed(W, 400 + (uint64_t)r, p, t);
    for (int k = 0; k < K; k++) {
        uint32_t b;
        if (special_bits(W, EPX_F32, elem_rand(s ^ 0x5bec1a1ull, k), &b))
            memcpy(&row[k], &b, 4);
        else
            row[k] = gen_weight(elem_rand(s, k));
    }
}
/* Low-latency: does token (p, t) get "cancelling" rows? One in three: its weights are
 * powers of two (world_init) and each of its experts' rows is, by a coin, either a small
 * random row or the token's large row X divided by the expert's weight, with the sign of
 * the expert's rank's parity: the products are then exactly +-X, the large terms of ranks
 * of either parity cancel, and what is left of the small ones depends on the order of the
 * sums (per rank from +0, then the ranks ascending; epx.h), even in bf16. */
static bool ll_cancels(const world_t *W, int p, int t)
{
    return W->c->mode == EPX_MOE_LOW_LATENCY && row_seed(W, 550, p, t) % 3 == 0;
}

/* Low-latency expert output of expert e for token (p, t): bits in the combine dtype. */
static void yll_bits_row(const world_t *W, int e, int p, int t, uint32_t *bits)
{
    uint64_t s = row_seed(W, 500 + (uint64_t)e, p, t), shared = row_seed(W, 560, p, t);
    int K = W->K, k = 0;
    while (k < K && W->idx[p][(int64_t)t * K + k] != e) k++;
    bool large = ll_cancels(W, p, t) && k < K && s % 2 == 0;
    float w = large ? W->w[p][(int64_t)t * K + k] : 1.0f; /* a power of two, not 0 */
    int big = W->cdtype == EPX_F16 ? 8 : 14;
    for (int h = 0; h < W->H; h++) {
        if (!large) {
            bits[h] = gen_bits(W->cdtype, elem_rand(s, h), 0, W->cdtype == EPX_F16 ? 6 : 8);
            continue;
        }
        uint8_t buf[4];
        float x = bits_to_float(W->cdtype, gen_bits(W->cdtype, (elem_rand(shared, h) | 1ull << 63) & ~1ull, big, 2));
        moe_ref_store(W->cdtype, buf, 0, (e / W->L) % 2 ? -x / w : x / w); /* exact: w is a power of two */
        bits[h] = get_bits(W->cdtype, buf, 0);
    }
    for (int h = 0; h < W->H; h++) special_bits(W, W->cdtype, elem_rand(s ^ 0x5bec1a1ull, h), &bits[h]);
}
static void yll_row_cb(void *ctx, int e, int p, int t, int H, float *row)
{
    const world_t *W = ctx;
    uint32_t *bits = malloc(sizeof(uint32_t) * (size_t)H + 4);
    yll_bits_row(W, e, p, t, bits);
    for (int h = 0; h < H; h++) row[h] = bits_to_float(W->cdtype, bits[h]);
    free(bits);
}
/* A quiet NaN of the combine dtype dt (bits). */
static uint32_t nan_bits(int dt)
{
    return dt == EPX_F32 ? 0x7FC00000u : dt == EPX_F16 ? 0x7E00u : 0x7FC0u;
}

static int resolve_E(const mcase_t *c)
{
    if (c->E > 0) return c->E - c->E % R;
    return (c->E == 0 ? 1 : -c->E) * R;
}

static void world_init(world_t *W, const mcase_t *c, uint64_t seed)
{
    memset(W, 0, sizeof *W);
    W->c = c;
    W->seed = seed;
    W->E = resolve_E(c);
    W->L = W->E / R;
    W->K = c->K;
    W->H = c->H;
    W->M = c->M;
    W->nb = (c->H + 127) / 128;
    W->maxk = c->maxk > c->K ? c->maxk : c->K;
    W->dtype = c->dtype;
    W->cdtype = c->cdtype != EPX_UNSET ? c->cdtype : c->dtype == EPX_FP8_E4M3 ? EPX_BF16 : c->dtype;
    W->idtype = c->idtype;
    W->align = c->align;
    W->es = moe_ref_elem_size(W->dtype);
    W->ces = moe_ref_elem_size(W->cdtype);
    W->isz = W->idtype == EPX_I32 ? 4 : 8;
    int E = W->E, K = W->K;

    /* Zipf: expert perm[i] has weight 1 / (i + 1)^1.1. */
    ASSERT(E >= 1);
    int *perm = calloc((size_t)E + 3, sizeof(int));
    double *cdf = calloc((size_t)E + 1, sizeof(double));
    uint64_t s0 = test_mix(seed, 7, 0, 0);
    for (int i = 0; i < E; i++) perm[i] = i;
    for (int i = E - 1; i > 0; i--) {
        int j = (int)(test_rand(&s0) % (uint64_t)(i + 1)), tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
    double tot = 0;
    for (int i = 0; i < E; i++) cdf[i] = (tot += 1.0 / pow(i + 1.0, 1.1));
    int one = (int)(seed % (uint64_t)E);
    int dupset[3] = {perm[0], perm[E > 1 ? 1 : 0], perm[E > 2 ? 2 : 0]};

    for (int p = 0; p < R; p++) {
        uint64_t s = test_mix(seed, 1, (uint64_t)p, 0);
        int T = (int)(test_rand(&s) % (uint64_t)(W->M + 1));
        if (c->flags & F_T_WIDE) T = W->M / 8 + (int)(test_rand(&s) % (uint64_t)(W->M - W->M / 8 + 1));
        if (R > 1 && p == (int)(seed % (uint64_t)R) && !(c->flags & F_T_WIDE)) T = 0;
        if ((R > 1 || (seed & 1)) && p == (int)((seed + 1) % (uint64_t)R)) T = W->M;
        if (c->flags & F_T_SMALL) T = (int)(test_rand(&s) % (uint64_t)(W->M / 16 + 1));
        if (c->flags & F_T_ZERO) T = 0;
        if (c->flags & F_T_FULL) T = W->M;
        W->T[p] = T;
        W->idx[p] = malloc(sizeof(int64_t) * (size_t)(T * K + 1));
        W->w[p] = malloc(sizeof(float) * (size_t)(T * K + 1));
        for (int t = 0; t < T; t++) {
            int64_t *row = &W->idx[p][(int64_t)t * K];
            for (int k = 0; k < K; k++) {
                uint64_t r = test_rand(&s);
                int64_t e;
                switch (c->route) {
                case ROUTE_UNIFORM:
                    for (;;) { /* distinct when possible */
                        e = (int64_t)(r % (uint64_t)E);
                        int dup = 0;
                        for (int j = 0; j < k; j++) dup |= row[j] == e;
                        if (!dup || K > E) break;
                        r = test_rand(&s);
                    }
                    break;
                case ROUTE_ZIPF: {
                    double u = (double)(r >> 11) * 0x1.0p-53 * tot;
                    int i = 0;
                    while (i < E - 1 && cdf[i] < u) i++;
                    e = perm[i];
                    break;
                }
                case ROUTE_ONE: e = (k == 0 || (r & 1)) ? one : -1; break;
                case ROUTE_DUP: e = dupset[r % 3]; break;
                default: e = -1; break;
                }
                if (c->neg_pct && (int)((r >> 33) % 100) < c->neg_pct && !(c->route == ROUTE_ONE && k == 0)) e = -1;
                row[k] = e;
                W->w[p][(int64_t)t * K + k] = gen_weight(test_rand(&s));
                uint32_t b;
                if (ll_cancels(W, p, t)) /* +-2^-j, j in 0 .. 3 (yll_bits_row) */
                    W->w[p][(int64_t)t * K + k] = ldexpf(r >> 62 ? 1.0f : -1.0f, -(int)((r >> 40) % 4));
                else if (c->mode == EPX_MOE_LOW_LATENCY && special_bits(W, EPX_F32, test_mix(r, 91, 0, 0), &b))
                    memcpy(&W->w[p][(int64_t)t * K + k], &b, 4); /* the combine's weights (F_SPECIAL) */
            }
        }
    }
    free(perm);
    free(cdf);
    W->rt.R = R;
    W->rt.E = E;
    W->rt.K = K;
    W->rt.T = W->T;
    W->rt.idx = (const int64_t *const *)W->idx;
}

static void world_free(world_t *W)
{
    for (int p = 0; p < R; p++) free(W->idx[p]), free(W->w[p]);
}

/* Rank p's topk_idx in the index dtype. */
static void *typed_idx(const world_t *W, const int64_t *idx, int64_t n)
{
    void *b = malloc((size_t)(n + 1) * 8);
    for (int64_t i = 0; i < n; i++) {
        if (W->idtype == EPX_I32)
            ((int32_t *)b)[i] = (int32_t)idx[i];
        else
            ((int64_t *)b)[i] = idx[i];
    }
    return b;
}
static int64_t load_idx(const world_t *W, const void *b, int64_t i)
{
    return W->idtype == EPX_I32 ? ((const int32_t *)b)[i] : ((const int64_t *)b)[i];
}

static epx_moe_config_t world_cfg(const world_t *W)
{
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = W->H;
    cfg.max_tokens_per_rank = W->M;
    cfg.num_experts = W->E;
    cfg.max_topk = W->maxk;
    cfg.dtype = W->dtype;
    cfg.combine_dtype = W->c->cdtype;
    cfg.index_dtype = W->idtype;
    cfg.expert_alignment = W->align;
    cfg.mode = W->c->mode;
    cfg.ll_fp8 = W->c->ll_fp8;
    cfg.scale_format = W->c->sfmt;
    cfg.num_sms = num_sms;
    return cfg;
}

/* ---- Buffers on the backend, poison ------------------------------------------------------ */

/* Every buffer the library reads or writes lives on the backend under test (device memory
 * with --cuda). Inputs are built in a host copy and put there; outputs are poisoned there in
 * stream order and fetched into a host copy (test_buf_get waits for the stream) before any
 * check reads them. On the CPU backend both sides are plain host memory. */

/* Host -> backend, once nothing enqueued on the stream can still touch dst; on CUDA also
 * wait until the copy has landed (a pageable host-to-device cudaMemcpy may return before
 * its DMA completes, and the calls run on a non-blocking stream that does not order after
 * it): a one-byte read-back on the same (default) stream does. */
static void put(void *dst, const void *src, size_t bytes)
{
    if (!bytes) return;
    test_sync();
    test_buf_put(dst, src, bytes);
    if (test_on_cuda()) {
        uint8_t b;
        test_buf_get(&b, dst, 1);
    }
}
/* Backend -> host (after the stream is done). */
static void fetch(void *dst, const void *src, size_t bytes)
{
    if (bytes) test_buf_get(dst, src, bytes);
}
/* Poison `bytes` of a backend buffer (guard included), in stream order. */
static void poison(void *buf, size_t bytes)
{
    if (buf && bytes) test_buf_poison(buf, POISON, bytes);
}
/* An input on the backend (`alloc` bytes, the first `bytes` from host), `shift` bytes into
 * its allocation *base. */
static void *dev_in_shifted(const void *host, size_t alloc, size_t bytes, size_t shift, void **base)
{
    *base = test_buf_alloc(alloc + shift);
    put((char *)*base + shift, host, bytes);
    return (char *)*base + shift;
}
/* The same at the start of its allocation (freed by dev_free). */
static void *dev_in(const void *host, size_t alloc, size_t bytes)
{
    void *base;
    return dev_in_shifted(host, alloc, bytes, 0, &base);
}
/* An output on the backend: bytes + GUARD, poisoned. */
static void *dev_out(size_t bytes)
{
    void *d = test_buf_alloc(bytes + GUARD);
    poison(d, bytes + GUARD);
    return d;
}
static void dev_free(void *p)
{
    if (!p) return;
    test_sync();
    test_buf_free(p);
}

/* A host copy of an output: bytes + GUARD, poisoned. */
static void *palloc(size_t bytes)
{
    void *p = malloc(bytes + GUARD);
    memset(p, POISON, bytes + GUARD);
    return p;
}
/* Bytes [from, to) of buf must still be poison. */
static void expect_poison(const void *buf, size_t from, size_t to, const char *cs, const char *what)
{
    const uint8_t *b = buf;
    for (size_t i = from; i < to; i++)
        if (b[i] != POISON) TEST_FAIL_("case %s: %s byte %zu (of %zu..%zu) was written: 0x%02x", cs, what, i, from, to, b[i]);
}

/* ---- Layout ------------------------------------------------------------------------------- */

/* idx: this rank's topk_idx on the backend. */
static void check_layout(epx_moe_t moe, const world_t *W, const void *idx, const char *cs)
{
    int T = W->T[me], E = W->E;
    size_t pr_b = sizeof(int32_t) * (size_t)R, pe_b = sizeof(int32_t) * (size_t)E, ir_b = (size_t)T * (size_t)R;
    int32_t *pr = palloc(pr_b), *pe = palloc(pe_b);
    uint8_t *ir = palloc(ir_b);
    int32_t *dpr = dev_out(pr_b), *dpe = dev_out(pe_b);
    uint8_t *dir = dev_out(ir_b);
    int32_t *rpr = malloc(sizeof(int32_t) * (size_t)R), *rpe = malloc(sizeof(int32_t) * (size_t)E);
    uint8_t *rir = malloc((size_t)T * (size_t)R + 1);
    moe_ref_layout(&W->rt, me, rpr, rpe, rir);
    ASSERT_OK(epx_moe_layout(moe, idx, T, W->K, dpr, dpe, dir, test_stream()));
    fetch(pr, dpr, pr_b + GUARD);
    fetch(pe, dpe, pe_b + GUARD);
    fetch(ir, dir, ir_b + GUARD);
    for (int q = 0; q < R; q++)
        if (pr[q] != rpr[q]) TEST_FAIL_("case %s: num_tokens_per_rank[%d] = %d, expected %d", cs, q, pr[q], rpr[q]);
    for (int e = 0; e < E; e++)
        if (pe[e] != rpe[e]) TEST_FAIL_("case %s: num_tokens_per_expert[%d] = %d, expected %d", cs, e, pe[e], rpe[e]);
    for (int64_t i = 0; i < (int64_t)T * R; i++)
        if (ir[i] != rir[i])
            TEST_FAIL_("case %s: is_token_in_rank[t=%lld, r=%lld] = %d, expected %d", cs, (long long)(i / R),
                       (long long)(i % R), ir[i], rir[i]);
    expect_poison(pr, pr_b, pr_b + GUARD, cs, "layout per_rank guard");
    expect_poison(pe, pe_b, pe_b + GUARD, cs, "layout per_expert guard");
    expect_poison(ir, ir_b, ir_b + GUARD, cs, "layout in_rank guard");
    /* Any output may be NULL. */
    poison(dpe, pe_b + GUARD);
    ASSERT_OK(epx_moe_layout(moe, idx, T, W->K, NULL, dpe, NULL, test_stream()));
    fetch(pe, dpe, pe_b + GUARD);
    ASSERT(memcmp(pe, rpe, pe_b) == 0);
    poison(dpr, pr_b + GUARD);
    ASSERT_OK(epx_moe_layout(moe, idx, T, W->K, dpr, NULL, NULL, test_stream()));
    fetch(pr, dpr, pr_b + GUARD);
    ASSERT(memcmp(pr, rpr, pr_b) == 0);
    free(pr), free(pe), free(ir), free(rpr), free(rpe), free(rir);
    dev_free(dpr), dev_free(dpe), dev_free(dir);
}

/* ---- High-throughput buffers ------------------------------------------------------------- */

typedef struct {
    int64_t cap;
    int64_t *dcount; /* num_recv_tokens_device (on the backend), or NULL */
    /* inputs of this rank: host copies (x, xs, idx, w) and the backend buffers (d*) */
    void *x;
    float *xs;
    void *idx;
    float *w;
    bool reg;
    void *dx, *didx;
    float *dxs, *dw;
    size_t idx_b; /* bytes of topk_idx (T * K indices) */
    /* outputs: host copies, fetched before every check, and the backend buffers (d*) */
    void *rx;
    float *rxs;
    void *ridx;
    float *rw;
    int32_t *rsr, *rst, *rpe;
    void *drx, *dridx;
    float *drxs, *drw;
    int32_t *drsr, *drst, *drpe;
    size_t rx_b, rxs_b, ridx_b, rw_b, rs_b, rpe_b;
} ht_bufs_t;

/* Generation `gen` of this rank's tokens into the host copy, then onto the backend. */
static void fill_x(const world_t *W, ht_bufs_t *B, int gen)
{
    int T = W->T[me];
    for (int t = 0; t < T; t++) {
        x_row(W, me, t, gen, (char *)B->x + (size_t)t * (size_t)W->H * (size_t)W->es);
        if (B->xs) x_scales_row(W, me, t, gen, B->xs + (size_t)t * (size_t)W->nb);
    }
    put(B->dx, B->x, (size_t)T * (size_t)W->H * (size_t)W->es);
    if (B->xs) put(B->dxs, B->xs, sizeof(float) * (size_t)T * (size_t)W->nb);
}

static void ht_alloc(const world_t *W, ht_bufs_t *B, int64_t cap, bool reg, bool null_outs)
{
    memset(B, 0, sizeof *B);
    int T = W->T[me], H = W->H, K = W->K;
    size_t xb = (size_t)T * (size_t)H * (size_t)W->es + 64;
    B->reg = reg;
    B->x = malloc(xb);
    if (reg)
        ASSERT_OK(epx_mem_alloc(comm, xb, &B->dx));
    else
        B->dx = test_buf_alloc(xb);
    if (W->dtype == EPX_FP8_E4M3) {
        B->xs = malloc(sizeof(float) * (size_t)(T * W->nb + 1));
        B->dxs = test_buf_alloc(sizeof(float) * (size_t)(T * W->nb + 1));
    }
    fill_x(W, B, 0);
    B->idx = typed_idx(W, W->idx[me], (int64_t)T * K);
    B->idx_b = (size_t)T * (size_t)K * (size_t)W->isz;
    B->didx = dev_in(B->idx, (size_t)(T * K + 1) * 8, B->idx_b);
    B->w = malloc(sizeof(float) * (size_t)(T * K + 1));
    memcpy(B->w, W->w[me], sizeof(float) * (size_t)(T * K));
    B->dw = dev_in(B->w, sizeof(float) * (size_t)(T * K + 1), sizeof(float) * (size_t)(T * K));
    B->cap = cap;
    B->rx_b = (size_t)cap * (size_t)H * (size_t)W->es;
    B->rx = palloc(B->rx_b);
    B->drx = dev_out(B->rx_b);
    if (W->dtype == EPX_FP8_E4M3) {
        B->rxs_b = (size_t)cap * (size_t)W->nb * 4;
        B->rxs = palloc(B->rxs_b);
        B->drxs = dev_out(B->rxs_b);
    }
    if (!null_outs) {
        B->ridx_b = (size_t)cap * (size_t)K * (size_t)W->isz;
        B->rw_b = (size_t)cap * (size_t)K * 4;
        B->rs_b = (size_t)cap * 4;
        B->rpe_b = (size_t)W->L * 4;
        B->ridx = palloc(B->ridx_b);
        B->rw = palloc(B->rw_b);
        B->rsr = palloc(B->rs_b);
        B->rst = palloc(B->rs_b);
        B->rpe = palloc(B->rpe_b);
        B->dridx = dev_out(B->ridx_b);
        B->drw = dev_out(B->rw_b);
        B->drsr = dev_out(B->rs_b);
        B->drst = dev_out(B->rs_b);
        B->drpe = dev_out(B->rpe_b);
    }
}

static void ht_poison(ht_bufs_t *B)
{
    poison(B->dcount, sizeof(int64_t));
    poison(B->drx, B->rx_b + GUARD);
    if (B->drxs) poison(B->drxs, B->rxs_b + GUARD);
    if (B->dridx) {
        poison(B->dridx, B->ridx_b + GUARD);
        poison(B->drw, B->rw_b + GUARD);
        poison(B->drsr, B->rs_b + GUARD);
        poison(B->drst, B->rs_b + GUARD);
        poison(B->drpe, B->rpe_b + GUARD);
    }
}

/* Every output (guards included) into its host copy. */
static void ht_fetch(ht_bufs_t *B)
{
    fetch(B->rx, B->drx, B->rx_b + GUARD);
    if (B->rxs) fetch(B->rxs, B->drxs, B->rxs_b + GUARD);
    if (B->ridx) {
        fetch(B->ridx, B->dridx, B->ridx_b + GUARD);
        fetch(B->rw, B->drw, B->rw_b + GUARD);
        fetch(B->rsr, B->drsr, B->rs_b + GUARD);
        fetch(B->rst, B->drst, B->rs_b + GUARD);
        fetch(B->rpe, B->drpe, B->rpe_b + GUARD);
    }
}

static void ht_expect_all_poison(ht_bufs_t *B, const char *cs)
{
    ht_fetch(B);
    expect_poison(B->rx, 0, B->rx_b + GUARD, cs, "recv_x");
    if (B->rxs) expect_poison(B->rxs, 0, B->rxs_b + GUARD, cs, "recv_x_scales");
    if (B->ridx) {
        expect_poison(B->ridx, 0, B->ridx_b + GUARD, cs, "recv_topk_idx");
        expect_poison(B->rw, 0, B->rw_b + GUARD, cs, "recv_topk_weights");
        expect_poison(B->rsr, 0, B->rs_b + GUARD, cs, "recv_src_rank");
        expect_poison(B->rst, 0, B->rs_b + GUARD, cs, "recv_src_token");
        expect_poison(B->rpe, 0, B->rpe_b + GUARD, cs, "num_recv_tokens_per_expert");
    }
}

static void ht_free(ht_bufs_t *B)
{
    if (B->reg) {
        test_sync();
        ASSERT_OK(epx_mem_free(comm, B->dx));
    } else {
        dev_free(B->dx);
    }
    free(B->x), free(B->xs), free(B->idx), free(B->w), free(B->rx), free(B->rxs);
    free(B->ridx), free(B->rw), free(B->rsr), free(B->rst), free(B->rpe);
    dev_free(B->dxs), dev_free(B->didx), dev_free(B->dw), dev_free(B->drx), dev_free(B->drxs);
    dev_free(B->dridx), dev_free(B->drw), dev_free(B->drsr), dev_free(B->drst), dev_free(B->drpe);
    dev_free(B->dcount);
}

static epx_moe_dispatch_in_t ht_in(const world_t *W, const ht_bufs_t *B, bool weights)
{
    epx_moe_dispatch_in_t in = {B->dx, B->dxs, B->didx, weights ? B->dw : NULL, W->T[me], W->K};
    /* A rank without tokens may pass no x and no x_scales (it still forwards and receives
     * other ranks' rows, scales included, across hosts). */
    if (W->T[me] == 0) in.x = NULL, in.x_scales = NULL;
    return in;
}
static epx_moe_dispatch_out_t ht_out(const ht_bufs_t *B)
{
    epx_moe_dispatch_out_t out = {B->drx, B->drxs, B->dridx, B->drw, B->drsr, B->drst, B->drpe, B->cap, -77, B->dcount};
    return out;
}

/* A dispatch on the CUDA backend skips its host synchronisation (num_recv_tokens = -1)
 * when it has a worst-case capacity and a device count (every rank alike in these tests). */
static bool ht_no_sync(const world_t *W, const ht_bufs_t *B)
{
    return test_on_cuda() && num_sms != EPX_MOE_COPY_ENGINES && B->dcount && B->cap >= (int64_t)R * W->M;
}

/* num_recv_tokens_device as the backend left it (poisoned before every dispatch). */
static int64_t ht_device_count(const ht_bufs_t *B)
{
    int64_t n;
    test_buf_get(&n, B->dcount, sizeof n);
    return n;
}

/* recv_x (and scales) rows hold generation `gen` of their sources; meta outputs match the
 * reference (meta) or are untouched (!meta); everything past N is poison. Fetches the
 * outputs first. */
static void check_dispatch(const world_t *W, const moe_ref_recv_t *ref, ht_bufs_t *B, int gen, bool meta, bool weights,
                           const char *cs)
{
    ht_fetch(B);
    int H = W->H, K = W->K, nb = W->nb;
    int64_t n = ref->n;
    size_t rowb = (size_t)H * (size_t)W->es;
    uint8_t *row = malloc(rowb + 1);
    float *srow = malloc(sizeof(float) * (size_t)nb + 4);
    for (int64_t i = 0; i < n; i++) {
        x_row(W, ref->src_rank[i], ref->src_token[i], gen, row);
        const uint8_t *got = (const uint8_t *)B->rx + (size_t)i * rowb;
        if (memcmp(got, row, rowb) != 0) {
            size_t j = 0;
            while (got[j] == row[j]) j++;
            TEST_FAIL_("case %s: recv_x row %lld (from rank %d token %d, gen %d) byte %zu = 0x%02x, expected 0x%02x",
                       cs, (long long)i, ref->src_rank[i], ref->src_token[i], gen, j, got[j], row[j]);
        }
        if (B->rxs) {
            x_scales_row(W, ref->src_rank[i], ref->src_token[i], gen, srow);
            for (int b = 0; b < nb; b++)
                if (memcmp(&B->rxs[i * nb + b], &srow[b], 4) != 0)
                    TEST_FAIL_("case %s: recv_x_scales[%lld][%d] = %g, expected %g", cs, (long long)i, b,
                               (double)B->rxs[i * nb + b], (double)srow[b]);
        }
    }
    expect_poison(B->rx, (size_t)n * rowb, B->rx_b + GUARD, cs, "recv_x past N");
    if (B->rxs) expect_poison(B->rxs, (size_t)n * (size_t)nb * 4, B->rxs_b + GUARD, cs, "recv_x_scales past N");
    if (B->ridx && !meta) {
        expect_poison(B->ridx, 0, B->ridx_b + GUARD, cs, "recv_topk_idx (cached)");
        expect_poison(B->rw, 0, B->rw_b + GUARD, cs, "recv_topk_weights (cached)");
        expect_poison(B->rsr, 0, B->rs_b + GUARD, cs, "recv_src_rank (cached)");
        expect_poison(B->rst, 0, B->rs_b + GUARD, cs, "recv_src_token (cached)");
        expect_poison(B->rpe, 0, B->rpe_b + GUARD, cs, "num_recv_tokens_per_expert (cached)");
    } else if (B->ridx) {
        for (int64_t i = 0; i < n; i++) {
            if (B->rsr[i] != ref->src_rank[i] || B->rst[i] != ref->src_token[i])
                TEST_FAIL_("case %s: row %lld source = (rank %d, token %d), expected (%d, %d)", cs, (long long)i,
                           B->rsr[i], B->rst[i], ref->src_rank[i], ref->src_token[i]);
            for (int k = 0; k < K; k++) {
                int64_t got = load_idx(W, B->ridx, i * K + k);
                if (got != ref->topk_idx[i * K + k])
                    TEST_FAIL_("case %s: recv_topk_idx[%lld][%d] = %lld, expected %lld (source rank %d token %d)", cs,
                               (long long)i, k, (long long)got, (long long)ref->topk_idx[i * K + k], ref->src_rank[i],
                               ref->src_token[i]);
                if (weights && memcmp(&B->rw[i * K + k], &ref->topk_weights[i * K + k], 4) != 0)
                    TEST_FAIL_("case %s: recv_topk_weights[%lld][%d] = %.9g, expected %.9g", cs, (long long)i, k,
                               (double)B->rw[i * K + k], (double)ref->topk_weights[i * K + k]);
            }
        }
        expect_poison(B->ridx, (size_t)n * (size_t)K * (size_t)W->isz, B->ridx_b + GUARD, cs, "recv_topk_idx past N");
        expect_poison(B->rw, weights ? (size_t)n * (size_t)K * 4 : 0, B->rw_b + GUARD, cs,
                      weights ? "recv_topk_weights past N" : "recv_topk_weights (no weights given)");
        expect_poison(B->rsr, (size_t)n * 4, B->rs_b + GUARD, cs, "recv_src_rank past N");
        expect_poison(B->rst, (size_t)n * 4, B->rs_b + GUARD, cs, "recv_src_token past N");
        for (int l = 0; l < W->L; l++)
            if (B->rpe[l] != ref->per_expert[l])
                TEST_FAIL_("case %s: num_recv_tokens_per_expert[%d] = %d, expected %d (alignment %d)", cs, l, B->rpe[l],
                           ref->per_expert[l], W->align);
        expect_poison(B->rpe, B->rpe_b, B->rpe_b + GUARD, cs, "num_recv_tokens_per_expert guard");
    }
    free(row);
    free(srow);
}

/* Valid dispatch of W on every rank into B, checked. Returns the handle. */
static epx_moe_handle_t dispatch_checked(epx_moe_t moe, const world_t *W, const moe_ref_recv_t *ref, ht_bufs_t *B,
                                         bool weights, const char *cs)
{
    ht_poison(B);
    epx_moe_dispatch_in_t in = ht_in(W, B, weights);
    epx_moe_dispatch_out_t out = ht_out(B);
    epx_moe_handle_t h = NULL;
    epx_status_t st = epx_moe_dispatch(moe, &in, &out, &h, test_stream());
    if (st != EPX_SUCCESS) TEST_FAIL_("case %s: dispatch -> %s: %s", cs, epx_status_name(st), epx_comm_get_last_error(comm));
    ASSERT(h != NULL);
    int64_t host_n = ht_no_sync(W, B) ? -1 : ref->n;
    if (out.num_recv_tokens != host_n)
        TEST_FAIL_("case %s: num_recv_tokens = %lld, expected %lld", cs, (long long)out.num_recv_tokens, (long long)host_n);
    int64_t rows = -2;
    ASSERT_OK(epx_moe_handle_num_recv_tokens(h, &rows));
    ASSERT_EQ(rows, host_n);
    if (B->dcount && ht_device_count(B) != ref->n)
        TEST_FAIL_("case %s: num_recv_tokens_device = %lld, expected %lld", cs, (long long)ht_device_count(B),
                   (long long)ref->n);
    check_dispatch(W, ref, B, 0, true, weights, cs);
    return h;
}

/* ---- High-throughput combine ------------------------------------------------------------- */

static double rel_tol(int dt)
{
    return dt == EPX_BF16 ? 0x1p-8 : dt == EPX_F16 ? 0x1p-11 : 0x1p-23;
}

/* Check out[T, H] (combine dtype) and out_w[T, K] against the reference for this rank. */
static void check_combine_out(const world_t *W, const void *out, const float *out_w, const char *cs)
{
    int T = W->T[me], H = W->H, K = W->K;
    float *acc = malloc(sizeof(float) * (size_t)(H > K ? H : K) + 4);
    double *s64 = malloc(sizeof(double) * (size_t)(H > K ? H : K) + 8);
    double *a64 = malloc(sizeof(double) * (size_t)(H > K ? H : K) + 8);
    uint8_t *want = malloc((size_t)H * 4 + 4);
    for (int t = 0; t < T; t++) {
        moe_ref_combine_row(&W->rt, me, t, H, y_row_cb, (void *)W, acc, s64, a64);
        for (int h = 0; h < H; h++) {
            moe_ref_store(W->cdtype, want, h, acc[h]);
            uint32_t g = get_bits(W->cdtype, out, (int64_t)t * H + h), e = get_bits(W->cdtype, want, h);
            if (isnan(acc[h])) e = canon_nan_bits(W->cdtype);
            float gv = moe_ref_load(W->cdtype, out, (int64_t)t * H + h);
            if (g != e)
                TEST_FAIL_("case %s: combine out[t=%d][h=%d] = 0x%x (%.9g), expected 0x%x (%.9g; float64 sum %.17g)", cs,
                           t, h, g, (double)gv, e, (double)acc[h], s64[h]);
            if (!isfinite(acc[h])) continue; /* an infinity or a NaN: the bits said it */
            double tol = a64[h] * R * 0x1p-23 + fabs(s64[h]) * rel_tol(W->cdtype) + 0x1p-24;
            if (!(fabs((double)gv - s64[h]) <= tol))
                TEST_FAIL_("case %s: combine out[t=%d][h=%d] = %.9g, float64 sum %.17g (tolerance %g)", cs, t, h,
                           (double)gv, s64[h], tol);
        }
        if (out_w) {
            moe_ref_combine_row(&W->rt, me, t, K, yw_row_cb, (void *)W, acc, s64, a64);
            for (int k = 0; k < K; k++) {
                float g = out_w[(int64_t)t * K + k];
                if (isnan(acc[k])) {
                    uint32_t c = canon_nan_bits(EPX_F32);
                    memcpy(&acc[k], &c, 4);
                }
                if (memcmp(&g, &acc[k], 4) != 0)
                    TEST_FAIL_("case %s: combine out_topk_weights[t=%d][k=%d] = %.9g, expected %.9g", cs, t, k, (double)g,
                               (double)acc[k]);
                if (isfinite(acc[k]) && !(fabs((double)g - s64[k]) <= a64[k] * R * 0x1p-23 + 1e-30))
                    TEST_FAIL_("case %s: out_topk_weights[t=%d][k=%d] = %.9g, float64 sum %.17g", cs, t, k, (double)g, s64[k]);
            }
        }
    }
    free(acc), free(s64), free(a64), free(want);
}

typedef struct {
    /* host copies */
    void *y;
    float *yw;
    void *out;
    float *out_w;
    /* on the backend */
    void *dy, *dout;
    float *dyw, *doutw;
    size_t out_b, outw_b;
} comb_bufs_t;

/* Build this rank's combine inputs in the reference row order. */
static void comb_alloc(const world_t *W, const moe_ref_recv_t *ref, comb_bufs_t *C)
{
    int H = W->H, K = W->K, T = W->T[me];
    int64_t n = ref->n;
    size_t y_b = (size_t)n * (size_t)H * (size_t)W->ces;
    C->y = malloc(y_b + 64);
    C->yw = malloc(sizeof(float) * (size_t)(n * K + 1));
    uint32_t *bits = malloc(sizeof(uint32_t) * (size_t)H + 4);
    for (int64_t i = 0; i < n; i++) {
        y_bits_row(W, me, ref->src_rank[i], ref->src_token[i], H, bits);
        for (int h = 0; h < H; h++) put_bits(W->cdtype, C->y, i * H + h, bits[h]);
        yw_row_cb((void *)W, me, ref->src_rank[i], ref->src_token[i], K, C->yw + i * K);
    }
    free(bits);
    C->dy = dev_in(C->y, y_b + 64, y_b);
    C->dyw = dev_in(C->yw, sizeof(float) * (size_t)(n * K + 1), sizeof(float) * (size_t)(n * K));
    C->out_b = (size_t)T * (size_t)H * (size_t)W->ces;
    C->outw_b = (size_t)T * (size_t)K * 4;
    C->out = palloc(C->out_b);
    C->out_w = palloc(C->outw_b);
    C->dout = dev_out(C->out_b);
    C->doutw = dev_out(C->outw_b);
}
static void comb_free(comb_bufs_t *C)
{
    free(C->y), free(C->yw), free(C->out), free(C->out_w);
    dev_free(C->dy), dev_free(C->dyw), dev_free(C->dout), dev_free(C->doutw);
}
static void comb_poison(comb_bufs_t *C)
{
    poison(C->dout, C->out_b + GUARD);
    poison(C->doutw, C->outw_b + GUARD);
}
static void comb_fetch(comb_bufs_t *C)
{
    fetch(C->out, C->dout, C->out_b + GUARD);
    fetch(C->out_w, C->doutw, C->outw_b + GUARD);
}

static void combine_checked(epx_moe_t moe, epx_moe_handle_t h, const world_t *W, comb_bufs_t *C, bool weights,
                            const char *cs)
{
    comb_poison(C);
    epx_moe_combine_in_t in = {C->dy, weights ? C->dyw : NULL};
    epx_moe_combine_out_t out = {C->dout, weights ? C->doutw : NULL};
    epx_status_t st = epx_moe_combine(moe, h, &in, &out, test_stream());
    if (st != EPX_SUCCESS) TEST_FAIL_("case %s: combine -> %s: %s", cs, epx_status_name(st), epx_comm_get_last_error(comm));
    comb_fetch(C);
    check_combine_out(W, C->out, weights ? C->out_w : NULL, cs);
    expect_poison(C->out, C->out_b, C->out_b + GUARD, cs, "combine out guard");
    expect_poison(C->out_w, weights ? C->outw_b : 0, C->outw_b + GUARD, cs, "combine out_topk_weights");
}

/* A combine without topk_weights (on any rank) that still asks for out_topk_weights: the
 * rows as combine_checked checks them, and out_topk_weights all zeros (epx.h). */
static void combine_checked_zero_w(epx_moe_t moe, epx_moe_handle_t h, const world_t *W, comb_bufs_t *C, const char *cs)
{
    comb_poison(C);
    epx_moe_combine_in_t in = {C->dy, NULL};
    epx_moe_combine_out_t out = {C->dout, C->doutw};
    epx_status_t st = epx_moe_combine(moe, h, &in, &out, test_stream());
    if (st != EPX_SUCCESS) TEST_FAIL_("case %s: combine -> %s: %s", cs, epx_status_name(st), epx_comm_get_last_error(comm));
    comb_fetch(C);
    check_combine_out(W, C->out, NULL, cs);
    for (int64_t i = 0; i < (int64_t)W->T[me] * W->K; i++)
        if (C->out_w[i] != 0.0f)
            TEST_FAIL_("case %s: combine without topk_weights: out_topk_weights[t=%lld][k=%lld] = %.9g, expected 0", cs,
                       (long long)(i / W->K), (long long)(i % W->K), (double)C->out_w[i]);
    expect_poison(C->out, C->out_b, C->out_b + GUARD, cs, "combine out guard");
    expect_poison(C->out_w, C->outw_b, C->outw_b + GUARD, cs, "combine out_topk_weights guard");
}

/* A valid dispatch along W and a combine along its handle, both checked, the handle freed:
 * what every failure case runs right after it (nothing may be left broken). */
static void round_checked(epx_moe_t moe, const world_t *W, const moe_ref_recv_t *ref, ht_bufs_t *B, const char *cs)
{
    epx_moe_handle_t h = dispatch_checked(moe, W, ref, B, true, cs);
    comb_bufs_t C;
    comb_alloc(W, ref, &C);
    combine_checked(moe, h, W, &C, true, cs);
    comb_free(&C);
    ASSERT_OK(epx_moe_handle_destroy(h));
}

/* A dispatch that failed left no handle and did not write num_recv_tokens (poisoned -77). */
static void expect_no_dispatch(epx_moe_handle_t h, const epx_moe_dispatch_out_t *out, const char *cs)
{
    if (h) TEST_FAIL_("case %s: failed dispatch set the handle", cs);
    if (out->num_recv_tokens != -77)
        TEST_FAIL_("case %s: failed dispatch wrote num_recv_tokens = %lld", cs, (long long)out->num_recv_tokens);
}

/* A new context on CUDA may not exist yet: skip the whole test then. */
static epx_status_t moe_create(const epx_moe_config_t *cfg, epx_moe_t *moe)
{
    epx_status_t st = epx_moe_create(comm, cfg, moe);
    if (st == EPX_ERR_UNSUPPORTED && test_on_cuda()) {
        printf("SKIPPED: MoE on the CUDA backend: %s\n", epx_comm_get_last_error(comm));
        fflush(stdout);
        epx_comm_destroy(comm);
        exit(TEST_SKIP);
    }
    return st;
}

static epx_moe_t create_checked(const world_t *W, const char *cs)
{
    epx_moe_config_t cfg = world_cfg(W);
    epx_moe_t moe = NULL;
    epx_status_t st = moe_create(&cfg, &moe);
    if (st != EPX_SUCCESS) TEST_FAIL_("case %s: epx_moe_create -> %s: %s", cs, epx_status_name(st), epx_get_last_error());
    ASSERT(moe != NULL);
    int64_t rows = -1;
    ASSERT_OK(epx_moe_max_recv_tokens(moe, &rows));
    ASSERT_EQ(rows, (int64_t)R * W->M);
    return moe;
}

static int run_ht_case(const mcase_t *c, uint64_t seed)
{
    world_t W;
    world_init(&W, c, seed);
    char cs[320];
    snprintf(cs, sizeof cs, "%s [R=%d E=%d K=%d maxk=%d H=%d M=%d T=%d dtype=%s combine=%s idx=%s align=%d route=%d neg=%d%% flags=0x%x seed=%llu]",
             c->name, R, W.E, W.K, W.maxk, W.H, W.M, W.T[me], epx_dtype_name((epx_dtype_t)W.dtype),
             epx_dtype_name((epx_dtype_t)W.cdtype), epx_dtype_name((epx_dtype_t)W.idtype), W.align, (int)c->route,
             c->neg_pct, (unsigned)c->flags, (unsigned long long)seed);
    epx_moe_t moe = create_checked(&W, cs);
    bool weights = !(c->flags & F_NO_WEIGHTS);

    moe_ref_recv_t ref;
    moe_ref_dispatch(&W.rt, weights ? (const float *const *)W.w : NULL, me, W.align, &ref);
    int64_t cap = ref.n + 3;
    if (c->flags & F_EXACT_CAP) cap = ref.n;
    if (c->flags & F_MAX_CAP) cap = (int64_t)R * W.M;

    ht_bufs_t B;
    ht_alloc(&W, &B, cap, c->flags & F_REG, c->flags & F_NULL_OUTS);
    if (c->flags & (F_MAX_CAP | F_EXACT_CAP)) B.dcount = dev_out(sizeof(int64_t)); /* MAX: no host sync on CUDA */
    check_layout(moe, &W, B.didx, cs);
    comb_bufs_t C;
    comb_alloc(&W, &ref, &C);

    int reps = (c->flags & F_REPEAT) ? 3 : 1;
    uint8_t *first_rx = NULL, *first_out = NULL;
    for (int rep = 0; rep < reps; rep++) {
        fill_x(&W, &B, 0);
        epx_moe_handle_t h = dispatch_checked(moe, &W, &ref, &B, weights, cs);
        if (rep == 0) {
            first_rx = malloc(B.rx_b + 1);
            memcpy(first_rx, B.rx, B.rx_b);
        } else if (memcmp(first_rx, B.rx, B.rx_b) != 0) {
            TEST_FAIL_("case %s: repeat %d: recv_x differs from the first run", cs, rep);
        }

        /* Cached dispatch: new data; topk fields ignored (NULL, then a different routing). */
        for (int gen = 1; gen <= 2; gen++) {
            fill_x(&W, &B, gen);
            ht_poison(&B);
            epx_moe_dispatch_in_t in = ht_in(&W, &B, weights);
            void *other_idx = NULL, *dother_idx = NULL;
            if (gen == 1) {
                in.topk_idx = NULL;
                in.topk_weights = NULL;
            } else {
                int64_t n = (int64_t)W.T[me] * W.K;
                int64_t *zeros = calloc((size_t)n + 1, 8);
                other_idx = typed_idx(&W, zeros, n);
                free(zeros);
                dother_idx = dev_in(other_idx, (size_t)(n + 1) * 8, (size_t)n * (size_t)W.isz);
                in.topk_idx = dother_idx;
            }
            epx_moe_dispatch_out_t out = ht_out(&B);
            epx_status_t st = epx_moe_dispatch_cached(moe, h, &in, &out, test_stream());
            if (st != EPX_SUCCESS)
                TEST_FAIL_("case %s: dispatch_cached -> %s: %s", cs, epx_status_name(st), epx_comm_get_last_error(comm));
            check_dispatch(&W, &ref, &B, gen, false, weights, cs);
            free(other_idx);
            dev_free(dother_idx);
        }

        combine_checked(moe, h, &W, &C, true, cs);
        if (rep == 0) {
            first_out = malloc(C.out_b + 1);
            memcpy(first_out, C.out, C.out_b);
        } else if (memcmp(first_out, C.out, C.out_b) != 0) {
            TEST_FAIL_("case %s: repeat %d: combine output differs from the first run", cs, rep);
        }
        combine_checked(moe, h, &W, &C, false, cs);
        combine_checked_zero_w(moe, h, &W, &C, cs);
        ASSERT_OK(epx_moe_handle_destroy(h));
    }
    free(first_rx), free(first_out);
    comb_free(&C);
    ht_free(&B);
    moe_ref_recv_free(&ref);
    ASSERT_OK(epx_moe_destroy(moe));
    world_free(&W);
    return 1;
}

/* ---- Low-latency ------------------------------------------------------------------------- */

typedef struct {
    void *x, *idx;   /* host copies of the inputs */
    void *dx, *didx; /* on the backend */
    void *dx_base;   /* dx's allocation (F_SHIFT: dx lies one element into it) */
    size_t idx_b;    /* bytes of topk_idx (T * K indices) */
    /* outputs: host copies, fetched before every check, and the backend buffers (d*) */
    void *rx, *rxs;
    int32_t *rcount, *rsr, *rst;
    void *drx, *drxs;
    int32_t *drcount, *drsr, *drst;
    size_t rx_b, rxs_b, rc_b, rs_b;
    int64_t RM;
    int qes; /* bytes per received element */
    int ses; /* bytes per received scale (0: none) */
} ll_bufs_t;

/* Bytes by which a low-latency buffer of es-byte elements lies into its allocation: one
 * element on odd ranks with F_SHIFT (so that ranks of one call differ in alignment), else 0. */
static size_t ll_shift(const world_t *W, int es)
{
    return (W->c->flags & F_SHIFT) && me % 2 ? (size_t)es : 0;
}

static void ll_alloc(const world_t *W, ll_bufs_t *B)
{
    memset(B, 0, sizeof *B);
    int T = W->T[me], H = W->H;
    B->RM = (int64_t)R * W->M;
    size_t xb = (size_t)T * (size_t)H * (size_t)W->es;
    B->x = malloc(xb + 64);
    for (int t = 0; t < T; t++) x_row(W, me, t, 0, (char *)B->x + (size_t)t * (size_t)H * (size_t)W->es);
    B->dx = dev_in_shifted(B->x, xb + 64, xb, ll_shift(W, W->es), &B->dx_base);
    B->idx = typed_idx(W, W->idx[me], (int64_t)T * W->K);
    B->idx_b = (size_t)T * (size_t)W->K * (size_t)W->isz;
    B->didx = dev_in(B->idx, (size_t)(T * W->K + 1) * 8, B->idx_b);
    B->qes = W->c->ll_fp8 ? 1 : W->es;
    B->ses = !W->c->ll_fp8 ? 0 : W->c->sfmt == EPX_SCALE_UE8M0 ? 1 : 4;
    size_t slots = (size_t)W->L * (size_t)B->RM;
    B->rx_b = slots * (size_t)H * (size_t)B->qes;
    B->rx = palloc(B->rx_b);
    B->drx = dev_out(B->rx_b);
    if (B->ses) {
        B->rxs_b = slots * (size_t)W->nb * (size_t)B->ses;
        B->rxs = palloc(B->rxs_b);
        B->drxs = dev_out(B->rxs_b);
    }
    B->rc_b = (size_t)W->L * 4;
    B->rs_b = slots * 4;
    B->rcount = palloc(B->rc_b);
    B->rsr = palloc(B->rs_b);
    B->rst = palloc(B->rs_b);
    B->drcount = dev_out(B->rc_b);
    B->drsr = dev_out(B->rs_b);
    B->drst = dev_out(B->rs_b);
}
static void ll_poison(ll_bufs_t *B)
{
    poison(B->drx, B->rx_b + GUARD);
    if (B->drxs) poison(B->drxs, B->rxs_b + GUARD);
    poison(B->drcount, B->rc_b + GUARD);
    poison(B->drsr, B->rs_b + GUARD);
    poison(B->drst, B->rs_b + GUARD);
}
static void ll_fetch(ll_bufs_t *B)
{
    fetch(B->rx, B->drx, B->rx_b + GUARD);
    if (B->rxs) fetch(B->rxs, B->drxs, B->rxs_b + GUARD);
    fetch(B->rcount, B->drcount, B->rc_b + GUARD);
    fetch(B->rsr, B->drsr, B->rs_b + GUARD);
    fetch(B->rst, B->drst, B->rs_b + GUARD);
}
static void ll_expect_all_poison(ll_bufs_t *B, const char *cs)
{
    ll_fetch(B);
    expect_poison(B->rx, 0, B->rx_b + GUARD, cs, "ll recv_x");
    if (B->rxs) expect_poison(B->rxs, 0, B->rxs_b + GUARD, cs, "ll recv_x_scales");
    expect_poison(B->rcount, 0, B->rc_b + GUARD, cs, "ll recv_count");
    expect_poison(B->rsr, 0, B->rs_b + GUARD, cs, "ll recv_src_rank");
    expect_poison(B->rst, 0, B->rs_b + GUARD, cs, "ll recv_src_token");
}
static void ll_free(ll_bufs_t *B)
{
    free(B->x), free(B->idx), free(B->rx), free(B->rxs), free(B->rcount), free(B->rsr), free(B->rst);
    dev_free(B->dx_base), dev_free(B->didx), dev_free(B->drx), dev_free(B->drxs), dev_free(B->drcount);
    dev_free(B->drsr), dev_free(B->drst);
}
static epx_moe_ll_dispatch_in_t ll_in(const world_t *W, const ll_bufs_t *B)
{
    epx_moe_ll_dispatch_in_t in = {B->dx, B->didx, W->T[me], W->K};
    return in;
}
static epx_moe_ll_dispatch_out_t ll_out(const ll_bufs_t *B)
{
    epx_moe_ll_dispatch_out_t out = {B->drx, B->drxs, B->drcount, B->drsr, B->drst};
    return out;
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* The slot layout matches the reference: counts; per expert the source ranks in ascending
 * groups of the reference's sizes; tokens per (expert, source) equal as sets (or in exact
 * order); -1 past the count; every slot's data is its source token's row. */
static void check_ll_dispatch(const world_t *W, ll_bufs_t *B, const char *cs)
{
    ll_fetch(B);
    int L = W->L, H = W->H, nb = W->nb;
    int64_t RM = B->RM;
    int32_t *count = malloc(sizeof(int32_t) * (size_t)L + 4);
    int32_t *sr = malloc(sizeof(int32_t) * (size_t)(L * RM) + 4), *st = malloc(sizeof(int32_t) * (size_t)(L * RM) + 4);
    moe_ref_ll_slots(&W->rt, me, W->M, count, sr, st);
    uint16_t *xrow = malloc((size_t)H * 4 + 4);
    uint8_t *q = malloc((size_t)H + 4);
    uint8_t *scales = malloc((size_t)nb * 4 + 4);
    int32_t *a = malloc(sizeof(int32_t) * (size_t)RM + 4), *b = malloc(sizeof(int32_t) * (size_t)RM + 4);
    for (int l = 0; l < L; l++) {
        int e = me * L + l;
        if (B->rcount[l] != count[l])
            TEST_FAIL_("case %s: ll recv_count[%d] (expert %d) = %d, expected %d", cs, l, e, B->rcount[l], count[l]);
        const int32_t *gr = B->rsr + l * RM, *gt = B->rst + l * RM, *wr = sr + l * RM, *wt = st + l * RM;
        for (int64_t i = 0; i < RM; i++) {
            if (i >= count[l]) {
                if (gr[i] != -1 || gt[i] != -1)
                    TEST_FAIL_("case %s: ll slot [%d][%lld] past recv_count: source (%d, %d), expected (-1, -1)", cs, l,
                               (long long)i, gr[i], gt[i]);
                continue;
            }
            if (gr[i] != wr[i])
                TEST_FAIL_("case %s: ll slot [%d][%lld] source rank %d, expected %d (groups by ascending rank)", cs, l,
                           (long long)i, gr[i], wr[i]);
            if (exact_ll_order && gt[i] != wt[i])
                TEST_FAIL_("case %s: ll slot [%d][%lld] (from rank %d) token %d, expected %d", cs, l, (long long)i, gr[i],
                           gt[i], wt[i]);
        }
        /* Set comparison per (expert, source) group. */
        for (int64_t i = 0; i < count[l];) {
            int64_t j = i;
            while (j < count[l] && wr[j] == wr[i]) j++;
            memcpy(a, gt + i, sizeof(int32_t) * (size_t)(j - i));
            memcpy(b, wt + i, sizeof(int32_t) * (size_t)(j - i));
            qsort(a, (size_t)(j - i), 4, cmp_i32);
            qsort(b, (size_t)(j - i), 4, cmp_i32);
            if (memcmp(a, b, sizeof(int32_t) * (size_t)(j - i)) != 0)
                TEST_FAIL_("case %s: ll expert %d: tokens from rank %d differ from the reference set", cs, e, wr[i]);
            i = j;
        }
        /* Data of every slot, following the slot's own source. */
        for (int64_t i = 0; i < count[l]; i++) {
            x_row(W, gr[i], gt[i], 0, xrow);
            const uint8_t *got = (const uint8_t *)B->rx + ((size_t)l * (size_t)RM + (size_t)i) * (size_t)H * (size_t)B->qes;
            if (!W->c->ll_fp8) {
                if (memcmp(got, xrow, (size_t)H * (size_t)W->es) != 0)
                    TEST_FAIL_("case %s: ll recv_x[%d][%lld] (rank %d token %d) differs", cs, l, (long long)i, gr[i], gt[i]);
                continue;
            }
            moe_ref_quant_row(xrow, H, W->c->sfmt, q, scales);
            for (int h = 0; h < H; h++)
                if (got[h] != q[h])
                    TEST_FAIL_("case %s: ll fp8 recv_x[%d][%lld][%d] (rank %d token %d, x=%.9g) = 0x%02x (%g), expected 0x%02x (%g)",
                               cs, l, (long long)i, h, gr[i], gt[i], (double)moe_ref_bf16_to_float(xrow[h]), got[h],
                               (double)moe_ref_e4m3_to_float(got[h]), q[h], (double)moe_ref_e4m3_to_float(q[h]));
            const uint8_t *gs = (const uint8_t *)B->rxs + ((size_t)l * (size_t)RM + (size_t)i) * (size_t)nb * (size_t)B->ses;
            for (int k = 0; k < nb; k++)
                if (memcmp(gs + k * B->ses, scales + k * B->ses, (size_t)B->ses) != 0) {
                    if (B->ses == 1)
                        TEST_FAIL_("case %s: ll ue8m0 scale[%d][%lld][%d] = %d, expected %d", cs, l, (long long)i, k, gs[k],
                                   scales[k]);
                    float gf, wf;
                    memcpy(&gf, gs + 4 * k, 4);
                    memcpy(&wf, scales + 4 * k, 4);
                    TEST_FAIL_("case %s: ll f32 scale[%d][%lld][%d] = %.9g, expected %.9g", cs, l, (long long)i, k, (double)gf,
                               (double)wf);
                }
        }
    }
    expect_poison(B->rcount, B->rc_b, B->rc_b + GUARD, cs, "ll recv_count guard");
    expect_poison(B->rsr, B->rs_b, B->rs_b + GUARD, cs, "ll recv_src_rank guard");
    expect_poison(B->rx, B->rx_b, B->rx_b + GUARD, cs, "ll recv_x guard");
    free(count), free(sr), free(st), free(xrow), free(q), free(scales), free(a), free(b);
}

/* y [L, R * M, H] (combine dtype) in the slot layout, following the dispatch's own slot
 * sources (the fetched host copies); unused slots a NaN of the combine dtype. Host memory of
 * ll_y_bytes (+ 64). */
static size_t ll_y_bytes(const world_t *W, const ll_bufs_t *B)
{
    return (size_t)W->L * (size_t)B->RM * (size_t)W->H * (size_t)W->ces;
}
static void *ll_make_y(const world_t *W, const ll_bufs_t *B)
{
    int L = W->L, H = W->H;
    size_t slots = (size_t)L * (size_t)B->RM;
    void *y = malloc(ll_y_bytes(W, B) + 64);
    uint32_t *bits = malloc(sizeof(uint32_t) * (size_t)H + 4);
    for (size_t i = 0; i < slots * (size_t)H; i++) put_bits(W->cdtype, y, (int64_t)i, nan_bits(W->cdtype));
    for (int l = 0; l < L; l++)
        for (int64_t i = 0; i < B->rcount[l]; i++) {
            size_t s = (size_t)l * (size_t)B->RM + (size_t)i;
            yll_bits_row(W, me * L + l, B->rsr[s], B->rst[s], bits);
            for (int h = 0; h < H; h++) put_bits(W->cdtype, y, (int64_t)(s * (size_t)H) + h, bits[h]);
        }
    free(bits);
    return y;
}

/* out[T, H] (combine dtype) holds the reference's float32 sum stored in the combine dtype,
 * bit for bit, and lies within rounding of the float64 sum. */
static void check_ll_combine(const world_t *W, const void *out, const char *cs)
{
    int T = W->T[me], H = W->H;
    float *acc = malloc(sizeof(float) * (size_t)H + 4);
    double *s64 = malloc(sizeof(double) * (size_t)H + 8), *a64 = malloc(sizeof(double) * (size_t)H + 8);
    uint8_t *want = malloc((size_t)H * 4 + 4);
    for (int t = 0; t < T; t++) {
        moe_ref_ll_combine_row(&W->rt, me, t, H, W->w[me], yll_row_cb, (void *)W, acc, s64, a64);
        for (int h = 0; h < H; h++) {
            int64_t i = (int64_t)t * H + h;
            moe_ref_store(W->cdtype, want, h, acc[h]);
            uint32_t g = get_bits(W->cdtype, out, i), e = get_bits(W->cdtype, want, h);
            if (isnan(acc[h])) e = canon_nan_bits(W->cdtype);
            float gv = moe_ref_load(W->cdtype, out, i);
            if (g != e)
                TEST_FAIL_("case %s: ll combine out[t=%d][h=%d] = 0x%x (%.9g), expected 0x%x (%.9g; float64 %.17g)", cs,
                           t, h, g, (double)gv, e, (double)acc[h], s64[h]);
            if (!isfinite(acc[h])) continue; /* an infinity or a NaN: the bits said it */
            double tol = a64[h] * W->K * 0x1p-23 + fabs(s64[h]) * rel_tol(W->cdtype) + 0x1p-24;
            if (!(fabs((double)gv - s64[h]) <= tol))
                TEST_FAIL_("case %s: ll combine out[t=%d][h=%d] = %.9g, float64 %.17g (tolerance %g)", cs, t, h,
                           (double)gv, s64[h], tol);
        }
    }
    free(acc), free(s64), free(a64), free(want);
}

static int run_ll_case(const mcase_t *c, uint64_t seed)
{
    world_t W;
    world_init(&W, c, seed);
    char cs[320];
    snprintf(cs, sizeof cs, "%s [LL R=%d E=%d K=%d maxk=%d H=%d M=%d T=%d dtype=%s combine=%s fp8=%d scale=%s idx=%s route=%d neg=%d%% seed=%llu]",
             c->name, R, W.E, W.K, W.maxk, W.H, W.M, W.T[me], epx_dtype_name((epx_dtype_t)W.dtype),
             epx_dtype_name((epx_dtype_t)W.cdtype), c->ll_fp8,
             c->sfmt == EPX_SCALE_UE8M0 ? "ue8m0" : "f32", epx_dtype_name((epx_dtype_t)W.idtype), (int)c->route,
             c->neg_pct, (unsigned long long)seed);
    epx_moe_t moe = create_checked(&W, cs);
    ll_bufs_t B;
    ll_alloc(&W, &B);
    int T = W.T[me], H = W.H;
    size_t out_b = (size_t)T * (size_t)H * (size_t)W.ces, ys = ll_shift(&W, W.ces);
    void *out = palloc(out_b), *dout_base = dev_out(out_b + ys), *dout = (char *)dout_base + ys;
    uint8_t *first = malloc(out_b + 1);
    int reps = (c->flags & F_REPEAT) ? 3 : 1;
    for (int rep = 0; rep < reps; rep++) {
        ll_poison(&B);
        epx_moe_ll_dispatch_in_t in = ll_in(&W, &B);
        epx_moe_ll_dispatch_out_t o = ll_out(&B);
        epx_moe_handle_t h = NULL;
        epx_status_t st = epx_moe_ll_dispatch(moe, &in, &o, &h, test_stream());
        if (st != EPX_SUCCESS)
            TEST_FAIL_("case %s: ll_dispatch -> %s: %s", cs, epx_status_name(st), epx_comm_get_last_error(comm));
        ASSERT(h != NULL);
        check_ll_dispatch(&W, &B, cs);
        void *y = ll_make_y(&W, &B), *dy_base;
        void *dy = dev_in_shifted(y, ll_y_bytes(&W, &B) + 64, ll_y_bytes(&W, &B), ys, &dy_base);
        float *w = malloc(sizeof(float) * (size_t)(T * W.K + 1));
        memcpy(w, W.w[me], sizeof(float) * (size_t)(T * W.K));
        float *dw = dev_in(w, sizeof(float) * (size_t)(T * W.K + 1), sizeof(float) * (size_t)(T * W.K));
        poison(dout, out_b + GUARD);
        epx_moe_ll_combine_in_t cin = {dy, dw};
        st = epx_moe_ll_combine(moe, h, &cin, dout, test_stream());
        if (st != EPX_SUCCESS)
            TEST_FAIL_("case %s: ll_combine -> %s: %s", cs, epx_status_name(st), epx_comm_get_last_error(comm));
        fetch(out, dout, out_b + GUARD);
        check_ll_combine(&W, out, cs);
        expect_poison(out, out_b, out_b + GUARD, cs, "ll combine out guard");
        if (rep == 0)
            memcpy(first, out, out_b);
        else if (memcmp(first, out, out_b) != 0)
            TEST_FAIL_("case %s: repeat %d: ll combine output differs from the first run", cs, rep);
        free(y), free(w);
        dev_free(dy_base), dev_free(dw);
        ASSERT_OK(epx_moe_handle_destroy(h));
    }
    free(out), free(first);
    dev_free(dout_base);
    ll_free(&B);
    ASSERT_OK(epx_moe_destroy(moe));
    world_free(&W);
    return 1;
}

/* Low-latency in halves, two batches in flight: send A, send B, receive A and B, then the
 * same for combine, three rounds (the staging halves are each reused), every output checked
 * against the reference; then every misuse of the rules (epx.h) fails with
 * EPX_ERR_INVALID_USAGE and changes nothing, and the context still works after them. */
typedef struct {
    world_t W;
    ll_bufs_t B;
    epx_moe_handle_t h;
    void *dy, *dw;
    void *out, *dout; /* [T, H] combine dtype */
    size_t out_b;
} ll_batch_t;

static void ll_batch_combine_inputs(ll_batch_t *b)
{
    int T = b->W.T[me];
    void *y = ll_make_y(&b->W, &b->B);
    b->dy = dev_in(y, ll_y_bytes(&b->W, &b->B) + 64, ll_y_bytes(&b->W, &b->B));
    b->dw = dev_in(b->W.w[me], sizeof(float) * (size_t)(T * b->W.K + 1), sizeof(float) * (size_t)(T * b->W.K));
    free(y);
    poison(b->dout, b->out_b + GUARD);
}

/* Batch i's world (from the seed) and poisoned buffers; the context is made for the first. */
static void ll_batch_init(ll_batch_t *b, const mcase_t *c, uint64_t seed, epx_moe_t *moe, const char *name)
{
    world_init(&b->W, c, seed);
    if (!*moe) *moe = create_checked(&b->W, name);
    ll_alloc(&b->W, &b->B);
    ll_poison(&b->B);
    b->out_b = (size_t)b->W.T[me] * (size_t)b->W.H * (size_t)b->W.ces;
    b->out = palloc(b->out_b);
    b->dout = dev_out(b->out_b);
}

static void ll_batch_free(ll_batch_t *b)
{
    ASSERT_OK(epx_moe_handle_destroy(b->h));
    dev_free(b->dy), dev_free(b->dw), dev_free(b->dout);
    free(b->out);
    ll_free(&b->B);
    world_free(&b->W);
}

static void expect_usage(epx_status_t st, const char *what)
{
    if (st != EPX_ERR_INVALID_USAGE)
        TEST_FAIL_("split ll: %s -> %s, expected EPX_ERR_INVALID_USAGE (%s)", what, epx_status_name(st),
                   epx_comm_get_last_error(comm));
}

static int run_ll_split(void)
{
    mcase_t c = {"ll split", -3, 6, 200, 9, EPX_BF16, EPX_UNSET, EPX_I64, 1, ROUTE_ZIPF, 10, 0, 0, EPX_MOE_LOW_LATENCY, 1, EPX_SCALE_F32};
    ll_batch_t b[2];
    epx_moe_t moe = NULL;
    void *st_ = test_stream();
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 2; i++) ll_batch_init(&b[i], &c, 9100 + (uint64_t)(2 * round + i), &moe, "ll split");
        for (int i = 0; i < 2; i++) {
            epx_moe_ll_dispatch_in_t in = ll_in(&b[i].W, &b[i].B);
            epx_moe_ll_dispatch_out_t o = ll_out(&b[i].B);
            ASSERT_OK(epx_moe_ll_dispatch_send(moe, &in, &o, &b[i].h, st_));
        }
        if (round == 0) { /* misuse while two dispatches are pending */
            epx_moe_ll_dispatch_in_t in = ll_in(&b[0].W, &b[0].B);
            epx_moe_ll_dispatch_out_t o = ll_out(&b[0].B);
            epx_moe_handle_t x = NULL;
            expect_usage(epx_moe_ll_dispatch_send(moe, &in, &o, &x, st_), "a third dispatch send");
            expect_usage(epx_moe_ll_dispatch(moe, &in, &o, &x, st_), "a whole dispatch with sends pending");
            ASSERT(x == NULL);
            expect_usage(epx_moe_ll_dispatch_recv(moe, b[1].h, st_), "receiving the newer send first");
            expect_usage(epx_moe_ll_combine_recv(moe, b[0].h, st_), "a combine receive with no combine sent");
            epx_moe_ll_combine_in_t cin = {b[0].B.drx, NULL};
            expect_usage(epx_moe_ll_combine_send(moe, b[0].h, &cin, b[0].dout, st_), "combining a pending dispatch");
            expect_usage(epx_moe_handle_destroy(b[0].h), "destroying a handle with a pending send");
            expect_usage(epx_moe_destroy(moe), "destroying the context of a handle with a pending send");
        }
        for (int i = 0; i < 2; i++) {
            ASSERT_OK(epx_moe_ll_dispatch_recv(moe, b[i].h, st_));
            check_ll_dispatch(&b[i].W, &b[i].B, i ? "ll split B" : "ll split A");
            ll_batch_combine_inputs(&b[i]);
        }
        if (round == 1) expect_usage(epx_moe_ll_dispatch_recv(moe, b[0].h, st_), "receiving a dispatch twice");
        for (int i = 0; i < 2; i++) {
            epx_moe_ll_combine_in_t cin = {b[i].dy, b[i].dw};
            ASSERT_OK(epx_moe_ll_combine_send(moe, b[i].h, &cin, b[i].dout, st_));
        }
        if (round == 2) {
            epx_moe_ll_combine_in_t cin = {b[0].dy, b[0].dw};
            expect_usage(epx_moe_ll_combine(moe, b[0].h, &cin, b[0].dout, st_), "a whole combine with sends pending");
            expect_usage(epx_moe_ll_combine_recv(moe, b[1].h, st_), "receiving the newer combine first");
        }
        for (int i = 0; i < 2; i++) {
            ASSERT_OK(epx_moe_ll_combine_recv(moe, b[i].h, st_));
            fetch(b[i].out, b[i].dout, b[i].out_b + GUARD);
            check_ll_combine(&b[i].W, b[i].out, i ? "ll split B" : "ll split A");
            expect_poison(b[i].out, b[i].out_b, b[i].out_b + GUARD, "ll split", "combine out guard");
        }
        for (int i = 0; i < 2; i++) ll_batch_free(&b[i]);
    }
    ASSERT_OK(epx_moe_destroy(moe));
    return 1;
}

/* The nb batches' sends (combine: combine sends, else dispatch sends) two ahead of their
 * receives: s1 s2, then r(i) s(i + 2) ..., then the last receives; rank `slow`'s stream is
 * held before each of its receives. */
static void ll_pipelined(epx_moe_t moe, ll_batch_t *b, int nb, int slow, bool combine)
{
    void *st_ = test_stream();
    for (int step = 0; step < nb + 2; step++) {
        int r = step - 2, snd = step;
        if (r >= 0) {
            if (me == slow) hold_stream();
            ASSERT_OK(combine ? epx_moe_ll_combine_recv(moe, b[r].h, st_) : epx_moe_ll_dispatch_recv(moe, b[r].h, st_));
        }
        if (snd < nb && combine) {
            epx_moe_ll_combine_in_t cin = {b[snd].dy, b[snd].dw};
            ASSERT_OK(epx_moe_ll_combine_send(moe, b[snd].h, &cin, b[snd].dout, st_));
        } else if (snd < nb) {
            epx_moe_ll_dispatch_in_t in = ll_in(&b[snd].W, &b[snd].B);
            epx_moe_ll_dispatch_out_t o = ll_out(&b[snd].B);
            ASSERT_OK(epx_moe_ll_dispatch_send(moe, &in, &o, &b[snd].h, st_));
        }
    }
}

/* Low-latency sends running ahead of a slow receiver: s1 s2 r1 s3 r2 s4 r3 s5 r4 r5 (two
 * in flight, every staging half reused), with one rank's stream held before each of its
 * receives (`slow`), so that its peers' sends k + 2 come while it has not received k: they
 * must wait for it, or its receive reads the wrong batch. Every batch checked; then the
 * combines the same way (the slow rank held before each combine receive), each checked. */
static int run_ll_pipeline(int slow)
{
    enum { NB = 5 };
    mcase_t c = {"ll pipeline", -2, 4, 96, 6, EPX_BF16, EPX_UNSET, EPX_I32, 1, ROUTE_UNIFORM, 10, 0, 0,
                 EPX_MOE_LOW_LATENCY, 0, EPX_SCALE_F32};
    ll_batch_t b[NB];
    epx_moe_t moe = NULL;
    char cs[64];
    for (int i = 0; i < NB; i++) ll_batch_init(&b[i], &c, 9300 + 10 * (uint64_t)slow + (uint64_t)i, &moe, "ll pipeline");
    ll_pipelined(moe, b, NB, slow, false);
    for (int i = 0; i < NB; i++) {
        snprintf(cs, sizeof cs, "ll pipeline slow=%d batch %d", slow, i);
        check_ll_dispatch(&b[i].W, &b[i].B, cs);
        ll_batch_combine_inputs(&b[i]);
    }
    ll_pipelined(moe, b, NB, slow, true);
    for (int i = 0; i < NB; i++) {
        snprintf(cs, sizeof cs, "ll pipeline slow=%d combine %d", slow, i);
        fetch(b[i].out, b[i].dout, b[i].out_b + GUARD);
        check_ll_combine(&b[i].W, b[i].out, cs);
    }
    for (int i = 0; i < NB; i++) ll_batch_free(&b[i]);
    ASSERT_OK(epx_moe_destroy(moe));
    return 1;
}

/* Two high-throughput dispatches alive at once (different routings, one context):
 * cached dispatch and combine along each handle, in the opposite order. The first handle
 * also combines before its cached dispatch (across hosts its row plan is built first
 * without the dispatch's rows, then again with them). */
static int run_two_handles(void)
{
    mcase_t c = {"two handles", -3, 5, 96, 10, EPX_BF16, EPX_F32, EPX_I32, 2, ROUTE_UNIFORM, 20, 0, 0,
                 EPX_MOE_HIGH_THROUGHPUT, 0, 0};
    world_t W[2];
    moe_ref_recv_t ref[2];
    ht_bufs_t B[2];
    comb_bufs_t C[2];
    epx_moe_handle_t h[2];
    epx_moe_t moe = NULL;
    for (int i = 0; i < 2; i++) {
        world_init(&W[i], &c, 4242 + (uint64_t)i);
        if (i == 0) moe = create_checked(&W[0], c.name);
        moe_ref_dispatch(&W[i].rt, (const float *const *)W[i].w, me, W[i].align, &ref[i]);
        ht_alloc(&W[i], &B[i], ref[i].n + 1, false, false);
        comb_alloc(&W[i], &ref[i], &C[i]);
        h[i] = dispatch_checked(moe, &W[i], &ref[i], &B[i], true, i ? "two handles: second" : "two handles: first");
    }
    for (int i = 1; i >= 0; i--) {
        const char *cs = i ? "two handles: second" : "two handles: first";
        if (i == 0) combine_checked(moe, h[i], &W[i], &C[i], false, cs);
        fill_x(&W[i], &B[i], 1);
        ht_poison(&B[i]);
        epx_moe_dispatch_in_t in = ht_in(&W[i], &B[i], true);
        epx_moe_dispatch_out_t out = ht_out(&B[i]);
        ASSERT_OK(epx_moe_dispatch_cached(moe, h[i], &in, &out, test_stream()));
        check_dispatch(&W[i], &ref[i], &B[i], 1, false, true, cs);
        combine_checked(moe, h[i], &W[i], &C[i], true, cs);
    }
    /* The context may go before a handle: the handle then holds nothing (ASan and valgrind
     * see a use of freed memory otherwise), and only epx_moe_handle_destroy takes it. */
    ASSERT_OK(epx_moe_handle_destroy(h[0]));
    ASSERT_OK(epx_moe_destroy(moe));
    int64_t rows = -5;
    ASSERT_STATUS(epx_moe_handle_num_recv_tokens(h[1], &rows), EPX_ERR_INVALID_USAGE);
    ASSERT_EQ(rows, -5);
    ASSERT_OK(epx_moe_handle_destroy(h[1]));
    for (int i = 0; i < 2; i++) {
        comb_free(&C[i]);
        ht_free(&B[i]);
        moe_ref_recv_free(&ref[i]);
        world_free(&W[i]);
    }
    return 1;
}

/* ---- --pool: inputs CUDA IPC cannot share, staged by the library ------------------------------- */

enum { PT = 32, PH = 64 }; /* tokens per rank, hidden (float32); E = K = R: every token goes to every rank */

/* Element e of rank p's token t in generation `gen`, and weight k of a combine input's row
 * `row`: small integers (float32 sums of R of them are exact), different in every generation. */
static float pool_x(int gen, int p, int t, int e) { return (float)(gen * 10000 + p * 300 + t * 8 + e % 8); }
static float pool_w(int gen, int p, int row, int k) { return (float)(gen * 1000 + p * 40 + row % 8 * 4 + k % 4); }

/* A backend buffer of rows x cols floats f(gen, me, row, col). */
static float *pool_in(float (*f)(int, int, int, int), int gen, int rows, int cols)
{
    size_t n = (size_t)rows * (size_t)cols;
    float *h = malloc(sizeof(float) * (n + 1));
    ASSERT(h);
    for (size_t i = 0; i < n; i++) h[i] = f(gen, me, (int)(i / (size_t)cols), (int)(i % (size_t)cols));
    float *d = dev_in(h, sizeof(float) * (n + 1), sizeof(float) * n);
    free(h);
    return d;
}

/* Generation gen's dispatch rows (every rank's tokens, rank-major) and the identity
 * expert's combine of them (out: R x my tokens; out_w: the weights summed over the ranks). */
static void pool_check(int gen, const float *drecv, const float *dout, const float *dout_w)
{
    size_t rows = (size_t)R * PT;
    float *recv = malloc(sizeof(float) * rows * PH), *out = malloc(sizeof(float) * PT * PH);
    float *out_w = malloc(sizeof(float) * PT * (size_t)R);
    ASSERT(recv && out && out_w);
    fetch(recv, drecv, sizeof(float) * rows * PH);
    fetch(out, dout, sizeof(float) * PT * PH);
    fetch(out_w, dout_w, sizeof(float) * PT * (size_t)R);
    for (int p = 0; p < R; p++)
        for (int t = 0; t < PT; t++)
            for (int e = 0; e < PH; e++)
                if (recv[((size_t)p * PT + t) * PH + e] != pool_x(gen, p, t, e))
                    TEST_FAIL_("--pool, generation %d: recv_x of rank %d's token %d [%d] = %g, expected %g", gen, p,
                               t, e, recv[((size_t)p * PT + t) * PH + e], pool_x(gen, p, t, e));
    for (int t = 0; t < PT; t++) {
        for (int e = 0; e < PH; e++)
            if (out[t * PH + e] != (float)R * pool_x(gen, me, t, e))
                TEST_FAIL_("--pool, generation %d: combine out[%d][%d] = %g, expected %g", gen, t, e, out[t * PH + e],
                           (float)R * pool_x(gen, me, t, e));
        for (int k = 0; k < R; k++) {
            float want = 0.0f;
            for (int r = 0; r < R; r++) want += pool_w(gen, r, me * PT + t, k);
            if (out_w[t * R + k] != want)
                TEST_FAIL_("--pool, generation %d: out_topk_weights[%d][%d] = %g, expected %g", gen, t, k,
                           out_w[t * R + k], want);
        }
    }
    free(recv), free(out), free(out_w);
}

/* The pool cases' MoE context: E = K = R, float32 tokens of PH, PT tokens a rank. */
static epx_moe_t pool_moe(int sms)
{
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = PH, cfg.max_tokens_per_rank = PT, cfg.num_experts = R, cfg.max_topk = R, cfg.dtype = EPX_F32;
    cfg.num_sms = sms;
    epx_moe_t moe = NULL;
    ASSERT_OK(moe_create(&cfg, &moe));
    return moe;
}

/* Their routing on the backend: every token to every rank, expert k of a token is k. */
static void *pool_routing(void)
{
    int64_t *hidx = malloc(sizeof(int64_t) * PT * (size_t)R);
    ASSERT(hidx);
    for (int i = 0; i < PT * R; i++) hidx[i] = i % R;
    void *didx = dev_in(hidx, sizeof(int64_t) * (PT * (size_t)R + 1), sizeof(int64_t) * PT * (size_t)R);
    free(hidx);
    return didx;
}

/* Calls back to back, nothing waited for between them, the last rank's stream held first
 * (the others run ahead into their next call's staging copies, which must not overwrite
 * what that rank still reads): a dispatch without host synchronisation (handle 0: its row
 * count stays on the device) and one with it (handle 1), two cached dispatches along
 * handle 0, then four combines of the identity expert with weights, alternately along
 * handle 0 and 1. Every input lies in the pool (--pool), so on CUDA every one a peer
 * reads is staged: by cudaMemcpyAsync, or a kernel when the rows are counted on the device. */
static int run_pool_back_to_back(void)
{
    if (R > EPX_MOE_MAX_TOPK) return 0;
    epx_moe_t moe = pool_moe(num_sms);
    int64_t cap = (int64_t)R * PT;
    void *didx = pool_routing();
    float *x[4], *cw[4], *recv[4], *out[4], *out_w[4];
    for (int g = 0; g < 4; g++) {
        x[g] = pool_in(pool_x, g, PT, PH);
        cw[g] = pool_in(pool_w, g, R * PT, R);
        recv[g] = dev_out(sizeof(float) * (size_t)cap * PH);
        out[g] = dev_out(sizeof(float) * PT * PH);
        out_w[g] = dev_out(sizeof(float) * PT * (size_t)R);
    }
    int64_t *dcount = dev_out(sizeof(int64_t)), count = -1;
    epx_moe_handle_t h[2];
    void *s = test_stream();
    if (me == R - 1) test_stream_hold(50);
    for (int g = 0; g < 2; g++) {
        epx_moe_dispatch_in_t in = {x[g], NULL, didx, cw[g], PT, R};
        epx_moe_dispatch_out_t o = {recv[g], NULL, NULL, NULL, NULL, NULL, NULL, cap, 0, g == 0 ? dcount : NULL};
        ASSERT_OK(epx_moe_dispatch(moe, &in, &o, &h[g], s));
        ASSERT_EQ(o.num_recv_tokens, g == 0 ? -1 : cap);
    }
    if (me == R - 1) test_stream_hold(50);
    for (int g = 2; g < 4; g++) {
        epx_moe_dispatch_in_t in = {x[g], NULL, NULL, NULL, PT, R};
        epx_moe_dispatch_out_t o = {recv[g], NULL, NULL, NULL, NULL, NULL, NULL, cap, 0, NULL};
        ASSERT_OK(epx_moe_dispatch_cached(moe, h[0], &in, &o, s));
    }
    if (me == R - 1) test_stream_hold(50);
    for (int g = 0; g < 4; g++) {
        epx_moe_combine_in_t ci = {recv[g], cw[g]};
        epx_moe_combine_out_t co = {out[g], out_w[g]};
        ASSERT_OK(epx_moe_combine(moe, h[g % 2], &ci, &co, s));
    }
    fetch(&count, dcount, sizeof count);
    ASSERT_EQ(count, cap);
    for (int g = 0; g < 4; g++) pool_check(g, recv[g], out[g], out_w[g]);
    for (int g = 0; g < 2; g++) ASSERT_OK(epx_moe_handle_destroy(h[g]));
    ASSERT_OK(epx_moe_destroy(moe));
    for (int g = 0; g < 4; g++)
        dev_free(x[g]), dev_free(cw[g]), dev_free(recv[g]), dev_free(out[g]), dev_free(out_w[g]);
    dev_free(didx), dev_free(dcount);
    return 1;
}

/* --pool on copy engines: peers write recv_x there, which the library cannot stage: every
 * rank refuses the dispatch (EPX_ERR_UNSUPPORTED, naming the memory), nothing written, the
 * communicator usable. */
static int run_pool_ce_refused(void)
{
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = PH, cfg.max_tokens_per_rank = PT, cfg.num_experts = R, cfg.max_topk = 1, cfg.dtype = EPX_F32;
    cfg.num_sms = EPX_MOE_COPY_ENGINES;
    epx_moe_t moe = NULL;
    ASSERT_OK(moe_create(&cfg, &moe));
    int64_t cap = (int64_t)R * PT, hidx[PT];
    for (int t = 0; t < PT; t++) hidx[t] = t % R;
    void *didx = dev_in(hidx, sizeof hidx + 8, sizeof hidx);
    float *x = pool_in(pool_x, 0, PT, PH), *recv = dev_out(sizeof(float) * (size_t)cap * PH);
    epx_moe_dispatch_in_t in = {x, NULL, didx, NULL, PT, 1};
    epx_moe_dispatch_out_t o = {recv, NULL, NULL, NULL, NULL, NULL, NULL, cap, -77, NULL};
    epx_moe_handle_t h = NULL;
    epx_status_t st = epx_moe_dispatch(moe, &in, &o, &h, test_stream());
    if (st != EPX_ERR_UNSUPPORTED || !strstr(epx_comm_get_last_error(comm), "cannot share"))
        TEST_FAIL_("--pool, copy engines: dispatch -> %s (%s), expected EPX_ERR_UNSUPPORTED (memory CUDA IPC cannot "
                   "share)", epx_status_name(st), epx_comm_get_last_error(comm));
    expect_no_dispatch(h, &o, "--pool, copy engines");
    float *back = palloc(sizeof(float) * (size_t)cap * PH);
    fetch(back, recv, sizeof(float) * (size_t)cap * PH + GUARD);
    expect_poison(back, 0, sizeof(float) * (size_t)cap * PH + GUARD, "--pool, copy engines", "recv_x");
    ASSERT_OK(epx_barrier(comm, test_stream()));
    ASSERT_OK(epx_moe_destroy(moe));
    dev_free(x), dev_free(recv), dev_free(didx), free(back);
    return 1;
}

/* --pool on copy engines with recv_x from cudaMalloc (the peers write it; the combine then
 * reads it only here): the routing inputs the peers read in the count and row kernels
 * (topk_idx, topk_weights) lie in the pool and are staged, x is read by this rank's copies
 * only. One dispatch and the identity expert's combine with weights, every value checked. */
static int run_pool_ce_inputs(void)
{
    if (R > EPX_MOE_MAX_TOPK) return 0;
    epx_moe_t moe = pool_moe(EPX_MOE_COPY_ENGINES);
    int64_t cap = (int64_t)R * PT;
    void *didx = pool_routing();
    float *x = pool_in(pool_x, 0, PT, PH), *cw = pool_in(pool_w, 0, R * PT, R);
    size_t rb = sizeof(float) * (size_t)cap * PH;
    float *recv = test_buf_alloc_ipc(rb + GUARD), *out = dev_out(sizeof(float) * PT * PH);
    float *out_w = dev_out(sizeof(float) * PT * (size_t)R);
    poison(recv, rb + GUARD);
    epx_moe_dispatch_in_t in = {x, NULL, didx, cw, PT, R};
    epx_moe_dispatch_out_t o = {recv, NULL, NULL, NULL, NULL, NULL, NULL, cap, 0, NULL};
    epx_moe_handle_t h = NULL;
    ASSERT_OK(epx_moe_dispatch(moe, &in, &o, &h, test_stream()));
    ASSERT_EQ(o.num_recv_tokens, cap);
    epx_moe_combine_in_t ci = {recv, cw};
    epx_moe_combine_out_t co = {out, out_w};
    ASSERT_OK(epx_moe_combine(moe, h, &ci, &co, test_stream()));
    pool_check(0, recv, out, out_w);
    ASSERT_OK(epx_moe_handle_destroy(h));
    ASSERT_OK(epx_moe_destroy(moe));
    test_sync();
    test_buf_free_ipc(recv);
    dev_free(x), dev_free(cw), dev_free(out), dev_free(out_w), dev_free(didx);
    return 1;
}

/* A random small configuration (every field drawn from the seed, same on every rank). */
static mcase_t random_case(uint64_t seed, bool ll)
{
    uint64_t s = test_mix(seed, 77, 0, 0);
    static const int Es[] = {-1, -2, -3, -5, -8, 256, 288};
    static const int Ks[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, EPX_MOE_MAX_TOPK};
    static const int Hs[] = {1, 7, 64, 77, 128, 129, 200, 256, 300};
    static const int dts[] = {EPX_BF16, EPX_F16, EPX_F32, EPX_FP8_E4M3};
    static const int cdts[] = {EPX_UNSET, EPX_BF16, EPX_F16, EPX_F32};
    static const int aligns[] = {1, 1, 2, 16, 128};
    static const int negs[] = {0, 0, 10, 50};
    static const int flag_bits[] = {F_NO_WEIGHTS, F_NULL_OUTS, F_REG, F_EXACT_CAP, F_MAX_CAP};
#define PICK(a) a[test_rand(&s) % (sizeof a / sizeof a[0])]
    mcase_t c;
    memset(&c, 0, sizeof c);
    c.name = ll ? "random ll" : "random";
    c.E = PICK(Es);
    c.K = PICK(Ks);
    c.H = PICK(Hs);
    c.M = 1 + (int)(test_rand(&s) % 24);
    c.dtype = ll ? EPX_BF16 : PICK(dts);
    c.cdtype = ll ? EPX_UNSET : PICK(cdts);
    c.idtype = test_rand(&s) & 1 ? EPX_I32 : EPX_I64;
    c.align = ll ? 1 : PICK(aligns);
    c.route = (route_t)(test_rand(&s) % 5);
    if (c.route == ROUTE_NONE && test_rand(&s) % 2) c.route = ROUTE_UNIFORM;
    c.neg_pct = PICK(negs);
    if (!ll) {
        int f1 = PICK(flag_bits), f2 = PICK(flag_bits);
        c.flags = f1 | f2;
        if ((c.flags & F_EXACT_CAP) && (c.flags & F_MAX_CAP)) c.flags &= ~F_MAX_CAP;
    }
    c.maxk = test_rand(&s) % 3 == 0 ? EPX_MOE_MAX_TOPK : 0;
    c.mode = ll ? EPX_MOE_LOW_LATENCY : EPX_MOE_HIGH_THROUGHPUT;
    c.ll_fp8 = ll ? (int)(test_rand(&s) % 2) : 0;
    c.sfmt = test_rand(&s) % 2 ? EPX_SCALE_UE8M0 : EPX_SCALE_F32;
    if (ll) c.cdtype = PICK(cdts); /* drawn last: the other fields keep their draws */
    static const int ll_dts[] = {EPX_BF16, EPX_BF16, EPX_F16, EPX_F32};
    if (ll && !c.ll_fp8) c.dtype = PICK(ll_dts); /* FP8 quantises bf16 only */
    if (ll && test_rand(&s) % 4 == 0) c.flags |= F_SHIFT;
#undef PICK
    return c;
}

/* ---- Bad input ----------------------------------------------------------------------------- */

static void expect_status(epx_status_t st, int bad_rank, const char *what)
{
    epx_status_t want = me == bad_rank ? EPX_ERR_INVALID_ARGUMENT : EPX_ERR_REMOTE_INVALID;
    if (st != want)
        TEST_FAIL_("bad case %s (bad rank %d): got %s, expected %s (%s)", what, bad_rank, epx_status_name(st),
                   epx_status_name(want), epx_comm_get_last_error(comm));
    if (me == bad_rank && strlen(epx_comm_get_last_error(comm)) == 0)
        TEST_FAIL_("bad case %s: no error message on the offending rank", what);
}

typedef enum {
    B_ID_HIGH, B_ID_LOW, B_T_BIG, B_T_NEG, B_K_BIG, B_X_NULL, B_X_MISALIGNED, B_IDX_NULL, B_IDX_MISALIGNED,
    B_RIDX_MISALIGNED, B_CAP_SMALL, B_CACHED_NULL_HANDLE, B_CACHED_X_NULL, B_CACHED_T_OTHER, B_CACHED_CAP_SMALL,
    B_COMBINE_Y_NULL, B_COMBINE_OUT_NULL, NBAD
} bad_t;
static const char *bad_names[] = {"expert id >= E", "expert id < -1", "T > max_tokens", "T < 0", "K > max_topk",
                                  "NULL x", "misaligned x", "NULL topk_idx", "misaligned topk_idx",
                                  "misaligned recv_topk_idx", "capacity too small", "dispatch_cached with a NULL handle",
                                  "dispatch_cached with NULL x", "dispatch_cached with another num_tokens",
                                  "dispatch_cached with capacity too small", "combine with NULL y",
                                  "combine with NULL out"};

/* Bad routing on one rank of a dispatch without host synchronisation (CUDA): the call
 * succeeds everywhere (nothing waited for the device), every rank's count says -1, no
 * row output is written, and cached dispatch / combine along the handle write nothing.
 * On the CPU backend the same call fails as usual. Then a valid round. */
static int run_bad_ht_no_sync(void)
{
    int bad = R - 1;
    mcase_t c = {"bad no-sync", -4, 4, 136, 8, EPX_BF16, EPX_UNSET, EPX_I32, 1, ROUTE_UNIFORM, 10, F_T_FULL, 0,
                 EPX_MOE_HIGH_THROUGHPUT, 0, 0};
    world_t W;
    world_init(&W, &c, 9500);
    for (int p = 0; p < R; p++) W.idx[p][0] = (int64_t)bad * W.L;
    const char *cs = "bad routing without host synchronisation";
    epx_moe_t moe = create_checked(&W, cs);
    moe_ref_recv_t ref;
    moe_ref_dispatch(&W.rt, (const float *const *)W.w, me, W.align, &ref);
    ht_bufs_t B;
    ht_alloc(&W, &B, (int64_t)R * W.M, false, false);
    B.dcount = dev_out(sizeof(int64_t));
    comb_bufs_t C;
    comb_alloc(&W, &ref, &C);
    int T = W.T[me], K = W.K;
    int32_t *ib = (int32_t *)B.idx;
    if (me == bad) {
        ib[(int64_t)T * K - 1] = W.E;
        put(B.didx, B.idx, B.idx_b);
    }
    ht_poison(&B);
    comb_poison(&C);
    epx_moe_dispatch_in_t in = ht_in(&W, &B, true);
    epx_moe_dispatch_out_t out = ht_out(&B);
    epx_moe_handle_t h = NULL;
    epx_status_t st = epx_moe_dispatch(moe, &in, &out, &h, test_stream());
    if (ht_no_sync(&W, &B)) {
        if (st != EPX_SUCCESS) TEST_FAIL_("%s: dispatch -> %s: %s", cs, epx_status_name(st), epx_comm_get_last_error(comm));
        ASSERT_EQ(out.num_recv_tokens, -1);
        if (ht_device_count(&B) != -1) TEST_FAIL_("%s: num_recv_tokens_device = %lld, expected -1", cs, (long long)ht_device_count(&B));
        epx_moe_dispatch_in_t cin = ht_in(&W, &B, true);
        ASSERT_OK(epx_moe_dispatch_cached(moe, h, &cin, &out, test_stream()));
        epx_moe_combine_in_t ci = {C.dy, C.dyw};
        epx_moe_combine_out_t co = {C.dout, C.doutw};
        ASSERT_OK(epx_moe_combine(moe, h, &ci, &co, test_stream()));
        ASSERT_OK(epx_moe_handle_destroy(h));
        ht_fetch(&B);
        comb_fetch(&C);
        expect_poison(C.out, 0, C.out_b + GUARD, cs, "combine out");
        expect_poison(C.out_w, 0, C.outw_b + GUARD, cs, "combine out_topk_weights");
    } else {
        expect_status(st, bad, cs);
        if (h) TEST_FAIL_("%s: failed dispatch set the handle", cs);
    }
    ht_expect_all_poison(&B, cs);
    if (me == bad) {
        ib[(int64_t)T * K - 1] = (int32_t)W.idx[me][(int64_t)T * K - 1];
        put(B.didx, B.idx, B.idx_b);
    }
    h = dispatch_checked(moe, &W, &ref, &B, true, cs);
    combine_checked(moe, h, &W, &C, true, cs);
    ASSERT_OK(epx_moe_handle_destroy(h));
    comb_free(&C);
    ht_free(&B);
    moe_ref_recv_free(&ref);
    ASSERT_OK(epx_moe_destroy(moe));
    world_free(&W);
    return 1;
}

static int run_bad_ht(void)
{
    int passed = 0;
    for (int k = 0; k < NBAD; k++) {
        int bad = k % R;
        mcase_t c = {"bad", -4, 4, 130, 8, EPX_BF16, EPX_UNSET, EPX_I64, 1, ROUTE_UNIFORM, 10, F_T_FULL, 0,
                     EPX_MOE_HIGH_THROUGHPUT, 0, 0};
        world_t W;
        world_init(&W, &c, 9000 + (uint64_t)k);
        /* Token 0 of every rank goes to the bad rank, so its N >= R >= 1. */
        for (int p = 0; p < R; p++) W.idx[p][0] = (int64_t)bad * W.L;
        char cs[160];
        snprintf(cs, sizeof cs, "bad input: %s (bad rank %d)", bad_names[k], bad);
        epx_moe_t moe = create_checked(&W, cs);
        moe_ref_recv_t ref;
        moe_ref_dispatch(&W.rt, (const float *const *)W.w, me, W.align, &ref);
        ht_bufs_t B;
        ht_alloc(&W, &B, ref.n + 2, false, false);
        int T = W.T[me], H = W.H, K = W.K;
        bool is_bad = me == bad;

        /* Bigger valid-looking inputs for the bad rank's oversize cases. */
        int bigT = W.M + 1, bigK = W.maxk + 1;
        void *bigx = malloc((size_t)bigT * (size_t)H * 2 + 64);
        for (int t = 0; t < bigT; t++) x_row(&W, me, t % (T ? T : 1), 0, (char *)bigx + (size_t)t * (size_t)H * 2);
        int64_t *bi = malloc(sizeof(int64_t) * (size_t)(bigT * bigK + 1));
        float *bw = malloc(sizeof(float) * (size_t)(bigT * bigK + 1));
        for (int i = 0; i < bigT * bigK; i++) bi[i] = i % W.E, bw[i] = 0.5f;
        void *dbigx = dev_in(bigx, (size_t)bigT * (size_t)H * 2 + 64, (size_t)bigT * (size_t)H * 2);
        void *dbi = dev_in(bi, sizeof(int64_t) * (size_t)(bigT * bigK + 1), sizeof(int64_t) * (size_t)(bigT * bigK));
        float *dbw = dev_in(bw, sizeof(float) * (size_t)(bigT * bigK + 1), sizeof(float) * (size_t)(bigT * bigK));
        /* Misaligned: backend pointers + 4 (topk_idx, i64) and + 1 (x, bf16), valid data there. */
        uint8_t *dmis_idx = test_buf_alloc((size_t)T * (size_t)K * 8 + 16);
        put(dmis_idx + 4, B.idx, (size_t)T * (size_t)K * 8);
        uint8_t *dmis_x = test_buf_alloc((size_t)T * (size_t)H * 2 + 16);
        put(dmis_x + 1, B.x, (size_t)T * (size_t)H * 2);

        epx_moe_dispatch_in_t in = ht_in(&W, &B, true);
        epx_moe_dispatch_out_t out = ht_out(&B);
        int64_t *ib = (int64_t *)B.idx; /* the host copy: put after every change */
        if (is_bad) {
            switch ((bad_t)k) {
            case B_ID_HIGH: ib[(int64_t)T * K - 1] = W.E; break;
            case B_ID_LOW: ib[(int64_t)(T / 2) * K + 1] = -2; break;
            case B_T_BIG: in.x = dbigx, in.topk_idx = dbi, in.topk_weights = dbw, in.num_tokens = bigT, in.topk = K; break;
            case B_T_NEG: in.num_tokens = -1; break;
            case B_K_BIG: in.x = dbigx, in.topk_idx = dbi, in.topk_weights = dbw, in.topk = bigK; break;
            case B_X_NULL: in.x = NULL; break;
            case B_X_MISALIGNED: in.x = dmis_x + 1; break;
            case B_IDX_NULL: in.topk_idx = NULL; break;
            case B_IDX_MISALIGNED: in.topk_idx = dmis_idx + 4; break;
            case B_RIDX_MISALIGNED: out.recv_topk_idx = (char *)B.dridx + 4; break; /* i64: 8-byte elements */
            case B_CAP_SMALL: out.capacity = ref.n - 1; break;
            default: break;
            }
            if (k == B_ID_HIGH || k == B_ID_LOW) put(B.didx, B.idx, B.idx_b);
        }
        if (k <= B_CAP_SMALL) {
            ht_poison(&B);
            epx_moe_handle_t h = NULL;
            epx_status_t st = epx_moe_dispatch(moe, &in, &out, &h, test_stream());
            expect_status(st, bad, bad_names[k]);
            expect_no_dispatch(h, &out, cs);
            ht_expect_all_poison(&B, cs);
            if (is_bad && (k == B_ID_HIGH || k == B_ID_LOW)) {
                if (k == B_ID_HIGH) ib[(int64_t)T * K - 1] = W.idx[me][(int64_t)T * K - 1];
                if (k == B_ID_LOW) ib[(int64_t)(T / 2) * K + 1] = W.idx[me][(T / 2) * K + 1];
                put(B.didx, B.idx, B.idx_b);
            }
        } else {
            /* A valid dispatch first: the handle for the bad cached / combine call. */
            epx_moe_handle_t h = dispatch_checked(moe, &W, &ref, &B, true, cs);
            comb_bufs_t C;
            comb_alloc(&W, &ref, &C);
            ht_poison(&B);
            comb_poison(&C);
            epx_status_t st;
            if (k == B_CACHED_NULL_HANDLE || k == B_CACHED_X_NULL || k == B_CACHED_T_OTHER || k == B_CACHED_CAP_SMALL) {
                epx_moe_dispatch_in_t cin = ht_in(&W, &B, true);
                epx_moe_dispatch_out_t cout = ht_out(&B);
                if (is_bad && k == B_CACHED_X_NULL) cin.x = NULL;
                if (is_bad && k == B_CACHED_T_OTHER) cin.num_tokens = T - 1; /* T = max_tokens >= 1 */
                if (is_bad && k == B_CACHED_CAP_SMALL) cout.capacity = ref.n - 1; /* ref.n >= R >= 1 */
                st = epx_moe_dispatch_cached(moe, is_bad && k == B_CACHED_NULL_HANDLE ? NULL : h, &cin, &cout,
                                             test_stream());
            } else {
                epx_moe_combine_in_t ci = {C.dy, C.dyw};
                epx_moe_combine_out_t co = {C.dout, C.doutw};
                if (is_bad && k == B_COMBINE_Y_NULL) ci.y = NULL;
                if (is_bad && k == B_COMBINE_OUT_NULL) co.out = NULL;
                st = epx_moe_combine(moe, h, &ci, &co, test_stream());
            }
            expect_status(st, bad, bad_names[k]);
            ht_expect_all_poison(&B, cs);
            comb_fetch(&C);
            expect_poison(C.out, 0, C.out_b + GUARD, cs, "combine out");
            expect_poison(C.out_w, 0, C.outw_b + GUARD, cs, "combine out_topk_weights");
            /* The handle still works. */
            combine_checked(moe, h, &W, &C, true, cs);
            comb_free(&C);
            ASSERT_OK(epx_moe_handle_destroy(h));
        }
        round_checked(moe, &W, &ref, &B, cs); /* a valid dispatch and combine right after */
        free(bigx), free(bi), free(bw);
        dev_free(dbigx), dev_free(dbi), dev_free(dbw), dev_free(dmis_idx), dev_free(dmis_x);
        ht_free(&B);
        moe_ref_recv_free(&ref);
        ASSERT_OK(epx_moe_destroy(moe));
        world_free(&W);
        passed++;
    }
    return passed;
}

/* Output capacity below the rows received (a high-throughput dispatch checks every
 * receiver's) on the last rank, then on two ranks (rank 1 and the last; both of 2): each
 * short rank returns EPX_ERR_INVALID_ARGUMENT, every other EPX_ERR_REMOTE_INVALID, nothing
 * is written anywhere, and a valid dispatch and combine work right after. */
static int run_bad_capacity(void)
{
    int passed = 0;
    for (int v = 0; v < 2 && v < R; v++) {
        int other = R > 2 ? 1 : 0; /* the second short rank */
        bool is_short = me == R - 1 || (v == 1 && me == other);
        mcase_t c = {"short capacity", -4, 4, 130, 8, EPX_BF16, EPX_UNSET, EPX_I64, 1, ROUTE_UNIFORM, 10, F_T_FULL, 0,
                     EPX_MOE_HIGH_THROUGHPUT, 0, 0};
        world_t W;
        world_init(&W, &c, 9700 + (uint64_t)v);
        /* Token 0 of every rank goes to the short ranks, so they receive rows. */
        for (int p = 0; p < R; p++) {
            W.idx[p][0] = (int64_t)(R - 1) * W.L;
            if (v == 1) W.idx[p][1] = (int64_t)other * W.L;
        }
        char cs[160];
        snprintf(cs, sizeof cs, "output capacity short on %s", v ? "two ranks" : "the last rank");
        epx_moe_t moe = create_checked(&W, cs);
        moe_ref_recv_t ref;
        moe_ref_dispatch(&W.rt, (const float *const *)W.w, me, W.align, &ref);
        ASSERT(!is_short || ref.n >= 1);
        ht_bufs_t B;
        ht_alloc(&W, &B, ref.n + 2, false, false);
        epx_moe_dispatch_in_t in = ht_in(&W, &B, true);
        epx_moe_dispatch_out_t out = ht_out(&B);
        if (is_short) out.capacity = ref.n - 1;
        ht_poison(&B);
        epx_moe_handle_t h = NULL;
        epx_status_t st = epx_moe_dispatch(moe, &in, &out, &h, test_stream());
        epx_status_t want = is_short ? EPX_ERR_INVALID_ARGUMENT : EPX_ERR_REMOTE_INVALID;
        if (st != want)
            TEST_FAIL_("case %s: got %s, expected %s (%s)", cs, epx_status_name(st), epx_status_name(want),
                       epx_comm_get_last_error(comm));
        if (!strstr(epx_comm_get_last_error(comm), "out.capacity"))
            TEST_FAIL_("case %s: the error does not name out.capacity: %s", cs, epx_comm_get_last_error(comm));
        expect_no_dispatch(h, &out, cs);
        ht_expect_all_poison(&B, cs);
        round_checked(moe, &W, &ref, &B, cs);
        ht_free(&B);
        moe_ref_recv_free(&ref);
        ASSERT_OK(epx_moe_destroy(moe));
        world_free(&W);
        passed++;
    }
    return passed;
}

/* Valid calls that differ between ranks, the last rank the odd one: top-k in a dispatch,
 * the operation (combine against cached dispatch, and against dispatch), the handle and the
 * weights of a combine.
 * Every rank returns EPX_ERR_MISMATCH, nothing is written, and a valid call works right
 * after. Not on the CUDA backend (of one host it checks only the handle). */
static int run_mismatch(void)
{
    if (R == 1 || test_on_cuda()) return 0;
    mcase_t c = {"mismatch", -3, 4, 96, 8, EPX_BF16, EPX_UNSET, EPX_I32, 1, ROUTE_UNIFORM, 10, F_T_FULL, 0,
                 EPX_MOE_HIGH_THROUGHPUT, 0, 0};
    bool odd = me == R - 1;
    world_t W[2];
    moe_ref_recv_t ref[2];
    ht_bufs_t B[2];
    comb_bufs_t C[2];
    epx_moe_handle_t h[2];
    epx_moe_t moe = NULL;
    for (int i = 0; i < 2; i++) {
        world_init(&W[i], &c, 9800 + (uint64_t)i);
        if (i == 0) moe = create_checked(&W[0], c.name);
        moe_ref_dispatch(&W[i].rt, (const float *const *)W[i].w, me, W[i].align, &ref[i]);
        ht_alloc(&W[i], &B[i], ref[i].n + 1, false, false);
        comb_alloc(&W[i], &ref[i], &C[i]);
        h[i] = dispatch_checked(moe, &W[i], &ref[i], &B[i], true, "mismatch: a handle");
    }
    int passed = 0;
    epx_comm_info_t info;
    ASSERT_OK(epx_comm_info(comm, &info));
    /* An alltoall against a dispatch is caught on one host; across hosts the two calls'
     * first steps differ (a collective against point-to-point messages) and time out. */
    for (int k = 0; k < (info.num_hosts == 1 ? 6 : 5); k++) {
        static const char *what[] = {"topk in a dispatch", "combine against cached dispatch", "the handle of a combine",
                                     "topk_weights in a combine", "combine against dispatch", "alltoall against dispatch"};
        char cs[160];
        snprintf(cs, sizeof cs, "mismatch: %s (rank %d)", what[k], R - 1);
        ht_poison(&B[0]);
        comb_poison(&C[0]);
        epx_moe_dispatch_in_t in = ht_in(&W[0], &B[0], true);
        epx_moe_dispatch_out_t out = ht_out(&B[0]);
        epx_moe_combine_in_t ci = {C[0].dy, NULL};
        epx_moe_combine_out_t co = {C[0].dout, NULL};
        epx_moe_handle_t nh = NULL;
        epx_status_t st;
        uint8_t a2a_recv[8 * MAXR], a2a_send[8 * MAXR];
        memset(a2a_send, 0x3c, sizeof a2a_send);
        for (int j = 0; k == 5 && j < 2; j++) /* the slots of both parities now hold a matching alltoall */
            ASSERT_OK(epx_alltoall(comm, a2a_send, a2a_recv, 8, EPX_U8, test_stream()));
        test_sync();
        if (k == 5 && odd) { /* the other kind of call: no MoE output may be written either */
            memset(a2a_recv, POISON, sizeof a2a_recv);
            st = epx_alltoall(comm, a2a_send, a2a_recv, 8, EPX_U8, NULL);
            for (int i = 0; i < 8 * R; i++)
                if (a2a_recv[i] != POISON) TEST_FAIL_("case %s: alltoall output byte %d written", cs, i);
        } else if (k == 0 || ((k == 4 || k == 5) && !odd)) {
            if (k == 0 && odd) in.topk = W[0].K - 1;
            st = epx_moe_dispatch(moe, &in, &out, &nh, test_stream());
            expect_no_dispatch(nh, &out, cs);
        } else if (k == 4) {
            st = epx_moe_combine(moe, h[0], &ci, &co, test_stream());
        } else if (k == 1) {
            st = odd ? epx_moe_combine(moe, h[0], &ci, &co, test_stream())
                     : epx_moe_dispatch_cached(moe, h[0], &in, &out, test_stream());
        } else {
            if (k == 3 && odd) ci.topk_weights = C[0].dyw;
            st = epx_moe_combine(moe, k == 2 && odd ? h[1] : h[0], &ci, &co, test_stream());
        }
        if (st != EPX_ERR_MISMATCH)
            TEST_FAIL_("case %s: got %s, expected EPX_ERR_MISMATCH (%s)", cs, epx_status_name(st),
                       epx_comm_get_last_error(comm));
        ht_expect_all_poison(&B[0], cs);
        comb_fetch(&C[0]);
        expect_poison(C[0].out, 0, C[0].out_b + GUARD, cs, "combine out");
        expect_poison(C[0].out_w, 0, C[0].outw_b + GUARD, cs, "combine out_topk_weights");
        combine_checked(moe, h[0], &W[0], &C[0], true, cs);
        passed++;
    }
    for (int i = 0; i < 2; i++) {
        ASSERT_OK(epx_moe_handle_destroy(h[i]));
        comb_free(&C[i]);
        ht_free(&B[i]);
        moe_ref_recv_free(&ref[i]);
        world_free(&W[i]);
    }
    ASSERT_OK(epx_moe_destroy(moe));
    return passed;
}

static int run_bad_ll(void)
{
    int passed = 0;
    enum { LB_ID_HIGH, LB_ID_LOW, LB_T_BIG, LB_X_NULL, LB_COMBINE_OUT_NULL, LB_COMBINE_Y_NULL, LB_COMBINE_W_NULL, NLB };
    static const char *names[] = {"ll expert id >= E", "ll expert id < -1", "ll T > max_tokens", "ll NULL x",
                                  "ll combine with NULL out", "ll combine with NULL y",
                                  "ll combine with NULL topk_weights"};
    for (int k = 0; k < NLB; k++) {
        int bad = (k + 1) % R;
        mcase_t c = {"bad ll", -2, 3, 130, 6, EPX_BF16, EPX_UNSET, EPX_I32, 1, ROUTE_UNIFORM, 10, F_T_FULL, 0,
                     EPX_MOE_LOW_LATENCY, k & 1, EPX_SCALE_F32};
        world_t W;
        world_init(&W, &c, 9500 + (uint64_t)k);
        char cs[160];
        snprintf(cs, sizeof cs, "bad input: %s (bad rank %d)", names[k], bad);
        epx_moe_t moe = create_checked(&W, cs);
        ll_bufs_t B;
        ll_alloc(&W, &B);
        bool is_bad = me == bad;
        int T = W.T[me], H = W.H, K = W.K;
        int bigT = W.M + 1;
        void *bigx = calloc((size_t)bigT * (size_t)H, 2);
        int32_t *bi = calloc((size_t)(bigT * K), 4);
        void *dbigx = dev_in(bigx, (size_t)bigT * (size_t)H * 2, (size_t)bigT * (size_t)H * 2);
        void *dbi = dev_in(bi, (size_t)(bigT * K) * 4, (size_t)(bigT * K) * 4);
        epx_moe_ll_dispatch_in_t in = ll_in(&W, &B);
        epx_moe_ll_dispatch_out_t o = ll_out(&B);
        int32_t *ib = (int32_t *)B.idx; /* the host copy: put after every change */
        if (k <= LB_X_NULL) {
            if (is_bad) {
                if (k == LB_ID_HIGH) ib[0] = W.E; /* the boundaries: E and -2 */
                if (k == LB_ID_LOW) ib[K - 1] = -2;
                if (k == LB_T_BIG) in.x = dbigx, in.topk_idx = dbi, in.num_tokens = bigT;
                if (k == LB_X_NULL) in.x = NULL;
                put(B.didx, B.idx, B.idx_b);
            }
            ll_poison(&B);
            epx_moe_handle_t h = NULL;
            epx_status_t st = epx_moe_ll_dispatch(moe, &in, &o, &h, test_stream());
            if (test_on_cuda() && (k == LB_ID_HIGH || k == LB_ID_LOW)) {
                /* Checked on the device (no host synchronisation): the call succeeds, every
                 * rank's counts say -1, nothing else is written, and a combine along the
                 * handle writes nothing. */
                if (st != EPX_SUCCESS) TEST_FAIL_("case %s: ll dispatch -> %s", cs, epx_status_name(st));
                ll_fetch(&B);
                for (int l = 0; l < W.L; l++)
                    if (B.rcount[l] != -1) TEST_FAIL_("case %s: recv_count[%d] = %d, expected -1", cs, l, B.rcount[l]);
                expect_poison(B.rcount, B.rc_b, B.rc_b + GUARD, cs, "ll recv_count guard");
                expect_poison(B.rx, 0, B.rx_b + GUARD, cs, "ll recv_x");
                if (B.rxs) expect_poison(B.rxs, 0, B.rxs_b + GUARD, cs, "ll recv_x_scales");
                expect_poison(B.rsr, 0, B.rs_b + GUARD, cs, "ll recv_src_rank");
                expect_poison(B.rst, 0, B.rs_b + GUARD, cs, "ll recv_src_token");
                void *y = ll_make_y(&W, &B);
                void *dy = dev_in(y, ll_y_bytes(&W, &B) + 64, ll_y_bytes(&W, &B));
                float *dw = dev_in(W.w[me], sizeof(float) * (size_t)(T * K + 1), sizeof(float) * (size_t)(T * K));
                size_t out_b = (size_t)T * (size_t)H * (size_t)W.ces;
                void *out = palloc(out_b), *dout = dev_out(out_b);
                epx_moe_ll_combine_in_t cin = {dy, dw};
                ASSERT_OK(epx_moe_ll_combine(moe, h, &cin, dout, test_stream()));
                fetch(out, dout, out_b + GUARD);
                expect_poison(out, 0, out_b + GUARD, cs, "ll combine out after bad routing");
                free(y), free(out);
                dev_free(dy), dev_free(dw), dev_free(dout);
                ASSERT_OK(epx_moe_handle_destroy(h));
            } else {
                expect_status(st, bad, names[k]);
                ASSERT(h == NULL);
                ll_expect_all_poison(&B, cs);
            }
            if (is_bad) {
                ib[0] = (int32_t)W.idx[me][0];
                ib[K - 1] = (int32_t)W.idx[me][K - 1];
                put(B.didx, B.idx, B.idx_b);
            }
        } else {
            ll_poison(&B);
            in = ll_in(&W, &B);
            epx_moe_handle_t h = NULL;
            ASSERT_OK(epx_moe_ll_dispatch(moe, &in, &o, &h, test_stream()));
            check_ll_dispatch(&W, &B, cs);
            void *y = ll_make_y(&W, &B);
            void *dy = dev_in(y, ll_y_bytes(&W, &B) + 64, ll_y_bytes(&W, &B));
            float *dw = dev_in(W.w[me], sizeof(float) * (size_t)(T * K + 1), sizeof(float) * (size_t)(T * K));
            size_t out_b = (size_t)T * (size_t)H * (size_t)W.ces;
            void *out = palloc(out_b), *dout = dev_out(out_b);
            epx_moe_ll_combine_in_t cin = {dy, dw};
            if (is_bad && k == LB_COMBINE_Y_NULL) cin.y = NULL;
            if (is_bad && k == LB_COMBINE_W_NULL) cin.topk_weights = NULL;
            epx_status_t st =
                epx_moe_ll_combine(moe, h, &cin, is_bad && k == LB_COMBINE_OUT_NULL ? NULL : dout, test_stream());
            expect_status(st, bad, names[k]);
            fetch(out, dout, out_b + GUARD);
            expect_poison(out, 0, out_b + GUARD, cs, "ll combine out");
            cin.y = dy, cin.topk_weights = dw;
            ASSERT_OK(epx_moe_ll_combine(moe, h, &cin, dout, test_stream()));
            fetch(out, dout, out_b + GUARD);
            check_ll_combine(&W, out, cs);
            free(y), free(out);
            dev_free(dy), dev_free(dw), dev_free(dout);
            ASSERT_OK(epx_moe_handle_destroy(h));
        }
        /* A valid low-latency round right after. */
        {
            ll_poison(&B);
            in = ll_in(&W, &B);
            epx_moe_handle_t h = NULL;
            ASSERT_OK(epx_moe_ll_dispatch(moe, &in, &o, &h, test_stream()));
            check_ll_dispatch(&W, &B, cs);
            ASSERT_OK(epx_moe_handle_destroy(h));
        }
        free(bigx), free(bi);
        dev_free(dbigx), dev_free(dbi);
        ll_free(&B);
        ASSERT_OK(epx_moe_destroy(moe));
        world_free(&W);
        passed++;
    }
    return passed;
}

/* A small valid configuration (high-throughput, bf16) for the creation tests. */
static epx_moe_config_t small_config(void)
{
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = 64;
    cfg.max_tokens_per_rank = 4;
    cfg.num_experts = 2 * R;
    cfg.max_topk = 2;
    cfg.num_sms = num_sms;
    return cfg;
}

/* FP8 tokens without their scales: the last rank passes x_scales = NULL with tokens to send.
 * It returns EPX_ERR_INVALID_ARGUMENT, the others EPX_ERR_REMOTE_INVALID; no output byte
 * is written anywhere, and the same call with the scales then works. */
static int run_bad_fp8_scales(void)
{
    enum { T = 3, K = 2, H = 256, S = H / 128 };
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = H;
    cfg.max_tokens_per_rank = T;
    cfg.num_experts = 2 * R;
    cfg.max_topk = K;
    cfg.dtype = EPX_FP8_E4M3;
    cfg.num_sms = num_sms;
    epx_moe_t moe = NULL;
    ASSERT_OK(epx_moe_create(comm, &cfg, &moe));
    uint8_t x[T * H];
    float xs[T * S];
    int64_t idx[T * K];
    for (int i = 0; i < T * H; i++) x[i] = (uint8_t)(0x30 + (i * 7 + me) % 64); /* finite e4m3 codes */
    for (int i = 0; i < T * S; i++) xs[i] = 0.5f + (float)i;
    for (int t = 0; t < T; t++) idx[t * K] = (t + me) % cfg.num_experts, idx[t * K + 1] = -1;
    int64_t cap = (int64_t)R * T;
    void *dx = dev_in(x, sizeof x, sizeof x), *dxs = dev_in(xs, sizeof xs, sizeof xs), *didx = dev_in(idx, sizeof idx, sizeof idx);
    size_t rx_b = (size_t)cap * H, rs_b = (size_t)cap * S * sizeof(float);
    void *rx = dev_out(rx_b), *rs = dev_out(rs_b);
    int passed = 0;
    for (int round = 0; round < 2; round++) {
        bool bad = round == 0 && me == R - 1;
        epx_moe_dispatch_in_t in = {dx, bad ? NULL : dxs, didx, NULL, T, K};
        epx_moe_dispatch_out_t out = {rx, rs, NULL, NULL, NULL, NULL, NULL, cap, 0, NULL};
        epx_moe_handle_t h = NULL;
        epx_status_t st = epx_moe_dispatch(moe, &in, &out, &h, test_stream());
        epx_status_t want = round == 1 ? EPX_SUCCESS : bad ? EPX_ERR_INVALID_ARGUMENT : EPX_ERR_REMOTE_INVALID;
        if (st != want)
            TEST_FAIL_("fp8 dispatch %s x_scales on rank %d: got %s, expected %s (%s)", round ? "with" : "without",
                       R - 1, epx_status_name(st), epx_status_name(want), epx_get_last_error());
        if (round == 0) {
            uint8_t *hx = palloc(rx_b), *hs = palloc(rs_b);
            fetch(hx, rx, rx_b + GUARD), fetch(hs, rs, rs_b + GUARD);
            expect_poison(hx, 0, rx_b + GUARD, "fp8 without scales", "recv_x");
            expect_poison(hs, 0, rs_b + GUARD, "fp8 without scales", "recv_x_scales");
            free(hx), free(hs);
        }
        ASSERT_OK(epx_moe_handle_destroy(h));
        passed++;
    }
    test_sync();
    dev_free(dx), dev_free(dxs), dev_free(didx), dev_free(rx), dev_free(rs);
    ASSERT_OK(epx_moe_destroy(moe));
    return passed;
}

/* --ll-host-differs: EPX_MOE_LL_HOST is 1 on the odd ranks, 0 on the others (set in main,
 * before the library reads it). Across GPU hosts the low-latency path then differs between
 * ranks: creation fails with EPX_ERR_MISMATCH on every rank (before the check the ranks
 * met in different collectives and timed out); elsewhere the variable means nothing and
 * creation succeeds. A high-throughput context works either way. */
static int run_ll_host_differs(const epx_comm_info_t *info)
{
    epx_moe_config_t cfg = small_config();
    cfg.mode = EPX_MOE_LOW_LATENCY;
    bool differs = R > 1 && test_on_cuda() && info->num_hosts > 1;
    epx_moe_t moe = NULL;
    epx_status_t st = epx_moe_create(comm, &cfg, &moe);
    if (st != (differs ? EPX_ERR_MISMATCH : EPX_SUCCESS))
        TEST_FAIL_("low-latency create with EPX_MOE_LL_HOST=%d here: got %s, expected %s (%s)", me % 2,
                   epx_status_name(st), differs ? "EPX_ERR_MISMATCH" : "EPX_SUCCESS", epx_get_last_error());
    ASSERT_OK(epx_moe_destroy(moe));
    cfg.mode = EPX_MOE_HIGH_THROUGHPUT;
    ASSERT_OK(epx_moe_create(comm, &cfg, &moe));
    ASSERT_OK(epx_moe_destroy(moe));
    return 2;
}

static int run_bad_create(void)
{
    int passed = 0;
    epx_moe_config_t base = small_config();
    /* The same invalid configuration on every rank. */
    for (int k = 0;; k++) {
        epx_moe_config_t cfg = base;
        const char *what;
        switch (k) {
        case 0: cfg.dtype = EPX_I32, what = "dtype i32"; break;
        case 1: cfg.dtype = 42, what = "dtype 42"; break;
        case 2: cfg.index_dtype = EPX_F32, what = "index dtype f32"; break;
        case 3: cfg.index_dtype = EPX_U8, what = "index dtype u8"; break;
        case 4: cfg.hidden = 0, what = "hidden 0"; break;
        case 5: cfg.hidden = -5, what = "hidden -5"; break;
        case 6: cfg.max_topk = EPX_MOE_MAX_TOPK + 1, what = "max_topk > EPX_MOE_MAX_TOPK"; break;
        case 7: cfg.expert_alignment = 0, what = "expert_alignment 0"; break;
        case 8: cfg.combine_dtype = EPX_FP8_E4M3, what = "combine dtype fp8"; break;
        case 9: cfg.combine_dtype = EPX_I64, what = "combine dtype i64"; break;
        case 10: cfg.mode = 7, what = "mode 7"; break;
        case 11: cfg.num_experts = 2 * R + 1, what = "E % R != 0"; break;
        case 12: cfg.max_tokens_per_rank = -1, what = "max_tokens -1"; break;
        case 13: cfg.num_sms = -2, what = "num_sms -2"; break;
        case 14: cfg.mode = EPX_MOE_LOW_LATENCY, cfg.dtype = EPX_FP8_E4M3, what = "low-latency with fp8 tokens"; break;
        default: what = NULL; break;
        }
        if (!what) break;
        if (k == 11 && R == 1) continue;
        epx_moe_t moe = NULL;
        epx_status_t st = epx_moe_create(comm, &cfg, &moe);
        if (st != EPX_ERR_INVALID_ARGUMENT)
            TEST_FAIL_("create with %s: got %s, expected EPX_ERR_INVALID_ARGUMENT (%s)", what, epx_status_name(st),
                       epx_get_last_error());
        ASSERT(moe == NULL);
        passed++;
    }
    /* Valid configurations that differ between ranks. */
    if (R > 1)
        for (int k = 0; k < 5; k++) {
            epx_moe_config_t cfg = base;
            static const char *const whats[] = {"hidden", "dtype", "num_experts", "index dtype", "mode"};
            if (k == 0 && me == R - 1) cfg.hidden = 65;
            if (k == 1 && me == 0) cfg.dtype = EPX_F16;
            if (k == 2 && me == R / 2) cfg.num_experts = 4 * R;
            if (k == 3 && me == R - 1) cfg.index_dtype = EPX_I32;
            if (k == 4 && me == R - 1) cfg.mode = EPX_MOE_LOW_LATENCY; /* across GPU hosts: another path */
            const char *what = whats[k];
            epx_moe_t moe = NULL;
            epx_status_t st = epx_moe_create(comm, &cfg, &moe);
            if (st != EPX_ERR_MISMATCH)
                TEST_FAIL_("create with a different %s on one rank: got %s, expected EPX_ERR_MISMATCH (%s)", what,
                           epx_status_name(st), epx_get_last_error());
            ASSERT(moe == NULL);
            passed++;
        }
    /* A NULL cfg, or a NULL output, on one rank only: that rank fails with
     * EPX_ERR_INVALID_ARGUMENT, the others with EPX_ERR_REMOTE_INVALID (none waits for it until
     * the timeout), and the communicator still works (below). */
    if (R > 1)
        for (int k = 0; k < 2; k++) {
            bool bad = me == (k == 0 ? 0 : R - 1);
            epx_moe_t moe = NULL;
            epx_status_t st = epx_moe_create(comm, bad && k == 0 ? NULL : &base, bad && k == 1 ? NULL : &moe);
            epx_status_t want = bad ? EPX_ERR_INVALID_ARGUMENT : EPX_ERR_REMOTE_INVALID;
            if (st != want)
                TEST_FAIL_("create with a NULL %s on rank %d: got %s, expected %s (%s)", k == 0 ? "cfg" : "output",
                           k == 0 ? 0 : R - 1, epx_status_name(st), epx_status_name(want), epx_get_last_error());
            ASSERT(moe == NULL);
            passed++;
        }
    /* One rank on SMs, the others on copy engines (or the reverse): the CUDA backend of one
     * host must refuse it (elsewhere num_sms means nothing). */
    epx_comm_info_t info;
    ASSERT_OK(epx_comm_info(comm, &info));
    if (R > 1 && test_on_cuda() && info.num_hosts == 1) {
        epx_moe_config_t cfg = base;
        if (me == R - 1) cfg.num_sms = num_sms == EPX_MOE_COPY_ENGINES ? 16 : EPX_MOE_COPY_ENGINES;
        epx_moe_t moe = NULL;
        epx_status_t st = epx_moe_create(comm, &cfg, &moe);
        if (st != EPX_ERR_MISMATCH)
            TEST_FAIL_("create with copy engines on some ranks only: got %s, expected EPX_ERR_MISMATCH (%s)",
                       epx_status_name(st), epx_get_last_error());
        ASSERT(moe == NULL);
        passed++;
    }
    /* Local argument errors. */
    epx_moe_t moe = NULL;
    ASSERT_STATUS(epx_moe_create(NULL, &base, &moe), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_moe_create(comm, NULL, &moe), EPX_ERR_INVALID_ARGUMENT);
    ASSERT(moe == NULL);
    ASSERT_OK(epx_moe_destroy(NULL));
    ASSERT_OK(epx_moe_handle_destroy(NULL));
    int64_t nrows = -5;
    ASSERT_STATUS(epx_moe_handle_num_recv_tokens(NULL, &nrows), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_STATUS(epx_moe_max_recv_tokens(NULL, &nrows), EPX_ERR_INVALID_ARGUMENT);
    ASSERT_EQ(nrows, -5);
    /* The communicator still works. */
    ASSERT_OK(moe_create(&base, &moe));
    int64_t rows;
    ASSERT_OK(epx_moe_max_recv_tokens(moe, &rows));
    ASSERT_EQ(rows, 4 * R);
    /* Layout is local: bad ids fail on this rank alone. idx and pr on the backend (idx
     * with room for the T * K = 10 entries of the T > max call, zeros past the 4 used). */
    int64_t idx[16] = {0, 1, 2 * R, -1};
    int64_t *didx = dev_in(idx, sizeof idx, sizeof idx);
    int32_t *dpr = dev_out(sizeof(int32_t) * MAXR), *dpe = dev_out(sizeof(int32_t) * 2 * MAXR);
    uint8_t *dir = dev_out(2 * MAXR);
    for (int v = 0; v < 2; v++) {
        if (v == 1) {
            idx[2] = -3;
            put(didx, idx, sizeof idx);
        }
        poison(dpr, sizeof(int32_t) * MAXR), poison(dpe, sizeof(int32_t) * 2 * MAXR), poison(dir, 2 * MAXR);
        epx_status_t st = epx_moe_layout(moe, didx, 2, 2, dpr, dpe, dir, test_stream());
        if (!test_on_cuda()) {
            ASSERT_STATUS(st, EPX_ERR_INVALID_ARGUMENT);
            continue;
        }
        /* CUDA checks on the device: every count -1 (is_token_in_rank undefined). */
        ASSERT_OK(st);
        int32_t pr[MAXR], pe[2 * MAXR];
        uint8_t ir[2 * MAXR];
        fetch(pr, dpr, sizeof pr), fetch(pe, dpe, sizeof pe), fetch(ir, dir, sizeof ir);
        for (int q = 0; q < R; q++) ASSERT_EQ(pr[q], -1);
        for (int e = 0; e < 2 * R; e++) ASSERT_EQ(pe[e], -1);
    }
    ASSERT_STATUS(epx_moe_layout(moe, didx, 2, 3, dpr, NULL, NULL, test_stream()),
                  EPX_ERR_INVALID_ARGUMENT); /* K > max_topk */
    ASSERT_STATUS(epx_moe_layout(moe, didx, 5, 2, dpr, NULL, NULL, test_stream()),
                  EPX_ERR_INVALID_ARGUMENT); /* T > max */
    dev_free(didx), dev_free(dpr), dev_free(dpe), dev_free(dir);
    ASSERT_OK(epx_moe_destroy(moe));
    passed++;
    return passed;
}

/* ---- Case tables ---------------------------------------------------------------------------- */

#define HT EPX_MOE_HIGH_THROUGHPUT
#define LL EPX_MOE_LOW_LATENCY
#define U EPX_UNSET

static const mcase_t ht_cases[] = {
    /* name                  E     K   H     M   dtype         combine   idx      align route     neg flags */
    {"e=R k=1",              -1,   1,  128,  16, EPX_BF16,     U,        EPX_I64, 1,  ROUTE_UNIFORM, 0, F_REPEAT, 0, HT, 0, 0},
    {"k=2 h=77 i32",         -2,   2,  77,   13, EPX_BF16,     U,        EPX_I32, 1,  ROUTE_UNIFORM, 20, 0, 0, HT, 0, 0},
    {"e=288 k=8 zipf a16",   288,  8,  128,  24, EPX_BF16,     U,        EPX_I64, 16, ROUTE_ZIPF,  0,  F_REPEAT, 0, HT, 0, 0},
    {"fp8 e=288 k=9 h=77",   288,  9,  77,   20, EPX_FP8_E4M3, U,        EPX_I32, 1,  ROUTE_UNIFORM, 10, F_REPEAT, 0, HT, 0, 0},
    {"fp8 h=200 f32 out",    -4,   3,  200,  17, EPX_FP8_E4M3, EPX_F32,  EPX_I64, 16, ROUTE_ZIPF,  30, F_REG, 0, HT, 0, 0},
    {"f32 k=16 e=256",       256,  16, 128,  12, EPX_F32,      U,        EPX_I64, 1,  ROUTE_UNIFORM, 10, 0, 0, HT, 0, 0},
    {"f16 half -1",          -3,   4,  77,   15, EPX_F16,      U,        EPX_I32, 4,  ROUTE_UNIFORM, 50, F_NO_WEIGHTS, 0, HT, 0, 0},
    {"one expert f32 out",   -5,   5,  128,  9,  EPX_BF16,     EPX_F32,  EPX_I64, 1,  ROUTE_ONE,   30, 0, 0, HT, 0, 0},
    {"h=7168 k=6",           -8,   6,  7168, 4,  EPX_BF16,     U,        EPX_I64, 1,  ROUTE_UNIFORM, 0, F_REG, 0, HT, 0, 0},
    {"fp8 h=7168 e=256",     256,  7,  7168, 3,  EPX_FP8_E4M3, U,        EPX_I32, 16, ROUTE_ZIPF,  0,  0, 0, HT, 0, 0},
    {"h=1 duplicates",       -1,   9,  1,    30, EPX_F16,      U,        EPX_I64, 1,  ROUTE_DUP,   10, F_NULL_OUTS, 0, HT, 0, 0},
    {"e=288 k=1 f16 out",    288,  1,  128,  40, EPX_BF16,     EPX_F16,  EPX_I32, 16, ROUTE_ZIPF,  0,  F_EXACT_CAP, 0, HT, 0, 0},
    {"no experts at all",    -2,   3,  128,  10, EPX_BF16,     U,        EPX_I64, 1,  ROUTE_NONE,  0,  0, 0, HT, 0, 0},
    {"T=0 everywhere",       -2,   2,  128,  8,  EPX_BF16,     U,        EPX_I64, 1,  ROUTE_UNIFORM, 0, F_T_ZERO, 0, HT, 0, 0},
    {"f32 bf16 out h=130",   -6,   8,  130,  11, EPX_F32,      EPX_BF16, EPX_I32, 2,  ROUTE_ZIPF,  10, F_MAX_CAP, 16, HT, 0, 0},
    {"k=7 e=7R h=300",       -7,   7,  300,  14, EPX_BF16,     U,        EPX_I32, 16, ROUTE_UNIFORM, 0, F_NO_WEIGHTS | F_REG, 0, HT, 0, 0},
    {"k=16 f16 f32 out",     -2,   16, 64,   8,  EPX_F16,      EPX_F32,  EPX_I64, 1,  ROUTE_DUP,   20, F_T_FULL, 0, HT, 0, 0},
    {"fp8 k=4 e=R one",      -1,   4,  129,  10, EPX_FP8_E4M3, U,        EPX_I64, 3,  ROUTE_ONE,   40, F_NULL_OUTS, 8, HT, 0, 0},
    /* More counters than a block's shared memory holds (CUDA: the layout's global-scratch
     * kernel, several blocks); more tokens than a block has threads (CUDA: the layout's
     * cluster), with -1 ids. */
    {"e=16384 k=8 h=16",     16384, 8, 16,   1100, EPX_BF16,   U,        EPX_I32, 1,  ROUTE_UNIFORM, 10, 0, 0, HT, 0, 0},
    {"k=5 m=700 h=16",       -4,   5,  16,   700, EPX_BF16,    U,        EPX_I64, 1,  ROUTE_UNIFORM, 30, 0, 0, HT, 0, 0},
    /* Infinities and NaNs in y and the weights, a token or more on every rank (GPU: bf16, f16
     * and f32 on the 16-byte path, f32 at H = 77 element by element). */
    {"inf nan bf16",         -3,   6,  128,  12, EPX_BF16,     U,        EPX_I64, 1,  ROUTE_UNIFORM, 10, F_SPECIAL | F_T_WIDE, 0, HT, 0, 0},
    {"inf nan f16 out",      -2,   8,  64,   10, EPX_BF16,     EPX_F16,  EPX_I32, 1,  ROUTE_DUP,   0,  F_SPECIAL | F_T_WIDE, 0, HT, 0, 0},
    {"inf nan f32 h=128",    -2,   4,  128,  11, EPX_BF16,     EPX_F32,  EPX_I64, 1,  ROUTE_UNIFORM, 0, F_SPECIAL | F_T_WIDE, 0, HT, 0, 0},
    {"inf nan f32 h=77",     -4,   5,  77,   9,  EPX_F32,      U,        EPX_I64, 1,  ROUTE_ZIPF,  10, F_SPECIAL | F_T_WIDE, 0, HT, 0, 0},
};

static const mcase_t ll_cases[] = {
    {"ll bf16",              -2,   4,  128,  12, EPX_BF16,     U,        EPX_I64, 1,  ROUTE_UNIFORM, 0, F_REPEAT, 0, LL, 0, EPX_SCALE_F32},
    {"ll bf16 zipf h=77",    288,  8,  77,   10, EPX_BF16,     U,        EPX_I32, 1,  ROUTE_ZIPF,  10, 0, 0, LL, 0, EPX_SCALE_F32},
    {"ll fp8 f32 h=200",     -4,   6,  200,  9,  EPX_BF16,     U,        EPX_I64, 1,  ROUTE_UNIFORM, 20, F_REPEAT, 0, LL, 1, EPX_SCALE_F32},
    {"ll fp8 ue8m0 h=77",    288,  9,  77,   11, EPX_BF16,     U,        EPX_I32, 1,  ROUTE_ZIPF,  0,  F_REPEAT, 0, LL, 1, EPX_SCALE_UE8M0},
    {"ll fp8 ue8m0 h=7168",  -8,   8,  7168, 3,  EPX_BF16,     U,        EPX_I64, 1,  ROUTE_UNIFORM, 0, 0, 0, LL, 1, EPX_SCALE_UE8M0},
    {"ll fp8 f32 one",       -1,   1,  128,  16, EPX_BF16,     U,        EPX_I64, 1,  ROUTE_ONE,   0,  0, 0, LL, 1, EPX_SCALE_F32},
    {"ll dup k=16",          -2,   16, 256,  6,  EPX_BF16,     U,        EPX_I32, 1,  ROUTE_DUP,   20, 0, 0, LL, 0, EPX_SCALE_F32},
    {"ll fp8 k=5 h=300",     -3,   5,  300,  7,  EPX_BF16,     U,        EPX_I64, 1,  ROUTE_UNIFORM, 30, 0, 16, LL, 1, EPX_SCALE_UE8M0},
    {"ll T=0 everywhere",    -2,   2,  128,  5,  EPX_BF16,     U,        EPX_I64, 1,  ROUTE_UNIFORM, 0, F_T_ZERO, 0, LL, 1, EPX_SCALE_F32},
    {"ll fp8 e=288 m=64",    288,  8,  256,  64, EPX_BF16,     U,        EPX_I32, 1,  ROUTE_UNIFORM, 10, 0, 0, LL, 1, EPX_SCALE_F32},
    /* Combine dtypes other than bf16: on the GPU's 16-byte path (f32: H % 4 == 0; f16:
     * H % 8 == 0), with K <= 8 and above, and off it (H = 130). */
    {"ll f32 out h=130",     -3,   8,  130,  9,  EPX_BF16,     EPX_F32,  EPX_I32, 1,  ROUTE_ZIPF,  10, 0, 0, LL, 0, EPX_SCALE_F32},
    {"ll f32 out h=132",     -3,   8,  132,  9,  EPX_BF16,     EPX_F32,  EPX_I64, 1,  ROUTE_ZIPF,  10, F_REPEAT, 0, LL, 0, EPX_SCALE_F32},
    {"ll f32 out k=16",      -2,   16, 64,   6,  EPX_BF16,     EPX_F32,  EPX_I32, 1,  ROUTE_DUP,   20, 0, 0, LL, 0, EPX_SCALE_F32},
    {"ll f16 out k=12",      -4,   12, 64,   7,  EPX_BF16,     EPX_F16,  EPX_I64, 1,  ROUTE_UNIFORM, 0, F_REPEAT, 0, LL, 0, EPX_SCALE_F32},
    {"ll f16 out h=136",     288,  5,  136,  10, EPX_BF16,     EPX_F16,  EPX_I32, 1,  ROUTE_ZIPF,  10, 0, 0, LL, 0, EPX_SCALE_F32},
    /* Dispatch dtypes other than bf16 (no FP8 then): rows of 16-byte chunks (f32: H % 4 ==
     * 0) or not. */
    {"ll f16 in",            -3,   6,  128,  9,  EPX_F16,      U,        EPX_I64, 1,  ROUTE_UNIFORM, 10, F_REPEAT, 0, LL, 0, EPX_SCALE_F32},
    {"ll f32 in h=132",      288,  8,  132,  8,  EPX_F32,      U,        EPX_I32, 1,  ROUTE_ZIPF,  0,  0, 0, LL, 0, EPX_SCALE_F32},
    {"ll f32 in h=77 k=16",  -2,   16, 77,   6,  EPX_F32,      EPX_BF16, EPX_I64, 1,  ROUTE_DUP,   20, 0, 0, LL, 0, EPX_SCALE_F32},
    {"ll f16 in h=129",      -4,   3,  129,  7,  EPX_F16,      U,        EPX_I32, 1,  ROUTE_UNIFORM, 0, 0, 0, LL, 0, EPX_SCALE_F32},
    /* F_SHIFT: ranks of one call on and off the GPU's 16-byte paths (x, y, out misaligned
     * on odd ranks; across hosts a host's y decides for all its ranks). */
    {"ll f32 shifted",       -3,   8,  132,  9,  EPX_F32,      U,        EPX_I32, 1,  ROUTE_ZIPF,  10, F_SHIFT, 0, LL, 0, EPX_SCALE_F32},
    {"ll shifted k=12 f16",  -2,   12, 128,  8,  EPX_BF16,     EPX_F16,  EPX_I64, 1,  ROUTE_UNIFORM, 0, F_SHIFT | F_REPEAT, 0, LL, 0, EPX_SCALE_F32},
    {"ll fp8 shifted",       -4,   8,  256,  7,  EPX_BF16,     U,        EPX_I32, 1,  ROUTE_DUP,   10, F_SHIFT, 0, LL, 1, EPX_SCALE_UE8M0},
    /* Many tokens of tiny rows: 128 tokens in each 256-thread pass of a CUDA combine
     * block (two 8-channel items a row), max_tokens above a block's threads. */
    {"ll m=700 h=16",        -4,   8,  16,   700, EPX_BF16,    U,        EPX_I32, 1,  ROUTE_ZIPF,  10, 0, 0, LL, 0, EPX_SCALE_F32},
    /* Infinities and NaNs in y and the weights, a token or more on every rank (f32 out
     * both on the GPU's 16-byte path and element by element). */
    {"ll inf nan",           -3,   8,  128,  9,  EPX_BF16,     U,        EPX_I64, 1,  ROUTE_UNIFORM, 0, F_SPECIAL | F_T_WIDE, 0, LL, 1, EPX_SCALE_F32},
    {"ll inf nan f32 out",   -2,   6,  130,  7,  EPX_BF16,     EPX_F32,  EPX_I32, 1,  ROUTE_ZIPF,  10, F_SPECIAL | F_T_WIDE, 0, LL, 0, EPX_SCALE_F32},
    {"ll inf nan f16 out",   -2,   5,  64,   8,  EPX_BF16,     EPX_F16,  EPX_I64, 1,  ROUTE_UNIFORM, 0, F_SPECIAL | F_T_WIDE, 0, LL, 0, EPX_SCALE_F32},
    {"ll inf nan f32 h=128", -3,   8,  128,  7,  EPX_BF16,     EPX_F32,  EPX_I64, 1,  ROUTE_DUP,   0,  F_SPECIAL | F_T_WIDE, 0, LL, 0, EPX_SCALE_F32},
    {"ll inf nan f16 k=16",  -2,   16, 64,   6,  EPX_BF16,     EPX_F16,  EPX_I32, 1,  ROUTE_DUP,   0,  F_SPECIAL | F_T_WIDE, 0, LL, 0, EPX_SCALE_F32},
    {"ll inf nan f32 k=16",  -2,   16, 128,  6,  EPX_F32,      U,        EPX_I64, 1,  ROUTE_UNIFORM, 0, F_SPECIAL | F_T_WIDE, 0, LL, 0, EPX_SCALE_F32},
    /* K > 8, where the GPU loads a token's rows 8 at once: a token's one expert on a peer at
     * k >= 8 (weighed at home; many -1 ids make it common on 2 ranks) and a second wave cut
     * short (K = 11, 13, 15), on the 16-byte path (f32 out holds no slot or weight with the
     * routing) and off it. */
    {"ll f32 out k=16 -1s",  -16,  16, 128,  24, EPX_BF16,     EPX_F32,  EPX_I64, 1,  ROUTE_ZIPF,  70, 0, 0, LL, 0, EPX_SCALE_F32},
    {"ll fp8 k=13 -1s",      -12,  13, 256,  24, EPX_BF16,     U,        EPX_I32, 1,  ROUTE_UNIFORM, 70, 0, 0, LL, 1, EPX_SCALE_F32},
    {"ll f32 in k=11",       -10,  11, 132,  7,  EPX_F32,      U,        EPX_I64, 1,  ROUTE_UNIFORM, 10, F_REPEAT, 0, LL, 0, EPX_SCALE_F32},
    {"ll f16 out k=15 h=130",-8,   15, 130,  6,  EPX_BF16,     EPX_F16,  EPX_I32, 1,  ROUTE_ZIPF,  0,  0, 0, LL, 0, EPX_SCALE_F32},
};

static const mcase_t large_cases[] = {
    {"large bf16",           256,  8,  7168, 4096, EPX_BF16,     U,      EPX_I64, 1,  ROUTE_UNIFORM, 0, F_T_WIDE, 0, HT, 0, 0},
    {"large fp8 zipf",       256,  8,  7168, 4096, EPX_FP8_E4M3, U,      EPX_I32, 128, ROUTE_ZIPF,  0, F_T_WIDE, 0, HT, 0, 0},
    /* Decode-sized low latency (T <= 128, H = 7168, K = 8); E = 32 keeps recv_x [E, M, H] small. */
    {"large ll fp8",         32,   8,  7168, 128,  EPX_BF16,     U,      EPX_I64, 1,  ROUTE_UNIFORM, 0, F_T_WIDE, 0, LL, 1, EPX_SCALE_F32},
    {"large ll bf16 zipf",   32,   8,  7168, 128,  EPX_BF16,     U,      EPX_I32, 1,  ROUTE_ZIPF,  10, F_T_WIDE, 0, LL, 0, EPX_SCALE_F32},
    {"large ll ue8m0",       32,   8,  7168, 128,  EPX_BF16,     U,      EPX_I32, 1,  ROUTE_ZIPF,  0, F_T_WIDE, 0, LL, 1, EPX_SCALE_UE8M0},
};

/* --chunks: rows of the largest batch above 8 MiB (several chunks of the network step across
 * hosts by default), then a batch far below max_tokens in the same context shape (one). */
static const mcase_t chunk_cases[] = {
    {"chunks f32",           -4,   4,  4096, 640,  EPX_F32,      U,      EPX_I64, 1,  ROUTE_UNIFORM, 0, 0, 0, HT, 0, 0},
    {"chunks ll fp8",        -2,   2,  7168, 640,  EPX_BF16,     U,      EPX_I64, 1,  ROUTE_UNIFORM, 0, 0, 0, LL, 1, EPX_SCALE_F32},
    {"chunks small batch",   -4,   4,  7168, 1536, EPX_BF16,     U,      EPX_I64, 1,  ROUTE_UNIFORM, 0, F_T_SMALL, 0, HT, 0, 0},
};

/* CUDA: skip the whole test (exit 77) when the backend has no MoE yet. */
static void probe_cuda_moe(void)
{
    epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
    cfg.hidden = 128;
    cfg.max_tokens_per_rank = 4;
    cfg.num_experts = R;
    cfg.max_topk = 1;
    cfg.num_sms = num_sms;
    epx_moe_t moe = NULL;
    ASSERT_OK(moe_create(&cfg, &moe));
    ASSERT_OK(epx_moe_destroy(moe));
}

int main(int argc, char **argv)
{
    bool large = false, chunks = false;
    const char *only = NULL; /* --case NAME: only the fixed high-throughput cases named so */
    bool ll_only = false;    /* --ll: only the low-latency cases (fixed, split, pipeline, random, bad) */
    uint64_t seed = 1;
    int nrandom = 100;
    bool ll_host_differs = false;
    test_init(argc, argv);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--large")) large = true;
        if (!strcmp(argv[i], "--chunks")) chunks = true;
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 0);
        if (!strcmp(argv[i], "--random") && i + 1 < argc) nrandom = atoi(argv[++i]);
        if (!strcmp(argv[i], "--case") && i + 1 < argc) only = argv[++i];
        if (!strcmp(argv[i], "--ll")) ll_only = true;
        if (!strcmp(argv[i], "--copy-engines")) num_sms = EPX_MOE_COPY_ENGINES;
        if (!strcmp(argv[i], "--ll-host-differs")) ll_host_differs = true;
    }
    if (test_on_pool() && num_sms == EPX_MOE_COPY_ENGINES) {
        fprintf(stderr, "--pool with --copy-engines: peers write recv_x on copy engines, which must be memory CUDA IPC "
                        "can share (run_pool_ce_refused checks the refusal)\n");
        return 2;
    }
    if (ll_host_differs) { /* before the library reads its variables */
        const char *rank = getenv("EPX_RANK");
        setenv("EPX_MOE_LL_HOST", rank && atoi(rank) % 2 ? "1" : "0", 1);
    }
    comm = test_comm_from_env(&me, &R);
    ASSERT(R <= MAXR);
    epx_comm_info_t info;
    ASSERT_OK(epx_comm_info(comm, &info));
    exact_ll_order = !getenv("EPX_TEST_LL_ANY_ORDER"); /* both backends give the exact order */
    int passed = 0;
    bool ll = true;
    if (test_on_cuda()) probe_cuda_moe();

    if (ll_host_differs) {
        passed += run_ll_host_differs(&info);
    } else if (only) {
        for (size_t i = 0; i < sizeof ht_cases / sizeof ht_cases[0]; i++)
            if (strstr(ht_cases[i].name, only)) passed += run_ht_case(&ht_cases[i], seed * 1000 + i);
    } else if (large || chunks) {
        const mcase_t *cs = large ? large_cases : chunk_cases;
        size_t n = large ? sizeof large_cases / sizeof large_cases[0] : sizeof chunk_cases / sizeof chunk_cases[0];
        for (size_t i = 0; i < n; i++)
            passed += cs[i].mode == LL ? run_ll_case(&cs[i], seed * 1000 + i) : run_ht_case(&cs[i], seed * 1000 + i);
    } else {
        if (!ll_only) passed += run_bad_create();
        for (size_t i = 0; !ll_only && i < sizeof ht_cases / sizeof ht_cases[0]; i++)
            passed += run_ht_case(&ht_cases[i], seed * 1000 + i);
        if (ll)
            for (size_t i = 0; i < sizeof ll_cases / sizeof ll_cases[0]; i++)
                passed += run_ll_case(&ll_cases[i], seed * 1000 + 500 + i);
        if (!ll_only) passed += run_two_handles();
        if (!ll_only && test_on_pool())
            passed += run_pool_back_to_back() + run_pool_ce_refused() + run_pool_ce_inputs();
        if (ll) passed += run_ll_split();
        if (ll) passed += run_ll_pipeline(R - 1);
        if (ll) passed += run_ll_pipeline(0);
        for (int i = 0; i < nrandom; i++) {
            mcase_t c = random_case(seed * 7919 + (uint64_t)i, false);
            if (!ll_only) passed += run_ht_case(&c, seed * 1000 + 700 + (uint64_t)i);
            mcase_t l = random_case(seed * 7919 + (uint64_t)i, true);
            if (ll && i % 2 == 0) passed += run_ll_case(&l, seed * 1000 + 800 + (uint64_t)i);
        }
        if (!ll_only) { /* one after the other: collective calls, in the same order on every rank */
            passed += run_bad_ht();
            passed += run_bad_capacity();
            passed += run_mismatch();
            if (R > 1) passed += run_bad_fp8_scales();
            passed += run_bad_ht_no_sync();
        }
        if (ll) passed += run_bad_ll();
    }
    test_finish(comm, passed);
    return 0;
}
