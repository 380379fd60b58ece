/* Fault injection (EPX_FAULT): parsing, and the actions the transport hooks call. */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fault.h"

/* Entries that fired in this process (bit = index in EPX_FAULT). */
static _Atomic unsigned epx__fault_fired;

static const char *const epx__fault_names[] = {"?", "delay", "kill", "count", "fail", "nomem", "slow"};
static const char *const epx__fault_at_names[] = {"host", "mapped", "enqueue", "launched"};

static bool epx__fault_number(const char *v, long long lo, long long hi, long long *out)
{
    char *end = NULL;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) return false;
    *out = x;
    return true;
}

static char *epx__trim(char *s)
{
    while (*s == ' ' || *s == '\t') s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t')) s[--n] = '\0';
    return s;
}

/* One "kind:key=value,..." entry. */
static epx_status_t epx__fault_entry(char *text, int index, epx__fault_spec_t *s, epx__errbuf_t *err)
{
    char *colon = strchr(text, ':');
    if (!colon)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "EPX_FAULT entry %d \"%s\": expected KIND:rank=R,step=N[,ms=M][,at=WHEN]",
                         index + 1, text);
    *colon = '\0';
    char *kind = epx__trim(text);
    *s = (epx__fault_spec_t){0, index, -1, 0, -1, EPX__FAULT_AT_HOST};
    for (int k = 1; k <= EPX__FAULT_SLOW; k++)
        if (!strcmp(kind, epx__fault_names[k])) s->kind = k;
    if (!s->kind)
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT,
                         "EPX_FAULT entry %d: unknown fault \"%s\" (delay, kill, count, fail, nomem or slow)",
                         index + 1, kind);
    if (s->kind == EPX__FAULT_FAIL) s->at = EPX__FAULT_AT_ENQUEUE;
    long long step = -1; /* none given */
    char *save = NULL;
    for (char *kv = strtok_r(colon + 1, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq)
            return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "EPX_FAULT entry %d: \"%s\" is not key=value", index + 1, kv);
        *eq = '\0';
        char *key = epx__trim(kv), *val = epx__trim(eq + 1);
        long long v = 0;
        bool ok;
        if (!strcmp(key, "rank"))
            ok = epx__fault_number(val, 0, 1 << 20, &v), s->rank = (int)v;
        else if (!strcmp(key, "step"))
            ok = epx__fault_number(val, 0, UINT32_MAX, &v), step = v;
        else if (!strcmp(key, "ms") && (s->kind == EPX__FAULT_DELAY || s->kind == EPX__FAULT_SLOW))
            ok = epx__fault_number(val, 0, 24 * 3600 * 1000, &v), s->ms = (int)v;
        else if (!strcmp(key, "at") && s->kind != EPX__FAULT_COUNT && s->kind != EPX__FAULT_NOMEM &&
                 s->kind != EPX__FAULT_SLOW) {
            int first = s->kind == EPX__FAULT_FAIL ? EPX__FAULT_AT_ENQUEUE : EPX__FAULT_AT_HOST;
            int last = s->kind == EPX__FAULT_KILL ? EPX__FAULT_AT_LAUNCHED : EPX__FAULT_AT_ENQUEUE;
            ok = false;
            for (int a = first; a <= last; a++)
                if (!strcmp(val, epx__fault_at_names[a])) ok = true, s->at = a;
            if (!ok)
                return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "EPX_FAULT entry %d (%s): at=%s (%s)", index + 1, kind,
                                 val,
                                 s->kind == EPX__FAULT_FAIL   ? "only enqueue"
                                 : s->kind == EPX__FAULT_KILL ? "host, mapped, enqueue or launched"
                                                              : "host, mapped or enqueue");
        }
        else
            return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "EPX_FAULT entry %d (%s): unknown key \"%s\"", index + 1,
                             kind, key);
        if (!ok)
            return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "EPX_FAULT entry %d (%s): %s=%s is out of range", index + 1,
                             kind, key, val);
    }
    bool timed = s->kind == EPX__FAULT_DELAY || s->kind == EPX__FAULT_SLOW;
    if (s->rank < 0 || step < 0 || (timed && s->ms < 0))
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "EPX_FAULT entry %d (%s): needs rank=R and step=N%s", index + 1,
                         kind, timed ? " and ms=M" : "");
    if (step == 0 && (s->kind != EPX__FAULT_KILL || s->at != EPX__FAULT_AT_HOST))
        return epx__fail(err, EPX_ERR_INVALID_ARGUMENT,
                         "EPX_FAULT entry %d (%s): step=0 (the communicator's creation) takes only kill at host", index + 1,
                         kind);
    s->step = (uint32_t)step;
    return EPX_SUCCESS;
}

epx_status_t epx__fault_parse(const char *text, int rank, epx__fault_t *f, epx__errbuf_t *err)
{
    memset(f, 0, sizeof *f);
    f->rank = rank;
    if (!text || !*text) return EPX_SUCCESS;
    char *copy = strdup(text);
    if (!copy) return epx__fail(err, EPX_ERR_NO_MEMORY, "out of memory");
    epx_status_t st = EPX_SUCCESS;
    char *save = NULL;
    for (char *e = strtok_r(copy, ";", &save); e && st == EPX_SUCCESS; e = strtok_r(NULL, ";", &save)) {
        if (!*epx__trim(e)) continue;
        if (f->n == EPX__FAULT_MAX) {
            st = epx__fail(err, EPX_ERR_INVALID_ARGUMENT, "EPX_FAULT: more than %d entries", EPX__FAULT_MAX);
            break;
        }
        epx__fault_spec_t s;
        st = epx__fault_entry(e, f->n, &s, err);
        if (st != EPX_SUCCESS) break;
        f->spec[f->n++] = s;
        /* Entries that fired already (on an earlier communicator) cost nothing. */
        if (s.rank == rank && !(atomic_load(&epx__fault_fired) & (1u << s.index))) f->armed = true;
    }
    free(copy);
    if (st != EPX_SUCCESS) memset(f, 0, sizeof *f);
    else if (f->armed)
        EPX_WARN(INIT, "rank %d: fault injection armed (EPX_FAULT=%s)", rank, text);
    return st;
}

static bool epx__fault_find(const epx__fault_t *f, int kind, uint32_t step, int at, bool take, epx__fault_spec_t *out)
{
    for (int i = 0; i < f->n; i++) {
        const epx__fault_spec_t *s = &f->spec[i];
        if (s->kind != kind || s->rank != f->rank || s->step != step || s->at != at) continue;
        unsigned bit = 1u << s->index;
        if (!take) {
            if (atomic_load(&epx__fault_fired) & bit) continue;
            *out = *s;
            return true;
        }
        if (atomic_fetch_or(&epx__fault_fired, bit) & bit) continue;
        *out = *s;
        EPX_WARN(COLL, "rank %d: injecting fault \"%s\" at operation %u (%s)", f->rank, epx__fault_names[kind], step,
                 epx__fault_at_names[at]);
        return true;
    }
    return false;
}

bool epx__fault_take_at(const epx__fault_t *f, int kind, uint32_t step, int at, epx__fault_spec_t *out)
{
    return epx__fault_find(f, kind, step, at, true, out);
}

bool epx__fault_take(const epx__fault_t *f, int kind, uint32_t step, epx__fault_spec_t *out)
{
    return epx__fault_find(f, kind, step, EPX__FAULT_AT_HOST, true, out);
}

bool epx__fault_due(const epx__fault_t *f, int kind, uint32_t step, int at, epx__fault_spec_t *out)
{
    return epx__fault_find(f, kind, step, at, false, out);
}

void epx__fault_delay(const epx__fault_t *f, uint32_t step) { epx__fault_delay_at(f, step, EPX__FAULT_AT_HOST); }

void epx__fault_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

void epx__fault_delay_at(const epx__fault_t *f, uint32_t step, int at)
{
    epx__fault_spec_t s;
    if (epx__fault_take_at(f, EPX__FAULT_DELAY, step, at, &s)) epx__fault_sleep_ms(s.ms);
}

void epx__fault_slow(epx__fault_t *f, uint32_t step)
{
    epx__fault_spec_t s;
    if (epx__fault_take(f, EPX__FAULT_SLOW, step, &s)) f->slow_step = step, f->slow_ms = s.ms;
    if (f->slow_ms > 0 && f->slow_step == step) epx__fault_sleep_ms(f->slow_ms);
}

void epx__fault_creation(const epx__fault_t *f)
{
    epx__fault_spec_t s;
    if (f && f->armed && epx__fault_take(f, EPX__FAULT_KILL, 0, &s)) epx__fault_exit(&s, 0, 0);
}

_Noreturn void epx__fault_exit(const epx__fault_spec_t *spec, int posted, int peers)
{
    if (spec->step == 0)
        EPX_WARN(INIT, "fault: rank %d ends its process while its communicator is being created (exit %d)", spec->rank,
                 EPX__FAULT_EXIT_CODE);
    else
        EPX_WARN(COLL, "fault: rank %d ends its process in operation %u after posting to %d of %d peers (exit %d)",
                 spec->rank, spec->step, posted, peers, EPX__FAULT_EXIT_CODE);
    fflush(NULL);
    _exit(EPX__FAULT_EXIT_CODE);
}
