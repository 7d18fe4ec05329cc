/* test_core.c - the state machine, waits, close, references and clock of the core.
 * Connections are socketpairs; time is a manual clock, so no test sleeps or times. */
#include "common.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MS 1000000LL
#define MAX_PEERS 64

/* ---- a scripted connector ------------------------------------------------------- */

typedef struct env_t env_t;
typedef int (*plan_fn)(env_t *e, int call, const char *address, pconn_conn_t **conn,
                       pconn_error_t *err);

struct env_t {
    recorder_t rec;
    pconn_clock_t *clk;
    pconn_t *pc;
    plan_fn plan;
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int calls;               /* connect calls returned so far */
    int entered;             /* connect calls begun so far */
    int peers[MAX_PEERS];    /* peer ends of the fake connections, by call */
    bool hold;               /* connect blocks while true */
    bool gate;               /* retry_delay blocks from its second call on while true */
    int64_t connect_advance; /* ns the manual clock moves during each connect */
    int64_t delay_ms;
    unsigned failures_seen[64];
    int ndelays;
    atomic_int destroyed;
};

static int env_connect(void *arg, const char *address, pconn_conn_t **conn, pconn_error_t *err)
{
    env_t *e = arg;
    pthread_mutex_lock(&e->mutex);
    int call = e->entered++;
    pthread_cond_broadcast(&e->cond);
    while (e->hold)
        pthread_cond_wait(&e->cond, &e->mutex);
    pthread_mutex_unlock(&e->mutex);
    if (e->connect_advance > 0)
        pconn_clock_advance(e->clk, e->connect_advance);
    int rc = e->plan(e, call, address, conn, err);
    pthread_mutex_lock(&e->mutex);
    e->calls++;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->mutex);
    return rc;
}

static int64_t env_delay(void *arg, unsigned failures)
{
    env_t *e = arg;
    pthread_mutex_lock(&e->mutex);
    if (e->ndelays < 64)
        e->failures_seen[e->ndelays++] = failures;
    /* Holding the worker here keeps it from sleeping again, so a test can see whether
     * an advance woke it. */
    while (e->gate && e->ndelays > 1)
        pthread_cond_wait(&e->cond, &e->mutex);
    pthread_mutex_unlock(&e->mutex);
    return e->delay_ms;
}

static int plan_fail(env_t *e, int call, const char *address, pconn_conn_t **conn,
                     pconn_error_t *err)
{
    (void)e, (void)call, (void)conn;
    pconn_error_set(err, PCONN_ECONNECT, ECONNREFUSED, "connect %s", address);
    return PCONN_ECONNECT;
}

static int plan_ok(env_t *e, int call, const char *address, pconn_conn_t **conn,
                   pconn_error_t *err)
{
    (void)address, (void)err;
    *conn = fake_conn_new(&e->peers[call % MAX_PEERS], &e->destroyed);
    return PCONN_OK;
}

/* Fails twice, then connects. */
static int plan_fail2_ok(env_t *e, int call, const char *address, pconn_conn_t **conn,
                         pconn_error_t *err)
{
    if (call < 2)
        return plan_fail(e, call, address, conn, err);
    return plan_ok(e, call, address, conn, err);
}

/* Same address, two errors in turn. */
static int plan_alternate(env_t *e, int call, const char *address, pconn_conn_t **conn,
                          pconn_error_t *err)
{
    (void)e, (void)conn;
    pconn_error_set(err, PCONN_ECONNECT, 0, "connect %s: error %d", address, call % 2);
    return PCONN_ECONNECT;
}

static int plan_abort(env_t *e, int call, const char *address, pconn_conn_t **conn,
                      pconn_error_t *err)
{
    (void)e, (void)call, (void)conn;
    pconn_error_set(err, PCONN_EABORT, 0, "connect %s: credentials refused", address);
    return PCONN_EABORT;
}

static void env_init(env_t *e, plan_fn plan)
{
    memset(e, 0, sizeof *e);
    rec_init(&e->rec);
    pthread_mutex_init(&e->mutex, NULL);
    pthread_cond_init(&e->cond, NULL);
    e->plan = plan;
    e->delay_ms = 1000;
    e->clk = pconn_clock_manual_new(1000 * MS);
    for (int i = 0; i < MAX_PEERS; i++)
        e->peers[i] = -1;
}

static pconn_options_t env_options(env_t *e, pconn_resolver_t *r, uint64_t seed)
{
    pconn_options_t o = {
        .server_name = "svc",
        .resolver = r,
        .connect = env_connect,
        .connect_arg = e,
        .on_event = rec_on_event,
        .on_event_arg = &e->rec,
        .retry_delay = env_delay,
        .retry_delay_arg = e,
        .random_seed = seed,
        .clock = e->clk,
    };
    return o;
}

static void env_start_list(env_t *e, const char *const *addresses, size_t n, uint64_t seed)
{
    pconn_options_t o = env_options(e, pconn_resolver_static(addresses, n), seed);
    CU_ASSERT_FATAL(pconn_create(&o, &e->pc) == PCONN_OK);
}

static void env_start(env_t *e)
{
    static const char *const one[] = {"a:1"};
    env_start_list(e, one, 1, 42);
}

static void env_release(env_t *e);

static void env_finish(env_t *e)
{
    env_release(e);
    pconn_free(e->pc);
    for (int i = 0; i < MAX_PEERS; i++)
        if (e->peers[i] >= 0)
            close(e->peers[i]);
    pconn_clock_free(e->clk);
    rec_destroy(&e->rec);
    pthread_cond_destroy(&e->cond);
    pthread_mutex_destroy(&e->mutex);
}

static void env_release(env_t *e)
{
    pthread_mutex_lock(&e->mutex);
    e->hold = false;
    e->gate = false;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->mutex);
}

static int env_wait_calls(env_t *e, int n)
{
    pthread_mutex_lock(&e->mutex);
    while (e->calls < n)
        pthread_cond_wait(&e->cond, &e->mutex);
    int calls = e->calls;
    pthread_mutex_unlock(&e->mutex);
    return calls;
}

static int env_calls(env_t *e)
{
    pthread_mutex_lock(&e->mutex);
    int calls = e->calls;
    pthread_mutex_unlock(&e->mutex);
    return calls;
}

/* The worker sleeps on the manual clock right now (it has not been woken). */
static bool sleeping(env_t *e)
{
    return pconn_clock_wait_sleepers(e->clk, 1, 0) == PCONN_OK;
}

#define ASSERT_LETTERS(e, expected)                              \
    do {                                                         \
        char got_[REC_MAX + 1];                                  \
        rec_letters(&(e)->rec, got_, sizeof got_);               \
        CU_ASSERT_STRING_EQUAL(got_, expected);                  \
        if (strcmp(got_, expected) != 0)                         \
            fprintf(stderr, "\n  events %s, want %s\n", got_, expected); \
    } while (0)

/* ---- event sequences ------------------------------------------------------------ */

static void test_success_sequence(void)
{
    env_t e;
    env_init(&e, plan_ok);
    env_start(&e);
    CU_ASSERT_EQUAL(rec_wait(&e.rec, 3, WAIT_MS), 3);
    ASSERT_LETTERS(&e, "AOC");
    CU_ASSERT_STRING_EQUAL(rec_get(&e.rec, 1).address, "a:1");
    CU_ASSERT_STRING_EQUAL(rec_get(&e.rec, 2).address, "a:1");

    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL(pconn_connected(e.pc, WAIT_MS, &c), PCONN_OK);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    CU_ASSERT_STRING_EQUAL(pconn_conn_address(c), "a:1");
    pconn_stats_t st;
    pconn_stats(e.pc, &st);
    CU_ASSERT_EQUAL(st.state, PCONN_STATE_CONNECTED);
    CU_ASSERT_EQUAL(st.attempts, 1);
    CU_ASSERT_EQUAL(st.connects, 1);
    CU_ASSERT_EQUAL(st.failures, 0);
    CU_ASSERT_EQUAL(st.last_error.code, 0);

    /* The peer goes away: hang-up is noticed, DISCONNECTED follows. */
    close(e.peers[0]);
    e.peers[0] = -1;
    CU_ASSERT_EQUAL(rec_wait(&e.rec, 4, WAIT_MS), 4);
    ASSERT_LETTERS(&e, "AOCD");
    CU_ASSERT_STRING_EQUAL(rec_get(&e.rec, 3).address, "a:1");
    CU_ASSERT_TRUE(pconn_conn_is_closed(c));
    CU_ASSERT_EQUAL(atomic_load(&e.destroyed), 0); /* we still hold a reference */
    pconn_conn_unref(c);
    CU_ASSERT_EQUAL(atomic_load(&e.destroyed), 1);
    env_finish(&e);
}

static void test_failure_dedup(void)
{
    env_t e;
    env_init(&e, plan_fail);
    env_start(&e);
    for (int i = 0; i < 5; i++) {
        CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
        pconn_clock_advance(e.clk, 2000 * MS);
    }
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    ASSERT_LETTERS(&e, "AOF");
    rec_event_t f = rec_get(&e.rec, 2);
    CU_ASSERT_EQUAL(f.error.code, PCONN_ECONNECT);
    CU_ASSERT_EQUAL(f.error.sys_errno, ECONNREFUSED);
    CU_ASSERT_STRING_EQUAL(f.error.message, "connect a:1: Connection refused");
    pconn_stats_t st;
    pconn_stats(e.pc, &st);
    CU_ASSERT_EQUAL(st.attempts, 6);
    CU_ASSERT_EQUAL(st.failures, 6);
    CU_ASSERT_EQUAL(st.state, PCONN_STATE_WAITING);
    CU_ASSERT_EQUAL(st.last_error.code, PCONN_ECONNECT);
    CU_ASSERT_EQUAL(e.ndelays, 6);
    for (int i = 0; i < 6; i++)
        CU_ASSERT_EQUAL(e.failures_seen[i], (unsigned)i);
    env_finish(&e);
}

static void test_alternating_addresses(void)
{
    static const char *const two[] = {"a:1", "b:2"};
    env_t e;
    env_init(&e, plan_fail);
    env_start_list(&e, two, 2, 7);
    for (int i = 0; i < 3; i++) {
        CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
        pconn_clock_advance(e.clk, 2000 * MS);
    }
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    /* Each address differs from the last one, and so does each error. */
    ASSERT_LETTERS(&e, "AOFOFOFOF");
    CU_ASSERT_STRING_EQUAL(rec_get(&e.rec, 1).address, "a:1");
    CU_ASSERT_STRING_EQUAL(rec_get(&e.rec, 3).address, "b:2");
    CU_ASSERT_STRING_EQUAL(rec_get(&e.rec, 4).error.message, "connect b:2: Connection refused");
    CU_ASSERT_STRING_EQUAL(rec_get(&e.rec, 5).address, "a:1");
    env_finish(&e);
}

static void test_alternating_errors(void)
{
    env_t e;
    env_init(&e, plan_alternate);
    env_start(&e);
    for (int i = 0; i < 3; i++) {
        CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
        pconn_clock_advance(e.clk, 2000 * MS);
    }
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    /* One address: obtained once; errors alternate, so each is reported. */
    ASSERT_LETTERS(&e, "AOFFFF");
    CU_ASSERT_STRING_EQUAL(rec_get(&e.rec, 2).error.message, "connect a:1: error 0");
    CU_ASSERT_STRING_EQUAL(rec_get(&e.rec, 3).error.message, "connect a:1: error 1");
    env_finish(&e);
}

static void test_failures_reset_by_connect(void)
{
    env_t e;
    env_init(&e, plan_fail2_ok);
    env_start(&e);
    for (int i = 0; i < 2; i++) {
        CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
        pconn_clock_advance(e.clk, 2000 * MS);
    }
    CU_ASSERT_NOT_EQUAL_FATAL(rec_wait_kind(&e.rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS), -1);
    ASSERT_LETTERS(&e, "AOFC");
    close(e.peers[2]);
    e.peers[2] = -1;
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    pconn_clock_advance(e.clk, 2000 * MS);
    CU_ASSERT_NOT_EQUAL_FATAL(rec_wait_kind(&e.rec, PCONN_EVENT_CONNECTED, 1, WAIT_MS), -1);
    ASSERT_LETTERS(&e, "AOFCDAOC");
    CU_ASSERT_EQUAL(e.ndelays, 4);
    CU_ASSERT_EQUAL(e.failures_seen[0], 0);
    CU_ASSERT_EQUAL(e.failures_seen[1], 1);
    CU_ASSERT_EQUAL(e.failures_seen[2], 2);
    CU_ASSERT_EQUAL(e.failures_seen[3], 0); /* reset by the connect, not the disconnect */
    env_finish(&e);
}

/* ---- retry timing on the manual clock ------------------------------------------- */

/* The time (ms after the first attempt began) at which the worker wakes for attempt 2. */
static int64_t measure_wake_ms(uint64_t seed, int64_t delay_ms, int64_t connect_ms)
{
    env_t e;
    env_init(&e, plan_fail);
    e.delay_ms = delay_ms;
    e.connect_advance = connect_ms * MS;
    e.gate = true;
    static const char *const one[] = {"a:1"};
    env_start_list(&e, one, 1, seed);
    int64_t woke = -1;
    if (pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS) == PCONN_OK) {
        pconn_clock_advance(e.clk, (delay_ms * 7 / 10 - 1 - connect_ms) * MS);
        int64_t t = delay_ms * 7 / 10 - 1;
        while (sleeping(&e) && t <= delay_ms * 2) {
            pconn_clock_advance(e.clk, MS);
            t++;
        }
        if (!sleeping(&e))
            woke = t;
    }
    env_finish(&e);
    return woke;
}

static void test_retry_window(void)
{
    int64_t lo = INT64_MAX, hi = 0;
    for (uint64_t seed = 1; seed <= 40; seed++) {
        int64_t t = measure_wake_ms(seed, 1000, 0);
        CU_ASSERT(t >= 700 && t <= 1300);
        if (t < lo)
            lo = t;
        if (t > hi)
            hi = t;
    }
    /* The jitter spreads over the window, not a corner of it. */
    CU_ASSERT(lo < 800);
    CU_ASSERT(hi > 1200);
    /* random_seed makes it reproducible. */
    CU_ASSERT_EQUAL(measure_wake_ms(5, 1000, 0), measure_wake_ms(5, 1000, 0));
}

static void test_delay_counts_from_attempt_start(void)
{
    /* A connect that takes 400 ms of clock time does not push the next attempt back. */
    int64_t fast = measure_wake_ms(9, 1000, 0);
    int64_t slow = measure_wake_ms(9, 1000, 400);
    CU_ASSERT(fast >= 700 && fast <= 1300);
    CU_ASSERT_EQUAL(fast, slow);
}

static void test_slow_attempt_retries_at_once(void)
{
    /* An attempt longer than the delay: the next one starts without any wait. */
    env_t e;
    env_init(&e, plan_fail);
    e.connect_advance = 2000 * MS;
    env_start(&e);
    CU_ASSERT(env_wait_calls(&e, 3) >= 3); /* no advance from the test at all */
    env_finish(&e);
}

static void test_default_delay_is_10s(void)
{
    env_t e;
    env_init(&e, plan_fail);
    pconn_options_t o = env_options(&e, pconn_resolver_static((const char *const[]){"a:1"}, 1), 3);
    o.retry_delay = NULL;
    CU_ASSERT_FATAL(pconn_create(&o, &e.pc) == PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    pconn_clock_advance(e.clk, 6999 * MS);
    CU_ASSERT_TRUE(sleeping(&e));
    pconn_clock_advance(e.clk, 6001 * MS);
    CU_ASSERT(env_wait_calls(&e, 2) >= 2);
    env_finish(&e);
}

static void test_long_lived_reconnects_at_once(void)
{
    env_t e;
    env_init(&e, plan_ok);
    env_start(&e);
    CU_ASSERT_NOT_EQUAL_FATAL(rec_wait_kind(&e.rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS), -1);
    pconn_clock_advance(e.clk, 5000 * MS); /* connected for longer than 1.3 d */
    close(e.peers[0]);
    e.peers[0] = -1;
    /* No advance: the new cycle starts at once. */
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&e.rec, PCONN_EVENT_CONNECTED, 1, WAIT_MS), -1);
    ASSERT_LETTERS(&e, "AOCDAOC");
    env_finish(&e);
}

static void test_flapping_is_throttled(void)
{
    env_t e;
    env_init(&e, plan_ok);
    env_start(&e);
    CU_ASSERT_NOT_EQUAL_FATAL(rec_wait_kind(&e.rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS), -1);
    close(e.peers[0]); /* dropped at once */
    e.peers[0] = -1;
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    ASSERT_LETTERS(&e, "AOCD");
    pconn_clock_advance(e.clk, 699 * MS);
    CU_ASSERT_TRUE(sleeping(&e));
    pconn_clock_advance(e.clk, 601 * MS);
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&e.rec, PCONN_EVENT_CONNECTED, 1, WAIT_MS), -1);
    ASSERT_LETTERS(&e, "AOCDAOC");
    env_finish(&e);
}

static void test_kick(void)
{
    env_t e;
    env_init(&e, plan_fail);
    env_start(&e);
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    pconn_kick(e.pc);
    CU_ASSERT(env_wait_calls(&e, 2) >= 2); /* the clock never moved */
    env_finish(&e);
}

static void test_event_times(void)
{
    env_t e;
    env_init(&e, plan_fail);
    env_start(&e);
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    CU_ASSERT_EQUAL(rec_get(&e.rec, 0).time_ns, 1000 * MS);
    pconn_stats_t st;
    pconn_stats(e.pc, &st);
    CU_ASSERT_EQUAL(st.state_since_ns, 1000 * MS);
    env_finish(&e);
}

/* ---- abort, drain and close ----------------------------------------------------- */

static void test_abort_from_connect(void)
{
    env_t e;
    env_init(&e, plan_abort);
    env_start(&e);
    CU_ASSERT_EQUAL(pconn_close_finished(e.pc, WAIT_MS), PCONN_OK);
    ASSERT_LETTERS(&e, "AOF");
    CU_ASSERT_TRUE(pconn_is_closed(e.pc));
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL(pconn_connected(e.pc, 0, &c), PCONN_ECLOSED);
    CU_ASSERT_PTR_NULL(c);
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_connected_or_failed(e.pc, 0, &c, &err), PCONN_EABORT);
    CU_ASSERT_STRING_EQUAL(err.message, "connect a:1: credentials refused");
    CU_ASSERT_EQUAL(env_calls(&e), 1);
    pconn_stats_t st;
    pconn_stats(e.pc, &st);
    CU_ASSERT_EQUAL(st.state, PCONN_STATE_CLOSED);
    env_finish(&e);
}

static int resolve_abort(void *arg, char *address, size_t size, pconn_error_t *err)
{
    (void)arg, (void)address, (void)size;
    pconn_error_set(err, PCONN_EABORT, 0, "no such service");
    return PCONN_EABORT;
}

static void test_abort_from_resolver(void)
{
    env_t e;
    env_init(&e, plan_ok);
    pconn_options_t o = env_options(&e, pconn_resolver_new(resolve_abort, NULL, NULL), 1);
    CU_ASSERT_FATAL(pconn_create(&o, &e.pc) == PCONN_OK);
    CU_ASSERT_EQUAL(pconn_close_finished(e.pc, WAIT_MS), PCONN_OK);
    ASSERT_LETTERS(&e, "AF");
    CU_ASSERT_EQUAL(rec_get(&e.rec, 1).error.code, PCONN_EABORT);
    CU_ASSERT_EQUAL(env_calls(&e), 0);
    env_finish(&e);
}

static void test_drain(void)
{
    env_t e;
    env_init(&e, plan_ok);
    env_start(&e);
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(e.pc, WAIT_MS, &c), PCONN_OK);
    pconn_close_when_current_closed(e.pc);
    /* The current connection is left alone. */
    CU_ASSERT_FALSE(pconn_conn_is_closed(c));
    CU_ASSERT_EQUAL(pconn_close_finished(e.pc, 0), PCONN_ETIMEDOUT);
    close(e.peers[0]);
    e.peers[0] = -1;
    CU_ASSERT_EQUAL(pconn_close_finished(e.pc, WAIT_MS), PCONN_OK);
    ASSERT_LETTERS(&e, "AOCD");
    CU_ASSERT_TRUE(pconn_is_closed(e.pc));
    CU_ASSERT_EQUAL(env_calls(&e), 1);
    pconn_conn_unref(c);
    env_finish(&e);
}

static void test_drain_when_not_connected(void)
{
    env_t e;
    env_init(&e, plan_fail);
    env_start(&e);
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    pconn_close_when_current_closed(e.pc);
    CU_ASSERT_TRUE(pconn_is_closed(e.pc));
    CU_ASSERT_EQUAL(pconn_close_finished(e.pc, WAIT_MS), PCONN_OK);
    ASSERT_LETTERS(&e, "AOF");
    env_finish(&e);
}

static void test_close_while_waiting(void)
{
    env_t e;
    env_init(&e, plan_fail);
    env_start(&e);
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_close(e.pc, WAIT_MS), PCONN_OK); /* the clock never moved */
    ASSERT_LETTERS(&e, "AOF");
    CU_ASSERT_EQUAL(env_calls(&e), 1);
    env_finish(&e);
}

static void test_close_while_connected(void)
{
    env_t e;
    env_init(&e, plan_ok);
    env_start(&e);
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(e.pc, WAIT_MS, &c), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_close(e.pc, WAIT_MS), PCONN_OK);
    ASSERT_LETTERS(&e, "AOCD");
    CU_ASSERT_TRUE(pconn_conn_is_closed(c));
    CU_ASSERT_EQUAL(pconn_conn_wait_closed(c, 0), PCONN_OK);
    /* Closed, but not destroyed while we hold it; its fd is still ours to use (and fail). */
    CU_ASSERT_EQUAL(atomic_load(&e.destroyed), 0);
    char byte;
    CU_ASSERT_EQUAL(recv(e.peers[0], &byte, 1, 0), 0); /* the peer sees EOF */
    pconn_conn_unref(c);
    CU_ASSERT_EQUAL(atomic_load(&e.destroyed), 1);
    pconn_conn_t *again = NULL;
    CU_ASSERT_EQUAL(pconn_connected(e.pc, WAIT_MS, &again), PCONN_ECLOSED);
    CU_ASSERT_PTR_NULL(pconn_current(e.pc));
    env_finish(&e);
}

static void test_close_during_connect(void)
{
    env_t e;
    env_init(&e, plan_ok);
    e.hold = true;
    env_start(&e);
    pthread_mutex_lock(&e.mutex);
    while (e.entered == 0) /* the worker is inside the user's connect */
        pthread_cond_wait(&e.cond, &e.mutex);
    pthread_mutex_unlock(&e.mutex);
    CU_ASSERT_EQUAL(pconn_close(e.pc, 0), PCONN_ETIMEDOUT); /* stuck in the user's connect */
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL(pconn_connected(e.pc, WAIT_MS, &c), PCONN_ECLOSED);
    env_release(&e);
    CU_ASSERT_EQUAL(pconn_close_finished(e.pc, WAIT_MS), PCONN_OK);
    /* It connected after close began: closed at once, both events still told. */
    ASSERT_LETTERS(&e, "AOCD");
    CU_ASSERT_EQUAL(atomic_load(&e.destroyed), 1);
    env_finish(&e);
}

typedef struct cb_state_t {
    pconn_t **pc;
    int close_rc;
    bool current_matches, state_connected, connected_ok, current_null_before, name_ok;
    pconn_error_t err;
} cb_state_t;

static void hook_close(const pconn_event_t *ev, void *arg)
{
    cb_state_t *s = arg;
    if (ev->kind == PCONN_EVENT_CONNECTED)
        s->close_rc = pconn_close(*s->pc, PCONN_FOREVER); /* must not deadlock */
}

static void test_close_in_callback(void)
{
    env_t e;
    env_init(&e, plan_ok);
    cb_state_t s = {.pc = &e.pc, .close_rc = -1};
    e.rec.hook = hook_close;
    e.rec.hook_arg = &s;
    env_start(&e);
    CU_ASSERT_EQUAL(pconn_close_finished(e.pc, WAIT_MS), PCONN_OK);
    CU_ASSERT_EQUAL(s.close_rc, PCONN_OK);
    ASSERT_LETTERS(&e, "AOCD");
    env_finish(&e);
}

static void hook_public_calls(const pconn_event_t *ev, void *arg)
{
    cb_state_t *s = arg;
    pconn_t *pc = *s->pc;
    if (ev->kind == PCONN_EVENT_ATTEMPTING_TO_CONNECT) {
        pconn_conn_t *cur = pconn_current(pc);
        s->current_null_before = cur == NULL;
        pconn_conn_unref(cur);
        s->name_ok = strcmp(pconn_server_name(pc), "svc") == 0 &&
                     strcmp(ev->server_name, "svc") == 0;
    }
    if (ev->kind == PCONN_EVENT_CONNECTED) {
        pconn_conn_t *cur = pconn_current(pc);
        s->current_matches = cur == ev->conn;
        pconn_conn_unref(cur);
        pconn_stats_t st;
        pconn_stats(pc, &st);
        s->state_connected = st.state == PCONN_STATE_CONNECTED;
        pconn_conn_t *c = NULL;
        s->connected_ok = pconn_connected(pc, 0, &c) == PCONN_OK && c == ev->conn;
        pconn_conn_unref(c);
        pconn_kick(pc);
        pconn_conn_close(ev->conn); /* ends it from inside the callback */
    }
}

static void test_callbacks_call_public_functions(void)
{
    env_t e;
    env_init(&e, plan_ok);
    cb_state_t s = {.pc = &e.pc};
    e.rec.hook = hook_public_calls;
    e.rec.hook_arg = &s;
    env_start(&e);
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&e.rec, PCONN_EVENT_DISCONNECTED, 0, WAIT_MS), -1);
    CU_ASSERT_TRUE(s.current_null_before);
    CU_ASSERT_TRUE(s.name_ok);
    CU_ASSERT_TRUE(s.current_matches);
    CU_ASSERT_TRUE(s.state_connected);
    CU_ASSERT_TRUE(s.connected_ok);
    /* DISCONNECTED came after CONNECTED returned, though the conn died inside it. */
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    ASSERT_LETTERS(&e, "AOCD");
    env_finish(&e);
}

typedef struct free_state_t {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    bool resolver_freed;
    pconn_t *pc;
} free_state_t;

static void free_state_resolver_destroy(void *arg)
{
    free_state_t *s = arg;
    pthread_mutex_lock(&s->mutex);
    s->resolver_freed = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mutex);
}

static int resolve_fixed(void *arg, char *address, size_t size, pconn_error_t *err)
{
    (void)arg, (void)err;
    snprintf(address, size, "a:1");
    return PCONN_OK;
}

static void hook_free(const pconn_event_t *ev, void *arg)
{
    free_state_t *s = arg;
    if (ev->kind == PCONN_EVENT_FAILED_TO_CONNECT)
        pconn_free(s->pc);
}

static void test_free_in_callback(void)
{
    env_t e;
    env_init(&e, plan_fail);
    free_state_t s = {.resolver_freed = false};
    pthread_mutex_init(&s.mutex, NULL);
    pthread_cond_init(&s.cond, NULL);
    e.rec.hook = hook_free;
    e.rec.hook_arg = &s;
    pconn_options_t o = env_options(&e, pconn_resolver_new(resolve_fixed, &s, free_state_resolver_destroy), 1);
    pthread_mutex_lock(&s.mutex);
    CU_ASSERT_FATAL(pconn_create(&o, &s.pc) == PCONN_OK);
    while (!s.resolver_freed)
        pthread_cond_wait(&s.cond, &s.mutex);
    pthread_mutex_unlock(&s.mutex);
    ASSERT_LETTERS(&e, "AOF");
    e.pc = NULL; /* freed by itself */
    env_finish(&e);
    pthread_cond_destroy(&s.cond);
    pthread_mutex_destroy(&s.mutex);
}

/* ---- waits ---------------------------------------------------------------------- */

typedef struct waiter_t {
    pthread_t thread;
    pconn_t *pc;
    int rc;
    pconn_conn_t *conn;
} waiter_t;

static void *waiter_main(void *arg)
{
    waiter_t *w = arg;
    w->rc = pconn_connected(w->pc, PCONN_FOREVER, &w->conn);
    return NULL;
}

static void test_many_waiters(void)
{
    enum { N = 16 };
    env_t e;
    env_init(&e, plan_ok);
    e.hold = true;
    env_start(&e);
    waiter_t w[N];
    for (int i = 0; i < N; i++) {
        w[i] = (waiter_t){.pc = e.pc, .rc = -1};
        pthread_create(&w[i].thread, NULL, waiter_main, &w[i]);
    }
    env_release(&e);
    for (int i = 0; i < N; i++) {
        pthread_join(w[i].thread, NULL);
        CU_ASSERT_EQUAL(w[i].rc, PCONN_OK);
        CU_ASSERT_PTR_NOT_NULL(w[i].conn);
        CU_ASSERT_PTR_EQUAL(w[i].conn, w[0].conn);
    }
    for (int i = 0; i < N; i++)
        pconn_conn_unref(w[i].conn);
    CU_ASSERT_EQUAL(atomic_load(&e.destroyed), 0);
    env_finish(&e);
    CU_ASSERT_EQUAL(atomic_load(&e.destroyed), 1);
}

static void test_waiters_wake_on_close(void)
{
    enum { N = 16 };
    env_t e;
    env_init(&e, plan_fail);
    env_start(&e);
    waiter_t w[N];
    for (int i = 0; i < N; i++) {
        w[i] = (waiter_t){.pc = e.pc, .rc = -1};
        pthread_create(&w[i].thread, NULL, waiter_main, &w[i]);
    }
    CU_ASSERT_EQUAL(pconn_close(e.pc, WAIT_MS), PCONN_OK);
    for (int i = 0; i < N; i++) {
        pthread_join(w[i].thread, NULL);
        CU_ASSERT_EQUAL(w[i].rc, PCONN_ECLOSED);
        CU_ASSERT_PTR_NULL(w[i].conn);
    }
    env_finish(&e);
}

/* Defect 1 of issue 10: pconn_free() while other threads are blocked inside the handle
 * (pconn_connected, pconn_close_finished). They wake with PCONN_ECLOSED / PCONN_OK and
 * nothing is freed under them (before the fix: use-after-free of the mutex, and hangs). */
typedef struct inside_t {
    pconn_t *pc;
    int kind;
    atomic_int tid;
    int rc;
    pconn_conn_t *conn;
    pthread_t thread;
} inside_t;

static void *inside_main(void *arg)
{
    inside_t *w = arg;
    atomic_store(&w->tid, (int)syscall(SYS_gettid));
    if (w->kind == 0)
        w->rc = pconn_connected(w->pc, PCONN_FOREVER, &w->conn);
    else
        w->rc = pconn_close_finished(w->pc, PCONN_FOREVER);
    return NULL;
}

/* True once the thread sleeps: after publishing its id it only blocks inside pconn. */
static bool thread_sleeping(int tid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *p = strrchr(buf, ')');
    return p != NULL && p[1] == ' ' && p[2] == 'S';
}

static void test_free_while_inside(void)
{
    enum { N = 8, ROUNDS = 10 };
    for (int round = 0; round < ROUNDS; round++) {
        env_t e;
        env_init(&e, plan_fail);
        env_start(&e);
        inside_t w[N];
        for (int i = 0; i < N; i++) {
            w[i] = (inside_t){.pc = e.pc, .kind = i % 2, .rc = -1};
            atomic_init(&w[i].tid, 0);
            pthread_create(&w[i].thread, NULL, inside_main, &w[i]);
        }
        for (int i = 0; i < N; i++)
            while (atomic_load(&w[i].tid) == 0 || !thread_sleeping(atomic_load(&w[i].tid)))
                sched_yield();
        env_finish(&e); /* pconn_free with every waiter inside */
        for (int i = 0; i < N; i++) {
            pthread_join(w[i].thread, NULL);
            CU_ASSERT_EQUAL(w[i].rc, w[i].kind == 0 ? PCONN_ECLOSED : PCONN_OK);
            CU_ASSERT_PTR_NULL(w[i].conn);
        }
    }
}

/* Defect 2 of issue 10: from pc's own connect function, calls that would wait for the
 * worker return PCONN_EINVAL at once (before the fix each waited out its timeout). */
static int callback_rcs[3];

static int plan_wait_inside(env_t *e, int call, const char *address, pconn_conn_t **conn,
                            pconn_error_t *err)
{
    if (call == 0) {
        pconn_conn_t *c = NULL;
        pconn_error_t ferr;
        callback_rcs[0] = pconn_connected(e->pc, WAIT_MS, &c);
        callback_rcs[1] = pconn_connected_or_failed(e->pc, WAIT_MS, &c, &ferr);
        callback_rcs[2] = pconn_close_finished(e->pc, WAIT_MS);
    }
    return plan_fail(e, call, address, conn, err);
}

static void test_wait_from_callback(void)
{
    env_t e;
    env_init(&e, plan_wait_inside);
    env_start(&e);
    CU_ASSERT(env_wait_calls(&e, 1) >= 1);
    CU_ASSERT_EQUAL(callback_rcs[0], PCONN_EINVAL);
    CU_ASSERT_EQUAL(callback_rcs[1], PCONN_EINVAL);
    CU_ASSERT_EQUAL(callback_rcs[2], PCONN_EINVAL);
    env_finish(&e);
}

static void test_connected_timeout(void)
{
    env_t e;
    env_init(&e, plan_fail);
    env_start(&e);
    pconn_conn_t *c = (pconn_conn_t *)&e; /* must be reset to NULL */
    CU_ASSERT_EQUAL(pconn_connected(e.pc, 0, &c), PCONN_ETIMEDOUT);
    CU_ASSERT_PTR_NULL(c);
    CU_ASSERT_EQUAL(pconn_connected(e.pc, 20, &c), PCONN_ETIMEDOUT);
    CU_ASSERT_PTR_NULL(pconn_current(e.pc));
    CU_ASSERT_EQUAL(pconn_connected(NULL, 0, &c), PCONN_EINVAL);
    env_finish(&e);
}

static void test_connected_or_failed(void)
{
    /* Retrying without delay: there is always a next attempt, and it fails. */
    env_t e;
    env_init(&e, plan_fail);
    e.delay_ms = 0;
    env_start(&e);
    for (int i = 0; i < 3; i++) {
        pconn_conn_t *c = NULL;
        pconn_error_t err = {0};
        CU_ASSERT_EQUAL(pconn_connected_or_failed(e.pc, WAIT_MS, &c, &err), PCONN_ECONNECT);
        CU_ASSERT_EQUAL(err.code, PCONN_ECONNECT);
        CU_ASSERT_STRING_EQUAL(err.message, "connect a:1: Connection refused");
        CU_ASSERT_PTR_NULL(c);
    }
    env_finish(&e);

    /* A failure before the call does not count: it waits for the next attempt. */
    env_init(&e, plan_fail2_ok);
    env_start(&e);
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL(pconn_connected_or_failed(e.pc, 0, &c, NULL), PCONN_ETIMEDOUT);
    pconn_clock_advance(e.clk, 2000 * MS);
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    pconn_clock_advance(e.clk, 2000 * MS);
    /* The third attempt connects; connected_or_failed then hands the connection out. */
    CU_ASSERT_NOT_EQUAL_FATAL(rec_wait_kind(&e.rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS), -1);
    CU_ASSERT_EQUAL(pconn_connected_or_failed(e.pc, WAIT_MS, &c, NULL), PCONN_OK);
    CU_ASSERT_PTR_NOT_NULL(c);
    pconn_conn_unref(c);
    env_finish(&e);
}

/* ---- connections ---------------------------------------------------------------- */

static void test_refcount(void)
{
    env_t e;
    env_init(&e, plan_ok);
    env_start(&e);
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(e.pc, WAIT_MS, &c), PCONN_OK);
    pconn_conn_ref(c);
    pconn_conn_ref(c);
    close(e.peers[0]);
    e.peers[0] = -1;
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&e.rec, PCONN_EVENT_DISCONNECTED, 0, WAIT_MS), -1);
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(e.clk, 1, WAIT_MS), PCONN_OK);
    for (int i = 0; i < 2; i++) {
        pconn_conn_unref(c);
        CU_ASSERT_EQUAL(atomic_load(&e.destroyed), 0);
    }
    pconn_conn_unref(c);
    CU_ASSERT_EQUAL(atomic_load(&e.destroyed), 1);
    env_finish(&e);
}

static void test_data_is_not_a_hangup(void)
{
    env_t e;
    env_init(&e, plan_ok);
    env_start(&e);
    CU_ASSERT_NOT_EQUAL_FATAL(rec_wait_kind(&e.rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS), -1);
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(e.pc, WAIT_MS, &c), PCONN_OK);
    CU_ASSERT_EQUAL(send(e.peers[0], "hello", 5, 0), 5);
    /* The worker watches for hang-up only: the bytes are still there for us. */
    int *fdp = pconn_conn_impl(c); /* fake_t starts with its fd */
    char buf[8];
    ssize_t n;
    while ((n = recv(*fdp, buf, sizeof buf, 0)) < 0 && errno == EINTR)
        ;
    CU_ASSERT_EQUAL(n, 5);
    CU_ASSERT_FALSE(pconn_conn_is_closed(c));
    pconn_conn_t *cur = pconn_current(e.pc);
    CU_ASSERT_PTR_EQUAL(cur, c);
    pconn_conn_unref(cur);
    ASSERT_LETTERS(&e, "AOC");
    pconn_conn_unref(c);
    env_finish(&e);
}

static int plan_fdless(env_t *e, int call, const char *address, pconn_conn_t **conn,
                       pconn_error_t *err)
{
    (void)call, (void)address, (void)err;
    *conn = fdless_conn_new(&e->destroyed);
    return PCONN_OK;
}

static void test_conn_close_ends_connection(void)
{
    env_t e;
    env_init(&e, plan_fdless);
    env_start(&e);
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(e.pc, WAIT_MS, &c), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_conn_wait_closed(c, 0), PCONN_ETIMEDOUT);
    pconn_conn_close(c); /* from this thread: it is finished */
    pconn_conn_close(c); /* twice is harmless */
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&e.rec, PCONN_EVENT_DISCONNECTED, 0, WAIT_MS), -1);
    CU_ASSERT_PTR_NULL(pconn_current(e.pc));
    pconn_conn_unref(c);
    CU_ASSERT_EQUAL(atomic_load(&e.destroyed), 1);
    env_finish(&e);
}

static void test_no_fd_leak(void)
{
    int before = count_open_fds();
    for (int i = 0; i < 20; i++) {
        env_t e;
        env_init(&e, plan_ok);
        env_start(&e);
        pconn_conn_t *c = NULL;
        CU_ASSERT_EQUAL(pconn_connected(e.pc, WAIT_MS, &c), PCONN_OK);
        pconn_conn_unref(c);
        env_finish(&e);
    }
    CU_ASSERT_EQUAL(count_open_fds(), before);
}

/* ---- options and helpers -------------------------------------------------------- */

static atomic_int resolver_destroys;
static void count_destroy(void *arg)
{
    (void)arg;
    atomic_fetch_add(&resolver_destroys, 1);
}

static void test_bad_options(void)
{
    env_t e;
    env_init(&e, plan_ok);
    pconn_t *pc = (pconn_t *)&e;
    CU_ASSERT_EQUAL(pconn_create(NULL, &pc), PCONN_EINVAL);
    CU_ASSERT_PTR_NULL(pc);

    atomic_store(&resolver_destroys, 0);
    pconn_options_t o = env_options(&e, pconn_resolver_new(resolve_fixed, NULL, count_destroy), 1);
    o.server_name = NULL;
    CU_ASSERT_EQUAL(pconn_create(&o, &pc), PCONN_EINVAL);
    CU_ASSERT_EQUAL(atomic_load(&resolver_destroys), 1); /* freed even on failure */

    o = env_options(&e, pconn_resolver_new(resolve_fixed, NULL, count_destroy), 1);
    o.connect = NULL;
    CU_ASSERT_EQUAL(pconn_create(&o, &pc), PCONN_EINVAL);
    CU_ASSERT_EQUAL(atomic_load(&resolver_destroys), 2);

    o = env_options(&e, pconn_resolver_new(resolve_fixed, NULL, count_destroy), 1);
    CU_ASSERT_EQUAL(pconn_create(&o, NULL), PCONN_EINVAL);
    CU_ASSERT_EQUAL(atomic_load(&resolver_destroys), 3);

    o = env_options(&e, NULL, 1);
    CU_ASSERT_EQUAL(pconn_create(&o, &pc), PCONN_EINVAL);

    errno = 0;
    CU_ASSERT_PTR_NULL(pconn_resolver_static(NULL, 1));
    CU_ASSERT_EQUAL(errno, EINVAL);
    const char *empty[] = {""};
    CU_ASSERT_PTR_NULL(pconn_resolver_static(empty, 1));
    const char *some[] = {"a:1", NULL};
    CU_ASSERT_PTR_NULL(pconn_resolver_static(some, 2));
    CU_ASSERT_PTR_NULL(pconn_resolver_static(some, 0));
    char long_addr[PCONN_ADDRESS_MAX + 1];
    memset(long_addr, 'x', sizeof long_addr - 1);
    long_addr[sizeof long_addr - 1] = '\0';
    const char *longs[] = {long_addr};
    CU_ASSERT_PTR_NULL(pconn_resolver_static(longs, 1));
    CU_ASSERT_EQUAL(errno, EINVAL);
    CU_ASSERT_PTR_NULL(pconn_resolver_new(NULL, NULL, NULL));
    static const pconn_conn_ops_t no_close = {NULL, count_destroy, NULL};
    CU_ASSERT_PTR_NULL(pconn_conn_new(&no_close, NULL));
    CU_ASSERT_PTR_NULL(pconn_conn_new(NULL, NULL));
    pconn_free(NULL);
    pconn_conn_unref(NULL);
    pconn_resolver_free(NULL);
    pconn_clock_free(NULL);
    env_finish(&e);
}

static void test_static_resolver_rotates(void)
{
    const char *list[] = {"a:1", "[::1]:2", "unix:/tmp/s"};
    pconn_resolver_t *r = pconn_resolver_static(list, 3);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    char addr[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    for (int i = 0; i < 7; i++) {
        CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, &err), PCONN_OK);
        CU_ASSERT_STRING_EQUAL(addr, list[i % 3]);
    }
    char small[4];
    CU_ASSERT_EQUAL(pconn_resolve(r, small, sizeof small, &err), PCONN_ERESOLVE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, list[7 % 3]));
    pconn_resolver_free(r);
}

static int resolve_silent_fail(void *arg, char *address, size_t size, pconn_error_t *err)
{
    (void)arg, (void)address, (void)size, (void)err;
    return PCONN_ERESOLVE; /* no message: the library supplies one */
}

static void test_custom_resolver(void)
{
    pconn_resolver_t *r = pconn_resolver_new(resolve_silent_fail, NULL, NULL);
    char addr[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, &err), PCONN_ERESOLVE);
    CU_ASSERT_EQUAL(err.code, PCONN_ERESOLVE);
    CU_ASSERT_STRING_EQUAL(err.message, "resolver failed: cannot resolve the address");
    pconn_resolver_free(r);
}

static void test_exponential(void)
{
    pconn_backoff_t b = {100, 1000, 2.0};
    const int64_t want[] = {100, 200, 400, 800, 1000, 1000};
    for (unsigned i = 0; i < 6; i++)
        CU_ASSERT_EQUAL(pconn_retry_exponential(&b, i), want[i]);
    CU_ASSERT_EQUAL(pconn_retry_exponential(&b, 4000000000u), 1000);
    CU_ASSERT_EQUAL(pconn_retry_exponential(NULL, 0), 1000);
    CU_ASSERT_EQUAL(pconn_retry_exponential(NULL, 1), 2000);
    CU_ASSERT_EQUAL(pconn_retry_exponential(NULL, 10), 30000);
    pconn_backoff_t flat = {50, 1000, 1.0};
    CU_ASSERT_EQUAL(pconn_retry_exponential(&flat, 4000000000u), 50);
    /* Defect 9 of issue 10: a floor, not a busy loop (0 before the fix). */
    pconn_backoff_t zero = {0, 0, 2.0};
    CU_ASSERT_EQUAL(pconn_retry_exponential(&zero, 0), PCONN_RETRY_FLOOR_MS);
    CU_ASSERT_EQUAL(pconn_retry_exponential(&zero, 7), PCONN_RETRY_FLOOR_MS);
    pconn_backoff_t neg = {-5, 1000, 2.0};
    CU_ASSERT_EQUAL(pconn_retry_exponential(&neg, 0), PCONN_RETRY_FLOOR_MS);
}

static void test_strings(void)
{
    CU_ASSERT_STRING_EQUAL(pconn_strerror(PCONN_OK), "success");
    CU_ASSERT_STRING_EQUAL(pconn_strerror(PCONN_ETIMEDOUT), "timed out");
    CU_ASSERT_STRING_EQUAL(pconn_strerror(PCONN_EABORT), "aborted for good");
    CU_ASSERT_STRING_EQUAL(pconn_strerror(999), "unknown error");
    CU_ASSERT_STRING_EQUAL(pconn_strerror(-1), "unknown error");
    CU_ASSERT_STRING_EQUAL(pconn_err_name(PCONN_ECLOSED), "PCONN_ECLOSED");
    CU_ASSERT_STRING_EQUAL(pconn_err_name(77), "PCONN_E?");
    CU_ASSERT_STRING_EQUAL(pconn_event_kind_name(PCONN_EVENT_OBTAINED_ADDRESS), "obtained_address");
    CU_ASSERT_STRING_EQUAL(pconn_event_kind_name((pconn_event_kind_t)42), "unknown");
    CU_ASSERT_STRING_EQUAL(pconn_version(), PCONN_VERSION_STRING);

    pconn_error_t err;
    pconn_error_set(&err, PCONN_ECONNECT, ECONNREFUSED, "connect %s", "h:1");
    CU_ASSERT_EQUAL(err.code, PCONN_ECONNECT);
    CU_ASSERT_EQUAL(err.sys_errno, ECONNREFUSED);
    CU_ASSERT_STRING_EQUAL(err.message, "connect h:1: Connection refused");
    char big[400];
    memset(big, 'y', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    pconn_error_set(&err, PCONN_EIO, 0, "%s", big);
    CU_ASSERT_EQUAL(strlen(err.message), sizeof err.message - 1);
    pconn_error_set(NULL, PCONN_EIO, 0, "ignored");

    char line[256];
    pconn_event_t ev = {.kind = PCONN_EVENT_FAILED_TO_CONNECT, .server_name = "db"};
    pconn_error_set(&err, PCONN_ECONNECT, 0, "connect h:1: refused");
    ev.error = &err;
    pconn_event_format(&ev, line, sizeof line);
    CU_ASSERT_STRING_EQUAL(line, "db: failed to connect: PCONN_ECONNECT: connect h:1: refused");
    ev = (pconn_event_t){.kind = PCONN_EVENT_CONNECTED, .server_name = "db", .address = "h:1"};
    CU_ASSERT_EQUAL(pconn_event_format(&ev, line, sizeof line), (int)strlen("db: connected to h:1"));
    CU_ASSERT_STRING_EQUAL(line, "db: connected to h:1");
    CU_ASSERT_EQUAL(pconn_event_format(&ev, line, 5), (int)strlen("db: connected to h:1"));
    CU_ASSERT_STRING_EQUAL(line, "db: ");
    ev.kind = PCONN_EVENT_ATTEMPTING_TO_CONNECT;
    pconn_event_format(&ev, line, sizeof line);
    CU_ASSERT_STRING_EQUAL(line, "db: attempting to connect");
}

static void test_manual_clock(void)
{
    pconn_clock_t *clk = pconn_clock_manual_new(5);
    CU_ASSERT_EQUAL(pconn_clock_now(clk), 5);
    pconn_clock_advance(clk, 10);
    pconn_clock_advance(clk, -3); /* ignored */
    CU_ASSERT_EQUAL(pconn_clock_now(clk), 15);
    CU_ASSERT_EQUAL(pconn_clock_wait_sleepers(clk, 1, 0), PCONN_ETIMEDOUT);
    CU_ASSERT_EQUAL(pconn_clock_wait_sleepers(clk, 0, 0), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_clock_wait_sleepers(NULL, 0, 0), PCONN_EINVAL);
    CU_ASSERT(pconn_clock_now(NULL) > 0);
    pconn_clock_free(clk);
}

static const test_def_t tests[] = {
    {"success_sequence", test_success_sequence},
    {"failure_dedup", test_failure_dedup},
    {"alternating_addresses", test_alternating_addresses},
    {"alternating_errors", test_alternating_errors},
    {"failures_reset_by_connect", test_failures_reset_by_connect},
    {"retry_window", test_retry_window},
    {"delay_counts_from_attempt_start", test_delay_counts_from_attempt_start},
    {"slow_attempt_retries_at_once", test_slow_attempt_retries_at_once},
    {"default_delay_is_10s", test_default_delay_is_10s},
    {"long_lived_reconnects_at_once", test_long_lived_reconnects_at_once},
    {"flapping_is_throttled", test_flapping_is_throttled},
    {"kick", test_kick},
    {"event_times", test_event_times},
    {"abort_from_connect", test_abort_from_connect},
    {"abort_from_resolver", test_abort_from_resolver},
    {"drain", test_drain},
    {"drain_when_not_connected", test_drain_when_not_connected},
    {"close_while_waiting", test_close_while_waiting},
    {"close_while_connected", test_close_while_connected},
    {"close_during_connect", test_close_during_connect},
    {"close_in_callback", test_close_in_callback},
    {"callbacks_call_public_functions", test_callbacks_call_public_functions},
    {"free_in_callback", test_free_in_callback},
    {"many_waiters", test_many_waiters},
    {"waiters_wake_on_close", test_waiters_wake_on_close},
    {"free_while_inside", test_free_while_inside},
    {"wait_from_callback", test_wait_from_callback},
    {"connected_timeout", test_connected_timeout},
    {"connected_or_failed", test_connected_or_failed},
    {"refcount", test_refcount},
    {"data_is_not_a_hangup", test_data_is_not_a_hangup},
    {"conn_close_ends_connection", test_conn_close_ends_connection},
    {"no_fd_leak", test_no_fd_leak},
    {"bad_options", test_bad_options},
    {"static_resolver_rotates", test_static_resolver_rotates},
    {"custom_resolver", test_custom_resolver},
    {"exponential", test_exponential},
    {"strings", test_strings},
    {"manual_clock", test_manual_clock},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    return run_suite("core", tests, argc, argv);
}
