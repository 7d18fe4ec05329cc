/* call.c - our calls: each waits for its answer as a pending call on the caller's
 * stack; a client's callers read for each other (leader/follower) and its watcher
 * thread reads while no call waits; pconn_rpc_call() and pconn_rpc_call_many(). */
#include "conn.h"

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
void *pconn__rpc_watch_main(void *arg)
{
    rpc_conn_t *c = arg;
    pconn__rpc_tl_reader = c;
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
            while ((a = pconn__rpc_read_one(c, 0)) == FRAME_GO_ON)
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
    pconn__rpc_reader_exit(c);
    pconn__rpc_tl_reader = NULL;
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
        if ((done && !frame_buffered(c)) || (a = pconn__rpc_read_one(c, 0)) != FRAME_GO_ON)
            break;
    }
    c->lead_deadline_ns = 0;
    *answers_left = c->nanswers > 0; /* answers to the peer's queries: the watcher sends them */
    return a;
}

/* Under c->lock, with the reading role free: leads for the batch ps[0..n) (the lock is
 * dropped meanwhile), then frees the role; what lead() said. */
static int lead_locked(rpc_conn_t *c, const pending_t *ps, size_t n, int64_t deadline)
{
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
    return a;
}

/* A caller whose request could not go out by its deadline: the peer may be reading
 * nothing until the answers to earlier calls are read, so the caller takes what has
 * arrived, once, for everyone, when no one else reads (as a caller past its deadline
 * does for its answer). Without it a loop of timeout-0 calls against a slow server
 * stopped reading altogether. */
static void drain_once(rpc_conn_t *c, int64_t deadline)
{
    pending_t never = {.id = 1}; /* not done, ever: lead() reads until its deadline */
    pconn__mutex_lock(&c->lock);
    if (!c->cfg.server && c->role == ROLE_NONE && !c->watcher_wanted && !c->failed)
        lead_locked(c, &never, 1, deadline);
    _Atomic uint32_t *next = elect_locked(c);
    pconn__mutex_unlock(&c->lock);
    wake(next);
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
    if (pconn__rpc_tl_inline == c) {
        /* A handler on the reading thread calls its peer back: the answer comes in on
         * this connection, so someone else must read it. */
        if (pconn__rpc_handoff(c, 0, pconn__rpc_tl_inline_gen) == NOT_HANDED && !atomic_load(&c->dead)) {
            for (size_t i = 0; i < n; i++) {
                calls[i].resp = (pconn_buf_t){0};
                calls[i].status = local_error(&calls[i].err, PCONN_ENOMEM,
                                              "rpc %s: no thread to read the answer (a handler on the "
                                              "reading thread calls its peer)", c->address);
            }
            return;
        }
        pconn__rpc_tl_inline = NULL;
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
        pconn__rpc_frame_head(h, RPC_QUERY, fixed, calls[i].req_len);
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
    int wrc = pconn__rpc_write_frames(c, iov, iovcnt, deadline);
    if (wrc == WF_TIMEOUT || wrc == WF_TIMEOUT_MIDFRAME) {
        /* The calls' timeout covers sending (issue 9, defect 3). */
        for (size_t i = 0; i < n; i++)
            if (ps[i].id != 0)
                forget(c, &ps[i]);
        if (wrc == WF_TIMEOUT_MIDFRAME)
            pconn__rpc_fail(c, PCONN_EIO, "a request left half-sent after %lld ms: the peer does not read",
                 (long long)timeout_ms);
        else
            drain_once(c, deadline);
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
        pconn__rpc_fail(c, PCONN_EIO, "connection lost while sending: %s", strerror(errno));

    /* Wait, or read for everyone (a client, while no one else reads). */
    pconn__mutex_lock(&c->lock);
    for (size_t i = 0; i < n; i++)
        ps[i].waiting = ps[i].id != 0;
    c->waiters++;
    bool can_lead = !c->cfg.server;
    while (!batch_done_locked(ps, n)) {
        if (can_lead && c->role == ROLE_NONE && !c->watcher_wanted && !c->failed) {
            if (lead_locked(c, ps, n, deadline) == RD_DEADLINE)
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
    int bad = conn == NULL || pconn__conn_ops(conn) != &pconn__rpc_ops ? PCONN_EINVAL
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
    if (conn == NULL || pconn__conn_ops(conn) != &pconn__rpc_ops || resp == NULL)
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
