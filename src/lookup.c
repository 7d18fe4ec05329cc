/* lookup.c - getaddrinfo() with a deadline that a pconn's close interrupts.
 * getaddrinfo() itself can be neither bounded nor cancelled. On a pconn's worker (or
 * with a deadline) it runs on a detached helper thread while the caller waits for its
 * answer, the deadline or the close, whichever comes first. A lookup given up on
 * finishes on its own: the job has two references, and the last one frees the job and
 * whatever the lookup returned. */
#include "internal.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define LOOKUP_STACK 0
#else
#define LOOKUP_STACK (256 * 1024) /* NSS modules run here: as much as the worker's callbacks */
#endif

typedef struct lookup_t {
    atomic_int refs;
    atomic_bool done;
    int done_fd;
    char *host, *port;
    struct addrinfo hints;
    struct addrinfo *list; /* the answer, until the caller takes it */
    int gai, sys_errno;
} lookup_t;

static void lookup_unref(lookup_t *l)
{
    if (atomic_fetch_sub(&l->refs, 1) != 1)
        return;
    if (l->list != NULL)
        freeaddrinfo(l->list);
    close(l->done_fd);
    free(l->host);
    free(l->port);
    free(l);
}

static void *lookup_main(void *arg)
{
    lookup_t *l = arg;
    l->gai = getaddrinfo(l->host, l->port, &l->hints, &l->list);
    l->sys_errno = errno;
    atomic_store(&l->done, true); /* publishes the answer */
    pconn__wake(l->done_fd);
    lookup_unref(l);
    return NULL;
}

static int lookup_direct(const char *host, const char *port, const struct addrinfo *hints,
                         struct addrinfo **out, int *gai, int *sys_errno)
{
    *gai = getaddrinfo(host, port, hints, out);
    *sys_errno = errno;
    return *gai == 0 ? PCONN_OK : PCONN_ERESOLVE;
}

static lookup_t *lookup_new(const char *host, const char *port, const struct addrinfo *hints)
{
    lookup_t *l = calloc(1, sizeof *l);
    if (l == NULL)
        return NULL;
    l->done_fd = pconn__wake_fd_new();
    l->host = host != NULL ? strdup(host) : NULL;
    l->port = port != NULL ? strdup(port) : NULL;
    if (l->done_fd < 0 || (host != NULL && l->host == NULL) || (port != NULL && l->port == NULL)) {
        if (l->done_fd >= 0)
            close(l->done_fd);
        free(l->host);
        free(l->port);
        free(l);
        return NULL;
    }
    l->hints = *hints;
    l->hints.ai_addr = NULL;
    l->hints.ai_canonname = NULL;
    l->hints.ai_next = NULL;
    atomic_init(&l->refs, 2);
    atomic_init(&l->done, false);
    return l;
}

int pconn__getaddrinfo(const char *host, const char *port, const struct addrinfo *hints,
                       int64_t deadline_ns, struct addrinfo **out, int *gai, int *sys_errno)
{
    *out = NULL;
    *gai = 0;
    *sys_errno = 0;
    int cancel_fd = pconn__cancel_fd();
    if (cancel_fd < 0 && deadline_ns == INT64_MAX)
        return lookup_direct(host, port, hints, out, gai, sys_errno);

    /* Without a job or a thread, a lookup that cannot be interrupted beats none. */
    lookup_t *l = lookup_new(host, port, hints);
    if (l == NULL)
        return lookup_direct(host, port, hints, out, gai, sys_errno);
    pthread_t t;
    if (pconn__thread_start(&t, lookup_main, l, LOOKUP_STACK, true) != 0) {
        atomic_store(&l->refs, 1);
        lookup_unref(l);
        return lookup_direct(host, port, hints, out, gai, sys_errno);
    }

    int rc = PCONN_OK;
    while (!atomic_load(&l->done)) {
        struct pollfd pfd[2] = {{.fd = l->done_fd, .events = POLLIN},
                                {.fd = cancel_fd, .events = POLLIN}};
        int n = poll(pfd, cancel_fd >= 0 ? 2 : 1, pconn__poll_timeout_ms(deadline_ns));
        if (n < 0 && errno != EINTR) {
            *sys_errno = errno;
            *gai = EAI_SYSTEM;
            rc = PCONN_ERESOLVE;
            break;
        }
        if (n == 0 && !atomic_load(&l->done)) {
            rc = PCONN_ETIMEDOUT;
            break;
        }
        if (n > 0 && cancel_fd >= 0 && pfd[1].revents != 0) {
            if (pconn__cancelled()) {
                rc = PCONN_ECLOSED;
                break;
            }
            pconn__wake_drain(cancel_fd); /* a kick: the worker re-checks its flags later */
        }
    }
    if (rc == PCONN_OK) {
        *gai = l->gai;
        *sys_errno = l->sys_errno;
        if (l->gai == 0) {
            *out = l->list;
            l->list = NULL;
        } else {
            rc = PCONN_ERESOLVE;
        }
    }
    lookup_unref(l);
    return rc;
}
