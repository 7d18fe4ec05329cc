/* clock.c - the real monotonic clock and the manual clock that tests drive.
 * A sleeper waits on its own wake fd; advancing a manual clock writes to the wake fds of
 * the sleepers whose deadline has come, so no wake-up is lost between check and sleep. */
#include "internal.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>

typedef struct sleeper_t {
    int64_t deadline_ns;
    int wake_fd;
    struct sleeper_t *next;
} sleeper_t;

struct pconn_clock_t {
    pthread_mutex_t mutex;
    pthread_cond_t sleepers_changed; /* for pconn_clock_wait_sleepers() */
    int64_t now_ns;
    int nsleepers;
    sleeper_t *sleepers;
};

pconn_clock_t *pconn_clock_manual_new(int64_t start_ns)
{
    pconn_clock_t *clk = calloc(1, sizeof *clk);
    if (clk == NULL)
        return NULL;
    if (pthread_mutex_init(&clk->mutex, NULL) != 0)
        goto fail_free;
    if (pconn__cond_init(&clk->sleepers_changed) != 0)
        goto fail_mutex;
    clk->now_ns = start_ns;
    return clk;
fail_mutex:
    pthread_mutex_destroy(&clk->mutex);
fail_free:
    free(clk);
    errno = ENOMEM;
    return NULL;
}

void pconn_clock_free(pconn_clock_t *clk)
{
    if (clk == NULL)
        return;
    pthread_cond_destroy(&clk->sleepers_changed);
    pthread_mutex_destroy(&clk->mutex);
    free(clk);
}

int64_t pconn_clock_now(const pconn_clock_t *clk)
{
    if (clk == NULL)
        return pconn__mono_ns();
    pconn_clock_t *m = (pconn_clock_t *)clk; /* locking does not change the reading */
    pconn__mutex_lock(&m->mutex);
    int64_t now = m->now_ns;
    pconn__mutex_unlock(&m->mutex);
    return now;
}

void pconn_clock_advance(pconn_clock_t *clk, int64_t ns)
{
    if (clk == NULL || ns < 0)
        return;
    pconn__mutex_lock(&clk->mutex);
    clk->now_ns += ns;
    for (sleeper_t **p = &clk->sleepers; *p != NULL;) {
        sleeper_t *s = *p;
        if (s->deadline_ns <= clk->now_ns) {
            *p = s->next;
            s->next = NULL;
            clk->nsleepers--;
            pconn__wake(s->wake_fd); /* the sleeper is blocked on this fd: still open */
        } else {
            p = &s->next;
        }
    }
    pthread_cond_broadcast(&clk->sleepers_changed);
    pconn__mutex_unlock(&clk->mutex);
}

int pconn_clock_wait_sleepers(pconn_clock_t *clk, int n, int64_t real_timeout_ms)
{
    if (clk == NULL)
        return PCONN_EINVAL;
    int64_t deadline = pconn__deadline_ns(real_timeout_ms);
    int rc = PCONN_OK;
    pconn__mutex_lock(&clk->mutex);
    while (clk->nsleepers < n) {
        if (pconn__cond_wait_until(&clk->sleepers_changed, &clk->mutex, deadline) != 0 &&
            clk->nsleepers < n) {
            rc = PCONN_ETIMEDOUT;
            break;
        }
    }
    pconn__mutex_unlock(&clk->mutex);
    return rc;
}

static void sleep_real(int64_t deadline_ns, int wake_fd)
{
    struct pollfd pfd = {.fd = wake_fd, .events = POLLIN};
    for (;;) {
        int timeout = pconn__poll_timeout_ms(deadline_ns);
        if (timeout == 0)
            return;
        int rc = poll(&pfd, 1, timeout);
        if (rc > 0)
            return;
        if (rc < 0 && errno != EINTR)
            return;
    }
}

static void sleep_manual(pconn_clock_t *clk, int64_t deadline_ns, int wake_fd)
{
    sleeper_t self = {.deadline_ns = deadline_ns, .wake_fd = wake_fd};
    pconn__mutex_lock(&clk->mutex);
    if (clk->now_ns >= deadline_ns) {
        pconn__mutex_unlock(&clk->mutex);
        return;
    }
    self.next = clk->sleepers;
    /* On our stack, and unlinked (by advance or below) before we return. */
    // cppcheck-suppress autoVariables
    clk->sleepers = &self;
    clk->nsleepers++;
    pthread_cond_broadcast(&clk->sleepers_changed);
    pconn__mutex_unlock(&clk->mutex);

    struct pollfd pfd = {.fd = wake_fd, .events = POLLIN};
    while (poll(&pfd, 1, -1) < 0 && errno == EINTR)
        ;

    /* Woken by something else than advance (close, kick): leave the list. */
    pconn__mutex_lock(&clk->mutex);
    for (sleeper_t **p = &clk->sleepers; *p != NULL; p = &(*p)->next) {
        if (*p == &self) {
            *p = self.next;
            clk->nsleepers--;
            pthread_cond_broadcast(&clk->sleepers_changed);
            break;
        }
    }
    pconn__mutex_unlock(&clk->mutex);
}

void pconn__clock_sleep(pconn_clock_t *clk, int64_t deadline_ns, int wake_fd)
{
    if (clk == NULL)
        sleep_real(deadline_ns, wake_fd);
    else
        sleep_manual(clk, deadline_ns, wake_fd);
    pconn__wake_drain(wake_fd);
}
