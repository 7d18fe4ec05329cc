/* common_etcd.h - a real etcd for tests: a child process on free loopback ports with a
 * data directory under the build tree; killed with the test process whatever happens. */
#ifndef PCONN_TEST_ETCD_H
#define PCONN_TEST_ETCD_H

#include <pthread.h>
#include <stdbool.h>
#include <sys/types.h>

typedef struct tetcd_t {
    pid_t pid;
    int client_port, peer_port;
    char url[64];
    char dir[256];
    char name[64];
    char cluster[512];    /* --initial-cluster of a cluster member; "" alone */
    char tls_dir[200];    /* "": plaintext; else https with client-cert-auth (below) */
    pthread_t reader;
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    bool ready, exited;
} tetcd_t;

/* Starts etcd on new free ports with a fresh data directory; waits until it serves.
 * 0, or -1 (the reason on stderr). */
int tetcd_start(tetcd_t *e);
/* As tetcd_start(), serving clients over TLS only, with etcd's --client-cert-auth:
 * dir holds test/tls-certs.sh's files (server.pem/key for etcd, ca.pem for clients'
 * certificates). The URL is https://127.0.0.1:PORT. The tetcd_* helpers below speak
 * plaintext: not for such an etcd. */
int tetcd_start_tls(tetcd_t *e, const char *dir);
/* Starts a cluster of n members (at most 5) on free ports; waits until each serves.
 * 0, or -1. Each member is then a tetcd_t as above (kill, restart, stop). */
int tetcd_cluster_start(tetcd_t *members, int n);
/* 1 when e is the cluster's leader, 0 when not, -1 when it does not answer. */
int tetcd_is_leader(tetcd_t *e);
/* Starts it again on the same ports and data directory (after tetcd_kill). */
int tetcd_restart(tetcd_t *e);
/* Starts it again on the same ports with an empty data directory: a new cluster. */
int tetcd_restart_empty(tetcd_t *e);
/* SIGKILL and reap. */
void tetcd_kill(tetcd_t *e);
/* Kills it and removes the data directory. */
void tetcd_stop(tetcd_t *e);

/* Small etcd operations through the v3 JSON gateway, for checking what is stored. */
/* Number of keys under prefix, or -1 when etcd does not answer. */
int tetcd_count(tetcd_t *e, const char *prefix);
/* Puts key=value without a lease; 0 or -1. */
int tetcd_put(tetcd_t *e, const char *key, const char *value);
/* Deletes every key under prefix; 0 or -1. */
int tetcd_delete(tetcd_t *e, const char *prefix);
/* Revokes every lease (as if each expired); how many, or -1. */
int tetcd_revoke_all(tetcd_t *e);
/* The current revision, or -1. */
long long tetcd_revision(tetcd_t *e);
/* Blocks until a PUT (put=true) or DELETE of a key under prefix happens at a revision
 * after from_revision (events already past are delivered too), or timeout_ms passes.
 * 0 when it happened, -1 otherwise. */
int tetcd_watch(tetcd_t *e, const char *prefix, long long from_revision, bool put, int timeout_ms);
/* The sum of the values of the lines of etcd's /metrics that start with line_prefix
 * (e.g. "grpc_server_started_total{grpc_method=\"Range\""), or -1. */
long long tetcd_metric(tetcd_t *e, const char *line_prefix);
/* Compacts the history up to the current revision (physically); 0 or -1. */
int tetcd_compact(tetcd_t *e);

#endif
