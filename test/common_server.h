/* common_server.h - a small loopback stream server for tests, on its own thread. */
#ifndef PCONN_TEST_SERVER_H
#define PCONN_TEST_SERVER_H

#include <pthread.h>
#include <stdbool.h>

typedef enum {
    SERVER_HOLD, /* keep each connection open, discard what arrives */
    SERVER_DROP, /* close each connection right after accepting it */
    SERVER_ECHO  /* write back whatever arrives */
} server_mode_t;

#define SERVER_MAX_CONNS 256

typedef struct tserver_t {
    int lfd, wake_fd;
    pthread_t thread;
    server_mode_t mode;
    char address[128];
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int accepted;
    int conns[SERVER_MAX_CONNS];
    int nconns;
    unsigned drop_req, drop_done;
    bool stop;
} tserver_t;

/* Listens on listen_address ("127.0.0.1:0", "[::1]:0", "unix:/path"); 0 or -1. */
int tserver_start(tserver_t *s, const char *listen_address, server_mode_t mode);
/* Waits until n connections were accepted in all; the count then. */
int tserver_wait_accepted(tserver_t *s, int n, int timeout_ms);
/* Closes every open connection from the server side; returns when done. */
void tserver_drop_all(tserver_t *s);
/* Stops the thread, closes the listener and every connection. */
void tserver_stop(tserver_t *s);

#endif
