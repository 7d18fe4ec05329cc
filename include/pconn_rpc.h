/* pconn_rpc.h - RPC connections over one TCP (or Unix) connection, the persistent
 * connection of them, and the server side.
 *
 * The wire format is docs/protocol.md: length-prefixed frames, a handshake with a magic
 * number and a version list, heartbeats, queries, responses. Calls are blocking,
 * multiplexed by id over the one connection, safe from many threads at once, each with
 * its own timeout. Either side may serve calls: a client given `implementations` answers
 * the server's calls over the same connection.
 *
 * Errors of a call: PCONN_ETIMEDOUT (its timeout passed; a late answer is dropped),
 * PCONN_EUNIMPLEMENTED (no such name and version over there), PCONN_EREMOTE (the
 * handler failed; err carries its message), PCONN_ETOOBIG (a message over the limit),
 * PCONN_ECLOSED (the connection was closed here) or PCONN_EIO (it broke: the peer went
 * away, stopped answering heartbeats, or broke the protocol). A call in flight when its
 * connection dies returns at once; none is ever dropped silently.
 */
#ifndef PCONN_RPC_H
#define PCONN_RPC_H

#include "pconn.h"

#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A growable byte buffer filled by the library (responses) or by a handler. */
typedef struct pconn_buf_t {
    void *data;
    size_t len;
    size_t cap;
} pconn_buf_t;

/* Frees data and zeroes the buffer. NULL is ignored. */
void pconn_buf_free(pconn_buf_t *buf);

/* Appends len bytes (growing as needed). PCONN_OK or PCONN_ENOMEM. For handlers. */
int pconn_buf_append(pconn_buf_t *buf, const void *data, size_t len);

/* ---- Implementations -------------------------------------------------------------- */

typedef struct pconn_rpc_impls_t pconn_rpc_impls_t;

/* Fill *resp (it starts empty; use pconn_buf_append or set data/len/cap to a malloc'd
 * block the library then frees) and return PCONN_OK, or return an error code with err
 * set: the caller then gets PCONN_EREMOTE and err's message. req is valid until it
 * returns.
 *
 * Where it runs. On a server, on the thread that reads the connection, and the answers
 * of the queries read together go out in one write: no hand-over per call. Queries of a
 * batch still waiting 10 ms after it was read go to the server's handler pool instead;
 * a handler still running after 10 ms on the reading thread, or one that calls its peer
 * back with pconn_rpc_call(), hands the reading to another thread (one left waiting by
 * an earlier connection, or a new one; at most 256 beyond one per connection; past
 * that the connection waits for its handler). So a slow handler holds up no other
 * query and no heartbeat for much longer than 10 ms. A handler that calls its peer back
 * when no thread can be had gets PCONN_ENOMEM at once ("no thread to read the
 * answer"). The reading threads are shared: one reads, and runs the handlers of,
 * several connections in turn, so per-thread state a handler sets carries over. A
 * handler that waits as a rule (on a disk, on another service) is better registered
 * with pconn_rpc_impls_add_blocking(): it then runs on the server's handler pool at
 * once. On the client side (a pconn's
 * `implementations`) every handler runs on the pconn's handler pool.
 *
 * A handler may call anything, pconn_free() of its own pconn included (its pool then
 * finishes the queued handlers after it, without waiting for it), except
 * pconn_rpc_server_stop() of its own server; when no pool thread can be started the
 * caller gets PCONN_EREMOTE "no thread to run the handler" at once. Handlers of a pconn
 * still running when pconn_free() returns from another thread: none (it waits for
 * them), except after pconn_free() from a handler; of a server, none once
 * pconn_rpc_server_stop() returns. */
typedef int (*pconn_rpc_handler_fn)(void *arg, const void *req, size_t req_len,
                                    pconn_buf_t *resp, pconn_error_t *err);

/* An empty set of implementations. NULL with errno ENOMEM. */
pconn_rpc_impls_t *pconn_rpc_impls_new(void);

/* Adds the handler for (name, version). name is copied, 1-255 bytes. PCONN_OK, or
 * PCONN_EINVAL (bad name, NULL fn, the pair already there) or PCONN_ENOMEM. Add every
 * implementation before handing the set to a server or pconn: it is read, unlocked, by
 * their threads afterwards. */
int pconn_rpc_impls_add(pconn_rpc_impls_t *impls, const char *name, int version,
                        pconn_rpc_handler_fn fn, void *arg);

/* As pconn_rpc_impls_add(), for a handler that waits as a rule: a server runs it on its
 * handler pool (up to 256 threads), never on a connection's reading thread. Same
 * results. */
int pconn_rpc_impls_add_blocking(pconn_rpc_impls_t *impls, const char *name, int version,
                                 pconn_rpc_handler_fn fn, void *arg);

/* Drops the caller's reference to the set. Every server, pconn and connection using it
 * holds a reference of its own, so this may be called as soon as they were created; the
 * set goes with the last user. NULL is ignored. */
void pconn_rpc_impls_free(pconn_rpc_impls_t *impls);

/* Inside a handler: the connection the query came over (borrowed for the handler's
 * duration; take a reference to keep it), so the handler may call the peer back with
 * pconn_rpc_call(). NULL outside handlers. */
pconn_conn_t *pconn_rpc_handler_conn(void);

/* ---- Transport and peers --------------------------------------------------------- */

/* A peer as the RPC server (or a handler) sees it. The strings are the library's, valid
 * for the connection's life. */
typedef struct pconn_rpc_peer_t {
    const char *address;      /* "host:port", "[v6]:port" or "a unix peer" */
    const char *subject;      /* the verified certificate's subject (one line, RFC 2253)
                                 with a transport that verifies one (TLS); else NULL */
    const char *const *sans;  /* its subjectAltNames as "DNS:name", "IP:addr", "URI:...",
                                 "email:...", NULL-terminated; NULL without */
} pconn_rpc_peer_t;

/* What carries the frames over a connected socket, which the library makes
 * non-blocking: plain TCP by default, or e.g. TLS. The library calls read from one
 * thread at a time and write from one thread at a time, possibly both at once; a
 * session that cannot allow that (an OpenSSL SSL *) serializes inside, with a lock it
 * never holds while waiting (the calls never wait). Every wait is the library's: a
 * poll() with its own deadline and cancel descriptor, so close interrupts it. */
typedef struct pconn_transport_t {
    /* Makes a session on the connected fd; no I/O yet. server is 1 on the accepting
     * side. Must not close fd. The session, or NULL with err set. */
    void *(*open)(void *arg, int fd, const char *address, int server, pconn_error_t *err);
    /* Optional (NULL: none): one step of the session's own handshake. 0 when done; -1
     * with errno EAGAIN: call again when the fd is ready for wants(session, 0); -1 with
     * errno set otherwise and err filled: it failed. */
    int (*handshake)(void *session, pconn_error_t *err);
    /* As recv(2)/send(2) on a non-blocking fd: bytes moved, 0 at the end of the stream
     * (read), -1 with errno (EAGAIN: not now). Never raise SIGPIPE. */
    ssize_t (*read)(void *session, void *buf, size_t len);
    ssize_t (*write)(void *session, const void *buf, size_t len);
    /* Optional: bytes already decoded and buffered inside the session (poll() would not
     * show them). */
    size_t (*pending)(void *session);
    /* Optional: after -1/EAGAIN, the poll() events (POLLIN and/or POLLOUT) the last call
     * of that direction waits for (writing 0: read and handshake; 1: write). NULL:
     * POLLIN for reading and handshaking, POLLOUT for writing. */
    short (*wants)(void *session, int writing);
    /* Optional: fills subject and sans of *peer from the verified peer certificate
     * (strings the session's, valid until close). */
    void (*identity)(void *session, pconn_rpc_peer_t *peer);
    /* Frees the session (not the fd). */
    void (*close)(void *session);
    void *arg;
} pconn_transport_t;

/* Inside a handler: who sent the query (address; and with a verifying transport, the
 * certificate's subject and names). NULL outside handlers. */
const pconn_rpc_peer_t *pconn_rpc_handler_peer(void);

/* ---- Client ----------------------------------------------------------------------- */

typedef struct pconn_heartbeat_t {
    int64_t timeout_ms;    /* close when nothing arrived for this long; 0: 30 s;
                              PCONN_FOREVER (or any value past INT64_MAX ns): never */
    int64_t send_every_ms; /* 0: 10 s */
} pconn_heartbeat_t;

typedef struct pconn_rpc_options_t {
    pconn_options_t base;                 /* all but connect/connect_arg, which rpc sets */
    const char *bind_address;             /* NULL: any; else a local IP, port 0 */
    pconn_rpc_impls_t *implementations;   /* NULL: none; the pconn keeps a reference */
    size_t max_message_size;              /* 0: 100 MiB; at least 512 */
    int64_t handshake_timeout_ms;         /* TCP connect and handshake together; 0: 30 s */
    pconn_heartbeat_t heartbeat;          /* zeros: 30 s timeout, sent every 10 s */
    const struct pconn_transport_t *transport; /* NULL: plain TCP; must outlive the pconn */
    /* TLS (pconn_tls.h): a client configuration; NULL: none. The pconn takes its own
     * reference. Not together with transport. Reconnects to the same host resume the last session. */
    struct pconn_tls_config_t *tls;
} pconn_rpc_options_t;

/* The persistent connection of RPC connections: pconn_create() whose connect makes an
 * RPC connection (TCP connect, transport, handshake) to the resolver's address. Results
 * and ownership as pconn_create(); also PCONN_EINVAL for a static resolver holding an
 * address that is not "host:port", "[v6]:port" or "unix:PATH" (it would fail forever;
 * pconn_resolver_static_checked() tells which and why). */
int pconn_rpc_create(const pconn_rpc_options_t *opts, pconn_t **out);

/* Calls (name, version) with req on conn, an RPC connection (from pconn_connected() of
 * an RPC pconn, or pconn_rpc_handler_conn()), and waits up to timeout_ms for the answer.
 * timeout_ms covers everything: waiting for the right to write, sending (a peer that
 * does not read makes it PCONN_ETIMEDOUT "could not send within N ms"; when part of
 * the request had gone out, or with a transport such as TLS any of it had been handed
 * over, the connection is closed too, as its stream is broken),
 * and the answer. On
 * PCONN_OK *resp holds the answer (free it with pconn_buf_free()); otherwise err (may
 * be NULL) says why. Any thread, any number at once. Blocks up to timeout_ms
 * (PCONN_FOREVER: until the answer or the connection's end); while it waits the calling
 * thread may read the connection for the other callers too (leader/follower), never
 * past its own timeout. */
int pconn_rpc_call(pconn_conn_t *conn, const char *name, int version, const void *req,
                   size_t req_len, pconn_buf_t *resp, int64_t timeout_ms, pconn_error_t *err);

/* One call of a batch for pconn_rpc_call_many(). */
typedef struct pconn_rpc_call_t {
    const char *name; int version; const void *req; size_t req_len;  /* in */
    pconn_buf_t resp; int status; pconn_error_t err;                 /* out, per call */
} pconn_rpc_call_t;

/* Pipelining for one thread: sends all n calls on conn at once (one write where they
 * fit), waits until every one has its answer or the shared deadline passes; returns
 * PCONN_OK when all succeeded, else the first failing status (in the order of calls).
 * Each call's own status, err and resp (free with pconn_buf_free(); empty unless its
 * status is PCONN_OK) say what happened to it, as pconn_rpc_call() would. A call that
 * fails its checks (bad name, too big) is not sent; the others are. timeout_ms covers
 * sending and answers, as for pconn_rpc_call(). Any thread; n may be 0. */
int pconn_rpc_call_many(pconn_conn_t *conn, pconn_rpc_call_t *calls, size_t n,
                        int64_t timeout_ms);

/* Waits (within timeout_ms) for a connection of pc, then calls on it within what is left
 * of timeout_ms: the one line a legacy program needs. PCONN_ETIMEDOUT when no connection
 * came in time, PCONN_ECLOSED when pc is closed; otherwise as pconn_rpc_call(). */
int pconn_rpc_dispatch(pconn_t *pc, const char *name, int version, const void *req,
                       size_t req_len, pconn_buf_t *resp, int64_t timeout_ms,
                       pconn_error_t *err);

/* ---- Server ----------------------------------------------------------------------- */

typedef struct pconn_rpc_server_t pconn_rpc_server_t;

typedef struct pconn_rpc_server_options_t {
    const char *listen_address;          /* "127.0.0.1:0" picks a free port; "unix:/p" */
    pconn_rpc_impls_t *implementations;  /* the server keeps a reference */
    size_t max_message_size;             /* 0: 100 MiB; at least 512 */
    int64_t handshake_timeout_ms;        /* a peer silent this long is dropped; 0: 30 s */
    pconn_heartbeat_t heartbeat;         /* zeros: 30 s timeout, sent every 10 s */
    int max_connections;                 /* 0 (or less): no limit; over it a new peer is
                                            told "too many connections (limit N)" in a
                                            CLOSE frame, which its handshake reports */
    const pconn_transport_t *transport;  /* NULL: plain TCP; must outlive the server */
    /* TLS (pconn_tls.h): a server configuration; NULL: none. The server takes its own
     * reference. With ca_file/ca_path in it, only clients whose certificate chains to
     * them get in, and a handler sees their subject and names. Not with transport. */
    struct pconn_tls_config_t *tls;
    /* Optional: called once the peer is known (its address, and its identity from the
     * transport), before the server's HELLO, on the server's accepting thread, which
     * drives every handshake: it holds up the other handshakes while it runs, so it
     * must not wait (and must not stop the server).
     * Return PCONN_OK to let it in; any other code refuses it: the peer's handshake
     * fails with "refused by the peer: not authorized: " and why->message. */
    int (*authorize)(const pconn_rpc_peer_t *peer, void *arg, pconn_error_t *why);
    void *authorize_arg;
    /* Optional: what the server would otherwise keep to itself — a peer whose
     * handshake failed or that was refused (WARNING), a connection closed for breaking
     * the protocol or going silent (WARNING), out of descriptors (ERROR). */
    pconn_log_fn on_log;
    void *on_log_arg;
} pconn_rpc_server_options_t;

/* Listens and serves: each connection is handshaken, kept alive by heartbeats, and its
 * queries served (pconn_rpc_handler_fn says on which threads). Does not block: it binds
 * and starts the accepting thread. PCONN_OK with *out set, or an error with err (may be
 * NULL) filled: PCONN_EINVAL (bad options), PCONN_EIO (cannot listen) or PCONN_ENOMEM
 * (no thread could be started). */
int pconn_rpc_server_start(const pconn_rpc_server_options_t *opts, pconn_rpc_server_t **out,
                           pconn_error_t *err);

/* The server's counters as one JSON object (see pconn_stats_json() for "rpc"):
 * {"address", "connections", "handshakes" (under way), "parked" (connections idle,
 * which no thread reads), "reading_threads" (the server's reading threads: reading a
 * connection, finishing a handler they began while reading, or waiting up to 2 s for
 * the next connection to read), "handlers_busy", "rpc": {...}}. malloc'd,
 * free() it; NULL for NULL or out of memory. Any thread. */
char *pconn_rpc_server_stats_json(pconn_rpc_server_t *srv);

/* The bound address, e.g. "127.0.0.1:40123"; lives as long as srv. */
const char *pconn_rpc_server_address(const pconn_rpc_server_t *srv);

/* Stops listening, ends every handshake under way at once, closes every connection
 * (calls in flight on them fail at the callers), waits for running handlers to return,
 * and frees srv. Bounded by the handlers: a silent peer does not make it wait out the
 * handshake timeout. NULL is ignored. Not from inside one of its own handlers.
 *
 * Out of descriptors (EMFILE), the server stops accepting for 100 ms at a time (or until
 * a connection ends) instead of spinning; the peers wait in the listen backlog.
 * Handshakes take no thread: the accepting thread drives all of them, each with its
 * handshake_timeout_ms; a connection gets its reading thread once its handshake is
 * done, and gives it up after 250 ms without a frame (the accepting thread keeps its
 * heartbeats; its next query starts a reading thread again). */
void pconn_rpc_server_stop(pconn_rpc_server_t *srv);

#ifdef __cplusplus
}
#endif
#endif /* PCONN_RPC_H */
