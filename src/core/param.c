/* The tunables registry: every EPX_* variable, its type, default and description, parsed
 * once on first use. */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

typedef enum { EPX__PT_INT, EPX__PT_SIZE, EPX__PT_STR } epx__param_type_t;
#define EPX__PT_INT_ EPX__PT_INT
#define EPX__PT_SIZE_ EPX__PT_SIZE
#define EPX__PT_STR_ EPX__PT_STR

typedef struct {
    const char *env;
    epx__param_type_t type;
    const char *type_name;
    const char *def;
    const char *desc;
} epx__param_def_t;

static const epx__param_def_t epx__params[EPX__P_COUNT] = {
#define EPX__PARAM_DEF_(id, env, type, def, desc) {env, EPX__PT_##type##_, #type, def, desc},
    EPX__PARAM_MAP(EPX__PARAM_DEF_)
#undef EPX__PARAM_DEF_
};

static struct {
    int64_t i;
    char text[256];
} epx__param_values[EPX__P_COUNT];
static pthread_once_t epx__params_once = PTHREAD_ONCE_INIT;

bool epx__parse_size(const char *text, int64_t *out)
{
    if (!text || !*text) return false;
    errno = 0;
    char *end = NULL;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || v < 0) return false;
    int64_t mult = 1;
    if (*end) {
        switch (*end) {
        case 'k': case 'K': mult = 1ll << 10; break;
        case 'm': case 'M': mult = 1ll << 20; break;
        case 'g': case 'G': mult = 1ll << 30; break;
        default: return false;
        }
        end++;
        if (*end == 'i' || *end == 'B') end++;
        if (*end == 'B') end++;
        if (*end) return false;
    }
    if (v > INT64_MAX / mult) return false;
    *out = (int64_t)v * mult;
    return true;
}

static void epx__params_load(void)
{
    for (int i = 0; i < EPX__P_COUNT; i++) {
        const epx__param_def_t *d = &epx__params[i];
        const char *env = getenv(d->env);
        const char *text = (env && *env) ? env : d->def;
        int64_t v = 0;
        if (d->type != EPX__PT_STR) {
            bool ok;
            if (d->type == EPX__PT_SIZE) {
                ok = epx__parse_size(text, &v);
            } else {
                char *end = NULL;
                errno = 0;
                long long ll = strtoll(text, &end, 10);
                ok = !errno && end != text && *end == '\0';
                v = ll;
            }
            if (!ok) {
                fprintf(stderr, "epx: ignoring %s=%s (not a valid %s); using %s\n", d->env, text,
                        d->type_name, d->def);
                text = d->def;
                if (d->type == EPX__PT_SIZE)
                    epx__parse_size(text, &v);
                else
                    v = strtoll(text, NULL, 10);
            }
        }
        epx__param_values[i].i = v;
        snprintf(epx__param_values[i].text, sizeof epx__param_values[i].text, "%s", text);
    }
}

int64_t epx__param_int(epx__param_id_t id)
{
    pthread_once(&epx__params_once, epx__params_load);
    return epx__param_values[id].i;
}

const char *epx__param_str(epx__param_id_t id)
{
    pthread_once(&epx__params_once, epx__params_load);
    return epx__param_values[id].text;
}

/* The integer tunables' ranges (inclusive). */
static const struct {
    epx__param_id_t id;
    int64_t lo, hi;
} epx__param_ranges[] = {
    {EPX__P_LOCAL_SIZE, 0, INT32_MAX},  {EPX__P_CPU_SPIN_US, 0, INT32_MAX}, {EPX__P_CPU_YIELD_MS, 0, INT32_MAX},
    {EPX__P_CPU_CMA, 0, 1},             {EPX__P_CPU_F16C, 0, 1},            {EPX__P_CUDA_SMS, 0, INT32_MAX},
    {EPX__P_CUDA_CE_SMS, 1, INT32_MAX}, {EPX__P_MOE_CHUNKS, 0, EPX__MOE_MAX_CHUNKS}, {EPX__P_MOE_LL_HOST, -1, 1},
};

epx_status_t epx__params_check(void)
{
    for (size_t i = 0; i < sizeof epx__param_ranges / sizeof epx__param_ranges[0]; i++) {
        int64_t v = epx__param_int(epx__param_ranges[i].id), lo = epx__param_ranges[i].lo,
                hi = epx__param_ranges[i].hi;
        if (v < lo || v > hi)
            return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "%s = %lld: expected %lld to %lld",
                             epx__params[epx__param_ranges[i].id].env, (long long)v, (long long)lo, (long long)hi);
    }
    return EPX_SUCCESS;
}

int epx_param_count(void) { return EPX__P_COUNT; }

epx_status_t epx_param_get(int index, epx_param_info_t *info)
{
    if (index < 0 || index >= EPX__P_COUNT)
        return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "param index %d out of range [0, %d)",
                         index, EPX__P_COUNT);
    if (!info) return epx__fail(NULL, EPX_ERR_INVALID_ARGUMENT, "info is NULL");
    pthread_once(&epx__params_once, epx__params_load);
    const epx__param_def_t *d = &epx__params[index];
    info->name = d->env;
    info->type = d->type == EPX__PT_INT ? "int" : d->type == EPX__PT_SIZE ? "size" : "string";
    info->default_value = d->def;
    info->value = epx__param_values[index].text;
    info->description = d->desc;
    return EPX_SUCCESS;
}
