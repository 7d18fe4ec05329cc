/* sync.c - the thin layer over pthreads, clocks and eventfd the rest builds on.
 * Lock failures abort: they only happen on a library bug. */
#include "internal.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

void pconn__mutex_lock(pthread_mutex_t *m)
{
    if (pthread_mutex_lock(m) != 0)
        abort();
}

void pconn__mutex_unlock(pthread_mutex_t *m)
{
    if (pthread_mutex_unlock(m) != 0)
        abort();
}

int pconn__mutex_init_adaptive(pthread_mutex_t *m)
{
    pthread_mutexattr_t attr;
    if (pthread_mutexattr_init(&attr) != 0)
        return -1;
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
    int rc = pthread_mutex_init(m, &attr);
    pthread_mutexattr_destroy(&attr);
    return rc == 0 ? 0 : -1;
}

int pconn__cond_init(pthread_cond_t *c)
{
    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0)
        return -1;
    int rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0)
        rc = pthread_cond_init(c, &attr);
    pthread_condattr_destroy(&attr);
    return rc == 0 ? 0 : -1;
}

int64_t pconn__mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t pconn__deadline_ns(int64_t timeout_ms)
{
    if (timeout_ms < 0)
        return INT64_MAX;
    int64_t now = pconn__mono_ns();
    if (timeout_ms > (INT64_MAX - now) / 1000000)
        return INT64_MAX;
    return now + timeout_ms * 1000000;
}

int pconn__poll_timeout_ms(int64_t deadline_ns)
{
    if (deadline_ns == INT64_MAX)
        return -1;
    int64_t left = deadline_ns - pconn__mono_ns();
    if (left <= 0)
        return 0;
    int64_t ms = (left + 999999) / 1000000; /* round up: never wake before the deadline */
    return ms > INT32_MAX ? INT32_MAX : (int)ms;
}

int pconn__cond_wait_until(pthread_cond_t *c, pthread_mutex_t *m, int64_t deadline_ns)
{
    int rc;
    if (deadline_ns == INT64_MAX) {
        rc = pthread_cond_wait(c, m);
    } else {
        struct timespec ts = {.tv_sec = deadline_ns / 1000000000,
                              .tv_nsec = deadline_ns % 1000000000};
        rc = pthread_cond_timedwait(c, m, &ts);
    }
    if (rc != 0 && rc != ETIMEDOUT)
        abort();
    return rc;
}

int pconn__thread_start(pthread_t *t, void *(*fn)(void *), void *arg, size_t stack, bool detached)
{
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0)
        return EAGAIN;
    if (stack > 0)
        pthread_attr_setstacksize(&attr, stack);
    if (detached)
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the new thread inherits the mask */
    int rc = pthread_create(t, &attr, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return rc;
}

int pconn__wake_fd_new(void)
{
    return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

void pconn__wake(int fd)
{
    uint64_t one = 1;
    /* EAGAIN means the counter is saturated: it is readable, which is all we need. */
    while (write(fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

void pconn__wake_drain(int fd)
{
    uint64_t n;
    while (read(fd, &n, sizeof n) < 0 && errno == EINTR)
        ;
}

bool pconn__mutex_lock_until(pthread_mutex_t *m, int64_t deadline_ns)
{
    if (deadline_ns == 0)
        return pthread_mutex_trylock(m) == 0;
    if (deadline_ns == INT64_MAX) {
        pconn__mutex_lock(m);
        return true;
    }
    /* pthread_mutex_timedlock() counts on CLOCK_REALTIME (ThreadSanitizer knows no
     * pthread_mutex_clocklock()): waits of at most 50 ms each, measured afresh against
     * the monotonic deadline, so a clock step moves the bound by one slice at most. */
    for (;;) {
        int64_t left = deadline_ns - pconn__mono_ns();
        if (left <= 0)
            return pthread_mutex_trylock(m) == 0;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int64_t at = (int64_t)ts.tv_nsec + (left < 50000000 ? left : 50000000);
        ts.tv_sec += at / 1000000000;
        ts.tv_nsec = at % 1000000000;
        int rc = pthread_mutex_timedlock(m, &ts);
        if (rc == 0)
            return true;
        if (rc != ETIMEDOUT && rc != EINTR)
            abort(); /* a library bug, as pconn__mutex_lock() */
    }
}
