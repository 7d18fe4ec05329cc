/* conn.h - an RPC connection's insides, shared by the files that work on it:
 *   framing.c    frames out: raw I/O through the transport, writes with deadlines, one
 *                writer at a time (wire.c decodes what comes in)
 *   handshake.c  the HELLO exchange, as a state machine that never blocks
 *   conn.c       the connection's life: opening, reading frames, failure, the end of the
 *                reading role, the connection type
 *   serve.c      the peer's queries: handlers on the reading thread, queued answers,
 *                the hand-over of the reading role, parked (idle) connections
 *   call.c       our calls: pending calls, leader/follower reading, pconn_rpc_call()
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
 * c->lock is held only briefly, never while writing or calling out; c->wq_lock only
 * briefly, around the write queue, never together with c->lock; c->role_lock only
 * around a hand-over (before c->lock when both). */
#ifndef PCONN_RPC_CONN_H
#define PCONN_RPC_CONN_H

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
static inline _Atomic uint32_t *poke_locked(waiter_t *w)
{
    atomic_fetch_add(&w->word, 1);
    if (!w->asleep)
        return NULL;
    w->asleep = false;
    return &w->word;
}

static inline void wake(_Atomic uint32_t *word)
{
    if (word != NULL)
        syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Until *word moves from seen, a wake, or deadline_ns (INT64_MAX: none). */
static inline void wait_word(_Atomic uint32_t *word, uint32_t seen, int64_t deadline_ns)
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
    /* Writes combined (framing.c), guarded by wq_lock: the writers waiting, whether one
     * writes, and whether a cut frame ended the stream. */
    pthread_mutex_t wq_lock;
    struct wreq_t *wq_first, *wq_last;
    bool writing, wq_broken;
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

    /* The handshake's (handshake.c): its state, bytes of our HELLO sent or of the
     * peer's read, and the peer's HELLO. */
    int hs_state;
    size_t hs_done;
    uint8_t hs_buf[8 + RPC_HELLO_MAX];
} rpc_conn_t;

/* What the reading role's waits say besides pconn codes: a leading caller's deadline
 * passed; the watcher was kicked; a frame a caller may not read is next; the watcher
 * lets go, as callers wait; a server's reading thread has been idle for RPC_PARK_MS. */
enum { RD_DEADLINE = -100, RD_KICKED = -101, RD_BIG = -102, RD_YIELD = -103, RD_PARK = -104 };

/* What the reading role does with a frame: */
enum {
    FRAME_GO_ON,
    FRAME_END, /* the connection failed (pconn__rpc_fail() said why) */
    FRAME_LEFT /* a server's reading thread lost the role while a handler ran: it has
                * answered its query and must leave */
};

/* What pconn__rpc_write_frame() says. */
enum { WF_OK = 0, WF_ERROR = -1, WF_TIMEOUT = -2, WF_TIMEOUT_MIDFRAME = -3 };

/* What pconn__rpc_handoff() did. */
enum { HANDED, NOT_HELD, NOT_HANDED };

/* The connection type (conn.c). */
extern PCONN_HIDDEN const pconn_conn_ops_t pconn__rpc_ops;

/* Per thread. */
/* the connection of the handler running on this thread */
extern PCONN_HIDDEN _Thread_local pconn_conn_t *pconn__rpc_tl_handler_conn;
/* its handler runs on this reading thread */
extern PCONN_HIDDEN _Thread_local rpc_conn_t *pconn__rpc_tl_inline;
/* as the holder of this role number */
extern PCONN_HIDDEN _Thread_local uint64_t pconn__rpc_tl_inline_gen;
/* this thread is (or was) its reading thread */
extern PCONN_HIDDEN _Thread_local rpc_conn_t *pconn__rpc_tl_reader;
/* the peer of the handler running on this thread */
extern PCONN_HIDDEN _Thread_local const pconn_rpc_peer_t *pconn__rpc_tl_handler_peer;

/* framing.c: frames out (raw I/O through the transport, writes with deadlines) */
PCONN_HIDDEN short pconn__rpc_transport_wants(const rpc_conn_t *c, int writing);
PCONN_HIDDEN ssize_t pconn__rpc_raw_read(rpc_conn_t *c, void *buf, size_t len);
PCONN_HIDDEN ssize_t pconn__rpc_raw_write(rpc_conn_t *c, const void *buf, size_t len);
PCONN_HIDDEN int64_t pconn__rpc_after_ms(int64_t base_ns, int64_t ms);
PCONN_HIDDEN int pconn__rpc_write_frames(rpc_conn_t *c, struct iovec *iov, int iovcnt,
                                         int64_t deadline_ns);
PCONN_HIDDEN int pconn__rpc_write_frame(rpc_conn_t *c, const uint8_t *head, size_t head_len,
                                        const void *data, size_t data_len, int64_t deadline_ns);
PCONN_HIDDEN size_t pconn__rpc_frame_head(uint8_t *h, uint8_t type, size_t fixed_len,
                                          size_t data_len);
PCONN_HIDDEN void pconn__rpc_send_close(rpc_conn_t *c, int code, const char *msg);
PCONN_HIDDEN int pconn__rpc_send_response(rpc_conn_t *c, uint64_t id, int code, const void *data,
                                          size_t len);

/* handshake.c: the HELLO exchange */
PCONN_HIDDEN int pconn__rpc_hs_step(rpc_conn_t *c, short *events, pconn_error_t *err);
PCONN_HIDDEN int pconn__rpc_hs_expired(rpc_conn_t *c, pconn_error_t *err);
PCONN_HIDDEN int pconn__rpc_hs_run(rpc_conn_t *c, int64_t deadline_ns, int cancel_fd,
                                   bool (*cancelled)(void), pconn_error_t *err);

/* conn.c: the connection's life and reading */
PCONN_HIDDEN void pconn__rpc_fail(rpc_conn_t *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
PCONN_HIDDEN int pconn__rpc_handle_frame(rpc_conn_t *c, uint64_t me, int rc, rpc_msg_t *m,
                                         uint8_t *owned, uint64_t big, const uint8_t *head,
                                         size_t head_len, char *why, size_t why_size,
                                         int sys_errno);
PCONN_HIDDEN int pconn__rpc_read_one(rpc_conn_t *c, uint64_t me);
PCONN_HIDDEN void pconn__rpc_reader_exit(rpc_conn_t *c);

/* serve.c: serving the peer's queries */
PCONN_HIDDEN void pconn__rpc_free_answers(rpc_conn_t *c);
PCONN_HIDDEN int pconn__rpc_flush_answers(rpc_conn_t *c);
PCONN_HIDDEN bool pconn__rpc_serve_query(rpc_conn_t *c, uint64_t me, const rpc_msg_t *m,
                                         uint8_t *owned);
PCONN_HIDDEN int pconn__rpc_handoff(rpc_conn_t *c, int64_t since_ns, uint64_t gen);
/* A server's reading role of c goes to a thread of cfg.start_reader's: 0, or -1 when
 * none could be had. */
PCONN_HIDDEN int pconn__rpc_start_reader(rpc_conn_t *c);

/* call.c: calls */
PCONN_HIDDEN void *pconn__rpc_watch_main(void *arg);

#endif
