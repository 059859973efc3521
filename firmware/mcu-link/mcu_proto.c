/* SPDX-License-Identifier: Apache-2.0
 *
 * Companion-MCU protocol v1: CRC, encode, decode and the resynchronising parser. The parser
 * follows docs/mcu-protocol.md step by step, in the same order as the gateway's parser
 * (src/cerebellumd/drivers/mcu_protocol.py), so both count the same errors on the same bytes.
 */
#include "mcu_proto.h"

#include <string.h>

uint16_t mcu_crc16_update(uint16_t crc, const uint8_t *data, size_t len)
{
    uint32_t c = crc; /* unsigned int-sized work register: no promotion to signed int */
    size_t i;
    int bit;
    for (i = 0; i < len; i++) {
        c ^= (uint32_t)data[i] << 8;
        for (bit = 0; bit < 8; bit++) {
            c = (c & 0x8000u) ? ((c << 1) ^ 0x1021u) : (c << 1);
        }
        c &= 0xFFFFu;
    }
    return (uint16_t)c;
}

uint16_t mcu_crc16(const uint8_t *data, size_t len)
{
    return mcu_crc16_update(0xFFFFu, data, len);
}

size_t mcu_payload_size(uint8_t type)
{
    switch (type) {
    case MCU_T_HEARTBEAT: return MCU_LEN_HEARTBEAT;
    case MCU_T_WAKE_REQUEST:
    case MCU_T_SLEEP_REQUEST: return MCU_LEN_REQUEST;
    case MCU_T_READINGS: return MCU_LEN_READINGS;
    case MCU_T_RAIL_COMMAND: return MCU_LEN_RAIL_COMMAND;
    case MCU_T_POWER_DOWN_ALLOWED: return MCU_LEN_POWER_DOWN_ALLOWED;
    case MCU_T_NEXT_WAKE: return MCU_LEN_NEXT_WAKE;
    case MCU_T_ACK: return MCU_LEN_ACK;
    case MCU_T_NACK: return MCU_LEN_NACK;
    default: return 0;
    }
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(((uint16_t)p[0] << 8) | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/* Two's complement without relying on implementation-defined conversions. */
static uint16_t from_i16(int16_t v)
{
    return v < 0 ? (uint16_t)(65536L + (long)v) : (uint16_t)v;
}

static int16_t to_i16(uint16_t v)
{
    return v >= 0x8000u ? (int16_t)((long)v - 65536L) : (int16_t)v;
}

size_t mcu_encode_raw(uint8_t out[MCU_MAX_FRAME], uint8_t version, uint8_t type, uint8_t seq,
                      const uint8_t *payload, size_t len)
{
    uint16_t crc;
    if (len > MCU_MAX_PAYLOAD) {
        return 0;
    }
    out[0] = MCU_SOF0;
    out[1] = MCU_SOF1;
    out[2] = version;
    out[3] = type;
    out[4] = seq;
    out[5] = (uint8_t)len;
    if (len > 0) {
        memcpy(&out[MCU_HEADER_SIZE], payload, len);
    }
    crc = mcu_crc16(&out[2], 4u + len);
    put16(&out[MCU_HEADER_SIZE + len], crc);
    return MCU_HEADER_SIZE + len + MCU_CRC_SIZE;
}

size_t mcu_encode(uint8_t out[MCU_MAX_FRAME], const mcu_msg_t *msg)
{
    uint8_t p[MCU_MAX_PAYLOAD];
    size_t len = mcu_payload_size(msg->type);
    switch (msg->type) {
    case MCU_T_HEARTBEAT:
        put32(&p[0], msg->u.heartbeat.uptime_ms);
        put16(&p[4], msg->u.heartbeat.status);
        break;
    case MCU_T_WAKE_REQUEST:
    case MCU_T_SLEEP_REQUEST:
        p[0] = msg->u.request.reason;
        break;
    case MCU_T_READINGS: {
        const mcu_readings_t *r = &msg->u.readings;
        put16(&p[0], r->battery_mv);
        put16(&p[2], from_i16(r->mcu_temp_dc));
        put16(&p[4], from_i16(r->accel_temp_dc));
        put16(&p[6], r->rail_mv);
        put16(&p[8], r->rail_ma);
        put32(&p[10], r->rail_mw);
        p[14] = r->rail_on ? 1u : 0u;
        break;
    }
    case MCU_T_RAIL_COMMAND:
        p[0] = msg->u.rail.action;
        break;
    case MCU_T_POWER_DOWN_ALLOWED:
        p[0] = msg->u.power_down.allow ? 1u : 0u;
        put16(&p[1], msg->u.power_down.after_s);
        p[3] = msg->u.power_down.reason;
        break;
    case MCU_T_NEXT_WAKE:
        put32(&p[0], msg->u.next_wake.wake_in_s);
        p[4] = msg->u.next_wake.reason;
        break;
    case MCU_T_ACK:
    case MCU_T_NACK:
        p[0] = msg->u.ack.acked_seq;
        p[1] = msg->u.ack.acked_type;
        p[2] = msg->u.ack.code; /* only sent for NACK (len 3) */
        break;
    default:
        return 0;
    }
    return mcu_encode_raw(out, MCU_VERSION, msg->type, msg->seq, p, len);
}

mcu_result_t mcu_decode_payload(uint8_t type, uint8_t seq, const uint8_t *p, size_t len,
                                mcu_msg_t *out)
{
    size_t want = mcu_payload_size(type);
    if (want == 0) {
        return MCU_ERR_UNKNOWN_TYPE;
    }
    if (len != want) {
        return MCU_ERR_LENGTH;
    }
    memset(out, 0, sizeof *out);
    out->type = type;
    out->seq = seq;
    switch (type) {
    case MCU_T_HEARTBEAT:
        out->u.heartbeat.uptime_ms = get32(&p[0]);
        out->u.heartbeat.status = get16(&p[4]);
        break;
    case MCU_T_WAKE_REQUEST:
    case MCU_T_SLEEP_REQUEST:
        out->u.request.reason = p[0];
        break;
    case MCU_T_READINGS:
        out->u.readings.battery_mv = get16(&p[0]);
        out->u.readings.mcu_temp_dc = to_i16(get16(&p[2]));
        out->u.readings.accel_temp_dc = to_i16(get16(&p[4]));
        out->u.readings.rail_mv = get16(&p[6]);
        out->u.readings.rail_ma = get16(&p[8]);
        out->u.readings.rail_mw = get32(&p[10]);
        out->u.readings.rail_on = p[14] ? 1u : 0u;
        break;
    case MCU_T_RAIL_COMMAND:
        if (p[0] > MCU_RAIL_RESET) {
            return MCU_ERR_BAD_VALUE;
        }
        out->u.rail.action = p[0];
        break;
    case MCU_T_POWER_DOWN_ALLOWED:
        if (p[0] > 1u) {
            return MCU_ERR_BAD_VALUE;
        }
        out->u.power_down.allow = p[0];
        out->u.power_down.after_s = get16(&p[1]);
        out->u.power_down.reason = p[3];
        break;
    case MCU_T_NEXT_WAKE:
        out->u.next_wake.wake_in_s = get32(&p[0]);
        if (out->u.next_wake.wake_in_s > MCU_MAX_WAKE_IN_S) {
            return MCU_ERR_BAD_VALUE;
        }
        out->u.next_wake.reason = p[4];
        break;
    case MCU_T_ACK:
        out->u.ack.acked_seq = p[0];
        out->u.ack.acked_type = p[1];
        break;
    default: /* MCU_T_NACK */
        out->u.ack.acked_seq = p[0];
        out->u.ack.acked_type = p[1];
        out->u.ack.code = p[2];
        break;
    }
    return MCU_OK;
}

/* -- parser ------------------------------------------------------------------------------- */

void mcu_parser_init(mcu_parser_t *p, mcu_on_msg_t on_msg, mcu_on_reject_t on_reject, void *ctx)
{
    memset(p, 0, sizeof *p);
    p->on_msg = on_msg;
    p->on_reject = on_reject;
    p->ctx = ctx;
}

/* Remove n bytes from the head; `garbage` says whether they count as garbage bytes. */
static void consume(mcu_parser_t *p, size_t n, bool garbage)
{
    if (n == 0) {
        return;
    }
    if (n > p->len) {
        n = p->len;
    }
    memmove(p->buf, p->buf + n, p->len - n);
    p->len -= n;
    if (garbage) {
        p->counters.garbage_bytes += (uint32_t)n;
    }
}

void mcu_parser_reset(mcu_parser_t *p)
{
    consume(p, p->len, true);
}

static uint32_t *counter_of(mcu_counters_t *c, mcu_result_t kind)
{
    switch (kind) {
    case MCU_ERR_CRC: return &c->crc;
    case MCU_ERR_LENGTH: return &c->length;
    case MCU_ERR_VERSION: return &c->version;
    case MCU_ERR_UNKNOWN_TYPE: return &c->unknown_type;
    default: return &c->bad_value;
    }
}

/* A bad candidate at the head: count it and drop its first SOF byte only, so a real frame
 * hidden inside it is found again. */
static void reject(mcu_parser_t *p, mcu_result_t kind)
{
    (*counter_of(&p->counters, kind))++;
    consume(p, 1, true);
}

/* Index of the first complete SOF (A5 5A) in the buffer, or p->len when there is none. */
static size_t find_sof(const mcu_parser_t *p)
{
    size_t i;
    for (i = 0; i + 1 < p->len; i++) {
        if (p->buf[i] == MCU_SOF0 && p->buf[i + 1] == MCU_SOF1) {
            return i;
        }
    }
    return p->len;
}

static void process(mcu_parser_t *p)
{
    for (;;) {
        size_t start = find_sof(p);
        size_t length, end;
        uint16_t crc;
        uint8_t type, seq;
        mcu_msg_t msg;
        mcu_result_t rc;

        if (start == p->len) {
            /* Keep a trailing first SOF byte: its partner may come next. */
            size_t keep = (p->len > 0 && p->buf[p->len - 1] == MCU_SOF0) ? 1u : 0u;
            consume(p, p->len - keep, true);
            return;
        }
        consume(p, start, true);
        if (p->len < MCU_HEADER_SIZE) {
            return;
        }
        if (p->buf[2] != MCU_VERSION) {
            reject(p, MCU_ERR_VERSION);
            continue;
        }
        length = p->buf[5];
        if (length > MCU_MAX_PAYLOAD) {
            reject(p, MCU_ERR_LENGTH);
            continue;
        }
        end = MCU_HEADER_SIZE + length + MCU_CRC_SIZE;
        if (p->len < end) {
            return;
        }
        crc = mcu_crc16(&p->buf[2], 4u + length);
        if (crc != get16(&p->buf[end - MCU_CRC_SIZE])) {
            reject(p, MCU_ERR_CRC);
            continue;
        }
        type = p->buf[3];
        seq = p->buf[4];
        rc = mcu_decode_payload(type, seq, &p->buf[MCU_HEADER_SIZE], length, &msg);
        if (rc != MCU_OK) {
            /* Good CRC: a real frame, just not one we understand. Skip all of it. */
            (*counter_of(&p->counters, rc))++;
            consume(p, end, true);
            if (p->on_reject != NULL) {
                p->on_reject(p->ctx, rc, type, seq);
            }
            continue;
        }
        consume(p, end, false);
        p->counters.frames++;
        if (p->on_msg != NULL) {
            p->on_msg(p->ctx, &msg);
        }
    }
}

void mcu_parser_push(mcu_parser_t *p, uint8_t byte)
{
    /* Invariant: len <= MCU_MAX_FRAME - 1 here, so there is room for one more byte. */
    p->buf[p->len++] = byte;
    process(p);
}

void mcu_parser_feed(mcu_parser_t *p, const uint8_t *data, size_t len)
{
    size_t i;
    for (i = 0; i < len; i++) {
        mcu_parser_push(p, data[i]);
    }
}
