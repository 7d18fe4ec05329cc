/* tcp.c - TCP and Unix stream connections: a cancellable non-blocking connect over every
 * address of a name, socket options, and the listening side servers and tests use. */
#include "rpc/rpc.h"
#include "tls.h"

#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_CONNECT_TIMEOUT_MS 10000
#define DEFAULT_KEEPALIVE_IDLE_S 30
#define DEFAULT_USER_TIMEOUT_MS 30000

typedef struct tcp_conn_t {
    int fd;
    void *session; /* from on_connect, freed by session_free(arg, session) */
    void (*session_free)(void *arg, void *session);
    void *arg;
} tcp_conn_t;

static void tcp_close(void *impl)
{
    shutdown(((tcp_conn_t *)impl)->fd, SHUT_RDWR);
}

static void tcp_destroy(void *impl)
{
    tcp_conn_t *t = impl;
    if (t->session != NULL && t->session_free != NULL)
        t->session_free(t->arg, t->session);
    close(t->fd);
    free(impl);
}

static int tcp_fd(void *impl)
{
    return ((tcp_conn_t *)impl)->fd;
}

static const pconn_conn_ops_t tcp_ops = {tcp_close, tcp_destroy, tcp_fd};

/* ---- connecting ------------------------------------------------------------------ */

static void numeric_host(const struct sockaddr *sa, socklen_t len, char *buf, size_t size)
{
    if (getnameinfo(sa, len, buf, (socklen_t)size, NULL, 0, NI_NUMERICHOST) != 0)
        snprintf(buf, size, "?");
}

static void set_int_opt(int fd, int level, int name, int value)
{
    /* Best effort: an option the kernel lacks must not fail the connection. */
    (void)setsockopt(fd, level, name, &value, sizeof value);
}

static void apply_tcp_options(int fd, const pconn_tcp_options_t *o)
{
    if (o->nodelay)
        set_int_opt(fd, IPPROTO_TCP, TCP_NODELAY, 1);
    int idle = o->keepalive_idle_s == 0 ? DEFAULT_KEEPALIVE_IDLE_S : o->keepalive_idle_s;
    if (idle > 0) {
        int interval = idle / 3 > 0 ? idle / 3 : 1;
        set_int_opt(fd, SOL_SOCKET, SO_KEEPALIVE, 1);
        set_int_opt(fd, IPPROTO_TCP, TCP_KEEPIDLE, idle);
        set_int_opt(fd, IPPROTO_TCP, TCP_KEEPINTVL, interval);
        set_int_opt(fd, IPPROTO_TCP, TCP_KEEPCNT, 3);
    }
    int user_timeout = o->user_timeout_ms == 0 ? DEFAULT_USER_TIMEOUT_MS : o->user_timeout_ms;
    if (user_timeout > 0)
        set_int_opt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, user_timeout);
}

static int bind_local(int fd, int family, const char *bind_address, const char *address,
                      pconn_error_t *err)
{
    struct addrinfo hints = {.ai_family = family,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(bind_address, "0", &hints, &ai);
    if (gai != 0) {
        pconn_error_set(err, PCONN_EINVAL, 0, "connect %s: bind address %s: %s", address,
                        bind_address, gai_strerror(gai));
        return PCONN_EINVAL;
    }
    int rc = bind(fd, ai->ai_addr, ai->ai_addrlen);
    int e = errno;
    freeaddrinfo(ai);
    if (rc != 0) {
        pconn_error_set(err, PCONN_ECONNECT, e, "connect %s: bind %s", address, bind_address);
        return PCONN_ECONNECT;
    }
    return PCONN_OK;
}

/* Waits for a non-blocking connect to finish, the deadline, or the pconn's close. */
static int wait_connect_done(int fd, int64_t deadline, const char *address, const char *ip,
                          int64_t timeout_ms, pconn_error_t *err)
{
    short revents = 0;
    int rc = pconn__wait_cancellable(fd, POLLOUT, deadline, &revents);
    if (rc == PCONN_EIO) {
        pconn_error_set(err, PCONN_ECONNECT, errno, "connect %s (%s): poll", address, ip);
        return PCONN_ECONNECT;
    }
    if (rc == PCONN_ETIMEDOUT) {
        pconn_error_set(err, PCONN_ETIMEDOUT, 0, "connect %s (%s): timed out after %lld ms",
                        address, ip, (long long)timeout_ms);
        return PCONN_ETIMEDOUT;
    }
    if (rc == PCONN_ECLOSED) {
        pconn_error_set(err, PCONN_ECLOSED, 0, "connect %s: interrupted by close", address);
        return PCONN_ECLOSED;
    }
    if (revents == POLLOUT)
        return PCONN_OK; /* a failed connect also shows POLLERR: no getsockopt() */
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0)
        soerr = errno;
    if (soerr != 0) {
        pconn_error_set(err, PCONN_ECONNECT, soerr, "connect %s (%s)", address, ip);
        return PCONN_ECONNECT;
    }
    return PCONN_OK;
}

/* One socket, one address. Returns the connected, blocking fd or -1 with err set. */
static int connect_one(const struct sockaddr *sa, socklen_t salen, int family,
                       const pconn_tcp_options_t *o, int64_t deadline, int64_t timeout_ms,
                       const char *address, pconn_error_t *err)
{
    char ip[INET6_ADDRSTRLEN + 8];
    if (family == AF_UNIX)
        snprintf(ip, sizeof ip, "unix");
    else
        numeric_host(sa, salen, ip, sizeof ip);
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        pconn_error_set(err, PCONN_ECONNECT, errno, "connect %s: socket", address);
        return -1;
    }
    if (family != AF_UNIX && o->bind_address != NULL &&
        bind_local(fd, family, o->bind_address, address, err) != PCONN_OK)
        goto fail;
    int rc = connect(fd, sa, salen);
    int e = errno;
    /* The options need no round trip: set while the handshake is on its way. */
    if (family != AF_UNIX)
        apply_tcp_options(fd, o);
    errno = e;
    if (rc != 0) {
        if (errno == EAGAIN && family == AF_UNIX) {
            pconn_error_set(err, PCONN_ECONNECT, EAGAIN, "connect %s: listen backlog full", address);
            goto fail;
        }
        if (errno != EINPROGRESS && errno != EINTR) {
            pconn_error_set(err, PCONN_ECONNECT, errno, "connect %s (%s)", address, ip);
            goto fail;
        }
        if (wait_connect_done(fd, deadline, address, ip, timeout_ms, err) != PCONN_OK)
            goto fail;
    }
    if (fcntl(fd, F_SETFL, O_RDWR) != 0) { /* blocking again; it was made O_RDWR|O_NONBLOCK */
        pconn_error_set(err, PCONN_ECONNECT, errno, "connect %s: fcntl", address);
        goto fail;
    }
    return fd;
fail:
    close(fd);
    return -1;
}

static int make_conn(int fd, const pconn_tcp_options_t *o, void *session, pconn_conn_t **conn,
                     const char *address, pconn_error_t *err)
{
    tcp_conn_t *t = malloc(sizeof *t);
    pconn_conn_t *c = t != NULL ? pconn_conn_new(&tcp_ops, t) : NULL;
    if (c == NULL) {
        free(t);
        if (session != NULL && o->session_free != NULL)
            o->session_free(o->on_connect_arg, session);
        close(fd);
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "connect %s", address);
        return PCONN_ENOMEM;
    }
    t->fd = fd;
    t->session = session;
    t->session_free = o->session_free;
    t->arg = o->on_connect_arg;
    pconn__conn_set_address(c, address);
    *conn = c;
    return PCONN_OK;
}

static int connect_unix(const pconn__addr_t *a, const pconn_tcp_options_t *o, int64_t deadline,
                        int64_t timeout_ms, const char *address, pconn_error_t *err)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    size_t len = strlen(a->path);
    memcpy(sun.sun_path, a->path, len);
    if (a->path[0] == '@')
        sun.sun_path[0] = '\0'; /* the abstract namespace */
    socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + (a->path[0] != '@'));
    return connect_one((struct sockaddr *)&sun, salen, AF_UNIX, o, deadline, timeout_ms, address, err);
}

static void set_io_timeout(int fd, int64_t ms)
{
    struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* True when the fd's receive and send timeouts are still ms (the hook left them). */
static bool io_timeout_is(int fd, int64_t ms)
{
    struct timeval r, w;
    socklen_t rl = sizeof r, wl = sizeof w;
    if (getsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &r, &rl) != 0 ||
        getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &w, &wl) != 0)
        return false;
    /* The kernel rounds to its tick: compare in ms, allowing one tick's difference. */
    int64_t rms = (int64_t)r.tv_sec * 1000 + r.tv_usec / 1000;
    int64_t wms = (int64_t)w.tv_sec * 1000 + w.tv_usec / 1000;
    return rms >= ms - 10 && rms <= ms + 10 && wms >= ms - 10 && wms <= ms + 10;
}

/* Runs o->on_connect on a connected fd with I/O bounded by deadline. PCONN_OK with
 * *session set; otherwise the hook's code with err filled, fd closed and the session
 * freed. */
static int run_on_connect(const pconn_tcp_options_t *o, int fd, const char *address,
                          int64_t deadline, void **session, pconn_error_t *err)
{
    int64_t left_ms = (deadline - pconn__mono_ns()) / 1000000;
    int rc = PCONN_ETIMEDOUT;
    if (left_ms < 1) {
        pconn_error_set(err, PCONN_ETIMEDOUT, 0, "connect %s: on_connect: no time left", address);
        goto fail;
    }
    set_io_timeout(fd, left_ms);
    err->code = PCONN_OK;
    err->sys_errno = 0;
    err->message[0] = '\0';
    rc = o->on_connect(o->on_connect_arg, fd, address, session, err);
    if (rc == PCONN_OK) {
        if (io_timeout_is(fd, left_ms))
            set_io_timeout(fd, 0);
        return PCONN_OK;
    }
    err->code = rc;
    if (err->message[0] == '\0')
        pconn_error_set(err, rc, err->sys_errno, "connect %s: on_connect failed: %s", address,
                        pconn_strerror(rc));
fail:
    if (*session != NULL && o->session_free != NULL)
        o->session_free(o->on_connect_arg, *session);
    *session = NULL;
    close(fd);
    return rc;
}

int pconn__tcp_connect_fd(const pconn_tcp_options_t *o, const char *address, pconn_error_t *err)
{
    pconn__addr_t a;
    if (pconn__address_parse(address, false, &a, err) != PCONN_OK)
        return -1;
    int64_t timeout_ms = o->connect_timeout_ms > 0 ? o->connect_timeout_ms : DEFAULT_CONNECT_TIMEOUT_MS;
    int64_t deadline = pconn__deadline_ns(timeout_ms);
    if (a.is_unix)
        return connect_unix(&a, o, deadline, timeout_ms, address, err);

    /* A numeric address needs no resolver: getaddrinfo() costs more than the connect. */
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(a.port))};
    struct sockaddr_in6 sin6 = {.sin6_family = AF_INET6, .sin6_port = sin.sin_port};
    if (inet_pton(AF_INET, a.host, &sin.sin_addr) == 1)
        return connect_one((struct sockaddr *)&sin, sizeof sin, AF_INET, o, deadline, timeout_ms, address, err);
    if (inet_pton(AF_INET6, a.host, &sin6.sin6_addr) == 1)
        return connect_one((struct sockaddr *)&sin6, sizeof sin6, AF_INET6, o, deadline, timeout_ms, address, err);

    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV};
    struct addrinfo *list = NULL;
    int gai, sys_errno;
    int rc = pconn__getaddrinfo(a.host, a.port, &hints, deadline, &list, &gai, &sys_errno);
    if (rc == PCONN_ECLOSED) {
        pconn_error_set(err, PCONN_ECLOSED, 0, "connect %s: resolve %s: interrupted by close",
                        address, a.host);
        return -1;
    }
    if (rc == PCONN_ETIMEDOUT) {
        pconn_error_set(err, PCONN_ETIMEDOUT, 0, "connect %s: resolve %s: timed out after %lld ms",
                        address, a.host, (long long)timeout_ms);
        return -1;
    }
    if (rc != PCONN_OK) {
        pconn_error_set(err, PCONN_ERESOLVE, gai == EAI_SYSTEM ? sys_errno : 0,
                        "connect %s: resolve %s: %s", address, a.host, gai_strerror(gai));
        return -1;
    }
    int tried = 0, fd = -1;
    for (struct addrinfo *ai = list; ai != NULL && fd < 0; ai = ai->ai_next) {
        tried++;
        fd = connect_one(ai->ai_addr, ai->ai_addrlen, ai->ai_family, o, deadline, timeout_ms,
                         address, err);
        if (fd < 0 && (err->code == PCONN_ECLOSED || err->code == PCONN_ETIMEDOUT ||
                       err->code == PCONN_EINVAL))
            break; /* no time left, or no point trying the others */
    }
    freeaddrinfo(list);
    if (fd < 0 && tried > 1) {
        size_t n = strlen(err->message);
        snprintf(err->message + n, sizeof err->message - n, " (%d addresses tried)", tried);
    }
    return fd;
}

int pconn_tcp_connect(void *tcp_options, const char *address, pconn_conn_t **conn,
                      pconn_error_t *err)
{
    static const pconn_tcp_options_t defaults = {0};
    const pconn_tcp_options_t *o = tcp_options != NULL ? tcp_options : &defaults;
    pconn_error_t local;
    if (err == NULL)
        err = &local;
    if (conn == NULL) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_tcp_connect: conn is NULL");
        return PCONN_EINVAL;
    }
    *conn = NULL;
    int64_t deadline = pconn__deadline_ns(o->connect_timeout_ms > 0 ? o->connect_timeout_ms
                                                                     : DEFAULT_CONNECT_TIMEOUT_MS);
    int fd = pconn__tcp_connect_fd(o, address, err);
    if (fd < 0)
        return err->code;
    void *session = NULL;
    if (o->on_connect != NULL && run_on_connect(o, fd, address, deadline, &session, err) != PCONN_OK)
        return err->code;
    return make_conn(fd, o, session, conn, address, err);
}

void *pconn_tcp_session(const pconn_conn_t *conn)
{
    if (conn == NULL || pconn__conn_ops(conn) != &tcp_ops)
        return NULL;
    return ((tcp_conn_t *)pconn_conn_impl(conn))->session;
}

int pconn_tcp_fd(const pconn_conn_t *conn)
{
    if (conn == NULL || pconn__conn_ops(conn) != &tcp_ops)
        return -1;
    return ((tcp_conn_t *)pconn_conn_impl(conn))->fd;
}

/* The checks pconn_tcp_send_all() and pconn_tcp_recv() share: PCONN_OK for a TCP or
 * TLS connection that was not inherited across fork(). */
static int io_check(const pconn_conn_t *conn, const char *fn, const char *what, pconn_error_t *err)
{
    if (pconn_tcp_fd(conn) < 0 && !pconn_tls_is_tls(conn)) {
        pconn_error_set(err, PCONN_EINVAL, 0, "%s: not a TCP or TLS connection", fn);
        return PCONN_EINVAL;
    }
    if (pconn__conn_inherited(conn)) {
        pconn_error_set(err, PCONN_ECLOSED, 0, "%s %s: connection inherited across fork()", what,
                        pconn_conn_address(conn));
        return PCONN_ECLOSED;
    }
    return PCONN_OK;
}

ssize_t pconn_tcp_recv(const pconn_conn_t *conn, void *buf, size_t len, int64_t timeout_ms,
                       pconn_error_t *err)
{
    if (io_check(conn, "pconn_tcp_recv", "recv from", err) != PCONN_OK)
        return -1;
    if (len == 0 || buf == NULL) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_tcp_recv: %s", buf == NULL ? "buf is NULL" : "len is 0");
        return -1;
    }
    if (pconn_tls_is_tls(conn))
        return pconn__tls_recv(conn, buf, len, timeout_ms, err);
    int fd = pconn_tcp_fd(conn);
    int64_t deadline = pconn__deadline_ns(timeout_ms);
    for (;;) {
        if (pconn_conn_is_closed(conn))
            break;
        ssize_t n = recv(fd, buf, len, MSG_DONTWAIT);
        if (n > 0 || (n == 0 && !pconn_conn_is_closed(conn)))
            return n;
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            if (pconn_conn_is_closed(conn))
                break;
            pconn_error_set(err, PCONN_EIO, errno, "recv from %s", pconn_conn_address(conn));
            return -1;
        }
        /* pconn_conn_close() is shutdown(2): it wakes this poll() at once. */
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int rc = poll(&pfd, 1, pconn__poll_timeout_ms(deadline));
        if (rc == 0) {
            pconn_error_set(err, PCONN_ETIMEDOUT, 0, "recv from %s: timed out after %lld ms",
                            pconn_conn_address(conn), (long long)timeout_ms);
            return -1;
        }
    }
    pconn_error_set(err, PCONN_ECLOSED, 0, "recv from %s: connection closed", pconn_conn_address(conn));
    return -1;
}

int pconn_tcp_send_all(const pconn_conn_t *conn, const void *buf, size_t len, pconn_error_t *err)
{
    int rc = io_check(conn, "pconn_tcp_send_all", "send to", err);
    if (rc != PCONN_OK)
        return rc;
    if (pconn_tls_is_tls(conn))
        return pconn__tls_send_all(conn, buf, len, err);
    int fd = pconn_tcp_fd(conn);
    const char *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 && pconn_conn_is_closed(conn)) {
            pconn_error_set(err, PCONN_ECLOSED, 0, "send to %s: connection closed", pconn_conn_address(conn));
            return PCONN_ECLOSED;
        }
        if (n <= 0) {
            pconn_error_set(err, PCONN_EIO, n < 0 ? errno : 0, "send to %s", pconn_conn_address(conn));
            return PCONN_EIO;
        }
        p += n;
        len -= (size_t)n;
    }
    return PCONN_OK;
}

static void free_options(void *arg)
{
    pconn_tcp_options_t *o = arg;
    free((char *)o->bind_address);
    free(o);
}

int pconn_tcp_create(const pconn_options_t *opts, const pconn_tcp_options_t *tcp, pconn_t **out)
{
    pconn_error_t err;
    if (opts != NULL && pconn__resolver_check_addresses(opts->resolver, &err) != PCONN_OK) {
        pconn_resolver_free(opts->resolver);
        if (out != NULL)
            *out = NULL;
        return PCONN_EINVAL;
    }
    pconn_tcp_options_t *copy = calloc(1, sizeof *copy);
    if (copy != NULL && tcp != NULL) {
        *copy = *tcp;
        if (tcp->bind_address != NULL && (copy->bind_address = strdup(tcp->bind_address)) == NULL) {
            free(copy);
            copy = NULL;
        }
    }
    if (opts == NULL || copy == NULL) {
        if (copy != NULL)
            free_options(copy);
        if (opts != NULL)
            pconn_resolver_free(opts->resolver);
        if (out != NULL)
            *out = NULL;
        return opts == NULL ? PCONN_EINVAL : PCONN_ENOMEM;
    }
    pconn_options_t o = *opts;
    o.connect = pconn_tcp_connect;
    o.connect_arg = copy;
    return pconn__create(&o, free_options, out);
}

/* ---- listening ------------------------------------------------------------------- */

static int listen_unix(const pconn__addr_t *a, int backlog, const char *address, pconn_error_t *err)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    size_t len = strlen(a->path);
    memcpy(sun.sun_path, a->path, len);
    bool abstract = a->path[0] == '@';
    if (abstract)
        sun.sun_path[0] = '\0';
    socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + !abstract);
    struct stat st;
    if (!abstract && stat(a->path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        /* Replace only a dead socket: one that refuses connections. A live server keeps
         * its path (bind then fails with EADDRINUSE). */
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe >= 0 && connect(probe, (struct sockaddr *)&sun, salen) != 0 &&
            errno == ECONNREFUSED)
            unlink(a->path); /* a stale socket of an earlier run */
        if (probe >= 0)
            close(probe);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sun, salen) != 0 || listen(fd, backlog) != 0) {
        pconn_error_set(err, PCONN_EIO, errno, "listen %s", address);
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

int pconn_tcp_listen(const char *address, int backlog, pconn_error_t *err)
{
    pconn__addr_t a;
    if (pconn__address_parse(address, true, &a, err) != PCONN_OK)
        return -1;
    if (backlog <= 0)
        backlog = SOMAXCONN;
    if (a.is_unix)
        return listen_unix(&a, backlog, address, err);
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *list = NULL;
    int gai = getaddrinfo(a.host, a.port, &hints, &list);
    if (gai != 0) {
        pconn_error_set(err, PCONN_ERESOLVE, 0, "listen %s: %s", address, gai_strerror(gai));
        return -1;
    }
    int fd = socket(list->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int e = errno;
    if (fd >= 0) {
        set_int_opt(fd, SOL_SOCKET, SO_REUSEADDR, 1);
        if (bind(fd, list->ai_addr, list->ai_addrlen) != 0 || listen(fd, backlog) != 0) {
            e = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(list);
    if (fd < 0)
        pconn_error_set(err, PCONN_EIO, e, "listen %s", address);
    return fd;
}

int pconn_tcp_local_address(int fd, char *buf, size_t size)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
        return PCONN_EINVAL;
    int n;
    if (size > 0)
        buf[0] = '\0';
    if (ss.ss_family == AF_UNIX) {
        struct sockaddr_un *sun = (struct sockaddr_un *)&ss;
        if (len <= offsetof(struct sockaddr_un, sun_path))
            return PCONN_EINVAL; /* unnamed (socketpair, unbound): no address to tell */
        size_t plen = len - offsetof(struct sockaddr_un, sun_path);
        if (sun->sun_path[0] == '\0')
            n = snprintf(buf, size, "unix:@%.*s", (int)(plen - 1), sun->sun_path + 1);
        else
            n = snprintf(buf, size, "unix:%.*s", (int)strnlen(sun->sun_path, plen), sun->sun_path);
    } else {
        char host[INET6_ADDRSTRLEN], port[8];
        if (getnameinfo((struct sockaddr *)&ss, len, host, sizeof host, port, sizeof port,
                        NI_NUMERICHOST | NI_NUMERICSERV) != 0)
            return PCONN_EINVAL;
        n = snprintf(buf, size, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
    }
    return n >= 0 && (size_t)n < size ? PCONN_OK : PCONN_EINVAL;
}
