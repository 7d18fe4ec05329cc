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
int pconn__rpc_write_frames(rpc_conn_t *c, struct iovec *iov, int iovcnt, int64_t deadline_ns)
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
