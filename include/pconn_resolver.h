/* pconn_resolver.h - ready resolvers: DNS, a file, a chain, HTTP service catalogs; and
 * the announcer with which a server publishes itself in etcd.
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
 * is 1-65535. A failed lookup is PCONN_ERESOLVE naming the host. On a pconn's worker
 * the lookup runs on a short-lived helper thread, so pconn_close() interrupts it within
 * milliseconds (PCONN_ECLOSED); the abandoned getaddrinfo() call ends on its own, within
 * the system resolver's timeouts (resolv.conf(5)), and frees what it made. */
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

/* ---- HTTP service catalogs (libcurl + jansson) ----------------------------------- */

typedef enum {
    PCONN_CATALOG_JSON,   /* GET url: "host:port", {"host","port"}, {"address"}, or a list */
    PCONN_CATALOG_ETCD,   /* etcd's v3 JSON gateway: every key under the prefix `key` */
    PCONN_CATALOG_CONSUL  /* GET url/v1/health/service/<key>?passing */
} pconn_catalog_format_t;

typedef enum { PCONN_PICK_ROUND_ROBIN, PCONN_PICK_RANDOM, PCONN_PICK_FIRST } pconn_pick_t;

typedef struct pconn_http_catalog_options_t {
    const char *url; /* json: the document; etcd, consul: base URL, e.g. http://127.0.0.1:2379;
                        a comma-separated list for a cluster's members (or mirrors) */
    pconn_catalog_format_t format;
    const char *key;                /* etcd: key prefix; consul: service name */
    pconn_pick_t pick;
    int64_t timeout_ms;             /* the whole lookup, every member tried; 0: 2 s */
    size_t max_response_bytes;      /* 0: 1 MiB; larger answers fail while arriving */
    const char *bearer_token;       /* NULL: none; sent as "Authorization: Bearer ..." */
    const char *ca_file;            /* NULL: the system's CA store (or tls's CA) */
    struct pconn_tls_config_t *tls; /* NULL: verify with ca_file alone; else a client
                                       configuration (pconn_tls.h), referenced: its CA,
                                       client certificate (etcd --client-cert-auth),
                                       minimum version and verification for https://
                                       (its server_name is not used: the URL's host
                                       is what is verified) */
    int watch;                      /* etcd and Consul: 1 answers from a shared cache kept
                                       current by one etcd watch or Consul blocking query
                                       (below); 0: a request per lookup */
} pconn_http_catalog_options_t;

/* A resolver that asks an HTTP service catalog before every attempt and picks one of
 * the instances it lists. One keep-alive connection to the catalog is reused across
 * lookups; pconn_close() interrupts a lookup in progress. Only http:// and https:// URLs.
 * An instance value is {"host":"10.0.0.5","port":7001}, {"address":"host:port"} or a
 * "host:port" string; instances that are not valid are skipped. Every failure is
 * PCONN_ERESOLVE with a message naming the URL and the cause (refused, timed out, HTTP
 * status, not JSON, wrong shape, no instances, bad host or port, answer too big).
 * With several URLs (an etcd cluster's members, Consul agents), a lookup asks the member
 * that answered last, then the others in turn, each within a fair share of what is left
 * of timeout_ms; a member that cannot be reached or answers 5xx (etcd without a quorum)
 * passes the turn. When all fail, the error names each member and its cause ("catalog:
 * every member failed: URL: cause; URL: cause ..."). Strings in opts are copied. NULL with
 * errno EINVAL on bad options (an empty or non-http(s) item in the list among them).
 *
 * With watch = 1 (etcd and Consul; EINVAL for PCONN_CATALOG_JSON) the resolvers of a
 * process that share url, key, bearer_token, ca_file and tls share one cache of the
 * instance list
 * and one thread that keeps it current: it reads every key under the prefix once, then
 * holds one etcd watch (POST /v3/watch on the JSON gateway, a streaming answer) from the
 * revision after that read, so a thousand resolvers make one watch and no request per
 * lookup, and an instance announced or revoked reaches their next answer as soon as the
 * watch delivers it (milliseconds). The cache's timeout_ms and max_response_bytes (one
 * watch message) are those of the first resolver that made it. While the watch is down
 * (a member died, lost its leader, or the first read has not finished) lookups are made
 * as with watch = 0, while the thread watches again through the next member from the
 * revision it had, so no change is missed; when etcd has compacted that revision away
 * it reads everything once more. The cache goes with the last resolver that uses it:
 * freeing that one stops the cache's thread, cutting its request in flight short, so it
 * returns within milliseconds whatever etcd does. Creating a resolver with watch = 1 may
 * start that thread (NULL with errno ENOMEM when it cannot).
 * A member that hangs without closing its connection (stopped, not dead) keeps the
 * watch open and the list unchanged until TCP keep-alive gives up on it.
 * For Consul the thread makes blocking queries instead (GET .../health/service/NAME
 * ?passing&index=I&wait=30s, I from the last answer's X-Consul-Index): each returns
 * when the list changes, and the cache takes the whole new list. An index that goes
 * backwards starts again from 0. Queries start at least 50 ms apart, and a second apart
 * unless the last one brought an index higher than it asked with: an agent that answers
 * at once is asked at most once a second. A failed query (timeout_ms bounds its
 * connect; TCP keep-alive notices an agent that vanishes while a query waits) makes
 * lookups ask as with watch = 0 while the thread moves to the next agent. */
pconn_resolver_t *pconn_resolver_http_catalog(const pconn_http_catalog_options_t *opts);

/* ---- Announcing a server in etcd ----------------------------------------------------- */

typedef struct pconn_announce_options_t {
    const char *etcd_url; /* e.g. http://127.0.0.1:2379; or a comma-separated list of the
                             cluster's members: the lease is granted, kept alive and
                             revoked through any live one (at most 16) */
    const char *key;      /* full key of this instance, e.g. /services/echo/7001 */
    const char *address;  /* what clients should connect to: "host:port" */
    int ttl_s;            /* 0: 10; etcd may raise a very small TTL to its minimum */
    struct pconn_tls_config_t *tls; /* https:// members: a client configuration
                                       (pconn_tls.h; its client certificate for etcd's
                                       --client-cert-auth), referenced; NULL: the
                                       system's CA store, no client certificate */
    /* Optional: the announcer's own story, from its thread: etcd unreachable and back
     * (WARNING, INFO, once each per outage), the lease gone and the key registered again
     * (WARNING, INFO). */
    pconn_log_fn on_log;
    void *on_log_arg;
} pconn_announce_options_t;

typedef struct pconn_announcer_t pconn_announcer_t;

/* Publishes address under key in etcd, as {"host":..,"port":..}, attached to a lease
 * with ttl_s, and keeps the lease alive from a thread of its own (every ttl_s/3). The
 * first registration is made before this returns: PCONN_OK with *out set, or an error
 * (PCONN_EINVAL bad options, PCONN_ECONNECT etcd unreachable, PCONN_EPROTO an odd
 * answer) with err filled (err may be NULL). Afterwards, while etcd is unreachable it
 * keeps trying, and when the lease has expired meanwhile it registers again under a new
 * lease. If the process dies, the lease expires and the key goes after ttl_s. */
int pconn_announce_start(const pconn_announce_options_t *opts, pconn_announcer_t **out,
                         pconn_error_t *err);

/* Stops keeping the lease alive and revokes it, so the key goes at once, then frees a.
 * Returns within 2 s whatever etcd does: a keep-alive in flight is cut short, and the
 * revoke gets what is left of the 2 s (best effort: when etcd does not answer in time,
 * the key goes when the lease expires, after ttl_s). NULL is ignored. */
void pconn_announce_stop(pconn_announcer_t *a);

#ifdef __cplusplus
}
#endif
#endif /* PCONN_RESOLVER_H */
