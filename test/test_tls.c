/* test_tls.c - TLS against a stack we did not write (openssl s_server and s_client) and
 * between libpconn's own client and server: verification and its failures in words,
 * mutual TLS, the peer's identity in a handler, authorize, plaintext on either side,
 * close during the handshake, reads with deadlines, session resumption. The
 * certificates are made by test/tls-certs.sh in a temporary directory. */
#include "common.h"
#include "common_etcd.h"
#include "pconn_resolver.h"
#include "pconn_rpc.h"
#include "pconn_tcp.h"
#include "pconn_tls.h"

#include <errno.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static char dir[64];

static void remove_certs(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "test_tls: could not remove %s\n", dir);
}

/* The path of one of the generated files (four rotating buffers). */
static const char *f(const char *name)
{
    static char bufs[4][160];
    static int i;
    if (dir[0] == '\0') {
        snprintf(dir, sizeof dir, "/tmp/pconn-tls-XXXXXX");
        if (mkdtemp(dir) == NULL)
            abort();
        char cmd[256];
        snprintf(cmd, sizeof cmd, "test/tls-certs.sh %s", dir);
        if (system(cmd) != 0)
            abort();
        atexit(remove_certs);
    }
    char *b = bufs[i++ % 4];
    snprintf(b, sizeof bufs[0], "%s/%s", dir, name);
    return b;
}

static pconn_tls_config_t *config(int server, const pconn_tls_options_t *o)
{
    pconn_tls_config_t *cfg = NULL;
    pconn_error_t err = {0};
    int rc = pconn_tls_config_new(o, server, &cfg, &err);
    if (rc != PCONN_OK)
        fprintf(stderr, "config: %s\n", err.message);
    CU_ASSERT_EQUAL_FATAL(rc, PCONN_OK);
    return cfg;
}

static pconn_tls_config_t *client_config(const char *cert)
{
    char certf[64], keyf[64];
    snprintf(certf, sizeof certf, "%s.pem", cert ? cert : "");
    snprintf(keyf, sizeof keyf, "%s.key", cert ? cert : "");
    char c[160], k[160];
    snprintf(c, sizeof c, "%s", f(certf));
    snprintf(k, sizeof k, "%s", f(keyf));
    pconn_tls_options_t o = {.ca_file = f("ca.pem")};
    if (cert != NULL) {
        o.cert_file = c;
        o.key_file = k;
    }
    return config(0, &o);
}

/* A free loopback port's address. */
static void free_address(char *address, size_t size)
{
    pconn_error_t err;
    int lfd = pconn_tcp_listen("127.0.0.1:0", 1, &err);
    CU_ASSERT_FATAL(lfd >= 0);
    pconn_tcp_local_address(lfd, address, size);
    close(lfd);
}

/* openssl s_server on address with the given certificate and extra arguments, ready
 * to accept. */
static void s_server_at(tproc_t *p, const char *address, const char *cert, const char *extra)
{
    (void)f("ca.pem"); /* the certificates exist */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "cd %s && exec openssl s_server -accept %s -cert %s.pem -key %s.key %s 2>&1",
             dir, address, cert, cert, extra);
    const char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    CU_ASSERT_EQUAL_FATAL(tproc_spawn(p, argv), 0);
    char line[256] = "";
    while (tproc_read_line(p, line, sizeof line) == 0 && strcmp(line, "ACCEPT") != 0)
        ;
    CU_ASSERT_STRING_EQUAL_FATAL(line, "ACCEPT");
}

/* The same on a free port, whose address goes to address. */
static void s_server(tproc_t *p, char *address, size_t size, const char *cert, const char *extra)
{
    free_address(address, size);
    s_server_at(p, address, cert, extra);
}

static int64_t no_delay(void *arg, unsigned failures)
{
    (void)arg, (void)failures;
    return 0;
}

static pconn_t *tls_pconn(pconn_tls_config_t *cfg, const char *address, recorder_t *rec,
                          int64_t connect_timeout_ms)
{
    const char *list[] = {address};
    pconn_options_t o = {.server_name = "tls", .resolver = pconn_resolver_static(list, 1),
                         .on_event = rec ? rec_on_event : NULL, .on_event_arg = rec,
                         .retry_delay = no_delay};
    pconn_tcp_options_t tcp = {.connect_timeout_ms = connect_timeout_ms};
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_tls_create(&o, &tcp, cfg, &pc), PCONN_OK);
    return pc;
}

/* The first attempt of a TLS pconn with cfg to address fails with code, and the
 * message names the address and has want in it. */
static void expect_failure(pconn_tls_config_t *cfg, const char *address, int code, const char *want)
{
    pconn_t *pc = tls_pconn(cfg, address, NULL, WAIT_MS);
    pconn_conn_t *conn = NULL;
    pconn_error_t err = {0};
    int rc = pconn_connected_or_failed(pc, WAIT_MS, &conn, &err);
    CU_ASSERT_EQUAL(rc, code);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, address));
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, want));
    if (strstr(err.message, want) == NULL || rc != code)
        fprintf(stderr, "\n  wanted %d \"%s\", got %d \"%s\"\n", code, want, rc, err.message);
    if (conn != NULL)
        pconn_conn_unref(conn);
    pconn_free(pc);
}

/* Reads until a newline or the end; the bytes read. */
static size_t read_line(pconn_conn_t *conn, char *buf, size_t size)
{
    size_t n = 0;
    while (n + 1 < size) {
        pconn_error_t err;
        ssize_t k = pconn_tcp_recv(conn, buf + n, 1, WAIT_MS, &err);
        if (k <= 0)
            break;
        n++;
        if (buf[n - 1] == '\n')
            break;
    }
    buf[n] = '\0';
    return n;
}

/* ---- configuration ------------------------------------------------------------- */

static void expect_config_error(const pconn_tls_options_t *o, int server, const char *want)
{
    pconn_tls_config_t *cfg = (pconn_tls_config_t *)&cfg;
    pconn_error_t err = {0};
    CU_ASSERT_EQUAL(pconn_tls_config_new(o, server, &cfg, &err), PCONN_EINVAL);
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, want));
    if (strstr(err.message, want) == NULL)
        fprintf(stderr, "\n  wanted \"%s\", got \"%s\"\n", want, err.message);
}

static void test_config_errors(void)
{
    pconn_tls_options_t o = {.ca_file = "/nonexistent/ca.pem"};
    expect_config_error(&o, 0, "tls: ca_file /nonexistent/ca.pem: No such file or directory");
    o = (pconn_tls_options_t){.cert_file = f("server.pem"), .key_file = f("client1.key")};
    expect_config_error(&o, 0, "does not match cert_file");
    o = (pconn_tls_options_t){.cert_file = f("ca.cnf"), .key_file = f("ca.key")};
    expect_config_error(&o, 1, "tls: cert_file");
    o = (pconn_tls_options_t){.ca_file = f("ca.pem")};
    expect_config_error(&o, 1, "a server needs cert_file and key_file");
    o = (pconn_tls_options_t){.min_version = 0x0302};
    expect_config_error(&o, 0, "min_version 0x302");
    o = (pconn_tls_options_t){.key_file = f("client1.key")};
    expect_config_error(&o, 0, "without cert_file");
    o = (pconn_tls_options_t){.cert_file = f("server.pem"), .key_file = f("server.key"),
                              .insecure_skip_verify = 1};
    expect_config_error(&o, 1, "insecure_skip_verify is for clients");
    CU_ASSERT_EQUAL(pconn_tls_config_new(NULL, 0, NULL, NULL), PCONN_EINVAL);
    /* A server configuration is no client's, and the other way round. */
    pconn_tls_config_t *srv = config(1, &(pconn_tls_options_t){.cert_file = f("server.pem"),
                                                               .key_file = f("server.key")});
    const char *list[] = {"127.0.0.1:1"};
    pconn_options_t po = {.resolver = pconn_resolver_static(list, 1)};
    pconn_t *pc = (pconn_t *)&pc;
    CU_ASSERT_EQUAL(pconn_tls_create(&po, NULL, srv, &pc), PCONN_EINVAL);
    CU_ASSERT_PTR_NULL(pc);
    pconn_rpc_options_t ro = {.base = {.resolver = pconn_resolver_static(list, 1)}, .tls = srv};
    CU_ASSERT_EQUAL(pconn_rpc_create(&ro, &pc), PCONN_EINVAL);
    pconn_tls_config_t *cli = client_config(NULL);
    pconn_rpc_server_t *rs = NULL;
    pconn_error_t err = {0};
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .tls = cli};
    CU_ASSERT_EQUAL(pconn_rpc_server_start(&so, &rs, &err), PCONN_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "a client configuration where a server's is needed"));
    /* An on_connect hook works on plaintext: refused with TLS. */
    pconn_tcp_options_t tcp = {.on_connect = (void *)abort};
    po.resolver = pconn_resolver_static(list, 1);
    CU_ASSERT_EQUAL(pconn_tls_create(&po, &tcp, cli, &pc), PCONN_EINVAL);
    /* tls and a transport of one's own: one or the other. */
    static const pconn_transport_t other = {0};
    ro = (pconn_rpc_options_t){.base = {.resolver = pconn_resolver_static(list, 1)}, .tls = cli,
                               .transport = &other};
    CU_ASSERT_EQUAL(pconn_rpc_create(&ro, &pc), PCONN_EINVAL);
    so = (pconn_rpc_server_options_t){.listen_address = "127.0.0.1:0", .tls = srv, .transport = &other};
    CU_ASSERT_EQUAL(pconn_rpc_server_start(&so, &rs, &err), PCONN_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "tls and transport both set"));
    /* The catalog and the announcer are clients: a server configuration is refused. */
    pconn_http_catalog_options_t co = {.url = "https://127.0.0.1:1", .tls = srv};
    errno = 0;
    CU_ASSERT_PTR_NULL(pconn_resolver_http_catalog(&co));
    CU_ASSERT_EQUAL(errno, EINVAL);
    pconn_announce_options_t ao = {.etcd_url = "https://127.0.0.1:1", .key = "/k", .address = "127.0.0.1:1",
                                   .tls = srv};
    pconn_announcer_t *an = NULL;
    CU_ASSERT_EQUAL(pconn_announce_start(&ao, &an, &err), PCONN_EINVAL);
    /* NULL is ignored by ref and unref. */
    pconn_tls_config_ref(NULL);
    pconn_tls_config_unref(NULL);
    pconn_tls_config_unref(cli);
    pconn_tls_config_unref(srv);
}

/* ---- TCP against openssl s_server ---------------------------------------------- */

static void test_s_server_interop(void)
{
    tproc_t p;
    char address[64];
    s_server(&p, address, sizeof address, "server", "-rev");
    pconn_tls_config_t *cfg = client_config(NULL);
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc = tls_pconn(cfg, address, &rec, WAIT_MS);
    pconn_tls_config_unref(cfg); /* the pconn holds its own */
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    CU_ASSERT(pconn_tls_is_tls(conn));
    CU_ASSERT_EQUAL(pconn_tcp_fd(conn), -1); /* no plaintext socket to misuse */
    CU_ASSERT_STRING_EQUAL(pconn_tls_peer_subject(conn), "CN=pconn-test-server");
    CU_ASSERT_EQUAL(pconn_tcp_send_all(conn, "hello\n", 6, NULL), PCONN_OK);
    char line[64];
    read_line(conn, line, sizeof line);
    CU_ASSERT_STRING_EQUAL(line, "olleh\n");
    /* A read with nothing to read keeps its deadline. */
    pconn_error_t err = {0};
    CU_ASSERT_EQUAL(pconn_tcp_recv(conn, line, sizeof line, 50, &err), -1);
    CU_ASSERT_EQUAL(err.code, PCONN_ETIMEDOUT);
    char letters[32];
    rec_letters(&rec, letters, sizeof letters);
    CU_ASSERT_STRING_EQUAL(letters, "AOC");
    pconn_conn_unref(conn);
    pconn_free(pc);
    rec_destroy(&rec);
    tproc_signal(&p, SIGKILL);
}

/* Each failure the header names, with its words. */
static void test_verification_failures(void)
{
    tproc_t p;
    char address[64];
    pconn_tls_config_t *cfg = client_config(NULL);

    s_server(&p, address, sizeof address, "stranger", "-rev");
    expect_failure(cfg, address, PCONN_EHANDSHAKE, "certificate verify failed: unknown CA");
    tproc_signal(&p, SIGKILL);

    s_server(&p, address, sizeof address, "expired", "-rev");
    expect_failure(cfg, address, PCONN_EHANDSHAKE, "certificate verify failed: certificate expired");
    tproc_signal(&p, SIGKILL);

    s_server(&p, address, sizeof address, "server", "-rev");
    pconn_tls_config_t *named = config(0, &(pconn_tls_options_t){.ca_file = f("ca.pem"),
                                                                 .server_name = "db.example"});
    expect_failure(named, address, PCONN_EHANDSHAKE,
                   "certificate verify failed: wrong host: the certificate is not for db.example");
    pconn_tls_config_unref(named);
    /* The system store does not know the test CA. */
    pconn_tls_config_t *sys = config(0, &(pconn_tls_options_t){0});
    expect_failure(sys, address, PCONN_EHANDSHAKE, "unknown CA");
    pconn_tls_config_unref(sys);
    tproc_signal(&p, SIGKILL);

    /* TLS 1.3 required, a server that speaks at most 1.2. */
    s_server(&p, address, sizeof address, "server", "-rev -tls1_2");
    pconn_tls_config_t *v13 = config(0, &(pconn_tls_options_t){.ca_file = f("ca.pem"),
                                                               .min_version = PCONN_TLS_1_3});
    expect_failure(v13, address, PCONN_EHANDSHAKE, "no TLS version both sides accept");
    pconn_tls_config_unref(v13);
    tproc_signal(&p, SIGKILL);

    /* A server that requires a client certificate; we have none. */
    char extra[256];
    snprintf(extra, sizeof extra, "-rev -Verify 1 -CAfile %s", f("ca.pem"));
    s_server(&p, address, sizeof address, "server", extra);
    expect_failure(cfg, address, PCONN_EHANDSHAKE, "no client certificate: the server requires one");
    tproc_signal(&p, SIGKILL);

    /* TLS to a plaintext server (a libpconn RPC server, which speaks first). */
    pconn_rpc_server_t *plain = NULL;
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0"};
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &plain, NULL), PCONN_OK);
    expect_failure(cfg, pconn_rpc_server_address(plain), PCONN_EHANDSHAKE,
                   "the peer does not speak TLS (a plaintext server?)");
    pconn_rpc_server_stop(plain);
    pconn_tls_config_unref(cfg);
}

/* Mutual TLS with s_server: our client certificate is accepted. */
static void test_client_certificate(void)
{
    tproc_t p;
    char address[64], extra[256];
    snprintf(extra, sizeof extra, "-rev -Verify 1 -CAfile %s -verify_return_error", f("ca.pem"));
    s_server(&p, address, sizeof address, "server", extra);
    pconn_tls_config_t *cfg = client_config("client1");
    pconn_t *pc = tls_pconn(cfg, address, NULL, WAIT_MS);
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(conn, "abc\n", 4, NULL), PCONN_OK);
    char line[64];
    read_line(conn, line, sizeof line);
    CU_ASSERT_STRING_EQUAL(line, "cba\n");
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_tls_config_unref(cfg);
    tproc_signal(&p, SIGKILL);

    /* A server that asks for a certificate but does not require one lets in a client
     * without: the attempt waits for its verdict (a session ticket) and connects. */
    snprintf(extra, sizeof extra, "-rev -verify 1 -CAfile %s", f("ca.pem"));
    s_server(&p, address, sizeof address, "server", extra);
    cfg = client_config(NULL);
    pc = tls_pconn(cfg, address, NULL, WAIT_MS);
    pconn_error_t err = {0};
    CU_ASSERT_EQUAL_FATAL(pconn_connected_or_failed(pc, WAIT_MS, &conn, &err), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(conn, "xy\n", 3, NULL), PCONN_OK);
    read_line(conn, line, sizeof line);
    CU_ASSERT_STRING_EQUAL(line, "yx\n");
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_tls_config_unref(cfg);
    tproc_signal(&p, SIGKILL);
}

/* A server that takes the TCP connection and never says a word: the handshake keeps to
 * the connect timeout, and pconn_close() cuts it short. */
static void test_handshake_deadline_and_close(void)
{
    pconn_error_t err = {0};
    int lfd = pconn_tcp_listen("127.0.0.1:0", 16, &err); /* never accepts: the backlog answers */
    CU_ASSERT_FATAL(lfd >= 0);
    char address[64];
    pconn_tcp_local_address(lfd, address, sizeof address);
    pconn_tls_config_t *cfg = client_config(NULL);

    pconn_t *pc = tls_pconn(cfg, address, NULL, 200);
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL(pconn_connected_or_failed(pc, WAIT_MS, &conn, &err), PCONN_ETIMEDOUT);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "handshake timed out (connect timeout 200 ms)"));
    pconn_free(pc);

    recorder_t rec;
    rec_init(&rec);
    pc = tls_pconn(cfg, address, &rec, 3600 * 1000); /* an hour: only close can end it */
    CU_ASSERT_FATAL(rec_wait_kind(&rec, PCONN_EVENT_OBTAINED_ADDRESS, 0, WAIT_MS) >= 0);
    CU_ASSERT_EQUAL(pconn_close(pc, WAIT_MS), PCONN_OK);
    pconn_free(pc);
    rec_destroy(&rec);
    pconn_tls_config_unref(cfg);
    close(lfd);
}

/* The second connection of a pconn resumes the first one's session, unless told not to. */
static void test_resumption(void)
{
    tproc_t p;
    char address[64];
    s_server(&p, address, sizeof address, "server", "-rev");
    for (int off = 0; off <= 1; off++) {
        pconn_tls_config_t *cfg = config(0, &(pconn_tls_options_t){.ca_file = f("ca.pem"),
                                                                   .no_session_resumption = off});
        recorder_t rec;
        rec_init(&rec);
        pconn_t *pc = tls_pconn(cfg, address, &rec, WAIT_MS);
        for (int i = 0; i < 2; i++) {
            CU_ASSERT_FATAL(rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, i, WAIT_MS) >= 0);
            pconn_conn_t *conn = NULL;
            CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
            CU_ASSERT_EQUAL(pconn_tls_resumed(conn), i == 1 && !off);
            /* A round trip: the server's session ticket is read with the answer. */
            CU_ASSERT_EQUAL(pconn_tcp_send_all(conn, "ping\n", 5, NULL), PCONN_OK);
            char line[64];
            read_line(conn, line, sizeof line);
            CU_ASSERT_STRING_EQUAL(line, "gnip\n");
            pconn_conn_close(conn); /* reconnects at once (no retry delay) */
            pconn_conn_unref(conn);
        }
        pconn_free(pc);
        rec_destroy(&rec);
        pconn_tls_config_unref(cfg);
    }
    /* A session is resumed only for the name it was verified for: a pconn whose
     * addresses alternate between 127.0.0.1 and localhost (both in the certificate)
     * makes a full, verified handshake each time. */
    struct addrinfo *ai = NULL;
    if (getaddrinfo("localhost", NULL, NULL, &ai) != 0) {
        fprintf(stderr, "(no localhost here: the two-name case is skipped) ");
    } else {
        freeaddrinfo(ai);
        char byname[80];
        snprintf(byname, sizeof byname, "localhost:%s", strrchr(address, ':') + 1);
        const char *list[] = {address, byname};
        pconn_tls_config_t *cfg = client_config(NULL);
        recorder_t rec;
        rec_init(&rec);
        pconn_options_t o = {.server_name = "tls", .resolver = pconn_resolver_static(list, 2),
                             .on_event = rec_on_event, .on_event_arg = &rec, .retry_delay = no_delay};
        pconn_t *pc = NULL;
        CU_ASSERT_EQUAL_FATAL(pconn_tls_create(&o, NULL, cfg, &pc), PCONN_OK);
        for (int i = 0; i < 4; i++) {
            int k = rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, i, WAIT_MS);
            CU_ASSERT_FATAL(k >= 0);
            pconn_conn_t *conn = NULL;
            CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
            CU_ASSERT_STRING_EQUAL(rec_get(&rec, k).address, list[i % 2]);
            CU_ASSERT_FALSE(pconn_tls_resumed(conn));
            CU_ASSERT_EQUAL(pconn_tcp_send_all(conn, "ab\n", 3, NULL), PCONN_OK);
            char line[16];
            read_line(conn, line, sizeof line);
            CU_ASSERT_STRING_EQUAL(line, "ba\n");
            pconn_conn_close(conn);
            pconn_conn_unref(conn);
        }
        pconn_free(pc);
        rec_destroy(&rec);
        pconn_tls_config_unref(cfg);
    }
    tproc_signal(&p, SIGKILL);
}

typedef struct reader_arg_t {
    pconn_conn_t *conn;
    ssize_t n;
    pconn_error_t err;
} reader_arg_t;

static void *blocked_reader(void *arg)
{
    reader_arg_t *r = arg;
    char buf[16];
    r->n = pconn_tcp_recv(r->conn, buf, sizeof buf, -1, &r->err);
    return NULL;
}

/* pconn_conn_close() wakes a reader blocked without a deadline, TLS and plain alike;
 * a plain read sees data, its deadline, and the end of the stream. */
static void test_recv_close_wakes(void)
{
    tproc_t p;
    char address[64];
    s_server(&p, address, sizeof address, "server", "-rev");
    pconn_tls_config_t *cfg = client_config(NULL);
    pconn_t *pc = tls_pconn(cfg, address, NULL, WAIT_MS);
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    reader_arg_t r = {.conn = conn};
    pthread_t t;
    CU_ASSERT_EQUAL_FATAL(pthread_create(&t, NULL, blocked_reader, &r), 0);
    pconn_conn_close(conn);
    pthread_join(t, NULL);
    CU_ASSERT_EQUAL(r.n, -1);
    CU_ASSERT_EQUAL(r.err.code, PCONN_ECLOSED);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(conn, "x", 1, &r.err), PCONN_ECLOSED);
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_tls_config_unref(cfg);
    tproc_signal(&p, SIGKILL);

    /* Plain TCP. */
    pconn_error_t err;
    int lfd = pconn_tcp_listen("127.0.0.1:0", 4, &err);
    pconn_tcp_local_address(lfd, address, sizeof address);
    const char *list[] = {address};
    pconn_options_t o = {.server_name = "plain", .resolver = pconn_resolver_static(list, 1)};
    CU_ASSERT_EQUAL_FATAL(pconn_tcp_create(&o, NULL, &pc), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    int sfd = accept(lfd, NULL, NULL);
    CU_ASSERT_EQUAL(write(sfd, "abc", 3), 3);
    char buf[16];
    CU_ASSERT_EQUAL(pconn_tcp_recv(conn, buf, sizeof buf, WAIT_MS, &err), 3);
    CU_ASSERT_EQUAL(memcmp(buf, "abc", 3), 0);
    CU_ASSERT_EQUAL(pconn_tcp_recv(conn, buf, sizeof buf, 30, &err), -1);
    CU_ASSERT_EQUAL(err.code, PCONN_ETIMEDOUT);
    CU_ASSERT_EQUAL(pconn_tcp_recv(conn, buf, 0, 30, &err), -1);
    CU_ASSERT_EQUAL(err.code, PCONN_EINVAL);
    /* The peer goes: the read sees the end of the stream, or, when the pconn's worker
     * noticed the hang-up first and closed the connection, PCONN_ECLOSED. */
    close(sfd);
    ssize_t n = pconn_tcp_recv(conn, buf, sizeof buf, WAIT_MS, &err);
    CU_ASSERT(n == 0 || (n == -1 && err.code == PCONN_ECLOSED));
    r = (reader_arg_t){.conn = conn};
    pconn_conn_close(conn);
    CU_ASSERT_EQUAL(pconn_tcp_recv(conn, buf, sizeof buf, WAIT_MS, &err), -1);
    CU_ASSERT_EQUAL(err.code, PCONN_ECLOSED);
    pconn_conn_unref(conn);
    pconn_free(pc);
    close(lfd);
}

/* samples/tls_client keeps its TLS connection across a server restart: each line of
 * its input (a FIFO this test writes) is answered, before and after. */
static void test_sample_across_restart(void)
{
    tproc_t server, client;
    char address[64], fifo[128], cmd[1024], line[256];
    s_server(&server, address, sizeof address, "server", "-rev");
    snprintf(fifo, sizeof fifo, "%s", f("requests.fifo"));
    CU_ASSERT_EQUAL_FATAL(mkfifo(fifo, 0600), 0);
    snprintf(cmd, sizeof cmd, "exec %s/samples/tls_client %s %s < %s 2>/dev/null", test_build_dir(),
             f("ca.pem"), address, fifo);
    const char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    CU_ASSERT_EQUAL_FATAL(tproc_spawn(&client, argv), 0);
    FILE *in = fopen(fifo, "we"); /* once the client has it open; close-on-exec: no server inherits it */
    CU_ASSERT_PTR_NOT_NULL_FATAL(in);
    fputs("abc\n", in);
    fflush(in);
    CU_ASSERT_EQUAL(tproc_read_line(&client, line, sizeof line), 0);
    CU_ASSERT_STRING_EQUAL(line, "cba");
    tproc_signal(&server, SIGKILL);
    s_server_at(&server, address, "server", "-rev");
    fputs("def\n", in);
    fflush(in);
    CU_ASSERT_EQUAL(tproc_read_line(&client, line, sizeof line), 0);
    CU_ASSERT_STRING_EQUAL(line, "fed");
    fclose(in); /* the end of its input: it exits */
    CU_ASSERT_EQUAL(tproc_wait(&client), 0);
    tproc_signal(&server, SIGKILL);
    unlink(fifo);
}

/* A read on a pconn's worker (here: pconn A's resolver reads a TLS connection of pconn
 * B) while A closes: it keeps its own deadline. It once took A's close for its own and
 * spun at 100% CPU without end (found by review). */
typedef struct worker_read_t {
    pconn_conn_t *conn;
    pthread_mutex_t m;
    pthread_cond_t c;
    int entered, done;
    ssize_t n;
    pconn_error_t err;
} worker_read_t;

static int reading_resolver(void *arg, char *address, size_t size, pconn_error_t *err)
{
    worker_read_t *w = arg;
    pthread_mutex_lock(&w->m);
    bool first = w->entered++ == 0;
    pthread_cond_broadcast(&w->c);
    pthread_mutex_unlock(&w->m);
    if (first) {
        char buf[16];
        ssize_t n = pconn_tcp_recv(w->conn, buf, sizeof buf, 300, &w->err);
        pthread_mutex_lock(&w->m);
        w->n = n;
        w->done = 1;
        pthread_mutex_unlock(&w->m);
    }
    pconn_error_set(err, PCONN_ERESOLVE, 0, "nothing to resolve");
    (void)address, (void)size;
    return PCONN_ERESOLVE;
}

static void test_read_on_closing_worker(void)
{
    tproc_t p;
    char address[64];
    s_server(&p, address, sizeof address, "server", "-rev");
    pconn_tls_config_t *cfg = client_config(NULL);
    pconn_t *b = tls_pconn(cfg, address, NULL, WAIT_MS);
    worker_read_t w = {.m = PTHREAD_MUTEX_INITIALIZER};
    test_cond_init(&w.c);
    CU_ASSERT_EQUAL_FATAL(pconn_connected(b, WAIT_MS, &w.conn), PCONN_OK);
    pconn_options_t o = {.server_name = "a", .resolver = pconn_resolver_new(reading_resolver, &w, NULL),
                         .connect = pconn_tcp_connect};
    pconn_t *a = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_create(&o, &a), PCONN_OK);
    CU_ASSERT_EQUAL(test_wait_count(&w.m, &w.c, &w.entered, 1, WAIT_MS), 1);
    CU_ASSERT_EQUAL(pconn_close(a, WAIT_MS), PCONN_OK); /* the read ends at its deadline */
    CU_ASSERT_EQUAL(w.done, 1);
    CU_ASSERT_EQUAL(w.n, -1);
    CU_ASSERT_EQUAL(w.err.code, PCONN_ETIMEDOUT);
    pconn_free(a);
    pconn_conn_unref(w.conn);
    pconn_free(b);
    pconn_tls_config_unref(cfg);
    pthread_cond_destroy(&w.c);
    tproc_signal(&p, SIGKILL);
}

/* Two threads send 1.6 MB buffers of one letter each (400 lines of 4,000) while a third
 * reads the echo: every line comes back of one letter, so each buffer went out whole
 * (records of the two never interleave), and reading and writing ran at once. */
typedef struct sender_t {
    pconn_conn_t *conn;
    char letter;
    int rc;
} sender_t;

enum { LINE = 4000, LINES = 400, SENDS = 3 }; /* 1.6 MB a buffer: more than the socket holds */

static void *send_letters(void *arg)
{
    sender_t *s = arg;
    char *buf = malloc(LINES * (LINE + 1));
    size_t size = LINES * (LINE + 1);
    if (buf == NULL) {
        s->rc = PCONN_ENOMEM;
        return NULL;
    }
    for (int i = 0; i < LINES; i++) {
        memset(buf + i * (LINE + 1), s->letter, LINE);
        buf[i * (LINE + 1) + LINE] = '\n';
    }
    for (int k = 0; k < SENDS && s->rc == PCONN_OK; k++)
        s->rc = pconn_tcp_send_all(s->conn, buf, size, NULL);
    free(buf);
    return NULL;
}

static void test_concurrent_sends_whole(void)
{
    tproc_t p;
    char address[64];
    s_server(&p, address, sizeof address, "server", "-rev");
    pconn_tls_config_t *cfg = client_config(NULL);
    pconn_t *pc = tls_pconn(cfg, address, NULL, WAIT_MS);
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    sender_t s[2] = {{conn, 'a', PCONN_OK}, {conn, 'b', PCONN_OK}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        CU_ASSERT_EQUAL_FATAL(pthread_create(&t[i], NULL, send_letters, &s[i]), 0);
    static char line[LINE + 2];
    int lines = 0, mixed = 0;
    while (lines < 2 * SENDS * LINES) {
        size_t n = read_line(conn, line, sizeof line);
        if (n != LINE + 1)
            break;
        for (int i = 1; i < LINE; i++)
            mixed += line[i] != line[0];
        lines++;
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        CU_ASSERT_EQUAL(s[i].rc, PCONN_OK);
    }
    CU_ASSERT_EQUAL(lines, 2 * SENDS * LINES);
    CU_ASSERT_EQUAL(mixed, 0);
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_tls_config_unref(cfg);
    tproc_signal(&p, SIGKILL);
}

/* A TLS connection inherited by a child of fork() is dead there, at once and without a
 * lock; the child leaves the parent's session alone, which keeps working. */
static void test_fork_child(void)
{
    tproc_t p;
    char address[64];
    s_server(&p, address, sizeof address, "server", "-rev");
    pconn_tls_config_t *cfg = client_config(NULL);
    pconn_t *pc = tls_pconn(cfg, address, NULL, WAIT_MS);
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    pid_t child = fork();
    if (child == 0) {
        char buf[8];
        pconn_error_t err;
        int bad = 0;
        bad |= pconn_tcp_recv(conn, buf, sizeof buf, 1000, &err) != -1 || err.code != PCONN_ECLOSED;
        bad |= pconn_tcp_send_all(conn, "x\n", 2, &err) != PCONN_ECLOSED;
        bad |= pconn_tls_resumed(conn);
        pconn_conn_unref(conn); /* memory only: the parent's socket stays open */
        _exit(bad);
    }
    CU_ASSERT_FATAL(child > 0);
    int status = -1;
    CU_ASSERT_EQUAL(waitpid(child, &status, 0), child);
    CU_ASSERT(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(conn, "after\n", 6, NULL), PCONN_OK);
    char line[16];
    read_line(conn, line, sizeof line);
    CU_ASSERT_STRING_EQUAL(line, "retfa\n");
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_tls_config_unref(cfg);
    tproc_signal(&p, SIGKILL);
}

/* ---- RPC over TLS --------------------------------------------------------------- */

/* Answers with the caller's verified subject, its names and its address. */
static int whoami(void *arg, const void *req, size_t req_len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)req, (void)req_len, (void)err;
    const pconn_rpc_peer_t *peer = pconn_rpc_handler_peer();
    char out[512];
    int n = snprintf(out, sizeof out, "%s|", peer->subject ? peer->subject : "(none)");
    for (const char *const *s = peer->sans; s != NULL && *s != NULL; s++)
        n += snprintf(out + n, sizeof out - (size_t)n, "%s%s", s == peer->sans ? "" : ",", *s);
    n += snprintf(out + n, sizeof out - (size_t)n, "|%.10s", peer->address);
    return pconn_buf_append(resp, out, (size_t)n);
}

/* Lets in every peer but client2. */
static int only_friends(const pconn_rpc_peer_t *peer, void *arg, pconn_error_t *why)
{
    (void)arg;
    if (peer->subject != NULL && strcmp(peer->subject, "CN=client2") == 0) {
        pconn_error_set(why, PCONN_EINVAL, 0, "client2 is not on the list");
        return PCONN_EINVAL;
    }
    return PCONN_OK;
}

typedef struct log_t {
    pthread_mutex_t m;
    pthread_cond_t c;
    int n;
    char last[512];
} log_t;

static void on_log(int level, const char *message, void *arg)
{
    (void)level;
    log_t *l = arg;
    pthread_mutex_lock(&l->m);
    if (strstr(message, "plaintext peer") != NULL) {
        snprintf(l->last, sizeof l->last, "%s", message);
        l->n++;
        pthread_cond_broadcast(&l->c);
    }
    pthread_mutex_unlock(&l->m);
}

static pconn_rpc_server_t *tls_server(int mutual, log_t *log)
{
    pconn_tls_options_t to = {.cert_file = f("server.pem"), .key_file = f("server.key")};
    if (mutual)
        to.ca_file = f("ca.pem");
    pconn_tls_config_t *cfg = config(1, &to);
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    pconn_rpc_impls_add(impls, "whoami", 1, whoami, NULL);
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .tls = cfg, .authorize = only_friends,
                                     .handshake_timeout_ms = 2000,
                                     .on_log = log ? on_log : NULL, .on_log_arg = log};
    pconn_rpc_server_t *srv = NULL;
    pconn_error_t err = {0};
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, &err), PCONN_OK);
    pconn_rpc_impls_free(impls);
    pconn_tls_config_unref(cfg);
    return srv;
}

static pconn_t *rpc_client(const char *address, pconn_tls_config_t *cfg)
{
    const char *list[] = {address};
    pconn_rpc_options_t o = {.base = {.server_name = "rpc", .resolver = pconn_resolver_static(list, 1),
                                      .retry_delay = no_delay},
                             .tls = cfg, .handshake_timeout_ms = WAIT_MS};
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    return pc;
}

static void rpc_expect_failure(const char *address, pconn_tls_config_t *cfg, const char *want)
{
    pconn_t *pc = rpc_client(address, cfg);
    pconn_conn_t *conn = NULL;
    pconn_error_t err = {0};
    CU_ASSERT_EQUAL(pconn_connected_or_failed(pc, WAIT_MS, &conn, &err), PCONN_EHANDSHAKE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, want));
    if (strstr(err.message, want) == NULL)
        fprintf(stderr, "\n  wanted \"%s\", got \"%s\"\n", want, err.message);
    if (conn != NULL)
        pconn_conn_unref(conn);
    pconn_free(pc);
}

static void test_rpc_mutual_tls(void)
{
    pconn_rpc_server_t *srv = tls_server(1, NULL);
    const char *address = pconn_rpc_server_address(srv);
    pconn_tls_config_t *c1 = client_config("client1");
    pconn_t *pc = rpc_client(address, c1);
    pconn_buf_t resp = {0};
    pconn_error_t err = {0};
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_dispatch(pc, "whoami", 1, "", 0, &resp, WAIT_MS, &err), PCONN_OK);
    CU_ASSERT_EQUAL(resp.len, strlen("CN=client1|DNS:client1.example,URI:spiffe://test/client1|127.0.0.1:"));
    CU_ASSERT_EQUAL(memcmp(resp.data, "CN=client1|DNS:client1.example,URI:spiffe://test/client1|127.0.0.1:",
                           resp.len), 0);
    pconn_buf_free(&resp);
    /* Many calls from several threads at once share one TLS session safely. */
    pconn_rpc_call_t calls[64];
    for (int i = 0; i < 64; i++)
        calls[i] = (pconn_rpc_call_t){.name = "whoami", .version = 1};
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_call_many(conn, calls, 64, WAIT_MS), PCONN_OK);
    for (int i = 0; i < 64; i++)
        pconn_buf_free(&calls[i].resp);
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_tls_config_unref(c1);

    pconn_tls_config_t *c2 = client_config("client2");
    rpc_expect_failure(address, c2, "refused by the peer: not authorized: client2 is not on the list");
    pconn_tls_config_unref(c2);
    pconn_tls_config_t *none = client_config(NULL);
    rpc_expect_failure(address, none, "no client certificate: the server requires one");
    pconn_tls_config_unref(none);
    pconn_tls_config_t *stranger = client_config("stranger");
    rpc_expect_failure(address, stranger, "the peer rejected our certificate: unknown CA");
    pconn_tls_config_unref(stranger);
    pconn_rpc_server_stop(srv);
}

/* RPC connections end without close_notify (shutdown(2), a dead peer): the next one
 * still resumes the session; the client sees the server's verified subject. */
static void test_rpc_resumption(void)
{
    pconn_rpc_server_t *srv = tls_server(0, NULL);
    const char *address = pconn_rpc_server_address(srv);
    pconn_tls_config_t *cfg = client_config(NULL);
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_options_t o = {.base = {.server_name = "rpc", .resolver = pconn_resolver_static(&address, 1),
                                      .retry_delay = no_delay, .on_event = rec_on_event,
                                      .on_event_arg = &rec},
                             .tls = cfg, .handshake_timeout_ms = WAIT_MS};
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    for (int i = 0; i < 3; i++) {
        CU_ASSERT_FATAL(rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, i, WAIT_MS) >= 0);
        pconn_conn_t *conn = NULL;
        CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
        CU_ASSERT_EQUAL(pconn_tls_resumed(conn), i > 0);
        CU_ASSERT_STRING_EQUAL(pconn_tls_peer_subject(conn), "CN=pconn-test-server");
        pconn_buf_t resp = {0};
        CU_ASSERT_EQUAL(pconn_rpc_call(conn, "whoami", 1, "", 0, &resp, WAIT_MS, NULL), PCONN_OK);
        pconn_buf_free(&resp);
        pconn_conn_close(conn); /* shutdown(2): no close_notify */
        pconn_conn_unref(conn);
    }
    pconn_free(pc);
    rec_destroy(&rec);
    pconn_tls_config_unref(cfg);
    pconn_rpc_server_stop(srv);
}

/* Plaintext on one side, TLS on the other: both sides say so. */
static void test_rpc_plaintext_mismatch(void)
{
    log_t log = {.m = PTHREAD_MUTEX_INITIALIZER};
    test_cond_init(&log.c);
    pconn_rpc_server_t *srv = tls_server(0, &log);
    rpc_expect_failure(pconn_rpc_server_address(srv), NULL, "handshake: refused by the peer: this server requires TLS");
    CU_ASSERT(test_wait_count(&log.m, &log.c, &log.n, 1, WAIT_MS) >= 1); /* retries add more */
    char last[sizeof log.last];
    pthread_mutex_lock(&log.m); /* retries go on logging meanwhile */
    memcpy(last, log.last, sizeof last);
    pthread_mutex_unlock(&log.m);
    CU_ASSERT_PTR_NOT_NULL(strstr(last, "plaintext peer: it does not speak TLS"));
    /* Without a client certificate the server's subject stays unknown to handlers. */
    pconn_tls_config_t *cfg = client_config(NULL);
    pconn_t *pc = rpc_client(pconn_rpc_server_address(srv), cfg);
    pconn_buf_t resp = {0};
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "whoami", 1, "", 0, &resp, WAIT_MS, NULL), PCONN_OK);
    CU_ASSERT(resp.len > 7 && memcmp(resp.data, "(none)|", 7) == 0);
    pconn_buf_free(&resp);
    pconn_free(pc);
    pconn_rpc_server_stop(srv);

    pconn_rpc_server_t *plain = NULL;
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0"};
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &plain, NULL), PCONN_OK);
    rpc_expect_failure(pconn_rpc_server_address(plain), cfg, "the peer does not speak TLS (a plaintext server?)");
    pconn_rpc_server_stop(plain);
    pconn_tls_config_unref(cfg);
    pthread_cond_destroy(&log.c);
}

/* openssl s_client verifies our server's certificate and reads its HELLO (magic PCN1). */
static void test_s_client_interop(void)
{
    pconn_rpc_server_t *srv = tls_server(0, NULL);
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "openssl s_client -connect %s -CAfile %s -verify_return_error -verify_ip 127.0.0.1 -quiet "
             "</dev/null 2>&1 | tr -c 'A-Z0-9\\n' '\\n'",
             pconn_rpc_server_address(srv), f("ca.pem"));
    const char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    tproc_t p;
    CU_ASSERT_EQUAL_FATAL(tproc_spawn(&p, argv), 0);
    char line[256] = "";
    while (tproc_read_line(&p, line, sizeof line) == 0 && strcmp(line, "PCN1") != 0)
        ;
    CU_ASSERT_STRING_EQUAL(line, "PCN1");
    pconn_rpc_server_stop(srv); /* s_client sees the end and exits */
    CU_ASSERT_EQUAL(tproc_wait(&p), 0);
}

/* etcd serving clients over TLS only, with --client-cert-auth: the announcer and the
 * catalog (a request per lookup, and the watch) get in with a client certificate from
 * the same configuration; without one they are refused, and say so. */
static void test_etcd_mutual_tls(void)
{
    tetcd_t e;
    (void)f("ca.pem");
    CU_ASSERT_EQUAL_FATAL(tetcd_start_tls(&e, dir), 0);
    pconn_tls_config_t *c1 = client_config("client1");
    pconn_tls_config_t *none = client_config(NULL);
    pconn_announce_options_t ao = {.etcd_url = e.url, .key = "/services/tls/7001",
                                   .address = "127.0.0.1:7001", .tls = c1};
    pconn_announcer_t *a = NULL;
    pconn_error_t err = {0};
    CU_ASSERT_EQUAL_FATAL(pconn_announce_start(&ao, &a, &err), PCONN_OK);
    pconn_tls_config_unref(c1); /* the announcer and resolvers hold their own */
    for (int watch = 0; watch <= 1; watch++) {
        pconn_http_catalog_options_t co = {.url = e.url, .format = PCONN_CATALOG_ETCD,
                                           .key = "/services/tls/", .tls = c1, .watch = watch,
                                           .timeout_ms = WAIT_MS};
        pconn_resolver_t *r = pconn_resolver_http_catalog(&co);
        CU_ASSERT_PTR_NOT_NULL_FATAL(r);
        char got[PCONN_ADDRESS_MAX] = "";
        CU_ASSERT_EQUAL(pconn_resolve(r, got, sizeof got, &err), PCONN_OK);
        CU_ASSERT_STRING_EQUAL(got, "127.0.0.1:7001");
        pconn_resolver_free(r);
    }
    /* No client certificate: etcd refuses the handshake. */
    pconn_http_catalog_options_t co = {.url = e.url, .format = PCONN_CATALOG_ETCD,
                                       .key = "/services/tls/", .tls = none, .timeout_ms = WAIT_MS};
    pconn_resolver_t *r = pconn_resolver_http_catalog(&co);
    char got[PCONN_ADDRESS_MAX];
    CU_ASSERT_EQUAL(pconn_resolve(r, got, sizeof got, &err), PCONN_ERESOLVE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, e.url));
    /* etcd's alert, or (when the request was on its way as etcd closed) a reset: both
     * name the missing client certificate. */
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "client certificate"));
    pconn_resolver_free(r);
    pconn_announcer_t *b = NULL;
    ao.tls = none;
    ao.key = "/services/tls/7002";
    CU_ASSERT_EQUAL(pconn_announce_start(&ao, &b, &err), PCONN_ECONNECT);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "client certificate"));
    if (strstr(err.message, "client certificate") == NULL)
        fprintf(stderr, "\n  got \"%s\"\n", err.message);
    pconn_announce_stop(a);
    pconn_tls_config_unref(none);
    tetcd_stop(&e);
}

static const test_def_t tests[] = {
    {"config_errors", test_config_errors},
    {"s_server_interop", test_s_server_interop},
    {"verification_failures", test_verification_failures},
    {"client_certificate", test_client_certificate},
    {"handshake_deadline_and_close", test_handshake_deadline_and_close},
    {"resumption", test_resumption},
    {"recv_close_wakes", test_recv_close_wakes},
    {"sample_across_restart", test_sample_across_restart},
    {"read_on_closing_worker", test_read_on_closing_worker},
    {"concurrent_sends_whole", test_concurrent_sends_whole},
    {"fork_child", test_fork_child},
    {"rpc_mutual_tls", test_rpc_mutual_tls},
    {"rpc_resumption", test_rpc_resumption},
    {"rpc_plaintext_mismatch", test_rpc_plaintext_mismatch},
    {"s_client_interop", test_s_client_interop},
    {"etcd_mutual_tls", test_etcd_mutual_tls},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    return run_suite("tls", tests, argc, argv);
}
