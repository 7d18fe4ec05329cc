/* catalog_parse.c - turns a catalog's answer (JSON, etcd v3 gateway, Consul health) into
 * addresses. Pure functions over bytes from outside: the fuzz target calls them. */
#include "catalog.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_INSTANCES 4096

void pconn__addr_list_free(pconn__addr_list_t *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->items[i]);
    free(l->items);
    l->items = NULL;
    l->n = l->cap = 0;
}

static bool list_add(pconn__addr_list_t *l, const char *address)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        char **items = realloc(l->items, cap * sizeof *items);
        if (items == NULL)
            return false;
        l->items = items;
        l->cap = cap;
    }
    char *copy = strdup(address);
    if (copy == NULL)
        return false;
    l->items[l->n++] = copy;
    return true;
}

/* Parse state: the first reason an instance was refused, for the error message. */
typedef struct parse_t {
    pconn__addr_list_t *out;
    char *why;
    size_t why_size;
    size_t seen;
    bool have_why, nomem;
} parse_t;

static void refuse(parse_t *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void refuse(parse_t *p, const char *fmt, ...)
{
    if (p->have_why)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(p->why, p->why_size, "instance %zu: ", p->seen);
    if (n >= 0 && (size_t)n < p->why_size)
        vsnprintf(p->why + n, p->why_size - (size_t)n, fmt, ap);
    va_end(ap);
    p->have_why = true;
}

static void add_address(parse_t *p, const char *address)
{
    pconn__addr_t a;
    pconn_error_t err;
    if (pconn__address_parse(address, false, &a, &err) != PCONN_OK) {
        refuse(p, "%s", err.message);
        return;
    }
    if (!list_add(p->out, address))
        p->nomem = true;
}

static void add_host_port(parse_t *p, const char *host, json_int_t port)
{
    if (port < 1 || port > 65535) {
        refuse(p, "port %lld outside 1-65535", (long long)port);
        return;
    }
    if (host[0] == '\0') {
        refuse(p, "empty host");
        return;
    }
    char address[PCONN_ADDRESS_MAX];
    bool v6 = strchr(host, ':') != NULL;
    int n = snprintf(address, sizeof address, v6 ? "[%s]:%lld" : "%s:%lld", host, (long long)port);
    if (n < 0 || (size_t)n >= sizeof address) {
        refuse(p, "host too long");
        return;
    }
    add_address(p, address);
}

/* A port as a JSON integer, or a string of digits (some catalogs quote numbers). */
static bool port_of(json_t *v, json_int_t *port)
{
    if (json_is_integer(v)) {
        *port = json_integer_value(v);
        return true;
    }
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        char *end;
        long long x = strtoll(s, &end, 10);
        if (*s != '\0' && *end == '\0') {
            *port = (json_int_t)x;
            return true;
        }
    }
    return false;
}

/* "host:port" | {"host","port"} | {"address"} */
static void add_instance(parse_t *p, json_t *v)
{
    p->seen++;
    if (json_is_string(v)) {
        add_address(p, json_string_value(v));
        return;
    }
    if (!json_is_object(v)) {
        refuse(p, "not a string or an object");
        return;
    }
    json_t *address = json_object_get(v, "address");
    if (json_is_string(address)) {
        add_address(p, json_string_value(address));
        return;
    }
    json_t *host = json_object_get(v, "host");
    json_int_t port;
    if (!json_is_string(host)) {
        refuse(p, "no \"host\" string");
        return;
    }
    if (!port_of(json_object_get(v, "port"), &port)) {
        refuse(p, "no \"port\" number");
        return;
    }
    add_host_port(p, json_string_value(host), port);
}

static int parse_json(parse_t *p, json_t *root)
{
    if (json_is_array(root)) {
        size_t i;
        json_t *v;
        json_array_foreach(root, i, v) {
            if (i >= MAX_INSTANCES)
                break;
            add_instance(p, v);
        }
        return PCONN_OK;
    }
    if (json_is_string(root) || json_is_object(root)) {
        add_instance(p, root);
        return PCONN_OK;
    }
    snprintf(p->why, p->why_size, "wrong shape: want an address, an object or a list");
    return PCONN_ERESOLVE;
}

/* An etcd value: JSON ({"host","port"} or a string), or the bare text host:port. */
static void add_etcd_value(parse_t *p, const char *b64)
{
    size_t in_len = strlen(b64);
    size_t len = in_len / 4 * 3 + 3;
    unsigned char *raw = malloc(len + 1);
    if (raw == NULL) {
        p->nomem = true;
        return;
    }
    if (!pconn__base64_decode(b64, in_len, raw, &len)) {
        p->seen++;
        refuse(p, "value is not base64");
        free(raw);
        return;
    }
    raw[len] = '\0';
    json_error_t jerr;
    json_t *v = json_loadb((const char *)raw, len, JSON_DECODE_ANY, &jerr);
    if (v != NULL) {
        add_instance(p, v);
        json_decref(v);
    } else if (json_error_code(&jerr) == json_error_out_of_memory) {
        p->nomem = true; /* not "not JSON": never drop an instance for want of memory */
    } else {
        p->seen++;
        if (memchr(raw, '\0', len) != NULL)
            refuse(p, "value holds a NUL byte");
        else
            add_address(p, (const char *)raw);
    }
    free(raw);
}

int pconn__catalog_etcd_value(const char *b64, char *address, size_t size, char *why, size_t why_size)
{
    pconn__addr_list_t list = {0};
    parse_t p = {.out = &list, .why = why, .why_size = why_size};
    add_etcd_value(&p, b64);
    int rc = PCONN_ERESOLVE;
    if (p.nomem)
        snprintf(why, why_size, "out of memory");
    else if (list.n == 1 && pconn__strcpy(address, size, list.items[0]))
        rc = PCONN_OK;
    else if (list.n == 1)
        snprintf(why, why_size, "address too long");
    pconn__addr_list_free(&list);
    return rc;
}

static int parse_etcd(parse_t *p, json_t *root)
{
    if (!json_is_object(root)) {
        snprintf(p->why, p->why_size, "wrong shape: want an etcd range answer (an object)");
        return PCONN_ERESOLVE;
    }
    json_t *kvs = json_object_get(root, "kvs");
    if (kvs == NULL)
        return PCONN_OK; /* the gateway leaves empty lists out: no instances */
    if (!json_is_array(kvs)) {
        snprintf(p->why, p->why_size, "wrong shape: \"kvs\" is not a list");
        return PCONN_ERESOLVE;
    }
    size_t i;
    json_t *kv;
    json_array_foreach(kvs, i, kv) {
        if (i >= MAX_INSTANCES)
            break;
        json_t *value = json_object_get(kv, "value");
        if (!json_is_string(value)) {
            p->seen++;
            refuse(p, "no base64 \"value\"");
            continue;
        }
        add_etcd_value(p, json_string_value(value));
    }
    return PCONN_OK;
}

static int parse_consul(parse_t *p, json_t *root)
{
    if (!json_is_array(root)) {
        snprintf(p->why, p->why_size, "wrong shape: want a list of Consul health entries");
        return PCONN_ERESOLVE;
    }
    size_t i;
    json_t *entry;
    json_array_foreach(root, i, entry) {
        if (i >= MAX_INSTANCES)
            break;
        p->seen++;
        json_t *service = json_object_get(entry, "Service");
        json_t *node = json_object_get(entry, "Node");
        const char *host = json_string_value(json_object_get(service, "Address"));
        if (host == NULL || host[0] == '\0')
            host = json_string_value(json_object_get(node, "Address"));
        json_int_t port;
        if (!json_is_object(service) || !port_of(json_object_get(service, "Port"), &port)) {
            refuse(p, "no Service.Port");
            continue;
        }
        if (host == NULL) {
            refuse(p, "no Service.Address or Node.Address");
            continue;
        }
        add_host_port(p, host, port);
    }
    return PCONN_OK;
}

int pconn__catalog_parse(pconn_catalog_format_t format, const char *body, size_t len,
                         pconn__addr_list_t *out, char *why, size_t why_size)
{
    memset(out, 0, sizeof *out);
    parse_t p = {.out = out, .why = why, .why_size = why_size};
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_DECODE_ANY, &jerr);
    if (root == NULL) {
        if (json_error_code(&jerr) == json_error_out_of_memory)
            snprintf(why, why_size, "out of memory");
        else
            snprintf(why, why_size, "not JSON: %s at line %d column %d", jerr.text, jerr.line,
                     jerr.column);
        return PCONN_ERESOLVE;
    }
    int rc;
    switch (format) {
    case PCONN_CATALOG_JSON: rc = parse_json(&p, root); break;
    case PCONN_CATALOG_ETCD: rc = parse_etcd(&p, root); break;
    case PCONN_CATALOG_CONSUL: rc = parse_consul(&p, root); break;
    default:
        snprintf(why, why_size, "unknown catalog format %d", (int)format);
        rc = PCONN_ERESOLVE;
    }
    json_decref(root);
    if (rc == PCONN_OK && p.nomem) {
        snprintf(why, why_size, "out of memory");
        rc = PCONN_ERESOLVE;
    }
    if (rc == PCONN_OK && out->n == 0) {
        if (!p.have_why)
            snprintf(why, why_size, "no instances");
        rc = PCONN_ERESOLVE;
    }
    if (rc != PCONN_OK)
        pconn__addr_list_free(out);
    return rc;
}

/* ---- base64 ---------------------------------------------------------------------- */

static const char b64chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

char *pconn__base64_encode(const void *data, size_t len)
{
    const unsigned char *in = data;
    char *out = malloc((len + 2) / 3 * 4 + 1);
    if (out == NULL)
        return NULL;
    char *o = out;
    for (size_t i = 0; i < len; i += 3) {
        unsigned v = (unsigned)in[i] << 16;
        if (i + 1 < len)
            v |= (unsigned)in[i + 1] << 8;
        if (i + 2 < len)
            v |= in[i + 2];
        *o++ = b64chars[(v >> 18) & 63];
        *o++ = b64chars[(v >> 12) & 63];
        *o++ = i + 1 < len ? b64chars[(v >> 6) & 63] : '=';
        *o++ = i + 2 < len ? b64chars[v & 63] : '=';
    }
    *o = '\0';
    return out;
}

static int b64val(char c)
{
    const char *p = c != '\0' ? strchr(b64chars, c) : NULL;
    return p != NULL ? (int)(p - b64chars) : -1;
}

bool pconn__base64_decode(const char *in, size_t in_len, unsigned char *out, size_t *len)
{
    if (in_len % 4 != 0)
        return false;
    size_t o = 0;
    for (size_t i = 0; i < in_len; i += 4) {
        int v[4];
        int pad = 0;
        for (int k = 0; k < 4; k++) {
            if (in[i + k] == '=' && i + 4 == in_len && k >= 2) {
                v[k] = 0;
                pad++;
            } else if (pad > 0 || (v[k] = b64val(in[i + k])) < 0) {
                return false;
            }
        }
        unsigned x = (unsigned)v[0] << 18 | (unsigned)v[1] << 12 | (unsigned)v[2] << 6 | (unsigned)v[3];
        unsigned char bytes[3] = {(unsigned char)(x >> 16), (unsigned char)(x >> 8), (unsigned char)x};
        for (int k = 0; k < 3 - pad; k++) {
            if (o >= *len)
                return false;
            out[o++] = bytes[k];
        }
    }
    *len = o;
    return true;
}
