/* pconn.c - the persistent connection: its worker thread, state machine and waits.
 * The worker runs the cycle of DESIGN.md section 3; public calls take the mutex briefly.
 * Callbacks and user functions always run with the mutex released. */
#include "internal.h"
#include "rpc/rpc.h"

#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_RETRY_DELAY_MS 10000
/* The worker's stack: its callbacks run on it. Enough for getaddrinfo, libcurl and
 * ordinary user code, and thousands of pconns do not reserve 8 MiB each. Sanitizers
 * need more, so they keep the default. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define WORKER_STACK 0
#else
#define WORKER_STACK (512 * 1024)
#endif
#define MAX_RETRY_DELAY_MS ((int64_t)1000 * 3600 * 24 * 365) /* a year: no overflow in ns */

struct pconn_t {
    pthread_mutex_t mutex;
    pthread_cond_t cond; /* any change a waiter may want: connected, failed, closed */
    pthread_t worker;
    int wake_fd;         /* written to wake the worker; the cancel fd of its attempts */

    /* Set at create, read-only afterwards. */
    char *server_name;
    pconn_resolver_t *resolver;
    pconn_connect_fn connect;
    void *connect_arg;
    void (*connect_arg_free)(void *);
    void (*on_event)(const pconn_event_t *, void *);
    void *on_event_arg;
    int64_t (*retry_delay)(void *, unsigned);
    void *retry_delay_arg;
    pconn_clock_t *clock;
    uint64_t rng; /* the worker's alone */

    /* Guarded by mutex. */
    atomic_bool closing;   /* close started; also read without the lock */
    bool draining;         /* no reconnect after the current connection */
    bool kicked;           /* cut the current retry wait short */
    bool finished;         /* the worker will call nothing more */
    bool self_free;        /* pconn_free() came from a callback: the worker frees */
    /* Callers inside a public call that takes the mutex (enter()/leave()), counted before
     * they lock and uncounted after they unlock; the final free waits until it is 0 so
     * nothing is freed under a caller on its way out (defect 1 of issue 10). */
    atomic_uint inside;
    pconn_conn_t *current; /* from a successful connect until DISCONNECTED */
    /* The fast path's copy of current, under its own spinlock: pconn_current() takes no
     * mutex. Written under both locks (mutex first), NULL once close starts. */
    atomic_int cur_spin;
    pconn_conn_t *cur_fast;
    uint64_t fail_gen;     /* counts failed attempts, for pconn_connected_or_failed() */
    pconn_error_t last_fail;
    bool aborted;
    pconn_stats_t stats;
    unsigned fork_gen;     /* pconn__fork_generation() at create */
};

/* The pconn whose worker runs on this thread: lets built-in connectors be cancelled and
 * pconn_close()/pconn_free() know they were called from a callback. */
static _Thread_local pconn_t *tl_worker_pc;

int pconn__cancel_fd(void)
{
    return tl_worker_pc != NULL ? tl_worker_pc->wake_fd : -1;
}

bool pconn__cancelled(void)
{
    return tl_worker_pc != NULL && atomic_load(&tl_worker_pc->closing);
}

int pconn__wait_cancellable(int fd, short events, int64_t deadline_ns, short *revents)
{
    int cancel_fd = pconn__cancel_fd();
    for (;;) {
        struct pollfd pfd[2] = {{.fd = fd, .events = events}, {.fd = cancel_fd, .events = POLLIN}};
        int rc = poll(pfd, cancel_fd >= 0 ? 2 : 1, pconn__poll_timeout_ms(deadline_ns));
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc < 0)
            return PCONN_EIO;
        if (rc == 0)
            return PCONN_ETIMEDOUT;
        if (cancel_fd >= 0 && pfd[1].revents != 0) {
            if (pconn__cancelled())
                return PCONN_ECLOSED;
            pconn__wake_drain(cancel_fd); /* a kick: the worker re-checks its flags later */
        }
        if (pfd[0].revents != 0) {
            *revents = pfd[0].revents;
            return PCONN_OK;
        }
    }
}

/* ---- fork() ---------------------------------------------------------------------- */

/* A child of fork() has one thread: the one that forked. Every worker, and every lock
 * some other thread held, stayed behind in the parent, and the descriptors are shared
 * with it. So in the child a handle made before the fork is dead: each call answers at
 * once without touching a lock, a descriptor or a user function (see pconn_free). */
static atomic_uint fork_generation;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
    atomic_fetch_add(&fork_generation, 1);
    tl_worker_pc = NULL; /* fork() from a callback: this thread is no worker here */
    pconn__watch_after_fork();
}

static void fork_register(void)
{
    pthread_atfork(NULL, NULL, on_fork_child);
}

unsigned pconn__fork_generation(void)
{
    pthread_once(&fork_once, fork_register);
    return atomic_load(&fork_generation);
}

bool pconn__inherited(unsigned generation)
{
    return atomic_load_explicit(&fork_generation, memory_order_relaxed) != generation;
}

static bool inherited(const pconn_t *pc)
{
    return pconn__inherited(pc->fork_gen);
}

/* pconn_free() of an inherited handle: its own memory and its copy of the wake fd. The
 * resolver, the connect argument and the worker's connection reference are the parent's
 * (freeing them could run user code or write to sockets the parent uses): only the
 * connection's reference is dropped, which closes this process's copy of its fd. */
static void free_inherited(pconn_t *pc)
{
    pconn_conn_unref(pc->current);
    close(pc->wake_fd);
    free(pc->server_name);
    free(pc); /* not the mutex or cond: some parent thread may have held them */
}

/* ---- for stats.c ------------------------------------------------------------------ */

int64_t pconn__stats_clock_now(const pconn_t *pc)
{
    return pconn_clock_now(pc->clock);
}

rpc_stats_t *pconn__stats_rpc(const pconn_t *pc)
{
    return pconn__rpc_client_stats(pc->connect_arg, pc->connect);
}

/* ---- small helpers --------------------------------------------------------------- */

/* The critical sections under cur_spin are a few instructions; yield if we keep losing
 * (the holder was preempted). */
static void cur_lock(pconn_t *pc)
{
    while (atomic_exchange_explicit(&pc->cur_spin, 1, memory_order_acquire) != 0) {
        for (int i = 0; atomic_load_explicit(&pc->cur_spin, memory_order_relaxed) != 0; i++) {
            if (i >= 100) {
                sched_yield();
                i = 0;
            }
        }
    }
}

static void cur_unlock(pconn_t *pc)
{
    atomic_store_explicit(&pc->cur_spin, 0, memory_order_release);
}

static void set_fast_current_locked(pconn_t *pc, pconn_conn_t *c)
{
    cur_lock(pc);
    pc->cur_fast = c;
    cur_unlock(pc);
}

static uint64_t rng_next(uint64_t *state) /* splitmix64 */
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A delay uniform in [0.7 d, 1.3 d], in ns. */
static int64_t randomize_ns(pconn_t *pc, int64_t delay_ms)
{
    if (delay_ms <= 0)
        return 0;
    if (delay_ms > MAX_RETRY_DELAY_MS)
        delay_ms = MAX_RETRY_DELAY_MS;
    double u = (double)(rng_next(&pc->rng) >> 11) * 0x1.0p-53; /* [0, 1) */
    return (int64_t)((double)delay_ms * 1e6 * (0.7 + 0.6 * u));
}

static int64_t now_ns(const pconn_t *pc)
{
    return pconn_clock_now(pc->clock);
}

static void set_state_locked(pconn_t *pc, pconn_state_t s)
{
    if (pc->stats.state != s) {
        pc->stats.state = s;
        pc->stats.state_since_ns = now_ns(pc);
    }
}

/* Marks close as started and wakes everyone; the worker closes the connection. */
static void start_close_locked(pconn_t *pc)
{
    if (atomic_load(&pc->closing))
        return;
    atomic_store(&pc->closing, true);
    set_fast_current_locked(pc, NULL);
    pthread_cond_broadcast(&pc->cond);
    pconn__wake(pc->wake_fd);
}

static bool closing(const pconn_t *pc)
{
    return atomic_load(&pc->closing);
}

/* Calls on_event with the mutex released. */
static void emit_locked(pconn_t *pc, pconn_event_kind_t kind, const char *address,
                        const pconn_error_t *error, pconn_conn_t *conn)
{
    if (pc->on_event == NULL)
        return;
    pconn_event_t ev = {.kind = kind,
                        .server_name = pc->server_name,
                        .address = address,
                        .error = error,
                        .conn = conn,
                        .time_ns = now_ns(pc)};
    pconn__mutex_unlock(&pc->mutex);
    pc->on_event(&ev, pc->on_event_arg);
    pconn__mutex_lock(&pc->mutex);
}

static bool same_error(const pconn_error_t *a, const pconn_error_t *b)
{
    return a->code == b->code && strcmp(a->message, b->message) == 0;
}

/* Waits until the retry timer R fires, close starts or someone kicks. */
static void wait_retry_locked(pconn_t *pc, int64_t retry_at_ns)
{
    set_state_locked(pc, PCONN_STATE_WAITING);
    while (!closing(pc) && !pc->kicked && now_ns(pc) < retry_at_ns) {
        pconn__mutex_unlock(&pc->mutex);
        pconn__clock_sleep(pc->clock, retry_at_ns, pc->wake_fd);
        pconn__mutex_lock(&pc->mutex);
    }
    pc->kicked = false;
}

/* Sleeps until conn is closed, its fd hangs up, or close starts. Reads nothing. */
static void wait_conn_end_locked(pconn_t *pc, pconn_conn_t *conn, int fd)
{
    while (!closing(pc) && !pconn_conn_is_closed(conn)) {
        pconn__mutex_unlock(&pc->mutex);
        struct pollfd pfd[2] = {{.fd = pc->wake_fd, .events = POLLIN},
                                {.fd = fd, .events = POLLRDHUP}};
        int rc = poll(pfd, fd >= 0 ? 2 : 1, -1);
        bool hung_up = rc > 0 && fd >= 0 &&
                       (pfd[1].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
        if (rc > 0 && pfd[0].revents != 0)
            pconn__wake_drain(pc->wake_fd); /* a read(2) saved on every hang-up */
        pconn__mutex_lock(&pc->mutex);
        if (hung_up)
            return;
    }
}

/* ---- the worker ------------------------------------------------------------------ */

/* One attempt: resolve, then connect. Returns PCONN_OK with *conn set, an error code
 * with err set, or PCONN_ECLOSED when close started meanwhile (nothing to report). */
static int attempt_locked(pconn_t *pc, char *address, char *last_address,
                          pconn_conn_t **conn, pconn_error_t *err)
{
    pconn__mutex_unlock(&pc->mutex);
    int rc = pconn_resolve(pc->resolver, address, PCONN_ADDRESS_MAX, err);
    pconn__mutex_lock(&pc->mutex);
    if (closing(pc))
        return PCONN_ECLOSED;
    if (rc != PCONN_OK)
        return rc;

    if (strcmp(address, last_address) != 0) {
        strcpy(last_address, address);
        emit_locked(pc, PCONN_EVENT_OBTAINED_ADDRESS, address, NULL, NULL);
        if (closing(pc))
            return PCONN_ECLOSED;
    }

    pconn__mutex_unlock(&pc->mutex);
    *conn = NULL;
    err->code = PCONN_OK;
    err->sys_errno = 0;
    err->message[0] = '\0';
    rc = pc->connect(pc->connect_arg, address, conn, err);
    if (rc == PCONN_OK && *conn == NULL) {
        pconn_error_set(err, PCONN_ECONNECT, 0, "connect %s: the connect function returned no connection",
                        address);
        rc = PCONN_ECONNECT;
    } else if (rc != PCONN_OK) {
        pconn_conn_unref(*conn); /* a sloppy connect function may leave one behind */
        *conn = NULL;
        err->code = rc;
        if (err->message[0] == '\0')
            pconn_error_set(err, rc, err->sys_errno, "connect %s: %s", address, pconn_strerror(rc));
    }
    pconn__mutex_lock(&pc->mutex);
    return rc;
}

/* From a successful connect to DISCONNECTED. */
static void run_connection_locked(pconn_t *pc, pconn_conn_t *conn, const char *address)
{
    pconn__conn_set_address(conn, address);
    pconn__conn_watch(conn, pc->wake_fd);
    pc->current = conn;
    if (!closing(pc))
        set_fast_current_locked(pc, conn);
    pc->stats.connects++;
    set_state_locked(pc, PCONN_STATE_CONNECTED);
    pthread_cond_broadcast(&pc->cond);

    pconn__mutex_unlock(&pc->mutex);
    if (closing(pc))
        pconn_conn_close(conn); /* connected after close began: closed at once */
    int fd = pconn__conn_fd(conn);
    pconn__mutex_lock(&pc->mutex);

    emit_locked(pc, PCONN_EVENT_CONNECTED, address, NULL, conn);
    wait_conn_end_locked(pc, conn, fd);

    pc->current = NULL;
    set_fast_current_locked(pc, NULL);
    pc->stats.disconnects++;
    pconn__mutex_unlock(&pc->mutex);
    /* Unwatched first: our own close need not wake us. Our reference goes before
     * DISCONNECTED: a holder that lets go of the connection when told sees it destroyed
     * at once. */
    pconn__conn_watch(conn, -1);
    pconn__conn_release(conn);
    pconn__mutex_lock(&pc->mutex);
    emit_locked(pc, PCONN_EVENT_DISCONNECTED, address, NULL, NULL);
    if (pc->draining)
        start_close_locked(pc);
}

static void record_failure_locked(pconn_t *pc, const pconn_error_t *err)
{
    pc->stats.failures++;
    pc->stats.last_error = *err;
    pc->last_fail = *err;
    pc->fail_gen++;
    if (err->code == PCONN_EABORT) {
        pc->aborted = true;
        start_close_locked(pc);
    }
    pthread_cond_broadcast(&pc->cond);
}

static void run_locked(pconn_t *pc)
{
    unsigned failures = 0;
    char address[PCONN_ADDRESS_MAX];
    char last_address[PCONN_ADDRESS_MAX];
    pconn_error_t err, last_err;

    while (!closing(pc)) {
        set_state_locked(pc, PCONN_STATE_CONNECTING);
        last_address[0] = '\0';
        last_err.code = PCONN_OK;
        emit_locked(pc, PCONN_EVENT_ATTEMPTING_TO_CONNECT, NULL, NULL, NULL);

        for (;;) {
            if (closing(pc))
                return;
            set_state_locked(pc, PCONN_STATE_CONNECTING);
            int64_t delay_ms = DEFAULT_RETRY_DELAY_MS;
            if (pc->retry_delay != NULL) {
                pconn__mutex_unlock(&pc->mutex);
                delay_ms = pc->retry_delay(pc->retry_delay_arg, failures);
                pconn__mutex_lock(&pc->mutex);
            }
            int64_t retry_at = now_ns(pc) + randomize_ns(pc, delay_ms);
            pc->stats.attempts++;

            pconn_conn_t *conn = NULL;
            int rc = attempt_locked(pc, address, last_address, &conn, &err);
            if (rc == PCONN_OK) {
                failures = 0;
                run_connection_locked(pc, conn, address);
                if (closing(pc))
                    return;
                wait_retry_locked(pc, retry_at);
                break; /* a new cycle */
            }
            if (closing(pc))
                return; /* an attempt cut short by close is not a failure to report */
            failures++;
            record_failure_locked(pc, &err);
            if (last_err.code == PCONN_OK || !same_error(&err, &last_err)) {
                last_err = err;
                emit_locked(pc, PCONN_EVENT_FAILED_TO_CONNECT, NULL, &err, NULL);
            }
            if (closing(pc))
                return;
            wait_retry_locked(pc, retry_at);
        }
    }
}

/* Every public call that takes pc->mutex goes through lock_in()/unlock_out(): the
 * decrement after unlocking is the caller's last touch of pc. */
static void lock_in(pconn_t *pc)
{
    atomic_fetch_add(&pc->inside, 1);
    pconn__mutex_lock(&pc->mutex);
}

static void unlock_out(pconn_t *pc)
{
    pconn__mutex_unlock(&pc->mutex);
    atomic_fetch_sub(&pc->inside, 1);
}

/* The worker has finished (so closing and finished are set and broadcast): every caller
 * still inside is on its way out without waiting; let them leave before freeing. */
static void wait_callers_out(pconn_t *pc)
{
    while (atomic_load(&pc->inside) != 0) {
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
}

/* The user's destructors run last: after them, nothing of pc is left to release. */
static void destroy(pconn_t *pc)
{
    wait_callers_out(pc);
    pconn_resolver_t *resolver = pc->resolver;
    void (*connect_arg_free)(void *) = pc->connect_arg_free;
    void *connect_arg = pc->connect_arg;
    close(pc->wake_fd);
    free(pc->server_name);
    pthread_cond_destroy(&pc->cond);
    pthread_mutex_destroy(&pc->mutex);
    free(pc);
    pconn_resolver_free(resolver);
    if (connect_arg_free != NULL)
        connect_arg_free(connect_arg);
}

static void *worker_main(void *arg)
{
    pconn_t *pc = arg;
    tl_worker_pc = pc;
    pconn__mutex_lock(&pc->mutex);
    run_locked(pc);
    set_state_locked(pc, PCONN_STATE_CLOSED);
    pc->finished = true;
    bool self_free = pc->self_free;
    pthread_cond_broadcast(&pc->cond);
    pconn__mutex_unlock(&pc->mutex);
    tl_worker_pc = NULL;
    if (self_free) {
        pthread_detach(pthread_self());
        destroy(pc);
    }
    return NULL;
}

/* ---- public ---------------------------------------------------------------------- */

int pconn__create(const pconn_options_t *opts, void (*connect_arg_free)(void *), pconn_t **out)
{
    if (out != NULL)
        *out = NULL;
    if (opts == NULL)
        return PCONN_EINVAL;
    int rc = PCONN_EINVAL;
    pconn_t *pc = NULL;
    if (out == NULL || opts->server_name == NULL || opts->resolver == NULL || opts->connect == NULL)
        goto fail;
    rc = PCONN_ENOMEM;
    pc = calloc(1, sizeof *pc);
    if (pc == NULL)
        goto fail;
    pc->server_name = strdup(opts->server_name);
    if (pc->server_name == NULL)
        goto fail_pc;
    pc->wake_fd = pconn__wake_fd_new();
    if (pc->wake_fd < 0)
        goto fail_name;
    if (pconn__mutex_init_adaptive(&pc->mutex) != 0)
        goto fail_fd;
    if (pconn__cond_init(&pc->cond) != 0)
        goto fail_mutex;

    pc->resolver = opts->resolver;
    pc->connect = opts->connect;
    pc->connect_arg = opts->connect_arg;
    pc->connect_arg_free = connect_arg_free;
    pc->on_event = opts->on_event;
    pc->on_event_arg = opts->on_event_arg;
    pc->retry_delay = opts->retry_delay;
    pc->retry_delay_arg = opts->retry_delay_arg;
    pc->clock = opts->clock;
    pc->rng = opts->random_seed;
    if (pc->rng == 0 && getrandom(&pc->rng, sizeof pc->rng, 0) != sizeof pc->rng)
        pc->rng = (uint64_t)pconn__mono_ns() ^ (uint64_t)(uintptr_t)pc;
    atomic_init(&pc->closing, false);
    atomic_init(&pc->cur_spin, 0);
    atomic_init(&pc->inside, 0);
    pc->stats.state = PCONN_STATE_CONNECTING;
    pc->stats.state_since_ns = now_ns(pc);
    pc->fork_gen = pconn__fork_generation();

    /* Set before the worker starts, so its first callback can already use *out. */
    *out = pc;
    if (pconn__thread_start(&pc->worker, worker_main, pc, WORKER_STACK, false) != 0) {
        *out = NULL;
        goto fail_cond;
    }
    return PCONN_OK;

fail_cond:
    pthread_cond_destroy(&pc->cond);
fail_mutex:
    pthread_mutex_destroy(&pc->mutex);
fail_fd:
    close(pc->wake_fd);
fail_name:
    free(pc->server_name);
fail_pc:
    free(pc);
fail:
    pconn_resolver_free(opts->resolver);
    if (connect_arg_free != NULL)
        connect_arg_free(opts->connect_arg);
    return rc;
}

int pconn_create(const pconn_options_t *opts, pconn_t **out)
{
    return pconn__create(opts, NULL, out);
}

static int wait_connected(pconn_t *pc, int64_t timeout_ms, pconn_conn_t **conn,
                          pconn_error_t *err, bool or_failed)
{
    if (conn != NULL)
        *conn = NULL;
    if (pc == NULL || conn == NULL)
        return PCONN_EINVAL;
    if (inherited(pc)) {
        if (or_failed && err != NULL)
            pconn_error_set(err, PCONN_ECLOSED, 0, "%s: handle inherited across fork()",
                            pc->server_name);
        return PCONN_ECLOSED;
    }
    int64_t deadline = pconn__deadline_ns(timeout_ms);
    int rc;
    bool timed_out = false;
    lock_in(pc);
    uint64_t gen = pc->fail_gen;
    for (;;) {
        if (closing(pc)) {
            rc = PCONN_ECLOSED;
            if (or_failed && pc->aborted) {
                rc = pc->last_fail.code;
                if (err != NULL)
                    *err = pc->last_fail;
            }
            break;
        }
        if (pc->current != NULL && !pconn_conn_is_closed(pc->current)) {
            pconn_conn_ref(pc->current);
            *conn = pc->current;
            rc = PCONN_OK;
            break;
        }
        if (or_failed && pc->fail_gen != gen) {
            rc = pc->last_fail.code;
            if (err != NULL)
                *err = pc->last_fail;
            break;
        }
        if (timed_out) {
            rc = PCONN_ETIMEDOUT;
            break;
        }
        if (tl_worker_pc == pc) { /* one of pc's callbacks: waiting would deadlock */
            rc = PCONN_EINVAL;
            break;
        }
        timed_out = pconn__cond_wait_until(&pc->cond, &pc->mutex, deadline) != 0;
    }
    unlock_out(pc);
    return rc;
}

int pconn_connected(pconn_t *pc, int64_t timeout_ms, pconn_conn_t **conn)
{
    return wait_connected(pc, timeout_ms, conn, NULL, false);
}

int pconn_connected_or_failed(pconn_t *pc, int64_t timeout_ms, pconn_conn_t **conn,
                              pconn_error_t *err)
{
    return wait_connected(pc, timeout_ms, conn, err, true);
}

pconn_conn_t *pconn_current(pconn_t *pc)
{
    if (inherited(pc))
        return NULL;
    cur_lock(pc);
    pconn_conn_t *c = pc->cur_fast;
    if (c != NULL && !pconn_conn_is_closed(c))
        pconn_conn_ref(c);
    else
        c = NULL;
    cur_unlock(pc);
    return c;
}

int pconn_close_finished(pconn_t *pc, int64_t timeout_ms)
{
    if (inherited(pc))
        return PCONN_ECLOSED;
    int64_t deadline = pconn__deadline_ns(timeout_ms);
    int rc = PCONN_OK;
    lock_in(pc);
    if (!pc->finished && tl_worker_pc == pc)
        rc = PCONN_EINVAL; /* one of pc's callbacks: the worker cannot finish under it */
    while (rc == PCONN_OK && !pc->finished) {
        if (pconn__cond_wait_until(&pc->cond, &pc->mutex, deadline) != 0 && !pc->finished) {
            rc = PCONN_ETIMEDOUT;
            break;
        }
    }
    unlock_out(pc);
    return rc;
}

/* Starts close and closes the current connection outside the lock. */
static void start_close(pconn_t *pc)
{
    lock_in(pc);
    start_close_locked(pc);
    pconn_conn_t *cur = pc->current;
    if (cur != NULL)
        pconn_conn_ref(cur);
    pconn__mutex_unlock(&pc->mutex);
    if (cur != NULL) {
        pconn_conn_close(cur);
        pconn_conn_unref(cur);
    }
    atomic_fetch_sub(&pc->inside, 1);
}

int pconn_close(pconn_t *pc, int64_t timeout_ms)
{
    if (pc == NULL)
        return PCONN_EINVAL;
    if (inherited(pc))
        return PCONN_ECLOSED;
    start_close(pc);
    if (tl_worker_pc == pc)
        return PCONN_OK;
    return pconn_close_finished(pc, timeout_ms);
}

void pconn_close_when_current_closed(pconn_t *pc)
{
    if (inherited(pc))
        return;
    lock_in(pc);
    pc->draining = true;
    if (pc->current == NULL)
        start_close_locked(pc);
    unlock_out(pc);
}

void pconn_kick(pconn_t *pc)
{
    if (inherited(pc))
        return;
    lock_in(pc);
    if (pc->stats.state == PCONN_STATE_WAITING) {
        pc->kicked = true;
        pconn__wake(pc->wake_fd);
    }
    unlock_out(pc);
}

bool pconn_is_closed(const pconn_t *pc)
{
    return closing(pc) || inherited(pc);
}

const char *pconn_server_name(const pconn_t *pc)
{
    return pc->server_name;
}

void pconn_stats(pconn_t *pc, pconn_stats_t *out)
{
    if (inherited(pc)) { /* the counters as they were at the fork; the lock may be held */
        *out = pc->stats;
        out->state = PCONN_STATE_CLOSED;
        return;
    }
    lock_in(pc);
    *out = pc->stats;
    unlock_out(pc);
}

void pconn_free(pconn_t *pc)
{
    if (pc == NULL)
        return;
    if (inherited(pc)) {
        free_inherited(pc);
        return;
    }
    if (tl_worker_pc == pc) {
        pconn__mutex_lock(&pc->mutex);
        pc->self_free = true;
        pconn__mutex_unlock(&pc->mutex);
        start_close(pc);
        return;
    }
    pconn_close(pc, PCONN_FOREVER);
    pthread_join(pc->worker, NULL);
    destroy(pc);
}

int64_t pconn_retry_exponential(void *backoff, unsigned failures)
{
    static const pconn_backoff_t dflt = {1000, 30000, 2.0};
    const pconn_backoff_t *b = backoff != NULL ? backoff : &dflt;
    double d = (double)b->initial_ms;
    for (unsigned i = 0; i < failures && d < (double)b->max_ms && b->multiplier > 1.0; i++)
        d *= b->multiplier;
    if (d > (double)b->max_ms)
        d = (double)b->max_ms;
    return d < PCONN_RETRY_FLOOR_MS ? PCONN_RETRY_FLOOR_MS : (int64_t)d;
}
