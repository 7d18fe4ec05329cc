/* stats.c - the counters of pconns, RPC clients and RPC servers as JSON, one object
 * each, for people and monitoring (`pconn watch --json` prints the same). */
#include "rpc/rpc.h"
#include "pconn_pool.h"

#include <jansson.h>
#include <stdlib.h>

rpc_stats_t *pconn__rpc_stats_new(void)
{
    rpc_stats_t *s = calloc(1, sizeof *s);
    if (s != NULL)
        atomic_init(&s->refs, 1);
    return s;
}

void pconn__rpc_stats_ref(rpc_stats_t *s)
{
    if (s != NULL)
        atomic_fetch_add(&s->refs, 1);
}

void pconn__rpc_stats_unref(rpc_stats_t *s)
{
    if (s != NULL && atomic_fetch_sub(&s->refs, 1) == 1)
        free(s);
}

static const char *state_name(pconn_state_t s)
{
    switch (s) {
    case PCONN_STATE_CONNECTING: return "connecting";
    case PCONN_STATE_CONNECTED: return "connected";
    case PCONN_STATE_WAITING: return "waiting";
    case PCONN_STATE_CLOSED: return "closed";
    }
    return "?";
}

int pconn__rpc_stats_json(const rpc_stats_t *s, json_t *obj)
{
    json_t *errors = json_object(), *lat = json_array();
    for (int c = 1; c < 16; c++) {
        unsigned long long n = atomic_load(&s->errors[c]);
        if (n != 0)
            json_object_set_new(errors, pconn_err_name(c), json_integer((json_int_t)n));
    }
    /* [upper bound in us, count] for the buckets with answers */
    for (int k = 0; k < RPC_LAT_BUCKETS; k++) {
        unsigned long long n = atomic_load(&s->latency[k]);
        if (n != 0)
            json_array_append_new(lat, json_pack("[I,I]", (json_int_t)1 << k, (json_int_t)n));
    }
    json_t *rpc = json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:o,s:o}",
                            "calls", (json_int_t)atomic_load(&s->calls),
                            "answered", (json_int_t)atomic_load(&s->answered),
                            "in_flight", (json_int_t)atomic_load(&s->in_flight),
                            "bytes_out", (json_int_t)atomic_load(&s->bytes_out),
                            "writes", (json_int_t)atomic_load(&s->writes),
                            "bytes_in", (json_int_t)atomic_load(&s->bytes_in),
                            "served", (json_int_t)atomic_load(&s->served),
                            "errors", errors, "latency_us", lat);
    return rpc != NULL ? json_object_set_new(obj, "rpc", rpc) : -1;
}

static char *dump(json_t *o)
{
    char *text = o != NULL ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(o);
    return text;
}

char *pconn_stats_json(pconn_t *pc)
{
    if (pc == NULL)
        return NULL;
    pconn_stats_t st;
    pconn_stats(pc, &st);
    int64_t now = pconn__stats_clock_now(pc);
    json_t *o = json_pack("{s:s,s:s,s:f,s:I,s:I,s:I,s:I}", "server_name", pconn_server_name(pc),
                          "state", state_name(st.state),
                          "state_seconds", (double)(now - st.state_since_ns) / 1e9,
                          "attempts", (json_int_t)st.attempts, "failures", (json_int_t)st.failures,
                          "connects", (json_int_t)st.connects, "disconnects", (json_int_t)st.disconnects);
    if (o == NULL)
        return NULL;
    if (st.last_error.code != PCONN_OK)
        json_object_set_new(o, "last_error", json_pack("{s:s,s:s}", "code", pconn_err_name(st.last_error.code),
                                                        "message", st.last_error.message));
    else
        json_object_set_new(o, "last_error", json_null());
    rpc_stats_t *rs = pconn__stats_rpc(pc);
    if (rs != NULL)
        pconn__rpc_stats_json(rs, o);
    return dump(o);
}

char *pconn_pool_stats_json(pconn_pool_t *pool)
{
    if (pool == NULL)
        return NULL;
    pconn_pool_stats_t st;
    pconn_pool_stats(pool, &st);
    json_t *o = json_pack("{s:i,s:i,s:i,s:i,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:f,s:f}",
                          "size", (int)st.size, "connected", (int)st.connected, "in_use", (int)st.in_use,
                          "waiting", (int)st.waiting, "acquired", (json_int_t)st.acquired,
                          "timeouts", (json_int_t)st.timeouts, "released_broken", (json_int_t)st.released_broken,
                          "health_failures", (json_int_t)st.health_failures,
                          "expired_lifetime", (json_int_t)st.expired_lifetime,
                          "expired_idle", (json_int_t)st.expired_idle, "leaks", (json_int_t)st.leaks,
                          "wait_max_ms", (double)st.wait_max_ns / 1e6,
                          "wait_mean_ms", st.acquired != 0 ? (double)st.wait_total_ns / 1e6 / (double)st.acquired : 0.0);
    return dump(o);
}
