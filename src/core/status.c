/* Status codes, their strings, and the per-thread / per-communicator error messages. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core.h"

static _Thread_local char epx__thread_error[EPX__ERRMSG_LEN];

const char *epx_status_string(epx_status_t status)
{
    switch (status) {
#define EPX__STATUS_STR_(name, value, text) \
    case name: return text;
        EPX_STATUS_MAP(EPX__STATUS_STR_)
#undef EPX__STATUS_STR_
    }
    return "unknown status";
}

const char *epx_status_name(epx_status_t status)
{
    switch (status) {
#define EPX__STATUS_NAME_(name, value, text) \
    case name: return #name;
        EPX_STATUS_MAP(EPX__STATUS_NAME_)
#undef EPX__STATUS_NAME_
    }
    return "EPX_UNKNOWN_STATUS";
}

const char *epx_get_last_error(void) { return epx__thread_error; }

int epx_get_version(void) { return EPX_VERSION_CODE; }

/* Format into buf and the thread's buffer; log at WARN when `warn`, else at INFO. */
static void epx__fail_v(epx__errbuf_t *buf, epx_status_t status, bool warn, const char *fmt, va_list ap)
{
    int n = snprintf(epx__thread_error, sizeof epx__thread_error, "%s: ", epx_status_name(status));
    if (n > 0 && (size_t)n < sizeof epx__thread_error)
        vsnprintf(epx__thread_error + n, sizeof epx__thread_error - (size_t)n, fmt, ap);
    if (buf) memcpy(buf->msg, epx__thread_error, sizeof buf->msg);
    if (warn)
        EPX_WARN(COLL, "%s", epx__thread_error);
    else
        EPX_INFO(COLL, "%s", epx__thread_error);
}

epx_status_t epx__fail(epx__errbuf_t *buf, epx_status_t status, const char *fmt, ...)
{
    bool user_error = status == EPX_ERR_INVALID_ARGUMENT || status == EPX_ERR_INVALID_USAGE ||
                      status == EPX_ERR_REMOTE_INVALID || status == EPX_ERR_MISMATCH;
    va_list ap;
    va_start(ap, fmt);
    epx__fail_v(buf, status, !user_error, fmt, ap);
    va_end(ap);
    return status;
}

epx_status_t epx__fail_again(epx__errbuf_t *buf, epx_status_t status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    epx__fail_v(buf, status, false, fmt, ap);
    va_end(ap);
    return status;
}
