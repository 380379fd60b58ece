/*
 * Fuzz target: the unique id's text form (epx_unique_id_from_string / _to_string).
 *
 * The first byte picks the direction:
 *   text  the rest is a string (NUL-terminated here; embedded NULs cut it). Parsing must
 *         not crash; when it succeeds, format -> parse must give the same id bytes and
 *         format again the same text, and the text must be canonical-equivalent: same
 *         port and nonce as the input says.
 *   bytes the rest fills the 128 id bytes. Formatting must not crash and must fail for
 *         ids that are not valid; when it succeeds, parse -> format gives the same text,
 *         into buffers of every length (too short fails cleanly, never overflows).
 */
#include <string.h>

#include "epx.h"
#include "fuzz_input.h"

static void round_trip(const epx_unique_id_t *id, const char *text)
{
    epx_unique_id_t again;
    char text2[EPX_UNIQUE_ID_STRLEN];
    FUZZ_CHECK(strlen(text) < EPX_UNIQUE_ID_STRLEN, "text of %zu chars", strlen(text));
    FUZZ_CHECK(epx_unique_id_from_string(text, &again) == EPX_SUCCESS, "formatted id \"%s\" does not parse: %s", text,
               epx_get_last_error());
    FUZZ_CHECK(epx_unique_id_to_string(&again, text2, sizeof text2) == EPX_SUCCESS, "re-parsed id does not format");
    FUZZ_CHECK(strcmp(text, text2) == 0, "\"%s\" -> parse -> format \"%s\"", text, text2);
    if (id) FUZZ_CHECK(memcmp(id, &again, sizeof again) == 0, "\"%s\": parse -> format -> parse changed the id", text);
    /* Every buffer length: success exactly when the text and its NUL fit. */
    size_t need = strlen(text) + 1;
    for (size_t len = 1; len <= need; len++) {
        char *small = malloc(len);
        epx_status_t st = epx_unique_id_to_string(&again, small, len);
        FUZZ_CHECK((st == EPX_SUCCESS) == (len == need), "buffer of %zu bytes (text needs %zu): status %d", len, need,
                   (int)st);
        if (st == EPX_SUCCESS) FUZZ_CHECK(strcmp(small, text) == 0, "short buffer got \"%s\"", small);
        free(small);
    }
}

/* Port and nonce as the text says (the address is checked by the round trip). */
static void check_fields(const char *text, const char *formatted)
{
    const char *a = strrchr(text, ':'), *b = strrchr(formatted, ':');
    FUZZ_CHECK(a && b && strcasecmp(a, b) == 0, "nonce of \"%s\" became \"%s\"", text, formatted);
    const char *pa = a - 1, *pb = b - 1;
    while (pa > text && *pa != ':') pa--;
    while (pb > formatted && *pb != ':') pb--;
    FUZZ_CHECK(strtoul(pa + 1, NULL, 10) == strtoul(pb + 1, NULL, 10), "port of \"%s\" became \"%s\"", text,
               formatted);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) return 0;
    if (data[0] & 1) {
        char *text = malloc(size);
        memcpy(text, data + 1, size - 1);
        text[size - 1] = '\0';
        epx_unique_id_t id;
        memset(&id, 0x5A, sizeof id);
        if (epx_unique_id_from_string(text, &id) == EPX_SUCCESS) {
            char out[EPX_UNIQUE_ID_STRLEN];
            FUZZ_CHECK(strlen(text) < EPX_UNIQUE_ID_STRLEN, "accepted %zu chars", strlen(text));
            FUZZ_CHECK(epx_unique_id_to_string(&id, out, sizeof out) == EPX_SUCCESS, "parsed \"%s\" does not format",
                       text);
            check_fields(text, out);
            round_trip(&id, out);
        }
        free(text);
        return 0;
    }
    epx_unique_id_t id;
    memset(&id, 0, sizeof id);
    memcpy(id.internal, data + 1, size - 1 < sizeof id ? size - 1 : sizeof id);
    char out[EPX_UNIQUE_ID_STRLEN];
    if (epx_unique_id_to_string(&id, out, sizeof out) == EPX_SUCCESS) round_trip(NULL, out);
    return 0;
}
