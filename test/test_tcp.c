/* test_tcp.c - TCP and Unix connections against real loopback servers, failover between
 * servers, hang-up detection, connect timeouts, close during connect, address errors. */
#include "common.h"
#include "common_server.h"
#include "pconn_resolver.h"
#include "pconn_tcp.h"

#include <errno.h>
#include <jansson.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int64_t no_delay(void *arg, unsigned failures)
{
    (void)arg, (void)failures;
    return 0;
}

/* A persistent TCP connection to the given addresses, retrying without delay. */
static pconn_t *client(recorder_t *rec, pconn_resolver_t *r, const pconn_tcp_options_t *tcp)
{
    pconn_options_t o = {
        .server_name = "tcp",
        .resolver = r,
        .on_event = rec_on_event,
        .on_event_arg = rec,
        .retry_delay = no_delay,
    };
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL(pconn_tcp_create(&o, tcp, &pc), PCONN_OK);
    return pc;
}

static pconn_t *client_to(recorder_t *rec, const char *address, const pconn_tcp_options_t *tcp)
{
    const char *list[] = {address};
    return client(rec, pconn_resolver_static(list, 1), tcp);
}

static int sockopt(int fd, int level, int name)
{
    int v = -1;
    socklen_t len = sizeof v;
    getsockopt(fd, level, name, &v, &len);
    return v;
}

static void test_connect_and_echo(void)
{
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_ECHO), 0);
    recorder_t rec;
    rec_init(&rec);
    pconn_tcp_options_t tcp = {.nodelay = true};
    pconn_t *pc = client_to(&rec, s.address, &tcp);
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &c), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(pconn_conn_address(c), s.address);
    int fd = pconn_tcp_fd(c);
    CU_ASSERT_FATAL(fd >= 0);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(c, "ping\n", 5, NULL), PCONN_OK);
    char buf[8] = {0};
    CU_ASSERT_EQUAL(recv(fd, buf, 5, MSG_WAITALL), 5);
    CU_ASSERT_STRING_EQUAL(buf, "ping\n");
    /* Blocking, close-on-exec, and the options asked for or defaulted. */
    CU_ASSERT_EQUAL(fcntl(fd, F_GETFL) & O_NONBLOCK, 0);
    CU_ASSERT_NOT_EQUAL(fcntl(fd, F_GETFD) & FD_CLOEXEC, 0);
    CU_ASSERT_EQUAL(sockopt(fd, IPPROTO_TCP, TCP_NODELAY), 1);
    CU_ASSERT_EQUAL(sockopt(fd, SOL_SOCKET, SO_KEEPALIVE), 1);
    CU_ASSERT_EQUAL(sockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE), 30);
    CU_ASSERT_EQUAL(sockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT), 30000);
    pconn_conn_unref(c);
    pconn_free(pc);
    rec_destroy(&rec);
    tserver_stop(&s);
}

static void test_options_off(void)
{
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_HOLD), 0);
    pconn_tcp_options_t tcp = {.keepalive_idle_s = -1, .user_timeout_ms = -1,
                               .bind_address = "127.0.0.2"};
    pconn_conn_t *c = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_tcp_connect(&tcp, s.address, &c, &err), PCONN_OK);
    int fd = pconn_tcp_fd(c);
    CU_ASSERT_EQUAL(sockopt(fd, SOL_SOCKET, SO_KEEPALIVE), 0);
    CU_ASSERT_EQUAL(sockopt(fd, IPPROTO_TCP, TCP_NODELAY), 0);
    CU_ASSERT_EQUAL(sockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT), 0);
    char local[64];
    CU_ASSERT_EQUAL(pconn_tcp_local_address(fd, local, sizeof local), PCONN_OK);
    CU_ASSERT_EQUAL(strncmp(local, "127.0.0.2:", 10), 0); /* bind_address was used */
    pconn_conn_unref(c);

    tcp.bind_address = "not-an-ip";
    CU_ASSERT_EQUAL(pconn_tcp_connect(&tcp, s.address, &c, &err), PCONN_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "bind address not-an-ip"));
    tserver_stop(&s);
}

static void test_server_close_reconnects(void)
{
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_HOLD), 0);
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc = client_to(&rec, s.address, NULL);
    CU_ASSERT_NOT_EQUAL_FATAL(rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS), -1);
    CU_ASSERT_EQUAL(tserver_wait_accepted(&s, 1, WAIT_MS), 1);
    tserver_drop_all(&s); /* the server closes: hang-up, DISCONNECTED, a new cycle */
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 1, WAIT_MS), -1);
    char letters[64];
    rec_letters(&rec, letters, sizeof letters);
    CU_ASSERT_EQUAL(strncmp(letters, "AOCDAOC", 7), 0);
    pconn_free(pc);
    rec_destroy(&rec);
    tserver_stop(&s);
}

static void test_failover_static(void)
{
    tserver_t s1, s2;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s1, "127.0.0.1:0", SERVER_HOLD), 0);
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s2, "127.0.0.1:0", SERVER_HOLD), 0);
    recorder_t rec;
    rec_init(&rec);
    const char *list[] = {s1.address, s2.address};
    pconn_t *pc = client(&rec, pconn_resolver_static(list, 2), NULL);
    int i = rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    CU_ASSERT_STRING_EQUAL(rec_get(&rec, i).address, s1.address);
    tserver_stop(&s1); /* the first server dies */
    i = rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 1, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    CU_ASSERT_STRING_EQUAL(rec_get(&rec, i).address, s2.address);
    pconn_conn_t *c = pconn_current(pc);
    CU_ASSERT_PTR_NOT_NULL(c);
    if (c != NULL)
        CU_ASSERT_STRING_EQUAL(pconn_conn_address(c), s2.address);
    pconn_conn_unref(c);
    pconn_free(pc);
    rec_destroy(&rec);
    tserver_stop(&s2);
}

static void write_file(const char *path, const char *text)
{
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fputs(text, f);
    fclose(f);
    CU_ASSERT_EQUAL(rename(tmp, path), 0);
}

static void test_failover_file(void)
{
    char dir[] = "/tmp/pconn-test-XXXXXX";
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
    char path[256], text[256];
    snprintf(path, sizeof path, "%s/address", dir);
    tserver_t s1, s2;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s1, "127.0.0.1:0", SERVER_HOLD), 0);
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s2, "127.0.0.1:0", SERVER_HOLD), 0);
    snprintf(text, sizeof text, "# where the service is\n  %s  \n", s1.address);
    write_file(path, text);
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc = client(&rec, pconn_resolver_file(path), NULL);
    int i = rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    CU_ASSERT_STRING_EQUAL(rec_get(&rec, i).address, s1.address);
    /* The deployment tool moves the service, then the old server goes. */
    snprintf(text, sizeof text, "%s\n", s2.address);
    write_file(path, text);
    tserver_stop(&s1);
    i = rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 1, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    CU_ASSERT_STRING_EQUAL(rec_get(&rec, i).address, s2.address);
    pconn_free(pc);
    rec_destroy(&rec);
    tserver_stop(&s2);
    unlink(path);
    rmdir(dir);
}

static void test_server_down_then_up(void)
{
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_HOLD), 0);
    char address[128];
    snprintf(address, sizeof address, "%s", s.address);
    tserver_stop(&s); /* nothing listens there now */

    recorder_t rec;
    rec_init(&rec);
    pconn_clock_t *clk = pconn_clock_manual_new(0);
    const char *list[] = {address};
    pconn_options_t o = {.server_name = "tcp",
                         .resolver = pconn_resolver_static(list, 1),
                         .on_event = rec_on_event,
                         .on_event_arg = &rec,
                         .clock = clk};
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_tcp_create(&o, NULL, &pc), PCONN_OK);
    CU_ASSERT_EQUAL_FATAL(pconn_clock_wait_sleepers(clk, 1, WAIT_MS), PCONN_OK);
    rec_event_t f = rec_get(&rec, 2);
    CU_ASSERT_EQUAL(f.kind, PCONN_EVENT_FAILED_TO_CONNECT);
    CU_ASSERT_EQUAL(f.error.code, PCONN_ECONNECT);
    CU_ASSERT_EQUAL(f.error.sys_errno, ECONNREFUSED);
    char want[256];
    snprintf(want, sizeof want, "connect %s (127.0.0.1): Connection refused", address);
    CU_ASSERT_STRING_EQUAL(f.error.message, want);

    /* The server comes back on the same port; the next attempt connects. */
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, address, SERVER_HOLD), 0);
    pconn_clock_advance(clk, 20000 * 1000000LL);
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS), -1);
    pconn_free(pc);
    pconn_clock_free(clk);
    rec_destroy(&rec);
    tserver_stop(&s);
}

/* A listener whose accept queue is full: SYNs to it go unanswered. */
static int full_listener(char *address, size_t size, int *fillers, int *nfillers)
{
    pconn_error_t err;
    int lfd = pconn_tcp_listen("127.0.0.1:0", 1, &err);
    if (lfd < 0)
        return -1;
    pconn_tcp_local_address(lfd, address, size);
    *nfillers = 0;
    pconn_tcp_options_t quick = {.connect_timeout_ms = 300};
    for (int i = 0; i < 8; i++) {
        pconn_conn_t *c = NULL;
        int rc = pconn_tcp_connect(&quick, address, &c, &err);
        if (rc == PCONN_ETIMEDOUT)
            return lfd;
        if (rc == PCONN_OK) {
            fillers[(*nfillers)++] = dup(pconn_tcp_fd(c));
            pconn_conn_unref(c);
        }
    }
    close(lfd);
    return -1;
}

static void test_connect_timeout(void)
{
    char address[64];
    int fillers[8], nfillers;
    int lfd = full_listener(address, sizeof address, fillers, &nfillers);
    CU_ASSERT_FATAL(lfd >= 0);
    pconn_tcp_options_t tcp = {.connect_timeout_ms = 250};
    pconn_conn_t *c = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_tcp_connect(&tcp, address, &c, &err), PCONN_ETIMEDOUT);
    CU_ASSERT_PTR_NULL(c);
    char want[128];
    snprintf(want, sizeof want, "connect %s (127.0.0.1): timed out after 250 ms", address);
    CU_ASSERT_STRING_EQUAL(err.message, want);
    for (int i = 0; i < nfillers; i++)
        close(fillers[i]);
    close(lfd);
}

static void test_close_interrupts_connect(void)
{
    char address[64];
    int fillers[8], nfillers;
    int lfd = full_listener(address, sizeof address, fillers, &nfillers);
    CU_ASSERT_FATAL(lfd >= 0);
    recorder_t rec;
    rec_init(&rec);
    pconn_tcp_options_t tcp = {.connect_timeout_ms = 600000}; /* ten minutes */
    pconn_t *pc = client_to(&rec, address, &tcp);
    CU_ASSERT_EQUAL_FATAL(rec_wait(&rec, 2, WAIT_MS), 2); /* connecting now */
    int64_t t0 = pconn_clock_now(NULL);
    /* Without the interruption close would wait the ten minutes out. */
    CU_ASSERT_EQUAL(pconn_close(pc, 10000), PCONN_OK);
    fprintf(stderr, "[close during connect took %.1f ms] ",
            (double)(pconn_clock_now(NULL) - t0) / 1e6);
    char letters[16];
    rec_letters(&rec, letters, sizeof letters);
    CU_ASSERT_STRING_EQUAL(letters, "AO"); /* an interrupted attempt is not a failure */
    pconn_free(pc);
    rec_destroy(&rec);
    for (int i = 0; i < nfillers; i++)
        close(fillers[i]);
    close(lfd);
}

/* Name resolution of "localhost" is the system's (/etc/hosts): a bare chroot has none. */
static bool localhost_resolves(void)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *list = NULL;
    if (getaddrinfo("localhost", "1", &hints, &list) != 0) {
        fprintf(stderr, "[skipped: \"localhost\" does not resolve on this system] ");
        return false;
    }
    freeaddrinfo(list);
    return true;
}

/* A name with several records: each is tried in turn, and the error says how many. */
static void test_every_address_of_a_name(void)
{
    if (!localhost_resolves())
        return;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *list = NULL;
    CU_ASSERT_EQUAL_FATAL(getaddrinfo("localhost", "1", &hints, &list), 0);
    int records = 0;
    bool v4 = false;
    for (struct addrinfo *ai = list; ai != NULL; ai = ai->ai_next) {
        records++;
        v4 = v4 || ai->ai_family == AF_INET;
    }
    freeaddrinfo(list);
    if (!v4) {
        fprintf(stderr, "[skipped: localhost has no IPv4 record here] ");
        return;
    }
    /* Listening on IPv4 only: whatever comes first, the connect ends up there. */
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_HOLD), 0);
    char address[64];
    snprintf(address, sizeof address, "localhost:%s", strrchr(s.address, ':') + 1);
    pconn_conn_t *c = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_tcp_connect(NULL, address, &c, &err), PCONN_OK);
    pconn_conn_unref(c);
    tserver_stop(&s);
    /* Now nothing listens: every record is refused, and the message counts them. */
    CU_ASSERT_EQUAL(pconn_tcp_connect(NULL, address, &c, &err), PCONN_ECONNECT);
    char want[64] = "Connection refused";
    if (records > 1)
        snprintf(want, sizeof want, "Connection refused (%d addresses tried)", records);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, want));
    CU_ASSERT_EQUAL(strncmp(err.message, "connect localhost:", 18), 0);
}

static void test_ipv6_loopback(void)
{
    tserver_t s;
    if (tserver_start(&s, "[::1]:0", SERVER_ECHO) != 0) {
        fprintf(stderr, "[skipped: no IPv6 loopback here] ");
        return;
    }
    CU_ASSERT_EQUAL(strncmp(s.address, "[::1]:", 6), 0);
    pconn_conn_t *c = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_tcp_connect(NULL, s.address, &c, &err), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(c, "v6", 2, NULL), PCONN_OK);
    char buf[3] = {0};
    CU_ASSERT_EQUAL(recv(pconn_tcp_fd(c), buf, 2, MSG_WAITALL), 2);
    CU_ASSERT_STRING_EQUAL(buf, "v6");
    pconn_conn_unref(c);
    tserver_stop(&s);
}

static void test_unix_sockets(void)
{
    char dir[] = "/tmp/pconn-test-XXXXXX";
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
    char listen_at[160];
    snprintf(listen_at, sizeof listen_at, "unix:%s/sock", dir);
    const char *where[] = {listen_at, "unix:@pconn-test-abstract"};
    for (int k = 0; k < 2; k++) {
        tserver_t s;
        CU_ASSERT_EQUAL_FATAL(tserver_start(&s, where[k], SERVER_HOLD), 0);
        CU_ASSERT_STRING_EQUAL(s.address, where[k]);
        recorder_t rec;
        rec_init(&rec);
        pconn_t *pc = client_to(&rec, s.address, NULL);
        CU_ASSERT_NOT_EQUAL(rec_wait_kind(&rec, PCONN_EVENT_CONNECTED, 0, WAIT_MS), -1);
        CU_ASSERT_EQUAL(tserver_wait_accepted(&s, 1, WAIT_MS), 1);
        tserver_drop_all(&s); /* hang-up is seen on Unix sockets too */
        CU_ASSERT_NOT_EQUAL(rec_wait_kind(&rec, PCONN_EVENT_DISCONNECTED, 0, WAIT_MS), -1);
        pconn_free(pc);
        rec_destroy(&rec);
        tserver_stop(&s);
    }
    rmdir(dir);
}

static void test_no_fd_leak_over_cycles(void)
{
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_DROP), 0);
    int before = count_open_fds();
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc = client_to(&rec, s.address, NULL);
    /* The server drops every connection: 100 full connect/hang-up cycles. */
    CU_ASSERT_NOT_EQUAL(rec_wait_kind(&rec, PCONN_EVENT_DISCONNECTED, 99, WAIT_MS), -1);
    pconn_free(pc);
    rec_destroy(&rec);
    CU_ASSERT_EQUAL(count_open_fds(), before);
    tserver_stop(&s);
}

static void test_address_errors(void)
{
    char long_host[400], long_addr[600], long_path[200];
    memset(long_host, 'h', 300);
    snprintf(long_host + 300, sizeof long_host - 300, ":80");
    memset(long_addr, 'a', 550);
    snprintf(long_addr + 550, sizeof long_addr - 550, ":80");
    memset(long_path, 'p', 150);
    long_path[150] = '\0';
    char unix_long[220];
    snprintf(unix_long, sizeof unix_long, "unix:/%s", long_path);
    static const struct {
        const char *address, *why;
    } cases[] = {
        {"", "empty address"},
        {"localhost", "localhost: no port"},
        {"localhost:", "empty port"},
        {"localhost:0", "port 0 outside 1-65535"},
        {"localhost:70000", "port 70000 outside 1-65535"},
        {"localhost:99999999999999999999", "outside 1-65535"},
        {"localhost:http", "port is not a number"},
        {":80", ":80: no host"},
        {"[::1:80", "no closing ']'"},
        {"[::1]80", "no port"},
        {"::1:80", "IPv6 address needs brackets"},
        {"bad host:80", "bad character in host"},
        {"unix:", "empty unix socket path"},
    };
    pconn_error_t err;
    pconn_conn_t *c = NULL;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        CU_ASSERT_EQUAL(pconn_tcp_connect(NULL, cases[i].address, &c, &err), PCONN_EINVAL);
        CU_ASSERT_PTR_NULL(c);
        if (strstr(err.message, cases[i].why) == NULL)
            fprintf(stderr, "\n  %s: got \"%s\"\n", cases[i].address, err.message);
        CU_ASSERT_PTR_NOT_NULL(strstr(err.message, cases[i].why));
    }
    CU_ASSERT_EQUAL(pconn_tcp_connect(NULL, long_host, &c, &err), PCONN_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "host name of 300 bytes"));
    CU_ASSERT_EQUAL(pconn_tcp_connect(NULL, long_addr, &c, &err), PCONN_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "longer than 511 bytes"));
    CU_ASSERT_EQUAL(pconn_tcp_connect(NULL, unix_long, &c, &err), PCONN_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "unix socket path of 151 bytes"));
    CU_ASSERT_EQUAL(pconn_tcp_connect(NULL, NULL, &c, &err), PCONN_EINVAL);
    CU_ASSERT_EQUAL(pconn_tcp_connect(NULL, "127.0.0.1:1", NULL, &err), PCONN_EINVAL);

    /* Through a pconn whose resolver answers later (a static list is refused at create,
     * see static_addresses_checked): a FAILED_TO_CONNECT naming the file, the address
     * and the reason. */
    char path[] = "/tmp/pconn-addr-XXXXXX";
    int fd = mkstemp(path);
    CU_ASSERT_FATAL(fd >= 0);
    CU_ASSERT_EQUAL(write(fd, "db.example:70000\n", 17), 17);
    close(fd);
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc = client(&rec, pconn_resolver_file(path), NULL);
    int i = rec_wait_kind(&rec, PCONN_EVENT_FAILED_TO_CONNECT, 0, WAIT_MS);
    CU_ASSERT_FATAL(i >= 0);
    rec_event_t f = rec_get(&rec, i);
    CU_ASSERT_EQUAL(f.error.code, PCONN_ERESOLVE);
    char want[160];
    snprintf(want, sizeof want, "address file %s: address db.example:70000: port 70000 outside 1-65535",
             path);
    CU_ASSERT_STRING_EQUAL(f.error.message, want);
    pconn_free(pc);
    rec_destroy(&rec);
    unlink(path);
}

static void test_send_after_close_no_sigpipe(void)
{
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_DROP), 0);
    pconn_conn_t *c = NULL;
    pconn_error_t err;
    CU_ASSERT_EQUAL_FATAL(pconn_tcp_connect(NULL, s.address, &c, &err), PCONN_OK);
    /* The socket shut down under the connection, as a peer's reset would: SIGPIPE's
     * default action would end this process here. */
    shutdown(pconn_tcp_fd(c), SHUT_RDWR);
    static char big[1 << 16];
    CU_ASSERT_EQUAL(pconn_tcp_send_all(c, big, sizeof big, &err), PCONN_EIO);
    CU_ASSERT_EQUAL(err.sys_errno, EPIPE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, s.address));
    /* Closed by us: said so. */
    pconn_conn_close(c);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(c, big, sizeof big, &err), PCONN_ECLOSED);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "connection closed"));
    pconn_conn_unref(c);

    /* Not a TCP connection. */
    atomic_int destroyed = 0;
    pconn_conn_t *other = fdless_conn_new(&destroyed);
    CU_ASSERT_EQUAL(pconn_tcp_fd(other), -1);
    CU_ASSERT_EQUAL(pconn_tcp_send_all(other, "x", 1, &err), PCONN_EINVAL);
    pconn_conn_unref(other);
    tserver_stop(&s);
}

/* ---- resolvers ------------------------------------------------------------------ */

static void test_dns_resolver(void)
{
    errno = 0;
    CU_ASSERT_PTR_NULL(pconn_resolver_dns("localhost", 0));
    CU_ASSERT_EQUAL(errno, EINVAL);
    CU_ASSERT_PTR_NULL(pconn_resolver_dns("", 80));
    CU_ASSERT_PTR_NULL(pconn_resolver_dns(NULL, 80));
    /* Numeric hosts go through getaddrinfo() too and need no hosts file. */
    char one[PCONN_ADDRESS_MAX];
    pconn_error_t e;
    pconn_resolver_t *numeric = pconn_resolver_dns("127.0.0.1", 80);
    CU_ASSERT_EQUAL(pconn_resolve(numeric, one, sizeof one, &e), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(one, "127.0.0.1:80");
    pconn_resolver_free(numeric);
    if (!localhost_resolves())
        return;
    pconn_resolver_t *r = pconn_resolver_dns("localhost", 7001);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    char seen[4][PCONN_ADDRESS_MAX];
    pconn_error_t err;
    for (int i = 0; i < 4; i++) {
        CU_ASSERT_EQUAL(pconn_resolve(r, seen[i], sizeof seen[i], &err), PCONN_OK);
        CU_ASSERT(strcmp(seen[i], "127.0.0.1:7001") == 0 || strcmp(seen[i], "[::1]:7001") == 0);
    }
    /* With two records they alternate; with one, it repeats. */
    CU_ASSERT_STRING_EQUAL(seen[0], seen[2]);
    CU_ASSERT_STRING_EQUAL(seen[1], seen[3]);
    pconn_resolver_free(r);
}

static void test_file_resolver_errors(void)
{
    char dir[] = "/tmp/pconn-test-XXXXXX";
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof path, "%s/address", dir);
    pconn_resolver_t *r = pconn_resolver_file(path);
    char addr[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    char want[512];

    CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, &err), PCONN_ERESOLVE);
    CU_ASSERT_EQUAL(err.sys_errno, ENOENT);
    snprintf(want, sizeof want, "address file %s: No such file or directory", path);
    CU_ASSERT_STRING_EQUAL(err.message, want);

    write_file(path, "\n# nothing yet\n\n");
    CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, &err), PCONN_ERESOLVE);
    snprintf(want, sizeof want, "address file %s: no address in it", path);
    CU_ASSERT_STRING_EQUAL(err.message, want);

    write_file(path, "db:99999\n");
    CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, &err), PCONN_ERESOLVE);
    snprintf(want, sizeof want, "address file %s: address db:99999: port 99999 outside 1-65535", path);
    CU_ASSERT_STRING_EQUAL(err.message, want);

    write_file(path, "  [::1]:5000\r\nignored:1\n");
    CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, &err), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(addr, "[::1]:5000");

    char big[6000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    write_file(path, big);
    CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, &err), PCONN_ERESOLVE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "line too long"));

    pconn_resolver_free(r);
    CU_ASSERT_PTR_NULL(pconn_resolver_file(""));
    unlink(path);
    rmdir(dir);
}

static atomic_int chain_destroys;
static void count_destroy(void *arg)
{
    (void)arg;
    atomic_fetch_add(&chain_destroys, 1);
}

static int resolve_fail(void *arg, char *address, size_t size, pconn_error_t *err)
{
    (void)address, (void)size;
    pconn_error_set(err, PCONN_ERESOLVE, 0, "catalog %s down", (const char *)arg);
    return PCONN_ERESOLVE;
}

/* Defect 8 of issue 10: a chain of 1024 or more members is refused, and every member
 * handed over is freed (before the fix all but the first 1024 leaked). */
static void test_chain_too_long(void)
{
    enum { N = 1030 };
    pconn_resolver_t **m = calloc(N, sizeof *m);
    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    for (int i = 0; i < N; i++)
        m[i] = pconn_resolver_new(resolve_fail, "x", count_destroy);
    atomic_store(&chain_destroys, 0);
    errno = 0;
    CU_ASSERT_PTR_NULL(pconn_resolver_chain(m, N));
    CU_ASSERT_EQUAL(errno, EINVAL);
    CU_ASSERT_EQUAL(atomic_load(&chain_destroys), N);
    free(m);
}

/* Defect 7 of issue 10: an unnamed Unix socket has no address (before the fix its
 * uninitialised sun_path was printed). */
static void test_local_address_unnamed(void)
{
    int sv[2];
    CU_ASSERT_EQUAL_FATAL(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    char addr[PCONN_ADDRESS_MAX];
    memset(addr, 'Z', sizeof addr);
    CU_ASSERT_EQUAL(pconn_tcp_local_address(sv[0], addr, sizeof addr), PCONN_EINVAL);
    CU_ASSERT_STRING_EQUAL(addr, "");
    close(sv[0]);
    close(sv[1]);
}

/* Defect 7 of issue 10: listen on the path of a live Unix server must not unlink it
 * (before the fix the second listen stole the path); a dead one is still replaced. */
static void test_listen_unix_live(void)
{
    char dir[] = "/tmp/pconn-live-XXXXXX";
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
    char address[128];
    snprintf(address, sizeof address, "unix:%s/s", dir);
    pconn_error_t err;
    int first = pconn_tcp_listen(address, 0, &err);
    CU_ASSERT_FATAL(first >= 0);
    CU_ASSERT_EQUAL(pconn_tcp_listen(address, 0, &err), -1);
    CU_ASSERT_EQUAL(err.code, PCONN_EIO);
    CU_ASSERT_EQUAL(err.sys_errno, EADDRINUSE);
    close(first); /* now dead: replaced */
    int again = pconn_tcp_listen(address, 0, &err);
    CU_ASSERT(again >= 0);
    if (again >= 0)
        close(again);
    snprintf(address, sizeof address, "%s/s", dir);
    unlink(address);
    rmdir(dir);
}

static void test_chain_resolver(void)
{
    const char *list[] = {"b:2"};
    pconn_resolver_t *members[] = {
        pconn_resolver_new(resolve_fail, "one", count_destroy),
        pconn_resolver_static(list, 1),
    };
    atomic_store(&chain_destroys, 0);
    pconn_resolver_t *r = pconn_resolver_chain(members, 2);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    char addr[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, &err), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(addr, "b:2");
    pconn_resolver_free(r);
    CU_ASSERT_EQUAL(atomic_load(&chain_destroys), 1); /* the chain owned its members */

    pconn_resolver_t *failing[] = {
        pconn_resolver_new(resolve_fail, "one", count_destroy),
        pconn_resolver_new(resolve_fail, "two", count_destroy),
    };
    r = pconn_resolver_chain(failing, 2);
    CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, &err), PCONN_ERESOLVE);
    CU_ASSERT_STRING_EQUAL(err.message, "catalog two down");
    pconn_resolver_free(r);
    CU_ASSERT_EQUAL(atomic_load(&chain_destroys), 3);

    /* Bad arguments: NULL, and the resolvers handed over are freed all the same. */
    pconn_resolver_t *with_null[] = {pconn_resolver_new(resolve_fail, "x", count_destroy), NULL};
    errno = 0;
    CU_ASSERT_PTR_NULL(pconn_resolver_chain(with_null, 2));
    CU_ASSERT_EQUAL(errno, EINVAL);
    CU_ASSERT_EQUAL(atomic_load(&chain_destroys), 4);
    CU_ASSERT_PTR_NULL(pconn_resolver_chain(NULL, 0));
}

static void test_listen_errors(void)
{
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_tcp_listen("127.0.0.1", 0, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.message, "no port"));
    int fd = pconn_tcp_listen("127.0.0.1:0", 0, &err);
    CU_ASSERT_FATAL(fd >= 0);
    char addr[64];
    CU_ASSERT_EQUAL(pconn_tcp_local_address(fd, addr, sizeof addr), PCONN_OK);
    CU_ASSERT_EQUAL(pconn_tcp_listen(addr, 0, &err), -1); /* in use */
    CU_ASSERT_EQUAL(err.sys_errno, EADDRINUSE);
    CU_ASSERT_EQUAL(pconn_tcp_local_address(fd, addr, 4), PCONN_EINVAL);
    close(fd);
}

/* The sample a user copies: lines out, answers back, through a real process. */
static void test_line_client_sample(void)
{
    const char *build = getenv("PCONN_TEST_BUILD");
    if (build == NULL)
        build = "build/plain";
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_ECHO), 0);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "printf 'one\\ntwo\\n' | %s/samples/line_client %s 2>/dev/null",
             build, s.address);
    FILE *p = popen(cmd, "r");
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    char out[64] = {0};
    size_t n = fread(out, 1, sizeof out - 1, p);
    CU_ASSERT_EQUAL(pclose(p), 0);
    CU_ASSERT_EQUAL(n, 8);
    CU_ASSERT_STRING_EQUAL(out, "one\ntwo\n");
    tserver_stop(&s);
}

/* fork(): in the child an inherited handle and connection are dead (every call answers
 * at once, nothing shuts the shared socket down, free waits for no worker) and a new
 * pconn works; the parent notices nothing. The child reports failures as bits. */
static int fork_child(pconn_t *pc, pconn_conn_t *c, const char *address)
{
    int bad = 0;
    pconn_conn_t *x = c;
    pconn_error_t err = {0};
    if (pconn_connected(pc, WAIT_MS, &x) != PCONN_ECLOSED || x != NULL)
        bad |= 1;
    if (pconn_connected_or_failed(pc, WAIT_MS, &x, &err) != PCONN_ECLOSED ||
        strcmp(err.message, "tcp: handle inherited across fork()") != 0)
        bad |= 2;
    if (pconn_current(pc) != NULL || !pconn_is_closed(pc) || !pconn_conn_is_closed(c))
        bad |= 4;
    if (pconn_tcp_send_all(c, "x", 1, &err) != PCONN_ECLOSED ||
        strstr(err.message, "inherited across fork()") == NULL)
        bad |= 8;
    pconn_kick(pc);
    pconn_conn_close(c); /* must not shut the parent's socket down */
    if (pconn_close(pc, WAIT_MS) != PCONN_ECLOSED || pconn_close_finished(pc, WAIT_MS) != PCONN_ECLOSED)
        bad |= 16;
    pconn_conn_unref(c);
    pconn_free(pc);
#ifdef __SANITIZE_THREAD__
    (void)address; /* TSan cannot follow threads started after a multithreaded fork() */
    return bad;
#endif
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc2 = client_to(&rec, address, NULL);
    pconn_conn_t *c2 = NULL;
    char buf[8] = {0};
    if (pc2 == NULL || pconn_connected(pc2, WAIT_MS, &c2) != PCONN_OK ||
        pconn_tcp_send_all(c2, "kid\n", 4, NULL) != PCONN_OK ||
        recv(pconn_tcp_fd(c2), buf, 4, MSG_WAITALL) != 4 || strcmp(buf, "kid\n") != 0)
        bad |= 32;
    pconn_conn_unref(c2);
    pconn_free(pc2);
    return bad;
}

static void test_fork_child_inherits_dead_handle(void)
{
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_ECHO), 0);
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc = client_to(&rec, s.address, NULL);
    pconn_conn_t *c = NULL;
    CU_ASSERT_EQUAL_FATAL(pconn_connected(pc, WAIT_MS, &c), PCONN_OK);
    fflush(NULL);
    pid_t pid = fork();
    CU_ASSERT_FATAL(pid >= 0);
    if (pid == 0)
        _exit(fork_child(pc, c, s.address));
    int status = -1;
    CU_ASSERT_EQUAL(waitpid(pid, &status, 0), pid);
    CU_ASSERT_TRUE(WIFEXITED(status));
    CU_ASSERT_EQUAL(WEXITSTATUS(status), 0);
    /* The parent's connection still works, and it saw no DISCONNECTED. */
    CU_ASSERT_FALSE(pconn_conn_is_closed(c));
    CU_ASSERT_EQUAL(pconn_tcp_send_all(c, "mom\n", 4, NULL), PCONN_OK);
    char buf[8] = {0};
    CU_ASSERT_EQUAL(recv(pconn_tcp_fd(c), buf, 4, MSG_WAITALL), 4);
    CU_ASSERT_STRING_EQUAL(buf, "mom\n");
    char seq[64];
    rec_letters(&rec, seq, sizeof seq);
    CU_ASSERT_STRING_EQUAL(seq, "AOC");
    pconn_conn_unref(c);
    pconn_free(pc);
    rec_destroy(&rec);
    tserver_stop(&s);
}

/* Malformed static addresses are refused at creation with the reason, instead of being
 * retried forever; resolvers whose answers come later are not judged at creation. */
static void test_static_addresses_checked(void)
{
    static const struct {
        const char *address, *message;
    } bad[] = {
        {"localhost", "address localhost: no port (want host:port)"},
        {"db:0", "address db:0: port 0 outside 1-65535"},
        {"db:70000", "address db:70000: port 70000 outside 1-65535"},
        {"db:http", "address db:http: port is not a number"},
        {"[::1:80", "address [::1:80: no closing ']'"},
        {"::1:80", "address ::1:80: an IPv6 address needs brackets: [v6]:port"},
        {"unix:", "address unix:: empty unix socket path"},
        {"d b:80", "address d b:80: bad character in host at byte 1"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *list[] = {"127.0.0.1:80", bad[i].address};
        pconn_resolver_t *r = (pconn_resolver_t *)list;
        pconn_error_t err = {0};
        CU_ASSERT_EQUAL(pconn_resolver_static_checked(list, 2, &r, &err), PCONN_EINVAL);
        CU_ASSERT_PTR_NULL(r);
        CU_ASSERT_EQUAL(err.code, PCONN_EINVAL);
        CU_ASSERT_STRING_EQUAL(err.message, bad[i].message);
        /* The one-call creates refuse the same list (and free the resolver). */
        pconn_options_t o = {.server_name = "s", .resolver = pconn_resolver_static(list, 2)};
        pconn_t *pc = (pconn_t *)list;
        CU_ASSERT_EQUAL(pconn_tcp_create(&o, NULL, &pc), PCONN_EINVAL);
        CU_ASSERT_PTR_NULL(pc);
    }
    const char *nul[] = {"127.0.0.1:80", NULL};
    pconn_error_t err = {0};
    pconn_resolver_t *r = NULL;
    CU_ASSERT_EQUAL(pconn_resolver_static_checked(nul, 2, &r, &err), PCONN_EINVAL);
    CU_ASSERT_STRING_EQUAL(err.message, "static resolver: address 1 is NULL");
    CU_ASSERT_EQUAL(pconn_resolver_static_checked(nul, 0, &r, &err), PCONN_EINVAL);
    CU_ASSERT_STRING_EQUAL(err.message, "static resolver: no addresses");
    CU_ASSERT_EQUAL(pconn_resolver_static_checked(nul, 1, NULL, NULL), PCONN_EINVAL);

    const char *good[] = {"db.example:5432", "[::1]:1", "unix:/tmp/x.sock", "unix:@abstract", "h:65535"};
    CU_ASSERT_EQUAL(pconn_resolver_static_checked(good, 5, &r, &err), PCONN_OK);
    CU_ASSERT_PTR_NOT_NULL(r);
    char address[PCONN_ADDRESS_MAX];
    CU_ASSERT_EQUAL(pconn_resolve(r, address, sizeof address, &err), PCONN_OK);
    CU_ASSERT_STRING_EQUAL(address, "db.example:5432");
    pconn_resolver_free(r);

    /* A file resolver is judged per answer, as before. */
    pconn_options_t o = {.server_name = "s", .resolver = pconn_resolver_file("/nonexistent")};
    pconn_t *pc = NULL;
    CU_ASSERT_EQUAL(pconn_tcp_create(&o, NULL, &pc), PCONN_OK);
    pconn_free(pc);
}

/* pconn_stats_json() of a TCP pconn that cannot connect: parsed by a JSON parser. */
static void test_stats_json(void)
{
    tserver_t s;
    CU_ASSERT_EQUAL_FATAL(tserver_start(&s, "127.0.0.1:0", SERVER_HOLD), 0);
    char dead[128];
    snprintf(dead, sizeof dead, "%s", s.address);
    tserver_stop(&s); /* nothing listens there now */
    recorder_t rec;
    rec_init(&rec);
    pconn_t *pc = client_to(&rec, dead, NULL);
    CU_ASSERT_FATAL(rec_wait_kind(&rec, PCONN_EVENT_FAILED_TO_CONNECT, 0, WAIT_MS) >= 0);
    char *text = pconn_stats_json(pc);
    CU_ASSERT_PTR_NOT_NULL_FATAL(text);
    json_error_t jerr;
    json_t *o = json_loads(text, 0, &jerr);
    CU_ASSERT_PTR_NOT_NULL_FATAL(o);
    CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(o, "server_name")), "tcp");
    CU_ASSERT(json_integer_value(json_object_get(o, "failures")) >= 1);
    CU_ASSERT_EQUAL(json_integer_value(json_object_get(o, "connects")), 0);
    json_t *last = json_object_get(o, "last_error");
    CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(last, "code")), "PCONN_ECONNECT");
    CU_ASSERT_PTR_NOT_NULL(strstr(json_string_value(json_object_get(last, "message")), dead));
    CU_ASSERT_PTR_NULL(json_object_get(o, "rpc"));
    json_decref(o);
    free(text);
    pconn_free(pc);
    rec_destroy(&rec);
}

static const test_def_t tests[] = {
    {"line_client_sample", test_line_client_sample},
    {"connect_and_echo", test_connect_and_echo},
    {"options_off", test_options_off},
    {"server_close_reconnects", test_server_close_reconnects},
    {"failover_static", test_failover_static},
    {"failover_file", test_failover_file},
    {"server_down_then_up", test_server_down_then_up},
    {"connect_timeout", test_connect_timeout},
    {"close_interrupts_connect", test_close_interrupts_connect},
    {"every_address_of_a_name", test_every_address_of_a_name},
    {"ipv6_loopback", test_ipv6_loopback},
    {"unix_sockets", test_unix_sockets},
    {"no_fd_leak_over_cycles", test_no_fd_leak_over_cycles},
    {"address_errors", test_address_errors},
    {"send_after_close_no_sigpipe", test_send_after_close_no_sigpipe},
    {"dns_resolver", test_dns_resolver},
    {"file_resolver_errors", test_file_resolver_errors},
    {"chain_resolver", test_chain_resolver},
    {"chain_too_long", test_chain_too_long},
    {"listen_unix_live", test_listen_unix_live},
    {"local_address_unnamed", test_local_address_unnamed},
    {"listen_errors", test_listen_errors},
    {"static_addresses_checked", test_static_addresses_checked},
    {"stats_json", test_stats_json},
    {"fork_child_inherits_dead_handle", test_fork_child_inherits_dead_handle},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    return run_suite("tcp", tests, argc, argv);
}
