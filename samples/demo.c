/* demo.c - libpconn at work with no outside service: two local servers (child
 * processes), a client with a static list of both, one server killed and restarted.
 * Prints every event with its time and how long each failover took.
 *
 *   make demo            or   build/plain/samples/demo
 */
#include "pconn.h"
#include "pconn_tcp.h"

#include <errno.h>
#include <stdarg.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int64_t start_ns;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char line[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    printf("%8.3f s  %s\n", (double)(now_ns() - start_ns) / 1e9, line);
    fflush(stdout);
}

/* ---- the servers: a child process each, answering lines with their name --------- */

static void serve(int lfd, const char *name)
{
    struct pollfd pfd[64] = {{.fd = lfd, .events = POLLIN}};
    nfds_t n = 1;
    for (;;) {
        if (poll(pfd, n, -1) < 0)
            continue;
        for (nfds_t i = n; i-- > 1;) {
            if (!pfd[i].revents)
                continue;
            char buf[512], reply[600];
            ssize_t got = recv(pfd[i].fd, buf, sizeof buf - 1, 0);
            if (got <= 0) {
                close(pfd[i].fd);
                pfd[i] = pfd[--n];
                continue;
            }
            buf[got] = '\0';
            buf[strcspn(buf, "\n")] = '\0';
            int len = snprintf(reply, sizeof reply, "server %s answers: %s\n", name, buf);
            (void)!send(pfd[i].fd, reply, (size_t)len, MSG_NOSIGNAL);
        }
        if (pfd[0].revents && n < 64) {
            int fd = accept(lfd, NULL, NULL);
            if (fd >= 0)
                pfd[n++] = (struct pollfd){.fd = fd, .events = POLLIN};
        }
    }
}

typedef struct server_t {
    const char *name;
    char address[64];
    pid_t pid;
} server_t;

static int server_start(server_t *s)
{
    pconn_error_t err;
    int lfd = pconn_tcp_listen(s->address[0] ? s->address : "127.0.0.1:0", 0, &err);
    if (lfd < 0) {
        fprintf(stderr, "demo: %s\n", err.message);
        return -1;
    }
    pconn_tcp_local_address(lfd, s->address, sizeof s->address);
    s->pid = fork();
    if (s->pid == 0)
        serve(lfd, s->name); /* never returns */
    close(lfd);
    return s->pid > 0 ? 0 : -1;
}

static void server_kill(server_t *s)
{
    kill(s->pid, SIGKILL);
    waitpid(s->pid, NULL, 0);
    s->pid = 0;
}

/* ---- the client ------------------------------------------------------------------ */

static void on_event(const pconn_event_t *ev, void *arg)
{
    (void)arg;
    char line[PCONN_ADDRESS_MAX + 300];
    pconn_event_format(ev, line, sizeof line);
    say("event  %s", line);
}

/* What a blocking program does: wait for the connection, ask, read the answer. */
static void ask(pconn_t *pc, const char *question)
{
    pconn_conn_t *c = NULL;
    int rc = pconn_connected(pc, 10000, &c);
    if (rc != PCONN_OK) {
        say("app    no connection: %s", pconn_strerror(rc));
        return;
    }
    char line[600];
    int len = snprintf(line, sizeof line, "%s\n", question);
    pconn_error_t err;
    ssize_t got = -1;
    if (pconn_tcp_send_all(c, line, (size_t)len, &err) == PCONN_OK)
        got = recv(pconn_tcp_fd(c), line, sizeof line - 1, 0);
    if (got > 0) {
        line[got] = '\0';
        line[strcspn(line, "\n")] = '\0';
        say("app    %s", line);
    } else {
        say("app    request failed: %s", got < 0 ? strerror(errno) : "connection closed");
    }
    pconn_conn_unref(c);
}

/* Waits until connected to address; the time it took from since_ns, in ms. */
static double wait_for(pconn_t *pc, const char *address, int64_t since_ns)
{
    for (;;) {
        pconn_conn_t *c = NULL;
        if (pconn_connected(pc, 10000, &c) != PCONN_OK)
            return -1;
        bool there = strcmp(pconn_conn_address(c), address) == 0;
        if (there) {
            pconn_conn_unref(c);
            return (double)(now_ns() - since_ns) / 1e6;
        }
        pconn_conn_wait_closed(c, 10000);
        pconn_conn_unref(c);
    }
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    start_ns = now_ns();
    server_t a = {.name = "A"}, b = {.name = "B"};
    if (server_start(&a) != 0 || server_start(&b) != 0)
        return 1;
    say("demo   servers A at %s and B at %s (child processes %d, %d)", a.address, b.address,
        (int)a.pid, (int)b.pid);

    const char *list[] = {a.address, b.address};
    pconn_backoff_t backoff = {.initial_ms = 100, .max_ms = 1000, .multiplier = 2.0};
    pconn_options_t o = {
        .server_name = "echo",
        .resolver = pconn_resolver_static(list, 2),
        .on_event = on_event,
        .retry_delay = pconn_retry_exponential,
        .retry_delay_arg = &backoff,
    };
    pconn_t *pc = NULL;
    if (pconn_tcp_create(&o, NULL, &pc) != PCONN_OK)
        return 1;

    wait_for(pc, a.address, start_ns);
    ask(pc, "hello");
    usleep(500000); /* serve a while: a long-lived connection is retried at once */

    say("demo   kill -9 server A");
    int64_t t = now_ns();
    server_kill(&a);
    double failover = wait_for(pc, b.address, t);
    ask(pc, "still there?");
    usleep(500000);

    say("demo   kill -9 server B too: nothing to connect to, attempts back off");
    server_kill(&b);
    usleep(1500000);
    say("demo   restart server A on its old port");
    t = now_ns();
    if (server_start(&a) != 0)
        return 1;
    double recovery = wait_for(pc, a.address, t);
    ask(pc, "and now?");

    pconn_stats_t st;
    pconn_stats(pc, &st);
    pconn_free(pc);
    server_kill(&a);
    printf("\nfailover from A to B took %.1f ms; after the outage, connected %.1f ms after A "
           "came back (%llu attempts, %llu connects, %llu failed attempts)\n",
           failover, recovery, (unsigned long long)st.attempts, (unsigned long long)st.connects,
           (unsigned long long)st.failures);
    return failover >= 0 && recovery >= 0 ? 0 : 1;
}
