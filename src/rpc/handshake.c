/* handshake.c - the HELLO exchange (docs/protocol.md) as a state machine that never
 * blocks: a server's accepting thread drives the handshakes of all its new connections
 * with it, a client's connect drives its own with pconn__rpc_hs_run(). It owns
 * hs_state, hs_done and hs_buf of the connection. */
#include "conn.h"

/* A plaintext client at a TLS server: told so in its own protocol, a CLOSE frame in
 * plaintext, so that its handshake says why instead of "closed by peer". What it sent
 * is read first, so that closing sends FIN, not a reset that could discard the frame. */
static void refuse_plaintext(rpc_conn_t *c)
{
    static const char msg[] = "this server requires TLS";
    uint8_t f[13 + sizeof msg - 1], junk[512];
    pconn__rpc_frame_head(f, RPC_CLOSE, 4, sizeof msg - 1);
    pconn__put_u32(f + 9, PCONN_EHANDSHAKE);
    memcpy(f + 13, msg, sizeof msg - 1);
    while (recv(c->fd, junk, sizeof junk, MSG_DONTWAIT) > 0)
        ;
    (void)send(c->fd, f, sizeof f, MSG_NOSIGNAL | MSG_DONTWAIT);
}

/* ---- handshake -----------------------------------------------------------------
 * A state machine that never blocks, so that one thread can drive many: a server's
 * accepting thread drives all its handshakes (no thread per peer before its HELLO is
 * in), a client's connect drives its one with pconn__rpc_hs_run(). Each side sends its HELLO
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
    pconn__rpc_send_close(c, PCONN_EHANDSHAKE, why);
    pconn_error_set(err, PCONN_EHANDSHAKE, 0, "rpc %s: handshake: %s", c->address, why);
    return PCONN_EHANDSHAKE;
}

/* The peer's frame claims n bytes, which no HELLO has. */
static int hs_not_hello(rpc_conn_t *c, uint64_t n, pconn_error_t *err)
{
    char why[128];
    if (c->cfg.transport == NULL && ((n >> 56) == 0x15 || (n >> 56) == 0x16) && ((n >> 48) & 0xff) == 0x03)
        snprintf(why, sizeof why, c->cfg.server ? "the peer speaks TLS: it is a TLS client (this server has no tls)"
                                                : "the peer answered in TLS: it is a TLS server (set tls)");
    else
        snprintf(why, sizeof why, "first frame is not a HELLO (length %llu)", (unsigned long long)n);
    pconn__rpc_send_close(c, PCONN_EHANDSHAKE, why);
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
    pconn__rpc_send_close(c, PCONN_EHANDSHAKE, msg);
    char sink[64]; /* the peer's HELLO, if here: closing over it would reset */
    (void)!recv(c->fd, sink, sizeof sink, MSG_DONTWAIT);
    pconn_error_set(err, PCONN_EHANDSHAKE, 0, "rpc %s: %s", c->address, msg);
    return PCONN_EHANDSHAKE;
}

/* Takes the handshake as far as it goes without waiting. PCONN_OK when it is done;
 * RPC_HS_AGAIN with *events, what to poll() c->fd for before the next step; else an error
 * with err filled (the connection is to be dropped). */
int pconn__rpc_hs_step(rpc_conn_t *c, short *events, pconn_error_t *err)
{
    const pconn_transport_t *t = c->cfg.transport;
    if (c->hs_state == HS_TRANSPORT) {
        while (t != NULL && t->handshake != NULL) {
            pconn_error_t local = {0};
            errno = 0;
            if (t->handshake(c->session, &local) == 0)
                break;
            if (errno == EAGAIN) {
                *events = pconn__rpc_transport_wants(c, 0);
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
        ssize_t n = pconn__rpc_raw_write(c, our_hello + c->hs_done, sizeof our_hello - c->hs_done);
        if (n > 0 && (c->hs_done += (size_t)n) == sizeof our_hello) {
            c->hs_state = HS_RECV;
            c->hs_done = 0;
        }
        if (n > 0 || (n < 0 && errno == EINTR))
            continue;
        if (n < 0 && errno == EAGAIN) {
            *events = pconn__rpc_transport_wants(c, 1);
            return RPC_HS_AGAIN;
        }
        int e = errno;
        /* A TLS 1.3 server refuses a client certificate after the client's handshake is
         * done: its alert is waiting to be read, and says why. */
        uint8_t alert[64];
        const char *tls_why = pconn__tls_why(t, c->session);
        if (tls_why != NULL && pconn__rpc_raw_read(c, alert, sizeof alert) < 0)
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
        ssize_t r = pconn__rpc_raw_read(c, c->hs_buf + c->hs_done, want - c->hs_done);
        if (r > 0) {
            c->hs_done += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN) {
            *events = pconn__rpc_transport_wants(c, 0);
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
int pconn__rpc_hs_expired(rpc_conn_t *c, pconn_error_t *err)
{
    if (c->hs_state == HS_TRANSPORT) {
        pconn_error_set(err, PCONN_EHANDSHAKE, 0, "rpc %s: transport: handshake timed out", c->address);
        return PCONN_EHANDSHAKE;
    }
    pconn__rpc_send_close(c, PCONN_EHANDSHAKE, "handshake timed out");
    pconn_error_set(err, PCONN_EHANDSHAKE, 0, "rpc %s: handshake timed out", c->address);
    return PCONN_EHANDSHAKE;
}

/* The whole handshake on the calling thread, by deadline_ns; it gives up (PCONN_ECLOSED)
 * when cancel_fd (-1: none) turns readable and cancelled() (NULL: always) says so. */
int pconn__rpc_hs_run(rpc_conn_t *c, int64_t deadline_ns, int cancel_fd, bool (*cancelled)(void),
                  pconn_error_t *err)
{
    short events = 0;
    int rc;
    while ((rc = pconn__rpc_hs_step(c, &events, err)) == RPC_HS_AGAIN) {
        for (;;) {
            if (pconn__mono_ns() >= deadline_ns)
                return pconn__rpc_hs_expired(c, err);
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
