/*
 * Fault injection for tests of failure handling: EPX_FAULT names faults, each aimed at one
 * rank and one operation of a communicator.
 *
 *   EPX_FAULT="KIND:rank=R,step=N[,ms=M][,at=WHEN][;KIND:...]"   (at most EPX__FAULT_MAX entries)
 *
 *   delay  rank R sleeps M ms at the start of its N-th operation, before it posts anything;
 *   kill   rank R posts its N-th operation to the first half of its peers (rank R+1, R+2,
 *          ... ; at least one), then ends its process with _exit(EPX__FAULT_EXIT_CODE);
 *   count  rank R announces a wrong size in its N-th operation: alltoall(v) one more byte
 *          to rank R+1 than it sends; MoE dispatch an expert id past the last one (or
 *          num_tokens past max_tokens_per_rank when it has no token); other MoE calls a
 *          top-k one larger than the handle's;
 *   fail   rank R's device records a failure in its N-th operation (EPX_ERR_TIMEOUT, as a
 *          device wait that timed out would), after its host rounds: a kernel on the call's
 *          stream ahead of everything the call enqueues (at=enqueue, the only place it
 *          fires); it still moves everything, so only the failure relay tells its peers.
 *          CUDA across hosts only (src/xhost);
 *   nomem  rank R's N-th operation fails as if out of memory (EPX_ERR_NO_MEMORY) where it
 *          first allocates what the call needs, before it meets its peers: a MoE call's
 *          handle or row plan and work buffers; an alltoall(v)'s scratch for a disagreeing
 *          pair (the rank then receives its good peers' segments in place). CPU across
 *          hosts (src/hier), and CUDA on one host: the rank's first mapping of a peer's
 *          buffer in the call (CUDA IPC) fails as when every mapping slot is held; calls
 *          that map nothing (eager alltoall(v), low latency, the copy-engine combine)
 *          take no effect;
 *   slow   rank R pauses M ms after each piece of data it copies in its N-th operation
 *          (4 MiB at most, src/cpu's EPX__PIECE, or a batch of rows): a slow reader that
 *          keeps moving, which its peers must wait for past their timeout (a wait's clock
 *          restarts while the peer copies). CPU backend: on one host (src/cpu) as said;
 *          across hosts (src/hier, its steps counted by src/api) after each of its MPI
 *          requests that completes (collectives' too), not after its copies in the host.
 *
 * `at` (delay and kill; CUDA backends) says where in the operation: `host` (the default:
 * as above, in its host exchange), `mapped` (CUDA on one host: after the call's attempt to
 * map its peers' buffers, before the host round that agrees on it, which a mapping that
 * failed on one rank only must reach; epx_moe_create of a low-latency or copy-engine
 * context maps too; calls that map nothing never fire it), `enqueue`
 * (after its host exchanges, before it enqueues any kernel: the peers' device waits find
 * nothing) or, for kill, `launched` (after it enqueued its kernels, without waiting for
 * them). The CPU backend on one host fires
 * `host`, and `delay` and `kill` at `enqueue` once the rank holds every peer's post of the
 * operation (its own all made), before it reads anything: a slow reader (its peers may
 * finish first), or a rank gone while its peers read what it posted.
 *
 * On communicators across hosts, CPU (MPI, src/hier) and CUDA (NCCL, src/xhost), src/api
 * counts the steps and fires `host` entries where the call starts (epx__comm_fault_begin):
 * `delay` and `kill` before the call posts anything (it reaches no peer), and `count` as
 * src/hier or src/xhost announces it in its agreement (alltoall(v) as above, so the pair
 * fails with EPX_ERR_MISMATCH and, across GPU hosts, the others with EPX_ERR_REMOTE_INVALID;
 * every MoE call except epx_moe_create a top-k one larger, so every rank fails with
 * EPX_ERR_MISMATCH; across GPU hosts barrier announces no size and ignores `count`).
 * Across GPU hosts `at` works too (src/xhost's contract, xhost.h): `enqueue` after the
 * call's last bootstrap round, before it enqueues anything (barrier: after its round), and `launched`
 * as the call returns successfully, its work enqueued and not waited for. Across CPU hosts
 * only `host` fires.
 *
 * Steps count the operations of a communicator from 1: every collective call (barrier,
 * alltoall, alltoallv, alltoallv_device, epx_moe_create, each MoE call) is one step, on
 * every backend. Step 0 is the communicator's creation, and takes only `kill` (at host):
 * the rank ends its process once its shared memory on its host exists, before its peers
 * there have mapped it (epx__fault_creation). Each entry fires once
 * per process, on the first communicator that reaches its step, so that a test can build
 * a healthy communicator after the fault.
 *
 * Cost when unused: the text is parsed once at communicator creation into an
 * epx__fault_t; `armed` is false unless an entry aims at this rank, and the hooks test
 * only that (one predictable branch per operation and hook).
 */
#ifndef EPX_FAULT_H
#define EPX_FAULT_H

#include "core.h"

typedef enum {
    EPX__FAULT_DELAY = 1,
    EPX__FAULT_KILL = 2,
    EPX__FAULT_COUNT = 3,
    EPX__FAULT_FAIL = 4,
    EPX__FAULT_NOMEM = 5,
    EPX__FAULT_SLOW = 6
} epx__fault_kind_t;
/* Where in an operation a fault fires (`at`). */
typedef enum {
    EPX__FAULT_AT_HOST = 0,
    EPX__FAULT_AT_MAPPED = 1,
    EPX__FAULT_AT_ENQUEUE = 2,
    EPX__FAULT_AT_LAUNCHED = 3
} epx__fault_at_t;

#define EPX__FAULT_MAX 8
/* Exit status of a process ended by a `kill` fault. */
#define EPX__FAULT_EXIT_CODE 86

typedef struct {
    int kind;      /* epx__fault_kind_t */
    int index;     /* position in EPX_FAULT (fires once per process) */
    int rank;      /* the rank it aims at */
    uint32_t step; /* the operation it aims at, from 1 (0: the creation) */
    int ms;        /* delay */
    int at;        /* epx__fault_at_t */
} epx__fault_spec_t;

typedef struct {
    bool armed; /* an entry aims at this rank */
    int rank;
    int n;
    epx__fault_spec_t spec[EPX__FAULT_MAX];
    uint32_t slow_step; /* the operation a `slow` entry slows (once it fired), and by how much */
    int slow_ms;
} epx__fault_t;

/* Parse EPX_FAULT text ("" = no fault) for rank `rank`. EPX_ERR_INVALID_ARGUMENT, naming
 * the entry, when it does not parse. */
epx_status_t epx__fault_parse(const char *text, int rank, epx__fault_t *f, epx__errbuf_t *err);

/* The entry of `kind` aimed at operation `step` of this rank at `at`, if it has not fired
 * yet in this process: marks it fired, logs it and returns true. epx__fault_take: at host. */
bool epx__fault_take_at(const epx__fault_t *f, int kind, uint32_t step, int at, epx__fault_spec_t *out);
bool epx__fault_take(const epx__fault_t *f, int kind, uint32_t step, epx__fault_spec_t *out);
/* The same without marking it fired. */
bool epx__fault_due(const epx__fault_t *f, int kind, uint32_t step, int at, epx__fault_spec_t *out);

/* A `delay` at the start of operation `step` (at host) or at `at`: sleeps when one is due. */
void epx__fault_delay(const epx__fault_t *f, uint32_t step);
void epx__fault_delay_at(const epx__fault_t *f, uint32_t step, int at);

/* A `slow` entry: sleeps its ms when it aims at operation `step` (the first time marks it
 * fired; every later piece of the same operation sleeps too). */
void epx__fault_slow(epx__fault_t *f, uint32_t step);

/* Sleep ms milliseconds (a delay or a slow fault's pause), signals or not. */
void epx__fault_sleep_ms(int ms);

/* A `kill` aimed at step 0 (the communicator's creation): ends the process. src/cpu calls
 * it once its shared segment exists, before the peers have mapped it. f may be NULL. */
void epx__fault_creation(const epx__fault_t *f);

/* End the process as a `kill` fault does. */
_Noreturn void epx__fault_exit(const epx__fault_spec_t *spec, int posted, int peers);

#endif /* EPX_FAULT_H */
