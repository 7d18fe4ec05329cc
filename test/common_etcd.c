/* common_etcd.c - see common_etcd.h. */
#include "common_etcd.h"

#include "common.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sin;
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&sin, sizeof sin) == 0 &&
        getsockname(fd, (struct sockaddr *)&sin, &len) == 0)
        port = ntohs(sin.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

typedef struct reader_arg_t {
    tetcd_t *e;
    int pipe_fd;
} reader_arg_t;

/* Copies etcd's output into its log file and notes when it serves. */
static void *log_main(void *arg)
{
    reader_arg_t *r = arg;
    tetcd_t *e = r->e;
    char path[300];
    snprintf(path, sizeof path, "%s.log", e->dir);
    FILE *log = fopen(path, "a");
    FILE *in = fdopen(r->pipe_fd, "r");
    char line[4096];
    while (in != NULL && fgets(line, sizeof line, in) != NULL) {
        if (log != NULL)
            fputs(line, log);
        if (strstr(line, "ready to serve client requests") != NULL) {
            pthread_mutex_lock(&e->mutex);
            e->ready = true;
            pthread_cond_broadcast(&e->cond);
            pthread_mutex_unlock(&e->mutex);
        }
    }
    if (in != NULL)
        fclose(in);
    if (log != NULL)
        fclose(log);
    pthread_mutex_lock(&e->mutex);
    e->exited = true;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->mutex);
    free(r);
    return NULL;
}

/* Starts the process; wait_ready() waits until it serves (a cluster member only does
 * once a quorum is up, so a cluster spawns every member first). */
static int spawn(tetcd_t *e)
{
    char client[64], peer[64], cluster[sizeof e->cluster], name_arg[80];
    snprintf(client, sizeof client, "%s://127.0.0.1:%d", e->tls_dir[0] ? "https" : "http", e->client_port);
    snprintf(peer, sizeof peer, "http://127.0.0.1:%d", e->peer_port);
    if (e->cluster[0] != '\0')
        snprintf(cluster, sizeof cluster, "%s", e->cluster);
    else
        snprintf(cluster, sizeof cluster, "%s=%s", e->name, peer);
    snprintf(name_arg, sizeof name_arg, "%s", e->name);
    char *argv[] = {"etcd", "--name", name_arg, "--data-dir", e->dir,
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", cluster, "--initial-cluster-state", "new",
                    "--heartbeat-interval", "10", "--election-timeout", "100", NULL, NULL, NULL,
                    NULL, NULL, NULL, NULL, NULL, NULL};
    char cert[300], key[300], ca[300];
    if (e->tls_dir[0] != '\0') {
        snprintf(cert, sizeof cert, "--cert-file=%s/server.pem", e->tls_dir);
        snprintf(key, sizeof key, "--key-file=%s/server.key", e->tls_dir);
        snprintf(ca, sizeof ca, "--trusted-ca-file=%s/ca.pem", e->tls_dir);
        size_t a = 0;
        while (argv[a] != NULL)
            a++;
        argv[a++] = cert;
        argv[a++] = key;
        argv[a++] = ca;
        argv[a++] = "--client-cert-auth";
    }
    /* etcd reads ETCD_* variables as flags: leave them out. */
    size_t n = 0;
    while (environ[n] != NULL)
        n++;
    char **envp = calloc(n + 1, sizeof *envp);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "ETCD_", 5) != 0)
            envp[k++] = environ[i];
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        free(envp);
        return -1;
    }
    pthread_mutex_lock(&e->mutex);
    e->ready = e->exited = false;
    pthread_mutex_unlock(&e->mutex);
    pid_t parent = getpid();
    e->pid = fork();
    if (e->pid == 0) {
        /* Only async-signal-safe calls until exec. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        dup2(fds[1], 1);
        dup2(fds[1], 2);
        execvpe("etcd", argv, envp);
        _exit(127);
    }
    free(envp);
    close(fds[1]);
    if (e->pid < 0) {
        close(fds[0]);
        return -1;
    }
    reader_arg_t *r = malloc(sizeof *r);
    r->e = e;
    r->pipe_fd = fds[0];
    pthread_create(&e->reader, NULL, log_main, r);
    return 0;
}

static int wait_ready(tetcd_t *e)
{
    struct timespec ts = test_deadline(30000);
    pthread_mutex_lock(&e->mutex);
    while (!e->ready && !e->exited && pthread_cond_timedwait(&e->cond, &e->mutex, &ts) == 0)
        ;
    bool ok = e->ready;
    pthread_mutex_unlock(&e->mutex);
    if (!ok) {
        fprintf(stderr, "etcd did not start; see %s.log\n", e->dir);
        tetcd_kill(e);
        return -1;
    }
    return 0;
}

static int launch(tetcd_t *e)
{
    return spawn(e) == 0 ? wait_ready(e) : -1;
}

static int prepare(tetcd_t *e)
{
    static int counter;
    memset(e, 0, sizeof *e);
    pthread_mutex_init(&e->mutex, NULL);
    test_cond_init(&e->cond);
    e->client_port = free_port();
    e->peer_port = free_port();
    snprintf(e->url, sizeof e->url, "http://127.0.0.1:%d", e->client_port);
    snprintf(e->name, sizeof e->name, "pconn-test-%d-%d", (int)getpid(), ++counter);
    const char *build = getenv("PCONN_TEST_BUILD");
    snprintf(e->dir, sizeof e->dir, "%s/etcd-%s-XXXXXX", build ? build : "/tmp", e->name);
    return mkdtemp(e->dir) != NULL ? 0 : -1;
}

int tetcd_start(tetcd_t *e)
{
    return prepare(e) == 0 ? launch(e) : -1;
}

int tetcd_start_tls(tetcd_t *e, const char *dir)
{
    if (prepare(e) != 0)
        return -1;
    snprintf(e->tls_dir, sizeof e->tls_dir, "%s", dir);
    snprintf(e->url, sizeof e->url, "https://127.0.0.1:%d", e->client_port);
    return launch(e);
}

int tetcd_cluster_start(tetcd_t *m, int n)
{
    if (n < 1 || n > 5)
        return -1;
    char cluster[sizeof m->cluster] = "";
    for (int i = 0; i < n; i++) {
        if (prepare(&m[i]) != 0)
            return -1;
        size_t len = strlen(cluster);
        snprintf(cluster + len, sizeof cluster - len, "%s%s=http://127.0.0.1:%d", i ? "," : "",
                 m[i].name, m[i].peer_port);
    }
    for (int i = 0; i < n; i++) {
        snprintf(m[i].cluster, sizeof m[i].cluster, "%s", cluster);
        if (spawn(&m[i]) != 0)
            return -1;
    }
    for (int i = 0; i < n; i++)
        if (wait_ready(&m[i]) != 0)
            return -1;
    return 0;
}

int tetcd_restart(tetcd_t *e)
{
    return launch(e);
}

static void remove_dir(const char *dir)
{
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    (void)!system(cmd);
}

int tetcd_restart_empty(tetcd_t *e)
{
    remove_dir(e->dir);
    return launch(e);
}

void tetcd_kill(tetcd_t *e)
{
    if (e->pid <= 0)
        return;
    kill(e->pid, SIGKILL);
    waitpid(e->pid, NULL, 0);
    pthread_join(e->reader, NULL);
    e->pid = 0;
}

void tetcd_stop(tetcd_t *e)
{
    tetcd_kill(e);
    remove_dir(e->dir);
    char log[300];
    snprintf(log, sizeof log, "%s.log", e->dir);
    unlink(log);
    pthread_cond_destroy(&e->cond);
    pthread_mutex_destroy(&e->mutex);
}

/* ---- gateway calls ------------------------------------------------------------------ */

typedef struct buf_t {
    char *data;
    size_t len;
    const char *stop_at; /* watch: stop once this appears */
    bool found;
} buf_t;

static size_t collect(char *p, size_t size, size_t n, void *arg)
{
    buf_t *b = arg;
    char *d = realloc(b->data, b->len + size * n + 1);
    if (d == NULL)
        return 0;
    b->data = d;
    memcpy(d + b->len, p, size * n);
    b->len += size * n;
    d[b->len] = '\0';
    if (b->stop_at != NULL && strstr(d, b->stop_at) != NULL) {
        b->found = true;
        return 0; /* enough: end the stream */
    }
    return size * n;
}

static char *b64(const char *s, size_t len)
{
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *out = malloc((len + 2) / 3 * 4 + 1), *o = out;
    const unsigned char *in = (const unsigned char *)s;
    for (size_t i = 0; i < len; i += 3) {
        unsigned v = (unsigned)in[i] << 16 | (i + 1 < len ? (unsigned)in[i + 1] << 8 : 0) |
                     (i + 2 < len ? in[i + 2] : 0);
        *o++ = t[v >> 18 & 63];
        *o++ = t[v >> 12 & 63];
        *o++ = i + 1 < len ? t[v >> 6 & 63] : '=';
        *o++ = i + 2 < len ? t[v & 63] : '=';
    }
    *o = '\0';
    return out;
}

/* {"key":..,"range_end":..} for a prefix; the caller frees. */
static char *prefix_fields(const char *prefix)
{
    size_t len = strlen(prefix);
    char *end = strdup(prefix);
    end[len - 1]++;
    char *k = b64(prefix, len), *r = b64(end, len);
    char *out = malloc(strlen(k) + strlen(r) + 40);
    sprintf(out, "\"key\":\"%s\",\"range_end\":\"%s\"", k, r);
    free(end);
    free(k);
    free(r);
    return out;
}

static int post(tetcd_t *e, const char *path, const char *body, buf_t *out, int timeout_ms)
{
    CURL *c = curl_easy_init();
    char url[128];
    snprintf(url, sizeof url, "%s%s", e->url, path);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
    CURLcode rc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(c);
    return (rc == CURLE_OK && status == 200) || out->found ? 0 : -1;
}

int tetcd_count(tetcd_t *e, const char *prefix)
{
    char *f = prefix_fields(prefix);
    char body[512];
    snprintf(body, sizeof body, "{%s,\"count_only\":true}", f);
    free(f);
    buf_t out = {0};
    int n = -1;
    if (post(e, "/v3/kv/range", body, &out, 5000) == 0) {
        const char *c = out.data ? strstr(out.data, "\"count\":\"") : NULL;
        n = c != NULL ? atoi(c + 9) : 0; /* zero is left out of answers */
    }
    free(out.data);
    return n;
}

int tetcd_put(tetcd_t *e, const char *key, const char *value)
{
    char *k = b64(key, strlen(key)), *v = b64(value, strlen(value));
    char *body = malloc(strlen(k) + strlen(v) + 40);
    sprintf(body, "{\"key\":\"%s\",\"value\":\"%s\"}", k, v);
    buf_t out = {0};
    int rc = post(e, "/v3/kv/put", body, &out, 5000);
    free(out.data);
    free(body);
    free(k);
    free(v);
    return rc;
}

int tetcd_delete(tetcd_t *e, const char *prefix)
{
    char *f = prefix_fields(prefix);
    char body[512];
    snprintf(body, sizeof body, "{%s}", f);
    free(f);
    buf_t out = {0};
    int rc = post(e, "/v3/kv/deleterange", body, &out, 5000);
    free(out.data);
    return rc;
}

long long tetcd_revision(tetcd_t *e)
{
    buf_t out = {0};
    long long rev = -1;
    char *f = prefix_fields("/");
    char body[512];
    snprintf(body, sizeof body, "{%s,\"count_only\":true}", f);
    free(f);
    if (post(e, "/v3/kv/range", body, &out, 5000) == 0 && out.data != NULL) {
        const char *r = strstr(out.data, "\"revision\":\"");
        rev = r != NULL ? atoll(r + 12) : -1;
    }
    free(out.data);
    return rev;
}

int tetcd_watch(tetcd_t *e, const char *prefix, long long from_revision, bool put, int timeout_ms)
{
    char *f = prefix_fields(prefix);
    char body[600];
    snprintf(body, sizeof body, "{\"create_request\":{%s,\"start_revision\":\"%lld\"%s}}", f,
             from_revision + 1, put ? ",\"filters\":[\"NODELETE\"]" : ",\"filters\":[\"NOPUT\"]");
    free(f);
    /* A PUT event carries no "type" (zero is left out); a DELETE says "DELETE". */
    buf_t out = {.stop_at = put ? "\"kv\":{\"key\"" : "\"type\":\"DELETE\""};
    post(e, "/v3/watch", body, &out, timeout_ms);
    free(out.data);
    return out.found ? 0 : -1;
}

int tetcd_is_leader(tetcd_t *e)
{
    buf_t b = {0};
    if (post(e, "/v3/maintenance/status", "{}", &b, 2000) != 0 || b.data == NULL) {
        free(b.data);
        return -1;
    }
    /* {"header":{"member_id":"X",...},...,"leader":"X",...} */
    char member[32] = "", leader[32] = "";
    const char *m = strstr(b.data, "\"member_id\":\""), *l = strstr(b.data, "\"leader\":\"");
    if (m != NULL)
        sscanf(m + 13, "%31[0-9]", member);
    if (l != NULL)
        sscanf(l + 10, "%31[0-9]", leader);
    free(b.data);
    if (member[0] == '\0' || leader[0] == '\0')
        return -1;
    return strcmp(member, leader) == 0;
}

int tetcd_revoke_all(tetcd_t *e)
{
    buf_t out = {0};
    if (post(e, "/v3/lease/leases", "{}", &out, 5000) != 0) {
        free(out.data);
        out = (buf_t){0};
        if (post(e, "/v3/kv/lease/leases", "{}", &out, 5000) != 0) {
            free(out.data);
            return -1;
        }
    }
    int n = 0;
    for (const char *p = out.data; p != NULL && (p = strstr(p, "\"ID\":\"")) != NULL; p += 6) {
        char body[64];
        snprintf(body, sizeof body, "{\"ID\":\"%lld\"}", atoll(p + 6));
        buf_t r = {0};
        if (post(e, "/v3/lease/revoke", body, &r, 5000) != 0) {
            free(r.data);
            r = (buf_t){0};
            if (post(e, "/v3/kv/lease/revoke", body, &r, 5000) != 0) {
                free(r.data);
                continue;
            }
        }
        free(r.data);
        n++;
    }
    free(out.data);
    return n;
}

long long tetcd_metric(tetcd_t *e, const char *line_prefix)
{
    CURL *c = curl_easy_init();
    char url[128];
    snprintf(url, sizeof url, "%s/metrics", e->url);
    buf_t out = {0};
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 5000L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &out);
    CURLcode rc = curl_easy_perform(c);
    curl_easy_cleanup(c);
    long long sum = -1;
    if (rc == CURLE_OK && out.data != NULL) {
        sum = 0;
        size_t plen = strlen(line_prefix);
        for (const char *line = out.data; line != NULL && *line != '\0';) {
            if (strncmp(line, line_prefix, plen) == 0) {
                const char *sp = strchr(line + plen, ' ');
                if (sp != NULL)
                    sum += (long long)strtod(sp + 1, NULL);
            }
            line = strchr(line, '\n');
            if (line != NULL)
                line++;
        }
    }
    free(out.data);
    return sum;
}

int tetcd_compact(tetcd_t *e)
{
    long long rev = tetcd_revision(e);
    if (rev < 0)
        return -1;
    char body[128];
    snprintf(body, sizeof body, "{\"revision\":\"%lld\",\"physical\":true}", rev);
    buf_t out = {0};
    int rc = post(e, "/v3/kv/compaction", body, &out, 5000);
    free(out.data);
    return rc;
}
