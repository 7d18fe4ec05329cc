/* demo.c - libpconn at work with no outside service. Servers are child processes (the
 * `pconn` tool next to this program), so they can really be killed and stopped.
 *
 *   demo tcp   two line servers, a client with a static list of both; one is killed,
 *              both go, one comes back: every event with its time, the failover time.
 *   demo rpc   two RPC servers; a client thread calls every 100 ms through
 *              pconn_rpc_dispatch while the server it uses is stopped (SIGSTOP): only
 *              heartbeats can tell. Counts of calls that succeeded and failed, and the
 *              longest gap between answers.
 *   demo       both.
 */
#include "pconn.h"
#include "pconn_rpc.h"
#include "pconn_tcp.h"

#include <errno.h>
#include <stdarg.h>
#include <poll.h>
#include <pthread.h>
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

/* ---- the servers: `pconn serve` / `pconn rpc-serve` processes ------------------ */

static char tool[4096]; /* the pconn tool, beside this program */

typedef struct server_t {
    const char *name;
    char address[64];
    pid_t pid;
} server_t;

/* Starts `pconn MODE ADDRESS --name NAME`; its first line says where it listens. */
static int server_start(server_t *s, const char *mode)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    const char *listen_at = s->address[0] ? s->address : "127.0.0.1:0";
    char listen_copy[64];
    snprintf(listen_copy, sizeof listen_copy, "%s", listen_at);
    s->pid = fork();
    if (s->pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        execl(tool, "pconn", mode, listen_copy, "--name", s->name, (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    char line[128] = "";
    FILE *out = fdopen(fds[0], "r");
    bool ok = s->pid > 0 && fgets(line, sizeof line, out) != NULL &&
              sscanf(line, "listening on %63s", s->address) == 1;
    fclose(out);
    if (!ok)
        fprintf(stderr, "demo: could not start %s (is it built?)\n", tool);
    return ok ? 0 : -1;
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

static int demo_tcp(void)
{
    server_t a = {.name = "A"}, b = {.name = "B"};
    if (server_start(&a, "serve") != 0 || server_start(&b, "serve") != 0)
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
    if (server_start(&a, "serve") != 0)
        return 1;
    double recovery = wait_for(pc, a.address, t);
    ask(pc, "and now?");

    pconn_stats_t st;
    pconn_stats(pc, &st);
    pconn_free(pc);
    server_kill(&a);
    printf("\ntcp: failover from A to B took %.1f ms; after the outage, connected %.1f ms after A "
           "came back (%llu attempts, %llu connects, %llu failed attempts)\n\n",
           failover, recovery, (unsigned long long)st.attempts, (unsigned long long)st.connects,
           (unsigned long long)st.failures);
    return failover >= 0 && recovery >= 0 ? 0 : 1;
}

/* ---- rpc ------------------------------------------------------------------------- */

typedef struct caller_t {
    pconn_t *pc;
    volatile bool stop;
    int ok, failed;
    double longest_gap_ms;
} caller_t;

static void *caller_main(void *arg)
{
    caller_t *c = arg;
    int64_t last_ok = now_ns();
    char last_name[8] = "";
    while (!c->stop) {
        pconn_buf_t resp;
        pconn_error_t err;
        int rc = pconn_rpc_dispatch(c->pc, "name", 1, NULL, 0, &resp, 2000, &err);
        if (rc == PCONN_OK) {
            int64_t t = now_ns();
            double gap = (double)(t - last_ok) / 1e6;
            if (gap > c->longest_gap_ms)
                c->longest_gap_ms = gap;
            last_ok = t;
            c->ok++;
            char name[8] = "";
            memcpy(name, resp.data, resp.len < 7 ? resp.len : 7);
            if (strcmp(name, last_name) != 0)
                say("app    calls answered by server %s", name);
            snprintf(last_name, sizeof last_name, "%s", name);
            pconn_buf_free(&resp);
        } else {
            c->failed++;
            say("app    call failed: %s: %s", pconn_err_name(rc), err.message);
        }
        usleep(100000);
    }
    return NULL;
}

static int demo_rpc(void)
{
    server_t a = {.name = "A"}, b = {.name = "B"};
    if (server_start(&a, "rpc-serve") != 0 || server_start(&b, "rpc-serve") != 0)
        return 1;
    say("demo   RPC servers A at %s and B at %s", a.address, b.address);
    const char *list[] = {a.address, b.address};
    pconn_backoff_t backoff = {.initial_ms = 100, .max_ms = 1000, .multiplier = 2.0};
    pconn_rpc_options_t o = {
        .base = {.server_name = "rpc", .resolver = pconn_resolver_static(list, 2), .on_event = on_event,
                 .retry_delay = pconn_retry_exponential, .retry_delay_arg = &backoff},
        .heartbeat = {.timeout_ms = 1000, .send_every_ms = 250},
        .handshake_timeout_ms = 500,
    };
    pconn_t *pc = NULL;
    if (pconn_rpc_create(&o, &pc) != PCONN_OK)
        return 1;
    caller_t c = {.pc = pc};
    pthread_t t;
    pthread_create(&t, NULL, caller_main, &c);
    usleep(1000000);
    say("demo   kill -STOP server A: it hangs, its socket stays open (heartbeat timeout 1 s)");
    kill(a.pid, SIGSTOP);
    usleep(3000000);
    c.stop = true;
    pthread_join(t, NULL);
    pconn_free(pc);
    kill(a.pid, SIGCONT);
    server_kill(&a);
    server_kill(&b);
    printf("\nrpc: %d calls answered, %d failed; the longest gap between answers was %.0f ms\n",
           c.ok, c.failed, c.longest_gap_ms);
    return c.ok > 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    start_ns = now_ns();
    /* The pconn tool is built next to this program. */
    snprintf(tool, sizeof tool, "%s", argv[0]);
    char *slash = strrchr(tool, '/');
    snprintf(slash != NULL ? slash + 1 : tool, sizeof tool - (size_t)(slash != NULL ? slash + 1 - tool : 0), "pconn");
    const char *mode = argc > 1 ? argv[1] : "all";
    int rc = 0;
    if (strcmp(mode, "tcp") == 0 || strcmp(mode, "all") == 0)
        rc |= demo_tcp();
    if (strcmp(mode, "rpc") == 0 || strcmp(mode, "all") == 0)
        rc |= demo_rpc();
    return rc;
}
