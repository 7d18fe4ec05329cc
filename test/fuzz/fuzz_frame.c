/* fuzz_frame.c - libFuzzer target for RPC frames (docs/protocol.md): the input is a
 * byte stream as a peer would send it; it is cut into frames the way the reader does
 * (a u64 length, refused over the limit before any allocation) and each payload goes
 * through the message decoder. */
#include "rpc/rpc.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LIMIT 4096

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t pos = 0;
    while (size - pos >= 8) {
        uint64_t n = pconn__get_u64(data + pos);
        pos += 8;
        if (n == 0 || n > LIMIT || n > size - pos)
            break; /* the reader closes here, having allocated nothing */
        uint8_t *payload = malloc((size_t)n); /* exact size, so ASan sees any overread */
        memcpy(payload, data + pos, (size_t)n);
        pos += (size_t)n;
        rpc_msg_t m;
        char why[128];
        if (pconn__rpc_decode(payload, (size_t)n, &m, why, sizeof why) == PCONN_OK) {
            if (m.type == RPC_HELLO)
                (void)pconn__rpc_pick_version(&m);
            /* Every view stays inside the payload. */
            if (m.name != NULL && (m.name < (const char *)payload ||
                                   m.name + m.name_len > (const char *)payload + n))
                __builtin_trap();
            if (m.data != NULL && (m.data < payload || m.data + m.data_len > payload + n))
                __builtin_trap();
        } else if (memchr(why, '\0', sizeof why) == NULL) {
            __builtin_trap();
        }
        free(payload);
    }
    return 0;
}
