/* fuzz_catalog.c - libFuzzer target for the parsing of catalog answers. The first byte
 * picks the format (JSON, etcd, Consul), the rest is the body as it came over HTTP. */
#include "catalog.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    pconn_catalog_format_t format = (pconn_catalog_format_t)(data[0] % 3);
    pconn__addr_list_t list;
    char why[200];
    if (pconn__catalog_parse(format, (const char *)data + 1, size - 1, &list, why, sizeof why) ==
        PCONN_OK) {
        /* Every address handed out is one the connector accepts. */
        for (size_t i = 0; i < list.n; i++) {
            pconn__addr_t a;
            pconn_error_t err;
            if (pconn__address_parse(list.items[i], false, &a, &err) != PCONN_OK)
                __builtin_trap();
        }
        pconn__addr_list_free(&list);
    } else if (memchr(why, '\0', sizeof why) == NULL) {
        __builtin_trap(); /* the reason is always a terminated line */
    }
    unsigned char out[64];
    size_t len = sizeof out;
    pconn__base64_decode((const char *)data, size, out, &len);
    return 0;
}
