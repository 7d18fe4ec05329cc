/* tls.h - what the rest of the library needs of src/tls.c (hidden). */
#ifndef PCONN_TLS_INTERNAL_H
#define PCONN_TLS_INTERNAL_H

#include "internal.h"
#include "pconn_rpc.h"
#include "pconn_tls.h"

#include <sys/types.h>

/* The configuration's options as given (strings copied), for libcurl. */
PCONN_HIDDEN const pconn_tls_options_t *pconn__tls_config_options(const pconn_tls_config_t *cfg);
PCONN_HIDDEN bool pconn__tls_config_is_server(const pconn_tls_config_t *cfg);

/* An RPC client's or server's TLS: a pconn_transport_t over the configuration (which it
 * holds a reference to) and, for a client, the session the next connection resumes. */
typedef struct pconn__tls_endpoint_t pconn__tls_endpoint_t;
/* NULL with err filled: PCONN_EINVAL (a client configuration where a server's is
 * needed, or the other way round) or PCONN_ENOMEM. */
PCONN_HIDDEN pconn__tls_endpoint_t *pconn__tls_endpoint_new(pconn_tls_config_t *cfg, bool server,
                                                            pconn_error_t *err);
/* Drops the owner's reference; the sessions still open hold their own. */
PCONN_HIDDEN void pconn__tls_endpoint_free(pconn__tls_endpoint_t *ep);
PCONN_HIDDEN const pconn_transport_t *pconn__tls_endpoint_transport(const pconn__tls_endpoint_t *ep);

/* For a session of the library's TLS transport (t): why its last read, write or
 * handshake failed, in words ("certificate verify failed: unknown CA ..."); NULL for
 * other transports or when nothing failed. */
PCONN_HIDDEN const char *pconn__tls_why(const pconn_transport_t *t, void *session);

/* pconn_tcp_recv() and pconn_tcp_send_all() on a TLS connection (pconn_tls_is_tls()). */
PCONN_HIDDEN ssize_t pconn__tls_recv(const pconn_conn_t *conn, void *buf, size_t len,
                                     int64_t timeout_ms, pconn_error_t *err);
PCONN_HIDDEN int pconn__tls_send_all(const pconn_conn_t *conn, const void *buf, size_t len,
                                     pconn_error_t *err);

#endif
