/* common_http.h - a tiny HTTP/1.1 server for catalog tests: it answers with what the
 * test sets, slowly, never, or without end. One connection at a time, on its own thread. */
#ifndef PCONN_TEST_HTTP_H
#define PCONN_TEST_HTTP_H

#include <pthread.h>
#include <stdbool.h>

typedef enum {
    HTTP_FIXED,    /* status and body as set, keep-alive */
    HTTP_SLOW,     /* headers, then one byte of body every 200 ms */
    HTTP_SILENT,   /* reads the request, never answers */
    HTTP_ENDLESS,  /* 200, no Content-Length, body bytes until the client goes */
    HTTP_BIG_LEN,  /* 200 with Content-Length: 100 MiB, then body bytes */
    HTTP_CONSUL    /* a Consul agent's blocking queries: see thttp_consul_set() */
} http_mode_t;

typedef struct thttp_t {
    int lfd, wake_fd;
    pthread_t thread;
    pthread_mutex_t mutex;
    pthread_cond_t cond; /* a request arrived */
    http_mode_t mode;
    int status;
    char *body;
    char last_request[8192];
    int requests, connections;
    long long consul_index;   /* HTTP_CONSUL: X-Consul-Index of the body */
    int consul_max_wait_ms;   /* HTTP_CONSUL: a cap on ?wait= (0: none) */
    long long consul_alt;     /* HTTP_CONSUL, > 0: a misbehaving agent that answers at
                                 once, its index alternating with this one */
    pthread_cond_t changed;   /* HTTP_CONSUL: body or index changed, or stop */
    bool stop;
    char url[80]; /* http://127.0.0.1:PORT */
} thttp_t;

int thttp_start(thttp_t *h, http_mode_t mode, int status, const char *body);
void thttp_set(thttp_t *h, http_mode_t mode, int status, const char *body);
/* HTTP_CONSUL: the list (body) and its index. A request with ?index=I answers at once
 * when index > I (or I is 0), else when the index moves past I or its ?wait=Ns ends
 * (capped by consul_max_wait_ms), always with X-Consul-Index, as a Consul agent does. */
void thttp_consul_set(thttp_t *h, long long index, const char *body);
/* Copies the last request's head and body into buf. */
void thttp_last_request(thttp_t *h, char *buf, size_t size);
int thttp_connections(thttp_t *h);
/* Waits until n requests have arrived in all; the count then. */
int thttp_wait_requests(thttp_t *h, int n, int timeout_ms);
void thttp_stop(thttp_t *h);

#endif
