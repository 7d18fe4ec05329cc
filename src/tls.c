/* tls.c - TLS over OpenSSL 3: the shared configuration; a session on a non-blocking
 * socket whose SSL object is guarded by a lock never held while waiting (so one thread
 * may read while another writes); failures in words; the peer's verified identity;
 * session resumption per pconn; the RPC transport and the persistent TLS connection
 * built on it. */
#include "rpc/rpc.h"
#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define DEFAULT_CONNECT_TIMEOUT_MS 10000
/* How long a client the server asked for a certificate it does not have waits for the
 * server's verdict before counting as connected. */
#define VERDICT_WAIT_MS 500

struct pconn_tls_config_t {
    atomic_int refs;
    SSL_CTX *ctx;
    bool server;
    pconn_tls_options_t o; /* strings are copies */
};

/* ---- a socket BIO that never raises SIGPIPE ------------------------------------- */

/* OpenSSL's socket BIO writes with write(2): on a socket the peer closed, that raises
 * SIGPIPE in the calling thread, which may be the program's. This one is the socket BIO
 * with send(MSG_NOSIGNAL) for writing. Made once; OpenSSL never frees it. */
static BIO_METHOD *nosig_method;
static pthread_once_t nosig_once = PTHREAD_ONCE_INIT;

static int nosig_write(BIO *b, const char *buf, int len)
{
    int fd = (int)BIO_get_fd(b, NULL);
    BIO_clear_retry_flags(b);
    ssize_t n = send(fd, buf, (size_t)len, MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        BIO_set_retry_write(b);
    return (int)n;
}

static void nosig_init(void)
{
    const BIO_METHOD *s = BIO_s_socket();
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR,
                                 "pconn socket");
    if (m == NULL)
        return;
    BIO_meth_set_write(m, nosig_write);
    BIO_meth_set_read(m, BIO_meth_get_read(s));
    BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(s));
    BIO_meth_set_create(m, BIO_meth_get_create(s));
    BIO_meth_set_destroy(m, BIO_meth_get_destroy(s));
    nosig_method = m;
}

/* ---- configuration ------------------------------------------------------------- */

static void ssl_reason(char *buf, size_t size)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e != 0 ? ERR_reason_error_string(e) : NULL;
    snprintf(buf, size, "%s", r != NULL ? r : "unknown OpenSSL error");
    ERR_clear_error();
}

static int readable(const char *what, const char *path, pconn_error_t *err)
{
    if (path == NULL || access(path, R_OK) == 0)
        return PCONN_OK;
    pconn_error_set(err, PCONN_EINVAL, errno, "tls: %s %s: %s", what, path, strerror(errno));
    return PCONN_EINVAL;
}

static void options_free(pconn_tls_options_t *o)
{
    free((char *)o->ca_file);
    free((char *)o->ca_path);
    free((char *)o->cert_file);
    free((char *)o->key_file);
    free((char *)o->server_name);
}

static bool copy_str(const char **dst, const char *src)
{
    *dst = NULL;
    return src == NULL || (*dst = strdup(src)) != NULL;
}

static int new_session_cb(SSL *ssl, SSL_SESSION *sess);
static int client_cert_cb(SSL *ssl, X509 **x509, EVP_PKEY **pkey);

/* The files into ctx, each checked. */
static int load_files(SSL_CTX *ctx, const pconn_tls_options_t *o, bool server, pconn_error_t *err)
{
    char why[160];
    if (readable("ca_file", o->ca_file, err) || readable("ca_path", o->ca_path, err) ||
        readable("cert_file", o->cert_file, err) || readable("key_file", o->key_file, err))
        return PCONN_EINVAL;
    if (o->ca_file != NULL || o->ca_path != NULL) {
        if (SSL_CTX_load_verify_locations(ctx, o->ca_file, o->ca_path) != 1) {
            ssl_reason(why, sizeof why);
            pconn_error_set(err, PCONN_EINVAL, 0, "tls: ca_file %s / ca_path %s: %s",
                            o->ca_file ? o->ca_file : "-", o->ca_path ? o->ca_path : "-", why);
            return PCONN_EINVAL;
        }
        if (server && o->ca_file != NULL) {
            STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(o->ca_file);
            if (names != NULL)
                SSL_CTX_set_client_CA_list(ctx, names); /* told to clients: whom we trust */
        }
    } else if (!server && SSL_CTX_set_default_verify_paths(ctx) != 1) {
        ssl_reason(why, sizeof why);
        pconn_error_set(err, PCONN_EINVAL, 0, "tls: the system's CA store: %s", why);
        return PCONN_EINVAL;
    }
    if (o->cert_file != NULL) {
        const char *key = o->key_file != NULL ? o->key_file : o->cert_file;
        if (SSL_CTX_use_certificate_chain_file(ctx, o->cert_file) != 1) {
            ssl_reason(why, sizeof why);
            pconn_error_set(err, PCONN_EINVAL, 0, "tls: cert_file %s: %s", o->cert_file, why);
            return PCONN_EINVAL;
        }
        if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
            if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH) {
                ERR_clear_error();
                pconn_error_set(err, PCONN_EINVAL, 0, "tls: key_file %s does not match cert_file %s",
                                key, o->cert_file);
                return PCONN_EINVAL;
            }
            ssl_reason(why, sizeof why);
            pconn_error_set(err, PCONN_EINVAL, 0, "tls: key_file %s: %s", key, why);
            return PCONN_EINVAL;
        }
        if (SSL_CTX_check_private_key(ctx) != 1) {
            ERR_clear_error();
            pconn_error_set(err, PCONN_EINVAL, 0, "tls: key_file %s does not match cert_file %s",
                            key, o->cert_file);
            return PCONN_EINVAL;
        }
    } else if (o->key_file != NULL) {
        pconn_error_set(err, PCONN_EINVAL, 0, "tls: key_file %s without cert_file", o->key_file);
        return PCONN_EINVAL;
    }
    return PCONN_OK;
}

int pconn_tls_config_new(const pconn_tls_options_t *o, int server, pconn_tls_config_t **out,
                         pconn_error_t *err)
{
    pconn_error_t local;
    if (err == NULL)
        err = &local;
    if (out == NULL || o == NULL) {
        pconn_error_set(err, PCONN_EINVAL, 0, "pconn_tls_config_new: %s is NULL", o == NULL ? "o" : "out");
        return PCONN_EINVAL;
    }
    *out = NULL;
    int min = o->min_version == 0 ? PCONN_TLS_1_2 : o->min_version;
    if (min != PCONN_TLS_1_2 && min != PCONN_TLS_1_3) {
        pconn_error_set(err, PCONN_EINVAL, 0,
                        "tls: min_version 0x%x: use PCONN_TLS_1_2 (0x0303) or PCONN_TLS_1_3 (0x0304)",
                        (unsigned)o->min_version);
        return PCONN_EINVAL;
    }
    if (server && (o->cert_file == NULL || o->key_file == NULL)) {
        pconn_error_set(err, PCONN_EINVAL, 0, "tls: a server needs cert_file and key_file");
        return PCONN_EINVAL;
    }
    if (server && o->insecure_skip_verify) {
        pconn_error_set(err, PCONN_EINVAL, 0,
                        "tls: insecure_skip_verify is for clients (a server verifies clients only with ca_file/ca_path)");
        return PCONN_EINVAL;
    }
    pthread_once(&nosig_once, nosig_init);
    pconn_tls_config_t *cfg = calloc(1, sizeof *cfg);
    if (cfg == NULL || nosig_method == NULL)
        goto nomem;
    cfg->server = server != 0;
    cfg->o = *o;
    cfg->o.min_version = min;
    if (!copy_str(&cfg->o.ca_file, o->ca_file) || !copy_str(&cfg->o.ca_path, o->ca_path) ||
        !copy_str(&cfg->o.cert_file, o->cert_file) || !copy_str(&cfg->o.key_file, o->key_file) ||
        !copy_str(&cfg->o.server_name, o->server_name))
        goto nomem;
    cfg->ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (cfg->ctx == NULL)
        goto nomem;
    SSL_CTX *ctx = cfg->ctx;
    SSL_CTX_set_min_proto_version(ctx, min);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    /* Non-blocking writes that may be retried from another buffer holding the same
     * bytes, and that report what went out record by record. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* One recv() for as many records as have arrived, not two per record. Bytes read
     * ahead are invisible to poll(): every wait asks SSL_has_pending() first. */
    SSL_CTX_set_read_ahead(ctx, 1);
    if (load_files(ctx, &cfg->o, cfg->server, err) != PCONN_OK)
        goto fail;
    if (server) {
        if (o->ca_file != NULL || o->ca_path != NULL)
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
        SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"pconn", 5);
        SSL_CTX_set_num_tickets(ctx, 1);
    } else {
        SSL_CTX_set_verify(ctx, o->insecure_skip_verify ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, NULL);
        SSL_CTX_set_client_cert_cb(ctx, client_cert_cb); /* called only without a certificate */
        if (!o->no_session_resumption) {
            SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
            SSL_CTX_sess_set_new_cb(ctx, new_session_cb);
        }
        if (o->insecure_skip_verify)
            fprintf(stderr, "libpconn: WARNING: TLS certificate verification is OFF "
                            "(insecure_skip_verify): any server can pose as the one you want\n");
    }
    atomic_init(&cfg->refs, 1);
    *out = cfg;
    return PCONN_OK;
nomem:
    pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "pconn_tls_config_new");
fail:
    if (cfg != NULL) {
        SSL_CTX_free(cfg->ctx);
        options_free(&cfg->o);
        free(cfg);
    }
    return err->code;
}

void pconn_tls_config_ref(pconn_tls_config_t *cfg)
{
    if (cfg != NULL)
        atomic_fetch_add(&cfg->refs, 1);
}

void pconn_tls_config_unref(pconn_tls_config_t *cfg)
{
    if (cfg == NULL || atomic_fetch_sub(&cfg->refs, 1) != 1)
        return;
    SSL_CTX_free(cfg->ctx);
    options_free(&cfg->o);
    free(cfg);
}

const pconn_tls_options_t *pconn__tls_config_options(const pconn_tls_config_t *cfg)
{
    return &cfg->o;
}

bool pconn__tls_config_is_server(const pconn_tls_config_t *cfg)
{
    return cfg->server;
}

/* ---- sessions ------------------------------------------------------------------ */

/* Where a client's pconn keeps the session its next connection resumes. */
typedef struct resume_slot_t {
    pthread_mutex_t lock;
    SSL_SESSION *last;
    char name[256]; /* the host name or IP address last was verified for */
} resume_slot_t;

/* A client's or server's TLS: the configuration, the transport over it and a client's
 * resumption slot. Each session holds a reference, so a connection that outlives its
 * pconn or server can still store a ticket. */
struct pconn__tls_endpoint_t {
    atomic_int refs;
    pconn_transport_t transport; /* arg: this endpoint */
    pconn_tls_config_t *cfg;
    resume_slot_t slot;
};

typedef struct tls_sess_t {
    pthread_mutex_t lock; /* guards ssl and the fields below; never held while waiting */
    SSL *ssl;
    int fd;
    bool server, done, cert_asked_none, got_ticket;
    bool starved;         /* the last read wanted the socket: what is buffered is not a
                             whole record, so only poll() can tell when to read again */
    short want[2];        /* poll() events after EAGAIN: [0] reading/handshake, [1] writing */
    pconn__tls_endpoint_t *ep; /* a reference */
    resume_slot_t *slot;  /* a resuming client's (in ep), or NULL */
    char address[256];
    char name[256];       /* a client's: the host name or IP address verified */
    char why[512];        /* the last failure in words, or "" */
    char *subject;        /* the verified peer's, or NULL */
    char **sans;
} tls_sess_t;

/* A new TLS 1.3 ticket or TLS 1.2 session: the next connection of the same pconn
 * resumes it. Runs inside SSL_read()/SSL_do_handshake(), under the session's lock. */
static int new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
    tls_sess_t *t = SSL_get_app_data(ssl);
    if (t == NULL || t->slot == NULL)
        return 0;
    t->got_ticket = true;
    /* A copy: OpenSSL marks the connection's own session not resumable when the
     * connection ends without close_notify (a reset, a dead peer, our shutdown(2)),
     * which is how most persistent connections end; the ticket is good regardless. */
    SSL_SESSION *copy = SSL_SESSION_dup(sess);
    if (copy == NULL)
        return 0;
    pconn__mutex_lock(&t->slot->lock);
    SSL_SESSION_free(t->slot->last);
    t->slot->last = copy;
    pconn__strcpy(t->slot->name, sizeof t->slot->name, t->name);
    pconn__mutex_unlock(&t->slot->lock);
    return 0; /* not kept: the copy is */
}

static int client_cert_cb(SSL *ssl, X509 **x509, EVP_PKEY **pkey)
{
    (void)x509;
    (void)pkey;
    tls_sess_t *t = SSL_get_app_data(ssl);
    if (t != NULL)
        t->cert_asked_none = true;
    return 0; /* none to give */
}

static bool is_ip(const char *s)
{
    unsigned char b[16];
    return inet_pton(AF_INET, s, b) == 1 || inet_pton(AF_INET6, s, b) == 1;
}

static void sess_free(tls_sess_t *t)
{
    if (t == NULL)
        return;
    SSL_free(t->ssl);
    pconn__tls_endpoint_free(t->ep);
    free(t->subject);
    if (t->sans != NULL)
        for (char **p = t->sans; *p != NULL; p++)
            free(*p);
    free(t->sans);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

/* A session on the connected, non-blocking fd; no I/O yet. */
static tls_sess_t *sess_open(pconn__tls_endpoint_t *ep, int fd, const char *address, pconn_error_t *err)
{
    pconn_tls_config_t *cfg = ep->cfg;
    resume_slot_t *slot = cfg->server || cfg->o.no_session_resumption ? NULL : &ep->slot;
    tls_sess_t *t = calloc(1, sizeof *t);
    if (t == NULL || (t->ssl = SSL_new(cfg->ctx)) == NULL) {
        free(t);
        ERR_clear_error();
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "tls %s", address);
        return NULL;
    }
    pthread_mutex_init(&t->lock, NULL);
    atomic_fetch_add(&ep->refs, 1);
    t->ep = ep;
    t->fd = fd;
    t->server = cfg->server;
    t->slot = slot;
    t->want[0] = POLLIN;
    t->want[1] = POLLOUT;
    pconn__strcpy(t->address, sizeof t->address, address);
    SSL_set_app_data(t->ssl, t);
    BIO *b = BIO_new(nosig_method);
    if (b == NULL) {
        sess_free(t);
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "tls %s", address);
        return NULL;
    }
    BIO_set_fd(b, fd, BIO_NOCLOSE);
    SSL_set_bio(t->ssl, b, b);
    if (t->server) {
        SSL_set_accept_state(t->ssl);
        return t;
    }
    pconn__addr_t a;
    const char *name = cfg->o.server_name;
    if (name == NULL) {
        if (pconn__address_parse(address, false, &a, err) != PCONN_OK) {
            sess_free(t);
            return NULL;
        }
        if (a.is_unix && !cfg->o.insecure_skip_verify) {
            sess_free(t);
            pconn_error_set(err, PCONN_EINVAL, 0, "tls %s: a Unix socket has no host name: set server_name",
                            address);
            return NULL;
        }
        name = a.host;
    }
    pconn__strcpy(t->name, sizeof t->name, name);
    if (is_ip(name)) {
        if (!cfg->o.insecure_skip_verify)
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), name);
    } else {
        SSL_set_tlsext_host_name(t->ssl, name);
        if (!cfg->o.insecure_skip_verify)
            SSL_set1_host(t->ssl, name);
    }
    /* A resumed session is not verified again: only one made for this same name. */
    if (slot != NULL) {
        pconn__mutex_lock(&slot->lock);
        if (slot->last != NULL && strcmp(slot->name, t->name) == 0)
            SSL_set_session(t->ssl, slot->last);
        pconn__mutex_unlock(&slot->lock);
    }
    SSL_set_connect_state(t->ssl);
    return t;
}

/* The verified peer's subject and names, once the handshake is done. */
static void fill_identity(tls_sess_t *t)
{
    X509 *cert = SSL_get0_peer_certificate(t->ssl);
    if (cert == NULL || SSL_get_verify_result(t->ssl) != X509_V_OK ||
        SSL_get_verify_mode(t->ssl) == SSL_VERIFY_NONE)
        return;
    BIO *mem = BIO_new(BIO_s_mem());
    if (mem != NULL && X509_NAME_print_ex(mem, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) >= 0) {
        char *p;
        long n = BIO_get_mem_data(mem, &p);
        if (n >= 0 && (t->subject = malloc((size_t)n + 1)) != NULL) {
            memcpy(t->subject, p, (size_t)n);
            t->subject[n] = '\0';
        }
    }
    BIO_free(mem);
    GENERAL_NAMES *gens = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    int n = gens != NULL ? sk_GENERAL_NAME_num(gens) : 0;
    if (gens != NULL && (t->sans = calloc((size_t)n + 1, sizeof *t->sans)) != NULL) {
        int k = 0;
        for (int i = 0; i < n; i++) {
            const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
            char buf[300];
            buf[0] = '\0';
            if (g->type == GEN_DNS || g->type == GEN_URI || g->type == GEN_EMAIL) {
                const ASN1_IA5STRING *s = g->d.ia5;
                snprintf(buf, sizeof buf, "%s:%.*s",
                         g->type == GEN_DNS ? "DNS" : g->type == GEN_URI ? "URI" : "email",
                         ASN1_STRING_length(s), (const char *)ASN1_STRING_get0_data(s));
            } else if (g->type == GEN_IPADD) {
                const ASN1_OCTET_STRING *s = g->d.ip;
                char ip[INET6_ADDRSTRLEN] = "";
                int len = ASN1_STRING_length(s);
                if ((len == 4 || len == 16) &&
                    inet_ntop(len == 4 ? AF_INET : AF_INET6, ASN1_STRING_get0_data(s), ip, sizeof ip) != NULL)
                    snprintf(buf, sizeof buf, "IP:%s", ip);
            }
            if (buf[0] != '\0' && (t->sans[k] = strdup(buf)) != NULL)
                k++;
        }
    }
    GENERAL_NAMES_free(gens);
}

/* Fills t->why from a failed SSL call (e: SSL_get_error()). */
static void describe(tls_sess_t *t, int e, int sys_errno)
{
    unsigned long code = ERR_peek_last_error();
    int reason = ERR_GET_REASON(code);
    long vr = SSL_get_verify_result(t->ssl);
    const char *who = t->server ? "client certificate" : "certificate";
    char *w = t->why;
    size_t ws = sizeof t->why;
    if (e == SSL_ERROR_SSL && reason == SSL_R_CERTIFICATE_VERIFY_FAILED && vr != X509_V_OK) {
        const char *words = X509_verify_cert_error_string(vr);
        switch (vr) {
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
        case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
        case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
        case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
            snprintf(w, ws, "%s verify failed: unknown CA (%s)", who, words);
            break;
        case X509_V_ERR_CERT_HAS_EXPIRED:
            snprintf(w, ws, "%s verify failed: certificate expired", who);
            break;
        case X509_V_ERR_CERT_NOT_YET_VALID:
            snprintf(w, ws, "%s verify failed: certificate not yet valid", who);
            break;
        case X509_V_ERR_HOSTNAME_MISMATCH:
        case X509_V_ERR_IP_ADDRESS_MISMATCH:
            snprintf(w, ws, "certificate verify failed: wrong host: the certificate is not for %s", t->name);
            break;
        default:
            snprintf(w, ws, "%s verify failed: %s", who, words);
        }
    } else if (e == SSL_ERROR_SSL && (reason == SSL_R_WRONG_VERSION_NUMBER ||
                                      reason == SSL_R_PACKET_LENGTH_TOO_LONG ||
                                      reason == SSL_R_HTTP_REQUEST || reason == SSL_R_HTTPS_PROXY_REQUEST)) {
        if (t->done) /* after a good handshake: not a plaintext peer, a broken stream */
            snprintf(w, ws, "the peer sent bytes that are not TLS records (%s)",
                     ERR_reason_error_string(code) ? ERR_reason_error_string(code) : "bad record");
        else
            snprintf(w, ws, t->server ? "plaintext peer: it does not speak TLS"
                                      : "the peer does not speak TLS (a plaintext server?)");
    } else if ((e == SSL_ERROR_SSL && reason == SSL_R_UNEXPECTED_EOF_WHILE_READING) ||
               e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && sys_errno == 0)) {
        snprintf(w, ws, t->server ? "the peer closed the connection during the TLS handshake"
                                  : "the peer closed the connection during the TLS handshake "
                                    "(a plaintext server?)");
    } else if (e == SSL_ERROR_SSL && reason == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) {
        snprintf(w, ws, "no client certificate (this server requires one)");
    } else if (e == SSL_ERROR_SSL && (reason == SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED ||
                                      (t->cert_asked_none && reason == SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE))) {
        snprintf(w, ws, "no client certificate: the server requires one (set cert_file and key_file)");
    } else if (e == SSL_ERROR_SSL && reason == SSL_R_TLSV1_ALERT_UNKNOWN_CA) {
        snprintf(w, ws, "the peer rejected our certificate: unknown CA");
    } else if (e == SSL_ERROR_SSL && reason == SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED) {
        snprintf(w, ws, "the peer rejected our certificate: expired");
    } else if (e == SSL_ERROR_SSL && (reason == SSL_R_UNSUPPORTED_PROTOCOL ||
                                      reason == SSL_R_TLSV1_ALERT_PROTOCOL_VERSION)) {
        snprintf(w, ws, "no TLS version both sides accept");
    } else if (e == SSL_ERROR_SYSCALL) {
        snprintf(w, ws, "%s", strerror(sys_errno));
    } else {
        const char *r = code != 0 ? ERR_reason_error_string(code) : NULL;
        snprintf(w, ws, "TLS: %s", r != NULL ? r : "unknown error");
    }
    ERR_clear_error();
}

/* The outcome of an SSL call that returned r <= 0, under t->lock: -1 with errno EAGAIN
 * (and t->want[dir] set), 0 for an end of stream when eof_ok, or -1 with errno and
 * t->why. */
static int failed_call(tls_sess_t *t, int r, int dir, bool eof_ok)
{
    int sys_errno = errno;
    int e = SSL_get_error(t->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        t->want[dir] = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
        if (dir == 0)
            t->starved = true;
        ERR_clear_error();
        errno = EAGAIN;
        return -1;
    }
    if (eof_ok && (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && sys_errno == 0) ||
                   (e == SSL_ERROR_SSL &&
                    ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING))) {
        ERR_clear_error();
        return 0; /* a TLS stream ended with or without close_notify: the peer is gone */
    }
    describe(t, e, sys_errno);
    errno = e == SSL_ERROR_SYSCALL && sys_errno != 0 ? sys_errno : EPROTO;
    return -1;
}

/* One step of the handshake: 0 done, -1/EAGAIN call again when t->want[0], -1 failed. */
static int sess_handshake(tls_sess_t *t)
{
    pconn__mutex_lock(&t->lock);
    ERR_clear_error();
    errno = 0;
    int r = SSL_do_handshake(t->ssl), rc = 0;
    t->starved = false;
    if (r == 1) {
        t->done = true;
        fill_identity(t);
    } else {
        rc = failed_call(t, r, 0, false);
    }
    pconn__mutex_unlock(&t->lock);
    return rc;
}

static ssize_t sess_read(tls_sess_t *t, void *buf, size_t len)
{
    pconn__mutex_lock(&t->lock);
    ERR_clear_error();
    errno = 0;
    int r = SSL_read(t->ssl, buf, len > INT_MAX ? INT_MAX : (int)len);
    t->starved = false;
    ssize_t rc = r > 0 ? r : failed_call(t, r, 0, true);
    pconn__mutex_unlock(&t->lock);
    return rc;
}

static ssize_t sess_write(tls_sess_t *t, const void *buf, size_t len)
{
    pconn__mutex_lock(&t->lock);
    ERR_clear_error();
    errno = 0;
    int r = SSL_write(t->ssl, buf, len > INT_MAX ? INT_MAX : (int)len);
    ssize_t rc = r > 0 ? r : failed_call(t, r, 1, false);
    pconn__mutex_unlock(&t->lock);
    return rc;
}

/* Sends close_notify if it fits in the socket now (never waits). */
static void sess_close_notify(tls_sess_t *t)
{
    pconn__mutex_lock(&t->lock);
    if (t->done && t->why[0] == '\0' && !(SSL_get_shutdown(t->ssl) & SSL_SENT_SHUTDOWN))
        (void)SSL_shutdown(t->ssl);
    ERR_clear_error();
    pconn__mutex_unlock(&t->lock);
}

/* ---- the RPC transport ------------------------------------------------------------ */

static void *tr_open(void *arg, int fd, const char *address, int server, pconn_error_t *err)
{
    pconn__tls_endpoint_t *ep = arg;
    (void)server; /* the configuration says which side it is */
    return sess_open(ep, fd, address, err);
}

static int tr_handshake(void *session, pconn_error_t *err)
{
    tls_sess_t *t = session;
    int rc = sess_handshake(t);
    if (rc != 0 && errno != EAGAIN) {
        int e = errno;
        pconn_error_set(err, PCONN_EHANDSHAKE, 0, "%s", t->why);
        errno = e;
    }
    return rc;
}

static ssize_t tr_read(void *session, void *buf, size_t len)
{
    return sess_read(session, buf, len);
}

static ssize_t tr_write(void *session, const void *buf, size_t len)
{
    return sess_write(session, buf, len);
}

static size_t tr_pending(void *session)
{
    tls_sess_t *t = session;
    pconn__mutex_lock(&t->lock);
    int n = SSL_pending(t->ssl);
    if (n <= 0 && !t->starved && SSL_has_pending(t->ssl))
        n = 1; /* records read ahead, not yet decrypted */
    pconn__mutex_unlock(&t->lock);
    return n > 0 ? (size_t)n : 0;
}

static short tr_wants(void *session, int writing)
{
    tls_sess_t *t = session;
    pconn__mutex_lock(&t->lock);
    short ev = t->want[writing ? 1 : 0];
    pconn__mutex_unlock(&t->lock);
    return ev;
}

static void tr_identity(void *session, pconn_rpc_peer_t *peer)
{
    tls_sess_t *t = session;
    peer->subject = t->subject;
    peer->sans = (const char *const *)t->sans;
}

static void tr_close(void *session)
{
    sess_close_notify(session);
    sess_free(session);
}

pconn__tls_endpoint_t *pconn__tls_endpoint_new(pconn_tls_config_t *cfg, bool server, pconn_error_t *err)
{
    if (cfg->server != server) {
        pconn_error_set(err, PCONN_EINVAL, 0, "tls: a %s configuration where a %s's is needed",
                        cfg->server ? "server" : "client", server ? "server" : "client");
        return NULL;
    }
    pconn__tls_endpoint_t *ep = calloc(1, sizeof *ep);
    if (ep == NULL) {
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "tls");
        return NULL;
    }
    ep->transport = (pconn_transport_t){.open = tr_open, .handshake = tr_handshake, .read = tr_read,
                                        .write = tr_write, .pending = tr_pending, .wants = tr_wants,
                                        .identity = tr_identity, .close = tr_close, .arg = ep};
    pthread_mutex_init(&ep->slot.lock, NULL);
    atomic_init(&ep->refs, 1);
    pconn_tls_config_ref(cfg);
    ep->cfg = cfg;
    return ep;
}

void pconn__tls_endpoint_free(pconn__tls_endpoint_t *ep)
{
    if (ep == NULL || atomic_fetch_sub(&ep->refs, 1) != 1)
        return;
    SSL_SESSION_free(ep->slot.last);
    pthread_mutex_destroy(&ep->slot.lock);
    pconn_tls_config_unref(ep->cfg);
    free(ep);
}

const pconn_transport_t *pconn__tls_endpoint_transport(const pconn__tls_endpoint_t *ep)
{
    return &ep->transport;
}

const char *pconn__tls_why(const pconn_transport_t *t, void *session)
{
    if (t == NULL || t->open != tr_open || session == NULL)
        return NULL;
    tls_sess_t *s = session;
    pconn__mutex_lock(&s->lock);
    const char *why = s->why[0] != '\0' ? s->why : NULL; /* set once, by the failing call */
    pconn__mutex_unlock(&s->lock);
    return why;
}

/* ---- persistent TLS connections ---------------------------------------------------- */

typedef struct tls_conn_t {
    tls_sess_t *t;
    int fd;
    pthread_mutex_t rlock, wlock; /* one reader, one writer at a time */
} tls_conn_t;

static void tls_conn_close(void *impl)
{
    tls_conn_t *tc = impl;
    sess_close_notify(tc->t);
    shutdown(tc->fd, SHUT_RDWR);
}

static void tls_conn_destroy(void *impl)
{
    tls_conn_t *tc = impl;
    sess_free(tc->t);
    close(tc->fd);
    pthread_mutex_destroy(&tc->rlock);
    pthread_mutex_destroy(&tc->wlock);
    free(tc);
}

static int tls_conn_fd(void *impl)
{
    return ((tls_conn_t *)impl)->fd;
}

static const pconn_conn_ops_t tls_ops = {tls_conn_close, tls_conn_destroy, tls_conn_fd};

typedef struct tls_client_t {
    pconn_tcp_options_t tcp;
    pconn__tls_endpoint_t *ep;
} tls_client_t;

/* Waits until fd shows events (or an error: the next SSL call tells what happened),
 * the deadline passes or, when cancellable (a connect on a pconn's worker), the pconn
 * is closed. PCONN_OK, PCONN_ETIMEDOUT, PCONN_ECLOSED. Reads and writes are not
 * cancellable this way: pconn_conn_close() ends them (a worker of another, closing
 * pconn may well read a TLS connection). */
static int wait_fd(int fd, short events, int64_t deadline, bool cancellable)
{
    short revents;
    if (cancellable) {
        int rc = pconn__wait_cancellable(fd, events, deadline, &revents);
        return rc == PCONN_EIO ? PCONN_OK : rc;
    }
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = events};
        int rc = poll(&pfd, 1, pconn__poll_timeout_ms(deadline));
        if (rc == 0)
            return PCONN_ETIMEDOUT;
        if (rc > 0 || errno != EINTR)
            return PCONN_OK;
    }
}

static int handshake_fail(tls_sess_t *t, int rc, int64_t timeout_ms, pconn_error_t *err)
{
    if (rc == PCONN_ECLOSED)
        pconn_error_set(err, PCONN_ECLOSED, 0, "tls %s: handshake interrupted by close", t->address);
    else if (rc == PCONN_ETIMEDOUT)
        pconn_error_set(err, PCONN_ETIMEDOUT, 0, "tls %s: handshake timed out (connect timeout %lld ms)",
                        t->address, (long long)timeout_ms);
    else
        pconn_error_set(err, PCONN_EHANDSHAKE, 0, "tls %s: %s", t->address, t->why);
    return err->code;
}

/* The handshake before deadline; then, when the server asked for a certificate we do
 * not have, its verdict (a TLS 1.3 server gives it after the handshake). */
static int run_handshake(tls_sess_t *t, int64_t deadline, int64_t timeout_ms, pconn_error_t *err)
{
    for (;;) {
        if (sess_handshake(t) == 0)
            break;
        if (errno != EAGAIN)
            return handshake_fail(t, PCONN_EHANDSHAKE, timeout_ms, err);
        int rc = wait_fd(t->fd, t->want[0], deadline, true);
        if (rc != PCONN_OK)
            return handshake_fail(t, rc, timeout_ms, err);
    }
    if (!t->cert_asked_none || SSL_version(t->ssl) < TLS1_3_VERSION)
        return PCONN_OK;
    int64_t verdict = pconn__deadline_ns(VERDICT_WAIT_MS);
    if (verdict > deadline)
        verdict = deadline;
    for (;;) {
        char byte;
        pconn__mutex_lock(&t->lock);
        ERR_clear_error();
        errno = 0;
        int r = SSL_peek(t->ssl, &byte, 1);
        int frc = r > 0 ? 1 : failed_call(t, r, 0, true);
        bool ticket = t->got_ticket;
        pconn__mutex_unlock(&t->lock);
        if (frc > 0 || ticket)
            return PCONN_OK; /* data or a ticket: the server let us in */
        if (frc == 0) {
            snprintf(t->why, sizeof t->why, "the server closed the connection after the handshake "
                                            "(it asked for a client certificate and we have none)");
            return handshake_fail(t, PCONN_EHANDSHAKE, timeout_ms, err);
        }
        if (errno != EAGAIN)
            return handshake_fail(t, PCONN_EHANDSHAKE, timeout_ms, err);
        int rc = wait_fd(t->fd, t->want[0], verdict, true);
        if (rc == PCONN_ETIMEDOUT)
            return PCONN_OK; /* no word: it lets us in, or will say so at the first read */
        if (rc != PCONN_OK)
            return handshake_fail(t, rc, timeout_ms, err);
    }
}

static int tls_connect(void *arg, const char *address, pconn_conn_t **conn, pconn_error_t *err)
{
    tls_client_t *cl = arg;
    int64_t timeout_ms = cl->tcp.connect_timeout_ms > 0 ? cl->tcp.connect_timeout_ms : DEFAULT_CONNECT_TIMEOUT_MS;
    int64_t deadline = pconn__deadline_ns(timeout_ms);
    int fd = pconn__tcp_connect_fd(&cl->tcp, address, err);
    if (fd < 0)
        return err->code;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
        pconn_error_set(err, PCONN_ECONNECT, errno, "tls %s: fcntl", address);
        close(fd);
        return PCONN_ECONNECT;
    }
    pconn__tls_endpoint_t *ep = cl->ep;
    tls_sess_t *t = sess_open(ep, fd, address, err);
    if (t == NULL) {
        close(fd);
        return err->code;
    }
    int rc = run_handshake(t, deadline, timeout_ms, err);
    tls_conn_t *tc = rc == PCONN_OK ? calloc(1, sizeof *tc) : NULL;
    pconn_conn_t *c = tc != NULL ? pconn_conn_new(&tls_ops, tc) : NULL;
    if (c == NULL) {
        if (rc == PCONN_OK) {
            pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "tls %s", address);
            rc = PCONN_ENOMEM;
        }
        free(tc);
        sess_free(t);
        close(fd);
        return rc;
    }
    tc->t = t;
    tc->fd = fd;
    pthread_mutex_init(&tc->rlock, NULL);
    pthread_mutex_init(&tc->wlock, NULL);
    pconn__conn_set_address(c, address);
    *conn = c;
    return PCONN_OK;
}

static void tls_client_free(void *arg)
{
    tls_client_t *cl = arg;
    pconn__tls_endpoint_free(cl->ep);
    free((char *)cl->tcp.bind_address);
    free(cl);
}

int pconn_tls_create(const pconn_options_t *opts, const pconn_tcp_options_t *tcp,
                     pconn_tls_config_t *cfg, pconn_t **out)
{
    pconn_error_t err;
    tls_client_t *cl = NULL;
    int rc = PCONN_EINVAL;
    if (out != NULL)
        *out = NULL;
    if (opts == NULL || out == NULL || cfg == NULL || cfg->server || (tcp != NULL && tcp->on_connect != NULL))
        goto fail;
    if (pconn__resolver_check_addresses(opts->resolver, &err) != PCONN_OK)
        goto fail;
    rc = PCONN_ENOMEM;
    if ((cl = calloc(1, sizeof *cl)) == NULL)
        goto fail;
    if (tcp != NULL)
        cl->tcp = *tcp;
    cl->tcp.bind_address = NULL;
    if (tcp != NULL && tcp->bind_address != NULL && (cl->tcp.bind_address = strdup(tcp->bind_address)) == NULL)
        goto fail;
    if ((cl->ep = pconn__tls_endpoint_new(cfg, false, &err)) == NULL)
        goto fail;
    pconn_options_t base = *opts;
    base.connect = tls_connect;
    base.connect_arg = cl;
    return pconn__create(&base, tls_client_free, out);
fail:
    if (cl != NULL)
        tls_client_free(cl);
    if (opts != NULL)
        pconn_resolver_free(opts->resolver);
    return rc;
}

static tls_conn_t *tls_of(const pconn_conn_t *conn)
{
    return conn != NULL && pconn__conn_ops(conn) == &tls_ops ? pconn_conn_impl(conn) : NULL;
}

/* The TLS session of a TLS connection or of an RPC connection over the library's TLS. */
static tls_sess_t *session_of(const pconn_conn_t *conn)
{
    tls_conn_t *tc = tls_of(conn);
    if (tc != NULL)
        return tc->t;
    const pconn_transport_t *t;
    void *session;
    if (pconn__rpc_conn_transport(conn, &t, &session) && t != NULL && t->open == tr_open)
        return session;
    return NULL;
}

bool pconn_tls_is_tls(const pconn_conn_t *conn)
{
    return tls_of(conn) != NULL;
}

const char *pconn_tls_peer_subject(const pconn_conn_t *conn)
{
    tls_sess_t *t = session_of(conn);
    return t != NULL ? t->subject : NULL; /* written before the connection existed */
}

bool pconn_tls_resumed(const pconn_conn_t *conn)
{
    tls_sess_t *t = session_of(conn);
    if (t == NULL || pconn__conn_inherited(conn))
        return false; /* in a child of fork(), the lock may be held by a thread not there */
    pconn__mutex_lock(&t->lock);
    bool r = SSL_session_reused(t->ssl) == 1;
    pconn__mutex_unlock(&t->lock);
    return r;
}

static int io_error(const pconn_conn_t *conn, tls_conn_t *tc, const char *what, pconn_error_t *err)
{
    if (pconn_conn_is_closed(conn)) {
        pconn_error_set(err, PCONN_ECLOSED, 0, "%s %s: connection closed", what, tc->t->address);
        return PCONN_ECLOSED;
    }
    int e = errno;
    pconn__mutex_lock(&tc->t->lock);
    if (tc->t->why[0] != '\0')
        pconn_error_set(err, PCONN_EIO, e, "%s %s: %s", what, tc->t->address, tc->t->why);
    else
        pconn_error_set(err, PCONN_EIO, e, "%s %s: %s", what, tc->t->address, strerror(e));
    pconn__mutex_unlock(&tc->t->lock);
    return PCONN_EIO;
}

ssize_t pconn__tls_recv(const pconn_conn_t *conn, void *buf, size_t len, int64_t timeout_ms,
                        pconn_error_t *err)
{
    tls_conn_t *tc = tls_of(conn);
    int64_t deadline = pconn__deadline_ns(timeout_ms);
    if (!pconn__mutex_lock_until(&tc->rlock, deadline)) {
        pconn_error_set(err, PCONN_ETIMEDOUT, 0, "recv from %s: timed out after %lld ms", tc->t->address,
                        (long long)timeout_ms);
        return -1;
    }
    ssize_t n;
    for (;;) {
        if (pconn_conn_is_closed(conn)) {
            n = -1;
            io_error(conn, tc, "recv from", err);
            break;
        }
        n = sess_read(tc->t, buf, len);
        if (n > 0 || (n == 0 && !pconn_conn_is_closed(conn)))
            break;
        if (n < 0 && errno != EAGAIN) {
            io_error(conn, tc, "recv from", err);
            break;
        }
        if (n == 0)
            continue; /* closed by us: reported above */
        int rc = wait_fd(tc->fd, tc->t->want[0], deadline, false);
        if (rc == PCONN_ETIMEDOUT) {
            n = -1;
            pconn_error_set(err, PCONN_ETIMEDOUT, 0, "recv from %s: timed out after %lld ms", tc->t->address,
                            (long long)timeout_ms);
            break;
        }
    }
    pconn__mutex_unlock(&tc->rlock);
    return n;
}

int pconn__tls_send_all(const pconn_conn_t *conn, const void *buf, size_t len, pconn_error_t *err)
{
    tls_conn_t *tc = tls_of(conn);
    const char *p = buf;
    int rc = PCONN_OK;
    pconn__mutex_lock(&tc->wlock);
    while (len > 0) {
        if (pconn_conn_is_closed(conn)) {
            rc = io_error(conn, tc, "send to", err);
            break;
        }
        ssize_t n = sess_write(tc->t, p, len);
        if (n < 0 && errno == EAGAIN) {
            (void)wait_fd(tc->fd, tc->t->want[1], INT64_MAX, false);
            continue;
        }
        if (n <= 0) {
            rc = io_error(conn, tc, "send to", err);
            break;
        }
        p += n;
        len -= (size_t)n;
    }
    pconn__mutex_unlock(&tc->wlock);
    return rc;
}
