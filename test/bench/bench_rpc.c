/* bench_rpc.c - RPC round trip and throughput against raw-socket ping-pong and ZeroMQ
 * REQ/REP, all measured in this run on loopback. */
#include "bench.h"
#include "pconn_rpc.h"
#include "pconn_tcp.h"
#include "pconn_tls.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <dirent.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <nng/nng.h>
#include <nng/protocol/reqrep0/rep.h>
#include <nng/protocol/reqrep0/req.h>
#include <zmq.h>

#define MSG 64
#define ROUNDS 20000

static int h_echo(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    return pconn_buf_append(resp, req, len);
}

/* ---- raw ping-pong: a thread echoing 64-byte messages over loopback TCP ----------- */

static int recv_all(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, 0);
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void *raw_echo_main(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char buf[MSG];
    while (recv_all(fd, buf, MSG) == 0)
        if (send(fd, buf, MSG, MSG_NOSIGNAL) != MSG)
            break;
    close(fd);
    return NULL;
}

/* A connected pair over loopback TCP, the far end echoed by a new thread. */
static int raw_pair(pthread_t *echoer)
{
    pconn_error_t err;
    int lfd = pconn_tcp_listen("127.0.0.1:0", 16, &err);
    char address[64];
    pconn_tcp_local_address(lfd, address, sizeof address);
    pconn_conn_t *c = NULL;
    pconn_tcp_options_t o = {.nodelay = true};
    pconn_tcp_connect(&o, address, &c, &err);
    int fd = dup(pconn_tcp_fd(c));
    pconn_conn_unref(c);
    int a = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    int one = 1;
    setsockopt(a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    close(lfd);
    pthread_create(echoer, NULL, raw_echo_main, (void *)(intptr_t)a);
    return fd;
}

static void raw_roundtrips(int fd, int64_t *t, int n)
{
    char buf[MSG] = {0};
    for (int i = 0; i < n; i++) {
        int64_t t0 = bench_now_ns();
        send(fd, buf, MSG, MSG_NOSIGNAL);
        recv_all(fd, buf, MSG);
        t[i] = bench_now_ns() - t0;
    }
}

/* ---- zeromq REQ/REP --------------------------------------------------------------- */

static void *zmq_rep_main(void *arg)
{
    void *rep = arg;
    char buf[MSG];
    for (;;) {
        int n = zmq_recv(rep, buf, sizeof buf, 0);
        if (n < 0 || zmq_send(rep, buf, (size_t)n, 0) < 0)
            break;
    }
    return NULL;
}

static double zmq_median(int n)
{
    void *ctx = zmq_ctx_new();
    void *rep = zmq_socket(ctx, ZMQ_REP), *req = zmq_socket(ctx, ZMQ_REQ);
    zmq_bind(rep, "tcp://127.0.0.1:*");
    char endpoint[128];
    size_t len = sizeof endpoint;
    zmq_getsockopt(rep, ZMQ_LAST_ENDPOINT, endpoint, &len);
    zmq_connect(req, endpoint);
    pthread_t t;
    pthread_create(&t, NULL, zmq_rep_main, rep);
    int64_t *lat = calloc((size_t)n, sizeof *lat);
    char buf[MSG] = {0};
    for (int i = 0; i < n; i++) {
        int64_t t0 = bench_now_ns();
        zmq_send(req, buf, MSG, 0);
        zmq_recv(req, buf, MSG, 0);
        lat[i] = bench_now_ns() - t0;
    }
    double m = bench_percentile(lat, (size_t)n, 50);
    free(lat);
    zmq_close(req);
    zmq_ctx_shutdown(ctx); /* the REP thread's recv fails: it ends */
    pthread_join(t, NULL);
    zmq_close(rep);
    zmq_ctx_term(ctx);
    return m;
}

/* ---- libpconn ------------------------------------------------------------------- */

typedef struct rig_t {
    pconn_tls_config_t *tls_server, *tls_client; /* both NULL: plain TCP */
    pconn_rpc_impls_t *impls;
    pconn_rpc_server_t *srv;
    pconn_t *pc;
    pconn_conn_t *conn;
} rig_t;

/* A server and a client connected to it; over TLS when tls_dir is set (certificates
 * made by test/tls-certs.sh). */
static void rig_up_tls(rig_t *r, const char *tls_dir, int resume, int64_t (*retry)(void *, unsigned))
{
    memset(r, 0, sizeof *r);
    if (tls_dir != NULL) {
        char ca[300], cert[300], key[300];
        snprintf(ca, sizeof ca, "%s/ca.pem", tls_dir);
        snprintf(cert, sizeof cert, "%s/server.pem", tls_dir);
        snprintf(key, sizeof key, "%s/server.key", tls_dir);
        pconn_tls_options_t so = {.cert_file = cert, .key_file = key}, co = {.ca_file = ca};
        co.no_session_resumption = !resume;
        if (pconn_tls_config_new(&so, 1, &r->tls_server, NULL) != PCONN_OK ||
            pconn_tls_config_new(&co, 0, &r->tls_client, NULL) != PCONN_OK)
            abort();
    }
    r->impls = pconn_rpc_impls_new();
    pconn_rpc_impls_add(r->impls, "echo", 1, h_echo, NULL);
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = r->impls,
                                     .tls = r->tls_server};
    pconn_rpc_server_start(&so, &r->srv, NULL);
    const char *address = pconn_rpc_server_address(r->srv);
    pconn_rpc_options_t o = {.base = {.server_name = "bench", .resolver = pconn_resolver_static(&address, 1),
                                      .retry_delay = retry},
                             .tls = r->tls_client};
    pconn_rpc_create(&o, &r->pc);
    if (pconn_connected(r->pc, 10000, &r->conn) != PCONN_OK)
        abort();
}

static void rig_up(rig_t *r)
{
    rig_up_tls(r, NULL, 0, NULL);
}

static void rig_down(rig_t *r)
{
    pconn_conn_unref(r->conn);
    pconn_free(r->pc);
    pconn_rpc_server_stop(r->srv);
    pconn_rpc_impls_free(r->impls);
    pconn_tls_config_unref(r->tls_server);
    pconn_tls_config_unref(r->tls_client);
}

static void bench_roundtrip(void)
{
    rig_t r;
    rig_up(&r);
    char req[MSG] = {0};
    int64_t *lat = calloc(ROUNDS, sizeof *lat);
    for (int i = 0; i < ROUNDS; i++) {
        pconn_buf_t resp;
        int64_t t0 = bench_now_ns();
        pconn_rpc_call(r.conn, "echo", 1, req, MSG, &resp, 10000, NULL);
        lat[i] = bench_now_ns() - t0;
        pconn_buf_free(&resp);
    }
    double med = bench_percentile(lat, ROUNDS, 50), p99 = bench_percentile(lat, ROUNDS, 99);
    rig_down(&r);
    int64_t *rpc_lat = malloc(ROUNDS * sizeof *rpc_lat);
    memcpy(rpc_lat, lat, ROUNDS * sizeof *rpc_lat); /* sorted by bench_percentile */

    pthread_t echoer;
    int fd = raw_pair(&echoer);
    raw_roundtrips(fd, lat, ROUNDS);
    shutdown(fd, SHUT_RDWR);
    close(fd);
    pthread_join(echoer, NULL);
    double raw_med = bench_percentile(lat, ROUNDS, 50), raw_p99 = bench_percentile(lat, ROUNDS, 99);
    bench_data_cdf("rpc_roundtrip.dat", rpc_lat, lat, ROUNDS);
    free(rpc_lat);
    free(lat);
    double zmq = zmq_median(ROUNDS);

    bench_report("rpc_roundtrip_median", med / 1000, "us", raw_med / 1000,
                 "ratio <= 1.1 (vs raw socket ping-pong)", med <= 1.1 * raw_med);
    bench_report("rpc_roundtrip_p99", p99 / 1000, "us", raw_p99 / 1000, "(reported)", true);
    bench_report("rpc_roundtrip_vs_zeromq", med / 1000, "us", zmq / 1000,
                 "ratio <= 0.5 (vs ZeroMQ REQ/REP)", med <= 0.5 * zmq);
}

typedef struct worker_t {
    pthread_t thread;
    pconn_conn_t *conn; /* rpc */
    int fd;             /* raw */
    int64_t until_ns;
    uint64_t calls;
} worker_t;

static void *rpc_worker(void *arg)
{
    worker_t *w = arg;
    char req[MSG] = {0};
    while (bench_now_ns() < w->until_ns) {
        pconn_buf_t resp;
        if (pconn_rpc_call(w->conn, "echo", 1, req, MSG, &resp, 10000, NULL) == PCONN_OK)
            w->calls++;
        pconn_buf_free(&resp);
    }
    return NULL;
}

static void *raw_worker(void *arg)
{
    worker_t *w = arg;
    char buf[MSG] = {0};
    while (bench_now_ns() < w->until_ns) {
        if (send(w->fd, buf, MSG, MSG_NOSIGNAL) != MSG || recv_all(w->fd, buf, MSG) != 0)
            break;
        w->calls++;
    }
    return NULL;
}

/* One thread, 16 calls outstanding: batches of 16 through pconn_rpc_call_many(). */
static double pipelined_rate(int seconds)
{
    rig_t r;
    rig_up(&r);
    char req[MSG] = {0};
    pconn_rpc_call_t calls[16];
    uint64_t done = 0;
    int64_t t0 = bench_now_ns(), until = t0 + (int64_t)seconds * 1000000000;
    while (bench_now_ns() < until) {
        for (int i = 0; i < 16; i++)
            calls[i] = (pconn_rpc_call_t){.name = "echo", .version = 1, .req = req, .req_len = MSG};
        pconn_rpc_call_many(r.conn, calls, 16, 10000);
        for (int i = 0; i < 16; i++) {
            done += calls[i].status == PCONN_OK;
            pconn_buf_free(&calls[i].resp);
        }
    }
    double rate = (double)done / ((double)(bench_now_ns() - t0) / 1e9);
    rig_down(&r);
    return rate;
}

/* 16 threads calling on one connection (over TLS when tls_dir is set) for seconds. */
static double threads_rate(const char *tls_dir, int seconds)
{
    enum { T = 16 };
    rig_t r;
    rig_up_tls(&r, tls_dir, 1, NULL);
    worker_t w[T];
    int64_t t0 = bench_now_ns();
    for (int i = 0; i < T; i++) {
        w[i] = (worker_t){.conn = r.conn, .until_ns = t0 + (int64_t)seconds * 1000000000};
        pthread_create(&w[i].thread, NULL, rpc_worker, &w[i]);
    }
    uint64_t calls = 0;
    for (int i = 0; i < T; i++) {
        pthread_join(w[i].thread, NULL);
        calls += w[i].calls;
    }
    double rate = (double)calls / ((double)(bench_now_ns() - t0) / 1e9);
    rig_down(&r);
    return rate;
}

/* ---- nng: req0 with 16 contexts on one socket ---------------------------------------- */

typedef struct nng_worker_t {
    pthread_t thread;
    nng_socket sock;
    int64_t until_ns;
    uint64_t calls;
} nng_worker_t;

/* A rep0 context answering each request with itself, until its socket closes. */
static void *nng_rep_main(void *arg)
{
    nng_worker_t *w = arg;
    nng_ctx ctx;
    nng_aio *aio;
    if (nng_ctx_open(&ctx, w->sock) != 0 || nng_aio_alloc(&aio, NULL, NULL) != 0)
        return NULL;
    for (;;) {
        nng_ctx_recv(ctx, aio);
        nng_aio_wait(aio);
        if (nng_aio_result(aio) != 0)
            break;
        nng_aio_set_msg(aio, nng_aio_get_msg(aio));
        nng_ctx_send(ctx, aio);
        nng_aio_wait(aio);
        if (nng_aio_result(aio) != 0) {
            nng_msg_free(nng_aio_get_msg(aio));
            break;
        }
    }
    nng_aio_free(aio);
    return NULL;
}

/* A req0 context calling until until_ns, 64-byte requests. */
static void *nng_req_main(void *arg)
{
    nng_worker_t *w = arg;
    nng_ctx ctx;
    nng_aio *aio;
    if (nng_ctx_open(&ctx, w->sock) != 0 || nng_aio_alloc(&aio, NULL, NULL) != 0)
        return NULL;
    char req[MSG] = {0};
    while (bench_now_ns() < w->until_ns) {
        nng_msg *m;
        if (nng_msg_alloc(&m, 0) != 0 || nng_msg_append(m, req, MSG) != 0)
            break;
        nng_aio_set_msg(aio, m);
        nng_ctx_send(ctx, aio);
        nng_aio_wait(aio);
        if (nng_aio_result(aio) != 0) {
            nng_msg_free(m);
            break;
        }
        nng_ctx_recv(ctx, aio);
        nng_aio_wait(aio);
        if (nng_aio_result(aio) != 0)
            break;
        nng_msg_free(nng_aio_get_msg(aio));
        w->calls++;
    }
    nng_ctx_close(ctx);
    nng_aio_free(aio);
    return NULL;
}

/* 16 req0 contexts on one socket against 16 rep0 contexts on one socket, over loopback
 * TCP: calls per second, or 0 when nng fails. */
static double nng_rate(int seconds)
{
    enum { T = 16 };
    nng_socket rep, req;
    nng_listener l;
    if (nng_rep0_open(&rep) != 0 || nng_req0_open(&req) != 0 ||
        nng_listen(rep, "tcp://127.0.0.1:0", &l, 0) != 0)
        return 0;
    nng_sockaddr sa;
    nng_listener_get_addr(l, NNG_OPT_LOCADDR, &sa);
    char url[64];
    snprintf(url, sizeof url, "tcp://127.0.0.1:%u", (unsigned)ntohs(sa.s_in.sa_port));
    if (nng_dial(req, url, NULL, 0) != 0)
        return 0;
    nng_worker_t servers[T], clients[T];
    for (int i = 0; i < T; i++) {
        servers[i] = (nng_worker_t){.sock = rep};
        pthread_create(&servers[i].thread, NULL, nng_rep_main, &servers[i]);
    }
    int64_t t0 = bench_now_ns();
    for (int i = 0; i < T; i++) {
        clients[i] = (nng_worker_t){.sock = req, .until_ns = t0 + (int64_t)seconds * 1000000000};
        pthread_create(&clients[i].thread, NULL, nng_req_main, &clients[i]);
    }
    uint64_t calls = 0;
    for (int i = 0; i < T; i++) {
        pthread_join(clients[i].thread, NULL);
        calls += clients[i].calls;
    }
    double rate = (double)calls / ((double)(bench_now_ns() - t0) / 1e9);
    nng_close(req);
    nng_close(rep); /* the rep contexts' receives fail: they end */
    for (int i = 0; i < T; i++)
        pthread_join(servers[i].thread, NULL);
    return rate;
}

static void bench_throughput(void)
{
    enum { T = 16, SECONDS = 5 };
    double pipelined = pipelined_rate(SECONDS);
    double rate = threads_rate(NULL, SECONDS);

    worker_t w[T];
    pthread_t echoers[T];
    int64_t t0 = bench_now_ns();
    for (int i = 0; i < T; i++) {
        w[i] = (worker_t){.fd = raw_pair(&echoers[i]), .until_ns = t0 + (int64_t)SECONDS * 1000000000};
    }
    t0 = bench_now_ns();
    for (int i = 0; i < T; i++) {
        w[i].until_ns = t0 + (int64_t)SECONDS * 1000000000;
        pthread_create(&w[i].thread, NULL, raw_worker, &w[i]);
    }
    uint64_t calls = 0;
    for (int i = 0; i < T; i++) {
        pthread_join(w[i].thread, NULL);
        calls += w[i].calls;
    }
    double raw_rate = (double)calls / ((double)(bench_now_ns() - t0) / 1e9);
    for (int i = 0; i < T; i++) {
        shutdown(w[i].fd, SHUT_RDWR);
        close(w[i].fd);
        pthread_join(echoers[i], NULL);
    }
    bench_report("rpc_throughput_16_threads", rate, "calls/s", raw_rate,
                 "ratio >= 0.8 (vs 16 raw ping-pongs)", rate >= 0.8 * raw_rate);
    bench_report("rpc_pipelined", pipelined, "calls/s", raw_rate,
                 "ratio >= 2 (one thread, 16 outstanding, vs 16 raw ping-pongs)", pipelined >= 2 * raw_rate);
    double nng = nng_rate(SECONDS);
    bench_report("rpc_throughput_vs_nng", rate, "calls/s", nng,
                 "ratio >= 4 (16 threads on one connection, vs nng req0, 16 contexts on one socket)",
                 nng > 0 && rate >= 4 * nng);
}

/* ---- 1 MiB calls: bandwidth ------------------------------------------------------- */

#define BIG (1 << 20)
#define CHUNK (64 * 1024)

/* Echoes whatever arrives, as it arrives. */
static void *stream_echo_main(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char *buf = malloc(CHUNK);
    ssize_t n;
    while ((n = recv(fd, buf, CHUNK, 0)) > 0)
        if (send(fd, buf, (size_t)n, MSG_NOSIGNAL) != n)
            break;
    free(buf);
    close(fd);
    return NULL;
}

static void *rpc_big_worker(void *arg)
{
    worker_t *w = arg;
    char *req = calloc(1, BIG);
    while (bench_now_ns() < w->until_ns) {
        pconn_buf_t resp;
        if (pconn_rpc_call(w->conn, "echo", 1, req, BIG, &resp, 10000, NULL) == PCONN_OK)
            w->calls++;
        pconn_buf_free(&resp);
    }
    free(req);
    return NULL;
}

/* 1 MiB out and back over a raw connection, 64 KiB at a time (so neither side's buffer
 * fills while it is not reading). */
static void *raw_big_worker(void *arg)
{
    worker_t *w = arg;
    char *buf = calloc(1, CHUNK);
    while (bench_now_ns() < w->until_ns) {
        int ok = 1;
        for (int k = 0; ok && k < BIG / CHUNK; k++)
            ok = send(w->fd, buf, CHUNK, MSG_NOSIGNAL) == CHUNK && recv_all(w->fd, buf, CHUNK) == 0;
        if (!ok)
            break;
        w->calls++;
    }
    free(buf);
    return NULL;
}

static void bench_big(void)
{
    enum { T = 16, SECONDS = 3 };
    rig_t r;
    rig_up(&r);
    worker_t w[T];
    int64_t t0 = bench_now_ns();
    for (int i = 0; i < T; i++) {
        w[i] = (worker_t){.conn = r.conn, .until_ns = t0 + (int64_t)SECONDS * 1000000000};
        pthread_create(&w[i].thread, NULL, rpc_big_worker, &w[i]);
    }
    uint64_t calls = 0;
    for (int i = 0; i < T; i++) {
        pthread_join(w[i].thread, NULL);
        calls += w[i].calls;
    }
    double rate = (double)calls / ((double)(bench_now_ns() - t0) / 1e9); /* MiB/s each way */
    rig_down(&r);

    pthread_t echoers[T];
    for (int i = 0; i < T; i++) {
        pconn_error_t err;
        int lfd = pconn_tcp_listen("127.0.0.1:0", 4, &err);
        char address[64];
        pconn_tcp_local_address(lfd, address, sizeof address);
        pconn_conn_t *c = NULL;
        pconn_tcp_connect(NULL, address, &c, &err);
        w[i] = (worker_t){.fd = dup(pconn_tcp_fd(c))};
        pconn_conn_unref(c);
        int a = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        close(lfd);
        pthread_create(&echoers[i], NULL, stream_echo_main, (void *)(intptr_t)a);
    }
    t0 = bench_now_ns();
    for (int i = 0; i < T; i++) {
        w[i].until_ns = t0 + (int64_t)SECONDS * 1000000000;
        pthread_create(&w[i].thread, NULL, raw_big_worker, &w[i]);
    }
    calls = 0;
    for (int i = 0; i < T; i++) {
        pthread_join(w[i].thread, NULL);
        calls += w[i].calls;
    }
    double raw = (double)calls / ((double)(bench_now_ns() - t0) / 1e9);
    for (int i = 0; i < T; i++) {
        shutdown(w[i].fd, SHUT_RDWR);
        close(w[i].fd);
        pthread_join(echoers[i], NULL);
    }
    bench_report("rpc_throughput_1MiB", rate * 1.048576, "MB/s", raw * 1.048576,
                 "ratio >= 0.8 (16 threads vs raw, 16 connections)", rate >= 0.8 * raw);
}

/* ---- reconnect, then the first answer ------------------------------------------- */

static int64_t no_delay(void *arg, unsigned failures)
{
    (void)arg, (void)failures;
    return 0;
}

static void *accept_echo_main(void *arg)
{
    int lfd = (int)(intptr_t)arg;
    int fd;
    while ((fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) >= 0)
        raw_echo_main((void *)(intptr_t)fd);
    return NULL;
}

static void bench_reconnect_answer(void)
{
    enum { N = 300 };
    int64_t *lib = calloc(N, sizeof *lib), *raw = calloc(N, sizeof *raw);
    rig_t r;
    r.impls = pconn_rpc_impls_new();
    pconn_rpc_impls_add(r.impls, "echo", 1, h_echo, NULL);
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = r.impls};
    pconn_rpc_server_start(&so, &r.srv, NULL);
    const char *address = pconn_rpc_server_address(r.srv);
    pconn_rpc_options_t o = {.base = {.server_name = "bench", .resolver = pconn_resolver_static(&address, 1),
                                      .retry_delay = no_delay}};
    pconn_rpc_create(&o, &r.pc);
    char req[MSG] = {0};
    for (int i = 0; i < N; i++) {
        pconn_conn_t *c = NULL;
        pconn_connected(r.pc, 10000, &c);
        pconn_conn_close(c); /* the connection ends: the pconn makes a new one */
        pconn_conn_unref(c);
        int64_t t0 = bench_now_ns();
        pconn_buf_t resp;
        while (pconn_rpc_dispatch(r.pc, "echo", 1, req, MSG, &resp, 10000, NULL) != PCONN_OK)
            ;
        lib[i] = bench_now_ns() - t0;
        pconn_buf_free(&resp);
    }
    pconn_free(r.pc);
    pconn_rpc_server_stop(r.srv);
    pconn_rpc_impls_free(r.impls);

    pconn_error_t err;
    int lfd = pconn_tcp_listen("127.0.0.1:0", 16, &err);
    char raddr[64];
    pconn_tcp_local_address(lfd, raddr, sizeof raddr);
    pthread_t acceptor;
    pthread_create(&acceptor, NULL, accept_echo_main, (void *)(intptr_t)lfd);
    pconn_tcp_options_t to = {.nodelay = true, .keepalive_idle_s = -1, .user_timeout_ms = -1};
    for (int i = 0; i < N; i++) {
        int64_t t0 = bench_now_ns();
        pconn_conn_t *c = NULL;
        pconn_tcp_connect(&to, raddr, &c, &err);
        int fd = pconn_tcp_fd(c);
        send(fd, req, MSG, MSG_NOSIGNAL);
        recv_all(fd, req, MSG);
        raw[i] = bench_now_ns() - t0;
        pconn_conn_unref(c);
    }
    shutdown(lfd, SHUT_RDWR);
    pthread_join(acceptor, NULL);
    close(lfd);
    double m = bench_percentile(lib, N, 50), b = bench_percentile(raw, N, 50);
    bench_report("rpc_reconnect_first_answer", m / 1000, "us", b / 1000,
                 "ratio <= 1.5 (vs raw connect + one ping-pong)", m <= 1.5 * b);
    free(lib);
    free(raw);
}

/* ---- a flood of silent connections ------------------------------------------------ */

static int threads_now(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    for (struct dirent *e; d != NULL && (e = readdir(d)) != NULL;)
        n += e->d_name[0] != '.';
    if (d != NULL)
        closedir(d);
    return n;
}

static double call_median(pconn_conn_t *conn, int n)
{
    int64_t *lat = calloc((size_t)n, sizeof *lat);
    char req[MSG] = {0};
    for (int i = 0; i < n; i++) {
        pconn_buf_t resp;
        int64_t t0 = bench_now_ns();
        pconn_rpc_call(conn, "echo", 1, req, MSG, &resp, 10000, NULL);
        lat[i] = bench_now_ns() - t0;
        pconn_buf_free(&resp);
    }
    double m = bench_percentile(lat, (size_t)n, 50);
    free(lat);
    return m;
}

static void bench_flood(void)
{
    enum { CALLS = 3000 };
    int want = 10000;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < (rlim_t)want + 200)
        want = (int)rl.rlim_cur - 200;
    int threads0 = threads_now();
    rig_t r;
    rig_up(&r);
    int threads_quiet = threads_now();
    double quiet = call_median(r.conn, CALLS);
    const char *address = pconn_rpc_server_address(r.srv);
    int *fds = malloc((size_t)want * sizeof *fds), opened = 0;
    pconn_tcp_options_t to = {.connect_timeout_ms = 1000, .keepalive_idle_s = -1, .user_timeout_ms = -1};
    for (; opened < want; opened++) {
        pconn_conn_t *c = NULL;
        pconn_error_t err;
        if (pconn_tcp_connect(&to, address, &c, &err) != PCONN_OK)
            break;
        fds[opened] = dup(pconn_tcp_fd(c));
        pconn_conn_unref(c);
    }
    double flooded = call_median(r.conn, CALLS);
    int server_threads = threads_now() - threads0 - (threads_quiet - threads0);
    for (int i = 0; i < opened; i++)
        close(fds[i]);
    free(fds);
    rig_down(&r);
    printf("rpc_flood: %d silent connections open (of %d wanted); threads added by the flood: %d\n",
           opened, want, server_threads);
    bench_report("rpc_flood", flooded / 1000, "us", quiet / 1000,
                 "ratio <= 2 (calls during a flood vs without)", flooded <= 2 * quiet);
    /* The goal is "server threads <= pool size + 4": the flood itself may add at most the 4. */
    bench_report("rpc_flood_threads", server_threads, "threads", 0, "<= 4 threads added by the flood",
                 server_threads <= 4);
}

/* ---- TLS against plain TCP ----------------------------------------------------- */

static double roundtrip_median(const char *tls_dir)
{
    rig_t r;
    rig_up_tls(&r, tls_dir, 1, NULL);
    char req[MSG] = {0};
    int64_t *lat = calloc(ROUNDS, sizeof *lat);
    for (int i = 0; i < ROUNDS; i++) {
        pconn_buf_t resp;
        int64_t t0 = bench_now_ns();
        pconn_rpc_call(r.conn, "echo", 1, req, MSG, &resp, 10000, NULL);
        lat[i] = bench_now_ns() - t0;
        pconn_buf_free(&resp);
    }
    double med = bench_percentile(lat, ROUNDS, 50);
    free(lat);
    rig_down(&r);
    return med;
}

/* From closing the connection to the first answer on the next one, median of n. */
static double reconnect_median(const char *tls_dir, int resume, int n)
{
    rig_t r;
    rig_up_tls(&r, tls_dir, resume, no_delay);
    char req[MSG] = {0};
    int64_t *lat = calloc((size_t)n, sizeof *lat);
    for (int i = 0; i < n; i++) {
        pconn_conn_t *c = NULL;
        pconn_connected(r.pc, 10000, &c);
        pconn_conn_close(c);
        pconn_conn_unref(c);
        int64_t t0 = bench_now_ns();
        pconn_buf_t resp;
        while (pconn_rpc_dispatch(r.pc, "echo", 1, req, MSG, &resp, 10000, NULL) != PCONN_OK)
            ;
        lat[i] = bench_now_ns() - t0;
        pconn_buf_free(&resp);
    }
    double m = bench_percentile(lat, (size_t)n, 50);
    free(lat);
    rig_down(&r);
    return m;
}

static void bench_tls(void)
{
    char dir[] = "/tmp/pconn-bench-tls-XXXXXX", cmd[300];
    if (mkdtemp(dir) == NULL)
        return;
    snprintf(cmd, sizeof cmd, "test/tls-certs.sh %s", dir);
    if (system(cmd) != 0) {
        fprintf(stderr, "bench_tls: test/tls-certs.sh failed (run from the repository)\n");
        return;
    }
    double plain = roundtrip_median(NULL), tls = roundtrip_median(dir);
    bench_report("rpc_roundtrip_tls", tls / 1000, "us", plain / 1000,
                 "ratio <= 1.3 (vs the same over plain TCP)", tls <= 1.3 * plain);
    /* Alternated, best of two each: this machine's rate for either varies by a third
     * from one run to the next. */
    double plain_rate = 0, tls_rate = 0;
    for (int i = 0; i < 2; i++) {
        double p = threads_rate(NULL, 3), t = threads_rate(dir, 3);
        plain_rate = p > plain_rate ? p : plain_rate;
        tls_rate = t > tls_rate ? t : tls_rate;
    }
    bench_report("rpc_throughput_tls", tls_rate, "calls/s", plain_rate,
                 "ratio >= 0.7 (16 threads, vs plain TCP)", tls_rate >= 0.7 * plain_rate);
    double rplain = reconnect_median(NULL, 0, 200), rfull = reconnect_median(dir, 0, 200),
           rres = reconnect_median(dir, 1, 200);
    bench_report("tls_reconnect_full_handshake", rfull / 1000, "us", rplain / 1000,
                 "(reported; vs plain TCP)", true);
    bench_report("tls_reconnect_resumed", rres / 1000, "us", rfull / 1000,
                 "(reported; vs a full handshake)", true);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "bench_tls: could not remove %s\n", dir);
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    const char *only = argc > 1 ? argv[1] : "";
    if (!*only || strcmp(only, "roundtrip") == 0)
        bench_roundtrip();
    if (!*only || strcmp(only, "throughput") == 0)
        bench_throughput();
    if (!*only || strcmp(only, "big") == 0)
        bench_big();
    if (!*only || strcmp(only, "reconnect") == 0)
        bench_reconnect_answer();
    if (!*only || strcmp(only, "flood") == 0)
        bench_flood();
    if (!*only || strcmp(only, "tls") == 0)
        bench_tls();
    return 0;
}
