/* pool.c - a pool of pconns to one service: slots, the first-come-first-served wait
 * queue with direct hand-off, the checks before a hand-out, and the leak monitor.
 * One mutex guards the pool; it is never held across a callback or a pconn call. */
#include "internal.h"
#include "pconn_pool.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_MS 1000000LL

/* A thread blocked in acquire, on its own stack. A connection that comes free is handed
 * to the head of the queue directly (slot set, then signalled), so no later thread can
 * take it first. */
typedef struct waiter_t {
    pthread_cond_t cond;
    struct slot_t *slot; /* handed over: the slot is reserved for us, conn referenced */
    bool closed;         /* the pool closed: removed from the queue */
    struct waiter_t *prev, *next;
} waiter_t;

typedef struct slot_t {
    pconn_pool_t *pool;
    char *name;
    pconn_t *pc;
    pconn_conn_t *conn;  /* a reference from CONNECTED to DISCONNECTED; else NULL */
    pconn_conn_t *lent;  /* the connection a caller holds (or checks); NULL: free */
    int64_t connected_ns, idle_since_ns, acquired_ns; /* the pool's clock */
    bool leak_reported;
} slot_t;

struct pconn_pool_t {
    pthread_mutex_t mutex;
    pthread_cond_t ready; /* a slot connected: for min_ready */
    slot_t *slots;
    unsigned size;

    /* Set at create, read-only afterwards. */
    pconn_clock_t *clock;
    void (*on_event)(const pconn_event_t *, void *);
    void *on_event_arg;
    int64_t wait_ms;
    int (*health_check)(void *, pconn_conn_t *, pconn_error_t *);
    void *health_check_arg;
    int64_t health_idle_ns, lifetime_ns, idle_ns, leak_ns; /* 0: off */
    void (*on_leak)(const pconn_pool_leak_t *, void *);
    void *on_leak_arg;
    bool timed; /* some option needs the clock on acquire and release */

    /* The one resolver of every slot: its calls are serialized by res_mutex. The slots'
     * forwarding resolvers point at the pool without a reference: pconn_pool_free()
     * frees every slot (joining its worker) before the resolver and the pool. */
    pthread_mutex_t res_mutex;
    pconn_resolver_t *resolver;

    /* Guarded by mutex. */
    waiter_t *head, *tail;
    unsigned nwaiting, connected;
    bool closing;
    pconn_pool_stats_t stats;

    /* The leak monitor (only with leak_ns): sleeps on the clock until the next deadline. */
    pthread_t monitor;
    bool monitor_running, monitor_stop;
    int monitor_fd;
    int64_t monitor_next; /* the deadline it sleeps until; guarded by mutex */

    /* Callers inside a public call (lock_in/unlock_out): the final free waits for 0. */
    atomic_uint inside;
};

/* The pool whose callback (a slot's on_event, on_leak) runs on this thread: waiting
 * there could wait for the very slot whose worker is held up, so such calls never wait. */
static _Thread_local const pconn_pool_t *tl_callback_pool;

/* ---- small helpers --------------------------------------------------------------- */

static void lock_in(pconn_pool_t *pool)
{
    atomic_fetch_add(&pool->inside, 1);
    pconn__mutex_lock(&pool->mutex);
}

static void unlock_out(pconn_pool_t *pool)
{
    pconn__mutex_unlock(&pool->mutex);
    atomic_fetch_sub(&pool->inside, 1);
}

static int64_t pool_now(const pconn_pool_t *pool)
{
    return pconn_clock_now(pool->clock);
}

static bool usable(const slot_t *s)
{
    return s->lent == NULL && s->conn != NULL && !pconn_conn_is_closed(s->conn);
}

/* Reserves s for the caller: the connection gets the reference the caller will hold. */
static void reserve_locked(slot_t *s)
{
    s->lent = s->conn;
    pconn_conn_ref(s->lent);
}

static slot_t *take_free_locked(pconn_pool_t *pool)
{
    for (unsigned i = 0; i < pool->size; i++) {
        slot_t *s = &pool->slots[i];
        if (usable(s)) {
            reserve_locked(s);
            return s;
        }
    }
    return NULL;
}

static void enqueue_locked(pconn_pool_t *pool, waiter_t *w, bool front)
{
    if (front) {
        w->prev = NULL;
        w->next = pool->head;
        if (pool->head != NULL)
            pool->head->prev = w;
        else
            pool->tail = w;
        pool->head = w;
    } else {
        w->next = NULL;
        w->prev = pool->tail;
        if (pool->tail != NULL)
            pool->tail->next = w;
        else
            pool->head = w;
        pool->tail = w;
    }
    pool->nwaiting++;
}

static void dequeue_locked(pconn_pool_t *pool, waiter_t *w)
{
    if (w->prev != NULL)
        w->prev->next = w->next;
    else
        pool->head = w->next;
    if (w->next != NULL)
        w->next->prev = w->prev;
    else
        pool->tail = w->prev;
    w->prev = w->next = NULL;
    pool->nwaiting--;
}

/* Hands free connections to the waiters, longest waiting first. */
static void dispatch_locked(pconn_pool_t *pool)
{
    while (pool->head != NULL) {
        slot_t *s = take_free_locked(pool);
        if (s == NULL)
            return;
        waiter_t *w = pool->head;
        dequeue_locked(pool, w);
        w->slot = s;
        pthread_cond_signal(&w->cond);
    }
}

/* Gives a reserved slot back; closes its connection first when close is set. Called
 * with the lock held; drops it around the close and the unref (they may run the
 * connection type's code). */
static void unreserve_locked(pconn_pool_t *pool, slot_t *s, bool close)
{
    pconn_conn_t *c = s->lent;
    if (close) {
        pconn__mutex_unlock(&pool->mutex);
        pconn_conn_close(c); /* the slot's worker sees it and reconnects */
        pconn__mutex_lock(&pool->mutex);
    }
    s->lent = NULL;
    dispatch_locked(pool);
    pconn__mutex_unlock(&pool->mutex);
    pconn_conn_unref(c);
    pconn__mutex_lock(&pool->mutex);
}

/* ---- the slots' resolver and events ---------------------------------------------- */

static int forward_resolve(void *arg, char *address, size_t size, pconn_error_t *err)
{
    pconn_pool_t *pool = arg;
    pconn__mutex_lock(&pool->res_mutex);
    int rc = pconn_resolve(pool->resolver, address, size, err);
    pconn__mutex_unlock(&pool->res_mutex);
    return rc;
}

static void slot_on_event(const pconn_event_t *ev, void *arg)
{
    slot_t *s = arg;
    pconn_pool_t *pool = s->pool;
    if (ev->kind == PCONN_EVENT_CONNECTED) {
        pconn_conn_ref(ev->conn);
        pconn__mutex_lock(&pool->mutex);
        pconn_conn_t *old = s->conn; /* none: DISCONNECTED came before */
        s->conn = ev->conn;
        s->connected_ns = s->idle_since_ns = ev->time_ns;
        if (old == NULL)
            pool->connected++;
        pthread_cond_broadcast(&pool->ready);
        dispatch_locked(pool);
        pconn__mutex_unlock(&pool->mutex);
        pconn_conn_unref(old);
    } else if (ev->kind == PCONN_EVENT_DISCONNECTED) {
        pconn__mutex_lock(&pool->mutex);
        pconn_conn_t *old = s->conn;
        s->conn = NULL;
        if (old != NULL)
            pool->connected--;
        pconn__mutex_unlock(&pool->mutex);
        pconn_conn_unref(old); /* a holder keeps its own reference */
    }
    if (pool->on_event != NULL) {
        const pconn_pool_t *outer = tl_callback_pool;
        tl_callback_pool = pool;
        pool->on_event(ev, pool->on_event_arg);
        tl_callback_pool = outer;
    }
}

/* ---- the leak monitor ------------------------------------------------------------ */

/* Reports each connection held longer than leak_ns once per acquire. */
static void *monitor_main(void *arg)
{
    pconn_pool_t *pool = arg;
    pconn__mutex_lock(&pool->mutex);
    while (!pool->monitor_stop) {
        int64_t now = pool_now(pool);
        int64_t next = INT64_MAX;
        slot_t *leaked = NULL;
        for (unsigned i = 0; i < pool->size && leaked == NULL; i++) {
            slot_t *s = &pool->slots[i];
            if (s->lent == NULL || s->leak_reported)
                continue;
            int64_t due = s->acquired_ns + pool->leak_ns;
            if (due <= now)
                leaked = s;
            else if (due < next)
                next = due;
        }
        if (leaked != NULL) {
            leaked->leak_reported = true;
            pool->stats.leaks++;
            pconn_pool_leak_t leak = {.slot_name = leaked->name,
                                      .conn = leaked->lent,
                                      .held_ns = now - leaked->acquired_ns,
                                      .acquired_ns = leaked->acquired_ns};
            pconn_conn_ref(leak.conn);
            pconn__mutex_unlock(&pool->mutex);
            if (pool->on_leak != NULL) {
                tl_callback_pool = pool;
                pool->on_leak(&leak, pool->on_leak_arg);
                tl_callback_pool = NULL;
            }
            pconn_conn_unref(leak.conn);
            pconn__mutex_lock(&pool->mutex);
            continue;
        }
        pool->monitor_next = next;
        pconn__mutex_unlock(&pool->mutex);
        pconn__clock_sleep(pool->clock, next, pool->monitor_fd);
        pconn__mutex_lock(&pool->mutex);
    }
    pconn__mutex_unlock(&pool->mutex);
    return NULL;
}

/* ---- options ---------------------------------------------------------------------- */

static int check_ms(const pconn_pool_options_t *o, const char *name, int64_t v, pconn_error_t *err)
{
    if (v >= 0 && v <= PCONN_POOL_MAX_MS)
        return PCONN_OK;
    pconn_error_set(err, PCONN_EINVAL, 0, "pconn_pool %s: option %s = %lld: must be 0 .. %lld ms",
                    o->base.server_name, name, (long long)v, (long long)PCONN_POOL_MAX_MS);
    return PCONN_EINVAL;
}

static int check_options(const pconn_pool_options_t *o, pconn_error_t *err)
{
    const pconn_options_t *b = &o->base;
    const char *missing = b->server_name == NULL ? "base.server_name"
                          : b->resolver == NULL  ? "base.resolver"
                          : b->connect == NULL   ? "base.connect"
                                                 : NULL;
    if (missing != NULL) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_pool: option %s is required", missing);
        return PCONN_EINVAL;
    }
    if (o->size < 1 || o->size > PCONN_POOL_MAX_SIZE) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_pool %s: option size = %u: must be 1 .. %u",
                        b->server_name, o->size, PCONN_POOL_MAX_SIZE);
        return PCONN_EINVAL;
    }
    if (o->min_ready > o->size) {
        pconn_error_set(err, PCONN_EINVAL, 0,
                        "pconn_pool %s: option min_ready = %u: must be 0 .. size (%u)",
                        b->server_name, o->min_ready, o->size);
        return PCONN_EINVAL;
    }
    if (o->wait_timeout_ms != PCONN_FOREVER &&
        check_ms(o, "wait_timeout_ms", o->wait_timeout_ms, err) != PCONN_OK) {
        strncat(err->message, " or PCONN_FOREVER", sizeof err->message - strlen(err->message) - 1);
        return PCONN_EINVAL;
    }
    if (check_ms(o, "health_check_idle_ms", o->health_check_idle_ms, err) != PCONN_OK ||
        check_ms(o, "max_lifetime_ms", o->max_lifetime_ms, err) != PCONN_OK ||
        check_ms(o, "idle_timeout_ms", o->idle_timeout_ms, err) != PCONN_OK ||
        check_ms(o, "leak_threshold_ms", o->leak_threshold_ms, err) != PCONN_OK)
        return PCONN_EINVAL;
    return PCONN_OK;
}

/* ---- public ---------------------------------------------------------------------- */

static void wait_callers_out(pconn_pool_t *pool)
{
    while (atomic_load(&pool->inside) != 0) {
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
}

/* Frees what pconn_pool_new() made: the slots created so far, the monitor, the rest. */
static void destroy(pconn_pool_t *pool)
{
    wait_callers_out(pool);
    for (unsigned i = 0; i < pool->size; i++) {
        pconn_free(pool->slots[i].pc); /* joins the worker: no more events */
        pconn_conn_unref(pool->slots[i].conn);
        free(pool->slots[i].name);
    }
    if (pool->monitor_running) {
        pconn__mutex_lock(&pool->mutex);
        pool->monitor_stop = true;
        pconn__mutex_unlock(&pool->mutex);
        pconn__wake(pool->monitor_fd);
        pthread_join(pool->monitor, NULL);
    }
    if (pool->monitor_fd >= 0)
        close(pool->monitor_fd);
    pconn_resolver_free(pool->resolver);
    pthread_mutex_destroy(&pool->res_mutex);
    pthread_cond_destroy(&pool->ready);
    pthread_mutex_destroy(&pool->mutex);
    free(pool->slots);
    free(pool);
}

static int start_slots(pconn_pool_t *pool, const pconn_pool_options_t *opts, pconn_error_t *err)
{
    const char *name = opts->base.server_name;
    for (unsigned i = 0; i < pool->size; i++) {
        slot_t *s = &pool->slots[i];
        size_t len = strlen(name) + 16;
        s->pool = pool;
        s->name = malloc(len);
        pconn_resolver_t *r = pconn_resolver_new(forward_resolve, pool, NULL);
        if (s->name == NULL || r == NULL) {
            pconn_resolver_free(r);
            pconn_error_set(err, PCONN_ENOMEM, 0, "pconn_pool %s: out of memory", name);
            return PCONN_ENOMEM;
        }
        snprintf(s->name, len, "%s#%u", name, i);
        pconn_options_t so = opts->base;
        so.server_name = s->name;
        so.resolver = r;
        so.on_event = slot_on_event;
        so.on_event_arg = s;
        if (so.random_seed != 0)
            so.random_seed += i;
        int rc = pconn_create(&so, &s->pc);
        if (rc != PCONN_OK) {
            pconn_error_set(err, rc, 0, "pconn_pool %s: creating slot %s: %s", name, s->name,
                            pconn_strerror(rc));
            return rc;
        }
    }
    return PCONN_OK;
}

static int wait_min_ready(pconn_pool_t *pool, const char *name, unsigned min_ready,
                          pconn_error_t *err)
{
    int64_t deadline = pconn__deadline_ns(pool->wait_ms);
    int rc = PCONN_OK;
    pconn__mutex_lock(&pool->mutex);
    while (pool->connected < min_ready) {
        if (pconn__cond_wait_until(&pool->ready, &pool->mutex, deadline) != 0 &&
            pool->connected < min_ready) {
            pconn_error_set(err, PCONN_ETIMEDOUT, 0,
                            "pconn_pool %s: %u of min_ready %u slots connected after %lld ms",
                            name, pool->connected, min_ready,
                            (long long)pool->wait_ms);
            rc = PCONN_ETIMEDOUT;
            break;
        }
    }
    pconn__mutex_unlock(&pool->mutex);
    return rc;
}

int pconn_pool_new(const pconn_pool_options_t *opts, pconn_pool_t **out, pconn_error_t *err)
{
    pconn_error_t local;
    if (err == NULL)
        err = &local;
    if (out != NULL)
        *out = NULL;
    if (opts == NULL || out == NULL) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_pool_new: opts and out are required");
        if (opts != NULL)
            pconn_resolver_free(opts->base.resolver);
        return PCONN_EINVAL;
    }
    int rc = check_options(opts, err);
    if (rc != PCONN_OK) {
        pconn_resolver_free(opts->base.resolver);
        return rc;
    }
    pconn_pool_t *pool = calloc(1, sizeof *pool);
    slot_t *slots = calloc(opts->size, sizeof *slots);
    if (pool == NULL || slots == NULL)
        goto nomem;
    pool->monitor_fd = -1;
    if (pconn__mutex_init_adaptive(&pool->mutex) != 0)
        goto nomem;
    if (pconn__cond_init(&pool->ready) != 0) {
        pthread_mutex_destroy(&pool->mutex);
        goto nomem;
    }
    if (pthread_mutex_init(&pool->res_mutex, NULL) != 0) {
        pthread_cond_destroy(&pool->ready);
        pthread_mutex_destroy(&pool->mutex);
        goto nomem;
    }
    pool->slots = slots;
    pool->size = opts->size;
    pool->resolver = opts->base.resolver;
    pool->clock = opts->base.clock;
    pool->on_event = opts->base.on_event;
    pool->on_event_arg = opts->base.on_event_arg;
    pool->wait_ms = opts->wait_timeout_ms == 0 ? PCONN_POOL_DEFAULT_WAIT_MS : opts->wait_timeout_ms;
    pool->health_check = opts->health_check;
    pool->health_check_arg = opts->health_check_arg;
    /* Ranges checked above: at most a year, so no overflow in ns. */
    pool->health_idle_ns = opts->health_check_idle_ms * NS_PER_MS;
    pool->lifetime_ns = opts->max_lifetime_ms * NS_PER_MS;
    pool->idle_ns = opts->idle_timeout_ms * NS_PER_MS;
    pool->leak_ns = opts->leak_threshold_ms * NS_PER_MS;
    pool->on_leak = opts->on_leak;
    pool->on_leak_arg = opts->on_leak_arg;
    pool->timed = pool->health_check != NULL || pool->lifetime_ns > 0 || pool->idle_ns > 0 ||
                  pool->leak_ns > 0;
    pool->stats.size = pool->size;
    atomic_init(&pool->inside, 0);

    if (pool->leak_ns > 0) {
        pool->monitor_fd = pconn__wake_fd_new();
        pool->monitor_next = INT64_MAX;
        if (pool->monitor_fd < 0 ||
            pconn__thread_start(&pool->monitor, monitor_main, pool, 0, false) != 0) {
            pconn_error_set(err, PCONN_ENOMEM, 0, "pconn_pool %s: starting the leak monitor",
                            opts->base.server_name);
            destroy(pool);
            return PCONN_ENOMEM;
        }
        pool->monitor_running = true;
    }
    rc = start_slots(pool, opts, err);
    if (rc == PCONN_OK && opts->min_ready > 0)
        rc = wait_min_ready(pool, opts->base.server_name, opts->min_ready, err);
    if (rc != PCONN_OK) {
        pconn_pool_free(pool);
        return rc;
    }
    *out = pool;
    return PCONN_OK;

nomem:
    free(slots);
    free(pool);
    pconn_resolver_free(opts->base.resolver);
    pconn_error_set(err, PCONN_ENOMEM, 0, "pconn_pool %s: out of memory", opts->base.server_name);
    return PCONN_ENOMEM;
}

int pconn_pool_create(const pconn_pool_options_t *opts, pconn_pool_t **out)
{
    return pconn_pool_new(opts, out, NULL);
}

/* Why the connection of the reserved slot s must not be handed out, checked at now:
 * "lifetime", "idle" or NULL (fine as far as the pool can tell without asking it). */
static const char *expired_locked(pconn_pool_t *pool, const slot_t *s, int64_t now)
{
    if (pool->lifetime_ns > 0 && now - s->connected_ns >= pool->lifetime_ns) {
        pool->stats.expired_lifetime++;
        return "lifetime";
    }
    if (pool->idle_ns > 0 && now - s->idle_since_ns >= pool->idle_ns) {
        pool->stats.expired_idle++;
        return "idle";
    }
    return NULL;
}

/* Blocks in the queue until a slot is handed over, the pool closes or deadline passes.
 * front: the caller already waited and lost its connection to a check. */
static int wait_turn_locked(pconn_pool_t *pool, bool front, int64_t deadline, slot_t **out)
{
    waiter_t w = {.slot = NULL, .closed = false};
    if (pconn__cond_init(&w.cond) != 0)
        return PCONN_ENOMEM;
    enqueue_locked(pool, &w, front);
    int rc = PCONN_OK;
    while (w.slot == NULL && !w.closed) {
        if (pconn__cond_wait_until(&w.cond, &pool->mutex, deadline) != 0 && w.slot == NULL &&
            !w.closed) {
            dequeue_locked(pool, &w);
            rc = PCONN_ETIMEDOUT;
            break;
        }
    }
    pthread_cond_destroy(&w.cond);
    if (w.closed)
        rc = PCONN_ECLOSED;
    *out = w.slot;
    return rc;
}

int pconn_pool_acquire(pconn_pool_t *pool, int64_t timeout_ms, pconn_conn_t **out)
{
    if (out != NULL)
        *out = NULL;
    if (pool == NULL || out == NULL || timeout_ms < PCONN_POOL_WAIT_DEFAULT)
        return PCONN_EINVAL;
    if (timeout_ms == PCONN_POOL_WAIT_DEFAULT)
        timeout_ms = pool->wait_ms;
    int64_t start = 0, deadline = 0;
    bool front = false;
    int rc;
    lock_in(pool);
    for (;;) {
        if (pool->closing) {
            rc = PCONN_ECLOSED;
            break;
        }
        slot_t *s = NULL;
        if (pool->head == NULL || front)
            s = take_free_locked(pool);
        if (s == NULL) {
            if (timeout_ms == 0) {
                rc = PCONN_ETIMEDOUT;
                pool->stats.timeouts++;
                break;
            }
            if (tl_callback_pool == pool) { /* one of pool's callbacks: never waits */
                rc = PCONN_EINVAL;
                break;
            }
            if (start == 0) {
                start = pconn__mono_ns();
                deadline = pconn__deadline_ns(timeout_ms);
            }
            rc = wait_turn_locked(pool, front, deadline, &s);
            if (rc == PCONN_ETIMEDOUT)
                pool->stats.timeouts++;
            if (rc != PCONN_OK)
                break;
        }
        if (pool->closing) { /* handed over just as the pool closed */
            unreserve_locked(pool, s, false);
            rc = PCONN_ECLOSED;
            break;
        }
        int64_t now = pool->timed ? pool_now(pool) : 0;
        if (expired_locked(pool, s, now) != NULL) {
            unreserve_locked(pool, s, true);
            front = true;
            continue;
        }
        if (pool->health_check != NULL && now - s->idle_since_ns >= pool->health_idle_ns) {
            pconn_error_t err = {0};
            pconn__mutex_unlock(&pool->mutex);
            int hc = pool->health_check(pool->health_check_arg, s->lent, &err);
            pconn__mutex_lock(&pool->mutex);
            if (hc != PCONN_OK) {
                pool->stats.health_failures++;
                unreserve_locked(pool, s, true);
                front = true;
                continue;
            }
            if (pool->closing) {
                unreserve_locked(pool, s, false);
                rc = PCONN_ECLOSED;
                break;
            }
        }
        s->acquired_ns = now;
        s->leak_reported = false;
        if (pool->leak_ns > 0 && now + pool->leak_ns < pool->monitor_next) {
            pool->monitor_next = now + pool->leak_ns;
            pconn__wake(pool->monitor_fd);
        }
        pool->stats.acquired++;
        if (start != 0) {
            int64_t waited = pconn__mono_ns() - start;
            pool->stats.wait_total_ns += waited;
            if (waited > pool->stats.wait_max_ns)
                pool->stats.wait_max_ns = waited;
        }
        *out = s->lent;
        rc = PCONN_OK;
        break;
    }
    unlock_out(pool);
    return rc;
}

void pconn_pool_release(pconn_pool_t *pool, pconn_conn_t *conn, int broken)
{
    if (pool == NULL || conn == NULL)
        return;
    lock_in(pool);
    slot_t *s = NULL;
    for (unsigned i = 0; i < pool->size && s == NULL; i++) {
        if (pool->slots[i].lent == conn)
            s = &pool->slots[i];
    }
    if (s != NULL) {
        int64_t now = pool->timed ? pool_now(pool) : 0;
        bool close = false;
        if (broken) {
            pool->stats.released_broken++;
            close = true;
        } else if (pool->lifetime_ns > 0 && now - s->connected_ns >= pool->lifetime_ns) {
            pool->stats.expired_lifetime++;
            close = true;
        }
        s->idle_since_ns = now;
        if (close && !pconn_conn_is_closed(conn)) {
            unreserve_locked(pool, s, true);
        } else {
            s->lent = NULL; /* the common case: one lock, the unref after it */
            dispatch_locked(pool);
            unlock_out(pool);
            pconn_conn_unref(conn);
            return;
        }
    }
    unlock_out(pool);
}

/* Marks the pool closed and wakes every waiter with PCONN_ECLOSED. */
static void start_close_locked(pconn_pool_t *pool)
{
    pool->closing = true;
    while (pool->head != NULL) {
        waiter_t *w = pool->head;
        dequeue_locked(pool, w);
        w->closed = true;
        pthread_cond_signal(&w->cond);
    }
}

int pconn_pool_close(pconn_pool_t *pool, int64_t timeout_ms)
{
    if (pool == NULL)
        return PCONN_EINVAL;
    int64_t deadline = pconn__deadline_ns(timeout_ms);
    lock_in(pool);
    start_close_locked(pool);
    pconn__mutex_unlock(&pool->mutex);
    for (unsigned i = 0; i < pool->size; i++) {
        if (pool->slots[i].pc != NULL)
            pconn_close(pool->slots[i].pc, 0); /* starts every close before waiting */
    }
    int rc = PCONN_OK;
    for (unsigned i = 0; tl_callback_pool != pool && i < pool->size; i++) {
        if (pool->slots[i].pc == NULL)
            continue;
        int64_t left = PCONN_FOREVER;
        if (deadline != INT64_MAX) {
            left = (deadline - pconn__mono_ns()) / NS_PER_MS;
            left = left < 0 ? 0 : left;
        }
        if (pconn_close_finished(pool->slots[i].pc, left) != PCONN_OK)
            rc = PCONN_ETIMEDOUT;
    }
    atomic_fetch_sub(&pool->inside, 1);
    return rc;
}

void pconn_pool_free(pconn_pool_t *pool)
{
    if (pool == NULL)
        return;
    pconn_pool_close(pool, PCONN_FOREVER);
    destroy(pool);
}

void pconn_pool_stats(pconn_pool_t *pool, pconn_pool_stats_t *out)
{
    if (out == NULL)
        return;
    if (pool == NULL) {
        memset(out, 0, sizeof *out);
        return;
    }
    lock_in(pool);
    *out = pool->stats;
    out->connected = pool->connected;
    out->waiting = pool->nwaiting;
    out->in_use = 0;
    for (unsigned i = 0; i < pool->size; i++)
        out->in_use += pool->slots[i].lent != NULL;
    unlock_out(pool);
}
