/* http_catalog.c - the HTTP service catalog resolver: asks a catalog (a JSON document,
 * etcd's v3 gateway, Consul's health API) before every attempt and picks an instance. */
#include "catalog.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define DEFAULT_TIMEOUT_MS 2000
#define DEFAULT_MAX_BYTES (1024 * 1024)

typedef struct catalog_t {
    pconn__http_t http;
    pconn_catalog_format_t format;
    pconn_pick_t pick;
    char **urls;     /* what is requested: one per member (etcd, Consul) or document */
    size_t nurls, last; /* last: the member that answered last */
    int64_t timeout_ms; /* the whole lookup, every member tried included */
    char *post_body; /* etcd: the range request; else NULL */
    unsigned next;   /* round robin */
    uint64_t rng;    /* random pick */
    pconn__watch_t *watch; /* watch = 1: the shared cache; else NULL */
} catalog_t;

static void catalog_free(void *arg)
{
    catalog_t *c = arg;
    pconn__watch_put(c->watch);
    pconn__http_cleanup(&c->http);
    pconn__http_url_list_free(c->urls, c->nurls);
    free(c->post_body);
    free(c);
}

static size_t pick_index(catalog_t *c, size_t n)
{
    switch (c->pick) {
    case PCONN_PICK_FIRST:
        return 0;
    case PCONN_PICK_RANDOM:
        c->rng = c->rng * 6364136223846793005ull + 1442695040888963407ull;
        return (size_t)((c->rng >> 33) % n);
    case PCONN_PICK_ROUND_ROBIN:
    default:
        return c->next++ % n;
    }
}

/* A member that answers 5xx is in trouble (etcd without a quorum: 503): try another. */
static bool member_failed(long status)
{
    return status >= 500;
}

static size_t pick_cb(void *arg, size_t n)
{
    return pick_index(arg, n);
}

static int catalog_resolve(void *arg, char *address, size_t size, pconn_error_t *err)
{
    catalog_t *c = arg;
    if (c->watch != NULL) {
        int k = pconn__watch_answer(c->watch, pick_cb, c, address, size);
        if (k == 1)
            return PCONN_OK;
        if (k == 0 || k == -2) {
            pconn_error_set(err, PCONN_ERESOLVE, 0, "catalog %s: %s", c->urls[c->last],
                            k == 0 ? "no instances" : "address too long");
            return PCONN_ERESOLVE;
        }
        /* -1: the watch is down; ask as without it */
    }
    pconn__http_reply_t reply;
    int rc = pconn__http_request_any(&c->http, c->urls, c->nurls, &c->last, c->post_body,
                                     pconn__deadline_ns(c->timeout_ms), member_failed, &reply, err);
    if (rc != PCONN_OK)
        return rc;
    const char *url = c->urls[c->last];
    if (reply.status != 200) {
        /* The start of the body says why, for the humans reading the event. */
        char excerpt[80];
        size_t k = 0;
        for (size_t i = 0; i < reply.len && k + 1 < sizeof excerpt; i++)
            excerpt[k++] = reply.body[i] >= ' ' && reply.body[i] < 127 ? reply.body[i] : ' ';
        excerpt[k] = '\0';
        pconn_error_set(err, PCONN_ERESOLVE, 0, "catalog %s: HTTP status %ld%s%s", url,
                        reply.status, k ? ": " : "", excerpt);
        free(reply.body);
        return PCONN_ERESOLVE;
    }
    pconn__addr_list_t list;
    char why[200];
    rc = pconn__catalog_parse(c->format, reply.body, reply.len, &list, why, sizeof why);
    free(reply.body);
    if (rc != PCONN_OK) {
        pconn_error_set(err, PCONN_ERESOLVE, 0, "catalog %s: %s", url, why);
        return PCONN_ERESOLVE;
    }
    const char *chosen = list.items[pick_index(c, list.n)];
    if (!pconn__strcpy(address, size, chosen)) {
        pconn_error_set(err, PCONN_ERESOLVE, 0, "catalog %s: address too long", url);
        rc = PCONN_ERESOLVE;
    }
    pconn__addr_list_free(&list);
    return rc;
}

/* The etcd range request for every key under prefix: [prefix, prefix+1). */
static char *etcd_range_body(const char *prefix)
{
    size_t len = strlen(prefix);
    unsigned char *end = malloc(len + 1);
    if (end == NULL)
        return NULL;
    memcpy(end, prefix, len);
    size_t end_len = len;
    /* The smallest key greater than every key with this prefix. */
    while (end_len > 0 && end[end_len - 1] == 0xff)
        end_len--;
    char *key = pconn__base64_encode(prefix, len);
    char *range_end;
    if (end_len == 0) {
        range_end = pconn__base64_encode("", 1); /* "\0": every key */
    } else {
        end[end_len - 1]++;
        range_end = pconn__base64_encode(end, end_len);
    }
    free(end);
    char *body = NULL;
    if (key != NULL && range_end != NULL) {
        size_t n = strlen(key) + strlen(range_end) + 32;
        body = malloc(n);
        if (body != NULL)
            snprintf(body, n, "{\"key\":\"%s\",\"range_end\":\"%s\"}", key, range_end);
    }
    free(key);
    free(range_end);
    return body;
}

static char *join_url(const char *base, const char *path, const char *tail)
{
    size_t blen = strlen(base);
    while (blen > 0 && base[blen - 1] == '/')
        blen--;
    size_t n = blen + strlen(path) + strlen(tail) + 1;
    char *url = malloc(n);
    if (url != NULL)
        snprintf(url, n, "%.*s%s%s", (int)blen, base, path, tail);
    return url;
}

/* Consul service names are letters, digits and dashes: nothing to escape in a URL. */
static bool consul_name_ok(const char *name)
{
    if (name == NULL || name[0] == '\0' || strlen(name) > 200)
        return false;
    for (const char *p = name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '-' || *p == '_' || *p == '.'))
            return false;
    return true;
}

pconn_resolver_t *pconn_resolver_http_catalog(const pconn_http_catalog_options_t *opts)
{
    if (opts == NULL || opts->pick > PCONN_PICK_FIRST ||
        opts->format > PCONN_CATALOG_CONSUL || opts->timeout_ms < 0 ||
        (opts->watch != 0 && (opts->watch != 1 || opts->format == PCONN_CATALOG_JSON)) ||
        (opts->format == PCONN_CATALOG_ETCD && (opts->key == NULL || opts->key[0] == '\0')) ||
        (opts->format == PCONN_CATALOG_CONSUL && !consul_name_ok(opts->key)) ||
        (opts->tls != NULL && pconn__tls_config_is_server(opts->tls))) {
        errno = EINVAL;
        return NULL;
    }
    size_t n;
    char bad[128];
    char **bases = pconn__http_url_list(opts->url, &n, bad, sizeof bad);
    if (bases == NULL) {
        errno = strcmp(bad, "(out of memory)") == 0 ? ENOMEM : EINVAL;
        return NULL;
    }
    catalog_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        pconn__http_url_list_free(bases, n);
        errno = ENOMEM;
        return NULL;
    }
    c->format = opts->format;
    c->pick = opts->pick;
    if (getrandom(&c->rng, sizeof c->rng, 0) != sizeof c->rng)
        c->rng = (uint64_t)(uintptr_t)c;
    c->timeout_ms = opts->timeout_ms > 0 ? opts->timeout_ms : DEFAULT_TIMEOUT_MS;
    size_t max = opts->max_response_bytes > 0 ? opts->max_response_bytes : DEFAULT_MAX_BYTES;
    if (pconn__http_init(&c->http, c->timeout_ms, max, opts->bearer_token, opts->ca_file, opts->tls) != PCONN_OK) {
        pconn__http_url_list_free(bases, n);
        free(c);
        errno = ENOMEM;
        return NULL;
    }
    if (opts->format == PCONN_CATALOG_ETCD && (c->post_body = etcd_range_body(opts->key)) == NULL)
        goto nomem;
    if ((c->urls = calloc(n, sizeof *c->urls)) == NULL)
        goto nomem;
    for (; c->nurls < n; c->nurls++) {
        char tail[256];
        const char *b = bases[c->nurls];
        switch (opts->format) {
        case PCONN_CATALOG_JSON:
            c->urls[c->nurls] = strdup(b);
            break;
        case PCONN_CATALOG_ETCD:
            c->urls[c->nurls] = join_url(b, "/v3/kv/range", "");
            break;
        case PCONN_CATALOG_CONSUL:
            snprintf(tail, sizeof tail, "%s?passing", opts->key); /* the name is at most 200 */
            c->urls[c->nurls] = join_url(b, "/v1/health/service/", tail);
            break;
        }
        if (c->urls[c->nurls] == NULL)
            goto nomem;
    }
    bool consul = opts->format == PCONN_CATALOG_CONSUL; /* its cache asks c->urls */
    if (opts->watch == 1 &&
        (c->watch = pconn__watch_get(consul ? c->urls : bases, n, opts->key, consul ? NULL : c->post_body,
                                     c->timeout_ms, max, opts->bearer_token, opts->ca_file,
                                     opts->tls)) == NULL)
        goto nomem;
    pconn__http_url_list_free(bases, n);
    bases = NULL;
    pconn_resolver_t *r = pconn_resolver_new(catalog_resolve, c, catalog_free);
    if (r != NULL)
        return r;
nomem:
    pconn__http_url_list_free(bases, n);
    catalog_free(c);
    errno = ENOMEM;
    return NULL;
}
