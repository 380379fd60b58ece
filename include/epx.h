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
 * usable; EPX_ERR_TIMEOUT, EPX_ERR_PEER_FAILURE and EPX_ERR_ABORTED mean the communicator
 * is broken: destroy (or abort) it and create a new one. The detailed message of the last
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
    EPX_BACKEND_AUTO = 0, /* CUDA when the comm is given a device and CUDA is built, else CPU */
    EPX_BACKEND_CPU = 1,
    EPX_BACKEND_CUDA = 2
} epx_backend_t;

/* Communicator configuration. Always start from EPX_CONFIG_INITIALIZER, then set fields:
 * new fields are appended in later versions and `size`/`version` let the library tell. */
typedef struct {
    size_t size;          /* sizeof(epx_config_t), set by the initializer */
    int version;          /* EPX_VERSION_CODE, set by the initializer */
    int backend;          /* epx_backend_t, or EPX_UNSET (EPX_BACKEND) */
    int timeout_ms;       /* bound on every wait for a peer, or EPX_UNSET (EPX_TIMEOUT_MS) */
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
 * EPX_ERR_MISMATCH when the ranks' configurations differ. cfg may be NULL (defaults). */
EPX_API epx_status_t epx_comm_init_rank(epx_comm_t *comm, int nranks, int rank, const epx_unique_id_t *id,
                                const epx_config_t *cfg);

/* Like epx_comm_init_rank, with EPX_RANK, EPX_NRANKS and EPX_UNIQUE_ID from the environment
 * (set by epx-run). */
EPX_API epx_status_t epx_comm_init_from_env(epx_comm_t *comm, const epx_config_t *cfg);

/* Release a communicator. Local: does not wait for other ranks. NULL is accepted. */
EPX_API epx_status_t epx_comm_destroy(epx_comm_t comm);

/* Mark the communicator aborted (peers waiting on this rank fail promptly with
 * EPX_ERR_PEER_FAILURE) and release it. Safe after any error. NULL is accepted. */
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

/* EPX_SUCCESS while the communicator is healthy; else the error that broke it. */
EPX_API epx_status_t epx_comm_get_async_error(epx_comm_t comm, epx_status_t *async_error);

/* ---- Registered memory ----------------------------------------------------------- */

/* Allocate memory that peers of this host can read directly (POSIX shared memory on the
 * CPU backend). Buffers passed as `send` that lie in such memory are copied once, straight
 * into the receivers' buffers; other buffers go through a staging copy. Local call.
 * Aligned to 4096 bytes. */
EPX_API epx_status_t epx_mem_alloc(epx_comm_t comm, size_t bytes, void **ptr);
EPX_API epx_status_t epx_mem_free(epx_comm_t comm, void *ptr);

/* ---- Collectives ----------------------------------------------------------------- */

/* `stream` is NULL on the CPU backend and a cudaStream_t on the CUDA backend. */

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
 * before anything is written. */
EPX_API epx_status_t epx_alltoallv(epx_comm_t comm, const void *send, const int64_t *sendcounts,
                           const int64_t *sdispls, void *recv, const int64_t *recvcounts,
                           const int64_t *rdispls, epx_dtype_t dtype, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* EPX_H */
