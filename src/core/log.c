/* Logging: EPX_DEBUG level x EPX_DEBUG_SUBSYS mask, to stderr or EPX_DEBUG_FILE. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

static pthread_once_t epx__log_once = PTHREAD_ONCE_INIT;
static epx__log_level_t epx__log_level = EPX__LOG_WARN;
static unsigned epx__log_mask = ~0u;
static FILE *epx__log_file;
/* The rank the log lines name: the last communicator made in this process sets it (several,
 * on threads of one process, may do so at once). */
static _Atomic int epx__log_rank = -1;
static pthread_mutex_t epx__log_mutex = PTHREAD_MUTEX_INITIALIZER;

static unsigned epx__subsys_bit(const char *name, size_t len)
{
#define EPX__SUBSYS_MATCH_(n, bit) \
    if (len == strlen(#n) && strncasecmp(name, #n, len) == 0) return bit;
    EPX__SUBSYS_MAP(EPX__SUBSYS_MATCH_)
#undef EPX__SUBSYS_MATCH_
    if (len == 3 && strncasecmp(name, "ALL", 3) == 0) return ~0u;
    return 0;
}

static void epx__log_init(void)
{
    const char *lvl = epx__param_str(EPX__P_DEBUG);
    if (!strcasecmp(lvl, "NONE") || !strcasecmp(lvl, "0"))
        epx__log_level = EPX__LOG_NONE;
    else if (!strcasecmp(lvl, "INFO"))
        epx__log_level = EPX__LOG_INFO;
    else if (!strcasecmp(lvl, "TRACE"))
        epx__log_level = EPX__LOG_TRACE;
    else {
        epx__log_level = EPX__LOG_WARN;
        if (lvl[0] && strcasecmp(lvl, "WARN"))
            fprintf(stderr, "epx: EPX_DEBUG=%s is not NONE, WARN, INFO or TRACE; logging at WARN\n", lvl);
    }

    /* "ALL", "INIT,COLL", "^SHM" (everything but SHM). */
    const char *s = epx__param_str(EPX__P_DEBUG_SUBSYS);
    bool negate = s[0] == '^';
    unsigned mask = 0;
    for (const char *p = s + negate; *p;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        unsigned bit = epx__subsys_bit(p, len);
        if (len && !bit) fprintf(stderr, "epx: EPX_DEBUG_SUBSYS: no subsystem '%.*s' (ignored)\n", (int)len, p);
        mask |= bit;
        p += len + (comma != NULL);
    }
    /* Nothing known named (an empty value, or only unknown names): every subsystem. */
    epx__log_mask = negate ? ~mask : mask ? mask : ~0u;

    epx__log_file = stderr;
    const char *path = epx__param_str(EPX__P_DEBUG_FILE);
    if (path[0]) {
        char name[512], host[128] = "host";
        gethostname(host, sizeof host - 1);
        size_t o = 0;
        for (const char *p = path; *p && o + 32 < sizeof name; p++) {
            if (p[0] == '%' && p[1] == 'h') {
                o += (size_t)snprintf(name + o, sizeof name - o, "%s", host);
                p++;
            } else if (p[0] == '%' && p[1] == 'p') {
                o += (size_t)snprintf(name + o, sizeof name - o, "%d", (int)getpid());
                p++;
            } else {
                name[o++] = *p;
            }
        }
        name[o] = '\0';
        FILE *f = fopen(name, "a");
        if (f) {
            setvbuf(f, NULL, _IOLBF, 0);
            epx__log_file = f;
        } else {
            fprintf(stderr, "epx: cannot open EPX_DEBUG_FILE %s; logging to stderr\n", name);
        }
    }
}

bool epx__log_enabled(epx__log_level_t level, epx__subsys_t subsys)
{
    pthread_once(&epx__log_once, epx__log_init);
    return level <= epx__log_level && (epx__log_mask & (unsigned)subsys);
}

void epx__log_set_rank(int rank) { atomic_store_explicit(&epx__log_rank, rank, memory_order_relaxed); }

static const char *epx__subsys_name(epx__subsys_t s)
{
#define EPX__SUBSYS_NAME_(n, bit) \
    if (s == bit) return #n;
    EPX__SUBSYS_MAP(EPX__SUBSYS_NAME_)
#undef EPX__SUBSYS_NAME_
    return "?";
}

void epx__log(epx__log_level_t level, epx__subsys_t subsys, const char *fmt, ...)
{
    static const char *names[] = {"NONE", "WARN", "INFO", "TRACE"};
    char line[1024];
    int rank = atomic_load_explicit(&epx__log_rank, memory_order_relaxed);
    int n =
        snprintf(line, sizeof line, "epx %d:%d %s %s ", (int)getpid(), rank, names[level], epx__subsys_name(subsys));
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof line) vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&epx__log_mutex);
    fprintf(epx__log_file, "%s\n", line);
    fflush(epx__log_file);
    pthread_mutex_unlock(&epx__log_mutex);
}
