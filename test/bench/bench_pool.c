/* bench_pool.c - benchmarks of the connection pool: the uncontended acquire + release
 * against a mutex lock + unlock pair, and how evenly 64 threads share 8 connections
 * (the longest wait against the mean wait). Connections are fd-less fakes: what is
 * measured is the pool, not a network. */
#include "bench.h"
#include "../common.h"
#include "pconn_pool.h"

#include <pthread.h>
#include <time.h>

static int connect_fdless(void *arg, const char *address, pconn_conn_t **conn, pconn_error_t *err)
{
    (void)arg, (void)address, (void)err;
    *conn = fdless_conn_new(NULL);
    return PCONN_OK;
}

static pconn_pool_t *pool_new(unsigned size)
{
    const char *list[] = {"fake:1"};
    pconn_pool_options_t o = {0};
    o.base.server_name = "bench";
    o.base.resolver = pconn_resolver_static(list, 1);
    o.base.connect = connect_fdless;
    o.size = size;
    o.min_ready = size;
    pconn_pool_t *pool = NULL;
    pconn_error_t err;
    if (pconn_pool_new(&o, &pool, &err) != PCONN_OK) {
        fprintf(stderr, "bench_pool: %s\n", err.message);
        exit(1);
    }
    return pool;
}

/* ---- pool_acquire_release -------------------------------------------------------- */

static double ns_per_mutex_pair(int ms)
{
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    int64_t until = bench_now_ns() + (int64_t)ms * 1000000, t0 = bench_now_ns();
    uint64_t n = 0;
    while ((n & 1023) != 0 || bench_now_ns() < until) {
        pthread_mutex_lock(&m);
        pthread_mutex_unlock(&m);
        n++;
    }
    return (double)(bench_now_ns() - t0) / (double)n;
}

static double ns_per_acquire_release(pconn_pool_t *pool, int ms)
{
    int64_t until = bench_now_ns() + (int64_t)ms * 1000000, t0 = bench_now_ns();
    uint64_t n = 0;
    while ((n & 1023) != 0 || bench_now_ns() < until) {
        pconn_conn_t *c;
        if (pconn_pool_acquire(pool, 0, &c) != PCONN_OK)
            abort();
        pconn_pool_release(pool, c, 0);
        n++;
    }
    return (double)(bench_now_ns() - t0) / (double)n;
}

static void bench_acquire_release(void)
{
    pconn_pool_t *pool = pool_new(8);
    double base = ns_per_mutex_pair(500);
    double v = ns_per_acquire_release(pool, 500);
    bench_report("pool_acquire_release", v, "ns/op", base, "ratio <= 2 (vs mutex lock+unlock)",
                 v <= 2 * base);
    pconn_pool_free(pool);
}

/* ---- pool_fairness_max_wait ------------------------------------------------------- */

#define FAIR_THREADS 64
#define FAIR_SLOTS 8
#define FAIR_ROUNDS 150
/* Each holder keeps the connection 50 us, asleep as if waiting for the server's answer:
 * busy holders would measure the scheduler of 2 cores shared by 64 threads instead. */
#define FAIR_HOLD_NS 50000

typedef struct fair_t {
    pthread_t thread;
    pconn_pool_t *pool;
    pthread_barrier_t *start;
    int64_t waits[FAIR_ROUNDS];
} fair_t;

static void *fair_main(void *arg)
{
    fair_t *f = arg;
    pthread_barrier_wait(f->start);
    for (int i = 0; i < FAIR_ROUNDS; i++) {
        int64_t t0 = bench_now_ns();
        pconn_conn_t *c;
        if (pconn_pool_acquire(f->pool, PCONN_FOREVER, &c) != PCONN_OK)
            abort();
        f->waits[i] = bench_now_ns() - t0;
        struct timespec hold = {0, FAIR_HOLD_NS};
        nanosleep(&hold, NULL);
        pconn_pool_release(f->pool, c, 0);
    }
    return NULL;
}

static void bench_fairness(void)
{
    pconn_pool_t *pool = pool_new(FAIR_SLOTS);
    static fair_t f[FAIR_THREADS];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, FAIR_THREADS);
    for (int i = 0; i < FAIR_THREADS; i++) {
        f[i].pool = pool;
        f[i].start = &start;
        pthread_create(&f[i].thread, NULL, fair_main, &f[i]);
    }
    for (int i = 0; i < FAIR_THREADS; i++)
        pthread_join(f[i].thread, NULL);
    pthread_barrier_destroy(&start);
    size_t n = (size_t)FAIR_THREADS * FAIR_ROUNDS;
    int64_t *all = malloc(n * sizeof *all);
    double sum = 0;
    for (int i = 0; i < FAIR_THREADS; i++) {
        for (int k = 0; k < FAIR_ROUNDS; k++) {
            all[(size_t)i * FAIR_ROUNDS + (size_t)k] = f[i].waits[k];
            sum += (double)f[i].waits[k];
        }
    }
    double mean = sum / (double)n;
    double p99 = bench_percentile(all, n, 99);
    double max = (double)all[n - 1]; /* sorted by bench_percentile */
    printf("pool_fairness: %d threads on %d connections, %zu acquires holding %d us each: "
           "mean wait %.1f us, p99 %.1f us, max %.1f us\n",
           FAIR_THREADS, FAIR_SLOTS, n, FAIR_HOLD_NS / 1000, mean / 1e3, p99 / 1e3, max / 1e3);
    bench_report("pool_fairness_max_wait", max / 1e3, "us", mean / 1e3,
                 "ratio <= 4 (vs the mean wait)", max <= 4 * mean);
    bench_report("pool_fairness_p99_wait", p99 / 1e3, "us", mean / 1e3, "(reported)", true);
    free(all);
    pconn_pool_free(pool);
}

int main(int argc, char **argv)
{
    const char *only = argc > 1 ? argv[1] : "";
    if (!*only || strcmp(only, "acquire") == 0)
        bench_acquire_release();
    if (!*only || strcmp(only, "fairness") == 0)
        bench_fairness();
    return 0;
}
