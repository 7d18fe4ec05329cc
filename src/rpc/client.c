/* client.c - pconn_rpc_create(): a persistent connection whose connect makes an RPC
 * connection (TCP connect and handshake within handshake_timeout_ms); and
 * pconn_rpc_dispatch(), wait-then-call in one line. */
#include "rpc.h"
#include "tls.h"

#include <stdlib.h>
#include <string.h>

#define CLIENT_POOL_MAX 64

typedef struct rpc_client_t {
    pconn_tcp_options_t tcp;
    rpc_config_t cfg;
    int64_t handshake_ms;
    pconn__tls_endpoint_t *tls; /* or NULL */
} rpc_client_t;

static void client_free(void *arg)
{
    rpc_client_t *cl = arg;
    pconn__rpc_pool_release(cl->cfg.pool); /* from one of its handlers: waits for none */
    pconn_rpc_impls_free(cl->cfg.impls);   /* the client's reference */
    pconn__rpc_stats_unref(cl->cfg.stats);
    pconn__tls_endpoint_free(cl->tls);
    free((char *)cl->tcp.bind_address);
    free(cl);
}

static int rpc_connect(void *arg, const char *address, pconn_conn_t **conn, pconn_error_t *err)
{
    rpc_client_t *cl = arg;
    int64_t deadline = pconn__deadline_ns(cl->handshake_ms);
    int fd = pconn__tcp_connect_fd(&cl->tcp, address, err);
    if (fd < 0)
        return err->code;
    return pconn__rpc_conn_open(fd, address, &cl->cfg, deadline, pconn__cancel_fd(), pconn__cancelled, conn,
                                err);
}

rpc_stats_t *pconn__rpc_client_stats(void *connect_arg, pconn_connect_fn connect)
{
    return connect == rpc_connect ? ((rpc_client_t *)connect_arg)->cfg.stats : NULL;
}

int pconn_rpc_create(const pconn_rpc_options_t *opts, pconn_t **out)
{
    if (out != NULL)
        *out = NULL;
    if (opts == NULL)
        return PCONN_EINVAL;
    pconn_error_t err;
    rpc_client_t *cl = NULL;
    int rc = pconn__resolver_check_addresses(opts->base.resolver, &err);
    if (rc != PCONN_OK)
        goto fail;
    rc = PCONN_ENOMEM;
    cl = calloc(1, sizeof *cl);
    if (cl == NULL)
        goto fail;
    cl->handshake_ms = opts->handshake_timeout_ms > 0 ? opts->handshake_timeout_ms : RPC_DEFAULT_HANDSHAKE_MS;
    /* As in Async, the handshake timeout bounds the TCP connect too. */
    cl->tcp.connect_timeout_ms = cl->handshake_ms;
    cl->tcp.nodelay = true;
    if (opts->bind_address != NULL && (cl->tcp.bind_address = strdup(opts->bind_address)) == NULL)
        goto fail;
    if (opts->tls != NULL && (opts->transport != NULL ||
                              (cl->tls = pconn__tls_endpoint_new(opts->tls, false, &err)) == NULL)) {
        rc = opts->transport != NULL ? PCONN_EINVAL : err.code;
        goto fail;
    }
    pconn__rpc_config(&cl->cfg, opts->implementations, opts->max_message_size, &opts->heartbeat,
                      cl->tls != NULL ? pconn__tls_endpoint_transport(cl->tls) : opts->transport);
    cl->cfg.impls = NULL; /* referenced below, once nothing can fail before client_free */
    if ((cl->cfg.stats = pconn__rpc_stats_new()) == NULL)
        goto fail;
    if (opts->implementations != NULL && (cl->cfg.pool = pconn__rpc_pool_new(CLIENT_POOL_MAX)) == NULL)
        goto fail;
    pconn__rpc_impls_ref(opts->implementations);
    cl->cfg.impls = opts->implementations;
    pconn_options_t base = opts->base;
    base.connect = rpc_connect;
    base.connect_arg = cl;
    return pconn__create(&base, client_free, out);
fail:
    if (cl != NULL)
        client_free(cl);
    pconn_resolver_free(opts->base.resolver);
    return rc;
}

int pconn_rpc_dispatch(pconn_t *pc, const char *name, int version, const void *req,
                       size_t req_len, pconn_buf_t *resp, int64_t timeout_ms, pconn_error_t *err)
{
    if (resp != NULL)
        *resp = (pconn_buf_t){0};
    if (pc == NULL) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_rpc_dispatch: pc is NULL");
        return PCONN_EINVAL;
    }
    int64_t deadline = pconn__deadline_ns(timeout_ms);
    pconn_conn_t *conn = NULL;
    int rc = pconn_connected(pc, timeout_ms, &conn);
    if (rc != PCONN_OK) {
        pconn_error_set(err, rc, 0, "%s: %s", pconn_server_name(pc),
                        rc == PCONN_ETIMEDOUT ? "no connection within the timeout" : "closed");
        return rc;
    }
    int64_t left = timeout_ms;
    if (deadline != INT64_MAX) {
        left = (deadline - pconn__mono_ns()) / 1000000;
        if (left < 0)
            left = 0;
    }
    rc = pconn_rpc_call(conn, name, version, req, req_len, resp, left, err);
    pconn_conn_unref(conn);
    return rc;
}
