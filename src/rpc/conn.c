/* conn.c - an RPC connection's life: the configuration, opening (the transport
 * session, the handshake, the reading thread), reading frames (in place in the read
 * buffer, heartbeats kept while waiting), what each frame does, failure, the end of the
 * reading role and the connection type (close, destroy). */
#include "conn.h"

PCONN_HIDDEN _Thread_local pconn_conn_t *pconn__rpc_tl_handler_conn;
PCONN_HIDDEN _Thread_local rpc_conn_t *pconn__rpc_tl_inline;
PCONN_HIDDEN _Thread_local uint64_t pconn__rpc_tl_inline_gen;
PCONN_HIDDEN _Thread_local rpc_conn_t *pconn__rpc_tl_reader;
PCONN_HIDDEN _Thread_local const pconn_rpc_peer_t *pconn__rpc_tl_handler_peer;

pconn_conn_t *pconn_rpc_handler_conn(void)
{
    return pconn__rpc_tl_handler_conn;
}

const pconn_rpc_peer_t *pconn_rpc_handler_peer(void)
{
    return pconn__rpc_tl_handler_peer;
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
    cfg->start_reader = NULL;
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
void pconn__rpc_fail(rpc_conn_t *c, int code, const char *fmt, ...)
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
        int64_t dead_at = pconn__rpc_after_ms(c->last_recv_ns, c->cfg.hb_timeout_ms);
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
            pconn__rpc_frame_head(h, RPC_HEARTBEAT, 0, 0);
            if (pconn__rpc_write_frame(c, h, sizeof h, NULL, 0, 0) == WF_TIMEOUT_MIDFRAME)
                return PCONN_EIO;
            c->next_send_ns = pconn__rpc_after_ms(now, c->cfg.hb_every_ms);
        }
        int64_t until = dead_at < c->next_send_ns ? dead_at : c->next_send_ns;
        if (may_park && c->cfg.park != NULL && c->rpos == c->rlen) {
            int64_t park_at = pconn__rpc_after_ms(c->last_recv_ns, RPC_PARK_MS);
            if (now >= park_at) {
                pconn__mutex_lock(&c->lock);
                bool calls = c->pending != NULL;
                pconn__mutex_unlock(&c->lock);
                if (!calls)
                    return RD_PARK;
                park_at = pconn__rpc_after_ms(now, RPC_PARK_MS);
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
        struct pollfd pfd[2] = {{.fd = c->fd, .events = pconn__rpc_transport_wants(c, 0)},
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
        ssize_t n = pconn__rpc_raw_read(c, direct ? out : c->rbuf, direct ? len : READ_BUF);
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
    if (pconn__rpc_flush_answers(c) != WF_OK) { /* what is done goes out before a long read */
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
        if (c->lead_deadline_ns == 0 && pconn__rpc_flush_answers(c) != WF_OK) {
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
        ssize_t r = pconn__rpc_raw_read(c, c->rbuf + c->rlen, READ_BUF - c->rlen);
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
        pconn__rpc_flush_answers(c);
        pconn__rpc_send_response(c, pconn__get_u64(head + 1), PCONN_ETOOBIG, msg, strlen(msg));
    } else if (head_len == 9 && head[0] == RPC_RESPONSE) {
        /* The call whose answer it was learns why. */
        rpc_msg_t m = {.id = pconn__get_u64(head + 1), .code = PCONN_ETOOBIG,
                       .data = (const uint8_t *)msg, .data_len = strlen(msg)};
        deliver(c, &m, NULL);
    }
    pconn__rpc_send_close(c, PCONN_ETOOBIG, msg);
    pconn__rpc_fail(c, PCONN_EIO, "closed: %s", msg);
}

/* Takes next_frame()'s result rc, its frame and what goes with it. */
int pconn__rpc_handle_frame(rpc_conn_t *c, uint64_t me, int rc, rpc_msg_t *m, uint8_t *owned, uint64_t big,
                        const uint8_t *head, size_t head_len, char *why, size_t why_size, int sys_errno)
{
    if (rc == PCONN_ETOOBIG) {
        refuse_big(c, big, head, head_len);
        return FRAME_END;
    }
    if (rc == PCONN_ETIMEDOUT) {
        pconn__rpc_send_close(c, PCONN_ETIMEDOUT, "heartbeat timeout");
        pconn__rpc_fail(c, PCONN_EIO, "nothing received for %lld ms: heartbeat timeout",
             (long long)c->cfg.hb_timeout_ms);
        return FRAME_END;
    }
    const char *tls_why = rc == PCONN_EIO ? pconn__tls_why(c->cfg.transport, c->session) : NULL;
    if (tls_why != NULL) {
        pconn__rpc_fail(c, PCONN_EIO, "connection lost: %s", tls_why);
        return FRAME_END;
    }
    if (rc == PCONN_EIO) {
        if (sys_errno != 0)
            pconn__rpc_fail(c, PCONN_EIO, "connection lost: %s", strerror(sys_errno));
        else
            pconn__rpc_fail(c, PCONN_EIO, "connection closed by peer");
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
        pconn__rpc_send_close(c, PCONN_EPROTO, why);
        pconn__rpc_fail(c, PCONN_EIO, "protocol error: %s", why);
        return FRAME_END;
    }
    if (m->type == RPC_QUERY)
        return pconn__rpc_serve_query(c, me, m, owned) ? FRAME_GO_ON : FRAME_LEFT;
    if (m->type == RPC_RESPONSE) {
        deliver(c, m, owned);
        return FRAME_GO_ON;
    }
    if (m->type == RPC_CLOSE) {
        pconn__rpc_fail(c, PCONN_EIO, "closed by peer: %.*s", (int)(m->data_len < 200 ? m->data_len : 200),
             (const char *)m->data);
        free(owned);
        return FRAME_END;
    }
    free(owned); /* HEARTBEAT: its arrival was all */
    return FRAME_GO_ON;
}

/* The next frame and what the role does with it; RD_* codes come back as they are. */
int pconn__rpc_read_one(rpc_conn_t *c, uint64_t me)
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
    return pconn__rpc_handle_frame(c, me, rc, &m, owned, big, head, head_len, why, sizeof why, sys_errno);
}

/* The end of the connection's reading thread, as the connection ends (a client's
 * watcher may end while a caller still reads: it touches no reading state). */
void pconn__rpc_reader_exit(rpc_conn_t *c)
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

/* ---- the connection type ------------------------------------------------------- */

/* The owner's release (pconn__conn_release: the pconn's worker, the server) waits, once
 * the connection is closed, for the reader to end (at once after the shutdown) and takes
 * over the reader's reference if the reader handed it over. The owner holds one of its
 * own, so dropping it is never the last: the memory goes with the owner's unref, not
 * later on a thread nobody waits for. Not on the reader itself. */
static void wait_reader_out(void *impl)
{
    rpc_conn_t *c = impl;
    if (!c->reader_started || pconn__rpc_tl_reader == c)
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
    else if (c->reader_started && pconn__rpc_tl_reader == c) /* the last reference was its own */
        pthread_detach(c->reader);
    else if (c->reader_started)
        pthread_join(c->reader, NULL);
    pthread_cond_destroy(&c->reader_cond);
    pconn__rpc_free_answers(c); /* queued by a client's reading caller when the connection ended */
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
    pthread_mutex_destroy(&c->wq_lock);
    pthread_mutex_destroy(&c->lock);
    free(c->rbuf);
    free(c);
}

static int rpc_fd(void *impl)
{
    return ((rpc_conn_t *)impl)->fd;
}

const pconn_conn_ops_t pconn__rpc_ops = {rpc_close, rpc_destroy, rpc_fd};

bool pconn__rpc_conn_transport(const pconn_conn_t *conn, const pconn_transport_t **t, void **session)
{
    if (conn == NULL || pconn__conn_ops(conn) != &pconn__rpc_ops)
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
    pthread_mutex_init(&c->wq_lock, NULL);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->reader_cond, NULL);
    pthread_mutex_init(&c->role_lock, NULL);
    pconn__cond_init(&c->watch_cond);
    atomic_init(&c->inline_since_ns, 0);
    c->reader_count = cfg->reader_count;
    c->conn = pconn_conn_new(&pconn__rpc_ops, c);
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
    c->next_send_ns = pconn__rpc_after_ms(c->last_recv_ns, c->cfg.hb_every_ms);
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
    rc = pconn__rpc_hs_run(c, deadline_ns, cancel_fd, cancelled, err);
    if (rc == PCONN_OK)
        rc = reading_prepare(c, err);
    if (rc == PCONN_OK) {
        if ((c->kick_fd = pconn__wake_fd_new()) >= 0)
            c->reader_started = pconn__thread_start(&c->reader, pconn__rpc_watch_main, c, READER_STACK, false) == 0;
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
    return pconn__rpc_hs_step(pconn_conn_impl(conn), events, err);
}

int pconn__rpc_conn_expired(pconn_conn_t *conn, pconn_error_t *err)
{
    return pconn__rpc_hs_expired(pconn_conn_impl(conn), err);
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
    c->reader_started = c->reader_detached = true;
    if (pconn__rpc_start_reader(c) != 0) {
        c->reader_started = c->reader_detached = false;
        c->on_reader_exit = NULL;
        pconn_conn_unref(c->conn);
        pconn_error_set(err, PCONN_ENOMEM, EAGAIN, "rpc %s: reader thread", c->address);
        return PCONN_ENOMEM;
    }
    return PCONN_OK;
}
