/* test_lookup.c - name lookups that pconn_close() interrupts and deadlines bound.
 * This program defines getaddrinfo() itself, which the statically linked library calls
 * instead of the C library's: names under ".slow.test" block until the test lets them
 * go (a lookup whose server never answers); every other name goes to the real one. */
#include "common.h"
#include "pconn_resolver.h"
#include "pconn_tcp.h"

#include <dlfcn.h>
#include <netdb.h>
#include <string.h>

static pthread_mutex_t slow_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t slow_cond; /* on CLOCK_MONOTONIC, as test_wait_count() needs */
static int slow_entered, slow_returned;
static bool slow_released;

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    const char *suffix = ".slow.test";
    size_t n = node != NULL ? strlen(node) : 0;
    if (n < strlen(suffix) || strcmp(node + n - strlen(suffix), suffix) != 0) {
        int (*real)(const char *, const char *, const struct addrinfo *, struct addrinfo **) =
            (int (*)(const char *, const char *, const struct addrinfo *, struct addrinfo **))
                dlsym(RTLD_NEXT, "getaddrinfo");
        return real(node, service, hints, res);
    }
    pthread_mutex_lock(&slow_mutex);
    slow_entered++;
    pthread_cond_broadcast(&slow_cond);
    while (!slow_released)
        pthread_cond_wait(&slow_cond, &slow_mutex);
    slow_returned++;
    pthread_cond_broadcast(&slow_cond);
    pthread_mutex_unlock(&slow_mutex);
    *res = NULL;
    return EAI_NONAME;
}

static void slow_reset(void)
{
    pthread_mutex_lock(&slow_mutex);
    slow_entered = slow_returned = 0;
    slow_released = false;
    pthread_mutex_unlock(&slow_mutex);
}

/* Lets every blocked lookup go and waits until each that entered has returned (a
 * helper thread of an abandoned attempt may enter only now: it returns at once). */
static void slow_release_all(void)
{
    struct timespec deadline = test_deadline(WAIT_MS);
    pthread_mutex_lock(&slow_mutex);
    slow_released = true;
    pthread_cond_broadcast(&slow_cond);
    int rc = 0;
    while (slow_returned < slow_entered && rc == 0)
        rc = pthread_cond_timedwait(&slow_cond, &slow_mutex, &deadline);
    CU_ASSERT_EQUAL(slow_returned, slow_entered);
    pthread_mutex_unlock(&slow_mutex);
}

static int64_t no_delay(void *arg, unsigned failures)
{
    (void)arg, (void)failures;
    return 0;
}

static pconn_t *start(recorder_t *rec, pconn_resolver_t *r, const pconn_tcp_options_t *tcp)
{
    pconn_options_t o = {.server_name = "lookup",
                         .resolver = r,
                         .on_event = rec_on_event,
                         .on_event_arg = rec,
                         .retry_delay = no_delay};
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL(pconn_tcp_create(&o, tcp, &pc), PCONN_OK);
    return pc;
}

/* Close while the worker is inside a lookup that never ends: close finishes, nothing is
 * reported as a failure, and the abandoned lookup frees what it made when it ends. */
static void close_during(pconn_resolver_t *r, const char *expected)
{
    slow_reset();
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc = start(&rec, r, NULL);
    CU_ASSERT_EQUAL(test_wait_count(&slow_mutex, &slow_cond, &slow_entered, 1, WAIT_MS), 1);
    int rc = pconn_close(pc, WAIT_MS);
    CU_ASSERT_EQUAL(rc, PCONN_OK);
    if (rc != PCONN_OK)
        slow_release_all(); /* the bug: free would wait for the lookup forever */
    pconn_free(pc);
    char seq[64];
    rec_letters(&rec, seq, sizeof seq);
    CU_ASSERT_STRING_EQUAL(seq, expected);
    slow_release_all();
    rec_destroy(&rec);
    CU_ASSERT_EQUAL(slow_returned, 1);
}

static void test_close_interrupts_tcp_lookup(void)
{
    const char *list[] = {"db.slow.test:5432"};
    close_during(pconn_resolver_static(list, 1), "AO"); /* attempting, obtained the name */
}

static void test_close_interrupts_dns_resolver(void)
{
    close_during(pconn_resolver_dns("db.slow.test", 5432), "A");
}

/* connect_timeout_ms covers the lookup: a FAILED_TO_CONNECT with PCONN_ETIMEDOUT. */
static void test_lookup_deadline(void)
{
    slow_reset();
    recorder_t rec;
    rec_init(&rec);
    const char *list[] = {"db.slow.test:5432"};
    pconn_tcp_options_t tcp = {.connect_timeout_ms = 30};
    pconn_t *pc = start(&rec, pconn_resolver_static(list, 1), &tcp);
    int i = rec_wait_kind(&rec, PCONN_EVENT_FAILED_TO_CONNECT, 0, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    rec_event_t ev = rec_get(&rec, i);
    CU_ASSERT_EQUAL(ev.error.code, PCONN_ETIMEDOUT);
    CU_ASSERT_STRING_EQUAL(ev.error.message,
                           "connect db.slow.test:5432: resolve db.slow.test: timed out after 30 ms");
    CU_ASSERT_EQUAL(pconn_close(pc, WAIT_MS), PCONN_OK);
    pconn_free(pc);
    slow_release_all();
    rec_destroy(&rec);
}

/* A kick during a lookup does not cut it short: its answer is still reported. */
static void test_kick_does_not_abandon(void)
{
    slow_reset();
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc = start(&rec, pconn_resolver_dns("db.slow.test", 5432), NULL);
    CU_ASSERT_EQUAL(test_wait_count(&slow_mutex, &slow_cond, &slow_entered, 1, WAIT_MS), 1);
    pconn_kick(pc);
    pthread_mutex_lock(&slow_mutex);
    slow_released = true;
    pthread_cond_broadcast(&slow_cond);
    pthread_mutex_unlock(&slow_mutex);
    int i = rec_wait_kind(&rec, PCONN_EVENT_FAILED_TO_CONNECT, 0, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    rec_event_t ev = rec_get(&rec, i);
    CU_ASSERT_EQUAL(ev.error.code, PCONN_ERESOLVE);
    CU_ASSERT_STRING_EQUAL(ev.error.message, "dns db.slow.test: Name or service not known");
    pconn_free(pc);
    rec_destroy(&rec);
}

/* Names the real resolver answers still work through the helper thread. */
static void test_real_lookup(void)
{
    pconn_conn_t *c = NULL;
    pconn_error_t err;
    int rc = pconn_tcp_connect(NULL, "nonexistent.invalid:80", &c, &err);
    CU_ASSERT_EQUAL(rc, PCONN_ERESOLVE);
    CU_ASSERT_PTR_NULL(c);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "connect nonexistent.invalid:80: resolve nonexistent.invalid: "));
}

static const test_def_t tests[] = {
    {"close_interrupts_tcp_lookup", test_close_interrupts_tcp_lookup},
    {"close_interrupts_dns_resolver", test_close_interrupts_dns_resolver},
    {"lookup_deadline", test_lookup_deadline},
    {"kick_does_not_abandon", test_kick_does_not_abandon},
    {"real_lookup", test_real_lookup},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    test_cond_init(&slow_cond);
    return run_suite("lookup", tests, argc, argv);
}
