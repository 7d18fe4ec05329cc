/* pconn_tls.h - TLS for libpconn (OpenSSL 3): one configuration object shared by TCP
 * pconns, RPC clients and servers, the HTTP catalog and the announcer.
 *
 * What is verified by default: a client verifies the server's certificate chain against
 * the system's CA store (or ca_file/ca_path) and that the certificate names the host it
 * connected to (server_name, else the host part of the address: a DNS name or an IP
 * address), and speaks TLS 1.2 or later. A server with ca_file or ca_path set requires
 * every client to present a certificate that chains to them (mutual TLS); without them
 * it asks for none. Turning verification off (insecure_skip_verify) is explicit and
 * loud: pconn_tls_config_new() writes a warning to stderr each time.
 *
 * Every failure names the address and the reason in words: "certificate verify failed:
 * unknown CA", "... certificate expired", "... wrong host: the certificate is not for
 * NAME", "no client certificate: the server requires one", "the peer does not speak TLS
 * (a plaintext server?)", and on the server's log "plaintext peer".
 *
 * Threads: a TLS connection may be read by one thread while another writes it. The
 * library serializes the two inside (an OpenSSL SSL object is not thread-safe) with a
 * lock that is never held while waiting for the network: the socket is non-blocking
 * and every wait is a poll() with its own deadline, so pconn_conn_close() interrupts it.
 */
#ifndef PCONN_TLS_H
#define PCONN_TLS_H

#include "pconn.h"
#include "pconn_tcp.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Protocol versions for min_version (the values are TLS's own). */
#define PCONN_TLS_1_2 0x0303
#define PCONN_TLS_1_3 0x0304

typedef struct pconn_tls_options_t {
    const char *ca_file, *ca_path;     /* NULL both: the system store (a client); a server
                                          with either one requires client certificates */
    const char *cert_file, *key_file;  /* client certificate (mutual TLS) or server's own
                                          (PEM; cert_file may hold the chain) */
    const char *server_name;           /* SNI + verification; NULL: the address's host */
    int insecure_skip_verify;          /* 1: verify nothing (tests only); 0 by default */
    int min_version;                   /* 0: TLS 1.2; PCONN_TLS_1_2 or PCONN_TLS_1_3 */
    int no_session_resumption;         /* client: 1 makes every reconnect a full
                                          handshake; 0 resumes the last session of the
                                          same pconn (TLS 1.3 tickets, TLS 1.2 IDs)
                                          when it goes to the same host name or IP: a
                                          resumed session is not verified again */
} pconn_tls_options_t;

/* Shared, reference-counted; immutable once made, so any thread may use it. */
typedef struct pconn_tls_config_t pconn_tls_config_t;

/* Builds a configuration for clients (server 0) or servers (server 1): loads and checks
 * the files now, so a bad path or a key that does not match its certificate fails here,
 * not at the first connection. A server needs cert_file and key_file. Strings are
 * copied. PCONN_OK with *out set (one reference, the caller's); PCONN_EINVAL with err
 * (may be NULL) naming the option and the reason (unreadable file, key mismatch, bad
 * min_version); PCONN_ENOMEM. Any thread. */
int pconn_tls_config_new(const pconn_tls_options_t *o, int server, pconn_tls_config_t **out,
                         pconn_error_t *err);

/* Takes another reference. Every user of a configuration (a pconn, a server, a
 * resolver) takes its own, so the caller may drop its own at once. NULL is ignored. */
void pconn_tls_config_ref(pconn_tls_config_t *cfg);

/* Drops a reference; the last one frees the configuration. NULL is ignored. */
void pconn_tls_config_unref(pconn_tls_config_t *cfg);

/* A persistent TLS connection: pconn_tcp_create() whose attempts also run the TLS
 * handshake, within tcp->connect_timeout_ms (the TCP connect and the handshake together)
 * and interrupted by pconn_close() within milliseconds. A handshake that fails is a
 * FAILED_TO_CONNECT event (PCONN_EHANDSHAKE) whose message names the address and the
 * reason. When the server asks for a client certificate and cfg has none, the attempt
 * waits up to 500 ms (within the connect timeout) for the server's verdict, so a server
 * that requires one fails the attempt rather than the first read. A reconnect to the
 * same host name or IP resumes the pconn's last TLS session with it, unless cfg says
 * no_session_resumption. The connections
 * read and write through TLS with pconn_tcp_recv() and pconn_tcp_send_all(); their
 * socket is not handed out (pconn_tcp_fd() is -1) and tcp->on_connect must be NULL (it
 * works on a plaintext socket). cfg must be a client configuration; the pconn takes its
 * own reference. Ownership and results as pconn_tcp_create(), with PCONN_EINVAL for a
 * NULL or server cfg or an on_connect hook (the resolver is freed then too). */
int pconn_tls_create(const pconn_options_t *opts, const pconn_tcp_options_t *tcp,
                     pconn_tls_config_t *cfg, pconn_t **out);

/* True when conn is a TLS connection (made by pconn_tls_create()). */
bool pconn_tls_is_tls(const pconn_conn_t *conn);

/* The verified subject of the peer's certificate (one line, RFC 2253) on a TLS
 * connection or an RPC connection over TLS (the `tls` option), or NULL (no TLS,
 * verification off, or a client without a certificate). Valid while the caller holds
 * a reference. */
const char *pconn_tls_peer_subject(const pconn_conn_t *conn);

/* True when the TLS session of such a connection was resumed (an abbreviated
 * handshake); false for a full handshake or no TLS. */
bool pconn_tls_resumed(const pconn_conn_t *conn);

#ifdef __cplusplus
}
#endif
#endif /* PCONN_TLS_H */
