/* pconn.c - the `pconn` command-line tool: keeps a connection to a service alive for a
 * script or a terminal. `pconn --help` and `pconn COMMAND --help` tell how to use it.
 *
 * Exit status: 0 success; 1 no connection (or no answer) within the timeout; 2 a usage
 * error (the bad argument named on stderr); 3 `call`: the server answered with an error
 * (unimplemented, refused by the handler, too big); 4 `call`: the connection failed under
 * the call; 5 `cat`: a line could not be sent.
 */
#include "pconn.h"
#include "pconn_resolver.h"
#include "pconn_rpc.h"
#include "pconn_tcp.h"

#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *const help_main =
    "usage: pconn COMMAND [ARGS] [OPTIONS]   (options may come anywhere)\n"
    "\n"
    "  wait SPEC [--timeout S]        exit 0 as soon as SPEC accepts a connection, 1 on timeout\n"
    "  watch SPEC [--count N] [--json]  print each event of a persistent connection\n"
    "  cat SPEC                       stdin to SPEC, SPEC to stdout, across restarts\n"
    "  call SPEC NAME [PAYLOAD|-] [--version V] [--timeout S]   one RPC call\n"
    "  serve LISTEN [--name NAME] [--announce ETCD_URL KEY] [--ttl S]   a line echo server\n"
    "  rpc-serve LISTEN [--name NAME] [--announce ETCD_URL KEY] [--ttl S]   an RPC server\n"
    "  port                           print a loopback TCP port that was free just now\n"
    "\n"
    "SPEC: HOST:PORT[,HOST:PORT...] | unix:PATH | dns:HOST:PORT | file:PATH |\n"
    "      etcd:URL[,URL...]/PREFIX | consul:URL[,URL...]/SERVICE | json:URL\n"
    "      (a cluster's members as a list; catalogs take --pick first|random|round-robin)\n"
    "Common options: --every MS (retry delay, 10 to 86400000; default 1000), --help, --version.\n"
    "Exit status: 0 ok, 1 timeout, 2 usage, 3 the server answered an error, 4 connection\n"
    "failed under a call, 5 cat could not send a line.\n";

static const char *const help_wait =
    "usage: pconn wait SPEC [--timeout S] [--every MS] [--pick P]\n"
    "Exits 0 as soon as SPEC accepts a connection; 1 when S seconds (default 10) pass first,\n"
    "with the last failure on stderr.\n";
static const char *const help_watch =
    "usage: pconn watch SPEC [--count N] [--json] [--every MS] [--pick P]\n"
    "Keeps a persistent TCP connection to SPEC and prints each event: time, seconds since the\n"
    "previous one, what happened. --json: one JSON object a line. --count N: exit after N\n"
    "events. Ctrl-C (SIGINT) or SIGTERM closes cleanly and prints a summary.\n";
static const char *const help_cat =
    "usage: pconn cat SPEC [--every MS] [--pick P]\n"
    "Like nc, but the connection survives server restarts: stdin goes to the connection,\n"
    "what comes back to stdout. Input that could not be sent is reported on stderr (exit\n"
    "status 5), never dropped silently. Ends at the end of stdin, once the peer is quiet.\n";
static const char *const help_call =
    "usage: pconn call SPEC NAME [PAYLOAD|-] [--version V] [--timeout S] [--pick P]\n"
    "One RPC call (version V, default 1) with PAYLOAD (or stdin with -) as the request; the\n"
    "answer goes to stdout. Exit 0 answered, 1 no answer within S seconds (default 10), 3 the\n"
    "server answered an error, 4 the connection failed under the call.\n";
static const char *const help_serve =
    "usage: pconn serve LISTEN [--name NAME] [--announce ETCD_URL KEY] [--ttl S]\n"
    "A line echo server: each line comes back as \"NAME: line\". Prints \"listening on\n"
    "ADDRESS\" once it accepts connections. --announce publishes it in etcd under KEY while\n"
    "it runs (lease of S seconds, default 10). SIGINT or SIGTERM stops it.\n";
static const char *const help_rpc_serve =
    "usage: pconn rpc-serve LISTEN [--name NAME] [--announce ETCD_URL KEY] [--ttl S]\n"
    "An RPC server with echo (1: the request back), name (1: NAME) and sleep (1: waits the\n"
    "request's decimal milliseconds, then echoes it). Prints \"listening on ADDRESS\".\n";

/* ---- arguments --------------------------------------------------------------------- */

typedef struct args_t {
    const char *cmd;
    char *pos[4];
    int npos;
    double timeout_s;
    long long every_ms, count, version, ttl;
    int json;
    pconn_pick_t pick;
    const char *name, *etcd, *key;
} args_t;

static int usage_error(const char *cmd, const char *fmt, const char *what)
{
    fprintf(stderr, "pconn %s: ", cmd);
    fprintf(stderr, fmt, what);
    fprintf(stderr, " (pconn %s --help)\n", cmd);
    return 2;
}

static int number(const char *cmd, const char *opt, const char *s, long long lo, long long hi,
                  long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "pconn %s: %s %s: not a whole number from %lld to %lld\n", cmd, opt, s, lo, hi);
        return 2;
    }
    *out = v;
    return 0;
}

/* Parses argv (after the command) into a; 0, 1 for --help done, or 2. */
static int parse(int argc, char **argv, const char *cmd, const char *help, const char *allowed,
                 args_t *a)
{
    static const struct option opts[] = {
        {"timeout", required_argument, NULL, 't'}, {"every", required_argument, NULL, 'e'},
        {"count", required_argument, NULL, 'c'},   {"json", no_argument, NULL, 'j'},
        {"version", required_argument, NULL, 'v'}, {"pick", required_argument, NULL, 'p'},
        {"name", required_argument, NULL, 'n'},    {"announce", required_argument, NULL, 'a'},
        {"ttl", required_argument, NULL, 'T'},     {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    *a = (args_t){.cmd = cmd, .timeout_s = 10, .every_ms = 1000, .version = 1, .name = "pconn",
                  .pick = PCONN_PICK_ROUND_ROBIN};
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "-", opts, NULL)) != -1) {
        if (c == 1) { /* a positional argument, where it stands */
            if (a->npos == 4)
                return usage_error(cmd, "unexpected argument %s", optarg);
            a->pos[a->npos++] = optarg;
            continue;
        }
        if (c == '?')
            return usage_error(cmd, "unknown option or missing value: %s", argv[optind - 1]);
        if (c == 'h') {
            fputs(help, stdout);
            return 1;
        }
        if (strchr(allowed, c) == NULL)
            return usage_error(cmd, "option %s does not apply here", argv[optind - 1]);
        int rc = 0;
        switch (c) {
        case 't': {
            char *end;
            errno = 0;
            a->timeout_s = strtod(optarg, &end);
            if (errno != 0 || end == optarg || *end != '\0' || !(a->timeout_s > 0) || a->timeout_s > 1e6)
                return usage_error(cmd, "--timeout %s: not a number of seconds above 0 (at most 1000000)", optarg);
            break;
        }
        case 'e': rc = number(cmd, "--every", optarg, PCONN_RETRY_FLOOR_MS, 86400000, &a->every_ms); break;
        case 'c': rc = number(cmd, "--count", optarg, 1, 1000000000, &a->count); break;
        case 'v': rc = number(cmd, "--version", optarg, 0, 2147483647, &a->version); break;
        case 'T': rc = number(cmd, "--ttl", optarg, 1, 1000000, &a->ttl); break;
        case 'j': a->json = 1; break;
        case 'n': a->name = optarg; break;
        case 'a':
            a->etcd = optarg;
            if (optind >= argc || argv[optind][0] == '-')
                return usage_error(cmd, "--announce %s: needs a KEY after the URL", optarg);
            a->key = argv[optind++];
            break;
        case 'p':
            if (strcmp(optarg, "first") == 0)
                a->pick = PCONN_PICK_FIRST;
            else if (strcmp(optarg, "random") == 0)
                a->pick = PCONN_PICK_RANDOM;
            else if (strcmp(optarg, "round-robin") == 0 || strcmp(optarg, "rr") == 0)
                a->pick = PCONN_PICK_ROUND_ROBIN;
            else
                return usage_error(cmd, "--pick %s: not first, random or round-robin", optarg);
            break;
        }
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* ---- SPEC -------------------------------------------------------------------------- */

/* Splits "scheme://authority[,scheme://authority...]/rest" into the base URL (or the
 * comma-separated list of them) and "/rest". */
static int split_url(const char *url, char *base, size_t size, const char **rest)
{
    const char *p = strstr(url, "://");
    if (p == NULL)
        return -1;
    for (const char *q; (q = strstr(p + 3, "://")) != NULL;)
        p = q; /* the last member's */
    p = strchr(p + 3, '/');
    if (p == NULL || p[1] == '\0' || (size_t)(p - url) >= size)
        return -1;
    memcpy(base, url, (size_t)(p - url));
    base[p - url] = '\0';
    *rest = p;
    return 0;
}

/* A resolver for SPEC, or NULL with the reason printed (usage error). */
static pconn_resolver_t *spec_resolver(const args_t *a, const char *spec)
{
    static char base[512];
    pconn_http_catalog_options_t cat = {.pick = a->pick};
    const char *rest;
    if (strncmp(spec, "dns:", 4) == 0) {
        const char *colon = strrchr(spec + 4, ':');
        char host[256];
        long long port;
        if (colon == NULL || colon == spec + 4 || (size_t)(colon - spec - 4) >= sizeof host) {
            usage_error(a->cmd, "%s: want dns:HOST:PORT", spec);
            return NULL;
        }
        memcpy(host, spec + 4, (size_t)(colon - spec - 4));
        host[colon - spec - 4] = '\0';
        if (number(a->cmd, "dns port", colon + 1, 1, 65535, &port) != 0)
            return NULL;
        return pconn_resolver_dns(host, (uint16_t)port);
    }
    if (strncmp(spec, "file:", 5) == 0 && spec[5] != '\0')
        return pconn_resolver_file(spec + 5);
    if (strncmp(spec, "etcd:", 5) == 0 || strncmp(spec, "consul:", 7) == 0) {
        bool etcd = spec[0] == 'e';
        const char *url = spec + (etcd ? 5 : 7);
        if (split_url(url, base, sizeof base, &rest) != 0) {
            usage_error(a->cmd, etcd ? "%s: want etcd:URL/PREFIX" : "%s: want consul:URL/SERVICE", spec);
            return NULL;
        }
        cat.url = base;
        cat.format = etcd ? PCONN_CATALOG_ETCD : PCONN_CATALOG_CONSUL;
        cat.key = etcd ? rest : rest + 1;
    } else if (strncmp(spec, "json:", 5) == 0) {
        cat.url = spec + 5;
        cat.format = PCONN_CATALOG_JSON;
    }
    if (cat.url != NULL) {
        pconn_resolver_t *r = pconn_resolver_http_catalog(&cat);
        if (r == NULL)
            usage_error(a->cmd, "%s: not a catalog URL (http:// or https://)", spec);
        return r;
    }
    /* A list of addresses: "host:port,host:port" or "unix:PATH". */
    char copy[4096];
    if (strlen(spec) >= sizeof copy) {
        usage_error(a->cmd, "%.64s...: too long", spec);
        return NULL;
    }
    strcpy(copy, spec);
    const char *list[64];
    size_t n = 0;
    for (char *save = NULL, *t = strtok_r(copy, ",", &save); t != NULL && n < 64; t = strtok_r(NULL, ",", &save))
        list[n++] = t;
    pconn_resolver_t *r = NULL;
    pconn_error_t err;
    if (n == 0 || pconn_resolver_static_checked(list, n, &r, &err) != PCONN_OK) {
        fprintf(stderr, "pconn %s: %s (pconn %s --help)\n", a->cmd, n == 0 ? "empty SPEC" : err.message, a->cmd);
        return NULL;
    }
    return r;
}

static int64_t every_delay(void *arg, unsigned failures)
{
    (void)failures;
    return *(const long long *)arg;
}

/* A persistent TCP connection to SPEC; NULL after printing why (usage: exit 2). */
static pconn_t *spec_pconn(const args_t *a, const char *spec,
                           void (*on_event)(const pconn_event_t *, void *), void *event_arg)
{
    pconn_resolver_t *r = spec_resolver(a, spec);
    if (r == NULL)
        return NULL;
    pconn_options_t o = {.server_name = spec, .resolver = r, .on_event = on_event,
                         .on_event_arg = event_arg, .retry_delay = every_delay,
                         .retry_delay_arg = (void *)&a->every_ms};
    pconn_tcp_options_t tcp = {.nodelay = true};
    pconn_t *pc = NULL;
    int rc = pconn_tcp_create(&o, &tcp, &pc);
    if (rc != PCONN_OK)
        fprintf(stderr, "pconn %s: %s\n", a->cmd, pconn_strerror(rc));
    return pc;
}

static int64_t ms_of(double s)
{
    return (int64_t)(s * 1000 + 0.999); /* rounded up: never shorter than asked */
}

/* ---- wait -------------------------------------------------------------------------- */

static int cmd_wait(int argc, char **argv)
{
    args_t a;
    int rc = parse(argc, argv, "wait", help_wait, "tep", &a);
    if (rc != 0)
        return rc == 1 ? 0 : rc;
    if (a.npos != 1)
        return usage_error("wait", "%s", a.npos == 0 ? "want a SPEC" : "want exactly one SPEC");
    pconn_t *pc = spec_pconn(&a, a.pos[0], NULL, NULL);
    if (pc == NULL)
        return 2;
    pconn_conn_t *c = NULL;
    int64_t deadline_ms = ms_of(a.timeout_s);
    pconn_error_t err = {0};
    rc = PCONN_ETIMEDOUT;
    /* Waits for a connection; a failure on the way is remembered for the message. */
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t left = deadline_ms - ((now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000);
        if (left <= 0)
            break;
        pconn_error_t e;
        rc = pconn_connected_or_failed(pc, left, &c, &e);
        if (rc == PCONN_OK || rc == PCONN_ETIMEDOUT || rc == PCONN_ECLOSED)
            break;
        err = e;
    }
    pconn_conn_unref(c);
    pconn_free(pc);
    if (rc == PCONN_OK)
        return 0;
    fprintf(stderr, "pconn wait: no connection to %s within %g s%s%s\n", a.pos[0], a.timeout_s,
            err.message[0] != '\0' ? ": " : "", err.message);
    return 1;
}

/* ---- watch ------------------------------------------------------------------------- */

typedef struct watch_t {
    const args_t *a;
    atomic_llong events;
    int64_t last_ns, first_ns, connected_at_ns, connected_ns;
    long long attempts, failures;
} watch_t;

static void json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static void watch_event(const pconn_event_t *ev, void *arg)
{
    watch_t *w = arg;
    if (w->first_ns == 0)
        w->first_ns = ev->time_ns;
    double delta = w->last_ns == 0 ? 0 : (double)(ev->time_ns - w->last_ns) / 1e9;
    w->last_ns = ev->time_ns;
    if (ev->kind == PCONN_EVENT_ATTEMPTING_TO_CONNECT)
        w->attempts++;
    if (ev->kind == PCONN_EVENT_FAILED_TO_CONNECT)
        w->failures++;
    if (ev->kind == PCONN_EVENT_CONNECTED)
        w->connected_at_ns = ev->time_ns;
    if (ev->kind == PCONN_EVENT_DISCONNECTED && w->connected_at_ns != 0) {
        w->connected_ns += ev->time_ns - w->connected_at_ns;
        w->connected_at_ns = 0;
    }
    long long n = atomic_fetch_add(&w->events, 1) + 1;
    if (w->a->count > 0 && n > w->a->count)
        return; /* the count is printed: the rest is the close */
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    struct tm tm;
    localtime_r(&rt.tv_sec, &tm);
    char when[64];
    strftime(when, sizeof when, "%H:%M:%S", &tm);
    if (w->a->json) {
        printf("{\"time\":\"%s.%03ld\",\"delta_s\":%.3f,\"event\":", when, rt.tv_nsec / 1000000, delta);
        json_string(stdout, pconn_event_kind_name(ev->kind));
        if (ev->address != NULL) {
            printf(",\"address\":");
            json_string(stdout, ev->address);
        }
        if (ev->error != NULL) {
            printf(",\"error\":");
            json_string(stdout, pconn_err_name(ev->error->code));
            printf(",\"message\":");
            json_string(stdout, ev->error->message);
        }
        printf("}\n");
    } else {
        char line[PCONN_ADDRESS_MAX + 400];
        pconn_event_format(ev, line, sizeof line);
        printf("%s.%03ld +%.3fs %s\n", when, rt.tv_nsec / 1000000, delta, line);
    }
    fflush(stdout);
    if (n == w->a->count)
        kill(getpid(), SIGUSR1); /* to the main thread, the one not blocking it in sigwait */
}

static int cmd_watch(int argc, char **argv)
{
    args_t a;
    int rc = parse(argc, argv, "watch", help_watch, "ecjp", &a);
    if (rc != 0)
        return rc == 1 ? 0 : rc;
    if (a.npos != 1)
        return usage_error("watch", "%s", a.npos == 0 ? "want a SPEC" : "want exactly one SPEC");
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGUSR1);
    sigprocmask(SIG_BLOCK, &stop, NULL); /* before any thread: they inherit it */
    watch_t w = {.a = &a};
    atomic_init(&w.events, 0);
    pconn_t *pc = spec_pconn(&a, a.pos[0], watch_event, &w);
    if (pc == NULL)
        return 2;
    int sig;
    sigwait(&stop, &sig);
    int64_t end = pconn_clock_now(NULL);
    char *stats = a.json && sig != SIGUSR1 ? pconn_stats_json(pc) : NULL;
    pconn_free(pc); /* the last DISCONNECTED comes out before this returns */
    if (sig != SIGUSR1) { /* interrupted: the summary */
        int64_t span = w.first_ns != 0 ? end - w.first_ns : 0;
        double up = (double)w.connected_ns / 1e9;
        if (a.json) /* with the pconn's counters as pconn_stats_json() gives them */
            printf("{\"summary\":{\"seconds\":%.3f,\"connected_seconds\":%.3f,\"cycles\":%lld,\"failures\":%lld},\"stats\":%s}\n",
                   (double)span / 1e9, up, w.attempts, w.failures, stats != NULL ? stats : "null");
        else
            printf("summary: connected %.3f s of %.3f s, %lld cycles, %lld failures\n", up,
                   (double)span / 1e9, w.attempts, w.failures);
    }
    free(stats);
    return 0;
}

/* ---- cat --------------------------------------------------------------------------- */

static int cmd_cat(int argc, char **argv)
{
    args_t a;
    int rc = parse(argc, argv, "cat", help_cat, "ep", &a);
    if (rc != 0)
        return rc == 1 ? 0 : rc;
    if (a.npos != 1)
        return usage_error("cat", "%s", a.npos == 0 ? "want a SPEC" : "want exactly one SPEC");
    pconn_t *pc = spec_pconn(&a, a.pos[0], NULL, NULL);
    if (pc == NULL)
        return 2;
    int status = 0;
    bool input_done = false;
    pconn_conn_t *c = NULL;
    char buf[65536];
    for (;;) {
        if (c == NULL && pconn_connected(pc, PCONN_FOREVER, &c) != PCONN_OK)
            break;
        struct pollfd p[2] = {{.fd = pconn_tcp_fd(c), .events = POLLIN},
                              {.fd = 0, .events = POLLIN}};
        /* After the end of stdin: the answers still coming, until 500 ms of quiet. */
        int n = poll(p, input_done ? 1 : 2, input_done ? 500 : -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            break;
        if (p[0].revents != 0) {
            ssize_t got = recv(p[0].fd, buf, sizeof buf, 0);
            if (got > 0) {
                fwrite(buf, 1, (size_t)got, stdout);
                fflush(stdout);
            } else { /* the peer went away: the pconn connects again */
                pconn_conn_close(c);
                pconn_conn_unref(c);
                c = NULL;
                if (input_done)
                    break;
            }
            continue;
        }
        if (!input_done && p[1].revents != 0) {
            ssize_t got = read(0, buf, sizeof buf);
            if (got <= 0) {
                input_done = true;
                continue;
            }
            pconn_error_t err;
            if (pconn_tcp_send_all(c, buf, (size_t)got, &err) != PCONN_OK) {
                fprintf(stderr, "pconn cat: %zd bytes not sent (%s): %.*s\n", got, err.message,
                        (int)(memchr(buf, '\n', (size_t)got) != NULL
                                  ? (char *)memchr(buf, '\n', (size_t)got) - buf
                                  : got),
                        buf);
                status = 5;
                pconn_conn_close(c);
                pconn_conn_unref(c);
                c = NULL;
            }
        }
    }
    pconn_conn_unref(c);
    pconn_free(pc);
    return status;
}

/* ---- call -------------------------------------------------------------------------- */

static int cmd_call(int argc, char **argv)
{
    args_t a;
    int rc = parse(argc, argv, "call", help_call, "tvep", &a);
    if (rc != 0)
        return rc == 1 ? 0 : rc;
    if (a.npos < 2 || a.npos > 3)
        return usage_error("call", "%s", "want SPEC NAME [PAYLOAD|-]");
    pconn_buf_t req = {0};
    if (a.npos == 3 && strcmp(a.pos[2], "-") == 0) {
        char chunk[65536];
        size_t n;
        while ((n = fread(chunk, 1, sizeof chunk, stdin)) > 0)
            if (pconn_buf_append(&req, chunk, n) != PCONN_OK) {
                fprintf(stderr, "pconn call: out of memory reading stdin\n");
                return 4;
            }
    } else if (a.npos == 3) {
        pconn_buf_append(&req, a.pos[2], strlen(a.pos[2]));
    }
    pconn_resolver_t *r = spec_resolver(&a, a.pos[0]);
    if (r == NULL) {
        pconn_buf_free(&req);
        return 2;
    }
    pconn_rpc_options_t o = {.base = {.server_name = a.pos[0], .resolver = r, .retry_delay = every_delay,
                                      .retry_delay_arg = (void *)&a.every_ms},
                             .handshake_timeout_ms = ms_of(a.timeout_s)};
    pconn_t *pc = NULL;
    rc = pconn_rpc_create(&o, &pc);
    if (rc != PCONN_OK) {
        fprintf(stderr, "pconn call: %s\n", pconn_strerror(rc));
        pconn_buf_free(&req);
        return 2;
    }
    pconn_buf_t resp;
    pconn_error_t err = {0};
    rc = pconn_rpc_dispatch(pc, a.pos[1], (int)a.version, req.data, req.len, &resp, ms_of(a.timeout_s), &err);
    pconn_free(pc);
    pconn_buf_free(&req);
    if (rc == PCONN_OK) {
        fwrite(resp.data, 1, resp.len, stdout);
        pconn_buf_free(&resp);
        return 0;
    }
    if (rc == PCONN_EINVAL) { /* a bad NAME or VERSION */
        fprintf(stderr, "pconn call: %s\n", err.message);
        return 2;
    }
    fprintf(stderr, "pconn call: %s: %s\n", pconn_err_name(rc),
            err.message[0] != '\0' ? err.message : pconn_strerror(rc));
    return rc == PCONN_ETIMEDOUT ? 1
           : rc == PCONN_EUNIMPLEMENTED || rc == PCONN_EREMOTE || rc == PCONN_ETOOBIG ? 3
                                                                                        : 4;
}

/* ---- serve ------------------------------------------------------------------------- */

static int cmd_serve(int argc, char **argv)
{
    args_t a;
    int rc = parse(argc, argv, "serve", help_serve, "naT", &a);
    if (rc != 0)
        return rc == 1 ? 0 : rc;
    if (a.npos != 1)
        return usage_error("serve", "%s", "want one LISTEN address");
    const char *listen_at = a.pos[0], *name = a.name, *etcd = a.etcd, *key = a.key;
    int ttl = (int)a.ttl;
    pconn_error_t err;
    int lfd = pconn_tcp_listen(listen_at, 0, &err);
    if (lfd < 0) {
        fprintf(stderr, "pconn serve: %s\n", err.message);
        return 1;
    }
    char address[PCONN_ADDRESS_MAX];
    pconn_tcp_local_address(lfd, address, sizeof address);
    /* SIGTERM and SIGINT end the server cleanly (the lease is revoked). Blocked before
     * the announcer's thread starts, so that no thread takes them with the default. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigprocmask(SIG_BLOCK, &stop, NULL);
    pconn_announcer_t *announcer = NULL;
    if (etcd != NULL) {
        pconn_announce_options_t ao = {.etcd_url = etcd, .key = key, .address = address, .ttl_s = ttl};
        if (pconn_announce_start(&ao, &announcer, &err) != PCONN_OK) {
            fprintf(stderr, "pconn serve: %s\n", err.message);
            return 1;
        }
    }
    int sfd = signalfd(-1, &stop, SFD_CLOEXEC);
    printf("listening on %s\n", address);
    fflush(stdout);

    /* One reply per line, however the lines arrive: split over reads or several in one.
     * A line longer than the buffer is answered in pieces. */
    static struct pollfd pfd[256];
    static struct {
        char buf[1024];
        size_t len;
    } in[256];
    pfd[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
    pfd[1] = (struct pollfd){.fd = sfd, .events = POLLIN};
    nfds_t n = 2;
    while (!(pfd[1].revents & POLLIN)) {
        if (poll(pfd, n, -1) < 0)
            continue;
        for (nfds_t i = n; i-- > 2;) {
            if (!pfd[i].revents)
                continue;
            ssize_t got = recv(pfd[i].fd, in[i].buf + in[i].len, sizeof in[i].buf - in[i].len, 0);
            if (got <= 0) {
                close(pfd[i].fd);
                pfd[i] = pfd[--n];
                in[i] = in[n];
                continue;
            }
            in[i].len += (size_t)got;
            char *start = in[i].buf, *end = in[i].buf + in[i].len, *nl;
            while ((nl = memchr(start, '\n', (size_t)(end - start))) != NULL ||
                   (start == in[i].buf && in[i].len == sizeof in[i].buf)) {
                size_t line = nl != NULL ? (size_t)(nl - start) : in[i].len;
                char reply[sizeof in[i].buf + 300];
                int len = snprintf(reply, sizeof reply, "%s: %.*s\n", name, (int)line, start);
                (void)!send(pfd[i].fd, reply, (size_t)len, MSG_NOSIGNAL);
                start += line + (nl != NULL);
                if (nl == NULL)
                    break;
            }
            in[i].len = (size_t)(end - start);
            memmove(in[i].buf, start, in[i].len);
        }
        if ((pfd[0].revents & POLLIN) && n < 256) {
            int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            if (fd >= 0) {
                in[n].len = 0;
                pfd[n++] = (struct pollfd){.fd = fd, .events = POLLIN};
            }
        }
    }
    pconn_announce_stop(announcer);
    for (nfds_t i = 2; i < n; i++)
        close(pfd[i].fd);
    close(lfd);
    return 0;
}

/* ---- rpc-serve --------------------------------------------------------------- */

static int rpc_echo(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    return pconn_buf_append(resp, req, len);
}

static int rpc_name(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)req, (void)len, (void)err;
    return pconn_buf_append(resp, arg, strlen(arg));
}

static int rpc_sleep(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    char ms[32] = "";
    memcpy(ms, req, len < sizeof ms - 1 ? len : sizeof ms - 1);
    poll(NULL, 0, atoi(ms));
    return pconn_buf_append(resp, req, len);
}

static int cmd_rpc_serve(int argc, char **argv)
{
    args_t a;
    int rc = parse(argc, argv, "rpc-serve", help_rpc_serve, "naT", &a);
    if (rc != 0)
        return rc == 1 ? 0 : rc;
    if (a.npos != 1)
        return usage_error("rpc-serve", "%s", "want one LISTEN address");
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigprocmask(SIG_BLOCK, &stop, NULL);
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    pconn_rpc_impls_add(impls, "echo", 1, rpc_echo, NULL);
    pconn_rpc_impls_add(impls, "name", 1, rpc_name, (void *)a.name);
    pconn_rpc_impls_add_blocking(impls, "sleep", 1, rpc_sleep, NULL); /* it waits */
    pconn_rpc_server_options_t so = {.listen_address = a.pos[0], .implementations = impls};
    pconn_rpc_server_t *srv = NULL;
    pconn_error_t err;
    if (pconn_rpc_server_start(&so, &srv, &err) != PCONN_OK) {
        fprintf(stderr, "pconn rpc-serve: %s\n", err.message);
        pconn_rpc_impls_free(impls);
        return 1;
    }
    pconn_announcer_t *announcer = NULL;
    if (a.etcd != NULL) {
        pconn_announce_options_t ao = {.etcd_url = a.etcd, .key = a.key,
                                       .address = pconn_rpc_server_address(srv), .ttl_s = (int)a.ttl};
        if (pconn_announce_start(&ao, &announcer, &err) != PCONN_OK) {
            fprintf(stderr, "pconn rpc-serve: %s\n", err.message);
            pconn_rpc_server_stop(srv);
            pconn_rpc_impls_free(impls);
            return 1;
        }
    }
    printf("listening on %s\n", pconn_rpc_server_address(srv));
    fflush(stdout);
    int sig;
    sigwait(&stop, &sig);
    pconn_announce_stop(announcer);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } cmds[] = {{"wait", cmd_wait},   {"watch", cmd_watch}, {"cat", cmd_cat},
                {"call", cmd_call},   {"serve", cmd_serve}, {"rpc-serve", cmd_rpc_serve}};
    if (argc < 2) {
        fputs(help_main, stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        fputs(help_main, stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("pconn %s\n", pconn_version());
        return 0;
    }
    if (strcmp(argv[1], "port") == 0) {
        pconn_error_t err;
        char address[64];
        int fd = pconn_tcp_listen("127.0.0.1:0", 1, &err);
        if (fd < 0 || pconn_tcp_local_address(fd, address, sizeof address) != PCONN_OK)
            return 1;
        close(fd);
        printf("%s\n", strrchr(address, ':') + 1);
        return 0;
    }
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (strcmp(argv[1], cmds[i].name) == 0)
            return cmds[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "pconn: unknown command %s (pconn --help)\n", argv[1]);
    return 2;
}
