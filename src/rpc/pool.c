/* pool.c - implementations (name, version -> handler), byte buffers, and the handler
 * pool that runs them, growing while every thread is busy. */
#include "rpc.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* ---- buffers ---- */

void pconn_buf_free(pconn_buf_t *buf)
{
    if (buf == NULL)
        return;
    free(buf->data);
    buf->data = NULL;
    buf->len = buf->cap = 0;
}

int pconn_buf_append(pconn_buf_t *buf, const void *data, size_t len)
{
    if (buf == NULL || (len > 0 && data == NULL))
        return PCONN_EINVAL;
    if (len > SIZE_MAX - buf->len)
        return PCONN_ENOMEM;
    if (buf->len + len > buf->cap) {
        size_t cap = buf->cap ? buf->cap : 64;
        while (cap < buf->len + len)
            cap = cap > SIZE_MAX / 2 ? buf->len + len : cap * 2;
        void *d = realloc(buf->data, cap);
        if (d == NULL)
            return PCONN_ENOMEM;
        buf->data = d;
        buf->cap = cap;
    }
    if (len > 0)
        memcpy((char *)buf->data + buf->len, data, len);
    buf->len += len;
    return PCONN_OK;
}

/* ---- implementations ---- */

typedef struct impl_t {
    char *name;
    size_t name_len;
    uint32_t version;
    pconn_rpc_handler_fn fn;
    void *arg;
    bool blocking;
} impl_t;

struct pconn_rpc_impls_t {
    atomic_int refs; /* the user's, and one per connection that serves with it */
    size_t n, cap;
    impl_t *items;
};

pconn_rpc_impls_t *pconn_rpc_impls_new(void)
{
    pconn_rpc_impls_t *impls = calloc(1, sizeof *impls);
    if (impls != NULL)
        atomic_init(&impls->refs, 1);
    return impls;
}

void pconn__rpc_impls_ref(pconn_rpc_impls_t *impls)
{
    if (impls != NULL)
        atomic_fetch_add(&impls->refs, 1);
}

pconn_rpc_handler_fn pconn__rpc_impls_find(const pconn_rpc_impls_t *impls, const char *name,
                                           size_t name_len, uint32_t version, void **arg,
                                           bool *blocking)
{
    for (size_t i = 0; impls != NULL && i < impls->n; i++) {
        const impl_t *m = &impls->items[i];
        if (m->version == version && m->name_len == name_len && memcmp(m->name, name, name_len) == 0) {
            *arg = m->arg;
            if (blocking != NULL)
                *blocking = m->blocking;
            return m->fn;
        }
    }
    return NULL;
}

static int impls_add(pconn_rpc_impls_t *impls, const char *name, int version,
                     pconn_rpc_handler_fn fn, void *arg, bool blocking)
{
    if (impls == NULL || name == NULL || fn == NULL || version < 0)
        return PCONN_EINVAL;
    size_t len = strlen(name);
    void *ignored;
    if (len == 0 || len > RPC_NAME_MAX || pconn__rpc_impls_find(impls, name, len, (uint32_t)version, &ignored, NULL))
        return PCONN_EINVAL;
    if (impls->n == impls->cap) {
        size_t cap = impls->cap ? impls->cap * 2 : 8;
        impl_t *items = realloc(impls->items, cap * sizeof *items);
        if (items == NULL)
            return PCONN_ENOMEM;
        impls->items = items;
        impls->cap = cap;
    }
    impl_t *m = &impls->items[impls->n];
    m->name = strdup(name);
    if (m->name == NULL)
        return PCONN_ENOMEM;
    m->name_len = len;
    m->version = (uint32_t)version;
    m->fn = fn;
    m->arg = arg;
    m->blocking = blocking;
    impls->n++;
    return PCONN_OK;
}

int pconn_rpc_impls_add(pconn_rpc_impls_t *impls, const char *name, int version,
                        pconn_rpc_handler_fn fn, void *arg)
{
    return impls_add(impls, name, version, fn, arg, false);
}

int pconn_rpc_impls_add_blocking(pconn_rpc_impls_t *impls, const char *name, int version,
                                 pconn_rpc_handler_fn fn, void *arg)
{
    return impls_add(impls, name, version, fn, arg, true);
}

void pconn_rpc_impls_free(pconn_rpc_impls_t *impls)
{
    if (impls == NULL || atomic_fetch_sub(&impls->refs, 1) != 1)
        return;
    for (size_t i = 0; i < impls->n; i++)
        free(impls->items[i].name);
    free(impls->items);
    free(impls);
}

/* ---- the pool ----
 * Reference counted: its owner (client or server) holds one and every connection using
 * it one. The memory goes when no reference and no thread is left, with whichever goes
 * last, so no thread ever waits for itself. Stopping is separate: no new jobs, queued
 * ones still run. */

typedef struct job_t {
    void (*fn)(void *);
    void *arg;
    struct job_t *next;
} job_t;

struct rpc_pool_t {
    atomic_int refs;
    pthread_mutex_t mutex;
    pthread_cond_t work;   /* a job queued, or stop */
    pthread_cond_t idle;   /* a thread left */
    job_t *head, *tail;
    int threads, waiting, max;
    bool stop;
    bool orphaned;         /* no reference left: the last thread out frees */
};

static _Thread_local rpc_pool_t *tl_pool; /* the pool whose thread this is */

static void pool_destroy(rpc_pool_t *p)
{
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->idle);
    pthread_mutex_destroy(&p->mutex);
    free(p);
}

void pconn__rpc_pool_ref(rpc_pool_t *p)
{
    if (p != NULL)
        atomic_fetch_add(&p->refs, 1);
}

void pconn__rpc_pool_unref(rpc_pool_t *p)
{
    if (p == NULL || atomic_fetch_sub(&p->refs, 1) != 1)
        return;
    pconn__mutex_lock(&p->mutex);
    bool now = p->threads == 0;
    p->orphaned = true;
    p->stop = true;
    pthread_cond_broadcast(&p->work);
    pconn__mutex_unlock(&p->mutex);
    if (now)
        pool_destroy(p);
}

static void *pool_main(void *arg)
{
    rpc_pool_t *p = arg;
    tl_pool = p;
    pconn__mutex_lock(&p->mutex);
    for (;;) {
        while (p->head == NULL && !p->stop) {
            p->waiting++;
            pthread_cond_wait(&p->work, &p->mutex);
            p->waiting--;
        }
        if (p->head == NULL)
            break; /* stopping, nothing left */
        job_t *j = p->head;
        p->head = j->next;
        if (p->head == NULL)
            p->tail = NULL;
        pconn__mutex_unlock(&p->mutex);
        j->fn(j->arg);
        free(j);
        pconn__mutex_lock(&p->mutex);
    }
    bool last = --p->threads == 0 && p->orphaned;
    pthread_cond_broadcast(&p->idle);
    pconn__mutex_unlock(&p->mutex);
    tl_pool = NULL;
    if (last)
        pool_destroy(p);
    return NULL;
}

rpc_pool_t *pconn__rpc_pool_new(int max)
{
    rpc_pool_t *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    pthread_mutex_init(&p->mutex, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->idle, NULL);
    atomic_init(&p->refs, 1);
    p->max = max;
    return p;
}

int pconn__rpc_pool_submit(rpc_pool_t *p, void (*fn)(void *), void *arg)
{
    job_t *j = malloc(sizeof *j);
    if (j == NULL)
        return PCONN_ENOMEM;
    *j = (job_t){fn, arg, NULL};
    pconn__mutex_lock(&p->mutex);
    if (p->stop) {
        pconn__mutex_unlock(&p->mutex);
        free(j);
        return PCONN_ECLOSED;
    }
    /* Grow when no thread is free to take it: a slow handler must not hold up others. */
    if (p->waiting == 0 && p->threads < p->max) {
        pthread_t t;
        if (pconn__thread_start(&t, pool_main, p, 0, true) == 0)
            p->threads++;
    }
    if (p->threads == 0) {
        /* No thread could be started and none runs: refused, never queued (issue 9
         * defect 7: it used to run here and again from the queue). */
        pconn__mutex_unlock(&p->mutex);
        free(j);
        return RPC_POOL_BUSY;
    }
    if (p->tail != NULL)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    pthread_cond_signal(&p->work);
    pconn__mutex_unlock(&p->mutex);
    return PCONN_OK;
}

void pconn__rpc_pool_release(rpc_pool_t *p)
{
    if (p == NULL)
        return;
    pconn__mutex_lock(&p->mutex);
    p->stop = true;
    pthread_cond_broadcast(&p->work);
    /* Wait for the queued and running jobs, unless this is one of them (a handler that
     * frees its own pconn): then they finish after it, and the last thread frees. */
    if (tl_pool != p)
        while (p->threads > 0)
            pthread_cond_wait(&p->idle, &p->mutex);
    pconn__mutex_unlock(&p->mutex);
    pconn__rpc_pool_unref(p);
}

int pconn__rpc_pool_busy(rpc_pool_t *p)
{
    if (p == NULL)
        return 0;
    pconn__mutex_lock(&p->mutex);
    int busy = p->threads - p->waiting;
    pconn__mutex_unlock(&p->mutex);
    return busy;
}
