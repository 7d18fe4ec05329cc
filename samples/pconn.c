/* pconn.c - the `pconn` command-line tool.
 *
 *   pconn serve LISTEN [--name NAME] [--announce ETCD_URL KEY [--ttl S]]
 *       A line echo server ("NAME: line"), optionally published in etcd while it runs.
 *       Prints "listening on ADDRESS" once it accepts connections.
 *   pconn watch [--every MS] ADDRESS...
 *   pconn watch [--every MS] --file PATH | --dns HOST PORT
 *   pconn watch [--every MS] --catalog URL --format json|etcd|consul [--key KEY]
 *                                                           [--pick first|random|rr]
 *       Keeps a persistent TCP connection and prints its events until interrupted.
 *   pconn rpc-serve LISTEN [--name NAME]
 *       An RPC server with "echo" (1: the request back), "name" (1: NAME) and "sleep"
 *       (1: waits the request's decimal milliseconds, then echoes it).
 *   pconn port
 *       Prints a loopback TCP port that was free a moment ago (for scripts).
 */
#include "pconn.h"
#include "pconn_resolver.h"
#include "pconn_rpc.h"
#include "pconn_tcp.h"

#include <poll.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

static int usage(void)
{
    fprintf(stderr, "usage: pconn serve LISTEN [--name NAME] [--announce ETCD_URL KEY [--ttl S]]\n"
                    "       pconn watch [--every MS] ADDRESS... | --file PATH | --dns HOST PORT |\n"
                    "                   --catalog URL --format json|etcd|consul [--key KEY] [--pick first|random|rr]\n"
                    "       pconn rpc-serve LISTEN [--name NAME]\n"
                    "       pconn port\n");
    return 2;
}

/* ---- serve ----------------------------------------------------------------------- */

static int serve(int argc, char **argv)
{
    if (argc < 1)
        return usage();
    const char *listen_at = argv[0], *name = "pconn", *etcd = NULL, *key = NULL;
    int ttl = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--name") == 0 && i + 1 < argc)
            name = argv[++i];
        else if (strcmp(argv[i], "--announce") == 0 && i + 2 < argc) {
            etcd = argv[++i];
            key = argv[++i];
        } else if (strcmp(argv[i], "--ttl") == 0 && i + 1 < argc)
            ttl = atoi(argv[++i]);
        else
            return usage();
    }
    pconn_error_t err;
    int lfd = pconn_tcp_listen(listen_at, 0, &err);
    if (lfd < 0) {
        fprintf(stderr, "pconn serve: %s\n", err.message);
        return 1;
    }
    char address[PCONN_ADDRESS_MAX];
    pconn_tcp_local_address(lfd, address, sizeof address);
    /* SIGTERM and SIGINT end the server cleanly (the lease is revoked). Blocked before
     * the announcer's thread starts, so that no thread takes them with the default. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigprocmask(SIG_BLOCK, &stop, NULL);
    pconn_announcer_t *announcer = NULL;
    if (etcd != NULL) {
        pconn_announce_options_t ao = {.etcd_url = etcd, .key = key, .address = address, .ttl_s = ttl};
        if (pconn_announce_start(&ao, &announcer, &err) != PCONN_OK) {
            fprintf(stderr, "pconn serve: %s\n", err.message);
            return 1;
        }
    }
    int sfd = signalfd(-1, &stop, SFD_CLOEXEC);
    printf("listening on %s\n", address);
    fflush(stdout);

    /* One reply per line, however the lines arrive: split over reads or several in one.
     * A line longer than the buffer is answered in pieces. */
    static struct pollfd pfd[256];
    static struct {
        char buf[1024];
        size_t len;
    } in[256];
    pfd[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
    pfd[1] = (struct pollfd){.fd = sfd, .events = POLLIN};
    nfds_t n = 2;
    while (!(pfd[1].revents & POLLIN)) {
        if (poll(pfd, n, -1) < 0)
            continue;
        for (nfds_t i = n; i-- > 2;) {
            if (!pfd[i].revents)
                continue;
            ssize_t got = recv(pfd[i].fd, in[i].buf + in[i].len, sizeof in[i].buf - in[i].len, 0);
            if (got <= 0) {
                close(pfd[i].fd);
                pfd[i] = pfd[--n];
                in[i] = in[n];
                continue;
            }
            in[i].len += (size_t)got;
            char *start = in[i].buf, *end = in[i].buf + in[i].len, *nl;
            while ((nl = memchr(start, '\n', (size_t)(end - start))) != NULL ||
                   (start == in[i].buf && in[i].len == sizeof in[i].buf)) {
                size_t line = nl != NULL ? (size_t)(nl - start) : in[i].len;
                char reply[sizeof in[i].buf + 300];
                int len = snprintf(reply, sizeof reply, "%s: %.*s\n", name, (int)line, start);
                (void)!send(pfd[i].fd, reply, (size_t)len, MSG_NOSIGNAL);
                start += line + (nl != NULL);
                if (nl == NULL)
                    break;
            }
            in[i].len = (size_t)(end - start);
            memmove(in[i].buf, start, in[i].len);
        }
        if ((pfd[0].revents & POLLIN) && n < 256) {
            int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            if (fd >= 0) {
                in[n].len = 0;
                pfd[n++] = (struct pollfd){.fd = fd, .events = POLLIN};
            }
        }
    }
    pconn_announce_stop(announcer);
    for (nfds_t i = 2; i < n; i++)
        close(pfd[i].fd);
    close(lfd);
    return 0;
}

/* ---- rpc-serve ------------------------------------------------------------------ */

static int rpc_echo(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    return pconn_buf_append(resp, req, len);
}

static int rpc_name(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)req, (void)len, (void)err;
    return pconn_buf_append(resp, arg, strlen(arg));
}

static int rpc_sleep(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    char ms[32] = "";
    memcpy(ms, req, len < sizeof ms - 1 ? len : sizeof ms - 1);
    poll(NULL, 0, atoi(ms));
    return pconn_buf_append(resp, req, len);
}

static int rpc_serve(int argc, char **argv)
{
    if (argc < 1)
        return usage();
    const char *name = argc >= 3 && strcmp(argv[1], "--name") == 0 ? argv[2] : "pconn";
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigprocmask(SIG_BLOCK, &stop, NULL);
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    pconn_rpc_impls_add(impls, "echo", 1, rpc_echo, NULL);
    pconn_rpc_impls_add(impls, "name", 1, rpc_name, (void *)name);
    pconn_rpc_impls_add(impls, "sleep", 1, rpc_sleep, NULL);
    pconn_rpc_server_options_t so = {.listen_address = argv[0], .implementations = impls};
    pconn_rpc_server_t *srv = NULL;
    pconn_error_t err;
    if (pconn_rpc_server_start(&so, &srv, &err) != PCONN_OK) {
        fprintf(stderr, "pconn rpc-serve: %s\n", err.message);
        return 1;
    }
    printf("listening on %s\n", pconn_rpc_server_address(srv));
    fflush(stdout);
    int sig;
    sigwait(&stop, &sig);
    pconn_rpc_server_stop(srv);
    pconn_rpc_impls_free(impls);
    return 0;
}

/* ---- watch ----------------------------------------------------------------------- */

static int64_t every_ms = 1000;

static int64_t fixed_delay(void *arg, unsigned failures)
{
    (void)arg, (void)failures;
    return every_ms;
}

static int watch(int argc, char **argv)
{
    pconn_resolver_t *r = NULL;
    pconn_http_catalog_options_t cat = {0};
    int i = 0;
    if (i + 1 < argc && strcmp(argv[i], "--every") == 0) {
        /* At least the library's retry floor: 0 would spin at ~46,000 attempts/s. */
        char *end;
        errno = 0;
        long long ms = strtoll(argv[i + 1], &end, 10);
        if (errno != 0 || end == argv[i + 1] || *end != '\0' || ms < PCONN_RETRY_FLOOR_MS ||
            ms > 86400000) {
            fprintf(stderr, "pconn watch: --every %s: not a number of milliseconds from %d to 86400000\n",
                    argv[i + 1], PCONN_RETRY_FLOOR_MS);
            return 2;
        }
        every_ms = ms;
        i += 2;
    }
    if (i >= argc)
        return usage();
    pconn_error_t err;
    if (strcmp(argv[i], "--file") == 0 && i + 1 < argc) {
        r = pconn_resolver_file(argv[i + 1]);
    } else if (strcmp(argv[i], "--dns") == 0 && i + 2 < argc) {
        char *end;
        long port = strtol(argv[i + 2], &end, 10);
        if (end == argv[i + 2] || *end != '\0' || port < 1 || port > 65535) {
            fprintf(stderr, "pconn watch: --dns port %s: not a port from 1 to 65535\n", argv[i + 2]);
            return 2;
        }
        r = pconn_resolver_dns(argv[i + 1], (uint16_t)port);
    } else if (argv[i][0] != '-' &&
               pconn_resolver_static_checked((const char *const *)argv + i, (size_t)(argc - i), &r,
                                             &err) != PCONN_OK) {
        fprintf(stderr, "pconn watch: %s\n", err.message);
        return 2;
    } else if (r != NULL) {
        /* a checked static list */
    } else if (strcmp(argv[i], "--catalog") == 0 && i + 1 < argc) {
        cat.url = argv[i + 1];
        for (int k = i + 2; k + 1 < argc; k += 2) {
            if (strcmp(argv[k], "--key") == 0)
                cat.key = argv[k + 1];
            else if (strcmp(argv[k], "--pick") == 0)
                cat.pick = strcmp(argv[k + 1], "first") == 0    ? PCONN_PICK_FIRST
                           : strcmp(argv[k + 1], "random") == 0 ? PCONN_PICK_RANDOM
                                                                : PCONN_PICK_ROUND_ROBIN;
            else if (strcmp(argv[k], "--format") == 0)
                cat.format = strcmp(argv[k + 1], "etcd") == 0     ? PCONN_CATALOG_ETCD
                             : strcmp(argv[k + 1], "consul") == 0 ? PCONN_CATALOG_CONSUL
                                                                  : PCONN_CATALOG_JSON;
        }
        r = pconn_resolver_http_catalog(&cat);
    }
    if (r == NULL) {
        fprintf(stderr, "pconn watch: bad resolver arguments\n");
        return 2;
    }
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigprocmask(SIG_BLOCK, &stop, NULL);
    pconn_options_t o = {.server_name = "watch", .resolver = r, .on_event = pconn_log_stderr,
                         .retry_delay = fixed_delay};
    pconn_t *pc = NULL;
    if (pconn_tcp_create(&o, NULL, &pc) != PCONN_OK)
        return 1;
    int sig;
    sigwait(&stop, &sig);
    pconn_free(pc);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 2 && strcmp(argv[1], "serve") == 0)
        return serve(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "rpc-serve") == 0)
        return rpc_serve(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "watch") == 0)
        return watch(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "port") == 0) {
        pconn_error_t err;
        char address[64];
        int fd = pconn_tcp_listen("127.0.0.1:0", 1, &err);
        if (fd < 0 || pconn_tcp_local_address(fd, address, sizeof address) != PCONN_OK)
            return 1;
        close(fd);
        printf("%s\n", strrchr(address, ':') + 1);
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "--version") == 0) {
        printf("pconn %s\n", pconn_version());
        return 0;
    }
    return usage();
}
