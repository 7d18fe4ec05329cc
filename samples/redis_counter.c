/* redis_counter.c - hiredis over a pconn pool: 8 threads INCR one counter through 4
 * connections while the Redis server may restart; counts what is lost.
 *
 *   redis_counter HOST:PORT   (control lines on stdin, answers on stdout)
 *
 * stdin: "wait N" answers "acked TOTAL" once N more INCRs were acknowledged (so after a
 * restart it proves the pool reconnected); "stop" stops the threads and prints the
 * report. test/redis_counter.sh drives it against a redis-server it restarts twice.
 *
 * INCR is not safe to repeat: when a connection fails in the middle of one, the server
 * may or may not have executed it. So the request is NOT sent again: it is counted as
 * uncertain, the connection is released broken (its slot reconnects) and the thread goes
 * on. Resending would count some increments twice.
 */
#include "pconn.h"
#include "pconn_pool.h"
#include "pconn_tcp.h"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define THREADS 8
#define SLOTS 4

static atomic_long acked, uncertain, no_connection;
static atomic_bool stopping;
static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t progress = PTHREAD_COND_INITIALIZER;

/* The handshake on each new connection: a hiredis context on the fd, then PING. */
static int redis_on_connect(void *arg, int fd, const char *address, void **session,
                            pconn_error_t *err)
{
    (void)arg;
    redisContext *c = redisConnectFd(fd);
    if (c == NULL || c->err) {
        pconn_error_set(err, PCONN_EHANDSHAKE, 0, "redis %s: %s", address,
                        c != NULL ? c->errstr : "out of memory");
        if (c != NULL)
            redisFreeKeepFd(c);
        return PCONN_EHANDSHAKE;
    }
    *session = c; /* freed by redis_free, also when PING fails below */
    struct timeval tv = {2, 0}; /* every command: a reply within 2 s or the connection is broken */
    redisSetTimeout(c, tv);
    redisReply *r = redisCommand(c, "PING");
    int ok = r != NULL && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0;
    if (!ok)
        pconn_error_set(err, PCONN_EHANDSHAKE, 0, "redis %s: PING: %s", address,
                        r == NULL ? c->errstr : "no PONG");
    freeReplyObject(r);
    return ok ? PCONN_OK : PCONN_EHANDSHAKE;
}

static void redis_free(void *arg, void *session)
{
    (void)arg;
    redisFreeKeepFd(session); /* the fd is the connection's: it closes it */
}

static void *incr_thread(void *arg)
{
    pconn_pool_t *pool = arg;
    while (!atomic_load(&stopping)) {
        pconn_conn_t *conn = NULL;
        if (pconn_pool_acquire(pool, 1000, &conn) != PCONN_OK) {
            atomic_fetch_add(&no_connection, 1); /* the server is restarting: try again */
            continue;
        }
        redisContext *c = pconn_tcp_session(conn);
        redisReply *r = redisCommand(c, "INCR counter");
        if (r == NULL || r->type != REDIS_REPLY_INTEGER) {
            /* Executed or not: nobody knows. Not resent (INCR is not idempotent). */
            atomic_fetch_add(&uncertain, 1);
            pconn_pool_release(pool, conn, 1);
        } else {
            pconn_pool_release(pool, conn, 0);
            pthread_mutex_lock(&mutex);
            atomic_fetch_add(&acked, 1);
            pthread_cond_broadcast(&progress);
            pthread_mutex_unlock(&mutex);
        }
        freeReplyObject(r);
    }
    return NULL;
}

/* GET counter through the pool; -1 when it cannot. */
static long long read_counter(pconn_pool_t *pool)
{
    pconn_conn_t *conn = NULL;
    if (pconn_pool_acquire(pool, 10000, &conn) != PCONN_OK)
        return -1;
    redisReply *r = redisCommand(pconn_tcp_session(conn), "GET counter");
    long long v = -1;
    if (r != NULL && r->type == REDIS_REPLY_STRING)
        v = atoll(r->str);
    else if (r != NULL && r->type == REDIS_REPLY_NIL)
        v = 0;
    pconn_pool_release(pool, conn, r == NULL);
    freeReplyObject(r);
    return v;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: redis_counter HOST:PORT\n");
        return 2;
    }
    /* hiredis writes with write(2): a write to a server that just died would raise
     * SIGPIPE and kill the process instead of failing the command. */
    signal(SIGPIPE, SIG_IGN);
    static pconn_backoff_t backoff = {20, 500, 2.0};
    pconn_tcp_options_t tcp = {.nodelay = true,
                               .connect_timeout_ms = 2000,
                               .on_connect = redis_on_connect,
                               .session_free = redis_free};
    pconn_pool_options_t o = {0};
    const char *addr[] = {argv[1]};
    o.base.server_name = "redis";
    o.base.resolver = pconn_resolver_static(addr, 1);
    o.base.connect = pconn_tcp_connect;
    o.base.connect_arg = &tcp;
    o.base.retry_delay = pconn_retry_exponential;
    o.base.retry_delay_arg = &backoff;
    o.base.on_event = pconn_log_stderr;
    o.size = SLOTS;
    o.wait_timeout_ms = 10000;
    pconn_pool_t *pool;
    pconn_error_t err;
    if (pconn_pool_new(&o, &pool, &err) != PCONN_OK) {
        fprintf(stderr, "redis_counter: %s\n", err.message);
        return 1;
    }
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, incr_thread, pool);

    char line[64];
    int rc = 0;
    while (fgets(line, sizeof line, stdin) != NULL) {
        long n;
        if (sscanf(line, "wait %ld", &n) == 1) {
            pthread_mutex_lock(&mutex);
            long target = atomic_load(&acked) + n;
            while (atomic_load(&acked) < target)
                pthread_cond_wait(&progress, &mutex);
            pthread_mutex_unlock(&mutex);
            printf("acked %ld\n", atomic_load(&acked));
            fflush(stdout);
        } else if (strncmp(line, "stop", 4) == 0) {
            break;
        }
    }
    atomic_store(&stopping, true);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);

    long long counter = read_counter(pool);
    pconn_pool_stats_t st;
    pconn_pool_stats(pool, &st);
    long a = atomic_load(&acked), u = atomic_load(&uncertain);
    printf("acknowledged %ld, uncertain %ld (not resent), counter %lld, "
           "acknowledged but lost with the restarted servers %lld, broken releases %llu\n",
           a, u, counter, counter >= 0 ? a - counter : -1, (unsigned long long)st.released_broken);
    if (counter < 0 || counter > a + u)
        rc = 1; /* a counter above what was sent would mean a request ran twice */
    pconn_pool_free(pool);
    return rc;
}
