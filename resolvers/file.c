/* file.c - the file resolver: reads the address from a file before every attempt. */
#include "internal.h"
#include "pconn_resolver.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Enough for any valid file: a few comment lines and one address. */
#define FILE_READ_MAX 4096

static int file_resolve(void *arg, char *address, size_t size, pconn_error_t *err)
{
    const char *path = arg;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        pconn_error_set(err, PCONN_ERESOLVE, errno, "address file %s", path);
        return PCONN_ERESOLVE;
    }
    char buf[FILE_READ_MAX + 1];
    size_t len = 0;
    ssize_t n;
    while (len < FILE_READ_MAX && (n = read(fd, buf + len, FILE_READ_MAX - len)) != 0) {
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            pconn_error_set(err, PCONN_ERESOLVE, errno, "address file %s: read", path);
            close(fd);
            return PCONN_ERESOLVE;
        }
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';

    for (char *line = buf, *next; line != NULL && *line != '\0'; line = next) {
        next = strchr(line, '\n');
        if (next != NULL)
            *next++ = '\0';
        while (isspace((unsigned char)*line))
            line++;
        char *end = line + strlen(line);
        while (end > line && isspace((unsigned char)end[-1]))
            *--end = '\0';
        if (*line == '\0' || *line == '#')
            continue;
        if (next == NULL && len == FILE_READ_MAX) {
            pconn_error_set(err, PCONN_ERESOLVE, 0, "address file %s: line too long", path);
            return PCONN_ERESOLVE;
        }
        pconn__addr_t parsed;
        pconn_error_t why;
        if (pconn__address_parse(line, false, &parsed, &why) != PCONN_OK) {
            pconn_error_set(err, PCONN_ERESOLVE, 0, "address file %s: %s", path, why.message);
            return PCONN_ERESOLVE;
        }
        if (!pconn__strcpy(address, size, line)) {
            pconn_error_set(err, PCONN_ERESOLVE, 0, "address file %s: address too long", path);
            return PCONN_ERESOLVE;
        }
        return PCONN_OK;
    }
    pconn_error_set(err, PCONN_ERESOLVE, 0, "address file %s: no address in it", path);
    return PCONN_ERESOLVE;
}

pconn_resolver_t *pconn_resolver_file(const char *path)
{
    if (path == NULL || path[0] == '\0') {
        errno = EINVAL;
        return NULL;
    }
    char *copy = strdup(path);
    if (copy == NULL)
        return NULL;
    pconn_resolver_t *r = pconn_resolver_new(file_resolve, copy, free);
    if (r == NULL)
        free(copy);
    return r;
}
