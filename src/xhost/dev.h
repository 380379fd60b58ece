/*
 * src/xhost: what its kernels (kernels.cu) take, shared by the host code (C) and the
 * kernels (CUDA C). Rows are named by *references*: a source kind (which buffer) and an
 * index in it, so that one launch can read rows from the caller's tensors and from epx's
 * staging buffers at once and the host plans every copy with small index arrays.
 */
#ifndef EPX_XHOST_DEV_H
#define EPX_XHOST_DEV_H

#ifdef __cplusplus
extern "C" {
#endif

/* A reference: kind (< EPX__XH_KINDS) in the top byte, row index below. */
#define EPX__XH_KINDS 4
#define EPX__XH_REF(kind, index) (((long long)(kind) << 56) | (long long)(index))
#define EPX__XH_REF_KIND(ref) ((int)((ref) >> 56))
#define EPX__XH_REF_INDEX(ref) ((ref) & ((1LL << 56) - 1))

/* The buffers references point into: row i of kind k is row[k] + i * row_stride[k], its
 * auxiliary part (FP8 scales, or top-k weights) aux[k] + i * aux_stride[k] (aux[k] NULL:
 * none). */
typedef struct {
    const char *row[EPX__XH_KINDS];
    long long row_stride[EPX__XH_KINDS];
    const char *aux[EPX__XH_KINDS];
    long long aux_stride[EPX__XH_KINDS];
} epx__xh_src_t;

/* dst row j (row + j * row_stride) = the row_bytes of ref[j]; when aux is not NULL, also
 * dst aux j (aux + j * aux_stride) = the aux_bytes of ref[j]'s auxiliary part. */
typedef struct {
    epx__xh_src_t src;
    const long long *ref; /* [n], device */
    long long n;
    char *row;
    long long row_stride, row_bytes;
    char *aux;
    long long aux_stride, aux_bytes;
} epx__xh_gather_t;

/* out[t] = the rows ref[first[t] .. first[t + 1]) summed (float32 from +0): without w
 * (high-throughput) in that order, the arithmetic of the single-host combine
 * (epx__moe_reduce_token), and out_w[t] (when not NULL) = the sum of their top-k weights
 * (aux parts; zeros where no source has any); with w (low-latency) row j is the product
 * w[t * topk + wk[j]] * row, rounded before it is added, its expert on rank rk[j], summed
 * as the single-host low-latency combine does (epx__ll_sum_token: a partial sum per rank). */
typedef struct {
    epx__xh_src_t src;
    const long long *first; /* [T + 1], device */
    const long long *ref;   /* device */
    int num_tokens, topk, hidden, dtype;
    char *out;
    float *out_w;
    const float *w;        /* [T, topk], device, or NULL */
    const long long *wk;   /* the k of each row (with w), device */
    const long long *rk;   /* the rank of each row's expert (with w), device */
} epx__xh_reduce_t;

/* Low-latency placement. Filled slot j (j < g.n) gets row ref[row[j]] of g (g.ref: one per
 * received row) at slot[j] (g.row + slot[j] * g.row_stride, its scales likewise at g.aux),
 * src_rank / src_token[slot[j]] = src[j] >> 32 / the low 32 bits; every other slot of local
 * expert l (from count[l] on, of `slots`) gets -1 sources, recv_count[l] = count[l]. Any
 * of the three outputs may be NULL. */
typedef struct {
    epx__xh_gather_t g;
    const long long *row, *slot, *src; /* [g.n], device */
    const long long *count;            /* [L], device */
    int L;
    long long slots;
    int *recv_count, *src_rank, *src_token;
} epx__xh_place_t;

/* Low-latency FP8: bf16 rows x [T, H] quantised into records of `stride` bytes at q: the
 * e4m3 row first, the scales (UE8M0 bytes or float32) at scale_off, with the CPU backend's
 * arithmetic (epx__ll_quantize_row). */
typedef struct {
    const unsigned short *x;
    int num_tokens, hidden, ue8m0;
    char *q;
    long long stride, scale_off;
} epx__xh_quant_t;

/* Launchers: a cudaError_t as int. Nothing is launched for no rows (place: for no slots). */
int epx__xh_launch_gather(const epx__xh_gather_t *g, int blocks, void *stream);
int epx__xh_launch_reduce(const epx__xh_reduce_t *r, int blocks, void *stream);
int epx__xh_launch_place(const epx__xh_place_t *p, int blocks, void *stream);
int epx__xh_launch_quantize(const epx__xh_quant_t *q, int blocks, void *stream);

#ifdef __cplusplus
}
#endif

#endif
