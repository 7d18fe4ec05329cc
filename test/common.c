/* common.c - shared test helpers; see common.h. */
#include "common.h"

#include <CUnit/Basic.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

void test_cond_init(pthread_cond_t *c)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
}

struct timespec test_deadline(int64_t timeout_ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec + timeout_ms * 1000000;
    return (struct timespec){.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
}

int test_wait_count(pthread_mutex_t *m, pthread_cond_t *c, const int *counter, int n, int timeout_ms)
{
    struct timespec ts = test_deadline(timeout_ms);
    pthread_mutex_lock(m);
    while (*counter < n && pthread_cond_timedwait(c, m, &ts) == 0)
        ;
    int got = *counter;
    pthread_mutex_unlock(m);
    return got;
}

void rec_init(recorder_t *r)
{
    memset(r, 0, sizeof *r);
    test_cond_init(&r->cond);
    pthread_mutex_init(&r->mutex, NULL);
}

void rec_destroy(recorder_t *r)
{
    pthread_cond_destroy(&r->cond);
    pthread_mutex_destroy(&r->mutex);
}

void rec_on_event(const pconn_event_t *ev, void *arg)
{
    recorder_t *r = arg;
    pthread_mutex_lock(&r->mutex);
    if (r->n < REC_MAX) {
        rec_event_t *e = &r->ev[r->n++];
        e->kind = ev->kind;
        snprintf(e->address, sizeof e->address, "%s", ev->address ? ev->address : "");
        if (ev->error)
            e->error = *ev->error;
        else
            memset(&e->error, 0, sizeof e->error);
        e->time_ns = ev->time_ns;
    }
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->mutex);
    if (r->hook)
        r->hook(ev, r->hook_arg);
}

int rec_wait(recorder_t *r, int n, int64_t timeout_ms)
{
    struct timespec deadline = test_deadline(timeout_ms);
    pthread_mutex_lock(&r->mutex);
    while (r->n < n && pthread_cond_timedwait(&r->cond, &r->mutex, &deadline) == 0)
        ;
    int got = r->n;
    pthread_mutex_unlock(&r->mutex);
    return got;
}

int rec_wait_kind(recorder_t *r, pconn_event_kind_t kind, int k, int64_t timeout_ms)
{
    struct timespec deadline = test_deadline(timeout_ms);
    int found = -1;
    pthread_mutex_lock(&r->mutex);
    for (;;) {
        int seen = 0;
        for (int i = 0; i < r->n; i++) {
            if (r->ev[i].kind == kind && seen++ == k) {
                found = i;
                break;
            }
        }
        if (found >= 0 || pthread_cond_timedwait(&r->cond, &r->mutex, &deadline) != 0)
            break;
    }
    pthread_mutex_unlock(&r->mutex);
    return found;
}

int rec_count(recorder_t *r)
{
    pthread_mutex_lock(&r->mutex);
    int n = r->n;
    pthread_mutex_unlock(&r->mutex);
    return n;
}

rec_event_t rec_get(recorder_t *r, int i)
{
    pthread_mutex_lock(&r->mutex);
    rec_event_t e = r->ev[i];
    pthread_mutex_unlock(&r->mutex);
    return e;
}

void rec_letters(recorder_t *r, char *buf, size_t size)
{
    static const char letters[] = "AOFCD";
    pthread_mutex_lock(&r->mutex);
    size_t i = 0;
    for (; i < (size_t)r->n && i + 1 < size; i++)
        buf[i] = letters[r->ev[i].kind];
    buf[i] = '\0';
    pthread_mutex_unlock(&r->mutex);
}

typedef struct fake_t {
    int fd;
    atomic_int *destroyed;
} fake_t;

static void fake_close(void *impl)
{
    fake_t *f = impl;
    if (f->fd >= 0)
        shutdown(f->fd, SHUT_RDWR);
}

static void fake_destroy(void *impl)
{
    fake_t *f = impl;
    if (f->fd >= 0)
        close(f->fd);
    if (f->destroyed)
        atomic_fetch_add(f->destroyed, 1);
    free(f);
}

static int fake_fd(void *impl)
{
    return ((fake_t *)impl)->fd;
}

static const pconn_conn_ops_t fake_ops = {fake_close, fake_destroy, fake_fd};
static const pconn_conn_ops_t fdless_ops = {fake_close, fake_destroy, NULL};

pconn_conn_t *fake_conn_new(int *peer_fd, atomic_int *destroyed)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
        return NULL;
    fake_t *f = malloc(sizeof *f);
    if (f == NULL) {
        close(sv[0]);
        close(sv[1]);
        return NULL;
    }
    f->fd = sv[0];
    f->destroyed = destroyed;
    *peer_fd = sv[1];
    pconn_conn_t *c = pconn_conn_new(&fake_ops, f);
    if (c == NULL) {
        close(sv[0]);
        close(sv[1]);
        free(f);
    }
    return c;
}

pconn_conn_t *fdless_conn_new(atomic_int *destroyed)
{
    fake_t *f = malloc(sizeof *f);
    if (f == NULL)
        return NULL;
    f->fd = -1;
    f->destroyed = destroyed;
    pconn_conn_t *c = pconn_conn_new(&fdless_ops, f);
    if (c == NULL)
        free(f);
    return c;
}

int count_open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory's own descriptor */
}

int run_suite(const char *suite, const test_def_t *tests, int argc, char **argv)
{
    if (CU_initialize_registry() != CUE_SUCCESS)
        return 2;
    CU_pSuite s = CU_add_suite(suite, NULL, NULL);
    for (const test_def_t *t = tests; t->name != NULL; t++) {
        /* An argument selects the tests whose name contains it. */
        if (argc > 1 && strstr(t->name, argv[1]) == NULL)
            continue;
        CU_add_test(s, t->name, t->fn);
    }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    /* CU_basic_run_tests() succeeds even when tests fail: count the failures. */
    unsigned failures = CU_get_number_of_failures() + CU_get_number_of_tests_failed();
    unsigned run = CU_get_number_of_tests_run();
    CU_cleanup_registry();
    return failures == 0 && run > 0 ? 0 : 1;
}

const char *test_build_dir(void)
{
    const char *b = getenv("PCONN_TEST_BUILD");
    return b != NULL ? b : "build/plain";
}

int tproc_spawn(tproc_t *p, const char *const *argv)
{
    char path[512];
    if (argv[0][0] == '/')
        snprintf(path, sizeof path, "%s", argv[0]);
    else
        snprintf(path, sizeof path, "%s/samples/%s", test_build_dir(), argv[0]);
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return -1;
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        dup2(fds[1], 1);
        execv(path, (char *const *)argv);
        _exit(127);
    }
    close(fds[1]);
    if (pid < 0) {
        close(fds[0]);
        return -1;
    }
    p->pid = pid;
    p->out = fdopen(fds[0], "r");
    return 0;
}

int tproc_read_line(tproc_t *p, char *buf, size_t size)
{
    if (fgets(buf, (int)size, p->out) == NULL)
        return -1;
    buf[strcspn(buf, "\n")] = '\0';
    return 0;
}

int tproc_spawn_server(tproc_t *p, const char *const *argv, char *address, size_t size)
{
    char line[PCONN_ADDRESS_MAX + 32];
    if (tproc_spawn(p, argv) != 0)
        return -1;
    if (tproc_read_line(p, line, sizeof line) != 0 || strncmp(line, "listening on ", 13) != 0) {
        tproc_signal(p, SIGKILL);
        return -1;
    }
    snprintf(address, size, "%s", line + 13);
    return 0;
}

void tproc_signal(tproc_t *p, int sig)
{
    if (p->pid <= 0)
        return; /* reaped already: kill(0) would signal our whole process group */
    kill(p->pid, sig);
    if (sig == SIGKILL)
        tproc_wait(p);
}

int tproc_wait(tproc_t *p)
{
    int status = 0;
    if (p->pid > 0)
        waitpid(p->pid, &status, 0);
    p->pid = 0;
    if (p->out != NULL)
        fclose(p->out);
    p->out = NULL;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}
