/* SPDX-License-Identifier: Apache-2.0
 *
 * Test harness for the C codec (tests/test_firmware_mcu_link.py): reads commands on stdin,
 * one per line, and prints one answer per command so the Python reference can be checked
 * against the C one byte for byte.
 *
 *   crc HEX                       -> crc XXXX
 *   encode TYPE SEQ FIELD...      -> frame HEX        (fields in payload order, decimal or 0x..)
 *   raw VERSION TYPE SEQ [HEX]    -> frame HEX        (any payload: wrong versions, unknown types)
 *   parse [HEX]                   -> msg SEQ TYPE FIELD...  (one line per decoded frame), then
 *                                    counters FRAMES CRC LENGTH VERSION UNKNOWN_TYPE BAD_VALUE
 *                                             GARBAGE_BYTES BUFFERED
 * Errors print "error MESSAGE". Numbers are printed in decimal, types as 0x%02x.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mcu_proto.h"

static int hex_value(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Returns the number of bytes, or -1 on bad hex. */
static long parse_hex(const char *s, unsigned char *out, size_t cap)
{
    size_t n = 0;
    while (s != NULL && s[0] != '\0' && s[0] != '\n') {
        int hi = hex_value((unsigned char)s[0]);
        int lo = hex_value((unsigned char)s[1]);
        if (hi < 0 || lo < 0 || n >= cap) {
            return -1;
        }
        out[n++] = (unsigned char)(hi * 16 + lo);
        s += 2;
    }
    return (long)n;
}

static void print_hex(const char *tag, const unsigned char *data, size_t len)
{
    size_t i;
    printf("%s ", tag);
    for (i = 0; i < len; i++) {
        printf("%02x", data[i]);
    }
    printf("\n");
}

static void print_msg(void *ctx, const mcu_msg_t *m)
{
    (void)ctx;
    printf("msg %u 0x%02x", m->seq, m->type);
    switch (m->type) {
    case MCU_T_HEARTBEAT:
        printf(" %lu %u", (unsigned long)m->u.heartbeat.uptime_ms, m->u.heartbeat.status);
        break;
    case MCU_T_WAKE_REQUEST:
    case MCU_T_SLEEP_REQUEST:
        printf(" %u", m->u.request.reason);
        break;
    case MCU_T_READINGS:
        printf(" %u %d %d %u %u %lu %u", m->u.readings.battery_mv, m->u.readings.mcu_temp_dc,
               m->u.readings.accel_temp_dc, m->u.readings.rail_mv, m->u.readings.rail_ma,
               (unsigned long)m->u.readings.rail_mw, m->u.readings.rail_on);
        break;
    case MCU_T_RAIL_COMMAND:
        printf(" %u", m->u.rail.action);
        break;
    case MCU_T_POWER_DOWN_ALLOWED:
        printf(" %u %u %u", m->u.power_down.allow, m->u.power_down.after_s, m->u.power_down.reason);
        break;
    case MCU_T_NEXT_WAKE:
        printf(" %lu %u", (unsigned long)m->u.next_wake.wake_in_s, m->u.next_wake.reason);
        break;
    case MCU_T_ACK:
        printf(" %u %u", m->u.ack.acked_seq, m->u.ack.acked_type);
        break;
    default:
        printf(" %u %u %u", m->u.ack.acked_seq, m->u.ack.acked_type, m->u.ack.code);
        break;
    }
    printf("\n");
}

static int encode(char **tok, int ntok)
{
    mcu_msg_t m;
    unsigned char frame[MCU_MAX_FRAME];
    long f[8] = {0};
    int i, want;
    size_t len;
    if (ntok < 2) {
        return -1;
    }
    memset(&m, 0, sizeof m);
    m.type = (uint8_t)strtol(tok[0], NULL, 0);
    m.seq = (uint8_t)strtol(tok[1], NULL, 0);
    for (i = 2; i < ntok && i < 10; i++) {
        f[i - 2] = strtol(tok[i], NULL, 0);
    }
    switch (m.type) {
    case MCU_T_HEARTBEAT:
        want = 2;
        m.u.heartbeat.uptime_ms = (uint32_t)strtoul(tok[2 < ntok ? 2 : 0], NULL, 0);
        m.u.heartbeat.status = (uint16_t)f[1];
        break;
    case MCU_T_WAKE_REQUEST:
    case MCU_T_SLEEP_REQUEST: want = 1; m.u.request.reason = (uint8_t)f[0]; break;
    case MCU_T_READINGS:
        want = 7;
        m.u.readings.battery_mv = (uint16_t)f[0];
        m.u.readings.mcu_temp_dc = (int16_t)f[1];
        m.u.readings.accel_temp_dc = (int16_t)f[2];
        m.u.readings.rail_mv = (uint16_t)f[3];
        m.u.readings.rail_ma = (uint16_t)f[4];
        m.u.readings.rail_mw = (uint32_t)strtoul(tok[7 < ntok ? 7 : 0], NULL, 0);
        m.u.readings.rail_on = (uint8_t)(f[6] != 0);
        break;
    case MCU_T_RAIL_COMMAND: want = 1; m.u.rail.action = (uint8_t)f[0]; break;
    case MCU_T_POWER_DOWN_ALLOWED:
        want = 3;
        m.u.power_down.allow = (uint8_t)f[0];
        m.u.power_down.after_s = (uint16_t)f[1];
        m.u.power_down.reason = (uint8_t)f[2];
        break;
    case MCU_T_NEXT_WAKE:
        want = 2;
        m.u.next_wake.wake_in_s = (uint32_t)strtoul(tok[2 < ntok ? 2 : 0], NULL, 0);
        m.u.next_wake.reason = (uint8_t)f[1];
        break;
    case MCU_T_ACK: want = 2; m.u.ack.acked_seq = (uint8_t)f[0]; m.u.ack.acked_type = (uint8_t)f[1]; break;
    case MCU_T_NACK:
        want = 3;
        m.u.ack.acked_seq = (uint8_t)f[0];
        m.u.ack.acked_type = (uint8_t)f[1];
        m.u.ack.code = (uint8_t)f[2];
        break;
    default: return -1;
    }
    if (ntok - 2 != want) {
        return -1;
    }
    len = mcu_encode(frame, &m);
    print_hex("frame", frame, len);
    return 0;
}

int main(void)
{
    static char line[1 << 16];
    static unsigned char bytes[1 << 15];
    while (fgets(line, sizeof line, stdin) != NULL) {
        char *tok[16];
        int ntok = 0;
        char *t = strtok(line, " \t\r\n");
        while (t != NULL && ntok < 16) {
            tok[ntok++] = t;
            t = strtok(NULL, " \t\r\n");
        }
        if (ntok == 0) {
            continue;
        }
        if (strcmp(tok[0], "crc") == 0) {
            long n = parse_hex(ntok > 1 ? tok[1] : "", bytes, sizeof bytes);
            if (n < 0) {
                printf("error bad hex\n");
            } else {
                printf("crc %04x\n", mcu_crc16(bytes, (size_t)n));
            }
        } else if (strcmp(tok[0], "encode") == 0) {
            if (encode(tok + 1, ntok - 1) != 0) {
                printf("error bad encode command\n");
            }
        } else if (strcmp(tok[0], "raw") == 0 && ntok >= 4) {
            unsigned char frame[MCU_MAX_FRAME];
            long n = parse_hex(ntok > 4 ? tok[4] : "", bytes, MCU_MAX_PAYLOAD);
            if (n < 0) {
                printf("error bad payload\n");
            } else {
                size_t len = mcu_encode_raw(frame, (uint8_t)strtol(tok[1], NULL, 0), (uint8_t)strtol(tok[2], NULL, 0),
                                            (uint8_t)strtol(tok[3], NULL, 0), bytes, (size_t)n);
                print_hex("frame", frame, len);
            }
        } else if (strcmp(tok[0], "parse") == 0) {
            mcu_parser_t p;
            long n = parse_hex(ntok > 1 ? tok[1] : "", bytes, sizeof bytes);
            if (n < 0) {
                printf("error bad hex\n");
            } else {
                const mcu_counters_t *c = &p.counters;
                mcu_parser_init(&p, print_msg, NULL, NULL);
                mcu_parser_feed(&p, bytes, (size_t)n);
                printf("counters %lu %lu %lu %lu %lu %lu %lu %lu\n", (unsigned long)c->frames,
                       (unsigned long)c->crc, (unsigned long)c->length, (unsigned long)c->version,
                       (unsigned long)c->unknown_type, (unsigned long)c->bad_value,
                       (unsigned long)c->garbage_bytes, (unsigned long)p.len);
            }
        } else {
            printf("error unknown command %s\n", tok[0]);
        }
        fflush(stdout);
    }
    return 0;
}
