/*
 * epx — expert-parallel all-to-all (MoE dispatch/combine, alltoall/alltoallv).
 *
 * The whole public C API. C99-compatible; every symbol is prefixed epx_ / EPX_.
 *
 * Threading: a communicator is used by one thread at a time (like NCCL). Different
 * communicators are independent. All collective calls must be made by every rank of the
 * communicator, in the same order.
 *
 * Errors: every call returns an epx_status_t. EPX_ERR_INVALID_ARGUMENT (and the other
 * argument/usage errors) mean nothing happened on any rank and the communicator is still
 * usable; EPX_ERR_TIMEOUT, EPX_ERR_PEER_FAILURE, EPX_ERR_ABORTED, engine errors
 * (EPX_ERR_CUDA, _NCCL, _MPI) and EPX_ERR_INTERNAL from a collective call mean the
 * communicator is broken: abort it and create a new one; the outputs of that call are
 * undefined. README.md has the table for every status. The detailed message of the last
 * failure is available from epx_comm_get_last_error() / epx_get_last_error().
 */
#ifndef EPX_H
#define EPX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define EPX_API __attribute__((visibility("default")))
#else
#define EPX_API
#endif

/* ---- Version --------------------------------------------------------------------- */

#define EPX_VERSION_MAJOR 0
#define EPX_VERSION_MINOR 1
#define EPX_VERSION_PATCH 0
#define EPX_VERSION_CODE (EPX_VERSION_MAJOR * 10000 + EPX_VERSION_MINOR * 100 + EPX_VERSION_PATCH)

/* The version of the library actually loaded, as EPX_VERSION_CODE. */
EPX_API int epx_get_version(void);

/* ---- Status ---------------------------------------------------------------------- */

/* X(name, value, description). 0 = success, 1 = in progress, negative = error. */
#define EPX_STATUS_MAP(X)                                                                      \
    X(EPX_SUCCESS, 0, "success")                                                               \
    X(EPX_IN_PROGRESS, 1, "operation in progress")                                             \
    X(EPX_ERR_INVALID_ARGUMENT, -1, "invalid argument (nothing was changed)")                  \
    X(EPX_ERR_INVALID_USAGE, -2, "invalid usage (nothing was changed)")                        \
    X(EPX_ERR_MISMATCH, -3, "ranks disagree on a configuration or a size (nothing was changed)") \
    X(EPX_ERR_REMOTE_INVALID, -4, "another rank rejected its arguments (nothing was changed)") \
    X(EPX_ERR_UNSUPPORTED, -5, "not supported by this build or backend")                       \
    X(EPX_ERR_NO_MEMORY, -6, "out of memory")                                                  \
    X(EPX_ERR_SYSTEM, -7, "system call failed")                                                \
    X(EPX_ERR_TIMEOUT, -8, "timed out waiting for a peer (communicator is broken)")           \
    X(EPX_ERR_PEER_FAILURE, -9, "a peer died or aborted (communicator is broken)")            \
    X(EPX_ERR_ABORTED, -10, "communicator was aborted")                                        \
    X(EPX_ERR_CUDA, -11, "CUDA error")                                                         \
    X(EPX_ERR_NCCL, -12, "NCCL error")                                                         \
    X(EPX_ERR_MPI, -13, "MPI error")                                                           \
    X(EPX_ERR_INTERNAL, -14, "internal error")

typedef enum {
#define EPX_STATUS_ENUM_(name, value, text) name = value,
    EPX_STATUS_MAP(EPX_STATUS_ENUM_)
#undef EPX_STATUS_ENUM_
} epx_status_t;

/* Static description of a status code; never NULL ("unknown status" for bad codes). */
EPX_API const char *epx_status_string(epx_status_t status);

/* Name of a status code ("EPX_ERR_TIMEOUT"); never NULL. */
EPX_API const char *epx_status_name(epx_status_t status);

/* Detailed message of the last failed call made by this thread (e.g. during comm init),
 * or "" if none. Valid until the next failing call on this thread. */
EPX_API const char *epx_get_last_error(void);

/* ---- Data types ------------------------------------------------------------------ */

typedef enum {
    EPX_U8 = 0,
    EPX_I32 = 1,
    EPX_I64 = 2,
    EPX_F16 = 3,
    EPX_BF16 = 4,
    EPX_F32 = 5,
    EPX_FP8_E4M3 = 6,
    EPX_NUM_DTYPES = 7
} epx_dtype_t;

/* Size in bytes of one element, or 0 for an unknown dtype. */
EPX_API size_t epx_dtype_size(epx_dtype_t dtype);

/* "bf16", "fp8_e4m3", ... or "unknown". */
EPX_API const char *epx_dtype_name(epx_dtype_t dtype);

/* ---- Configuration --------------------------------------------------------------- */

/* Field value meaning "not set: use the environment variable / default". */
#define EPX_UNSET (-0x7fffffff)

typedef enum {
    EPX_BACKEND_AUTO = 0, /* CUDA when cfg.device is set (EPX_ERR_UNSUPPORTED in a build
                             without CUDA), else CPU */
    EPX_BACKEND_CPU = 1,
    EPX_BACKEND_CUDA = 2
} epx_backend_t;

/* Communicator configuration. Always start from EPX_CONFIG_INITIALIZER, then set fields:
 * new fields are appended in later versions and `size`/`version` let the library tell. */
typedef struct {
    size_t size;          /* sizeof(epx_config_t), set by the initializer */
    int version;          /* EPX_VERSION_CODE, set by the initializer */
    int backend;          /* epx_backend_t, or EPX_UNSET (EPX_BACKEND) */
    int timeout_ms;       /* bound on every wait for a peer (README "Timeouts"), or EPX_UNSET
                             (EPX_TIMEOUT_MS) */
    int device;           /* CUDA device ordinal, or EPX_UNSET (current device) */
} epx_config_t;

#define EPX_CONFIG_INITIALIZER                                                     \
    { sizeof(epx_config_t), EPX_VERSION_CODE, EPX_UNSET, EPX_UNSET, EPX_UNSET }

/* ---- Tunables -------------------------------------------------------------------- */

/* Every tunable of the library is an EPX_* environment variable, declared once in one
 * table. Values are read once, at first use. */
typedef struct {
    const char *name;          /* environment variable, e.g. "EPX_TIMEOUT_MS" */
    const char *type;          /* "int", "size" (accepts K/M/G), "string" */
    const char *default_value; /* as text */
    const char *value;         /* the value in force, as text */
    const char *description;
} epx_param_info_t;

/* Number of tunables. */
EPX_API int epx_param_count(void);

/* Describe tunable `index` (0 <= index < epx_param_count()). */
EPX_API epx_status_t epx_param_get(int index, epx_param_info_t *info);

/* ---- Communicator ---------------------------------------------------------------- */

typedef struct epx_comm *epx_comm_t;

/* Opaque rendezvous id, created on one process and handed to all ranks (like ncclUniqueId). */
#define EPX_UNIQUE_ID_BYTES 128
typedef struct {
    char internal[EPX_UNIQUE_ID_BYTES];
} epx_unique_id_t;

/* Longest text form of an id, terminating NUL included. */
#define EPX_UNIQUE_ID_STRLEN 96

/* Create a rendezvous id. The calling process starts a bootstrap listener (a thread) that
 * lives until all ranks of one communicator have met or EPX_TIMEOUT_MS passes. The listener
 * binds the interface named by EPX_SOCKET_IFNAME (default: loopback). */
EPX_API epx_status_t epx_get_unique_id(epx_unique_id_t *id);

/* Text form of an id ("epx1:ADDR:PORT:NONCE"), for environment variables. */
EPX_API epx_status_t epx_unique_id_to_string(const epx_unique_id_t *id, char *buf, size_t len);
EPX_API epx_status_t epx_unique_id_from_string(const char *text, epx_unique_id_t *id);

/* Collective over nranks processes: create a communicator. Fails on every rank with
 * EPX_ERR_MISMATCH when the ranks' configurations differ. A rank that rejects its own (cfg,
 * or an EPX_* variable) still meets the others (waiting for them as a valid rank would),
 * then gets EPX_ERR_INVALID_ARGUMENT and they EPX_ERR_REMOTE_INVALID; a bad rank, nranks or
 * id cannot reach them (they time out). An id serves one creation, failed or not (with
 * nranks 1, one that failed on its arguments leaves it unused). cfg may be NULL (defaults). */
EPX_API epx_status_t epx_comm_init_rank(epx_comm_t *comm, int nranks, int rank, const epx_unique_id_t *id,
                                const epx_config_t *cfg);

/* Like epx_comm_init_rank, with EPX_RANK, EPX_NRANKS and EPX_UNIQUE_ID from the environment
 * (set by epx-run). */
EPX_API epx_status_t epx_comm_init_from_env(epx_comm_t *comm, const epx_config_t *cfg);

/* Release a communicator. Local: does not wait for other ranks. NULL is accepted. */
EPX_API epx_status_t epx_comm_destroy(epx_comm_t comm);

/* Mark the communicator aborted (peers waiting on this rank fail promptly with
 * EPX_ERR_PEER_FAILURE) and release it, with its registered memory. Safe after any error
 * and on a healthy communicator; not while another thread is inside a call on it (every
 * wait ends at the timeout instead). NULL is accepted. */
EPX_API epx_status_t epx_comm_abort(epx_comm_t comm);

EPX_API epx_status_t epx_comm_rank(epx_comm_t comm, int *rank);
EPX_API epx_status_t epx_comm_size(epx_comm_t comm, int *nranks);

/* Topology: ranks are grouped into hosts (same hostname and boot id, or blocks of
 * EPX_LOCAL_SIZE consecutive ranks when that is set, to simulate several hosts). */
typedef struct {
    int rank, nranks;
    int local_rank, local_size; /* within this rank's host */
    int host, num_hosts;
    int backend; /* epx_backend_t in use */
} epx_comm_info_t;

EPX_API epx_status_t epx_comm_info(epx_comm_t comm, epx_comm_info_t *info);

/* Message of the last failed call on this communicator ("" if none). */
EPX_API const char *epx_comm_get_last_error(epx_comm_t comm);

/* EPX_SUCCESS while the communicator is healthy; else the error that broke it (the first
 * one), which every later collective and MoE call returns at once. On the CUDA backend it
 * also reads what the device recorded (a device wait that timed out), and across GPU hosts
 * whether NCCL work left on a stream after a call was ended: waiting EPX_TIMEOUT_MS for a
 * peer (EPX_ERR_TIMEOUT), or an error NCCL reported (EPX_ERR_NCCL); a watchdog thread then
 * aborts the NCCL link, so a stream synchronisation returns. */
EPX_API epx_status_t epx_comm_get_async_error(epx_comm_t comm, epx_status_t *async_error);

/* ---- Registered memory ----------------------------------------------------------- */

/* Allocate memory that peers of this host can read directly (POSIX shared memory on the
 * CPU backend, cudaMalloc memory on CUDA). On the CPU backend, buffers passed as `send` that
 * lie in such memory are copied once, straight into the receivers' buffers; other buffers
 * are read with process_vm_readv (also one copy) or, where that is unavailable or
 * EPX_CPU_CMA=0, staged (one more copy). Local call. Aligned to 4096 bytes on the CPU
 * backend (cudaMalloc's alignment on CUDA). */
EPX_API epx_status_t epx_mem_alloc(epx_comm_t comm, size_t bytes, void **ptr);
/* Local. ptr must come from epx_mem_alloc on this communicator (NULL: nothing to do); any
 * other pointer gets EPX_ERR_INVALID_ARGUMENT and is not freed. What is still allocated is
 * released with the communicator. */
EPX_API epx_status_t epx_mem_free(epx_comm_t comm, void *ptr);
/* On the CUDA backend the peers of a host reach a rank's buffers through CUDA IPC. Memory it
 * cannot share (a stream-ordered pool such as cudaMallocAsync's, cuMemCreate as PyTorch's
 * expandable segments use) is staged through memory of epx's, one more device copy per call:
 * the high-throughput MoE inputs (copied there first) and the alltoall(v) receive buffers
 * (the peers write there, the rank copies their segments out). Elsewhere (copy-engine recv_x,
 * alltoallv_device's buffers, a low-latency combine's y across hosts) such memory gets
 * EPX_ERR_UNSUPPORTED before anything moves (README.md, "The CUDA backend"). */

/* ---- Collectives ----------------------------------------------------------------- */

/* `stream` is NULL on the CPU backend and a cudaStream_t on the CUDA backend. The
 * collectives of one communicator run one after the other on the device: enqueue them on
 * one stream, or each on a stream ordered after the previous call's (their device state,
 * flags and staging, is reused from call to call). What this header calls capturable in a
 * CUDA graph is so on one host; across hosts only the low-latency MoE calls are, and the
 * others refuse a capturing stream with EPX_ERR_INVALID_USAGE (epx_cuda.h). A replay counts
 * as the calls it captured: order it with the communicator's other calls as you would
 * them (one stream, or events), since epx cannot order a replay with calls on other
 * streams. A graph keeps what the captured calls mapped of the peers' buffers (those
 * buffers must stay allocated while the graph exists: a peer that frees one and gets a new
 * allocation at the same address makes the next call that maps it fail with EPX_ERR_CUDA)
 * and needs the communicator:
 * destroy every graph that captured calls on it (and their instances) before
 * epx_comm_destroy or epx_comm_abort; across hosts NCCL releases the communicators epx
 * made only once those graphs are gone. */

/* Returns after every rank has entered the barrier. */
EPX_API epx_status_t epx_barrier(epx_comm_t comm, void *stream);

/* MPI_Alltoall: rank r sends elements [p*count, (p+1)*count) of `send` to rank p, which
 * stores them at [r*count, (r+1)*count) of `recv`. send and recv must not overlap.
 * On return, recv is complete and send may be reused. */
EPX_API epx_status_t epx_alltoall(epx_comm_t comm, const void *send, void *recv, size_t count,
                          epx_dtype_t dtype, void *stream);

/* MPI_Alltoallv: rank r sends sendcounts[p] elements starting at send + sdispls[p] to rank
 * p, which stores recvcounts[r] (must equal them) elements at recv + rdispls[r]. Counts and
 * displacements are in elements, >= 0; zero counts allowed; send and recv must not overlap.
 * A count that disagrees with the peer's returns EPX_ERR_MISMATCH on the two ranks involved
 * before anything is written (on the CUDA backend the other ranks then return
 * EPX_ERR_REMOTE_INVALID, also without writing). */
EPX_API epx_status_t epx_alltoallv(epx_comm_t comm, const void *send, const int64_t *sendcounts,
                           const int64_t *sdispls, void *recv, const int64_t *recvcounts,
                           const int64_t *rdispls, epx_dtype_t dtype, void *stream);

/* epx_alltoallv with sendcounts, sdispls, recvcounts and rdispls in device memory (int64
 * elements, read in stream order, so a kernel enqueued just before may write them): no
 * host synchronisation, capturable in a CUDA graph. CUDA backend only (else
 * EPX_ERR_UNSUPPORTED). The pointers are checked on the host; the counts on the device:
 * a pair whose counts disagree (or a negative value) moves nothing, and the communicator
 * then reports EPX_ERR_MISMATCH as its asynchronous error (abort and recreate it). recv
 * must hold what the displacements and counts ask for: there is no capacity check. */
EPX_API epx_status_t epx_alltoallv_device(epx_comm_t comm, const void *send, const int64_t *sendcounts,
                                          const int64_t *sdispls, void *recv, const int64_t *recvcounts,
                                          const int64_t *rdispls, epx_dtype_t dtype, void *stream);

/* ---- MoE dispatch / combine --------------------------------------------------------
 *
 * Shapes: T tokens on this rank (0 <= T <= max_tokens_per_rank, may differ per rank), hidden
 * H, top-k K (<= max_topk), E experts, R ranks, L = E / R local experts; expert e lives on
 * rank e / L. topk_idx[T, K] is int32 or int64 (cfg.index_dtype), -1 = no expert;
 * topk_weights[T, K] float32. FP8 tokens carry float32 scales [rows, ceil(H / 128)]: the
 * value of element h is fp8[h] * scale[h / 128].
 *
 * High-throughput (rank-major): each token travels once to each rank holding at least one
 * of its experts; received rows are ordered by (source rank, source token) — deterministic.
 * Combine sums, for each token, its rows from every rank it went to, in float32 in
 * ascending rank order starting from +0.0f, then casts (round to nearest even): the same
 * inputs give the same bits on every backend. Tokens sent nowhere get +0.
 *
 * Low-latency (expert-major, static shapes): rank q receives recv_x[L, R * max_tokens, H];
 * the rows of local expert l are packed at the front, recv_count[l] of them, grouped by
 * source rank in ascending order. Within a source's group the CPU backend orders tokens
 * ascending; GPU backends may order them by arrival (the slot sources say which is where).
 * Combine: out[t] = the sum, over the ranks holding the token's experts in ascending order,
 * of each rank's partial sum of w[t,k] * y[e_k][slot(t,k)] over its k in ascending order:
 * float32, every sum from +0.0f, each product rounded before it is added (no fused
 * multiply-add), then cast. (A partial per rank is what lets a GPU backend add up a
 * token's rows where they lie and send one float32 row per rank instead of each expert's
 * row; with all of a token's experts on one rank it is the plain sum in k order.)
 * recv_count is not rounded to expert_alignment; slots past recv_count[l] are not written
 * (their sources are set to -1).
 *
 * Both combines (and the sum of out_topk_weights) store a NaN result as the canonical quiet
 * NaN, whatever NaNs or infinities made it: float32 0x7fffffff, bf16 and f16 0x7fff (what
 * GPU arithmetic gives; the CPU backend canonicalises its sums to match).
 *
 * FP8 quantisation (low-latency ll_fp8), per row and per block of 128 channels (the last
 * block may be shorter): amax = max |x| over the block (NaN ignored), at least 1e-4;
 * EPX_SCALE_F32: scale = amax / 448 and q = e4m3(x * (448 / amax)); EPX_SCALE_UE8M0:
 * scale = the smallest power of two >= amax / 448, stored as its biased exponent byte, and
 * q = e4m3(x * (1 / scale)). Each step is one IEEE float32 operation; e4m3 rounds to
 * nearest even and saturates to +-448.
 *
 * Every MoE call is collective over the communicator. A call's inputs and outputs must not
 * overlap (a dispatch may read x while it writes recv_x). Bad input (an expert id >= E or
 * < -1, T > max_tokens, K > max_topk, a NULL or misaligned pointer, too small an output)
 * fails on every rank before anything is written: the offending rank gets
 * EPX_ERR_INVALID_ARGUMENT with the argument (and token) named, the others
 * EPX_ERR_REMOTE_INVALID; the communicator stays usable.
 */

typedef enum { EPX_MOE_HIGH_THROUGHPUT = 0, EPX_MOE_LOW_LATENCY = 1 } epx_moe_mode_t;

/* How low-latency FP8 dispatch stores its per-128-channel scales. */
typedef enum {
    EPX_SCALE_F32 = 0,  /* float32 amax / 448 */
    EPX_SCALE_UE8M0 = 1 /* one byte: the biased exponent of a power of two >= amax / 448 */
} epx_scale_format_t;

typedef struct {
    size_t size;              /* sizeof(epx_moe_config_t), set by the initializer */
    int version;              /* EPX_VERSION_CODE, set by the initializer */
    int hidden;               /* H >= 1 */
    int max_tokens_per_rank;  /* >= T on every call; at most 2^24, and in low-latency mode
                                 ranks x max_tokens_per_rank (slots per expert) at most 2^30 */
    int num_experts;          /* E, a multiple of the number of ranks */
    int max_topk;             /* K of every call is <= this (at most EPX_MOE_MAX_TOPK) */
    int dtype;                /* token dtype of dispatch: EPX_BF16, EPX_F16, EPX_F32, EPX_FP8_E4M3 */
    int combine_dtype;        /* combine input/output: EPX_BF16, EPX_F16, EPX_F32; EPX_UNSET =
                                 dtype, or EPX_BF16 when dtype is FP8 */
    int index_dtype;          /* topk_idx: EPX_I32 or EPX_I64 */
    int mode;                 /* epx_moe_mode_t */
    int expert_alignment;     /* num_recv_tokens_per_expert rounded up to it (>= 1) */
    int ll_fp8;               /* low-latency: quantise bf16 input to FP8 during dispatch */
    int scale_format;         /* epx_scale_format_t for ll_fp8 */
    int num_sms;              /* GPU: SM budget of the high-throughput kernels (> 0); EPX_UNSET
                                 or 0: EPX_CUDA_SMS (whose 0 means copy engines); or
                                 EPX_MOE_COPY_ENGINES (-1): copy engines */
} epx_moe_config_t;

/* num_sms value: the CUDA backend (one host) moves the high-throughput payload with copy
 * engines instead of SM stores and loads (EPX_CUDA_SMS=0 asks for the same when num_sms is
 * unset). Dispatch packs the rows per destination into epx's staging memory with a local
 * kernel, in up to four stages, each copied with cudaMemcpyAsync into the peers' recv_x as
 * it is packed; combine copies each source's expert outputs back the same way and the
 * token's rank reduces them with a local kernel. Semantics and output bits are those of the
 * SM path. Differences: recv_x and recv_x_scales must be cudaMalloc'd or epx_mem_alloc
 * memory (peers write them); every dispatch reads the row counts back to the host (a stream
 * synchronisation; num_recv_tokens is always filled), so a dispatch cannot be captured in a
 * CUDA graph: called while its stream is capturing it fails with EPX_ERR_INVALID_USAGE (the
 * other ranks with EPX_ERR_REMOTE_INVALID) and enqueues nothing anywhere. Cached dispatches
 * and combines never wait for the device and can be captured. Since each rank writes into
 * its peers' buffers, a rank whose copy or launch fails after the ranks agreed (an
 * EPX_ERR_CUDA of its own) does not tell them it finished: their waits time out
 * (EPX_TIMEOUT_MS) and report it, instead of their outputs silently missing its rows. The
 * context holds a staging buffer of (R - 1) * max_tokens_per_rank rows
 * (epx_moe_device_memory counts it). Low-latency mode and the backends across hosts ignore
 * it. */
#define EPX_MOE_COPY_ENGINES (-1)

#define EPX_MOE_MAX_TOPK 16
#define EPX_MOE_CONFIG_INITIALIZER                                                            \
    { sizeof(epx_moe_config_t), EPX_VERSION_CODE, 0, 0, 0, 0, EPX_BF16, EPX_UNSET, EPX_I64,   \
      EPX_MOE_HIGH_THROUGHPUT, 1, 0, EPX_SCALE_F32, EPX_UNSET }

typedef struct epx_moe *epx_moe_t;
/* The routing of one dispatch, reused by its combine and by cached dispatches. */
typedef struct epx_moe_handle *epx_moe_handle_t;

/* Collective: create the MoE context. Fails on every rank with EPX_ERR_MISMATCH when the
 * ranks' configurations differ; a rank whose own is invalid gets EPX_ERR_INVALID_ARGUMENT,
 * the others EPX_ERR_REMOTE_INVALID. */
EPX_API epx_status_t epx_moe_create(epx_comm_t comm, const epx_moe_config_t *cfg, epx_moe_t *moe);
/* Local. NULL is accepted. Handles of the context still alive are released with it: they
 * then hold nothing, and only epx_moe_handle_destroy accepts them (free them as usual).
 * EPX_ERR_INVALID_USAGE, and nothing destroyed, while one of them has a low-latency send
 * pending (unless the communicator is broken or gone). May come before or after the
 * communicator is destroyed or aborted; after that, every call on the context returns
 * EPX_ERR_ABORTED (destroying the communicator releases what the context held in it).
 * CUDA graphs that captured calls on the context use its device buffers: destroy them
 * first. */
EPX_API epx_status_t epx_moe_destroy(epx_moe_t moe);
/* Device memory the CUDA backend allocates per rank for a communicator of `nranks` and a
 * MoE context of `cfg` with one live dispatch handle, before the driver's rounding (each
 * further live handle adds what the estimate counts for one). No communicator needed.
 * EPX_ERR_UNSUPPORTED in builds without CUDA. It counts ranks of one host: across hosts
 * epx also allocates the network step's buffers (sized by the calls' traffic, grown and
 * kept), each handle's row plan and, in low-latency mode, 1 + hosts dispatch blocks of
 * max_tokens_per_rank records and 2 x hosts combine blocks of max_tokens_per_rank x max_topk
 * rows (docs/SCALING.md). */
EPX_API epx_status_t epx_moe_device_memory(const epx_moe_config_t *cfg, int nranks, int64_t *bytes);
/* Rows a high-throughput dispatch can receive at most: R * max_tokens_per_rank. */
EPX_API epx_status_t epx_moe_max_recv_tokens(epx_moe_t moe, int64_t *rows);

/* Local: the layout of this rank's routing. Any output may be NULL.
 * num_tokens_per_rank[R]: tokens with at least one expert on each rank (once per rank);
 * num_tokens_per_expert[E]: tokens routed to each expert (once per token);
 * is_token_in_rank[T, R]: 1 where the token goes to the rank, else 0.
 * Layouts of one context run one after the other (same stream, or ordered streams): they
 * share the context's scratch memory. On the CUDA backend nothing waits for the device
 * (capturable in a CUDA graph), so the
 * expert ids are checked on the device: if any is out of [-1, E), the call succeeds but
 * writes -1 to every count (is_token_in_rank is then undefined). On the CPU backend that
 * is EPX_ERR_INVALID_ARGUMENT, nothing written. */
EPX_API epx_status_t epx_moe_layout(epx_moe_t moe, const void *topk_idx, int num_tokens, int topk,
                                    int32_t *num_tokens_per_rank, int32_t *num_tokens_per_expert,
                                    uint8_t *is_token_in_rank, void *stream);

typedef struct {
    const void *x;            /* [T, H] cfg.dtype */
    const float *x_scales;    /* [T, ceil(H/128)] when dtype is FP8, else NULL */
    const void *topk_idx;     /* [T, K] cfg.index_dtype */
    const float *topk_weights; /* [T, K], may be NULL (then recv_topk_weights is not written) */
    int num_tokens;           /* T */
    int topk;                 /* K */
} epx_moe_dispatch_in_t;

typedef struct {
    void *recv_x;                   /* [capacity, H] cfg.dtype */
    float *recv_x_scales;           /* [capacity, ceil(H/128)] for FP8, else NULL */
    void *recv_topk_idx;            /* [capacity, K] local expert ids, -1 elsewhere; may be NULL */
    float *recv_topk_weights;       /* [capacity, K], 0 elsewhere; may be NULL */
    int32_t *recv_src_rank;         /* [capacity] source rank of each row; may be NULL */
    int32_t *recv_src_token;        /* [capacity] token index on the source rank; may be NULL */
    int32_t *num_recv_tokens_per_expert; /* [L] rows per local expert, aligned; may be NULL */
    int64_t capacity;               /* rows available in the row outputs */
    int64_t num_recv_tokens;        /* out: N, the rows received (-1 without host synchronisation) */
    int64_t *num_recv_tokens_device; /* [1] out: N in the backend's memory (device memory on CUDA,
                                        written in stream order), or NULL */
} epx_moe_dispatch_out_t;

/* High-throughput dispatch. On success *handle is a new handle holding the routing.
 *
 * Without host synchronisation: when every rank passes capacity >= epx_moe_max_recv_tokens
 * and a num_recv_tokens_device, the CUDA backend enqueues the whole dispatch without
 * waiting for the device, so it can be captured in a CUDA graph (combine and cached
 * dispatch never wait). num_recv_tokens is then -1 (so is epx_moe_handle_num_recv_tokens)
 * and N arrives in num_recv_tokens_device. The routing is then checked on the device, by
 * every rank for every rank: if any expert id is out of [-1, E), every rank writes -1 to
 * num_recv_tokens_device and nothing else, and combines and cached dispatches along that
 * handle write nothing. The CPU backend always synchronises (and fills both counts), and so
 * does a context on copy engines (EPX_MOE_COPY_ENGINES). */
EPX_API epx_status_t epx_moe_dispatch(epx_moe_t moe, const epx_moe_dispatch_in_t *in,
                                      epx_moe_dispatch_out_t *out, epx_moe_handle_t *handle, void *stream);

/* Dispatch new token data along the routing of `handle` (e.g. the backward pass of a
 * combine): in->x (and x_scales) only; topk fields are ignored, but in->num_tokens must be
 * the handle's T and out->capacity at least its row count (R * max_tokens_per_rank when
 * that count stayed on the device), else EPX_ERR_INVALID_ARGUMENT. Writes recv_x (and
 * recv_x_scales) in the same row order; other outputs (num_recv_tokens too) are left as
 * they are. */
EPX_API epx_status_t epx_moe_dispatch_cached(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_dispatch_in_t *in,
                                             epx_moe_dispatch_out_t *out, void *stream);

typedef struct {
    const void *y;             /* [N, H] cfg.combine_dtype, rows in recv_x order */
    const float *topk_weights; /* [N, K] to combine alongside, or NULL (same on every rank) */
} epx_moe_combine_in_t;

typedef struct {
    void *out;                 /* [T, H] cfg.combine_dtype */
    float *out_topk_weights;   /* [T, K] sum of the rows' weights (zeros when no rank passed
                                  topk_weights), or NULL */
} epx_moe_combine_out_t;

/* High-throughput combine along `handle` (see the ordering guarantee above). */
EPX_API epx_status_t epx_moe_combine(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_combine_in_t *in,
                                     epx_moe_combine_out_t *out, void *stream);

typedef struct {
    const void *x;        /* [T, H] cfg.dtype (bf16 when ll_fp8) */
    const void *topk_idx; /* [T, K] cfg.index_dtype */
    int num_tokens;       /* T <= max_tokens_per_rank */
    int topk;             /* K */
} epx_moe_ll_dispatch_in_t;

typedef struct {
    void *recv_x;           /* [L, R*max_tokens, H]: FP8 when ll_fp8, else cfg.dtype */
    void *recv_x_scales;    /* [L, R*max_tokens, ceil(H/128)] float or UE8M0 bytes (ll_fp8) */
    int32_t *recv_count;    /* [L] rows of each local expert */
    int32_t *recv_src_rank; /* [L, R*max_tokens] source rank of each slot, -1 past recv_count */
    int32_t *recv_src_token; /* [L, R*max_tokens] token on the source rank, -1 past recv_count */
} epx_moe_ll_dispatch_out_t;

/* Low-latency dispatch; *handle receives the slot of every (token, k). On the CUDA backend
 * nothing waits for the device (capturable in a CUDA graph), so expert ids are checked on
 * the device, by every rank for every rank: if any is out of [-1, E), every rank's call
 * succeeds but writes -1 to every recv_count and nothing else, and a combine along that
 * handle writes nothing (pass recv_count to see it). Other bad arguments fail as above. */
EPX_API epx_status_t epx_moe_ll_dispatch(epx_moe_t moe, const epx_moe_ll_dispatch_in_t *in,
                                         epx_moe_ll_dispatch_out_t *out, epx_moe_handle_t *handle, void *stream);

typedef struct {
    const void *y;             /* [L, R*max_tokens, H] cfg.combine_dtype expert outputs, slot layout of dispatch */
    const float *topk_weights; /* [T, K] */
} epx_moe_ll_combine_in_t;

/* Low-latency combine: out[T, H] in cfg.combine_dtype. Zero copy: y is read where it lies,
 * so an expert kernel that writes its output straight into y fills the communication
 * buffer itself; nothing is copied before the exchange. On the CUDA backend inside one
 * host each rank reads its own y and sends each token home once: the token's partial sum
 * over its experts there (float32), or the y row itself when it has one expert there.
 * Across hosts the local peers read y over NVLink: it must then be cudaMalloc'd or
 * epx_mem_alloc memory. */
EPX_API epx_status_t epx_moe_ll_combine(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_ll_combine_in_t *in,
                                        void *out, void *stream);

/* Low-latency in two halves, so that other work runs between them (on the CUDA backend no
 * SM waits for the peers meanwhile), and double buffering.
 *
 * epx_moe_ll_dispatch_send takes epx_moe_ll_dispatch's arguments, sends this rank's tokens
 * and returns the handle; epx_moe_ll_dispatch_recv(handle) then receives and writes the
 * outputs given to the send. epx_moe_ll_combine_send takes epx_moe_ll_combine's arguments
 * and makes y and the weights available to the peers (on one host the CUDA send pushes the
 * weights to them); epx_moe_ll_combine_recv(handle) exchanges the rows and writes out. y,
 * topk_weights and out must stay valid, y and topk_weights unchanged, until that receive
 * has completed (in stream order on CUDA). The outputs are complete once the receive has
 * completed; the results are those of the one-call versions. On the CPU
 * backends (and CUDA across hosts with EPX_MOE_LL_HOST=1) the send does all the work and
 * the receive only keeps the order. CUDA across hosts otherwise splits as on one host,
 * except that a combine's send only publishes y: its receive moves the rows (it needs
 * every local rank's y before anything can go home).
 *
 * Rules, per communicator (every rank makes the same calls in the same order): at most two
 * sends of each kind pending (sent, not yet received); receives in the order of their
 * sends; epx_moe_ll_dispatch / epx_moe_ll_combine only while no send of their kind is
 * pending; a combine only on a handle whose dispatch was received; a handle with a pending
 * send cannot be destroyed. A call that breaks a rule returns EPX_ERR_INVALID_USAGE (a send
 * fails on every rank, the others getting EPX_ERR_REMOTE_INVALID; a receive, a local call,
 * fails on the calling rank only) and changes nothing. All low-latency calls of a
 * communicator go on one stream (or each on a stream ordered after the previous one).
 * Receives are local calls (across GPU hosts a combine's receive also posts NCCL transfers),
 * but their place among the collective calls must be the same on every rank (else the ranks'
 * streams wait on each other until the timeout). A CUDA graph
 * holds each send together with its receive, or is replayed in the order it was captured.
 * A handle with a pending send may be destroyed once the communicator is broken. On one
 * host a dispatch send lets a kernel launched right after it with programmatic stream
 * serialization (CUDA's programmatic dependent launch) start while it runs: such a kernel
 * must call cudaGridDependencySynchronize before it writes what the send reads (in.x,
 * in.x_scales, in.topk_idx). */
EPX_API epx_status_t epx_moe_ll_dispatch_send(epx_moe_t moe, const epx_moe_ll_dispatch_in_t *in,
                                              epx_moe_ll_dispatch_out_t *out, epx_moe_handle_t *handle, void *stream);
EPX_API epx_status_t epx_moe_ll_dispatch_recv(epx_moe_t moe, epx_moe_handle_t handle, void *stream);
EPX_API epx_status_t epx_moe_ll_combine_send(epx_moe_t moe, epx_moe_handle_t handle, const epx_moe_ll_combine_in_t *in,
                                             void *out, void *stream);
EPX_API epx_status_t epx_moe_ll_combine_recv(epx_moe_t moe, epx_moe_handle_t handle, void *stream);

/* Free a handle (local). NULL is accepted. EPX_ERR_INVALID_USAGE while a low-latency send
 * on it is pending (unless the communicator is broken or gone). It counts as a use of the
 * handle's communicator (its MoE context keeps the handle's memory for the next one): not
 * while another thread is inside a call on that communicator. */
EPX_API epx_status_t epx_moe_handle_destroy(epx_moe_handle_t handle);

/* Rows received by the dispatch that made `handle` (host value; -1 when that dispatch ran
 * without host synchronisation, and for a low-latency handle: its counts are recv_count).
 * EPX_ERR_INVALID_USAGE once the handle's MoE context was destroyed. */
EPX_API epx_status_t epx_moe_handle_num_recv_tokens(epx_moe_handle_t handle, int64_t *rows);

/* ---- Element conversions (round to nearest even; FP8 saturates to +-448) ------------ */

EPX_API float epx_bf16_to_float(uint16_t v);
EPX_API uint16_t epx_float_to_bf16(float f);
EPX_API float epx_f16_to_float(uint16_t v);
EPX_API uint16_t epx_float_to_f16(float f);
EPX_API float epx_fp8_e4m3_to_float(uint8_t v);
EPX_API uint8_t epx_float_to_fp8_e4m3(float f);

#ifdef __cplusplus
}
#endif

#endif /* EPX_H */
