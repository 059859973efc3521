/* SPDX-License-Identifier: Apache-2.0
 *
 * Companion-MCU serial protocol, version 1 (docs/mcu-protocol.md is the contract).
 *
 * Frame (multi-byte fields big-endian):
 *   SOF 0xA5 0x5A | version | type | seq | length | payload[length] | CRC-16 (2)
 * CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final XOR) over
 * version .. end of payload.
 *
 * Portable C99: no heap, no OS, no floating point. The parser holds at most one maximal frame.
 */
#ifndef MCU_PROTO_H
#define MCU_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MCU_SOF0 0xA5u
#define MCU_SOF1 0x5Au
#define MCU_VERSION 1u
#define MCU_HEADER_SIZE 6u
#define MCU_CRC_SIZE 2u
#define MCU_MAX_PAYLOAD 64u
#define MCU_MAX_FRAME (MCU_HEADER_SIZE + MCU_MAX_PAYLOAD + MCU_CRC_SIZE) /* 72 */

/* Message types. */
#define MCU_T_HEARTBEAT 0x01u
#define MCU_T_WAKE_REQUEST 0x02u
#define MCU_T_SLEEP_REQUEST 0x03u
#define MCU_T_READINGS 0x04u
#define MCU_T_RAIL_COMMAND 0x10u
#define MCU_T_POWER_DOWN_ALLOWED 0x11u
#define MCU_T_NEXT_WAKE 0x12u
#define MCU_T_ACK 0x7Eu
#define MCU_T_NACK 0x7Fu

/* HEARTBEAT status flags. */
#define MCU_STATUS_IGNITION_ON 0x0001u
#define MCU_STATUS_RAIL_ON 0x0002u
#define MCU_STATUS_LOW_BATTERY 0x0004u
#define MCU_STATUS_OVER_TEMPERATURE 0x0008u
#define MCU_STATUS_WATCHDOG_RESET 0x0010u

/* WAKE/SLEEP_REQUEST reasons (unknown codes are allowed on the wire). */
#define MCU_REASON_UNSPECIFIED 0u
#define MCU_REASON_IGNITION 1u
#define MCU_REASON_CAN_ACTIVITY 2u
#define MCU_REASON_USER_BUTTON 3u
#define MCU_REASON_TIMER 4u
#define MCU_REASON_DIAGNOSTICS 5u
#define MCU_REASON_LOW_BATTERY 6u
#define MCU_REASON_OVER_TEMPERATURE 7u
#define MCU_REASON_ENERGY_BUDGET 8u
#define MCU_REASON_PARKED_TIME 9u

/* NEXT_WAKE: wake_in_s above this is out of range (millisecond timers compare modulo 2^32). */
#define MCU_MAX_WAKE_IN_S 2000000ul

/* RAIL_COMMAND actions. */
#define MCU_RAIL_OFF 0u
#define MCU_RAIL_ON 1u
#define MCU_RAIL_RESET 2u /* power cycle, ends on */

/* NACK codes. */
#define MCU_NACK_UNSPECIFIED 0u
#define MCU_NACK_BAD_ARGUMENT 1u
#define MCU_NACK_BUSY 2u
#define MCU_NACK_FAULT 3u

/* Payload sizes per type. */
#define MCU_LEN_HEARTBEAT 6u
#define MCU_LEN_REQUEST 1u
#define MCU_LEN_READINGS 15u
#define MCU_LEN_RAIL_COMMAND 1u
#define MCU_LEN_POWER_DOWN_ALLOWED 4u
#define MCU_LEN_NEXT_WAKE 5u
#define MCU_LEN_ACK 2u
#define MCU_LEN_NACK 3u

/* Decode results / error kinds; the same names as the Python parser's counters. */
typedef enum {
    MCU_OK = 0,
    MCU_ERR_CRC,
    MCU_ERR_LENGTH,
    MCU_ERR_VERSION,
    MCU_ERR_UNKNOWN_TYPE,
    MCU_ERR_BAD_VALUE
} mcu_result_t;

typedef struct {
    uint32_t uptime_ms;
    uint16_t status;
} mcu_heartbeat_t;

typedef struct {
    uint8_t reason;
} mcu_request_t; /* WAKE_REQUEST and SLEEP_REQUEST */

typedef struct {
    uint16_t battery_mv;
    int16_t mcu_temp_dc;   /* 0.1 degC */
    int16_t accel_temp_dc; /* 0.1 degC */
    uint16_t rail_mv;
    uint16_t rail_ma;
    uint32_t rail_mw;
    uint8_t rail_on; /* 0/1 (any non-zero decodes as 1) */
} mcu_readings_t;

typedef struct {
    uint8_t action;
} mcu_rail_command_t;

typedef struct {
    uint8_t allow; /* 0/1 (other values do not decode) */
    uint16_t after_s;
    uint8_t reason;
} mcu_power_down_t;

typedef struct {
    uint32_t wake_in_s; /* 0 cancels */
    uint8_t reason;
} mcu_next_wake_t;

typedef struct {
    uint8_t acked_seq;
    uint8_t acked_type;
    uint8_t code; /* NACK only */
} mcu_ack_t; /* ACK and NACK */

typedef struct {
    uint8_t type;
    uint8_t seq;
    union {
        mcu_heartbeat_t heartbeat;
        mcu_request_t request;
        mcu_readings_t readings;
        mcu_rail_command_t rail;
        mcu_power_down_t power_down;
        mcu_next_wake_t next_wake;
        mcu_ack_t ack;
    } u;
} mcu_msg_t;

/* CRC-16/CCITT-FALSE; mcu_crc16_update lets a caller run it over several pieces. */
uint16_t mcu_crc16_update(uint16_t crc, const uint8_t *data, size_t len);
uint16_t mcu_crc16(const uint8_t *data, size_t len);

/* Payload size of a known type; 0 for an unknown one. */
size_t mcu_payload_size(uint8_t type);

/* Encode a message into `out` (MCU_MAX_FRAME bytes); returns the frame length, 0 for an
 * unknown type. */
size_t mcu_encode(uint8_t out[MCU_MAX_FRAME], const mcu_msg_t *msg);

/* A frame around any payload (len <= MCU_MAX_PAYLOAD); for tests that need a wrong version or
 * an unknown type. Returns the frame length, 0 if len is too long. */
size_t mcu_encode_raw(uint8_t out[MCU_MAX_FRAME], uint8_t version, uint8_t type, uint8_t seq,
                      const uint8_t *payload, size_t len);

/* Decode the payload of a frame whose CRC was good. */
mcu_result_t mcu_decode_payload(uint8_t type, uint8_t seq, const uint8_t *payload, size_t len,
                                mcu_msg_t *out);

typedef struct {
    uint32_t frames;
    uint32_t crc;
    uint32_t length;
    uint32_t version;
    uint32_t unknown_type;
    uint32_t bad_value;
    uint32_t garbage_bytes;
} mcu_counters_t;

/* A good frame. */
typedef void (*mcu_on_msg_t)(void *ctx, const mcu_msg_t *msg);
/* A frame with a good CRC that does not decode (kind: LENGTH, UNKNOWN_TYPE or BAD_VALUE): a real
 * frame from a newer peer, skipped whole. May be NULL. */
typedef void (*mcu_on_reject_t)(void *ctx, mcu_result_t kind, uint8_t type, uint8_t seq);

/* Incremental, resynchronising parser (SOF + length, drop one byte on a bad candidate). It
 * never holds more than MCU_MAX_FRAME - 1 bytes between calls. The callbacks run after the frame
 * has left the buffer; they must not push into the same parser. */
typedef struct {
    uint8_t buf[MCU_MAX_FRAME];
    size_t len;
    mcu_counters_t counters;
    mcu_on_msg_t on_msg;
    mcu_on_reject_t on_reject;
    void *ctx;
} mcu_parser_t;

void mcu_parser_init(mcu_parser_t *p, mcu_on_msg_t on_msg, mcu_on_reject_t on_reject, void *ctx);
/* Forget a partial frame (its bytes count as garbage), as after a reconnect. */
void mcu_parser_reset(mcu_parser_t *p);
void mcu_parser_push(mcu_parser_t *p, uint8_t byte);
void mcu_parser_feed(mcu_parser_t *p, const uint8_t *data, size_t len);

#endif /* MCU_PROTO_H */
