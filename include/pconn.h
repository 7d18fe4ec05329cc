/* pconn.h - libpconn core: a connection to a service, kept alive by a worker thread.
 *
 * A pconn_t asks a resolver where the service is, connects, reports each step as an
 * event, notices when the connection ends and connects again after a randomized delay.
 * Any thread may block in pconn_connected() until a connection is there.
 *
 * Thread safety: every function here may be called from any thread, and from inside the
 * pconn's own callbacks, unless its comment says otherwise. The worker thread calls the
 * resolver, the connect function, retry_delay and on_event one at a time, in order, with
 * no library lock held, on a stack of 512 KiB: keep large buffers off it.
 *
 * What each callback of pc (on_event, the resolver, the connect function, retry_delay;
 * all run on pc's worker) may call on pc itself:
 *
 *   call                                  from a callback of pc
 *   ------------------------------------  ---------------------------------------------
 *   pconn_current, pconn_stats,           yes: answer at once
 *     pconn_is_closed, pconn_server_name,
 *     pconn_kick
 *   pconn_close_when_current_closed       yes: takes effect after the callback returns
 *   pconn_close                           yes: starts close, returns PCONN_OK at once
 *   pconn_free                            yes: starts close; pc frees itself afterwards
 *   pconn_connected,                      only what is known now: PCONN_OK when connected,
 *     pconn_connected_or_failed             PCONN_ECLOSED when closing, else PCONN_EINVAL
 *                                           at once (waiting would deadlock the worker)
 *   pconn_close_finished                  PCONN_EINVAL at once (the worker cannot finish
 *                                           while it runs the callback)
 *   pconn_conn_* on any connection        yes
 *
 * Waits on another pconn from a callback are allowed (its own worker answers them), but
 * two pconns whose callbacks wait on each other deadlock.
 *
 * fork(): a child process has only the thread that forked; the workers, readers and
 * servers stay in the parent, and every socket is shared with it. So in the child each
 * pconn and connection made before the fork is dead, and says so at once without
 * touching a lock, a socket or a callback: pconn_connected(), pconn_connected_or_failed()
 * ("handle inherited across fork()"), pconn_close() and pconn_close_finished() answer
 * PCONN_ECLOSED; pconn_current() NULL; pconn_is_closed() and pconn_conn_is_closed() true;
 * pconn_kick() and pconn_close_when_current_closed() nothing; pconn_tcp_send_all() and
 * pconn_rpc_call() PCONN_ECLOSED; pconn_conn_close() does not shut the shared socket
 * down. pconn_free() and the last pconn_conn_unref() release the handle's memory and
 * close the child's copies of its descriptors, and leave the resolver, the connect
 * argument and the connection's internals alone (they may run user code, join threads
 * that are not there, or write to the parent's socket). The parent notices nothing. New
 * pconns made in the child work as anywhere. (nng aborts a child that touches an
 * inherited socket; a child that only exec()s needs nothing: every descriptor the
 * library opens is close-on-exec.)
 *
 * Timeouts are int64_t milliseconds on CLOCK_MONOTONIC: PCONN_FOREVER (-1) waits without
 * end, 0 polls. Functions that can fail return PCONN_OK (0) or one of the codes below.
 */
#ifndef PCONN_H
#define PCONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PCONN_VERSION_MAJOR 0
#define PCONN_VERSION_MINOR 1
#define PCONN_VERSION_PATCH 0
#define PCONN_VERSION_STRING "0.1.0"

/* The version of the library actually loaded, e.g. "0.1.0". */
const char *pconn_version(void);

#define PCONN_FOREVER (-1)
#define PCONN_ADDRESS_MAX 512 /* bytes of an address string, NUL included */

/* Status codes. The values are part of the ABI and are never renumbered. */
enum {
    PCONN_OK = 0,
    PCONN_ETIMEDOUT = 1,      /* the timeout passed first */
    PCONN_ECLOSED = 2,        /* the pconn or connection is closed or closing */
    PCONN_EINVAL = 3,         /* a bad argument or option */
    PCONN_ENOMEM = 4,         /* out of memory */
    PCONN_ERESOLVE = 5,       /* the resolver could not tell an address */
    PCONN_ECONNECT = 6,       /* connecting failed */
    PCONN_EIO = 7,            /* reading or writing failed */
    PCONN_EPROTO = 8,         /* the peer broke the protocol */
    PCONN_EHANDSHAKE = 9,     /* the handshake failed */
    PCONN_ETOOBIG = 10,       /* a message over the size limit */
    PCONN_EUNIMPLEMENTED = 11, /* the peer has no such call */
    PCONN_EREMOTE = 12,       /* the peer's handler returned an error */
    PCONN_EABORT = 13         /* permanent failure: stop trying */
};

/* A static, human-readable description of a status code ("timed out", ...). Never NULL;
 * unknown codes give "unknown error". */
const char *pconn_strerror(int code);

/* The symbolic name of a status code ("PCONN_ETIMEDOUT"), or "PCONN_E?" when unknown. */
const char *pconn_err_name(int code);

/* The details of a failure. The caller owns it; the library fills it. */
typedef struct pconn_error_t {
    int code;          /* one of the codes above */
    int sys_errno;     /* errno of the failing system call, or 0 */
    char message[256]; /* one line for humans: what failed, where, why */
} pconn_error_t;

/* Fills *err: code, sys_errno and a printf-style message, truncated to fit. A NULL err
 * is ignored. When sys_errno is not 0, ": <strerror(sys_errno)>" is appended. */
void pconn_error_set(pconn_error_t *err, int code, int sys_errno, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* ---- Connections ---------------------------------------------------------------- */

/* A connection handed out by the library. Reference counted: it is never destroyed
 * while a reference is held, so a stale holder can never use a reused descriptor. */
typedef struct pconn_conn_t pconn_conn_t;

typedef struct pconn_conn_ops_t {
    void (*close)(void *impl);   /* make I/O fail promptly (shutdown(2)); called at most once */
    void (*destroy)(void *impl); /* free everything, close(2) the fd; after the last unref */
    int (*fd)(void *impl);       /* optional: fd whose hang-up means the peer is gone */
} pconn_conn_ops_t;

/* Wraps impl in a new connection with one reference, owned by the caller (a connect
 * function hands that reference to the library). ops must outlive the connection; close
 * and destroy are required. Returns NULL with errno EINVAL or ENOMEM; impl is then
 * still the caller's. */
pconn_conn_t *pconn_conn_new(const pconn_conn_ops_t *ops, void *impl);

/* The impl pointer given to pconn_conn_new(). */
void *pconn_conn_impl(const pconn_conn_t *c);

/* The address the connection was made to; "" before the library recorded it. The string
 * lives as long as the connection. */
const char *pconn_conn_address(const pconn_conn_t *c);

/* Takes one more reference. Any thread. */
void pconn_conn_ref(pconn_conn_t *c);

/* Drops one reference; the last one calls ops->destroy. NULL is ignored. Any thread. */
void pconn_conn_unref(pconn_conn_t *c);

/* Declares the connection finished: calls ops->close once (later calls do nothing),
 * wakes pconn_conn_wait_closed() waiters and, if a pconn holds it as its current
 * connection, lets that pconn go on to DISCONNECTED and its next cycle. Any thread. */
void pconn_conn_close(pconn_conn_t *c);

/* True once pconn_conn_close() has been called (by anyone, the library included). */
bool pconn_conn_is_closed(const pconn_conn_t *c);

/* Waits until the connection is closed. PCONN_OK or PCONN_ETIMEDOUT. */
int pconn_conn_wait_closed(pconn_conn_t *c, int64_t timeout_ms);

/* ---- Resolvers ------------------------------------------------------------------ */

typedef struct pconn_resolver_t pconn_resolver_t;

/* Writes one NUL-terminated address of at most size bytes into address and returns
 * PCONN_OK, or returns an error code with err filled. PCONN_EABORT stops the pconn. */
typedef int (*pconn_resolve_fn)(void *arg, char *address, size_t size, pconn_error_t *err);

/* A resolver around fn. destroy (may be NULL) is called with arg by
 * pconn_resolver_free(). Returns NULL with errno EINVAL (fn NULL) or ENOMEM; arg is then
 * not destroyed. */
pconn_resolver_t *pconn_resolver_new(pconn_resolve_fn fn, void *arg, void (*destroy)(void *arg));

/* Hands out addresses[0], [1], ... [n-1], [0], ... one per call; copies the strings.
 * Returns NULL with errno EINVAL (n == 0, a NULL, empty or over-long address) or
 * ENOMEM. */
pconn_resolver_t *pconn_resolver_static(const char *const *addresses, size_t n);

/* pconn_resolver_static() for the built-in connectors (TCP, Unix, RPC), checking each
 * address first: "host:port" or "[v6]:port" with a port of 1-65535, or "unix:PATH"
 * ("unix:@name": abstract). PCONN_OK with *out; PCONN_EINVAL with err naming the address
 * and what is wrong with it, and *out NULL; PCONN_ENOMEM. err may be NULL. */
int pconn_resolver_static_checked(const char *const *addresses, size_t n, pconn_resolver_t **out,
                                  pconn_error_t *err);

/* Asks r for one address. PCONN_OK, or the resolver's error with err filled; a resolver
 * that fails without setting err->message gets a generic one. Calls to one resolver
 * must not overlap: a pconn's worker calls it; do not call it yourself while a pconn
 * owns it. */
int pconn_resolve(pconn_resolver_t *r, char *address, size_t size, pconn_error_t *err);

/* Frees r and calls its destroy. NULL is ignored. Never free a resolver a pconn owns. */
void pconn_resolver_free(pconn_resolver_t *r);

/* ---- Events --------------------------------------------------------------------- */

typedef enum {
    PCONN_EVENT_ATTEMPTING_TO_CONNECT,
    PCONN_EVENT_OBTAINED_ADDRESS,
    PCONN_EVENT_FAILED_TO_CONNECT,
    PCONN_EVENT_CONNECTED,
    PCONN_EVENT_DISCONNECTED
} pconn_event_kind_t;

/* Everything in an event is borrowed for the duration of the on_event call. */
typedef struct pconn_event_t {
    pconn_event_kind_t kind;
    const char *server_name;
    const char *address;        /* OBTAINED_ADDRESS, CONNECTED, DISCONNECTED; else NULL */
    const pconn_error_t *error; /* FAILED_TO_CONNECT; else NULL */
    pconn_conn_t *conn;         /* CONNECTED: borrowed for the callback (ref to keep) */
    int64_t time_ns;            /* the clock's reading when it happened */
} pconn_event_t;

/* "attempting_to_connect", "obtained_address", ...; "unknown" for other values. */
const char *pconn_event_kind_name(pconn_event_kind_t kind);

/* Formats ev as one line without a newline, e.g.
 * "echo: failed to connect: PCONN_ECONNECT: connect 127.0.0.1:7001: Connection refused".
 * Returns what snprintf() returns: the length the whole line needs, so a result >= size
 * means it was truncated. */
int pconn_event_format(const pconn_event_t *ev, char *buf, size_t size);

/* A ready on_event: prints one line per event to stderr, prefixed with the local wall
 * time ("2026-11-24 06:12:30.123"). arg is ignored. */
void pconn_log_stderr(const pconn_event_t *ev, void *arg);

/* ---- Time ----------------------------------------------------------------------- */

/* A clock drives retry delays and stamps events. NULL in the options means the real
 * CLOCK_MONOTONIC. A manual clock moves only when told, for deterministic tests. */
typedef struct pconn_clock_t pconn_clock_t;

/* A manual clock reading start_ns. NULL with errno ENOMEM. It must outlive every pconn
 * that uses it. */
pconn_clock_t *pconn_clock_manual_new(int64_t start_ns);

/* Moves a manual clock forward by ns (>= 0) and wakes the sleepers whose deadline has
 * come; they stop counting as sleepers at once. Ignored for other clocks. */
void pconn_clock_advance(pconn_clock_t *clk, int64_t ns);

/* The clock's current reading in nanoseconds; NULL reads CLOCK_MONOTONIC. */
int64_t pconn_clock_now(const pconn_clock_t *clk);

/* Test helper: waits (real time) until at least n threads sleep on clk. PCONN_OK or
 * PCONN_ETIMEDOUT (PCONN_EINVAL for a clock that is not manual). */
int pconn_clock_wait_sleepers(pconn_clock_t *clk, int n, int64_t real_timeout_ms);

/* Frees a manual clock; no pconn may still use it. NULL is ignored. */
void pconn_clock_free(pconn_clock_t *clk);

/* ---- Retry delays --------------------------------------------------------------- */

typedef struct pconn_backoff_t {
    int64_t initial_ms, max_ms;
    double multiplier;
} pconn_backoff_t;

/* A retry_delay function: initial_ms * multiplier^failures, capped at max_ms, and never
 * below PCONN_RETRY_FLOOR_MS (a zero or negative initial_ms or max_ms would retry in a
 * busy loop). A NULL backoff means {1000, 30000, 2.0}. Use as retry_delay with a
 * pconn_backoff_t * as retry_delay_arg; the struct must outlive the pconn. */
#define PCONN_RETRY_FLOOR_MS 10
int64_t pconn_retry_exponential(void *backoff /* pconn_backoff_t * */, unsigned failures);

/* ---- The persistent connection -------------------------------------------------- */

/* Makes one connection to address. On success stores a new connection (one reference,
 * handed to the library) in *conn and returns PCONN_OK; otherwise returns an error code
 * with err filled. PCONN_EABORT stops the pconn for good. */
typedef int (*pconn_connect_fn)(void *arg, const char *address, pconn_conn_t **conn,
                                pconn_error_t *err);

typedef struct pconn_options_t {
    const char *server_name;    /* required; copied */
    pconn_resolver_t *resolver; /* required; owned by the pconn from create on,
                                   freed by it even when create fails */
    pconn_connect_fn connect;   /* required */
    void *connect_arg;
    void (*on_event)(const pconn_event_t *ev, void *arg); /* NULL: no events */
    void *on_event_arg;
    /* ms before the next attempt; NULL: 10 s. A function of your own may return 0: the
     * next attempt then starts at once, which against a refusing peer is tens of
     * thousands of attempts a second (measured ~46,000/s on loopback) - a busy loop
     * by your choice; pconn_retry_exponential never goes below PCONN_RETRY_FLOOR_MS. */
    int64_t (*retry_delay)(void *arg, unsigned failures);
    void *retry_delay_arg;
    uint64_t random_seed;  /* 0: seeded from the OS */
    pconn_clock_t *clock;  /* NULL: the real monotonic clock */
} pconn_options_t;

typedef struct pconn_t pconn_t;

/* Creates a persistent connection and starts its worker, which begins at once with
 * ATTEMPTING_TO_CONNECT. opts is copied (server_name too). On success *out is set (before
 * the worker's first callback, which may use it) and PCONN_OK returned; otherwise PCONN_EINVAL (a required option missing) or PCONN_ENOMEM,
 * *out is set to NULL and opts->resolver has been freed. */
int pconn_create(const pconn_options_t *opts, pconn_t **out);

/* Waits until pc is connected and stores a new reference to the connection in *conn
 * (release it with pconn_conn_unref()). Returns PCONN_OK, at once if already connected;
 * PCONN_ETIMEDOUT when timeout_ms passes; PCONN_ECLOSED once close has started (threads
 * already waiting then wake with it). From one of pc's own callbacks it never waits:
 * PCONN_EINVAL at once when it would have to (see the table at the top). */
int pconn_connected(pconn_t *pc, int64_t timeout_ms, pconn_conn_t **conn);

/* As pconn_connected(), but also returns when the next attempt fails: then the
 * attempt's error code, with err filled. After an abort (PCONN_EABORT from the
 * resolver or connect function) it returns that error instead of PCONN_ECLOSED. err may
 * be NULL. */
int pconn_connected_or_failed(pconn_t *pc, int64_t timeout_ms, pconn_conn_t **conn,
                              pconn_error_t *err);

/* A new reference to the current connection, or NULL when not connected. Never blocks
 * beyond a brief lock. */
pconn_conn_t *pconn_current(pconn_t *pc);

/* Starts close: no new attempt starts, the current connection is closed, a waiting retry
 * and an in-flight built-in resolve or connect are cut short, waiters wake with
 * PCONN_ECLOSED. Then waits up to timeout_ms for close to finish (the last connection
 * closed, every callback returned). PCONN_OK when finished, else PCONN_ETIMEDOUT. From
 * inside one of pc's callbacks it starts close and returns PCONN_OK at once: close
 * finishes after the callback returns. */
int pconn_close(pconn_t *pc, int64_t timeout_ms);

/* Waits, starting nothing, for a close (or abort, or drain) to finish. PCONN_OK or
 * PCONN_ETIMEDOUT. From one of pc's own callbacks: PCONN_EINVAL at once, unless already
 * finished. */
int pconn_close_finished(pconn_t *pc, int64_t timeout_ms);

/* Drain: no reconnect after the current connection ends, which this does not cause.
 * When not connected it stops now, as pconn_close() would, without waiting. */
void pconn_close_when_current_closed(pconn_t *pc);

/* Cuts a retry wait short: the next attempt starts now (the network is back). Does
 * nothing in other states. */
void pconn_kick(pconn_t *pc);

/* True once close has started (by pconn_close, drain or abort). */
bool pconn_is_closed(const pconn_t *pc);

/* Closes pc, waits for the close to finish, joins the worker and frees everything.
 * NULL is ignored. Connections still referenced elsewhere stay valid (closed) until
 * their last unref. Called from one of pc's own callbacks, it starts close and pc frees
 * itself when the worker ends; pc must not be used after this call either way.
 * Calls already inside pc on other threads when pconn_free() starts (pconn_connected,
 * pconn_connected_or_failed, pconn_close_finished, pconn_close, pconn_stats, pconn_kick,
 * pconn_close_when_current_closed) are safe: waiters wake with PCONN_ECLOSED
 * (pconn_close_finished with PCONN_OK), and the memory is freed only after the last of
 * them has left (the handle counts the callers inside; the final free waits for zero).
 * A call that starts after pconn_free() has returned is a use after free. */
void pconn_free(pconn_t *pc);

/* The server_name given at create. Lives as long as pc. */
const char *pconn_server_name(const pconn_t *pc);

typedef enum {
    PCONN_STATE_CONNECTING, /* an attempt (resolve + connect) is running */
    PCONN_STATE_CONNECTED,
    PCONN_STATE_WAITING,    /* waiting for the retry delay */
    PCONN_STATE_CLOSED
} pconn_state_t;

typedef struct pconn_stats_t {
    pconn_state_t state;
    uint64_t attempts, failures, connects, disconnects;
    int64_t state_since_ns;   /* clock reading when the state began */
    pconn_error_t last_error; /* code 0 when none yet */
} pconn_stats_t;

/* Fills *out with a consistent snapshot. */
void pconn_stats(pconn_t *pc, pconn_stats_t *out);

/* The same snapshot as one JSON object on one line, for people and monitoring:
 * {"server_name", "state" ("connecting", "connected", "waiting", "closed"),
 * "state_seconds" (in it since), "attempts", "failures", "connects", "disconnects",
 * "last_error" ({"code": "PCONN_...", "message"} or null)}, and for an RPC pconn "rpc":
 * {"calls", "answered", "in_flight", "bytes_out", "writes" (system calls that sent
 * them: several callers' frames share one on a busy connection), "bytes_in", "served"
 * (queries its handlers ran), "errors" ({"PCONN_...": count}), "latency_us" ([[bound, count], ...]:
 * answers faster than bound us and not faster than the bucket below)}. A malloc'd
 * string the caller frees with free(); NULL for NULL or out of memory. Any thread. */
char *pconn_stats_json(pconn_t *pc);

/* Levels of the log callbacks (RPC server, announcer). */
enum { PCONN_LOG_ERROR = 0, PCONN_LOG_WARNING = 1, PCONN_LOG_INFO = 2 };
/* A log callback: one line for people, no newline; called from the library's threads,
 * with no lock held. */
typedef void (*pconn_log_fn)(int level, const char *message, void *arg);

#ifdef __cplusplus
}
#endif
#endif /* PCONN_H */
