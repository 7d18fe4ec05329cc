/* framing.c - frames out. Every write goes through pconn__rpc_write_frames(): one
 * writer at a time, never blocking past its deadline (issue 9, defect 3), each frame's
 * header and data in one system call (defect 11). Raw reads and writes go through the transport
 * when there is one. Decoding what comes in is wire.c's. */
#include "conn.h"

/* The poll() events the transport's last call of that direction waits for. */
short pconn__rpc_transport_wants(const rpc_conn_t *c, int writing)
{
    if (c->cfg.transport != NULL && c->cfg.transport->wants != NULL && c->session != NULL) {
        short ev = c->cfg.transport->wants(c->session, writing);
        if (ev != 0)
            return ev;
    }
    return writing ? POLLOUT : POLLIN;
}

/* ---- raw I/O ------------------------------------------------------------------- */

ssize_t pconn__rpc_raw_read(rpc_conn_t *c, void *buf, size_t len)
{
    if (c->cfg.transport != NULL)
        return c->cfg.transport->read(c->session, buf, len);
    return recv(c->fd, buf, len, 0);
}

ssize_t pconn__rpc_raw_write(rpc_conn_t *c, const void *buf, size_t len)
{
    if (c->cfg.transport != NULL)
        return c->cfg.transport->write(c->session, buf, len);
    return send(c->fd, buf, len, MSG_NOSIGNAL);
}

/* base_ns plus ms milliseconds, saturating at INT64_MAX ("never"): PCONN_FOREVER, or a
 * value whose nanoseconds would overflow (INT64_MAX ms), means no deadline. */
int64_t pconn__rpc_after_ms(int64_t base_ns, int64_t ms)
{
    if (ms < 0 || ms > (INT64_MAX - base_ns) / 1000000)
        return INT64_MAX;
    return base_ns + ms * 1000000;
}

/* One write through the transport, whole, polling for what the session wants until
 * deadline_ns (0: no waiting). *sent counts what went out. */
static int transport_write_all(rpc_conn_t *c, const uint8_t *p, size_t len, int64_t deadline_ns,
                               size_t *sent)
{
    while (len > 0) {
        ssize_t n = pconn__rpc_raw_write(c, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            struct pollfd pfd = {.fd = c->fd, .events = pconn__rpc_transport_wants(c, 1)};
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
        if (c->cfg.stats != NULL)
            atomic_fetch_add(&c->cfg.stats->writes, 1);
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

/* ---- writes combined ------------------------------------------------------------
 * A writer that finds another one writing queues its frames and waits (on a futex word,
 * as callers do for answers). The writer sends its own frames and everything queued in
 * as few system calls as it can, and once its own are out it hands the role to the
 * first writer still queued: on a busy connection one write carries many callers'
 * frames. Plain TCP: every queued write keeps its own deadline: one not started when
 * its deadline passes leaves the queue (WF_TIMEOUT); one cut by its deadline breaks the
 * stream (WF_TIMEOUT_MIDFRAME), and every write after it fails. The writer never waits
 * for room while it holds other writers' frames: it puts them back in the queue first,
 * where they can time out. Through a transport the batch goes out whole, by the
 * earliest deadline in it, or the stream is broken: a session's write that could not
 * go on must be retried with the same bytes. */

enum { WQ_QUEUED, WQ_TAKEN, WQ_DONE };

typedef struct wreq_t {
    struct iovec *iov;   /* what is left to send (consumed in place) */
    int iovcnt;
    int64_t deadline_ns;
    bool started;        /* part of it went out; the writer's to change while WQ_TAKEN */
    int state, rc, err;  /* guarded by wq_lock */
    waiter_t w;          /* its owner waits on it; asleep guarded by wq_lock */
    struct wreq_t *next;
} wreq_t;

#define WQ_IOV 256

/* Sends what goes out now, without waiting, of the requests from r on, in order. The
 * first request not wholly sent, or NULL; *error is errno when the socket failed. */
static wreq_t *send_some(rpc_conn_t *c, wreq_t *r, int *error)
{
    struct iovec iov[WQ_IOV];
    while (r != NULL) {
        int n = 0;
        for (wreq_t *q = r; q != NULL && n < WQ_IOV; q = q->next)
            for (int i = 0; i < q->iovcnt && n < WQ_IOV; i++)
                if (q->iov[i].iov_len > 0)
                    iov[n++] = q->iov[i];
        ssize_t k = 0;
        if (n > 0) {
            struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
            k = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0 && errno == EAGAIN)
                return r;
            if (k <= 0) {
                *error = k < 0 ? errno : EPIPE;
                return r;
            }
            if (c->cfg.stats != NULL)
                atomic_fetch_add(&c->cfg.stats->writes, 1);
        }
        /* What went out leaves the requests' iovecs; the requests sent wholly are done. */
        while (r != NULL) {
            while (r->iovcnt > 0 && (size_t)k >= r->iov->iov_len) {
                k -= (ssize_t)r->iov->iov_len;
                r->started |= r->iov->iov_len > 0;
                r->iov++;
                r->iovcnt--;
            }
            if (r->iovcnt > 0 && k > 0) {
                r->iov->iov_base = (char *)r->iov->iov_base + k;
                r->iov->iov_len -= (size_t)k;
                r->started = true;
                k = 0;
            }
            if (r->iovcnt > 0)
                break;
            r = r->next;
        }
    }
    return NULL;
}

/* Writers to wake once wq_lock is dropped; past the list's size, woken at once (rare:
 * better a wake under the lock than a lost one). */
typedef struct wake_list_t {
    _Atomic uint32_t *word[64];
    int n;
} wake_list_t;

static void wl_add(wake_list_t *l, _Atomic uint32_t *word)
{
    if (word != NULL && l->n < (int)(sizeof l->word / sizeof l->word[0]))
        l->word[l->n++] = word;
    else
        wake(word);
}

static void wl_wake(wake_list_t *l)
{
    for (int i = 0; i < l->n; i++)
        wake(l->word[i]);
    l->n = 0;
}

/* Under wq_lock: r is done with rc. */
static void wq_done_locked(wreq_t *r, int rc, int err, wake_list_t *l)
{
    r->state = WQ_DONE;
    r->rc = rc;
    r->err = err;
    wl_add(l, poke_locked(&r->w));
}

/* Under wq_lock: a frame was cut, so nothing may follow it: every queued write fails. */
static void wq_break_locked(rpc_conn_t *c, wake_list_t *l)
{
    c->wq_broken = true;
    for (wreq_t *q = c->wq_first; q != NULL; q = q->next)
        wq_done_locked(q, WF_ERROR, EPIPE, l);
    c->wq_first = c->wq_last = NULL;
}

/* Under wq_lock, as a writer leaves: the first writer queued is the next. */
static void wq_leave_locked(rpc_conn_t *c, wake_list_t *l)
{
    c->writing = false;
    if (c->wq_first != NULL)
        wl_add(l, poke_locked(&c->wq_first->w));
}

static void wq_unlink_locked(rpc_conn_t *c, wreq_t *r)
{
    wreq_t *prev = NULL;
    for (wreq_t *q = c->wq_first; q != NULL; prev = q, q = q->next) {
        if (q == r) {
            *(prev != NULL ? &prev->next : &c->wq_first) = r->next;
            if (c->wq_last == r)
                c->wq_last = prev;
            return;
        }
    }
}

/* A transport: the requests of batch in as few of the session's writes as staging
 * allows, all by deadline_ns. */
static int send_transport_batch(rpc_conn_t *c, wreq_t *batch, int64_t deadline_ns)
{
    struct iovec iov[WQ_IOV];
    int n = 0, rc = WF_OK;
    for (wreq_t *q = batch; q != NULL && rc == WF_OK; q = q->next) {
        for (int i = 0; i < q->iovcnt && rc == WF_OK; i++) {
            if (n == WQ_IOV) {
                rc = send_transport(c, iov, n, deadline_ns);
                n = 0;
            }
            iov[n++] = q->iov[i];
        }
    }
    if (rc == WF_OK && n > 0)
        rc = send_transport(c, iov, n, deadline_ns);
    return rc;
}

/* See the top of this section. */
static int write_queued(rpc_conn_t *c, struct iovec *iov, int iovcnt, int64_t deadline_ns)
{
    wake_list_t wl = {.n = 0};
    wreq_t me = {.iov = iov, .iovcnt = iovcnt, .deadline_ns = deadline_ns, .state = WQ_QUEUED};
    atomic_init(&me.w.word, 0);
    pconn__mutex_lock(&c->wq_lock);
    if (c->wq_broken || (deadline_ns == 0 && (c->writing || c->wq_first != NULL))) {
        bool broken = c->wq_broken;
        pconn__mutex_unlock(&c->wq_lock);
        errno = EPIPE;
        return broken ? WF_ERROR : WF_TIMEOUT; /* deadline 0: never waits for a writer */
    }
    /* On our stack, and out of the queue (done, or unlinked) before we return. */
    *(c->wq_last != NULL ? &c->wq_last->next : &c->wq_first) = &me;
    // cppcheck-suppress autoVariables
    c->wq_last = &me;
    for (;;) {
        if (me.state == WQ_DONE) {
            pconn__mutex_unlock(&c->wq_lock);
            errno = me.err;
            return me.rc;
        }
        if (!c->writing && c->wq_first == &me)
            break; /* my turn */
        if (me.state == WQ_QUEUED && pconn__mono_ns() >= deadline_ns) {
            /* Never started: it leaves the queue. Started (the writer put it back cut):
             * nothing may follow it. */
            wq_unlink_locked(c, &me);
            int rc = me.started ? WF_TIMEOUT_MIDFRAME : WF_TIMEOUT;
            if (me.started)
                wq_break_locked(c, &wl);
            else if (!c->writing && c->wq_first != NULL)
                wl_add(&wl, poke_locked(&c->wq_first->w));
            pconn__mutex_unlock(&c->wq_lock);
            wl_wake(&wl);
            errno = EPIPE;
            return rc;
        }
        /* Taken, it is the writer's until it is done or put back: that comes without
         * waiting, as the writer puts back what it holds before it waits for room. */
        int64_t until = me.state == WQ_TAKEN ? INT64_MAX : deadline_ns;
        me.w.asleep = true;
        uint32_t seen = atomic_load(&me.w.word);
        pconn__mutex_unlock(&c->wq_lock);
        wait_word(&me.w.word, seen, until);
        pconn__mutex_lock(&c->wq_lock);
        me.w.asleep = false;
    }
    /* The writer. */
    c->writing = true;
    for (;;) {
        wreq_t *batch = c->wq_first, *last = c->wq_last;
        c->wq_first = c->wq_last = NULL;
        int64_t batch_deadline = INT64_MAX;
        for (wreq_t *q = batch; q != NULL; q = q->next) {
            q->state = WQ_TAKEN;
            if (q->deadline_ns < batch_deadline)
                batch_deadline = q->deadline_ns;
        }
        pconn__mutex_unlock(&c->wq_lock);
        if (c->cfg.transport != NULL) {
            /* Not waiting (deadline 0: then the batch is this one write) means not
             * starting unless there is room, as a session's write cannot be taken back. */
            struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
            int rc = batch_deadline == 0 && (poll(&pfd, 1, 0) != 1 || !(pfd.revents & POLLOUT))
                         ? WF_TIMEOUT
                         : send_transport_batch(c, batch, batch_deadline);
            int e = errno;
            pconn__mutex_lock(&c->wq_lock);
            for (wreq_t *q = batch; q != NULL; q = q->next)
                wq_done_locked(q, rc, e, &wl);
            if (rc != WF_OK && rc != WF_TIMEOUT)
                wq_break_locked(c, &wl);
            wq_leave_locked(c, &wl);
            pconn__mutex_unlock(&c->wq_lock);
            wl_wake(&wl);
            errno = e;
            return rc;
        }
        int error = 0;
        wreq_t *rest = send_some(c, batch, &error);
        pconn__mutex_lock(&c->wq_lock);
        for (wreq_t *q = batch; q != rest; q = q->next)
            wq_done_locked(q, WF_OK, 0, &wl);
        if (rest != NULL) { /* back to the head of the queue, in order */
            for (wreq_t *q = rest; q != NULL; q = q->next) {
                q->state = WQ_QUEUED;
                if (q != &me) /* its owner waits again, with its deadline */
                    wl_add(&wl, poke_locked(&q->w));
            }
            last->next = c->wq_first;
            if (c->wq_first == NULL)
                c->wq_last = last;
            c->wq_first = rest;
        }
        if (error != 0) {
            wq_break_locked(c, &wl);
            me.err = error;
        }
        bool room = false;
        if (me.state != WQ_DONE && deadline_ns != 0) {
            /* Mine is not out: wait for room up to my deadline, holding no one's frames. */
            pconn__mutex_unlock(&c->wq_lock);
            wl_wake(&wl);
            struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
            int prc = poll(&pfd, 1, pconn__poll_timeout_ms(deadline_ns));
            int e = errno;
            pconn__mutex_lock(&c->wq_lock);
            room = prc > 0 || (prc < 0 && e == EINTR);
            if (prc < 0 && e != EINTR && me.state != WQ_DONE) {
                wq_break_locked(c, &wl);
                me.err = e;
            }
        }
        if (me.state != WQ_DONE && !room) {
            /* My deadline (or deadline 0 and no room): as a queued writer would. */
            wq_unlink_locked(c, &me);
            me.state = WQ_DONE;
            me.rc = me.started ? WF_TIMEOUT_MIDFRAME : WF_TIMEOUT;
            me.err = EPIPE;
            if (me.started)
                wq_break_locked(c, &wl);
        }
        if (me.state == WQ_DONE) {
            wq_leave_locked(c, &wl);
            pconn__mutex_unlock(&c->wq_lock);
            wl_wake(&wl);
            errno = me.err;
            return me.rc;
        }
    }
}

/* Writes whole frames (iov: their headers and data in order) before deadline_ns
 * (INT64_MAX: none; 0: only if that needs no waiting). WF_OK; WF_TIMEOUT: nothing went
 * out, the connection is fine; WF_TIMEOUT_MIDFRAME: part went out, the stream is broken
 * (the caller fails the connection); WF_ERROR with errno. Consumes iov. */
int pconn__rpc_write_frames(rpc_conn_t *c, struct iovec *iov, int iovcnt, int64_t deadline_ns)
{
    return write_queued(c, iov, iovcnt, deadline_ns);
}

int pconn__rpc_write_frame(rpc_conn_t *c, const uint8_t *head, size_t head_len, const void *data,
                       size_t data_len, int64_t deadline_ns)
{
    struct iovec iov[2] = {{(void *)head, head_len}, {(void *)data, data_len}};
    return pconn__rpc_write_frames(c, iov, 2, deadline_ns);
}

/* Frame header: length, type, and the fixed fields the caller appends. */
size_t pconn__rpc_frame_head(uint8_t *h, uint8_t type, size_t fixed_len, size_t data_len)
{
    pconn__put_u64(h, 1 + fixed_len + data_len);
    h[8] = type;
    return 9;
}

/* Best effort, as the connection ends: only if no one is writing, only what fits now. */
void pconn__rpc_send_close(rpc_conn_t *c, int code, const char *msg)
{
    uint8_t h[13];
    size_t mlen = strlen(msg);
    pconn__rpc_frame_head(h, RPC_CLOSE, 4, mlen);
    pconn__put_u32(h + 9, (uint32_t)code);
    pconn__rpc_write_frame(c, h, sizeof h, msg, mlen, 0);
}

/* An answer that cannot go out within the heartbeat timeout: the peer has not read for
 * that long, so the connection is as good as dead. */
int pconn__rpc_send_response(rpc_conn_t *c, uint64_t id, int code, const void *data, size_t len)
{
    uint8_t h[21];
    pconn__rpc_frame_head(h, RPC_RESPONSE, 12, len);
    pconn__put_u64(h + 9, id);
    pconn__put_u32(h + 17, (uint32_t)code);
    int64_t deadline = pconn__rpc_after_ms(pconn__mono_ns(), c->cfg.hb_timeout_ms);
    int rc = pconn__rpc_write_frame(c, h, sizeof h, data, len, deadline);
    if (rc == WF_TIMEOUT || rc == WF_TIMEOUT_MIDFRAME)
        pconn__rpc_fail(c, PCONN_EIO, "an answer could not be sent for %lld ms: the peer does not read",
             (long long)c->cfg.hb_timeout_ms);
    return rc;
}
