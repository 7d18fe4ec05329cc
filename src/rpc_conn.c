/* rpc_conn.c - an RPC connection: handshake, a reading thread that also keeps the
 * heartbeats, calls multiplexed by id, queries served.
 *
 * Reading is a role, held by one thread at a time. Frames are decoded where they lie in
 * the read buffer. On a server, handlers run on the reading thread and the answers of a
 * read batch go out in one write; a handler still running after RPC_INLINE_SLOW_MS (the
 * server's watchdog sees it) or one that calls its peer back hands the role, with the
 * unread bytes and the queued answers, to a new thread, and its old thread answers its
 * own query and ends. Handlers registered as blocking, and every handler on the client
 * side, run on the handler pool.
 *
 * A client reads by leader/follower: a caller waiting for its answer takes the reading
 * role when no one holds it and reads for everyone until its own answers are in, then
 * wakes one other waiter to take over; the others wait on their condition. The
 * connection's watcher thread reads only when no call has been in flight for
 * WATCH_IDLE_MS (heartbeats, CLOSE, the server's queries), and lets go when a caller
 * kicks it; a frame larger than the read buffer is read by the watcher too, as a caller
 * must be able to leave mid-read when its deadline passes.
 * c->lock is held only briefly, never while writing or calling out; c->wlock only by a
 * writer, never together with c->lock; c->role_lock only around a hand-over (before
 * c->lock when both). */
#include "rpc.h"
#include "tls.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define READ_BUF 65536
#define READER_STACK (256 * 1024)

/* ---- waking callers ----
 * A caller waits on a word of its batch (a futex): whoever finishes one of its calls
 * bumps the word under c->lock and wakes it after dropping the lock, so the caller does
 * not wake only to block on the lock still held (two context switches saved per answer
 * on a busy connection). The word is on the caller's stack: a wake that comes after the
 * caller left touches nothing (FUTEX_WAKE only hashes the address); the caller re-checks
 * its calls under c->lock anyway. */

typedef struct waiter_t {
    _Atomic uint32_t word;
    bool asleep; /* in wait_word(), or about to be; guarded by c->lock */
} waiter_t;

/* Under c->lock: something changed for w's caller. The word to wake() once the lock is
 * dropped, or NULL when the caller is not asleep (it will see the change itself). */
static _Atomic uint32_t *poke_locked(waiter_t *w)
{
    atomic_fetch_add(&w->word, 1);
    if (!w->asleep)
        return NULL;
    w->asleep = false;
    return &w->word;
}

static void wake(_Atomic uint32_t *word)
{
    if (word != NULL)
        syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Until *word moves from seen, a wake, or deadline_ns (INT64_MAX: none). */
static void wait_word(_Atomic uint32_t *word, uint32_t seen, int64_t deadline_ns)
{
    struct timespec ts, *tp = NULL;
    if (deadline_ns != INT64_MAX) {
        int64_t left = deadline_ns - pconn__mono_ns();
        if (left <= 0)
            return;
        ts.tv_sec = (time_t)(left / 1000000000);
        ts.tv_nsec = (long)(left % 1000000000);
        tp = &ts;
    }
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, tp, NULL, 0);
}

/* An answer queued by the reading thread, sent with the others of its batch. */
typedef struct answer_t {
    uint8_t head[21];
    pconn_buf_t data; /* owned */
} answer_t;
#define ANSWERS_MAX 32
#define ANSWERS_BYTES (256 * 1024)

/* A call waiting for its answer, on the caller's stack. */
typedef struct pending_t {
    uint64_t id;
    struct waiter_t *waiter; /* its batch's caller (see wake()) */
    bool done;
    bool waiting;        /* its caller waits (or leads), so it may be asked to lead */
    int code;            /* wire code of the answer, or a local failure */
    uint8_t *frame;      /* the RESPONSE data (owned, never NULL once answered) */
    size_t data_len;
    char msg[256];
    struct pending_t *next;
} pending_t;

typedef struct rpc_conn_t {
    pconn_conn_t *conn; /* our wrapper: no reference, it outlives the reader */
    int fd;
    char address[PCONN_ADDRESS_MAX];
    rpc_config_t cfg;
    void *session;      /* the transport's, or NULL */
    pconn_rpc_peer_t peer; /* address: ours; subject and sans: the session's */

    pthread_mutex_t lock;  /* pending, next_id, failure */
    pthread_mutex_t wlock; /* one writer at a time: writer_enter() */
    pending_t *pending;
    uint64_t next_id;
    bool failed;
    int fail_code;
    char fail_msg[256];

    pthread_t reader;
    bool reader_started;
    bool reader_detached; /* the reader is the opener's thread (a server's) */
    atomic_bool reader_done;
    atomic_bool dead; /* failed or closed: set with failed, read without the lock */
    /* Guarded by lock: the reader's end, and the hand-over of its reference. */
    pthread_cond_t reader_cond;
    int close_waiters;
    bool reader_out, reader_ref_handed;
    void (*on_reader_exit)(void *);
    void *exit_arg;

    /* Server: the reading role's hand-over (see the top). */
    pthread_mutex_t role_lock;
    uint64_t role_gen;             /* the current holder's number; guarded by role_lock */
    _Atomic int64_t inline_since_ns; /* a handler runs on the reading thread since, or 0 */
    bool (*reader_count)(void *, int);

    /* Client: who reads; guarded by lock (see the top). */
    enum { ROLE_NONE, ROLE_WATCHER, ROLE_CALLER } role;
    bool watcher_wanted;    /* a frame only the watcher may read is next */
    bool kicked;            /* the watcher was asked to let go */
    int kick_fd;            /* readable: the watcher lets go */
    pthread_cond_t watch_cond;
    int64_t last_call_ns;   /* when a call last ended */
    int waiters;            /* callers waiting for answers */

    /* The reading role's alone. */
    int64_t lead_deadline_ns; /* a caller's: its reads end then (0: none) */
    bool lead_late_read;      /* the caller took its one read past the deadline */
    bool watching;            /* the watcher's: it lets go when kicked or calls wait */
    answer_t answers[ANSWERS_MAX];
    int nanswers;
    size_t answer_bytes;
    uint8_t *rbuf;
    size_t rpos, rlen;
    int64_t last_recv_ns, next_send_ns;

    /* The handshake's (hs_step()): its state, bytes of our HELLO sent or of the peer's
     * read, and the peer's HELLO. */
    int hs_state;
    size_t hs_done;
    uint8_t hs_buf[8 + RPC_HELLO_MAX];
} rpc_conn_t;

static _Thread_local pconn_conn_t *tl_handler_conn;
static _Thread_local rpc_conn_t *tl_inline; /* its handler runs on this reading thread */
static _Thread_local uint64_t tl_inline_gen; /* as the holder of this role number */
static _Thread_local rpc_conn_t *tl_reader; /* this thread is (or was) its reading thread */
static _Thread_local const pconn_rpc_peer_t *tl_handler_peer;

pconn_conn_t *pconn_rpc_handler_conn(void)
{
    return tl_handler_conn;
}

const pconn_rpc_peer_t *pconn_rpc_handler_peer(void)
{
    return tl_handler_peer;
}

void pconn__rpc_config(rpc_config_t *cfg, pconn_rpc_impls_t *impls, size_t max,
                       const pconn_heartbeat_t *hb, const pconn_transport_t *transport)
{
    cfg->impls = impls;
    cfg->pool = NULL;
    /* At least a HELLO's worth, so that every size computed against it is positive. */
    cfg->max = max == 0 ? RPC_DEFAULT_MAX : max < RPC_HELLO_MAX ? RPC_HELLO_MAX : max;
    cfg->hb_timeout_ms = hb != NULL && (hb->timeout_ms > 0 || hb->timeout_ms == PCONN_FOREVER) ? hb->timeout_ms : RPC_DEFAULT_HB_TIMEOUT_MS;
    cfg->hb_every_ms = hb != NULL && hb->send_every_ms > 0 ? hb->send_every_ms : RPC_DEFAULT_HB_EVERY_MS;
    cfg->transport = transport;
    cfg->server = false;
    cfg->authorize = NULL;
    cfg->authorize_arg = NULL;
    cfg->stats = NULL;
    cfg->on_log = NULL;
    cfg->on_log_arg = NULL;
    cfg->watch = NULL;
    cfg->reader_count = NULL;
    cfg->park = NULL;
}

void pconn__rpc_log(const rpc_config_t *cfg, int level, const char *fmt, ...)
{
    if (cfg->on_log == NULL)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    cfg->on_log(level, line, cfg->on_log_arg);
}

/* The poll() events the transport's last call of that direction waits for. */
static short transport_wants(const rpc_conn_t *c, int writing)
{
    if (c->cfg.transport != NULL && c->cfg.transport->wants != NULL && c->session != NULL) {
        short ev = c->cfg.transport->wants(c->session, writing);
        if (ev != 0)
            return ev;
    }
    return writing ? POLLOUT : POLLIN;
}

/* ---- raw I/O ------------------------------------------------------------------- */

static ssize_t raw_read(rpc_conn_t *c, void *buf, size_t len)
{
    if (c->cfg.transport != NULL)
        return c->cfg.transport->read(c->session, buf, len);
    return recv(c->fd, buf, len, 0);
}

static ssize_t raw_write(rpc_conn_t *c, const void *buf, size_t len)
{
    if (c->cfg.transport != NULL)
        return c->cfg.transport->write(c->session, buf, len);
    return send(c->fd, buf, len, MSG_NOSIGNAL);
}

/* base_ns plus ms milliseconds, saturating at INT64_MAX ("never"): PCONN_FOREVER, or a
 * value whose nanoseconds would overflow (INT64_MAX ms), means no deadline. */
static int64_t after_ms(int64_t base_ns, int64_t ms)
{
    if (ms < 0 || ms > (INT64_MAX - base_ns) / 1000000)
        return INT64_MAX;
    return base_ns + ms * 1000000;
}

/* What write_frame() says. */
enum { WF_OK = 0, WF_ERROR = -1, WF_TIMEOUT = -2, WF_TIMEOUT_MIDFRAME = -3 };

/* The right to write, one thread at a time, taken before deadline_ns (0: only if free
 * now; INT64_MAX: no limit): a writer waiting behind a stuck one gives up in time
 * (issue 9, defect 3). A mutex, as the hand-over between writers is the hot path. */
static bool writer_enter(rpc_conn_t *c, int64_t deadline_ns)
{
    return pconn__mutex_lock_until(&c->wlock, deadline_ns);
}

static void writer_leave(rpc_conn_t *c)
{
    pconn__mutex_unlock(&c->wlock);
}

/* Plain TCP: every frame in as few sendmsg() calls as the kernel takes, never blocking
 * in them: when the socket is full it polls for room until deadline_ns (0: not at all).
 * Consumes iov. */
static int send_plain(rpc_conn_t *c, struct iovec *iov, int iovcnt, int64_t deadline_ns)
{
    size_t sent = 0;
    while (iovcnt > 0 && iov->iov_len == 0)
        iov++, iovcnt--;
    while (iovcnt > 0) {
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)(iovcnt < IOV_MAX ? iovcnt : IOV_MAX)};
        ssize_t n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
            int rc = deadline_ns == 0 ? 0 : poll(&pfd, 1, pconn__poll_timeout_ms(deadline_ns));
            if (rc == 0)
                return sent == 0 ? WF_TIMEOUT : WF_TIMEOUT_MIDFRAME;
            if (rc < 0 && errno != EINTR)
                return WF_ERROR;
            continue;
        }
        if (n <= 0)
            return WF_ERROR;
        sent += (size_t)n;
        while (n > 0 || (iovcnt > 0 && iov->iov_len == 0)) {
            if ((size_t)n >= iov->iov_len) {
                n -= (ssize_t)iov->iov_len;
                iov++;
                iovcnt--;
            } else {
                iov->iov_base = (char *)iov->iov_base + n;
                iov->iov_len -= (size_t)n;
                n = 0;
            }
        }
    }
    return WF_OK;
}

/* One write through the transport, whole, polling for what the session wants until
 * deadline_ns (0: no waiting). *sent counts what went out. */
static int transport_write_all(rpc_conn_t *c, const uint8_t *p, size_t len, int64_t deadline_ns,
                               size_t *sent)
{
    while (len > 0) {
        ssize_t n = raw_write(c, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            struct pollfd pfd = {.fd = c->fd, .events = transport_wants(c, 1)};
            int rc = deadline_ns == 0 ? 0 : poll(&pfd, 1, pconn__poll_timeout_ms(deadline_ns));
            /* The session may hold part of what it was given (an OpenSSL record that
             * must be retried with the same bytes): giving up breaks the stream. */
            if (rc == 0)
                return WF_TIMEOUT_MIDFRAME;
            if (rc < 0 && errno != EINTR)
                return WF_ERROR;
            continue;
        }
        if (n <= 0)
            return WF_ERROR;
        p += n;
        len -= (size_t)n;
        *sent += (size_t)n;
    }
    return WF_OK;
}

/* A transport: small frames are gathered into one write of up to 16 KiB, so that no
 * frame waits for Nagle between its header and its data behind a TLS terminator (issue
 * 9, defect 11) and queued calls go out together; large parts are written as they are. */
static int send_transport(rpc_conn_t *c, const struct iovec *iov, int iovcnt, int64_t deadline_ns)
{
    uint8_t stage[16384];
    size_t staged = 0, sent = 0;
    int rc = WF_OK;
    for (int i = 0; i < iovcnt && rc == WF_OK; i++) {
        if (iov[i].iov_len == 0)
            continue; /* no data: its base may be NULL */
        if (iov[i].iov_len <= sizeof stage - staged) {
            memcpy(stage + staged, iov[i].iov_base, iov[i].iov_len);
            staged += iov[i].iov_len;
            continue;
        }
        rc = transport_write_all(c, stage, staged, deadline_ns, &sent);
        staged = 0;
        if (rc == WF_OK && iov[i].iov_len <= sizeof stage) {
            memcpy(stage, iov[i].iov_base, iov[i].iov_len);
            staged = iov[i].iov_len;
        } else if (rc == WF_OK) {
            rc = transport_write_all(c, iov[i].iov_base, iov[i].iov_len, deadline_ns, &sent);
        }
    }
    if (rc == WF_OK)
        rc = transport_write_all(c, stage, staged, deadline_ns, &sent);
    return rc;
}

/* Writes whole frames (iov: their headers and data in order) before deadline_ns
 * (INT64_MAX: none; 0: only if that needs no waiting). WF_OK; WF_TIMEOUT: nothing went
 * out, the connection is fine; WF_TIMEOUT_MIDFRAME: part went out, the stream is broken
 * (the caller fails the connection); WF_ERROR with errno. Consumes iov. */
static int write_frames(rpc_conn_t *c, struct iovec *iov, int iovcnt, int64_t deadline_ns)
{
    if (!writer_enter(c, deadline_ns))
        return WF_TIMEOUT;
    if (c->cfg.transport != NULL && deadline_ns == 0) {
        /* Not waiting means not starting unless there is room: a transport's write
         * cannot be taken back (see transport_write_all()). */
        struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
        if (poll(&pfd, 1, 0) != 1 || (pfd.revents & POLLOUT) == 0) {
            writer_leave(c);
            return WF_TIMEOUT;
        }
    }
    int rc = c->cfg.transport == NULL ? send_plain(c, iov, iovcnt, deadline_ns)
                                      : send_transport(c, iov, iovcnt, deadline_ns);
    int e = errno;
    writer_leave(c);
    errno = e;
    return rc;
}

static int write_frame(rpc_conn_t *c, const uint8_t *head, size_t head_len, const void *data,
                       size_t data_len, int64_t deadline_ns)
{
    struct iovec iov[2] = {{(void *)head, head_len}, {(void *)data, data_len}};
    return write_frames(c, iov, 2, deadline_ns);
}

/* Frame header: length, type, and the fixed fields the caller appends. */
static size_t frame_head(uint8_t *h, uint8_t type, size_t fixed_len, size_t data_len)
{
    pconn__put_u64(h, 1 + fixed_len + data_len);
    h[8] = type;
    return 9;
}

/* Best effort, as the connection ends: only if no one is writing, only what fits now. */
static void send_close(rpc_conn_t *c, int code, const char *msg)
{
    uint8_t h[13];
    size_t mlen = strlen(msg);
    frame_head(h, RPC_CLOSE, 4, mlen);
    pconn__put_u32(h + 9, (uint32_t)code);
    write_frame(c, h, sizeof h, msg, mlen, 0);
}

static void fail(rpc_conn_t *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* An answer that cannot go out within the heartbeat timeout: the peer has not read for
 * that long, so the connection is as good as dead. */
static int send_response(rpc_conn_t *c, uint64_t id, int code, const void *data, size_t len)
{
    uint8_t h[21];
    frame_head(h, RPC_RESPONSE, 12, len);
    pconn__put_u64(h + 9, id);
    pconn__put_u32(h + 17, (uint32_t)code);
    int rc = write_frame(c, h, sizeof h, data, len, after_ms(pconn__mono_ns(), c->cfg.hb_timeout_ms));
    if (rc == WF_TIMEOUT || rc == WF_TIMEOUT_MIDFRAME)
        fail(c, PCONN_EIO, "an answer could not be sent for %lld ms: the peer does not read",
             (long long)c->cfg.hb_timeout_ms);
    return rc;
}

/* ---- failure ------------------------------------------------------------------- */

/* Records why the connection ended (the first reason wins) and fails every call in
 * flight with it. */
static void fail_calls(rpc_conn_t *c, int code, const char *msg)
{
    pconn__mutex_lock(&c->lock);
    if (!c->failed) {
        c->failed = true;
        c->fail_code = code;
        snprintf(c->fail_msg, sizeof c->fail_msg, "%s", msg);
    }
    atomic_store(&c->dead, true);
    for (pending_t *p = c->pending; p != NULL; p = p->next) {
        p->done = true;
        p->code = c->fail_code;
        snprintf(p->msg, sizeof p->msg, "%s", c->fail_msg);
        wake(poke_locked(p->waiter)); /* under the lock: rare */
    }
    c->pending = NULL;
    pthread_cond_broadcast(&c->watch_cond);
    pconn__mutex_unlock(&c->lock);
}

/* The reader's way out: the reason first, then the connection closed for everyone (so
 * a woken caller that asks its pconn again never gets this connection back, issue 9
 * defect 10), then the calls woken with the reason (rpc_close does it, or this). */
static void fail(rpc_conn_t *c, int code, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(msg, sizeof msg, "rpc %s: ", c->address);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    pconn__mutex_lock(&c->lock);
    bool first = !c->failed;
    if (first) {
        c->failed = true;
        c->fail_code = code;
        snprintf(c->fail_msg, sizeof c->fail_msg, "%s", msg);
    }
    atomic_store(&c->dead, true);
    pconn__mutex_unlock(&c->lock);
    /* A peer that hangs up is ordinary; one that breaks the protocol or goes silent is
     * worth a line in the server's log. */
    if (first && c->cfg.server && strstr(msg, "connection closed by peer") == NULL &&
        strstr(msg, "closed by peer:") == NULL)
        pconn__rpc_log(&c->cfg, PCONN_LOG_WARNING, "%s", msg);
    pconn_conn_close(c->conn);
    fail_calls(c, code, msg);
}

/* ---- reading ------------------------------------------------------------------- */


/* What the reading role's waits say besides pconn codes: a leading caller's deadline
 * passed; the watcher was kicked; a frame a caller may not read is next; the watcher
 * lets go, as callers wait; a server's reading thread has been idle for RPC_PARK_MS. */
enum { RD_DEADLINE = -100, RD_KICKED = -101, RD_BIG = -102, RD_YIELD = -103, RD_PARK = -104 };

/* Waits until the fd is readable, sending heartbeats when due. PCONN_OK, or
 * PCONN_ETIMEDOUT (heartbeat timeout), RD_DEADLINE (a leading caller's deadline),
 * RD_KICKED (the watcher's kick fd), RD_PARK (may_park: between frames, a server's
 * reading thread idle for RPC_PARK_MS, no call of ours waiting). */
static int wait_readable(rpc_conn_t *c, bool may_park)
{
    for (;;) {
        if (c->cfg.transport != NULL && c->cfg.transport->pending != NULL &&
            c->session != NULL && c->cfg.transport->pending(c->session) > 0)
            return PCONN_OK;
        int64_t now = pconn__mono_ns();
        int64_t dead_at = after_ms(c->last_recv_ns, c->cfg.hb_timeout_ms);
        if (now >= dead_at) {
            /* Bytes waiting unread are a sign of life that came while this thread
             * was busy (serving a batch): read them first. */
            struct pollfd now_pfd = {.fd = c->fd, .events = POLLIN};
            if (poll(&now_pfd, 1, 0) == 1 && (now_pfd.revents & POLLIN))
                return PCONN_OK;
            return PCONN_ETIMEDOUT;
        }
        if (now >= c->next_send_ns) {
            /* Never waits: skipped while someone writes (those bytes reach the peer
             * anyway) or while the socket is full (it would not be read either). */
            uint8_t h[9];
            frame_head(h, RPC_HEARTBEAT, 0, 0);
            if (write_frame(c, h, sizeof h, NULL, 0, 0) == WF_TIMEOUT_MIDFRAME)
                return PCONN_EIO;
            c->next_send_ns = after_ms(now, c->cfg.hb_every_ms);
        }
        int64_t until = dead_at < c->next_send_ns ? dead_at : c->next_send_ns;
        if (may_park && c->cfg.park != NULL && c->rpos == c->rlen) {
            int64_t park_at = after_ms(c->last_recv_ns, RPC_PARK_MS);
            if (now >= park_at) {
                pconn__mutex_lock(&c->lock);
                bool calls = c->pending != NULL;
                pconn__mutex_unlock(&c->lock);
                if (!calls)
                    return RD_PARK;
                park_at = after_ms(now, RPC_PARK_MS);
            }
            if (park_at < until)
                until = park_at;
        }
        if (c->lead_deadline_ns != 0) {
            if (now >= c->lead_deadline_ns) {
                /* Past its deadline a caller still takes what has arrived, once: a
                 * call with timeout 0 gets an answer that is already there. */
                struct pollfd late = {.fd = c->fd, .events = POLLIN};
                if (!c->lead_late_read && poll(&late, 1, 0) == 1 && (late.revents & POLLIN)) {
                    c->lead_late_read = true;
                    return PCONN_OK;
                }
                return RD_DEADLINE;
            }
            if (c->lead_deadline_ns < until)
                until = c->lead_deadline_ns;
        }
        int kick_fd = c->watching ? c->kick_fd : -1;
        struct pollfd pfd[2] = {{.fd = c->fd, .events = transport_wants(c, 0)},
                                {.fd = kick_fd, .events = POLLIN}};
        int rc = poll(pfd, kick_fd >= 0 ? 2 : 1, pconn__poll_timeout_ms(until));
        if (rc > 0 && kick_fd >= 0 && pfd[1].revents != 0) {
            pconn__wake_drain(kick_fd);
            return RD_KICKED;
        }
        if (rc > 0 && pfd[0].revents != 0)
            return PCONN_OK;
        if (rc < 0 && errno != EINTR)
            return PCONN_EIO;
    }
}

/* The watcher saw its kick: the next caller that finds it reading kicks again. */
static void kick_taken(rpc_conn_t *c)
{
    pconn__mutex_lock(&c->lock);
    c->kicked = false;
    pconn__mutex_unlock(&c->lock);
}

/* Reads exactly len bytes (through the read buffer). PCONN_OK, PCONN_EIO (end of
 * stream or error, errno kept in *sys_errno) or PCONN_ETIMEDOUT. */
static int read_exact(rpc_conn_t *c, void *dst, size_t len, int *sys_errno)
{
    uint8_t *out = dst;
    while (len > 0) {
        if (c->rpos < c->rlen) {
            size_t n = c->rlen - c->rpos < len ? c->rlen - c->rpos : len;
            memcpy(out, c->rbuf + c->rpos, n);
            c->rpos += n;
            out += n;
            len -= n;
            continue;
        }
        int rc = wait_readable(c, false);
        if (rc == RD_KICKED) { /* the watcher finishes the frame it is in first */
            kick_taken(c);
            continue;
        }
        if (rc != PCONN_OK)
            return rc;
        /* Large reads go straight to their destination. */
        bool direct = len >= READ_BUF;
        ssize_t n = raw_read(c, direct ? out : c->rbuf, direct ? len : READ_BUF);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0) {
            *sys_errno = n < 0 ? errno : 0;
            return PCONN_EIO;
        }
        c->last_recv_ns = pconn__mono_ns();
        if (direct) {
            out += n;
            len -= (size_t)n;
        } else {
            c->rpos = 0;
            c->rlen = (size_t)n;
        }
    }
    return PCONN_OK;
}

/* ---- answers ------------------------------------------------------------------- */

static void free_answers(rpc_conn_t *c)
{
    for (int i = 0; i < c->nanswers; i++)
        pconn_buf_free(&c->answers[i].data);
    c->nanswers = 0;
    c->answer_bytes = 0;
}

/* Sends the queued answers in one write, within the heartbeat timeout (a peer that reads
 * nothing for that long is as good as dead: the connection fails). WF_OK or what
 * write_frames() said (the connection then failed, or will on its next read). */
static int flush_answers(rpc_conn_t *c)
{
    if (c->nanswers == 0)
        return WF_OK;
    struct iovec iov[2 * ANSWERS_MAX];
    for (int i = 0; i < c->nanswers; i++) {
        iov[2 * i] = (struct iovec){c->answers[i].head, sizeof c->answers[i].head};
        iov[2 * i + 1] = (struct iovec){c->answers[i].data.data, c->answers[i].data.len};
    }
    int rc = write_frames(c, iov, 2 * c->nanswers, after_ms(pconn__mono_ns(), c->cfg.hb_timeout_ms));
    int e = errno;
    free_answers(c);
    if (rc == WF_TIMEOUT || rc == WF_TIMEOUT_MIDFRAME)
        fail(c, PCONN_EIO, "an answer could not be sent for %lld ms: the peer does not read",
             (long long)c->cfg.hb_timeout_ms);
    errno = e;
    return rc;
}

/* Queues an answer (data taken) to go out with the rest of the batch. */
static void queue_answer(rpc_conn_t *c, uint64_t id, int code, pconn_buf_t *data)
{
    answer_t *a = &c->answers[c->nanswers++];
    frame_head(a->head, RPC_RESPONSE, 12, data->len);
    pconn__put_u64(a->head + 9, id);
    pconn__put_u32(a->head + 17, (uint32_t)code);
    a->data = *data;
    *data = (pconn_buf_t){0};
    c->answer_bytes += sizeof a->head + a->data.len;
    if (c->nanswers == ANSWERS_MAX || c->answer_bytes >= ANSWERS_BYTES)
        flush_answers(c);
}

/* An answer that is a message: queued on the reading thread (reading), else sent now. */
static void answer_message(rpc_conn_t *c, bool reading, uint64_t id, int code, const char *msg)
{
    pconn_buf_t b = {0};
    if (reading && pconn_buf_append(&b, msg, strlen(msg)) == PCONN_OK) {
        queue_answer(c, id, code, &b);
        return;
    }
    if (reading)
        flush_answers(c); /* out of memory: in order, without a copy */
    send_response(c, id, code, msg, strlen(msg));
}

/* ---- reading frames ------------------------------------------------------------ */

/* A frame that does not fit the read buffer (or is refused), its length read: the
 * payload in a new buffer; a RESPONSE's data alone, without its head, so that the
 * caller gets it as it is (m->data == *owned). */
static int big_frame(rpc_conn_t *c, uint64_t n, rpc_msg_t *m, uint8_t **owned, uint64_t *big_len,
                     uint8_t *head, size_t *head_len, char *why, size_t why_size, int *sys_errno)
{
    if (n == 0) {
        snprintf(why, why_size, "zero-length frame");
        return PCONN_EPROTO;
    }
    if (flush_answers(c) != WF_OK) { /* what is done goes out before a long read */
        *sys_errno = errno;
        return PCONN_EIO;
    }
    if (n > c->cfg.max) {
        *big_len = n;
        *head_len = n < 9 ? (size_t)n : 9;
        if (read_exact(c, head, *head_len, sys_errno) != PCONN_OK)
            *head_len = 0;
        return PCONN_ETOOBIG;
    }
    uint8_t h[13];
    size_t hl = n < sizeof h ? (size_t)n : sizeof h;
    int rc = read_exact(c, h, hl, sys_errno);
    if (rc != PCONN_OK)
        return rc;
    if (h[0] == RPC_RESPONSE && hl == sizeof h) {
        size_t dl = (size_t)n - sizeof h;
        uint8_t *d = malloc(dl > 0 ? dl : 1);
        if (d == NULL)
            return PCONN_ENOMEM;
        if ((rc = read_exact(c, d, dl, sys_errno)) != PCONN_OK) {
            free(d);
            return rc;
        }
        *m = (rpc_msg_t){.type = RPC_RESPONSE, .id = pconn__get_u64(h + 1),
                         .code = pconn__get_u32(h + 9), .data = d, .data_len = dl};
        *owned = d;
        return PCONN_OK;
    }
    uint8_t *p = malloc((size_t)n);
    if (p == NULL)
        return PCONN_ENOMEM;
    memcpy(p, h, hl);
    if ((rc = read_exact(c, p + hl, (size_t)n - hl, sys_errno)) != PCONN_OK) {
        free(p);
        return rc;
    }
    *owned = p;
    return pconn__rpc_decode(p, (size_t)n, m, why, why_size);
}

/* The next frame, decoded where it lies in the read buffer when it fits there (*owned
 * NULL; valid until the next call), else as big_frame() says. Before waiting for bytes,
 * the queued answers go out. PCONN_OK; PCONN_ETOOBIG (*big_len, head[0..*head_len): its
 * length and first bytes); PCONN_EPROTO with why; PCONN_ENOMEM; PCONN_ETIMEDOUT
 * (heartbeat); PCONN_EIO (end of stream or error, errno in *sys_errno). */
static int next_frame(rpc_conn_t *c, rpc_msg_t *m, uint8_t **owned, uint64_t *big_len,
                      uint8_t *head, size_t *head_len, char *why, size_t why_size, int *sys_errno)
{
    *owned = NULL;
    for (;;) {
        if (atomic_load(&c->dead)) /* failed or closed: what is still buffered is not served */
            return PCONN_EIO;
        size_t have = c->rlen - c->rpos;
        if (have >= 8) {
            uint64_t n = pconn__get_u64(c->rbuf + c->rpos);
            if (n > 0 && n <= c->cfg.max && n <= have - 8) {
                const uint8_t *p = c->rbuf + c->rpos + 8;
                /* The peer's queries are the watcher's too: answering one may have to
                 * wait for the peer to read, longer than a caller has. */
                if (c->lead_deadline_ns != 0 && p[0] == RPC_QUERY)
                    return RD_BIG;
                c->rpos += 8 + (size_t)n;
                return pconn__rpc_decode(p, (size_t)n, m, why, why_size);
            }
            if (n == 0 || n > c->cfg.max || n > READ_BUF - 8) {
                if (c->lead_deadline_ns != 0)
                    return RD_BIG; /* may take longer than the caller has: the watcher's */
                c->rpos += 8;
                return big_frame(c, n, m, owned, big_len, head, head_len, why, why_size, sys_errno);
            }
        }
        /* A caller never waits to write answers (it has a deadline): the watcher does,
         * before it lets go. */
        if (c->lead_deadline_ns == 0 && flush_answers(c) != WF_OK) {
            *sys_errno = errno;
            return PCONN_EIO;
        }
        if (c->watching) {
            pconn__mutex_lock(&c->lock);
            bool callers = c->waiters > 0;
            pconn__mutex_unlock(&c->lock);
            if (callers)
                return RD_YIELD;
        }
        if (c->rpos > 0) {
            memmove(c->rbuf, c->rbuf + c->rpos, have);
            c->rpos = 0;
            c->rlen = have;
        }
        int rc = wait_readable(c, true);
        if (rc == RD_KICKED) {
            kick_taken(c);
            continue;
        }
        if (rc != PCONN_OK)
            return rc;
        ssize_t r = raw_read(c, c->rbuf + c->rlen, READ_BUF - c->rlen);
        if (r < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (r <= 0) {
            *sys_errno = r < 0 ? errno : 0;
            return PCONN_EIO;
        }
        c->last_recv_ns = pconn__mono_ns();
        c->rlen += (size_t)r;
    }
}

/* ---- serving queries ----------------------------------------------------------- */

/* The answer of a handler that returned rc with resp and err. */
static void handler_answer(rpc_conn_t *c, bool reading, uint64_t id, int rc, pconn_buf_t *resp,
                           pconn_error_t *err)
{
    if (rc != PCONN_OK) {
        if (err->message[0] == '\0')
            snprintf(err->message, sizeof err->message, "%s", pconn_strerror(rc));
        answer_message(c, reading, id, PCONN_EREMOTE, err->message);
    } else if (resp->len > c->cfg.max - 13) {
        char msg[128];
        snprintf(msg, sizeof msg, "response of %zu bytes over the limit of %zu bytes", resp->len,
                 c->cfg.max);
        answer_message(c, reading, id, PCONN_ETOOBIG, msg);
    } else if (reading) {
        queue_answer(c, id, RPC_CODE_OK, resp);
    } else {
        send_response(c, id, RPC_CODE_OK, resp->data, resp->len);
    }
    pconn_buf_free(resp);
}

static int call_handler(rpc_conn_t *c, pconn_rpc_handler_fn fn, void *harg, const rpc_msg_t *m,
                        pconn_buf_t *resp, pconn_error_t *err)
{
    if (c->cfg.stats != NULL)
        atomic_fetch_add(&c->cfg.stats->served, 1);
    tl_handler_conn = c->conn;
    tl_handler_peer = &c->peer;
    int rc = fn(harg, m->data, m->data_len, resp, err);
    tl_handler_conn = NULL;
    tl_handler_peer = NULL;
    return rc;
}

typedef struct job_t {
    rpc_conn_t *c;
    pconn_rpc_handler_fn fn;
    void *harg;
    uint8_t *buf; /* what m points into */
    rpc_msg_t m;
} job_t;

static void run_query(void *arg)
{
    job_t *j = arg;
    pconn_buf_t resp = {0};
    pconn_error_t err = {0};
    /* Queued before its connection ended: no one could get the answer. */
    if (!atomic_load(&j->c->dead)) {
        int rc = call_handler(j->c, j->fn, j->harg, &j->m, &resp, &err);
        handler_answer(j->c, false, j->m.id, rc, &resp, &err);
    }
    free(j->buf);
    pconn_conn_unref(j->c->conn);
    free(j);
}

/* A query to the handler pool. Takes owned (the payload, when not in the read buffer). */
static void dispatch_query(rpc_conn_t *c, pconn_rpc_handler_fn fn, void *harg, const rpc_msg_t *m,
                           uint8_t *owned)
{
    job_t *j = malloc(sizeof *j);
    uint8_t *buf = owned;
    if (j != NULL && buf == NULL && (buf = malloc(m->name_len + m->data_len + 1)) != NULL) {
        memcpy(buf, m->name, m->name_len);
        memcpy(buf + m->name_len, m->data, m->data_len);
    }
    if (j == NULL || buf == NULL) {
        answer_message(c, true, m->id, PCONN_EREMOTE, "out of memory");
        free(j);
        free(buf);
        return;
    }
    *j = (job_t){c, fn, harg, buf, *m};
    if (buf != owned) {
        j->m.name = (const char *)buf;
        j->m.data = buf + m->name_len;
    }
    /* The job may outlive the reader, so it holds a reference of its own. */
    pconn_conn_ref(c->conn); /* never the first: the reader holds one */
    int rc = pconn__rpc_pool_submit(c->cfg.pool, run_query, j);
    if (rc != PCONN_OK) { /* answered, never dropped: the caller learns at once */
        const char *msg = rc == PCONN_ECLOSED ? "shutting down"
                          : rc == RPC_POOL_BUSY ? "no thread to run the handler" : "out of memory";
        answer_message(c, true, m->id, PCONN_EREMOTE, msg);
        pconn_conn_unref(c->conn); /* never the last, for the same reason */
        free(buf);
        free(j);
    }
}

static void watch_enter(rpc_watch_t *w)
{
    if (atomic_fetch_add(&w->busy, 1) == 0 && atomic_load(&w->sleeping) &&
        atomic_exchange(&w->sleeping, false))
        pconn__wake(w->wake_fd);
}

/* A query, on the reading thread numbered me. Takes owned. false: the role went to
 * another thread while its handler ran here; this thread has answered and must leave. */
static bool serve_query(rpc_conn_t *c, uint64_t me, const rpc_msg_t *m, uint8_t *owned)
{
    void *harg = NULL;
    bool blocking = false;
    pconn_rpc_handler_fn fn = c->cfg.impls != NULL && c->cfg.pool != NULL
                                  ? pconn__rpc_impls_find(c->cfg.impls, m->name, m->name_len,
                                                          m->version, &harg, &blocking)
                                  : NULL;
    if (fn == NULL) {
        char msg[320];
        if (c->cfg.impls == NULL || c->cfg.pool == NULL)
            snprintf(msg, sizeof msg, "this side serves no calls");
        else
            snprintf(msg, sizeof msg, "no implementation of %.*s version %u", (int)m->name_len,
                     m->name, m->version);
        answer_message(c, true, m->id, PCONN_EUNIMPLEMENTED, msg);
        free(owned);
        return true;
    }
    /* Inline while the batch read last is young: a batch of many short handlers must not
     * hold up its last queries, the answers and the heartbeats for long either. */
    int64_t now = pconn__mono_ns();
    bool young = now - c->last_recv_ns < (int64_t)RPC_INLINE_SLOW_MS * 1000000;
    if (c->cfg.watch == NULL || blocking || !young) {
        if (!young)
            flush_answers(c);
        dispatch_query(c, fn, harg, m, owned);
        return true;
    }
    uint8_t *mybuf = c->rbuf; /* m may point into it: it stays with this thread */
    watch_enter(c->cfg.watch);
    atomic_fetch_add(&c->cfg.watch->running, 1);
    atomic_store(&c->inline_since_ns, now);
    tl_inline = c;
    tl_inline_gen = me;
    pconn_buf_t resp = {0};
    pconn_error_t err = {0};
    int rc = call_handler(c, fn, harg, m, &resp, &err);
    tl_inline = NULL;
    pconn__mutex_lock(&c->role_lock);
    bool mine = c->role_gen == me;
    if (mine) { /* else it is the new holder's to say, and the hand-over counted it out */
        atomic_store(&c->inline_since_ns, 0);
        atomic_fetch_sub(&c->cfg.watch->busy, 1);
    }
    pconn__mutex_unlock(&c->role_lock);
    atomic_fetch_sub(&c->cfg.watch->running, 1);
    handler_answer(c, mine, m->id, rc, &resp, &err);
    free(owned);
    if (!mine)
        free(mybuf);
    return mine;
}

/* An answer to a call of ours; its data is taken from owned when it is that (a large
 * answer read straight into its own buffer), else copied. */
static void deliver(rpc_conn_t *c, const rpc_msg_t *m, uint8_t *owned)
{
    uint8_t *data = owned;
    if (owned == NULL || m->data != owned) {
        data = malloc(m->data_len > 0 ? m->data_len : 1);
        if (data != NULL)
            memcpy(data, m->data, m->data_len);
        free(owned);
    }
    _Atomic uint32_t *woken = NULL;
    pconn__mutex_lock(&c->lock);
    for (pending_t **pp = &c->pending; *pp != NULL; pp = &(*pp)->next) {
        pending_t *p = *pp;
        if (p->id != m->id)
            continue;
        *pp = p->next;
        p->done = true;
        if (data == NULL) {
            p->code = PCONN_EIO;
            snprintf(p->msg, sizeof p->msg, "rpc %.200s: out of memory for the answer", c->address);
        } else {
            p->code = (int)m->code;
            p->frame = data;
            p->data_len = m->data_len;
            data = NULL;
        }
        woken = poke_locked(p->waiter);
        break;
    }
    pconn__mutex_unlock(&c->lock);
    wake(woken);
    free(data); /* its caller gave up */
}

static void refuse_big(rpc_conn_t *c, uint64_t big, const uint8_t *head, size_t head_len)
{
    char msg[160];
    snprintf(msg, sizeof msg, "frame of %llu bytes over the limit of %zu bytes",
             (unsigned long long)big, c->cfg.max);
    if (head_len == 9 && head[0] == RPC_QUERY) {
        flush_answers(c);
        send_response(c, pconn__get_u64(head + 1), PCONN_ETOOBIG, msg, strlen(msg));
    } else if (head_len == 9 && head[0] == RPC_RESPONSE) {
        /* The call whose answer it was learns why. */
        rpc_msg_t m = {.id = pconn__get_u64(head + 1), .code = PCONN_ETOOBIG,
                       .data = (const uint8_t *)msg, .data_len = strlen(msg)};
        deliver(c, &m, NULL);
    }
    send_close(c, PCONN_ETOOBIG, msg);
    fail(c, PCONN_EIO, "closed: %s", msg);
}

static void *reader_main(void *arg);

/* What the reading role does with a frame: */
enum {
    FRAME_GO_ON,
    FRAME_END, /* the connection failed (fail() said why) */
    FRAME_LEFT /* a server's reading thread lost the role while a handler ran: it has
                * answered its query and must leave */
};

/* Takes next_frame()'s result rc, its frame and what goes with it. */
static int handle_frame(rpc_conn_t *c, uint64_t me, int rc, rpc_msg_t *m, uint8_t *owned, uint64_t big,
                        const uint8_t *head, size_t head_len, char *why, size_t why_size, int sys_errno)
{
    if (rc == PCONN_ETOOBIG) {
        refuse_big(c, big, head, head_len);
        return FRAME_END;
    }
    if (rc == PCONN_ETIMEDOUT) {
        send_close(c, PCONN_ETIMEDOUT, "heartbeat timeout");
        fail(c, PCONN_EIO, "nothing received for %lld ms: heartbeat timeout",
             (long long)c->cfg.hb_timeout_ms);
        return FRAME_END;
    }
    const char *tls_why = rc == PCONN_EIO ? pconn__tls_why(c->cfg.transport, c->session) : NULL;
    if (tls_why != NULL) {
        fail(c, PCONN_EIO, "connection lost: %s", tls_why);
        return FRAME_END;
    }
    if (rc == PCONN_EIO) {
        if (sys_errno != 0)
            fail(c, PCONN_EIO, "connection lost: %s", strerror(sys_errno));
        else
            fail(c, PCONN_EIO, "connection closed by peer");
        return FRAME_END;
    }
    if (rc == PCONN_OK && m->type == RPC_HELLO) {
        snprintf(why, why_size, "HELLO after the handshake");
        rc = PCONN_EPROTO;
    }
    if (rc != PCONN_OK) {
        free(owned);
        if (rc == PCONN_ENOMEM)
            snprintf(why, why_size, "out of memory");
        send_close(c, PCONN_EPROTO, why);
        fail(c, PCONN_EIO, "protocol error: %s", why);
        return FRAME_END;
    }
    if (m->type == RPC_QUERY)
        return serve_query(c, me, m, owned) ? FRAME_GO_ON : FRAME_LEFT;
    if (m->type == RPC_RESPONSE) {
        deliver(c, m, owned);
        return FRAME_GO_ON;
    }
    if (m->type == RPC_CLOSE) {
        fail(c, PCONN_EIO, "closed by peer: %.*s", (int)(m->data_len < 200 ? m->data_len : 200),
             (const char *)m->data);
        free(owned);
        return FRAME_END;
    }
    free(owned); /* HEARTBEAT: its arrival was all */
    return FRAME_GO_ON;
}

/* The next frame and what the role does with it; RD_* codes come back as they are. */
static int read_one(rpc_conn_t *c, uint64_t me)
{
    rpc_msg_t m;
    uint8_t *owned = NULL, head[9];
    size_t head_len = 0;
    uint64_t big = 0;
    int sys_errno = 0;
    char why[128] = "";
    int rc = next_frame(c, &m, &owned, &big, head, &head_len, why, sizeof why, &sys_errno);
    if (rc <= RD_DEADLINE && rc >= RD_PARK)
        return rc;
    return handle_frame(c, me, rc, &m, owned, big, head, head_len, why, sizeof why, sys_errno);
}

/* The end of the connection's reading thread, as the connection ends (a client's
 * watcher may end while a caller still reads: it touches no reading state). */
static void reader_exit(rpc_conn_t *c)
{
    atomic_store(&c->reader_done, true);
    if (c->on_reader_exit != NULL)
        c->on_reader_exit(c->exit_arg);
    /* The reader's reference goes last: to a closer waiting for it, or dropped here
     * (then maybe the last: rpc_destroy runs on this thread). */
    pconn__mutex_lock(&c->lock);
    c->reader_out = true;
    bool handed = c->close_waiters > 0;
    c->reader_ref_handed = handed;
    pthread_cond_broadcast(&c->reader_cond);
    pconn__mutex_unlock(&c->lock);
    if (!handed)
        pconn_conn_unref(c->conn);
}

/* ---- client: leader/follower --------------------------------------------------- */

#define WATCH_IDLE_MS 20

/* With the role free: picks one waiting caller to take it; the word to wake() once
 * c->lock is dropped, or NULL. */
static _Atomic uint32_t *elect_locked(rpc_conn_t *c)
{
    if (c->role != ROLE_NONE || c->watcher_wanted || c->waiters == 0)
        return NULL;
    for (pending_t *p = c->pending; p != NULL; p = p->next) {
        if (p->waiting)
            return poke_locked(p->waiter);
    }
    return NULL;
}

/* The client's watcher thread: reads while no caller waits for an answer (after
 * WATCH_IDLE_MS without calls, or when a frame is too large for a caller), lets go when
 * one does. */
static void *watch_main(void *arg)
{
    rpc_conn_t *c = arg;
    tl_reader = c;
    pconn__mutex_lock(&c->lock);
    while (!c->failed) {
        int64_t now = pconn__mono_ns();
        int64_t idle_at = c->last_call_ns + (int64_t)WATCH_IDLE_MS * 1000000;
        bool quiet = c->waiters == 0 && now >= idle_at;
        if (c->role == ROLE_NONE && (c->watcher_wanted || quiet)) {
            c->role = ROLE_WATCHER;
            c->watcher_wanted = false;
            c->kicked = false;
            pconn__mutex_unlock(&c->lock);
            c->watching = true;
            int a;
            while ((a = read_one(c, 0)) == FRAME_GO_ON)
                ;
            c->watching = false;
            pconn__mutex_lock(&c->lock);
            c->role = ROLE_NONE;
            c->kicked = false;
            pconn__wake_drain(c->kick_fd);
            _Atomic uint32_t *next = elect_locked(c);
            pconn__mutex_unlock(&c->lock);
            wake(next);
            pconn__mutex_lock(&c->lock);
            if (a == FRAME_END)
                break;
            continue;
        }
        int64_t until = c->waiters == 0 && c->role == ROLE_NONE && idle_at > now
                            ? idle_at : now + (int64_t)WATCH_IDLE_MS * 1000000;
        pconn__cond_wait_until(&c->watch_cond, &c->lock, until);
    }
    pconn__mutex_unlock(&c->lock);
    reader_exit(c);
    tl_reader = NULL;
    return NULL;
}

/* A whole frame that fits is in the read buffer: reading it needs no wait. */
static bool frame_buffered(const rpc_conn_t *c)
{
    size_t have = c->rlen - c->rpos;
    if (have < 8)
        return false;
    uint64_t n = pconn__get_u64(c->rbuf + c->rpos);
    return n > 0 && n <= c->cfg.max && n <= have - 8;
}

static bool batch_done_locked(const pending_t *ps, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (ps[i].id != 0 && !ps[i].done)
            return false;
    return true;
}

/* A caller reads for everyone until the answers of its batch ps[0..n) are in (0), its
 * deadline passes (RD_DEADLINE), a frame only the watcher may read is next (RD_BIG),
 * or the connection ends (FRAME_END). */
static int lead(rpc_conn_t *c, const pending_t *ps, size_t n, int64_t deadline, bool *answers_left)
{
    c->lead_deadline_ns = deadline == INT64_MAX ? 0 : deadline;
    c->lead_late_read = false;
    int a = FRAME_GO_ON;
    for (;;) {
        pconn__mutex_lock(&c->lock);
        bool done = batch_done_locked(ps, n);
        pconn__mutex_unlock(&c->lock);
        /* Done, it still hands out the answers already read: no one wakes to do it. */
        if ((done && !frame_buffered(c)) || (a = read_one(c, 0)) != FRAME_GO_ON)
            break;
    }
    c->lead_deadline_ns = 0;
    *answers_left = c->nanswers > 0; /* answers to the peer's queries: the watcher sends them */
    return a;
}

/* What handoff() did. */
enum { HANDED, NOT_HELD, NOT_HANDED };

/* Hands the reading role on when the handler on the reading thread still is the one
 * that started at since_ns (the watchdog's view), or (since_ns 0) when the role still is
 * number gen (a handler's own call back). */
static int handoff(rpc_conn_t *c, int64_t since_ns, uint64_t gen)
{
    uint8_t *nb = malloc(READ_BUF);
    if (nb == NULL)
        return NOT_HANDED;
    pconn__mutex_lock(&c->role_lock);
    int64_t now_since = atomic_load(&c->inline_since_ns);
    bool held = now_since != 0 && (since_ns != 0 ? now_since == since_ns : c->role_gen == gen);
    pconn__mutex_lock(&c->lock);
    bool ok = held && !c->failed;
    pconn__mutex_unlock(&c->lock);
    if (ok && c->reader_count != NULL && !c->reader_count(c->exit_arg, 1))
        ok = false;
    if (ok) {
        /* The unread bytes go with the role; the bytes the handler reads stay. */
        uint8_t *old = c->rbuf;
        size_t rpos = c->rpos, rlen = c->rlen;
        memcpy(nb, old + rpos, rlen - rpos);
        c->rbuf = nb;
        c->rpos = 0;
        c->rlen = rlen - rpos;
        c->role_gen++;
        atomic_store(&c->inline_since_ns, 0); /* the new holder runs no handler yet */
        atomic_fetch_sub(&c->cfg.watch->busy, 1); /* nothing more to hand off there */
        pconn_conn_ref(c->conn); /* the new thread's; never the first: the old one holds one */
        pthread_t t;
        /* The default stack, as handlers run on it. */
        if (pconn__thread_start(&t, reader_main, c, 0, true) == 0) {
            nb = NULL;
        } else {
            c->role_gen--;
            atomic_store(&c->inline_since_ns, now_since);
            atomic_fetch_add(&c->cfg.watch->busy, 1);
            c->rbuf = old;
            c->rpos = rpos;
            c->rlen = rlen;
            pconn_conn_unref(c->conn);
            if (c->reader_count != NULL)
                c->reader_count(c->exit_arg, -1);
            ok = false;
        }
    }
    pconn__mutex_unlock(&c->role_lock);
    free(nb);
    return ok ? HANDED : held ? NOT_HANDED : NOT_HELD;
}

bool pconn__rpc_conn_handoff(pconn_conn_t *conn, int64_t since_ns)
{
    return handoff(pconn_conn_impl(conn), since_ns, 0) == HANDED;
}

int64_t pconn__rpc_conn_inline_since(pconn_conn_t *conn)
{
    return atomic_load(&((rpc_conn_t *)pconn_conn_impl(conn))->inline_since_ns);
}

static void *reader_main(void *arg)
{
    rpc_conn_t *c = arg;
    tl_reader = c;
    pconn__mutex_lock(&c->role_lock);
    uint64_t me = c->role_gen;
    pconn__mutex_unlock(&c->role_lock);
    int a;
    while ((a = read_one(c, me)) == FRAME_GO_ON)
        ;
    if (a == RD_PARK) {
        /* Idle: the role and this thread's reference go to the server's poller. */
        tl_reader = NULL;
        c->cfg.park(c->exit_arg, c->conn);
        return NULL;
    }
    if (a == FRAME_LEFT) {
        /* The role went on without this thread: it leaves with its reference. */
        void (*on_exit)(void *) = c->on_reader_exit;
        void *exit_arg = c->exit_arg;
        tl_reader = NULL;
        pconn_conn_unref(c->conn);
        if (on_exit != NULL)
            on_exit(exit_arg);
        return NULL;
    }
    free_answers(c); /* the connection failed: they cannot go out */
    reader_exit(c);
    tl_reader = NULL;
    return NULL;
}

/* ---- server: parked connections ------------------------------------------------ */

/* The reading role of a parked connection ends, the connection having failed. */
static int parked_ended(rpc_conn_t *c)
{
    free_answers(c);
    reader_exit(c);
    return RPC_ENDED;
}

int pconn__rpc_conn_parked(pconn_conn_t *conn, bool readable, int64_t *next_ns)
{
    rpc_conn_t *c = pconn_conn_impl(conn);
    int rc = atomic_load(&c->dead) ? PCONN_EIO : PCONN_OK, sys_errno = 0;
    if (c->rpos == c->rlen)
        c->rpos = c->rlen = 0;
    while (rc == PCONN_OK && readable && c->rlen < READ_BUF) {
        ssize_t r = raw_read(c, c->rbuf + c->rlen, READ_BUF - c->rlen);
        if (r > 0) {
            c->rlen += (size_t)r;
            c->last_recv_ns = pconn__mono_ns();
        } else if (r < 0 && errno == EAGAIN) {
            break;
        } else if (r <= 0 && !(r < 0 && errno == EINTR)) {
            sys_errno = r < 0 ? errno : 0;
            rc = PCONN_EIO;
        }
    }
    /* Heartbeats are all a parked connection takes in; anything else wants a thread. */
    while (c->rlen - c->rpos >= 9 && pconn__get_u64(c->rbuf + c->rpos) == 1 && c->rbuf[c->rpos + 8] == RPC_HEARTBEAT)
        c->rpos += 9;
    if (c->rpos == c->rlen)
        c->rpos = c->rlen = 0;
    if (rc == PCONN_OK && (c->rlen > 0 || (c->cfg.transport != NULL && c->cfg.transport->pending != NULL &&
                                           c->cfg.transport->pending(c->session) > 0)))
        return RPC_UNPARK;
    int64_t now = pconn__mono_ns(), dead_at = after_ms(c->last_recv_ns, c->cfg.hb_timeout_ms);
    if (rc == PCONN_OK && now >= dead_at)
        rc = PCONN_ETIMEDOUT;
    if (rc == PCONN_OK && now >= c->next_send_ns) {
        uint8_t h[9];
        frame_head(h, RPC_HEARTBEAT, 0, 0);
        if (write_frame(c, h, sizeof h, NULL, 0, 0) == WF_TIMEOUT_MIDFRAME)
            rc = PCONN_EIO;
        c->next_send_ns = after_ms(now, c->cfg.hb_every_ms);
    }
    if (rc != PCONN_OK) {
        char why[8] = "";
        handle_frame(c, 0, rc, NULL, NULL, 0, NULL, 0, why, sizeof why, sys_errno); /* fails it */
        return parked_ended(c);
    }
    *next_ns = dead_at < c->next_send_ns ? dead_at : c->next_send_ns;
    return RPC_PARKED;
}

void pconn__rpc_conn_unpark(pconn_conn_t *conn)
{
    rpc_conn_t *c = pconn_conn_impl(conn);
    pthread_t t;
    /* The default stack, as handlers run on it. */
    if (pconn__thread_start(&t, reader_main, c, 0, true) == 0)
        return;
    fail(c, PCONN_ENOMEM, "no thread to read the connection");
    parked_ended(c);
}

void pconn__rpc_conn_parked_end(pconn_conn_t *conn)
{
    pconn_conn_close(conn);
    parked_ended(pconn_conn_impl(conn));
}

/* ---- the connection type ------------------------------------------------------- */

/* The owner's release (pconn__conn_release: the pconn's worker, the server) waits, once
 * the connection is closed, for the reader to end (at once after the shutdown) and takes
 * over the reader's reference if the reader handed it over. The owner holds one of its
 * own, so dropping it is never the last: the memory goes with the owner's unref, not
 * later on a thread nobody waits for. Not on the reader itself. */
static void wait_reader_out(void *impl)
{
    rpc_conn_t *c = impl;
    if (!c->reader_started || tl_reader == c)
        return;
    pconn__mutex_lock(&c->lock);
    c->close_waiters++;
    while (!c->reader_out)
        pthread_cond_wait(&c->reader_cond, &c->lock);
    c->close_waiters--;
    bool take = c->reader_ref_handed;
    c->reader_ref_handed = false;
    pconn__mutex_unlock(&c->lock);
    if (take)
        pconn_conn_unref(c->conn);
}

static void rpc_close(void *impl)
{
    rpc_conn_t *c = impl;
    /* Closed here because the peer hung up (the pconn saw it first)? Then say so. */
    struct pollfd pfd = {.fd = c->fd, .events = POLLRDHUP};
    char msg[200];
    if (poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR))) {
        snprintf(msg, sizeof msg, "rpc %.120s: connection closed by peer", c->address);
        fail_calls(c, PCONN_EIO, msg);
    } else {
        snprintf(msg, sizeof msg, "rpc %.120s: connection closed", c->address);
        fail_calls(c, PCONN_ECLOSED, msg);
    }
    shutdown(c->fd, SHUT_RDWR); /* the reader and any writer return at once */
}

/* After the last reference. The reader holds one of its own until its very end, so it
 * has finished here; when its reference was the last, this runs on it: it lets itself
 * go instead of joining itself. */
static void rpc_destroy(void *impl)
{
    rpc_conn_t *c = impl;
    shutdown(c->fd, SHUT_RDWR);
    if (c->reader_started && c->reader_detached)
        ; /* not ours to join: its owner's thread */
    else if (c->reader_started && tl_reader == c) /* the last reference was its own */
        pthread_detach(c->reader);
    else if (c->reader_started)
        pthread_join(c->reader, NULL);
    pthread_cond_destroy(&c->reader_cond);
    free_answers(c); /* queued by a client's reading caller when the connection ended */
    pthread_mutex_destroy(&c->role_lock);
    pthread_cond_destroy(&c->watch_cond);
    if (c->kick_fd >= 0)
        close(c->kick_fd);
    pconn__rpc_pool_unref(c->cfg.pool);
    pconn_rpc_impls_free(c->cfg.impls); /* the connection's reference */
    pconn__rpc_stats_unref(c->cfg.stats);
    if (c->session != NULL)
        c->cfg.transport->close(c->session);
    close(c->fd);
    pthread_mutex_destroy(&c->wlock);
    pthread_mutex_destroy(&c->lock);
    free(c->rbuf);
    free(c);
}

static int rpc_fd(void *impl)
{
    return ((rpc_conn_t *)impl)->fd;
}

static const pconn_conn_ops_t rpc_ops = {rpc_close, rpc_destroy, rpc_fd};

bool pconn__rpc_conn_transport(const pconn_conn_t *conn, const pconn_transport_t **t, void **session)
{
    if (conn == NULL || pconn__conn_ops(conn) != &rpc_ops)
        return false;
    const rpc_conn_t *c = pconn_conn_impl(conn);
    *t = c->cfg.transport;
    *session = c->session;
    return true;
}

bool pconn__rpc_conn_done(pconn_conn_t *conn)
{
    return atomic_load(&((rpc_conn_t *)pconn_conn_impl(conn))->reader_done);
}

/* A plaintext client at a TLS server: told so in its own protocol, a CLOSE frame in
 * plaintext, so that its handshake says why instead of "closed by peer". What it sent
 * is read first, so that closing sends FIN, not a reset that could discard the frame. */
static void refuse_plaintext(rpc_conn_t *c)
{
    static const char msg[] = "this server requires TLS";
    uint8_t f[13 + sizeof msg - 1], junk[512];
    frame_head(f, RPC_CLOSE, 4, sizeof msg - 1);
    pconn__put_u32(f + 9, PCONN_EHANDSHAKE);
    memcpy(f + 13, msg, sizeof msg - 1);
    while (recv(c->fd, junk, sizeof junk, MSG_DONTWAIT) > 0)
        ;
    (void)send(c->fd, f, sizeof f, MSG_NOSIGNAL | MSG_DONTWAIT);
}

/* ---- handshake -----------------------------------------------------------------
 * A state machine that never blocks, so that one thread can drive many: a server's
 * accepting thread drives all its handshakes (no thread per peer before its HELLO is
 * in), a client's connect drives its one with hs_run(). Each side sends its HELLO
 * first, then reads the peer's; the HELLO is read exactly (8 bytes, then the payload),
 * so that what the peer sends after it stays in the socket (or the transport's buffer)
 * for the reader. */

enum { HS_TRANSPORT, HS_SEND, HS_RECV, HS_DONE };

static const uint8_t our_hello[16] = {0, 0, 0, 0, 0, 0, 0, 8, RPC_HELLO, 0x50, 0x43, 0x4E, 0x31, 1, 0, RPC_VERSION};

/* The peer's HELLO frame, complete in c->hs_buf: PCONN_OK, or why it is refused. */
static int hs_check(rpc_conn_t *c, uint64_t n, pconn_error_t *err)
{
    rpc_msg_t m = {0};
    char why[128] = "";
    int rc = pconn__rpc_decode(c->hs_buf + 8, (size_t)n, &m, why, sizeof why);
    if (rc == PCONN_OK && m.type == RPC_CLOSE) { /* refused: say why, as the peer said */
        pconn_error_set(err, PCONN_EHANDSHAKE, 0, "rpc %s: handshake: refused by the peer: %.*s", c->address,
                        (int)(m.data_len < 100 ? m.data_len : 100), (const char *)m.data);
        return PCONN_EHANDSHAKE;
    }
    if (rc == PCONN_OK && m.type != RPC_HELLO) {
        snprintf(why, sizeof why, "first frame is not a HELLO (type %u)", (unsigned)m.type);
        rc = PCONN_EPROTO;
    }
    if (rc == PCONN_OK && m.magic != RPC_MAGIC) {
        snprintf(why, sizeof why, "bad magic number 0x%08x (want 0x%08x)", m.magic, RPC_MAGIC);
        rc = PCONN_EPROTO;
    }
    if (rc == PCONN_OK && pconn__rpc_pick_version(&m) == 0) {
        int k = snprintf(why, sizeof why, "no common protocol version: ours [%d], theirs [", RPC_VERSION);
        for (unsigned i = 0; i < m.nversions && k > 0 && (size_t)k < sizeof why - 8; i++)
            k += snprintf(why + k, sizeof why - (size_t)k, i ? " %u" : "%u", m.versions[i]);
        if (k > 0 && (size_t)k < sizeof why - 1)
            snprintf(why + k, sizeof why - (size_t)k, "]");
        rc = PCONN_EPROTO;
    }
    if (rc == PCONN_OK)
        return PCONN_OK;
    send_close(c, PCONN_EHANDSHAKE, why);
    pconn_error_set(err, PCONN_EHANDSHAKE, 0, "rpc %s: handshake: %s", c->address, why);
    return PCONN_EHANDSHAKE;
}

/* The peer's frame claims n bytes, which no HELLO has. */
static int hs_not_hello(rpc_conn_t *c, uint64_t n, pconn_error_t *err)
{
    char why[128];
    if (c->cfg.transport == NULL && ((n >> 56) == 0x15 || (n >> 56) == 0x16) && ((n >> 48) & 0xff) == 0x03)
        snprintf(why, sizeof why, "the peer answered in TLS: it is a TLS server (set tls)");
    else
        snprintf(why, sizeof why, "first frame is not a HELLO (length %llu)", (unsigned long long)n);
    send_close(c, PCONN_EHANDSHAKE, why);
    pconn_error_set(err, PCONN_EHANDSHAKE, 0, "rpc %s: handshake: %s", c->address, why);
    return PCONN_EHANDSHAKE;
}

/* The server's authorize callback, once the peer is known: PCONN_OK, or the peer is
 * told why it is refused. */
static int hs_authorize(rpc_conn_t *c, pconn_error_t *err)
{
    pconn_error_t why = {0};
    int arc = c->cfg.authorize(&c->peer, c->cfg.authorize_arg, &why);
    if (arc == PCONN_OK)
        return PCONN_OK;
    char msg[300];
    snprintf(msg, sizeof msg, "not authorized: %s", why.message[0] != '\0' ? why.message : pconn_strerror(arc));
    send_close(c, PCONN_EHANDSHAKE, msg);
    char sink[64]; /* the peer's HELLO, if here: closing over it would reset */
    (void)!recv(c->fd, sink, sizeof sink, MSG_DONTWAIT);
    pconn_error_set(err, PCONN_EHANDSHAKE, 0, "rpc %s: %s", c->address, msg);
    return PCONN_EHANDSHAKE;
}

/* Takes the handshake as far as it goes without waiting. PCONN_OK when it is done;
 * RPC_HS_AGAIN with *events, what to poll() c->fd for before the next step; else an error
 * with err filled (the connection is to be dropped). */
static int hs_step(rpc_conn_t *c, short *events, pconn_error_t *err)
{
    const pconn_transport_t *t = c->cfg.transport;
    if (c->hs_state == HS_TRANSPORT) {
        while (t != NULL && t->handshake != NULL) {
            pconn_error_t local = {0};
            errno = 0;
            if (t->handshake(c->session, &local) == 0)
                break;
            if (errno == EAGAIN) {
                *events = transport_wants(c, 0);
                return RPC_HS_AGAIN;
            }
            pconn_error_set(err, PCONN_EHANDSHAKE, local.sys_errno, "rpc %s: transport: %s", c->address,
                            local.message[0] != '\0' ? local.message : "handshake failed");
            if (c->cfg.server && strstr(local.message, "plaintext peer") != NULL)
                refuse_plaintext(c);
            return PCONN_EHANDSHAKE;
        }
        if (t != NULL && t->identity != NULL)
            t->identity(c->session, &c->peer);
        if (c->cfg.authorize != NULL && hs_authorize(c, err) != PCONN_OK)
            return PCONN_EHANDSHAKE;
        c->hs_state = HS_SEND;
    }
    while (c->hs_state == HS_SEND) {
        ssize_t n = raw_write(c, our_hello + c->hs_done, sizeof our_hello - c->hs_done);
        if (n > 0 && (c->hs_done += (size_t)n) == sizeof our_hello) {
            c->hs_state = HS_RECV;
            c->hs_done = 0;
        }
        if (n > 0 || (n < 0 && errno == EINTR))
            continue;
        if (n < 0 && errno == EAGAIN) {
            *events = transport_wants(c, 1);
            return RPC_HS_AGAIN;
        }
        int e = errno;
        /* A TLS 1.3 server refuses a client certificate after the client's handshake is
         * done: its alert is waiting to be read, and says why. */
        uint8_t alert[64];
        const char *tls_why = pconn__tls_why(t, c->session);
        if (tls_why != NULL && raw_read(c, alert, sizeof alert) < 0)
            tls_why = pconn__tls_why(t, c->session);
        pconn_error_set(err, PCONN_EHANDSHAKE, e, "rpc %s: handshake: %s", c->address,
                        tls_why != NULL ? tls_why : "write");
        return PCONN_EHANDSHAKE;
    }
    while (c->hs_state == HS_RECV) {
        size_t want = 8;
        if (c->hs_done >= 8) {
            uint64_t n = pconn__get_u64(c->hs_buf);
            if (n == 0 || n > RPC_HELLO_MAX)
                return hs_not_hello(c, n, err);
            if (c->hs_done == 8 + n) {
                c->hs_state = HS_DONE;
                return hs_check(c, n, err);
            }
            want = 8 + (size_t)n;
        }
        ssize_t r = raw_read(c, c->hs_buf + c->hs_done, want - c->hs_done);
        if (r > 0) {
            c->hs_done += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN) {
            *events = transport_wants(c, 0);
            return RPC_HS_AGAIN;
        }
        int e = r < 0 ? errno : 0;
        const char *tls_why = pconn__tls_why(t, c->session);
        pconn_error_set(err, PCONN_EHANDSHAKE, e, "rpc %s: handshake: %s", c->address,
                        tls_why != NULL ? tls_why : "connection closed by peer");
        return PCONN_EHANDSHAKE;
    }
    return PCONN_OK;
}

/* The handshake's deadline passed: the peer is told, if it can be without waiting. */
static int hs_expired(rpc_conn_t *c, pconn_error_t *err)
{
    if (c->hs_state == HS_TRANSPORT) {
        pconn_error_set(err, PCONN_EHANDSHAKE, 0, "rpc %s: transport: handshake timed out", c->address);
        return PCONN_EHANDSHAKE;
    }
    send_close(c, PCONN_EHANDSHAKE, "handshake timed out");
    pconn_error_set(err, PCONN_EHANDSHAKE, 0, "rpc %s: handshake timed out", c->address);
    return PCONN_EHANDSHAKE;
}

/* The whole handshake on the calling thread, by deadline_ns; it gives up (PCONN_ECLOSED)
 * when cancel_fd (-1: none) turns readable and cancelled() (NULL: always) says so. */
static int hs_run(rpc_conn_t *c, int64_t deadline_ns, int cancel_fd, bool (*cancelled)(void),
                  pconn_error_t *err)
{
    short events = 0;
    int rc;
    while ((rc = hs_step(c, &events, err)) == RPC_HS_AGAIN) {
        for (;;) {
            if (pconn__mono_ns() >= deadline_ns)
                return hs_expired(c, err);
            struct pollfd pfd[2] = {{.fd = c->fd, .events = events}, {.fd = cancel_fd, .events = POLLIN}};
            int prc = poll(pfd, cancel_fd >= 0 ? 2 : 1, pconn__poll_timeout_ms(deadline_ns));
            if (prc < 0 && errno != EINTR) {
                pconn_error_set(err, PCONN_EHANDSHAKE, errno, "rpc %s: handshake: poll", c->address);
                return PCONN_EHANDSHAKE;
            }
            if (prc > 0 && cancel_fd >= 0 && pfd[1].revents != 0) {
                if (cancelled == NULL || cancelled()) { /* pconn_close() (defect 4) */
                    pconn_error_set(err, PCONN_ECLOSED, 0, "rpc %s: %s interrupted by close", c->address,
                                    c->hs_state == HS_TRANSPORT ? "transport: handshake" : "handshake:");
                    return PCONN_ECLOSED;
                }
                pconn__wake_drain(cancel_fd); /* a kick: its owner re-checks its flags later */
            }
            if (prc > 0 && pfd[0].revents != 0)
                break;
        }
    }
    return rc;
}

/* ---- opening ---------------------------------------------------------------------- */

/* A connection around a connected fd (taken over: closed on failure too), with its
 * transport session; no I/O yet. */
static int conn_new(int fd, const char *address, const rpc_config_t *cfg, rpc_conn_t **out,
                    pconn_error_t *err)
{
    *out = NULL;
    rpc_conn_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        close(fd);
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "rpc %s", address);
        return PCONN_ENOMEM;
    }
    c->fd = fd;
    c->kick_fd = -1;
    c->cfg = *cfg;
    pconn__rpc_pool_ref(c->cfg.pool);   /* all live as long as the connection: its */
    pconn__rpc_impls_ref(c->cfg.impls); /* reader and jobs use them (issue 9, defect 2) */
    pconn__rpc_stats_ref(c->cfg.stats);
    pconn__strcpy(c->address, sizeof c->address, address);
    atomic_init(&c->reader_done, false);
    atomic_init(&c->dead, false);
    pthread_mutex_init(&c->wlock, NULL);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->reader_cond, NULL);
    pthread_mutex_init(&c->role_lock, NULL);
    pconn__cond_init(&c->watch_cond);
    atomic_init(&c->inline_since_ns, 0);
    c->reader_count = cfg->reader_count;
    c->conn = pconn_conn_new(&rpc_ops, c);
    if (c->conn == NULL) {
        rpc_destroy(c);
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "rpc %s", address);
        return PCONN_ENOMEM;
    }
    pconn__conn_set_address(c->conn, address);
    pconn__conn_set_quiesce(c->conn, wait_reader_out);
    c->peer.address = c->address;
    /* Every wait is a poll() with a deadline (and a way to be interrupted), never a
     * blocking call. */
    int rc = PCONN_OK;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
        pconn_error_set(err, PCONN_EIO, errno, "rpc %s: fcntl", address);
        rc = PCONN_EIO;
    }
    const pconn_transport_t *t = c->cfg.transport;
    pconn_error_t local = {0};
    if (rc == PCONN_OK && t != NULL && (c->session = t->open(t->arg, fd, c->address, c->cfg.server, &local)) == NULL) {
        pconn_error_set(err, PCONN_EHANDSHAKE, local.sys_errno, "rpc %s: transport: %s", c->address,
                        local.message[0] != '\0' ? local.message : "open failed");
        rc = PCONN_EHANDSHAKE;
    }
    if (rc != PCONN_OK) {
        pconn_conn_close(c->conn);
        pconn_conn_unref(c->conn);
        return rc;
    }
    *out = c;
    return PCONN_OK;
}

/* After the handshake: the read buffer, the heartbeat clocks, and the reading thread's
 * own reference, dropped as its last act: it never takes one from a count that may
 * have reached zero (issue 9, defect 1). */
static int reading_prepare(rpc_conn_t *c, pconn_error_t *err)
{
    if ((c->rbuf = malloc(READ_BUF)) == NULL) {
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "rpc %s", c->address);
        return PCONN_ENOMEM;
    }
    pconn_conn_ref(c->conn);
    c->last_recv_ns = pconn__mono_ns();
    c->next_send_ns = after_ms(c->last_recv_ns, c->cfg.hb_every_ms);
    return PCONN_OK;
}

int pconn__rpc_conn_open(int fd, const char *address, const rpc_config_t *cfg, int64_t deadline_ns,
                         int cancel_fd, bool (*cancelled)(void), pconn_conn_t **out, pconn_error_t *err)
{
    *out = NULL;
    rpc_conn_t *c;
    int rc = conn_new(fd, address, cfg, &c, err);
    if (rc != PCONN_OK)
        return rc;
    rc = hs_run(c, deadline_ns, cancel_fd, cancelled, err);
    if (rc == PCONN_OK)
        rc = reading_prepare(c, err);
    if (rc == PCONN_OK) {
        if ((c->kick_fd = pconn__wake_fd_new()) >= 0)
            c->reader_started = pconn__thread_start(&c->reader, watch_main, c, READER_STACK, false) == 0;
        if (!c->reader_started) {
            pconn_conn_unref(c->conn);
            pconn_error_set(err, PCONN_ENOMEM, EAGAIN, "rpc %s: reader thread", address);
            rc = PCONN_ENOMEM;
        }
    }
    if (rc != PCONN_OK) {
        pconn_conn_close(c->conn);
        pconn_conn_unref(c->conn);
        return rc;
    }
    *out = c->conn;
    return PCONN_OK;
}

int pconn__rpc_conn_accept(int fd, const char *address, const rpc_config_t *cfg, pconn_conn_t **out,
                           pconn_error_t *err)
{
    rpc_conn_t *c;
    int rc = conn_new(fd, address, cfg, &c, err);
    *out = rc == PCONN_OK ? c->conn : NULL;
    return rc;
}

int pconn__rpc_conn_step(pconn_conn_t *conn, short *events, pconn_error_t *err)
{
    return hs_step(pconn_conn_impl(conn), events, err);
}

int pconn__rpc_conn_expired(pconn_conn_t *conn, pconn_error_t *err)
{
    return hs_expired(pconn_conn_impl(conn), err);
}

int pconn__rpc_conn_serve(pconn_conn_t *conn, void (*on_reader_exit)(void *), void *exit_arg,
                          pconn_error_t *err)
{
    rpc_conn_t *c = pconn_conn_impl(conn);
    int rc = reading_prepare(c, err);
    if (rc != PCONN_OK)
        return rc;
    c->on_reader_exit = on_reader_exit;
    c->exit_arg = exit_arg;
    /* The default stack, as handlers run on it. */
    c->reader_started = c->reader_detached = true;
    if (pconn__thread_start(&c->reader, reader_main, c, 0, true) != 0) {
        c->reader_started = c->reader_detached = false;
        c->on_reader_exit = NULL;
        pconn_conn_unref(c->conn);
        pconn_error_set(err, PCONN_ENOMEM, EAGAIN, "rpc %s: reader thread", c->address);
        return PCONN_ENOMEM;
    }
    return PCONN_OK;
}

/* ---- calls --------------------------------------------------------------------- */

static void unlink_pending(rpc_conn_t *c, pending_t *p)
{
    for (pending_t **pp = &c->pending; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    }
}

/* Takes a call that will not wait for its answer off the list; an answer that already
 * came is freed. */
static void forget(rpc_conn_t *c, pending_t *p)
{
    pconn__mutex_lock(&c->lock);
    unlink_pending(c, p);
    pconn__mutex_unlock(&c->lock);
    free(p->frame);
    p->frame = NULL;
}

static int local_error(pconn_error_t *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int local_error(pconn_error_t *err, int code, const char *fmt, ...)
{
    if (err != NULL) {
        va_list ap;
        va_start(ap, fmt);
        err->code = code;
        err->sys_errno = 0;
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return code;
}

#define QUERY_HEAD_MAX (9 + 8 + 4 + 2 + RPC_NAME_MAX)

/* The outcome of a finished call into call->resp/status/err; frees what is not handed
 * over. */
static void finish_call(pconn_rpc_call_t *call, pending_t *p)
{
    if (p->frame == NULL) { /* failed locally: the message is in p->msg */
        local_error(&call->err, p->code, "%s", p->msg);
        call->status = p->code;
        return;
    }
    if (p->code == RPC_CODE_OK) {
        call->resp = (pconn_buf_t){.data = p->frame, .len = p->data_len, .cap = p->data_len};
        call->status = PCONN_OK;
        call->err = (pconn_error_t){0};
        return;
    }
    int code = p->code == PCONN_EUNIMPLEMENTED || p->code == PCONN_ETOOBIG ? p->code : PCONN_EREMOTE;
    int n = (int)(p->data_len < 255 ? p->data_len : 255);
    local_error(&call->err, code, "%.*s", n, (const char *)p->frame);
    call->status = code;
    free(p->frame);
}

/* Checks one call; PCONN_OK, or its status and err set. */
static int check_call(const rpc_conn_t *c, pconn_rpc_call_t *call)
{
    call->resp = (pconn_buf_t){0};
    call->err = (pconn_error_t){0};
    if (call->name == NULL || call->version < 0 || (call->req == NULL && call->req_len > 0))
        return call->status = local_error(&call->err, PCONN_EINVAL, "pconn_rpc_call: bad argument");
    size_t name_len = strlen(call->name);
    if (name_len == 0 || name_len > RPC_NAME_MAX)
        return call->status = local_error(&call->err, PCONN_EINVAL,
                                           "pconn_rpc_call: name of %zu bytes (1-255)", name_len);
    if (call->req_len > c->cfg.max - 1 - (8 + 4 + 2 + name_len))
        return call->status = local_error(&call->err, PCONN_ETOOBIG,
                                           "rpc %s: request of %zu bytes over the limit of %zu bytes",
                                           c->address, call->req_len, c->cfg.max);
    return PCONN_OK;
}

static void run_calls_wait(rpc_conn_t *c, pconn_rpc_call_t *calls, size_t n,
                           int64_t timeout_ms, pending_t *ps, waiter_t *me,
                           struct iovec *iov, int iovcnt, int64_t deadline);

/* Sends every valid call of calls[0..n) in one write where they fit, then waits for all
 * their answers until the shared deadline. ps and heads have room for n. */
static void run_calls(rpc_conn_t *c, pconn_rpc_call_t *calls, size_t n,
                      int64_t timeout_ms, pending_t *ps, uint8_t (*heads)[QUERY_HEAD_MAX],
                      struct iovec *iov)
{
    int64_t deadline = pconn__deadline_ns(timeout_ms);
    if (tl_inline == c) {
        /* A handler on the reading thread calls its peer back: the answer comes in on
         * this connection, so someone else must read it. */
        if (handoff(c, 0, tl_inline_gen) == NOT_HANDED && !atomic_load(&c->dead)) {
            for (size_t i = 0; i < n; i++) {
                calls[i].resp = (pconn_buf_t){0};
                calls[i].status = local_error(&calls[i].err, PCONN_ENOMEM,
                                              "rpc %s: no thread to read the answer (a handler on the "
                                              "reading thread calls its peer)", c->address);
            }
            return;
        }
        tl_inline = NULL;
    }
    size_t live = 0;
    for (size_t i = 0; i < n; i++) {
        ps[i] = (pending_t){0};
        if (check_call(c, &calls[i]) == PCONN_OK) {
            ps[i].id = 1; /* marks it as sent below */
            live++;
        }
    }
    if (live == 0)
        return;
    pconn__mutex_lock(&c->lock);
    if (c->failed) {
        for (size_t i = 0; i < n; i++)
            if (ps[i].id != 0)
                calls[i].status = local_error(&calls[i].err, c->fail_code, "%s", c->fail_msg);
        pconn__mutex_unlock(&c->lock);
        return;
    }
    int iovcnt = 0;
    waiter_t me = {.asleep = false}; /* the batch's caller */
    atomic_init(&me.word, 0);
    for (size_t i = 0; i < n; i++) {
        if (ps[i].id == 0)
            continue;
        ps[i].waiter = &me;
        ps[i].id = ++c->next_id;
        ps[i].next = c->pending;
        c->pending = &ps[i];
        size_t name_len = strlen(calls[i].name), fixed = 8 + 4 + 2 + name_len;
        uint8_t *h = heads[i];
        frame_head(h, RPC_QUERY, fixed, calls[i].req_len);
        pconn__put_u64(h + 9, ps[i].id);
        pconn__put_u32(h + 17, (uint32_t)calls[i].version);
        pconn__put_u16(h + 21, (uint16_t)name_len);
        memcpy(h + 23, calls[i].name, name_len);
        iov[iovcnt++] = (struct iovec){h, 9 + fixed};
        iov[iovcnt++] = (struct iovec){(void *)calls[i].req, calls[i].req_len};
    }
    pconn__mutex_unlock(&c->lock);

    rpc_stats_t *st = c->cfg.stats;
    int64_t t0 = pconn__mono_ns();
    if (st != NULL) {
        size_t out = 0;
        for (int k = 0; k < iovcnt; k++)
            out += iov[k].iov_len;
        atomic_fetch_add(&st->calls, live);
        atomic_fetch_add(&st->in_flight, live);
        atomic_fetch_add(&st->bytes_out, out);
    }
    run_calls_wait(c, calls, n, timeout_ms, ps, &me, iov, iovcnt, deadline);
    if (st != NULL) {
        int64_t us = (pconn__mono_ns() - t0) / 1000;
        int bucket = 0;
        while (bucket < RPC_LAT_BUCKETS - 1 && ((int64_t)1 << bucket) <= us)
            bucket++;
        atomic_fetch_sub(&st->in_flight, live);
        for (size_t i = 0; i < n; i++) {
            if (ps[i].id == 0)
                continue;
            if (calls[i].status == PCONN_OK) {
                atomic_fetch_add(&st->answered, 1);
                atomic_fetch_add(&st->latency[bucket], 1);
                atomic_fetch_add(&st->bytes_in, calls[i].resp.len);
            } else if (calls[i].status > 0 && calls[i].status < 16) {
                atomic_fetch_add(&st->errors[calls[i].status], 1);
            }
        }
    }
}

/* The sending and waiting half of run_calls(). */
static void run_calls_wait(rpc_conn_t *c, pconn_rpc_call_t *calls, size_t n,
                           int64_t timeout_ms, pending_t *ps, waiter_t *me,
                           struct iovec *iov, int iovcnt, int64_t deadline)
{
    int wrc = write_frames(c, iov, iovcnt, deadline);
    if (wrc == WF_TIMEOUT || wrc == WF_TIMEOUT_MIDFRAME) {
        /* The calls' timeout covers sending (issue 9, defect 3). */
        for (size_t i = 0; i < n; i++)
            if (ps[i].id != 0)
                forget(c, &ps[i]);
        if (wrc == WF_TIMEOUT_MIDFRAME)
            fail(c, PCONN_EIO, "a request left half-sent after %lld ms: the peer does not read",
                 (long long)timeout_ms);
        for (size_t i = 0; i < n; i++) {
            if (ps[i].id == 0)
                continue;
            calls[i].status = local_error(&calls[i].err, PCONN_ETIMEDOUT,
                                          "rpc %s: %s version %d: could not send within %lld ms%s",
                                          c->address, calls[i].name, calls[i].version,
                                          (long long)timeout_ms,
                                          wrc == WF_TIMEOUT ? "" : " (connection closed: a frame was cut)");
        }
        return;
    }
    if (wrc != WF_OK) /* closed before these calls and the others wake (defect 10) */
        fail(c, PCONN_EIO, "connection lost while sending: %s", strerror(errno));

    /* Wait, or read for everyone (a client, while no one else reads). */
    pconn__mutex_lock(&c->lock);
    for (size_t i = 0; i < n; i++)
        ps[i].waiting = ps[i].id != 0;
    c->waiters++;
    bool can_lead = !c->cfg.server;
    while (!batch_done_locked(ps, n)) {
        if (can_lead && c->role == ROLE_NONE && !c->watcher_wanted && !c->failed) {
            c->role = ROLE_CALLER;
            pconn__mutex_unlock(&c->lock);
            bool answers_left = false;
            int a = lead(c, ps, n, deadline, &answers_left);
            pconn__mutex_lock(&c->lock);
            c->role = ROLE_NONE;
            if (a == RD_BIG || (answers_left && !c->failed)) {
                c->watcher_wanted = true;
                pthread_cond_signal(&c->watch_cond);
            }
            if (a == RD_DEADLINE)
                break;
            continue;
        }
        if (can_lead && c->role == ROLE_WATCHER && !c->kicked) {
            c->kicked = true;
            pconn__wake(c->kick_fd);
        }
        uint32_t seen = atomic_load(&me->word);
        me->asleep = true;
        pconn__mutex_unlock(&c->lock);
        wait_word(&me->word, seen, deadline);
        pconn__mutex_lock(&c->lock);
        me->asleep = false;
        if (!batch_done_locked(ps, n) && pconn__mono_ns() >= deadline)
            break;
    }
    c->waiters--;
    for (size_t i = 0; i < n; i++) {
        ps[i].waiting = false;
        if (ps[i].id == 0 || ps[i].done)
            continue;
        unlink_pending(c, &ps[i]);
        calls[i].status = local_error(&calls[i].err, PCONN_ETIMEDOUT,
                                      "rpc %s: %s version %d: no answer within %lld ms", c->address,
                                      calls[i].name, calls[i].version, (long long)timeout_ms);
    }
    c->last_call_ns = pconn__mono_ns();
    _Atomic uint32_t *next = elect_locked(c);
    pconn__mutex_unlock(&c->lock);
    wake(next);
    for (size_t i = 0; i < n; i++) {
        if (ps[i].id == 0)
            continue;
        if (ps[i].done)
            finish_call(&calls[i], &ps[i]);
    }
}

int pconn_rpc_call_many(pconn_conn_t *conn, pconn_rpc_call_t *calls, size_t n, int64_t timeout_ms)
{
    if (calls == NULL && n > 0)
        return PCONN_EINVAL;
    int bad = conn == NULL || pconn__conn_ops(conn) != &rpc_ops ? PCONN_EINVAL
              : pconn__conn_inherited(conn)                    ? PCONN_ECLOSED
                                                               : PCONN_OK;
    if (bad == PCONN_OK && n > (size_t)INT_MAX / 2) {
        bad = PCONN_EINVAL;
    }
    pending_t *ps = NULL;
    uint8_t(*heads)[QUERY_HEAD_MAX] = NULL;
    struct iovec *iov = NULL;
    if (bad == PCONN_OK && n > 0) {
        ps = calloc(n, sizeof *ps);
        heads = malloc(n * sizeof *heads);
        iov = malloc(2 * n * sizeof *iov);
        if (ps == NULL || heads == NULL || iov == NULL)
            bad = PCONN_ENOMEM;
    }
    if (bad != PCONN_OK) {
        for (size_t i = 0; i < n; i++) {
            calls[i].resp = (pconn_buf_t){0};
            calls[i].status = local_error(&calls[i].err, bad, "%s",
                                          bad == PCONN_ECLOSED ? "rpc: connection inherited across fork()"
                                          : bad == PCONN_ENOMEM ? "pconn_rpc_call_many: out of memory"
                                                                : "pconn_rpc_call_many: bad argument");
        }
    } else if (n > 0) {
        run_calls(pconn_conn_impl(conn), calls, n, timeout_ms, ps, heads, iov);
    }
    free(ps);
    free(heads);
    free(iov);
    for (size_t i = 0; i < n; i++)
        if (calls[i].status != PCONN_OK)
            return calls[i].status;
    return bad;
}

int pconn_rpc_call(pconn_conn_t *conn, const char *name, int version, const void *req,
                   size_t req_len, pconn_buf_t *resp, int64_t timeout_ms, pconn_error_t *err)
{
    if (resp != NULL)
        *resp = (pconn_buf_t){0};
    if (conn == NULL || pconn__conn_ops(conn) != &rpc_ops || resp == NULL)
        return local_error(err, PCONN_EINVAL, "pconn_rpc_call: bad argument");
    rpc_conn_t *c = pconn_conn_impl(conn);
    if (pconn__conn_inherited(conn)) /* its reader is the parent's; the socket too */
        return local_error(err, PCONN_ECLOSED, "rpc %s: connection inherited across fork()",
                           c->address);
    /* One call is a batch of one, on the stack: no allocation on this path. */
    pconn_rpc_call_t call = {.name = name, .version = version, .req = req, .req_len = req_len};
    pending_t p;
    uint8_t head[1][QUERY_HEAD_MAX];
    struct iovec iov[2];
    run_calls(c, &call, 1, timeout_ms, &p, head, iov);
    *resp = call.resp;
    if (err != NULL)
        *err = call.err;
    return call.status;
}
