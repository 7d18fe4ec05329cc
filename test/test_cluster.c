/* test_cluster.c - the catalog resolver and the announcer against a real 3-member etcd
 * cluster on loopback: a member killed, the leader killed, the quorum lost and back. */
#include "common.h"
#include "common_etcd.h"
#include "pconn_resolver.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static tetcd_t m[3];
static bool up;
static char urls[256]; /* "url0,url1,url2" */

static bool need_cluster(void)
{
    if (!up) {
        up = tetcd_cluster_start(m, 3) == 0;
        snprintf(urls, sizeof urls, "%s,%s,%s", m[0].url, m[1].url, m[2].url);
    }
    CU_ASSERT_TRUE(up);
    return up;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static pconn_resolver_t *resolver(const char *prefix, int64_t timeout_ms)
{
    pconn_http_catalog_options_t co = {.url = urls, .format = PCONN_CATALOG_ETCD, .key = prefix,
                                       .pick = PCONN_PICK_FIRST, .timeout_ms = timeout_ms};
    return pconn_resolver_http_catalog(&co);
}

/* Looks up until it answers or timeout_ms passes; the milliseconds that took, or -1. */
static int64_t lookup_until_ok(pconn_resolver_t *r, char *address, size_t size, int64_t timeout_ms)
{
    int64_t t0 = now_ms();
    pconn_error_t err;
    while (now_ms() - t0 < timeout_ms)
        if (pconn_resolve(r, address, size, &err) == PCONN_OK)
            return now_ms() - t0;
    return -1;
}

/* Kill -9 the member the resolver uses: the next lookup goes to another member. */
static void test_member_killed(void)
{
    if (!need_cluster())
        return;
    CU_ASSERT_EQUAL_FATAL(tetcd_put(&m[1], "/cl/a/1", "127.0.0.1:7501"), 0);
    pconn_resolver_t *r = resolver("/cl/a/", 2000);
    char address[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_resolve(r, address, sizeof address, &err), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(address, "127.0.0.1:7501");
    tetcd_kill(&m[0]); /* the first of the list: the one it asked */
    int64_t t0 = now_ms();
    CU_ASSERT_EQUAL(pconn_resolve(r, address, sizeof address, &err), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(address, "127.0.0.1:7501");
    fprintf(stderr, "[lookup after the kill: %lld ms] ", (long long)(now_ms() - t0));
    pconn_resolver_free(r);
    CU_ASSERT_EQUAL(tetcd_restart(&m[0]), 0);
}

/* Kill the leader: the announcer keeps its lease alive through another member, so its
 * key outlives three TTLs, and lookups go on. */
static void test_leader_killed(void)
{
    if (!need_cluster())
        return;
    pconn_announce_options_t ao = {.etcd_url = urls, .key = "/cl/b/1", .address = "127.0.0.1:7502",
                                   .ttl_s = 2};
    pconn_announcer_t *a = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_announce_start(&ao, &a, &err), PCONN_OK);
    int leader = -1;
    for (int i = 0; i < 3 && leader < 0; i++)
        if (tetcd_is_leader(&m[i]) == 1)
            leader = i;
    CU_ASSERT_FATAL(leader >= 0);
    int other = (leader + 1) % 3;
    long long rev = tetcd_revision(&m[other]);
    tetcd_kill(&m[leader]);
    /* No DELETE of the key within three TTLs (the lease would have expired by then). */
    CU_ASSERT_EQUAL(tetcd_watch(&m[other], "/cl/b/", rev, false, 6000), -1);
    CU_ASSERT_EQUAL(tetcd_count(&m[other], "/cl/b/"), 1);
    pconn_resolver_t *r = resolver("/cl/b/", 2000);
    char address[PCONN_ADDRESS_MAX];
    CU_ASSERT(lookup_until_ok(r, address, sizeof address, WAIT_MS) >= 0);
    CU_ASSERT_STRING_EQUAL(address, "127.0.0.1:7502");
    pconn_resolver_free(r);
    pconn_announce_stop(a);
    CU_ASSERT_EQUAL(tetcd_count(&m[other], "/cl/b/"), 0); /* revoked through a live member */
    CU_ASSERT_EQUAL(tetcd_restart(&m[leader]), 0);
}

/* Two members stopped: no quorum, and the error names every member; one back: the
 * lookups recover. */
static void test_no_quorum(void)
{
    if (!need_cluster())
        return;
    CU_ASSERT_EQUAL_FATAL(tetcd_put(&m[0], "/cl/c/1", "127.0.0.1:7503"), 0);
    pconn_resolver_t *r = resolver("/cl/c/", 1500);
    kill(m[1].pid, SIGSTOP);
    kill(m[2].pid, SIGSTOP);
    char address[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_resolve(r, address, sizeof address, &err), PCONN_ERESOLVE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "catalog: every member failed: "));
    for (int i = 0; i < 3; i++)
        CU_ASSERT_PTR_NOT_NULL(strstr(err.message, m[i].url));
    fprintf(stderr, "[%s] ", err.message);
    kill(m[1].pid, SIGCONT);
    int64_t took = lookup_until_ok(r, address, sizeof address, WAIT_MS);
    CU_ASSERT(took >= 0);
    CU_ASSERT_STRING_EQUAL(address, "127.0.0.1:7503");
    kill(m[2].pid, SIGCONT);
    pconn_resolver_free(r);
}

/* A list with a bad item is refused at create; one URL stays valid. */
static void test_bad_lists(void)
{
    const char *bad[] = {"http://a:1,", ",http://a:1", "http://a:1,,http://b:2", "http://a:1,ftp://b"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        pconn_http_catalog_options_t co = {.url = bad[i], .format = PCONN_CATALOG_ETCD, .key = "/x/"};
        CU_ASSERT_PTR_NULL(pconn_resolver_http_catalog(&co));
        pconn_announce_options_t ao = {.etcd_url = bad[i], .key = "/x/1", .address = "127.0.0.1:1"};
        pconn_announcer_t *a = NULL;
        pconn_error_t err;
        CU_ASSERT_EQUAL(pconn_announce_start(&ao, &a, &err), PCONN_EINVAL);
        CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "pconn_announce_start: etcd URL "));
    }
}

static const test_def_t tests[] = {
    {"bad_lists", test_bad_lists},
    {"member_killed", test_member_killed},
    {"leader_killed", test_leader_killed},
    {"no_quorum", test_no_quorum},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    int rc = run_suite("cluster", tests, argc, argv);
    for (int i = 0; up && i < 3; i++)
        tetcd_stop(&m[i]);
    return rc;
}
