/*
 * src/core: services every other layer may use — status and error messages, logging,
 * the tunables registry, clocks and deadlines, the TCP bootstrap. Nothing here knows
 * about communicators' backends; nothing here calls upward.
 */
#ifndef EPX_CORE_H
#define EPX_CORE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "convert.h"
#include "epx.h"

#define EPX__ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define EPX__MIN(a, b) ((a) < (b) ? (a) : (b))
#define EPX__MAX(a, b) ((a) > (b) ? (a) : (b))
#define EPX__ALIGN_UP(x, a) (((x) + ((a)-1)) / (a) * (a))
#define EPX__CACHELINE 64

/* Hot loops get an AVX2 clone next to the baseline one, picked at load time; loops of
 * integer work on every element (FP8 quantisation) an AVX-512 one too (x86-64-v4, GCC 11
 * and later). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define EPX__MULTIVERSION __attribute__((target_clones("avx2", "default")))
#if __GNUC__ >= 11
#define EPX__MULTIVERSION_V4 __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define EPX__MULTIVERSION_V4 EPX__MULTIVERSION
#endif
#else
#define EPX__MULTIVERSION
#define EPX__MULTIVERSION_V4
#endif

/* ---- Errors: a message buffer per communicator plus one per thread ---------------- */

#define EPX__ERRMSG_LEN 512
typedef struct {
    char msg[EPX__ERRMSG_LEN];
} epx__errbuf_t;

/* Format the message into `buf` (may be NULL) and the calling thread's buffer, log it
 * (WARN for system/peer errors, INFO for argument errors), and return `status`. */
epx_status_t epx__fail(epx__errbuf_t *buf, epx_status_t status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* epx__fail for a failure already reported (logged at INFO only). */
epx_status_t epx__fail_again(epx__errbuf_t *buf, epx_status_t status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Propagate: evaluate an epx_status_t expression, jump to `label` on error. */
#define EPX__CHECK_GOTO(expr, st, label)                                                   \
    do {                                                                                   \
        (st) = (expr);                                                                     \
        if ((st) < 0) goto label;                                                          \
    } while (0)
#define EPX__CHECK(expr)                                                                   \
    do {                                                                                   \
        epx_status_t epx__st_ = (expr);                                                    \
        if (epx__st_ < 0) return epx__st_;                                                 \
    } while (0)

/* ---- Logging ---------------------------------------------------------------------- */

typedef enum { EPX__LOG_NONE = 0, EPX__LOG_WARN = 1, EPX__LOG_INFO = 2, EPX__LOG_TRACE = 3 } epx__log_level_t;

#define EPX__SUBSYS_MAP(X)                                                                 \
    X(INIT, 0x1)                                                                           \
    X(BOOT, 0x2)                                                                           \
    X(SHM, 0x4)                                                                            \
    X(COLL, 0x8)                                                                           \
    X(MOE, 0x10)                                                                           \
    X(CUDA, 0x20)                                                                          \
    X(NET, 0x40)
typedef enum {
#define EPX__SUBSYS_ENUM_(name, bit) EPX__SUB_##name = bit,
    EPX__SUBSYS_MAP(EPX__SUBSYS_ENUM_)
#undef EPX__SUBSYS_ENUM_
} epx__subsys_t;

bool epx__log_enabled(epx__log_level_t level, epx__subsys_t subsys);
void epx__log(epx__log_level_t level, epx__subsys_t subsys, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Rank shown in log lines of this process (-1 = unknown). */
void epx__log_set_rank(int rank);

#define EPX__LOG_(lvl, sub, ...)                                                           \
    do {                                                                                   \
        if (epx__log_enabled(lvl, EPX__SUB_##sub)) epx__log(lvl, EPX__SUB_##sub, __VA_ARGS__); \
    } while (0)
#define EPX_WARN(sub, ...) EPX__LOG_(EPX__LOG_WARN, sub, __VA_ARGS__)
#define EPX_INFO(sub, ...) EPX__LOG_(EPX__LOG_INFO, sub, __VA_ARGS__)
#define EPX_TRACE(sub, ...) EPX__LOG_(EPX__LOG_TRACE, sub, __VA_ARGS__)

/* ---- Tunables: one table, read once ------------------------------------------------ */

/* X(id, env name, type, default, description). Types: INT, SIZE (K/M/G suffix), STR. */
#define EPX__PARAM_MAP(X)                                                                  \
    X(TIMEOUT_MS, "EPX_TIMEOUT_MS", INT, "300000",                                         \
      "bound in ms on every wait for a peer; past it the call fails with EPX_ERR_TIMEOUT") \
    X(DEBUG, "EPX_DEBUG", STR, "WARN", "log level: NONE, WARN, INFO or TRACE")             \
    X(DEBUG_SUBSYS, "EPX_DEBUG_SUBSYS", STR, "ALL",                                        \
      "log subsystems, comma separated: INIT,BOOT,SHM,COLL,MOE,CUDA,NET or ALL; ^X drops X") \
    X(DEBUG_FILE, "EPX_DEBUG_FILE", STR, "",                                               \
      "log to this file instead of stderr (%h = hostname, %p = pid)")                      \
    X(SOCKET_IFNAME, "EPX_SOCKET_IFNAME", STR, "lo",                                       \
      "network interface the bootstrap listens on (set it for several hosts)")             \
    X(LOCAL_SIZE, "EPX_LOCAL_SIZE", INT, "0",                                              \
      "ranks per host; 0 = group ranks by host (hostname and boot id); >0 simulates hosts "  \
      "of that many ranks")                                                                 \
    X(BACKEND, "EPX_BACKEND", STR, "auto", "backend: auto, cpu or cuda")                   \
    X(CPU_EAGER_BYTES, "EPX_CPU_EAGER_BYTES", SIZE, "16K",                                 \
      "CPU: messages up to this size per peer are copied through a preallocated slot")     \
    X(CPU_SPIN_US, "EPX_CPU_SPIN_US", INT, "50",                                           \
      "CPU: microseconds a wait polls its flag before it starts yielding the core")        \
    X(CPU_YIELD_MS, "EPX_CPU_YIELD_MS", INT, "20",                                         \
      "CPU: milliseconds a wait yields the core between polls before it sleeps on a futex") \
    X(CPU_CMA, "EPX_CPU_CMA", INT, "1",                                                    \
      "CPU: 1 = read unregistered send buffers with process_vm_readv; 0 = staging copy")   \
    X(CPU_F16C, "EPX_CPU_F16C", INT, "1",                                                  \
      "CPU: 1 = f16 sums convert with F16C where the CPU has it; 0 = portable code (same bits)") \
    X(CUDA_EAGER_BYTES, "EPX_CUDA_EAGER_BYTES", SIZE, "32K",                               \
      "CUDA: alltoallv with every pair at most this size runs as one kernel through slots") \
    X(CUDA_COPY_ENGINE_BYTES, "EPX_CUDA_COPY_ENGINE_BYTES", SIZE, "8M",                    \
      "CUDA: alltoallv with a pair above this size moves data with copy engines (no SMs)") \
    X(CUDA_SMS, "EPX_CUDA_SMS", INT, "24",                                                 \
      "CUDA: SMs (thread blocks) the MoE copy and reduce kernels use, unless cfg.num_sms; "  \
      "0 = move the MoE payload with copy engines (EPX_MOE_COPY_ENGINES)")                  \
    X(CUDA_CE_SMS, "EPX_CUDA_CE_SMS", INT, "32",                                           \
      "CUDA, MoE on copy engines: thread blocks of its local pack and reduce kernels")      \
    X(MOE_CHUNKS, "EPX_MOE_CHUNKS", INT, "0",                                              \
      "MoE across hosts: chunks of the network step, each forwarded inside the host while "  \
      "the next crosses (1-4; 0 = from the shape on GPUs with several per host, else 1); "   \
      "the same on every rank")                                                             \
    X(MOE_LL_HOST, "EPX_MOE_LL_HOST", INT, "-1",                                           \
      "MoE across GPU hosts, low latency: 1 = planned on the host (only the bytes needed, "  \
      "a wait on the host per call); 0 = on the device (fixed-size blocks, no host wait); "  \
      "-1 = on the device up to 4 hosts; the same on every rank")                          \
    X(FAULT, "EPX_FAULT", STR, "",                                                         \
      "tests: inject faults, KIND:rank=R,step=N[,ms=M][,at=WHEN];... with KIND delay, kill, " \
      "count, fail or nomem (src/core/fault.h)")                                                 \
    X(RANK, "EPX_RANK", INT, "-1", "this process's rank (set by epx-run)")                 \
    X(NRANKS, "EPX_NRANKS", INT, "0", "number of ranks (set by epx-run)")                  \
    X(UNIQUE_ID, "EPX_UNIQUE_ID", STR, "", "rendezvous id, text form (set by epx-run)")

typedef enum {
#define EPX__PARAM_ENUM_(id, env, type, def, desc) EPX__P_##id,
    EPX__PARAM_MAP(EPX__PARAM_ENUM_)
#undef EPX__PARAM_ENUM_
    EPX__P_COUNT
} epx__param_id_t;

int64_t epx__param_int(epx__param_id_t id);
const char *epx__param_str(epx__param_id_t id);
/* Every integer tunable a communicator reads lies in its range (param.c's table):
 * EPX_ERR_INVALID_ARGUMENT naming the first that does not, and its range. (A value that
 * does not parse was replaced by the default with a warning; EPX_TIMEOUT_MS, which
 * cfg.timeout_ms overrides, and epx-run's EPX_RANK / EPX_NRANKS are checked where used.) */
epx_status_t epx__params_check(void);
#define EPX__MOE_MAX_CHUNKS 4 /* EPX_MOE_CHUNKS's largest value (src/hier: the network step's) */
/* Parse "123", "64K", "1M", "2G" (binary multiples). false on garbage or overflow. */
bool epx__parse_size(const char *text, int64_t *out);

/* ---- Time -------------------------------------------------------------------------- */

uint64_t epx__now_ns(void);
/* The same clock read cheaply (a few ns): it lags epx__now_ns by up to one tick, a few ms
 * (CLOCK_MONOTONIC_COARSE), and never runs ahead of it. */
uint64_t epx__now_coarse_ns(void);
/* The coarse clock's tick (its resolution), read once per process. */
uint64_t epx__coarse_tick_ns(void);
/* Deadline `ms` from now (ms <= 0: already passed; too far to count in ns: UINT64_MAX). */
uint64_t epx__deadline_after_ms(int64_t ms);
/* ms in ns: 0 for ms <= 0, UINT64_MAX when it does not fit (a huge EPX_TIMEOUT_MS: never). */
uint64_t epx__ms_to_ns(int64_t ms);

/* ---- Arenas (arena.c) ---------------------------------------------------------------- */

/* Memory that lives and dies together (a MoE handle's arrays), carved from one block with
 * a bump pointer. Reset, the arena keeps its memory, so the next object made in it neither
 * allocates nor faults pages in: with per-call malloc and free the C library trims the
 * heap and every call pays for its pages again. It never shrinks: it holds what its largest
 * use took until it is freed. A zeroed struct is an empty arena. */
typedef struct epx__arena_blk epx__arena_blk_t;
typedef struct {
    epx__arena_blk_t *blk; /* current block first; more than one until the next reset */
    size_t want;           /* bytes the next first block gets (all that the last use took) */
} epx__arena_t;
/* n elements of `size` bytes, 64-byte aligned, contents undefined (zeroed with `zero`);
 * NULL when out of memory or n * size overflows. n = 0 gives a valid pointer. */
void *epx__arena_alloc(epx__arena_t *a, size_t n, size_t size, bool zero);
/* Every allocation is released; the memory stays (in one block of their total from the
 * next use on, when it took several). */
void epx__arena_reset(epx__arena_t *a);
void epx__arena_free(epx__arena_t *a);
/* The capacity of a reset arena (what the next use can take without allocating). */
size_t epx__arena_capacity(const epx__arena_t *a);
/* The bytes epx__arena_alloc(a, n, size, ...) takes (SIZE_MAX when that overflows). */
size_t epx__arena_need(size_t n, size_t size);
/* *bytes += epx__arena_need(n, size), saturating at SIZE_MAX. */
void epx__arena_need_add(size_t *bytes, size_t n, size_t size);
/* Room for allocations that take `bytes` in all (the sum of their epx__arena_need): true
 * when the next ones, up to that sum, will not allocate (they cannot fail); false when out
 * of memory. What the arena holds is unchanged. */
bool epx__arena_reserve(epx__arena_t *a, size_t bytes);

/* ---- Misc ------------------------------------------------------------------------ */

uint64_t epx__hash64(const void *data, size_t len, uint64_t seed);
/* Random 64-bit value from the OS. */
uint64_t epx__random64(void);

/* ---- Element types and conversions (dtype.c) ------------------------------------------ */

#define EPX__FP8_BLOCK 128
#define EPX__FP8_MAX 448.0f
/* Quantise one bf16 row of H channels to FP8 e4m3 with one scale per 128 channels:
 * amax = max |x| over the block (at least 1e-4); EPX_SCALE_F32: scale = amax / 448,
 * q = e4m3(x * (448 / amax)); EPX_SCALE_UE8M0: scale = the smallest power of two
 * >= amax / 448, stored as its biased exponent byte, q = e4m3(x / scale).
 * Every operation is a single IEEE float32 operation, so other backends can match bits.
 * x and q do not overlap. */
void epx__fp8_quantize_row(const uint16_t *restrict x, int hidden, int scale_format, uint8_t *restrict q,
                           void *scales);

/* ---- Routing (routing.c) ------------------------------------------------------------- */

/* topk_idx entry (t, k) as int64, for index dtype EPX_I32 or EPX_I64. */
static inline int64_t epx__topk_at(const void *topk_idx, epx_dtype_t index_dtype, int64_t t, int topk, int k)
{
    return index_dtype == EPX_I32 ? ((const int32_t *)topk_idx)[t * topk + k]
                                  : ((const int64_t *)topk_idx)[t * topk + k];
}

/* Check every entry is in [-1, num_experts); on failure name the first bad (t, k). */
epx_status_t epx__topk_validate(const void *topk_idx, epx_dtype_t index_dtype, int num_tokens, int topk,
                                int num_experts, epx__errbuf_t *err);

/* Convert topk to int32 (validated input). */
void epx__topk_to_i32(const void *topk_idx, epx_dtype_t index_dtype, int num_tokens, int topk, int32_t *out);

/* Low-latency dispatch outputs: the slots of local expert l from `filled` on (of `slots`)
 * hold no row, so their sources are -1 (either array may be NULL; a memset each). */
void epx__ll_slots_unfilled(int32_t *src_rank, int32_t *src_token, size_t slots, int l, size_t filled);

/* The ranks a token with K expert ids tk (-1: none) goes to, ascending, each once, into
 * ranks[K]; returns how many. rank_of_expert[e] is expert e's rank of nranks. (Up to 64
 * ranks from a bit set, above that by insertion: test_hier_chunks checks both.) */
int epx__topk_ranks(const int32_t *tk, int K, const int32_t *rank_of_expert, int nranks, int *ranks);

/* Layout of validated routing: tokens per rank (once per rank), tokens per expert (once
 * per token), is_token_in_rank[T, R]. Any output may be NULL. O(T * K). */
epx_status_t epx__layout(const void *topk, epx_dtype_t index_dtype, int num_tokens, int topk_k, int num_experts,
                         int nranks, int32_t *per_rank, int32_t *per_expert, uint8_t *in_rank);

/* A validated MoE configuration, as the backends see it. */
typedef struct {
    int nranks, rank;
    int hidden, max_tokens, num_experts, local_experts, max_topk;
    epx_dtype_t dtype, combine_dtype, index_dtype;
    int mode, alignment, ll_fp8, scale_format;
    size_t row_bytes;         /* hidden * size(dtype) */
    size_t scale_cols;        /* ceil(hidden / 128) */
    size_t combine_row_bytes; /* hidden * size(combine_dtype) */
    size_t ll_slots;          /* nranks * max_tokens: slots per local expert (low latency) */
    int num_sms;              /* GPU SM budget (> 0); 0: EPX_CUDA_SMS; EPX_MOE_COPY_ENGINES */
} epx__moe_shape_t;

/* ---- Bootstrap: rendezvous over TCP, then a star of sockets around rank 0 ------------ */

typedef struct epx__boot epx__boot_t;

/* Start the rendezvous listener thread and fill `id`. */
epx_status_t epx__boot_create_id(epx_unique_id_t *id, epx__errbuf_t *err);

/* Collective: meet the other ranks through the listener named by `id`. Each rank gives
 * `info` (info_len bytes, the same length on all ranks); on success `all_info` holds
 * nranks * info_len bytes, rank-major. */
epx_status_t epx__boot_init(epx__boot_t **boot, int nranks, int rank, const epx_unique_id_t *id,
                            const void *info, size_t info_len, void *all_info, int64_t timeout_ms,
                            epx__errbuf_t *err);

/* Collective over the star: everyone gets everyone's `len` bytes (rank-major). */
epx_status_t epx__boot_allgather(epx__boot_t *boot, const void *mine, void *all, size_t len,
                                 epx__errbuf_t *err);
/* Take part in an allgather of `len`-byte parts without its buffers (after this rank failed
 * to allocate them): my part is `head` (head_len bytes, a status first) then zeros; what
 * arrives is dropped. The round completes on every rank, which see the failure instead of
 * timing out. The caller returns its own failure. */
epx_status_t epx__boot_allgather_fail(epx__boot_t *boot, const void *head, size_t head_len, size_t len,
                                      epx__errbuf_t *err);
/* Collective over the star: block q of my `send` (R blocks of `len` bytes) arrives as block
 * `rank` of rank q's `recv` (send and recv must not overlap). Moves 2 * R * len bytes per
 * rank and 2 * R * (R - 1) * len at rank 0, which holds the R x R blocks while it relays
 * them. When it cannot allocate them, the round still completes: rank 0 returns
 * EPX_ERR_NO_MEMORY, every other rank EPX_ERR_REMOTE_INVALID, and no recv is written. */
epx_status_t epx__boot_alltoall(epx__boot_t *boot, const void *send, void *recv, size_t len, epx__errbuf_t *err);
/* Take part in an alltoall of `len`-byte blocks without its buffers (after this rank failed,
 * e.g. to allocate them): every block I send is `head` (head_len bytes, a status first) then
 * zeros; what arrives is dropped. When rank 0 fails so, every other rank's blocks but its
 * first are zeros. The round completes on every rank. The caller returns its own failure. */
epx_status_t epx__boot_alltoall_fail(epx__boot_t *boot, const void *head, size_t head_len, size_t len,
                                     epx__errbuf_t *err);
/* Collective over the star: v[0..n) summed over every rank, in place (wrapping int64).
 * Allocates nothing; moves 2 * nranks * n * 8 bytes in all. */
epx_status_t epx__boot_allreduce_sum(epx__boot_t *boot, int64_t *v, size_t n, epx__errbuf_t *err);
epx_status_t epx__boot_barrier(epx__boot_t *boot, epx__errbuf_t *err);
void epx__boot_close(epx__boot_t *boot);

/* Direct links from this rank to some others (a rail across hosts): rounds between them
 * that do not pass through rank 0's star. */
typedef struct epx__boot_links epx__boot_links_t;
/* Collective over `boot` (every rank calls it, each naming its own n peers, distinct ranks;
 * p names q exactly when q names p): a TCP connection to each. */
epx_status_t epx__boot_links_create(epx__boot_t *boot, const int *peers, int n, epx__boot_links_t **links,
                                    epx__errbuf_t *err);
/* One round with every linked peer i (all at once, full duplex): `status` and, when it is
 * EPX_SUCCESS, `len` bytes of send[i] go to it; its status and, when a success, `len` bytes
 * into recv[i] (recv NULL: dropped) come from it. Returns a transport failure
 * (EPX_ERR_PEER_FAILURE: a link closed; EPX_ERR_TIMEOUT at EPX_TIMEOUT_MS; the links are
 * then shut down, so the peers and later rounds fail at once), else, for a peer whose status
 * was a failure, EPX_ERR_PEER_FAILURE (its status was a peer failure or a timeout: the round
 * broke there) or EPX_ERR_REMOTE_INVALID (any other), else EPX_SUCCESS. Never its own
 * `status`. */
epx_status_t epx__boot_links_xchg(epx__boot_links_t *links, epx_status_t status, const void *const *send,
                                  void *const *recv, size_t len, epx__errbuf_t *err);
/* Local, non-blocking (one poll and at most a peek per link: cheap enough for every
 * millisecond of a wait): EPX_ERR_PEER_FAILURE, naming the peer, when a linked peer closed its
 * end (it failed or its process ended) or a link has a socket error; else EPX_SUCCESS. Reads
 * nothing a later round needs. NULL links: EPX_SUCCESS. */
epx_status_t epx__boot_links_watch(epx__boot_links_t *links, epx__errbuf_t *err);
/* Local. The peers' rounds and watches then fail at once (EPX_ERR_PEER_FAILURE): a rank that
 * fails while its peers wait on it elsewhere closes its links to tell them. NULL accepted. */
void epx__boot_links_close(epx__boot_links_t *links);

/* Parse/format the id's text form; both validate every field. */
epx_status_t epx__id_parse(const char *text, epx_unique_id_t *id);
epx_status_t epx__id_format(const epx_unique_id_t *id, char *buf, size_t len);
/* The id's nonce, used to name this communicator's shared objects. */
uint64_t epx__id_nonce(const epx_unique_id_t *id);

#endif /* EPX_CORE_H */
