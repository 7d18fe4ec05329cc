/* wire.c - encoding helpers and the decoder of RPC frame payloads
 * (docs/protocol.md). Pure functions over bytes from outside: the fuzz target calls them. */
#include "rpc.h"

#include <stdio.h>
#include <string.h>

void pconn__put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

void pconn__put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

void pconn__put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

uint32_t pconn__get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

uint64_t pconn__get_u64(const uint8_t *p)
{
    return (uint64_t)pconn__get_u32(p) << 32 | pconn__get_u32(p + 4);
}

static int bad(char *why, size_t size, const char *what)
{
    snprintf(why, size, "%s", what);
    return PCONN_EPROTO;
}

int pconn__rpc_decode(const uint8_t *payload, size_t len, rpc_msg_t *m, char *why, size_t why_size)
{
    memset(m, 0, sizeof *m);
    if (len == 0)
        return bad(why, why_size, "empty frame");
    m->type = payload[0];
    const uint8_t *p = payload + 1;
    size_t left = len - 1;
    switch (m->type) {
    case RPC_HELLO:
        if (left < 5)
            return bad(why, why_size, "HELLO too short");
        m->magic = pconn__get_u32(p);
        m->nversions = p[4];
        if (m->nversions == 0 || m->nversions > 32)
            return bad(why, why_size, "HELLO with 0 or more than 32 versions");
        if (left != 5 + 2 * (size_t)m->nversions)
            return bad(why, why_size, "HELLO of the wrong length");
        for (unsigned i = 0; i < m->nversions; i++)
            m->versions[i] = (uint16_t)(p[5 + 2 * i] << 8 | p[6 + 2 * i]);
        return PCONN_OK;
    case RPC_HEARTBEAT:
        if (left != 0)
            return bad(why, why_size, "HEARTBEAT with a body");
        return PCONN_OK;
    case RPC_QUERY:
        if (left < 14)
            return bad(why, why_size, "QUERY too short");
        m->id = pconn__get_u64(p);
        m->version = pconn__get_u32(p + 8);
        m->name_len = (size_t)(p[12] << 8 | p[13]);
        if (m->name_len == 0 || m->name_len > RPC_NAME_MAX)
            return bad(why, why_size, "QUERY name of 0 or more than 255 bytes");
        if (left - 14 < m->name_len)
            return bad(why, why_size, "QUERY name runs past the frame");
        m->name = (const char *)p + 14;
        m->data = p + 14 + m->name_len;
        m->data_len = left - 14 - m->name_len;
        return PCONN_OK;
    case RPC_RESPONSE:
        if (left < 12)
            return bad(why, why_size, "RESPONSE too short");
        m->id = pconn__get_u64(p);
        m->code = pconn__get_u32(p + 8);
        m->data = p + 12;
        m->data_len = left - 12;
        return PCONN_OK;
    case RPC_CLOSE:
        if (left < 4)
            return bad(why, why_size, "CLOSE too short");
        m->code = pconn__get_u32(p);
        m->data = p + 4;
        m->data_len = left - 4;
        return PCONN_OK;
    default:
        snprintf(why, why_size, "unknown frame type %u", (unsigned)m->type);
        return PCONN_EPROTO;
    }
}

unsigned pconn__rpc_pick_version(const rpc_msg_t *hello)
{
    static const uint16_t ours[] = {RPC_VERSION};
    unsigned best = 0;
    for (unsigned i = 0; i < hello->nversions; i++)
        for (size_t k = 0; k < sizeof ours / sizeof ours[0]; k++)
            if (hello->versions[i] == ours[k] && ours[k] > best)
                best = ours[k];
    return best;
}
