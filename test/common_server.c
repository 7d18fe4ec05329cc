/* common_server.c - see common_server.h. */
#include "common_server.h"

#include "common.h"

#include "pconn_tcp.h"

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void remove_conn(tserver_t *s, int i)
{
    close(s->conns[i]);
    s->conns[i] = s->conns[--s->nconns];
}

static void *server_main(void *arg)
{
    tserver_t *s = arg;
    struct pollfd pfd[SERVER_MAX_CONNS + 2];
    for (;;) {
        pthread_mutex_lock(&s->mutex);
        if (s->stop) {
            pthread_mutex_unlock(&s->mutex);
            break;
        }
        if (s->drop_req != s->drop_done) {
            while (s->nconns > 0)
                remove_conn(s, 0);
            s->drop_done = s->drop_req;
            pthread_cond_broadcast(&s->cond);
        }
        int n = s->nconns;
        pfd[0] = (struct pollfd){.fd = s->wake_fd, .events = POLLIN};
        pfd[1] = (struct pollfd){.fd = s->lfd, .events = POLLIN};
        for (int i = 0; i < n; i++)
            pfd[i + 2] = (struct pollfd){.fd = s->conns[i], .events = POLLIN};
        pthread_mutex_unlock(&s->mutex);

        if (poll(pfd, (nfds_t)n + 2, -1) < 0)
            continue;
        if (pfd[0].revents) {
            uint64_t v;
            (void)!read(s->wake_fd, &v, sizeof v);
        }
        pthread_mutex_lock(&s->mutex);
        /* Connections first: indexes shift when one goes. */
        for (int i = n - 1; i >= 0; i--) {
            if (!pfd[i + 2].revents)
                continue;
            char buf[4096];
            ssize_t got = recv(s->conns[i], buf, sizeof buf, MSG_DONTWAIT);
            if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR))
                remove_conn(s, i);
            else if (got > 0 && s->mode == SERVER_ECHO)
                (void)!send(s->conns[i], buf, (size_t)got, MSG_NOSIGNAL);
        }
        if (pfd[1].revents) {
            int fd = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
            if (fd >= 0) {
                s->accepted++;
                if (s->mode == SERVER_DROP || s->nconns == SERVER_MAX_CONNS)
                    close(fd);
                else
                    s->conns[s->nconns++] = fd;
                pthread_cond_broadcast(&s->cond);
            }
        }
        pthread_mutex_unlock(&s->mutex);
    }
    return NULL;
}

int tserver_start(tserver_t *s, const char *listen_address, server_mode_t mode)
{
    memset(s, 0, sizeof *s);
    s->mode = mode;
    pconn_error_t err;
    s->lfd = pconn_tcp_listen(listen_address, 0, &err);
    if (s->lfd < 0)
        return -1;
    pconn_tcp_local_address(s->lfd, s->address, sizeof s->address);
    s->wake_fd = eventfd(0, EFD_CLOEXEC);
    pthread_mutex_init(&s->mutex, NULL);
    test_cond_init(&s->cond);
    pthread_create(&s->thread, NULL, server_main, s);
    return 0;
}

static void wake(tserver_t *s)
{
    uint64_t one = 1;
    (void)!write(s->wake_fd, &one, sizeof one);
}

int tserver_wait_accepted(tserver_t *s, int n, int timeout_ms)
{
    return test_wait_count(&s->mutex, &s->cond, &s->accepted, n, timeout_ms);
}

void tserver_drop_all(tserver_t *s)
{
    pthread_mutex_lock(&s->mutex);
    unsigned want = ++s->drop_req;
    wake(s);
    while (s->drop_done != want)
        pthread_cond_wait(&s->cond, &s->mutex);
    pthread_mutex_unlock(&s->mutex);
}

void tserver_stop(tserver_t *s)
{
    pthread_mutex_lock(&s->mutex);
    s->stop = true;
    wake(s);
    pthread_mutex_unlock(&s->mutex);
    pthread_join(s->thread, NULL);
    while (s->nconns > 0)
        remove_conn(s, 0);
    close(s->lfd);
    close(s->wake_fd);
    if (strncmp(s->address, "unix:/", 6) == 0)
        unlink(s->address + 5);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->mutex);
}
