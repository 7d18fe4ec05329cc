/* announce.c - a server publishes its address in etcd under a lease and keeps the lease
 * alive from its own thread; stop revokes the lease, a crash lets it expire. */
#include "catalog.h"

#include <errno.h>
#include <stdarg.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_TTL_S 10
#define REQUEST_TIMEOUT_MS 2000
#define MAX_ANSWER_BYTES (64 * 1024)
#define RETRY_MS 500 /* while etcd is unreachable */
#define STOP_BOUND_MS 2000 /* pconn_announce_stop(), revoke included */
#define ANNOUNCE_MEMBERS_MAX 16

struct pconn_announcer_t {
    pthread_t thread;
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    bool stop;           /* guarded by mutex */
    pconn__http_t http;  /* the thread's alone once it runs */
    char *base;          /* etcd URL without a trailing '/' */
    char **bases;        /* the members' base URLs */
    size_t nbases, last; /* last: the member that answered last (the thread's, then stop's) */
    char *key_b64, *value_b64;
    int ttl_s;
    char lease[32];      /* the lease ID as etcd writes it, "" when none */
    bool put_done;       /* the key is under that lease */
    bool unreachable;    /* the last keep-alive round failed (the thread's alone) */
    char *key;           /* as given, for the log */
    pconn_log_fn on_log;
    void *on_log_arg;
};

/* POSTs body to base+path and parses the JSON answer. PCONN_EUNIMPLEMENTED when the
 * gateway has no such route (an older or newer etcd). */
static bool member_failed(long status)
{
    return status >= 500; /* a member without a quorum, or in trouble: try another */
}

static int etcd_call(pconn_announcer_t *a, const char *path, const char *body, json_t **out,
                     pconn_error_t *err)
{
    /* Any live member of the cluster will do: the one that answered last first. Within
     * the request timeout (or what stop has left of its bound: budget()). */
    char *urls[ANNOUNCE_MEMBERS_MAX];
    char buf[ANNOUNCE_MEMBERS_MAX][600];
    for (size_t i = 0; i < a->nbases; i++) {
        snprintf(buf[i], sizeof buf[i], "%s%s", a->bases[i], path);
        urls[i] = buf[i];
    }
    pconn__http_reply_t reply;
    *out = NULL;
    if (pconn__http_request_any(&a->http, urls, a->nbases, &a->last, body,
                                pconn__deadline_ns(a->http.timeout_ms), member_failed, &reply,
                                err) != PCONN_OK) {
        err->code = PCONN_ECONNECT;
        return PCONN_ECONNECT;
    }
    const char *url = urls[a->last];
    int rc = PCONN_OK;
    json_t *root = json_loadb(reply.body, reply.len, 0, NULL);
    if (reply.status == 404 && reply.len == 0) {
        rc = PCONN_EUNIMPLEMENTED;
        pconn_error_set(err, rc, 0, "etcd %s: no such endpoint", url);
    } else if (reply.status != 200) {
        const char *msg = json_string_value(json_object_get(root, "message"));
        rc = PCONN_EPROTO;
        pconn_error_set(err, rc, 0, "etcd %s: HTTP status %ld: %s", url, reply.status,
                        msg != NULL ? msg : "(no message)");
    } else if (!json_is_object(root)) {
        rc = PCONN_EPROTO;
        pconn_error_set(err, rc, 0, "etcd %s: answer is not a JSON object", url);
    }
    free(reply.body);
    if (rc == PCONN_OK)
        *out = root;
    else
        json_decref(root);
    return rc;
}

/* The key put under the lease we hold. */
static int put_key(pconn_announcer_t *a, pconn_error_t *err)
{
    size_t n = strlen(a->key_b64) + strlen(a->value_b64) + 64;
    char *put = malloc(n);
    if (put == NULL) {
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "etcd %s: put", a->base);
        return PCONN_ENOMEM;
    }
    snprintf(put, n, "{\"key\":\"%s\",\"value\":\"%s\",\"lease\":\"%s\"}", a->key_b64, a->value_b64, a->lease);
    json_t *root;
    int rc = etcd_call(a, "/v3/kv/put", put, &root, err);
    free(put);
    json_decref(root);
    a->put_done = rc == PCONN_OK;
    return rc;
}

/* A new lease, and the key put under it. The lease is remembered as soon as it is
 * granted, so that stop revokes it even when the put's answer never came (a put cut
 * short by stop may still have reached etcd). */
static int register_instance(pconn_announcer_t *a, pconn_error_t *err)
{
    char body[512];
    snprintf(body, sizeof body, "{\"TTL\":%d}", a->ttl_s);
    json_t *root;
    a->lease[0] = '\0';
    a->put_done = false;
    int rc = etcd_call(a, "/v3/lease/grant", body, &root, err);
    if (rc != PCONN_OK)
        return rc;
    const char *id = json_string_value(json_object_get(root, "ID"));
    if (id == NULL || strlen(id) >= sizeof a->lease) {
        json_decref(root);
        pconn_error_set(err, PCONN_EPROTO, 0, "etcd %s: lease grant without an ID", a->base);
        return PCONN_EPROTO;
    }
    snprintf(a->lease, sizeof a->lease, "%s", id);
    json_decref(root);
    return put_key(a, err);
}

/* PCONN_OK while the lease lives, PCONN_ECLOSED when it is gone, else unreachable. */
static int keep_alive(pconn_announcer_t *a, pconn_error_t *err)
{
    char body[64];
    snprintf(body, sizeof body, "{\"ID\":\"%s\"}", a->lease);
    json_t *root;
    int rc = etcd_call(a, "/v3/lease/keepalive", body, &root, err);
    if (rc != PCONN_OK)
        return rc;
    /* The gateway streams: {"result":{... "TTL":"9"}}; no TTL means expired. */
    json_t *result = json_object_get(root, "result");
    const char *ttl = json_string_value(json_object_get(result, "TTL"));
    rc = ttl != NULL && atoll(ttl) > 0 ? PCONN_OK : PCONN_ECLOSED;
    json_decref(root);
    return rc;
}

/* Sets the request timeout to what is left until deadline_ns; false when nothing is. */
static bool budget(pconn_announcer_t *a, int64_t deadline_ns)
{
    int64_t left_ms = (deadline_ns - pconn__mono_ns()) / 1000000;
    a->http.timeout_ms = left_ms;
    return left_ms > 0;
}

/* Best effort, all of it over by deadline_ns. */
static void revoke(pconn_announcer_t *a, int64_t deadline_ns)
{
    if (a->lease[0] == '\0')
        return;
    char body[64];
    snprintf(body, sizeof body, "{\"ID\":\"%s\"}", a->lease);
    json_t *root = NULL;
    pconn_error_t err;
    /* etcd 3.5 moved the route; 3.4 (Debian 12) has only the older one. */
    if (budget(a, deadline_ns) &&
        etcd_call(a, "/v3/lease/revoke", body, &root, &err) == PCONN_EUNIMPLEMENTED &&
        budget(a, deadline_ns))
        etcd_call(a, "/v3/kv/lease/revoke", body, &root, &err);
    json_decref(root);
    a->lease[0] = '\0';
}

static void say(const pconn_announcer_t *a, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void say(const pconn_announcer_t *a, int level, const char *fmt, ...)
{
    if (a->on_log == NULL)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    a->on_log(level, line, a->on_log_arg);
}

static void *announce_main(void *arg)
{
    pconn_announcer_t *a = arg;
    int64_t interval_ms = (int64_t)a->ttl_s * 1000 / 3; /* int64: ttl_s * 1000 overflowed int */
    int64_t wait_ms = interval_ms;
    pconn__mutex_lock(&a->mutex);
    for (;;) {
        int64_t deadline = pconn__deadline_ns(wait_ms);
        while (!a->stop && pconn__cond_wait_until(&a->cond, &a->mutex, deadline) == 0)
            ;
        if (a->stop)
            break;
        pconn__mutex_unlock(&a->mutex);
        pconn_error_t err;
        int rc = a->lease[0] != '\0' ? keep_alive(a, &err) : PCONN_ECLOSED;
        if (rc == PCONN_OK && !a->put_done) /* granted, but the put did not get through */
            rc = put_key(a, &err);
        if (rc == PCONN_ECLOSED) { /* expired while we could not reach etcd: a new lease */
            if (a->lease[0] != '\0')
                say(a, PCONN_LOG_WARNING, "lease %s of %s is gone: registering again", a->lease, a->key);
            rc = register_instance(a, &err);
            if (rc == PCONN_OK)
                say(a, PCONN_LOG_INFO, "%s registered again under lease %s", a->key, a->lease);
        }
        /* An outage is said once when it starts and once when it ends. */
        if (rc != PCONN_OK && !a->unreachable && !atomic_load(&a->http.aborted))
            say(a, PCONN_LOG_WARNING, "keeping %s alive: %s; retrying every %lld ms", a->key,
                err.message, (long long)(RETRY_MS < interval_ms ? RETRY_MS : interval_ms));
        else if (rc == PCONN_OK && a->unreachable)
            say(a, PCONN_LOG_INFO, "keeping %s alive: etcd answers again", a->key);
        a->unreachable = rc != PCONN_OK;
        wait_ms = rc == PCONN_OK ? interval_ms : (RETRY_MS < interval_ms ? RETRY_MS : interval_ms);
        pconn__mutex_lock(&a->mutex);
    }
    pconn__mutex_unlock(&a->mutex);
    return NULL;
}

static void destroy(pconn_announcer_t *a)
{
    pconn__http_cleanup(&a->http);
    free(a->base);
    pconn__http_url_list_free(a->bases, a->nbases);
    free(a->key_b64);
    free(a->key);
    free(a->value_b64);
    pthread_cond_destroy(&a->cond);
    pthread_mutex_destroy(&a->mutex);
    free(a);
}

/* {"host":"...","port":N} for host:port, {"address":"..."} for anything else. */
static char *instance_value(const pconn__addr_t *parsed, const char *address)
{
    json_t *v = parsed->is_unix ? json_pack("{s:s}", "address", address)
                                : json_pack("{s:s,s:i}", "host", parsed->host, "port", atoi(parsed->port));
    char *text = v != NULL ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    char *b64 = text != NULL ? pconn__base64_encode(text, strlen(text)) : NULL;
    free(text);
    return b64;
}

int pconn_announce_start(const pconn_announce_options_t *opts, pconn_announcer_t **out,
                         pconn_error_t *err)
{
    pconn_error_t local;
    if (err == NULL)
        err = &local;
    if (out != NULL)
        *out = NULL;
    pconn__addr_t parsed;
    if (opts == NULL || out == NULL || opts->etcd_url == NULL || opts->key == NULL ||
        opts->key[0] == '\0' || opts->ttl_s < 0 || strlen(opts->etcd_url) > 4000 ||
        (opts->tls != NULL && pconn__tls_config_is_server(opts->tls))) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_announce_start: bad options");
        return PCONN_EINVAL;
    }
    if (pconn__address_parse(opts->address, false, &parsed, err) != PCONN_OK)
        return PCONN_EINVAL;
    size_t nbases;
    char bad[128];
    char **bases = pconn__http_url_list(opts->etcd_url, &nbases, bad, sizeof bad);
    if (bases == NULL || nbases > ANNOUNCE_MEMBERS_MAX) {
        pconn__http_url_list_free(bases, nbases);
        if (bases != NULL)
            pconn_error_set(err, PCONN_EINVAL, 0, "pconn_announce_start: more than %d etcd members",
                            ANNOUNCE_MEMBERS_MAX);
        else
            pconn_error_set(err, PCONN_EINVAL, 0, "pconn_announce_start: etcd URL %s: not http:// or https://",
                            bad);
        return PCONN_EINVAL;
    }

    pconn_announcer_t *a = calloc(1, sizeof *a);
    if (a == NULL || pthread_mutex_init(&a->mutex, NULL) != 0) {
        free(a);
        pconn__http_url_list_free(bases, nbases);
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "pconn_announce_start");
        return PCONN_ENOMEM;
    }
    pconn__cond_init(&a->cond);
    a->bases = bases;
    a->nbases = nbases;
    a->ttl_s = opts->ttl_s > 0 ? opts->ttl_s : DEFAULT_TTL_S;
    size_t blen = strlen(opts->etcd_url);
    while (blen > 0 && opts->etcd_url[blen - 1] == '/')
        blen--;
    a->base = strndup(opts->etcd_url, blen);
    a->key_b64 = pconn__base64_encode(opts->key, strlen(opts->key));
    a->key = strdup(opts->key);
    a->on_log = opts->on_log;
    a->on_log_arg = opts->on_log_arg;
    a->value_b64 = instance_value(&parsed, opts->address);
    if (a->base == NULL || a->key_b64 == NULL || a->value_b64 == NULL || a->key == NULL ||
        pconn__http_init(&a->http, REQUEST_TIMEOUT_MS, MAX_ANSWER_BYTES, NULL, NULL, opts->tls) != PCONN_OK) {
        destroy(a);
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "pconn_announce_start");
        return PCONN_ENOMEM;
    }
    int rc = register_instance(a, err);
    if (rc == PCONN_OK && pconn__thread_start(&a->thread, announce_main, a, 0, false) != 0) {
        rc = PCONN_ENOMEM;
        pconn_error_set(err, rc, EAGAIN, "pconn_announce_start: thread");
    }
    if (rc != PCONN_OK) {
        revoke(a, pconn__deadline_ns(STOP_BOUND_MS)); /* a lease granted before the failure */
        destroy(a);
        return rc;
    }
    *out = a;
    return PCONN_OK;
}

void pconn_announce_stop(pconn_announcer_t *a)
{
    if (a == NULL)
        return;
    int64_t deadline = pconn__deadline_ns(STOP_BOUND_MS);
    pconn__mutex_lock(&a->mutex);
    a->stop = true;
    pthread_cond_broadcast(&a->cond);
    pconn__mutex_unlock(&a->mutex);
    pconn__http_abort(&a->http); /* a keep-alive in flight ends now, not at its timeout */
    pthread_join(a->thread, NULL);
    atomic_store(&a->http.aborted, false);
    revoke(a, deadline);
    destroy(a);
}
