/*
 * LD_PRELOAD shim for test_oom: once armed (epx_test_oom_arm(n)), the n-th allocation that
 * libepx.so itself makes (malloc, calloc, realloc, posix_memalign, aligned_alloc, and mmap
 * of shared memory; callers elsewhere, MPI's included, are not counted) fails with ENOMEM.
 * glibc only (__libc_*).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static _Atomic long oom_n, oom_count;
static _Atomic int oom_fired;
static uintptr_t oom_lo, oom_hi; /* libepx.so's mappings */

/* Arm (n >= 1) or disarm (0). Returns whether the previous arming fired. */
__attribute__((visibility("default"))) int epx_test_oom_arm(long n)
{
    if (!oom_hi) {
        FILE *f = fopen("/proc/self/maps", "r");
        char line[512];
        while (f && fgets(line, sizeof line, f)) {
            unsigned long a, b;
            if (strstr(line, "libepx.so") && sscanf(line, "%lx-%lx", &a, &b) == 2) {
                if (!oom_lo || a < oom_lo) oom_lo = a;
                if (b > oom_hi) oom_hi = b;
            }
        }
        if (f) fclose(f);
    }
    int fired = atomic_exchange(&oom_fired, 0);
    atomic_store(&oom_count, 0);
    atomic_store(&oom_n, n);
    return fired;
}

static int oom_fail(void *caller)
{
    long n = atomic_load_explicit(&oom_n, memory_order_relaxed);
    if (!n || (uintptr_t)caller < oom_lo || (uintptr_t)caller >= oom_hi) return 0;
    if (atomic_fetch_add(&oom_count, 1) + 1 != n) return 0;
    atomic_store(&oom_fired, 1);
    errno = ENOMEM;
    return 1;
}

#define CALLER __builtin_return_address(0)
void *malloc(size_t s) { return oom_fail(CALLER) ? NULL : __libc_malloc(s); }
void *calloc(size_t n, size_t s) { return oom_fail(CALLER) ? NULL : __libc_calloc(n, s); }
void *realloc(void *p, size_t s) { return oom_fail(CALLER) ? NULL : __libc_realloc(p, s); }
void *aligned_alloc(size_t a, size_t s) { return oom_fail(CALLER) ? NULL : __libc_memalign(a, s); }
int posix_memalign(void **p, size_t a, size_t s)
{
    if (oom_fail(CALLER)) return ENOMEM;
    void *q = __libc_memalign(a, s);
    if (!q) return ENOMEM;
    *p = q;
    return 0;
}

void *mmap(void *a, size_t l, int prot, int flags, int fd, off_t o)
{
    static void *(*real)(void *, size_t, int, int, int, off_t);
    if (!real) real = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
    if ((flags & MAP_SHARED) && oom_fail(CALLER)) return MAP_FAILED;
    return real(a, l, prot, flags, fd, o);
}
