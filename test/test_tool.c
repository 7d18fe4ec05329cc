/* test_tool.c - the `pconn` tool, run as a user runs it: every command, its exit status
 * and output, bad arguments, --json parsed by a JSON parser, SIGINT's summary. */
#include "common.h"

#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

/* Runs `pconn ARGS` through sh (stdin from in when not NULL); its output (stdout and
 * stderr as asked) into out; its exit status, or -1. */
static int run(const char *args, const char *in, bool with_stderr, char *out, size_t size)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s%s%s%s/samples/pconn %s%s", in != NULL ? "printf '" : "",
             in != NULL ? in : "", in != NULL ? "' | " : "", test_build_dir(), args,
             with_stderr ? " 2>&1" : " 2>/dev/null");
    FILE *p = popen(cmd, "r");
    if (p == NULL)
        return -1;
    size_t n = fread(out, 1, size - 1, p);
    out[n] = '\0';
    int status = pclose(p);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void server(tproc_t *p, const char *kind, char *address, size_t size)
{
    const char *argv[] = {"pconn", kind, "127.0.0.1:0", "--name", "S", NULL};
    CU_ASSERT_EQUAL_FATAL(tproc_spawn_server(p, argv, address, size), 0);
}

/* A loopback port with nothing listening: refused at once. */
static void dead_address(char *address, size_t size)
{
    char out[32];
    CU_ASSERT_EQUAL(run("port", NULL, false, out, sizeof out), 0);
    out[strcspn(out, "\n")] = '\0';
    snprintf(address, size, "127.0.0.1:%s", out);
}

static void test_help_and_version(void)
{
    char out[4096];
    CU_ASSERT_EQUAL(run("--help", NULL, false, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "usage: pconn COMMAND"));
    static const char *const cmds[] = {"wait", "watch", "cat", "call", "serve", "rpc-serve"};
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        char args[64], want[64];
        snprintf(args, sizeof args, "%s --help", cmds[i]);
        snprintf(want, sizeof want, "usage: pconn %s ", cmds[i]);
        CU_ASSERT_EQUAL(run(args, NULL, false, out, sizeof out), 0); /* stdout, exit 0 */
        CU_ASSERT_PTR_NOT_NULL(strstr(out, want));
    }
    CU_ASSERT_EQUAL(run("--version", NULL, false, out, sizeof out), 0);
    CU_ASSERT_STRING_EQUAL(out, "pconn " PCONN_VERSION_STRING "\n");
    CU_ASSERT_EQUAL(run("", NULL, false, out, sizeof out), 2);
}

/* Every bad value is named, and the exit status is 2. */
static void test_bad_arguments(void)
{
    static const struct {
        const char *args, *message;
    } cases[] = {
        {"frob", "pconn: unknown command frob (pconn --help)"},
        {"watch", "pconn watch: want a SPEC (pconn watch --help)"},
        {"watch 127.0.0.1:1 --every abc", "pconn watch: --every abc: not a whole number from 10 to 86400000"},
        {"watch --every 0 127.0.0.1:1", "pconn watch: --every 0: not a whole number from 10 to 86400000"},
        {"watch 127.0.0.1:1 --count 0", "pconn watch: --count 0: not a whole number from 1 to 1000000000"},
        {"watch dns:localhost:70000", "pconn watch: dns port 70000: not a whole number from 1 to 65535"},
        {"watch 127.0.0.1:1,db:70000", "pconn watch: address db:70000: port 70000 outside 1-65535 (pconn watch --help)"},
        {"watch etcd:http://127.0.0.1:2379", "pconn watch: etcd:http://127.0.0.1:2379: want etcd:URL/PREFIX (pconn watch --help)"},
        {"watch etcd:ftp://x/y --pick first", "pconn watch: etcd:ftp://x/y: not a catalog URL (http:// or https://) (pconn watch --help)"},
        {"watch 127.0.0.1:1 --pick best", "pconn watch: --pick best: not first, random or round-robin (pconn watch --help)"},
        {"wait 127.0.0.1:1 --timeout -1", "pconn wait: --timeout -1: not a number of seconds above 0 (at most 1000000) (pconn wait --help)"},
        {"wait 127.0.0.1:1 --json", "pconn wait: option --json does not apply here (pconn wait --help)"},
        {"wait 127.0.0.1:1 --frob", "pconn wait: unknown option or missing value: --frob (pconn wait --help)"},
        {"call 127.0.0.1:1", "pconn call: want SPEC NAME [PAYLOAD|-] (pconn call --help)"},
        {"call 127.0.0.1:1 echo --version x", "pconn call: --version x: not a whole number from 0 to 2147483647"},
        {"serve 127.0.0.1:0 --announce http://x", "pconn serve: --announce http://x: needs a KEY after the URL (pconn serve --help)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[512];
        int status = run(cases[i].args, NULL, true, out, sizeof out);
        out[strcspn(out, "\n")] = '\0';
        if (status != 2 || strcmp(out, cases[i].message) != 0)
            fprintf(stderr, "\n  pconn %s: exit %d, \"%s\"", cases[i].args, status, out);
        CU_ASSERT_EQUAL(status, 2);
        CU_ASSERT_STRING_EQUAL(out, cases[i].message);
    }
}

static void test_wait_exit_codes(void)
{
    tproc_t s;
    char address[128], out[512], args[256];
    server(&s, "serve", address, sizeof address);
    snprintf(args, sizeof args, "wait %s --timeout 20", address);
    CU_ASSERT_EQUAL(run(args, NULL, true, out, sizeof out), 0);
    CU_ASSERT_STRING_EQUAL(out, "");
    tproc_signal(&s, SIGKILL);
    char dead[64];
    dead_address(dead, sizeof dead);
    /* Long enough for the first attempt to fail, however slow the build (sanitizers):
     * the message then names the last failure. */
    snprintf(args, sizeof args, "wait %s --timeout 2 --every 60000", dead);
    CU_ASSERT_EQUAL(run(args, NULL, true, out, sizeof out), 1);
    char want[256];
    snprintf(want, sizeof want, "pconn wait: no connection to %s within 2 s", dead);
    CU_ASSERT_EQUAL(strncmp(out, want, strlen(want)), 0);
    /* with the last failure, when one came in time (it may not, on a slow build) */
    CU_ASSERT(out[strlen(want)] == '\n' || strstr(out, "Connection refused") != NULL);
    if (strncmp(out, want, strlen(want)) != 0)
        fprintf(stderr, "\n  got: %s", out);
}

/* --json: one object a line, each parsed; --count ends it after that many events. */
static void test_watch_json_count(void)
{
    tproc_t s;
    char address[128], out[4096], args[256];
    server(&s, "serve", address, sizeof address);
    snprintf(args, sizeof args, "watch --json %s --count 3", address);
    CU_ASSERT_EQUAL(run(args, NULL, false, out, sizeof out), 0);
    static const char *const kinds[] = {"attempting_to_connect", "obtained_address", "connected"};
    int lines = 0;
    for (char *save = NULL, *line = strtok_r(out, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        json_error_t jerr;
        json_t *o = json_loads(line, 0, &jerr);
        CU_ASSERT_PTR_NOT_NULL_FATAL(o);
        if (lines < 3)
            CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(o, "event")), kinds[lines]);
        CU_ASSERT_TRUE(json_is_real(json_object_get(o, "delta_s")));
        CU_ASSERT_TRUE(json_is_string(json_object_get(o, "time")));
        if (lines >= 1)
            CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(o, "address")), address);
        json_decref(o);
        lines++;
    }
    CU_ASSERT_EQUAL(lines, 3);
    tproc_signal(&s, SIGKILL);
}

/* Ctrl-C: the connection is closed cleanly (its DISCONNECTED printed) and a summary
 * follows; exit 0. */
static void test_watch_sigint_summary(void)
{
    tproc_t s, w;
    char address[128], line[512];
    server(&s, "serve", address, sizeof address);
    const char *argv[] = {"pconn", "watch", address, NULL};
    CU_ASSERT_EQUAL_FATAL(tproc_spawn(&w, argv), 0);
    bool connected = false;
    while (!connected && tproc_read_line(&w, line, sizeof line) == 0)
        connected = strstr(line, "connected to ") != NULL && strstr(line, "disconnected") == NULL;
    CU_ASSERT_TRUE_FATAL(connected);
    tproc_signal(&w, SIGINT);
    bool disconnected = false, summary = false;
    while (tproc_read_line(&w, line, sizeof line) == 0) {
        disconnected |= strstr(line, "disconnected from ") != NULL;
        summary |= strncmp(line, "summary: connected ", 19) == 0 && strstr(line, " 1 cycles, 0 failures") != NULL;
    }
    CU_ASSERT_TRUE(disconnected);
    CU_ASSERT_TRUE(summary);
    CU_ASSERT_EQUAL(tproc_wait(&w), 0);
    tproc_signal(&s, SIGKILL);
}

/* With --json the summary is JSON too, with the pconn's counters (pconn_stats_json). */
static void test_watch_json_summary(void)
{
    tproc_t s, w;
    char address[128], line[2048];
    server(&s, "serve", address, sizeof address);
    const char *argv[] = {"pconn", "watch", "--json", address, NULL};
    CU_ASSERT_EQUAL_FATAL(tproc_spawn(&w, argv), 0);
    bool connected = false;
    while (!connected && tproc_read_line(&w, line, sizeof line) == 0)
        connected = strstr(line, "\"event\":\"connected\"") != NULL;
    CU_ASSERT_TRUE_FATAL(connected);
    tproc_signal(&w, SIGINT);
    json_t *summary = NULL;
    while (tproc_read_line(&w, line, sizeof line) == 0) {
        json_error_t jerr;
        json_t *o = json_loads(line, 0, &jerr);
        CU_ASSERT_PTR_NOT_NULL_FATAL(o);
        if (json_object_get(o, "summary") != NULL) {
            json_decref(summary);
            summary = o;
        } else {
            json_decref(o);
        }
    }
    CU_ASSERT_PTR_NOT_NULL_FATAL(summary);
    json_t *stats = json_object_get(summary, "stats");
    CU_ASSERT_EQUAL(json_integer_value(json_object_get(stats, "connects")), 1);
    CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(stats, "server_name")), address);
    CU_ASSERT_EQUAL(json_integer_value(json_object_get(json_object_get(summary, "summary"), "cycles")), 1);
    json_decref(summary);
    CU_ASSERT_EQUAL(tproc_wait(&w), 0);
    tproc_signal(&s, SIGKILL);
}

static void test_call(void)
{
    tproc_t s;
    char address[128], out[512], args[256];
    server(&s, "rpc-serve", address, sizeof address);
    snprintf(args, sizeof args, "call %s echo 'hello there'", address);
    CU_ASSERT_EQUAL(run(args, NULL, false, out, sizeof out), 0);
    CU_ASSERT_STRING_EQUAL(out, "hello there");
    snprintf(args, sizeof args, "call --timeout 20 %s echo -", address); /* options anywhere */
    CU_ASSERT_EQUAL(run(args, "from\\nstdin", false, out, sizeof out), 0);
    CU_ASSERT_STRING_EQUAL(out, "from\nstdin");
    snprintf(args, sizeof args, "call %s name --version 1", address);
    CU_ASSERT_EQUAL(run(args, NULL, false, out, sizeof out), 0);
    CU_ASSERT_STRING_EQUAL(out, "S");
    snprintf(args, sizeof args, "call %s nosuch", address);
    CU_ASSERT_EQUAL(run(args, NULL, true, out, sizeof out), 3);
    CU_ASSERT_STRING_EQUAL(out, "pconn call: PCONN_EUNIMPLEMENTED: no implementation of nosuch version 1\n");
    snprintf(args, sizeof args, "call %s sleep 5000 --timeout 0.2", address);
    CU_ASSERT_EQUAL(run(args, NULL, true, out, sizeof out), 1);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "PCONN_ETIMEDOUT"));
    tproc_signal(&s, SIGKILL);
    char dead[64];
    dead_address(dead, sizeof dead);
    snprintf(args, sizeof args, "call %s echo x --timeout 0.2", dead);
    CU_ASSERT_EQUAL(run(args, NULL, true, out, sizeof out), 1);
}

static void test_cat(void)
{
    tproc_t s;
    char address[128], out[512], args[256];
    server(&s, "serve", address, sizeof address);
    snprintf(args, sizeof args, "cat %s", address);
    CU_ASSERT_EQUAL(run(args, "one\\ntwo\\n", true, out, sizeof out), 0);
    CU_ASSERT_STRING_EQUAL(out, "S: one\nS: two\n");
    tproc_signal(&s, SIGKILL);
}

static const test_def_t tests[] = {
    {"help_and_version", test_help_and_version},
    {"bad_arguments", test_bad_arguments},
    {"wait_exit_codes", test_wait_exit_codes},
    {"watch_json_count", test_watch_json_count},
    {"watch_sigint_summary", test_watch_sigint_summary},
    {"watch_json_summary", test_watch_json_summary},
    {"call", test_call},
    {"cat", test_cat},
    {NULL, NULL},
};

int main(int argc, char **argv)
{
    return run_suite("tool", tests, argc, argv);
}
