/* rpc.h - what the RPC files (src/rpc/) and the rest of the library share: the wire format (docs/protocol.md), the connection
 * type, the handler pool. Hidden from users. */
#ifndef PCONN_RPC_INTERNAL_H
#define PCONN_RPC_INTERNAL_H

#include "internal.h"

#include <stdatomic.h>
#include "pconn_rpc.h"
#include "pconn_tcp.h"

#define RPC_MAGIC 0x50434E31u /* "PCN1" */
#define RPC_VERSION 1
#define RPC_HELLO_MAX 512
#define RPC_NAME_MAX 255
#define RPC_DEFAULT_MAX ((size_t)100 * 1024 * 1024)
#define RPC_DEFAULT_HANDSHAKE_MS 30000
#define RPC_DEFAULT_HB_TIMEOUT_MS 30000
#define RPC_DEFAULT_HB_EVERY_MS 10000

enum { RPC_HELLO = 1, RPC_HEARTBEAT = 2, RPC_QUERY = 3, RPC_RESPONSE = 4, RPC_CLOSE = 5 };

/* Wire codes of RESPONSE and CLOSE are pconn status codes. */
enum { RPC_CODE_OK = 0 };

/* A decoded payload; pointers point into the payload. */
typedef struct rpc_msg_t {
    uint8_t type;
    uint64_t id;       /* QUERY, RESPONSE */
    uint32_t version;  /* QUERY */
    uint32_t code;     /* RESPONSE, CLOSE */
    uint32_t magic;    /* HELLO */
    uint8_t nversions; /* HELLO */
    uint16_t versions[32];
    const char *name;  /* QUERY */
    size_t name_len;
    const uint8_t *data; /* QUERY, RESPONSE: the data; CLOSE: the message */
    size_t data_len;
} rpc_msg_t;

/* Decodes one frame's payload. PCONN_OK, or PCONN_EPROTO with why filled. */
PCONN_HIDDEN int pconn__rpc_decode(const uint8_t *payload, size_t len, rpc_msg_t *m, char *why,
                                   size_t why_size);
/* The highest version both lists have, or 0. */
PCONN_HIDDEN unsigned pconn__rpc_pick_version(const rpc_msg_t *hello);

PCONN_HIDDEN void pconn__put_u16(uint8_t *p, uint16_t v);
PCONN_HIDDEN void pconn__put_u32(uint8_t *p, uint32_t v);
PCONN_HIDDEN void pconn__put_u64(uint8_t *p, uint64_t v);
PCONN_HIDDEN uint64_t pconn__get_u64(const uint8_t *p);
PCONN_HIDDEN uint32_t pconn__get_u32(const uint8_t *p);

/* ---- implementations and the handler pool ---- */

typedef struct rpc_pool_t rpc_pool_t;
/* A pool that grows to max threads when every one is busy, and keeps them; one
 * reference, its owner's. */
PCONN_HIDDEN rpc_pool_t *pconn__rpc_pool_new(int max);
/* Runs fn(arg) on a pool thread. PCONN_OK; else fn is not run: PCONN_ENOMEM,
 * RPC_POOL_BUSY (no thread runs and none could be started), PCONN_ECLOSED (released). */
enum { RPC_POOL_BUSY = -1 }; /* internal only: never returned to users */
PCONN_HIDDEN int pconn__rpc_pool_submit(rpc_pool_t *p, void (*fn)(void *), void *arg);
/* References for the users of a pool (connections). NULL is ignored. */
PCONN_HIDDEN void pconn__rpc_pool_ref(rpc_pool_t *p);
PCONN_HIDDEN void pconn__rpc_pool_unref(rpc_pool_t *p);
/* The owner's end: no new jobs; waits for the queued and running ones (not when called
 * from one of them), then drops the owner's reference. NULL is ignored. */
PCONN_HIDDEN void pconn__rpc_pool_release(rpc_pool_t *p);
/* Threads running a job now. */
PCONN_HIDDEN int pconn__rpc_pool_busy(rpc_pool_t *p);
/* References to an implementation table (pconn_rpc_impls_free drops the user's). */
PCONN_HIDDEN void pconn__rpc_impls_ref(pconn_rpc_impls_t *impls);

/* The handler of (name, version), or NULL; *blocking: registered as one that waits
 * (pconn_rpc_impls_add_blocking), so never run on a reading thread. */
PCONN_HIDDEN pconn_rpc_handler_fn pconn__rpc_impls_find(const pconn_rpc_impls_t *impls, const char *name,
                                                        size_t name_len, uint32_t version, void **arg,
                                                        bool *blocking);

/* ---- statistics ---- */

/* Counters of an RPC client or server, shared by its connections (which may outlive
 * it, hence the references). Latency bucket k counts answers in [2^(k-1), 2^k) us. */
#define RPC_LAT_BUCKETS 28
typedef struct rpc_stats_t {
    atomic_int refs;
    atomic_ullong calls, answered, in_flight, bytes_out, bytes_in, served;
    atomic_ullong writes; /* system calls that sent frames (several frames share one) */
    atomic_ullong errors[16];
    atomic_ullong latency[RPC_LAT_BUCKETS];
} rpc_stats_t;
PCONN_HIDDEN rpc_stats_t *pconn__rpc_stats_new(void);
PCONN_HIDDEN void pconn__rpc_stats_ref(rpc_stats_t *s);
PCONN_HIDDEN void pconn__rpc_stats_unref(rpc_stats_t *s);
/* Adds "rpc": {...} with the counters to obj (a jansson object). */
struct json_t;
PCONN_HIDDEN int pconn__rpc_stats_json(const rpc_stats_t *s, struct json_t *obj);
/* The counters of an RPC pconn's client, or NULL for any other pconn. */
PCONN_HIDDEN rpc_stats_t *pconn__rpc_client_stats(void *connect_arg, pconn_connect_fn connect);

/* ---- connections ---- */

/* A server's watch over the handlers its connections run on their reading threads (see
 * serve.c): busy counts those running that still hold their connection's reading
 * (the ones the watchdog may have to hand off); running, all handlers running outside
 * the pool (for the stats). The watchdog (the server's accepting thread) sleeps without
 * a timeout only while busy is 0, and a reader that starts one while it sleeps wakes it
 * through wake_fd. */
typedef struct rpc_watch_t {
    atomic_int busy;
    atomic_int running;
    atomic_bool sleeping;
    int wake_fd;
} rpc_watch_t;

/* A handler still running on its reading thread after this long hands the reading role
 * to a new thread, so that the connection's other queries and heartbeats go on. */
#define RPC_INLINE_SLOW_MS 10

typedef struct rpc_config_t {
    pconn_rpc_impls_t *impls; /* may be NULL */
    rpc_pool_t *pool;         /* needed when impls is set */
    size_t max;
    int64_t hb_timeout_ms, hb_every_ms;
    const pconn_transport_t *transport; /* NULL: plain */
    bool server;                        /* the accepting side */
    int (*authorize)(const pconn_rpc_peer_t *, void *, pconn_error_t *); /* server: or NULL */
    void *authorize_arg;
    rpc_stats_t *stats;                 /* may be NULL; a reference per connection */
    void (*on_log)(int level, const char *message, void *arg); /* server: or NULL */
    void *on_log_arg;
    rpc_watch_t *watch;                 /* server: handlers run on the reading thread */
    /* Server, called with the exit_arg: +1, a new reading thread is about to start
     * (false: don't); -1, it could not start after all. */
    bool (*reader_count)(void *arg, int delta);
    /* Server: a reading thread that has read nothing for RPC_PARK_MS gives its
     * connection, with the reading role and its reference, to park(exit_arg, conn) and
     * ends; no thread serves the connection until bytes other than heartbeats come
     * (see pconn__rpc_conn_parked()). */
    void (*park)(void *arg, pconn_conn_t *conn);
    /* Server: a thread for conn's reading role (it calls pconn__rpc_conn_read(conn));
     * 0, or -1 when none could be had. */
    int (*start_reader)(void *arg, pconn_conn_t *conn);
} rpc_config_t;

#define RPC_PARK_MS 250

/* Calls cfg->on_log, if set, with a formatted line. */
PCONN_HIDDEN void pconn__rpc_log(const rpc_config_t *cfg, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Fills defaults into a configuration from user options (zeros mean defaults). */
PCONN_HIDDEN void pconn__rpc_config(rpc_config_t *cfg, pconn_rpc_impls_t *impls, size_t max,
                                    const pconn_heartbeat_t *hb, const pconn_transport_t *transport);

/* Client: makes an RPC connection of a connected fd (taken over: closed on failure
 * too): the transport session, the handshake before deadline_ns, then its watcher
 * thread. The handshake also gives up (PCONN_ECLOSED) when cancel_fd (-1: none) turns
 * readable and cancelled() (NULL: always) says so. PCONN_OK with *out, or an error with
 * err. */
PCONN_HIDDEN int pconn__rpc_conn_open(int fd, const char *address, const rpc_config_t *cfg,
                                      int64_t deadline_ns, int cancel_fd, bool (*cancelled)(void),
                                      pconn_conn_t **out, pconn_error_t *err);

/* Server: one thread drives the handshakes of all accepted connections, none of which
 * blocks it. pconn__rpc_conn_accept() makes the connection of an accepted fd (taken
 * over) with its transport session, no I/O yet; pconn__rpc_conn_step() takes its
 * handshake as far as it goes now: PCONN_OK when done, RPC_HS_AGAIN with *events (what
 * to poll() its fd for before the next step), or an error with err (then close and
 * unref it). cfg->authorize runs in a step. pconn__rpc_conn_expired() says, to the peer
 * if its socket takes it now and in err, that the deadline passed. When the handshake
 * is done, pconn__rpc_conn_serve() starts the connection's reading thread, which calls
 * on_reader_exit(exit_arg) as its last act; PCONN_ENOMEM when it cannot. */
enum { RPC_HS_AGAIN = 1 };
PCONN_HIDDEN int pconn__rpc_conn_accept(int fd, const char *address, const rpc_config_t *cfg,
                                        pconn_conn_t **out, pconn_error_t *err);
PCONN_HIDDEN int pconn__rpc_conn_step(pconn_conn_t *conn, short *events, pconn_error_t *err);
PCONN_HIDDEN int pconn__rpc_conn_expired(pconn_conn_t *conn, pconn_error_t *err);
PCONN_HIDDEN int pconn__rpc_conn_serve(pconn_conn_t *conn, void (*on_reader_exit)(void *), void *exit_arg,
                                       pconn_error_t *err);
/* Server, on the thread cfg.start_reader gave: holds conn's reading role until it ends
 * or moves on (to another thread, or parked). */
PCONN_HIDDEN void pconn__rpc_conn_read(pconn_conn_t *conn);
/* Server, for a parked connection (the caller holds its reading role): reads what has
 * come, without waiting (readable: its fd polled readable), answers to nothing but
 * heartbeats, and keeps the heartbeats (sends ours when due, ends it when the peer's
 * are overdue). RPC_PARKED: stay parked, until *next_ns at the latest; RPC_UNPARK: a
 * frame to serve is in, pconn__rpc_conn_unpark() it; RPC_ENDED: the connection failed
 * or was closed, and its reading role has ended (on_reader_exit was called). */
enum { RPC_PARKED, RPC_UNPARK, RPC_ENDED };
PCONN_HIDDEN int pconn__rpc_conn_parked(pconn_conn_t *conn, bool readable, int64_t *next_ns);
/* Server: a parked connection's reading role goes to a new thread; if none can be
 * started, the connection fails and its role ends. */
PCONN_HIDDEN void pconn__rpc_conn_unpark(pconn_conn_t *conn);
/* Server: a parked connection is closed and its reading role ends (the server stops). */
PCONN_HIDDEN void pconn__rpc_conn_parked_end(pconn_conn_t *conn);
/* Server: when the handler running on conn's reading thread is still the one that
 * started at since_ns, hands the reading role to a new thread (the old one answers its
 * query and ends). true if it did; false also when conn is closed. */
PCONN_HIDDEN bool pconn__rpc_conn_handoff(pconn_conn_t *conn, int64_t since_ns);
/* Server: since when the handler running on conn's reading thread runs, or 0. */
PCONN_HIDDEN int64_t pconn__rpc_conn_inline_since(pconn_conn_t *conn);
/* True once the connection's reader has returned. */
PCONN_HIDDEN bool pconn__rpc_conn_done(pconn_conn_t *conn);
/* For an RPC connection: its transport and that transport's session (set before the
 * connection is handed out, freed with it); false for any other connection. */
PCONN_HIDDEN bool pconn__rpc_conn_transport(const pconn_conn_t *conn, const pconn_transport_t **t,
                                            void **session);

/* ---- tcp, for rpc ---- */
/* Connects as pconn_tcp_connect() does; the raw blocking fd, or -1 with err. */
PCONN_HIDDEN int pconn__tcp_connect_fd(const pconn_tcp_options_t *o, const char *address, pconn_error_t *err);

#endif
