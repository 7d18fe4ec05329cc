/* common_http.c - see common_http.h. */
#include "common_http.h"

#include "common.h"

#include "pconn_tcp.h"

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static bool stopping(thttp_t *h)
{
    pthread_mutex_lock(&h->mutex);
    bool stop = h->stop;
    pthread_mutex_unlock(&h->mutex);
    return stop;
}

/* Waits up to ms for the wake fd (stop) or the client to go; true if either happened. */
static bool pause_ms(thttp_t *h, int fd, int ms)
{
    struct pollfd pfd[2] = {{.fd = h->wake_fd, .events = POLLIN}, {.fd = fd, .events = POLLRDHUP}};
    return poll(pfd, 2, ms) != 0;
}

/* Reads one request (head and Content-Length body). false when the client went. */
static bool read_request(thttp_t *h, int fd)
{
    char buf[8192];
    size_t len = 0;
    for (;;) {
        struct pollfd pfd[2] = {{.fd = h->wake_fd, .events = POLLIN}, {.fd = fd, .events = POLLIN}};
        if (poll(pfd, 2, -1) <= 0 || pfd[0].revents)
            return false;
        ssize_t n = recv(fd, buf + len, sizeof buf - 1 - len, 0);
        if (n <= 0)
            return false;
        len += (size_t)n;
        buf[len] = '\0';
        char *end = strstr(buf, "\r\n\r\n");
        if (end == NULL) {
            if (len == sizeof buf - 1)
                return false;
            continue;
        }
        const char *cl = strcasestr(buf, "Content-Length:");
        size_t want = (size_t)(end + 4 - buf) + (cl != NULL && cl < end ? strtoul(cl + 15, NULL, 10) : 0);
        if (len >= want || len == sizeof buf - 1)
            break;
    }
    pthread_mutex_lock(&h->mutex);
    snprintf(h->last_request, sizeof h->last_request, "%s", buf);
    h->requests++;
    pthread_cond_broadcast(&h->cond);
    pthread_mutex_unlock(&h->mutex);
    return true;
}

static void send_str(int fd, const char *s, size_t len)
{
    (void)!send(fd, s, len, MSG_NOSIGNAL);
}

/* Answers requests on one connection until it goes; false to close it. */
static bool answer(thttp_t *h, int fd)
{
    pthread_mutex_lock(&h->mutex);
    http_mode_t mode = h->mode;
    int status = h->status;
    char *body = strdup(h->body ? h->body : "");
    pthread_mutex_unlock(&h->mutex);
    char head[256];
    bool keep = false;
    static char chunk[65536];
    switch (mode) {
    case HTTP_FIXED:
        snprintf(head, sizeof head, "HTTP/1.1 %d Answer\r\nContent-Type: application/json\r\n"
                 "Content-Length: %zu\r\n\r\n", status, strlen(body));
        send_str(fd, head, strlen(head));
        send_str(fd, body, strlen(body));
        keep = true;
        break;
    case HTTP_SLOW:
        snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n");
        send_str(fd, head, strlen(head));
        for (int i = 0; i < 100 && !pause_ms(h, fd, 200); i++)
            send_str(fd, "x", 1);
        break;
    case HTTP_SILENT:
        while (!pause_ms(h, fd, -1) && !stopping(h))
            ;
        break;
    case HTTP_CONSUL: {
        pthread_mutex_lock(&h->mutex);
        const char *req = h->last_request, *sp = strstr(req, " HTTP/");
        const char *ip = strstr(req, "index="), *wp = strstr(req, "wait=");
        long long want = ip != NULL && ip < sp ? atoll(ip + 6) : 0;
        long long wait_ms = wp != NULL && wp < sp ? atoll(wp + 5) * 1000 : 0;
        struct timespec start = test_deadline(0);
        for (;;) {
            /* The cap is read afresh: a test may lower it while a query waits. */
            long long ms = h->consul_max_wait_ms > 0 && (wait_ms == 0 || wait_ms > h->consul_max_wait_ms)
                               ? h->consul_max_wait_ms : wait_ms;
            long long ns = start.tv_nsec + (ms % 1000) * 1000000;
            struct timespec until = {.tv_sec = start.tv_sec + (time_t)(ms / 1000) + (time_t)(ns / 1000000000),
                                     .tv_nsec = ns % 1000000000};
            if (want == 0 || h->consul_index > want || h->stop || h->consul_alt > 0 ||
                pthread_cond_timedwait(&h->changed, &h->mutex, &until) != 0)
                break;
        }
        long long index = h->consul_alt > 0 && h->requests % 2 == 0 ? h->consul_alt : h->consul_index;
        free(body);
        body = strdup(h->body ? h->body : "");
        pthread_mutex_unlock(&h->mutex);
        /* One connection at a time here: closing each lets the next client in. */
        snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 "X-Consul-Index: %lld\r\nConnection: close\r\nContent-Length: %zu\r\n\r\n",
                 index, strlen(body));
        send_str(fd, head, strlen(head));
        send_str(fd, body, strlen(body));
        break;
    }
    case HTTP_ENDLESS:
    case HTTP_BIG_LEN:
        if (mode == HTTP_ENDLESS)
            snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        else
            snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n");
        send_str(fd, head, strlen(head));
        memset(chunk, ' ', sizeof chunk);
        for (int i = 0; i < 1600 && !stopping(h); i++)
            if (send(fd, chunk, sizeof chunk, MSG_NOSIGNAL) <= 0)
                break;
        break;
    }
    free(body);
    return keep;
}

static void *http_main(void *arg)
{
    thttp_t *h = arg;
    while (!stopping(h)) {
        struct pollfd pfd[2] = {{.fd = h->wake_fd, .events = POLLIN}, {.fd = h->lfd, .events = POLLIN}};
        if (poll(pfd, 2, -1) <= 0 || pfd[0].revents)
            continue;
        int fd = accept4(h->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        pthread_mutex_lock(&h->mutex);
        h->connections++;
        pthread_mutex_unlock(&h->mutex);
        while (read_request(h, fd) && answer(h, fd))
            ;
        close(fd);
    }
    return NULL;
}

int thttp_start(thttp_t *h, http_mode_t mode, int status, const char *body)
{
    memset(h, 0, sizeof *h);
    pconn_error_t err;
    h->lfd = pconn_tcp_listen("127.0.0.1:0", 0, &err);
    if (h->lfd < 0)
        return -1;
    char address[64];
    pconn_tcp_local_address(h->lfd, address, sizeof address);
    snprintf(h->url, sizeof h->url, "http://%s", address);
    h->wake_fd = eventfd(0, EFD_CLOEXEC);
    pthread_mutex_init(&h->mutex, NULL);
    test_cond_init(&h->cond);
    test_cond_init(&h->changed);
    thttp_set(h, mode, status, body);
    pthread_create(&h->thread, NULL, http_main, h);
    return 0;
}

void thttp_set(thttp_t *h, http_mode_t mode, int status, const char *body)
{
    pthread_mutex_lock(&h->mutex);
    h->mode = mode;
    h->status = status;
    free(h->body);
    h->body = body ? strdup(body) : NULL;
    pthread_mutex_unlock(&h->mutex);
}

void thttp_consul_set(thttp_t *h, long long index, const char *body)
{
    pthread_mutex_lock(&h->mutex);
    h->mode = HTTP_CONSUL;
    h->status = 200;
    h->consul_index = index;
    free(h->body);
    h->body = strdup(body);
    pthread_cond_broadcast(&h->changed);
    pthread_mutex_unlock(&h->mutex);
}

void thttp_last_request(thttp_t *h, char *buf, size_t size)
{
    pthread_mutex_lock(&h->mutex);
    snprintf(buf, size, "%s", h->last_request);
    pthread_mutex_unlock(&h->mutex);
}

int thttp_connections(thttp_t *h)
{
    pthread_mutex_lock(&h->mutex);
    int n = h->connections;
    pthread_mutex_unlock(&h->mutex);
    return n;
}

int thttp_wait_requests(thttp_t *h, int n, int timeout_ms)
{
    return test_wait_count(&h->mutex, &h->cond, &h->requests, n, timeout_ms);
}

void thttp_stop(thttp_t *h)
{
    pthread_mutex_lock(&h->mutex);
    h->stop = true;
    pthread_cond_broadcast(&h->changed);
    pthread_mutex_unlock(&h->mutex);
    uint64_t one = 1;
    (void)!write(h->wake_fd, &one, sizeof one);
    pthread_join(h->thread, NULL);
    close(h->lfd);
    close(h->wake_fd);
    free(h->body);
    pthread_cond_destroy(&h->cond);
    pthread_cond_destroy(&h->changed);
    pthread_mutex_destroy(&h->mutex);
}
