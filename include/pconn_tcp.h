/* pconn_tcp.h - TCP and Unix-domain stream connections for libpconn.
 *
 * Addresses: "host:port" (a name or IPv4 literal; every address the name resolves to is
 * tried in turn), "[v6addr]:port", "unix:/path" (or "unix:@name" for Linux's abstract
 * namespace). Ports are 1-65535.
 *
 * Connections made here: the fd is blocking and close-on-exec; pconn_conn_close() is
 * shutdown(2), so reads and writes of every holder fail at once; the last
 * pconn_conn_unref() is close(2). The worker watches the fd for hang-up only (it never
 * reads), so a peer that closes or resets is noticed at once. A peer that vanishes
 * without a word is noticed by TCP keepalive and TCP_USER_TIMEOUT, both on by default.
 *
 * Write to the fd with send(..., MSG_NOSIGNAL) or pconn_tcp_send_all(): a write to a
 * connection the peer has closed then fails with EPIPE instead of raising SIGPIPE.
 */
#ifndef PCONN_TCP_H
#define PCONN_TCP_H

#include "pconn.h"

#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pconn_tcp_options_t {
    int64_t connect_timeout_ms; /* 0: 10 s; for all the addresses of a name together */
    const char *bind_address;   /* NULL: any local address; else a numeric IP, port 0 */
    bool nodelay;               /* TCP_NODELAY */
    int keepalive_idle_s;       /* 0: 30 s; negative: no keepalive */
    int user_timeout_ms;        /* TCP_USER_TIMEOUT; 0: 30 s; negative: the system's */
    /* Optional: a handshake run on each new connection before it counts as connected:
     * AUTH, SELECT and PING for Redis, a client library's own greeting, or wrapping the
     * fd in that library's context (hiredis: redisConnectFd(fd)). It runs on the thread
     * that connects (a pconn's worker), on the blocking fd, with SO_RCVTIMEO and
     * SO_SNDTIMEO set to what is left of connect_timeout_ms (cleared afterwards unless the
     * hook set values of its own), so a read or write that the peer leaves unanswered
     * fails with EAGAIN. The bound is per system call: a hook that waits several times
     * should stop when its own deadline passes. pconn_close() does not interrupt it; it
     * waits for the hook to return. It may store a session (the other
     * library's context) in *session: pconn_tcp_session() hands it out, and session_free
     * frees it when the connection is destroyed. Returns PCONN_OK, or an error code with
     * err filled (err's message should name what failed: "AUTH: WRONGPASS ..."): the
     * attempt then fails with that code (PCONN_EABORT stops the pconn), the session (if
     * set) is freed and the fd closed. Must not close fd. */
    int (*on_connect)(void *arg, int fd, const char *address, void **session,
                      pconn_error_t *err);
    void *on_connect_arg;       /* passed to on_connect and session_free; not owned */
    /* Optional: frees a session on_connect stored, once, just before the fd is closed
     * (the last pconn_conn_unref()), e.g. with hiredis' redisFreeKeepFd(). It must not
     * close the fd. Not called for a connection inherited across fork() (see pconn.h). */
    void (*session_free)(void *arg, void *session);
} pconn_tcp_options_t;

/* A pconn_connect_fn: connects to address with tcp_options (a pconn_tcp_options_t *, NULL
 * for the defaults). A host name is looked up first (getaddrinfo() on a helper thread),
 * and connect_timeout_ms covers the lookup too. When called by a pconn's worker,
 * pconn_close() interrupts it within milliseconds, lookup included. Returns PCONN_OK with *conn set; PCONN_EINVAL for a malformed address,
 * PCONN_ERESOLVE when the name does not resolve, PCONN_ETIMEDOUT when connect_timeout_ms
 * passes, PCONN_ECONNECT when every address refused, PCONN_ECLOSED when interrupted;
 * err's message names the address and the cause. Any thread. */
int pconn_tcp_connect(void *tcp_options, const char *address, pconn_conn_t **conn,
                      pconn_error_t *err);

/* The socket of a connection made by pconn_tcp_connect(), or -1 for any other
 * connection. Valid while the caller holds a reference; never close it. */
int pconn_tcp_fd(const pconn_conn_t *conn);

/* The session the on_connect hook stored for a connection made by pconn_tcp_connect(),
 * or NULL (none, or not a TCP connection). Owned by the connection: valid while the
 * caller holds a reference. Any thread; using the session is the caller's business
 * (a hiredis context is for one thread at a time, which a pconn_pool_t guarantees). */
void *pconn_tcp_session(const pconn_conn_t *conn);

/* Writes all len bytes to a connection made by pconn_tcp_connect() or
 * pconn_tls_create() (through TLS), never raising SIGPIPE. PCONN_OK, PCONN_EINVAL (not
 * a TCP or TLS connection), PCONN_ECLOSED (closed with pconn_conn_close(), or inherited
 * across fork(), see pconn.h) or PCONN_EIO with err filled (err may be NULL; for TLS it
 * names the reason). Blocks until written; pconn_conn_close() makes it fail at once.
 * Concurrent calls on one connection send their buffers whole, one after the other. */
int pconn_tcp_send_all(const pconn_conn_t *conn, const void *buf, size_t len,
                       pconn_error_t *err);

/* Reads up to len bytes from a connection made by pconn_tcp_connect() or
 * pconn_tls_create() (through TLS), waiting up to timeout_ms (negative: no limit) for
 * the first. Returns the bytes read (> 0); 0 at the end of the stream (the peer closed;
 * for TLS also a close without close_notify); -1 with err (may be NULL) filled:
 * PCONN_ETIMEDOUT, PCONN_ECLOSED (pconn_conn_close() was called, from any thread: it
 * wakes a blocked call at once; or inherited across fork()), PCONN_EINVAL (not a TCP or
 * TLS connection, or len 0) or PCONN_EIO. One thread may read while another writes;
 * concurrent readers take turns. */
ssize_t pconn_tcp_recv(const pconn_conn_t *conn, void *buf, size_t len, int64_t timeout_ms,
                       pconn_error_t *err);

/* The one-call persistent TCP connection: pconn_create() with connect set to
 * pconn_tcp_connect and a copy of *tcp (NULL: defaults) as its argument. opts->connect
 * and opts->connect_arg are ignored. Ownership and results as pconn_create(); also
 * PCONN_EINVAL for a static resolver holding an address that is not "host:port",
 * "[v6]:port" or "unix:PATH" (it would fail forever; pconn_resolver_static_checked()
 * tells which and why). */
int pconn_tcp_create(const pconn_options_t *opts, const pconn_tcp_options_t *tcp,
                     pconn_t **out);

/* Opens a listening socket (close-on-exec, SO_REUSEADDR) on address; port 0 picks a
 * free port. A stale Unix socket file at the path (one that refuses connections) is
 * replaced; a live one is left alone and listen fails with EADDRINUSE. backlog <= 0 means
 * SOMAXCONN. Returns the fd, or -1 with err filled. For servers and tests. */
int pconn_tcp_listen(const char *address, int backlog, pconn_error_t *err);

/* Writes the local address of a socket in the form connect accepts ("127.0.0.1:4242",
 * "[::1]:4242", "unix:/path"). PCONN_OK, or PCONN_EINVAL (too small, not a socket, or
 * an unnamed Unix socket such as one end of a socketpair; buf is then ""). */
int pconn_tcp_local_address(int fd, char *buf, size_t size);

#ifdef __cplusplus
}
#endif
#endif /* PCONN_TCP_H */
