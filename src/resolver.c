/* resolver.c - the resolver handle, and the static resolver that rotates over a list.
 * Other resolvers live in resolvers/ and are built on pconn_resolver_new(). */
#include "internal.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

struct pconn_resolver_t {
    pconn_resolve_fn fn;
    void *arg;
    void (*destroy)(void *arg);
};

pconn_resolver_t *pconn_resolver_new(pconn_resolve_fn fn, void *arg, void (*destroy)(void *arg))
{
    if (fn == NULL) {
        errno = EINVAL;
        return NULL;
    }
    pconn_resolver_t *r = malloc(sizeof *r);
    if (r == NULL)
        return NULL;
    r->fn = fn;
    r->arg = arg;
    r->destroy = destroy;
    return r;
}

int pconn_resolve(pconn_resolver_t *r, char *address, size_t size, pconn_error_t *err)
{
    pconn_error_t local;
    if (err == NULL)
        err = &local;
    if (r == NULL || address == NULL || size == 0) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_resolve: bad argument");
        return PCONN_EINVAL;
    }
    err->code = PCONN_OK;
    err->sys_errno = 0;
    err->message[0] = '\0';
    address[0] = '\0';
    int rc = r->fn(r->arg, address, size, err);
    if (rc != PCONN_OK) {
        err->code = rc;
        if (err->message[0] == '\0')
            pconn_error_set(err, rc, err->sys_errno, "resolver failed: %s", pconn_strerror(rc));
        return rc;
    }
    if (memchr(address, '\0', size) == NULL || address[0] == '\0') {
        pconn_error_set(err, PCONN_ERESOLVE, 0, "resolver returned an empty or unterminated address");
        return PCONN_ERESOLVE;
    }
    return PCONN_OK;
}

void pconn_resolver_free(pconn_resolver_t *r)
{
    if (r == NULL)
        return;
    if (r->destroy != NULL)
        r->destroy(r->arg);
    free(r);
}

/* ---- static ---- */

typedef struct static_list_t {
    atomic_size_t next;
    size_t n;
    char *addresses[];
} static_list_t;

static void static_free(void *arg)
{
    static_list_t *l = arg;
    for (size_t i = 0; i < l->n; i++)
        free(l->addresses[i]);
    free(l);
}

static int static_resolve(void *arg, char *address, size_t size, pconn_error_t *err)
{
    static_list_t *l = arg;
    size_t i = atomic_fetch_add(&l->next, 1) % l->n;
    if (!pconn__strcpy(address, size, l->addresses[i])) {
        pconn_error_set(err, PCONN_ERESOLVE, 0, "static address %s: longer than %zu bytes",
                        l->addresses[i], size - 1);
        return PCONN_ERESOLVE;
    }
    return PCONN_OK;
}

int pconn__resolver_check_addresses(const pconn_resolver_t *r, pconn_error_t *err)
{
    if (r == NULL || r->fn != static_resolve)
        return PCONN_OK; /* answers known only at resolve time */
    const static_list_t *l = r->arg;
    pconn__addr_t a;
    for (size_t i = 0; i < l->n; i++)
        if (pconn__address_parse(l->addresses[i], false, &a, err) != PCONN_OK)
            return PCONN_EINVAL;
    return PCONN_OK;
}

int pconn_resolver_static_checked(const char *const *addresses, size_t n, pconn_resolver_t **out,
                                  pconn_error_t *err)
{
    pconn_error_t local;
    if (err == NULL)
        err = &local;
    if (out != NULL)
        *out = NULL;
    if (out == NULL || addresses == NULL || n == 0) {
        pconn_error_set(err, PCONN_EINVAL, 0, "static resolver: %s",
                        out == NULL ? "no place for the result" : "no addresses");
        return PCONN_EINVAL;
    }
    pconn__addr_t a;
    for (size_t i = 0; i < n; i++) {
        if (addresses[i] == NULL) {
            pconn_error_set(err, PCONN_EINVAL, 0, "static resolver: address %zu is NULL", i);
            return PCONN_EINVAL;
        }
        if (strlen(addresses[i]) >= PCONN_ADDRESS_MAX) {
            pconn_error_set(err, PCONN_EINVAL, 0, "static resolver: address %zu is longer than %d bytes",
                            i, PCONN_ADDRESS_MAX - 1);
            return PCONN_EINVAL;
        }
        if (pconn__address_parse(addresses[i], false, &a, err) != PCONN_OK)
            return PCONN_EINVAL;
    }
    *out = pconn_resolver_static(addresses, n);
    if (*out == NULL) {
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "static resolver: out of memory");
        return PCONN_ENOMEM;
    }
    return PCONN_OK;
}

pconn_resolver_t *pconn_resolver_static(const char *const *addresses, size_t n)
{
    if (addresses == NULL || n == 0 || n > SIZE_MAX / sizeof(char *) - 1) {
        errno = EINVAL;
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        if (addresses[i] == NULL || addresses[i][0] == '\0' ||
            strlen(addresses[i]) >= PCONN_ADDRESS_MAX) {
            errno = EINVAL;
            return NULL;
        }
    }
    static_list_t *l = calloc(1, sizeof *l + n * sizeof(char *));
    if (l == NULL)
        return NULL;
    atomic_init(&l->next, 0);
    for (; l->n < n; l->n++) {
        l->addresses[l->n] = strdup(addresses[l->n]);
        if (l->addresses[l->n] == NULL)
            goto fail;
    }
    pconn_resolver_t *r = pconn_resolver_new(static_resolve, l, static_free);
    if (r == NULL)
        goto fail;
    return r;
fail:
    static_free(l);
    errno = ENOMEM;
    return NULL;
}
