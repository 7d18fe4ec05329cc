/* soak.c - the chaos soak: the library under churn, through its public API only.
 *
 * Servers run as child processes (`pconn serve`, `pconn rpc-serve`, and etcd when it is
 * installed). 16 threads call RPC through two shared RPC pconns, 4 threads do
 * request/answer over TCP pconns of their own, one more through an etcd catalog
 * resolver; every request carries a unique id that its answer must echo. Each round, a
 * PRNG seeded from STRESS_SEED (printed) picks chaos: kill -9 and restart on the same
 * port, SIGSTOP/SIGCONT (a hung peer), pconn_conn_close, pconn_kick, pconn_close +
 * pconn_free while other threads are blocked in the handle, etcd killed and restarted.
 *
 * Invariants, counted and printed; any violation makes the exit status 1:
 *   - no call or wait outlives its timeout plus SLACK_MS (a watchdog thread looks);
 *   - no answer carries another request's id;
 *   - only the error codes the headers document for each call;
 *   - every pconn's events are well formed (one ATTEMPTING per cycle, CONNECTED and
 *     DISCONNECTED paired, OBTAINED/FAILED only inside an attempt);
 *   - after everything is freed, open descriptors, threads and children are back to
 *     where they were, and the resident memory grew less than RSS_GROWTH_MB.
 *
 *   STRESS_ROUNDS=N (default 1000) STRESS_SEED=S PCONN_TEST_BUILD=build/plain soak
 */
#include "../common.h"
#include "../common_etcd.h"
#include "pconn_resolver.h"
#include "pconn_rpc.h"
#include "pconn_tcp.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SLACK_MS 1500 /* sanitizers slow every step several times over */
#define RSS_GROWTH_MB 512
#else
#define SLACK_MS 500
#define RSS_GROWTH_MB 64
#endif

#define RPC_THREADS 16
#define RPC_PCONNS 2
#define TCP_THREADS 4
#define OP_TIMEOUT_MS 400
#define MAX_WORKERS (RPC_THREADS + TCP_THREADS + 1)

/* ---- counters -------------------------------------------------------------------- */

static atomic_llong calls_ok, calls_failed, mismatched, hung, bad_codes, bad_events;
static atomic_llong errors_by_code[16];
static atomic_llong next_id;
static atomic_bool stop_traffic;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void count_error(int code, const int *allowed)
{
    atomic_fetch_add(&calls_failed, 1);
    if (code >= 0 && code < 16)
        atomic_fetch_add(&errors_by_code[code], 1);
    for (const int *a = allowed; *a >= 0; a++)
        if (*a == code)
            return;
    if (atomic_fetch_add(&bad_codes, 1) < 10)
        fprintf(stderr, "soak: undocumented error code %d (%s)\n", code, pconn_strerror(code));
}

/* ---- the watchdog: every blocking call registers its limit ----------------------- */

typedef struct slot_t {
    atomic_llong deadline_ms; /* 0: not inside a call */
    const char *what;
    atomic_bool reported;
} slot_t;

static slot_t slots[MAX_WORKERS + 8];

static void arm(int slot, const char *what, int64_t timeout_ms)
{
    slots[slot].what = what;
    atomic_store(&slots[slot].reported, false);
    atomic_store(&slots[slot].deadline_ms, now_ms() + timeout_ms + SLACK_MS);
}

static void disarm(int slot)
{
    atomic_store(&slots[slot].deadline_ms, 0);
}

static void *watchdog_main(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop_traffic)) {
        int64_t now = now_ms();
        for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++) {
            int64_t d = atomic_load(&slots[i].deadline_ms);
            if (d != 0 && now > d && !atomic_exchange(&slots[i].reported, true)) {
                atomic_fetch_add(&hung, 1);
                fprintf(stderr, "soak: %s on slot %zu outlived its timeout by %lld ms\n",
                        slots[i].what, i, (long long)(now - d + SLACK_MS));
            }
        }
        poll(NULL, 0, 20);
    }
    return NULL;
}

/* ---- event sequences ------------------------------------------------------------- */

typedef struct seq_t {
    int state; /* 0 between cycles, 1 attempting, 2 connected; touched by one worker */
    const char *name;
} seq_t;

static void check_event(const pconn_event_t *ev, void *arg)
{
    seq_t *s = arg;
    int want = -1, next = s->state;
    switch (ev->kind) {
    case PCONN_EVENT_ATTEMPTING_TO_CONNECT: want = 0, next = 1; break;
    case PCONN_EVENT_OBTAINED_ADDRESS:
    case PCONN_EVENT_FAILED_TO_CONNECT: want = 1; break;
    case PCONN_EVENT_CONNECTED: want = 1, next = 2; break;
    case PCONN_EVENT_DISCONNECTED: want = 2, next = 0; break;
    }
    if (s->state != want && atomic_fetch_add(&bad_events, 1) < 10)
        fprintf(stderr, "soak: %s: event %s in state %d\n", s->name, pconn_event_kind_name(ev->kind),
                s->state);
    s->state = next;
}

/* ---- servers ---------------------------------------------------------------------- */

typedef struct server_t {
    const char *kind; /* "serve" or "rpc-serve" */
    char listen[64];  /* 127.0.0.1:PORT, the same across restarts */
    tproc_t p;
    bool stopped;
} server_t;

static int free_port(void)
{
    pconn_error_t err;
    int fd = pconn_tcp_listen("127.0.0.1:0", 1, &err);
    char a[64];
    pconn_tcp_local_address(fd, a, sizeof a);
    close(fd);
    return atoi(strrchr(a, ':') + 1);
}

static void server_start(server_t *s)
{
    const char *argv[] = {"pconn", s->kind, s->listen, "--name", "S", NULL};
    char address[128];
    /* The port may still be held for a moment by the killed one's last connections. */
    for (int i = 0; i < 200; i++) {
        if (tproc_spawn_server(&s->p, argv, address, sizeof address) == 0) {
            s->stopped = false;
            return;
        }
        poll(NULL, 0, 10);
    }
    fprintf(stderr, "soak: cannot start pconn %s %s\n", s->kind, s->listen);
    exit(2);
}

static void server_kill(server_t *s)
{
    if (s->stopped)
        tproc_signal(&s->p, SIGCONT);
    tproc_signal(&s->p, SIGKILL);
}

/* ---- traffic ----------------------------------------------------------------------- */

static pconn_t *rpc_pcs[RPC_PCONNS];
static seq_t rpc_seq[RPC_PCONNS];

static void *rpc_main(void *arg)
{
    int slot = (int)(intptr_t)arg;
    pconn_t *pc = rpc_pcs[slot % RPC_PCONNS];
    static const int allowed[] = {PCONN_ETIMEDOUT, PCONN_ECLOSED, PCONN_EIO, PCONN_EPROTO, -1};
    while (!atomic_load(&stop_traffic)) {
        char req[64];
        int n = snprintf(req, sizeof req, "rpc-%lld", (long long)atomic_fetch_add(&next_id, 1));
        pconn_buf_t resp;
        pconn_error_t err;
        arm(slot, "pconn_rpc_dispatch", OP_TIMEOUT_MS);
        int rc = pconn_rpc_dispatch(pc, "echo", 1, req, (size_t)n, &resp, OP_TIMEOUT_MS, &err);
        disarm(slot);
        if (rc == PCONN_OK) {
            atomic_fetch_add(&calls_ok, 1);
            if (resp.len != (size_t)n || memcmp(resp.data, req, (size_t)n) != 0)
                atomic_fetch_add(&mismatched, 1);
            pconn_buf_free(&resp);
        } else {
            count_error(rc, allowed);
        }
    }
    return NULL;
}

/* One request/answer over a line echo server: "id\n" -> "S: id\n". */
static int tcp_exchange(pconn_t *pc, int slot, int64_t timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;
    pconn_conn_t *c = NULL;
    arm(slot, "pconn_connected", timeout_ms);
    int rc = pconn_connected(pc, timeout_ms, &c);
    disarm(slot);
    if (rc != PCONN_OK)
        return rc;
    char req[64], want[80], got[80];
    int n = snprintf(req, sizeof req, "tcp-%lld\n", (long long)atomic_fetch_add(&next_id, 1));
    snprintf(want, sizeof want, "S: %s", req);
    arm(slot, "tcp request", timeout_ms);
    rc = pconn_tcp_send_all(c, req, (size_t)n, NULL);
    size_t len = 0;
    int fd = pconn_tcp_fd(c);
    while (rc == PCONN_OK && (len == 0 || got[len - 1] != '\n')) {
        int64_t left = deadline - now_ms();
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (left <= 0 || poll(&p, 1, (int)left) <= 0) {
            rc = PCONN_ETIMEDOUT;
            break;
        }
        ssize_t r = recv(fd, got + len, sizeof got - 1 - len, 0);
        if (r <= 0 || len + (size_t)r >= sizeof got - 1) {
            rc = PCONN_EIO;
            break;
        }
        len += (size_t)r;
    }
    disarm(slot);
    if (rc == PCONN_OK) {
        got[len] = '\0';
        if (strcmp(got, want) != 0)
            atomic_fetch_add(&mismatched, 1);
    } else {
        /* A half-done exchange leaves the stream out of step: start a new one. */
        pconn_conn_close(c);
    }
    pconn_conn_unref(c);
    return rc;
}

typedef struct tcp_worker_t {
    pconn_t *pc;
    seq_t seq;
    int slot;
    pthread_t thread;
} tcp_worker_t;

static void *tcp_main(void *arg)
{
    tcp_worker_t *w = arg;
    static const int allowed[] = {PCONN_ETIMEDOUT, PCONN_ECLOSED, PCONN_EIO, -1};
    while (!atomic_load(&stop_traffic)) {
        int rc = tcp_exchange(w->pc, w->slot, OP_TIMEOUT_MS);
        if (rc == PCONN_OK)
            atomic_fetch_add(&calls_ok, 1);
        else
            count_error(rc, allowed);
    }
    return NULL;
}

static int64_t quick_retry(void *arg, unsigned failures)
{
    (void)arg;
    return failures == 0 ? 10 : 50;
}

/* ---- chaos: free while blocked ---------------------------------------------------- */

typedef struct victim_t {
    pconn_t *pc;
    atomic_int entered;
    pid_t tid[3];
    int rc[3];
} victim_t;

typedef struct victim_arg_t {
    victim_t *v;
    int i;
} victim_arg_t;

static void *victim_main(void *arg)
{
    victim_arg_t *a = arg;
    a->v->tid[a->i] = (pid_t)syscall(SYS_gettid);
    pconn_conn_t *c = NULL;
    atomic_fetch_add(&a->v->entered, 1);
    a->v->rc[a->i] = pconn_connected(a->v->pc, 5000, &c);
    pconn_conn_unref(c);
    return NULL;
}

/* True once the thread sleeps: after `entered`, only inside pconn_connected(). */
static bool sleeping(pid_t tid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');
    return p != NULL && p[1] == ' ' && p[2] == 'S';
}

static atomic_llong victims_freed;

/* Three threads block in pconn_connected() on a pconn that cannot connect; the handle
 * is closed and freed under them: each must wake with PCONN_ECLOSED. */
static void free_while_blocked(int slot)
{
    char dead[64];
    snprintf(dead, sizeof dead, "127.0.0.1:%d", free_port());
    const char *list[] = {dead};
    victim_t v = {0};
    pconn_options_t o = {.server_name = "victim", .resolver = pconn_resolver_static(list, 1),
                         .retry_delay = quick_retry};
    if (pconn_tcp_create(&o, NULL, &v.pc) != PCONN_OK)
        return;
    pthread_t t[3];
    victim_arg_t args[3];
    for (int i = 0; i < 3; i++) {
        args[i] = (victim_arg_t){&v, i};
        pthread_create(&t[i], NULL, victim_main, &args[i]);
    }
    while (atomic_load(&v.entered) < 3)
        sched_yield();
    for (int i = 0; i < 3; i++)
        while (!sleeping(v.tid[i]))
            sched_yield();
    arm(slot, "pconn_close+pconn_free", 1000);
    pconn_close(v.pc, 1000);
    pconn_free(v.pc);
    disarm(slot);
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        if (v.rc[i] != PCONN_ECLOSED && atomic_fetch_add(&bad_codes, 1) < 10)
            fprintf(stderr, "soak: a waiter on a freed pconn got %d\n", v.rc[i]);
    }
    atomic_fetch_add(&victims_freed, 1);
}

/* ---- process accounting --------------------------------------------------------------- */

static int count_dir(const char *path)
{
    DIR *d = opendir(path);
    int n = 0;
    for (struct dirent *e; d != NULL && (e = readdir(d)) != NULL;)
        n += e->d_name[0] != '.';
    if (d != NULL)
        closedir(d);
    return n;
}

static long rss_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f != NULL && fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "VmRSS: %ld", &kb) == 1)
            break;
    if (f != NULL)
        fclose(f);
    return kb;
}

static uint64_t rng;
static unsigned next_rand(unsigned n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (unsigned)(rng % n);
}

static void *nothing(void *arg)
{
    return arg;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const char *rounds_s = getenv("STRESS_ROUNDS"), *seed_s = getenv("STRESS_SEED");
    int rounds = rounds_s != NULL ? atoi(rounds_s) : 1000;
    uint64_t seed = seed_s != NULL ? strtoull(seed_s, NULL, 0) : (uint64_t)time(NULL);
    rng = seed != 0 ? seed : 1;
    printf("soak: %d rounds, STRESS_SEED=%" PRIu64 "\n", rounds, seed);
    fflush(stdout);

    /* A first thread makes ThreadSanitizer start its own background one. */
    pthread_t first;
    pthread_create(&first, NULL, nothing, NULL);
    pthread_join(first, NULL);
    int fds0 = count_open_fds(), threads0 = count_dir("/proc/self/task");

    server_t rpc = {.kind = "rpc-serve"}, tcp = {.kind = "serve"};
    snprintf(rpc.listen, sizeof rpc.listen, "127.0.0.1:%d", free_port());
    snprintf(tcp.listen, sizeof tcp.listen, "127.0.0.1:%d", free_port());
    server_start(&rpc);
    server_start(&tcp);
    tetcd_t etcd;
    bool have_etcd = tetcd_start(&etcd) == 0 && tetcd_put(&etcd, "/soak/echo/1", tcp.listen) == 0;
    if (!have_etcd)
        printf("soak: no etcd, the catalog part is skipped\n");

    for (int i = 0; i < RPC_PCONNS; i++) {
        const char *list[] = {rpc.listen};
        rpc_seq[i].name = "rpc";
        pconn_rpc_options_t o = {.base = {.server_name = "rpc", .resolver = pconn_resolver_static(list, 1),
                                          .on_event = check_event, .on_event_arg = &rpc_seq[i],
                                          .retry_delay = quick_retry},
                                 .handshake_timeout_ms = 300,
                                 .heartbeat = {.timeout_ms = 300, .send_every_ms = 50}};
        if (pconn_rpc_create(&o, &rpc_pcs[i]) != PCONN_OK) {
            fprintf(stderr, "soak: pconn_rpc_create failed\n");
            return 2;
        }
    }
    tcp_worker_t tw[TCP_THREADS + 1];
    int ntw = have_etcd ? TCP_THREADS + 1 : TCP_THREADS;
    for (int i = 0; i < ntw; i++) {
        tw[i] = (tcp_worker_t){.slot = RPC_THREADS + i, .seq = {.name = i < TCP_THREADS ? "tcp" : "catalog"}};
        pconn_resolver_t *r;
        if (i < TCP_THREADS) {
            const char *list[] = {tcp.listen};
            r = pconn_resolver_static(list, 1);
        } else {
            pconn_http_catalog_options_t co = {.url = etcd.url, .format = PCONN_CATALOG_ETCD,
                                               .key = "/soak/echo/", .timeout_ms = 300};
            r = pconn_resolver_http_catalog(&co);
        }
        pconn_options_t o = {.server_name = tw[i].seq.name, .resolver = r, .on_event = check_event,
                             .on_event_arg = &tw[i].seq, .retry_delay = quick_retry};
        pconn_tcp_options_t to = {.connect_timeout_ms = 300, .nodelay = true};
        if (pconn_tcp_create(&o, &to, &tw[i].pc) != PCONN_OK) {
            fprintf(stderr, "soak: pconn_tcp_create failed\n");
            return 2;
        }
    }

    pthread_t watchdog, rt[RPC_THREADS];
    pthread_create(&watchdog, NULL, watchdog_main, NULL);
    for (int i = 0; i < RPC_THREADS; i++)
        pthread_create(&rt[i], NULL, rpc_main, (void *)(intptr_t)i);
    for (int i = 0; i < ntw; i++)
        pthread_create(&tw[i].thread, NULL, tcp_main, &tw[i]);

    const int chaos_slot = MAX_WORKERS;
    long rss0 = -1;
    long long actions[9] = {0};
    int64_t t0 = now_ms();
    for (int round = 0; round < rounds; round++) {
        if (round == rounds / 10)
            rss0 = rss_kb(); /* after the warm-up: caches and arenas are grown by then */
        unsigned what = next_rand(have_etcd ? 9 : 8);
        actions[what]++;
        switch (what) {
        case 0: server_kill(&rpc); server_start(&rpc); break;
        case 1: server_kill(&tcp); server_start(&tcp); break;
        case 2:
        case 3: {
            server_t *s = what == 2 ? &rpc : &tcp;
            tproc_signal(&s->p, SIGSTOP);
            s->stopped = true;
            poll(NULL, 0, 50 + (int)next_rand(650)); /* past heartbeat and call timeouts too */
            tproc_signal(&s->p, SIGCONT);
            s->stopped = false;
            break;
        }
        case 4: {
            pconn_t *pc = next_rand(2) ? rpc_pcs[next_rand(RPC_PCONNS)] : tw[next_rand((unsigned)ntw)].pc;
            pconn_conn_t *c = pconn_current(pc);
            if (c != NULL)
                pconn_conn_close(c);
            pconn_conn_unref(c);
            break;
        }
        case 5: pconn_kick(next_rand(2) ? rpc_pcs[next_rand(RPC_PCONNS)] : tw[next_rand((unsigned)ntw)].pc); break;
        case 6: free_while_blocked(chaos_slot); break;
        case 7: break; /* traffic alone */
        case 8:
            if (next_rand(2)) {
                tetcd_kill(&etcd);
                if (tetcd_restart(&etcd) != 0) {
                    fprintf(stderr, "soak: etcd did not restart\n");
                    return 2;
                }
            } else {
                kill(etcd.pid, SIGSTOP);
                poll(NULL, 0, 50 + (int)next_rand(250));
                kill(etcd.pid, SIGCONT);
            }
            break;
        }
        poll(NULL, 0, 20 + (int)next_rand(30));
    }
    int64_t took = now_ms() - t0;

    atomic_store(&stop_traffic, true);
    for (int i = 0; i < RPC_THREADS; i++)
        pthread_join(rt[i], NULL);
    for (int i = 0; i < ntw; i++)
        pthread_join(tw[i].thread, NULL);
    pthread_join(watchdog, NULL);
    for (int i = 0; i < RPC_PCONNS; i++)
        pconn_free(rpc_pcs[i]);
    for (int i = 0; i < ntw; i++)
        pconn_free(tw[i].pc);
    server_kill(&rpc);
    server_kill(&tcp);
    if (have_etcd)
        tetcd_stop(&etcd);

    long rss1 = rss_kb();
    int fds1 = count_open_fds(), threads1 = count_dir("/proc/self/task");
    int children = 0;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        children++;
    long growth_mb = rss0 > 0 ? (rss1 - rss0) / 1024 : 0;

    printf("soak: %d rounds in %.1f s; chaos: kill rpc %lld, kill tcp %lld, stop rpc %lld, "
           "stop tcp %lld, conn_close %lld, kick %lld, free while blocked %lld, none %lld, etcd %lld\n",
           rounds, (double)took / 1000, actions[0], actions[1], actions[2], actions[3], actions[4],
           actions[5], actions[6], actions[7], actions[8]);
    printf("soak: calls %lld ok, %lld failed (", (long long)calls_ok, (long long)calls_failed);
    for (int c = 1; c < 16; c++)
        if (errors_by_code[c] != 0)
            printf(" %s %lld", pconn_err_name(c), (long long)errors_by_code[c]);
    printf(" )\n");
    printf("soak: hung %lld, mismatched %lld, undocumented codes %lld, bad event sequences %lld\n",
           (long long)hung, (long long)mismatched, (long long)bad_codes, (long long)bad_events);
    printf("soak: after: fds %+d, threads %+d, unreaped children %d, RSS growth %ld MiB (limit %d)\n",
           fds1 - fds0, threads1 - threads0, children, growth_mb, RSS_GROWTH_MB);
    bool ok = hung == 0 && mismatched == 0 && bad_codes == 0 && bad_events == 0 && fds1 == fds0 &&
              threads1 == threads0 && children == 0 && growth_mb < RSS_GROWTH_MB && calls_ok > 0;
    printf("soak: %s\n", ok ? "PASSED" : "FAILED");
    return ok ? 0 : 1;
}
