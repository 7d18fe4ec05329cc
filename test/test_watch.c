/* test_watch.c - the etcd catalog's shared, watch-fed cache (watch = 1) against a real
 * etcd on loopback: a thousand resolvers make one watch and no request per lookup (as
 * etcd's own /metrics counts them); announcements and revocations reach every resolver's
 * next answer; a broken watch falls back to lookups and comes back. */
#include "common.h"
#include "common_etcd.h"
#include "common_http.h"
#include "pconn_resolver.h"
#include "pconn_tcp.h"

#include "../resolvers/catalog.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <time.h>

#define RANGES "grpc_server_started_total{grpc_method=\"Range\""
#define WATCHES "grpc_server_started_total{grpc_method=\"Watch\""
#define NRES 1000

static tetcd_t etcd;
static bool etcd_up;

static bool need_etcd(void)
{
    if (!etcd_up)
        etcd_up = tetcd_start(&etcd) == 0;
    CU_ASSERT_TRUE(etcd_up);
    return etcd_up;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static pconn_resolver_t *watching(const char *url, const char *prefix)
{
    pconn_http_catalog_options_t o = {.url = url, .format = PCONN_CATALOG_ETCD, .key = prefix,
                                      .pick = PCONN_PICK_FIRST, .timeout_ms = 2000, .watch = 1};
    return pconn_resolver_http_catalog(&o);
}

/* Polls (no sleep: the condition itself, with a deadline) until the cache on prefix is
 * current (live true) with at least min_streams watch streams opened so far, or until it
 * is not current (live false). */
static bool wait_live(const char *prefix, bool live, unsigned min_streams)
{
    int64_t rev;
    unsigned watchers, streams;
    int64_t t0 = now_ms();
    while (now_ms() - t0 < WAIT_MS) {
        if (pconn__watch_probe(prefix, &rev, &watchers, &streams) == live &&
            (!live || streams >= min_streams))
            return true;
        sched_yield();
    }
    return false;
}

/* Asks r until it answers want, or the deadline passes. */
static bool wait_answer(pconn_resolver_t *r, const char *want)
{
    char address[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    int64_t t0 = now_ms();
    while (now_ms() - t0 < WAIT_MS) {
        if (pconn_resolve(r, address, sizeof address, &err) == PCONN_OK && strcmp(address, want) == 0)
            return true;
        sched_yield();
    }
    return false;
}

static void test_bad_options(void)
{
    pconn_http_catalog_options_t o = {.url = "http://127.0.0.1:1", .format = PCONN_CATALOG_JSON,
                                      .watch = 1};
    errno = 0;
    CU_ASSERT_PTR_NULL(pconn_resolver_http_catalog(&o)); /* only etcd can be watched */
    CU_ASSERT_EQUAL(errno, EINVAL);
    o.format = PCONN_CATALOG_ETCD;
    o.key = "/x/";
    o.watch = 2;
    errno = 0;
    CU_ASSERT_PTR_NULL(pconn_resolver_http_catalog(&o));
    CU_ASSERT_EQUAL(errno, EINVAL);
}

/* 1,000 resolvers on one prefix: one range read and one watch for all of them, no
 * request per lookup; a put, an announcement and its revocation reach every one. */
static void test_thousand_share_one_watch(void)
{
    if (!need_etcd())
        return;
    CU_ASSERT_EQUAL_FATAL(tetcd_put(&etcd, "/w/a/1", "127.0.0.1:7601"), 0);
    long long ranges0 = tetcd_metric(&etcd, RANGES), watches0 = tetcd_metric(&etcd, WATCHES);
    CU_ASSERT_FATAL(ranges0 >= 0 && watches0 >= 0);
    pconn_resolver_t **r = calloc(NRES, sizeof *r);
    for (int i = 0; i < NRES; i++) {
        r[i] = watching(etcd.url, "/w/a/");
        CU_ASSERT_PTR_NOT_NULL_FATAL(r[i]);
    }
    CU_ASSERT_TRUE_FATAL(wait_live("/w/a/", true, 1));
    int64_t rev;
    unsigned watchers, streams;
    pconn__watch_probe("/w/a/", &rev, &watchers, &streams);
    CU_ASSERT_EQUAL(watchers, 1);
    CU_ASSERT_EQUAL(streams, 1);
    long long ranges1 = tetcd_metric(&etcd, RANGES);
    CU_ASSERT_EQUAL(ranges1 - ranges0, 1); /* the cache's one full read */
    char address[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    int ok = 0;
    for (int i = 0; i < NRES; i++)
        ok += pconn_resolve(r[i], address, sizeof address, &err) == PCONN_OK &&
              strcmp(address, "127.0.0.1:7601") == 0;
    CU_ASSERT_EQUAL(ok, NRES);

    /* A new instance, sorted first: every resolver's answer moves to it. */
    CU_ASSERT_EQUAL(tetcd_put(&etcd, "/w/a/0", "127.0.0.1:7600"), 0);
    for (int i = 0; i < NRES; i++)
        CU_ASSERT_TRUE(wait_answer(r[i], "127.0.0.1:7600"));
    /* An announcer's key, and its revocation. */
    CU_ASSERT_EQUAL(tetcd_delete(&etcd, "/w/a/0"), 0);
    pconn_announce_options_t ao = {.etcd_url = etcd.url, .key = "/w/a/00",
                                   .address = "127.0.0.1:7602", .ttl_s = 30};
    pconn_announcer_t *a = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_announce_start(&ao, &a, &err), PCONN_OK);
    for (int i = 0; i < NRES; i++)
        CU_ASSERT_TRUE(wait_answer(r[i], "127.0.0.1:7602"));
    pconn_announce_stop(a);
    for (int i = 0; i < NRES; i++)
        CU_ASSERT_TRUE(wait_answer(r[i], "127.0.0.1:7601"));

    /* All those answers without one more range read, through the one watch. */
    CU_ASSERT_EQUAL(tetcd_metric(&etcd, RANGES), ranges1);
    CU_ASSERT_EQUAL(tetcd_metric(&etcd, WATCHES) - watches0, 1);
    for (int i = 0; i < NRES; i++)
        pconn_resolver_free(r[i]);
    free(r);
    pconn__watch_probe("/w/a/", &rev, &watchers, &streams);
    CU_ASSERT_EQUAL(watchers, 0); /* gone with the last resolver */
    tetcd_delete(&etcd, "/w/");
}

/* Connections counted by where they went. */
typedef struct arrivals_t {
    pthread_mutex_t m;
    pthread_cond_t c;
    int at_a, at_b;
    char b[64];
} arrivals_t;

static void on_arrival(const pconn_event_t *ev, void *arg)
{
    arrivals_t *k = arg;
    if (ev->kind != PCONN_EVENT_CONNECTED)
        return;
    pthread_mutex_lock(&k->m);
    if (strcmp(ev->address, k->b) == 0)
        k->at_b++;
    else
        k->at_a++;
    pthread_cond_broadcast(&k->c);
    pthread_mutex_unlock(&k->m);
}

typedef struct acceptor_t {
    int lfd, n, fds[4096];
} acceptor_t;

/* Accepts and keeps every connection (so none hangs up) until the listener is shut. */
static void *accept_main(void *arg)
{
    acceptor_t *a = arg;
    int fd;
    while ((fd = accept(a->lfd, NULL, NULL)) >= 0) {
        if (a->n < (int)(sizeof a->fds / sizeof a->fds[0]))
            a->fds[a->n++] = fd;
        else
            close(fd);
    }
    return NULL;
}

static int64_t no_delay(void *arg, unsigned failures)
{
    (void)arg, (void)failures;
    return 0;
}

/* 1,000 pconns in one process, each resolving one prefix through its own watch = 1
 * resolver: they connect, and when an instance is announced and every connection is
 * closed they all move to it, with one watch in all and not one range request more. */
static void test_thousand_pconns(void)
{
    if (!need_etcd())
        return;
    enum { N = 1000 };
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < 4 * N + 200 && rl.rlim_max >= 4 * N + 200) {
        rl.rlim_cur = 4 * N + 200;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    CU_ASSERT_FATAL(rl.rlim_cur >= 4 * N + 200); /* two connections each, both ends */
    pconn_error_t err;
    acceptor_t *acc = calloc(2, sizeof *acc);
    pthread_t at[2];
    char addr[2][64];
    for (int i = 0; i < 2; i++) {
        acc[i].lfd = pconn_tcp_listen("127.0.0.1:0", 4096, &err);
        CU_ASSERT_FATAL(acc[i].lfd >= 0);
        pconn_tcp_local_address(acc[i].lfd, addr[i], sizeof addr[i]);
        CU_ASSERT_EQUAL_FATAL(pthread_create(&at[i], NULL, accept_main, &acc[i]), 0);
    }
    CU_ASSERT_EQUAL_FATAL(tetcd_put(&etcd, "/w/p/1", addr[0]), 0);
    pconn_resolver_t *keep = watching(etcd.url, "/w/p/"); /* the cache, live before the rest */
    CU_ASSERT_TRUE_FATAL(wait_live("/w/p/", true, 1));
    long long ranges0 = tetcd_metric(&etcd, RANGES), watches0 = tetcd_metric(&etcd, WATCHES);

    arrivals_t k = {.m = PTHREAD_MUTEX_INITIALIZER};
    test_cond_init(&k.c);
    snprintf(k.b, sizeof k.b, "%s", addr[1]);
    pconn_t **pc = calloc(N, sizeof *pc);
    for (int i = 0; i < N; i++) {
        pconn_options_t o = {.server_name = "many", .resolver = watching(etcd.url, "/w/p/"),
                             .on_event = on_arrival, .on_event_arg = &k, .retry_delay = no_delay};
        CU_ASSERT_EQUAL_FATAL(pconn_tcp_create(&o, NULL, &pc[i]), PCONN_OK);
    }
    CU_ASSERT_EQUAL(test_wait_count(&k.m, &k.c, &k.at_a, N, 3 * WAIT_MS), N);

    /* A new instance, sorted first; then every connection ends: all go to it. */
    CU_ASSERT_EQUAL(tetcd_put(&etcd, "/w/p/0", addr[1]), 0);
    CU_ASSERT_TRUE(wait_answer(keep, addr[1]));
    for (int i = 0; i < N; i++) {
        pconn_conn_t *c = pconn_current(pc[i]);
        if (c != NULL) {
            pconn_conn_close(c);
            pconn_conn_unref(c);
        }
    }
    CU_ASSERT_EQUAL(test_wait_count(&k.m, &k.c, &k.at_b, N, 3 * WAIT_MS), N);
    CU_ASSERT_EQUAL(tetcd_metric(&etcd, RANGES), ranges0);   /* no request per attempt */
    CU_ASSERT_EQUAL(tetcd_metric(&etcd, WATCHES), watches0); /* the one watch */
    int64_t rev;
    unsigned watchers, streams;
    pconn__watch_probe("/w/p/", &rev, &watchers, &streams);
    CU_ASSERT_EQUAL(watchers, 1);

    for (int i = 0; i < N; i++)
        pconn_free(pc[i]);
    free(pc);
    pconn_resolver_free(keep);
    for (int i = 0; i < 2; i++) {
        shutdown(acc[i].lfd, SHUT_RDWR);
        pthread_join(at[i], NULL);
        close(acc[i].lfd);
        for (int j = 0; j < acc[i].n; j++)
            close(acc[i].fds[j]);
    }
    free(acc);
    pthread_cond_destroy(&k.c);
    tetcd_delete(&etcd, "/w/");
}

/* A Consul list of one instance at 127.0.0.1:port. */
static void consul_list(char *buf, size_t size, int port)
{
    snprintf(buf, size, "[{\"Node\":{\"Node\":\"n1\",\"Address\":\"127.0.0.1\"},"
             "\"Service\":{\"ID\":\"web%d\",\"Service\":\"web\",\"Address\":\"\",\"Port\":%d}}]",
             port, port);
}

static pconn_resolver_t *consul_watching(const char *url)
{
    pconn_http_catalog_options_t o = {.url = url, .format = PCONN_CATALOG_CONSUL, .key = "web",
                                      .pick = PCONN_PICK_FIRST, .timeout_ms = 2000, .watch = 1};
    return pconn_resolver_http_catalog(&o);
}

/* Consul (an agent that answers blocking queries as Consul documents them; there is no
 * Consul package to test against): 100 resolvers share one cache fed by one blocking
 * query at a time, a change reaches all of them without a request per lookup, an index
 * that goes backwards starts again from 0, and a dead agent passes the turn to the next
 * one in the list. */
static void test_consul_blocking(void)
{
    enum { R = 100 };
    thttp_t a, b;
    char list[512], url[200];
    consul_list(list, sizeof list, 7801);
    CU_ASSERT_EQUAL_FATAL(thttp_start(&a, HTTP_CONSUL, 200, NULL), 0);
    CU_ASSERT_EQUAL_FATAL(thttp_start(&b, HTTP_CONSUL, 200, NULL), 0);
    thttp_consul_set(&a, 10, list);
    thttp_consul_set(&b, 500, list);
    snprintf(url, sizeof url, "%s,%s", a.url, b.url);
    pconn_resolver_t *r[R];
    for (int i = 0; i < R; i++) {
        r[i] = consul_watching(url);
        CU_ASSERT_PTR_NOT_NULL_FATAL(r[i]);
    }
    CU_ASSERT_TRUE_FATAL(wait_live("web", true, 1));
    int64_t index;
    unsigned watchers, queries;
    pconn__watch_probe("web", &index, &watchers, &queries);
    CU_ASSERT_EQUAL(watchers, 1);
    CU_ASSERT_EQUAL(index, 10);
    /* The second query is blocking, with the first answer's index. */
    CU_ASSERT_EQUAL(thttp_wait_requests(&a, 2, WAIT_MS), 2);
    char req[8192];
    thttp_last_request(&a, req, sizeof req);
    CU_ASSERT_EQUAL(strncmp(req, "GET /v1/health/service/web?passing&index=10&wait=30s HTTP/1.1\r\n", 63), 0);
    for (int i = 0; i < R; i++)
        CU_ASSERT_TRUE(wait_answer(r[i], "127.0.0.1:7801"));

    /* A change: the blocked query returns it; every resolver answers it. */
    consul_list(list, sizeof list, 7802);
    thttp_consul_set(&a, 11, list);
    for (int i = 0; i < R; i++)
        CU_ASSERT_TRUE(wait_answer(r[i], "127.0.0.1:7802"));
    CU_ASSERT_TRUE(thttp_wait_requests(&a, 3, WAIT_MS) >= 3);
    pthread_mutex_lock(&a.mutex);
    int requests = a.requests; /* blocking queries only: not one per lookup */
    pthread_mutex_unlock(&a.mutex);
    CU_ASSERT(requests <= 4);

    /* The index goes backwards (a restarted agent): after its wait the query returns
     * the lower index, and the next one starts from 0. */
    pthread_mutex_lock(&a.mutex);
    a.consul_max_wait_ms = 100; /* instead of 30 s: the query waiting now ends sooner */
    pthread_mutex_unlock(&a.mutex);
    consul_list(list, sizeof list, 7803);
    thttp_consul_set(&a, 3, list);
    for (int i = 0; i < R; i++)
        CU_ASSERT_TRUE(wait_answer(r[i], "127.0.0.1:7803"));
    int64_t t0 = now_ms();
    while (now_ms() - t0 < WAIT_MS) {
        thttp_last_request(&a, req, sizeof req);
        if (strstr(req, "index=3&") != NULL)
            break;
        sched_yield();
    }
    CU_ASSERT_PTR_NOT_NULL(strstr(req, "index=3&")); /* blocking again, from the new index */

    /* The agent dies: the next one in the list takes over. */
    thttp_stop(&a);
    consul_list(list, sizeof list, 7804);
    thttp_consul_set(&b, 501, list);
    for (int i = 0; i < R; i++)
        CU_ASSERT_TRUE(wait_answer(r[i], "127.0.0.1:7804"));
    for (int i = 0; i < R; i++)
        pconn_resolver_free(r[i]);
    pconn__watch_probe("web", &index, &watchers, &queries);
    CU_ASSERT_EQUAL(watchers, 0);
    thttp_stop(&b);
}

/* An agent that answers every query at once, its index jumping back and forth: the
 * cache asks it at most once a second instead of spinning (each answer is taken). */
static void test_consul_agent_without_blocking(void)
{
    thttp_t a;
    char list[512];
    consul_list(list, sizeof list, 7811);
    CU_ASSERT_EQUAL_FATAL(thttp_start(&a, HTTP_CONSUL, 200, NULL), 0);
    thttp_consul_set(&a, 100, list);
    pthread_mutex_lock(&a.mutex);
    a.consul_alt = 50;
    pthread_mutex_unlock(&a.mutex);
    pconn_resolver_t *r = consul_watching(a.url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    CU_ASSERT_TRUE_FATAL(wait_live("web", true, 1)); /* from now on only the cache asks */
    CU_ASSERT_TRUE(wait_answer(r, "127.0.0.1:7811"));
    pthread_mutex_lock(&a.mutex);
    int n0 = a.requests;
    pthread_mutex_unlock(&a.mutex);
    int64_t t0 = now_ms();
    CU_ASSERT_EQUAL(thttp_wait_requests(&a, n0 + 3, WAIT_MS), n0 + 3);
    /* Each query starts a second after the one before: three more take two seconds at
     * least (a lower bound, which a slow machine only makes easier to meet). */
    CU_ASSERT(now_ms() - t0 >= 1900);
    pconn_resolver_free(r);
    thttp_stop(&a);
}

/* The last instance revoked: the cache answers "no instances" as a lookup would. */
static void test_empty_list(void)
{
    if (!need_etcd())
        return;
    pconn_resolver_t *r = watching(etcd.url, "/w/e/");
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    CU_ASSERT_TRUE_FATAL(wait_live("/w/e/", true, 0));
    char address[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_resolve(r, address, sizeof address, &err), PCONN_ERESOLVE);
    char want[200];
    snprintf(want, sizeof want, "catalog %s/v3/kv/range: no instances", etcd.url);
    CU_ASSERT_STRING_EQUAL(err.message, want);
    CU_ASSERT_EQUAL(tetcd_put(&etcd, "/w/e/1", "{\"host\":\"::1\",\"port\":7610}"), 0);
    CU_ASSERT_TRUE(wait_answer(r, "[::1]:7610"));
    CU_ASSERT_EQUAL(tetcd_put(&etcd, "/w/e/1", "not an address"), 0); /* now invalid: skipped */
    int64_t t0 = now_ms();
    int rc = PCONN_OK;
    while (rc == PCONN_OK && now_ms() - t0 < WAIT_MS)
        rc = pconn_resolve(r, address, sizeof address, &err);
    CU_ASSERT_EQUAL(rc, PCONN_ERESOLVE);
    CU_ASSERT_STRING_EQUAL(err.message, want);
    pconn_resolver_free(r);
    tetcd_delete(&etcd, "/w/");
}

/* etcd killed: the watch breaks, lookups are made (and fail, naming the cause); etcd
 * back: the watch comes back from the revision it had, and answers from the cache. */
static void test_watch_breaks_and_returns(void)
{
    if (!need_etcd())
        return;
    CU_ASSERT_EQUAL_FATAL(tetcd_put(&etcd, "/w/b/1", "127.0.0.1:7621"), 0);
    pconn_resolver_t *r = watching(etcd.url, "/w/b/");
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    CU_ASSERT_TRUE_FATAL(wait_live("/w/b/", true, 1));
    tetcd_kill(&etcd);
    CU_ASSERT_TRUE(wait_live("/w/b/", false, 0));
    char address[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_resolve(r, address, sizeof address, &err), PCONN_ERESOLVE);
    char want[200];
    snprintf(want, sizeof want, "catalog %s/v3/kv/range: Couldn't connect to server: Connection refused",
             etcd.url);
    CU_ASSERT_STRING_EQUAL(err.message, want);
    CU_ASSERT_EQUAL_FATAL(tetcd_restart(&etcd), 0);
    CU_ASSERT_EQUAL(tetcd_put(&etcd, "/w/b/0", "127.0.0.1:7620"), 0);
    long long put_rev = tetcd_revision(&etcd);
    CU_ASSERT_TRUE(wait_answer(r, "127.0.0.1:7620"));
    CU_ASSERT_TRUE(wait_live("/w/b/", true, 2)); /* watching again */
    int64_t rev;
    unsigned watchers, streams;
    pconn__watch_probe("/w/b/", &rev, &watchers, &streams);
    CU_ASSERT_TRUE(rev >= put_rev); /* current: the put made while it was down is in */
    long long ranges = tetcd_metric(&etcd, RANGES);
    for (int i = 0; i < 100; i++)
        CU_ASSERT_EQUAL(pconn_resolve(r, address, sizeof address, &err), PCONN_OK);
    CU_ASSERT_EQUAL(tetcd_metric(&etcd, RANGES), ranges);
    pconn_resolver_free(r);
    tetcd_delete(&etcd, "/w/");
}

/* ---- a 3-member cluster: the watch's member lost ----------------------------------- */

static tetcd_t m[3];
static bool cluster_up;

/* Member indexes: two followers, then the leader; urls lists them in that order, so a
 * watcher's first member (the first that answers its read) is follower f[0]. */
static bool need_cluster(int f[3], char *urls, size_t size)
{
    if (!cluster_up)
        cluster_up = tetcd_cluster_start(m, 3) == 0;
    CU_ASSERT_TRUE(cluster_up);
    if (!cluster_up)
        return false;
    int leader = -1;
    int64_t t0 = now_ms();
    while (leader < 0 && now_ms() - t0 < WAIT_MS)
        for (int i = 0; i < 3 && leader < 0; i++)
            if (tetcd_is_leader(&m[i]) == 1)
                leader = i;
    CU_ASSERT_TRUE(leader >= 0);
    if (leader < 0)
        return false;
    f[0] = (leader + 1) % 3;
    f[1] = (leader + 2) % 3;
    f[2] = leader;
    snprintf(urls, size, "%s,%s,%s", m[f[0]].url, m[f[1]].url, m[f[2]].url);
    return true;
}

/* The watch's member stopped (so its stream neither moves nor breaks) while an instance
 * is announced through the others, then killed: the watch comes back through the next
 * member from the revision it had, and the change made meanwhile is in the list. With
 * compact, etcd has also forgotten that revision: one full read, then a watch again. */
static void member_lost(const char *prefix, bool compact)
{
    int f[3];
    char urls[256];
    if (!need_cluster(f, urls, sizeof urls))
        return;
    char key[64];
    snprintf(key, sizeof key, "%s1", prefix);
    CU_ASSERT_EQUAL_FATAL(tetcd_put(&m[f[2]], key, "127.0.0.1:7631"), 0);
    pconn_resolver_t *r = watching(urls, prefix);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    CU_ASSERT_TRUE_FATAL(wait_live(prefix, true, 1));
    char address[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_resolve(r, address, sizeof address, &err), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(address, "127.0.0.1:7631");
    kill(m[f[0]].pid, SIGSTOP);
    snprintf(key, sizeof key, "%s0", prefix);
    CU_ASSERT_EQUAL(tetcd_put(&m[f[1]], key, "127.0.0.1:7630"), 0);
    long long put_rev = tetcd_revision(&m[f[1]]);
    if (compact) { /* a write more, so that the watch's next revision is compacted */
        CU_ASSERT_EQUAL(tetcd_put(&m[f[1]], "/wc/other", "x"), 0);
        CU_ASSERT_EQUAL(tetcd_compact(&m[f[1]]), 0);
    }
    int64_t rev;
    unsigned watchers, streams;
    pconn__watch_probe(prefix, &rev, &watchers, &streams);
    CU_ASSERT_EQUAL(streams, 1); /* still the first, to the stopped member */
    tetcd_kill(&m[f[0]]);
    /* Compacted: etcd creates the watch, then cancels it (compact_revision), the list
     * is read again, and a third stream opened. */
    CU_ASSERT_TRUE(wait_live(prefix, true, compact ? 3 : 2));
    pconn__watch_probe(prefix, &rev, &watchers, &streams);
    CU_ASSERT_TRUE(rev >= put_rev);
    CU_ASSERT_EQUAL(pconn_resolve(r, address, sizeof address, &err), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(address, "127.0.0.1:7630");
    pconn_resolver_free(r);
    tetcd_delete(&m[f[1]], prefix);
    CU_ASSERT_EQUAL(tetcd_restart(&m[f[0]]), 0);
}

static void test_cluster_member_lost(void)
{
    member_lost("/wc/a/", false);
}

static void test_cluster_member_lost_compacted(void)
{
    member_lost("/wc/b/", true);
}

/* fork(): the child forgets the parent's watchers (their thread stayed behind, their
 * lock may be held, their list would never change again) and a watching resolver made
 * in the child works; the parent's goes on. */
static void test_fork_forgets_watchers(void)
{
    if (!need_etcd())
        return;
    CU_ASSERT_EQUAL_FATAL(tetcd_put(&etcd, "/w/f/1", "127.0.0.1:7611"), 0);
    pconn_resolver_t *r = watching(etcd.url, "/w/f/");
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    CU_ASSERT_TRUE_FATAL(wait_live("/w/f/", true, 1));
    fflush(stdout); /* not fflush(NULL): the etcd log reader holds its FILE while it reads */
    fflush(stderr);
    pid_t pid = fork();
    CU_ASSERT_FATAL(pid >= 0);
    if (pid == 0) {
        int bad = 0;
        int64_t rev;
        unsigned watchers = 1, streams;
        pconn__watch_probe("/w/f/", &rev, &watchers, &streams);
        if (watchers != 0)
            bad |= 1;
#ifndef __SANITIZE_THREAD__ /* TSan cannot follow threads started after a threaded fork */
        pconn_http_catalog_options_t co = {.url = etcd.url, .format = PCONN_CATALOG_ETCD,
                                           .key = "/w/f/", .watch = 1};
        pconn_resolver_t *r2 = pconn_resolver_http_catalog(&co);
        char a[PCONN_ADDRESS_MAX];
        pconn_error_t e;
        if (r2 == NULL || pconn_resolve(r2, a, sizeof a, &e) != PCONN_OK || strcmp(a, "127.0.0.1:7611") != 0)
            bad |= 2;
        pconn_resolver_free(r2);
#endif
        _exit(bad);
    }
    int status = -1;
    CU_ASSERT_EQUAL(waitpid(pid, &status, 0), pid);
    CU_ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    char a[PCONN_ADDRESS_MAX];
    pconn_error_t e;
    CU_ASSERT_EQUAL(pconn_resolve(r, a, sizeof a, &e), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(a, "127.0.0.1:7611");
    pconn_resolver_free(r);
    tetcd_delete(&etcd, "/w/f/");
}

static const test_def_t tests[] = {
    {"bad_options", test_bad_options},
    {"thousand_share_one_watch", test_thousand_share_one_watch},
    {"thousand_pconns", test_thousand_pconns},
    {"consul_blocking", test_consul_blocking},
    {"consul_agent_without_blocking", test_consul_agent_without_blocking},
    {"empty_list", test_empty_list},
    {"watch_breaks_and_returns", test_watch_breaks_and_returns},
    {"cluster_member_lost", test_cluster_member_lost},
    {"cluster_member_lost_compacted", test_cluster_member_lost_compacted},
    {"fork_forgets_watchers", test_fork_forgets_watchers},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    int rc = run_suite("watch", tests, argc, argv);
    if (etcd_up)
        tetcd_stop(&etcd);
    for (int i = 0; cluster_up && i < 3; i++)
        tetcd_stop(&m[i]);
    return rc;
}
