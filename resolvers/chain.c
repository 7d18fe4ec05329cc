/* chain.c - the chain resolver: the first of several resolvers that answers. */
#include "internal.h"
#include "pconn_resolver.h"

#include <errno.h>
#include <stdlib.h>

typedef struct chain_t {
    size_t n;
    pconn_resolver_t *members[];
} chain_t;

static void chain_free(void *arg)
{
    chain_t *c = arg;
    for (size_t i = 0; i < c->n; i++)
        pconn_resolver_free(c->members[i]);
    free(c);
}

static int chain_resolve(void *arg, char *address, size_t size, pconn_error_t *err)
{
    chain_t *c = arg;
    for (size_t i = 0; i < c->n; i++)
        if (pconn_resolve(c->members[i], address, size, err) == PCONN_OK)
            return PCONN_OK;
    err->code = PCONN_ERESOLVE; /* an abort of one member does not stop the others */
    return PCONN_ERESOLVE;
}

pconn_resolver_t *pconn_resolver_chain(pconn_resolver_t *const *resolvers, size_t n)
{
    chain_t *c = NULL;
    int e = ENOMEM;
    bool ok = resolvers != NULL && n > 0 && n < 1024;
    for (size_t i = 0; ok && i < n; i++)
        ok = resolvers[i] != NULL;
    if (!ok) {
        e = EINVAL;
        goto fail;
    }
    c = malloc(sizeof *c + n * sizeof c->members[0]);
    if (c == NULL)
        goto fail;
    c->n = n;
    for (size_t i = 0; i < n; i++)
        c->members[i] = resolvers[i];
    pconn_resolver_t *r = pconn_resolver_new(chain_resolve, c, chain_free);
    if (r != NULL)
        return r;
    free(c);
fail:
    for (size_t i = 0; resolvers != NULL && i < n; i++)
        pconn_resolver_free(resolvers[i]);
    errno = e;
    return NULL;
}
