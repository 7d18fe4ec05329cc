/* test_rpc.c - RPC connections against real servers on loopback: in this process, and
 * as separate processes (`pconn rpc-serve`) that are killed or stopped; and peers that
 * break the protocol, written byte by byte. */
#include "common.h"
#include "common_server.h"
#include "pconn_rpc.h"
#include "pconn_tcp.h"

#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#define LIMIT (2 * 1024 * 1024)

/* ---- handlers ------------------------------------------------------------------- */

static int h_echo(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    return pconn_buf_append(resp, req, len);
}

static int h_fail(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)req, (void)len, (void)resp;
    pconn_error_set(err, PCONN_EINVAL, 0, "account %.*s is locked", (int)len, (const char *)req);
    return PCONN_EINVAL;
}

/* Answers with n bytes, n given as the request's decimal text. */
static int h_bytes(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    char text[32] = "";
    memcpy(text, req, len < 31 ? len : 31);
    size_t n = strtoul(text, NULL, 10);
    resp->data = calloc(1, n ? n : 1);
    resp->len = resp->cap = n;
    return resp->data ? PCONN_OK : PCONN_ENOMEM;
}

/* Blocks until the gate opens: a slow handler. */
typedef struct gate_t {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    bool open;
    int inside;
} gate_t;
static gate_t gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, 0};

static int h_slow(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    pthread_mutex_lock(&gate.mutex);
    gate.inside++;
    pthread_cond_broadcast(&gate.cond);
    while (!gate.open)
        pthread_cond_wait(&gate.cond, &gate.mutex);
    pthread_mutex_unlock(&gate.mutex);
    return pconn_buf_append(resp, req, len);
}

static void gate_set(bool open)
{
    pthread_mutex_lock(&gate.mutex);
    gate.open = open;
    if (!open)
        gate.inside = 0;
    pthread_cond_broadcast(&gate.cond);
    pthread_mutex_unlock(&gate.mutex);
}

static void gate_wait_inside(int n)
{
    pthread_mutex_lock(&gate.mutex);
    while (gate.inside < n)
        pthread_cond_wait(&gate.cond, &gate.mutex);
    pthread_mutex_unlock(&gate.mutex);
}

/* The server's handler that calls the client back over the same connection. */
static int h_ask_back(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg;
    pconn_conn_t *conn = pconn_rpc_handler_conn();
    if (conn == NULL)
        return PCONN_EINVAL;
    pconn_buf_t answer;
    int rc = pconn_rpc_call(conn, "client.hello", 1, req, len, &answer, WAIT_MS, err);
    if (rc != PCONN_OK)
        return rc;
    rc = pconn_buf_append(resp, "client said: ", 13);
    if (rc == PCONN_OK)
        rc = pconn_buf_append(resp, answer.data, answer.len);
    pconn_buf_free(&answer);
    return rc;
}

static int h_client_hello(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    int rc = pconn_buf_append(resp, "hello ", 6);
    return rc == PCONN_OK ? pconn_buf_append(resp, req, len) : rc;
}

/* The peer's address as the server sees it. */
static int h_whoami(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)req, (void)len, (void)err;
    const char *a = pconn_conn_address(pconn_rpc_handler_conn());
    return pconn_buf_append(resp, a, strlen(a));
}

/* The thread a handler runs on, as its answer. */
static int h_where(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)req, (void)len, (void)err;
    pthread_t self = pthread_self();
    return pconn_buf_append(resp, &self, sizeof self);
}

/* A handler with a megabyte on its stack: handlers run on threads of the default stack
 * size wherever they run. */
static int h_deep(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)req, (void)len, (void)err;
    volatile char big[1 << 20];
    for (size_t i = 0; i < sizeof big; i += 4096)
        big[i] = (char)i;
    char last = big[sizeof big - 4096];
    return pconn_buf_append(resp, &last, 1);
}

static pconn_rpc_impls_t *server_impls(void)
{
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "echo", 1, h_echo, NULL), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "fail", 1, h_fail, NULL), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "bytes", 1, h_bytes, NULL), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "slow", 1, h_slow, NULL), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "ask_back", 1, h_ask_back, NULL), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "whoami", 1, h_whoami, NULL), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "where", 1, h_where, NULL), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "deep", 1, h_deep, NULL), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add_blocking(impls, "where", 2, h_where, NULL), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add_blocking(impls, "where", 2, h_where, NULL), PCONN_EINVAL);
    /* The same pair twice, and bad names, are refused. */
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "echo", 1, h_echo, NULL), PCONN_EINVAL);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "", 1, h_echo, NULL), PCONN_EINVAL);
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "x", 1, NULL, NULL), PCONN_EINVAL);
    return impls;
}

/* ---- fixtures ------------------------------------------------------------------- */

typedef struct fixture_t {
    pconn_rpc_impls_t *impls;
    pconn_rpc_server_t *srv;
    recorder_t rec;
    pconn_t *pc;
    pconn_conn_t *conn;
} fixture_t;

static pconn_rpc_server_t *server(pconn_rpc_impls_t *impls, size_t max)
{
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .max_message_size = max};
    pconn_rpc_server_t *srv = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_server_start(&so, &srv, &err), PCONN_OK);
    return srv;
}

static int64_t quick_retry(void *arg, unsigned failures)
{
    (void)arg, (void)failures;
    return 50;
}

static pconn_rpc_options_t client_options(recorder_t *rec, const char *const *addresses, size_t n)
{
    pconn_rpc_options_t o = {
        .base = {.server_name = "rpc",
                 .resolver = pconn_resolver_static(addresses, n),
                 .on_event = rec_on_event,
                 .on_event_arg = rec,
                 .retry_delay = quick_retry},
        .max_message_size = LIMIT,
    };
    return o;
}

/* A pconn of o (*pc) and its first connection: one reference, the caller's. */
static pconn_conn_t *connected_client(const pconn_rpc_options_t *o, pconn_t **pc)
{
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(o, pc), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(pconn_connected(*pc, WAIT_MS, &conn), PCONN_OK);
    return conn;
}

static void setup(fixture_t *f)
{
    memset(f, 0, sizeof *f);
    rec_init(&f->rec);
    f->impls = server_impls();
    f->srv = server(f->impls, LIMIT);
    CU_ASSERT_PTR_NOT_NULL_FATAL(f->srv);
    const char *address = pconn_rpc_server_address(f->srv);
    pconn_rpc_options_t o = client_options(&f->rec, &address, 1);
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &f->pc), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(pconn_connected(f->pc, WAIT_MS, &f->conn), PCONN_OK);
}

static void teardown(fixture_t *f)
{
    pconn_conn_unref(f->conn);
    pconn_free(f->pc);
    pconn_rpc_server_stop(f->srv);
    pconn_rpc_impls_free(f->impls);
    rec_destroy(&f->rec);
}

/* ---- calls ---------------------------------------------------------------------- */

static void test_echo_sizes(void)
{
    fixture_t f;
    setup(&f);
    const size_t sizes[] = {0, 1, 1024 * 1024};
    for (size_t k = 0; k < 3; k++) {
        size_t n = sizes[k];
        unsigned char *req = malloc(n + 1);
        for (size_t i = 0; i < n; i++)
            req[i] = (unsigned char)(i * 7 + k);
        pconn_buf_t resp;
        pconn_error_t err;
        CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "echo", 1, req, n, &resp, WAIT_MS, &err), PCONN_OK);
        CU_ASSERT_EQUAL(resp.len, n);
        CU_ASSERT(n == 0 || memcmp(resp.data, req, n) == 0);
        pconn_buf_free(&resp);
        free(req);
    }
    teardown(&f);
}

static void test_over_the_limit(void)
{
    fixture_t f;
    setup(&f);
    /* A request just over the limit is refused here, before anything is sent. */
    size_t n = LIMIT - 1 - (8 + 4 + 2 + 4) + 1; /* payload = LIMIT + 1 */
    char *req = calloc(1, n);
    pconn_buf_t resp;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "echo", 1, req, n, &resp, WAIT_MS, &err), PCONN_ETOOBIG);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "over the limit of 2097152 bytes"));
    /* Exactly at the limit passes. */
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "echo", 1, req, n - 1 - 13, &resp, WAIT_MS, &err), PCONN_OK);
    pconn_buf_free(&resp);
    free(req);
    CU_ASSERT_FALSE(pconn_conn_is_closed(f.conn)); /* nothing went over the wire */

    /* A response over the server's own limit: an error answer, the connection stays. */
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "bytes", 1, "3000000", 7, &resp, WAIT_MS, &err), PCONN_ETOOBIG);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "response of 3000000 bytes over the limit"));
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "echo", 1, "ok", 2, &resp, WAIT_MS, &err), PCONN_OK);
    pconn_buf_free(&resp);
    teardown(&f);
}

static void test_response_over_client_limit(void)
{
    /* The server allows 8 MiB, the client 2 MiB: the client refuses a 3 MB answer and
     * closes the connection that sent it; the pconn connects again. */
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_t *srv = server(impls, 8 * 1024 * 1024);
    const char *address = pconn_rpc_server_address(srv);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    pconn_t *pc = NULL;
    pconn_conn_t *conn = connected_client(&o, &pc);
    pconn_buf_t resp;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "bytes", 1, "3000000", 7, &resp, WAIT_MS, &err), PCONN_ETOOBIG);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "frame of 3000013 bytes over the limit of 2097152 bytes"));
    CU_ASSERT_EQUAL(pconn_conn_wait_closed(conn, WAIT_MS), PCONN_OK);
    pconn_conn_unref(conn);
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 1, WAIT_MS), -1);
    pconn_free(pc);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
    rec_destroy(&rec);
}

/* A limit below 512 is raised to 512: a long name cannot wrap the size check around. */
static void test_tiny_limit(void)
{
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_t *srv = server(impls, 0);
    const char *address = pconn_rpc_server_address(srv);
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    o.max_message_size = 10;
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    char name[256];
    memset(name, 'n', 255);
    name[255] = '\0';
    char req[300] = {0};
    pconn_buf_t resp;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, name, 1, req, sizeof req, &resp, WAIT_MS, &err), PCONN_ETOOBIG);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "over the limit of 512 bytes"));
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, name, 1, req, 200, &resp, WAIT_MS, &err), PCONN_EUNIMPLEMENTED);
    pconn_free(pc);
    rec_destroy(&rec);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
}

static void test_unimplemented_and_remote_error(void)
{
    fixture_t f;
    setup(&f);
    pconn_buf_t resp;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "nope", 1, "x", 1, &resp, WAIT_MS, &err), PCONN_EUNIMPLEMENTED);
    CU_ASSERT_STRING_EQUAL(err.message, "no implementation of nope version 1");
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "echo", 2, "x", 1, &resp, WAIT_MS, &err), PCONN_EUNIMPLEMENTED);
    CU_ASSERT_STRING_EQUAL(err.message, "no implementation of echo version 2");
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "fail", 1, "alice", 5, &resp, WAIT_MS, &err), PCONN_EREMOTE);
    CU_ASSERT_STRING_EQUAL(err.message, "account alice is locked");
    CU_ASSERT_EQUAL(err.code, PCONN_EREMOTE);
    CU_ASSERT_PTR_NULL(resp.data);
    /* Bad arguments. */
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "", 1, NULL, 0, &resp, WAIT_MS, &err), PCONN_EINVAL);
    CU_ASSERT_EQUAL(pconn_rpc_call(NULL, "echo", 1, NULL, 0, &resp, WAIT_MS, &err), PCONN_EINVAL);
    atomic_int destroyed = 0;
    pconn_conn_t *other = fdless_conn_new(&destroyed);
    CU_ASSERT_EQUAL(pconn_rpc_call(other, "echo", 1, NULL, 0, &resp, WAIT_MS, &err), PCONN_EINVAL);
    pconn_conn_unref(other);
    teardown(&f);
}

typedef struct caller_t {
    pthread_t thread;
    pconn_conn_t *conn;
    int index, ok;
} caller_t;

static void *caller_main(void *arg)
{
    caller_t *c = arg;
    for (int i = 0; i < 200; i++) {
        char req[64];
        int n = snprintf(req, sizeof req, "thread %d call %d", c->index, i);
        pconn_buf_t resp;
        if (pconn_rpc_call(c->conn, "echo", 1, req, (size_t)n, &resp, WAIT_MS, NULL) == PCONN_OK &&
            resp.len == (size_t)n && memcmp(resp.data, req, (size_t)n) == 0)
            c->ok++;
        pconn_buf_free(&resp);
    }
    return NULL;
}

static void test_many_threads_one_connection(void)
{
    fixture_t f;
    setup(&f);
    caller_t c[16];
    for (int i = 0; i < 16; i++) {
        c[i] = (caller_t){.conn = f.conn, .index = i};
        pthread_create(&c[i].thread, NULL, caller_main, &c[i]);
    }
    for (int i = 0; i < 16; i++) {
        pthread_join(c[i].thread, NULL);
        CU_ASSERT_EQUAL(c[i].ok, 200); /* every answer matched to its own call */
    }
    /* Writes combined: 3,200 requests, 16 callers at once, in fewer system calls. */
    char *stats = pconn_stats_json(f.pc);
    json_t *o = stats != NULL ? json_loads(stats, 0, NULL) : NULL;
    json_t *rpc = json_object_get(o, "rpc");
    json_int_t calls = json_integer_value(json_object_get(rpc, "calls"));
    json_int_t writes = json_integer_value(json_object_get(rpc, "writes"));
    CU_ASSERT_EQUAL(calls, 3200);
    CU_ASSERT(writes > 0 && writes < calls);
    json_decref(o);
    free(stats);
    teardown(&f);
}

/* A call made on a thread of its own. */
typedef struct slow_call_t {
    pthread_t thread;
    pconn_conn_t *conn;
    int rc;
    pconn_error_t err;
    int64_t took_ms;
} slow_call_t;

static void *slow_main(void *arg)
{
    slow_call_t *s = arg;
    pconn_buf_t resp;
    s->rc = pconn_rpc_call(s->conn, "slow", 1, "s", 1, &resp, WAIT_MS, &s->err);
    pconn_buf_free(&resp);
    return NULL;
}

static void *echo_hi_main(void *arg)
{
    slow_call_t *s = arg;
    pconn_buf_t resp;
    s->rc = pconn_rpc_call(s->conn, "echo", 1, "hi", 2, &resp, WAIT_MS, &s->err);
    if (s->rc == PCONN_OK && (resp.len != 2 || memcmp(resp.data, "hi", 2) != 0))
        s->rc = -1;
    pconn_buf_free(&resp);
    return NULL;
}

static void test_slow_handler_blocks_nobody(void)
{
    fixture_t f;
    setup(&f);
    gate_set(false);
    slow_call_t s = {.conn = f.conn};
    pthread_create(&s.thread, NULL, slow_main, &s);
    gate_wait_inside(1);
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "echo", 1, "fast", 4, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_buf_free(&resp);
    gate_set(true);
    pthread_join(s.thread, NULL);
    CU_ASSERT_EQUAL(s.rc, PCONN_OK);
    teardown(&f);
}

/* A handler that holds the server's reading thread hands the reading on (design of
 * issue 9): the heartbeats go on, so a client whose heartbeat timeout is a few times
 * shorter than the handler's wait keeps its connection, and other calls are answered. */
static void test_slow_handler_keeps_heartbeats(void)
{
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_impls_t *impls = server_impls();
    pconn_heartbeat_t hb = {.timeout_ms = 200, .send_every_ms = 40};
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .heartbeat = hb};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    o.heartbeat = hb;
    pconn_t *pc = NULL;
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    gate_set(false);
    slow_call_t s = {.conn = conn};
    pthread_create(&s.thread, NULL, slow_main, &s);
    gate_wait_inside(1);
    /* Five heartbeat timeouts with the handler inside: the connection stays. */
    CU_ASSERT_EQUAL(pconn_conn_wait_closed(conn, 5 * hb.timeout_ms), PCONN_ETIMEDOUT);
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "echo", 1, "fast", 4, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_buf_free(&resp);
    gate_set(true);
    pthread_join(s.thread, NULL);
    CU_ASSERT_EQUAL(s.rc, PCONN_OK);
    CU_ASSERT_EQUAL(rec_wait_kind(&rec, PCONN_EVENT_DISCONNECTED, 0, 0), -1);
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
    rec_destroy(&rec);
}

/* Where handlers run: the ones added with pconn_rpc_impls_add on the thread that reads
 * the connection (the same thread for a batch of calls), a blocking one on the pool,
 * never on that thread. */
static void test_handler_threads(void)
{
    fixture_t f;
    setup(&f);
    pconn_rpc_call_t calls[4];
    for (int i = 0; i < 4; i++)
        calls[i] = (pconn_rpc_call_t){.name = "where", .version = i < 3 ? 1 : 2};
    CU_ASSERT_EQUAL(pconn_rpc_call_many(f.conn, calls, 4, WAIT_MS), PCONN_OK);
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        CU_ASSERT_EQUAL_FATAL(calls[i].resp.len, sizeof(pthread_t));
        memcpy(&t[i], calls[i].resp.data, sizeof t[i]);
        pconn_buf_free(&calls[i].resp);
    }
    CU_ASSERT(!pthread_equal(t[3], t[0]) && !pthread_equal(t[3], t[1]) && !pthread_equal(t[3], t[2]));
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "deep", 1, NULL, 0, &resp, WAIT_MS, NULL), PCONN_OK);
    CU_ASSERT_EQUAL(resp.len, 1);
    pconn_buf_free(&resp);
    teardown(&f);
}

static void test_call_timeout(void)
{
    fixture_t f;
    setup(&f);
    gate_set(false);
    pconn_buf_t resp;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "slow", 1, "s", 1, &resp, 50, &err), PCONN_ETIMEDOUT);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "slow version 1: no answer within 50 ms"));
    gate_set(true); /* its late answer is dropped; the connection goes on */
    CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "echo", 1, "x", 1, &resp, WAIT_MS, &err), PCONN_OK);
    pconn_buf_free(&resp);
    teardown(&f);
}

static void *stop_main(void *srv)
{
    pconn_rpc_server_stop(srv);
    return NULL;
}

static void test_server_stop_fails_calls_in_flight(void)
{
    fixture_t f;
    setup(&f);
    gate_set(false);
    slow_call_t s[4];
    for (int i = 0; i < 4; i++) {
        s[i] = (slow_call_t){.conn = f.conn};
        pthread_create(&s[i].thread, NULL, slow_main, &s[i]);
    }
    gate_wait_inside(4);
    /* Stop waits for the handlers: open the gate from another thread only after the
     * connections are closed, which is what the callers see. */
    pconn_rpc_server_t *srv = f.srv;
    f.srv = NULL;
    CU_ASSERT_EQUAL(pconn_conn_wait_closed(f.conn, 0), PCONN_ETIMEDOUT);
    pthread_t stopper;
    pthread_create(&stopper, NULL, stop_main, srv);
    for (int i = 0; i < 4; i++) {
        pthread_join(s[i].thread, NULL);
        CU_ASSERT(s[i].rc == PCONN_EIO || s[i].rc == PCONN_ECLOSED);
    }
    gate_set(true);
    pthread_join(stopper, NULL);
    pconn_conn_unref(f.conn);
    f.conn = NULL;
    pconn_free(f.pc);
    f.pc = NULL;
    pconn_rpc_impls_free(f.impls);
    rec_destroy(&f.rec);
}

/* Review finding: stop closes every connection before it waits for any. It used to
 * close and wait for one connection after the other, and the others went on running
 * their handlers (one after the other) meanwhile: 8 connections with a 500 ms handler
 * each took 4 s to stop instead of 0.5. Here the callers on all three connections learn
 * that their connection is gone while every handler is still held. */
static void test_stop_closes_all_first(void)
{
    enum { N = 3 };
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_t *srv = server(impls, LIMIT);
    CU_ASSERT_PTR_NOT_NULL_FATAL(srv);
    const char *address = pconn_rpc_server_address(srv);
    recorder_t rec[N];
    pconn_t *pc[N];
    pconn_conn_t *conn[N];
    slow_call_t s[N];
    gate_set(false);
    for (int i = 0; i < N; i++) {
        rec_init(&rec[i]);
        pconn_rpc_options_t o = client_options(&rec[i], &address, 1);
        CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc[i]), PCONN_OK);
        CU_ASSERT_EQUAL_FATAL(pconn_connected(pc[i], WAIT_MS, &conn[i]), PCONN_OK);
        s[i] = (slow_call_t){.conn = conn[i]};
        pthread_create(&s[i].thread, NULL, slow_main, &s[i]);
    }
    gate_wait_inside(N);
    pthread_t stopper;
    pthread_create(&stopper, NULL, stop_main, srv);
    for (int i = 0; i < N; i++) {
        pthread_join(s[i].thread, NULL);
        CU_ASSERT(s[i].rc == PCONN_EIO || s[i].rc == PCONN_ECLOSED);
    }
    gate_set(true);
    pthread_join(stopper, NULL);
    for (int i = 0; i < N; i++) {
        pconn_conn_unref(conn[i]);
        pconn_free(pc[i]);
        rec_destroy(&rec[i]);
    }
    pconn_rpc_impls_free(impls);
}

static void test_server_calls_client(void)
{
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_t *srv = server(impls, 0);
    pconn_rpc_impls_t *mine = pconn_rpc_impls_new();
    pconn_rpc_impls_add(mine, "client.hello", 1, h_client_hello, NULL);
    const char *address = pconn_rpc_server_address(srv);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    o.implementations = mine;
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    pconn_buf_t resp;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "ask_back", 1, "server", 6, &resp, WAIT_MS, &err), PCONN_OK);
    CU_ASSERT_EQUAL(resp.len, 25);
    CU_ASSERT(resp.len == 25 && memcmp(resp.data, "client said: hello server", 25) == 0);
    pconn_buf_free(&resp);
    pconn_free(pc);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
    pconn_rpc_impls_free(mine);
    rec_destroy(&rec);
}

static void test_dispatch_and_bind(void)
{
    fixture_t f;
    setup(&f);
    pconn_buf_t resp;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(f.pc, "echo", 1, "d", 1, &resp, WAIT_MS, &err), PCONN_OK);
    pconn_buf_free(&resp);
    teardown(&f);

    /* Nothing listens: no connection within the timeout. */
    char closed_port[64];
    int lfd = pconn_tcp_listen("127.0.0.1:0", 1, &err);
    pconn_tcp_local_address(lfd, closed_port, sizeof closed_port);
    close(lfd);
    recorder_t rec;
    rec_init(&rec);
    const char *list[] = {closed_port};
    pconn_rpc_options_t o = client_options(&rec, list, 1);
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "echo", 1, "d", 1, &resp, 100, &err), PCONN_ETIMEDOUT);
    CU_ASSERT_STRING_EQUAL(err.message, "rpc: no connection within the timeout");
    pconn_close(pc, WAIT_MS);
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "echo", 1, "d", 1, &resp, 100, &err), PCONN_ECLOSED);
    pconn_free(pc);
    rec_destroy(&rec);

    /* bind_address: the server sees the connection come from 127.0.0.2. */
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_t *srv = server(impls, 0);
    const char *address = pconn_rpc_server_address(srv);
    rec_init(&rec);
    o = client_options(&rec, &address, 1);
    o.bind_address = "127.0.0.2";
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "whoami", 1, NULL, 0, &resp, WAIT_MS, &err), PCONN_OK);
    CU_ASSERT(resp.len > 10 && memcmp(resp.data, "127.0.0.2:", 10) == 0);
    pconn_buf_free(&resp);
    pconn_free(pc);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
    rec_destroy(&rec);
}

/* A transport over plain sockets that counts what it carries, has a one-byte handshake
 * of its own (the client sends 'T'; the server waits for it, through EAGAIN), and names
 * its peer as a verifying transport would. */
typedef struct counting_t {
    atomic_long opened, read, written, writes;
} counting_t;
static counting_t counts, scounts;

typedef struct ct_session_t {
    int fd, server;
    counting_t *counts;
} ct_session_t;

static void *ct_open(void *arg, int fd, const char *address, int server, pconn_error_t *err)
{
    (void)address, (void)err;
    counting_t *c = arg;
    atomic_fetch_add(&c->opened, 1);
    ct_session_t *s = malloc(sizeof *s);
    *s = (ct_session_t){fd, server, c};
    return s;
}
static int ct_handshake(void *session, pconn_error_t *err)
{
    ct_session_t *s = session;
    char b;
    ssize_t n = s->server ? recv(s->fd, &b, 1, 0) : send(s->fd, "T", 1, MSG_NOSIGNAL);
    if (n == 1 && (!s->server || b == 'T'))
        return 0;
    if (n < 0 && errno == EAGAIN)
        return -1;
    errno = EPROTO;
    pconn_error_set(err, PCONN_EHANDSHAKE, 0, "no T");
    return -1;
}
static ssize_t ct_read(void *session, void *buf, size_t len)
{
    ct_session_t *s = session;
    ssize_t n = recv(s->fd, buf, len, 0);
    if (n > 0)
        atomic_fetch_add(&s->counts->read, n);
    return n;
}
static ssize_t ct_write(void *session, const void *buf, size_t len)
{
    ct_session_t *s = session;
    ssize_t n = send(s->fd, buf, len, MSG_NOSIGNAL);
    if (n > 0)
        atomic_fetch_add(&s->counts->written, n);
    atomic_fetch_add(&s->counts->writes, 1);
    return n;
}
static void ct_identity(void *session, pconn_rpc_peer_t *peer)
{
    static const char *const sans[] = {"DNS:peer.test", "IP:127.0.0.1", NULL};
    (void)session;
    peer->subject = "CN=peer.test,O=pconn";
    peer->sans = sans;
}
static void ct_close(void *s)
{
    free(s);
}

static int h_subject(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)req, (void)len, (void)err;
    const pconn_rpc_peer_t *p = pconn_rpc_handler_peer();
    if (p == NULL || p->subject == NULL || p->sans == NULL || p->sans[0] == NULL)
        return PCONN_EINVAL;
    char line[256];
    int n = snprintf(line, sizeof line, "%s %s", p->subject, p->sans[0]);
    return pconn_buf_append(resp, line, (size_t)n);
}

typedef struct door_t {
    atomic_bool open;
    atomic_int asked;
} door_t;

static int let_in(const pconn_rpc_peer_t *peer, void *arg, pconn_error_t *why)
{
    door_t *g = arg;
    atomic_fetch_add(&g->asked, 1);
    if (peer->subject == NULL || strcmp(peer->subject, "CN=peer.test,O=pconn") != 0)
        return PCONN_EINVAL;
    if (atomic_load(&g->open))
        return PCONN_OK;
    pconn_error_set(why, PCONN_EINVAL, 0, "go away");
    return PCONN_EINVAL;
}

/* A transport on both sides: its handshake, identity and byte counts; the server's
 * authorize callback refusing with a reason, then admitting; the peer in a handler. */
static void test_transport(void)
{
    static const pconn_transport_t ct = {.open = ct_open, .handshake = ct_handshake,
                                         .read = ct_read, .write = ct_write,
                                         .identity = ct_identity, .close = ct_close, .arg = &counts};
    static const pconn_transport_t sct = {.open = ct_open, .handshake = ct_handshake,
                                          .read = ct_read, .write = ct_write,
                                          .identity = ct_identity, .close = ct_close, .arg = &scounts};
    pconn_rpc_impls_t *impls = server_impls();
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "subject", 1, h_subject, NULL), PCONN_OK);
    door_t door = {0};
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .transport = &sct, .authorize = let_in, .authorize_arg = &door};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    o.transport = &ct;
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    int i = rec_wait_kind(&rec, PCONN_EVENT_FAILED_TO_CONNECT, 0, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    char want[200];
    snprintf(want, sizeof want, "rpc %s: handshake: refused by the peer: not authorized: go away", address);
    CU_ASSERT_STRING_EQUAL(rec_get(&rec, i).error.message, want);
    atomic_store(&door.open, true);
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "echo", 1, "12345", 5, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_buf_free(&resp);
    /* Every attempt wrote its HELLO (16) through the session (the handshake byte is the
     * session's own); the one that got in, the QUERY (8 + 1 + 8 + 4 + 2 + 4 + 5): one
     * write per frame (issue 9, defect 11: header and data were two writes, and each
     * call waited for Nagle behind TLS). */
    long opened = atomic_load(&counts.opened);
    CU_ASSERT(opened >= 2);
    CU_ASSERT_EQUAL(atomic_load(&counts.written), 16 * opened + 32);
    CU_ASSERT_EQUAL(atomic_load(&counts.writes), opened + 1);
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "subject", 1, NULL, 0, &resp, WAIT_MS, NULL), PCONN_OK);
    CU_ASSERT(resp.len == 34 && memcmp(resp.data, "CN=peer.test,O=pconn DNS:peer.test", 34) == 0);
    pconn_buf_free(&resp);
    CU_ASSERT(atomic_load(&door.asked) >= 2);
    pconn_free(pc);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
    rec_destroy(&rec);
}

static void test_200_clients(void)
{
    enum { N = 200 };
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_t *srv = server(impls, 0);
    const char *address = pconn_rpc_server_address(srv);
    pconn_t **pcs = calloc(N, sizeof *pcs);
    for (int i = 0; i < N; i++) {
        pconn_rpc_options_t o = {.base = {.server_name = "many",
                                          .resolver = pconn_resolver_static(&address, 1),
                                          .retry_delay = quick_retry}};
        CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pcs[i]), PCONN_OK);
    }
    int ok = 0;
    for (int i = 0; i < N; i++) {
        pconn_buf_t resp;
        char req[16];
        int n = snprintf(req, sizeof req, "%d", i);
        if (pconn_rpc_dispatch(pcs[i], "echo", 1, req, (size_t)n, &resp, WAIT_MS, NULL) == PCONN_OK &&
            resp.len == (size_t)n && memcmp(resp.data, req, (size_t)n) == 0)
            ok++;
        pconn_buf_free(&resp);
    }
    CU_ASSERT_EQUAL(ok, N);
    for (int i = 0; i < N; i++)
        pconn_free(pcs[i]);
    free(pcs);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
}

/* ---- peers that break the protocol ---------------------------------------------- */

static const unsigned char good_hello[] = {0, 0, 0, 0, 0, 0, 0, 8, 1, 0x50, 0x43, 0x4e, 0x31, 1, 0, 1};

/* A fake server: accepts one connection and writes `script`. With a `tail` or
 * `hang_up`, it then waits for the client's HELLO and the head of its first QUERY (a
 * call is in flight), writes the tail, and hangs up if asked. */
typedef struct fake_t {
    int lfd, fd;
    pthread_t thread;
    const unsigned char *script, *tail;
    size_t len, tail_len;
    bool hang_up;
    char address[64];
} fake_t;

static void *fake_main(void *arg)
{
    fake_t *f = arg;
    f->fd = accept4(f->lfd, NULL, NULL, SOCK_CLOEXEC);
    if (f->fd < 0)
        return NULL;
    if (f->len > 0)
        (void)!send(f->fd, f->script, f->len, MSG_NOSIGNAL);
    if (f->tail_len > 0 || f->hang_up) {
        unsigned char in[16 + 9];
        size_t got = 0;
        ssize_t n;
        while (got < sizeof in && (n = recv(f->fd, in + got, sizeof in - got, 0)) > 0)
            got += (size_t)n;
        if (f->tail_len > 0)
            (void)!send(f->fd, f->tail, f->tail_len, MSG_NOSIGNAL);
        if (f->hang_up)
            shutdown(f->fd, SHUT_WR);
    }
    return NULL;
}

static void fake_start2(fake_t *f, const unsigned char *script, size_t len,
                        const unsigned char *tail, size_t tail_len, bool hang_up)
{
    pconn_error_t err;
    f->lfd = pconn_tcp_listen("127.0.0.1:0", 4, &err);
    pconn_tcp_local_address(f->lfd, f->address, sizeof f->address);
    f->script = script;
    f->len = len;
    f->tail = tail;
    f->tail_len = tail_len;
    f->hang_up = hang_up;
    f->fd = -1;
    pthread_create(&f->thread, NULL, fake_main, f);
}

static void fake_start(fake_t *f, const unsigned char *script, size_t len, bool hang_up)
{
    fake_start2(f, script, len, NULL, 0, hang_up);
}

static void fake_stop(fake_t *f)
{
    shutdown(f->lfd, SHUT_RDWR);
    pthread_join(f->thread, NULL);
    if (f->fd >= 0)
        close(f->fd);
    close(f->lfd);
}

/* A client to one fake server: the first FAILED_TO_CONNECT's message, or the
 * DISCONNECTED after a CONNECTED, whichever comes. */
static void client_against(fake_t *fake, recorder_t *rec, pconn_t **pc, int64_t handshake_ms)
{
    const char *list[] = {fake->address};
    pconn_rpc_options_t o = {.base = {.server_name = "rpc", .resolver = pconn_resolver_static(list, 1),
                                      .on_event = rec_on_event, .on_event_arg = rec},
                             .handshake_timeout_ms = handshake_ms};
    CU_ASSERT_EQUAL(pconn_rpc_create(&o, pc), PCONN_OK);
}

/* A client against a fake server that writes `script`: its first FAILED_TO_CONNECT. */
static rec_event_t first_failure(const unsigned char *script, size_t len, int64_t handshake_ms,
                                 char *fake_address, size_t size)
{
    fake_t fake;
    fake_start(&fake, script, len, false);
    snprintf(fake_address, size, "%s", fake.address);
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc;
    client_against(&fake, &rec, &pc, handshake_ms);
    rec_event_t e = {0};
    int i = rec_wait_kind(&rec, PCONN_EVENT_FAILED_TO_CONNECT, 0, WAIT_MS);
    CU_ASSERT(i >= 0);
    if (i >= 0)
        e = rec_get(&rec, i);
    pconn_free(pc);
    rec_destroy(&rec);
    fake_stop(&fake);
    return e;
}

static void test_wrong_magic(void)
{
    static const unsigned char bad[] = {0, 0, 0, 0, 0, 0, 0, 8, 1, 'H', 'T', 'T', 'P', 1, 0, 1};
    char address[64];
    rec_event_t e = first_failure(bad, sizeof bad, WAIT_MS, address, sizeof address);
    CU_ASSERT_EQUAL(e.error.code, PCONN_EHANDSHAKE);
    char want[200];
    snprintf(want, sizeof want, "rpc %s: handshake: bad magic number 0x48545450 (want 0x50434e31)", address);
    CU_ASSERT_STRING_EQUAL(e.error.message, want);
}

static void test_no_common_version_and_silent_server(void)
{
    static const unsigned char v9[] = {0, 0, 0, 0, 0, 0, 0, 10, 1, 0x50, 0x43, 0x4e, 0x31, 2, 0, 9, 0, 7};
    char address[64];
    rec_event_t e = first_failure(v9, sizeof v9, WAIT_MS, address, sizeof address);
    CU_ASSERT_PTR_NOT_NULL(strstr(e.error.message, "no common protocol version: ours [1], theirs [9 7]"));
    /* A server that accepts and never speaks: the handshake timeout ends the attempt. */
    e = first_failure(NULL, 0, 200, address, sizeof address);
    CU_ASSERT_PTR_NOT_NULL(strstr(e.error.message, "handshake timed out"));
}

/* After a good HELLO, the fake server sends `tail`; the client must end the connection
 * with the given words in the failing call's message. */
static void after_hello(const unsigned char *tail, size_t tail_len, bool hang_up, int code, const char *why)
{
    fake_t fake;
    fake_start2(&fake, good_hello, sizeof good_hello, tail, tail_len, hang_up);
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc;
    client_against(&fake, &rec, &pc, WAIT_MS);
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    pconn_buf_t resp;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "echo", 1, "x", 1, &resp, WAIT_MS, &err), code);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, why));
    if (strstr(err.message, why) == NULL)
        fprintf(stderr, "\n  got \"%s\", want \"%s\"\n", err.message, why);
    CU_ASSERT_EQUAL(pconn_conn_wait_closed(conn, WAIT_MS), PCONN_OK);
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&rec, PCONN_EVENT_DISCONNECTED, 0, WAIT_MS), -1);
    pconn_conn_unref(conn);
    pconn_free(pc);
    rec_destroy(&rec);
    fake_stop(&fake);
}

static void test_bad_frames_from_server(void)
{
    /* A length of 2^63: refused by its length, nothing allocated; it claimed to be the
     * answer to call 1, which learns why. */
    static const unsigned char huge[] = {0x80, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1};
    after_hello(huge, sizeof huge, false, PCONN_ETOOBIG, "frame of 9223372036854775808 bytes over the limit of 104857600 bytes");
    /* A truncated frame, then the peer goes. */
    static const unsigned char truncated[] = {0, 0, 0, 0, 0, 0, 0, 40, 4, 0, 0};
    after_hello(truncated, sizeof truncated, true, PCONN_EIO, "connection closed by peer");
    /* An unknown frame type. */
    static const unsigned char unknown[] = {0, 0, 0, 0, 0, 0, 0, 1, 77};
    after_hello(unknown, sizeof unknown, false, PCONN_EIO, "protocol error: unknown frame type 77");
    /* A zero length. */
    static const unsigned char zero[] = {0, 0, 0, 0, 0, 0, 0, 0};
    after_hello(zero, sizeof zero, false, PCONN_EIO, "protocol error: zero-length frame");
    /* A second HELLO. */
    after_hello(good_hello, sizeof good_hello, false, PCONN_EIO, "protocol error: HELLO after the handshake");
    /* Nothing more: the peer just goes. */
    after_hello(NULL, 0, true, PCONN_EIO, "connection closed by peer");
}

/* A raw client of the real server: connects, writes, reads everything until EOF. */
static size_t raw_exchange(const char *address, const unsigned char *out, size_t out_len,
                           unsigned char *in, size_t in_size)
{
    pconn_conn_t *c = NULL;
    pconn_error_t err;
    if (pconn_tcp_connect(NULL, address, &c, &err) != PCONN_OK)
        return 0;
    if (out_len > 0)
        pconn_tcp_send_all(c, out, out_len, &err);
    size_t got = 0;
    ssize_t n;
    while (got < in_size && (n = recv(pconn_tcp_fd(c), in + got, in_size - got, 0)) > 0)
        got += (size_t)n;
    pconn_conn_unref(c);
    return got;
}

/* docs/protocol.md's worked example, byte for byte: what a client really sends for
 * its first call, echo version 1 with "hi". */
static void test_protocol_doc_example(void)
{
    static const unsigned char query[] = {
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x15, 0x03, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x04, 0x65, 0x63, 0x68,
        0x6f, 0x68, 0x69};
    static const unsigned char response[] = {
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x04, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x68, 0x69};
    /* A fake server: HELLO, then it reads the client's HELLO and QUERY, answers with the
     * documented RESPONSE. */
    pconn_error_t err;
    int lfd = pconn_tcp_listen("127.0.0.1:0", 1, &err);
    char address[64];
    pconn_tcp_local_address(lfd, address, sizeof address);
    recorder_t rec;
    rec_init(&rec);
    const char *list[] = {address};
    pconn_rpc_options_t o = client_options(&rec, list, 1);
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CU_ASSERT_FATAL(fd >= 0);
    CU_ASSERT_EQUAL(send(fd, good_hello, sizeof good_hello, MSG_NOSIGNAL), (ssize_t)sizeof good_hello);
    unsigned char hello[16];
    CU_ASSERT_EQUAL(recv(fd, hello, sizeof hello, MSG_WAITALL), 16);
    CU_ASSERT_EQUAL(memcmp(hello, good_hello, 16), 0); /* the documented HELLO */

    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    slow_call_t call = {.conn = conn};
    pthread_t t;
    pthread_create(&t, NULL, echo_hi_main, &call);
    unsigned char got[sizeof query];
    CU_ASSERT_EQUAL(recv(fd, got, sizeof got, MSG_WAITALL), (ssize_t)sizeof got);
    CU_ASSERT_EQUAL(memcmp(got, query, sizeof query), 0);
    CU_ASSERT_EQUAL(send(fd, response, sizeof response, MSG_NOSIGNAL), (ssize_t)sizeof response);
    pthread_join(t, NULL);
    CU_ASSERT_EQUAL(call.rc, PCONN_OK);
    pconn_conn_unref(conn);
    pconn_free(pc);
    rec_destroy(&rec);
    close(fd);
    close(lfd);
}

static void test_unix_socket_server(void)
{
    char dir[] = "/tmp/pconn-rpc-XXXXXX";
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
    char listen_at[128];
    snprintf(listen_at, sizeof listen_at, "unix:%s/rpc.sock", dir);
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_options_t so = {.listen_address = listen_at, .implementations = impls};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(pconn_rpc_server_address(srv), listen_at);
    recorder_t rec;
    rec_init(&rec);
    const char *address = pconn_rpc_server_address(srv);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "echo", 1, "unix", 4, &resp, WAIT_MS, NULL), PCONN_OK);
    CU_ASSERT(resp.len == 4 && memcmp(resp.data, "unix", 4) == 0);
    pconn_buf_free(&resp);
    pconn_free(pc);
    rec_destroy(&rec);
    pconn_rpc_server_stop(srv); /* removes its socket file */
    CU_ASSERT_EQUAL(rmdir(dir), 0);
    pconn_rpc_impls_free(impls);
}

static void test_bad_frames_to_server(void)
{
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .handshake_timeout_ms = 200};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    unsigned char in[512];

    /* Silent: HELLO, then CLOSE with code 9 after the handshake timeout, then EOF. */
    size_t n = raw_exchange(address, NULL, 0, in, sizeof in);
    CU_ASSERT_FATAL(n > 16 + 13);
    CU_ASSERT_EQUAL(memcmp(in, good_hello, 16), 0);
    CU_ASSERT_EQUAL(in[16 + 8], 5);                      /* CLOSE */
    CU_ASSERT_EQUAL(in[16 + 12], PCONN_EHANDSHAKE);      /* code, low byte */

    /* Wrong magic: CLOSE 9 with the reason. */
    static const unsigned char bad[] = {0, 0, 0, 0, 0, 0, 0, 8, 1, 'H', 'T', 'T', 'P', 1, 0, 1};
    n = raw_exchange(address, bad, sizeof bad, in, sizeof in - 1);
    in[n] = '\0';
    CU_ASSERT(n > 16 + 13 && in[16 + 8] == 5 && in[16 + 12] == PCONN_EHANDSHAKE);
    CU_ASSERT(n > 29 && memmem(in, n, "bad magic number 0x48545450", 27) != NULL);

    /* A TLS ClientHello: the server says the peer is a TLS client (review finding: it
     * said "it is a TLS server", the client's message). */
    static const unsigned char hello_tls[] = {0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03};
    n = raw_exchange(address, hello_tls, sizeof hello_tls, in, sizeof in - 1);
    CU_ASSERT(n > 29 && in[16 + 8] == 5 && in[16 + 12] == PCONN_EHANDSHAKE);
    CU_ASSERT(n > 29 && memmem(in, n, "it is a TLS client (this server has no tls)", 43) != NULL);

    /* A QUERY claiming 2^63 bytes: an error RESPONSE for its id, CLOSE 10, EOF. */
    unsigned char huge[16 + 17];
    memcpy(huge, good_hello, 16);
    static const unsigned char q[] = {0x80, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 42};
    memcpy(huge + 16, q, sizeof q);
    n = raw_exchange(address, huge, sizeof huge, in, sizeof in);
    CU_ASSERT_FATAL(n > 16 + 21);
    CU_ASSERT_EQUAL(in[16 + 8], 4);  /* RESPONSE */
    CU_ASSERT_EQUAL(in[16 + 16], 42); /* for id 42 */
    CU_ASSERT_EQUAL(in[16 + 20], PCONN_ETOOBIG);
    CU_ASSERT(memmem(in, n, "\x05\x00\x00\x00\x0a", 5) != NULL); /* CLOSE, code 10 */

    /* The server is still fine for everyone else. */
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "echo", 1, "x", 1, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_buf_free(&resp);
    pconn_free(pc);
    rec_destroy(&rec);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
}

/* ---- servers in other processes: killed, stopped -------------------------------- */

static int spawn_rpc_server(tproc_t *p, const char *name, char *address, size_t size)
{
    const char *argv[] = {"pconn", "rpc-serve", "127.0.0.1:0", "--name", name, NULL};
    return tproc_spawn_server(p, argv, address, size);
}

/* Two RPC server processes, A and B, and an event recorder for a client of both. */
typedef struct pair_t {
    tproc_t a, b;
    char addr_a[256], addr_b[256];
    const char *list[2];
    recorder_t rec;
} pair_t;

static int pair_start(pair_t *p)
{
    if (spawn_rpc_server(&p->a, "A", p->addr_a, sizeof p->addr_a) != 0)
        return -1;
    if (spawn_rpc_server(&p->b, "B", p->addr_b, sizeof p->addr_b) != 0) {
        tproc_signal(&p->a, SIGKILL);
        return -1;
    }
    p->list[0] = p->addr_a;
    p->list[1] = p->addr_b;
    rec_init(&p->rec);
    return 0;
}

static void pair_stop(pair_t *p)
{
    rec_destroy(&p->rec);
    tproc_signal(&p->a, SIGKILL);
    tproc_signal(&p->b, SIGKILL);
}

static void *sleeper_main(void *arg)
{
    slow_call_t *s = arg;
    pconn_buf_t resp;
    int64_t t0 = pconn_clock_now(NULL);
    s->rc = pconn_rpc_call(s->conn, "sleep", 1, "60000", 5, &resp, 120000, NULL);
    s->took_ms = (pconn_clock_now(NULL) - t0) / 1000000;
    pconn_buf_free(&resp);
    return NULL;
}

static void test_server_killed_calls_fail_and_failover(void)
{
    pair_t p;
    CU_ASSERT_EQUAL_FATAL(pair_start(&p), 0);
    pconn_rpc_options_t o = client_options(&p.rec, p.list, 2);
    pconn_t *pc = NULL;
    pconn_conn_t *conn = connected_client(&o, &pc);
    CU_ASSERT_STRING_EQUAL(pconn_conn_address(conn), p.addr_a);

    /* Four calls in flight, each for a minute; then A dies. */
    slow_call_t s[4];
    for (int i = 0; i < 4; i++) {
        s[i] = (slow_call_t){.conn = conn};
        pthread_create(&s[i].thread, NULL, sleeper_main, &s[i]);
    }
    /* Wait until A surely has them: a call after them on the same connection returns. */
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "name", 1, NULL, 0, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_buf_free(&resp);
    tproc_signal(&p.a, SIGKILL);
    for (int i = 0; i < 4; i++) {
        pthread_join(s[i].thread, NULL);
        CU_ASSERT_EQUAL(s[i].rc, PCONN_EIO);
        CU_ASSERT(s[i].took_ms < 60000); /* not the minute: at once */
    }
    pconn_conn_unref(conn);
    /* The persistent connection moves to B. */
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "name", 1, NULL, 0, &resp, WAIT_MS, NULL), PCONN_OK);
    CU_ASSERT(resp.len == 1 && memcmp(resp.data, "B", 1) == 0);
    pconn_buf_free(&resp);
    pconn_free(pc);
    pair_stop(&p);
}

typedef struct retrier_t {
    pconn_t *pc;
    pthread_t thread;
    atomic_bool *go;
    int failures;
    char last;
} retrier_t;

/* Calls until an answer comes from B, counting the failures on the way. */
static void *retrier_main(void *arg)
{
    retrier_t *r = arg;
    while (!atomic_load(r->go))
        sched_yield();
    for (;;) {
        pconn_buf_t resp;
        int rc = pconn_rpc_dispatch(r->pc, "name", 1, NULL, 0, &resp, WAIT_MS, NULL);
        if (rc == PCONN_OK) {
            r->last = resp.len == 1 ? ((const char *)resp.data)[0] : '?';
            pconn_buf_free(&resp);
            if (r->last == 'B')
                return NULL;
        } else {
            r->failures++;
            if (r->failures > 1000)
                return NULL; /* the spin of issue 9 defect 10: enough to tell */
        }
    }
}

/* Issue 9 defect 10: a connection is marked closed before its callers are woken, so a
 * caller that retries at once waits for the next connection instead of failing on the
 * dead one again and again. Each of 16 callers fails at most once per failover (the
 * call in flight when A died). Before: hundreds of failures per failover. */
static void test_failover_retry_does_not_spin(void)
{
    pair_t p;
    CU_ASSERT_EQUAL_FATAL(pair_start(&p), 0);
    pconn_rpc_options_t o = client_options(&p.rec, p.list, 2);
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    pconn_buf_t resp;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_dispatch(pc, "name", 1, NULL, 0, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_buf_free(&resp);
    atomic_bool go = false;
    retrier_t r[16];
    for (int i = 0; i < 16; i++) {
        r[i] = (retrier_t){.pc = pc, .go = &go};
        pthread_create(&r[i].thread, NULL, retrier_main, &r[i]);
    }
    atomic_store(&go, true);
    tproc_signal(&p.a, SIGKILL);
    int total = 0;
    for (int i = 0; i < 16; i++) {
        pthread_join(r[i].thread, NULL);
        CU_ASSERT_EQUAL(r[i].last, 'B');
        CU_ASSERT(r[i].failures <= 1);
        total += r[i].failures;
    }
    if (total > 16)
        fprintf(stderr, "[%d failed calls in one failover] ", total);
    pconn_free(pc);
    pair_stop(&p);
}

static void test_stopped_server_heartbeat(void)
{
    pair_t p;
    CU_ASSERT_EQUAL_FATAL(pair_start(&p), 0);
    pconn_rpc_options_t o = client_options(&p.rec, p.list, 2);
    o.heartbeat = (pconn_heartbeat_t){.timeout_ms = 300, .send_every_ms = 100};
    o.handshake_timeout_ms = 300;
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    int i = rec_wait_kind(&p.rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    CU_ASSERT_STRING_EQUAL(rec_get(&p.rec, i).address, p.addr_a);
    /* The server hangs: its socket stays open, only heartbeats can tell. */
    tproc_signal(&p.a, SIGSTOP);
    int64_t t0 = pconn_clock_now(NULL);
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&p.rec, PCONN_EVENT_DISCONNECTED, 0, WAIT_MS), -1);
    fprintf(stderr, "[DISCONNECTED %.0f ms after SIGSTOP, heartbeat timeout 300 ms] ",
            (double)(pconn_clock_now(NULL) - t0) / 1e6);
    i = rec_wait_kind(&p.rec, PCONN_EVENT_CONNECTED, 1, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    CU_ASSERT_STRING_EQUAL(rec_get(&p.rec, i).address, p.addr_b);
    pconn_free(pc);
    pair_stop(&p); /* SIGKILL ends a stopped process too */
}

static void test_heartbeat_forever(void)
{
    /* Issue 9 defect 9: timeout_ms * 1000000 overflowed (INT64_MAX ms dropped the
     * connection at once); both "never" spellings must keep a working connection. */
    const int64_t never[] = {INT64_MAX, PCONN_FOREVER};
    for (size_t k = 0; k < 2; k++) {
        fixture_t f;
        memset(&f, 0, sizeof f);
        rec_init(&f.rec);
        f.impls = server_impls();
        f.srv = server(f.impls, LIMIT);
        CU_ASSERT_PTR_NOT_NULL_FATAL(f.srv);
        const char *address = pconn_rpc_server_address(f.srv);
        pconn_rpc_options_t o = client_options(&f.rec, &address, 1);
        o.heartbeat = (pconn_heartbeat_t){.timeout_ms = never[k], .send_every_ms = INT64_MAX};
        CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &f.pc), PCONN_OK);
        CU_ASSERT_EQUAL_FATAL(pconn_connected(f.pc, WAIT_MS, &f.conn), PCONN_OK);
        for (int i = 0; i < 3; i++) {
            pconn_buf_t resp;
            pconn_error_t err;
            CU_ASSERT_EQUAL(pconn_rpc_call(f.conn, "echo", 1, "hi", 2, &resp, WAIT_MS, &err), PCONN_OK);
            CU_ASSERT_EQUAL(resp.len, 2);
            pconn_buf_free(&resp);
        }
        teardown(&f);
    }
}

static void test_bad_options(void)
{
    pconn_t *pc = (pconn_t *)&counts;
    CU_ASSERT_EQUAL(pconn_rpc_create(NULL, &pc), PCONN_EINVAL);
    CU_ASSERT_PTR_NULL(pc);
    pconn_rpc_options_t o = {.base = {.server_name = NULL, .resolver = pconn_resolver_static((const char *const[]){"a:1"}, 1)}};
    CU_ASSERT_EQUAL(pconn_rpc_create(&o, &pc), PCONN_EINVAL);
    pconn_rpc_server_t *srv = NULL;
    pconn_error_t err;
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:99999"};
    CU_ASSERT_EQUAL(pconn_rpc_server_start(&so, &srv, &err), PCONN_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "port 99999 outside 1-65535"));
    CU_ASSERT_EQUAL(pconn_rpc_server_start(NULL, &srv, &err), PCONN_EINVAL);
    pconn_rpc_server_stop(NULL);
    pconn_buf_free(NULL);
    pconn_rpc_impls_free(NULL);
}

/* ---- lifetimes (issue 9, defects 1, 2, 8) ---------------------------------------- */

/* n QUERY frames for "echo" version 1 with one byte of data, ids 1..n. */
static unsigned char *queries(int n, const char *name4, size_t *len)
{
    enum { FRAME = 8 + 1 + 8 + 4 + 2 + 4 + 1 };
    unsigned char *buf = malloc((size_t)n * FRAME);
    for (int i = 0; i < n; i++) {
        unsigned char *f = buf + (size_t)i * FRAME;
        memset(f, 0, FRAME);
        f[7] = FRAME - 8;
        f[8] = 3; /* QUERY */
        uint64_t id = (uint64_t)i + 1;
        for (int k = 0; k < 8; k++)
            f[9 + k] = (unsigned char)(id >> (56 - 8 * k));
        f[20] = 1;                   /* version 1 */
        f[22] = 4;                   /* name length */
        memcpy(f + 23, name4, 4);    /* a 4-byte name, then the data "x" */
        f[27] = 'x';
    }
    *len = (size_t)n * FRAME;
    return buf;
}

/* Defect 1: a peer that sends 20,000 queries and reads no answer, then the server
 * stops. The reader took a reference per query from a count that could be zero, so the
 * connection was destroyed twice (ASan: heap-use-after-free; else a crash or a hang). */
static void test_query_flood_then_stop(void)
{
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_t *srv = server(impls, LIMIT);
    CU_ASSERT_PTR_NOT_NULL_FATAL(srv);
    pconn_conn_t *c = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_tcp_connect(NULL, pconn_rpc_server_address(srv), &c, &err), PCONN_OK);
    size_t len;
    unsigned char *q = queries(20000, "echo", &len);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(c, good_hello, sizeof good_hello, &err), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(c, q, len, &err), PCONN_OK);
    /* Some answers arrive: the server is busy with the flood when it stops. */
    unsigned char in[64];
    CU_ASSERT(recv(pconn_tcp_fd(c), in, sizeof in, MSG_WAITALL) == (ssize_t)sizeof in);
    pconn_rpc_server_stop(srv);
    pconn_conn_unref(c);
    pconn_rpc_impls_free(impls);
    free(q);
}

/* Review finding: queries still queued when their connection ends are not run. The
 * server's stop used to run every one of them (on the reading thread one after the
 * other, or from the pool's queue) although no answer could go out. */
static void test_stop_skips_queued_queries(void)
{
    enum { N = 2000 }; /* 56 KB: one read */
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_t *srv = server(impls, LIMIT);
    CU_ASSERT_PTR_NOT_NULL_FATAL(srv);
    gate_set(false);
    pconn_conn_t *c = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_tcp_connect(NULL, pconn_rpc_server_address(srv), &c, &err), PCONN_OK);
    size_t len;
    unsigned char *q = queries(N, "slow", &len);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(c, good_hello, sizeof good_hello, &err), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(c, q, len, &err), PCONN_OK);
    free(q);
    gate_wait_inside(200); /* the first inline, then the pool's threads, all held */
    pthread_t stopper;
    pthread_create(&stopper, NULL, stop_main, srv);
    unsigned char in[4096];
    while (recv(pconn_tcp_fd(c), in, sizeof in, 0) > 0) /* the server closes it */
        ;
    gate_set(true);
    pthread_join(stopper, NULL);
    pthread_mutex_lock(&gate.mutex);
    int started = gate.inside;
    pthread_mutex_unlock(&gate.mutex);
    fprintf(stderr, "[%d of %d handlers started] ", started, N);
    CU_ASSERT(started < N / 2);
    pconn_conn_unref(c);
    pconn_rpc_impls_free(impls);
}

/* A raw RPC peer on its own thread: accepts one connection, exchanges HELLOs, then does
 * what `then` says with the socket until told to stop. */
typedef struct raw_peer_t {
    int lfd;
    char address[64];
    pthread_t thread;
    atomic_bool stop;
    void (*then)(struct raw_peer_t *p, int fd);
} raw_peer_t;

static void *raw_peer_main(void *arg)
{
    raw_peer_t *p = arg;
    int fd = accept4(p->lfd, NULL, NULL, SOCK_CLOEXEC);
    unsigned char hello[16];
    if (fd >= 0 && recv(fd, hello, sizeof hello, MSG_WAITALL) == (ssize_t)sizeof hello &&
        send(fd, good_hello, sizeof good_hello, MSG_NOSIGNAL) == (ssize_t)sizeof good_hello)
        p->then(p, fd);
    if (fd >= 0)
        close(fd);
    return NULL;
}

static void raw_peer_start(raw_peer_t *p, void (*then)(raw_peer_t *, int))
{
    pconn_error_t err;
    *p = (raw_peer_t){.lfd = pconn_tcp_listen("127.0.0.1:0", 4, &err), .then = then};
    CU_ASSERT_FATAL(p->lfd >= 0);
    pconn_tcp_local_address(p->lfd, p->address, sizeof p->address);
    pthread_create(&p->thread, NULL, raw_peer_main, p);
}

static void raw_peer_stop(raw_peer_t *p)
{
    atomic_store(&p->stop, true);
    shutdown(p->lfd, SHUT_RDWR); /* ends an accept() still waiting */
    pthread_join(p->thread, NULL);
    close(p->lfd);
}

/* 20,000 queries, then nothing read but the end of the stream. */
static void flood(raw_peer_t *p, int fd)
{
    (void)p;
    size_t len;
    unsigned char *q = queries(20000, "echo", &len);
    for (size_t off = 0; off < len;) {
        ssize_t n = send(fd, q + off, len - off, MSG_NOSIGNAL);
        if (n <= 0)
            break;
        off += (size_t)n;
    }
    free(q);
    char sink[4096];
    while (recv(fd, sink, sizeof sink, 0) > 0)
        ;
}

/* Defect 2: a client whose connection the caller still holds after pconn_free(), and
 * whose implementation table the caller frees right after: the connection's reader
 * went on submitting queries to the freed handler pool and table. */
static void test_held_connection_outlives_client(void)
{
    raw_peer_t f;
    raw_peer_start(&f, flood);
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "echo", 1, h_echo, NULL), PCONN_OK);
    recorder_t rec;
    rec_init(&rec);
    const char *list[] = {f.address};
    pconn_rpc_options_t o = client_options(&rec, list, 1);
    o.implementations = impls;
    pconn_t *pc = NULL;
    pconn_conn_t *conn = connected_client(&o, &pc);
    pconn_free(pc);               /* while the client is still working through the flood */
    pconn_rpc_impls_free(impls);  /* the library keeps its own references */
    pconn_buf_t resp;
    CU_ASSERT_NOT_EQUAL(pconn_rpc_call(conn, "echo", 1, "x", 1, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_conn_unref(conn);
    raw_peer_stop(&f);
    rec_destroy(&rec);
}

typedef struct self_free_t {
    pconn_t *pc;
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int freed;
} self_free_t;

static int h_free_my_pconn(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)req, (void)len, (void)err;
    self_free_t *sf = arg;
    pconn_free(sf->pc); /* deadlocked: the pool waited for the thread running this */
    int rc = pconn_buf_append(resp, "bye", 3);
    pthread_mutex_lock(&sf->mutex);
    sf->freed = 1;
    pthread_cond_broadcast(&sf->cond);
    pthread_mutex_unlock(&sf->mutex);
    return rc;
}

/* Defect 8: pconn_free() from one of the client's own handlers returns. */
static void test_free_from_client_handler(void)
{
    pconn_rpc_impls_t *simpls = server_impls();
    pconn_rpc_server_t *srv = server(simpls, LIMIT);
    CU_ASSERT_PTR_NOT_NULL_FATAL(srv);
    self_free_t sf = {.mutex = PTHREAD_MUTEX_INITIALIZER};
    test_cond_init(&sf.cond);
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "client.hello", 1, h_free_my_pconn, &sf), PCONN_OK);
    recorder_t rec;
    rec_init(&rec);
    const char *address = pconn_rpc_server_address(srv);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    o.implementations = impls;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &sf.pc), PCONN_OK);
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(sf.pc, WAIT_MS, &conn), PCONN_OK);
    /* The server's handler calls the client back; the client's handler frees its pconn,
     * which closes this connection: the outer call fails, but everything returns. */
    pconn_buf_t resp;
    int rc = pconn_rpc_call(conn, "ask_back", 1, "x", 1, &resp, WAIT_MS, NULL);
    CU_ASSERT(rc == PCONN_OK || rc == PCONN_EIO || rc == PCONN_ECLOSED || rc == PCONN_EREMOTE);
    pconn_buf_free(&resp);
    CU_ASSERT_EQUAL(pconn_conn_wait_closed(conn, WAIT_MS), PCONN_OK);
    pconn_conn_unref(conn);
    /* The handler's pconn_free() returns (it hung before). */
    CU_ASSERT_EQUAL(test_wait_count(&sf.mutex, &sf.cond, &sf.freed, 1, WAIT_MS), 1);
    pconn_rpc_impls_free(impls);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(simpls);
    rec_destroy(&rec);
}

/* ---- deadlines of the handshake and of stop (issue 9, defects 4, 5, 6) ------------ */

/* Defect 4: pconn_close() interrupts the client's handshake with a server that accepted
 * and says nothing. Before: close waited for the handshake timeout (here a minute). */
static void test_close_interrupts_handshake(void)
{
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_HOLD), 0);
    recorder_t rec;
    rec_init(&rec);
    const char *address = s.address;
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    o.handshake_timeout_ms = 60000;
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    CU_ASSERT_EQUAL(tserver_wait_accepted(&s, 1, WAIT_MS), 1); /* in the handshake now */
    CU_ASSERT_EQUAL(pconn_close(pc, WAIT_MS), PCONN_OK);
    pconn_free(pc);
    char seq[64];
    rec_letters(&rec, seq, sizeof seq);
    CU_ASSERT_STRING_EQUAL(seq, "AO"); /* cut short by close: no failure reported */
    rec_destroy(&rec);
    tserver_stop(&s);
}

/* Defect 5: stop does not wait out the handshake timeout of a silent peer. The bound
 * asserted is half the handshake timeout: before, stop took all of it. */
static void test_stop_with_silent_peer(void)
{
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .handshake_timeout_ms = 60000};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    pconn_conn_t *c = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_tcp_connect(NULL, pconn_rpc_server_address(srv), &c, &err), PCONN_OK);
    unsigned char hello[16]; /* the server's HELLO: its handshake is under way */
    CU_ASSERT_EQUAL(recv(pconn_tcp_fd(c), hello, sizeof hello, MSG_WAITALL), (ssize_t)sizeof hello);
    int64_t t0 = pconn_clock_now(NULL);
    pconn_rpc_server_stop(srv);
    CU_ASSERT((pconn_clock_now(NULL) - t0) / 1000000 < 30000);
    pconn_conn_unref(c);
    pconn_rpc_impls_free(impls);
}

/* Threads of this process now. */
static int thread_count(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[128];
    int n = -1;
    while (f != NULL && fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "Threads: %d", &n) == 1)
            break;
    if (f != NULL)
        fclose(f);
    return n;
}

/* One thread drives every handshake: 100 peers that connect, read the server's HELLO
 * and say nothing cost the server no thread, are counted in its stats, and a client
 * that comes after them is served at once. Before: a thread per handshake, at most 64
 * at once, so the client waited in the backlog for the handshake timeout (a minute). */
#define SILENT_PEERS 100
static void test_silent_peers_cost_no_thread(void)
{
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .handshake_timeout_ms = 60000};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    int before = thread_count();
    pconn_conn_t *peer[SILENT_PEERS];
    for (int i = 0; i < SILENT_PEERS; i++) {
        CU_ASSERT_EQUAL_FATAL(pconn_tcp_connect(NULL, address, &peer[i], NULL), PCONN_OK);
        unsigned char hello[16]; /* the server's HELLO: its handshake is under way */
        CU_ASSERT_EQUAL(recv(pconn_tcp_fd(peer[i]), hello, sizeof hello, MSG_WAITALL), (ssize_t)sizeof hello);
    }
    CU_ASSERT(thread_count() - before < 8); /* none per peer (before: 64) */
    char *stats = pconn_rpc_server_stats_json(srv);
    CU_ASSERT_PTR_NOT_NULL(stats != NULL ? strstr(stats, "\"handshakes\":100,") : NULL);
    free(stats);
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    o.handshake_timeout_ms = WAIT_MS;
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "echo", 1, "after", 5, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_buf_free(&resp);
    pconn_free(pc);
    rec_destroy(&rec);
    pconn_rpc_server_stop(srv); /* ends the 100 handshakes at once */
    for (int i = 0; i < SILENT_PEERS; i++) {
        unsigned char b;
        CU_ASSERT_EQUAL(recv(pconn_tcp_fd(peer[i]), &b, 1, 0), 0); /* closed, no CLOSE frame */
        pconn_conn_unref(peer[i]);
    }
    pconn_rpc_impls_free(impls);
}

/* The server's stats value of key, or -1. */
static int server_stat(pconn_rpc_server_t *srv, const char *key)
{
    char *text = pconn_rpc_server_stats_json(srv);
    json_t *o = text != NULL ? json_loads(text, 0, NULL) : NULL;
    int v = o != NULL && json_is_integer(json_object_get(o, key)) ? (int)json_integer_value(json_object_get(o, key)) : -1;
    json_decref(o);
    free(text);
    return v;
}

/* Until the server's stats say key is want, for up to WAIT_MS. */
static bool wait_stat(pconn_rpc_server_t *srv, const char *key, int want)
{
    int64_t until = pconn_clock_now(NULL) + (int64_t)WAIT_MS * 1000000;
    while (server_stat(srv, key) != want) {
        if (pconn_clock_now(NULL) > until)
            return false;
        struct timespec ms = {0, 1000000}; /* the poll's period, not a guess at a time */
        nanosleep(&ms, NULL);
    }
    return true;
}

/* A raw peer after its handshake with the server at address, or NULL. */
static pconn_conn_t *raw_hello(const char *address)
{
    pconn_conn_t *c = NULL;
    unsigned char hello[16];
    if (pconn_tcp_connect(NULL, address, &c, NULL) != PCONN_OK)
        return NULL;
    if (send(pconn_tcp_fd(c), good_hello, sizeof good_hello, MSG_NOSIGNAL) != (ssize_t)sizeof good_hello ||
        recv(pconn_tcp_fd(c), hello, sizeof hello, MSG_WAITALL) != (ssize_t)sizeof hello) {
        pconn_conn_unref(c);
        return NULL;
    }
    return c;
}

/* The next frame from fd into f (up to size bytes, length included) skipping
 * heartbeats when asked: its type, or -1. */
static int raw_frame(int fd, unsigned char *f, size_t size, bool skip_heartbeats)
{
    for (;;) {
        if (recv(fd, f, 8, MSG_WAITALL) != 8)
            return -1;
        size_t n = 0;
        for (int k = 0; k < 8; k++)
            n = n << 8 | f[k];
        if (n == 0 || n > size - 8 || recv(fd, f + 8, n, MSG_WAITALL) != (ssize_t)n)
            return -1;
        if (!skip_heartbeats || f[8] != 2)
            return f[8];
    }
}

/* One echo of "x" by a raw peer: true when its answer came. */
static bool raw_echo(pconn_conn_t *c)
{
    size_t len;
    unsigned char *q = queries(1, "echo", &len), f[64];
    bool sent = send(pconn_tcp_fd(c), q, len, MSG_NOSIGNAL) == (ssize_t)len;
    free(q);
    return sent && raw_frame(pconn_tcp_fd(c), f, sizeof f, true) == 4 && f[21] == 'x';
}

/* An idle connection has no thread: 20 peers that each made a call and went quiet are
 * parked with the accepting thread (the server's threads are as before they came), and
 * each gets its next answer as before. */
#define IDLE_PEERS 20
static void test_idle_connections_park(void)
{
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_t *srv = server(impls, LIMIT);
    CU_ASSERT_PTR_NOT_NULL_FATAL(srv);
    const char *address = pconn_rpc_server_address(srv);
    int before = thread_count();
    pconn_conn_t *peer[IDLE_PEERS];
    for (int i = 0; i < IDLE_PEERS; i++) {
        peer[i] = raw_hello(address);
        CU_ASSERT_PTR_NOT_NULL_FATAL(peer[i]);
        CU_ASSERT(raw_echo(peer[i]));
    }
    CU_ASSERT(wait_stat(srv, "parked", IDLE_PEERS));
    CU_ASSERT(wait_stat(srv, "reading_threads", 0)); /* the spare ones waited 2 s, then went */
    CU_ASSERT(thread_count() - before < 4); /* none per connection (before: 20) */
    for (int i = 0; i < IDLE_PEERS; i++)
        CU_ASSERT(raw_echo(peer[i]));
    CU_ASSERT_EQUAL(server_stat(srv, "connections"), IDLE_PEERS);
    pconn_rpc_server_stop(srv); /* ends the parked ones too */
    for (int i = 0; i < IDLE_PEERS; i++) {
        unsigned char f[64];
        CU_ASSERT_EQUAL(raw_frame(pconn_tcp_fd(peer[i]), f, sizeof f, true), -1); /* the end */
        pconn_conn_unref(peer[i]);
    }
    pconn_rpc_impls_free(impls);
}

/* A parked connection keeps its heartbeats with no thread: the server's go on coming,
 * the peer's keep it open without waking a thread, and when the peer goes silent the
 * server says "heartbeat timeout" in a CLOSE and hangs up. */
static void test_parked_connection_heartbeats(void)
{
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .heartbeat = {.timeout_ms = 1000, .send_every_ms = 50}};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    pconn_conn_t *peer = raw_hello(pconn_rpc_server_address(srv));
    CU_ASSERT_PTR_NOT_NULL_FATAL(peer);
    int fd = pconn_tcp_fd(peer);
    CU_ASSERT(raw_echo(peer));
    CU_ASSERT(wait_stat(srv, "parked", 1));
    unsigned char f[512];
    static const unsigned char hb[9] = {0, 0, 0, 0, 0, 0, 0, 1, 2};
    for (int i = 0; i < 30; i++) { /* 1.5 s of the server's heartbeats, each answered */
        CU_ASSERT_EQUAL_FATAL(raw_frame(fd, f, sizeof f, false), 2);
        CU_ASSERT_EQUAL(send(fd, hb, sizeof hb, MSG_NOSIGNAL), (ssize_t)sizeof hb);
    }
    CU_ASSERT_EQUAL(server_stat(srv, "parked"), 1);
    CU_ASSERT_EQUAL(server_stat(srv, "connections"), 1);
    CU_ASSERT_EQUAL(raw_frame(fd, f, sizeof f, true), 5); /* CLOSE, */
    CU_ASSERT_EQUAL(f[12], PCONN_ETIMEDOUT);                /* its code's low byte */
    CU_ASSERT(memmem(f, sizeof f, "heartbeat timeout", 17) != NULL);
    CU_ASSERT_EQUAL(raw_frame(fd, f, sizeof f, true), -1);
    CU_ASSERT(wait_stat(srv, "connections", 0));
    CU_ASSERT_EQUAL(server_stat(srv, "parked"), 0);
    pconn_conn_unref(peer);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
}

/* A query that comes to a parked connection together with the end of the stream is
 * answered, as it is on a connection with a reading thread (review finding: the parked
 * connection was failed at the end of the stream, and the query dropped). */
static void test_parked_query_then_fin(void)
{
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_t *srv = server(impls, LIMIT);
    CU_ASSERT_PTR_NOT_NULL_FATAL(srv);
    pconn_conn_t *peer = raw_hello(pconn_rpc_server_address(srv));
    CU_ASSERT_PTR_NOT_NULL_FATAL(peer);
    CU_ASSERT(raw_echo(peer));
    CU_ASSERT(wait_stat(srv, "parked", 1));
    size_t len;
    unsigned char *q = queries(1, "echo", &len), f[64];
    CU_ASSERT_EQUAL(send(pconn_tcp_fd(peer), q, len, MSG_NOSIGNAL), (ssize_t)len);
    free(q);
    shutdown(pconn_tcp_fd(peer), SHUT_WR);
    CU_ASSERT_EQUAL(raw_frame(pconn_tcp_fd(peer), f, sizeof f, true), 4); /* the answer */
    CU_ASSERT_EQUAL(f[21], 'x');
    pconn_conn_unref(peer);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
}

/* max_connections: the peer over the limit is told why, in its handshake's error. */
static void test_max_connections(void)
{
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .max_connections = 1};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    recorder_t ra, rb;
    rec_init(&ra);
    rec_init(&rb);
    pconn_rpc_options_t oa = client_options(&ra, &address, 1), ob = client_options(&rb, &address, 1);
    pconn_t *a = NULL, *b = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&oa, &a), PCONN_OK);
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(a, "echo", 1, "a", 1, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_buf_free(&resp);
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&ob, &b), PCONN_OK);
    int i = rec_wait_kind(&rb, PCONN_EVENT_FAILED_TO_CONNECT, 0, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    rec_event_t f = rec_get(&rb, i);
    CU_ASSERT_EQUAL(f.error.code, PCONN_EHANDSHAKE);
    char want[200];
    snprintf(want, sizeof want, "rpc %s: handshake: refused by the peer: too many connections (limit 1)",
             address);
    CU_ASSERT_STRING_EQUAL(f.error.message, want);
    pconn_free(a); /* a place comes free: b gets in */
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(b, "echo", 1, "b", 1, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_buf_free(&resp);
    pconn_free(b);
    rec_destroy(&ra);
    rec_destroy(&rb);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
}

/* In a child process of its own (its descriptor limit is lowered): the CPU the server
 * burns in 300 ms while every accept fails with EMFILE. 0 when it waited, else 1. */
static int emfile_child(void)
{
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new(); /* no CUnit here: a process of its own */
    pconn_rpc_impls_add(impls, "echo", 1, h_echo, NULL);
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls};
    pconn_rpc_server_t *srv = NULL;
    if (pconn_rpc_server_start(&so, &srv, NULL) != PCONN_OK)
        return 2;
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    const char *address = pconn_rpc_server_address(srv);
    int port = atoi(strrchr(address, ':') + 1);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    memcpy(&ss, &sin, sizeof sin);
    len = sizeof sin;
    int peers[8];
    for (int i = 0; i < 8; i++)
        peers[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct rlimit old, low;
    getrlimit(RLIMIT_NOFILE, &old);
    low = old;
    low.rlim_cur = (rlim_t)count_open_fds(); /* not one descriptor to spare */
    setrlimit(RLIMIT_NOFILE, &low);
    for (int i = 0; i < 8; i++)
        connect(peers[i], (struct sockaddr *)&ss, len);
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    struct timespec window = {0, 300000000};
    nanosleep(&window, NULL); /* the measuring window, not a wait for an event */
    getrusage(RUSAGE_SELF, &r1);
    long cpu_ms = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec + r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) * 1000 +
                  (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec + r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) / 1000;
    setrlimit(RLIMIT_NOFILE, &old);
    for (int i = 0; i < 8; i++)
        close(peers[i]);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
    if (cpu_ms >= 100)
        fprintf(stderr, "[%ld ms of CPU in 300 ms out of descriptors] ", cpu_ms);
    return cpu_ms < 100 ? 0 : 1;
}

/* Defect 6: out of descriptors, the acceptor does not spin (it took a whole core). */
static void test_emfile_does_not_spin(void)
{
    /* A fresh process (this program, exec'd), not a fork of this threaded one: starting
     * threads after a multithreaded fork() can deadlock the sanitizers' runtimes. */
    fflush(NULL);
    pid_t pid = fork();
    CU_ASSERT_FATAL(pid >= 0);
    if (pid == 0) {
        execl("/proc/self/exe", "test_rpc", "--emfile-child", (char *)NULL);
        _exit(127);
    }
    int status = -1;
    CU_ASSERT_EQUAL(waitpid(pid, &status, 0), pid);
    CU_ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* ---- sending under a deadline (issue 9, defects 3 and 11) ------------------------- */

/* A heartbeat every 20 ms and nothing read ever again: alive, but deaf. */
static void deaf(raw_peer_t *p, int fd)
{
    static const unsigned char hb[9] = {0, 0, 0, 0, 0, 0, 0, 1, 2};
    while (!atomic_load(&p->stop) && send(fd, hb, sizeof hb, MSG_NOSIGNAL) == (ssize_t)sizeof hb) {
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, NULL); /* the heartbeat's period */
    }
}

/* Defect 3: a call's timeout covers sending. To a peer that keeps its heartbeats coming
 * but never reads, a 32 MiB request with a 300 ms timeout fails with PCONN_ETIMEDOUT
 * and says so. Before: it blocked until TCP_USER_TIMEOUT (30 s) and failed with
 * "connection closed by peer". */
/* Reads one QUERY frame and its id; false at the end of the stream or on another frame. */
static bool recv_query_id(int fd, uint64_t *id)
{
    unsigned char len8[8];
    if (recv(fd, len8, 8, MSG_WAITALL) != 8)
        return false;
    uint64_t n = 0;
    for (int i = 0; i < 8; i++)
        n = n << 8 | len8[i];
    if (n < 9 || n > 4096)
        return false;
    unsigned char p[4096];
    if (recv(fd, p, n, MSG_WAITALL) != (ssize_t)n || p[0] != 3)
        return false;
    *id = 0;
    for (int i = 1; i < 9; i++)
        *id = *id << 8 | p[i];
    return true;
}

/* A RESPONSE frame with status 0 and data; its length. */
static size_t response_frame(unsigned char *f, uint64_t id, const char *data)
{
    size_t dlen = strlen(data), n = 1 + 8 + 4 + dlen;
    for (int i = 0; i < 8; i++)
        f[i] = (unsigned char)(n >> (56 - 8 * i));
    f[8] = 4;
    for (int i = 0; i < 8; i++)
        f[9 + i] = (unsigned char)(id >> (56 - 8 * i));
    memset(f + 17, 0, 4);
    memcpy(f + 21, data, dlen);
    return 8 + n;
}

/* Answers the first call with the first 10 bytes of its answer, and the rest only after
 * the second call came (its caller gave up in between), then the second's answer. */
static void half_answer(raw_peer_t *p, int fd)
{
    (void)p;
    uint64_t id1, id2;
    unsigned char f1[64], f2[64];
    if (!recv_query_id(fd, &id1))
        return;
    size_t n1 = response_frame(f1, id1, "late");
    send(fd, f1, 10, MSG_NOSIGNAL);
    if (!recv_query_id(fd, &id2))
        return;
    size_t n2 = response_frame(f2, id2, "second");
    send(fd, f1 + 10, n1 - 10, MSG_NOSIGNAL);
    send(fd, f2, n2, MSG_NOSIGNAL);
    char sink[64];
    while (recv(fd, sink, sizeof sink, 0) > 0)
        ;
}

/* A caller reading for everyone (leader/follower) whose deadline passes in the middle
 * of a frame leaves with PCONN_ETIMEDOUT, and the stream stays whole: the next call
 * finds the rest of that frame and its own answer after it. */
static void test_leader_leaves_mid_frame(void)
{
    raw_peer_t d;
    raw_peer_start(&d, half_answer);
    recorder_t rec;
    rec_init(&rec);
    const char *list[] = {d.address};
    pconn_rpc_options_t o = client_options(&rec, list, 1);
    pconn_t *pc = NULL;
    pconn_conn_t *conn = connected_client(&o, &pc);
    pconn_buf_t resp;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "first", 1, "a", 1, &resp, 200, &err), PCONN_ETIMEDOUT);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "first version 1: no answer within 200 ms"));
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "second", 1, "b", 1, &resp, WAIT_MS, &err), PCONN_OK);
    CU_ASSERT(resp.len == 6 && memcmp(resp.data, "second", 6) == 0);
    pconn_buf_free(&resp);
    CU_ASSERT_FALSE(pconn_conn_is_closed(conn));
    pconn_conn_unref(conn);
    pconn_free(pc);
    raw_peer_stop(&d);
    rec_destroy(&rec);
}

typedef struct mixed_t {
    pthread_t thread;
    pconn_conn_t *conn;
    int bad;
} mixed_t;

/* Calls with answers smaller and larger than the read buffer, each checked. */
static void *mixed_main(void *arg)
{
    mixed_t *m = arg;
    static const size_t sizes[] = {1, 70000, 5, 1 << 20, 65536 - 21, 65536 - 20, 300};
    for (int round = 0; round < 3; round++) {
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
            char text[32];
            int len = snprintf(text, sizeof text, "%zu", sizes[k]);
            pconn_buf_t resp;
            if (pconn_rpc_call(m->conn, "bytes", 1, text, (size_t)len, &resp, WAIT_MS, NULL) != PCONN_OK ||
                resp.len != sizes[k])
                m->bad++;
            pconn_buf_free(&resp);
        }
    }
    return NULL;
}

/* Many callers on one connection, answers of every size at once: whoever reads (a
 * caller, or the watcher for frames over the read buffer) keeps the stream whole. */
static void test_mixed_sizes_many_threads(void)
{
    fixture_t f;
    setup(&f);
    mixed_t m[8];
    for (int i = 0; i < 8; i++) {
        m[i] = (mixed_t){.conn = f.conn};
        pthread_create(&m[i].thread, NULL, mixed_main, &m[i]);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(m[i].thread, NULL);
        CU_ASSERT_EQUAL(m[i].bad, 0);
    }
    CU_ASSERT_FALSE(pconn_conn_is_closed(f.conn));
    teardown(&f);
}

static void test_call_timeout_covers_sending(void)
{
    pconn_error_t err;
    raw_peer_t d;
    raw_peer_start(&d, deaf);
    const char *address = d.address;
    recorder_t rec;
    rec_init(&rec);
    const char *list[] = {address};
    pconn_rpc_options_t o = client_options(&rec, list, 1);
    o.max_message_size = 64 << 20;
    pconn_t *pc = NULL;
    pconn_conn_t *conn = connected_client(&o, &pc);
    size_t big = 32u << 20;
    char *req = calloc(1, big);
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "echo", 1, req, big, &resp, 300, &err), PCONN_ETIMEDOUT);
    char want[200];
    snprintf(want, sizeof want, "rpc %s: echo version 1: could not send within 300 ms", address);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, want));
    /* Half a frame went out: the connection is closed, and says why. */
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "echo", 1, "x", 1, &resp, WAIT_MS, &err), PCONN_EIO);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "a request left half-sent after 300 ms: the peer does not read"));
    free(req);
    pconn_conn_unref(conn);
    pconn_free(pc);
    raw_peer_stop(&d);
    rec_destroy(&rec);
}

static pthread_mutex_t t0_mutex = PTHREAD_MUTEX_INITIALIZER;
static char t0_warning[256];

static void t0_log(int level, const char *message, void *arg)
{
    (void)level, (void)arg;
    pthread_mutex_lock(&t0_mutex);
    if (t0_warning[0] == '\0')
        snprintf(t0_warning, sizeof t0_warning, "%s", message);
    pthread_mutex_unlock(&t0_mutex);
}

/* Calls with timeout 0 still read: a caller past its deadline takes what has arrived
 * (and so does one whose request could not go out), so the answers of abandoned calls
 * do not pile up until the server, blocked writing them, gives the connection up.
 * 400,000 calls of 1 KiB answers (far more than the socket buffers hold) against a
 * server that gives up on a peer reading nothing for 1 s. Before: nothing read the
 * answers; the server stopped reading and the client's requests went out cut (4 runs
 * in 4 on a362fbd). The server's 1 s is also its heartbeat timeout: a client starved of
 * CPU that long (a loaded machine) is closed for that instead, which is not what this
 * test is about; then only the first check holds. */
static void test_timeout_zero_calls(void)
{
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .heartbeat = {.timeout_ms = 1000}, .on_log = t0_log};
    pconn_rpc_server_t *srv = NULL;
    t0_warning[0] = '\0';
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    pconn_t *pc = NULL;
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    int other = 0;
    for (int i = 0; i < 400000 && other == 0; i++) {
        pconn_buf_t resp;
        int rc = pconn_rpc_call(conn, "bytes", 1, "1024", 4, &resp, 0, NULL);
        if (rc == PCONN_OK)
            pconn_buf_free(&resp);
        else if (rc != PCONN_ETIMEDOUT)
            other++;
    }
    pconn_buf_t resp;
    int rc = pconn_rpc_call(conn, "echo", 1, "after", 5, &resp, WAIT_MS, NULL);
    pthread_mutex_lock(&t0_mutex);
    CU_ASSERT_PTR_NULL(strstr(t0_warning, "does not read"));
    bool starved = strstr(t0_warning, "heartbeat timeout") != NULL;
    pthread_mutex_unlock(&t0_mutex);
    if (!starved) {
        CU_ASSERT_EQUAL(other, 0);
        CU_ASSERT_EQUAL(rc, PCONN_OK);
        CU_ASSERT(rc == PCONN_OK && resp.len == 5 && memcmp(resp.data, "after", 5) == 0);
    }
    pconn_buf_free(&resp);
    pconn_conn_unref(conn);
    pconn_free(pc);
    rec_destroy(&rec);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
}

/* After the client's first query: queries for a method the client does not have, as
 * fast as the socket takes them, reading nothing. */
static void deaf_asker(raw_peer_t *p, int fd)
{
    unsigned char first[64];
    if (recv(fd, first, sizeof first, 0) <= 0)
        return;
    size_t len;
    unsigned char *q = queries(1000, "nope", &len);
    while (!atomic_load(&p->stop) && send(fd, q, len, MSG_NOSIGNAL) == (ssize_t)len)
        ;
    free(q);
}

/* A peer that floods the client with queries and never reads the answers: a call still
 * ends at its own timeout, with PCONN_ETIMEDOUT. Before: the calling thread, reading for
 * everyone, wrote those answers ("no such method") itself, with the heartbeat timeout
 * as its deadline: a 300 ms call took the whole 10 s. */
static void test_call_deadline_against_deaf_asker(void)
{
    raw_peer_t d;
    raw_peer_start(&d, deaf_asker);
    int small = 4096;
    setsockopt(d.lfd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    recorder_t rec;
    rec_init(&rec);
    const char *list[] = {d.address};
    pconn_rpc_options_t o = client_options(&rec, list, 1);
    o.heartbeat.timeout_ms = 10000;
    pconn_t *pc = NULL;
    pconn_conn_t *conn = connected_client(&o, &pc);
    pconn_buf_t resp;
    pconn_error_t err;
    int64_t t0 = pconn_clock_now(NULL);
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "echo", 1, "x", 1, &resp, 300, &err), PCONN_ETIMEDOUT);
    CU_ASSERT((pconn_clock_now(NULL) - t0) / 1000000 < 5000); /* half the heartbeat timeout */
    pconn_conn_unref(conn);
    pconn_free(pc);
    raw_peer_stop(&d);
    rec_destroy(&rec);
}

typedef struct timed_call_t {
    pthread_t thread;
    pconn_conn_t *conn;
    int64_t timeout_ms, took_ms;
    int rc;
} timed_call_t;

static void *timed_call_main(void *arg)
{
    timed_call_t *t = arg;
    size_t big = 1 << 20;
    char *req = calloc(1, big);
    pconn_buf_t resp;
    int64_t t0 = pconn_clock_now(NULL);
    t->rc = pconn_rpc_call(t->conn, "echo", 1, req, big, &resp, t->timeout_ms, NULL);
    t->took_ms = (pconn_clock_now(NULL) - t0) / 1000000;
    pconn_buf_free(&resp);
    free(req);
    return NULL;
}

/* Writers queued behind one another keep their own deadlines: 8 callers send 1 MiB
 * each to a peer that never reads, with timeouts of 100 to 800 ms; each returns by its
 * own (a second of slack for slow builds), with PCONN_ETIMEDOUT, or PCONN_EIO once a
 * request cut at its deadline has closed the connection. */
static void test_queued_writers_keep_deadlines(void)
{
    raw_peer_t d;
    raw_peer_start(&d, deaf);
    recorder_t rec;
    rec_init(&rec);
    const char *list[] = {d.address};
    pconn_rpc_options_t o = client_options(&rec, list, 1);
    pconn_t *pc = NULL;
    pconn_conn_t *conn = connected_client(&o, &pc);
    timed_call_t t[8];
    for (int i = 0; i < 8; i++) {
        t[i] = (timed_call_t){.conn = conn, .timeout_ms = 100 * (i + 1)};
        pthread_create(&t[i].thread, NULL, timed_call_main, &t[i]);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(t[i].thread, NULL);
        CU_ASSERT(t[i].rc == PCONN_ETIMEDOUT || t[i].rc == PCONN_EIO);
        CU_ASSERT(t[i].took_ms < t[i].timeout_ms + 1000);
    }
    pconn_conn_unref(conn);
    pconn_free(pc);
    raw_peer_stop(&d);
    rec_destroy(&rec);
}

typedef struct crowd_t {
    pthread_t thread;
    pconn_conn_t *conn;
    int ok;
} crowd_t;

static void *crowd_main(void *arg)
{
    crowd_t *t = arg;
    for (int i = 0; i < 100; i++) {
        pconn_buf_t resp;
        if (pconn_rpc_call(t->conn, "echo", 1, "crowd", 5, &resp, WAIT_MS, NULL) == PCONN_OK)
            t->ok++;
        pconn_buf_free(&resp);
    }
    return NULL;
}

/* More writers at once than a writer wakes in one go (64): the next writer is never
 * left asleep. Review finding: with 200 callers a writer that finished a batch of 64
 * sleepers did not wake the head of the queue, and every writer behind it waited out
 * its timeout on a writable socket (forever with PCONN_FOREVER). */
#define CROWD 200
static void test_crowd_of_writers(void)
{
    fixture_t f;
    setup(&f);
    static crowd_t t[CROWD];
    for (int i = 0; i < CROWD; i++) {
        t[i] = (crowd_t){.conn = f.conn};
        CU_ASSERT_EQUAL_FATAL(pthread_create(&t[i].thread, NULL, crowd_main, &t[i]), 0);
    }
    int ok = 0;
    for (int i = 0; i < CROWD; i++) {
        pthread_join(t[i].thread, NULL);
        ok += t[i].ok;
    }
    CU_ASSERT_EQUAL(ok, CROWD * 100);
    teardown(&f);
}

/* ---- pipelining for one thread: pconn_rpc_call_many ----------------------------- */

/* 16 calls in one batch through a counting transport: one write carries them all, and
 * each gets its own answer. */
static void test_call_many_one_write(void)
{
    static const pconn_transport_t ct = {.open = ct_open, .handshake = ct_handshake,
                                         .read = ct_read, .write = ct_write, .close = ct_close,
                                         .arg = &counts};
    static const pconn_transport_t sct = {.open = ct_open, .handshake = ct_handshake,
                                          .read = ct_read, .write = ct_write, .close = ct_close,
                                          .arg = &scounts};
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .transport = &sct};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    o.transport = &ct;
    pconn_t *pc = NULL;
    pconn_conn_t *conn = connected_client(&o, &pc);
    pconn_rpc_call_t calls[16];
    char reqs[16][16];
    for (int i = 0; i < 16; i++) {
        int n = snprintf(reqs[i], sizeof reqs[i], "call %d", i);
        calls[i] = (pconn_rpc_call_t){.name = "echo", .version = 1, .req = reqs[i], .req_len = (size_t)n};
    }
    long writes = atomic_load(&counts.writes);
    CU_ASSERT_EQUAL(pconn_rpc_call_many(conn, calls, 16, WAIT_MS), PCONN_OK);
    CU_ASSERT_EQUAL(atomic_load(&counts.writes) - writes, 1);
    for (int i = 0; i < 16; i++) {
        CU_ASSERT_EQUAL(calls[i].status, PCONN_OK);
        CU_ASSERT(calls[i].resp.len == strlen(reqs[i]) && memcmp(calls[i].resp.data, reqs[i], calls[i].resp.len) == 0);
        pconn_buf_free(&calls[i].resp);
    }
    CU_ASSERT_EQUAL(pconn_rpc_call_many(conn, NULL, 0, WAIT_MS), PCONN_OK);
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
    rec_destroy(&rec);
}

/* Each call has its own outcome: not sent (bad name), refused by the handler, no answer
 * in time, answered; the batch returns the first failure in order. */
static void test_call_many_outcomes(void)
{
    fixture_t f;
    setup(&f);
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(f.pc, WAIT_MS, &conn), PCONN_OK);
    gate_set(false);
    pconn_rpc_call_t calls[4] = {
        {.name = "echo", .version = 1, .req = "a", .req_len = 1},
        {.name = "", .version = 1},
        {.name = "fail", .version = 1, .req = "7", .req_len = 1},
        {.name = "slow", .version = 1, .req = "s", .req_len = 1},
    };
    CU_ASSERT_EQUAL(pconn_rpc_call_many(conn, calls, 4, 300), PCONN_EINVAL);
    CU_ASSERT_EQUAL(calls[0].status, PCONN_OK);
    CU_ASSERT(calls[0].resp.len == 1 && ((const char *)calls[0].resp.data)[0] == 'a');
    CU_ASSERT_EQUAL(calls[1].status, PCONN_EINVAL);
    CU_ASSERT_STRING_EQUAL(calls[1].err.message, "pconn_rpc_call: name of 0 bytes (1-255)");
    CU_ASSERT_EQUAL(calls[2].status, PCONN_EREMOTE);
    CU_ASSERT_STRING_EQUAL(calls[2].err.message, "account 7 is locked");
    CU_ASSERT_EQUAL(calls[3].status, PCONN_ETIMEDOUT);
    CU_ASSERT_PTR_NOT_NULL(strstr(calls[3].err.message, "slow version 1: no answer within 300 ms"));
    CU_ASSERT_PTR_NULL(calls[3].resp.data);
    gate_set(true); /* lets the handler go */
    for (int i = 0; i < 4; i++)
        pconn_buf_free(&calls[i].resp);
    pconn_conn_unref(conn);
    teardown(&f);
}

/* ---- observability ---------------------------------------------------------------- */

typedef struct log_t {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int n;
    int level[16];
    char line[16][512];
} log_t;

static void keep_log(int level, const char *message, void *arg)
{
    log_t *l = arg;
    pthread_mutex_lock(&l->mutex);
    if (l->n < 16) {
        l->level[l->n] = level;
        snprintf(l->line[l->n], sizeof l->line[l->n], "%s", message);
        l->n++;
    }
    pthread_cond_broadcast(&l->cond);
    pthread_mutex_unlock(&l->mutex);
}

static json_int_t jint(json_t *o, const char *path1, const char *path2)
{
    json_t *v = json_object_get(o, path1);
    if (path2 != NULL)
        v = json_object_get(v, path2);
    return json_integer_value(v);
}

/* pconn_stats_json() of an RPC pconn and pconn_rpc_server_stats_json(): counters that
 * add up, parsed by a JSON parser; the server's log tells of a peer it rejected. */
static void test_stats_json_and_server_log(void)
{
    log_t log = {.mutex = PTHREAD_MUTEX_INITIALIZER};
    test_cond_init(&log.cond);
    pconn_rpc_impls_t *impls = server_impls();
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .handshake_timeout_ms = 5000, .on_log = keep_log, .on_log_arg = &log};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    recorder_t rec;
    rec_init(&rec);
    pconn_rpc_options_t o = client_options(&rec, &address, 1);
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    pconn_buf_t resp;
    for (int i = 0; i < 3; i++) {
        CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "echo", 1, "abcd", 4, &resp, WAIT_MS, NULL), PCONN_OK);
        pconn_buf_free(&resp);
    }
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "nosuch", 1, NULL, 0, &resp, WAIT_MS, NULL), PCONN_EUNIMPLEMENTED);
    char *text = pconn_stats_json(pc);
    CU_ASSERT_PTR_NOT_NULL_FATAL(text);
    json_error_t jerr;
    json_t *js = json_loads(text, 0, &jerr);
    CU_ASSERT_PTR_NOT_NULL_FATAL(js);
    CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(js, "server_name")), "rpc");
    CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(js, "state")), "connected");
    CU_ASSERT_EQUAL(jint(js, "connects", NULL), 1);
    CU_ASSERT_TRUE(json_is_null(json_object_get(js, "last_error")));
    CU_ASSERT_EQUAL(jint(js, "rpc", "calls"), 4);
    CU_ASSERT_EQUAL(jint(js, "rpc", "answered"), 3);
    CU_ASSERT_EQUAL(jint(js, "rpc", "in_flight"), 0);
    CU_ASSERT_EQUAL(jint(json_object_get(js, "rpc"), "errors", "PCONN_EUNIMPLEMENTED"), 1);
    CU_ASSERT_EQUAL(jint(js, "rpc", "bytes_in"), 12);
    json_int_t answers = 0;
    json_t *lat = json_object_get(json_object_get(js, "rpc"), "latency_us"), *bucket;
    size_t k;
    json_array_foreach(lat, k, bucket)
        answers += json_integer_value(json_array_get(bucket, 1));
    CU_ASSERT_EQUAL(answers, 3);
    json_decref(js);
    free(text);

    text = pconn_rpc_server_stats_json(srv);
    CU_ASSERT_PTR_NOT_NULL_FATAL(text);
    js = json_loads(text, 0, &jerr);
    CU_ASSERT_PTR_NOT_NULL_FATAL(js);
    CU_ASSERT_EQUAL(jint(js, "connections", NULL), 1);
    /* A handler thread may still be tidying up after its answer went out. */
    CU_ASSERT_TRUE(json_is_integer(json_object_get(js, "handlers_busy")));
    CU_ASSERT(jint(js, "handlers_busy", NULL) <= 1);
    CU_ASSERT_EQUAL(jint(js, "rpc", "served"), 3);
    json_decref(js);
    free(text);

    /* A peer that speaks HTTP: rejected, and the log says who and why. */
    static const unsigned char bad[] = {0, 0, 0, 0, 0, 0, 0, 8, 1, 'H', 'T', 'T', 'P', 1, 0, 1};
    unsigned char in[256];
    raw_exchange(address, bad, sizeof bad, in, sizeof in);
    CU_ASSERT_EQUAL(test_wait_count(&log.mutex, &log.cond, &log.n, 1, WAIT_MS), 1);
    CU_ASSERT_EQUAL(log.level[0], PCONN_LOG_WARNING);
    CU_ASSERT_PTR_NOT_NULL(strstr(log.line[0], "rejected: rpc "));
    CU_ASSERT_PTR_NOT_NULL(strstr(log.line[0], "handshake: bad magic number 0x48545450"));
    pconn_free(pc);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
    rec_destroy(&rec);
    CU_ASSERT_PTR_NULL(pconn_stats_json(NULL));
    CU_ASSERT_PTR_NULL(pconn_rpc_server_stats_json(NULL));
}

static const test_def_t tests[] = {
    {"echo_sizes", test_echo_sizes},
    {"over_the_limit", test_over_the_limit},
    {"response_over_client_limit", test_response_over_client_limit},
    {"tiny_limit", test_tiny_limit},
    {"unimplemented_and_remote_error", test_unimplemented_and_remote_error},
    {"many_threads_one_connection", test_many_threads_one_connection},
    {"slow_handler_blocks_nobody", test_slow_handler_blocks_nobody},
    {"call_timeout", test_call_timeout},
    {"slow_handler_keeps_heartbeats", test_slow_handler_keeps_heartbeats},
    {"handler_threads", test_handler_threads},
    {"server_stop_fails_calls_in_flight", test_server_stop_fails_calls_in_flight},
    {"stop_closes_all_first", test_stop_closes_all_first},
    {"server_calls_client", test_server_calls_client},
    {"dispatch_and_bind", test_dispatch_and_bind},
    {"transport", test_transport},
    {"200_clients", test_200_clients},
    {"wrong_magic", test_wrong_magic},
    {"no_common_version_and_silent_server", test_no_common_version_and_silent_server},
    {"bad_frames_from_server", test_bad_frames_from_server},
    {"bad_frames_to_server", test_bad_frames_to_server},
    {"protocol_doc_example", test_protocol_doc_example},
    {"unix_socket_server", test_unix_socket_server},
    {"server_killed_calls_fail_and_failover", test_server_killed_calls_fail_and_failover},
    {"stopped_server_heartbeat", test_stopped_server_heartbeat},
    {"failover_retry_does_not_spin", test_failover_retry_does_not_spin},
    {"query_flood_then_stop", test_query_flood_then_stop},
    {"stop_skips_queued_queries", test_stop_skips_queued_queries},
    {"held_connection_outlives_client", test_held_connection_outlives_client},
    {"free_from_client_handler", test_free_from_client_handler},
    {"close_interrupts_handshake", test_close_interrupts_handshake},
    {"stop_with_silent_peer", test_stop_with_silent_peer},
    {"timeout_zero_calls", test_timeout_zero_calls},
    {"crowd_of_writers", test_crowd_of_writers},
    {"queued_writers_keep_deadlines", test_queued_writers_keep_deadlines},
    {"call_deadline_against_deaf_asker", test_call_deadline_against_deaf_asker},
    {"silent_peers_cost_no_thread", test_silent_peers_cost_no_thread},
    {"idle_connections_park", test_idle_connections_park},
    {"parked_connection_heartbeats", test_parked_connection_heartbeats},
    {"parked_query_then_fin", test_parked_query_then_fin},
    {"max_connections", test_max_connections},
    {"emfile_does_not_spin", test_emfile_does_not_spin},
    {"call_timeout_covers_sending", test_call_timeout_covers_sending},
    {"leader_leaves_mid_frame", test_leader_leaves_mid_frame},
    {"mixed_sizes_many_threads", test_mixed_sizes_many_threads},
    {"call_many_one_write", test_call_many_one_write},
    {"call_many_outcomes", test_call_many_outcomes},
    {"stats_json_and_server_log", test_stats_json_and_server_log},
    {"heartbeat_forever", test_heartbeat_forever},
    {"bad_options", test_bad_options},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    /* SIGPIPE keeps its default: a write of the library that raised it would end us. */
    if (argc == 2 && strcmp(argv[1], "--emfile-child") == 0)
        return emfile_child();
    return run_suite("rpc", tests, argc, argv);
}
