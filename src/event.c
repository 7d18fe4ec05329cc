/* event.c - event names, one-line formatting, and the ready stderr logger. */
#include "internal.h"

#include <stdio.h>
#include <time.h>

const char *pconn_event_kind_name(pconn_event_kind_t kind)
{
    switch (kind) {
    case PCONN_EVENT_ATTEMPTING_TO_CONNECT: return "attempting_to_connect";
    case PCONN_EVENT_OBTAINED_ADDRESS: return "obtained_address";
    case PCONN_EVENT_FAILED_TO_CONNECT: return "failed_to_connect";
    case PCONN_EVENT_CONNECTED: return "connected";
    case PCONN_EVENT_DISCONNECTED: return "disconnected";
    }
    return "unknown";
}

int pconn_event_format(const pconn_event_t *ev, char *buf, size_t size)
{
    const char *name = ev->server_name != NULL ? ev->server_name : "?";
    switch (ev->kind) {
    case PCONN_EVENT_ATTEMPTING_TO_CONNECT:
        return snprintf(buf, size, "%s: attempting to connect", name);
    case PCONN_EVENT_OBTAINED_ADDRESS:
        return snprintf(buf, size, "%s: obtained address %s", name, ev->address);
    case PCONN_EVENT_FAILED_TO_CONNECT:
        return snprintf(buf, size, "%s: failed to connect: %s: %s", name,
                        pconn_err_name(ev->error->code), ev->error->message);
    case PCONN_EVENT_CONNECTED:
        return snprintf(buf, size, "%s: connected to %s", name, ev->address);
    case PCONN_EVENT_DISCONNECTED:
        return snprintf(buf, size, "%s: disconnected from %s", name, ev->address);
    }
    return snprintf(buf, size, "%s: unknown event %d", name, (int)ev->kind);
}

void pconn_log_stderr(const pconn_event_t *ev, void *arg)
{
    (void)arg;
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    char stamp[32], line[PCONN_ADDRESS_MAX + 512];
    strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
    pconn_event_format(ev, line, sizeof line);
    /* One fprintf per line: stdio locks the stream, so lines of threads never mix. */
    fprintf(stderr, "%s.%03ld %s\n", stamp, ts.tv_nsec / 1000000, line);
}
