/* http.c - one HTTP request at a time over libcurl, bounded in time and bytes, with TLS
 * verified and cancellable by pconn_close() through the worker's cancel fd. */
#include "catalog.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;

static void curl_init(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

bool pconn__http_url_ok(const char *url)
{
    return url != NULL && (strncasecmp(url, "http://", 7) == 0 || strncasecmp(url, "https://", 8) == 0);
}

typedef struct sink_t {
    char *data;
    size_t len, cap, max;
    bool too_big;
} sink_t;

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *arg)
{
    sink_t *s = arg;
    size_t n = size * nmemb;
    if (n > s->max - s->len) { /* checked while arriving, not after */
        s->too_big = true;
        return 0;
    }
    if (s->len + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->len + n + 1)
            cap *= 2;
        char *data = realloc(s->data, cap);
        if (data == NULL)
            return 0;
        s->data = data;
        s->cap = cap;
    }
    memcpy(s->data + s->len, ptr, n);
    s->len += n;
    s->data[s->len] = '\0';
    return n;
}

int pconn__http_init(pconn__http_t *h, int64_t timeout_ms, size_t max_bytes,
                     const char *bearer_token, const char *ca_file, pconn_tls_config_t *tls)
{
    memset(h, 0, sizeof *h);
    pthread_once(&curl_once, curl_init);
    if (curl_init_rc != CURLE_OK)
        return PCONN_ENOMEM;
    h->timeout_ms = timeout_ms;
    h->max_bytes = max_bytes;
    atomic_init(&h->aborted, false);
    h->multi = curl_multi_init();
    h->easy = curl_easy_init();
    if (h->multi == NULL || h->easy == NULL)
        goto fail;
    if (ca_file != NULL && (h->ca_file = strdup(ca_file)) == NULL)
        goto fail;
    pconn_tls_config_ref(tls);
    h->tls = tls;
    h->headers = curl_slist_append(NULL, "Content-Type: application/json");
    if (h->headers == NULL)
        goto fail;
    if (bearer_token != NULL) {
        size_t len = strlen("Authorization: Bearer ") + strlen(bearer_token) + 1;
        char *line = malloc(len);
        if (line == NULL)
            goto fail;
        snprintf(line, len, "Authorization: Bearer %s", bearer_token);
        struct curl_slist *l = curl_slist_append(h->headers, line);
        free(line);
        if (l == NULL)
            goto fail;
        h->headers = l;
    }
    return PCONN_OK;
fail:
    pconn__http_cleanup(h);
    return PCONN_ENOMEM;
}

void pconn__http_cleanup(pconn__http_t *h)
{
    if (h->easy != NULL)
        curl_easy_cleanup(h->easy);
    if (h->multi != NULL)
        curl_multi_cleanup(h->multi);
    curl_slist_free_all(h->headers);
    free(h->ca_file);
    pconn_tls_config_unref(h->tls);
    memset(h, 0, sizeof *h);
}

void pconn__http_tls_setopt(const pconn__http_t *h, CURL *e)
{
    const pconn_tls_options_t *o = h->tls != NULL ? pconn__tls_config_options(h->tls) : NULL;
    bool verify = o == NULL || !o->insecure_skip_verify;
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, verify ? 1L : 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, verify ? 2L : 0L);
    const char *ca = h->ca_file != NULL ? h->ca_file : o != NULL ? o->ca_file : NULL;
    if (ca != NULL)
        curl_easy_setopt(e, CURLOPT_CAINFO, ca);
    if (o == NULL)
        return;
    if (o->ca_path != NULL)
        curl_easy_setopt(e, CURLOPT_CAPATH, o->ca_path);
    if (o->cert_file != NULL) {
        curl_easy_setopt(e, CURLOPT_SSLCERT, o->cert_file);
        curl_easy_setopt(e, CURLOPT_SSLKEY, o->key_file != NULL ? o->key_file : o->cert_file);
    }
    curl_easy_setopt(e, CURLOPT_SSLVERSION,
                     o->min_version == PCONN_TLS_1_3 ? (long)CURL_SSLVERSION_TLSv1_3 : (long)CURL_SSLVERSION_TLSv1_2);
}

/* A server that requires a client certificate refuses one that has none with an alert
 * after the handshake (TLS 1.3), which libcurl reports as a failed send or receive, or
 * as the alert (etcd sends "bad certificate", others "certificate required"). */
static const char *tls_words(const pconn__http_t *h, const char *url, CURLcode rc)
{
    if (strncasecmp(url, "https://", 8) != 0)
        return NULL;
    const pconn_tls_options_t *o = h->tls != NULL ? pconn__tls_config_options(h->tls) : NULL;
    bool have_cert = o != NULL && o->cert_file != NULL;
    const char *d = h->errbuf;
    if (strstr(d, "alert unknown ca") != NULL)
        return "TLS: the peer rejected our certificate: unknown CA";
    if (!have_cert && (strstr(d, "alert certificate required") != NULL ||
                       strstr(d, "alert bad certificate") != NULL))
        return "TLS: no client certificate: the server requires one (set cert_file and key_file)";
    if (!have_cert && (rc == CURLE_SEND_ERROR || rc == CURLE_RECV_ERROR))
        return "TLS: the connection broke after the handshake; if the server requires a client "
               "certificate, that is why (none is configured: cert_file and key_file)";
    if (have_cert && strstr(d, "alert bad certificate") != NULL)
        return "TLS: the peer rejected our certificate";
    return NULL;
}

/* libcurl's sockets must not leak into a child after fork+exec: close-on-exec. */
int pconn__http_sockopt_cloexec(void *arg, curl_socket_t fd, curlsocktype purpose)
{
    (void)arg;
    (void)purpose;
    int flags = fcntl(fd, F_GETFD);
    if (flags < 0 || fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0)
        return CURL_SOCKOPT_ERROR;
    return CURL_SOCKOPT_OK;
}

/* Consul's blocking queries: the index the next query waits beyond. */
static size_t on_header(char *line, size_t size, size_t n, void *arg)
{
    pconn__http_t *h = arg;
    size_t len = size * n;
    static const char name[] = "X-Consul-Index:";
    if (len > sizeof name - 1 && len < 64 && strncasecmp(line, name, sizeof name - 1) == 0) {
        char v[64];
        memcpy(v, line + sizeof name - 1, len - (sizeof name - 1));
        v[len - (sizeof name - 1)] = '\0';
        char *end;
        long long x = strtoll(v, &end, 10);
        while (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n')
            end++;
        if (end != v && *end == '\0' && x >= 0) /* a number, and nothing else */
            h->consul_index = x;
    }
    return len;
}

static void setup(pconn__http_t *h, const char *url, const char *post_body, sink_t *sink)
{
    CURL *e = h->easy;
    curl_easy_reset(e); /* keeps the connection cache of the multi handle */
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    h->errbuf[0] = '\0';
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, h->errbuf);
    h->consul_index = -1;
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, h);
    curl_easy_setopt(e, CURLOPT_SOCKOPTFUNCTION, pconn__http_sockopt_cloexec);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(h->timeout_ms + h->blocking_ms));
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)h->timeout_ms);
    if (h->blocking_ms > 0) {
        curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
        curl_easy_setopt(e, CURLOPT_TCP_KEEPIDLE, 5L);
        curl_easy_setopt(e, CURLOPT_TCP_KEEPINTVL, 5L);
    }
    pconn__http_tls_setopt(h, e);
    curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)h->max_bytes);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, h->headers);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, sink);
    if (post_body != NULL) {
        curl_easy_setopt(e, CURLOPT_POST, 1L);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, post_body);
    }
}

void pconn__http_abort(pconn__http_t *h)
{
    atomic_store(&h->aborted, true);
    curl_multi_wakeup(h->multi); /* thread-safe: ends a curl_multi_poll() at once */
}

/* Runs the transfer; CURLE_OK or the failure; *cancelled when close or
 * pconn__http_abort() cut it short. */
static CURLcode perform(pconn__http_t *h, bool *cancelled)
{
    int cancel_fd = pconn__cancel_fd();
    curl_multi_add_handle(h->multi, h->easy);
    CURLcode result = CURLE_OK;
    for (;;) {
        if (atomic_load(&h->aborted)) {
            *cancelled = true;
            break;
        }
        int running = 0;
        CURLMcode mc = curl_multi_perform(h->multi, &running);
        if (mc != CURLM_OK) {
            result = CURLE_OUT_OF_MEMORY;
            break;
        }
        if (running == 0) {
            int left;
            CURLMsg *msg = curl_multi_info_read(h->multi, &left);
            result = msg != NULL && msg->msg == CURLMSG_DONE ? msg->data.result : CURLE_RECV_ERROR;
            break;
        }
        struct curl_waitfd extra = {.fd = cancel_fd, .events = CURL_WAIT_POLLIN};
        curl_multi_poll(h->multi, cancel_fd >= 0 ? &extra : NULL, cancel_fd >= 0 ? 1 : 0, 1000, NULL);
        if (cancel_fd >= 0 && extra.revents != 0) {
            if (pconn__cancelled()) {
                *cancelled = true;
                break;
            }
            pconn__wake_drain(cancel_fd); /* a kick: nothing to do here */
        }
    }
    curl_multi_remove_handle(h->multi, h->easy);
    return result;
}

int pconn__http_request(pconn__http_t *h, const char *url, const char *post_body,
                        pconn__http_reply_t *reply, pconn_error_t *err)
{
    memset(reply, 0, sizeof *reply);
    sink_t sink = {.max = h->max_bytes};
    setup(h, url, post_body, &sink);
    bool cancelled = false;
    CURLcode rc = perform(h, &cancelled);
    if (cancelled) {
        free(sink.data);
        pconn_error_set(err, PCONN_ECLOSED, 0, "catalog %s: interrupted by close", url);
        return PCONN_ECLOSED;
    }
    if (sink.too_big || rc == CURLE_FILESIZE_EXCEEDED) {
        free(sink.data);
        pconn_error_set(err, PCONN_ERESOLVE, 0, "catalog %s: answer larger than %zu bytes", url,
                        h->max_bytes);
        return PCONN_ERESOLVE;
    }
    if (rc != CURLE_OK) {
        free(sink.data);
        long os_errno = 0;
        curl_easy_getinfo(h->easy, CURLINFO_OS_ERRNO, &os_errno);
        /* TLS failures in words, with libcurl's details; else libcurl's own words. */
        const char *d = h->errbuf, *words = tls_words(h, url, rc);
        if (words != NULL)
            pconn_error_set(err, PCONN_ERESOLVE, (int)os_errno, "catalog %s: %s: %s (%s)", url, words,
                            curl_easy_strerror(rc), d);
        else
            pconn_error_set(err, PCONN_ERESOLVE, (int)os_errno, "catalog %s: %s", url,
                            curl_easy_strerror(rc));
        return PCONN_ERESOLVE;
    }
    curl_easy_getinfo(h->easy, CURLINFO_RESPONSE_CODE, &reply->status);
    if (sink.data == NULL && (sink.data = calloc(1, 1)) == NULL) {
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "catalog %s", url);
        return PCONN_ENOMEM;
    }
    reply->body = sink.data;
    reply->len = sink.len;
    return PCONN_OK;
}

char **pconn__http_url_list(const char *list, size_t *n, char *bad, size_t bad_size)
{
    *n = 0;
    if (list == NULL) {
        snprintf(bad, bad_size, "(none)");
        return NULL;
    }
    size_t cap = 1;
    for (const char *p = list; *p; p++)
        cap += *p == ',';
    char **urls = calloc(cap, sizeof *urls);
    if (urls == NULL) {
        snprintf(bad, bad_size, "(out of memory)");
        return NULL;
    }
    const char *p = list;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma != NULL ? (size_t)(comma - p) : strlen(p);
        while (len > 0 && p[len - 1] == '/')
            len--;
        char *u = strndup(p, len);
        if (u == NULL || !pconn__http_url_ok(u) || len <= 8) {
            snprintf(bad, bad_size, "%.100s", u != NULL && len > 0 ? u : "(empty)");
            free(u);
            pconn__http_url_list_free(urls, *n);
            *n = 0;
            return NULL;
        }
        urls[(*n)++] = u;
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    return urls;
}

void pconn__http_url_list_free(char **urls, size_t n)
{
    for (size_t i = 0; urls != NULL && i < n; i++)
        free(urls[i]);
    free(urls);
}

/* Appends "; url: cause" (or "url: cause" first) to why, cut at its size. */
static void add_cause(char *why, size_t size, const char *url, const char *cause)
{
    size_t len = strlen(why);
    const char *parts[4] = {len ? "; " : "", url, ": ", cause};
    for (int i = 0; i < 4; i++)
        for (const char *p = parts[i]; *p != '\0' && len + 1 < size; p++)
            why[len++] = *p;
    why[len] = '\0';
}

int pconn__http_request_any(pconn__http_t *h, char *const *urls, size_t n, size_t *last,
                            const char *post_body, int64_t deadline_ns,
                            bool (*member_failed)(long status), pconn__http_reply_t *reply,
                            pconn_error_t *err)
{
    int64_t saved = h->timeout_ms;
    char why[sizeof err->message] = "";
    int rc = PCONN_ERESOLVE;
    for (size_t k = 0; k < n; k++) {
        size_t i = (*last + k) % n;
        int64_t left_ms = (deadline_ns - pconn__mono_ns()) / 1000000;
        if (left_ms <= 0) {
            add_cause(why, sizeof why, urls[i], "not tried, no time left");
            break;
        }
        h->timeout_ms = left_ms / (int64_t)(n - k) > 0 ? left_ms / (int64_t)(n - k) : 1;
        pconn_error_t e = {0};
        rc = pconn__http_request(h, urls[i], post_body, reply, &e);
        if (rc == PCONN_ECLOSED) {
            *err = e;
            break;
        }
        if (rc == PCONN_OK && !member_failed(reply->status)) {
            *last = i;
            h->timeout_ms = saved;
            return PCONN_OK;
        }
        char cause[300];
        if (rc == PCONN_OK) { /* the start of the body says why, for the humans */
            char excerpt[80];
            size_t x = 0;
            for (size_t b = 0; b < reply->len && x + 1 < sizeof excerpt; b++)
                excerpt[x++] = reply->body[b] >= ' ' && reply->body[b] < 127 ? reply->body[b] : ' ';
            excerpt[x] = '\0';
            snprintf(cause, sizeof cause, "HTTP status %ld%s%s", reply->status, x ? ": " : "", excerpt);
            free(reply->body);
            rc = PCONN_ERESOLVE;
        } else {
            /* the request's own message starts with "catalog URL: ": keep the cause */
            const char *c = strstr(e.message, ": ");
            snprintf(cause, sizeof cause, "%.250s", c != NULL ? c + 2 : e.message);
        }
        add_cause(why, sizeof why, urls[i], cause);
    }
    h->timeout_ms = saved;
    if (rc != PCONN_ECLOSED) {
        if (n == 1)
            pconn_error_set(err, PCONN_ERESOLVE, 0, "catalog %.240s", why);
        else
            pconn_error_set(err, PCONN_ERESOLVE, 0, "catalog: every member failed: %.220s", why);
        rc = PCONN_ERESOLVE;
    }
    return rc;
}
