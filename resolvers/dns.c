/* dns.c - the DNS resolver: getaddrinfo() before every attempt, rotating over records;
 * the pconn's close interrupts a lookup (pconn__getaddrinfo). */
#include "internal.h"
#include "pconn_resolver.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef struct dns_t {
    char *host;
    uint16_t port;
    unsigned next; /* only the owning worker calls: no lock */
} dns_t;

static void dns_free(void *arg)
{
    dns_t *d = arg;
    free(d->host);
    free(d);
}

static int dns_resolve(void *arg, char *address, size_t size, pconn_error_t *err)
{
    dns_t *d = arg;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *list = NULL;
    int gai, sys_errno;
    int rc = pconn__getaddrinfo(d->host, NULL, &hints, INT64_MAX, &list, &gai, &sys_errno);
    if (rc == PCONN_ECLOSED) {
        pconn_error_set(err, PCONN_ECLOSED, 0, "dns %s: interrupted by close", d->host);
        return PCONN_ECLOSED;
    }
    if (rc != PCONN_OK) {
        pconn_error_set(err, PCONN_ERESOLVE, gai == EAI_SYSTEM ? sys_errno : 0, "dns %s: %s",
                        d->host, gai_strerror(gai));
        return PCONN_ERESOLVE;
    }
    unsigned n = 0;
    for (struct addrinfo *ai = list; ai != NULL; ai = ai->ai_next)
        n++;
    unsigned pick = d->next++ % n;
    struct addrinfo *ai = list;
    for (unsigned i = 0; i < pick; i++)
        ai = ai->ai_next;
    char ip[NI_MAXHOST];
    rc = getnameinfo(ai->ai_addr, ai->ai_addrlen, ip, sizeof ip, NULL, 0, NI_NUMERICHOST);
    int family = ai->ai_family;
    freeaddrinfo(list);
    if (rc != 0) {
        pconn_error_set(err, PCONN_ERESOLVE, 0, "dns %s: %s", d->host, gai_strerror(rc));
        return PCONN_ERESOLVE;
    }
    int len = snprintf(address, size, family == AF_INET6 ? "[%s]:%u" : "%s:%u", ip, d->port);
    if (len < 0 || (size_t)len >= size) {
        pconn_error_set(err, PCONN_ERESOLVE, 0, "dns %s: address too long", d->host);
        return PCONN_ERESOLVE;
    }
    return PCONN_OK;
}

pconn_resolver_t *pconn_resolver_dns(const char *host, uint16_t port)
{
    if (host == NULL || host[0] == '\0' || strlen(host) > 253 || port == 0) {
        errno = EINVAL;
        return NULL;
    }
    dns_t *d = calloc(1, sizeof *d);
    if (d == NULL || (d->host = strdup(host)) == NULL) {
        free(d);
        errno = ENOMEM;
        return NULL;
    }
    d->port = port;
    pconn_resolver_t *r = pconn_resolver_new(dns_resolve, d, dns_free);
    if (r == NULL)
        dns_free(d);
    return r;
}
