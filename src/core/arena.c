/*
 * src/core: arenas (core.h): a chain of blocks, the newest first; an allocation takes the
 * next aligned bytes of the newest block, or a new block when they do not fit.
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"

struct epx__arena_blk {
    epx__arena_blk_t *next;
    size_t cap, used; /* bytes of data, after the header */
};

enum { EPX__ARENA_ALIGN = 64, EPX__ARENA_MIN = 64 << 10 };

static size_t epx__blk_hdr(void) { return EPX__ALIGN_UP(sizeof(epx__arena_blk_t), (size_t)EPX__ARENA_ALIGN); }

static char *epx__blk_data(epx__arena_blk_t *b) { return (char *)b + epx__blk_hdr(); }

void *epx__arena_alloc(epx__arena_t *a, size_t n, size_t size, bool zero)
{
    if (size && n > (SIZE_MAX - 2 * EPX__ARENA_ALIGN) / size / 2) return NULL;
    size_t bytes = EPX__ALIGN_UP(EPX__MAX(n * size, (size_t)1), (size_t)EPX__ARENA_ALIGN);
    epx__arena_blk_t *b = a->blk;
    if (!b || b->cap - b->used < bytes) {
        size_t cap = EPX__MAX(bytes, (size_t)EPX__ARENA_MIN);
        if (!b) cap = EPX__MAX(cap, a->want);
        else cap = EPX__MAX(cap, 2 * b->cap);
        void *mem = NULL;
        if (posix_memalign(&mem, EPX__ARENA_ALIGN, epx__blk_hdr() + cap) != 0) return NULL;
        b = mem;
        b->next = a->blk, b->cap = cap, b->used = 0;
        a->blk = b;
    }
    char *p = epx__blk_data(b) + b->used;
    b->used += bytes;
    if (zero) memset(p, 0, bytes);
    return p;
}

void epx__arena_reset(epx__arena_t *a)
{
    if (!a->blk) return;
    if (!a->blk->next) {
        a->blk->used = 0;
        return;
    }
    size_t total = 0; /* several blocks: next time one block of what they all held */
    for (epx__arena_blk_t *b = a->blk; b; b = b->next) total += b->cap;
    epx__arena_free(a);
    a->want = total;
}

void epx__arena_free(epx__arena_t *a)
{
    for (epx__arena_blk_t *b = a->blk, *next; b; b = next) next = b->next, free(b);
    a->blk = NULL;
}

size_t epx__arena_capacity(const epx__arena_t *a)
{
    if (!a->blk) return a->want;
    return a->blk->next ? a->want : a->blk->cap;
}

size_t epx__arena_need(size_t n, size_t size)
{
    if (size && n > (SIZE_MAX - 2 * EPX__ARENA_ALIGN) / size / 2) return SIZE_MAX;
    return EPX__ALIGN_UP(EPX__MAX(n * size, (size_t)1), (size_t)EPX__ARENA_ALIGN);
}

void epx__arena_need_add(size_t *bytes, size_t n, size_t size)
{
    size_t b = epx__arena_need(n, size);
    *bytes = b > SIZE_MAX - *bytes ? SIZE_MAX : *bytes + b;
}

bool epx__arena_reserve(epx__arena_t *a, size_t bytes)
{
    epx__arena_blk_t *b = a->blk;
    size_t used = b ? b->used : 0;
    if (!epx__arena_alloc(a, bytes, 1, false)) return false; /* in the newest block, or a new one */
    a->blk->used = a->blk == b ? used : 0;
    return true;
}
