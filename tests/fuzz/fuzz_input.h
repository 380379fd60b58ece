/*
 * Reading a fuzzer's bytes as fields: each read takes the next bytes (zeros once the input
 * is used up), so every input, however short, decodes to some case.
 */
#ifndef EPX_FUZZ_INPUT_H
#define EPX_FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct {
    const uint8_t *p;
    size_t n;
} fuzz_in_t;

static inline uint64_t fuzz_bytes(fuzz_in_t *in, int count)
{
    uint64_t v = 0;
    for (int i = 0; i < count; i++) {
        uint8_t b = 0;
        if (in->n > 0) {
            b = *in->p++;
            in->n--;
        }
        v |= (uint64_t)b << (8 * i);
    }
    return v;
}
static inline uint32_t fuzz_u8(fuzz_in_t *in) { return (uint32_t)fuzz_bytes(in, 1); }
static inline uint32_t fuzz_u16(fuzz_in_t *in) { return (uint32_t)fuzz_bytes(in, 2); }
static inline uint32_t fuzz_u32(fuzz_in_t *in) { return (uint32_t)fuzz_bytes(in, 4); }
/* A value in [0, n) (n >= 1). */
static inline int fuzz_below(fuzz_in_t *in, int n) { return (int)(fuzz_u16(in) % (uint32_t)n); }

/* A mismatch with the reference: print it and abort, which libFuzzer reports as a crash. */
#define FUZZ_CHECK(cond, ...)                                                                 \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "fuzz check failed at %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fprintf(stderr, "\n");                                                            \
            abort();                                                                          \
        }                                                                                     \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#endif
