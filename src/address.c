/* address.c - parsing of address strings, with an error that says what is wrong.
 * "host:port", "[v6]:port", "unix:/path" (abstract: "unix:@name"). */
#include "internal.h"

#include <stdio.h>
#include <string.h>
#include <sys/un.h>

static bool host_char_ok(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '-' || ch == '.' || ch == '_' || ch == ':' || ch == '%';
}

static int parse_unix(const char *address, const char *path, pconn__addr_t *out,
                      pconn_error_t *err)
{
    size_t len = strlen(path);
    if (len == 0) {
        pconn_error_set(err, PCONN_EINVAL, 0, "address %s: empty unix socket path", address);
        return PCONN_EINVAL;
    }
    if (len >= sizeof out->path || len >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        pconn_error_set(err, PCONN_EINVAL, 0, "address %.64s...: unix socket path of %zu bytes, the limit is %zu",
                        address, len, sizeof out->path - 1);
        return PCONN_EINVAL;
    }
    out->is_unix = true;
    memcpy(out->path, path, len + 1);
    return PCONN_OK;
}

int pconn__address_parse(const char *address, bool allow_port0, pconn__addr_t *out,
                         pconn_error_t *err)
{
    memset(out, 0, sizeof *out);
    if (address == NULL || address[0] == '\0') {
        pconn_error_set(err, PCONN_EINVAL, 0, "empty address");
        return PCONN_EINVAL;
    }
    size_t total = strnlen(address, PCONN_ADDRESS_MAX);
    if (total >= PCONN_ADDRESS_MAX) {
        pconn_error_set(err, PCONN_EINVAL, 0, "address %.64s...: longer than %d bytes", address,
                        PCONN_ADDRESS_MAX - 1);
        return PCONN_EINVAL;
    }
    if (strncmp(address, "unix:", 5) == 0)
        return parse_unix(address, address + 5, out, err);

    const char *host = address, *host_end, *colon;
    if (address[0] == '[') {
        host = address + 1;
        host_end = strchr(host, ']');
        if (host_end == NULL) {
            pconn_error_set(err, PCONN_EINVAL, 0, "address %s: no closing ']'", address);
            return PCONN_EINVAL;
        }
        colon = host_end + 1;
        if (*colon != ':') {
            pconn_error_set(err, PCONN_EINVAL, 0, "address %s: no port (want [v6]:port)", address);
            return PCONN_EINVAL;
        }
    } else {
        colon = strrchr(address, ':');
        if (colon == NULL) {
            pconn_error_set(err, PCONN_EINVAL, 0, "address %s: no port (want host:port)", address);
            return PCONN_EINVAL;
        }
        host_end = colon;
        if (memchr(address, ':', (size_t)(colon - address)) != NULL) {
            pconn_error_set(err, PCONN_EINVAL, 0, "address %s: an IPv6 address needs brackets: [v6]:port",
                            address);
            return PCONN_EINVAL;
        }
    }
    size_t host_len = (size_t)(host_end - host);
    if (host_len == 0) {
        pconn_error_set(err, PCONN_EINVAL, 0, "address %s: no host", address);
        return PCONN_EINVAL;
    }
    if (host_len > 253) {
        pconn_error_set(err, PCONN_EINVAL, 0, "address %.64s...: host name of %zu bytes, the limit is 253",
                        address, host_len);
        return PCONN_EINVAL;
    }
    for (size_t i = 0; i < host_len; i++) {
        if (!host_char_ok(host[i])) {
            pconn_error_set(err, PCONN_EINVAL, 0, "address %s: bad character in host at byte %zu",
                            address, (size_t)(host + i - address));
            return PCONN_EINVAL;
        }
    }
    const char *port = colon + 1;
    size_t port_len = strlen(port);
    unsigned long value = 0;
    if (port_len == 0) {
        pconn_error_set(err, PCONN_EINVAL, 0, "address %s: empty port", address);
        return PCONN_EINVAL;
    }
    for (size_t i = 0; i < port_len; i++) {
        if (port[i] < '0' || port[i] > '9') {
            pconn_error_set(err, PCONN_EINVAL, 0, "address %s: port is not a number", address);
            return PCONN_EINVAL;
        }
        if (value <= 65535)
            value = value * 10 + (unsigned long)(port[i] - '0');
    }
    if (value > 65535 || (value == 0 && !allow_port0)) {
        pconn_error_set(err, PCONN_EINVAL, 0, "address %s: port %s outside 1-65535", address, port);
        return PCONN_EINVAL;
    }
    memcpy(out->host, host, host_len);
    out->host[host_len] = '\0';
    snprintf(out->port, sizeof out->port, "%lu", value);
    return PCONN_OK;
}
