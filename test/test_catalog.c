/* test_catalog.c - the HTTP catalog resolver against a local HTTP server that answers
 * well, badly, slowly or never; and the etcd format and the announcer against a real
 * etcd started here on loopback (there is no Consul package: Consul's format is served
 * by the local HTTP server from a body of the documented shape). */
#include "common.h"
#include "common_etcd.h"
#include "common_http.h"
#include "pconn_resolver.h"
#include "pconn_tcp.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <time.h>
#include <sys/socket.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static pconn_resolver_t *catalog(const char *url, pconn_catalog_format_t format, const char *key,
                                 pconn_pick_t pick)
{
    pconn_http_catalog_options_t o = {.url = url, .format = format, .key = key, .pick = pick,
                                      .timeout_ms = 5000};
    pconn_resolver_t *r = pconn_resolver_http_catalog(&o);
    CU_ASSERT_PTR_NOT_NULL(r);
    return r;
}

/* One lookup; the address, or the error message, in out. */
static int lookup(pconn_resolver_t *r, char *out, size_t size)
{
    pconn_error_t err;
    int rc = pconn_resolve(r, out, size, &err);
    if (rc != PCONN_OK)
        snprintf(out, size, "%s", err.message);
    return rc;
}

#define ASSERT_LOOKUP(r, want)                                         \
    do {                                                               \
        char got_[PCONN_ADDRESS_MAX];                                  \
        CU_ASSERT_EQUAL(lookup(r, got_, sizeof got_), PCONN_OK);       \
        CU_ASSERT_STRING_EQUAL(got_, want);                            \
    } while (0)

/* A failing lookup whose message is "catalog URL: " followed by what contains `why`. */
static void assert_fails(pconn_resolver_t *r, const char *url, const char *why)
{
    char got[PCONN_ADDRESS_MAX], prefix[200];
    CU_ASSERT_EQUAL(lookup(r, got, sizeof got), PCONN_ERESOLVE);
    snprintf(prefix, sizeof prefix, "catalog %s: ", url);
    CU_ASSERT_EQUAL(strncmp(got, prefix, strlen(prefix)), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(got, why));
    if (strncmp(got, prefix, strlen(prefix)) != 0 || strstr(got, why) == NULL)
        fprintf(stderr, "\n  got \"%s\", want \"%s...%s\"\n", got, prefix, why);
}

/* ---- the JSON format ------------------------------------------------------------ */

static void test_json_shapes(void)
{
    thttp_t h;
    CU_ASSERT_EQUAL_FATAL(thttp_start(&h, HTTP_FIXED, 200, "\"127.0.0.1:7001\""), 0);
    pconn_resolver_t *r = catalog(h.url, PCONN_CATALOG_JSON, NULL, PCONN_PICK_ROUND_ROBIN);
    ASSERT_LOOKUP(r, "127.0.0.1:7001");
    thttp_set(&h, HTTP_FIXED, 200, "{\"host\":\"10.0.0.5\",\"port\":7002}");
    ASSERT_LOOKUP(r, "10.0.0.5:7002");
    thttp_set(&h, HTTP_FIXED, 200, "{\"host\":\"::1\",\"port\":\"7003\"}");
    ASSERT_LOOKUP(r, "[::1]:7003");
    thttp_set(&h, HTTP_FIXED, 200, "{\"address\":\"db.internal:5432\"}");
    ASSERT_LOOKUP(r, "db.internal:5432");
    pconn_resolver_free(r);
    /* A list, in turn (a new resolver: round robin starts at the first). */
    r = catalog(h.url, PCONN_CATALOG_JSON, NULL, PCONN_PICK_ROUND_ROBIN);
    thttp_set(&h, HTTP_FIXED, 200, "[\"a:1\", {\"host\":\"b\",\"port\":2}, {\"address\":\"c:3\"}]");
    ASSERT_LOOKUP(r, "a:1");
    ASSERT_LOOKUP(r, "b:2");
    ASSERT_LOOKUP(r, "c:3");
    ASSERT_LOOKUP(r, "a:1");
    /* An invalid instance among valid ones is skipped. */
    thttp_set(&h, HTTP_FIXED, 200, "[{\"host\":\"x\",\"port\":0}, \"ok:9\"]");
    ASSERT_LOOKUP(r, "ok:9");
    /* Each resolver kept one keep-alive connection for all its lookups. */
    CU_ASSERT_EQUAL(thttp_connections(&h), 2);
    pconn_resolver_free(r);
    thttp_stop(&h);
}

static void test_pick_policies(void)
{
    thttp_t h;
    CU_ASSERT_EQUAL_FATAL(thttp_start(&h, HTTP_FIXED, 200, "[\"a:1\",\"b:2\",\"c:3\"]"), 0);
    pconn_resolver_t *r = catalog(h.url, PCONN_CATALOG_JSON, NULL, PCONN_PICK_FIRST);
    for (int i = 0; i < 3; i++)
        ASSERT_LOOKUP(r, "a:1");
    pconn_resolver_free(r);
    r = catalog(h.url, PCONN_CATALOG_JSON, NULL, PCONN_PICK_RANDOM);
    int seen[3] = {0};
    for (int i = 0; i < 60; i++) {
        char got[PCONN_ADDRESS_MAX];
        CU_ASSERT_EQUAL(lookup(r, got, sizeof got), PCONN_OK);
        CU_ASSERT(got[0] >= 'a' && got[0] <= 'c');
        if (got[0] >= 'a' && got[0] <= 'c')
            seen[got[0] - 'a']++;
    }
    CU_ASSERT(seen[0] > 0 && seen[1] > 0 && seen[2] > 0);
    pconn_resolver_free(r);
    thttp_stop(&h);
}

static void test_bearer_token_and_consul(void)
{
    static const char consul[] =
        "[{\"Node\":{\"Node\":\"n1\",\"Address\":\"10.1.0.1\"},"
        "\"Service\":{\"ID\":\"web1\",\"Service\":\"web\",\"Address\":\"\",\"Port\":8300},"
        "\"Checks\":[{\"Status\":\"passing\"}]},"
        "{\"Node\":{\"Node\":\"n2\",\"Address\":\"10.1.0.2\"},"
        "\"Service\":{\"ID\":\"web2\",\"Service\":\"web\",\"Address\":\"10.9.9.9\",\"Port\":8301},"
        "\"Checks\":[]}]";
    thttp_t h;
    CU_ASSERT_EQUAL_FATAL(thttp_start(&h, HTTP_FIXED, 200, consul), 0);
    pconn_http_catalog_options_t o = {.url = h.url, .format = PCONN_CATALOG_CONSUL, .key = "web",
                                      .bearer_token = "s3cret"};
    pconn_resolver_t *r = pconn_resolver_http_catalog(&o);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    ASSERT_LOOKUP(r, "10.1.0.1:8300"); /* Node.Address when Service.Address is empty */
    ASSERT_LOOKUP(r, "10.9.9.9:8301");
    char req[8192];
    thttp_last_request(&h, req, sizeof req);
    CU_ASSERT_EQUAL(strncmp(req, "GET /v1/health/service/web?passing HTTP/1.1\r\n", 45), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(req, "\r\nAuthorization: Bearer s3cret\r\n"));
    thttp_set(&h, HTTP_FIXED, 200, "[{\"Node\":{},\"Service\":{\"Port\":1}}]");
    char url[200];
    snprintf(url, sizeof url, "%s/v1/health/service/web?passing", h.url);
    assert_fails(r, url, "instance 1: no Service.Address or Node.Address");
    pconn_resolver_free(r);
    thttp_stop(&h);
}

static void test_bad_answers(void)
{
    thttp_t h;
    CU_ASSERT_EQUAL_FATAL(thttp_start(&h, HTTP_FIXED, 200, ""), 0);
    pconn_resolver_t *r = catalog(h.url, PCONN_CATALOG_JSON, NULL, PCONN_PICK_ROUND_ROBIN);
    static const struct {
        int status;
        const char *body, *why;
    } cases[] = {
        {503, "{\"error\":\"overloaded\"}", "HTTP status 503: {\"error\":\"overloaded\"}"},
        {404, "", "HTTP status 404"},
        {200, "hello", "not JSON: "},
        {200, "{\"host\":\"a\"", "not JSON: "},
        {200, "42", "wrong shape"},
        {200, "[]", "no instances"},
        {200, "[1, 2]", "instance 1: not a string or an object"},
        {200, "{\"port\":80}", "no \"host\" string"},
        {200, "{\"host\":\"a\",\"port\":true}", "no \"port\" number"},
        {200, "[{\"host\":\"bad host\",\"port\":80}]", "bad character in host"},
        {200, "{\"host\":\"\",\"port\":80}", "empty host"},
        {200, "{\"host\":\"a\",\"port\":70000}", "port 70000 outside 1-65535"},
        {200, "{\"host\":\"a\",\"port\":0}", "port 0 outside 1-65535"},
        {200, "\"no-port\"", "no port"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        thttp_set(&h, HTTP_FIXED, cases[i].status, cases[i].body);
        assert_fails(r, h.url, cases[i].why);
    }
    pconn_resolver_free(r);
    thttp_stop(&h);
}

static void test_refused_slow_silent_huge(void)
{
    /* Refused: nothing listens there. */
    thttp_t h;
    CU_ASSERT_EQUAL_FATAL(thttp_start(&h, HTTP_FIXED, 200, "\"a:1\""), 0);
    char url[80];
    snprintf(url, sizeof url, "%s", h.url);
    thttp_stop(&h);
    pconn_http_catalog_options_t o = {.url = url, .timeout_ms = 300, .max_response_bytes = 65536};
    pconn_resolver_t *r = pconn_resolver_http_catalog(&o);
    assert_fails(r, url, "Couldn't connect to server");
    pconn_resolver_free(r);

    const struct {
        http_mode_t mode;
        const char *why;
    } cases[] = {
        {HTTP_SILENT, "Timeout was reached"},
        {HTTP_SLOW, "Timeout was reached"},
        {HTTP_ENDLESS, "answer larger than 65536 bytes"}, /* caught while arriving */
        {HTTP_BIG_LEN, "answer larger than 65536 bytes"}, /* caught by its length */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        CU_ASSERT_EQUAL_FATAL(thttp_start(&h, cases[i].mode, 200, NULL), 0);
        o.url = h.url;
        r = pconn_resolver_http_catalog(&o);
        assert_fails(r, h.url, cases[i].why);
        pconn_resolver_free(r);
        thttp_stop(&h);
    }
}

/* A real TLS server (openssl s_server) with a self-signed certificate: refused without
 * the CA, answered with it. */
static void test_tls_verification(void)
{
    char dir[] = "/tmp/pconn-tls-XXXXXX";
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "cd %s && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
             "-keyout key.pem -out cert.pem -days 2 -subj /CN=127.0.0.1 "
             "-addext subjectAltName=IP:127.0.0.1 >/dev/null 2>&1 && "
             "printf '\"127.0.0.1:7001\"' > catalog.json", dir);
    CU_ASSERT_EQUAL_FATAL(system(cmd), 0);
    pconn_error_t err;
    int lfd = pconn_tcp_listen("127.0.0.1:0", 1, &err);
    char address[64];
    pconn_tcp_local_address(lfd, address, sizeof address);
    close(lfd); /* a free port for s_server */
    snprintf(cmd, sizeof cmd, "cd %s && exec openssl s_server -accept %s -cert cert.pem -key key.pem -WWW 2>&1",
             dir, address);
    const char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    tproc_t p;
    CU_ASSERT_EQUAL_FATAL(tproc_spawn(&p, argv), 0);
    char line[256] = "";
    while (tproc_read_line(&p, line, sizeof line) == 0 && strcmp(line, "ACCEPT") != 0)
        ;
    CU_ASSERT_STRING_EQUAL_FATAL(line, "ACCEPT");

    char url[128], ca[128];
    snprintf(url, sizeof url, "https://%s/catalog.json", address);
    snprintf(ca, sizeof ca, "%s/cert.pem", dir);
    pconn_http_catalog_options_t o = {.url = url, .timeout_ms = 5000};
    pconn_resolver_t *r = pconn_resolver_http_catalog(&o);
    assert_fails(r, url, "certificate"); /* verification is on: an unknown CA is refused */
    pconn_resolver_free(r);
    o.ca_file = ca;
    r = pconn_resolver_http_catalog(&o);
    ASSERT_LOOKUP(r, "127.0.0.1:7001");
    pconn_resolver_free(r);
    tproc_signal(&p, SIGKILL);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CU_ASSERT_EQUAL(system(cmd), 0);
}

static void test_bad_options(void)
{
    pconn_http_catalog_options_t o = {.url = "ftp://example/x"};
    errno = 0;
    CU_ASSERT_PTR_NULL(pconn_resolver_http_catalog(&o));
    CU_ASSERT_EQUAL(errno, EINVAL);
    o.url = "file:///etc/passwd";
    CU_ASSERT_PTR_NULL(pconn_resolver_http_catalog(&o));
    o.url = NULL;
    CU_ASSERT_PTR_NULL(pconn_resolver_http_catalog(&o));
    CU_ASSERT_PTR_NULL(pconn_resolver_http_catalog(NULL));
    o = (pconn_http_catalog_options_t){.url = "http://127.0.0.1:1", .format = PCONN_CATALOG_ETCD};
    CU_ASSERT_PTR_NULL(pconn_resolver_http_catalog(&o)); /* etcd needs a key prefix */
    o = (pconn_http_catalog_options_t){.url = "http://127.0.0.1:1", .format = PCONN_CATALOG_CONSUL,
                                       .key = "web?x=1"};
    CU_ASSERT_PTR_NULL(pconn_resolver_http_catalog(&o));
    o = (pconn_http_catalog_options_t){.url = "HTTPS://127.0.0.1:1"};
    pconn_resolver_t *r = pconn_resolver_http_catalog(&o);
    CU_ASSERT_PTR_NOT_NULL(r);
    pconn_resolver_free(r);
}

static void test_close_interrupts_lookup(void)
{
    thttp_t h;
    CU_ASSERT_EQUAL_FATAL(thttp_start(&h, HTTP_SILENT, 200, NULL), 0);
    pconn_http_catalog_options_t co = {.url = h.url, .timeout_ms = 600000}; /* ten minutes */
    recorder_t rec;
    rec_init(&rec);
    pconn_options_t o = {.server_name = "cat", .resolver = pconn_resolver_http_catalog(&co),
                         .on_event = rec_on_event, .on_event_arg = &rec};
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_tcp_create(&o, NULL, &pc), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(thttp_wait_requests(&h, 1, WAIT_MS), 1); /* the lookup is under way */
    int64_t t0 = pconn_clock_now(NULL);
    CU_ASSERT_EQUAL(pconn_close(pc, 10000), PCONN_OK); /* not the ten minutes */
    fprintf(stderr, "[close during lookup took %.1f ms] ", (double)(pconn_clock_now(NULL) - t0) / 1e6);
    char letters[8];
    rec_letters(&rec, letters, sizeof letters);
    CU_ASSERT_STRING_EQUAL(letters, "A");
    pconn_free(pc);
    rec_destroy(&rec);
    thttp_stop(&h);
}

/* ---- etcd ----------------------------------------------------------------------- */

static tetcd_t etcd;
static bool etcd_up;

static bool need_etcd(void)
{
    if (!etcd_up)
        etcd_up = tetcd_start(&etcd) == 0;
    CU_ASSERT_TRUE(etcd_up);
    return etcd_up;
}

static void test_etcd_lookup(void)
{
    if (!need_etcd())
        return;
    CU_ASSERT_EQUAL(tetcd_put(&etcd, "/services/echo/a", "{\"host\":\"127.0.0.1\",\"port\":7001}"), 0);
    CU_ASSERT_EQUAL(tetcd_put(&etcd, "/services/echo/b", "127.0.0.1:7002"), 0);
    CU_ASSERT_EQUAL(tetcd_put(&etcd, "/services/echoX", "127.0.0.1:9999"), 0); /* not under it */
    pconn_resolver_t *r = catalog(etcd.url, PCONN_CATALOG_ETCD, "/services/echo/", PCONN_PICK_ROUND_ROBIN);
    ASSERT_LOOKUP(r, "127.0.0.1:7001");
    ASSERT_LOOKUP(r, "127.0.0.1:7002");
    ASSERT_LOOKUP(r, "127.0.0.1:7001");
    pconn_resolver_free(r);

    /* One instance. */
    r = catalog(etcd.url, PCONN_CATALOG_ETCD, "/services/echoX", PCONN_PICK_ROUND_ROBIN);
    ASSERT_LOOKUP(r, "127.0.0.1:9999");
    pconn_resolver_free(r);

    /* None. */
    char url[128];
    snprintf(url, sizeof url, "%s/v3/kv/range", etcd.url);
    r = catalog(etcd.url, PCONN_CATALOG_ETCD, "/services/nothing/", PCONN_PICK_ROUND_ROBIN);
    assert_fails(r, url, "no instances");
    pconn_resolver_free(r);
    tetcd_delete(&etcd, "/services/");
}

static void test_announce_and_revoke(void)
{
    if (!need_etcd())
        return;
    pconn_announce_options_t ao = {.etcd_url = etcd.url, .key = "/services/ann/1",
                                   .address = "127.0.0.1:7101", .ttl_s = 5};
    pconn_announcer_t *a = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_announce_start(&ao, &a, &err), PCONN_OK);
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/ann/"), 1);
    pconn_resolver_t *r = catalog(etcd.url, PCONN_CATALOG_ETCD, "/services/ann/", PCONN_PICK_FIRST);
    ASSERT_LOOKUP(r, "127.0.0.1:7101");
    pconn_announce_stop(a); /* revokes: the key goes at once, not after the TTL */
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/ann/"), 0);
    pconn_resolver_free(r);
}

/* Descriptors that are sockets, as a bitmap of the first 1024 fds. */
static void socket_fds(bool out[1024])
{
    char path[64], link[64];
    for (int fd = 0; fd < 1024; fd++) {
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(path, link, sizeof link - 1);
        out[fd] = n > 0 && (link[n] = '\0', strncmp(link, "socket:", 7) == 0);
    }
}

/* Issue 10 item 5: libcurl's sockets are close-on-exec; item 6: a huge TTL does not
 * overflow the keep-alive interval (int arithmetic before). Both failed before. */
static void test_announce_cloexec_huge_ttl(void)
{
    if (!need_etcd())
        return;
    static bool before[1024], after[1024];
    socket_fds(before);
    pconn_announce_options_t ao = {.etcd_url = etcd.url, .key = "/services/cx/1",
                                   .address = "127.0.0.1:7102", .ttl_s = 2000000000};
    pconn_announcer_t *a = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_announce_start(&ao, &a, &err), PCONN_OK);
    socket_fds(after);
    int checked = 0;
    for (int fd = 0; fd < 1024; fd++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        /* only the TCP connections: libcurl 7.88 makes its multi handle's wake-up
         * socketpair (AF_UNIX) without close-on-exec and offers no hook for it */
        if (after[fd] && !before[fd] && getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
            (ss.ss_family == AF_INET || ss.ss_family == AF_INET6)) {
            checked++;
            CU_ASSERT_TRUE((fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
        }
    }
    CU_ASSERT_TRUE(checked >= 1); /* the connection to etcd, kept for the keep-alives */
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/cx/"), 1);
    pconn_announce_stop(a);
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/cx/"), 0);
}

/* Bytes waiting unread in etcd's end of any TCP connection to its client port: a
 * request etcd has not read yet (it is stopped). From /proc/net/tcp{,6}. */
static long etcd_unread(void)
{
    long total = 0;
    const char *files[] = {"/proc/net/tcp", "/proc/net/tcp6"};
    for (int f = 0; f < 2; f++) {
        FILE *in = fopen(files[f], "r");
        if (in == NULL)
            continue;
        char line[512];
        while (fgets(line, sizeof line, in) != NULL) {
            char local[64];
            unsigned long tx, rx;
            if (sscanf(line, " %*d: %63s %*s %*x %lx:%lx", local, &tx, &rx) != 3)
                continue;
            const char *colon = strrchr(local, ':');
            if (colon != NULL && strtol(colon + 1, NULL, 16) == etcd.client_port)
                total += (long)rx;
        }
        fclose(in);
    }
    return total;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Issue 10 item 6: pconn_announce_stop() keeps its documented 2 s bound with etcd hung
 * while a keep-alive is in flight. Before: the keep-alive's own 2 s timeout, then the
 * revoke's 2 s (about 4 s). The 1 s of slack is for a loaded machine. */
static void test_announce_stop_bound_etcd_hung(void)
{
    if (!need_etcd())
        return;
    pconn_announce_options_t ao = {.etcd_url = etcd.url, .key = "/services/hung/1",
                                   .address = "127.0.0.1:7103", .ttl_s = 1};
    pconn_announcer_t *a = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_announce_start(&ao, &a, &err), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(kill(etcd.pid, SIGSTOP), 0);
    /* The next keep-alive (every ttl/3) reaches etcd's socket and stays unread there. */
    int64_t give_up = mono_ms() + WAIT_MS;
    while (etcd_unread() == 0 && mono_ms() < give_up)
        poll(NULL, 0, 5);
    if (etcd_unread() == 0) /* a precondition, not the promise: the bound holds anyway */
        fprintf(stderr, "\n  (no keep-alive seen unread in etcd's socket; stopping anyway)\n");
    int64_t t0 = mono_ms();
    pconn_announce_stop(a);
    int64_t took = mono_ms() - t0;
    kill(etcd.pid, SIGCONT);
    CU_ASSERT(took <= 2000 + 1000);
    if (getenv("PCONN_TEST_VERBOSE") != NULL || took > 3000)
        fprintf(stderr, "\n  pconn_announce_stop took %lld ms\n", (long long)took);
    tetcd_revoke_all(&etcd);
    tetcd_delete(&etcd, "/services/hung/");
}

static void test_announce_bad_options(void)
{
    pconn_announcer_t *a = (pconn_announcer_t *)&etcd;
    pconn_error_t err;
    pconn_announce_options_t ao = {.etcd_url = "http://127.0.0.1:1", .key = "/k", .address = "h:70000"};
    CU_ASSERT_EQUAL(pconn_announce_start(&ao, &a, &err), PCONN_EINVAL);
    CU_ASSERT_PTR_NULL(a);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "port 70000"));
    ao.address = "h:1";
    ao.etcd_url = "gopher://x";
    CU_ASSERT_EQUAL(pconn_announce_start(&ao, &a, &err), PCONN_EINVAL);
    CU_ASSERT_EQUAL(pconn_announce_start(NULL, &a, &err), PCONN_EINVAL);
    /* etcd not there: a clear error naming it, nothing left behind. */
    thttp_t h;
    CU_ASSERT_EQUAL_FATAL(thttp_start(&h, HTTP_FIXED, 200, ""), 0);
    char url[80];
    snprintf(url, sizeof url, "%s", h.url);
    thttp_stop(&h);
    ao.etcd_url = url;
    CU_ASSERT_EQUAL(pconn_announce_start(&ao, &a, &err), PCONN_ECONNECT);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, url));
    pconn_announce_stop(NULL);
}

/* Starts `pconn serve` announcing itself; its address in address. */
static int spawn_server(tproc_t *p, const char *name, const char *key, char *address, size_t size)
{
    const char *argv[] = {"pconn", "serve", "127.0.0.1:0", "--name", name, "--announce",
                          etcd.url, key, "--ttl", "2", NULL};
    return tproc_spawn_server(p, argv, address, size);
}

static int64_t short_delay(void *arg, unsigned failures)
{
    (void)arg, (void)failures;
    return 100;
}

static void test_killed_server_expires(void)
{
    if (!need_etcd())
        return;
    tproc_t a, b;
    char addr_a[256], addr_b[256];
    CU_ASSERT_EQUAL_FATAL(spawn_server(&a, "a", "/services/kill/a", addr_a, sizeof addr_a), 0);
    CU_ASSERT_EQUAL_FATAL(spawn_server(&b, "b", "/services/kill/b", addr_b, sizeof addr_b), 0);
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/kill/"), 2);

    recorder_t rec;
    rec_init(&rec);
    pconn_options_t o = {.server_name = "echo",
                         .resolver = catalog(etcd.url, PCONN_CATALOG_ETCD, "/services/kill/", PCONN_PICK_FIRST),
                         .on_event = rec_on_event, .on_event_arg = &rec, .retry_delay = short_delay};
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_tcp_create(&o, NULL, &pc), PCONN_OK);
    int i = rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    CU_ASSERT_STRING_EQUAL(rec_get(&rec, i).address, addr_a); /* the first key */

    tproc_signal(&a, SIGKILL); /* no clean stop: its lease must expire */
    i = rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 1, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    CU_ASSERT_STRING_EQUAL(rec_get(&rec, i).address, addr_b);
    /* Picking the first key, it could reach b only once a's key had gone. */
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/kill/a"), 0);
    pconn_free(pc);
    rec_destroy(&rec);

    tproc_signal(&b, SIGTERM); /* a clean stop revokes at once */
    CU_ASSERT_EQUAL(tproc_wait(&b), 0);
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/kill/"), 0);
}

static void test_etcd_restart(void)
{
    if (!need_etcd())
        return;
    CU_ASSERT_EQUAL(tetcd_put(&etcd, "/services/rs/1", "127.0.0.1:7201"), 0);
    pconn_resolver_t *r = catalog(etcd.url, PCONN_CATALOG_ETCD, "/services/rs/", PCONN_PICK_FIRST);
    ASSERT_LOOKUP(r, "127.0.0.1:7201");
    tetcd_kill(&etcd);
    char url[128];
    snprintf(url, sizeof url, "%s/v3/kv/range", etcd.url);
    assert_fails(r, url, "Couldn't connect to server");
    CU_ASSERT_EQUAL_FATAL(tetcd_restart(&etcd), 0);
    ASSERT_LOOKUP(r, "127.0.0.1:7201"); /* it recovers with the catalog */
    pconn_resolver_free(r);
    tetcd_delete(&etcd, "/services/");
}

static void test_announcer_reregisters(void)
{
    if (!need_etcd())
        return;
    pconn_announce_options_t ao = {.etcd_url = etcd.url, .key = "/services/re/1",
                                   .address = "127.0.0.1:7301", .ttl_s = 3};
    pconn_announcer_t *a = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_announce_start(&ao, &a, &err), PCONN_OK);
    /* etcd goes away and comes back empty: the lease is unknown there. */
    tetcd_kill(&etcd);
    CU_ASSERT_EQUAL_FATAL(tetcd_restart_empty(&etcd), 0);
    CU_ASSERT_EQUAL(tetcd_watch(&etcd, "/services/re/", 0, true, WAIT_MS), 0);
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/re/"), 1);

    /* The lease is revoked behind its back (as if it expired): a new one is taken. */
    long long rev = tetcd_revision(&etcd);
    CU_ASSERT_FATAL(rev > 0);
    CU_ASSERT_EQUAL(tetcd_revoke_all(&etcd), 1);
    CU_ASSERT_EQUAL(tetcd_watch(&etcd, "/services/re/", rev, true, WAIT_MS), 0);
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/re/"), 1);
    pconn_announce_stop(a);
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/re/"), 0);
}

typedef struct alog_t {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int n;
    char line[8][512];
} alog_t;

static void keep_alog(int level, const char *message, void *arg)
{
    alog_t *l = arg;
    pthread_mutex_lock(&l->mutex);
    if (l->n < 8)
        snprintf(l->line[l->n++], sizeof l->line[0], "%d %s", level, message);
    pthread_cond_broadcast(&l->cond);
    pthread_mutex_unlock(&l->mutex);
}

/* The announcer tells its story: the lease gone (WARNING), registered again (INFO). */
static void test_announcer_log(void)
{
    if (!need_etcd())
        return;
    alog_t log = {.mutex = PTHREAD_MUTEX_INITIALIZER};
    test_cond_init(&log.cond);
    pconn_announce_options_t ao = {.etcd_url = etcd.url, .key = "/services/log/1",
                                   .address = "127.0.0.1:7401", .ttl_s = 3,
                                   .on_log = keep_alog, .on_log_arg = &log};
    pconn_announcer_t *a = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_announce_start(&ao, &a, &err), PCONN_OK);
    CU_ASSERT_EQUAL(tetcd_revoke_all(&etcd), 1);
    CU_ASSERT_EQUAL(test_wait_count(&log.mutex, &log.cond, &log.n, 2, WAIT_MS), 2);
    CU_ASSERT_PTR_NOT_NULL(strstr(log.line[0], " is gone: registering again"));
    CU_ASSERT_EQUAL(log.line[0][0], '0' + PCONN_LOG_WARNING);
    CU_ASSERT_PTR_NOT_NULL(strstr(log.line[1], "/services/log/1 registered again under lease "));
    CU_ASSERT_EQUAL(log.line[1][0], '0' + PCONN_LOG_INFO);
    pconn_announce_stop(a);
    CU_ASSERT_EQUAL(tetcd_count(&etcd, "/services/log/"), 0);
}

static const test_def_t tests[] = {
    {"json_shapes", test_json_shapes},
    {"pick_policies", test_pick_policies},
    {"bearer_token_and_consul", test_bearer_token_and_consul},
    {"bad_answers", test_bad_answers},
    {"refused_slow_silent_huge", test_refused_slow_silent_huge},
    {"tls_verification", test_tls_verification},
    {"bad_options", test_bad_options},
    {"close_interrupts_lookup", test_close_interrupts_lookup},
    {"etcd_lookup", test_etcd_lookup},
    {"announce_and_revoke", test_announce_and_revoke},
    {"announce_cloexec_huge_ttl", test_announce_cloexec_huge_ttl},
    {"announce_stop_bound_etcd_hung", test_announce_stop_bound_etcd_hung},
    {"announce_bad_options", test_announce_bad_options},
    {"killed_server_expires", test_killed_server_expires},
    {"etcd_restart", test_etcd_restart},
    {"announcer_reregisters", test_announcer_reregisters},
    {"announcer_log", test_announcer_log},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    int rc = run_suite("catalog", tests, argc, argv);
    if (etcd_up)
        tetcd_stop(&etcd);
    return rc;
}
