/* rpc_pool.c - implementations (name, version -> handler), byte buffers, and the handler
 * pool that runs them, growing while every thread is busy. */
#include "rpc.h"

#include <errno.h>
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
} impl_t;

struct pconn_rpc_impls_t {
    size_t n, cap;
    impl_t *items;
};

pconn_rpc_impls_t *pconn_rpc_impls_new(void)
{
    return calloc(1, sizeof(pconn_rpc_impls_t));
}

pconn_rpc_handler_fn pconn__rpc_impls_find(const pconn_rpc_impls_t *impls, const char *name,
                                           size_t name_len, uint32_t version, void **arg)
{
    for (size_t i = 0; impls != NULL && i < impls->n; i++) {
        const impl_t *m = &impls->items[i];
        if (m->version == version && m->name_len == name_len && memcmp(m->name, name, name_len) == 0) {
            *arg = m->arg;
            return m->fn;
        }
    }
    return NULL;
}

int pconn_rpc_impls_add(pconn_rpc_impls_t *impls, const char *name, int version,
                        pconn_rpc_handler_fn fn, void *arg)
{
    if (impls == NULL || name == NULL || fn == NULL || version < 0)
        return PCONN_EINVAL;
    size_t len = strlen(name);
    void *ignored;
    if (len == 0 || len > RPC_NAME_MAX || pconn__rpc_impls_find(impls, name, len, (uint32_t)version, &ignored))
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
    impls->n++;
    return PCONN_OK;
}

void pconn_rpc_impls_free(pconn_rpc_impls_t *impls)
{
    if (impls == NULL)
        return;
    for (size_t i = 0; i < impls->n; i++)
        free(impls->items[i].name);
    free(impls->items);
    free(impls);
}

/* ---- the pool ---- */

typedef struct job_t {
    void (*fn)(void *);
    void *arg;
    struct job_t *next;
} job_t;

struct rpc_pool_t {
    pthread_mutex_t mutex;
    pthread_cond_t work;   /* a job queued, or stop */
    pthread_cond_t idle;   /* the pool drained */
    job_t *head, *tail;
    int threads, waiting, running, max;
    bool stop;
};

static void *pool_main(void *arg)
{
    rpc_pool_t *p = arg;
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
        p->running++;
        pconn__mutex_unlock(&p->mutex);
        j->fn(j->arg);
        free(j);
        pconn__mutex_lock(&p->mutex);
        p->running--;
    }
    p->threads--;
    pthread_cond_broadcast(&p->idle);
    pconn__mutex_unlock(&p->mutex);
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
    if (p->tail != NULL)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    /* Grow when no thread is free to take it: a slow handler must not hold up others. */
    if (p->waiting == 0 && p->threads < p->max) {
        pthread_t t;
        if (pconn__thread_start(&t, pool_main, p, 0, true) == 0)
            p->threads++;
    }
    bool orphan = p->threads == 0; /* could not start any thread */
    if (!orphan)
        pthread_cond_signal(&p->work);
    pconn__mutex_unlock(&p->mutex);
    if (orphan) {
        fn(arg); /* better late than lost: run it here */
        pconn__mutex_lock(&p->mutex);
        p->head = p->tail = NULL;
        pconn__mutex_unlock(&p->mutex);
        free(j);
    }
    return PCONN_OK;
}

void pconn__rpc_pool_free(rpc_pool_t *p)
{
    if (p == NULL)
        return;
    pconn__mutex_lock(&p->mutex);
    p->stop = true;
    pthread_cond_broadcast(&p->work);
    while (p->threads > 0)
        pthread_cond_wait(&p->idle, &p->mutex);
    pconn__mutex_unlock(&p->mutex);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->idle);
    pthread_mutex_destroy(&p->mutex);
    free(p);
}
