/* catalog_watch.c - the shared, watch-fed cache of the etcd catalog resolver (opt-in with
 * watch = 1 in its options).
 *
 * One watcher per (members, key prefix, bearer token, CA file) per process, shared by
 * every resolver made with the same ones and freed with the last of them. Its thread
 * reads every key under the prefix once (a range read), then keeps one etcd watch open
 * (POST /v3/watch on the JSON gateway: a streaming answer of one JSON message per change)
 * from the revision after that read, applying each PUT and DELETE to the list. While the
 * list is current ("live") resolvers answer from it without a request. When the stream
 * breaks (member gone, lost its leader, answer not understood) the list stops being live
 * and resolvers fall back to their own lookups, while the thread opens the watch again on
 * the next member from the revision it had, so no change is missed; when etcd has
 * compacted that revision away, it reads everything once more and watches from there. */
#include "catalog.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BACKOFF_MIN_MS 50
#define BACKOFF_MAX_MS 2000
/* Consul: how long one blocking query may wait (Consul adds up to 1/16 of it). */
#define CONSUL_WAIT_S 30

typedef struct entry_t {
    char *key; /* decoded etcd key (may hold any byte but NUL-terminated for printing) */
    size_t key_len;
    char *address;
} entry_t;

struct pconn__watch_t {
    pconn__watch_t *next;  /* the registry's list; registry_mutex */
    int refs;              /* registry_mutex */
    char *id;              /* what makes two watchers the same */
    char *prefix;
    char **range_urls, **watch_urls;
    size_t n, last;        /* members; the one to try first (the thread's) */
    char *range_body, *watch_body_fields; /* "\"key\":..,\"range_end\":.." */
    size_t max_bytes;
    int64_t timeout_ms;
    pconn__http_t http;    /* the range reads */
    CURLM *multi;          /* the watch stream */
    CURL *easy;
    struct curl_slist *headers;
    pthread_t thread;
    atomic_bool stop;
    /* Stream parse state: the thread's only. */
    char *buf;
    size_t len, cap;
    bool created, broken, compacted;
    int64_t catch_up;      /* > 0: read the list as it was at this revision */
    /* Under mutex: */
    pthread_mutex_t mutex;
    pthread_cond_t cond;   /* stop, for the back-off wait */
    bool live;
    int64_t revision;      /* every change up to this one is in entries */
    entry_t *entries;      /* sorted by key, as etcd's range answers them */
    size_t nentries, cap_entries;
    unsigned streams;      /* watch streams (Consul: blocking queries) so far */
    bool consul;           /* Consul blocking queries on range_urls, instead of etcd */
};

static pthread_mutex_t registry_mutex = PTHREAD_MUTEX_INITIALIZER;
static pconn__watch_t *registry;

/* ---- the list ----------------------------------------------------------------------- */

static int key_cmp(const char *a, size_t alen, const char *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);
    return c != 0 ? c : (alen > blen) - (alen < blen);
}

/* Index of key, or where it would go (*found false). Under mutex. */
static size_t find(pconn__watch_t *w, const char *key, size_t len, bool *found)
{
    size_t lo = 0, hi = w->nentries;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = key_cmp(w->entries[mid].key, w->entries[mid].key_len, key, len);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

static void entry_free(entry_t *e)
{
    free(e->key);
    free(e->address);
}

static void list_clear(pconn__watch_t *w)
{
    for (size_t i = 0; i < w->nentries; i++)
        entry_free(&w->entries[i]);
    w->nentries = 0;
}

/* Under mutex. address NULL: the key goes. false: out of memory. */
static bool list_set(pconn__watch_t *w, const char *key, size_t key_len, const char *address)
{
    bool found;
    size_t i = find(w, key, key_len, &found);
    if (address == NULL) {
        if (found) {
            entry_free(&w->entries[i]);
            memmove(&w->entries[i], &w->entries[i + 1], (w->nentries - i - 1) * sizeof *w->entries);
            w->nentries--;
        }
        return true;
    }
    char *copy = strdup(address);
    if (copy == NULL)
        return false;
    if (found) {
        free(w->entries[i].address);
        w->entries[i].address = copy;
        return true;
    }
    if (w->nentries == w->cap_entries) {
        size_t cap = w->cap_entries ? w->cap_entries * 2 : 16;
        entry_t *e = realloc(w->entries, cap * sizeof *e);
        if (e == NULL) {
            free(copy);
            return false;
        }
        w->entries = e;
        w->cap_entries = cap;
    }
    char *k = malloc(key_len + 1);
    if (k == NULL) {
        free(copy);
        return false;
    }
    memcpy(k, key, key_len);
    k[key_len] = '\0';
    memmove(&w->entries[i + 1], &w->entries[i], (w->nentries - i) * sizeof *w->entries);
    w->entries[i] = (entry_t){.key = k, .key_len = key_len, .address = copy};
    w->nentries++;
    return true;
}

static int64_t json_int64(json_t *v)
{
    /* The gateway writes 64-bit integers as strings; zero is left out. */
    if (json_is_string(v))
        return strtoll(json_string_value(v), NULL, 10);
    if (json_is_integer(v))
        return json_integer_value(v);
    return 0;
}

/* Applies one kv (a PUT when put, else a DELETE) of a full read or (event) of the watch,
 * under mutex. false: out of memory or a kv that is not understood. */
static bool apply_kv(pconn__watch_t *w, json_t *kv, bool put, bool event)
{
    const char *key64 = json_string_value(json_object_get(kv, "key"));
    if (key64 == NULL)
        return false;
    size_t in_len = strlen(key64), len = in_len / 4 * 3 + 3;
    char *key = malloc(len);
    if (key == NULL)
        return false;
    bool ok = pconn__base64_decode(key64, in_len, (unsigned char *)key, &len);
    if (ok) {
        char address[PCONN_ADDRESS_MAX], why[200];
        const char *value = json_string_value(json_object_get(kv, "value"));
        /* An instance that is not valid is skipped, as a lookup skips it. */
        bool valid = put && value != NULL &&
                     pconn__catalog_etcd_value(value, address, sizeof address, why, sizeof why) == PCONN_OK;
        /* An event the list already has (the watch asked from its revision + 1, so
         * none should come) is not applied twice; a full read is applied whole. */
        int64_t rev = json_int64(json_object_get(kv, "mod_revision"));
        if (!event || rev > w->revision)
            ok = list_set(w, key, len, valid ? address : NULL);
        if (ok && rev > w->revision)
            w->revision = rev;
    }
    free(key);
    return ok;
}

/* ---- the range read ----------------------------------------------------------------- */

static bool member_failed(long status)
{
    return status != 200;
}

/* Reads every key under the prefix into the list, live: as it is now (at 0), or as it
 * was at revision at. PCONN_OK or not. */
static int full_read(pconn__watch_t *w, int64_t at)
{
    char body[700];
    if (at > 0)
        snprintf(body, sizeof body, "{%s,\"revision\":\"%lld\"}", w->watch_body_fields, (long long)at);
    pconn__http_reply_t reply;
    pconn_error_t err;
    int rc = pconn__http_request_any(&w->http, w->range_urls, w->n, &w->last,
                                     at > 0 ? body : w->range_body,
                                     pconn__deadline_ns(w->timeout_ms), member_failed, &reply, &err);
    if (rc != PCONN_OK)
        return rc;
    json_t *root = json_loadb(reply.body, reply.len, 0, NULL);
    free(reply.body);
    json_t *kvs = json_object_get(root, "kvs");
    int64_t rev = json_int64(json_object_get(json_object_get(root, "header"), "revision"));
    rc = PCONN_ERESOLVE;
    if (json_is_object(root) && rev > 0 && (kvs == NULL || json_is_array(kvs))) {
        pthread_mutex_lock(&w->mutex);
        list_clear(w);
        rc = PCONN_OK;
        size_t i;
        json_t *kv;
        json_array_foreach(kvs, i, kv) {
            if (!apply_kv(w, kv, true, false)) {
                rc = PCONN_ENOMEM;
                break;
            }
        }
        w->revision = at > 0 ? at : rev; /* the header says the newest, not at */
        w->live = rc == PCONN_OK;
        pthread_mutex_unlock(&w->mutex);
    }
    json_decref(root);
    return rc;
}

/* ---- the watch stream --------------------------------------------------------------- */

/* One message of the stream. */
static void on_message(pconn__watch_t *w, json_t *root)
{
    json_t *result = json_object_get(root, "result");
    if (!json_is_object(result)) {
        w->broken = true; /* {"error":...}: the gateway's way of ending it */
        return;
    }
    if (json_is_true(json_object_get(result, "canceled"))) {
        w->compacted = json_int64(json_object_get(result, "compact_revision")) > 0;
        w->broken = true;
        return;
    }
    pthread_mutex_lock(&w->mutex);
    if (json_is_true(json_object_get(result, "created"))) {
        /* Current when nothing was written since the list's revision; else the events
         * since then may follow, or not (etcd sends none when none is under the prefix):
         * the list is read as it was at the watch's start, and events up to there are
         * skipped (apply_kv). */
        int64_t at = json_int64(json_object_get(json_object_get(result, "header"), "revision"));
        w->created = true;
        w->streams++;
        if (at <= w->revision)
            w->live = true;
        else
            w->catch_up = at;
    }
    json_t *events = json_object_get(result, "events");
    size_t i;
    json_t *ev;
    json_array_foreach(events, i, ev) {
        /* A PUT carries no "type" (zero is left out); a DELETE says "DELETE". */
        const char *type = json_string_value(json_object_get(ev, "type"));
        if (!apply_kv(w, json_object_get(ev, "kv"), type == NULL || strcmp(type, "PUT") == 0, true)) {
            w->broken = true; /* the list may now be wrong: read it all again */
            w->compacted = true;
            w->live = false;
            break;
        }
    }
    pthread_mutex_unlock(&w->mutex);
}

/* Handles the whole messages in the buffer, up to one that asks for a catch-up read
 * (the messages after it wait for that read). */
static void drain(pconn__watch_t *w)
{
    size_t off = 0;
    while (off < w->len && !w->broken && w->catch_up == 0) {
        while (off < w->len && (w->buf[off] == '\n' || w->buf[off] == '\r' || w->buf[off] == ' '))
            off++;
        if (off == w->len)
            break;
        json_error_t jerr;
        json_t *root = json_loadb(w->buf + off, w->len - off, JSON_DISABLE_EOF_CHECK, &jerr);
        if (root == NULL) {
            if (json_error_code(&jerr) != json_error_premature_end_of_input)
                w->broken = true; /* not JSON: give up on this stream */
            break;                /* else: the rest of the message is on its way */
        }
        on_message(w, root);
        json_decref(root);
        off += (size_t)jerr.position;
    }
    memmove(w->buf, w->buf + off, w->len - off);
    w->len -= off;
}

static size_t on_stream(char *ptr, size_t size, size_t nmemb, void *arg)
{
    pconn__watch_t *w = arg;
    size_t n = size * nmemb;
    long status = 0;
    curl_easy_getinfo(w->easy, CURLINFO_RESPONSE_CODE, &status);
    if (status != 200 || w->broken || n > w->max_bytes - w->len) /* one message too big */
        return 0;
    if (w->len + n + 1 > w->cap) {
        size_t cap = w->cap ? w->cap : 4096;
        while (cap < w->len + n + 1)
            cap *= 2;
        char *b = realloc(w->buf, cap);
        if (b == NULL)
            return 0;
        w->buf = b;
        w->cap = cap;
    }
    memcpy(w->buf + w->len, ptr, n);
    w->len += n;
    drain(w);
    return w->broken ? 0 : n;
}

/* Runs one watch stream on member i until it ends or stop. */
static void stream(pconn__watch_t *w, size_t i)
{
    int64_t from;
    pthread_mutex_lock(&w->mutex);
    from = w->revision + 1;
    pthread_mutex_unlock(&w->mutex);
    char body[700];
    snprintf(body, sizeof body, "{\"create_request\":{%s,\"start_revision\":\"%lld\"}}",
             w->watch_body_fields, (long long)from);
    w->len = 0;
    w->catch_up = 0;
    w->created = w->broken = w->compacted = false;
    CURL *e = w->easy;
    curl_easy_reset(e);
    curl_easy_setopt(e, CURLOPT_URL, w->watch_urls[i]);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_SOCKOPTFUNCTION, pconn__http_sockopt_cloexec);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)w->timeout_ms);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPIDLE, 5L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPINTVL, 5L);
    pconn__http_tls_setopt(&w->http, e);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, w->headers);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_stream);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, w);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
    curl_multi_add_handle(w->multi, e);
    /* A member that takes the connection but does not create the watch in time (stopped,
     * or without a leader) passes the turn. */
    int64_t created_by = pconn__deadline_ns(w->timeout_ms);
    for (;;) {
        if (atomic_load(&w->stop) || (!w->created && pconn__mono_ns() >= created_by))
            break;
        int running = 0;
        if (curl_multi_perform(w->multi, &running) != CURLM_OK || running == 0)
            break;
        if (w->catch_up > 0) { /* the stream waits in the socket meanwhile */
            int64_t at = w->catch_up;
            w->catch_up = 0;
            if (full_read(w, at) != PCONN_OK)
                break;
            drain(w); /* what came meanwhile */
            if (w->broken)
                break;
        }
        int wait_ms = 1000;
        if (!w->created) {
            int left = pconn__poll_timeout_ms(created_by);
            wait_ms = left < wait_ms ? left + 1 : wait_ms;
        }
        curl_multi_poll(w->multi, NULL, 0, wait_ms, NULL);
    }
    curl_multi_remove_handle(w->multi, e);
    pthread_mutex_lock(&w->mutex);
    w->live = false; /* lookups until the next stream is created */
    pthread_mutex_unlock(&w->mutex);
}

/* Waits ms or until stop. */
static void backoff(pconn__watch_t *w, int64_t ms)
{
    int64_t deadline = pconn__deadline_ns(ms);
    pthread_mutex_lock(&w->mutex);
    while (!atomic_load(&w->stop) && pconn__mono_ns() < deadline)
        pconn__cond_wait_until(&w->cond, &w->mutex, deadline);
    pthread_mutex_unlock(&w->mutex);
}

static void *watch_main(void *arg)
{
    pconn__watch_t *w = arg;
    bool need_read = true;
    int64_t wait_ms = BACKOFF_MIN_MS;
    size_t member = 0;
    while (!atomic_load(&w->stop)) {
        if (need_read) {
            if (full_read(w, 0) != PCONN_OK) {
                backoff(w, wait_ms);
                wait_ms = wait_ms * 2 < BACKOFF_MAX_MS ? wait_ms * 2 : BACKOFF_MAX_MS;
                continue;
            }
            need_read = false;
            member = w->last; /* the member that answered */
        }
        stream(w, member);
        if (w->compacted) {
            need_read = true;
        } else if (!w->created) { /* that member would not watch: the next one, later */
            member = (member + 1) % w->n;
            backoff(w, wait_ms);
            wait_ms = wait_ms * 2 < BACKOFF_MAX_MS ? wait_ms * 2 : BACKOFF_MAX_MS;
            continue;
        } else { /* it watched, then broke: the next member at once */
            member = (member + 1) % w->n;
        }
        wait_ms = BACKOFF_MIN_MS;
    }
    return NULL;
}

/* ---- Consul: blocking queries -------------------------------------------------------- */

/* Replaces the list with one Consul answer, in its order. Under mutex. */
static bool consul_set(pconn__watch_t *w, const pconn__addr_list_t *list)
{
    list_clear(w);
    for (size_t i = 0; list != NULL && i < list->n; i++) {
        char key[24];
        int len = snprintf(key, sizeof key, "%012zu", i); /* sorts as Consul listed them */
        if (!list_set(w, key, (size_t)len, list->items[i]))
            return false;
    }
    return true;
}

/* GET .../health/service/NAME?passing&index=I&wait=30s, over and over: each answer
 * comes when the list changes past index I (or the wait ends), with the new index in
 * X-Consul-Index. An index that goes backwards (a restarted agent, a restored snapshot)
 * starts again from 0, as Consul's documentation says. Queries start at least 50 ms
 * apart, and a second apart unless the last one brought an index higher than the one it
 * asked with (a change it waited for): an agent that answers at once, whatever its
 * indexes do, cannot make this thread spin. A failure marks the cache not current
 * (lookups ask as with watch = 0) and moves to the next agent after a back-off. */
static void *consul_main(void *arg)
{
    pconn__watch_t *w = arg;
    int64_t index = 0, wait_ms = BACKOFF_MIN_MS, last_start = 0, gap_ms = 0;
    size_t member = 0;
    /* A query waits up to CONSUL_WAIT_S, and Consul adds up to 1/16 of it. */
    w->http.blocking_ms = CONSUL_WAIT_S * 1000 + CONSUL_WAIT_S * 1000 / 16;
    while (!atomic_load(&w->stop)) {
        int64_t since_ms = (pconn__mono_ns() - last_start) / 1000000;
        if (last_start > 0 && since_ms < gap_ms) {
            backoff(w, gap_ms - since_ms);
            continue; /* stop is checked again */
        }
        char url[4096];
        snprintf(url, sizeof url, "%s&index=%lld&wait=%ds", w->range_urls[member], (long long)index,
                 CONSUL_WAIT_S);
        pconn__http_reply_t reply;
        pconn_error_t err;
        last_start = pconn__mono_ns();
        pthread_mutex_lock(&w->mutex);
        w->streams++;
        pthread_mutex_unlock(&w->mutex);
        int rc = pconn__http_request(&w->http, url, NULL, &reply, &err);
        pconn__addr_list_t list = {0};
        char why[200] = "";
        bool empty = false;
        if (rc == PCONN_OK && reply.status == 200) {
            rc = pconn__catalog_parse(PCONN_CATALOG_CONSUL, reply.body, reply.len, &list, why, sizeof why);
            empty = rc != PCONN_OK && strcmp(why, "no instances") == 0;
        } else if (rc == PCONN_OK) {
            rc = PCONN_ERESOLVE;
        }
        free(reply.body);
        int64_t next = w->http.consul_index;
        if ((rc == PCONN_OK || empty) && next >= 0) {
            pthread_mutex_lock(&w->mutex);
            bool ok = consul_set(w, rc == PCONN_OK ? &list : NULL);
            w->live = ok;
            w->revision = next;
            pthread_mutex_unlock(&w->mutex);
            pconn__addr_list_free(&list);
            w->last = member;
            gap_ms = index > 0 && next > index ? BACKOFF_MIN_MS : 1000;
            index = next < index ? 0 : next > 0 ? next : 1;
            wait_ms = BACKOFF_MIN_MS;
            continue;
        }
        pconn__addr_list_free(&list);
        pthread_mutex_lock(&w->mutex);
        w->live = false; /* lookups ask, until an answer comes again */
        pthread_mutex_unlock(&w->mutex);
        if (atomic_load(&w->stop))
            break;
        member = (member + 1) % w->n;
        index = 0; /* another agent has indexes of its own */
        gap_ms = 0;
        backoff(w, wait_ms);
        wait_ms = wait_ms * 2 < BACKOFF_MAX_MS ? wait_ms * 2 : BACKOFF_MAX_MS;
    }
    return NULL;
}

/* ---- the registry ------------------------------------------------------------------- */

static void watch_free(pconn__watch_t *w)
{
    pconn__http_cleanup(&w->http);
    if (w->easy != NULL)
        curl_easy_cleanup(w->easy);
    if (w->multi != NULL)
        curl_multi_cleanup(w->multi);
    curl_slist_free_all(w->headers);
    pconn__http_url_list_free(w->range_urls, w->n);
    pconn__http_url_list_free(w->watch_urls, w->n);
    list_clear(w);
    free(w->entries);
    free(w->buf);
    free(w->id);
    free(w->prefix);
    free(w->range_body);
    free(w->watch_body_fields);
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->mutex);
    free(w);
}

static char *concat(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 1;
    char *s = malloc(n);
    if (s != NULL)
        snprintf(s, n, "%s%s", a, b);
    return s;
}

/* range_body NULL: Consul, whose bases are the full query URLs (.../health/service/
 * NAME?passing); else etcd, whose bases are the members' base URLs. */
static pconn__watch_t *watch_new(const char *id, char *const *bases, size_t n, const char *prefix,
                                 const char *range_body, int64_t timeout_ms, size_t max_bytes,
                                 const char *bearer_token, const char *ca_file, pconn_tls_config_t *tls)
{
    pconn__watch_t *w = calloc(1, sizeof *w);
    if (w == NULL)
        return NULL;
    pthread_mutex_init(&w->mutex, NULL);
    pconn__cond_init(&w->cond);
    atomic_init(&w->stop, false);
    w->refs = 1;
    w->n = n;
    w->consul = range_body == NULL;
    w->timeout_ms = timeout_ms;
    w->max_bytes = max_bytes;
    if (pconn__http_init(&w->http, timeout_ms, max_bytes, bearer_token, ca_file, tls) != PCONN_OK)
        goto fail;
    w->id = strdup(id);
    w->prefix = strdup(prefix);
    w->range_urls = calloc(n, sizeof *w->range_urls);
    if (w->id == NULL || w->prefix == NULL || w->range_urls == NULL)
        goto fail;
    if (w->consul) {
        for (size_t i = 0; i < n; i++)
            if ((w->range_urls[i] = strdup(bases[i])) == NULL)
                goto fail;
        if (pthread_create(&w->thread, NULL, consul_main, w) != 0)
            goto fail;
        return w;
    }
    w->range_body = strdup(range_body);
    w->watch_urls = calloc(n, sizeof *w->watch_urls);
    w->multi = curl_multi_init();
    w->easy = curl_easy_init();
    if (w->range_body == NULL || w->watch_urls == NULL || w->multi == NULL || w->easy == NULL)
        goto fail;
    for (size_t i = 0; i < n; i++)
        if ((w->range_urls[i] = concat(bases[i], "/v3/kv/range")) == NULL ||
            (w->watch_urls[i] = concat(bases[i], "/v3/watch")) == NULL)
            goto fail;
    /* The range body is {"key":..,"range_end":..}: the watch takes the same fields. */
    size_t blen = strlen(range_body);
    if (blen < 2 || (w->watch_body_fields = strndup(range_body + 1, blen - 2)) == NULL)
        goto fail;
    /* The same headers as the reads (JSON, the bearer token), and: end the watch when
     * the member loses its leader, so that a member cut off from its cluster does not
     * keep answering with a list that no longer changes. */
    for (struct curl_slist *h = w->http.headers; h != NULL; h = h->next) {
        struct curl_slist *l = curl_slist_append(w->headers, h->data);
        if (l == NULL)
            goto fail;
        w->headers = l;
    }
    struct curl_slist *l = curl_slist_append(w->headers, "Grpc-Metadata-hasleader: true");
    if (l == NULL)
        goto fail;
    w->headers = l;
    if (pthread_create(&w->thread, NULL, watch_main, w) != 0)
        goto fail;
    return w;
fail:
    watch_free(w);
    return NULL;
}

pconn__watch_t *pconn__watch_get(char *const *bases, size_t n, const char *prefix,
                                 const char *range_body, int64_t timeout_ms, size_t max_bytes,
                                 const char *bearer_token, const char *ca_file, pconn_tls_config_t *tls)
{
    size_t idlen = strlen(prefix) + 48 + (bearer_token ? strlen(bearer_token) : 0) +
                   (ca_file ? strlen(ca_file) : 0);
    for (size_t i = 0; i < n; i++)
        idlen += strlen(bases[i]) + 1;
    char *id = malloc(idlen);
    if (id == NULL)
        return NULL;
    size_t off = (size_t)snprintf(id, idlen, "%s\n", range_body == NULL ? "consul" : "etcd");
    for (size_t i = 0; i < n; i++)
        off += (size_t)snprintf(id + off, idlen - off, "%s,", bases[i]);
    snprintf(id + off, idlen - off, "\n%s\n%s\n%s\n%p", prefix, bearer_token ? bearer_token : "",
             ca_file ? ca_file : "", (void *)tls);
    (void)pconn__fork_generation(); /* registers the fork handler: see pconn__watch_after_fork() */
    pthread_mutex_lock(&registry_mutex);
    pconn__watch_t *w = registry;
    while (w != NULL && strcmp(w->id, id) != 0)
        w = w->next;
    if (w != NULL) {
        w->refs++;
    } else if ((w = watch_new(id, bases, n, prefix, range_body, timeout_ms, max_bytes,
                              bearer_token, ca_file, tls)) != NULL) {
        w->next = registry;
        registry = w;
    }
    pthread_mutex_unlock(&registry_mutex);
    free(id);
    return w;
}

void pconn__watch_put(pconn__watch_t *w)
{
    if (w == NULL)
        return;
    pthread_mutex_lock(&registry_mutex);
    bool last = --w->refs == 0;
    if (last) {
        pconn__watch_t **p = &registry;
        while (*p != w)
            p = &(*p)->next;
        *p = w->next;
    }
    pthread_mutex_unlock(&registry_mutex);
    if (!last)
        return;
    pthread_mutex_lock(&w->mutex);
    atomic_store(&w->stop, true);
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mutex);
    pconn__http_abort(&w->http);   /* a range read (Consul: a blocking query) in flight */
    if (w->multi != NULL)
        curl_multi_wakeup(w->multi); /* the stream */
    pthread_join(w->thread, NULL);
    watch_free(w);
}

int pconn__watch_answer(pconn__watch_t *w, size_t (*pick)(void *arg, size_t n), void *arg,
                        char *address, size_t size)
{
    pthread_mutex_lock(&w->mutex);
    int rc = -1;
    if (w->live && w->nentries == 0)
        rc = 0;
    else if (w->live)
        rc = pconn__strcpy(address, size, w->entries[pick(arg, w->nentries)].address) ? 1 : -2;
    pthread_mutex_unlock(&w->mutex);
    return rc;
}

bool pconn__watch_probe(const char *prefix, int64_t *revision, unsigned *watchers, unsigned *streams)
{
    bool live = false;
    *revision = -1;
    *watchers = *streams = 0;
    pthread_mutex_lock(&registry_mutex);
    for (pconn__watch_t *w = registry; w != NULL; w = w->next) {
        if (strcmp(w->prefix, prefix) != 0)
            continue;
        (*watchers)++;
        pthread_mutex_lock(&w->mutex);
        live = w->live;
        *revision = w->revision;
        *streams += w->streams;
        pthread_mutex_unlock(&w->mutex);
    }
    pthread_mutex_unlock(&registry_mutex);
    return live;
}

void pconn__watch_after_fork(void)
{
    /* In a child of fork(): the parent's watchers have no thread here, and their lock
     * may have been held by one that stayed behind. The child starts with none (the
     * parent's stay allocated, as an inherited handle's memory does). */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    registry_mutex = fresh;
    registry = NULL;
}
