/* rpc_server.c - the server side: an accepting thread that is also the watchdog of the
 * handlers running on reading threads; per connection a greeter for the handshake, then
 * a reading thread that runs the handlers (rpc_conn.c); blocking handlers run on a
 * shared pool. */
#include "rpc.h"
#include "tls.h"

#include <errno.h>
#include <jansson.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define SERVER_POOL_MAX 256
/* Handshakes under way at once; more peers wait in the listen backlog. Each has a thread
 * until its handshake ends (a single poller for all of them is the design of issue 9,
 * not built yet); the cap bounds them. */
#define MAX_GREETERS 64
#define EMFILE_BACKOFF_MS 100

typedef struct entry_t {
    pconn_conn_t *conn; /* one reference, the server's */
    struct entry_t *next;
} entry_t;

/* A connection still in its handshake, served by its own thread. */
typedef struct greeter_t {
    pconn_rpc_server_t *srv;
    int fd;
    char address[PCONN_ADDRESS_MAX];
} greeter_t;

struct pconn_rpc_server_t {
    int lfd;
    int wake_fd;
    int stop_fd;          /* written once at stop, never drained: ends every handshake */
    int max_connections;  /* 0: no limit */
    int nconns;           /* in conns; guarded by mutex */
    pthread_t acceptor;
    rpc_config_t cfg;
    int64_t handshake_ms;
    pconn__tls_endpoint_t *tls; /* or NULL */
    char address[PCONN_ADDRESS_MAX];
    pthread_mutex_t mutex;
    pthread_cond_t cond;  /* greeters or readers finished */
    entry_t *conns;
    int greeters;         /* handshakes under way */
    int readers;          /* connection readers still running: they call back into us */
    bool stopping;
    rpc_watch_t watch;
};

/* Drops the connections whose reader has ended. */
static void reap_locked(pconn_rpc_server_t *srv, entry_t **dead)
{
    for (entry_t **pp = &srv->conns; *pp != NULL;) {
        entry_t *e = *pp;
        if (pconn__rpc_conn_done(e->conn)) {
            srv->nconns--;
            *pp = e->next;
            e->next = *dead;
            *dead = e;
        } else {
            pp = &e->next;
        }
    }
}

static void free_entries(entry_t *e)
{
    while (e != NULL) {
        entry_t *next = e->next;
        pconn__conn_release(e->conn); /* closes it, waits for its reader */
        free(e);
        e = next;
    }
}

/* A connection's reader, as its last act. After the unlock it touches srv no more. */
static void reader_exited(void *arg)
{
    pconn_rpc_server_t *srv = arg;
    pconn__mutex_lock(&srv->mutex);
    srv->readers--;
    pthread_cond_broadcast(&srv->cond);
    pconn__wake(srv->wake_fd); /* the acceptor reaps it */
    pconn__mutex_unlock(&srv->mutex);
}

/* A connection's reading role goes to a new thread (+1), which will call
 * reader_exited; or that thread could not be started (-1). */
static bool reader_count(void *arg, int delta)
{
    pconn_rpc_server_t *srv = arg;
    pconn__mutex_lock(&srv->mutex);
    /* Beyond one reader per connection, at most SERVER_POOL_MAX threads running slow
     * handlers: past that, a slow handler keeps its connection's reading (back-pressure
     * on that peer) instead of costing a thread per query. */
    bool ok = delta < 0 ||
              (!srv->stopping && srv->readers < srv->nconns + srv->greeters + SERVER_POOL_MAX);
    if (ok)
        srv->readers += delta;
    if (srv->readers == 0)
        pthread_cond_broadcast(&srv->cond);
    pconn__mutex_unlock(&srv->mutex);
    return ok;
}

/* The watchdog: a handler that has run on its reading thread for RPC_INLINE_SLOW_MS
 * hands the reading role on (a few connections per tick). */
static void hand_off_slow(pconn_rpc_server_t *srv)
{
    typedef struct slow_t {
        pconn_conn_t *conn;
        int64_t since;
    } slow_t;
    int64_t now = pconn__mono_ns();
    pconn__mutex_lock(&srv->mutex);
    /* Every one, as a refused hand-over leaves a connection slow tick after tick. */
    slow_t *slow = malloc((size_t)(srv->nconns > 0 ? srv->nconns : 1) * sizeof *slow);
    int n = 0;
    for (entry_t *e = srv->conns; e != NULL && slow != NULL && n < srv->nconns; e = e->next) {
        int64_t t = pconn__rpc_conn_inline_since(e->conn);
        if (t != 0 && now - t >= (int64_t)RPC_INLINE_SLOW_MS * 1000000 && !pconn_conn_is_closed(e->conn)) {
            pconn_conn_ref(e->conn);
            slow[n++] = (slow_t){e->conn, t};
        }
    }
    pconn__mutex_unlock(&srv->mutex);
    for (int i = 0; i < n; i++) {
        pconn__rpc_conn_handoff(slow[i].conn, slow[i].since);
        pconn_conn_unref(slow[i].conn);
    }
    free(slow);
}

/* A handshake ended: stop may go on, the acceptor may take the next peer. */
static void greeter_done_locked(pconn_rpc_server_t *srv)
{
    srv->greeters--;
    pthread_cond_broadcast(&srv->cond);
    pconn__wake(srv->wake_fd);
}

/* Handshakes one accepted connection, keeps it, then goes on as its reader. */
static void *greet_main(void *arg)
{
    greeter_t *g = arg;
    pconn_rpc_server_t *srv = g->srv;
    pconn_conn_t *conn = NULL;
    pconn_error_t err;
    int64_t deadline = pconn__deadline_ns(srv->handshake_ms);
    /* Counted before its reader can start, so that stop waits for it. */
    pconn__mutex_lock(&srv->mutex);
    srv->readers++;
    pconn__mutex_unlock(&srv->mutex);
    int rc = pconn__rpc_conn_open(g->fd, g->address, &srv->cfg, deadline, srv->stop_fd, NULL,
                                  reader_exited, srv, &conn, &err);
    if (rc != PCONN_OK && rc != PCONN_ECLOSED)
        pconn__rpc_log(&srv->cfg, PCONN_LOG_WARNING, "peer %s rejected: %s", g->address, err.message);
    entry_t *e = rc == PCONN_OK ? malloc(sizeof *e) : NULL;
    bool kept = false;
    pconn__mutex_lock(&srv->mutex);
    if (rc != PCONN_OK)
        srv->readers--; /* no reader was started */
    if (e != NULL && !srv->stopping) {
        e->conn = conn;
        e->next = srv->conns;
        srv->conns = e;
        srv->nconns++;
        e = NULL;
        kept = true;
        greeter_done_locked(srv);
    }
    pconn__mutex_unlock(&srv->mutex);
    free(e);
    free(g);
    if (kept) {
        pconn__rpc_conn_read(conn); /* until the connection ends; then conn may be gone */
        return NULL;
    }
    if (rc == PCONN_OK) {
        /* Stopping, or no memory: the connection goes before this greeter stops counting,
         * so that stop does not return while it (and the user's transport) still live. */
        pconn_conn_close(conn);
        pconn__rpc_conn_read(conn); /* ends at once: its reference, reader_exited */
        pconn__conn_release(conn);
    }
    pconn__mutex_lock(&srv->mutex);
    greeter_done_locked(srv);
    pconn__mutex_unlock(&srv->mutex);
    return NULL;
}

/* Over max_connections: a CLOSE frame that says so (the client reports it as the reason
 * its handshake failed), then the connection goes. */
static void refuse(int fd, int limit)
{
    char msg[64];
    int mlen = snprintf(msg, sizeof msg, "too many connections (limit %d)", limit);
    uint8_t frame[13 + sizeof msg];
    pconn__put_u64(frame, (uint64_t)(1 + 4 + mlen));
    frame[8] = RPC_CLOSE;
    pconn__put_u32(frame + 9, PCONN_EHANDSHAKE);
    memcpy(frame + 13, msg, (size_t)mlen);
    (void)!send(fd, frame, 13 + (size_t)mlen, MSG_NOSIGNAL | MSG_DONTWAIT);
    shutdown(fd, SHUT_WR);
    char sink[64]; /* the peer's HELLO, if here: closing over unread bytes would reset */
    (void)!recv(fd, sink, sizeof sink, MSG_DONTWAIT);
    close(fd);
}

static void *accept_main(void *arg)
{
    pconn_rpc_server_t *srv = arg;
    int64_t backoff_until = 0;
    for (;;) {
        pconn__mutex_lock(&srv->mutex);
        bool room = srv->greeters < MAX_GREETERS;
        pconn__mutex_unlock(&srv->mutex);
        /* Out of descriptors (EMFILE): the listener stays readable, so it is left out of
         * the poll for a while instead of spinning (issue 9, defect 6); a closing
         * connection wakes us earlier. */
        int64_t now = pconn__mono_ns();
        bool backoff = now < backoff_until;
        int timeout = backoff ? pconn__poll_timeout_ms(backoff_until) : -1;
        /* While a handler runs on a reading thread, tick to see whether it is slow. */
        atomic_store(&srv->watch.sleeping, true);
        if (atomic_load(&srv->watch.busy) > 0) {
            atomic_store(&srv->watch.sleeping, false);
            if (timeout < 0 || timeout > RPC_INLINE_SLOW_MS / 2)
                timeout = RPC_INLINE_SLOW_MS / 2;
        }
        short lev = backoff || !room ? 0 : POLLIN;
        struct pollfd pfd[2] = {{.fd = srv->wake_fd, .events = POLLIN}, {.fd = srv->lfd, .events = lev}};
        int prc = poll(pfd, 2, timeout);
        atomic_store(&srv->watch.sleeping, false);
        if (prc < 0 && errno != EINTR)
            break;
        if (atomic_load(&srv->watch.busy) > 0)
            hand_off_slow(srv);
        entry_t *dead = NULL;
        pconn__mutex_lock(&srv->mutex);
        bool stopping = srv->stopping;
        if (pfd[0].revents)
            pconn__wake_drain(srv->wake_fd);
        reap_locked(srv, &dead);
        pconn__mutex_unlock(&srv->mutex);
        if (dead != NULL)
            backoff_until = 0; /* descriptors came free */
        free_entries(dead);
        if (stopping)
            break;
        if (!(pfd[1].revents & POLLIN))
            continue;
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = accept4(srv->lfd, (struct sockaddr *)&ss, &len, SOCK_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            bool out_of = e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM;
            if (out_of) {
                backoff_until = pconn__mono_ns() + (int64_t)EMFILE_BACKOFF_MS * 1000000;
                pconn__rpc_log(&srv->cfg, PCONN_LOG_ERROR, "accept on %s: %s; not accepting for %d ms",
                               srv->address, strerror(e), EMFILE_BACKOFF_MS);
            }
            continue;
        }
        pconn__mutex_lock(&srv->mutex);
        bool full = srv->max_connections > 0 && srv->nconns + srv->greeters >= srv->max_connections;
        pconn__mutex_unlock(&srv->mutex);
        if (full) {
            refuse(fd, srv->max_connections);
            pconn__rpc_log(&srv->cfg, PCONN_LOG_WARNING, "a peer refused: too many connections (limit %d)",
                           srv->max_connections);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        greeter_t *g = malloc(sizeof *g);
        if (g == NULL) {
            close(fd);
            continue;
        }
        g->srv = srv;
        g->fd = fd;
        /* Messages about the connection name its peer. */
        char host[64], port[16];
        if ((ss.ss_family == AF_INET || ss.ss_family == AF_INET6) &&
            getnameinfo((struct sockaddr *)&ss, len, host, sizeof host, port, sizeof port,
                        NI_NUMERICHOST | NI_NUMERICSERV) == 0)
            snprintf(g->address, sizeof g->address, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
        else
            snprintf(g->address, sizeof g->address, "a unix peer");
        pthread_t t;
        pconn__mutex_lock(&srv->mutex);
        srv->greeters++;
        pconn__mutex_unlock(&srv->mutex);
        /* The default stack: handlers run on it once the handshake is done. */
        if (pconn__thread_start(&t, greet_main, g, 0, true) != 0) {
            pconn__mutex_lock(&srv->mutex);
            srv->greeters--;
            pconn__mutex_unlock(&srv->mutex);
            close(fd);
            free(g);
        }
    }
    return NULL;
}

int pconn_rpc_server_start(const pconn_rpc_server_options_t *opts, pconn_rpc_server_t **out,
                           pconn_error_t *err)
{
    if (out != NULL)
        *out = NULL;
    if (opts == NULL || out == NULL || opts->listen_address == NULL) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_rpc_server_start: bad options");
        return PCONN_EINVAL;
    }
    pconn_error_t local;
    if (err == NULL)
        err = &local;
    if (opts->tls != NULL && opts->transport != NULL) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_rpc_server_start: tls and transport both set");
        return PCONN_EINVAL;
    }
    pconn_rpc_server_t *srv = calloc(1, sizeof *srv);
    if (srv == NULL) {
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "pconn_rpc_server_start");
        return PCONN_ENOMEM;
    }
    if (opts->tls != NULL && (srv->tls = pconn__tls_endpoint_new(opts->tls, true, err)) == NULL) {
        free(srv);
        return err->code;
    }
    srv->lfd = pconn_tcp_listen(opts->listen_address, 0, err);
    if (srv->lfd < 0) {
        int code = err->code == PCONN_EINVAL ? PCONN_EINVAL : PCONN_EIO;
        err->code = code;
        pconn__tls_endpoint_free(srv->tls);
        free(srv);
        return code;
    }
    pconn_tcp_local_address(srv->lfd, srv->address, sizeof srv->address);
    srv->wake_fd = pconn__wake_fd_new();
    srv->stop_fd = pconn__wake_fd_new();
    srv->max_connections = opts->max_connections > 0 ? opts->max_connections : 0;
    pthread_mutex_init(&srv->mutex, NULL);
    pthread_cond_init(&srv->cond, NULL);
    srv->handshake_ms = opts->handshake_timeout_ms > 0 ? opts->handshake_timeout_ms : RPC_DEFAULT_HANDSHAKE_MS;
    pconn__rpc_config(&srv->cfg, opts->implementations, opts->max_message_size, &opts->heartbeat,
                      srv->tls != NULL ? pconn__tls_endpoint_transport(srv->tls) : opts->transport);
    srv->cfg.server = true;
    srv->cfg.authorize = opts->authorize;
    srv->cfg.authorize_arg = opts->authorize_arg;
    srv->cfg.on_log = opts->on_log;
    srv->cfg.on_log_arg = opts->on_log_arg;
    srv->cfg.stats = pconn__rpc_stats_new();
    atomic_init(&srv->watch.busy, 0);
    atomic_init(&srv->watch.running, 0);
    atomic_init(&srv->watch.sleeping, false);
    srv->watch.wake_fd = srv->wake_fd;
    srv->cfg.watch = &srv->watch;
    srv->cfg.reader_count = reader_count;
    pconn__rpc_impls_ref(srv->cfg.impls);
    srv->cfg.pool = pconn__rpc_pool_new(SERVER_POOL_MAX);
    int prc = srv->wake_fd >= 0 && srv->stop_fd >= 0 && srv->cfg.pool != NULL && srv->cfg.stats != NULL
                  ? pconn__thread_start(&srv->acceptor, accept_main, srv, 0, false)
                  : -1;
    if (prc != 0) {
        pconn__rpc_pool_release(srv->cfg.pool);
        if (srv->wake_fd >= 0)
            close(srv->wake_fd);
        if (srv->stop_fd >= 0)
            close(srv->stop_fd);
        close(srv->lfd);
        pconn_rpc_impls_free(srv->cfg.impls);
        pconn__rpc_stats_unref(srv->cfg.stats);
        pthread_cond_destroy(&srv->cond);
        pthread_mutex_destroy(&srv->mutex);
        pconn__tls_endpoint_free(srv->tls);
        free(srv);
        pconn_error_set(err, PCONN_ENOMEM, EAGAIN, "pconn_rpc_server_start");
        return PCONN_ENOMEM;
    }
    *out = srv;
    return PCONN_OK;
}

const char *pconn_rpc_server_address(const pconn_rpc_server_t *srv)
{
    return srv->address;
}

void pconn_rpc_server_stop(pconn_rpc_server_t *srv)
{
    if (srv == NULL)
        return;
    pconn__mutex_lock(&srv->mutex);
    srv->stopping = true;
    pconn__mutex_unlock(&srv->mutex);
    pconn__wake(srv->stop_fd); /* every handshake under way ends now (issue 9, defect 5) */
    pconn__wake(srv->wake_fd);
    pthread_join(srv->acceptor, NULL);
    close(srv->lfd);
    if (strncmp(srv->address, "unix:/", 6) == 0)
        unlink(srv->address + 5);
    /* Handshakes under way end at once: they watch stop_fd. */
    pconn__mutex_lock(&srv->mutex);
    while (srv->greeters > 0)
        pthread_cond_wait(&srv->cond, &srv->mutex);
    entry_t *all = srv->conns;
    srv->conns = NULL;
    pconn__mutex_unlock(&srv->mutex);
    /* All closed first, then waited for: a connection waited for one after the other
     * would go on serving its queries meanwhile. */
    for (entry_t *e = all; e != NULL; e = e->next)
        pconn_conn_close(e->conn);
    free_entries(all);
    /* Every connection is closed: their readers end; wait until none can call us. */
    pconn__mutex_lock(&srv->mutex);
    while (srv->readers > 0)
        pthread_cond_wait(&srv->cond, &srv->mutex);
    pconn__mutex_unlock(&srv->mutex);
    pconn__rpc_pool_release(srv->cfg.pool); /* waits for running handlers */
    pconn_rpc_impls_free(srv->cfg.impls);   /* the server's reference */
    pconn__rpc_stats_unref(srv->cfg.stats);
    close(srv->wake_fd);
    close(srv->stop_fd);
    pthread_cond_destroy(&srv->cond);
    pthread_mutex_destroy(&srv->mutex);
    pconn__tls_endpoint_free(srv->tls); /* connections still referenced hold their own */
    free(srv);
}

char *pconn_rpc_server_stats_json(pconn_rpc_server_t *srv)
{
    if (srv == NULL)
        return NULL;
    pconn__mutex_lock(&srv->mutex);
    int conns = srv->nconns, greeters = srv->greeters;
    pconn__mutex_unlock(&srv->mutex);
    json_t *o = json_pack("{s:s,s:i,s:i,s:i}", "address", srv->address, "connections", conns,
                          "handshakes", greeters, "handlers_busy",
                          pconn__rpc_pool_busy(srv->cfg.pool) + atomic_load(&srv->watch.running));
    if (o == NULL)
        return NULL;
    pconn__rpc_stats_json(srv->cfg.stats, o);
    char *text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    return text;
}
