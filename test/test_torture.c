/* test_torture.c - as curl's torture mode: every allocation an operation makes fails in
 * turn, and each failure must end in a clean error, never a crash, a hang or a leak.
 * This program replaces malloc (glibc allows it) to count and to fail allocations, so
 * it is built only without sanitizers, which bring their own allocator. */
#include "common.h"
#include "pconn_resolver.h"
#include "pconn_rpc.h"
#include "pconn_tcp.h"
#include "../resolvers/catalog.h"

#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

/* ---- the allocator ------------------------------------------------------------- */

extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t n);
extern void *__libc_memalign(size_t align, size_t n);
extern void __libc_free(void *p);

static atomic_long countdown = -1; /* allocations left before the one that fails; <0: none */
static atomic_long outstanding;    /* allocations not freed yet */
static atomic_bool failed_one;

static bool fail_now(void)
{
    long left = atomic_load(&countdown);
    if (left < 0)
        return false;
    if (atomic_fetch_sub(&countdown, 1) == 0) {
        atomic_store(&failed_one, true);
        errno = ENOMEM; /* as the real one */
        return true;
    }
    return false;
}

static void *counted(void *p)
{
    if (p != NULL)
        atomic_fetch_add(&outstanding, 1);
    return p;
}

void *malloc(size_t n)
{
    return fail_now() ? NULL : counted(__libc_malloc(n));
}

void *calloc(size_t n, size_t size)
{
    return fail_now() ? NULL : counted(__libc_calloc(n, size));
}

void *realloc(void *p, size_t n)
{
    if (p == NULL)
        return malloc(n);
    if (n == 0) {
        free(p);
        return NULL;
    }
    if (fail_now())
        return NULL; /* p stays valid, as realloc promises */
    return __libc_realloc(p, n);
}

int posix_memalign(void **out, size_t align, size_t n)
{
    if (fail_now())
        return ENOMEM;
    *out = counted(__libc_memalign(align, n));
    return *out != NULL ? 0 : ENOMEM;
}

void *aligned_alloc(size_t align, size_t n)
{
    return fail_now() ? NULL : counted(__libc_memalign(align, n));
}

void *memalign(size_t align, size_t n)
{
    return fail_now() ? NULL : counted(__libc_memalign(align, n));
}

void free(void *p)
{
    if (p != NULL)
        atomic_fetch_sub(&outstanding, 1);
    __libc_free(p);
}

/* Runs op with its k-th allocation failing, for k = 0, 1, ... until op completes with no
 * failure injected; after every run nothing it allocated may be left. */
static void torture(const char *name, void (*op)(void))
{
    int runs = 0;
    for (long k = 0; k < 100000; k++) {
        /* Twice at each point, counting the second: libc fills one-time caches (locale
         * messages of strerror, thread stacks) on a first pass; a leak repeats. */
        atomic_store(&countdown, k);
        op();
        atomic_store(&countdown, -1);
        long before = atomic_load(&outstanding);
        atomic_store(&failed_one, false);
        atomic_store(&countdown, k);
        op();
        atomic_store(&countdown, -1);
        long leaked = atomic_load(&outstanding) - before;
        CU_ASSERT_EQUAL(leaked, 0);
        if (leaked != 0)
            fprintf(stderr, "\n  %s: %ld allocations left when allocation %ld failed\n", name, leaked, k);
        runs++;
        if (!atomic_load(&failed_one))
            break; /* op made fewer than k+1 allocations: every one has failed once */
    }
    fprintf(stderr, "[%s: %d runs] ", name, runs);
}

/* ---- operations ---------------------------------------------------------------- */

static void op_static_resolver(void)
{
    const char *list[] = {"a:1", "b:2", "unix:/x"};
    pconn_resolver_t *r = pconn_resolver_static(list, 3);
    if (r == NULL) {
        CU_ASSERT_EQUAL(errno, ENOMEM);
        return;
    }
    char addr[PCONN_ADDRESS_MAX];
    CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, NULL), PCONN_OK);
    pconn_resolver_free(r);
}

static void op_chain_and_file(void)
{
    const char *list[] = {"b:2"};
    pconn_resolver_t *m[2] = {pconn_resolver_file("/nonexistent/pconn"), pconn_resolver_static(list, 1)};
    if (m[0] == NULL || m[1] == NULL) {
        pconn_resolver_free(m[0]);
        pconn_resolver_free(m[1]);
        return;
    }
    pconn_resolver_t *r = pconn_resolver_chain(m, 2); /* takes them, even when it fails */
    if (r == NULL)
        return;
    char addr[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    CU_ASSERT_EQUAL(pconn_resolve(r, addr, sizeof addr, &err), PCONN_OK);
    pconn_resolver_free(r);
}

static int connect_fdless(void *arg, const char *address, pconn_conn_t **conn, pconn_error_t *err)
{
    (void)arg, (void)address;
    *conn = fdless_conn_new(NULL);
    if (*conn == NULL) {
        pconn_error_set(err, PCONN_ENOMEM, ENOMEM, "connect: out of memory");
        return PCONN_ENOMEM;
    }
    return PCONN_OK;
}

static void op_pconn_lifecycle(void)
{
    const char *list[] = {"a:1"};
    pconn_options_t o = {.server_name = "torture", .resolver = pconn_resolver_static(list, 1),
                         .connect = connect_fdless};
    if (o.resolver == NULL)
        return;
    pconn_t *pc = NULL;
    int rc = pconn_create(&o, &pc);
    if (rc != PCONN_OK) {
        CU_ASSERT(rc == PCONN_ENOMEM);
        CU_ASSERT_PTR_NULL(pc);
        return;
    }
    pconn_conn_t *c = NULL;
    rc = pconn_connected_or_failed(pc, WAIT_MS, &c, NULL);
    CU_ASSERT(rc == PCONN_OK || rc == PCONN_ENOMEM);
    pconn_conn_unref(c);
    pconn_free(pc);
}

static void op_catalog_parse(void)
{
    static const char etcd[] =
        "{\"kvs\":[{\"key\":\"eA==\",\"value\":\"eyJob3N0IjoiMTI3LjAuMC4xIiwicG9ydCI6NzAwMX0=\"},"
        "{\"key\":\"eQ==\",\"value\":\"MTI3LjAuMC4xOjcwMDI=\"}]}";
    pconn__addr_list_t list;
    char why[200];
    /* A failure with a reason, or an answer. jansson does not always tell its own
     * out-of-memory from bad JSON, so a value it could not allocate for may be skipped
     * like an invalid one; the next lookup, before the next attempt, sees it again. */
    why[0] = '\0';
    if (pconn__catalog_parse(PCONN_CATALOG_ETCD, etcd, sizeof etcd - 1, &list, why, sizeof why) == PCONN_OK) {
        CU_ASSERT(list.n == 1 || list.n == 2);
        pconn__addr_list_free(&list);
    } else {
        CU_ASSERT(why[0] != '\0');
    }
}

static int h_echo(void *arg, const void *req, size_t len, pconn_buf_t *resp, pconn_error_t *err)
{
    (void)arg, (void)err;
    return pconn_buf_append(resp, req, len);
}

static void op_impls_and_buffers(void)
{
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    if (impls == NULL)
        return;
    pconn_rpc_impls_add(impls, "echo", 1, h_echo, NULL);
    pconn_rpc_impls_add(impls, "echo", 2, h_echo, NULL);
    pconn_rpc_impls_free(impls);
    pconn_buf_t b = {0};
    for (int i = 0; i < 20; i++)
        if (pconn_buf_append(&b, "0123456789abcdef", 16) != PCONN_OK)
            break;
    pconn_buf_free(&b);
}

static void op_rpc_server(void)
{
    pconn_rpc_impls_t *impls = pconn_rpc_impls_new();
    if (impls == NULL)
        return;
    pconn_rpc_server_options_t so = {.listen_address = "127.0.0.1:0", .implementations = impls};
    pconn_rpc_server_t *srv = NULL;
    pconn_error_t err;
    if (pconn_rpc_server_start(&so, &srv, &err) == PCONN_OK)
        pconn_rpc_server_stop(srv);
    else
        CU_ASSERT_PTR_NULL(srv);
    pconn_rpc_impls_free(impls);
}

static char rpc_address[256];

static int64_t no_delay(void *arg, unsigned failures)
{
    (void)arg, (void)failures;
    return 0;
}

static void op_rpc_client(void)
{
    const char *list[] = {rpc_address};
    pconn_rpc_options_t o = {.base = {.server_name = "torture", .resolver = pconn_resolver_static(list, 1),
                                      .retry_delay = no_delay}};
    if (o.base.resolver == NULL)
        return;
    pconn_t *pc = NULL;
    if (pconn_rpc_create(&o, &pc) != PCONN_OK) {
        CU_ASSERT_PTR_NULL(pc);
        return;
    }
    pconn_buf_t resp;
    pconn_error_t err;
    int rc = pconn_rpc_dispatch(pc, "echo", 1, "torture", 7, &resp, WAIT_MS, &err);
    if (rc == PCONN_OK) {
        CU_ASSERT(resp.len == 7 && memcmp(resp.data, "torture", 7) == 0);
    } else {
        CU_ASSERT(err.message[0] != '\0'); /* a failed call says why */
    }
    pconn_buf_free(&resp);
    pconn_free(pc);
}

static void test_rpc_client(void)
{
    tproc_t server; /* another process: only the client's allocations count */
    const char *argv[] = {"pconn", "rpc-serve", "127.0.0.1:0", NULL};
    CU_ASSERT_EQUAL_FATAL(tproc_spawn_server(&server, argv, rpc_address, sizeof rpc_address), 0);
    torture("rpc client", op_rpc_client);
    tproc_signal(&server, SIGKILL);
}

static void test_static_resolver(void) { torture("static resolver", op_static_resolver); }
static void test_chain_and_file(void) { torture("chain and file", op_chain_and_file); }
static void test_pconn_lifecycle(void) { torture("pconn lifecycle", op_pconn_lifecycle); }
static void test_catalog_parse(void) { torture("catalog parse", op_catalog_parse); }
static void test_impls_and_buffers(void) { torture("impls and buffers", op_impls_and_buffers); }
static void test_rpc_server(void) { torture("rpc server", op_rpc_server); }

static const test_def_t tests[] = {
    {"static_resolver", test_static_resolver},
    {"chain_and_file", test_chain_and_file},
    {"pconn_lifecycle", test_pconn_lifecycle},
    {"catalog_parse", test_catalog_parse},
    {"impls_and_buffers", test_impls_and_buffers},
    {"rpc_server", test_rpc_server},
    {"rpc_client", test_rpc_client},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    return run_suite("torture", tests, argc, argv);
}
