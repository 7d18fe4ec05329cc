/* line_client.c - a blocking line-protocol client that keeps its connection across
 * server restarts. Copy it: it is the whole pattern.
 *
 *   line_client ADDRESS [ADDRESS...]  < requests
 *
 * Sends each line of stdin to the service and prints the one-line answer. Events go to
 * stderr. A request whose connection dies is sent again on the next connection (at
 * least once), so the service must tolerate repeats: right for an echo or a read, wrong
 * for a request that changes something each time it runs (see samples/redis_counter.c).
 */
#include "pconn.h"
#include "pconn_tcp.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

/* Reads one line (up to size-1 bytes) from the connection. 0, or -1 when it broke. */
static int read_line(pconn_conn_t *c, char *line, size_t size)
{
    size_t len = 0;
    while (len + 1 < size) {
        ssize_t n = recv(pconn_tcp_fd(c), line + len, 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        if (line[len] == '\n')
            break;
        len++;
    }
    line[len] = '\0';
    return 0;
}

/* One request, answered at least once; 0, or -1 when no connection came in time. */
static int request(pconn_t *pc, const char *req, size_t len, char *reply, size_t size)
{
    for (;;) {
        pconn_conn_t *c = NULL;
        int rc = pconn_connected(pc, 30000, &c); /* blocks until connected */
        if (rc != PCONN_OK) {
            fprintf(stderr, "line_client: no connection: %s\n", pconn_strerror(rc));
            return -1;
        }
        rc = pconn_tcp_send_all(c, req, len, NULL);
        if (rc == PCONN_OK && read_line(c, reply, size) == 0) {
            pconn_conn_unref(c);
            return 0;
        }
        /* It died under us: tell the library, which reconnects; then try again. */
        pconn_conn_close(c);
        pconn_conn_unref(c);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s ADDRESS [ADDRESS...] < requests\n", argv[0]);
        return 2;
    }
    pconn_backoff_t backoff = {.initial_ms = 200, .max_ms = 5000, .multiplier = 2.0};
    pconn_options_t o = {
        .server_name = "line_client",
        .resolver = pconn_resolver_static((const char *const *)argv + 1, (size_t)argc - 1),
        .on_event = pconn_log_stderr,
        .retry_delay = pconn_retry_exponential,
        .retry_delay_arg = &backoff,
    };
    pconn_t *pc = NULL;
    if (pconn_tcp_create(&o, NULL, &pc) != PCONN_OK) {
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
