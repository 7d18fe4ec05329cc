/* pconn_resolver.h - ready resolvers: DNS, a file, a chain of resolvers.
 *
 * A resolver is asked for one address before every attempt, by the worker of the pconn
 * that owns it. Constructors return NULL on bad options with errno EINVAL (or ENOMEM).
 * The pconn or chain that is handed a resolver owns it and frees it.
 */
#ifndef PCONN_RESOLVER_H
#define PCONN_RESOLVER_H

#include "pconn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Looks host up with getaddrinfo() before every attempt and hands out its records in
 * turn as "ip:port" / "[ip6]:port", so a change in DNS is followed at the next attempt
 * and a name with several records spreads the attempts over them. host is copied; port
 * is 1-65535. A failed lookup is PCONN_ERESOLVE naming the host. The lookup itself is
 * not interruptible: pconn_close() waits for it (bounded by the system resolver's own
 * timeouts, see resolv.conf(5)). */
pconn_resolver_t *pconn_resolver_dns(const char *host, uint16_t port);

/* Reads the address from the file at path before every attempt: the first line that is
 * neither empty nor a comment ('#'), blanks trimmed. A deployment tool rewrites the
 * file (best by rename(2), so a reader never sees half a file) to move the service.
 * A missing, unreadable, empty or malformed file is PCONN_ERESOLVE naming the path and
 * the reason. path is copied. */
pconn_resolver_t *pconn_resolver_file(const char *path);

/* Asks resolvers[0], [1], ... in order and answers with the first that answers. When
 * all fail, the error is PCONN_ERESOLVE with the last one's message. Takes ownership of
 * all n resolvers, also when it fails (then it frees them). The array is copied. */
pconn_resolver_t *pconn_resolver_chain(pconn_resolver_t *const *resolvers, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* PCONN_RESOLVER_H */
