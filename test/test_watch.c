/* test_watch.c - the etcd catalog's shared, watch-fed cache (watch = 1) against a real
 * etcd on loopback: a thousand resolvers make one watch and no request per lookup (as
 * etcd's own /metrics counts them); announcements and revocations reach every resolver's
 * next answer; a broken watch falls back to lookups and comes back. */
#include "common.h"
#include "common_etcd.h"
#include "pconn_resolver.h"

#include "../resolvers/catalog.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
