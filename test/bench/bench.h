/* bench.h - what the benchmarks share: timing, percentiles, and the report: a table row
 * on stdout and a JSON object per line in $PCONN_BENCH_OUT (run.sh makes the list). */
#ifndef PCONN_BENCH_H
#define PCONN_BENCH_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline int64_t bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int bench_cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The p-th percentile (0-100) of n samples; sorts them. */
static inline double bench_percentile(int64_t *v, size_t n, double p)
{
    qsort(v, n, sizeof *v, bench_cmp_i64);
    size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
    return (double)v[i < n ? i : n - 1];
}

/* One result. ratio = value / baseline; goal is the target in words; met is decided by
 * the caller from the ratio (or value) against the goal. */
static inline void bench_report(const char *name, double value, const char *unit, double baseline,
                                const char *goal, bool met)
{
    double ratio = baseline > 0 ? value / baseline : 0;
    printf("%-34s %12.1f %-8s baseline %12.1f  ratio %7.2f  goal %-34s %s\n", name, value, unit,
           baseline, ratio, goal, met ? "met" : "NOT MET");
    fflush(stdout);
    const char *path = getenv("PCONN_BENCH_OUT");
    FILE *f = path != NULL ? fopen(path, "a") : NULL;
    if (f != NULL) {
        fprintf(f, "{\"name\": \"%s\", \"value\": %.3f, \"unit\": \"%s\", \"baseline\": %.3f, "
                   "\"ratio\": %.4f, \"goal\": \"%s\", \"met\": %s}\n",
                name, value, unit, baseline, ratio, goal, met ? "true" : "false");
        fclose(f);
    }
}

/* For the charts: a file of the data directory ($PCONN_BENCH_DATA) to write, or NULL
 * when none is asked for. */
static inline FILE *bench_data(const char *name)
{
    const char *dir = getenv("PCONN_BENCH_DATA");
    if (dir == NULL)
        return NULL;
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return fopen(path, "w");
}

/* Writes the distributions of sorted samples a and b (ns) as percentile, a_us, b_us. */
static inline void bench_data_cdf(const char *name, const int64_t *a, const int64_t *b, size_t n)
{
    FILE *f = bench_data(name);
    if (f == NULL)
        return;
    for (int p = 0; p <= 1000; p++) {
        size_t i = (size_t)((double)p / 1000.0 * (double)(n - 1));
        fprintf(f, "%.1f %.2f %.2f\n", p / 10.0, (double)a[i] / 1000, (double)b[i] / 1000);
    }
    fclose(f);
}

#endif
