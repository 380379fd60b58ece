/*
 * Bootstrap: an NCCL-style rendezvous over TCP.
 *
 * epx_get_unique_id() starts a listener thread; the id carries its address, port and a
 * random nonce. Every rank connects, sends a hello (nonce, nranks, rank, info blob); when
 * all ranks have arrived the listener sends the table of all blobs to everybody and exits.
 * Rank 0 also listens on a socket of its own (its address travels in the table); the other
 * ranks connect to it and the resulting star carries the bootstrap collectives (allgather,
 * alltoall, allreduce, barrier) for the communicator's lifetime. Every read and write has a
 * deadline; a closed socket reads as a failed peer, and a rank whose round fails shuts its
 * sockets down, so that the others fail at once too (epx__boot_round_end).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <inttypes.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core.h"

#define EPX__ID_MAGIC 0x31585045u /* "EPX1" */
#define EPX__HELLO_MAGIC 0x324c4548u /* "HEL2": the hello with ms_left (another build's is a stray) */
#define EPX__MAX_INFO (64u << 10)
#define EPX__MAX_RANKS (1 << 20)

typedef struct {
    uint32_t magic;
    uint16_t port;
    uint8_t family; /* 4 or 6 */
    uint8_t pad;
    uint8_t addr[16];
    uint64_t nonce;
} epx__id_t;
_Static_assert(sizeof(epx__id_t) <= EPX_UNIQUE_ID_BYTES, "id too large");

typedef struct {
    uint32_t magic;
    uint32_t info_len;
    uint64_t nonce;
    int32_t nranks;
    int32_t rank;
    int64_t ms_left; /* until the rank's own deadline */
} epx__hello_t;

typedef struct {
    int32_t status; /* epx_status_t */
    int32_t nranks;
    int32_t missing, first_missing; /* EPX_ERR_TIMEOUT: the ranks that never came */
} epx__reply_t;

/* What the bootstrap itself prepends to every rank's info blob. */
typedef struct {
    struct sockaddr_storage listen_addr; /* rank 0's star listener; unused elsewhere */
} epx__boot_info_t;

struct epx__boot {
    int nranks, rank;
    uint64_t nonce;
    int64_t timeout_ms;
    int *fds; /* rank 0: one per rank (fds[0] unused); others: fds[0] = socket to rank 0 */
};

/* ---- Socket helpers --------------------------------------------------------------- */

static int epx__ms_left(uint64_t deadline)
{
    uint64_t now = epx__now_ns();
    if (now >= deadline) return 0;
    uint64_t ms = (deadline - now) / 1000000ull + 1;
    return ms > 60000 ? 60000 : (int)ms;
}

static epx_status_t epx__sock_io(int fd, void *buf, size_t len, bool sending, uint64_t deadline,
                                 epx__errbuf_t *err, const char *what)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = sending ? send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT)
                            : recv(fd, p, len, MSG_DONTWAIT);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n == 0 && !sending)
            return epx__fail(err, EPX_ERR_PEER_FAILURE, "bootstrap: %s: connection closed by peer",
                             what);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return epx__fail(err, EPX_ERR_PEER_FAILURE, "bootstrap: %s: %s", what,
                             strerror(errno));
        int left = epx__ms_left(deadline);
        if (left == 0)
            return epx__fail(err, EPX_ERR_TIMEOUT, "bootstrap: %s: timed out", what);
        struct pollfd pfd = {fd, (short)(sending ? POLLOUT : POLLIN), 0};
        poll(&pfd, 1, left);
    }
    return EPX_SUCCESS;
}

static epx_status_t epx__send_all(int fd, const void *buf, size_t len, uint64_t deadline,
                                  epx__errbuf_t *err, const char *what)
{
    return epx__sock_io(fd, (void *)buf, len, true, deadline, err, what);
}

static epx_status_t epx__recv_all(int fd, void *buf, size_t len, uint64_t deadline,
                                  epx__errbuf_t *err, const char *what)
{
    return epx__sock_io(fd, buf, len, false, deadline, err, what);
}

/* A listener and the connections it accepted whose hello is not all in yet. Hellos are
 * read from all of them at once, so a connection that sends nothing or half a hello (a port
 * scanner, a client of another program, a rank of another job) is dropped at its own
 * deadline and never holds up the ranks that connect after it. */
#define EPX__PENDING_MAX 64
#define EPX__HELLO_MAX 32

typedef struct {
    int fd;
    size_t got;
    uint64_t until; /* dropped then, hello or not */
    char buf[EPX__HELLO_MAX];
} epx__pending_t;

typedef struct {
    int lfd;
    int n;
    epx__pending_t p[EPX__PENDING_MAX];
} epx__acceptor_t;

/* Does a complete hello come from a connection we wait for? */
typedef bool (*epx__hello_ok_t)(const void *hello, void *ctx);

static void epx__acceptor_init(epx__acceptor_t *a, int lfd)
{
    a->lfd = lfd;
    a->n = 0;
}

/* Close the connections still pending (not the listener). */
static void epx__acceptor_close(epx__acceptor_t *a)
{
    for (int i = 0; i < a->n; i++) close(a->p[i].fd);
    a->n = 0;
}

/* The next connection whose `len`-byte hello (len <= EPX__HELLO_MAX) `ok` accepts, before
 * the deadline: its fd, the hello copied to `hello`; -1 at the deadline or when the listener
 * fails. Connections whose hello does not come within `stray_ms`, is cut short or is
 * refused by `ok` are closed. Connections that arrived meanwhile stay pending for the next
 * call. */
static int epx__accept_hello(epx__acceptor_t *a, void *hello, size_t len, uint64_t deadline, int64_t stray_ms,
                             epx__hello_ok_t ok, void *ctx)
{
    struct pollfd pfd[1 + EPX__PENDING_MAX];
    for (;;) {
        uint64_t now = epx__now_ns(), wake = deadline;
        for (int i = 0; i < a->n;) {
            epx__pending_t *p = &a->p[i];
            ssize_t r = recv(p->fd, p->buf + p->got, len - p->got, MSG_DONTWAIT);
            if (r > 0) p->got += (size_t)r;
            bool drop = r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) ||
                        (p->got < len && now >= p->until);
            if (!drop && p->got == len) {
                if (ok(p->buf, ctx)) {
                    int fd = p->fd;
                    memcpy(hello, p->buf, len);
                    *p = a->p[--a->n];
                    return fd;
                }
                drop = true;
            }
            if (drop) {
                close(p->fd);
                *p = a->p[--a->n];
                continue;
            }
            wake = EPX__MIN(wake, p->until);
            i++;
        }
        int left = epx__ms_left(deadline);
        if (left == 0) return -1;
        int to = epx__ms_left(wake);
        pfd[0] = (struct pollfd){a->lfd, (short)(a->n < EPX__PENDING_MAX ? POLLIN : 0), 0};
        for (int i = 0; i < a->n; i++) pfd[1 + i] = (struct pollfd){a->p[i].fd, POLLIN, 0};
        int r = poll(pfd, (nfds_t)(1 + a->n), EPX__MAX(to, 1));
        if (r < 0 && errno != EINTR) return -1;
        if (r <= 0 || !(pfd[0].revents & POLLIN)) continue;
        int fd = accept4(a->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) return -1;
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        a->p[a->n++] = (epx__pending_t){fd, 0, stray_ms > 0 ? epx__deadline_after_ms(stray_ms) : deadline, {0}};
    }
}

/* Address of the interface named by EPX_SOCKET_IFNAME (IPv4 preferred). */
static epx_status_t epx__if_addr(struct sockaddr_storage *ss, socklen_t *sslen, epx__errbuf_t *err)
{
    const char *ifname = epx__param_str(EPX__P_SOCKET_IFNAME);
    struct ifaddrs *ifs = NULL, *v6 = NULL, *v4 = NULL;
    if (getifaddrs(&ifs) != 0)
        return epx__fail(err, EPX_ERR_SYSTEM, "getifaddrs: %s", strerror(errno));
    for (struct ifaddrs *i = ifs; i; i = i->ifa_next) {
        if (!i->ifa_addr || strcmp(i->ifa_name, ifname) != 0) continue;
        if (i->ifa_addr->sa_family == AF_INET && !v4) v4 = i;
        if (i->ifa_addr->sa_family == AF_INET6 && !v6) v6 = i;
    }
    struct ifaddrs *pick = v4 ? v4 : v6;
    if (!pick) {
        freeifaddrs(ifs);
        return epx__fail(err, EPX_ERR_SYSTEM, "EPX_SOCKET_IFNAME=%s: no such interface with an IP address",
                         ifname);
    }
    memset(ss, 0, sizeof *ss);
    *sslen = pick->ifa_addr->sa_family == AF_INET ? sizeof(struct sockaddr_in)
                                                  : sizeof(struct sockaddr_in6);
    memcpy(ss, pick->ifa_addr, *sslen);
    freeifaddrs(ifs);
    return EPX_SUCCESS;
}

static epx_status_t epx__listen(int *lfd_out, struct sockaddr_storage *ss, epx__errbuf_t *err)
{
    socklen_t sslen;
    EPX__CHECK(epx__if_addr(ss, &sslen, err));
    if (ss->ss_family == AF_INET)
        ((struct sockaddr_in *)ss)->sin_port = 0;
    else
        ((struct sockaddr_in6 *)ss)->sin6_port = 0;
    int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return epx__fail(err, EPX_ERR_SYSTEM, "socket: %s", strerror(errno));
    if (bind(fd, (struct sockaddr *)ss, sslen) != 0 || listen(fd, 4096) != 0 ||
        getsockname(fd, (struct sockaddr *)ss, &sslen) != 0) {
        int e = errno;
        close(fd);
        return epx__fail(err, EPX_ERR_SYSTEM, "bootstrap listen: %s", strerror(e));
    }
    *lfd_out = fd;
    return EPX_SUCCESS;
}

/* Connect before the deadline, retrying while nobody listens yet. The connect itself is
 * bounded too: to an address that drops SYNs (a host down or firewalled, a full accept
 * queue) a blocking connect would wait out the kernel's SYN retries, about 2 minutes,
 * whatever the deadline. The socket returned is blocking, as accepted ones are. */
static epx_status_t epx__connect_until(const struct sockaddr_storage *ss, uint64_t deadline,
                                       int *fd_out, epx__errbuf_t *err, const char *what)
{
    socklen_t len = ss->ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
    int delay_ms = 1;
    for (;;) {
        int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) return epx__fail(err, EPX_ERR_SYSTEM, "socket: %s", strerror(errno));
        int e = connect(fd, (const struct sockaddr *)ss, len) == 0 ? 0 : errno;
        while (e == EINPROGRESS || e == EINTR || e == EALREADY) {
            int left = epx__ms_left(deadline);
            if (left == 0) {
                e = ETIMEDOUT;
                break;
            }
            struct pollfd pfd = {fd, POLLOUT, 0};
            if (poll(&pfd, 1, left) <= 0) continue; /* EINTR, or check the deadline again */
            socklen_t elen = sizeof e;
            if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &elen) != 0) e = errno;
        }
        if (e == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
            *fd_out = fd;
            return EPX_SUCCESS;
        }
        close(fd);
        if (e != ECONNREFUSED && e != ETIMEDOUT && e != EAGAIN)
            return epx__fail(err, EPX_ERR_SYSTEM, "bootstrap: connect to %s: %s", what, strerror(e));
        if (epx__ms_left(deadline) == 0)
            return epx__fail(err, EPX_ERR_TIMEOUT, "bootstrap: connect to %s: %s (timed out)", what,
                             strerror(e));
        usleep((useconds_t)EPX__MIN(delay_ms, epx__ms_left(deadline)) * 1000);
        if (delay_ms < 100) delay_ms *= 2;
    }
}

/* ---- Unique id -------------------------------------------------------------------- */

static void epx__id_to_sockaddr(const epx__id_t *id, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (id->family == 4) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(id->port);
        memcpy(&a->sin_addr, id->addr, 4);
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(id->port);
        memcpy(&a->sin6_addr, id->addr, 16);
    }
}

static bool epx__id_valid(const epx__id_t *id)
{
    return id->magic == EPX__ID_MAGIC && (id->family == 4 || id->family == 6) && id->port != 0;
}

uint64_t epx__id_nonce(const epx_unique_id_t *id)
{
    epx__id_t v;
    memcpy(&v, id->internal, sizeof v);
    return v.nonce;
}

epx_status_t epx__id_format(const epx_unique_id_t *uid, char *buf, size_t len)
{
    epx__id_t id;
    memcpy(&id, uid->internal, sizeof id);
    if (!epx__id_valid(&id))
        return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "unique id is not valid (not from epx_get_unique_id?)");
    char host[INET6_ADDRSTRLEN];
    inet_ntop(id.family == 4 ? AF_INET : AF_INET6, id.addr, host, sizeof host);
    int n = snprintf(buf, len, id.family == 4 ? "epx1:%s:%u:%016" PRIx64 : "epx1:[%s]:%u:%016" PRIx64,
                     host, (unsigned)id.port, id.nonce);
    if (n < 0 || (size_t)n >= len)
        return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "buffer of %zu bytes too small for the id", len);
    return EPX_SUCCESS;
}

epx_status_t epx__id_parse(const char *text, epx_unique_id_t *uid)
{
    epx__id_t id;
    memset(&id, 0, sizeof id);
    size_t tlen = strnlen(text, EPX_UNIQUE_ID_STRLEN);
    if (tlen >= EPX_UNIQUE_ID_STRLEN || strncmp(text, "epx1:", 5) != 0) goto bad;
    const char *p = text + 5;
    char host[INET6_ADDRSTRLEN + 1];
    const char *host_end;
    if (*p == '[') {
        host_end = strchr(p, ']');
        if (!host_end || host_end[1] != ':' || (size_t)(host_end - p - 1) >= sizeof host) goto bad;
        memcpy(host, p + 1, (size_t)(host_end - p - 1));
        host[host_end - p - 1] = '\0';
        if (inet_pton(AF_INET6, host, id.addr) != 1) goto bad;
        id.family = 6;
        p = host_end + 2;
    } else {
        host_end = strchr(p, ':');
        if (!host_end || (size_t)(host_end - p) >= sizeof host) goto bad;
        memcpy(host, p, (size_t)(host_end - p));
        host[host_end - p] = '\0';
        if (inet_pton(AF_INET, host, id.addr) != 1) goto bad;
        id.family = 4;
        p = host_end + 1;
    }
    unsigned port = 0;
    int digits = 0;
    while (*p >= '0' && *p <= '9' && digits < 6) {
        port = port * 10 + (unsigned)(*p++ - '0');
        digits++;
    }
    if (digits == 0 || port == 0 || port > 65535 || *p != ':') goto bad;
    p++;
    uint64_t nonce = 0;
    for (int i = 0; i < 16; i++) {
        char c = p[i];
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (v < 0) goto bad;
        nonce = nonce << 4 | (uint64_t)v;
    }
    if (p[16] != '\0') goto bad;
    id.magic = EPX__ID_MAGIC;
    id.port = (uint16_t)port;
    id.nonce = nonce;
    memset(uid, 0, sizeof *uid);
    memcpy(uid->internal, &id, sizeof id);
    return EPX_SUCCESS;
bad:
    return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT,
                     "unique id text \"%.*s\" is malformed (expected epx1:ADDR:PORT:16-hex-nonce)", 80,
                     text);
}

/* ---- Rendezvous listener ---------------------------------------------------------- */

typedef struct {
    int lfd;
    uint64_t nonce;
} epx__root_args_t;

typedef struct {
    int fd;
    int rank;
} epx__root_conn_t;

static bool epx__root_hello_ok(const void *hello, void *ctx)
{
    epx__hello_t h;
    memcpy(&h, hello, sizeof h);
    return h.magic == EPX__HELLO_MAGIC && h.nonce == *(const uint64_t *)ctx;
}

static void epx__root_reply_all(epx__root_conn_t *c, int n, epx_status_t st, int nranks,
                                const char *table, size_t table_len, uint64_t deadline)
{
    epx__reply_t reply = {st, nranks, 0, -1};
    for (int i = 0; i < n; i++)
        if (c[i].fd < 0 && reply.missing++ == 0) reply.first_missing = i;
    for (int i = 0; i < n; i++) {
        if (c[i].fd < 0) continue;
        if (epx__send_all(c[i].fd, &reply, sizeof reply, deadline, NULL, "reply") == EPX_SUCCESS &&
            st == EPX_SUCCESS)
            epx__send_all(c[i].fd, table, table_len, deadline, NULL, "table");
        close(c[i].fd);
    }
}

/* After a rendezvous that failed because the ranks disagree, the ranks still to come get the
 * verdict (EPX_ERR_MISMATCH) at once too, instead of a refused connection and, at their
 * timeout, EPX_ERR_TIMEOUT. Answers until every rank below the largest rank count any rank
 * claimed has been told (those that arrived, whose fds in `conns` are closed but not reset,
 * and `bad_rank`, the one that broke it, were), or the deadline. */
static void epx__root_tell_late(epx__acceptor_t *acc, const epx__root_conn_t *conns, int nranks, int max_claimed,
                                int bad_rank, uint64_t nonce, uint64_t deadline)
{
    int n = EPX__MAX(nranks, max_claimed), untold = 0;
    bool *told = calloc((size_t)EPX__MAX(n, 1), sizeof *told);
    if (!told) return;
    for (int r = 0; r < n; r++) untold += !(told[r] = (r < nranks && conns[r].fd >= 0) || r == bad_rank);
    while (untold > 0) {
        epx__hello_t h;
        int fd = epx__accept_hello(acc, &h, sizeof h, deadline, 10000, epx__root_hello_ok, &nonce);
        if (fd < 0) break;
        epx__reply_t reply = {EPX_ERR_MISMATCH, nranks, 0, -1};
        epx__send_all(fd, &reply, sizeof reply, epx__deadline_after_ms(10000), NULL, "reply");
        close(fd);
        if (h.rank >= 0 && h.rank < n && !told[h.rank]) told[h.rank] = true, untold--;
    }
    free(told);
}

static void *epx__root_main(void *argp)
{
    epx__root_args_t args = *(epx__root_args_t *)argp;
    free(argp);
    uint64_t deadline = epx__deadline_after_ms(EPX__MAX(epx__param_int(EPX__P_TIMEOUT_MS), 1000));
    epx__root_conn_t *conns = NULL;
    char *table = NULL;
    int nranks = -1, arrived = 0, max_claimed = 0, bad_rank = -1;
    uint32_t info_len = 0;
    epx_status_t st = EPX_SUCCESS;

    epx__acceptor_t *acc = malloc(sizeof *acc);
    if (!acc) st = EPX_ERR_NO_MEMORY;
    else epx__acceptor_init(acc, args.lfd);
    while (acc && (nranks < 0 || arrived < nranks)) {
        /* A stray or stale connection (no hello within 10 s, or not ours) is dropped. The
         * ranks that came are answered before the first of them gives up (its deadline, less
         * a margin for the reply), so that each learns which ranks never came. */
        epx__hello_t h;
        int fd = epx__accept_hello(acc, &h, sizeof h, deadline, 10000, epx__root_hello_ok, &args.nonce);
        if (fd < 0) {
            st = EPX_ERR_TIMEOUT;
            break;
        }
        uint64_t hello_deadline = epx__deadline_after_ms(10000);
        if (nranks < 0) {
            if (h.nranks < 1 || h.nranks > EPX__MAX_RANKS || h.info_len > EPX__MAX_INFO) {
                close(fd);
                continue;
            }
            nranks = h.nranks;
            info_len = h.info_len;
            conns = calloc((size_t)nranks, sizeof *conns);
            table = calloc((size_t)nranks, info_len);
            if (!conns || !table) {
                close(fd);
                st = EPX_ERR_NO_MEMORY;
                break;
            }
            for (int i = 0; i < nranks; i++) conns[i].fd = -1;
        }
        max_claimed = EPX__MAX(max_claimed, h.nranks < 1 || h.nranks > EPX__MAX_RANKS ? 0 : h.nranks);
        bool ok = h.nranks == nranks && h.info_len == info_len && h.rank >= 0 && h.rank < nranks &&
                  conns[h.rank].fd < 0;
        if (ok)
            ok = epx__recv_all(fd, table + (size_t)h.rank * info_len, info_len, hello_deadline, NULL,
                               "info") == EPX_SUCCESS;
        if (!ok) {
            /* Ranks disagree (nranks, info size) or a rank appears twice: fail everyone. */
            epx__reply_t reply = {EPX_ERR_MISMATCH, nranks, 0, -1};
            epx__send_all(fd, &reply, sizeof reply, hello_deadline, NULL, "reply");
            close(fd);
            st = EPX_ERR_MISMATCH;
            bad_rank = h.rank;
            break;
        }
        conns[h.rank].fd = fd;
        conns[h.rank].rank = h.rank;
        arrived++;
        if (h.ms_left > 0) deadline = EPX__MIN(deadline, epx__deadline_after_ms(h.ms_left - EPX__MIN(h.ms_left / 10, 200)));
    }
    if (conns)
        epx__root_reply_all(conns, nranks, st, nranks, table, (size_t)nranks * info_len,
                            epx__deadline_after_ms(10000));
    if (st == EPX_ERR_MISMATCH)
        epx__root_tell_late(acc, conns, nranks, max_claimed, bad_rank, args.nonce, deadline);
    if (acc) epx__acceptor_close(acc);
    free(acc);
    free(conns);
    free(table);
    close(args.lfd);
    return NULL;
}

epx_status_t epx__boot_create_id(epx_unique_id_t *uid, epx__errbuf_t *err)
{
    struct sockaddr_storage ss;
    int lfd;
    EPX__CHECK(epx__listen(&lfd, &ss, err));
    epx__id_t id;
    memset(&id, 0, sizeof id);
    id.magic = EPX__ID_MAGIC;
    id.nonce = epx__random64();
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        id.family = 4;
        id.port = ntohs(a->sin_port);
        memcpy(id.addr, &a->sin_addr, 4);
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        id.family = 6;
        id.port = ntohs(a->sin6_port);
        memcpy(id.addr, &a->sin6_addr, 16);
    }
    epx__root_args_t *args = malloc(sizeof *args);
    if (!args) {
        close(lfd);
        return epx__fail(err, EPX_ERR_NO_MEMORY, "bootstrap: out of memory");
    }
    args->lfd = lfd;
    args->nonce = id.nonce;
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&th, &attr, epx__root_main, args);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        free(args);
        close(lfd);
        return epx__fail(err, EPX_ERR_SYSTEM, "bootstrap: pthread_create: %s", strerror(rc));
    }
    memset(uid, 0, sizeof *uid);
    memcpy(uid->internal, &id, sizeof id);
    EPX_INFO(BOOT, "unique id created, listener on port %u", (unsigned)id.port);
    return EPX_SUCCESS;
}

/* ---- Rank side -------------------------------------------------------------------- */

/* What a rank sends first on the star and on a direct link. */
typedef struct {
    uint64_t nonce;
    int32_t rank;
    int32_t pad;
} epx__link_hello_t;
_Static_assert(sizeof(epx__link_hello_t) <= EPX__HELLO_MAX, "hello too large");
_Static_assert(sizeof(epx__hello_t) <= EPX__HELLO_MAX, "hello too large");

/* Rank 0's star: a rank of this communicator, not yet connected. */
typedef struct {
    uint64_t nonce;
    int nranks;
    const int *fds;
} epx__star_ctx_t;

static bool epx__star_hello_ok(const void *hello, void *ctxp)
{
    const epx__star_ctx_t *ctx = ctxp;
    epx__link_hello_t h;
    memcpy(&h, hello, sizeof h);
    return h.nonce == ctx->nonce && h.rank > 0 && h.rank < ctx->nranks && ctx->fds[h.rank] < 0;
}

static void epx__boot_free(epx__boot_t *b)
{
    if (!b) return;
    if (b->fds) {
        int n = b->rank == 0 ? b->nranks : 1;
        for (int i = 0; i < n; i++)
            if (b->fds[i] >= 0) close(b->fds[i]);
    }
    free(b->fds);
    free(b);
}

void epx__boot_close(epx__boot_t *boot) { epx__boot_free(boot); }

/* Rendezvous with the listener: send the hello and our blob, get everyone's. */
static epx_status_t epx__boot_rendezvous(const epx__id_t *id, int nranks, int rank, const void *blob,
                                         size_t blob_len, void *table, uint64_t deadline,
                                         epx__errbuf_t *err)
{
    struct sockaddr_storage root;
    epx__id_to_sockaddr(id, &root);
    int fd;
    EPX__CHECK(epx__connect_until(&root, deadline, &fd, err, "the rendezvous listener"));
    uint64_t now = epx__now_ns(); /* (my deadline as time left: the root's clock may be another host's) */
    int64_t left = deadline <= now ? 0 : (int64_t)EPX__MIN((deadline - now) / 1000000ull, (uint64_t)INT64_MAX);
    epx__hello_t h = {EPX__HELLO_MAGIC, (uint32_t)blob_len, id->nonce, nranks, rank, left};
    epx_status_t st;
    epx__reply_t reply;
    EPX__CHECK_GOTO(epx__send_all(fd, &h, sizeof h, deadline, err, "hello"), st, out);
    EPX__CHECK_GOTO(epx__send_all(fd, blob, blob_len, deadline, err, "hello"), st, out);
    EPX__CHECK_GOTO(epx__recv_all(fd, &reply, sizeof reply, deadline, err, "rendezvous reply"), st, out);
    if (reply.status == EPX_ERR_TIMEOUT && reply.missing > 0) {
        st = epx__fail(err, EPX_ERR_TIMEOUT,
                       "bootstrap: %d of %d ranks never reached the rendezvous in time (rank %d%s); were they "
                       "started, with this unique id?",
                       reply.missing, nranks, reply.first_missing, reply.missing > 1 ? " and others" : "");
        goto out;
    }
    if (reply.status != EPX_SUCCESS) {
        st = epx__fail(err, (epx_status_t)reply.status,
                       "bootstrap: rendezvous failed (%s): do all ranks pass the same nranks (%d here) "
                       "and distinct ranks?",
                       epx_status_name((epx_status_t)reply.status), nranks);
        goto out;
    }
    EPX__CHECK_GOTO(epx__recv_all(fd, table, (size_t)nranks * blob_len, deadline, err, "rendezvous table"),
                    st, out);
out:
    close(fd);
    return st;
}

epx_status_t epx__boot_init(epx__boot_t **boot_out, int nranks, int rank, const epx_unique_id_t *uid,
                            const void *info, size_t info_len, void *all_info, int64_t timeout_ms,
                            epx__errbuf_t *err)
{
    epx__id_t id;
    memcpy(&id, uid->internal, sizeof id);
    if (!epx__id_valid(&id))
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "unique id is not valid (not from epx_get_unique_id?)");
    if (info_len > EPX__MAX_INFO - sizeof(epx__boot_info_t))
        return epx__fail(err, EPX_ERR_INTERNAL, "bootstrap info too large");

    uint64_t deadline = epx__deadline_after_ms(timeout_ms);
    epx_status_t st = EPX_SUCCESS;
    int lfd = -1;
    size_t blob_len = sizeof(epx__boot_info_t) + info_len;
    char *blob = calloc(1, blob_len);
    char *table = calloc((size_t)nranks, blob_len);
    epx__boot_t *b = calloc(1, sizeof *b);
    if (!blob || !table || !b) {
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "bootstrap: out of memory");
        goto out;
    }
    b->nranks = nranks;
    b->rank = rank;
    b->nonce = id.nonce;
    b->timeout_ms = timeout_ms;
    b->fds = malloc(sizeof(int) * (size_t)(rank == 0 ? nranks : 1));
    if (!b->fds) {
        st = epx__fail(err, EPX_ERR_NO_MEMORY, "bootstrap: out of memory");
        goto out;
    }
    for (int i = 0; i < (rank == 0 ? nranks : 1); i++) b->fds[i] = -1;

    epx__boot_info_t *mine = (epx__boot_info_t *)blob;
    if (rank == 0 && nranks > 1) EPX__CHECK_GOTO(epx__listen(&lfd, &mine->listen_addr, err), st, out);
    memcpy(blob + sizeof(epx__boot_info_t), info, info_len);
    EPX__CHECK_GOTO(epx__boot_rendezvous(&id, nranks, rank, blob, blob_len, table, deadline, err), st, out);

    /* Build the star around rank 0. */
    epx__link_hello_t star_hello = {id.nonce, rank, 0};
    if (rank == 0) {
        epx__acceptor_t *acc = malloc(sizeof *acc);
        if (!acc) {
            st = epx__fail(err, EPX_ERR_NO_MEMORY, "bootstrap: out of memory");
            goto out;
        }
        epx__acceptor_init(acc, lfd);
        epx__star_ctx_t ctx = {id.nonce, nranks, b->fds};
        for (int got = 0; got < nranks - 1 && st == EPX_SUCCESS; got++) {
            int fd = epx__accept_hello(acc, &star_hello, sizeof star_hello, deadline, 0, epx__star_hello_ok, &ctx);
            if (fd < 0)
                st = epx__fail(err, EPX_ERR_TIMEOUT, "bootstrap: only %d of %d ranks connected to rank 0", got + 1,
                               nranks);
            else
                b->fds[star_hello.rank] = fd;
        }
        epx__acceptor_close(acc);
        free(acc);
        if (st != EPX_SUCCESS) goto out;
    } else {
        const epx__boot_info_t *r0 = (const epx__boot_info_t *)table;
        EPX__CHECK_GOTO(epx__connect_until(&r0->listen_addr, deadline, &b->fds[0], err, "rank 0"), st, out);
        EPX__CHECK_GOTO(epx__send_all(b->fds[0], &star_hello, sizeof star_hello, deadline, err, "star hello"),
                        st, out);
    }
    for (int r = 0; r < nranks; r++)
        memcpy((char *)all_info + (size_t)r * info_len, table + (size_t)r * blob_len + sizeof(epx__boot_info_t),
               info_len);
    EPX_INFO(BOOT, "rank %d of %d: bootstrap done", rank, nranks);
out:
    if (lfd >= 0) close(lfd);
    free(blob);
    free(table);
    if (st != EPX_SUCCESS) {
        epx__boot_free(b);
        b = NULL;
    }
    *boot_out = b;
    return st;
}

/* A round that failed here (a peer closed, or the deadline passed) leaves the star out of
 * step: parts of it may still be in flight, so no later round could be read right. Shut
 * every socket of this rank down, so that the ranks still waiting in the round (on rank 0,
 * or rank 0 on them) fail at once with EPX_ERR_PEER_FAILURE instead of at their own
 * deadlines: a rank that dies in a round stops all of them within milliseconds. */
static epx_status_t epx__boot_round_end(epx__boot_t *b, epx_status_t st)
{
    /* Only the transport's failures: a round that completed with a verdict (the alltoall's
     * relay word) left the star in step. */
    if ((st != EPX_ERR_PEER_FAILURE && st != EPX_ERR_TIMEOUT) || !b->fds) return st;
    int n = b->rank == 0 ? b->nranks : 1;
    for (int i = 0; i < n; i++)
        if (b->fds[i] >= 0) shutdown(b->fds[i], SHUT_RDWR);
    return st;
}

static epx_status_t epx__boot_allgather_round(epx__boot_t *b, const void *mine, void *all, size_t len,
                                              epx__errbuf_t *err)
{
    uint64_t deadline = epx__deadline_after_ms(b->timeout_ms);
    memmove((char *)all + (size_t)b->rank * len, mine, len);
    if (b->nranks == 1) return EPX_SUCCESS;
    size_t total = (size_t)b->nranks * len;
    if (b->rank != 0) {
        EPX__CHECK(epx__send_all(b->fds[0], mine, len, deadline, err, "allgather to rank 0"));
        return epx__recv_all(b->fds[0], all, total, deadline, err, "allgather from rank 0");
    }
    for (int r = 1; r < b->nranks; r++) {
        epx_status_t st = epx__recv_all(b->fds[r], (char *)all + (size_t)r * len, len, deadline, err,
                                        "allgather from a rank");
        if (st != EPX_SUCCESS)
            return epx__fail(err, st, "bootstrap allgather: rank %d did not answer (%s)", r,
                             epx_status_name(st));
    }
    for (int r = 1; r < b->nranks; r++)
        EPX__CHECK(epx__send_all(b->fds[r], all, total, deadline, err, "allgather to a rank"));
    return EPX_SUCCESS;
}

epx_status_t epx__boot_allgather(epx__boot_t *b, const void *mine, void *all, size_t len, epx__errbuf_t *err)
{
    return epx__boot_round_end(b, epx__boot_allgather_round(b, mine, all, len, err));
}

/* Move `len` bytes through a small bounce buffer: received and dropped, or zeros sent. */
static epx_status_t epx__sock_drain(int fd, size_t len, bool sending, uint64_t deadline, epx__errbuf_t *err,
                                    const char *what)
{
    char buf[4096];
    if (sending) memset(buf, 0, sizeof buf);
    while (len > 0) {
        size_t n = EPX__MIN(len, sizeof buf);
        EPX__CHECK(epx__sock_io(fd, buf, n, sending, deadline, err, what));
        len -= n;
    }
    return EPX_SUCCESS;
}

static epx_status_t epx__boot_allgather_fail_round(epx__boot_t *b, const void *head, size_t head_len, size_t len,
                                                   epx__errbuf_t *err)
{
    uint64_t deadline = epx__deadline_after_ms(b->timeout_ms);
    head_len = EPX__MIN(head_len, len);
    if (b->nranks == 1) return EPX_SUCCESS;
    size_t total = (size_t)b->nranks * len;
    if (b->rank != 0) {
        EPX__CHECK(epx__send_all(b->fds[0], head, head_len, deadline, err, "allgather to rank 0"));
        EPX__CHECK(epx__sock_drain(b->fds[0], len - head_len, true, deadline, err, "allgather to rank 0"));
        return epx__sock_drain(b->fds[0], total, false, deadline, err, "allgather from rank 0");
    }
    for (int r = 1; r < b->nranks; r++) {
        epx_status_t st = epx__sock_drain(b->fds[r], len, false, deadline, err, "allgather from a rank");
        if (st != EPX_SUCCESS)
            return epx__fail(err, st, "bootstrap allgather: rank %d did not answer (%s)", r, epx_status_name(st));
    }
    /* Everyone gets my part in slot 0 and zeros for the others. */
    for (int r = 1; r < b->nranks; r++) {
        EPX__CHECK(epx__send_all(b->fds[r], head, head_len, deadline, err, "allgather to a rank"));
        EPX__CHECK(epx__sock_drain(b->fds[r], total - head_len, true, deadline, err, "allgather to a rank"));
    }
    return EPX_SUCCESS;
}

epx_status_t epx__boot_allgather_fail(epx__boot_t *b, const void *head, size_t head_len, size_t len,
                                      epx__errbuf_t *err)
{
    return epx__boot_round_end(b, epx__boot_allgather_fail_round(b, head, head_len, len, err));
}

/* Rank 0 starts what it sends each rank in an alltoall with this word: EPX_SUCCESS, or why it
 * could not relay the blocks (the rank's column then does not follow). */
typedef int64_t epx__relay_word_t;

static epx_status_t epx__boot_alltoall_round(epx__boot_t *b, const void *send, void *recv, size_t len,
                                             epx__errbuf_t *err)
{
    uint64_t deadline = epx__deadline_after_ms(b->timeout_ms);
    int R = b->nranks;
    size_t row = (size_t)R * len;
    epx__relay_word_t word;
    if (R == 1) {
        if (len) memmove(recv, send, len);
        return EPX_SUCCESS;
    }
    if (b->rank != 0) {
        EPX__CHECK(epx__send_all(b->fds[0], send, row, deadline, err, "alltoall to rank 0"));
        EPX__CHECK(epx__recv_all(b->fds[0], &word, sizeof word, deadline, err, "alltoall from rank 0"));
        if (word != EPX_SUCCESS)
            return epx__fail(err, EPX_ERR_REMOTE_INVALID, "bootstrap alltoall: rank 0 could not relay the blocks (%s)",
                             epx_status_name((epx_status_t)word));
        return epx__recv_all(b->fds[0], recv, row, deadline, err, "alltoall from rank 0");
    }
    /* Rank 0: every other rank's row (rank r's at (r-1) * row), then a column at a time. */
    char *m = row <= SIZE_MAX / (size_t)R ? malloc(EPX__MAX((size_t)R * row, (size_t)1)) : NULL;
    for (int r = 1; r < R; r++) {
        const char *what = "alltoall from a rank";
        epx_status_t st = m ? epx__recv_all(b->fds[r], m + (size_t)(r - 1) * row, row, deadline, err, what)
                            : epx__sock_drain(b->fds[r], row, false, deadline, err, what);
        if (st != EPX_SUCCESS) {
            free(m);
            return epx__fail(err, st, "bootstrap alltoall: rank %d did not answer (%s)", r, epx_status_name(st));
        }
    }
    word = m ? EPX_SUCCESS : EPX_ERR_NO_MEMORY;
    char *col = m ? m + (size_t)(R - 1) * row : NULL;
    for (int q = 0; q < R; q++) {
        char *dst = q == 0 ? recv : col;
        for (int r = 0; r < R && m && len; r++) {
            const char *from = r == 0 ? (const char *)send : m + (size_t)(r - 1) * row;
            memcpy(dst + (size_t)r * len, from + (size_t)q * len, len);
        }
        if (q == 0) continue;
        epx_status_t st = epx__send_all(b->fds[q], &word, sizeof word, deadline, err, "alltoall to a rank");
        if (st == EPX_SUCCESS && m) st = epx__send_all(b->fds[q], col, row, deadline, err, "alltoall to a rank");
        if (st != EPX_SUCCESS) {
            free(m);
            return st;
        }
    }
    if (!m)
        return epx__fail(err, EPX_ERR_NO_MEMORY,
                         "bootstrap alltoall: no room at rank 0 for %d x %d blocks of %zu bytes", R, R, len);
    free(m);
    return EPX_SUCCESS;
}

static epx_status_t epx__boot_alltoall_fail_round(epx__boot_t *b, const void *head, size_t head_len, size_t len,
                                                  epx__errbuf_t *err)
{
    uint64_t deadline = epx__deadline_after_ms(b->timeout_ms);
    int R = b->nranks;
    size_t row = (size_t)R * len;
    head_len = EPX__MIN(head_len, len);
    if (R == 1) return EPX_SUCCESS;
    if (b->rank != 0) {
        for (int q = 0; q < R; q++) {
            EPX__CHECK(epx__send_all(b->fds[0], head, head_len, deadline, err, "alltoall to rank 0"));
            EPX__CHECK(epx__sock_drain(b->fds[0], len - head_len, true, deadline, err, "alltoall to rank 0"));
        }
        epx__relay_word_t word;
        EPX__CHECK(epx__recv_all(b->fds[0], &word, sizeof word, deadline, err, "alltoall from rank 0"));
        return word == EPX_SUCCESS ? epx__sock_drain(b->fds[0], row, false, deadline, err, "alltoall from rank 0")
                                   : EPX_SUCCESS;
    }
    for (int r = 1; r < R; r++) {
        epx_status_t st = epx__sock_drain(b->fds[r], row, false, deadline, err, "alltoall from a rank");
        if (st != EPX_SUCCESS)
            return epx__fail(err, st, "bootstrap alltoall: rank %d did not answer (%s)", r, epx_status_name(st));
    }
    /* Every rank gets my block (head, zeros) first and zeros for the others'. */
    epx__relay_word_t word = EPX_SUCCESS;
    for (int q = 1; q < R; q++) {
        EPX__CHECK(epx__send_all(b->fds[q], &word, sizeof word, deadline, err, "alltoall to a rank"));
        EPX__CHECK(epx__send_all(b->fds[q], head, head_len, deadline, err, "alltoall to a rank"));
        EPX__CHECK(epx__sock_drain(b->fds[q], row - head_len, true, deadline, err, "alltoall to a rank"));
    }
    return EPX_SUCCESS;
}

epx_status_t epx__boot_alltoall(epx__boot_t *b, const void *send, void *recv, size_t len, epx__errbuf_t *err)
{
    return epx__boot_round_end(b, epx__boot_alltoall_round(b, send, recv, len, err));
}

epx_status_t epx__boot_alltoall_fail(epx__boot_t *b, const void *head, size_t head_len, size_t len, epx__errbuf_t *err)
{
    return epx__boot_round_end(b, epx__boot_alltoall_fail_round(b, head, head_len, len, err));
}

static epx_status_t epx__boot_allreduce_round(epx__boot_t *b, int64_t *v, size_t n, epx__errbuf_t *err)
{
    uint64_t deadline = epx__deadline_after_ms(b->timeout_ms);
    if (b->nranks == 1) return EPX_SUCCESS;
    size_t bytes = n * sizeof *v;
    if (b->rank != 0) {
        EPX__CHECK(epx__send_all(b->fds[0], v, bytes, deadline, err, "allreduce to rank 0"));
        return epx__recv_all(b->fds[0], v, bytes, deadline, err, "allreduce from rank 0");
    }
    int64_t chunk[512];
    for (int r = 1; r < b->nranks; r++)
        for (size_t i = 0; i < n;) {
            size_t k = EPX__MIN(n - i, EPX__ARRAY_LEN(chunk));
            epx_status_t st = epx__recv_all(b->fds[r], chunk, k * sizeof *v, deadline, err, "allreduce from a rank");
            if (st != EPX_SUCCESS)
                return epx__fail(err, st, "bootstrap allreduce: rank %d did not answer (%s)", r, epx_status_name(st));
            for (size_t j = 0; j < k; j++, i++) v[i] = (int64_t)((uint64_t)v[i] + (uint64_t)chunk[j]);
        }
    for (int r = 1; r < b->nranks; r++)
        EPX__CHECK(epx__send_all(b->fds[r], v, bytes, deadline, err, "allreduce to a rank"));
    return EPX_SUCCESS;
}

epx_status_t epx__boot_allreduce_sum(epx__boot_t *b, int64_t *v, size_t n, epx__errbuf_t *err)
{
    return epx__boot_round_end(b, epx__boot_allreduce_round(b, v, n, err));
}

epx_status_t epx__boot_barrier(epx__boot_t *b, epx__errbuf_t *err)
{
    char one = 1;
    char *all = malloc((size_t)b->nranks);
    if (!all) return epx__fail(err, EPX_ERR_NO_MEMORY, "bootstrap: out of memory");
    epx_status_t st = epx__boot_allgather(b, &one, all, 1, err);
    free(all);
    return st;
}

/* ---- Direct links between ranks ------------------------------------------------------ */

/* What starts every message of a links round. */
typedef struct {
    int64_t status;
    uint64_t len;
} epx__link_head_t;

/* One link's progress in a round: my head and data out, the peer's head and data in. */
typedef struct {
    size_t sent, got;
    epx__link_head_t in;
} epx__link_io_t;

struct epx__boot_links {
    int n, rank;
    const int *peer; /* ranks, n of them (points into fds' allocation) */
    int *fds;
    int64_t timeout_ms;
    epx__link_io_t *io; /* a round's progress and polls, per link (made once) */
    struct pollfd *pfd;
};

void epx__boot_links_close(epx__boot_links_t *l)
{
    if (!l) return;
    for (int i = 0; i < l->n; i++)
        if (l->fds[i] >= 0) close(l->fds[i]);
    free(l->fds), free(l->io), free(l->pfd);
    free(l);
}

/* A link from a lower peer of this rank, not yet connected. */
typedef struct {
    uint64_t nonce;
    const epx__boot_links_t *l;
} epx__links_ctx_t;

static int epx__links_slot(const epx__boot_links_t *l, int rank)
{
    for (int i = 0; i < l->n; i++)
        if (l->peer[i] == rank && rank < l->rank && l->fds[i] < 0) return i;
    return -1;
}

static bool epx__links_hello_ok(const void *hello, void *ctxp)
{
    const epx__links_ctx_t *ctx = ctxp;
    epx__link_hello_t h;
    memcpy(&h, hello, sizeof h);
    return h.nonce == ctx->nonce && epx__links_slot(ctx->l, h.rank) >= 0;
}

/* Connect to the peers above me, accept those below (the listen backlog holds the
 * connections made before their accept). Each link starts with a hello naming its rank. */
static epx_status_t epx__links_connect(epx__boot_links_t *l, int lfd, const struct sockaddr_storage *addr,
                                       uint64_t nonce, uint64_t deadline, epx__errbuf_t *err)
{
    epx__link_hello_t hello = {nonce, l->rank, 0};
    int below = 0;
    for (int i = 0; i < l->n; i++) {
        if (l->peer[i] < l->rank) {
            below++;
            continue;
        }
        char what[48];
        snprintf(what, sizeof what, "rank %d", l->peer[i]);
        EPX__CHECK(epx__connect_until(&addr[l->peer[i]], deadline, &l->fds[i], err, what));
        EPX__CHECK(epx__send_all(l->fds[i], &hello, sizeof hello, deadline, err, "link hello"));
    }
    if (below == 0) return EPX_SUCCESS;
    epx__acceptor_t *acc = malloc(sizeof *acc);
    if (!acc) return epx__fail(err, EPX_ERR_NO_MEMORY, "bootstrap links: out of memory");
    epx__acceptor_init(acc, lfd);
    epx__links_ctx_t ctx = {nonce, l};
    epx_status_t st = EPX_SUCCESS;
    for (int got = 0; got < below && st == EPX_SUCCESS; got++) {
        int fd = epx__accept_hello(acc, &hello, sizeof hello, deadline, 0, epx__links_hello_ok, &ctx);
        if (fd < 0)
            st = epx__fail(err, EPX_ERR_TIMEOUT, "bootstrap links: %d of %d lower ranks connected to rank %d", got,
                           below, l->rank);
        else
            l->fds[epx__links_slot(l, hello.rank)] = fd;
    }
    epx__acceptor_close(acc);
    free(acc);
    return st;
}

epx_status_t epx__boot_links_create(epx__boot_t *b, const int *peers, int n, epx__boot_links_t **out,
                                    epx__errbuf_t *err)
{
    *out = NULL;
    uint64_t deadline = epx__deadline_after_ms(b->timeout_ms);
    epx__boot_links_t *l = calloc(1, sizeof *l);
    int *fds = calloc(2 * (size_t)EPX__MAX(n, 1), sizeof *fds);
    struct sockaddr_storage mine, *all = calloc((size_t)b->nranks, sizeof *all);
    int lfd = -1;
    memset(&mine, 0, sizeof mine);
    epx__link_io_t *io = calloc((size_t)EPX__MAX(n, 1), sizeof *io);
    struct pollfd *pfd = calloc((size_t)EPX__MAX(n, 1), sizeof *pfd);
    epx_status_t local =
        l && fds && all && io && pfd ? EPX_SUCCESS : epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    if (local == EPX_SUCCESS) {
        l->n = n, l->rank = b->rank, l->timeout_ms = b->timeout_ms, l->fds = fds, l->peer = fds + n;
        l->io = io, l->pfd = pfd;
        for (int i = 0; i < n; i++) fds[i] = -1, fds[n + i] = peers[i];
        for (int i = 0; i < n && local == EPX_SUCCESS; i++)
            if (peers[i] < 0 || peers[i] >= b->nranks || peers[i] == b->rank)
                local = epx__fail(err, EPX_ERR_INTERNAL, "bootstrap links: rank %d is no peer of rank %d", peers[i],
                                  b->rank);
    }
    if (local == EPX_SUCCESS && n > 0) local = epx__listen(&lfd, &mine, err);
    if (local != EPX_SUCCESS) memset(&mine, 0, sizeof mine);
    /* Everyone's listener (zeros: none, or this rank failed: its peers fail alike). */
    epx_status_t st = all ? epx__boot_allgather(b, &mine, all, sizeof mine, err)
                          : epx__boot_allgather_fail(b, &mine, 0, sizeof mine, err);
    if (st == EPX_SUCCESS) st = local;
    for (int i = 0; i < n && st == EPX_SUCCESS; i++)
        if (all[peers[i]].ss_family == 0)
            st = epx__fail(err, EPX_ERR_REMOTE_INVALID, "bootstrap links: rank %d could not listen", peers[i]);
    if (st == EPX_SUCCESS) st = epx__links_connect(l, lfd, all, b->nonce, deadline, err);
    if (lfd >= 0) close(lfd);
    free(all);
    if (st == EPX_SUCCESS) {
        *out = l;
        return EPX_SUCCESS;
    }
    if (l && l->fds) epx__boot_links_close(l);
    else free(l), free(fds), free(io), free(pfd);
    return st;
}

epx_status_t epx__boot_links_watch(epx__boot_links_t *l, epx__errbuf_t *err)
{
    if (!l || l->n == 0) return EPX_SUCCESS;
    struct pollfd *pfd = l->pfd; /* free between rounds */
    for (int i = 0; i < l->n; i++) pfd[i] = (struct pollfd){l->fds[i], POLLIN, 0};
    if (poll(pfd, (nfds_t)l->n, 0) <= 0) return EPX_SUCCESS; /* nothing to read, no error: all alive */
    for (int i = 0; i < l->n; i++) {
        if (pfd[i].revents == 0) continue;
        /* Something to read: a byte of a later round (alive; left where it is), the end of the
         * stream (closed) or an error. */
        char c;
        ssize_t r = recv(l->fds[i], &c, 1, MSG_PEEK | MSG_DONTWAIT);
        if (r > 0 || (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))) continue;
        if (r == 0) return epx__fail(err, EPX_ERR_PEER_FAILURE, "bootstrap links: rank %d closed its link", l->peer[i]);
        return epx__fail(err, EPX_ERR_PEER_FAILURE, "bootstrap links: from rank %d: %s", l->peer[i], strerror(errno));
    }
    return EPX_SUCCESS;
}

/* A round that broke (a peer closed, the deadline passed, a message out of step): shut every
 * link down, so that the peers still in it fail at once, and the later rounds too. */
static epx_status_t epx__links_broken(epx__boot_links_t *l, epx_status_t st)
{
    for (int i = 0; i < l->n; i++)
        if (l->fds[i] >= 0) shutdown(l->fds[i], SHUT_RDWR);
    return st;
}

/* Move what link i can without blocking; *busy: a direction is not done yet. */
static epx_status_t epx__link_step(epx__boot_links_t *l, int i, epx__link_io_t *io, const epx__link_head_t *out,
                                   const void *sbuf, void *rbuf, size_t len, bool *busy, epx__errbuf_t *err)
{
    const size_t H = sizeof *out;
    char drop[4096]; /* what arrives for a rank without a buffer (it failed) */
    for (;;) {
        bool out_done = io->sent == H + out->len, in_done = io->got >= H && io->got == H + io->in.len;
        *busy = !out_done || !in_done;
        if (!*busy) return EPX_SUCCESS;
        ssize_t r;
        if (!out_done) {
            const char *p = io->sent < H ? (const char *)out + io->sent : (const char *)sbuf + (io->sent - H);
            r = send(l->fds[i], p, io->sent < H ? H - io->sent : H + out->len - io->sent, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (r > 0) {
                io->sent += (size_t)r;
                continue;
            }
            if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return epx__fail(err, EPX_ERR_PEER_FAILURE, "bootstrap links: to rank %d: %s", l->peer[i],
                                 strerror(errno));
            if (in_done) return EPX_SUCCESS;
        }
        size_t at = io->got - H, k = io->got < H ? H - io->got : EPX__MIN(io->in.len - at, rbuf ? SIZE_MAX : sizeof drop);
        char *p = io->got < H ? (char *)&io->in + io->got : rbuf ? (char *)rbuf + at : drop;
        r = recv(l->fds[i], p, k, MSG_DONTWAIT);
        if (r == 0) return epx__fail(err, EPX_ERR_PEER_FAILURE, "bootstrap links: rank %d closed its link", l->peer[i]);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return EPX_SUCCESS;
        if (r < 0)
            return epx__fail(err, EPX_ERR_PEER_FAILURE, "bootstrap links: from rank %d: %s", l->peer[i],
                             strerror(errno));
        io->got += (size_t)r;
        /* A failed peer sends no data; a rank without a buffer (it failed: its length may not
         * be the round's) drops whatever comes. */
        if (io->got == H && (io->in.status == EPX_SUCCESS ? rbuf && io->in.len != len : io->in.len != 0))
            return epx__fail(err, EPX_ERR_INTERNAL, "bootstrap links: rank %d sent %llu bytes (status %lld), %zu expected",
                             l->peer[i], (unsigned long long)io->in.len, (long long)io->in.status, len);
    }
}

epx_status_t epx__boot_links_xchg(epx__boot_links_t *l, epx_status_t status, const void *const *send,
                                  void *const *recv, size_t len, epx__errbuf_t *err)
{
    if (l->n == 0) return EPX_SUCCESS;
    uint64_t deadline = epx__deadline_after_ms(l->timeout_ms);
    int n = l->n;
    epx__link_head_t out = {status, status == EPX_SUCCESS ? len : 0};
    epx__link_io_t *io = l->io;
    struct pollfd *pfd = l->pfd;
    memset(io, 0, sizeof *io * (size_t)n);
    epx_status_t st = EPX_SUCCESS;
    while (st == EPX_SUCCESS) {
        int busy = 0;
        for (int i = 0; i < n && st == EPX_SUCCESS; i++) {
            bool b = false;
            st = epx__link_step(l, i, &io[i], &out, send ? send[i] : NULL, recv ? recv[i] : NULL, len, &b, err);
            bool want_out = io[i].sent < sizeof out + out.len;
            bool want_in = io[i].got < sizeof out || io[i].got < sizeof out + io[i].in.len;
            pfd[i] = (struct pollfd){b ? l->fds[i] : -1, (short)((want_out ? POLLOUT : 0) | (want_in ? POLLIN : 0)), 0};
            busy += b;
        }
        if (st != EPX_SUCCESS || busy == 0) break;
        int left = epx__ms_left(deadline);
        if (left == 0) {
            int late = 0, first = -1;
            for (int i = 0; i < n; i++)
                if (pfd[i].fd >= 0) late++, first = first < 0 ? l->peer[i] : first;
            st = epx__fail(err, EPX_ERR_TIMEOUT, "bootstrap links: rank %d%s did not finish a round in time", first,
                           late > 1 ? " (and others)" : "");
            break;
        }
        poll(pfd, (nfds_t)n, left);
    }
    epx_status_t remote = EPX_SUCCESS;
    /* A peer's failed status: a round that broke there (a dead or late rank behind it) reads
     * as a peer failure here too; any other as a remote rank's rejection. */
    for (int i = 0; i < n && st == EPX_SUCCESS && remote == EPX_SUCCESS; i++) {
        epx_status_t s = (epx_status_t)io[i].in.status;
        if (s == EPX_SUCCESS) continue;
        bool broke = s == EPX_ERR_PEER_FAILURE || s == EPX_ERR_TIMEOUT;
        remote = epx__fail(err, broke ? EPX_ERR_PEER_FAILURE : EPX_ERR_REMOTE_INVALID,
                           broke ? "bootstrap links: rank %d could not complete the round (%s)"
                                 : "bootstrap links: rank %d took part in the round with a failure (%s)",
                           l->peer[i], epx_status_name(s));
    }
    return st != EPX_SUCCESS ? epx__links_broken(l, st) : remote;
}
