/* serve.c - the peer's queries: handlers run on the reading thread (a server's) or on
 * the handler pool, their answers queued and sent a batch at a time; the hand-over of
 * the reading role when a handler is slow; the reading thread's main loop; a server's
 * idle connections parked with its accepting thread (no thread reads them). */
#include "conn.h"

/* ---- answers ------------------------------------------------------------------- */

void pconn__rpc_free_answers(rpc_conn_t *c)
{
    for (int i = 0; i < c->nanswers; i++)
        pconn_buf_free(&c->answers[i].data);
    c->nanswers = 0;
    c->answer_bytes = 0;
}

/* Sends the queued answers in one write, within the heartbeat timeout (a peer that reads
 * nothing for that long is as good as dead: the connection fails). WF_OK or what
 * pconn__rpc_write_frames() said (the connection then failed, or will on its next read). */
int pconn__rpc_flush_answers(rpc_conn_t *c)
{
    if (c->nanswers == 0)
        return WF_OK;
    struct iovec iov[2 * ANSWERS_MAX];
    for (int i = 0; i < c->nanswers; i++) {
        iov[2 * i] = (struct iovec){c->answers[i].head, sizeof c->answers[i].head};
        iov[2 * i + 1] = (struct iovec){c->answers[i].data.data, c->answers[i].data.len};
    }
    int64_t deadline = pconn__rpc_after_ms(pconn__mono_ns(), c->cfg.hb_timeout_ms);
    int rc = pconn__rpc_write_frames(c, iov, 2 * c->nanswers, deadline);
    int e = errno;
    pconn__rpc_free_answers(c);
    if (rc == WF_TIMEOUT || rc == WF_TIMEOUT_MIDFRAME)
        pconn__rpc_fail(c, PCONN_EIO, "an answer could not be sent for %lld ms: the peer does not read",
             (long long)c->cfg.hb_timeout_ms);
    errno = e;
    return rc;
}

/* Queues an answer (data taken) to go out with the rest of the batch. */
static void queue_answer(rpc_conn_t *c, uint64_t id, int code, pconn_buf_t *data)
{
    answer_t *a = &c->answers[c->nanswers++];
    pconn__rpc_frame_head(a->head, RPC_RESPONSE, 12, data->len);
    pconn__put_u64(a->head + 9, id);
    pconn__put_u32(a->head + 17, (uint32_t)code);
    a->data = *data;
    *data = (pconn_buf_t){0};
    c->answer_bytes += sizeof a->head + a->data.len;
    if (c->nanswers == ANSWERS_MAX || c->answer_bytes >= ANSWERS_BYTES)
        pconn__rpc_flush_answers(c);
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
        pconn__rpc_flush_answers(c); /* out of memory: in order, without a copy */
    pconn__rpc_send_response(c, id, code, msg, strlen(msg));
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
        pconn__rpc_send_response(c, id, RPC_CODE_OK, resp->data, resp->len);
    }
    pconn_buf_free(resp);
}

static int call_handler(rpc_conn_t *c, pconn_rpc_handler_fn fn, void *harg, const rpc_msg_t *m,
                        pconn_buf_t *resp, pconn_error_t *err)
{
    if (c->cfg.stats != NULL)
        atomic_fetch_add(&c->cfg.stats->served, 1);
    pconn__rpc_tl_handler_conn = c->conn;
    pconn__rpc_tl_handler_peer = &c->peer;
    int rc = fn(harg, m->data, m->data_len, resp, err);
    pconn__rpc_tl_handler_conn = NULL;
    pconn__rpc_tl_handler_peer = NULL;
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
bool pconn__rpc_serve_query(rpc_conn_t *c, uint64_t me, const rpc_msg_t *m, uint8_t *owned)
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
            pconn__rpc_flush_answers(c);
        dispatch_query(c, fn, harg, m, owned);
        return true;
    }
    uint8_t *mybuf = c->rbuf; /* m may point into it: it stays with this thread */
    watch_enter(c->cfg.watch);
    atomic_fetch_add(&c->cfg.watch->running, 1);
    atomic_store(&c->inline_since_ns, now);
    pconn__rpc_tl_inline = c;
    pconn__rpc_tl_inline_gen = me;
    pconn_buf_t resp = {0};
    pconn_error_t err = {0};
    int rc = call_handler(c, fn, harg, m, &resp, &err);
    pconn__rpc_tl_inline = NULL;
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

/* Hands the reading role on when the handler on the reading thread still is the one
 * that started at since_ns (the watchdog's view), or (since_ns 0) when the role still is
 * number gen (a handler's own call back). */
int pconn__rpc_handoff(rpc_conn_t *c, int64_t since_ns, uint64_t gen)
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
        if (pconn__rpc_start_reader(c) == 0) {
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
    return pconn__rpc_handoff(pconn_conn_impl(conn), since_ns, 0) == HANDED;
}

int64_t pconn__rpc_conn_inline_since(pconn_conn_t *conn)
{
    return atomic_load(&((rpc_conn_t *)pconn_conn_impl(conn))->inline_since_ns);
}

int pconn__rpc_start_reader(rpc_conn_t *c)
{
    return c->cfg.start_reader(c->exit_arg, c->conn);
}

void pconn__rpc_conn_read(pconn_conn_t *conn)
{
    rpc_conn_t *c = pconn_conn_impl(conn);
    pconn__rpc_tl_reader = c;
    pconn__mutex_lock(&c->role_lock);
    uint64_t me = c->role_gen;
    pconn__mutex_unlock(&c->role_lock);
    int a;
    while ((a = pconn__rpc_read_one(c, me)) == FRAME_GO_ON)
        ;
    if (a == RD_PARK) {
        /* Idle: the role and this thread's reference go to the server's poller. */
        pconn__rpc_tl_reader = NULL;
        c->cfg.park(c->exit_arg, c->conn);
        return;
    }
    if (a == FRAME_LEFT) {
        /* The role went on without this thread: it leaves with its reference. */
        void (*on_exit)(void *) = c->on_reader_exit;
        void *exit_arg = c->exit_arg;
        pconn__rpc_tl_reader = NULL;
        pconn_conn_unref(c->conn);
        if (on_exit != NULL)
            on_exit(exit_arg);
        return;
    }
    pconn__rpc_free_answers(c); /* the connection failed: they cannot go out */
    pconn__rpc_reader_exit(c);
    pconn__rpc_tl_reader = NULL;
}

/* ---- server: parked connections ------------------------------------------------ */

/* The reading role of a parked connection ends, the connection having failed. */
static int parked_ended(rpc_conn_t *c)
{
    pconn__rpc_free_answers(c);
    pconn__rpc_reader_exit(c);
    return RPC_ENDED;
}

int pconn__rpc_conn_parked(pconn_conn_t *conn, bool readable, int64_t *next_ns)
{
    rpc_conn_t *c = pconn_conn_impl(conn);
    int rc = atomic_load(&c->dead) ? PCONN_EIO : PCONN_OK, sys_errno = 0;
    bool wants_write = false;
    if (c->rpos == c->rlen)
        c->rpos = c->rlen = 0;
    while (rc == PCONN_OK && readable && c->rlen < READ_BUF) {
        ssize_t r = pconn__rpc_raw_read(c, c->rbuf + c->rlen, READ_BUF - c->rlen);
        if (r > 0) {
            c->rlen += (size_t)r;
            c->last_recv_ns = pconn__mono_ns();
        } else if (r < 0 && errno == EAGAIN) {
            /* A session that must write to go on reading (TLS) is a reading thread's:
             * the poller watches for bytes only. */
            wants_write = (pconn__rpc_transport_wants(c, 0) & POLLOUT) != 0;
            break;
        } else if (r <= 0 && !(r < 0 && errno == EINTR)) {
            sys_errno = r < 0 ? errno : 0;
            rc = PCONN_EIO;
        }
    }
    /* Heartbeats are all a parked connection takes in; anything else wants a thread. */
    while (c->rlen - c->rpos >= 9 && pconn__get_u64(c->rbuf + c->rpos) == 1 &&
           c->rbuf[c->rpos + 8] == RPC_HEARTBEAT)
        c->rpos += 9;
    if (c->rpos == c->rlen)
        c->rpos = c->rlen = 0;
    /* Frames that came with the end of the stream are served first, as a reading thread
     * would (it meets the end again on its next read). */
    if (!atomic_load(&c->dead) &&
        (c->rlen > 0 || (rc == PCONN_OK && wants_write) ||
         (rc == PCONN_OK && c->cfg.transport != NULL && c->cfg.transport->pending != NULL &&
          c->cfg.transport->pending(c->session) > 0)))
        return RPC_UNPARK;
    int64_t now = pconn__mono_ns(), dead_at = pconn__rpc_after_ms(c->last_recv_ns, c->cfg.hb_timeout_ms);
    if (rc == PCONN_OK && now >= dead_at)
        rc = PCONN_ETIMEDOUT;
    if (rc == PCONN_OK && now >= c->next_send_ns) {
        uint8_t h[9];
        pconn__rpc_frame_head(h, RPC_HEARTBEAT, 0, 0);
        if (pconn__rpc_write_frame(c, h, sizeof h, NULL, 0, 0) == WF_TIMEOUT_MIDFRAME)
            rc = PCONN_EIO;
        c->next_send_ns = pconn__rpc_after_ms(now, c->cfg.hb_every_ms);
    }
    if (rc != PCONN_OK) {
        char why[8] = "";
        pconn__rpc_handle_frame(c, 0, rc, NULL, NULL, 0, NULL, 0, why, sizeof why, sys_errno); /* fails it */
        return parked_ended(c);
    }
    *next_ns = dead_at < c->next_send_ns ? dead_at : c->next_send_ns;
    return RPC_PARKED;
}

void pconn__rpc_conn_unpark(pconn_conn_t *conn)
{
    rpc_conn_t *c = pconn_conn_impl(conn);
    if (pconn__rpc_start_reader(c) == 0)
        return;
    pconn__rpc_fail(c, PCONN_ENOMEM, "no thread to read the connection");
    parked_ended(c);
}

void pconn__rpc_conn_parked_end(pconn_conn_t *conn)
{
    pconn_conn_close(conn);
    parked_ended(pconn_conn_impl(conn));
}
