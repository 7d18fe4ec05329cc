/* catalog.h - what the HTTP catalog resolver, the announcer and the fuzz target share:
 * parsing of catalog answers, base64, and one HTTP request over libcurl. */
#ifndef PCONN_CATALOG_H
#define PCONN_CATALOG_H

#include "tls.h"
#include "pconn_resolver.h"

#include <curl/curl.h>
#include <stdatomic.h>

/* Addresses of the instances a catalog listed. */
typedef struct pconn__addr_list_t {
    size_t n, cap;
    char **items;
} pconn__addr_list_t;

PCONN_HIDDEN void pconn__addr_list_free(pconn__addr_list_t *l);

/* Parses a catalog answer (body, len bytes, not NUL-terminated) of the given format into
 * "host:port" addresses, skipping instances that are not valid. PCONN_OK with at least
 * one address, or PCONN_ERESOLVE with why (one line) saying what is wrong. */
PCONN_HIDDEN int pconn__catalog_parse(pconn_catalog_format_t format, const char *body, size_t len,
                                      pconn__addr_list_t *out, char *why, size_t why_size);

/* One etcd value (base64 of JSON {"host","port"}, {"address"}, a JSON string or bare
 * "host:port") into address. PCONN_OK, or PCONN_ERESOLVE with why saying what is wrong. */
PCONN_HIDDEN int pconn__catalog_etcd_value(const char *b64, char *address, size_t size, char *why,
                                           size_t why_size);

/* Standard base64 with padding. encode returns a malloc'd string (NULL: no memory);
 * decode writes at most *len bytes to out, sets *len, returns false on bad input. */
PCONN_HIDDEN char *pconn__base64_encode(const void *data, size_t len);
PCONN_HIDDEN bool pconn__base64_decode(const char *in, size_t in_len, unsigned char *out, size_t *len);

/* One HTTP client: an easy handle in its own multi handle, so that a request can be
 * cancelled through the pconn's cancel fd and its connection kept alive between uses.
 * Used by one thread at a time. */
typedef struct pconn__http_t {
    CURLM *multi;
    CURL *easy;
    struct curl_slist *headers;
    char *ca_file;
    pconn_tls_config_t *tls; /* a reference, or NULL */
    char errbuf[CURL_ERROR_SIZE]; /* libcurl's details of the last failure */
    int64_t consul_index;  /* the last answer's X-Consul-Index, or -1 */
    int64_t blocking_ms;   /* > 0: a blocking query may wait this long for its answer,
                              beyond timeout_ms (which still bounds the connect); TCP
                              keep-alive notices a dead agent meanwhile */
    int64_t timeout_ms;
    size_t max_bytes;
    atomic_bool aborted;   /* pconn__http_abort(): requests fail at once until cleared */
} pconn__http_t;

typedef struct pconn__http_reply_t {
    long status;
    char *body; /* NUL-terminated, malloc'd */
    size_t len;
} pconn__http_reply_t;

/* tls (may be NULL) is referenced: its CA, client certificate, minimum version and
 * verification apply to https:// URLs; ca_file, when set, overrides its CA. */
PCONN_HIDDEN int pconn__http_init(pconn__http_t *h, int64_t timeout_ms, size_t max_bytes,
                                  const char *bearer_token, const char *ca_file,
                                  pconn_tls_config_t *tls);
/* The TLS options of h on an easy handle (verification on unless tls says otherwise). */
PCONN_HIDDEN void pconn__http_tls_setopt(const pconn__http_t *h, CURL *e);
PCONN_HIDDEN void pconn__http_cleanup(pconn__http_t *h);
/* GET (post_body NULL) or POST a JSON body. PCONN_OK with *reply filled (any status), or
 * PCONN_ERESOLVE (refused, timed out, too big, ...) / PCONN_ECLOSED (cancelled) with err
 * naming url. Free reply->body. */
PCONN_HIDDEN int pconn__http_request(pconn__http_t *h, const char *url, const char *post_body,
                                     pconn__http_reply_t *reply, pconn_error_t *err);
/* A comma-separated list of base URLs (one URL is a list of one): each http:// or
 * https://, no empty item. A malloc'd array of n malloc'd strings (trailing '/'
 * removed), or NULL with *bad naming the first bad item (its first 100 bytes). */
PCONN_HIDDEN char **pconn__http_url_list(const char *list, size_t *n, char *bad, size_t bad_size);
PCONN_HIDDEN void pconn__http_url_list_free(char **urls, size_t n);
/* The same request to a set of members of one service (etcd cluster members, Consul
 * agents): the one that answered last (*last) first, then the others in turn, each
 * within a fair share of what is left until deadline_ns. A member fails when it cannot
 * be reached or answers with a status for which member_failed(status) is true; then the
 * next is tried. PCONN_OK with the first good *reply (*last updated); otherwise the
 * error names every member and its cause; PCONN_ECLOSED when close cut it short. */
PCONN_HIDDEN int pconn__http_request_any(pconn__http_t *h, char *const *urls, size_t n, size_t *last,
                                         const char *post_body, int64_t deadline_ns,
                                         bool (*member_failed)(long status),
                                         pconn__http_reply_t *reply, pconn_error_t *err);
/* From any thread: cuts the request in flight short and makes the next ones fail at
 * once (PCONN_ECLOSED), until the owner stores false in h->aborted. */
PCONN_HIDDEN void pconn__http_abort(pconn__http_t *h);
/* True for http:// and https:// URLs. */
PCONN_HIDDEN bool pconn__http_url_ok(const char *url);

/* CURLOPT_SOCKOPTFUNCTION: libcurl's sockets close-on-exec. */
PCONN_HIDDEN int pconn__http_sockopt_cloexec(void *arg, curl_socket_t fd, curlsocktype purpose);

/* The shared, watch-fed cache of the etcd catalog (catalog_watch.c): one per (members,
 * prefix, bearer token, CA file, TLS configuration) per process, counted by reference.
 * range_body NULL makes a Consul cache instead: bases are then the agents' full query
 * URLs (.../health/service/NAME?passing), prefix the service name, and its thread makes
 * blocking queries. get finds or makes
 * it (its thread starts reading and watching at once; timeout_ms and max_bytes are the
 * first maker's), NULL when out of memory; range_body is the resolver's range request
 * ({"key":..,"range_end":..}). put drops a reference; the last one stops the thread
 * (within its requests' bounds: the stream is cut at once) and frees it. */
typedef struct pconn__watch_t pconn__watch_t;
PCONN_HIDDEN pconn__watch_t *pconn__watch_get(char *const *bases, size_t n, const char *prefix,
                                              const char *range_body, int64_t timeout_ms,
                                              size_t max_bytes, const char *bearer_token,
                                              const char *ca_file, pconn_tls_config_t *tls);
PCONN_HIDDEN void pconn__watch_put(pconn__watch_t *w);
/* From any thread: while the cache is current, copies the instance pick(arg, n) chose to
 * address and returns 1; 0 when current and empty; -1 when not current (the watch is
 * down: look up instead); -2 when the address does not fit in size. */
PCONN_HIDDEN int pconn__watch_answer(pconn__watch_t *w, size_t (*pick)(void *arg, size_t n),
                                     void *arg, char *address, size_t size);
/* For tests: the watchers on prefix (*watchers), the last one's revision and whether it
 * is current (returned), and the watch streams they opened so far (*streams). */
PCONN_HIDDEN bool pconn__watch_probe(const char *prefix, int64_t *revision, unsigned *watchers,
                                     unsigned *streams);

#endif
