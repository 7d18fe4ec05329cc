/* conn.c - reference-counted connections.
 * close makes I/O fail (ops->close, once); destroy frees and closes the fd, only after
 * the last reference is gone, so no holder can ever touch a reused descriptor. */
#include "internal.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct pconn_conn_t {
    const pconn_conn_ops_t *ops;
    void *impl;
    atomic_uint refs;
    atomic_bool closed;
    pthread_mutex_t mutex; /* guards watch_fd and the wait below */
    pthread_cond_t closed_cond;
    int watch_fd;          /* the owning pconn's wake fd, or -1 */
    char address[PCONN_ADDRESS_MAX];
    unsigned fork_gen;     /* pconn__fork_generation() when made */
    void (*quiesce)(void *impl); /* see pconn__conn_set_quiesce() */
};

pconn_conn_t *pconn_conn_new(const pconn_conn_ops_t *ops, void *impl)
{
    if (ops == NULL || ops->close == NULL || ops->destroy == NULL) {
        errno = EINVAL;
        return NULL;
    }
    pconn_conn_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    if (pthread_mutex_init(&c->mutex, NULL) != 0)
        goto fail_free;
    if (pconn__cond_init(&c->closed_cond) != 0)
        goto fail_mutex;
    c->ops = ops;
    c->impl = impl;
    atomic_init(&c->refs, 1);
    atomic_init(&c->closed, false);
    c->watch_fd = -1;
    c->fork_gen = pconn__fork_generation();
    return c;
fail_mutex:
    pthread_mutex_destroy(&c->mutex);
fail_free:
    free(c);
    errno = ENOMEM;
    return NULL;
}

void *pconn_conn_impl(const pconn_conn_t *c)
{
    return c->impl;
}

const char *pconn_conn_address(const pconn_conn_t *c)
{
    return c->address;
}

void pconn__conn_set_address(pconn_conn_t *c, const char *address)
{
    pconn__strcpy(c->address, sizeof c->address, address);
}

void pconn_conn_ref(pconn_conn_t *c)
{
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
}

void pconn_conn_unref(pconn_conn_t *c)
{
    if (c == NULL)
        return;
    if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) != 1)
        return;
    if (pconn__conn_inherited(c)) {
        /* The impl is the parent's (its destroy may join threads that are not here or
         * say goodbye on the shared socket): only this process's copy of the fd goes. */
        int fd = pconn__conn_fd(c);
        if (fd >= 0)
            close(fd);
        free(c); /* not the mutex or cond: some parent thread may have held them */
        return;
    }
    c->ops->destroy(c->impl);
    pthread_cond_destroy(&c->closed_cond);
    pthread_mutex_destroy(&c->mutex);
    free(c);
}

void pconn__conn_release(pconn_conn_t *c)
{
    /* Alone with it, nobody can see it closed: destroy closes the fd, and a shutdown(2)
     * first would only cost a system call. No one can take a new reference meanwhile:
     * references come from holders, and the pconn no longer hands it out. */
    if (atomic_load_explicit(&c->refs, memory_order_acquire) != 1)
        pconn_conn_close(c);
    if (c->quiesce != NULL && !pconn__conn_inherited(c))
        c->quiesce(c->impl);
    pconn_conn_unref(c);
}

void pconn__conn_set_quiesce(pconn_conn_t *c, void (*quiesce)(void *impl))
{
    c->quiesce = quiesce;
}

void pconn_conn_close(pconn_conn_t *c)
{
    if (atomic_exchange(&c->closed, true) || pconn__conn_inherited(c))
        return; /* inherited: a shutdown(2) would end the parent's connection */
    c->ops->close(c->impl);
    pconn__mutex_lock(&c->mutex);
    if (c->watch_fd >= 0)
        pconn__wake(c->watch_fd);
    pthread_cond_broadcast(&c->closed_cond);
    pconn__mutex_unlock(&c->mutex);
}

bool pconn_conn_is_closed(const pconn_conn_t *c)
{
    return atomic_load(&c->closed) || pconn__conn_inherited(c);
}

bool pconn__conn_inherited(const pconn_conn_t *c)
{
    return pconn__inherited(c->fork_gen);
}

int pconn_conn_wait_closed(pconn_conn_t *c, int64_t timeout_ms)
{
    if (pconn__conn_inherited(c))
        return PCONN_OK; /* closed for this process */
    int64_t deadline = pconn__deadline_ns(timeout_ms);
    int rc = PCONN_OK;
    pconn__mutex_lock(&c->mutex);
    while (!atomic_load(&c->closed)) {
        if (pconn__cond_wait_until(&c->closed_cond, &c->mutex, deadline) != 0 &&
            !atomic_load(&c->closed)) {
            rc = PCONN_ETIMEDOUT;
            break;
        }
    }
    pconn__mutex_unlock(&c->mutex);
    return rc;
}

void pconn__conn_watch(pconn_conn_t *c, int wake_fd)
{
    pconn__mutex_lock(&c->mutex);
    c->watch_fd = wake_fd;
    pconn__mutex_unlock(&c->mutex);
}

int pconn__conn_fd(const pconn_conn_t *c)
{
    return c->ops->fd != NULL ? c->ops->fd(c->impl) : -1;
}

const pconn_conn_ops_t *pconn__conn_ops(const pconn_conn_t *c)
{
    return c->ops;
}
