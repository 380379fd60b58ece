/*
 * CPU backend: segments, flags and waits, registered regions, reads of peer memory.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "shm.h"

/* ---- Layout ----------------------------------------------------------------------- */

static size_t epx__hdr_bytes(void) { return EPX__ALIGN_UP(sizeof(epx__seg_hdr_t), EPX__CACHELINE); }
static size_t epx__op_block_bytes(int nranks) { return (size_t)nranks * sizeof(epx__desc_t); }

epx__desc_t *epx__seg_desc(void *seg, int nranks, uint32_t seq, int peer)
{
    return (epx__desc_t *)((char *)seg + epx__hdr_bytes() + (seq & 1u) * epx__op_block_bytes(nranks)) + peer;
}

char *epx__seg_eager(void *seg, int nranks, size_t eager_bytes, uint32_t seq, int peer)
{
    size_t base = epx__hdr_bytes() + 2 * epx__op_block_bytes(nranks);
    return (char *)seg + base + ((size_t)(seq & 1u) * (size_t)nranks + (size_t)peer) * eager_bytes;
}

static size_t epx__seg_size(int nranks, size_t eager_bytes)
{
    size_t b = epx__hdr_bytes() + 2 * epx__op_block_bytes(nranks) + 2 * (size_t)nranks * eager_bytes;
    return EPX__ALIGN_UP(b, 4096);
}

/* The segment of `rank`, made by process `pid` of pid namespace `pidns`: like a region's
 * name, it says whose it is, for epx__sweep_dead_names. */
static void epx__seg_name(char *buf, size_t len, uint64_t nonce, int rank, int32_t pid, uint64_t pidns)
{
    snprintf(buf, len, "/epx-%016" PRIx64 "-%d-seg-%d.%" PRIu64, nonce, rank, (int)pid, pidns);
}

/* Region `id` of `rank`, whose segment header is `owner`: the name carries its creator's pid
 * and pid namespace, so that once the creator is gone any epx process there can tell
 * (epx__sweep_dead_names). */
static void epx__region_name(char *buf, size_t len, uint64_t nonce, int rank, const epx__seg_hdr_t *owner, uint32_t id)
{
    snprintf(buf, len, "/epx-%016" PRIx64 "-%d-m%u-%d.%" PRIu64, nonce, rank, id, (int)owner->pid, owner->pidns);
}

/* This process's pid namespace (the inode of /proc/self/ns/pid), or 0 when unknown. */
static uint64_t epx__pidns(void)
{
    struct stat st;
    return stat("/proc/self/ns/pid", &st) == 0 ? (uint64_t)st.st_ino : 0;
}

/* ---- Flags ------------------------------------------------------------------------ */

static long epx__futex(_Atomic uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, (uint32_t *)addr, op, val, ts, NULL, 0);
}

void epx__flag_post(epx__flag_t *flag, uint32_t value)
{
    atomic_store_explicit(&flag->value, value, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&flag->waiters, memory_order_relaxed))
        epx__futex(&flag->value, FUTEX_WAKE, INT_MAX, NULL);
}

/* Is the process `pid` gone (or a zombie)? */
static bool epx__pid_dead(int pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT || errno == ESRCH;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return true;
    buf[n] = '\0';
    char *paren = strrchr(buf, ')');
    if (!paren || paren[1] != ' ') return false;
    return paren[2] == 'Z' || paren[2] == 'X';
}

/* The creator's pid and pid namespace of an epx segment or region name (without the
 * leading '/'); false for any other name. */
static bool epx__name_owner(const char *name, int *pid, unsigned long long *pidns)
{
    unsigned long long nonce;
    int rank, used = 0;
    unsigned id;
    if (strncmp(name, "epx-", 4) != 0) return false;
    if (sscanf(name, "epx-%16llx-%d-m%u-%d.%llu%n", &nonce, &rank, &id, pid, pidns, &used) == 5 && name[used] == '\0')
        return true;
    used = 0;
    return sscanf(name, "epx-%16llx-%d-seg-%d.%llu%n", &nonce, &rank, pid, pidns, &used) == 4 && name[used] == '\0';
}

/* Remove the names starting with `prefix` (only segments' with `segs_only`) whose creator,
 * a process of this pid namespace other than this one, is gone. Returns how many such names
 * have a live creator (left alone); -1 when dead processes cannot be told (no /proc). */
static int epx__unlink_dead_names(const char *prefix, bool segs_only)
{
    uint64_t ns = epx__pidns();
    DIR *d = ns ? opendir("/dev/shm") : NULL;
    if (!d) return -1;
    int alive = 0;
    for (struct dirent *e; (e = readdir(d));) {
        unsigned long long their_ns;
        int pid;
        if (strncmp(e->d_name, prefix, strlen(prefix)) != 0 || (segs_only && !strstr(e->d_name, "-seg-")) ||
            !epx__name_owner(e->d_name, &pid, &their_ns) || their_ns != ns || pid <= 0 || pid == (int)getpid())
            continue;
        if (!epx__pid_dead(pid)) {
            alive++;
            continue;
        }
        char name[300];
        snprintf(name, sizeof name, "/%s", e->d_name);
        shm_unlink(name);
    }
    closedir(d);
    return alive;
}

/* Once a process: remove the segment and region names whose creator is gone (every rank of
 * its communicator was killed, so none could). Names of other namespaces, of live
 * processes, and names of another form are left alone. */
static void epx__sweep_dead_names(void) { (void)epx__unlink_dead_names("epx-", false); }

/* Has `peer` failed (aborted, or its process is gone)? Checked while waiting on it, the
 * process at most every 2 ms. Returns the status and says why in `why`; logs nothing. */
static epx_status_t epx__peer_state(epx__cpu_t *c, int peer, char *why, size_t len)
{
    epx__peer_t *p = &c->peers[peer];
    uint32_t a = atomic_load_explicit(&p->hdr->aborted.value, memory_order_acquire);
    if (a) {
        snprintf(why, len, a == EPX__BROKEN ? "rank %d gave up on the communicator (a failure or timeout there)"
                                            : "rank %d aborted its communicator",
                 epx__rank_name(c, peer));
        return EPX_ERR_PEER_FAILURE;
    }
    uint64_t now = epx__now_ns();
    if (now - p->liveness_check_ns > 2000000ull) {
        p->liveness_check_ns = now;
        if (epx__pid_dead(p->hdr->pid)) {
            snprintf(why, len, "rank %d (pid %d) died", epx__rank_name(c, peer), p->hdr->pid);
            return EPX_ERR_PEER_FAILURE;
        }
    }
    return EPX_SUCCESS;
}

static inline void epx__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* How long a wait that would time out on a peer that is itself waiting (waiting_on) gives
 * it first: both clocks may end at once when this rank's last sign of progress from it was
 * relayed, and then its own verdict (it gives up, naming the rank it waited for) should
 * reach this rank before this rank blames it. Twenty polls (room for a loaded machine). */
#define EPX__WAITING_GRACE_NS 100000000ull

/* The timeout of a wait for `peer`'s `what` of operation `target`: its last operation was
 * `theirs`; `on` >= 0: it was itself waiting for that rank. */
static epx_status_t epx__wait_timed_out(const epx__cpu_t *c, int peer, const char *what, uint32_t target,
                                        uint32_t theirs, int on, epx__errbuf_t *err)
{
    char also[48] = "";
    if (on >= 0) snprintf(also, sizeof also, "; it was waiting for rank %d", epx__rank_name(c, on));
    const char *op = epx__op_word(c);
    return epx__fail(err, EPX_ERR_TIMEOUT,
                     "rank %d timed out waiting for rank %d's %s of %s %u: no progress from it for %" PRId64
                     " ms (its last: %s %u%s)",
                     epx__rank_name(c, c->rank), epx__rank_name(c, peer), what, op, target, c->timeout_ms, op, theirs,
                     also);
}

/* epx__flag_wait past its spin, from `start` (see there). */
static epx_status_t epx__flag_wait_slow(epx__cpu_t *c, int peer, epx__flag_t *flag, const epx__flag_t *twin,
                                        uint32_t target, uint64_t start, const char *what, epx__errbuf_t *err)
{
    const epx__seg_hdr_t *ph = c->peers[peer].hdr;
    _Atomic uint64_t *mine = &((epx__seg_hdr_t *)c->seg)->alive_ns;
    /* A stamp may be up to one tick of the coarse clock late. */
    const uint64_t timeout = epx__ms_to_ns(c->timeout_ms), tick = epx__coarse_tick_ns();
    const uint64_t window = timeout > UINT64_MAX - tick ? UINT64_MAX : timeout + tick;
    uint64_t last = start; /* the latest sign of progress from the peer */
    uint64_t grace_end = 0; /* set once: when the peer, itself waiting, has had its grace */
    for (;;) {
        uint32_t v = atomic_load_explicit(&flag->value, memory_order_acquire);
        if (epx__seq_geq(v, target)) return EPX_SUCCESS;
        char why[128];
        epx_status_t ps = epx__peer_state(c, peer, why, sizeof why);
        if (ps != EPX_SUCCESS) {
            /* It may have posted just before it went away. */
            if (epx__seq_geq(atomic_load_explicit(&flag->value, memory_order_acquire), target)) return EPX_SUCCESS;
            return epx__fail(err, ps, "%s while rank %d waited for its %s of %s %u", why, epx__rank_name(c, c->rank),
                             what, epx__op_word(c), target);
        }
        uint64_t alive = atomic_load_explicit(&ph->alive_ns, memory_order_relaxed);
        uint64_t now = epx__now_ns(); /* read after alive, so normally alive <= now */
        /* A time past now + window (a peer in another time namespace) is no sign of progress:
         * whatever the peer writes, this wait stays bounded. */
        if (alive > last && (alive <= now || alive - now <= window)) {
            last = alive; /* it moved since: maybe slow, not stalled; and so am I to those waiting on me */
            if (alive > atomic_load_explicit(mine, memory_order_relaxed))
                atomic_store_explicit(mine, alive, memory_order_relaxed);
        } else if (now > last && now - last >= window) {
            int32_t on = atomic_load_explicit(&ph->waiting_on, memory_order_relaxed) - 1;
            if (on >= 0 && !grace_end) grace_end = now + EPX__WAITING_GRACE_NS; /* it may be about to give up */
            if (on < 0 || now >= grace_end) {
                uint32_t w = twin ? atomic_load_explicit(&twin->value, memory_order_acquire) : v;
                return epx__wait_timed_out(c, peer, what, target, epx__seq_geq(w, v) ? w : v, on, err);
            }
        }
        if (now - start < c->spin_ns + c->yield_ns) {
            sched_yield();
            continue;
        }
        /* Sleep until the peer posts (it wakes us) or 5 ms pass (to re-check liveness). */
        atomic_fetch_add_explicit(&flag->waiters, 1, memory_order_seq_cst);
        v = atomic_load_explicit(&flag->value, memory_order_seq_cst);
        if (!epx__seq_geq(v, target)) {
            struct timespec ts = {0, 5000000};
            epx__futex(&flag->value, FUTEX_WAIT, v, &ts);
        }
        atomic_fetch_sub_explicit(&flag->waiters, 1, memory_order_relaxed);
    }
}

epx_status_t epx__flag_wait(epx__cpu_t *c, int peer, epx__flag_t *flag, const epx__flag_t *twin, uint32_t target,
                            const char *what, epx__errbuf_t *err)
{
    /* Poll (fast path), then poll and yield the core, then sleep on the futex. */
    for (int i = 0; i < 64; i++) {
        if (epx__seq_geq(atomic_load_explicit(&flag->value, memory_order_acquire), target))
            return EPX_SUCCESS;
        epx__cpu_relax();
    }
    const uint64_t start = epx__now_ns();
    for (unsigned i = 0;; i++) {
        if (epx__seq_geq(atomic_load_explicit(&flag->value, memory_order_acquire), target))
            return EPX_SUCCESS;
        epx__cpu_relax();
        if ((i & 63) == 0 && epx__now_ns() - start >= c->spin_ns) break;
    }
    /* Only from here on the header lines the peers read while they wait (the spin above
     * stays off them). */
    _Atomic int32_t *on = &((epx__seg_hdr_t *)c->seg)->waiting_on;
    atomic_store_explicit(on, peer + 1, memory_order_relaxed);
    epx_status_t st = epx__flag_wait_slow(c, peer, flag, twin, target, start, what, err);
    atomic_store_explicit(on, 0, memory_order_relaxed);
    return st;
}

/* Remove the names of freed regions that no peer can still be about to open: every peer
 * has posted operation `seq`, so it is done with every earlier one. */
static void epx__unlink_retired(epx__cpu_t *c, uint32_t seq, bool all)
{
    char name[96];
    for (int i = 0; i < c->num_retired;) {
        if (all || !epx__seq_geq(c->retired[i].seq, seq)) {
            epx__region_name(name, sizeof name, c->nonce, c->rank, c->seg, c->retired[i].id);
            shm_unlink(name);
            c->retired[i] = c->retired[--c->num_retired];
        } else {
            i++;
        }
    }
}

/* EPX_FAULT at=enqueue, once every post of operation `seq` is here and nothing is read:
 * a delay (a slow reader), or a kill (a rank gone with everything posted). */
static void epx__fault_before_reads(epx__cpu_t *c, uint32_t seq)
{
    epx__fault_delay_at(&c->fault, seq, EPX__FAULT_AT_ENQUEUE);
    epx__fault_spec_t f;
    if (epx__fault_take_at(&c->fault, EPX__FAULT_KILL, seq, EPX__FAULT_AT_ENQUEUE, &f))
        epx__fault_exit(&f, c->nranks - 1, c->nranks - 1);
}

static epx_status_t epx__cpu_give_up(epx__cpu_t *c, epx_status_t st);

epx_status_t epx__cpu_given_up(epx__cpu_t *c, epx__errbuf_t *err)
{
    if (c->gave_up == EPX_SUCCESS) return EPX_SUCCESS;
    return epx__fail_again(err, c->gave_up, "%s (this rank then gave up on the communicator)", c->gave_up_why);
}

epx_status_t epx__wait_posts(epx__cpu_t *c, uint32_t seq, epx__errbuf_t *err)
{
    for (int i = 1; i < c->nranks; i++) {
        int peer = (c->rank + i) % c->nranks;
        epx__desc_t *d = epx__seg_desc(c->peers[peer].hdr, c->nranks, seq, c->rank);
        const epx__desc_t *twin = epx__seg_desc(c->peers[peer].hdr, c->nranks, seq + 1, c->rank); /* other parity */
        epx_status_t st = epx__flag_wait(c, peer, &d->post, &twin->post, seq, "arrival", err);
        if (st != EPX_SUCCESS) return epx__cpu_give_up(c, st);
    }
    if (c->num_retired) epx__unlink_retired(c, seq, false);
    if (__builtin_expect(c->fault.armed, 0)) epx__fault_before_reads(c, seq);
    epx_status_t st = epx__peers_check(c, seq, err);
    return st == EPX_SUCCESS ? st : epx__cpu_give_up(c, st);
}

epx_status_t epx__wait_dones(epx__cpu_t *c, uint32_t seq, epx__errbuf_t *err)
{
    for (int i = 1; i < c->nranks; i++) {
        int peer = (c->rank + i) % c->nranks;
        EPX__CHECK(epx__flag_wait(c, peer, &c->peers[peer].hdr->done, NULL, seq, "completion", err));
    }
    return EPX_SUCCESS;
}

/* ---- Create / destroy --------------------------------------------------------------- */

static epx_status_t epx__map_shm(const char *name, size_t bytes, bool create, int prot, void **out,
                                 epx__errbuf_t *err)
{
    int fd = shm_open(name, create ? (O_CREAT | O_EXCL | O_RDWR) : (prot & PROT_WRITE ? O_RDWR : O_RDONLY),
                      0600);
    if (fd < 0) return epx__fail(err, EPX_ERR_SYSTEM, "shm_open %s: %s", name, strerror(errno));
    /* The pages reserved now (tmpfs allocates them), not at first touch: a /dev/shm too
     * small for them fails here with a status, not later with SIGBUS. */
    int e = create ? posix_fallocate(fd, 0, (off_t)bytes) : 0;
    if (e != 0) {
        close(fd);
        shm_unlink(name);
        return epx__fail(err, EPX_ERR_NO_MEMORY, "reserving %zu bytes of shared memory for %s: %s (is /dev/shm large enough?)",
                         bytes, name, strerror(e));
    }
    void *p = mmap(NULL, bytes, prot, MAP_SHARED, fd, 0);
    e = errno;
    close(fd);
    if (p == MAP_FAILED) {
        if (create) shm_unlink(name);
        return epx__fail(err, EPX_ERR_NO_MEMORY, "mmap %s (%zu bytes): %s", name, bytes, strerror(e));
    }
    *out = p;
    return EPX_SUCCESS;
}

/* Remove the names of regions 1 .. hdr->regions_named of `rank` (ENOENT for those already
 * gone). Region names left behind would hold their memory in /dev/shm until the machine
 * restarts. */
static void epx__unlink_region_names(uint64_t nonce, int rank, const epx__seg_hdr_t *hdr)
{
    uint32_t n = atomic_load_explicit(&hdr->regions_named, memory_order_relaxed);
    char name[96];
    for (uint32_t id = 1; id <= n; id++) {
        epx__region_name(name, sizeof name, nonce, rank, hdr, id);
        shm_unlink(name);
    }
}

/* The region names of a peer whose process is gone: it could not remove them. (A live
 * peer removes its own; its ids are never touched here.) */
static void epx__unlink_dead_peer_regions(epx__cpu_t *c, int p)
{
    const epx__seg_hdr_t *h = c->peers[p].hdr;
    if (p != c->rank && h && epx__pid_dead(h->pid)) epx__unlink_region_names(c->nonce, p, h);
}

/* This process's live instances: a process that exits without destroying its
 * communicators (or that returns from main meanwhile) still removes its region names, at
 * exit. (One killed by a signal cannot: a surviving peer removes them when it destroys or
 * aborts its communicator; when every rank is killed, the next process's sweep does.) */
static pthread_mutex_t epx__live_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t epx__live_once = PTHREAD_ONCE_INIT;
static epx__cpu_t *epx__live;

static void epx__live_at_exit(void)
{
    pthread_mutex_lock(&epx__live_lock);
    for (epx__cpu_t *c = epx__live; c; c = c->live_next) /* not in a forked child: the names are its parent's */
        if (((const epx__seg_hdr_t *)c->seg)->pid == (int32_t)getpid()) epx__unlink_region_names(c->nonce, c->rank, c->seg);
    pthread_mutex_unlock(&epx__live_lock);
}
/* A child forked while another thread held the lock gets it free (its registry is its
 * parent's, which the pid check in epx__live_at_exit leaves alone). */
static void epx__live_after_fork(void) { pthread_mutex_init(&epx__live_lock, NULL); }
static void epx__live_setup(void)
{
    atexit(epx__live_at_exit);
    pthread_atfork(NULL, NULL, epx__live_after_fork);
    epx__sweep_dead_names();
}

static void epx__live_add(epx__cpu_t *c)
{
    pthread_once(&epx__live_once, epx__live_setup);
    pthread_mutex_lock(&epx__live_lock);
    c->live_prev = NULL, c->live_next = epx__live;
    if (epx__live) epx__live->live_prev = c;
    epx__live = c;
    pthread_mutex_unlock(&epx__live_lock);
}

static void epx__live_remove(epx__cpu_t *c)
{
    pthread_mutex_lock(&epx__live_lock);
    if (c->live_prev) c->live_prev->live_next = c->live_next;
    else if (epx__live == c) epx__live = c->live_next;
    if (c->live_next) c->live_next->live_prev = c->live_prev;
    c->live_prev = c->live_next = NULL;
    pthread_mutex_unlock(&epx__live_lock);
}

static bool epx__cma_probe(const epx__seg_hdr_t *peer_hdr, uint64_t expect)
{
    uint64_t v = 0;
    struct iovec l = {&v, sizeof v}, r = {(void *)(uintptr_t)peer_hdr->cma_probe_addr, sizeof v};
    ssize_t n = process_vm_readv(peer_hdr->pid, &l, 1, &r, 1, 0);
    return n == (ssize_t)sizeof v && v == expect;
}

/* Who made a segment: what its name says besides the communicator and the rank. */
typedef struct {
    int32_t pid;
    int32_t pad;
    uint64_t pidns;
} epx__owner_t;

/* A failed creation: remove the segment names of communicator `nonce` whose creator is gone
 * (a peer that died after making its segment, before the names could go). Live ranks'
 * names are theirs to remove. After a peer failure (`wait`), as the death may reach us (its
 * sockets closed) before its process is gone, a creator still alive gets up to 200 ms to
 * end; otherwise one look. */
static void epx__unlink_dead_segs(uint64_t nonce, bool wait)
{
    char prefix[40];
    snprintf(prefix, sizeof prefix, "epx-%016" PRIx64 "-", nonce);
    for (int round = 0; epx__unlink_dead_names(prefix, true) > 0 && wait && round < 40; round++) usleep(5000);
}

epx_status_t epx__cpu_create(epx__cpu_t **out, epx__boot_t *boot, int rank, int nranks, uint64_t nonce,
                             int64_t timeout_ms, const epx__fault_t *fault, epx__errbuf_t *err)
{
    epx_status_t st = EPX_SUCCESS;
    char name[96];
    bool created = false;
    uint8_t *cma_all = NULL;
    epx__owner_t me = {0, 0, 0}, *owners = NULL;
    epx__cpu_t *c = calloc(1, sizeof *c);
    if (!c) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    c->rank = rank;
    c->nranks = nranks;
    c->nonce = nonce;
    c->timeout_ms = timeout_ms;
    c->next_region_id = 1;
    c->spin_ns = (uint64_t)EPX__MAX(epx__param_int(EPX__P_CPU_SPIN_US), 0) * 1000u;
    c->yield_ns = epx__ms_to_ns(epx__param_int(EPX__P_CPU_YIELD_MS));
    epx__cpu_share_cores(c, nranks);
    int64_t eager = epx__param_int(EPX__P_CPU_EAGER_BYTES);
    c->eager_bytes = (size_t)EPX__ALIGN_UP(EPX__MIN(EPX__MAX(eager, 0), (int64_t)(1 << 20)), EPX__CACHELINE);
    c->seg_bytes = epx__seg_size(nranks, c->eager_bytes);
    c->peers = calloc((size_t)nranks, sizeof *c->peers);
    if (!c->peers) {
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }

    me = (epx__owner_t){(int32_t)getpid(), 0, epx__pidns()};
    owners = malloc(sizeof *owners * (size_t)nranks);
    if (!owners) {
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }
    epx__seg_name(name, sizeof name, nonce, rank, me.pid, me.pidns);
    EPX__CHECK_GOTO(epx__map_shm(name, c->seg_bytes, true, PROT_READ | PROT_WRITE, &c->seg, err), st, fail);
    created = true;
    epx__seg_hdr_t *h = c->seg;
    c->cma_probe_word = nonce ^ 0x5a5a5a5a5a5a5a5aull;
    h->rank = rank;
    h->nranks = nranks;
    h->pid = me.pid;
    h->pidns = me.pidns;
    h->nonce = nonce;
    h->cma_probe_addr = (uint64_t)(uintptr_t)&c->cma_probe_word;
    h->eager_bytes = c->eager_bytes;
    atomic_store_explicit(&h->done.value, 0, memory_order_relaxed);
    atomic_store_explicit(&h->aborted.value, 0, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    h->magic = EPX__SEG_MAGIC;
    epx__fault_creation(fault);

    /* Every segment exists once this returns; its owner names it. */
    EPX__CHECK_GOTO(epx__boot_allgather(boot, &me, owners, sizeof me, err), st, fail);
    for (int p = 0; p < nranks; p++) {
        if (p == rank) {
            c->peers[p].hdr = c->seg;
            continue;
        }
        void *m;
        epx__seg_name(name, sizeof name, nonce, p, owners[p].pid, owners[p].pidns);
        st = epx__map_shm(name, c->seg_bytes, false, PROT_READ | PROT_WRITE, &m, err);
        if (st != EPX_SUCCESS && owners[p].pidns == me.pidns && epx__pid_dead(owners[p].pid))
            st = epx__fail(err, EPX_ERR_PEER_FAILURE, "rank %d (pid %d) died while the communicator was being created",
                           p, (int)owners[p].pid);
        if (st != EPX_SUCCESS) goto fail;
        c->peers[p].hdr = m;
        const epx__seg_hdr_t *ph = m;
        if (ph->magic != EPX__SEG_MAGIC || ph->nonce != nonce || ph->rank != p || ph->nranks != nranks ||
            ph->eager_bytes != c->eager_bytes) {
            st = epx__fail(err, EPX_ERR_MISMATCH,
                           "rank %d's shared segment disagrees (EPX_CPU_EAGER_BYTES or nranks differ between ranks?)",
                           p);
            goto fail;
        }
    }

    /* process_vm_readv is used only when every pair can use it. */
    uint8_t cma_mine = epx__param_int(EPX__P_CPU_CMA) != 0;
    for (int p = 0; p < nranks && cma_mine; p++)
        if (p != rank) cma_mine = epx__cma_probe(c->peers[p].hdr, nonce ^ 0x5a5a5a5a5a5a5a5aull);
    cma_all = malloc((size_t)nranks);
    if (!cma_all) {
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }
    EPX__CHECK_GOTO(epx__boot_allgather(boot, &cma_mine, cma_all, 1, err), st, fail);
    c->cma_ok = true;
    for (int p = 0; p < nranks; p++) c->cma_ok = c->cma_ok && cma_all[p];

    /* Everyone has mapped everyone: the names can go. */
    EPX__CHECK_GOTO(epx__boot_barrier(boot, err), st, fail);
    epx__seg_name(name, sizeof name, nonce, rank, me.pid, me.pidns);
    shm_unlink(name);
    free(cma_all);
    free(owners);
    EPX_INFO(SHM, "rank %d: %d ranks mapped, segment %zu bytes, eager %zu bytes/peer, cma %s", rank, nranks,
             c->seg_bytes, c->eager_bytes, c->cma_ok ? "on" : "off");
    epx__live_add(c);
    *out = c;
    return EPX_SUCCESS;

fail:
    free(cma_all);
    free(owners);
    if (created) {
        epx__seg_name(name, sizeof name, nonce, rank, me.pid, me.pidns);
        shm_unlink(name);
    }
    epx__unlink_dead_segs(nonce, st == EPX_ERR_PEER_FAILURE);
    epx__cpu_destroy(c, true);
    *out = NULL;
    return st;
}

/* Set my `aborted` flag and wake peers asleep on my flags, so that they see it at once. */
static void epx__seg_give_up(epx__cpu_t *c, uint32_t value)
{
    epx__seg_hdr_t *h = c->seg;
    if (!h) return;
    epx__flag_post(&h->aborted, value);
    epx__futex(&h->done.value, FUTEX_WAKE, INT_MAX, NULL);
    for (uint32_t par = 0; par < 2; par++)
        for (int p = 0; p < c->nranks; p++)
            epx__futex(&epx__seg_desc(c->seg, c->nranks, par, p)->post.value, FUTEX_WAKE, INT_MAX, NULL);
}

void epx__cpu_mark_broken(epx__cpu_t *c)
{
    if (c && c->seg && !atomic_load_explicit(&((epx__seg_hdr_t *)c->seg)->aborted.value, memory_order_relaxed))
        epx__seg_give_up(c, EPX__BROKEN);
}

/* A wait for peers failed (its message is the thread's last error): the operation is out of
 * step on this rank, so is every later one. Give up on the communicator now, so that the
 * peers still in the operation, or about to read what I posted, fail at once, and this
 * rank's later operations too, with this status (a call with several host rounds returns
 * within one timeout, not one per round). Returns st. */
static epx_status_t epx__cpu_give_up(epx__cpu_t *c, epx_status_t st)
{
    if (c->gave_up == EPX_SUCCESS) {
        const char *why = epx_get_last_error(), *sep = strstr(why, ": ");
        snprintf(c->gave_up_why, sizeof c->gave_up_why, "%s", sep ? sep + 2 : why);
        c->gave_up = st;
    }
    epx__cpu_mark_broken(c);
    return st;
}

epx_status_t epx__cpu_name_ranks(epx__cpu_t *c, const int *names, epx__errbuf_t *err)
{
    int *n = malloc(sizeof *n * (size_t)c->nranks);
    if (!n) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    memcpy(n, names, sizeof *n * (size_t)c->nranks);
    free(c->names);
    c->names = n;
    return EPX_SUCCESS;
}

void epx__cpu_progress(epx__cpu_t *c) { epx__stamp_alive(c); }

void epx__cpu_serve_rounds(epx__cpu_t *c) { c->rounds = true; }

void epx__cpu_share_cores(epx__cpu_t *c, int ranks)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu > 0 && ranks > ncpu) c->spin_ns = EPX__MIN(c->spin_ns, 2000u); /* oversubscribed: yield early */
}

void epx__cpu_set_fault(epx__cpu_t *c, const epx__fault_t *fault) { c->fault = *fault; }

void epx__cpu_fault_kill_next(epx__cpu_t *c, const epx__fault_spec_t *spec)
{
    memset(&c->fault, 0, sizeof c->fault);
    c->fault.armed = true;
    c->fault.rank = spec->rank;
    c->fault.n = 1;
    c->fault.spec[0] = *spec;
    c->fault.spec[0].step = c->seq + 1;
    c->fault.spec[0].at = EPX__FAULT_AT_HOST;
}

void epx__cpu_destroy(epx__cpu_t *c, bool abort)
{
    if (!c) return;
    epx__live_remove(c);
    if (c->seg && abort) epx__seg_give_up(c, EPX__ABORTED);
    if (c->peers) {
        for (int p = 0; p < c->nranks; p++) {
            epx__unlink_dead_peer_regions(c, p);
            for (int i = 0; i < EPX__MAX_PEER_REGIONS; i++)
                if (c->peers[p].regions[i].base) munmap(c->peers[p].regions[i].base, c->peers[p].regions[i].size);
            if (p != c->rank && c->peers[p].hdr) munmap(c->peers[p].hdr, c->seg_bytes);
        }
    }
    char name[96];
    for (int i = 0; i < c->num_regions; i++) {
        epx__region_name(name, sizeof name, c->nonce, c->rank, c->seg, c->regions[i].id);
        shm_unlink(name);
        munmap(c->regions[i].base, c->regions[i].size);
    }
    epx__unlink_retired(c, 0, true);
    free(c->retired);
    if (c->seg) munmap(c->seg, c->seg_bytes);
    free(c->regions);
    free(c->peers);
    free(c->names);
    free(c);
}

/* ---- Registered regions --------------------------------------------------------------- */

epx_status_t epx__cpu_mem_alloc(epx__cpu_t *c, size_t bytes, void **ptr, epx__errbuf_t *err)
{
    if (c->num_regions == c->cap_regions) {
        int cap = c->cap_regions ? 2 * c->cap_regions : 8;
        epx__region_t *r = realloc(c->regions, sizeof *r * (size_t)cap);
        if (!r) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
        c->regions = r;
        c->cap_regions = cap;
    }
    size_t size = EPX__ALIGN_UP(EPX__MAX(bytes, (size_t)1), 4096);
    uint32_t id = c->next_region_id++;
    atomic_store_explicit(&((epx__seg_hdr_t *)c->seg)->regions_named, id, memory_order_relaxed); /* before the name */
    char name[96];
    epx__region_name(name, sizeof name, c->nonce, c->rank, c->seg, id);
    void *base = NULL;
    EPX__CHECK(epx__map_shm(name, size, true, PROT_READ | PROT_WRITE, &base, err));
    c->regions[c->num_regions++] = (epx__region_t){id, base, size, 0};
    *ptr = base;
    EPX_TRACE(SHM, "registered region %u: %zu bytes", id, size);
    return EPX_SUCCESS;
}

epx_status_t epx__cpu_mem_free(epx__cpu_t *c, void *ptr, epx__errbuf_t *err)
{
    for (int i = 0; i < c->num_regions; i++) {
        if (c->regions[i].base != ptr) continue;
        /* A peer still in the current operation may not have opened it yet: the name
         * goes when every peer is past it (or at destroy); the memory lives on in their
         * mappings meanwhile. */
        if (c->num_retired == c->cap_retired) {
            int cap = c->cap_retired ? 2 * c->cap_retired : 8;
            void *r = realloc(c->retired, sizeof *c->retired * (size_t)cap);
            if (!r) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
            c->retired = r, c->cap_retired = cap;
        }
        c->retired[c->num_retired].id = c->regions[i].id;
        c->retired[c->num_retired++].seq = c->seq;
        munmap(c->regions[i].base, c->regions[i].size);
        if (ptr == c->staging) c->staging = NULL, c->staging_bytes = 0;
        c->regions[i] = c->regions[--c->num_regions];
        return EPX_SUCCESS;
    }
    return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "epx_mem_free: %p was not returned by epx_mem_alloc on this communicator",
                     ptr);
}

bool epx__region_find(epx__cpu_t *c, const void *p, size_t len, epx__loc_t *loc)
{
    uintptr_t a = (uintptr_t)p;
    for (int i = 0; i < c->num_regions; i++) {
        uintptr_t b = (uintptr_t)c->regions[i].base;
        if (a >= b && a - b < c->regions[i].size && len <= c->regions[i].size - (a - b)) {
            loc->kind = EPX__LOC_REGION;
            loc->region_id = c->regions[i].id;
            loc->region_size = c->regions[i].size;
            loc->addr = a - b;
            return true;
        }
    }
    return false;
}

epx_status_t epx__staging_get(epx__cpu_t *c, size_t bytes, void **base, epx__loc_t *loc, epx__errbuf_t *err)
{
    if (c->staging_bytes < bytes) {
        if (c->staging) EPX__CHECK(epx__cpu_mem_free(c, c->staging, err));
        size_t want = EPX__MAX(bytes, 2 * c->staging_bytes);
        EPX__CHECK(epx__cpu_mem_alloc(c, want, &c->staging, err));
        c->staging_bytes = EPX__ALIGN_UP(want, 4096);
    }
    *base = c->staging;
    if (!epx__region_find(c, c->staging, c->staging_bytes, loc))
        return epx__fail(err, EPX_ERR_INTERNAL, "the staging region (%zu bytes) is not among the registered ones",
                         c->staging_bytes);
    return EPX_SUCCESS;
}

/* ---- Reading peers --------------------------------------------------------------------- */

static epx_status_t epx__peer_region(epx__cpu_t *c, int peer, const epx__loc_t *loc, const char **base,
                                     epx__errbuf_t *err)
{
    epx__peer_t *p = &c->peers[peer];
    epx__region_t *victim = &p->regions[0];
    for (int i = 0; i < EPX__MAX_PEER_REGIONS; i++) {
        epx__region_t *r = &p->regions[i];
        if (r->base && r->id == loc->region_id && r->size == loc->region_size) {
            r->last_use = ++c->use_clock;
            *base = r->base;
            return EPX_SUCCESS;
        }
        if (!r->base || (victim->base && r->last_use < victim->last_use)) victim = r;
    }
    if (victim->base) munmap(victim->base, victim->size);
    victim->base = NULL;
    char name[96];
    epx__region_name(name, sizeof name, c->nonce, peer, c->peers[peer].hdr, loc->region_id);
    void *m = NULL;
    EPX__CHECK(epx__map_shm(name, loc->region_size, false, PROT_READ, &m, err));
    *victim = (epx__region_t){loc->region_id, m, loc->region_size, ++c->use_clock};
    *base = m;
    return EPX_SUCCESS;
}

/* My own exposed buffer, addressed directly. */
static epx_status_t epx__self_map(epx__cpu_t *c, const epx__loc_t *loc, uint32_t seq, const char **base,
                                  epx__errbuf_t *err)
{
    switch (loc->kind) {
    case EPX__LOC_EAGER:
        *base = epx__seg_eager(c->seg, c->nranks, c->eager_bytes, seq, c->rank);
        return EPX_SUCCESS;
    case EPX__LOC_CMA:
        *base = (const char *)(uintptr_t)loc->addr;
        return EPX_SUCCESS;
    case EPX__LOC_REGION:
        for (int i = 0; i < c->num_regions; i++)
            if (c->regions[i].id == loc->region_id) {
                *base = (const char *)c->regions[i].base + loc->addr;
                return EPX_SUCCESS;
            }
        return epx__fail(err, EPX_ERR_INTERNAL, "own region %u not found", loc->region_id);
    default:
        *base = NULL;
        return EPX_SUCCESS;
    }
}

epx_status_t epx__peer_map(epx__cpu_t *c, int peer, const epx__loc_t *loc, uint32_t seq, const char **base,
                           epx__errbuf_t *err)
{
    if (peer == c->rank) return epx__self_map(c, loc, seq, base, err);
    switch (loc->kind) {
    case EPX__LOC_EAGER:
        *base = epx__seg_eager(c->peers[peer].hdr, c->nranks, c->eager_bytes, seq, c->rank);
        return EPX_SUCCESS;
    case EPX__LOC_REGION:
        if (loc->addr >= loc->region_size)
            return epx__fail(err, EPX_ERR_INTERNAL, "rank %d published an address past its region %u",
                             epx__rank_name(c, peer),
                             loc->region_id);
        EPX__CHECK(epx__peer_region(c, peer, loc, base, err));
        *base += loc->addr;
        return EPX_SUCCESS;
    default:
        *base = NULL;
        return EPX_SUCCESS;
    }
}

void epx__copy_moving(epx__cpu_t *c, uint32_t seq, void *dst, const void *src, size_t len)
{
    for (size_t done = 0; done < len;) {
        size_t piece = EPX__MIN(len - done, EPX__PIECE);
        memcpy((char *)dst + done, (const char *)src + done, piece);
        done += piece;
        epx__moved(c, seq);
    }
}

epx_status_t epx__peer_read(epx__cpu_t *c, int peer, const epx__loc_t *loc, uint32_t seq, uint64_t off, void *dst,
                            size_t len, epx__errbuf_t *err)
{
    if (len == 0) return EPX_SUCCESS;
    if (loc->kind == EPX__LOC_CMA && peer != c->rank) {
        char *d = dst;
        uint64_t src = loc->addr + off;
        while (len > 0) {
            size_t piece = EPX__MIN(len, EPX__PIECE);
            struct iovec l = {d, piece}, r = {(void *)(uintptr_t)src, piece};
            ssize_t n = process_vm_readv(c->peers[peer].hdr->pid, &l, 1, &r, 1, 0);
            if (n <= 0) {
                if (n < 0 && errno == EINTR) continue;
                return epx__fail(err, EPX_ERR_PEER_FAILURE, "process_vm_readv from rank %d: %s",
                                 epx__rank_name(c, peer),
                                 n < 0 ? strerror(errno) : "no progress");
            }
            d += n;
            src += (uint64_t)n;
            len -= (size_t)n;
            epx__moved(c, seq);
        }
        return EPX_SUCCESS;
    }
    const char *base;
    EPX__CHECK(epx__peer_map(c, peer, loc, seq, &base, err));
    if (!base) return epx__fail(err, EPX_ERR_INTERNAL, "rank %d published nothing to read", epx__rank_name(c, peer));
    epx__copy_moving(c, seq, dst, base + off, len);
    return EPX_SUCCESS;
}

/* ---- One operation ---------------------------------------------------------------------- */

static inline void epx__post_to(epx__cpu_t *c, uint32_t seq, int p, epx__call_kind_t kind, epx_status_t status)
{
    epx__desc_t *d = epx__seg_desc(c->seg, c->nranks, seq, p);
    d->status = status;
    d->kind = kind;
    epx__flag_post(&d->post, seq);
}

/* A `kill` fault: post to the first half of the peers (at least one), then exit. */
static void epx__op_post_kill(epx__cpu_t *c, uint32_t seq, epx__call_kind_t kind, epx_status_t status)
{
    epx__fault_spec_t f;
    if (!epx__fault_take(&c->fault, EPX__FAULT_KILL, seq, &f)) return;
    int peers = c->nranks - 1, half = EPX__MAX(1, (peers + 1) / 2), posted = 0;
    for (int i = 1; i <= peers && posted < half; i++, posted++)
        epx__post_to(c, seq, (c->rank + i) % c->nranks, kind, status);
    epx__fault_exit(&f, posted, peers);
}

void epx__op_post(epx__cpu_t *c, uint32_t seq, epx__call_kind_t kind, epx_status_t status)
{
    if (__builtin_expect(c->fault.armed, 0)) epx__op_post_kill(c, seq, kind, status);
    for (int p = 0; p < c->nranks; p++)
        if (p != c->rank) epx__post_to(c, seq, p, kind, status);
}

epx_status_t epx__peers_check(epx__cpu_t *c, uint32_t seq, epx__errbuf_t *err)
{
    for (int p = 0; p < c->nranks; p++) {
        epx__seg_hdr_t *h = c->peers[p].hdr;
        if (p == c->rank || !atomic_load_explicit(&h->aborted.value, memory_order_acquire)) continue;
        if (epx__seq_geq(atomic_load_explicit(&h->released_through, memory_order_relaxed), seq))
            continue; /* it released what it posted for `seq` before it gave up */
        char why[128];
        epx__peer_state(c, p, why, sizeof why);
        return epx__fail(err, EPX_ERR_PEER_FAILURE, "%s during %s %u; this rank's outputs are not valid", why,
                         epx__op_word(c), seq);
    }
    return EPX_SUCCESS;
}

epx_status_t epx__op_check_remote(epx__cpu_t *c, uint32_t seq, epx__call_kind_t kind, epx__errbuf_t *err)
{
    static const char *names[] = {"?", "an alltoall(v) or barrier", "a MoE call"};
    for (int p = 0; p < c->nranks; p++) {
        if (p == c->rank) continue;
        const epx__desc_t *theirs = epx__seg_desc(c->peers[p].hdr, c->nranks, seq, c->rank);
        if (theirs->kind != (uint32_t)kind)
            return epx__fail(err, EPX_ERR_MISMATCH, "rank %d is in %s, this rank in %s (%s %u); nothing was written",
                             epx__rank_name(c, p), names[theirs->kind <= EPX__CALL_MOE ? theirs->kind : 0], names[kind],
                             epx__op_word(c), seq);
    }
    for (int p = 0; p < c->nranks; p++) {
        if (p == c->rank) continue;
        const epx__desc_t *theirs = epx__seg_desc(c->peers[p].hdr, c->nranks, seq, c->rank);
        if (theirs->status != EPX_SUCCESS)
            return epx__fail(err, EPX_ERR_REMOTE_INVALID, "rank %d rejected its arguments (%s); nothing was changed",
                             epx__rank_name(c, p),
                             epx_status_name((epx_status_t)theirs->status));
    }
    return EPX_SUCCESS;
}

epx_status_t epx__op_finish(epx__cpu_t *c, uint32_t seq, bool exposed, epx_status_t st, epx__errbuf_t *err)
{
    epx__seg_hdr_t *h = c->seg;
    epx__flag_post(&h->done, seq);
    if (exposed) {
        epx_status_t w = epx__wait_dones(c, seq, err);
        if (w != EPX_SUCCESS) return epx__cpu_give_up(c, w);
    }
    if (!atomic_load_explicit(&h->aborted.value, memory_order_relaxed))
        atomic_store_explicit(&h->released_through, seq, memory_order_relaxed); /* (the flag post publishes it) */
    return st;
}

epx_status_t epx__expose_buffers(epx__cpu_t *c, epx__expose_t *bufs, int n, bool *exposed, epx__errbuf_t *err)
{
    size_t staged = 0;
    for (int i = 0; i < n; i++) {
        bufs[i].loc = (epx__loc_t){EPX__LOC_NONE, 0, 0, 0};
        if (!bufs[i].ptr || bufs[i].bytes == 0) continue;
        if (epx__region_find(c, bufs[i].ptr, bufs[i].bytes, &bufs[i].loc)) {
            *exposed = true;
        } else if (c->cma_ok) {
            bufs[i].loc = (epx__loc_t){EPX__LOC_CMA, 0, 0, (uint64_t)(uintptr_t)bufs[i].ptr};
            *exposed = true;
        } else {
            staged += EPX__ALIGN_UP(bufs[i].bytes, EPX__CACHELINE);
        }
    }
    if (staged == 0) return EPX_SUCCESS;
    void *base;
    epx__loc_t sl;
    EPX__CHECK(epx__staging_get(c, staged, &base, &sl, err));
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        if (!bufs[i].ptr || bufs[i].bytes == 0 || bufs[i].loc.kind != EPX__LOC_NONE) continue;
        memcpy((char *)base + off, bufs[i].ptr, bufs[i].bytes);
        bufs[i].loc = sl;
        bufs[i].loc.addr += off;
        off += EPX__ALIGN_UP(bufs[i].bytes, EPX__CACHELINE);
    }
    *exposed = true; /* the next operation may rewrite the staging region */
    return EPX_SUCCESS;
}

epx_status_t epx__peer_rows_copy(epx__cpu_t *c, int peer, const epx__loc_t *loc, uint32_t seq, const int64_t *offsets,
                                 int64_t n, size_t row_bytes, char *dst, size_t dst_stride, epx__errbuf_t *err)
{
    if (n <= 0 || row_bytes == 0) return EPX_SUCCESS;
    if (loc->kind != EPX__LOC_CMA || peer == c->rank) {
        const char *base;
        EPX__CHECK(epx__peer_map(c, peer, loc, seq, &base, err));
        if (!base) return epx__fail(err, EPX_ERR_INTERNAL, "rank %d exposed no buffer to read rows from",
                                    epx__rank_name(c, peer));
        const int64_t per_piece = (int64_t)EPX__MAX(EPX__PIECE / row_bytes, (size_t)1);
        int64_t left = per_piece;
        for (int64_t i = 0; i < n; i++) {
            memcpy(dst + (size_t)i * dst_stride, base + offsets[i], row_bytes);
            if (--left == 0) {
                epx__moved(c, seq);
                left = per_piece;
            }
        }
        if (left != per_piece) epx__moved(c, seq); /* the last, partial piece */
        return EPX_SUCCESS;
    }
    /* process_vm_readv in batches of up to IOV_MAX rows. */
    enum { BATCH = 1024 };
    struct iovec l[BATCH], r[BATCH];
    for (int64_t i = 0; i < n;) {
        int k = 0;
        for (; k < BATCH && i + k < n; k++) {
            l[k] = (struct iovec){dst + (size_t)(i + k) * dst_stride, row_bytes};
            r[k] = (struct iovec){(void *)(uintptr_t)(loc->addr + (uint64_t)offsets[i + k]), row_bytes};
        }
        size_t want = (size_t)k * row_bytes;
        ssize_t got = process_vm_readv(c->peers[peer].hdr->pid, l, (unsigned long)k, r, (unsigned long)k, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got != (ssize_t)want) {
            /* Partial: finish row by row through the single-range reader. */
            for (int j = 0; j < k; j++)
                EPX__CHECK(epx__peer_read(c, peer, loc, seq, (uint64_t)offsets[i + j], dst + (size_t)(i + j) * dst_stride,
                                          row_bytes, err));
        }
        i += k;
        epx__moved(c, seq);
    }
    return EPX_SUCCESS;
}

epx_status_t epx__peer_rows_ptrs(epx__cpu_t *c, int peer, const epx__loc_t *loc, uint32_t seq, const int64_t *offsets,
                                 int64_t n, size_t row_bytes, char *scratch, const char **ptrs, epx__errbuf_t *err)
{
    if (loc->kind == EPX__LOC_CMA && peer != c->rank) {
        EPX__CHECK(epx__peer_rows_copy(c, peer, loc, seq, offsets, n, row_bytes, scratch, row_bytes, err));
        for (int64_t i = 0; i < n; i++) ptrs[i] = scratch + (size_t)i * row_bytes;
        return EPX_SUCCESS;
    }
    const char *base;
    EPX__CHECK(epx__peer_map(c, peer, loc, seq, &base, err));
    if (!base && n > 0) return epx__fail(err, EPX_ERR_INTERNAL, "rank %d exposed no buffer to read rows from",
                                    epx__rank_name(c, peer));
    for (int64_t i = 0; i < n; i++) ptrs[i] = base + offsets[i];
    epx__moved(c, seq); /* the caller is done with the rows it asked for before */
    return EPX_SUCCESS;
}
