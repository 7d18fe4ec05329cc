/* error.c - status codes, their names and messages, and pconn_error_t.
 * One table generates both, so a code can never lack its text. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define PCONN_ERRNO_MAP(X)                                            \
    X(OK, "success")                                                  \
    X(ETIMEDOUT, "timed out")                                         \
    X(ECLOSED, "closed")                                              \
    X(EINVAL, "invalid argument")                                     \
    X(ENOMEM, "out of memory")                                        \
    X(ERESOLVE, "cannot resolve the address")                         \
    X(ECONNECT, "cannot connect")                                     \
    X(EIO, "input/output error")                                      \
    X(EPROTO, "protocol error")                                       \
    X(EHANDSHAKE, "handshake failed")                                 \
    X(ETOOBIG, "message too big")                                     \
    X(EUNIMPLEMENTED, "no such call implemented")                     \
    X(EREMOTE, "the remote handler failed")                           \
    X(EABORT, "aborted for good")

#define PCONN_ERR_MSG(name, msg) [PCONN_##name] = msg,
static const char *const messages[] = {PCONN_ERRNO_MAP(PCONN_ERR_MSG)};
#define PCONN_ERR_NAME(name, msg) [PCONN_##name] = "PCONN_" #name,
static const char *const names[] = {PCONN_ERRNO_MAP(PCONN_ERR_NAME)};

_Static_assert(sizeof messages / sizeof messages[0] == PCONN_EABORT + 1,
               "every status code has a message");

const char *pconn_strerror(int code)
{
    if (code < 0 || (size_t)code >= sizeof messages / sizeof messages[0])
        return "unknown error";
    return messages[code];
}

const char *pconn_err_name(int code)
{
    if (code < 0 || (size_t)code >= sizeof names / sizeof names[0])
        return "PCONN_E?";
    return names[code];
}

void pconn_error_set(pconn_error_t *err, int code, int sys_errno, const char *fmt, ...)
{
    if (err == NULL)
        return;
    err->code = code;
    err->sys_errno = sys_errno;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    if (n < 0) {
        err->message[0] = '\0';
        n = 0;
    }
    if (sys_errno != 0 && (size_t)n < sizeof err->message) {
        char buf[128];
        const char *s = strerror_r(sys_errno, buf, sizeof buf);
        snprintf(err->message + n, sizeof err->message - (size_t)n, ": %s", s);
    }
}

bool pconn__strcpy(char *dst, size_t size, const char *src)
{
    size_t len = strlen(src);
    if (len >= size)
        return false;
    memcpy(dst, src, len + 1);
    return true;
}

const char *pconn_version(void)
{
    return PCONN_VERSION_STRING;
}
