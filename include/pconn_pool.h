/* pconn_pool.h - a pool of persistent connections to one service, for protocols whose
 * connections cannot be shared between threads (Redis through hiredis, SQL, line
 * protocols).
 *
 * A pool has `size` slots. Each slot is a pconn_t of its own ("name#0", "name#1", ...)
 * that connects, reports events and reconnects like any pconn; all slots ask one
 * resolver (calls to it are serialized) and use one connect function. A thread takes a
 * connected slot with pconn_pool_acquire(), uses the connection alone, and hands it back
 * with pconn_pool_release(); a thread that saw the connection fail says so (broken), and
 * that slot reconnects while the others go on.
 *
 * Waiting is first come, first served: a connection that comes free goes to the thread
 * that has waited longest, and a thread that arrives while others wait queues behind them.
 *
 * Before a connection is handed out, the pool checks it, in this order: closed by its
 * peer (skipped; the slot is reconnecting), older than max_lifetime_ms or idle longer
 * than idle_timeout_ms (closed; the slot reconnects), idle at least
 * health_check_idle_ms with a health_check set (the check runs on the acquiring thread;
 * a failure closes it and the slot reconnects). The acquiring thread keeps its place at
 * the head of the queue meanwhile. A connection held longer than leak_threshold_ms is
 * reported once to on_leak (from the pool's monitor thread) and counted.
 *
 * Requests that are not safe to repeat: when a connection fails in the middle of a
 * request, the pool cannot know whether the server executed it. Release it broken, and
 * retry only what is idempotent; for the rest (INCR, INSERT) make it idempotent (a
 * request id the server checks) or report the uncertain outcome to the caller.
 *
 * Durations are int64_t milliseconds; the pool's time (idle, lifetime, leaks) is read
 * from base.clock, so tests drive it with a manual clock.
 */
#ifndef PCONN_POOL_H
#define PCONN_POOL_H

#include "pconn.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PCONN_POOL_MAX_SIZE 1024 /* slots of one pool, at most */
/* The largest duration accepted by every pool option: a year (no overflow in ns). */
#define PCONN_POOL_MAX_MS ((int64_t)1000 * 3600 * 24 * 365)
/* pconn_pool_acquire(): wait as long as the pool's wait_timeout_ms says. */
#define PCONN_POOL_WAIT_DEFAULT (-2)
#define PCONN_POOL_DEFAULT_WAIT_MS 30000

typedef struct pconn_pool_t pconn_pool_t;

/* What on_leak is told. Borrowed for the duration of the call. */
typedef struct pconn_pool_leak_t {
    const char *slot_name;  /* "name#k" */
    pconn_conn_t *conn;     /* the connection held too long (borrowed; ref to keep) */
    int64_t held_ns;        /* how long it has been held so far */
    int64_t acquired_ns;    /* the clock's reading when it was acquired */
} pconn_pool_leak_t;

typedef struct pconn_pool_options_t {
    /* Every slot's options: server_name (required; slot k is named "server_name#k"),
     * resolver (required; owned by the pool from create on, freed by it even when create
     * fails; the slots' calls to it are serialized, so it needs no locking of its own,
     * and slots that reconnect together ask it one after the other),
     * connect (required; called by several slots' workers at once: it must be
     * thread-safe for connect_arg, as pconn_tcp_connect is), connect_arg (not owned),
     * on_event (events of every slot, server_name "name#k"; called on the slot's worker),
     * retry_delay, random_seed (slot k uses random_seed + k when not 0), clock (also the
     * pool's own clock for idle, lifetime and leak times). */
    pconn_options_t base;
    unsigned size;            /* slots: 1 .. PCONN_POOL_MAX_SIZE */
    /* 0 .. size: pconn_pool_create() waits up to wait_timeout_ms until this many slots
     * are connected, and fails with PCONN_ETIMEDOUT when they are not. 0: no wait. */
    unsigned min_ready;
    /* The wait of pconn_pool_acquire(pool, PCONN_POOL_WAIT_DEFAULT, ...) and of
     * min_ready: 1 .. PCONN_POOL_MAX_MS, PCONN_FOREVER, or 0 for
     * PCONN_POOL_DEFAULT_WAIT_MS (HikariCP's connectionTimeout, redis-plus-plus'
     * wait_timeout). */
    int64_t wait_timeout_ms;
    /* Optional: asks whether conn still works (e.g. sends PING and reads PONG). Returns
     * PCONN_OK, or an error code with err filled (the pool counts it and reconnects the
     * slot). Runs on the acquiring thread, with the connection held and no pool lock; it
     * must bound its own I/O (it should not take longer than the caller can wait). */
    int (*health_check)(void *arg, pconn_conn_t *conn, pconn_error_t *err);
    void *health_check_arg;
    /* 0 .. PCONN_POOL_MAX_MS: the check runs before handing out a connection idle at
     * least this long (0: before every hand-out). Ignored without health_check. */
    int64_t health_check_idle_ms;
    /* 0 (none) or 1 .. PCONN_POOL_MAX_MS: a connection older than this (from CONNECTED)
     * is closed instead of handed out, or when released (HikariCP maxLifetime,
     * redis-plus-plus connection_lifetime). */
    int64_t max_lifetime_ms;
    /* 0 (none) or 1 .. PCONN_POOL_MAX_MS: a connection idle longer than this is closed
     * instead of handed out (HikariCP idleTimeout, redis-plus-plus
     * connection_idle_time); servers that drop idle clients then never hand us a dead one. */
    int64_t idle_timeout_ms;
    /* 0 (none) or 1 .. PCONN_POOL_MAX_MS: a connection held longer than this is reported
     * once per acquire (HikariCP leakDetectionThreshold). */
    int64_t leak_threshold_ms;
    /* Optional: called from the pool's monitor thread, with no pool lock held, for each
     * leak. It may call pconn_pool_stats(); it must not call pconn_pool_close() or
     * pconn_pool_free(). */
    void (*on_leak)(const pconn_pool_leak_t *leak, void *arg);
    void *on_leak_arg;
} pconn_pool_options_t;

typedef struct pconn_pool_stats_t {
    unsigned size;            /* slots */
    unsigned connected;       /* slots with a live connection, held or not */
    unsigned in_use;          /* connections held by callers */
    unsigned waiting;         /* threads blocked in pconn_pool_acquire() */
    uint64_t acquired;        /* successful acquires */
    uint64_t timeouts;        /* acquires that returned PCONN_ETIMEDOUT */
    uint64_t released_broken; /* releases with broken set */
    uint64_t health_failures; /* health checks that failed */
    uint64_t expired_lifetime; /* connections closed for max_lifetime_ms */
    uint64_t expired_idle;    /* connections closed for idle_timeout_ms */
    uint64_t leaks;           /* leaks reported */
    int64_t wait_max_ns;      /* the longest wait of a successful acquire (real time) */
    int64_t wait_total_ns;    /* the sum of those waits: mean = total / acquired */
} pconn_pool_stats_t;

/* Checks opts and creates the pool: its slots start connecting at once. Every option's
 * range is checked: PCONN_EINVAL with err naming the option, its value and the range.
 * With min_ready > 0, waits (see min_ready). opts is copied. PCONN_OK with *out set;
 * otherwise *out is NULL, base.resolver has been freed, and err says why: PCONN_EINVAL,
 * PCONN_ENOMEM, PCONN_ETIMEDOUT (min_ready not reached). err may be NULL. Any thread. */
int pconn_pool_new(const pconn_pool_options_t *opts, pconn_pool_t **out, pconn_error_t *err);

/* pconn_pool_new() without the error details. */
int pconn_pool_create(const pconn_pool_options_t *opts, pconn_pool_t **out);

/* Waits, first come first served, until a connected slot is free and passes the checks
 * above, and stores its connection in *out (a new reference; give it back with
 * pconn_pool_release(), never with pconn_conn_unref() alone). timeout_ms: PCONN_FOREVER,
 * 0 (take one only if free now), > 0, or PCONN_POOL_WAIT_DEFAULT. Returns PCONN_OK;
 * PCONN_ETIMEDOUT; PCONN_ECLOSED when the pool is closed, or closes while waiting (the
 * waiters wake at once); PCONN_EINVAL for a NULL argument or a timeout below -2;
 * PCONN_ENOMEM when a wait cannot be set up. timeout_ms bounds the waiting; a health
 * check is user code run outside it, so a slow check can make acquire return later.
 * A slot holds one connection at a time: one that reconnected while its previous
 * connection is still held is handed out after that one is released. Any thread; from
 * one of the pool's own callbacks (a slot's on_event, on_leak) it never waits: a free
 * connection, or PCONN_EINVAL at once where it would have to wait (the slot whose worker
 * runs the callback could not connect meanwhile). */
int pconn_pool_acquire(pconn_pool_t *pool, int64_t timeout_ms, pconn_conn_t **out);

/* Hands conn back and drops the caller's reference. broken != 0: the caller saw it fail
 * (an I/O error, a protocol error, a request left half done); it is closed and its slot
 * reconnects (after the slot's retry delay, counted from its previous attempt), while
 * the other slots go on. A connection past max_lifetime_ms is closed the same way. The
 * next waiter, if any, gets a free connection at once. Also valid after
 * pconn_pool_close(); never after pconn_pool_free() (drop such a connection with
 * pconn_conn_unref()). A conn that did not come from this pool's acquire is ignored.
 * Any thread; never blocks beyond a brief lock. */
void pconn_pool_release(pconn_pool_t *pool, pconn_conn_t *conn, int broken);

/* Starts closing: acquire answers PCONN_ECLOSED from now on and threads blocked in it
 * wake with PCONN_ECLOSED; every slot closes (held connections too, so their holders'
 * I/O fails). Waits up to timeout_ms for the slots to finish. PCONN_OK, or
 * PCONN_ETIMEDOUT. Any thread; from one of the pool's own callbacks (a slot's on_event,
 * on_leak) it starts close and returns PCONN_OK at once. */
int pconn_pool_close(pconn_pool_t *pool, int64_t timeout_ms);

/* Closes the pool, waits for every slot and the monitor, and frees the pool and the
 * resolver. NULL is ignored. Threads still inside pconn_pool_acquire() (or
 * pconn_pool_stats()) when it starts return PCONN_ECLOSED, and the memory is freed only
 * after the last of them has left. Connections still held stay valid (closed) until
 * their holders drop them with pconn_conn_unref(). A call on pool that starts after this
 * returned is a use after free. Any thread except the pool's own callbacks (on_event,
 * on_leak, health_check): there it would wait for itself; close from there and free
 * elsewhere. */
void pconn_pool_free(pconn_pool_t *pool);

/* Fills *out with a consistent snapshot of the pool's counters. Any thread. */
void pconn_pool_stats(pconn_pool_t *pool, pconn_pool_stats_t *out);

/* The same counters as one JSON object on one line: {"size", "connected", "in_use",
 * "waiting", "acquired", "timeouts", "released_broken", "health_failures",
 * "expired_lifetime", "expired_idle", "leaks", "wait_max_ms", "wait_mean_ms"}. A
 * malloc'd string the caller frees with free(); NULL for NULL or out of memory. */
char *pconn_pool_stats_json(pconn_pool_t *pool);

#ifdef __cplusplus
}
#endif
#endif /* PCONN_POOL_H */
