/* test_faults.c - faults at the system-call edge, and signals without SA_RESTART.
 *
 * This program is linked with -Wl,--wrap for connect, send, sendmsg, recv, read, write,
 * poll, malloc, calloc and pthread_create, so every call the (static) library makes to
 * them goes through the wrappers below. While a fault rate is set, a seeded share of
 * those calls fails the way the kernel or libc may: EINTR, EAGAIN, ECONNRESET, short
 * reads and writes, ENOMEM, a thread that cannot be created. Servers are child
 * processes (the pconn tool), which are not wrapped. The promises: nothing crashes,
 * hangs past its timeout or leaks (ASan); each failure is a documented code; once the
 * faults stop, everything works again without help. */
#include "common.h"
#include "pconn_resolver.h"
#include "pconn_rpc.h"
#include "pconn_tcp.h"
#include "../src/rpc/rpc.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- the wrappers ---------------------------------------------------------------- */

static atomic_uint fault_permille; /* 0: no faults */
static atomic_ullong fault_seed = 1;
static atomic_llong faults_injected;
static _Thread_local bool exempt;  /* the test's own I/O */
static _Thread_local uint64_t rng;

static unsigned roll(unsigned n)
{
    if (rng == 0)
        rng = atomic_fetch_add(&fault_seed, 0x9E3779B97F4A7C15ull) | 1;
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (unsigned)(rng % n);
}

/* 0 when this call goes through untouched, else 1 + which fault (of kinds). */
static unsigned fault(unsigned kinds)
{
    unsigned p = atomic_load_explicit(&fault_permille, memory_order_relaxed);
    if (p == 0 || exempt || roll(1000) >= p)
        return 0;
    atomic_fetch_add(&faults_injected, 1);
    return 1 + roll(kinds);
}

static ssize_t fail(int e)
{
    errno = e;
    return -1;
}

int __real_connect(int fd, const struct sockaddr *sa, socklen_t len);
int __wrap_connect(int fd, const struct sockaddr *sa, socklen_t len);
int __wrap_connect(int fd, const struct sockaddr *sa, socklen_t len)
{
    switch (fault(2)) {
    case 1: return (int)fail(ECONNREFUSED);
    case 2: return (int)fail(ENETUNREACH);
    }
    return __real_connect(fd, sa, len);
}

ssize_t __real_send(int fd, const void *buf, size_t len, int flags);
ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags);
ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags)
{
    switch (fault(4)) {
    case 1: return fail(EINTR);
    case 2: return fail(EAGAIN);
    case 3: return fail(ECONNRESET);
    case 4: return __real_send(fd, buf, len > 1 ? len / 2 : len, flags); /* short */
    }
    return __real_send(fd, buf, len, flags);
}

ssize_t __real_sendmsg(int fd, const struct msghdr *m, int flags);
ssize_t __wrap_sendmsg(int fd, const struct msghdr *m, int flags);
ssize_t __wrap_sendmsg(int fd, const struct msghdr *m, int flags)
{
    switch (fault(3)) {
    case 1: return fail(EINTR);
    case 2: return fail(EAGAIN);
    case 3: return fail(ECONNRESET);
    }
    return __real_sendmsg(fd, m, flags);
}

ssize_t __real_recv(int fd, void *buf, size_t len, int flags);
ssize_t __wrap_recv(int fd, void *buf, size_t len, int flags);
ssize_t __wrap_recv(int fd, void *buf, size_t len, int flags)
{
    switch (fault(4)) {
    case 1: return fail(EINTR);
    case 2: return fail(EAGAIN);
    case 3: return fail(ECONNRESET);
    case 4: return __real_recv(fd, buf, len > 1 ? 1 : len, flags); /* short */
    }
    return __real_recv(fd, buf, len, flags);
}

ssize_t __real_read(int fd, void *buf, size_t len);
ssize_t __wrap_read(int fd, void *buf, size_t len);
ssize_t __wrap_read(int fd, void *buf, size_t len)
{
    return fault(1) ? fail(EINTR) : __real_read(fd, buf, len);
}

ssize_t __real_write(int fd, const void *buf, size_t len);
ssize_t __wrap_write(int fd, const void *buf, size_t len);
ssize_t __wrap_write(int fd, const void *buf, size_t len)
{
    return fault(1) ? fail(EINTR) : __real_write(fd, buf, len);
}

int __real_poll(struct pollfd *fds, nfds_t n, int timeout);
int __wrap_poll(struct pollfd *fds, nfds_t n, int timeout);
int __wrap_poll(struct pollfd *fds, nfds_t n, int timeout)
{
    return fault(1) ? (int)fail(EINTR) : __real_poll(fds, n, timeout);
}

void *__real_malloc(size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_malloc(size_t n)
{
    if (fault(1)) {
        errno = ENOMEM;
        return NULL;
    }
    return __real_malloc(n);
}

void *__real_calloc(size_t n, size_t size);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_calloc(size_t n, size_t size)
{
    if (fault(1)) {
        errno = ENOMEM;
        return NULL;
    }
    return __real_calloc(n, size);
}

static atomic_bool no_threads; /* every pthread_create() fails */
static int threads_refused;   /* while no_threads; guarded by refused_mutex */
static pthread_mutex_t refused_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t refused_cond = PTHREAD_COND_INITIALIZER;

int __real_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg);
int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg);
int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg)
{
    if (atomic_load(&no_threads)) {
        pthread_mutex_lock(&refused_mutex);
        threads_refused++;
        pthread_cond_broadcast(&refused_cond);
        pthread_mutex_unlock(&refused_mutex);
        return EAGAIN;
    }
    return fault(1) ? EAGAIN : __real_pthread_create(t, a, fn, arg);
}

/* ---- the workload ------------------------------------------------------------------- */

#define THREADS 4
#define TIMEOUT_MS 300

static const int tcp_allowed[] = {PCONN_ETIMEDOUT, PCONN_ECLOSED, PCONN_EIO, -1};
static const int rpc_allowed[] = {PCONN_ETIMEDOUT, PCONN_ECLOSED, PCONN_EIO, PCONN_EPROTO,
                                  PCONN_ENOMEM, -1};

typedef struct tally_t {
    atomic_long ok, failed, undocumented, mismatched;
} tally_t;

static void tally(tally_t *t, int rc, const int *allowed)
{
    if (rc == PCONN_OK) {
        atomic_fetch_add(&t->ok, 1);
        return;
    }
    atomic_fetch_add(&t->failed, 1);
    for (const int *a = allowed; *a >= 0; a++)
        if (*a == rc)
            return;
    atomic_fetch_add(&t->undocumented, 1);
    fprintf(stderr, "\n  undocumented code %d (%s)\n", rc, pconn_err_name(rc));
}

/* "line\n" -> "S: line\n" over a TCP pconn; the test's own recv/poll are exempt. */
static int tcp_exchange(pconn_t *pc, int id, tally_t *t)
{
    pconn_conn_t *c = NULL;
    int rc = pconn_connected(pc, TIMEOUT_MS, &c);
    if (rc != PCONN_OK)
        return rc;
    char req[32], want[48], got[64];
    int n = snprintf(req, sizeof req, "q%d\n", id);
    snprintf(want, sizeof want, "S: %s", req);
    rc = pconn_tcp_send_all(c, req, (size_t)n, NULL);
    size_t len = 0;
    exempt = true;
    while (rc == PCONN_OK && (len == 0 || got[len - 1] != '\n')) {
        struct pollfd p = {.fd = pconn_tcp_fd(c), .events = POLLIN};
        int pr = poll(&p, 1, TIMEOUT_MS);
        if (pr < 0 && errno == EINTR)
            continue;
        ssize_t r = pr > 0 ? recv(p.fd, got + len, sizeof got - 1 - len, 0) : 0;
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0 || len + (size_t)r >= sizeof got - 1)
            rc = pr == 0 ? PCONN_ETIMEDOUT : PCONN_EIO;
        else
            len += (size_t)r;
    }
    exempt = false;
    if (rc == PCONN_OK) {
        got[len] = '\0';
        if (strcmp(got, want) != 0) {
            atomic_fetch_add(&t->mismatched, 1);
            fprintf(stderr, "\n  tcp: sent %s  got %s", req, got);
        }
    } else {
        pconn_conn_close(c); /* out of step: a new connection */
    }
    pconn_conn_unref(c);
    return rc;
}

static int rpc_exchange(pconn_t *pc, int id, tally_t *t)
{
    char req[32];
    int n = snprintf(req, sizeof req, "r%d", id);
    pconn_buf_t resp;
    pconn_error_t err;
    int rc = pconn_rpc_dispatch(pc, "echo", 1, req, (size_t)n, &resp, TIMEOUT_MS, &err);
    if (rc == PCONN_OK) {
        if (resp.len != (size_t)n || memcmp(resp.data, req, (size_t)n) != 0) {
            atomic_fetch_add(&t->mismatched, 1);
            fprintf(stderr, "\n  rpc: sent %s got %.*s\n", req, (int)resp.len, (const char *)resp.data);
        }
        pconn_buf_free(&resp);
    }
    return rc;
}

typedef struct load_t {
    pconn_t *tcp[THREADS], *rpc;
    tally_t tcp_tally, rpc_tally;
    atomic_bool stop;
    atomic_int next;
} load_t;

static void *load_main(void *arg)
{
    load_t *l = arg;
    int me = atomic_fetch_add(&l->next, 1);
    for (int i = 0; !atomic_load(&l->stop); i++) {
        tally(&l->tcp_tally, tcp_exchange(l->tcp[me], me * 1000000 + i, &l->tcp_tally), tcp_allowed);
        tally(&l->rpc_tally, rpc_exchange(l->rpc, me * 1000000 + i, &l->rpc_tally), rpc_allowed);
    }
    return NULL;
}

static int64_t quick_retry(void *arg, unsigned failures)
{
    (void)arg, (void)failures;
    return 10;
}

typedef struct servers_t {
    tproc_t tcp, rpc;
    char tcp_address[128], rpc_address[128];
} servers_t;

static void servers_start(servers_t *s)
{
    const char *tcp_argv[] = {"pconn", "serve", "127.0.0.1:0", "--name", "S", NULL};
    const char *rpc_argv[] = {"pconn", "rpc-serve", "127.0.0.1:0", NULL};
    CU_ASSERT_EQUAL_FATAL(tproc_spawn_server(&s->tcp, tcp_argv, s->tcp_address, sizeof s->tcp_address), 0);
    CU_ASSERT_EQUAL_FATAL(tproc_spawn_server(&s->rpc, rpc_argv, s->rpc_address, sizeof s->rpc_address), 0);
}

static void load_create(load_t *l, servers_t *s)
{
    for (int i = 0; i < THREADS; i++) {
        const char *list[] = {s->tcp_address};
        pconn_options_t o = {.server_name = "tcp", .resolver = pconn_resolver_static(list, 1),
                             .retry_delay = quick_retry};
        pconn_tcp_options_t to = {.connect_timeout_ms = TIMEOUT_MS};
        CU_ASSERT_EQUAL_FATAL(pconn_tcp_create(&o, &to, &l->tcp[i]), PCONN_OK);
    }
    const char *list[] = {s->rpc_address};
    pconn_rpc_options_t ro = {.base = {.server_name = "rpc", .resolver = pconn_resolver_static(list, 1),
                                       .retry_delay = quick_retry},
                              .handshake_timeout_ms = TIMEOUT_MS};
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&ro, &l->rpc), PCONN_OK);
}

/* Each thread uses a TCP pconn of its own (a line protocol is for one user at a time). */
static void load_run(load_t *l, pthread_t *t)
{
    for (int i = 0; i < THREADS; i++)
        CU_ASSERT_EQUAL_FATAL(pthread_create(&t[i], NULL, load_main, l), 0);
}

static void load_stop(load_t *l, pthread_t *t)
{
    atomic_store(&l->stop, true);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
}

static void load_free(load_t *l)
{
    for (int i = 0; i < THREADS; i++)
        pconn_free(l->tcp[i]);
    pconn_free(l->rpc);
}

/* Waits, without faults, until every pconn answers again: nothing needs help. */
static void assert_recovers(load_t *l)
{
    tally_t t = {0};
    for (int i = 0; i < THREADS; i++) {
        int rc = PCONN_ETIMEDOUT;
        for (int k = 0; k < 50 && rc != PCONN_OK; k++)
            rc = tcp_exchange(l->tcp[i], 900000 + k, &t);
        CU_ASSERT_EQUAL(rc, PCONN_OK);
    }
    int rc = PCONN_ETIMEDOUT;
    for (int k = 0; k < 50 && rc != PCONN_OK; k++)
        rc = rpc_exchange(l->rpc, 900000 + k, &t);
    CU_ASSERT_EQUAL(rc, PCONN_OK);
    CU_ASSERT_EQUAL(t.mismatched, 0);
}

/* Seeded faults at 2 % of the wrapped calls, for a few thousand exchanges. */
static void test_syscall_faults(void)
{
    const char *seed = getenv("FAULT_SEED");
    atomic_store(&fault_seed, seed != NULL ? strtoull(seed, NULL, 0) : 20261124);
    servers_t s;
    servers_start(&s);
    int fds = count_open_fds();
    load_t l = {0};
    pthread_t t[THREADS];
    load_create(&l, &s);
    load_run(&l, t);
    atomic_store(&fault_permille, 20);
    while (atomic_load(&l.tcp_tally.ok) + atomic_load(&l.tcp_tally.failed) < 2000 ||
           atomic_load(&faults_injected) < 500)
        poll(NULL, 0, 10); /* the load runs on its own threads: this only paces the check */
    atomic_store(&fault_permille, 0);
    load_stop(&l, t);
    assert_recovers(&l);
    CU_ASSERT_EQUAL(l.tcp_tally.undocumented + l.rpc_tally.undocumented, 0);
    CU_ASSERT_EQUAL(l.tcp_tally.mismatched + l.rpc_tally.mismatched, 0);
    CU_ASSERT(l.tcp_tally.failed > 0); /* the faults reached the library */
    printf("[%lld faults; tcp %ld ok %ld failed; rpc %ld ok %ld failed] ",
           (long long)faults_injected, (long)l.tcp_tally.ok, (long)l.tcp_tally.failed,
           (long)l.rpc_tally.ok, (long)l.rpc_tally.failed);
    load_free(&l);
    CU_ASSERT_EQUAL(count_open_fds(), fds);
    tproc_signal(&s.tcp, SIGKILL);
    tproc_signal(&s.rpc, SIGKILL);
}

static atomic_long signals_caught;
static void on_usr1(int sig)
{
    (void)sig;
    atomic_fetch_add(&signals_caught, 1);
}

typedef struct pelter_t {
    pthread_t *targets;
    int n;
    atomic_bool stop;
} pelter_t;

static void *pelter_main(void *arg)
{
    pelter_t *p = arg;
    while (!atomic_load(&p->stop)) {
        for (int i = 0; i < p->n; i++)
            pthread_kill(p->targets[i], SIGUSR1);
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* A handler installed without SA_RESTART, fired at the calling threads thousands of
 * times a second: every blocking call goes on; with the servers up, nothing fails. */
static void test_signals_without_restart(void)
{
    struct sigaction sa = {.sa_handler = on_usr1}, old;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: interrupted system calls fail with EINTR */
    sigaction(SIGUSR1, &sa, &old);
    servers_t s;
    servers_start(&s);
    load_t l = {0};
    pthread_t t[THREADS];
    load_create(&l, &s);
    assert_recovers(&l); /* connected before the signals start */
    load_run(&l, t);
    pelter_t p = {.targets = t, .n = THREADS};
    pthread_t pt;
    pthread_create(&pt, NULL, pelter_main, &p);
    while (atomic_load(&l.tcp_tally.ok) + atomic_load(&l.tcp_tally.failed) < 2000 ||
           atomic_load(&signals_caught) < 2000)
        poll(NULL, 0, 10);
    atomic_store(&p.stop, true);
    pthread_join(pt, NULL);
    load_stop(&l, t);
    printf("[%ld signals; tcp %ld ok; rpc %ld ok] ", (long)signals_caught, (long)l.tcp_tally.ok,
           (long)l.rpc_tally.ok);
    CU_ASSERT_EQUAL(l.tcp_tally.failed, 0);
    CU_ASSERT_EQUAL(l.rpc_tally.failed, 0);
    CU_ASSERT_EQUAL(l.tcp_tally.mismatched + l.rpc_tally.mismatched, 0);
    load_free(&l);
    sigaction(SIGUSR1, &old, NULL);
    tproc_signal(&s.tcp, SIGKILL);
    tproc_signal(&s.rpc, SIGKILL);
}

/* Issue 9 defect 7, at the pool: when no thread can be started, a job is refused (the
 * caller answers the query with "no thread to run the handler"), never run here and
 * again from the queue; once threads can be made, it runs exactly once. */
typedef struct ran_t {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int n;
} ran_t;

static void count_run(void *arg)
{
    ran_t *r = arg;
    pthread_mutex_lock(&r->mutex);
    r->n++;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->mutex);
}

static void test_no_handler_thread(void)
{
    ran_t r = {.mutex = PTHREAD_MUTEX_INITIALIZER};
    test_cond_init(&r.cond);
    rpc_pool_t *pool = pconn__rpc_pool_new(4);
    CU_ASSERT_PTR_NOT_NULL_FATAL(pool);
    atomic_store(&no_threads, true);
    CU_ASSERT_EQUAL(pconn__rpc_pool_submit(pool, count_run, &r), RPC_POOL_BUSY);
    atomic_store(&no_threads, false);
    CU_ASSERT_EQUAL(r.n, 0); /* not run here */
    CU_ASSERT_EQUAL(pconn__rpc_pool_submit(pool, count_run, &r), PCONN_OK);
    CU_ASSERT_EQUAL(test_wait_count(&r.mutex, &r.cond, &r.n, 1, WAIT_MS), 1);
    pconn__rpc_pool_release(pool); /* waits for the job: it ran once, not twice */
    CU_ASSERT_EQUAL(r.n, 1);
    pthread_cond_destroy(&r.cond);
}

/* A thread that cannot be created: every call that needs one says so, frees what it
 * was given (ASan counts), and works again once threads can be made. */
static void test_no_thread_for_anything(void)
{
    const char *list[] = {"127.0.0.1:1"};
    atomic_store(&no_threads, true);
    pconn_options_t o = {.server_name = "nothread", .resolver = pconn_resolver_static(list, 1)};
    pconn_t *pc = (pconn_t *)list;
    CU_ASSERT_EQUAL(pconn_tcp_create(&o, NULL, &pc), PCONN_ENOMEM);
    CU_ASSERT_PTR_NULL(pc);
    pconn_rpc_options_t ro = {.base = {.server_name = "nothread", .resolver = pconn_resolver_static(list, 1)}};
    CU_ASSERT_EQUAL(pconn_rpc_create(&ro, &pc), PCONN_ENOMEM);
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0"};
    pconn_rpc_server_t *srv = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_server_start(&so, &srv, &err), PCONN_ENOMEM);
    CU_ASSERT_PTR_NULL(srv);
    /* A name lookup without its helper thread is done in place: still answered. */
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL(pconn_tcp_connect(NULL, "nonexistent.invalid:80", &c, &err), PCONN_ERESOLVE);
    atomic_store(&no_threads, false);
    o.resolver = pconn_resolver_static(list, 1);
    CU_ASSERT_EQUAL(pconn_tcp_create(&o, NULL, &pc), PCONN_OK);
    pconn_free(pc);
}

/* A handler that holds its server's reading thread, the door its test opens. */
static pthread_mutex_t hold_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hold_cond = PTHREAD_COND_INITIALIZER;
static bool hold_open;

static int h_hold(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    pthread_mutex_lock(&hold_mutex);
    while (!hold_open)
        pthread_cond_wait(&hold_cond, &hold_mutex);
    pthread_mutex_unlock(&hold_mutex);
    return pconn_buf_append(resp, req, len);
}

/* Opens the door once two thread creations were refused: the server's watchdog tried
 * twice to hand the reading on. */
static void *opener_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&refused_mutex);
    while (threads_refused < 2)
        pthread_cond_wait(&refused_cond, &refused_mutex);
    pthread_mutex_unlock(&refused_mutex);
    pthread_mutex_lock(&hold_mutex);
    hold_open = true;
    pthread_cond_broadcast(&hold_cond);
    pthread_mutex_unlock(&hold_mutex);
    return NULL;
}

/* A slow handler on a server's reading thread when no thread can be created: the
 * hand-over of the reading fails, the handler's thread keeps reading and answers once
 * the handler returns; the queries read with it, by then older than the 10 ms a batch
 * runs on the reading thread, go to the pool, which has no thread either: answered at
 * once with "no thread to run the handler". Nothing leaks (ASan). */
static void test_no_thread_for_a_hand_over(void)
{
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "hold", 1, h_hold, NULL), PCONN_OK);
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    pconn_rpc_options_t o = {.base = {.server_name = "hold", .resolver = pconn_resolver_static(&address, 1)}};
    pconn_t *pc = NULL;
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    hold_open = false;
    threads_refused = 0;
    pthread_t opener;
    CU_ASSERT_EQUAL_FATAL(pthread_create(&opener, NULL, opener_main, NULL), 0);
    atomic_store(&no_threads, true);
    pconn_rpc_call_t calls[3];
    for (int i = 0; i < 3; i++)
        calls[i] = (pconn_rpc_call_t){.name = "hold", .version = 1, .req = "abc", .req_len = (size_t)i + 1};
    CU_ASSERT_EQUAL(pconn_rpc_call_many(conn, calls, 3, WAIT_MS), PCONN_EREMOTE);
    atomic_store(&no_threads, false);
    pthread_join(opener, NULL);
    CU_ASSERT_EQUAL(calls[0].status, PCONN_OK);
    CU_ASSERT(calls[0].resp.len == 1 && memcmp(calls[0].resp.data, "a", 1) == 0);
    for (int i = 1; i < 3; i++) {
        CU_ASSERT_EQUAL(calls[i].status, PCONN_EREMOTE);
        CU_ASSERT_STRING_EQUAL(calls[i].err.message, "no thread to run the handler");
    }
    for (int i = 0; i < 3; i++)
        pconn_buf_free(&calls[i].resp);
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
}

/* A server handler that calls its client back over its own connection. */
static int h_call_back(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg;
    int rc = pconn_rpc_call(pconn_rpc_handler_conn(), "back", 1, req, len, resp, WAIT_MS, err);
    return rc;
}

/* Review finding: a handler on the server's reading thread that calls its peer back
 * needs another thread to read the answer; when none can be created the call fails at
 * once with PCONN_ENOMEM instead of waiting out its timeout with the answer unread. */
static void test_no_thread_for_a_call_back(void)
{
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "call_back", 1, h_call_back, NULL), PCONN_OK);
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    pconn_rpc_options_t o = {.base = {.server_name = "cb", .resolver = pconn_resolver_static(&address, 1)}};
    pconn_t *pc = NULL;
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    atomic_store(&no_threads, true);
    pconn_buf_t resp;
    pconn_error_t err;
    int rc = pconn_rpc_call(conn, "call_back", 1, "x", 1, &resp, WAIT_MS, &err);
    atomic_store(&no_threads, false);
    CU_ASSERT_EQUAL(rc, PCONN_EREMOTE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "no thread to read the answer"));
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
}

static int h_same(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    return pconn_buf_append(resp, req, len);
}

static pthread_mutex_t warn_mutex = PTHREAD_MUTEX_INITIALIZER;
static char warning[256];

static void keep_warning(int level, const char *message, void *arg)
{
    (void)arg;
    pthread_mutex_lock(&warn_mutex);
    if (level == PCONN_LOG_WARNING && warning[0] == '\0')
        snprintf(warning, sizeof warning, "%s", message);
    pthread_mutex_unlock(&warn_mutex);
}

/* A parked connection (idle: no thread reads it) whose next query finds that no thread
 * can be created: the server closes that connection and says why in its log; the call
 * fails with PCONN_EIO, and once threads can be made again the next call goes through
 * a new connection. */
static void test_no_thread_to_unpark(void)
{
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    CU_ASSERT_EQUAL(pconn_rpc_impls_add(impls, "same", 1, h_same, NULL), PCONN_OK);
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls,
                                     .on_log = keep_warning};
    pconn_rpc_server_t *srv = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_server_start(&so, &srv, NULL), PCONN_OK);
    const char *address = pconn_rpc_server_address(srv);
    pconn_rpc_options_t o = {.base = {.server_name = "park", .resolver = pconn_resolver_static(&address, 1)}};
    pconn_t *pc = NULL;
    pconn_conn_t *conn = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_rpc_create(&o, &pc), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &conn), PCONN_OK);
    pconn_buf_t resp;
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "same", 1, "a", 1, &resp, WAIT_MS, NULL), PCONN_OK);
    pconn_buf_free(&resp);
    bool parked = false;
    for (int64_t until = pconn_clock_now(NULL) + (int64_t)WAIT_MS * 1000000;
         !parked && pconn_clock_now(NULL) < until;) {
        char *stats = pconn_rpc_server_stats_json(srv);
        /* Parked, and no spare reading thread left (they wait 2 s for work). */
        parked = stats != NULL && strstr(stats, "\"parked\":1,") != NULL &&
                 strstr(stats, "\"reading_threads\":0,") != NULL;
        free(stats);
        struct timespec ms = {0, 1000000}; /* the poll's period */
        nanosleep(&ms, NULL);
    }
    CU_ASSERT_FATAL(parked);
    atomic_store(&no_threads, true);
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_rpc_call(conn, "same", 1, "b", 1, &resp, WAIT_MS, &err), PCONN_EIO);
    atomic_store(&no_threads, false);
    pthread_mutex_lock(&warn_mutex);
    CU_ASSERT_PTR_NOT_NULL(strstr(warning, "no thread to read the connection"));
    pthread_mutex_unlock(&warn_mutex);
    CU_ASSERT_EQUAL(pconn_rpc_dispatch(pc, "same", 1, "c", 1, &resp, WAIT_MS, NULL), PCONN_OK);
    CU_ASSERT(resp.len == 1 && memcmp(resp.data, "c", 1) == 0);
    pconn_buf_free(&resp);
    pconn_conn_unref(conn);
    pconn_free(pc);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
}

static const test_def_t tests[] = {
    {"no_thread_for_anything", test_no_thread_for_anything},
    {"no_handler_thread", test_no_handler_thread},
    {"no_thread_for_a_hand_over", test_no_thread_for_a_hand_over},
    {"no_thread_for_a_call_back", test_no_thread_for_a_call_back},
    {"no_thread_to_unpark", test_no_thread_to_unpark},
    {"syscall_faults", test_syscall_faults},
    {"signals_without_restart", test_signals_without_restart},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    return run_suite("faults", tests, argc, argv);
}
