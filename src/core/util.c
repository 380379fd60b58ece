/* Clocks, deadlines, hashing, OS randomness. */
#include <fcntl.h>
#include <stdatomic.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

uint64_t epx__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t epx__now_coarse_ns(void)
{
#ifdef CLOCK_MONOTONIC_COARSE
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
#else
    return epx__now_ns();
#endif
}

uint64_t epx__coarse_tick_ns(void)
{
    static _Atomic uint64_t tick; /* 0 until read; every thread reads the same value */
    uint64_t t = atomic_load_explicit(&tick, memory_order_relaxed);
    if (t) return t;
    struct timespec res = {0, 0};
#ifdef CLOCK_MONOTONIC_COARSE
    if (clock_getres(CLOCK_MONOTONIC_COARSE, &res) != 0) res = (struct timespec){0, 0};
#endif
    t = (uint64_t)res.tv_sec * 1000000000ull + (uint64_t)res.tv_nsec;
    t = t ? t : 1; /* the precise clock (or no answer): nothing to allow for */
    atomic_store_explicit(&tick, t, memory_order_relaxed);
    return t;
}

uint64_t epx__ms_to_ns(int64_t ms)
{
    if (ms <= 0) return 0;
    return (uint64_t)ms > UINT64_MAX / 1000000ull ? UINT64_MAX : (uint64_t)ms * 1000000ull;
}

uint64_t epx__deadline_after_ms(int64_t ms)
{
    uint64_t now = epx__now_ns();
    if (ms <= 0) return now;
    /* A huge timeout (EPX_TIMEOUT_MS=9223372036854775807 for "never") must not wrap around
     * to a deadline in the past: saturate, so that it reads as no deadline at all. */
    if ((uint64_t)ms > (UINT64_MAX - now) / 1000000ull) return UINT64_MAX;
    return now + (uint64_t)ms * 1000000ull;
}

uint64_t epx__hash64(const void *data, size_t len, uint64_t seed)
{
    /* FNV-1a, 64 bit, seeded. */
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull ^ seed;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

uint64_t epx__random64(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof v, 0) == (ssize_t)sizeof v) return v;
    /* Fallback: time and pid mixed; only used to name objects, not for security. */
    uint64_t seed = epx__now_ns() ^ ((uint64_t)getpid() << 32);
    return epx__hash64(&seed, sizeof seed, 0x9e3779b97f4a7c15ull);
}
