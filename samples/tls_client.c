/* tls_client.c - line_client.c over TLS: a blocking client that keeps a verified,
 * encrypted connection across server restarts. Copy it: it is the whole pattern.
 *
 *   tls_client CA_FILE ADDRESS [ADDRESS...]  < requests
 *   tls_client CA_FILE CERT_FILE KEY_FILE ADDRESS [ADDRESS...]  < requests  (mutual TLS)
 *
 * Sends each line of stdin and prints the one-line answer; events (including a failed
 * verification, in words) go to stderr. Try it against `openssl s_server -rev` (an
 * echo that reverses each line), killing and restarting the server meanwhile. As in
 * line_client, a request whose connection dies is sent again on the next one.
 */
#include "pconn.h"
#include "pconn_tcp.h"
#include "pconn_tls.h"

#include <stdio.h>
#include <string.h>

/* One line from the connection (TLS or not). 0, or -1 when it broke. */
static int read_line(pconn_conn_t *c, char *line, size_t size)
{
    size_t len = 0;
    while (len + 1 < size) {
        if (pconn_tcp_recv(c, line + len, 1, 30000, NULL) != 1)
            return -1;
        if (line[len] == '\n')
            break;
        len++;
    }
    line[len] = '\0';
    return 0;
}

static int request(pconn_t *pc, const char *req, size_t len, char *reply, size_t size)
{
    for (;;) {
        pconn_conn_t *c = NULL;
        int rc = pconn_connected(pc, 30000, &c);
        if (rc != PCONN_OK) {
            fprintf(stderr, "tls_client: no connection: %s\n", pconn_strerror(rc));
            return -1;
        }
        rc = pconn_tcp_send_all(c, req, len, NULL);
        if (rc == PCONN_OK && read_line(c, reply, size) == 0) {
            pconn_conn_unref(c);
            return 0;
        }
        pconn_conn_close(c); /* it died under us: the library reconnects */
        pconn_conn_unref(c);
    }
}

int main(int argc, char **argv)
{
    int mutual = argc >= 5 && strchr(argv[2], ':') == NULL;
    int first = mutual ? 4 : 2;
    if (argc <= first) {
        fprintf(stderr, "usage: %s CA_FILE [CERT_FILE KEY_FILE] ADDRESS [ADDRESS...] < requests\n", argv[0]);
        return 2;
    }
    pconn_tls_options_t to = {.ca_file = argv[1]};
    if (mutual) {
        to.cert_file = argv[2];
        to.key_file = argv[3];
    }
    pconn_tls_config_t *tls = NULL;
    pconn_error_t err;
    if (pconn_tls_config_new(&to, 0, &tls, &err) != PCONN_OK) {
        fprintf(stderr, "%s: %s\n", argv[0], err.message);
        return 2;
    }
    pconn_backoff_t backoff = {.initial_ms = 200, .max_ms = 5000, .multiplier = 2.0};
    pconn_options_t o = {
        .server_name = "tls_client",
        .resolver = pconn_resolver_static((const char *const *)argv + first, (size_t)(argc - first)),
        .on_event = pconn_log_stderr,
        .retry_delay = pconn_retry_exponential,
        .retry_delay_arg = &backoff,
    };
    pconn_t *pc = NULL;
    int rc = pconn_tls_create(&o, NULL, tls, &pc);
    pconn_tls_config_unref(tls); /* the pconn holds its own reference */
    if (rc != PCONN_OK) {
        fprintf(stderr, "%s: bad address list\n", argv[0]);
        return 2;
    }
    char req[4096], reply[4096];
    int status = 0;
    while (fgets(req, sizeof req, stdin) != NULL) {
        if (request(pc, req, strlen(req), reply, sizeof reply) != 0) {
            status = 1;
            break;
        }
        printf("%s\n", reply);
        fflush(stdout);
    }
    pconn_free(pc);
    return status;
}
