/* common.h - what every test suite shares: an event recorder that tests wait on, fake
 * connections over socketpairs, fd counting, and the CUnit runner. */
#ifndef PCONN_TEST_COMMON_H
#define PCONN_TEST_COMMON_H

#include "pconn.h"

#include <CUnit/CUnit.h>
#include <pthread.h>
#include <stdatomic.h>

/* A generous safety net for waits on events; tests never assert speed. */
#define WAIT_MS 20000

#define REC_MAX 512
typedef struct rec_event_t {
    pconn_event_kind_t kind;
    char address[PCONN_ADDRESS_MAX];
    pconn_error_t error;
    int64_t time_ns;
} rec_event_t;

typedef struct recorder_t {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int n;
    rec_event_t ev[REC_MAX];
    /* Called after recording, on the worker thread, if set. */
    void (*hook)(const pconn_event_t *ev, void *arg);
    void *hook_arg;
} recorder_t;

void rec_init(recorder_t *r);
void rec_destroy(recorder_t *r);
void rec_on_event(const pconn_event_t *ev, void *arg); /* arg: recorder_t * */
/* Waits until at least n events are recorded; returns the count then. */
int rec_wait(recorder_t *r, int n, int64_t timeout_ms);
/* Waits until the k-th event (0-based) of the given kind is recorded; its index or -1. */
int rec_wait_kind(recorder_t *r, pconn_event_kind_t kind, int k, int64_t timeout_ms);
int rec_count(recorder_t *r);
/* The sequence as letters: A(ttempting) O(btained) F(ailed) C(onnected) D(isconnected). */
void rec_letters(recorder_t *r, char *buf, size_t size);
rec_event_t rec_get(recorder_t *r, int i);

/* A connection over one end of a socketpair; the peer end is returned to the test.
 * Each destroy increments *destroyed (may be NULL). */
pconn_conn_t *fake_conn_new(int *peer_fd, atomic_int *destroyed);
/* A connection with no fd at all, ended only by pconn_conn_close(). */
pconn_conn_t *fdless_conn_new(atomic_int *destroyed);

int count_open_fds(void);

/* A condition variable that waits on CLOCK_MONOTONIC. */
void test_cond_init(pthread_cond_t *c);
/* The CLOCK_MONOTONIC time timeout_ms from now, for pthread_cond_timedwait(). */
struct timespec test_deadline(int64_t timeout_ms);

/* Waits (holding nothing on return) until *counter, guarded by m and signalled on c,
 * reaches n or timeout_ms passes; the count then. */
int test_wait_count(pthread_mutex_t *m, pthread_cond_t *c, const int *counter, int n, int timeout_ms);

/* The build directory the tests run from (PCONN_TEST_BUILD), for the sample programs. */
const char *test_build_dir(void);

/* A child process whose stdout is read line by line; it dies with the test process. */
typedef struct tproc_t {
    int pid;
    FILE *out;
} tproc_t;
/* argv[0] is a program in the build's samples/ directory, or an absolute path.
 * 0 or -1. */
int tproc_spawn(tproc_t *p, const char *const *argv);
/* Reads one line of its output into buf, without the newline; 0, or -1 at its end. */
int tproc_read_line(tproc_t *p, char *buf, size_t size);
/* Spawns a `pconn serve`/`pconn rpc-serve` command line and reads its first line,
 * "listening on ADDRESS", into address. 0 or -1. */
int tproc_spawn_server(tproc_t *p, const char *const *argv, char *address, size_t size);
/* Sends sig; with SIGKILL also reaps it and closes its output. */
void tproc_signal(tproc_t *p, int sig);
/* Waits for it to end; its exit status, or -1 when killed by a signal. */
int tproc_wait(tproc_t *p);

typedef struct test_def_t {
    const char *name;
    void (*fn)(void);
} test_def_t;
/* Runs the tests (NULL-terminated) as one CUnit suite; the exit status for main(). */
int run_suite(const char *suite, const test_def_t *tests, int argc, char **argv);

#endif
