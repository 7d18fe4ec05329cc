/* server.c - the server side. One accepting thread accepts, drives the handshakes
 * of all new connections at once (none has a thread before its HELLO is in: a silent
 * peer costs a descriptor and a few KiB, and its deadline is on the same epoll set),
 * and is the watchdog of the handlers running on reading threads. Each connection whose
 * handshake is done gets a reading thread that runs its handlers (serve.c);
 * blocking handlers run on a shared pool. */
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
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define SERVER_POOL_MAX 256
/* A reading thread whose role ended (its connection parked, ended, or went on to
 * another thread) waits this long for the next role before it ends, at most this many
 * at once: a new connection, a hand-over or a parked connection's next query then costs
 * no thread creation. */
#define SPARE_LINGER_MS 2000
#define SPARES_MAX 64
#define EMFILE_BACKOFF_MS 100

typedef struct entry_t {
    pconn_conn_t *conn; /* one reference, the server's */
    struct entry_t *next;
} entry_t;

/* What an epoll event of a connection points to: one of these two, by kind. */
enum { KIND_GREETING = 1, KIND_PARKED };

/* A connection in its handshake; the accepting thread's alone. */
typedef struct greeting_t {
    int kind;            /* KIND_GREETING */
    pconn_conn_t *conn;  /* the only reference */
    int fd;
    short events;        /* what the epoll set watches it for; 0: not in the set yet */
    int64_t deadline_ns;
    struct greeting_t *prev, *next; /* oldest first: the first deadline first */
} greeting_t;

/* A connection no thread reads (idle for RPC_PARK_MS): the accepting thread watches it
 * for bytes and keeps its heartbeats, in a heap by the next heartbeat check. */
typedef struct parked_t {
    int kind;            /* KIND_PARKED */
    pconn_conn_t *conn;  /* its reading role, and the role's reference */
    int fd;
    int64_t next_ns;     /* its next heartbeat check */
    size_t at;           /* its index in the heap */
    struct parked_t *next; /* in srv->parking, before the accepting thread takes it */
} parked_t;

/* A reading thread waiting for its next role, on its own stack; guarded by the mutex. */
typedef struct spare_t {
    pthread_cond_t cond;
    pconn_conn_t *job; /* set by the giver: the reading role to take */
    struct spare_t *next;
} spare_t;

struct pconn_rpc_server_t {
    int lfd;
    int wake_fd;
    int epfd;             /* the accepting thread's: lfd, wake_fd, every handshake */
    int max_connections;  /* 0: no limit */
    pthread_t acceptor;
    rpc_config_t cfg;
    int64_t handshake_ms;
    pconn__tls_endpoint_t *tls; /* or NULL */
    char address[PCONN_ADDRESS_MAX];
    greeting_t *greet_first, *greet_last; /* the accepting thread's */
    pthread_mutex_t mutex;
    pthread_cond_t cond;  /* readers finished */
    entry_t *conns;
    int nconns;           /* in conns */
    int ngreetings;       /* handshakes under way (written by the accepting thread) */
    int readers;          /* reading roles (threads, or parked): they call back into us */
    parked_t *parking;    /* given up by their reading threads, for the accepting thread */
    int nparked;          /* in the heap (written by the accepting thread) */
    parked_t **heap;      /* the accepting thread's: parked connections, next_ns first */
    spare_t *spares;      /* reading threads waiting for a role */
    int nspares;
    int reading_threads;  /* threads reading or waiting as spares: stop waits for them */
    size_t nheap, heap_cap;
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
              (!srv->stopping && srv->readers < srv->nconns + SERVER_POOL_MAX);
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

/* ---- reading threads ---- */

typedef struct reading_start_t {
    pconn_rpc_server_t *srv;
    pconn_conn_t *conn;
} reading_start_t;

/* A reading thread: it holds the role it was given until that ends or moves on, then
 * waits SPARE_LINGER_MS as a spare for the next. */
static void *reading_main(void *arg)
{
    reading_start_t start = *(reading_start_t *)arg;
    free(arg);
    pconn_rpc_server_t *srv = start.srv;
    pconn_conn_t *conn = start.conn;
    for (;;) {
        pconn__rpc_conn_read(conn);
        pconn__mutex_lock(&srv->mutex);
        if (srv->stopping || srv->nspares >= SPARES_MAX)
            break;
        spare_t me = {.job = NULL, .next = srv->spares};
        pconn__cond_init(&me.cond);
        // cppcheck-suppress autoVariables
        srv->spares = &me; /* on our stack, and off the list (taken, or below) before we go */
        srv->nspares++;
        int64_t until = pconn__deadline_ns(SPARE_LINGER_MS);
        while (me.job == NULL && !srv->stopping && pconn__mono_ns() < until)
            pconn__cond_wait_until(&me.cond, &srv->mutex, until);
        if (me.job == NULL) { /* not taken: off the list */
            for (spare_t **pp = &srv->spares; *pp != NULL; pp = &(*pp)->next) {
                if (*pp == &me) {
                    *pp = me.next;
                    break;
                }
            }
            srv->nspares--;
        }
        pthread_cond_destroy(&me.cond);
        conn = me.job;
        if (conn == NULL)
            break;
        pconn__mutex_unlock(&srv->mutex);
    }
    srv->reading_threads--;
    pthread_cond_broadcast(&srv->cond);
    pconn__mutex_unlock(&srv->mutex); /* srv is not touched after this */
    return NULL;
}

/* cfg.start_reader: a spare takes conn's reading role, or a new thread does. */
static int start_reader(void *arg, pconn_conn_t *conn)
{
    pconn_rpc_server_t *srv = arg;
    pconn__mutex_lock(&srv->mutex);
    spare_t *s = srv->spares;
    if (s != NULL) {
        srv->spares = s->next;
        srv->nspares--;
        s->job = conn;
        pthread_cond_signal(&s->cond);
        pconn__mutex_unlock(&srv->mutex);
        return 0;
    }
    srv->reading_threads++;
    pconn__mutex_unlock(&srv->mutex);
    reading_start_t *a = malloc(sizeof *a);
    pthread_t t;
    if (a != NULL) {
        *a = (reading_start_t){srv, conn};
        /* The default stack, as handlers run on it. */
        if (pconn__thread_start(&t, reading_main, a, 0, true) == 0)
            return 0;
        free(a);
    }
    pconn__mutex_lock(&srv->mutex);
    srv->reading_threads--;
    pthread_cond_broadcast(&srv->cond);
    pconn__mutex_unlock(&srv->mutex);
    return -1;
}

/* ---- parked connections, on the accepting thread ---- */

static void heap_swap(pconn_rpc_server_t *srv, size_t i, size_t j)
{
    parked_t *t = srv->heap[i];
    srv->heap[i] = srv->heap[j];
    srv->heap[j] = t;
    srv->heap[i]->at = i;
    srv->heap[j]->at = j;
}

/* Restores the heap's order around index i. */
static void heap_fix(pconn_rpc_server_t *srv, size_t i)
{
    while (i > 0 && srv->heap[(i - 1) / 2]->next_ns > srv->heap[i]->next_ns) {
        heap_swap(srv, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < srv->nheap && srv->heap[l]->next_ns < srv->heap[m]->next_ns)
            m = l;
        if (r < srv->nheap && srv->heap[r]->next_ns < srv->heap[m]->next_ns)
            m = r;
        if (m == i)
            return;
        heap_swap(srv, i, m);
        i = m;
    }
}

/* p leaves the epoll set and the heap; its connection is the caller's to go on with. */
static pconn_conn_t *unpark_take(pconn_rpc_server_t *srv, parked_t *p)
{
    pconn_conn_t *conn = p->conn;
    epoll_ctl(srv->epfd, EPOLL_CTL_DEL, p->fd, NULL);
    size_t i = p->at;
    heap_swap(srv, i, --srv->nheap);
    if (i < srv->nheap)
        heap_fix(srv, i);
    pconn__mutex_lock(&srv->mutex);
    srv->nparked--;
    pconn__mutex_unlock(&srv->mutex);
    free(p);
    return conn;
}

/* A parked connection's bytes came in (readable) or its heartbeat check is due: it
 * stays parked, gets a reading thread again, or has ended. */
static void parked_check(pconn_rpc_server_t *srv, parked_t *p, bool readable)
{
    int64_t next = 0;
    int r = pconn__rpc_conn_parked(p->conn, readable, &next);
    if (r == RPC_PARKED) {
        p->next_ns = next;
        heap_fix(srv, p->at);
        return;
    }
    pconn_conn_t *conn = unpark_take(srv, p);
    if (r == RPC_UNPARK)
        pconn__rpc_conn_unpark(conn);
}

/* Takes in the connections their reading threads gave up. */
static void parked_take_in(pconn_rpc_server_t *srv, parked_t *list)
{
    while (list != NULL) {
        parked_t *p = list;
        list = p->next;
        bool room = srv->nheap < srv->heap_cap;
        if (!room) {
            size_t cap = srv->heap_cap ? 2 * srv->heap_cap : 64;
            parked_t **h = realloc(srv->heap, cap * sizeof *h);
            if (h != NULL) {
                srv->heap = h;
                srv->heap_cap = cap;
                room = true;
            }
        }
        struct epoll_event ee = {.events = EPOLLIN, .data.ptr = p};
        p->fd = pconn__conn_fd(p->conn);
        p->next_ns = 0; /* checked at once: bytes may have come since */
        if (!room || epoll_ctl(srv->epfd, EPOLL_CTL_ADD, p->fd, &ee) != 0) {
            pconn_conn_t *conn = p->conn;
            free(p);
            pconn__rpc_conn_unpark(conn); /* a thread reads it after all */
            continue;
        }
        p->at = srv->nheap;
        srv->heap[srv->nheap++] = p;
        heap_fix(srv, p->at);
        pconn__mutex_lock(&srv->mutex);
        srv->nparked++;
        pconn__mutex_unlock(&srv->mutex);
    }
}

/* cfg.park: a reading thread idle for RPC_PARK_MS gives its connection up. */
static void park(void *arg, pconn_conn_t *conn)
{
    pconn_rpc_server_t *srv = arg;
    parked_t *p = malloc(sizeof *p);
    pconn__mutex_lock(&srv->mutex);
    bool stopping = srv->stopping;
    if (p != NULL && !stopping) {
        *p = (parked_t){.kind = KIND_PARKED, .conn = conn, .next = srv->parking};
        srv->parking = p;
        pconn__wake(srv->wake_fd);
    }
    pconn__mutex_unlock(&srv->mutex);
    if (p != NULL && !stopping)
        return;
    free(p);
    if (stopping)
        pconn__rpc_conn_parked_end(conn);
    else
        pconn__rpc_conn_unpark(conn); /* no memory: a thread goes on reading it */
}

/* ---- handshakes, all on the accepting thread ---- */

/* The handshake of g ended with rc: the connection goes on to its reading thread, or
 * goes. */
static void greeting_end(pconn_rpc_server_t *srv, greeting_t *g, int rc, pconn_error_t *err)
{
    if (g->events != 0)
        epoll_ctl(srv->epfd, EPOLL_CTL_DEL, g->fd, NULL);
    *(g->prev != NULL ? &g->prev->next : &srv->greet_first) = g->next;
    *(g->next != NULL ? &g->next->prev : &srv->greet_last) = g->prev;
    pconn_conn_t *conn = g->conn;
    free(g);
    entry_t *e = rc == PCONN_OK ? malloc(sizeof *e) : NULL;
    if (rc == PCONN_OK && e == NULL) {
        rc = PCONN_ENOMEM;
        pconn_error_set(err, rc, ENOMEM, "no memory for the connection");
    }
    pconn__mutex_lock(&srv->mutex);
    srv->ngreetings--;
    if (rc == PCONN_OK)
        srv->readers++; /* before its reader can start: stop waits for it */
    pconn__mutex_unlock(&srv->mutex);
    if (rc == PCONN_OK && (rc = pconn__rpc_conn_serve(conn, reader_exited, srv, err)) != PCONN_OK) {
        pconn__mutex_lock(&srv->mutex);
        srv->readers--;
        pconn__mutex_unlock(&srv->mutex);
    }
    if (rc != PCONN_OK) {
        if (rc != PCONN_ECLOSED)
            pconn__rpc_log(&srv->cfg, PCONN_LOG_WARNING, "peer %s rejected: %s", pconn_conn_address(conn),
                           err->message);
        free(e);
        pconn_conn_close(conn);
        pconn_conn_unref(conn);
        return;
    }
    e->conn = conn;
    pconn__mutex_lock(&srv->mutex);
    e->next = srv->conns;
    srv->conns = e;
    srv->nconns++;
    pconn__mutex_unlock(&srv->mutex);
}

/* Takes g's handshake as far as it goes now; it waits in the epoll set for what it needs
 * next, or ends. */
static void greeting_step(pconn_rpc_server_t *srv, greeting_t *g)
{
    pconn_error_t err = {0};
    short ev = 0;
    int rc = pconn__rpc_conn_step(g->conn, &ev, &err);
    if (rc == RPC_HS_AGAIN && ev != g->events) {
        struct epoll_event ee = {.events = (ev & POLLIN ? EPOLLIN : 0u) | (ev & POLLOUT ? EPOLLOUT : 0u),
                                 .data.ptr = g};
        if (epoll_ctl(srv->epfd, g->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, g->fd, &ee) == 0)
            g->events = ev;
        else {
            rc = PCONN_ENOMEM;
            pconn_error_set(&err, rc, errno, "epoll_ctl");
        }
    }
    if (rc != RPC_HS_AGAIN)
        greeting_end(srv, g, rc, &err);
}

/* The peers whose handshake deadline has passed are told so and dropped. */
static void greetings_expire(pconn_rpc_server_t *srv)
{
    int64_t now = pconn__mono_ns();
    while (srv->greet_first != NULL && srv->greet_first->deadline_ns <= now) {
        pconn_error_t err = {0};
        greeting_t *g = srv->greet_first;
        greeting_end(srv, g, pconn__rpc_conn_expired(g->conn, &err), &err);
    }
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

/* Accepts one peer and starts its handshake. false: out of descriptors or memory. */
static bool accept_one(pconn_rpc_server_t *srv)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int fd = accept4(srv->lfd, (struct sockaddr *)&ss, &len, SOCK_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (e != EMFILE && e != ENFILE && e != ENOBUFS && e != ENOMEM)
            return true;
        pconn__rpc_log(&srv->cfg, PCONN_LOG_ERROR, "accept on %s: %s; not accepting for %d ms", srv->address,
                       strerror(e), EMFILE_BACKOFF_MS);
        return false;
    }
    pconn__mutex_lock(&srv->mutex);
    bool full = srv->max_connections > 0 && srv->nconns + srv->ngreetings >= srv->max_connections;
    pconn__mutex_unlock(&srv->mutex);
    if (full) {
        refuse(fd, srv->max_connections);
        pconn__rpc_log(&srv->cfg, PCONN_LOG_WARNING, "a peer refused: too many connections (limit %d)",
                       srv->max_connections);
        return true;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* Messages about the connection name its peer. */
    char address[PCONN_ADDRESS_MAX], host[64], port[16];
    if ((ss.ss_family == AF_INET || ss.ss_family == AF_INET6) &&
        getnameinfo((struct sockaddr *)&ss, len, host, sizeof host, port, sizeof port,
                    NI_NUMERICHOST | NI_NUMERICSERV) == 0)
        snprintf(address, sizeof address, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
    else
        snprintf(address, sizeof address, "a unix peer");
    greeting_t *g = malloc(sizeof *g);
    pconn_conn_t *conn = NULL;
    pconn_error_t err = {0};
    if (g == NULL) {
        close(fd);
        return false;
    }
    if (pconn__rpc_conn_accept(fd, address, &srv->cfg, &conn, &err) != PCONN_OK) {
        pconn__rpc_log(&srv->cfg, PCONN_LOG_WARNING, "peer %s rejected: %s", address, err.message);
        free(g);
        return err.code != PCONN_ENOMEM;
    }
    *g = (greeting_t){.kind = KIND_GREETING, .conn = conn, .fd = fd, .deadline_ns = pconn__deadline_ns(srv->handshake_ms),
                      .prev = srv->greet_last};
    *(g->prev != NULL ? &g->prev->next : &srv->greet_first) = g;
    srv->greet_last = g;
    pconn__mutex_lock(&srv->mutex);
    srv->ngreetings++;
    pconn__mutex_unlock(&srv->mutex);
    greeting_step(srv, g); /* our HELLO goes out now */
    return true;
}

/* Markers of the two descriptors in the epoll set that are not handshakes. */
static char mark_listen, mark_wake;

static void *accept_main(void *arg)
{
    pconn_rpc_server_t *srv = arg;
    int64_t backoff_until = 0;
    bool listening = true;
    struct epoll_event evs[64];
    for (;;) {
        /* Out of descriptors (EMFILE): the listener stays readable, so it is left out of
         * the set for a while instead of spinning (issue 9, defect 6); a closing
         * connection ends that earlier. */
        int64_t now = pconn__mono_ns();
        bool backoff = now < backoff_until;
        if (backoff == listening) {
            struct epoll_event ee = {.events = backoff ? 0u : EPOLLIN, .data.ptr = &mark_listen};
            epoll_ctl(srv->epfd, EPOLL_CTL_MOD, srv->lfd, &ee);
            listening = !backoff;
        }
        int64_t until = backoff ? backoff_until : INT64_MAX;
        if (srv->greet_first != NULL && srv->greet_first->deadline_ns < until)
            until = srv->greet_first->deadline_ns;
        if (srv->nheap > 0 && srv->heap[0]->next_ns < until)
            until = srv->heap[0]->next_ns;
        int timeout = until == INT64_MAX ? -1 : pconn__poll_timeout_ms(until);
        /* While a handler runs on a reading thread, tick to see whether it is slow. */
        atomic_store(&srv->watch.sleeping, true);
        if (atomic_load(&srv->watch.busy) > 0) {
            atomic_store(&srv->watch.sleeping, false);
            if (timeout < 0 || timeout > RPC_INLINE_SLOW_MS / 2)
                timeout = RPC_INLINE_SLOW_MS / 2;
        }
        int n = epoll_wait(srv->epfd, evs, (int)(sizeof evs / sizeof evs[0]), timeout);
        atomic_store(&srv->watch.sleeping, false);
        if (n < 0 && errno != EINTR)
            break;
        if (atomic_load(&srv->watch.busy) > 0)
            hand_off_slow(srv);
        for (int i = 0; i < n; i++)
            if (evs[i].data.ptr == &mark_wake) /* a system call only when woken */
                pconn__wake_drain(srv->wake_fd);
        entry_t *dead = NULL;
        pconn__mutex_lock(&srv->mutex);
        bool stopping = srv->stopping;
        reap_locked(srv, &dead);
        parked_t *parking = srv->parking;
        srv->parking = NULL;
        pconn__mutex_unlock(&srv->mutex);
        parked_take_in(srv, parking);
        if (dead != NULL)
            backoff_until = 0; /* descriptors came free */
        free_entries(dead);
        if (stopping)
            break;
        bool incoming = false;
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &mark_listen)
                incoming = true;
            else if (evs[i].data.ptr != &mark_wake && *(int *)evs[i].data.ptr == KIND_GREETING)
                greeting_step(srv, evs[i].data.ptr);
            else if (evs[i].data.ptr != &mark_wake)
                parked_check(srv, evs[i].data.ptr, true);
        }
        greetings_expire(srv);
        for (int64_t t = pconn__mono_ns(); srv->nheap > 0 && srv->heap[0]->next_ns <= t;)
            parked_check(srv, srv->heap[0], false);
        if (incoming && !accept_one(srv))
            backoff_until = pconn__mono_ns() + (int64_t)EMFILE_BACKOFF_MS * 1000000;
    }
    /* Stopping: the parked connections end here, as no thread will read them again. */
    while (srv->nheap > 0)
        pconn__rpc_conn_parked_end(unpark_take(srv, srv->heap[0]));
    pconn__mutex_lock(&srv->mutex);
    parked_t *parking = srv->parking;
    srv->parking = NULL;
    pconn__mutex_unlock(&srv->mutex);
    while (parking != NULL) {
        parked_t *p = parking;
        parking = p->next;
        pconn__rpc_conn_parked_end(p->conn);
        free(p);
    }
    /* Every handshake under way ends now (issue 9, defect 5). */
    while (srv->greet_first != NULL) {
        pconn_error_t err = {.code = PCONN_ECLOSED};
        greeting_end(srv, srv->greet_first, PCONN_ECLOSED, &err);
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
    srv->epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &mark_listen};
    struct epoll_event wev = {.events = EPOLLIN, .data.ptr = &mark_wake};
    bool set = srv->epfd >= 0 && srv->wake_fd >= 0 && epoll_ctl(srv->epfd, EPOLL_CTL_ADD, srv->lfd, &lev) == 0 &&
               epoll_ctl(srv->epfd, EPOLL_CTL_ADD, srv->wake_fd, &wev) == 0;
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
    srv->cfg.park = park;
    srv->cfg.start_reader = start_reader;
    pconn__rpc_impls_ref(srv->cfg.impls);
    srv->cfg.pool = pconn__rpc_pool_new(SERVER_POOL_MAX);
    int prc = set && srv->cfg.pool != NULL && srv->cfg.stats != NULL
                  ? pconn__thread_start(&srv->acceptor, accept_main, srv, 0, false)
                  : -1;
    if (prc != 0) {
        pconn__rpc_pool_release(srv->cfg.pool);
        if (srv->wake_fd >= 0)
            close(srv->wake_fd);
        if (srv->epfd >= 0)
            close(srv->epfd);
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
    pconn__wake(srv->wake_fd); /* the acceptor ends every handshake under way, and itself */
    pthread_join(srv->acceptor, NULL);
    close(srv->lfd);
    if (strncmp(srv->address, "unix:/", 6) == 0)
        unlink(srv->address + 5);
    pconn__mutex_lock(&srv->mutex);
    entry_t *all = srv->conns;
    srv->conns = NULL;
    pconn__mutex_unlock(&srv->mutex);
    /* All closed first, then waited for: a connection waited for one after the other
     * would go on serving its queries meanwhile. */
    for (entry_t *e = all; e != NULL; e = e->next)
        pconn_conn_close(e->conn);
    free_entries(all);
    /* Every connection is closed: their readers end; wait until none can call us, and
     * then for the reading threads, spares included (told to go). */
    pconn__mutex_lock(&srv->mutex);
    while (srv->readers > 0)
        pthread_cond_wait(&srv->cond, &srv->mutex);
    for (spare_t *s = srv->spares; s != NULL; s = s->next)
        pthread_cond_signal(&s->cond);
    while (srv->reading_threads > 0)
        pthread_cond_wait(&srv->cond, &srv->mutex);
    pconn__mutex_unlock(&srv->mutex);
    pconn__rpc_pool_release(srv->cfg.pool); /* waits for running handlers */
    pconn_rpc_impls_free(srv->cfg.impls);   /* the server's reference */
    pconn__rpc_stats_unref(srv->cfg.stats);
    close(srv->wake_fd);
    close(srv->epfd);
    free(srv->heap);
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
    int conns = srv->nconns, greeters = srv->ngreetings, parked = srv->nparked;
    int reading = srv->reading_threads;
    pconn__mutex_unlock(&srv->mutex);
    json_t *o = json_pack("{s:s,s:i,s:i,s:i,s:i,s:i}", "address", srv->address, "connections", conns,
                          "handshakes", greeters, "parked", parked, "reading_threads", reading,
                          "handlers_busy",
                          pconn__rpc_pool_busy(srv->cfg.pool) + atomic_load(&srv->watch.running));
    if (o == NULL)
        return NULL;
    pconn__rpc_stats_json(srv->cfg.stats, o);
    char *text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    return text;
}
