/* internal.h - what the library's files share and users never see.
 * Everything here has hidden visibility and a pconn__ prefix. */
#ifndef PCONN_INTERNAL_H
#define PCONN_INTERNAL_H

#include "pconn.h"

#include <pthread.h>

#define PCONN_HIDDEN __attribute__((visibility("hidden")))

/* Aborts on a failed pthread lock call: that only happens on a library bug, and going
 * on would corrupt state (libuv does the same). */
PCONN_HIDDEN void pconn__mutex_lock(pthread_mutex_t *m);
PCONN_HIDDEN void pconn__mutex_unlock(pthread_mutex_t *m);
/* Locks m before the CLOCK_MONOTONIC deadline (ns; 0: only if free now; INT64_MAX: no
 * limit). True when locked. */
PCONN_HIDDEN bool pconn__mutex_lock_until(pthread_mutex_t *m, int64_t deadline_ns);
/* Initialises an adaptive mutex (spins briefly before sleeping): for locks held a few
 * instructions at a time by many threads. */
PCONN_HIDDEN int pconn__mutex_init_adaptive(pthread_mutex_t *m);
/* Initialises a condition variable that waits on CLOCK_MONOTONIC. */
PCONN_HIDDEN int pconn__cond_init(pthread_cond_t *c);
/* Waits on c until the CLOCK_MONOTONIC deadline (ns, INT64_MAX: none). Returns 0 or
 * ETIMEDOUT; spurious wake-ups return 0, so callers loop over their predicate. */
PCONN_HIDDEN int pconn__cond_wait_until(pthread_cond_t *c, pthread_mutex_t *m, int64_t deadline_ns);
/* The CLOCK_MONOTONIC reading in ns. */
PCONN_HIDDEN int64_t pconn__mono_ns(void);
/* The absolute deadline for a timeout given in ms: INT64_MAX for a negative timeout. */
PCONN_HIDDEN int64_t pconn__deadline_ns(int64_t timeout_ms);
/* Milliseconds left until deadline_ns for poll(): -1 for none, 0 when passed. */
PCONN_HIDDEN int pconn__poll_timeout_ms(int64_t deadline_ns);

/* Starts a library thread with every signal blocked (the program's handlers run on its
 * own threads), a stack of stack bytes (0: the default), detached or joinable. 0, or
 * the error of pthread_create(). */
PCONN_HIDDEN int pconn__thread_start(pthread_t *t, void *(*fn)(void *), void *arg, size_t stack,
                                     bool detached);

/* Wake descriptors: an eventfd that stays readable until drained. */
PCONN_HIDDEN int pconn__wake_fd_new(void);
PCONN_HIDDEN void pconn__wake(int fd);
PCONN_HIDDEN void pconn__wake_drain(int fd);

/* Sleeps until clk (NULL: real) reads deadline_ns or wake_fd becomes readable. On a
 * manual clock the caller counts as a sleeper meanwhile. Drains wake_fd. */
PCONN_HIDDEN void pconn__clock_sleep(pconn_clock_t *clk, int64_t deadline_ns, int wake_fd);

/* Connections: what the worker needs beyond the public calls. */
PCONN_HIDDEN void pconn__conn_set_address(pconn_conn_t *c, const char *address);
/* Asks for a pconn__wake(wake_fd) when c is closed; -1 stops that. */
PCONN_HIDDEN void pconn__conn_watch(pconn_conn_t *c, int wake_fd);
/* pconn_conn_close() then pconn_conn_unref(), without the close when the caller holds
 * the only reference (destroy follows at once). For the worker, once the pconn no longer
 * hands c out. */
PCONN_HIDDEN void pconn__conn_release(pconn_conn_t *c);
/* For a connection type whose threads hold references of their own: quiesce(impl) is
 * called by pconn__conn_release() after the close and before the owner's unref, to wait
 * for those threads and take their references over. Set before the connection is used. */
PCONN_HIDDEN void pconn__conn_set_quiesce(pconn_conn_t *c, void (*quiesce)(void *impl));
/* ops->fd(impl), or -1 when there is none. */
PCONN_HIDDEN int pconn__conn_fd(const pconn_conn_t *c);
/* The ops a connection was made with: tells a connection type its own connections. */
PCONN_HIDDEN const pconn_conn_ops_t *pconn__conn_ops(const pconn_conn_t *c);

/* A parsed address. */
typedef struct pconn__addr_t {
    bool is_unix;
    char host[256];       /* without brackets */
    char port[6];
    char path[108];       /* unix: the path; abstract names start with '@' */
} pconn__addr_t;
/* Parses "host:port", "[v6]:port", "unix:/path". Port 0 is accepted only when
 * allow_port0 (for listening). PCONN_OK, or PCONN_EINVAL with err naming the address and
 * what is wrong with it. */
PCONN_HIDDEN int pconn__address_parse(const char *address, bool allow_port0, pconn__addr_t *out,
                                      pconn_error_t *err);

/* Cancellation of built-in resolvers and connectors: while a pconn's worker runs its
 * resolver or connect function, this thread's cancel fd is the pconn's wake fd (else
 * -1); when it turns readable, check pconn__cancelled(). The fd may also be readable for
 * other reasons (kick): a caller that sees it readable but not cancelled drains it and
 * goes on; the worker re-checks its own flags afterwards, so nothing is lost. */
PCONN_HIDDEN int pconn__cancel_fd(void);
PCONN_HIDDEN bool pconn__cancelled(void);
/* Polls fd for events until deadline_ns (INT64_MAX: none) and, on a pconn's worker,
 * until the pconn is closed (a kick is drained and ignored). PCONN_OK with *revents
 * set, PCONN_ETIMEDOUT, PCONN_ECLOSED, or PCONN_EIO (poll failed, errno kept). */
PCONN_HIDDEN int pconn__wait_cancellable(int fd, short events, int64_t deadline_ns, short *revents);

/* getaddrinfo() bounded by deadline_ns (INT64_MAX: none) and, on a pconn's worker,
 * interrupted by its close: the lookup then runs on a helper thread that is abandoned
 * (it frees its answer when it ends). Elsewhere without a deadline, and when no helper
 * thread can be started, it is a plain getaddrinfo(). PCONN_OK with *out (free with
 * freeaddrinfo()); PCONN_ERESOLVE with *gai and *sys_errno (EAI_SYSTEM); PCONN_ETIMEDOUT;
 * PCONN_ECLOSED. */
struct addrinfo;
PCONN_HIDDEN int pconn__getaddrinfo(const char *host, const char *port, const struct addrinfo *hints,
                                    int64_t deadline_ns, struct addrinfo **out, int *gai,
                                    int *sys_errno);

/* fork(): the generation of the process, which each fork() makes anew in the child.
 * Handles and connections record it when made; one made in another generation is
 * inherited, and its worker, readers and locks' owners do not exist here. The first call
 * registers the pthread_atfork() handler. */
PCONN_HIDDEN unsigned pconn__fork_generation(void);
/* In the child of a fork(): the shared etcd watchers of the parent are forgotten
 * (resolvers/catalog_watch.c). */
PCONN_HIDDEN void pconn__watch_after_fork(void);
PCONN_HIDDEN bool pconn__inherited(unsigned generation);
/* True for a connection made before a fork() that made this process. */
PCONN_HIDDEN bool pconn__conn_inherited(const pconn_conn_t *c);

/* For the built-in connectors: PCONN_EINVAL with err naming the address when r is a
 * static resolver holding an address they cannot parse (it would fail every attempt,
 * forever); PCONN_OK for every other resolver. */
PCONN_HIDDEN int pconn__resolver_check_addresses(const pconn_resolver_t *r, pconn_error_t *err);

/* For the statistics: pc's clock reading, and its RPC counters (NULL: not RPC). */
struct rpc_stats_t;
PCONN_HIDDEN int64_t pconn__stats_clock_now(const pconn_t *pc);
PCONN_HIDDEN struct rpc_stats_t *pconn__stats_rpc(const pconn_t *pc);

/* pconn_create() with a destructor for opts->connect_arg, called when the pconn is
 * freed, or at once when creation fails. For connectors that allocate their options. */
PCONN_HIDDEN int pconn__create(const pconn_options_t *opts, void (*connect_arg_free)(void *),
                               pconn_t **out);

/* Copies src into dst (size bytes) if it fits with its NUL; returns false otherwise. */
PCONN_HIDDEN bool pconn__strcpy(char *dst, size_t size, const char *src);

#endif
